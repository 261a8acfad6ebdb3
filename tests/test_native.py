"""The fused tile step (``backends/blocked/native``): built once per test session (~40 s), then held to the
same float64 oracle as the Python tile loop, on every pattern and scenario, with a spy that proves the step
ran (a silent fallback to the Python loop would pass the oracle too)."""

from __future__ import annotations

import shutil

import pytest
import torch

import longattn as la
from conftest import assert_close_to_reference, qkv
from longattn.backends import machine
from longattn.backends.blocked import kernel, native
from test_backends import PATTERNS, SCENARIOS, _case, test_attn_mask_combines_with_pattern

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the fused tile step cannot be built")


@pytest.fixture(scope="session")
def module():
    built = native.build()
    assert built is not None, native.reason()  # a compiler is here: a failed build is a failure
    return built


class Spy:
    """Counts the fused step's forward and backward calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {"forward": 0, "backward": 0}

    def forward(self, *args):
        self.calls["forward"] += 1
        return self.inner.forward(*args)

    def backward(self, *args):
        self.calls["backward"] += 1
        return self.inner.backward(*args)


@pytest.fixture
def fused(module, monkeypatch):
    """Every eligible blocked call runs the fused step; yields the spy."""
    spy = Spy(module)
    monkeypatch.setattr(native, "_module", spy)
    monkeypatch.setattr(kernel, "NATIVE", True)
    return spy


# Sparse Transformer patterns run reordered head groups (factored.py) whose tiles are the same kernel.
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_fused_matches_oracle(pattern_name, scenario, fused):
    pattern, q, k, v, kpm, keep = _case(pattern_name, scenario, torch.float32, "cpu")
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)
    assert fused.calls["forward"] >= 1 and fused.calls["backward"] >= 1


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fused_with_attn_masks(kind, fused):
    test_attn_mask_combines_with_pattern("blocked", kind)  # a float mask without a gradient joins the tile bias
    assert fused.calls["backward"] >= 1


@pytest.mark.parametrize("b,h", [(1, 1), (1, 3), (3, 4)])  # key gradients per thread, then per (example, head)
def test_fused_gradients_in_both_parallel_layouts(b, h, fused):
    q, k, v = qkv(b, h, 300, 300, 40)
    kpm = torch.ones(b, 300, dtype=torch.bool)
    kpm[-1, 200:] = False
    pattern = la.longformer(64, global_idx=[0, 150])
    keep = pattern.dense(300, num_heads=h) & kpm[:, None, None, :]
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)
    assert fused.calls["backward"] == 1


def test_fused_fully_masked_rows_are_zero_with_zero_grad(fused):
    b, h, n, d = 2, 2, 97, 40
    q, k, v = (t.requires_grad_() for t in qkv(b, h, n, n, d))
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[1] = False
    kpm[0, :50] = False
    out = la.attention(q, k, v, pattern=la.causal(la.sliding_window(20)), key_padding_mask=kpm, backend="blocked")
    assert (out[1] == 0).all() and (out[0, :, :50] == 0).all() and not out.isnan().any()
    out.sum().backward()
    assert (q.grad[1] == 0).all() and not any(t.grad.isnan().any() for t in (q, k, v))
    assert fused.calls["forward"] == 1


def test_fused_step_is_left_out_where_it_does_not_apply(fused):
    q, k, v = qkv(1, 2, 128, 128, 32)
    pattern = la.sliding_window(16)
    la.attention(q, k, v, pattern=pattern, backend="blocked", dropout_p=0.1)  # dropout: the Python loop
    la.attention(q.double(), k.double(), v.double(), pattern=pattern, backend="blocked")  # float64
    bias = torch.zeros(1, 1, 128, 128, requires_grad=True)  # a float mask that wants its gradient
    la.attention(q, k, v, pattern=pattern, backend="blocked", attn_mask=bias).sum().backward()
    assert bias.grad is not None and fused.calls["forward"] == 0
    la.attention(q, k, v, pattern=pattern, backend="blocked")
    assert fused.calls["forward"] == 1


def test_profile_switches_the_fused_step(module, monkeypatch):
    spy = Spy(module)
    monkeypatch.setattr(native, "_module", spy)
    q, k, v = qkv(1, 2, 128, 128, 32)
    with machine.use(machine.DEFAULTS):  # no calibration: the Python loop
        la.attention(q, k, v, pattern=la.sliding_window(16), backend="blocked")
    assert spy.calls["forward"] == 0
    with machine.use(machine.MachineProfile(source="test", fused_tiles=True)):
        la.attention(q, k, v, pattern=la.sliding_window(16), backend="blocked")
    assert spy.calls["forward"] == 1
    long_q = torch.zeros(1, 2, 1024, 32)
    with machine.use(machine.MachineProfile(source="test", fused_tiles=True)):
        assert "fused C++ step" in str(la.explain(long_q, long_q, long_q, pattern=la.sliding_window(16)))
    assert "fused" not in str(la.explain(long_q, long_q, long_q, pattern=la.sliding_window(16)))
    monkeypatch.setenv("LONGATTN_NATIVE", "0")  # the switch-off wins over the profile
    monkeypatch.setattr(native, "_module", None)
    with machine.use(machine.MachineProfile(source="test", fused_tiles=True)):
        la.attention(q, k, v, pattern=la.sliding_window(16), backend="blocked")
    assert spy.calls["forward"] == 1 and "LONGATTN_NATIVE" in native.reason()


def test_build_is_named_by_source_cpu_and_torch(module):
    name = native.build_dir().name
    assert name.startswith("longattn_tiles_") and native.load() is module
    assert native.products() in ("oneDNN brgemm", "MKL sgemm")
