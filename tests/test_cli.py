"""The CLI through click's CliRunner: every command, error lines and exit codes."""

import json

import pytest
from click.testing import CliRunner

from morphkit.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    r = CliRunner()
    res = r.invoke(main, ["train", "mlp?hidden=[16,8]", "--data", "embedded", "--epochs", "1", "-o",
                          str(d / "base.safetensors"), "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = d / "cfg.json"
    cfg.write_text(json.dumps({"inr": {"hidden": 16, "layers": 2, "n_freqs": 4},
                               "train": {"eval_compressions": [0.0, 0.5]}, "samples": 2}))
    res = r.invoke(main, ["morph", str(d / "base.safetensors"), "--data", "embedded", "--steps", "3",
                          "--config", str(cfg), "-o", str(d / "m.morph.safetensors"), "--no-progress"])
    assert res.exit_code == 0, res.output
    return d


def test_train_reports_accuracy(files):
    assert (files / "base.safetensors").is_file()


def test_train_in_bf16_writes_a_float32_model(tmp_path):
    out = tmp_path / "bf16.safetensors"
    res = CliRunner().invoke(main, ["train", "lenet5", "--data", "embedded", "--epochs", "1", "--precision", "bf16",
                                    "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", str(out), "--data", "embedded"])
    assert res.exit_code == 0 and "accuracy" in res.output
    res = CliRunner().invoke(main, ["train", "lenet5", "--data", "embedded", "--precision", "fp8", "-o", str(out)])
    assert res.exit_code != 0 and "fp8" in res.output


def test_export_and_eval_fold_unseen_widths(files):
    r = CliRunner()
    out = files / "w10.safetensors"
    res = r.invoke(main, ["export", str(files / "m.morph.safetensors"), "--width", "0.1", "--unseen", "fold",
                          "-o", str(out)])
    assert res.exit_code == 0, res.output
    import morphkit as mk

    assert mk.model_info(out)["user"]["unseen"] == "fold"
    res = r.invoke(main, ["eval", str(files / "m.morph.safetensors"), "--width", "0.1", "--unseen", "fold",
                          "--samples", "2", "--data", "embedded"])
    assert res.exit_code == 0 and "accuracy" in res.output, res.output
    res = r.invoke(main, ["eval", str(out), "--unseen", "fold", "--data", "embedded"])
    assert res.exit_code != 0 and "apply to manifolds only" in res.output
    res = r.invoke(main, ["export", str(files / "m.morph.safetensors"), "--width", "0.1", "--unseen", "guess",
                          "-o", str(out)])
    assert res.exit_code != 0 and "guess" in res.output


def test_morph_reports_widths(files):
    r = CliRunner().invoke(main, ["info", str(files / "m.morph.safetensors")])
    assert r.exit_code == 0 and "morphkit.manifold/1" in r.output and "INR:" in r.output, r.output
    assert "trained:" in r.output and "{" not in r.output  # readable, no raw dicts


def test_export_eval_info(files):
    r = CliRunner()
    out = files / "w50.safetensors"
    res = r.invoke(main, ["export", str(files / "m.morph.safetensors"), "--compression", "0.5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["eval", str(out), "--data", "embedded"])
    assert res.exit_code == 0 and "accuracy" in res.output
    res = r.invoke(main, ["eval", str(files / "m.morph.safetensors"), "--width", "0.5", "--samples", "2",
                          "--data", "embedded"])
    assert res.exit_code == 0 and "@ width 0.5" in res.output
    res = r.invoke(main, ["info", str(out), "--json"])
    meta = json.loads(res.output)
    assert meta["metadata"]["widths"] and meta["params"] > 0


def test_cliques_table():
    res = CliRunner().invoke(main, ["cliques", "lenet5"])
    assert res.exit_code == 0 and "120" in res.output and "output" in res.output


@pytest.mark.parametrize("args,needle", [
    (["export", "{m}", "--width", "0", "-o", "{d}/x.safetensors"], "width must be in (0, 1]"),
    (["export", "{m}", "--width", "1.5", "-o", "{d}/x.safetensors"], "width must be in (0, 1]"),
    (["export", "{d}/missing.safetensors", "--width", "0.5", "-o", "{d}/x.safetensors"], "does not exist"),
    (["export", "{m}", "--width", "0.5", "-o", "{d}/nodir/x.safetensors"], "does not exist"),
    (["eval", "{m}", "--data", "embedded"], "pass --width"),
    (["eval", "{d}/base.safetensors", "--data", "mnist:/nonexistent"], "error:"),
    (["train", "nosuchmodel", "--data", "embedded", "-o", "{d}/x.safetensors"], "unknown model"),
    (["morph", "{d}/base.safetensors", "--data", "embedded", "--config", "{d}/missing.json", "-o",
      "{d}/x.safetensors"], "does not exist"),
])
def test_errors_are_one_line_exit_1(files, args, needle):
    args = [a.format(m=files / "m.morph.safetensors", d=files) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (files / "x.safetensors").exists()


def test_bad_arguments_exit_2(files):
    r = CliRunner()
    assert r.invoke(main, ["export", str(files / "m.morph.safetensors"), "-o", "x"]).exit_code == 2
    assert r.invoke(main, ["train"]).exit_code == 2
    assert r.invoke(main, ["export", "m", "--width", "abc", "-o", "x"]).exit_code == 2
