"""Fuzzing the file readers: mutated model and manifold files either load or raise MorphkitError.

Each example takes a valid file (a manifold, a resized LeNet-5, a base LeNet-5)
and applies one mutation: raw byte edits (flips, truncation, insertion,
deletion, a new header length), edits of the safetensors header (dtypes,
shapes, offsets, duplicate names), edits of the tensors themselves, or edits of
morphkit's JSON metadata (wrong types, missing keys, huge or negative numbers,
duplicated entries, newer formats). Tensor and metadata edits are written with
a *valid* checksum, so the validation behind the checksum is what is tested.
Then ``load_model`` / ``model_info`` / ``Manifold.load`` (and ``sample`` on a
manifold that loads, ``morphkit info`` on the CLI) run: anything but a
``MorphkitError`` escaping, or a call running past its time limit, fails.

The default run tries a few dozen inputs per file kind (seconds). The ``slow``
variants try ``MORPHKIT_FUZZ_EXAMPLES`` (default 1000) per kind::

    MORPHKIT_FUZZ_EXAMPLES=5000 python -m pytest -m slow tests/test_fuzz.py -q
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import struct
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from _files import parts, rewrite, valid_files
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import morphkit as mk
from morphkit.cli import main
from morphkit.errors import MorphkitError

FAST = 30
SLOW = int(os.environ.get("MORPHKIT_FUZZ_EXAMPLES", "1000"))
HANG_S = 60  # a single load taking this long counts as a hang
COUNTS: dict[str, int] = {}  # inputs tried per test (reported by the slow run)

_common = dict(deadline=timedelta(seconds=20), database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- mutations

JSON_VALUES = [None, True, False, 0, 1, -1, 2, 7, 2**31, 2**63, 10**12, -(10**9), 0.5, -2.5, 1e308,
               math.nan, math.inf, -math.inf, "", "x", "float32", "int64", "bool", "__class__", "nn",
               "morphkit.model/1", "morphkit.manifold/1", "../x", [], [0], [1, 2], [-1], [[1]], [2**40, 2**40],
               {}, {"a": 1}, {"0": 1}, {"source": "morphkit", "name": "mlp", "kwargs": {"hidden": [2**40]}}]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", "", 5]


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON value, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _mutate_json(draw: st.DataObject, meta: Any) -> Any:
    """One edit of a JSON value: replace / delete / duplicate / swap a node, or add a key."""
    meta = copy.deepcopy(meta)
    paths = _paths(meta)
    path = draw.draw(st.sampled_from(paths), label="json path")
    op = draw.draw(st.sampled_from(["replace", "replace", "replace", "delete", "dup", "swap", "add", "copy"]),
                   label="json op")
    if not path:
        return draw.draw(st.sampled_from(JSON_VALUES + [[meta], json.dumps(meta)]), label="root")
    parent, key = _get(meta, path[:-1]), path[-1]
    if op == "replace":
        parent[key] = draw.draw(st.sampled_from(JSON_VALUES) | st.integers() | st.text(max_size=8), label="value")
    elif op == "delete":
        del parent[key]
    elif op == "dup" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))  # duplicate names / ids
    elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
        j = draw.draw(st.integers(0, len(parent) - 1), label="swap with")
        parent[key], parent[j] = parent[j], parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[draw.draw(st.sampled_from(["extra", "0", "99", "-1", ""]), label="new key")] = parent[key]
    elif op == "copy":  # another node's value here (a list where an int was, a clique for a layout...)
        other = _get(meta, draw.draw(st.sampled_from(paths), label="copy from"))
        parent[key] = copy.deepcopy(other)
    return meta


def _raw(draw: st.DataObject, data: bytes) -> bytes:
    """Byte-level edits: flips, truncation, insertion, deletion, header length."""
    buf = bytearray(data)
    n_header = int.from_bytes(data[:8], "little")
    kind = draw.draw(st.sampled_from(["flip", "flip_header", "truncate", "insert", "delete", "header_len"]),
                     label="raw op")
    if kind in ("flip", "flip_header"):
        hi = 8 + n_header if kind == "flip_header" else len(buf)
        for _ in range(draw.draw(st.integers(1, 4), label="flips")):
            i = draw.draw(st.integers(0, hi - 1), label="at")
            buf[i] ^= draw.draw(st.integers(1, 255), label="xor")
    elif kind == "truncate":
        del buf[draw.draw(st.integers(0, len(buf) - 1), label="keep"):]
    elif kind == "insert":
        i = draw.draw(st.integers(0, len(buf)), label="at")
        buf[i:i] = draw.draw(st.binary(min_size=1, max_size=64), label="bytes")
    elif kind == "delete":
        i = draw.draw(st.integers(0, len(buf) - 1), label="at")
        del buf[i:i + draw.draw(st.integers(1, 64), label="len")]
    else:
        new = draw.draw(st.sampled_from([0, 1, 7, n_header - 1, n_header + 1, n_header + 8, len(buf),
                                         2**31, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1), label="len")
        buf[:8] = struct.pack("<Q", new)
    return bytes(buf)


def _header(draw: st.DataObject, data: bytes) -> bytes:
    """Edit the safetensors JSON header (dtype, shape, offsets, names), then re-checksum if it parses."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    name = draw.draw(st.sampled_from(names), label="tensor")
    entry = header[name]
    kind = draw.draw(st.sampled_from(["dtype", "shape", "offsets", "dup", "rename", "drop"]), label="header op")
    if kind == "dtype":
        entry["dtype"] = draw.draw(st.sampled_from(DTYPES), label="dtype")
    elif kind == "shape":
        entry["shape"] = draw.draw(st.sampled_from([[], [0], [-1], [2**62, 2**62], [1, 2**40]])
                                   | st.lists(st.integers(0, 300), max_size=4), label="shape")
    elif kind == "offsets":
        entry["data_offsets"] = draw.draw(st.lists(st.integers(-2**33, 2**33) | st.integers(0, len(body)),
                                                   min_size=0, max_size=3), label="offsets")
    elif kind == "dup":  # a second name pointing at the same bytes
        header[name + "_"] = dict(entry)
    elif kind == "rename":
        header[draw.draw(st.sampled_from(["", "inr.", "static.", "x" * 300, names[0]]), label="to")] = header.pop(name)
    else:
        del header[name]
    text = json.dumps(header).encode()
    out = struct.pack("<Q", len(text)) + text + body
    try:  # still readable by safetensors: give it a valid checksum, so morphkit's own checks run
        tensors = {k: v.clone() for k, v in st_load(out).items()}
        meta = json.loads(header["__metadata__"]["morphkit"])
    except Exception:  # noqa: BLE001 - an unreadable file is a fine fuzz input too
        return out
    return rewrite(tensors, meta)


def _tensors(draw: st.DataObject, data: bytes) -> bytes:
    """Edit the tensors (dtype, shape, values, names) and write them with a valid checksum."""
    tensors, meta = parts(data)
    name = draw.draw(st.sampled_from(sorted(tensors)), label="tensor")
    t = tensors[name]
    kind = draw.draw(st.sampled_from(["dtype", "flatten", "unsqueeze", "empty", "grow", "nan", "drop", "rename",
                                      "dup"]), label="tensor op")
    if kind == "dtype":
        dt = draw.draw(st.sampled_from([torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool,
                                        torch.bfloat16, torch.int8]), label="dtype")
        tensors[name] = t.to(dt)
    elif kind == "flatten":
        tensors[name] = t.reshape(-1)
    elif kind == "unsqueeze":
        tensors[name] = t.unsqueeze(0)
    elif kind == "empty":
        tensors[name] = torch.zeros(0)
    elif kind == "grow":
        tensors[name] = torch.zeros(*(s + 1 for s in t.shape)) if t.dim() else torch.zeros(2)
    elif kind == "nan":
        tensors[name] = torch.full_like(t, math.nan) if t.is_floating_point() else t
    elif kind == "drop":
        del tensors[name]
    elif kind == "rename":
        tensors[name + ".x"] = tensors.pop(name)
    else:
        tensors[name.replace("weight", "bias") if "weight" in name else name + "_"] = t.clone()
    return rewrite(tensors, meta)


def _metadata(draw: st.DataObject, data: bytes) -> bytes:
    """Edit morphkit's JSON metadata and write it with a valid checksum."""
    tensors, meta = parts(data)
    meta.pop("sha256", None)
    return rewrite(tensors, _mutate_json(draw, meta), allow_nan=True)


def _metadata_text(draw: st.DataObject, data: bytes) -> bytes:
    """Edit morphkit's metadata as text (the checksum field stays): not JSON, deep nesting, duplicate keys."""
    tensors, meta = parts(data)
    text = json.dumps(meta)
    kind = draw.draw(st.sampled_from(["cut", "insert", "dup_key", "deep", "number", "bom"]), label="text op")
    if kind == "cut":
        text = text[:draw.draw(st.integers(0, len(text) - 1), label="keep")]
    elif kind == "insert":
        i = draw.draw(st.integers(0, len(text)), label="at")
        text = text[:i] + draw.draw(st.text(min_size=1, max_size=4), label="chars") + text[i:]
    elif kind == "dup_key":  # a JSON object with a key twice: the last one wins in Python
        key = draw.draw(st.sampled_from(sorted(meta)), label="key")
        text = text[:-1] + f", {json.dumps(key)}: " + draw.draw(st.sampled_from(['"x"', "null", "1", "[]", "{}"]),
                                                                   label="value") + "}"
    elif kind == "deep":
        depth = draw.draw(st.sampled_from([50, 500, 5000, 100000]), label="depth")
        text = text[:-1] + ', "user": ' + "[" * depth + "]" * depth + "}"
    elif kind == "number":
        key = draw.draw(st.sampled_from(sorted(meta)), label="key")
        text = text[:-1] + f", {json.dumps(key)}: " + draw.draw(st.sampled_from(["1e999", "-1e999", "NaN",
                                                                                  "Infinity", "1" * 5000]),
                                                                   label="number") + "}"
    else:
        text = "\ufeff" + text
    return st_save(tensors, metadata={"morphkit": text})


def mutate(draw: st.DataObject, data: bytes) -> bytes:
    """One mutation of valid file bytes; metadata edits (the deepest checks) are drawn most often."""
    how = draw.draw(st.sampled_from([_raw, _header, _tensors, _metadata, _metadata, _metadata, _metadata_text]),
                    label="kind")
    return how(draw, data)


# --------------------------------------------------------------------------- running the readers


@contextlib.contextmanager
def _time_limit(seconds: int):
    def boom(*_):
        raise TimeoutError(f"a call ran longer than {seconds} s (hang?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _expect_morphkit_error_or_ok(fn, *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except MorphkitError:
        return None


def _check_model_file(path: Path, cli: bool) -> None:
    _expect_morphkit_error_or_ok(mk.model_info, path)
    net = _expect_morphkit_error_or_ok(mk.load_model, path)
    if net is not None:
        assert isinstance(net, torch.nn.Module)
    if cli:
        res = CliRunner().invoke(main, ["info", str(path)])
        assert res.exit_code in (0, 1), res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert "Traceback" not in res.output


def _check_manifold_file(path: Path, cli: bool) -> None:
    m = _expect_morphkit_error_or_ok(mk.Manifold.load, path)
    if m is not None:  # a manifold that loads must sample, or refuse with a MorphkitError
        net = _expect_morphkit_error_or_ok(m.sample, 0.5, samples=1)
        assert net is None or isinstance(net, torch.nn.Module)
    _expect_morphkit_error_or_ok(mk.model_info, path)  # the wrong kind of file
    if cli:
        res = CliRunner().invoke(main, ["info", str(path)])
        assert res.exit_code in (0, 1), res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


CHECKS = {"manifold": _check_manifold_file, "model": _check_model_file, "base": _check_model_file}


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _run_one(kind: str, draw: st.DataObject, directory: Path, cli: bool, counter: str) -> None:
    data = mutate(draw, valid_files()[kind])
    path = directory / f"{kind}.safetensors"
    path.write_bytes(data)
    before = sorted(os.listdir(directory))
    with _time_limit(HANG_S):
        CHECKS[kind](path, cli)
    assert sorted(os.listdir(directory)) == before  # reading never writes
    COUNTS[counter] = COUNTS.get(counter, 0) + 1


@pytest.mark.parametrize("kind", sorted(CHECKS))
@settings(max_examples=FAST, derandomize=True, **_common)  # the same inputs every run: no flaky CI
@given(draw=st.data())
def test_fuzz_readers(kind, draw, fuzz_dir):
    _run_one(kind, draw, fuzz_dir, cli=False, counter=f"fast-{kind}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CHECKS))
@settings(max_examples=SLOW, **_common)
@given(draw=st.data())
def test_fuzz_readers_long(kind, draw, fuzz_dir):
    _run_one(kind, draw, fuzz_dir, cli=True, counter=f"slow-{kind}")


def test_valid_files_load(tmp_path):
    """The unmutated files load: the fuzz starts from good inputs."""
    files = valid_files()
    for kind, data in files.items():
        (tmp_path / f"{kind}.safetensors").write_bytes(data)
    assert mk.Manifold.load(tmp_path / "manifold.safetensors").sample(0.5, samples=1) is not None
    assert mk.load_model(tmp_path / "model.safetensors").fc1.in_features == 200
    assert mk.model_info(tmp_path / "base.safetensors")["widths"] is None


# --------------------------------------------------------------------------- architectures and text

_ARCH_KEYS = ["num_classes", "in_chans", "hidden", "widths", "blocks", "in_channels", "checkpoint_path",
              "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "global_pool",
              "img_size", "depth", "drop_rate", "__class__", "", "x" * 200]
_ARCH_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
    | st.sampled_from(["avg", "/etc/passwd", "../x.pth", "hf-hub:timm/x", "file:///x", "a" * 100, "\x1b[31m"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=FAST // 2, derandomize=True, **_common)
@given(source=st.sampled_from(["morphkit", "timm"]),
       name=st.sampled_from(["lenet5", "mlp", "resnet20", "resnet10t", "hf-hub:x/y",
                             "local-dir:/tmp", "../lenet5", ""]),
       kwargs=st.dictionaries(st.sampled_from(_ARCH_KEYS), _ARCH_VALUES, max_size=3))
def test_fuzz_arch(source, name, kwargs):
    """Any arch either builds a model within the bounds or raises MorphkitError; none reaches torch.load."""
    import pickle

    import morphkit.untrusted as untrusted
    from morphkit.models import build_from_arch
    from morphkit.untrusted import REGISTRY_KWARGS, TIMM_KWARGS

    def forbidden(*args, **kw):
        raise AssertionError("torch.load / pickle reached")

    limit = 1 << 24  # the bound under test, lowered so that no example allocates gigabytes
    with pytest.MonkeyPatch.context() as mp, _time_limit(HANG_S):
        mp.setattr(untrusted, "MAX_MODEL_ELEMENTS", limit)
        mp.setattr(torch, "load", forbidden)
        mp.setattr(pickle, "load", forbidden)
        mp.setattr(pickle, "loads", forbidden)
        try:
            model = build_from_arch({"source": source, "name": name, "kwargs": kwargs})
        except MorphkitError:
            return
    allowed = REGISTRY_KWARGS.get(name, frozenset()) if source == "morphkit" else TIMM_KWARGS
    assert set(kwargs) <= allowed
    assert sum(t.numel() for t in model.state_dict().values()) <= limit


@settings(max_examples=200, derandomize=True, **_common)
@given(text=st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=3000),
       limit=st.integers(20, 2500))
def test_fuzz_for_terminal(text, limit):
    """No control character, escape or lone surrogate survives, the result encodes as UTF-8 and is bounded."""
    import unicodedata

    from morphkit.untrusted import for_terminal

    out = for_terminal(text, limit)
    out.encode("utf-8")  # no lone surrogate
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in out)
    assert len(out) <= limit + 40


@settings(max_examples=100, derandomize=True, **_common)
@given(text=st.text(max_size=10_000))
def test_fuzz_error_length(text):
    from morphkit.errors import MAX_MESSAGE_CHARS, ConfigError

    assert len(str(ConfigError(text))) <= MAX_MESSAGE_CHARS


def teardown_module() -> None:
    if COUNTS:
        print("\nfuzz inputs tried:", COUNTS, "total", sum(COUNTS.values()))
