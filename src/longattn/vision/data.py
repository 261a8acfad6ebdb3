"""Image classification data the project generates: Pathfinder images (``datasets.pathfinder``) as pictures.

LRA reads Pathfinder as a pixel sequence; a vision backbone reads the same images as ``(1, R, R)`` maps.
The set is generated once into ``data_dir`` (deterministic for the seed) and reused while its settings match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..datasets.pathfinder import PathfinderData

PRESETS = ("simple", "official")


@dataclass(frozen=True)
class ImageData:
    """One split in memory."""

    images: Tensor  # (n, 1, R, R) uint8
    labels: Tensor  # (n,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, index: Tensor, device: torch.device, *, channels_last: bool = True) -> tuple[Tensor, Tensor]:
        """Images as floats in [-1, 1] (the paths are bright on black) and their labels."""
        x = self.images[index].to(device, torch.float32).div_(127.5).sub_(1.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[index].to(device)


def pathfinder_images(data_dir: Path | str, *, resolution: int, preset: str = "simple", examples: int = 6000,
                      difficulty: str = "hard", seed: int = 0, log=print) -> dict[str, ImageData]:
    """Train/val/test splits (80/10/10) of generated Pathfinder images, generating them when missing.

    ``preset``: ``"simple"`` (markers on the two ends of one short path vs. anywhere: learnable in minutes)
    or ``"official"`` (LRA's settings scaled to ``resolution``, paths of 6 / 9 / 14 dashes for ``difficulty``
    easy / intermediate / hard: the hard set needs long training).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    name = preset if preset == "simple" else f"{preset}-{difficulty}"
    folder = Path(data_dir) / f"pathfinder{resolution}-{name}-{examples}-seed{seed}"
    pathfinder = PathfinderData(folder, resolution, difficulty=difficulty)
    done = folder / "complete"  # written last: a generation killed half-way is redone
    if not done.exists():
        log(f"generating {examples} Pathfinder images ({name}, {resolution}x{resolution}) into {folder} ...")
        pathfinder.generate(seed=seed, preset=preset, examples=examples, workers=2)
        done.write_text("")
    out = {}
    for split in ("train", "val", "test"):
        data = pathfinder.load(split)
        out[split] = ImageData(data.images[:, None], data.labels)  # (n, 1, R, R)
    return out
