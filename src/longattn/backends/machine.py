"""The machine profile: what ``auto`` and the blocked kernel know about the CPU they run on.

Machines differ (the project's own: an Intel-like CPU with fp32 matmul at ~320 GFLOP/s and bf16 at half of
that; an AMD Zen 4 with fp32 ~190 and bf16 ~410), so no constant measured on one of them is right on the
other. ``longattn calibrate`` (``tools/calibrate.py``) measures a profile once per machine and torch
version and stores it as JSON under the user's cache directory; this module reads it.

Without a stored calibration the profile is ``DEFAULTS``: the dispatch constants measured on the
project's first machine, and float32 compute for bf16/fp16 inputs. A matmul rate alone does not say
whether the blocked path gains from bf16 compute (on the AMD Zen 4 machine bf16 matmuls run 2.2x faster
than fp32, yet the blocked forward in bf16 ran 1.2x slower: strided bf16 operands are copied, and the
row offsets cost a product), so only the calibration, which times the kernel both ways, switches it on.
``explain()`` says which profile set the thresholds.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import platform
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

#: dtype names as the profile and ``longattn bench`` write them
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
LOW_PRECISION = (torch.bfloat16, torch.float16)
#: a tile's fixed cost (Python, ~40 op launches) in scores of work, all heads together (2 Intel-like cores)
DEFAULT_TILE_OVERHEAD_SCORES = 150_000


@dataclass(frozen=True)
class DispatchLimits:
    """The ``auto`` rule's two thresholds for one input dtype (``dispatch.py`` says how they are used)."""

    crossover: int  # keys; up to this many dense SDPA is faster
    dense_fraction: float  # the blocked path's cost share of all Nq x Nk scores above which SDPA is faster


@dataclass(frozen=True)
class MachineProfile:
    """What was measured on this machine (or assumed, when ``source`` is ``"defaults"``)."""

    source: str  # "calibration <path>" or "defaults"
    matmul_gflops: dict[str, float] = field(default_factory=dict)  # dtype name -> dense matmul rate
    limits: dict[str, DispatchLimits] = field(default_factory=dict)  # input dtype name -> auto's thresholds
    compute: dict[str, str] = field(default_factory=dict)  # low-precision input dtype -> blocked matmul dtype
    tile_overhead_scores: int = DEFAULT_TILE_OVERHEAD_SCORES  # the schedule's fixed cost per tile, in scores
    fused_tiles: bool = False  # the blocked path runs its tiles in the C++ step (blocked/native), built and faster
    measured: dict[str, float] = field(default_factory=dict)  # the raw timings behind the choices (ns/score)
    machine: dict[str, str] = field(default_factory=dict)  # CPU, threads, torch version

    def limits_for(self, dtype: torch.dtype) -> DispatchLimits:
        name = DTYPE_NAMES.get(dtype, "fp32")
        if name in self.limits:
            return self.limits[name]
        return DEFAULT_LIMITS[name if name in DEFAULT_LIMITS else "fp32"]

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the blocked path's CPU matmuls run in for inputs of ``dtype``."""
        if dtype not in LOW_PRECISION:
            return dtype
        name = self.compute.get(DTYPE_NAMES[dtype], "fp32")
        return dtype if name == DTYPE_NAMES[dtype] else torch.float32

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict, source: str) -> "MachineProfile":
        limits = {name: DispatchLimits(**value) for name, value in data.get("limits", {}).items()}
        return MachineProfile(source=source, matmul_gflops=dict(data.get("matmul_gflops", {})), limits=limits,
                              compute=dict(data.get("compute", {})),
                              tile_overhead_scores=int(data.get("tile_overhead_scores", DEFAULT_TILE_OVERHEAD_SCORES)),
                              fused_tiles=bool(data.get("fused_tiles", False)),
                              measured=dict(data.get("measured", {})), machine=dict(data.get("machine", {})))


# Measured on the project's first machine (Intel-like, fp32 ~320 GFLOP/s, bf16 ~160; `longattn bench
# --lengths 256 512 1024 2048`): Longformer-512 at 1024 keys costs 0.55 of all scores and is 1.5x faster
# blocked; BigBird-64 costs 1.1 at 1024 (0.75x SDPA) and 0.59 at 2048 (faster). In bf16 SDPA runs at the
# slow bf16 rate while the blocked path computes in fp32, so blocked wins from 256 keys and at costs up to 2.5.
DEFAULT_LIMITS = {
    "fp32": DispatchLimits(crossover=512, dense_fraction=0.8),
    "fp64": DispatchLimits(crossover=512, dense_fraction=0.8),
    "bf16": DispatchLimits(crossover=256, dense_fraction=2.5),
    "fp16": DispatchLimits(crossover=256, dense_fraction=2.5),
}
DEFAULTS = MachineProfile(source="defaults", limits=dict(DEFAULT_LIMITS))


# ---- where a calibration lives ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)  # read once: `auto` asks for the profile on every call
def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields of ``/proc/cpuinfo`` (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, sep, value = line.partition(":")
            if not sep:
                if fields:
                    break  # the first processor's block has ended
                continue
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), or the platform's description."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU features a matmul's speed depends on (AVX-512, its bf16 and fp16 forms, AMX)."""
    flags = set(_cpuinfo().get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_fp16")
    return " ".join(f for f in wanted if f in flags)


#: bumped when calibration measures something new: an older file is then measured again, not half-read
CALIBRATION_VERSION = "2"  # 2: the fused tile step


def machine_key() -> dict[str, str]:
    """What a calibration is valid for: the CPU, its features, the threads used, the torch version and what
    the calibration measures."""
    return {"cpu": cpu_name(), "flags": cpu_flags(), "threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "calibration": CALIBRATION_VERSION}


def cache_dir() -> Path:
    """``$LONGATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/longattn``, else ``~/.cache/longattn``."""
    if os.environ.get("LONGATTN_CACHE_DIR"):
        return Path(os.environ["LONGATTN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "longattn"


def calibration_path(key: dict[str, str] | None = None) -> Path:
    """One file per machine key: another CPU, thread count or torch version is another calibration."""
    key = key or machine_key()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"calibration-{digest}.json"


# ---- the profile in use -------------------------------------------------------------------------------------

_override: contextvars.ContextVar[MachineProfile | None] = contextvars.ContextVar("longattn_profile", default=None)
_loaded: dict[tuple, MachineProfile] = {}
_lock = threading.Lock()


def load_calibration(path: Path | None = None) -> MachineProfile | None:
    """The stored calibration for this machine, or None (missing, unreadable or for another machine)."""
    path = path or calibration_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("machine") != machine_key():
        return None
    try:
        return MachineProfile.from_json(data, f"calibration {path}")
    except (TypeError, ValueError):
        return None


def current() -> MachineProfile:
    """The profile in force: an override (``use``), else this machine's calibration, else ``DEFAULTS``."""
    profile = _override.get()
    if profile is not None:
        return profile
    # What can change in a process: the cache folder's variables and the thread count (cheap to read; the
    # file's name is a hash of the machine key, computed only when one of them changes)
    key = (os.environ.get("LONGATTN_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"), torch.get_num_threads())
    profile = _loaded.get(key)
    if profile is None:
        with _lock:
            profile = _loaded[key] = load_calibration() or DEFAULTS
    return profile


def forget() -> None:
    """Drop the profile read in this process (after ``longattn calibrate`` wrote a new one)."""
    with _lock:
        _loaded.clear()


@contextlib.contextmanager
def use(profile: MachineProfile) -> Iterator[MachineProfile]:
    """Run with ``profile`` in force (tests force a compute dtype; calibration times each candidate)."""
    token = _override.set(profile)
    try:
        yield profile
    finally:
        _override.reset(token)


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The blocked path's matmul dtype for inputs of ``dtype``: low precision stays low on accelerators (fast
    there everywhere) and on CPUs whose profile says it is faster; float32 otherwise."""
    if dtype not in LOW_PRECISION:
        return dtype
    if device.type != "cpu":
        return dtype
    return current().compute_dtype(dtype)
