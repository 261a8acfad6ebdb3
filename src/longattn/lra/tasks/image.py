"""LRA Image: CIFAR-10 classified from its 1,024 grayscale pixels as a sequence of 8-bit tokens.

Reads the official CIFAR-10 *binary* release (``cifar-10-binary.tar.gz`` -> ``cifar-10-batches-bin/``)::

    data_batch_1.bin ... data_batch_5.bin   (10,000 records each)   test_batch.bin   (10,000 records)

Each record is 3,073 bytes: the label (0-9), then the 32x32 red plane, green plane and blue plane, each
row-major. The pickled Python release (``cifar-10-batches-py``) is never read: unpickling runs code.

What LRA does (``image/input_pipeline.py``, ``get_cifar10_datasets``), reproduced here:

- pixels: ``tf.image.rgb_to_grayscale`` on the uint8 image, which converts to float32 (``x * (1/255)``),
  takes ``0.2989 R + 0.5870 G + 0.1140 B`` and converts back to uint8 by scaling by ``255.5`` and
  truncating (``convert_image_dtype``); see ``to_grayscale``;
- tokens: the grayscale values flattened row-major, 1,024 per image, ``vocab_size`` 256, no padding;
- splits: ``train[:90%]`` / ``train[90%:]`` of the 50,000 training images (45,000 / 5,000) and the
  10,000 test images. TFDS cuts its own hashed order; here the cut is in file order: train is the first
  90% of records of ``data_batch_1..5`` (batches 1-4 and the first half of batch 5), val the rest;
- pooling: ``classifier_pool = 'CLS'`` (``image/configs/cifar10/base_cifar10_config.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ...datasets.files import DataFormatError, check_split, locate, missing
from ._base import Split, Task

SUBDIRS = ("cifar-10-batches-bin",)
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
SIDE = 32
PIXELS = SIDE * SIDE
RECORD = 1 + 3 * PIXELS  # label byte, then the R, G and B planes
NUM_CLASSES = 10
TRAIN_PERCENT = 90  # LRA: tfds split 'train[:90%]', val 'train[90%:]'
SOURCE = ("the CIFAR-10 binary version, https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz "
          "(extract it with: tar xzf cifar-10-binary.tar.gz)")
PICKLE_HINT = ("found the Python version (cifar-10-batches-py), which is pickled and is never loaded: "
               "download the binary version instead")

# tf.image.rgb_to_grayscale's weights and convert_image_dtype's constants, all float32 as in TF.
_GRAY_WEIGHTS = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float32)
_FROM_UINT8 = torch.tensor(1.0 / 255, dtype=torch.float32)
_TO_UINT8 = torch.tensor(255.5, dtype=torch.float32)  # dtype.max + 0.5, then a truncating cast


def to_grayscale(planes: Tensor) -> Tensor:
    """LRA's grayscale pixels: ``(..., 3, P)`` uint8 RGB planes -> ``(..., P)`` uint8.

    ``trunc(255.5 * (0.2989 r + 0.5870 g + 0.1140 b))`` with ``r = R * float32(1/255)``, all in float32
    and summed left to right, as ``tf.image.rgb_to_grayscale`` computes it. TF sums with a matrix product
    whose rounding may differ in the last bit: 48 of the 2^24 colours can come out one level apart.
    """
    if planes.dtype != torch.uint8 or planes.dim() < 2 or planes.shape[-2] != 3:
        raise ValueError(f"planes must be a uint8 tensor of shape (..., 3, P), got {planes.dtype} "
                         f"{tuple(planes.shape)}")
    rgb = planes.to(torch.float32) * _FROM_UINT8  # (..., 3, P)
    w = _GRAY_WEIGHTS
    gray = rgb[..., 0, :] * w[0] + rgb[..., 1, :] * w[1] + rgb[..., 2, :] * w[2]  # (..., P)
    return (gray * _TO_UINT8).to(torch.uint8)


def read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 binary file: ``(gray (n, 1024) uint8, labels (n,) int64)``.

    ``DataFormatError`` when the size is not a multiple of 3,073 bytes (naming the incomplete record) or a
    label is not in 0..9 (naming the record, counted from 0).
    """
    raw = bytearray(path.read_bytes())
    n, extra = divmod(len(raw), RECORD)
    if extra:
        raise DataFormatError(path, n, f"record {n} (counted from 0) is incomplete: the file has {len(raw)} "
                                       f"bytes, not a multiple of {RECORD} (1 label byte + 3072 pixel bytes)")
    if n == 0:
        return torch.empty(0, PIXELS, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    records = torch.frombuffer(raw, dtype=torch.uint8).view(n, RECORD)
    labels = records[:, 0].to(torch.int64)
    bad = (labels >= NUM_CLASSES).nonzero()
    if len(bad):
        i = int(bad[0])
        raise DataFormatError(path, i, f"record {i} (counted from 0) has label {int(labels[i])}, "
                                       f"not in 0..{NUM_CLASSES - 1}")
    planes = records[:, 1:].view(n, 3, PIXELS)  # (n, 3, 1024): R, G, B planes, each row-major
    return to_grayscale(planes), labels


class Image(Task):
    """CIFAR-10 as 1,024 grayscale pixel tokens (values 0-255), 10 classes, CLS pooling."""

    name = "image"
    num_classes = NUM_CLASSES
    vocab_size = 256
    pooling = "cls"

    @property
    def seq_len(self) -> int:
        return PIXELS

    def _folder(self, split: str) -> Path:
        names = TEST_FILES if check_split(split) == "test" else TRAIN_FILES
        folder = locate(self.data_dir, SUBDIRS, names)
        if folder is None:
            pickled = any((self.data_dir / d).is_dir() for d in ("cifar-10-batches-py", "cifar-10-python"))
            pickled = pickled or (self.data_dir / "data_batch_1").is_file()
            raise missing(self.name, self.data_dir, SUBDIRS, TRAIN_FILES + TEST_FILES, SOURCE,
                          hint=PICKLE_HINT if pickled else "")
        return folder

    def _check_files(self, split: str) -> None:
        self._folder(split)

    def load(self, split: str) -> Split:
        """``train``: first 90% of ``data_batch_1..5``; ``val``: the last 10%; ``test``: ``test_batch``."""
        folder = self._folder(split)
        names = TEST_FILES if split == "test" else TRAIN_FILES
        parts = [read_batch(folder / name) for name in names]
        gray = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if split != "test":
            n_train = (len(labels) * TRAIN_PERCENT + 50) // 100  # rounded: 45,000 of 50,000
            keep = slice(0, n_train) if split == "train" else slice(n_train, None)
            gray, labels = gray[keep], labels[keep]
        tokens = gray.to(torch.int16)
        lengths = torch.full((len(labels),), PIXELS, dtype=torch.int64)
        return Split(tokens, lengths, labels.clone())
