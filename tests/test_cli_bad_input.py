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
def work(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("MORPHKIT_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
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
    (tmp_path / "evil.pth").write_bytes(b"not reached")
    hostile = {"source": "timm", "name": "resnet18", "kwargs": {"checkpoint_path": str(tmp_path / "evil.pth")}}
    for kind, name in (("base", "hostile"), ("manifold", "hostile-manifold")):
        tensors, meta = parts(valid_files()[kind])
        (tmp_path / f"{name}.safetensors").write_bytes(rewrite(tensors, dict(meta, arch=hostile)))
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "rgb" / split / "a").mkdir(parents=True)
        Image.new("RGB", (28, 28), (200, 10, 10)).save(tmp_path / "rgb" / split / "a" / "x.png")
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
                            ["is a model file of fixed width", "apply to manifolds only"]),
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
    "cliques negative input shape": (["cliques", "lenet5", "--input-shape", "-1,28,28"],
                                     ["1 to 8 positive sizes"]),
    "cliques absurd input shape": (["cliques", "lenet5", "--input-shape", "100000,100000,100000"],
                                   ["of at most 67,108,864 values"]),
    # code reached from a file or a spec: refused before anything is built
    "cliques spec with checkpoint_path": (["cliques", "timm:resnet18?checkpoint_path={d}/evil.pth"],
                                          ["model argument 'checkpoint_path' is not allowed"]),
    "cliques spec with pretrained": (["cliques", "timm:resnet18?pretrained=true"],
                                     ["model argument 'pretrained' is not allowed"]),
    "cliques huge registry model": (["cliques", "mlp?hidden=[100000,100000,100000]"],
                                    ["would hold 20,079,700,010 values"]),
    "info hostile arch": (["info", "{d}/hostile.safetensors"], ["'checkpoint_path' is not allowed"]),
    "eval hostile arch": (["eval", "{d}/hostile.safetensors", "--data", "embedded"], ["is not allowed"]),
    "export hostile manifold": (["export", "{d}/hostile-manifold.safetensors", "--width", "0.5", "-o",
                                 "{d}/out.safetensors"], ["'checkpoint_path' is not allowed"]),
    # inputs never overwritten
    "export overwrites its input": (["export", M, "--width", "0.5", "-o", M], ["would overwrite the input"]),
    "train overwrites its input": (["train", "{d}/base.safetensors", "--data", "embedded", "--epochs", "1", "-o",
                                    "{d}/base.safetensors"], ["would overwrite the input"]),
    "morph overwrites its input": (["morph", "{d}/base.safetensors", "--data", "embedded", "--steps", "1", "-o",
                                    "{d}/./base.safetensors"], ["would overwrite the input"]),
    "compare output under a file": (["compare", M, "--data", "embedded", "-o", "{d}/blocker/report"],
                                    ["cannot create report directory", "is a file, not a directory"]),
    # data that does not fit the model
    "eval RGB data on a 1-channel model": (["eval", "{d}/model.safetensors", "--data", "imagefolder:{d}/rgb"],
                                           ["the model cannot run on this data", "(1, 3, 28, 28)", "channels"]),
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


USAGE = {  # click refuses these before any work: exit 2, one "Error:" line
    "train --epochs 0": (["train", "lenet5", "--data", "embedded", "--epochs", "0", "-o", "{d}/o.safetensors"],
                         "--epochs"),
    "export --samples 10^9": (["export", M, "--width", "0.5", "--samples", "1000000000", "-o", "{d}/o.safetensors"],
                              "--samples"),
    "eval --samples 10^9": (["eval", M, "--width", "0.5", "--samples", "1000000000", "--data", "embedded"],
                            "--samples"),
    "morph --samples 10^9": (["morph", "lenet5", "--data", "embedded", "--samples", "1000000000", "-o",
                              "{d}/o.safetensors"], "--samples"),
    "compare -o a file": (["compare", M, "--data", "embedded", "-o", "{d}/blocker"], "is a file"),
    "morph --epochs -1": (["morph", "lenet5", "--data", "embedded", "--epochs", "-1", "-o", "{d}/o.safetensors"],
                          "--epochs"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_cli_usage_errors(work, case):
    args, option = USAGE[case]
    before = snapshot(work)
    res = CliRunner().invoke(main, [a.format(d=work) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and option in res.output
    assert snapshot(work) == before


def test_cli_info_sanitises_text_from_the_file(work):
    """ANSI escapes, control characters and lone surrogates in a file's metadata never reach the terminal raw."""
    tensors, meta = parts(valid_files()["model"])
    p = work / "ansi.safetensors"
    hostile = "\x1b[2J\x1b]0;pwned\x07red\rX\udcff\u202e"
    p.write_bytes(rewrite(tensors, dict(meta, user={"note": hostile, hostile: 1})))
    for args in (["info", str(p)], ["info", str(p), "--json"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert not any(c in res.output for c in "\x1b\x07\r\u202e") and "\udcff" not in res.output
    res = CliRunner().invoke(main, ["info", str(p)])
    assert "\\x1b[2J" in res.output and "red" in res.output


def test_cli_error_messages_are_short_and_clean(work):
    """An error quoting a huge or escape-laden input stays one short, printable line."""
    spec = "mlp?hidden=[" + ",".join(["-1"] * 50) + "]&" + "x" * 100_000 + "=\x1b[31m1"
    res = CliRunner().invoke(main, ["cliques", spec])
    assert res.exit_code == 1
    line = res.output.strip()
    assert "\n" not in line and "\x1b" not in line and len(line) <= 2100


def test_cli_unexpected_error_is_one_line(work, monkeypatch):
    """An exception no check anticipated still prints one line (and exit 1), not a traceback."""
    import morphkit.models as models

    def boom(spec):
        raise KeyError("something unforeseen")

    monkeypatch.setattr(models, "build_model", boom)
    res = CliRunner().invoke(main, ["cliques", "lenet5"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("error: unexpected KeyError") and len(res.output.splitlines()) == 1


def test_cli_config_from_stdin(work):
    """``--config -`` (and a pipe such as /dev/stdin) reads the config text; a bad one is one clear line."""
    args = ["morph", "lenet5", "--data", "embedded", "--config", "-", "-o", "{d}/o.safetensors"]
    res = CliRunner().invoke(main, [a.format(d=work) for a in args], input='{"train": {"lr": -1}}')
    assert res.exit_code == 1 and "train.lr: got -1" in res.output, res.output
    res = CliRunner().invoke(main, [a.format(d=work) for a in args], input="[1, 2]")
    assert res.exit_code == 1 and "expected a JSON object" in res.output, res.output
