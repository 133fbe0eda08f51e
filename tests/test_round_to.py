"""round_to: every resizable clique's channel count a multiple of N where the clique allows."""

import pytest
import torch

import morphkit as mk
from morphkit.clique import Clique


def test_round_count_free_blocked_small_and_fixed():
    free = Clique(0, 120)
    assert [free.channels_for(w, 16) for w in (0.5, 0.25, 0.01, 1.0)] == [64, 32, 16, 112]
    assert free.channels_for(0.5, None) == free.channels_for(0.5, 1) == 60
    heads = Clique(1, 192, block=64)  # 3 heads of 64 channels
    for w in (0.3, 0.5, 0.77, 1.0):
        n = heads.channels_for(w, 16)
        assert n % 16 == 0 and n % 3 == 0 and n <= 192
    assert Clique(2, 6).channels_for(0.5, 8) == 3  # no multiple of 8 fits in 6 channels: unrounded
    assert Clique(3, 10, fixed=True, reason="output").channels_for(0.5, 8) == 10
    groups = Clique(4, 24, block=6)  # 4 groups of 6: counts are multiples of 4
    assert groups.round_count(10, 8) == 8 and groups.round_count(12, 8) == 16 and groups.round_count(20, 8) == 24


def test_width_map_rounds_floats_and_maps_and_rejects_bad_round_to():
    cs = [Clique(0, 120), Clique(1, 6), Clique(2, 10, fixed=True, reason="output")]
    assert mk.width_map(cs, 0.5, round_to=8) == {0: 64, 1: 3, 2: 10}
    assert mk.width_map(cs, {0: 50}, round_to=16) == {0: 48, 1: 6, 2: 10}
    for bad in (0, -8, 2.5, True, "8", 10**6):
        with pytest.raises(mk.ConfigError, match="round_to"):
            mk.width_map(cs, 0.5, round_to=bad)


@pytest.mark.parametrize("spec,shape,n", [
    ("resnet20", (3, 32, 32), 8),
    ("lenet5", (1, 28, 28), 4),
    ("timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2", (3, 32, 32), 16),
])
def test_resized_models_have_rounded_channels_and_run(spec, shape, n):
    base = mk.build_model(spec)
    x = torch.randn(1, *shape)
    cliques = mk.find_cliques(base, x)
    for width in (0.3, 0.5, 0.8):
        net = mk.resize(base, x, width, cliques=cliques, round_to=n).eval()
        for c in cliques:
            count = net.morphkit_widths[c.id]
            if c.fixed:
                assert count == c.size
            elif c.round_count(c.size, n) % n == 0:  # the clique has room for a multiple of n
                assert count % n == 0, (spec, width, c.id, c.size, count)
                assert c.block == 1 or count % c.n_blocks == 0
        assert net(torch.randn(2, *shape)).shape[0] == 2


def test_manifold_sample_rounds():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=8, layers=1, n_freqs=2),
                         train=mk.TrainConfig(steps=2, eval_compressions=(0.0,)), samples=2)
    m = mk.morph(mk.build_model("mlp?hidden=[40,20]"), data, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg,
                 progress=False)
    net = m.sample(0.6, round_to=8)
    resizable = [c for c in m.cliques if not c.fixed]
    assert resizable and all(net.morphkit_widths[c.id] % 8 == 0 for c in resizable)
    assert m.width_map(0.6, round_to=8) == net.morphkit_widths
    assert {k: tuple(v.shape) for k, v in m.predict(0.6, samples=1, round_to=8).items()} == {
        k: tuple(v.shape) for k, v in net.state_dict().items() if k in m.predict(0.6, samples=1, round_to=8)}
