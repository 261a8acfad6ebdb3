"""Bad input raises ValueError/TypeError naming the argument and the expected shape."""

from __future__ import annotations

import pytest
import torch

import longattn as la
from conftest import qkv


@pytest.fixture
def inputs():
    return qkv(2, 3, 10, 10, 8)


def test_wrong_rank(inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, N, D\)"):
        la.attention(q[0], k, v)


def test_not_a_tensor(inputs):
    q, k, v = inputs
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        la.attention(q, k.tolist(), v)


@pytest.mark.parametrize("which,shape,match", [
    ("k", (3, 3, 10, 8), r"k must have shape \(B, H, Nk, D\) = \(2, 3, Nk, 8\)"),
    ("k", (2, 4, 10, 8), r"k must have shape \(B, H, Nk, D\)"),
    ("k", (2, 3, 10, 7), r"k must have shape \(B, H, Nk, D\)"),
    ("v", (2, 3, 11, 8), r"v must have shape \(B, H, Nk, Dv\) = \(2, 3, 10, Dv\)"),
])
def test_mismatched_shapes(inputs, which, shape, match):
    q, k, v = inputs
    args = {"k": k, "v": v}
    args[which] = torch.randn(*shape)
    with pytest.raises(ValueError, match=match):
        la.attention(q, args["k"], args["v"])


def test_mismatched_dtype(inputs):
    q, k, v = inputs
    with pytest.raises(TypeError, match="share a dtype"):
        la.attention(q, k.double(), v)


@pytest.mark.parametrize("make,match", [
    (lambda: la.sliding_window(-1), "left must be >= 0"),
    (lambda: la.sliding_window(2, -3), "right must be >= 0"),
    (lambda: la.dilated(4, 0), "dilation must be >= 1"),
    (lambda: la.sliding_window(2.5), "left must be an int"),
    (lambda: la.bigbird(0), "block must be >= 1"),
    (lambda: la.fixed(4, 5), r"c must be <= block \(4\)"),
    (lambda: la.sparse_transformer("other"), "kind must be 'strided' or 'fixed'"),
    (lambda: la.global_tokens(["a"]), "idx must be a sequence of ints"),
    (lambda: la.sliding_window(2) | 3, "other must be a longattn Pattern"),
])
def test_bad_pattern_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_global_index_out_of_range(inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match=r"index 10 out of range .*expected 0 <= idx < 10"):
        la.attention(q, k, v, pattern=la.global_tokens([0, 10]))
    with pytest.raises(ValueError, match=r"global_tokens: mask must have shape \(B, Nk\) = \(2, 10\)"):
        la.attention(q, k, v, pattern=la.global_tokens(torch.zeros(2, 9, dtype=torch.bool)))


def test_per_head_needs_matching_heads(inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match=r"num_heads \(3\) must be a multiple"):
        la.attention(q, k, v, pattern=la.strided(4))


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(2, 9, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(B, Nk\) = \(2, 10\)"),
    (torch.ones(2, 10), TypeError, "key_padding_mask must be a bool tensor"),
])
def test_bad_key_padding_mask(inputs, mask, error, match):
    q, k, v = inputs
    with pytest.raises(error, match=match):
        la.attention(q, k, v, key_padding_mask=mask)


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(2, 3, 10, 9, dtype=torch.bool), ValueError, r"attn_mask must broadcast to \(B, H, Nq, Nk\) = \(2, 3, 10, 10\)"),
    (torch.ones(1, 2, 3, 10, 10, dtype=torch.bool), ValueError, "attn_mask must broadcast"),
    (torch.ones(10, 10, dtype=torch.long), TypeError, "attn_mask must be bool"),
])
def test_bad_attn_mask(inputs, mask, error, match):
    q, k, v = inputs
    with pytest.raises(error, match=match):
        la.attention(q, k, v, attn_mask=mask)


def test_unknown_backend(inputs):
    q, k, v = inputs
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'dense', 'blocked', 'flex', got 'fast'"):
        la.attention(q, k, v, backend="fast")


def test_flex_refuses_cpu_backward_and_dropout(inputs):
    q, k, v = (t.requires_grad_() for t in inputs)
    with pytest.raises(ValueError, match="no backward on CPU"):
        la.attention(q, k, v, pattern=la.sliding_window(2), backend="flex")
    with pytest.raises(ValueError, match="no dropout"):
        la.attention(q.detach(), k.detach(), v.detach(), dropout_p=0.1, backend="flex")


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_bad_dropout(inputs, p):
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        la.attention(*inputs, dropout_p=p)


def test_pattern_type(inputs):
    with pytest.raises(TypeError, match="pattern must be a longattn Pattern"):
        la.attention(*inputs, pattern="window")


def test_module_input_shape():
    attn = la.SparseSelfAttention(16, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C=16\)"):
        attn(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by heads \(3\)"):
        la.SparseSelfAttention(10, 3)


def test_zero_head_dim_and_zero_heads_are_named():
    empty = torch.zeros(1, 2, 5, 0)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        la.attention(empty, empty, empty)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        la.attention(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 0))
    for dim, heads, match in ((32, 0, "heads must be a positive int, got 0"), (0, 4, "dim must be a positive"),
                              (32, 2.0, "heads must be a positive int, got 2.0"), (-8, 2, "dim must be")):
        with pytest.raises(ValueError, match=match):
            la.SparseSelfAttention(dim, heads)
