"""Smoothing: reorder each clique's channels so that neighbouring channels are similar.

NeuMeta learns weights as a continuous function of their coordinates, which
is easier when neighbouring channels hold similar weights (paper section 3.3,
eq. 5-8). Every channel of a resizable clique is a "city" whose features are
the concatenation, over all the clique's members, of that channel's slice
(producer rows, consumer columns, BatchNorm entries, every position of a
flattened or fused-qkv channel), flattened. The L1 distance between cities
is computed in floating point (float32 features, float64 sums, a numba
kernel), and :func:`~morphkit.solver.shortest_hamiltonian_path` orders them.
Applying the order to every member is a pure relabelling of hidden channels,
so the network's function is unchanged. Blocked cliques (grouped convs,
GroupNorm, attention heads) are solved block by block; tied ones (a grouped
conv's shared input columns) once, with every block's features side by side.

Total variation (eq. 5-7) is measured as the **mean absolute difference
between adjacent channels**: over every resizable clique, member and pair of
neighbouring channels inside one block, the sum of ``|w[c] - w[c + 1]|`` over
the two channels' slices, divided by the number of scalar differences summed.
Fixed cliques cannot be reordered and are left out. For one clique the
numerator is exactly the path length the solver minimises, so smoothing never
increases it (an order worse than the identity is discarded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numba import njit, prange
from torch import nn

from morphkit.clique import Clique
from morphkit.errors import ConfigError
from morphkit.graph import _channel_table, copy_with, member_channels, permute_state

__all__ = ["smooth", "total_variation", "apply_permutation", "clique_features", "l1_distances"]

logger = logging.getLogger(__name__)


@njit(cache=True, fastmath=True)
def _l1_tile_row(x, out, bi, nb):  # pragma: no cover - compiled
    """Row ``bi`` of 4 x 4 register tiles (``bj >= bi``) of the L1 distance matrix."""
    f = x.shape[1]
    i0 = bi * 4
    acc = np.zeros(16)
    for bj in range(bi, nb):
        j0 = bj * 4
        acc[:] = 0.0
        for k0 in range(0, f, 256):
            a00 = a01 = a02 = a03 = np.float32(0.0)
            a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = np.float32(0.0)
            a30 = a31 = a32 = a33 = np.float32(0.0)
            for k in range(k0, min(k0 + 256, f)):
                u0, u1, u2, u3 = x[i0, k], x[i0 + 1, k], x[i0 + 2, k], x[i0 + 3, k]
                v0, v1, v2, v3 = x[j0, k], x[j0 + 1, k], x[j0 + 2, k], x[j0 + 3, k]
                a00 += abs(u0 - v0)
                a01 += abs(u0 - v1)
                a02 += abs(u0 - v2)
                a03 += abs(u0 - v3)
                a10 += abs(u1 - v0)
                a11 += abs(u1 - v1)
                a12 += abs(u1 - v2)
                a13 += abs(u1 - v3)
                a20 += abs(u2 - v0)
                a21 += abs(u2 - v1)
                a22 += abs(u2 - v2)
                a23 += abs(u2 - v3)
                a30 += abs(u3 - v0)
                a31 += abs(u3 - v1)
                a32 += abs(u3 - v2)
                a33 += abs(u3 - v3)
            acc[0] += a00
            acc[1] += a01
            acc[2] += a02
            acc[3] += a03
            acc[4] += a10
            acc[5] += a11
            acc[6] += a12
            acc[7] += a13
            acc[8] += a20
            acc[9] += a21
            acc[10] += a22
            acc[11] += a23
            acc[12] += a30
            acc[13] += a31
            acc[14] += a32
            acc[15] += a33
        for r in range(4):
            for c in range(4):
                out[i0 + r, j0 + c] = acc[r * 4 + c]


@njit(cache=True, parallel=True)
def _l1_kernel(x, out):  # pragma: no cover - compiled
    """Pairwise L1 distances of the rows of ``x`` (float32, rows a multiple of 4) into ``out``.

    Register tiles of 4 x 4 row pairs (8 row streams, 16 accumulators) keep the
    kernel compute-bound; float32 partial sums over 256 features are added in
    float64. Only tiles on or above the diagonal are computed, then mirrored
    into the lower triangle; tile rows ``t`` and ``nb - 1 - t`` share
    one parallel iteration so that the threads get equal work.
    """
    n = x.shape[0]
    nb = n // 4
    for t in prange((nb + 1) // 2):
        _l1_tile_row(x, out, t, nb)
        if nb - 1 - t != t:
            _l1_tile_row(x, out, nb - 1 - t, nb)
    for i in prange(n):  # mirror the upper triangle
        out[i, i] = 0.0
        for j in range(i):
            out[i, j] = out[j, i]


#: Above this many ``|a - b|`` terms a problem's distances are estimated on sampled features.
MAX_DISTANCE_TERMS = 20_000_000_000
MIN_SAMPLED_FEATURES = 512


def l1_distances(features: Any) -> np.ndarray:
    """Pairwise L1 distances between rows, in float (float32 terms, float64 sums per 256).

    Args:
        features: ``(n, F)`` array or tensor.

    Returns:
        ``(n, n)`` float64 symmetric matrix with a zero diagonal.

    Example:
        >>> l1_distances(np.array([[0.0, 1.0], [2.0, 0.5]]))
        array([[0. , 2.5],
               [2.5, 0. ]])
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.ascontiguousarray(features, dtype=np.float32)  # (n, F)
    n, f = x.shape
    if n < 2 or f == 0:
        return np.zeros((n, n), dtype=np.float64)
    pad = -n % 4
    if pad:
        x = np.concatenate([x, np.zeros((pad, f), dtype=np.float32)])  # (n + pad, F)
    out = np.empty((n + pad, n + pad), dtype=np.float64)
    threads = torch.get_num_threads()
    try:
        _l1_kernel(x, out)
    finally:  # numba's OpenMP layer resets the process's thread count; keep the caller's torch setting
        torch.set_num_threads(threads)
    return np.ascontiguousarray(out[:n, :n]) if pad else out


def clique_features(state: dict[str, torch.Tensor], clique: Clique) -> list[torch.Tensor]:
    """The cities of a clique's permutation problems: one ``(n, F)`` tensor per problem.

    A free clique is one problem over its ``size`` channels; a blocked clique
    one problem per block; a tied clique one problem over the ``block``
    positions, every block's features (and the first-block members') side by side.

    Example:
        >>> from morphkit.clique import Member
        >>> c = Clique(0, 2, [Member("w", 0), Member("v", 1)])
        >>> clique_features({"w": torch.ones(2, 3), "v": torch.zeros(4, 2)}, c)[0].shape
        torch.Size([2, 7])
    """
    full, local = [], []  # (channels, *rest) views or gathered copies
    for m in clique.members:
        t = state[m.name].detach()
        length = t.shape[m.dim]
        chans, table = _channel_table(member_channels(m, length), clique.size)
        x = t.movedim(m.dim, 0)  # (positions, *rest), a view
        if not (table.shape[1] == 1 and chans.size == length and (table[:, 0] == np.arange(length)).all()):
            x = x[torch.from_numpy(table).to(x.device)]  # (channels, mult, *rest): positions of each channel
        if chans.size == clique.size:
            full.append(x)
        elif clique.tied and chans.size == clique.block:
            local.append(x)
        else:
            raise ConfigError(f"clique {clique.id}: member {m.name}[{m.dim}] covers {chans.size} of "
                              f"{clique.size} channels; the cliques do not belong to this model")
    feats = _side_by_side(full, clique.size)  # (size, F)
    b = clique.block if clique.block > 1 else clique.size
    if clique.tied and b > 1:
        per = feats.reshape(clique.n_blocks, b, -1).permute(1, 0, 2).reshape(b, -1)  # (block, n_blocks * F)
        return [torch.cat([per, _side_by_side(local, b)], 1)]
    return [feats[g * b:(g + 1) * b] for g in range(clique.size // b)]


def _side_by_side(parts: list[torch.Tensor], rows: int) -> torch.Tensor:
    """Flatten each ``(rows, ...)`` part and write them side by side into one float32 buffer.

    One strided copy per part (numpy's copy handles transposed sources several
    times faster than torch's here).
    """
    widths = [p[0].numel() if p.shape[0] else 0 for p in parts]
    out = np.empty((rows, sum(widths)), dtype=np.float32)  # (rows, F)
    off = 0
    for p, w in zip(parts, widths):
        if p.dtype not in (torch.float32, torch.float64, torch.float16):
            p = p.float()
        dest = out[:, off:off + w].reshape(rows, *p.shape[1:])  # a view: splits the contiguous row part
        np.copyto(dest, p.cpu().numpy(), casting="same_kind")
        off += w
    return torch.from_numpy(out)


def _tv_sums(problems: list[torch.Tensor]) -> tuple[float, int]:
    """Sum of adjacent absolute differences and how many there are."""
    total, count = 0.0, 0
    for x in problems:
        if x.shape[0] > 1 and x.shape[1] > 0:
            total += float((x[1:] - x[:-1]).abs().sum(dtype=torch.float64))
            count += (x.shape[0] - 1) * x.shape[1]
    return total, count


def _cliques_of(model: nn.Module, example_inputs: Any, cliques: Sequence[Clique] | None) -> list[Clique]:
    if cliques is None:
        from morphkit.graph import find_cliques

        cliques = find_cliques(model, example_inputs)
    return list(cliques)


def total_variation(model: nn.Module, example_inputs: Any, cliques: Sequence[Clique] | None = None) -> float:
    """Mean absolute difference between adjacent channels over all resizable cliques.

    Args:
        model: The model.
        example_inputs: A tensor or tuple (used to find the cliques when None).
        cliques: The model's cliques.

    Returns:
        The total variation (0.0 when there is nothing to compare).

    Example:
        >>> from morphkit.models import build_model
        >>> m = build_model("lenet5")
        >>> total_variation(m, torch.zeros(1, 1, 28, 28)) > 0
        True
    """
    state = model.state_dict()
    total, count = 0.0, 0
    for c in _cliques_of(model, example_inputs, cliques):
        if c.fixed or c.size < 2:
            continue
        t, n = _tv_sums(clique_features(state, c))
        total += t
        count += n
    return total / count if count else 0.0


def smooth(model: nn.Module, example_inputs: Any, cliques: Sequence[Clique] | None = None, *,
           seed: int = 0, time_budget: float | None = None,
           restarts: int | None = None) -> tuple[nn.Module, dict[int, np.ndarray]]:
    """Permute every resizable clique to minimise its total variation; same function.

    Args:
        model: The model (not modified); typically BatchNorm-fused first.
        example_inputs: A tensor or tuple (used to find the cliques when None).
        cliques: The model's cliques.
        seed: Solver seed (the result is deterministic for a seed when
            ``time_budget`` is None).
        time_budget: Seconds of solver search for the whole model, split
            between problems in proportion to their size (distance matrices
            come on top); None uses the solver's fixed default effort.
        restarts: Solver kicks per problem when ``time_budget`` is None.

    Returns:
        ``(smoothed, perms)``: a new module and ``{clique_id: perm}`` for every
        clique, where new channel ``c`` is old channel ``perm[c]`` (the
        identity for fixed cliques).

    Example:
        >>> from morphkit.models import build_model
        >>> m = build_model("lenet5").eval(); x = torch.randn(2, 1, 28, 28)
        >>> s, perms = smooth(m, x)
        >>> bool(torch.allclose(m(x), s(x), atol=1e-5)), sorted(perms[1].tolist()) == list(range(6))
        (True, True)
    """
    from morphkit.solver import path_length, shortest_hamiltonian_path

    if time_budget is not None and not (np.isfinite(time_budget) and time_budget >= 0):
        raise ConfigError(f"time_budget is {time_budget!r}; expected None or seconds >= 0")
    cliques = _cliques_of(model, example_inputs, cliques)
    state = model.state_dict()
    work = [(c, clique_features(state, c)) for c in cliques if not c.fixed and c.size > 2]
    cities = sum(x.shape[0] for _, probs in work for x in probs if x.shape[0] > 2) or 1
    perms: dict[int, np.ndarray] = {c.id: np.arange(c.size, dtype=np.int64) for c in cliques}
    t0 = time.perf_counter()
    before_all = after_all = 0.0
    count_all = 0
    for c, probs in work:
        orders, before, after, count = [], 0.0, 0.0, 0
        for x in probs:
            n = x.shape[0]
            ident = np.arange(n, dtype=np.int64)
            if n <= 2 or x.shape[1] == 0:
                orders.append(ident)
                continue
            sub = _feature_subset(x, seed)
            dist = l1_distances(x if sub is None else x[:, sub])  # (n, n)
            budget = None if time_budget is None else time_budget * n / cities
            order = shortest_hamiltonian_path(dist, seed=seed, time_budget=budget, restarts=restarts)
            if sub is None:
                base, new = path_length(dist, ident), path_length(dist, order)
            else:  # distances estimated on a feature subset: judge both paths on every feature
                base, new = _path_l1(x, ident), _path_l1(x, np.asarray(order))
                logger.debug("clique %d: %d channels x %d features, distances on %d sampled features",
                             c.id, n, x.shape[1], sub.numel())
            if new > base:
                order, new = ident, base
            orders.append(np.asarray(order, dtype=np.int64))
            before, after, count = before + base, after + new, count + (n - 1) * x.shape[1]
        perms[c.id] = _assemble(c, orders)
        before_all, after_all, count_all = before_all + before, after_all + after, count_all + count
        if count:
            logger.debug("clique %d (%d channels, block %d%s): TV %.6g -> %.6g", c.id, c.size, c.block,
                         " tied" if c.tied else "", before / count, after / count)
    if count_all:
        logger.info("smoothed %d cliques in %.2f s: TV %.6g -> %.6g", len(work), time.perf_counter() - t0,
                    before_all / count_all, after_all / count_all)
    return apply_permutation(model, cliques, perms), perms


def _feature_subset(x: torch.Tensor, seed: int) -> torch.Tensor | None:
    """Columns to estimate a wide problem's L1 distances on, or None for all of them.

    A distance matrix costs ``n^2 / 2 * F`` terms: 1.1e11 for a 4096-channel
    fully connected clique of alexnet (14 s on one core). Above
    ``MAX_DISTANCE_TERMS`` the distances are estimated on a seeded random
    subset of the columns (sums of ``|a - b|`` over the sampled columns: a
    common scale the path search ignores, with a relative error that shrinks
    as ``1/sqrt(columns)``);
    :func:`smooth` still judges the found path against the identity on every
    column, so it never keeps a worse order.
    """
    n, f = x.shape
    if n * n * f // 2 <= MAX_DISTANCE_TERMS:
        return None
    keep = max(MIN_SAMPLED_FEATURES, 2 * MAX_DISTANCE_TERMS // (n * n))
    if keep >= f:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(f, generator=g)[:keep].sort().values  # (keep,)


def _path_l1(x: torch.Tensor, order: np.ndarray) -> float:
    """Exact L1 length of the path visiting the rows of ``x`` (n, F) in ``order`` (row sums float32, total float64)."""
    idx = torch.as_tensor(order, dtype=torch.long)
    x = x.float()
    total = 0.0
    step = max(1, (1 << 22) // max(1, x.shape[1]))  # rows per chunk: ~16 MB of differences
    for s in range(0, len(idx) - 1, step):
        a, b = idx[s:s + step + 1][:-1], idx[s + 1:s + step + 1]
        d = x.index_select(0, b).sub_(x.index_select(0, a)).abs_().sum(1)  # (rows,)
        total += float(d.double().sum())
    return total


def _assemble(c: Clique, orders: list[np.ndarray]) -> np.ndarray:
    """Clique permutation from per-problem orders (one per block, or one shared when tied)."""
    b = c.block if c.block > 1 else c.size
    if c.tied and b > 1:
        return np.concatenate([g * b + orders[0] for g in range(c.n_blocks)]).astype(np.int64)
    return np.concatenate([g * b + o for g, o in enumerate(orders)]).astype(np.int64)


def _check_perm(c: Clique, perm: Any) -> np.ndarray:
    p = np.asarray(perm)
    if p.shape != (c.size,) or not np.issubdtype(p.dtype, np.integer) or \
            not np.array_equal(np.sort(p), np.arange(c.size)):
        raise ConfigError(f"permutation of clique {c.id} must be a permutation of range({c.size}), "
                          f"got {np.asarray(perm).ravel()[:8]}... of shape {p.shape}")
    p = p.astype(np.int64)
    ident = np.arange(c.size)
    if c.fixed and not np.array_equal(p, ident):
        raise ConfigError(f"clique {c.id} is fixed ({c.reason}); its permutation must be the identity")
    b = c.block if c.block > 1 else c.size
    if b > 1:
        if not np.array_equal(p // b, ident // b):
            raise ConfigError(f"clique {c.id} permutes only within blocks of {b}; the permutation moves "
                              "channels across blocks")
        if c.tied and not (p.reshape(-1, b) - ident.reshape(-1, b)[:, :1] == p[:b]).all():
            raise ConfigError(f"clique {c.id} is tied: every block of {b} must be permuted the same way")
    return p


def apply_permutation(model: nn.Module, cliques: Sequence[Clique], perms: dict[int, Any]) -> nn.Module:
    """Return a copy of ``model`` with clique channels reordered (same function).

    Args:
        model: The model (not modified).
        cliques: Its cliques.
        perms: ``{clique_id: perm}``; new channel ``c`` takes old channel
            ``perm[c]``. Missing ids keep their order.

    Returns:
        A new module with the same classes and shapes.

    Raises:
        ConfigError: an unknown clique id, a perm that is not a permutation of
            ``range(size)``, moves channels across blocks, differs between the
            blocks of a tied clique, or reorders a fixed clique.

    Example:
        >>> from morphkit.models import build_model
        >>> from morphkit.graph import find_cliques
        >>> m = build_model("lenet5"); cs = find_cliques(m, torch.zeros(1, 1, 28, 28))
        >>> p = apply_permutation(m, cs, {1: [5, 4, 3, 2, 1, 0]})
        >>> bool(torch.equal(p.conv1.weight[0], m.conv1.weight[5]))
        True
    """
    by_id = {c.id: c for c in cliques}
    checked = {}
    for cid, perm in perms.items():
        if cid not in by_id:
            raise ConfigError(f"unknown clique id {cid!r} in perms; this model has cliques {sorted(by_id)}")
        checked[cid] = _check_perm(by_id[cid], perm)
    state = model.state_dict()
    new_state = permute_state(state, list(cliques), checked)
    changed = {k: v for k, v in new_state.items() if v is not state[k]}
    return copy_with(model, changed)
