"""Packed documents: several documents in one sequence, each attending only within itself.

Packing (unpadding) is how ModernBERT-style encoders and most LM trainers avoid computing on padding: a
batch of documents of different lengths becomes one sequence (or a few), and attention is block-diagonal
over the documents. Composed with a local pattern it keeps both limits:
``documents(lengths) & sliding_window(256)`` is a window that never crosses a document boundary.

Positions after the last document (the tail of a pack that is not full) belong to no document: they
attend nothing (their rows output zeros) and nothing attends them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, Snapshot, block_ranges, pattern_dataclass

PAD = -1  # the document id of positions outside every document


def run_starts(ids: Tensor) -> Tensor:
    """(B, N) bool: True where a run of equal ids begins (position 0 and every change of id)."""
    start = torch.ones_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return start


def segment_ids(lengths: Sequence[int], n: int | None = None, *, device: torch.device | str = "cpu") -> Tensor:
    """(N,) long: the document of every position of a pack of documents of ``lengths`` (``PAD`` after the
    last one, up to ``n``)."""
    total = sum(lengths)
    n = total if n is None else n
    if n < total:
        raise ValueError(f"lengths add up to {total}, more than the sequence's {n} positions")
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(list(lengths), device=device))
    return torch.cat([ids, torch.full((n - total,), PAD, dtype=torch.long, device=device)])


def lengths_to_ids(lengths: Sequence[Sequence[int]] | Sequence[int], n: int | None = None) -> Tensor:
    """(B, N) segment ids from per-example document lengths (a list of ints is one example)."""
    rows = [lengths] if lengths and isinstance(lengths[0], int) else list(lengths)
    n = max(sum(r) for r in rows) if n is None else n
    return torch.stack([segment_ids(r, n) for r in rows])


@pattern_dataclass
class Documents(Pattern):
    #: (B', N) long document id of each position (PAD outside documents), held by content
    ids: Snapshot

    def __post_init__(self):
        ids = self.ids
        if isinstance(ids, Snapshot):
            return
        if not isinstance(ids, Tensor) or ids.dtype in (torch.bool,) or ids.is_floating_point():
            raise TypeError("documents: segment ids must be an integer tensor of shape (N,) or (B, N)")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"documents: segment ids must have shape (N,) or (B, N), got {tuple(ids.shape)}")
        ids = ids.long()
        if bool((ids < PAD).any()):
            raise ValueError(f"documents: segment ids must be >= 0 ({PAD} marks positions in no document)")
        # A document is one contiguous run: an id that comes back after another would silently join two
        # distant runs into one document.
        for row, start in zip(ids, run_starts(ids)):
            runs = row[start]
            runs = runs[runs != PAD]
            if runs.numel() != runs.unique().numel():
                raise ValueError("documents: each document must be one contiguous run of positions; an id "
                                 "appears in two separate runs")
        object.__setattr__(self, "ids", Snapshot(ids))

    @property
    def table(self) -> Tensor:
        return self.ids.tensor

    def _label(self) -> str:
        ids = self.table
        if ids.shape[0] > 1:
            return "documents_per_example"
        counts = torch.unique_consecutive(ids[0], return_counts=True)
        lengths = [int(c) for v, c in zip(*counts) if int(v) != PAD]
        shown = ",".join(map(str, lengths[:4])) + (",..." if len(lengths) > 4 else "")
        return f"documents_{shown}"

    def validate(self, geo: Geometry) -> None:
        b, n = self.table.shape
        if n > geo.kv_len or b not in (1, geo.batch):
            raise ValueError(f"documents: segment ids must have shape (B, N) with B in (1, {geo.batch}) and N at "
                             f"most the key length {geo.kv_len}, got ({b}, {n})")

    def _ids(self, geo: Geometry, device: torch.device) -> Tensor:
        """(B', Nk): the ids, the positions past the last given one in no document."""
        ids = self.table.to(device)
        return torch.nn.functional.pad(ids, (0, geo.kv_len - ids.shape[1]), value=PAD)

    def _runs(self, geo: Geometry, device: torch.device) -> Tensor:
        """(B', Nk) long: the number of the run of equal ids each position is in, non-decreasing along
        positions; two positions share a document only if they share a run."""
        return run_starts(self._ids(geo, device)).long().cumsum(-1)

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        ids = self._ids(geo, device)
        last = geo.kv_len - 1
        # Positions are clamped because kernels also evaluate padding rows/columns (masked afterwards).
        if ids.shape[0] == 1:
            row = ids[0]
            return lambda b, h, i, j: (row[i.clamp(0, last)] == row[j.clamp(0, last)]) & (row[j.clamp(0, last)] != PAD)
        return lambda b, h, i, j: (ids[b, i.clamp(0, last)] == ids[b, j.clamp(0, last)]) & (ids[b, j.clamp(0, last)] != PAD)

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        real = self._runs(geo, device)  # (B', Nk), non-decreasing (runs of PAD positions listed too: the
        # plan drops their blocks exactly)
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        last = geo.kv_len - 1
        # Run numbers only grow along positions: a block holds the runs between those of its two ends.
        qa, qb = real[:, q_lo.clamp(0, last)], real[:, q_hi.clamp(0, last)]  # (B', nQB, 1)
        ka, kb = real[:, k_lo.clamp(0, last)], real[:, k_hi.clamp(0, last)]  # (B', 1, nKB)
        return ((qa <= kb) & (ka <= qb)).unsqueeze(1)


def documents(lengths: Sequence[int] | Sequence[Sequence[int]] | None = None, *,
              segment_ids: Tensor | None = None) -> Pattern:
    """Packed documents: query i attends key j when both lie in the same document.

    Give either ``lengths`` (the documents' lengths in packing order; a list of such lists for a batch
    whose examples are packed differently; positions after the last document belong to none) or
    ``segment_ids``, an integer tensor ``(N,)`` or ``(B, N)`` naming each position's document, each
    document one contiguous run and ``-1`` for positions in no document. Positions past the last one given
    (a pack shorter than the keys) are in no document; rows in no document output zeros.

    Compose it with a local pattern to keep a window inside each document:
    ``documents([300, 212]) & sliding_window(64)``.
    """
    if (lengths is None) == (segment_ids is None):
        raise ValueError("documents: give either lengths or segment_ids")
    if segment_ids is None:
        flat = [lengths] if lengths and isinstance(lengths[0], int) else list(lengths)
        for row in flat:
            if not row or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in row):
                raise ValueError(f"documents: lengths must be positive ints, got {list(row)!r}")
        segment_ids = lengths_to_ids(lengths)
    return Documents(segment_ids)
