"""morph() under torchrun: 2 CPU processes with gloo, gradients averaged by DDP, rank 0 writes.

The fast test checks the mechanics (both ranks end with the same INR, rank 0
alone writes the checkpoint, resume works); the slow one compares the quality
with a single-process run on the same data budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import morphkit as mk
from morphkit.data import load_data, make_loaders

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import os, sys, torch, morphkit as mk
from morphkit._io import write_tensors
from morphkit.data import load_data, make_loaders
torch.set_num_threads(1)
out, base_file, epochs, hidden = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = mk.load_model(base_file)
train, test = make_loaders(load_data("embedded"), batch_size=64, seed=0, test_batch_size=500)
cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=hidden, layers=2, n_freqs=4),
                     train=mk.TrainConfig(epochs=epochs, lr=2e-3, seed=0), samples=5)
m = mk.morph(base, train, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg, progress=False,
             checkpoint_dir=os.path.join(out, "ckpt"), checkpoint_every=10)
rank = int(os.environ.get("RANK", "0"))
write_tensors(m.inr.state_dict(), {"format": "test/1", "world": m.info["world_size"],
              "steps": m.info["steps"]}, os.path.join(out, f"inr-rank{rank}.safetensors"))
if rank == 0:
    m.save(os.path.join(out, "manifold.safetensors"))
"""


def _base(tmp: Path, epochs: int = 3) -> Path:
    torch.manual_seed(0)
    train, _ = make_loaders(load_data("embedded"), batch_size=64, seed=0)
    net, _ = mk.fit(mk.build_model("mlp?hidden=[64,32]"), train, epochs=epochs, optimizer="adam", lr=2e-3,
                    progress=False, seed=0)
    path = tmp / "base.safetensors"
    mk.save_model(net, path)
    return path


def _launch(tmp: Path, out: Path, base: Path, nproc: int, epochs: int, hidden: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    script = tmp / "ddp_morph.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]))
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(29500 + os.getpid() % 1000), str(script)]
    proc = subprocess.run(cmd + [str(out), str(base), str(epochs), str(hidden)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_gloo_processes_share_one_inr(tmp_path):
    base = _base(tmp_path, epochs=1)
    _launch(tmp_path, tmp_path / "ddp", base, nproc=2, epochs=1, hidden=16)
    a, ma = mk._io.read_tensors(tmp_path / "ddp" / "inr-rank0.safetensors")
    b, mb = mk._io.read_tensors(tmp_path / "ddp" / "inr-rank1.safetensors")
    assert ma["world"] == mb["world"] == 2
    assert ma["steps"] == 94 // 2  # an epoch is one pass by both ranks together
    assert all(torch.equal(a[k], b[k]) for k in a)  # DDP kept the replicas identical
    files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert files == ["ckpt", "inr-rank0.safetensors", "inr-rank1.safetensors", "manifold.safetensors"]
    assert [p.name for p in (tmp_path / "ddp" / "ckpt").iterdir()] == ["checkpoint.safetensors"]
    _, meta = mk._io.read_tensors(tmp_path / "ddp" / "ckpt" / "checkpoint.safetensors")
    assert meta["generators"] == 2 and meta["state"]["step"] == 47
    net = mk.Manifold.load(tmp_path / "ddp" / "manifold.safetensors").sample(0.5, samples=1)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _accuracy(path: Path, compressions=(0.0, 0.25, 0.5)) -> list[float]:
    _, test = make_loaders(load_data("embedded"), batch_size=500)
    m = mk.Manifold.load(path)
    return [mk.evaluate(m.sample(1 - g, samples=5), test)["accuracy"] for g in compressions]


@pytest.mark.slow
def test_two_processes_match_single_process_quality(tmp_path):
    base = _base(tmp_path)
    _launch(tmp_path, tmp_path / "one", base, nproc=1, epochs=6, hidden=32)
    _launch(tmp_path, tmp_path / "two", base, nproc=2, epochs=6, hidden=32)
    one = _accuracy(tmp_path / "one" / "manifold.safetensors")
    two = _accuracy(tmp_path / "two" / "manifold.safetensors")
    print(f"single process {one}, two processes {two}")
    assert abs(sum(one) / len(one) - sum(two) / len(two)) <= 0.005, (one, two)
