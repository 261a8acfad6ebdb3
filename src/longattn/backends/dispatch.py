"""``backend="auto"``: pick a backend by a fixed, documented rule, and say why.

1. No pattern (or the full pattern): dense SDPA. Plain causal attention, square and without other
   masks: dense SDPA with ``is_causal`` (no mask, the upper half skipped).
2. The pattern's mask would exceed ``DENSE_MASK_ELEMENTS`` (B' x H' x Nq x Nk): never dense (memory).
3. At most the crossover's keys: dense SDPA (launch and gather overheads dominate short inputs).
4. The blocked path's cost (scores computed, gathered columns counted twice) exceeds the dense fraction
   of the Nq x Nk scores (a dense pattern, or blocks too coarse for it): dense SDPA, whose fused kernel
   does each score cheaper.
   The crossover and the dense fraction are per input dtype and per machine: ``longattn calibrate`` measures
   them (``machine.py``); without a calibration they are the defaults measured on the project's first
   machine, and the choice says so. On CUDA the fp32 values apply.
   Sparse Transformer patterns are costed as the blocked path runs them, reordered by head group
   (``blocked/factored.py``: O(N^2 / stride) for stride columns), each score weighted by
   ``cost.FACTORED_COST_PER_SCORE``.
5. CUDA and FlexAttention can serve the call: flex.
6. Otherwise: blocked (trains everywhere, no compilation).
7. Content-dependent patterns (``topk_blocks``) have no plan before the call and skip rules 2-6: dense SDPA with
   the chosen mask up to the crossover, flex on CUDA, else the blocked pair kernel. The keys are chosen once
   per call, whichever backend runs them.

Dropout rules out flex. The choice is logged at DEBUG level on ``longattn`` and returned by
``longattn.explain``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dataclasses import replace

from ..patterns import Geometry
from ..patterns.causal import CausalMask
from ..patterns.topk_blocks import is_content_dependent, resolve
from . import flex, machine
from .blocked import blocked_attention, native
from .blocked.selected import selected_attention
from .cost import blocked_work
from .dense import dense_attention
from .inputs import BACKENDS, AttentionInputs
from .machine import DEFAULT_LIMITS

logger = logging.getLogger("longattn")

# Rules 3 and 4's thresholds come from the machine profile (``machine.py``: ``longattn calibrate``, else the
# defaults measured on the project's first machine); CROSSOVER is the fp32 default, kept for reference.
CROSSOVER = DEFAULT_LIMITS["fp32"].crossover
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
    profile: str = ""  # which machine profile set the thresholds: "calibration <path>" or the defaults

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}" + (f" [thresholds: {self.profile}]" if self.profile else "")


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
    if is_content_dependent(inp.pattern):
        return _choose_content_dependent(inp)
    work, mask_elements, how = _plan_shape(inp)
    profile = machine.current()
    source = profile.source if profile.source.startswith("calibration") else "defaults (no `longattn calibrate`)"
    on_cpu = inp.q.device.type == "cpu"
    limits = profile.limits_for(inp.q.dtype if on_cpu else torch.float32)
    crossover, fraction = limits.crossover, limits.dense_fraction
    if mask_elements <= DENSE_MASK_ELEMENTS:
        if geo.kv_len <= crossover:
            return Choice("dense", f"{geo.kv_len} keys <= crossover {crossover}: SDPA is faster on short inputs",
                          source)
        if work > fraction:
            return Choice("dense", f"blocked cost {work:.2f} of all scores > {fraction}: little to skip", source)
    if inp.q.device.type == "cuda" and flex.unsupported_reason(inp) is None:
        return Choice("flex", f"CUDA, blocked cost {work:.3f} of all scores: FlexAttention kernel", source)
    why = flex.unsupported_reason(inp) or "no compilation per length"
    how = "" if how == "block tiles" else f" ({how})"
    kernel = "blocked tile kernel"
    if on_cpu and profile.fused_tiles and native.load() is not None:
        kernel = "blocked tiles in the fused C++ step (float32 products, no dropout; else the tile loop)"
    return Choice("blocked", f"blocked cost {work:.3f} of all scores{how}; {why}: {kernel}", source)


def _choose_content_dependent(inp: AttentionInputs) -> Choice:
    """Rule 7: a pattern that chooses keys from q and k (``topk_blocks``) has no plan before the call: short
    inputs go to dense SDPA with the chosen mask, CUDA to FlexAttention with a per-call block mask, the rest to
    the blocked pair kernel (``blocked/selected.py``)."""
    geo = inp.geometry
    profile = machine.current()
    on_cpu = inp.q.device.type == "cpu"
    crossover = profile.limits_for(inp.q.dtype if on_cpu else torch.float32).crossover
    mask_elements = geo.batch * geo.num_heads * geo.q_len * geo.kv_len
    if geo.kv_len <= crossover and mask_elements <= DENSE_MASK_ELEMENTS:
        return Choice("dense", f"content-chosen blocks, {geo.kv_len} keys <= crossover {crossover}: SDPA with the "
                      "chosen mask", profile.source)
    if inp.q.device.type == "cuda" and flex.unsupported_reason(inp) is None:
        return Choice("flex", "content-chosen blocks on CUDA: FlexAttention with a block mask built per call",
                      profile.source)
    return Choice("blocked", "content-chosen blocks: query rows grouped by the key block they chose (pair kernel)",
                  profile.source)


def run(inp: AttentionInputs, backend: str = "auto") -> Tensor:
    choice = choose(inp, backend)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("attention %s q=%s k=%s -> %s", inp.pattern, tuple(inp.q.shape), tuple(inp.k.shape), choice)
    if is_content_dependent(inp.pattern):  # choose the keys now, once, for whichever backend runs them
        resolved = resolve(inp.pattern, inp.q, inp.k, inp.key_padding_mask)
        if choice.backend == "blocked":
            return selected_attention(inp, resolved)
        inp = replace(inp, pattern=resolved.pattern)
    return IMPLEMENTATIONS[choice.backend](inp)
