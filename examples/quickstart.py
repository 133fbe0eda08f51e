"""Quickstart: morph LeNet-5 on MNIST with the Python API, then ship three widths.

Trains a base LeNet-5 (or loads one), learns its weight manifold once, samples
standard models at several widths (including one never seen in training),
saves one as a plain model file and reloads it without the manifold. Files go
to ``--out`` (default ``quickstart-out/`` in the current directory).

    python examples/quickstart.py                          # embedded MNIST subset, ~3 min on 2 cores
    python examples/quickstart.py --data mnist:../shared/data/mnist --steps 2000 --out runs/lenet
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import morphkit as mk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="embedded", help="embedded (shipped subset) or mnist:DIR")
    ap.add_argument("--base-epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600, help="morph steps")
    ap.add_argument("--out", type=Path, default=Path("quickstart-out"), help="folder for the files written")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. data and a trained base model (any nn.Module works; LeNet-5 from the registry here)
    train, test = mk.make_loaders(mk.load_data(args.data), batch_size=128, seed=0, test_batch_size=1000)
    base, _ = mk.fit(mk.build_model("lenet5"), train, epochs=args.base_epochs, optimizer="adam", lr=2e-3, seed=0)
    print(f"base LeNet-5: {100 * mk.evaluate(base, test)['accuracy']:.2f}%")

    # 2. learn the weight manifold once (every resizable channel group of the network)
    cfg = mk.MorphConfig(train=mk.TrainConfig(steps=args.steps, compression=(0.0, 0.5)), samples=20)
    manifold = mk.morph(base, train, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg)
    facts = manifold.summary()
    print(f"manifold: INR {facts['inr_params']:,} params for {facts['resizable_cliques']} resizable cliques")

    # 3. any width, without retraining: 0.25 (75% compression) was never trained
    for width in (1.0, 0.5, 0.25):
        net = manifold.sample(width)
        print(f"width {width:.2f}: {100 * mk.evaluate(net, test)['accuracy']:.2f}% with "
              f"{mk.count_params(net):,} params")

    # 4. ship one width as a standard model file; it loads without morphkit's manifold
    path = args.out / "lenet5-w50.safetensors"
    mk.save_model(manifold.sample(0.5), path)
    small = mk.load_model(path)
    print(f"reloaded {path.name}: {type(small).__name__}, {100 * mk.evaluate(small, test)['accuracy']:.2f}%")
    manifold.save(args.out / "lenet5.morph.safetensors")  # keep the manifold for other widths later
    print(f"wrote {path.name} and lenet5.morph.safetensors to {args.out.resolve()}")


if __name__ == "__main__":
    main()
