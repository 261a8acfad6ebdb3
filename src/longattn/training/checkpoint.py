"""Training checkpoints as one safetensors file, written atomically.

Everything needed to resume lives in the file: model and optimizer state (tensors), RNG states, the step,
the history so far and the config (JSON in the safetensors metadata). Nested state dicts are flattened: each
tensor is stored under its path (``optimizer/state/3/exp_avg``) and the JSON skeleton keeps a placeholder
where it was, so no pickle is ever written or read. The file is written to a temporary name in the same
folder and renamed over the old one (``longattn.io.atomic_path``, which keeps the user's umask): a kill at any
moment leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from ..io import atomic_path

_TENSOR = "__tensor__"


def flatten(obj, prefix: str, tensors: dict[str, Tensor]):
    """JSON-able skeleton of ``obj`` with its tensors moved into ``tensors`` under path keys."""
    if isinstance(obj, Tensor):
        key = prefix.strip("/")
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {prefix!r}")


def unflatten(skeleton, tensors: dict[str, Tensor]):
    """Inverse of ``flatten``: dict keys keep their type (int parameter ids of optimizer states)."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def save(path: Path | str, state: dict) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, Tensor] = {}
    skeleton = flatten(state, "", tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"longattn": json.dumps(skeleton)})
    return path


def load(path: Path | str) -> dict:
    """Read a checkpoint written by ``save``; ``ValueError`` naming the file when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if "longattn" not in meta:
        raise ValueError(f"{path}: a safetensors file without longattn's training state")
    return unflatten(json.loads(meta["longattn"]), tensors)
