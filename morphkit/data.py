"""Image data sets held in memory as uint8 tensors, and fast batched loaders.

morphkit trains small networks many times over (base models, manifolds,
baselines), so the data path must cost nothing: every data set is decoded once
into a ``(N, C, H, W)`` uint8 tensor, and a :class:`Loader` cuts float batches
out of it with tensor ops only (shuffling from a seeded ``torch.Generator``,
random crop with zero padding and horizontal flip done for the whole batch in
one ``gather``, then normalisation). No per-sample PIL transforms, no worker
processes.

Sources, named by a *data spec* string (:func:`load_data`):

- ``mnist:DIR``: the idx files (``train-images-idx3-ubyte[.gz]``, ...), in DIR
  or in torchvision's ``DIR/MNIST/raw`` layout.
- ``mnist:embedded`` (or ``embedded``): a small balanced subset of real MNIST
  shipped inside the package (``morphkit/_data/mnist_subset.npz``), so demos and
  tests need nothing but the install.
- ``cifar10:PATH``: an ImageFolder directory (``train/<class>/*.jpg``,
  ``test/<class>/...``) or a ``.tar.gz`` of one, classes in CIFAR-10 label order.
- ``imagefolder:DIR``: any ImageFolder directory (or tarball) with ``train/``
  and ``test/`` (or ``val/``) subdirectories; classes in sorted order.

Decoding a folder or tarball of JPEGs is slow (about 11 s for CIFAR-10), so the
decoded arrays are cached as an ``.npz`` in ``$MORPHKIT_CACHE`` (default
``~/.cache/morphkit``), keyed by the source's path, size and mtime.

Example:
    >>> splits = load_data("mnist:embedded")
    >>> train, test = make_loaders(splits, batch_size=128, seed=0)
    >>> x, y = next(iter(train))          # x: (128, 1, 28, 28) float32, y: (128,) int64
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import logging
import math
import os
import struct
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from morphkit.errors import ConfigError, DataError
from morphkit.untrusted import MAX_ARCHIVE_MEMBER_BYTES, MAX_DECODED_BYTES, MAX_IDX_BYTES, MAX_IMAGE_PIXELS

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataSplits",
    "ImageData",
    "Loader",
    "cache_dir",
    "example_batch",
    "load_cifar10",
    "load_data",
    "load_embedded_mnist",
    "load_imagefolder",
    "load_mnist",
    "make_loaders",
    "read_idx",
]

logger = logging.getLogger(__name__)

MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
_MNIST_NORM = (MNIST_MEAN, MNIST_STD)

SCHEMES = ("mnist:DIR", "mnist:embedded", "embedded", "mnistseg:DIR", "mnistseg:embedded", "cifar10:PATH",
           "imagefolder:DIR")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
EMBEDDED_RESOURCE = "_data/mnist_subset.npz"

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_HINT = (
    "pass mnist:DIR where DIR holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not; torchvision's "
    "DIR/MNIST/raw layout works too), or mnist:embedded for the subset shipped with morphkit"
)
_FOLDER_HINT = (
    "expected an ImageFolder layout: train/<class>/<image> and test/<class>/<image> "
    "(or val/ instead of test/), as a directory or a .tar.gz of one"
)
_CACHE_FORMAT = "morphkit.imagecache/1"
_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes")


# --------------------------------------------------------------------------- containers


@dataclass
class ImageData:
    """One split of an image data set, held in memory.

    Attributes:
        images: ``(N, C, H, W)`` uint8 pixels.
        labels: ``(N,)`` int64 class indices into ``classes``, or ``(N, H, W)``
            per-pixel class indices (segmentation, :mod:`morphkit.segdata`).
        classes: class names, index = label.
        mean: per-channel mean of the pixels scaled to [0, 1], for normalisation.
        std: per-channel standard deviation, same scale.

    Example:
        >>> data = ImageData(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
        ...                  ["a"], (0.5,), (0.25,))
        >>> len(data), data.shape
        (4, (1, 8, 8))
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8:
            raise ConfigError(f"ImageData.images must be a uint8 tensor, got {_describe(self.images)}")
        if self.images.ndim != 4:
            raise ConfigError(f"ImageData.images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64:
            raise ConfigError(f"ImageData.labels must be an int64 tensor, got {_describe(self.labels)}")
        n, _, h, w = self.images.shape
        if tuple(self.labels.shape) not in ((n,), (n, h, w)):
            raise ConfigError(
                f"ImageData.labels must be ({n},) or, per pixel, ({n}, {h}, {w}) to match the images, "
                f"got {tuple(self.labels.shape)}"
            )
        channels = self.images.shape[1]
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(
                f"ImageData.mean/std need one value per channel ({channels}), "
                f"got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"ImageData.std must be positive, got {self.std}")
        self.classes = list(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    @property
    def per_pixel(self) -> bool:
        """True when the labels are per-pixel class maps (segmentation)."""
        return self.labels.dim() == 3

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    def subset(self, n: int, seed: int | None = None) -> ImageData:
        """The first ``n`` samples, or ``n`` random ones (order kept) when ``seed`` is given.

        Args:
            n: how many samples to keep; more than ``len(self)`` keeps all.
            seed: ``None`` for the first ``n``; an int for a seeded random choice.

        Returns:
            A new :class:`ImageData` sharing nothing mutable with this one.

        Example:
            >>> small = load_data("embedded").train.subset(256, seed=0)
        """
        if n < 0:
            raise ConfigError(f"subset size must be >= 0, got {n}")
        total = len(self)
        if n >= total:
            idx = torch.arange(total)
        elif seed is None:
            idx = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(_mix_seed(seed, 0))
            idx = torch.randperm(total, generator=g)[:n].sort().values  # (n,)
        return ImageData(self.images[idx.to(self.images.device)], self.labels[idx.to(self.labels.device)],
                         list(self.classes), self.mean, self.std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` pixels to normalised float32: ``(x / 255 - mean) / std``.

        Example:
            >>> data = load_data("embedded").test
            >>> x = data.normalize(data.images[:8])   # (8, 1, 28, 28) float32
        """
        scale, shift = _affine(self.mean, self.std, images.device)
        return images.float() * scale + shift  # (B, C, H, W)


@dataclass
class DataSplits:
    """A train and a test split of one data set.

    Attributes:
        train: the training split.
        test: the test (or validation) split.
        name: ``"mnist"``, ``"cifar10"`` or ``"imagefolder"``; decides default augmentation.
        source: where it was read from (a path, or ``"embedded"``).

    Example:
        >>> splits = load_data("embedded")
        >>> splits.name, len(splits.train), len(splits.test)
        ('mnist', 6000, 1000)
    """

    train: ImageData
    test: ImageData
    name: str = "imagefolder"
    source: str = ""

    @property
    def classes(self) -> list[str]:
        """Class names (those of the train split)."""
        return self.train.classes

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return self.train.shape

    def subset(
        self, train: int | None = None, test: int | None = None, seed: int | None = None
    ) -> DataSplits:
        """Both splits cut down with :meth:`ImageData.subset` (``None`` keeps a split whole).

        Example:
            >>> tiny = load_data("embedded").subset(train=512, test=256)
        """
        return DataSplits(
            self.train if train is None else self.train.subset(train, seed),
            self.test if test is None else self.test.subset(test, seed),
            self.name,
            self.source,
        )


# --------------------------------------------------------------------------- loader


class Loader:
    """An iterable of ``(x, y)`` batches cut from an :class:`ImageData` with tensor ops.

    ``x`` is float32 ``(B, C, H, W)``, normalised with the data's mean/std (or in
    [0, 1] with ``normalize=False``); ``y`` is int64 ``(B,)``, or ``(B, H, W)`` for
    per-pixel labels (cropped and flipped with the images). Each pass over the
    loader is one epoch; the shuffle order and the augmentation of epoch ``e``
    depend only on ``(seed, e)``, so two loaders with the same seed yield the same
    batches, and :meth:`set_epoch` replays any epoch.

    Args:
        data: the split to serve.
        batch_size: samples per batch.
        shuffle: draw a new permutation each epoch.
        seed: seed of the shuffle and the augmentation.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        augment: random crop (zero padding of ``pad`` pixels) and, if ``flip``,
            random horizontal flip, applied to the whole batch at once.
        pad: crop padding in pixels.
        flip: flip half the images horizontally (when ``augment``).
        normalize: normalise with the data's mean/std; otherwise x is in [0, 1].
        limit: serve only the first ``limit`` samples.
        device: where batches are made; the uint8 images are moved there once, so
            augmentation runs on that device too.

    Example:
        >>> splits = load_data("embedded")
        >>> loader = Loader(splits.train, batch_size=64, shuffle=True, seed=1)
        >>> len(loader)
        94
        >>> for x, y in loader:
        ...     pass   # x: (64, 1, 28, 28) float32, y: (64,) int64
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int = 128,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        augment: bool = False,
        pad: int = 4,
        flip: bool = True,
        normalize: bool = True,
        limit: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(data, ImageData):
            raise ConfigError(f"Loader needs an ImageData (e.g. load_data(...).train), got {_describe(data)}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if int(pad) < 0:
            raise ConfigError(f"pad must be >= 0, got {pad}")
        if limit is not None:
            data = data.subset(int(limit))
        self.device = torch.device(device) if device is not None else data.images.device
        self.data = data
        self.images = data.images.to(self.device)  # (N, C, H, W) uint8
        self.labels = data.labels.to(self.device)  # (N,) or (N, H, W) int64
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.augment = bool(augment)
        self.pad = int(pad)
        self.flip = bool(flip)
        self.normalize = bool(normalize)
        self.epoch = 0
        if normalize:
            self._scale, self._shift = _affine(data.mean, data.std, self.device)  # (1, C, 1, 1) each
        else:
            c = data.shape[0]
            self._scale = torch.full((1, c, 1, 1), 1.0 / 255.0, device=self.device)
            self._shift = torch.zeros((1, c, 1, 1), device=self.device)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass be epoch ``epoch`` (its shuffle and augmentation).

        Example:
            >>> loader.set_epoch(0); first = [y for _, y in loader]   # replays epoch 0
        """
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
        self.epoch += 1
        return self._batches(g)

    def _batches(self, g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)  # (N,)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size].to(self.device)  # (B,)
            pixels = self.images[idx]  # (B, C, H, W) uint8
            labels = self.labels[idx]  # (B,) or (B, H, W)
            if self.augment:
                pixels, labels = self._augment(pixels, labels, g)
            x = pixels.float() * self._scale + self._shift  # (B, C, H, W) float32
            yield x, labels

    def _augment(self, pixels: torch.Tensor, labels: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crop from the zero-padded batch plus horizontal flip, in one gather (per-pixel labels too,
        padded with class 0)."""
        b, c, h, w = pixels.shape
        p = self.pad
        # random numbers are drawn on the CPU so a seed gives the same batches on any device
        oy = torch.randint(0, 2 * p + 1, (b, 1), generator=g)  # (B, 1) crop offsets
        ox = torch.randint(0, 2 * p + 1, (b, 1), generator=g)  # (B, 1)
        flips = torch.rand(b, 1, generator=g) < 0.5  # (B, 1)
        rows = oy + torch.arange(h)  # (B, H) rows of the padded image
        cols = ox + torch.arange(w)  # (B, W)
        if self.flip:
            cols = torch.where(flips, cols.flip(1), cols)  # (B, W) reversed for flipped images
        wp = w + 2 * p
        index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)  # (B, 1, H*W)
        index = index.to(pixels.device).expand(b, c, h * w)  # (B, C, H*W)
        padded = F.pad(pixels, (p, p, p, p)) if p else pixels  # (B, C, H+2p, W+2p) uint8
        out = torch.gather(padded.reshape(b, c, -1), 2, index)  # (B, C, H*W)
        if labels.dim() == 3:
            padded_y = F.pad(labels, (p, p, p, p)) if p else labels  # (B, H+2p, W+2p)
            labels = torch.gather(padded_y.reshape(b, -1), 1, index[:, 0]).view(b, h, w)  # (B, H, W)
        return out.view(b, c, h, w), labels

    def __repr__(self) -> str:
        return (
            f"Loader(n={len(self.data)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment}, seed={self.seed}, device={self.device})"
        )


def make_loaders(
    splits: DataSplits,
    batch_size: int = 128,
    augment: bool | None = None,
    seed: int = 0,
    *,
    test_batch_size: int | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    drop_last: bool = False,
    normalize: bool = True,
    device: str | torch.device | None = None,
) -> tuple[Loader, Loader]:
    """The usual pair: a shuffled (and maybe augmented) train loader and a plain test loader.

    Args:
        splits: from :func:`load_data`.
        batch_size: train batch size (and test batch size unless ``test_batch_size``).
        augment: random crop (+ flip, except for MNIST) on the train split. ``None``
            means on for CIFAR-10 and image folders, off for MNIST and mnistseg.
        seed: seed of the train loader's shuffle and augmentation.
        test_batch_size: test batch size; defaults to ``batch_size``.
        limit: use only the first ``limit`` train samples.
        test_limit: use only the first ``test_limit`` test samples.
        drop_last: drop the train loader's last partial batch.
        normalize: normalise with the data's mean/std; otherwise x is in [0, 1].
        device: where batches are made (the uint8 data is moved there once).

    Returns:
        ``(train_loader, test_loader)``.

    Example:
        >>> train, test = make_loaders(load_data("mnist:embedded"), batch_size=128, seed=0)
        >>> len(train), len(test)
        (47, 8)
    """
    if not isinstance(splits, DataSplits):
        raise ConfigError(f"make_loaders needs a DataSplits from load_data(), got {_describe(splits)}")
    is_mnist = splits.name in ("mnist", "mnistseg")
    if augment is None:
        augment = not is_mnist
    pad = max(1, splits.shape[1] // 8)  # 4 for 32x32, 3 for 28x28
    train = Loader(
        splits.train, batch_size, shuffle=True, seed=seed, drop_last=drop_last, augment=augment,
        pad=pad, flip=not is_mnist, normalize=normalize, limit=limit, device=device,
    )
    test = Loader(
        splits.test, test_batch_size or batch_size, shuffle=False, seed=seed,
        normalize=normalize, limit=test_limit, device=device,
    )
    return train, test


def example_batch(data: DataSplits | ImageData, n: int = 2, normalize: bool = True) -> torch.Tensor:
    """The first ``n`` train images as a normalised float batch, e.g. for ``example_inputs``.

    Example:
        >>> x = example_batch(load_data("embedded"), 2)   # (2, 1, 28, 28) float32
    """
    split = data.train if isinstance(data, DataSplits) else data
    if not isinstance(split, ImageData):
        raise ConfigError(f"example_batch needs a DataSplits or ImageData, got {_describe(data)}")
    if n < 1:
        raise ConfigError(f"example_batch needs n >= 1, got {n}")
    pixels = split.images[:n]  # (n, C, H, W) uint8
    return split.normalize(pixels) if normalize else pixels.float() / 255.0


# --------------------------------------------------------------------------- spec parser


def load_data(
    spec: str | os.PathLike[str],
    *,
    cache: bool = True,
    cache_path: str | os.PathLike[str] | None = None,
) -> DataSplits:
    """Load a data set from a spec string.

    Args:
        spec: ``mnist:DIR``, ``mnist:embedded`` (or just ``embedded``),
            ``mnistseg:DIR`` / ``mnistseg:embedded`` (MNIST digits on 48x48
            canvases with per-pixel labels, :func:`morphkit.segdata.digit_segmentation`),
            ``cifar10:PATH`` (ImageFolder directory or .tar.gz) or ``imagefolder:DIR``.
        cache: cache decoded image folders / tarballs (not needed for MNIST).
        cache_path: cache directory; default :func:`cache_dir`.

    Returns:
        The train and test splits.

    Raises:
        DataError: unknown scheme, or missing / malformed files.

    Example:
        >>> splits = load_data("cifar10:../shared/data/cifar10-jpeg.tar.gz")   # doctest: +SKIP
        >>> splits.train.images.shape
        torch.Size([50000, 3, 32, 32])
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"data spec must be a string such as 'mnist:DIR', got {spec!r:.60} ({type(spec).__name__}); "
                        f"expected one of: {', '.join(SCHEMES)}")
    text = os.fspath(spec)
    if not isinstance(text, str):
        raise DataError(f"data spec must be a string such as 'mnist:DIR', got {text!r:.60}")
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if text.lower() == "embedded" or (scheme == "mnist" and rest.strip().lower() == "embedded"):
        return load_embedded_mnist()
    if not sep or scheme not in ("mnist", "mnistseg", "cifar10", "imagefolder"):
        guess = ""
        if text and Path(text).expanduser().exists():
            guess = (
                f" (it looks like a path: did you mean mnist:{text}, cifar10:{text} or imagefolder:{text}?)"
            )
        raise DataError(
            f"unknown data spec {text!r}{guess}; expected one of: {', '.join(SCHEMES)}"
        )
    if not rest.strip():
        raise DataError(
            f"data spec {text!r} names no path; expected {scheme}:PATH, e.g. one of {', '.join(SCHEMES)}"
        )
    path = Path(rest.strip()).expanduser()
    if scheme == "mnistseg":
        from morphkit.segdata import digit_segmentation

        return digit_segmentation(load_embedded_mnist() if rest.strip().lower() == "embedded" else load_mnist(path))
    if scheme == "mnist":
        return load_mnist(path)
    if scheme == "cifar10":
        return load_cifar10(path, cache=cache, cache_path=cache_path)
    return load_imagefolder(path, cache=cache, cache_path=cache_path)


# --------------------------------------------------------------------------- MNIST (idx)


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """Read one idx file (plain or gzipped) and check it thoroughly.

    Args:
        path: the file.
        magic: the expected magic number: 2051 for images (3-D), 2049 for labels (1-D).

    Returns:
        The uint8 array with the file's dims, e.g. ``(60000, 28, 28)``.

    Raises:
        DataError: unreadable, bad gzip, bad magic, zero dims, or a size that does
            not match the header (truncated or trailing bytes).

    Example:
        >>> labels = read_idx("../shared/data/mnist/t10k-labels-idx1-ubyte.gz", 2049)   # doctest: +SKIP
    """
    path = Path(path)
    raw = _read_maybe_gzip(path, 4 + 4 * 255)  # the header (at most 255 dims); the data is read once sized
    what = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4:
        raise DataError(
            f"{path}: truncated idx file ({len(raw)} bytes); expected an idx {what} file. {_MNIST_HINT}"
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: bad magic number {found} (0x{found:08x}); expected {magic} (0x{magic:08x}) "
            f"for an idx {what} file. Is this the right file? {_MNIST_HINT}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated idx header ({len(raw)} bytes, expected {header}); re-download the file"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim > 1 and any(d == 0 for d in dims[1:]):
        raise DataError(f"{path}: idx header has a zero dimension {dims}; expected positive image sizes")
    expected = math.prod(dims)
    if header + expected > MAX_IDX_BYTES:
        raise DataError(
            f"{path}: idx header says {'x'.join(map(str, dims))} = {expected:,} bytes of data, more than the "
            f"{MAX_IDX_BYTES:,} morphkit reads from one idx file; the file is corrupt or not an MNIST file"
        )
    raw = _read_maybe_gzip(path, header + expected + 1)  # one byte more shows trailing data
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {kind}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
            f"file holds {f'more than {expected}' if got > expected else got}; re-download or re-extract it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_mnist(root: str | os.PathLike[str]) -> DataSplits:
    """Load MNIST from its four idx files.

    Args:
        root: a directory holding ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
            ``t10k-labels-idx1-ubyte[.gz]``, directly or in ``MNIST/raw`` (torchvision).

    Returns:
        ``DataSplits`` with 1-channel images and classes ``"0"`` .. ``"9"``.

    Raises:
        DataError: a missing directory or file, or a malformed file.

    Example:
        >>> splits = load_mnist("../shared/data/mnist")   # doctest: +SKIP
        >>> splits.train.images.shape
        torch.Size([60000, 1, 28, 28])
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"mnist: {root} is not a directory. {_MNIST_HINT}")
    splits = {}
    for split, (images_stem, labels_stem) in _MNIST_FILES.items():
        images_path = _find_idx(root, images_stem)
        labels_path = _find_idx(root, labels_stem)
        images = read_idx(images_path, _IDX_IMAGES_MAGIC)  # (N, H, W)
        labels = read_idx(labels_path, _IDX_LABELS_MAGIC)  # (N,)
        if images.ndim != 3:
            raise DataError(f"{images_path}: expected 3-D idx images, got dims {images.shape}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"mnist {split}: {images_path} holds {images.shape[0]} images but {labels_path} holds "
                f"{labels.shape[0]} labels; the counts must agree (mixed-up or truncated files?)"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{labels_path}: labels must be digits 0..9, found {int(labels.max())}")
        splits[split] = _image_data(images[:, None], labels, MNIST_CLASSES, MNIST_MEAN, MNIST_STD)
    logger.info("loaded MNIST from %s: %d train, %d test", root, len(splits["train"]), len(splits["test"]))
    return DataSplits(splits["train"], splits["test"], "mnist", str(root))


def load_embedded_mnist() -> DataSplits:
    """The balanced MNIST subset shipped inside the package (6000 train, 1000 test).

    Built by ``scripts/make_embedded_mnist.py``: the first 600 train and 100 test
    images of each digit, in their original order.

    Example:
        >>> splits = load_embedded_mnist()
        >>> splits.train.images.shape
        torch.Size([6000, 1, 28, 28])
    """
    resource = importlib.resources.files("morphkit").joinpath(EMBEDDED_RESOURCE)
    try:
        with importlib.resources.as_file(resource) as path, np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    except (OSError, KeyError, ValueError, zlib.error) as exc:
        raise DataError(
            f"the embedded MNIST subset (morphkit/{EMBEDDED_RESOURCE}) is missing or corrupt ({exc}); "
            "reinstall morphkit or rebuild it with scripts/make_embedded_mnist.py"
        ) from exc
    train, test = (
        _image_data(arrays[f"{s}_images"][:, None], arrays[f"{s}_labels"], MNIST_CLASSES, *_MNIST_NORM)
        for s in ("train", "test")
    )
    return DataSplits(train, test, "mnist", "embedded")


def _find_idx(root: Path, stem: str) -> Path:
    dirs = [root, root / "MNIST" / "raw", root / "raw"]
    names = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    looked = ", ".join(str(d) for d in dirs if d.is_dir())
    raise DataError(f"mnist: no {stem}[.gz] found (looked in {looked}). {_MNIST_HINT}")


def _read_maybe_gzip(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a file, decompressed when it is gzipped (a gzip bomb stops at ``limit``)."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                f.seek(0)
                return f.read(limit)
            f.seek(0)
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    return gz.read(limit)
            except (OSError, EOFError, zlib.error) as exc:
                raise DataError(f"{path}: corrupt or truncated gzip data ({exc}); re-download the file") from exc
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


# --------------------------------------------------------------------------- image folders


def load_cifar10(
    path: str | os.PathLike[str],
    *,
    cache: bool = True,
    cache_path: str | os.PathLike[str] | None = None,
) -> DataSplits:
    """Load CIFAR-10 from an ImageFolder directory or a .tar(.gz) of one.

    Classes must be the ten CIFAR-10 classes; labels follow CIFAR-10 order
    (airplane=0 ... truck=9). Normalisation uses the usual CIFAR-10 mean/std.

    Args:
        path: the directory (with ``train/`` and ``test/``) or tarball.
        cache: read / write the decoded arrays from / to the cache.
        cache_path: cache directory; default :func:`cache_dir`.

    Raises:
        DataError: missing path, wrong layout, other classes, unreadable or odd-sized images.

    Example:
        >>> splits = load_cifar10("../shared/data/cifar10-jpeg.tar.gz")   # doctest: +SKIP
    """
    return _load_folder(Path(path).expanduser(), "cifar10", cache, cache_path)


def load_imagefolder(
    path: str | os.PathLike[str],
    *,
    cache: bool = True,
    cache_path: str | os.PathLike[str] | None = None,
) -> DataSplits:
    """Load any ImageFolder data set (directory or .tar(.gz)) with ``train/`` and ``test/`` or ``val/``.

    Classes are the sorted folder names under ``train/``. Images must all have the
    same size (no resizing is done); grayscale-only sets stay 1-channel, anything
    else becomes RGB. Mean and std are measured on the train split.

    Args:
        path: the directory or tarball.
        cache: read / write the decoded arrays from / to the cache.
        cache_path: cache directory; default :func:`cache_dir`.

    Raises:
        DataError: missing path, wrong layout, empty folders, unreadable or odd-sized images.

    Example:
        >>> splits = load_imagefolder("data/flowers")   # doctest: +SKIP
    """
    return _load_folder(Path(path).expanduser(), "imagefolder", cache, cache_path)


def cache_dir() -> Path:
    """The cache directory: ``$MORPHKIT_CACHE``, else ``~/.cache/morphkit``.

    Example:
        >>> cache_dir()   # doctest: +SKIP
        PosixPath('/home/me/.cache/morphkit')
    """
    env = os.environ.get("MORPHKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "morphkit"


@dataclass
class _Item:
    split: str
    cls: str
    name: str  # file name within the class folder (for sorting)
    where: str  # path or tar member, for messages
    source: Path | bytes = field(repr=False)


def _load_folder(path: Path, kind: str, cache: bool, cache_path: str | os.PathLike[str] | None) -> DataSplits:
    if not path.exists():
        raise DataError(f"{kind}: {path} does not exist; {_FOLDER_HINT}")
    is_tar = path.is_file()
    if is_tar and not tarfile.is_tarfile(path):
        raise DataError(f"{kind}: {path} is a file but not a tar archive; {_FOLDER_HINT}")
    items: list[_Item] | None = None
    if is_tar:
        st = path.stat()
        key_text = f"{_CACHE_FORMAT}|{kind}|tar|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    else:
        items = _scan_dir(path, kind)
        listing = "\n".join(
            f"{it.split}/{it.cls}/{it.name}|{st.st_size}|{st.st_mtime_ns}"
            for it in items
            for st in [os.stat(it.source)]  # type: ignore[arg-type]
        )
        key_text = f"{_CACHE_FORMAT}|{kind}|dir|{path.resolve()}|{listing}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    cache_file = Path(cache_path).expanduser() if cache_path else cache_dir()
    cache_file = cache_file / f"{kind}-{path.name.split('.')[0] or 'data'}-{key}.npz"

    arrays = _read_cache(cache_file) if cache else None
    if arrays is None:
        t0 = time.perf_counter()
        # a warning, so the CLI shows it: CIFAR-10's first decode takes about a minute and a half on 2 cores
        logger.warning("decoding %s images from %s once (can take minutes); caching them in %s (set "
                       "$MORPHKIT_CACHE to move it)", kind, path, cache_file.parent if cache else "nowhere")
        arrays = _decode(_iter_tar(path, kind) if is_tar else iter(items or []), path, kind)
        logger.info("decoded %d images in %.1f s", len(arrays["train_labels"]) + len(arrays["test_labels"]),
                    time.perf_counter() - t0)
        if cache:
            _write_cache(cache_file, arrays)
    classes = [str(c) for c in arrays["classes"]]
    if kind == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
        if arrays["train_images"].shape[1] != 3:
            raise DataError(f"cifar10: {path} holds 1-channel images; expected RGB CIFAR-10 images")
    else:
        mean, std = _mean_std(arrays["train_images"])
    train = _image_data(arrays["train_images"], arrays["train_labels"], classes, mean, std)
    test = _image_data(arrays["test_images"], arrays["test_labels"], classes, mean, std)
    return DataSplits(train, test, kind, str(path))


def _scan_dir(root: Path, kind: str) -> list[_Item]:
    if not root.is_dir():
        raise DataError(f"{kind}: {root} is not a directory; {_FOLDER_HINT}")
    items: list[_Item] = []
    for split in ("train", "test", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for cls_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = [f for f in sorted(cls_dir.iterdir()) if f.is_file() and _is_image_name(f.name)]
            items.extend(_Item(split, cls_dir.name, f.name, str(f), f) for f in found)
            if not found:
                raise DataError(
                    f"{kind}: class folder {cls_dir} holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...); "
                    "remove it or add images"
                )
    return items


def _iter_tar(path: Path, kind: str) -> Iterator[_Item]:
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if len(parts) < 3 or parts[-3] not in ("train", "test", "val"):
                    continue
                if parts[-1].startswith(".") or parts[-2].startswith(".") or not _is_image_name(parts[-1]):
                    continue
                if member.size > MAX_ARCHIVE_MEMBER_BYTES:
                    raise DataError(f"{kind}: {path}: member {member.name[:200]!r} is {member.size:,} bytes, more "
                                    f"than the {MAX_ARCHIVE_MEMBER_BYTES:,} morphkit reads for one image; the "
                                    "archive is corrupt or not an image data set")
                f = tf.extractfile(member)
                if f is None:
                    continue
                yield _Item(parts[-3], parts[-2], parts[-1], f"{path}:{member.name}", f.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{kind}: {path}: corrupt or truncated archive ({exc}); re-download it") from exc


def _decode(items: Iterator[_Item], path: Path, kind: str) -> dict[str, np.ndarray]:
    """Decode every image once; check layout, classes and sizes; order and stack them."""
    decoded: list[tuple[_Item, np.ndarray]] = []
    total = 0
    for item in items:
        arr = _decode_one(item, kind)
        total += arr.nbytes
        if total > MAX_DECODED_BYTES:
            raise DataError(f"{kind}: {path}: the decoded images exceed {MAX_DECODED_BYTES:,} bytes (at "
                            f"{item.where}); morphkit holds data sets in memory: use a smaller one")
        decoded.append((item, arr))
        item.source = b""  # free the encoded bytes
    by_split: dict[str, list[tuple[_Item, np.ndarray]]] = {}
    for item, arr in decoded:
        by_split.setdefault(item.split, []).append((item, arr))
    test_name = "test" if "test" in by_split else "val"
    if "train" not in by_split or test_name not in by_split:
        found = ", ".join(sorted(by_split)) or "no images at all"
        raise DataError(
            f"{kind}: {path} needs train/ and test/ (or val/) images, found: {found}; {_FOLDER_HINT}"
        )
    train_classes = sorted({it.cls for it, _ in by_split["train"]})
    if kind == "cifar10":
        if set(train_classes) != set(CIFAR10_CLASSES):
            raise DataError(
                f"cifar10: {path} has classes {train_classes}; expected the ten CIFAR-10 classes "
                f"{list(CIFAR10_CLASSES)}. For another data set use imagefolder:{path}"
            )
        classes = list(CIFAR10_CLASSES)
    else:
        classes = train_classes
    extra = sorted({it.cls for it, _ in by_split[test_name]} - set(classes))
    if extra:
        raise DataError(
            f"{kind}: {path}: {test_name}/ has classes {extra} that train/ lacks; expected the same classes"
        )

    # One size for all: the first image (in sorted order) sets it.
    ordered = {s: _round_robin(by_split[s], classes) for s in ("train", test_name)}
    first_item, first_arr = ordered["train"][0]
    ref = first_arr.shape[:2]
    for split in ("train", test_name):
        for it, arr in ordered[split]:
            if arr.shape[:2] != ref:
                raise DataError(
                    f"{kind}: {it.where} is {arr.shape[1]}x{arr.shape[0]} but {first_item.where} is "
                    f"{ref[1]}x{ref[0]}; all images must have the same size (resize them first)"
                )
    gray = all(arr.ndim == 2 for _, arr in decoded)
    out: dict[str, np.ndarray] = {"classes": np.array(classes, dtype=np.str_)}
    for split, name in (("train", "train"), (test_name, "test")):
        arrs = [a if gray or a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for _, a in ordered[split]]
        stacked = np.stack(arrs)  # (N, H, W) or (N, H, W, 3)
        chw = stacked[:, None] if gray else stacked.transpose(0, 3, 1, 2)
        out[f"{name}_images"] = np.ascontiguousarray(chw)  # (N, C, H, W)
        index = {c: i for i, c in enumerate(classes)}
        out[f"{name}_labels"] = np.array([index[it.cls] for it, _ in ordered[split]], dtype=np.int64)
    return out


def _decode_one(item: _Item, kind: str) -> np.ndarray:
    try:
        with Image.open(item.source if isinstance(item.source, Path) else io.BytesIO(item.source)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # checked before decoding: a decompression bomb
                raise DataError(f"{kind}: image {item.where} is {im.width}x{im.height} pixels, more than the "
                                f"{MAX_IMAGE_PIXELS:,} morphkit decodes; resize it or remove it")
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "I", "I;16", "F") else "RGB")
            return np.asarray(im, dtype=np.uint8)  # (H, W) or (H, W, 3)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            MemoryError, EOFError, struct.error, zlib.error) as exc:
        raise DataError(
            f"{kind}: cannot decode image {item.where} ({exc}); remove or replace the file"
        ) from exc


def _round_robin(
    entries: list[tuple[_Item, np.ndarray]], classes: Sequence[str]
) -> list[tuple[_Item, np.ndarray]]:
    """Order by (rank in class by file name, class index): classes interleave, so any prefix is balanced."""
    index = {c: i for i, c in enumerate(classes)}
    entries = sorted(entries, key=lambda e: (index[e[0].cls], e[0].name))
    rank: dict[str, int] = {}
    keyed = []
    for it, arr in entries:
        r = rank.get(it.cls, 0)
        rank[it.cls] = r + 1
        keyed.append(((r, index[it.cls]), it, arr))
    keyed.sort(key=lambda k: k[0])
    return [(it, arr) for _, it, arr in keyed]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        t0 = time.perf_counter()
        with zipfile.ZipFile(path) as z:  # an .npz: sizes known before anything is decompressed
            if sum(i.file_size for i in z.infolist()) > MAX_DECODED_BYTES:
                raise ValueError(f"more than {MAX_DECODED_BYTES:,} bytes uncompressed")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _CACHE_KEYS}
        ok = (
            arrays["train_images"].dtype == np.uint8 and arrays["train_images"].ndim == 4
            and arrays["test_images"].dtype == np.uint8 and arrays["test_images"].ndim == 4
            and len(arrays["train_labels"]) == len(arrays["train_images"])
            and len(arrays["test_labels"]) == len(arrays["test_images"])
        )
        if not ok:
            raise ValueError("unexpected arrays")
        logger.info("loaded decoded images from cache %s in %.2f s", path, time.perf_counter() - t0)
        return arrays
    except (OSError, KeyError, ValueError, zlib.error, EOFError, zipfile.BadZipFile, MemoryError) as exc:
        logger.warning("ignoring unreadable cache file %s (%s); decoding again", path, exc)
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        tmp = None
        logger.info("cached decoded images at %s", path)
    except OSError as exc:
        logger.warning("could not write cache %s (%s); will decode again next time", path, exc)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------- helpers


def _image_data(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
) -> ImageData:
    return ImageData(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),  # (N, C, H, W)
        torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64)),  # (N,) or (N, H, W)
        list(classes),
        tuple(mean),
        tuple(std),
    )


def _mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images on the [0, 1] scale, in chunks."""
    c = images.shape[1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    count = 0
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.float64) / 255.0  # (n, C, H, W)
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += (chunk**2).sum(axis=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    if count == 0:
        return (0.5,) * c, (0.25,) * c
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # constant images: avoid dividing by zero
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _affine(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / 255 * scale + shift`` folded: scale = 1 / (255 std), shift = -mean / std, each (1, C, 1, 1)."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * s), -m / s


def _mix_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch), well mixed so neighbouring epochs differ."""
    digest = hashlib.sha256(f"morphkit.data:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"
