"""Cliques that feed a torch.cat morph (issue 18): U-Net skips, a dense block, Inception branches.

Each concatenated dim is one row dim over its cliques' composite channel axis;
at any width map it must keep exactly the positions resize() keeps, so that
sampled networks run and are as small as resize(model, 0.5).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphkit as mk
from morphkit._io import read_tensors, write_tensors
from morphkit.clique import Clique, Member, width_map
from morphkit.coords import CoordBuilder, _dims_of, dim_spec, plan_layouts, resize_static
from morphkit.errors import CheckpointError
from morphkit.graph import keep_positions

torch.set_num_threads(1)


class TinyUNet(nn.Module):
    """Two-level U-Net: the decoder convs read ``cat([upsampled, skip])``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(3, c, 3, padding=1)
        self.enc2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec2 = nn.Conv2d(3 * c, 2 * c, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = F.relu(self.enc1(x))  # (B, c, H, W)
        e2 = F.relu(self.enc2(F.max_pool2d(e1, 2)))  # (B, 2c, H/2, W/2)
        m = F.relu(self.mid(F.max_pool2d(e2, 2)))  # (B, 2c, H/4, W/4)
        d2 = F.relu(self.dec2(torch.cat([self.up2(m), e2], 1)))  # (B, 2c, H/2, W/2)
        d1 = F.relu(self.dec1(torch.cat([self.up1(d2), e1], 1)))  # (B, c, H, W)
        return self.out(d1)  # (B, 2, H, W)


class DenseBlockNet(nn.Module):
    """A DenseNet-style block: each layer concatenates its input with its output."""

    def __init__(self, c0: int = 8, growth: int = 4, n: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        self.norms, self.layers = nn.ModuleList(), nn.ModuleList()
        c = c0
        for _ in range(n):
            self.norms.append(nn.BatchNorm2d(c))
            self.layers.append(nn.Conv2d(c, growth, 3, padding=1))
            c += growth
        self.trans = nn.Conv2d(c, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for bn, conv in zip(self.norms, self.layers):
            x = torch.cat([x, conv(F.relu(bn(x)))], 1)  # (B, c + growth, H, W)
        x = F.relu(self.trans(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionNet(nn.Module):
    """Four parallel branches concatenated, a BatchNorm over the concatenation, a flattening head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3a, self.b3b = nn.Conv2d(8, 6, 1), nn.Conv2d(6, 8, 3, padding=1)
        self.b5a, self.b5b = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 4, 5, padding=2)
        self.bp = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(20)
        self.head = nn.Conv2d(20, 12, 1)
        self.fc = nn.Linear(12 * 4, 5)
        with torch.no_grad():  # a trained-looking BatchNorm: its weight is predicted, not a constant
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)
            self.bn.running_mean.uniform_(-0.1, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b3b(F.relu(self.b3a(x))), self.b5b(F.relu(self.b5a(x))),
                       self.bp(F.max_pool2d(x, 3, 1, 1))], 1)  # (B, 20, H, W)
        y = F.relu(self.head(F.relu(self.bn(y))))
        return self.fc(F.adaptive_avg_pool2d(y, 2).flatten(1))


NETS = {"unet": TinyUNet, "dense": DenseBlockNet, "inception": InceptionNet}
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
CFG = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                     train=mk.TrainConfig(steps=3, eval_compressions=(0.0,)), samples=2)


def _data(net: nn.Module) -> list:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g)
    if isinstance(net, TinyUNet):
        return [(x, torch.randn(4, 2, 16, 16, generator=g))]
    return [(x, torch.randint(0, 5, (4,), generator=g))]


def _loss(net: nn.Module):
    if isinstance(net, TinyUNet):
        return lambda model, batch: F.mse_loss(model(batch[0]), batch[1])
    return None


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _concat_cliques(cliques: list) -> list:
    return [c for c in cliques if any(m.index is not None and min(m.index, default=0) < 0 for m in c.members)]


@pytest.fixture(scope="module", params=sorted(NETS))
def morphed(request):
    torch.manual_seed(0)
    net = NETS[request.param]().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m = mk.morph(net, _data(net), example_inputs=X, config=CFG, loss_fn=_loss(net), progress=False)
    return net, before, m


def test_concat_cliques_morph_and_sample_half_is_as_small_as_resize(morphed):
    net, before, m = morphed
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the caller's model untouched
    concat = _concat_cliques(m.cliques)
    assert concat and not any(c.fixed for c in concat if "concatenated" in c.reason)
    assert any(not c.fixed for c in concat)
    assert any(r.parts for lt in m.layouts for r in lt.rows)  # some concatenated dim is predicted
    half, small = m.sample(0.5), mk.resize(net, X, 0.5)
    with torch.no_grad():
        assert half(X).shape == net(X).shape
    n_half, n_small = _count(half), _count(small)
    assert abs(n_half - n_small) <= 0.1 * n_small, (n_half, n_small)
    assert n_half < (0.8 if isinstance(net, DenseBlockNet) else 0.5) * _count(net)
    if isinstance(net, DenseBlockNet):
        # torch-pruning groups the stem and the first two layers' outputs into one clique that each conv
        # sees only part of (fixed by find_cliques, for resize too); the last layer's growth channels
        # are concatenated with that fixed clique and shrink
        assert half.layers[2].out_channels == 2 and half.trans.in_channels == 18
    assert {k: v.shape for k, v in half.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    uneven = {c.id: max(1, c.size // 3) if k % 2 else c.size for k, c in enumerate(concat) if not c.fixed}
    with torch.no_grad():  # parts of one concatenated dim at different widths
        assert m.sample(uneven, samples=1)(X).shape == net(X).shape


@pytest.mark.parametrize("name", sorted(NETS))
def test_concat_dims_keep_the_positions_resize_keeps_at_any_width_map(name):
    net = NETS[name]().eval()
    cliques = mk.find_cliques(net, X)
    state = net.state_dict()
    layouts, static = plan_layouts(cliques, state, {n for n, _ in net.named_parameters()})
    b = CoordBuilder(layouts, cliques)
    dims = _dims_of(cliques)
    g = torch.Generator().manual_seed(3)
    maps = [width_map(cliques, w) for w in (1.0, 0.75, 0.5, 0.2)]
    maps.append({c.id: c.size if c.fixed else int(torch.randint(1, c.size + 1, (), generator=g)) for c in cliques})
    for counts in maps:
        small = mk.resize(net, X, counts).state_dict()
        table = b.table(counts)
        for k, lt in enumerate(layouts):
            ref = resize_static(state[lt.name], lt.name, dims, counts)
            assert torch.equal(ref, small[lt.name]), lt.name  # the same positions, in the same order
            assert torch.equal(b.assemble(k, table, b.to_rows(k, table, ref)), ref), lt.name
            assert table.cells[k][0] * table.cells[k][1] == table.segments[k][1] - table.segments[k][0]
        for n in static:
            assert torch.equal(resize_static(state[n], n, dims, counts), small[n]), n
        assert (table.coords >= 0).all() and (table.coords <= 1).all()


def test_concatenated_coordinates_keep_part_boundaries_and_match_one_clique_at_uniform_widths():
    a = Clique(0, 4, [Member("w", 1, (0, 1, 2, 3, -1, -1))])
    b = Clique(1, 2, [Member("w", 1, (-1, -1, -1, -1, 0, 1))])
    spec = dim_spec([(a, a.members[0]), (b, b.members[0])], 1, 6)
    assert spec.parts == (0, 1) and spec.size == 6 and spec.index == (0, 1, 2, 3, 4, 5) and spec.resizable
    from morphkit.coords import TensorLayout

    lt = TensorLayout("w", (3, 6), (spec,), 0, 0, 1.0)
    builder = CoordBuilder([lt], [a, b])
    full = builder.table({0: 4, 1: 2}).coords[:, 2]
    assert torch.allclose(full, (torch.arange(6) + 0.5) / 6)
    half = builder.table({0: 2, 1: 1}).coords[:, 2]  # uniform 0.5: one clique of 3 channels
    assert torch.allclose(half, (torch.arange(3) + 0.5) / 3)
    mixed = builder.table({0: 4, 1: 1}).coords[:, 2]  # only b shrinks: a's coordinates stay where they were
    assert torch.allclose(mixed, torch.tensor([0.5, 1.5, 2.5, 3.5, 5.0]) / 6)
    assert builder.table({0: 4, 1: 1}).fan_in == [6 / 5]


def test_interleaved_parts_and_uneven_or_uncovered_dims():
    # interleaved positions (not block-structured) are still one composite axis, in channel-major rows
    a = Clique(0, 2, [Member("w", 0, (0, -1, 1, -1))])
    b = Clique(1, 2, [Member("w", 0, (-1, 0, -1, 1))])
    spec = dim_spec([(a, a.members[0]), (b, b.members[0])], 0, 4)
    assert spec.parts == (0, 1) and spec.index == (0, 2, 1, 3)
    from morphkit.coords import TensorLayout

    lt = TensorLayout("w", (4, 3), (spec,), 0, 0, 1.0)
    builder = CoordBuilder([lt], [a, b])
    w = torch.arange(12.0).view(4, 3)
    for counts in ({0: 2, 1: 2}, {0: 1, 1: 2}, {0: 2, 1: 1}):
        keep = keep_positions([a, b], counts, {"w": (4, 3)}).get(("w", 0), torch.arange(4))
        ref = w[torch.as_tensor(keep)]
        assert torch.equal(resize_static(w, "w", _dims_of([a, b]), counts), ref)
        table = builder.table(counts)
        assert torch.equal(builder.assemble(0, table, builder.to_rows(0, table, ref)), ref)
    # a position no clique owns, or two cliques claim, has no composite axis: the tensor stays static
    c = Clique(2, 1, [Member("w", 0, (-1, -1, 0, -1))])
    assert dim_spec([(a, a.members[0]), (c, c.members[0])], 0, 4) is None
    d = Clique(3, 3, [Member("w", 0, (0, 1, 2, -1))])
    assert dim_spec([(a, a.members[0]), (d, d.members[0]), (b, b.members[0])], 0, 4) is None
    # parts with different positions per channel (a flattened map beside a plain one): uneven
    e = Clique(4, 1, [Member("v", 0, (0, 0, -1))])
    f = Clique(5, 1, [Member("v", 0, (-1, -1, 0))])
    assert dim_spec([(e, e.members[0]), (f, f.members[0])], 0, 3) is None


@pytest.mark.parametrize("name", sorted(NETS))
def test_full_width_of_a_just_initialised_manifold_is_the_base(name):
    torch.manual_seed(0)
    net = NETS[name]().eval()
    cfg = mk.MorphConfig(inr=CFG.inr, train=mk.TrainConfig(steps=1, lr=1e-12, eval_compressions=(0.0,)), samples=1)
    m = mk.morph(net, _data(net), example_inputs=X, config=cfg, loss_fn=_loss(net), progress=False)
    with torch.no_grad():
        ref = net(X)
        assert torch.allclose(m.sample(1.0)(X), ref, atol=1e-5)
        full = m.width_map(1.0)
        rebuilt = copy.deepcopy(m.template(full))
        rebuilt.load_state_dict({**m.static_tensors(full), **m.predict(full, samples=1)})
        assert torch.allclose(rebuilt(X), ref, atol=1e-4)  # through the coordinates and the INR
        base = m.base.state_dict()
        for name, t in m.predict(full, samples=1).items():
            assert torch.allclose(t, base[name], atol=1e-6), name


@pytest.mark.parametrize("name", ["unet", "inception"])
def test_manifold_and_sampled_model_save_and_load(name, tmp_path):
    torch.manual_seed(0)
    net = NETS[name]().eval()
    cfg = mk.MorphConfig(inr=CFG.inr, train=mk.TrainConfig(steps=2, eval_compressions=(0.0,)), samples=2)
    m = mk.morph(net, _data(net), example_inputs=X, config=cfg, loss_fn=_loss(net), progress=False)
    p = tmp_path / "m.morph.safetensors"
    m.save(p)
    back = mk.Manifold.load(p, base=NETS[name]())
    assert [lt.rows for lt in back.layouts] == [lt.rows for lt in m.layouts]
    # the same calibration batches (the file stores its calibration inputs in float16)
    live, again = m.sample(0.5, calib_data=_data(net)), back.sample(0.5, calib_data=_data(net))
    for k, v in live.state_dict().items():
        assert torch.allclose(v, again.state_dict()[k], rtol=1e-5, atol=1e-7), k
    mk.save_model(again, tmp_path / "half.safetensors")
    loaded = mk.load_model(tmp_path / "half.safetensors", base=NETS[name]())
    with torch.no_grad():
        assert torch.equal(loaded(X), again(X))
    # a file whose concatenated dim names its parts in another order is refused
    tensors, meta = read_tensors(p)
    row = next(r for lt in meta["layouts"] for r in lt["rows"] if "parts" in r)
    row["parts"] = row["parts"][::-1]
    write_tensors(tensors, meta, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="parts"):
        mk.Manifold.load(tmp_path / "bad.safetensors", base=NETS[name]())
