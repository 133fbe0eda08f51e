"""Build the MNIST subset shipped inside morphkit (``morphkit/_data/mnist_subset.npz``).

The subset is balanced and deterministic: the first ``--train-per-class`` train
images and the first ``--test-per-class`` test images of each digit, kept in
their original file order. It also stores each image's index in the original
files (``train_index``, ``test_index``) so tests can check it against them.

Usage (from the repository root):

    python scripts/make_embedded_mnist.py                     # ../shared/data/mnist -> morphkit/_data/
    python scripts/make_embedded_mnist.py --src DIR --train-per-class 500
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from morphkit.data import load_mnist  # noqa: E402


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class, sorted (original order)."""
    picks = []
    for digit in range(10):
        where = np.flatnonzero(labels == digit)
        if len(where) < per_class:
            raise SystemExit(f"only {len(where)} samples of class {digit}, need {per_class}")
        picks.append(where[:per_class])
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "mnist",
                        help="directory with the MNIST idx(.gz) files (default: ../shared/data/mnist)")
    parser.add_argument("--out", type=Path, default=REPO / "morphkit" / "_data" / "mnist_subset.npz")
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()

    splits = load_mnist(args.src)
    arrays = {}
    for name, data, per_class in (("train", splits.train, args.train_per_class),
                                  ("test", splits.test, args.test_per_class)):
        labels = data.labels.numpy()
        index = first_per_class(labels, per_class)
        arrays[f"{name}_images"] = data.images[:, 0].numpy()[index]  # (n, 28, 28) uint8
        arrays[f"{name}_labels"] = labels[index].astype(np.uint8)  # (n,)
        arrays[f"{name}_index"] = index.astype(np.int32)  # (n,) position in the original file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; package data must be readable by all
    os.replace(tmp, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:16]
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest}...): "
          f"{len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test images")


if __name__ == "__main__":
    main()
