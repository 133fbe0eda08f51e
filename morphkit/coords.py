"""Coordinates of every predicted weight, for any width map (paper section 3.2).

A *layout* says how one ``state_dict`` tensor is seen by the INR: its
clique-indexed dimensions become the coordinate grid ("rows": ``out x in``),
everything else (kernel positions, the spatial positions of a flattened
feature map, q/k/v copies) is the *trailing* vector one INR head emits per row.
A *coordinate table* holds, for one width map, one row per ``(tensor, out,
in)`` with six normalised coordinates

    [layer, out, in, out_width, in_width, role]

where ``out = (o + 0.5) / C_out`` (cell centres, so grids of different sizes
interleave), ``out_width = C_out / size_out`` is the clique's current width,
``layer`` is the module's depth and ``role`` the tensor's place in its module
(weight, bias, ...). A *factored* layout (a plain matrix whose INR correction
is low-rank, see :class:`~morphkit.inr.INR`) has instead one row per out
channel (``in`` held at 0.5) followed by one per in channel (``out`` at 0.5).
Tables are built with tensor ops and cached per width map.
``assemble`` turns predicted rows back into tensors of the resized shapes;
``to_rows`` does the reverse for reconstruction targets.

A *concatenated* dim (a layer fed by ``torch.cat`` of several cliques'
channels: each clique's member marks the other cliques' positions ``-1``) is
one row dim over a composite channel axis: the parts' channels one after the
other, in the order of their first positions (a U-Net decoder's input is
``[up | skip]``). At a width map each part keeps ``clique.kept(count)``, so the
dim keeps exactly the positions :func:`~morphkit.resize.resize` keeps, in base
order. A part's channel ``j`` of ``k`` sits at ``(offset + (j + 0.5) * size / k)
/ total`` on the composite axis: the parts' boundaries stay put whatever their
widths, and at a uniform width the coordinates are those of one clique of
``total`` channels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from morphkit.clique import Clique

__all__ = ["DimSpec", "TensorLayout", "DimPlan", "CoordTable", "plan_layouts", "CoordBuilder",
           "fourier_features", "resize_static", "dim_spec", "WidthMap"]

logger = logging.getLogger(__name__)

WidthMap = dict[int, int]  # clique id -> channel count
BLOCK_CACHE_FLOATS = 1 << 24  # cached coordinate blocks per builder: at most 64 MB of float32


@dataclass(frozen=True)
class DimSpec:
    """One clique-indexed dimension of a predicted tensor.

    Attributes:
        dim: The tensor dimension.
        clique: Its clique; for a concatenated dim the first part's.
        index: Channel of every position (``None``: the identity); for a
            concatenated dim the composite channel (part offset + channel).
        multiplicity: Positions per channel (flatten: spatial size; fused qkv: 3).
        size: Channels in the base model (a concatenated dim: all parts together).
        resizable: Whether the dim changes size with the width map (a
            concatenated dim: whether any part does).
        parts: A concatenated dim's cliques in composite order; ``()`` otherwise.
    """

    dim: int
    clique: int
    index: tuple[int, ...] | None
    multiplicity: int
    size: int
    resizable: bool
    parts: tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorLayout:
    """How the INR sees one predicted tensor.

    Attributes:
        name: ``state_dict`` key.
        shape: Base shape.
        rows: One or two clique dims (sorted): the first is "out", the second "in".
        layer: Index of the owning module among modules with predicted tensors.
        role: Index of this tensor among its module's predicted tensors.
        scale: RMS of the base tensor (the head's output unit).
        fan_dim: The tensor's fan-in dim: 1 for conv and linear weights, 0 for
            transformers' ``Conv1D`` (weight ``(in, out)``), -1 for none (an
            embedding's dim 1 is its output).
    """

    name: str
    shape: tuple[int, ...]
    rows: tuple[DimSpec, ...]
    layer: int
    role: int
    scale: float
    fan_dim: int = 1

    @property
    def trailing(self) -> int:
        """Values one head emits per row (width-independent)."""
        row_dims = {r.dim for r in self.rows}
        rest = math.prod(s for d, s in enumerate(self.shape) if d not in row_dims)
        return rest * math.prod(r.multiplicity for r in self.rows)

    @property
    def in_only(self) -> bool:
        """The only row dim is the fan-in: its coordinate is the "in" column, "out" is constant."""
        return len(self.rows) == 1 and self.rows[0].dim == self.fan_dim

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """``(C_out, C_in, trailing)`` of the base grid (1 for a missing out or in dim)."""
        sizes = [r.size for r in self.rows]
        c_out, c_in = (1, sizes[0]) if self.in_only else (sizes[0], math.prod(sizes[1:]))
        return c_out, c_in, self.trailing

    @property
    def fan_in(self) -> DimSpec | None:
        """The row dim that is the tensor's fan-in (:attr:`fan_dim`), if it is clique-indexed."""
        return next((r for r in self.rows if r.dim == self.fan_dim), None)

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "shape": list(self.shape), "layer": self.layer, "role": self.role,
             "scale": self.scale,
             "rows": [_row_json(r) for r in self.rows]}
        if self.fan_dim != 1:  # only then: other layouts' JSON is unchanged
            d["fan_dim"] = self.fan_dim
        return d


def _row_json(r: DimSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"dim": r.dim, "clique": r.clique, "multiplicity": r.multiplicity, "size": r.size,
                         "resizable": r.resizable}
    if r.parts:  # only concatenated dims: other layouts' JSON is unchanged
        d["parts"] = list(r.parts)
    return d


DimMembers = list[tuple[Clique, Any]]  # the (clique, member) pairs that index one tensor dim


def _dims_of(cliques: list[Clique]) -> dict[str, dict[int, DimMembers]]:
    """tensor name -> {dim: [(clique, member), ...]} (several cliques on a concatenated dim)."""
    out: dict[str, dict[int, DimMembers]] = {}
    for c in cliques:
        for m in c.members:
            out.setdefault(m.name, {}).setdefault(m.dim, []).append((c, m))
    return out


def _channels(index: tuple[int, ...] | None, length: int) -> np.ndarray | None:
    """``(length,)`` channel of every position (``-1``: another clique's); None when the map does not fit."""
    if index is None:
        return np.arange(length, dtype=np.int64)
    idx = np.asarray(index, dtype=np.int64)
    return idx if idx.shape == (length,) else None


def _concat_parts(pairs: DimMembers, length: int) -> tuple[list[Clique], np.ndarray, int] | None:
    """A concatenated dim as one composite channel axis.

    Returns:
        ``(parts, index, total)``: the cliques in the order of their first
        positions, the composite channel of every position (part offset +
        channel, ``(length,)``) and the composite size; None when the cliques'
        positions do not partition the dim (a position of no clique or of two).
    """
    owner = np.full(length, -1, dtype=np.int64)  # (length,) which pair owns each position
    chans = []
    for j, (_, m) in enumerate(pairs):
        idx = _channels(m.index, length)
        if idx is None:
            return None
        sel = idx >= 0
        if (owner[sel] >= 0).any():
            return None
        owner[sel] = j
        chans.append(idx)
    if length == 0 or (owner < 0).any():
        return None
    first = {j: int(np.argmax(owner == j)) for j in range(len(pairs)) if (owner == j).any()}
    if len(first) != len(pairs):
        return None
    order = sorted(first, key=first.get)
    offsets = np.zeros(len(pairs), dtype=np.int64)
    total = 0
    for j in order:
        offsets[j] = total
        total += pairs[j][0].size
    comp = np.empty(length, dtype=np.int64)
    for j, idx in enumerate(chans):
        sel = owner == j
        comp[sel] = offsets[j] + idx[sel]
    return [pairs[j][0] for j in order], comp, total


def dim_spec(pairs: DimMembers, dim: int, length: int) -> DimSpec | None:
    """The row spec of one tensor dim from the cliques that index it; None when no spec fits.

    One clique whose map covers the dim gives a plain spec; several whose
    positions partition the dim (``torch.cat``) give a concatenated one. None
    when the channels do not all have the same number of positions, or the
    cliques leave a position uncovered or claim one twice (the tensor then
    stays static: copied from the base and sliced like :func:`~morphkit.resize.resize` slices it).

    Example:
        >>> from morphkit.clique import Member
        >>> a, b = Clique(0, 2, [Member("w", 1, (0, 1, -1))]), Clique(1, 1, [Member("w", 1, (-1, -1, 0))])
        >>> dim_spec([(a, a.members[0]), (b, b.members[0])], 1, 3)
        DimSpec(dim=1, clique=0, index=(0, 1, 2), multiplicity=1, size=3, resizable=True, parts=(0, 1))
    """
    owning = [(c, m) for c, m in pairs if m.index is None or max(m.index, default=-1) >= 0]
    pairs = owning or pairs  # a member with no position of its own does not shape the dim
    if len(pairs) == 1:
        c, m = pairs[0]
        idx = _channels(m.index, length)
        if idx is not None and (idx.size == 0 or idx.min() >= 0):
            mult = _multiplicity(m.index, c.size, length)
            return None if mult is None else DimSpec(dim, c.id, m.index, mult, c.size, not c.fixed)
    found = _concat_parts(pairs, length)
    if found is None:
        return None
    parts, comp, total = found
    mult = _multiplicity(tuple(comp.tolist()), total, length)
    if mult is None:
        return None
    return DimSpec(dim, parts[0].id, tuple(comp.tolist()), mult, total, any(not c.fixed for c in parts),
                   tuple(c.id for c in parts))


def _multiplicity(index: tuple[int, ...] | None, size: int, length: int) -> int | None:
    """Positions per channel when uniform, else None."""
    if index is None:
        return 1 if length == size else None
    idx = np.asarray(index, dtype=np.int64)
    if idx.size == 0 or idx.min() < 0:  # positions of another clique (torch.cat): not a uniform map
        return None
    counts = np.bincount(idx, minlength=size)
    return int(counts[0]) if counts.size == size and (counts == counts[0]).all() and counts[0] > 0 else None


def plan_layouts(cliques: list[Clique], state: dict[str, torch.Tensor], param_names: set[str],
                 fan_dims: dict[str, int] | None = None) -> tuple[list[TensorLayout], list[str]]:
    """Split a model's tensors into INR-predicted layouts and static tensors.

    A tensor is predicted when it is a floating-point parameter, at least one
    of its dims belongs to a resizable clique, at most two dims are
    clique-indexed with a uniform number of positions per channel, and it is
    not constant (a BatchNorm left as identity by fusion stays static).
    Everything else (buffers, constants, tensors no width changes) is static:
    copied from the base model and sliced when its dims resize.

    Only resizable dims become rows: a dim of a fixed clique (the model's
    input channels, its classes) never changes size, so it joins the trailing
    vector a head emits, like a kernel. A first layer ``(400, 784)`` is 400
    rows of 784 values rather than 313,600 rows of one. A dim that
    concatenates several cliques' channels is one row dim over their
    composite axis (:func:`dim_spec`) when any of them is resizable.

    ``fan_dims`` gives the fan-in dim of tensors where it is not dim 1
    (:func:`fan_dims_of`).

    Returns:
        ``(layouts, static_names)`` in ``state_dict`` order.
    """
    dims = _dims_of(cliques)
    fan_dims = fan_dims or {}
    layouts: list[TensorLayout] = []
    static: list[str] = []
    modules: dict[str, int] = {}
    roles: dict[str, int] = {}
    for name, t in state.items():
        rows = []
        ok = name in param_names and t.is_floating_point() and t.numel() > 1
        # fixed dims (every clique on them fixed) are trailing
        spec = {d: pairs for d, pairs in dims.get(name, {}).items() if any(not c.fixed for c, _ in pairs)}
        ok = ok and bool(spec) and len(spec) <= 2
        if ok:
            flat = t.detach().reshape(-1)
            ok = not bool((flat == flat[0]).all())
        if ok:
            for d in sorted(spec):
                row = dim_spec(spec[d], d, t.shape[d])
                if row is None:
                    logger.warning("%s: dim %d maps unevenly onto clique(s) %s; kept static", name, d,
                                   ", ".join(str(c.id) for c, _ in spec[d]))
                    ok = False
                    break
                rows.append(row)
        if not ok:
            static.append(name)
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        layer = modules.setdefault(module, len(modules))
        role = roles[module] = roles.get(module, -1) + 1
        scale = float(t.detach().float().pow(2).mean().sqrt().clamp_min(1e-8))
        layouts.append(TensorLayout(name, tuple(t.shape), tuple(rows), layer, role, scale,
                                    fan_dims.get(name, 1)))
    return layouts, static


def fan_dims_of(model: torch.nn.Module) -> dict[str, int]:
    """Weights whose fan-in is not dim 1: transformers' ``Conv1D`` (0) and embeddings (-1, none).

    Example:
        >>> fan_dims_of(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)))
        {'0.weight': -1}
    """
    from morphkit.graph import is_transposed_linear

    out = {}
    for name, m in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(m, torch.nn.Embedding):
            out[key] = -1
        elif is_transposed_linear(m):
            out[key] = 0
    return out


@dataclass
class DimPlan:
    """How one row dim looks at one width: kept positions and the channel-major order."""

    count: int  # current channel count C
    kept: torch.Tensor  # (P',) base positions kept along the dim, in order
    perm: torch.Tensor | None  # (P',) resized -> channel-major order; None when identity
    inv: torch.Tensor | None  # inverse of perm


def _dim_plan(index: tuple[int, ...] | None, length: int, kept_ch: np.ndarray, size: int) -> DimPlan:
    """The plan of a dim whose positions map to channels ``index`` of ``size``, ``kept_ch`` kept in order."""
    ch = np.arange(length) if index is None else np.asarray(index, dtype=np.int64)  # (P,)
    lookup = np.full(size, -1, dtype=np.int64)
    lookup[kept_ch] = np.arange(kept_ch.size)
    new = lookup[ch]  # (P,) new channel of each position, -1 when dropped
    pos = np.nonzero(new >= 0)[0]
    new = new[pos]
    perm = np.argsort(new, kind="stable")
    identity = bool((perm == np.arange(perm.size)).all())
    return DimPlan(count=int(kept_ch.size), kept=torch.from_numpy(pos),
                   perm=None if identity else torch.from_numpy(perm),
                   inv=None if identity else torch.from_numpy(np.argsort(perm, kind="stable")))


def _part_counts(r: DimSpec, cliques: dict[int, Clique], counts: WidthMap) -> list[tuple[Clique, int]]:
    """``(clique, count)`` of a row dim's cliques at a width map (one for a plain dim)."""
    ids = r.parts or (r.clique,)
    return [(cliques[i], int(counts.get(i, cliques[i].size))) for i in ids]


def _row_plan(r: DimSpec, length: int, cliques: dict[int, Clique], counts: WidthMap) -> DimPlan:
    """The :class:`DimPlan` of a row dim: each part keeps ``clique.kept(count)``, parts one after the other."""
    kept, off = [], 0
    for c, k in _part_counts(r, cliques, counts):
        kept.append(off + np.asarray(c.kept(k), dtype=np.int64))
        off += c.size
    return _dim_plan(r.index, length, np.concatenate(kept), r.size)


def _row_centres(r: DimSpec, count: int, cliques: dict[int, Clique],
                 counts: WidthMap) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres in [0, 1] and channel spacing of a row dim's ``count`` channels, ``(C,)`` each.

    A plain dim: ``(c + 0.5) / C`` and ``1 / C``. A concatenated dim: part ``s``
    (offset ``O``, ``S`` channels, ``k`` kept) puts channel ``j`` at
    ``(O + (j + 0.5) * S / k) / total`` with spacing ``S / (k * total)`` (0 for
    a fixed part, whose channels never move).
    """
    if not r.parts:
        centres = (torch.arange(count, dtype=torch.float32) + 0.5) / count  # (C,)
        spacing = torch.full((count,), 1.0 / count if r.resizable else 0.0)  # (C,)
        return centres, spacing
    cs, ss, off = [], [], 0
    for c, k in _part_counts(r, cliques, counts):
        j = np.arange(k, dtype=np.float64)
        cs.append((off + (j + 0.5) * c.size / k) / r.size)
        ss.append(np.full(k, 0.0 if c.fixed else c.size / (k * r.size)))
        off += c.size
    return (torch.from_numpy(np.concatenate(cs)).float(),  # (C,)
            torch.from_numpy(np.concatenate(ss)).float())  # (C,)


def resize_static(t: torch.Tensor, name: str, dims: dict[str, dict[int, DimMembers]],
                  counts: WidthMap) -> torch.Tensor:
    """Slice a static tensor to a width map: the positions :func:`~morphkit.resize.resize` keeps.

    A position survives when every clique that indexes it keeps its channel
    (positions of another clique, ``-1``, are left to that clique).

    Args:
        t: The base tensor.
        name: Its ``state_dict`` key.
        dims: :func:`_dims_of` of the model's cliques.
        counts: The width map (missing cliques stay full).
    """
    for d, pairs in sorted(dims.get(name, {}).items()):
        mask = None
        for c, m in pairs:
            k = int(counts.get(c.id, c.size))
            if k == c.size:
                continue
            idx = _channels(m.index, t.shape[d])
            if idx is None:
                raise ValueError(f"{name}: the index map of dim {d} does not fit {t.shape[d]} positions")
            kept = np.zeros(c.size, dtype=bool)
            kept[np.asarray(c.kept(k), dtype=np.int64)] = True
            mask = np.ones(t.shape[d], dtype=bool) if mask is None else mask
            sel = idx >= 0
            mask[sel] &= kept[idx[sel]]
        if mask is not None and not mask.all():
            t = t.index_select(d, torch.from_numpy(np.nonzero(mask)[0]).to(t.device))
    return t


@dataclass
class CoordTable:
    """Coordinates of every predicted row at one width map.

    Attributes:
        coords: ``(R, 6)`` float32 coordinates (see module doc); a factored
            layout's segment holds ``C_out + C_in`` queries, not ``C_out * C_in`` rows.
        noise: ``(R, 2)`` channel spacing of the out/in columns (``1 / C``; a
            concatenated dim: its part's spacing on the composite axis), 0
            where the dim or part is fixed: coordinate noise ``U(-a, a) * noise``.
        segments: Per layout, ``(start, end)`` of its rows.
        plans: Per layout, the :class:`DimPlan` of each row dim.
        fan_in: Per layout, the fan-in factor ``size_in / C_in`` (1 without a fan-in dim).
        cells: Per layout, ``(C_out, C_in)`` of its rows (1 for a missing out or in dim).
        factored: Per layout, whether its segment holds out/in queries (see module doc).
    """

    coords: torch.Tensor
    noise: torch.Tensor
    segments: list[tuple[int, int]]
    plans: list[list[DimPlan]]
    fan_in: list[float]
    cells: list[tuple[int, int]]
    factored: list[bool]

    @property
    def rows(self) -> int:
        return self.coords.shape[0]


class CoordBuilder:
    """Builds and caches coordinate tables, assembles predicted tensors.

    Args:
        layouts: Predicted tensors (from :func:`plan_layouts`).
        cliques: All cliques of the model.
        cache_size: Width maps kept in the cache (least recently used dropped).
        factored: Per layout, whether the INR predicts it factored (out and in
            queries instead of one row per weight; default none).
    """

    def __init__(self, layouts: list[TensorLayout], cliques: list[Clique], cache_size: int = 256,
                 factored: list[bool] | None = None) -> None:
        self.layouts = layouts
        self.factored = list(factored) if factored is not None else [False] * len(layouts)
        assert len(self.factored) == len(layouts)
        assert all(len(lt.rows) == 2 for lt, f in zip(layouts, self.factored) if f), "factored needs out and in"
        self.cliques = {c.id: c for c in cliques}
        self.n_layers = max((lt.layer for lt in layouts), default=0) + 1
        self.n_roles = max((lt.role for lt in layouts), default=0) + 1
        self.cache_size = cache_size
        self._cache: dict[tuple, CoordTable] = {}
        # per layout and the counts of its row cliques: its rows, noise scales, plans, cells, fan-in factor.
        # Training meets a new width map nearly every step (the clique spread), but each layout's own
        # counts repeat, so tables are assembled from cached blocks (bounded by BLOCK_CACHE_FLOATS).
        self._blocks: dict[tuple, tuple] = {}
        self._block_floats = 0

    def full(self) -> WidthMap:
        """The base model's width map."""
        return {cid: c.size for cid, c in self.cliques.items()}

    def table(self, counts: WidthMap) -> CoordTable:
        """The coordinate table of a width map (cached)."""
        key = tuple(sorted(counts.items()))
        hit = self._cache.pop(key, None)
        if hit is None:
            hit = self._build(counts)
        self._cache[key] = hit  # most recent last
        while len(self._cache) > self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        return hit

    def _build(self, counts: WidthMap) -> CoordTable:
        blocks, noises, segments, plans, fan, cells = [], [], [], [], [], []
        start = 0
        for k, lt in enumerate(self.layouts):
            key = (k, tuple(tuple(n for _, n in _part_counts(r, self.cliques, counts)) for r in lt.rows))
            hit = self._blocks.get(key)
            if hit is None:
                hit = self._block(k, lt, counts)
                self._blocks[key] = hit
                self._block_floats += hit[0].numel() + hit[1].numel()
                while self._block_floats > BLOCK_CACHE_FLOATS and len(self._blocks) > 1:  # oldest first
                    old = self._blocks.pop(next(iter(self._blocks)))
                    self._block_floats -= old[0].numel() + old[1].numel()
            block, noise, dplans, cell, fi = hit
            blocks.append(block)
            noises.append(noise)
            n = block.shape[0]
            segments.append((start, start + n))
            start += n
            plans.append(dplans)
            cells.append(cell)
            fan.append(fi)
        coords = torch.cat(blocks) if blocks else torch.zeros(0, 6)
        noise = torch.cat(noises) if noises else torch.zeros(0, 2)
        return CoordTable(coords.contiguous(), noise.contiguous(), segments, plans, fan, cells, list(self.factored))

    def _block(self, k: int, lt: TensorLayout, counts: WidthMap) -> tuple:
        """One layout's ``(coords (n, 6), noise (n, 2), dim plans, (C_out, C_in), fan-in factor)``."""
        dplans = [_row_plan(r, lt.shape[r.dim], self.cliques, counts) for r in lt.rows]
        # (out, in) row specs; a lone fan-in dim takes the "in" column and "out" is constant
        specs: list[DimSpec | None] = [None, lt.rows[0]] if lt.in_only else [*lt.rows, None][:2]
        counts_oi = [1, dplans[0].count] if lt.in_only else [dplans[0].count,
                                                             dplans[1].count if len(dplans) > 1 else 1]
        c_out, c_in = counts_oi
        (o, ns_out), (i, ns_in) = (  # (C_out,) and (C_in,) centres and channel spacings
            _row_centres(r, c, self.cliques, counts) if r is not None else (torch.full((c,), 0.5), torch.zeros(c))
            for c, r in zip(counts_oi, specs))
        if self.factored[k]:  # out queries (in at 0.5), then in queries (out at 0.5)
            half = torch.full((c_out + c_in,), 0.5)
            oo = torch.cat([o, half[c_out:]])  # (C_out + C_in,)
            ii = torch.cat([half[:c_out], i])  # (C_out + C_in,)
            noise = torch.cat([torch.stack([ns_out, torch.zeros(c_out)], 1),
                               torch.stack([torch.zeros(c_in), ns_in], 1)])  # (C_out + C_in, 2)
        else:
            oo, ii = torch.meshgrid(o, i, indexing="ij")  # (C_out, C_in) each
            no, ni = torch.meshgrid(ns_out, ns_in, indexing="ij")  # (C_out, C_in) each
            noise = torch.stack([no.reshape(-1), ni.reshape(-1)], 1)  # (C_out * C_in, 2)
        n = oo.numel()
        w_out, w_in = (c / r.size if r is not None else 1.0 for c, r in zip(counts_oi, specs))
        layer = lt.layer / max(1, self.n_layers - 1)
        role = lt.role / max(1, self.n_roles - 1)
        const = torch.tensor([layer, w_out, w_in, role], dtype=torch.float32).expand(n, 4)
        block = torch.cat([const[:, :1], oo.reshape(n, 1), ii.reshape(n, 1), const[:, 1:]], 1)  # (n, 6)
        fi = lt.fan_in
        fan = fi.size / dplans[lt.rows.index(fi)].count if fi is not None else 1.0
        return block, noise.contiguous(), dplans, (c_out, c_in), fan

    def grid(self, k: int, tensor: torch.Tensor) -> torch.Tensor:
        """A base tensor as its ``(C_out, C_in, trailing)`` grid (the INR's residual base)."""
        table = self.table(self.full())
        return self.to_rows(k, table, tensor).reshape(self.layouts[k].grid_shape)

    def assemble(self, k: int, table: CoordTable, rows: torch.Tensor) -> torch.Tensor:
        """Turn one layout's predicted rows ``(C_out * C_in, trailing)`` into its resized tensor."""
        lt, plans = self.layouts[k], table.plans[k]
        row_dims = [r.dim for r in lt.rows]
        rest = [d for d in range(len(lt.shape)) if d not in row_dims]
        counts = [p.count for p in plans]
        mults = [r.multiplicity for r in lt.rows]
        y = rows.reshape(*counts, *mults, *[lt.shape[d] for d in rest])
        # axes now: C_0[, C_1], m_0[, m_1], rest...; reorder to tensor order with (C, m) pairs
        nr = len(row_dims)
        order: list[int] = []
        for d in range(len(lt.shape)):
            if d in row_dims:
                j = row_dims.index(d)
                order += [j, nr + j]
            else:
                order.append(2 * nr + rest.index(d))
        y = y.permute(order)
        shape = [counts[row_dims.index(d)] * mults[row_dims.index(d)] if d in row_dims else lt.shape[d]
                 for d in range(len(lt.shape))]
        y = y.reshape(shape)
        for d, p in zip(row_dims, plans):
            if p.inv is not None:
                y = y.index_select(d, p.inv)
        return y

    def to_rows(self, k: int, table: CoordTable, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`assemble`: a resized tensor as ``(rows, trailing)``."""
        lt, plans = self.layouts[k], table.plans[k]
        row_dims = [r.dim for r in lt.rows]
        rest = [d for d in range(len(lt.shape)) if d not in row_dims]
        y = tensor
        for d, p in zip(row_dims, plans):
            if p.perm is not None:
                y = y.index_select(d, p.perm)
        split: list[int] = []
        axes: dict[tuple[str, int], int] = {}
        for d in range(len(lt.shape)):
            if d in row_dims:
                j = row_dims.index(d)
                axes[("c", j)] = len(split)
                split.append(plans[j].count)
                axes[("m", j)] = len(split)
                split.append(lt.rows[j].multiplicity)
            else:
                axes[("r", d)] = len(split)
                split.append(lt.shape[d])
        y = y.reshape(split)
        nr = len(row_dims)
        order = [axes[("c", j)] for j in range(nr)] + [axes[("m", j)] for j in range(nr)]
        order += [axes[("r", d)] for d in rest]
        y = y.permute(order)
        n = math.prod(p.count for p in plans)
        return y.reshape(n, -1)


def fourier_features(coords: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """``[v, sin(2^j pi v), cos(2^j pi v)]`` for j < n_freqs, per coordinate.

    Args:
        coords: ``(R, D)`` coordinates in [0, 1].
        n_freqs: Frequencies F.

    Returns:
        ``(R, D * (2F + 1))`` features.

    Example:
        >>> fourier_features(torch.zeros(3, 6), 4).shape
        torch.Size([3, 54])
    """
    if n_freqs == 0:
        return coords
    freqs = (2.0 ** torch.arange(n_freqs, dtype=coords.dtype, device=coords.device)) * math.pi  # (F,)
    ang = coords.unsqueeze(-1) * freqs  # (R, D, F)
    feats = torch.cat([coords.unsqueeze(-1), torch.sin(ang), torch.cos(ang)], dim=-1)  # (R, D, 2F + 1)
    return feats.reshape(coords.shape[0], -1)
