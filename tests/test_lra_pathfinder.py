"""Pathfinder / Path-X: the generator (labels, determinism, connectivity) and the loader of the release layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longattn.lra.tasks import SPLITS, DataFormatError, MissingDataError, get_task
from longattn.datasets.pathfinder import PathfinderData, PathfinderSettings, split_bounds
from longattn.lra.tasks.pathfinder import Pathfinder

HARD = "curv_contour_length_14"


def _generated(root: Path, resolution: int, **overrides) -> Pathfinder:
    task = Pathfinder(root, resolution=resolution)
    task.generate(seed=3, preset="simple", **{"examples": 40, **overrides})
    return task


def _geometry(task: Pathfinder) -> list[tuple[str, int, np.ndarray]]:
    """(png name, label, markers (2, 2)) per generated image, from geometry/<k>.txt."""
    rows = []
    for line in (task.data_dir / f"pathfinder{task.resolution}" / HARD / "geometry" / "0.txt").read_text().splitlines():
        f = line.split()
        rows.append((f[0], int(f[1]), np.array([float(v) for v in f[2:6]]).reshape(2, 2)))
    return rows


def _connected(drawn: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether pixels a and b are joined through drawn pixels (8-neighbourhood)."""
    reach = np.zeros_like(drawn)
    reach[a] = True
    while True:
        grown = np.pad(reach, 1)
        grown = np.stack([grown[1 + dy: grown.shape[0] - 1 + dy, 1 + dx: grown.shape[1] - 1 + dx]
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)]).any(0) & drawn
        if (grown == reach).all():
            return bool(reach[b])
        reach = grown


@pytest.mark.parametrize("resolution", [16, 32])
def test_generate_then_load(tmp_path, resolution):
    task = _generated(tmp_path, resolution)
    assert (task.name, task.seq_len, task.vocab_size, task.num_classes, task.pooling) == (
        f"pathfinder{resolution}", resolution ** 2, 256, 2, "mean")
    sizes = {split: hi - lo for split, (lo, hi) in split_bounds(40).items()}
    assert sizes == {"train": 32, "val": 4, "test": 4}  # LRA's 80/10/10
    for split in SPLITS:
        data = task.load(split)
        assert data.tokens.shape == (sizes[split], resolution ** 2) and data.tokens.dtype == torch.int16
        assert (data.lengths == resolution ** 2).all()
        assert 0 <= int(data.tokens.min()) and int(data.tokens.max()) == 255  # markers are white
        assert int(data.labels.sum()) * 2 == sizes[split]  # exactly half positive
    assert task.available()


def test_the_data_set_reads_the_pictures_that_the_task_reads_as_pixel_sequences(tmp_path):
    task = _generated(tmp_path, 16)
    data, split = PathfinderData(tmp_path, 16).load("val"), task.load("val")
    assert data.images.shape == (4, 16, 16) and data.images.dtype == torch.uint8
    assert torch.equal(data.images.reshape(4, 256).to(torch.int16), split.tokens)
    assert torch.equal(data.labels, split.labels)


def test_generate_is_deterministic(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        Pathfinder(tmp_path / name, resolution=16).generate(seed=seed, preset="simple", examples=24)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
    # processes do not change the output: each folder has its own random stream
    Pathfinder(tmp_path / "d", resolution=16).generate(seed=3, preset="simple", examples=24, images_per_folder=10,
                                                       workers=2)
    Pathfinder(tmp_path / "e", resolution=16).generate(seed=3, preset="simple", examples=24, images_per_folder=10)
    assert files(tmp_path / "d") == files(tmp_path / "e")


@pytest.mark.parametrize("resolution, longer", [(16, {}), (32, {}), (32, {"contour_length": 6, "seed_distance": 7.0})])
def test_markers_are_joined_exactly_on_positives(tmp_path, resolution, longer):
    # solid paths (no gaps) and no distractors, clearance beyond what antialiasing can bridge diagonally;
    # ``longer``: targets of 6 paddles that start 7 px apart and wind around each other, as in the original
    overrides = {"examples": 16, "clearance": 3.0, "paddle_length": 2.0, "paddle_width": 1.0, "marker_radius": 1.5}
    task = _generated(tmp_path, resolution, **overrides, **longer)
    folder = tmp_path / f"pathfinder{resolution}" / HARD / "imgs" / "0"
    for png, label, markers in _geometry(task):
        drawn = np.asarray(Image.open(folder / png)) > 0
        a, b = (tuple(int(v) for v in np.rint(m)) for m in markers)
        assert drawn[a] and drawn[b]
        assert _connected(drawn, a, b) == bool(label), png


def test_official_settings_draw_hard_images(tmp_path):
    settings = PathfinderSettings.official(32)
    assert (settings.contour_length, settings.paddle_length, settings.paddle_gap, settings.marker_radius,
            settings.seed_distance, settings.max_turn_deg) == (14, 2.0, (2.0,), 1.5, 7.0, 90.0)
    assert PathfinderSettings.official(128).paddle_gap == (4.0, 6.0)
    assert PathfinderSettings.official(32, "easy").contour_length == 6
    task = Pathfinder(tmp_path, resolution=32)
    task.generate(seed=0, examples=10)
    data = task.load("train")
    assert data.tokens.shape == (8, 1024) and int(data.labels.sum()) == 4
    stats = task.statistics()["pathfinder"]
    assert stats["contour_length_paddles"] == {"14": 10} and stats["path_length_px"] == {"54": 10}


def _png(path: Path, size: int, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size), value, np.uint8)
    pixels[0, 1] = 200  # row-major order check
    Image.fromarray(pixels).save(path)


def _release(root: Path, lines_per_file: dict[str, list[str]], size: int = 32) -> Path:
    """A tiny tree in the release layout: pathfinder32/curv_contour_length_14/{imgs,metadata}."""
    base = root / "pathfinder32" / HARD
    for name, lines in lines_per_file.items():
        (base / "metadata").mkdir(parents=True, exist_ok=True)
        (base / "metadata" / name).write_text("".join(line + "\n" for line in lines))
        for line in lines:
            folder, png, index = line.split()[:3]
            if not (base / folder / png).exists():
                _png(base / folder / png, size, int(index))
    return base


def _line(k: int, n: int, label: int) -> str:
    return f"imgs/{k} sample_{n}.png {n} {label} 1.0 14 4 2 0.5 1 1"


def test_loader_reads_the_release_layout(tmp_path):
    # 20 lines over metadata files 0, 2, 10 and 11 (numeric order; 11 a binary .npy as snakes2.py saves it),
    # one PNG empty as in the release
    files = {"0.npy": [_line(0, n, n % 2) for n in range(8)], "10.npy": [_line(10, n, 1) for n in range(20, 22)],
             "2.npy": [_line(2, n, 0) for n in range(8, 16)]}
    base = _release(tmp_path, files)
    np.save(base / "metadata" / "11.npy", np.array([_line(11, n, n % 2).split() for n in range(30, 32)]))
    for n in range(30, 32):
        _png(base / "imgs" / "11" / f"sample_{n}.png", 32, n)
    (base / "imgs" / "2" / "sample_9.png").write_bytes(b"")  # dropped, as LRA filters empty images
    for data_dir in (tmp_path, tmp_path / "pathfinder32", base):
        task = get_task("pathfinder32", data_dir)
        train, val, test = (task.load(split) for split in SPLITS)
        assert (len(train), len(val), len(test)) == (15, 2, 2)  # 20 lines cut 80/10/10 in file order, less one
        assert train.tokens[:, 1].tolist() == [200] * 15  # row-major: pixel (0, 1) is token 1
        assert train.tokens[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15]
        assert train.labels.tolist() == [0, 1] * 4 + [0] * 7
        assert val.tokens[:, 0].tolist() == [20, 21] and val.labels.tolist() == [1, 1]
        assert test.tokens[:, 0].tolist() == [30, 31] and test.labels.tolist() == [0, 1]
    stats = task.statistics()
    assert stats["train"]["examples"] == 15 and stats["pathfinder"]["marker_distance_px"]["positive"] is None
    assert stats["pathfinder"]["contour_length_paddles"] == {"14": 20} and stats["pathfinder"]["generated"] is None


@pytest.mark.parametrize("line, problem", [
    ("imgs/0 sample_0.png 0", "at least 4"),
    ("imgs/0 sample_0.png 0 2 1.0 14 4 2 0.5 1 1", "not in 0..1"),
    ("imgs/0 sample_0.png 0 yes 1.0 14 4 2 0.5 1 1", "not an integer"),
    ("imgs/0 sample_9.png 9 1 1.0 14 4 2 0.5 1 1", "does not exist"),
    ("imgs/9 sample_9.png 9 1 1.0 14 4 2 0.5 1 1", "expected 32 x 32"),
])
def test_malformed_metadata_names_file_and_line(tmp_path, line, problem):
    base = _release(tmp_path, {"0.npy": [_line(0, n, n % 2) for n in range(3)]})
    _png(base / "imgs" / "9" / "sample_9.png", 16, 0)  # wrong size
    path = base / "metadata" / "0.npy"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(DataFormatError, match=problem) as info:
        for split in SPLITS:
            Pathfinder(tmp_path).load(split)
    assert (info.value.path, info.value.line) == (path, 4)
    assert f"{path}:4" in str(info.value)


def test_missing_files_say_where_and_how_to_generate(tmp_path):
    task = get_task("pathx", tmp_path)
    assert (task.name, task.seq_len) == ("pathfinder128", 128 * 128)
    assert not task.available()
    with pytest.raises(MissingDataError, match="metadata/<k>.npy") as info:
        task.load("train")
    assert "longattn lra generate --task pathfinder128 --data-dir" in str(info.value)
    assert "pathfinder128/curv_contour_length_14" in str(info.value)


def test_statistics_of_generated_data(tmp_path):
    task = _generated(tmp_path, 16)
    stats = task.statistics()
    json.dumps(stats)
    assert set(stats) == {"train", "val", "test", "pathfinder"}
    assert stats["train"]["label_share"] == [0.5, 0.5] and stats["train"]["length_max"] == 256
    info = stats["pathfinder"]
    for key in ("contour_length_paddles", "distractor_length_paddles", "path_length_px", "marker_distance_px",
                "distractors_drawn", "generated"):
        assert key in info
    pos, neg = info["marker_distance_px"]["positive"], info["marker_distance_px"]["negative"]
    assert pos["count"] == neg["count"] == 20 and set(pos) == {"count", "mean", "min", "q10", "q50", "q90", "max"}
    # one path (2 paddles of 2 px) against the clearance; positions are stored to 0.01 px
    assert pos["max"] <= 2 * 2.0 + 0.02 and neg["min"] >= 2 * 1.5 + 2.5 - 0.02
    settings = PathfinderSettings.from_json(info["generated"]["settings"])
    assert settings == PathfinderSettings.simple(16, examples=40)


def test_settings_and_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        Pathfinder(tmp_path, resolution=8)
    with pytest.raises(ValueError, match="difficulty"):
        Pathfinder(tmp_path, difficulty="medium-rare")
    assert Pathfinder(tmp_path, difficulty="easy").folder == "curv_baseline"
    with pytest.raises(ValueError, match="contour_length"):
        PathfinderSettings(contour_length=0)
    with pytest.raises(ValueError, match="seed_distance"):
        PathfinderSettings(seed_distance=1.0)
    with pytest.raises(ValueError, match="resolution"):
        Pathfinder(tmp_path, resolution=32).generate(settings=PathfinderSettings.simple(16))
    _release(tmp_path, {"0.npy": [_line(0, 0, 1)]})  # someone else's files
    with pytest.raises(FileExistsError, match="settings.json"):
        Pathfinder(tmp_path).generate(preset="simple", examples=4)
