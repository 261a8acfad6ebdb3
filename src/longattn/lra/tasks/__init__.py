"""The Long Range Arena tasks, one file each, built by name: ``get_task("listops", data_dir)``."""

from __future__ import annotations

import importlib
from pathlib import Path

from ...datasets.files import SPLITS, DataFormatError, MissingDataError
from ._base import PAD, Split, Task, pad_rows

# name -> (module, class, constructor keywords); modules are imported on first use.
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "listops": ("listops", "ListOps", {}),
    "text": ("text", "Text", {}),
    "retrieval": ("retrieval", "Retrieval", {}),
    "image": ("image", "Image", {}),
    # Not an LRA task: 16x16 Pathfinder, the quick suite's reduced scale (generated with the simple preset).
    "pathfinder16": ("pathfinder", "Pathfinder", {"resolution": 16}),
    "pathfinder32": ("pathfinder", "Pathfinder", {"resolution": 32}),
    "pathfinder64": ("pathfinder", "Pathfinder", {"resolution": 64}),
    "pathfinder128": ("pathfinder", "Pathfinder", {"resolution": 128}),
}
ALIASES = {"pathx": "pathfinder128", "path-x": "pathfinder128", "pathfinder": "pathfinder32"}
TASK_NAMES = tuple(_REGISTRY)
GENERATED_TASKS = tuple(name for name, (module, _, _) in _REGISTRY.items() if module in ("listops", "pathfinder"))


def get_task(name: str, data_dir: Path | str) -> Task:
    """The task called ``name`` (see ``TASK_NAMES``; ``pathx`` = ``pathfinder128``) reading ``data_dir``."""
    key = ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"task must be one of {', '.join(TASK_NAMES + tuple(ALIASES))}, got {name!r}")
    module, cls, kwargs = _REGISTRY[key]
    task_cls = getattr(importlib.import_module(f".{module}", __name__), cls)
    return task_cls(data_dir, **kwargs)


__all__ = ["GENERATED_TASKS", "PAD", "SPLITS", "TASK_NAMES", "DataFormatError", "MissingDataError", "Split", "Task",
           "get_task", "pad_rows"]
