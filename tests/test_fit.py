"""FIT equals a plain, loop-written float64 reference of its layer schedule (encoder and decoder, padding), the
decoder never sees the future, and a padded example gives the result of the same example alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longattn.models import FIT, FITConfig
from longattn.models.fit import parse_schedule


def _attend(q, k, v, allowed):
    """softmax(q k^T / sqrt(d)) v over the allowed pairs, one head; a row with no allowed key gives zeros."""
    scores = (q @ k.T) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v


def _heads(x_q, x_kv, wq, bq, wk, bk, wv, bv, wo, bo, heads, allowed):
    q, k, v = x_q @ wq.T + bq, x_kv @ wk.T + bk, x_kv @ wv.T + bv
    d = q.shape[-1] // heads
    outs = [_attend(q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d], v[:, h * d:(h + 1) * d], allowed)
            for h in range(heads)]
    return torch.cat(outs, -1) @ wo.T + bo


def _self_layer(block, x, allowed, heads):
    """One pre-LN layer: x + attn(LN x), then x + mlp(LN x)."""
    h = F.layer_norm(x, x.shape[-1:], block.norm1.weight, block.norm1.bias)
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    c = x.shape[-1]
    x = x + _heads(h, h, w[:c], b[:c], w[c:2 * c], b[c:2 * c], w[2 * c:], b[2 * c:], block.attn.proj.weight,
                   block.attn.proj.bias, heads, allowed)
    h = F.layer_norm(x, x.shape[-1:], block.norm2.weight, block.norm2.bias)
    lin1, lin2 = block.mlp[0], block.mlp[3]
    return x + F.gelu(h @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias


def _cross_step(step, x, ctx, allowed, heads):
    hq = F.layer_norm(x, x.shape[-1:], step["norm_q"].weight, step["norm_q"].bias)
    hk = F.layer_norm(ctx, ctx.shape[-1:], step["norm_kv"].weight, step["norm_kv"].bias)
    a = step["attn"]
    c = x.shape[-1]
    return x + _heads(hq, hk, a.q.weight, a.q.bias, a.kv.weight[:c], a.kv.bias[:c], a.kv.weight[c:], a.kv.bias[c:],
                      a.proj.weight, a.proj.bias, heads, allowed)


def reference(model: FIT, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """FIT's schedule for ONE example ``x: (N, C)`` with ``real: (N,)``, group by group, in loops."""
    cfg = model.cfg
    n, m, heads = cfg.group_size, cfg.latents, cfg.heads
    length = x.shape[0]
    t = math.ceil(length / n)
    x = torch.cat([x, x.new_zeros(t * n - length, x.shape[1])])
    real = torch.cat([real, real.new_zeros(t * n - length)])
    groups = [x[g * n:(g + 1) * n] for g in range(t)]
    masks = [real[g * n:(g + 1) * n] for g in range(t)]
    live = [bool(mk.any()) for mk in masks]
    latents = [model.latent_init[g * m:(g + 1) * m] for g in range(t)]
    local_ok = torch.ones(n, n, dtype=torch.bool)
    if cfg.causal:
        local_ok = torch.tril(local_ok)
    for bi, block in enumerate(model.blocks):
        for layer in block.local:
            groups = [_self_layer(layer, groups[g], local_ok & masks[g][None, :], heads) for g in range(t)]
        if block.write is not None:
            latents = [_cross_step(block.write, latents[g], groups[g], masks[g][None, :].expand(m, n), heads)
                       for g in range(t)]
            flat = torch.cat(latents)
            group_of = torch.arange(t * m) // m
            allowed = torch.tensor([live[int(g)] for g in group_of])[None, :].expand(t * m, t * m).clone()
            if cfg.causal:
                allowed &= group_of[None, :] <= group_of[:, None]
            for layer in block.global_:
                flat = _self_layer(layer, flat, allowed, heads)
            latents = [flat[g * m:(g + 1) * m] for g in range(t)]
        if block.read is not None:
            new = []
            for g in range(t):
                source = g - 1 if cfg.causal else g
                if source < 0:  # the decoder's first group reads nothing
                    ctx, ok = latents[0], torch.zeros(n, m, dtype=torch.bool)
                else:
                    ctx, ok = latents[source], torch.full((n, m), live[source])
                new.append(_cross_step(block.read, groups[g], ctx, ok, heads))
            groups = new
    out = torch.cat(groups)[:length]
    return F.layer_norm(out, out.shape[-1:], model.norm.weight, model.norm.bias)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("schedule", ["(1)1(1)", "(2)1(1)2(1)"])
def test_fit_equals_the_loop_reference(causal, schedule):
    torch.manual_seed(0)
    cfg = FITConfig(dim=40, heads=2, group_size=8, latents=3, max_len=128, schedule=schedule, causal=causal)
    model = FIT(cfg).double().eval()
    x = torch.randn(2, 45, 40, dtype=torch.float64)
    kpm = torch.ones(2, 45, dtype=torch.bool)
    kpm[1, 29:] = False  # example 1: the last two groups hold padding only
    out = model(x, key_padding_mask=kpm).last_hidden_state
    for b in range(2):
        ref = reference(model, x[b], kpm[b])
        torch.testing.assert_close(out[b][kpm[b]], ref[kpm[b]], atol=1e-10, rtol=1e-10)


def test_fit_gradients_match_the_reference():
    torch.manual_seed(1)
    model = FIT(FITConfig(dim=16, heads=2, group_size=5, latents=2, max_len=64, causal=True)).double()
    x = torch.randn(1, 23, 16, dtype=torch.float64, requires_grad=True)
    model(x).last_hidden_state.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    reference(model, x[0], torch.ones(23, dtype=torch.bool)).square().sum().backward()
    torch.testing.assert_close(grad, x.grad, atol=1e-10, rtol=1e-10)


def test_the_decoder_never_sees_the_future():
    torch.manual_seed(2)
    model = FIT(FITConfig(dim=16, heads=2, group_size=4, latents=2, max_len=64, causal=True)).double().eval()
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    base = model(x).last_hidden_state
    for j in (0, 5, 13, 29):
        moved = x.clone()
        moved[0, j] += 1.0
        diff = (model(moved).last_hidden_state - base).abs().amax(-1)[0]
        assert (diff[:j] == 0).all(), f"position {j} reached earlier outputs"
        assert diff[j:].max() > 0
    # and the encoder does see it: every output depends on the last token
    enc = FIT(FITConfig(dim=16, heads=2, group_size=4, latents=2, max_len=64)).double().eval()
    moved = x.clone()
    moved[0, 29] += 1.0
    assert ((enc(moved).last_hidden_state - enc(x).last_hidden_state).abs().amax(-1) > 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_padding_gives_the_example_alone(causal):
    torch.manual_seed(3)
    model = FIT(FITConfig(dim=16, heads=2, group_size=4, latents=2, max_len=64, causal=causal)).double().eval()
    x = torch.randn(1, 21, 16, dtype=torch.float64)
    alone = model(x[:, :13]).last_hidden_state
    kpm = torch.arange(21)[None] < 13
    padded = model(x, key_padding_mask=kpm).last_hidden_state[:, :13]
    torch.testing.assert_close(padded, alone, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("text, blocks", [("(2)2(2)", [(2, 2), (2, 0)]), ("(1)3(0)1(4)", [(1, 3), (0, 1), (4, 0)]),
                                          ("(3)", [(3, 0)])])
def test_parse_schedule(text, blocks):
    assert parse_schedule(text) == blocks


@pytest.mark.parametrize("text, match", [("2(2)", "must look like"), ("(2)(2)", "every block but the last"),
                                         ("(2)2", "never be read back"), ("", "must look like")])
def test_bad_schedules_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        FITConfig(schedule=text)


def test_too_long_an_input_is_named():
    model = FIT(FITConfig(dim=16, heads=2, group_size=4, latents=2, max_len=16))
    with pytest.raises(ValueError, match="more than max_len"):
        model(torch.randn(1, 17, 16))
