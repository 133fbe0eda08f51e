"""morphkit: morph any pretrained PyTorch network to any width.

The public API (see the README and DESIGN.md) is re-exported here. timm is
imported only when a ``timm:`` model is built.
"""

from __future__ import annotations

__version__ = "0.1.0"

from morphkit.clique import Clique, Member, width_map
from morphkit.config import INRConfig, MorphConfig, SmoothConfig, TrainConfig
from morphkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MorphkitError,
    TrainingError,
    UnsupportedModelError,
)
from morphkit.models import build_model, example_inputs_for
from morphkit.data import load_data, make_loaders
from morphkit.solver import path_length, shortest_hamiltonian_path
from morphkit.fuse import fuse_bn
from morphkit.graph import find_cliques
from morphkit.smooth import smooth, total_variation
from morphkit.resize import resize
from morphkit.export import load_model, model_info, save_model
from morphkit.fit import evaluate, fit
from morphkit.manifold import Manifold
from morphkit.train import morph
from morphkit.baselines import prune, train_individual, train_slimmable
from morphkit.compare import compare, write_report

__all__ = [
    "__version__",
    "MorphkitError", "ConfigError", "UnsupportedModelError", "CheckpointError", "DataError", "TrainingError",
    "MorphConfig", "INRConfig", "TrainConfig", "SmoothConfig",
    "Clique", "Member", "width_map",
    "build_model", "example_inputs_for", "load_data", "make_loaders",
    "fuse_bn", "find_cliques", "smooth", "total_variation", "shortest_hamiltonian_path", "path_length",
    "resize", "morph", "Manifold",
    "save_model", "load_model", "model_info", "fit", "evaluate",
    "prune", "train_individual", "train_slimmable", "compare", "write_report",
]
