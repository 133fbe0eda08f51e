"""A segmentation data set built from real MNIST digits: digits on a canvas, a class per pixel.

No segmentation data set can be downloaded where morphkit is tested, so the
paper's third task (semantic segmentation) is measured on one built here from
the MNIST digits in ``../shared/data`` (or the embedded subset): each canvas
holds ``digits`` digits pasted at random places (overlaps allowed, a later
digit on top), and each pixel's label is ``1 + digit`` where a digit's stroke
covers it (pixel value >= 128), else 0 (background). Every source digit is used
once per split, and the construction depends only on the seed, so
``load_data("mnistseg:DIR")`` gives the same data on every machine.

Example:
    >>> splits = load_data("mnistseg:embedded")
    >>> splits.train.images.shape, splits.train.labels.shape
    (torch.Size([3000, 1, 48, 48]), torch.Size([3000, 48, 48]))
"""

from __future__ import annotations

import logging

import torch

from morphkit.data import DataSplits, ImageData, _mean_std
from morphkit.errors import DataError

__all__ = ["SEG_CLASSES", "digit_canvases", "digit_segmentation"]

logger = logging.getLogger(__name__)

#: Class 0 is the background; class ``1 + d`` is digit ``d``.
SEG_CLASSES: tuple[str, ...] = ("background", *(str(d) for d in range(10)))
#: A stroke pixel: the digit's value at least this (uint8).
STROKE = 128


def digit_canvases(source: ImageData, canvas: int = 48, digits: int = 2, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste each source digit once onto ``len(source) // digits`` canvases.

    Args:
        source: MNIST images ``(N, 1, h, w)`` with ``(N,)`` digit labels.
        canvas: side of the square canvas (at least the digit's side).
        digits: digits per canvas.
        seed: the draw of the digits' order and places.

    Returns:
        ``(images, labels)``: uint8 ``(M, 1, canvas, canvas)`` and int64
        ``(M, canvas, canvas)`` with 0 for background and ``1 + digit`` on strokes.

    Example:
        >>> x, y = digit_canvases(load_data("embedded").test, canvas=40)
        >>> x.shape, y.shape, int(y.max()) <= 10
        (torch.Size([500, 1, 40, 40]), torch.Size([500, 40, 40]), True)
    """
    if source.per_pixel or source.shape[0] != 1:
        raise DataError(f"digit_canvases needs 1-channel digit images with one label each, got images of shape "
                        f"{source.shape} and labels of shape {tuple(source.labels.shape[1:])}")
    _, h, w = source.shape
    if not (isinstance(canvas, int) and canvas >= max(h, w)) or not (isinstance(digits, int) and digits >= 1):
        raise DataError(f"digit_canvases: got canvas={canvas!r}, digits={digits!r}; expected canvas >= {max(h, w)} "
                        "(the digits' side) and digits >= 1")
    m = len(source) // digits
    if m == 0:
        raise DataError(f"digit_canvases: {len(source)} digits cannot fill one canvas of {digits}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source), generator=g)[: m * digits].view(m, digits)  # (M, digits)
    top = torch.randint(0, canvas - h + 1, (m, digits), generator=g)  # (M, digits)
    left = torch.randint(0, canvas - w + 1, (m, digits), generator=g)  # (M, digits)
    images = torch.zeros(m, 1, canvas, canvas, dtype=torch.uint8)
    labels = torch.zeros(m, canvas, canvas, dtype=torch.int64)
    rows = torch.arange(h)  # (h,)
    cols = torch.arange(w)  # (w,)
    batch = torch.arange(m)[:, None, None]  # (M, 1, 1)
    for k in range(digits):
        pix = source.images[order[:, k], 0]  # (M, h, w)
        cls = source.labels[order[:, k]] + 1  # (M,)
        r = (top[:, k, None] + rows)[:, :, None]  # (M, h, 1)
        c = (left[:, k, None] + cols)[:, None, :]  # (M, 1, w)
        images[batch, 0, r, c] = torch.maximum(images[batch, 0, r, c], pix)  # brighter stroke wins
        stroke = pix >= STROKE  # (M, h, w)
        labels[batch, r, c] = torch.where(stroke, cls[:, None, None], labels[batch, r, c])  # later digit on top
    return images, labels


def digit_segmentation(mnist: DataSplits, canvas: int = 48, digits: int = 2, seed: int = 0) -> DataSplits:
    """The segmentation splits built from an MNIST :class:`DataSplits` (see the module docstring).

    Example:
        >>> splits = digit_segmentation(load_data("mnist:../shared/data/mnist"))  # doctest: +SKIP
        >>> len(splits.train), len(splits.test), splits.classes[:3]
        (30000, 5000, ['background', '0', '1'])
    """
    out = {}
    for i, name in enumerate(("train", "test")):
        images, labels = digit_canvases(getattr(mnist, name), canvas, digits, seed + i)
        mean, std = _mean_std(images.numpy())
        out[name] = ImageData(images, labels, list(SEG_CLASSES), mean, std)
    out["test"] = ImageData(out["test"].images, out["test"].labels, list(SEG_CLASSES), out["train"].mean,
                            out["train"].std)  # normalised like the training split
    logger.info("built mnistseg from %s: %d train and %d test canvases of %dx%d, %d digits each",
                mnist.source, len(out["train"]), len(out["test"]), canvas, canvas, digits)
    return DataSplits(out["train"], out["test"], "mnistseg", mnist.source)
