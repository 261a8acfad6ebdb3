"""Attention backends: dense (oracle), blocked (gathered blocks, any device, autograd), flex."""

from ..patterns import clear_caches as _clear_plans
from . import blocked as _blocked
from . import dense as _dense
from . import flex as _flex
from ._dispatch import CROSSOVER, Choice, choose
from .blocked import blocked_attention
from .dense import dense_attention
from .flex import flex_backend_attention


def clear_caches() -> None:
    """Forget every cached plan, schedule, dense mask and FlexAttention block mask."""
    _clear_plans()
    _blocked._SCHEDULES.clear()
    _dense._MASKS.clear()
    _flex._BLOCK_MASKS.clear()


__all__ = ["CROSSOVER", "Choice", "blocked_attention", "choose", "clear_caches", "dense_attention",
           "flex_backend_attention"]
