"""Find the cliques of a model: the channel groups that resize and permute together.

:func:`find_cliques` traces the model with torch-pruning's ``DependencyGraph``
and turns every dependency group into a :class:`~morphkit.clique.Clique`: the
``state_dict`` keys and dims it indexes, with each position's clique channel
read from the group's ``(idxs, root_idxs)`` pairs (flatten and concat
included). On top of torch-pruning it adds what a group does not say: which
cliques touch the model's input or an output (fixed), the block structure of
grouped convolutions and GroupNorm (permute within a group; a grouped conv's
input columns are shared by all groups, so its input clique is *tied*: one
permutation for every block), timm-style fused-``qkv`` attention, whose
inner dimension is rebuilt by hand (q, k and v rows of one channel move
together, permutation within heads; GPT-2's ``c_attn`` likewise, its ``Conv1D`` layers
traced as linear layers with ``(in, out)`` weights), and attention with separate q/k/v
projections (Hugging Face BERT / ViT / Llama-style, :func:`head_attention`),
whose cliques permute within heads; resizing keeps the head count and shrinks
the head size. Known torch-pruning traps are cleaned up:
members reached across an axis change (a token-mixing linear, ``x.mean(1)``)
cover a dim only partly and are dropped, and a group that maps its channels
unevenly onto a tensor, splits them (``torch.split``), or contains a layer we
cannot resize (LSTM, ``nn.MultiheadAttention`` with separate ``kdim`` / ``vdim``) is fixed
with a warning; ``nn.MultiheadAttention`` otherwise joins the clique of its ``embed_dim``
(:func:`_add_multihead_attention`).
Finally, unless ``check=False``, every resizable clique is verified on the
model itself: a random within-block permutation must leave the output
unchanged (on randomly perturbed weights, so zero-initialised branches count,
with attention's query and key scaled up so it is sharp, in float64 to a
relative 1e-9) and resizing to half width must still run; a clique that fails
either is fixed with a warning naming it. Never a silent break.

The helpers :func:`member_channels`, :func:`permute_state` and
:func:`keep_positions` are the one implementation of "apply a permutation" and
"which positions survive a resize" that smoothing, resizing and validation share.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from morphkit.clique import Clique, CliqueList, Member
from morphkit.errors import ConfigError, UnsupportedModelError

__all__ = [
    "check_model",
    "find_cliques",
    "format_cliques",
    "head_attention",
    "validate_cliques",
    "clique_map",
    "member_channels",
    "permute_state",
    "keep_positions",
    "random_permutations",
    "as_inputs",
    "copy_with",
]

logger = logging.getLogger(__name__)

#: Relative output difference above which a permuted model counts as broken: the check runs in
#: float64, where a true symmetry leaves ~1e-15; a model that cannot run in float64 is checked in
#: float32 against ``CHECK_RTOL_F32``.
CHECK_RTOL = 1e-9
CHECK_RTOL_F32 = 1e-5
#: The check multiplies attention's query and key weights by this (logits by its square), so a
#: permutation across heads cannot hide behind nearly uniform attention.
SHARPEN = 4.0


# --------------------------------------------------------------------------- #
# small helpers                                                                #
# --------------------------------------------------------------------------- #


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise example inputs to the positional-argument tuple of ``model(*inputs)``.

    Example:
        >>> len(as_inputs(torch.zeros(1, 3))), len(as_inputs((torch.zeros(1), torch.zeros(1))))
        (1, 2)
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tensor or a tuple of tensors, got "
                      f"{type(example_inputs).__name__}")


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, shortened."""
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


def _flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flatten_tensors(o)]
    return []


@contextlib.contextmanager
def _eval_mode(model: nn.Module, grads: bool = False) -> Iterator[nn.Module]:
    """Temporarily put a model in eval mode (and make its float parameters require grad)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        if grads:
            for p, _ in flags:
                if p.is_floating_point():
                    p.requires_grad_(True)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _run(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _flatten_tensors(model(*inputs))


def _functional_run(model: nn.Module, state: dict[str, torch.Tensor],
                    inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _flatten_tensors(torch.func.functional_call(model, state, inputs, strict=False))


def _rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest ``max|a - b| / max|a|`` over the outputs (inf on a shape change)."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else math.inf)
            continue
        scale = float(x.abs().max()) if x.numel() else 0.0
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        if not math.isfinite(diff):
            return math.inf
        worst = max(worst, diff / max(scale, 1e-12))
    return worst


def copy_with(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Deep copy of a module whose ``state_dict`` entries are replaced by ``tensors``.

    Tensors not in ``tensors`` are cloned; none is copied twice. Parameters stay
    parameters (same ``requires_grad``), buffers stay buffers; shapes may change
    (the caller fixes size attributes).

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> copy_with(lin, {"bias": torch.ones(1)}).bias
        Parameter containing:
        tensor([1.], requires_grad=True)
    """
    state = model.state_dict(keep_vars=True)
    memo: dict[int, Any] = {}
    for key, t in state.items():
        if id(t) in memo:  # a tensor shared under two names
            continue
        data = tensors[key].detach() if key in tensors else t.detach().clone()
        if key in tensors and data.data_ptr() == t.data_ptr():
            data = data.clone()
        memo[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    memo[id(memo)] = list(state.values())  # keep the originals alive, as deepcopy's memo expects
    return copy.deepcopy(model, memo)


_SLOTS = ("_parameters", "_buffers", "_modules")
_LIGHT_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> light_copy_with may share


def _holds_tensors(value: Any, depth: int = 0) -> bool:
    """Whether a plain attribute holds a tensor or module (directly or in a list / tuple / dict)."""
    if isinstance(value, (torch.Tensor, nn.Module)):
        return True
    if depth < 2 and isinstance(value, (list, tuple, set)):
        return any(_holds_tensors(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return any(_holds_tensors(v, depth + 1) for v in value.values())
    return False


def light_copy_with(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """:func:`copy_with` for short-lived structures: a new module tree sharing plain attributes.

    Every module is a new object with its own ``__dict__``, parameter, buffer
    and child dicts (so size attributes can be set on it), but other
    attributes (ints, tuples, hooks, functions) and the tensors not in
    ``tensors`` are the original's objects, not copies: 4.5 ms for timm
    mobilenetv3_small_100, where :func:`copy_with` took 22 ms. Use it for
    structures that live inside morphkit (training's per-width-map
    templates, which ``functional_call`` fills) and deep-copy anything handed
    to a user. A model holding a tensor or module outside those dicts (a
    tied weight kept as a plain attribute) gets :func:`copy_with` instead,
    which remaps such references.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> new = light_copy_with(lin, {"bias": torch.ones(1)})
        >>> new is lin, new.bias.tolist(), lin.bias.shape
        (False, [1.0], torch.Size([1]))
    """
    plain = _LIGHT_OK.get(model)
    if plain is None:  # scanned once per model (templates of one base are made every training step)
        plain = not any(_holds_tensors(v) for m in model.modules() for k, v in vars(m).items() if k not in _SLOTS)
        _LIGHT_OK[model] = plain
    if not plain:
        return copy_with(model, tensors)
    state = model.state_dict(keep_vars=True)
    made: dict[int, Any] = {}
    for key, t in state.items():
        if id(t) in made:  # a tensor shared under two names
            continue
        if key not in tensors:  # unchanged: shared, not cloned
            made[id(t)] = t
            continue
        data = tensors[key].detach()
        made[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    clones: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in clones:  # a module shared between blocks stays shared
            return clones[id(m)]
        new = m.__class__.__new__(m.__class__)
        new.__dict__ = dict(vars(m))
        clones[id(m)] = new
        # tensors outside the state dict (non-persistent buffers) are shared like unchanged ones
        new._parameters = {k: None if v is None else made.get(id(v), v) for k, v in m._parameters.items()}
        new._buffers = {k: None if v is None else made.get(id(v), v) for k, v in m._buffers.items()}
        new._modules = {k: None if c is None else clone(c) for k, c in m._modules.items()}
        return new

    return clone(model)


def with_metadata(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as a state dict carrying ``model``'s ``_metadata`` (each module's state version).

    ``load_state_dict`` hands a module its version from there; without it some
    modules refuse to load (torchvision's MNASNet raises "version should be
    set to 1 or 2"). Files hold no such metadata, so every load goes through this.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> lin.load_state_dict(with_metadata(lin, lin.state_dict()))
        <All keys matched successfully>
    """
    from collections import OrderedDict

    out: Any = OrderedDict(tensors)
    out._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())
    return out


def member_channels(member: Member, length: int) -> np.ndarray:
    """Clique channel of every position along ``member.dim`` (``-1``: another clique's).

    Args:
        member: The member.
        length: ``tensor.shape[member.dim]``.

    Returns:
        ``(length,)`` int64 array.

    Example:
        >>> member_channels(Member("fc.weight", 1, (0, 0, 1, 1)), 4)
        array([0, 0, 1, 1])
    """
    if member.index is None:
        return np.arange(length, dtype=np.int64)
    idx = np.asarray(member.index, dtype=np.int64)
    if idx.shape != (length,):
        raise ConfigError(f"member {member.name}[{member.dim}] has an index map of length {idx.size} but "
                          f"the tensor has {length} positions along that dim; the cliques do not belong "
                          "to this model (find them again with find_cliques)")
    return idx


def _channel_table(idx: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of each present channel: ``(channels (n,), table (n, m))`` in position order.

    Raises ValueError when the present channels do not all have the same number
    of positions.
    """
    pos = np.nonzero(idx >= 0)[0]
    chans = idx[pos]
    if pos.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.int64)
    if chans.max() >= size:
        raise ValueError(f"channel {int(chans.max())} out of range for a clique of {size}")
    counts = np.bincount(chans, minlength=size)
    present = np.nonzero(counts)[0]
    m = int(counts[present[0]])
    if not (counts[present] == m).all():
        raise ValueError("channels map onto unequal numbers of positions")
    order = np.argsort(chans, kind="stable")  # positions grouped by channel, in position order
    table = pos[order].reshape(present.size, m)  # (n_present, m)
    return present, table


def permute_state(state: dict[str, torch.Tensor], cliques: Sequence[Clique],
                  perms: dict[int, Any]) -> dict[str, torch.Tensor]:
    """Apply clique permutations to a ``state_dict`` (a new dict; tensors are not modified).

    ``perms[clique_id][c]`` is the old channel that new channel ``c`` takes.
    Cliques missing from ``perms`` keep their order.

    Args:
        state: ``{key: tensor}`` of the model the cliques were found on.
        cliques: The model's cliques.
        perms: ``{clique_id: permutation of range(size)}``.

    Returns:
        The permuted state.

    Example:
        >>> c = Clique(0, 2, [Member("w", 0)])
        >>> permute_state({"w": torch.tensor([1.0, 2.0])}, [c], {0: [1, 0]})["w"]
        tensor([2., 1.])
    """
    out = dict(state)
    for c in cliques:
        if c.id not in perms:
            continue
        perm = np.asarray(perms[c.id], dtype=np.int64)
        if (perm == np.arange(c.size)).all():
            continue
        for m in c.members:
            t = out[m.name]
            length = t.shape[m.dim]
            idx = member_channels(m, length)
            chans, table = _channel_table(idx, c.size)
            order = np.arange(length, dtype=np.int64)
            order[table.ravel()] = table[np.searchsorted(chans, perm[chans])].ravel()
            out[m.name] = t.index_select(m.dim, torch.from_numpy(order).to(t.device))
    return out


def keep_positions(cliques: Sequence[Clique], widths: dict[int, int],
                   shapes: dict[str, Sequence[int]]) -> dict[tuple[str, int], np.ndarray]:
    """Positions kept along every resized ``(key, dim)`` for a width map.

    Each clique keeps ``clique.kept(count)``; a position survives when the
    channel of every clique that indexes it is kept.

    Args:
        cliques: The model's cliques.
        widths: ``{clique_id: channels}`` (missing ids stay full).
        shapes: ``{key: shape}`` of the full-width model.

    Returns:
        ``{(key, dim): sorted int64 positions}`` for the dims that shrink.

    Example:
        >>> c = Clique(0, 4, [Member("w", 0)])
        >>> keep_positions([c], {0: 2}, {"w": (4,)})
        {('w', 0): array([0, 1])}
    """
    masks: dict[tuple[str, int], np.ndarray] = {}
    for c in cliques:
        k = int(widths.get(c.id, c.size))
        if k == c.size:
            continue
        kept = np.zeros(c.size, dtype=bool)
        kept[np.asarray(c.kept(k), dtype=np.int64)] = True
        for m in c.members:
            length = int(shapes[m.name][m.dim])
            idx = member_channels(m, length)
            mask = masks.setdefault((m.name, m.dim), np.ones(length, dtype=bool))
            sel = idx >= 0
            mask[sel] &= kept[idx[sel]]
    return {key: np.nonzero(mask)[0] for key, mask in masks.items() if not mask.all()}


def random_permutations(cliques: Sequence[Clique], seed: int = 0) -> dict[int, np.ndarray]:
    """A random valid permutation for every resizable clique (within blocks; tied: one per clique).

    Example:
        >>> sorted(random_permutations([Clique(0, 4, block=2)], seed=1)[0].tolist())
        [0, 1, 2, 3]
    """
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for c in cliques:
        if c.fixed or c.size < 2:
            continue
        b = c.block if c.block > 1 else c.size
        if c.tied:
            local = rng.permutation(b)
            perm = np.concatenate([g * b + local for g in range(c.size // b)])
        else:
            perm = np.concatenate([g * b + rng.permutation(b) for g in range(c.size // b)])
        out[c.id] = perm.astype(np.int64)
    return out


def clique_map(cliques: Sequence[Clique]) -> dict[str, dict[int, list[tuple[Clique, Member]]]]:
    """``{key: {dim: [(clique, member), ...]}}``: which cliques index each tensor dim.

    A dim fed by a concatenation lists several cliques (each with ``-1`` on the
    other's positions); every other dim lists one.

    Example:
        >>> c = Clique(0, 2, [Member("w", 0)])
        >>> list(clique_map([c])["w"])
        [0]
    """
    out: dict[str, dict[int, list[tuple[Clique, Member]]]] = {}
    for c in cliques:
        for m in c.members:
            out.setdefault(m.name, {}).setdefault(m.dim, []).append((c, m))
    return out


# --------------------------------------------------------------------------- #
# building cliques from torch-pruning groups                                    #
# --------------------------------------------------------------------------- #


@dataclass
class _Draft:
    """A clique under construction: one dependency group (or a hand-built one)."""

    size: int
    label: str
    entries: dict[tuple[str, int], dict[int, int]] = field(default_factory=dict)  # (key, dim) -> pos -> ch
    lengths: dict[tuple[str, int], int] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    constraints: list[tuple[int, bool, str]] = field(default_factory=list)  # (block, tied, source)
    problems: list[str] = field(default_factory=list)
    touches_input: bool = False
    touches_output: list[str] = field(default_factory=list)
    fixed_reason: str = ""

    def add(self, key: str, dim: int, length: int, pairs: Iterable[tuple[int, int]]) -> None:
        slot = self.entries.setdefault((key, dim), {})
        self.lengths[(key, dim)] = length
        for pos, ch in pairs:
            if pos in slot and slot[pos] != ch:
                self.problems.append(f"{key}[{dim}] position {pos} maps to two channels")
            slot[pos] = ch

    def module(self, name: str) -> None:
        if name and name not in self.modules:
            self.modules.append(name)


def _tp_handlers() -> dict[str, Any]:
    from torch_pruning.pruner import function as tpf

    return {"conv_out": tpf.prune_conv_out_channels, "conv_in": tpf.prune_conv_in_channels,
            "dw": tpf.prune_depthwise_conv_out_channels,
            "lin_out": tpf.prune_linear_out_channels, "lin_in": tpf.prune_linear_in_channels}


def transposed_linear_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight ``(in, out)``) when transformers is loaded.

    Only a model built with transformers can hold one, so transformers is never imported here.
    """
    import sys

    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_transposed_linear(m: nn.Module) -> bool:
    """A linear layer that stores its weight as ``(in, out)`` (transformers' ``Conv1D``)."""
    cls = transposed_linear_type()
    return cls is not None and isinstance(m, cls)


def _transposed_linear_pruner() -> Any:
    """torch-pruning's view of transformers' ``Conv1D``: a linear layer whose weight is ``(in, out)``.

    morphkit only traces with it (it never prunes through torch-pruning), but the
    pruning functions are real so the graph's handlers are well defined.
    """
    from torch_pruning.pruner.function import BasePruningFunc

    class TransposedLinearPruner(BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            drop = set(idxs)
            keep = [i for i in range(layer.nf) if i not in drop]
            layer.weight = nn.Parameter(layer.weight.data[:, keep])
            layer.bias = nn.Parameter(layer.bias.data[keep])
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            drop = set(idxs)
            keep = [i for i in range(layer.nx) if i not in drop]
            layer.weight = nn.Parameter(layer.weight.data[keep])
            layer.nx = len(keep)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.nf

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.nx

    return TransposedLinearPruner()


def _key(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def fused_attention(m: nn.Module, resized: bool = False) -> tuple[nn.Module, nn.Module, bool] | None:
    """``(qkv, proj, transposed)`` of an attention with one fused q/k/v projection, else None.

    timm-style: ``qkv`` and ``proj`` ``nn.Linear``; GPT-2-style (transformers):
    ``c_attn`` and ``c_proj`` ``Conv1D`` (weights ``(in, out)``, ``split_size``
    = the q width unless the projections were just ``resized``) in
    self-attention. Both need an int ``num_heads``.
    """
    heads = getattr(m, "num_heads", None)
    if not isinstance(heads, int) or isinstance(heads, bool):
        return None
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    if isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear):
        return qkv, proj, False
    qkv, proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    if (is_transposed_linear(qkv) and is_transposed_linear(proj) and not getattr(m, "is_cross_attention", False)
            and isinstance(getattr(m, "split_size", None), int) and (resized or m.split_size == proj.nx)):
        return qkv, proj, True
    return None


def _fused_widths(qkv: nn.Module, proj: nn.Module, transposed: bool) -> tuple[int, int]:
    """``(a, qkv_out)``: the attention's inner width (proj's input) and its fused projection's output."""
    if transposed:
        return proj.nx, qkv.nf
    return proj.in_features, qkv.out_features


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention with a fused q/k/v projection (:func:`fused_attention`) and a consistent head count."""
    out = {}
    for name, m in model.named_modules():
        found = fused_attention(m)
        if found is None:
            continue
        qkv, proj, transposed = found
        heads = m.num_heads
        a, qkv_out = _fused_widths(qkv, proj, transposed)
        if heads > 0 and qkv_out == 3 * a and a % heads == 0:
            hd = getattr(m, "head_dim", a // heads)
            if hd == a // heads:
                out[name] = m
    return out


#: Attributes that hold an attention module's head count, head size, and the names of its
#: separate query / key / value projections (Hugging Face BERT / ViT / Llama, DistilBERT, ...).
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size", "dim_per_head")
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"),
             ("q_lin", "k_lin", "v_lin"), ("wq", "wk", "wv"))


@dataclass
class HeadAttention:
    """An attention module with separate q/k/v projections: its head count and head size."""

    name: str
    heads: int
    head_size: int
    projections: tuple[str, ...]  # child names, query first
    size_attr: str | None  # the attribute the forward reshapes with (None: unknown, not resizable)


def head_attention(m: nn.Module, name: str = "") -> HeadAttention | None:
    """Describe ``m`` when it is an attention with separate q/k/v ``nn.Linear`` projections, else None.

    The head count comes from the module (``num_attention_heads``, ``num_heads``,
    ...) or its ``config``; the head size from ``attention_head_size`` /
    ``head_dim`` / ... or the query's width over the head count.

    Example:
        >>> class Attn(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.num_heads, self.head_dim = 2, 4
        ...         self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        >>> head_attention(Attn()).head_size
        4
    """
    for names in QKV_NAMES:
        projs = [getattr(m, n, None) for n in names]
        if isinstance(projs[0], nn.Linear) and isinstance(projs[1], nn.Linear):
            break
    else:
        return None
    heads = next((getattr(m, a) for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int)), None)
    if heads is None:
        cfg = getattr(m, "config", None)
        heads = next((getattr(cfg, a) for a in HEAD_COUNT_ATTRS if isinstance(getattr(cfg, a, None), int)), None)
    q = projs[0]
    if not heads or heads <= 0 or q.out_features % heads:
        return None
    size_attr = next((a for a in HEAD_SIZE_ATTRS if isinstance(getattr(m, a, None), int)), None)
    hd = getattr(m, size_attr) if size_attr else q.out_features // heads
    if hd * heads != q.out_features:
        return None
    present = tuple(n for n, p in zip(names, projs) if isinstance(p, nn.Linear))
    return HeadAttention(name, heads, hd, present, size_attr)


def _head_attention_modules(model: nn.Module, skip: Iterable[str]) -> list[HeadAttention]:
    """Every attention with separate q/k/v projections (not the fused-``qkv`` ones in ``skip``)."""
    skip = set(skip)
    out = []
    for name, m in model.named_modules():
        if name in skip:
            continue
        info = head_attention(m, name)
        if info is not None:
            out.append(info)
    return out


def _constrain_heads(drafts: list[_Draft], attns: list[HeadAttention]) -> None:
    """Permute q/k/v output channels within heads: a block constraint on every draft they are in.

    A draft holding a projection whose head size morphkit cannot update on resize
    (no known attribute) is fixed: resizing would change the head count silently.
    """
    for a in attns:
        keys = {f"{_key(_key(a.name, p), 'weight')}" for p in a.projections}
        for d in drafts:
            if not any((k, 0) in d.entries for k in keys):
                continue
            d.constraints.append((a.head_size, False, f"{a.name} ({a.heads} heads of {a.head_size})"))
            if a.size_attr is None:
                d.problems.append(f"{a.name}: attention without a head-size attribute morphkit can update")


def _attention_draft(name: str, attn: nn.Module) -> tuple[_Draft, set[tuple[int, str]]]:
    """Hand-built clique of an attention's inner dim; also the (id(module), side) pairs it owns."""
    qkv_mod, proj_mod, transposed = fused_attention(attn)
    a, _ = _fused_widths(qkv_mod, proj_mod, transposed)
    heads = attn.num_heads
    hd = a // heads
    qkv_name, proj_name = ("c_attn", "c_proj") if transposed else ("qkv", "proj")
    d = _Draft(size=a, label=f"{_key(name, qkv_name)} heads")
    owned: set[tuple[int, str]] = {(id(qkv_mod), "out"), (id(proj_mod), "in")}
    qkv, proj = _key(name, qkv_name), _key(name, proj_name)
    pairs = [(s * a + c, c) for s in range(3) for c in range(a)]  # q, k, v rows of channel c
    d.add(f"{qkv}.weight", 1 if transposed else 0, 3 * a, pairs)  # Conv1D weights are (in, out)
    if qkv_mod.bias is not None:
        d.add(f"{qkv}.bias", 0, 3 * a, pairs)
    d.add(f"{proj}.weight", 0 if transposed else 1, a, [(c, c) for c in range(a)])
    d.module(name)
    d.module(qkv)
    d.module(proj)
    d.constraints.append((hd, False, f"{name} ({heads} heads)"))
    for sub in ("q_norm", "k_norm", "norm", "gate"):
        mod = getattr(attn, sub, None)
        if not isinstance(mod, nn.Module) or isinstance(mod, nn.Identity):
            continue
        owned.add((id(mod), "out"))
        owned.add((id(mod), "in"))
        key = _key(name, sub)
        d.module(key)
        for pname, p in mod.named_parameters(recurse=False):
            if sub == "gate" and isinstance(mod, nn.Linear):
                if pname in ("weight", "bias"):
                    d.add(f"{key}.{pname}", 0, a, [(c, c) for c in range(a)])
                continue
            if p.dim() == 1 and p.shape[0] == a:
                d.add(f"{key}.{pname}", 0, a, [(c, c) for c in range(a)])
            elif p.dim() == 1 and p.shape[0] == hd and sub in ("q_norm", "k_norm"):
                d.add(f"{key}.{pname}", 0, hd, [(j, j) for j in range(hd)])
                d.constraints.append((hd, True, f"{key} (normalises one head)"))
            else:
                d.problems.append(f"{key}.{pname} of shape {tuple(p.shape)} in attention {name}")
    for pname, p in attn.named_parameters(recurse=False):  # e.g. BEiT's q_bias / v_bias
        owned.add((id(p), "param"))
        if p.dim() == 1 and p.shape[0] == a:
            d.add(_key(name, pname), 0, a, [(c, c) for c in range(a)])
        elif heads > 1 and heads in p.shape and a not in p.shape and (hd == heads or hd not in p.shape):
            continue  # one value per head (Swin's relative position bias, a logit scale): heads are kept
        else:
            d.problems.append(f"{_key(name, pname)} of shape {tuple(p.shape)} in attention {name}")
    return d, owned


def _convert_item(d: _Draft, item: Any, dg: Any, h: dict[str, Any], names: dict[int, str],
                  input_ids: set[int], out_gfs: set[Any], owned: set[tuple[int, str]]) -> bool:
    """Add one torch-pruning group item to a draft; False when an attention owns it."""
    from torch_pruning import ops

    node, handler = item.dep.target, item.dep.handler
    module = node.module
    idxs = [int(i) for i in item.idxs]
    roots = list(item.root_idxs)
    if any(r is None for r in roots):
        d.problems.append(f"{names.get(id(module), type(module).__name__)}: untracked channel mapping")
        return True
    pairs = list(zip(idxs, (int(r) for r in roots)))
    in_side = handler in (h["conv_in"], h["lin_in"], h.get("t_lin_in"))
    if isinstance(module, ops._OutputOp) or (not in_side and node.grad_fn is not None
                                              and node.grad_fn in out_gfs):
        d.touches_output.append(names.get(id(module), "output"))
    if isinstance(module, nn.Parameter):
        if id(module) in input_ids:
            d.touches_input = True
            return True
        if (id(module), "param") in owned:
            return False
        key = dg._param_to_name.get(module)
        if key is None:
            return True
        dim = node.pruning_dim % module.dim()
        d.add(key, dim, module.shape[dim], pairs)
        d.module(key)
        return True
    if not isinstance(module, nn.Module) or type(module).__module__.startswith("torch_pruning"):
        return True  # elementwise / reshape / concat / split ... nodes carry no tensors
    name = names.get(id(module), "")
    side = "in" if in_side else "out"
    if (id(module), side) in owned:
        return False
    d.module(name)

    def add(attr: str, dim: int, prs: list[tuple[int, int]] | None = None) -> None:
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            d.add(_key(name, attr), dim, t.shape[dim], pairs if prs is None else prs)

    if isinstance(module, nn.modules.conv._ConvNd):
        g = module.groups
        if handler == h["dw"]:
            if not (module.in_channels == module.out_channels == g):
                d.problems.append(f"{name}: grouped conv with a channel multiplier ({module.in_channels} -> "
                                  f"{module.out_channels}, groups={g})")
            add("weight", 0)
            add("bias", 0)
        elif handler == h["conv_out"]:
            if module.transposed and g > 1:
                d.problems.append(f"{name}: grouped transposed conv")
            add("weight", 1 if module.transposed else 0)
            add("bias", 0)
            if g > 1:
                d.constraints.append((module.out_channels // g, False, f"{name} (groups={g})"))
        elif handler == h["conv_in"]:
            if module.transposed:
                if g > 1:
                    d.problems.append(f"{name}: grouped transposed conv")
                add("weight", 0)
            elif g == 1:
                add("weight", 1)
            else:
                b = module.in_channels // g
                if b == 1:
                    d.problems.append(f"{name}: feeds a grouped conv with one input channel per group")
                elif any(p != r for p, r in pairs):
                    d.problems.append(f"{name}: grouped conv input not aligned with its producer")
                d.add(_key(name, "weight"), 1, b, [(p, r) for p, r in pairs if p < b])
                d.constraints.append((b, True, f"{name} (groups={g}, shared input columns)"))
        return True
    if isinstance(module, nn.Linear):
        if handler == h["lin_out"]:
            add("weight", 0)
            add("bias", 0)
        else:
            add("weight", 1)
        return True
    if is_transposed_linear(module):  # weight (in, out)
        if handler == h.get("t_lin_out"):
            add("weight", 1)
            add("bias", 0)
        else:
            add("weight", 0)
        return True
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            add(attr, 0)
        return True
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            d.problems.append(f"{name}: LayerNorm over {len(module.normalized_shape)} dims")
        add("weight", 0)
        add("bias", 0)
        return True
    if isinstance(module, nn.GroupNorm):
        add("weight", 0)
        add("bias", 0)
        if module.num_groups > 1:
            d.constraints.append((module.num_channels // module.num_groups, False,
                                  f"{name} (GroupNorm, {module.num_groups} groups)"))
        return True
    if isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            add("weight", 0)
        return True
    if isinstance(module, nn.Embedding):
        add("weight", 1)
        return True
    if isinstance(module, nn.MultiheadAttention):
        _add_multihead_attention(d, name, module, pairs)
        return True
    d.problems.append(f"{name}: {type(module).__name__} cannot be resized by morphkit")
    return True


def _add_multihead_attention(d: _Draft, name: str, m: nn.MultiheadAttention, pairs: list[tuple[int, int]]) -> None:
    """``nn.MultiheadAttention`` in the clique of its ``embed_dim`` (the residual stream it reads and writes).

    Its q / k / v width and its output width are both ``embed_dim``, so the
    attention's inner channels resize with the stream: inner channel ``c``
    (rows ``c``, ``E + c``, ``2E + c`` of ``in_proj_weight``, column ``c`` of
    ``out_proj``) moves with stream channel ``c``, and the clique permutes
    within heads (``head_dim`` blocks); resizing keeps ``num_heads`` and shrinks
    ``head_dim``. Separate ``kdim`` / ``vdim`` projections are not handled.
    """
    e, heads = m.embed_dim, m.num_heads
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        d.problems.append(f"{name}: MultiheadAttention with separate kdim / vdim projections")
        return
    d.module(name)
    d.module(_key(name, "out_proj"))
    rows = [(s * e + p, r) for s in range(3) for p, r in pairs]  # q, k, v rows of one channel
    d.add(_key(name, "in_proj_weight"), 0, 3 * e, rows)
    d.add(_key(name, "in_proj_weight"), 1, e, pairs)
    if m.in_proj_bias is not None:
        d.add(_key(name, "in_proj_bias"), 0, 3 * e, rows)
    d.add(_key(name, "out_proj.weight"), 0, e, pairs)
    d.add(_key(name, "out_proj.weight"), 1, e, pairs)
    if m.out_proj.bias is not None:
        d.add(_key(name, "out_proj.bias"), 0, e, pairs)
    for attr in ("bias_k", "bias_v"):  # (1, 1, E)
        if getattr(m, attr, None) is not None:
            d.add(_key(name, attr), 2, e, pairs)
    d.constraints.append((m.head_dim, False, f"{name} ({heads} heads of {m.head_dim}, nn.MultiheadAttention)"))


def _finish(d: _Draft) -> list[Clique]:
    """Turn a draft into cliques (members, block, fixed reasons).

    A group fed by ``torch.cat`` has producers that each see only their own
    segment of the channels; such a group is split into one clique per
    segment, the shared consumers indexing each segment with ``-1`` elsewhere.
    """
    reasons = list(d.problems)
    idxs: dict[tuple[str, int], np.ndarray] = {}
    for (key, dim), slot in sorted(d.entries.items()):
        if not slot:
            continue
        length = d.lengths[(key, dim)]
        idx = np.full(length, -1, dtype=np.int64)
        for pos, ch in slot.items():
            if 0 <= pos < length and 0 <= ch < d.size:
                idx[pos] = ch
            else:
                reasons.append(f"{key}[{dim}] maps outside the tensor")
        idxs[(key, dim)] = idx
    if not idxs:
        return []
    block, tied = 1, False
    if d.constraints:
        block = 0
        for b, _t, _s in d.constraints:
            block = math.gcd(block, b)
        tied = any(t for _b, t, _s in d.constraints)
        for b, t, src in d.constraints:
            if t and b != block:
                reasons.append(f"{src} needs one shared permutation per block of {b}, "
                               f"incompatible with blocks of {block}")
        if block < 1 or d.size % block:
            reasons.append(f"blocks of {block} do not divide {d.size} channels")
            block = 1
    if block == 1:
        tied = False
    # which channels each member sees: all, the first block (tied), or a segment
    segments: dict[tuple[int, ...], list[tuple[str, int]]] = {}
    for key, idx in idxs.items():
        chans = np.unique(idx[idx >= 0])
        if chans.size == d.size or (tied and chans.size == block and (chans == np.arange(block)).all()):
            continue
        segments.setdefault(tuple(int(c) for c in chans), []).append(key)
    if segments:
        seen = np.zeros(d.size, dtype=np.int64)
        for seg in segments:
            seen[list(seg)] += 1
        if d.constraints or not (seen == 1).all():
            for seg, keys in segments.items():
                reasons.append(f"{keys[0][0]}[{keys[0][1]}] sees only {len(seg)} of the {d.size} channels "
                               "(split or slice)")
        else:  # a concatenation: one clique per segment
            out = []
            for seg in sorted(segments, key=lambda sg: sg[0]):
                renum = np.full(d.size, -1, dtype=np.int64)
                renum[list(seg)] = np.arange(len(seg))
                sub = {}
                for key, idx in idxs.items():
                    new = np.where(idx >= 0, renum[np.maximum(idx, 0)], -1)
                    if (new >= 0).any():
                        sub[key] = new
                out.append(_make_clique(d, len(seg), sub, 1, False, reasons))
            return out
    return [_make_clique(d, d.size, idxs, block, tied, reasons)]


def _make_clique(d: _Draft, size: int, idxs: dict[tuple[str, int], np.ndarray], block: int, tied: bool,
                 reasons: list[str]) -> Clique:
    reasons = list(reasons)
    members = []
    for (key, dim), idx in idxs.items():
        ident = idx.size == size and (idx == np.arange(size)).all()
        members.append(Member(key, dim, None if ident else tuple(int(i) for i in idx)))
        try:
            _channel_table(idx, size)
        except ValueError as e:
            reasons.append(f"{key}[{dim}]: {e}")
    fixed_reason = []
    if d.touches_input:
        fixed_reason.append("model input")
    if d.touches_output:
        names = [n for n in dict.fromkeys(d.touches_output) if n != "output"]
        fixed_reason.append("model output" + (f" ({', '.join(names)})" if names else ""))
    if d.fixed_reason:
        fixed_reason.append(d.fixed_reason)
    if reasons:
        uniq = list(dict.fromkeys(reasons))
        fixed_reason.append("unsupported: " + "; ".join(uniq[:3]) + (" ..." if len(uniq) > 3 else ""))
        logger.warning("clique %s (%d channels) is fixed: %s", d.label, size, "; ".join(uniq))
    modules = [m for m in d.modules if any(k == m or k.startswith(m + ".") for k, _ in idxs)
               or not any(k.startswith(m + ".") for k, _ in d.entries)]
    return Clique(id=-1, size=size, members=members, fixed=bool(fixed_reason),
                  reason="; ".join(fixed_reason), block=block, modules=modules, tied=tied)


def check_model(model: nn.Module) -> None:
    """Refuse, up front and by name, models morphkit cannot analyse or morph.

    Raises:
        UnsupportedModelError: not an ``nn.Module``; parameters on the meta
            device (no values); half-precision (float16 / bfloat16) parameters
            (convert with ``model.float()`` and the sampled models back with
            ``.half()`` / ``.bfloat16()``); one parameter tied to two names (a
            shared tensor cannot be resized for one layer alone); NaN or inf
            weights.

    Example:
        >>> check_model(nn.Linear(2, 2).half())
        Traceback (most recent call last):
        ...
        morphkit.errors.UnsupportedModelError: the model's parameters are torch.float16 ...
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be an nn.Module, got {type(model).__name__}")
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    meta = [n for n, t in tensors if t.is_meta]
    if meta:
        raise UnsupportedModelError(f"the model's tensors are on the meta device (e.g. {meta[0]!r}): they hold no "
                                    "values to morph; build or load the model on the CPU (or call "
                                    "model.to_empty(device='cpu') and load its weights) first")
    half = [(n, t.dtype) for n, t in tensors if t.dtype in (torch.float16, torch.bfloat16)]
    if half:
        n, dt = half[0]
        raise UnsupportedModelError(f"the model's parameters are {dt} (e.g. {n!r}); morphkit analyses and morphs "
                                    "float32 models: pass model.float(), then convert the sampled models back "
                                    f"with .to({dt})")
    seen: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise UnsupportedModelError(f"parameters {seen[id(p)]!r} and {n!r} are one tied tensor; morphkit "
                                        "resizes each layer's tensors on their own and cannot keep a tie: untie "
                                        f"them before morphing (model.{n} = nn.Parameter(model.{n}.detach().clone()))")
        seen[id(p)] = n
    for n, t in tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UnsupportedModelError(f"the model's weights are not finite: {n!r} holds {bad} NaN/inf values; "
                                        "morph a trained model with finite weights (did its training diverge, "
                                        "or is its file corrupt?)")


def find_cliques(model: nn.Module, example_inputs: Any, *, check: bool = True,
                 unwrapped_parameters: dict[str, int] | None = None) -> CliqueList:
    """Find every clique (coupled channel group) of a model.

    Args:
        model: Any ``nn.Module``; it is not modified (the analysis runs on a copy).
        example_inputs: A tensor or tuple of tensors for ``model(*inputs)``.
        check: Verify every resizable clique on the model (a random permutation
            keeps the output, half width still runs) and fix the ones that fail.
        unwrapped_parameters: ``{parameter name: dim}`` for bare ``nn.Parameter``
            used outside standard layers whose channel dim is not the last
            non-singleton one (torch-pruning's default guess).

    Returns:
        The cliques, ids ``0..n-1`` in order of first appearance in
        ``model.state_dict()``; input, output and unsupported groups are
        ``fixed`` with a ``reason``.

    Raises:
        UnsupportedModelError: when the model cannot be traced with these inputs,
            or is one morphkit refuses up front (:func:`check_model`: meta
            device, half precision, tied parameters, NaN weights).

    Example:
        >>> from morphkit.models import build_model
        >>> cs = find_cliques(build_model("lenet5"), torch.zeros(1, 1, 28, 28))
        >>> [(c.size, c.fixed) for c in cs]
        [(1, True), (6, False), (16, False), (120, False), (84, False), (10, True)]
    """
    check_model(model)
    inputs = as_inputs(example_inputs)
    key_pos = {k: i for i, k in enumerate(model.state_dict())}
    with _eval_mode(model, grads=True):
        cliques = _trace_cliques(model, inputs, unwrapped_parameters)

    def order_key(c: Clique) -> tuple[int, int]:
        return min((key_pos.get(m.name, len(key_pos)), -m.dim) for m in c.members)

    cliques.sort(key=order_key)
    for i, c in enumerate(cliques):
        c.id = i
        c.members.sort(key=lambda m: (key_pos.get(m.name, len(key_pos)), m.dim))
    if check:
        problems = validate_cliques(model, inputs, cliques)
        for cid, why in problems.items():
            c = cliques[cid]
            c.fixed = True
            c.reason = f"failed check: {why}"
            logger.warning("clique %d (%d channels: %s) is fixed: %s", c.id, c.size,
                           ", ".join(c.modules[:3]), why)
    return CliqueList(cliques)  # a list that prints as a table


def _trace_cliques(work: nn.Module, inputs: tuple[Any, ...],
                   unwrapped_parameters: dict[str, int] | None) -> list[Clique]:
    """Trace the model (in eval mode, parameters requiring grad) and build its cliques."""
    import torch_pruning as tp


    # the inputs become parameters so that groups touching them are visible
    traced, input_params = [], []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2 and t.dim() != 3:
            p = nn.Parameter(t.detach().clone())
            input_params.append(p)
            traced.append(p)
        else:
            traced.append(t)
    out_gfs: set[Any] = set()

    def capture(out: Any) -> list[torch.Tensor]:
        # only the output tensors: torch-pruning cannot walk other containers (a transformers cache)
        tensors = [o for o in _flatten_tensors(out) if o.grad_fn is not None]
        out_gfs.update(o.grad_fn for o in tensors)
        return tensors

    unwrapped = [(p, 1) for p in input_params]
    if unwrapped_parameters:
        params = dict(work.named_parameters())
        for pname, dim in unwrapped_parameters.items():
            if pname not in params:
                raise ConfigError(f"unwrapped_parameters names {pname!r}, which is not a parameter of the "
                                  f"model; expected one of {sorted(params)[:8]}...")
            unwrapped.append((params[pname], int(dim)))
    dg = tp.DependencyGraph()
    t_lin = transposed_linear_type()
    customized = {}
    if t_lin is not None and any(isinstance(m, t_lin) for m in work.modules()):
        customized[t_lin] = _transposed_linear_pruner()
    try:
        with torch.enable_grad(), warnings.catch_warnings(), _safe_concat():
            warnings.simplefilter("ignore")
            dg.build_dependency(work, example_inputs=tuple(traced), output_transform=capture,
                                unwrapped_parameters=unwrapped, customized_pruners=customized, verbose=False)
    except Exception as e:  # tracing runs arbitrary user code
        shapes = [tuple(getattr(t, "shape", ())) for t in inputs]
        try:
            with torch.no_grad():
                work(*inputs)
        except Exception as fwd:  # noqa: BLE001 - the model itself rejects these inputs
            raise UnsupportedModelError(
                f"{type(work).__name__}'s forward fails on example_inputs of shapes {shapes} "
                f"({type(fwd).__name__}: {_first_line(fwd)}); pass inputs the model accepts, e.g. a batch "
                "shaped like its training data") from fwd
        raise UnsupportedModelError(f"cannot trace {type(work).__name__} with inputs of shapes {shapes} "
                                    f"({type(e).__name__}: {_first_line(e)}); its forward runs, but "
                                    "torch-pruning's tracer cannot follow it") from e
    names = {id(m): n for n, m in work.named_modules()}
    h = _tp_handlers()
    for pruner in customized.values():
        h["t_lin_out"], h["t_lin_in"] = pruner.prune_out_channels, pruner.prune_in_channels
    input_ids = {id(p) for p in input_params}

    attns = _attention_modules(work)
    drafts: list[_Draft] = []
    owned: set[tuple[int, str]] = set()
    for aname, attn in attns.items():
        d, own = _attention_draft(aname, attn)
        drafts.append(d)
        owned |= own

    roots = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.modules.batchnorm._BatchNorm,
             nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU, *customized)
    truncated: dict[int, int] = {}  # id(group) -> index lists it cut short
    with warnings.catch_warnings(), _capped_flatten() as cut, _fast_merge(), _mappings_built(), \
            _bounded_groups():
        warnings.simplefilter("ignore")
        plain_group = dg.get_pruning_group

        def get_pruning_group(*args: Any, **kwargs: Any) -> Any:  # tag the groups whose expansion was cut
            before = cut[0]
            cut[1] = 0  # this walk's index volume through the mappings
            try:
                try:
                    group = plain_group(*args, **kwargs)
                except _Truncated:  # again without following any index mapping: a shallow group, fixed below
                    cut[2] = 1
                    try:
                        group = plain_group(*args, **kwargs)
                    finally:
                        cut[2] = 0
                    cut[0] += 1
            except _Diverged as e:
                root = args[0] if args else kwargs.get("module")
                raise UnsupportedModelError(
                    f"torch-pruning's dependency walk from {names.get(id(root), type(root).__name__)} did not "
                    f"converge (more than {MAX_GROUP_ITEMS:,} dependencies; index mappings that keep producing "
                    "new channel sets, e.g. rotary embeddings or repeated key/value heads); this model is not "
                    "supported yet") from e
            if cut[0] > before:
                truncated[id(group)] = cut[0] - before
            return group

        dg.get_pruning_group = get_pruning_group  # get_all_groups calls it once per root
        try:
            groups = list(dg.get_all_groups(root_module_types=roots))
        finally:
            del dg.get_pruning_group
    for g in groups:
        root = g[0].dep.target.module
        d = _Draft(size=len(g[0].idxs), label=f"{names.get(id(root), type(root).__name__)} out")
        if id(g) in truncated:
            d.problems.append(f"its channels are flattened into more than {MAX_TRACE_INDICES:,} positions, or "
                              f"its dependency walk maps more than {MAX_WALK_INDICES:,} indices (torch-pruning's "
                              "index expansion; not traced further)")
        for item in g:
            _convert_item(d, item, dg, h, names, input_ids, out_gfs, owned)
        if d.entries:
            drafts.append(d)
        elif d.touches_output or d.problems:
            logger.debug("group rooted at %s carries no tensor; ignored", d.label)

    # groups rooted at the model inputs
    for p in input_params:
        pruner = dg.get_pruner_of_module(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = dg.get_pruning_group(p, pruner.prune_out_channels, list(range(p.shape[1])))
        d = _Draft(size=p.shape[1], label="model input")
        for item in g:
            _convert_item(d, item, dg, h, names, input_ids, out_gfs, owned)
        d.touches_input = True
        clash = [o for o in drafts if set(o.entries) & set(d.entries)]
        for o in clash:
            o.touches_input = True
        if d.entries and not clash:
            drafts.append(d)

    _drop_partial(drafts)
    _constrain_heads(drafts, _head_attention_modules(work, attns))
    cliques = [c for d in drafts for c in _finish(d)]
    cliques += _uncovered(dg, cliques, names)
    return cliques


#: An index list a flatten would expand past this length is cut (and its group fixed): torch-pruning
#: expands every index of a flattened channel into its positions, and chained flattens in windowed
#: attention (torchvision swin_t) made 45 million index objects and 150 s of tracing.
MAX_TRACE_INDICES = 1 << 18
#: Indices one dependency walk may pass through torch-pruning's index mappings (flatten, split,
#: concat), in and out, in all; past it the walk is redone without following any mapping (its group
#: then holds only the direct dependencies and is fixed). torchvision maxvit_t's grid attention
#: carries lists of about 100,000 positions through thousands of items of one group (tracing ran
#: past 10 minutes); a convolution flattened into a linear layer passes its positions a few times.
MAX_WALK_INDICES = 1 << 21


class _Truncated(RuntimeError):
    """A torch-pruning dependency walk passed ``MAX_WALK_INDICES`` through index mappings."""


@contextlib.contextmanager
def _capped_flatten() -> Iterator[list[int]]:
    """Within the block, torch-pruning's index mappings are bounded and built faster.

    A flatten returns no index instead of more than ``MAX_TRACE_INDICES``; a
    walk that passes ``MAX_WALK_INDICES`` through the mappings raises
    ``_Truncated``; while the third entry of the yielded list is set, every
    mapping returns no index (a shallow walk). The indices are the ones
    torch-pruning builds, in the same order, made with ``tuple.__new__``
    rather than the namedtuple's keyword constructor (half the cost per
    index). Yields ``[count of the lists cut so far, indices of this walk,
    shallow]`` (the caller resets the second at each walk).
    """
    from torch_pruning.dependency import index_mapping as im

    hybrid = im._helpers._HybridIndex
    new = tuple.__new__
    cut = [0, 0, 0]

    def over(idxs: Any, out: int) -> bool:
        if cut[2]:
            cut[0] += 1
            return True
        cut[1] += len(idxs) + out
        if cut[1] > MAX_WALK_INDICES:
            raise _Truncated(cut[1])
        if out > MAX_TRACE_INDICES:
            cut[0] += 1
            return True
        return False

    def flatten(self: Any, idxs: Any) -> Any:
        s = self._stride
        if self.reverse:
            return [] if over(idxs, len(idxs)) else list({new(hybrid, (i[0] // s, i[1])) for i in idxs})
        if over(idxs, len(idxs) * s):
            return []
        return [new(hybrid, (k, i[1])) for i in idxs for k in range(i[0] * s, (i[0] + 1) * s)]

    def split(self: Any, idxs: Any) -> Any:  # torch-pruning's split and concat mappings: shift or select
        if over(idxs, len(idxs)):
            return []
        a, b = self.offset[0], self.offset[1]
        if self.reverse == (type(self) is im._SplitIndexMapping):  # split reversed, concat forward: shift
            return [new(hybrid, (i[0] + a, i[1])) for i in idxs]
        return [new(hybrid, (i[0] - a, i[1])) for i in idxs if a <= i[0] < b]

    patched = {im._FlattenIndexMapping: flatten, im._SplitIndexMapping: split, im._ConcatIndexMapping: split}
    plain = {cls: cls.__call__ for cls in patched}
    for cls, fn in patched.items():
        cls.__call__ = fn
    try:
        yield cut
    finally:
        for cls, fn in plain.items():
            cls.__call__ = fn


#: A dependency group with more items than this is a walk that does not converge (the largest real
#: groups seen, in torchvision swin_t's windowed attention, hold about 4,200 items).
MAX_GROUP_ITEMS = 1 << 14


class _Diverged(RuntimeError):
    """A torch-pruning dependency walk grew past ``MAX_GROUP_ITEMS``."""


@contextlib.contextmanager
def _bounded_groups() -> Iterator[None]:
    """Within the block, a torch-pruning group that grows past ``MAX_GROUP_ITEMS`` raises ``_Diverged``.

    torch-pruning revisits a node whenever it arrives with a channel set it has
    not seen there; index mappings that keep producing new sets (Llama's
    rotary halves with grouped key/value heads) make the walk run for hours.
    """
    from torch_pruning.dependency.group import Group

    plain_add, plain_has = Group.add_dep, Group.has_pruning_op

    def add_dep(self: Any, dep: Any, idxs: Any) -> None:
        if len(self._group) >= MAX_GROUP_ITEMS:
            raise _Diverged(len(self._group))
        self.__dict__.setdefault("_mk_ops", set()).add((id(dep.target), dep.handler, tuple(idxs)))
        plain_add(self, dep, idxs)

    def has_pruning_op(self: Any, dep: Any, idxs: Any) -> bool:  # a set lookup, not a scan of the group
        ops = self.__dict__.get("_mk_ops")
        if ops is None or len(ops) != len(self._group):  # items added some other way: the original scan
            return plain_has(self, dep, idxs)
        return (id(dep.target), dep.handler, tuple(idxs)) in ops

    Group.add_dep, Group.has_pruning_op = add_dep, has_pruning_op
    try:
        yield
    finally:
        Group.add_dep, Group.has_pruning_op = plain_add, plain_has


@contextlib.contextmanager
def _safe_concat() -> Iterator[None]:
    """Within the block, a concatenation with an input of unknown channels gets no index mapping.

    torch-pruning sums the inputs' channel counts before it checks them for
    None (an input no layer produces, such as an empty key cache that
    transformers' attention concatenates with the new keys) and raises a
    TypeError; it means to leave such a concatenation unmapped, as it does
    when the sum does not match. Its groups are then checked like any other.
    """
    from torch_pruning.dependency import index_mapping, shape_infer

    plain = index_mapping.update_concat_index_mapping

    def update(graph: Any, cat_node: Any) -> Any:
        if cat_node.type == index_mapping.ops.OPTYPE.CONCAT and cat_node.module.concat_sizes is None:
            # inferred once here; torch-pruning reads them back instead of inferring again
            cat_node.module.concat_sizes = [shape_infer.infer_channels_between(graph, n, cat_node)
                                            for n in cat_node.inputs]
        if cat_node.type == index_mapping.ops.OPTYPE.CONCAT and None in cat_node.module.concat_sizes:
            return None
        return plain(graph, cat_node)

    index_mapping.update_concat_index_mapping = update
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = plain


@contextlib.contextmanager
def _fast_merge() -> Iterator[None]:
    """Within the block, torch-pruning's ``Group.add_and_merge`` in linear time per call.

    The original rescans the group and re-deduplicates every index it already
    holds on each merge, quadratic in a group's index count: 55 of swin_t's
    tracing seconds. This keeps, per group, the item of each (target, handler)
    and the set of indices it holds, and appends only the new ones; the merged
    lists are the same, in the same order.
    """
    from torch_pruning.dependency.group import Group, _helpers

    plain = Group.add_and_merge

    def add_and_merge(self: Any, dep: Any, idxs: Any) -> None:
        where = self.__dict__.setdefault("_mk_where", {})  # (target, handler) -> item position
        seen = self.__dict__.setdefault("_mk_seen", {})  # item position -> idx values it holds
        key = (id(dep.target), dep.handler)
        i = where.get(key)
        if i is None or i >= len(self._group) or self._group[i].dep.target is not dep.target:
            i = next((j for j, (d, _) in enumerate(self._group)
                      if d.target == dep.target and d.handler == dep.handler), None)
            if i is None:  # a new item: its own indices deduplicated on the next merge, as before
                self.add_dep(dep, idxs)
                where[key] = len(self._group) - 1
                return
            where[key] = i
            seen.pop(i, None)
        item = self._group[i]
        held = seen.get(i)
        if held is None:  # first merge into this item: deduplicate what it holds
            held, kept = set(), []
            for index in item.idxs:
                if index.idx not in held:
                    held.add(index.idx)
                    kept.append(index)
        else:
            kept = list(item.idxs)
        for index in idxs:
            if index.idx not in held:
                held.add(index.idx)
                kept.append(index)
        seen[i] = held
        self._group[i] = _helpers.GroupItem(dep=item.dep, idxs=kept)

    Group.add_and_merge = add_and_merge
    try:
        yield
    finally:
        Group.add_and_merge = plain


@contextlib.contextmanager
def _mappings_built() -> Iterator[None]:
    """Within the block, ``get_pruning_group`` does not rebuild the graph's index mappings.

    ``build_dependency`` builds them; torch-pruning rebuilds them on every
    group query in case the model was pruned in between, which it is not here
    (swin_t: 18 rebuilds, ~10 s).
    """
    from torch_pruning.dependency import index_mapping

    plain = index_mapping.update_index_mapping
    index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        index_mapping.update_index_mapping = plain


def _drop_partial(drafts: list[_Draft]) -> None:
    """Drop members that cover a dim only partly when no other clique covers the rest.

    torch-pruning treats transposes and channel-reducing ops as elementwise, so a
    group can wander onto a dim of another axis (a token-mixing linear, a layer
    after ``x.mean(1)``); such a dim is then covered partly (or out of range).
    A dim shared by a concatenation is covered fully by its cliques together.
    """
    cover: dict[tuple[str, int], set[int]] = {}
    for d in drafts:
        for key, slot in d.entries.items():
            cover.setdefault(key, set()).update(p for p in slot if 0 <= p < d.lengths[key])
    for d in drafts:
        for key in list(d.entries):
            length = d.lengths[key]
            slot = d.entries[key]
            full = len(cover[key]) == length
            if not full or any(not 0 <= p < length for p in slot):
                logger.debug("clique %s: dropping %s[%d] (covers %d/%d positions; another axis)",
                             d.label, key[0], key[1], len(slot), length)
                del d.entries[key]


def _uncovered(dg: Any, cliques: list[Clique], names: dict[int, str]) -> list[Clique]:
    """Fixed cliques for conv/linear channel dims no group reaches (inputs, other axes)."""
    covered = {(m.name, m.dim) for c in cliques for m in c.members}
    out = []
    for module in dg.module2node:
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not is_transposed_linear(module):
            continue
        name = names.get(id(module), "")
        w = _key(name, "weight")
        transposed = getattr(module, "transposed", False) or is_transposed_linear(module)
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        groups = getattr(module, "groups", 1)
        for dim, side in ((in_dim, "in"), (out_dim, "out")):
            if (w, dim) in covered or module.weight.dim() <= dim:
                continue
            if side == "in" and groups > 1 and groups == getattr(module, "in_channels", 0):
                continue  # depthwise: one input channel per group, indexed by the output dim
            size = module.weight.shape[dim]
            members = [Member(w, dim)]
            if side == "out" and module.bias is not None and (_key(name, "bias"), 0) not in covered:
                members.append(Member(_key(name, "bias"), 0))
            why = ("input dim not produced by any layer (model input, or a token/spatial axis)" if side == "in"
                   else "output dim not a channel axis (e.g. token mixing)")
            if side == "in" and groups > 1:
                why = "grouped conv input not produced by any layer"
            out.append(Clique(id=-1, size=size, members=members, fixed=True, reason=why, modules=[name]))
            covered.update((m.name, m.dim) for m in members)
    return out


# --------------------------------------------------------------------------- #
# validation                                                                   #
# --------------------------------------------------------------------------- #


def _perturbed_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with noise on 1-D and constant tensors.

    Norm scales, biases, layer-scale gammas and zero-initialised weights are
    what can hide a branch (timm zero-initialises the last BN of each residual
    block); the noise makes every branch count in the permutation check.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in model.state_dict().items():
        if not t.is_floating_point() or t.numel() == 0:
            out[k] = t
            continue
        if t.dim() > 1 and t.numel() > 1 and bool(t.amin() != t.amax()):
            out[k] = t
            continue
        noise = torch.rand(t.shape, generator=g, dtype=t.dtype).to(t.device)
        if k.endswith("running_var"):
            out[k] = t.abs() * (0.5 + noise) + 0.05
        else:
            scale = float(t.abs().mean()) + 0.05
            out[k] = t + scale * (noise - 0.5)
    return out


def validate_cliques(model: nn.Module, example_inputs: Any, cliques: Sequence[Clique], *,
                     seed: int = 0, resize: bool = True) -> dict[int, str]:
    """Check resizable cliques against the model itself; return the ones that fail.

    Two checks, on a copy with randomly perturbed weights: permuting a clique's
    channels (randomly, within its blocks) must leave the outputs unchanged,
    and resizing it to half width must still run. All cliques are tried at
    once; only when that fails is each one tried alone.

    Args:
        model: The model the cliques were found on (not modified).
        example_inputs: A tensor or tuple of tensors.
        cliques: Its cliques.
        seed: Seed of the perturbation and of the permutations.
        resize: Also check that half width runs.

    Returns:
        ``{clique_id: what failed}`` (empty when all pass).

    Example:
        >>> from morphkit.models import build_model
        >>> m = build_model("lenet5"); x = torch.zeros(1, 1, 28, 28)
        >>> validate_cliques(m, x, find_cliques(m, x, check=False))
        {}
    """
    inputs = as_inputs(example_inputs)
    cands = [c for c in cliques if not c.fixed and c.size > 1]
    if not cands:
        return {}
    with _eval_mode(model):
        return _validate(model, inputs, list(cliques), cands, seed, resize)


def _sharpened(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every attention's query and key projections scaled by ``SHARPEN``."""
    out = dict(state)

    def scale(key: str, rows: int | None = None) -> None:
        t = out.get(key)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.clone()
            t[: rows if rows is not None else t.shape[0]] *= SHARPEN
            out[key] = t

    fused = _attention_modules(model)
    for name, m in model.named_modules():
        if name in fused:
            qkv, proj, transposed = fused_attention(m)
            a, _ = _fused_widths(qkv, proj, transposed)
            if transposed:  # Conv1D weight (in, out): q and k columns
                key = _key(_key(name, "c_attn"), "weight")
                if isinstance(out.get(key), torch.Tensor):
                    out[key] = out[key].clone()
                    out[key][:, : 2 * a] *= SHARPEN
                scale(_key(_key(name, "c_attn"), "bias"), 2 * a)
                continue
            for attr in ("weight", "bias"):
                scale(_key(_key(name, "qkv"), attr), 2 * a)  # q and k rows
        elif isinstance(m, nn.MultiheadAttention):
            if m.in_proj_weight is not None:
                scale(_key(name, "in_proj_weight"), 2 * m.embed_dim)
            else:
                scale(_key(name, "q_proj_weight"))
                scale(_key(name, "k_proj_weight"))
        elif (info := head_attention(m, name)) is not None:
            for proj in info.projections[:2]:
                for attr in ("weight", "bias"):
                    scale(_key(_key(name, proj), attr))
    return out


def _as_double(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.double()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_as_double(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _as_double(v) for k, v in obj.items()}
    return obj


def _check_precision(work: nn.Module, state: dict[str, torch.Tensor], inputs: tuple[Any, ...]
                     ) -> tuple[dict[str, torch.Tensor], tuple[Any, ...], list[torch.Tensor], float] | None:
    """The permutation check's state, inputs, reference outputs and tolerance: float64 where the
    model runs in it with finite outputs, else float32; None when neither gives finite outputs."""
    for convert, rtol in ((_as_double, CHECK_RTOL), (lambda o: o, CHECK_RTOL_F32)):
        st, ins = convert(state), convert(inputs)
        try:
            ref = _functional_run(work, st, ins)
        except Exception:  # noqa: BLE001 - e.g. a float32 constant inside the forward
            continue
        if all(torch.isfinite(r).all() for r in ref if r.is_floating_point()):
            return st, ins, ref, rtol
    return None


def _validate(work: nn.Module, inputs: tuple[Any, ...], cliques: list[Clique], cands: list[Clique],
              seed: int, resize: bool) -> dict[int, str]:
    bad: dict[int, str] = {}
    plain = work.state_dict()
    setup = None
    for state in (_sharpened(work, _perturbed_state(work, seed)), plain):
        setup = _check_precision(work, state, inputs)
        if setup is not None:
            break
    if setup is None:  # no finite reference output: compare as floats anyway (inf never passes)
        setup = (plain, inputs, _functional_run(work, plain, inputs), CHECK_RTOL_F32)
    state, check_inputs, ref, rtol = setup
    perms = random_permutations(cands, seed)

    def perm_ok(subset: list[Clique]) -> bool:
        try:
            out = _functional_run(work, permute_state(state, subset, perms), check_inputs)
        except Exception:  # noqa: BLE001 - a failing forward is a failed check
            return False
        return _rel_diff(ref, out) <= rtol

    if not perm_ok(cands):
        for c in cands:
            if not perm_ok([c]):
                bad[c.id] = "permuting its channels changes the model's output"
    if resize:
        from morphkit.resize import _resize_unchecked

        rest = [c for c in cands if c.id not in bad]

        def resize_error(subset: list[Clique]) -> str | None:
            widths = {c.id: c.channels_for(0.5) for c in subset}
            try:
                small = _resize_unchecked(work, list(cliques), widths).eval()
                _run(small, inputs)
            except Exception as e:  # noqa: BLE001 - any failure means the clique cannot resize
                return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            return None

        if rest and resize_error(rest) is not None:
            for c in rest:
                err = resize_error([c])
                if err is not None:
                    bad[c.id] = f"resizing it breaks the forward pass ({err})"
    return bad


# --------------------------------------------------------------------------- #
# display                                                                      #
# --------------------------------------------------------------------------- #


def format_cliques(cliques: Sequence[Clique], *, max_members: int = 3) -> str:
    """A readable table of cliques (what ``morphkit cliques MODEL`` prints).

    Args:
        cliques: Cliques from :func:`find_cliques`.
        max_members: How many member tensors to name per clique.

    Returns:
        The table, one line per clique, and a summary line.

    Example:
        >>> print(format_cliques([Clique(0, 6, [Member("conv1.weight", 0)])]))  # doctest: +NORMALIZE_WHITESPACE
         id  size  block  members  status     tensors
          0     6      1        1  resizable  conv1.weight[0]
        1 cliques: 1 resizable (6 channels), 0 fixed
    """
    rows = [(" id", "size", "block", "members", "status", "tensors")]
    for c in cliques:
        shown = ", ".join(f"{m.name}[{m.dim}]" for m in c.members[:max_members])
        if len(c.members) > max_members:
            shown += f", ... (+{len(c.members) - max_members})"
        block = f"{c.block}{'t' if c.tied else ''}"
        status = f"fixed: {c.reason}" if c.fixed else "resizable"
        rows.append((f"{c.id:>3}", str(c.size), block, str(len(c.members)), status, shown))
    status_w = min(max(len(r[4]) for r in rows), 60)
    lines = []
    for r in rows:
        status = r[4] if len(r[4]) <= status_w else r[4][: status_w - 3] + "..."
        lines.append(f"{r[0]:>3}  {r[1]:>4}  {r[2]:>5}  {r[3]:>7}  {status:<{status_w}}  {r[5]}".rstrip())
    free = [c for c in cliques if not c.fixed]
    lines.append(f"{len(cliques)} cliques: {len(free)} resizable ({sum(c.size for c in free)} channels), "
                 f"{len(cliques) - len(free)} fixed")
    if any(c.tied for c in cliques):
        lines.append("block 'Nt': one permutation shared by every block of N channels")
    return "\n".join(lines)
