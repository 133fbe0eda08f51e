"""The manifold: a trained INR plus everything needed to emit a model.

``Manifold.sample(width)`` resizes the base structure to the width map,
predicts every INR-owned tensor from its coordinates (averaged over K noisy
coordinate draws, the first one clean, batched; paper eq. 9), slices the
static tensors, and returns a plain ``nn.Module`` that ``save_model`` writes
and ``load_model`` reads without morphkit's manifold. ``save`` / ``load`` use
one safetensors file with JSON metadata (no pickle).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphkit import __version__
from morphkit._io import read_tensors, write_tensors
from morphkit.clique import Clique, width_map
from morphkit.config import MorphConfig
from morphkit.coords import CoordBuilder, CoordTable, TensorLayout, WidthMap, _dims_of, resize_static
from morphkit.errors import CheckpointError, ConfigError, MorphkitError
from morphkit.formats import MANIFOLD_FORMAT, format_tag
from morphkit.graph import with_metadata
from morphkit.inr import INR, box_merge
from morphkit.untrusted import (  # noqa: F401 - CALIB_KEY, MAX_CALIB_ELEMENTS re-exported
    CALIB_KEY,
    MAX_CALIB_ELEMENTS,
    check_samples,
    check_structure,
    describe_mismatch,
    parse_manifold_meta,
)

__all__ = ["Manifold", "predict_tensors", "as_inputs", "build_inr", "factor_ranks", "recalibrate_bn"]

logger = logging.getLogger(__name__)

ROWS_PER_CHUNK = 1 << 18  # rows through the trunk at once when sampling (~256 MB at hidden 256)
UNSEEN_MODES = ("inr", "fold")
#: Trained width maps averaged when a width below the trained range is folded (Manifold.fold_sources).
FOLD_SOURCES = 4
# CALIB_KEY (the stored calibration inputs' key) and MAX_CALIB_ELEMENTS (their bound) live in
# morphkit.untrusted, which checks them when a file is read.
CALIB_BATCH = 256  # stored calibration inputs per forward pass


def fold_rows(rows: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Merge a layout's rows from ``src`` cells ``(C_out, C_in)`` down to ``dst`` cells with box filters.

    The same operator that resamples the residual base (:func:`~morphkit.inr.box_merge`);
    with the fan-in factor applied afterwards, merged
    output channels are averaged and merged input channels summed (model folding).

    Example:
        >>> fold_rows(torch.arange(4.0).view(4, 1), (2, 2), (1, 2)).flatten().tolist()
        [1.0, 2.0]
    """
    (so, si), (do, di) = src, dst
    return box_merge(rows.reshape(so, si, -1), do, di).reshape(do * di, -1)  # (C_out * C_in, T)


def as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def factor_ranks(layouts: list[TensorLayout], config: MorphConfig) -> list[int]:
    """Per layout, the rank of its factored INR correction (0: one row per weight).

    Linear layers' weights (2-D tensors whose two dims are resizable channels,
    one value per channel pair) get ``config.inr.factor_rank`` unless the
    base is bilinear-resampled (read at each weight's own coordinates, which
    factored queries do not have). So does any tensor with out and in rows
    and more than ``config.inr.factor_above`` channel pairs (a wide
    convolution: its head emits ``r + r * T`` values per query). Smaller 1x1
    convolutions are not factored: on ResNet-20 / CIFAR-10 (150 steps, 2
    seeds) factoring its two 1x1 shortcut convs cost 2.6 and 7.1 points at 50%
    compression. Nor is a linear layer reading a flattened map (LeNet-5's
    ``fc1``: 120 x 16 channels x 25 positions): its 1,920 rows are cheap and a
    factored head emitting ``r * 25`` values per in channel would add 26k
    parameters for no speed.

    Example:
        >>> factor_ranks([], MorphConfig())
        []
    """
    ic = config.inr
    ok = ic.factor_rank > 0 and (ic.resample == "area" or not ic.residual)

    def rank(lt: TensorLayout) -> int:
        if not ok or len(lt.rows) != 2 or lt.in_only:
            return 0
        plain = len(lt.shape) == 2 and lt.trailing == 1
        wide = ic.factor_above > 0 and lt.grid_shape[0] * lt.grid_shape[1] > ic.factor_above
        return ic.factor_rank if plain or wide else 0

    return [rank(lt) for lt in layouts]


def build_inr(layouts: list[TensorLayout], config: MorphConfig) -> INR:
    """An INR shaped for these layouts (grids zero until filled or loaded)."""
    grids = [lt.grid_shape for lt in layouts]
    return INR([lt.trailing for lt in layouts], config.inr.hidden, config.inr.layers, config.inr.n_freqs,
               scales=[lt.scale for lt in layouts], grid_shapes=grids if config.inr.residual else None,
               base_noise=config.inr.base_noise, resample=config.inr.resample, train_base=config.inr.train_base,
               bf16=config.inr.precision == "bfloat16", ranks=factor_ranks(layouts, config))


def predict_tensors(inr: INR, builder: CoordBuilder, table: CoordTable, *, noise: float = 0.0,
                    generator: torch.Generator | None = None, which: list[int] | None = None,
                    jitter: float = 0.0) -> dict[str, torch.Tensor]:
    """Predict the tensors of ``which`` layouts (default all) at one width map, one draw.

    Args:
        inr: The INR.
        builder: Coordinate builder of the manifold.
        table: Coordinate table of the width map.
        noise: Coordinate noise half-width ``a`` in channel units (0 = clean).
        generator: RNG for the noise.
        which: Layout indices to predict.
        jitter: Cell-edge jitter of the area-resampled base, in cells (training;
            see :func:`~morphkit.inr.area_weights`).

    Returns:
        ``{state_dict key: tensor}`` at the width map's shapes.
    """
    which = list(range(len(builder.layouts))) if which is None else which
    device = next(inr.parameters()).device
    if len(which) == len(builder.layouts):
        coords, segs = table.coords, table.segments
        scale = table.noise
    else:
        idx = torch.cat([torch.arange(*table.segments[k]) for k in which])
        coords, scale = table.coords[idx], table.noise[idx]
        segs, start = [], 0
        for k in which:
            n = table.segments[k][1] - table.segments[k][0]
            segs.append((start, start + n))
            start += n
    clean = coords = coords.to(device)
    if noise > 0:
        u = torch.rand(coords.shape[0], 2, generator=generator).to(device) * 2 - 1  # (R, 2) in U(-1, 1)
        coords = coords.clone()
        coords[:, 1:3] += noise * u * scale.to(device)
    bases = None
    if inr.residual and inr.resample == "area":
        bases = [inr.area_base(k, *table.cells[k], jitter=jitter, generator=generator) for k in which]
    outs = inr(coords, segs, which, clean=clean, bases=bases, cells=[table.cells[k] for k in which])
    return {builder.layouts[k].name: builder.assemble(k, table, out * table.fan_in[k])
            for k, out in zip(which, outs)}


class Manifold:
    """A learned weight manifold. Build one with :func:`morphkit.morph`.

    Attributes:
        cliques: Every clique of the (fused, smoothed) base model.
        base: The fused, smoothed base model (same function as the original).
        base_is_trained: Whether ``base`` holds the trained weights (True after
            :func:`~morphkit.train.morph` and for files that store them; files
            written before 0.2 do not, and their ``base`` is freshly initialised).
        config: The :class:`MorphConfig` it was trained with.
        info: Training record (history, timings, base metrics).
        calib: Training inputs ``(N, ...)`` (float16 in files) that recompute the
            running statistics of kept BatchNorms at each sampled width; None
            when the model has none or none were stored.
    """

    def __init__(self, inr: INR, cliques: list[Clique], layouts: list[TensorLayout],
                 static: dict[str, torch.Tensor], base: nn.Module, example_inputs: Any,
                 config: MorphConfig, arch: dict | None, perms: dict[int, list[int]] | None = None,
                 info: dict | None = None, fused_bn: bool = False, base_is_trained: bool = True,
                 calib: torch.Tensor | None = None) -> None:
        self.inr = inr.eval()
        self.cliques = cliques
        self.layouts = layouts
        self.builder = CoordBuilder(layouts, cliques, factored=[r > 0 for r in inr.ranks])
        self.static = static
        self.base = base.eval()
        self.example_inputs = as_inputs(example_inputs)
        self.config = config
        self.arch = arch
        self.perms = perms or {}
        self.info = info or {}
        self.fused_bn = fused_bn
        self.base_is_trained = base_is_trained
        self.calib = calib
        self._dims = _dims_of(cliques)
        self._templates: dict[tuple, nn.Module] = {}

    # ----------------------------------------------------------------- widths
    def width_map(self, width: Any, round_to: int | None = None) -> WidthMap:
        """Resolve a width (float or ``{clique_id: channels}``) to a full width map (see :func:`width_map`)."""
        return width_map(self.cliques, width, round_to)

    def widths(self) -> dict[int, dict[str, Any]]:
        """Per clique: base size, fixed or not, and the channel range seen in training.

        ``trained`` is the per-clique range (down to ``TrainConfig.clique_floor()``:
        below the narrowest uniform width where per-clique offsets reach there);
        ``uniform`` the narrowest channel count of the uniform maps trained.
        """
        hi = self.config.train.compression[1]
        floor = self.config.train.clique_floor()
        out = {}
        for c in self.cliques:
            out[c.id] = {"size": c.size, "fixed": c.fixed,
                         "trained": [c.channels_for(floor), c.size] if not c.fixed else [c.size, c.size],
                         "uniform": [c.channels_for(1 - hi), c.size] if not c.fixed else [c.size, c.size]}
        return out

    def untrained(self, counts: WidthMap) -> list[int]:
        """Ids of the cliques narrower in ``counts`` than training ever made them (extrapolated widths).

        A clique is untrained below its per-clique floor (``TrainConfig.clique_floor()``).
        Where per-clique offsets reach below the narrowest uniform width ``w``, the
        narrowest maps trained average ``w`` over their ``n`` resizable cliques with a
        standard deviation of ``clique_spread / sqrt(3 n)``; a map whose mean clique
        width is further below ``w`` than that is narrower than the maps trained, and
        its cliques below the uniform floor count as untrained too.

        Example:
            >>> manifold.untrained(manifold.width_map(0.1))[:3]  # doctest: +SKIP
            [0, 1, 2]
        """
        floor = self._floors(counts)
        return [c for c, n in floor.items() if counts[c] < n]

    def _floors(self, counts: WidthMap) -> dict[int, int]:
        """The narrowest trained channel count of each resizable clique, for this map (see :meth:`untrained`)."""
        tc = self.config.train
        low_uniform = 1 - tc.compression[1]
        free = [c for c in self.cliques if not c.fixed]
        if free and tc.clique_floor() < low_uniform:
            mean = sum(counts[c.id] / c.size for c in free) / len(free)
            if mean >= low_uniform - tc.clique_spread / math.sqrt(3 * len(free)):
                return {c.id: c.channels_for(tc.clique_floor()) for c in free}
        return {c.id: c.channels_for(low_uniform) for c in free}

    def _warn_untrained(self, counts: WidthMap) -> None:
        below = self.untrained(counts)
        if below:
            lo, hi = self.config.train.compression
            c = next(c for c in self.cliques if c.id == below[0])
            logger.warning("width outside the trained range: %d of %d resizable cliques are narrower than "
                           "compression %g made them in training (clique %d: %d channels, trained down to %d); "
                           "such weights are extrapolated and can be much worse; morph with a wider range "
                           "(train.compression = [%g, HIGH], --compression-range) to train them",
                           len(below), sum(not q.fixed for q in self.cliques), hi, c.id, counts[c.id],
                           self._floors(counts)[c.id], lo)

    # -------------------------------------------------------------- structure
    def template(self, counts: WidthMap) -> nn.Module:
        """The base structure resized to a width map (cached; do not modify it).

        A structure (``resize(..., light=True)``): it shares the base's plain
        attributes and its resized tensors are zeros; callers fill every
        tensor (``functional_call``, ``load_state_dict``) and deep-copy it
        before handing it to a user.
        """
        key = tuple(sorted(counts.items()))
        hit = self._templates.pop(key, None)
        if hit is None:
            from morphkit.resize import resize

            hit = resize(self.base, self.example_inputs, counts, cliques=self.cliques, light=True).eval()
        self._templates[key] = hit
        while len(self._templates) > 64:
            self._templates.pop(next(iter(self._templates)))
        return hit

    def static_tensors(self, counts: WidthMap) -> dict[str, torch.Tensor]:
        """Static (not predicted) tensors sliced to a width map."""
        return {n: resize_static(t, n, self._dims, counts) for n, t in self.static.items()}

    # --------------------------------------------------------------- sampling
    @torch.no_grad()
    def predict(self, width: Any, samples: int | None = None, seed: int = 0,
                noise: float | None = None, unseen: str = "inr",
                round_to: int | None = None) -> dict[str, torch.Tensor]:
        """Averaged INR predictions (``state_dict`` entries) at a width.

        Args:
            width: Float in (0, 1] or ``{clique_id: channels}``.
            samples: K coordinate draws averaged (first clean); default ``config.samples``.
            seed: Seed of the noise draws.
            noise: Noise half-width ``a`` (default: the training value).
            unseen: How to build a width map with a clique narrower than
                training ever made it (:meth:`fold_sources`): ``"inr"`` (the
                default, NeuMeta's way) asks the INR at the width itself,
                extrapolating its width inputs; ``"fold"`` predicts at
                ``FOLD_SOURCES`` widths spread over the trained range, merges
                their channels down to the asked width with the box filter the
                base is resampled with (fan-out averaged, fan-in summed) and
                averages the results (``FOLD_SOURCES`` predictions at wider
                widths: several times the sampling time). Widths inside the
                trained range are predicted directly either way. Measured: fold lifts LeNet-5 /
                MNIST at 75% compression (97.1% -> 97.6% with base jitter 1.25,
                78.3% -> 79.9% without) but ruins ResNet-20 / CIFAR-10 at 62.5%
                (30.3% -> 15.5%), hence not the default.

        Example:
            >>> w = manifold.predict(0.25, unseen="fold")  # 75% compression, folded  # doctest: +SKIP
        """
        k_draws = check_samples(self.config.samples if samples is None else samples)
        if unseen not in UNSEEN_MODES:
            raise ConfigError(f"unseen: got {unseen!r}, expected one of {', '.join(map(repr, UNSEEN_MODES))}")
        counts = self.width_map(width, round_to)
        table = self.builder.table(counts)
        a = self.config.train.noise if noise is None else noise
        sources = self.fold_sources(counts) if unseen == "fold" else []
        if not sources:
            rows = self._rows(table, k_draws, seed, a)
        else:
            folded = []
            for src in sources:
                src_table = self.builder.table(src)
                folded.append([fold_rows(r, src_table.cells[k], table.cells[k])
                               for k, r in enumerate(self._rows(src_table, k_draws, seed, a))])
            rows = [torch.stack(per_layout).mean(0) for per_layout in zip(*folded)]
            logger.debug("folded %s from %d trained width maps", counts, len(sources))
        return {lt.name: self.builder.assemble(k, table, rows[k] * table.fan_in[k])
                for k, lt in enumerate(self.layouts)}

    def fold_sources(self, counts: WidthMap) -> list[WidthMap]:
        """The trained width maps a width map is folded from; ``[]`` when it lies in the trained range.

        A clique is below the trained range when it has fewer channels than
        the highest trained compression leaves. Then source ``j`` of
        ``FOLD_SOURCES`` is the width map at compression ``high * j /
        FOLD_SOURCES`` (spread over the trained range, full width excluded:
        there the INR only reconstructs the base), with no clique narrower
        than asked.

        Example:
            >>> manifold.fold_sources(manifold.width_map(0.5))  # in range  # doctest: +SKIP
            []
        """
        high = self.config.train.compression[1]
        if high <= 0 or all(c.fixed or counts[c.id] >= c.channels_for(1 - high) for c in self.cliques):
            return []
        sources = []
        for j in range(1, FOLD_SOURCES + 1):
            g = high * j / FOLD_SOURCES
            sources.append({c.id: counts[c.id] if c.fixed else max(counts[c.id], c.channels_for(1 - g))
                            for c in self.cliques})
        return sources

    def _rows(self, table: CoordTable, k_draws: int, seed: int, a: float) -> list[torch.Tensor]:
        """Per layout, the INR's rows ``(C_out * C_in, T)`` at a table's width map, averaged over K draws.

        Rows come before the fan-in factor (:meth:`CoordBuilder.assemble` turns them into tensors).
        """
        gen = torch.Generator().manual_seed(seed)
        rows, n_heads = table.rows, len(self.layouts)
        acc: list[torch.Tensor | None] = [None] * n_heads
        per = max(1, ROWS_PER_CHUNK // max(1, rows))
        fixed = self.inr.fixed_part(table.coords)  # (R, hidden): the same for every draw
        area = self.inr.residual and self.inr.resample == "area"
        bases = [self.inr.area_base(k, *table.cells[k]) if area else None for k in range(n_heads)]
        done = 0
        while done < k_draws:
            kc = min(per, k_draws - done)
            clean = table.coords.unsqueeze(0).expand(kc, -1, -1)  # (kc, R, 6)
            coords = clean.clone()
            u = torch.rand(kc, rows, 2, generator=gen) * 2 - 1  # (kc, R, 2)
            if done == 0:
                u[0] = 0  # the first draw is clean
            coords[:, :, 1:3] += a * u * table.noise
            h = self.inr.trunk(coords.reshape(kc * rows, 6), fixed).reshape(kc, rows, -1)  # (kc, R, hidden)
            for k, (s, e) in enumerate(table.segments):
                out = self.inr.head(k, h[:, s:e], coords[:, s:e], clean[:, s:e], bases[k], table.cells[k],
                                    sum_draws=True)  # (rows_k, T): the sum over the kc draws
                acc[k] = out if acc[k] is None else acc[k] + out
            done += kc
        return [r / k_draws for r in acc]  # type: ignore[operator]

    def sample(self, width: Any, samples: int | None = None, seed: int = 0,
               calib_data: Any = None, calib_batches: int = 20, unseen: str = "inr",
               round_to: int | None = None) -> nn.Module:
        """Emit a standard model at a width.

        Args:
            width: Float in (0, 1] (every non-fixed clique keeps
                ``max(1, round(size * width))`` channels) or ``{clique_id: channels}``.
            samples: K noisy coordinate draws averaged (first clean); default ``config.samples`` (50).
            seed: Seed of the noise draws (same seed, same weights).
            calib_data: Batches to recalibrate the statistics of BatchNorms that
                are not folded; default the manifold's stored calibration inputs
                (:attr:`calib`). Ignored when every BN was folded.
            calib_batches: How many batches of ``calib_data`` to use.
            unseen: ``"inr"`` (default) or ``"fold"``: how widths narrower than
                the trained range are built (see :meth:`predict`).
            round_to: Every resizable clique's channel count a multiple of this
                where the clique allows (:func:`~morphkit.clique.width_map`).

        At full width (every clique at its size) the stored base model is
        returned exactly, not the INR's reconstruction of it; a width
        narrower than the trained range logs a warning (:meth:`untrained`).

        Returns:
            An ``nn.Module`` in eval mode with ``morphkit_arch`` and ``morphkit_widths`` set.

        Example:
            >>> net = manifold.sample(0.5)            # doctest: +SKIP
            >>> net = manifold.sample({3: 24}, samples=10)  # doctest: +SKIP
        """
        counts = self.width_map(width, round_to)
        if self.base_is_trained and all(counts[c.id] == c.size for c in self.cliques):
            net = copy.deepcopy(self.base)  # full width: the base itself (its own BatchNorm statistics)
            calib_data = None
        else:
            self._warn_untrained(counts)
            state = {**self.static_tensors(counts), **self.predict(counts, samples=samples, seed=seed,
                                                                  unseen=unseen)}
            net = copy.deepcopy(self.template(counts))
            try:
                net.load_state_dict(with_metadata(net, state), strict=True)
            except RuntimeError as e:  # an internal inconsistency, not user input
                raise MorphkitError(f"sampled tensors do not fit the resized model: {e}") from e
            if calib_data is None and self.calib is not None and not self.fused_bn:
                dtype = self.example_inputs[0].dtype
                calib_data = [c.to(dtype) for c in self.calib.split(CALIB_BATCH)]
                calib_batches = len(calib_data)
        net.morphkit_arch = copy.deepcopy(self.arch)
        net.morphkit_widths = dict(counts)
        net.morphkit_cliques = self.cliques
        net.morphkit_fused_bn = self.fused_bn
        if calib_data is not None:
            recalibrate_bn(net, calib_data, calib_batches)
        return net.eval()

    def search(self, data: Any, **budget_and_options: Any) -> Any:
        """The per-clique width map scoring best on ``data`` within a budget: :func:`morphkit.search.search`.

        Example:
            >>> net = manifold.sample(manifold.search(val, params="20k").widths)  # doctest: +SKIP
        """
        from morphkit.search import search

        return search(self, data, **budget_and_options)

    # ------------------------------------------------------------------ files
    def summary(self) -> dict[str, Any]:
        """Key facts for ``morphkit info``."""
        resizable = [c for c in self.cliques if not c.fixed]
        return {
            "inr_params": sum(p.numel() for p in self.inr.parameters()),
            "cliques": len(self.cliques),
            "resizable_cliques": len(resizable),
            "predicted_tensors": len(self.layouts),
            "static_tensors": len(self.static),
            "compression_trained": list(self.config.train.compression),
            "batchnorm": "folded" if self.fused_bn else "kept (statistics recomputed per width)",
            "calibration_inputs": 0 if self.calib is None else int(self.calib.shape[0]),
            "base_params": sum(t.numel() for t in self.base.state_dict().values()),
            **{k: v for k, v in self.info.items() if k in ("base_metrics", "final", "seconds", "steps")},
        }

    def save(self, path: str | Path) -> None:
        """Write the manifold to one safetensors file (atomic; no pickle)."""
        tensors = {f"inr.{k}": v for k, v in self.inr.state_dict().items()}
        tensors.update({f"static.{k}": v for k, v in self.static.items()})
        if self.base_is_trained:  # the base's predicted tensors, for baselines and reconstruction checks
            state = self.base.state_dict()
            tensors.update({f"base.{lt.name}": state[lt.name] for lt in self.layouts})
        if self.calib is not None:
            tensors[CALIB_KEY] = self.calib.to(torch.float16 if self.calib.abs().max() < 6e4 else torch.float32)
        meta = {
            "format": format_tag(MANIFOLD_FORMAT),
            "morphkit_version": __version__,
            "arch": self.arch,
            "config": self.config.to_dict(),
            "cliques": [c.to_json() for c in self.cliques],
            "layouts": [lt.to_json() for lt in self.layouts],
            "static": list(self.static),
            "perms": {str(k): [int(i) for i in v] for k, v in self.perms.items()},
            "input_shapes": [list(t.shape) for t in self.example_inputs],
            "input_dtypes": [str(t.dtype).replace("torch.", "") for t in self.example_inputs],
            "fused_bn": self.fused_bn,
            "info": self.info,
        }
        write_tensors(tensors, meta, path)
        logger.info("wrote manifold %s", path)

    @classmethod
    def load(cls, path: str | Path, base: nn.Module | None = None) -> Manifold:
        """Read a manifold file.

        Every field is checked before anything is built: the cliques and
        layouts must fit the base model's tensors, the INR's weights its
        config, so a file that loads also samples.

        Args:
            path: A file written by :meth:`save`.
            base: A fresh instance of the base architecture, for models
                morphkit cannot rebuild from the file's ``arch`` (your own classes).

        Raises:
            CheckpointError: missing, truncated, corrupt, newer-format file, one
                with malformed metadata, or one whose tensors do not fit the base
                architecture.
            ConfigError: ``base`` is not an ``nn.Module``.
        """
        from morphkit.export import check_base, rebuild_base

        check_base(base)
        tensors, meta = read_tensors(path, expect_format=MANIFOLD_FORMAT)
        try:
            p = _parse_meta(meta, tensors)
        except (MorphkitError, KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            raise CheckpointError(f"{str(path)!r}: manifold metadata is incomplete or malformed "
                                  f"({_brief(e)}); the file is corrupt or was edited — write it again") from e
        expected = {lt.name: lt.shape for lt in p["layouts"]}
        expected.update({n: tuple(tensors[f"static.{n}"].shape) for n in p["static"]})
        if base is not None:
            model = copy.deepcopy(base)
        elif p["arch"]:
            model = rebuild_base(p["arch"], path, expected, exact=True)
        else:
            raise CheckpointError(f"{str(path)!r} was made from a custom model; pass base=YourModel()")
        full = model.state_dict()
        state = {k: tuple(v.shape) for k, v in full.items()}
        problems = [n for n, s in expected.items() if state.get(n) != s]
        problems += sorted(set(state) - set(expected))
        problems += [n for n in p["static"] if n in full and (
            full[n].is_floating_point() != tensors[f"static.{n}"].is_floating_point()
            or full[n].is_complex() != tensors[f"static.{n}"].is_complex())]
        if problems:
            raise CheckpointError(f"{str(path)!r} is a manifold for another model: tensors {problems[:4]} "
                                  "do not match the base architecture; pass the matching base=")
        try:
            _check_structure(p["cliques"], p["layouts"], state)
        except ValueError as e:
            raise CheckpointError(f"{str(path)!r}: its cliques do not fit the base model ({e}); the file is "
                                  "corrupt or was edited — write it again") from e
        if p["fused_bn"]:
            from morphkit.fuse import fuse_bn

            model = fuse_bn(model)
        inr = _load_inr(p["layouts"], p["config"], tensors, path)
        static = {n: tensors[f"static.{n}"] for n in p["static"]}
        stored = {lt.name: tensors[f"base.{lt.name}"] for lt in p["layouts"] if f"base.{lt.name}" in tensors}
        if stored:
            bad = [n for n, t in stored.items() if tuple(t.shape) != state[n] or t.dtype != full[n].dtype]
            if bad or len(stored) != len(p["layouts"]):
                raise CheckpointError(f"{str(path)!r}: stored base tensors {bad[:4] or 'incomplete'} do not fit "
                                      "the base model; the file is corrupt or was edited — write it again")
            model.load_state_dict(with_metadata(model, {**static, **stored}), strict=False)
        return cls(inr, p["cliques"], p["layouts"], static, model, p["example"], p["config"], p["arch"],
                   p["perms"], info=p["info"], fused_bn=p["fused_bn"], base_is_trained=bool(stored),
                   calib=None if p["calib"] is None else p["calib"].float())


# ------------------------------------------------------------------ reading files
# What a manifold file's metadata may say is checked in morphkit.untrusted (one place for every reader).
_parse_meta = parse_manifold_meta
_check_structure = check_structure


def _brief(e: BaseException) -> str:
    text = str(e) if isinstance(e, MorphkitError) else f"{type(e).__name__}: {e}"
    return text[:300]


def _load_inr(layouts: list[TensorLayout], config: MorphConfig, tensors: dict[str, torch.Tensor],
              path: str | Path) -> INR:
    """The INR, its shapes checked on the meta device (no memory) before it is built and loaded."""
    got = {k[4:]: v for k, v in tensors.items() if k.startswith("inr.")}
    with torch.device("meta"):
        probe = build_inr(layouts, config)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in got.items()}
    if want != have:
        missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise CheckpointError(f"{str(path)!r}: INR weights do not match its config "
                              f"({describe_mismatch(missing, unexpected, wrong, have, want)}); the file is corrupt")
    bad = sorted(k for k, v in got.items() if not v.is_floating_point() or v.is_complex())
    if bad:
        raise CheckpointError(f"{str(path)!r}: INR tensor {bad[0]!r} is {got[bad[0]].dtype}, expected a real "
                              "floating-point tensor; the file is corrupt")
    inr = build_inr(layouts, config)
    try:
        inr.load_state_dict(got, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r}: INR weights do not match its config: {e}") from e
    return inr


def bn_modules_to_calibrate(net: nn.Module) -> list[nn.Module]:
    """BatchNorm modules that are not identities (fusion could not fold them)."""
    out = []
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            identity = (m.running_mean is not None and bool((m.running_mean == 0).all())
                        and (m.weight is None or bool((m.weight == 1).all())))
            if not identity:
                out.append(m)
    return out


@torch.no_grad()
def recalibrate_bn(net: nn.Module, data: Any, batches: int = 20,
                   modules: list[nn.Module] | None = None) -> int:
    """Recompute BatchNorm running statistics on a few batches (cumulative average).

    Batches are moved to the device of ``net``'s parameters and run with every
    other module in eval mode. Each BatchNorm's momentum and mode, and the
    network's mode, are restored afterwards, also when a forward pass fails.

    Args:
        net: A (sampled) network; its BatchNorm buffers are overwritten in place.
        data: Iterable of batches (``(x, ...)`` tuples or tensors).
        batches: At most this many batches are used.
        modules: The BatchNorms to recalibrate; default the ones fusion did not
            fold (:func:`bn_modules_to_calibrate`).

    Returns:
        The number of BatchNorm modules recalibrated.

    Raises:
        ConfigError: ``data`` yielded no batch while there was something to recalibrate.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> _ = net[1].weight.data.fill_(2.0)  # a real BN, not a folded identity
        >>> recalibrate_bn(net, [torch.randn(8, 1, 6, 6)])
        1
    """
    from morphkit.fit import to_device

    bns = bn_modules_to_calibrate(net) if modules is None else list(modules)
    if not bns:
        return 0
    p = next(iter(net.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    saved = [(m.momentum, m.training) for m in bns]
    was = net.training
    seen = 0
    try:
        net.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        for batch in data:
            if seen >= batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            net(to_device(x, device))
            seen += 1
    finally:
        net.train(was)
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
    if seen == 0:
        raise ConfigError("calibration data yielded no batch; pass a non-empty iterable of (x, y) batches "
                          "to recalibrate the BatchNorm statistics")
    return len(bns)
