"""Hugging Face transformers at their real sizes: how much of each shrinks at a width.

The coverage zoo runs tiny configs (hidden 32, 2 layers) so a whole morph fits
in seconds; there the embedding tables (512 position rows of a 32-wide model)
dominate, and the share of parameters that shrinks says little about a real
model. This builds the standard configs (BERT-base, DistilBERT, GPT-2 small
with untied embeddings, ViT-base; random weights, nothing downloaded), resizes
each uniformly to ``--width`` and reports the parameter counts and which part
cannot shrink faster than the width: a vocabulary or position table keeps its
rows and loses only columns. Writes ``benchmarks/results/hf_shrink.{json,md}``.

    python benchmarks/hf_shrink.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, write

import morphkit as mk


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import transformers as tf

    ids = torch.randint(0, 1000, (1, 16))
    if name == "bert-base (sequence classification)":
        return tf.BertForSequenceClassification(tf.BertConfig(num_labels=3)).eval(), ids
    if name == "distilbert (sequence classification)":
        return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(num_labels=3)).eval(), ids
    if name == "gpt2 small (LM head, untied)":
        return tf.GPT2LMHeadModel(tf.GPT2Config(tie_word_embeddings=False)).eval(), ids
    if name == "vit-base (image classification)":
        return tf.ViTForImageClassification(tf.ViTConfig(num_labels=10)).eval(), torch.randn(1, 3, 224, 224)
    raise ValueError(name)


MODELS = ("bert-base (sequence classification)", "distilbert (sequence classification)",
          "gpt2 small (LM head, untied)", "vit-base (image classification)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    count = mk.export.count_params
    rows = []
    for name in MODELS:
        model, x = build(name)
        t = time.perf_counter()
        small = mk.resize(model, x, args.width)
        seconds = time.perf_counter() - t
        tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        full, half = count(model), count(small)
        rows.append({"model": name, "params": full, "params_resized": half, "shrunk": 1 - half / full,
                     "embedding_share": tables / full, "seconds": round(seconds, 1)})
        print(f"{name}: {full:,} -> {half:,} ({1 - half / full:.1%} shrunk), embeddings {tables / full:.1%}, "
              f"{seconds:.1f} s", flush=True)
    m = machine()
    md = [f"# Hugging Face models at real size: parameters shrunk at width {args.width:g}", "",
          f"Command: `python benchmarks/hf_shrink.py --threads {args.threads or torch.get_num_threads()}`  ",
          f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); torch {m['torch']}; "
          f"{m['date']}", "",
          "Standard configs, random weights (nothing downloaded), uniform `resize` (find_cliques with its "
          "checks included in the time). An embedding table keeps its rows (vocabulary, positions) and "
          f"loses only columns, so it shrinks by {1 - args.width:.0%} where a square layer shrinks by "
          f"{1 - args.width ** 2:.0%} (GPT-2's untied LM head, a vocabulary-by-width `nn.Linear`, too).", "",
          "| model | params | resized | shrunk | `nn.Embedding` tables' share | seconds |",
          "| --- | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['model']} | {r['params']:,} | {r['params_resized']:,} | {r['shrunk']:.1%} | "
           f"{r['embedding_share']:.1%} | {r['seconds']} |" for r in rows]
    write("hf_shrink", {"width": args.width, "machine": m, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
