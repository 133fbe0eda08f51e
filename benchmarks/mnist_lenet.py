"""LeNet-5 on MNIST: base model, whole-network manifold, accuracy at eight compressions.

Trains (or loads) the base LeNet-5, morphs every resizable clique, and evaluates
the sampled models at compression 0 ... 87.5% (75% and above never trained),
with training wall time, the INR's size and the sample/export time.
Writes ``benchmarks/results/mnist_lenet.{json,md}``.

    python benchmarks/mnist_lenet.py --epochs 8
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import DATA, RESULTS, machine, write

import morphkit as mk
from morphkit.data import load_data, make_loaders

COMPRESSIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8, help="morph epochs over the 60k training images")
    ap.add_argument("--base-epochs", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="mnist_lenet")
    args = ap.parse_args()
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
    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=args.hidden, layers=args.layers),
                         train=mk.TrainConfig(epochs=args.epochs, seed=args.seed), samples=args.samples)
    t0 = time.perf_counter()
    manifold = mk.morph(base, train, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg)
    morph_seconds = time.perf_counter() - t0
    rows = []
    for g in COMPRESSIONS:
        t1 = time.perf_counter()
        net = manifold.sample(1 - g, samples=args.samples)
        sample_s = time.perf_counter() - t1
        acc = mk.evaluate(net, test)["accuracy"]
        rows.append({"compression": g, "accuracy": acc, "params": sum(p.numel() for p in net.parameters()),
                     "trained": g <= cfg.train.compression[1] + 1e-9, "sample_seconds": round(sample_s, 2)})
        print(rows[-1], flush=True)
    inr_params = sum(p.numel() for p in manifold.inr.parameters())
    result = {"machine": machine(), "config": cfg.to_dict(), "base_accuracy": base_acc,
              "base_seconds": round(base_seconds, 1), "morph_seconds": round(morph_seconds, 1),
              "steps": manifold.info["steps"], "inr_params": inr_params, "rows": rows}
    md = [f"# {args.name}: LeNet-5 / MNIST, whole network morphed", "",
          f"Command: `{result['machine']['command']}`  ",
          f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; torch "
          f"{result['machine']['torch']}; {result['machine']['date']}  ",
          f"Base LeNet-5: **{100 * base_acc:.2f}%**. Manifold: INR {args.hidden}x{args.layers} "
          f"({inr_params:,} params), {manifold.info['steps']} steps ({args.epochs} epochs, compression "
          f"U[0, 0.5]), {morph_seconds / 60:.1f} min; K = {args.samples} samples.", "",
          "| compression | accuracy | params | trained? | sample time (s) |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {100 * r['compression']:.1f}% | {100 * r['accuracy']:.2f}% | {r['params']:,} | "
                  f"{'yes' if r['trained'] else '**no**'} | {r['sample_seconds']} |")
    write(args.name, result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
