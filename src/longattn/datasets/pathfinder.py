"""Pathfinder and Path-X: is there one path between the two marker dots? The release layout and a generator.

Images (Linsley et al. 2018; Kim, Linsley et al. 2020) show dashed curves ("paths") made of short line
segments ("paddles"). Two target paths grow from origins a small ``seed_distance`` apart; one marker dot
sits on the origin of one of them and a second on the far end of the same path (label 1) or of the other
path (label 0); shorter distractor paths fill the rest. Both classes hold the same curves; only where the
second marker sits differs. LRA reads the pixels row-major as ``resolution**2`` tokens
(``longattn.lra.tasks.pathfinder``); a vision backbone reads the same images as pictures (``longattn.vision``).

The release layout (``lra_release/pathfinder{32,64,128,256}``; Path-X is 128)::

    pathfinder32/curv_contour_length_14/imgs/<k>/sample_<n>.png     8-bit grayscale, 32 x 32
    pathfinder32/curv_contour_length_14/metadata/<k>.npy             TEXT, one line per image

A metadata line has 11 space-separated columns, written by ``accumulate_meta`` in the generator
(github.com/drewlinsley/pathfinder ``snakes2.py``)::

    imgs/<k> sample_<n>.png <n> <label> <continuity> <contour_length> <distractor_length>
    <paddle_length> <paddle_thickness> <paddle_margin> <number of paddle contrasts>

LRA (``lra_benchmarks/data/pathfinder.py``) uses columns 0 and 1 for the file and column 3 as the label.
What LRA does, reproduced here:

- difficulty folders: ``easy`` = ``curv_baseline`` (6 paddles), ``intermediate`` = ``curv_contour_length_9``,
  ``hard`` = ``curv_contour_length_14``; the benchmark trains ``pathfinder32_hard`` and ``pathfinder128_hard``;
- splits: TFDS slices ``hard[:80%]``, ``[80%:90%]``, ``[90%:]`` (``image/input_pipeline.py``); TFDS orders the
  examples by a key hash, which cannot be reproduced without TFDS, so the order here is fixed and documented:
  metadata files by the number in their name, lines in file order, then cut at 80% and 90%;
- images with an empty PNG file are dropped after the split (LRA filters ``length(image) > 0``; the release
  has one, ``pathfinder32/curv_baseline/imgs/0/sample_172.png``, listed by the S4 loader);
- tokens: the raw pixel values 0..255 (``vocab_size = 256``), no normalisation; pooling ``MEAN``
  (``classifier_pool`` in ``configs/pathfinder32/base_pathfinder32_config.py``, 160,000 training examples).

The generator re-implements that construction in numpy (none of the original's code), with the settings
that LRA's builder docstrings list per resolution (``PathfinderSettings.official``), and writes the same
layout plus ``settings.json`` and ``geometry/<k>.txt`` (marker positions per image) for ``statistics``.
With those settings the marker distance says little about the label (both targets start a few pixels
apart), so a model has to follow the paths. ``PathfinderSettings.simple`` is a toy for quick demos whose
positives are told apart by distance alone (see there).
"""

from __future__ import annotations

import io
import json
import math
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..io import write_text
from ..training.progress import progress_bar
from .files import DataFormatError, check_settings, check_split, locate, missing, parse_label
from .pathfinder_draw import draw

DIFFICULTIES = {"easy": "curv_baseline", "intermediate": "curv_contour_length_9", "inter": "curv_contour_length_9",
                "hard": "curv_contour_length_14"}
CONTOUR_LENGTH = {"curv_baseline": 6, "curv_contour_length_9": 9, "curv_contour_length_14": 14}
SPLIT_AT = (0.8, 0.9)  # LRA: train [:80%], val [80%:90%], test [90%:]
SOURCE = ("the LRA release https://storage.googleapis.com/long-range-arena/lra_release.gz "
          "(folder lra_release/pathfinder<resolution>/)")
# LRA's customisations per resolution (builder docstrings in lra_benchmarks/data/pathfinder.py): paddle length
# and thickness, margins, marker radius, seed distance, continuity, and the distractor budget B
# (``num_distractor_snakes = B // distractor_length``). Not listed, so inferred: 128 and 256 keep the
# generator's paddle length 5 (the later pathfinder-128 segmentation script sets 5 with the same margins); 64
# keeps the 2 of the 32 set, since with 5 two 14-paddle targets (98 px each) almost never fit in 64 px; 256
# keeps the seed distance 27. Intensities: paths are drawn at contrast c, markers at 1, and saving byte-scales
# the image to its maximum, so paths become 255 * c / max(c, 1) and markers 255 / max(c, 1).
_OFFICIAL = {  # res: (paddle_length, thickness, margins, marker_radius, seed_distance, continuity, budget, contrast)
    32: (2.0, 0.5, (1.0,), 1.5, 7.0, 1.0, 20, 1.5),
    64: (2.0, 1.0, (1.0,), 2.5, 12.0, 1.8, 22, 0.8),
    128: (5.0, 1.5, (2.0, 3.0), 3.0, 20.0, 1.8, 35, 0.9),
    256: (5.0, 2.0, (3.0,), 5.0, 27.0, 1.8, 30, 1.0),
}


@dataclass(frozen=True)
class PathfinderSettings:
    """How ``generate`` draws images. The defaults are LRA's ``pathfinder32`` hard set; ``official(...)`` gives
    those of each resolution and difficulty, ``simple(...)`` a toy that a tiny model learns in seconds."""

    resolution: int = 32  # image side in pixels (any >= 16; LRA: 32, 64, 128 = Path-X, 256)
    examples: int = 200_000  # images in all, split 80/10/10 in file order as LRA does
    contour_length: int = 14  # paddles per target path (LRA: 6 easy, 9 intermediate, 14 hard)
    paddle_length: float = 2.0  # length of one dash, pixels
    paddle_width: float = 0.5  # line thickness, pixels (drawn at least one sub-pixel wide)
    paddle_gap: tuple[float, ...] = (2.0,)  # gap between consecutive dashes; one value drawn per image (0: solid)
    max_turn_deg: float = 90.0  # largest turn between consecutive dashes (the original's 90 / continuity)
    distractors: int = 5  # distractor paths per image (fewer when no room is left)
    distractor_length: int = 4  # paddles per distractor (the original: contour_length // 3)
    seed_distance: float | None = 7.0  # distance between the two target origins; None: independent origins
    marker_radius: float = 1.5  # radius of the two marker discs, pixels
    path_intensity: int = 255  # gray level of the paths
    marker_intensity: int = 170  # gray level of the markers
    clearance: float = 2.0  # least gap between different paths/markers beyond their half-widths, pixels
    antialias: int = 2  # supersampling factor of the renderer (the original's antialias_scale)
    images_per_folder: int = 1000  # images per imgs/<k>/ and metadata/<k>.npy

    def __post_init__(self):
        for name in ("resolution", "examples", "contour_length", "distractors", "distractor_length", "antialias",
                     "images_per_folder", "path_intensity", "marker_intensity"):
            value, least = getattr(self, name), 0 if name == "distractors" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"PathfinderSettings.{name} must be an int >= {least}, got {value!r}")
        if self.resolution < 16:
            raise ValueError(f"PathfinderSettings.resolution must be >= 16, got {self.resolution}")
        for name in ("path_intensity", "marker_intensity"):
            if getattr(self, name) > 255:
                raise ValueError(f"PathfinderSettings.{name} must be in 1..255, got {getattr(self, name)}")
        for name in ("paddle_length", "paddle_width", "marker_radius", "max_turn_deg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PathfinderSettings.{name} must be > 0, got {getattr(self, name)!r}")
        if self.clearance < 0 or not self.paddle_gap or min(self.paddle_gap) < 0:
            raise ValueError(f"PathfinderSettings: clearance and paddle_gap must be >= 0 (paddle_gap a non-empty "
                             f"tuple), got {self.clearance!r}, {self.paddle_gap!r}")
        need = 2 * self.marker_radius + self.clearance
        if self.seed_distance is not None and self.seed_distance < need:
            raise ValueError(f"PathfinderSettings.seed_distance must be >= 2 * marker_radius + clearance = {need:g} "
                             f"(or None), got {self.seed_distance!r}")

    @classmethod
    def official(cls, resolution: int = 32, difficulty: str = "hard", **overrides) -> "PathfinderSettings":
        """LRA's settings for ``resolution`` (32, 64, 128 = Path-X, 256) and ``difficulty``. Another resolution
        scales every length of the nearest official one by the ratio of the sides (same paddle counts)."""
        folder = difficulty_folder(difficulty)
        ref = min(_OFFICIAL, key=lambda r: (abs(math.log(r / resolution)), r))
        length, width, margins, radius, seed, continuity, budget, contrast = _OFFICIAL[ref]
        x = resolution / ref
        contour = CONTOUR_LENGTH[folder]
        # The original advances paddle_length + 2 * margin per paddle, so dashes are 2 * margin apart; it keeps
        # different paddles apart by dilating both the placed and the new one by the margin: 2 * margin too.
        gaps = tuple(round(2 * m * x, 3) for m in margins)
        settings = cls(resolution=resolution, contour_length=contour, paddle_length=round(length * x, 3),
                       paddle_width=round(width * x, 3), paddle_gap=gaps, max_turn_deg=round(90.0 / continuity, 3),
                       distractors=budget // max(1, contour // 3), distractor_length=max(1, contour // 3),
                       seed_distance=round(seed * x, 3), marker_radius=round(radius * x, 3),
                       path_intensity=round(255 * contrast / max(contrast, 1)),
                       marker_intensity=round(255 / max(contrast, 1)), clearance=min(gaps),
                       antialias=2 * max(1, round(1 / x)))  # finer below the reference: lines stay thin
        return replace(settings, **overrides)

    @classmethod
    def simple(cls, resolution: int = 16, **overrides) -> "PathfinderSettings":
        """A toy that a 2-layer transformer learns in a few hundred steps at 16 x 16 (with fixed sinusoidal
        positions): two solid paths of two paddles, origins anywhere, no distractors, markers brighter than
        the paths. Its cue is genuine but easy: a positive pair of markers sits at the two ends of one short
        path, so at most its length (4 px at 16) apart, while a negative pair lies anywhere beyond the
        clearance (at least 2 * marker_radius + clearance = 5.5 px at 16). Lengths scale with the side."""
        x = resolution / 16
        settings = cls(resolution=resolution, examples=4000, contour_length=2, paddle_length=2.0 * x,
                       paddle_width=1.0 * x, paddle_gap=(0.0,), max_turn_deg=45.0, distractors=0, distractor_length=1,
                       seed_distance=None, marker_radius=1.5 * x, path_intensity=128, marker_intensity=255,
                       clearance=2.5 * x, antialias=2)
        return replace(settings, **overrides)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, values: dict) -> "PathfinderSettings":
        return cls(**{k: tuple(v) if k == "paddle_gap" else v for k, v in values.items()})


def difficulty_folder(difficulty: str) -> str:
    if difficulty in CONTOUR_LENGTH:
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)} (or a folder name "
                         f"{', '.join(CONTOUR_LENGTH)}), got {difficulty!r}")
    return DIFFICULTIES[difficulty]


def split_bounds(n: int) -> dict[str, tuple[int, int]]:
    """Index ranges of the LRA splits over ``n`` images in file order (percent cuts rounded to the closest)."""
    a, b = (int(n * f + 0.5) for f in SPLIT_AT)
    return {"train": (0, a), "val": (a, b), "test": (b, n)}


# ---- files: the release layout ---------------------------------------------------------------------------

def _write_folder(root: Path, s: PathfinderSettings, seed: int, k: int, labels: np.ndarray) -> int:
    """Draw and write ``imgs/<k>/`` and its ``metadata/<k>.npy`` (last, so that it marks the folder complete)."""
    rng = np.random.default_rng([seed, k])  # one stream per folder: the output does not depend on the workers
    n, res = len(labels), s.resolution
    which = rng.integers(0, len(s.paddle_gap), n)  # the original draws the margin per image
    pixels, markers, drawn = np.empty((n, res, res), np.uint8), np.empty((n, 2, 2)), np.empty(n, np.int64)
    chunk = max(8, min(256, (1 << 20) // res ** 2))
    for g, gap in enumerate(s.paddle_gap):
        idx = np.flatnonzero(which == g)
        for lo in range(0, len(idx), chunk):
            part = idx[lo: lo + chunk]
            pixels[part], markers[part], drawn[part] = draw(s, labels[part], gap, rng)
    (root / "imgs" / str(k)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(pixels[i]).save(root / "imgs" / str(k) / f"sample_{i}.png")  # uint8 (res, res): mode L
    geometry = [f"sample_{i}.png {labels[i]} {markers[i, 0, 0]:.2f} {markers[i, 0, 1]:.2f} {markers[i, 1, 0]:.2f} "
                f"{markers[i, 1, 1]:.2f} {drawn[i]}" for i in range(n)]
    write_text(root / "geometry" / f"{k}.txt", "\n".join(geometry) + "\n")
    # the original's columns; "margin" is half the gap between dashes, continuity 90 degrees / max turn
    tail = (f"{90 / s.max_turn_deg:g} {s.contour_length} {s.distractor_length} {s.paddle_length:g} "
            f"{s.paddle_width:g}")
    lines = [f"imgs/{k} sample_{i}.png {i} {labels[i]} {tail} {s.paddle_gap[which[i]] / 2:g} 1" for i in range(n)]
    write_text(root / "metadata" / f"{k}.npy", "\n".join(lines) + "\n")
    return n


def _metadata_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):  # a binary .npy string array, as snakes2.py itself saves metadata
        rows = np.atleast_2d(np.load(io.BytesIO(raw), allow_pickle=False))
        return [" ".join(str(v) for v in row) for row in rows]
    return raw.decode("utf-8", errors="replace").splitlines()


def _size(root: Path, entry) -> int:
    meta, number, fields, _ = entry
    try:
        return (root / fields[0] / fields[1]).stat().st_size
    except FileNotFoundError:
        raise DataFormatError(meta, number, f"names {root / fields[0] / fields[1]}, which does not exist") from None


def _numbers(fields: list[str]) -> list[float] | None:
    """The original's columns 4..9 (continuity .. margin) as numbers, or None where they are absent."""
    try:
        return [float(f) for f in fields] if len(fields) == 6 else None
    except ValueError:
        return None


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    v = np.asarray(values, float)
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return {"count": len(v), "mean": round(float(v.mean()), 3), "min": round(float(v.min()), 3),
            "q10": round(float(q[0]), 3), "q50": round(float(q[1]), 3), "q90": round(float(q[2]), 3),
            "max": round(float(v.max()), 3)}


def _histogram(values) -> dict:
    keys, counts = np.unique(np.asarray(list(values)), return_counts=True)
    return {f"{key:g}": int(c) for key, c in zip(keys, counts)}


@dataclass(frozen=True)
class PathfinderImages:
    """One split in memory."""

    images: Tensor  # (n, R, R) uint8 gray levels
    labels: Tensor  # (n,) int64: 1 when the two markers lie on one path


class PathfinderData:
    """The Pathfinder images of one ``resolution`` and ``difficulty`` in the release layout, under
    ``<data_dir>/pathfinder<resolution>/<difficulty folder>/`` (or that folder given directly): read, generated
    and summarised. ``hint`` is a last line for the ``MissingDataError`` of absent files (how to make them)."""

    def __init__(self, data_dir: Path | str, resolution: int = 32, *, difficulty: str = "hard", hint: str = ""):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
            raise ValueError(f"resolution must be an int >= 16, got {resolution!r}")
        self.data_dir, self.resolution, self.folder = Path(data_dir), resolution, difficulty_folder(difficulty)
        self.name, self.hint = f"pathfinder{resolution}", hint
        self.subdirs = (f"pathfinder{resolution}/{self.folder}", self.folder)

    def root(self) -> Path:
        """The folder holding ``metadata/`` and ``imgs/``; ``MissingDataError`` when there is none."""
        root = locate(self.data_dir, self.subdirs, ["metadata"])
        if root is None or not any((root / "metadata").glob("*.npy")):
            hint = "metadata/<k>.npy is text, one line per image: 'imgs/<k> sample_<n>.png <n> <label> ...'"
            raise missing(self.name, self.data_dir, self.subdirs, ["metadata/<k>.npy", "imgs/<k>/sample_<n>.png"],
                          SOURCE, f"{hint}; {self.hint}" if self.hint else hint)
        return root

    def entries(self, root: Path) -> list[tuple[Path, int, list[str], int]]:
        """``(metadata file, line number, columns, label)`` of every image, in LRA's split order."""
        number_first = lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name)  # noqa: E731
        files = sorted((root / "metadata").glob("*.npy"), key=number_first)
        entries = []
        for path in files:
            for number, line in enumerate(_metadata_lines(path), start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 4:
                    raise DataFormatError(path, number, f"expected at least 4 space-separated columns (folder, "
                                                        f"file, index, label), found {len(fields)}")
                entries.append((path, number, fields, parse_label(fields[3].encode(), 2, path, number)))
        return entries

    def load(self, split: str) -> PathfinderImages:
        """The images of one of ``SPLITS``; images with an empty file are dropped (LRA does)."""
        check_split(split)
        root = self.root()
        entries = self.entries(root)
        lo, hi = split_bounds(len(entries))[split]
        entries, res = entries[lo:hi], self.resolution
        pixels, labels = np.empty((len(entries), res, res), np.uint8), []
        bar = progress_bar(len(entries) >= 5000, total=len(entries), desc=f"{self.name} {split}", unit="img",
                           leave=False)
        for meta, number, fields, label in entries:
            bar.update()
            path = root / fields[0] / fields[1]
            try:
                with Image.open(path) as image:
                    if image.size != (res, res):
                        raise DataFormatError(meta, number, f"{fields[0]}/{fields[1]} is {image.size[0]} x "
                                                            f"{image.size[1]}, expected {res} x {res}")
                    pixels[len(labels)] = np.asarray(image.convert("L"))
            except FileNotFoundError:
                raise DataFormatError(meta, number, f"names {path}, which does not exist") from None
            except (UnidentifiedImageError, OSError) as error:
                if path.stat().st_size == 0:  # LRA drops empty images (the release has one)
                    continue
                raise DataFormatError(meta, number, f"{path} is not a readable image ({error})") from None
            labels.append(label)
        bar.close()
        return PathfinderImages(torch.from_numpy(pixels[:len(labels)]), torch.tensor(labels, dtype=torch.int64))

    def generate(self, *, seed: int = 0, preset: str = "official", settings: PathfinderSettings | None = None,
                 workers: int = 1, progress: bool | None = None, **overrides) -> None:
        """Write a synthetic set in the release layout into ``data_dir/pathfinder<res>/<difficulty folder>``.

        ``settings`` (default: ``PathfinderSettings.official(resolution, difficulty)``, or ``.simple(resolution)``
        with ``preset="simple"``) with ``overrides`` applied, e.g. ``examples=4000``. Deterministic for ``seed``
        whatever ``workers`` (processes). Replaces an earlier generated set; refuses to touch files it did not
        write (no ``settings.json``).
        """
        if settings is None:
            if preset not in ("official", "simple"):
                raise ValueError(f"preset must be 'official' or 'simple', got {preset!r}")
            settings = (PathfinderSettings.official(self.resolution, self.folder) if preset == "official"
                        else PathfinderSettings.simple(self.resolution))
        if "paddle_gap" in overrides:
            overrides["paddle_gap"] = tuple(np.atleast_1d(overrides["paddle_gap"]).tolist())
        check_settings(PathfinderSettings, overrides)
        s = replace(settings, **overrides)
        if s.resolution != self.resolution:
            raise ValueError(f"settings.resolution ({s.resolution}) must be the data's resolution {self.resolution}")
        root = locate(self.data_dir, self.subdirs, ["settings.json"]) or self.data_dir / self.subdirs[0]
        if (root / "metadata").exists() and not (root / "settings.json").exists():
            raise FileExistsError(f"{root} holds Pathfinder files that this generator did not write (no "
                                  f"settings.json); refusing to overwrite them")
        for sub in ("imgs", "metadata", "geometry"):
            shutil.rmtree(root / sub, ignore_errors=True)
        for sub in ("metadata", "geometry"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        write_text(root / "settings.json", json.dumps({"generator": "longattn", "seed": seed,
                                                       "settings": s.to_json()}, indent=1) + "\n")
        rng = np.random.default_rng(seed)
        labels = np.empty(s.examples, np.int64)
        for lo, hi in split_bounds(s.examples).values():  # half positive in every split, shuffled
            labels[lo:hi] = rng.permutation(np.arange(hi - lo) % 2)
        per = s.images_per_folder
        jobs = [(root, s, seed, k, labels[k * per: (k + 1) * per]) for k in range(math.ceil(s.examples / per))]
        bar = progress_bar(bool(progress or (progress is None and s.examples >= 2000)), total=s.examples,
                           desc=f"{self.name} generate", unit="img")
        with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
            for done in (pool.map if pool else map)(_write_folder, *zip(*jobs)):
                bar.update(done)
        bar.close()

    def statistics(self) -> dict:
        """Per split: ``examples`` and ``label_share`` (from the metadata, without decoding images); then under
        ``pathfinder`` the paths' lengths, distractors, marker distances of positives and negatives, and the
        generator's settings when the data was generated here."""
        root = self.root()
        entries = self.entries(root)
        stats = {}
        for split, (lo, hi) in split_bounds(len(entries)).items():
            part = [e for e in entries[lo:hi] if _size(root, e) > 0]  # LRA drops empty images
            positives = sum(e[3] for e in part)
            stats[split] = {"examples": len(part),
                            "label_share": [round((len(part) - positives) / max(len(part), 1), 4),
                                            round(positives / max(len(part), 1), 4)]}
        full = np.array([row for row in (_numbers(e[2][4:10]) for e in entries) if row], float).reshape(-1, 6)
        paddles, distractor, length, margin = full[:, 1], full[:, 2], full[:, 3], full[:, 5]
        info = {"resolution": self.resolution, "folder": self.folder, "images": len(entries),
                "contour_length_paddles": _histogram(paddles) if len(full) else None,
                "distractor_length_paddles": _histogram(distractor) if len(full) else None,
                # arc length of a target: its paddles and the gaps (2 * margin) between them
                "path_length_px": _histogram(np.round(paddles * length + (paddles - 1) * 2 * margin, 1))
                if len(full) else None}
        distances, drawn = {0: [], 1: []}, []
        for path in sorted((root / "geometry").glob("*.txt")) if (root / "geometry").is_dir() else []:
            for line in path.read_text(encoding="utf-8").splitlines():
                f = line.split()
                if len(f) == 7:
                    distances[int(f[1])].append(math.hypot(float(f[4]) - float(f[2]), float(f[5]) - float(f[3])))
                    drawn.append(int(f[6]))
        info["marker_distance_px"] = {"positive": _summary(distances[1]), "negative": _summary(distances[0])}
        info["distractors_drawn"] = _histogram(drawn) if drawn else None
        settings = root / "settings.json"
        info["generated"] = json.loads(settings.read_text(encoding="utf-8")) if settings.exists() else None
        stats["pathfinder"] = info
        return stats


__all__ = ["CONTOUR_LENGTH", "DIFFICULTIES", "SPLIT_AT", "PathfinderData", "PathfinderImages", "PathfinderSettings",
           "difficulty_folder", "split_bounds"]
