"""Sparse attention with a pattern and padding, checked against SDPA with the same mask written out.

Run: python examples/basic_attention.py
"""

import torch
import torch.nn.functional as F

import longattn as la

torch.manual_seed(0)
B, H, N, D = 2, 4, 1000, 32
q, k, v = (torch.randn(B, H, N, D) for _ in range(3))  # (B, H, N, D), like SDPA

# Longformer: window=128 keys around each query (64 per side) and a global first token.
pattern = la.longformer(window=128, global_idx=[0])
padding = torch.ones(B, N, dtype=torch.bool)  # True = real token
padding[1, 700:] = False  # the second example is 700 tokens long

out = la.attention(q, k, v, pattern=pattern, key_padding_mask=padding)  # (B, H, N, D)
print("backend:", la.explain(q, k, v, pattern=pattern, key_padding_mask=padding))
print(f"density: {pattern.density(N):.3f} of all pairs")

# The same attention with the mask materialised: pattern AND padding, True = attend.
keep = pattern.dense(N) & padding[:, None, None, :]  # (B, 1, N, N)
reference = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
print(f"max abs difference to masked SDPA: {(out - reference).abs().max():.2e}")
assert torch.allclose(out, reference, atol=1e-5)

# Fewer queries than keys (a KV cache): the queries are the last 4 positions.
last = la.attention(q[:, :, -4:], k, v, pattern=la.causal(la.sliding_window(16, 0)))
print("last 4 queries over the cache:", tuple(last.shape))
