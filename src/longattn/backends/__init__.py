"""Attention backends: dense (the oracle), blocked (tiles of query rows, any device, autograd), flex; the
cost model and the ``auto`` rule that chooses between them."""

from ..caches import cache_sizes, clear_caches
from .blocked import blocked_attention
from .dense import dense_attention
from .dispatch import CROSSOVER, Choice, choose
from .flex import flex_backend_attention
from .inputs import BACKENDS

__all__ = ["BACKENDS", "CROSSOVER", "Choice", "blocked_attention", "cache_sizes", "choose", "clear_caches",
           "dense_attention", "flex_backend_attention"]
