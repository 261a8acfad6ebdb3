"""Composition: union (``a | b``), intersection (``a & b``) and per-head patterns."""

from __future__ import annotations

import math
from functools import reduce
from typing import Sequence

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _as4d, _check_pattern


def _largest_block(parts: Sequence[Pattern]) -> int | None:
    values = {p.preferred_block for p in parts} - {None}
    return max(values) if values else None


def _head_period(parts: Sequence[Pattern]) -> int | None:
    """The least common multiple of the parts' head periods: head h behaves as h % period in all."""
    values = {p.head_period for p in parts} - {None}
    return math.lcm(*values) if values else None


class _Combination(Pattern):
    symbol = "?"

    def __init__(self, parts: Sequence[Pattern], name: str | None = None):
        parts = [_check_pattern(p, f"parts[{n}]") for n, p in enumerate(parts)]
        if not parts:
            raise ValueError("a composition needs at least one pattern")
        # Flatten nested combinations of the same kind so names and evaluation stay shallow.
        flat: list[Pattern] = []
        for p in parts:
            flat.extend(p.parts if type(p) is type(self) and p._auto_name else [p])
        self.parts = flat
        self._auto_name = name is None
        self.name = name or "(" + f" {self.symbol} ".join(p.name for p in flat) + ")"
        self.preferred_block = _largest_block(flat)
        self.head_period = _head_period(flat)
        self.head_count_free = all(p.head_count_free for p in flat)

    @property
    def key(self):
        keys = [p.key for p in self.parts]
        return None if any(k is None for k in keys) else (self.symbol, *keys)

    def validate(self, geo: Geometry) -> None:
        for p in self.parts:
            p.validate(geo)

    def block_exact(self, geo: Geometry, block: int) -> bool:
        # Unions and intersections of entirely-allowed blocks are entirely allowed.
        return all(p.block_exact(geo, block) for p in self.parts)

    @staticmethod
    def _combine(a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        fns = [p._allowed_fn(geo, device) for p in self.parts]
        combine = self._combine

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            out = fns[0](b, h, i, j)
            for f in fns[1:]:  # a plain loop, not functools.reduce: torch.compile traces it
                out = combine(out, f(b, h, i, j))
            return out

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        # Union of supersets is a superset of the union; same for intersections.
        return reduce(self._combine, (_as4d(p._candidates(geo, block, device)) for p in self.parts))


class Union(_Combination):
    symbol = "|"
    _combine = staticmethod(torch.logical_or)


class Intersection(_Combination):
    symbol = "&"
    _combine = staticmethod(torch.logical_and)


class PerHead(Pattern):
    def __init__(self, patterns: Sequence[Pattern], name: str | None = None):
        self.parts = [_check_pattern(p, f"patterns[{n}]") for n, p in enumerate(patterns)]
        if not self.parts:
            raise ValueError("per_head needs at least one pattern")
        self.head_period = math.lcm(len(self.parts), _head_period(self.parts) or 1)
        self.preferred_block = _largest_block(self.parts)
        self.head_count_free = all(p.head_count_free for p in self.parts)
        self.name = name or "per_head[" + ", ".join(p.name for p in self.parts) + "]"

    @property
    def key(self):
        keys = [p.key for p in self.parts]
        return None if any(k is None for k in keys) else ("per_head", *keys)

    def validate(self, geo: Geometry) -> None:
        if geo.num_heads % self.head_period:
            raise ValueError(f"per_head: num_heads ({geo.num_heads}) must be a multiple of the number of "
                             f"head patterns ({self.head_period})")
        for p in self.parts:
            p.validate(geo)

    def block_exact(self, geo: Geometry, block: int) -> bool:
        return all(p.block_exact(geo, block) for p in self.parts)

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        fns = [p._allowed_fn(geo, device) for p in self.parts]
        n = len(fns)

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            out = fns[0](b, h, i, j)
            for k in range(1, n):
                out = torch.where(h % n == k, fns[k](b, h, i, j), out)
            return out

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        h = torch.arange(geo.num_heads, device=device).view(1, -1, 1, 1) % len(self.parts)
        out = _as4d(self.parts[0]._candidates(geo, block, device))
        for k in range(1, len(self.parts)):
            out = torch.where(h == k, _as4d(self.parts[k]._candidates(geo, block, device)), out)
        return out


def per_head(patterns: Sequence[Pattern], name: str | None = None) -> Pattern:
    """Head ``h`` uses ``patterns[h % len(patterns)]``; the number of heads must be a multiple of it."""
    return PerHead(patterns, name)
