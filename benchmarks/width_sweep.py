"""Width sweep: a manifold's accuracy at every uniform width, not only the ones a benchmark names.

The headline benchmarks evaluate 0 / 25 / 50 / 75% compression. A user asks
for whatever width the device affords (70%, 62%, ...), and a manifold that is
good only at the widths training drew most often (the sandwich's narrowest)
hides a dip between them. This evaluates ``manifold.sample(1 - g)`` on a grid
of compressions ``g`` (default every 2.5% from 0 to the trained maximum and
beyond it to 87.5%), with the parameter count of each, and reports the worst
width inside the trained range against the narrowest one.
Writes ``benchmarks/results/width_sweep_NAME.{json,md}``.

    python benchmarks/width_sweep.py --manifold benchmarks/results/manifolds/cifar10_resnet20_v7.safetensors \\
        --data cifar10 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import DATA, machine, write

import morphkit as mk
from morphkit.data import load_data, make_loaders

SPECS = {"cifar10": f"cifar10:{DATA / 'cifar10-jpeg.tar.gz'}", "mnist": f"mnist:{DATA / 'mnist'}"}


def grid(high: float, step: float, beyond: float) -> list[float]:
    """Compressions from 0 to ``beyond`` every ``step``, with the trained maximum ``high`` included."""
    out = [round(i * step, 6) for i in range(int(beyond / step + 1e-9) + 1)]
    return sorted(set(out) | {round(high, 6)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifold", required=True)
    ap.add_argument("--data", choices=sorted(SPECS), required=True)
    ap.add_argument("--step", type=float, default=0.025, help="grid step in compression")
    ap.add_argument("--beyond", type=float, default=0.875, help="largest compression evaluated")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--test-limit", type=int, default=None, help="first N test images (default: all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="result name (default: width_sweep_<manifold stem>)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or "width_sweep_" + Path(args.manifold).name.split(".")[0]
    manifold = mk.Manifold.load(args.manifold)
    splits = load_data(SPECS[args.data])
    _, test = make_loaders(splits, batch_size=128, seed=args.seed, test_batch_size=500, test_limit=args.test_limit)
    lo, hi = (float(v) for v in manifold.config.train.compression)
    t0 = time.perf_counter()
    rows = []
    for g in grid(hi, args.step, args.beyond):
        net = manifold.sample(1 - g, samples=args.samples, seed=args.seed)
        acc = mk.evaluate(net, test)["accuracy"]
        rows.append({"compression": g, "params": sum(p.numel() for p in net.parameters()), "accuracy": acc,
                     "trained": lo - 1e-9 <= g <= hi + 1e-9})
        print(f"compression {g:.3f}: {100 * acc:.2f}% ({rows[-1]['params']:,} params)", flush=True)
    seconds = time.perf_counter() - t0
    inside = [r for r in rows if r["trained"]]
    narrowest = next(r for r in rows if abs(r["compression"] - hi) < 1e-6)
    worst = min(inside, key=lambda r: r["accuracy"])
    m = machine()
    result = {"machine": m, "manifold": args.manifold, "trained_compression": [lo, hi], "samples": args.samples,
              "test_images": args.test_limit, "seconds": round(seconds, 1), "rows": rows,
              "worst_trained": worst, "narrowest_trained": narrowest}
    md = [f"# {name}: accuracy at every uniform width", "",
          f"Command: `{m['command']}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}; "
          f"{m['date']}  ",
          f"Manifold: `{args.manifold}` (trained on compression U[{lo:g}, {hi:g}]); K = {args.samples}; "
          f"{'all' if args.test_limit is None else f'the first {args.test_limit:,}'} test images; {seconds:.0f} s.",
          "", f"Worst width inside the trained range: compression {100 * worst['compression']:g}% at "
          f"{100 * worst['accuracy']:.2f}%, against {100 * narrowest['accuracy']:.2f}% at the narrowest trained "
          f"width ({100 * hi:g}%, {narrowest['params']:,} params).", "",
          "| compression | params | accuracy | trained |", "| --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {100 * r['compression']:g}% | {r['params']:,} | {100 * r['accuracy']:.2f}% | "
                  f"{'yes' if r['trained'] else 'no'} |")
    write(name, result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
