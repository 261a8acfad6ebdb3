"""ETC: global-local attention against a naive dense reference, the structure helper, the model, errors."""

from __future__ import annotations

import pytest
import torch

from longattn.models import EtcConfig, EtcModel, EtcStructure, etc_structure
from longattn.models.etc import segment_mean
from longattn.modules.global_local_attention import (QKV, GlobalLocalAttention, GlobalLocalSpec, RelativeTable,
                                                     global_local_attention, relative_vocab_size)


def gla(ql, kl, vl, qg, kg, vg, *, backend="auto", long_relative=None, global_relative=None, **spec):
    """``global_local_attention`` on six tensors and ``(E, bias)`` pairs; returns ``[out_long, out_global]``."""
    tables = [None if t is None else RelativeTable(*t) for t in (long_relative, global_relative)]
    out = global_local_attention(QKV(ql, kl, vl), QKV(qg, kg, vg), GlobalLocalSpec(**spec, long_relative=tables[0],
                                                                                   global_relative=tables[1]),
                                 backend=backend)
    return [out.long, out.global_]


def naive_etc(ql, kl, vl, qg, kg, vg, *, radius, structure, long_rel=None, global_rel=None, hard_g2l=False,
              hard_l2g=False):
    """ETC attention in float64 with an explicit (G + N) x (G + N) score matrix over [globals; longs]."""
    b, h, n, d = ql.shape
    g = qg.shape[2]
    t = g + n
    q, k, v = (torch.cat([x.double(), y.double()], dim=2) for x, y in ((qg, ql), (kg, kl), (vg, vl)))
    is_g = torch.arange(t) < g
    pos = torch.where(is_g, torch.arange(t), torch.arange(t) - g)  # segment index for globals
    seg = torch.cat([torch.arange(g).expand(b, g), structure.long_to_global], dim=1)  # (B, T)
    gg, ll = is_g[:, None] & is_g[None, :], ~is_g[:, None] & ~is_g[None, :]
    cross = ~gg & ~ll
    own = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    delta = pos[None, :] - pos[:, None]
    keep = gg | cross | (ll & (delta.abs() <= radius))
    if hard_l2g:
        keep = keep & ~(~is_g[:, None] & is_g[None, :] & ~own)
    if hard_g2l:
        keep = keep & ~(is_g[:, None] & ~is_g[None, :] & ~own)
    keep = keep & torch.cat([structure.global_mask, structure.long_mask], dim=1)[:, None, :]  # (B, T, T)
    scale = d ** -0.5
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, T, T)
    if long_rel is not None:
        kd = (long_rel[0].shape[0] - 3) // 2
        labels = torch.where(cross, torch.where(own, 2 * kd + 2, 2 * kd + 1), delta.clamp(-kd, kd) + kd)
        emb = torch.where(is_g[None, :, None, None, None], global_rel[0].double()[labels],
                          long_rel[0].double()[labels])  # (B, T, T, H, D)
        bias = torch.where(is_g[None, :, None, None], global_rel[1].double()[labels],
                           long_rel[1].double()[labels])  # (B, T, T, H)
        scores = scores + torch.einsum("bhid,bijhd->bhij", q, emb) * scale + bias.permute(0, 3, 1, 2)
    keep = keep[:, None]
    live = keep.any(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(~keep, float("-inf")).masked_fill(~live, 0.0), -1) * live
    out = p @ v
    return out[:, :, g:], out[:, :, :g]


def segments(lengths: list[list[int]], n: int) -> torch.Tensor:
    """Segment ids (B, n) from per-example segment lengths; the rest is padding (-1)."""
    rows = []
    for lens in lengths:
        ids = torch.cat([torch.full((m,), s) for s, m in enumerate(lens)]) if lens else torch.zeros(0)
        rows.append(torch.cat([ids, torch.full((n - len(ids),), -1)]).long())
    return torch.stack(rows)


def make_inputs(b=2, h=2, n=97, d=40, seg_lengths=None, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seg_lengths = seg_lengths or [[14, 13, 14, 14, 14, 14, 14], [20, 11, 30, 1, 18]]  # 97 / 80 tokens
    st = etc_structure(segments(seg_lengths, n))
    g = st.num_global
    tensors = [torch.randn(b, h, m, d, generator=gen) for m in (n, n, n, g, g, g)]
    v = relative_vocab_size(k)
    rel = [torch.randn(v, h, d, generator=gen), torch.randn(v, h, generator=gen)]
    rel_g = [torch.randn(v, h, d, generator=gen), torch.randn(v, h, generator=gen)]
    return tensors, st, rel, rel_g


def run_and_grads(fn, leaves, dtype=None):
    """Outputs and the gradients of a fixed weighted sum, optionally on ``dtype`` copies of the leaves."""
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    outs = fn(*leaves)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o).to(o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("radius", [0, 5, 200])
@pytest.mark.parametrize("hard", [False, True])
def test_labelled_attention_matches_naive_reference(radius, hard):
    tensors, st, rel, rel_g = make_inputs()
    leaves = [t.requires_grad_() for t in tensors + rel + rel_g]

    def ours(ql, kl, vl, qg, kg, vg, e, bb, eg, bg):
        return gla(ql, kl, vl, qg, kg, vg, local_radius=radius, structure=st, long_relative=(e, bb),
                   global_relative=(eg, bg), hard_g2l=hard, hard_l2g=hard)

    def ref(ql, kl, vl, qg, kg, vg, e, bb, eg, bg):
        return naive_etc(ql, kl, vl, qg, kg, vg, radius=radius, structure=st, long_rel=(e, bb),
                         global_rel=(eg, bg), hard_g2l=hard, hard_l2g=hard)

    outs, grads = run_and_grads(ours, leaves)
    ref_outs, ref_grads = run_and_grads(ref, leaves, torch.float64)
    assert outs[0].shape == (2, 2, 97, 40) and outs[1].shape == (2, 2, 7, 40)
    for a, r in zip(outs, ref_outs):
        torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_unlabelled_attention_uses_longattn_and_matches_reference(backend):
    tensors, st, rel, rel_g = make_inputs(d=16)
    leaves = [t.requires_grad_() for t in tensors]
    outs, grads = run_and_grads(lambda *x: gla(*x, local_radius=5, structure=st, backend=backend), leaves)
    ref_outs, ref_grads = run_and_grads(lambda *x: naive_etc(*x, radius=5, structure=st), leaves, torch.float64)
    for a, r in zip(outs + list(grads), ref_outs + list(ref_grads)):
        torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-5)
    # The blocked kernel with all-zero label tables computes the same thing.
    zeros = tuple(torch.zeros_like(t) for t in rel)
    banded = gla(*tensors, local_radius=5, structure=st, long_relative=zeros, global_relative=zeros)
    for a, r in zip(banded, ref_outs):
        torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-5)


def test_rows_without_keys_give_zeros_and_finite_grads():
    seg = segments([[5, 4], []], 9)  # the second example is all padding: no long or global key
    st = etc_structure(seg)
    tensors = [torch.randn(2, 1, m, 8, requires_grad=True) for m in (9, 9, 9, 2, 2, 2)]
    rel = (torch.randn(5, 1, 8), torch.randn(5, 1))
    out_l, out_g = gla(*tensors, local_radius=2, structure=st, long_relative=rel, global_relative=rel)
    assert out_l[1].abs().max() == 0 and out_g[1].abs().max() == 0
    (out_l.sum() + out_g.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in tensors)


def test_long_side_memory_is_linear():
    """No saved intermediate grows like N^2: with G fixed, the largest one doubles when N doubles."""
    def largest_saved(n: int) -> int:
        st = etc_structure(torch.arange(n).div(n // 4, rounding_mode="floor")[None])  # 4 segments
        tensors = [torch.randn(1, 1, m, 8, requires_grad=True) for m in (n, n, n, 4, 4, 4)]
        rel = (torch.randn(7, 1, 8, requires_grad=True), torch.randn(7, 1, requires_grad=True))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out_l, out_g = gla(*tensors, local_radius=4, structure=st, long_relative=rel, global_relative=rel)
        (out_l.sum() + out_g.sum()).backward()
        return max(sizes)

    small, large = largest_saved(1024), largest_saved(2048)
    assert large <= 2 * 2048 * (3 * 4 + 4)  # about N x (3w + G) per head
    assert large <= 2.1 * small


def test_structure_helper():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1], [0, 0, 0, 0, 2, 2, 2, 2]])
    st = etc_structure(seg, max_global=3)
    assert st.num_global == 3
    assert st.global_mask.tolist() == [[True, True, True], [True, False, True]]  # id 1 unused: padding
    assert st.long_mask.tolist() == (seg >= 0).tolist()
    assert st.long_to_global[0].tolist() == [0, 0, 1, 1, 1, 2, -1, -1]
    x = torch.arange(16.0).view(2, 8, 1)
    means = segment_mean(x, st)
    assert means[0, :, 0].tolist() == [0.5, 3.0, 5.0] and means[1, :, 0].tolist() == [9.5, 0.0, 13.5]
    assert etc_structure(torch.full((2, 4), -1)).num_global == 1  # at least one (padding) global token
    with pytest.raises(ValueError, match="max_global=2"):
        etc_structure(seg, max_global=2)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, N\)"):
        etc_structure(seg[0])
    with pytest.raises(TypeError, match="segment_ids must be an integer tensor"):
        etc_structure(seg.float())


def tiny_config(**overrides) -> EtcConfig:
    base = dict(vocab_size=50, dim=32, depth=2, heads=2, ffn_dim=64, local_radius=3,
                max_relative_distance=2, max_global=8, dropout=0.0, attn_dropout=0.0)
    return EtcConfig(**{**base, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"max_relative_distance": None},
                                       {"hard_g2l": True, "hard_l2g": True, "global_segment_mean": True}])
def test_model_forward_backward_and_padding_invariance(overrides):
    torch.manual_seed(0)
    model = EtcModel(tiny_config(**overrides))
    seg = segments([[6, 9, 8], [10, 7]], 23)
    ids = torch.randint(0, 50, (2, 23))
    out = model(ids, seg)
    assert out.long_hidden_state.shape == (2, 23, 32) and out.global_hidden_state.shape == (2, 3, 32)
    (out.long_hidden_state.sum() + out.global_hidden_state.sum()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    # Padding never leaks into real tokens: change padded ids, real outputs stay put.
    ids2 = ids.clone()
    ids2[1, 17:] = (ids2[1, 17:] + 1) % 50
    out2 = model(ids2, seg)
    torch.testing.assert_close(out2.long_hidden_state[:, :17], out.long_hidden_state[:, :17])
    torch.testing.assert_close(out2.global_hidden_state[:, :2], out.global_hidden_state[:, :2])


def test_model_meta_init_and_types():
    model = EtcModel(tiny_config(), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    model = EtcModel(tiny_config(type_vocab_size=2, global_vocab_size=3), dtype=torch.float64)
    seg = segments([[3, 4]], 7)
    out = model(torch.zeros(1, 7, dtype=torch.long), seg, token_type_ids=torch.ones(1, 7, dtype=torch.long),
                global_token_ids=torch.tensor([[1, 2]]))
    assert out.long_hidden_state.dtype == torch.float64


def test_bad_inputs_name_the_argument():
    model = EtcModel(tiny_config())
    ids = torch.zeros(2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        model(ids, torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="more than max_global=8"):
        model(ids, torch.arange(10).expand(2, 10))
    with pytest.raises(ValueError, match="global_token_ids must have shape"):
        model(ids, torch.zeros(2, 10, dtype=torch.long), global_token_ids=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(ids[0], torch.zeros(10, dtype=torch.long))
    attn = GlobalLocalAttention(16, 2, local_radius=2)
    with pytest.raises(ValueError, match=r"x_global must have shape \(B=2"):
        attn(torch.randn(2, 10, 16), torch.randn(3, 2, 16))
    with pytest.raises(ValueError, match="x_long must have shape"):
        attn(torch.randn(2, 10, 8), torch.randn(2, 2, 16))
    q = torch.randn(2, 2, 10, 8)
    qg = torch.randn(3, 2, 4, 8)
    with pytest.raises(ValueError, match=r"global_qkv.q/global_qkv.v must have shape \(B, H, G, D\) = "
                                         r"\(2, 2, G, 8\)"):
        gla(q, q, q, qg, qg, qg, local_radius=1)
    with pytest.raises(ValueError, match="hard_g2l/hard_l2g need a structure"):
        gla(q, q, q, q, q, q, local_radius=1, hard_l2g=True)
    st = EtcStructure(torch.zeros(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.bool),
                      torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"structure.long_to_global must have shape \(2, 10\)"):
        gla(q, q, q, q, q, q, local_radius=1, structure=st)
    st = EtcStructure(torch.zeros(2, 10, dtype=torch.long), torch.ones(2, 10), torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match="structure.long_mask must be a bool tensor"):
        gla(q, q, q, q, q, q, local_radius=1, structure=st)
    with pytest.raises(ValueError, match="spec.long_relative must be"):
        gla(q, q, q, q, q, q, local_radius=1, long_relative=(torch.zeros(4, 2, 8), torch.zeros(4, 2)))
    with pytest.raises(TypeError, match="spec.global_relative must be a RelativeTable"):
        global_local_attention(QKV(q, q, q), QKV(q, q, q), GlobalLocalSpec(1, global_relative=(q, q)))
    with pytest.raises(TypeError, match="long_qkv and global_qkv must be QKV"):
        global_local_attention((q, q, q), QKV(q, q, q), GlobalLocalSpec(1))
    with pytest.raises(ValueError, match="local_radius must be an int >= 0"):
        gla(q, q, q, q, q, q, local_radius=-1)
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by heads"):
        tiny_config(dim=30, heads=4)


@pytest.mark.parametrize("layers, reaches", [(1, False), (2, True)])
def test_far_tokens_meet_only_through_global_tokens(layers, reaches):
    """Radius 1: after one layer the first token cannot see the last; after two it can (long -> global ->
    long), which is what the global input is for."""
    torch.manual_seed(0)
    model = EtcModel(tiny_config(depth=layers, local_radius=1))
    captured = []
    model.token_embed.register_forward_hook(lambda m, i, o: captured.append(o))
    out = model(torch.randint(0, 50, (1, 16)), torch.zeros(1, 16, dtype=torch.long))
    probe = torch.randn(32)  # not a plain sum: a LayerNorm output sums to a constant
    (grad,) = torch.autograd.grad(out.long_hidden_state[0, 0] @ probe, captured[0])
    assert grad[0, 1].abs().sum() > 0 and (grad[0, 15].abs().sum() > 0) == reaches
    assert grad[0, 2:].abs().sum() > 0 if reaches else grad[0, 2:].abs().sum() == 0
