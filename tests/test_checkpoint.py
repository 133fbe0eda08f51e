"""Checkpoint and resume: bit-exact continuation after an exception, SIGKILL or SIGINT; guards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import morphkit as mk
from morphkit._io import read_tensors
from morphkit.checkpoint import CHECKPOINT_NAME
from morphkit.data import load_data, make_loaders
from morphkit.errors import CheckpointError, ConfigError, TrainingError
from morphkit.fit import classification_loss

X = torch.zeros(1, 1, 28, 28)
# distill=0: the crash tests inject failures through a loss_fn, and a user's loss_fn turns distillation off
CFG = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                     train=mk.TrainConfig(steps=12, seed=3, distill=0.0), samples=2)


def _loader(seed: int = 0):
    train, _ = make_loaders(load_data("embedded"), batch_size=32, seed=seed, limit=160)  # 5 batches per pass
    return train


def _model():
    torch.manual_seed(0)
    return mk.build_model("mlp?hidden=[24,12]")


def _same(a: mk.Manifold, b: mk.Manifold) -> None:
    sa, sb = a.inr.state_dict(), b.inr.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class _Boom(Exception):
    pass


def _failing_loss(at_call: int):
    calls = {"n": 0}
    ce = classification_loss()

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise _Boom
        return ce(model, batch)
    return loss


@pytest.fixture(scope="module")
def reference():
    return mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False)


@pytest.mark.parametrize("crash_at", [3, 8, 12])
def test_resume_after_a_crash_is_bit_exact(tmp_path, reference, crash_at):
    with pytest.raises(_Boom):
        per_step = 2 if CFG.train.sandwich else 1  # loss calls per step (one per width map)
        mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path,
                 checkpoint_every=5, loss_fn=_failing_loss((crash_at - 1) * per_step + 1))
    expected = 5 * ((crash_at - 1) // 5)  # the last checkpoint before the crash (none before step 5)
    assert (read_tensors(tmp_path / CHECKPOINT_NAME)[1]["state"]["step"] if expected else
            not (tmp_path / CHECKPOINT_NAME).exists()) == (expected or True)
    resumed = mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path,
                       checkpoint_every=5, resume=True)
    _same(reference, resumed)
    _, meta = read_tensors(tmp_path / CHECKPOINT_NAME)
    assert meta["state"]["step"] == 12  # the final checkpoint


def test_resume_a_finished_run_returns_the_same_manifold(tmp_path, reference):
    mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path)
    again = mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path,
                     resume=True)
    _same(reference, again)


def test_existing_checkpoint_without_resume_is_refused_and_kept(tmp_path):
    mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


def test_checkpoint_of_another_run_is_refused(tmp_path):
    mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path)
    other = mk.MorphConfig(inr=CFG.inr, train=mk.TrainConfig(steps=12, seed=4), samples=2)
    with pytest.raises(CheckpointError, match="different run.*config"):
        mk.morph(_model(), _loader(), example_inputs=X, config=other, progress=False, checkpoint_dir=tmp_path,
                 resume=True)
    torch.manual_seed(1)
    with pytest.raises(CheckpointError, match="model's weights"):
        mk.morph(mk.build_model("mlp?hidden=[24,12]"), _loader(), example_inputs=X, config=CFG, progress=False,
                 checkpoint_dir=tmp_path, resume=True)


def test_bad_checkpoint_arguments(tmp_path):
    with pytest.raises(ConfigError, match="resume=True needs checkpoint_dir"):
        mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, resume=True)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path,
                 checkpoint_every=0)
    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file"):
        mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=afile)
    with pytest.raises(CheckpointError, match="cannot create"):
        mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=afile / "sub")
    assert afile.read_text() == "keep me"


def test_nan_loss_names_step_and_keeps_last_checkpoint(tmp_path):
    ce = classification_loss()
    calls = {"n": 0}

    per_step = 2 if CFG.train.sandwich else 1  # loss calls per step (one per width map)

    def nan_at_7(model, batch):  # the 7th step (step 6)
        calls["n"] += 1
        out = ce(model, batch)
        return out * float("nan") if calls["n"] == 6 * per_step + 1 else out

    with pytest.raises(TrainingError, match=r"loss became nan at step 6 .*mean width"):
        mk.morph(_model(), _loader(), example_inputs=X, config=CFG, progress=False, checkpoint_dir=tmp_path,
                 checkpoint_every=5, loss_fn=nan_at_7)
    _, meta = read_tensors(tmp_path / CHECKPOINT_NAME)
    assert meta["state"]["step"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name != CHECKPOINT_NAME]  # no temp files left, the lock released


# --- real process kills -------------------------------------------------------------------------

_SCRIPT = r"""
import os, signal, sys, torch, morphkit as mk
from morphkit.data import load_data, make_loaders
from morphkit.fit import classification_loss
torch.set_num_threads(1)
out, ckpt, steps, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
interrupt_at, every = int(sys.argv[5]), int(sys.argv[6])
ce, calls = classification_loss(), [0]

per_step = 2 if mk.TrainConfig().sandwich else 1  # loss calls per step (one per width map)

def loss_fn(model, batch):  # Ctrl-C from inside step `interrupt_at` (0: never)
    calls[0] += 1
    if calls[0] == (interrupt_at - 1) * per_step + 1:
        os.kill(os.getpid(), signal.SIGINT)
    return ce(model, batch)

torch.manual_seed(0)
model = mk.build_model("mlp?hidden=[24,12]")
train, _ = make_loaders(load_data("embedded"), batch_size=32, seed=seed, limit=160)
cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                     train=mk.TrainConfig(steps=steps, seed=seed, distill=0.0), samples=2)
try:
    m = mk.morph(model, train, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg, progress=False,
                 checkpoint_dir=None if ckpt == "-" else ckpt, resume=ckpt != "-", checkpoint_every=every,
                 loss_fn=loss_fn)
except KeyboardInterrupt:
    sys.exit(130)
m.save(out)
"""


def _run(tmp: Path, out: str, ckpt: str, steps: int, seed: int, interrupt_at: int = 0,
         every: int = 2) -> subprocess.Popen:
    script = tmp / "run_morph.py"
    script.write_text(_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(script), out, ckpt, str(steps), str(seed), str(interrupt_at),
                             str(every)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _step_of(path: Path) -> int:
    try:
        return read_tensors(path)[1]["state"]["step"]
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def _kill_and_resume(tmp_path: Path, seed: int, kill_after_step: int, sig: int, steps: int = 60) -> None:
    ref = _run(tmp_path, str(tmp_path / "ref.safetensors"), "-", steps, seed)
    ckpt = tmp_path / "ckpt"
    p = _run(tmp_path, str(tmp_path / "killed.safetensors"), str(ckpt), steps, seed)
    deadline = time.time() + 120
    while _step_of(ckpt / CHECKPOINT_NAME) < kill_after_step and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed:\n" + p.stdout.read().decode()[-3000:]
    os.kill(p.pid, sig)
    rc = p.wait(60)
    if sig == signal.SIGINT:
        assert rc == 130, p.stdout.read().decode()[-2000:]  # a clean exit after writing a checkpoint
    assert not (tmp_path / "killed.safetensors").exists()
    killed_at = _step_of(ckpt / CHECKPOINT_NAME)
    assert 0 < killed_at < steps, killed_at
    resumed = _run(tmp_path, str(tmp_path / "resumed.safetensors"), str(ckpt), steps, seed)
    for proc in (ref, resumed):
        assert proc.wait(180) == 0, proc.stdout.read().decode()[-2000:]
    a = mk.Manifold.load(tmp_path / "ref.safetensors")
    b = mk.Manifold.load(tmp_path / "resumed.safetensors")
    _same(a, b)


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    _kill_and_resume(tmp_path, seed=0, kill_after_step=6, sig=signal.SIGKILL)


def test_sigint_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    steps, seed = 40, 1
    ckpt = tmp_path / "ckpt"
    p = _run(tmp_path, str(tmp_path / "killed.safetensors"), str(ckpt), steps, seed, interrupt_at=13, every=1000)
    assert p.wait(180) == 130, p.stdout.read().decode()[-3000:]  # a clean exit, no traceback
    assert _step_of(ckpt / CHECKPOINT_NAME) == 13  # written by the interrupt itself, after step 13 completed
    ref = _run(tmp_path, str(tmp_path / "ref.safetensors"), "-", steps, seed)
    resumed = _run(tmp_path, str(tmp_path / "resumed.safetensors"), str(ckpt), steps, seed, every=1000)
    for proc in (ref, resumed):
        assert proc.wait(180) == 0, proc.stdout.read().decode()[-2000:]
    _same(mk.Manifold.load(tmp_path / "ref.safetensors"), mk.Manifold.load(tmp_path / "resumed.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_sigkill_at_random_steps(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    _kill_and_resume(tmp_path, seed=seed, kill_after_step=int(torch.randint(2, 50, (), generator=g)),
                     sig=signal.SIGKILL)
