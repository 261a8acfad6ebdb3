"""Writing result files: atomically, with the user's umask, and Markdown tables in one format.

Every file the package writes for a user (checkpoints, ``result.json``, reports, benchmark tables) goes
through ``atomic_path``: the content is written to a temporary file in the destination's folder, flushed to
disk and renamed over the destination (``os.replace``), so a reader or a kill at any moment sees the old file
or the whole new one, never half of one. The temporary file is created like ``open(path, "w")`` creates a
file (mode ``0o666`` less the umask), not like ``tempfile.mkstemp`` (always ``0o600``): reports and
checkpoints stay as readable as every other file the user writes.
"""

from __future__ import annotations

import glob
import html
import json
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["Report", "atomic_path", "format_cells", "markdown_table", "remove_leftover_temps", "write_bytes",
           "write_json", "write_text"]


def _create_temp(path: Path) -> Path:
    """An empty new file beside ``path``, created with mode 0o666 so that the kernel applies the umask
    (reading the umask would mean setting it, which races with other threads)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # a leftover or a concurrent writer's name: draw another
            continue
        os.close(fd)
        return tmp


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # Windows cannot open a folder; its rename is what it is
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it replaces ``path``.

    For writers that take a file name (``safetensors.torch.save_file``, ``open``)::

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, tmp)

    Folders are created. On an exception the temporary file is removed and ``path`` is left as it was.
    A writer that replaces the file instead of writing into it (``safetensors`` writes its own temp file at
    0o600 and renames it over ours) gets the umask's mode back before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 less the umask, as the kernel applied it
    try:
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync(path.parent, directory=True)  # the rename itself survives a crash


def remove_leftover_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_path`` left beside ``path`` when its writer was killed (each as large
    as the file it was to become); returns them. For a file whose writer is known to be this process alone
    (a run folder at resume): a concurrent writer's temporary file has the same name shape."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation); returns the path."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    """Write ``obj`` as JSON (ending in a newline) to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


# ---- Markdown tables -------------------------------------------------------------------------------------

_RULES = {"left": ("-", "-"), "right": ("-", ":"), "center": (":", ":")}


def _cell(value: Any, spec: str, missing: str) -> str:
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    return format(value, spec)


def _per_column(value: str | Sequence[str], n: int, name: str) -> list[str]:
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"markdown_table: {name} has {len(values)} entries for {n} columns")
    return values


def format_cells(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, formats: str | Sequence[str] = "",
                 missing: str = "-") -> list[list[str]]:
    """The rows' cells as strings, as ``markdown_table`` writes them (see there for ``formats``/``missing``)."""
    specs = _per_column(formats, len(headers), "formats")
    cells = []
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row {i} has {len(row)} cells for {len(headers)} columns")
        cells.append([_cell(v, s, missing) for v, s in zip(row, specs)])
    return cells


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   align: str | Sequence[str] = "left", formats: str | Sequence[str] = "",
                   missing: str = "-", pad: bool = False) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline).

    ``rows`` hold strings (written as they are), ``None`` (written as ``missing``) or other values, written
    with ``format(value, spec)`` where ``spec`` is the column's entry of ``formats`` (one spec for every
    column, or one per column; ``""`` is ``str``). ``align`` is ``"left"``, ``"right"`` or ``"center"``, for
    every column or one per column. ``pad=True`` pads every column to its widest cell, for tables read as
    plain text in a terminal; the default writes each cell as it is (``| a | b |``).
    """
    headers = [str(h) for h in headers]
    aligns = _per_column(align, len(headers), "align")
    if bad := [a for a in aligns if a not in _RULES]:
        raise ValueError(f"markdown_table: align must be left, right or center, got {bad[0]!r}")
    cells = format_cells(headers, rows, formats=formats, missing=missing)
    widths = [max([len(h), *(len(r[j]) for r in cells)]) if pad else 0 for j, h in enumerate(headers)]
    just = {"left": str.ljust, "right": str.rjust, "center": str.center}

    def line(values: list[str]) -> str:
        return "| " + " | ".join(just[a](v, w) for v, a, w in zip(values, aligns, widths)) + " |"

    rule = "|" + "|".join(_RULES[a][0] + "-" * max(w, 1) + _RULES[a][1] for a, w in zip(aligns, widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


class Report:
    """A report written twice from one list of parts: ``<stem>.md`` and a self-contained ``<stem>.html``
    (tables, paragraphs, images beside the files). The applications' reports (LRA, long documents) share it.

    >>> r = Report("Title"); r.text("Intro."); r.table("Results", ["a", "b"], [[1, 2]]); r.image("plot.png")
    """

    _STYLE = ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{border:1px solid #ccc;"
              "padding:3px 6px}table{border-collapse:collapse}img{max-width:100%}</style>")

    def __init__(self, title: str):
        self.title = title
        self._md: list[str] = [f"# {title}\n"]
        self._html: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, title: str) -> None:
        self._md.append(f"## {title}\n")
        self._html.append(f"<h2>{html.escape(title)}</h2>")

    def text(self, paragraph: str) -> None:
        self._md.append(paragraph + "\n")
        self._html.append(f"<p>{html.escape(paragraph)}</p>")

    def table(self, title: str | None, headers: Sequence[str], rows: Sequence[Sequence[Any]], **options) -> None:
        """A table under an optional heading; ``options`` go to ``markdown_table`` (align, formats, missing)."""
        if title:
            self.heading(title)
        text = markdown_table(headers, rows, **options)
        self._md.append(text + "\n")
        cells = format_cells(headers, rows, formats=options.get("formats", ""), missing=options.get("missing", "-"))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells)
        self._html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, name: str, caption: str = "") -> None:
        self._md.append(f"![{caption or name}]({name})\n")
        self._html.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption or name)}">'
                          + (f"<figcaption>{html.escape(caption)}</figcaption>" if caption else "") + "</figure>")

    def write(self, folder: str | os.PathLike, stem: str = "report") -> Path:
        """Write ``<stem>.md`` and ``<stem>.html`` into ``folder``; returns the Markdown path."""
        folder = Path(folder)
        write_text(folder / f"{stem}.html", f"<!doctype html><html><head><meta charset='utf-8'><title>"
                   f"{html.escape(self.title)}</title>{self._STYLE}</head><body>" + "".join(self._html)
                   + "</body></html>")
        return write_text(folder / f"{stem}.md", "\n".join(self._md))
