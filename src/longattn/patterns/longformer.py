"""The Longformer preset: a (dilated) sliding window plus global tokens."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._base import Pattern, _check_int
from .causal import causal as _causal
from .global_tokens import global_tokens
from .window import check_window, dilated, sliding_window


def longformer(window: int = 512, dilation: int = 1, global_idx: Sequence[int] | Tensor | None = None, *,
               causal: bool = False) -> Pattern:
    """Longformer attention: a window of ``window`` keys around each query plus symmetric global attention
    for ``global_idx`` (positions, or a (B, N) bool mask chosen per example).

    ``window`` is Longformer's w (its ``attention_window``): ``window / 2`` keys on each side of the query,
    spaced ``dilation`` apart, so it must be even (an odd value raises ValueError). ``longformer(512)``'s
    window is ``sliding_window(256)``: query 1000 attends keys 744..1256."""
    check_window(window)
    _check_int(dilation, "dilation", minimum=1)
    pattern = sliding_window(window // 2) if dilation == 1 else dilated(window, dilation)
    if global_idx is not None:
        pattern = pattern | global_tokens(global_idx)
    return _causal(pattern) if causal else pattern
