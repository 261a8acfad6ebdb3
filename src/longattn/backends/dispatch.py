"""``backend="auto"``: pick a backend by a fixed, documented rule, and say why.

1. No pattern (or the full pattern): dense SDPA. Plain causal attention, square and without other
   masks: dense SDPA with ``is_causal`` (no mask, the upper half skipped).
2. The pattern's mask would exceed ``DENSE_MASK_ELEMENTS`` (B' x H' x Nq x Nk): never dense (memory).
3. At most ``CROSSOVER`` keys: dense SDPA (launch and gather overheads dominate short inputs). For
   bf16/fp16 on CPU the crossover and the fraction of rule 4 are the ``LOW_PRECISION_CPU_*`` values.
4. The blocked path's cost (scores computed, gathered columns counted twice) exceeds ``DENSE_FRACTION``
   of the Nq x Nk scores (a dense pattern, or blocks too coarse for it): dense SDPA, whose fused kernel
   does each score cheaper. Sparse Transformer patterns are costed as the blocked path runs them,
   reordered by head group (``blocked/factored.py``: O(N^2 / stride) for stride columns), each score
   weighted by ``cost.FACTORED_COST_PER_SCORE``.
5. CUDA and FlexAttention can serve the call: flex.
6. Otherwise: blocked (trains everywhere, no compilation).

Dropout rules out flex. The choice is logged at DEBUG level on ``longattn`` and returned by
``longattn.explain``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..patterns import Geometry
from ..patterns.causal import CausalMask
from . import flex
from .blocked import blocked_attention
from .cost import blocked_work
from .dense import dense_attention
from .inputs import BACKENDS, AttentionInputs

logger = logging.getLogger("longattn")

CROSSOVER = 512  # keys; up to this dense SDPA wins (see `longattn bench --lengths 256 512 1024`)
# The blocked path's cost (scores it computes, gathered ones counted twice: ``cost.schedule_cost``) as
# a share of all Nq x Nk scores, above which masked SDPA wins (2 CPU cores, `longattn bench --lengths
# 1024 2048`): Longformer-512 at N=1024 reads a 640-key band in place, cost 0.55, and is 1.5x faster
# than SDPA; BigBird-64 gathers 8 blocks per tile, cost 1.1 at N=1024 (0.75x SDPA), 0.59 at N=2048
# (faster than SDPA).
DENSE_FRACTION = 0.8
# bf16/fp16 on CPU: SDPA runs at the low-precision matmul rate (half of fp32 without AMX, plus a slower
# masked path) while the blocked path computes in fp32, so the crossover moves (`longattn bench --dtypes
# bf16 --lengths 256 512 1024`: blocked 1.2-1.5x faster than SDPA from 512 keys, BigBird 1.6x at 1024).
LOW_PRECISION_CPU_CROSSOVER = 256
LOW_PRECISION_CPU_DENSE_FRACTION = 2.5  # BigBird-64 at 512 keys costs 2.0 and is 1.3x faster blocked
# A materialised (B', H', Nq, Nk) mask above this many elements costs more than it saves (and can
# exhaust memory: 12 heads at N=16384 is 3.2 GB of bool before SDPA converts it to float).
DENSE_MASK_ELEMENTS = 64 * 2**20

IMPLEMENTATIONS: dict[str, Callable[[AttentionInputs], Tensor]] = {
    "dense": dense_attention,
    "blocked": blocked_attention,
    "flex": flex.flex_backend_attention,
}


@dataclass(frozen=True)
class Choice:
    backend: str  # "dense", "blocked" or "flex"
    reason: str  # one sentence a user can read

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


def _plan_shape(inp: AttentionInputs) -> tuple[float, int, str]:
    """The blocked path's cost as a fraction of Nq x Nk scores, the dense mask's element count, and how
    the blocked path would run it."""
    geo: Geometry = inp.geometry
    w = blocked_work(inp.pattern, geo, inp.q.device)
    return w.cost_per_head / (geo.q_len * geo.kv_len), w.mask_elements, w.how


def choose(inp: AttentionInputs, backend: str = "auto") -> Choice:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend != "auto":
        if backend == "flex":
            reason = flex.unsupported_reason(inp)
            if reason is not None:
                raise ValueError(f"backend='flex' cannot run this call: {reason}")
        return Choice(backend, "requested explicitly")
    geo = inp.geometry
    if inp.sparse_pattern is None:
        return Choice("dense", "no sparse pattern: full attention is SDPA")
    if isinstance(inp.sparse_pattern, CausalMask) and geo.q_len == geo.kv_len and not inp.has_extra_masks:
        return Choice("dense", "plain causal: SDPA's fused causal kernel needs no mask and skips the upper half")
    work, mask_elements, how = _plan_shape(inp)
    crossover, fraction = CROSSOVER, DENSE_FRACTION
    if inp.q.device.type == "cpu" and inp.q.dtype in (torch.bfloat16, torch.float16):
        crossover, fraction = LOW_PRECISION_CPU_CROSSOVER, LOW_PRECISION_CPU_DENSE_FRACTION
    if mask_elements <= DENSE_MASK_ELEMENTS:
        if geo.kv_len <= crossover:
            return Choice("dense", f"{geo.kv_len} keys <= crossover {crossover}: SDPA is faster on short inputs")
        if work > fraction:
            return Choice("dense", f"blocked cost {work:.2f} of all scores > {fraction}: little to skip")
    if inp.q.device.type == "cuda" and flex.unsupported_reason(inp) is None:
        return Choice("flex", f"CUDA, blocked cost {work:.3f} of all scores: FlexAttention kernel")
    why = flex.unsupported_reason(inp) or "no compilation per length"
    how = "" if how == "block tiles" else f" ({how})"
    return Choice("blocked", f"blocked cost {work:.3f} of all scores{how}; {why}: blocked tile kernel")


def run(inp: AttentionInputs, backend: str = "auto") -> Tensor:
    choice = choose(inp, backend)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("attention %s q=%s k=%s -> %s", inp.pattern, tuple(inp.q.shape), tuple(inp.k.shape), choice)
    return IMPLEMENTATIONS[choice.backend](inp)
