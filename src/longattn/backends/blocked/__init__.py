"""The blocked backend: tiles of query rows multiply only the key blocks they need.

- ``schedule.py``: which key columns each tile reads (views in place, shared copies, gathered blocks),
  built once per pattern and geometry from the exact block plan and cached;
- ``kernel.py``: the tile loop, forward and backward (an autograd Function that recomputes probabilities);
- ``native/``: the same tiles as one fused C++ step, optional, compiled by ``longattn calibrate`` and used
  where it was faster;
- ``selected.py``: layouts chosen per call from q and k (``topk_blocks``): query rows grouped by the key block
  they chose, each group one small product;
- ``factored.py``: Sparse Transformer patterns, whose keys are block-sparse only in another order, reordered
  into head groups that run on the tiles or on dense SDPA over short rows.
"""

from __future__ import annotations

from torch import Tensor

from ...patterns.topk_blocks import is_content_dependent, resolve
from ..inputs import AttentionInputs
from .factored import FactoredPlan, factored_attention, factored_plan
from .kernel import tiled_attention
from .selected import selected_attention
from .schedule import DEFAULT_BLOCK, Schedule, choose_block, get_schedule


def blocked_attention(inp: AttentionInputs, *, block: int | None = None) -> Tensor:
    """The blocked path. Sparse Transformer factors (stride and summary columns, ``per_head`` groups) run
    reordered (``factored``): their keys are block-sparse only in another order. ``block`` forces the
    plain tile schedule at that block size."""
    if is_content_dependent(inp.pattern):
        return selected_attention(inp, resolve(inp.pattern, inp.q, inp.k, inp.key_padding_mask))
    if block is None and inp.sparse_pattern is not None:
        plan = factored_plan(inp.pattern, inp.geometry, inp.q.device)
        if plan is not None:
            return factored_attention(plan, inp)
    return tiled_attention(inp, block=block)


__all__ = ["DEFAULT_BLOCK", "FactoredPlan", "Schedule", "blocked_attention", "choose_block", "factored_plan",
           "get_schedule", "tiled_attention"]
