"""Combiner-Logsparse's mask, three ways of finding a summary slot's level (``CombinerLogsparse._allowed_fn``).

``searchsorted`` (the first version: FlexAttention cannot compile it), ``comparisons`` (one comparison with
every level's first slot: compiles, but touches the mask once per level) and ``lookup`` (the current one:
two small per-slot tables). Each variant is swapped in turn in one process; all three must give the same
mask. Prints the machine's matmul rates, the dense mask's time, and the first blocked call at a new length
(block plan, schedule and forward) beside a warm one.

    .venv/bin/python scripts/logsparse_mask_ab.py
"""

from __future__ import annotations

import os
import time

import torch

import longattn as la
from longattn.patterns import combiner as C
from longattn.tools.bench import matmul_gflops


def searchsorted(self, geo, device):
    s, offsets = self.slots, torch.tensor((0, *self.slots_per_level), device=device).cumsum(0)

    def allowed(b, h, i, j):
        i, j = torch.broadcast_tensors(i, j)
        level = (torch.searchsorted(offsets, j.clamp(max=s - 1).contiguous(), right=True) - 1).clamp(min=0)
        return _rest(self, i, j, level, j - offsets[level])

    return allowed


def comparisons(self, geo, device):
    s, offsets = self.slots, torch.tensor((0, *self.slots_per_level)).cumsum(0).tolist()

    def allowed(b, h, i, j):
        i, j = torch.broadcast_tensors(i, j)
        level, first = torch.zeros_like(j), torch.zeros_like(j)
        for lvl, start in enumerate(offsets[1:-1], start=1):
            past = j >= start
            level, first = torch.where(past, lvl, level), torch.where(past, start, first)
        return _rest(self, i, j, level, j - first)

    return allowed


def _rest(self, i, j, level, index):
    s = self.slots
    sibling = torch.bitwise_right_shift(i - s, level) ^ 1
    slot = (j < s) & (index == sibling)
    if self.causal:
        slot = slot & (sibling < torch.bitwise_right_shift(i - s, level))
    return ((j >= s) & (j == i)) | slot


VARIANTS = {"searchsorted": searchsorted, "comparisons": comparisons, "lookup": C.CombinerLogsparse._allowed_fn}


def main() -> None:
    rates = {d: round(matmul_gflops(getattr(torch, d), torch.device("cpu"))) for d in ("float32", "bfloat16")}
    print(f"matmul GFLOP/s {rates}, load {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    for n in (2048, 4096):
        pattern = C.combiner_logsparse(n, causal=True)
        masks, times = {}, {}
        for _ in range(3):
            for name, fn in VARIANTS.items():
                C.CombinerLogsparse._allowed_fn = fn
                tick = time.perf_counter()
                masks[name] = pattern.dense(n, n + pattern.slots)
                times[name] = min(times.get(name, 1e9), time.perf_counter() - tick)
        assert all(torch.equal(m, masks["lookup"]) for m in masks.values())
        print(f"dense mask N={n}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()))
    for n in (8192, 16384):
        for shift, (name, fn) in enumerate(VARIANTS.items()):
            C.CombinerLogsparse._allowed_fn = fn
            m = n + shift  # a length of its own: no cached plan or schedule
            pattern = C.combiner_logsparse(m, causal=True)
            q, k = torch.randn(1, 4, m, 64), torch.randn(1, 4, m + pattern.slots, 64)
            tick = time.perf_counter()
            la.attention(q, k, k, pattern=pattern, backend="blocked")
            first = time.perf_counter() - tick
            tick = time.perf_counter()
            la.attention(q, k, k, pattern=pattern, backend="blocked")
            print(f"blocked forward N={m}: {name} first call {first:.2f} s, warm {time.perf_counter() - tick:.2f} s")
    C.CombinerLogsparse._allowed_fn = VARIANTS["lookup"]


if __name__ == "__main__":
    main()
