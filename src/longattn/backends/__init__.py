"""Attention backends: dense (oracle), blocked (gathered blocks, any device, autograd), flex."""

from ._dispatch import CROSSOVER, Choice, choose
from .blocked import blocked_attention
from .dense import dense_attention
from .flex import flex_backend_attention

__all__ = ["CROSSOVER", "Choice", "blocked_attention", "choose", "dense_attention", "flex_backend_attention"]
