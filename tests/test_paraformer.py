"""The Paraformer-style retriever: packed scoring against a naive per-(query, document) loop, padding
invariance, the sparse pattern's reach, the identity start, gradients, chunked encoding, backends, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longattn.models import DocumentStates, ParaformerConfig, ParaformerRetriever, pad_documents

C = 16


def _config(**overrides) -> ParaformerConfig:
    base = dict(dim=C, heads=2, window=4, globals=2, depth=1, ffn_dim=24, dropout=0.0)
    return ParaformerConfig(**{**base, **overrides})


def _model(seed=0, backend="auto", **overrides) -> ParaformerRetriever:
    """A float64 model with every parameter moved off its initial value, so that no branch is the identity."""
    torch.manual_seed(seed)
    model = ParaformerRetriever(_config(**overrides), backend=backend, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _documents(lengths, slots=None, seed=1):
    """``sentences (D, S, C)`` float64 with junk (NaN, huge values) in the padding, and ``mask (D, S)``."""
    gen = torch.Generator().manual_seed(seed)
    slots = max(lengths) if slots is None else slots
    sentences = torch.randn(len(lengths), slots, C, generator=gen, dtype=torch.float64)
    mask = torch.arange(slots) < torch.tensor(lengths)[:, None]
    junk = torch.full_like(sentences, float("nan"))
    junk[..., ::2] = 1e30
    return torch.where(mask[..., None], sentences, junk), mask


def _queries(b=3, seed=2):
    return torch.randn(b, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _naive_states(model, sentences):
    """``(G + S_d, C)`` final states of one document's real sentences ``(S_d, C)``, attention spelled out densely."""
    cfg = model.config
    g, reach, heads, hd = cfg.globals, cfg.window // 2, cfg.heads, cfg.dim // cfg.heads
    x = torch.cat([model.global_tokens, sentences])
    n = x.shape[0]
    i = torch.arange(n)
    allowed = ((i[:, None] - i[None, :]).abs() <= reach) | (i[:, None] < g) | (i[None, :] < g)  # (n, n)
    for layer in model.layers:
        q, k, v = layer.attn.qkv(layer.norm1(x)).view(n, 3, heads, hd).unbind(1)  # 3 x (n, H, hd)
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + layer.attn.proj(torch.einsum("hij,jhd->ihd", probs, v).reshape(n, -1))
        x = x + layer.mlp(layer.norm2(x))
    return torch.cat([x[:g] - model.global_tokens, x[g:]])


def _naive_score(model, query, states):
    logits = torch.stack([model.query(query) @ model.key(s) / math.sqrt(model.config.dim) for s in states])
    pooled = sum(w * model.value(s) for w, s in zip(logits.softmax(0), states))
    return F.cosine_similarity(query, pooled, dim=0) * model.logit_scale.exp()


def test_shapes_and_packing():
    model = _model()
    sentences, mask = _documents([5, 0, 3], slots=6)
    docs = model.encode_documents(sentences, mask)
    assert docs.states.shape == (2 + 5 + 2 + 3, C) and docs.count == 3
    assert docs.doc.tolist() == [0] * 7 + [2] * 5
    assert docs.position.tolist() == [-1, -2, 0, 1, 2, 3, 4, -1, -2, 0, 1, 2]
    scores = model.score(_queries(4), docs)
    assert scores.shape == (4, 3) and scores.dtype == torch.float64
    assert torch.isfinite(scores[:, [0, 2]]).all() and (scores[:, 1] == float("-inf")).all()
    assert torch.equal(model(_queries(4), sentences, mask), scores)
    empty = model.encode_documents(sentences[1:2], mask[1:2])  # no row at all: T = 0
    assert empty.states.shape == (0, C) and (model.score(_queries(4), empty) == float("-inf")).all()

    padded, pad_mask = pad_documents([sentences[0, :5], sentences[1, :0], sentences[2, :3]])
    assert padded.shape == (3, 5, C) and pad_mask.sum(1).tolist() == [5, 0, 3]
    torch.testing.assert_close(model.score(_queries(4), model.encode_documents(padded, pad_mask)), scores)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_packed_scores_equal_a_naive_loop(depth):
    model = _model(depth=depth)
    lengths = [7, 1, 12, 4]
    sentences, mask = _documents(lengths)
    queries = _queries()
    scores = model(queries, sentences, mask)
    with torch.no_grad():
        expected = torch.stack([torch.stack([_naive_score(model, q, _naive_states(model, sentences[d, :n]))
                                             for d, n in enumerate(lengths)]) for q in queries])
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-10)


def test_padding_sentences_never_change_scores():
    model = _model(depth=2)
    sentences, mask = _documents([6, 2, 9])
    junk = torch.full((3, 8, C), float("nan"), dtype=torch.float64)
    junk[:, ::2] = -1e30
    wide = torch.cat([sentences, junk], 1)  # the same sentences, 8 more junk slots each
    wide_mask = torch.cat([mask, torch.zeros(3, 8, dtype=torch.bool)], 1)
    queries = _queries()
    torch.testing.assert_close(model(queries, wide, wide_mask), model(queries, sentences, mask), rtol=1e-12,
                               atol=1e-12)


def _influence(model, sentences, mask):
    """changed[i, j]: perturbing sentence j changes row i (global rows first) of the one document."""
    base = model.encode_documents(sentences, mask).states
    changed = []
    for j in range(int(mask.sum())):
        moved = sentences.clone()
        moved[0, j] += torch.randn(C, dtype=moved.dtype)  # not a constant shift, which LayerNorm removes
        changed.append((model.encode_documents(moved, mask).states - base).abs().amax(-1) > 1e-9)
    return torch.stack(changed, 1)  # (G + S, S)


def test_a_sentence_state_depends_only_on_its_window_and_the_globals():
    sentences, mask = _documents([11], slots=13)
    i = torch.arange(11)
    window = (i[:, None] - i[None, :]).abs() <= 2  # window 4: two sentences on each side
    with torch.no_grad():
        one = _influence(_model(depth=1), sentences, mask)
        two = _influence(_model(depth=2), sentences, mask)
    # One layer: a sentence reads only its window (the globals it reads hold no document content yet); the
    # globals read every sentence.
    assert one[:2].all() and torch.equal(one[2:], window)
    # Two layers: what the globals gathered in layer 1 reaches every sentence in layer 2.
    assert two.all()


def test_untrained_states_equal_the_inputs():
    torch.manual_seed(0)
    model = ParaformerRetriever(_config(depth=2, dropout=0.1), dtype=torch.float64).eval()
    sentences, mask = _documents([5, 8])
    docs = model.encode_documents(sentences, mask)
    rows = docs.position >= 0
    assert torch.equal(docs.states[rows], sentences[mask]) and torch.equal(docs.states[~rows],
                                                                           torch.zeros(4, C, dtype=torch.float64))
    # The untrained pool is a similarity-weighted mean of the sentence vectors, scored at scale 1 / 0.05.
    query = _queries(1)[0]
    weights = (sentences[0, :5] @ query / math.sqrt(C)).softmax(0)
    pooled = weights @ sentences[0, :5]
    expected = F.cosine_similarity(query, pooled, dim=0) * 20
    torch.testing.assert_close(model.score(query[None], docs)[0, 0], expected, rtol=1e-12, atol=1e-12)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ParaformerRetriever(_config(depth=2, dropout=0.1)).train()
    sentences, mask = _documents([6, 0, 9, 3])
    queries, targets = _queries(4).float(), torch.tensor([0, 2, 3, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(queries, sentences.float(), mask), targets).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        if step == 0:
            # Zero-initialised output projections: only they, the pooling and the scale learn on the first step.
            assert grads["layers.0.attn.proj.weight"].abs().sum() > 0 and grads["logit_scale"] != 0
            optimizer.step()
    assert [name for name, g in grads.items() if not g.abs().sum() > 0] == []


def test_cat_equals_encoding_all_at_once():
    model = _model(depth=2)
    lengths = [3, 9, 0, 5, 6]
    sentences, mask = _documents(lengths)
    whole = model.encode_documents(sentences, mask)
    # Each chunk padded to its own longest document, as a corpus encoded in chunks would be.
    parts = [model.encode_documents(sentences[:2, :9], mask[:2, :9]),
             model.encode_documents(sentences[2:, :6], mask[2:, :6])]
    joined = DocumentStates.cat(parts)
    assert joined.count == 5 and torch.equal(joined.doc, whole.doc) and torch.equal(joined.position, whole.position)
    torch.testing.assert_close(joined.states, whole.states, rtol=1e-12, atol=1e-12)
    queries = _queries()
    torch.testing.assert_close(model.score(queries, joined), model.score(queries, whole), rtol=1e-12, atol=1e-12)


def test_dense_and_blocked_backends_agree():
    sentences, mask = _documents([40, 3, 27, 33])
    queries = _queries()
    scores = {}
    for backend in ("dense", "blocked"):
        model = _model(depth=2, window=6, backend=backend)
        scores[backend] = model(queries, sentences, mask)
    torch.testing.assert_close(scores["blocked"], scores["dense"], rtol=1e-10, atol=1e-10)


def test_factory_kwargs_and_reset_parameters():
    model = ParaformerRetriever(_config(), device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in model.parameters())
    model = _model()
    model.reset_parameters()
    assert torch.equal(model.query.weight, torch.eye(C, dtype=torch.float64))
    assert model.layers[0].attn.proj.weight.abs().sum() == 0 and model.layers[0].mlp[3].weight.abs().sum() == 0
    torch.testing.assert_close(model.logit_scale.exp().item(), 20.0)


def test_bad_inputs_raise():
    model = _model()
    sentences, mask = _documents([3, 2])
    with pytest.raises(ValueError, match=r"sentences must have shape \(D, S, C=16\), got \(2, 3, 8\)"):
        model.encode_documents(sentences[..., :8], mask)
    with pytest.raises(ValueError, match=r"sentences must have shape \(D, S, C=16\)"):
        model.encode_documents(sentences[0], mask)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(D, S\) = \(2, 3\)"):
        model.encode_documents(sentences, mask[:, :2])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model.encode_documents(sentences, mask.long())
    docs = model.encode_documents(sentences, mask)
    with pytest.raises(ValueError, match=r"queries must have shape \(B, C=16\), got \(3, 15\)"):
        model.score(_queries()[:, :15], docs)
    with pytest.raises(TypeError, match="docs must be DocumentStates"):
        model.score(_queries(), docs.states)
    with pytest.raises(ValueError, match=r"doc must be non-decreasing and in \[0, count=1\)"):
        DocumentStates(docs.states, docs.doc, docs.position, count=1)
    with pytest.raises(ValueError, match=r"doc must be a long tensor of shape \(T=9,\)"):
        DocumentStates(docs.states, docs.doc[1:], docs.position, count=2)
    with pytest.raises(ValueError, match="parts must hold at least one"):
        DocumentStates.cat([])
    for field, value, message in [("window", 5, "window must be even"), ("globals", 0, "globals must be >= 1"),
                                  ("heads", 3, r"dim \(16\) must be divisible by heads \(3\)"),
                                  ("temperature_init", 0.0, "temperature_init must be > 0"),
                                  ("dropout", 1.0, r"dropout must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            _config(**{field: value})


def test_far_apart_logits_stay_exact():
    """Each document's softmax is steadied by its own maximum: a document whose logits sit thousands below
    another's still pools its sentences instead of underflowing to 0 / 0."""
    model = ParaformerRetriever(_config(), dtype=torch.float64).eval()  # untrained: W_q = W_k = W_v = I
    query = _queries(1)
    sentences = torch.stack([1000 * query.expand(3, C), query.expand(3, C)])  # (2, 3, C): logits ~4000 and ~4
    scores = model(query, sentences, torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(scores, torch.tensor([[20.0, 20.0]], dtype=torch.float64))
