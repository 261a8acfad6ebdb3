"""The Longformer preset: a (dilated) sliding window plus global tokens."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._base import Pattern, _check_int
from .causal import causal as _causal
from .global_tokens import global_tokens
from .window import dilated, sliding_window


def longformer(window: int = 512, dilation: int = 1, global_idx: Sequence[int] | Tensor | None = None, *,
               causal: bool = False) -> Pattern:
    """Longformer attention: ``window`` keys around each query (``window // 2`` per side, spaced
    ``dilation`` apart) plus symmetric global attention for ``global_idx`` (positions, or a (B, N) bool
    mask chosen per example)."""
    _check_int(window, "window")
    _check_int(dilation, "dilation", minimum=1)
    pattern = sliding_window(window // 2) if dilation == 1 else dilated(window, dilation)
    if global_idx is not None:
        pattern = pattern | global_tokens(global_idx)
    return _causal(pattern) if causal else pattern
