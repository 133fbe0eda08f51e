"""Everything morphkit reads from a file it did not write in this process, checked in one place.

A model, manifold or data file may come from anywhere: a colleague, a download,
an attacker. This module is the single place where what such a file (or a CLI
model spec such as ``timm:NAME?key=value``) may ask for is decided, so a
reviewer can read the whole policy top to bottom:

1. **Bounds** (the ``MAX_*`` constants): every size a file or an argument can
   choose is checked against one of them *before* work or memory is spent.
2. **The allow-list** of model constructor arguments (:data:`REGISTRY_KWARGS`,
   :data:`TIMM_KWARGS`, :func:`check_arch`): architecture arguments only. Never
   a path, ``pretrained*``, ``checkpoint_path``, ``pretrained_cfg*``, a cache or
   hub setting, or anything else that could make a constructor open a file
   named in metadata (and so unpickle it); names are plain identifiers, values
   plain JSON numbers, booleans, short identifier strings and flat lists of them.
3. **Sizing before building** (:func:`probe_shapes`): a model whose arguments
   come from outside is first built on the meta device (no memory), its values
   counted, and refused above :data:`MAX_MODEL_ELEMENTS`.
4. **Metadata readers**: :func:`check_model_meta` (model files) and
   :func:`parse_manifold_meta` (manifold files) type-check every field and
   return plain objects; nothing else looks inside a file's JSON.
5. **Text for terminals and messages** (:func:`for_terminal`, :func:`clip`):
   escape sequences, control characters and lone surrogates from a file are
   made visible, and length is bounded.

Nothing in morphkit unpickles: files are safetensors (plain tensors + JSON), and
``tests/test_bad_input.py`` fails if ``torch.load``, ``pickle`` or
``np.load`` without ``allow_pickle=False`` appears in the package
(``test_source_has_no_unpickling``), or if loading a file, hostile or valid,
unpickles anything or opens a file its metadata names
(``test_arch_never_reaches_a_file``, ``test_valid_files_never_unpickle``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphkit.config import MAX_SAMPLES, MorphConfig
from morphkit.errors import MAX_MESSAGE_CHARS, CheckpointError, ConfigError, MorphkitError, UnsupportedModelError

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_MESSAGE_CHARS", "MAX_SAMPLES", "MAX_INPUT_ELEMENTS", "MAX_MODEL_ELEMENTS", "MAX_BASE_RATIO",
    "MAX_FREE_ELEMENTS", "MAX_ARCH_KWARGS", "MAX_IDX_BYTES", "MAX_ARCHIVE_MEMBER_BYTES", "MAX_IMAGE_PIXELS",
    "MAX_DECODED_BYTES", "MAX_INR_TRUNK", "MAX_FILE_SAMPLES", "REGISTRY_KWARGS", "TIMM_KWARGS",
    "check_arch", "check_arch_kwargs", "check_samples", "check_config_budget", "probe_shapes", "check_fits",
    "check_model_meta", "parse_manifold_meta", "check_structure", "for_terminal", "clip", "describe_mismatch",
]

# =========================================================================== 1. bounds

# MAX_MESSAGE_CHARS (imported from errors.py, which everything imports): the longest error message;
#   longer text is cut with a note.
# MAX_SAMPLES (imported from config.py): the largest ``samples`` (K noisy draws averaged) from any
#   source: an argument, a flag, a config, a file (see also MAX_FILE_SAMPLES below).
#: Largest example input (elements) an ``arch`` or a manifold file may ask for.
MAX_INPUT_ELEMENTS = 1 << 26
#: Largest model (parameters + buffers, counted on the meta device) built from a spec or a file's ``arch``.
MAX_MODEL_ELEMENTS = 1 << 31
#: A base rebuilt from a file's ``arch`` may hold this many times the file's values (a model resized
#: to 1/64 width), or up to ``MAX_FREE_ELEMENTS``; more means a corrupt or hostile ``arch``.
MAX_BASE_RATIO = 4096
MAX_FREE_ELEMENTS = 1 << 28
#: At most this many constructor arguments, list items per argument, and characters per string value.
MAX_ARCH_KWARGS = 32
MAX_ARCH_LIST = 64
MAX_ARCH_STRING = 64
#: Largest integer an architecture argument may hold (channel counts, classes, image sizes).
MAX_ARCH_INT = 1 << 24
#: Largest decompressed idx (MNIST) file; the header's dims must also agree with it.
MAX_IDX_BYTES = 1 << 30
#: Largest single member of an image archive (one encoded image), and largest decoded image.
MAX_ARCHIVE_MEMBER_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 1 << 26
#: Largest total of decoded pixel bytes of one data set held in memory.
MAX_DECODED_BYTES = 32 << 30
#: Largest INR trunk (hidden^2 x layers weights) a config may ask for: each of hidden and layers can be
#: in range while together they need hundreds of GB (16384^2 x 256 = 69 G weights).
MAX_INR_TRUNK = 1 << 28
#: A manifold file's own default K (``config.samples``) above this is lowered to it on load (with a
#: warning): the file decides how long ``sample()`` runs when the caller passes no ``samples=``.
MAX_FILE_SAMPLES = 1000


def check_config_budget(config: MorphConfig) -> None:
    """Refuse a config whose INR would be huge although each value is in range.

    Raises:
        ConfigError: ``hidden**2 * layers`` above ``MAX_INR_TRUNK``.

    Example:
        >>> check_config_budget(MorphConfig())
    """
    trunk = config.inr.hidden ** 2 * config.inr.layers
    if trunk > MAX_INR_TRUNK:
        raise ConfigError(f"inr.hidden {config.inr.hidden} x inr.layers {config.inr.layers}: an INR trunk of "
                          f"{trunk:,} weights (hidden^2 x layers), more than the {MAX_INR_TRUNK:,} morphkit trains; "
                          "the defaults are hidden 64, layers 3")


def check_samples(samples: Any, what: str = "samples") -> int:
    """An int in ``[1, MAX_SAMPLES]`` (K noisy draws averaged), else :class:`ConfigError`.

    Example:
        >>> check_samples(50)
        50
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise ConfigError(f"{what} must be an int in [1, {MAX_SAMPLES}] (noisy draws averaged; 50 is the "
                          f"default), got {samples!r:.40}")
    return samples


# =========================================================================== 2. the allow-list

#: Constructor arguments of morphkit's registry models (every one an architecture argument).
REGISTRY_KWARGS: dict[str, frozenset[str]] = {
    "lenet5": frozenset({"in_channels", "num_classes"}),
    "resnet20": frozenset({"num_classes", "widths", "blocks"}),
    "vae_mnist": frozenset({"in_features", "hidden", "latent"}),
    "mlp": frozenset({"in_features", "hidden", "num_classes"}),
    "unet": frozenset({"in_channels", "num_classes", "widths"}),
}

#: timm constructor arguments a file or spec may set: shapes and regularisation of the architecture.
#: Deliberately absent: ``pretrained*``, ``checkpoint_path``, ``cache_dir``, ``pretrained_cfg*``,
#: ``hf_hub*``, ``features_only``, ``scriptable``/``exportable``/``no_jit``, layer classes.
TIMM_KWARGS: frozenset[str] = frozenset({
    "num_classes", "in_chans", "global_pool", "img_size", "patch_size", "output_stride",
    "drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate",
    "patch_drop_rate", "embed_dim", "embed_dims", "depth", "depths", "num_heads", "mlp_ratio", "mlp_ratios",
    "qkv_bias", "qk_norm", "class_token", "no_embed_class", "reg_tokens", "init_values", "window_size",
    "channels", "widths", "dims", "layers", "stem_width", "stem_type", "base_width", "cardinality",
    "width_multiplier", "channel_multiplier", "depth_multiplier", "num_features", "head_hidden_size",
})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")  # a model name: no ':', '/', '\' (no hub, no path)
_WORD = re.compile(rf"[A-Za-z0-9_\-]{{0,{MAX_ARCH_STRING}}}\Z")  # a string argument: 'avg', 'deep', ''


def check_arch_kwargs(source: str, name: str, kwargs: Any) -> None:
    """Check constructor arguments against the allow-list (names) and plain-value rules (values).

    Raises:
        UnsupportedModelError: not a dict, too many, a name not on the allow-list
            for ``source``/``name``, or a value that is not a plain number,
            boolean, identifier-like string or flat list of those.

    Example:
        >>> check_arch_kwargs("timm", "resnet18", {"num_classes": 10})
        >>> check_arch_kwargs("timm", "resnet18", {"checkpoint_path": "x.pth"})
        Traceback (most recent call last):
        ...
        morphkit.errors.UnsupportedModelError: model argument 'checkpoint_path' is not allowed ...
    """
    if not isinstance(kwargs, dict):
        raise UnsupportedModelError(f"arch['kwargs'] must be a dict of constructor arguments, got {kwargs!r:.80}")
    if len(kwargs) > MAX_ARCH_KWARGS:
        raise UnsupportedModelError(f"arch['kwargs'] has {len(kwargs)} arguments, at most {MAX_ARCH_KWARGS} allowed")
    allowed = REGISTRY_KWARGS.get(name, frozenset()) if source == "morphkit" else TIMM_KWARGS
    for key, value in kwargs.items():
        if not isinstance(key, str) or key not in allowed:
            why = ("only architecture arguments may come from a file or a model spec; paths, pretrained weights, "
                   "checkpoints, caches and hub settings never do")
            raise UnsupportedModelError(f"model argument {key!r:.60} is not allowed for {source}:{name:.60}: {why} "
                                        f"(allowed: {', '.join(sorted(allowed)) or 'none'}); build the model "
                                        "yourself and pass it (base=) to use other arguments")
        _check_value(key, value, nested=False)


def _check_value(key: str, value: Any, nested: bool) -> None:
    ok = (value is None or isinstance(value, bool)
          or (isinstance(value, int) and abs(value) <= MAX_ARCH_INT)
          or (isinstance(value, float) and math.isfinite(value) and abs(value) <= MAX_ARCH_INT)
          or (isinstance(value, str) and _WORD.match(value) is not None))
    if ok:
        return
    if isinstance(value, (list, tuple)) and not nested and len(value) <= MAX_ARCH_LIST:
        for v in value:
            _check_value(key, v, nested=True)
        return
    raise UnsupportedModelError(f"model argument {key!r} = {value!r:.60} is not allowed: not a plain architecture "
                                f"value (a number of magnitude <= {MAX_ARCH_INT}, a boolean, a short identifier or a "
                                f"flat list of at most {MAX_ARCH_LIST} of them)")


def check_arch(arch: Any) -> None:
    """Validate an ``arch`` dict (from a file, a spec or a caller) before anything is built from it.

    Raises:
        UnsupportedModelError: not a dict, ``source`` not ``morphkit``/``timm``,
            ``name`` not a plain model name, ``kwargs`` off the allow-list
            (:func:`check_arch_kwargs`), or ``input_shape`` not a short list of
            positive ints of at most ``MAX_INPUT_ELEMENTS`` elements.

    Example:
        >>> check_arch({"source": "morphkit", "name": "lenet5", "kwargs": {"num_classes": 10}})
    """
    if not isinstance(arch, dict):
        raise UnsupportedModelError(f"arch must be a dict like {{'source': 'morphkit', 'name': 'lenet5'}}, "
                                    f"got {type(arch).__name__} {arch!r:.80}")
    for key in ("source", "name"):
        if not isinstance(arch.get(key), str):
            raise UnsupportedModelError(f"arch[{key!r}] must be a string, got {arch.get(key)!r:.80}")
    if arch["source"] not in ("morphkit", "timm"):
        raise UnsupportedModelError(f"cannot rebuild a model from arch source {arch['source']!r:.60}: source must be "
                                    "'morphkit' or 'timm'; for your own class pass base=YourModel() to load_model")
    if _NAME.match(arch["name"]) is None:
        raise UnsupportedModelError(f"arch['name'] must be a plain model name (letters, digits, '_', '-', '.'; no "
                                    f"hub prefix or path), got {arch['name']!r:.80}")
    check_arch_kwargs(arch["source"], arch["name"], arch.get("kwargs") or {})
    shape = arch.get("input_shape")
    if shape is not None:
        ok = (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 8
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape))
        if not ok or math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise UnsupportedModelError(f"arch['input_shape'] must be a list of 1 to 8 positive ints (C, H, W) "
                                        f"of at most {MAX_INPUT_ELEMENTS} elements, got {shape!r:.80}")


# =========================================================================== 3. sizing before building


def probe_shapes(build: Callable[[], nn.Module], what: str, *, strict: bool) -> dict[str, tuple[int, ...]] | None:
    """Build a model on the meta device (no memory) and return its ``state_dict`` shapes, bounded.

    Args:
        build: Constructs the model (called once, under ``torch.device("meta")``).
        what: The model, for messages (``"timm:resnet18 {'num_classes': 10}"``).
        strict: Refuse a model that cannot be built on the meta device (its size
            cannot be known before allocating); otherwise return ``None`` for it.

    Raises:
        UnsupportedModelError: more than ``MAX_MODEL_ELEMENTS`` values, or
            (``strict``) a constructor that fails on the meta device.
    """
    try:
        with torch.device("meta"):
            probe = build()
        shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    except MorphkitError:
        raise
    except Exception as e:  # noqa: BLE001 - any constructor error; the real build reports it again
        if strict:
            raise UnsupportedModelError(f"bad arguments for {what:.200}: {type(e).__name__}: {str(e)[:200]} "
                                        "(raised while sizing it on the meta device, before building it); fix "
                                        "the arguments, or build the model yourself and pass base=") from e
        return None
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_MODEL_ELEMENTS:
        raise UnsupportedModelError(f"{what:.200} would hold {total:,} values, more than the {MAX_MODEL_ELEMENTS:,} "
                                    "morphkit builds from a spec or a file; check its arguments, or build it "
                                    "yourself and pass base=")
    return shapes


def describe_mismatch(missing: list[str], unexpected: list[str], wrong: list[str], file: dict[str, Any],
                      model: dict[str, Any]) -> str:
    """A short account of how two ``{key: shape}`` sets differ (for messages)."""
    parts = []
    if missing:
        parts.append(f"missing keys {clip(str(missing[:5]), 300)}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {clip(str(unexpected[:5]), 300)}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatches, e.g. {clip(k, 100)}: file {tuple(file[k])} vs model "
                     f"{tuple(model[k])}")
    return "; ".join(parts)


def check_fits(state: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], path: str | Path,
               exact: bool) -> None:
    """A base's shapes (``state``, from :func:`probe_shapes`) against a file's (``shapes``).

    Same keys; shapes equal (``exact``: a base model, a manifold) or no larger (a
    resized model); and at most ``MAX_BASE_RATIO`` times the file's values.

    Raises:
        CheckpointError: naming the first differences.
    """
    missing = sorted(set(state) - set(shapes))
    unexpected = sorted(set(shapes) - set(state))

    def differs(k: str) -> bool:
        if exact:
            return tuple(state[k]) != tuple(shapes[k])
        return len(state[k]) != len(shapes[k]) or any(f > b for f, b in zip(shapes[k], state[k]))

    wrong = sorted(k for k in set(state) & set(shapes) if differs(k))
    if missing or unexpected or wrong:
        raise CheckpointError(f"{str(path)!r} does not fit the architecture it names "
                              f"({describe_mismatch(missing, unexpected, wrong, shapes, state)}); the file is "
                              "corrupt, or pass the matching base=")
    base_n = sum(math.prod(s) for s in state.values())
    file_n = sum(math.prod(s) for s in shapes.values())
    if base_n > max(MAX_FREE_ELEMENTS, MAX_BASE_RATIO * file_n):
        raise CheckpointError(f"{str(path)!r}: its architecture would hold {base_n:,} values for {file_n:,} in the "
                              "file; its 'arch' metadata is corrupt (pass base= to rebuild it yourself)")


# =========================================================================== 4. metadata readers


def _is_int(v: Any, lo: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _is_int_key(k: str) -> bool:
    return k.isascii() and k.lstrip("-").isdigit() and len(k) <= 12


def check_model_meta(meta: dict[str, Any], path: str | Path) -> None:
    """Check every field of a model file's metadata (``format`` is checked on read).

    Raises:
        CheckpointError: a field of the wrong type or value, naming it.
    """
    def bad(field: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{str(path)!r}: metadata field {field!r} is {meta.get(field)!r:.100}, expected "
                               f"{expected}; the file is corrupt or was edited — write it again")

    arch = meta.get("arch")
    if arch is not None:
        try:
            check_arch(arch)
        except MorphkitError as e:
            raise CheckpointError(f"{str(path)!r}: metadata field 'arch' is malformed or not allowed: {e}") from e
    widths = meta.get("widths")
    if widths is not None and not (isinstance(widths, dict) and all(
            _is_int_key(k) and _is_int(v, 1) and v <= MAX_MODEL_ELEMENTS for k, v in widths.items())):
        raise bad("widths", "null or {clique_id: channels >= 1}")
    if meta.get("cliques") is not None:
        from morphkit.clique import Clique

        recorded = meta["cliques"]
        try:
            _need(isinstance(recorded, list), "cliques", recorded, "a list")
            parsed = [Clique.from_json(c) for c in recorded]
        except (ConfigError, ValueError, TypeError) as e:
            raise bad("cliques", f"null or a list of cliques ({e})") from e
        ids = [c.id for c in parsed]
        if len(set(ids)) != len(ids) or not widths or any(str(i) not in widths for i in ids):
            raise bad("cliques", "cliques with unique ids, each in the width map")
    if meta.get("inputs") is not None:
        from morphkit.resize import check_input_spec

        try:
            check_input_spec(meta["inputs"])
        except ValueError as e:
            raise CheckpointError(f"{str(path)!r}: metadata field 'inputs' is malformed: {e}; the file is corrupt "
                                  "or was edited — write it again") from e
    shapes = meta.get("shapes")
    if shapes is not None and not (isinstance(shapes, dict) and all(
            isinstance(v, list) and all(_is_int(d, 0) for d in v) for v in shapes.values())):
        raise bad("shapes", "{key: [dims >= 0]}")
    for field, kind, expected in (("fused_bn", bool, "true or false"), ("user", dict, "a JSON object"),
                                  ("class", str, "a string"), ("morphkit_version", str, "a string")):
        if meta.get(field) is not None and not isinstance(meta[field], kind):
            raise bad(field, expected)
    if meta.get("params") is not None and not _is_int(meta["params"], 0):
        raise bad("params", "an int >= 0")


#: dtypes an example input may have in a manifold file.
INPUT_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}
#: Key of the stored calibration inputs (BatchNorm statistics of sampled widths) in a manifold file.
CALIB_KEY = "calib.inputs"
#: At most this many numbers of calibration inputs are stored (2^23: 8 M, 16 MB in float16).
MAX_CALIB_ELEMENTS = 1 << 23


def _need(cond: bool, what: str, got: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{what}: got {got!r:.80}, expected {expected}")


def parse_manifold_meta(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every field of a manifold file's metadata, type-checked, as plain objects.

    Returns:
        ``{"config", "cliques", "layouts", "static", "perms", "example", "arch",
        "info", "fused_bn", "calib"}``.

    Raises:
        ConfigError, KeyError, TypeError, ValueError: a malformed field
        (:meth:`Manifold.load` turns any of them into a :class:`CheckpointError`).
    """
    from morphkit.clique import Clique

    for key in ("config", "cliques", "layouts", "static", "input_shapes", "input_dtypes"):
        _need(key in meta, "field", key, "present (the file lacks it)")
    config = MorphConfig.from_dict(meta["config"])
    if config.samples > MAX_FILE_SAMPLES:
        logger.warning("the manifold file asks for %d noisy draws per sample by default; using %d (pass samples= "
                       "to sample() for more)", config.samples, MAX_FILE_SAMPLES)
        config = dataclasses.replace(config, samples=MAX_FILE_SAMPLES)
    _need(isinstance(meta["cliques"], list), "cliques", meta["cliques"], "a list")
    cliques = [Clique.from_json(c) for c in meta["cliques"]]
    ids = [c.id for c in cliques]
    _need(len(set(ids)) == len(ids), "clique ids", ids, "unique ids")
    members: dict[tuple[str, int], list] = {}  # (tensor, dim) -> [(clique, member)]: several on a torch.cat input
    for c in cliques:
        for m in c.members:
            members.setdefault((m.name, m.dim), []).append((c, m))
    _need(isinstance(meta["layouts"], list), "layouts", meta["layouts"], "a list")
    layouts = [_layout_from_json(d, members) for d in meta["layouts"]]
    names = [lt.name for lt in layouts]
    _need(len(set(names)) == len(names), "layout names", names, "unique tensor names")
    static = meta["static"]
    _need(isinstance(static, list) and all(isinstance(n, str) for n in static) and len(set(static)) == len(static)
          and not set(static) & set(names), "static", static, "unique tensor names, none of them predicted")
    missing = [n for n in static if f"static.{n}" not in tensors]
    _need(not missing, "static tensors", missing, "stored in the file as static.NAME")
    known = {f"static.{n}" for n in static}
    known |= {f"base.{n}" for n in names}
    known.add(CALIB_KEY)
    stray = sorted(k for k in tensors if k not in known and not k.startswith("inr."))
    _need(not stray, "tensors", stray, "only inr.*, base.* of predicted tensors, the listed static.* tensors "
          f"and {CALIB_KEY}")
    calib = tensors.get(CALIB_KEY)
    if calib is not None:
        _need(calib.is_floating_point() and not calib.is_complex() and calib.dim() >= 1
              and 1 <= calib.shape[0] and calib.numel() <= MAX_CALIB_ELEMENTS
              and bool(torch.isfinite(calib).all()), CALIB_KEY, tuple(calib.shape),
              f"finite floating-point calibration inputs (N, ...) of at most {MAX_CALIB_ELEMENTS} elements")
    sizes = {c.id: c.size for c in cliques}
    perms_raw = meta.get("perms") or {}
    _need(isinstance(perms_raw, dict), "perms", perms_raw, "{clique_id: permutation}")
    perms = {}
    for k, v in perms_raw.items():
        cid = int(k) if k.isascii() and k.isdigit() and len(k) <= 12 else None
        _need(cid in sizes, "perms key", k, f"a clique id from {sorted(sizes)[:20]}")
        _need(isinstance(v, list) and all(_is_int(i, 0) for i in v) and sorted(v) == list(range(sizes[cid])),
              f"perms[{k}]", v, f"a permutation of range({sizes[cid]})")
        perms[cid] = v
    shapes, dtypes = meta["input_shapes"], meta["input_dtypes"]
    _need(isinstance(shapes, list) and isinstance(dtypes, list) and 1 <= len(shapes) == len(dtypes) <= 16,
          "input_shapes / input_dtypes", (shapes, dtypes), "two lists of the same length (1 to 16)")
    for s, dt in zip(shapes, dtypes):
        _need(isinstance(s, list) and 1 <= len(s) <= 8 and all(_is_int(d, 1) for d in s)
              and math.prod(s) <= MAX_INPUT_ELEMENTS, "input shape", s,
              f"1 to 8 positive ints, at most {MAX_INPUT_ELEMENTS} elements")
        _need(dt in INPUT_DTYPES, "input dtype", dt, f"one of {sorted(INPUT_DTYPES)}")
    _need(sum(math.prod(s) for s in shapes) <= MAX_INPUT_ELEMENTS, "input shapes", shapes,
          f"at most {MAX_INPUT_ELEMENTS} elements together")
    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(*s, generator=gen).to(getattr(torch, dt)) for s, dt in zip(shapes, dtypes))
    arch = meta.get("arch")
    if arch is not None:
        check_arch(arch)
    info = meta.get("info") or {}
    _need(isinstance(info, dict), "info", info, "a JSON object")
    fused = meta.get("fused_bn", False)
    _need(isinstance(fused, bool), "fused_bn", fused, "true or false")
    return {"config": config, "cliques": cliques, "layouts": layouts, "static": static, "perms": perms,
            "example": example, "arch": arch, "info": info, "fused_bn": fused, "calib": calib}


def _layout_from_json(d: Any, members: dict[tuple[str, int], list]) -> Any:
    from morphkit.coords import DimSpec, TensorLayout, dim_spec

    _need(isinstance(d, dict), "layout", d, "a JSON object")
    name, shape, rows = d.get("name"), d.get("shape"), d.get("rows")
    _need(isinstance(name, str), "layout name", name, "a string")
    _need(isinstance(shape, list) and len(shape) <= 8 and all(_is_int(s, 0) for s in shape), f"layout {name} shape",
          shape, "a list of ints >= 0")
    for key in ("layer", "role"):
        _need(_is_int(d.get(key), 0), f"layout {name} {key}", d.get(key), "an int >= 0")
    scale = d.get("scale")
    _need(isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0,
          f"layout {name} scale", scale, "a finite float > 0")
    _need(isinstance(rows, list) and 1 <= len(rows) <= 2, f"layout {name} rows", rows, "a list of 1 or 2 dims")
    specs = []
    for r in rows:
        _need(isinstance(r, dict), f"layout {name} row", r, "a JSON object")
        for key, lo in (("dim", 0), ("clique", 0), ("multiplicity", 1), ("size", 1)):
            _need(_is_int(r.get(key), lo), f"layout {name} row {key}", r.get(key), f"an int >= {lo}")
        _need(isinstance(r.get("resizable"), bool), f"layout {name} row resizable", r.get("resizable"),
              "true or false")
        pairs = members.get((name, r["dim"]))
        _need(pairs is not None, f"layout {name} row dim", r["dim"], "a dim that one of the cliques indexes")
        parts = r.get("parts")
        if parts is None:
            specs.append(DimSpec(r["dim"], r["clique"], pairs[-1][1].index, r["multiplicity"], r["size"],
                                 r["resizable"]))
            continue
        _need(isinstance(parts, list) and len(parts) >= 2 and all(_is_int(i, 0) for i in parts)
              and r["dim"] < len(shape), f"layout {name} row parts", parts,
              "the clique ids (two or more) of a concatenated dim")
        spec = dim_spec(pairs, r["dim"], shape[r["dim"]])  # the composite index, checked in check_structure
        _need(spec is not None and list(spec.parts) == parts, f"layout {name} row parts", parts,
              "the cliques that index the dim, in the order of their positions")
        specs.append(DimSpec(r["dim"], r["clique"], spec.index, r["multiplicity"], r["size"], r["resizable"],
                             tuple(parts)))
    dims = [r.dim for r in specs]
    _need(dims == sorted(set(dims)) and dims[-1] < len(shape), f"layout {name} row dims", dims,
          f"increasing dims of its {len(shape)}-d tensor")
    fan_dim = d.get("fan_dim", 1)
    _need(fan_dim in (-1, 0, 1) and not isinstance(fan_dim, bool), f"layout {name} fan_dim", fan_dim,
          "-1 (none), 0 or 1")
    return TensorLayout(name, tuple(shape), tuple(specs), d["layer"], d["role"], float(scale), fan_dim)


def check_structure(cliques: list[Any], layouts: list[Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Cliques and layouts against the base model's shapes; ValueError names the first inconsistency."""
    from morphkit.coords import dim_spec

    owner: dict[tuple[str, int], list] = {}
    for c in cliques:
        for m in c.members:
            if m.name not in shapes:
                raise ValueError(f"clique {c.id} names tensor {m.name!r:.100}, which the model does not have")
            s = shapes[m.name]
            if m.dim >= len(s):
                raise ValueError(f"clique {c.id} indexes dim {m.dim} of {m.name!r}, which is {len(s)}-d")
            n = s[m.dim]
            if m.index is None and n > c.size:
                raise ValueError(f"clique {c.id} ({c.size} channels) maps {m.name!r} dim {m.dim} of {n} one to one")
            if m.index is not None and (len(m.index) != n or any(not -1 <= i < c.size for i in m.index)):
                raise ValueError(f"clique {c.id}: the index map of {m.name!r} dim {m.dim} does not fit {n} "
                                 f"positions and {c.size} channels")
            owner.setdefault((m.name, m.dim), []).append((c, m))
    for lt in layouts:
        for r in lt.rows:
            want = dim_spec(owner[(lt.name, r.dim)], r.dim, lt.shape[r.dim])
            if want is None or (r.clique, r.size, r.resizable, r.multiplicity, r.parts, r.index) != (
                    want.clique, want.size, want.resizable, want.multiplicity, want.parts, want.index):
                ids = [c.id for c, _ in owner[(lt.name, r.dim)]]
                who = f"clique {ids[0]}" if len(ids) == 1 else f"the concatenated cliques {ids}"
                raise ValueError(f"layout {lt.name!r} dim {r.dim} disagrees with {who} (clique {r.clique}, "
                                 f"size {r.size}, multiplicity {r.multiplicity}, resizable {r.resizable})")


# =========================================================================== 5. text


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was cut.

    Example:
        >>> clip("x" * 50, 20)
        'xxxxxxxxxx ... (40 more characters)'
    """
    if len(text) <= limit:
        return text
    keep = max(limit // 2, limit - 40)
    return text[:keep] + f" ... ({len(text) - keep} more characters)"


def for_terminal(value: Any, limit: int = MAX_MESSAGE_CHARS, *, newlines: bool = False) -> str:
    """Text from a file made safe to print: no escape sequences, control characters or lone surrogates.

    Control characters (ESC, CR, BEL, C1 codes, and newlines unless ``newlines``)
    and characters that cannot be encoded (lone surrogates) are shown as
    ``\\x1b``-style escapes; the result is cut to ``limit`` characters.

    Example:
        >>> for_terminal("ok\\x1b[31mred\\udcff")
        'ok\\\\x1b[31mred\\\\udcff'
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > 4 * limit:
        text = text[:4 * limit]
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch == "\n" and newlines:
            out.append(ch)
        elif cat in ("Cc", "Cs") or ch in "\u2028\u2029\u202e\u202d\u202a\u202b\u202c\u2066\u2067\u2068\u2069":
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return clip("".join(out), limit)
