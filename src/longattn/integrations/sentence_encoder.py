"""Text -> embedding: the one home of sentence embeddings, for BERT-family models and converted Longformers.

Notation: n texts, M windows (chunks) of them, C model width (``dim``), L ``max_length``.

**What a directory says.** A sentence-transformers directory lists its modules in ``modules.json``: the
Transformer, a ``Pooling`` module (``1_Pooling/config.json``: CLS, mean, max or mean/sqrt(length) over the
token states, padding excluded) and often ``Normalize`` (L2; listed even when its folder is absent).
``SentenceEncoder.load`` reads them, so a model converted by ``longattn convert --to-long`` (which keeps
these files) embeds exactly as its source does. A directory without ``modules.json`` gets **mean pooling and
no normalisation** (sentence-transformers' own default for a plain Hugging Face model).

**Which model runs.** ``model_type`` ``longformer`` runs ``longattn.models.LongformerModel`` with global
attention on the first token (CLS), the Longformer recipe for classification and retrieval; every other
type runs ``transformers.AutoModel``, the model as people run it today.

**Nothing is silently truncated.** ``encode`` reads a text longer than L tokens as overlapping windows, the
same windows ``encode_chunks`` returns: the text's tokens without special tokens are cut into pieces of
``chunk - 2`` tokens (``chunk`` = L here), consecutive pieces sharing ``overlap`` tokens (default L // 4),
and each piece is wrapped in CLS ... SEP again. The text's vector is combined from the windows' pooled
vectors *before* normalisation, as the pooling itself would combine the token states of all windows:

- mean: the token-weighted mean of the windows' means (weights = tokens read, CLS/SEP included), i.e. the
  mean of every token state read, the overlap counted twice. Averaging the normalised window vectors
  instead would weigh each window by ``1 / |v_w|``, an artefact of its norm rather than of its content;
- mean_sqrt_len: the sum of every token state read over the square root of their number;
- max: the maximum over the windows (= over every token state read);
- cls: the token-weighted mean of the windows' CLS vectors (a short last window counts less);

then L2-normalised if the model normalises. A text that fits in L tokens is one window, so this *is* the
ordinary single pass. ``truncate=True`` keeps only the first window: the plain truncation people use today
(sentence-transformers' ``max_seq_length``), the baseline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..models import hf_checkpoint as ckpt
from .convert import TOKENIZER_FILES
from ..training.progress import progress_bar

#: sentence-transformers' pooling flags (``1_Pooling/config.json``) -> our mode names
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
# other flags sentence-transformers knows; refused by name rather than ignored
_UNSUPPORTED = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_ROBERTA_POSITIONS = ("roberta", "xlm-roberta", "camembert")  # positions count from pad_token_id + 1


# ---- what a directory says -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Pooling:
    """How token states become one vector: sentence-transformers' Pooling (+ Normalize) modules."""

    mode: str = "mean"  # "mean", "cls", "max" or "mean_sqrt_len"
    normalize: bool = False  # L2-normalise the pooled vector (a Normalize module is listed)

    @classmethod
    def read(cls, path: Path | str) -> "Pooling":
        """From ``modules.json`` (+ the Pooling module's ``config.json``); ``Pooling()`` (mean, not normalised)
        when the directory has no ``modules.json``."""
        path = Path(path)
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = json.loads(modules_file.read_text())
        kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
        mode = "mean"  # sentence-transformers' default when a Pooling module has no config
        if "Pooling" in kinds and (path / kinds["Pooling"]["path"] / "config.json").is_file():
            file = path / kinds["Pooling"]["path"] / "config.json"
            config = json.loads(file.read_text())
            unsupported = [flag for flag in _UNSUPPORTED if config.get(flag)]
            chosen = [name for flag, name in POOLING_MODES.items() if config.get(flag)]
            if unsupported or len(chosen) != 1:
                raise ValueError(f"{file}: exactly one of {sorted(POOLING_MODES)} must be true (found "
                                 f"{chosen + unsupported})")
            mode = chosen[0]
        return cls(mode, "Normalize" in kinds)

    def __call__(self, states: Tensor, mask: Tensor) -> Tensor:
        """(B, N, C) token states and (B, N) 1 real / 0 padding -> (B, C) pooled, not normalised."""
        if self.mode == "cls":
            return states[:, 0]
        m = mask[..., None].to(states.dtype)  # (B, N, 1)
        if self.mode == "max":
            return states.masked_fill(m == 0, float("-inf")).amax(1)
        total, count = (states * m).sum(1), m.sum(1).clamp_min(1e-9)  # (B, C), (B, 1)
        return total / count if self.mode == "mean" else total / count.sqrt()

    def combine(self, vectors: Tensor, tokens: Tensor, doc: Tensor, n: int) -> Tensor:
        """One (n, C) vector per text from its windows' pooled vectors (M, C), their token counts (M,) and
        the text each came from (M,), as the module docstring says; not normalised."""
        if self.mode == "max":  # every text has at least one window, and doc is sorted
            return torch.stack([v.amax(0) for v in vectors.split(torch.bincount(doc, minlength=n).tolist())])
        if self.mode == "mean_sqrt_len":  # back to sums, then one division by sqrt(all tokens)
            total = vectors.new_zeros(n, vectors.shape[1]).index_add_(0, doc, vectors * tokens.sqrt()[:, None])
            return total / tokens.new_zeros(n).index_add_(0, doc, tokens).sqrt()[:, None]
        weights = tokens / tokens.new_zeros(n).index_add_(0, doc, tokens)[doc]  # (M,): 1.0 for a lone window
        return vectors.new_zeros(n, vectors.shape[1]).index_add_(0, doc, vectors * weights[:, None])

    def finish(self, vectors: Tensor) -> Tensor:
        return torch.nn.functional.normalize(vectors, dim=-1) if self.normalize else vectors


@dataclass
class Chunks:
    """Window embeddings of several texts (``encode_chunks``)."""

    embeddings: Tensor  # (M, C) float32, pooled and normalised like a sentence embedding of the model
    doc: Tensor  # (M,) long: index of the text each window came from, non-decreasing
    start: Tensor  # (M,) long: offset of the window's first token in its text's tokens (special tokens excluded)
    tokens: Tensor  # (M,) long: tokens the window's pass read, special tokens included


def _weight_files(path: Path) -> list[Path]:
    """The files ``hf_checkpoint.read_weights`` reads, in a fixed order."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            shards = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
            return [path / name, *(path / s for s in shards)]
    raise ValueError(f"{path}: no weights (expected model.safetensors or pytorch_model.bin, sharded or not)")


def directory_fingerprint(path: Path | str, pooling: Pooling, max_length: int) -> str:
    """sha256 (hex) over ``config.json``, the tokenizer files, ``pooling``, ``max_length`` and the weight files'
    bytes: what decides the embeddings, so a cache of embeddings keyed by it is never stale."""
    path, digest = Path(path), hashlib.sha256()
    parts = [path / "config.json", *(path / f for f in TOKENIZER_FILES if (path / f).is_file()), *_weight_files(path)]
    digest.update(f"pooling={pooling.mode},normalize={pooling.normalize},max_length={max_length}".encode())
    for file in parts:
        digest.update(f"\0{file.name}\0".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one text ([CLS] and [SEP] for BERT, <s> and </s> for
    RoBERTa), read off its own output so that every window is wrapped as a whole text would be."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
    if not bare or at is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: cannot tell its special tokens apart from the "
                         f"text ({full} vs {bare})")
    return full[:at], full[at + len(bare):]


# ---- the encoder ---------------------------------------------------------------------------------------
class SentenceEncoder:
    """Embeds texts with a checkpoint directory's model, tokenizer and pooling (see the module docstring).

    Attributes: ``dim`` (C), ``max_length`` (L, tokens of one pass, special tokens included), ``name`` (the
    directory's name), ``pooling``, ``fingerprint`` (``directory_fingerprint``, a cache key for embeddings),
    ``model``, ``tokenizer``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, pooling: Pooling, *, max_length: int, name: str,
                 fingerprint: str, global_cls: bool):
        self.model, self.tokenizer, self.pooling = model.eval(), tokenizer, pooling
        self.max_length, self.name, self.fingerprint = max_length, name, fingerprint
        self.dim = int(model.config.hidden_size)
        self._global_cls = global_cls  # a Longformer: CLS attends and is attended globally
        self._prefix, self._suffix = _special_tokens(tokenizer)
        self._specials = len(self._prefix) + len(self._suffix)

    @classmethod
    def load(cls, path: str | Path, *, max_length: int | None = None, backend: str = "auto", device=None,
             dtype: torch.dtype | None = None) -> "SentenceEncoder":
        """The encoder of a checkpoint directory (``config.json``, weights, tokenizer files; optionally
        sentence-transformers' ``modules.json`` and ``1_Pooling/``). Reads local files only.

        Args:
            max_length: tokens of one pass, special tokens included; default the model's position capacity
                (BERT: ``max_position_embeddings``; RoBERTa and Longformer: ``max_position_embeddings -
                pad_token_id - 1``); lower is allowed, higher is a ``ValueError``. sentence-transformers'
                ``max_seq_length`` (256 for all-MiniLM-L6-v2) is not read: it is a truncation, and truncation
                here is asked for explicitly (``encode(..., truncate=True)``).
            backend: longattn attention backend of a Longformer (ignored by other models).
            device, dtype: where and in which dtype the model runs (default CPU, float32); embeddings come
                back as float32 on the CPU either way.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        hf = ckpt.read_config(path)
        model_type = hf.get("model_type")
        dtype = torch.float32 if dtype is None else dtype
        pad = int(hf.get("pad_token_id") or 0)
        if model_type == "longformer":
            from ..models.longformer import LongformerModel

            model = LongformerModel.from_pretrained(path, backend=backend, device=device, dtype=dtype)
            capacity = int(hf["max_position_embeddings"]) - pad - 1
        else:
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a loading bar per model is noise in a benchmark's output
            model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True).to(device or "cpu")
            capacity = int(hf["max_position_embeddings"]) - (pad + 1 if model_type in _ROBERTA_POSITIONS else 0)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        least = sum(map(len, _special_tokens(tokenizer))) + 1
        if max_length is None:
            max_length = capacity
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not least <= max_length <= capacity:
            raise ValueError(f"max_length must be an int in [{least}, {capacity}] (the model's position capacity), "
                             f"got {max_length!r}")
        pooling = Pooling.read(path)
        return cls(model, tokenizer, pooling, max_length=max_length, name=path.name,
                   fingerprint=directory_fingerprint(path, pooling, max_length),
                   global_cls=model_type == "longformer")

    # ---- tokens ----
    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, without special tokens and untruncated."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of strings (a list of one text for one text)")
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with its special tokens (CLS, SEP), untruncated."""
        return [len(ids) + self._specials for ids in self.token_ids(texts)]

    def token_starts(self, text: str) -> list[int]:
        """The start character of each of ``text``'s tokens (special tokens excluded)."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [start for start, _ in enc["offset_mapping"]]

    def _windows(self, ids: list[list[int]], chunk: int, overlap: int, first_only: bool = False
                 ) -> tuple[list[list[int]], Tensor, Tensor]:
        """The one chunking code path: (windows with special tokens, doc (M,), start (M,)). Each text's
        tokens are cut into pieces of ``chunk - 2`` tokens, consecutive pieces sharing ``overlap``; a text
        that fits is one piece (an empty text too)."""
        size = chunk - self._specials
        windows, doc, start = [], [], []
        for i, text in enumerate(ids):
            starts = [0] if first_only else range(0, max(len(text) - overlap, 1), size - overlap)
            for s in starts:
                windows.append([*self._prefix, *text[s:s + size], *self._suffix])
                doc.append(i)
                start.append(s)
        return windows, torch.tensor(doc, dtype=torch.long), torch.tensor(start, dtype=torch.long)

    def _check_chunking(self, chunk: int | None, overlap: int | None) -> tuple[int, int]:
        chunk = self.max_length if chunk is None else chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not self._specials < chunk <= self.max_length:
            raise ValueError(f"chunk must be an int in [{self._specials + 1}, max_length={self.max_length}] "
                             f"(tokens of one window, special tokens included), got {chunk!r}")
        overlap = chunk // 4 if overlap is None else overlap
        size = chunk - self._specials
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < size:
            raise ValueError(f"overlap must be an int in [0, {size}) (tokens shared by consecutive windows of "
                             f"{size} text tokens), got {overlap!r}")
        return chunk, overlap

    # ---- the model ----
    def _pooled(self, windows: list[list[int]], *, batch_size: int, tokens_per_batch: int, progress: bool
                ) -> Tensor:
        """(M, C) float32 CPU pooled (not normalised) vectors of token-id windows (special tokens included).

        Batches take windows longest first (little padding; the largest batch, and any memory error, come
        first) and hold at most ``batch_size`` windows and ``tokens_per_batch`` tokens with padding, but
        always one window: a 16K-token document goes alone."""
        for name, value in (("batch_size", batch_size), ("tokens_per_batch", tokens_per_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        out = torch.empty(len(windows), self.dim)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        with progress_bar(progress, total=len(windows), desc=self.name, unit="window") as bar:
            i = 0
            while i < len(order):
                longest = len(windows[order[i]])
                rows = order[i:i + max(1, min(batch_size, tokens_per_batch // longest))]
                ids = torch.full((len(rows), longest), pad, dtype=torch.long)  # (B, N), padded on the right
                mask = torch.zeros(len(rows), longest, dtype=torch.long)  # (B, N)
                for r, j in enumerate(rows):
                    ids[r, :len(windows[j])] = torch.tensor(windows[j])
                    mask[r, :len(windows[j])] = 1
                with torch.inference_mode():
                    pooled = self._forward(ids.to(device), mask.to(device)).cpu()  # (B, C)
                # written outside inference mode: ``out`` stays a normal tensor that autograd code may use
                out[torch.tensor(rows)] = pooled
                bar.update(len(rows))
                i += len(rows)
        return out

    def _forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, N) ids and 1/0 mask -> (B, C) float32 pooled vectors."""
        if self._global_cls:
            flags = torch.zeros_like(mask)
            flags[:, 0] = 1  # CLS
            states = self.model(ids, attention_mask=mask, global_attention_mask=flags).last_hidden_state
        else:
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.pooling(states.float(), mask)  # (B, N, C) -> (B, C)

    # ---- public ----
    def encode(self, texts: Sequence[str], *, truncate: bool = False, overlap: int | None = None,
               batch_size: int = 32, tokens_per_batch: int = 16384, progress: bool = False) -> Tensor:
        """(n, C) float32 CPU embeddings of ``texts``, pooled (and normalised) as the directory says.

        A text longer than ``max_length`` tokens is read as overlapping windows of ``max_length`` tokens
        (``overlap`` text tokens shared, default ``max_length // 4``) whose pooled vectors are combined as the
        module docstring says; ``truncate=True`` embeds only its first ``max_length`` tokens instead.
        """
        chunk, overlap = self._check_chunking(None, overlap)
        ids = self.token_ids(texts)
        windows, doc, _ = self._windows(ids, chunk, overlap, first_only=truncate)
        if not windows:
            return torch.empty(0, self.dim)
        vectors = self._pooled(windows, batch_size=batch_size, tokens_per_batch=tokens_per_batch,
                               progress=progress)
        if not truncate:
            tokens = torch.tensor([len(w) for w in windows], dtype=torch.float32)
            vectors = self.pooling.combine(vectors, tokens, doc, len(ids))
        return self.pooling.finish(vectors)

    def encode_chunks(self, texts: Sequence[str], *, chunk: int | None = None, overlap: int | None = None,
                      batch_size: int = 32, tokens_per_batch: int = 16384, progress: bool = False) -> Chunks:
        """The "chunks with overlap" workaround: one embedding per window of each text.

        Each text's tokens (special tokens excluded) are cut into windows of ``chunk - 2`` tokens, each
        wrapped in CLS ... SEP again (``chunk`` tokens per pass, default ``max_length``); consecutive windows
        share ``overlap`` tokens (default ``chunk // 4``). A text that fits is one window, an empty text too.
        Returns ``Chunks`` (M windows in text order, then start order).
        """
        chunk, overlap = self._check_chunking(chunk, overlap)
        windows, doc, start = self._windows(self.token_ids(texts), chunk, overlap)
        vectors = self._pooled(windows, batch_size=batch_size, tokens_per_batch=tokens_per_batch,
                               progress=progress) if windows else torch.empty(0, self.dim)
        return Chunks(self.pooling.finish(vectors), doc, start, torch.tensor([len(w) for w in windows],
                                                                              dtype=torch.long))


__all__ = ["POOLING_MODES", "Chunks", "Pooling", "SentenceEncoder", "directory_fingerprint"]
