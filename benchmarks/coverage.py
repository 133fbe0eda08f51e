"""Coverage: does the whole front half of the pipeline work on many architectures?

For each model (morphkit's reference models, a test model with ``torch.cat``,
a depthwise, a grouped conv and GroupNorm, and a dozen timm families, all
randomly initialised with random BatchNorm statistics so that fusion is not
trivial), this script runs ``fuse_bn`` -> ``find_cliques`` -> ``smooth`` ->
``resize(0.5)`` and reports:

- cliques found, resizable ones (and their channels), fixed ones and why;
- the largest output difference of the fused + smoothed model against the
  original, relative to the largest output magnitude (eval mode, batch 2);
- times of fusion, clique finding (with its validation) and smoothing;
- total variation (mean absolute difference of adjacent channels) before and
  after smoothing;
- whether the half-width model runs, and parameters and MACs
  (``torch_pruning.utils.count_ops_and_params``) at full and half width,
  counted at the model's native input size.

With resnet50 in the run, ``smooth()`` on it is also timed 3 more times
(median and minimum, after the first run warmed memory) and split into
feature building, L1 distances and solver time.

CNNs are analysed at a small input (64 x 64, their layers do not depend on
it); transformers and the mixer at their native 224 x 224. Torch and numba
use 2 threads.

Usage::

    python benchmarks/coverage.py              # all models, several minutes on 2 cores
    python benchmarks/coverage.py lenet5 timm:resnet50   # a subset

Writes ``benchmarks/results/coverage.json`` and ``coverage.md`` (a subset
writes ``coverage-subset.*``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import cpu_model  # noqa: E402

from morphkit.fuse import fuse_bn  # noqa: E402
from morphkit.graph import find_cliques  # noqa: E402
from morphkit.models import build_model  # noqa: E402
from morphkit.resize import resize  # noqa: E402
from morphkit.smooth import smooth, total_variation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class CatNet(nn.Module):
    """Test model: torch.cat of two branches, a depthwise conv, a grouped conv and GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 10, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw1 = nn.Conv2d(16, 24, 1)
        self.g = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 24)
        self.pw2 = nn.Conv2d(24, 12, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        y = F.relu(self.bn1(self.dw(y)))
        y = F.relu(self.gn(self.g(self.pw1(y))))
        y = self.bn2(self.pw2(y))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


# name -> (analysis input shape, native input shape for MACs)
MODELS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "lenet5": ((1, 28, 28), (1, 28, 28)),
    "resnet20": ((3, 32, 32), (3, 32, 32)),
    "mlp": ((1, 28, 28), (1, 28, 28)),
    "vae_mnist": ((1, 28, 28), (1, 28, 28)),
    "catnet (test)": ((3, 16, 16), (3, 32, 32)),
    "timm:resnet18": ((3, 64, 64), (3, 224, 224)),
    "timm:resnet50": ((3, 64, 64), (3, 224, 224)),
    "timm:mobilenetv3_small_100": ((3, 64, 64), (3, 224, 224)),
    "timm:efficientnet_b0": ((3, 64, 64), (3, 224, 224)),
    "timm:convnext_atto": ((3, 64, 64), (3, 224, 224)),
    "timm:regnetx_002": ((3, 64, 64), (3, 224, 224)),
    "timm:vit_tiny_patch16_224": ((3, 224, 224), (3, 224, 224)),
    "timm:deit_tiny_patch16_224": ((3, 224, 224), (3, 224, 224)),
    "timm:mixer_s16_224": ((3, 224, 224), (3, 224, 224)),
}


def make(name: str) -> nn.Module:
    return CatNet() if name.startswith("catnet") else build_model(name)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and norm affines, noise on constant tensors.

    timm zero-initialises some tensors (the last BN of residual blocks, the
    mixer's classifier); with them the output-difference check would be vacuous.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool(p.amin() == p.amax()):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
            n = m.weight.shape[0]
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def macs_params(model: nn.Module, shape: tuple[int, ...]) -> tuple[float, int]:
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model.eval(), torch.randn(1, *shape))
    return float(macs), int(params)


def run_one(name: str) -> dict[str, Any]:
    shape, native = MODELS[name]
    rec: dict[str, Any] = {"model": name, "input": list(shape), "native_input": list(native)}
    torch.manual_seed(0)
    stage = "build"
    try:
        model = randomize(make(name))
        x = torch.randn(2, *shape)
        x1 = x[:1]
        stage = "fuse"
        t = time.perf_counter()
        fused = fuse_bn(model, x1)
        rec["fuse_s"] = time.perf_counter() - t
        rec["bn_fused"], rec["bn_unfused"] = len(fused.morphkit_fused_bn), len(fused.morphkit_unfused_bn)
        stage = "find_cliques"
        t = time.perf_counter()
        cliques = find_cliques(fused, x1)
        rec["cliques_s"] = time.perf_counter() - t
        free = [c for c in cliques if not c.fixed]
        rec["cliques"] = len(cliques)
        rec["resizable"] = len(free)
        rec["resizable_channels"] = sum(c.size for c in free)
        rec["blocked"] = sum(c.block > 1 for c in free)
        rec["largest_clique"] = max((c.size for c in free), default=0)
        reasons = Counter(c.reason.split(" (")[0] for c in cliques if c.fixed)
        rec["fixed"] = dict(sorted(reasons.items()))
        rec["fixed_detail"] = [f"{c.id} ({c.size}): {c.reason}" for c in cliques if c.fixed]
        stage = "smooth"
        t = time.perf_counter()
        smoothed, _ = smooth(fused, x1, cliques)
        rec["smooth_s"] = time.perf_counter() - t
        rec["tv_before"] = total_variation(fused, x1, cliques)
        rec["tv_after"] = total_variation(smoothed, x1, cliques)
        stage = "compare"
        worst = 0.0
        for a, b in zip(outputs(model, x), outputs(smoothed, x)):
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
        rec["max_rel_diff"] = worst
        stage = "resize"
        small = resize(smoothed, x1, 0.5, cliques, check=True)
        rec["resize_ok"] = True
        stage = "macs"
        rec["macs_full"], rec["params_full"] = macs_params(model, native)
        rec["macs_half"], rec["params_half"] = macs_params(small, native)
    except Exception as e:  # noqa: BLE001 - report every failure in the table
        rec["error"] = f"{stage}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rec.setdefault("resize_ok", False)
        traceback.print_exc()
    return rec


def smoothing_timing(name: str = "timm:resnet50", repeats: int = 3) -> dict[str, Any]:
    """Repeated ``smooth()`` wall times on one model, and where the time goes."""
    import statistics

    from morphkit.smooth import clique_features, l1_distances
    from morphkit.solver import shortest_hamiltonian_path

    shape, _ = MODELS[name]
    model = randomize(make(name))
    x1 = torch.randn(1, *shape)
    fused = fuse_bn(model, x1)
    cliques = find_cliques(fused, x1)
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        smooth(fused, x1, cliques)
        walls.append(time.perf_counter() - t)
    state = fused.state_dict()
    parts = {"features": 0.0, "distances": 0.0, "solver": 0.0}
    ops = 0
    for c in cliques:
        if c.fixed or c.size < 3:
            continue
        t = time.perf_counter()
        problems = clique_features(state, c)
        parts["features"] += time.perf_counter() - t
        for p in problems:
            ops += p.shape[0] * (p.shape[0] - 1) // 2 * p.shape[1]
            t = time.perf_counter()
            d = l1_distances(p)
            parts["distances"] += time.perf_counter() - t
            t = time.perf_counter()
            shortest_hamiltonian_path(d)
            parts["solver"] += time.perf_counter() - t
    return {"model": name, "walls_s": walls, "median_s": statistics.median(walls), "min_s": min(walls),
            "breakdown_s": parts, "abs_diff_terms": ops,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def machine() -> dict[str, Any]:
    import numba
    import numpy
    import timm
    import torch_pruning

    cpu = cpu_model()
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "torch_pruning": f"1.6.1 wheel (reports {torch_pruning.__version__})",
            "numba": numba.__version__, "numpy": numpy.__version__}


def fmt_num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}{unit}"
    return f"{v:.0f}{unit}"


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Coverage: fuse -> cliques -> smooth -> resize on many architectures",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores visible, torch/numba "
        f"{meta['machine']['torch_threads']}/{meta['machine']['numba_threads']} threads, load average at "
        f"start {meta['machine']['load_average_at_start']} (the machine is shared: times are upper bounds)  ",
        f"Versions: python {meta['machine']['python']}, torch {meta['machine']['torch']}, "
        f"timm {meta['machine']['timm']}, torch-pruning {meta['machine']['torch_pruning']}, "
        f"numba {meta['machine']['numba']}, numpy {meta['machine']['numpy']}",
        "",
        "Random init with random BatchNorm statistics. *max diff*: largest |output difference| of the fused "
        "+ smoothed model relative to the largest |output| (eval, batch 2). *TV*: mean absolute difference "
        "between adjacent channels over resizable cliques. *smooth*: `smooth()` time (distances + solver, "
        "numba already compiled). *cliques*: `find_cliques()` time including its validation. "
        "MACs and params at the native input size, full / half width.",
        "",
        "| model | input | cliques (resizable / all) | resizable channels | fixed (why) | BN fused / left | "
        "max diff | fuse s | cliques s | smooth s | TV before -> after | resize(0.5) runs | params full / half "
        "| MACs full / half |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        if "cliques" not in r:
            lines.append(f"| {r['model']} | {'x'.join(map(str, r['input'][1:]))} | **failed** | | | | | | | | | "
                         f"no | | {r.get('error', '')} |")
            continue
        fixed = ", ".join(f"{k} x{v}" for k, v in r["fixed"].items()) or "none"
        tv = f"{r['tv_before']:.4g} -> {r['tv_after']:.4g}" if "tv_after" in r else "-"
        diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "-"
        ok = "yes" if r.get("resize_ok") else f"**no**: {r.get('error', '')}"
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input'][1:]))} | {r['resizable']} / {r['cliques']} | "
            f"{r['resizable_channels']} | {fixed} | {r.get('bn_fused', 0)} / {r.get('bn_unfused', 0)} | {diff} | "
            f"{r.get('fuse_s', 0):.2f} | {r.get('cliques_s', 0):.2f} | {r.get('smooth_s', float('nan')):.2f} | "
            f"{tv} | {ok} | {fmt_num(r.get('params_full'))} / {fmt_num(r.get('params_half'))} | "
            f"{fmt_num(r.get('macs_full'))} / {fmt_num(r.get('macs_half'))} |")
    timing = meta.get("smoothing_timing")
    if timing:
        b = timing["breakdown_s"]
        lines += ["", f"## Smoothing time, {timing['model']}", "",
                  f"`smooth()` wall time over {len(timing['walls_s'])} runs: median {timing['median_s']:.2f} s, "
                  f"min {timing['min_s']:.2f} s (runs: {', '.join(f'{w:.2f}' for w in timing['walls_s'])}); "
                  f"load average after: {timing['load_average']}. One pass split up: features "
                  f"{b['features']:.2f} s, L1 distances {b['distances']:.2f} s "
                  f"({timing['abs_diff_terms'] / 1e9:.1f} G absolute differences), solver {b['solver']:.2f} s; "
                  "the rest is applying the permutation to a copy of the model."]
    lines += ["", "## Fixed cliques", ""]
    for r in records:
        for d in r.get("fixed_detail", []):
            lines.append(f"- {r['model']}: clique {d}")
    failures = [r for r in records if "error" in r]
    lines += ["", "## Failures", ""] + ([f"- {r['model']}: {r['error']}" for r in failures] or ["none"])
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    import numba

    torch.set_num_threads(2)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    names = argv or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown models {unknown}; choose from {list(MODELS)}", file=sys.stderr)
        return 2
    # warm the numba kernels so that smoothing times exclude compilation
    import numpy as np

    from morphkit.smooth import l1_distances
    from morphkit.solver import shortest_hamiltonian_path

    d = l1_distances(np.random.default_rng(0).standard_normal((40, 8)))
    shortest_hamiltonian_path(d)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/coverage.py", *argv]),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine()}
    records = []
    for name in names:
        t = time.perf_counter()
        rec = run_one(name)
        rec["total_s"] = time.perf_counter() - t
        records.append(rec)
        print(f"{name}: {rec.get('resizable', '?')}/{rec.get('cliques', '?')} resizable, "
              f"diff {rec.get('max_rel_diff', float('nan')):.1e}, smooth {rec.get('smooth_s', float('nan')):.2f}s, "
              f"resize {'ok' if rec.get('resize_ok') else 'FAILED'}"
              + (f", error: {rec['error']}" if "error" in rec else ""), flush=True)
    if "timm:resnet50" in names:
        meta["smoothing_timing"] = smoothing_timing()
        print(f"resnet50 smoothing: median {meta['smoothing_timing']['median_s']:.2f}s "
              f"{meta['smoothing_timing']['breakdown_s']}", flush=True)
    stem = "coverage" if not argv else "coverage-subset"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({**meta, "results": records}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(records, meta))
    print(f"wrote {RESULTS / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
