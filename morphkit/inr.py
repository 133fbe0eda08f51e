"""The implicit neural representation: coordinates in, weight values out (paper eq. 4).

A residual MLP (ReLU) maps the Fourier features of a row's six coordinates to
a hidden vector; one linear *head* per predicted tensor ("block-based") turns
it into that tensor's trailing values (``k*k`` for a conv, the spatial
positions of a flattened map, 1 for a bias), in units of the tensor's RMS.

With ``residual=True`` (the default) the INR also holds each tensor's smoothed
base weights as a ``(C_out, C_in, trailing)`` grid and adds their resampling
at the row's cell: ``base(cell) + MLP(coords) * rms``. ``resample="area"`` (the
config default) averages the base channels each cell covers
(:func:`area_weights`), so a narrower model starts from neighbouring channels
merged (fan-out averaged, fan-in summed once the fan-in factor applies), read
at the clean coordinates: noise moves only the MLP's input.
``resample="bilinear"`` interpolates the grid at the row's (out, in)
coordinates, moved by the noise unless ``base_noise=False``. Heads start at
zero, so before any training the INR reproduces the base model exactly at
full width and a merge of it at other widths. With ``train_base`` the grids
are parameters trained with the MLP: the MLP is a smooth function of the
coordinates and makes smooth corrections, the grids the per-weight ones.
``residual=False`` is the paper's pure INR.

A *factored* tensor (rank ``r > 0``: a linear layer's weight) has no row
per ``(out, in)`` pair: its rows are one query per out channel and one per
in channel (the other channel column held at 0.5), its head emits
``r + r * T`` values per query, and the correction at ``(o, i)`` is
``sum_j a_j(o) * b_j(i) / sqrt(r)`` with ``a(o)`` out-query ``o``'s first
``r`` values and ``b(i)`` in-query ``i``'s last ``r * T`` as ``(r, T)``. A
hidden ``Linear(120, 84)`` is then 204 queries, not 10,080 rows; the base
grid still holds every weight.

The trunk runs once over all rows of a coordinate table; each head runs on its
tensor's contiguous slice of rows, so the only Python loop is over tensors,
never over rows. The caller multiplies the output by the fan-in factor.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from morphkit.coords import fourier_features

__all__ = ["INR", "bilinear_rows", "area_weights"]

N_COORDS = 6
NOISY = [1, 2]  # the out / in channel columns: the only ones coordinate noise moves
FIXED = [0, 3, 4, 5]  # layer, out width, in width, role


def bilinear_rows(grid: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """Interpolate a ``(C_out, C_in, T)`` grid at cell-centre coordinates in [0, 1].

    Args:
        grid: Base values, one cell per channel pair.
        u_out: ``(R,)`` out coordinates (``(o + 0.5) / C`` plus noise).
        u_in: ``(R,)`` in coordinates.

    Returns:
        ``(R, T)`` interpolated rows (clamped at the borders).

    Example:
        >>> g = torch.arange(4.).reshape(2, 2, 1)
        >>> bilinear_rows(g, torch.tensor([0.25, 0.5]), torch.tensor([0.25, 0.5])).squeeze(1)
        tensor([0.0000, 1.5000])
    """
    c_out, c_in, _ = grid.shape

    def split(u: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = (u * c - 0.5).clamp(0, c - 1)  # (R,) position in base channel units
        r = p.round()
        p = torch.where((p - r).abs() < 1e-4, r, p)  # cell centres exact despite float32 rounding
        lo = p.floor().long().clamp(max=c - 1)
        hi = (lo + 1).clamp(max=c - 1)
        return lo, hi, (p - lo).unsqueeze(1)  # weights (R, 1)

    o0, o1, wo = split(u_out, c_out)
    i0, i1, wi = split(u_in, c_in)
    top = grid[o0, i0] * (1 - wi) + grid[o0, i1] * wi  # (R, T)
    bot = grid[o1, i0] * (1 - wi) + grid[o1, i1] * wi  # (R, T)
    return top * (1 - wo) + bot * wo


def area_weights(count: int, size: int, jitter: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``(count, size)`` box-filter weights: cell ``o`` of ``count`` averages the base channels it covers.

    Cell ``o`` spans ``[o / count, (o + 1) / count)``, base channel ``n`` spans
    ``[n / size, (n + 1) / size)``; the weight is their overlap over the cell's
    length, so every row sums to 1 and ``count == size`` gives the identity.
    ``jitter`` (training only) moves each interior cell edge by
    ``U(-jitter, jitter)`` cells (edges kept in order), so a cell covers a
    varying share of its neighbours; a row then sums to its cell's length in cells.

    Example:
        >>> area_weights(2, 3)
        tensor([[0.6667, 0.3333, 0.0000],
                [0.0000, 0.3333, 0.6667]])
    """
    edges_c = torch.arange(count + 1, dtype=torch.float64) / count  # (count + 1,)
    if jitter > 0 and count > 1:
        move = torch.rand(count - 1, generator=generator, dtype=torch.float64) * 2 - 1  # (count - 1,) in U(-1, 1)
        edges_c[1:-1] += move * jitter / count
        edges_c = edges_c.clamp(0, 1).sort().values
    edges_s = torch.arange(size + 1, dtype=torch.float64) / size  # (size + 1,)
    lo = torch.maximum(edges_c[:-1, None], edges_s[None, :-1])  # (count, size)
    hi = torch.minimum(edges_c[1:, None], edges_s[None, 1:])  # (count, size)
    return ((hi - lo).clamp_min(0) * count).float()


_small_area_weights = lru_cache(maxsize=1024)(area_weights)  # <= 64 KB each: at most 64 MB cached


def _area_weights(count: int, size: int) -> torch.Tensor:
    """:func:`area_weights` for the training and sampling loops: small ones cached (never modified in place)."""
    return _small_area_weights(count, size) if count * size <= 1 << 14 else area_weights(count, size)


def box_merge(grid: torch.Tensor, c_out: int, c_in: int, jitter: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Average a ``(N_out, N_in, T)`` grid of channel cells over the cells of a ``c_out x c_in`` width.

    Both channel dims go through :func:`area_weights` (``jitter``: training's
    jittered cell edges, drawn afresh per dim). It resamples the residual base
    to a width, and folds a narrower prediction from a wider one
    (:func:`~morphkit.manifold.fold_rows`).

    Example:
        >>> box_merge(torch.arange(4.0).view(2, 2, 1), 1, 2).flatten().tolist()
        [1.0, 2.0]
    """
    n_out, n_in, _ = grid.shape

    def weights(count: int, size: int) -> torch.Tensor:
        a = area_weights(count, size, jitter, generator) if jitter > 0 else _area_weights(count, size)
        return a.to(grid)

    if c_out != n_out:
        grid = torch.einsum("on,nmt->omt", weights(c_out, n_out), grid)  # (c_out, N_in, T)
    if c_in != n_in:
        grid = torch.einsum("im,omt->oit", weights(c_in, n_in), grid)  # (c_out, c_in, T)
    return grid


class INR(nn.Module):
    """Residual MLP with one head per predicted tensor, optionally over base grids.

    Args:
        head_sizes: Trailing size of each predicted tensor, in layout order.
        hidden: Hidden width.
        layers: Hidden layers (the first maps features in, the rest are residual).
        n_freqs: Fourier frequencies per coordinate.
        scales: RMS of each tensor (the heads' output unit); default 1.
        grid_shapes: ``(C_out, C_in, trailing)`` of each tensor's base grid for
            the residual form, or None for the pure INR. Grids start at zero;
            fill them with :meth:`set_grids` (or load a state dict).
        base_noise: Read the residual base at the noisy coordinates too (False:
            at the clean ones).
        resample: ``"bilinear"`` or ``"area"`` (the base averaged over each cell,
            at the clean coordinates; callers pass it to :meth:`head` from
            :meth:`area_base`).
        train_base: Make the base grids trainable parameters (else buffers).
        bf16: Run the MLP's matrix products under bfloat16 autocast (outputs float32).
        ranks: Per tensor, the rank of its factored correction (0: one row per
            ``(out, in)`` pair; ``r > 0`` needs no bilinear base).

    Example:
        >>> inr = INR([25, 1], hidden=32, layers=2, n_freqs=4)
        >>> outs = inr(torch.rand(10, 6), [(0, 6), (6, 10)])
        >>> [tuple(o.shape) for o in outs]
        [(6, 25), (4, 1)]
    """

    def __init__(self, head_sizes: list[int], hidden: int = 256, layers: int = 5, n_freqs: int = 16,
                 scales: list[float] | None = None,
                 grid_shapes: list[tuple[int, int, int]] | None = None, base_noise: bool = True,
                 resample: str = "bilinear", train_base: bool = False, bf16: bool = False,
                 ranks: list[int] | None = None) -> None:
        super().__init__()
        self.ranks = list(ranks) if ranks is not None else [0] * len(head_sizes)
        assert len(self.ranks) == len(head_sizes)
        self.trailing = list(head_sizes)
        assert all(r == 0 or grid_shapes is None or resample == "area" for r in self.ranks), \
            "factored heads need no bilinear base"
        self.base_noise = base_noise
        self.resample = resample
        self.bf16 = bf16
        self.n_freqs = n_freqs
        self.inp = nn.Linear(N_COORDS * (2 * n_freqs + 1), hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.heads = nn.ModuleList(nn.Linear(hidden, r + r * s if r else s) for s, r in zip(head_sizes, self.ranks))
        self.register_buffer("scales", torch.tensor(scales if scales is not None else [1.0] * len(head_sizes),
                                                    dtype=torch.float32))
        self.residual = grid_shapes is not None
        if self.residual:
            for k, shape in enumerate(grid_shapes):
                if train_base:
                    self.register_parameter(f"grid{k}", nn.Parameter(torch.zeros(shape)))
                else:
                    self.register_buffer(f"grid{k}", torch.zeros(shape))
            for head, r in zip(self.heads, self.ranks):  # residual form: start exactly at the base weights
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
                if r:  # out embeddings random, in embeddings zero: the product starts at 0 with gradients
                    nn.init.normal_(head.weight[:r], std=1 / hidden**0.5)
        else:
            for head in self.heads:
                nn.init.normal_(head.weight, std=0.5 / hidden**0.5)
                nn.init.zeros_(head.bias)

    def set_grids(self, grids: list[torch.Tensor]) -> None:
        """Copy the base grids in (residual form only)."""
        with torch.no_grad():
            for k, g in enumerate(grids):
                getattr(self, f"grid{k}").copy_(g)

    def _autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def trunk(self, coords: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden features of ``(R, 6)`` coordinates: ``(R, hidden)`` (bfloat16 when ``bf16``).

        ``fixed`` is :meth:`fixed_part` of the same rows (``(R, hidden)``, or
        ``(R', hidden)`` repeated ``R / R'`` times): the first layer then only
        embeds the two channel columns, the ones coordinate noise moves.
        """
        with self._autocast(coords.device):
            if fixed is None:
                pre = self.inp(fourier_features(coords, self.n_freqs))  # (R, hidden)
            else:
                w = self.inp.weight[:, self._columns(NOISY)]  # (hidden, 2 * (2F + 1))
                moving = F.linear(fourier_features(coords[:, NOISY], self.n_freqs), w)  # (R, hidden)
                pre = moving.view(-1, *fixed.shape) + fixed  # (R / R', R', hidden)
                pre = pre.reshape(coords.shape[0], -1)  # (R, hidden)
            inplace = not torch.is_grad_enabled()  # sampling: no graph to keep, spare the copies
            h = F.relu(pre, inplace=inplace)  # (R, hidden)
            for block in self.blocks:
                h = h.add_(F.relu(block(h), inplace=True)) if inplace else h + F.relu(block(h))  # (R, hidden)
        return h

    def fixed_part(self, coords: torch.Tensor) -> torch.Tensor:
        """The first layer's bias plus the embedding of the columns noise never moves: ``(R, hidden)``."""
        w = self.inp.weight[:, self._columns(FIXED)]  # (hidden, 4 * (2F + 1))
        with self._autocast(coords.device):
            return F.linear(fourier_features(coords[:, FIXED], self.n_freqs), w, self.inp.bias)

    def _columns(self, coords: list[int]) -> list[int]:
        """Columns of :func:`fourier_features` output belonging to these coordinate columns."""
        per = 2 * self.n_freqs + 1
        return [c * per + j for c in coords for j in range(per)]

    def area_base(self, k: int, c_out: int, c_in: int, jitter: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Tensor ``k``'s base averaged over the cells of a ``c_out x c_in`` width: ``(c_out * c_in, T)``.

        Rows are in the coordinate table's order (out-major); at the base
        width this is the grid itself. ``jitter`` (training) merges over
        jittered cells (:func:`area_weights`), drawn afresh for each call and
        dim: like coordinate noise, independent from tensor to tensor.
        """
        grid = getattr(self, f"grid{k}")  # (N_out, N_in, T)
        return box_merge(grid, c_out, c_in, jitter, generator).reshape(c_out * c_in, grid.shape[2])

    def head(self, k: int, h: torch.Tensor, coords: torch.Tensor,
             clean: torch.Tensor | None = None, base: torch.Tensor | None = None,
             cells: tuple[int, int] | None = None, sum_draws: bool = False) -> torch.Tensor:
        """Tensor ``k``'s rows from hidden features ``(..., R, hidden)`` and coords ``(..., R, 6)``.

        ``clean`` (same shape as ``coords``) are the coordinates before noise:
        the residual base is looked up there unless ``base_noise`` is set.
        ``base`` (``(C_out * C_in, T)``, broadcast over leading dims) is the
        residual base of these rows, required with ``resample="area"`` (see
        :meth:`area_base`). ``cells`` (``(C_out, C_in)``) is required for a
        factored tensor, whose ``R = C_out + C_in`` rows are queries and whose
        output has ``C_out * C_in`` rows. ``sum_draws``: ``h`` is
        ``(D, R, hidden)``, D noisy draws, and the output is their sum
        (``(rows, T)``; a factored product then never holds D matrices).
        """
        r = self.ranks[k]
        draws = h.shape[0] if sum_draws else 1
        with self._autocast(h.device):
            out = self.heads[k](h)  # (..., R, T), factored: (..., C_out + C_in, r + r * T)
            if r:
                assert cells is not None and cells[0] + cells[1] == h.shape[-2], "factored head needs its cells"
                c_out, c_in = cells
                t = self.trailing[k]
                a = out[..., :c_out, :r]  # (..., C_out, r)
                b = out[..., c_out:, r:].unflatten(-1, (r, t))  # (..., C_in, r, T)
                # sum_draws: one contraction sums the draws too, never holding D products
                out = torch.einsum("dor,dirt->oit" if sum_draws else "...or,...irt->...oit", a, b) * r**-0.5
                out = out.reshape(*out.shape[:-3], c_out * c_in, t)  # (..., C_out * C_in, T)
        out = out.float()
        if sum_draws and not r:
            out = out.sum(0)  # (R, T)
        out = out * self.scales[k]
        if self.residual:
            if base is None:
                assert self.resample == "bilinear", "resample='area' needs the base rows from area_base()"
                grid = getattr(self, f"grid{k}")
                at = coords if self.base_noise or clean is None else clean
                flat = at.reshape(-1, at.shape[-1])
                base = bilinear_rows(grid, flat[:, 1], flat[:, 2]).reshape(*at.shape[:-1], -1)
                base = base.sum(0) if sum_draws else base
            elif sum_draws:
                base = base * draws
            out = out + base
        return out

    def forward(self, coords: torch.Tensor, segments: list[tuple[int, int]],
                which: list[int] | None = None, clean: torch.Tensor | None = None,
                bases: list[torch.Tensor] | None = None,
                cells: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Predict the rows of each tensor.

        Args:
            coords: ``(R, 6)`` coordinates of the rows of every tensor in ``which``,
                concatenated in that order.
            segments: ``(start, end)`` of each tensor's rows within ``coords``.
            which: Head index of each segment (default: ``range(len(segments))``).
            clean: ``coords`` before noise (where the residual base is read; see :meth:`head`).
            bases: Per segment, the residual base rows (``resample="area"``).
            cells: Per segment, ``(C_out, C_in)`` (required for factored tensors).

        Returns:
            One ``(rows, trailing)`` tensor per segment (before the fan-in factor).
        """
        h = self.trunk(coords)  # (R, hidden)
        which = list(range(len(segments))) if which is None else which
        sizes = [e - s for s, e in segments]
        if [s for s, _ in segments] == [sum(sizes[:j]) for j in range(len(sizes))] and sum(sizes) == h.shape[0]:
            # contiguous segments: one split, whose backward is one concatenation (a slice per tensor
            # would fill a zero tensor of all R rows per tensor in the backward pass)
            hs = h.split(sizes)
        else:
            hs = tuple(h[s:e] for s, e in segments)
        return [self.head(k, hs[j], coords[s:e], None if clean is None else clean[s:e],
                          None if bases is None else bases[j], None if cells is None else cells[j])
                for j, (k, (s, e)) in enumerate(zip(which, segments))]
