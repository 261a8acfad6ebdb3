"""The one table of named patterns: every preset builds, and every name an application used before the table
gives the same pattern as it did (LRA's variants, the benchmark's patterns, the language model's presets)."""

from __future__ import annotations

import pytest
import torch

import longattn as la
from longattn.patterns.topk_blocks import is_content_dependent
from longattn.tools.bench import BENCH_PATTERNS, DEFAULT_PATTERNS
from longattn.lra.attentions import ALIASES, ATTENTIONS, MIXERS, build_attention
from longattn.models.xl import PATTERN_PRESETS, resolve_pattern
from longattn.patterns import PRESETS, as_pattern, build_preset
from longattn.patterns.sparse_transformer import StrideColumns


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_says_what_it_is(name):
    p = PRESETS[name]
    assert p.name == name and p.description and "\n" not in p.description
    pattern = build_preset(name, 1024)
    assert pattern is None if name == "full" else isinstance(pattern, la.Pattern)
    if pattern is not None and is_content_dependent(pattern):  # no mask before a call: it says so
        with pytest.raises(ValueError, match="chooses its keys from q and k"):
            pattern.density(1024, num_heads=2)
    elif pattern is not None:  # applies at that length, on a head count every preset divides
        assert 0 < pattern.density(1024, num_heads=2) <= 1


# The patterns each name gave before the table existed, written with the constructors.
LRA_BEFORE = {
    "local": lambda n: la.sliding_window(128),
    "longformer": lambda n: la.longformer(512, global_idx=[0]),
    "bigbird": lambda n: la.bigbird(64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0),
    "strided": lambda n: la.per_head([la.sliding_window(round(n ** 0.5) - 1), StrideColumns(round(n ** 0.5))],
                                     name=f"strided_bidirectional_{round(n ** 0.5)}"),
    "fixed": lambda n: la.fixed(round(n ** 0.5), 8),
}
BENCH_BEFORE = {
    "longformer_512": la.longformer(512),
    "bigbird_64": la.bigbird(64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0),
    "strided_128_causal": la.sparse_transformer("strided", stride=128),
    "strided_64": la.strided(64),
    "fixed_128_8": la.fixed(128, 8),
}
LM_BEFORE = {
    "window": "sliding_window(255, 0)",
    "strided": "strided(32)",
    "fixed": "fixed(32, 4)",
    "bigbird": "bigbird(block=32, seed=0)",
}


def _same(a, b):
    assert a == b and a.key == b.key and a.name == b.name, (a, b)


@pytest.mark.parametrize("n", [97, 1025, 4097])
def test_lra_variants_are_what_they_were(n):
    assert set(ATTENTIONS) - set(MIXERS) <= set(PRESETS) and build_attention("full", n) is None
    for name, before in LRA_BEFORE.items():
        _same(build_attention(name, n), before(n))
    for alias, name in ALIASES.items():
        assert build_attention(alias, n) == build_attention(name, n)
    _same(build_attention("local", n, {"window": 32}), la.sliding_window(16))
    _same(build_attention("longformer", n, {"window": 32}), la.longformer(32, global_idx=[0]))
    _same(build_attention("strided", n, {"stride": 8}), LRA_BEFORE["strided"](64))
    _same(build_attention("fixed", n, {"block": 4, "c": 8}), la.fixed(4, 4))  # c is capped at the block


def test_bench_and_lm_names_are_what_they_were():
    assert list(DEFAULT_PATTERNS) == list(BENCH_BEFORE)
    assert set(DEFAULT_PATTERNS) <= set(BENCH_PATTERNS) and "full" not in BENCH_PATTERNS
    for name, before in BENCH_BEFORE.items():
        _same(build_preset(name, 4096), before)  # what bench runs at N = 4096
        _same(as_pattern(name), before)
    assert PATTERN_PRESETS["full"] is None and resolve_pattern("full") is None
    for name, text in LM_BEFORE.items():
        assert PATTERN_PRESETS[name] in PRESETS
        _same(resolve_pattern(name), la.parse_pattern(text))
    # One name, two applications: LRA's encoders read both ways, the LM runs the paper's causal factors.
    assert build_attention("strided", 1024) != resolve_pattern("strided")


def test_as_pattern_takes_patterns_presets_and_expressions():
    p = la.sliding_window(4)
    assert as_pattern(p) is p and as_pattern(None) is None and as_pattern("full") is None
    _same(as_pattern("bigbird"), la.bigbird())  # a preset name wins over the bare constructor; same pattern
    _same(as_pattern("causal"), la.causal())
    _same(as_pattern("longformer", window=64), la.longformer(64))
    _same(as_pattern("strided", 16), LRA_BEFORE["strided"](16))
    _same(as_pattern("causal(sliding_window(3)) | global_tokens([0])"),
          la.causal(la.sliding_window(3)) | la.global_tokens([0]))
    with pytest.raises(ValueError, match="bad settings"):
        as_pattern("local", widow=3)
    with pytest.raises(ValueError, match="apply to preset names only"):
        as_pattern("sliding_window(3)", window=4)
    with pytest.raises(ValueError, match="unknown pattern 'windowed'"):
        as_pattern("windowed")
    with pytest.raises(ValueError, match="give n, or the 'stride' setting"):
        as_pattern("strided")
    with pytest.raises(ValueError, match="unknown preset"):
        build_preset("performer")
    with pytest.raises(TypeError, match="pattern must be"):
        as_pattern(3)


def test_window_means_longformers_w_in_every_preset():
    _same(build_preset("local", window=512), la.sliding_window(256))
    _same(build_preset("longformer", window=512), la.sliding_window(256))
    assert torch.equal(build_preset("longformer", window=8, dilation=2).dense(40), la.dilated(8, 2).dense(40))
    for name in ("local", "longformer"):
        with pytest.raises(ValueError, match="window must be even"):
            build_preset(name, window=511)
    with pytest.raises(ValueError, match="window_blocks must be odd"):
        build_preset("bigbird", window_blocks=2)
    _same(build_preset("lookback", keys=4), la.sliding_window(3, 0))


def test_register_accepts_a_preset_name():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface

    from longattn.integrations.hf import register

    assert register("longattn_test_preset", "longformer_512") == "longattn_test_preset"
    assert AttentionInterface()["longattn_test_preset"].__name__ == "longattn_attention_sliding_window_256"
    register("longattn_test_preset", "full")  # the full preset: a Pattern, not None
    assert AttentionInterface()["longattn_test_preset"].__name__ == "longattn_attention_full"
