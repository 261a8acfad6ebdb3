"""``longattn bench --under-load``: the blocked path and SDPA idle, then beside one busy process per core.

A library that shares a machine should keep its fair share: with one spinning process per core and this
process's threads, the fair slowdown of a perfectly parallel call is about 2x. Many short parallel regions
meet OpenMP's spin-waiting instead (a thread spins at a barrier while its partner is descheduled), so the
slowdown of a path is measured, not assumed: the median and the worst of several calls, each against the
same path's idle median.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..functional import attention
from ..io import markdown_table
from ..patterns import build_preset

SPIN = "while True: pass"


@dataclass(frozen=True)
class LoadResult:
    path: str  # "blocked <pattern>" or "sdpa"
    seq_len: int
    idle_ms: float  # median
    busy_ms: float  # median beside the competing processes
    busy_worst_ms: float

    @property
    def slowdown(self) -> float:
        return self.busy_ms / self.idle_ms

    @property
    def worst_slowdown(self) -> float:
        return self.busy_worst_ms / self.idle_ms


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (plans, first-call setup)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return sorted(out)


def under_load(patterns: list[str], lengths: list[int], *, heads: int = 12, head_dim: int = 64, repeats: int = 9,
               competitors: int | None = None) -> list[LoadResult]:
    """Forward times of the blocked path (each pattern) and of SDPA, idle and beside ``competitors`` busy
    processes (default: one per core)."""
    competitors = os.cpu_count() or 1 if competitors is None else competitors
    calls = []
    for n in lengths:
        q, k, v = (torch.randn(1, heads, n, head_dim) for _ in range(3))
        for name in patterns:
            pattern = build_preset(name, n)
            calls.append((f"blocked {name}", n, lambda q=q, k=k, v=v, p=pattern: attention(q, k, v, pattern=p,
                                                                                            backend="blocked")))
        calls.append(("sdpa", n, lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)))
    with torch.no_grad():
        idle = [_times(fn, repeats) for _, _, fn in calls]
        procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(competitors)]
        try:
            time.sleep(1.0)  # the competitors reach full speed
            busy = [_times(fn, repeats) for _, _, fn in calls]
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return [LoadResult(path, n, i[len(i) // 2], b[len(b) // 2], b[-1])
            for (path, n, _), i, b in zip(calls, idle, busy)]


def load_table(results: list[LoadResult]) -> str:
    rows = [[r.path, r.seq_len, r.idle_ms, r.busy_ms, r.slowdown, r.worst_slowdown] for r in results]
    return markdown_table(["path", "N", "idle ms", "busy ms (median)", "slowdown", "worst / idle"], rows,
                          formats=["", "", ".1f", ".1f", ".2f", ".2f"])
