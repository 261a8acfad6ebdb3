"""The FlexAttention backend: our block plans turned into cached ``BlockMask``s, one compiled kernel.

FlexAttention trains on GPUs; on CPU (PyTorch 2.13) it runs forward only and compiles once per shape.
The block mask comes from the pattern's exact plan, so building it costs O(N * K) instead of
evaluating the mask over the whole (Nq, Nk) grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..patterns import Geometry, Pattern
from ..patterns.full import Full
from ..caches import named_cache
from ..patterns.layout import compact, get_plan
from ..patterns.topk_blocks import content_parts
from .inputs import AttentionInputs

FLEX_BLOCK = 128


def flex_block(pattern: Pattern, device: torch.device) -> int:
    """Block-structured patterns (BigBird) keep their own block on CPU when it is 64: at 128, two
    neighbouring 64-blocks with different random partners double the work (measured). CUDA keeps
    FlexAttention's default 128, the tile its Triton kernels are tuned for (not measured here: no GPU)."""
    pb = pattern.preferred_block
    return pb if device.type == "cpu" and pb == 64 else FLEX_BLOCK

try:  # FlexAttention exists from PyTorch 2.5; keep importing on builds without it.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask = flex_attention = None

_compiled = None
BLOCK_MASKS = named_cache("flex_block_masks", 32)


def available() -> bool:
    return flex_attention is not None


def unsupported_reason(inp: AttentionInputs) -> str | None:
    """Why FlexAttention cannot serve this call, or None when it can."""
    if not available():
        return "this PyTorch has no FlexAttention"
    if inp.dropout_p > 0:
        return "FlexAttention has no dropout"
    if inp.q.device.type == "cpu" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (inp.q, inp.k, inp.v)):
        return "FlexAttention has no backward on CPU"
    if inp.q.device.type == "cpu" and inp.q.dtype in (torch.float16, torch.float64):
        return f"FlexAttention on CPU has no {str(inp.q.dtype).removeprefix('torch.')} (Inductor cannot lower it)"
    return None


def compiled_flex_attention():
    """flex_attention compiled once per process (Inductor specialises per shape, as FlexAttention does)."""
    global _compiled
    if _compiled is None:
        # Every new (pattern, length) is a new specialisation; the default limit of 8 would silently
        # fall back to the quadratic eager path in long runs and test suites.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _to_kv_blocks(layout: Tensor) -> tuple[Tensor, Tensor]:
    """(B', H', nQB, nKB) bool -> counts (B', H', nQB) int32 and indices (B', H', nQB, nKB) int32."""
    indices, counts = compact(layout, width=layout.shape[-1])
    return counts.to(torch.int32).contiguous(), indices.to(torch.int32).contiguous()


def build_block_mask(pattern: Pattern, geo: Geometry, device: torch.device, *, key_padding_mask: Tensor | None = None,
                     bool_mask: Tensor | None = None) -> "BlockMask":
    """A ``BlockMask`` for ``pattern`` (and optional extra masks) from the pattern's exact plan."""
    block = flex_block(pattern, device)
    chosen = bool(content_parts(pattern))  # blocks chosen for this call: no plan to refine or cache
    plan = None if chosen else get_plan(pattern, geo, block, device)
    # A call's choice lists its blocks directly (the union of each query block's rows' choices), every one
    # partial: building costs O(N * k), where refining a plan would evaluate the mask over all of them.
    layout = pattern.candidates(geo, block, device) if chosen else plan.layout()
    allowed = pattern.allowed_fn(geo, device)
    offset = geo.offset
    extra = key_padding_mask is not None or bool_mask is not None
    if bool_mask is not None:
        while bool_mask.dim() < 4:
            bool_mask = bool_mask.unsqueeze(0)
        bool_mask = bool_mask.expand(geo.batch, geo.num_heads, geo.q_len, geo.kv_len)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = allowed(b, h, q_idx + offset, kv_idx)
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[b, kv_idx]
        if bool_mask is not None:
            keep = keep & bool_mask[b, h, q_idx, kv_idx]
        return keep

    mask_mod.__name__ = pattern.name
    if extra or chosen:  # extra masks can empty any block: every block must evaluate the mask
        partial, full = layout, None
    else:
        full = plan.full_layout()
        partial = layout & ~full
    kv_num, kv_idx = _to_kv_blocks(partial)
    full_num, full_idx = _to_kv_blocks(full) if full is not None else (None, None)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(geo.q_len, geo.kv_len))


def get_block_mask(pattern: Pattern, geo: Geometry, device: torch.device) -> "BlockMask":
    key = None if pattern.key is None else (pattern.key, geo, str(device))
    return BLOCK_MASKS.get_or_build(key, lambda: build_block_mask(pattern, geo, device))


def flex_backend_attention(inp: AttentionInputs) -> Tensor:
    reason = unsupported_reason(inp)
    if reason is not None:
        raise ValueError(f"backend='flex' cannot run this call: {reason}")
    pattern = inp.pattern if inp.pattern is not None else Full()
    geo = inp.geometry
    am = inp.attn_mask
    bool_mask = am if am is not None and am.dtype == torch.bool else None
    if inp.key_padding_mask is None and bool_mask is None:
        block_mask = get_block_mask(pattern, geo, inp.q.device)
    else:
        block_mask = build_block_mask(pattern, geo, inp.q.device, key_padding_mask=inp.key_padding_mask,
                                      bool_mask=bool_mask)
    score_mod = None
    if am is not None and am.is_floating_point():
        bias = am
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(geo.batch, geo.num_heads, geo.q_len, geo.kv_len)

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score + bias[b, h, q_idx, kv_idx]

    return compiled_flex_attention()(inp.q, inp.k, inp.v, score_mod=score_mod, block_mask=block_mask,
                                     scale=inp.scale)
