"""compare(), write_report() and `morphkit compare` on a tiny LeNet-5 manifold (embedded MNIST slice)."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from click.testing import CliRunner

import morphkit as mk
from morphkit.cli import main
from morphkit.compare import compare, count_macs, write_report
from morphkit.errors import ConfigError

X = torch.zeros(1, 1, 28, 28)
CFG = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                     train=mk.TrainConfig(steps=3, compression=(0.0, 0.5), eval_compressions=()), samples=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    splits = mk.load_data("embedded")
    train_dl, test_dl = mk.make_loaders(splits, batch_size=32, limit=64, test_limit=64, seed=0)
    base = mk.build_model("lenet5")
    manifold = mk.morph(base, train_dl, example_inputs=X, config=CFG, progress=False)
    d = tmp_path_factory.mktemp("compare")
    manifold.save(d / "m.morph.safetensors")
    mk.save_model(base, d / "base.safetensors")
    return manifold, base, train_dl, test_dl, d


@pytest.fixture(scope="module")
def rows(setup):
    manifold, base, train_dl, test_dl, _ = setup
    return compare(manifold, test_dl, ["neumeta", "l1", "random", "taylor"], [0, 0.5, 0.75], base=base,
                   train_data=train_dl, progress=False, batches=1)


def test_rows_cover_every_method_and_compression(rows):
    assert len(rows) == 12
    assert {(r["method"], r["compression"]) for r in rows} == {
        (m, g) for m in ("neumeta", "l1", "random", "taylor") for g in (0.0, 0.5, 0.75)}
    for r in rows:
        assert r["metric"] == "accuracy" and 0 <= r["value"] <= 1 and r["value"] == r["accuracy"]
        assert r["trained"] == (r["compression"] <= 0.5)
        assert r["width"] == pytest.approx(1 - r["compression"])
        assert r["macs"] > 0 and r["n"] == 64
        json.dumps(r)  # plain data


def test_same_size_at_each_compression(rows):
    for g in (0.0, 0.5, 0.75):
        sizes = {(r["params"], r["macs"]) for r in rows if r["compression"] == g}
        assert len(sizes) == 1, sizes
        assert not any(r.get("size_mismatch") for r in rows)
    p = {g: next(r["params"] for r in rows if r["compression"] == g) for g in (0.0, 0.5, 0.75)}
    assert p[0.0] == mk.export.count_params(mk.build_model("lenet5")) > p[0.5] > p[0.75]


def test_pruning_at_zero_compression_is_the_base(setup, rows):
    _, base, _, test_dl, _ = setup
    acc = mk.evaluate(base, test_dl)["accuracy"]
    for r in rows:
        if r["method"] != "neumeta" and r["compression"] == 0:
            assert r["value"] == acc and r["pruned_from"] == "base"


def test_report_files(rows, tmp_path):
    paths = write_report(rows, tmp_path / "out", meta={"seed": 0})
    assert set(paths) == {"md", "json", "png"}
    md = paths["md"].read_text()
    assert "| method | 0% | 50% | 75% * |" in md and "| neumeta |" in md and "seed: 0" in md
    assert json.loads(paths["json"].read_text())["rows"] == json.loads(json.dumps(rows))
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib(rows, tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING, logger="morphkit.compare"):
        paths = write_report(rows, tmp_path)
    assert set(paths) == {"md", "json"} and not (tmp_path / "accuracy.png").exists()
    assert "matplotlib is not installed" in caplog.text


def test_plain_model_with_training_baselines(setup):
    _, base, train_dl, test_dl, _ = setup
    out = compare(base, test_dl, "l2,individual,slimmable", "0.25,0.5", example_inputs=X, train_data=train_dl,
                  train_epochs=1, progress=False)
    assert [(r["method"], r["compression"]) for r in out] == [
        ("l2", 0.25), ("l2", 0.5), ("individual", 0.25), ("individual", 0.5), ("slimmable", 0.25),
        ("slimmable", 0.5)]
    assert all(r["trained"] is None for r in out)
    for g in (0.25, 0.5):
        assert len({r["params"] for r in out if r["compression"] == g}) == 1


def test_bad_inputs(setup):
    manifold, base, train_dl, test_dl, _ = setup
    with pytest.raises(ConfigError, match="unknown method"):
        compare(manifold, test_dl, ["l3"], [0.5], progress=False)
    for g in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="compression"):
            compare(manifold, test_dl, ["l1"], [g], progress=False)
    with pytest.raises(ConfigError, match="needs a Manifold"):
        compare(base, test_dl, ["neumeta"], [0.5], example_inputs=X, progress=False)
    with pytest.raises(ConfigError, match="train_data"):
        compare(manifold, test_dl, ["individual"], [0.5], progress=False)
    with pytest.raises(ConfigError, match="train_data"):
        compare(manifold, test_dl, ["l1"], [0.5], finetune_epochs=1, progress=False)
    with pytest.raises(ConfigError, match="no rows"):
        write_report([], "unused")


def test_count_macs_lenet():
    assert count_macs(mk.build_model("lenet5"), X) == count_macs(mk.build_model("lenet5"), torch.zeros(4, 1, 28, 28))


def test_cli_compare(setup, tmp_path):
    _, _, _, _, d = setup
    out = tmp_path / "report"
    res = CliRunner().invoke(main, [
        "compare", str(d / "m.morph.safetensors"), "--data", "embedded", "--methods", "neumeta,l1,random",
        "--compression", "0,0.5,0.75", "--samples", "2", "--limit", "64", "--test-limit", "64",
        "--base", str(d / "base.safetensors"), "--no-progress", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "| neumeta |" in res.output
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "accuracy.png"}
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert len(rows) == 9 and {r["pruned_from"] for r in rows if r["method"] == "l1"} == {"base"}


def test_cli_compare_errors(setup, tmp_path):
    _, _, _, _, d = setup
    res = CliRunner().invoke(main, ["compare", str(d / "m.morph.safetensors"), "--data", "embedded",
                                    "--methods", "l1,bogus", "-o", str(tmp_path / "r")])
    assert res.exit_code == 1 and res.output.startswith("error: unknown method 'bogus'")


def test_neumeta_rows_fold_unseen_widths_on_request(setup, rows):
    manifold, base, train_dl, test_dl, _ = setup
    folded = compare(manifold, test_dl, ["neumeta"], [0.5, 0.75], base=base, progress=False, unseen="fold")
    plain = {r["compression"]: r for r in rows if r["method"] == "neumeta"}
    by = {r["compression"]: r for r in folded}
    assert all(r["unseen"] == "fold" for r in folded) and plain[0.75]["unseen"] == "inr"
    assert by[0.5]["value"] == plain[0.5]["value"]  # inside the trained range nothing is folded
    assert by[0.75]["params"] == plain[0.75]["params"]
    with pytest.raises(ConfigError, match="unseen"):
        compare(manifold, test_dl, ["neumeta"], [0.75], base=base, progress=False, unseen="maybe")


def test_report_disk_full_keeps_the_old_report(rows, tmp_path, monkeypatch):
    """Every report file is written atomically: a full disk leaves the previous report whole."""
    import errno
    import os

    from morphkit.errors import CheckpointError

    out = tmp_path / "out"
    write_report(rows, out, meta={"seed": 0})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        write_report(rows, out, meta={"seed": 1})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no .tmp left, nothing truncated


def test_report_directory_under_a_file(rows, tmp_path):
    from morphkit.errors import CheckpointError

    (tmp_path / "blocker").write_text("x")
    with pytest.raises(CheckpointError, match="cannot create report directory"):
        write_report(rows, tmp_path / "blocker" / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]
