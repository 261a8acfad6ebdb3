"""Timing and peak memory of a callable, shared by ``longattn bench`` and the LRA speed table.

CPU times come from ``torch.utils.benchmark.Timer.blocked_autorange`` with the process's threads; GPU
times are synchronised CUDA events. Peak memory is the extra memory one call needs above what already
exists: on CUDA ``max_memory_allocated``; on CPU the peak of live tensor bytes, counted exactly by a
``TorchDispatchMode``.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.benchmark import Timer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], device: torch.device, min_run_time: float) -> float:
    if device.type == "cuda":
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]
    # Timer runs single-threaded unless told otherwise: time with the threads the process really uses.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


class TensorMemory(TorchDispatchMode):
    """Counts the bytes of every tensor storage created while active, and their peak.

    Frees are seen through a finaliser on each storage, so the count is exact whatever the allocator
    does (glibc, OpenMP workers and RSS accounting make resident-set numbers unreliable on CPU).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._live:
                    self._live.add(key)
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def peak_mb(fn: Callable[[], None], device: torch.device, compiled: bool) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if compiled:  # compiled code bypasses the dispatcher (and a failed trace would poison the cache)
        return None
    tracker = TensorMemory()
    with tracker:
        fn()
    return tracker.peak / 2**20
