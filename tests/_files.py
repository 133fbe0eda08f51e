"""Small valid morphkit files, built once per test session (bad-input and fuzz tests).

``valid_files()`` morphs a LeNet-5 for two steps on a slice of the embedded
MNIST subset and keeps the bytes of a manifold, a resized model and a base
model; tests copy them into their own ``tmp_path``. ``rewrite`` writes a file
whose checksum is valid for whatever tensors and metadata it is given, the way
``morphkit._io.write_tensors`` does, so tests reach the checks behind it.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

import morphkit as mk
from morphkit._io import META_KEY, read_tensors, tensor_digest

X = torch.zeros(1, 1, 28, 28)  # LeNet-5 example input


@functools.cache
def valid_files() -> dict[str, bytes]:
    """``{"manifold": ..., "model": ... (width 0.5), "base": ...}`` file bytes."""
    torch.manual_seed(0)
    splits = mk.load_data("embedded")
    train_dl, _ = mk.make_loaders(splits, batch_size=32, limit=64, seed=0)
    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                         train=mk.TrainConfig(steps=2, eval_compressions=()), samples=2)
    base = mk.build_model("lenet5")
    manifold = mk.morph(base, train_dl, example_inputs=X, config=cfg, progress=False)
    with tempfile.TemporaryDirectory() as d:
        paths = {"manifold": Path(d) / "m.morph.safetensors", "model": Path(d) / "w50.safetensors",
                 "base": Path(d) / "base.safetensors"}
        manifold.save(paths["manifold"])
        mk.save_model(manifold.sample(0.5, samples=1), paths["model"])
        mk.save_model(base, paths["base"])
        return {k: p.read_bytes() for k, p in paths.items()}


def rewrite(tensors: dict[str, torch.Tensor], meta: Any, *, checksum: bool = True,
            allow_nan: bool = False) -> bytes:
    """Safetensors bytes with ``meta`` as morphkit metadata and (by default) a matching checksum.

    ``meta`` may be any JSON value (a list, a string...) to test non-object metadata.
    """
    if checksum and isinstance(meta, dict):
        meta = dict(meta, sha256=tensor_digest(tensors))
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, allow_nan=allow_nan)})


def parts(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of valid file bytes."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.safetensors"
        p.write_bytes(data)
        return read_tensors(p)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes), hidden and temp files included."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
