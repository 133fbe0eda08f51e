"""Budget-targeted widths: the searched per-clique width map against the uniform width at the same parameter count.

For each committed manifold (``benchmarks/results/manifolds/``) and each budget (the
parameter count of the uniform model at 50% and 75% compression), ``mk.search``
scores width maps on held-out images and picks the best; both models are then
evaluated on images the search never saw, with the manifold's default K = 50
samples. By default (``--search-split test``) the search takes the first
``--search-images`` images of the *test* split and the accuracies are on the rest of
it: the manifold was trained on every training image, and a map that fits those
better is not better on new data (LeNet-5 at 50%: +0.39 points on training images,
-0.10 on the test split). ``--search-split train`` searches on training images and
reports the full test split. Two search modes: widths within the trained
range only (the default; at the 50% budget of a manifold trained on 0-50% only the
uniform map fits), and ``allow_untrained=True`` (cliques may go below it).
Writes ``benchmarks/results/search.{json,md}``.

    python benchmarks/search.py --threads 2                        # LeNet-5 manifolds
    python benchmarks/search.py --threads 2 --manifolds cifar10_resnet20
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from _common import DATA, RESULTS, machine, write

import morphkit as mk
from morphkit.data import load_data, make_loaders

#: manifold file stem -> data kind
MANIFOLDS = {"mnist_lenet": "mnist", "mnist_lenet_jitter": "mnist", "cifar10_resnet20": "cifar10"}
DATA_PATHS = {"mnist": DATA / "mnist", "cifar10": DATA / "cifar10-jpeg.tar.gz"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifolds", default="mnist_lenet,mnist_lenet_jitter")
    ap.add_argument("--compressions", default="0.5,0.75", help="budgets: the uniform model's params at these")
    ap.add_argument("--candidates", type=int, default=48)
    ap.add_argument("--search-images", type=int, default=2048)
    ap.add_argument("--search-split", default="test", choices=("test", "train"),
                    help="where the search images come from (test: the first --search-images test images, "
                         "accuracies on the rest)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="search")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for stem in args.manifolds.split(","):
        kind = MANIFOLDS.get(stem) or next((k for k in ("mnist", "cifar10") if stem.startswith(k)), None)
        if kind is None:
            raise SystemExit(f"{stem}: which data? expected a name starting with mnist or cifar10")
        path = RESULTS / "manifolds" / f"{stem}.safetensors"
        m = mk.Manifold.load(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        trained = list(m.config.train.compression)
        splits = load_data(f"{kind}:{DATA_PATHS[kind]}")
        search_dl, _ = make_loaders(splits, batch_size=256, augment=False, seed=1)
        _, test_dl = make_loaders(splits, batch_size=1000, augment=False)
        held = []
        if args.search_split == "train":
            for b in search_dl:
                held.append(b)
                if 256 * len(held) >= args.search_images:
                    break
        else:  # the first search_images test images search, the rest report
            xs, ys = zip(*test_dl)
            x, y = torch.cat(xs), torch.cat(ys)
            n = args.search_images
            held = [(x[i:i + 256], y[i:i + 256]) for i in range(0, n, 256)]
            test_dl = [(x[i:i + 1000], y[i:i + 1000]) for i in range(n, len(x), 1000)]
        for g in (float(v) for v in args.compressions.split(",")):
            uniform = m.sample(1 - g)
            budget = mk.count_params(uniform)
            uniform_acc = mk.evaluate(uniform, test_dl)["accuracy"]
            for mode in (None, True):
                t0 = time.perf_counter()
                r = m.search(held, params=budget, candidates=args.candidates, batches=len(held), allow_untrained=mode)
                seconds = time.perf_counter() - t0
                acc = mk.evaluate(m.sample(r.widths), test_dl)["accuracy"]
                rows.append({"manifold": stem, "manifold_sha256": digest, "trained_compression": trained,
                             "compression": g, "budget_params": budget,
                             "mode": "trained widths" if mode is None else "untrained allowed",
                             "uniform_test": uniform_acc, "searched_test": acc, "searched_params": r.params,
                             "search_split": args.search_split,
                             "test_images": sum(int(b[1].shape[0]) for b in test_dl),
                             "search_value": r.value, "uniform_search_value": r.uniform["value"],
                             "evaluated": r.evaluated, "seconds": round(seconds, 1),
                             "widths": {str(k): v for k, v in r.widths.items()},
                             "uniform_widths": {str(k): v for k, v in r.uniform["widths"].items()}})
                print(f"{stem} @ {g:.0%} ({budget:,} params, {rows[-1]['mode']}): uniform {100 * uniform_acc:.2f}% "
                      f"searched {100 * acc:.2f}% ({r.evaluated} maps, {seconds:.0f} s) {r.widths}", flush=True)
    md = ["# Budget-targeted width search", "",
          "Searched per-clique width map against the uniform width at the same parameter count (the uniform "
          "model's at each compression). The search scores width maps on "
          + (f"{args.search_images} training-split images (K = 4 samples each); the test accuracy below is on the "
             "full test split, never seen by the search, with K = 50." if args.search_split == "train" else
             f"the first {args.search_images} test-split images (K = 4 samples each); the test accuracy below is on "
             "the rest of the test split, never seen by the search, with K = 50."), "",
          f"Machine: {machine()['cpu']}, torch threads {torch.get_num_threads()}. "
          f"Command: `{machine()['command']}`",
          "", "| manifold (trained compression) | compression | budget (params) | search mode | uniform test % | "
          "searched test % | "
          "searched params | maps scored | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['manifold']} ({r['trained_compression'][0]:g}-{r['trained_compression'][1]:g}, sha256 "
                  f"{r['manifold_sha256']}) | {r['compression']:.0%} | {r['budget_params']:,} | {r['mode']} | "
                  f"{100 * r['uniform_test']:.2f} | {100 * r['searched_test']:.2f} | {r['searched_params']:,} | "
                  f"{r['evaluated']} | {r['seconds']} |")
    md += ["", "'trained widths' keeps every clique at or above the narrowest width the manifold trained, unless the "
           "budget is below the smallest such model (mnist_lenet at 87.5%): then it also tries narrower widths, "
           "as 'untrained allowed' always does. The searched map replaces the uniform one only when it also wins "
           "on the half of the search images that ranked nothing, sampled with K = 50; otherwise the uniform map "
           "is kept (equal rows).", "", "Widths per clique (searched / uniform):", ""]
    for r in rows:
        md.append(f"- {r['manifold']} {r['compression']:.0%} {r['mode']}: {r['widths']} / {r['uniform_widths']}")
    write(args.name, {"machine": machine(), "args": vars(args), "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
