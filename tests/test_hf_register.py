"""``longattn.integrations.hf.register``: transformers models on longattn equal a dense-masked reference.

The reference is the same model on another registered implementation: transformers' own ``sdpa_mask``
(padding and causality as transformers builds them, never skipped) AND ``pattern.dense(...)``, then SDPA.
Outputs are compared on the real (non-padding) positions in fp32.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import longattn as la

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    DynamicCache,
    LlamaConfig,
    ModernBertConfig,
    StaticCache,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from longattn.integrations.hf import padding_mask, register  # noqa: E402

ATOL = 1e-5
VOCAB = 100


# ---- reference and builders ----------------------------------------------------------------------

def _reference_mask(*args, **kwargs):
    # transformers' dense (B, 1, Nq, Nk) bool mask with padding and causality, always materialised.
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


def register_reference(name: str, pattern: la.Pattern) -> str:
    """Dense oracle: transformers' mask & ``pattern.dense``, finite fill so that empty rows stay finite."""

    def ref_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (B, H, Nk, D)
        keep = pattern.dense(q.shape[2], k.shape[2], num_heads=q.shape[1]) & attention_mask  # (B, H, Nq, Nk)
        bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
        return out.transpose(1, 2).contiguous(), None  # (B, Nq, H, D)

    AttentionInterface.register(name, ref_attention)
    AttentionMaskInterface.register(name, _reference_mask)
    return name


def bert(attn: str, **overrides):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, **overrides)
    return AutoModel.from_config(cfg, attn_implementation=attn).eval()


def llama_config() -> LlamaConfig:
    # GQA: 4 query heads share 2 key/value heads.
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def llama(attn: str, auto=AutoModel):
    torch.manual_seed(0)
    return auto.from_config(llama_config(), attn_implementation=attn).eval()


def batch(n: int, lengths: tuple[int, ...], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, n) and the 0/1 attention mask (B, n) of examples of the given lengths, padded on ``side``."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(lengths), n), generator=gen)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        if side == "right":
            mask[b, :length] = 1
        else:
            mask[b, n - length:] = 1
    return ids, mask


def run(model, ids, mask, attn: str) -> torch.Tensor:
    model.set_attn_implementation(attn)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def assert_real_close(out, ref, mask, atol=ATOL):
    real = mask.bool()
    assert torch.isfinite(out[real]).all()
    torch.testing.assert_close(out[real], ref[real], atol=atol, rtol=0)


# ---- models against the dense reference ----------------------------------------------------------

# Llama's pattern is registered without causality: the decoder's is_causal adds it (the reference gets it
# from transformers). BERT: window plus global tokens, right padding; Llama (GQA): both paddings.
@pytest.mark.parametrize("family,n,pattern,side", [
    ("bert", 57, la.sliding_window(4) | la.global_tokens([0, 7]), "right"),
    ("llama", 61, la.sliding_window(6), "right"),
    ("llama", 61, la.sliding_window(6), "left"),
])
def test_pattern_matches_dense_reference(family, n, pattern, side):
    ids, mask = batch(n, (n, n - 17), side)
    model = bert("eager") if family == "bert" else llama("eager")
    out = run(model, ids, mask, register(f"la-{family}-win", pattern))
    ref = run(model, ids, mask, register_reference(f"ref-{family}-win", pattern))
    assert_real_close(out, ref, mask)
    # The pattern matters: plain attention differs.
    assert (out - run(model, ids, mask, "sdpa"))[mask.bool()].abs().max() > 1e-2


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_full_pattern_equals_plain_sdpa(family):
    model = bert("sdpa") if family == "bert" else llama("sdpa")
    ids, mask = batch(43, (43, 30), "right" if family == "bert" else "left")
    assert_real_close(run(model, ids, mask, register("la-full", la.full())), run(model, ids, mask, "sdpa"), mask)


def test_modernbert_local_layers_keep_their_window():
    # ModernBERT's local layers pass `sliding_window=` to the attention function; it is intersected
    # with the registered pattern, so the full pattern reproduces sdpa on both kinds of layers.
    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, local_attention=8, global_attn_every_n_layers=2, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    assert "sliding_attention" in cfg.layer_types
    ids, mask = batch(45, (45, 30))
    assert_real_close(run(model, ids, mask, register("la-modernbert", la.full())), run(model, ids, mask, "sdpa"), mask)


def test_pattern_given_as_text_equals_pattern_object():
    ids, mask = batch(50, (50, 33))
    model = bert("eager")
    text = run(model, ids, mask, register("la-text", "sliding_window(3) | global_tokens([0])"))
    obj = run(model, ids, mask, register("la-obj", la.sliding_window(3) | la.global_tokens([0])))
    assert_real_close(text, obj, mask, atol=0)


def test_registering_a_name_again_replaces_it():
    ids, mask = batch(40, (40, 29))
    model = bert("eager")
    register("la-again", la.full())
    pattern = la.sliding_window(2)
    out = run(model, ids, mask, register("la-again", pattern))
    assert_real_close(out, run(model, ids, mask, register_reference("ref-again", pattern)), mask)


# ---- KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_kv_cache_decoding_equals_no_cache_forward(cache_kind):
    # Left padding, as batched generation: the cached steps (Nq = 1 < Nk, bottom-right alignment) must
    # give the hidden states of one forward over the whole sequence. A static cache holds 64 slots, the
    # last ones empty: the 2-D mask is shorter than the keys and the attention drops those slots.
    name = register("la-cache", la.sliding_window(5))
    model = llama(name)
    ids, mask = batch(47, (47, 35), "left")
    prompt, steps = 44, 3
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).last_hidden_state
        cache = (DynamicCache(config=model.config) if cache_kind == "dynamic"
                 else StaticCache(config=model.config, max_cache_len=64))
        outs = [model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache,
                      use_cache=True).last_hidden_state]
        for t in range(prompt, prompt + steps):
            outs.append(model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                              use_cache=True).last_hidden_state)
    assert_real_close(torch.cat(outs, 1), full, mask)


def test_greedy_generation_matches_reference():
    pattern = la.sliding_window(4)
    ids, mask = batch(40, (40, 31), "left")
    tokens = {}
    for name in (register("la-gen", pattern), register_reference("ref-gen", pattern)):
        model = llama(name, AutoModelForCausalLM)
        with torch.no_grad():
            tokens[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                          pad_token_id=0)
    assert torch.equal(tokens["la-gen"], tokens["ref-gen"])


# ---- the mask function ---------------------------------------------------------------------------

def test_mask_function_returns_padding_not_a_grid():
    mask = torch.ones(2, 90, dtype=torch.bool)
    common = dict(batch_size=2, q_length=90, kv_length=90, mask_function=None, dtype=torch.float32)
    assert padding_mask(attention_mask=mask, **common) is None
    assert padding_mask(attention_mask=None, **common) is None
    mask[1, 70:] = False
    assert torch.equal(padding_mask(attention_mask=mask, **common), mask)  # (B, Nk), no (Nq, Nk) grid
    # Decoding one token after 90: a sliding-window cache (kv_offset > 0) holds keys 71..90 and gets their
    # padding; a static cache of 128 slots gets the 91 filled ones (the attention drops the other slots).
    seen = torch.cat([mask, mask[:, :1]], 1)  # (B, 91)
    decode = dict(batch_size=2, q_length=1, q_offset=90, mask_function=None)
    assert torch.equal(padding_mask(attention_mask=seen, kv_length=20, kv_offset=71, **decode), seen[:, 71:])
    assert torch.equal(padding_mask(attention_mask=seen, kv_length=128, **decode), seen)


def test_models_hand_the_attention_a_padding_mask():
    name = register("la-spy", la.sliding_window(3))
    inner, shapes = AttentionInterface()[name], []

    def spy(module, q, k, v, attention_mask, **kwargs):
        shapes.append(None if attention_mask is None else tuple(attention_mask.shape))
        return inner(module, q, k, v, attention_mask, **kwargs)

    AttentionInterface.register(name, spy)
    ids, mask = batch(64, (64, 50))
    run(bert(name), ids, mask, name)
    run(llama(name), ids, mask, name)
    run(llama(name), ids[:, :50], mask[:1, :50].expand(2, -1), name)  # no padding: no mask at all
    assert shapes == [(2, 64)] * 4 + [None] * 2


# ---- training, errors, optional dependency --------------------------------------------------------

def test_attention_dropout_only_in_training():
    model = bert(register("la-drop", la.sliding_window(3)), attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    ids, mask = batch(33, (33, 20))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                           model(input_ids=ids, attention_mask=mask).last_hidden_state)
        model.train()
        torch.manual_seed(0)
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(a, b)


def test_output_attentions_is_a_clear_error():
    model = bert(register("la-attn-weights", la.sliding_window(3)))
    ids, mask = batch(20, (20, 12))
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        register("sdpa", la.full())
    with pytest.raises(TypeError, match="pattern"):
        register("la-bad", 3)
    with pytest.raises(ValueError, match="pattern"):
        register("la-bad", "nonsense(3)")
    with pytest.raises(ValueError, match="backend"):
        register("la-bad", la.full(), backend="fast")


def test_transformers_is_optional():
    code = ("import sys, longattn, longattn.integrations; assert 'transformers' not in sys.modules\n"
            "sys.modules['transformers'] = None\n"
            "try:\n    import longattn.integrations.hf\nexcept ImportError as e:\n"
            "    assert 'pip install' in str(e), e\nelse:\n    raise SystemExit('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
