"""``longattn bench``: time every pattern on every path against dense SDPA and plain FlexAttention.

Following attention-gym's ``flex_perf.py``: frozen dataclasses for the experiment and the result, FLOPs
counted on the attended pairs only (forward 4*D per pair: QK^T and PV; backward 8*D: dV, dP, dQ, dK),
warm-up before timing, results to JSON and CSV. CPU times come from
``torch.utils.benchmark.Timer.blocked_autorange``; GPU times are synchronised.

Peak memory is the extra memory one call needs above its inputs: on CUDA ``max_memory_allocated``; on
CPU the peak of live tensor bytes, counted exactly by a ``TorchDispatchMode``.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..backends import clear_caches
from ..backends import flex as flex_backend
from ..backends import machine as machine_profile
from ..backends.blocked import choose_block
from ..backends.machine import DTYPE_NAMES, compute_dtype
from ..functional import attention
from ..io import atomic_path, markdown_table, write_json, write_text
from ..patterns import PRESETS, Geometry, Pattern, build_preset, get_plan
from ..training.progress import progress_bar
from .measure import median_ms, peak_mb, sync

PATHS = ("sdpa", "dense", "blocked", "flex", "flex_plain", "auto")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Experiment:
    pattern: str  # a preset name (``longattn.patterns.PRESETS``), built at the experiment's length
    path: str  # one of PATHS
    mode: str  # "fwd" or "fwd+bwd"
    seq_len: int
    dtype: str = "fp32"
    batch: int = 1
    heads: int = 12
    head_dim: int = 64


@dataclass(frozen=True)
class Result:
    experiment: Experiment
    time_ms: float | None  # median; None when the path cannot run this experiment
    first_call_ms: float | None  # the one-off cost of the first call (plans, compilation)
    useful_gflops: float | None  # attended-pair FLOPs / time
    peak_mb: float | None  # extra memory of one call above its inputs
    density: float
    note: str = ""
    sdpa_paired_ms: float | None = None  # SDPA timed alternately with this path (short inputs): the fair ratio

    def row(self) -> dict:
        return {**asdict(self.experiment), **{k: v for k, v in asdict(self).items() if k != "experiment"}}


#: the presets timed by default (DESIGN.md's reference points); any sparse preset of ``PRESETS`` can be named
DEFAULT_PATTERNS = ("longformer_512", "bigbird_64", "strided_128_causal", "strided_64", "fixed_128_8")
#: presets a benchmark can time: every one but ``full`` (which is the ``sdpa`` path)
BENCH_PATTERNS = tuple(name for name in PRESETS if build_preset(name, 1024) is not None)


# ---- measurement helpers ----------------------------------------------------------------------------------

def matmul_gflops(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...] = (1024, 2048)) -> float:
    """The machine's dense matmul rate, best of a few square sizes: the ceiling useful GFLOP/s are compared with."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = median_ms(lambda: torch.mm(a, b), device, 0.5)
        best = max(best, 2 * n**3 / (ms * 1e-3) / 1e9)
    return best


# ---- the paths ------------------------------------------------------------------------------------------

def _plain_flex(pattern: Pattern, exp: Experiment, device: torch.device) -> Callable:
    """What a user writes by hand: create_block_mask from the mask_mod, flex_attention compiled."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = exp.seq_len
    mask_mod = pattern.mask_mod(n, n, num_heads=exp.heads, batch_size=exp.batch, device=device)
    block = flex_backend.flex_block(pattern, device)
    plan = get_plan(pattern, Geometry(n, n, exp.heads, exp.batch), block, device)
    heads = exp.heads if plan.kv_index.shape[1] > 1 else None  # None broadcasts one mask over heads
    block_mask = create_block_mask(mask_mod, None, heads, n, n, device=device, BLOCK_SIZE=block, _compile=True)
    compiled = flex_backend.compiled_flex_attention()
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _make_call(pattern: Pattern, exp: Experiment, device: torch.device) -> Callable:
    if exp.path == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if exp.path == "flex_plain":
        return _plain_flex(pattern, exp, device)
    backend = exp.path
    return lambda q, k, v: attention(q, k, v, pattern=pattern, backend=backend)


def _why_not(exp: Experiment, device: torch.device) -> str | None:
    if exp.path in ("flex", "flex_plain"):
        if not flex_backend.available():
            return "no FlexAttention"
        if device.type == "cpu" and exp.mode == "fwd+bwd":
            return "FlexAttention has no CPU backward"
    if exp.path == "dense" and exp.seq_len > 4096 and device.type == "cpu":
        return "quadratic mask: auto never picks it here"
    return None


def _density(exp: Experiment, device: torch.device) -> float:
    """Share of (query, key) pairs the experiment's pattern allows: what useful FLOPs count."""
    pattern = build_preset(exp.pattern, exp.seq_len)
    geo = Geometry(exp.seq_len, exp.seq_len, exp.heads, exp.batch)
    return get_plan(pattern, geo, choose_block(pattern, geo), device).density


def run_experiment(exp: Experiment, device: torch.device, *, min_run_time: float = 0.5) -> Result:
    pattern = build_preset(exp.pattern, exp.seq_len)
    density = _density(exp, device)
    pairs = density * exp.batch * exp.heads * exp.seq_len**2
    flops = pairs * exp.head_dim * (4 if exp.mode == "fwd" else 12)
    reason = _why_not(exp, device)
    if reason:
        return Result(exp, None, None, None, None, density, reason)
    dtype = DTYPES[exp.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (exp.batch, exp.heads, exp.seq_len, exp.head_dim)
    train = exp.mode == "fwd+bwd"
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_(train) for _ in range(3))
    grad_out = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    clear_caches()
    t0 = time.perf_counter()
    call = _make_call(pattern, exp, device)

    def step() -> None:
        with torch.set_grad_enabled(train):  # inference runs without autograd bookkeeping
            out = call(q, k, v)
            if train:
                torch.autograd.grad(out, (q, k, v), grad_out)

    try:
        step()
        sync(device)
        first = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        step()  # warm-up
        sync(device)
        warm_ms, paired = (time.perf_counter() - t1) * 1e3, None
        if exp.path != "sdpa" and device.type == "cpu" and warm_ms < PAIRED_MAX_MS:
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
            sdpa_step = lambda: torch.autograd.grad(sdpa(), (q, k, v), grad_out) if train else sdpa()  # noqa: E731
            ms, paired = _paired_ms(step, sdpa_step, min_run_time)
        else:
            ms = median_ms(step, device, min_run_time)
        peak = peak_mb(step, device, compiled=exp.path in ("flex", "flex_plain"))
    except (RuntimeError, NotImplementedError, ValueError) as err:  # a path that cannot run: say why
        return Result(exp, None, None, None, None, density, f"{type(err).__name__}: {str(err)[:80]}")
    return Result(exp, ms, first, flops / (ms * 1e-3) / 1e9, peak, density, sdpa_paired_ms=paired)


PAIRED_MAX_MS = 50.0  # paths whose warm-up call is faster than this are timed alternately with SDPA


def _paired_ms(fn_a: Callable[[], None], fn_b: Callable[[], None], min_run_time: float) -> tuple[float, float]:
    """Median times of two calls measured alternately, so that a shared machine's drift hits both alike
    (short inputs: a few percent separate the paths, and back-to-back runs differ by more)."""
    fn_b()  # warm-up
    ta, tb = [], []
    deadline = time.perf_counter() + 2 * min_run_time
    while time.perf_counter() < deadline or len(ta) < 10:
        for fn, times in ((fn_a, ta), (fn_b, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(ta)[len(ta) // 2] * 1e3, sorted(tb)[len(tb) // 2] * 1e3


def _reuse_for_pattern(done: Result, exp: Experiment, device: torch.device) -> Result:
    """An SDPA result re-labelled for another pattern (useful FLOPs count that pattern's pairs)."""
    density = _density(exp, device)
    gflops = None if done.useful_gflops is None else done.useful_gflops * density / done.density
    return Result(exp, done.time_ms, done.first_call_ms, gflops, done.peak_mb, density, done.note)


def experiments(patterns: Iterable[str], paths: Iterable[str], modes: Iterable[str], lengths: Iterable[int],
                dtypes: Iterable[str], heads: int, head_dim: int, batch: int) -> list[Experiment]:
    return [Experiment(p, path, mode, n, dt, batch, heads, head_dim)
            for p in patterns for dt in dtypes for mode in modes for n in lengths for path in paths]


# ---- reporting --------------------------------------------------------------------------------------------

COLUMNS = ("pattern", "dtype", "mode", "seq_len", "path", "time_ms", "vs_sdpa", "vs_flex", "useful_gflops",
           "of_matmul", "peak_mb", "first_call_ms", "note")


def _speedups(results: list[Result], base_path: str = "sdpa") -> dict[Experiment, float]:
    """time(base_path) / time(path) for every result with a base in the same setting (> 1: faster);
    against SDPA, the time measured alternately with the path where there is one."""
    base = {}
    for r in results:
        e = r.experiment
        if e.path == base_path and r.time_ms:
            base[(e.pattern, e.dtype, e.mode, e.seq_len)] = r.time_ms
    out = {}
    for r in results:
        e = r.experiment
        ref = base.get((e.pattern, e.dtype, e.mode, e.seq_len))
        if base_path == "sdpa" and r.sdpa_paired_ms:
            ref = r.sdpa_paired_ms
        if ref and r.time_ms:
            out[e] = ref / r.time_ms
    return out


def _of_matmul(r: Result, machine: dict) -> float | None:
    """Useful GFLOP/s as a share of the machine's measured matmul rate in the dtype the path multiplies in
    (the blocked path may multiply bf16 inputs in fp32: ``machine["compute"]``, from the machine profile)."""
    dtype = r.experiment.dtype
    if r.experiment.path in ("blocked", "auto"):
        dtype = machine.get("compute", {}).get(dtype, dtype)
    rate = machine.get("matmul_gflops", {}).get(dtype)
    return None if r.useful_gflops is None or not rate else r.useful_gflops / rate


def format_table(results: list[Result], header: str = "", machine: dict | None = None) -> str:
    speed, vs_flex = _speedups(results), _speedups(results, "flex_plain")
    ratio = lambda d, e: format(d[e], ".2f") + "x" if e in d else "-"  # noqa: E731
    rows = []
    for r in results:
        e = r.experiment
        fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        rows.append([e.pattern, e.dtype, e.mode, str(e.seq_len), e.path, fmt(r.time_ms, ".1f"), ratio(speed, e),
                     ratio(vs_flex, e), fmt(r.useful_gflops, ".1f"), fmt(_of_matmul(r, machine or {}), ".0%"),
                     fmt(r.peak_mb, ".0f"), fmt(r.first_call_ms, ".0f"), r.note])
    table = markdown_table(COLUMNS, rows, pad=True)  # padded: this table is read in a terminal
    return f"{header}\n{table}" if header else table


def save(results: list[Result], out_dir: Path, machine: dict) -> None:
    speed, vs_flex = _speedups(results), _speedups(results, "flex_plain")
    rows = [{**r.row(), "vs_sdpa": speed.get(r.experiment), "vs_flex": vs_flex.get(r.experiment),
             "of_matmul": _of_matmul(r, machine)} for r in results]
    write_json(out_dir / "bench.json", {"machine": machine, "results": rows})
    with atomic_path(out_dir / "bench.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["pattern"])
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class BenchConfig:
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_PATTERNS))
    paths: list[str] = field(default_factory=lambda: list(PATHS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 8192, 16384])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    heads: int = 12
    head_dim: int = 64
    batch: int = 1
    device: str = "cpu"
    min_run_time: float = 0.5


QUICK = dict(patterns=["longformer_512", "bigbird_64"], paths=["sdpa", "blocked", "flex_plain", "auto"],
             lengths=[1024, 4096], min_run_time=0.2)


def _compute_dtypes(dtypes: Iterable[str], device: torch.device) -> dict[str, str]:
    """The dtype the blocked path multiplies each benchmarked dtype in (``longattn calibrate`` decides)."""
    return {name: DTYPE_NAMES[compute_dtype(DTYPES[name], device)] for name in dtypes}


def run(cfg: BenchConfig, out_dir: Path | None = None, progress: bool = True) -> list[Result]:
    device = torch.device(cfg.device)
    compute = _compute_dtypes(cfg.dtypes, device)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # only the dtypes being timed: a CPU without bf16 kernels multiplies bf16 at ~1 GFLOP/s (minutes here)
        "matmul_gflops": {name: round(matmul_gflops(DTYPES[name], device), 1)
                          for name in dict.fromkeys([*cfg.dtypes, *compute.values()])},
        "compute": compute,
        "profile": machine_profile.current().source,
    }
    rates = " ".join(f"{name}={rate}" for name, rate in machine["matmul_gflops"].items())
    converted = " ".join(f"{k}->{v}" for k, v in compute.items() if k != v)
    header = (f"device={machine['device']} threads={machine['threads']} torch={machine['torch']} "
              f"matmul GFLOP/s {rates}" + (f"; blocked multiplies {converted}" if converted else "")
              + f"; profile: {machine['profile']}")
    print(header, flush=True)
    todo = experiments(cfg.patterns, cfg.paths, cfg.modes, cfg.lengths, cfg.dtypes, cfg.heads, cfg.head_dim, cfg.batch)
    bar = progress_bar(progress, total=len(todo), desc="bench", unit="run")
    results = []
    sdpa_done: dict[tuple, Result] = {}  # full SDPA does not depend on the pattern: time it once
    for exp in todo:
        bar.set_postfix_str(f"{exp.pattern} {exp.mode} N={exp.seq_len} {exp.path}")
        same = (exp.dtype, exp.mode, exp.seq_len, exp.batch, exp.heads, exp.head_dim)
        if exp.path == "sdpa" and same in sdpa_done:
            results.append(_reuse_for_pattern(sdpa_done[same], exp, device))
        else:
            results.append(run_experiment(exp, device, min_run_time=cfg.min_run_time))
            if exp.path == "sdpa":
                sdpa_done[same] = results[-1]
        bar.update()
        if out_dir is not None:  # partial results survive an interrupted run
            save(results, out_dir, machine)
    bar.close()
    print(format_table(results, machine=machine), flush=True)
    lines = summary(results, machine)
    goals = verdict_table(verdicts(results, machine), machine)
    print("\n".join([*lines, "", goals]), flush=True)
    if out_dir is not None:
        write_text(out_dir / "summary.txt", "\n".join([*lines, "", goals]) + "\n")
    return results


def summary(results: list[Result], machine: dict, path: str = "blocked") -> list[str]:
    """The headline ratios of one run for ``path``: against compiled FlexAttention (forward), bf16 against
    fp32, against SDPA (forward+backward), share of the matmul rate, and peak memory growth."""
    by = {(r.experiment.pattern, r.experiment.path, r.experiment.mode, r.experiment.seq_len,
           r.experiment.dtype): r for r in results if r.time_ms is not None}
    lines = []
    for (pattern, p, mode, n, dtype), r in sorted(by.items()):
        if p != path:
            continue
        flex = by.get((pattern, "flex_plain", mode, n, dtype))
        sdpa = by.get((pattern, "sdpa", mode, n, dtype))
        bits = [f"{pattern} {mode} N={n} {dtype}: {r.time_ms:.0f} ms"]
        if flex is not None:
            bits.append(f"{flex.time_ms / r.time_ms:.2f}x compiled flex")
        if sdpa is not None:
            bits.append(f"{sdpa.time_ms / r.time_ms:.1f}x SDPA")
        if dtype == "bf16" and (fp32 := by.get((pattern, p, mode, n, "fp32"))) is not None:
            bits.append(f"bf16 {fp32.time_ms / r.time_ms:.2f}x fp32")
        share = _of_matmul(r, machine)
        if share is not None:
            bits.append(f"{share:.0%} of matmul rate")
        half = by.get((pattern, p, mode, n // 2, dtype))
        if half is not None and half.peak_mb and r.peak_mb:
            bits.append(f"peak {r.peak_mb / half.peak_mb:.2f}x N={n // 2}")
        lines.append(", ".join(bits))
    return lines


# ---- the goals (DESIGN.md's performance targets) -----------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    goal: str
    target: str
    measured: str  # the figure behind the verdict, with where it was worst
    met: bool | None  # None: this run did not measure it


GOAL_PATTERNS = ("longformer_512", "bigbird_64")


def _worst(items: list[tuple[float, str]], higher_is_better: bool = True) -> tuple[float, str] | None:
    if not items:
        return None
    return min(items) if higher_is_better else max(items)


def verdicts(results: list[Result], machine: dict, path: str = "blocked") -> list[Verdict]:
    """Each performance goal as met / not met on this run, with its worst figure (where the run measured it)."""
    by = {(r.experiment.pattern, r.experiment.path, r.experiment.mode, r.experiment.seq_len, r.experiment.dtype): r
          for r in results if r.time_ms is not None}
    mine = [r for r in results if r.experiment.path == path and r.time_ms is not None]
    out = []

    vs = {"sdpa": _speedups(results), "flex_plain": _speedups(results, "flex_plain")}

    def ratio(r: Result, other_path: str) -> float | None:
        return vs[other_path].get(r.experiment)

    def verdict(goal: str, target: str, items: list[tuple[float, str]], limit: float, fmt: str,
                higher_is_better: bool = True) -> Verdict:
        worst = _worst(items, higher_is_better)
        if worst is None:
            return Verdict(goal, target, "not measured in this run", None)
        value, where = worst
        met = value >= limit if higher_is_better else value <= limit
        return Verdict(goal, target, f"{format(value, fmt)} ({where})", met)

    key = lambda r: f"{r.experiment.pattern} N={r.experiment.seq_len} {r.experiment.dtype}"  # noqa: E731
    flex = [(x, key(r)) for r in mine if r.experiment.mode == "fwd" and r.experiment.dtype == "fp32"
            and r.experiment.pattern in GOAL_PATTERNS and r.experiment.seq_len >= 4096
            and (x := ratio(r, "flex_plain")) is not None]
    out.append(verdict("CPU forward vs compiled FlexAttention", ">= 1.5x at 4K-16K, Longformer-512 and BigBird-64",
                       flex, 1.5, ".2f"))
    sdpa = [(x, key(r)) for r in mine if r.experiment.mode == "fwd+bwd" and r.experiment.seq_len == 8192
            and r.experiment.pattern in GOAL_PATTERNS and (x := ratio(r, "sdpa")) is not None]
    out.append(verdict("CPU forward+backward vs SDPA", ">= 8x at N=8192", sdpa, 8.0, ".1f"))
    share = [(x, key(r)) for r in mine if r.experiment.mode == "fwd+bwd" and r.experiment.seq_len >= 4096
             and r.experiment.pattern in GOAL_PATTERNS and (x := _of_matmul(r, machine)) is not None]
    out.append(verdict("useful throughput, forward+backward", ">= 50% of the compute dtype's matmul rate", share,
                       0.5, ".0%"))
    rates = machine.get("matmul_gflops", {})
    if rates.get("bf16") and rates.get("fp32") and rates["bf16"] > rates["fp32"]:
        faster = [(fp32.time_ms / r.time_ms, f"{key(r)} {r.experiment.mode}") for r in mine
                  if r.experiment.dtype == "bf16"
                  and (fp32 := by.get((r.experiment.pattern, path, r.experiment.mode, r.experiment.seq_len, "fp32")))]
        out.append(verdict("bf16 faster than fp32 (bf16 matmul is faster here)", "bf16 time < fp32 time", faster,
                           1.0 + 1e-9, ".2f"))
    elif rates.get("bf16") and rates.get("fp32"):
        out.append(Verdict("bf16 faster than fp32", "only where bf16 matmul is faster",
                           f"bf16 matmul {rates['bf16']:.0f} <= fp32 {rates['fp32']:.0f} GFLOP/s: not a goal here", None))
    growth = [(r.peak_mb / half.peak_mb, key(r) + " " + r.experiment.mode) for r in mine
              if r.peak_mb and (half := by.get((r.experiment.pattern, path, r.experiment.mode, r.experiment.seq_len // 2,
                                                r.experiment.dtype))) is not None and half.peak_mb
              and r.experiment.seq_len >= 16384]
    out.append(verdict("memory linear in N", "peak(16384) <= 2.2x peak(8192)", growth, 2.2, ".2f",
                       higher_is_better=False))
    short = [(1 / x, key(r)) for r in results if r.experiment.path == "auto" and r.time_ms is not None
             and r.experiment.seq_len <= 512 and (x := ratio(r, "sdpa")) is not None]
    out.append(verdict("short inputs: auto vs SDPA", "<= 1.1x SDPA's time at N <= 512", short, 1.1, ".2f",
                       higher_is_better=False))
    return out


def verdict_table(items: list[Verdict], machine: dict) -> str:
    rates = ", ".join(f"{k} {v:.0f}" for k, v in machine.get("matmul_gflops", {}).items())
    rows = [[v.goal, v.target, v.measured, {True: "met", False: "NOT MET", None: "-"}[v.met]] for v in items]
    head = f"goals on this machine ({machine.get('device')}, {machine.get('threads')} threads, matmul GFLOP/s {rates}):"
    return head + "\n" + markdown_table(["goal", "target", "measured (worst case)", "verdict"], rows, pad=True)
