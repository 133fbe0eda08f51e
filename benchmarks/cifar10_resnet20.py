"""ResNet-20 on CIFAR-10: the paper's Table 2 on our data, whole network morphed, every method on one budget.

Starts from the committed base (``results/base/resnet20-cifar10.safetensors``,
written by ``train_bases.sh``). NeuMeta morphs the base with the default
``MorphConfig`` for ``--morph-epochs`` (default 12: the data budget of the
three individually trained models together; ``--compression-range 0,0.5`` is
the paper's protocol, where 75% is never trained); the individually trained
oracle trains each compressed structure from scratch for ``--epochs`` (one
model per compression; the base itself is the 0% oracle), and
``--oracle-epochs 10`` adds a second oracle row trained with the base's own
10-epoch schedule; the slimmable network trains its shared weights from
scratch for ``--epochs`` with the sandwich rule. L1, L2, Taylor, Hessian and random pruning prune the base
without fine-tuning (``--finetune-epochs`` adds it). Every model of one
compression has the same parameter count (asserted). Also reports each
method's total training cost (wall time, epochs) and the parameters it stores
to serve every width. Writes ``benchmarks/results/cifar10_resnet20.{json,md,png}``.

On 2 CPU cores the baselines (``--epochs 4``) take about 40 minutes and the
12-epoch morph about an hour; on a GPU pass the paper's schedule
(``--epochs 200 --morph-epochs 200 --device cuda``, after a 200-epoch base from
``train_bases.sh``).

    python benchmarks/cifar10_resnet20.py --threads 2
    python benchmarks/cifar10_resnet20.py --threads 2 --baselines-from benchmarks/results/cifar10_resnet20.json \
        --oracle-epochs 10
    python benchmarks/cifar10_resnet20.py --threads 2 --baselines-from benchmarks/results/cifar10_resnet20.json \
        --compression-range 0,0.5 --name cifar10_resnet20_paper   # the paper's protocol: 75% never trained

``--baselines-from`` reruns NeuMeta only and takes every other method's rows
(and their training times) from an earlier result of the same base, data,
seed and budget: the baselines do not depend on the INR, so a change to the
manifold does not need the 40 minutes of baselines again. The result file
says where its baseline rows come from.
    python benchmarks/cifar10_resnet20.py --limit 512 --test-limit 500 --epochs 1 --name smoke_cifar  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from _common import DATA, RESULTS, data_name, machine, reused_baselines

import morphkit as mk
from morphkit.compare import write_report
from morphkit.data import load_data, make_loaders

COMPRESSIONS = (0.0, 0.25, 0.5, 0.75)
PRUNING = ("l1", "l2", "taylor", "hessian", "random")


def stored_params(manifold: mk.Manifold) -> int:
    """Numbers a manifold file holds for its INR: parameters plus buffers (the residual base grids)."""
    return sum(t.numel() for t in manifold.inr.state_dict().values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"cifar10:{DATA / 'cifar10-jpeg.tar.gz'}")
    ap.add_argument("--base", default=str(RESULTS / "base" / "resnet20-cifar10.safetensors"),
                    help="the trained base model file")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs of each individual model and of "
                    "the slimmable network")
    ap.add_argument("--morph-epochs", type=int, default=12, help="NeuMeta's morphing epochs (default 12: the data "
                    "budget of the three individual models together)")
    ap.add_argument("--compression-range", default=None, metavar="LO,HI",
                    help="NeuMeta's trained compression range (default: TrainConfig's)")
    ap.add_argument("--oracle-epochs", type=int, default=0, help="also train each compressed structure with the "
                    "base's schedule for this many epochs (a second oracle row; 0 = none)")
    ap.add_argument("--manifold", default=None, metavar="FILE",
                    help="evaluate this saved manifold (its own config and training time) instead of morphing")
    ap.add_argument("--precision", default="float32", choices=("float32", "bf16"),
                    help="the --oracle-epochs models' training precision")
    ap.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning after pruning (0 = none)")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--clean-base", action="store_true",
                    help="the version-1 INR: a fixed bilinear base read at the clean coordinates "
                    "(INRConfig(resample='bilinear', train_base=False, base_noise=False))")
    ap.add_argument("--base-jitter", type=float, default=mk.TrainConfig().base_jitter,
                    help="TrainConfig.base_jitter of the NeuMeta run (cells; default off)")
    ap.add_argument("--baselines-from", default=None, metavar="JSON",
                    help="reuse the baseline rows of this earlier result (same base, data, seed, epochs)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field of the NeuMeta run, as JSON, or inr.FIELD for an INRConfig field "
                         "(repeatable; e.g. narrow_spread=1.0, inr.hidden=128)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None, help="where training runs (default: cpu)")
    ap.add_argument("--limit", type=int, default=None, help="first N training images (smoke runs)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="cifar10_resnet20")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.zeros(1, 3, 32, 32)
    splits = load_data(args.data)
    train, test = make_loaders(splits, batch_size=128, seed=args.seed, test_batch_size=500, limit=args.limit,
                               test_limit=args.test_limit)
    base = mk.load_model(args.base)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    inr = (mk.INRConfig(resample="bilinear", train_base=False, base_noise=False) if args.clean_base
           else mk.INRConfig())
    reused = None
    if args.baselines_from:
        if args.finetune_epochs or args.limit is not None or args.test_limit is not None:
            raise SystemExit("--baselines-from reuses full runs without fine-tuning; drop --finetune-epochs, "
                             "--limit and --test-limit")
        old_meta, old_rows = reused_baselines(args.baselines_from, {
            "seed": args.seed, "data": lambda d: data_name(d) == data_name(args.data),
            "budget": lambda b: (b or "").startswith(f"{args.epochs} epoch(s) per "),
            "base": lambda b: Path((b or "").split(":")[0]).name == Path(args.base).name})
        reused = {"meta": old_meta, "rows": old_rows}
    train_kw: dict = {"epochs": args.morph_epochs, "seed": args.seed, "base_jitter": args.base_jitter}
    if args.compression_range:
        train_kw["compression"] = tuple(float(v) for v in args.compression_range.split(","))
    inr_kw: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key.startswith("inr."):
            inr_kw[key[4:]] = json.loads(value)
        else:
            train_kw[key] = json.loads(value)
    if inr_kw:
        inr = dataclasses.replace(inr, **inr_kw)
    cfg = mk.MorphConfig(train=mk.TrainConfig(**train_kw), samples=args.samples, inr=inr)
    lo, hi = cfg.train.compression
    manifold_file = RESULTS / "manifolds" / f"{args.name}.safetensors"
    if args.manifold:
        manifold = mk.Manifold.load(args.manifold)
        cfg = manifold.config
        args.morph_epochs = cfg.train.epochs
        lo, hi = cfg.train.compression
        times["morph"] = float(manifold.info.get("seconds", 0.0))
        manifold_file = Path(args.manifold).resolve()
    else:
        manifold = mk.morph(base, train, example_inputs=x, config=cfg, device=args.device)
        times["morph"] = time.perf_counter() - t0
        if args.limit is None:
            manifold.save(manifold_file)

    common = dict(base=base, samples=args.samples, seed=args.seed, train_data=train, train_epochs=args.epochs,
                  device=args.device)
    if reused is not None:
        rows = mk.compare(manifold, test, ("neumeta",), COMPRESSIONS, **common) + [
            {**r, "trained": lo - 1e-9 <= r["compression"] <= hi + 1e-9}  # flagged against this manifold's range
            for r in reused["rows"]]
    else:
        rows = mk.compare(manifold, test, ("neumeta", *PRUNING), COMPRESSIONS, **common)
        if args.finetune_epochs:
            rows += mk.compare(manifold, test, PRUNING, COMPRESSIONS[1:], finetune_epochs=args.finetune_epochs,
                               **common)
        rows += mk.compare(manifold, test, ("slimmable",), COMPRESSIONS, **common)
        # the 0% oracle is the base itself (its own, longer schedule); train the compressed structures
        rows += mk.compare(manifold, test, ("individual",), COMPRESSIONS[1:], **common)
    base_row = next(r for r in rows if r["method"] == "l1" and r["compression"] == 0.0)
    if reused is None:
        rows.append({**base_row, "method": "individual", "label": "individual", "seconds": 0.0})
    if args.oracle_epochs:
        oracle = f"individual-{args.oracle_epochs}ep"
        rows = [r for r in rows if r["label"] != oracle]  # a reused file may hold an older one
        extra = {"precision": "bf16"} if args.precision == "bf16" else {}
        for g in COMPRESSIONS[1:]:
            t1 = time.perf_counter()
            net = mk.train_individual(base, 1 - g, train, epochs=args.oracle_epochs, example_inputs=x,
                                      cliques=manifold.cliques, seed=args.seed, device=args.device, **extra)
            acc = mk.evaluate(net, test)["accuracy"]
            ref = next(r for r in rows if r["label"] == "individual" and r["compression"] == g)
            rows.append({**ref, "label": oracle, "value": acc, "seconds": time.perf_counter() - t1})
        rows.append({**base_row, "method": "individual", "label": oracle, "seconds": 0.0})

    for g in COMPRESSIONS:
        params = {r["params"] for r in rows if r["compression"] == g}
        assert len(params) == 1, f"compression {g}: parameter counts differ: {params}"

    def seconds(label: str) -> float:
        return sum(r["seconds"] for r in rows if r["label"] == label)

    base_params = base_row["params"]
    cost = {  # method -> (training wall time s, training epochs, stored parameters to serve every width)
        "neumeta": (times["morph"], args.morph_epochs, stored_params(manifold)),
        "individual": (seconds("individual"), args.epochs * (len(COMPRESSIONS) - 1),
                       sum(r["params"] for r in rows if r["label"] == "individual")),
        "slimmable": (seconds("slimmable"), args.epochs, base_params),
        **{p: (0.0, 0, base_params) for p in PRUNING},
    }
    if args.oracle_epochs:
        cost[f"individual-{args.oracle_epochs}ep"] = (
            seconds(f"individual-{args.oracle_epochs}ep"), args.oracle_epochs * (len(COMPRESSIONS) - 1),
            cost["individual"][2])
    cost_md = ["", "## Training cost and stored parameters", "",
               "Beyond the base model (10 epochs, shared by NeuMeta and pruning; the individual oracle's 0% "
               "model is that base). Stored parameters: what serves every width (NeuMeta: the INR and its "
               "residual base grids; individual: one model per compression, base included; pruning and "
               "slimmable: one full-size model).", "",
               "| method | training wall time (s) | training epochs | stored parameters |",
               "| --- | ---: | ---: | ---: |"]
    cost_md += [f"| {m} | {s:.0f} | {e} | {p:,} |" for m, (s, e, p) in cost.items()]
    m = machine()
    meta = {"command": f"`{m['command']}`", "seed": args.seed, "data": args.data,
            "machine": f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
                       f"python {m['python']}, {m['date']}",
            "base": f"{Path(args.base).name}: {100 * mk.evaluate(base, test)['accuracy']:.2f}% "
                    "(10-epoch CPU schedule, see results/base/README.md)",
            "budget": f"{args.epochs} epoch(s) per model (each individual model, slimmable), "
                      f"NeuMeta {args.morph_epochs} morphing epochs; pruning without fine-tuning"
                      + (f" and +{args.finetune_epochs} epoch(s)" if args.finetune_epochs else ""),
            "manifold": f"{'version-1 INR (fixed bilinear base, clean)' if args.clean_base else 'INRConfig'}"
                        f" ({cfg.inr}), "
                        f"{args.morph_epochs} epochs, compression U[{lo:g}, {hi:g}]"
                        f"{' (75% untrained)' if hi < 0.75 else ''}, sandwich {cfg.train.sandwich}, "
                        f"BatchNorm {'folded' if cfg.fuse_bn else 'kept'}, base jitter {cfg.train.base_jitter}, "
                        f"K = {args.samples}; saved to {manifold_file.relative_to(RESULTS.parent.parent)}"
                        if args.limit is None else "not saved (smoke run)",
            "wall times (s)": ", ".join(f"{k} {v:.0f}" for k, v in times.items())
                              + "; " + ", ".join(f"{lab} {seconds(lab):.0f}"
                                                 for lab in dict.fromkeys(r["label"] for r in rows))}
    if manifold_file.is_file():
        calib = 0 if manifold.calib is None else manifold.calib.shape[0]
        meta["manifold file"] = (f"{manifold_file.stat().st_size / 1e6:.1f} MB: INR and base grids, the base's "
                                 f"predicted tensors, {calib} calibration inputs in float16 "
                                 f"({0 if manifold.calib is None else manifold.calib.numel():,} numbers)")
    if reused is not None:
        meta["baselines"] = (f"every row but NeuMeta's reused from {args.baselines_from} "
                             f"(measured {reused['meta']['baselines_measured']})")
    paths = write_report(rows, RESULTS, title=f"{args.name}: ResNet-20 / CIFAR-10, NeuMeta vs baselines",
                         meta=meta, stem=args.name, plot=args.name)
    with open(paths["md"], "a") as f:
        f.write("\n".join(cost_md) + "\n")
    report = json.loads(paths["json"].read_text())
    report["cost"] = {k: {"seconds": s, "epochs": e, "stored_params": p} for k, (s, e, p) in cost.items()}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
