"""Reference models and the model registry.

``build_model(spec)`` turns a name into a freshly initialised ``nn.Module``:
a registry name (``lenet5``, ``resnet20``, ``vae_mnist``, ``mlp``) or
``timm:NAME[?key=value&...]`` (built with ``timm.create_model(...,
pretrained=False)``; nothing is downloaded). Every model built here carries a
``morphkit_arch`` attribute: the JSON-able recipe that rebuilds it, which model
files record so that ``load_model`` needs no Python class from the user.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import torch
import torch.nn.functional as F
from torch import nn

from morphkit.errors import MorphkitError, UnsupportedModelError
from morphkit.untrusted import MAX_INPUT_ELEMENTS, check_arch, probe_shapes  # noqa: F401 - re-exported

__all__ = [
    "LeNet5",
    "ResNet20",
    "VAE",
    "MLP",
    "UNet",
    "REGISTRY",
    "build_model",
    "build_from_arch",
    "arch_of",
    "parse_spec",
    "example_inputs_for",
    "vae_loss",
    "task_of",
    "recipe_of",
]

logger = logging.getLogger(__name__)


class LeNet5(nn.Module):
    """Classic LeNet-5 (6-16-120-84) with ReLU and max-pooling, for 28x28 inputs.

    Example:
        >>> LeNet5()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 6, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, 5, 5)
        x = torch.flatten(x, 1)  # (B, 400)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """3x3-3x3 residual block with BatchNorm; 1x1 projection when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 16/32/64 channels, 3 stages of 3 basic blocks.

    Uses 1x1-conv projection shortcuts (option B), as the common PyTorch CIFAR
    ResNets do; 0.27 M parameters.

    Example:
        >>> ResNet20()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            stage_blocks = []
            for b in range(blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                stage_blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 64)
        return self.fc(x)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv-BatchNorm-ReLU layers (a U-Net level)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class UNet(nn.Module):
    """A three-level U-Net (Ronneberger et al. 2015) for per-pixel classes.

    The decoder levels read ``cat([upsampled, skip])``: the encoder's channels
    and the upsampling's share one input dim, the concatenation morphkit
    morphs. Output: ``(B, num_classes, H, W)`` logits; H and W divisible by 4.

    Example:
        >>> UNet()(torch.zeros(2, 1, 48, 48)).shape
        torch.Size([2, 11, 48, 48])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 11, widths: tuple[int, int, int] = (16, 32, 64)
                 ) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.enc1 = _double_conv(in_channels, w0)
        self.enc2 = _double_conv(w0, w1)
        self.mid = _double_conv(w1, w2)
        self.up2 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec2 = _double_conv(2 * w1, w1)
        self.up1 = nn.ConvTranspose2d(w1, w0, 2, stride=2)
        self.dec1 = _double_conv(2 * w0, w0)
        self.head = nn.Conv2d(w0, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)  # (B, w0, H, W)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, w1, H/2, W/2)
        m = self.mid(F.max_pool2d(e2, 2))  # (B, w2, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))  # (B, w1, H/2, W/2)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))  # (B, w0, H, W)
        return self.head(d1)  # (B, num_classes, H, W)


class VAE(nn.Module):
    """MLP variational auto-encoder for 28x28 images (784-400-20-400-784).

    ``forward`` returns ``(reconstruction_logits, mu, logvar)``; in eval mode the
    latent is the mean (deterministic), in training mode it is sampled.

    Example:
        >>> recon, mu, logvar = VAE().eval()(torch.zeros(2, 1, 28, 28))
        >>> recon.shape, mu.shape
        (torch.Size([2, 784]), torch.Size([2, 20]))
    """

    def __init__(self, in_features: int = 784, hidden: int = 400, latent: int = 20) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, in_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(torch.flatten(x, 1)))  # (B, hidden)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)  # (B, latent) each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        recon = self.fc4(F.relu(self.fc3(z)))  # (B, 784) logits
        return recon, mu, logvar


def vae_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Negative ELBO per image (Bernoulli decoder, nats), the VAE's training loss.

    Targets are the input pixels in [0, 1]; inputs normalised with the MNIST
    mean/std are mapped back first, so the loaders' normalised batches work.

    Example:
        >>> x = torch.rand(4, 1, 28, 28)
        >>> float(vae_loss(VAE(), (x, torch.zeros(4)))) > 0
        True
    """
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    target = torch.flatten(x, 1)
    if target.min() < 0 or target.max() > 1:  # normalised with MNIST statistics
        target = (target * 0.3081 + 0.1307).clamp(0, 1)
    recon, mu, logvar = model(x)
    bce = F.binary_cross_entropy_with_logits(recon, target, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kld) / x.shape[0]


class MLP(nn.Module):
    """Flatten, then Linear-ReLU layers and a linear classifier.

    Example:
        >>> MLP(hidden=(32, 16))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] | list[int] = (256, 256),
                 num_classes: int = 10) -> None:
        super().__init__()
        dims = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: how to build the model and what it expects."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    task: str  # "classification", "segmentation" or "vae"
    description: str
    recipe: dict[str, Any]  # fit() defaults of the base-model schedule (optimizer, lr, ...)


REGISTRY: dict[str, ModelEntry] = {
    "lenet5": ModelEntry(LeNet5, (1, 28, 28), "classification", "LeNet-5 for MNIST (61 k params)",
                         {"optimizer": "adam", "lr": 2e-3, "weight_decay": 1e-4, "epochs": 10}),
    "resnet20": ModelEntry(ResNet20, (3, 32, 32), "classification",
                           "CIFAR ResNet-20, 16/32/64 channels (0.27 M params)",
                           {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 200}),
    "vae_mnist": ModelEntry(VAE, (1, 28, 28), "vae", "MLP VAE for MNIST, 784-400-20",
                            {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "epochs": 20}),
    "mlp": ModelEntry(MLP, (1, 28, 28), "classification", "MLP 784-256-256-10",
                      {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 10}),
    "unet": ModelEntry(UNet, (1, 48, 48), "segmentation",
                       "U-Net, 16/32/64 channels, concatenation skips, 11 classes (0.12 M params; mnistseg data)",
                       {"optimizer": "adam", "lr": 2e-3, "weight_decay": 1e-4, "epochs": 12}),
}

DEFAULT_RECIPE: dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "epochs": 10}


def recipe_of(model: nn.Module) -> dict[str, Any]:
    """The base-model training schedule (``fit`` keyword defaults) for a model."""
    arch = arch_of(model)
    if arch and arch["source"] == "morphkit":
        return dict(REGISTRY[arch["name"]].recipe)
    return dict(DEFAULT_RECIPE)


def _coerce(value: str) -> Any:
    """Parse a query-string value as JSON when possible (numbers, lists, bools)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_spec(spec: str) -> dict[str, Any]:
    """Parse a model spec into an ``arch`` dict.

    Args:
        spec: ``"lenet5"``, ``"timm:resnet18"`` or ``"timm:resnet18?num_classes=10"``.

    Returns:
        ``{"source": "morphkit" | "timm", "name": str, "kwargs": dict}``.

    Example:
        >>> parse_spec("timm:resnet18?num_classes=10")
        {'source': 'timm', 'name': 'resnet18', 'kwargs': {'num_classes': 10}}
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnsupportedModelError(f"model spec must be a non-empty string, got {spec!r}")
    name, _, query = spec.strip().partition("?")
    kwargs = {k: _coerce(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    if name.startswith("timm:"):
        return {"source": "timm", "name": name[5:], "kwargs": kwargs}
    if name not in REGISTRY:
        raise UnsupportedModelError(
            f"unknown model {name!r}; expected one of {sorted(REGISTRY)} or 'timm:NAME' "
            "(or a model file written by save_model)")
    return {"source": "morphkit", "name": name, "kwargs": kwargs}


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """Build a freshly initialised model from an ``arch`` dict (see :func:`parse_spec`).

    The arch is checked first (:func:`morphkit.untrusted.check_arch`: the
    allow-list of constructor arguments), then the model is sized on the meta
    device and refused above ``MAX_MODEL_ELEMENTS`` values before any memory is
    allocated.

    Raises:
        UnsupportedModelError: a malformed arch, an argument off the allow-list,
            an unknown name, arguments the constructor rejects, or a model too
            large (or, with arguments, one that cannot be sized first).
    """
    check_arch(arch)
    source, name = arch["source"], arch["name"]
    kwargs = dict(arch.get("kwargs") or {})
    build = _constructor(source, name, kwargs)
    probe_shapes(build, f"{source}:{name} {kwargs}" if kwargs else f"{source}:{name}", strict=bool(kwargs))
    try:
        model = build()
    except MorphkitError:
        raise
    except Exception as e:  # noqa: BLE001 - constructors raise many kinds on bad arguments
        raise UnsupportedModelError(f"cannot build {source}:{name} with arguments {kwargs!r:.200}: "
                                    f"{type(e).__name__}: {str(e)[:200]}") from e
    model.morphkit_arch = {"source": source, "name": name, "kwargs": kwargs,
                           "input_shape": list(arch.get("input_shape") or _input_shape(source, name, model))}
    return model


def _constructor(source: str, name: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    """A function that builds the (checked) arch; raises for an unknown name."""
    if source == "morphkit":
        if name not in REGISTRY:
            raise UnsupportedModelError(f"unknown morphkit model {name!r}; expected one of {sorted(REGISTRY)}")
        return lambda: REGISTRY[name].factory(**kwargs)
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise UnsupportedModelError("timm models need the 'timm' package: pip install timm") from e
    if not timm.is_model(name):
        raise UnsupportedModelError(f"unknown timm model {name!r}; see timm.list_models() for valid names")
    # pretrained=False and no path argument (check_arch): nothing is downloaded or read from disk
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def build_model(spec: str) -> nn.Module:
    """Build a freshly initialised model from a registry name or ``timm:NAME``.

    Args:
        spec: See :func:`parse_spec`.

    Returns:
        The model, with a ``morphkit_arch`` attribute recording how to rebuild it.

    Example:
        >>> m = build_model("lenet5")
        >>> m.morphkit_arch["name"], m.morphkit_arch["input_shape"]
        ('lenet5', [1, 28, 28])
    """
    return build_from_arch(parse_spec(spec))


def _input_shape(source: str, name: str, model: nn.Module) -> tuple[int, ...]:
    if source == "morphkit":
        return REGISTRY[name].input_shape
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def arch_of(model: nn.Module) -> dict[str, Any] | None:
    """Return the ``morphkit_arch`` recipe of a model built by morphkit, else ``None``."""
    arch = getattr(model, "morphkit_arch", None)
    return copy.deepcopy(arch) if isinstance(arch, dict) else None


def task_of(model: nn.Module) -> str:
    """The registry model's task (``"vae"``, ``"segmentation"``), else ``"classification"``."""
    arch = arch_of(model)
    if arch and arch["source"] == "morphkit":
        return REGISTRY[arch["name"]].task
    return "classification"


def example_inputs_for(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A random input of the shape the model expects (from its ``morphkit_arch``).

    Raises:
        UnsupportedModelError: when the model carries no recorded input shape.
    """
    arch = arch_of(model)
    if not arch or not arch.get("input_shape"):
        raise UnsupportedModelError(
            f"{type(model).__name__} records no input shape; pass example_inputs explicitly "
            "(or --input-shape C,H,W on the command line)")
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *arch["input_shape"], generator=g)
