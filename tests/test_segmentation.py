"""Segmentation, the paper's third task (issue 18): the MNIST digit-canvas data, per-pixel labels through the
loader, mean IoU in evaluate/compare, and a U-Net with concatenation skips morphed and sampled."""

import pytest
import torch
from torch import nn

import morphkit as mk
from morphkit.data import ImageData, Loader, load_data, make_loaders
from morphkit.errors import DataError
from morphkit.fit import logits_of, mean_iou, task_for
from morphkit.segdata import SEG_CLASSES, STROKE, digit_canvases

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def seg():
    return load_data("mnistseg:embedded")


def test_canvases_label_every_stroke_with_its_digit(seg):
    mnist = load_data("embedded")
    assert len(seg.train) == len(mnist.train) // 2 and len(seg.test) == len(mnist.test) // 2
    assert seg.classes == list(SEG_CLASSES) and seg.name == "mnistseg"
    x, y = seg.train.images, seg.train.labels  # (N, 1, 48, 48), (N, 48, 48)
    assert x.shape[1:] == (1, 48, 48) and y.shape[1:] == (48, 48)
    assert bool((x[:, 0][y > 0] >= STROKE).all())  # a digit class only on a stroke
    assert bool((y[x[:, 0] >= STROKE] > 0).all())  # every stroke pixel labelled with a digit
    present = {int(c) for c in y.unique()}
    assert present == set(range(11))
    # two digits per canvas: at most two digit classes on any canvas, and the classes come from the digits used
    per = [(set(int(c) for c in yi.unique()) - {0}) for yi in y[:200]]
    assert all(1 <= len(p) <= 2 for p in per)
    again = load_data("mnistseg:embedded")
    assert torch.equal(again.train.images, x) and torch.equal(again.test.labels, seg.test.labels)  # deterministic


def test_canvas_arguments_and_specs_are_checked():
    mnist = load_data("embedded")
    with pytest.raises(DataError, match="canvas >= 28"):
        digit_canvases(mnist.test, canvas=20)
    with pytest.raises(DataError, match="digits >= 1"):
        digit_canvases(mnist.test, digits=0)
    with pytest.raises(DataError, match="names no path"):
        load_data("mnistseg:")
    with pytest.raises(DataError, match="not a directory"):
        load_data("mnistseg:/nonexistent/dir")
    with pytest.raises(mk.ConfigError, match=r"per pixel, \(2, 4, 4\)"):
        ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, 3, 3, dtype=torch.long), ["a"],
                  (0.5,), (0.2,))


def test_augmentation_crops_and_flips_labels_with_the_pixels(seg):
    loader = Loader(seg.train, batch_size=64, shuffle=True, seed=3, augment=True, pad=4, flip=True,
                    normalize=False)
    x, y = next(iter(loader))
    plain_x, _ = next(iter(Loader(seg.train, batch_size=64, shuffle=True, seed=3, normalize=False)))
    assert not torch.equal(x, plain_x)  # augmented
    stroke = (x[:, 0] * 255).round() >= STROKE
    assert bool((y[stroke] > 0).all()) and bool((y[~stroke] == 0).all())
    train, _ = make_loaders(seg, batch_size=32)
    assert not train.augment  # off by default for digit canvases, as for MNIST


def test_mean_iou_and_segmentation_evaluate():
    assert mean_iou(torch.tensor([[3, 1], [0, 2]])) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert mean_iou(torch.tensor([[5, 0, 0], [0, 0, 0], [0, 0, 5]])) == 1.0  # an absent class is left out

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return {"out": self.logits + 0 * self.p}  # torchvision's segmentation output

    y = torch.tensor([[[0, 0], [1, 1]]])  # (1, 2, 2)
    logits = torch.tensor([[[[5.0, 5.0], [5.0, -5.0]], [[-5.0, -5.0], [-5.0, 5.0]]]])  # (1, 2, 2, 2): 0 0 / 0 1
    m = mk.evaluate(Fixed(logits), [(torch.zeros(1, 1, 2, 2), y)])
    assert set(m) == {"miou", "accuracy", "loss", "n"} and m["n"] == 1.0
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # class 0: 2 of 3, class 1: 1 of 2
    assert torch.equal(logits_of({"out": logits}), logits)
    with pytest.raises(mk.UnsupportedModelError, match="a dict with keys 'logits'"):
        logits_of({"logits": logits})
    assert task_for(mk.build_model("lenet5"), [(torch.zeros(1, 1, 28, 28), torch.zeros(1).long())]) == "classification"
    assert task_for(mk.build_model("unet"), iter([])) == "segmentation"  # the registry says so


def test_unet_morphs_samples_and_compares_by_miou(seg, tmp_path):
    """A short morph of the registry U-Net: sample(0.5) as small as resize(0.5), compare reports mIoU."""
    train, test = make_loaders(seg.subset(train=256, test=64), batch_size=32, seed=0, test_batch_size=64)
    base, _ = mk.fit(mk.build_model("unet"), train, epochs=1, seed=0, optimizer="adam", lr=2e-3, progress=False)
    x = torch.zeros(1, 1, 48, 48)
    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                         train=mk.TrainConfig(steps=3, eval_compressions=()), samples=2, calib_samples=32)
    manifold = mk.morph(base, train, example_inputs=x, config=cfg, progress=False)
    half = manifold.sample(0.5, samples=2)
    resized = mk.resize(base, x, 0.5)
    n = sum(p.numel() for p in half.parameters())
    assert n == sum(p.numel() for p in resized.parameters()) < 0.3 * sum(p.numel() for p in base.parameters())
    assert half(torch.zeros(2, 1, 48, 48)).shape == (2, 11, 48, 48)
    rows = mk.compare(manifold, test, ("neumeta", "l1"), (0.0, 0.5), base=base, samples=2, progress=False)
    assert {r["metric"] for r in rows} == {"miou"}
    assert all(0.0 <= r["value"] <= 1.0 and "accuracy" in r for r in rows)
    paths = mk.write_report(rows, tmp_path, title="seg")
    assert "miou (%)" in paths["md"].read_text()
    p = tmp_path / "half.safetensors"
    mk.save_model(half, p)
    back = mk.load_model(p)
    with torch.no_grad():
        z = torch.randn(2, 1, 48, 48)
        assert torch.equal(back(z), half.eval()(z))


def test_torchvision_lraspp_morphs_and_samples(seg):
    """torchvision's LR-ASPP MobileNetV3-Large (dict output) through morph, sample and compare by mIoU."""
    tv = pytest.importorskip("torchvision.models.segmentation")

    class Gray(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tv.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11)

        def forward(self, x):
            return self.net(x.expand(-1, 3, -1, -1))

    train, test = make_loaders(seg.subset(train=64, test=32), batch_size=16, seed=0, test_batch_size=32)
    base = Gray().eval()
    x = torch.zeros(1, 1, 48, 48)
    cfg = mk.MorphConfig(inr=mk.INRConfig(hidden=16, layers=2, n_freqs=4),
                         train=mk.TrainConfig(steps=2, eval_compressions=()), samples=2, calib_samples=16)
    manifold = mk.morph(base, train, example_inputs=x, config=cfg, progress=False)
    half = manifold.sample(0.5, samples=2)
    assert sum(p.numel() for p in half.parameters()) == sum(p.numel() for p in mk.resize(base, x, 0.5).parameters())
    assert half(torch.zeros(2, 1, 48, 48))["out"].shape == (2, 11, 48, 48)
    rows = mk.compare(manifold, test, ("neumeta", "l1"), (0.5,), base=base, samples=2, progress=False)
    assert {r["metric"] for r in rows} == {"miou"}
