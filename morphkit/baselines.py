"""Baselines that NeuMeta is compared against, at exactly the morphed model's shapes.

Three alternatives a user would reach for instead of a weight manifold, each
producing a model with the **same architecture, parameter count and MACs** as
``resize(model, x, width)`` (and therefore as ``Manifold.sample(width)``):

* :func:`prune`: structural pruning of a trained model, one score per channel
  of every clique (``l1``/``l2`` magnitude, first-order ``taylor``, diagonal
  ``hessian`` (OBD / empirical Fisher), or seeded ``random``). The scores are
  computed here, directly over every member slice of the clique (weights,
  biases and norm affines of producers *and* consumers, flattened feature maps
  and concatenations included), instead of with torch-pruning's importance
  classes, which sort ``idxs`` without ``root_idxs`` (Taylor, Hessian) and
  keep only the last sample's gradient (Hessian). The top-``k`` channels of
  each clique are moved to the front by a function-preserving permutation and
  the model is then cut with :func:`~morphkit.resize.resize`, so the channel
  counts are those of the morphed model by construction (torch-pruning's
  ratio-based pruning misses exact counts through float rounding).
* :func:`train_individual`: the oracle, the resized structure trained from
  scratch with the base model's schedule.
* :func:`train_slimmable`: one set of shared weights in which a width keeps
  the first ``k`` channels of every clique (slimmable networks, Yu et al.
  2019; universally slimmable with the sandwich rule and in-place
  distillation), BatchNorm statistics recalibrated per width.

Example:
    >>> import torch, morphkit as mk
    >>> net = mk.build_model("lenet5")
    >>> small = mk.prune(net, torch.zeros(1, 1, 28, 28), 0.5, method="l1")
    >>> small.conv1.out_channels, small.fc1.in_features
    (3, 200)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from morphkit.clique import Clique, width_map
from morphkit.errors import ConfigError, TrainingError
from morphkit.fit import folded_bn_names, keeps_global_rng, show_progress, to_device
from morphkit.graph import copy_with, keep_positions, member_channels, permute_state

__all__ = [
    "METHODS",
    "prune",
    "channel_scores",
    "prune_permutations",
    "train_individual",
    "train_slimmable",
    "SlimmableNet",
    "recalibrate_all_bn",
]

logger = logging.getLogger(__name__)

#: Pruning criteria accepted by :func:`prune`.
METHODS: tuple[str, ...] = ("l1", "l2", "taylor", "hessian", "random")
#: Criteria that need data (gradients).
DATA_METHODS: tuple[str, ...] = ("taylor", "hessian")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


# --------------------------------------------------------------------------- #
# helpers                                                                      #
# --------------------------------------------------------------------------- #


def _default_loss(model: nn.Module) -> LossFn:
    from morphkit.fit import default_loss

    return default_loss(model)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: got {value!r}, expected an int >= {low}")
    return value


def _cliques_of(model: nn.Module, example_inputs: Any, cliques: Sequence[Clique] | None) -> list[Clique]:
    if cliques is not None:
        return list(cliques)
    from morphkit.graph import find_cliques

    return find_cliques(model, example_inputs)


def _frozen_bn_loss(loss_fn: LossFn, names: list[str]) -> LossFn:
    """Wrap a loss so that the named BatchNorms run in eval mode (``fit`` sets train mode each epoch)."""
    if not names:
        return loss_fn
    wanted = set(names)

    def wrapped(model: nn.Module, batch: Any) -> torch.Tensor:
        for name, m in model.named_modules():
            if name in wanted:
                m.eval()
        return loss_fn(model, batch)

    return wrapped


# --------------------------------------------------------------------------- #
# channel scores                                                               #
# --------------------------------------------------------------------------- #


def _split(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in a batch (non-tensors unchanged)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    return type(batch)(t[start:stop] if isinstance(t, torch.Tensor) else t for t in batch)


def _batch_len(batch: Any) -> int:
    return int((batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0])


def _sq_grads_vmap(net: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   loss_fn: LossFn, batch: Any, chunk: int) -> dict[str, torch.Tensor]:
    """Sum over the samples of a batch of each sample's squared gradient (``torch.func``, chunked)."""
    from torch.func import grad, vmap

    is_seq = isinstance(batch, (tuple, list))
    items = tuple(batch) if is_seq else (batch,)

    def one_loss(p: dict[str, torch.Tensor], *sample: Any) -> torch.Tensor:
        rows = tuple(t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in sample)
        return loss_fn(_Bound(net, {**p, **buffers}), type(batch)(rows) if is_seq else rows[0])  # type: ignore[arg-type]

    in_dims = (None, *(0 if isinstance(t, torch.Tensor) else None for t in items))
    per_sample = vmap(grad(one_loss), in_dims=in_dims)
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    n = _batch_len(batch)
    for s in range(0, n, chunk):
        gs = per_sample(params, *(t[s:s + chunk] if isinstance(t, torch.Tensor) else t for t in items))
        for k, g in gs.items():
            out[k] += g.pow(2).sum(0)  # (chunk, *shape) -> shape
    return out


def _sq_grads_loop(net: nn.Module, params: dict[str, torch.Tensor], loss_fn: LossFn,
                   batch: Any) -> dict[str, torch.Tensor]:
    """Same as :func:`_sq_grads_vmap`, one backward pass per sample (any model, any loss)."""
    names = list(params)
    plist = [dict(net.named_parameters())[k] for k in names]
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for j in range(_batch_len(batch)):
        grads = torch.autograd.grad(loss_fn(net, _split(batch, j, j + 1)), plist, allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                out[k] += g.pow(2)
    return out


def _elementwise(model: nn.Module, method: str, data: Iterable | None, loss_fn: LossFn,
                 batches: int, hessian_samples: int, seed: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Per-element importance of every parameter (``state_dict`` key -> tensor of its shape)."""
    if method in ("l1", "l2"):
        params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
        return {k: v.detach().abs() if method == "l1" else v.detach().pow(2) for k, v in params.items()}
    # gradient-based: on a copy, in eval mode (BN uses running statistics; deterministic)
    net = copy.deepcopy(model).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(p.is_floating_point())
    named = {k: p for k, p in net.named_parameters() if p.requires_grad}  # unique tensors
    key_of = {id(p): k for k, p in named.items()}
    acc = {k: torch.zeros_like(p) for k, p in named.items()}
    count = 0
    torch.manual_seed(seed)
    if method == "taylor":
        # gradient of the mean loss over `batches` batches
        with torch.enable_grad():
            for i, batch in enumerate(data):  # type: ignore[union-attr]
                if i >= batches:
                    break
                grads = torch.autograd.grad(loss_fn(net, to_device(batch, device)), list(named.values()),
                                            allow_unused=True)
                for k, g in zip(named, grads):
                    if g is not None:
                        acc[k] += g
                count += 1
        if count == 0:
            raise ConfigError("method 'taylor': the data yielded no batches; pass a non-empty iterable of (x, y)")
        elem = {k: (p.detach() * acc[k] / count).abs() for k, p in named.items()}
    else:
        # hessian: diagonal empirical Fisher, the mean of per-sample squared gradients over every
        # sample seen (torch-pruning's HessianImportance keeps only the last one)
        params = {k: p.detach() for k, p in named.items()}
        buffers = dict(net.named_buffers())
        chunk = max(1, min(64, int(2.5e8 // max(1, 4 * sum(p.numel() for p in params.values())))))
        use_vmap = True
        for batch in data:  # type: ignore[union-attr]
            take = min(_batch_len(batch), hessian_samples - count)
            if take <= 0:
                break
            part = to_device(_split(batch, 0, take), device)
            sq = None
            if use_vmap:
                try:
                    sq = _sq_grads_vmap(net, params, buffers, loss_fn, part, chunk)
                except Exception as e:  # noqa: BLE001 - vmap does not support every op or loss
                    logger.debug("per-sample gradients with vmap failed (%s); one backward per sample", e)
                    use_vmap = False
            if sq is None:
                with torch.enable_grad():
                    sq = _sq_grads_loop(net, params, loss_fn, part)
            for k in acc:
                acc[k] += sq[k]
            count += take
            if count >= hessian_samples:
                break
        if count == 0:
            raise ConfigError("method 'hessian': the data yielded no batches; pass a non-empty iterable of (x, y)")
        elem = {k: p.detach().pow(2) * acc[k] / count for k, p in named.items()}
    out = {}
    for k, v in net.state_dict(keep_vars=True).items():
        if isinstance(v, nn.Parameter) and id(v) in key_of:
            out[k] = elem[key_of[id(v)]].cpu()
    return out


@keeps_global_rng
def channel_scores(model: nn.Module, example_inputs: Any, method: str = "l1", data: Iterable | None = None, *,
                   cliques: Sequence[Clique] | None = None, loss_fn: LossFn | None = None, batches: int = 8,
                   hessian_samples: int = 128, seed: int = 0,
                   device: str | torch.device | None = None) -> dict[int, np.ndarray]:
    """One importance score per channel of every resizable clique.

    A channel's score is the sum, over every *parameter* member of its clique
    (producer rows, consumer columns, biases, norm affines; not running
    statistics) and every position of that channel along the member's dim
    (all spatial positions of a flattened map), of a per-element score:

    ============ =================================================
    ``l1``       ``|W|``
    ``l2``       ``W ** 2``
    ``taylor``   ``|W * dL/dW|``, gradient of the mean loss over ``batches`` batches
    ``hessian``  ``W ** 2 * mean_i (dL_i/dW) ** 2`` over ``hessian_samples`` single samples
    ``random``   uniform in [0, 1) per channel, seeded
    ============ =================================================

    For a *tied* clique (one permutation for every block) the scores are
    summed per position within a block and repeated for every block.

    Args:
        model: The model (not modified).
        example_inputs: A tensor or tuple of tensors (to find the cliques).
        method: One of :data:`METHODS`.
        data: Batches for ``taylor`` / ``hessian`` (required there).
        cliques: The model's cliques (found here when None).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross-entropy
            (the ELBO for the registry VAE).
        batches: Batches of ``data`` averaged for ``taylor``.
        hessian_samples: Single samples whose squared gradients are averaged for ``hessian``.
        seed: Seed of ``random`` (and of any randomness in the loss).
        device: Where gradients are computed (default: where the model is).

    Returns:
        ``{clique_id: (size,) float64 array}`` for every non-fixed clique.

    Raises:
        ConfigError: unknown method; ``taylor``/``hessian`` without data.

    Example:
        >>> import torch, morphkit as mk
        >>> s = channel_scores(mk.build_model("lenet5"), torch.zeros(1, 1, 28, 28), "l1")
        >>> s[1].shape
        (6,)
    """
    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    if method in DATA_METHODS and data is None:
        raise ConfigError(f"method {method!r} needs data (batches of (x, y)) to compute gradients; "
                          "pass data=..., or use l1, l2 or random")
    _check_int("batches", batches, 1)
    _check_int("hessian_samples", hessian_samples, 1)
    cliques = _cliques_of(model, example_inputs, cliques)
    resizable = [c for c in cliques if not c.fixed]
    if method == "random":
        rng = np.random.default_rng(seed)
        return {c.id: rng.random(c.size) for c in resizable}
    dev = torch.device(device) if device is not None else _device_of(model)
    elem = _elementwise(model, method, data, loss_fn or _default_loss(model), batches, hessian_samples,
                        seed, dev)
    out: dict[int, np.ndarray] = {}
    for c in resizable:
        score = np.zeros(c.size, dtype=np.float64)
        for m in c.members:
            if m.name not in elem:  # a buffer (running statistics)
                continue
            t = elem[m.name].double()
            length = t.shape[m.dim]
            per_pos = t.movedim(m.dim, 0).reshape(length, -1).sum(1).numpy()  # (length,)
            idx = member_channels(m, length)
            sel = idx >= 0
            np.add.at(score, idx[sel], per_pos[sel])
        if c.tied and c.block > 1:  # one permutation for every block: score positions within a block
            score = np.tile(score.reshape(c.n_blocks, c.block).sum(0), c.n_blocks)
        out[c.id] = score
    return out


def _top(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, ties to the lower index, in increasing order."""
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:k])


def prune_permutations(cliques: Sequence[Clique], scores: dict[int, np.ndarray],
                       widths: dict[int, int]) -> dict[int, np.ndarray]:
    """Permutations that move each clique's top-scored channels to the positions ``resize`` keeps.

    ``resize`` keeps ``clique.kept(count)``: the first ``count`` channels, or
    the first ``count / n_blocks`` of every block. The returned permutation
    puts the highest-scored channels there (in their original order, within
    their block for blocked cliques, identically in every block for tied
    ones), so permuting and then resizing prunes exactly the lowest-scored channels.

    Args:
        cliques: The model's cliques.
        scores: ``{clique_id: (size,) scores}`` (from :func:`channel_scores`).
        widths: Full width map ``{clique_id: channels}``.

    Returns:
        ``{clique_id: permutation}`` (``perm[new] = old``) for the cliques that shrink.

    Example:
        >>> from morphkit.clique import Clique
        >>> prune_permutations([Clique(0, 4)], {0: np.array([1., 4., 2., 3.])}, {0: 2})[0].tolist()
        [1, 3, 0, 2]
    """
    perms: dict[int, np.ndarray] = {}
    for c in cliques:
        count = int(widths.get(c.id, c.size))
        if c.fixed or count == c.size:
            continue
        s = np.asarray(scores[c.id], dtype=np.float64)
        if c.block > 1:
            b, per = c.block, count // c.n_blocks
            if c.tied:
                top = _top(s[:b], per)
                local = np.concatenate([top, np.setdiff1d(np.arange(b), top)])
                perm = np.concatenate([g * b + local for g in range(c.n_blocks)])
            else:
                parts = []
                for g in range(c.n_blocks):
                    top = _top(s[g * b:(g + 1) * b], per)
                    parts.append(g * b + np.concatenate([top, np.setdiff1d(np.arange(b), top)]))
                perm = np.concatenate(parts)
        else:
            top = _top(s, count)
            perm = np.concatenate([top, np.setdiff1d(np.arange(c.size), top)])
        perms[c.id] = perm.astype(np.int64)
    return perms


# --------------------------------------------------------------------------- #
# prune                                                                        #
# --------------------------------------------------------------------------- #


def prune(model: nn.Module, example_inputs: Any, width: float | dict[int, int], method: str = "l1",
          data: Iterable | None = None, finetune_epochs: int = 0, *, cliques: Sequence[Clique] | None = None,
          loss_fn: LossFn | None = None, batches: int = 8, hessian_samples: int = 128,
          finetune_data: Iterable | None = None, lr: float | None = None, seed: int = 0,
          device: str | torch.device | None = None, progress: bool = True) -> nn.Module:
    """Structurally prune a model to exactly the channel counts of ``resize(model, x, width)``.

    Every resizable clique keeps its ``width_map(cliques, width)[id]``
    highest-scored channels (see :func:`channel_scores`); the result has the
    same classes, parameter shapes and MACs as the morphed model at that width.

    Args:
        model: The trained model (not modified).
        example_inputs: A tensor or tuple of tensors for ``model(*inputs)``.
        width: Float in (0, 1] (``compression = 1 - width``) or ``{clique_id: channels}``.
        method: ``"l1"``, ``"l2"``, ``"taylor"``, ``"hessian"`` or ``"random"``.
        data: Batches of ``(x, y)``: gradients for ``taylor``/``hessian`` and
            the fine-tuning data (unless ``finetune_data`` is given).
        finetune_epochs: Epochs of fine-tuning with :func:`~morphkit.fit.fit`
            after pruning (0 = none), with the base model's recipe
            (``models.recipe_of``). BatchNorms folded by ``fuse_bn`` stay
            frozen identities while fine-tuning.
        cliques: The model's cliques (found here when None).
        loss_fn: ``loss_fn(model, batch) -> scalar`` for scoring and fine-tuning.
        batches: Batches averaged by ``taylor``.
        hessian_samples: Samples averaged by ``hessian``.
        finetune_data: Fine-tuning batches when they differ from ``data``.
        lr: Fine-tuning peak learning rate (default: a tenth of the recipe's).
        seed: Seed of ``random`` and of fine-tuning.
        device: Where gradients and fine-tuning run (default: the model's device / ``fit``'s).
        progress: tqdm bars while fine-tuning.

    Returns:
        A new module with ``morphkit_widths`` (full width map),
        ``morphkit_arch`` (copied) and ``morphkit_kept`` (``{clique_id: base
        channels kept}``), so ``save_model``/``load_model`` round-trip it.

    Raises:
        ConfigError: unknown method; width out of (0, 1] or a bad width map;
            ``taylor``/``hessian`` or fine-tuning without data.

    Example:
        >>> import torch, morphkit as mk
        >>> net = mk.build_model("resnet20")
        >>> x = torch.zeros(1, 3, 32, 32)
        >>> a, b = mk.prune(net, x, 0.5, "l2"), mk.resize(net, x, 0.5)
        >>> all(p.shape == q.shape for p, q in zip(a.parameters(), b.parameters()))
        True
    """
    from morphkit.resize import resize

    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    _check_int("finetune_epochs", finetune_epochs, 0)
    tune_data = finetune_data if finetune_data is not None else data
    if finetune_epochs and tune_data is None:
        raise ConfigError(f"finetune_epochs={finetune_epochs} needs data (batches of (x, y)); pass data=... "
                          "or finetune_data=..., or set finetune_epochs=0")
    if method in DATA_METHODS and data is None:
        raise ConfigError(f"method {method!r} needs data (batches of (x, y)) to compute gradients; "
                          "pass data=..., or use l1, l2 or random")
    cliques = _cliques_of(model, example_inputs, cliques)
    widths = width_map(cliques, width)  # validates the width
    t0 = time.perf_counter()
    if any(widths[c.id] < c.size for c in cliques):
        scores = channel_scores(model, example_inputs, method, data, cliques=cliques, loss_fn=loss_fn,
                                batches=batches, hessian_samples=hessian_samples, seed=seed, device=device)
        perms = prune_permutations(cliques, scores, widths)
    else:
        perms = {}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    permuted = copy_with(model, permute_state(state, cliques, perms)) if perms else model
    pruned = resize(permuted, example_inputs, widths, cliques=cliques)
    pruned.morphkit_kept = {c.id: (perms[c.id][np.asarray(c.kept(widths[c.id]), dtype=np.int64)].tolist()
                                   if c.id in perms else list(range(c.size))) for c in cliques}
    pruned.train(model.training)
    logger.info("pruned %s with %s to %s in %.2f s", type(model).__name__, method,
                {c.id: widths[c.id] for c in cliques if not c.fixed}, time.perf_counter() - t0)
    if finetune_epochs:
        from morphkit.fit import fit
        from morphkit.models import recipe_of

        recipe = recipe_of(model)
        kept = pruned.morphkit_kept
        loss = _frozen_bn_loss(loss_fn or _default_loss(model), folded_bn_names(model))
        pruned, _ = fit(pruned, tune_data, epochs=finetune_epochs, loss_fn=loss, optimizer=recipe["optimizer"],
                        lr=lr if lr is not None else recipe["lr"] * 0.1, weight_decay=recipe["weight_decay"],
                        seed=seed, device=device, progress=progress)
        pruned.morphkit_kept = kept
    return pruned


# --------------------------------------------------------------------------- #
# individual training (the oracle)                                             #
# --------------------------------------------------------------------------- #


def _fresh(arch_or_model: str | dict | nn.Module, seed: int) -> nn.Module:
    """A freshly initialised model of the same architecture (seeded)."""
    from morphkit.models import arch_of, build_from_arch, build_model

    torch.manual_seed(seed)
    if isinstance(arch_or_model, str):
        return build_model(arch_or_model)
    if isinstance(arch_or_model, dict):
        return build_from_arch(arch_or_model)
    if isinstance(arch_or_model, nn.Module):
        arch = arch_of(arch_or_model)
        if arch:
            return build_from_arch(arch)
        net = copy.deepcopy(arch_or_model)
        for attr in ("morphkit_fused_bn", "morphkit_unfused_bn", "morphkit_widths"):
            if hasattr(net, attr):
                delattr(net, attr)
        _reset(net, None)
        return net
    raise ConfigError(f"expected a model spec ('lenet5', 'timm:NAME'), an arch dict or an nn.Module, "
                      f"got {type(arch_or_model).__name__}")


def _reset(net: nn.Module, only: set[str] | None) -> int:
    """Call ``reset_parameters()`` (and ``reset_running_stats()``) of modules (``only``: those names)."""
    n = 0
    for name, m in net.named_modules():
        if only is not None and name not in only:
            continue
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
            n += 1
        elif callable(getattr(m, "reset_running_stats", None)):
            m.reset_running_stats()
    return n


@keeps_global_rng
def train_individual(arch_or_model: str | dict | nn.Module, width: float | dict[int, int], data: Iterable, *,
                     epochs: int | None = None, example_inputs: Any = None,
                     cliques: Sequence[Clique] | None = None, eval_data: Iterable | None = None,
                     loss_fn: LossFn | None = None, seed: int = 0, device: str | torch.device | None = None,
                     progress: bool = True, **fit_kwargs: Any) -> nn.Module:
    """Train the resized structure from scratch: the "individually trained" oracle.

    A fresh model of the architecture (seeded) is resized to ``width``; every
    layer whose shape changed is re-initialised with its own
    ``reset_parameters()`` (PyTorch's default init at the new fan-in; layers
    that kept their shape keep the architecture's own init), and the result is
    trained with the base model's recipe (``models.recipe_of``: optimizer, lr,
    weight decay, epochs), overridable through ``epochs`` and ``fit_kwargs``.

    Args:
        arch_or_model: A model spec (``"lenet5"``, ``"timm:resnet18"``), an
            ``arch`` dict, or a model (only its architecture is used: a fresh
            one is built from its ``morphkit_arch``, or a copy is re-initialised).
        width: Float in (0, 1] or ``{clique_id: channels}``.
        data: Training batches of ``(x, y)``.
        epochs: Training epochs (default: the recipe's).
        example_inputs: Inputs to find the cliques (default: from the model's recorded input shape).
        cliques: The architecture's cliques (found here when None).
        eval_data: Batches evaluated after each epoch (logged).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        seed: Seed of the initialisation and of training.
        device: Where to train.
        progress: tqdm bars.
        **fit_kwargs: Overrides for :func:`~morphkit.fit.fit` (``lr``, ``optimizer``, ...).

    Returns:
        The trained model (CPU, eval mode) with ``morphkit_widths`` and ``morphkit_arch``.

    Example:
        >>> import morphkit as mk
        >>> splits = mk.load_data("embedded")
        >>> train, _ = mk.make_loaders(splits, batch_size=64, limit=256)
        >>> net = mk.train_individual("lenet5", 0.5, train, epochs=1, progress=False)
        >>> net.conv1.out_channels
        3
    """
    from morphkit.fit import fit
    from morphkit.models import example_inputs_for, recipe_of
    from morphkit.resize import resize

    net = _fresh(arch_or_model, seed)
    x = example_inputs if example_inputs is not None else example_inputs_for(net)
    cliques = _cliques_of(net, x, cliques)
    before = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    small = resize(net, x, width, cliques=cliques)
    changed = {k.rpartition(".")[0] for k, v in small.state_dict().items() if tuple(v.shape) != before[k]}
    _reset(small, changed)
    recipe = recipe_of(net)
    kw = {"optimizer": recipe["optimizer"], "lr": recipe["lr"], "weight_decay": recipe["weight_decay"]}
    kw.update(fit_kwargs)
    trained, hist = fit(small, data, epochs=epochs or recipe["epochs"], eval_data=eval_data, loss_fn=loss_fn,
                        seed=seed, device=device, progress=progress, **kw)
    trained.morphkit_history = {"train_loss": hist.train_loss, "eval": hist.eval, "seconds": hist.seconds}
    return trained


# --------------------------------------------------------------------------- #
# slimmable                                                                    #
# --------------------------------------------------------------------------- #


def recalibrate_all_bn(net: nn.Module, data: Iterable, batches: int = 20) -> int:
    """Recompute the running statistics of every BatchNorm that tracks them (cumulative average).

    Folded BatchNorms (identities in a ``fuse_bn`` model) are left alone; the
    work is :func:`morphkit.manifold.recalibrate_bn`'s.

    Returns:
        The number of BatchNorm modules recalibrated.
    """
    from morphkit.manifold import recalibrate_bn

    frozen = set(folded_bn_names(net))
    bns = [m for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and name not in frozen]
    return recalibrate_bn(net, data, batches, modules=bns)


class SlimmableNet:
    """Shared weights of a slimmable network: width ``w`` uses the first channels of every clique.

    Attributes:
        model: The full-width shared model (CPU, eval mode).
        cliques: Its cliques.
        example_inputs: Inputs used to resize it.
        widths: ``(smallest, largest)`` width it was trained on.
        calib_data: Batches used to recalibrate BatchNorm statistics in :meth:`model_at`.
        calib_batches: How many of them.
        history: Mean training loss per epoch and wall time.

    Example:
        >>> slim = train_slimmable(net, loader, (0.25, 1.0), epochs=1)  # doctest: +SKIP
        >>> small = slim.model_at(0.5)                                   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, cliques: list[Clique], example_inputs: Any, widths: tuple[float, float],
                 calib_data: Iterable | None, calib_batches: int, history: dict[str, Any]) -> None:
        self.model = model
        self.cliques = cliques
        self.example_inputs = example_inputs
        self.widths = widths
        self.calib_data = calib_data
        self.calib_batches = calib_batches
        self.history = history

    def model_at(self, width: float | dict[int, int], calib_data: Iterable | None = None,
                 calib_batches: int | None = None) -> nn.Module:
        """A standard resized module at ``width`` with BatchNorm statistics recalibrated for it.

        Args:
            width: Float in (0, 1] or ``{clique_id: channels}``.
            calib_data: Batches for BN recalibration (default: the training data).
            calib_batches: How many batches (default: the value given to ``train_slimmable``).

        Returns:
            A new module (eval mode) with the shapes of ``resize(model, x, width)``.
        """
        from morphkit.resize import resize

        net = resize(self.model, self.example_inputs, width, cliques=self.cliques)
        data = calib_data if calib_data is not None else self.calib_data
        if data is not None:
            recalibrate_all_bn(net, data, calib_batches or self.calib_batches)
        return net.eval()


class _Bound:
    """A module template called with another state (``functional_call``), usable as ``model(x)``."""

    def __init__(self, template: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.template, self.state = template, state

    def __call__(self, *args: Any) -> Any:
        return torch.func.functional_call(self.template, self.state, args, strict=False)

    def train(self, mode: bool = True) -> _Bound:
        self.template.train(mode)
        return self

    def eval(self) -> _Bound:
        return self.train(False)


@keeps_global_rng
def train_slimmable(model: nn.Module, data: Iterable, widths: Sequence[float] = (0.25, 1.0), *,
                    epochs: int | None = None, example_inputs: Any = None,
                    cliques: Sequence[Clique] | None = None, n_random: int = 2, inplace_distill: bool = True,
                    loss_fn: LossFn | None = None, optimizer: str | None = None, lr: float | None = None,
                    weight_decay: float | None = None, calib_batches: int = 20, seed: int = 0,
                    device: str | torch.device | None = None, progress: bool = True) -> SlimmableNet:
    """Train one set of shared weights for every width in ``[min(widths), max(widths)]``.

    The slimmable-network baseline on morphkit's generic cliques: width ``w``
    is the sub-network ``resize(model, x, w)``, i.e. the *first*
    ``max(1, round(size * w))`` channels of every clique, sliced from the
    shared tensors (so gradients of every width land in the same weights).
    Each step follows the sandwich rule of universally slimmable networks
    (Yu & Huang 2019): the largest width, the smallest and ``n_random``
    widths drawn uniformly in between, gradients summed; with
    ``inplace_distill`` (classification with the default loss) the narrower
    widths learn the largest one's soft predictions instead of the labels.
    BatchNorm affine parameters are shared; their running statistics are
    recalibrated per width in :meth:`SlimmableNet.model_at` (BN statistics
    do not transfer between widths).

    Args:
        model: The initial shared weights (a freshly built model to train
            from scratch, as the slimmable papers do, or a trained one to
            start from). Not modified.
        data: Training batches of ``(x, y)`` (also the default calibration data).
        widths: The widths to train for; the range ``[min, max]`` is used.
        epochs: Epochs (default: the model's recipe).
        example_inputs: Inputs to find the cliques (default: from the model's recorded input shape).
        cliques: The model's cliques (found here when None).
        n_random: Random widths per step besides the largest and smallest.
        inplace_distill: Narrower widths learn the largest width's predictions.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (disables in-place distillation).
        optimizer: ``"sgd"`` or ``"adam"`` (default: the recipe's).
        lr: Peak learning rate, cosine decay (default: the recipe's).
        weight_decay: Weight decay (default: the recipe's).
        calib_batches: Batches used to recalibrate BN per width.
        seed: Seed of the width draws and of training.
        device: Where to train (default: CUDA if available).
        progress: tqdm bars.

    Returns:
        A :class:`SlimmableNet`; ``.model_at(width)`` emits a standard module.

    Raises:
        ConfigError: widths outside (0, 1] or empty; bad epochs / n_random.
        TrainingError: a non-finite loss.

    Example:
        >>> import morphkit as mk
        >>> train, _ = mk.make_loaders(mk.load_data("embedded"), batch_size=64, limit=256)
        >>> slim = mk.train_slimmable(mk.build_model("lenet5"), train, (0.5, 1.0), epochs=1, progress=False)
        >>> slim.model_at(0.5).conv1.out_channels
        3
    """
    from morphkit.fit import classification_loss, default_device
    from morphkit.models import example_inputs_for, recipe_of, task_of
    from morphkit.resize import resize

    ws = [float(w) for w in widths] if isinstance(widths, (list, tuple)) else None
    if not ws or any(not (isinstance(w, float) and math.isfinite(w) and 0 < w <= 1) for w in ws):
        raise ConfigError(f"widths: got {widths!r}, expected a non-empty list of floats in (0, 1]")
    _check_int("n_random", n_random, 0)
    _check_int("calib_batches", calib_batches, 1)
    recipe = recipe_of(model)
    epochs = _check_int("epochs", epochs if epochs is not None else recipe["epochs"], 1)
    opt_name = optimizer or recipe["optimizer"]
    if opt_name not in ("sgd", "adam"):
        raise ConfigError(f"optimizer: got {opt_name!r}, expected 'sgd' or 'adam'")
    lr = lr if lr is not None else recipe["lr"]
    weight_decay = weight_decay if weight_decay is not None else recipe["weight_decay"]
    x = example_inputs if example_inputs is not None else example_inputs_for(model)
    cliques = _cliques_of(model, x, cliques)
    w_lo, w_hi = min(ws), max(ws)
    dev = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = copy.deepcopy(model).to(dev).train()
    classify = loss_fn is None and task_of(model) == "classification"
    base_loss = loss_fn or (classification_loss() if classify else _default_loss(model))
    distill = inplace_distill and classify
    frozen = set(folded_bn_names(model))
    state = net.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    params = [p for p in net.parameters() if p.requires_grad]
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay,
                                                     nesterov=True)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, len(data)) if hasattr(data, "__len__") else epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))))
    templates: dict[tuple, tuple[nn.Module, dict[str, list[tuple[int, torch.Tensor]]]]] = {}

    def bound(w: float) -> _Bound:
        """The sub-network of width ``w``: a cached template called on slices of the shared tensors."""
        counts = width_map(cliques, w)
        key = tuple(sorted(counts.items()))
        if key not in templates:
            tmpl = resize(net, x, counts, cliques=cliques).to(dev).train()
            for name, m in tmpl.named_modules():
                if name in frozen:
                    m.eval()
            per_key: dict[str, list[tuple[int, torch.Tensor]]] = {}
            for (k, dim), pos in sorted(keep_positions(cliques, counts, shapes).items()):
                per_key.setdefault(k, []).append((dim, torch.as_tensor(pos, dtype=torch.long, device=dev)))
            templates[key] = (tmpl, per_key)
            if len(templates) > 128:
                templates.pop(next(iter(templates)))
        tmpl, per_key = templates[key]
        sliced = {}
        for k, t in state.items():
            for dim, pos in per_key.get(k, ()):
                t = t.index_select(dim, pos)  # differentiable: gradients reach the shared tensor
            sliced[k] = t
        return _Bound(tmpl, sliced)

    hist: dict[str, Any] = {"train_loss": [], "seconds": 0.0}
    t0 = time.perf_counter()
    for epoch in range(epochs):
        running, n = 0.0, 0
        for batch in tqdm(data, desc=f"slimmable {epoch + 1}/{epochs}", disable=not show_progress(progress),
                          leave=False):
            batch = to_device(batch, dev)
            opt.zero_grad(set_to_none=True)
            draws = [w_hi, w_lo] + [float(rng.uniform(w_lo, w_hi)) for _ in range(n_random)]
            teacher = None
            for i, w in enumerate(draws):
                sub = bound(w)
                if distill:
                    out = sub(batch[0])
                    if i == 0:
                        loss = F.cross_entropy(out, batch[1])
                        teacher = out.detach().softmax(1)
                    else:
                        loss = -(teacher * out.log_softmax(1)).sum(1).mean()  # type: ignore[operator]
                else:
                    loss = base_loss(sub, batch)  # type: ignore[arg-type]
                if not torch.isfinite(loss):
                    raise TrainingError(f"slimmable loss became {loss.item()} at epoch {epoch + 1} (width {w:.3f}); "
                                        "lower the learning rate or check the data")
                loss.backward()
                if i == 0:
                    running += loss.item()
            opt.step()
            sched.step()
            n += 1
        hist["train_loss"].append(running / max(1, n))
        logger.info("slimmable epoch %d/%d: largest-width loss %.4f", epoch + 1, epochs, hist["train_loss"][-1])
    hist["seconds"] = time.perf_counter() - t0
    shared = net.cpu().eval()
    for attr in ("morphkit_arch", "morphkit_fused_bn"):
        if hasattr(model, attr):
            setattr(shared, attr, copy.deepcopy(getattr(model, attr)))
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in shared.modules()):
        logger.debug("slimmable model has no BatchNorm: nothing to recalibrate per width")
    return SlimmableNet(shared, list(cliques), x, (w_lo, w_hi), data, calib_batches, hist)
