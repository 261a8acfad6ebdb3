"""``backend="auto"``: pick a backend by a fixed, documented rule, and say why.

1. No pattern (or the full pattern), or a pattern denser than ``DENSE_DENSITY``: dense SDPA.
2. At most ``CROSSOVER`` keys: dense SDPA (launch and gather overheads dominate short inputs).
3. CUDA and FlexAttention can serve the call: flex.
4. Otherwise: blocked (trains everywhere, no compilation).

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
from . import flex
from ._inputs import BACKENDS, AttentionInputs
from .blocked import blocked_attention, choose_block
from .dense import dense_attention

logger = logging.getLogger("longattn")

CROSSOVER = 1024  # keys; below this dense SDPA wins (see `longattn bench`)
DENSE_DENSITY = 0.5  # above this share of allowed pairs, sparsity saves less than it costs

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


def _density(inp: AttentionInputs) -> float:
    from ..patterns.layout import get_plan

    geo: Geometry = inp.geometry
    return get_plan(inp.pattern, geo, choose_block(inp.pattern), inp.q.device).density


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
    if geo.kv_len <= CROSSOVER:
        return Choice("dense", f"{geo.kv_len} keys <= crossover {CROSSOVER}: dense SDPA is faster on short inputs")
    density = _density(inp)
    if density > DENSE_DENSITY:
        return Choice("dense", f"pattern density {density:.2f} > {DENSE_DENSITY}: little to skip")
    if inp.q.device.type == "cuda" and flex.unsupported_reason(inp) is None:
        return Choice("flex", f"CUDA, density {density:.3f}: FlexAttention kernel")
    why = flex.unsupported_reason(inp) or "no compilation per length"
    return Choice("blocked", f"density {density:.3f}; {why}: blocked gather kernel")


def run(inp: AttentionInputs, backend: str = "auto") -> Tensor:
    choice = choose(inp, backend)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("attention %s q=%s k=%s -> %s", inp.pattern, tuple(inp.q.shape), tuple(inp.k.shape), choice)
    return IMPLEMENTATIONS[choice.backend](inp)
