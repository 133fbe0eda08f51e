"""Atomic, checksummed safetensors files with JSON metadata.

Every file morphkit writes (models, manifolds, checkpoints) is one
``.safetensors`` file whose header carries a single JSON document under the
key ``"morphkit"``. Writes go to a temporary file in the same directory, are
flushed and fsynced, then renamed over the target, so a crash never leaves a
half-written file under the final name. A SHA-256 of the tensor bytes is
stored in the metadata and checked on read, so a bit flip anywhere in the data
is reported instead of loaded. Nothing here unpickles: reading never runs code.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from morphkit.errors import CheckpointError, ConfigError

__all__ = ["write_tensors", "read_tensors", "atomic_write_bytes", "tensor_digest"]

META_KEY = "morphkit"

logger = logging.getLogger(__name__)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write bytes to ``path`` through a temp file and a rename.

    The temp file is named ``.NAME.HOST.PID.XXXX.tmp``; such files left by a
    process of this host that is no longer running (killed mid-write) are
    removed by the next write of the same name.

    Raises:
        CheckpointError: when the directory is missing or not writable, or the
            disk is full; the target is left as it was.
    """
    path = _as_path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        what = "is a file, not a directory" if parent.exists() else "does not exist"
        raise CheckpointError(f"cannot write {str(path)!r}: directory {str(parent)!r} {what}; "
                              "pass a path in an existing directory")
    if path.is_dir():
        raise CheckpointError(f"cannot write {str(path)!r}: it is a directory; expected a file path "
                              "such as DIR/model.safetensors")
    _remove_dead_temps(parent, path.name)
    fd, tmp = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise CheckpointError(f"cannot write {str(path)!r}: {e.strerror or e}; nothing was written "
                              "under that name (check permissions and free disk space)") from e
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


_HOST = socket.gethostname().replace("/", "_")


def _remove_dead_temps(parent: Path, name: str) -> None:
    """Remove ``.NAME.HOST.PID.*.tmp`` files that a killed process of this host left while writing ``name``."""
    try:
        leftovers = list(parent.glob(f".{glob.escape(name)}.{glob.escape(_HOST)}.*.tmp"))
    except OSError:
        return
    for p in leftovers:
        pid = p.name[len(name) + len(_HOST) + 3:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its writer is gone: never renamed, never will be
            try:
                p.unlink()
                logger.info("removed %s, left by process %s, which was killed while writing", p, pid)
            except OSError:
                pass
        except (PermissionError, OverflowError, OSError):
            pass


def write_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> None:
    """Write tensors and a JSON metadata document atomically (with a checksum).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
        >>> write_tensors({"a": torch.ones(2)}, {"format": "demo/1"}, p)
        >>> read_tensors(p)[1]["format"]
        'demo/1'
    """
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = dict(meta, sha256=tensor_digest(clean))
    try:
        header = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"metadata for {str(path)!r} is not JSON-serialisable: {e}") from e
    atomic_write_bytes(st_save(clean, metadata={META_KEY: header}), path)


def read_tensors(path: str | Path, expect_format: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`write_tensors`, verifying format and checksum.

    Args:
        path: The file.
        expect_format: Format family the file must belong to (``"morphkit.model"``);
            its version must not be newer than the one this morphkit writes.

    Raises:
        CheckpointError: missing, empty, truncated, corrupt (checksum mismatch),
            without morphkit metadata, of another format, or of a newer version.
    """
    path = _as_path(path)
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a directory; expected a .safetensors file written by morphkit")
    if not path.is_file():
        raise CheckpointError(f"file {str(path)!r} does not exist (expected a .safetensors file "
                              "written by morphkit)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e.strerror or e}") from e
    if not data:
        raise CheckpointError(f"file {str(path)!r} is empty; it was not written completely — write it again")
    try:
        # clone: views into the file buffer can be unaligned, which changes BLAS code paths (last-bit drift)
        tensors = {k: v.clone() for k, v in st_load(data).items()}
        n = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, then JSON header
        header = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, OSError, TypeError, OverflowError, MemoryError,
            RecursionError) as e:
        raise CheckpointError(f"file {str(path)!r} is not a readable safetensors file ({e}); it may be "
                              "truncated or corrupt — write it again") from e
    raw = header.get(META_KEY)
    if raw is None:
        raise CheckpointError(f"file {str(path)!r} has no morphkit metadata; it was not written by "
                              "morphkit (use save_model / Manifold.save)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or a number too long to convert
        raise CheckpointError(f"file {str(path)!r}: morphkit metadata is not valid JSON ({str(e)[:100]}); "
                              "the file is corrupt — write it again") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"file {str(path)!r}: morphkit metadata is a JSON {type(meta).__name__}, expected "
                              "an object with a 'format' field; the file is corrupt — write it again")
    if not isinstance(meta.get("format"), str):
        raise CheckpointError(f"file {str(path)!r}: morphkit metadata has no 'format' string (got "
                              f"{meta.get('format')!r:.60}); the file is corrupt — write it again")
    if expect_format is not None:
        _check_format(path, meta["format"], expect_format)
    digest = meta.get("sha256")
    if digest is not None and digest != tensor_digest(tensors):
        raise CheckpointError(f"file {str(path)!r} is corrupt: its tensor data does not match the "
                              "checksum recorded when it was written")
    return tensors, meta


def _as_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r:.60}")
    return Path(path)


def _check_format(path: Path, fmt: str, family: str) -> None:
    from morphkit.formats import FORMAT_VERSIONS, READERS

    name, _, ver = fmt.partition("/")
    if name != family:
        hint = f"; read it with {READERS[name]}" if name in READERS else ""
        raise CheckpointError(f"file {str(path)!r} is a {name!r:.80} file, expected a {family!r} file{hint}")
    current = FORMAT_VERSIONS[family]
    if not (ver.isascii() and ver.isdigit()) or int(ver) < 1:
        raise CheckpointError(f"file {str(path)!r} has format {fmt!r:.80}, expected {family}/1..{current}; "
                              "the file is corrupt — write it again")
    if int(ver) > current:
        raise CheckpointError(f"file {str(path)!r} has format {fmt!r}, newer than this morphkit reads "
                              f"({family}/{current}); upgrade morphkit")
