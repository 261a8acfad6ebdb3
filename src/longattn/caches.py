"""Every cache longattn keeps, in one registry: ``clear_caches()`` empties all of them.

Plans, schedules, dense masks and FlexAttention block masks are built once per (pattern, geometry,
device) and reused: building them costs more than a call at short lengths. Each cache is created here
with ``named_cache``, under a name that ``cache_sizes()`` reports, so no cache can be forgotten by
``clear_caches`` (``longattn bench`` clears them all to time first calls honestly).

This module imports nothing from longattn: every layer, ``patterns/`` included, may use it.
"""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")


class LRUCache:
    """A thread-safe LRU cache keyed by hashable tuples, bounded by entry count and, when ``size_of`` is
    given, by total bytes (the newest entry always stays).

    ``get_or_build`` builds outside the lock: two threads missing the same key both build it (the values
    are equal, the second replaces the first) rather than one waiting on a long build under a lock that
    every other call needs."""

    def __init__(self, name: str, capacity: int, max_bytes: int | None = None,
                 size_of: Callable[[object], int] | None = None):
        self.name, self.capacity, self.max_bytes, self.size_of = name, capacity, max_bytes, size_of
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._lock = Lock()

    def get_or_build(self, key: Hashable | None, build: Callable[[], T]) -> T:
        """The value cached under ``key``, built and stored on a miss; ``key=None`` builds without caching."""
        if key is None:
            return build()
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = build()
        size = self.size_of(value) if self.size_of else 0
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            self._sizes[key] = size
            while len(self._data) > 1 and (len(self._data) > self.capacity or (
                    self.max_bytes is not None and sum(self._sizes.values()) > self.max_bytes)):
                old, _ = self._data.popitem(last=False)
                self._sizes.pop(old, None)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()


_REGISTRY: dict[str, LRUCache] = {}
_REGISTRY_LOCK = Lock()


def named_cache(name: str, capacity: int, *, max_bytes: int | None = None,
                size_of: Callable[[object], int] | None = None) -> LRUCache:
    """Create the cache ``name`` and register it; a name is owned by one module (created once)."""
    with _REGISTRY_LOCK:
        if name in _REGISTRY:
            raise ValueError(f"a cache named {name!r} exists already: each cache has one owner")
        cache = _REGISTRY[name] = LRUCache(name, capacity, max_bytes, size_of)
    return cache


def cache_sizes() -> dict[str, int]:
    """Entries held by every registered cache, by name."""
    with _REGISTRY_LOCK:
        return {name: len(cache) for name, cache in _REGISTRY.items()}


def clear_caches() -> None:
    """Forget every cached plan, schedule, dense mask and FlexAttention block mask."""
    with _REGISTRY_LOCK:
        caches = list(_REGISTRY.values())
    for cache in caches:
        cache.clear()
