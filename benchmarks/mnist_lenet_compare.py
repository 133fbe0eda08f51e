"""LeNet-5 on MNIST: NeuMeta against pruning, individual and slimmable training at equal sizes.

Loads (or trains) the base LeNet-5 and a manifold (``--manifold FILE``, or
morphs one), then runs :func:`morphkit.compare` at compression 0 / 25 / 50 /
75% (75% outside the manifold's training range): NeuMeta; L1, L2, Taylor,
Hessian and random pruning without and with ``--finetune-epochs`` of
fine-tuning; the individually trained oracle and the slimmable network, both
with the base model's recipe (or ``--train-epochs``). Asserts that every
model of one compression has the same parameter count. Writes
``benchmarks/results/mnist_lenet_compare.{json,md,png}``.

    python benchmarks/mnist_lenet_compare.py --manifold lenet.morph.safetensors
    python benchmarks/mnist_lenet_compare.py --manifold benchmarks/results/manifolds/mnist_lenet.safetensors \
        --baselines-from benchmarks/results/mnist_lenet_compare.json   # NeuMeta only, baselines reused
    python benchmarks/mnist_lenet_compare.py --data embedded --limit 512 --epochs 1 --train-epochs 1 \\
        --name smoke_compare          # a quick smoke run (not a result)
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import DATA, RESULTS, data_name, machine, reused_baselines

import morphkit as mk
from morphkit.compare import write_report
from morphkit.data import load_data, make_loaders

COMPRESSIONS = (0.0, 0.25, 0.5, 0.75)
PRUNING = ("l1", "l2", "taylor", "hessian", "random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"mnist:{DATA / 'mnist'}", help="data spec (default: the real MNIST)")
    ap.add_argument("--manifold", default=None, help="a manifold file of this base (default: morph one)")
    ap.add_argument("--epochs", type=int, default=8, help="morph epochs when no --manifold is given")
    ap.add_argument("--base-epochs", type=int, default=10)
    ap.add_argument("--train-epochs", type=int, default=None, help="individual / slimmable epochs (default: recipe)")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None, help="first N training images (smoke runs)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="mnist_lenet_compare")
    ap.add_argument("--unseen", choices=("inr", "fold"), default="inr",
                    help="how NeuMeta builds widths below its trained range (Manifold.sample(unseen=))")
    ap.add_argument("--baselines-from", default=None, metavar="JSON",
                    help="reuse every non-NeuMeta row of this earlier result (same data, seed, schedules)")
    args = ap.parse_args()
    x = torch.zeros(1, 1, 28, 28)
    splits = load_data(args.data)
    train, test = make_loaders(splits, batch_size=128, seed=args.seed, test_batch_size=1000, limit=args.limit,
                               test_limit=args.test_limit)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    base_file = RESULTS / "base" / "lenet5-mnist.safetensors"
    if base_file.is_file() and args.limit is None and args.data.startswith("mnist:"):
        base = mk.load_model(base_file)
    else:
        base, _ = mk.fit(mk.build_model("lenet5"), train, epochs=args.base_epochs, optimizer="adam", lr=2e-3,
                         weight_decay=1e-4, seed=args.seed)
    times["base"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.manifold:
        manifold = mk.Manifold.load(args.manifold)
    else:
        cfg = mk.MorphConfig(train=mk.TrainConfig(epochs=args.epochs, seed=args.seed), samples=args.samples)
        manifold = mk.morph(base, train, example_inputs=x, config=cfg)
    times["morph"] = time.perf_counter() - t0
    rows, reused = [], None
    plan = ((("neumeta", *PRUNING, "individual", "slimmable"), 0), (PRUNING, args.finetune_epochs))
    if args.baselines_from:
        if args.limit is not None or args.test_limit is not None:
            raise SystemExit("--baselines-from reuses full runs; drop --limit and --test-limit")
        reused, rows = reused_baselines(args.baselines_from, {
            "seed": args.seed, "data": lambda d: data_name(d) == data_name(args.data),
            "fine-tuning": f"{args.finetune_epochs} epoch(s), lr = recipe lr / 10",
            "individual / slimmable epochs": args.train_epochs or "recipe (10)"})
        plan = ((("neumeta",), 0),)
    for methods, ft in plan:
        if ft == 0 or args.finetune_epochs > 0:
            t0 = time.perf_counter()
            rows += mk.compare(manifold, test, methods, COMPRESSIONS, base=base, finetune_epochs=ft,
                               samples=args.samples, seed=args.seed, train_data=train,
                               train_epochs=args.train_epochs, unseen=args.unseen)
            times[f"compare (fine-tune {ft})"] = time.perf_counter() - t0
    rows = [r for r in rows if r["method"] == "neumeta"] + [r for r in rows if r["method"] != "neumeta"]
    if reused is not None:  # reused rows were flagged against the earlier manifold's training range
        lo, hi = manifold.config.train.compression
        rows = [{**r, "trained": lo - 1e-9 <= r["compression"] <= hi + 1e-9} for r in rows]
    for g in COMPRESSIONS:
        params = {r["params"] for r in rows if r["compression"] == g}
        assert len(params) == 1, f"compression {g}: parameter counts differ: {params}"
    for label in dict.fromkeys(r["label"] for r in rows):
        seconds = sum(r["seconds"] for r in rows if r["label"] == label)
        times[f"models: {label}"] = seconds
    m = machine()
    meta = {"command": f"`{m['command']}`", "seed": args.seed, "data": args.data,
            "machine": f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, python {m['python']}, {m['date']}",
            "base accuracy": f"{100 * mk.evaluate(base, test)['accuracy']:.2f}%",
            "manifold": args.manifold or f"morphed here, {args.epochs} epochs",
            "samples (K)": args.samples, "unseen widths": args.unseen,
            "fine-tuning": f"{args.finetune_epochs} epoch(s), lr = recipe lr / 10",
            "individual / slimmable epochs": args.train_epochs or "recipe (10)",
            "wall times (s)": ", ".join(f"{k} {v:.0f}" for k, v in times.items())}
    if reused is not None:
        meta["baselines"] = (f"every row but NeuMeta's reused from {args.baselines_from} "
                             f"(measured {reused['baselines_measured']})")
    write_report(rows, RESULTS, title=f"{args.name}: LeNet-5 / MNIST, NeuMeta vs baselines", meta=meta,
                 stem=args.name, plot=args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
