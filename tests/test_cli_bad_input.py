"""Bad inputs on the command line: one ``error:`` line, exit code 1, no traceback, nothing written or lost.

The files are the same small LeNet-5 manifold and models as ``test_bad_input.py``.
Each case runs in a fresh directory holding copies of them plus an existing
output file, and checks that the directory is byte-identical afterwards (no new,
changed, half-written or temporary file).
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest
from _files import parts, rewrite, snapshot, valid_files
from click.testing import CliRunner

from morphkit.cli import main


@pytest.fixture
def work(tmp_path: Path) -> Path:
    for kind, data in valid_files().items():
        (tmp_path / f"{kind}.safetensors").write_bytes(data)
    (tmp_path / "existing.safetensors").write_bytes(valid_files()["model"])  # an output that must survive
    (tmp_path / "blocker").write_text("a regular file, not a directory")
    (tmp_path / "truncated.safetensors").write_bytes(valid_files()["manifold"][:5000])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    tensors, meta = parts(valid_files()["manifold"])
    (tmp_path / "newer.safetensors").write_bytes(rewrite(tensors, dict(meta, format="morphkit.manifold/9")))
    for name, text in {"bad.json": "{'train': {}}", "unknown.json": '{"train": {"epoch": 3}}',
                       "version.json": '{"version": 99}', "value.json": '{"train": {"lr": -1}}',
                       "list.json": "[1, 2]"}.items():
        (tmp_path / name).write_text(text)
    mnist = tmp_path / "mnist-bad"
    mnist.mkdir()
    for prefix, n in (("train", 2), ("t10k", 2)):
        (mnist / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 2051, n, 28, 28) + bytes(n * 28 * 28 - 7)))  # 7 bytes short
        (mnist / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 2049, n) + bytes(n)))
    return tmp_path


M = "{d}/manifold.safetensors"
CASES = {
    # widths
    "export width 0": (["export", M, "--width", "0", "-o", "{d}/existing.safetensors"],
                       ["width must be in (0, 1]", "got 0.0"]),
    "export width negative": (["export", M, "--width", "-0.5", "-o", "{d}/out.safetensors"],
                              ["width must be in (0, 1]", "got -0.5"]),
    "export width > 1": (["export", M, "--width", "1.5", "-o", "{d}/out.safetensors"], ["got 1.5"]),
    "export width nan": (["export", M, "--width", "nan", "-o", "{d}/out.safetensors"], ["got nan"]),
    "export width inf": (["export", M, "--width", "inf", "-o", "{d}/out.safetensors"], ["got inf"]),
    "export compression 1": (["export", M, "--compression", "1", "-o", "{d}/out.safetensors"],
                             ["--compression must be in [0, 1)", "got 1.0"]),
    "eval width on a model file": (["eval", "{d}/model.safetensors", "--width", "0.5", "--data", "embedded"],
                                   ["is a model file of fixed width", "manifolds only"]),
    "eval manifold without width": (["eval", M, "--data", "embedded"], ["is a manifold: pass --width W"]),
    # files
    "export missing manifold": (["export", "{d}/nope.safetensors", "--width", "0.5", "-o", "{d}/out.safetensors"],
                                ["does not exist"]),
    "export truncated manifold": (["export", "{d}/truncated.safetensors", "--width", "0.5", "-o",
                                   "{d}/existing.safetensors"], ["not a readable safetensors file"]),
    "export newer manifold": (["export", "{d}/newer.safetensors", "--width", "0.5", "-o", "{d}/out.safetensors"],
                              ["morphkit.manifold/9", "newer than this morphkit reads", "upgrade"]),
    "export a model file": (["export", "{d}/model.safetensors", "--width", "0.5", "-o", "{d}/out.safetensors"],
                            ["is a 'morphkit.model' file, expected a 'morphkit.manifold' file"]),
    "info garbage": (["info", "{d}/garbage.safetensors"], ["not a readable safetensors file"]),
    "info directory": (["info", "{d}"], ["is a directory"]),
    "eval truncated": (["eval", "{d}/truncated.safetensors", "--data", "embedded"], ["truncated or corrupt"]),
    # outputs
    "export output under a file": (["export", M, "--width", "0.5", "-o", "{d}/blocker/out.safetensors"],
                                   ["output directory", "blocker"]),
    "export output missing dir": (["export", M, "--width", "0.5", "-o", "{d}/nodir/out.safetensors"],
                                  ["output directory", "does not exist"]),
    "train output under a file": (["train", "lenet5", "--data", "embedded", "--epochs", "1", "-o",
                                   "{d}/blocker/base.safetensors"], ["output directory", "blocker"]),
    "morph output under a file": (["morph", "lenet5", "--data", "embedded", "--steps", "1", "-o",
                                   "{d}/blocker/m.safetensors"], ["output directory", "blocker"]),
    # data
    "eval unknown data scheme": (["eval", "{d}/model.safetensors", "--data", "foo:bar"],
                                 ["unknown data spec 'foo:bar'", "expected one of"]),
    "eval missing data dir": (["eval", "{d}/model.safetensors", "--data", "mnist:{d}/nodata"],
                              ["is not a directory", "mnist:DIR"]),
    "eval corrupt idx": (["eval", "{d}/model.safetensors", "--data", "mnist:{d}/mnist-bad"],
                         ["truncated", "re-download"]),
    "train missing data": (["train", "lenet5", "--data", "cifar10:{d}/none.tar.gz", "--epochs", "1", "-o",
                            "{d}/out.safetensors"], ["does not exist"]),
    # configs
    "morph non-JSON config": (["morph", "lenet5", "--data", "embedded", "--config", "{d}/bad.json", "-o",
                               "{d}/out.safetensors"], ["config is not valid JSON"]),
    "morph config unknown key": (["morph", "lenet5", "--data", "embedded", "--config", "{d}/unknown.json", "-o",
                                  "{d}/out.safetensors"], ["unknown config key(s) ['epoch'] in 'train'"]),
    "morph config version": (["morph", "lenet5", "--data", "embedded", "--config", "{d}/version.json", "-o",
                              "{d}/out.safetensors"], ["config version 99 is not supported"]),
    "morph config bad value": (["morph", "lenet5", "--data", "embedded", "--config", "{d}/value.json", "-o",
                                "{d}/out.safetensors"], ["train.lr: got -1", "expected a finite float > 0"]),
    "morph config not an object": (["morph", "lenet5", "--data", "embedded", "--config", "{d}/list.json", "-o",
                                    "{d}/out.safetensors"], ["config: got list, expected a JSON object"]),
    "morph config is a directory": (["morph", "lenet5", "--data", "embedded", "--config", "{d}", "-o",
                                     "{d}/out.safetensors"], ["is a directory; expected a JSON file"]),
    # models
    "cliques wrong input shape": (["cliques", "lenet5", "--input-shape", "3,32,32"],
                                  ["forward fails on example_inputs", "(1, 3, 32, 32)"]),
    "cliques bad input shape": (["cliques", "lenet5", "--input-shape", "three"],
                                ["--input-shape: got 'three', expected C,H,W"]),
    "cliques bad model kwargs": (["cliques", "mlp?hidden=[-1]"], ["bad arguments", "'hidden': [-1]"]),
    "morph unknown model": (["morph", "lenet6", "--data", "embedded", "-o", "{d}/out.safetensors"],
                            ["unknown model 'lenet6'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input(work, case):
    args, fragments = CASES[case]
    args = [a.format(d=work) for a in args]
    before = snapshot(work)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    assert snapshot(work) == before, "the command wrote, changed or removed files"


def test_cli_info_json_survives_odd_metadata(work):
    """Fields a manifold does not use (``user``) of an unexpected type do not crash ``info``."""
    tensors, meta = parts(valid_files()["manifold"])
    p = work / "odd.safetensors"
    p.write_bytes(rewrite(tensors, dict(meta, user=[1, 2])))
    res = CliRunner().invoke(main, ["info", str(p)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["info", str(p), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["metadata"]["user"] == [1, 2]
