"""Shared fixtures: the real data directory (skipped when absent) and small seeded models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def mnist_dir() -> Path:
    d = DATA / "mnist"
    if not (d / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {d} (../shared/data/mnist from the project root)")
    return d


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
