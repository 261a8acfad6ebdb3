"""Transformer-XL relative multi-head attention (Dai et al., 2019) on any causal longattn pattern.

Notation: b batch, h head, i query position, j key position (absolute, bottom-right aligned: with a memory
of M states the Nq queries sit at M..M+Nq-1 of the Nk = M + Nq keys), d head dim, p sinusoid dim.
The score of the paper, with R the sinusoidal encoding of the distance ``i - j``::

    score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_r R_{i-j}       (terms a+c, b+d; u, v learned per head)

The position term is computed one of two exact ways:

- ``"factorised"`` (linear memory, every backend): R is sinusoidal, so ``R_{i-j}`` is ``R_j``'s angles
  rotated by ``i``'s: ``sin((i-j)w) = sin(iw)cos(jw) - cos(iw)sin(jw)`` and likewise for cos. The term
  becomes a dot product ``q'_i . k'_j`` with ``k'_j = [cos(jw), sin(jw)]`` and ``q'_i`` the rotation of
  ``W_r^T (q_i + v)``. Appending ``q'`` to ``q + u`` and ``k'`` to ``k`` turns relative attention into
  plain attention of width ``d + p``: it runs on every pattern and backend (blocked, Sparse Transformer's
  factored path, flex) in O(N) memory, with autograd, and never forms an ``Nq x Nk`` table.
- ``"shift"`` (the paper's way): ``(q + v) W_r R^T`` for the Nk distances ``Nk-1 .. 0`` (an ``Nq x Nk``
  table), then the relative shift, here a zero-copy strided view instead of the pad-and-reshape copy. It
  materialises the scores, so memory is O(Nq * Nk); it is the only way to honour ``clamp_len`` (distances
  beyond it share one encoding, which breaks the rotation identity).

``"auto"`` takes ``"factorised"`` unless ``clamp_len`` is shorter than the context.

With ``nsa=NSAShape(...)`` the layer is causal Native Sparse Attention (``longattn.modules.native_sparse``)
over ``[memory; segment]``: the selected branch uses the layer's keys and values, the compressed and window
branches their own. Scores keep the factorised relative term: tokens carry ``[cos(j w), sin(j w)]``, a summary
the features of its block's mean position; the choice reads the compressed branch's probabilities, position
term included.

With ``combiner=kind`` (``"fixed"``, ``"logsparse"`` or ``"mixture"``) the layer is causal Combiner attention
(``longattn.modules.combiner``) over ``[memory; segment]`` instead of a pattern: each query attends its own
region directly and every earlier region through its abstraction. The abstractions are taken over the whole
context (queries are computed for the memory too, for the pooled queries) with the content parts
``q + u`` and ``k``; an abstraction's position is the mean position of its region's tokens, so its score is
``(q_i + u) . k_Omega + (q_i + v) . W_r R_{i - centre(Omega)}``: the factorised form with the key feature
``[cos(c w), sin(c w)]`` at the centre ``c``. Regions are aligned to the segment's start (the context is
front-padded when the memory is not a whole number of regions), so a segment is cut the same way whatever
the memory's length.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..functional import attention
from ..patterns import Pattern, causal
from .combiner import abstractions, attend
from .native_sparse import BRANCHES, BlockCompressor, NSAShape, native_sparse_attention, summarise

METHODS = ("auto", "factorised", "shift")
COMBINER_KINDS = ("fixed", "logsparse", "mixture")  # the causal kinds on a 1-D sequence (axial needs rows)


def inverse_frequencies(dim: int, *, device=None) -> Tensor:
    """Transformer-XL's ``1 / 10000^(2k / dim)`` for ``k < dim / 2``, in float64."""
    return 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))


def key_features(positions: Tensor, dim: int) -> Tensor:
    """``(..., dim)`` features ``[cos(p w), sin(p w)]`` of (possibly fractional) ``positions``, in float64."""
    angles = positions.to(torch.float64)[..., None] * inverse_frequencies(dim, device=positions.device)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """``(N, dim)`` encodings ``[sin(p w), cos(p w)]`` of ``positions`` (float64, cast by the caller)."""
    angles = positions.to(torch.float64)[:, None] * inverse_frequencies(dim, device=positions.device)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(table: Tensor) -> Tensor:
    """The relative shift: ``out[..., r, j] = table[..., r, j + Nq - 1 - r]``, as a view (no copy).

    ``table[..., r, m]`` scores query row ``r`` against the encoding of distance ``Nk - 1 - m`` (the paper's
    descending ``R_{Nk-1}, ..., R_0``). Query row ``r`` sits at ``r + Nk - Nq``, so key ``j`` is at distance
    ``r + Nk - Nq - j``: column ``m = j + Nq - 1 - r``. Entries with ``j`` after the query (``m >= Nk``) read a
    neighbouring row's values; causal masking discards them. The paper pads a zero column and reshapes, which
    copies the table twice; a strided view with row stride ``Nk - 1`` reads the same numbers in place.
    """
    *lead, nq, nk = table.shape
    if nq > nk:
        raise ValueError(f"rel_shift needs Nq <= Nk (queries are the last Nq keys), got table {tuple(table.shape)}")
    table = table.contiguous()
    strides = list(table.stride())
    strides[-2] = nk - 1
    return table.as_strided((*lead, nq, nk), strides, table.storage_offset() + nq - 1)


@dataclass(frozen=True, eq=False)
class RelativePositions:
    """The sinusoidal terms of one ``(Nq, Nk)`` geometry: computed once per forward, shared by every layer.

    Angles are taken in float64 and cast once, so positions in the thousands lose nothing to fp32 rounding.
    """

    q_len: int
    kv_len: int
    clamp_len: int | None
    key_features: Tensor  # (Nk, p): [cos(j w), sin(j w)], the key side of the factorised term
    query_cos: Tensor  # (Nq, p/2): cos(i w) at the queries' absolute positions
    query_sin: Tensor  # (Nq, p/2)
    distance_table: Tensor  # (Nk, p): R_{Nk-1}, ..., R_0, clamped: the shift method's encodings

    @classmethod
    def build(cls, q_len: int, kv_len: int, dim: int, *, clamp_len: int | None = None, device=None,
              dtype=torch.float32) -> "RelativePositions":
        if dim % 2:
            raise ValueError(f"the sinusoid dimension must be even, got {dim}")
        if q_len > kv_len:
            raise ValueError(f"q_len ({q_len}) must be <= kv_len ({kv_len})")
        query_angles = (torch.arange(kv_len - q_len, kv_len, device=device, dtype=torch.float64)[:, None]
                        * inverse_frequencies(dim, device=device))
        distances = torch.arange(kv_len - 1, -1, -1, device=device, dtype=torch.float64)
        if clamp_len is not None:
            distances = distances.clamp(max=clamp_len)
        cast = lambda t: t.to(dtype)  # noqa: E731
        return cls(q_len, kv_len, clamp_len, cast(key_features(torch.arange(kv_len, device=device), dim)),
                   cast(query_angles.cos()), cast(query_angles.sin()), cast(sinusoid(distances, dim)))

    @property
    def clamped(self) -> bool:
        """True when ``clamp_len`` changes some allowed distance (at most ``Nk - 1``) of this geometry."""
        return self.clamp_len is not None and self.clamp_len < self.kv_len - 1


class RelativeAttention(nn.Module):
    """Transformer-XL's relative multi-head attention with a causal longattn pattern and an optional memory.

    Args:
        dim: model width C.
        heads: H.
        head_dim: d, default ``dim // heads``.
        pattern: which keys a query may attend; always intersected with ``causal()``. ``None`` = all past keys.
        pos_dim: p, width of the sinusoidal encodings (default ``dim``, as the paper).
        clamp_len: distances beyond it use the encoding of ``clamp_len`` (the paper's evaluation trick).
        dropout: attention-probability dropout, training mode only.
        method: ``"auto"``, ``"factorised"`` or ``"shift"`` (see the module docstring).
        backend: passed to ``longattn.attention``.
        combiner: a Combiner kind (``COMBINER_KINDS``) to attend with instead of ``pattern`` (module docstring).
        region: tokens per region for ``combiner`` (fixed blocks; logsparse's regions are dyadic).
        nsa: the branch sizes of causal Native Sparse Attention to attend with instead of ``pattern`` (module
            docstring); adds the compressed and window branches' keys and values, their compressors and gates.

    Parameters: ``qkv`` (no bias), ``r_net`` = W_r (no bias), ``u`` and ``v`` ``(H, d)`` (the paper's
    position-independent biases, ``r_w_bias`` and ``r_r_bias`` in its code), ``proj`` (no bias).
    """

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, pattern: Pattern | None = None,
                 pos_dim: int | None = None, clamp_len: int | None = None, dropout: float = 0.0,
                 method: str = "auto", backend: str = "auto", combiner: str | None = None, region: int = 32,
                 nsa: NSAShape | None = None, device=None, dtype=None):
        super().__init__()
        head_dim = dim // heads if head_dim is None else head_dim
        pos_dim = dim if pos_dim is None else pos_dim
        if head_dim < 1 or dim < 1 or heads < 1:
            raise ValueError(f"dim ({dim}), heads ({heads}) and head_dim ({head_dim}) must be positive")
        if pos_dim % 2 or pos_dim < 2:
            raise ValueError(f"pos_dim must be a positive even number, got {pos_dim}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a longattn Pattern or None, got {type(pattern).__name__}")
        if clamp_len is not None and clamp_len < 0:
            raise ValueError(f"clamp_len must be >= 0 or None, got {clamp_len}")
        if combiner is not None:
            if combiner not in COMBINER_KINDS:
                raise ValueError(f"combiner must be one of {', '.join(COMBINER_KINDS)} or None, got {combiner!r}")
            if pattern is not None or method == "shift" or clamp_len is not None:
                raise ValueError("combiner attends through abstractions: it takes no pattern, and its position "
                                 "term is the factorised one (no method='shift', no clamp_len)")
            if isinstance(region, bool) or not isinstance(region, int) or region < 1:
                raise ValueError(f"region must be a positive int, got {region!r}")
        if nsa is not None:
            if not isinstance(nsa, NSAShape):
                raise TypeError(f"nsa must be an NSAShape or None, got {type(nsa).__name__}")
            if pattern is not None or combiner is not None or method == "shift" or clamp_len is not None:
                raise ValueError("nsa chooses its own keys: it takes no pattern or combiner, and its position term is "
                                 "the factorised one (no method='shift', no clamp_len)")
        self.combiner, self.region, self.nsa = combiner, region, nsa
        self.dim, self.heads, self.head_dim, self.pos_dim = dim, heads, head_dim, pos_dim
        self.pattern = causal(pattern)
        self.clamp_len, self.dropout, self.method, self.backend = clamp_len, dropout, method, backend
        factory = {"device": device, "dtype": dtype}
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False, **factory)
        self.r_net = nn.Linear(pos_dim, inner, bias=False, **factory)
        self.u = nn.Parameter(torch.empty(heads, head_dim, **factory))
        self.v = nn.Parameter(torch.empty(heads, head_dim, **factory))
        self.proj = nn.Linear(inner, dim, bias=False, **factory)
        if nsa is not None:  # the compressed and window branches' own keys and values (selected: qkv's)
            self.nsa_kv = nn.Linear(dim, 4 * inner, bias=False, **factory)
            self.compress_k = BlockCompressor(nsa.cmp_length, head_dim, **factory)
            self.compress_v = BlockCompressor(nsa.cmp_length, head_dim, **factory)
            self.gate = nn.Linear(dim, len(BRANCHES) * heads, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.qkv, self.r_net, self.proj):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.u, std=0.02)
        nn.init.normal_(self.v, std=0.02)
        if self.nsa is not None:
            for lin in (self.nsa_kv, self.gate):
                nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)

    def positions(self, q_len: int, kv_len: int, *, device=None, dtype=torch.float32) -> RelativePositions:
        return RelativePositions.build(q_len, kv_len, self.pos_dim, clamp_len=self.clamp_len, device=device,
                                       dtype=dtype)

    def forward(self, x: Tensor, memory: Tensor | None = None, *, positions: RelativePositions | None = None,
                pattern: Pattern | None = None, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """Attend from ``x: (B, Nq, C)`` to ``[memory; x]`` (memory ``(B, M, C)``, already detached by the caller).

        ``pattern`` overrides the module's (it must be causal already: ``Transformer-XL``'s ``same_length``
        passes ``causal(p) & sliding_window(...)``). ``positions`` lets a model share one encoding table
        over its layers. ``attn_mask`` / ``key_padding_mask`` are over the Nk keys, as in ``attention``.
        Returns ``(B, Nq, C)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, Nq, C={self.dim}), got {tuple(x.shape)}")
        if memory is not None and (memory.dim() != 3 or memory.shape[0] != x.shape[0] or memory.shape[-1] != self.dim):
            raise ValueError(f"memory must have shape (B={x.shape[0]}, M, C={self.dim}), got {tuple(memory.shape)}")
        b, nq, _ = x.shape
        context = x if memory is None or memory.shape[1] == 0 else torch.cat([memory, x], dim=1)  # (B, Nk, C)
        nk = context.shape[1]
        if positions is None:
            positions = self.positions(nq, nk, device=x.device, dtype=x.dtype)
        elif (positions.q_len, positions.kv_len) != (nq, nk):
            raise ValueError(f"positions are for (Nq, Nk) = {(positions.q_len, positions.kv_len)}, got {(nq, nk)}")
        h, d = self.heads, self.head_dim
        w_q, w_kv = self.qkv.weight.split([h * d, 2 * h * d])
        k, v = nn.functional.linear(context, w_kv).view(b, nk, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.dropout if self.training else 0.0
        if self.combiner is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask: Combiner attention takes no extra mask (its regions decide the keys)")
            q_all = nn.functional.linear(context, w_q).view(b, nk, h, d).transpose(1, 2)  # pooled over regions
            out = self._combiner_attention(q_all, k, v, nq, positions, key_padding_mask, dropout_p)
            return self.proj(out.transpose(1, 2).reshape(b, nq, h * d))
        q = nn.functional.linear(x, w_q).view(b, nq, h, d).transpose(1, 2)  # (B, H, Nq, d)
        if self.nsa is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask: NSA takes no extra mask (its branches decide the keys)")
            out = self._nsa_attention(x, context, q, k, v, positions, key_padding_mask, dropout_p)
            return self.proj(out.transpose(1, 2).reshape(b, nq, h * d))
        method = self.method
        if method == "auto":
            method = "shift" if positions.clamped else "factorised"
        elif method == "factorised" and positions.clamped:
            raise ValueError(f"clamp_len={self.clamp_len} is shorter than the context ({nk} keys): the factorised "
                             "position term cannot clamp distances; use method='shift' or 'auto'")
        pattern = self.pattern if pattern is None else pattern
        q_content = q + self.u[:, None]  # (B, H, Nq, d)
        q_position = q + self.v[:, None]
        if method == "factorised":
            # Appending q' to q + u and k' to k: plain attention of width d + p, on any backend.
            q_wide = torch.cat([q_content, self._rotated_queries(q_position, positions)], dim=-1)  # (B, H, Nq, d + p)
            k_wide = torch.cat([k, positions.key_features.expand(b, h, nk, self.pos_dim)], dim=-1)  # (B, H, Nk, d + p)
            q_in, k_in, mask, backend = q_wide, k_wide, attn_mask, self.backend
        else:
            # The position term rides in as SDPA's additive mask: one fused softmax, masks and dead rows handled
            # by the dense backend, and gradients flow into the bias like any other input.
            q_in, k_in, mask, backend = q_content, k, self._shift_bias(q_position, positions, attn_mask), "dense"
        out = attention(q_in, k_in, v, pattern=pattern, attn_mask=mask, key_padding_mask=key_padding_mask,
                        scale=d ** -0.5, dropout_p=dropout_p, backend=backend)
        return self.proj(out.transpose(1, 2).reshape(b, nq, h * d))  # (B, Nq, C)

    def _combiner_attention(self, q_all: Tensor, k: Tensor, v: Tensor, nq: int, pos: RelativePositions,
                            key_padding_mask: Tensor | None, dropout_p: float) -> Tensor:
        """Causal Combiner over the context ``k, v: (B, H, Nk, d)`` for the last ``nq`` queries of ``q_all``."""
        b, h, nk, d = k.shape
        real = k.new_ones(b, nk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
        pad = -(nk - nq) % self._alignment(nq)  # keys in front, so that a region starts at the segment
        front = (lambda x: nn.functional.pad(x, (0, 0, pad, 0))) if pad else (lambda x: x)  # noqa: E731
        q_content = front(q_all + self.u[:, None])  # (B, H, pad + Nk, d)
        k, v = front(k), front(v)
        real = nn.functional.pad(real, (pad, 0)) if pad else real
        parts = abstractions(q_content, k, v, kind=self.combiner, region=self.region, causal=True,
                             key_padding_mask=real, dropout_p=dropout_p, backend=self.backend)

        def at(centres: Tensor) -> Tensor:  # (B, S) padded positions -> (B, H, S, p) key features
            return key_features(centres - pad, self.pos_dim).to(k.dtype)[:, None].expand(b, h, -1, -1)

        parts = [dataclasses.replace(p, keys=[torch.cat([key, at(c)], dim=-1) for key, c in zip(p.keys, p.centres)])
                 for p in parts]
        token_features = front(pos.key_features).expand(b, h, -1, -1)
        q_wide = torch.cat([q_content[:, :, -nq:], self._rotated_queries(q_all[:, :, -nq:] + self.v[:, None], pos)],
                           dim=-1)
        return attend(q_wide, torch.cat([k, token_features], dim=-1), v, parts, key_padding_mask=real,
                      scale=d ** -0.5, dropout_p=dropout_p, backend=self.backend)

    def _nsa_attention(self, x: Tensor, context: Tensor, q: Tensor, k: Tensor, v: Tensor, pos: RelativePositions,
                       key_padding_mask: Tensor | None, dropout_p: float) -> Tensor:
        """Causal NSA over the context for the queries of ``x``, with factorised relative positions: tokens carry
        their key features, a summary those of its block's mean position (as Combiner's abstractions)."""
        b, h, nk, d = k.shape
        shape = self.nsa
        kc, vc, kw, vw = nn.functional.linear(context, self.nsa_kv.weight).view(b, nk, 4, h, d).permute(
            2, 0, 3, 1, 4).unbind(0)
        k_sum, v_sum = summarise(self.compress_k, self.compress_v, kc, vc, shape.cmp_stride, key_padding_mask)
        centres = torch.arange(k_sum.shape[2], device=k.device) * shape.cmp_stride + (shape.cmp_length - 1) / 2
        widen = lambda t, feats: torch.cat([t, feats.to(t.dtype).expand(b, h, -1, -1)], dim=-1)  # noqa: E731
        branches = {"compressed": (widen(k_sum, key_features(centres, self.pos_dim)), v_sum),
                    "selected": (widen(k, pos.key_features), v), "window": (widen(kw, pos.key_features), vw)}
        q_wide = torch.cat([q + self.u[:, None], self._rotated_queries(q + self.v[:, None], pos)], dim=-1)
        gates = torch.sigmoid(self.gate(x)).view(b, -1, h, len(BRANCHES)).transpose(1, 2)  # (B, H, Nq, 3)
        return native_sparse_attention(q_wide, branches, gates, shape, causal=True, key_padding_mask=key_padding_mask,
                                       scale=d ** -0.5, dropout_p=dropout_p, backend=self.backend)

    def _alignment(self, nq: int) -> int:
        """Regions start at a multiple of this many keys before the segment: a fixed block, or for logsparse
        the dyadic block that covers the segment."""
        dyadic = 1 << max(0, nq - 1).bit_length()
        return {"fixed": self.region, "logsparse": dyadic, "mixture": math.lcm(self.region, dyadic)}[self.combiner]

    def _rotated_queries(self, q_position: Tensor, pos: RelativePositions) -> Tensor:
        """The factorised position term's query side q'_i ``(B, H, Nq, p)``: ``W_r^T (q_i + v)`` rotated by i."""
        h, d, half = self.heads, self.head_dim, self.pos_dim // 2
        w_r = self.r_net.weight.view(h, d, self.pos_dim)
        coeff = torch.einsum("bhid,hdp->bhip", q_position, w_r)  # (B, H, Nq, p): W_r^T (q + v)
        a, c = coeff.split(half, dim=-1)  # the weights of sin(t w) and cos(t w), t = i - j
        cos_i, sin_i = pos.query_cos, pos.query_sin  # (Nq, p/2)
        # sum_w a sin((i-j)w) + c cos((i-j)w) = cos(jw)[a sin(iw) + c cos(iw)] + sin(jw)[c sin(iw) - a cos(iw)]
        return torch.cat([a * sin_i + c * cos_i, c * sin_i - a * cos_i], dim=-1)  # (B, H, Nq, p)

    def _shift_bias(self, q_position: Tensor, pos: RelativePositions, attn_mask: Tensor | None) -> Tensor:
        """The shift method's position term ``(B, H, Nq, Nk)``, scaled, with ``attn_mask`` added as a bias."""
        h, d = self.heads, self.head_dim
        r = self.r_net(pos.distance_table).view(-1, h, d)  # (Nk, H, d): W_r R_{Nk-1..0}
        table = torch.einsum("bhid,jhd->bhij", q_position, r)  # (B, H, Nq, Nk), distance-indexed
        bias = rel_shift(table) * d ** -0.5  # (B, H, Nq, Nk), key-indexed
        if attn_mask is None:
            return bias
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=bias.dtype).masked_fill_(~attn_mask, -math.inf)
        return bias + attn_mask

    def extra_repr(self) -> str:
        attends = f"combiner={self.combiner!r}, region={self.region}" if self.combiner else f"pattern={self.pattern}"
        attends = f"nsa={self.nsa}" if self.nsa is not None else attends
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, pos_dim={self.pos_dim}, "
                f"{attends}, clamp_len={self.clamp_len}, method={self.method!r}")
