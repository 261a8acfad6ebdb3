"""Combiner, FIT, MoBA and NSA as byte LMs (``longattn lm train --pattern combiner-fixed|...|fit|moba|nsa``).

Transformer-XL's causal Combiner layer equals a float64 loop written from its definition (the paper's
factorisation with Transformer-XL's relative scores, an abstraction placed at its region's mean position),
over ``[memory; segment]`` with regions aligned to the segment; neither LM sees the future; Combiner reaches
every memory state in one layer; FIT's memory is the previous bytes; training resumes exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from longattn.lm import build_lm, load_lm, preset, train_lm
from longattn.lm.corpus import Corpus
from longattn.models import FITLM
from longattn.models.xl import NSA_LM_SHAPE, TransformerXL, XLConfig
from longattn.patterns import sliding_window
from longattn.modules.relative import RelativeAttention, sinusoid
from longattn.training import checkpoint
from longattn.training.setup import CHECKPOINT


def _regions(kind: str, i: int, nk: int, pad: int, region: int) -> tuple[list[int], list[list[int]]]:
    """Context position i's direct keys and earlier regions, regions cut on positions shifted by ``pad``."""
    p, n = i + pad, nk + pad
    real = lambda span: [j - pad for j in span if 0 <= j - pad < nk]  # noqa: E731
    if kind == "fixed":
        own = p // region
        return real(range(own * region, p + 1)), [real(range(r * region, (r + 1) * region)) for r in range(own)]
    regions, size = [], 1
    while size < n:
        c = p // size
        if (c ^ 1) < c:
            regions.append(real(range((c ^ 1) * size, c * size)))
        size *= 2
    return [i], regions


def reference(attn: RelativeAttention, x, memory, kind: str):
    """The layer's output from the definition, one query and head at a time, float64."""
    if kind == "mixture":
        return (reference(attn, x, memory, "fixed") + reference(attn, x, memory, "logsparse")) / 2
    b, nq, _ = x.shape
    context = torch.cat([memory, x], 1)
    nk, m = context.shape[1], memory.shape[1]
    h, d = attn.heads, attn.head_dim
    q, k, v = (t.view(b, nk, h, d) for t in attn.qkv(context).chunk(3, -1))
    align = {"fixed": attn.region, "logsparse": 1 << (nq - 1).bit_length()}[kind]
    pad = -m % (math.lcm(attn.region, 1 << (nq - 1).bit_length()) if attn.combiner == "mixture" else align)
    w_r = attn.r_net.weight.view(h, d, -1)
    out = torch.zeros(b, nq, h, d, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            qu, qv = q[bi, :, hi] + attn.u[hi], q[bi, :, hi] + attn.v[hi]
            kk, vv = k[bi, :, hi], v[bi, :, hi]
            position = lambda i, t: qv[i] @ (w_r[hi] @ sinusoid(torch.tensor([t]), attn.pos_dim)[0].to(x))  # noqa
            for r in range(nq):
                i = m + r
                direct, regions = _regions(kind, i, nk, pad, attn.region)
                logits = [qu[i] @ kk[j] + position(i, i - j) for j in direct]
                values = [vv[j] for j in direct]
                for omega in (o for o in regions if o):
                    pooled_q = torch.stack([qu[j] for j in omega]).amax(0)
                    w = torch.softmax(torch.stack([pooled_q @ kk[j] / math.sqrt(d) for j in omega]), 0)
                    centre = sum(omega) / len(omega)
                    logits.append(qu[i] @ torch.stack([kk[j] for j in omega]).amax(0) + position(i, i - centre))
                    values.append(sum(wj * vv[j] for wj, j in zip(w, omega)))
                p = torch.softmax(torch.stack(logits) / math.sqrt(d), 0)
                out[bi, r, hi] = sum(pj * vj for pj, vj in zip(p, values))
    return attn.proj(out.reshape(b, nq, h * d))


@pytest.mark.parametrize("kind", ["fixed", "logsparse", "mixture"])
@pytest.mark.parametrize("mem", [0, 7])
def test_xl_combiner_layer_equals_its_definition(kind, mem):
    """Outputs and input gradients, with a memory that is not a whole number of regions (front padding)."""
    torch.manual_seed(0)
    attn = RelativeAttention(16, 2, pos_dim=8, combiner=kind, region=5).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, mem, 16, dtype=torch.float64)
    weights = torch.randn(2, 6, 16, dtype=torch.float64)
    ref = reference(attn, x, memory, kind)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), x)
    for backend in ("dense", "blocked"):
        attn.backend = backend
        out = attn(x, memory if mem else None)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(grad, grad_ref, atol=1e-10, rtol=1e-10)


def _lm(pattern: str, **kw):
    torch.manual_seed(0)
    cfg = XLConfig(**{"dim": 32, "depth": 2, "heads": 2, "seg_len": 16, "mem_len": 20, "pattern": pattern,
                      "dropout": 0.0, **kw})
    return build_lm(cfg).double().eval()


LMS = ["combiner-fixed-4", "combiner-logsparse", "combiner-mixture-4", "fit", "moba", "topk_blocks(2, 4, causal=True)",
       "nsa"]


@pytest.mark.parametrize("pattern", LMS)
def test_the_lms_never_see_the_future(pattern):
    model = _lm(pattern)
    first, second = torch.randint(0, 256, (2, 2, 16))
    memory = model(first).memory
    base = model(second, memory).logits
    for t in (0, 5, 15):
        moved = second.clone()
        moved[:, t] = (moved[:, t] + 1) % 256
        diff = (model(moved, memory).logits - base).abs().amax(-1)
        assert (diff[:, :t] == 0).all() and (diff[:, t] > 0).all(), f"{pattern}: byte {t}"


@pytest.mark.parametrize("pattern", ["combiner-fixed-4", "combiner-logsparse"])
def test_one_combiner_layer_reaches_every_memory_state(pattern):
    """The first segment byte depends on every memory state through a single layer (a window would not)."""
    model = _lm(pattern, depth=1)
    x, memory = torch.randn(1, 16, 32, dtype=torch.float64), torch.randn(1, 20, 32, dtype=torch.float64)
    block = model.blocks[0]
    jac = torch.autograd.functional.jacobian(lambda m: block.attn(x, m)[0, 0], memory)  # (C, 1, M, C)
    assert (jac.abs().sum((0, 1, 3)) > 0).all()


def test_nsa_layer_trains_every_branch_and_reads_the_memory():
    """Every NSA parameter of an LM layer gets a gradient, and the segment depends on the memory (through the
    summaries and the chosen blocks, beyond the window's reach of 128 keys for the first byte)."""
    model = _lm("nsa", depth=1)
    attn = model.blocks[0].attn
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    memory = torch.randn(1, 200, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x, memory)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())
    reach = memory.grad.abs().sum((0, 2))  # (M,)
    assert (reach[:72] > 0).sum() > 16, "the first 72 memory states, outside every window, are read"


def test_fit_lm_memory_is_the_previous_bytes_and_groups_start_at_the_segment():
    model = _lm("fit")
    n = model.fit_cfg.group_size
    first, second = torch.randint(0, 256, (2, 2, 16))
    out = model(first, mem_len=13)
    assert torch.equal(out.memory[0], first[:, -13:])
    # the segment after 13 remembered bytes is the FIT decoder over [pad; 13 bytes; segment] with the pad
    # masked, so that a group starts at the segment's first byte
    pad = -13 % n
    ids = torch.cat([torch.zeros(2, pad, dtype=torch.long), first[:, -13:], second], 1)
    real = torch.arange(ids.shape[1]) >= pad
    x = model.embed(ids) * math.sqrt(32)
    hidden = model.decoder(x, key_padding_mask=real.expand(2, -1)).last_hidden_state[:, -16:]
    expected = torch.nn.functional.linear(hidden, model.embed.weight, model.out_bias)
    torch.testing.assert_close(model(second, out.memory).logits, expected, atol=1e-12, rtol=1e-12)
    # evaluation may remember more than training did: the latents are shared, nothing caps the length
    long = model(torch.randint(0, 256, (1, 16)), [torch.randint(0, 256, (1, 200))], mem_len=216)
    assert long.memory[0].shape == (1, 216)


def test_bad_lm_configs_are_named():
    with pytest.raises(ValueError, match="axial needs a 2-D layout"):
        XLConfig(pattern="combiner-axial")
    with pytest.raises(ValueError, match="no same_length, clamp_len"):
        XLConfig(pattern="combiner-fixed", same_length=True)
    with pytest.raises(ValueError, match="no same_length, clamp_len"):
        XLConfig(pattern="fit", clamp_len=8)
    with pytest.raises(ValueError, match="FITLM"):
        TransformerXL(XLConfig(pattern="fit"))
    with pytest.raises(ValueError, match="attn_mask"):
        _lm("combiner-fixed")(torch.zeros(1, 4, dtype=torch.long), attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="combiner attends through abstractions"):
        RelativeAttention(16, 2, combiner="fixed", clamp_len=4)
    with pytest.raises(ValueError, match="no same_length, clamp_len"):
        XLConfig(pattern="nsa", same_length=True)
    with pytest.raises(ValueError, match="nsa chooses its own keys"):
        RelativeAttention(16, 2, nsa=NSA_LM_SHAPE, pattern=sliding_window(3))


@pytest.fixture(scope="module")
def tiny_corpus() -> Corpus:
    torch.manual_seed(0)
    data = torch.randint(97, 123, (30_000,), dtype=torch.uint8)
    return Corpus("letters", data[:24_000], data[24_000:27_000], data[27_000:], "0" * 16, "generated")


@pytest.mark.parametrize("pattern", ["combiner-logsparse", "fit", "nsa"])
def test_training_resumes_exactly_and_loads_back(pattern, tiny_corpus, tmp_path):
    torch.set_num_threads(1)
    cfg = preset("tiny", model={"pattern": pattern, "dropout": 0.1}, train={"steps": 8, "eval_every": 4})
    whole = train_lm(cfg, out_dir=tmp_path / "whole", corpus=tiny_corpus, progress=False)
    assert train_lm(cfg, out_dir=tmp_path / "cut", corpus=tiny_corpus, progress=False, stop_after=5)["step"] == 5
    assert checkpoint.load(tmp_path / "cut" / CHECKPOINT)["memory"] is not None
    resumed = train_lm(cfg, out_dir=tmp_path / "cut", corpus=tiny_corpus, progress=False)
    assert [h["val_bpb"] for h in resumed["history"]] == [h["val_bpb"] for h in whole["history"]]
    model = load_lm(tmp_path / "whole")
    assert type(model) is (FITLM if pattern == "fit" else TransformerXL)
    assert model.cfg.pattern == pattern
