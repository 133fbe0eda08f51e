"""Standard model files: ``save_model`` / ``load_model``.

A model file is one ``.safetensors``: the model's ``state_dict`` plus JSON
metadata with ``format`` (``morphkit.model/1``), ``morphkit_version``, ``arch``
(how to rebuild the base model), ``widths`` (the width map, for a resized
model) and the shape of every key. ``load_model`` rebuilds the base from
``arch`` (or takes ``base=`` for a user's own class), resizes it to the
recorded width map, and loads strictly, so a resized model never hits the
"size mismatch" users know from pruning tools. No pickle: loading never runs
code from the file.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphkit import __version__
from morphkit._io import read_tensors, write_tensors
from morphkit.errors import CheckpointError, MorphkitError
from morphkit.formats import MODEL_FORMAT, format_tag
from morphkit.models import arch_of, build_from_arch

__all__ = ["save_model", "load_model", "model_info", "count_params"]

logger = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Number of parameters (each tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, path: str | Path, **metadata: Any) -> None:
    """Write a model's weights and how to rebuild it, atomically.

    Args:
        model: Any ``nn.Module``. Models from ``build_model``, ``resize`` and
            ``Manifold.sample`` record their architecture and width map, so
            ``load_model`` rebuilds them alone; other models need ``base=``.
        path: Target ``.safetensors`` path; its directory must exist.
        **metadata: Extra JSON-serialisable fields (e.g. ``accuracy=0.99``).

    Example:
        >>> import tempfile, os, morphkit as mk
        >>> p = os.path.join(tempfile.mkdtemp(), "lenet.safetensors")
        >>> mk.save_model(mk.build_model("lenet5"), p, note="demo")
        >>> mk.load_model(p).morphkit_arch["name"]
        'lenet5'
    """
    state = model.state_dict()
    widths = getattr(model, "morphkit_widths", None)
    meta = {
        "format": format_tag(MODEL_FORMAT),
        "morphkit_version": __version__,
        "arch": arch_of(model),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "widths": None if widths is None else {str(k): int(v) for k, v in widths.items()},
        "fused_bn": bool(getattr(model, "morphkit_fused_bn", False)),
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "params": count_params(model),
        "user": metadata,
    }
    write_tensors(dict(state), meta, path)
    logger.info("wrote %s (%d params)", path, meta["params"])


def model_info(path: str | Path) -> dict[str, Any]:
    """Read a model file's metadata without building the model.

    Returns:
        The metadata dict (``format``, ``arch``, ``widths``, ``shapes``, ``params``, ...).
    """
    _, meta = read_tensors(path, expect_format=MODEL_FORMAT)
    return meta


def load_model(path: str | Path, base: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_model` and load its weights strictly.

    Args:
        path: A model file.
        base: A freshly built instance of the base architecture, for models
            morphkit cannot rebuild alone (your own classes). It is copied,
            never modified.

    Returns:
        The model in eval mode, with ``morphkit_arch`` / ``morphkit_widths`` set.

    Raises:
        CheckpointError: missing, truncated or corrupt file, a file of another
            format or newer version, or weights that do not fit the architecture.
    """
    tensors, meta = read_tensors(path, expect_format=MODEL_FORMAT)
    arch = meta.get("arch")
    if base is not None:
        model = copy.deepcopy(base)
        if arch and arch_of(model) is None:
            model.morphkit_arch = arch
    elif arch:
        try:
            model = build_from_arch(arch)
        except MorphkitError as e:
            raise CheckpointError(f"{str(path)!r}: cannot rebuild its architecture: {e}") from e
    else:
        raise CheckpointError(
            f"{str(path)!r} holds a {meta.get('class', 'custom')} model that morphkit cannot rebuild "
            "alone; pass base=YourModel() (a fresh instance of the base architecture)")
    if meta.get("fused_bn"):
        from morphkit.fuse import fuse_bn

        model = fuse_bn(model)
    widths = meta.get("widths")
    shapes = meta.get("shapes") or {k: list(v.shape) for k, v in tensors.items()}
    if widths and _shapes_differ(model, shapes):
        from morphkit.models import example_inputs_for
        from morphkit.resize import resize

        try:
            model = resize(model, example_inputs_for(model), {int(k): int(v) for k, v in widths.items()})
        except MorphkitError as e:
            raise CheckpointError(f"{str(path)!r}: its width map does not fit this architecture: {e}") from e
    _load_strict(model, tensors, path)
    if widths:
        model.morphkit_widths = {int(k): int(v) for k, v in widths.items()}
    return model.eval()


def _shapes_differ(model: nn.Module, shapes: dict[str, list[int]]) -> bool:
    state = model.state_dict()
    return any(k in state and list(state[k].shape) != list(s) for k, s in shapes.items())


def _load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    wrong = sorted(k for k in set(state) & set(tensors) if state[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches, e.g. {k}: file {tuple(tensors[k].shape)} vs "
                         f"model {tuple(state[k].shape)}")
        raise CheckpointError(f"{str(path)!r} does not fit the model it describes ({'; '.join(parts)}); "
                              "is it a file for another model? pass the matching base=")
    model.load_state_dict(tensors, strict=True)
