"""The official release files of the data sets: where they are, what is wrong with them, how lines are read.

Finding a data set's files in a folder that may hold them directly or under the release's own folder
names, a ``MissingDataError`` that says which files to put where, reading tab-separated lines with their
line numbers, and parsing class labels; every format problem is a ``DataFormatError`` naming file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

SPLITS = ("train", "val", "test")


class MissingDataError(FileNotFoundError):
    """The data set's files are not in its folder; the message says which files and where to put them."""


class DataFormatError(ValueError):
    """A data file does not follow the official format; the message names the file and the line."""

    def __init__(self, path: Path | str, line: int | None, problem: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line = Path(path), line


def check_settings(settings_cls: type, given: dict) -> None:
    """``TypeError`` naming a generator setting that ``settings_cls`` (a dataclass) has no field for, with the
    fields it has (``--set train=1000`` when the field is ``num_train``)."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(settings_cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"unknown {settings_cls.__name__} setting {unknown[0]!r}; the settings are "
                        f"{', '.join(names)}")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def locate(data_dir: Path, subdirs: Sequence[str], names: Sequence[str]) -> Path | None:
    """The first of ``data_dir``, ``data_dir / subdirs[0]``, ... that holds every path in ``names``, or None."""
    for sub in ("", *subdirs):
        folder = data_dir / sub if sub else data_dir
        if all((folder / name).exists() for name in names):
            return folder
    return None


def missing(task: str, data_dir: Path, subdirs: Sequence[str], names: Sequence[str], source: str,
            hint: str = "") -> MissingDataError:
    """A ``MissingDataError`` that lists the files ``task`` needs, the folders searched and where to get them."""
    absent = [n for n in names if not any((data_dir / s / n).exists() for s in ("", *subdirs))]
    where = " or ".join(str(data_dir / s) for s in ("", *subdirs))
    lines = [f"task {task!r}: " + (f"missing {', '.join(absent)}" if absent else "incomplete data"),
             f"  put these in {where}:"]
    lines += [f"    {n}" for n in names]
    lines.append(f"  they come from {source}")
    if hint:
        lines.append(f"  {hint}")
    return MissingDataError("\n".join(lines))


def count_lines(path: Path) -> int:
    """Number of lines in ``path`` (a last line without a newline counts), read in large blocks."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def iter_tsv(path: Path, columns: int) -> Iterator[tuple[int, list[bytes]]]:
    """``(line number, fields)`` of each non-empty line of a tab-separated file, as raw bytes.

    No quoting: a quote is an ordinary character (LRA reads its TSVs with ``use_quote_delim=False``).
    A line with another number of fields than ``columns`` raises ``DataFormatError`` naming file and line.
    """
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            fields = line.split(b"\t")
            if len(fields) != columns:
                raise DataFormatError(path, number, f"expected {columns} tab-separated columns, found {len(fields)}")
            yield number, fields


def parse_label(field: bytes, num_classes: int, path: Path, line: int) -> int:
    """A class id in ``[0, num_classes)`` from text such as ``1`` or ``1.0`` (LRA parses labels as floats)."""
    text = field.strip().decode("ascii", errors="replace")
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(path, line, f"label {text!r} is not an integer") from None
    if not value.is_integer():
        raise DataFormatError(path, line, f"label {text!r} is not an integer")
    if not 0 <= value < num_classes:
        raise DataFormatError(path, line, f"label {int(value)} is not in 0..{num_classes - 1}")
    return int(value)


__all__ = ["SPLITS", "DataFormatError", "MissingDataError", "check_split", "count_lines", "iter_tsv", "locate",
           "missing", "parse_label"]
