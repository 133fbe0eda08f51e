"""Deploy: from a manifold to ONNX files for devices, by width, by rounded channels and by budget.

Loads a manifold (or morphs a quick LeNet-5 one on the embedded MNIST subset),
then writes into ``--out`` (default ``deploy-out/``):

1. ``lenet-w50-r8.onnx``: half width with every channel count a multiple of 8 where
   a layer allows it, checked in onnxruntime against PyTorch;
2. ``lenet-budget.onnx`` and ``.safetensors``: the per-layer widths with the best
   accuracy on held-out training images within a parameter budget (a search over the
   manifold, nothing retrained), beside the uniform width at the same budget.

    pip install 'morphkit[onnx]'
    python examples/deploy.py                                    # ~2-4 min on 2 cores
    python examples/deploy.py --manifold benchmarks/results/manifolds/mnist_lenet.safetensors \\
        --data mnist:../shared/data/mnist
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import morphkit as mk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifold", type=Path, default=None, help="a manifold file (default: morph a quick one)")
    ap.add_argument("--data", default="embedded", help="embedded (shipped subset) or mnist:DIR")
    ap.add_argument("--budget", default=None, help="parameter budget (default: the uniform 60%% model's)")
    ap.add_argument("--out", type=Path, default=Path("deploy-out"), help="folder for the files written")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    splits = mk.load_data(args.data)
    train, test = mk.make_loaders(splits, batch_size=256, augment=False, seed=1, test_batch_size=1000)

    # the manifold: a file, or a quick one (a real one trains for minutes: see examples/quickstart.py)
    if args.manifold:
        manifold = mk.Manifold.load(args.manifold)
    else:
        base, _ = mk.fit(mk.build_model("lenet5"), train, epochs=2, optimizer="adam", lr=2e-3, seed=0)
        cfg = mk.MorphConfig(train=mk.TrainConfig(steps=120), samples=20)
        manifold = mk.morph(base, train, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg)

    # 1. half width, channel counts rounded to multiples of 8, as a standard ONNX file
    net = manifold.sample(0.5, round_to=8)
    path = args.out / "lenet-w50-r8.onnx"
    mk.save_onnx(net, path, source=str(args.manifold or "quick manifold"))
    print(f"{path.name}: channels {net.morphkit_widths}, {mk.count_params(net):,} params, "
          f"test accuracy {100 * mk.evaluate(net, test)['accuracy']:.2f}%")
    try:
        import onnxruntime as ort

        x = torch.randn(4, 1, 28, 28)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = net(x).numpy()
        print(f"onnxruntime vs PyTorch: largest difference {abs(got - ref).max():.2e} (outputs up to "
              f"{abs(ref).max():.2f})")
    except ImportError:
        print("onnxruntime is not installed: pip install 'morphkit[onnx]' to run the ONNX file")

    # 2. the best per-layer widths within a parameter budget, scored on training images (not the test split)
    uniform = manifold.sample(0.6)
    budget = args.budget or mk.count_params(uniform)
    held = [b for _, b in zip(range(8), train)]
    found = manifold.search(held, params=budget, candidates=32)
    print(found.summary())
    best = manifold.sample(found.widths)
    mk.save_onnx(best, args.out / "lenet-budget.onnx", search=found.to_json())
    mk.save_model(best, args.out / "lenet-budget.safetensors", search=found.to_json())
    acc, uni = mk.evaluate(best, test)["accuracy"], mk.evaluate(uniform, test)["accuracy"]
    print(f"test accuracy at {found.params:,} params: searched {100 * acc:.2f}%, "
          f"uniform width 0.6 ({mk.count_params(uniform):,} params) {100 * uni:.2f}%")
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out.resolve()}")


if __name__ == "__main__":
    main()
