"""Shared test helpers: the float64 reference, the tolerance rule and input builders.

Tolerance (xformers/flash-attn rule): a backend's error against a float64 reference may be at most twice
PyTorch's own error (SDPA in the same dtype, same mask) plus a small floor for round-off noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile

import pytest
import torch

# Tests never read this machine's `longattn calibrate` results: dispatch and tile choices stay the defaults.
os.environ["LONGATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="longattn-test-cache-")

import longattn as la  # noqa: E402
from longattn.backends import machine  # noqa: E402

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float64: 1e-10}


@contextlib.contextmanager
def forced_compute(name):
    """Run with the blocked path multiplying bf16/fp16 inputs in ``name`` ("fp32" or their own dtype,
    "bf16"), whatever this machine's profile would choose; None leaves the profile alone."""
    if name is None:
        yield
        return
    compute = {"bf16": name, "fp16": "fp16" if name != "fp32" else "fp32"}
    with machine.use(dataclasses.replace(machine.DEFAULTS, source=f"test: {name} compute", compute=compute)):
        yield


def reference(q, k, v, keep, *, scale=None, bias=None):
    """Masked softmax attention in float64; rows that keep nothing give zeros with zero gradient."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + bias.double()
        keep = keep & (bias > float("-inf"))
    live = keep.any(-1, keepdim=True)
    scores = scores.masked_fill(~(keep | ~live), float("-inf"))
    return (torch.softmax(scores, -1) * live) @ v


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(backend, q, k, v, keep, *, grad=True, **kwargs):
    """Compare ``backend`` and SDPA (dense) in q's dtype with the float64 reference, outputs and grads."""
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    ref = reference(*leaves, keep, scale=kwargs.get("scale"), bias=kwargs.get("bias"))
    attn_kwargs = {key: val for key, val in kwargs.items() if key != "bias"}
    if kwargs.get("bias") is not None:
        attn_kwargs["attn_mask"] = kwargs["bias"]
    outs = {}
    for name in ("dense", backend):
        out = la.attention(*leaves, backend=name, **attn_kwargs)
        assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
        assert not out.isnan().any(), f"{name} output has NaN"
        outs[name] = out
    floor = FLOOR[q.dtype]
    torch_err = max_err(outs["dense"], ref)
    ours = max_err(outs[backend], ref)
    assert ours <= 2 * torch_err + floor, f"{backend} forward error {ours:.3g} > 2 x SDPA's {torch_err:.3g}"
    if not grad:
        return
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=ref.dtype).to(ref.device)
    ref_grads = torch.autograd.grad(ref, leaves, cot)
    grads = {name: torch.autograd.grad(out, leaves, cot.to(out.dtype)) for name, out in outs.items()}
    for n, (gd, gb, gr) in enumerate(zip(grads["dense"], grads[backend], ref_grads)):
        assert not gb.isnan().any(), f"{backend} grad {'qkv'[n]} has NaN"
        scale = gr.abs().max().item() + 1.0
        torch_err, ours = max_err(gd, gr), max_err(gb, gr)
        assert ours <= 2 * torch_err + floor * scale, (
            f"{backend} grad {'qkv'[n]} error {ours:.3g} > 2 x SDPA's {torch_err:.3g}")


def qkv(b, h, nq, nk, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return make(nq), make(nk), make(nk)


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="no CUDA device")])
DEVICES = ["cpu", CUDA]
