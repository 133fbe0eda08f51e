"""Pruning, individual and slimmable baselines.

Pruned models must have exactly the shapes of ``resize()`` for every method;
the channel scores are checked against direct sums over the member slices
(and the Hessian against a per-sample loop); pruning equals masking the
dropped channels of the base model; bad input raises ConfigError; the
caller's model is never touched; the same seed gives the same model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import morphkit as mk
from morphkit.baselines import METHODS, channel_scores, prune, prune_permutations, train_individual, train_slimmable
from morphkit.errors import ConfigError
from tests._nets import CatNet

XL = torch.zeros(1, 1, 28, 28)
XR = torch.zeros(1, 3, 32, 32)
XC = torch.zeros(1, 3, 8, 8)


def _batches(shape, n=2, bs=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


def _randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affines, so BN members matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    m = mk.build_model("lenet5").eval()
    return m, mk.find_cliques(m, XL), _batches((1, 28, 28))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    m = _randomize_bn(mk.build_model("resnet20"))
    return m, mk.find_cliques(m, XR), _batches((3, 32, 32), n=1)


@pytest.fixture(scope="module")
def catnet():
    torch.manual_seed(0)
    m = _randomize_bn(CatNet())
    return m, mk.find_cliques(m, XC), _batches((3, 8, 8), classes=5)


def _same_structure(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["lenet", "resnet", "catnet"])
def test_counts_match_resize(request, name, method):
    model, cliques, data = request.getfixturevalue(name)
    x = {"lenet": XL, "resnet": XR, "catnet": XC}[name]
    for width in (0.5, 0.25) if method in ("l1", "random") else (0.5,):
        pruned = prune(model, x, width, method, data=data, cliques=cliques, hessian_samples=2)
        ref = mk.resize(model, x, width, cliques=cliques)
        assert _same_structure(pruned, ref)
        assert pruned.morphkit_widths == ref.morphkit_widths
        assert pruned(torch.randn(2, *x.shape[1:])).shape == model(torch.randn(2, *x.shape[1:])).shape


def test_counts_match_resize_timm():
    torch.manual_seed(0)
    x = torch.zeros(1, 3, 32, 32)
    model = mk.build_model("timm:resnet18?num_classes=10").eval()
    cliques = mk.find_cliques(model, x)
    data = _batches((3, 32, 32), n=1, bs=2)
    ref = mk.resize(model, x, 0.5, cliques=cliques)
    for method in METHODS:
        pruned = prune(model, x, 0.5, method, data=data, cliques=cliques, hessian_samples=2)
        assert _same_structure(pruned, ref), method
        assert mk.export.count_params(pruned) == mk.export.count_params(ref)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_l1_l2_scores_equal_direct_sums(lenet):
    model, cliques, _ = lenet
    sd = model.state_dict()
    for method, f in (("l1", torch.abs), ("l2", torch.square)):
        s = channel_scores(model, XL, method, cliques=cliques)
        assert set(s) == {c.id for c in cliques if not c.fixed}
        # clique 1: conv1's outputs, read by conv2's inputs
        direct = (f(sd["conv1.weight"]).sum((1, 2, 3)) + f(sd["conv1.bias"])
                  + f(sd["conv2.weight"]).sum((0, 2, 3)))
        np.testing.assert_allclose(s[1], direct.double().numpy(), rtol=1e-6)
        # clique 2: conv2's outputs, flattened into fc1 (25 columns per channel)
        direct = (f(sd["conv2.weight"]).sum((1, 2, 3)) + f(sd["conv2.bias"])
                  + f(sd["fc1.weight"]).reshape(120, 16, 25).sum((0, 2)))
        np.testing.assert_allclose(s[2], direct.double().numpy(), rtol=1e-6)


def test_bn_members_count_but_not_running_stats(resnet):
    model, cliques, _ = resnet
    s = channel_scores(model, XR, "l1", cliques=cliques)
    c = next(c for c in cliques if any(m.name == "layer1.0.conv1.weight" and m.dim == 0 for m in c.members))
    sd = model.state_dict()
    direct = (sd["layer1.0.conv1.weight"].abs().sum((1, 2, 3)) + sd["layer1.0.bn1.weight"].abs()
              + sd["layer1.0.bn1.bias"].abs() + sd["layer1.0.conv2.weight"].abs().sum((0, 2, 3)))
    np.testing.assert_allclose(s[c.id], direct.double().numpy(), rtol=1e-6)


def test_taylor_scores_equal_direct(lenet):
    model, cliques, data = lenet
    s = channel_scores(model, XL, "taylor", data, cliques=cliques)
    net = mk.build_model("lenet5")
    net.load_state_dict(model.state_dict())
    loss = sum(F.cross_entropy(net(x), y) for x, y in data) / len(data)
    loss.backward()
    e = {n: (p * p.grad).abs() for n, p in net.named_parameters()}
    direct = e["conv2.weight"].sum((1, 2, 3)) + e["conv2.bias"] + e["fc1.weight"].reshape(120, 16, 25).sum((0, 2))
    np.testing.assert_allclose(s[2], direct.detach().double().numpy(), rtol=1e-5)


def test_hessian_scores_average_every_sample(lenet):
    model, cliques, data = lenet
    s = channel_scores(model, XL, "hessian", data, cliques=cliques, hessian_samples=12)
    net = mk.build_model("lenet5")
    net.load_state_dict(model.state_dict())
    acc = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    seen = 0
    for x, y in data:
        for j in range(x.shape[0]):
            if seen == 12:
                break
            grads = torch.autograd.grad(F.cross_entropy(net(x[j:j + 1]), y[j:j + 1]), list(net.parameters()))
            for (n, _), g in zip(net.named_parameters(), grads):
                acc[n] += g ** 2
            seen += 1
    e = {n: p.detach() ** 2 * acc[n] / seen for n, p in net.named_parameters()}
    direct = e["conv1.weight"].sum((1, 2, 3)) + e["conv1.bias"] + e["conv2.weight"].sum((0, 2, 3))
    np.testing.assert_allclose(s[1], direct.double().numpy(), rtol=1e-4)


def test_tied_and_blocked_cliques(catnet):
    model, cliques, _ = catnet
    tied = next(c for c in cliques if c.tied)
    s = channel_scores(model, XC, "l1", cliques=cliques)[tied.id]
    sd = model.state_dict()
    per = (sd["pw1.weight"].abs().sum((1, 2, 3)) + sd["pw1.bias"].abs()).reshape(tied.n_blocks, tied.block).sum(0)
    per = per + sd["g.weight"].abs().sum((0, 2, 3))  # the grouped conv's shared input columns
    np.testing.assert_allclose(s, np.tile(per.double().numpy(), tied.n_blocks), rtol=1e-6)
    # the permutation keeps the same positions in every block
    perm = prune_permutations(cliques, {tied.id: s}, {tied.id: tied.size // 2})[tied.id]
    kept = perm[: tied.size // 2].reshape(-1)
    blocks = perm.reshape(tied.n_blocks, tied.block)
    assert all(((blocks[g] - g * tied.block) == (blocks[0])).all() for g in range(tied.n_blocks))
    assert sorted(kept.tolist()) == sorted(set(kept.tolist()))


def test_pruned_equals_masked_base(lenet):
    """Removing channels = zeroing them in the base model (ReLU/max-pool keep zeros)."""
    model, cliques, _ = lenet
    pruned = prune(model, XL, 0.5, "l1", cliques=cliques)
    scores = channel_scores(model, XL, "l1", cliques=cliques)
    masked = {k: v.clone() for k, v in model.state_dict().items()}
    for c in cliques:
        if c.fixed:
            continue
        kept = pruned.morphkit_kept[c.id]
        top = np.sort(np.argsort(-scores[c.id], kind="stable")[: len(kept)])
        assert kept == top.tolist()  # the highest-scored channels, in order
        drop = torch.ones(c.size, dtype=torch.bool)
        drop[kept] = False
        for m in c.members:
            t = masked[m.name]
            chans = torch.as_tensor(m.channel_of(t.shape[m.dim]))
            sel = drop[chans]
            masked[m.name] = t.index_fill(m.dim, torch.nonzero(sel).flatten(), 0.0)
    base = mk.build_model("lenet5").eval()
    base.load_state_dict(masked)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(pruned.eval()(x), base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["l1", "random", "taylor"])
def test_full_width_is_the_base(resnet, method):
    model, cliques, data = resnet
    pruned = prune(model, XR, 1.0, method, data=data, cliques=cliques).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(pruned(x), model(x))


def test_bad_inputs(lenet):
    model, cliques, data = lenet
    with pytest.raises(ConfigError, match="unknown pruning method"):
        prune(model, XL, 0.5, "l3", cliques=cliques)
    for w in (0, 1.5, -0.1, math.nan, "half"):
        with pytest.raises(ConfigError, match="width"):
            prune(model, XL, w, "l1", cliques=cliques)
    for method in ("taylor", "hessian"):
        with pytest.raises(ConfigError, match="needs data"):
            prune(model, XL, 0.5, method, cliques=cliques)
    with pytest.raises(ConfigError, match="finetune_epochs"):
        prune(model, XL, 0.5, "l1", finetune_epochs=1, cliques=cliques)
    with pytest.raises(ConfigError, match="clique 1"):
        prune(model, XL, {1: 7}, "l1", cliques=cliques)
    with pytest.raises(ConfigError, match="no batches"):
        prune(model, XL, 0.5, "taylor", data=[], cliques=cliques)
    with pytest.raises(ConfigError, match="widths"):
        train_slimmable(model, data, (0.0, 1.0), epochs=1, cliques=cliques, progress=False)


def test_caller_model_untouched(catnet):
    model, cliques, data = catnet
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    for method in ("taylor", "hessian", "l2"):
        prune(model, XC, 0.5, method, data=data, cliques=cliques, hessian_samples=2)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_same_seed_same_model(lenet):
    model, cliques, data = lenet
    a = prune(model, XL, 0.5, "random", cliques=cliques, seed=3)
    b = prune(model, XL, 0.5, "random", cliques=cliques, seed=3)
    c = prune(model, XL, 0.5, "random", cliques=cliques, seed=4)
    assert a.morphkit_kept == b.morphkit_kept != c.morphkit_kept
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    t1 = prune(model, XL, 0.5, "taylor", data=data, cliques=cliques)
    t2 = prune(model, XL, 0.5, "taylor", data=data, cliques=cliques)
    assert t1.morphkit_kept == t2.morphkit_kept


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_save_load_round_trip(request, tmp_path, name):
    model, cliques, _ = request.getfixturevalue(name)
    x = XL if name == "lenet" else XR
    pruned = prune(model, x, 0.5, "l1", cliques=cliques).eval()
    path = tmp_path / "pruned.safetensors"
    mk.save_model(pruned, path)
    again = mk.load_model(path)
    xs = torch.randn(2, *x.shape[1:])
    assert torch.equal(again(xs), pruned(xs))
    assert again.morphkit_widths == pruned.morphkit_widths


def test_finetune_changes_weights_not_shapes(lenet):
    model, cliques, data = lenet
    plain = prune(model, XL, 0.5, "l1", cliques=cliques)
    tuned = prune(model, XL, 0.5, "l1", data=data, finetune_epochs=1, cliques=cliques, progress=False)
    assert _same_structure(plain, tuned)
    assert tuned.morphkit_kept == plain.morphkit_kept and tuned.morphkit_widths == plain.morphkit_widths
    assert not torch.equal(plain.conv1.weight, tuned.conv1.weight)


def test_finetune_keeps_folded_bn_frozen(resnet):
    model, cliques, data = resnet
    fused = mk.fuse_bn(model, XR)
    tuned = prune(fused, XR, 0.5, "l1", data=data, finetune_epochs=1, cliques=cliques, progress=False)
    for name in fused.morphkit_fused_bn:
        bn = tuned.get_submodule(name)
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)), name
        assert torch.equal(bn.running_var + bn.eps, torch.ones_like(bn.running_var)), name


def test_train_individual_has_resized_structure(lenet):
    model, cliques, data = lenet
    net = train_individual(model, 0.5, data, epochs=1, example_inputs=XL, cliques=cliques, progress=False)
    ref = mk.resize(model, XL, 0.5, cliques=cliques)
    assert _same_structure(net, ref) and net.morphkit_widths == ref.morphkit_widths
    # trained from scratch: not the base model's weights
    assert not torch.equal(net.conv1.weight, ref.conv1.weight)
    state = torch.random.get_rng_state()
    again = train_individual("lenet5", 0.5, data, epochs=1, example_inputs=XL, progress=False)
    assert torch.equal(again.conv1.weight, net.conv1.weight)  # same seed, same oracle
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global RNG is not moved


def test_train_slimmable_shared_weights(resnet):
    model, cliques, data = resnet
    slim = train_slimmable(model, data, (0.5, 1.0), epochs=1, example_inputs=XR, cliques=cliques, n_random=1,
                           seed=0, progress=False)
    assert not torch.equal(slim.model.conv1.weight, model.conv1.weight)
    half = slim.model_at(0.5)
    ref = mk.resize(slim.model, XR, 0.5, cliques=cliques)
    assert _same_structure(half, ref)
    # the sub-network's weights are the first channels of the shared ones; BN statistics are its own
    assert torch.equal(half.conv1.weight, ref.conv1.weight)
    assert not torch.equal(half.bn1.running_mean, ref.bn1.running_mean)
    assert half(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_slimmable_without_bn(lenet):
    model, cliques, data = lenet
    slim = train_slimmable(model, data, [0.25, 0.5, 1.0], epochs=1, example_inputs=XL, cliques=cliques,
                           progress=False)
    assert slim.widths == (0.25, 1.0)
    assert _same_structure(slim.model_at(0.25), mk.resize(model, XL, 0.25, cliques=cliques))
    again = train_slimmable(model, data, [0.25, 0.5, 1.0], epochs=1, example_inputs=XL, cliques=cliques,
                            progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), slim.model.parameters()))
