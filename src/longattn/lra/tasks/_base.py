"""What every Long Range Arena task provides: its shape (length, classes, vocabulary, pooling) and splits.

A task reads the official release files from its data folder; ListOps and Pathfinder can also write
those files themselves (``generate``, with the generators of ``longattn.datasets``), so the whole benchmark
runs without a download. Examples are held
in memory as one padded token matrix per split (``Split``), which the runner slices into batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...datasets.files import SPLITS, MissingDataError

PAD = 0  # token id of padding; which positions are real is given by ``Split.lengths``, never by the id


@dataclass
class Split:
    """One split in memory: ``n`` examples padded with ``PAD`` to the task's length ``L``.

    ``tokens2``/``lengths2`` hold the second document of pair tasks (Retrieval), else ``None``.
    """

    tokens: Tensor  # (n, L) integer token ids (int16 or wider), padded with PAD
    lengths: Tensor  # (n,) int64: real tokens per row (images: always L)
    labels: Tensor  # (n,) int64 class ids in [0, num_classes)
    tokens2: Tensor | None = None  # (n, L) second document of a pair
    lengths2: Tensor | None = None  # (n,)

    def __post_init__(self):
        n = self.tokens.shape[0]
        if self.tokens.dim() != 2 or self.lengths.shape != (n,) or self.labels.shape != (n,):
            raise ValueError(f"Split: tokens must be (n, L) with lengths and labels (n,), got "
                             f"{tuple(self.tokens.shape)}, {tuple(self.lengths.shape)}, {tuple(self.labels.shape)}")
        if (self.tokens2 is None) != (self.lengths2 is None):
            raise ValueError("Split: tokens2 and lengths2 come together")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def pair(self) -> bool:
        return self.tokens2 is not None

    def subset(self, index: Tensor | slice) -> "Split":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Split(self.tokens[index], self.lengths[index], self.labels[index], pick(self.tokens2),
                     pick(self.lengths2))


def pad_rows(rows: list[list[int]] | list[bytes], length: int, *, dtype=torch.int16) -> tuple[Tensor, Tensor]:
    """Token rows (lists of ids, or bytes) cut to ``length`` and padded: ``(tokens (n, length), lengths (n,))``."""
    tokens = torch.full((len(rows), length), PAD, dtype=dtype)
    lengths = torch.empty(len(rows), dtype=torch.int64)
    for r, row in enumerate(rows):
        row = row[:length]
        if len(row):
            tokens[r, : len(row)] = torch.as_tensor(list(row) if isinstance(row, bytes) else row, dtype=dtype)
        lengths[r] = len(row)
    return tokens, lengths


class Task(ABC):
    """A Long Range Arena task over the files in ``data_dir``.

    Subclasses set the class attributes and implement ``seq_len`` and ``load``; generating tasks
    (ListOps, Pathfinder) also implement ``generate``, which writes the official format into ``data_dir``.
    """

    name: str  # registry key, e.g. "listops"
    num_classes: int
    vocab_size: int  # token ids are in [0, vocab_size)
    pooling: str  # LRA's classifier pooling for this task: "cls" or "mean"
    pair: bool = False  # two documents per example, classified from both (Retrieval)
    can_generate: bool = False

    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir)

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Padded length L of every example (a pair task: of each document)."""

    @abstractmethod
    def load(self, split: str) -> Split:
        """Read one of ``SPLITS``; ``MissingDataError`` if absent, ``DataFormatError`` if malformed."""

    def available(self) -> bool:
        """Whether ``load`` can read every split from ``data_dir``."""
        try:
            for split in SPLITS:
                self._check_files(split)
        except MissingDataError:
            return False
        return True

    def _check_files(self, split: str) -> None:
        """Raise ``MissingDataError`` when ``split``'s files are absent (default: ``load`` succeeds)."""
        self.load(split)

    def generate(self, *, seed: int = 0, **settings) -> None:
        """Write a synthetic dataset in the official format into ``data_dir`` (generating tasks only)."""
        raise NotImplementedError(f"task {self.name!r} has no generator: it reads the official files")

    def statistics(self) -> dict:
        """Summary statistics of the data (lengths, label balance, task-specific ones) as a JSON-able dict."""
        stats = {}
        for split in SPLITS:
            data = self.load(split)
            counts = torch.bincount(data.labels, minlength=self.num_classes)
            stats[split] = {
                "examples": len(data),
                "length_min": int(data.lengths.min()) if len(data) else 0,
                "length_mean": float(data.lengths.float().mean()) if len(data) else 0.0,
                "length_max": int(data.lengths.max()) if len(data) else 0,
                "label_share": [round(c / max(len(data), 1), 4) for c in counts.tolist()],
            }
        return stats


def check_length(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CappedTask(Task):
    """A task whose rows are cut to ``max_length`` tokens (ListOps, Text, Retrieval); ``seq_len`` is that cap."""

    default_length: int

    def __init__(self, data_dir: Path | str, *, max_length: int | None = None):
        super().__init__(data_dir)
        self.max_length = check_length(self.default_length if max_length is None else max_length, "max_length")

    @property
    def seq_len(self) -> int:
        return self.max_length
