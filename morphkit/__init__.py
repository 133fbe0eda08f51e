"""morphkit: morph any pretrained PyTorch network to any width.

The public API (see the README and DESIGN.md) is re-exported here, loaded on
first use (PEP 562), so ``import morphkit`` and ``morphkit --help`` do not
import torch; ``mk.build_model`` and friends import what they need when first
touched. timm is imported only when a ``timm:`` model is built.

Example:
    >>> import morphkit as mk
    >>> mk.MorphConfig().samples
    50
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["MorphkitError", "ConfigError", "UnsupportedModelError", "CheckpointError", "DataError",
                     "TrainingError", "MissingDependencyError"], "morphkit.errors"),
    **dict.fromkeys(["MorphConfig", "INRConfig", "TrainConfig", "SmoothConfig"], "morphkit.config"),
    **dict.fromkeys(["Clique", "CliqueList", "Member", "width_map"], "morphkit.clique"),
    **dict.fromkeys(["build_model", "example_inputs_for"], "morphkit.models"),
    **dict.fromkeys(["load_data", "make_loaders"], "morphkit.data"),
    **dict.fromkeys(["shortest_hamiltonian_path", "path_length"], "morphkit.solver"),
    "fuse_bn": "morphkit.fuse",
    "find_cliques": "morphkit.graph",
    **dict.fromkeys(["smooth", "total_variation"], "morphkit.smooth"),
    "resize": "morphkit.resize",
    **dict.fromkeys(["save_model", "load_model", "model_info", "count_params"], "morphkit.export"),
    **dict.fromkeys(["save_onnx", "onnx_info"], "morphkit.onnx_export"),
    **dict.fromkeys(["search", "SearchResult"], "morphkit.search"),
    **dict.fromkeys(["fit", "evaluate"], "morphkit.fit"),
    "Manifold": "morphkit.manifold",
    "morph": "morphkit.train",
    **dict.fromkeys(["prune", "train_individual", "train_slimmable"], "morphkit.baselines"),
    **dict.fromkeys(["compare", "write_report"], "morphkit.compare"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("__") and importlib.util.find_spec(f"morphkit.{name}") is not None:
            return importlib.import_module(f"morphkit.{name}")  # a submodule: ``mk.export.count_params``
        raise AttributeError(f"module 'morphkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


#: Public functions named like the submodule that defines them (``morphkit.resize.resize``).
_SHADOWED = frozenset(name for name, module in _EXPORTS.items() if module == f"morphkit.{name}")


class _Package(types.ModuleType):
    """Keeps ``mk.resize`` (and ``fit``, ``smooth``, ``compare``) the function once its submodule is imported.

    Importing ``morphkit.resize`` sets the package attribute ``resize`` to the
    submodule; the function is stored instead, as the eager imports did before.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static analysers and IDEs see the names eagerly
    from morphkit.baselines import prune, train_individual, train_slimmable
    from morphkit.clique import Clique, CliqueList, Member, width_map
    from morphkit.compare import compare, write_report
    from morphkit.config import INRConfig, MorphConfig, SmoothConfig, TrainConfig
    from morphkit.data import load_data, make_loaders
    from morphkit.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        MissingDependencyError,
        MorphkitError,
        TrainingError,
        UnsupportedModelError,
    )
    from morphkit.export import count_params, load_model, model_info, save_model
    from morphkit.fit import evaluate, fit
    from morphkit.fuse import fuse_bn
    from morphkit.graph import find_cliques
    from morphkit.manifold import Manifold
    from morphkit.models import build_model, example_inputs_for
    from morphkit.onnx_export import onnx_info, save_onnx
    from morphkit.resize import resize
    from morphkit.search import SearchResult, search
    from morphkit.smooth import smooth, total_variation
    from morphkit.solver import path_length, shortest_hamiltonian_path
    from morphkit.train import morph
