"""Plain supervised training and evaluation loops.

Used to train base models (``morphkit train``), to fine-tune pruned baselines
and by the benchmarks. Data is any iterable of ``(x, y)`` batches (morphkit's
loaders, a ``DataLoader``, a list). ``fit`` trains a copy and never touches the
caller's model; it is deterministic for a seed on the CPU.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from morphkit.errors import ConfigError, TrainingError
from morphkit.models import task_of, vae_loss

__all__ = ["fit", "evaluate", "show_progress", "FitHistory", "default_device", "classification_loss", "default_loss",
           "to_device",
           "split_batch", "logits_of", "check_labels", "task_for", "mean_iou", "METRIC_OF_TASK", "HIGHER_IS_BETTER",
           "keeps_global_rng", "folded_bn_names"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
_F = TypeVar("_F", bound=Callable[..., Any])


def show_progress(progress: bool) -> bool:
    """Whether to draw a tqdm bar: asked for, and stderr is a terminal (or a Jupyter kernel).

    Bars written to a file or a pipe are thousands of carriage-return lines in a
    log, so every progress bar of the API is off there even with ``progress=True``.

    Example:
        >>> show_progress(False)
        False
    """
    import sys

    if not progress:
        return False
    if "ipykernel" in sys.modules:
        return True
    err = sys.stderr
    try:
        return err is not None and err.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def keeps_global_rng(fn: _F) -> _F:
    """Run ``fn`` on a fork of torch's global RNG: the caller's state is restored afterwards.

    Our training entry points seed the global generator for determinism
    (``torch.manual_seed``: dropout, data augmentation, init); this keeps
    that from changing the random numbers the caller draws afterwards. The
    CPU generator is always restored, a CUDA one only for the current device
    and only when CUDA is already initialised (reading another device's state
    would open a context on it in every process of a multi-GPU run).

    Example:
        >>> @keeps_global_rng
        ... def noisy():
        ...     torch.manual_seed(0)
        ...     return torch.rand(1)
        >>> g = torch.random.get_rng_state(); _ = noisy(); bool((torch.random.get_rng_state() == g).all())
        True
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def folded_bn_names(model: nn.Module) -> list[str]:
    """Names of the BatchNorms :func:`~morphkit.fuse.fuse_bn` folded (identities that must stay in eval mode).

    A model from ``fuse_bn`` lists them in ``morphkit_fused_bn``; a sampled
    model only records that fusion happened (``True``), so there every
    BatchNorm that is an identity up to its bias counts.

    Example:
        >>> import morphkit as mk
        >>> folded_bn_names(mk.fuse_bn(mk.build_model("resnet20")))[:2]
        ['bn1', 'layer1.0.bn1']
    """
    fused = getattr(model, "morphkit_fused_bn", None)
    if isinstance(fused, (list, tuple)):
        return [str(n) for n in fused]
    if fused:
        return [name for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                and bool((m.running_mean == 0).all()) and (m.weight is None or bool((m.weight == 1).all()))]
    return []


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a tensor or a (nested) tuple/list of tensors to ``device``; other objects pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch: an ``(x, y, ...)`` tuple or list.

    morphkit's default loss and :func:`evaluate` take such batches. A loader
    that yields dicts (Hugging Face style) is adapted with a generator, e.g.
    ``[(b["pixel_values"], b["labels"]) for b in loader]``, or handled by your
    own ``loss_fn(model, batch)`` (``morph``, ``fit``).

    Raises:
        ConfigError: a dict or any other batch, naming what it holds.

    Example:
        >>> split_batch((torch.zeros(2, 3), torch.zeros(2)))[1].shape
        torch.Size([2])
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        keys = ", ".join(repr(k) for k in list(batch)[:6])
        raise ConfigError(f"a batch is a dict (keys {keys:.200}); morphkit's default loss and evaluate take "
                          "(inputs, target) tuples: adapt the loader, e.g. [(b['image'], b['label']) for b in "
                          "loader], or pass loss_fn(model, batch) to morph() / fit()")
    what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise ConfigError(f"a batch is {what}; expected an (inputs, target) tuple such as (x, y), or pass "
                      "loss_fn(model, batch) to morph() / fit() for other batches")


def logits_of(out: Any) -> torch.Tensor:
    """The model's output as a logits tensor.

    A torchvision segmentation model's ``{"out": logits, "aux": ...}`` gives its
    ``"out"``; other dicts and tuples are refused with what they hold.

    Raises:
        UnsupportedModelError: the forward returned something other than a tensor.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor):
        return out["out"]  # torchvision segmentation models: {"out": logits, "aux": ...}
    from morphkit.errors import UnsupportedModelError

    if isinstance(out, dict):
        held = f"a dict with keys {', '.join(repr(k) for k in list(out)[:6]):.200}"
    elif isinstance(out, (tuple, list)):
        held = f"a {type(out).__name__} of {len(out)} items"
    else:
        held = f"a {type(out).__name__}"
    raise UnsupportedModelError(f"the model returned {held}, not a tensor of logits; morphkit's default loss and "
                                "evaluate need the logits: wrap the model so forward returns them (e.g. a module "
                                "whose forward is `return self.net(x)['logits']`), or pass loss_fn(model, batch) "
                                "to morph() / fit()")


def check_labels(y: Any, logits: torch.Tensor) -> None:
    """Class-index targets must lie in ``[0, classes)`` of the logits (a clear error instead of an index error).

    Raises:
        ConfigError: a label below 0 or not below the number of model outputs.
    """
    if not (isinstance(y, torch.Tensor) and not y.is_floating_point() and y.numel() and logits.dim() >= 2):
        return
    lo, hi, classes = int(y.min()), int(y.max()), logits.shape[1]
    if lo < 0 or hi >= classes:
        raise ConfigError(f"labels must be class indices in [0, {classes}) for a model with {classes} outputs, got "
                          f"labels from {lo} to {hi}; does the data fit the model (its num_classes)?")


def _forward(model: nn.Module, x: Any) -> Any:
    """``model(x)``, a failure on the data named (wrong channels, image size, dtype) rather than raw."""
    try:
        return model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        from morphkit.errors import UnsupportedModelError

        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = f" {x.dtype}".replace("torch.", "") if isinstance(x, torch.Tensor) else ""
        raise UnsupportedModelError(f"the model cannot run on this data (a batch of shape {shape}{dtype}): "
                                    f"{type(e).__name__}: {str(e)[:300]}; does the data fit the model (channels, "
                                    "image size)?") from e


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy on ``(x, y)`` batches, as a ``loss_fn(model, batch)``.

    The first batch's labels are checked against the model's outputs
    (:func:`check_labels`); batches and outputs of other kinds are refused by
    :func:`split_batch` and :func:`logits_of`.
    """
    checked = [False]

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = split_batch(batch)
        out = logits_of(model(x))
        if not checked[0]:
            check_labels(y, out)
            checked[0] = True
        return F.cross_entropy(out, y, label_smoothing=label_smoothing)

    return loss_fn


@dataclass
class FitHistory:
    """What ``fit`` measured, one entry per epoch."""

    train_loss: list[float] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0


def default_loss(model: nn.Module, label_smoothing: float = 0.0) -> LossFn:
    """The training loss morphkit uses when none is given: the ELBO for the registry VAE, else cross-entropy."""
    return vae_loss if task_of(model) == "vae" else classification_loss(label_smoothing)


@keeps_global_rng
def fit(
    model: nn.Module,
    train_data: Iterable,
    *,
    epochs: int,
    eval_data: Iterable | None = None,
    loss_fn: LossFn | None = None,
    optimizer: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    warmup_epochs: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> tuple[nn.Module, FitHistory]:
    """Train a copy of ``model`` with a cosine learning-rate schedule.

    BatchNorms that :func:`~morphkit.fuse.fuse_bn` folded stay in eval mode
    (identities); every other module trains as usual.

    Args:
        model: The network; it is copied, never modified.
        train_data: Iterable of batches; iterated once per epoch (``len()`` used for the schedule).
        epochs: Number of passes over ``train_data``.
        eval_data: Batches evaluated after every epoch (optional).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross-entropy
            (ELBO for the registry VAE).
        optimizer: ``"sgd"`` (momentum, nesterov) or ``"adam"`` (AdamW).
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: Weight decay.
        label_smoothing: Cross-entropy label smoothing (default loss only).
        warmup_epochs: Linear warm-up length before the cosine decay.
        seed: Seed for initialisation-free randomness (dropout, VAE sampling).
        device: Where to train (default: CUDA if available, else CPU).
        precision: ``"fp32"``, or ``"bf16"`` for bfloat16 autocast with
            channels-last convolutions (weights and optimizer stay float32).
            ResNet-20 / CIFAR-10 on one thread of a 2-core AMX CPU: 97 s an
            epoch against 210 s in float32 (``benchmarks/results/base/README.md``).
        progress: Show a tqdm bar per epoch.

    Returns:
        ``(trained_model, history)``; the model is on the CPU in eval mode,
        float32 and contiguous whatever ``precision`` was.

    Example:
        >>> import morphkit as mk
        >>> x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        >>> net, hist = mk.fit(mk.build_model("lenet5"), [(x, y)], epochs=1, progress=False)
        >>> len(hist.train_loss)
        1
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs: got {epochs!r}, expected an int >= 1")
    if optimizer not in ("sgd", "adam"):
        raise ConfigError(f"optimizer: got {optimizer!r}, expected 'sgd' or 'adam'")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision: got {precision!r}, expected 'fp32' or 'bf16'")
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    net = copy.deepcopy(model).to(device).train()
    folded_names = set(folded_bn_names(model))
    folded = [m for name, m in net.named_modules() if name in folded_names]
    bf16 = precision == "bf16"
    if bf16:
        net = net.to(memory_format=torch.channels_last)
    if loss_fn is None:
        loss_fn = default_loss(model, label_smoothing)
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                     weight_decay=weight_decay, nesterov=momentum > 0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train_data)) if hasattr(train_data, "__len__") else 1
    total = epochs * steps_per_epoch
    warm = int(warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    hist = FitHistory()
    seen, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        net.train()
        for m in folded:  # a folded BN is an identity only with the running statistics fusion set
            m.eval()
        running, n_batches = 0.0, 0
        bar = tqdm(train_data, desc=f"epoch {epoch + 1}/{epochs}", disable=not show_progress(progress),
                   leave=False)
        for batch in bar:
            batch = to_device(batch, device)
            if bf16:
                batch = _channels_last(batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(net, batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}, batch {n_batches}; "
                                    "lower the learning rate (--lr) or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            n_batches += 1
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            seen += x.shape[0]
            if n_batches % 20 == 0:
                bar.set_postfix(loss=f"{running / n_batches:.4f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        hist.train_loss.append(running / max(1, n_batches))
        msg = f"epoch {epoch + 1}/{epochs}: train loss {hist.train_loss[-1]:.4f}"
        if eval_data is not None:
            metrics = evaluate(net, eval_data, device=device)
            hist.eval.append(metrics)
            msg += "".join(f", {k} {v:.4f}" for k, v in metrics.items() if k != "n")
        logger.info(msg)
    hist.seconds = time.perf_counter() - t0
    hist.images_per_s = seen / max(hist.seconds, 1e-9)
    net = net.cpu().to(memory_format=torch.contiguous_format).eval()
    for attr in ("morphkit_arch", "morphkit_widths", "morphkit_fused_bn"):
        if hasattr(model, attr):
            setattr(net, attr, copy.deepcopy(getattr(model, attr)))
    return net, hist


def _channels_last(batch: Any) -> Any:
    """4-d tensors of a batch in channels-last layout (what bf16 convolutions are fastest on)."""
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_channels_last(b) for b in batch)
    return batch


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, *, task: str | None = None,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Evaluate a model on batches, in eval mode (the model's mode is restored).

    Args:
        model: The network.
        data: Iterable of ``(x, y)`` batches.
        task: ``"classification"`` (accuracy and cross-entropy),
            ``"segmentation"`` (mean IoU over the classes present in the
            labels or predictions, pixel accuracy and per-pixel cross-entropy;
            chosen by itself when the labels are per-pixel ``(B, H, W)``) or
            ``"vae"`` (reconstruction MSE per image, summed over pixels, and
            negative ELBO in nats per image); default from the model.
        device: Where to run (default: where the model's parameters are).

    Returns:
        ``{"accuracy", "loss", "n"}``, ``{"miou", "accuracy", "loss", "n"}``
        (``n`` images) or ``{"mse", "nll", "n"}``.

    Example:
        >>> import morphkit as mk
        >>> x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        >>> sorted(mk.evaluate(mk.build_model("lenet5"), [(x, y)]))
        ['accuracy', 'loss', 'n']
    """
    task = task or task_of(model)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = {"a": 0.0, "b": 0.0}
    n = pixels = 0
    confusion: torch.Tensor | None = None  # (classes, classes) counts: label x prediction
    try:
        for batch in data:
            x, y = split_batch(batch)
            x, y = to_device(x, device), to_device(y, device)
            if task == "vae":
                target = torch.flatten(x, 1)
                if target.min() < 0 or target.max() > 1:
                    target = (target * 0.3081 + 0.1307).clamp(0, 1)
                recon, _, _ = model(x)
                total["a"] += ((torch.sigmoid(recon) - target) ** 2).sum().item()
                total["b"] += vae_loss(model, (x, y)).item() * x.shape[0]
            else:
                out = logits_of(_forward(model, x))
                if n == 0:
                    check_labels(y, out)
                    if isinstance(y, torch.Tensor) and y.dim() == 3 and out.dim() == 4:
                        task = "segmentation"
                pred = out.argmax(1)  # (B,) or (B, H, W)
                total["a"] += (pred == y).sum().item()
                total["b"] += F.cross_entropy(out, y, reduction="sum").item()
                pixels += y.numel()
                if task == "segmentation":
                    k = out.shape[1]
                    counts = torch.bincount((y * k + pred).flatten(), minlength=k * k)  # (k * k,)
                    confusion = counts.view(k, k).cpu() + (0 if confusion is None else confusion)
            n += x.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("evaluate: the data yielded no batches; pass a non-empty iterable of (x, y)")
    if task == "vae":
        return {"mse": total["a"] / n, "nll": total["b"] / n, "n": float(n)}
    if task == "segmentation" and confusion is not None:
        return {"miou": mean_iou(confusion), "accuracy": total["a"] / pixels, "loss": total["b"] / pixels,
                "n": float(n)}
    return {"accuracy": total["a"] / n, "loss": total["b"] / n, "n": float(n)}


#: The headline metric of each task, and those where higher is better (shown in %).
METRIC_OF_TASK = {"classification": "accuracy", "segmentation": "miou", "vae": "mse"}
HIGHER_IS_BETTER = frozenset({"accuracy", "miou"})


def task_for(model: nn.Module, data: Iterable) -> str:
    """The model's task (:func:`~morphkit.models.task_of`), ``"segmentation"`` where the data's labels are per pixel.

    Example:
        >>> task_for(mk.build_model("lenet5"), [(torch.zeros(2, 1, 28, 28), torch.zeros(2, 28, 28).long())])
        'segmentation'
    """
    task = task_of(model)
    if task == "classification" and not isinstance(data, Iterator):  # peeking would consume an iterator
        try:
            _, y = split_batch(next(iter(data)))
        except (StopIteration, TypeError, ValueError, ConfigError):
            return task
        if isinstance(y, torch.Tensor) and y.dim() == 3 and not y.is_floating_point():
            return "segmentation"
    return task


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean intersection over union from a ``(classes, classes)`` label x prediction count matrix.

    Classes absent from both the labels and the predictions are left out of the mean.

    Example:
        >>> mean_iou(torch.tensor([[3, 1], [0, 2]]))  # IoU 3/4 and 2/3
        0.7083333333333333
    """
    c = confusion.double()
    inter = c.diagonal()  # (classes,)
    union = c.sum(0) + c.sum(1) - inter  # (classes,)
    seen = union > 0
    return float((inter[seen] / union[seen]).mean()) if bool(seen.any()) else 0.0
