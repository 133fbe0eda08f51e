"""Side-by-side comparison of NeuMeta and its alternatives at identical model sizes.

:func:`compare` evaluates every method at every compression and returns the
table as a list of plain ``dict`` rows; :func:`write_report` turns the rows
into ``report.md`` (metric per method x compression, parameters and MACs),
``report.json`` and ``accuracy.png`` (metric vs compression, one line per
method, compressions outside the manifold's training range marked).

Methods:

* ``neumeta``: ``manifold.sample(width)`` (needs a :class:`~morphkit.Manifold`);
* ``l1``, ``l2``, ``taylor``, ``hessian``, ``random``: :func:`~morphkit.baselines.prune`
  of the base model (optionally fine-tuned);
* ``individual``: :func:`~morphkit.baselines.train_individual`, one model
  trained from scratch per compression (needs ``train_data``);
* ``slimmable``: :func:`~morphkit.baselines.train_slimmable`, one shared
  model trained on the manifold's width range (needs ``train_data``).

Every model of one compression has the same architecture, parameter count
and MACs (a mismatch is logged as an error and recorded in the row).

Example:
    >>> rows = mk.compare(manifold, test_dl, ["neumeta", "l1"], [0, 0.5], train_data=train_dl)  # doctest: +SKIP
    >>> mk.write_report(rows, "report/")                                                      # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from morphkit._io import atomic_write_bytes
from morphkit.baselines import METHODS as PRUNE_METHODS
from morphkit.errors import CheckpointError, ConfigError
from morphkit.fit import HIGHER_IS_BETTER as _HIGHER

__all__ = ["compare", "write_report", "count_macs", "COMPARE_METHODS"]

logger = logging.getLogger(__name__)

#: Every method :func:`compare` knows.
COMPARE_METHODS: tuple[str, ...] = ("neumeta", *PRUNE_METHODS, "individual", "slimmable", "searched")
#: Higher is better for these metrics; lower for the others (VAE: ``mse``, ``nll``).
HIGHER_IS_BETTER = _HIGHER  # accuracy and mean IoU; lower is better for the VAE's mse and nll


def count_macs(model: nn.Module, example_inputs: Any) -> int | None:
    """Multiply-accumulates of one forward pass on one sample (torch-pruning's counter); None if it fails.

    Example:
        >>> import morphkit as mk
        >>> count_macs(mk.build_model("lenet5"), torch.zeros(1, 1, 28, 28)) > 0
        True
    """
    try:
        import torch_pruning as tp

        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        inputs = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs)
        macs, _ = tp.utils.count_ops_and_params(model, inputs)
        return int(macs)
    except Exception as e:  # noqa: BLE001 - MAC counting is informational only
        logger.warning("MAC count failed for %s: %s", type(model).__name__, e)
        return None


def _parse_methods(methods: Sequence[str] | str) -> list[str]:
    if isinstance(methods, str):
        methods = [m for m in methods.split(",")]
    out = []
    for m in methods:
        name = str(m).strip().lower()
        if name not in COMPARE_METHODS:
            raise ConfigError(f"unknown method {m!r}; expected some of {', '.join(COMPARE_METHODS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"no methods given; expected some of {', '.join(COMPARE_METHODS)}")
    return out


def _parse_compressions(compressions: Sequence[float] | str) -> list[float]:
    if isinstance(compressions, str):
        try:
            compressions = [float(v) for v in compressions.split(",") if v.strip()]
        except ValueError as e:
            raise ConfigError(f"compressions: got {compressions!r}, expected numbers like 0,0.25,0.5") from e
    out = []
    for g in compressions:
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 <= g < 1:
            raise ConfigError(f"compression must be a number in [0, 1) (= 1 - width), got {g!r}")
        if float(g) not in out:
            out.append(float(g))
    if not out:
        raise ConfigError("no compressions given; expected numbers in [0, 1) such as 0,0.25,0.5,0.75")
    return out


def compare(
    manifold_or_model: Any,
    data: Iterable,
    methods: Sequence[str] | str = ("neumeta", "l1", "l2", "taylor", "hessian", "random"),
    compressions: Sequence[float] | str = (0.0, 0.25, 0.5, 0.75),
    *,
    example_inputs: Any = None,
    base: nn.Module | None = None,
    finetune_epochs: int = 0,
    samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
    train_data: Iterable | None = None,
    train_epochs: int | None = None,
    batches: int = 8,
    hessian_samples: int = 128,
    calib_batches: int = 20,
    device: str | torch.device | None = None,
    unseen: str = "inr",
) -> list[dict[str, Any]]:
    """Evaluate every method at every compression; models of one compression have identical sizes.

    Args:
        manifold_or_model: A :class:`~morphkit.Manifold` (all methods), or a
            trained ``nn.Module`` (every method but ``neumeta``).
        data: Evaluation batches of ``(x, y)`` (the test split).
        methods: Names from :data:`COMPARE_METHODS` (a list or ``"neumeta,l1"``);
            ``searched`` is the manifold's best per-clique widths within each
            uniform model's parameter count (:func:`~morphkit.search.search` on
            ``train_data``).
        compressions: Values in [0, 1) (``width = 1 - compression``).
        example_inputs: Inputs to find cliques and count MACs (default: the
            manifold's, or the model's recorded input shape).
        base: The original trained model to prune (a manifold file does not
            store the base weights it predicts). Default: the manifold's
            ``base`` when it was built in this process by ``morph()``, else
            its full-width sample ``manifold.sample(1.0)``.
        finetune_epochs: Fine-tuning epochs after pruning (needs ``train_data``).
        samples: K noisy draws averaged by ``manifold.sample`` (default: the manifold's).
        seed: Seed of sampling, random pruning and training.
        progress: tqdm bars.
        train_data: Training batches: gradients of ``taylor``/``hessian``,
            fine-tuning, BN recalibration, ``individual`` and ``slimmable``.
            When None, ``taylor``/``hessian`` score on ``data`` (logged).
        train_epochs: Epochs of ``individual``/``slimmable`` (default: the model's recipe).
        batches: Batches averaged by ``taylor``.
        hessian_samples: Samples averaged by ``hessian``.
        calib_batches: Batches used to recalibrate BatchNorm statistics.
        device: Where fine-tuning and training run.
        unseen: How ``neumeta`` builds widths below the manifold's trained
            range: ``"inr"`` or ``"fold"`` (:meth:`~morphkit.Manifold.predict`).

    Returns:
        One row per (method, compression): ``method``, ``label`` (method plus
        fine-tuning), ``compression``, ``width``, ``trained`` (compression
        within the manifold's training range; None for a plain model),
        ``finetune_epochs``, ``metric`` (``accuracy``, ``miou`` for
        segmentation or ``mse``), ``value``,
        every metric of :func:`~morphkit.fit.evaluate`, ``params``, ``macs``,
        ``seconds`` (time to produce the model).

    Raises:
        ConfigError: unknown method or bad compression; ``neumeta`` without a
            manifold; ``individual``/``slimmable``/fine-tuning without ``train_data``.

    Example:
        >>> rows = compare(manifold, test_dl, "neumeta,l1,random", [0, 0.5, 0.75])  # doctest: +SKIP
        >>> {r["method"]: r["value"] for r in rows if r["compression"] == 0.5}      # doctest: +SKIP
    """
    from morphkit.baselines import _check_int, prune, train_individual, train_slimmable
    from morphkit.export import count_params
    from morphkit.fit import METRIC_OF_TASK, evaluate, show_progress, task_for
    from morphkit.graph import as_inputs, find_cliques
    from morphkit.manifold import UNSEEN_MODES, Manifold
    from morphkit.models import arch_of, example_inputs_for

    methods = _parse_methods(methods)
    comps = _parse_compressions(compressions)
    _check_int("finetune_epochs", finetune_epochs, 0)
    if unseen not in UNSEEN_MODES:
        raise ConfigError(f"unseen: got {unseen!r}, expected one of {', '.join(map(repr, UNSEEN_MODES))}")
    manifold = manifold_or_model if isinstance(manifold_or_model, Manifold) else None
    if manifold is None and not isinstance(manifold_or_model, nn.Module):
        raise ConfigError(f"compare needs a Manifold or an nn.Module, got {type(manifold_or_model).__name__}")
    if manifold is None and "neumeta" in methods:
        raise ConfigError("method 'neumeta' needs a Manifold (from morph() or Manifold.load); "
                          "drop it to compare baselines of a plain model")
    if "searched" in methods and (manifold is None or train_data is None):
        raise ConfigError("method 'searched' searches the manifold's per-clique widths within each uniform model's "
                          "parameter count on training batches: it needs a Manifold and train_data=...")
    needs_train = [m for m in methods if m in ("individual", "slimmable")]
    if needs_train and train_data is None:
        raise ConfigError(f"methods {needs_train} train models: pass train_data=... (training batches)")
    if finetune_epochs and train_data is None:
        raise ConfigError(f"finetune_epochs={finetune_epochs} needs train_data=... (training batches)")

    if manifold is not None:
        x = as_inputs(example_inputs) if example_inputs is not None else manifold.example_inputs
        cliques = manifold.cliques
        lo, hi = (float(v) for v in manifold.config.train.compression)
        arch = manifold.arch
        if base is not None:
            source, source_name = base, "base"
        elif getattr(manifold, "base_is_trained", False):  # set where the manifold holds the trained base
            source, source_name = manifold.base, "manifold.base"
        else:  # a manifold file stores no predicted base weights: its base is freshly initialised
            source, source_name = None, "manifold.sample(1.0)"
    else:
        model = manifold_or_model
        x = as_inputs(example_inputs if example_inputs is not None else example_inputs_for(model))
        cliques = find_cliques(model, x)
        lo = hi = math.nan  # no manifold: no training range
        arch = arch_of(model)
        source, source_name = model, "model"
    task = task_for(source if source is not None else manifold.base, data)  # type: ignore[union-attr]
    metric = METRIC_OF_TASK[task]
    calib = train_data if train_data is not None else data
    score_data = train_data if train_data is not None else data
    if train_data is None and any(m in ("taylor", "hessian") for m in methods):
        logger.warning("taylor/hessian score channels on the evaluation data (no train_data given)")

    def trained(g: float) -> bool | None:
        return None if math.isnan(lo) else lo - 1e-9 <= g <= hi + 1e-9

    if source is None and any(m in PRUNE_METHODS for m in methods):
        logger.info("pruning the manifold's full-width sample (pass base= to prune the original weights)")
        source = manifold.sample(1.0, samples=samples, seed=seed, calib_data=calib,  # type: ignore[union-attr]
                                 calib_batches=calib_batches)
    fresh: Any = arch if arch else (source if source is not None else manifold.base)  # type: ignore[union-attr]

    rows: list[dict[str, Any]] = []
    jobs = [(m, g) for m in methods for g in comps]
    slim = None
    bar = tqdm(jobs, desc="compare", disable=not show_progress(progress))
    for method, g in bar:
        bar.set_postfix(method=method, compression=g)
        width = 1.0 - g
        t0 = time.perf_counter()
        ft = 0
        if method == "neumeta":
            net = manifold.sample(width, samples=samples, seed=seed, calib_data=calib,  # type: ignore[union-attr]
                                  calib_batches=calib_batches, unseen=unseen)
        elif method == "searched":  # the best widths within the uniform model's parameter count
            budget = count_params(manifold.template(manifold.width_map(width)))  # type: ignore[union-attr]
            found = manifold.search(train_data, params=budget, seed=seed,  # type: ignore[union-attr]
                                    final_samples=samples)
            net = manifold.sample(found.widths, samples=samples, seed=seed, calib_data=calib,  # type: ignore[union-attr]
                                  calib_batches=calib_batches, unseen=unseen)
        elif method in PRUNE_METHODS:
            ft = finetune_epochs
            net = prune(source, x, width, method, data=score_data, cliques=cliques, batches=batches,
                        hessian_samples=hessian_samples, finetune_epochs=ft, finetune_data=train_data,
                        seed=seed, device=device, progress=progress)
        elif method == "individual":
            net = train_individual(fresh, width, train_data, epochs=train_epochs,  # type: ignore[arg-type]
                                   example_inputs=x, cliques=cliques, seed=seed, device=device, progress=progress)
        else:  # slimmable: one shared model for every compression
            if slim is None:
                # the manifold's width range (so both extrapolate alike), else the widths asked for
                span = (1 - hi, 1 - lo) if hi > lo else (1 - max(comps), 1.0)
                from morphkit.baselines import _fresh

                slim = train_slimmable(_fresh(fresh, seed), train_data, span,  # type: ignore[arg-type]
                                       epochs=train_epochs, example_inputs=x, cliques=cliques,
                                       calib_batches=calib_batches, seed=seed, device=device, progress=progress)
            net = slim.model_at(width)
        seconds = time.perf_counter() - t0
        net = net.cpu().eval()
        metrics = evaluate(net, data, task=task)
        row = {"method": method, "label": method + (f" +ft{ft}" if ft else ""), "compression": g,
               "width": width, "trained": trained(g), "finetune_epochs": ft, "metric": metric,
               "value": metrics[metric], **{k: v for k, v in metrics.items() if k != "n"},
               "n": int(metrics["n"]), "params": count_params(net), "macs": count_macs(net, x),
               "seconds": round(seconds, 3)}
        if method in PRUNE_METHODS:
            row["pruned_from"] = source_name
        if method in ("neumeta", "searched"):
            row["unseen"] = unseen
        if method == "searched":
            row["search"] = found.to_json()
        rows.append(row)
        logger.info("%s @ compression %.2f: %s %.4f (%d params)", row["label"], g, metric, row["value"],
                    row["params"])
    for g in comps:
        sizes = {(r["params"], r["macs"]) for r in rows if r["compression"] == g and r["method"] != "searched"}
        if len(sizes) > 1:
            logger.error("models at compression %.2f differ in size: %s", g, sorted(sizes, key=str))
            for r in rows:
                if r["compression"] == g:
                    r["size_mismatch"] = True
    return rows


# --------------------------------------------------------------------------- #
# report                                                                       #
# --------------------------------------------------------------------------- #


def _fmt_value(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if metric in HIGHER_IS_BETTER else f"{v:.2f}"


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _markdown(rows: list[dict[str, Any]], title: str, meta: dict[str, Any] | None) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    comps = sorted({r["compression"] for r in rows})
    metric = rows[0]["metric"]
    trained = {g: all(r["trained"] is not False for r in rows if r["compression"] == g) for g in comps}
    by = {(r["label"], r["compression"]): r for r in rows}
    unit = " (%)" if metric in HIGHER_IS_BETTER else ""
    lines = [f"# {title}", ""]
    if meta:
        for k, v in meta.items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    lines += [f"{metric}{unit} by method and compression ({better} is better; "
              "`*` = outside the manifold's training range):", ""]
    head = ["method"] + [f"{100 * g:.0f}%{'' if trained[g] else ' *'}" for g in comps]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
    for lab in labels:
        cells = [lab] + [_fmt_value(metric, by[(lab, g)]["value"]) if (lab, g) in by else "-" for g in comps]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Model size per compression (identical for every method):", "",
              "| compression | width | params | MACs |", "| --- | --- | --- | --- |"]
    for g in comps:
        rs = [r for r in rows if r["compression"] == g and r["method"] != "searched"] or [
            r for r in rows if r["compression"] == g]
        params = sorted({r["params"] for r in rs})
        macs = sorted({r["macs"] for r in rs if r["macs"] is not None})
        p = ", ".join(f"{v:,}" for v in params) + (" (MISMATCH)" if len(params) > 1 else "")
        m = ", ".join(_fmt_count(v) for v in macs) or "-"
        lines.append(f"| {100 * g:.0f}% | {1 - g:.2f} | {p} | {m} |")
    searched = [r for r in rows if r["method"] == "searched"]
    if searched:
        lines += ["", "`searched`: the manifold's per-clique widths with the best accuracy on training batches within "
                  "each compression's parameter count (params / MACs: "
                  + ", ".join(f"{100 * r['compression']:.0f}% {r['params']:,} / {_fmt_count(r['macs'])}"
                              for r in searched) + ")."]
    lines.append("")
    return "\n".join(lines)


#: Colour and marker of each method in the plots (NeuMeta red and thick; fine-tuned variants dashed).
METHOD_STYLE: dict[str, tuple[str, str]] = {
    "neumeta": ("#d62728", "o"), "l1": ("#1f77b4", "s"), "l2": ("#17becf", "D"), "taylor": ("#2ca02c", "^"),
    "hessian": ("#9467bd", "v"), "random": ("#7f7f7f", "x"), "individual": ("#ff7f0e", "P"),
    "slimmable": ("#8c564b", "*"), "searched": ("#e377c2", "h"),
}
_EXTRA_STYLES = [("#bcbd22", "p"), ("#393b79", "<"), ("#637939", ">"), ("#8c6d31", "d"), ("#843c39", "1")]


def _style(method: str, extra: dict[str, tuple[str, str]]) -> tuple[str, str]:
    if method in METHOD_STYLE:
        return METHOD_STYLE[method]
    if method not in extra:
        extra[method] = _EXTRA_STYLES[len(extra) % len(_EXTRA_STYLES)]
    return extra[method]


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Two panels: the metric against compression, and against parameters (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install 'morphkit[plot]')", path.name)
        return False
    metric = rows[0]["metric"]
    scale = 100.0 if metric in HIGHER_IS_BETTER else 1.0
    comps = sorted({r["compression"] for r in rows})
    untrained = [g for g in comps if any(r["trained"] is False for r in rows if r["compression"] == g)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 4.4), dpi=120)
    extra: dict[str, tuple[str, str]] = {}
    for lab in dict.fromkeys(r["label"] for r in rows):
        rs = sorted((r for r in rows if r["label"] == lab), key=lambda r: r["compression"])
        color, marker = _style(rs[0]["method"], extra)
        style = {"lw": 2.6, "zorder": 3, "ms": 7} if rs[0]["method"] == "neumeta" else {"lw": 1.4, "ms": 6}
        if rs[0]["finetune_epochs"]:
            style["ls"] = "--"
        ys = [scale * r["value"] for r in rs]
        for axis, xs in ((ax, [100 * r["compression"] for r in rs]), (bx, [r["params"] for r in rs])):
            axis.plot(xs, ys, marker=marker, color=color, label=lab, **style)
            ux = [x for x, r in zip(xs, rs) if r["trained"] is False]
            uy = [y for y, r in zip(ys, rs) if r["trained"] is False]
            if ux:  # hollow markers: widths the manifold never trained
                axis.plot(ux, uy, ls="none", marker=marker, mfc="white", mec=color, mew=1.6, zorder=4,
                          ms=style["ms"])
    if untrained:  # shade the compressions the manifold never saw in training
        trained_max = max([g for g in comps if g not in untrained], default=min(comps) - 0.1)
        ax.axvspan(100 * (trained_max + min(untrained)) / 2, 100 * max(comps) + 5, color="0.9", zorder=0)
        ax.text(100 * max(comps) + 4, ax.get_ylim()[1], "untrained\nwidths ", ha="right", va="top",
                fontsize=8, color="0.35")
    ylabel = f"{metric} (%)" if metric in HIGHER_IS_BETTER else metric
    ax.set_xlabel("compression (%)")
    ax.set_ylabel(ylabel)
    ax.set_xticks([100 * g for g in comps])
    ax.set_xlim(100 * min(comps) - 3, 100 * max(comps) + 5)
    bx.set_xlabel("parameters")
    bx.set_ylabel(ylabel)
    sizes = sorted({r["params"] for r in rows})
    if len(sizes) > 1:
        bx.set_xscale("log")
    bx.set_xticks(sizes, [_fmt_count(v) for v in sizes], minor=False)
    bx.minorticks_off()
    for axis in (ax, bx):
        axis.grid(alpha=0.3)
    bx.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # rendered in memory, then written atomically: never a half-written PNG
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
    return True


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, *, title: str = "morphkit compare",
                 meta: dict[str, Any] | None = None, stem: str = "report", plot: str = "accuracy"
                 ) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``accuracy.png`` for :func:`compare`'s rows.

    Args:
        rows: The rows returned by :func:`compare` (non-empty).
        out_dir: Directory to write to (created if missing).
        title: Heading of the markdown and the plot.
        meta: Extra facts listed at the top of the markdown and stored in the JSON
            (data, seed, machine, ...).
        stem: File name of the markdown and JSON files, without suffix.
        plot: File name of the PNG, without suffix.

    Returns:
        ``{"md": path, "json": path, "png": path}`` (no ``png`` when matplotlib is missing).

    Raises:
        ConfigError: no rows.
        CheckpointError: the directory cannot be created or a file cannot be written
            (each file is written atomically: whole, or the old one is left).

    Example:
        >>> paths = write_report(rows, "report/")  # doctest: +SKIP
        >>> sorted(paths)                          # doctest: +SKIP
        ['json', 'md', 'png']
    """
    if not rows:
        raise ConfigError("write_report: no rows to write (compare() returned nothing?)")
    out = Path(out_dir)
    md = _markdown(rows, title, meta).encode()
    js = (json.dumps({"title": title, "meta": meta or {}, "rows": rows}, indent=2, default=str) + "\n").encode()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create report directory {str(out)!r}: {e.strerror or e}; choose a "
                              "writable -o") from e
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json"}
    atomic_write_bytes(md, paths["md"])  # each file whole or not replaced (a full disk leaves the old one)
    atomic_write_bytes(js, paths["json"])
    if _plot(rows, out / f"{plot}.png", title):
        paths["png"] = out / f"{plot}.png"
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
