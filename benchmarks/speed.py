"""Speed: a morph() step against a plain training step, sampling, smoothing and clique discovery.

Everything side by side in one run, on random weights and data (speed does
not depend on them):

* **Step ratio.** The wall time of one ``morph()`` step (``info["median_step_seconds"]``:
  the median over its steps of each step's wall time, from drawing the width
  maps to the EMA update; set-up, evaluation and checkpoints are outside it)
  against one plain training step (forward, cross-entropy, backward, Adam) of
  the full-width network on the same batch. The default ``MorphConfig`` trains
  two width maps per step (the sandwich: the narrowest and a drawn one, each
  clique moved by the clique spread, so nearly every step meets a new width
  map and pays for its template and coordinate table: those are in the
  median). On a shared machine a step's wall time drifts, so the two are
  measured in ``--rounds`` interleaved rounds (plain, morph, plain) and the
  table reports the median over rounds of each round's ratio.
* **Peak memory** of each, in a fresh interpreter: the peak resident set
  size (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model and
  data are ready) of 3 steps above the resident size at that point (plain: after one warm-up step; morph: including
  ``morph()``'s set-up: fusing, smoothing, building the INR).
* ``Manifold.sample(w, samples=K)`` at full and half width.
* ``smooth()`` and ``find_cliques()`` (with its validation passes) per model,
  and ``morphkit --help`` in a fresh interpreter.

Writes ``benchmarks/results/{name}.{json,md}``.

    python benchmarks/speed.py --threads 2
    python benchmarks/speed.py --models lenet5,resnet20 --name speed_small
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import machine, write

import morphkit as mk

# name: (spec, input size, batch, morph steps per round, timing rounds)
MODELS = {
    "lenet5": ("lenet5", (1, 28, 28), 128, 60, 3),
    "resnet20": ("resnet20", (3, 32, 32), 128, 30, 3),
    "resnet18@64": ("timm:resnet18?num_classes=10", (3, 64, 64), 32, 20, 2),
    "resnet18@224": ("timm:resnet18?num_classes=10", (3, 224, 224), 16, 8, 2),
    "mobilenetv3_small_100@64": ("timm:mobilenetv3_small_100?num_classes=10", (3, 64, 64), 32, 20, 2),
    "mnasnet0_5@64": ("tv:mnasnet0_5", (3, 64, 64), 32, 20, 2),
    "vit_tiny@224": ("timm:vit_tiny_patch16_224?num_classes=10", (3, 224, 224), 16, 8, 2),
}
# models timed for smooth() and find_cliques() only
STRUCTURE_ONLY = {
    "alexnet": ("tv:alexnet", (3, 224, 224)),
    "vgg11_bn": ("tv:vgg11_bn", (3, 224, 224)),
    "swin_t": ("tv:swin_t", (3, 224, 224)),
    "resnest14d": ("timm:resnest14d", (3, 224, 224)),
}
CLASSES = 10


def build(spec: str) -> torch.nn.Module:
    """A morphkit spec, or ``tv:NAME`` for a torchvision classifier (10 classes where it takes them)."""
    if spec.startswith("tv:"):
        import torchvision

        fn = getattr(torchvision.models, spec[3:])
        try:
            return fn(num_classes=CLASSES)
        except TypeError:  # pragma: no cover - every torchvision classifier takes num_classes
            return fn()
    return mk.build_model(spec)


def _rss_mb() -> float:
    """This process's resident set size now (MB)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(kind: str, name: str, steps: int) -> None:
    """In a fresh interpreter: peak resident memory of plain or morph steps above the ready state (prints MB)."""
    spec, shape, batch, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = build(spec).eval()
    data = _data(shape, batch, 2)
    x = torch.zeros(1, *shape)
    cfg = mk.MorphConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    # load kernels and libraries (torch-pruning, numba, ...) first, then measure from here
    plain_step_seconds(build(spec), data, 1)
    if kind == "morph":
        mk.morph(model, data, example_inputs=x, progress=False, device="cpu", config=cfg)
    ready = _rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
    if kind == "plain":
        plain_step_seconds(build(spec), data, steps)
    else:
        mk.morph(model, data, example_inputs=x, progress=False, device="cpu", config=cfg)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024  # kB
    print(f"PEAK_MB {peak - ready:.1f}")


def peak_mb(kind: str, name: str, threads: int, steps: int = 3) -> float:
    """:func:`memory_child` in a subprocess."""
    import os

    # glibc returns freed blocks above 64 KB to the system at once, so memory freed by the warm-up
    # is not silently reused (the peak then counts what the steps need, not what the warm-up left)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--models", name,
                          "--threads", str(threads), "--steps", str(steps)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return float(next(line for line in out.splitlines() if line.startswith("PEAK_MB")).split()[1])


def _data(shape: tuple[int, ...], batch: int, n: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
            for _ in range(n)]


def plain_step_seconds(model: torch.nn.Module, data: list, repeats: int) -> float:
    """Median wall time of one training step of ``model`` (forward, CE, backward, Adam)."""
    model = model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 2):
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_rounds(spec: str, model: torch.nn.Module, data: list, x: torch.Tensor, cfg: mk.MorphConfig,
                steps: int, rounds: int, repeats: int) -> tuple[list[dict], mk.Manifold]:
    """Interleaved rounds of plain-step and morph-step timings (see the module doc)."""
    c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    mk.morph(model, data, example_inputs=x, config=c, progress=False, device="cpu")  # warm-up (JIT, caches)
    out = []
    for _ in range(rounds):
        before = plain_step_seconds(build(spec), data, repeats)
        manifold = mk.morph(model, data, example_inputs=x, config=c, progress=False, device="cpu")
        after = plain_step_seconds(build(spec), data, repeats)
        p, m = (before + after) / 2, manifold.info["median_step_seconds"]
        out.append({"plain_step_s": p, "morph_step_s": m, "morph_mean_step_s": manifold.info["train_seconds"] / steps,
                    "step_ratio": m / p})
    return out, manifold


def structure_times(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Seconds of ``find_cliques`` (validated) and of ``smooth`` on its cliques."""
    t0 = time.perf_counter()
    cliques = mk.find_cliques(model, x)
    t1 = time.perf_counter()
    mk.smooth(model, x, cliques)
    t2 = time.perf_counter()
    return {"find_cliques_s": t1 - t0, "smooth_s": t2 - t1, "cliques": len(cliques),
            "resizable": sum(not c.fixed for c in cliques)}


def help_seconds() -> float:
    """Wall time of ``morphkit --help`` in a fresh interpreter (median of 3)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "morphkit", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    ap.add_argument("--structure", default=",".join(STRUCTURE_ONLY),
                    help="models timed for smooth/find_cliques only ('' for none)")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--widths", default="1.0,0.5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="plain steps per timing (median reported)")
    ap.add_argument("--name", default="speed")
    ap.add_argument("--memory-child", choices=("plain", "morph"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.models, args.steps)
        return
    cfg = mk.MorphConfig(samples=args.samples)
    widths = [float(w) for w in args.widths.split(",")]
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        spec, shape, batch, steps, rounds = MODELS[name]
        torch.manual_seed(0)
        model = build(spec).eval()
        x = torch.zeros(1, *shape)
        row: dict = {"model": name, "spec": spec, "input": list(shape), "batch": batch,
                     "params": sum(p.numel() for p in model.parameters())}
        row.update(structure_times(model, x))
        data = _data(shape, batch, 2)
        row["rounds"], manifold = step_rounds(spec, model, data, x, cfg, steps, rounds, args.repeats)
        for key in row["rounds"][0]:
            row[key] = statistics.median(r[key] for r in row["rounds"])
        row["plain_peak_mb"] = peak_mb("plain", name, args.threads, steps=3)
        row["morph_peak_mb"] = peak_mb("morph", name, args.threads, steps=3)
        row["memory_ratio"] = row["morph_peak_mb"] / max(row["plain_peak_mb"], 1e-9)
        row["inr_params"] = sum(p.numel() for p in manifold.inr.parameters())
        row["rows_full_width"] = manifold.builder.table(manifold.builder.full()).rows
        for w in widths:
            manifold.sample(w, samples=2)  # warm the template and coordinate caches
            t0 = time.perf_counter()
            manifold.sample(w, samples=args.samples)
            row[f"sample_{w:g}_s"] = time.perf_counter() - t0
        rows.append(row)
        print({k: v for k, v in row.items() if k != "rounds"}, flush=True)
    structure = []
    for name in [m for m in args.structure.split(",") if m]:
        spec, shape = STRUCTURE_ONLY[name]
        torch.manual_seed(0)
        r = {"model": name, "spec": spec, **structure_times(build(spec).eval(), torch.zeros(1, *shape))}
        structure.append(r)
        print(r, flush=True)
    result = {"machine": machine(), "samples": args.samples, "rows": rows, "structure": structure,
              "help_s": help_seconds(), "inr": dataclasses.asdict(cfg.inr)}
    m = result["machine"]
    md = [f"# {args.name}: morph step against a plain step, sampling, smoothing, clique discovery", "",
          f"Command: `{m['command']}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores, {args.threads} torch threads; torch {m['torch']}; "
          f"{m['date']}  ",
          f"Default MorphConfig (INR {cfg.inr.hidden}x{cfg.inr.layers}, factor rank {cfg.inr.factor_rank}, "
          f"factored above {cfg.inr.factor_above} channel pairs; two width maps per step). Step times: "
          "medians over interleaved rounds (plain, morph, plain) of each round's median step; peak memory: "
          "3 steps in a fresh interpreter after a warm-up, peak resident set above the ready state (morph: "
          "including its set-up); sample(1) returns the stored base. "
          f"`morphkit --help`: {result['help_s']:.2f} s.", "",
          "| model | input, batch | params | INR params | rows (full) | plain step ms | morph step ms | "
          "ratio | plain peak MB | morph peak MB | memory ratio | "
          + " | ".join(f"sample({w:g}) s" for w in widths) + " | find_cliques s | smooth s |",
          "| --- " * (13 + len(widths)) + "|"]
    for r in rows:
        md.append(f"| {r['model']} | {'x'.join(map(str, r['input'][1:]))}, {r['batch']} | {r['params']:,} | "
                  f"{r['inr_params']:,} | {r['rows_full_width']:,} | {1e3 * r['plain_step_s']:.0f} | "
                  f"{1e3 * r['morph_step_s']:.0f} | {r['step_ratio']:.2f}x | {r['plain_peak_mb']:.0f} | "
                  f"{r['morph_peak_mb']:.0f} | {r['memory_ratio']:.2f}x | "
                  + " | ".join(f"{r[f'sample_{w:g}_s']:.2f}" for w in widths)
                  + f" | {r['find_cliques_s']:.1f} | {r['smooth_s']:.1f} |")
    md += ["", "Step ratio of each round: " + "; ".join(
        r["model"] + " " + ", ".join(f"{x['step_ratio']:.2f}x" for x in r["rounds"]) for r in rows) + "."]
    if structure:
        md += ["", "| model | cliques (resizable) | find_cliques s | smooth s |", "| --- | --- | --- | --- |"]
        md += [f"| {r['model']} | {r['cliques']} ({r['resizable']}) | {r['find_cliques_s']:.1f} | "
               f"{r['smooth_s']:.1f} |" for r in structure]
    write(args.name, result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
