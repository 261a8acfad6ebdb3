"""The `Pattern` base class and the block-range helpers that every pattern shares.

Notation: b batch, h head, i query position, j key position. Positions are *absolute*: when the query
length Nq differs from the key length Nk, query row ``r`` sits at ``i = r + Nk - Nq`` (bottom-right
alignment, as FlashAttention), so one pattern serves self-attention, memory and KV caches alike.

A pattern is written once as ``allowed(b, h, i, j) -> bool tensor`` using tensor operations only, so
that the same function broadcasts over grids (dense oracle, gathered blocks) and runs under ``vmap``
inside FlexAttention. Block-level knowledge comes from ``_candidates``: a cheap, *conservative* block
layout (a superset of the blocks holding an allowed pair) that ``layout.build_plan`` refines exactly.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Callable, ClassVar, Hashable, TypeVar

try:
    from typing import dataclass_transform
except ImportError:  # Python 3.10: torch depends on typing_extensions
    from typing_extensions import dataclass_transform

import torch
from torch import Tensor

AllowedFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
P = TypeVar("P", bound="Pattern")


@dataclass(frozen=True)
class Geometry:
    """Everything besides positions that a pattern may depend on."""

    q_len: int  # Nq, number of query rows
    kv_len: int  # Nk, number of keys
    num_heads: int = 1  # H; per-head patterns need H to be a multiple of their head count
    batch: int = 1  # B; per-example patterns (global tokens chosen per input) need it

    @property
    def offset(self) -> int:
        """Absolute position of query row 0 (bottom-right alignment)."""
        return self.kv_len - self.q_len


def make_geometry(q_len: int, kv_len: int | None = None, num_heads: int = 1, batch: int = 1) -> Geometry:
    kv_len = q_len if kv_len is None else kv_len
    for name, value in (("q_len", q_len), ("kv_len", kv_len), ("num_heads", num_heads), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return Geometry(q_len, kv_len, num_heads, batch)


class Pattern:
    """A sparse attention pattern: which key ``j`` each query ``i`` may attend.

    Compose with ``a | b`` (union), ``a & b`` (intersection) and ``per_head([...])``.
    Subclasses implement ``_allowed_fn`` and, where a cheap bound exists, ``_candidates``.

    Identity is derived, never written by hand: a pattern class is a frozen ``@dataclass`` whose fields are
    its parameters (``@pattern_dataclass``). Equality and hash are the dataclass's; ``key`` (what the plan,
    schedule and mask caches are keyed by) and ``name`` are built here from the same fields, so a new field
    can never be forgotten in a cache key. Fields declared with ``compare=False`` are presentation only
    (a composition's given name) and take no part in either.

    A plain (non-dataclass) subclass still works: it sets ``name`` in ``__init__`` (or overrides it) and
    overrides ``key`` with its own hashable, or leaves it None (never cached); its equality is identity.
    """

    #: number of distinct per-head patterns (``per_head``); None when every head is the same
    head_period: int | None = None
    #: the block size a block-structured pattern is defined on (BigBird), or None
    preferred_block: int | None = None
    #: True when ``allowed(i, j)`` depends only on ``j - i`` (and the head): the pattern means the same in
    #: every packed document, so ``documents(...) & pattern`` equals running each document alone
    shift_invariant: bool = False
    #: False when the mask of a head depends on the number of heads (tables drawn for H heads);
    #: otherwise head h behaves as head h % head_period, which lets plans evaluate one period only
    head_count_free: bool = True
    #: ``name`` of a dataclass pattern: a format over its fields, e.g. ``"dilated_{window}_{dilation}"``;
    #: None joins the class name and every field value with ``_``
    _name_format: ClassVar[str | None] = None

    # ---- what subclasses implement -------------------------------------------------------------
    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        raise NotImplementedError

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        """(B', H', nQB, nKB) bool: blocks that *may* hold an allowed pair. Default: all of them."""
        return torch.ones(1, 1, _cdiv(geo.q_len, block), _cdiv(geo.kv_len, block), dtype=torch.bool, device=device)

    def block_exact(self, geo: Geometry, block: int) -> bool:
        """True when ``_candidates`` at this block size lists exactly the allowed blocks and each of them is
        allowed entirely (block-level patterns on their own grid), so no token mask is ever needed."""
        return False

    def validate(self, geo: Geometry) -> None:
        """Raise ValueError when the pattern cannot apply to ``geo`` (index out of range, ...)."""

    def _label(self) -> str:
        """The readable name of a dataclass pattern, from its fields (override for a special layout)."""
        values = {f.name: getattr(self, f.name) for f in _identity_fields(self)}
        if self._name_format is not None:
            return self._name_format.format(**values)
        return "_".join([type(self).__name__.lower(), *map(str, values.values())])

    # ---- identity ------------------------------------------------------------------------------
    @property
    def key(self) -> Hashable | None:
        """Hashable identity for caches, derived from the dataclass fields: ``(class, *field keys)``, where
        a pattern field contributes its own key and a tensor its content. None (nothing is cached) when the
        pattern is not a dataclass, or holds a part whose key is None."""
        if not is_dataclass(self):
            return None
        cached = self.__dict__.get("_key", _MISSING)
        if cached is _MISSING:
            cached = _key_of(tuple(getattr(self, f.name) for f in _identity_fields(self)))
            cached = None if cached is None else (type(self), *cached)
            object.__setattr__(self, "_key", cached)  # fields are frozen, so the key never goes stale
        return cached

    @property
    def name(self) -> str:
        """A readable label (plots, benchmark tables, ``mask_mod.__name__``), e.g. ``sliding_window_256``."""
        given = self.__dict__.get("_given_name")
        if given is not None:
            return given
        return self._label() if is_dataclass(self) else type(self).__name__.lower()

    @name.setter
    def name(self, value: str) -> None:
        # Plain subclasses name themselves in __init__; dataclass patterns are frozen and never get here.
        self.__dict__["_given_name"] = value

    # ---- public API ----------------------------------------------------------------------------
    def allowed_fn(self, geo: Geometry, device: torch.device | str = "cpu") -> AllowedFn:
        """``allowed(b, h, i, j)`` on absolute positions, validated for ``geo``."""
        self.validate(geo)
        return self._allowed_fn(geo, torch.device(device))

    def candidates(self, geo: Geometry, block: int, device: torch.device | str = "cpu") -> Tensor:
        self.validate(geo)
        return _as4d(self._candidates(geo, block, torch.device(device)))

    def mask_mod(self, q_len: int, kv_len: int | None = None, *, num_heads: int = 1, batch_size: int = 1,
                 device: torch.device | str = "cpu") -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for these lengths (alignment applied)."""
        geo = make_geometry(q_len, kv_len, num_heads, batch_size)
        allowed = self.allowed_fn(geo, device)
        offset = geo.offset

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return allowed(b, h, q_idx + offset, kv_idx)

        mask_mod.__name__ = self.name
        return mask_mod

    def dense(self, q_len: int, kv_len: int | None = None, *, num_heads: int = 1, batch_size: int = 1,
              device: torch.device | str = "cpu") -> Tensor:
        """The oracle: a bool mask ``(H, Nq, Nk)``, or ``(B, H, Nq, Nk)`` for per-example patterns."""
        geo = make_geometry(q_len, kv_len, num_heads, batch_size)
        mask = dense_mask(self.allowed_fn(geo, device), geo, torch.device(device))
        return _drop_unit_batch(mask, geo)

    def block_layout(self, q_len: int, kv_len: int | None = None, *, block: int = 64, num_heads: int = 1,
                     batch_size: int = 1, device: torch.device | str = "cpu") -> Tensor:
        """Exact block layout ``(H, ceil(Nq/block), ceil(Nk/block))`` (``(B, H, ...)`` per-example):
        True where the block holds at least one allowed pair."""
        from .layout import get_plan

        geo = make_geometry(q_len, kv_len, num_heads, batch_size)
        plan = get_plan(self, geo, block, torch.device(device))
        return _drop_unit_batch(plan.layout().expand(-1, num_heads, -1, -1), geo)

    def density(self, q_len: int, kv_len: int | None = None, *, num_heads: int = 1, batch_size: int = 1,
                block: int = 64) -> float:
        """Fraction of (query, key) pairs allowed, averaged over batch and heads."""
        from .layout import get_plan

        geo = make_geometry(q_len, kv_len, num_heads, batch_size)
        return get_plan(self, geo, block, torch.device("cpu")).density

    def __or__(self, other: "Pattern") -> "Pattern":
        from .compose import Union

        return Union([self, _check_pattern(other, "other")])

    def __and__(self, other: "Pattern") -> "Pattern":
        from .compose import Intersection

        return Intersection([self, _check_pattern(other, "other")])

    def __repr__(self) -> str:
        return self.name


_MISSING = object()


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def pattern_dataclass(cls: type[P]) -> type[P]:
    """Make a ``Pattern`` subclass a frozen dataclass of its parameters (its identity, see ``Pattern``).

    ``repr`` stays the readable ``name``. Validation and normalisation (a list of parts to a tuple, a
    tensor to a ``Snapshot``) go in ``__post_init__``, with ``object.__setattr__`` for normalised values.
    """
    if not issubclass(cls, Pattern):
        raise TypeError(f"pattern_dataclass applies to Pattern subclasses, got {cls.__name__}")
    return dataclass(frozen=True, repr=False)(cls)


def _identity_fields(pattern: Pattern) -> tuple[Field, ...]:
    return tuple(f for f in fields(pattern) if f.compare)


def _key_of(value: object) -> Hashable | None:
    """The cache key of one field value; None when it (or a part of it) cannot be keyed."""
    if isinstance(value, Pattern):
        return value.key
    if isinstance(value, (tuple, list)):
        keys = tuple(_key_of(v) for v in value)
        return None if any(k is None and v is not None for k, v in zip(keys, value)) else keys
    if isinstance(value, Tensor):
        raise TypeError("a pattern field holding a tensor must wrap it in Snapshot (keyed by content)")
    return value


class Snapshot:
    """A tensor parameter held by content: a private copy, compared and hashed by its values.

    Two patterns built from equal tensors are equal and share cached plans (batches with the same global
    positions reuse them); editing the caller's tensor afterwards changes nothing here.
    """

    def __init__(self, tensor: Tensor):
        self.tensor = tensor.detach().clone()
        t = self.tensor.cpu()
        # Bool masks are keyed by their True positions: short for the sparse masks patterns hold.
        content = tuple(map(tuple, t.nonzero().tolist())) if t.dtype == torch.bool else tuple(t.flatten().tolist())
        self.content_key = (str(t.dtype), tuple(t.shape), content)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and self.content_key == other.content_key

    def __hash__(self) -> int:
        return hash(self.content_key)

    def __repr__(self) -> str:
        return f"Snapshot({self.tensor.dtype}, shape={tuple(self.tensor.shape)})"


# ---- helpers shared by the pattern files ---------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_pattern(p: object, arg: str) -> Pattern:
    if not isinstance(p, Pattern):
        raise TypeError(f"{arg} must be a longattn Pattern, got {type(p).__name__}")
    return p


#: the largest length or reach a pattern takes (about 10**12 tokens): longer than any sequence, and far below
#: where index arithmetic in int64 overflows; full() is the pattern that reaches every key
MAX_EXTENT = 2**40


def _check_int(value: object, name: str, *, minimum: int = 0, maximum: int = MAX_EXTENT) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum:,}, got {value:,}" + (
            " (longer than any sequence: full() attends every key)" if maximum == MAX_EXTENT else ""))
    return value


def _as4d(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _drop_unit_batch(mask: Tensor, geo: Geometry) -> Tensor:
    # Batch-invariant patterns report (H, ...); per-example ones keep (B, H, ...).
    return mask[0] if mask.shape[0] == 1 else mask.expand(geo.batch, *mask.shape[1:])


def position_grid(geo: Geometry, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Broadcastable b (B,1,1,1), h (1,H,1,1), absolute i (1,1,Nq,1) and j (1,1,1,Nk)."""
    b = torch.arange(geo.batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(geo.num_heads, device=device).view(1, -1, 1, 1)
    i = (torch.arange(geo.q_len, device=device) + geo.offset).view(1, 1, -1, 1)
    j = torch.arange(geo.kv_len, device=device).view(1, 1, 1, -1)
    return b, h, i, j


def dense_mask(allowed: AllowedFn, geo: Geometry, device: torch.device) -> Tensor:
    """Evaluate ``allowed`` on the full grid: bool (B', H', Nq, Nk) with B', H' in {1, B/H}."""
    b, h, i, j = position_grid(geo, device)
    mask = allowed(b, h, i, j)
    shape = torch.broadcast_shapes(mask.shape, (1, 1, geo.q_len, geo.kv_len))
    return mask.expand(shape)


def block_ranges(geo: Geometry, block: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Absolute first/last position of each query block (nQB, 1) and key block (1, nKB), inclusive.

    Query blocks are blocks of query *rows*; their absolute positions are shifted by the offset.
    """
    qb = torch.arange(_cdiv(geo.q_len, block), device=device)
    kb = torch.arange(_cdiv(geo.kv_len, block), device=device)
    q_lo = qb * block + geo.offset
    q_hi = torch.clamp((qb + 1) * block, max=geo.q_len) - 1 + geo.offset
    k_lo = kb * block
    k_hi = torch.clamp((kb + 1) * block, max=geo.kv_len) - 1
    return q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :]


def any_in_range(flags: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Whether ``flags[..., p]`` is True for some p in [lo, hi] (inclusive; out-of-range p are False).

    ``flags`` is (..., N) bool; ``lo``/``hi`` broadcast against each other. Returns (..., *lo/hi shape)
    computed with prefix sums, so any block size and alignment is exact.
    """
    n = flags.shape[-1]
    csum = torch.nn.functional.pad(flags.long().cumsum(-1), (1, 0))  # csum[p] = count in [0, p)
    lo_c = lo.clamp(0, n)
    hi_c = (hi + 1).clamp(0, n)
    lead = flags.shape[:-1]
    idx_shape = torch.broadcast_shapes(lo.shape, hi.shape)
    flat_lo = lo_c.expand(idx_shape).reshape(-1)
    flat_hi = hi_c.expand(idx_shape).reshape(-1)
    counts = csum[..., flat_hi] - csum[..., flat_lo]
    return (counts > 0).view(*lead, *idx_shape)


def any_in_rect(table: Tensor, r_lo: Tensor, r_hi: Tensor, c_lo: Tensor, c_hi: Tensor) -> Tensor:
    """Whether ``table[..., r, c]`` holds a True for r in [r_lo, r_hi], c in [c_lo, c_hi] (inclusive).

    ``r_lo``/``r_hi`` are (R, 1), ``c_lo``/``c_hi`` (1, C); returns (..., R, C). Uses 2-D prefix sums.
    """
    nr, nc = table.shape[-2:]
    csum = torch.nn.functional.pad(table.long().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    r0, r1 = r_lo.clamp(0, nr), (r_hi + 1).clamp(0, nr)
    c0, c1 = c_lo.clamp(0, nc), (c_hi + 1).clamp(0, nc)
    r1 = torch.maximum(r1, r0)
    c1 = torch.maximum(c1, c0)
    total = csum[..., r1, c1] - csum[..., r0, c1] - csum[..., r1, c0] + csum[..., r0, c0]
    return total > 0

