"""Shared helpers of the benchmark scripts: machine/version record, result writing, reused baselines."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU, cores, Python and library versions, date and the command line."""
    import numpy
    import torch

    cpu = cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv)}


def write(name: str, result: dict, markdown: str) -> None:
    """Write ``results/NAME.json`` and ``results/NAME.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)


def data_name(spec: str | None) -> str:
    """A data spec's kind and file name (``mnist:/a/b/mnist`` -> ``mnist:mnist``): the same data elsewhere matches."""
    kind, _, path = (spec or "").partition(":")
    return f"{kind}:{Path(path).name}"


def reused_baselines(path: str, expect: dict[str, Any | Callable[[Any], bool]]) -> tuple[dict, list[dict]]:
    """The rows of every method but NeuMeta from an earlier ``compare`` result, after checking its run.

    The baselines (pruning, individual, slimmable) do not depend on the INR, so
    a change to the manifold can be measured against them without training them
    again. ``expect`` maps meta keys of the earlier result to the value this run
    has (or to a predicate on the earlier value); any difference stops the run.

    Returns:
        ``(meta of the earlier result, its non-NeuMeta rows)``; the meta's
        ``baselines_measured`` names the run that measured the rows (the earlier
        result's own, or the one it reused them from in turn).
    """
    old = json.loads(Path(path).read_text())
    meta = dict(old["meta"])
    if "baselines_measured" not in meta:  # files written before the key: "... (measured MACHINE)"
        chained = re.search(r"\(measured (.*)\)$", meta.get("baselines", ""))
        meta["baselines_measured"] = chained.group(1) if chained else meta["machine"]
    diff = []
    for key, want in expect.items():
        got = meta.get(key)
        ok = want(got) if callable(want) else got == want
        if not ok:
            diff.append(f"{key}: {got!r} there, {want if not callable(want) else 'another value'!r} here")
    if diff:
        raise SystemExit(f"{path}: its run differs from this one ({'; '.join(diff)}); "
                         "rerun the baselines without --baselines-from")
    return meta, [r for r in old["rows"] if r["method"] != "neumeta"]


def metric_table(rows: list[dict], key: str, title: str, compressions: tuple[float, ...],
                 methods: tuple[str, ...] = ("neumeta", "l1"), scale: float = 1.0) -> list[str]:
    """A markdown table of one more metric of ``compare`` rows (methods x compressions), after a title line.

    A compression outside the manifold's training range is starred in the header.
    """
    def star(g: float) -> str:
        return "" if all(r["trained"] is not False for r in rows if r["compression"] == g) else " *"

    lines = ["", title, "", "| method | " + " | ".join(f"{g:.0%}{star(g)}" for g in compressions) + " |",
             "| --- |" + " --- |" * len(compressions)]
    for method in methods:
        vals = [next(r[key] for r in rows if r["method"] == method and r["compression"] == g) for g in compressions]
        lines.append(f"| {method} | " + " | ".join(f"{scale * v:.2f}" for v in vals) + " |")
    return lines


def image_grid(rows: list[tuple[str, Any, dict]], path: Path, title: str, cell: tuple[float, float] = (0.9, 0.95)
               ) -> None:
    """A PNG of image rows: each ``(label, images (N, H, W), imshow keywords)``, one column per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(n * cell[0], len(rows) * cell[1]))
    for r, (label, imgs, kw) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(imgs[c].numpy(), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

