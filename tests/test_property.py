"""Hypothesis draws random patterns, compositions and shapes and compares every backend with the oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longattn as la
from conftest import assert_close_to_reference, qkv

HEADS = 2


def leaf(n_keys):
    return st.one_of(
        st.builds(la.sliding_window, st.integers(0, 12), st.integers(0, 12)),
        st.builds(la.dilated, st.integers(0, 5).map(lambda half: 2 * half), st.integers(1, 4)),  # even windows
        st.builds(lambda idx: la.global_tokens(idx), st.lists(st.integers(0, n_keys - 1), min_size=1, max_size=3)),
        st.builds(la.random_blocks, st.integers(0, 3), st.sampled_from([4, 8, 16]), st.integers(0, 99)),
        st.builds(la.bigbird, st.sampled_from([4, 8, 16]), st.sampled_from([1, 3]), st.integers(0, 2),
                  st.integers(0, 2), st.integers(0, 99)),  # window_blocks odd: centred on the own block
        st.builds(la.strided, st.integers(1, 12)),
        st.builds(la.fixed, st.sampled_from([4, 8, 12]), st.just(2)),
        st.just(la.causal()),
    )


def patterns(n_keys):
    return st.recursive(
        leaf(n_keys),
        lambda children: st.one_of(
            st.builds(lambda a, b: a | b, children, children),
            st.builds(lambda a, b: a & b, children, children),
            st.builds(la.causal, children),
            st.builds(lambda a, b: la.per_head([a, b]), children, children),
        ),
        max_leaves=4,
    )


@st.composite
def cases(draw):
    nk = draw(st.integers(1, 150))
    nq = draw(st.one_of(st.just(nk), st.integers(1, 150)))
    return nq, nk, draw(patterns(nk)), draw(st.booleans()), draw(st.sampled_from([8, 16, 32, None]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_patterns_match_oracle(case):
    nq, nk, pattern, pad, block = case
    q, k, v = qkv(2, HEADS, nq, nk, 8)
    kpm = None
    keep = pattern.dense(nq, nk, num_heads=HEADS, batch_size=2)
    if pad:
        kpm = torch.ones(2, nk, dtype=torch.bool)
        kpm[1, nk // 2:] = False
        keep = keep & kpm[:, None, None, :]
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)
    if block is not None:  # the exact block layout at any block size and alignment
        layout = pattern.block_layout(nq, nk, block=block, num_heads=HEADS)
        dense = pattern.dense(nq, nk, num_heads=HEADS).expand(HEADS, nq, nk)
        nqb, nkb = -(-nq // block), -(-nk // block)
        padded = torch.zeros(HEADS, nqb * block, nkb * block, dtype=torch.bool)
        padded[:, :nq, :nk] = dense
        assert torch.equal(layout, padded.view(HEADS, nqb, block, nkb, block).any(-1).any(-2))
        assert pattern.density(nq, nk, num_heads=HEADS, block=block) == pytest.approx(dense.float().mean().item())
