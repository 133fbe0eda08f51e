"""CLI for deployment and driving without JSON: startup without torch, `config`, training flags on
`morph`, `--threads`, `export --format onnx / --round-to`, untrained-width warnings, compare's base line."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from morphkit.cli import main

PROBE = """
import sys
from morphkit.cli import main
try:
    main({args!r})
except SystemExit as e:
    code = e.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""


@pytest.mark.parametrize("args,code", [
    (["--help"], 0),
    (["morph", "--help"], 0),
    (["export", "--help"], 0),
    (["export"], 2),  # a usage error
    (["morph", "m", "--data", "embedded", "--epochs", "x", "-o", "o"], 2),
    (["config"], 0),
    (["--version"], 0),
])
def test_help_and_usage_errors_do_not_import_torch(args, code):
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip().splitlines()[-1] == f"NO-TORCH {code}", out.stdout + out.stderr


def test_python_m_morphkit_help_is_fast_and_torch_free():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "morphkit", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "Usage" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "morphkit.cli" in imported


def test_config_prints_the_full_default_config_as_json(tmp_path):
    import morphkit as mk

    res = CliRunner().invoke(main, ["config"])
    assert res.exit_code == 0
    d = json.loads(res.output)
    assert mk.MorphConfig.from_dict(d) == mk.MorphConfig()
    assert {"inr", "train", "smooth", "samples"} <= set(d)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A manifold of a tiny MLP trained with flags only (no JSON), compression range 0-0.5."""
    d = tmp_path_factory.mktemp("deploy")
    r = CliRunner()
    res = r.invoke(main, ["train", "mlp?hidden=[32,16]", "--data", "embedded", "--epochs", "1", "--threads", "1",
                          "-o", str(d / "base.safetensors"), "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = d / "small.json"
    cfg.write_text(json.dumps({"inr": {"hidden": 16, "layers": 2, "n_freqs": 4},
                               "train": {"eval_compressions": [0.0, 0.5], "steps": 50}, "samples": 2}))
    res = r.invoke(main, ["morph", str(d / "base.safetensors"), "--data", "embedded", "--config", str(cfg),
                          "--steps", "3", "--compression-range", "0,0.5", "--lr", "0.002", "--samples", "3",
                          "--seed", "1", "--precision", "fp32", "--threads", "1", "--batch-size", "64",
                          "-o", str(d / "m.morph.safetensors"), "--no-progress"])
    assert res.exit_code == 0, res.output
    return d


def test_morph_flags_override_the_config(run):
    import morphkit as mk

    m = mk.Manifold.load(run / "m.morph.safetensors")
    assert m.config.train.compression == (0.0, 0.5)
    assert m.config.train.lr == 0.002 and m.config.train.steps == 3 and m.config.train.seed == 1
    assert m.config.samples == 3 and m.config.inr.hidden == 16  # the rest from --config


@pytest.mark.parametrize("args,needle", [
    (["--compression-range", "0.5"], "LO,HI"),
    (["--compression-range", "0.6,0.2"], "train.compression"),
    (["--precision", "fp8"], "fp8"),
    (["--threads", "0"], "--threads"),
    (["--epochs", "0"], "--epochs"),
])
def test_morph_flag_errors(run, args, needle):
    res = CliRunner().invoke(main, ["morph", str(run / "base.safetensors"), "--data", "embedded", *args,
                                    "-o", str(run / "x.safetensors")])
    assert res.exit_code in (1, 2) and needle in res.output and "Traceback" not in res.output
    assert not (run / "x.safetensors").exists()


def test_threads_sets_torch_threads(run):
    import torch

    before = torch.get_num_threads()
    try:
        res = CliRunner().invoke(main, ["eval", str(run / "base.safetensors"), "--data", "embedded",
                                        "--threads", "1"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_export_onnx_with_round_to(run):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import morphkit as mk

    out = run / "w60.onnx"
    res = CliRunner().invoke(main, ["export", str(run / "m.morph.safetensors"), "--width", "0.6", "--round-to",
                                    "8", "--samples", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "ONNX" in res.output and "multiples of 8" in res.output
    meta = mk.onnx_info(out)["metadata"]
    m = mk.Manifold.load(run / "m.morph.safetensors")
    resizable = [c.id for c in m.cliques if not c.fixed]
    assert all(meta["widths"][str(i)] % 8 == 0 for i in resizable)
    assert meta["source"] == str(run / "m.morph.safetensors") and meta["user"]["round_to"] == 8
    # a model file converts as it is
    res = CliRunner().invoke(main, ["export", str(run / "base.safetensors"), "--format", "onnx",
                                    "-o", str(run / "base.model")])
    assert res.exit_code == 0, res.output
    assert mk.onnx_info(run / "base.model")["metadata"]["source"] == str(run / "base.safetensors")
    res = CliRunner().invoke(main, ["export", str(run / "base.safetensors"), "--width", "0.5", "-o",
                                    str(run / "x.onnx")])
    assert res.exit_code == 1 and "apply to manifolds only" in res.output


def test_export_safetensors_round_to_and_untrained_warning(run):
    import morphkit as mk

    out = run / "w10.safetensors"
    res = CliRunner().invoke(main, ["export", str(run / "m.morph.safetensors"), "--width", "0.1", "--round-to",
                                    "4", "--samples", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "warning: width outside the trained range" in res.output
    assert res.output.count("warning: width outside the trained range") == 1
    info = mk.model_info(out)
    m = mk.Manifold.load(run / "m.morph.safetensors")
    assert info["user"]["round_to"] == 4
    assert all(info["widths"][str(c.id)] % 4 == 0 for c in m.cliques if not c.fixed)
    res = CliRunner().invoke(main, ["export", str(run / "m.morph.safetensors"), "--width", "0.5", "--opset", "17",
                                    "-o", str(run / "x.safetensors")])
    assert res.exit_code == 2 and "--opset" in res.output
    res = CliRunner().invoke(main, ["export", str(run / "m.morph.safetensors"), "--width", "0.5", "--round-to",
                                    "0", "-o", str(run / "x.safetensors")])
    assert res.exit_code == 2 and "--round-to" in res.output


def test_eval_round_to(run):
    res = CliRunner().invoke(main, ["eval", str(run / "m.morph.safetensors"), "--width", "0.6", "--round-to", "8",
                                    "--samples", "2", "--data", "embedded"])
    assert res.exit_code == 0 and "accuracy" in res.output, res.output


def test_compare_reports_where_the_base_comes_from(run):
    res = CliRunner().invoke(main, ["compare", str(run / "m.morph.safetensors"), "--data", "embedded",
                                    "--methods", "neumeta,l1", "--compression", "0,0.5", "--samples", "2",
                                    "--test-limit", "64", "--threads", "1", "-o", str(run / "report"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "- base: the trained base stored in the manifold file" in res.output
    res = CliRunner().invoke(main, ["compare", str(run / "m.morph.safetensors"), "--data", "embedded",
                                    "--methods", "l1", "--compression", "0.5", "--base",
                                    str(run / "base.safetensors"), "--test-limit", "64", "-o", str(run / "report2"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"- base: {run / 'base.safetensors'} (--base)" in res.output


def test_info_prints_readable_tables(run):
    res = CliRunner().invoke(main, ["info", str(run / "m.morph.safetensors")])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "trained:" in out and "compression 0% to 50%" in out and "cliques:" in out
    assert "per clique: single cliques down to width 0.30" in out  # the default spread_below, spread 0.2
    assert "{" not in out and "'accuracy'" not in out  # no raw dicts
    assert "accuracy" in out and "%" in out  # per-width accuracies from training, formatted
    res = CliRunner().invoke(main, ["export", str(run / "m.morph.safetensors"), "--width", "0.5", "--samples", "2",
                                    "-o", str(run / "w50.safetensors")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["info", str(run / "w50.safetensors")])
    assert res.exit_code == 0, res.output
    assert "of the base's" in res.output and "channels per clique:" in res.output and "{" not in res.output
    assert "layers" in res.output and "(50%)" in res.output
    res = CliRunner().invoke(main, ["info", str(run / "base.safetensors")])
    assert res.exit_code == 0 and "metrics:" in res.output and "accuracy" in res.output and "{" not in res.output


def test_export_budget_search(run):
    import morphkit as mk

    m = mk.Manifold.load(run / "m.morph.safetensors")
    budget = mk.count_params(m.sample(0.7, samples=1))
    out = run / "searched.safetensors"
    res = CliRunner().invoke(main, ["export", str(run / "m.morph.safetensors"), "--params", str(budget), "--data",
                                    "embedded", "--search-images", "128", "--candidates", "4", "--samples", "2",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "searched" in res.output and "uniform width" in res.output
    info = mk.model_info(out)
    assert info["params"] <= budget and info["user"]["search"]["budget"] == {"params": budget}
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0 and "search:" in res.output and "uniform width" in res.output, res.output
    for args, needle in ((["--params", "10k"], "--data"), (["--params", "10k", "--width", "0.5", "--data", "embedded"],
                                                            "not both"),
                         (["--width", "0.5", "--data", "embedded"], "budget search"),
                         (["--params", "lots", "--data", "embedded"], "--params")):
        res = CliRunner().invoke(main, ["export", str(run / "m.morph.safetensors"), *args, "-o", str(run / "x.st")])
        assert res.exit_code in (1, 2) and needle in res.output, (args, res.output)


def test_info_of_an_onnx_file(run):
    pytest.importorskip("onnx")
    out = run / "w50.onnx"
    res = CliRunner().invoke(main, ["export", str(run / "m.morph.safetensors"), "--width", "0.5", "--samples", "2",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0 and "ONNX opset 17" in res.output and "batch" in res.output and "channels:" in res.output


def test_compare_with_a_searched_row(run):
    import json as _json

    res = CliRunner().invoke(main, ["compare", str(run / "m.morph.safetensors"), "--data", "embedded",
                                    "--methods", "neumeta,searched", "--compression", "0.25", "--samples", "2",
                                    "--limit", "256", "--test-limit", "64", "-o", str(run / "report3"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = _json.loads((run / "report3" / "report.json").read_text())["rows"]
    neu, srch = (next(r for r in rows if r["method"] == m) for m in ("neumeta", "searched"))
    assert srch["params"] <= neu["params"] and "search" in srch and "size_mismatch" not in srch
    assert "`searched`" in res.output and "MISMATCH" not in res.output
