"""Byte-level language-model corpora (vocabulary 256) and Transformer-XL style batching.

No network: the data is either a raw enwik8-style file the user has (or the official ``enwik8.zip``), or a
default corpus built from the running Python's standard library sources, which every machine has.

Notation: B streams (the batch), L bytes per stream, S the segment length (inputs per step).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor


class SplitSizes(NamedTuple):
    """Bytes in each split (a tuple, so ``train, valid, test = sizes`` works as well)."""

    train: int
    valid: int
    test: int


ENWIK8_SPLIT = SplitSizes(90_000_000, 5_000_000, 5_000_000)
_MIN_BYTES = 1000  # below this the 5% valid/test splits are too small to mean anything
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "__pycache__"}


def split_sizes(total: int) -> SplitSizes:
    """Sizes ``(train, valid, test)`` in bytes for a corpus of ``total`` bytes.

    ``total >= 100_000_000``: the enwik8 convention ``ENWIK8_SPLIT``, 90M/5M/5M from the start, the rest
    ignored (so published enwik8 numbers stay comparable). Smaller corpora: 90%/5%/5%, with
    ``valid = test = total * 5 // 100`` and train taking what the rounding leaves.
    Raises ValueError for fewer than 1000 bytes.
    """
    if total < _MIN_BYTES:
        raise ValueError(f"corpus too small: {total} bytes, need at least {_MIN_BYTES}")
    if total >= sum(ENWIK8_SPLIT):
        return ENWIK8_SPLIT
    held_out = total * 5 // 100
    return SplitSizes(total - 2 * held_out, held_out, held_out)


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no boolean ==
class Corpus:
    """A byte corpus cut into three contiguous splits, in file order: train, then valid, then test."""

    name: str  # short label for logs and result tables, e.g. "enwik8", "python-stdlib-3.11"
    train: Tensor  # (n_train,) uint8
    valid: Tensor  # (n_valid,) uint8
    test: Tensor  # (n_test,) uint8
    fingerprint: str  # first 16 hex digits of sha256 over the whole source, ignored tail included
    source: str  # where the bytes came from: a path, or a path and zip member

    def split(self, name: str) -> Tensor:
        """The split called ``name``: "train", "valid" (or "val") or "test"."""
        splits = {"train": self.train, "valid": self.valid, "val": self.valid, "test": self.test}
        if name not in splits:
            raise ValueError(f"split must be one of 'train', 'valid' ('val'), 'test'; got {name!r}")
        return splits[name]

    @property
    def sizes(self) -> SplitSizes:
        """``(train, valid, test)`` lengths in bytes."""
        return SplitSizes(len(self.train), len(self.valid), len(self.test))


def from_bytes(data: bytes, *, name: str, source: str) -> Corpus:
    """Cut ``data`` into train/valid/test with ``split_sizes(len(data))``; the splits share one buffer."""
    sizes = split_sizes(len(data))
    # One copy, of the used prefix only: frombuffer needs a writable buffer, and a >100M file's ignored
    # tail should not stay alive behind the views.
    flat = torch.frombuffer(bytearray(memoryview(data)[:sum(sizes)]), dtype=torch.uint8)
    train, valid, test = flat.split(sizes)
    return Corpus(name=name, train=train, valid=valid, test=test,
                  fingerprint=hashlib.sha256(data).hexdigest()[:16], source=source)


def read_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Read a raw byte file (enwik8-style: any bytes), or a ``.zip`` holding exactly one file.

    The official ``enwik8.zip`` holds the single file ``enwik8``; it is read straight from the archive.
    The corpus is named after the file (the member, for a zip). Raises FileNotFoundError for a missing
    path and ValueError for an empty file or a zip without exactly one file, naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [info.filename for info in archive.infolist() if not info.is_dir()]
            if len(members) != 1:
                raise ValueError(f"{path}: a corpus zip must hold exactly one file, found {len(members)}: "
                                 f"{members[:5]}")
            name, data, source = Path(members[0]).name, archive.read(members[0]), f"{path} ({members[0]})"
    else:
        name, data, source = path.name, path.read_bytes(), str(path)
    if not data:
        raise ValueError(f"corpus file is empty: {source}")
    return from_bytes(data, name=name, source=source)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every ``*.py`` under the standard library directory, sorted by relative POSIX path.

    Third-party packages (``site-packages``, ``dist-packages``) and ``__pycache__`` are left out, so the list
    (and the corpus) is the same on every machine with the same Python version.
    """
    root = _stdlib_dir()
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*.py")
             if p.is_file() and not _EXCLUDED_PARTS & set(p.relative_to(root).parts)}
    return [files[rel] for rel in sorted(files)]


@functools.lru_cache(maxsize=None)
def stdlib_corpus() -> Corpus:
    """The standard library sources (``stdlib_files()`` order, raw bytes, no separators) as a corpus.

    About 31 MB for CPython 3.11. Memoised, as reading it takes about a second: every call returns the
    same Corpus, whose tensors must not be modified in place.
    """
    data = b"".join(p.read_bytes() for p in stdlib_files())
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return from_bytes(data, name=f"python-stdlib-{version}", source=str(_stdlib_dir()))


def load_corpus(spec: str | os.PathLike[str] | None) -> Corpus:
    """``None`` or ``"stdlib"``: ``stdlib_corpus()``; anything else is a path for ``read_corpus``.

    (A file actually called ``stdlib`` is reached as ``"./stdlib"``.)
    """
    if spec is None or spec == "stdlib":
        return stdlib_corpus()
    return read_corpus(spec)


def unigram_bits_per_byte(train: Tensor, data: Tensor) -> float:
    """Cross-entropy of ``data`` in bits per byte under ``train``'s byte frequencies, add-one smoothed.

    ``p(b) = (count_train(b) + 1) / (len(train) + 256)``; the result is ``-mean(log2 p(data))``. A model
    that ignores context can do no better, so a trained LM must come in below it (8.0 is a uniform guess).
    ``train`` and ``data`` are 1-D tensors of byte values (any integer dtype, values 0..255).
    """
    if data.numel() == 0:
        raise ValueError("data is empty: bits per byte needs at least one byte")
    counts = [torch.bincount(t.reshape(-1), minlength=256) for t in (train, data)]
    if any(len(c) > 256 for c in counts):
        raise ValueError("train and data must hold byte values 0..255")
    log_p = torch.log2((counts[0] + 1).double() / (train.numel() + 256))
    return -(counts[1].double() * log_p).sum().item() / data.numel()


def streams(data: Tensor, batch: int) -> Tensor:
    """Cut 1-D ``data`` into ``batch`` contiguous streams of equal length L: ``(batch, L)``, same dtype.

    Row b is ``data[b * L:(b + 1) * L]`` with ``L = len(data) // batch``; the remainder at the end is
    dropped. A view of ``data`` when it is contiguous. Raises ValueError when L < 2 (a stream needs an
    input and a target).
    """
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    length = len(data) // batch
    if length < 2:
        raise ValueError(f"data of {len(data)} bytes is too short for batch={batch}: streams of {length} < 2")
    return data[:batch * length].reshape(batch, length)  # (B, L)


def num_segments(length: int, seg_len: int) -> int:
    """How many segments of ``seg_len`` inputs (targets shifted by one) fit in a stream of ``length``."""
    if seg_len < 1:
        raise ValueError(f"seg_len must be >= 1, got {seg_len}")
    return max(0, (length - 1) // seg_len)


def segment(streams: Tensor, index: int, seg_len: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets of segment ``index``: both ``(B, seg_len)`` int64.

    With ``s = index * seg_len``: ``inputs = streams[:, s:s + seg_len]``, ``targets = streams[:, s + 1:
    s + 1 + seg_len]``. Consecutive indices are consecutive text in every row, which is what lets
    Transformer-XL carry its memory from one segment to the next. For L = 7, seg_len = 3 (positions 0..6)::

        index 0: inputs 0 1 2  targets 1 2 3
        index 1: inputs 3 4 5  targets 4 5 6

    A tail shorter than a segment is never an input, so every step has the same shape (at most
    ``seg_len`` positions per stream go unused). Raises IndexError outside ``[0, num_segments(L, seg_len))``.
    """
    count = num_segments(streams.shape[1], seg_len)
    if not 0 <= index < count:
        raise IndexError(f"segment index {index} out of range: {count} segments of {seg_len} in length "
                         f"{streams.shape[1]}")
    start = index * seg_len
    inputs = streams[:, start:start + seg_len].long()  # (B, S)
    targets = streams[:, start + 1:start + 1 + seg_len].long()  # (B, S)
    return inputs, targets
