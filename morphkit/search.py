"""Budget-targeted widths: search a manifold for the per-clique width map that scores best within a budget.

A manifold emits any width map in a fraction of a second, so a search can score
many per-clique width maps on real data without training anything. The budget is
a parameter count, a MAC count (the multiply-accumulates of every convolution and
linear layer, for the manifold's example input shape) and/or a latency measured on
this machine (batch of the example input, median of several runs).

The search (:func:`search`) projects every candidate onto the budget's boundary:
a candidate is a vector of per-clique relative widths ``r``, and its width map is
``channels_c = size_c * min(1, t * r_c)`` for the largest ``t`` that meets the
budget (found by bisection), rounded as ``round_to`` asks. It starts from the
uniform width map (``r = 1``, the baseline it must beat) and, where it fits, the
narrowest uniform map the manifold was trained on (the sandwich trains that map
in a quarter of its passes, so it can beat wider uniform maps near it: ResNet-20 /
CIFAR-10, 68.4% at compression 75% against 60.8% at 72.5%), adds random vectors,
then mutates the best ones (an evolutionary search), scoring each on the given
held-out batches. By default no clique goes below the narrowest width the
manifold was trained at (extrapolated widths score badly and noisily).

Example:
    >>> result = mk.search(manifold, val_batches, params=20_000)  # doctest: +SKIP
    >>> net = manifold.sample(result.widths)                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from morphkit.errors import ConfigError
from morphkit.graph import is_transposed_linear

__all__ = ["search", "SearchResult", "CostModel", "parse_count"]

logger = logging.getLogger(__name__)

#: Bisection steps that place a candidate on the budget's boundary.
BISECT_STEPS = 24
#: For classification, the searched map replaces the uniform one only when, on the confirmation
#: images, it wins by this many standard errors of the paired difference (images one gets right and
#: the other misses): the best of three finalists beats the uniform map by chance otherwise
#: (LeNet-5 at 50%: +2.5 images on the confirmation half, -10 on the test set, with half an
#: unpaired standard error as the only bar).
PAIRED_Z = 2.0


def parse_count(text: str | int | float, what: str = "count") -> float:
    """A count with an optional k/M/G suffix: ``"50k"`` -> 50000.0, ``"5M"`` -> 5e6.

    Raises:
        ConfigError: not a positive finite number with an optional suffix.

    Example:
        >>> parse_count("50k"), parse_count("2.5M"), parse_count(1200)
        (50000.0, 2500000.0, 1200.0)
    """
    if isinstance(text, bool):
        raise ConfigError(f"{what}: got {text!r}, expected a positive number such as 50k or 5M")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = str(text).strip()
        mult = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}.get(t[-1:], 1.0)
        try:
            value = float(t[:-1] if mult != 1.0 else t) * mult
        except ValueError:
            raise ConfigError(f"{what}: got {text!r}, expected a positive number such as 50k, 5M or 1200") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}: got {text!r}, expected a positive number such as 50k, 5M or 1200")
    return value


class CostModel:
    """Parameters, MACs and latency of a manifold's width maps, without building a model for the first two.

    Parameters count every parameter tensor at its resized shape. MACs are the
    multiply-accumulates of every ``nn.Conv*d`` and ``nn.Linear`` (weight
    elements times output positions, recorded once on the example inputs);
    attention's matrix products and element-wise layers are not counted.
    Latency is measured: the median wall time of a forward pass of the resized
    model on the example inputs, on this machine and its current thread count.

    Example:
        >>> costs = CostModel(manifold)                          # doctest: +SKIP
        >>> costs.params(manifold.width_map(0.5))                # doctest: +SKIP
        15738
    """

    def __init__(self, manifold: Any, latency_runs: int = 10) -> None:
        from morphkit.graph import as_inputs

        self.manifold = manifold
        self.cliques = manifold.cliques
        base: nn.Module = manifold.base
        self.shapes = {k: tuple(v.shape) for k, v in base.state_dict(keep_vars=True).items()}
        self.param_keys = [k for k, _ in base.named_parameters()]
        self.latency_runs = latency_runs
        self._latency: dict[tuple, float] = {}
        self.positions: dict[str, int] = {}  # weight key -> output positions per example (MACs per weight element)
        hooks = []
        inputs = as_inputs(manifold.example_inputs)
        batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1
        for name, mod in base.named_modules():
            if ((isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) or is_transposed_linear(mod))
                    and getattr(mod, "weight", None) is not None):
                key = f"{name}.weight" if name else "weight"

                def hook(m: nn.Module, args: Any, out: Any, key: str = key) -> None:
                    if isinstance(out, torch.Tensor) and out.numel():
                        channels = out.shape[1] if isinstance(m, nn.modules.conv._ConvNd) else out.shape[-1]
                        self.positions[key] = max(1, out.numel() // max(1, batch * channels))

                hooks.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                was = base.training
                base.eval()
                base(*inputs)
                base.train(was)
        finally:
            for h in hooks:
                h.remove()

    def _sizes(self, counts: dict[int, int]) -> dict[str, int]:
        from morphkit.graph import keep_positions

        keep = keep_positions(self.cliques, counts, self.shapes)
        out = {}
        for key, shape in self.shapes.items():
            dims = list(shape)
            for d in range(len(dims)):
                if (key, d) in keep:
                    dims[d] = len(keep[(key, d)])
            out[key] = math.prod(dims)
        return out

    def params(self, counts: dict[int, int]) -> int:
        """Parameters of the model at a width map."""
        sizes = self._sizes(counts)
        return int(sum(sizes[k] for k in self.param_keys))

    def macs(self, counts: dict[int, int]) -> int:
        """Multiply-accumulates of the convolutions and linear layers at a width map (per example)."""
        sizes = self._sizes(counts)
        return int(sum(sizes[k] * p for k, p in self.positions.items()))

    def latency_ms(self, counts: dict[int, int]) -> float:
        """Median forward time (ms) of the model at a width map on the example inputs (measured, cached)."""
        key = tuple(sorted(counts.items()))
        if key not in self._latency:
            net = self.manifold.template(counts)
            inputs = self.manifold.example_inputs
            times = []
            with torch.inference_mode():
                for i in range(self.latency_runs + 2):
                    t0 = time.perf_counter()
                    net(*inputs)
                    if i >= 2:  # two warm-up runs
                        times.append(time.perf_counter() - t0)
            self._latency[key] = 1000 * float(np.median(times))
        return self._latency[key]


@dataclass
class SearchResult:
    """What :func:`search` found.

    Attributes:
        widths: The best width map within the budget (``{clique_id: channels}``).
        score: Its score on the confirmation batches (``accuracy``, or ``-mse`` for a VAE).
        metric: ``"accuracy"``, ``"miou"`` (segmentation) or ``"mse"``.
        value: The metric itself (accuracy or MSE) on the confirmation batches (the odd search batches).
        params: Its parameter count.
        macs: Its MACs (convolutions and linear layers, per example).
        latency_ms: Its measured latency (only when a latency budget was given).
        budget: The budget asked for (``params`` / ``macs`` / ``latency_ms``).
        uniform: The uniform width map at the same budget: ``width``, ``widths``, ``value``, ``params``, ``macs``.
            ``widths`` equals it when no map beat it by ``min_gain``.
        evaluated: Width maps scored.
        seconds: Wall time of the search.
        images: Images in the search batches (ranking and confirmation together).
        confirm_images: Images in the confirmation batches that ``value`` is measured on.
        round_to: The ``round_to`` used.
    """

    widths: dict[int, int]
    score: float
    metric: str
    value: float
    params: int
    macs: int
    latency_ms: float | None
    budget: dict[str, float]
    uniform: dict[str, Any]
    evaluated: int
    seconds: float
    images: int
    round_to: int | None = None
    confirm_images: int = 0
    top: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (clique ids as strings), e.g. to record in a model file."""
        d = asdict(self)
        d["widths"] = {str(k): int(v) for k, v in self.widths.items()}
        d["uniform"] = {**self.uniform, "widths": {str(k): int(v) for k, v in self.uniform["widths"].items()}}
        return d

    def summary(self) -> str:
        """One line for people.

        Example:
            >>> print(result.summary())  # doctest: +SKIP
            searched 64 width maps in 9 s: accuracy 98.93% on 1,024 images (uniform width 0.46: 98.52%); ...
        """
        def fmt(v: float) -> str:
            return f"{100 * v:.2f}%" if self.metric in ("accuracy", "miou") else f"MSE {v:.3f}"

        budget = _budget_text(self.budget)
        return (f"searched {self.evaluated} width maps in {self.seconds:.0f} s: {self.metric} {fmt(self.value)} on "
                f"{self.confirm_images:,} confirmation images of {self.images:,} (uniform width "
                f"{self.uniform['width']:.3f}: "
                f"{fmt(self.uniform['value'])}); {self.params:,} params, {self.macs:,} MACs"
                + (f", {self.latency_ms:.2f} ms" if self.latency_ms is not None else "") + f" (budget: {budget})")


def _budget_text(budget: dict[str, float]) -> str:
    """``{"params": 5e4, "latency_ms": 2}`` -> ``50,000 params, 2 ms``."""
    names = {"params": "params", "macs": "MACs", "latency_ms": "ms"}
    return ", ".join(f"{v:,.6g} {names.get(k, k)}" for k, v in budget.items())


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` inside the block."""
    log = logging.getLogger(name)
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _batches(data: Any, batches: int) -> list[Any]:
    out = []
    for b in data:
        out.append(b)
        if len(out) >= batches:
            break
    if not out:
        raise ConfigError("search: data yielded no batch; pass held-out (x, y) batches to score width maps on")
    return out


def search(manifold: Any, data: Any, *, params: float | str | None = None, macs: float | str | None = None,
           latency_ms: float | None = None, round_to: int | None = None, candidates: int = 48,
           batches: int = 8, samples: int = 4, time_budget: float | None = None,
           allow_untrained: bool | None = None, min_gain: float | None = None, final_samples: int | None = None,
           seed: int = 0) -> SearchResult:
    """Search the per-clique width map with the best score on ``data`` within a budget.

    Args:
        manifold: A :class:`~morphkit.Manifold`.
        data: Held-out ``(x, y)`` batches to score on (not the data you report
            test accuracy on); the first ``batches`` batches are used.
        params: Most parameters (``50_000`` or ``"50k"``).
        macs: Most MACs of the convolutions and linear layers per example (``"5M"``).
        latency_ms: Most milliseconds per forward pass of the example inputs, measured here.
        round_to: Channel counts in multiples of this where a clique allows.
        candidates: Width maps scored (the uniform one included).
        batches: Batches of ``data`` scored per width map.
        samples: K noisy draws averaged when sampling each candidate (the
            final model is sampled with the manifold's default K by the caller).
        time_budget: Stop after this many seconds (at least the uniform map is scored).
        allow_untrained: Let cliques go below the narrowest trained width
            (extrapolated by the INR). None (default): only when the budget
            is below the smallest model at trained widths, with a warning.
        min_gain: How much the best map must beat the uniform one on the
            confirmation batches to be chosen over it; default half a standard
            error of the uniform map's accuracy there. Candidates are ranked on
            the even batches; the three best and the uniform map are then
            compared on the odd ones, which the ranking never saw (the best of
            many maps scored on one set is flattered by chance there). For
            classification the win must also be ``PAIRED_Z`` (2) standard
            errors of the paired difference on those images.
        final_samples: K of the confirmation, which scores the models as the
            caller will sample them (default: the manifold's K, 50); widths
            outside the trained range differ most between few and many draws.
        seed: Seed of the random candidates and of sampling.

    Returns:
        A :class:`SearchResult`; ``manifold.sample(result.widths)`` is the model.

    Raises:
        ConfigError: no budget; a budget below the smallest model the search may
            build; bad numbers; empty data.

    Example:
        >>> r = search(manifold, val, params="20k", round_to=4)  # doctest: +SKIP
        >>> r.params <= 20_000                                   # doctest: +SKIP
        True
    """
    from morphkit.clique import width_map
    from morphkit.fit import HIGHER_IS_BETTER, METRIC_OF_TASK, evaluate, logits_of, split_batch, task_for
    from morphkit.graph import as_inputs

    budget = {}
    if params is not None:
        budget["params"] = parse_count(params, "params")
    if macs is not None:
        budget["macs"] = parse_count(macs, "macs")
    if latency_ms is not None:
        budget["latency_ms"] = parse_count(latency_ms, "latency_ms")
    if not budget:
        raise ConfigError("search needs a budget: params=, macs= and/or latency_ms=")
    for name, v, lo in (("candidates", candidates, 1), ("batches", batches, 1), ("samples", samples, 1),
                        ("final_samples", 1 if final_samples is None else final_samples, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name}: got {v!r}, expected an int >= {lo}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ConfigError(f"time_budget: got {time_budget!r}, expected seconds > 0 or None")
    width_map(manifold.cliques, 1.0, round_to)  # validates round_to
    t_start = time.perf_counter()
    costs = CostModel(manifold)
    held = _batches(data, batches)
    task = task_for(manifold.base, held)
    metric = METRIC_OF_TASK[task]
    free = [c for c in manifold.cliques if not c.fixed]
    hi = float(manifold.config.train.compression[1])
    trained_floor = {c.id: c.channels_for(1 - hi, round_to) for c in free}
    floor = trained_floor if not allow_untrained else {c.id: c.channels_for(1e-9, round_to) for c in free}

    def counts_at(t: float, r: np.ndarray) -> dict[int, int]:
        counts = {c.id: c.size for c in manifold.cliques}
        for c, rc in zip(free, r):
            n = c.channels_for(min(1.0, max(1e-9, t * rc)), round_to)
            counts[c.id] = max(n, floor[c.id])
        return counts

    def fits(counts: dict[int, int]) -> bool:
        if "params" in budget and costs.params(counts) > budget["params"]:
            return False
        if "macs" in budget and costs.macs(counts) > budget["macs"]:
            return False
        return not ("latency_ms" in budget and costs.latency_ms(counts) > budget["latency_ms"])

    smallest = counts_at(0.0, np.ones(len(free)))
    if allow_untrained is None and not fits(smallest):
        floor = {c.id: c.channels_for(1e-9, round_to) for c in free}
        smallest = counts_at(0.0, np.ones(len(free)))
        logger.warning("the budget (%s) is below the smallest model at trained widths (compression %g): the search "
                       "also tries narrower, extrapolated widths", _budget_text(budget), hi)
    if not fits(smallest):
        what = (f"{costs.params(smallest):,} params, {costs.macs(smallest):,} MACs"
                + (f", {costs.latency_ms(smallest):.2f} ms" if "latency_ms" in budget else ""))
        raise ConfigError(f"the budget ({_budget_text(budget)}) is below the smallest model the search may build "
                          f"({what}: every clique at the narrowest {'allowed' if allow_untrained else 'trained'} "
                          "width); ask for more"
                          + ("" if allow_untrained is not False else ", or pass allow_untrained=True"))

    def project(r: np.ndarray) -> dict[int, int]:
        r = np.clip(r, 1e-3, None)
        lo, hi_t = 0.0, 1.0 / float(r.min())
        if fits(counts_at(hi_t, r)):
            return counts_at(hi_t, r)
        for _ in range(BISECT_STEPS):
            mid = (lo + hi_t) / 2
            if fits(counts_at(mid, r)):
                lo = mid
            else:
                hi_t = mid
        return counts_at(lo, r)

    scored: dict[tuple, dict[str, Any]] = {}

    # rank candidates on half the batches and confirm the finalists against the uniform map on the other
    # half: the best of many maps scored on one set is flattered by chance there (the winner's curse)
    rank_set, confirm_set = (held[0::2], held[1::2]) if len(held) >= 2 else (held, held)

    def value_on(counts: dict[int, int], batches: list[Any], k: int = samples) -> float:
        with _quiet("morphkit.manifold"):  # one warning about untrained widths, above, not one per candidate
            net = manifold.sample(counts, samples=k, seed=seed)
        return float(evaluate(net, batches, task=task)[metric])

    def confirm_on(counts: dict[int, int], batches: list[Any], k: int) -> tuple[float, torch.Tensor | None]:
        """The metric, and for classification which examples the model gets right (``(n,)`` bool)."""
        if task != "classification":
            return value_on(counts, batches, k), None
        with _quiet("morphkit.manifold"):
            net = manifold.sample(counts, samples=k, seed=seed)
        right = []
        with torch.inference_mode():
            for b in batches:
                x, y = split_batch(b)
                right.append(logits_of(net(*as_inputs(x))).argmax(-1).cpu().reshape(-1) == y.cpu().reshape(-1))
        right_all = torch.cat(right)  # (n,)
        return float(right_all.float().mean()), right_all  # accuracy, as evaluate() computes it

    def score(counts: dict[int, int]) -> dict[str, Any]:
        key = tuple(sorted(counts.items()))
        if key not in scored:
            value = value_on(counts, rank_set)
            score = value if metric in HIGHER_IS_BETTER else -value
            scored[key] = {"widths": dict(counts), "value": value, "score": score,
                           "params": costs.params(counts), "macs": costs.macs(counts)}
            logger.debug("search: %s %.4f at %s", metric, value, counts)
        return scored[key]

    rng = np.random.default_rng(seed)
    uniform_r = np.ones(len(free))
    uniform = score(project(uniform_r))
    # the uniform width this is: the largest single width whose map fits
    lo_w, hi_w = 0.0, 1.0
    for _ in range(BISECT_STEPS):
        mid = (lo_w + hi_w) / 2
        if fits(counts_at(mid, uniform_r)):
            lo_w = mid
        else:
            hi_w = mid
    population: list[tuple[float, np.ndarray]] = [(uniform["score"], uniform_r)]
    narrowest = {c.id: c.size for c in manifold.cliques}
    narrowest.update(trained_floor)
    if narrowest != uniform["widths"] and fits(narrowest):  # the map training draws most: a candidate of its own
        score(narrowest)
    n_random = max(0, min(candidates - 1, max(4, candidates // 3)))

    def out_of_time() -> bool:
        return time_budget is not None and time.perf_counter() - t_start > time_budget

    tries = 0
    while len(scored) < candidates and not out_of_time() and tries < 4 * candidates:
        tries += 1
        if len(scored) <= n_random or len(population) < 2:
            r = np.exp(rng.uniform(-0.6, 0.6, len(free)))
        else:
            top = sorted(population, key=lambda p: -p[0])[:4]
            parent = top[int(rng.integers(len(top)))][1]
            mask = rng.random(len(free)) < max(0.25, 1.5 / max(1, len(free)))
            r = parent * np.exp(np.where(mask, rng.normal(0, 0.3, len(free)), 0.0))
        counts = project(r)
        s = score(counts)
        population.append((s["score"], r))
    def n_images(batches: list[Any]) -> int:
        return sum(int(b[0].shape[0]) if isinstance(b, (tuple, list)) else int(b.shape[0]) for b in batches)

    images, confirm_images = n_images(held), n_images(confirm_set)
    final_k = manifold.config.samples if final_samples is None else final_samples
    sign = 1.0 if metric in HIGHER_IS_BETTER else -1.0
    for entry in [uniform, *[e for e in sorted(scored.values(), key=lambda e: -e["score"]) if e is not uniform][:3]]:
        # the model the caller will sample; per-example correctness where the task has it
        entry["confirm"], entry["correct"] = confirm_on(entry["widths"], confirm_set, final_k)
    finalists = [e for e in scored.values() if "confirm" in e and e is not uniform]
    best = max(finalists, key=lambda e: (sign * e["confirm"], -e["params"]), default=uniform)
    if min_gain is None:  # half a standard error of the uniform map's accuracy on the confirmation images
        u = uniform["confirm"]
        min_gain = 0.5 * math.sqrt(max(u * (1 - u), 1 / confirm_images) / confirm_images) if sign > 0 else 0.0
    if best is not uniform and sign * (best["confirm"] - uniform["confirm"]) < min_gain:
        logger.info("search: the best map beats the uniform one by %.4g < %.4g on %d confirmation images: keeping "
                    "the uniform map", sign * (best["confirm"] - uniform["confirm"]), min_gain, confirm_images)
        best = uniform
    if best is not uniform and best["correct"] is not None and uniform["correct"] is not None:
        # paired: the images only one of the two gets right decide; the best of three finalists must win
        # by PAIRED_Z standard errors of that difference, or it may be chance (the winner's curse)
        wins = int((best["correct"] & ~uniform["correct"]).sum())
        losses = int((uniform["correct"] & ~best["correct"]).sum())
        if wins - losses < PAIRED_Z * math.sqrt(wins + losses):
            logger.info("search: the best map gets %d confirmation images right that the uniform one misses and "
                        "misses %d it gets right: not %.0f standard errors better, keeping the uniform map",
                        wins, losses, PAIRED_Z)
            best = uniform
    ranked = sorted(scored.values(), key=lambda s: -s["score"])[:5]
    result = SearchResult(
        widths=best["widths"], score=sign * best["confirm"], metric=metric, value=best["confirm"],
        params=best["params"],
        macs=best["macs"], latency_ms=costs.latency_ms(best["widths"]) if "latency_ms" in budget else None,
        budget=budget, uniform={"width": round(lo_w, 4), "widths": uniform["widths"], "value": uniform["confirm"],
                                "params": uniform["params"], "macs": uniform["macs"]},
        evaluated=len(scored), seconds=round(time.perf_counter() - t_start, 2), images=images, round_to=round_to,
        confirm_images=confirm_images,
        top=[{"value": s["value"], "params": s["params"], "macs": s["macs"],
              "widths": {str(k): v for k, v in s["widths"].items()}} for s in ranked])
    logger.info("%s", result.summary())
    return result
