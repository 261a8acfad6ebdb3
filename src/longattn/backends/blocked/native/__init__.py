"""The fused tile step (``tiles.cpp``): an optional C++ extension, built once per machine, that runs a call's
tiles in one parallel region (scores, softmax and both products per (example, head, tile), in a thread's own
buffers, threads taking items from a shared counter).

It is never required: ``kernel.py`` is the reference and the fallback, and it is what runs when the
extension is not built, cannot be built (no compiler, no MKL in this torch), or the call needs what the
extension leaves out (dropout, a float mask that wants a gradient, devices other than the CPU).

``build()`` compiles it (``longattn calibrate`` does, ~1 min; it needs a C++ compiler and ninja) into the
cache folder, under a name that hashes the source, the flags, the CPU and the torch version, so that a
cache shared by several machines never loads another CPU's build; ``load()`` only imports a finished build.
``LONGATTN_NATIVE=0`` switches it off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from ... import machine

SOURCE = Path(__file__).with_name("tiles.cpp")
# -march=native: the build is this CPU's (the name hashes its features); no -ffast-math, the scores hold -inf
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_module: ModuleType | None = None
_reason = "not built (longattn calibrate builds it)"


@functools.lru_cache(maxsize=1)  # read and hashed once: load() is asked on every eligible attention call
def _name() -> str:
    key = {"source": SOURCE.read_text(), "flags": CFLAGS, "cpu": machine.cpu_name(), "cpu_flags": machine.cpu_flags(),
           "torch": torch.__version__}
    return "longattn_tiles_" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def build_dir() -> Path:
    return machine.cache_dir() / "native" / _name()


def _built_file() -> Path | None:
    found = sorted(build_dir().glob(f"{_name()}*.so"))
    return found[0] if found else None


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_name(), str(path))
    spec = importlib.util.spec_from_file_location(_name(), str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.probe_brgemm()
    return module


def disabled() -> bool:
    return os.environ.get("LONGATTN_NATIVE", "1") == "0"


def load() -> ModuleType | None:
    """The built extension, or None (not built, switched off, or failed to load: ``reason()`` says)."""
    global _module, _reason
    if disabled():
        _reason = "switched off (LONGATTN_NATIVE=0)"
        return None
    if _module is not None:
        return _module
    path = _built_file()
    if path is None:
        return None
    with _lock:
        if _module is None:
            try:
                _module = _import(path)
            except (ImportError, OSError) as err:
                _reason = f"{path} failed to load: {err}"
                return None
    return _module


def build(verbose: bool = False) -> ModuleType | None:
    """Compile the extension for this machine unless a build exists; None when that fails (``reason()``)."""
    global _module, _reason
    if load() is not None or disabled():
        return _module
    from torch.utils import cpp_extension

    # ninja from pip lives beside this interpreter, which is on PATH only in an activated environment
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and shutil.which("ninja", path=bindir) is not None:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _lock:
        try:
            _module = cpp_extension.load(name=_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS,
                                         extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=verbose)
            _module.probe_brgemm()
        except (RuntimeError, OSError, ImportError, SystemExit) as err:  # no compiler, no ninja, no MKL symbols
            _reason = f"build failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"
            return None
    return _module


def products() -> str:
    """Which BLAS the built step multiplies with."""
    module = load()
    if module is None:
        return "not loaded"
    return "oneDNN brgemm" if module.probe_brgemm() else "MKL sgemm"


def reason() -> str:
    """Why ``load()`` gives None."""
    return _reason


def forget() -> None:
    """Drop the loaded module (tests)."""
    global _module
    _module = None
