"""A custom loss: morph an MLP VAE on MNIST with its ELBO, then compare reconstructions by width.

``morph`` trains the manifold with whatever ``loss_fn(model, batch)`` you pass:
here the VAE's negative ELBO (Bernoulli decoder), written out in full so you
can adapt it to your own model. The sampled VAEs are scored by reconstruction
MSE and negative log-likelihood (the ELBO bound), as in the paper's Fig. 7.

    python examples/vae_mnist.py          # the embedded subset, a few minutes on a CPU
    python examples/vae_mnist.py --data mnist:../shared/data/mnist
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

import morphkit as mk
from morphkit.export import count_params


def elbo_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """Negative ELBO per image in nats: Bernoulli reconstruction + KL(q(z|x) || N(0, I))."""
    x, _ = batch  # normalised with the MNIST mean/std by the loaders
    target = (torch.flatten(x, 1) * 0.3081 + 0.1307).clamp(0, 1)  # (B, 784) pixels in [0, 1]
    logits, mu, logvar = model(x)  # (B, 784), (B, latent), (B, latent)
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (recon + kl) / x.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="embedded")
    ap.add_argument("--base-epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    train, test = mk.make_loaders(mk.load_data(args.data), batch_size=128, seed=0, test_batch_size=1000)

    vae, _ = mk.fit(mk.build_model("vae_mnist"), train, epochs=args.base_epochs, optimizer="adam", lr=1e-3, seed=0)
    base = mk.evaluate(vae, test)
    print(f"base VAE: MSE {base['mse']:.4f}, NLL <= {base['nll']:.1f} nats")

    cfg = mk.MorphConfig(train=mk.TrainConfig(steps=args.steps), samples=10)
    manifold = mk.morph(vae, train, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg, loss_fn=elbo_loss)
    for width in (1.0, 0.75, 0.5, 0.25):
        net = manifold.sample(width)
        m = mk.evaluate(net, test)
        print(f"width {width:.2f}: MSE {m['mse']:.4f}, NLL <= {m['nll']:.1f} nats, {count_params(net):,} params")


if __name__ == "__main__":
    main()
