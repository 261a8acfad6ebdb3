"""``attention(q, k, v, *, pattern=...)``: the one entry point every module calls."""

from __future__ import annotations

from torch import Tensor

from .backends import dispatch
from .backends.dispatch import Choice
from .backends.inputs import prepare
from .patterns import Pattern


def attention(q: Tensor, k: Tensor, v: Tensor, *, pattern: Pattern | None = None, attn_mask: Tensor | None = None,
              key_padding_mask: Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
              backend: str = "auto") -> Tensor:
    """Sparse scaled dot-product attention.

    Args:
        q: ``(B, H, Nq, D)`` queries.
        k: ``(B, H, Nk, D)`` keys.
        v: ``(B, H, Nk, Dv)`` values.
        pattern: which keys each query may attend (``longattn.patterns``); ``None`` = all of them, which
            equals ``torch.nn.functional.scaled_dot_product_attention``.
        attn_mask: optional extra mask broadcastable to ``(B, H, Nq, Nk)``. Bool: **True = attend**
            (SDPA's polarity). Float: added to the scores (``-inf`` masks).
        key_padding_mask: optional ``(B, Nk)`` bool, **True = real token**, False = padding.
        scale: score scale, default ``1 / sqrt(D)``.
        dropout_p: dropout on the attention probabilities (always applied when > 0, like SDPA).
        backend: ``"auto"`` (see ``longattn.explain``), ``"dense"``, ``"blocked"`` or ``"flex"``.

    Returns:
        ``(B, H, Nq, Dv)``, in the dtype of ``q``.

    Alignment: patterns are defined on absolute positions. When ``Nq != Nk`` (memory, KV cache) the
    queries are the *last* ``Nq`` positions of the keys: query row ``r`` sits at ``r + Nk - Nq``
    (bottom-right, as FlashAttention). For ``Nq = 2, Nk = 5`` a causal pattern allows::

                 key  0 1 2 3 4
        query 0 (i=3) 1 1 1 1 0
        query 1 (i=4) 1 1 1 1 1

    A query row with no allowed key (all padding, or an empty pattern row) returns zeros and gets a
    zero gradient, never NaN. Masks combine by AND: pattern, ``attn_mask`` and ``key_padding_mask``.

    Raises:
        TypeError: an argument of the wrong type (named in the message).
        ValueError: an argument of the wrong shape or value (named, with the expected shape).
    """
    inp = prepare(q, k, v, pattern=pattern, attn_mask=attn_mask, key_padding_mask=key_padding_mask, scale=scale,
                  dropout_p=dropout_p)
    if q.shape[2] == 0 or k.shape[2] == 0 or q.device.type == "meta":
        # No queries, or no keys (an empty KV cache): every row is empty and outputs zeros. The zero
        # multiple keeps the result in the autograd graph so that backward gives zero gradients. Meta
        # tensors (a model built without memory, to count or trace it) get the output's shape only.
        empty = q.new_zeros(*q.shape[:3], v.shape[-1])
        return empty + 0 * (q.sum() + k.sum() + v.sum())
    return dispatch.run(inp, backend)


def explain(q: Tensor, k: Tensor, v: Tensor, *, pattern: Pattern | None = None, attn_mask: Tensor | None = None,
            key_padding_mask: Tensor | None = None, dropout_p: float = 0.0, backend: str = "auto") -> Choice:
    """The backend ``attention`` would use for these arguments, and why (nothing is computed)."""
    if q.device.type == "meta":
        raise ValueError("explain needs tensors with data: the choice depends on the padding and the masks, "
                         "which meta tensors do not hold")
    inp = prepare(q, k, v, pattern=pattern, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                  dropout_p=dropout_p)
    return dispatch.choose(inp, backend)
