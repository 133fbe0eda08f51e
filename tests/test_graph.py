"""Cliques: sizes, members, index maps, fixed input/output, blocks, attention, validation."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from _nets import CatNet
from torch import nn

from morphkit.clique import Clique, Member
from morphkit.graph import (
    clique_map,
    find_cliques,
    format_cliques,
    keep_positions,
    member_channels,
    permute_state,
    validate_cliques,
)
from morphkit.models import build_model


def by_first(cliques: list[Clique]) -> dict[str, Clique]:
    return {f"{c.members[0].name}[{c.members[0].dim}]": c for c in cliques}


@pytest.fixture(scope="module")
def lenet():
    m = build_model("lenet5")
    return m, find_cliques(m, torch.zeros(1, 1, 28, 28))


@pytest.fixture(scope="module")
def resnet20():
    m = build_model("resnet20")
    return m, find_cliques(m, torch.randn(1, 3, 32, 32))


def test_lenet_cliques(lenet):
    _, cs = lenet
    assert [(c.id, c.size, c.fixed) for c in cs] == [
        (0, 1, True), (1, 6, False), (2, 16, False), (3, 120, False), (4, 84, False), (5, 10, True)]
    assert cs[0].reason == "model input" and cs[5].reason.startswith("model output")
    names = by_first(cs)
    assert [(m.name, m.dim) for m in names["conv1.weight[0]"].members] == [
        ("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)]
    flat = next(m for m in cs[2].members if m.name == "fc1.weight")  # flatten: 25 positions per channel
    assert flat.dim == 1 and list(flat.index) == [p // 25 for p in range(400)]
    assert all(c.block == 1 and not c.tied for c in cs)


def test_resnet20_cliques(resnet20):
    model, cs = resnet20
    free = [c for c in cs if not c.fixed]
    big = sorted(c.size for c in free if len(c.members) > 10)
    assert big == [16, 32, 64]  # the residual streams
    assert sorted(c.size for c in free if len(c.members) <= 10) == [16] * 3 + [32] * 3 + [64] * 3
    fixed = [c for c in cs if c.fixed]
    assert [(c.size, c.reason) for c in fixed] == [(3, "model input"), (10, "model output (fc)")]
    stream16 = next(c for c in free if c.size == 16 and len(c.members) > 10)
    keys = {(m.name, m.dim) for m in stream16.members}
    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                "layer1.0.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert (key, 1 if key.startswith("layer2.0.downsample.0") else 0) in keys
    # every dim of every weight that changes size belongs to exactly one clique
    cmap = clique_map(cs)
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if t.dim() >= 2:
            assert set(cmap[name]) == {0, 1}, name
        else:
            assert set(cmap[name]) == {0}, name
        assert all(len(v) == 1 for v in cmap[name].values())


def test_cliques_are_deterministic_and_json(resnet20):
    model, cs = resnet20
    again = find_cliques(model, torch.randn(1, 3, 32, 32), check=False)
    assert [c.to_json() for c in cs] == [c.to_json() for c in again]
    assert [Clique.from_json(c.to_json()) for c in cs] == cs


def test_find_cliques_leaves_the_model_alone():
    model = build_model("resnet20").train()
    model.layer1.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_cliques(model, torch.randn(1, 3, 32, 32))
    assert model.training and model.layer1[0].training
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_vae_every_output_is_fixed():
    cs = find_cliques(build_model("vae_mnist"), torch.randn(1, 1, 28, 28))
    fixed = sorted(c.reason for c in cs if c.fixed)
    assert fixed == ["model input", "model output (fc4)", "model output (fc_logvar)",
                     "model output (fc_mu)"]
    assert sorted(c.size for c in cs if not c.fixed) == [400, 400]


def test_concat_depthwise_grouped_groupnorm():
    model = CatNet().eval()
    cs = find_cliques(model, torch.randn(1, 3, 16, 16))
    free = {c.size: c for c in cs if not c.fixed}
    # the concatenation gives one clique per branch; the shared consumers use -1 for the other's positions
    a, b = free[6], free[10]
    dw_a = next(m for m in a.members if m.name == "dw.weight")
    dw_b = next(m for m in b.members if m.name == "dw.weight")
    assert list(dw_a.index) == list(range(6)) + [-1] * 10
    assert list(dw_b.index) == [-1] * 6 + list(range(10))
    # pw1 -> grouped conv: tied blocks of 6 (the grouped weight has 6 shared input columns)
    tied = next(c for c in cs if c.tied)
    assert (tied.size, tied.block) == (24, 6)
    g_in = next(m for m in tied.members if m.name == "g.weight")
    assert g_in.dim == 1 and list(g_in.index) == list(range(6))
    gout = next(c for c in cs if any(m.name == "gn.weight" for m in c.members))
    assert (gout.size, gout.block, gout.tied, gout.fixed) == (24, 6, False, False)
    assert len(cs) == 8 and sum(c.fixed for c in cs) == 2


def test_attention_cliques_within_heads():
    model = build_model("timm:vit_tiny_patch16_224?img_size=32&depth=2").eval()
    cs = find_cliques(model, torch.randn(1, 3, 32, 32))
    heads = [c for c in cs if any(m.name.endswith("attn.qkv.weight") and m.dim == 0 for m in c.members)]
    assert len(heads) == 2 and all((c.size, c.block, c.fixed) == (192, 64, False) for c in heads)
    qkv = next(m for m in heads[0].members if m.name.endswith("qkv.weight"))
    assert list(qkv.index) == list(range(192)) * 3
    stream = next(c for c in cs if any(m.name == "cls_token" for m in c.members))
    names = {m.name for m in stream.members}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"} <= names
    assert not stream.fixed and stream.size == 192


def test_validation_catches_a_broken_clique(resnet20):
    model, cs = resnet20
    x = torch.randn(1, 3, 32, 32)
    target = next(c for c in cs if not c.fixed and len(c.members) < 10)
    broken = [dataclasses.replace(c, members=[m for m in c.members if "running_var" not in m.name])
              if c.id == target.id else c for c in cs]
    assert validate_cliques(model, x, broken) == {target.id: "permuting its channels changes the model's output"}
    assert validate_cliques(model, x, cs) == {}


def test_unsupported_layer_is_fixed_with_a_warning(caplog):
    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 16)
            self.rnn = nn.LSTM(16, 16, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(self.inp(x))[0])

    with caplog.at_level(logging.WARNING, logger="morphkit.graph"):
        cs = find_cliques(WithLSTM().eval(), torch.randn(2, 5, 4))
    stream = next(c for c in cs if any(m.name == "inp.weight" and m.dim == 0 for m in c.members))
    assert stream.fixed and "LSTM" in stream.reason
    assert "LSTM" in caplog.text


def test_multihead_attention_joins_its_stream_and_permutes_within_heads():
    class WithMHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(self.mha(h, h, h, need_weights=False)[0])

    cs = find_cliques(WithMHA().eval(), torch.randn(2, 5, 4))
    stream = next(c for c in cs if any(m.name == "inp.weight" and m.dim == 0 for m in c.members))
    assert not stream.fixed and stream.block == 8
    assert {("mha.in_proj_weight", 0), ("mha.in_proj_weight", 1), ("mha.out_proj.weight", 1)} <= {
        (m.name, m.dim) for m in stream.members}


def test_helpers_on_index_maps():
    c = Clique(0, 2, [Member("w", 1, (0, 0, 1, 1)), Member("q", 0, (0, 1, 0, 1)), Member("z", 0, (-1, 0, 1))])
    state = {"w": torch.arange(8.0).view(2, 4), "q": torch.arange(4.0), "z": torch.arange(3.0)}
    out = permute_state(state, [c], {0: np.array([1, 0])})
    assert out["w"].tolist() == [[2, 3, 0, 1], [6, 7, 4, 5]]
    assert out["q"].tolist() == [1, 0, 3, 2]
    assert out["z"].tolist() == [0, 2, 1]
    keep = keep_positions([c], {0: 1}, {k: v.shape for k, v in state.items()})
    assert {k: v.tolist() for k, v in keep.items()} == {("w", 1): [0, 1], ("q", 0): [0, 2], ("z", 0): [0, 1]}
    assert member_channels(Member("a", 0), 3).tolist() == [0, 1, 2]


def test_format_cliques(lenet):
    _, cs = lenet
    text = format_cliques(cs)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["id", "size", "block", "members", "status"]
    assert "fixed: model input" in lines[1] and "conv1.weight[1]" in lines[1]
    assert lines[-1] == "6 cliques: 4 resizable (226 channels), 2 fixed"


@pytest.mark.slow
def test_mixer_token_mixing_is_not_a_channel_clique():
    model = build_model("timm:mixer_s16_224?img_size=64").eval()
    cs = find_cliques(model, torch.randn(1, 3, 64, 64))
    stream = next(c for c in cs if any(m.name == "stem.proj.weight" and m.dim == 0 for m in c.members))
    assert not stream.fixed and stream.size == 512
    assert all(not m.name.endswith("mlp_tokens.fc2.weight") for m in stream.members)
    tokens_hidden = [c for c in cs if any(m.name.endswith("mlp_tokens.fc1.weight") and m.dim == 0
                                          for m in c.members)]
    assert len(tokens_hidden) == 8 and not any(c.fixed for c in tokens_hidden)


def test_channel_reduction_and_residual_on_the_input():
    class Reduce(nn.Module):  # x.mean(1): torch-pruning sees an elementwise op
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c1(x).relu().mean(1, keepdim=True)
            return self.fc(self.c2(y).mean((2, 3)))

    class InputResidual(nn.Module):  # x + conv(x): the conv's outputs are the input's channels
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 3, 3, padding=1)
            self.c2 = nn.Conv2d(3, 6, 1)
            self.c3 = nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c3(self.c2(x + self.c1(x)).relu())

    x = torch.randn(1, 3, 8, 8)
    cs = find_cliques(Reduce().eval(), x)
    assert [(c.size, c.fixed) for c in cs] == [(3, True), (8, False), (1, True), (4, False), (2, True)]
    cs = find_cliques(InputResidual().eval(), x)
    assert [(c.size, c.fixed, c.reason) for c in cs] == [
        (3, True, "model input"), (6, False, ""), (2, True, "model output (c3)")]
    assert {(m.name, m.dim) for m in cs[0].members} >= {("c1.weight", 0), ("c1.weight", 1), ("c2.weight", 1)}


def test_light_copy_shares_attributes_but_not_structure():
    from morphkit.graph import copy_with, light_copy_with

    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Conv2d(1, 1, 1))
    new = light_copy_with(model, {"0.weight": torch.zeros(2, 4)})
    assert new is not model and new[0] is not shared and new[0] is new[2]  # tied modules stay tied
    assert new[0].weight.shape == (2, 4) and shared.weight.shape == (4, 4)  # the original is untouched
    assert isinstance(new[0].weight, nn.Parameter) and new[3].weight is model[3].weight  # unchanged: shared
    new[3].groups = 7  # size attributes are the copy's own
    assert model[3].groups == 1 and new[3].padding is model[3].padding
    model2 = nn.Sequential(nn.Linear(2, 2))
    model2[0].cache = [model2[0].weight]  # a plain attribute holding a parameter
    deep = light_copy_with(model2, {})
    assert deep[0].cache[0] is deep[0].weight and deep[0].weight is not model2[0].weight
    assert copy_with(model2, {})[0].cache[0] is not model2[0].weight


def test_fast_group_merge_and_built_mappings_give_the_same_cliques(monkeypatch):
    """The linear-time ``add_and_merge`` and the skipped index-mapping rebuilds change no clique."""
    import contextlib

    import morphkit.graph as graph

    timm = pytest.importorskip("timm")
    for model, x in ((CatNet().eval(), torch.randn(1, 3, 16, 16)),
                     (timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8).eval(),
                      torch.randn(1, 3, 32, 32))):
        fast = graph.find_cliques(model, x, check=False)
        with monkeypatch.context() as m:
            m.setattr(graph, "_fast_merge", contextlib.nullcontext)
            m.setattr(graph, "_mappings_built", contextlib.nullcontext)
            plain = graph.find_cliques(model, x, check=False)

        def sig(cs):
            return [(c.size, c.fixed, c.reason, c.block, c.tied, [(mb.name, mb.dim, mb.index) for mb in c.members])
                    for c in cs]

        assert sig(fast) == sig(plain) and any(not c.fixed for c in fast)


def test_a_dependency_walk_that_does_not_converge_is_refused_not_run_for_hours(monkeypatch):
    import morphkit as mk
    import morphkit.graph as graph

    monkeypatch.setattr(graph, "MAX_GROUP_ITEMS", 2)  # LeNet-5's groups hold more: stands in for a runaway walk
    with pytest.raises(mk.UnsupportedModelError, match="did not converge"):
        graph.find_cliques(build_model("lenet5"), torch.zeros(1, 1, 28, 28))


def test_a_walk_that_maps_too_many_indices_is_cut_short_and_its_clique_fixed(monkeypatch):
    # maxvit_t's grid attention: one walk pushed millions of indices through torch-pruning's mappings;
    # past the budget the walk is redone shallow and its clique fixed, instead of tracing for minutes
    import morphkit as mk
    import morphkit.graph as graph

    net, x = build_model("lenet5"), torch.zeros(1, 1, 28, 28)  # conv2's 16 channels flatten into 400 positions
    full = graph.find_cliques(net, x)
    flat = next(c for c in full if "fc1" in c.modules)  # conv2 out, fc1 in
    assert not flat.fixed
    monkeypatch.setattr(graph, "MAX_WALK_INDICES", 300)  # below the 16 -> 400 indices the flatten maps
    cut = graph.find_cliques(net, x)
    fixed = next(c for c in cut if "conv2" in c.modules and c.size == 16)
    assert fixed.fixed and "maps more than 300 indices" in fixed.reason
    assert [c.size for c in cut if not c.fixed] == [c.size for c in full if not c.fixed and c.id != flat.id]
    small = mk.resize(net, x, 0.5, cliques=cut)  # the rest still resizes
    assert small.conv2.out_channels == 16 and small.conv1.out_channels == 3
