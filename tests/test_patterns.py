"""Pattern definitions (DESIGN.md's table) against brute-force loops, layouts, names, composition."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import longattn as la
from longattn.patterns import Geometry, get_plan


def brute(rule, nq, nk, heads=1):
    """(H, Nq, Nk) from a Python predicate rule(h, i, j) on absolute positions."""
    off = nk - nq
    out = torch.zeros(heads, nq, nk, dtype=torch.bool)
    for h, r, j in itertools.product(range(heads), range(nq), range(nk)):
        out[h, r, j] = bool(rule(h, r + off, j))
    return out


DEFINITIONS = [
    (la.sliding_window(3), lambda h, i, j: i - 3 <= j <= i + 3),
    (la.sliding_window(2, 0), lambda h, i, j: i - 2 <= j <= i),
    (la.dilated(4, 3), lambda h, i, j: any(j == i + k * 3 for k in range(-2, 3))),
    (la.dilated(5, 2), lambda h, i, j: any(j == i + k * 2 for k in range(-2, 3))),
    (la.global_tokens([0, 7]), lambda h, i, j: i in (0, 7) or j in (0, 7)),
    (la.strided(4), lambda h, i, j: (i - 4 < j <= i) if h % 2 == 0 else (i - j) % 4 == 0),
    (la.fixed(4, 1), lambda h, i, j: (j // 4 == i // 4) if h % 2 == 0 else j % 4 >= 3),
    (la.causal(), lambda h, i, j: j <= i),
    (la.causal(la.sliding_window(2)), lambda h, i, j: i - 2 <= j <= i),
    (la.sparse_transformer("strided", stride=3), lambda h, i, j: j <= i and ((i - 3 < j) if h % 2 == 0 else (i - j) % 3 == 0)),
    (la.sparse_transformer("fixed", block=4, c=2, heads="merged"),
     lambda h, i, j: j <= i and (j // 4 == i // 4 or j % 4 >= 2)),
    (la.longformer(4, global_idx=[2]), lambda h, i, j: abs(i - j) <= 2 or i == 2 or j == 2),
    (la.longformer(4, dilation=2), lambda h, i, j: abs(i - j) <= 4 and (i - j) % 2 == 0),
    (la.sliding_window(1) | la.global_tokens([5]), lambda h, i, j: abs(i - j) <= 1 or i == 5 or j == 5),
    (la.sliding_window(4) & la.dilated(8, 2), lambda h, i, j: abs(i - j) <= 4 and (i - j) % 2 == 0),
    (la.per_head([la.causal(), la.sliding_window(1)]), lambda h, i, j: j <= i if h % 2 == 0 else abs(i - j) <= 1),
    (la.full(), lambda h, i, j: True),
]


@pytest.mark.parametrize("pattern,rule", DEFINITIONS, ids=[p.name for p, _ in DEFINITIONS])
@pytest.mark.parametrize("nq,nk", [(13, 13), (5, 13), (13, 9)])
def test_definition_matches_brute_force(pattern, rule, nq, nk):
    heads = 4
    assert torch.equal(pattern.dense(nq, nk, num_heads=heads).expand(heads, nq, nk), brute(rule, nq, nk, heads))


def test_causal_alignment_is_bottom_right():
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(la.causal().dense(2, 5)[0], expected)


def test_per_example_global_tokens():
    flags = torch.zeros(2, 10, dtype=torch.bool)
    flags[0, 1] = flags[1, 8] = True
    dense = la.global_tokens(flags).dense(10, num_heads=1, batch_size=2)
    assert dense.shape == (2, 1, 10, 10)
    assert dense[0, 0, 1].all() and dense[0, 0, :, 1].all() and not dense[0, 0, 8].all()
    assert dense[1, 0, 8].all() and dense[1, 0, :, 8].all() and not dense[1, 0, 1].all()


def _block_truth(pattern, nq, nk, block, heads, batch):
    dense = pattern.dense(nq, nk, num_heads=heads, batch_size=batch)
    dense = dense if dense.dim() == 4 else dense.unsqueeze(0)
    nqb, nkb = -(-nq // block), -(-nk // block)
    padded = torch.zeros(*dense.shape[:2], nqb * block, nkb * block, dtype=torch.bool)
    padded[..., :nq, :nk] = dense
    return padded.view(*dense.shape[:2], nqb, block, nkb, block).any(-1).any(-2)


BLOCK_PATTERNS = [p for p, _ in DEFINITIONS] + [
    la.random_blocks(2, 8, seed=1), la.bigbird(8), la.causal(la.bigbird(8, random_blocks=1)),
    la.global_tokens([0, 40]) | la.sliding_window(3), la.strided(16), la.fixed(16, 3),
]


@pytest.mark.parametrize("pattern", BLOCK_PATTERNS, ids=[p.name for p in BLOCK_PATTERNS])
@pytest.mark.parametrize("nq,nk,block", [(97, 97, 16), (41, 97, 8), (97, 97, 7), (64, 45, 16)])
def test_block_layout_is_exact(pattern, nq, nk, block):
    if "global_tokens_0,40" in pattern.name and nk <= 40:
        pytest.skip("index beyond the keys")
    layout = pattern.block_layout(nq, nk, block=block, num_heads=4)
    truth = _block_truth(pattern, nq, nk, block, 4, 1)[0]
    assert torch.equal(layout, truth.expand_as(layout))
    plan = get_plan(pattern, Geometry(nq, nk, 4, 1), block, torch.device("cpu"))
    dense = pattern.dense(nq, nk, num_heads=4).expand(4, nq, nk)
    assert plan.allowed_pairs * 4 // plan.kv_index.shape[1] == int(dense.sum())
    assert pattern.density(nq, nk, num_heads=4, block=block) == pytest.approx(dense.float().mean().item())


@pytest.mark.parametrize("pattern", BLOCK_PATTERNS[:12], ids=[p.name for p in BLOCK_PATTERNS[:12]])
def test_mask_mod_works_under_flex_vmap(pattern):
    nq, nk = 37, 50
    mask = create_mask(pattern.mask_mod(nq, nk, num_heads=2), 1, 2, nq, nk, device="cpu")
    assert torch.equal(mask[0], pattern.dense(nq, nk, num_heads=2).expand(2, nq, nk))
    assert pattern.mask_mod(nq, nk, num_heads=2).__name__ == pattern.name


def test_bigbird_structure():
    nb, block, heads = 12, 4, 3
    layout = la.bigbird(block, random_blocks=2, seed=5).block_layout(nb * block, block=block, num_heads=heads)
    assert layout.shape == (heads, nb, nb)
    assert layout[:, 0].all() and layout[:, -1].all() and layout[:, :, 0].all() and layout[:, :, -1].all()
    band = (torch.arange(nb)[:, None] - torch.arange(nb)).abs() <= 1
    assert (layout | ~band).all()
    # Interior rows: 3 window + 2 global + exactly 2 random blocks, all distinct.
    assert (layout[:, 2:-2].sum(-1) == 7).all()
    assert not torch.equal(layout[0], layout[1]), "random blocks should differ per head"
    again = la.bigbird(block, random_blocks=2, seed=5).block_layout(nb * block, block=block, num_heads=heads)
    other = la.bigbird(block, random_blocks=2, seed=6).block_layout(nb * block, block=block, num_heads=heads)
    assert torch.equal(layout, again) and not torch.equal(layout, other)


def test_random_blocks_count_and_seed():
    layout = la.random_blocks(3, 8, seed=2).block_layout(80, block=8, num_heads=2)
    assert (layout.sum(-1) == 3).all()
    dense = la.random_blocks(3, 8, seed=2).dense(80, num_heads=2)
    assert (dense.sum(-1) == 24).all()  # every key of each chosen block


def test_names_are_readable():
    assert la.sliding_window(256).name == "sliding_window_256"
    assert la.causal(la.sliding_window(4)).name == "causal(sliding_window_4)"
    assert (la.sliding_window(4) | la.global_tokens([0])).name == "(sliding_window_4 | global_tokens_0)"
    assert la.strided(128).name == "strided_128"


def test_composition_flattens_and_keys():
    p = la.sliding_window(1) | la.sliding_window(2) | la.global_tokens([0])
    assert len(p.parts) == 3
    assert p.key == (la.sliding_window(1) | la.sliding_window(2) | la.global_tokens([0])).key
    flags = torch.zeros(2, 6, dtype=torch.bool)
    flags[1, 3] = True
    same, other = flags.clone(), flags.clone()
    other[0, 0] = True
    assert la.global_tokens(flags).key == la.global_tokens(same).key != la.global_tokens(other).key
    pattern = la.global_tokens(flags)
    key, dense = pattern.key, pattern.dense(6, batch_size=2)
    flags[0, 1] = True  # the pattern took a snapshot: later edits change nothing
    assert pattern.key == key and torch.equal(pattern.dense(6, batch_size=2), dense)


def test_parse_pattern_round_trip():
    p = la.parse_pattern("causal(sliding_window(3)) | global_tokens([0, 2])")
    q = la.causal(la.sliding_window(3)) | la.global_tokens([0, 2])
    assert torch.equal(p.dense(11), q.dense(11))
    with pytest.raises(ValueError, match="unsupported expression"):
        la.parse_pattern("os.system('x')")
    with pytest.raises(ValueError, match="unknown constructor"):
        la.parse_pattern("evil(3)")


def test_lru_cache_bounds_entries_and_bytes():
    from longattn.patterns.layout import LRUCache

    cache = LRUCache(3, max_bytes=10, size_of=len)
    for key in "abc":
        cache.get_or_build(key, lambda key=key: key * 4)  # 4 bytes each
    assert list(cache._data) == ["b", "c"]  # "a" evicted: 12 bytes > 10
    assert cache.get_or_build("b", lambda: "new") == "bbbb"  # hit, and now the newest
    cache.get_or_build("big", lambda: "x" * 50)  # larger than the budget: kept alone
    assert list(cache._data) == ["big"]
    calls = []
    cache.get_or_build(None, lambda: calls.append(1))
    cache.get_or_build(None, lambda: calls.append(1))
    assert len(calls) == 2  # None keys are never cached


def test_mixed_head_periods_use_their_lcm():
    two = la.per_head([la.causal(), la.sliding_window(1)])
    three = la.per_head([la.global_tokens([0]), la.sliding_window(0), la.full()])
    union = two | three
    assert union.head_period == 6
    rules = [lambda h, i, j: j <= i, lambda h, i, j: abs(i - j) <= 1]
    rules3 = [lambda h, i, j: i == 0 or j == 0, lambda h, i, j: i == j, lambda h, i, j: True]
    truth = brute(lambda h, i, j: rules[h % 2](h, i, j) or rules3[h % 3](h, i, j), 13, 13, heads=12)
    assert torch.equal(union.dense(13, num_heads=12), truth)
    layout = union.block_layout(13, block=4, num_heads=12)
    assert torch.equal(layout, _block_truth(union, 13, 13, 4, 12, 1)[0])
