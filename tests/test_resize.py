"""Resizing: shapes and attributes, width maps and their errors, determinism, caller untouched."""

from __future__ import annotations

import math

import pytest
import torch
from _nets import CatNet
from torch import nn

from morphkit.errors import ConfigError
from morphkit.graph import find_cliques
from morphkit.models import build_model
from morphkit.resize import resize


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def lenet():
    m = build_model("lenet5")
    x = torch.randn(1, 1, 28, 28)
    return m, x, find_cliques(m, x)


def test_lenet_half_width(lenet):
    model, x, cs = lenet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = resize(model, x, 0.5, cs, check=True)
    assert (small.conv1.out_channels, small.conv2.in_channels, small.conv2.out_channels) == (3, 3, 8)
    assert (small.fc1.in_features, small.fc1.out_features, small.fc2.out_features) == (200, 60, 42)
    assert small(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert n_params(small) < n_params(model)
    assert small.morphkit_widths == {0: 1, 1: 3, 2: 8, 3: 60, 4: 42, 5: 10}
    assert small.morphkit_arch == model.morphkit_arch
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the first channels are kept, every flattened position of a kept channel in order
    assert torch.equal(small.conv1.weight, model.conv1.weight[:3])
    assert torch.equal(small.fc1.weight, model.fc1.weight[:60, :200])


def test_width_map_and_full_width(lenet):
    model, x, cs = lenet
    small = resize(model, x, {3: 17}, cs)
    assert small.fc1.out_features == 17 and small.conv1.out_channels == 6
    assert small.morphkit_widths[3] == 17 and small.morphkit_widths[1] == 6
    full = resize(model, x, 1.0, cs)
    assert shapes(full) == shapes(model)
    with torch.no_grad():
        assert torch.equal(full(x), model(x))


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, math.nan, math.inf, True, "0.5", None, [0.5],
                                 {99: 3}, {1: 0}, {1: 7}, {1: 2.5}, {1: True}, {0: 2}, {5: 3}, {"x": 3}])
def test_bad_widths_raise_config_error(lenet, bad):
    model, x, cs = lenet
    with pytest.raises(ConfigError):
        resize(model, x, bad, cs)


def test_blocked_counts_must_be_multiples():
    model = CatNet().eval()
    x = torch.randn(1, 3, 16, 16)
    cs = find_cliques(model, x)
    grouped = next(c for c in cs if c.block == 6 and not c.tied)
    with pytest.raises(ConfigError, match="multiple"):
        resize(model, x, {grouped.id: 10}, cs)
    small = resize(model, x, {grouped.id: 12}, cs, check=True)
    assert small.g.out_channels == 12 and small.g.groups == 4 and small.gn.num_channels == 12


def test_concat_depthwise_grouped_half_width():
    model = CatNet().eval()
    x = torch.randn(2, 3, 16, 16)
    cs = find_cliques(model, x)
    small = resize(model, x, 0.5, cs, check=True)
    assert (small.a.out_channels, small.b.out_channels) == (3, 5)
    assert small.dw.in_channels == small.dw.out_channels == small.dw.groups == 8
    assert small.bn1.num_features == 8 and small.pw1.in_channels == 8
    assert (small.g.in_channels, small.g.out_channels, small.g.groups) == (12, 12, 4)
    assert small.g.weight.shape == (12, 3, 3, 3) and small.gn.num_channels == 12
    assert small(x).shape == (2, 5)
    # the kept depthwise filters are the first of each branch
    assert torch.equal(small.dw.weight, model.dw.weight[[0, 1, 2, 6, 7, 8, 9, 10]])


def test_resize_is_deterministic_and_reloadable():
    model = build_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    small = resize(model, x, 0.25)
    again = resize(model, x, 0.25)
    assert shapes(small) == shapes(again)
    # what load_model does: rebuild from the recorded width map on a fresh base
    rebuilt = resize(build_model("resnet20"), x, small.morphkit_widths)
    assert shapes(rebuilt) == shapes(small)
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), small.eval()(x))
    assert small.layer3[0].conv1.out_channels == 16 and small.fc.in_features == 16


def test_attention_heads_shrink():
    model = build_model("timm:vit_tiny_patch16_224?img_size=32&depth=2").eval()
    x = torch.randn(1, 3, 32, 32)
    small = resize(model, x, 0.5, check=True)
    attn = small.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features, attn.proj.in_features) == (3, 32, 288, 96)
    assert math.isclose(attn.scale, 32 ** -0.5)
    assert small.pos_embed.shape[-1] == 96 and small.cls_token.shape[-1] == 96
    out_fused = small(x)
    for blk in small.blocks:
        blk.attn.fused_attn = False
    assert torch.allclose(out_fused, small(x), atol=1e-5)  # both attention paths agree
