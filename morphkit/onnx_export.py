"""ONNX export of a (resized) model: ``save_onnx`` / ``onnx_info``.

``save_onnx`` writes a standard ONNX model (TorchScript-traced by
``torch.onnx.export``, batch dimension dynamic) that any ONNX runtime runs
without morphkit or PyTorch. morphkit's record of the model goes into the ONNX
model's ``metadata_props`` as JSON strings: ``morphkit.format``,
``morphkit.version``, ``morphkit.arch``, ``morphkit.widths`` (the width map),
``morphkit.source`` (e.g. the manifold it was sampled from), ``morphkit.inputs``,
``morphkit.params`` and ``morphkit.user`` (any extra fields). The file is
written atomically (a temporary file renamed over the target), and by default
the exported graph is run once in onnxruntime (when installed) against the
PyTorch model, so a file that was written also computes what the model does.

Needs the optional ``onnx`` package (``pip install 'morphkit[onnx]'``, which also
brings ``onnxruntime``).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphkit import __version__
from morphkit._io import atomic_write_bytes
from morphkit.errors import ConfigError, MissingDependencyError, UnsupportedModelError

__all__ = ["save_onnx", "onnx_info", "ONNX_FORMAT", "DEFAULT_OPSET"]

logger = logging.getLogger(__name__)

#: ``morphkit.format`` of the ONNX files morphkit writes.
ONNX_FORMAT = "morphkit.onnx/1"
#: ONNX opset written by default (onnxruntime >= 1.12 runs it).
DEFAULT_OPSET = 17
#: ``verify``: largest difference between onnxruntime and PyTorch, relative to the largest output value.
VERIFY_RTOL = 1e-3
#: Protobuf cannot serialise one message of 2 GiB or more.
MAX_ONNX_BYTES = (1 << 31) - 1


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError("ONNX export needs the onnx package, which is not installed; "
                                     "install it with: pip install 'morphkit[onnx]'") from e
    return onnx


def _inputs_for(model: nn.Module, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs: the given ones, the shapes recorded by ``resize``/``sample``, or the arch's input shape."""
    from morphkit.graph import as_inputs

    if example_inputs is not None:
        inputs = as_inputs(example_inputs)
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise ConfigError(f"example_inputs: got {type(example_inputs).__name__}, expected a tensor or a "
                              "tuple of tensors the model accepts")
        return tuple(inputs)
    spec = getattr(model, "morphkit_inputs", None)
    if spec is not None:
        from morphkit.resize import inputs_from_spec

        try:
            return tuple(t.normal_() if t.is_floating_point() else t for t in inputs_from_spec(spec))
        except ValueError:
            pass  # a malformed record: fall back to the architecture's input shape
    from morphkit.models import arch_of, example_inputs_for

    arch = arch_of(model)
    if arch and arch.get("input_shape"):
        return (example_inputs_for(model),)
    raise ConfigError(f"cannot tell what input a {type(model).__name__} takes; pass example_inputs= "
                      "(a tensor or tuple of tensors the model accepts, e.g. torch.zeros(1, 3, 224, 224))")


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return []


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def save_onnx(model: nn.Module, path: str | Path, example_inputs: Any = None, *, opset: int = DEFAULT_OPSET,
              dynamic_batch: bool = True, verify: bool = True, source: str | None = None,
              **metadata: Any) -> None:
    """Write a model as a standard ONNX file with morphkit's metadata, atomically.

    Args:
        model: Any ``nn.Module``; typically one from ``Manifold.sample``,
            ``resize`` or ``load_model`` (their width map and input shapes are recorded).
        path: Target file (``.onnx``); its directory must exist.
        example_inputs: A tensor or tuple of tensors to trace with. Default:
            the input shapes the model recorded when it was resized or sampled,
            else its architecture's input shape.
        opset: ONNX opset version.
        dynamic_batch: Make dimension 0 of every input and output dynamic.
        verify: Run the exported graph in onnxruntime (when installed) on the
            example inputs and raise if it differs from the PyTorch model by
            more than ``VERIFY_RTOL`` of the largest output value.
        source: Where the model came from (e.g. the manifold file), stored as ``morphkit.source``.
        **metadata: Extra JSON-serialisable fields, stored as ``morphkit.user``.

    Raises:
        MissingDependencyError: the ``onnx`` package is not installed.
        ConfigError: no example inputs can be found, or metadata is not JSON-serialisable.
        UnsupportedModelError: the model cannot be traced to ONNX, or onnxruntime disagrees with it.
        CheckpointError: the file cannot be written (missing directory, permissions, disk full).

    Example:
        >>> import os, tempfile, torch, morphkit as mk
        >>> net = mk.resize(mk.build_model("lenet5"), torch.zeros(1, 1, 28, 28), 0.5)
        >>> p = os.path.join(tempfile.mkdtemp(), "lenet-w50.onnx")
        >>> mk.save_onnx(net, p, source="lenet.morph.safetensors")  # doctest: +SKIP
        >>> mk.onnx_info(p)["metadata"]["widths"]  # doctest: +SKIP
        {'0': 3, '1': 8, '2': 60, '3': 42, '4': 10}
    """
    onnx = _require_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 7 <= opset <= 30:
        raise ConfigError(f"opset: got {opset!r}, expected an ONNX opset version such as {DEFAULT_OPSET}")
    inputs = _inputs_for(model, example_inputs)
    widths = getattr(model, "morphkit_widths", None)
    from morphkit.export import count_params
    from morphkit.models import arch_of
    from morphkit.resize import input_spec

    props = {
        "morphkit.format": ONNX_FORMAT,
        "morphkit.version": __version__,
        "morphkit.arch": arch_of(model),
        "morphkit.widths": None if widths is None else {str(k): int(v) for k, v in widths.items()},
        "morphkit.source": source,
        "morphkit.inputs": input_spec(inputs),
        "morphkit.params": count_params(model),
        "morphkit.user": metadata,
    }
    try:
        props_text = {k: json.dumps(v) for k, v in props.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"ONNX metadata must be JSON-serialisable: {e}") from e

    net = copy.deepcopy(model).float().eval().cpu()
    inputs = tuple(t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu() for t in inputs)
    with torch.no_grad():
        try:
            reference = _flatten(net(*inputs))
        except Exception as e:  # noqa: BLE001 - any failure means the inputs do not fit the model
            raise ConfigError(f"the model does not run on the example inputs {[tuple(t.shape) for t in inputs]} "
                              f"({type(e).__name__}: {str(e)[:200]}); pass matching example_inputs=") from e
    if not reference:
        raise UnsupportedModelError(f"{type(model).__name__} returns no tensor; ONNX needs tensor outputs")
    in_names, out_names = _names("input", len(inputs)), _names("output", len(reference))
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not gone
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(net, inputs, buf, dynamo=False, input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; report one line
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UnsupportedModelError(f"torch.onnx.export cannot export this {type(model).__name__} at opset "
                                        f"{opset}: {first}; try another opset= or simplify the model") from e
    data = buf.getvalue()
    proto = onnx.load_from_string(data)
    for key, text in props_text.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, text
    proto.doc_string = (f"{type(model).__name__} written by morphkit {__version__}"
                        + (f" from {source}" if source else ""))
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if len(data) > MAX_ONNX_BYTES:
        raise UnsupportedModelError(f"the ONNX model is {len(data):,} bytes; one ONNX file holds less than 2 GiB")
    if verify:
        _verify(data, inputs, reference, type(model).__name__)
    atomic_write_bytes(data, path)
    logger.info("wrote %s (ONNX opset %d, %d params)", path, opset, props["morphkit.params"])


def _verify(data: bytes, inputs: tuple[torch.Tensor, ...], reference: list[torch.Tensor], what: str) -> None:
    """Run the ONNX bytes in onnxruntime and compare with the PyTorch outputs (skipped without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        logger.info("onnxruntime is not installed: the ONNX file was not checked against PyTorch")
        return
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)
    for k, (g, r) in enumerate(zip(got, reference)):
        r = r.detach().float().numpy()
        if g.shape != r.shape:
            raise UnsupportedModelError(f"the ONNX export of {what} gives output {k} of shape {g.shape}, PyTorch "
                                        f"{r.shape}; the model does not trace faithfully")
        scale = max(float(abs(r).max()) if r.size else 0.0, 1e-6)
        diff = float(abs(g - r).max()) if r.size else 0.0
        if diff > VERIFY_RTOL * scale:
            raise UnsupportedModelError(f"the ONNX export of {what} differs from PyTorch by {diff:.3g} on output {k} "
                                        f"(largest value {scale:.3g}); the model does not trace faithfully "
                                        "(data-dependent control flow?); pass verify=False to write it anyway")


def onnx_info(path: str | Path) -> dict[str, Any]:
    """Read an ONNX file's inputs, outputs, opset and morphkit metadata.

    Returns:
        ``{"format", "opset", "inputs": [{"name", "shape"}], "outputs": [...],
        "metadata": {"version", "widths", "source", ...}, "other": {key: value}}``:
        ``metadata`` holds the decoded ``morphkit.*`` fields, ``other`` any
        other ``metadata_props``.

    Raises:
        MissingDependencyError: the ``onnx`` package is not installed.
        CheckpointError: the file is missing or is not an ONNX model.

    Example:
        >>> mk.onnx_info("lenet-w50.onnx")["metadata"]["version"]  # doctest: +SKIP
        '0.1.0'
    """
    from morphkit.errors import CheckpointError

    onnx = _require_onnx()
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist or is not a file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise CheckpointError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}); is it another "
                              "kind of file?") from e

    def dims(v: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    meta, other = {}, {}
    for entry in proto.metadata_props:
        if entry.key.startswith("morphkit."):
            try:
                meta[entry.key[len("morphkit."):]] = json.loads(entry.value)
            except ValueError:
                meta[entry.key[len("morphkit."):]] = entry.value
        else:
            other[entry.key] = entry.value
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return {"format": meta.get("format", "onnx"), "opset": opset,
            "inputs": [{"name": v.name, "shape": dims(v)} for v in proto.graph.input],
            "outputs": [{"name": v.name, "shape": dims(v)} for v in proto.graph.output],
            "metadata": meta, "other": other}

