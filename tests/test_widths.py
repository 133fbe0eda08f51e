"""Training every width: the sandwich rule, kept BatchNorms with per-width statistics, the full width, warnings."""

import copy
import logging

import pytest
import torch
from torch import nn

import morphkit as mk
from morphkit.manifold import CALIB_KEY, recalibrate_bn
from morphkit.train import _Bound, collect_calibration, draw_step_widths, kept_batch_norms


class BNNet(nn.Module):
    """Conv-BN-ReLU twice, pooled, then a linear classifier: the smallest BatchNorm convnet."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _data(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(20, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (20,), generator=g))
            for _ in range(n)]


def _net():
    torch.manual_seed(0)
    net = BNNet()
    with torch.no_grad():  # trained-looking BatchNorm statistics and affine parameters
        for bn in (net.b1, net.b2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


X = torch.zeros(1, 3, 8, 8)
CFG = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                     train=mk.TrainConfig(steps=6, eval_compressions=()), samples=2, calib_samples=64)


@pytest.fixture(scope="module")
def manifold():
    return mk.morph(_net(), _data(), example_inputs=X, config=CFG, progress=False)


def test_defaults_train_the_range_users_deploy():
    cfg = mk.MorphConfig()
    assert cfg.train.compression == (0.0, 0.75) and cfg.train.sandwich and not cfg.fuse_bn
    assert cfg.train.clique_spread == 0.2 and cfg.train.spread_below and cfg.train.clique_floor() == 0.05
    assert cfg.calib_samples > 0


def test_older_configs_keep_the_behaviour_they_were_trained_with():
    old = mk.MorphConfig.from_dict({"version": 3, "train": {"compression": [0.0, 0.5]}, "fuse_bn": True})
    assert not old.train.sandwich and old.calib_samples == 0 and old.fuse_bn and old.train.clique_spread == 0.0
    assert mk.MorphConfig.from_dict({"version": 4}).train.clique_spread == 0.0
    v6 = mk.MorphConfig.from_dict({"version": 6}).train
    assert v6.clique_spread == 0.2 and not v6.spread_below and v6.clique_floor() == 0.25
    assert mk.MorphConfig.from_dict({"version": 7}).train.narrow_spread == 0.5


def test_sandwich_trains_the_narrowest_width_every_step(manifold):
    g = torch.Generator().manual_seed(0)
    cliques = manifold.cliques
    tc = mk.TrainConfig(compression=(0.1, 0.75), spread_below=False)
    for _ in range(20):
        narrow, drawn = draw_step_widths(cliques, tc, g)
        assert narrow == {c.id: c.channels_for(0.25) for c in cliques}
        assert all(c.channels_for(0.25) <= drawn[c.id] <= c.channels_for(0.9) for c in cliques)
    single = draw_step_widths(cliques, mk.TrainConfig(sandwich=False), g)
    assert len(single) == 1


def test_clique_spread_draws_unequal_maps_inside_the_trained_range(manifold):
    g = torch.Generator().manual_seed(0)
    cliques = [c for c in manifold.cliques if not c.fixed]
    tc = mk.TrainConfig(compression=(0.0, 0.5), clique_spread=0.3, spread_below=False)
    unequal = 0
    for _ in range(50):
        drawn = draw_step_widths(cliques, tc, g)[1]
        assert all(c.channels_for(0.5) <= drawn[c.id] <= c.size for c in cliques)
        ratios = [drawn[c.id] / c.size for c in cliques]
        unequal += max(ratios) - min(ratios) > 0.15
    assert unequal > 10  # many maps give the cliques clearly different widths (20 of 50 for this seed)
    for _ in range(20):  # spread 0: one width, up to a channel's rounding
        same = draw_step_widths(cliques, mk.TrainConfig(compression=(0.0, 0.5), clique_spread=0.0), g)[1]
        ratios = [same[c.id] / c.size for c in cliques]
        assert max(ratios) - min(ratios) <= 1 / min(c.size for c in cliques)
    with pytest.raises(mk.ConfigError, match="train.clique_spread"):
        mk.TrainConfig(clique_spread=1.5)


def test_spread_below_trains_single_cliques_under_the_narrowest_uniform_width(manifold):
    """The default: offsets reach 1 - high - spread, and half the narrowest maps are unequal around 1 - high."""
    g = torch.Generator().manual_seed(0)
    cliques = [c for c in manifold.cliques if not c.fixed]
    tc = mk.TrainConfig(compression=(0.0, 0.5), clique_spread=0.3)
    assert tc.clique_floor() == pytest.approx(0.2)
    uniform, below, n = 0, 0, 200
    for _ in range(n):
        narrow, drawn = draw_step_widths(cliques, tc, g)
        for m in (narrow, drawn):
            assert all(c.channels_for(0.2) <= m[c.id] <= c.size for c in cliques)
            below += any(m[c.id] < c.channels_for(0.5) for c in cliques)
        uniform += narrow == {c.id: c.channels_for(0.5) for c in cliques}
        assert all(narrow[c.id] <= c.channels_for(0.8) for c in cliques)  # 0.5 + 0.3 at most
    assert 0.35 * n < uniform < 0.65 * n  # a fair coin
    assert below > 0.3 * n
    with pytest.raises(mk.ConfigError, match="train.spread_below"):
        mk.TrainConfig(spread_below=1)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_narrow_spread_sets_the_share_of_unequal_narrowest_maps(manifold, share):
    g = torch.Generator().manual_seed(0)
    cliques = [c for c in manifold.cliques if not c.fixed]
    tc = mk.TrainConfig(compression=(0.0, 0.5), clique_spread=0.3, narrow_spread=share)
    uniform = sum(draw_step_widths(cliques, tc, g)[0] == {c.id: c.channels_for(0.5) for c in cliques}
                  for _ in range(50))
    if share == 0.0:
        assert uniform == 50
    else:  # offsets may round back to the uniform counts on a small clique, rarely on all of them
        assert uniform < 10
    with pytest.raises(mk.ConfigError, match="train.narrow_spread"):
        mk.TrainConfig(narrow_spread=1.5)


def test_untrained_uses_the_per_clique_floor_and_the_map_size(manifold):
    """Single cliques down to the per-clique floor are trained; a whole map that narrow is not."""
    m = copy.copy(manifold)
    m.config = mk.MorphConfig.from_dict({**manifold.config.to_dict(), "train": {
        **manifold.config.to_dict()["train"], "compression": [0.0, 0.5], "clique_spread": 0.3,
        "spread_below": True}})
    free = sorted((c for c in m.cliques if not c.fixed and c.size >= 8), key=lambda c: -c.size)
    assert len(free) >= 2
    one_low = m.width_map(0.5)
    one_low[free[0].id] = free[0].channels_for(0.5) - 1  # the map's mean width 1/16 lower at most
    assert one_low[free[0].id] >= free[0].channels_for(0.2)
    assert m.untrained(one_low) == []  # one clique below 0.5, above the floor 0.2
    assert m.widths()[free[0].id]["trained"][0] == free[0].channels_for(0.2)
    assert m.widths()[free[0].id]["uniform"][0] == free[0].channels_for(0.5)
    all_low = m.width_map(0.3)  # every clique at 0.3: a map narrower than any trained
    assert set(m.untrained(all_low)) == {c.id for c in m.cliques if not c.fixed and all_low[c.id] < c.channels_for(0.5)}
    too_low = m.width_map(0.5)
    too_low[free[0].id] = 1 if free[0].channels_for(0.2) > 1 else too_low[free[0].id]
    assert m.untrained(too_low) == ([free[0].id] if free[0].channels_for(0.2) > 1 else [])


def test_kept_batchnorms_normalise_with_batch_statistics_in_training():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 3, 8, 8) * 3 + 2
    bound = _Bound(net, dict(net.state_dict()), kept_batch_norms(net))
    out = bound(x)
    ref = _net().train()
    ref.b1.track_running_stats = ref.b2.track_running_stats = False
    ref.b1.running_mean = ref.b1.running_var = ref.b2.running_mean = ref.b2.running_var = None
    assert torch.allclose(out, ref(x), atol=1e-5)
    assert not net.b1.training and net.b1.track_running_stats  # restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no statistics updated


def test_calibration_inputs_are_the_first_of_a_fresh_pass():
    data = _data()
    calib = collect_calibration(data, 30)
    assert torch.equal(calib, torch.cat([data[0][0], data[1][0]])[:30])
    assert collect_calibration(iter(data), 30) is None  # a one-pass iterable keeps its batches for training
    assert collect_calibration(data, 0) is None


def test_full_width_is_the_base_exactly(manifold):
    net = manifold.sample(1.0)
    base = manifold.base.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in net.state_dict().items())
    assert net.morphkit_widths == manifold.width_map(1.0)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(net(x), _net()(x), atol=1e-5)  # smoothing permuted, the function is the original's


def test_sampled_widths_get_their_own_batchnorm_statistics(manifold):
    assert manifold.calib is not None and manifold.calib.shape == (64, 3, 8, 8)
    net = manifold.sample(0.5)
    # the statistics are those of the sampled network on the stored inputs, not a slice of the base's
    again = manifold.sample(0.5)
    recalibrate_bn(again, [c for c in manifold.calib.split(256)])
    for a, b in zip(kept_batch_norms(net), kept_batch_norms(again)):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
    sliced = manifold.base.b1.running_mean[:net.b1.num_features]
    assert not torch.allclose(net.b1.running_mean, sliced)
    # the user's data instead of the stored inputs
    own = manifold.sample(0.5, calib_data=_data(2, seed=3))
    assert not torch.allclose(own.b1.running_mean, net.b1.running_mean)


def test_calibration_inputs_round_trip_through_the_file(manifold, tmp_path):
    from morphkit._io import read_tensors

    path = tmp_path / "m.morph.safetensors"
    manifold.save(path)
    tensors, _ = read_tensors(path)
    assert tensors[CALIB_KEY].dtype == torch.float16
    loaded = mk.Manifold.load(path, base=_net())
    assert torch.allclose(loaded.calib, manifold.calib, atol=1e-2, rtol=1e-3)
    a, b = manifold.sample(0.5), loaded.sample(0.5)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(a(x), b(x), atol=1e-3, rtol=1e-3)
    assert loaded.summary()["calibration_inputs"] == 64


def test_a_width_outside_the_trained_range_warns(manifold, caplog):
    narrow = manifold.width_map(0.1)
    assert manifold.untrained(narrow)
    assert manifold.untrained(manifold.width_map(0.25)) == []
    with caplog.at_level(logging.WARNING, logger="morphkit.manifold"):
        manifold.sample(0.25)
    assert "outside the trained range" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="morphkit.manifold"):
        manifold.sample(0.1)
    assert "outside the trained range" in caplog.text


def test_folded_batchnorm_stores_no_calibration():
    cfg = mk.MorphConfig(inr=CFG.inr, train=CFG.train, samples=2, fuse_bn=True)
    m = mk.morph(_net(), _data(), example_inputs=X, config=cfg, progress=False)
    assert m.calib is None and m.summary()["batchnorm"] == "folded"


def test_distillation_applies_only_to_logits_with_the_default_loss():
    from morphkit.train import _logits_model, _Step

    assert _logits_model(_net(), (torch.zeros(2, 3, 8, 8),))
    assert not _logits_model(mk.build_model("vae_mnist"), (torch.zeros(2, 1, 28, 28),))  # (recon, mu, logvar)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert float(_Step._distill(a, b, 1.0)) > 0
    assert float(_Step._distill(a, a, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(_Step._distill(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), 1.0)) == 0.0  # not logits
    assert float(_Step._distill(a, b, 0.0)) == 0.0


def test_non_finite_or_integer_inputs_are_not_stored_for_calibration():
    bad = [(torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))]
    assert collect_calibration(bad, 4) is None
    ids = [(torch.zeros(4, 7, dtype=torch.long), torch.zeros(4, dtype=torch.long))]
    assert collect_calibration(ids, 4) is None


def test_a_loader_replays_the_same_training_order_after_calibration():
    from morphkit.data import load_data, make_loaders

    a, _ = make_loaders(load_data("embedded"), batch_size=16, seed=0, limit=64)
    b, _ = make_loaders(load_data("embedded"), batch_size=16, seed=0, limit=64)
    collect_calibration(a, 20)
    assert a.epoch == b.epoch
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
