"""Sparse Transformer patterns on the blocked path's reordered head groups (``backends/blocked/factored.py``).

Strided and fixed, split and merged heads, causal or not, against the float64 oracle (outputs and
gradients of q, k, v): odd lengths that are no multiple of the stride or block, head dim 40, key padding
with a fully padded example, Nq != Nk, bool and float ``attn_mask``, dead rows, dropout; and the work
the path does: O(N sqrt N) scores for ``strided(sqrt N)``.
"""

from __future__ import annotations

import math

import pytest
import torch

import longattn as la
from conftest import assert_close_to_reference, qkv
from longattn.backends.blocked import factored_plan
from longattn.backends.cost import blocked_work
from longattn.patterns import Geometry
from longattn.patterns.sparse_transformer import StrideColumns, SummaryColumns

CPU = torch.device("cpu")

# name -> (B, H, Nq, Nk, D, pad, stride, block, c): pad masks the whole last example's keys. The strides and
# blocks divide neither length, so residue classes and summary blocks come out uneven.
SCENARIOS = {
    "square97": (2, 4, 97, 97, 40, False, 8, 16, 4),
    "padded1025": (2, 4, 1025, 1025, 40, True, 32, 64, 8),
    "kvcache": (2, 4, 33, 97, 40, True, 8, 16, 4),
    "heads6": (1, 6, 200, 200, 40, False, 12, 24, 5),
    "more_queries": (2, 2, 97, 40, 40, False, 8, 16, 4),  # queries before key 0: empty causal rows
}


def _pattern(kind: str, heads: str, causal: bool, scenario: str) -> la.Pattern:
    *_, stride, block, c = SCENARIOS[scenario]
    return la.sparse_transformer(kind, stride=stride, block=block, c=c, heads=heads, causal=causal)


def _keep(pattern, b, h, nq, nk, kpm=None, attn_mask=None):
    keep = pattern.dense(nq, nk, num_heads=h, batch_size=b).expand(b, h, nq, nk)
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
    return keep


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("heads", ["split", "merged"])
@pytest.mark.parametrize("kind", ["strided", "fixed"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_oracle(kind, heads, causal, scenario):
    if (kind, heads, scenario) == ("strided", "merged", "padded1025"):
        pytest.skip("not reordered (see test_which_patterns_are_reordered): the O(N^2) tiles, tested at 97")
    b, h, nq, nk, d, pad, *_ = SCENARIOS[scenario]
    pattern = _pattern(kind, heads, causal, scenario)
    q, k, v = qkv(b, h, nq, nk, d)
    kpm = None
    if pad:
        kpm = torch.ones(b, nk, dtype=torch.bool)
        kpm[-1] = False  # a fully padded example: its rows are zeros with zero gradient
        kpm[0, nk // 3] = False
    assert_close_to_reference("blocked", q, k, v, _keep(pattern, b, h, nq, nk, kpm), pattern=pattern,
                              key_padding_mask=kpm)


def test_which_patterns_are_reordered():
    geo = Geometry(97, 97, 4, 2)
    kinds = lambda p: [c.kind for c in factored_plan(p, geo, CPU).calls]  # noqa: E731
    assert kinds(la.strided(8)) == ["natural", "stride"]
    assert kinds(la.sparse_transformer("fixed", block=16, c=4)) == ["natural", "summary"]
    assert kinds(la.sparse_transformer("fixed", block=16, c=4, heads="merged")) == ["summary"]
    # The window (natural order) and the stride columns (residue order) in one softmax: not reordered.
    assert factored_plan(la.sparse_transformer("strided", stride=8, heads="merged"), geo, CPU) is None
    assert factored_plan(la.longformer(32, global_idx=[1]), geo, CPU) is None
    # Heads renumbered inside a group would draw other random blocks: not reordered.
    assert factored_plan(la.per_head([la.bigbird(16), StrideColumns(8)]), geo, CPU) is None


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", ["full", "heads", "rows", "cols"])
@pytest.mark.parametrize("pattern", [la.strided(8), la.sparse_transformer("strided", stride=8),
                                     la.fixed(16, 4), la.sparse_transformer("fixed", block=16, c=4, heads="merged")],
                         ids=["strided", "strided_causal", "fixed", "fixed_merged_causal"])
def test_attn_mask(pattern, shape, kind):
    b, h, nq, nk = 2, 4, 33, 97
    size = {"full": (b, h, nq, nk), "heads": (h, nq, nk), "rows": (b, 1, 1, nk), "cols": (b, 1, nq, 1)}[shape]
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(b, h, nq, nk, 40)
    if kind == "bool":
        am = torch.rand(size, generator=gen) > 0.2
        assert_close_to_reference("blocked", q, k, v, _keep(pattern, b, h, nq, nk, attn_mask=am), pattern=pattern,
                                  attn_mask=am)
    else:
        am = torch.randn(size, generator=gen)
        if shape != "cols":  # -inf across a whole row would make the float64 reference itself NaN
            am = am.masked_fill(torch.rand(size, generator=gen) < 0.1, float("-inf"))
        assert_close_to_reference("blocked", q, k, v, _keep(pattern, b, h, nq, nk), pattern=pattern, bias=am)


@pytest.mark.parametrize("pattern", [la.strided(4), la.sparse_transformer("strided", stride=4),
                                     la.fixed(8, 2), la.sparse_transformer("fixed", block=8, c=2, heads="merged")],
                         ids=["strided", "strided_causal", "fixed", "fixed_merged_causal"])
def test_gradcheck_with_float_bias_and_kv_cache(pattern):
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 7, 19, 8, dtype=torch.float64))
    bias = torch.randn(1, 2, 7, 19, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, bias: la.attention(q, k, v, pattern=pattern, attn_mask=bias, backend="blocked")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("pattern", [la.strided(8), la.sparse_transformer("fixed", block=16, c=4)],
                         ids=["strided", "fixed_causal"])
def test_dead_rows_are_zero_with_zero_grad(pattern):
    b, h, n = 2, 4, 97
    q, k, v = (t.requires_grad_() for t in qkv(b, h, n, n, 40))
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[1] = False
    am = torch.ones(n, n, dtype=torch.bool)
    am[5] = False
    out = la.attention(q, k, v, pattern=pattern, key_padding_mask=kpm, attn_mask=am, backend="blocked")
    out.square().sum().backward()
    assert out[1].abs().max() == 0 and out[0, :, 5].abs().max() == 0
    assert q.grad[1].abs().max() == 0 and q.grad[0, :, 5].abs().max() == 0
    assert not any(t.grad.isnan().any() for t in (q, k, v))


def test_dropout_is_seeded_and_unbiased():
    q, k, v = qkv(1, 2, 50, 50, 8)
    pattern = la.sparse_transformer("fixed", block=8, c=2, causal=False)
    plain = la.attention(q, k, v, pattern=pattern, backend="blocked")
    torch.manual_seed(0)
    a = la.attention(q, k, v, pattern=pattern, dropout_p=0.3, backend="blocked")
    torch.manual_seed(0)
    assert torch.equal(a, la.attention(q, k, v, pattern=pattern, dropout_p=0.3, backend="blocked"))
    assert not torch.equal(a, plain)
    many = [t.expand(500, -1, -1, -1) for t in (q, k, v)]  # 500 examples: 500 independent dropout draws
    mean = la.attention(*many, pattern=pattern, dropout_p=0.3, backend="blocked").mean(0)
    assert (mean - plain[0]).abs().mean() < 0.05 * plain.abs().mean()


def test_mixed_head_groups_with_per_example_globals():
    """Three head groups: a window, stride columns, and summary columns merged with per-example globals
    (a summary call whose second key segment differs per example)."""
    b, h, n = 2, 6, 97
    flags = torch.zeros(b, n, dtype=torch.bool)
    flags[0, 3] = flags[1, 50] = True
    groups = [la.sliding_window(4), StrideColumns(8), SummaryColumns(16, 3) | la.global_tokens(flags)]
    pattern = la.causal(la.per_head(groups))
    calls = factored_plan(pattern, Geometry(n, n, h, b), CPU).calls
    assert [c.kind for c in calls] == ["natural", "stride", "summary"]
    q, k, v = qkv(b, h, n, n, 40)
    assert_close_to_reference("blocked", q, k, v, _keep(pattern, b, h, n, n), pattern=pattern)


def test_bf16():
    q, k, v = qkv(2, 4, 97, 97, 40, dtype=torch.bfloat16)
    pattern = la.sparse_transformer("strided", stride=8)
    assert_close_to_reference("blocked", q, k, v, _keep(pattern, 2, 4, 97, 97), pattern=pattern)


def test_strided_sqrt_n_computes_n_sqrt_n_scores():
    """strided(s = sqrt N): the window heads and the stride heads each read about s keys per query."""
    per_query = {}
    for n in (1024, 4096, 16384):
        s = math.isqrt(n)
        w = blocked_work(la.strided(s), Geometry(n, n, 2, 1), CPU)
        assert w.how == f"head groups: blocks | stride columns by residue mod {s}"
        per_query[n] = w.scores_per_head / n  # averaged over the window heads and the stride heads
        # Stride heads read their s columns; window heads a band of tiles whose width the tile cost
        # model sets (wide tiles on few heads): a bounded multiple of s, never the N of the block layout.
        assert per_query[n] <= 10 * s
    assert per_query[16384] / per_query[1024] < 4  # at most sqrt N's growth (4x), far from N's (16x)
    causal = blocked_work(la.sparse_transformer("strided", stride=64), Geometry(4096, 4096, 2, 1), CPU)
    fixed = blocked_work(la.fixed(64, 4), Geometry(4096, 4096, 2, 1), CPU)
    assert causal.scores_per_head < 0.1 * 4096**2 and fixed.scores_per_head < 0.1 * 4096**2


def test_auto_sends_long_inputs_to_the_reordered_path():
    q = torch.randn(1, 4, 4096, 16)
    for pattern in (la.strided(64), la.fixed(128, 8), la.sparse_transformer("strided", stride=128)):
        choice = la.explain(q, q, q, pattern=pattern)
        assert choice.backend == "blocked" and "head groups" in choice.reason
    short = torch.randn(1, 4, 256, 16)
    assert la.explain(short, short, short, pattern=la.strided(16)).backend == "dense"
    # Every key a summary key: half the heads attend everything, SDPA is faster (measured 0.9x at N=1024).
    q = torch.randn(1, 4, 1024, 16)
    assert la.explain(q, q, q, pattern=la.sparse_transformer("fixed", block=64, c=64)).backend == "dense"
    assert la.explain(q, q, q, pattern=la.sparse_transformer("fixed", block=128, c=8)).backend == "blocked"
