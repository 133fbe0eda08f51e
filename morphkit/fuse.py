"""Fold BatchNorm into the convolution or linear layer that feeds it (paper section 3.2).

:func:`fuse_bn` returns a copy of the model in which every BatchNorm that
*directly* follows a conv/linear layer has been folded into it: the layer's
weight is scaled by ``gamma / sqrt(var + eps)`` per output channel and the
affine shift ``(b - mean) * gamma / sqrt(var + eps) + beta`` moves into the
layer's bias. The BatchNorm module stays (same module tree, same
``state_dict`` keys, so files and width maps of fused and unfused models
line up) and becomes an exact identity in eval mode: weight 1, running mean 0
and running variance ``1 - eps`` rounded so that ``var + eps == 1`` exactly.

A conv created with ``bias=False`` has no bias to receive the shift, and
giving it one would change the keys (``load_model`` rebuilds the base and
loads strictly). The shift then stays in the BatchNorm's own ``bias``
(``running_mean = -shift`` when the BatchNorm has no affine parameters): the
BatchNorm is reduced to a per-channel bias, which the INR predicts like any
other bias. Layers and BatchNorms keep their classes and shapes.

"Directly follows" is decided by tracing one forward pass: the BatchNorm's
input must be the very tensor the layer returned (same autograd node, so an
in-place activation in between is seen), that tensor must have no other
consumer, each module must run once, and the BatchNorm must normalise the
layer's channel dim with running statistics. Without example inputs (and
without a ``morphkit_arch`` to make them), a ``torch.fx`` trace is used.
BatchNorms that cannot be folded (after an activation, in pre-activation
nets, reused, or without running statistics) are left alone and listed in
``fused.morphkit_unfused_bn``; the folded ones in ``fused.morphkit_fused_bn``.
A fused model is meant to run its BatchNorms in eval mode: in training mode
they would normalise with batch statistics again.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from morphkit.errors import UnsupportedModelError
from morphkit.graph import _eval_mode, _flatten_tensors, as_inputs

__all__ = ["fuse_bn", "bn_pairs"]

logger = logging.getLogger(__name__)

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm


def fuse_bn(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """Return a copy of ``model`` with every foldable BatchNorm folded into its layer.

    Args:
        model: Any module (not modified).
        example_inputs: A tensor or tuple for ``model(*inputs)`` to trace which
            layer feeds which BatchNorm; by default a random input of the
            model's recorded ``morphkit_arch`` shape, else a ``torch.fx`` trace.

    Returns:
        A new module with the same classes, keys and shapes, equal outputs in
        eval mode, and ``morphkit_fused_bn`` / ``morphkit_unfused_bn`` (lists
        of BatchNorm names).

    Raises:
        UnsupportedModelError: when no inputs are given or known and the model
            cannot be traced symbolically.

    Example:
        >>> from morphkit.models import build_model
        >>> m = build_model("resnet20").eval()
        >>> f = fuse_bn(m)
        >>> x = torch.randn(2, 3, 32, 32)
        >>> bool(torch.allclose(m(x), f(x), atol=1e-4)), len(f.morphkit_unfused_bn)
        (True, 0)
    """
    fused = copy.deepcopy(model)
    pairs, unfused = bn_pairs(fused, example_inputs)
    modules = dict(fused.named_modules())
    for layer_name, bn_name in pairs:
        _fold(modules[layer_name], modules[bn_name])
    fused.morphkit_fused_bn = [b for _, b in pairs]
    fused.morphkit_unfused_bn = unfused
    if pairs or unfused:
        logger.info("fused %d BatchNorm(s)%s", len(pairs),
                    f"; left {len(unfused)} alone: {', '.join(unfused[:5])}" if unfused else "")
    return fused


def bn_pairs(model: nn.Module, example_inputs: Any = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Which layer feeds each BatchNorm directly.

    Args:
        model: The model (left unchanged).
        example_inputs: As for :func:`fuse_bn`.

    Returns:
        ``([(layer_name, bn_name), ...], [names of BatchNorms that cannot be folded])``.

    Example:
        >>> from morphkit.models import build_model
        >>> bn_pairs(build_model("resnet20"))[0][:2]
        [('conv1', 'bn1'), ('layer1.0.conv1', 'layer1.0.bn1')]
    """
    bns = [n for n, m in model.named_modules() if isinstance(m, _BN)]
    if not bns:
        return [], []
    if example_inputs is None:
        try:
            from morphkit.models import example_inputs_for

            example_inputs = example_inputs_for(model)
        except UnsupportedModelError:
            return _fx_pairs(model, bns)
    with _eval_mode(model, grads=True):
        return _traced_pairs(model, as_inputs(example_inputs), bns)


def _traced_pairs(model: nn.Module, inputs: tuple[Any, ...],
                  bns: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Forward hooks record each layer's output node; the autograd graph counts its consumers."""
    produced: dict[Any, tuple[str, int]] = {}  # grad_fn of a layer output -> (layer, output ndim)
    bn_input: dict[str, Any] = {}
    calls: Counter[str] = Counter()
    names = {id(m): n for n, m in model.named_modules()}

    def layer_hook(module: nn.Module, args: Any, out: Any) -> None:
        name = names[id(module)]
        calls[name] += 1
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            produced[out.grad_fn] = (name, out.dim())

    def bn_hook(module: nn.Module, args: Any) -> None:
        name = names[id(module)]
        calls[name] += 1
        x = args[0] if args else None
        bn_input[name] = x.grad_fn if isinstance(x, torch.Tensor) else None

    handles = []
    for m in model.modules():
        if isinstance(m, _LAYERS):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, _BN):
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.enable_grad():
            out = model(*inputs)
    except Exception as e:  # noqa: BLE001 - user code
        raise UnsupportedModelError(f"cannot run {type(model).__name__} to find its BatchNorms: {e}") from e
    finally:
        for hd in handles:
            hd.remove()
    consumers = _consumer_counts(_flatten_tensors(out))
    modules = dict(model.named_modules())
    pairs, unfused = [], []
    for bn_name in bns:
        bn = modules[bn_name]
        gf = bn_input.get(bn_name)
        hit = produced.get(gf) if gf is not None else None
        why = None
        if calls[bn_name] != 1:
            why = "not run" if calls[bn_name] == 0 else "runs more than once"
        elif hit is None:
            why = "its input does not come straight from a conv/linear"
        else:
            layer_name, ndim = hit
            why = _unfoldable(modules[layer_name], bn, ndim, calls[layer_name], consumers[gf])
        if why is None:
            pairs.append((hit[0], bn_name))
        else:
            logger.debug("BatchNorm %s not fused: %s", bn_name, why)
            unfused.append(bn_name)
    return pairs, unfused


def _consumer_counts(outputs: list[torch.Tensor]) -> Counter[Any]:
    """How many times each autograd node is used (as an input of another node or as an output)."""
    counts: Counter[Any] = Counter()
    stack, seen = [], set()
    for o in outputs:
        if o.grad_fn is not None:
            counts[o.grad_fn] += 1
            stack.append(o.grad_fn)
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for child, _ in getattr(fn, "next_functions", ()):
            if child is not None:
                counts[child] += 1
                if child not in seen:
                    stack.append(child)
    return counts


def _unfoldable(layer: nn.Module, bn: nn.Module, ndim: int, layer_calls: int, consumers: int) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (None when it can)."""
    if layer_calls != 1:
        return "its layer runs more than once"
    if consumers != 1:
        return "its layer's output is also used elsewhere"
    if bn.running_mean is None or bn.running_var is None:
        return "it normalises with batch statistics (track_running_stats=False)"
    if isinstance(layer, nn.Linear):
        if ndim != 2:
            return "the linear output's channels are not on dim 1"
        channels = layer.out_features
    else:
        if layer.transposed and layer.groups != 1:
            return "grouped transposed conv"
        channels = layer.out_channels
    if channels != bn.num_features:
        return f"{channels} layer channels for {bn.num_features} BatchNorm features"
    return None


def _fx_pairs(model: nn.Module, bns: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pairs from a ``torch.fx`` symbolic trace (when no example input is available)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx fails on data-dependent control flow
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} symbolically ({type(e).__name__}); pass example_inputs "
            "to fuse_bn so that a forward pass can find which layer feeds each BatchNorm") from e
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs, found = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN) or not node.args:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), _LAYERS)):
            continue
        ndim = 2 if isinstance(modules[src.target], nn.Linear) and isinstance(modules[node.target],
                                                                                nn.BatchNorm1d) else 4
        why = _unfoldable(modules[src.target], modules[node.target], ndim, calls[src.target], len(src.users))
        if why is None and calls[node.target] == 1:
            pairs.append((src.target, node.target))
            found.add(node.target)
    return pairs, [b for b in bns if b not in found]


@lru_cache(maxsize=64)
def _unit_variance(eps: float, dtype: torch.dtype) -> float:
    """A running variance ``v`` with ``1 / sqrt(v + eps) == 1`` exactly in ``batch_norm``."""
    x = torch.tensor([[1.0, 3.0, -7.25, 1e3, 1e-3, 123.456]], dtype=dtype)  # (1, 6)
    base = torch.tensor(1.0 - eps, dtype=dtype)
    for step in range(16):
        for sign in (1, -1):
            v = base.clone()
            for _ in range(step):
                v = torch.nextafter(v, torch.tensor(2.0 if sign > 0 else 0.0, dtype=dtype))
            y = F.batch_norm(x, torch.zeros(6, dtype=dtype), v.repeat(6), torch.ones(6, dtype=dtype),
                             torch.zeros(6, dtype=dtype), False, 0.0, eps)
            if torch.equal(y, x):
                return float(v)
    return float(base)  # pragma: no cover - off by one ulp at worst


def _fold(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``layer`` in place; ``bn`` becomes an identity (or a bias)."""
    with torch.no_grad():
        var, mean = bn.running_var.double(), bn.running_mean.double()  # (C,)
        scale = torch.rsqrt(var + bn.eps)  # (C,)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -mean * scale  # (C,)
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        w = layer.weight
        dim = 1 if getattr(layer, "transposed", False) else 0
        shape = [1] * w.dim()
        shape[dim] = -1
        w.copy_((w.double() * scale.view(shape)).to(w.dtype))  # (out, in, *k) scaled per out channel
        if layer.bias is not None:
            layer.bias.copy_((layer.bias.double() * scale + shift).to(layer.bias.dtype))
            shift = torch.zeros_like(shift)
        dtype = bn.running_var.dtype
        bn.running_var.fill_(_unit_variance(float(bn.eps), dtype))
        if bn.weight is not None:
            bn.weight.fill_(1.0)
            bn.bias.copy_(shift.to(bn.bias.dtype))
            bn.running_mean.zero_()
        else:
            bn.running_mean.copy_((-shift).to(bn.running_mean.dtype))
