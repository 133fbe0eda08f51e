"""``morph()``: learn the weight manifold of a model (paper sections 3.2-3.4).

Pipeline: copy the model, fold its BatchNorms, find its cliques, smooth each
clique along its shortest Hamiltonian path, then train one INR over every
predicted tensor of every resizable clique. Each step draws a width map
(global compression ~ U[low, high], or one per clique), takes the cached
resized template, predicts its weights from noisy coordinates, runs the batch
through ``torch.func.functional_call`` and minimises

    task + l1 * magnitude-weighted reconstruction (full width, a random subset of rows)
         + l2 * L2 of the predicted weights [+ distill * KL to the base model]

with Adam, cosine decay, gradient clipping and an EMA of the INR, which is
what the returned :class:`~morphkit.manifold.Manifold` samples from. The
caller's model is never modified; a run is deterministic for a seed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from morphkit.config import MorphConfig
from morphkit.coords import WidthMap, plan_layouts
from morphkit.errors import ConfigError, TrainingError, UnsupportedModelError
from morphkit.fit import classification_loss, evaluate
from morphkit.inr import INR
from morphkit.manifold import Manifold, as_inputs, build_inr, predict_tensors
from morphkit.models import arch_of, task_of, vae_loss

__all__ = ["morph", "prepare_base", "draw_widths"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class _Bound(nn.Module):
    """A template module bound to predicted tensors, callable like the model."""

    def __init__(self, template: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.template = template
        self.tensors = tensors
        self.last_output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.last_output = functional_call(self.template, self.tensors, args, kwargs, strict=True)
        return self.last_output


def _check_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # any failure of the user's forward
        shapes = [tuple(t.shape) for t in inputs]
        raise UnsupportedModelError(f"the model's forward fails on example_inputs of shape {shapes}: "
                                    f"{type(e).__name__}: {e}; pass inputs the model accepts") from e


def prepare_base(model: nn.Module, example_inputs: Any, config: MorphConfig) -> tuple[nn.Module, list, dict, bool]:
    """Copy, fuse BatchNorm, find cliques and smooth: the base the INR learns.

    Returns:
        ``(base, cliques, perms, fused)``; ``base`` is a new module.
    """
    from morphkit.fuse import fuse_bn
    from morphkit.graph import find_cliques
    from morphkit.smooth import smooth

    inputs = as_inputs(example_inputs)
    base = copy.deepcopy(model).cpu().eval()
    _check_forward(base, inputs)
    if config.fuse_bn:
        base = fuse_bn(base)
    cliques = find_cliques(base, inputs)
    for c in cliques:  # channels merged by torch.cat: the coordinate tables do not model them yet
        if not c.fixed and any(m.index is not None and min(m.index, default=0) < 0 for m in c.members):
            c.fixed, c.reason = True, "shares a tensor with concatenated channels (not yet morphable)"
            logger.warning("clique %d (%s) is kept at full width: %s", c.id, ", ".join(c.modules[:3]), c.reason)
    if not any(not c.fixed for c in cliques):
        raise UnsupportedModelError(f"{type(model).__name__} has no resizable clique (all {len(cliques)} are "
                                    "fixed: see `morphkit cliques`); there is nothing to morph")
    perms: dict = {}
    if config.smooth.enabled:
        t0 = time.perf_counter()
        base, perms = smooth(base, inputs, cliques, seed=config.smooth.seed, time_budget=config.smooth.time_budget)
        logger.info("smoothed %d cliques in %.2f s", len(perms), time.perf_counter() - t0)
    return base.eval(), cliques, perms, bool(config.fuse_bn)


def draw_widths(cliques: list, low: float, high: float, per_clique: bool, gen: torch.Generator) -> WidthMap:
    """Draw a width map: compression ~ U[low, high], global or per clique."""
    def width() -> float:
        return 1.0 - (low + (high - low) * torch.rand((), generator=gen).item())

    w = width()
    return {c.id: c.channels_for(width() if per_clique else w) for c in cliques}


def _batches(data: Iterable) -> Iterator[Any]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ConfigError("train_data yielded no batches; pass a non-empty iterable of (x, y) batches")


def morph(
    model: nn.Module,
    train_data: Iterable,
    *,
    example_inputs: Any,
    config: MorphConfig | None = None,
    loss_fn: LossFn | None = None,
    eval_data: Iterable | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Manifold:
    """Learn the weight manifold of ``model``.

    Args:
        model: A trained network (never modified).
        train_data: Iterable of batches (``(x, y)`` for classification).
        example_inputs: A tensor or tuple of tensors the model accepts (for tracing).
        config: A :class:`MorphConfig` (default settings when None).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross-entropy
            (the ELBO for the registry VAE).
        eval_data: Batches for the periodic and final evaluation (optional).
        progress: Show a tqdm bar.
        device: Where to train (default: CUDA if available, else CPU).

    Returns:
        The :class:`~morphkit.manifold.Manifold`.

    Example:
        >>> import morphkit as mk
        >>> cfg = mk.MorphConfig(train=mk.TrainConfig(steps=20))
        >>> manifold = mk.morph(net, loader, example_inputs=x, config=cfg)  # doctest: +SKIP
        >>> small = manifold.sample(0.5)                                    # doctest: +SKIP
    """
    cfg = config or MorphConfig()
    if not isinstance(cfg, MorphConfig):
        raise ConfigError(f"config must be a MorphConfig, got {type(cfg).__name__}")
    tc = cfg.train
    from morphkit.fit import default_device

    dev = torch.device(device) if device is not None else default_device()
    torch.manual_seed(tc.seed)
    inputs = as_inputs(example_inputs)
    t_start = time.perf_counter()
    base, cliques, perms, fused = prepare_base(model, inputs, cfg)
    state = base.state_dict()
    layouts, static_names = plan_layouts(cliques, state, {n for n, _ in base.named_parameters()})
    if not layouts:
        raise UnsupportedModelError("no tensor of this model depends on a resizable clique; nothing to learn")
    static = {n: state[n].detach().clone() for n in static_names}
    inr = build_inr(layouts, cfg)
    manifold = Manifold(inr, cliques, layouts, static, base, inputs, cfg, arch_of(model), perms, fused_bn=fused)
    builder = manifold.builder
    if inr.residual:
        inr.set_grids([builder.grid(k, state[lt.name].detach().float()) for k, lt in enumerate(layouts)])
    if loss_fn is None:
        loss_fn = vae_loss if task_of(model) == "vae" else classification_loss()
    logger.info("morph: %d cliques (%d resizable), %d predicted tensors, %d static, INR %d params",
                len(cliques), sum(not c.fixed for c in cliques), len(layouts), len(static),
                sum(p.numel() for p in inr.parameters()))

    # reconstruction targets: the smoothed base tensors as rows of the full-width table
    full = builder.full()
    full_table = builder.table(full)
    targets = [builder.to_rows(k, full_table, state[lt.name].detach().float()).to(dev)
               for k, lt in enumerate(layouts)]
    norms = [t.pow(2).mean().clamp_min(1e-12) for t in targets]

    inr.to(dev).train()
    ema = copy.deepcopy(inr).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    steps = tc.steps or tc.epochs * max(1, len(train_data) if hasattr(train_data, "__len__") else 1)
    opt = torch.optim.Adam(inr.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(tc.seed)
    teacher = base.to(dev) if tc.distill > 0 else None
    static_cache: dict[tuple, dict[str, torch.Tensor]] = {}
    history: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    data_iter = _batches(train_data)
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(range(steps), desc="morph", disable=not progress)
    n_pred = len(layouts)
    for step in bar:
        batch = next(data_iter)
        batch = _to(batch, dev)
        counts = draw_widths(cliques, tc.compression[0], tc.compression[1], tc.per_clique, gen)
        table = builder.table(counts)
        template = manifold.template(counts)
        key = tuple(sorted(counts.items()))
        if key not in static_cache:
            static_cache[key] = {n: t.to(dev) for n, t in manifold.static_tensors(counts).items()}
        which = None
        if tc.tensor_fraction < 1:
            k = max(1, round(tc.tensor_fraction * n_pred))
            which = sorted(torch.randperm(n_pred, generator=gen)[:k].tolist())
        pred = predict_tensors(inr, builder, table, noise=tc.noise, generator=gen, which=which)
        if which is not None:
            with torch.no_grad():
                rest = [i for i in range(n_pred) if i not in set(which)]
                pred.update(predict_tensors(inr, builder, table, noise=0.0, which=rest))
        bound = _Bound(template, {**static_cache[key], **pred})
        task = loss_fn(bound, batch)
        loss = task
        recon = _recon_loss(inr, builder, full_table, targets, norms, tc.recon_fraction, tc.noise, gen, dev)
        loss = loss + tc.l1 * recon
        reg = sum(t.pow(2).sum() for t in pred.values())
        loss = loss + tc.l2 * reg
        if teacher is not None and isinstance(bound.last_output, torch.Tensor):
            with torch.no_grad():
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                t_out = teacher(x)
            loss = loss + tc.distill * F.kl_div(F.log_softmax(bound.last_output, -1), F.softmax(t_out, -1),
                                                reduction="batchmean")
        width = sum(counts.values()) / sum(full.values())
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {step} (width map {counts}, mean width "
                                f"{width:.2f}); lower train.lr or check the data and loss_fn")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(inr.parameters(), tc.grad_clip)
            if not torch.isfinite(gnorm):
                raise TrainingError(f"gradient norm became {gnorm.item()} at step {step} (mean width "
                                    f"{width:.2f}); lower train.lr or train.grad_clip")
        opt.step()
        sched.step()
        _ema_update(ema, inr, tc.ema, step)
        x0 = batch[0] if isinstance(batch, (tuple, list)) else batch
        seen += x0.shape[0] if isinstance(x0, torch.Tensor) and x0.dim() else 1
        rec = {"step": step, "loss": loss.item(), "task": task.item(), "recon": recon.item(), "width": width}
        if step % 10 == 0 or step == steps - 1:
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", task=f"{rec['task']:.4f}", width=f"{width:.2f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if eval_data is not None and tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < steps:
            manifold.inr = ema
            evals.append({"step": step + 1, **_eval_widths(manifold, eval_data, tc.eval_compressions, samples=1)})
            logger.info("step %d: %s", step + 1, evals[-1])
    bar.close()
    train_seconds = time.perf_counter() - t0
    manifold.inr = ema.cpu().eval()
    manifold.base = base.cpu().eval()
    manifold._templates.clear()
    info: dict[str, Any] = {"steps": steps, "seconds": round(time.perf_counter() - t_start, 1),
                            "train_seconds": round(train_seconds, 1), "images_per_s": round(seen / train_seconds, 1),
                            "history": history[-200:], "evals": evals}
    if eval_data is not None:
        info["base_metrics"] = evaluate(base, eval_data)
        info["final"] = _eval_widths(manifold, eval_data, tc.eval_compressions, samples=cfg.samples)
        logger.info("final: %s (base %s)", info["final"], info["base_metrics"])
    manifold.info = info
    return manifold


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def _recon_loss(inr: INR, builder: Any, table: Any, targets: list[torch.Tensor], norms: list[torch.Tensor],
                fraction: float, noise: float, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Magnitude-weighted reconstruction on a random subset of full-width rows.

    Per tensor: ``mean(w^2 * (w_hat - w)^2) / mean(w^2)^2`` (dimensionless), averaged over tensors.
    """
    rows = table.rows
    if fraction >= 1:
        idx = torch.arange(rows)
    else:
        idx = torch.nonzero(torch.rand(rows, generator=gen) < fraction).squeeze(1)  # (r,) sorted
    starts = torch.tensor([s for s, _ in table.segments] + [rows])
    seg_of = torch.searchsorted(starts, idx, right=True) - 1  # (r,) layout of each row
    counts = torch.bincount(seg_of, minlength=len(targets)).tolist()
    coords = table.coords[idx].clone()
    if noise > 0:
        coords[:, 1:3] += noise * (torch.rand(idx.shape[0], 2, generator=gen) * 2 - 1) * table.noise[idx]
    which = [k for k, c in enumerate(counts) if c > 0]
    segs, pos = [], 0
    for k in which:
        segs.append((pos, pos + counts[k]))
        pos += counts[k]
    outs = inr(coords.to(dev), segs, which)
    total = torch.zeros((), device=dev)
    for k, out, (s, e) in zip(which, outs, segs):
        local = (idx[s:e] - table.segments[k][0]).to(dev)
        w = targets[k].index_select(0, local)
        w_hat = out * table.fan_in[k]
        total = total + (w.pow(2) * (w_hat - w).pow(2)).mean() / norms[k].pow(2)
    return total / max(1, len(which))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    if decay <= 0:
        ema.load_state_dict(model.state_dict())
        return
    d = min(decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the model closely
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(d).add_(pm.detach(), alpha=1 - d)


def _eval_widths(manifold: Manifold, data: Iterable, compressions: tuple[float, ...], samples: int) -> dict:
    out = {}
    for g in compressions:
        net = manifold.sample(1.0 - g, samples=samples)
        out[f"{g:g}"] = evaluate(net, data)
    return out
