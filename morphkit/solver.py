"""Shortest Hamiltonian path (open-path TSP) on a float distance matrix.

NeuMeta smooths each clique of coupled channels by reordering its channels so
that neighbouring channels are as similar as possible (paper section 3.3): every
channel is a city, the distance between two channels is the L1 distance of
their weights, and the best order is the shortest Hamiltonian *path* through
all of them. This module finds that path. Small problems (``n <= 12``) are solved
exactly with Held-Karp dynamic programming. Larger ones go to a numba-compiled
local search in the spirit of "2.5-opt" (Bentley 1992): 2-opt, Or-opt (moving
a segment of 1-3 cities, either way round; node insertion is its 1-city case)
and sequential 3-opt moves (two chained 2-opt steps, as in Lin-Kernighan),
searched over k-nearest candidate lists with don't-look bits and first
improvement. It starts from the shorter of a greedy-edge path and the best of
a few nearest-neighbour paths, and is refined by iterated local search with
localized double-bridge kicks, keeping a kick only if the path does not get
longer. Distances stay in floating point throughout (the reference
implementation truncates them to integers, which on weights of magnitude < 1
returns the identity order).

The open path is handled as a closed tour through ``n + 1`` cities, the extra
"dummy" city being at distance 0 from every other one: cutting the tour at the
dummy gives the path. Tours are stored as a position array plus its inverse
and a cache of the tour's edge lengths, so each move's gain is evaluated in
O(1) and applied by reversing or shifting the shorter side of the cycle; a
journal of the positions a kick and its repair touched undoes a rejected kick
in time proportional to the change.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from numba import njit

from morphkit.errors import ConfigError

__all__ = [
    "shortest_hamiltonian_path",
    "path_length",
    "held_karp",
    "nearest_neighbour_path",
    "default_restarts",
    "default_starts",
]

logger = logging.getLogger(__name__)

#: Largest ``n`` that :func:`held_karp` accepts (2^12 * 12 states).
HELD_KARP_MAX_N = 12
#: ``shortest_hamiltonian_path`` solves problems up to this size exactly (~1.5 ms at 12).
EXACT_MAX_N = 12
#: Candidate neighbours per city for the local search.
DEFAULT_NEIGHBOURS = 10
#: Longest segment an Or-opt move relocates.
OR_OPT_MAX_SEGMENT = 3
#: Candidates tried at the second step of a sequential 3-opt move.
LK_BREADTH = 8
#: Longest segment a double-bridge kick swaps...
KICK_SEGMENT = 3
#: ... doubled, up to this, after ``STALL_KICKS_PER_CITY * n`` kicks without
#: improvement (with a time budget only).
KICK_SEGMENT_MAX = 48
STALL_KICKS_PER_CITY = 8
#: Relative tolerance on ``|d[i, j] - d[j, i]|`` (float32 round-off).
SYMMETRY_RTOL = 1e-5
#: Absolute tolerance on the asymmetry, relative to the largest distance.
SYMMETRY_ATOL = 1e-6


# --------------------------------------------------------------------------- #
# numba kernels                                                                 #
# --------------------------------------------------------------------------- #


@njit(cache=True)
def _count_asymmetric(dist):  # pragma: no cover - compiled
    """Number of pairs i < j with ``d[i, j] != d[j, i]`` (blocked, cache-friendly)."""
    n = dist.shape[0]
    block = 64
    count = 0
    for bi in range(0, n, block):
        for bj in range(bi, n, block):
            for i in range(bi, min(bi + block, n)):
                for j in range(max(bj, i + 1), min(bj + block, n)):
                    count += dist[i, j] != dist[j, i]
    return count


@njit(cache=True)
def _d(dist, n, i, j):  # pragma: no cover - compiled
    """Distance with the dummy city ``n`` at distance 0 from everyone."""
    if i == n or j == n:
        return 0.0
    return np.float64(dist[i, j])


@njit(cache=True)
def _path_length(dist, order):  # pragma: no cover - compiled
    """Sum of ``dist[order[t], order[t + 1]]``."""
    total = 0.0
    for t in range(order.shape[0] - 1):
        total += np.float64(dist[order[t], order[t + 1]])
    return total


@njit(cache=True)
def _held_karp(dist):  # pragma: no cover - compiled
    """Exact open path: cost[mask, j] = shortest path through ``mask`` ending at j."""
    n = dist.shape[0]
    full = 1 << n
    inf = np.inf
    cost = np.full((full, n), inf)
    parent = np.full((full, n), -1, dtype=np.int64)
    for j in range(n):
        cost[1 << j, j] = 0.0
    for mask in range(1, full):
        for j in range(n):
            c = cost[mask, j]
            if c == inf:
                continue
            for k in range(n):
                if mask & (1 << k):
                    continue
                nxt = mask | (1 << k)
                v = c + np.float64(dist[j, k])
                if v < cost[nxt, k]:
                    cost[nxt, k] = v
                    parent[nxt, k] = j
    best = inf
    last = 0
    for j in range(n):
        if cost[full - 1, j] < best:
            best = cost[full - 1, j]
            last = j
    order = np.empty(n, dtype=np.int64)
    mask = full - 1
    j = last
    for t in range(n - 1, -1, -1):
        order[t] = j
        pj = parent[mask, j]
        mask ^= 1 << j
        j = pj
    return order, best


@njit(cache=True)
def _neighbour_lists(dist, k):  # pragma: no cover - compiled
    """The ``k`` nearest other cities of each city, nearest first, and their distances."""
    n = dist.shape[0]
    nb = np.empty((n, k), dtype=np.int64)
    nbd = np.empty((n, k))
    bd = np.empty(k)
    bi = np.empty(k, dtype=np.int64)
    for i in range(n):
        m = 0
        for j in range(n):
            if j == i:
                continue
            x = np.float64(dist[i, j])
            if m == k and x >= bd[k - 1]:
                continue
            t = m if m < k else k - 1
            while t > 0 and bd[t - 1] > x:
                bd[t] = bd[t - 1]
                bi[t] = bi[t - 1]
                t -= 1
            bd[t] = x
            bi[t] = j
            if m < k:
                m += 1
        for t in range(k):
            nb[i, t] = bi[t]
            nbd[i, t] = bd[t]
    return nb, nbd


@njit(cache=True)
def _nn_path(dist, nb, start):  # pragma: no cover - compiled
    """Greedy nearest-neighbour open path from ``start``; returns (order, length).

    The nearest unvisited city is the first unvisited one in the candidate
    list ``nb`` (sorted by distance) when there is one; only otherwise are all
    unvisited cities scanned.
    """
    n = dist.shape[0]
    k = nb.shape[1]
    order = np.empty(n, dtype=np.int64)
    left = np.arange(n)  # unvisited cities are left[:m]
    where = np.arange(n)  # index of each city in left
    m = n
    cur = start
    total = 0.0
    for t in range(n):
        if t > 0:
            nxt = -1
            for u in range(k):
                c = nb[cur, u]
                if where[c] < m:
                    nxt = c
                    total += np.float64(dist[cur, c])
                    break
            if nxt < 0:
                best = np.inf
                for u in range(m):
                    c = left[u]
                    x = np.float64(dist[cur, c])
                    if x < best:
                        best = x
                        nxt = c
                total += best
            cur = nxt
        order[t] = cur
        # remove cur from left[:m]
        m -= 1
        w = where[cur]
        other = left[m]
        left[w] = other
        where[other] = w
        left[m] = cur
        where[cur] = m
    return order, total


@njit(cache=True)
def _greedy_path(dist, nb, nbd):  # pragma: no cover - compiled
    """Greedy-edge path; returns (order, length).

    Adds the candidate edges shortest first whenever both ends still have
    degree < 2 and the edge closes no cycle (Bentley's greedy matching), then
    chains the resulting fragments nearest end first.
    """
    n = dist.shape[0]
    k = nb.shape[1]
    m = n * k
    w = np.empty(m)
    for i in range(n):
        for t in range(k):
            w[i * k + t] = nbd[i, t]
    by_length = np.argsort(w, kind="mergesort")
    adj = np.full((n, 2), -1, dtype=np.int64)
    deg = np.zeros(n, dtype=np.int64)
    root = np.arange(n)
    for e in by_length:
        i = e // k
        j = nb[i, e % k]
        if deg[i] == 2 or deg[j] == 2:
            continue
        ri = i
        while root[ri] != ri:
            root[ri] = root[root[ri]]
            ri = root[ri]
        rj = j
        while root[rj] != rj:
            root[rj] = root[root[rj]]
            rj = root[rj]
        if ri == rj:
            continue
        root[ri] = rj
        adj[i, deg[i]] = j
        adj[j, deg[j]] = i
        deg[i] += 1
        deg[j] += 1
    # fragment ends: cities of degree < 2 (a lone city is both ends of its fragment)
    ends = np.empty(n, dtype=np.int64)
    n_ends = 0
    for i in range(n):
        if deg[i] < 2:
            ends[n_ends] = i
            n_ends += 1
    used = np.zeros(n, dtype=np.bool_)
    order = np.empty(n, dtype=np.int64)
    total = 0.0
    t = 0
    cur = ends[0]
    while True:
        # walk the fragment from its end `cur`
        prev = -1
        while True:
            used[cur] = True
            order[t] = cur
            t += 1
            nxt = adj[cur, 0] if adj[cur, 0] != prev else adj[cur, 1]
            if nxt < 0 or (deg[cur] == 1 and prev >= 0):
                break
            total += np.float64(dist[cur, nxt])
            prev = cur
            cur = nxt
        if t == n:
            break
        # jump to the nearest end of another fragment
        best = np.inf
        bj = -1
        for u in range(n_ends):
            c = ends[u]
            if not used[c]:
                x = np.float64(dist[cur, c])
                if x < best:
                    best = x
                    bj = c
        total += best
        cur = bj
    return order, total


@njit(cache=True)
def _rand(state):  # pragma: no cover - compiled
    """xorshift64*: next 31 random bits as int64."""
    x = state[0]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    state[0] = x
    return np.int64((x * np.uint64(2685821657736338717)) >> np.uint64(33))


@njit(cache=True)
def _put(tour, pos, idx, city, journal, js):  # pragma: no cover - compiled
    """Write ``city`` at position ``idx``, journaling the position if enabled."""
    tour[idx] = city
    pos[city] = idx
    if js[1]:
        k = js[0]
        if k < journal.shape[0]:
            journal[k] = idx
        js[0] = k + 1


@njit(cache=True)
def _wrap(p, size):  # pragma: no cover - compiled
    """``p % size`` for ``-size <= p < 2 * size``."""
    if p < 0:
        return p + size
    if p >= size:
        return p - size
    return p


@njit(cache=True)
def _offset(i, j, size):  # pragma: no cover - compiled
    """Forward distance from position ``i`` to position ``j`` on the cycle."""
    d = j - i
    if d < 0:
        d += size
    return d


@njit(cache=True)
def _set_edge(dist, n, tour, edge, p):  # pragma: no cover - compiled
    """Recompute ``edge[p]``, the cached length of the edge after position ``p``."""
    size = tour.shape[0]
    p = _wrap(p, size)
    edge[p] = _d(dist, n, tour[p], tour[_wrap(p + 1, size)])


@njit(cache=True)
def _nxt(tour, pos, v, side, size):  # pragma: no cover - compiled
    """Successor of ``v`` (side 0) or predecessor (side 1) in the cyclic tour."""
    if side == 0:
        return tour[_wrap(pos[v] + 1, size)]
    return tour[_wrap(pos[v] - 1, size)]


@njit(cache=True)
def _edge_len(edge, pos, v, side, size):  # pragma: no cover - compiled
    """Length of the edge from ``v`` to its successor (side 0) or predecessor (side 1)."""
    if side == 0:
        return edge[pos[v]]
    return edge[_wrap(pos[v] - 1, size)]


@njit(cache=True)
def _reverse(dist, n, tour, pos, edge, i, j, journal, js):  # pragma: no cover - compiled
    """Reverse cyclic positions ``i..j`` (inclusive), or the complement if shorter."""
    size = tour.shape[0]
    m = _offset(i, j, size) + 1
    if 2 * m > size:
        i, j = _wrap(j + 1, size), _wrap(i - 1, size)
        m = size - m
    lo = i
    hi = _wrap(j - 1, size)
    for _ in range((m - 1) // 2):  # the edges inside the range keep their lengths, in reverse
        e = edge[lo]
        edge[lo] = edge[hi]
        edge[hi] = e
        lo = _wrap(lo + 1, size)
        hi = _wrap(hi - 1, size)
    lo = i
    hi = j
    for _ in range(m // 2):
        ci = tour[lo]
        cj = tour[hi]
        _put(tour, pos, lo, cj, journal, js)
        _put(tour, pos, hi, ci, journal, js)
        lo = _wrap(lo + 1, size)
        hi = _wrap(hi - 1, size)
    _set_edge(dist, n, tour, edge, i - 1)
    _set_edge(dist, n, tour, edge, j)


@njit(cache=True)
def _apply_2opt(dist, n, tour, pos, edge, a, x, c, journal, js):  # pragma: no cover - compiled
    """Replace edges (a, x), (c, y) by (a, c), (x, y), where y is the neighbour of
    ``c`` on the same side as ``x`` is of ``a``."""
    size = tour.shape[0]
    if tour[_wrap(pos[a] + 1, size)] == x:
        _reverse(dist, n, tour, pos, edge, pos[x], pos[c], journal, js)
    else:
        _reverse(dist, n, tour, pos, edge, pos[c], pos[x], journal, js)


@njit(cache=True)
def _move_segment(dist, n, tour, pos, edge, i, j, u, first, journal, js):  # pragma: no cover
    """Move the segment at cyclic positions ``i..j`` (at most 3 cities) between
    city ``u`` and its successor, the segment's city ``first`` right after ``u``.

    Shifts whichever side of the cycle between the segment and ``u`` is shorter.
    """
    size = tour.shape[0]
    length = _offset(i, j, size) + 1
    s0 = tour[i]
    s1 = tour[_wrap(i + 1, size)]
    s2 = tour[_wrap(i + 2, size)]
    if s0 != first:  # reversed: first is the segment's last city
        if length == 2:
            s0, s1 = s1, s0
        elif length == 3:
            s0, s2 = s2, s0
    m1 = _offset(j, pos[u], size)  # cities after the segment up to u
    m2 = size - length - m1  # cities after u up to the segment
    if m1 <= m2:
        for t in range(m1):
            _put(tour, pos, _wrap(i + t, size), tour[_wrap(j + 1 + t, size)], journal, js)
        for t in range(m1 - 1):
            edge[_wrap(i + t, size)] = edge[_wrap(j + 1 + t, size)]
        start = _wrap(i + m1, size)
        _set_edge(dist, n, tour, edge, i - 1)
    else:
        for t in range(m2):
            _put(tour, pos, _wrap(j - t, size), tour[_wrap(i - 1 - t, size)], journal, js)
        for t in range(m2 - 2, -1, -1):
            edge[_wrap(i - m2 + length + t, size)] = edge[_wrap(i - m2 + t, size)]
        start = _wrap(i - m2, size)
        _set_edge(dist, n, tour, edge, j)
    _put(tour, pos, start, s0, journal, js)
    if length > 1:
        _put(tour, pos, _wrap(start + 1, size), s1, journal, js)
    if length > 2:
        _put(tour, pos, _wrap(start + 2, size), s2, journal, js)
    for q in range(-1, length):
        _set_edge(dist, n, tour, edge, start + q)


@njit(cache=True)
def _push(c, n, queue, inq, qs):  # pragma: no cover - compiled
    """Queue city ``c`` for the local search (clear its don't-look bit); never the dummy."""
    if c == n or inq[c]:
        return
    inq[c] = True
    size = queue.shape[0]
    queue[_wrap(qs[0] + qs[1], size)] = c
    qs[1] += 1


@njit(cache=True)
def _improve_city(dist, n, nb, nbd, near, tour, pos, edge, a, queue, inq, qs, journal, js, eps,
                  k3):  # pragma: no cover - compiled
    """Apply the first improving move that adds an edge (a, c), c a candidate of a.

    Moves: 2-opt; Or-opt (the segment of 1..3 cities starting at ``a`` moved
    between ``c`` and one of its neighbours, in either orientation); and the
    sequential 3-opt move made of two 2-opt steps (Lin-Kernighan depth 2),
    trying the ``k3`` nearest candidates at step two. Tour edge lengths come
    from the ``edge`` cache; other distances are looked up only when the
    lower bound ``near`` (each city's nearest-neighbour distance) leaves room
    for a gain. Returns the gain (0.0 when no improving move starts at ``a``).
    """
    size = n + 1
    k = nb.shape[1]
    seg = np.empty(OR_OPT_MAX_SEGMENT, dtype=np.int64)
    segnx = np.empty(OR_OPT_MAX_SEGMENT, dtype=np.int64)
    removal = np.empty(OR_OPT_MAX_SEGMENT)
    for side in range(2):
        back = 1 - side
        # x: a's neighbour on this side; the edge (a, x) is the one removed.
        x = _nxt(tour, pos, a, side, size)
        d_ax = _edge_len(edge, pos, a, side, size)
        if d_ax - nbd[a, 0] <= eps:  # no candidate is closer to a than x is
            continue
        near_x = near[x]
        # Or-opt segments start at a and run away from x: seg[:L], followed by segnx[L-1].
        nseg = 0
        last = a
        for length in range(OR_OPT_MAX_SEGMENT):
            if length > 0:
                last = _nxt(tour, pos, last, back, size)
                if last == x:
                    break
            nx = _nxt(tour, pos, last, back, size)
            if nx == x:
                break
            seg[length] = last
            segnx[length] = nx
            removal[length] = d_ax + _edge_len(edge, pos, last, back, size) - _d(dist, n, x, nx)
            nseg = length + 1
        px = pos[x]
        for t in range(k):
            c = nb[a, t]
            d_ac = nbd[a, t]
            g1 = d_ax - d_ac
            if g1 <= eps:
                break
            # ---- 2-opt: remove (a, x), (c, y) with y on the same side of c.
            y = _nxt(tour, pos, c, side, size)
            if c != x and y != a:
                d_cy = _edge_len(edge, pos, c, side, size)
                g2 = g1 + d_cy
                if g2 - max(near_x, near[y]) > eps:
                    gain = g2 - _d(dist, n, x, y)
                    if gain > eps:
                        _apply_2opt(dist, n, tour, pos, edge, a, x, c, journal, js)
                        _push(a, n, queue, inq, qs)
                        _push(x, n, queue, inq, qs)
                        _push(c, n, queue, inq, qs)
                        _push(y, n, queue, inq, qs)
                        return gain
                # ---- 3-opt: then remove (x, y), (t5, t6), add (y, t5), (x, t6) in the
                # tour T' of the 2-opt move, where t6 precedes t5 as x precedes y.
                # Looking along `side`, T = a x R.. c y and T' = a c ..R' x y:
                # R = x..c is reversed.
                if y != n:
                    pc = pos[c]
                    if side == 0:
                        r0 = px
                        rlen = _offset(px, pc, size)
                    else:
                        r0 = pc
                        rlen = _offset(pc, px, size)
                    for u in range(k3):
                        t5 = nb[y, u]
                        d_y5 = nbd[y, u]
                        if g2 - d_y5 <= eps:
                            break
                        if t5 == x:
                            continue
                        # t6 = predecessor of t5 in T' (looking along `side`)
                        if t5 == c:
                            t6 = a
                            d_56 = d_ac
                        elif _offset(r0, pos[t5], size) <= rlen:
                            t6 = _nxt(tour, pos, t5, side, size)
                            d_56 = _edge_len(edge, pos, t5, side, size)
                        else:
                            t6 = _nxt(tour, pos, t5, back, size)
                            d_56 = _edge_len(edge, pos, t5, back, size)
                        if t6 == y:
                            continue
                        g3 = g2 - d_y5 + d_56
                        if g3 - max(near_x, near[t6]) <= eps:
                            continue
                        gain = g3 - _d(dist, n, t6, x)
                        if gain > eps:
                            _apply_2opt(dist, n, tour, pos, edge, a, x, c, journal, js)
                            _apply_2opt(dist, n, tour, pos, edge, y, x, t5, journal, js)
                            _push(a, n, queue, inq, qs)
                            _push(x, n, queue, inq, qs)
                            _push(c, n, queue, inq, qs)
                            _push(y, n, queue, inq, qs)
                            _push(t5, n, queue, inq, qs)
                            _push(t6, n, queue, inq, qs)
                            return gain
            # ---- Or-opt: seg[:L] moved next to c (a adjacent to c).
            for cside in range(2):
                cn = _nxt(tour, pos, c, cside, size)
                d_ccn = _edge_len(edge, pos, c, cside, size)
                near_cn = near[cn]
                for length in range(nseg):
                    last = seg[length]
                    if last == c:
                        break
                    rem = removal[length] - d_ac + d_ccn
                    if rem - max(near_cn, near[last]) <= eps:
                        continue
                    if cn == a or cn == last or (length == 2 and cn == seg[1]):
                        continue
                    gain = rem - _d(dist, n, last, cn)
                    if gain > eps:
                        if side == 0:
                            i = pos[last]
                            j = pos[a]
                        else:
                            i = pos[a]
                            j = pos[last]
                        if cside == 0:
                            _move_segment(dist, n, tour, pos, edge, i, j, c, a, journal, js)
                        else:
                            _move_segment(dist, n, tour, pos, edge, i, j, cn, last, journal, js)
                        _push(a, n, queue, inq, qs)
                        _push(last, n, queue, inq, qs)
                        _push(x, n, queue, inq, qs)
                        _push(segnx[length], n, queue, inq, qs)
                        _push(c, n, queue, inq, qs)
                        _push(cn, n, queue, inq, qs)
                        return gain
    return 0.0


@njit(cache=True)
def _local_search(dist, n, nb, nbd, near, tour, pos, edge, queue, inq, qs, journal, js, eps,
                  k3):  # pragma: no cover - compiled
    """Run moves until no queued city improves; returns the total gain."""
    size = queue.shape[0]
    total = 0.0
    while qs[1] > 0:
        a = queue[qs[0]]
        qs[0] = _wrap(qs[0] + 1, size)
        qs[1] -= 1
        inq[a] = False
        g = _improve_city(dist, n, nb, nbd, near, tour, pos, edge, a, queue, inq, qs, journal, js, eps, k3)
        if g > 0.0:
            total += g
            _push(a, n, queue, inq, qs)
    return total


@njit(cache=True)
def _double_bridge(dist, n, tour, pos, edge, rng, max_seg, buf, queue, inq, qs, journal,
                   js):  # pragma: no cover - compiled
    """Localized double-bridge kick; returns the length change.

    Cuts the edges after positions p, p + l1 and p + l1 + l2 (p random, l1, l2
    in 1..max_seg) and swaps the two short segments between them: A B C D ->
    A C B D. The cities at the six cut ends are queued for the local search.
    """
    size = n + 1
    l1 = 1 + _rand(rng) % max_seg
    l2 = 1 + _rand(rng) % max_seg
    p1 = _rand(rng) % size
    p2 = _wrap(p1 + l1, size)
    p3 = _wrap(p2 + l2, size)
    a0 = tour[p1]
    b0 = tour[_wrap(p1 + 1, size)]
    b1 = tour[p2]
    c0 = tour[_wrap(p2 + 1, size)]
    c1 = tour[p3]
    d0 = tour[_wrap(p3 + 1, size)]
    delta = (_d(dist, n, a0, c0) + _d(dist, n, c1, b0) + _d(dist, n, b1, d0)
             - edge[p1] - edge[p2] - edge[p3])
    for t in range(l2):
        buf[t] = tour[_wrap(p2 + 1 + t, size)]
    for t in range(l1):
        buf[l2 + t] = tour[_wrap(p1 + 1 + t, size)]
    for t in range(l1 + l2):
        _put(tour, pos, _wrap(p1 + 1 + t, size), buf[t], journal, js)
    for t in range(l1 + l2 + 1):
        _set_edge(dist, n, tour, edge, p1 + t)
    for c in (a0, b0, b1, c0, c1, d0):
        _push(c, n, queue, inq, qs)
    return delta


@njit(cache=True)
def _ils(dist, n, nb, nbd, near, tour, pos, edge, saved, esaved, kicks, rng, max_seg, buf, queue, inq,
         qs, journal, js, eps, k3):  # pragma: no cover - compiled
    """``kicks`` rounds of kick + local search, keeping a round only if the tour
    did not get longer. ``saved``/``esaved`` mirror ``tour``/``edge`` between
    rounds; the journal of written positions restores or commits a round in
    time proportional to its changes. Returns the total length change (<= 0).
    """
    size = n + 1
    total = 0.0
    cap = journal.shape[0]
    for _ in range(kicks):
        js[0] = 0
        js[1] = 1
        delta = _double_bridge(dist, n, tour, pos, edge, rng, max_seg, buf, queue, inq, qs, journal, js)
        delta -= _local_search(dist, n, nb, nbd, near, tour, pos, edge, queue, inq, qs, journal, js, eps, k3)
        used = js[0]
        if delta <= 0.0:  # keep: commit the changed positions
            total += delta
            if used <= cap:
                for t in range(used):
                    idx = journal[t]
                    saved[idx] = tour[idx]
                    esaved[idx] = edge[idx]
                    prev = _wrap(idx - 1, size)
                    esaved[prev] = edge[prev]
            else:
                saved[:] = tour
                esaved[:] = edge
        else:  # undo
            if used <= cap:
                for t in range(used):
                    idx = journal[t]
                    c = saved[idx]
                    tour[idx] = c
                    pos[c] = idx
                    edge[idx] = esaved[idx]
                    prev = _wrap(idx - 1, size)
                    edge[prev] = esaved[prev]
            else:
                tour[:] = saved
                edge[:] = esaved
                for idx in range(size):
                    pos[tour[idx]] = idx
    js[1] = 0
    return total


# --------------------------------------------------------------------------- #
# Solver state (Python side)                                                    #
# --------------------------------------------------------------------------- #


class _Search:
    """The arrays the local search and the ILS rounds share for one problem."""

    def __init__(self, dist: np.ndarray, nb: np.ndarray, nbd: np.ndarray, order: np.ndarray, seed: int,
                 eps: float):
        n = dist.shape[0]
        size = n + 1
        self.dist, self.n, self.nb, self.nbd, self.eps = dist, n, nb, nbd, eps
        self.near = np.append(nbd[:, 0], 0.0)  # nearest-neighbour distance; 0 for the dummy
        self.tour = np.append(order, n).astype(np.int64)  # the dummy city n closes the path
        self.pos = np.empty(size, dtype=np.int64)
        self.pos[self.tour] = np.arange(size)
        self.edge = np.empty(size)  # edge[p] = length of the edge tour[p] -> tour[p + 1]
        self.edge[: n - 1] = dist[order[:-1], order[1:]]
        self.edge[n - 1:] = 0.0
        self.queue = np.empty(size, dtype=np.int64)
        self.queue[:n] = order  # visit cities in path order first
        self.inq = np.zeros(size, dtype=np.bool_)
        self.inq[:n] = True
        self.qs = np.array([0, n], dtype=np.int64)  # queue head, length
        self.journal = np.empty(max(1024, 2 * size), dtype=np.int64)
        self.js = np.zeros(2, dtype=np.int64)  # journal length, journaling on
        self.rng = np.array([_splitmix(seed)], dtype=np.uint64)
        self.max_seg = max(1, min(KICK_SEGMENT, (size - 2) // 3))
        self.k3 = min(LK_BREADTH, nb.shape[1])  # never past the candidate lists
        self.max_seg_limit = max(1, min(KICK_SEGMENT_MAX, (size - 2) // 3))
        self.buf = np.empty(2 * self.max_seg_limit, dtype=np.int64)
        self.saved = self.tour.copy()  # tour and edge as of the last accepted kick
        self.esaved = self.edge.copy()

    def local_search(self) -> None:
        _local_search(self.dist, self.n, self.nb, self.nbd, self.near, self.tour, self.pos, self.edge,
                      self.queue, self.inq, self.qs, self.journal, self.js, self.eps, self.k3)
        self.saved[:] = self.tour
        self.esaved[:] = self.edge

    def kicks(self, count: int) -> float:
        """Run ``count`` ILS rounds; returns the (non-positive) change of the tour length."""
        return _ils(self.dist, self.n, self.nb, self.nbd, self.near, self.tour, self.pos, self.edge, self.saved,
             self.esaved, count, self.rng, self.max_seg, self.buf, self.queue, self.inq, self.qs,
             self.journal, self.js, self.eps, self.k3)

    def order(self) -> np.ndarray:
        """The path: the tour cut open at the dummy city."""
        start = self.pos[self.n] + 1
        return np.concatenate([self.tour[start:], self.tour[: start - 1]])


def _splitmix(seed: int) -> np.uint64:
    """A non-zero 64-bit RNG state from any integer seed."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return np.uint64(z or 1)


# --------------------------------------------------------------------------- #
# Public API                                                                    #
# --------------------------------------------------------------------------- #


def _from_torch(x: Any) -> Any:
    """A torch tensor as a numpy array (half precision widened); anything else unchanged."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):  # without importing torch
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:  # float16 / bfloat16: no numpy view
            x = x.double()
        x = x.numpy()
    return x


def _as_matrix(dist: Any, name: str = "dist") -> np.ndarray:
    """Validate ``dist`` and return it as a float32/float64 C-contiguous array."""
    dist = _from_torch(dist)
    try:
        arr = np.asarray(dist)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{name} could not be read as an array ({exc}); expected a square (n, n) matrix of "
            "distances: pass a numpy array or torch tensor."
        ) from exc
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ConfigError(
            f"{name} has shape {tuple(arr.shape)}; expected a square (n, n) distance matrix: "
            "compute pairwise distances between the n items first (e.g. torch.cdist(x, x, p=1))."
        )
    if arr.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
            raise ConfigError(
                f"{name} has dtype {arr.dtype}; expected real numbers: pass a float32 or float64 matrix."
            )
        arr = arr.astype(np.float64)
    arr = np.ascontiguousarray(arr)
    n = arr.shape[0]
    if n == 0:
        return arr
    if not np.isfinite(arr).all():
        i, j = np.argwhere(~np.isfinite(arr))[0]
        raise ConfigError(
            f"{name}[{i}, {j}] is {arr[i, j]}; expected finite distances: replace NaN/inf entries "
            "(check the features the distances were computed from)."
        )
    if arr.min() < 0:
        i, j = np.argwhere(arr < 0)[0]
        raise ConfigError(
            f"{name}[{i}, {j}] is {arr[i, j]} < 0; expected non-negative distances: "
            "pass a distance (e.g. L1 or L2), not a similarity or a signed difference."
        )
    if _count_asymmetric(arr):
        wide = arr.astype(np.float64)
        excess = np.abs(wide - wide.T) - SYMMETRY_RTOL * np.maximum(wide, wide.T)
        i, j = np.unravel_index(np.argmax(excess), excess.shape)
        if excess[i, j] > SYMMETRY_ATOL * wide.max():
            raise ConfigError(
                f"{name} is not symmetric: {name}[{i}, {j}] = {arr[i, j]} but {name}[{j}, {i}] = "
                f"{arr[j, i]}; expected d[i, j] == d[j, i] (up to {SYMMETRY_RTOL:g} relative): "
                "symmetrise it, e.g. (d + d.T) / 2, if the asymmetry is intended noise."
            )
        # Round-off asymmetry: average it away so every move sees one value per edge.
        arr = (wide + wide.T) * 0.5
    return arr


def path_length(dist: Any, order: Any) -> float:
    """Length of the open path visiting ``order``: ``sum(dist[order[t], order[t + 1]])``.

    Args:
        dist: Square (n, n) distance matrix (numpy array or torch tensor).
        order: Sequence of city indices (usually a permutation of ``range(n)``).

    Returns:
        The path length as a Python float (0.0 for fewer than two cities).

    Example:
        >>> import numpy as np
        >>> d = np.array([[0.0, 1.0, 3.0], [1.0, 0.0, 1.5], [3.0, 1.5, 0.0]])
        >>> path_length(d, [0, 1, 2])
        2.5
    """
    arr = np.asarray(_from_torch(dist))
    idx = np.asarray(order, dtype=np.int64).ravel()
    if idx.size < 2:
        return 0.0
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    return float(_path_length(arr, idx))


def held_karp(dist: Any) -> tuple[np.ndarray, float]:
    """Exact shortest Hamiltonian path by Held-Karp dynamic programming.

    O(2^n n^2) time and O(2^n n) memory, so limited to ``n <= 12``.

    Args:
        dist: Symmetric non-negative (n, n) distance matrix, ``n <= 12``.

    Returns:
        ``(order, length)``: an optimal path as an int64 permutation of
        ``range(n)`` and its length.

    Raises:
        ConfigError: If ``dist`` is not a valid distance matrix or ``n > 12``.

    Example:
        >>> import numpy as np
        >>> d = np.abs(np.subtract.outer([0.0, 3.0, 1.0], [0.0, 3.0, 1.0]))
        >>> held_karp(d)
        (array([1, 2, 0]), 3.0)
    """
    arr = _as_matrix(dist)
    n = arr.shape[0]
    if n > HELD_KARP_MAX_N:
        raise ConfigError(
            f"held_karp got n = {n} cities; expected n <= {HELD_KARP_MAX_N} (exact search is O(2^n n^2)): "
            "use shortest_hamiltonian_path for larger problems."
        )
    if n == 0:
        return np.empty(0, dtype=np.int64), 0.0
    if n == 1:
        return np.zeros(1, dtype=np.int64), 0.0
    order, length = _held_karp(arr)
    return order, float(length)


def nearest_neighbour_path(dist: Any, *, starts: int | None = None) -> np.ndarray:
    """Greedy nearest-neighbour path, one of the local search's two candidate starts.

    Starting from a city, repeatedly walk to the nearest unvisited one. Several
    start cities are tried (spread evenly over the labels) and the shortest
    path is kept. :func:`shortest_hamiltonian_path` starts from this path or
    from a greedy-edge path, whichever is shorter, so its result is never
    longer than this one.

    Args:
        dist: Symmetric non-negative (n, n) distance matrix.
        starts: Number of start cities to try; by default ``default_starts(n)``.

    Returns:
        An int64 permutation of ``range(n)``.

    Example:
        >>> import numpy as np
        >>> x = np.array([0.0, 5.0, 1.0, 2.0])
        >>> nearest_neighbour_path(np.abs(np.subtract.outer(x, x)), starts=1)
        array([0, 2, 3, 1])
    """
    if starts is not None and (int(starts) != starts or starts < 1):
        raise ConfigError(f"starts is {starts!r}; expected None or an integer >= 1.")
    arr = _as_matrix(dist)
    n = arr.shape[0]
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    nb, _ = _neighbour_lists(arr, min(DEFAULT_NEIGHBOURS, n - 1))
    return _nn_start(arr, nb, default_starts(n) if starts is None else int(starts))[0]


def default_starts(n: int) -> int:
    """Start cities the nearest-neighbour construction tries: 8 up to n = 256, fewer above."""
    return int(min(8, max(1, 2048 // max(n, 1))))


def default_restarts(n: int) -> int:
    """ILS kicks without a time budget: ``clip(12800 // n, 25, 1000)``.

    About 2-3 ms of kicks at n = 512 on one core; 1000 for tiny problems,
    where kicks are cheap and the optimum is usually reached.
    """
    return int(min(1000, max(25, 12800 // max(n, 1))))


def _nn_start(arr: np.ndarray, nb: np.ndarray, starts: int) -> tuple[np.ndarray, float]:
    n = arr.shape[0]
    starts = min(max(starts, 1), n)
    best_order, best_len = None, np.inf
    for s in range(starts):
        order, length = _nn_path(arr, nb, (s * n) // starts)
        if length < best_len:
            best_order, best_len = order, length
    return best_order, float(best_len)


def shortest_hamiltonian_path(
    dist: Any,
    *,
    seed: int = 0,
    time_budget: float | None = None,
    restarts: int | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
) -> np.ndarray:
    """Order the cities to (approximately) minimise the open path length.

    Exact (Held-Karp) for ``n <= 12``. Otherwise: start from the shorter of a
    greedy-edge and a nearest-neighbour path, local search with 2-opt, Or-opt
    and sequential 3-opt moves on candidate lists, then iterated local search:
    localized double-bridge kicks, each followed by local search and kept only
    if the path did not get longer.

    Args:
        dist: Symmetric, finite, non-negative (n, n) distance matrix (numpy
            array or torch tensor; float32 and float64 are used as they are,
            other dtypes converted to float64). The diagonal is ignored.
        seed: Seed of the kicks. Without ``time_budget`` the result is a
            deterministic function of ``dist``, ``seed``, ``restarts`` and
            ``neighbours``.
        time_budget: If given, keep kicking until this many seconds have passed
            since the call started (``restarts`` is then ignored). The number
            of kicks, hence the result, then depends on the machine's speed
            and load.
        restarts: Number of ILS kicks without a time budget; by default
            ``default_restarts(n)`` (1000 for tiny n, 25 from n = 512 on).
            0 gives plain local search.
        neighbours: Candidate neighbours per city in the local search.

    Returns:
        An int64 permutation of ``range(n)``.

    Raises:
        ConfigError: On a non-square, non-2D, non-finite, negative or
            asymmetric ``dist`` or bad options.

    Example:
        >>> import numpy as np
        >>> x = np.array([0.3, 0.1, 0.7, 0.2])
        >>> order = shortest_hamiltonian_path(np.abs(np.subtract.outer(x, x)))
        >>> x[order]
        array([0.7, 0.3, 0.2, 0.1])
    """
    t0 = time.perf_counter()
    if time_budget is not None:
        try:
            budget = float(time_budget)
        except (TypeError, ValueError):
            budget = float("nan")
        if not (0.0 <= budget < float("inf")):
            raise ConfigError(f"time_budget is {time_budget!r}; expected None or a number of seconds >= 0.")
    if restarts is not None and (int(restarts) != restarts or restarts < 0):
        raise ConfigError(f"restarts is {restarts!r}; expected None or an integer >= 0.")
    if int(neighbours) != neighbours or neighbours < 1:
        raise ConfigError(f"neighbours is {neighbours!r}; expected an integer >= 1 (e.g. 10).")
    arr = _as_matrix(dist)
    n = arr.shape[0]
    if n <= 2:
        return np.arange(n, dtype=np.int64)
    if n <= EXACT_MAX_N:
        return _held_karp(arr)[0]

    deadline = None if time_budget is None else t0 + budget
    return _local_search_path(arr, int(seed), deadline, restarts, int(neighbours))


def _local_search_path(arr: np.ndarray, seed: int, deadline: float | None, restarts: int | None,
                       neighbours: int) -> np.ndarray:
    """The heuristic behind :func:`shortest_hamiltonian_path`, on a validated matrix with n >= 4.

    Kicks ``restarts`` times (default ``default_restarts(n)``), or, when
    ``deadline`` (a ``time.perf_counter()`` value) is given, until then.
    """
    t0 = time.perf_counter()
    n = arr.shape[0]
    nb, nbd = _neighbour_lists(arr, min(neighbours, n - 1))
    order, start_len = _nn_start(arr, nb, default_starts(n))
    greedy, greedy_len = _greedy_path(arr, nb, nbd)
    if greedy_len < start_len:
        order, start_len = greedy, greedy_len
    scale = start_len / (n - 1) if start_len > 0 else 1.0
    search = _Search(arr, nb, nbd, order, seed, eps=1e-12 * scale)
    search.local_search()
    kicks = 0
    if deadline is None:
        kicks = default_restarts(n) if restarts is None else int(restarts)
        if kicks:
            search.kicks(kicks)
    else:
        chunk = 16
        stale = 0  # kicks since the last improvement
        while (now := time.perf_counter()) < deadline:
            stale = 0 if search.kicks(chunk) < 0.0 else stale + chunk
            kicks += chunk
            if stale >= STALL_KICKS_PER_CITY * n and search.max_seg < search.max_seg_limit:
                # stuck: widen the kicks (longer swapped segments)
                search.max_seg = min(2 * search.max_seg, search.max_seg_limit)
                stale = 0
            per_kick = max((time.perf_counter() - now) / chunk, 1e-7)
            # next chunk: ~10 ms of work, never (much) past the deadline
            chunk = int(max(1, min(0.01, deadline - time.perf_counter()) / per_kick))
    result = search.order()
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("shortest_hamiltonian_path: n=%d, start %.6g -> %.6g after %d kicks in %.3f s",
                     n, start_len, path_length(arr, result), kicks, time.perf_counter() - t0)
    return result
