"""Packed documents: the ``documents`` pattern against its definition and the oracle, packing helpers, and a
packed Longformer batch against each document run alone."""

from __future__ import annotations

import pytest
import torch

import longattn as la
from conftest import assert_close_to_reference, qkv
from longattn.models.longformer import LongformerConfig, LongformerModel
from longattn.models.packing import document_positions, pack, unpack
from longattn.patterns import Geometry, get_plan
from longattn.patterns.documents import PAD, segment_ids


def _brute(ids, nq, nk):
    """i attends j when both are in one document (ids bottom-right aligned, PAD in none)."""
    ids = torch.nn.functional.pad(ids, (0, nk - ids.numel()), value=PAD)
    i = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None, :]
    return (ids[i] == ids[j]) & (ids[j] != PAD)


@pytest.mark.parametrize("nq", [13, 5, 1])
def test_documents_matches_definition(nq):
    lengths = [4, 6, 2]  # 12 of 13 positions: the last is in no document
    pattern = la.documents(lengths)
    assert pattern.name == "documents_4,6,2"
    expected = _brute(segment_ids(lengths), nq, 13)
    assert torch.equal(pattern.dense(nq, 13)[0], expected)
    for block in (1, 3, 4, 7):
        plan = get_plan(pattern, Geometry(nq, 13, 1, 1), block, torch.device("cpu"))
        nqb, nkb = -(-nq // block), -(-13 // block)
        padded = torch.zeros(nqb * block, nkb * block, dtype=torch.bool)
        padded[:nq, :13] = expected
        truth = padded.view(nqb, block, nkb, block).any(-1).any(-2)
        assert torch.equal(plan.layout()[0, 0], truth)


def test_documents_per_example_and_composed():
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, -1, -1]])
    pattern = la.documents(segment_ids=ids) & la.sliding_window(1)
    dense = pattern.dense(8, batch_size=2)
    assert dense.shape == (2, 1, 8, 8)
    for b in range(2):
        window = (torch.arange(8)[:, None] - torch.arange(8)[None, :]).abs() <= 1
        assert torch.equal(dense[b, 0], _brute(ids[b], 8, 8) & window)
    assert la.documents([[2, 3], [5]]) == la.documents(segment_ids=torch.tensor([[0, 0, 1, 1, 1], [0] * 5]))
    parsed = la.parse_pattern("documents([3, 4]) & sliding_window(2)")
    assert parsed == la.documents([3, 4]) & la.sliding_window(2)


@pytest.mark.parametrize("scenario", ["square97", "padded1025"])
@pytest.mark.parametrize("backend", ["blocked", "auto"])
def test_documents_backends_match_oracle(scenario, backend):
    b, h, n, d = (2, 2, 97, 40) if scenario == "square97" else (2, 2, 1025, 40)
    q, k, v = qkv(b, h, n, n, d)
    lengths = [[n // 3, n // 2], [n - 7]] if scenario == "square97" else [[300, 212, 400], [700, 325]]
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[1, n // 2: n // 2 + 10] = False
    for pattern in (la.documents(lengths), la.causal(la.documents(lengths) & la.sliding_window(32))):
        keep = pattern.dense(n, num_heads=h, batch_size=b) & kpm[:, None, None, :]
        assert_close_to_reference(backend, q, k, v, keep, pattern=pattern, key_padding_mask=kpm)


def test_documents_rejects_bad_input():
    with pytest.raises(ValueError, match="contiguous run"):
        la.documents(segment_ids=torch.tensor([0, 0, 1, 0]))
    with pytest.raises(ValueError, match="either lengths or segment_ids"):
        la.documents()
    with pytest.raises(ValueError, match="positive ints"):
        la.documents([3, 0])
    with pytest.raises(TypeError, match="integer tensor"):
        la.documents(segment_ids=torch.zeros(4))
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="at most the key length 5"):
        la.attention(q, q, q, pattern=la.documents([3, 3]))


def test_pack_unpack_and_positions():
    docs = [torch.arange(1, 6), torch.arange(10, 13), torch.arange(20, 27), torch.tensor([30])]
    packed = pack(docs, row_len=8)
    assert packed.rows == (0, 0, 1, 1) and packed.starts == (0, 5, 0, 7)
    assert packed.input_ids.shape == (2, 8)
    for doc, got in zip(docs, unpack(packed.input_ids, packed)):
        assert torch.equal(doc, got)
    assert torch.equal(packed.positions, document_positions(packed.segment_ids))
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    with pytest.raises(ValueError, match="does not fit"):
        pack(docs, row_len=4)


def test_packed_longformer_equals_each_document_alone():
    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, attention_window=[8, 8], max_position_embeddings=200)
    model = LongformerModel(cfg).eval()
    docs = [torch.randint(3, 50, (n,)) for n in (37, 90, 5, 61)]
    packed = pack(docs, row_len=128)
    starts = torch.zeros_like(packed.input_ids)
    starts[packed.first_tokens] = 1  # each document's first token is global, as a CLS
    with torch.no_grad():
        out = model(packed.input_ids, attention_mask=packed.real.long(), global_attention_mask=starts,
                    segment_ids=packed.segment_ids).last_hidden_state
        for doc, got in zip(docs, unpack(out, packed)):
            flags = torch.zeros(1, doc.numel(), dtype=torch.long)
            flags[0, 0] = 1
            alone = model(doc[None], global_attention_mask=flags).last_hidden_state[0]
            torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        model(packed.input_ids, segment_ids=packed.segment_ids[:, :5])


def test_longdoc_packed_benchmark_small(tmp_path):
    from longattn.longdoc.packed import PackedSettings, packed_table, run_packed

    settings = PackedSettings(documents=6, max_len=512, layers=1, dim=32, heads=2, window=16, min_run_time=0.01,
                              rounds=1)
    result = run_packed(settings, out=tmp_path)
    assert (tmp_path / "packed.json").exists()
    assert result["max_abs_diff"] < 1e-4
    assert result["packed"]["tokens"] <= result["padded"]["tokens"]
    assert result["real_tokens"] == sum(result["lengths"])
    assert "packed" in packed_table(result)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_lra_encoder_equals_each_document_alone(pooling):
    from longattn.models.encoder import EncoderConfig, SparseEncoderClassifier

    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=20, num_classes=3, max_len=64, dim=16, heads=2, depth=2, qkv_dim=16, ffn_dim=32,
                        pooling=pooling)
    model = SparseEncoderClassifier(cfg, la.causal(la.sliding_window(4)) | la.sliding_window(2)).eval()
    docs = [torch.randint(1, 20, (n,)) for n in (9, 40, 3, 64, 17)]
    with torch.no_grad():
        packed = model.encode_documents(docs, row_len=70)
        for doc, got in zip(docs, packed):
            alone = model.encode(doc[None], torch.tensor([doc.numel()]))[0]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="absolute positions"):
        SparseEncoderClassifier(cfg, la.global_tokens([0]) | la.sliding_window(2)).encode_documents(docs)
