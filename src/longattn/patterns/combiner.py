"""Combiner's key layouts (Ren et al., NeurIPS 2021): which keys of ``[summary slots; tokens]`` a query attends.

Combiner attends each query *directly* to the keys of its own region and *indirectly* to every other region
through one summary key and value per region. ``longattn.modules.combiner`` puts the ``S`` summaries in front
of the ``N`` token keys, so the keys are ``[slots (S); tokens (N)]`` and, by the bottom-right alignment, query
``i`` sits at absolute position ``S + i``, over token key ``S + i`` (with a memory, the ``Nq`` queries are the
last ``Nq`` tokens: query ``r`` over token ``N - Nq + r``). These patterns say which of those keys
each query may attend; the module computes the summaries and runs one ``attention`` call, whose single softmax
over direct keys and summaries is Combiner's factorisation.

- ``combiner_fixed(region, slots)``: regions are the fixed blocks ``[r * region, (r + 1) * region)``; slot
  ``r`` summarises block ``r``. Query ``i`` attends the tokens of its own block directly and every other
  block's slot (causal: its own block up to ``i``, and the slots of blocks wholly before it).
- ``combiner_logsparse(length)``: regions are the dyadic blocks of every level ``l``
  (``[b 2^l, (b + 1) 2^l)``, level ``l``'s slots after those of the levels below). Query ``i`` attends itself
  directly and, at every level, the *sibling* of the level-``l`` block holding it (``b = (i >> l) ^ 1``): the
  siblings over all levels partition every position but ``i``. Causal: only siblings before ``i`` (the
  reference's past tiling: ``i = 13`` reads ``[12, 13)``, ``[8, 12)``, ``[0, 8)``).
- ``combiner_axial(width, rows)``: the tokens as rows of ``width``; row ``p``'s slots are contiguous: slot
  ``p * width + c`` summarises column ``c`` above row ``p`` (causal), or slots ``2 p width + c`` and
  ``2 p width + width + c`` column ``c`` above and below row ``p`` (bidirectional). Query ``i`` attends its own
  row directly (causal: up to ``i``) and its row's ``width`` (or ``2 width``) slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _check_int, block_ranges, pattern_dataclass


def _check_keys(geo: Geometry, slots: int, name: str, fits) -> None:
    """The keys are ``[slots; tokens]`` with ``fits(tokens)`` (the layout was built for that many tokens) and the
    queries the last ``Nq <= tokens`` of them (all of them in self-attention; the newest with a memory)."""
    tokens = geo.kv_len - slots
    if tokens < geo.q_len or not fits(tokens):
        raise ValueError(f"{name}: the keys must be [{slots} summary slots; the tokens], the queries the last "
                         f"tokens; got Nk={geo.kv_len} for Nq={geo.q_len}")


def _same_chunk(i: Tensor, j: Tensor, slots: int, size: int, causal: bool) -> Tensor:
    """Token key ``j`` lies in query ``i``'s chunk of ``size`` tokens (both after the ``slots`` summaries)."""
    chunk = lambda t: torch.div(t - slots, size, rounding_mode="floor")  # noqa: E731
    token = (j >= slots) & (chunk(j) == chunk(i))
    return token & (j <= i) if causal else token


def _same_chunk_blocks(q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, slots: int, size: int,
                       causal: bool) -> Tensor:
    """``_same_chunk`` at block level: the key blocks that may hold a token of a query's chunk."""
    chunk = lambda t: torch.div(t - slots, size, rounding_mode="floor")  # noqa: E731
    token = (k_hi >= slots) & (chunk(k_hi) >= chunk(q_lo)) & (chunk(k_lo.clamp(min=slots)) <= chunk(q_hi))
    return token & (k_lo <= q_hi) if causal else token


@pattern_dataclass
class CombinerFixed(Pattern):
    region: int  # tokens per region (the fixed block size)
    slots: int  # summary slots in front of the tokens: one per region, ceil(N / region)
    causal: bool = False
    _name_format = "combiner_fixed_{region}_{slots}_{causal}"

    def __post_init__(self):
        _check_int(self.region, "region", minimum=1)
        _check_int(self.slots, "slots", minimum=1)

    def validate(self, geo: Geometry) -> None:
        _check_keys(geo, self.slots, "combiner_fixed", lambda n: -(-n // self.region) == self.slots)

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        s, region = self.slots, self.region

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            own = torch.div(i - s, region, rounding_mode="floor")
            slot = (j < s) & ((j < own) if self.causal else (j != own))
            return _same_chunk(i, j, s, region, self.causal) | slot

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        s, region = self.slots, self.region
        token = _same_chunk_blocks(q_lo, q_hi, k_lo, k_hi, s, region, self.causal)
        if self.causal:  # some slot before some query's region
            slot = (k_lo < s) & (k_lo < torch.div(q_hi - s, region, rounding_mode="floor"))
        else:  # every slot but the queries' own (the plan drops a block that holds only that one)
            slot = k_lo < s
        return token | slot


@pattern_dataclass
class CombinerLogsparse(Pattern):
    length: int  # N, the tokens: level l holds ceil(N / 2^l) slots, levels until one block covers N
    causal: bool = False
    _name_format = "combiner_logsparse_{length}_{causal}"

    def __post_init__(self):
        _check_int(self.length, "length", minimum=1)

    @property
    def slots_per_level(self) -> tuple[int, ...]:
        return logsparse_levels(self.length)

    @property
    def slots(self) -> int:
        return sum(self.slots_per_level)

    def validate(self, geo: Geometry) -> None:
        _check_keys(geo, self.slots, "combiner_logsparse", lambda n: n == self.length)

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        s = self.slots
        # per slot: its level and its index within the level, looked up (a gather FlexAttention can compile;
        # a searchsorted it cannot, and comparing with every level's offset is 2-5x slower)
        counts = torch.tensor(self.slots_per_level, device=device)
        level_of = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)  # (S,)
        index_of = torch.arange(s, device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            i, j = torch.broadcast_tensors(i, j)
            token = (j >= s) & (j == i)
            slot_j = j.clamp(0, s - 1)
            level = level_of[slot_j]
            sibling = torch.bitwise_right_shift(i - s, level) ^ 1
            slot = (j < s) & (index_of[slot_j] == sibling)
            if self.causal:
                slot = slot & (sibling < torch.bitwise_right_shift(i - s, level))
            return token | slot

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        s = self.slots
        out = (k_lo <= q_hi) & (k_hi >= q_lo) & (k_hi >= s)  # the diagonal: each query itself
        start = 0
        for level, count in enumerate(self.slots_per_level):
            lo = torch.bitwise_right_shift(q_lo - s, level) - 1  # the siblings of the queries' blocks lie
            hi = torch.bitwise_right_shift(q_hi - s, level) + (0 if self.causal else 1)  # within [lo, hi]
            lo, hi = lo.clamp(min=0) + start, hi.clamp(max=count - 1) + start
            out = out | ((k_lo <= hi) & (k_hi >= lo) & (k_lo < start + count) & (k_hi >= start))
            start += count
        return out


@pattern_dataclass
class CombinerAxial(Pattern):
    width: int  # tokens per row
    rows: int  # rows of the layout, ceil(N / width)
    causal: bool = False
    _name_format = "combiner_axial_{width}_{rows}_{causal}"

    def __post_init__(self):
        _check_int(self.width, "width", minimum=1)
        _check_int(self.rows, "rows", minimum=1)

    @property
    def slots(self) -> int:
        return self.rows * self.width * (1 if self.causal else 2)

    def validate(self, geo: Geometry) -> None:
        _check_keys(geo, self.slots, "combiner_axial", lambda n: -(-n // self.width) == self.rows)

    def _row_of_slot(self, j: Tensor) -> Tensor:
        """The query row a slot serves (each row's slots contiguous: above, then below when bidirectional)."""
        return torch.div(j, self.width * (1 if self.causal else 2), rounding_mode="floor")

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        s, w = self.slots, self.width

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            row = torch.div(i - s, w, rounding_mode="floor")
            return _same_chunk(i, j, s, w, self.causal) | ((j < s) & (self._row_of_slot(j) == row))

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        s, w = self.slots, self.width
        row = lambda t: torch.div(t - s, w, rounding_mode="floor")  # noqa: E731  token position -> row
        token = _same_chunk_blocks(q_lo, q_hi, k_lo, k_hi, s, w, self.causal)
        lo, hi = self._row_of_slot(k_lo), self._row_of_slot(k_hi.clamp(max=s - 1))  # rows served by the block
        return token | ((k_lo < s) & (hi >= row(q_lo)) & (lo <= row(q_hi)))


def combiner_axial(width: int, length: int, *, causal: bool = False) -> Pattern:
    """Combiner-Axial's keys ``[slots; tokens]`` for ``length`` tokens in rows of ``width``."""
    _check_int(length, "length", minimum=1)
    return CombinerAxial(width, -(-length // width), causal)


def combiner_fixed(region: int, slots: int, *, causal: bool = False) -> Pattern:
    """Combiner-Fixed's keys ``[slots; tokens]`` (see the module docstring); ``slots = ceil(N / region)``."""
    return CombinerFixed(region, slots, causal)


def combiner_logsparse(length: int, *, causal: bool = False) -> Pattern:
    """Combiner-Logsparse's keys ``[slots; tokens]`` for ``length`` tokens (see the module docstring)."""
    return CombinerLogsparse(length, causal)


def logsparse_levels(length: int) -> tuple[int, ...]:
    """Slots per level: ``ceil(length / 2^l)`` for ``l = 0 ..`` until a block of ``2^(l+1)`` covers it all."""
    counts, size = [], 1
    while True:
        counts.append(-(-length // size))
        if 2 * size >= length:
            return tuple(counts)
        size *= 2
