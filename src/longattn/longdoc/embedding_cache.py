"""Embeddings on disk, so that no text is encoded twice and a killed run resumes where it stopped.

One safetensors file per (encoder, view): ``<folder>/<encoder fingerprint[:16]>-<view>.safetensors``. A view
is one way of turning a text into vectors (``trunc``: one vector of the first 512 tokens; ``chunks512-128``: one
vector per window; ``sentences``: one per sentence; ``long``: one of the whole text). Each entry is keyed by the
sha256 of the text and holds an (m, C) float32 tensor; the file's metadata keeps the encoder fingerprint, the
view and the seconds each entry took to encode, so reports give the cost of a system even when every vector
came from the cache. The file is rewritten atomically every ``save_every`` seconds while encoding.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..io import atomic_path


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class EmbeddingCache:
    def __init__(self, folder: Path | str, fingerprint: str, view: str):
        if not fingerprint or not view or "/" in view:
            raise ValueError(f"fingerprint and view must be non-empty names, got {fingerprint!r}, {view!r}")
        self.path = Path(folder) / f"{fingerprint[:16]}-{view}.safetensors"
        self.fingerprint, self.view = fingerprint, view
        self.entries: dict[str, Tensor] = {}
        self.seconds: dict[str, float] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint or meta.get("view") != self.view:
                raise ValueError(f"{self.path}: holds the view {meta.get('view')!r} of encoder "
                                 f"{meta.get('fingerprint', '?')[:16]}, not {self.view!r} of {self.fingerprint[:16]}")
            self.entries = {k: f.get_tensor(k) for k in f.keys()}
        self.seconds = json.loads(meta.get("seconds", "{}"))

    def save(self) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": self.fingerprint, "view": self.view, "seconds": json.dumps(self.seconds)}
        with atomic_path(self.path) as tmp:
            save_file({k: v.contiguous() for k, v in self.entries.items()}, str(tmp), metadata=meta)

    def get(self, texts: Sequence[str],
            compute: Callable[[list[str]], list[Tensor]], *, group: int = 32, save_every: float = 60.0,
            progress=None) -> list[Tensor]:
        """The (m, C) tensors of ``texts``; the missing ones are computed by ``compute`` on groups of up to
        ``group`` texts (longest first, so that time estimates are pessimistic and memory peaks early), and the
        cache is saved every ``save_every`` seconds and at the end. ``progress`` (a bar) advances per text."""
        keys = [text_key(t) for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self.entries}.items(),
                      key=lambda kv: -len(kv[1]))
        if progress is not None:
            progress.update(len(texts) - len(todo))
        last_save = time.monotonic()
        for start in range(0, len(todo), group):
            chunk = todo[start:start + group]
            began = time.perf_counter()
            vectors = compute([t for _, t in chunk])
            spent = (time.perf_counter() - began) / len(chunk)  # a group's time, shared evenly
            for (k, _), v in zip(chunk, vectors, strict=True):
                if v.dim() != 2:
                    raise ValueError(f"compute must return (m, C) tensors, got {tuple(v.shape)}")
                self.entries[k] = v.detach().to("cpu", torch.float32).contiguous()
                self.seconds[k] = spent
            if progress is not None:
                progress.update(len(chunk))
            if time.monotonic() - last_save > save_every:
                self.save()
                last_save = time.monotonic()
        if todo:
            self.save()
        return [self.entries[k] for k in keys]

    def cost(self, texts: Sequence[str]) -> float:
        """Seconds it took to encode ``texts`` (each distinct text once), from the cache's records."""
        return sum(self.seconds.get(k, 0.0) for k in {text_key(t) for t in texts})
