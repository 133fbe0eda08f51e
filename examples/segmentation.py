"""Segmentation: morph a U-Net (concatenation skips) on MNIST digit canvases and compare it with L1 pruning by mIoU.

The data set puts two real MNIST digits on each 48x48 canvas with a class per
pixel (background or the digit); ``mnistseg:embedded`` builds it from the
subset shipped with morphkit, ``mnistseg:DIR`` from a full MNIST folder. The
U-Net's decoder reads ``cat([upsampled, skip])``: morphkit morphs those
concatenated channels too, so a sampled U-Net is as small as a resized one.
Files go to ``--out`` (default ``segmentation-out/``).

    python examples/segmentation.py                        # embedded subset, a few minutes on 2 cores
    python examples/segmentation.py --data mnistseg:../shared/data/mnist --base-epochs 5 --epochs 4
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import morphkit as mk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnistseg:embedded", help="mnistseg:embedded or mnistseg:DIR")
    ap.add_argument("--base-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="morph epochs")
    ap.add_argument("--out", type=Path, default=Path("segmentation-out"), help="folder for the files written")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. per-pixel data and a trained base U-Net
    train, test = mk.make_loaders(mk.load_data(args.data), batch_size=64, seed=0, test_batch_size=500)
    unet = mk.build_model("unet")  # 16/32/64 channels, 11 classes, 48x48 inputs
    base, _ = mk.fit(unet, train, epochs=args.base_epochs, optimizer="adam", lr=2e-3, seed=0)
    m = mk.evaluate(base, test)  # per-pixel labels: mIoU and pixel accuracy
    print(f"base U-Net: mIoU {100 * m['miou']:.2f}%, pixel accuracy {100 * m['accuracy']:.2f}%")

    # 2. learn the weight manifold once (default config: compression 0-75%)
    x = torch.zeros(1, 1, 48, 48)
    manifold = mk.morph(base, train, example_inputs=x, config=mk.MorphConfig(train=mk.TrainConfig(epochs=args.epochs)))
    manifold.save(args.out / "unet.morph.safetensors")

    # 3. NeuMeta against L1 pruning (no fine-tuning) at four sizes, by mIoU
    rows = mk.compare(manifold, test, ("neumeta", "l1"), (0.0, 0.25, 0.5, 0.75), base=base, train_data=train)
    paths = mk.write_report(rows, args.out, title="U-Net on MNIST digit canvases")
    for r in rows:
        print(f"{r['method']:>8} @ {r['compression']:.0%}: mIoU {100 * r['value']:.2f}% ({r['params']:,} params)")
    print(f"report: {paths['md']}")

    # 4. ship one width as a standard model file
    half = manifold.sample(0.5, calib_data=train)
    mk.save_model(half, args.out / "unet-w50.safetensors")
    print(f"wrote {args.out / 'unet-w50.safetensors'} ({sum(p.numel() for p in half.parameters()):,} params)")


if __name__ == "__main__":
    main()
