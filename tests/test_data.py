"""Tests for morphkit.data: idx / ImageFolder / tarball readers, the cache, loaders, errors."""

from __future__ import annotations

import gzip
import io
import logging
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from morphkit import data as D
from morphkit.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
CIFAR_TAR = SHARED / "cifar10-jpeg.tar.gz"

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found at {MNIST_DIR} (../shared/data/mnist from the repo root)",
)
needs_cifar = pytest.mark.skipif(
    not CIFAR_TAR.is_file(),
    reason=f"CIFAR-10 tarball not found at {CIFAR_TAR} (../shared/data from the repo root)",
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep every test's cache out of ~/.cache."""
    monkeypatch.setenv("MORPHKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def embedded() -> D.DataSplits:
    return D.load_data("embedded")


@pytest.fixture(scope="module")
def real_mnist() -> D.DataSplits:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST files not found at {MNIST_DIR}")
    return D.load_data(f"mnist:{MNIST_DIR}")


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = False, size: int = 28) -> dict:
    """Write a tiny, valid set of the four MNIST idx files into ``root``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[prefix] = (images, labels)
        for name, arr, magic in (("images-idx3-ubyte", images, 2051), ("labels-idx1-ubyte", labels, 2049)):
            raw = idx_bytes(arr, magic)
            path = root / f"{prefix}-{name}"
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
            else:
                path.write_bytes(raw)
    return arrays


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (8, 8), fmt: str = "JPEG",
                mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(buf, format=fmt)
    return buf.getvalue()


def build_tar(path: Path, classes, per_train: int = 2, per_test: int = 1, prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for split, per in (("train", per_train), ("test", per_test)):
            for c, cls in enumerate(classes):
                for i in range(per):
                    raw = image_bytes((c * 20, i * 50, 100))
                    info = tarfile.TarInfo(f"{prefix}{split}/{cls}/{i:04d}.jpg")
                    info.size = len(raw)
                    tf.addfile(info, io.BytesIO(raw))
        junk = b"not an image"
        info = tarfile.TarInfo(f"{prefix}README.txt")
        info.size = len(junk)
        tf.addfile(info, io.BytesIO(junk))
    return path


def build_folder(root: Path, classes, per_train: int = 3, per_test: int = 2, test_name: str = "test",
                 size=(6, 5), mode: str = "RGB") -> Path:
    for split, per in (("train", per_train), (test_name, per_test)):
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                (d / f"{i:03d}.png").write_bytes(image_bytes((c * 40, i * 30, 7), size, "PNG", mode))
    return root


# --------------------------------------------------------------------------- MNIST


@needs_mnist
def test_real_mnist_counts_shapes_labels(real_mnist):
    assert real_mnist.name == "mnist"
    tr, te = real_mnist.train, real_mnist.test
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    assert tr.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert te.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert tr.classes == [str(d) for d in range(10)]
    assert tr.mean == D.MNIST_MEAN and tr.std == D.MNIST_STD
    assert abs(tr.images.float().mean().item() / 255 - 0.1307) < 1e-3


def test_embedded_subset_is_balanced(embedded):
    assert embedded.name == "mnist" and embedded.source == "embedded"
    assert embedded.train.images.shape == (6000, 1, 28, 28)
    assert embedded.test.images.shape == (1000, 1, 28, 28)
    assert embedded.train.labels.bincount().tolist() == [600] * 10
    assert embedded.test.labels.bincount().tolist() == [100] * 10
    assert embedded.train.images.dtype == torch.uint8 and embedded.train.labels.dtype == torch.int64
    assert D.load_data("mnist:embedded").train.labels.equal(embedded.train.labels)


@needs_mnist
def test_embedded_subset_matches_originals(embedded, real_mnist):
    import importlib.resources

    res = importlib.resources.files("morphkit").joinpath(D.EMBEDDED_RESOURCE)
    with importlib.resources.as_file(res) as path, np.load(path) as npz:
        index = {s: torch.from_numpy(npz[f"{s}_index"].astype(np.int64)) for s in ("train", "test")}
    for split in ("train", "test"):
        mine, full = getattr(embedded, split), getattr(real_mnist, split)
        assert torch.equal(mine.labels, full.labels[index[split]])
        assert torch.equal(mine.images, full.images[index[split]])
        # deterministic choice: the first 600 (100) of each digit, in file order
        per = 600 if split == "train" else 100
        expected = torch.cat([torch.nonzero(full.labels == d).flatten()[:per] for d in range(10)]).sort().values
        assert torch.equal(index[split], expected)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_plain_and_gz(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    splits = D.load_data(f"mnist:{tmp_path}")
    assert splits.train.images.shape == (20, 1, 28, 28) and splits.test.images.shape == (10, 1, 28, 28)
    assert np.array_equal(splits.train.images[:, 0].numpy(), arrays["train"][0])
    assert splits.test.labels.tolist() == arrays["t10k"][1].tolist()


def test_torchvision_raw_layout(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", n_train=12, n_test=4)
    splits = D.load_mnist(tmp_path)
    assert len(splits.train) == 12 and len(splits.test) == 4
    assert np.array_equal(splits.test.images[:, 0].numpy(), arrays["t10k"][0])


def test_idx_other_image_size(tmp_path):
    write_mnist(tmp_path, size=14)
    assert D.load_mnist(tmp_path).train.shape == (1, 14, 14)


# --------------------------------------------------------------------------- MNIST errors


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match="not a directory.*train-images-idx3-ubyte.gz"):
        D.load_data(f"mnist:{tmp_path / 'nowhere'}")


def test_missing_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte.*mnist:DIR"):
        D.load_mnist(tmp_path)


def test_bad_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[:4] = struct.pack(">I", 2049)  # a labels magic in an images file
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad magic number 2049.*expected 2051") as exc:
        D.load_mnist(tmp_path)
    assert str(path) in str(exc.value)


def test_truncated_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        D.load_mnist(tmp_path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DataError, match="truncated idx header"):
        D.load_mnist(tmp_path)


def test_trailing_bytes(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(DataError, match="trailing bytes"):
        D.load_mnist(tmp_path)


def test_truncated_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError, match="gzip"):
        D.load_mnist(tmp_path)


def test_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    labels = (np.arange(19) % 10).astype(np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 2049))
    with pytest.raises(DataError, match="20 images but .* 19 labels"):
        D.load_mnist(tmp_path)


def test_label_out_of_range(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(10, 12, np.uint8), 2049))
    with pytest.raises(DataError, match="0..9"):
        D.load_mnist(tmp_path)


# --------------------------------------------------------------------------- spec parser


@pytest.mark.parametrize("spec", ["svhn:/data", "mnist", "/some/where", ""])
def test_unknown_scheme(spec):
    with pytest.raises(DataError, match="mnist:DIR.*cifar10:PATH.*imagefolder:DIR"):
        D.load_data(spec)


def test_path_without_scheme_hints(tmp_path):
    with pytest.raises(DataError, match="did you mean mnist:"):
        D.load_data(str(tmp_path))


def test_scheme_without_path():
    with pytest.raises(DataError, match="names no path"):
        D.load_data("cifar10:")


def test_data_error_is_oserror():
    with pytest.raises(OSError):
        D.load_data("nope:x")


# --------------------------------------------------------------------------- tarball / ImageFolder


def test_cifar_tarball_and_cache(tmp_path, monkeypatch, caplog):
    classes = list(D.CIFAR10_CLASSES)
    tar = build_tar(tmp_path / "tiny.tar.gz", classes[::-1], prefix="cifar/")  # member order != label order
    splits = D.load_data(f"cifar10:{tar}")
    assert splits.name == "cifar10" and splits.classes == classes
    assert splits.train.images.shape == (20, 3, 8, 8) and splits.test.images.shape == (10, 3, 8, 8)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    # class-interleaved order: rank 0 of every class, then rank 1
    assert splits.train.labels.tolist() == list(range(10)) * 2
    assert splits.test.labels.tolist() == list(range(10))
    # pixels decode to the colour drawn (JPEG: approximately); red = 20 * position in the reversed list
    red = splits.train.images[:, 0].float().mean(dim=(1, 2))
    assert torch.allclose(red, (9 - splits.train.labels.float()) * 20, atol=6)
    assert splits.train.mean == D.CIFAR10_MEAN and splits.train.std == D.CIFAR10_STD

    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob("*.tmp"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(D, "_decode", no_decode)
    again = D.load_data(f"cifar10:{tar}")
    assert torch.equal(again.train.images, splits.train.images)
    assert torch.equal(again.test.labels, splits.test.labels)

    # a corrupt cache file is ignored with a warning, and decoding runs again
    monkeypatch.undo()
    monkeypatch.setenv("MORPHKIT_CACHE", str(tmp_path / "cache"))
    cached[0].write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="morphkit.data"):
        third = D.load_data(f"cifar10:{tar}")
    assert "ignoring unreadable cache" in caplog.text
    assert torch.equal(third.train.images, splits.train.images)


def test_cache_off_writes_nothing(tmp_path):
    tar = build_tar(tmp_path / "t.tar.gz", D.CIFAR10_CLASSES, per_train=1, per_test=1)
    D.load_cifar10(tar, cache=False)
    assert not (tmp_path / "cache").exists()
    D.load_cifar10(tar, cache_path=tmp_path / "elsewhere")
    assert len(list((tmp_path / "elsewhere").glob("*.npz"))) == 1


def test_cifar_wrong_classes(tmp_path):
    tar = build_tar(tmp_path / "t.tar.gz", ["a", "b"])
    with pytest.raises(DataError, match="ten CIFAR-10 classes.*imagefolder:"):
        D.load_data(f"cifar10:{tar}")
    assert D.load_data(f"imagefolder:{tar}").classes == ["a", "b"]


def test_not_a_tarball(tmp_path):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(b"hello")
    with pytest.raises(DataError, match="not a tar archive"):
        D.load_cifar10(path)


def test_imagefolder_dir(tmp_path):
    root = build_folder(tmp_path / "pets", ["dog", "cat", "emu"], test_name="val")
    splits = D.load_data(f"imagefolder:{root}")
    assert splits.name == "imagefolder" and splits.classes == ["cat", "dog", "emu"]  # sorted
    assert splits.train.images.shape == (9, 3, 5, 6)  # (N, C, H, W); PIL size was (6, 5)
    assert splits.test.images.shape == (6, 3, 5, 6)
    assert splits.train.labels.tolist() == [0, 1, 2] * 3
    # PNG is lossless: the red channel is exactly the class colour of the file's folder
    colour = {"dog": 0, "cat": 40, "emu": 80}
    red = splits.train.images[:, 0, 0, 0].tolist()
    assert red == [colour[splits.classes[y]] for y in splits.train.labels.tolist()]
    # mean/std measured on train
    px = splits.train.images.double() / 255
    assert np.allclose(splits.train.mean, px.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    std = px.std(dim=(0, 2, 3), unbiased=False).numpy()
    assert std[2] == 0 and splits.train.std[2] == 1.0  # a constant channel is not divided by zero
    assert np.allclose(splits.train.std[:2], std[:2], atol=1e-6)
    # second load comes from the cache
    assert torch.equal(D.load_imagefolder(root).train.images, splits.train.images)


def test_imagefolder_grayscale_stays_one_channel(tmp_path):
    root = build_folder(tmp_path / "g", ["x", "y"], mode="L")
    assert D.load_imagefolder(root, cache=False).shape == (1, 5, 6)


def test_empty_folder(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError, match="needs train/ and test/"):
        D.load_data(f"imagefolder:{root}")
    root = build_folder(tmp_path / "f", ["a", "b"])
    (root / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder .*c holds no images"):
        D.load_imagefolder(root)


def test_missing_split_and_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.load_data(f"cifar10:{tmp_path / 'nope.tar.gz'}")
    root = build_folder(tmp_path / "f", ["a"])
    for f in (root / "test" / "a").iterdir():
        f.unlink()
    (root / "test" / "a").rmdir()
    with pytest.raises(DataError, match="needs train/ and test/.*found: train"):
        D.load_imagefolder(root)


def test_test_class_missing_from_train(tmp_path):
    root = build_folder(tmp_path / "f", ["a", "b"])
    (root / "test" / "zzz").mkdir()
    (root / "test" / "zzz" / "1.png").write_bytes(image_bytes((1, 2, 3), (6, 5), "PNG"))
    with pytest.raises(DataError, match="zzz"):
        D.load_imagefolder(root)


def test_odd_image_size(tmp_path):
    root = build_folder(tmp_path / "f", ["a", "b"])
    odd = root / "train" / "b" / "001.png"
    odd.write_bytes(image_bytes((1, 2, 3), (7, 7), "PNG"))
    with pytest.raises(DataError, match="same size") as exc:
        D.load_imagefolder(root)
    assert str(odd) in str(exc.value) and "7x7" in str(exc.value)


def test_corrupt_image(tmp_path):
    root = build_folder(tmp_path / "f", ["a"])
    bad = root / "train" / "a" / "000.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot decode") as exc:
        D.load_imagefolder(root)
    assert str(bad) in str(exc.value)


# --------------------------------------------------------------------------- loaders


def test_loader_len_and_coverage(embedded):
    loader = D.Loader(embedded.test, batch_size=128, shuffle=True, seed=3)
    assert len(loader) == 8
    ys = [y for _, y in loader]
    assert [len(y) for y in ys] == [128] * 7 + [1000 - 7 * 128]
    assert torch.cat(ys).sort().values.equal(embedded.test.labels.sort().values)
    dropped = D.Loader(embedded.test, batch_size=128, drop_last=True)
    assert len(dropped) == 7 == len(list(dropped))
    assert len(D.Loader(embedded.test, batch_size=100, limit=250)) == 3


def test_loader_deterministic_for_seed(embedded):
    def epochs(seed):
        loader = D.Loader(embedded.test, batch_size=256, shuffle=True, seed=seed, augment=True, pad=3, flip=False)
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(2)]

    a, b, c = epochs(7), epochs(7), epochs(8)
    for ea, eb in zip(a, b):
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0][1], a[1][0][1])  # epochs advance the permutation
    assert not torch.equal(a[0][0][1], c[0][0][1])  # another seed, another order

    loader = D.Loader(embedded.test, batch_size=256, shuffle=True, seed=7, augment=True, pad=3, flip=False)
    list(loader)
    loader.set_epoch(0)  # replay epoch 0
    assert torch.equal(next(iter(loader))[0], a[0][0][0])


def test_unshuffled_loader_keeps_order(embedded):
    ys = torch.cat([y for _, y in D.Loader(embedded.test, batch_size=300)])
    assert torch.equal(ys, embedded.test.labels)


def test_normalisation(embedded):
    data = embedded.test
    x, _ = next(iter(D.Loader(data, batch_size=50)))
    expected = (data.images[:50].float() / 255 - 0.1307) / 0.3081
    assert x.dtype == torch.float32 and x.shape == (50, 1, 28, 28)
    assert torch.allclose(x, expected, atol=1e-5)
    raw, _ = next(iter(D.Loader(data, batch_size=50, normalize=False)))
    assert torch.allclose(raw, data.images[:50].float() / 255)
    full = torch.cat([x for x, _ in D.Loader(embedded.train, batch_size=2000)])
    assert abs(full.mean().item()) < 0.05 and abs(full.std().item() - 1) < 0.05
    first, _ = next(iter(D.Loader(embedded.train, batch_size=3)))
    assert torch.allclose(D.example_batch(embedded, 3), first)


def test_augmentation_matches_reference_crop_and_flip():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 6, 5), dtype=torch.uint8)
    data = D.ImageData(images, torch.zeros(16, dtype=torch.long), ["x"], (0.5,) * 3, (0.5,) * 3)
    loader = D.Loader(data, batch_size=16, augment=True, pad=2, normalize=False)
    g = torch.Generator().manual_seed(11)
    out, _ = loader._augment(images, torch.zeros(16, dtype=torch.long), g)  # (16, 3, 6, 5)
    per_pixel = images[:, 0].long() + 1  # (16, 6, 5) labels that differ per pixel, none 0
    g = torch.Generator().manual_seed(11)
    out2, y = loader._augment(images, per_pixel, g)  # the same draws: labels cropped and flipped alike
    assert torch.equal(out2, out)

    g = torch.Generator().manual_seed(11)  # replay the same draws
    oy = torch.randint(0, 5, (16, 1), generator=g)
    ox = torch.randint(0, 5, (16, 1), generator=g)
    flips = torch.rand(16, 1, generator=g) < 0.5
    padded = torch.zeros(16, 3, 10, 9, dtype=torch.uint8)
    padded[:, :, 2:8, 2:7] = images
    for i in range(16):
        crop = padded[i, :, oy[i, 0] : oy[i, 0] + 6, ox[i, 0] : ox[i, 0] + 5]
        if flips[i, 0]:
            crop = crop.flip(-1)
        assert torch.equal(out[i], crop), i
        assert torch.equal(y[i], (crop[0].long() + 1) * _inside(oy[i, 0], ox[i, 0], flips[i, 0])), i
    assert flips.any() and not flips.all()


def _inside(oy, ox, flip, h=6, w=5, p=2):
    """1 where a crop pixel comes from the image, 0 where from the padding (labels there are class 0)."""
    mask = torch.zeros(h + 2 * p, w + 2 * p, dtype=torch.long)
    mask[p : p + h, p : p + w] = 1
    crop = mask[oy : oy + h, ox : ox + w]
    return crop.flip(-1) if flip else crop


def test_augmented_batches_shape_and_range(embedded):
    tiny = embedded.train.subset(300, seed=0)
    loader = D.Loader(tiny, batch_size=128, shuffle=True, augment=True, pad=4, normalize=False)
    for x, _ in loader:
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    plain = D.Loader(tiny, batch_size=128, shuffle=True, augment=False, normalize=False)
    plain.set_epoch(1)
    loader.set_epoch(1)
    xa, ya = next(iter(loader))
    xp, yp = next(iter(plain))
    assert torch.equal(ya, yp)  # augmentation does not change the order
    assert not torch.equal(xa, xp)
    # with no padding and no flip, augmentation is the identity
    ident = D.Loader(tiny, batch_size=128, augment=True, pad=0, flip=False, normalize=False)
    assert torch.allclose(next(iter(ident))[0], tiny.images[:128].float() / 255, rtol=1e-6, atol=0)


def test_make_loaders_defaults(embedded, tmp_path):
    train, test = D.make_loaders(embedded, batch_size=128, seed=0)
    assert not train.augment and train.shuffle and not test.shuffle and not test.augment
    assert (len(train), len(test)) == (47, 8)
    train, _ = D.make_loaders(embedded, batch_size=64, augment=True, limit=640, test_limit=100)
    assert train.augment and not train.flip and len(train) == 10  # no flipped digits
    tar = build_tar(tmp_path / "t.tar.gz", D.CIFAR10_CLASSES, per_train=1, per_test=1)
    train, test = D.make_loaders(D.load_cifar10(tar), batch_size=4)
    assert train.augment and train.flip and train.pad == 1 and not test.augment


def test_subset_and_example_batch(embedded):
    first = embedded.train.subset(10)
    assert torch.equal(first.labels, embedded.train.labels[:10])
    rand = embedded.train.subset(10, seed=1)
    assert torch.equal(rand.labels, embedded.train.subset(10, seed=1).labels)
    assert not torch.equal(rand.images, first.images)
    small = embedded.subset(train=100, test=50)
    assert (len(small.train), len(small.test)) == (100, 50)
    x = D.example_batch(embedded, 2)
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32


def test_bad_arguments(embedded):
    from morphkit.errors import ConfigError

    with pytest.raises(ConfigError):
        D.Loader(embedded.test, batch_size=0)
    with pytest.raises(ConfigError):
        D.ImageData(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"], (0.5,), (0.5,))
    with pytest.raises(ConfigError):
        D.ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"],
                    (0.5,), (0.5,))
    with pytest.raises(ConfigError):
        D.make_loaders(embedded.train)


# --------------------------------------------------------------------------- the real CIFAR-10 (slow)


@pytest.mark.slow
@needs_cifar
def test_real_cifar10_tarball():
    splits = D.load_data(f"cifar10:{CIFAR_TAR}")  # decodes (~15 s), then caches
    assert splits.train.images.shape == (50000, 3, 32, 32) and splits.test.images.shape == (10000, 3, 32, 32)
    assert splits.train.labels.bincount().tolist() == [5000] * 10
    assert splits.test.labels.bincount().tolist() == [1000] * 10
    assert splits.classes == list(D.CIFAR10_CLASSES)
    mean = (splits.train.images.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(D.CIFAR10_MEAN), atol=0.01)
    again = D.load_data(f"cifar10:{CIFAR_TAR}")  # from the cache
    assert torch.equal(again.test.images, splits.test.images)
    train, _ = D.make_loaders(splits, batch_size=128)
    x, y = next(iter(train))
    assert x.shape == (128, 3, 32, 32) and y.shape == (128,)
