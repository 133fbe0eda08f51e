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
           "fourier_features", "resize_static", "WidthMap"]

logger = logging.getLogger(__name__)

WidthMap = dict[int, int]  # clique id -> channel count


@dataclass(frozen=True)
class DimSpec:
    """One clique-indexed dimension of a predicted tensor."""

    dim: int
    clique: int
    index: tuple[int, ...] | None
    multiplicity: int  # positions per clique channel (flatten: spatial size; fused qkv: 3)
    size: int  # clique channel count in the base model
    resizable: bool


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
    """

    name: str
    shape: tuple[int, ...]
    rows: tuple[DimSpec, ...]
    layer: int
    role: int
    scale: float

    @property
    def trailing(self) -> int:
        """Values one head emits per row (width-independent)."""
        row_dims = {r.dim for r in self.rows}
        rest = math.prod(s for d, s in enumerate(self.shape) if d not in row_dims)
        return rest * math.prod(r.multiplicity for r in self.rows)

    @property
    def in_only(self) -> bool:
        """The only row dim is the fan-in (dim 1): its coordinate is the "in" column, "out" is constant."""
        return len(self.rows) == 1 and self.rows[0].dim == 1

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """``(C_out, C_in, trailing)`` of the base grid (1 for a missing out or in dim)."""
        sizes = [r.size for r in self.rows]
        c_out, c_in = (1, sizes[0]) if self.in_only else (sizes[0], math.prod(sizes[1:]))
        return c_out, c_in, self.trailing

    @property
    def fan_in(self) -> DimSpec | None:
        """The row dim that is the tensor's fan-in (dim 1), if it is clique-indexed."""
        return next((r for r in self.rows if r.dim == 1), None)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "layer": self.layer, "role": self.role,
                "scale": self.scale,
                "rows": [{"dim": r.dim, "clique": r.clique, "multiplicity": r.multiplicity,
                          "size": r.size, "resizable": r.resizable} for r in self.rows]}


def _dims_of(cliques: list[Clique]) -> dict[str, dict[int, tuple[Clique, Any]]]:
    """tensor name -> {dim: (clique, member)}."""
    out: dict[str, dict[int, tuple[Clique, Any]]] = {}
    for c in cliques:
        for m in c.members:
            out.setdefault(m.name, {})[m.dim] = (c, m)
    return out


def _multiplicity(index: tuple[int, ...] | None, size: int, length: int) -> int | None:
    """Positions per channel when uniform, else None."""
    if index is None:
        return 1 if length == size else None
    idx = np.asarray(index, dtype=np.int64)
    if idx.size == 0 or idx.min() < 0:  # positions of another clique (torch.cat): not a uniform map
        return None
    counts = np.bincount(idx, minlength=size)
    return int(counts[0]) if counts.size == size and (counts == counts[0]).all() and counts[0] > 0 else None


def plan_layouts(cliques: list[Clique], state: dict[str, torch.Tensor],
                 param_names: set[str]) -> tuple[list[TensorLayout], list[str]]:
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
    rows of 784 values rather than 313,600 rows of one.

    Returns:
        ``(layouts, static_names)`` in ``state_dict`` order.
    """
    dims = _dims_of(cliques)
    layouts: list[TensorLayout] = []
    static: list[str] = []
    modules: dict[str, int] = {}
    roles: dict[str, int] = {}
    for name, t in state.items():
        spec = dims.get(name, {})
        rows = []
        ok = name in param_names and t.is_floating_point() and t.numel() > 1
        spec = {d: cm for d, cm in spec.items() if not cm[0].fixed}  # fixed dims are trailing
        ok = ok and bool(spec) and len(spec) <= 2
        if ok:
            flat = t.detach().reshape(-1)
            ok = not bool((flat == flat[0]).all())
        if ok:
            for d in sorted(spec):
                c, m = spec[d]
                mult = _multiplicity(m.index, c.size, t.shape[d])
                if mult is None:
                    logger.warning("%s: dim %d maps unevenly onto clique %d; kept static", name, d, c.id)
                    ok = False
                    break
                rows.append(DimSpec(d, c.id, m.index, mult, c.size, not c.fixed))
        if not ok:
            static.append(name)
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        layer = modules.setdefault(module, len(modules))
        role = roles[module] = roles.get(module, -1) + 1
        scale = float(t.detach().float().pow(2).mean().sqrt().clamp_min(1e-8))
        layouts.append(TensorLayout(name, tuple(t.shape), tuple(rows), layer, role, scale))
    return layouts, static


@dataclass
class DimPlan:
    """How one row dim looks at one width: kept positions and the channel-major order."""

    count: int  # current channel count C
    kept: torch.Tensor  # (P',) base positions kept along the dim, in order
    perm: torch.Tensor | None  # (P',) resized -> channel-major order; None when identity
    inv: torch.Tensor | None  # inverse of perm


def _dim_plan(index: tuple[int, ...] | None, length: int, clique: Clique, count: int) -> DimPlan:
    ch = np.arange(length) if index is None else np.asarray(index, dtype=np.int64)
    kept_ch = np.asarray(clique.kept(count), dtype=np.int64)
    lookup = np.full(clique.size, -1, dtype=np.int64)
    lookup[kept_ch] = np.arange(kept_ch.size)
    new = lookup[ch]
    pos = np.nonzero(new >= 0)[0]
    new = new[pos]
    perm = np.argsort(new, kind="stable")
    identity = bool((perm == np.arange(perm.size)).all())
    return DimPlan(count=int(kept_ch.size), kept=torch.from_numpy(pos),
                   perm=None if identity else torch.from_numpy(perm),
                   inv=None if identity else torch.from_numpy(np.argsort(perm, kind="stable")))


def resize_static(t: torch.Tensor, name: str, dims: dict[str, dict[int, tuple[Clique, Any]]],
                  counts: WidthMap) -> torch.Tensor:
    """Slice a static tensor to a width map (kept positions along each clique dim)."""
    for d, (c, m) in sorted(dims.get(name, {}).items()):
        k = counts.get(c.id, c.size)
        if k != c.size:
            t = t.index_select(d, _dim_plan(m.index, t.shape[d], c, k).kept)
    return t


@dataclass
class CoordTable:
    """Coordinates of every predicted row at one width map.

    Attributes:
        coords: ``(R, 6)`` float32 coordinates (see module doc); a factored
            layout's segment holds ``C_out + C_in`` queries, not ``C_out * C_in`` rows.
        noise: ``(R, 2)`` channel spacing of the out/in columns (``1 / C``), 0
            where the dim is fixed: coordinate noise ``U(-a, a) * noise``.
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
        for lt in self.layouts:
            dplans = [_dim_plan(r.index, lt.shape[r.dim], self.cliques[r.clique],
                                counts.get(r.clique, r.size)) for r in lt.rows]
            # (out, in) row specs; a lone fan-in dim takes the "in" column and "out" is constant
            specs: list[DimSpec | None] = [None, lt.rows[0]] if lt.in_only else [*lt.rows, None][:2]
            counts_oi = [1, dplans[0].count] if lt.in_only else [dplans[0].count,
                                                                 dplans[1].count if len(dplans) > 1 else 1]
            c_out, c_in = counts_oi
            cells.append((c_out, c_in))
            o = (torch.arange(c_out, dtype=torch.float32) + 0.5) / c_out  # (C_out,)
            i = (torch.arange(c_in, dtype=torch.float32) + 0.5) / c_in  # (C_in,)
            ns_out, ns_in = (1.0 / c if r is not None and r.resizable else 0.0 for c, r in zip(counts_oi, specs))
            if self.factored[len(blocks)]:  # out queries (in at 0.5), then in queries (out at 0.5)
                half = torch.full((c_out + c_in,), 0.5)
                oo = torch.cat([o, half[c_out:]])  # (C_out + C_in,)
                ii = torch.cat([half[:c_out], i])  # (C_out + C_in,)
                noise = torch.cat([torch.tensor([[ns_out, 0.0]]).expand(c_out, 2),
                                   torch.tensor([[0.0, ns_in]]).expand(c_in, 2)])  # (C_out + C_in, 2)
            else:
                oo, ii = torch.meshgrid(o, i, indexing="ij")  # (C_out, C_in) each
                noise = torch.tensor([ns_out, ns_in], dtype=torch.float32).expand(c_out * c_in, 2)
            n = oo.numel()
            w_out, w_in = (c / r.size if r is not None else 1.0 for c, r in zip(counts_oi, specs))
            layer = lt.layer / max(1, self.n_layers - 1)
            role = lt.role / max(1, self.n_roles - 1)
            const = torch.tensor([layer, w_out, w_in, role], dtype=torch.float32).expand(n, 4)
            block = torch.cat([const[:, :1], oo.reshape(n, 1), ii.reshape(n, 1), const[:, 1:]], 1)  # (n, 6)
            blocks.append(block)
            noises.append(noise)
            segments.append((start, start + n))
            start += n
            plans.append(dplans)
            fi = lt.fan_in
            fan.append(fi.size / counts.get(fi.clique, fi.size) if fi is not None else 1.0)
        coords = torch.cat(blocks) if blocks else torch.zeros(0, 6)
        noise = torch.cat(noises) if noises else torch.zeros(0, 2)
        return CoordTable(coords.contiguous(), noise.contiguous(), segments, plans, fan, cells, list(self.factored))

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
