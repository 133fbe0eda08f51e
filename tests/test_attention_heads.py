"""Attention is permuted and resized within heads, and the self-check catches a cross-head permutation.

A hand-written attention with separate q/k/v projections (the Hugging Face
layout) runs anywhere; Hugging Face BERT, ViT and DistilBERT run where
``transformers`` is installed (the ``dev`` extra).
"""

import dataclasses
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphkit as mk
from morphkit.graph import find_cliques, head_attention, validate_cliques


class SepAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections, reshaped with ``head_dim``."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = torch.softmax(q @ k.transpose(-1, -2) * self.scaling, dim=-1)  # (b, heads, t, t)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, -1))


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = SepAttention()
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 6)
        h = self.embed(x)
        h = self.norm(h + self.attn(h))
        return self.head(h.mean(1))


def _qkv_clique(cliques):
    return next(c for c in cliques if any(m.name == "attn.q_proj.weight" and m.dim == 0 for m in c.members))


def test_separate_qkv_cliques_permute_within_heads():
    model, x = TinyEncoder().eval(), torch.randn(2, 5, 6)
    assert head_attention(model.attn).head_size == 4
    c = _qkv_clique(find_cliques(model, x))
    assert not c.fixed and c.block == 4 and c.size == 16
    names = {m.name for m in c.members}
    assert {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight"} <= names


def test_self_check_rejects_a_cross_head_permutation():
    """The clique as it was before heads were known (free permutation) fails the check."""
    model, x = TinyEncoder().eval(), torch.randn(2, 5, 6)
    cliques = find_cliques(model, x)
    free = [dataclasses.replace(c, block=1) if c is _qkv_clique(cliques) else c for c in cliques]
    bad = validate_cliques(model, x, free, resize=False)
    assert _qkv_clique(cliques).id in bad
    assert validate_cliques(model, x, cliques, resize=False) == {}


def test_self_check_is_tight_on_nearly_uniform_attention():
    """Tiny q/k weights make attention nearly uniform (a cross-head permutation then moves the
    output by ~1e-6): the float64 check with sharpened attention still catches it."""
    model, x = TinyEncoder().eval(), torch.randn(2, 5, 6)
    with torch.no_grad():
        model.attn.q_proj.weight.mul_(1e-3)
        model.attn.k_proj.weight.mul_(1e-3)
    cliques = find_cliques(model, x)
    free = [dataclasses.replace(c, block=1) if c is _qkv_clique(cliques) else c for c in cliques]
    assert _qkv_clique(cliques).id in validate_cliques(model, x, free, resize=False)


def test_smoothing_keeps_sharp_attention_exact():
    model, x = TinyEncoder().eval(), torch.randn(2, 5, 6)
    with torch.no_grad():  # sharp attention: logits of several units
        model.attn.q_proj.weight.mul_(4)
        model.attn.k_proj.weight.mul_(4)
    smooth = importlib.import_module("morphkit.smooth").smooth
    smoothed, perms = smooth(model, x)
    ref, out = model.double()(x.double()), smoothed.double()(x.double())
    assert (ref - out).abs().max() <= 1e-9 * ref.abs().max()


def test_resize_keeps_the_head_count_and_shrinks_the_head_size():
    model, x = TinyEncoder().eval(), torch.randn(2, 5, 6)
    small = mk.resize(model, x, 0.5)
    a = small.attn
    assert (a.num_heads, a.head_dim, a.q_proj.out_features) == (4, 2, 8)
    assert a.scaling == pytest.approx(2 ** -0.5)
    assert (model.attn.num_heads, model.attn.head_dim) == (4, 4)  # the caller's model untouched
    assert small(x).shape == (2, 3)


# --------------------------------------------------------------------------- #
# Hugging Face transformers                                                    #
# --------------------------------------------------------------------------- #

def _bert(num_labels: int = 3):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=num_labels)
    return tf.BertForSequenceClassification(cfg).eval()


def test_bert_attention_is_blocked_by_heads_and_resizes_within_them():
    model, ids = _bert(), torch.randint(0, 100, (2, 8))
    cliques = find_cliques(model, (ids,))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    q = next(c for c in cliques if any(m.name == key and m.dim == 0 for m in c.members))
    assert not q.fixed and q.block == 8
    small = mk.resize(model, (ids,), 0.5, cliques=cliques)
    a = small.bert.encoder.layer[0].attention.self
    assert (a.num_attention_heads, a.attention_head_size, a.all_head_size) == (4, 4, 16)
    assert a.scaling == pytest.approx(0.5)
    assert small(ids).logits.shape == (2, 3)


def test_bert_morphs_samples_and_round_trips(tmp_path):
    model, ids = _bert(), torch.randint(0, 100, (4, 8))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 100, (4, 8), generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x).logits, y)

    cfg = mk.MorphConfig()
    cfg.train.steps = 3
    manifold = mk.morph(model, data, example_inputs=(ids,), config=cfg, loss_fn=loss_fn, progress=False)
    small = manifold.sample(0.5)
    assert small.bert.encoder.layer[1].attention.self.attention_head_size == 4
    path = os.fspath(tmp_path / "bert.morph.safetensors")
    manifold.save(path)
    again = mk.Manifold.load(path, base=model).sample(0.5)
    torch.testing.assert_close(again(ids).logits, small(ids).logits)
    mk.save_model(small, tmp_path / "small.safetensors")
    loaded = mk.load_model(tmp_path / "small.safetensors", base=model)
    torch.testing.assert_close(loaded(ids).logits, small(ids).logits)


@pytest.mark.parametrize("which", ["vit", "distilbert"])
def test_hf_encoders_resize_within_heads(which):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if which == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64, num_labels=5)).eval()
        x = torch.randn(2, 3, 32, 32)
    else:
        model = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                       hidden_dim=64, max_position_embeddings=32)).eval()
        x = torch.randint(0, 100, (2, 8))
    cliques = find_cliques(model, (x,))
    heads = [c for c in cliques if not c.fixed and c.block == 8]
    assert len(heads) == 2  # one per layer, 4 heads of 8
    small = mk.resize(model, (x,), 0.5, cliques=cliques)
    attns = [m for m in small.modules() if head_attention(m) is not None]
    assert attns and all(head_attention(m).heads == 4 and head_attention(m).head_size == 4 for m in attns)
    out = small(x)
    assert torch.isfinite(out[0]).all()


def _gpt2(tie: bool = False):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16, bos_token_id=0,
                        eos_token_id=0, tie_word_embeddings=tie)
    return tf.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_and_fused_attention_resize_within_heads():
    """GPT-2's Conv1D layers (weights (in, out)) and its fused c_attn split by heads."""
    model, ids = _gpt2(), torch.randint(0, 100, (2, 8))
    cliques = find_cliques(model, (ids,))
    resizable = [c for c in cliques if not c.fixed]
    assert len(resizable) == 5  # residual stream, and per layer the heads and the MLP
    heads = [c for c in resizable if c.block == 8]
    assert len(heads) == 2
    assert {(m.name, m.dim) for m in heads[0].members} == {
        ("transformer.h.0.attn.c_attn.weight", 1), ("transformer.h.0.attn.c_attn.bias", 0),
        ("transformer.h.0.attn.c_proj.weight", 0)}
    small = mk.resize(model, (ids,), 0.5, cliques=cliques)
    a = small.transformer.h[0].attn
    assert (a.num_heads, a.head_dim, a.split_size, a.c_attn.nf, a.c_attn.nx) == (4, 4, 16, 48, 16)
    assert a.scaling == pytest.approx(0.5)
    assert small(ids).logits.shape == (2, 8, 100)


def test_gpt2_morphs_samples_and_round_trips(tmp_path):
    from morphkit.coords import fan_dims_of

    model, ids = _gpt2(), torch.randint(0, 100, (2, 8))
    assert fan_dims_of(model)["transformer.h.0.mlp.c_fc.weight"] == 0  # Conv1D: fan-in is dim 0
    assert fan_dims_of(model)["transformer.wte.weight"] == -1  # an embedding's dim 1 is its output
    g = torch.Generator().manual_seed(0)
    data = [(t[:, :-1], t[:, 1:]) for t in (torch.randint(0, 100, (4, 9), generator=g) for _ in range(3))]

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x).logits.flatten(0, 1), y.flatten())

    cfg = mk.MorphConfig()
    cfg.train.steps = 3
    manifold = mk.morph(model, data, example_inputs=(ids,), config=cfg, loss_fn=loss_fn, progress=False)
    torch.testing.assert_close(manifold.sample(1.0)(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    small = manifold.sample(0.5)
    assert small.transformer.h[1].attn.head_dim == 4
    assert mk.count_params(small) < 0.5 * mk.count_params(model)
    path = os.fspath(tmp_path / "gpt2.morph.safetensors")
    manifold.save(path)
    torch.testing.assert_close(mk.Manifold.load(path, base=model).sample(0.5)(ids).logits, small(ids).logits)
    mk.save_model(small, tmp_path / "small.safetensors")
    loaded = mk.load_model(tmp_path / "small.safetensors", base=model)
    torch.testing.assert_close(loaded(ids).logits, small(ids).logits)


def test_gpt2_with_tied_embeddings_is_refused_with_the_fix():
    with pytest.raises(mk.UnsupportedModelError, match="tied tensor.*untie them"):
        find_cliques(_gpt2(tie=True), (torch.randint(0, 100, (2, 8)),))


def _tv_vit() -> tuple[nn.Module, torch.Tensor]:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    return model, torch.randn(2, 3, 32, 32)


def _stream_clique(cliques):
    return next(c for c in cliques if any(m.name.endswith("self_attention.in_proj_weight") for m in c.members))


def test_multihead_attention_resizes_with_its_stream_within_heads():
    """nn.MultiheadAttention (torchvision ViT): its embed_dim is the residual stream's clique, permuted within
    heads (a free permutation fails the check), resized keeping num_heads; the model's hidden_dim follows."""
    model, x = _tv_vit()
    cliques = find_cliques(model, x)
    c = _stream_clique(cliques)
    assert not c.fixed and c.size == 16 and c.block == 8
    assert {"class_token", "encoder.pos_embedding", "encoder.layers.encoder_layer_0.self_attention.out_proj.weight"
            } <= {m.name for m in c.members}
    free = [dataclasses.replace(k, block=1) if k is c else k for k in cliques]
    assert c.id in validate_cliques(model, x, free, resize=False)
    half = mk.resize(model, x, 0.5)
    attn = half.encoder.layers[0].self_attention
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, half.hidden_dim) == (2, 4, 8, 8)
    assert attn.in_proj_weight.shape == (24, 8) and attn.out_proj.weight.shape == (8, 8)
    assert half(x).shape == (2, 10)
    smoothed, _ = importlib.import_module("morphkit.smooth").smooth(model, x)
    ref, out = model.double()(x.double()), smoothed.double()(x.double())
    assert (ref - out).abs().max() <= 1e-9 * ref.abs().max()


def test_multihead_attention_model_morphs_samples_and_round_trips(tmp_path):
    model, x = _tv_vit()
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    cfg = mk.MorphConfig(train=mk.TrainConfig(steps=2), inr=mk.INRConfig(hidden=16, layers=2))
    manifold = mk.morph(model, data, example_inputs=x, config=cfg, progress=False)
    small = manifold.sample(0.5, samples=2)
    assert small.encoder.layers[1].self_attention.embed_dim == 8 and small(x).shape == (2, 10)
    path = tmp_path / "vit.safetensors"
    manifold.save(path)
    again = mk.Manifold.load(path, base=model).sample(0.5, samples=2)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), again.state_dict().values()))


def test_multihead_attention_with_separate_key_dims_is_fixed_with_the_reason(caplog):
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.mem = nn.Linear(6, 8), nn.Linear(6, 4)
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, m = self.inp(x), self.mem(x)
            return self.out(self.attn(q, m, m, need_weights=False)[0])

    cliques = find_cliques(Cross().eval(), torch.randn(2, 5, 6))
    c = next(k for k in cliques if any((m.name, m.dim) == ("mem.weight", 0) for m in k.members))
    assert c.fixed and "separate kdim / vdim" in c.reason
    assert all(k.fixed for k in cliques)  # nothing touching the attention resizes


class BiasedWindowAttention(nn.Module):
    """timm Swin-style attention: fused qkv, a learned bias per head and relative position."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn(tokens * tokens, heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table.view(n, n, -1).permute(2, 0, 1)  # (heads, n, n)
        att = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, -1))


def test_a_per_head_parameter_stays_with_its_heads():
    """A tensor with one value per head (Swin's relative position bias) is unchanged by a within-head
    permutation and by a resize that keeps the heads: the attention's clique resizes."""
    model = nn.Sequential(nn.Linear(6, 16), BiasedWindowAttention(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 6)
    c = next(k for k in find_cliques(model, x) if any((m.name, m.dim) == ("1.qkv.weight", 0) for m in k.members))
    assert not c.fixed and c.block == 4
    assert "1.relative_position_bias_table" not in {m.name for m in c.members}
    half = mk.resize(model, x, 0.5)
    assert half[1].qkv.out_features == 24 and half[1].relative_position_bias_table.shape == (25, 4)
    assert half(x).shape == (2, 5, 3)
