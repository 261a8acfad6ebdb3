"""Pattern definitions (DESIGN.md's table) against brute-force loops, layouts, names, composition."""

from __future__ import annotations

import dataclasses
import itertools
import pickle

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import longattn as la
from longattn.patterns.combiner import combiner_axial, combiner_fixed, combiner_logsparse
from longattn.patterns import Geometry, get_plan
from longattn.patterns._base import Snapshot
from longattn.patterns.sparse_transformer import SameBlock, StrideColumns, SummaryColumns
from longattn.patterns.compressed import compressed_causal
from longattn.patterns.full import Empty
from longattn.patterns.topk_blocks import is_content_dependent


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
    (la.dilated(6, 2), lambda h, i, j: any(j == i + k * 2 for k in range(-3, 4))),
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


# ---- identity: key, equality, hash and name derived from the dataclass fields -----------------------------

def _mask(*true):
    flags = torch.zeros(2, 8, dtype=torch.bool)
    for b, n in true:
        flags[b, n] = True
    return flags


#: one instance of every pattern class (test_every_pattern_class_is_sampled keeps it complete)
IDENTITY_SAMPLES = [
    la.full(), la.causal(), la.sliding_window(3, 1), la.dilated(4, 2), la.global_tokens([0, 7]),
    la.global_tokens(_mask((0, 1), (1, 5))), la.random_blocks(2, 8, seed=1), la.bigbird(8, random_blocks=1),
    StrideColumns(4), SameBlock(8), SummaryColumns(16, 3), la.window_2d(1, 2, 4),
    la.sliding_window(1) | la.global_tokens([0]), la.sliding_window(2) & la.dilated(8, 2),
    la.per_head([la.causal(), la.sliding_window(1)], name="two_heads"), la.documents([3, 4]),
    combiner_fixed(4, 2), combiner_logsparse(8, causal=True), combiner_axial(4, 8),  # built for 8 tokens
    la.topk_blocks(2, 4), la.topk_blocks(1, 2, causal=True) | la.sliding_window(1), compressed_causal(4, 2, 1),
    Empty(),
]


def _changed(value):
    """Another valid value of a field (ints move by 2 so that even windows stay even, odd blocks odd)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2
    if value is None:
        return 2
    if isinstance(value, Snapshot):
        flipped = value.tensor.clone()
        flipped[0, 0] = ~flipped[0, 0]
        return flipped
    if isinstance(value, tuple) and all(isinstance(v, la.Pattern) for v in value):
        return value[:-1] + (la.sliding_window(99),)
    if isinstance(value, tuple):
        return value + (max(value, default=0) + 1,)
    raise AssertionError(f"no other value known for {value!r}: extend _changed for this field type")


def _pattern_classes(cls=la.Pattern):
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("longattn.patterns"):
            yield sub
        yield from _pattern_classes(sub)


def test_every_pattern_class_is_sampled():
    sampled = {type(p) for p in IDENTITY_SAMPLES}
    missing = {c.__name__ for c in _pattern_classes() if dataclasses.is_dataclass(c) and not c.__name__.startswith("_")
               and c not in sampled}
    assert not missing, f"add an instance of {sorted(missing)} to IDENTITY_SAMPLES"
    plain = {c.__name__ for c in _pattern_classes() if not dataclasses.is_dataclass(c) and not c.__subclasses__()}
    plain -= {"SelectedBlocks"}  # one call's chosen blocks, held by value: never cached, so it has no derived key
    assert not plain, f"{sorted(plain)}: a pattern class is a @pattern_dataclass (only abstract bases are plain)"


@pytest.mark.parametrize("pattern", IDENTITY_SAMPLES, ids=[p.name for p in IDENTITY_SAMPLES])
def test_key_changes_with_every_field(pattern):
    fields = [f for f in dataclasses.fields(pattern) if f.compare]
    assert fields or type(pattern) in (type(la.full()), type(la.causal()), Empty)
    for f in fields:
        other = dataclasses.replace(pattern, **{f.name: _changed(getattr(pattern, f.name))})
        assert other.key != pattern.key and other != pattern, f"{type(pattern).__name__}.{f.name} is not in its key"
        # A per-example mask has one name; a given name (label) stays as given.
        if not isinstance(getattr(pattern, f.name), Snapshot) and getattr(pattern, "label", None) is None:
            assert other.name != pattern.name, f"{type(pattern).__name__}.{f.name} is not in its name"


@pytest.mark.parametrize("pattern", IDENTITY_SAMPLES, ids=[p.name for p in IDENTITY_SAMPLES])
def test_equal_parameters_give_equal_identity(pattern):
    twin = dataclasses.replace(pattern)  # built again from the same parameters
    again = pickle.loads(pickle.dumps(pattern))
    for p in (twin, again):
        assert p is not pattern and p == pattern and p.key == pattern.key and hash(p) == hash(pattern)
        assert p.name == pattern.name and repr(p) == pattern.name
        kv = 8 + getattr(pattern, "slots", 0)  # Combiner's keys: [summary slots; the 8 tokens]
        if is_content_dependent(pattern):  # no mask before a call
            continue
        assert torch.equal(p.dense(8, kv, num_heads=2, batch_size=2), pattern.dense(8, kv, num_heads=2, batch_size=2))
    hash(pattern.key)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(pattern, dataclasses.fields(pattern)[0].name if dataclasses.fields(pattern) else "x", 1)


def test_given_names_are_kept_and_take_no_part_in_the_key():
    parts = [la.sliding_window(2, 0), StrideColumns(4)]
    named, plain = la.per_head(parts, name="strided_4"), la.per_head(parts)
    assert (named.name, plain.name) == ("strided_4", "per_head[sliding_window_2_0, stride_columns_4]")
    assert named.key == plain.key and named == plain
    assert la.sparse_transformer("fixed", block=4, c=2, heads="merged").name == "causal(fixed_4_2_merged)"
    # A named union stays one part of an outer union (its name survives); unnamed ones flatten.
    outer = la.sparse_transformer("fixed", block=4, c=2, heads="merged", causal=False) | la.full()
    assert outer.name == "(fixed_4_2_merged | full)" and len(outer.parts) == 2


def test_a_plain_subclass_keeps_working():
    """Patterns that hold data without a content key (the factored backend's summary keys) stay plain
    classes: they name themselves in __init__, are never cached (key None) and are equal only to themselves."""

    class Band(la.Pattern):
        def __init__(self, reach):
            self.reach, self.name = reach, f"band_{reach}"

        def _allowed_fn(self, geo, device):
            return lambda b, h, i, j: (i - j).abs() <= self.reach

    band = Band(2)
    assert band.name == repr(band) == "band_2" and band.key is None and band != Band(2) and band == band
    assert (band | la.causal()).key is None and la.per_head([band, la.full()]).key is None
    assert torch.equal(band.dense(9), la.sliding_window(2).dense(9))


def test_windows_are_longformers_and_never_rounded():
    assert la.longformer(512) == la.sliding_window(256)
    assert torch.equal(la.dilated(512, 1).dense(600), la.sliding_window(256).dense(600))
    for make in (lambda: la.longformer(511), lambda: la.dilated(511, 2), lambda: la.longformer(7, dilation=2)):
        with pytest.raises(ValueError, match="window must be even"):
            make()
    with pytest.raises(ValueError, match="window_blocks must be odd"):
        la.bigbird(16, window_blocks=4)
