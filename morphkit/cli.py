"""The ``morphkit`` command line (click). Every command maps to one API call.

A :class:`MorphkitError` becomes one clear line on stderr and exit code 1; bad
arguments exit 2 (click's usage errors). Nothing here holds logic the Python
API lacks: the CLI parses, calls, and prints.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from morphkit import __version__
from morphkit.config import MAX_SAMPLES
from morphkit.errors import CheckpointError, ConfigError, MorphkitError

logger = logging.getLogger("morphkit")


class _Group(click.Group):
    """Turns every error into one line on stderr and exit code 1, never a traceback.

    A MorphkitError prints its message; anything else (a bug, or an input no
    check catches yet) prints its type and message and asks for a report
    (``-vv`` adds the traceback). Text is made safe for a terminal first.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MorphkitError as e:
            from morphkit.untrusted import for_terminal  # here, not above: --help and usage errors skip torch

            click.echo(f"error: {for_terminal(str(e))}", err=True)
            ctx.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MemoryError:
            click.echo("error: out of memory; use a smaller model, batch or data set", err=True)
            ctx.exit(1)
        except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
            from morphkit.untrusted import for_terminal

            if logger.isEnabledFor(logging.DEBUG):
                import traceback

                click.echo(for_terminal(traceback.format_exc(), 20_000, newlines=True), err=True)
            click.echo(f"error: unexpected {type(e).__name__}: {for_terminal(str(e), 500)} (an input morphkit "
                       "does not check yet, or a bug: rerun with -vv for the traceback and report it)", err=True)
            ctx.exit(1)


def _printable(value: Any) -> Any:
    """Every string in a (nested) value from a file made safe for a terminal (no escapes, surrogates)."""
    from morphkit.untrusted import for_terminal

    if isinstance(value, str):
        return for_terminal(value, 500)
    if isinstance(value, dict):
        return {_printable(str(k)): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


class _Once(logging.Filter):
    """Drops a log line identical to one already printed (the same fusion logged by two loaders)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _Format(logging.Formatter):
    """``warning: ...`` for warnings and errors; ``info morphkit.x: ...`` with the logger for -v output."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return f"{record.levelname.lower()} {record.name}: {msg}"


def _setup_logging(verbose: int) -> None:
    """morphkit's log lines on stderr: warnings always (untrained widths, fixed cliques), -v info, -vv debug."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    log = logging.getLogger("morphkit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    handler.addFilter(_Once())
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(level)

    def restore() -> None:  # the CLI called in-process (tests, notebooks) leaves logging as it found it
        log.removeHandler(handler)
        log.setLevel(old_level)

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(restore)


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """``--threads N``: torch's intra-op threads for this command (default: torch's own choice)."""
    if value is not None:
        import torch

        torch.set_num_threads(value)
        logger.info("using %d CPU thread(s)", value)
    return value


def _threads_option(f: Any) -> Any:
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, expose_value=False, callback=_set_threads,
        help="CPU threads for torch (default: torch's, one per physical core or $OMP_NUM_THREADS; on a machine "
             "other jobs also use, fewer is often faster).")(f)


def _round_to_option(f: Any) -> Any:
    return click.option(
        "--round-to", type=click.IntRange(min=1), default=None,
        help="Make every resizable clique's channel count a multiple of N (e.g. 8 or 16) where the clique allows "
             "(heads and groups respected).")(f)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="morphkit")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Morph a pretrained PyTorch network to any width (Neural Metamorphosis)."""
    _setup_logging(verbose)


def _resolve_model(spec: str):
    """A model file written by save_model, or a registry / timm spec."""
    from morphkit.export import load_model
    from morphkit.models import build_model

    if Path(spec).suffix == ".safetensors" or Path(spec).is_file():
        return load_model(spec)
    return build_model(spec)


def _example_inputs(model, input_shape: str | None):
    import torch

    from morphkit.models import example_inputs_for

    if input_shape:
        try:
            shape = tuple(int(v) for v in input_shape.replace("x", ",").split(","))
        except ValueError as e:
            raise ConfigError(f"--input-shape: got {input_shape!r:.80}, expected C,H,W (e.g. 3,224,224)") from e
        from morphkit.untrusted import MAX_INPUT_ELEMENTS

        if not 1 <= len(shape) <= 8 or min(shape) < 1 or math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ConfigError(f"--input-shape: got {input_shape!r:.80}, expected 1 to 8 positive sizes C,H,W (e.g. "
                              f"3,224,224) of at most {MAX_INPUT_ELEMENTS:,} values")
        return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    return example_inputs_for(model)


def _macs(model, x) -> int | None:
    try:
        import torch_pruning as tp

        macs, _ = tp.utils.count_ops_and_params(model, x)
        return int(macs)
    except Exception as e:  # MAC counting is informational only
        logger.debug("MAC count failed: %s", e)
        return None


DATA_HELP = "mnist:DIR, cifar10:PATH, imagefolder:DIR, mnistseg:DIR (segmentation) or embedded."


def _fmt_metrics(m: dict[str, float]) -> str:
    if "miou" in m:
        return (f"mIoU {100 * m['miou']:.2f}%  pixel accuracy {100 * m['accuracy']:.2f}%  loss {m['loss']:.4f}  "
                f"(n={int(m['n'])})")
    if "accuracy" in m:
        return f"accuracy {100 * m['accuracy']:.2f}%  loss {m['loss']:.4f}  (n={int(m['n'])})"
    return f"recon MSE {m['mse']:.2f}  NLL {m['nll']:.2f}  (n={int(m['n'])})"


@main.command()
@click.argument("model")
@click.option("--data", "data_spec", required=True, help=DATA_HELP)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default: the model's recipe).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--augment/--no-augment", default=None, help="Random crop + flip (default: on for CIFAR).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: bfloat16 autocast + channels-last (faster on GPUs and CPUs with AMX).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_threads_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
def train(model: str, data_spec: str, epochs: int | None, batch_size: int, optimizer: str | None,
          lr: float | None, weight_decay: float | None, label_smoothing: float, augment: bool | None,
          seed: int, device: str | None, precision: str, progress: bool, output: str) -> None:
    """Train a base MODEL on --data and write it with save_model."""
    from morphkit.data import load_data, make_loaders
    from morphkit.export import save_model
    from morphkit.fit import fit
    from morphkit.models import recipe_of

    _check_writable(output, model)
    net = _resolve_model(model)
    recipe = recipe_of(net)
    kw = {"optimizer": optimizer or recipe["optimizer"], "lr": lr if lr is not None else recipe["lr"],
          "weight_decay": weight_decay if weight_decay is not None else recipe["weight_decay"]}
    epochs = recipe["epochs"] if epochs is None else epochs
    splits = load_data(data_spec)
    train_dl, test_dl = make_loaders(splits, batch_size=batch_size, augment=augment, seed=seed)
    click.echo(f"training {model} on {data_spec}: {len(splits.train)} train / {len(splits.test)} test "
               f"images, {epochs} epochs, {kw}", err=True)
    t0 = time.perf_counter()
    trained, hist = fit(net, train_dl, epochs=epochs, eval_data=test_dl, seed=seed, device=device,
                        label_smoothing=label_smoothing, precision=precision,
                        progress=progress and sys.stderr.isatty(), **kw)
    seconds = time.perf_counter() - t0
    final = hist.eval[-1]
    save_model(trained, output, data=data_spec, epochs=epochs, seed=seed, seconds=round(seconds, 1),
               metrics=final, recipe=kw, batch_size=batch_size, precision=precision)
    click.echo(f"{model}: {_fmt_metrics(final)} after {epochs} epochs in {seconds:.0f} s "
               f"({hist.images_per_s:.0f} img/s); wrote {output}")


@main.command("eval")
@click.argument("file", type=click.Path())
@click.option("--data", "data_spec", required=True, help=DATA_HELP)
@click.option("--width", type=float, default=None, help="Width to sample (manifold files only).")
@click.option("--samples", type=click.IntRange(1, MAX_SAMPLES), default=None,
              help="K noisy draws averaged (manifold files only).")
@click.option("--unseen", type=click.Choice(["inr", "fold"]), default=None,
              help="Widths below the trained range: ask the INR (inr, the default) or fold from trained widths.")
@_round_to_option
@click.option("--batch-size", type=int, default=500, show_default=True)
@_threads_option
def eval_cmd(file: str, data_spec: str, width: float | None, samples: int | None, unseen: str | None,
             round_to: int | None, batch_size: int) -> None:
    """Evaluate a model FILE (or a manifold at --width) on the test split of --data."""
    from morphkit.data import load_data, make_loaders
    from morphkit.fit import evaluate

    net = _load_any(file, width, samples, unseen, round_to)
    splits = load_data(data_spec)
    _, test_dl = make_loaders(splits, batch_size=batch_size, augment=False)
    metrics = evaluate(net, test_dl)
    click.echo(f"{file}{'' if width is None else f' @ width {width}'}: {_fmt_metrics(metrics)}")


def _load_any(file: str, width: float | None, samples: int | None, unseen: str | None = None,
              round_to: int | None = None):
    from morphkit._io import read_tensors
    from morphkit.export import load_model
    from morphkit.formats import MANIFOLD_FORMAT

    _, meta = read_tensors(file)
    if meta["format"].startswith(MANIFOLD_FORMAT):
        from morphkit.manifold import Manifold

        if width is None:
            raise ConfigError(f"{file!r} is a manifold: pass --width W (0 < W <= 1) to sample a model from it")
        m = Manifold.load(file)
        return m.sample(width, samples=samples or m.config.samples, unseen=unseen or "inr", round_to=round_to)
    if width is not None or samples is not None or unseen is not None or round_to is not None:
        raise ConfigError(f"{file!r} is a model file of fixed width: --width/--samples/--unseen/--round-to apply "
                          "to manifolds only")
    return load_model(file)


@main.command()
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info(file: str, as_json: bool) -> None:
    """Print a model or manifold FILE's metadata, parameters and MACs (or an ONNX file's inputs and metadata)."""
    from morphkit._io import read_tensors
    from morphkit.formats import MANIFOLD_FORMAT

    if Path(file).suffix.lower() == ".onnx":
        _onnx_info(file, as_json)
        return

    tensors, meta = read_tensors(file)
    meta = dict(meta)
    meta.pop("shapes", None)
    if meta["format"].startswith(MANIFOLD_FORMAT):
        from morphkit.manifold import Manifold

        summary = Manifold.load(file).summary()
    else:
        from morphkit.export import load_model
        from morphkit.models import example_inputs_for

        net = load_model(file)
        x = example_inputs_for(net) if meta.get("arch") else None
        summary = {"params": sum(p.numel() for p in net.parameters()),
                   "macs": _macs(net, x) if x is not None else None}
    if as_json:  # json.dumps escapes control characters and surrogates
        click.echo(json.dumps({"metadata": meta, **summary}, indent=2, default=str))
        return
    lines = [("file", str(file)), ("format", f"{meta['format']} (morphkit {meta.get('morphkit_version', '?')})")]
    arch = meta.get("arch") or {}
    if arch:
        kwargs = ", ".join(f"{k}={v}" for k, v in (arch.get("kwargs") or {}).items())
        lines.append(("arch", f"{arch.get('source')}:{arch.get('name')}" + (f" ({kwargs})" if kwargs else "")))
    if meta["format"].startswith(MANIFOLD_FORMAT):
        lines += _manifold_lines(file)
    else:
        lines += _model_lines(net, meta, summary)
    for line in _table(lines):
        click.echo(_printable(line))  # text from the file, made safe for a terminal line by line


def _onnx_info(file: str, as_json: bool) -> None:
    from morphkit.onnx_export import onnx_info

    d = onnx_info(file)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    meta = d["metadata"]
    lines: list[tuple[str, str] | str] = [("file", str(file)),
                                          ("format", f"ONNX opset {d['opset']} ({meta.get('format', 'not morphkit')})")]
    for key in ("inputs", "outputs"):
        lines.append((key, "; ".join(f"{v['name']} {v['shape']}" for v in d[key])))
    for key in ("version", "arch", "params", "source"):
        if meta.get(key) is not None:
            v = meta[key]
            if key == "arch" and isinstance(v, dict):
                v = f"{v.get('source')}:{v.get('name')}"
            lines.append(("morphkit" if key == "version" else key, _count(v) if key == "params" else _value(v)))
    lines += _user_lines(meta.get("user"))
    if meta.get("widths"):
        lines.append(("channels", ", ".join(f"{k}: {v}" for k, v in meta["widths"].items())))
    for line in _table(lines):
        click.echo(_printable(line))


def _user_lines(user: Any) -> list[tuple[str, str] | str]:
    """The fields ``save_model(**metadata)`` recorded; a width search as one line."""
    lines: list[tuple[str, str] | str] = []
    for k, v in (user if isinstance(user, dict) else {}).items():
        if v is None:
            continue
        if k == "search" and isinstance(v, dict):
            def pct(x: Any, acc: bool = v.get("metric") in ("accuracy", "miou")) -> str:
                return f"{100 * x:.2f}%" if acc and isinstance(x, (int, float)) else _value(x)

            uni = v.get("uniform") if isinstance(v.get("uniform"), dict) else {}
            lines.append(("search", f"{v.get('metric')} {pct(v.get('value'))} on {_value(v.get('confirm_images'))} "
                                    f"held-out images of {_value(v.get('data'))} (uniform width "
                                    f"{_value(uni.get('width'))}: "
                                    f"{pct(uni.get('value'))}); {_value(v.get('evaluated'))} width maps in "
                                    f"{_value(v.get('seconds'))} s"))
        else:
            lines.append((k, _value(v)))
    return lines


def _table(rows: list[tuple[str, str] | str]) -> list[str]:
    """``key:  value`` lines aligned on the longest key; plain strings pass through."""
    width = max((len(r[0]) for r in rows if isinstance(r, tuple)), default=0) + 2
    return [r if isinstance(r, str) else f"{r[0] + ':':<{width}}{r[1]}" for r in rows]


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _value(v: Any) -> str:
    """A metadata value for a person: metrics formatted, dicts as ``k=v``, lists comma-separated."""
    if isinstance(v, dict) and ("accuracy" in v or "mse" in v) and "n" in v:
        return _fmt_metrics(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or "-"
    if isinstance(v, float):
        return f"{v:g}"
    return "-" if v is None else str(v)


def _clique_rows(cliques: list[Any], counts: dict[int, Any], head: tuple[str, str]) -> list[str]:
    """One line per clique: id, base size, the second column (channels or trained range), its layers."""
    rows = [("id", "size", head[0], "layers")]
    for c in cliques:
        mods = ", ".join(c.modules[:4]) + (f", ... (+{len(c.modules) - 4})" if len(c.modules) > 4 else "")
        rows.append((str(c.id), str(c.size), counts.get(c.id, "-"), mods or "-"))
    w = [max(len(r[k]) for r in rows) for k in range(3)]
    out = [head[1]]
    out += [f"  {r[0]:>{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows]
    return out


def _manifold_lines(file: str) -> list[tuple[str, str] | str]:
    from morphkit.manifold import Manifold

    m = Manifold.load(file)
    info = m.info
    lo, hi = (float(v) for v in m.config.train.compression)
    base_params = sum(t.numel() for t in m.base.parameters())
    base = f"{base_params:,} params"
    if info.get("base_metrics"):
        base += f"; {_fmt_metrics(info['base_metrics'])}"
    base += "" if m.base_is_trained else " (weights not stored in this file)"
    lines: list[tuple[str, str] | str] = [
        ("base", base),
        ("INR", f"{sum(p.numel() for p in m.inr.parameters()):,} params; {len(m.layouts)} predicted tensors, "
                f"{len(m.static)} static; BatchNorm {'folded' if m.fused_bn else 'kept'}"),
        ("trained", f"compression {lo:.0%} to {hi:.0%} (width {1 - hi:.2f} to {1 - lo:.2f}); narrower widths are "
                    "extrapolated (a warning says so)"),
    ]
    floor = m.config.train.clique_floor()
    if floor < 1 - hi:
        spread = m.config.train.clique_spread
        lines.append(("per clique", f"single cliques down to width {floor:.2f} in maps of about the narrowest size "
                                    f"(offsets U(-{spread:g}, {spread:g}))"))
    if info.get("steps"):
        lines.append(("training", f"{info['steps']:,} steps in {_value(info.get('seconds'))} s"))
    final = info.get("final") or {}
    if final:
        lines += ["", "accuracy by compression (end of training):" if any("accuracy" in v for v in final.values())
                  else "metrics by compression (end of training):"]
        for g, metrics in sorted(final.items(), key=lambda kv: float(kv[0])):
            flag = "" if lo - 1e-9 <= float(g) <= hi + 1e-9 else "  (outside the trained range)"
            lines.append(f"  {float(g):>4.0%}  {_fmt_metrics(metrics)}{flag}")
    widths = m.widths()
    ranges = {c.id: (f"fixed: {c.reason}" if c.fixed else f"{widths[c.id]['trained'][0]}..{c.size}")
              for c in m.cliques}
    lines += ["", *_clique_rows(m.cliques, ranges, ("trained channels", "cliques:"))]
    return lines


def _model_lines(net: Any, meta: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, str] | str]:
    params, macs = summary.get("params"), summary.get("macs")
    lines: list[tuple[str, str] | str] = []
    base = cliques = None
    widths = {int(k): v for k, v in (meta.get("widths") or {}).items()}
    if widths and meta.get("arch"):
        try:  # the base this file was resized from, for sizes relative to it and layer names per clique
            from morphkit.graph import find_cliques
            from morphkit.models import build_from_arch, example_inputs_for

            base = build_from_arch(meta["arch"])
            x = example_inputs_for(base)
            cliques = find_cliques(base, x)
            base_params, base_macs = sum(p.numel() for p in base.parameters()), _macs(base, x)
        except Exception as e:  # noqa: BLE001 - informational only
            logger.debug("cannot rebuild the base for info: %s", e)
            base = None
    if base is not None:
        lines.append(("params", f"{_count(params)} ({params / base_params:.1%} of the base's {base_params:,})"))
        rel = f" ({macs / base_macs:.1%} of the base's {base_macs:,})" if macs and base_macs else ""
        lines.append(("MACs", f"{_count(macs)}{rel}"))
    else:
        lines += [("params", _count(params)), ("MACs", _count(macs))]
    lines += _user_lines(meta.get("user"))
    if widths:
        counts = {cid: f"{n}" for cid, n in widths.items()}
        if cliques is not None:
            counts = {c.id: str(widths.get(c.id, c.size))
                      + ("" if c.fixed else f" ({widths.get(c.id, c.size) / c.size:.0%})") for c in cliques}
            lines += ["", *_clique_rows(cliques, counts, ("channels", "channels per clique:"))]
        else:
            lines += ["", "channels per clique: " + ", ".join(f"{k}: {v}" for k, v in sorted(widths.items()))]
    return lines


@main.command()
@click.argument("model")
@click.option("--input-shape", default=None, help="C,H,W of the example input (default: the model's).")
def cliques(model: str, input_shape: str | None) -> None:
    """Print the resizable channel groups (cliques) of MODEL."""
    from morphkit.graph import find_cliques, format_cliques

    net = _resolve_model(model)
    found = find_cliques(net, _example_inputs(net, input_shape))
    click.echo(format_cliques(found))


@main.command("morph")
@click.argument("model")
@click.option("--data", "data_spec", required=True, help=DATA_HELP)
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs over the data (default: the config's, 10).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Total steps (overrides --epochs).")
@click.option("--compression-range", default=None, metavar="LO,HI",
              help="Compressions trained, 0 <= LO <= HI < 1 (default: the config's, 0,0.75); narrower widths are "
                   "extrapolated and warned about.")
@click.option("--lr", type=float, default=None, help="INR learning rate (default: the config's, 1e-3).")
@click.option("--samples", type=click.IntRange(1, MAX_SAMPLES), default=None,
              help="K noisy draws averaged when sampling from the manifold (default: the config's, 50).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="INR matrix products in float32 or bfloat16 (faster on GPUs and AMX CPUs; default: fp32).")
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="MorphConfig JSON file (`morphkit config` prints the defaults); flags override it.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--input-shape", default=None, help="C,H,W of the example input (default: the model's).")
@click.option("--seed", type=int, default=None, help="Seed (default: the config's, 0).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_threads_option
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Write a resumable checkpoint there (every --checkpoint-every steps, at the end, on Ctrl-C).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue the run in --checkpoint-dir (bit-exact on the CPU).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Manifold file to write.")
def morph_cmd(model: str, data_spec: str, epochs: int | None, steps: int | None, compression_range: str | None,
              lr: float | None, samples: int | None, precision: str | None, config_path: str | None,
              batch_size: int, input_shape: str | None, seed: int | None, device: str | None, progress: bool,
              checkpoint_dir: str | None, checkpoint_every: int, resume: bool, output: str) -> None:
    """Learn the weight manifold of MODEL on --data and write it to -o.

    Under `torchrun --nproc-per-node N morphkit morph ...` every process trains
    on its share of the data and rank 0 alone writes files.
    """
    import dataclasses
    import os

    from morphkit.config import MorphConfig
    from morphkit.data import load_data, make_loaders
    from morphkit.train import MorphInterrupted, morph

    cfg = _load_config(config_path) if config_path else MorphConfig()
    compression = _parse_range(compression_range) if compression_range is not None else None
    overrides = {k: v for k, v in (("epochs", epochs), ("steps", steps), ("seed", seed), ("lr", lr),
                                   ("compression", compression)) if v is not None}
    if epochs is not None and steps is None:
        overrides["steps"] = None  # --epochs asks for epochs, also over a config that set steps
    top: dict[str, Any] = {"samples": samples} if samples is not None else {}
    if precision is not None:
        top["inr"] = dataclasses.replace(cfg.inr, precision={"fp32": "float32", "bf16": "bfloat16"}[precision])
    if overrides or top:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides), **top)
    from morphkit.untrusted import check_config_budget

    check_config_budget(cfg)
    _check_writable(output, model, config_path, checkpoint_dir)
    net = _resolve_model(model)
    splits = load_data(data_spec)
    train_dl, test_dl = make_loaders(splits, batch_size=batch_size, seed=cfg.train.seed)
    x = _example_inputs(net, input_shape)
    t0 = time.perf_counter()
    try:
        manifold = morph(net, train_dl, example_inputs=x, config=cfg, eval_data=test_dl, device=device,
                         progress=progress and sys.stderr.isatty(), checkpoint_dir=checkpoint_dir,
                         resume=resume, checkpoint_every=checkpoint_every)
    except MorphInterrupted:
        click.echo(f"interrupted; checkpoint written to {checkpoint_dir}; continue with the same command "
                   "and --resume", err=True)
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # torchrun: rank 0 writes the manifold
    manifold.save(output)
    click.echo(f"morphed {model} in {time.perf_counter() - t0:.0f} s; wrote {output}")
    base = manifold.info.get("base_metrics")
    if base:
        click.echo(f"  base model:        {_fmt_metrics(base)}")
    for g, m in (manifold.info.get("final") or {}).items():
        click.echo(f"  compression {float(g):>4.0%}: {_fmt_metrics(m)}")


def _parse_range(text: str) -> tuple[float, float]:
    """``--compression-range LO,HI`` as two floats (the config validates the values)."""
    parts = text.replace(" ", "").split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise click.BadParameter(f"got {text!r}, expected LO,HI such as 0,0.75",
                                 param_hint="--compression-range") from None
    return lo, hi


def _load_config(path: str):
    """``--config PATH``: a JSON file, or ``-`` / a pipe such as /dev/stdin (read once, at most 1 MiB)."""
    from morphkit.config import MorphConfig

    p = Path(path)
    if path != "-" and (p.is_file() or p.is_dir() or not p.exists()):
        return MorphConfig.load(p)  # its own messages: missing, a directory, not JSON
    try:
        stream = sys.stdin.buffer if path == "-" else open(p, "rb")  # noqa: SIM115 - closed below unless stdin
        try:
            raw = stream.read((1 << 20) + 1)
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--config {path!r}: cannot be read as UTF-8 JSON text: {e}") from e
    if len(raw) > 1 << 20:
        raise ConfigError(f"--config {path!r}: more than 1 MiB of text; a MorphConfig is a few hundred bytes")
    return MorphConfig.from_json(text)


def _check_writable(output: str, *inputs: str | None) -> None:
    """Fail before hours of work when the output cannot be written, or would overwrite an input."""
    import os

    out = Path(output).resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        if out == Path(given).resolve() or (out.exists() and os.path.samefile(out, given)):
            raise CheckpointError(f"-o {output!r} is the input {given!r}: writing it would overwrite the input "
                                  "(and lose it if the command fails); choose another output path")
    parent = out.parent
    if not parent.is_dir():
        what = "is a file, not a directory" if parent.exists() else "does not exist; create it first"
        raise CheckpointError(f"output directory {str(parent)!r} {what}")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"output directory {str(parent)!r} is not writable; choose another -o")


def _check_report_dir(output: str) -> None:
    """``compare -o DIR``: DIR, or the nearest existing folder above it, must be a writable directory."""
    import os

    d = Path(output).resolve()
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"-o {output!r} is a file; expected a report directory")
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        raise CheckpointError(f"cannot create report directory {output!r}: {str(d)!r} is a file, not a directory")
    if not os.access(d, os.W_OK):
        raise CheckpointError(f"cannot create report directory {output!r}: {str(d)!r} is not writable; choose "
                              "another -o")


@main.command()
@click.argument("manifold_file", type=click.Path())
@click.option("--width", type=float, default=None, help="Width in (0, 1] (1 = the base model).")
@click.option("--compression", type=float, default=None, help="Compression in [0, 1) (= 1 - width).")
@click.option("--samples", type=click.IntRange(1, MAX_SAMPLES), default=None,
              help="K noisy draws averaged (default: the manifold's, 50).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--unseen", type=click.Choice(["inr", "fold"]), default=None,
              help="Widths below the trained range: ask the INR (inr, the default) or fold from trained widths.")
@_round_to_option
@click.option("--format", "fmt", type=click.Choice(["safetensors", "onnx"]), default=None,
              help="safetensors (a morphkit model file) or onnx (a standard ONNX model; needs "
                   "`pip install 'morphkit[onnx]'`). Default: from the -o suffix (.onnx: onnx).")
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset (default 17).")
@click.option("--params", "params_budget", default=None, metavar="N",
              help="Search the per-clique widths with the best score within N parameters (50k, 1.2M); needs --data.")
@click.option("--macs", "macs_budget", default=None, metavar="N",
              help="Budget of multiply-accumulates of the convolutions and linear layers per example (5M).")
@click.option("--latency-ms", type=float, default=None,
              help="Budget of milliseconds per forward pass of the example input, measured on this machine.")
@click.option("--data", "data_spec", default=None,
              help="Data the search scores width maps on (images from its training split, never its test split).")
@click.option("--search-images", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Training-split images the search scores each width map on.")
@click.option("--candidates", type=click.IntRange(min=1), default=48, show_default=True,
              help="Width maps the search scores.")
@_threads_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write.")
def export(manifold_file: str, width: float | None, compression: float | None, samples: int | None, seed: int,
           unseen: str | None, round_to: int | None, fmt: str | None, opset: int | None, params_budget: str | None,
           macs_budget: str | None, latency_ms: float | None, data_spec: str | None, search_images: int,
           candidates: int, output: str) -> None:
    """Sample a standard model from a manifold at --width / --compression, or the best within a budget, and write it.

    With --params / --macs / --latency-ms (and --data), the per-clique width
    map with the best accuracy on training-split images within the budget is
    searched over the manifold (no training), recorded in the file and reported.

    MANIFOLD_FILE may also be a model file (from `morphkit export` or
    `save_model`): it is then converted as it is, e.g. to ONNX with --format onnx.
    """
    from morphkit._io import read_tensors
    from morphkit.export import count_params, load_model, save_model
    from morphkit.formats import MANIFOLD_FORMAT

    fmt = fmt or ("onnx" if Path(output).suffix.lower() == ".onnx" else "safetensors")
    if fmt == "onnx":
        from morphkit.onnx_export import _require_onnx

        _require_onnx()  # before any work: a clear line when the extra is not installed
    elif opset is not None:
        raise click.UsageError("--opset applies to --format onnx only")
    if width is not None and compression is not None:
        raise click.UsageError("pass one of --width W or --compression G, not both")
    budget = {k: v for k, v in (("params", params_budget), ("macs", macs_budget), ("latency_ms", latency_ms))
              if v is not None}
    if budget and (width is not None or compression is not None):
        raise click.UsageError("pass a width (--width/--compression) or a budget (--params/--macs/--latency-ms), "
                               "not both")
    if budget and data_spec is None:
        raise click.UsageError("a budget search scores width maps on data: pass --data SPEC")
    if data_spec is not None and not budget:
        raise click.UsageError("--data applies to a budget search (--params/--macs/--latency-ms) only")
    if budget:
        from morphkit.search import parse_count

        for k, v in budget.items():
            budget[k] = parse_count(v, f"--{k.replace('_', '-')}")
    if compression is not None:
        if not 0 <= compression < 1:
            raise ConfigError(f"--compression must be in [0, 1), got {compression}")
        width = 1.0 - compression
    _check_writable(output, manifold_file)
    _, meta = read_tensors(manifold_file)
    t0 = time.perf_counter()
    if meta["format"].startswith(MANIFOLD_FORMAT):
        from morphkit.manifold import Manifold

        if width is None and not budget:
            raise click.UsageError("pass --width W, --compression G or a budget (--params/--macs/--latency-ms with "
                                   "--data) to sample a model from a manifold")
        m = Manifold.load(manifold_file)
        found = None
        if budget:
            found = _search(m, data_spec, budget, round_to, candidates, search_images, seed,  # type: ignore[arg-type]
                            samples)
            width_arg: Any = found.widths
            from morphkit.search import _budget_text

            what = f"the searched width map (budget: {_budget_text(budget)})"
        else:
            width_arg = width
            what = f"width {width:g}" + (f" rounded to multiples of {round_to}" if round_to else "")
        net = m.sample(width_arg, samples=samples, seed=seed, unseen=unseen or "inr", round_to=round_to)
        record = {"source": str(manifold_file), "width": width, "samples": samples or m.config.samples, "seed": seed,
                  "unseen": unseen or "inr", "round_to": round_to}
        if found is not None:
            record["search"] = {**found.to_json(), "data": data_spec}
    else:
        if any(v is not None for v in (width, samples, unseen, round_to)):
            raise ConfigError(f"{manifold_file!r} is a model file of fixed width: --width/--compression/--samples/"
                              "--unseen/--round-to apply to manifolds only")
        net = load_model(manifold_file)
        what = "the model"
        record = {"source": str(manifold_file)}
    seconds = time.perf_counter() - t0
    if fmt == "onnx":
        from morphkit.onnx_export import DEFAULT_OPSET, save_onnx

        source = record.pop("source")
        save_onnx(net, output, opset=opset or DEFAULT_OPSET, source=source, **record)
        kind = f"ONNX opset {opset or DEFAULT_OPSET}"
    else:
        save_model(net, output, **record)
        kind = "safetensors"
    click.echo(f"exported {what} ({count_params(net):,} params; channels {_channels(net)}; made in {seconds:.2f} s) "
               f"to {output} ({kind})")


def _search(m: Any, data_spec: str, budget: dict[str, float], round_to: int | None, candidates: int,
            images: int, seed: int, samples: int | None = None) -> Any:
    """Search a budget on ``images`` images of the training split (the test split stays unseen) and report it."""
    from morphkit.data import load_data, make_loaders
    from morphkit.search import search

    splits = load_data(data_spec)
    batch = min(256, images)
    train_dl, _ = make_loaders(splits, batch_size=batch, augment=False, seed=seed + 1, limit=None)
    found = search(m, train_dl, round_to=round_to, candidates=candidates, batches=max(1, -(-images // batch)),
                   final_samples=samples, seed=seed, **budget)
    click.echo(found.summary(), err=True)
    return found


def _channels(net: Any) -> str:
    """The resized cliques' channel counts, short: ``3, 8, 60, 42``."""
    widths = getattr(net, "morphkit_widths", None) or {}
    counts = [str(v) for _, v in sorted(widths.items())]
    return ", ".join(counts[:12]) + (f", ... ({len(counts)} cliques)" if len(counts) > 12 else "") or "-"


@main.command()
@click.option("--epochs", type=int, default=3, show_default=True, help="Base LeNet-5 epochs.")
@click.option("--steps", type=int, default=400, show_default=True, help="morph() steps.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_threads_option
def demo(epochs: int, steps: int, progress: bool) -> None:
    """Offline end to end on the MNIST subset shipped in the package.

    Trains LeNet-5, morphs it, prints accuracy at compression 0/25/50/75%
    beside the base model, exports one width, reloads and evaluates it.
    """
    import tempfile

    import torch

    from morphkit.config import MorphConfig, TrainConfig
    from morphkit.data import load_data, make_loaders
    from morphkit.export import count_params, load_model, save_model
    from morphkit.fit import evaluate, fit
    from morphkit.models import build_model, recipe_of
    from morphkit.train import morph

    t0 = time.perf_counter()
    show = progress and sys.stderr.isatty()
    splits = load_data("embedded")
    train_dl, test_dl = make_loaders(splits, batch_size=64, seed=0)
    click.echo(f"embedded MNIST subset: {len(splits.train)} train / {len(splits.test)} test images")
    recipe = recipe_of(build_model("lenet5"))
    base, _ = fit(build_model("lenet5"), train_dl, epochs=epochs, optimizer=recipe["optimizer"],
                  lr=recipe["lr"], weight_decay=recipe["weight_decay"], progress=show, seed=0)
    base_m = evaluate(base, test_dl)
    click.echo(f"1/4 base LeNet-5 ({epochs} epochs, {count_params(base):,} params): {_fmt_metrics(base_m)}")
    cfg = MorphConfig(train=TrainConfig(steps=steps), samples=20)
    manifold = morph(base, train_dl, example_inputs=torch.zeros(1, 1, 28, 28), config=cfg, progress=show)
    click.echo(f"2/4 morphed every clique ({manifold.summary()['resizable_cliques']} resizable) in "
               f"{manifold.info['seconds']:.0f} s; INR {manifold.summary()['inr_params']:,} params")
    lo, hi = manifold.config.train.compression
    click.echo(f"3/4 accuracy by compression (trained on compression {lo:g}-{hi:g}; * = outside it):")
    for g in (0.0, 0.25, 0.5, 0.75, 0.875):
        net = manifold.sample(1 - g)
        m = evaluate(net, test_dl)
        star = "*" if manifold.untrained(manifold.width_map(1 - g)) else " "
        click.echo(f"    {g:>6.1%}{star} {100 * m['accuracy']:6.2f}%  ({count_params(net):,} params; base "
                   f"{100 * base_m['accuracy']:.2f}%)")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "lenet-w50.safetensors"
        save_model(manifold.sample(0.5), path)
        again = evaluate(load_model(path), test_dl)
        click.echo(f"4/4 exported width 0.5 to a standard file and reloaded it: {_fmt_metrics(again)}")
    click.echo(f"done in {time.perf_counter() - t0:.0f} s")


@main.command("compare")
@click.argument("manifold_file", type=click.Path())
@click.option("--data", "data_spec", required=True, help=DATA_HELP)
@click.option("--methods", default="neumeta,l1,l2,taylor,hessian,random", show_default=True,
              help="Comma-separated: neumeta, l1, l2, taylor, hessian, random, individual, slimmable, searched "
                   "(the best per-clique widths within each uniform model's parameter count).")
@click.option("--compression", "compressions", default="0,0.25,0.5,0.75", show_default=True,
              help="Comma-separated compressions in [0, 1) (= 1 - width).")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tuning epochs after pruning.")
@click.option("--train-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of individual / slimmable training (default: the model's recipe).")
@click.option("--samples", type=click.IntRange(1, MAX_SAMPLES), default=None,
              help="K noisy draws averaged (default: 50).")
@click.option("--unseen", type=click.Choice(["inr", "fold"]), default="inr", show_default=True,
              help="NeuMeta's widths below the trained range: ask the INR or fold from trained widths.")
@click.option("--base", "base_file", type=click.Path(), default=None,
              help="The trained base model file to prune (default: the base stored in the manifold file).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N training images.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Evaluate on the first N test images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_threads_option
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Report directory.")
def compare_cmd(manifold_file: str, data_spec: str, methods: str, compressions: str, finetune_epochs: int,
                train_epochs: int | None, samples: int | None, unseen: str, base_file: str | None,
                batch_size: int, limit: int | None, test_limit: int | None, seed: int, device: str | None,
                progress: bool, output: str) -> None:
    """Compare NeuMeta with pruning and training baselines at equal sizes; write a report to -o.

    MANIFOLD_FILE is a manifold from `morphkit morph` (or a model file, to
    compare the baselines alone). Writes report.md, report.json and accuracy.png.
    """
    from morphkit._io import read_tensors
    from morphkit.compare import compare, write_report
    from morphkit.data import load_data, make_loaders
    from morphkit.export import load_model
    from morphkit.formats import MANIFOLD_FORMAT

    _check_report_dir(output)
    _, meta = read_tensors(manifold_file)
    if meta["format"].startswith(MANIFOLD_FORMAT):
        from morphkit.manifold import Manifold

        source: Any = Manifold.load(manifold_file)
    else:
        source = load_model(manifold_file)
    base = load_model(base_file) if base_file else None
    splits = load_data(data_spec)
    train_dl, test_dl = make_loaders(splits, batch_size=batch_size, seed=seed, limit=limit, test_limit=test_limit)
    t0 = time.perf_counter()
    rows = compare(source, test_dl, methods, compressions, base=base, finetune_epochs=finetune_epochs,
                   samples=samples, seed=seed, progress=progress and sys.stderr.isatty(), train_data=train_dl,
                   train_epochs=train_epochs, device=device, unseen=unseen)
    seconds = time.perf_counter() - t0
    info = {"source": manifold_file, "base": _base_origin(base_file, rows), "data": data_spec, "unseen": unseen,
            "train images": len(train_dl.data),
            "test images": rows[0]["n"], "finetune epochs": finetune_epochs, "seed": seed,
            "seconds": round(seconds, 1), "morphkit": __version__}
    paths = write_report(rows, output, title=f"morphkit compare: {Path(manifold_file).name}", meta=info)
    click.echo(paths["md"].read_text())
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())} in {seconds:.0f} s")


def _base_origin(base_file: str | None, rows: list[dict[str, Any]]) -> str:
    """Where the pruned rows' starting weights came from, as compare() reports it."""
    if base_file:
        return f"{base_file} (--base)"
    origin = next((r["pruned_from"] for r in rows if "pruned_from" in r), None)
    return {None: "none (no pruning method)",
            "manifold.base": "the trained base stored in the manifold file",
            "manifold.sample(1.0)": "manifold.sample(1.0) (the manifold file stores no base weights)",
            "model": "the model file itself"}.get(origin, str(origin))


@main.command("config")
def config_cmd() -> None:
    """Print the default MorphConfig as JSON: save it, edit it, pass it to `morph --config FILE`.

    Keys: inr (the INR's shape), train (schedule, losses, compression range),
    smooth (channel reordering), fuse_bn, samples, calib_samples; each is
    documented in morphkit/config.py. Unknown keys are refused.
    """
    from morphkit.config import MorphConfig

    click.echo(MorphConfig().to_json())


if __name__ == "__main__":  # pragma: no cover
    main()
