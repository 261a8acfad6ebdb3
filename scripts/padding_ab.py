"""What the padding rule costs on the blocked path (docs/semantics.md, "NaN, inf and padding").

Three variants of one call, taking turns in one process so that a shared machine's drift hits all alike:
``unchecked`` (the key padding mask applied without looking at the padded keys, as before the rule),
``finite padding`` (the rule's check: only the padded rows are read) and ``NaN padding`` (the rule zeroes the
padded keys and values, a copy of k and v). Prints the machine's matmul rates and each variant's median.

    .venv/bin/python scripts/padding_ab.py --lengths 4096 8192 --rounds 11
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

import longattn
import longattn.functional as functional
from longattn.argtypes import fraction, positive_int
from longattn.backends.inputs import prepare


def unchecked_prepare(q, k, v, *, key_padding_mask=None, **kwargs):
    """``prepare`` as before the rule: the mask is attached, the padded keys are not looked at."""
    inp = prepare(q, k, v, **kwargs)
    return inp if key_padding_mask is None else dataclasses.replace(inp, key_padding_mask=key_padding_mask)


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[4096, 8192])
    parser.add_argument("--heads", type=positive_int, default=12)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--padded", type=fraction, default=0.1, help="share of the keys that are padding")
    parser.add_argument("--rounds", type=positive_int, default=11)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; matmul fp32 {matmul_rate(torch.float32):.0f}, bf16 "
          f"{matmul_rate(torch.bfloat16):.0f} GFLOP/s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    pattern = longattn.patterns.longformer(window=512, global_idx=[0])
    for n in args.lengths:
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim) for _ in range(3))
        kpm = torch.ones(1, n, dtype=torch.bool)
        kpm[:, n - int(args.padded * n):] = False
        k_nan, v_nan = k.clone(), v.clone()
        k_nan[:, :, ~kpm[0]], v_nan[:, :, ~kpm[0]] = float("nan"), float("nan")
        variants = {"unchecked": (unchecked_prepare, k, v), "finite padding": (prepare, k, v),
                    "NaN padding": (prepare, k_nan, v_nan)}
        for mode in ("fwd", "fwd+bwd"):
            def call(keys, values):
                if mode == "fwd":
                    with torch.no_grad():
                        longattn.attention(q, keys, values, pattern=pattern, key_padding_mask=kpm, backend="blocked")
                    return
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, keys, values))
                out = longattn.attention(qq, kk, vv, pattern=pattern, key_padding_mask=kpm, backend="blocked")
                out.sum().backward()

            times = {name: [] for name in variants}
            order = list(variants)
            for r in range(args.rounds + 1):  # round 0 warms up
                for name in order if r % 2 else order[::-1]:
                    functional.prepare, keys, values = variants[name]
                    start = time.perf_counter()
                    call(keys, values)
                    if r:
                        times[name].append(time.perf_counter() - start)
            functional.prepare = prepare
            base = statistics.median(times["unchecked"])
            cells = ", ".join(f"{name} {1e3 * statistics.median(t):.1f} ms ({statistics.median(t) / base - 1:+.1%})"
                              for name, t in times.items())
            print(f"N={n} {mode}: {cells}")


if __name__ == "__main__":
    main()
