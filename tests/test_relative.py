"""Transformer-XL relative attention against an explicit O(N^2) reference: relative shift, both position-term
methods, every causal pattern, memory, clamp_len, padding, empty rows and gradients."""

from __future__ import annotations

import math

import pytest
import torch

import longattn as la
from longattn.modules.relative import RelativeAttention, RelativePositions, rel_shift, sinusoid

PATTERNS = {
    "full": None,
    "window": la.sliding_window(20, 0),
    "strided": la.strided(16),
    "fixed": la.fixed(16, 4),
    "bigbird": la.bigbird(block=16, seed=0),
}


def naive(mod: RelativeAttention, x, memory=None, key_padding_mask=None):
    """The paper's score written out pair by pair (float64): no shift, no factorisation."""
    x = x.double()
    ctx = x if memory is None else torch.cat([memory.double(), x], 1)
    b, nq, _ = x.shape
    nk, h, d = ctx.shape[1], mod.heads, mod.head_dim
    wq, wk, wv = mod.qkv.weight.double().split(h * d)
    q = (x @ wq.T).view(b, nq, h, d).transpose(1, 2)
    k = (ctx @ wk.T).view(b, nk, h, d).transpose(1, 2)
    v = (ctx @ wv.T).view(b, nk, h, d).transpose(1, 2)
    dist = (torch.arange(nq)[:, None] + nk - nq - torch.arange(nk)[None]).clamp(min=0)  # i - j
    if mod.clamp_len is not None:
        dist = dist.clamp(max=mod.clamp_len)
    r = (sinusoid(dist.flatten(), mod.pos_dim) @ mod.r_net.weight.double().T).view(nq, nk, h, d)  # W_r R_{i-j}
    scores = (torch.einsum("bhid,bhjd->bhij", q + mod.u.double()[:, None], k)
              + torch.einsum("bhid,ijhd->bhij", q + mod.v.double()[:, None], r)) / math.sqrt(d)
    keep = mod.pattern.dense(nq, nk, num_heads=h)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    probs = scores.masked_fill(~keep, -math.inf).softmax(-1).nan_to_num(0.0)
    return ((probs @ v).transpose(1, 2).reshape(b, nq, h * d)) @ mod.proj.weight.double().T


def _module(pattern, *, method="auto", clamp_len=None, backend="auto", pos_dim=None, dtype=torch.float32):
    torch.manual_seed(0)
    mod = RelativeAttention(80, 2, head_dim=40, pattern=pattern, method=method, clamp_len=clamp_len,
                            backend=backend, pos_dim=pos_dim, dtype=dtype)
    with torch.no_grad():  # larger than the init so that the position term matters in the comparison
        for p in mod.parameters():
            p.normal_(0, 0.2)
    return mod


def test_rel_shift_is_a_view_that_matches_the_gather():
    for nq, nk in [(1, 1), (5, 5), (3, 8), (97, 157)]:
        table = torch.randn(2, 3, nq, nk)
        out = rel_shift(table)
        assert out.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()  # no copy
        r = torch.arange(nq)[:, None]
        j = torch.arange(nk)[None]
        col = j + nq - 1 - r  # distance nk-1-col == (r + nk - nq) - j
        valid = col < nk  # keys up to the query: the entries a causal mask keeps
        expected = table.gather(-1, col.clamp(max=nk - 1).expand(2, 3, nq, nk))
        assert torch.equal(out.masked_select(valid), expected.masked_select(valid))
    with pytest.raises(ValueError, match="Nq <= Nk"):
        rel_shift(torch.randn(4, 3))


def test_factorised_features_reproduce_the_relative_encoding_at_large_positions():
    """cos/sin of absolute positions, taken in float64, rebuild R_{i-j} at positions in the thousands."""
    pos = RelativePositions.build(7, 6000, 64, dtype=torch.float32)
    a, c = torch.randn(2, 7, 32).double().unbind(0)  # weights of sin and cos
    i = torch.arange(6000 - 7, 6000)
    j = torch.tensor([0, 1, 2500, 5990, 5999])
    cos_i, sin_i = pos.query_cos.double(), pos.query_sin.double()
    q_rot = torch.cat([a * sin_i + c * cos_i, c * sin_i - a * cos_i], -1)  # as RelativeAttention builds it
    got = q_rot @ pos.key_features[j].double().T
    enc = sinusoid((i[:, None] - j[None]).flatten(), 64).view(7, len(j), 64)
    want = torch.einsum("ip,ijp->ij", torch.cat([a, c], -1), enc)
    assert torch.allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("method,backend", [("factorised", "dense"), ("factorised", "blocked"), ("shift", "auto")])
def test_every_causal_pattern_matches_the_reference(name, method, backend):
    mod = _module(PATTERNS[name], method=method, backend=backend)
    x, memory = torch.randn(2, 97, 80), torch.randn(2, 60, 80)  # Nq = 97, Nk = 157, head dim 40
    with torch.no_grad():
        ref, out = naive(mod, x, memory), mod(x, memory)
    assert float((out.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("method", ["factorised", "shift"])
def test_gradients_match_the_reference_in_float64(method):
    mod = _module(PATTERNS["strided"], method=method, dtype=torch.float64)
    x = torch.randn(1, 40, 80, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(1, 25, 80, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(mod(x, memory).square().sum(), [x, memory, *mod.parameters()])
    grads_ref = torch.autograd.grad(naive(mod, x, memory).square().sum(), [x, memory, *mod.parameters()])
    for g, want in zip(grads, grads_ref):
        assert torch.allclose(g, want, rtol=1e-8, atol=1e-9)


def test_clamp_len_uses_the_shift_method():
    mod = _module(None, clamp_len=30)
    x, memory = torch.randn(2, 50, 80), torch.randn(2, 40, 80)
    assert (mod(x, memory).double() - naive(mod, x, memory)).abs().max() < 1e-4
    short = mod(x[:, :20])  # 20 keys: the clamp changes nothing, so the factorised method serves
    assert torch.allclose(short.double(), naive(mod, x[:, :20]), atol=1e-4)
    with pytest.raises(ValueError, match="clamp_len=30 is shorter than the context"):
        _module(None, clamp_len=30, method="factorised")(x, memory)


def test_long_input_on_the_blocked_path_agrees_with_the_shift_method():
    """N = 1025 with a window: the factorised term on the blocked kernel against the explicit shifted table."""
    fact = _module(la.sliding_window(100, 0), method="factorised", backend="blocked")
    shift = _module(la.sliding_window(100, 0), method="shift")
    x = torch.randn(1, 1025, 80)
    assert la.explain(torch.randn(1, 2, 1025, 8), torch.randn(1, 2, 1025, 8), torch.randn(1, 2, 1025, 8),
                      pattern=fact.pattern, backend="blocked").backend == "blocked"
    with torch.no_grad():
        a, b = fact(x), shift(x)
    assert float((a - b).abs().max()) < 1e-5 * float(b.abs().max())


@pytest.mark.parametrize("method", ["factorised", "shift"])
def test_padding_and_fully_masked_rows_give_zeros_and_zero_gradient(method):
    mod = _module(PATTERNS["window"], method=method)
    x = torch.randn(2, 30, 80, requires_grad=True)
    memory = torch.randn(2, 30, 80)
    keys = torch.ones(2, 60, dtype=torch.bool)
    keys[1, :] = False
    keys[1, 55:] = True  # example 1: only its last 5 keys are real, so its first 25 queries attend nothing
    out = mod(x, memory, key_padding_mask=keys)
    ref = naive(mod, x, memory, key_padding_mask=keys)
    assert torch.isfinite(out).all() and torch.allclose(out.double(), ref, atol=1e-4)
    assert torch.equal(out[1, :25], torch.zeros_like(out[1, :25]))  # proj has no bias: zero rows stay zero
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1, :25], torch.zeros_like(x.grad[1, :25]))


def test_no_memory_and_empty_memory_are_the_same():
    mod = _module(None)
    x = torch.randn(2, 33, 80)
    assert torch.equal(mod(x), mod(x, torch.zeros(2, 0, 80)))


def test_bad_arguments_name_themselves():
    mod = _module(None)
    with pytest.raises(ValueError, match=r"x must have shape \(B, Nq, C=80\)"):
        mod(torch.randn(2, 5, 81))
    with pytest.raises(ValueError, match=r"memory must have shape \(B=2, M, C=80\)"):
        mod(torch.randn(2, 5, 80), torch.randn(3, 4, 80))
    with pytest.raises(ValueError, match="method must be one of"):
        RelativeAttention(80, 2, method="skew")
    with pytest.raises(ValueError, match="pos_dim must be a positive even number"):
        RelativeAttention(80, 2, pos_dim=7)
    with pytest.raises(TypeError, match="pattern must be a longattn Pattern"):
        RelativeAttention(80, 2, pattern="window")
    with pytest.raises(ValueError, match=r"positions are for \(Nq, Nk\)"):
        mod(torch.randn(2, 5, 80), positions=mod.positions(4, 4))
