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

``block`` is the size of the blocks that channels may only be permuted
within (grouped convolutions, attention heads): 1 means free permutation.
Resizing such a clique keeps whole multiples of ``n_blocks`` (the same count
per block).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Member", "Clique"]


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
    def from_json(cls, d: dict[str, Any]) -> "Member":
        idx = d.get("index")
        return cls(name=str(d["name"]), dim=int(d["dim"]),
                   index=None if idx is None else tuple(int(i) for i in idx))


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
    """

    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    fixed: bool = False
    reason: str = ""
    block: int = 1
    modules: list[str] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        """How many permutation blocks the clique has (``size // block``)."""
        return self.size // self.block

    def channels_for(self, width: float) -> int:
        """Channel count for a width in (0, 1]: ``max(1, round(size * width))``.

        For a blocked clique the count is rounded to a whole multiple of
        ``n_blocks`` (at least one channel per block).
        """
        if self.fixed:
            return self.size
        if self.block > 1:
            per = max(1, round(self.block * width))
            return per * self.n_blocks
        return max(1, round(self.size * width))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["members"] = [m.to_json() for m in self.members]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Clique":
        return cls(id=int(d["id"]), size=int(d["size"]),
                   members=[Member.from_json(m) for m in d.get("members", [])],
                   fixed=bool(d.get("fixed", False)), reason=str(d.get("reason", "")),
                   block=int(d.get("block", 1)), modules=list(d.get("modules", [])))
