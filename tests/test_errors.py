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


# --- edges: meta tensors, non-finite scales, huge patterns, the parser ----------------------------------------

def test_meta_tensors_give_the_output_shape(inputs):
    q, k, v = (t.to("meta").requires_grad_() for t in inputs)
    out = la.attention(q, k, v, pattern=la.patterns.sliding_window(2))
    assert out.device.type == "meta" and out.shape == (2, 3, 10, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
    with pytest.raises(ValueError, match="explain needs tensors with data"):
        la.explain(q, k, v)


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_scale_is_refused(inputs, scale):
    with pytest.raises(ValueError, match="scale must be finite"):
        la.attention(*inputs, scale=scale)


def test_flex_on_cpu_refuses_float64_with_a_reason(inputs):
    q, k, v = (t.double() for t in inputs)
    with pytest.raises(ValueError, match="backend='flex' cannot run this call: FlexAttention on CPU has no float64"):
        la.attention(q, k, v, backend="flex")
    assert la.explain(q, k, v).backend != "flex"


@pytest.mark.parametrize("make, match", [
    (lambda: la.patterns.sliding_window(10**30), r"left must be <= 1,099,511,627,776.*full\(\) attends every key"),
    (lambda: la.patterns.strided(2**41), "stride must be <="),
    (lambda: la.patterns.bigbird(block=64, seed=2**64), "seed must be <="),
])
def test_absurd_pattern_sizes_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_block_wider_than_the_sequence_costs_the_sequence():
    """bigbird(block=10**6) on 130 tokens is one block, full attention: computed on 144 rows, not 10**6."""
    q, k, v = qkv(1, 2, 130, 130, 16)
    out = la.attention(q, k, v, pattern=la.patterns.bigbird(block=10**6), backend="blocked")
    torch.testing.assert_close(out, la.attention(q, k, v, backend="dense"), atol=1e-5, rtol=1e-5)
    from longattn.backends.blocked import choose_block
    from longattn.patterns import Geometry

    assert choose_block(la.patterns.bigbird(block=10**6), Geometry(130, 130)) == 144


@pytest.mark.parametrize("text, name", [("sliding_window(-(-8))", "sliding_window_8"),
                                        ("sliding_window(+8, -(-2))", "sliding_window_8_2")])
def test_the_parser_takes_signed_numbers(text, name):
    assert la.parse_pattern(text).name == name


@pytest.mark.parametrize("text, match", [
    ("sliding_window(-'a')", "unsupported expression"),
    ("sliding_window(~3)", "unsupported expression"),
    (" | ".join(["sliding_window(1)"] * 3000), "too long or deeply nested"),
])
def test_the_parser_names_what_it_cannot_take(text, match):
    with pytest.raises(ValueError, match=match):
        la.parse_pattern(text)


def test_a_long_union_parses_without_recursion():
    text = " | ".join(f"sliding_window({i})" for i in range(400))
    assert la.parse_pattern(text).name.count("sliding_window") == 400


# --- NaN and padding: padding never reaches a real row; a float mask holds no NaN -----------------------------

@pytest.mark.parametrize("backend", ["dense", "blocked", "flex"])
def test_padding_holding_nan_never_reaches_a_real_row(backend):
    torch.manual_seed(0)
    b, h, n, real = 2, 2, 97, 80
    q, k, v = (torch.randn(b, h, n, 40) for _ in range(3))
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[0, :real], kpm[1, :n - 5] = True, True
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[~kpm[:, None, :].expand(b, h, n)] = float("nan")
    poisoned_v[~kpm[:, None, :].expand(b, h, n)] = float("inf")
    pattern = la.patterns.sliding_window(20) | la.patterns.global_tokens([0])
    grad = backend != "flex"  # FlexAttention has no CPU backward
    clean, dirty = [(k.clone().requires_grad_(grad), v.clone().requires_grad_(grad)),
                    (poisoned_k.requires_grad_(grad), poisoned_v.requires_grad_(grad))]
    outs = []
    for kk, vv in (clean, dirty):
        qq = q.clone().requires_grad_(grad)
        out = la.attention(qq, kk, vv, pattern=pattern, key_padding_mask=kpm, backend=backend)
        if grad:
            out.sum().backward()
        outs.append((out, qq.grad, kk.grad, vv.grad))
    (out, dq, dk, dv), (out2, dq2, dk2, dv2) = outs
    torch.testing.assert_close(out2, out)  # every row, padded query rows included: padded keys are never read
    if grad:
        torch.testing.assert_close(dq2, dq)
        pad = ~kpm[:, None, :, None]
        assert dk2.isfinite().all() and dv2.isfinite().all() and (dk2 * pad == 0).all() and (dv2 * pad == 0).all()


@pytest.mark.parametrize("backend", ["dense", "blocked", "flex"])
def test_a_nan_in_a_real_key_reaches_the_rows_that_attend_it(backend):
    """The other half of the rule: real inputs are not cleaned. A NaN key spreads to at least every row that
    may attend it (which other rows it reaches is the backend's: dense reads every key for every row)."""
    q, k, v = qkv(1, 1, 97, 97, 16)
    v = v.clone()
    v[0, 0, 50] = float("nan")
    out = la.attention(q, k, v, pattern=la.patterns.sliding_window(3), backend=backend)
    assert out[0, 0, 47:54].isnan().all()


def test_a_float_mask_holding_nan_or_plus_inf_is_refused(inputs):
    for bad in (float("nan"), float("inf")):
        mask = torch.zeros(10, 10)
        mask[3, 4] = bad
        with pytest.raises(ValueError, match="attn_mask \\(float\\) must hold finite values or -inf"):
            la.attention(*inputs, attn_mask=mask)
    mask = torch.zeros(10, 10)
    mask[3] = float("-inf")  # -inf masks: a fully masked row is an empty row, zeros
    assert (la.attention(*inputs, attn_mask=mask, backend="blocked")[:, :, 3] == 0).all()
