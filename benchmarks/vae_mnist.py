"""The MLP VAE on MNIST (the paper's Fig. 6-7): NeuMeta vs L1 pruning by reconstruction MSE and NLL.

Trains (or loads) the base VAE (784-400-20-400-784, the registry's
``vae_mnist``, its recipe: Adam 1e-3), morphs it with its own loss (the
negative ELBO, morphkit's default for this model; the default MorphConfig,
compression U[0, 0.75]), and compares the sampled VAEs with L1-pruned ones
(no fine-tuning) at compression 0 / 25 / 50 / 75%: reconstruction MSE per
image (summed over the 784 pixels) and the negative ELBO (an upper bound on
the NLL, nats per image), both lower is better. Also writes a PNG grid of
test reconstructions per method and compression. Asserts equal parameter
counts per compression. Writes ``benchmarks/results/vae_mnist.{json,md,png}``
and ``vae_mnist_grid.png``.

    python benchmarks/vae_mnist.py --threads 2
    python benchmarks/vae_mnist.py --data embedded --base-epochs 1 --epochs 1 --name smoke_vae  # smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import DATA, RESULTS, image_grid, machine, metric_table

import morphkit as mk
from morphkit.compare import write_report
from morphkit.data import load_data, make_loaders
from morphkit.models import recipe_of

COMPRESSIONS = (0.0, 0.25, 0.5, 0.75)


def reconstruction_grid(models: dict[str, torch.nn.Module], x: torch.Tensor, path, title: str) -> None:
    """One row per model (the originals first), one column per test image."""
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1}
    rows = [("original", (x * 0.3081 + 0.1307).clamp(0, 1).reshape(len(x), 28, 28), gray)]  # (N, 28, 28)
    with torch.no_grad():
        for label, net in models.items():
            rows.append((label, torch.sigmoid(net.eval()(x)[0]).reshape(len(x), 28, 28), gray))
    image_grid(rows, path, title)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"mnist:{DATA / 'mnist'}")
    ap.add_argument("--base-epochs", type=int, default=20, help="base VAE epochs (the recipe's 20)")
    ap.add_argument("--epochs", type=int, default=10, help="morph epochs")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="vae_mnist")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x0 = torch.zeros(1, 1, 28, 28)
    train, test = make_loaders(load_data(args.data), batch_size=128, seed=args.seed, test_batch_size=1000)
    times: dict[str, float] = {}
    official = args.data.startswith("mnist:") and args.name == "vae_mnist"
    base_file = RESULTS / "base" / "vae-mnist.safetensors"
    t0 = time.perf_counter()
    if official and base_file.is_file():
        base = mk.load_model(base_file)
    else:
        vae = mk.build_model("vae_mnist")
        recipe = {k: v for k, v in recipe_of(vae).items() if k != "epochs"}  # Adam 1e-3, no weight decay
        base, _ = mk.fit(vae, train, epochs=args.base_epochs, seed=args.seed, **recipe)
        if official:
            mk.save_model(base, base_file)
    times["base"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = mk.MorphConfig(train=mk.TrainConfig(epochs=args.epochs, seed=args.seed), samples=args.samples)
    manifold = mk.morph(base, train, example_inputs=x0, config=cfg)
    times["morph"] = time.perf_counter() - t0

    rows = mk.compare(manifold, test, ("neumeta", "l1"), COMPRESSIONS, base=base, samples=args.samples,
                      seed=args.seed, train_data=train)
    for g in COMPRESSIONS:
        params = {r["params"] for r in rows if r["compression"] == g}
        assert len(params) == 1, f"compression {g}: parameter counts differ: {params}"

    xs = next(iter(test))[0][:10]  # (10, 1, 28, 28) the first test images
    models = {}
    for g in COMPRESSIONS[1:]:
        models[f"NeuMeta {g:.0%}"] = manifold.sample(1 - g, samples=args.samples, seed=args.seed)
        models[f"L1 {g:.0%}"] = mk.prune(base, x0, 1 - g, "l1", progress=False)
    grid = RESULTS / f"{args.name}_grid.png"
    reconstruction_grid({"base": base, **models}, xs, grid,
                        f"{args.name}: test reconstructions (rows: method, compression)")

    base_m = mk.evaluate(base, test)
    m = machine()
    meta = {"command": f"`{m['command']}`", "seed": args.seed, "data": args.data,
            "machine": f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
                       f"python {m['python']}, {m['date']}",
            "base": f"vae_mnist, {args.base_epochs} epochs Adam 1e-3: MSE {base_m['mse']:.2f}, "
                    f"NLL <= {base_m['nll']:.2f} nats",
            "manifold": f"default MorphConfig, {args.epochs} epochs, loss: negative ELBO, compression "
                        f"U{list(cfg.train.compression)}, sandwich {cfg.train.sandwich}, K = {args.samples}",
            "metrics": "MSE: squared error per image summed over 784 pixels in [0, 1]; NLL: negative ELBO "
                       "(deterministic latent = mean), nats per image; lower is better",
            "reconstructions": f"`{grid.name}`",
            "wall times (s)": ", ".join(f"{k} {v:.0f}" for k, v in times.items())}
    paths = write_report(rows, RESULTS, title=f"{args.name}: MLP VAE / MNIST, NeuMeta vs L1 pruning", meta=meta,
                         stem=args.name, plot=args.name)
    nll = metric_table(rows, "nll", "NLL (negative ELBO, nats per image; lower is better):", COMPRESSIONS)
    nll += ["", f"![reconstructions]({grid.name})"]
    with open(paths["md"], "a") as f:
        f.write("\n".join(nll) + "\n")
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
