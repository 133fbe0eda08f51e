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
from morphkit.clique import Clique
from morphkit.errors import CheckpointError, ConfigError, MorphkitError
from morphkit.formats import MODEL_FORMAT, format_tag
from morphkit.models import _constructor, arch_of, build_from_arch
from morphkit.untrusted import (  # noqa: F401 - the bounds and readers used to live here
    MAX_BASE_RATIO,
    MAX_FREE_ELEMENTS,
    check_arch,
    check_fits,
    check_model_meta,
    probe_shapes,
)
from morphkit.untrusted import describe_mismatch as _mismatch

__all__ = ["save_model", "load_model", "model_info", "count_params", "check_model_meta", "rebuild_base", "check_base"]

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
    recorded = recorded_cliques(getattr(model, "morphkit_cliques", None), widths)
    meta = {
        "format": format_tag(MODEL_FORMAT),
        "morphkit_version": __version__,
        "arch": arch_of(model),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "widths": None if widths is None else {str(k): int(v) for k, v in widths.items()},
        "cliques": None if recorded is None else [c.to_json() for c in recorded],
        "fused_bn": bool(getattr(model, "morphkit_fused_bn", False)),
        "inputs": getattr(model, "morphkit_inputs", None),
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "params": count_params(model),
        "user": metadata,
    }
    write_tensors(dict(state), meta, path)
    logger.info("wrote %s (%d params)", path, meta["params"])


def recorded_cliques(cliques: Any, widths: dict[int, int] | None) -> list[Clique] | None:
    """The cliques a resized model's file records: those whose width changed and those sharing a
    tensor dim with one of them (a concatenation's other parts); None when there are none.

    With them :func:`load_model` resizes the base without tracing it again
    (timm resnest14d: 10 s of tracing).
    """
    if not widths or not isinstance(cliques, (list, tuple)) or not all(isinstance(c, Clique) for c in cliques):
        return None
    dims = {(m.name, m.dim) for c in cliques if widths.get(c.id, c.size) != c.size for m in c.members}
    keep = [c for c in cliques if any((m.name, m.dim) in dims for m in c.members)]  # changed ones included
    return keep or None


def model_info(path: str | Path) -> dict[str, Any]:
    """Read a model file's metadata without building the model.

    Returns:
        The metadata dict (``format``, ``arch``, ``widths``, ``shapes``, ``params``, ...).

    Raises:
        CheckpointError: missing, truncated or corrupt file, a file of another
            format or newer version, or malformed metadata.
    """
    _, meta = read_tensors(path, expect_format=MODEL_FORMAT)
    check_model_meta(meta, path)
    return meta


def rebuild_base(arch: dict[str, Any], path: str | Path, shapes: dict[str, tuple[int, ...]], *,
                 exact: bool) -> nn.Module:
    """Build the base model a file's ``arch`` describes, checking it against the file's tensors.

    The arch is checked against the allow-list, then the model is built on the
    meta device (no memory) and compared with the file
    (:func:`morphkit.untrusted.check_fits`): the same keys, shapes equal
    (``exact``) or no larger (a resized model), and no more than
    ``MAX_BASE_RATIO`` times the file's size. Only then is it built for real.

    Args:
        arch: The file's ``arch`` (already type-checked).
        path: The file (for messages).
        shapes: ``{state_dict key: shape}`` the base must match.
        exact: Shapes must be equal (a base model, a manifold) rather than no larger.

    Raises:
        CheckpointError: the architecture cannot be built or does not fit the file.
    """
    try:
        check_arch(arch)
        kwargs = dict(arch.get("kwargs") or {})
        probe = probe_shapes(_constructor(arch["source"], arch["name"], kwargs), f"{arch['source']}:{arch['name']}",
                             strict=True)
    except MorphkitError as e:
        raise CheckpointError(f"{str(path)!r}: cannot rebuild its architecture: {e}") from e
    check_fits(probe or {}, shapes, path, exact)
    try:
        return build_from_arch(arch)
    except MorphkitError as e:
        raise CheckpointError(f"{str(path)!r}: cannot rebuild its architecture: {e}") from e


def check_base(base: Any) -> None:
    """A ``base=`` for the loaders: ``None`` or a module with real (not meta-device) tensors.

    Raises:
        ConfigError: not an ``nn.Module``, or its tensors are on the meta device.
    """
    if base is None:
        return
    if not isinstance(base, nn.Module):
        raise ConfigError(f"base must be an nn.Module instance (a fresh model of the base architecture), "
                          f"got {type(base).__name__}")
    meta = next((n for n, t in [*base.named_parameters(), *base.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise ConfigError(f"base is on the meta device ({meta!r} holds no values); pass a model built on the CPU")


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
        ConfigError: ``base`` is not an ``nn.Module``.
    """
    check_base(base)
    tensors, meta = read_tensors(path, expect_format=MODEL_FORMAT)
    check_model_meta(meta, path)
    arch = meta.get("arch")
    widths = {int(k): v for k, v in meta["widths"].items()} if meta.get("widths") else None
    if base is not None:
        model = copy.deepcopy(base)
        if arch and arch_of(model) is None:
            model.morphkit_arch = arch
    elif arch:
        model = rebuild_base(arch, path, {k: tuple(v.shape) for k, v in tensors.items()}, exact=widths is None)
    else:
        raise CheckpointError(
            f"{str(path)!r} holds a {meta.get('class', 'custom')} model that morphkit cannot rebuild "
            "alone; pass base=YourModel() (a fresh instance of the base architecture)")
    if meta.get("fused_bn"):
        from morphkit.fuse import fuse_bn

        model = fuse_bn(model)
    if widths and _shapes_differ(model, tensors):
        from morphkit.graph import find_cliques
        from morphkit.resize import resize

        cliques = _file_cliques(meta, model, path)
        try:
            inputs = _example_inputs(model, meta, path)
            # no validation passes: the recorded width map already says which cliques changed, and
            # _load_strict checks every resulting shape against the file
            if cliques is None:
                model = resize(model, inputs, widths, cliques=find_cliques(model, inputs, check=False))
            else:
                ids = {c.id for c in cliques}
                model = resize(model, inputs, {k: v for k, v in widths.items() if k in ids}, cliques=cliques)
        except MorphkitError as e:
            raise CheckpointError(f"{str(path)!r}: cannot resize its architecture to the recorded width map "
                                  f"{widths}: {e}; is it a file for another model? pass the matching base=") from e
    _load_strict(model, tensors, path)
    if widths:
        model.morphkit_widths = widths
    return model.eval()


def _file_cliques(meta: dict[str, Any], model: nn.Module, path: str | Path) -> list[Clique] | None:
    """The cliques the file records (checked against the base's tensors), or None (trace them)."""
    from morphkit.untrusted import check_structure

    if not meta.get("cliques"):
        return None
    cliques = [Clique.from_json(c) for c in meta["cliques"]]  # shape-checked by check_model_meta
    try:
        check_structure(cliques, [], {k: tuple(v.shape) for k, v in model.state_dict().items()})
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r}: its recorded cliques do not fit the base model ({e}); is it a file "
                              "for another model? pass the matching base=") from e
    return cliques


def _example_inputs(model: nn.Module, meta: dict[str, Any], path: str | Path) -> Any:
    """Inputs to trace the base with: the arch's input shape, else the ones recorded at resize time."""
    from morphkit.models import example_inputs_for
    from morphkit.resize import inputs_from_spec

    arch = arch_of(model)
    if (arch and arch.get("input_shape")) or meta.get("inputs") is None:
        return example_inputs_for(model)  # raises a clear UnsupportedModelError when neither is known
    return inputs_from_spec(meta["inputs"])  # checked by check_model_meta


def _shapes_differ(model: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return any(k in state and state[k].shape != t.shape for k, t in tensors.items())


def _load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    wrong = sorted(k for k in set(state) & set(tensors) if state[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise CheckpointError(f"{str(path)!r} does not fit the model it describes "
                              f"({_mismatch(missing, unexpected, wrong, shapes, state)}); "
                              "is it a file for another model? pass the matching base=")
    kinds = sorted(k for k in state if state[k].is_floating_point() != tensors[k].is_floating_point()
                   or state[k].is_complex() != tensors[k].is_complex())
    if kinds:
        k = kinds[0]
        raise CheckpointError(f"{str(path)!r}: tensor {k!r} is {tensors[k].dtype} in the file but "
                              f"{state[k].dtype} in the model; the file is corrupt — write it again")
    try:
        from morphkit.graph import with_metadata

        model.load_state_dict(with_metadata(model, tensors), strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r}: its weights cannot be loaded into the model: {e}") from e
