"""Per-clique widths: random width maps against the uniform width of the same parameter count.

A user may give each clique its own width (``manifold.sample({clique_id:
channels})``). For a committed manifold this draws ``--maps`` random per-clique
width maps at each target size (the parameter counts of the uniform 50% and
75% models), samples each, and compares their test accuracy with the uniform
model of that size. A map is drawn as ``width_c = clip(t + spread * u_c, lo, 1)``
with ``u_c ~ U(-1, 1)`` per resizable clique and the offset ``t`` found by
bisection so that the map's parameter count is within ``--tolerance`` of the
target. ``lo`` is the narrowest trained width, so the maps stay inside the
trained range where that is possible; at the narrowest trained width itself
(75% for the default range) every other map of that size must take some
clique below the trained range, so there ``lo`` is 1/16 and the table counts
the cliques that are extrapolated.

``--oracle-maps N`` also trains, from scratch, the uniform model and the first
N random maps of each size as networks of their own (``train_individual``,
``--oracle-epochs`` epochs each, the budget of the benchmark's individually
trained models): the gap between those tells how much of a per-clique map's
deficit belongs to its structure (a clique of one or two channels) rather than
to the manifold.
Writes ``benchmarks/results/per_clique_NAME.{json,md}``.

    python benchmarks/per_clique.py --manifold benchmarks/results/manifolds/cifar10_resnet20.safetensors \\
        --data cifar10 --threads 1
    python benchmarks/per_clique.py --manifold benchmarks/results/manifolds/mnist_lenet.safetensors \\
        --data mnist --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import DATA, machine, write

import morphkit as mk
from morphkit.data import load_data, make_loaders

SPECS = {"cifar10": f"cifar10:{DATA / 'cifar10-jpeg.tar.gz'}", "mnist": f"mnist:{DATA / 'mnist'}"}


def params_of(manifold: mk.Manifold, counts: dict[int, int]) -> int:
    """Parameters of the model at a width map (from the cached resized template)."""
    return sum(p.numel() for p in manifold.template(counts).parameters())


def draw_map(manifold: mk.Manifold, target: int, spread: float, low: float, gen: torch.Generator,
             tolerance: float, relative: bool = False) -> dict[int, int] | None:
    """A random per-clique width map whose parameter count is within ``tolerance`` of ``target``, or None.

    Each clique's width is ``t + spread * u`` (``relative``: ``t * (1 + spread * u)``), ``u ~ U(-1, 1)``.
    """
    resizable = [c for c in manifold.cliques if not c.fixed]
    u = {c.id: float(torch.rand((), generator=gen)) * 2 - 1 for c in resizable}

    def at(t: float) -> dict[int, int]:
        out = {c.id: c.size for c in manifold.cliques}
        for c in resizable:
            w = t * (1 + spread * u[c.id]) if relative else t + spread * u[c.id]
            out[c.id] = c.channels_for(min(1.0, max(low, w)))
        return out

    lo_t, hi_t = (low / (1 + spread), 1.0 / max(1e-6, 1 - spread)) if relative else (low - spread, 1.0 + spread)
    for _ in range(30):
        mid = (lo_t + hi_t) / 2
        if params_of(manifold, at(mid)) < target:
            lo_t = mid
        else:
            hi_t = mid
    best = min((at(lo_t), at(hi_t)), key=lambda m: abs(params_of(manifold, m) - target))
    return best if abs(params_of(manifold, best) - target) <= tolerance * target else None


def from_scratch(manifold: mk.Manifold, counts: dict[int, int], train, test, args) -> float:
    """Test accuracy of the structure at ``counts`` trained from scratch (the individual oracle)."""
    net = mk.train_individual(manifold.arch, counts, train, epochs=args.oracle_epochs,
                              example_inputs=manifold.example_inputs, cliques=manifold.cliques, seed=args.seed,
                              progress=False)
    return mk.evaluate(net, test)["accuracy"]


def trained_maps(tc: mk.TrainConfig) -> str:
    """How the manifold's training drew width maps, in words."""
    if tc.per_clique:
        return "an independent width per clique"
    if tc.clique_spread > 0:
        spread = f"per-clique offsets U(-{tc.clique_spread:g}, {tc.clique_spread:g}) around each drawn width"
        if tc.clique_floor() < 1 - tc.compression[1]:
            spread += (f" and, in half of the steps, around the narrowest one, single cliques down to width "
                       f"{tc.clique_floor():g}")
        return spread
    return "uniform width maps"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifold", required=True)
    ap.add_argument("--data", choices=sorted(SPECS), required=True)
    ap.add_argument("--maps", type=int, default=20, help="random maps per target size")
    ap.add_argument("--spread", type=float, default=0.2, help="half-range of the per-clique width offsets")
    ap.add_argument("--relative", action="store_true",
                    help="offsets relative to the width (t * (1 + spread * u)) instead of added to it")
    ap.add_argument("--tolerance", type=float, default=0.01, help="relative parameter-count tolerance")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle-maps", type=int, default=0,
                    help="train the uniform model and this many maps of each size from scratch (0: none)")
    ap.add_argument("--oracle-compressions", default="0.5,0.75", help="sizes whose maps are trained from scratch")
    ap.add_argument("--oracle-epochs", type=int, default=4, help="epochs of each model trained from scratch")
    ap.add_argument("--name", default=None, help="result name (default: per_clique_<manifold stem>)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or "per_clique_" + Path(args.manifold).name.split(".")[0]
    manifold = mk.Manifold.load(args.manifold)
    splits = load_data(SPECS[args.data])
    train, test = make_loaders(splits, batch_size=128, seed=args.seed, test_batch_size=500)
    hi = manifold.config.train.compression[1]
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    groups = []
    for g in (0.5, 0.75):
        uniform = manifold.width_map(1 - g)
        target = params_of(manifold, uniform)
        u_acc = mk.evaluate(manifold.sample(uniform, samples=args.samples), test)["accuracy"]
        maps, tries = [], 0
        low = 1 - hi if g < hi - 1e-9 else 1 / 16  # inside the trained range where a map of this size can be
        while len(maps) < args.maps and tries < 20 * args.maps:
            tries += 1
            m = draw_map(manifold, target, args.spread, low, gen, args.tolerance, args.relative)
            if m is not None and m != uniform:
                maps.append(m)
        rows = []
        for m in maps:
            acc = mk.evaluate(manifold.sample(m, samples=args.samples), test)["accuracy"]
            widths = [m[c.id] / c.size for c in manifold.cliques if not c.fixed]
            rows.append({"accuracy": acc, "params": params_of(manifold, m), "untrained": len(manifold.untrained(m)),
                         "min_width": round(min(widths), 3), "max_width": round(max(widths), 3),
                         "widths": {str(k): v for k, v in m.items()}})
            print(f"compression {g}: {100 * acc:.2f}% ({rows[-1]['params']:,} params, "
                  f"{rows[-1]['untrained']} cliques below the trained range)", flush=True)
        u_oracle = None
        if args.oracle_maps and any(abs(g - float(c)) < 1e-9 for c in args.oracle_compressions.split(",")):
            u_oracle = from_scratch(manifold, uniform, train, test, args)
            for r, m in zip(rows[:args.oracle_maps], maps):
                r["from_scratch"] = from_scratch(manifold, m, train, test, args)
                print(f"compression {g}: from scratch {100 * r['from_scratch']:.2f}% (manifold "
                      f"{100 * r['accuracy']:.2f}%), uniform from scratch {100 * u_oracle:.2f}%", flush=True)
        accs = [r["accuracy"] for r in rows]
        groups.append({"compression": g, "uniform_accuracy": u_acc, "uniform_params": target, "maps": rows,
                       "uniform_from_scratch": u_oracle,
                       "lowest_width": low,
                       "mean": statistics.mean(accs) if accs else None,
                       "stdev": statistics.stdev(accs) if len(accs) > 1 else None,
                       "min": min(accs) if accs else None, "max": max(accs) if accs else None})
    seconds = time.perf_counter() - t0
    m = machine()
    result = {"machine": m, "manifold": args.manifold, "trained_compression": list(manifold.config.train.compression),
              "per_clique_training": manifold.config.train.per_clique,
              "training_clique_spread": manifold.config.train.clique_spread, "spread": args.spread,
              "tolerance": args.tolerance, "samples": args.samples, "relative": args.relative,
              "oracle_maps": args.oracle_maps, "oracle_epochs": args.oracle_epochs, "seconds": round(seconds, 1),
              "groups": groups}
    md = [f"# {name}: random per-clique width maps against the uniform width", "",
          f"Command: `{m['command']}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}; "
          f"{m['date']}  ",
          f"Manifold: `{args.manifold}` (trained on compression U{list(manifold.config.train.compression)}, "
          f"{trained_maps(manifold.config.train)}); K = {args.samples}; "
          + (f"maps: width x (1 + U(-{args.spread}, {args.spread})) per clique" if args.relative else
             f"maps: width offsets U(-{args.spread}, {args.spread}) per clique") + ", parameter count within "
          f"{100 * args.tolerance:g}% of the uniform model's; {seconds:.0f} s.", "",
          "| compression | uniform | random maps: mean | stdev | min | max | maps | mean gap | narrowest clique "
          "width allowed | cliques below trained range (mean) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for gr in groups:
        if not gr["maps"]:
            md.append(f"| {100 * gr['compression']:g}% | {100 * gr['uniform_accuracy']:.2f}% | no map drawn | | | | 0 "
                      "| | | |")
            continue
        below = statistics.mean(r["untrained"] for r in gr["maps"])
        md.append(f"| {100 * gr['compression']:g}% ({gr['uniform_params']:,} params) | "
                  f"{100 * gr['uniform_accuracy']:.2f}% | {100 * gr['mean']:.2f}% | "
                  f"{100 * (gr['stdev'] or 0):.2f} | {100 * gr['min']:.2f}% | {100 * gr['max']:.2f}% | "
                  f"{len(gr['maps'])} | {100 * (gr['mean'] - gr['uniform_accuracy']):+.2f} | "
                  f"{gr['lowest_width']:.3g} | {below:.1f} |")
    if args.oracle_maps:
        md += ["", f"Trained from scratch ({args.oracle_epochs} epochs each, `train_individual`), the uniform model "
               f"and the first {args.oracle_maps} maps of each size, beside the manifold's samples of those maps:",
               "",
               "| compression | uniform: manifold | uniform: from scratch | maps: manifold (mean) | "
               "maps: from scratch (mean) | maps: manifold - from scratch (mean) | from-scratch gap, maps - uniform |",
               "| --- | --- | --- | --- | --- | --- | --- |"]
        for gr in groups:
            done = [r for r in gr["maps"] if "from_scratch" in r]
            if not done or gr["uniform_from_scratch"] is None:
                continue
            mf = statistics.mean(r["accuracy"] for r in done)
            fs = statistics.mean(r["from_scratch"] for r in done)
            md.append(f"| {100 * gr['compression']:g}% | {100 * gr['uniform_accuracy']:.2f}% | "
                      f"{100 * gr['uniform_from_scratch']:.2f}% | {100 * mf:.2f}% ({len(done)}) | {100 * fs:.2f}% | "
                      f"{100 * (mf - fs):+.2f} | {100 * (fs - gr['uniform_from_scratch']):+.2f} |")
    floor = manifold.config.train.clique_floor()
    md += ["", f"Trained range: compression up to {hi:g}" + (
        f"; single cliques down to width {floor:g} in maps of about the narrowest size" if floor < 1 - hi else "")
        + "; a clique narrower than that (`Manifold.untrained`) is extrapolated by the INR."]
    write(name, result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
