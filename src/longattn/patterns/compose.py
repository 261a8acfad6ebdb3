"""Composition: union (``a | b``), intersection (``a & b``) and per-head patterns."""

from __future__ import annotations

import math
from functools import reduce
from dataclasses import field
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _as4d, _check_pattern, pattern_dataclass


def _largest_block(parts: Sequence[Pattern]) -> int | None:
    values = {p.preferred_block for p in parts} - {None}
    return max(values) if values else None


def _head_period(parts: Sequence[Pattern]) -> int | None:
    """The least common multiple of the parts' head periods: head h behaves as h % period in all."""
    values = {p.head_period for p in parts} - {None}
    return math.lcm(*values) if values else None


def _check_parts(parts: Sequence[Pattern], arg: str) -> tuple[Pattern, ...]:
    if isinstance(parts, Pattern):
        raise TypeError(f"{arg} must be a sequence of patterns, got a single {type(parts).__name__}")
    out = tuple(_check_pattern(p, f"{arg}[{n}]") for n, p in enumerate(parts))
    if not out:
        raise ValueError(f"{arg}: a composition needs at least one pattern")
    return out


class _Parts:
    """What a composition derives from its parts (mixed into the dataclasses below)."""

    parts: tuple[Pattern, ...]

    @property
    def preferred_block(self) -> int | None:
        return _largest_block(self.parts)

    @property
    def head_count_free(self) -> bool:
        return all(p.head_count_free for p in self.parts)

    @property
    def shift_invariant(self) -> bool:
        return all(p.shift_invariant for p in self.parts)

    def block_exact(self, geo: Geometry, block: int) -> bool:
        # Unions and intersections of entirely-allowed blocks are entirely allowed; per-head parts too.
        return all(p.block_exact(geo, block) for p in self.parts)


@pattern_dataclass
class _Combination(_Parts, Pattern):
    parts: tuple[Pattern, ...]
    #: a given name (``sparse_transformer``'s presets, ``causal(p)``); None names it by its parts
    label: str | None = field(default=None, compare=False)
    symbol: ClassVar[str] = "?"

    def __post_init__(self):
        parts = _check_parts(self.parts, "parts")
        # Flatten nested unnamed combinations of the same kind so names and evaluation stay shallow.
        flat: list[Pattern] = []
        for p in parts:
            flat.extend(p.parts if type(p) is type(self) and p.label is None else [p])
        object.__setattr__(self, "parts", tuple(flat))

    def _label(self) -> str:
        return self.label or "(" + f" {self.symbol} ".join(p.name for p in self.parts) + ")"

    @property
    def head_period(self) -> int | None:
        return _head_period(self.parts)

    def validate(self, geo: Geometry) -> None:
        for p in self.parts:
            p.validate(geo)

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


@pattern_dataclass
class Union(_Combination):
    symbol: ClassVar[str] = "|"
    _combine = staticmethod(torch.logical_or)


@pattern_dataclass
class Intersection(_Combination):
    symbol: ClassVar[str] = "&"
    _combine = staticmethod(torch.logical_and)


@pattern_dataclass
class PerHead(_Parts, Pattern):
    parts: tuple[Pattern, ...]  # head h uses parts[h % len(parts)]
    label: str | None = field(default=None, compare=False)  # a given name; None names it by its parts

    def __post_init__(self):
        object.__setattr__(self, "parts", _check_parts(self.parts, "patterns"))

    def _label(self) -> str:
        return self.label or "per_head[" + ", ".join(p.name for p in self.parts) + "]"

    @property
    def head_period(self) -> int:
        return math.lcm(len(self.parts), _head_period(self.parts) or 1)

    def validate(self, geo: Geometry) -> None:
        if geo.num_heads % self.head_period:
            raise ValueError(f"per_head: num_heads ({geo.num_heads}) must be a multiple of the number of "
                             f"head patterns ({self.head_period})")
        for p in self.parts:
            p.validate(geo)

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
