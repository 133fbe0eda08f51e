"""Never-trained widths: asked of the INR (``unseen="inr"``) against folded from trained ones (``"fold"``).

Loads the manifolds the other benchmarks committed (``benchmarks/results/manifolds/``)
and evaluates both ways of building every width below the trained range on the
full test split, K = 50 samples. Nothing is trained, so it takes minutes.
Writes ``benchmarks/results/unseen_fold.{json,md}``.

    python benchmarks/unseen_fold.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import DATA, RESULTS, machine, write

import morphkit as mk
from morphkit.data import load_data, make_loaders
from morphkit.manifold import FOLD_SOURCES

#: manifold file stem -> (data spec, written by)
MANIFOLDS = {
    "mnist_lenet": ("mnist", "python benchmarks/mnist_lenet.py --threads 2 --epochs 24"),
    "mnist_lenet_jitter": ("mnist", "python benchmarks/mnist_lenet.py --threads 1 --epochs 48 --base-jitter 1.25 "
                                    "--name mnist_lenet_jitter"),
    "cifar10_resnet20": ("cifar10", "python benchmarks/cifar10_resnet20.py --threads 1 "
                                    "--baselines-from benchmarks/results/cifar10_resnet20.json"),
    "cifar10_resnet20_jitter": ("cifar10", "python benchmarks/cifar10_resnet20.py --threads 1 --baselines-from "
                                           "benchmarks/results/cifar10_resnet20.json --base-jitter 0.25 "
                                           "--name cifar10_resnet20_jitter"),
}
COMPRESSIONS = (0.625, 0.75, 0.875)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tests = {"mnist": make_loaders(load_data(f"mnist:{DATA / 'mnist'}"), batch_size=256, test_batch_size=1000)[1],
             "cifar10": make_loaders(load_data(f"cifar10:{DATA / 'cifar10-jpeg.tar.gz'}"), batch_size=256,
                                     test_batch_size=500)[1]}
    rows = []
    for stem, (data, command) in MANIFOLDS.items():
        m = mk.Manifold.load(RESULTS / "manifolds" / f"{stem}.safetensors")
        for g in COMPRESSIONS:
            if not m.fold_sources(m.width_map(1 - g)):
                continue  # inside the trained range: both ways are the same
            row = {"manifold": stem, "written_by": command, "base_jitter": m.config.train.base_jitter,
                   "trained": list(m.config.train.compression), "compression": g}
            for unseen in ("inr", "fold"):
                t0 = time.perf_counter()
                net = m.sample(1 - g, samples=args.samples, unseen=unseen)
                row[f"{unseen}_seconds"] = round(time.perf_counter() - t0, 2)
                row[unseen] = mk.evaluate(net, tests[data])["accuracy"]
            rows.append(row)
            print(row, flush=True)
    result = {"machine": machine(), "samples": args.samples, "rows": rows}
    md = ["# unseen_fold: never-trained widths, asked of the INR or folded from trained widths", "",
          f"Command: `{result['machine']['command']}`  ",
          f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; torch "
          f"{result['machine']['torch']}; {result['machine']['date']}  ",
          f"K = {args.samples} samples, full test split. *inr*: `sample(w, unseen=\"inr\")` (the default); *fold*: "
          f"`sample(w, unseen=\"fold\")`, {FOLD_SOURCES} trained widths merged down with the base's box filter and "
          "averaged.",
          "", "| manifold | base jitter | trained compression | compression | inr | fold | fold - inr | "
          "sample s (inr / fold) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['manifold']} | {r['base_jitter']} | {r['trained'][0]:g}-{r['trained'][1]:g} | "
                  f"{100 * r['compression']:.1f}% | {100 * r['inr']:.2f}% | {100 * r['fold']:.2f}% | "
                  f"{100 * (r['fold'] - r['inr']):+.2f} | {r['inr_seconds']} / {r['fold_seconds']} |")
    md += ["", "Manifolds as written by: " + "; ".join(f"`{s}`: `{c}`" for s, (_, c) in MANIFOLDS.items()) + "."]
    write("unseen_fold", result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
