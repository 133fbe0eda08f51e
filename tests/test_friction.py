"""Small usability fixes: progress bars off when stderr is no terminal, readable clique lists, exports."""

import io
import sys

import torch

import morphkit as mk
from morphkit.fit import show_progress


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert show_progress(True) is False and show_progress(False) is False

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert show_progress(True) is True and show_progress(False) is False


def test_fit_writes_no_bar_to_a_non_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    mk.fit(mk.build_model("lenet5"), data, epochs=1, progress=True)
    assert "epoch 1/1" not in err.getvalue() and "\r" not in err.getvalue()


def test_cliques_print_as_a_table_and_repr_short():
    cs = mk.find_cliques(mk.build_model("lenet5"), torch.zeros(1, 1, 28, 28))
    assert isinstance(cs, list) and isinstance(cs, mk.CliqueList)
    table = str(cs)
    assert "fc1.weight[0]" in table and "resizable" in table and len(table.splitlines()) == len(cs) + 2
    assert repr(cs).startswith("CliqueList(6 cliques: 4 resizable") and len(repr(cs)) < 120
    assert len(repr(cs[3])) < 120 and "fc1" in repr(cs[3])


def test_count_params_and_version_from_the_package():
    assert mk.count_params(torch.nn.Linear(3, 2)) == 8
    assert isinstance(mk.__version__, str)
    assert mk.resize.__name__ == "resize" and callable(mk.fit) and callable(mk.smooth) and callable(mk.compare)
