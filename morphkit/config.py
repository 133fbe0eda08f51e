"""Configuration of a morph: INR shape, training schedule, smoothing.

``MorphConfig`` is a tree of plain dataclasses, validated on construction and
round-tripped through JSON (with a ``version`` field), so a manifold file can
record exactly how it was made and ``morphkit morph --config cfg.json`` can
reproduce it. Unknown keys and bad values raise :class:`ConfigError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from morphkit.errors import ConfigError

__all__ = ["INRConfig", "TrainConfig", "SmoothConfig", "MorphConfig", "CONFIG_VERSION"]

CONFIG_VERSION = 8
# Fields added later whose defaults changed behaviour: an older dict (a manifold file written
# before that version) gets the values it was trained with, not today's defaults.
_V1_INR = {"resample": "bilinear", "train_base": False}  # added in version 2
_V2_INR = {"factor_rank": 0}  # added in version 3
_V3_TRAIN = {"sandwich": False}  # added in version 4
_V3_TOP = {"calib_samples": 0}  # added in version 4
_V4_TRAIN = {"clique_spread": 0.0}  # added in version 5
_V5_INR = {"factor_above": 0}  # added in version 6
_V6_TRAIN = {"spread_below": False}  # added in version 7
_V7_TRAIN = {"narrow_spread": 0.5}  # added in version 8

#: Sanity bounds: larger values are typos (a 16384-wide INR already has 268 M weights per layer).
MAX_HIDDEN = 16384
MAX_LAYERS = 256
MAX_SAMPLES = 100_000
MAX_CALIB_SAMPLES = 65_536


def _check(cond: bool, what: str, got: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{what}: got {got!r:.200}, expected {expected}")


def _is_int(v: Any, lo: int = 0, hi: int = 2**63 - 1) -> bool:
    """An int (not a bool) in ``[lo, hi]``."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class INRConfig:
    """Shape of the implicit neural representation (paper section 3.2).

    Attributes:
        hidden: Width of the residual MLP. With trainable base grids the MLP
            only makes smooth corrections: 64 matched 128 in accuracy (LeNet-5 600
            steps; ResNet-20 150 steps) at 0.6-0.8x the training time.
        layers: Number of hidden layers (residual blocks) of the MLP.
        n_freqs: Fourier frequencies per coordinate (``sin/cos(2^j * pi * v)``, j < n_freqs);
            4, 8 and 16 gave the same accuracy within run-to-run noise.
        residual: Represent weights as a resampling of the smoothed base plus
            the MLP's correction (False: the paper's pure INR).
        base_noise: With ``resample="bilinear"``, let coordinate noise also move
            the base lookup (the paper's noise moves every coordinate); False
            reads the base at the clean coordinates, so averaging K noisy draws
            does not blur it. Ignored by ``"area"``, which always reads it clean.
        resample: How the residual base is resampled to a width: ``"area"`` (the
            default) averages the base channels each cell covers (a box filter;
            with the fan-in factor, neighbouring channels are merged the way
            model folding merges them: fan-out averaged, fan-in summed);
            ``"bilinear"`` interpolates the two nearest channels at the cell
            centre (the default of version-1 configs; it skips the channels between centres).
        train_base: Train the base grids with the MLP (they start at the
            smoothed base weights, the reconstruction loss keeps full width near
            them, ``train.base_lr_scale`` sets their learning rate). The MLP alone
            is a smooth function of the coordinates and cannot make the per-weight
            corrections a narrower network needs; trainable grids can (LeNet-5,
            600 steps at 50% compression only: 97.8% fixed, 98.8% trained).
        factor_rank: Rank of the MLP's correction to a plain matrix (a 2-D
            tensor whose two dims are resizable channels, one value each, such as
            a hidden ``nn.Linear``'s weight; not 1x1 convs, not a linear layer
            reading a flattened map). The MLP then embeds each out channel
            and each in channel once (``C_out + C_in`` queries instead of
            ``C_out * C_in``) and the correction is the inner product of the two
            embeddings; the trainable base grid still holds every weight. 0
            predicts every weight of such a matrix separately (versions 1-2).
            Used with ``resample="area"`` or ``residual=False``; ignored by
            ``"bilinear"``, whose base is read at each weight's own coordinates.
        factor_above: Also factor any tensor with two resizable channel dims
            (convolutions, 1x1 included) whose base has more than this many
            ``(out, in)`` channel pairs; its head then emits ``r + r * T``
            values per query (``T``: kernel positions). Unfactored, the INR
            runs its MLP once per channel pair per step: 697k rows for timm
            resnet18, 11x the cost of a plain training step of the network at
            64x64 (``benchmarks/results/speed.md``). The default 4096 leaves
            every tensor of ResNet-20 (at most 64 x 64) and LeNet-5 as it was;
            0 factors no convolution (versions 1-5).
        precision: ``"float32"`` or ``"bfloat16"``: the MLP's matrix products
            (trunk and heads) run under bfloat16 autocast, with the residual base
            and the outputs in float32. Matrix products are many times faster on
            GPUs and on CPUs with AMX / AVX512-BF16 (emulated, slow, elsewhere);
            on a 2-core AMX CPU the INR's element-wise work dominates, so sampling
            gains little and ResNet-20 training steps are slower
            (``benchmarks/results/speed_bf16.md``).
    """

    hidden: int = 64
    layers: int = 3
    n_freqs: int = 8
    residual: bool = True
    base_noise: bool = True
    resample: str = "area"
    train_base: bool = True
    factor_rank: int = 16
    factor_above: int = 4096
    precision: str = "float32"

    def __post_init__(self) -> None:
        _check(_is_int(self.hidden, 1, MAX_HIDDEN), "inr.hidden", self.hidden, f"an int in [1, {MAX_HIDDEN}]")
        _check(_is_int(self.layers, 1, MAX_LAYERS), "inr.layers", self.layers, f"an int in [1, {MAX_LAYERS}]")
        _check(_is_int(self.n_freqs, 0, 24), "inr.n_freqs", self.n_freqs,
               "an int in [0, 24] (2^24 * pi is already past float32 resolution)")
        _check(isinstance(self.residual, bool), "inr.residual", self.residual, "true or false")
        _check(isinstance(self.base_noise, bool), "inr.base_noise", self.base_noise, "true or false")
        _check(isinstance(self.train_base, bool), "inr.train_base", self.train_base, "true or false")
        _check(_is_int(self.factor_rank, 0, MAX_HIDDEN), "inr.factor_rank", self.factor_rank,
               f"an int in [0, {MAX_HIDDEN}] (0: no factorisation)")
        _check(_is_int(self.factor_above, 0), "inr.factor_above", self.factor_above,
               "an int >= 0 (channel pairs; 0: factor no convolution)")
        _check(self.resample in ("bilinear", "area"), "inr.resample", self.resample, '"bilinear" or "area"')
        _check(self.precision in ("float32", "bfloat16"), "inr.precision", self.precision,
               '"float32" or "bfloat16"')


@dataclass
class TrainConfig:
    """Schedule and losses of ``morph()`` (paper section 3.4).

    Attributes:
        epochs: Passes over the training data (ignored when ``steps`` is set).
        steps: Total optimisation steps; overrides ``epochs`` when given.
        lr: Adam learning rate (cosine-decayed to 0).
        weight_decay: Adam weight decay on the INR.
        base_lr_scale: Learning rate of the base grids (``inr.train_base``) as a
            multiple of ``lr``. A BatchNorm-folded ResNet-20 diverges at 1.0
            (full width 27% after 150 steps); 0.3 kept it at 64%.
        compression: Range ``(low, high)`` of the compressions trained (widths
            ``1 - high`` to ``1 - low``). The default ``(0, 0.75)`` covers what
            users deploy, down to a quarter of the channels (1/16 of a conv's
            weights); a narrower width is still emitted but extrapolated, and
            ``sample`` / ``export`` / ``eval`` / ``compare`` warn about it.
        sandwich: Each step trains two width maps on the same batch: the
            narrowest of the range (compression ``high``, every clique) and one
            drawn from the range (the sandwich rule of slimmable networks, with
            the widest width served by the base itself). Drawing one width per
            step trains the narrowest channel count of a 16-channel clique in 4%
            of the steps, and it is then the worst width; the loss is the mean
            over the two maps. False: one drawn width per step (the paper).
        per_clique: Draw an independent compression per clique instead of one global one.
        clique_spread: With one global compression, move each clique's width of
            the drawn map by its own offset U(-s, s) (clipped to ``1 - low`` and
            to the narrowest width, or with ``spread_below`` to
            :meth:`clique_floor`), so training also sees the unequal per-clique maps that
            ``sample({clique: channels})`` and ``search`` produce (the narrowest
            map of the sandwich stays uniform). ResNet-20 / CIFAR-10, 400 steps:
            random per-clique maps of the uniform 50% model's size averaged
            58.4% against 61.8% uniform with 0, 60.6% against 61.3% with 0.2
            (2,000 test images, one seed). 0 in configs before version 5.
        spread_below: The per-clique offsets also reach below the narrowest
            uniform width, down to ``1 - high - clique_spread``: the drawn map is
            clipped there, and in half of the steps the sandwich's narrowest map
            gets offsets too (the other half it is uniform). A map of the uniform
            narrowest model's size whose cliques are unequal must take some
            clique below that width; without this those cliques are extrapolated
            (random maps of the 75% model's size, 20 maps, K = 50: LeNet-5 / MNIST,
            24 epochs, 75.1% against 98.5% uniform without, 96.6% against 98.2%
            with; ResNet-20 / CIFAR-10, 12 epochs, 27.4% against 72.5% without).
            ``Manifold.widths`` reports the per-clique floor. False in configs
            before version 7.
        narrow_spread: With ``spread_below``, the share of steps in which the
            sandwich's narrowest map gets per-clique offsets (the other steps
            train it uniform). 0.5 in configs before version 8.
        noise: Coordinate noise half-width ``a`` in channel units (U(-a, a)).
        base_jitter: With ``inr.resample="area"``, each step moves every interior
            cell edge of the narrower layers' merge by U(-j, j) cells, drawn
            independently for each tensor and dim (like coordinate noise): training
            sees merges of varying shares of neighbouring channels, so widths
            below the trained range (merging more channels) stay usable. Sampling
            always uses the exact cells; ``j`` in [0, 2] (above 1 edges may pass
            each other and are kept in order). Off by default: on LeNet-5 / MNIST
            1.25 (48 epochs) lifts the never-trained 75% compression from 78.3% to
            97.1% (97.6% sampled with ``unseen="fold"``; 0% 98.97% instead of 99.26%,
            50% 98.55% instead of 98.64%), but on the
            BatchNorm-folded ResNet-20 / CIFAR-10 (4 epochs) it trades trained widths
            for the unseen one: 0 / 25 / 50 / 75% 78.9 / 75.1 / 66.4 / 10.1% without,
            78.4 / 73.5 / 62.5 / 12.2% at 0.1, 75.9 / 69.8 / 58.0 / 18.8% at 0.25.
        l1: Weight of the magnitude-weighted reconstruction loss (full width).
        recon_fraction: Fraction of the predicted tensors reconstructed per
            step at full width (a fresh random subset each step, every row of
            each; at least one; 1 = all tensors).
        l2: Weight of the L2 penalty on predicted weights.
        distill: Weight of distillation from the base model's outputs: KL from
            the base's softmax to each trained width's (0 = off). It applies with
            morphkit's default loss to a model whose output is one ``(batch,
            classes)`` logits tensor; with your own ``loss_fn`` it is off (add
            distillation to that loss where it fits your output). Off by default:
            ResNet-20 / CIFAR-10, 300 steps with the sandwich rule: 73.6 / 61.7 /
            51.1% at 25 / 50 / 75% compression with 1.0, 73.1 / 60.4 / 50.0%
            without (2,000 test images, one seed: within noise), at 1.3x the
            step time (the base's forward pass).
        ema: EMA decay of the INR weights (0 = off).
        grad_clip: Max gradient norm (0 = off).
        tensor_fraction: Fraction of predicted tensors updated per step (1 = all).
        eval_every: Evaluate every this many steps (0 = only at the end).
        eval_compressions: Compressions evaluated periodically and at the end.
        seed: Seed of every random draw (data order, widths, noise, INR init).
    """

    epochs: int = 10
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    base_lr_scale: float = 0.3
    compression: tuple[float, float] = (0.0, 0.75)
    sandwich: bool = True
    per_clique: bool = False
    clique_spread: float = 0.2
    spread_below: bool = True
    narrow_spread: float = 0.5
    noise: float = 0.25
    base_jitter: float = 0.0
    l1: float = 1.0
    recon_fraction: float = 0.25
    l2: float = 1e-4
    distill: float = 0.0
    ema: float = 0.995
    grad_clip: float = 1.0
    tensor_fraction: float = 1.0
    eval_every: int = 0
    eval_compressions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    seed: int = 0

    def clique_floor(self) -> float:
        """The narrowest width any clique is trained at: ``1 - high``, less ``clique_spread`` with ``spread_below``.

        Example:
            >>> TrainConfig().clique_floor()
            0.05
        """
        below = self.clique_spread if self.spread_below and not self.per_clique else 0.0
        return round(max(0.0, 1.0 - self.compression[1] - below), 12)

    def __post_init__(self) -> None:
        if isinstance(self.compression, (list, tuple)):
            self.compression = tuple(self.compression)  # type: ignore[assignment]
        if isinstance(self.eval_compressions, (list, tuple)):
            self.eval_compressions = tuple(self.eval_compressions)
        _check(_is_int(self.epochs, 1), "train.epochs", self.epochs, "an int >= 1")
        _check(self.steps is None or _is_int(self.steps, 1),
               "train.steps", self.steps, "null or an int >= 1")
        _check(_is_num(self.lr) and self.lr > 0, "train.lr", self.lr, "a finite float > 0")
        _check(_is_num(self.base_lr_scale) and self.base_lr_scale >= 0, "train.base_lr_scale",
               self.base_lr_scale, "a finite float >= 0")
        _check(_is_num(self.weight_decay) and self.weight_decay >= 0, "train.weight_decay",
               self.weight_decay, "a finite float >= 0")
        lo_hi = self.compression
        _check(isinstance(lo_hi, tuple) and len(lo_hi) == 2 and all(_is_num(v) for v in lo_hi)
               and 0 <= lo_hi[0] <= lo_hi[1] < 1,
               "train.compression", lo_hi, "[low, high] with 0 <= low <= high < 1")
        _check(isinstance(self.per_clique, bool), "train.per_clique", self.per_clique, "true or false")
        _check(_is_num(self.clique_spread) and 0 <= self.clique_spread <= 1, "train.clique_spread",
               self.clique_spread, "a float in [0, 1] (width)")
        _check(isinstance(self.sandwich, bool), "train.sandwich", self.sandwich, "true or false")
        _check(isinstance(self.spread_below, bool), "train.spread_below", self.spread_below, "true or false")
        _check(_is_num(self.narrow_spread) and 0 <= self.narrow_spread <= 1, "train.narrow_spread",
               self.narrow_spread, "a float in [0, 1] (share of steps)")
        for name in ("noise", "l1", "l2", "distill", "grad_clip"):
            v = getattr(self, name)
            _check(_is_num(v) and v >= 0, f"train.{name}", v, "a finite float >= 0")
        _check(_is_num(self.ema) and 0 <= self.ema < 1, "train.ema", self.ema, "a float in [0, 1)")
        _check(_is_num(self.base_jitter) and 0 <= self.base_jitter <= 2, "train.base_jitter", self.base_jitter,
               "a float in [0, 2] (cells)")
        for name in ("tensor_fraction", "recon_fraction"):
            v = getattr(self, name)
            _check(_is_num(v) and 0 < v <= 1, f"train.{name}", v, "a float in (0, 1]")
        _check(_is_int(self.eval_every), "train.eval_every",
               self.eval_every, "an int >= 0")
        _check(isinstance(self.eval_compressions, tuple) and all(_is_num(c) and 0 <= c < 1
                                                                 for c in self.eval_compressions),
               "train.eval_compressions", self.eval_compressions, "a list of compressions in [0, 1)")
        _check(_is_int(self.seed), "train.seed", self.seed, "an int in [0, 2**63)")


@dataclass
class SmoothConfig:
    """Channel-order smoothing before training (paper section 3.3).

    Attributes:
        enabled: Permute every clique along its shortest Hamiltonian path.
        time_budget: Seconds of iterated local search per clique (None = default restarts).
        seed: Solver seed.
    """

    enabled: bool = True
    time_budget: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "smooth.enabled", self.enabled, "true or false")
        _check(self.time_budget is None or (_is_num(self.time_budget) and self.time_budget > 0),
               "smooth.time_budget", self.time_budget, "null or seconds > 0")
        _check(_is_int(self.seed), "smooth.seed", self.seed, "an int in [0, 2**63)")


@dataclass
class MorphConfig:
    """Everything ``morph()`` needs besides the model and the data.

    Attributes:
        inr: INR shape.
        train: Training schedule and losses.
        smooth: Smoothing options.
        fuse_bn: Fold BatchNorm into the preceding conv/linear before learning
            (the paper's way). Off by default: a folded network has no
            per-width normalisation, and merged narrow widths lose their
            activation scale with depth (ResNet-20 / CIFAR-10 at 75%
            compression: chance). Kept BatchNorms normalise with batch
            statistics while the INR trains, their scale and shift are
            predicted like any weight, and each sampled width gets its own
            running statistics from ``calib_samples`` stored inputs.
        samples: Default K of ``Manifold.sample`` (noisy coordinate draws averaged).
        calib_samples: Training inputs stored in the manifold to recompute
            the running statistics of kept BatchNorms at each sampled width
            (only for models with BatchNorm; stored in float16, at most 8 M
            numbers; 0 = store none and pass ``calib_data`` to ``sample``).

    Example:
        >>> cfg = MorphConfig(train=TrainConfig(epochs=2))
        >>> MorphConfig.from_json(cfg.to_json()) == cfg
        True
    """

    inr: INRConfig = field(default_factory=INRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    smooth: SmoothConfig = field(default_factory=SmoothConfig)
    fuse_bn: bool = False
    samples: int = 50
    calib_samples: int = 1024

    def __post_init__(self) -> None:
        for name, cls in (("inr", INRConfig), ("train", TrainConfig), ("smooth", SmoothConfig)):
            _check(isinstance(getattr(self, name), cls), name, type(getattr(self, name)).__name__, cls.__name__)
        _check(isinstance(self.fuse_bn, bool), "fuse_bn", self.fuse_bn, "true or false")
        _check(_is_int(self.samples, 1, MAX_SAMPLES), "samples", self.samples, f"an int in [1, {MAX_SAMPLES}]")
        _check(_is_int(self.calib_samples, 0, MAX_CALIB_SAMPLES), "calib_samples", self.calib_samples,
               f"an int in [0, {MAX_CALIB_SAMPLES}]")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with a ``version`` key."""
        return {"version": CONFIG_VERSION, **asdict(self)}

    def to_json(self) -> str:
        """JSON text (sorted keys), readable by :meth:`from_json`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MorphConfig:
        """Build from a dict; unknown keys or a newer version raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: got {type(d).__name__}, expected a JSON object")
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if not _is_int(version, 1) or version > CONFIG_VERSION:
            raise ConfigError(f"config version {version!r} is not supported (this morphkit reads "
                              f"versions 1..{CONFIG_VERSION}); upgrade morphkit")
        if version < 3 and isinstance(d.get("inr", {}), dict):
            d["inr"] = {**(_V1_INR if version < 2 else {}), **_V2_INR, **d.get("inr", {})}
        if version < 4:
            if isinstance(d.get("train", {}), dict):
                d["train"] = {**_V3_TRAIN, **d.get("train", {})}
            d = {**_V3_TOP, **d}
        if version < 5 and isinstance(d.get("train", {}), dict):
            d["train"] = {**_V4_TRAIN, **d.get("train", {})}
        if version < 6 and isinstance(d.get("inr", {}), dict):
            d["inr"] = {**_V5_INR, **d.get("inr", {})}
        if version < 7 and isinstance(d.get("train", {}), dict):
            d["train"] = {**_V6_TRAIN, **d.get("train", {})}
        if version < 8 and isinstance(d.get("train", {}), dict):
            d["train"] = {**_V7_TRAIN, **d.get("train", {})}
        subs = {"inr": INRConfig, "train": TrainConfig, "smooth": SmoothConfig}
        kwargs: dict[str, Any] = {}
        top = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key not in top:
                raise ConfigError(f"unknown config key {key!r}; expected one of {sorted(top)}")
            if key in subs:
                if not isinstance(value, dict):
                    raise ConfigError(f"config.{key}: got {value!r}, expected a JSON object")
                allowed = {f.name for f in fields(subs[key])}
                unknown = sorted(set(value) - allowed)
                if unknown:
                    raise ConfigError(f"unknown config key(s) {unknown} in {key!r}; "
                                      f"expected some of {sorted(allowed)}")
                kwargs[key] = subs[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> MorphConfig:
        """Parse JSON text (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or a number too long to convert
            raise ConfigError(f"config is not valid JSON ({e}); expected an object such as "
                              '{"train": {"epochs": 5}}') from e
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> MorphConfig:
        """Read a JSON config file."""
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a directory; expected a JSON file")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; write one with MorphConfig().to_json()")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} cannot be read as UTF-8 JSON text: {e}") from e
        return cls.from_json(text)
