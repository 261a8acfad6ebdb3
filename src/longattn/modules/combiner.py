"""Combiner attention (Ren et al., NeurIPS 2021): full attention's reach at sparse cost.

Attention is the expectation of ``v_j`` under ``p(j | i)``. Combiner splits the keys of query ``i`` into a
*direct* set and *regions*; inside a region ``Omega`` it factorises ``p(j | i) = p(Omega | i) q(j | Omega)``
with ``q`` the same for every query, so a region enters the query's softmax as one *abstraction*:

- summary key ``k_Omega = max_{j in Omega} k_j`` (element-wise max pooling, the paper's default);
- summary value ``v_Omega = sum_{j in Omega} softmax_j(q_Omega . k_j / sqrt(d)) v_j`` with the region's pooled
  query ``q_Omega = max_{j in Omega} q_j``: the region's query-independent conditional expectation;
- ``A(x_i) = [sum_{j direct} e^{q_i.k_j/sqrt d} v_j + sum_Omega e^{q_i.k_Omega/sqrt d} v_Omega] / Z_i``, one
  softmax over the direct keys and the abstractions (no log-size term, as the paper and its code).

The summaries go in front of the tokens and a pattern of ``longattn.patterns.combiner`` says which keys of
``[summaries; tokens]`` each query attends, so the whole layer is one ``longattn.attention`` call (every
backend, dtype and device; training on CPU) plus the summaries, computed by ``attention`` too. Kinds:

- ``"fixed"``: regions are fixed blocks of ``region`` tokens (default ``ceil(sqrt(N))``): each query attends
  its own block directly and every other block's abstraction (causal: its block up to itself and the blocks
  wholly before it). ``O(N sqrt N)``.
- ``"logsparse"``: dyadic regions: the query itself directly and, per level ``l``, the sibling of its
  ``2^l``-block (causal: the earlier siblings only, the reference's tiling ``[12,13), [8,12), [0,8)`` for
  ``i = 13``). ``O(N log N)``. The bidirectional form (the mirrored future siblings) is ours: the paper's
  appendix defining it was not available.
- ``"axial"``: the tokens as rows of ``region`` (default ``ceil(sqrt(N))``; an image's width): each query
  attends its own row directly (causal: up to itself) and, for every column, the abstraction of the
  column's part above its row (and below it, bidirectional). ``O(N sqrt N)``. The paper's vertical plan
  keeps the query's own column above it direct; here it enters through its abstraction like every other
  column, so that each product stays block-sparse (a direct column would be a strided read).
- ``"mixture"``: the average of the fixed and logsparse attentions (the paper's
  ``A = (1/M) sum_m A(x_i; omega_m)``, M = 2).

Padding: padded keys belong to no region; a region with none but padding has no abstraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..functional import attention
from ..patterns import Pattern
from ..patterns import causal as causal_pattern
from ..patterns.combiner import combiner_axial, combiner_fixed, combiner_logsparse, logsparse_levels

KINDS = ("fixed", "logsparse", "axial", "mixture")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _summaries(q: Tensor, k: Tensor, v: Tensor, real: Tensor, size: int, *, dropout_p: float,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Abstractions of the blocks ``[r size, (r + 1) size)``: keys ``(B, H, T, D)``, values ``(B, H, T, Dv)``,
    which blocks hold a real token ``(B, T)`` and the mean position of each block's real tokens ``(B, T)``."""
    b, h, n, d = k.shape
    t = -(-n // size)
    pad = t * size - n
    positions = torch.arange(t * size, device=k.device, dtype=torch.float64).view(t, size)
    if size == 1 and not dropout_p:  # a region of one token is its own abstraction (logsparse's level 0)
        return k, v, real, positions.view(1, n).expand(b, n)
    if pad == 0 and bool(real.all()):
        # Every block whole and real: pool and attend on views of the inputs, no copies (each level of
        # logsparse would otherwise keep its own copies of q, k and v for the backward pass).
        blocks = lambda x: x.reshape(b, h * t, size, x.shape[-1])  # noqa: E731  the blocks as extra heads
        k_sum, q_sum = blocks(k).amax(2), blocks(q).amax(2)  # (B, H T, D)
        v_sum = attention(q_sum.unsqueeze(2), blocks(k), blocks(v), dropout_p=dropout_p, backend=backend)
        shape = lambda x: x.reshape(b, h, t, x.shape[-1])  # noqa: E731
        return shape(k_sum), shape(v_sum), real.new_ones(b, t), positions.mean(1).expand(b, t)
    q, k, v = (nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    real = nn.functional.pad(real, (0, pad)).view(b, t, size)
    live = real.any(-1)
    keep = real[:, None, :, :, None]  # (B, 1, T, size, 1)
    centres = (positions * real).sum(-1) / real.sum(-1).clamp(min=1)

    def pool(x: Tensor) -> Tensor:  # element-wise max over each block's real rows; 0 for a block with none
        pooled = x.view(b, h, t, size, -1).masked_fill(~keep, float("-inf")).amax(3)
        return pooled.masked_fill(~live[:, None, :, None], 0.0)

    k_sum, q_sum = pool(k), pool(q)
    # one query per block (its pooled query) over the block's keys: fold the blocks into the batch, where
    # each block can have its own key padding
    fold = lambda x: x.view(b, h, t, size, -1).transpose(1, 2).reshape(b * t, h, size, x.shape[-1])  # noqa: E731
    v_sum = attention(q_sum.transpose(1, 2).reshape(b * t, h, 1, d), fold(k), fold(v),
                      key_padding_mask=real.reshape(b * t, size), dropout_p=dropout_p, backend=backend)
    return k_sum, v_sum.view(b, t, h, -1).transpose(1, 2), live, centres


def _column_prefixes(q: Tensor, k: Tensor, v: Tensor, real: Tensor, *, dropout_p: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """For columns folded into the batch (``(B', H, R, D)``, ``real: (B', R)``): the abstraction of each
    column's rows *before* row p, for every p (row 0: none). The pooled query of rows ``< p`` is the running
    max, so the values are one causal attention of the running-max queries along the column."""
    keep = real[:, None, :, None]
    live = real.cummax(1).values  # rows <= p hold a real token

    def run(x: Tensor) -> Tensor:  # element-wise max over the real rows <= p; 0 before the first
        return x.masked_fill(~keep, float("-inf")).cummax(2).values.masked_fill(~live[:, None, :, None], 0.0)

    k_run, q_run = run(k), run(q)
    v_run = attention(q_run, k, v, pattern=causal_pattern(), key_padding_mask=real, dropout_p=dropout_p,
                      backend=backend)
    shift = lambda x: nn.functional.pad(x, (0, 0, 1, 0))[:, :, :-1]  # noqa: E731  rows <= p-1 -> slot p
    return shift(k_run), shift(v_run), nn.functional.pad(live, (1, 0))[:, :-1]


def _axial_summaries(q: Tensor, k: Tensor, v: Tensor, real: Tensor, width: int, causal: bool, *,
                     dropout_p: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Above-row (and, bidirectional, below-row) abstractions of every column, in the slot order of
    ``combiner_axial`` (each row's slots together): keys ``(B, H, S, D)``, values ``(B, H, S, Dv)``, live ``(B, S)``."""
    b, h, n, _ = k.shape
    rows = -(-n // width)
    pad = rows * width - n

    def columns(x: Tensor) -> Tensor:  # (B, H, N, D) -> (B W, H, R, D)
        x = nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, rows, width, -1)
        return x.permute(0, 3, 1, 2, 4).reshape(b * width, h, rows, x.shape[-1])

    def slots(x: Tensor) -> Tensor:  # (B W, H, R, D) -> (B, H, R, W, D)
        return x.view(b, width, h, rows, -1).permute(0, 2, 3, 1, 4)

    cols = [columns(x) for x in (q, k, v)]
    real_cols = nn.functional.pad(real, (0, pad)).view(b, rows, width).transpose(1, 2).reshape(b * width, rows)
    common = {"dropout_p": dropout_p, "backend": backend}
    out = []
    for flip in (False,) if causal else (False, True):  # below a row = above it with the rows reversed
        turn = (lambda x: x.flip(2)) if flip else (lambda x: x)
        ks, vs, live = _column_prefixes(*(turn(x) for x in cols), real_cols.flip(1) if flip else real_cols,
                                        **common)
        live = live.flip(1) if flip else live
        out.append((slots(turn(ks)), slots(turn(vs)), live.view(b, width, rows).transpose(1, 2)))
    # interleave the halves row by row: row p's slots are [above (W); below (W)]
    k_s, v_s, live_s = (torch.stack(parts, dim=-3 if i < 2 else -2) for i, parts in enumerate(zip(*out)))
    halves = len(out)
    return (k_s.reshape(b, h, rows * halves * width, -1), v_s.reshape(b, h, rows * halves * width, -1),
            live_s.reshape(b, rows * halves * width))


@dataclass(frozen=True)
class Abstractions:
    """One partition's summaries and the pattern over ``[slots; tokens]`` that reads them. Each field is a
    list of pieces (logsparse: one per level) that lie in slot order when concatenated along the slot axis;
    ``attend`` concatenates them once, with the tokens."""

    pattern: Pattern
    keys: list[Tensor]  # (B, H, S_i, D)
    values: list[Tensor]  # (B, H, S_i, Dv)
    live: list[Tensor]  # (B, S_i): the slot's region holds a real token
    centres: list[Tensor] | None  # (B, S_i) float64: mean position of the region's real tokens (not axial)


def abstractions(q: Tensor, k: Tensor, v: Tensor, *, kind: str = "fixed", region: int | None = None,
                 causal: bool = False, key_padding_mask: Tensor | None = None, dropout_p: float = 0.0,
                 backend: str = "auto") -> list[Abstractions]:
    """The summaries of every region of ``q, k, v: (B, H, N, D)``: one ``Abstractions`` per partition (two for
    ``"mixture"``). ``key_padding_mask: (B, N)`` True for real tokens."""
    _check_kind(kind)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must have shapes (B, H, N, D), (B, H, N, D), (B, H, N, Dv); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, _, n, _ = q.shape
    if region is not None and (isinstance(region, bool) or not isinstance(region, int) or region < 1):
        raise ValueError(f"region must be a positive int or None, got {region!r}")
    real = _real(key_padding_mask, b, n, q.device)
    common = {"dropout_p": dropout_p, "backend": backend}
    parts = []
    if kind in ("fixed", "mixture"):
        size = region or math.ceil(math.sqrt(n))
        parts.append(Abstractions(combiner_fixed(size, -(-n // size), causal=causal),
                                  *([x] for x in _summaries(q, k, v, real, size, **common))))
    if kind == "axial":
        width = region or math.ceil(math.sqrt(n))
        keys, values, live = _axial_summaries(q, k, v, real, width, causal, **common)
        parts.append(Abstractions(combiner_axial(width, n, causal=causal), [keys], [values], [live], None))
    if kind in ("logsparse", "mixture"):
        levels = [_summaries(q, k, v, real, 2**level, **common) for level in range(len(logsparse_levels(n)))]
        parts.append(Abstractions(combiner_logsparse(n, causal=causal), *(list(x) for x in zip(*levels))))
    return parts


def attend(q: Tensor, k: Tensor, v: Tensor, parts: list[Abstractions], *, key_padding_mask: Tensor | None = None,
           scale: float | None = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """One attention over ``[summaries; tokens]`` per partition, averaged (Combiner-Mixture's mean).

    ``q: (B, H, Nq, D)`` are the queries of the last ``Nq`` of the ``N`` tokens of ``k, v: (B, H, N, D)``
    (bottom-right aligned, as in ``attention``); the summaries' keys must have the width of ``k``.
    """
    real = _real(key_padding_mask, k.shape[0], k.shape[2], k.device)
    outs = []
    for part in parts:
        mask = torch.cat([*part.live, real], dim=1)
        outs.append(attention(q, torch.cat([*part.keys, k], dim=2), torch.cat([*part.values, v], dim=2),
                              pattern=part.pattern, key_padding_mask=None if bool(mask.all()) else mask,
                              scale=scale, dropout_p=dropout_p, backend=backend))
    return outs[0] if len(outs) == 1 else sum(outs) / len(outs)


def _real(key_padding_mask: Tensor | None, b: int, n: int, device) -> Tensor:
    if key_padding_mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if key_padding_mask.shape != (b, n):
        raise ValueError(f"key_padding_mask must have shape (B, N) = ({b}, {n}), got "
                         f"{tuple(key_padding_mask.shape)}")
    return key_padding_mask


def combiner_attention(q: Tensor, k: Tensor, v: Tensor, *, kind: str = "fixed", region: int | None = None,
                       causal: bool = False, key_padding_mask: Tensor | None = None, dropout_p: float = 0.0,
                       backend: str = "auto") -> Tensor:
    """Combiner attention over ``q, k, v: (B, H, N, D)`` (self-attention: one sequence); ``(B, H, N, Dv)``.

    ``kind`` and ``region`` as in the module docstring; ``key_padding_mask: (B, N)`` True for real tokens.
    """
    common = {"key_padding_mask": key_padding_mask, "dropout_p": dropout_p, "backend": backend}
    return attend(q, k, v, abstractions(q, k, v, kind=kind, region=region, causal=causal, **common), **common)


class CombinerAttention(nn.Module):
    """Multi-head Combiner self-attention over ``x: (B, N, C)`` (see the module docstring).

    Args:
        dim: model width C; heads: H (``qkv_dim``, default ``dim``, divisible by it).
        kind: ``"fixed"``, ``"logsparse"``, ``"axial"`` or ``"mixture"``.
        region: tokens per region of the fixed partition, or the row width of the axial layout (default
            ``ceil(sqrt(N))`` for each input).
        causal: the autoregressive form (no query sees a later token, through a key or a summary).
        dropout: on attention probabilities (the summaries' too), in training.
    """

    def __init__(self, dim: int, heads: int, *, kind: str = "fixed", region: int | None = None,
                 causal: bool = False, qkv_dim: int | None = None, qkv_bias: bool = True, dropout: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        _check_kind(kind)
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        inner = qkv_dim or dim
        if inner % heads:
            raise ValueError(f"{'qkv_dim' if qkv_dim else 'dim'} ({inner}) must be divisible by heads ({heads})")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.heads, self.head_dim, self.inner = dim, heads, inner // heads, inner
        self.kind, self.region, self.causal, self.dropout, self.backend = kind, region, causal, dropout, backend
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, **factory)
        self.proj = nn.Linear(inner, dim, **factory)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, C={self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = combiner_attention(q, k, v, kind=self.kind, region=self.region, causal=self.causal,
                                 key_padding_mask=key_padding_mask,
                                 dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.inner))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kind={self.kind!r}, region={self.region}, "
                f"causal={self.causal}, backend={self.backend!r}")
