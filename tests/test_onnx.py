"""ONNX export: resized models run in onnxruntime with PyTorch's outputs; metadata; atomic writes."""

import sys

import pytest
import torch

import morphkit as mk

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("spec,shape", [
    ("lenet5", (1, 28, 28)),
    ("resnet20", (3, 32, 32)),
    ("timm:resnet18", (3, 64, 64)),
    (VIT, (3, 32, 32)),
])
def test_width_half_runs_in_onnxruntime_like_pytorch(tmp_path, spec, shape):
    torch.manual_seed(0)
    base = mk.build_model(spec)
    small = mk.resize(base, torch.randn(1, *shape), 0.5).eval()
    path = tmp_path / "small.onnx"
    mk.save_onnx(small, path, source="unit-test.morph.safetensors", note="w50")
    x = torch.randn(3, *shape)  # another batch size than traced: the batch axis is dynamic
    with torch.no_grad():
        ref = small(x).numpy()
    got = _run(path, x)
    assert got.shape == ref.shape
    assert abs(got - ref).max() <= 1e-4 * abs(ref).max()
    info = mk.onnx_info(path)
    meta = info["metadata"]
    assert meta["format"] == "morphkit.onnx/1" and meta["version"] == mk.__version__
    assert meta["widths"] == {str(k): v for k, v in small.morphkit_widths.items()}
    assert meta["source"] == "unit-test.morph.safetensors" and meta["user"] == {"note": "w50"}
    assert meta["params"] == mk.count_params(small) < mk.count_params(base)
    assert info["inputs"][0]["shape"][0] == "batch"
    assert [p.key for p in onnx.load(str(path)).metadata_props if p.key == "morphkit.widths"]


def test_write_is_atomic_and_errors_are_clear(tmp_path):
    net = mk.resize(mk.build_model("lenet5"), torch.zeros(1, 1, 28, 28), 0.5)
    with pytest.raises(mk.CheckpointError, match="does not exist"):
        mk.save_onnx(net, tmp_path / "missing" / "x.onnx")
    target = tmp_path / "x.onnx"
    target.write_bytes(b"old")
    with pytest.raises(mk.ConfigError, match="example_inputs"):
        mk.save_onnx(net, target, example_inputs=torch.zeros(1, 3, 5, 5))
    assert target.read_bytes() == b"old"  # a failed export leaves the old file
    mk.save_onnx(net, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]  # no temp file left behind
    with pytest.raises(mk.ConfigError, match="JSON"):
        mk.save_onnx(net, target, bad=object())
    with pytest.raises(mk.CheckpointError, match="not a readable ONNX"):
        (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
        mk.onnx_info(tmp_path / "junk.onnx")


def test_own_module_needs_example_inputs(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(mk.ConfigError, match="example_inputs"):
        mk.save_onnx(net, tmp_path / "x.onnx")
    mk.save_onnx(net, tmp_path / "x.onnx", example_inputs=torch.zeros(2, 4))
    assert mk.onnx_info(tmp_path / "x.onnx")["metadata"]["widths"] is None


def test_missing_onnx_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(mk.MissingDependencyError, match=r"morphkit\[onnx\]"):
        mk.save_onnx(mk.build_model("lenet5"), tmp_path / "x.onnx")


@pytest.mark.slow
def test_vit_tiny_224_at_half_width(tmp_path):
    base = mk.build_model("timm:vit_tiny_patch16_224")
    small = mk.resize(base, mk.example_inputs_for(base), 0.5).eval()
    mk.save_onnx(small, tmp_path / "vit.onnx")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = small(x).numpy()
    assert abs(_run(tmp_path / "vit.onnx", x) - ref).max() <= 1e-4 * abs(ref).max()
