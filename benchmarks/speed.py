"""Speed: ``sample(w, samples=50)`` time and the cost of a morph() step against a plain training step.

For LeNet-5 (MNIST shapes), ResNet-20 (CIFAR-10 shapes) and timm resnet18
(224x224): the time of ``Manifold.sample(w, samples=K)`` at a few widths, and,
for LeNet-5 and ResNet-20, the wall time of one ``morph()`` step against one
plain training step (forward, cross-entropy, backward, Adam) of the full-width
network at the same batch. Weights are random (speed does not depend on
them). A morph() step is timed inside ``morph()`` (``info["median_step_seconds"]``:
the median over its ``--steps`` steps of each step's wall time, from drawing
the width to the EMA update; set-up, evaluation and checkpoints are outside
it). The median is the steady state a long run sees; the first visit of a
width map (building its template and coordinate table) is a slower outlier,
counted in the mean step (``train_seconds / steps``, also reported). On a
shared machine a step's wall time drifts by 2x within minutes, so the two
are measured in ``--rounds`` interleaved rounds (plain, morph, plain) and the
table reports the median over rounds of each round's ratio (its plain step:
the mean of its two plain timings, each the median of 20 steps). Writes
``benchmarks/results/speed.{json,md}``.

    python benchmarks/speed.py                 # the default INR (MorphConfig())
    python benchmarks/speed.py --threads 2 --batch 128
    python benchmarks/speed.py --precision bfloat16 --name speed_bf16   # AMX / AVX512-BF16 CPUs, GPUs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine, write

import morphkit as mk

MODELS = {  # name: (spec, input shape, classes)
    "lenet5": ("lenet5", (1, 28, 28), 10),
    "resnet20": ("resnet20", (3, 32, 32), 10),
    "resnet18": ("timm:resnet18?num_classes=10", (3, 224, 224), 10),
}


def _data(shape: tuple[int, ...], classes: int, batch: int, n: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def plain_step_seconds(model: torch.nn.Module, data: list, repeats: int) -> float:
    """Median wall time of one training step of ``model`` (forward, CE, backward, Adam)."""
    model = model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 3):
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_rounds(spec: str, model: torch.nn.Module, data: list, x: torch.Tensor, cfg: mk.MorphConfig,
                steps: int, rounds: int) -> tuple[list[dict], mk.Manifold]:
    """Interleaved rounds of plain-step and morph-step timings (see the module doc).

    Returns:
        One ``{"plain_step_s", "morph_step_s", "morph_mean_step_s", "step_ratio"}`` per round,
        and the last manifold.
    """
    import dataclasses

    c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    mk.morph(model, data, example_inputs=x, config=c, progress=False, device="cpu")  # warm-up (JIT, caches)
    out = []
    for _ in range(rounds):
        before = plain_step_seconds(mk.build_model(spec), data, repeats=20)
        manifold = mk.morph(model, data, example_inputs=x, config=c, progress=False, device="cpu")
        after = plain_step_seconds(mk.build_model(spec), data, repeats=20)
        p, m = (before + after) / 2, manifold.info["median_step_seconds"]
        out.append({"plain_step_s": p, "morph_step_s": m, "morph_mean_step_s": manifold.info["train_seconds"] / steps,
                    "step_ratio": m / p})
    return out, manifold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet20,resnet18")
    ap.add_argument("--batch", type=int, default=128, help="batch of the step comparison")
    ap.add_argument("--steps", type=int, default=100, help="morph() steps per timing round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved plain / morph timing rounds")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--widths", default="1.0,0.5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=None, help="INR width (default: MorphConfig's)")
    ap.add_argument("--layers", type=int, default=None, help="INR depth (default: MorphConfig's)")
    ap.add_argument("--repeats", type=int, default=3, help="sample() timings per width (median reported)")
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                    help="INR matrix-product precision (INRConfig.precision)")
    ap.add_argument("--name", default="speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base_inr = mk.INRConfig()
    inr = mk.INRConfig(hidden=args.hidden or base_inr.hidden, layers=args.layers or base_inr.layers,
                       precision=args.precision)
    cfg = mk.MorphConfig(inr=inr, samples=args.samples)
    widths = [float(w) for w in args.widths.split(",")]
    rows = []
    for name in args.models.split(","):
        spec, shape, classes = MODELS[name]
        torch.manual_seed(0)
        model = mk.build_model(spec).eval()
        x = torch.zeros(1, *shape)
        row: dict = {"model": name, "params": sum(p.numel() for p in model.parameters())}
        if name != "resnet18":
            data = _data(shape, classes, args.batch, 4)
            row["rounds"], manifold = step_rounds(spec, model, data, x, cfg, args.steps, args.rounds)
            for key in ("plain_step_s", "morph_step_s", "morph_mean_step_s", "step_ratio"):
                row[key] = statistics.median(r[key] for r in row["rounds"])
        else:  # sampling only: a 2-step manifold is enough to time sample()
            import dataclasses

            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2))
            manifold = mk.morph(model, _data(shape, classes, 2, 1), example_inputs=x, config=c, progress=False,
                                device="cpu")
        row["inr_params"] = sum(p.numel() for p in manifold.inr.parameters())
        row["rows_full_width"] = manifold.builder.table(manifold.builder.full()).rows
        for w in widths:
            manifold.sample(w, samples=2)  # warm the template and coordinate caches
            times = []
            for _ in range(args.repeats if row["rows_full_width"] < 100_000 else 1):  # resnet18: once
                t0 = time.perf_counter()
                manifold.sample(w, samples=args.samples)
                times.append(time.perf_counter() - t0)
            row[f"sample_{w:g}_s"] = statistics.median(times)
        rows.append(row)
        print(row, flush=True)
    result = {"machine": machine(), "inr": {"hidden": inr.hidden, "layers": inr.layers, "n_freqs": inr.n_freqs},
              "batch": args.batch, "samples": args.samples, "rows": rows}
    m = result["machine"]
    md = [f"# {args.name}: sampling time and morph-step cost", "",
          f"Command: `{m['command']}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores, {args.threads} torch threads; torch {m['torch']}; "
          f"{m['date']}  ",
          f"INR {inr.hidden}x{inr.layers} ({inr.precision}), K = {args.samples} samples, batch {args.batch}; "
          f"sample() times are the median of {args.repeats} warm calls (resnet18: one); step times and the "
          f"ratio are medians over {args.rounds} interleaved rounds of {args.steps} morph steps; mean step: "
          "including first visits of width maps.", "",
          "| model | params | INR params | rows (full) | " + " | ".join(f"sample({w:g}) s" for w in widths)
          + " | plain step ms | morph step ms | ratio | mean morph step ms |",
          "| --- " * (8 + len(widths)) + "|"]
    for r in rows:
        step = (f"{1e3 * r['plain_step_s']:.1f} | {1e3 * r['morph_step_s']:.1f} | {r['step_ratio']:.2f}x | "
                f"{1e3 * r['morph_mean_step_s']:.1f}" if "plain_step_s" in r else "- | - | - | -")
        md.append(f"| {r['model']} | {r['params']:,} | {r['inr_params']:,} | {r['rows_full_width']:,} | "
                  + " | ".join(f"{r[f'sample_{w:g}_s']:.2f}" for w in widths) + f" | {step} |")
    spread = [r["model"] + " " + ", ".join(f"{x['step_ratio']:.2f}x" for x in r["rounds"])
              for r in rows if "rounds" in r]
    if spread:
        md += ["", "Step ratio of each round: " + "; ".join(spread) + "."]
    write(args.name, result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
