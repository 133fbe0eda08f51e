"""Smoothing: same function after fuse + smooth, valid permutations, TV goes down."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _nets import CatNet
from torch import nn

from morphkit.clique import Clique, Member
from morphkit.errors import ConfigError
from morphkit.fuse import fuse_bn
from morphkit.graph import find_cliques, random_permutations
from morphkit.models import build_model
from morphkit.smooth import apply_permutation, l1_distances, smooth, total_variation


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and GroupNorm affines, so that fusion and permutation matter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            n = m.weight.shape[0]
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, tuple) else [out]


def assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    for ya, yb in zip(outputs(a, x), outputs(b, x)):
        assert float((ya - yb).abs().max()) <= 1e-4 * float(ya.abs().max()), "outputs differ"


CASES = {
    "lenet5": (lambda: build_model("lenet5"), (1, 28, 28)),
    "resnet20": (lambda: build_model("resnet20"), (3, 32, 32)),
    "mlp": (lambda: build_model("mlp"), (1, 28, 28)),
    "vae_mnist": (lambda: build_model("vae_mnist"), (1, 28, 28)),
    "catnet": (CatNet, (3, 16, 16)),
    "timm:resnet18": (lambda: build_model("timm:resnet18"), (3, 64, 64)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fuse_then_smooth_preserves_the_function(name):
    torch.manual_seed(0)
    make, shape = CASES[name]
    model = randomize(make())
    x = torch.randn(3, *shape)
    fused = fuse_bn(model, x[:1])
    cliques = find_cliques(fused, x[:1])
    smoothed, perms = smooth(fused, x[:1], cliques)
    assert_same_function(model, smoothed, x)
    assert set(perms) == {c.id for c in cliques}
    moved = 0
    for c in cliques:
        p = perms[c.id]
        assert sorted(p.tolist()) == list(range(c.size))
        if c.fixed:
            assert (p == np.arange(c.size)).all()
        if c.block > 1:
            assert (p // c.block == np.arange(c.size) // c.block).all()
        moved += int((p != np.arange(c.size)).any())
    assert moved > 0
    assert total_variation(smoothed, None, cliques) <= total_variation(fused, None, cliques) + 1e-12


def test_smoothing_recovers_a_shuffled_smooth_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():  # hidden channel c holds a smooth function of c/64
        t = torch.linspace(0, 1, 64)[:, None]
        model[0].weight.copy_(torch.sin(3 * t + torch.arange(8.0)[None, :] / 3))
        model[0].bias.copy_(torch.cos(2 * t[:, 0]))
        model[2].weight.copy_(torch.cos(4 * t.T + torch.arange(8.0)[:, None] / 5))
    x = torch.randn(4, 8)
    cliques = find_cliques(model, x)
    hidden = next(c for c in cliques if c.size == 64)
    shuffled = apply_permutation(model, cliques, {hidden.id: np.random.default_rng(0).permutation(64)})
    assert_same_function(model, shuffled, x)
    tv_smooth, tv_shuffled = total_variation(model, x, cliques), total_variation(shuffled, x, cliques)
    assert tv_shuffled > 5 * tv_smooth
    smoothed, _ = smooth(shuffled, x, cliques)
    assert_same_function(model, smoothed, x)
    assert total_variation(smoothed, x, cliques) <= 1.01 * tv_smooth


def test_smooth_is_deterministic_and_leaves_the_model_alone():
    model = randomize(CatNet())
    x = torch.randn(1, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cliques = find_cliques(model, x)
    _, p1 = smooth(model, x, cliques, seed=3)
    _, p2 = smooth(model, x, cliques, seed=3)
    assert all((p1[k] == p2[k]).all() for k in p1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    s, _ = smooth(model, x, cliques, time_budget=0.05)
    assert_same_function(model, s, x)


def test_random_permutations_preserve_the_function():
    model = randomize(CatNet())
    x = torch.randn(2, 3, 16, 16)
    cliques = find_cliques(model, x, check=False)
    permuted = apply_permutation(model, cliques, random_permutations(cliques, seed=5))
    assert_same_function(model, permuted, x)
    assert not torch.equal(permuted.pw1.weight, model.pw1.weight)


def test_bad_permutations_raise():
    cliques = [Clique(0, 4, [Member("0.weight", 0)]), Clique(1, 4, [Member("0.bias", 0)], block=2),
               Clique(2, 4, [Member("1.weight", 0)], block=2, tied=True),
               Clique(3, 4, [Member("1.bias", 0)], fixed=True, reason="model output")]
    model = nn.Sequential(nn.Linear(2, 4), nn.Linear(2, 4))
    for cid, perm in [(0, [0, 1, 2]), (0, [0, 0, 1, 2]), (1, [2, 1, 0, 3]), (2, [1, 0, 2, 3]),
                      (3, [1, 0, 2, 3]), (7, [0, 1, 2, 3]), (0, [0.0, 1.0, 2.0, 3.0])]:
        with pytest.raises(ConfigError):
            apply_permutation(model, cliques, {cid: perm})
    ok = apply_permutation(model, cliques, {1: [1, 0, 2, 3], 2: [1, 0, 3, 2], 3: [0, 1, 2, 3]})
    assert torch.equal(ok[1].weight, model[1].weight[[1, 0, 3, 2]])


def test_l1_distances_match_brute_force():
    rng = np.random.default_rng(0)
    for n, f in [(1, 3), (2, 5), (7, 300), (13, 1000)]:
        x = rng.standard_normal((n, f)).astype(np.float32)
        ref = np.abs(x[:, None, :].astype(np.float64) - x[None]).sum(-1)
        d = l1_distances(x)
        assert d.dtype == np.float64 and (d == d.T).all() and (np.diag(d) == 0).all()
        assert np.allclose(d, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["timm:mobilenetv3_small_100", "timm:efficientnet_b0", "timm:regnetx_002",
                                  "timm:convnext_atto", "timm:vit_tiny_patch16_224?img_size=64"])
def test_timm_fuse_smooth_resize(spec):
    from morphkit.resize import resize

    torch.manual_seed(0)
    model = randomize(build_model(spec))
    x = torch.randn(2, 3, 64, 64)
    fused = fuse_bn(model, x[:1])
    cliques = find_cliques(fused, x[:1])
    smoothed, _ = smooth(fused, x[:1], cliques)
    assert_same_function(model, smoothed, x)
    small = resize(smoothed, x[:1], 0.5, cliques, check=True)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_smoothing_keeps_the_callers_torch_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        l1_distances(np.random.default_rng(0).random((9, 5)))  # numba's parallel kernel
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_wide_problems_estimate_distances_on_sampled_features(monkeypatch):
    """Above MAX_DISTANCE_TERMS the solver sees sampled features, yet the kept order is judged on all of them."""
    import importlib

    sm = importlib.import_module("morphkit.smooth")  # the package attribute `smooth` is the function

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():  # hidden channel c holds a smooth function of c/64
        t = torch.linspace(0, 1, 64)[:, None]
        model[0].weight.copy_(torch.sin(3 * t + torch.arange(600.0)[None, :] / 50))
    x = torch.randn(4, 600)
    cliques = find_cliques(model, x)
    hidden = next(c for c in cliques if c.size == 64)
    shuffled = apply_permutation(model, cliques, {hidden.id: np.random.default_rng(0).permutation(64)})
    monkeypatch.setattr(sm, "MAX_DISTANCE_TERMS", 64 * 64 * 100)  # 64 x 609 features: sampled
    monkeypatch.setattr(sm, "MIN_SAMPLED_FEATURES", 16)
    sub = sm._feature_subset(torch.zeros(64, 609), seed=0)
    assert sub is not None and sub.numel() == 200 and bool((sub.diff() > 0).all())
    assert sm._feature_subset(torch.zeros(64, 100), seed=0) is None  # small problems: every feature
    smoothed, perms = smooth(shuffled, x, cliques)
    assert_same_function(model, smoothed, x)
    assert sorted(perms[hidden.id].tolist()) == list(range(64))
    tv_smooth, tv_shuffled = total_variation(model, x, cliques), total_variation(shuffled, x, cliques)
    assert total_variation(smoothed, x, cliques) <= 1.05 * tv_smooth < tv_shuffled
    feats = torch.randn(10, 7)
    order = np.array([3, 1, 0, 9, 2, 8, 4, 7, 5, 6])
    from morphkit.solver import path_length

    assert sm._path_l1(feats, order) == pytest.approx(path_length(l1_distances(feats), order), rel=1e-5)
