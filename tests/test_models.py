import pytest
import torch

import morphkit as mk
from morphkit.errors import UnsupportedModelError
from morphkit.models import parse_spec, recipe_of, vae_loss


@pytest.mark.parametrize("name,params", [("lenet5", 61706), ("resnet20", 272474), ("mlp", 269322)])
def test_registry_models_forward_and_size(name, params):
    m = mk.build_model(name).eval()
    x = mk.example_inputs_for(m, 2)
    assert m(x).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == params


def test_lenet_is_classic_6_16_120_84():
    m = mk.build_model("lenet5")
    assert (m.conv1.out_channels, m.conv2.out_channels, m.fc1.out_features, m.fc2.out_features) == (6, 16, 120, 84)


def test_resnet20_has_19_convs_and_bn():
    m = mk.build_model("resnet20")
    convs = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3)]
    assert len(convs) == 19
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())


def test_vae_eval_is_deterministic_and_loss_positive():
    m = mk.build_model("vae_mnist").eval()
    x = torch.rand(3, 1, 28, 28)
    r1, mu, logvar = m(x)
    r2, _, _ = m(x)
    assert torch.equal(r1, r2) and r1.shape == (3, 784) and mu.shape == (3, 20)
    assert vae_loss(m, (x, None)).item() > 0


def test_timm_spec_with_kwargs():
    m = mk.build_model("timm:resnet18?num_classes=7")
    assert m.morphkit_arch == {"source": "timm", "name": "resnet18", "kwargs": {"num_classes": 7},
                               "input_shape": [3, 224, 224]}
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("spec", ["nope", "", "timm:not_a_model", "lenet5?bogus=1"])
def test_bad_specs(spec):
    with pytest.raises(UnsupportedModelError):
        mk.build_model(spec)


def test_parse_spec_and_recipe():
    assert parse_spec("mlp?hidden=[32,16]")["kwargs"] == {"hidden": [32, 16]}
    assert mk.build_model("mlp?hidden=[32,16]").layers[1].out_features == 16
    assert recipe_of(mk.build_model("resnet20"))["optimizer"] == "sgd"


def test_example_inputs_needs_a_recorded_shape():
    with pytest.raises(UnsupportedModelError, match="input shape"):
        mk.example_inputs_for(torch.nn.Linear(2, 2))
