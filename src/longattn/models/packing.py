"""Packed batches: documents of different lengths in a few rows without padding.

A padded batch of long-tailed lengths (most documents short, a few long) spends most of its compute on
padding: every example is as long as the longest. Packing puts the documents one after another in rows
of at most ``row_len`` tokens; the ``documents`` pattern (``patterns/documents.py``) keeps each
document's attention inside itself, positions restart at every document, and ``unpack`` gives each
document's states back. The encoders take the pack's ``segment_ids`` (``LongformerModel``,
``SparseEncoderClassifier``).

Notation: D documents, R rows, L the row length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..patterns.documents import PAD, run_starts


@dataclass(frozen=True)
class PackedBatch:
    """Documents packed into rows (first fit, in the given order)."""

    input_ids: Tensor  # (R, L) tokens, ``pad_id`` after each row's last document
    segment_ids: Tensor  # (R, L) long: the document number (0..D-1) of each position, PAD (-1) after the last
    positions: Tensor  # (R, L) long: each token's position within its document (0 at PAD)
    rows: tuple[int, ...]  # (D,) the row of each document
    starts: tuple[int, ...]  # (D,) its first position in that row
    lengths: tuple[int, ...]  # (D,) its length

    @property
    def real(self) -> Tensor:
        """(R, L) bool: True on document tokens."""
        return self.segment_ids != PAD

    @property
    def first_tokens(self) -> tuple[Tensor, Tensor]:
        """(rows, positions) of every document's first token, for pooling (CLS) per document."""
        return torch.tensor(self.rows), torch.tensor(self.starts)


def layout(lengths: Sequence[int], row_len: int | None = None) -> tuple[list[int], list[int], int, int]:
    """First fit of documents of ``lengths`` into rows of at most ``row_len`` positions (default: one row):
    each document's row and start, the number of rows and the longest row."""
    if not lengths or min(lengths) < 1:
        raise ValueError("pack: every document must be non-empty")
    row_len = sum(lengths) if row_len is None else row_len
    if max(lengths) > row_len:
        raise ValueError(f"pack: a document of {max(lengths)} positions does not fit row_len={row_len}")
    fill: list[int] = []
    rows, starts = [], []
    for n in lengths:
        row = next((r for r, used in enumerate(fill) if used + n <= row_len), None)
        if row is None:
            row = len(fill)
            fill.append(0)
        rows.append(row)
        starts.append(fill[row])
        fill[row] += n
    return rows, starts, len(fill), max(fill)


def segments(rows: Sequence[int], starts: Sequence[int], lengths: Sequence[int], shape: tuple[int, int],
             device: torch.device | str = "cpu") -> Tensor:
    """(R, L) long segment ids of a layout: the document number, PAD where there is none."""
    seg = torch.full(shape, PAD, dtype=torch.long, device=device)
    for d, (row, start, n) in enumerate(zip(rows, starts, lengths)):
        seg[row, start:start + n] = d
    return seg


def pack(documents: Sequence[Tensor], *, row_len: int | None = None, pad_id: int = 0) -> PackedBatch:
    """Pack 1-D token tensors into rows of at most ``row_len`` tokens (default: all in one row), each
    document into the first row with room for it (first fit, the order kept within a row)."""
    if not documents:
        raise ValueError("pack: no documents")
    if any(d.dim() != 1 for d in documents):
        raise ValueError("pack: every document must be a 1-D token tensor")
    lengths = [int(d.numel()) for d in documents]
    rows, starts, count, width = layout(lengths, row_len)
    ids = torch.full((count, width), pad_id, dtype=documents[0].dtype)
    for doc, row, start, n in zip(documents, rows, starts, lengths):
        ids[row, start:start + n] = doc
    seg = segments(rows, starts, lengths, (count, width))
    return PackedBatch(ids, seg, document_positions(seg), tuple(rows), tuple(starts), tuple(lengths))


def unpack(states: Tensor, packed: PackedBatch) -> list[Tensor]:
    """Each document's rows of ``states (R, L, ...)``: a list of (n_d, ...) views."""
    return [states[row, start:start + n] for row, start, n in zip(packed.rows, packed.starts, packed.lengths)]


def document_positions(segment_ids: Tensor) -> Tensor:
    """(B, N) long: each position's offset within its document (runs of equal ids), 0 on PAD positions."""
    n = segment_ids.shape[-1]
    index = torch.arange(n, device=segment_ids.device).expand_as(segment_ids)
    first = torch.where(run_starts(segment_ids), index, torch.zeros_like(index)).cummax(-1).values  # run starts
    return (index - first).masked_fill(segment_ids == PAD, 0)
