import pytest
import torch

import morphkit as mk
from morphkit.clique import width_map
from morphkit.coords import CoordBuilder, _dims_of, fourier_features, plan_layouts, resize_static
from morphkit.inr import INR, bilinear_rows


@pytest.fixture(scope="module")
def lenet_plan():
    m = mk.build_model("lenet5").eval()
    cliques = mk.find_cliques(m, torch.zeros(1, 1, 28, 28))
    state = m.state_dict()
    layouts, static = plan_layouts(cliques, state, {n for n, _ in m.named_parameters()})
    return m, cliques, state, layouts, static


def test_plan_predicts_every_resizable_tensor(lenet_plan):
    _, _, _, layouts, static = lenet_plan
    names = [lt.name for lt in layouts]
    assert "fc1.weight" in names and "conv1.weight" in names and "fc3.weight" in names
    assert static == ["fc3.bias"]  # the only tensor no width changes
    fc1 = next(lt for lt in layouts if lt.name == "fc1.weight")
    assert fc1.trailing == 25  # 5x5 spatial positions per flattened channel


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 0.2])
def test_rows_round_trip_at_any_width(lenet_plan, width):
    _, cliques, state, layouts, _ = lenet_plan
    b = CoordBuilder(layouts, cliques)
    counts = width_map(cliques, width)
    table = b.table(counts)
    dims = _dims_of(cliques)
    small = mk.resize(mk.build_model("lenet5"), torch.zeros(1, 1, 28, 28), width).state_dict()
    for k, lt in enumerate(layouts):
        ref = resize_static(state[lt.name], lt.name, dims, counts)
        assert ref.shape == small[lt.name].shape
        rows = b.to_rows(k, table, ref)
        assert torch.equal(b.assemble(k, table, rows), ref)
    assert table.coords.shape == (sum(e - s for s, e in table.segments), 6)
    assert (table.coords >= 0).all() and (table.coords <= 1).all()
    assert b.table(counts) is table  # cached


def test_cell_centres_interleave():
    cl = [mk.Clique(0, 4, [mk.Member("w", 0)])]
    from morphkit.coords import DimSpec, TensorLayout

    lt = TensorLayout("w", (4,), (DimSpec(0, 0, None, 1, 4, True),), 0, 0, 1.0)
    b = CoordBuilder([lt], cl)
    assert b.table({0: 4}).coords[:, 1].tolist() == [0.125, 0.375, 0.625, 0.875]
    assert b.table({0: 2}).coords[:, 1].tolist() == [0.25, 0.75]
    assert b.table({0: 2}).coords[:, 3].tolist() == [0.5, 0.5]  # current width column


def test_fourier_features():
    f = fourier_features(torch.tensor([[0.25]]), 3)
    import math

    expect = [0.25] + [math.sin(2**j * math.pi * 0.25) for j in range(3)] + [math.cos(2**j * math.pi * 0.25)
                                                                              for j in range(3)]
    assert torch.allclose(f[0], torch.tensor(expect), atol=1e-6)


def test_bilinear_rows_matches_manual():
    g = torch.randn(3, 4, 2)
    # exact cell centres reproduce the grid
    uo = (torch.arange(3).repeat_interleave(4) + 0.5) / 3
    ui = (torch.arange(4).repeat(3) + 0.5) / 4
    assert torch.allclose(bilinear_rows(g, uo, ui), g.reshape(12, 2))
    # halfway between out channels 0 and 1, at in channel 2
    mid = bilinear_rows(g, torch.tensor([1.0 / 3]), torch.tensor([2.5 / 4]))
    assert torch.allclose(mid[0], (g[0, 2] + g[1, 2]) / 2, atol=1e-6)


def test_residual_inr_starts_at_the_base(lenet_plan):
    m, cliques, state, layouts, _ = lenet_plan
    from morphkit.manifold import build_inr, predict_tensors

    inr = build_inr(layouts, mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2)))
    b = CoordBuilder(layouts, cliques)
    inr.set_grids([b.grid(k, state[lt.name]) for k, lt in enumerate(layouts)])
    pred = predict_tensors(inr, b, b.table(b.full()))
    for lt in layouts:
        assert torch.allclose(pred[lt.name], state[lt.name], atol=1e-6), lt.name


def test_inr_heads_batch_over_segments():
    inr = INR([3, 1], hidden=8, layers=2, n_freqs=2)
    outs = inr(torch.rand(7, 6), [(0, 5), (5, 7)])
    assert [tuple(o.shape) for o in outs] == [(5, 3), (2, 1)]
