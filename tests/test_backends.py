"""Every pattern x backend x dtype against the float64 oracle: forward and gradients of q, k, v.

Odd sizes (N = 97, 1025; head dim 40), key padding, causal, Nq != Nk and fully masked rows.
FlexAttention on CPU is forward-only and compiles per shape, so it runs a representative subset here and
the whole matrix under ``-m slow`` (and on CUDA, where it also trains).
"""

from __future__ import annotations

import pytest
import torch

import longattn as la
from conftest import DEVICES, assert_close_to_reference, forced_compute, qkv


def _per_example_globals(batch, n):
    flags = torch.zeros(batch, n, dtype=torch.bool)
    flags[0, 0] = True
    flags[-1, n // 3] = flags[-1, n - 1] = True
    return la.global_tokens(flags) | la.sliding_window(8)


# Factories (batch, kv_len) -> pattern, so per-example patterns get matching shapes.
PATTERNS = {
    "full": lambda b, n: la.full(),
    "window": lambda b, n: la.sliding_window(7),
    "window_left": lambda b, n: la.sliding_window(5, 0),
    "dilated": lambda b, n: la.dilated(8, 3),
    "global": lambda b, n: la.global_tokens([0, n // 2]),
    "global_per_example": _per_example_globals,
    "random": lambda b, n: la.random_blocks(2, 16, seed=3),
    "bigbird": lambda b, n: la.bigbird(16),
    "strided": lambda b, n: la.strided(8),
    "fixed": lambda b, n: la.fixed(16, 4),
    "causal": lambda b, n: la.causal(),
    "causal_window": lambda b, n: la.causal(la.sliding_window(16)),
    "longformer": lambda b, n: la.longformer(32, global_idx=[1]),
    "st_strided": lambda b, n: la.sparse_transformer("strided", stride=16),
    "st_fixed": lambda b, n: la.sparse_transformer("fixed", block=16, c=4),
    "causal_bigbird": lambda b, n: la.causal(la.bigbird(16)),
    "composed": lambda b, n: (la.sliding_window(8) & la.dilated(16, 2)) | la.global_tokens([5]),
    "per_head": lambda b, n: la.per_head([la.sliding_window(4), la.causal(), la.bigbird(16), la.full()]),
}

# name -> (B, H, Nq, Nk, D, pad): pad masks the second half of the last example's keys.
SCENARIOS = {
    "square97": (2, 4, 97, 97, 40, False),
    "padded1025": (2, 4, 1025, 1025, 40, True),
    "kvcache": (2, 4, 33, 97, 40, True),
}


def _case(pattern_name, scenario, dtype, device):
    b, h, nq, nk, d, pad = SCENARIOS[scenario]
    pattern = PATTERNS[pattern_name](b, nk)
    q, k, v = qkv(b, h, nq, nk, d, dtype, device)
    kpm = None
    if pad:
        kpm = torch.ones(b, nk, dtype=torch.bool, device=device)
        kpm[-1, nk // 2:] = False
    keep = pattern.dense(nq, nk, num_heads=h, batch_size=b, device=device)
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    return pattern, q, k, v, kpm, keep


# bf16 inputs run twice on CPU: multiplied in float32 (machines whose bf16 matmul is slower) and in bf16
# with float32 softmax and accumulation (machines with a fast bf16 unit), whatever this machine would pick.
PRECISIONS = {"fp32": (torch.float32, None), "bf16-fp32-compute": (torch.bfloat16, "fp32"),
              "bf16-bf16-compute": (torch.bfloat16, "bf16")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_blocked_matches_oracle(pattern_name, scenario, precision, device):
    dtype, compute = PRECISIONS[precision]
    pattern, q, k, v, kpm, keep = _case(pattern_name, scenario, dtype, device)
    with forced_compute(compute):
        assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)


@pytest.mark.parametrize("pattern_name", ["window", "causal_window", "global_per_example", "bigbird"])
def test_auto_matches_oracle(pattern_name):
    pattern, q, k, v, kpm, keep = _case(pattern_name, "padded1025", torch.float32, "cpu")
    assert_close_to_reference("auto", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)


FLEX_CPU_QUICK = [("longformer", "square97"), ("causal_bigbird", "kvcache"), ("global_per_example", "padded1025"),
                  ("st_fixed", "padded1025")]


def _flex_case(pattern_name, scenario, dtype, device):
    pattern, q, k, v, kpm, keep = _case(pattern_name, scenario, dtype, device)
    grad = device != "cpu"
    assert_close_to_reference("flex", q, k, v, keep, grad=grad, pattern=pattern, key_padding_mask=kpm)


@pytest.mark.parametrize("pattern_name,scenario", FLEX_CPU_QUICK)
def test_flex_cpu_forward_matches_oracle(pattern_name, scenario):
    _flex_case(pattern_name, scenario, torch.float32, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_flex_matches_oracle_full_matrix(pattern_name, scenario, dtype, device):
    _flex_case(pattern_name, scenario, dtype, device)


@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_fully_masked_rows_are_zero_with_zero_grad(backend):
    b, h, n, d = 2, 2, 97, 40
    q, k, v = (t.requires_grad_() for t in qkv(b, h, n, n, d))
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[1] = False  # every key of example 1 is padding
    kpm[0, :50] = False  # causal rows 0..49 of example 0 see only padding
    out = la.attention(q, k, v, pattern=la.causal(la.sliding_window(20)), key_padding_mask=kpm, backend=backend)
    assert not out.isnan().any()
    assert (out[1] == 0).all() and (out[0, :, :50] == 0).all() and (out[0, :, 50:] != 0).any()
    out.sum().backward()
    for t in (q, k, v):
        assert not t.grad.isnan().any()
    assert (q.grad[1] == 0).all() and (q.grad[0, :, :50] == 0).all()


@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_empty_pattern_rows_when_queries_outnumber_keys(backend):
    q, k, v = qkv(1, 2, 40, 25, 16)
    out = la.attention(q, k, v, pattern=la.causal(), backend=backend)
    assert (out[:, :, :15] == 0).all() and not out.isnan().any()


@pytest.mark.parametrize("backend", ["dense", "blocked"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_combines_with_pattern(backend, kind):
    b, h, n, d = 2, 2, 97, 40
    q, k, v = qkv(b, h, n, n, d)
    gen = torch.Generator().manual_seed(1)
    extra = torch.rand(b, 1, n, n, generator=gen) > 0.3
    pattern = la.sliding_window(9) | la.global_tokens([3])
    keep = pattern.dense(n, num_heads=h) & extra
    if kind == "bool":
        assert_close_to_reference(backend, q, k, v, keep, pattern=pattern, attn_mask=extra)
    else:
        bias = torch.randn(b, 1, n, n, generator=gen).masked_fill(~extra, float("-inf"))
        assert_close_to_reference(backend, q, k, v, pattern.dense(n, num_heads=h), pattern=pattern, bias=bias)


@pytest.mark.parametrize("backend", ["dense", "blocked", "auto"])
def test_no_pattern_equals_sdpa(backend):
    q, k, v = qkv(2, 3, 97, 97, 40)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for pattern in (None, la.full()):
        torch.testing.assert_close(la.attention(q, k, v, pattern=pattern, backend=backend), expected)


def test_custom_scale_and_value_dim():
    q, k, _ = qkv(1, 2, 97, 97, 40)
    v = torch.randn(1, 2, 97, 24)
    keep = la.sliding_window(5).dense(97, num_heads=2)
    assert_close_to_reference("blocked", q, k, v, keep, pattern=la.sliding_window(5), scale=0.3)


def test_blocked_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 23, 23, 8, torch.float64))
    kpm = torch.ones(1, 23, dtype=torch.bool)
    kpm[0, -3:] = False
    pattern = la.causal(la.sliding_window(5)) | la.global_tokens([0])

    def fn(q, k, v):
        return la.attention(q, k, v, pattern=pattern, key_padding_mask=kpm, backend="blocked")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_blocked_gradcheck_with_heavy_rows_and_kvcache():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 9, 40, 4, torch.float64))
    pattern = la.bigbird(4, random_blocks=1) | la.global_tokens([37])

    def fn(q, k, v):
        return la.attention(q, k, v, pattern=pattern, backend="blocked")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_blocked_is_unbiased_and_seeded():
    q, k, v = qkv(1, 2, 64, 64, 8)
    pattern = la.sliding_window(8)
    torch.manual_seed(0)
    a = la.attention(q, k, v, pattern=pattern, dropout_p=0.5, backend="blocked")
    torch.manual_seed(0)
    b = la.attention(q, k, v, pattern=pattern, dropout_p=0.5, backend="blocked")
    torch.testing.assert_close(a, b)
    mean = torch.stack([la.attention(q, k, v, pattern=pattern, dropout_p=0.5, backend="blocked")
                        for _ in range(200)]).mean(0)
    expected = la.attention(q, k, v, pattern=pattern)
    assert (mean - expected).abs().mean() < 0.03  # inverted dropout keeps the expectation


def test_blocked_gradcheck_with_dropout_reseeded():
    """Dropout masks are regenerated in backward from the call's seed, so gradients are exact."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 19, 19, 4, torch.float64))

    def fn(q, k, v):
        torch.manual_seed(0)
        return la.attention(q, k, v, pattern=la.sliding_window(3), dropout_p=0.3, backend="blocked")

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_low_precision_row_offsets_are_exact(dropout_p, monkeypatch):
    """The extra columns that keep bf16 scores accurate (row maxima) change nothing exactly: float64 with
    them forced on equals the oracle and passes gradcheck, with dropout, key padding and a float bias."""
    monkeypatch.setattr("longattn.backends.blocked.kernel.ROW_OFFSETS_ALWAYS", True)
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 21, 21, 4, torch.float64))
    bias = torch.randn(1, 2, 21, 21, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 21, dtype=torch.bool)
    kpm[1, 10:] = False
    pattern = la.sliding_window(4) | la.global_tokens([20])

    def fn(q, k, v, bias):
        torch.manual_seed(0)
        return la.attention(q, k, v, pattern=pattern, attn_mask=bias, key_padding_mask=kpm, dropout_p=dropout_p,
                            backend="blocked")

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))
    if dropout_p == 0:
        expected = la.attention(q, k, v, pattern=pattern, attn_mask=bias, key_padding_mask=kpm, backend="dense")
        torch.testing.assert_close(fn(q, k, v, bias), expected)


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_bf16_attn_mask_and_dropout_in_each_compute_dtype(compute):
    """bf16 inputs with a float mask, and with dropout, whichever dtype the matmuls run in."""
    b, h, n, d = 2, 2, 97, 40
    q, k, v = qkv(b, h, n, n, d, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    extra = torch.rand(b, 1, n, n, generator=gen) > 0.3
    pattern = la.sliding_window(9) | la.global_tokens([3])
    bias = torch.randn(b, 1, n, n, generator=gen).masked_fill(~extra, float("-inf")).bfloat16()
    with forced_compute(compute):
        assert_close_to_reference("blocked", q, k, v, pattern.dense(n, num_heads=h), pattern=pattern, bias=bias)
        torch.manual_seed(0)
        a = la.attention(q, k, v, pattern=pattern, dropout_p=0.5, backend="blocked")
        torch.manual_seed(0)
        assert torch.equal(a, la.attention(q, k, v, pattern=pattern, dropout_p=0.5, backend="blocked"))
        assert not a.isnan().any()


def test_blocked_gradcheck_float_bias_with_grad():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 21, 21, 4, torch.float64))
    bias = torch.randn(1, 2, 21, 21, dtype=torch.float64, requires_grad=True)
    pattern = la.sliding_window(4) | la.global_tokens([20])

    def fn(q, k, v, bias):
        return la.attention(q, k, v, pattern=pattern, attn_mask=bias, backend="blocked")

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))
    head_shared = torch.randn(1, 1, 21, 21, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (q, k, v, head_shared))


@pytest.mark.parametrize("nq,nk", [(0, 7), (7, 0)])
def test_empty_sequences(nq, nk):
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, nq, nk, 8))
    out = la.attention(q, k, v, pattern=la.causal())
    assert out.shape == (1, 2, nq, 8) and not out.isnan().any() and (out == 0).all()
    out.sum().backward()
    assert (k.grad == 0).all() and (q.grad == 0).all()


@pytest.mark.parametrize("pattern_name", ["longformer", "global_per_example", "per_head", "causal_bigbird", "bigbird"])
def test_blocked_evaluates_large_masks_chunk_by_chunk(pattern_name, monkeypatch):
    """Schedules too large to cache (block-dense patterns at large N) evaluate their masks per chunk."""
    from longattn.backends.blocked import schedule

    monkeypatch.setattr(schedule, "SCHEDULE_MASK_BYTES", 0)
    la.clear_caches()
    pattern, q, k, v, kpm, keep = _case(pattern_name, "padded1025", torch.float32, "cpu")
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)
    la.clear_caches()


@pytest.mark.parametrize("pattern_name", ["longformer", "global_per_example", "bigbird", "per_head", "random"])
def test_blocked_head_groups_match_oracle(pattern_name, monkeypatch):
    """Tiles too wide for the cache run a few heads at a time: same result, gradients included."""
    from longattn.backends.blocked import kernel

    monkeypatch.setattr(kernel, "TILE_BYTES", 1)  # every tile split into single (example, head) groups
    la.clear_caches()
    pattern, q, k, v, kpm, keep = _case(pattern_name, "padded1025", torch.float32, "cpu")
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)
    la.clear_caches()


def test_blocked_schedule_reads_bands_in_place_and_gathers_the_rest():
    """A window is read as one in-place view per tile; a BigBird tile copies its window, global and random
    blocks into one operand, while its global rows read the sequence in place plus the global blocks'
    copy made once per call; a small window packs several query blocks into one tile."""
    from longattn.backends.blocked import get_schedule
    from longattn.patterns import Geometry

    cpu = torch.device("cpu")
    window = get_schedule(la.sliding_window(256), Geometry(4096, 4096, 12, 1), 64, cpu)
    middle = window.tiles[len(window.tiles) // 2]
    assert window.shared is None and middle.gather is None and len(middle.views) == 1
    start, stop = middle.views[0]
    r = middle.q_blocks.numel()  # query blocks per tile, chosen by the cost model
    assert stop - start == (r + 8) * 64 and middle.bias is not None  # 513 keys per row from an (r+8)-block band
    assert sum(t.bias is middle.bias for t in window.tiles) > len(window.tiles) // 2  # one mask, shared
    bb = get_schedule(la.bigbird(64, seed=0), Geometry(4096, 4096, 12, 1), 64, cpu)
    assert bb.shared_blocks.tolist() == [0, 63]
    light, heavy = bb.tiles[len(bb.tiles) // 2], bb.tiles[0]
    assert not light.views and not light.uses_shared and light.gather_blocks == 8
    assert light.bias is None  # block-exact: nothing to mask
    assert heavy.views == ((64, 63 * 64),) and heavy.uses_shared and heavy.gather is None
    small = get_schedule(la.sliding_window(2), Geometry(4096, 4096, 1, 1), 16, cpu)
    assert small.tiles[0].q_blocks.numel() > 1


def test_blocked_tiles_of_several_blocks_match_oracle():
    pattern = la.sliding_window(2) | la.global_tokens([40])
    q, k, v = qkv(1, 2, 1025, 1025, 40, torch.float32, "cpu")
    keep = pattern.dense(1025, num_heads=2)
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern)


def test_dense_runs_plain_sdpa_when_the_pattern_allows_everything():
    q, k, v = qkv(1, 2, 200, 200, 16, torch.float32, "cpu")
    out = la.attention(q, k, v, pattern=la.longformer(512), backend="dense")
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("pattern", [la.bigbird(2, random_blocks=1) | la.global_tokens([11]),
                                     la.bigbird(2, random_blocks=0)],
                         ids=["gathered", "views_and_shared"])
def test_blocked_gradcheck_head_groups_with_dropout_and_bias(pattern, monkeypatch):
    """Single (example, head) groups: dropout seeds, bias gradients and scatters stay exact."""
    from longattn.backends.blocked import kernel, schedule

    monkeypatch.setattr(kernel, "TILE_BYTES", 1)
    monkeypatch.setattr(schedule, "TILE_OVERHEAD_SCORES", 0)  # one query block per tile: every segment kind
    la.clear_caches()
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 14, 14, 3, torch.float64))
    bias = torch.randn(1, 1, 14, 14, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, bias):
        torch.manual_seed(0)
        return la.attention(q, k, v, pattern=pattern, attn_mask=bias, dropout_p=0.2, backend="blocked")

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))
    la.clear_caches()
