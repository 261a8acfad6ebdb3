"""longattn.io: atomic writes that honour the umask, JSON, the one Markdown table format."""

import json
import os
import stat
import sys

import pytest

from longattn.io import atomic_path, markdown_table, write_json, write_text

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


@posix_only
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_file_gets_mode_of_a_plain_open(tmp_path, umask, mask, mode):
    umask(mask)
    path = write_text(tmp_path / "report.md", "x\n")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() gives under the same umask
        f.write("x")
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


@posix_only
def test_writers_taking_a_file_name_keep_the_mode(tmp_path, umask):
    umask(0o022)
    with atomic_path(tmp_path / "sub" / "model.bin") as tmp:
        with open(tmp, "wb") as f:  # what save_file or savefig do: truncate and write
            f.write(b"\0" * 10)
    assert stat.S_IMODE((tmp_path / "sub" / "model.bin").stat().st_mode) == 0o644


@posix_only
def test_writers_that_replace_the_file_keep_the_mode(tmp_path, umask):
    """safetensors writes its own 0600 temp file and renames it over ours: the umask's mode comes back."""
    umask(0o022)
    with atomic_path(tmp_path / "weights.bin") as tmp:
        other = tmp_path / "private"
        fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.replace(other, tmp)
    assert stat.S_IMODE((tmp_path / "weights.bin").stat().st_mode) == 0o644


@posix_only
def test_training_checkpoints_honour_the_umask(tmp_path, umask):
    import torch

    from longattn.training import checkpoint

    umask(0o022)
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save(path, {"step": 3, "model": {"w": torch.ones(2)}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_error_leaves_old_file_and_no_temp(tmp_path):
    path = write_text(tmp_path / "result.json", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_replace_and_json(tmp_path):
    path = tmp_path / "a" / "b.json"
    write_json(path, {"x": [1, 2]})
    write_json(path, {"y": 3.5})
    assert json.loads(path.read_text()) == {"y": 3.5}
    assert path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_text_is_written_byte_for_byte(tmp_path):
    path = write_text(tmp_path / "t.tsv", "a\tb\r\nc\r\n")
    assert path.read_bytes() == b"a\tb\r\nc\r\n"


def test_markdown_table_plain():
    table = markdown_table(["model", "acc", "note"], [["full", 0.5, None], ["local", 0.25, ""]], formats=".2f")
    assert table == ("| model | acc | note |\n|---|---|---|\n| full | 0.50 | - |\n| local | 0.25 |  |")


def test_markdown_table_padded_and_aligned():
    table = markdown_table(["name", "ms", "x"], [["a", 12.345, 1], ["long name", 3.0, 22]], pad=True,
                           align=["left", "right", "center"], formats=["", ".1f", "d"])
    assert table.splitlines() == [
        "| name      |   ms | x  |",
        "|-----------|-----:|:--:|",
        "| a         | 12.3 | 1  |",
        "| long name |  3.0 | 22 |",
    ]


def test_markdown_table_errors():
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a"], [], align="middle")
    with pytest.raises(ValueError, match="formats has 2 entries for 1 columns"):
        markdown_table(["a"], [], formats=["", ""])


def test_leftover_temps_of_a_killed_write_are_removed(tmp_path):
    from longattn.io import remove_leftover_temps

    target = tmp_path / "checkpoint.safetensors"
    left = [tmp_path / f".checkpoint.safetensors.{tag}.tmp" for tag in ("0a1b2c3d", "deadbeef")]
    keep = [tmp_path / ".other.safetensors.0a1b2c3d.tmp", tmp_path / "checkpoint.safetensors", tmp_path / "notes.tmp"]
    for p in left + keep:
        p.write_bytes(b"x")
    assert sorted(remove_leftover_temps(target)) == sorted(left)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in left)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc")
def test_the_content_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    """A crash after the rename must not leave an empty file: the temporary file is fsynced first, the
    folder after (so the rename itself is durable)."""
    import os

    from longattn.io import write_bytes

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    write_bytes(tmp_path / "x.bin", b"data")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)
