"""The clique: a set of channels that are permuted and resized together.

This module holds plain data only. :func:`morphkit.graph.find_cliques` produces
cliques from a model; smoothing, resizing, coordinates and the manifold read
them. A clique is one torch-pruning dependency group: every tensor dimension
whose entries must move together when a channel is removed or reordered.

A :class:`Member` says which tensor (a ``state_dict`` key), along which
dimension, and how positions along that dimension map to clique channels
(``index``). ``index[p]`` is the clique channel that position ``p`` belongs to;
``None`` means the identity (position ``p`` is channel ``p``). A flattened
feature map gives ``[0]*S + [1]*S + ...`` (S spatial positions per channel);
a fused q/k/v projection gives ``[0..C-1, 0..C-1, 0..C-1]``. Resizing keeps, in
order, every position whose channel is kept, so both layouts resize correctly.

An index entry of ``-1`` marks a position that belongs to another clique (a
layer fed by ``torch.cat`` of two cliques' channels sees both along one dim);
resizing leaves such positions to that other clique.

``block`` is the size of the blocks that channels may only be permuted
within (grouped convolutions, attention heads): 1 means free permutation.
Resizing such a clique keeps whole multiples of ``n_blocks`` (the same count
per block). ``tied`` cliques use one permutation for every block (the input
of a grouped convolution, whose weight has only ``block`` input columns
shared by all groups; a LayerNorm over one attention head's dims): their
members may index the channels of the first block only (``index`` values in
``range(block)``), which then stand for that position in every block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Member", "Clique", "CliqueList", "width_map", "MAX_ROUND_TO"]

#: Largest ``round_to`` accepted (a typo guard: no accelerator wants channels in multiples of more).
MAX_ROUND_TO = 4096


@dataclass(frozen=True)
class Member:
    """One tensor dimension that belongs to a clique.

    Attributes:
        name: ``state_dict`` key of the parameter or buffer (``"conv1.weight"``).
        dim: The dimension of that tensor indexed by the clique.
        index: Clique channel of each position along ``dim``; ``None`` for the
            identity map. Its length equals ``tensor.shape[dim]``.
    """

    name: str
    dim: int
    index: tuple[int, ...] | None = None

    def channel_of(self, length: int) -> list[int]:
        """Return the clique channel of every position along ``dim``."""
        return list(range(length)) if self.index is None else list(self.index)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim,
                "index": None if self.index is None else list(self.index)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Member:
        """Inverse of :meth:`to_json`; raises ConfigError on a malformed dict."""
        _expect(isinstance(d, dict), "clique member", d, "a JSON object")
        _expect(isinstance(d.get("name"), str), "member name", d.get("name"), "a string")
        _expect(_is_int(d.get("dim")) and d["dim"] >= 0, "member dim", d.get("dim"), "an int >= 0")
        idx = d.get("index")
        _expect(idx is None or (isinstance(idx, list) and all(_is_int(i) for i in idx)), "member index",
                idx, "null or a list of ints")
        return cls(name=d["name"], dim=d["dim"], index=None if idx is None else tuple(idx))


@dataclass
class Clique:
    """A group of coupled channels.

    Attributes:
        id: Stable integer id, unique within one model (order of discovery).
        size: Channel count in the base model.
        members: Every tensor dimension indexed by this clique.
        fixed: True when the clique cannot be resized or permuted (it touches
            the model's input or output, or carries a constraint we cannot
            honour); ``reason`` says why.
        reason: Human-readable reason for ``fixed`` ("" otherwise).
        block: Permute only within consecutive blocks of this many channels
            (grouped convs, attention heads); 1 = free.
        modules: Names of the modules whose structure depends on this clique
            (for display and for resizing).
        tied: True when every block must use the same permutation; members
            may then index the first block only (see the module doc).
    """

    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    fixed: bool = False
    reason: str = ""
    block: int = 1
    modules: list[str] = field(default_factory=list)
    tied: bool = False

    def __repr__(self) -> str:
        """Short: id, size, status and the layers, not every member's index map."""
        mods = ", ".join(self.modules[:3]) + (f", ... (+{len(self.modules) - 3})" if len(self.modules) > 3 else "")
        status = f"fixed: {self.reason}" if self.fixed else "resizable"
        block = f", block={self.block}{' tied' if self.tied else ''}" if self.block > 1 else ""
        return (f"Clique(id={self.id}, size={self.size}, {status}{block}, members={len(self.members)}, "
                f"modules=[{mods}])")

    @property
    def n_blocks(self) -> int:
        """How many permutation blocks the clique has (``size // block``)."""
        return self.size // self.block

    def channels_for(self, width: float, round_to: int | None = None) -> int:
        """Channel count for a width in (0, 1]: ``max(1, round(size * width))``.

        For a blocked clique the count is rounded to a whole multiple of
        ``n_blocks`` (at least one channel per block). With ``round_to`` the
        count is then moved to the nearest multiple of ``round_to`` the clique
        allows (:meth:`round_count`).

        Example:
            >>> Clique(0, 120).channels_for(0.5), Clique(0, 120).channels_for(0.5, round_to=16)
            (60, 64)
        """
        if self.fixed:
            return self.size
        if self.block > 1:
            per = max(1, round(self.block * width))
            count = per * self.n_blocks
        else:
            count = max(1, round(self.size * width))
        return self.round_count(count, round_to)

    def round_count(self, count: int, round_to: int | None) -> int:
        """The allowed channel count nearest to ``count`` that is a multiple of ``round_to``.

        Allowed counts are at most ``size`` and, for a blocked clique (heads,
        groups), the same number of channels in every block, so the count is a
        multiple of both ``n_blocks`` and ``round_to``. Ties round up. When no
        allowed count is a multiple of ``round_to`` (a 6-channel clique and
        ``round_to=8``), or the clique is fixed, ``count`` is returned unchanged.

        Example:
            >>> c = Clique(0, 192, block=64)  # 3 heads of 64
            >>> c.round_count(96, 8), c.round_count(99, 16), Clique(1, 6).round_count(3, 8)
            (96, 96, 3)
        """
        if round_to is None or round_to == 1 or self.fixed:
            return count
        import math

        blocks, width = (self.n_blocks, self.block) if self.block > 1 else (1, self.size)
        step = round_to // math.gcd(round_to, blocks)  # per-block channels move in this step
        if width < step:
            return count
        k = min(max(1, math.floor(count / blocks / step + 0.5)), width // step)
        return k * step * blocks

    def kept(self, count: int) -> list[int]:
        """Base channels a resized model with ``count`` channels keeps, in order.

        Free cliques keep the first ``count`` channels; blocked cliques keep the
        first ``count // n_blocks`` channels of every block. Which channels are
        kept only fixes shapes (the INR fills the values), but everything that
        resizes (``resize``, the coordinate tables) uses this one rule.
        """
        if self.block > 1:
            per = count // self.n_blocks
            return [b * self.block + j for b in range(self.n_blocks) for j in range(per)]
        return list(range(count))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["members"] = [m.to_json() for m in self.members]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Clique:
        """Inverse of :meth:`to_json`; raises ConfigError on a malformed dict."""
        _expect(isinstance(d, dict), "clique", d, "a JSON object")
        for key, lo in (("id", 0), ("size", 1)):
            _expect(_is_int(d.get(key)) and d[key] >= lo, f"clique {key}", d.get(key), f"an int >= {lo}")
        block = d.get("block", 1)
        _expect(_is_int(block) and block >= 1 and d["size"] % block == 0, "clique block", block,
                f"an int >= 1 dividing the size {d['size']}")
        members, modules = d.get("members", []), d.get("modules", [])
        _expect(isinstance(members, list), "clique members", members, "a list")
        _expect(isinstance(modules, list) and all(isinstance(m, str) for m in modules), "clique modules",
                modules, "a list of strings")
        for key in ("fixed", "tied"):
            _expect(isinstance(d.get(key, False), bool), f"clique {key}", d.get(key), "true or false")
        _expect(isinstance(d.get("reason", ""), str), "clique reason", d.get("reason"), "a string")
        return cls(id=d["id"], size=d["size"], members=[Member.from_json(m) for m in members],
                   fixed=d.get("fixed", False), reason=d.get("reason", ""), block=block, modules=list(modules),
                   tied=d.get("tied", False))


class CliqueList(list):
    """The list :func:`~morphkit.graph.find_cliques` returns: a plain ``list`` of :class:`Clique`
    that prints as a table (``print(cliques)``) and shows a one-line summary as its repr.

    Example:
        >>> cs = CliqueList([Clique(0, 6, modules=["conv1"]), Clique(1, 10, fixed=True, reason="output")])
        >>> cs
        CliqueList(2 cliques: 1 resizable (6 channels), 1 fixed; print() shows the table)
        >>> cs[0]
        Clique(id=0, size=6, resizable, members=0, modules=[conv1])
    """

    def summary(self) -> str:
        """One line: how many cliques, resizable (with their channels) and fixed."""
        free = [c for c in self if not c.fixed]
        return (f"{len(self)} cliques: {len(free)} resizable ({sum(c.size for c in free)} channels), "
                f"{len(self) - len(free)} fixed")

    def __repr__(self) -> str:
        return f"CliqueList({self.summary()}; print() shows the table)"

    def __str__(self) -> str:
        from morphkit.graph import format_cliques

        return format_cliques(self)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _expect(cond: bool, what: str, got: Any, expected: str) -> None:
    if not cond:
        from morphkit.errors import ConfigError

        raise ConfigError(f"{what}: got {got!r:.80}, expected {expected}")


def width_map(cliques: list[Clique], width: Any, round_to: int | None = None) -> dict[int, int]:
    """Resolve a width (float in (0, 1] or ``{clique_id: channels}``) to a full width map.

    Args:
        cliques: All cliques of the model (fixed ones included).
        width: A fraction applied to every non-fixed clique
            (``max(1, round(size * width))`` channels), or a map of channel
            counts for some cliques (the others stay full).
        round_to: Make every resizable clique's channel count a multiple of
            this (hardware-friendly: 8, 16), the nearest one the clique allows
            (:meth:`Clique.round_count`: at most its size, the same count in
            every head or group); a clique with no such count keeps its
            unrounded count. Applies to the counts of a map too; a full-width
            clique may become narrower (120 channels, ``round_to=16``: 112).

    Returns:
        ``{clique_id: channels}`` for every clique.

    Raises:
        ConfigError: width <= 0, > 1, NaN, not a number; unknown clique id; a
            count < 1 or > size; a fixed clique asked to change; a blocked
            clique's count that is not a whole multiple of its blocks;
            ``round_to`` not an int >= 1.

    Example:
        >>> cs = [Clique(0, 6), Clique(1, 10, fixed=True, reason="output"), Clique(2, 120)]
        >>> width_map(cs, 0.5)
        {0: 3, 1: 10, 2: 60}
        >>> width_map(cs, 0.5, round_to=8)
        {0: 3, 1: 10, 2: 64}
    """
    import math
    import numbers

    import numpy as np

    from morphkit.errors import ConfigError

    if round_to is not None and (isinstance(round_to, (bool, np.bool_)) or not isinstance(round_to, numbers.Integral)
                                 or not 1 <= round_to <= MAX_ROUND_TO):
        raise ConfigError(f"round_to: got {round_to!r}, expected an int in [1, {MAX_ROUND_TO}] (e.g. 8 or 16) or None")
    round_to = None if round_to is None else int(round_to)
    by_id = {c.id: c for c in cliques}
    if isinstance(width, dict):
        out = {c.id: c.size for c in cliques}
        for key, count in width.items():
            try:
                cid = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"width map key {key!r} is not a clique id; expected ints from "
                                  f"{sorted(by_id)}") from None
            if cid not in by_id:
                raise ConfigError(f"unknown clique id {cid} in the width map; this model has cliques "
                                  f"{sorted(by_id)} (see `morphkit cliques MODEL`)")
            c = by_id[cid]
            if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral) and not (
                    isinstance(count, float) and count.is_integer()):
                raise ConfigError(f"clique {cid}: channel count {count!r} is not an integer")
            count = int(count)
            if not 1 <= count <= c.size:
                raise ConfigError(f"clique {cid}: got {count} channels, expected 1..{c.size}")
            if c.fixed and count != c.size:
                raise ConfigError(f"clique {cid} is fixed ({c.reason}); it must keep its {c.size} channels")
            if c.block > 1 and count % c.n_blocks:
                raise ConfigError(f"clique {cid} permutes within {c.n_blocks} blocks of {c.block}; its "
                                  f"channel count must be a multiple of {c.n_blocks}, got {count}")
            out[cid] = c.round_count(count, round_to)
        return out
    if isinstance(width, (bool, np.bool_)) or not isinstance(width, numbers.Real):
        raise ConfigError(f"width must be a number in (0, 1] or a {{clique_id: channels}} map, "
                          f"got {width!r}")
    if not math.isfinite(width) or not 0 < width <= 1:
        raise ConfigError(f"width must be in (0, 1] (1 = the base model; compression = 1 - width), "
                          f"got {width!r}")
    return {c.id: c.channels_for(float(width), round_to) for c in cliques}
