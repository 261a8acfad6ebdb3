"""The dense backend: materialise the mask and call SDPA. The oracle, and the fastest path for short inputs.

Rows with no allowed key output zeros with zero gradient (SDPA alone would give NaN or a uniform
average), by letting such rows attend everything and multiplying their output by 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patterns.causal import CausalMask
from ..patterns._base import dense_mask
from ._inputs import AttentionInputs, float_bias, keep_mask


def dense_attention(inp: AttentionInputs) -> Tensor:
    q, k, v = inp.q, inp.k, inp.v
    pattern = inp.sparse_pattern
    geo = inp.geometry
    if isinstance(pattern, CausalMask) and geo.q_len == geo.kv_len and not inp.has_extra_masks:
        # SDPA's is_causal is top-left aligned, which equals ours only for square inputs.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=inp.dropout_p, is_causal=True, scale=inp.scale)
    pattern_mask = None if pattern is None else dense_mask(pattern.allowed_fn(geo, q.device), geo, q.device)
    keep = keep_mask(inp, pattern_mask)
    bias = float_bias(inp)
    if keep is None and bias is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=inp.dropout_p, scale=inp.scale)
    if bias is not None:
        if keep is not None:
            bias = bias.masked_fill(~keep, float("-inf"))
        row_live = (bias > float("-inf")).any(-1, keepdim=True)  # (B?, H?, Nq, 1)
        mask = torch.where(row_live, bias, 0.0)
    else:
        row_live = keep.any(-1, keepdim=True)
        mask = keep | ~row_live
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=inp.dropout_p, scale=inp.scale)
    return out * row_live.to(out.dtype)
