"""``longattn calibrate``: measure, once per machine and torch version, what ``auto`` and the blocked kernel
need, and store it where ``backends/machine.py`` reads it.

Measured (about 12 s on 2 cores, plus ~40 s the first time to compile the fused tile step):

- whether the blocked path runs its tiles in the C++ step (``blocked/native``): built here when a compiler is
  found, then timed against the Python tile loop (forward and backward on a window); everything below is
  measured with the path chosen;
- matmul rates per dtype (fp32, bf16, fp16), the ceiling benchmarks compare with;
- for bf16 inputs, the blocked path's forward with its matmuls in float32 and in bf16 (row offsets,
  ``blocked/kernel.py``): the faster becomes the compute dtype (a bf16 matmul rate alone does not decide it:
  conversions and the copies a bf16 matmul makes of strided operands can eat the gain);
- per input dtype, dense SDPA with the pattern's mask against the blocked path on a sliding window at 256 to
  2,048 keys: the **crossover** (the longest of those lengths at which SDPA was still faster) and the
  **dense fraction** (SDPA's time per score over the blocked path's time per unit of its cost model: the share of
  all Nq x Nk scores up to which the blocked path wins);
- the blocked path's fixed cost per tile, in scores of work (the schedule's ``TILE_OVERHEAD_SCORES``), from
  the same window run with one and with two query blocks per tile.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends import clear_caches, machine
from ..backends.blocked import native, schedule
from ..backends.cost import blocked_work
from ..backends.machine import DTYPE_NAMES, DispatchLimits, MachineProfile
from ..functional import attention
from ..io import write_json
from ..patterns import Geometry, sliding_window
from ..training.progress import progress_bar
from .measure import median_ms

HEADS, HEAD_DIM = 4, 64
LENGTHS = (256, 512, 1024, 2048)  # the crossover is one of these (or 0: blocked won from the first)
WINDOW = 128  # +-128 keys: a Longformer-256 window, sparse enough from 1024 keys to show the blocked path's rate
BF16_MARGIN = 1.05  # bf16 compute must win by this much (timing noise)
FP16_MARGIN = 1.2  # an fp16 matmul must beat fp32 by this much before fp16 inputs compute in fp16
MIN_TILE_OVERHEAD = 10_000  # scores; the fused step's tiles cost about nothing beside their scores
MIN_RUN_TIME = 0.4  # per timing: ~12 s in all on 2 cores; 0.2 moved the tile overhead by 1.6x between runs


def _qkv(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).to(dtype) for _ in range(3))


def _time(fn: Callable[[], object], min_run_time: float) -> float:
    with torch.no_grad():
        fn()  # plans, masks, first-call setup
        return median_ms(fn, torch.device("cpu"), min_run_time)


def _matmul_rate(dtype: torch.dtype, min_run_time: float) -> float:
    """Dense n x n matmul GFLOP/s at n = 1024, or at 256 where the dtype has no fast path (fp16 on most
    CPUs runs at a few GFLOP/s: a 1024 product would take seconds)."""
    for n in (256, 1024):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = median_ms(lambda: torch.mm(a, b), torch.device("cpu"), min_run_time if n > 256 else 0.05)
        rate = 2 * n**3 / (t * 1e-3) / 1e9
        if rate < 20:
            break
    return rate


def _limits(dtype: torch.dtype, measured: dict[str, float], min_run_time: float, tick: Callable[[], None]
            ) -> DispatchLimits:
    """Crossover and dense fraction for one input dtype, from SDPA and the blocked path on a window."""
    name = DTYPE_NAMES[dtype]
    pattern = sliding_window(WINDOW)
    crossover, fraction = 0, None
    for n in LENGTHS:
        q, k, v = _qkv(n, dtype)
        dense = _time(lambda: attention(q, k, v, pattern=pattern, backend="dense"), min_run_time)
        blocked = _time(lambda: attention(q, k, v, pattern=pattern, backend="blocked"), min_run_time)
        measured[f"{name}_dense_ms_{n}"], measured[f"{name}_blocked_ms_{n}"] = dense, blocked
        if dense < blocked:
            crossover = n
        if n == LENGTHS[-1]:  # the longest: per-score rates with the fixed costs amortised
            cost = blocked_work(pattern, Geometry(n, n, HEADS, 1), q.device).cost_per_head
            dense_per_score = dense / (n * n)
            blocked_per_cost = blocked / cost
            measured[f"{name}_dense_ns_per_score"] = dense_per_score * 1e6 / HEADS
            measured[f"{name}_blocked_ns_per_cost"] = blocked_per_cost * 1e6 / HEADS
            fraction = dense_per_score / blocked_per_cost
        tick()
    return DispatchLimits(crossover=crossover, dense_fraction=round(float(fraction), 3))


def _tile_overhead(measured: dict[str, float], min_run_time: float) -> int:
    """The fixed cost of a tile in scores: t = c * scores + o * tiles at one and two query blocks per tile."""
    n = 4096
    q, k, v = _qkv(n, torch.float32)
    pattern = sliding_window(256)
    points = []
    saved = schedule.MAX_TILE_BLOCKS, schedule.TILE_OVERHEAD_SCORES
    try:
        for r in (1, 2):
            schedule.MAX_TILE_BLOCKS, schedule.TILE_OVERHEAD_SCORES = r, 10**12  # the widest tiles allowed
            clear_caches()
            sched = schedule.get_schedule(pattern, Geometry(n, n, HEADS, 1), schedule.DEFAULT_BLOCK, q.device)
            t = _time(lambda: attention(q, k, v, pattern=pattern, backend="blocked"), min_run_time)
            points.append((sched.scores_per_head * HEADS, len(sched.tiles), t))
            measured[f"tile_r{r}_ms"] = t
    finally:
        schedule.MAX_TILE_BLOCKS, schedule.TILE_OVERHEAD_SCORES = saved
        clear_caches()
    (s1, n1, t1), (s2, n2, t2) = points
    # Two equations, two unknowns: per-score cost c and per-tile cost o.
    det = s1 * n2 - s2 * n1
    c = (t1 * n2 - t2 * n1) / det
    o = (s1 * t2 - s2 * t1) / det
    if c <= 0:  # noise swamped the measurement: keep the default
        return machine.DEFAULT_TILE_OVERHEAD_SCORES
    # o <= 0: a tile costs nothing measurable beside its scores (the fused step): the floor, one-block tiles
    return int(min(max(o / c, MIN_TILE_OVERHEAD), 2_000_000))


def _bf16_compute(measured: dict[str, float], min_run_time: float) -> str:
    """"bf16" where the blocked forward on bf16 inputs is faster multiplying in bf16 than in float32."""
    n = 2048
    q, k, v = _qkv(n, torch.bfloat16)
    pattern = sliding_window(256)
    times = {}
    for compute in ("fp32", "bf16"):
        forced = dataclasses.replace(machine.current(), source="calibrating", compute={"bf16": compute})
        with machine.use(forced):
            times[compute] = _time(lambda: attention(q, k, v, pattern=pattern, backend="blocked"), min_run_time)
        measured[f"bf16_inputs_{compute}_compute_ms"] = times[compute]
    return "bf16" if times["bf16"] * BF16_MARGIN < times["fp32"] else "fp32"


def _fused_tiles(measured: dict[str, float], min_run_time: float) -> bool:
    """Build the fused tile step (once per machine) and keep it where it beats the Python tile loop."""
    if native.build() is None:
        measured["fused_tiles_unavailable"] = 1.0
        return False
    n = 2048
    q, k, v = (t.requires_grad_() for t in _qkv(n, torch.float32))
    pattern = sliding_window(256)

    def step():
        with torch.enable_grad():
            attention(q, k, v, pattern=pattern, backend="blocked").sum().backward()

    times = {}
    for fused in (False, True):
        with machine.use(dataclasses.replace(machine.DEFAULTS, source="calibrating", fused_tiles=fused)):
            times[fused] = _time(step, min_run_time)
        measured[f"{'fused' if fused else 'python'}_tiles_fwd_bwd_ms"] = times[fused]
    return times[True] < times[False]


def calibrate(*, min_run_time: float = MIN_RUN_TIME, progress: bool = True) -> MachineProfile:
    """Measure this machine's profile (nothing is written; ``save`` stores it)."""
    start = time.perf_counter()
    measured: dict[str, float] = {}
    steps = 1 + 3 + 1 + 2 * len(LENGTHS) + 1
    with progress_bar(total=steps, desc="calibrate", enabled=progress) as bar:
        if progress and native.load() is None and not native.disabled():
            bar.set_description("calibrate (compiling the fused tile step, once)")
        fused = _fused_tiles(measured, min_run_time)
        bar.set_description("calibrate")
        bar.update(1)
        base = dataclasses.replace(machine.DEFAULTS, fused_tiles=fused)
        rates = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            rates[DTYPE_NAMES[dtype]] = round(_matmul_rate(dtype, min_run_time), 1)
            bar.update(1)
        with machine.use(base):
            compute = {"bf16": _bf16_compute(measured, min_run_time)}
        # fp16 on a CPU without an fp16 unit runs its matmul at a few GFLOP/s: it computes in float32 unless
        # its matmul clearly beats float32's (fp16 inputs are rare on CPU: not timed in the kernel).
        compute["fp16"] = "fp16" if rates["fp16"] >= FP16_MARGIN * rates["fp32"] else "fp32"
        bar.update(1)
        profile = dataclasses.replace(base, compute=compute)
        limits = {}
        with machine.use(profile):
            for dtype in (torch.float32, torch.bfloat16):
                limits[DTYPE_NAMES[dtype]] = _limits(dtype, measured, min_run_time, lambda: bar.update(1))
            tile_overhead = _tile_overhead(measured, min_run_time)
        limits["fp16"] = limits["bf16"]  # the same low-precision rules; fp16 is rare on CPU
        limits["fp64"] = machine.DEFAULT_LIMITS["fp64"]
        bar.update(1)
    measured["seconds"] = round(time.perf_counter() - start, 1)
    return MachineProfile(source="calibration", matmul_gflops=rates, limits=limits, compute=compute,
                          tile_overhead_scores=tile_overhead, fused_tiles=fused,
                          measured={k: round(v, 4) for k, v in measured.items()}, machine=machine.machine_key())


def save(profile: MachineProfile) -> str:
    """Write ``profile`` (atomically) where this machine's calibration lives; the running process uses it."""
    path = machine.calibration_path(profile.machine)
    write_json(path, profile.to_json())
    machine.forget()
    clear_caches()  # schedules chose their tiles with the old tile cost
    return str(path)


def describe(profile: MachineProfile) -> list[str]:
    """The profile as lines a user can read."""
    lines = [f"profile: {profile.source}"]
    if profile.machine:
        m = profile.machine
        lines.append(f"machine: {m.get('cpu')} ({m.get('flags') or 'no AVX-512'}), {m.get('threads')} threads, "
                     f"torch {m.get('torch')}")
    if profile.matmul_gflops:
        lines.append("matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in profile.matmul_gflops.items()))
    for name in ("bf16", "fp16"):
        chosen = profile.compute.get(name, "fp32")
        lines.append(f"{name} inputs: blocked forward multiplies in {chosen}"
                     + ("" if profile.compute else " (no measurement: default)"))
    for name, lim in sorted(profile.limits.items()):
        lines.append(f"auto, {name}: dense SDPA up to {lim.crossover} keys and above blocked cost "
                     f"{lim.dense_fraction:g} of all scores")
    lines.append(f"tile overhead: {profile.tile_overhead_scores:,} scores of work per tile")
    if profile.fused_tiles:
        lines.append(f"blocked tiles: the fused C++ step ({native.products()})")
    else:
        why = "slower here" if "fused_tiles_fwd_bwd_ms" in profile.measured else native.reason()
        lines.append(f"blocked tiles: the Python tile loop (fused C++ step: {why})")
    if "seconds" in profile.measured:
        lines.append(f"measured in {profile.measured['seconds']:.1f} s")
    return lines
