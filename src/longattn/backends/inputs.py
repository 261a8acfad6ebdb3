"""Validated inputs of one attention call, shared by every backend.

Notation: B batch, H heads, Nq/Nk query/key lengths, D head dim (Dv for values).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import Tensor

from ..patterns import Geometry, Pattern
from ..patterns.full import Full

BACKENDS = ("auto", "dense", "blocked", "flex")


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    q: Tensor  # (B, H, Nq, D)
    k: Tensor  # (B, H, Nk, D)
    v: Tensor  # (B, H, Nk, Dv)
    pattern: Pattern | None  # None = full attention
    attn_mask: Tensor | None  # bool (True = keep) or float (added), broadcastable to (B, H, Nq, Nk)
    key_padding_mask: Tensor | None  # (B, Nk) bool, True = real token
    scale: float
    dropout_p: float

    @property
    def geometry(self) -> Geometry:
        b, h, nq, _ = self.q.shape
        return Geometry(nq, self.k.shape[2], h, b)

    @property
    def sparse_pattern(self) -> Pattern | None:
        """The pattern, or None when it allows everything."""
        return None if self.pattern is None or isinstance(self.pattern, Full) else self.pattern

    @property
    def has_extra_masks(self) -> bool:
        return self.attn_mask is not None or self.key_padding_mask is not None


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def _clean_padding(k: Tensor, v: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Padding never reaches a real row: padded keys and values holding NaN or inf are zeroed (with them, a
    masked product's 0 * NaN would spread to real rows, further on some backends than others). Finite padding
    is harmless and kept: only the padded rows are read to tell, the copy is made only when needed."""
    pad = ~key_padding_mask
    finite = all(bool(t.detach().transpose(1, 2)[pad].isfinite().all()) for t in (k, v))
    if finite:
        return k, v
    pad = pad[:, None, :, None]
    return k.masked_fill(pad, 0), v.masked_fill(pad, 0)


def prepare(q: Tensor, k: Tensor, v: Tensor, *, pattern: Pattern | None = None, attn_mask: Tensor | None = None,
            key_padding_mask: Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0
            ) -> AttentionInputs:
    """Check every argument and raise ValueError/TypeError naming it and the expected shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D) (4 dims), got {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"q, k and v need a head dim D >= 1, got q {_shape(q)} and v {_shape(v)}")
    if k.shape != (b, h, nk, d):
        raise ValueError(f"k must have shape (B, H, Nk, D) = ({b}, {h}, Nk, {d}) to match q {_shape(q)}, "
                         f"got {_shape(k)}")
    if v.shape[:3] != (b, h, nk):
        raise ValueError(f"v must have shape (B, H, Nk, Dv) = ({b}, {h}, {nk}, Dv) to match k {_shape(k)}, "
                         f"got {_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a longattn Pattern or None, got {type(pattern).__name__}")
    geo = Geometry(nq, nk, h, b)
    if pattern is not None:
        pattern.validate(geo)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor of shape (B, Nk), True = real token")
        if key_padding_mask.shape != (b, nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = ({b}, {nk}), "
                             f"got {_shape(key_padding_mask)}")
        key_padding_mask = key_padding_mask.to(q.device)
        if q.device.type != "meta" and not bool(key_padding_mask.all()):
            k, v = _clean_padding(k, v, key_padding_mask)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = attend) or floating point (added), got {attn_mask.dtype}")
        target = (b, h, nq, nk)
        try:
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask must broadcast to (B, H, Nq, Nk) = {target}, got {_shape(attn_mask)}")
        attn_mask = attn_mask.to(q.device)
        if attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)
            if attn_mask.device.type != "meta" and not bool((attn_mask < math.inf).all()):
                raise ValueError("attn_mask (float) must hold finite values or -inf (masked); it holds NaN or "
                                 "+inf, which make the rows they touch undefined")
    if scale is None:
        scale = d ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite (every score would be inf or nan), got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return AttentionInputs(q, k, v, pattern, attn_mask, key_padding_mask, float(scale), float(dropout_p))


def keep_mask(inp: AttentionInputs, pattern_mask: Tensor | None) -> Tensor | None:
    """AND of the pattern's mask, the key padding mask and a bool attn_mask; None when all allow."""
    keep = pattern_mask
    if inp.key_padding_mask is not None:
        kpm = inp.key_padding_mask[:, None, None, :]
        keep = kpm if keep is None else keep & kpm
    if inp.attn_mask is not None and inp.attn_mask.dtype == torch.bool:
        keep = inp.attn_mask if keep is None else keep & inp.attn_mask
    return keep


def float_bias(inp: AttentionInputs) -> Tensor | None:
    am = inp.attn_mask
    return am if am is not None and am.is_floating_point() else None
