"""``morph()``: learn the weight manifold of a model (paper sections 3.2-3.4).

Pipeline: copy the model (folding its BatchNorms only when asked), find its
cliques, smooth each clique along its shortest Hamiltonian path, then train one
INR over every predicted tensor of every resizable clique. ``morph()`` reads as
its stages: :func:`_open_checkpoint` (the checkpoint to write or resume),
:func:`_new_manifold` (smoothed copy, cliques, layouts, the INR and its base
grids, calibration inputs), :func:`_start_training` (losses, optimiser, EMA,
restored state), :func:`_train_steps` (the loop) and :func:`_finish` (the
EMA's weights, ``info``, the final evaluation). Each step of the loop reads top
to bottom as named steps:

1. :func:`draw_step_widths`: the width maps of this step (with the sandwich
   rule, the narrowest width of the range plus one drawn from it);
2. ``_Step.forward``: for each width map, take the cached resized template,
   predict its weights from noisy coordinates, run the batch through
   ``torch.func.functional_call`` (kept BatchNorms normalise with the batch's
   statistics) and compute the losses,

       mean over width maps of [task + distill * KL to the base model]
         + l1 * magnitude-weighted reconstruction (full width, a random subset of tensors)
         + l2 * L2 of the predicted weights;

3. :func:`_update`: Adam with cosine decay, gradient clipping, the EMA of the
   INR (what the returned :class:`~morphkit.manifold.Manifold` samples from);
4. record, evaluate and checkpoint.

The caller's model is never modified; a run is deterministic for a seed.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from morphkit.checkpoint import (
    CHECKPOINT_NAME,
    TrainState,
    check_writable,
    load_checkpoint,
    optimizer_state,
    release_directory,
    restore_rng,
    run_fingerprint,
    save_checkpoint,
    split_prefix,
)
from morphkit.config import MorphConfig
from morphkit.coords import WidthMap, fan_dims_of, plan_layouts
from morphkit.errors import CheckpointError, ConfigError, TrainingError, UnsupportedModelError
from morphkit.fit import default_loss, evaluate, keeps_global_rng, show_progress, split_batch, to_device
from morphkit.inr import INR
from morphkit.manifold import Manifold, as_inputs, build_inr, predict_tensors
from morphkit.models import arch_of
from morphkit.untrusted import check_config_budget

__all__ = ["morph", "prepare_base", "draw_widths", "draw_step_widths", "collect_calibration", "MorphInterrupted"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: Width maps whose template, coordinate table and static tensors a run keeps built.
PLAN_CACHE = 64


class _Bound(nn.Module):
    """A template module bound to predicted tensors, callable like the model.

    The template stays in eval mode (dropout off) except its kept BatchNorms
    (``batch_norms``), which normalise with the batch's own statistics and
    update no running statistics: those of a sampled width are recomputed
    when it is sampled.
    """

    def __init__(self, template: nn.Module, tensors: dict[str, torch.Tensor],
                 batch_norms: list[nn.Module] = ()) -> None:  # type: ignore[assignment]
        super().__init__()
        self.template = template
        self.tensors = tensors
        self.batch_norms = list(batch_norms)
        self.last_output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        saved = [(m.training, m.track_running_stats) for m in self.batch_norms]
        try:
            for m in self.batch_norms:
                m.training, m.track_running_stats = True, False
            self.last_output = functional_call(self.template, self.tensors, args, kwargs, strict=True)
        finally:
            for m, (tr, track) in zip(self.batch_norms, saved):
                m.training, m.track_running_stats = tr, track
        return self.last_output


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers outside the state dict (``persistent=False``, e.g. Hugging Face's ``position_ids``).

    ``functional_call(strict=True)`` wants a tensor for every buffer; these are
    not predicted or resized, so the template's own are passed.
    """
    keys = set(model.state_dict())
    return {n: b for n, b in model.named_buffers() if n not in keys}


def kept_batch_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms of a (template) model that fusion did not fold: they normalise per width."""
    from morphkit.manifold import bn_modules_to_calibrate

    return bn_modules_to_calibrate(model)


def _check_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # any failure of the user's forward
        shapes = [tuple(t.shape) for t in inputs]
        raise UnsupportedModelError(f"the model's forward fails on example_inputs of shape {shapes}: "
                                    f"{type(e).__name__}: {e}; pass inputs the model accepts") from e


def prepare_base(model: nn.Module, example_inputs: Any, config: MorphConfig,
                 perms: dict[int, Any] | None = None) -> tuple[nn.Module, list, dict, bool]:
    """Copy, fuse BatchNorm, find cliques and smooth: the base the INR learns.

    Args:
        model: The caller's model (not modified).
        example_inputs: Inputs for tracing.
        config: Fusion and smoothing options.
        perms: Smoothing permutations to apply instead of solving (a resumed run).

    Returns:
        ``(base, cliques, perms, fused)``; ``base`` is a new module.
    """
    from morphkit.fuse import fuse_bn
    from morphkit.graph import find_cliques
    from morphkit.smooth import apply_permutation, smooth

    inputs = as_inputs(example_inputs)
    base = copy.deepcopy(model).cpu().eval()
    _check_forward(base, inputs)
    if config.fuse_bn:
        base = fuse_bn(base)
    cliques = find_cliques(base, inputs)  # cliques feeding a torch.cat morph too (coords: concatenated dims)
    if not any(not c.fixed for c in cliques):
        raise UnsupportedModelError(f"{type(model).__name__} has no resizable clique (all {len(cliques)} are "
                                    "fixed: see `morphkit cliques`); there is nothing to morph")
    if perms is not None:
        base = apply_permutation(base, cliques, perms) if perms else base
    elif config.smooth.enabled:
        base, perms = smooth(base, inputs, cliques, seed=config.smooth.seed, time_budget=config.smooth.time_budget)
    return base.eval(), cliques, perms or {}, bool(config.fuse_bn)


def draw_widths(cliques: list, low: float, high: float, per_clique: bool, gen: torch.Generator,
                spread: float = 0.0, floor: float | None = None) -> WidthMap:
    """Draw a width map: compression ~ U[low, high], global or per clique.

    With ``spread`` > 0 (and one global compression) each clique's width is
    the global width plus its own offset U(-spread, spread), clipped to
    ``[floor, 1 - low]`` (``floor`` defaults to ``1 - high``): maps with unequal
    cliques near the uniform ones, the maps a user (or ``search``) gives per
    clique.

    Example:
        >>> draw_widths(cliques, 0.0, 0.75, False, torch.Generator(), spread=0.2)  # doctest: +SKIP
        {0: 11, 1: 24, 2: 40}
    """
    def width() -> float:
        return 1.0 - (low + (high - low) * torch.rand((), generator=gen).item())

    w = width()
    if per_clique:
        return {c.id: c.channels_for(width()) for c in cliques}
    if spread <= 0:
        return {c.id: c.channels_for(w) for c in cliques}
    return _spread_map(cliques, w, spread, 1.0 - high if floor is None else floor, 1.0 - low, gen)


def _spread_map(cliques: list, w: float, spread: float, floor: float, top: float,
                gen: torch.Generator) -> WidthMap:
    """Each clique at width ``w`` plus its own offset U(-spread, spread), clipped to ``[floor, top]``."""
    offsets = (torch.rand(len(cliques), generator=gen) * 2 - 1) * spread  # (n_cliques,)
    return {c.id: c.channels_for(min(top, max(floor, w + float(o)))) for c, o in zip(cliques, offsets)}


def draw_step_widths(cliques: list, cfg: Any, gen: torch.Generator) -> list[WidthMap]:
    """The width maps one training step trains on the same batch.

    With ``cfg.sandwich`` (the default): the narrowest width of the range
    (compression ``high`` on every clique) and one map drawn from the range;
    otherwise the drawn map alone (the paper). With ``cfg.spread_below`` the
    per-clique offsets reach down to ``cfg.clique_floor()``, and in a share
    ``cfg.narrow_spread`` of the steps the narrowest map gets them too.

    Example:
        >>> maps = draw_step_widths(cliques, TrainConfig(), torch.Generator())  # doctest: +SKIP
        >>> len(maps)                                                            # doctest: +SKIP
        2
    """
    low, high = cfg.compression
    spread = cfg.clique_spread if not cfg.per_clique else 0.0
    below = cfg.spread_below and spread > 0
    floor = cfg.clique_floor() if below else None
    drawn = draw_widths(cliques, low, high, cfg.per_clique, gen, cfg.clique_spread, floor)
    if not cfg.sandwich:
        return [drawn]
    if below and float(torch.rand((), generator=gen)) < cfg.narrow_spread:
        narrowest = _spread_map(cliques, 1.0 - high, spread, floor, 1.0 - low, gen)
    else:
        narrowest = {c.id: c.channels_for(1.0 - high) for c in cliques}
    return [narrowest, drawn]


def collect_calibration(data: Iterable, count: int) -> torch.Tensor | None:
    """The first ``count`` inputs of a fresh pass over ``data``, stored to recalibrate BatchNorms per width.

    Returns None when ``count`` is 0, when ``data`` can be iterated only once
    (a generator: its batches are kept for training) or when its inputs are
    not finite floating-point tensors.

    Example:
        >>> collect_calibration([(torch.ones(4, 3), torch.zeros(4))] * 3, 10).shape
        torch.Size([10, 3])
    """
    if count <= 0 or isinstance(data, Iterator):  # iter() of a Loader would start (count) a pass
        return None
    epoch = int(getattr(data, "epoch", 0) or 0)
    got, n = [], 0
    try:
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 \
                    or not bool(torch.isfinite(x).all()):
                return None
            got.append(x[: count - n].detach().cpu())
            n += got[-1].shape[0]
            if n >= count:
                break
    finally:
        if hasattr(data, "set_epoch"):  # the training stream starts where it would have
            data.set_epoch(epoch)
    if not got:
        return None
    return torch.cat(got).float()  # (N, *input_shape)


def _stream(data: Iterable, state: TrainState, rank: int, world: int) -> Iterator[Any]:
    """This rank's batches, forever, keeping ``state.epoch``/``state.pos`` at the global data position.

    Batches are dealt in groups of ``world``: rank ``r`` takes the ``r``-th batch
    of each group and an incomplete last group is dropped, so every rank makes
    the same number of steps. A restored ``(epoch, pos)`` is replayed with the
    data's ``set_epoch`` (as :class:`~morphkit.data.Loader` has) and by skipping
    ``pos`` batches of that pass.
    """
    n_batches = len(data) if hasattr(data, "__len__") else None
    while True:
        if n_batches is not None and state.pos > 0 and state.pos >= n_batches - n_batches % world:
            state.epoch, state.pos = state.epoch + 1, 0
        if hasattr(data, "set_epoch"):
            data.set_epoch(state.start_epoch + state.epoch)
        skip, group, empty = state.pos, [], True
        for i, batch in enumerate(data):
            empty = False
            if i < skip:
                continue
            group.append(batch)
            if len(group) == world:
                state.pos = i + 1
                yield group[rank]
                group = []
        if empty:
            raise ConfigError("train_data yielded no batches; pass a non-empty iterable of (x, y) batches")
        if skip == 0 and state.pos == 0:
            raise ConfigError(f"train_data has fewer batches per pass than processes ({world}); "
                              "use smaller batches or fewer processes")
        state.epoch, state.pos = state.epoch + 1, 0


@dataclass
class _WidthPlan:
    """What one width map needs each time it is trained (built once, cached)."""

    counts: WidthMap
    table: Any  # CoordTable of the width map
    template: nn.Module  # the base structure resized to it
    static: dict[str, torch.Tensor]  # static tensors sliced to it, on the training device
    batch_norms: list[nn.Module]  # the template's kept BatchNorms (batch statistics in training)


class _Step(nn.Module):
    """One training step's loss as a module, so DistributedDataParallel can wrap it.

    Holds the INR (the only trainable part); everything else (the coordinate
    builder, the reconstruction targets, the teacher) is plain data passed in or
    kept outside the module tree.
    """

    def __init__(self, inr: INR, builder: Any, full_table: Any, targets: list[torch.Tensor],
                 norms: list[torch.Tensor], loss_fn: LossFn, cfg: MorphConfig, teacher: nn.Module | None) -> None:
        super().__init__()
        self.inr = inr
        self._ctx = (builder, full_table, targets, norms, loss_fn, cfg, teacher)  # not submodules

    def forward(self, batch: Any, plans: list[_WidthPlan], which: list[int] | None,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, task, recon)``: the step's loss, its task part (mean over width maps) and reconstruction."""
        builder, full_table, targets, norms, loss_fn, cfg, teacher = self._ctx
        tc = cfg.train
        t_out = None
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(split_batch(batch)[0])  # the teacher runs only with the default loss
        tasks, fits, l2s = [], [], []  # per width map
        for plan in plans:
            pred = self._predict(plan, which, gen)
            bound = _Bound(plan.template, {**plan.static, **pred}, plan.batch_norms)
            task = loss_fn(bound, batch)
            tasks.append(task.detach())
            fits.append(task + self._distill(bound.last_output, t_out, tc.distill))
            l2s.append(sum(t.pow(2).sum() for t in pred.values()))
        fit = torch.stack(fits).mean()
        recon = _recon_loss(self.inr, full_table, targets, norms, tc.recon_fraction, tc.noise, gen, fit.device)
        loss = fit + tc.l1 * recon + tc.l2 * torch.stack(l2s).mean()
        return loss, torch.stack(tasks).mean(), recon.detach()

    def _predict(self, plan: _WidthPlan, which: list[int] | None, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The width map's predicted tensors, one noisy draw (``which``: the ones trained this step)."""
        builder, _, _, _, _, cfg, _ = self._ctx
        tc = cfg.train
        pred = predict_tensors(self.inr, builder, plan.table, noise=tc.noise, generator=gen, which=which,
                               jitter=tc.base_jitter)
        if which is not None:
            with torch.no_grad():
                chosen = set(which)
                rest = [i for i in range(len(builder.layouts)) if i not in chosen]
                pred.update(predict_tensors(self.inr, builder, plan.table, noise=0.0, which=rest))
        return pred

    @staticmethod
    def _distill(out: Any, t_out: Any, weight: float) -> torch.Tensor:
        """``weight`` * KL(teacher || student) of the outputs' softmax, where both are ``(batch, classes)`` logits."""
        if weight <= 0 or not isinstance(out, torch.Tensor) or not isinstance(t_out, torch.Tensor) \
                or out.shape != t_out.shape or out.dim() != 2:
            return torch.zeros((), device=out.device if isinstance(out, torch.Tensor) else None)
        return weight * F.kl_div(F.log_softmax(out, -1), F.softmax(t_out, -1), reduction="batchmean")


def _distributed(dev: torch.device) -> tuple[int, int, bool]:
    """``(rank, world_size, initialised_here)``; joins a ``torchrun`` group when launched by one."""
    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


class MorphInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped ``morph()`` after it wrote a checkpoint (resume with ``resume=True``)."""


class _Interrupt:
    """Turns SIGINT into a flag checked between steps (only while a checkpoint directory is set)."""

    def __init__(self, active: bool) -> None:
        self.hit = False
        self._old: Any = None
        self.active = active and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _Interrupt:
        if self.active:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.hit = True
        logger.warning("interrupt received: writing a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._old)


def _any_rank(flag: bool, world: int, dev: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclass
class _Checkpoint:
    """Where a run checkpoints, what it resumes from, and the fingerprint that ties the two."""

    path: Path | None = None
    loaded: tuple[dict, dict] | None = None  # (tensors, metadata) of the checkpoint resumed
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def perms(self) -> dict[int, list[int]] | None:
        """The smoothing permutations of the run resumed (None: smooth afresh)."""
        return None if self.loaded is None else {int(k): v for k, v in self.loaded[1]["perms"].items()}


@dataclass
class _Run:
    """What a run trains and checkpoints: built by :func:`_start_training`, advanced by :func:`_train_steps`."""

    inr: INR
    ema: nn.Module  # the EMA of ``inr``: what the manifold samples from
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator  # every random draw of the steps (widths, noise, tensor subsets)
    state: TrainState
    steps: int
    runner: nn.Module  # the ``_Step`` (wrapped in DistributedDataParallel under torchrun)
    dev: torch.device
    rank: int
    world: int


@keeps_global_rng
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
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
) -> Manifold:
    """Learn the weight manifold of ``model``.

    Every width of ``config.train.compression`` is trained (each step the
    narrowest and a drawn one, the sandwich rule). BatchNorms are kept by
    default: they normalise with batch statistics while the INR trains, and the
    first ``config.calib_samples`` inputs of a fresh pass over ``train_data``
    are stored in the manifold so each sampled width gets its own running
    statistics (a one-pass iterable stores none: pass ``calib_data`` to
    ``sample`` then).

    Under ``torchrun --nproc-per-node N`` each process joins the group (gloo on
    CPU, nccl on GPU), draws its own widths and noise (seed + rank), takes every
    N-th batch, and DistributedDataParallel averages the INR's gradients; an
    epoch is one pass over the data by all processes together, so ``epochs``
    means the same data budget at any N. Rank 0 alone writes checkpoints.

    Args:
        model: A trained network (never modified).
        train_data: Iterable of batches (``(x, y)`` for classification). For a
            bit-exact resume its order must depend only on the pass number, as
            with :class:`~morphkit.data.Loader` (``set_epoch``) or a list.
        example_inputs: A tensor or tuple of tensors the model accepts (for tracing).
        config: A :class:`MorphConfig` (default settings when None).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross-entropy
            (the ELBO for the registry VAE).
        eval_data: Batches for the periodic and final evaluation (optional).
        progress: Show a tqdm bar.
        device: Where to train (default: CUDA if available, else CPU; under
            torchrun with CUDA, the process's ``LOCAL_RANK`` GPU).
        checkpoint_dir: Write ``checkpoint.safetensors`` there every
            ``checkpoint_every`` steps, at the end, and on Ctrl-C (SIGINT), after
            which ``KeyboardInterrupt`` is raised. Checked for writability
            before any work starts.
        resume: Continue from the checkpoint in ``checkpoint_dir`` (start from
            step 0 if there is none). The result is bit-identical on the CPU to
            an uninterrupted run with the same seed.
        checkpoint_every: Steps between checkpoints.

    Returns:
        The :class:`~morphkit.manifold.Manifold`.

    Raises:
        ConfigError: bad config or data; ``resume`` without ``checkpoint_dir``.
        CheckpointError: unwritable ``checkpoint_dir``; a checkpoint already
            there without ``resume``; a checkpoint of a different run.
        TrainingError: a non-finite loss or gradient (the last checkpoint is kept).
        UnsupportedModelError: the model cannot be traced or has nothing to morph.

    Example:
        >>> import morphkit as mk
        >>> cfg = mk.MorphConfig(train=mk.TrainConfig(steps=20))
        >>> manifold = mk.morph(net, loader, example_inputs=x, config=cfg)  # doctest: +SKIP
        >>> small = manifold.sample(0.5)                                    # doctest: +SKIP
    """
    cfg = _checked_config(config, checkpoint_dir, resume, checkpoint_every)
    from morphkit.fit import default_device

    dev = torch.device(device) if device is not None else default_device()
    rank, world, owns_group = _distributed(dev)
    try:
        if world > 1 and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        inputs = as_inputs(example_inputs)
        ckpt = _open_checkpoint(model, cfg, checkpoint_dir, resume, rank, world, dev)
        torch.manual_seed(cfg.train.seed)
        t_start = time.perf_counter()
        manifold, state_dict = _new_manifold(model, inputs, train_data, cfg, ckpt.perms, rank, world)
        own_loss = loss_fn is not None
        run = _start_training(manifold, state_dict, train_data, cfg, loss_fn if own_loss else default_loss(model),
                              own_loss, ckpt, dev, rank, world)
        train_seconds, step_times = _train_steps(run, manifold, train_data, eval_data, ckpt, checkpoint_every,
                                                 progress, checkpoint_dir)
        return _finish(manifold, run, eval_data, t_start, train_seconds, step_times)
    finally:
        if checkpoint_dir is not None and rank == 0:  # the lock check_writable took for this run
            release_directory(checkpoint_dir)
        if owns_group:  # also after an error, so a later call can start a new group
            dist.destroy_process_group()


def _checked_config(config: MorphConfig | None, checkpoint_dir: str | Path | None, resume: bool,
                    checkpoint_every: int) -> MorphConfig:
    """``config`` (or the default) after the checks that need no model: budget, checkpoint arguments."""
    cfg = config or MorphConfig()
    if not isinstance(cfg, MorphConfig):
        raise ConfigError(f"config must be a MorphConfig, got {type(cfg).__name__}")
    check_config_budget(cfg)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be an int >= 1 (steps), got {checkpoint_every!r}")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs checkpoint_dir (the directory of the run to continue)")
    return cfg


def _open_checkpoint(model: nn.Module, cfg: MorphConfig, checkpoint_dir: str | Path | None, resume: bool,
                     rank: int, world: int, dev: torch.device) -> _Checkpoint:
    """Check ``checkpoint_dir`` is writable (by rank 0, for every rank) and load the checkpoint to resume."""
    if checkpoint_dir is None:
        return _Checkpoint()
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    failure: Exception | None = None
    if rank == 0:
        try:
            check_writable(checkpoint_dir)
        except CheckpointError as e:
            failure = e
    if _any_rank(failure is not None, world, dev):
        raise failure or CheckpointError(f"rank 0 cannot write to {str(checkpoint_dir)!r}; see its error")
    fingerprint = run_fingerprint(model, cfg.to_dict(), world)
    loaded = None
    if path.is_file():
        if not resume:
            raise CheckpointError(f"{str(path)!r} already holds a checkpoint; pass resume=True "
                                  "(--resume) to continue it, or use another checkpoint directory")
        loaded = load_checkpoint(path, fingerprint)
        logger.info("resuming from %s at step %d", path, loaded[1]["state"]["step"])
    elif resume:
        logger.info("no checkpoint in %s yet: starting from step 0", checkpoint_dir)
    return _Checkpoint(path, loaded, fingerprint)


def _new_manifold(model: nn.Module, inputs: tuple[Any, ...], train_data: Iterable, cfg: MorphConfig,
                  old_perms: dict[int, list[int]] | None, rank: int, world: int
                  ) -> tuple[Manifold, dict[str, torch.Tensor]]:
    """The untrained manifold of ``model`` (smoothed copy, cliques, layouts, INR with base grids, calibration
    inputs) and the smoothed base's state dict."""
    if world > 1 and old_perms is None and cfg.smooth.enabled and cfg.smooth.time_budget is not None:
        # a timed solve differs between processes: rank 0's order is used by every rank
        box = [prepare_base(model, inputs, cfg)[2] if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        old_perms = box[0]
    base, cliques, perms, fused = prepare_base(model, inputs, cfg, perms=old_perms)
    state_dict = base.state_dict()
    layouts, static_names = plan_layouts(cliques, state_dict, {n for n, _ in base.named_parameters()},
                                         fan_dims_of(base))
    if not layouts:
        raise UnsupportedModelError("no tensor of this model depends on a resizable clique; nothing to learn")
    static = {n: state_dict[n].detach().clone() for n in static_names}
    inr = build_inr(layouts, cfg)
    calib = None
    if not fused and kept_batch_norms(base):
        if len(inputs) == 1:  # BatchNorm recalibration feeds the first element of each batch
            calib = collect_calibration(train_data, min(cfg.calib_samples, _calib_cap(inputs)))
        if calib is None:
            logger.warning("no calibration inputs stored (calib_samples=0, a one-pass iterable, several or "
                           "non-finite or non-float inputs): pass calib_data= to Manifold.sample to get "
                           "BatchNorm statistics per width")
    manifold = Manifold(inr, cliques, layouts, static, base, inputs, cfg, arch_of(model), perms, fused_bn=fused,
                        calib=calib)
    if inr.residual:
        inr.set_grids([manifold.builder.grid(k, state_dict[lt.name].detach().float())
                       for k, lt in enumerate(layouts)])
    logger.info("morph: %d cliques (%d resizable), %d predicted tensors, %d static, INR %d params",
                len(cliques), sum(not c.fixed for c in cliques), len(layouts), len(static),
                sum(p.numel() for p in inr.parameters()))
    return manifold, state_dict


def _start_training(manifold: Manifold, state_dict: dict[str, torch.Tensor], train_data: Iterable,
                    cfg: MorphConfig, loss_fn: LossFn, own_loss: bool, ckpt: _Checkpoint, dev: torch.device,
                    rank: int, world: int) -> _Run:
    """The step module (losses), the optimiser and schedule, the EMA and generator, restored from
    ``ckpt`` when it resumes a run (``own_loss``: ``loss_fn`` is the caller's, so no distillation)."""
    tc, inr, builder = cfg.train, manifold.inr, manifold.builder
    if cfg.inr.precision == "bfloat16" and dev.type == "cpu" and not _fast_cpu_bf16():
        logger.warning("inr.precision='bfloat16' on a CPU without AVX512-BF16/AMX: bfloat16 matrix products "
                       "are emulated there and slower than float32; use precision='float32'")
    # reconstruction targets: the smoothed base tensors as rows of the full-width table
    full_table = builder.table(builder.full())
    targets = [builder.to_rows(k, full_table, state_dict[lt.name].detach().float()).to(dev)
               for k, lt in enumerate(manifold.layouts)]
    norms = [t.pow(2).mean().clamp_min(1e-12) for t in targets]

    inr.to(dev).train()
    ema = copy.deepcopy(inr).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    per_pass = len(train_data) // world if hasattr(train_data, "__len__") else 1
    steps = tc.steps or tc.epochs * max(1, per_pass)
    grids = [p for n, p in inr.named_parameters() if n.startswith("grid")]  # train_base: the base grids
    rest = [p for n, p in inr.named_parameters() if not n.startswith("grid")]
    groups = [{"params": rest}] + ([{"params": grids, "lr": tc.lr * tc.base_lr_scale}] if grids else [])
    opt = torch.optim.Adam(groups, lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)  # one kernel per op
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(tc.seed + rank)
    base = manifold.base
    teacher = base.to(dev) if tc.distill > 0 and not own_loss and _logits_model(base, manifold.example_inputs) \
        else None
    state = TrainState(start_epoch=int(getattr(train_data, "epoch", 0) or 0))
    if ckpt.loaded is not None:
        tensors, meta = ckpt.loaded
        if int(meta["total_steps"]) != steps:
            raise CheckpointError(f"checkpoint {str(ckpt.path)!r} is of a {meta['total_steps']}-step run, this "
                                  f"run has {steps} steps (different data size?); resume with the same data")
        inr.load_state_dict(split_prefix(tensors, "inr"))
        ema.load_state_dict(split_prefix(tensors, "ema"))
        opt.load_state_dict(optimizer_state(tensors, meta))
        sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None]})
        gen.set_state(tensors[f"rng.gen.{rank}"])
        state = TrainState(**meta["state"])
    runner: nn.Module = _Step(inr, builder, full_table, targets, norms, loss_fn, cfg, teacher)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(runner, device_ids=[dev.index] if dev.type == "cuda" else None,
                                         find_unused_parameters=tc.tensor_fraction < 1)
    return _Run(inr, ema, opt, sched, gen, state, steps, runner, dev, rank, world)


def _write_checkpoint(run: _Run, ckpt: _Checkpoint, perms: dict[int, list[int]]) -> None:
    """Save the run to ``ckpt.path`` (rank 0, with every rank's generator state); nothing without a path."""
    if ckpt.path is None:
        return
    gens = [run.gen.get_state()]
    if run.world > 1:
        mine = run.gen.get_state().to(run.dev)  # nccl gathers on the GPU, gloo on the CPU
        gens = [torch.empty_like(mine) for _ in range(run.world)]
        dist.all_gather(gens, mine)
        gens = [g.cpu() for g in gens]
    if run.rank == 0:
        save_checkpoint(ckpt.path, inr=run.inr, ema=run.ema, optimizer=run.opt, scheduler=run.sched,
                        generators=gens, perms=perms, state=run.state, total_steps=run.steps,
                        fingerprint=ckpt.fingerprint)
        logger.info("checkpoint at step %d written to %s", run.state.step, ckpt.path)


class _Plans:
    """Width maps' plans (template, coordinate table, static tensors), the ``PLAN_CACHE`` last used kept."""

    def __init__(self, manifold: Manifold, dev: torch.device) -> None:
        self.manifold, self.dev = manifold, dev
        self._cache: dict[tuple, _WidthPlan] = {}

    def __call__(self, counts: WidthMap) -> _WidthPlan:
        key = tuple(sorted(counts.items()))
        plan = self._cache.pop(key, None)
        if plan is None:
            m = self.manifold
            template = m.template(counts)
            static = {**_non_persistent_buffers(template), **m.static_tensors(counts)}
            plan = _WidthPlan(counts, m.builder.table(counts), template,
                              {n: t.to(self.dev) for n, t in static.items()},
                              kept_batch_norms(template) if not m.fused_bn else [])
        self._cache[key] = plan
        while len(self._cache) > PLAN_CACHE:
            self._cache.pop(next(iter(self._cache)))
        return plan


def _train_steps(run: _Run, manifold: Manifold, train_data: Iterable, eval_data: Iterable | None,
                 ckpt: _Checkpoint, checkpoint_every: int, progress: bool, checkpoint_dir: str | Path | None
                 ) -> tuple[float, list[float]]:
    """Run the steps from ``run.state.step`` to ``run.steps``: ``(training seconds, each step's wall time)``.

    Each step: draw its width maps, predict and run them (losses), update, then
    record, evaluate and checkpoint on schedule. Ctrl-C writes a checkpoint and
    raises :class:`MorphInterrupted`.
    """
    tc, state, dev, world, rank = manifold.config.train, run.state, run.dev, run.world, run.rank
    if ckpt.loaded is not None:
        restore_rng(*_rng_part(ckpt.loaded))
    plan_for = _Plans(manifold, dev)
    cliques, n_pred = manifold.cliques, len(manifold.layouts)
    full_channels = sum(manifold.builder.full().values())
    data_iter = _stream(train_data, state, rank, world)
    t0 = time.perf_counter() - state.train_seconds
    bar = tqdm(range(state.step, run.steps), desc="morph", disable=not show_progress(progress) or rank != 0,
               initial=state.step, total=run.steps)
    step_times: list[float] = []  # wall time of each step of this call (no evaluation, no checkpoint)
    with _Interrupt(ckpt.path is not None) as interrupt:
        for step in bar:
            t_step = time.perf_counter()
            if _any_rank(interrupt.hit, world, dev):
                state.train_seconds = time.perf_counter() - t0
                _write_checkpoint(run, ckpt, manifold.perms)
                bar.close()
                raise MorphInterrupted(f"morph interrupted at step {step}; checkpoint in {checkpoint_dir}")
            batch = to_device(next(data_iter), dev)
            # 1. the width maps of this step
            maps = draw_step_widths(cliques, tc, run.gen)
            counts = maps[-1]  # the drawn one (the first is the narrowest under the sandwich rule)
            width = sum(counts.values()) / full_channels
            which = None
            if tc.tensor_fraction < 1:
                k = max(1, round(tc.tensor_fraction * n_pred))
                which = sorted(torch.randperm(n_pred, generator=run.gen)[:k].tolist())
            # 2. predict each map's weights, run the batch, the losses
            loss, task, recon = run.runner(batch, [plan_for(m) for m in maps], which, run.gen)
            if _any_rank(not bool(torch.isfinite(loss)), world, dev):
                what = (loss.item() if world == 1 else
                        f"non-finite on one of {world} processes ({loss.item()} on rank {rank})")
                raise TrainingError(f"loss became {what} at step {step} (width map {counts}, mean width "
                                    f"{width:.2f}); the last checkpoint is kept; lower train.lr or check the "
                                    "data and loss_fn")
            # 3. the update
            _update(loss, run.inr, run.ema, run.opt, run.sched, tc, step, width)
            step_times.append(time.perf_counter() - t_step)
            # 4. record, evaluate, checkpoint
            x0 = batch[0] if isinstance(batch, (tuple, list)) else batch
            state.seen += x0.shape[0] if isinstance(x0, torch.Tensor) and x0.dim() else 1
            state.step = step + 1
            rec = {"step": step, "loss": loss.item(), "task": task.item(), "recon": recon.item(), "width": width}
            if step % 10 == 0 or step == run.steps - 1:
                state.history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", task=f"{rec['task']:.4f}", width=f"{width:.2f}",
                                img_s=f"{world * state.seen / max(1e-9, time.perf_counter() - t0):.0f}")
            if (eval_data is not None and rank == 0 and tc.eval_every and (step + 1) % tc.eval_every == 0
                    and step + 1 < run.steps):
                manifold.inr = run.ema
                state.evals.append({"step": step + 1,
                                    **_eval_widths(manifold, eval_data, tc.eval_compressions, samples=1)})
                logger.info("step %d: %s", step + 1, state.evals[-1])
            if state.step % checkpoint_every == 0 or state.step == run.steps:
                state.train_seconds = time.perf_counter() - t0
                _write_checkpoint(run, ckpt, manifold.perms)
    bar.close()
    return time.perf_counter() - t0, step_times


def _finish(manifold: Manifold, run: _Run, eval_data: Iterable | None, t_start: float, train_seconds: float,
            step_times: list[float]) -> Manifold:
    """The trained manifold: the EMA's weights on the CPU, the run's figures in ``info``, the final evaluation."""
    manifold.inr = run.ema.cpu().eval()
    manifold.base = manifold.base.cpu().eval()
    manifold._templates.clear()
    state, world = run.state, run.world
    info: dict[str, Any] = {"steps": run.steps, "seconds": round(time.perf_counter() - t_start, 1),
                            "train_seconds": round(train_seconds, 3), "world_size": world,
                            "images_per_s": round(world * state.seen / max(train_seconds, 1e-9), 1),
                            "median_step_seconds": round(statistics.median(step_times), 6) if step_times else None,
                            "history": state.history[-200:], "evals": state.evals}
    if eval_data is not None and run.rank == 0:
        info["base_metrics"] = evaluate(manifold.base, eval_data)
        info["final"] = _eval_widths(manifold, eval_data, manifold.config.train.eval_compressions,
                                     samples=manifold.config.samples)
        logger.info("final: %s (base %s)", info["final"], info["base_metrics"])
    manifold.info = info
    return manifold


def _update(loss: torch.Tensor, inr: INR, ema: nn.Module, opt: torch.optim.Optimizer, sched: Any,
            tc: Any, step: int, width: float) -> None:
    """Backward, clip, Adam step, learning-rate schedule, EMA; raises TrainingError on a non-finite gradient."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(inr.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
    if not torch.isfinite(gnorm):
        raise TrainingError(f"gradient norm became {gnorm.item()} at step {step} (mean width "
                            f"{width:.2f}); the last checkpoint is kept; lower train.lr or train.grad_clip")
    opt.step()
    sched.step()
    _ema_update(ema, inr, tc.ema, step)


def _logits_model(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether the model's output is one ``(batch, classes)`` tensor: where distillation applies."""
    with torch.no_grad():
        out = model(*inputs)
    return isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1


def _fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _calib_cap(inputs: tuple[torch.Tensor, ...]) -> int:
    """How many calibration inputs fit the stored limit (MAX_CALIB_ELEMENTS numbers)."""
    from morphkit.manifold import MAX_CALIB_ELEMENTS

    per = max(1, inputs[0][0].numel()) if inputs[0].dim() else 1
    return max(1, MAX_CALIB_ELEMENTS // per)


def _rng_part(loaded: tuple[dict, dict]) -> tuple[dict, dict]:
    tensors, meta = loaded
    return {k: v for k, v in tensors.items() if k.startswith("rng.")}, meta["rng"]


def _recon_loss(inr: INR, table: Any, targets: list[torch.Tensor], norms: list[torch.Tensor],
                fraction: float, noise: float, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Magnitude-weighted reconstruction of a random subset of tensors at full width.

    Per tensor: ``mean(w^2 * (w_hat - w)^2) / mean(w^2)^2`` (dimensionless),
    averaged over ``max(1, round(fraction * n))`` tensors drawn afresh each
    step (every row of each): an unbiased estimate of the average over all
    tensors at a fraction of the per-tensor work, which on small networks is
    mostly fixed cost per tensor (LeNet-5: 1.1 ms per step instead of 3.6 ms
    for a quarter of every tensor's rows).
    """
    n = len(targets)
    k = max(1, round(fraction * n)) if fraction < 1 else n
    which = sorted(torch.randperm(n, generator=gen)[:k].tolist()) if k < n else list(range(n))
    idx = torch.cat([torch.arange(*table.segments[j]) for j in which])  # (r,) rows of the chosen tensors
    clean = table.coords[idx]
    coords = clean.clone()
    if noise > 0:
        coords[:, 1:3] += noise * (torch.rand(idx.shape[0], 2, generator=gen) * 2 - 1) * table.noise[idx]
    segs, pos = [], 0
    for j in which:
        rows = table.segments[j][1] - table.segments[j][0]
        segs.append((pos, pos + rows))
        pos += rows
    bases = None
    if inr.residual and inr.resample == "area":  # full width: area_base is the grid itself
        bases = [inr.area_base(j, *table.cells[j]) for j in which]
    outs = inr(coords.to(dev), segs, which, clean=clean.to(dev), bases=bases,
               cells=[table.cells[j] for j in which])
    total = torch.zeros((), device=dev)
    for j, out in zip(which, outs):
        w = targets[j]
        total = total + (w.pow(2) * (out * table.fan_in[j] - w).pow(2)).mean() / norms[j].pow(2)
    return total / len(which)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    if decay <= 0:
        ema.load_state_dict(model.state_dict())
        return
    d = min(decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the model closely
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)  # e + (1-d)(m-e)


def _eval_widths(manifold: Manifold, data: Iterable, compressions: tuple[float, ...], samples: int) -> dict:
    out = {}
    for g in compressions:
        net = manifold.sample(1.0 - g, samples=samples)
        out[f"{g:g}"] = evaluate(net, data)
    return out
