"""Morph a timm model: every resizable channel group of a ResNet or MobileNet, discovered automatically.

timm models are built without pretrained weights here (no machine in this
project downloads at run time), so a short fit on the embedded MNIST subset,
upsampled to 3x64x64, stands in for your fine-tuned model. With your own
weights, skip step 1 and pass your model to ``morph`` as it is.

    python examples/timm_model.py                             # resnet18 (11M weights): slow on a CPU
    python examples/timm_model.py --model mobilenetv3_small_100 --base-epochs 5
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

import morphkit as mk
from morphkit.export import count_params


class RGB64:
    """Wrap an (x, y) loader: 1x28x28 digits become 3x64x64 images (what ImageNet-style nets expect)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield F.interpolate(x, size=64, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="any timm model name")
    ap.add_argument("--base-epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100, help="morph steps")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    train, test = mk.make_loaders(mk.load_data("embedded"), batch_size=64, seed=0, test_batch_size=500)
    train, test = RGB64(train), RGB64(test)
    x = torch.zeros(1, 3, 64, 64)

    # 1. a trained timm model (stand-in for yours)
    model = mk.build_model(f"timm:{args.model}?num_classes=10")
    model, _ = mk.fit(model, train, epochs=args.base_epochs, optimizer="adam", lr=1e-3, seed=0)
    print(f"{args.model}: {100 * mk.evaluate(model, test)['accuracy']:.2f}%, {count_params(model):,} params")

    # 2. what morphkit found: the channel groups ("cliques") it can resize
    cliques = mk.find_cliques(mk.fuse_bn(model), x)
    print(f"{len(cliques)} cliques, {sum(not c.fixed for c in cliques)} resizable")

    # 3. learn the manifold and sample two widths
    cfg = mk.MorphConfig(train=mk.TrainConfig(steps=args.steps), samples=5)
    manifold = mk.morph(model, train, example_inputs=x, config=cfg)
    for width in (1.0, 0.75, 0.5):
        net = manifold.sample(width, calib_data=train)  # BN statistics recalibrated where BN was not folded
        print(f"width {width:.2f}: {100 * mk.evaluate(net, test)['accuracy']:.2f}%, {count_params(net):,} params")


if __name__ == "__main__":
    main()
