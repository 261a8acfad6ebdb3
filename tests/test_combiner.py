"""Combiner equals a float64 O(N^2) reference written from the paper's equations (forward and gradients, odd
sizes, causal and not, padding); the causal forms never see the future; one layer reaches every position."""

from __future__ import annotations

import math

import pytest
import torch

from longattn.modules import CombinerAttention
from longattn.modules.combiner import combiner_attention


def _regions(kind: str, n: int, i: int, region: int, causal: bool) -> tuple[list[int], list[list[int]]]:
    """Query i's direct keys and its regions (lists of positions), straight from the paper's definitions."""
    if kind == "fixed":
        own = i // region
        direct = [j for j in range(own * region, min((own + 1) * region, n)) if not causal or j <= i]
        blocks = range(own) if causal else [r for r in range(-(-n // region)) if r != own]
        return direct, [list(range(r * region, min((r + 1) * region, n))) for r in blocks]
    if kind == "axial":  # rows of `region`: the own row directly; every column above (and below) the row
        row, rows = i // region, -(-n // region)
        direct = [j for j in range(row * region, min((row + 1) * region, n)) if not causal or j <= i]
        spans = [range(row)] if causal else [range(row), range(row + 1, rows)]
        regions = [[r * region + c for r in span if r * region + c < n] for span in spans for c in range(region)]
        return direct, [omega for omega in regions if omega]
    # logsparse: itself, and per level the sibling of the 2^l-block holding i (earlier siblings if causal)
    regions, size = [], 1
    while size < n:
        c = i // size
        sib = c ^ 1
        if sib * size < n and (not causal or sib < c):
            regions.append(list(range(sib * size, min((sib + 1) * size, n))))
        size *= 2
    return [i], regions


def reference(q, k, v, real, kind, region, causal):
    """Eq. 9 of the paper, one query at a time, one head at a time, in float64."""
    if kind == "mixture":
        return (reference(q, k, v, real, "fixed", region, causal)
                + reference(q, k, v, real, "logsparse", region, causal)) / 2
    b, h, n, d = q.shape
    region = region or math.ceil(math.sqrt(n))
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        ok = real[bi]
        for hi in range(h):
            qq, kk, vv = q[bi, hi], k[bi, hi], v[bi, hi]
            for i in range(n):
                direct, regions = _regions(kind, n, i, region, causal)
                logits, values = [], []
                for j in direct:
                    if ok[j]:
                        logits.append(qq[i] @ kk[j] / math.sqrt(d))
                        values.append(vv[j])
                for omega in regions:
                    omega = [j for j in omega if ok[j]]
                    if not omega:
                        continue
                    k_sum = torch.stack([kk[j] for j in omega]).amax(0)
                    q_sum = torch.stack([qq[j] for j in omega]).amax(0)
                    w = torch.softmax(torch.stack([q_sum @ kk[j] / math.sqrt(d) for j in omega]), 0)
                    logits.append(qq[i] @ k_sum / math.sqrt(d))
                    values.append(sum(wj * vv[j] for wj, j in zip(w, omega)))
                if logits:
                    p = torch.softmax(torch.stack(logits), 0)
                    out[bi, hi, i] = sum(pj * vj for pj, vj in zip(p, values))
    return out


def _same_outputs_and_gradients(n: int, region: int | None, kind: str, causal: bool, seed: int) -> None:
    """``combiner_attention`` and the reference on random (2, 2, n, 8) inputs: outputs and the gradients of a
    random weighting of them, to 1e-10."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    real = torch.ones(2, n, dtype=torch.bool)
    weights = torch.randn(2, 2, n, 8, dtype=torch.float64)
    results = []
    for fn in (lambda: combiner_attention(q, k, v, kind=kind, region=region, causal=causal),
               lambda: reference(q, k, v, real, kind, region, causal)):
        out = fn()
        (out * weights).sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


CASES = [(kind, causal) for kind in ("fixed", "logsparse", "axial", "mixture") for causal in (False, True)]


@pytest.mark.parametrize("kind, causal", CASES)
def test_combiner_equals_the_paper(kind, causal):
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 37, 40
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    real = torch.ones(b, n, dtype=torch.bool)
    real[1, 30:] = False  # padding: example 1's last 7 keys
    out = combiner_attention(q, k, v, kind=kind, region=6, causal=causal, key_padding_mask=real)
    ref = reference(q, k, v, real, kind, 6, causal)
    torch.testing.assert_close(out[0], ref[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out[1, :, :30], ref[1, :, :30], atol=1e-10, rtol=1e-10)  # real rows


@pytest.mark.parametrize("kind, causal", [("fixed", True), ("logsparse", False), ("axial", False),
                                          ("axial", True), ("mixture", True)])
def test_combiner_gradients_equal_the_paper(kind, causal):
    _same_outputs_and_gradients(23, None, kind, causal, seed=1)


@pytest.mark.parametrize("n", [97, 1025])
@pytest.mark.parametrize("kind", ["fixed", "logsparse", "axial"])
def test_backends_agree_at_odd_sizes(n, kind):
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 40) for _ in range(3))
    real = torch.arange(n)[None] < n - 5
    outs = [combiner_attention(q, k, v, kind=kind, causal=True, key_padding_mask=real, backend=backend)
            for backend in ("dense", "blocked")]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["fixed", "logsparse", "axial", "mixture"])
def test_the_causal_forms_never_see_the_future(kind):
    torch.manual_seed(3)
    layer = CombinerAttention(16, 2, kind=kind, region=5, causal=True).double().eval()
    x = torch.randn(1, 41, 16, dtype=torch.float64)
    base = layer(x)
    for j in (0, 7, 20, 40):
        moved = x.clone()
        moved[0, j] += 1.0
        diff = (layer(moved) - base).abs().amax(-1)[0]
        assert (diff[:j] == 0).all(), f"{kind}: position {j} reached an earlier output"
        assert diff[j] > 0


@pytest.mark.parametrize("kind", ["fixed", "logsparse", "axial", "mixture"])
@pytest.mark.parametrize("causal", [False, True])
def test_one_layer_reaches_every_position(kind, causal):
    """Every output depends on every input it may see (all of them; the past when causal): the Jacobian has
    no zero block between two regions, unlike the fixed pattern's own block alone."""
    torch.manual_seed(4)
    n = 24
    layer = CombinerAttention(8, 2, kind=kind, region=4, causal=causal).double()
    x = torch.randn(1, n, 8, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0], x)[:, :, 0]  # (N, C, N, C)
    reach = jac.abs().sum((1, 3)) > 0  # output i depends on input j
    expected = torch.tril(torch.ones(n, n, dtype=torch.bool)) if causal else torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(reach, expected)
    # the fixed pattern it is built on (each block alone) reaches only the query's own block
    from longattn.modules import SparseSelfAttention
    from longattn.patterns.sparse_transformer import SameBlock

    local = SparseSelfAttention(8, 2, pattern=SameBlock(4)).double()
    jac = torch.autograd.functional.jacobian(lambda t: local(t)[0], x)[:, :, 0]
    assert (jac.abs().sum((1, 3)) > 0).sum() == n * 4


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind must be one of fixed, logsparse, axial, mixture"):
        CombinerAttention(16, 2, kind="axial-typo")
    with pytest.raises(ValueError, match="region must be a positive int"):
        combiner_attention(*(torch.randn(1, 1, 5, 4) for _ in range(3)), region=0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C=16\)"):
        CombinerAttention(16, 2)(torch.randn(2, 5, 8))


@pytest.mark.parametrize("kind, causal", [("fixed", False), ("logsparse", True), ("mixture", False)])
def test_whole_blocks_without_padding_equal_the_paper(kind, causal):
    """N = 32 with regions of 8: every block whole and real, the summaries' no-copy path."""
    _same_outputs_and_gradients(32, 8, kind, causal, seed=5)


@pytest.mark.parametrize("kind", ["fixed", "logsparse", "axial", "mixture"])
@pytest.mark.parametrize("causal", [False, True])
def test_the_last_queries_alone_get_their_rows_of_the_whole(kind, causal):
    """``attend`` with the queries of the last Nq tokens only (a segment after a memory) gives those rows of
    the full layer, on both backends: the patterns align queries bottom-right."""
    from longattn.modules.combiner import abstractions, attend

    torch.manual_seed(6)
    n = 53
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64) for _ in range(3))
    real = torch.ones(2, n, dtype=torch.bool)
    real[1, :4] = False
    whole = combiner_attention(q, k, v, kind=kind, region=6, causal=causal, key_padding_mask=real)
    parts = abstractions(q, k, v, kind=kind, region=6, causal=causal, key_padding_mask=real)
    for nq in (1, 20):
        for backend in ("dense", "blocked"):
            out = attend(q[:, :, -nq:], k, v, parts, key_padding_mask=real, backend=backend)
            torch.testing.assert_close(out, whole[:, :, -nq:], atol=1e-10, rtol=1e-10)


def _pattern_case(kind: str, causal: bool, nq: int, dtype):
    """A Combiner layout over [slots; 97 tokens] with random q, k, v (the final attention on its own), the
    last ``nq`` tokens as queries, the second example's last 20 tokens padded."""
    from conftest import qkv
    from longattn.patterns.combiner import combiner_axial, combiner_fixed, combiner_logsparse

    n = 97
    pattern = {"fixed": combiner_fixed(10, 10, causal=causal), "logsparse": combiner_logsparse(n, causal=causal),
               "axial": combiner_axial(10, n, causal=causal)}[kind]
    nk = n + pattern.slots
    q, k, v = qkv(2, 2, nq, nk, 40, dtype)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[1, -20:] = False
    keep = pattern.dense(nq, nk, num_heads=2, batch_size=2) & kpm[:, None, None, :]
    return pattern, q, k, v, kpm, keep


@pytest.mark.parametrize("precision", ["fp32", "bf16-fp32-compute", "bf16-bf16-compute"])
@pytest.mark.parametrize("kind", ["fixed", "logsparse", "axial"])
@pytest.mark.parametrize("causal", [False, True])
def test_combiner_layouts_match_the_oracle_in_every_precision(kind, causal, precision):
    """The blocked backend on each layout, fp32 and bf16 (both compute modes), outputs and gradients."""
    from conftest import assert_close_to_reference, forced_compute

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    pattern, q, k, v, kpm, keep = _pattern_case(kind, causal, 33, dtype)
    with forced_compute(None if precision == "fp32" else precision.split("-")[1]):
        assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)


def test_combiner_layout_on_flex_cpu_forward():
    """FlexAttention on CPU (forward only, one compile): the block mask built from the layout is exact."""
    from conftest import assert_close_to_reference

    pattern, q, k, v, kpm, keep = _pattern_case("logsparse", True, 97, torch.float32)
    assert_close_to_reference("flex", q, k, v, keep, grad=False, pattern=pattern, key_padding_mask=kpm)
