import json
import os

import pytest
import torch
from _files import rewrite

import morphkit as mk
from morphkit._io import read_tensors, write_tensors
from morphkit.errors import CheckpointError


def _out(m, x):
    o = m(x)
    return o[0] if isinstance(o, tuple) else o


@pytest.mark.parametrize("spec", ["lenet5", "resnet20", "vae_mnist", "mlp"])
def test_registry_round_trip_identical_outputs(tmp_path, spec):
    m = mk.build_model(spec).eval()
    if spec == "resnet20":  # non-trivial BN statistics
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    p = tmp_path / "m.safetensors"
    mk.save_model(m, p, note="x")
    back = mk.load_model(p)
    x = mk.example_inputs_for(m, 2)
    with torch.no_grad():
        assert torch.equal(_out(m, x), _out(back, x))
    assert not back.training


@pytest.mark.parametrize("spec", ["timm:resnet18", "timm:mobilenetv3_small_100", "timm:vit_tiny_patch16_224"])
def test_timm_round_trip_identical_outputs(tmp_path, spec):
    m = mk.build_model(spec).eval()
    p = tmp_path / "m.safetensors"
    mk.save_model(m, p)
    back = mk.load_model(p)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))


def test_metadata_fields(tmp_path):
    p = tmp_path / "m.safetensors"
    mk.save_model(mk.build_model("lenet5"), p, accuracy=0.99)
    meta = mk.model_info(p)
    assert meta["format"] == "morphkit.model/1"
    assert meta["arch"]["name"] == "lenet5"
    assert meta["shapes"]["conv1.weight"] == [6, 1, 5, 5]
    assert meta["user"] == {"accuracy": 0.99}
    assert meta["params"] == 61706


def test_custom_model_needs_base(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

    p = tmp_path / "c.safetensors"
    net = Net()
    mk.save_model(net, p)
    with pytest.raises(CheckpointError, match="base="):
        mk.load_model(p)
    back = mk.load_model(p, base=Net())
    assert torch.equal(back.lin.weight, net.lin.weight)


class _TwoLayer(torch.nn.Module):  # a user's own class: morphkit records no architecture or input shape for it
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))


def test_resized_custom_model_loads_back_with_its_base(tmp_path):
    x = torch.randn(2, 3, 10, 10)
    small = mk.resize(_TwoLayer(), x, 0.5)
    p = tmp_path / "small.safetensors"
    mk.save_model(small, p)
    assert mk.model_info(p)["inputs"] == {"shapes": [[2, 3, 10, 10]], "dtypes": ["float32"]}
    back = mk.load_model(p, base=_TwoLayer())  # resized with the recorded input shapes
    assert back.conv.out_channels == 4
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    tensors, meta = read_tensors(p)
    for bad in ({"shapes": [[2, 3, -1, 10]], "dtypes": ["float32"]}, {"shapes": [[2, 3]], "dtypes": ["nope"]},
                [1, 2], {"shapes": [[1 << 20, 1 << 16]], "dtypes": ["float32"]}):
        q = tmp_path / "bad.safetensors"
        q.write_bytes(rewrite(tensors, dict(meta, inputs=bad)))
        with pytest.raises(CheckpointError, match="'inputs' is malformed"):
            mk.load_model(q, base=_TwoLayer())


def test_resized_model_file_records_its_cliques_and_loads_without_tracing(tmp_path, monkeypatch):
    """load_model resizes the base with the file's cliques: no find_cliques (resnest14d traces in 10 s)."""
    import morphkit.graph as graph

    x = torch.randn(2, 3, 10, 10)
    small = mk.resize(_TwoLayer(), x, 0.5)
    p = tmp_path / "small.safetensors"
    mk.save_model(small, p)
    recorded = mk.model_info(p)["cliques"]
    assert recorded and all(small.morphkit_widths[c["id"]] != c["size"] for c in recorded)

    tensors, meta = read_tensors(p)
    old = tmp_path / "old.safetensors"  # a file from before cliques were recorded: traced instead
    old.write_bytes(rewrite(tensors, {k: v for k, v in meta.items() if k != "cliques"}))
    with torch.no_grad():
        assert torch.equal(mk.load_model(old, base=_TwoLayer())(x), small(x))

    def no_trace(*args, **kwargs):
        raise AssertionError("load_model traced the model")

    monkeypatch.setattr(graph, "find_cliques", no_trace)
    back = mk.load_model(p, base=_TwoLayer())
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    member = dict(recorded[0]["members"][0], name="nope.weight")
    lying = [dict(recorded[0], members=[member])]
    for bad, match in ((lying, "recorded cliques do not fit"), ("x", "'cliques'"),
                       ([dict(recorded[0], id=999)], "'cliques'"), ([{"id": -1}], "'cliques'")):
        q = tmp_path / "bad.safetensors"
        q.write_bytes(rewrite(tensors, dict(meta, cliques=bad)))
        with pytest.raises(CheckpointError, match=match):
            mk.load_model(q, base=_TwoLayer())


def test_missing_empty_truncated_corrupt(tmp_path):
    p = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="does not exist"):
        mk.load_model(p)
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        mk.load_model(p)
    mk.save_model(mk.build_model("lenet5"), p)
    data = p.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mk.load_model(tmp_path / "t.safetensors")
    flipped = bytearray(data)
    flipped[-100] ^= 0x40  # a bit in the tensor data
    (tmp_path / "f.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        mk.load_model(tmp_path / "f.safetensors")


def test_other_model_and_newer_format(tmp_path):
    a = tmp_path / "a.safetensors"
    mk.save_model(mk.build_model("lenet5"), a)
    with pytest.raises(CheckpointError, match="another model"):
        mk.load_model(a, base=mk.build_model("mlp"))
    b = tmp_path / "b.safetensors"
    write_tensors({"x": torch.ones(1)}, {"format": "morphkit.model/99"}, b)
    with pytest.raises(CheckpointError, match="newer"):
        mk.load_model(b)
    c = tmp_path / "c.safetensors"
    write_tensors({"x": torch.ones(1)}, {"format": "morphkit.manifold/1"}, c)
    with pytest.raises(CheckpointError, match="expected a 'morphkit.model' file"):
        mk.load_model(c)


def test_foreign_safetensors_and_bad_json(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(p))
    with pytest.raises(CheckpointError, match="not written by morphkit"):
        mk.load_model(p)
    save_file({"w": torch.ones(2)}, str(p), metadata={"morphkit": "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        mk.load_model(p)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "m.safetensors"
    write_tensors({"x": torch.ones(2)}, {"format": "demo/1"}, p)
    before = p.read_bytes()
    with pytest.raises(CheckpointError, match="JSON"):
        write_tensors({"x": torch.zeros(2)}, {"format": "demo/1", "bad": object()}, p)
    assert p.read_bytes() == before
    assert [f for f in os.listdir(tmp_path)] == ["m.safetensors"]
    with pytest.raises(CheckpointError, match="does not exist"):
        write_tensors({"x": torch.ones(2)}, {"format": "demo/1"}, tmp_path / "no" / "dir.safetensors")
    tensors, meta = read_tensors(p)
    assert json.dumps(meta) and torch.equal(tensors["x"], torch.ones(2))


def test_input_record_is_always_readable_back():
    from morphkit.resize import MAX_INPUT_RECORD, check_input_spec, input_spec

    big = torch.empty((512, 3, 224, 224), device="meta")  # a large batch over the cap (no memory on "meta")
    assert big.numel() > MAX_INPUT_RECORD
    spec = input_spec(big)
    assert spec["shapes"] == [[1, 3, 224, 224]]  # recorded with batch 1, so load_model can read it back
    check_input_spec(spec)
    assert input_spec(torch.empty((1, 1 << 14, 1 << 13), device="meta")) is None  # too large even at batch 1
    assert input_spec(({"x": 1},)) is None
