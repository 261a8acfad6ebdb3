"""SparseSelfAttention, the auto rule and explain()."""

from __future__ import annotations

import logging

import torch

import longattn as la
from longattn.backends import machine
from conftest import qkv
from longattn.backends import CROSSOVER


def test_module_matches_manual_computation():
    torch.manual_seed(0)
    attn = la.SparseSelfAttention(32, 4, pattern=la.sliding_window(3))
    x = torch.randn(2, 50, 32)
    kpm = torch.ones(2, 50, dtype=torch.bool)
    kpm[1, 40:] = False
    out = attn(x, key_padding_mask=kpm)
    q, k, v = attn.qkv(x).view(2, 50, 3, 4, 8).permute(2, 0, 3, 1, 4)
    keep = la.sliding_window(3).dense(50, num_heads=4) & kpm[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, attn.proj(ref.transpose(1, 2).reshape(2, 50, 32)))
    out.sum().backward()
    assert attn.qkv.weight.grad is not None


def test_module_device_dtype_and_reset_parameters():
    attn = la.SparseSelfAttention(16, 2, device="meta", dtype=torch.float64)
    assert attn.qkv.weight.device.type == "meta" and attn.qkv.weight.dtype == torch.float64
    real = attn.to_empty(device="cpu")
    real.reset_parameters()
    assert torch.isfinite(real.qkv.weight).all() and (real.qkv.bias == 0).all()
    assert "pattern=None" in repr(real)


def test_module_dropout_only_in_training():
    attn = la.SparseSelfAttention(16, 2, pattern=la.sliding_window(2), dropout=0.5).eval()
    x = torch.randn(1, 30, 16)
    torch.testing.assert_close(attn(x), attn(x))


def test_auto_rule_and_explain(caplog):
    short = qkv(1, 2, 64, 64, 16)
    long_ = qkv(1, 2, 2 * CROSSOVER + 1, 2 * CROSSOVER + 1, 16)
    assert la.explain(*short, pattern=la.sliding_window(8)).backend == "dense"
    assert la.explain(*long_).backend == "dense"
    assert la.explain(*long_, pattern=la.sliding_window(8)).backend == "blocked"
    assert la.explain(*long_, pattern=la.causal()).backend == "dense"  # half of all scores
    choice = la.explain(*long_, pattern=la.sliding_window(8), backend="dense")
    assert choice.backend == "dense" and "explicitly" in choice.reason
    with caplog.at_level(logging.DEBUG, logger="longattn"):
        la.attention(*long_, pattern=la.sliding_window(8))
    assert "blocked" in caplog.text


def test_auto_never_materialises_a_huge_mask(monkeypatch):
    from longattn.backends import dispatch

    q, k, v = qkv(1, 4, 300, 300, 8)
    pattern = la.bigbird(16)  # per-head random blocks: a (1, 4, N, N) mask
    assert la.explain(q, k, v, pattern=pattern).backend == "dense"
    monkeypatch.setattr(dispatch, "DENSE_MASK_ELEMENTS", 4 * 300 * 300 - 1)
    assert la.explain(q, k, v, pattern=pattern).backend == "blocked"


def test_auto_sends_plain_causal_to_sdpa_at_any_length():
    """SDPA's is_causal kernel needs no mask: the mask-size guard must not push causal to the blocked path."""
    q = torch.randn(1, 1, 12000, 8)
    assert la.explain(q, q, q, pattern=la.causal()).backend == "dense"
    assert la.explain(q, q, q, pattern=la.causal(la.sliding_window(64))).backend == "blocked"


def test_auto_thresholds_come_from_the_machine_profile():
    """Without a calibration the defaults decide (bf16 moves the crossover: measured where bf16 SDPA runs at
    half the fp32 rate) and the choice says so; a calibration's own thresholds replace them."""
    q = torch.randn(1, 2, 512, 16)
    pattern = la.longformer(256)
    choice = la.explain(q, q, q, pattern=pattern)
    assert choice.backend == "dense" and choice.profile.startswith("defaults") and "defaults" in str(choice)
    assert la.explain(*(t.bfloat16() for t in (q, q, q)), pattern=pattern).backend == "blocked"
    limits = {"fp32": machine.DispatchLimits(crossover=256, dense_fraction=2.5),
              "bf16": machine.DispatchLimits(crossover=1024, dense_fraction=0.8)}
    with machine.use(machine.MachineProfile(source="calibration test.json", limits=limits)):
        choice = la.explain(q, q, q, pattern=pattern)
        assert choice.backend == "blocked" and choice.profile == "calibration test.json"
        assert la.explain(*(t.bfloat16() for t in (q, q, q)), pattern=pattern).backend == "dense"


