"""morphkit: morph any pretrained PyTorch network to any width.

The public API (see the README and DESIGN.md) is re-exported here. Submodules
are imported on first use, so ``import morphkit`` stays fast and importing the
CLI does not pull in timm or numba until a command needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors
    "MorphkitError": "errors", "ConfigError": "errors", "UnsupportedModelError": "errors",
    "CheckpointError": "errors", "DataError": "errors", "TrainingError": "errors",
    # config and plain data
    "MorphConfig": "config", "INRConfig": "config", "TrainConfig": "config", "SmoothConfig": "config",
    "Clique": "clique", "Member": "clique",
    # models and data
    "build_model": "models", "example_inputs_for": "models",
    "load_data": "data", "make_loaders": "data",
    # the pipeline
    "fuse_bn": "fuse", "find_cliques": "graph", "smooth": "smooth", "total_variation": "smooth",
    "shortest_hamiltonian_path": "solver", "path_length": "solver", "resize": "resize",
    "morph": "train", "Manifold": "manifold",
    # files and training
    "save_model": "export", "load_model": "export", "model_info": "export",
    "fit": "fit", "evaluate": "fit",
    "prune": "baselines",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'morphkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"morphkit.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
