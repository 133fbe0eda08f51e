"""Training checkpoints of ``morph()``: everything a killed run needs to finish bit for bit.

A checkpoint is one safetensors file (``DIR/checkpoint.safetensors``, format
``morphkit.checkpoint/1``) written atomically by :mod:`morphkit._io`: the INR
and its EMA, Adam's moments, the RNG states (the width/noise generator of every
rank, torch's global generator, numpy's and Python's) and, in the JSON
metadata, the step, the scheduler, the data position, the smoothing
permutations (a resumed run rebuilds exactly the same smoothed base), the loss
history and a fingerprint of the run (the
config, the model's weights and the number of ranks) so a checkpoint is never
resumed by a different run. Nothing here unpickles.

This module only moves plain data in and out of files; :func:`morphkit.train.morph`
decides when to write and how to restore.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphkit._io import atomic_write_bytes, read_tensors, tensor_digest, write_tensors
from morphkit.errors import CheckpointError
from morphkit.formats import CHECKPOINT_FORMAT, FORMAT_VERSIONS

__all__ = ["CHECKPOINT_NAME", "LOCK_NAME", "TrainState", "check_writable", "lock_directory", "release_directory",
           "save_checkpoint", "load_checkpoint", "run_fingerprint", "capture_rng", "restore_rng"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
#: The lock a live run holds on its checkpoint directory (JSON: pid, host, process start time).
LOCK_NAME = ".morphkit.lock"


@dataclass
class TrainState:
    """The mutable state of a morph run between two steps (plain data).

    Attributes:
        step: Steps completed.
        epoch: Passes over the data started before the current one (data position).
        pos: Batches of the current pass already consumed (all ranks together).
        seen: Samples seen by this rank.
        train_seconds: Training wall time so far (informational).
        history: Loss records (every 10 steps).
        evals: Periodic evaluations.
        start_epoch: The loader's epoch counter when the run first started.
    """

    step: int = 0
    epoch: int = 0
    pos: int = 0
    seen: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    start_epoch: int = 0


def check_writable(directory: str | Path) -> Path:
    """Create ``directory`` if needed, prove a file can be written there, and lock it for this run.

    Called before training so a bad output location fails in seconds, not after
    hours. The probe file is written atomically and removed. Then the directory
    is locked (:func:`lock_directory`; released at exit or by
    :func:`release_directory`) and temporary files of killed runs are removed.

    Raises:
        CheckpointError: the path is a file, cannot be created, or is not
            writable; or another live run holds its lock.

    Example:
        >>> import tempfile
        >>> check_writable(tempfile.mkdtemp()).is_dir()
        True
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"checkpoint directory {str(d)!r} is a file, expected a directory; "
                              "pass a directory path")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create checkpoint directory {str(d)!r}: {e.strerror or e}; "
                              "choose a writable location") from e
    probe = d / f".morphkit-probe-{os.getpid()}"
    atomic_write_bytes(b"morphkit write probe\n", probe)
    probe.unlink()
    lock_directory(d)
    _remove_leftovers(d)
    return d


_HELD: set[Path] = set()  # directories this process has locked


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a reused pid apart), where /proc has it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _lock_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def lock_directory(directory: str | Path) -> Path:
    """Take the run lock of a checkpoint directory for this process (held until exit or :func:`release_directory`).

    Two runs writing one checkpoint directory would overwrite each other's
    checkpoints; the second is refused. A lock left by a run that was killed
    (its process is gone, or its pid now belongs to another process) is taken
    over with a warning. Taking a lock this process already holds is a no-op.

    Raises:
        CheckpointError: a live run (on this host, or on another host sharing the
            directory) holds the lock.

    Example:
        >>> import tempfile
        >>> d = lock_directory(tempfile.mkdtemp())
        >>> release_directory(d)
    """
    d = Path(directory)
    path = d / LOCK_NAME
    mine = _lock_record()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except OSError as e:
            raise CheckpointError(f"cannot create the lock {str(path)!r}: {e.strerror or e}; choose a writable "
                                  "checkpoint directory") from e
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            _HELD.add(d.resolve())
            return d
        try:
            held = json.loads(path.read_text())
            pid, host, start = int(held["pid"]), str(held["host"]), held.get("start")
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - _mtime(path) < 5:  # being written right now
                time.sleep(0.5)
                continue
            pid, host, start = -1, mine["host"], None  # unreadable and old: a run killed mid-write
        if pid == mine["pid"] and host == mine["host"] and start == mine["start"]:
            _HELD.add(d.resolve())
            return d
        if host != mine["host"]:
            raise CheckpointError(f"checkpoint directory {str(d)!r} is locked by process {pid} on host {host!r:.60} "
                                  f"(since {str(held.get('since'))[:20]}); if that run is no longer alive, delete "
                                  f"{str(path)!r}, else wait for it or use another checkpoint directory")
        if pid > 0 and _alive(pid) and (start is None or _process_start(pid) in (None, start)):
            raise CheckpointError(f"checkpoint directory {str(d)!r} is in use by a running morph (process {pid}, "
                                  f"since {str(held.get('since'))[:20]}); wait for it to finish, or use another "
                                  "checkpoint directory")
        logger.warning("taking over the lock of %s left by process %d, which is no longer running", d, pid)
        stale = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(path, stale)  # atomic: of two runs taking it over at once, one renames it
            stale.unlink()
        except FileNotFoundError:
            pass
    raise CheckpointError(f"could not take the lock {str(path)!r} (another run keeps taking it); use another "
                          "checkpoint directory")


def release_directory(directory: str | Path) -> None:
    """Give back a lock taken by :func:`lock_directory` (only if this process holds it)."""
    d = Path(directory)
    _HELD.discard(d.resolve())
    path = d / LOCK_NAME
    try:
        held = json.loads(path.read_text())
        if int(held["pid"]) == os.getpid() and held.get("host") == socket.gethostname():
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass


@atexit.register
def _release_all() -> None:
    for d in list(_HELD):
        release_directory(d)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_leftovers(d: Path) -> None:
    """Temporary files of runs that died writing here (this process holds the lock, so no live run is)."""
    for p in list(d.glob(f".{CHECKPOINT_NAME}.*.tmp")) + list(d.glob(".morphkit-probe-*")):
        try:
            p.unlink()
            logger.info("removed %s, left by a run that was killed", p)
        except OSError:
            pass


def run_fingerprint(model: torch.nn.Module, config_dict: dict, world_size: int) -> dict[str, Any]:
    """What must match for a checkpoint to belong to this run."""
    config_dict = json.loads(json.dumps(config_dict))  # tuples -> lists, as read back from a file
    return {"config": config_dict, "model_sha256": tensor_digest(dict(model.state_dict())),
            "world_size": int(world_size)}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states (torch, numpy, Python) as tensors + JSON."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))}
    meta = {"numpy": [str(np_state[0]), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    inr: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: list[torch.Tensor],
    perms: dict[int, Any],
    state: TrainState,
    total_steps: int,
    fingerprint: dict[str, Any],
) -> None:
    """Write one checkpoint atomically (see the module docstring for the contents).

    Args:
        path: Target file (replaced atomically).
        inr: The INR being trained.
        ema: Its EMA copy.
        optimizer: Adam (its state tensors go into the file, its groups into JSON).
        scheduler: An LR scheduler with ``state_dict()`` of plain numbers.
        generators: The width/noise generator state of every rank (rank order).
        perms: The smoothing permutations.
        state: Step, data position, history.
        total_steps: Steps of the whole run.
        fingerprint: From :func:`run_fingerprint`.
    """
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"inr.{k}": v for k, v in inr.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for pid, st in opt["state"].items():
        keys = []
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v
                keys.append(k)
            else:
                opt_meta["state"].setdefault(str(pid), {})[k] = v
        opt_meta.setdefault("tensor_keys", {})[str(pid)] = keys
    for r, g in enumerate(generators):
        tensors[f"rng.gen.{r}"] = g
    rng_tensors, rng_meta = capture_rng()
    tensors.update(rng_tensors)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "format": f"{CHECKPOINT_FORMAT}/{FORMAT_VERSIONS[CHECKPOINT_FORMAT]}",
        "total_steps": int(total_steps),
        "state": {**state.__dict__},
        "optimizer": opt_meta,
        "scheduler": sched,
        "rng": rng_meta,
        "generators": len(generators),
        "perms": {str(k): [int(i) for i in v] for k, v in perms.items()},
        "fingerprint": fingerprint,
    }
    write_tensors(tensors, meta, path)


def load_checkpoint(path: str | Path, fingerprint: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and validate a checkpoint against this run's fingerprint.

    Raises:
        CheckpointError: unreadable, corrupt, of another format or version, or
            written by a different run (config, model weights or world size).
    """
    tensors, meta = read_tensors(path, expect_format=CHECKPOINT_FORMAT)
    try:
        got = meta["fingerprint"]
        TrainState(**meta["state"])
        int(meta["total_steps"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is missing training state ({e}); it was not "
                              "written by morph(); start again without resume") from e
    for key, what in (("model_sha256", "the model's weights"), ("config", "the config"),
                      ("world_size", "the number of processes")):
        if got.get(key) != fingerprint[key]:
            detail = ""
            if key == "world_size":
                detail = f" (checkpoint {got.get(key)}, now {fingerprint[key]})"
            elif key == "config":
                a, b = got.get("config") or {}, fingerprint["config"]
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail = f" (differs in {diff})"
            raise CheckpointError(f"checkpoint {str(path)!r} belongs to a different run: {what} differ{detail}; "
                                  "resume with the same model, config and process count, or use another "
                                  "checkpoint directory")
    return tensors, meta


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{name: t}`` for every ``prefix.name`` key."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    """Rebuild ``optimizer.state_dict()`` from a checkpoint."""
    om = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for pid, keys in om.get("tensor_keys", {}).items():
        state[int(pid)] = {k: tensors[f"opt.{pid}.{k}"] for k in keys}
    for pid, extra in om.get("state", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": om["param_groups"]}
