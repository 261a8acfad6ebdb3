"""The blocked path's cost model: what it computes for a pattern at a geometry, in scores.

``auto`` compares this cost with the Nq x Nk scores of dense SDPA (``dispatch.py``); tests use it to check
that a pattern runs in the work its sparsity promises. Two weights turn plain score counts into costs,
both measured against masked SDPA on 2 CPU cores:

- a gathered column costs ``GATHER_COST`` in-place ones: its key and value rows are copied per tile
  (BigBird vs Longformer at N=1024);
- a score of a reordered (factored) plan costs ``FACTORED_COST_PER_SCORE`` tile scores: copies into and out
  of the new order, a call per head group, shared summary keys on every tile. Measured with 4 heads of 64
  at N = 1024 and 2048: 1.5-2.1x faster than SDPA at cost 0.16-0.375, even at 0.44-0.5 (merged fixed,
  1.0-1.1x; split fixed with every key a summary key, 0.9x), slower from 0.56 (0.8-0.9x); the tiles' rule
  sends cost above 0.8 to SDPA, so 0.8 / 1.8 = 0.45 is where reordering stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..patterns import Geometry, Pattern
from ..patterns.causal import CausalMask
from .blocked import FactoredPlan, Schedule, choose_block, factored_plan, get_schedule

GATHER_COST = 2
FACTORED_COST_PER_SCORE = 1.8


@dataclass(frozen=True)
class Work:
    """What the blocked path computes for a pattern at a geometry."""

    scores_per_head: float  # scores per (example, head), padding included, averaged over heads
    cost_per_head: float  # the same with gathered columns counted GATHER_COST times (factored: x 1.8)
    mask_elements: int  # B' x H' x Nq x Nk: the dense mask this pattern would need
    how: str  # "block tiles", or the reordered head groups (``factored``)


def schedule_cost(sched: Schedule) -> int:
    """Scores per (example, head) with gathered columns counted ``GATHER_COST`` times."""
    total = 0
    for t in sched.tiles:
        gathered = t.gather_blocks * sched.block
        total += (t.rows.stop - t.rows.start) * (t.columns + (GATHER_COST - 1) * gathered)
    return total


def _factored_per_head(plan: FactoredPlan, tile_count: Callable[[Schedule], float]) -> float:
    """Per (example, head), averaged over head groups: dense calls count their scores (causal ones half),
    tile calls ``tile_count`` of their schedule."""
    total = 0.0
    for call in plan.calls:
        g = call.sub_geo
        if call.dense:
            heads_per_head = g.num_heads / (plan.geometry.num_heads / plan.period)  # s for a stride call
            causal = isinstance(call.pattern, CausalMask)
            total += g.q_len * g.kv_len * heads_per_head * (0.5 if causal else 1.0)
        else:
            total += tile_count(get_schedule(call.pattern, g, choose_block(call.pattern, g), plan.device))
    return total / plan.period


def blocked_work(pattern: Pattern, geo: Geometry, device: torch.device) -> Work:
    """The blocked path's work for ``pattern`` at ``geo``: tiles, or reordered head groups."""
    plan = factored_plan(pattern, geo, device)
    if plan is None:
        sched = get_schedule(pattern, geo, choose_block(pattern, geo), device)
        return Work(sched.scores_per_head, schedule_cost(sched),
                    sched.mask_batch * sched.mask_heads * geo.q_len * geo.kv_len, "block tiles")
    scores = _factored_per_head(plan, lambda s: s.scores_per_head)
    cost = FACTORED_COST_PER_SCORE * _factored_per_head(plan, schedule_cost)
    return Work(scores, cost, plan.mask_batch * plan.period * geo.q_len * geo.kv_len, plan.describe())
