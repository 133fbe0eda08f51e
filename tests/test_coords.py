import pytest
import torch

import morphkit as mk
from morphkit.clique import width_map
from morphkit.coords import CoordBuilder, _dims_of, fourier_features, plan_layouts, resize_static
from morphkit.inr import INR, area_weights, bilinear_rows


def _plan(name):
    m = mk.build_model(name).eval()
    cliques = mk.find_cliques(m, torch.zeros(1, 1, 28, 28))
    state = m.state_dict()
    layouts, static = plan_layouts(cliques, state, {n for n, _ in m.named_parameters()})
    return m, cliques, state, layouts, static


@pytest.fixture(scope="module")
def lenet_plan():
    return _plan("lenet5")


@pytest.fixture(scope="module", params=["lenet5", "vae_mnist"])
def any_plan(request):
    return _plan(request.param)


def test_plan_predicts_every_resizable_tensor(lenet_plan):
    _, _, _, layouts, static = lenet_plan
    names = [lt.name for lt in layouts]
    assert "fc1.weight" in names and "conv1.weight" in names and "fc3.weight" in names
    assert static == ["fc3.bias"]  # the only tensor no width changes
    fc1 = next(lt for lt in layouts if lt.name == "fc1.weight")
    assert fc1.trailing == 25  # 5x5 spatial positions per flattened channel
    # fixed dims (the input channel, the 10 classes) are trailing, not rows
    conv1 = next(lt for lt in layouts if lt.name == "conv1.weight")
    assert [r.dim for r in conv1.rows] == [0] and conv1.trailing == 25
    fc3 = next(lt for lt in layouts if lt.name == "fc3.weight")
    assert fc3.in_only and fc3.trailing == 10 and fc3.grid_shape == (1, 84, 10)


def test_fixed_dims_are_trailing_so_mlp_rows_stay_few():
    m, cliques, _, layouts, _ = _plan("vae_mnist")
    table = CoordBuilder(layouts, cliques).table(width_map(cliques, 1.0))
    n_weights = sum(lt.grid_shape[0] * lt.grid_shape[1] * lt.trailing for lt in layouts)
    assert table.rows * 50 < n_weights  # one row per hidden unit of a 784-wide layer, not per weight
    first = next(lt for lt in layouts if lt.shape == (400, 784))
    assert first.trailing == 784 and not first.in_only
    last = next(lt for lt in layouts if lt.shape == (784, 400))
    assert last.in_only and last.trailing == 784
    rows = table.coords[table.segments[layouts.index(last)][0]:table.segments[layouts.index(last)][1]]
    assert torch.equal(rows[:, 1], torch.full((400,), 0.5))  # no out coordinate: constant
    assert torch.allclose(rows[:, 2], (torch.arange(400) + 0.5) / 400)  # the fan-in channel


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 0.2])
def test_rows_round_trip_at_any_width(any_plan, width):
    m, cliques, state, layouts, _ = any_plan
    b = CoordBuilder(layouts, cliques)
    counts = width_map(cliques, width)
    table = b.table(counts)
    dims = _dims_of(cliques)
    small = mk.resize(m, torch.zeros(1, 1, 28, 28), width).state_dict()
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


def test_residual_inr_starts_at_the_base(any_plan):
    m, cliques, state, layouts, _ = any_plan
    from morphkit.manifold import build_inr, predict_tensors

    inr = build_inr(layouts, mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2)))
    b = CoordBuilder(layouts, cliques, factored=[r > 0 for r in inr.ranks])
    inr.set_grids([b.grid(k, state[lt.name]) for k, lt in enumerate(layouts)])
    pred = predict_tensors(inr, b, b.table(b.full()))
    for lt in layouts:
        assert torch.allclose(pred[lt.name], state[lt.name], atol=1e-6), lt.name


def test_inr_heads_batch_over_segments():
    inr = INR([3, 1], hidden=8, layers=2, n_freqs=2)
    outs = inr(torch.rand(7, 6), [(0, 5), (5, 7)])
    assert [tuple(o.shape) for o in outs] == [(5, 3), (2, 1)]


def test_contiguous_segments_split_once_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    inr = INR([3, 1, 2], hidden=8, layers=2, n_freqs=2)
    coords = torch.rand(10, 6)
    segs = [(0, 5), (5, 7), (7, 10)]
    outs = inr(coords, segs)  # contiguous: one split of the trunk's output
    loss = sum((o * (k + 1)).pow(2).sum() for k, o in enumerate(outs))
    grads = torch.autograd.grad(loss, list(inr.parameters()), allow_unused=True)
    h = inr.trunk(coords)  # the reference: one slice per segment
    ref = [inr.head(k, h[s:e], coords[s:e], None, None, None) for k, (s, e) in enumerate(segs)]
    ref_loss = sum((o * (k + 1)).pow(2).sum() for k, o in enumerate(ref))
    ref_grads = torch.autograd.grad(ref_loss, list(inr.parameters()), allow_unused=True)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, ref_grads))
    gap = inr(coords, [(0, 5), (7, 10)], which=[0, 2])  # not contiguous: sliced
    assert torch.equal(gap[1], ref[2])


@pytest.mark.parametrize("base_noise", [True, False])
def test_base_noise_option_decides_where_the_residual_base_is_read(lenet_plan, base_noise):
    m, cliques, state, layouts, _ = lenet_plan
    from morphkit.manifold import build_inr, predict_tensors

    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, base_noise=base_noise, resample="bilinear"))
    inr = build_inr(layouts, cfg)
    b = CoordBuilder(layouts, cliques)
    inr.set_grids([b.grid(k, state[lt.name]) for k, lt in enumerate(layouts)])
    pred = predict_tensors(inr, b, b.table(b.full()), noise=0.4, generator=torch.Generator().manual_seed(0))
    same = all(torch.allclose(pred[lt.name], state[lt.name], atol=1e-6) for lt in layouts)
    assert same is (not base_noise)  # heads are zero: only the base term is left


def test_bfloat16_precision_keeps_the_base_exact_and_the_correction_close(lenet_plan):
    m, cliques, state, layouts, _ = lenet_plan
    from morphkit.manifold import build_inr, factor_ranks, predict_tensors

    b = CoordBuilder(layouts, cliques, factored=[r > 0 for r in factor_ranks(layouts, mk.MorphConfig())])
    table = b.table(width_map(cliques, 0.6))
    preds = []
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        inr = build_inr(layouts, mk.MorphConfig(inr=mk.INRConfig(hidden=32, layers=2, precision=precision)))
        inr.set_grids([b.grid(k, state[lt.name]) for k, lt in enumerate(layouts)])
        full = predict_tensors(inr, b, b.table(b.full()))
        assert all(torch.equal(full[lt.name], state[lt.name]) for lt in layouts)  # zero heads: the base, float32
        for head in inr.heads:  # a non-zero correction
            torch.nn.init.normal_(head.weight, std=0.1)
        preds.append(predict_tensors(inr, b, table))
    for lt in layouts:
        a, c = preds[0][lt.name], preds[1][lt.name]
        assert c.dtype == torch.float32 and not torch.equal(a, c)
        assert (a - c).norm() <= 0.02 * a.norm(), lt.name


def test_trunk_with_precomputed_fixed_part_matches_the_full_embedding():
    inr = INR([9, 1], hidden=32, layers=3, n_freqs=5)
    rows = torch.rand(20, 6)
    draws = rows.repeat(3, 1)  # three "draws" of the same rows
    draws[:, 1:3] += 0.01 * torch.randn(60, 2)  # noise moves only the channel columns
    with torch.no_grad():
        fixed = inr.fixed_part(rows)  # (20, 32)
        assert torch.allclose(inr.trunk(draws, fixed), inr.trunk(draws), atol=1e-5)
    h = inr.trunk(draws, inr.fixed_part(rows))  # with autograd: no in-place ops on the graph
    h.sum().backward()
    assert inr.inp.weight.grad is not None and inr.inp.weight.grad.abs().sum() > 0


def test_area_weights_average_the_base_channels_each_cell_covers():
    assert torch.equal(area_weights(5, 5), torch.eye(5))
    for count, size in [(1, 7), (3, 6), (4, 6), (5, 16), (30, 120)]:
        a = area_weights(count, size)
        assert a.shape == (count, size) and torch.allclose(a.sum(1), torch.ones(count))
        assert torch.allclose(a.sum(0), torch.full((size,), count / size))  # every base channel counted once
    assert torch.allclose(area_weights(2, 3), torch.tensor([[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]]))


def _area_inr(lenet_plan, **kw):
    m, cliques, state, layouts, _ = lenet_plan
    from morphkit.manifold import build_inr

    inr = build_inr(layouts, mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, resample="area", **kw)))
    b = CoordBuilder(layouts, cliques, factored=[r > 0 for r in inr.ranks])
    inr.set_grids([b.grid(k, state[lt.name]) for k, lt in enumerate(layouts)])
    return inr, b, state


def test_area_base_merges_neighbouring_channels(lenet_plan):
    from morphkit.manifold import predict_tensors

    inr, b, state = _area_inr(lenet_plan)
    counts = {cid: c // 2 for cid, c in b.full().items() if not b.cliques[cid].fixed}  # every clique halved
    pred = predict_tensors(inr, b, b.table(counts), noise=0.4, generator=torch.Generator().manual_seed(0))
    w1, w2 = state["conv1.weight"], state["conv2.weight"]  # (6, 1, 5, 5), (16, 6, 5, 5)
    # out channels: each kept channel is the mean of a consecutive pair (noise never moves the area base)
    assert torch.allclose(pred["conv1.weight"], (w1[0::2] + w1[1::2]) / 2, atol=1e-6)
    # fan-in: the pair's mean times the fan-in factor 2, i.e. their sum, so the next layer sees the same total
    out_mean = (w2[0::2] + w2[1::2]) / 2  # (8, 6, 5, 5)
    assert torch.allclose(pred["conv2.weight"], out_mean[:, 0::2] + out_mean[:, 1::2], atol=1e-5)
    assert torch.allclose(pred["conv1.bias"], (state["conv1.bias"][0::2] + state["conv1.bias"][1::2]) / 2)
    full = predict_tensors(inr, b, b.table(b.full()), noise=0.4, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(full[k], state[k]) for k in full)  # base width: the grid itself


def test_area_base_gets_gradients_only_when_trainable(lenet_plan):
    from morphkit.manifold import predict_tensors

    for trainable in (False, True):
        inr, b, _ = _area_inr(lenet_plan, train_base=trainable)
        pred = predict_tensors(inr, b, b.table({cid: max(1, c // 3) for cid, c in b.full().items()
                                                 if not b.cliques[cid].fixed}))
        sum(t.pow(2).sum() for t in pred.values()).backward()
        assert isinstance(inr.grid0, torch.nn.Parameter) is trainable
        assert bool(inr.grid0.grad is not None and inr.grid0.grad.abs().sum() > 0) is trainable


def test_plain_matrices_are_factored_into_out_and_in_queries(lenet_plan):
    m, cliques, state, layouts, _ = lenet_plan
    from morphkit.manifold import factor_ranks

    ranks = factor_ranks(layouts, mk.MorphConfig())
    assert {lt.name for lt, r in zip(layouts, ranks) if r} == {"fc2.weight"}  # fc1 reads a flattened map
    assert factor_ranks(layouts, mk.MorphConfig(inr=mk.INRConfig(resample="bilinear"))) == [0] * len(layouts)
    assert factor_ranks(layouts, mk.MorphConfig(inr=mk.INRConfig(factor_rank=0))) == [0] * len(layouts)
    b = CoordBuilder(layouts, cliques, factored=[r > 0 for r in ranks])
    counts = width_map(cliques, 0.5)
    table = b.table(counts)
    k = [lt.name for lt in layouts].index("fc2.weight")
    c_out, c_in = table.cells[k]
    assert (c_out, c_in) == (42, 60)
    s, e = table.segments[k]
    assert e - s == c_out + c_in  # 102 queries, not 2520 rows
    q = table.coords[s:e]
    assert torch.allclose(q[:c_out, 1], (torch.arange(c_out) + 0.5) / c_out) and bool((q[:c_out, 2] == 0.5).all())
    assert torch.allclose(q[c_out:, 2], (torch.arange(c_in) + 0.5) / c_in) and bool((q[c_out:, 1] == 0.5).all())
    noise = table.noise[s:e]  # out queries move only their out column, in queries only their in column
    assert torch.allclose(noise[:c_out], torch.tensor([1 / c_out, 0.0]).expand(c_out, 2))
    assert torch.allclose(noise[c_out:], torch.tensor([0.0, 1 / c_in]).expand(c_in, 2))
    assert table.factored[k] and sum(table.factored) == 1


def test_factored_head_is_a_scaled_low_rank_product_on_the_base():
    inr = INR([1], hidden=8, layers=2, n_freqs=2, scales=[0.5], grid_shapes=[(3, 4, 1)], resample="area",
              ranks=[2])
    torch.nn.init.normal_(inr.heads[0].weight)
    torch.nn.init.normal_(inr.heads[0].bias)
    base = torch.randn(12, 1)
    coords = torch.rand(7, 6)  # 3 out queries, 4 in queries
    out = inr.head(0, inr.trunk(coords), coords, base=base, cells=(3, 4))
    z = inr.heads[0](inr.trunk(coords))  # (7, 4)
    want = (z[:3, :2] @ z[3:, 2:].T) / 2**0.5 * 0.5  # (3, 4)
    assert out.shape == (12, 1) and torch.allclose(out, want.reshape(12, 1) + base, atol=1e-6)
    # summing draws inside the head equals summing the per-draw outputs
    draws = torch.rand(5, 7, 6)
    h = inr.trunk(draws.reshape(35, 6)).reshape(5, 7, -1)
    each = inr.head(0, h, draws, base=base, cells=(3, 4))  # (5, 12, 1)
    assert torch.allclose(inr.head(0, h, draws, base=base, cells=(3, 4), sum_draws=True), each.sum(0), atol=1e-5)
    wide = INR([5], hidden=8, layers=2, n_freqs=2, grid_shapes=[(3, 4, 5)], resample="area", ranks=[2])
    torch.nn.init.normal_(wide.heads[0].weight)  # trailing 5: in queries emit (r, T)
    z = wide.heads[0](wide.trunk(coords))  # (7, 2 + 2 * 5)
    want = torch.einsum("or,irt->oit", z[:3, :2], z[3:, 2:].reshape(4, 2, 5)) / 2**0.5  # (3, 4, 5)
    got = wide.head(0, wide.trunk(coords), coords, base=torch.zeros(12, 5), cells=(3, 4))
    assert got.shape == (12, 5) and torch.allclose(got, want.reshape(12, 5), atol=1e-6)
    plain = INR([3], hidden=8, layers=2, n_freqs=2, grid_shapes=[(7, 1, 3)], resample="area")
    torch.nn.init.normal_(plain.heads[0].weight)
    base3 = torch.randn(7, 3)
    h = plain.trunk(draws.reshape(35, 6)).reshape(5, 7, -1)
    assert torch.allclose(plain.head(0, h, draws, base=base3, sum_draws=True),
                          plain.head(0, h, draws, base=base3).sum(0), atol=1e-5)


def test_factored_correction_starts_at_zero_and_trains(lenet_plan):
    from morphkit.manifold import predict_tensors

    inr, b, state = _area_inr(lenet_plan)
    k = [lt.name for lt in b.layouts].index("fc2.weight")
    table = b.table(width_map(b.cliques.values(), 0.5))
    pred = predict_tensors(inr, b, table, noise=0.4, generator=torch.Generator().manual_seed(0))
    base = b.assemble(k, table, inr.area_base(k, *table.cells[k]) * table.fan_in[k])
    assert torch.equal(pred["fc2.weight"], base)  # zero in-embeddings: exactly the merged base
    pred["fc2.weight"].pow(2).sum().backward()
    g = inr.heads[k].weight.grad
    assert g[16:].abs().sum() > 0  # the in half learns first (the out half's gradient is zero while it is)


def test_only_2d_matrices_are_factored():
    from morphkit.coords import DimSpec, TensorLayout
    from morphkit.manifold import factor_ranks

    rows = (DimSpec(0, 0, None, 1, 8, True), DimSpec(1, 1, None, 1, 4, True))
    linear = TensorLayout("fc.weight", (8, 4), rows, 0, 0, 1.0)
    conv1x1 = TensorLayout("down.weight", (8, 4, 1, 1), rows, 1, 0, 1.0)
    assert linear.trailing == conv1x1.trailing == 1
    assert factor_ranks([linear, conv1x1], mk.MorphConfig()) == [16, 0]
    assert factor_ranks([linear], mk.MorphConfig(inr=mk.INRConfig(residual=False))) == [16]  # pure INR too


def test_jittered_area_weights_still_cover_every_base_channel_once():
    g = torch.Generator().manual_seed(0)
    cases = [(3, 6, 0.75), (5, 16, 0.75), (30, 120, 0.75), (2, 3, 0.75), (8, 16, 1.25), (4, 16, 2.0)]
    for count, size, jitter in cases:  # over 1 cell, edges may pass each other: kept in order, cells still tile
        a = area_weights(count, size, jitter=jitter, generator=g)
        assert a.shape == (count, size) and bool((a >= 0).all())
        assert torch.allclose(a.sum(0), torch.full((size,), count / size), atol=1e-6)  # each channel once
        assert torch.allclose(a.sum(), torch.tensor(float(count)), atol=1e-5)  # cells tile [0, 1]
        assert not torch.allclose(a, area_weights(count, size))  # the edges moved
    assert torch.equal(area_weights(1, 5, jitter=0.75, generator=g), area_weights(1, 5))  # one cell: no edge to move


def test_base_jitter_moves_narrower_merges_only_and_is_seeded(lenet_plan):
    from morphkit.manifold import predict_tensors

    inr, b, state = _area_inr(lenet_plan)
    half, full = b.table(width_map(b.cliques.values(), 0.5)), b.table(b.full())

    def pred(table, seed, jitter=0.75):
        return predict_tensors(inr, b, table, generator=torch.Generator().manual_seed(seed), jitter=jitter)

    exact, one, again, other = pred(half, 0, 0.0), pred(half, 0), pred(half, 0), pred(half, 1)
    assert all(torch.equal(one[n], again[n]) for n in one)  # the same seed, the same merge
    assert not torch.equal(one["conv2.weight"], exact["conv2.weight"])
    assert not torch.equal(one["conv2.weight"], other["conv2.weight"])
    at_full = pred(full, 0)  # full width: every cell is one channel, nothing to jitter
    assert all(torch.equal(at_full[lt.name], state[lt.name]) for lt in b.layouts)


def test_wide_convolutions_are_factored_above_factor_above():
    from morphkit.graph import find_cliques
    from morphkit.manifold import factor_ranks

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 80, 3), torch.nn.ReLU(), torch.nn.Conv2d(80, 64, 3),
                                torch.nn.ReLU(), torch.nn.Conv2d(64, 48, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(48, 10, 1))
    x = torch.randn(1, 3, 12, 12)
    cliques = find_cliques(model, x)
    layouts, _ = plan_layouts(cliques, model.state_dict(), {n for n, _ in model.named_parameters()})
    names = [lt.name for lt in layouts]
    ranks = dict(zip(names, factor_ranks(layouts, mk.MorphConfig())))
    # 80 x 64 = 5120 channel pairs > 4096: factored; 64 x 48 = 3072 (a 1x1 conv) and the biases are not
    assert {n for n, r in ranks.items() if r} == {"2.weight"} and ranks["2.weight"] == 16
    low = mk.MorphConfig(inr=mk.INRConfig(factor_above=3000))
    assert {n for n, r in zip(names, factor_ranks(layouts, low)) if r} == {"2.weight", "4.weight"}
    off = mk.MorphConfig(inr=mk.INRConfig(factor_above=0))
    assert not any(factor_ranks(layouts, off))
    torch.manual_seed(0)
    manifold = mk.morph(model, [(torch.randn(4, 3, 12, 12), torch.randn(4, 10, 8, 8))], example_inputs=x,
                        loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean(),
                        config=mk.MorphConfig(train=mk.TrainConfig(steps=2)), progress=False)
    k = names.index("2.weight")
    table = manifold.builder.table(manifold.width_map(0.5))
    assert table.factored[k] and table.segments[k][1] - table.segments[k][0] == 40 + 32  # queries, not 1,280 rows
    net = manifold.sample(0.5, samples=3)
    assert net[2].weight.shape == (32, 40, 3, 3) and net(x).shape == (1, 10, 8, 8)
    full = manifold.sample(1.0)
    assert torch.allclose(full(x), model(x), atol=1e-5)


def test_tables_from_cached_blocks_equal_fresh_ones(lenet_plan, monkeypatch):
    import morphkit.coords as coords
    from morphkit.train import draw_widths

    _, cliques, _, layouts, _ = lenet_plan
    monkeypatch.setattr(coords, "BLOCK_CACHE_FLOATS", 20_000)  # small: blocks are evicted along the way
    warm = CoordBuilder(layouts, cliques, factored=[lt.name == "fc2.weight" for lt in layouts], cache_size=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):  # unequal per-clique maps, as training draws them
        counts = draw_widths(cliques, 0.0, 0.75, False, g, spread=0.2)
        a = warm.table(counts)
        b = CoordBuilder(layouts, cliques, factored=warm.factored).table(counts)
        assert torch.equal(a.coords, b.coords) and torch.equal(a.noise, b.noise)
        assert a.segments == b.segments and a.cells == b.cells and a.fan_in == b.fan_in
        assert [[p.count for p in ps] for ps in a.plans] == [[p.count for p in ps] for ps in b.plans]
    assert 0 < warm._block_floats <= 20_000  # the bound held
