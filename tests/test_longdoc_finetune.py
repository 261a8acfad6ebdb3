"""Fine-tuning and continued MLM pretraining of the long encoder (``longdoc.finetune``, ``longdoc.pretrain``) on
a tiny random BERT converted by ``convert_to_long`` and the fixture LicenseDB: losses against naive references,
a loss that falls on a repeated batch, resume after a stop equal to an uninterrupted run, loadable output."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("yaml")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from longattn.cli import main  # noqa: E402
from longattn.integrations import SentenceEncoder  # noqa: E402
from longattn.integrations.convert import convert_to_long  # noqa: E402
from longattn.longdoc.finetune import (PooledClassifier, SentenceEmbedder, contrastive_loss,  # noqa: E402
                                       finetune_classifier, finetune_retrieval, load_source,
                                       multi_positive_infonce, pair_batch, tokenize)
from longattn.longdoc.licensedb import load_licensedb  # noqa: E402
from longattn.longdoc.pretrain import IGNORE, MaskedLM, mask_tokens, pack_sequences, pretrain_mlm  # noqa: E402
from longattn.longdoc.retrieval import Settings  # noqa: E402
from longattn.longdoc.tasks import classification_task, retrieval_task  # noqa: E402

from test_longdoc import write_db  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The fixture database and a random 2-layer BERT (width 32) whose word vocabulary covers its texts,
    with mean pooling + Normalize, converted to a Longformer of 256 positions and window 16."""
    root = tmp_path_factory.mktemp("finetune")
    data = write_db(root / "data")
    db = load_licensedb(data)
    texts = [lic.text for lic in db.licenses.values()] + [rule.text for rule in db.rules.values()]
    vocab = SPECIALS + sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    bert = root / "bert"
    transformers.BertModel(cfg).save_pretrained(bert)
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (bert / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                            "model_max_length": 64}))
    (bert / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (bert / "1_Pooling").mkdir()
    (bert / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                "pooling_mode_mean_tokens": True}))
    source = convert_to_long(bert, root / "long", max_length=256, window=16)
    return SimpleNamespace(data=data, db=db, source=source, bert=bert, licenses=[lic.text for lic in db.licenses.values()
                                                                      if lic.text])


def settings(path) -> Settings:
    return Settings(out=path, progress=False)


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def falls_on_a_repeated_batch(model, loss_fn, lr=3e-3, steps=8) -> tuple[float, float]:
    """The loss (evaluation mode) before and after ``steps`` Adam steps on the same batch (training mode)."""
    def evaluate():
        model.eval()
        with torch.no_grad():
            value = float(loss_fn())
        model.train()
        return value

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    before = evaluate()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return before, evaluate()


# ---- pieces against naive references --------------------------------------------------------------------
def test_mask_tokens_follow_80_10_10_and_never_touch_special_tokens():
    gen = torch.Generator().manual_seed(0)
    special, vocab, mask_id = [0, 1, 2, 3, 4], 1000, 4
    ids = torch.randint(5, vocab, (200, 512), generator=gen)
    ids[:, 0], ids[:, -1], ids[::3, 400:] = 2, 3, 0  # CLS, SEP, padding
    inputs, labels = mask_tokens(ids, special_ids=special, mask_id=mask_id, vocab_size=vocab, generator=gen)
    is_special = torch.isin(ids, torch.tensor(special))
    assert (labels[is_special] == IGNORE).all() and torch.equal(inputs[is_special], ids[is_special])
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    assert abs(chosen.sum().item() / (~is_special).sum().item() - 0.15) < 0.005
    masked = inputs[chosen] == mask_id
    kept = inputs[chosen] == ids[chosen]
    replaced = ~masked & ~kept
    assert abs(masked.float().mean().item() - 0.8) < 0.015
    assert abs(kept.float().mean().item() - 0.1) < 0.01 and abs(replaced.float().mean().item() - 0.1) < 0.01
    assert not torch.isin(inputs[chosen][replaced], torch.tensor(special)).any()  # random ids are not special
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(ids, special_ids=special, mask_id=mask_id, vocab_size=vocab, mask_prob=0.0)


def test_pack_sequences_joins_documents_and_wraps_each_piece():
    docs = [[10, 11, 12], [13, 14], [15, 16, 17, 18, 19, 20]]
    out = pack_sequences(docs, 6, prefix=[2], suffix=[3], separator=3)
    # stream: 10 11 12 SEP 13 14 SEP 15 16 17 18 19 20 -> pieces of 4 tokens, the last (20) dropped
    assert out.tolist() == [[2, 10, 11, 12, 3, 3], [2, 13, 14, 3, 15, 3], [2, 16, 17, 18, 19, 3]]
    assert pack_sequences([[5]], 6, prefix=[2], suffix=[3], separator=3).shape == (0, 6)
    with pytest.raises(ValueError, match="seq_len"):
        pack_sequences(docs, 2, prefix=[2], suffix=[3], separator=3)


def test_multi_positive_infonce_matches_a_loop():
    scores = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    positive = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)  # doc 2: rows 0 and 1
    expected = 0.0
    for i in range(3):
        p = scores[i].double().exp()
        expected += -math.log(float(p[positive[i]].sum() / p.sum())) / 3
    assert abs(float(multi_positive_infonce(scores, positive)) - expected) < 1e-6
    with pytest.raises(ValueError, match="at least one positive"):
        multi_positive_infonce(scores, positive & False)
    with pytest.raises(ValueError, match="positive must be"):
        multi_positive_infonce(scores, positive.float())


def test_pair_batch_gives_a_license_drawn_twice_one_column():
    batch = pair_batch([[1], [2], [3]], [[5, 7], [7], [9]], [5, 7, 9], {5: [50], 7: [70], 9: [90]})
    assert batch.documents == [[50], [70], [90]]
    assert batch.positive.tolist() == [[True, True, False], [False, True, False], [False, False, True]]


# ---- losses fall on a repeated batch ------------------------------------------------------------------------
def test_losses_fall_on_a_repeated_batch(tiny):
    enc = load_source(tiny.source, max_tokens=TOKENS)
    embedder = SentenceEmbedder(enc.model, enc.pooling, enc.tokenizer.pad_token_id).train()
    task = retrieval_task(tiny.db)
    index = task.index()
    queries = task.queries["train"][:6]
    relevant = [[index[k] for k in q.relevant] for q in queries]
    picked = [rel[0] for rel in relevant]
    docs = sorted(set(picked))
    tokens = dict(zip(docs, tokenize(enc.tokenizer, [task.corpus[d].text for d in docs], TOKENS)))
    batch = pair_batch(tokenize(enc.tokenizer, [q.text for q in queries], TOKENS), relevant, picked, tokens)
    before, after = falls_on_a_repeated_batch(embedder, lambda: contrastive_loss(embedder, batch))
    assert math.isfinite(before) and after < before

    enc = load_source(tiny.source, max_tokens=TOKENS)
    classifier = PooledClassifier(SentenceEmbedder(enc.model, enc.pooling, 0), 5).train()
    windows = tokenize(enc.tokenizer, tiny.licenses[:6], TOKENS)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    before, after = falls_on_a_repeated_batch(
        classifier, lambda: torch.nn.functional.cross_entropy(classifier(windows), labels), lr=1e-2)
    assert math.isfinite(before) and after < before

    enc = load_source(tiny.source, max_tokens=TOKENS)
    mlm = MaskedLM(enc.model).train()
    tok = enc.tokenizer
    ids = tok(tiny.licenses[:4], add_special_tokens=False)["input_ids"]
    seqs = pack_sequences(ids, TOKENS, prefix=[tok.cls_token_id], suffix=[tok.sep_token_id], separator=tok.sep_token_id)
    inputs, labels = mask_tokens(seqs[:4], special_ids=tok.all_special_ids, mask_id=tok.mask_token_id,
                                 vocab_size=len(tok), mask_prob=0.3, generator=torch.Generator().manual_seed(0))
    before, after = falls_on_a_repeated_batch(mlm, lambda: mlm(inputs, labels))
    assert math.isfinite(before) and after < before


# ---- whole runs: resume, output ------------------------------------------------------------------------------
def test_finetune_retrieval_resumes_exactly_and_writes_a_loadable_model(tiny, tmp_path):
    task = retrieval_task(tiny.db)
    run = dict(source=tiny.source, steps=4, batch_size=4, max_tokens=TOKENS, lr=1e-3)
    whole = finetune_retrieval(task, settings(tmp_path), out=tmp_path / "whole", **run)
    assert finetune_retrieval(task, settings(tmp_path), out=tmp_path / "parts", stop_after=2, **run) is None
    resumed = finetune_retrieval(task, settings(tmp_path), out=tmp_path / "parts", **run)
    assert whole == tmp_path / "whole" / "model" and same_weights(whole, resumed)
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    parts = json.loads((tmp_path / "parts" / "result.json").read_text())
    assert [h["train_loss"] for h in result["history"]] == [h["train_loss"] for h in parts["history"]]
    assert len(result["history"]) == 4 and all(math.isfinite(h["train_loss"]) for h in result["history"])
    assert math.isfinite(result["history"][-1]["val_loss"])
    budget = result["budget"]
    assert budget["steps"] == 4 and budget["max_tokens"] == TOKENS and budget["seconds"] > 0
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json", "modules.json",
                 "1_Pooling/config.json"):
        assert (whole / name).is_file(), name
    texts = [q.text for q in task.queries["test"][:3]] + tiny.licenses[:2]
    new, old = SentenceEncoder.load(whole), SentenceEncoder.load(tiny.source)
    assert new.pooling == old.pooling and new.fingerprint != old.fingerprint
    a, b = new.encode(texts), old.encode(texts)
    assert torch.allclose(a.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
    assert (a - b).abs().max() > 1e-3


def test_finetune_classifier_resumes_exactly_and_predicts_the_test_split(tiny, tmp_path):
    task = classification_task(tiny.db)
    run = dict(source=tiny.source, steps=4, batch_size=4, max_tokens=TOKENS, lr=1e-3, head_warmup=2)
    whole = finetune_classifier(task, settings(tmp_path), out=tmp_path / "whole", **run)
    stopped = finetune_classifier(task, settings(tmp_path), out=tmp_path / "parts", stop_after=3, **run)
    assert not stopped["finished"] and stopped["predicted"] is None and len(stopped["history"]) == 3
    resumed = finetune_classifier(task, settings(tmp_path), out=tmp_path / "parts", **run)
    assert json.loads((tmp_path / "whole" / "result.json").read_text()) == whole
    assert len(whole["predicted"]) == len(task.documents["test"]) == len(whole["gold"])
    assert all(0 <= p < len(task.labels) for p in whole["predicted"]) and 0 <= whole["macro_f1"] <= 1
    assert [h["train_loss"] for h in whole["history"]] == [h["train_loss"] for h in resumed["history"]]
    assert whole["predicted"] == resumed["predicted"]
    assert whole["budget"]["head_warmup"] == 2 and whole["budget"]["max_tokens"] == TOKENS
    with pytest.raises(ValueError, match="max_tokens"):
        finetune_classifier(task, settings(tmp_path), out=tmp_path / "bad", **{**run, "max_tokens": 10_000})


def test_pretrain_mlm_freezes_the_encoder_first_and_resumes_exactly(tiny, tmp_path):
    run = dict(source=tiny.source, seq_len=TOKENS, batch_size=4, lr=1e-3, head_warmup=2)
    frozen = pretrain_mlm(tiny.licenses, out=tmp_path / "frozen", steps=2, progress=False, **run)
    assert same_weights(frozen, tiny.source)  # the head trained alone
    whole = pretrain_mlm(tiny.licenses, out=tmp_path / "whole", steps=4, progress=False, **run)
    assert pretrain_mlm(tiny.licenses, out=tmp_path / "parts", steps=4, stop_after=3, progress=False, **run) is None
    resumed = pretrain_mlm(tiny.licenses, out=tmp_path / "parts", steps=4, progress=False, **run)
    assert same_weights(whole, resumed) and not same_weights(whole, tiny.source)
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["fixed_loss"]) for h in result["history"])
    assert result["budget"]["tokens"] == 4 * 4 * TOKENS
    assert not any(k.startswith("head") for k in load_file(str(whole / "model.safetensors")))
    assert SentenceEncoder.load(whole).encode(tiny.licenses[:2]).shape == (2, 32)
    with pytest.raises(ValueError, match="batch_size"):
        pretrain_mlm(tiny.licenses[:1], out=tmp_path / "few", steps=2, progress=False, **{**run, "batch_size": 64})


def test_a_plain_bert_source_is_fine_tuned_too(tiny, tmp_path):
    task = retrieval_task(tiny.db)
    path = finetune_retrieval(task, settings(tmp_path), source=tiny.bert, out=tmp_path, steps=2, batch_size=4,
                              max_tokens=TOKENS, lr=1e-3)
    texts = tiny.licenses[:2]
    assert (SentenceEncoder.load(path).encode(texts) - SentenceEncoder.load(tiny.bert).encode(texts)).abs().max() > 1e-3


@pytest.mark.parametrize("command", [["finetune", "--task", "retrieval"], ["finetune", "--task", "classification"],
                                     ["pretrain"]])
def test_cli(tiny, tmp_path, command, capsys):
    tokens = ["--seq-len" if command == ["pretrain"] else "--max-tokens", str(TOKENS)]
    args = ["longdoc", *command, "--data-dir", str(tiny.data), "--out", str(tmp_path), "--source", str(tiny.source),
            "--steps", "2", "--batch-size", "2", *tokens, "--evals", "1", "--no-progress"]
    assert main(args) == 0
    folder = "pretrain" if command == ["pretrain"] else f"finetune-{command[-1]}"
    result = json.loads((tmp_path / "full" / folder / "result.json").read_text())
    assert result["finished"] and len(result["history"]) == 1  # --evals 1
    assert "wrote" in capsys.readouterr().out
