"""Longformer and BigBird against ``transformers`` on the same random weights (built from configs, no download)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn.models.bigbird import BigBirdConfig, BigBirdModel  # noqa: E402
from longattn.models._bert_blocks import Padding  # noqa: E402
from longattn.models.longformer import GlobalTokens, LongformerConfig, LongformerModel  # noqa: E402

TOL = 1e-4


def _hf_longformer(tmp_path, **overrides):
    torch.manual_seed(0)
    kw = dict(vocab_size=50, hidden_size=40, num_hidden_layers=3, num_attention_heads=4, intermediate_size=56,
              attention_window=[8, 4, 16], max_position_embeddings=140, hidden_act="gelu")
    kw.update(overrides)
    model = transformers.LongformerModel(transformers.LongformerConfig(**kw)).eval()
    model.save_pretrained(tmp_path)
    return model


def _hf_bigbird(tmp_path, **overrides):
    torch.manual_seed(0)
    kw = dict(vocab_size=50, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=56,
              block_size=16, num_random_blocks=2, max_position_embeddings=256)
    kw.update(overrides)
    model = transformers.BigBirdModel(transformers.BigBirdConfig(**kw)).eval()
    model.save_pretrained(tmp_path)
    return model


def _batch(b, n, lengths, pad_id, vocab=50, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, n), generator=gen)
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


def _close(a, b):
    err = (a.last_hidden_state - b.last_hidden_state).abs().max().item()
    assert err < TOL, err
    if a.pooler_output is not None:
        assert (a.pooler_output - b.pooler_output).abs().max().item() < TOL


# ---- Longformer ------------------------------------------------------------------------------------------
GLOBALS = {
    "none": lambda b, n: None,
    "cls": lambda b, n: torch.zeros(b, n, dtype=torch.long).index_fill_(1, torch.tensor([0]), 1),
    # per-example question tokens; 12 globals x 4 heads >= 40 wide takes the projected (not absorbed) path
    "many": lambda b, n: (torch.arange(n)[None, :] < torch.tensor([12, 3, 7])[:b, None]).long(),
    "scattered": lambda b, n: torch.zeros(b, n, dtype=torch.long).index_fill_(1, torch.tensor([0, 5, 40, 96]), 1),
}


@pytest.mark.parametrize("globals_", list(GLOBALS))
def test_longformer_matches_transformers(tmp_path, globals_):
    hf = _hf_longformer(tmp_path)
    ours = LongformerModel.from_pretrained(tmp_path)
    ids, mask = _batch(3, 97, [97, 60, 90], pad_id=1)
    glob = GLOBALS[globals_](3, 97)
    with torch.no_grad():
        _close(hf(ids, attention_mask=mask, global_attention_mask=glob),
               ours(ids, attention_mask=mask, global_attention_mask=glob))


def test_longformer_legacy_global_in_attention_mask(tmp_path):
    hf = _hf_longformer(tmp_path)
    ours = LongformerModel.from_pretrained(tmp_path)
    ids, mask = _batch(2, 50, [50, 40], pad_id=1)
    mask[:, 0] = 2  # the original Longformer API: 2 = global
    with torch.no_grad():
        _close(hf(ids, attention_mask=mask), ours(ids, attention_mask=mask))
        glob = torch.zeros_like(ids)
        glob[:, 0] = 1
        _close(ours(ids, attention_mask=mask.clamp(max=1), global_attention_mask=glob), ours(ids, attention_mask=mask))


def test_longformer_odd_width_token_types_and_bin_weights(tmp_path):
    hf = _hf_longformer(tmp_path, hidden_size=36, num_attention_heads=3, intermediate_size=20, type_vocab_size=2,
                        attention_window=[4, 8], num_hidden_layers=2, hidden_act="gelu_new")
    # the legacy pickle format, read with weights_only=True
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = LongformerModel.from_pretrained(tmp_path)
    ids, mask = _batch(2, 33, [33, 20], pad_id=1)
    types = torch.randint(0, 2, ids.shape)
    glob = torch.zeros_like(ids)
    glob[:, 1] = 1
    with torch.no_grad():
        _close(hf(ids, attention_mask=mask, global_attention_mask=glob, token_type_ids=types),
               ours(ids, attention_mask=mask, global_attention_mask=glob, token_type_ids=types))


def test_longformer_gradients_match_transformers(tmp_path):
    hf = _hf_longformer(tmp_path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = LongformerModel.from_pretrained(tmp_path)
    ids, mask = _batch(2, 41, [41, 30], pad_id=1)
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    weights = torch.randn(2, 41, 40, generator=torch.Generator().manual_seed(3))
    grads = []
    for model in (hf.train(), ours.train()):
        model.zero_grad()
        (model(ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state * weights).sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.key_global.weight",
                 "encoder.layer.2.attention.self.value_global.bias", "embeddings.word_embeddings.weight"):
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3)


def test_longformer_task_checkpoint_and_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=40, attention_window=4, max_position_embeddings=70)
    task = transformers.LongformerForMaskedLM(cfg).eval()  # encoder under "longformer.", plus an LM head
    task.save_pretrained(tmp_path / "mlm")
    ours = LongformerModel.from_pretrained(tmp_path / "mlm")
    assert ours.pooler is None  # the MLM checkpoint has no pooler
    ids, mask = _batch(2, 50, [50, 31], pad_id=1)
    with torch.no_grad():
        want = task.longformer(ids, attention_mask=mask).last_hidden_state
        assert (ours(ids, attention_mask=mask).last_hidden_state - want).abs().max() < TOL
        ours.save_pretrained(tmp_path / "ours")
        back = transformers.LongformerModel.from_pretrained(tmp_path / "ours").eval()
        assert (back(ids, attention_mask=mask).last_hidden_state - want).abs().max() < TOL
        again = LongformerModel.from_pretrained(tmp_path / "ours")
        assert torch.equal(again(ids, attention_mask=mask).last_hidden_state,
                           ours(ids, attention_mask=mask).last_hidden_state)


def test_longformer_dilation_matches_dense_reference():
    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=30, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, attention_window=6, attention_dilation=2, max_position_embeddings=80)
    attn = LongformerModel(cfg).encoder.layer[0].attention.self.eval()
    n = 45
    x = torch.randn(2, n, 24)
    padding = torch.ones(2, n, dtype=torch.bool)
    padding[1, 30:] = False
    flags = torch.zeros(2, n, dtype=torch.bool)
    flags[:, [0, 17]] = True
    flags &= padding
    # reference: every score materialised, masks written out from the definition
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = ((j - i) % 2 == 0) & ((j - i).abs() <= 3 * 2)
    d = 12
    split = lambda t: t.view(2, n, 2, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
    local_mask = (window[None] | flags[:, None, :]) & padding[:, None, :]  # (B, N, N)
    local = torch.softmax((q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~local_mask[:, None], -torch.inf), -1) @ v
    qg, kg, vg = split(attn.query_global(x)), split(attn.key_global(x)), split(attn.value_global(x))
    glob = torch.softmax((qg @ kg.transpose(-1, -2) / d ** 0.5).masked_fill(~padding[:, None, None], -torch.inf),
                         -1) @ vg
    want = torch.where(flags[:, None, :, None], glob, local).transpose(1, 2).reshape(2, n, 24)
    want = want * padding[..., None]
    got = attn(x, padding=Padding.of(padding), globals_=GlobalTokens.of(flags))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- BigBird ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block,r,extra", [
    (230, 16, 2, {}),  # block-sparse, padding, not a multiple of the block
    (97, 8, 2, {"hidden_act": "gelu", "rescale_embeddings": True}),  # partial last block
    (200, 8, 3, {"use_bias": False, "hidden_size": 36, "num_attention_heads": 3}),
    (100, 16, 3, {}),  # below (5 + 2r) * block: Hugging Face switches to full attention
])
def test_bigbird_matches_transformers(tmp_path, n, block, r, extra):
    hf = _hf_bigbird(tmp_path, block_size=block, num_random_blocks=r, **extra)
    ours = BigBirdModel.from_pretrained(tmp_path, hf_parity=True)
    ids, mask = _batch(2, n, [n, n - 30], pad_id=0)
    with torch.no_grad():
        _close(hf(ids, attention_mask=mask), ours(ids, attention_mask=mask))


def test_bigbird_round_trip_and_default_mode(tmp_path):
    hf = _hf_bigbird(tmp_path / "hf", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = BigBirdModel.from_pretrained(tmp_path / "hf")
    ids, mask = _batch(2, 230, [230, 200], pad_id=0)
    with torch.no_grad():
        ours.save_pretrained(tmp_path / "ours")
        back = transformers.BigBirdModel.from_pretrained(tmp_path / "ours").eval()
        _close(hf(ids, attention_mask=mask), back(ids, attention_mask=mask))
        # default mode: seeded random blocks, the same in training and evaluation (dropout is 0 here)
        evaluated = ours.eval()(ids, attention_mask=mask).last_hidden_state
        trained = ours.train()(ids, attention_mask=mask).last_hidden_state
        assert torch.equal(evaluated, trained)
        assert (evaluated - hf(ids, attention_mask=mask).last_hidden_state).abs().max() > 1e-3  # random blocks on


def test_bigbird_attention_matches_dense_pattern():
    torch.manual_seed(0)
    cfg = BigBirdConfig(vocab_size=30, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, block_size=8, num_random_blocks=2, random_seed=5)
    attn = BigBirdModel(cfg).encoder.layer[0].attention.self.eval()
    n, d = 97, 12
    x = torch.randn(2, n, 24)
    padding = torch.ones(2, n, dtype=torch.bool)
    padding[1, 70:] = False
    mask = attn.pattern(n).dense(n, num_heads=2)[None] & padding[:, None, None, :]  # (B, H, N, N)
    split = lambda t: t.view(2, n, 2, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
    want = torch.softmax((q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~mask, -torch.inf), -1) @ v
    want = want.transpose(1, 2).reshape(2, n, 24) * padding[..., None]
    torch.testing.assert_close(attn(x, padding=Padding.of(padding)), want, atol=1e-5, rtol=1e-5)


def test_causal_bigbird_sees_only_the_past():
    torch.manual_seed(0)
    cfg = BigBirdConfig(vocab_size=30, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, block_size=8, num_random_blocks=2, is_decoder=True,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BigBirdModel(cfg).eval()
    ids = torch.randint(1, 30, (1, 120))
    changed = ids.clone()
    changed[0, 80:] = (changed[0, 80:] + 1) % 30
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    assert torch.equal(a[:, :80], b[:, :80]) and not torch.allclose(a[:, 80:], b[:, 80:])


# ---- bad input -------------------------------------------------------------------------------------------
def test_checkpoint_errors(tmp_path):
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=8))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"'bert' checkpoint.*not a Longformer.*convert --to-long"):
        LongformerModel.from_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a BigBird"):
        BigBirdModel.from_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="does not exist"):
        LongformerModel.from_pretrained(tmp_path / "nowhere")

    _hf_longformer(tmp_path / "lf")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "lf" / "model.safetensors")
    kept = weights.pop("encoder.layer.1.attention.self.key_global.weight")
    save_file(weights, tmp_path / "lf" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing weights encoder\.layer\.1\.attention\.self\.key_global\.weight"):
        LongformerModel.from_pretrained(tmp_path / "lf")
    save_file({**weights, "encoder.layer.1.attention.self.key_global.weight": kept},
              tmp_path / "lf" / "model.safetensors")

    config = json.loads((tmp_path / "lf" / "config.json").read_text())
    (tmp_path / "lf" / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(ValueError, match="has shape"):
        LongformerModel.from_pretrained(tmp_path / "lf")
    (tmp_path / "lf" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        LongformerModel.from_pretrained(tmp_path / "lf")


def test_input_errors():
    cfg = LongformerConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=8, attention_window=4, max_position_embeddings=34)
    model = LongformerModel(cfg).eval()
    with pytest.raises(ValueError, match=r"position table has 34 entries \(max_position_embeddings\)"):
        model(torch.ones(1, 40, dtype=torch.long) * 3)
    model(torch.ones(1, 32, dtype=torch.long) * 3)  # positions 2..33 fit
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, N\) = \(1, 8\)"):
        model(torch.ones(1, 8, dtype=torch.long), attention_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="global_attention_mask must have shape"):
        model(torch.ones(1, 8, dtype=torch.long), global_attention_mask=torch.ones(8))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.ones(1, 8))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(ValueError, match="attention_window must be even"):
        LongformerModel(LongformerConfig(num_hidden_layers=1, attention_window=5))
    with pytest.raises(ValueError, match=r"one value per layer \(2\)"):
        LongformerModel(LongformerConfig(num_hidden_layers=2, attention_window=[4]))


def test_bench_hf_tiny_run(tmp_path, capsys):
    from longattn.cli import main

    assert main(["bench", "--hf", "longformer", "bigbird", "--lengths", "300", "--depth", "1", "--dim", "32",
                 "--heads", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_hf.json").read_text())
    assert [r["model"] for r in rows] == ["longformer", "bigbird"]
    assert all(r["max_abs_diff"] < TOL and r["hf_ms"] > 0 and r["ours_attention_ms"] > 0 for r in rows)
    assert "| longformer | 300 |" in capsys.readouterr().out


def test_bigbird_task_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BigBirdConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=40, block_size=8, num_random_blocks=2, num_labels=3,
                                     max_position_embeddings=256)
    task = transformers.BigBirdForSequenceClassification(cfg).eval()  # encoder under "bert.", plus a classifier
    task.save_pretrained(tmp_path)
    ours = BigBirdModel.from_pretrained(tmp_path, hf_parity=True)
    ids, mask = _batch(2, 150, [150, 120], pad_id=0)
    with torch.no_grad():
        _close(task.bert(ids, attention_mask=mask), ours(ids, attention_mask=mask))


@pytest.mark.parametrize("family", ["longformer", "bigbird"])
def test_a_config_with_fewer_layers_than_the_weights_is_refused(tmp_path, family):
    make, cls = (_hf_longformer, LongformerModel) if family == "longformer" else (_hf_bigbird, BigBirdModel)
    hf = make(tmp_path)
    n = hf.config.num_hidden_layers
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    if family == "longformer":
        config["attention_window"] = config["attention_window"][:1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"no place for: encoder\.layer\.1\..*does config\.json ask for fewer"):
        cls.from_pretrained(tmp_path)
    partial = cls.from_pretrained(tmp_path, strict=False)  # the opt-out: the first layer only
    assert len(partial.encoder.layer) == 1 and n > 1
