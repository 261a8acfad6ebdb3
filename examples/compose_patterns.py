"""Compose patterns, look at them, and ask which backend would run them.

Run: python examples/compose_patterns.py
"""

import torch

import longattn as la

local = la.sliding_window(32)  # 32 keys on each side
summary = la.global_tokens([0, 1])  # two tokens that see and are seen by everything
patterns = {
    "local | global": local | summary,
    "causal local": la.causal(local),
    "bigbird": la.bigbird(block=32, window_blocks=3, global_blocks=2, random_blocks=2, seed=0),
    "per head": la.per_head([la.sliding_window(16), la.sliding_window(64)]),  # head h: entry h % 2
    "parsed": la.parse_pattern("causal(sliding_window(64)) | global_tokens([0])"),
}

n, heads = 2048, 4
q = k = v = torch.randn(1, heads, n, 64)
for label, pattern in patterns.items():
    density = pattern.density(n, num_heads=heads)
    print(f"{label:15s} {pattern.name:50s} density {density:.3f}  ->  {la.explain(q, k, v, pattern=pattern)}")

# A small picture of the same kind of pattern: rows are queries, columns keys.
for row in (la.sliding_window(2) | la.global_tokens([0])).dense(12)[0].int().tolist():
    print("".join("#" if x else "." for x in row))
