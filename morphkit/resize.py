"""Resize a model to a width map: a standard module of the same classes, new shapes.

:func:`resize` copies the model, keeps along every clique-indexed dim the
positions of the channels ``clique.kept(count)`` (the first ``count`` channels,
or the first ``count / n_blocks`` of every block; every position of a kept
channel, in order, so flattened feature maps and fused ``qkv`` rows stay
consistent), and then sets each layer's size attributes from its new tensors
(``in/out_channels`` and ``groups`` of convolutions, ``in/out_features``,
``num_features``, ``normalized_shape``, ``num_channels``, and the
``head_dim``/``attn_dim``/``scale`` of timm-style attention). Which channels
are kept only fixes the shapes: the values come from the INR. The result is an
ordinary ``nn.Module`` that runs, saves and loads like the base model, with
``morphkit_widths`` (the full width map) and ``morphkit_inputs`` (the
example inputs' shapes and dtypes) recorded on it, so that
``resize(base, inputs, model.morphkit_widths)`` rebuilds exactly its shapes,
also for a user's own model class that records no input shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from morphkit.clique import Clique, width_map
from morphkit.errors import UnsupportedModelError
from morphkit.graph import (
    _eval_mode,
    _run,
    as_inputs,
    copy_with,
    fused_attention,
    is_transposed_linear,
    keep_positions,
    light_copy_with,
)

__all__ = ["resize"]

logger = logging.getLogger(__name__)


#: Largest example input (elements) a model file records for load_model to trace with.
MAX_INPUT_RECORD = 1 << 26


def input_spec(example_inputs: Any) -> dict[str, list] | None:
    """Shapes and dtypes of example inputs (JSON-ready), or None when they cannot be recorded.

    A tensor larger than :func:`check_input_spec` accepts is recorded with a
    leading (batch) dim of 1; None when the inputs are not all tensors or
    are still too large, so that every record written can be read back.

    Example:
        >>> input_spec(torch.zeros(1, 3, 8, 8))
        {'shapes': [[1, 3, 8, 8]], 'dtypes': ['float32']}
    """
    inputs = as_inputs(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        return None
    shapes = [list(t.shape) if t.numel() <= MAX_INPUT_RECORD else [1, *t.shape[1:]] for t in inputs]
    spec = {"shapes": shapes, "dtypes": [str(t.dtype).removeprefix("torch.") for t in inputs]}
    try:
        check_input_spec(spec)
    except ValueError:
        return None
    return spec


def check_input_spec(spec: Any) -> None:
    """Check a record from :func:`input_spec` (read back from a file) without allocating anything.

    Raises:
        ValueError: ``spec`` is not 1 to 16 (shape, dtype) pairs of small positive shapes and torch dtypes.
    """
    shapes = spec.get("shapes") if isinstance(spec, dict) else None
    dtypes = spec.get("dtypes") if isinstance(spec, dict) else None
    ok = (isinstance(shapes, list) and isinstance(dtypes, list) and 1 <= len(shapes) == len(dtypes) <= 16
          and all(isinstance(s, list) and 1 <= len(s) <= 8
                  and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in s)
                  and math.prod(s) <= MAX_INPUT_RECORD for s in shapes)
          and all(isinstance(d, str) and isinstance(getattr(torch, d, None), torch.dtype) for d in dtypes))
    if not ok:
        raise ValueError(f"input record {spec!r:.200} is not 1 to 16 (shape, dtype) pairs of small positive "
                         "shapes and torch dtypes")


def inputs_from_spec(spec: Any) -> tuple[torch.Tensor, ...]:
    """Zero tensors of the shapes and dtypes :func:`input_spec` recorded (enough to trace and resize a model).

    Raises:
        ValueError: ``spec`` is malformed (:func:`check_input_spec`).

    Example:
        >>> inputs_from_spec({"shapes": [[1, 3, 8, 8]], "dtypes": ["float32"]})[0].shape
        torch.Size([1, 3, 8, 8])
    """
    check_input_spec(spec)
    return tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(spec["shapes"], spec["dtypes"]))


def resize(model: nn.Module, example_inputs: Any, width: float | dict[int, int],
           cliques: Sequence[Clique] | None = None, *, check: bool = False, round_to: int | None = None,
           light: bool = False) -> nn.Module:
    """Return a new model with its cliques resized.

    Args:
        model: The full-width model (not modified).
        example_inputs: A tensor or tuple of tensors (used to find the cliques
            when ``cliques`` is None, and for ``check``).
        width: A float in (0, 1]: every resizable clique keeps
            ``clique.channels_for(width)`` channels; or ``{clique_id: channels}``
            (missing ids stay full).
        cliques: The model's cliques (:func:`~morphkit.graph.find_cliques`);
            found here when None.
        check: Run a forward pass on ``example_inputs`` and raise if it fails.
        round_to: Every resizable clique's channel count a multiple of this
            where the clique allows (:func:`~morphkit.clique.width_map`).
        light: Build a structure, not a model: the plain attributes are the
            model's own objects (:func:`~morphkit.graph.light_copy_with`) and the
            resized tensors are zeros of the new shapes (the unchanged ones are
            shared). Many times faster; for templates morphkit fills with
            ``functional_call`` or ``load_state_dict`` and deep-copies before
            handing on.

    Returns:
        A new module of the same classes, with ``morphkit_widths`` =
        ``{clique_id: channels}`` for every clique, ``morphkit_cliques``
        (the cliques, recorded by ``save_model``), ``morphkit_inputs`` =
        ``{"shapes": [...], "dtypes": [...]}`` of the example inputs, and
        ``morphkit_arch`` copied from the model.

    Raises:
        ConfigError: a width <= 0, > 1, NaN, not a number; an unknown clique
            id; a count < 1 or > size; a fixed clique asked to change; a
            blocked clique's count that is not a multiple of its blocks.
        UnsupportedModelError: ``check`` and the resized model does not run.

    Example:
        >>> from morphkit.models import build_model
        >>> m = build_model("lenet5")
        >>> small = resize(m, torch.zeros(1, 1, 28, 28), 0.5)
        >>> small.conv1.out_channels, small.fc1.in_features, small(torch.zeros(2, 1, 28, 28)).shape
        (3, 200, torch.Size([2, 10]))
    """
    if cliques is None:
        from morphkit.graph import find_cliques

        cliques = find_cliques(model, example_inputs)
    cliques = list(cliques)
    widths = width_map(cliques, width, round_to)
    new = _resize_unchecked(model, cliques, widths, light=light)
    new.morphkit_widths = dict(widths)
    new.morphkit_cliques = cliques  # save_model records the changed ones: load_model then needs no trace
    new.morphkit_inputs = input_spec(example_inputs)
    if check:
        try:
            with _eval_mode(new):
                _run(new, as_inputs(example_inputs))
        except Exception as e:  # noqa: BLE001 - report any failure as unsupported
            raise UnsupportedModelError(
                f"the resized {type(model).__name__} does not run ({type(e).__name__}: {e}); "
                "run find_cliques with check=True to fix the cliques that cannot resize") from e
    return new


def _resize_unchecked(model: nn.Module, cliques: Sequence[Clique], widths: dict[int, int],
                      light: bool = False) -> nn.Module:
    """Resize without validating the width map (``widths`` may be partial; ``light``: see :func:`resize`)."""
    state = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    keep = keep_positions(cliques, widths, shapes)
    per_key: dict[str, list[tuple[int, Any]]] = {}
    for (key, dim), pos in keep.items():
        per_key.setdefault(key, []).append((dim, pos))
    sliced = {}
    for key, items in per_key.items():
        data = state[key].detach()
        if light:  # a structure: the shape is what counts, the values are filled in by the caller
            shape = list(data.shape)
            for dim, pos in items:
                shape[dim] = len(pos)
            sliced[key] = torch.zeros(shape, dtype=data.dtype, device=data.device)
            continue
        for dim, pos in sorted(items, key=lambda x: x[0]):
            data = data.index_select(dim, torch.as_tensor(pos, dtype=torch.long, device=data.device))
        sliced[key] = data.contiguous()
    new = light_copy_with(model, sliced) if light else copy_with(model, sliced)
    tensorless = _tensorless_sizes(new, cliques, widths)
    for name, module in new.named_modules():
        _fix_module(name, module, tensorless)
    _fix_width_attributes(new, cliques, widths)
    for module in new.modules():  # after the layers: attention reads its projections' new shapes
        _fix_attention(module)
    return new


#: Int attributes a module may reshape with that hold the width of a channel dim of its own tensors
#: (torchvision's ``VisionTransformer.hidden_dim``, beside its ``class_token``).
WIDTH_ATTRS = ("hidden_dim", "embed_dim", "d_model", "hidden_size")


def _fix_width_attributes(model: nn.Module, cliques: Sequence[Clique], widths: dict[int, int]) -> None:
    """Set ``WIDTH_ATTRS`` of a module that owns a tensor of a resized clique directly, where they held its size.

    Layers whose size attributes :func:`_fix_module` knows are left alone; a
    wrong guess cannot pass silently: ``find_cliques`` checks every clique
    resizes and runs.
    """
    mods = dict(model.named_modules())
    for c in cliques:
        new = int(widths.get(c.id, c.size))
        if new == c.size:
            continue
        owners = {m.name.rpartition(".")[0] for m in c.members}
        for owner in owners:
            mod = mods.get(owner)
            if mod is None or isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
                continue
            for attr in WIDTH_ATTRS:
                value = getattr(mod, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value == c.size:
                    setattr(mod, attr, new)


def _tensorless_sizes(model: nn.Module, cliques: Sequence[Clique], widths: dict[int, int]) -> dict[str, int]:
    """New channel counts of norm layers that hold no tensor (no affine, no running stats)."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm)
    out: dict[str, int] = {}
    mods = dict(model.named_modules())
    for c in cliques:
        for name in c.modules:
            m = mods.get(name)
            if isinstance(m, norms) and not _has_channel_tensor(m):
                out[name] = out.get(name, 0) + int(widths.get(c.id, c.size))
    return out


def _has_channel_tensor(m: nn.Module) -> bool:
    return (any(p is not None for p in m._parameters.values())
            or any(b is not None and b.dim() > 0 for b in m._buffers.values()))


def _fix_module(name: str, m: nn.Module, tensorless: dict[str, int]) -> None:
    """Set a layer's size attributes from its (resized) tensors."""
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        g = m.groups
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * g
        elif g > 1 and g == m.in_channels == m.out_channels:  # depthwise: one channel per group
            m.in_channels = m.out_channels = m.groups = w.shape[0]
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * g
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        t = m.weight if m.weight is not None else getattr(m, "running_mean", None)
        m.num_features = t.shape[0] if t is not None else tensorless.get(name, m.num_features)
    elif isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) == 1:
            n = m.weight.shape[0] if m.weight is not None else tensorless.get(name, m.normalized_shape[0])
            m.normalized_shape = (int(n),)
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = m.weight.shape[0] if m.weight is not None else tensorless.get(name, m.num_channels)
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.numel()
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = m.weight.shape
    elif is_transposed_linear(m):  # transformers' Conv1D: weight (in, out)
        m.nx, m.nf = m.weight.shape
    elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
        e = m.in_proj_weight.shape[1]  # the head count is kept, the head size follows
        m.embed_dim = m.kdim = m.vdim = e
        m.head_dim = e // m.num_heads


def _fix_attention(m: nn.Module) -> None:
    """Attention keeps its head count: the head size (and scale) follow the projections' new shapes.

    timm-style fused ``qkv``: ``head_dim``, ``attn_dim`` and ``scale``. Separate
    q/k/v projections (Hugging Face and the like, :func:`~morphkit.graph.head_attention`):
    the head-size attribute the forward reshapes with, ``all_head_size`` and
    ``scaling`` / ``scale`` when it was ``head_size ** -0.5``.
    """
    found = fused_attention(m, resized=True)
    heads = getattr(m, "num_heads", None)
    if found is None or heads <= 0:
        _fix_head_attention(m)
        return
    qkv, proj, transposed = found
    a, qkv_out = (proj.weight.shape[0], qkv.weight.shape[1]) if transposed else (proj.in_features, qkv.out_features)
    if a % heads or qkv_out != 3 * a:
        return
    hd = a // heads
    if transposed:  # GPT-2: splits q/k/v at split_size, reshapes with head_dim, scales by scaling
        old_hd = m.head_dim
        m.split_size, m.head_dim = a, hd
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, float) and old_hd != hd and math.isclose(scaling, old_hd ** -0.5, rel_tol=1e-6):
            m.scaling = hd ** -0.5
        return
    old_hd = getattr(m, "head_dim", None)
    if isinstance(old_hd, int) and old_hd != hd:
        scale = getattr(m, "scale", None)
        if isinstance(scale, float) and math.isclose(scale, old_hd ** -0.5, rel_tol=1e-6):
            m.scale = hd ** -0.5  # what scaled_dot_product_attention uses for this head size
        m.head_dim = hd
    if isinstance(getattr(m, "attn_dim", None), int):
        m.attn_dim = a


def _fix_head_attention(m: nn.Module) -> None:
    """Separate q/k/v projections: update the head size the forward reshapes with (head count kept)."""
    from morphkit.graph import HEAD_COUNT_ATTRS, HEAD_SIZE_ATTRS, QKV_NAMES, head_attention

    q = next((getattr(m, names[0]) for names in QKV_NAMES if isinstance(getattr(m, names[0], None), nn.Linear)), None)
    if q is None or head_attention(m) is not None:
        return  # not this kind of attention, or its head size already matches the projections
    heads = next((getattr(src, a) for src in (m, getattr(m, "config", None)) for a in HEAD_COUNT_ATTRS
                  if isinstance(getattr(src, a, None), int)), None)
    attr = next((a for a in HEAD_SIZE_ATTRS if isinstance(getattr(m, a, None), int)), None)
    if not heads or attr is None or q.out_features % heads:
        return
    old_hd, hd = getattr(m, attr), q.out_features // heads
    setattr(m, attr, hd)
    if isinstance(getattr(m, "all_head_size", None), int):
        m.all_head_size = q.out_features
    for name in ("scaling", "scale"):
        value = getattr(m, name, None)
        if isinstance(value, float) and math.isclose(value, old_hd ** -0.5, rel_tol=1e-6):
            setattr(m, name, hd ** -0.5)
