"""topk_blocks (MoBA's content-chosen blocks): the choice and the attention against a float64 reference written
from the definition, alone and composed, on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import longattn as la
from longattn.backends.inputs import prepare
from longattn.backends.blocked.selected import selected_attention
from longattn.patterns import causal, documents, global_tokens, per_head, sliding_window
from longattn.patterns.topk_blocks import resolve, topk_blocks

from conftest import assert_close_to_reference, max_err, qkv, reference


def reference_choice(q, k, top, block, *, is_causal=False, key_padding_mask=None):
    """The definition, one query at a time in float64: (B, H, Nq, Nk) bool of the keys each query attends."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    real = torch.ones(b, nk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    nkb = math.ceil(nk / block)
    keep = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for e in range(b):
        for head in range(h):
            means = []
            for blk in range(nkb):
                cols = [j for j in range(blk * block, min(nk, (blk + 1) * block)) if real[e, j]]
                means.append(k[e, head, cols].double().mean(0) if cols else None)
            for r in range(nq):
                i = r + nk - nq
                own = i // block if 0 <= i < nk else None
                scored = [(float(q[e, head, r].detach().double() @ means[blk].detach()), blk) for blk in range(nkb)
                          if blk != own and means[blk] is not None and (not is_causal or blk * block <= i)]
                scored.sort(key=lambda t: (-t[0], t[1]))  # highest first, ties to the lower block
                chosen = ([] if own is None else [own]) + [blk for _, blk in scored[:top - 1]]
                for blk in chosen:
                    for j in range(blk * block, min(nk, (blk + 1) * block)):
                        keep[e, head, r, j] = not is_causal or j <= i
    return keep


def chosen_keep(pattern_keep, kpm):
    return pattern_keep if kpm is None else pattern_keep & kpm[:, None, None, :]


CASES = [  # (B, H, Nq, Nk, D, top, block, causal, padded)
    (2, 2, 97, 97, 40, 3, 16, False, False),
    (2, 2, 97, 97, 40, 3, 16, True, True),
    (1, 2, 37, 97, 40, 2, 16, False, True),  # Nq < Nk: bottom-right
    (1, 2, 37, 97, 40, 4, 16, True, False),
    (1, 1, 1025, 1025, 40, 3, 64, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}x{c[3]}-k{c[5]}-s{c[6]}-{'c' if c[7] else 'b'}"
                         f"{'-pad' if c[8] else ''}")
@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_topk_blocks_equals_definition(case, backend):
    b, h, nq, nk, d, top, block, is_causal, padded = case
    q, k, v = qkv(b, h, nq, nk, d, torch.float64, seed=nq + top)
    kpm = None
    if padded:
        kpm = torch.ones(b, nk, dtype=torch.bool)
        kpm[0, nk - 21:] = False  # a block and a half of padding: one block holds no real key
    keep = chosen_keep(reference_choice(q, k, top, block, is_causal=is_causal, key_padding_mask=kpm), kpm)
    pattern = topk_blocks(top, block, causal=is_causal)
    assert_close_to_reference(backend, q, k, v, keep, pattern=pattern, key_padding_mask=kpm)


def test_choice_breaks_ties_by_the_lower_block_and_skips_padding():
    b, h, n, d, block = 1, 1, 64, 8, 8
    q, k, v = qkv(b, h, n, n, d, torch.float64)
    q[0, 0, 5] = 0  # every block scores 0 for this query: ties everywhere
    k[0, 0, 32:48] = k[0, 0, 16:32]  # blocks 4, 5 repeat blocks 2, 3: equal scores for every query
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[0, 8:16] = False  # block 1 has no real key: never chosen
    blocks = topk_blocks(3, block).select(q, k, kpm)
    assert blocks[0, 0, 5].tolist() == [0, 2, 3]  # own block 0, then the lowest eligible (1 is padding)
    ref = reference_choice(q, k, 3, block, key_padding_mask=kpm)
    for r in range(n):
        got = torch.zeros(n, dtype=torch.bool)
        for blk in blocks[0, 0, r].tolist():
            if blk >= 0:
                got[blk * block:(blk + 1) * block] = True
        assert torch.equal(got, ref[0, 0, r]), r
        assert 1 not in blocks[0, 0, r].tolist() or r // block == 1  # only as its own rows' own block


N_COMPOSED = 97
COMPOSITIONS = {  # pattern, and how its reference combines the chosen keys (B, H, N, N) with the static parts
    "or-window": (lambda: topk_blocks(2, 16) | sliding_window(20),
                  lambda c: c | sliding_window(20).dense(N_COMPOSED)),
    "and-window": (lambda: topk_blocks(3, 16) & sliding_window(40),
                   lambda c: c & sliding_window(40).dense(N_COMPOSED)),
    "causal-or-global": (lambda: causal(topk_blocks(2, 16) | global_tokens([0, 5])),
                         lambda c: (c | global_tokens([0, 5]).dense(N_COMPOSED)) & causal().dense(N_COMPOSED)),
    "per-head": (lambda: per_head([topk_blocks(2, 16, causal=True), causal(sliding_window(24, 0))]),
                 lambda c: torch.stack([c[:, 0], causal(sliding_window(24, 0)).dense(N_COMPOSED)[0].expand_as(
                     c[:, 1])], dim=1)),
    "documents": (lambda: documents([40, 57]) & topk_blocks(3, 16),
                  lambda c: c & documents([40, 57]).dense(N_COMPOSED)),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_compositions_equal_the_definition(name, backend):
    """A composition is the definition's choice combined with the other parts by the same operators."""
    make, combine = COMPOSITIONS[name]
    pattern = make()
    b, h, n, d = 2, 2, N_COMPOSED, 40
    q, k, v = qkv(b, h, n, n, d, torch.float64, seed=3)
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[1, 80:] = False
    node = resolve(pattern, q, k, kpm).node
    chosen = reference_choice(q, k, node.k, node.block, is_causal=node.causal, key_padding_mask=kpm)
    keep = combine(chosen) & kpm[:, None, None, :]
    assert_close_to_reference(backend, q, k, v, keep, pattern=pattern, key_padding_mask=kpm)


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 97, 97, 40, torch.float64))
    kpm = torch.ones(2, 97, dtype=torch.bool)
    kpm[1] = False  # example 1 has no real key at all
    for backend in ("dense", "blocked"):
        out = la.attention(q, k, v, pattern=topk_blocks(2, 16, causal=True), key_padding_mask=kpm, backend=backend)
        assert out[1].abs().max() == 0 and not out.isnan().any()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(g[1].abs().max() == 0 and not g.isnan().any() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    b, h, n, d = 1, 2, 257, 40
    q, k, v = qkv(b, h, n, n, d, dtype, seed=11)
    pattern = topk_blocks(3, 32, causal=True)
    keep = reference_choice(q, k, 3, 32, is_causal=True)
    assert torch.equal(resolve(pattern, q, k).pattern.dense(n, num_heads=h), keep[0])
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern)


def test_attn_mask_and_dropout_on_the_pair_kernel():
    b, h, n, d = 1, 2, 97, 16
    q, k, v = qkv(b, h, n, n, d, torch.float64, seed=5)
    pattern = topk_blocks(2, 16)
    keep = reference_choice(q, k, 2, 16)
    bias = torch.randn(1, h, n, n, dtype=torch.float64).masked_fill(torch.rand(1, h, n, n) < 0.1, float("-inf"))
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, bias=bias)
    allowed = torch.rand(n, n) < 0.8
    assert_close_to_reference("blocked", q, k, v, keep & allowed, pattern=pattern, attn_mask=allowed)

    def dropped(q, k, v):  # the same dropout masks in every call: the seed is drawn from torch's generator
        torch.manual_seed(0)
        return la.attention(q, k, v, pattern=pattern, dropout_p=0.3, backend="blocked")

    leaves = [t[:, :1, :33, :8].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(dropped, leaves, eps=1e-6, atol=1e-7)
    assert not torch.equal(dropped(*leaves), la.attention(*leaves, pattern=pattern, backend="blocked"))


def test_log_sum_exp_and_its_gradient():
    """The pair kernel's lse (what merging partial results uses) and the gradient flowing through it."""
    b, h, n, d = 1, 2, 70, 16
    leaves = [t.requires_grad_() for t in qkv(b, h, n, n, d, torch.float64, seed=9)]
    pattern = topk_blocks(2, 16, causal=True)
    keep = reference_choice(*leaves[:2], 2, 16, is_causal=True)
    inp = prepare(*leaves, pattern=pattern)
    out, lse = selected_attention(inp, resolve(pattern, leaves[0], leaves[1]), return_lse=True)
    scores = (leaves[0] @ leaves[1].transpose(-1, -2)) * d ** -0.5
    ref_lse = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), -1)
    assert max_err(lse, ref_lse) < 1e-12 and max_err(out, reference(*leaves, keep)) < 1e-12
    g = torch.autograd.grad((out.sum() + lse.sum()), leaves)
    g_ref = torch.autograd.grad(reference(*leaves, keep).sum() + ref_lse.sum(), leaves)
    assert max(max_err(a, r) for a, r in zip(g, g_ref)) < 1e-10


@pytest.mark.skipif(not la.backends.flex.available(), reason="no FlexAttention")
def test_flex_forward_with_a_per_call_block_mask():
    b, h, n, d = 1, 2, 256, 32
    q, k, v = qkv(b, h, n, n, d, torch.float32, seed=2)
    pattern = topk_blocks(3, 64, causal=True) | global_tokens([0])
    with torch.no_grad():
        out = la.attention(q, k, v, pattern=pattern, backend="flex")
        ref = la.attention(q, k, v, pattern=pattern, backend="dense")
    assert max_err(out, ref) < 1e-5


def test_choice_is_visible_and_errors_are_clear():
    q, k, v = qkv(1, 2, 4096, 4096, 16)
    assert la.explain(q, k, v, pattern=topk_blocks(4, 64)).backend == "blocked"
    assert "content-chosen" in str(la.explain(q, k, v, pattern=topk_blocks(4, 64)))
    assert la.explain(*qkv(1, 2, 128, 128, 16), pattern=topk_blocks(4, 64)).backend == "dense"
    with pytest.raises(ValueError, match="chooses its keys from q and k"):
        topk_blocks(4, 64).dense(128)
    with pytest.raises(ValueError, match="one content-dependent part"):
        la.attention(q, k, v, pattern=topk_blocks(4, 64) | topk_blocks(2, 32))
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_blocks(0, 64)
    with pytest.raises(TypeError, match="block must be an int"):
        topk_blocks(2, 6.5)
