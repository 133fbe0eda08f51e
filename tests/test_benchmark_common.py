"""The benchmarks' shared helpers: reusing baseline rows keeps their provenance."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import metric_table, reused_baselines  # noqa: E402

ROWS = [{"method": "neumeta", "acc": 1.0}, {"method": "l1", "acc": 0.5}]


def _write(tmp_path, meta):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": meta, "rows": ROWS}))
    return str(path)


def test_reused_rows_name_the_run_that_measured_them(tmp_path):
    first = _write(tmp_path, {"machine": "box A, 21:31", "seed": 0})
    meta, rows = reused_baselines(first, {"seed": 0})
    assert meta["baselines_measured"] == "box A, 21:31" and rows == ROWS[1:]
    # a result that itself reused its baselines points back to the run that measured them
    second = _write(tmp_path, {"machine": "box B (1 torch threads), 01:36", "seed": 0,
                               "baselines": "every row but NeuMeta's reused from r.json "
                                            "(measured box A (2 torch threads), 21:31)"})
    meta, _ = reused_baselines(second, {"seed": 0})
    assert meta["baselines_measured"] == "box A (2 torch threads), 21:31"


def test_reuse_refuses_a_different_run(tmp_path):
    path = _write(tmp_path, {"machine": "box", "seed": 1})
    with pytest.raises(SystemExit, match="seed: 1 there, 0 here"):
        reused_baselines(path, {"seed": 0})


def test_metric_table_lists_each_method_and_stars_untrained_widths():
    rows = [{"method": m, "compression": g, "trained": g < 0.7, "nll": v}
            for m, base in (("neumeta", 1.0), ("l1", 2.0)) for g, v in ((0.0, base), (0.75, base + 0.5))]
    lines = metric_table(rows, "nll", "NLL:", (0.0, 0.75), scale=10.0)
    assert lines[1] == "NLL:" and lines[3] == "| method | 0% | 75% * |"
    assert lines[5:] == ["| neumeta | 10.00 | 15.00 |", "| l1 | 20.00 | 25.00 |"]

