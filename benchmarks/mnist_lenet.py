"""LeNet-5 on MNIST: base model, whole-network manifold, accuracy at eight compressions.

Trains (or loads) the base LeNet-5, morphs every resizable clique, and evaluates
the sampled models at compression 0 ... 87.5% (with the default range, 87.5% is never trained),
with training wall time, the INR's size and the sample/export time, K = 50
against K = 1 sampling, unseen widths folded from trained ones (``unseen="fold"``)
against asked of the INR directly, and short-schedule ablations (no smoothing, no
coordinate noise, base jitter toggled, fixed base grids, the version-1 fixed bilinear base, one width per
step instead of the sandwich rule, no distillation, the paper's range U[0, 0.5]).
Writes ``benchmarks/results/mnist_lenet.{json,md}`` and the manifold to
``benchmarks/results/manifolds/``.

    python benchmarks/mnist_lenet.py --threads 1      # 24 epochs + ablations
    python benchmarks/mnist_lenet.py --threads 2 --seed 1 --name mnist_lenet_seed1
    python benchmarks/mnist_lenet.py --threads 2 --compression-range 0,0.5 --ablation-steps 0 \
        --name mnist_lenet_paper      # the paper's protocol: 75% never trained
    python benchmarks/mnist_lenet.py --threads 1 --epochs 48 --base-jitter 1.25 --name mnist_lenet_jitter
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from _common import DATA, RESULTS, machine, write

import morphkit as mk
from morphkit.data import load_data, make_loaders
from morphkit.manifold import FOLD_SOURCES

COMPRESSIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=24, help="morph epochs over the 60k training images")
    ap.add_argument("--base-epochs", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=mk.INRConfig().hidden)
    ap.add_argument("--layers", type=int, default=mk.INRConfig().layers)
    ap.add_argument("--noise", type=float, default=mk.TrainConfig().noise)
    ap.add_argument("--base-jitter", type=float, default=mk.TrainConfig().base_jitter,
                    help="TrainConfig.base_jitter (cells); mnist_lenet_jitter.md uses 1.25 with --epochs 48")
    ap.add_argument("--compression-range", default=None, metavar="LO,HI",
                    help="TrainConfig.compression (default: its default)")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--ablation-steps", type=int, default=400, help="steps of each ablation run (0: skip)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="mnist_lenet")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_data(f"mnist:{DATA / 'mnist'}")
    train, test = make_loaders(splits, batch_size=128, seed=args.seed, test_batch_size=1000)
    base_file = RESULTS / "base" / "lenet5-mnist.safetensors"
    t0 = time.perf_counter()
    if base_file.is_file():
        base = mk.load_model(base_file)
    else:
        base, _ = mk.fit(mk.build_model("lenet5"), train, epochs=args.base_epochs, optimizer="adam", lr=2e-3,
                         weight_decay=1e-4, seed=args.seed)
        base_file.parent.mkdir(parents=True, exist_ok=True)
        mk.save_model(base, base_file)
    base_seconds = time.perf_counter() - t0
    base_acc = mk.evaluate(base, test)["accuracy"]
    print(f"base LeNet-5: {100 * base_acc:.2f}%", flush=True)
    extra = {"compression": tuple(float(v) for v in args.compression_range.split(","))} \
        if args.compression_range else {}
    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=args.hidden, layers=args.layers),
                         train=mk.TrainConfig(epochs=args.epochs, seed=args.seed, noise=args.noise,
                                              base_jitter=args.base_jitter, **extra),
                         samples=args.samples)
    lo, hi = cfg.train.compression
    t0 = time.perf_counter()
    manifold = mk.morph(base, train, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg)
    morph_seconds = time.perf_counter() - t0
    rows = []
    for g in COMPRESSIONS:
        t1 = time.perf_counter()
        net = manifold.sample(1 - g, samples=args.samples, unseen="inr")
        sample_s = time.perf_counter() - t1
        acc = mk.evaluate(net, test)["accuracy"]
        acc_k1 = mk.evaluate(manifold.sample(1 - g, samples=1, unseen="inr"), test)["accuracy"]
        folds = manifold.fold_sources(manifold.width_map(1 - g))  # [] inside the trained range: nothing to fold
        acc_fold = mk.evaluate(manifold.sample(1 - g, samples=args.samples, unseen="fold"), test)["accuracy"] \
            if folds else None
        rows.append({"compression": g, "accuracy": acc, "accuracy_k1": acc_k1, "accuracy_fold": acc_fold,
                     "params": sum(p.numel() for p in net.parameters()),
                     "trained": g <= cfg.train.compression[1] + 1e-9, "sample_seconds": round(sample_s, 2)})
        print(rows[-1], flush=True)
    (RESULTS / "manifolds").mkdir(exist_ok=True)
    manifold.save(RESULTS / "manifolds" / f"{args.name}.safetensors")
    inr_params = sum(p.numel() for p in manifold.inr.parameters())
    mlp_params = sum(p.numel() for n, p in manifold.inr.named_parameters() if not n.startswith("grid"))
    ablations = []
    if args.ablation_steps:
        variants = {"reference (short schedule)": cfg,
                    "no smoothing": dataclasses.replace(cfg, smooth=dataclasses.replace(cfg.smooth, enabled=False)),
                    "no coordinate noise": dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, noise=0.0)),
                    ("no base jitter" if cfg.train.base_jitter else "base jitter 0.75"): dataclasses.replace(
                        cfg, train=dataclasses.replace(cfg.train, base_jitter=0.0 if cfg.train.base_jitter else 0.75)),
                    "fixed base grids": dataclasses.replace(cfg, inr=dataclasses.replace(cfg.inr, train_base=False)),
                    "fixed bilinear base (version 1)": dataclasses.replace(
                        cfg, inr=dataclasses.replace(cfg.inr, train_base=False, resample="bilinear")),
                    "one width per step (no sandwich)": dataclasses.replace(
                        cfg, train=dataclasses.replace(cfg.train, sandwich=False)),
                    ("no distillation" if cfg.train.distill else "distillation 1.0"): dataclasses.replace(
                        cfg, train=dataclasses.replace(cfg.train, distill=0.0 if cfg.train.distill else 1.0)),
                    "U[0, 0.5], one width per step, no distillation (version 3)": dataclasses.replace(
                        cfg, train=dataclasses.replace(cfg.train, compression=(0.0, 0.5), sandwich=False,
                                                       distill=0.0))}
        for label, c in variants.items():
            c = dataclasses.replace(c, train=dataclasses.replace(c.train, epochs=1, steps=args.ablation_steps))
            # a fresh loader per variant: the same data order whatever ran before (loaders count epochs)
            fresh, _ = make_loaders(splits, batch_size=128, seed=args.seed, test_batch_size=1000)
            t1 = time.perf_counter()
            m = mk.morph(base, fresh, example_inputs=torch.zeros(1, 1, 28, 28), config=c, progress=False)
            accs = {f"{g:g}": mk.evaluate(m.sample(1 - g, samples=args.samples), test)["accuracy"]
                    for g in (0.0, 0.25, 0.5, 0.75)}
            ablations.append({"variant": label, "steps": args.ablation_steps, "accuracy": accs,
                              "seconds": round(time.perf_counter() - t1, 1)})
            print(ablations[-1], flush=True)
    result = {"machine": machine(), "config": cfg.to_dict(), "base_accuracy": base_acc,
              "base_seconds": round(base_seconds, 1), "morph_seconds": round(morph_seconds, 1),
              "steps": manifold.info["steps"], "inr_params": inr_params, "mlp_params": mlp_params,
              "rows": rows, "ablations": ablations}
    md = [f"# {args.name}: LeNet-5 / MNIST, whole network morphed", "",
          f"Command: `{result['machine']['command']}`  ",
          f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; torch "
          f"{result['machine']['torch']}; {result['machine']['date']}  ",
          f"Base LeNet-5: **{100 * base_acc:.2f}%**. Manifold: INR {args.hidden}x{args.layers} "
          f"({inr_params:,} trained params: MLP {mlp_params:,}, base grids {inr_params - mlp_params:,}; base "
          f"resampling {cfg.inr.resample!r}), {manifold.info['steps']} steps ({args.epochs} epochs, compression "
          f"U[{lo:g}, {hi:g}], sandwich {cfg.train.sandwich}, distillation {cfg.train.distill}, coordinate noise "
          f"{args.noise}, base jitter {cfg.train.base_jitter}), "
          f"{morph_seconds / 60:.1f} min; K = {args.samples} samples.",
          "",
          f"| compression | accuracy (K = {args.samples}) | accuracy (K = 1) | folded (K = {args.samples}) | params "
          "| trained? | sample time (s) |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        fold = "-" if r["accuracy_fold"] is None else f"{100 * r['accuracy_fold']:.2f}%"
        md.append(f"| {100 * r['compression']:.1f}% | {100 * r['accuracy']:.2f}% | {100 * r['accuracy_k1']:.2f}% | "
                  f"{fold} | {r['params']:,} | {'yes' if r['trained'] else '**no**'} | {r['sample_seconds']} |")
    md += ["", "Accuracy columns ask the INR at each width (`sample(..., unseen=\"inr\")`, the default). "
           "*Folded*: a width below the trained range built with `unseen=\"fold\"`: predicted at "
           f"{FOLD_SOURCES} trained widths and merged down with the "
           "base's box filter, averaged (\"-\": inside the trained range, where both are the same)."]
    if ablations:
        md += ["", f"Ablations ({args.ablation_steps} steps each, same base, K = {args.samples}):", "",
               "| variant | 0% | 25% | 50% | 75% | time (s) |", "| --- | --- | --- | --- | --- | --- |"]
        for a in ablations:
            md.append(f"| {a['variant']} | " + " | ".join(f"{100 * v:.2f}%" for v in a["accuracy"].values())
                      + f" | {a['seconds']} |")
    write(args.name, result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
