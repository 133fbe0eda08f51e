"""Wide coverage: every model through the whole pipeline, or refused with a clear error.

``coverage.py`` looks closely at the front half (fusion, cliques, smoothing) of
a dozen models; this script runs the *whole* pipeline on a wide zoo the tests
never use: torchvision's classification and segmentation models that build in a
few seconds, 25+ timm families, Hugging Face transformers models from tiny
configs (BERT, GPT-2 untied, ViT, DistilBERT, Llama), and user-style models with
concatenation (a U-Net, a dense block, an Inception-style block) or PyTorch's own
transformer layers (a text classifier on ``nn.TransformerEncoder``). Per model, in
a subprocess with a time limit:

1. ``find_cliques`` (with its self-check): cliques, resizable, fixed and why;
2. exactness: ``smooth`` must leave the output unchanged, checked in float64
   on randomly perturbed weights with the attention's query and key scaled up
   (sharp attention), so a cross-head permutation cannot pass; a *silent
   change* is a relative difference above 1e-6;
3. the parameter fraction that shrinks at width 0.5 (``resize``);
4. a short ``morph`` (3 steps, a small INR, random inputs, a generic loss on the
   first output tensor), ``sample(0.5)``, ``save_model`` / ``load_model``
   (outputs equal).

A model either gets through, or stops with a ``MorphkitError`` (a refusal,
counted apart), or fails with another exception (a *raw* error: a bug).
Writes ``benchmarks/results/coverage_zoo.{json,md}``.

    python benchmarks/coverage_zoo.py --threads 1               # the whole zoo
    python benchmarks/coverage_zoo.py --threads 1 tv:alexnet hf:gpt2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

TV_CLASSIFY = ["alexnet", "vgg11_bn", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
               "squeezenet1_0", "squeezenet1_1", "densenet121", "googlenet", "mobilenet_v2",
               "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "mnasnet1_0", "shufflenet_v2_x0_5",
               "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
               "swin_t", "vit_b_16", "maxvit_t"]
TV_SEGMENT = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
TIMM = ["resnet18", "resnet26d", "resnest14d", "seresnext26d_32x4d", "regnetx_002", "regnety_002", "dla34",
        "mobilenetv2_050", "mobilenetv3_small_100", "efficientnet_b0", "mixnet_s", "ghostnet_100", "hrnet_w18_small",
        "cspresnet50", "dpn48b", "convnext_atto", "convnextv2_atto", "edgenext_xx_small", "poolformer_s12",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "pvt_v2_b0", "levit_128s", "mobilevit_xxs", "coat_lite_tiny",
        "mixer_s16_224", "resmlp_12_224", "swin_tiny_patch4_window7_224", "efficientformer_l1", "rexnet_100",
        "tinynet_e", "fbnetc_100", "selecsls42b", "xception41"]
HF = ["bert", "distilbert", "vit", "gpt2", "llama"]
USER = ["unet", "denseblock", "inception", "transformer"]
ZOO = ([f"tv:{n}" for n in TV_CLASSIFY + TV_SEGMENT] + [f"timm:{n}" for n in TIMM] + [f"hf:{n}" for n in HF]
       + [f"user:{n}" for n in USER])
#: inputs: 224 for transformers whose positional tables fix it, 64-96 elsewhere
NATIVE_224 = ("vit", "deit", "mixer", "resmlp", "swin", "levit", "coat", "maxvit", "efficientformer", "pvt",
              "poolformer", "edgenext", "mobilevit")


class DenseBlock(nn.Module):
    """A DenseNet-style block: every layer sees the concatenation of all earlier feature maps."""

    def __init__(self, c: int = 16, growth: int = 8, layers: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layers = nn.ModuleList()
        for i in range(layers):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(),
                                             nn.Conv2d(c + i * growth, growth, 3, padding=1)))
        self.head = nn.Linear(c + layers * growth, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.head(torch.cat(feats, 1).mean((2, 3)))


class Inception(nn.Module):
    """An Inception-style block: parallel branches concatenated, then a classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.b1 = nn.Conv2d(32, 16, 1)
        self.b3 = nn.Sequential(nn.Conv2d(32, 12, 1), nn.ReLU(), nn.Conv2d(12, 24, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2))
        self.mix = nn.Sequential(nn.BatchNorm2d(48), nn.ReLU(), nn.Conv2d(48, 32, 1))
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.mix(torch.cat([self.b1(y), self.b3(y), self.b5(y)], 1))
        return self.head(y.mean((2, 3)))


class TokenTransformer(nn.Module):
    """A text classifier on PyTorch's own layers: ``nn.TransformerEncoder`` (``nn.MultiheadAttention``)."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model (random init, eval) and a batch of 2 example inputs."""
    kind, _, arch = name.partition(":")
    torch.manual_seed(0)
    side = 224 if any(k in arch for k in NATIVE_224) else 96 if "inception" in arch or "googlenet" in arch else 64
    image = torch.randn(2, 3, side, side)
    if kind == "tv":
        import torchvision

        kw = {"weights": None, "num_classes": 10}
        if arch in TV_SEGMENT:
            kw = {"weights": None, "weights_backbone": None, "num_classes": 5, "aux_loss": False}
        if arch == "googlenet":
            kw.update(aux_logits=False, init_weights=True)
        return torchvision.models.get_model(arch, **kw).eval(), image
    if kind == "timm":
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=10).eval(), image
    if kind == "user":
        if arch == "unet":
            import morphkit as mk

            return mk.build_model("unet").eval(), torch.randn(2, 1, 48, 48)
        if arch == "transformer":
            return TokenTransformer().eval(), torch.randint(0, 100, (2, 8))
        return (DenseBlock() if arch == "denseblock" else Inception()).eval(), torch.randn(2, 3, 32, 32)
    import transformers as tf

    ids = torch.randint(0, 100, (2, 8))
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if arch == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=100, num_labels=3, **small)).eval(), ids
    if arch == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                      hidden_dim=64)).eval(), ids
    if arch == "vit":
        return (tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, num_labels=5, **small)).eval(),
                torch.randn(2, 3, 32, 32))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16,
                                                bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)).eval(), ids
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, num_key_value_heads=2, max_position_embeddings=32,
                                                  tie_word_embeddings=False, **small)).eval(), ids
    raise ValueError(name)


def first_tensor(out: Any) -> torch.Tensor:
    from morphkit.graph import _flatten_tensors

    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    return next(t for t in _flatten_tensors(out) if t.is_floating_point())


def run_one(name: str) -> dict[str, Any]:
    import morphkit as mk
    from morphkit.graph import _sharpened

    rec: dict[str, Any] = {"model": name}
    stage = "build"
    try:
        model, x = build(name)
        rec["params"] = sum(p.numel() for p in model.parameters())
        stage = "find_cliques"
        t = time.perf_counter()
        cliques = mk.find_cliques(model, x)
        rec["cliques_s"] = round(time.perf_counter() - t, 2)
        free = [c for c in cliques if not c.fixed]
        rec["cliques"], rec["resizable"] = len(cliques), len(free)
        fixed: dict[str, int] = {}
        for c in cliques:
            if c.fixed:
                why = c.reason.split(" (")[0].split(":")[0]
                fixed[why] = fixed.get(why, 0) + 1
        rec["fixed"] = fixed
        stage = "exactness"
        smoothed, _ = mk.smooth(model, x, cliques)
        g = torch.Generator().manual_seed(1)
        params = {k for k, _ in model.named_parameters()}  # buffers (running variances) stay as they are
        state = {k: (v + 0.05 * v.std().nan_to_num() * torch.randn(v.shape, generator=g) if k in params
                     and v.is_floating_point() and v.numel() > 1 else v) for k, v in model.state_dict().items()}
        sm_state = mk.smooth(_load(model, state), x, cliques)[0].state_dict()
        a = _run64(model, _sharpened(model, state), x)
        b = _run64(model, _sharpened(smoothed, sm_state), x)
        rec["exact_rel_diff"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
        stage = "resize"
        half = mk.resize(model, x, 0.5, cliques=cliques)
        rec["params_half"] = sum(p.numel() for p in half.parameters())
        rec["shrunk_fraction"] = 1 - rec["params_half"] / rec["params"]
        stage = "morph"
        t = time.perf_counter()
        data = [(x, torch.zeros(len(x), dtype=torch.long))] * 2
        cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=1, n_freqs=4), samples=2, calib_samples=2,
                             train=mk.TrainConfig(steps=3, eval_compressions=()))

        def loss_fn(net: nn.Module, batch: Any) -> torch.Tensor:
            return first_tensor(net(batch[0])).float().pow(2).mean()

        manifold = mk.morph(model, data, example_inputs=x[:1], loss_fn=loss_fn, config=cfg, progress=False)
        rec["morph_s"] = round(time.perf_counter() - t, 2)
        stage = "sample"
        small = manifold.sample(0.5)
        rec["sampled_params_half"] = sum(p.numel() for p in small.parameters())
        stage = "save/load"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "small.safetensors"
            mk.save_model(small, path)
            back = mk.load_model(path, base=model)
        with torch.no_grad():
            same = torch.equal(first_tensor(back(x)), first_tensor(small(x)))
        if not same:
            raise AssertionError("the reloaded model's output differs from the sampled one")
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001 - every failure goes into the table
        import morphkit as mk

        rec["ok"] = False
        rec["stage"] = stage
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}"
        rec["refused"] = isinstance(e, mk.MorphkitError)
        if not rec["refused"]:
            traceback.print_exc()
    return rec


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    import copy
    from collections import OrderedDict

    m = copy.deepcopy(model)
    sd = OrderedDict(state)
    sd._metadata = getattr(model.state_dict(), "_metadata", None)  # mnasnet checks its version there
    m.load_state_dict(sd)
    return m.eval()


def _run64(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    from morphkit.graph import _as_double

    m = _load(model, state).double()
    with torch.no_grad():
        return first_tensor(m(_as_double(x))).double()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", help=f"a subset (default: the {len(ZOO)}-model zoo)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: run one model, print its JSON
    ap.add_argument("--name", default="coverage_zoo")
    ap.add_argument("--update", action="store_true",
                    help="rerun the given models and replace their rows in results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one)), flush=True)
        return 0
    names = args.models or ZOO
    records = []
    for name in names:
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name, "--threads", str(args.threads)],
                               capture_output=True, text=True, timeout=args.timeout)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            rec = json.loads(line[7:]) if line else {"model": name, "ok": False, "refused": False,
                                                     "error": f"crashed (rc {p.returncode}): {p.stderr[-300:]}"}
        except subprocess.TimeoutExpired:
            rec = {"model": name, "ok": False, "refused": False, "error": f"timed out after {args.timeout} s"}
        rec["total_s"] = round(time.perf_counter() - t, 1)
        records.append(rec)
        print(f"{name}: {'ok' if rec['ok'] else ('refused' if rec.get('refused') else 'FAILED')} "
              f"{rec.get('resizable', '?')}/{rec.get('cliques', '?')} resizable, shrinks "
              f"{100 * rec.get('shrunk_fraction', 0):.0f}%, diff {rec.get('exact_rel_diff', float('nan')):.1e}, "
              f"{rec['total_s']} s {rec.get('error', '')}", flush=True)
    meta = {"machine": machine()}
    if args.update:
        from _common import RESULTS

        old = json.loads((RESULTS / f"{args.name}.json").read_text())
        fresh = {r["model"]: r for r in records}
        records = [fresh.pop(r["model"], r) for r in old["records"]] + list(fresh.values())
        meta = {"machine": old["machine"], "updated": {"machine": machine(), "models": names}}
    write(args.name, {**meta, "records": records}, markdown(records, meta))
    return 0


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    n = len(records)
    ok = sum(r["ok"] for r in records)
    refused = sum(bool(r.get("refused")) for r in records)
    raw = [r for r in records if not r["ok"] and not r.get("refused")]
    silent = [r for r in records if r.get("exact_rel_diff", 0) > 1e-6]
    m = meta["machine"]
    rerun = meta.get("updated")
    lines = ["# Wide coverage: the whole pipeline on a zoo of models", "",
             f"Machine: {m['cpu']}, torch {m['torch']}, threads {m['torch_threads']}, one model per subprocess "
             f"beside other jobs (times are upper bounds). Command: `{m['command']}`"
             + (f"; rerun after a fix: `{rerun['machine']['command']}`" if rerun else ""), "",
             f"**{ok} of {n}** models through the whole pipeline (find_cliques, exact smoothing, resize, a 3-step "
             f"morph, sample(0.5), save/load); {refused} refused with a `MorphkitError`; {len(raw)} raw errors; "
             f"{len(silent)} silent output changes (float64, sharp attention, relative difference above 1e-6).", "",
             "| model | result | cliques (resizable / all) | params shrunk at 0.5 | exactness (rel. diff) | "
             "fixed cliques (why) | find_cliques s | morph s | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        res = "ok" if r["ok"] else ("refused" if r.get("refused") else "**FAILED**")
        fixed = ", ".join(f"{k} x{v}" for k, v in r.get("fixed", {}).items()) or "-"
        diff = f"{r['exact_rel_diff']:.1e}" if "exact_rel_diff" in r else "-"
        shrunk = f"{100 * r['shrunk_fraction']:.0f}%" if "shrunk_fraction" in r else "-"
        err = (f"{r.get('stage', '')}: {r['error']}" if "error" in r else "").replace("|", "/")
        lines.append(f"| {r['model']} | {res} | {r.get('resizable', '-')} / {r.get('cliques', '-')} | {shrunk} | "
                     f"{diff} | {fixed} | {r.get('cliques_s', '-')} | {r.get('morph_s', '-')} | {err} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
