"""BatchNorm fusion: exact outputs, same keys and shapes, unfoldable BatchNorms left alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from morphkit.fuse import _unit_variance, bn_pairs, fuse_bn
from morphkit.models import build_model


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (in place)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fuse_resnet20_exact_same_keys_and_caller_untouched():
    model = randomize_bn(build_model("resnet20")).eval()
    before = snapshot(model)
    x = torch.randn(4, 3, 32, 32)
    fused = fuse_bn(model, x[:1])
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) <= 1e-5
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(fused.morphkit_fused_bn) == 21 and fused.morphkit_unfused_bn == []
    assert fused.morphkit_arch == model.morphkit_arch
    # conv bias=False: the conv takes the scale, the BatchNorm keeps only the shift
    bn = fused.bn1
    assert fused.conv1.bias is None
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.running_mean, torch.zeros(16))
    assert torch.equal(bn.running_var + bn.eps, torch.ones(16))
    assert not torch.equal(bn.bias, torch.zeros(16))


def test_fuse_without_inputs_uses_the_recorded_input_shape():
    model = randomize_bn(build_model("resnet20")).eval()
    fused = fuse_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) <= 1e-5


class Mixed(nn.Module):
    """Conv with bias -> BN; linear -> BN1d; and four BatchNorms that must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)  # has a bias
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)  # after a ReLU: pre-activation, not foldable
        self.c3 = nn.Conv2d(8, 8, 1, bias=False)
        self.b3 = nn.BatchNorm2d(8)  # c3's output is also used by the residual: not foldable
        self.c4 = nn.Conv2d(8, 8, 1, bias=False)
        self.b4 = nn.BatchNorm2d(8, affine=False)  # foldable: the shift goes to running_mean
        self.c5 = nn.Conv2d(8, 8, 1, bias=False)
        self.b5 = nn.BatchNorm2d(8, track_running_stats=False)  # batch statistics: not foldable
        self.fc = nn.Linear(8, 6)
        self.b6 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = self.b2(F.relu(self.c2(x)))
        y = self.c3(x)
        x = self.b3(y) + y
        x = self.b4(self.c4(x))
        x = self.b5(self.c5(x))
        return self.b6(self.fc(x.mean((2, 3))))


def test_fuse_mixed_cases():
    torch.manual_seed(0)
    model = randomize_bn(Mixed()).eval()
    x = torch.randn(3, 3, 8, 8)
    fused = fuse_bn(model, x)
    assert sorted(fused.morphkit_fused_bn) == ["b1", "b4", "b6"]
    assert sorted(fused.morphkit_unfused_bn) == ["b2", "b3", "b5"]
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) <= 1e-5
    assert torch.equal(fused.b1.bias, torch.zeros(8))  # the conv had a bias: it took the shift
    assert not torch.equal(fused.c1.bias, model.c1.bias)
    assert torch.equal(fused.b2.weight, model.b2.weight)  # left alone


def test_fuse_fx_fallback_without_inputs():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))).eval()
    pairs, unfused = bn_pairs(model)
    assert pairs == [("0", "1")] and unfused == ["5"]
    fused = fuse_bn(model)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) <= 1e-5


def test_fuse_reused_bn_is_left_alone():
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(self.bn(self.conv(x))))

    model = randomize_bn(Reuse()).eval()
    x = torch.randn(2, 4, 5, 5)
    fused = fuse_bn(model, x)
    assert fused.morphkit_unfused_bn == ["bn"]
    with torch.no_grad():
        assert torch.equal(model(x), fused(x))


def test_unit_variance_is_exact():
    for eps in (1e-5, 1e-3, 1e-6):
        v = torch.tensor(_unit_variance(eps, torch.float32))
        x = torch.randn(5, 3)
        y = F.batch_norm(x, torch.zeros(3), v.repeat(3), torch.ones(3), torch.zeros(3), False, 0.0, eps)
        assert torch.equal(x, y)


def test_fuse_model_without_bn_is_a_copy():
    model = build_model("lenet5")
    fused = fuse_bn(model)
    assert fused is not model and fused.morphkit_fused_bn == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fused.state_dict().values()))
