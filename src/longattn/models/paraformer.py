"""A Paraformer-style hierarchical attentive retriever over frozen sentence vectors (Nguyen et al., "Attentive
deep neural networks for legal document retrieval", 2022).

A frozen sentence encoder turns each document into one vector per sentence and each query into one vector, once
(``longdoc.embedding_cache``). This model is the trainable part on top:

1. ``encode_documents``: ``globals`` learned tokens are prepended to a document's sentence vectors and
   ``depth`` pre-LayerNorm Transformer layers run over ``[globals; sentences]`` with the pattern
   ``sliding_window(window // 2) | global_tokens(range(globals))``: a sentence reads the ``window`` sentences
   around it (``window // 2`` per side, longattn's one meaning of ``window``) and the globals; the globals read
   the whole document. Both residual branches end in a zero-initialised projection and there is no final
   LayerNorm, so an untrained model's sentence states are exactly the input vectors: the pretrained encoder's
   geometry is the starting point.
2. The states come back packed, without padding (``DocumentStates``): the rows of document 0, then document 1,
   and so on. A document's rows are its global rows first, then its real sentences in order. A global row is
   what the layers wrote into that global token for this document, its final state minus the learned start
   vector: zero in an untrained model, so that the pooled vector starts as a pure sentence pool, and a summary
   of the whole document once trained (depth >= 1). A document with no real sentence has no rows at all.
3. ``score``: the query attends over a document's rows, ``softmax_rows((W_q q) . (W_k s) / sqrt(C))``, and the
   pooled vector is ``sum_rows weight * W_v s``; one head. ``W_q``, ``W_k`` and ``W_v`` start as the
   identity, so the untrained pool is a similarity-weighted mean of the sentence vectors (nearly the plain
   mean when the vectors are unit-norm, as the logits are then within ``1 / sqrt(C)`` of 0); the zero global
   rows take their share of the weight but add nothing, so the pool's direction is the sentences'. The score
   is ``cos(q, pooled) * exp(logit_scale)``, with ``logit_scale`` learned from ``log(1 / temperature_init)``
   (unclamped): the logits of a contrastive (InfoNCE) loss. A document with no rows scores ``-inf`` for
   every query, so a softmax over documents gives it zero probability.

The pooling is a segment softmax over the packed rows: per-document maxima with ``scatter_reduce``, sums with
``index_add`` and the weighted value sums with ``embedding_bag`` (one bag per (query, document)), so memory is
O(B T + B D C), never a (B, D, S, C) or (B, T, C) tensor. A corpus is encoded in chunks and scored at once::

    model = ParaformerRetriever(ParaformerConfig(dim=384)).eval()
    with torch.no_grad():
        parts = [model.encode_documents(*pad_documents(chunk)) for chunk in chunks]  # lists of (S_i, C)
        scores = model.score(queries, DocumentStates.cat(parts))  # (B, number of documents)

Notation: D documents, S sentence slots per document (padded), G global tokens, T packed rows
(sum over the non-empty documents of G + real sentences), B queries, C the sentence-vector width ``dim``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import SparseSelfAttention
from ..patterns import Pattern, global_tokens, sliding_window
from ..patterns.window import check_window
from .config_fields import check_fields


def pad_documents(documents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad a list of ``(S_i, C)`` sentence-vector tensors to ``sentences (D, S, C)`` and ``mask (D, S)`` (True =
    real sentence), padding at the end of each document, ``S = max S_i``."""
    if len(documents) == 0:
        raise ValueError("documents must hold at least one (S_i, C) tensor")
    if any(d.dim() != 2 or d.shape[1] != documents[0].shape[1] for d in documents):
        raise ValueError(f"documents must all have shape (S_i, C), got {[tuple(d.shape) for d in documents]}")
    lengths = torch.tensor([d.shape[0] for d in documents], device=documents[0].device)
    sentences = nn.utils.rnn.pad_sequence(list(documents), batch_first=True)  # (D, S, C)
    mask = torch.arange(sentences.shape[1], device=lengths.device) < lengths[:, None]  # (D, S)
    return sentences, mask


@dataclass
class DocumentStates:
    """Sentence states of a batch of documents, packed without padding.

    Rows are grouped by document in increasing ``doc`` order; within a document the ``G`` global rows come
    first, then the real sentences in order. Documents without a real sentence have no rows.

    Attributes:
        states: ``(T, C)`` the row states.
        doc: ``(T,)`` long, the document index of each row, in ``[0, count)``, non-decreasing.
        position: ``(T,)`` long, the sentence's index in its document's padded input for sentence rows,
            ``-1 - g`` for global token ``g``.
        count: the number of documents D (also those without rows).
    """

    states: Tensor
    doc: Tensor
    position: Tensor
    count: int

    def __post_init__(self):
        if self.states.dim() != 2:
            raise ValueError(f"states must have shape (T, C), got {tuple(self.states.shape)}")
        rows = self.states.shape[0]
        for name in ("doc", "position"):
            value = getattr(self, name)
            if value.shape != (rows,) or value.dtype != torch.long:
                raise ValueError(f"{name} must be a long tensor of shape (T={rows},), got {value.dtype} "
                                 f"{tuple(value.shape)}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"count must be an int >= 0, got {self.count!r}")
        if rows and not bool((self.doc[1:] >= self.doc[:-1]).all() & (self.doc[0] >= 0)
                             & (self.doc[-1] < self.count)):
            raise ValueError(f"doc must be non-decreasing and in [0, count={self.count})")

    @classmethod
    def cat(cls, parts: Sequence[DocumentStates]) -> DocumentStates:
        """The documents of ``parts`` in order, as one batch (document indices shifted)."""
        if len(parts) == 0:
            raise ValueError("parts must hold at least one DocumentStates")
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += part.count
        return cls(states=torch.cat([p.states for p in parts]),
                   doc=torch.cat([p.doc + off for p, off in zip(parts, offsets)]),
                   position=torch.cat([p.position for p in parts]), count=total)


class SentenceLayer(nn.Module):
    """Pre-LayerNorm Transformer layer ``x + attn(ln(x))``, ``x + mlp(ln(x))`` whose two output projections
    are zero-initialised, so that the untrained layer is the identity."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, pattern: Pattern, dropout: float, backend: str,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.attn = SparseSelfAttention(dim, heads, pattern=pattern, dropout=dropout, backend=backend, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim, **factory), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim, **factory))
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        self.attn.reset_parameters()
        nn.init.xavier_uniform_(self.mlp[0].weight)
        nn.init.zeros_(self.mlp[0].bias)
        for out in (self.attn.proj, self.mlp[3]):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask=key_padding_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


@dataclass(frozen=True)
class ParaformerConfig:
    dim: int = 384  # sentence-vector width C, the frozen encoder's (all-MiniLM-L6-v2: 384)
    heads: int = 6  # attention heads of the sentence layers; dim must be divisible by heads
    window: int = 8  # sentences each sentence reads around itself, window // 2 per side (even)
    globals: int = 2  # learned global tokens prepended to every document (>= 1)
    depth: int = 1  # sentence-level sparse Transformer layers (0: attentive pooling over the input vectors)
    ffn_dim: int = 1536  # hidden width of each layer's feed-forward MLP
    dropout: float = 0.1  # on the residual branches, the MLP's hidden layer and the attention probabilities
    temperature_init: float = 0.05  # the score scale starts at 1 / temperature_init (learned)

    def __post_init__(self):
        check_fields(self, minimum={"depth": 0}, rates=("dropout",))
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        check_window(self.window)

    @property
    def pattern(self) -> Pattern:
        """The sentence layers' pattern over ``[globals; sentences]``."""
        return sliding_window(self.window // 2) | global_tokens(range(self.globals))


class ParaformerRetriever(nn.Module):
    """Scores documents, given as frozen sentence vectors, against query vectors of the same encoder.

    Args:
        config: the model's shape (``ParaformerConfig``).
        backend: passed to ``longattn.attention`` in the sentence layers.

    ``forward(queries (B, C), sentences (D, S, C), mask (D, S))`` returns scores ``(B, D)``, the logits of a
    contrastive loss; ``encode_documents`` and ``score`` split it so that a corpus is encoded once, in chunks.
    Inputs are cast to the model's dtype.
    """

    def __init__(self, config: ParaformerConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        c = config.dim
        self.global_tokens = nn.Parameter(torch.empty(config.globals, c, **factory))
        self.layers = nn.ModuleList(SentenceLayer(c, config.heads, config.ffn_dim, config.pattern, config.dropout,
                                                  backend, **factory) for _ in range(config.depth))
        # No key bias: it would add the same logit to every row of a document, which the softmax cancels.
        self.query = nn.Linear(c, c, bias=False, **factory)
        self.key = nn.Linear(c, c, bias=False, **factory)
        self.value = nn.Linear(c, c, **factory)
        self.logit_scale = nn.Parameter(torch.empty((), **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.global_tokens, std=0.02)
        for layer in self.layers:
            layer.reset_parameters()
        for lin in (self.query, self.key, self.value):
            nn.init.eye_(lin.weight)
        nn.init.zeros_(self.value.bias)
        nn.init.constant_(self.logit_scale, math.log(1.0 / self.config.temperature_init))

    def _dtype(self) -> torch.dtype:
        return self.global_tokens.dtype

    def encode_documents(self, sentences: Tensor, mask: Tensor) -> DocumentStates:
        """Packed sentence states of ``D`` documents.

        Args:
            sentences: ``(D, S, C)`` sentence vectors; padding slots may hold anything (they are zeroed).
            mask: ``(D, S)`` bool, **True = real sentence**. The window counts slots of ``S``, so padding
                belongs at the end of each document (``pad_documents`` puts it there).

        Returns:
            ``DocumentStates`` with ``count = D`` and ``T = sum over documents with a real sentence of
            (G + real sentences)`` rows.
        """
        c, g = self.config.dim, self.config.globals
        if sentences.dim() != 3 or sentences.shape[-1] != c:
            raise ValueError(f"sentences must have shape (D, S, C={c}), got {tuple(sentences.shape)}")
        d, s, _ = sentences.shape
        if mask.shape != (d, s) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape (D, S) = ({d}, {s}), got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        mask = mask.to(sentences.device)
        # Zeroed so that junk (even NaN) in padding slots cannot reach a real row through a 0 * NaN product.
        x = sentences.to(self._dtype()).masked_fill(~mask[..., None], 0.0)
        x = torch.cat([self.global_tokens.expand(d, g, c), x], dim=1)  # (D, G + S, C)
        real = torch.cat([mask.new_ones(d, g), mask], dim=1)  # (D, G + S)
        padding = None if bool(mask.all()) else real
        for layer in self.layers:
            x = layer(x, padding)
        x = torch.cat([x[:, :g] - self.global_tokens, x[:, g:]], dim=1)  # global rows: what the layers wrote
        keep = real & mask.any(1, keepdim=True)  # a document without sentences keeps no global rows either
        doc = torch.arange(d, device=x.device)[:, None].expand(d, g + s)  # (D, G + S)
        position = torch.cat([-1 - torch.arange(g, device=x.device), torch.arange(s, device=x.device)])
        return DocumentStates(states=x[keep], doc=doc[keep], position=position.expand(d, g + s)[keep], count=d)

    def score(self, queries: Tensor, docs: DocumentStates) -> Tensor:
        """Scores ``(B, D)`` of every query against every document of ``docs``: ``cos(q, pooled) *
        exp(logit_scale)``; ``-inf`` for a document without rows (no real sentence)."""
        c = self.config.dim
        if queries.dim() != 2 or queries.shape[-1] != c:
            raise ValueError(f"queries must have shape (B, C={c}), got {tuple(queries.shape)}")
        if not isinstance(docs, DocumentStates):
            raise TypeError(f"docs must be DocumentStates (from encode_documents), got {type(docs).__name__}")
        if docs.states.shape[-1] != c:
            raise ValueError(f"docs.states must have shape (T, C={c}), got {tuple(docs.states.shape)}")
        queries = queries.to(self._dtype())
        states = docs.states.to(device=queries.device, dtype=queries.dtype)
        doc, n = docs.doc.to(queries.device), docs.count
        b, t = queries.shape[0], states.shape[0]
        logits = self.query(queries) @ self.key(states).T / math.sqrt(c)  # (B, T)
        index = doc.expand(b, t)
        # The per-document maximum only steadies exp(); it carries no gradient of its own.
        top = logits.new_full((b, n), float("-inf")).scatter_reduce(1, index, logits.detach(), "amax")  # (B, D)
        weights = torch.exp(logits - top.gather(1, index))  # (B, T)
        total = weights.new_zeros(b, n).index_add(1, doc, weights)  # (B, D)
        weights = weights / total.gather(1, index)
        # One bag per (query, document): bag (i, j) sums weights[i, rows of j] * value(rows of j). Rows are
        # grouped by document, so bag (i, j) is rows [start_j, start_j + rows_j) of query i's block of T.
        rows = torch.bincount(doc, minlength=n)  # (D,)
        start = torch.cumsum(rows, 0) - rows
        offsets = (torch.arange(b, device=doc.device)[:, None] * t + start).reshape(-1)  # (B * D,)
        pooled = F.embedding_bag(torch.arange(t, device=doc.device).repeat(b), self.value(states), offsets,
                                 mode="sum", per_sample_weights=weights.reshape(-1))  # (B * D, C)
        pooled = pooled.view(b, n, c)  # (B, D, C)
        cos = torch.einsum("bc,bdc->bd", F.normalize(queries, dim=-1), F.normalize(pooled, dim=-1))  # (B, D)
        return torch.where(rows > 0, cos * self.logit_scale.exp(), float("-inf"))

    def forward(self, queries: Tensor, sentences: Tensor, mask: Tensor) -> Tensor:
        """``score(queries, encode_documents(sentences, mask))``: ``(B, C)``, ``(D, S, C)``, ``(D, S)`` ->
        ``(B, D)``."""
        return self.score(queries, self.encode_documents(sentences, mask))

    def extra_repr(self) -> str:
        cfg = self.config
        return f"dim={cfg.dim}, globals={cfg.globals}, window={cfg.window}, pattern={cfg.pattern}"
