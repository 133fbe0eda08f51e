"""Semantic segmentation (the paper's third task): a U-Net on MNIST digit canvases, NeuMeta vs L1 pruning by mIoU.

The data (``mnistseg:``, :mod:`morphkit.segdata`) places two real MNIST digits
on each 48x48 canvas with a class per pixel (background or the digit), built
deterministically from ``../shared/data/mnist``. The base is the registry's
``unet`` (16/32/64 channels, BatchNorm, concatenation skips, its recipe: Adam
2e-3), trained for ``--base-epochs``; it is morphed with the default
``MorphConfig`` (compression U[0, 0.75]) and compared with L1-pruned U-Nets
(no fine-tuning) at compression 0 / 25 / 50 / 75% on the test canvases: mean
IoU over the 11 classes (higher is better) and pixel accuracy. Asserts equal
parameter counts per compression. Also writes a PNG of test predictions per
method and compression. Writes ``benchmarks/results/NAME.{json,md,png}`` and
``NAME_predictions.png``.

    python benchmarks/segmentation_mnist.py --threads 1
    python benchmarks/segmentation_mnist.py --data mnistseg:embedded --limit 512 --base-epochs 1 --epochs 1 \\
        --samples 2 --name smoke_seg  # smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import DATA, RESULTS, image_grid, machine, metric_table

import morphkit as mk
from morphkit.compare import write_report
from morphkit.data import load_data, make_loaders
from morphkit.fit import logits_of
from morphkit.models import recipe_of

COMPRESSIONS = (0.0, 0.25, 0.5, 0.75)


class GrayLRASPP(torch.nn.Module):
    """torchvision's LR-ASPP MobileNetV3-Large (random init, 11 classes) on 1-channel images (repeated to 3)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        self.net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x.expand(-1, 3, -1, -1))  # {"out": (B, 11, H, W)}


def build_base(model: str) -> tuple[torch.nn.Module, dict]:
    """The untrained segmentation network and its fit() recipe."""
    if model == "unet":
        unet = mk.build_model("unet")
        return unet, {k: v for k, v in recipe_of(unet).items() if k != "epochs"}  # Adam 2e-3
    return GrayLRASPP(), {"optimizer": "adam", "lr": 2e-3, "weight_decay": 1e-4}


def prediction_grid(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, path, title: str
                    ) -> None:
    """Rows: the input, the true classes, then one row per model; one column per test canvas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    # background black, one colour per digit
    classes = {"cmap": ListedColormap(["black", *plt.get_cmap("tab10").colors]), "vmin": 0, "vmax": 10,
               "interpolation": "nearest"}
    rows = [("input", x[:, 0], {"cmap": "gray", "interpolation": "nearest"}), ("truth", y, classes)]
    with torch.no_grad():
        for label, net in models.items():
            rows.append((label, logits_of(net.eval()(x)).argmax(1), classes))
    image_grid(rows, path, title, cell=(0.95, 1.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"mnistseg:{DATA / 'mnist'}")
    ap.add_argument("--model", choices=("unet", "lraspp"), default="unet",
                    help="the registry U-Net, or torchvision lraspp_mobilenet_v3_large (3.2 M params)")
    ap.add_argument("--limit", type=int, default=12_000, help="training canvases used (of 30,000)")
    ap.add_argument("--base-epochs", type=int, default=12, help="base network epochs (the U-Net recipe's 12)")
    ap.add_argument("--epochs", type=int, default=8, help="morph epochs")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="result name (default: segmentation_mnist[_lraspp])")
    args = ap.parse_args()
    args.name = args.name or "segmentation_mnist" + ("" if args.model == "unet" else "_lraspp")
    if args.threads:
        torch.set_num_threads(args.threads)
    x0 = torch.zeros(1, 1, 48, 48)
    splits = load_data(args.data)
    train, test = make_loaders(splits, batch_size=64, seed=args.seed, test_batch_size=500, limit=args.limit)
    times: dict[str, float] = {}
    official = args.name.startswith("segmentation_mnist") and not args.data.endswith(":embedded")
    base_file = RESULTS / "base" / f"{args.model}-mnistseg-{args.base_epochs}ep.safetensors"
    t0 = time.perf_counter()
    fresh, recipe = build_base(args.model)
    if official and base_file.is_file():
        base = mk.load_model(base_file, base=fresh)
    else:
        base, _ = mk.fit(fresh, train, epochs=args.base_epochs, seed=args.seed, **recipe)
        if official:
            mk.save_model(base, base_file, data=args.data, epochs=args.base_epochs, limit=args.limit)
    times["base"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = mk.MorphConfig(train=mk.TrainConfig(epochs=args.epochs, seed=args.seed), samples=args.samples)
    manifold = mk.morph(base, train, example_inputs=x0, config=cfg)
    times["morph"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = mk.compare(manifold, test, ("neumeta", "l1"), COMPRESSIONS, base=base, samples=args.samples,
                      seed=args.seed, train_data=train)
    times["compare"] = time.perf_counter() - t0
    for g in COMPRESSIONS:
        params = {r["params"] for r in rows if r["compression"] == g}
        assert len(params) == 1, f"compression {g}: parameter counts differ: {params}"

    xs, ys = next(iter(test))
    models = {}
    for g in COMPRESSIONS[1:]:
        models[f"NeuMeta {g:.0%}"] = manifold.sample(1 - g, samples=args.samples, seed=args.seed,
                                                     calib_data=train)
        models[f"L1 {g:.0%}"] = mk.prune(base, x0, 1 - g, "l1", progress=False)
    grid = RESULTS / f"{args.name}_predictions.png"
    prediction_grid({"base": base, **models}, xs[:10], ys[:10], grid,
                    f"{args.name}: test predictions (rows: method, compression)")

    base_m = mk.evaluate(base, test)
    m = machine()
    meta = {"command": f"`{m['command']}`", "seed": args.seed, "data": f"{args.data} (first {args.limit:,} "
            f"training canvases; {len(splits.test):,} test canvases of 48x48, 2 digits each)",
            "machine": f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
                       f"python {m['python']}, {m['date']}",
            "base": f"{args.model} ({sum(p.numel() for p in base.parameters()):,} params), {args.base_epochs} "
                    f"epochs Adam 2e-3: mIoU "
                    f"{100 * base_m['miou']:.2f}%, pixel accuracy {100 * base_m['accuracy']:.2f}%",
            "manifold": f"default MorphConfig, {args.epochs} epochs, compression U{list(cfg.train.compression)}, "
                        f"K = {args.samples}",
            "metrics": "mIoU: intersection over union per class (background and 10 digits), averaged over the "
                       "classes present; pixel accuracy; higher is better",
            "predictions": f"`{grid.name}`",
            "wall times (s)": ", ".join(f"{k} {v:.0f}" for k, v in times.items())}
    what = "U-Net" if args.model == "unet" else "LR-ASPP MobileNetV3-Large"
    paths = write_report(rows, RESULTS, title=f"{args.name}: {what} / MNIST digit canvases, NeuMeta vs L1 pruning",
                         meta=meta, stem=args.name, plot=args.name)
    acc = metric_table(rows, "accuracy", "Pixel accuracy (%):", COMPRESSIONS, scale=100.0)
    acc += ["", f"![predictions]({grid.name})"]
    with open(paths["md"], "a") as f:
        f.write("\n".join(acc) + "\n")
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
