"""LRA Pathfinder and Path-X as a task: the images of ``longattn.datasets.pathfinder`` read as pixel sequences.

LRA (``lra_benchmarks/data/pathfinder.py``) trains ``pathfinder32_hard`` and ``pathfinder128_hard`` (Path-X).
Tokens are the raw pixel values 0..255 in row-major order (``vocab_size = 256``), no normalisation, and the
classifier pools by ``MEAN`` (``classifier_pool`` in ``configs/pathfinder32/base_pathfinder32_config.py``).
The splits, the release layout and the generator are the data set's (see there).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...datasets.files import SPLITS, check_split
from ...datasets.pathfinder import PathfinderData, PathfinderSettings
from ._base import Split, Task


class Pathfinder(Task):
    """LRA Pathfinder at ``resolution`` (32: "Pathfinder", 128: "Path-X"; any >= 16 for generated data),
    reading ``<data_dir>/pathfinder<resolution>/<difficulty folder>/`` (or that folder given directly).

    Tokens are the 8-bit gray levels in row-major order, ``resolution**2`` per image; label 1 when the two
    markers lie on one path. ``difficulty``: ``easy``, ``intermediate`` or ``hard`` (LRA's choice).
    """

    name = "pathfinder32"
    num_classes = 2
    vocab_size = 256
    pooling = "mean"
    can_generate = True

    def __init__(self, data_dir: Path | str, resolution: int = 32, *, difficulty: str = "hard"):
        super().__init__(data_dir)
        hint = f"or write a synthetic set: longattn lra generate --task pathfinder{resolution} --data-dir DIR"
        self.data = PathfinderData(data_dir, resolution, difficulty=difficulty, hint=hint)
        self.resolution, self.folder, self.name = resolution, self.data.folder, self.data.name

    @property
    def seq_len(self) -> int:
        return self.resolution ** 2

    def _check_files(self, split: str) -> None:
        check_split(split)
        self.data.root()

    def load(self, split: str) -> Split:
        images = self.data.load(split)
        n = len(images.labels)
        tokens = images.images.reshape(n, self.seq_len).to(torch.int16)
        return Split(tokens, torch.full((n,), self.seq_len, dtype=torch.int64), images.labels)

    def generate(self, *, seed: int = 0, preset: str = "official", settings: PathfinderSettings | None = None,
                 workers: int = 1, progress: bool | None = None, **overrides) -> None:
        """Write a synthetic set in the release layout (``PathfinderData.generate``, same arguments)."""
        self.data.generate(seed=seed, preset=preset, settings=settings, workers=workers, progress=progress,
                           **overrides)

    def statistics(self) -> dict:
        """Per split: examples, lengths, label shares (from the metadata, without decoding images); then the
        data set's summary (``PathfinderData.statistics``)."""
        stats = self.data.statistics()
        for split in SPLITS:
            n, share = stats[split]["examples"], stats[split]["label_share"]
            stats[split] = {"examples": n, "length_min": self.seq_len if n else 0,
                            "length_mean": float(self.seq_len) if n else 0.0, "length_max": self.seq_len if n else 0,
                            "label_share": share}
        return stats


__all__ = ["Pathfinder"]
