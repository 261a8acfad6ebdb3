"""NativeSparseAttention against a reference written query by query from its definition (module docstring), and
MoBAAttention as a layer."""

from __future__ import annotations

import pytest
import torch

import longattn as la
from longattn.modules import MoBAAttention, NativeSparseAttention, NSAShape
from longattn.patterns import sliding_window

SIZES = dict(cmp_length=8, cmp_stride=4, select_block=16, select_top=3, window=16, init_blocks=1, local_blocks=1)


def softmax_mix(q, keys, values, scale):
    """softmax(q . keys) @ values for one query; zeros when there is no key."""
    if keys.shape[0] == 0:
        return torch.zeros_like(values[:1].sum(0)) if values.numel() else q.new_zeros(q.shape[-1])
    return torch.softmax(keys @ q * scale, 0) @ values


def reference_nsa(module: NativeSparseAttention, x, kpm=None):
    """One query at a time: compressed branch, importance cell by cell, the choice, the selected keys, the window
    and the gates (summaries come from the module's own compressors: phi is part of the definition)."""
    q, branches, gates = module.branches(x, kpm)
    shape, causal = module.shape, module.causal
    b, h, n, d = q.shape
    group = h // module.kv_heads
    scale = d ** -0.5
    real = torch.ones(b, n, dtype=torch.bool) if kpm is None else kpm
    k_cmp, v_cmp = branches["compressed"]
    s = k_cmp.shape[2]
    blk = shape.select_block
    nsb = -(-n // blk)
    cells = shape.cmp_length // shape.cmp_stride
    rows = []
    for e in range(b):
        heads = []
        for hq in range(h):
            kh = hq // group
            out = []
            for p in range(n):
                def visible_summaries():
                    first = [t * shape.cmp_stride for t in range(s)]
                    return [t for t in range(s) if real[e, first[t]:first[t] + shape.cmp_length].all()
                            and (not causal or first[t] + shape.cmp_length - 1 <= p)]
                vis = visible_summaries()
                o_cmp = softmax_mix(q[e, hq, p], k_cmp[e, kh, vis], v_cmp[e, kh, vis], scale)
                # importance: the summed compressed probabilities of the group's heads, spread over stride cells
                importance = [0.0] * nsb
                for hg in range(kh * group, (kh + 1) * group):
                    if not vis:
                        continue
                    probs = torch.softmax(k_cmp[e, kh, vis].detach() @ q[e, hg, p].detach() * scale, 0)
                    for t, prob in zip(vis, probs.tolist()):
                        for c in range(cells):
                            importance[((t + c) * shape.cmp_stride) // blk] += prob / cells
                own = p // blk
                forced = [j for j in range(nsb) if (j < shape.init_blocks or own - shape.local_blocks < j <= own)
                          and (not causal or j * blk <= p)]
                eligible = [j for j in range(nsb) if j not in forced and real[e, j * blk:(j + 1) * blk].any()
                            and (not causal or j * blk <= p)]
                eligible.sort(key=lambda j: (-importance[j], j))
                chosen = forced + eligible[:shape.select_top - len(forced)]
                keys = [j for c in chosen for j in range(c * blk, min(n, (c + 1) * blk))
                        if real[e, j] and (not causal or j <= p)]
                o_sel = softmax_mix(q[e, hq, p], branches["selected"][0][e, kh, keys],
                                    branches["selected"][1][e, kh, keys], scale)
                lo, hi = (p - shape.window + 1, p) if causal else (p - shape.window // 2, p + shape.window // 2)
                win = [j for j in range(max(0, lo), min(n, hi + 1)) if real[e, j]]
                o_win = softmax_mix(q[e, hq, p], branches["window"][0][e, kh, win], branches["window"][1][e, kh, win],
                                    scale)
                g = gates[e, hq, p]
                out.append(g[0] * o_cmp + g[1] * o_sel + g[2] * o_win)
            heads.append(torch.stack(out))
        rows.append(torch.stack(heads))
    out = torch.stack(rows)  # (B, H, N, D)
    return module.proj(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_nsa_equals_the_loop_reference(causal, backend):
    torch.manual_seed(0)
    module = NativeSparseAttention(32, 4, kv_heads=2, causal=causal, backend=backend, **SIZES).double()
    x = torch.randn(2, 61, 32, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 61, dtype=torch.bool)
    kpm[1, 45:] = False  # padding: one selection block holds none but padding
    out, ref = module(x, key_padding_mask=kpm), reference_nsa(module, x, kpm)
    assert (out - ref).abs().max() < 1e-10
    cot = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *module.parameters()], cot, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [x, *module.parameters()], cot, allow_unused=True)
    for (name, _), g, r in zip([("x", None), *module.named_parameters()], grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert (g - r).abs().max() < 1e-9, name


def test_nsa_causal_never_sees_the_future_and_every_branch_counts():
    torch.manual_seed(1)
    module = NativeSparseAttention(32, 4, causal=True, **SIZES).double()
    x = torch.randn(1, 70, 32, dtype=torch.float64)
    out = module(x)
    y = x.clone()
    y[:, 50:] += torch.randn_like(y[:, 50:])
    assert torch.equal(module(y)[:, :50], out[:, :50])
    for n, branch in enumerate(("compressed", "selected", "window")):  # closing a gate changes the output
        with torch.no_grad():
            module.gate.bias.view(4, 3)[:, n] = -1e4
        assert not torch.allclose(module(x), out), branch
        module.gate.reset_parameters()
        torch.manual_seed(1)


def test_nsa_long_input_runs_on_the_pair_kernel_and_trains():
    module = NativeSparseAttention(64, 4, kv_heads=1, causal=True, select_block=32, select_top=4, window=64)
    x = torch.randn(1, 3000, 64, requires_grad=True)
    out = module(x)
    out.square().mean().backward()
    assert out.shape == x.shape and x.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in module.named_parameters()), "every parameter gets a gradient"


def test_nsa_sizes_are_checked():
    with pytest.raises(ValueError, match="cmp_stride"):
        NSAShape(cmp_length=30, cmp_stride=16)
    with pytest.raises(ValueError, match="select_top"):
        NSAShape(select_top=2, init_blocks=1, local_blocks=2)
    with pytest.raises(ValueError, match="kv_heads"):
        NativeSparseAttention(32, 4, kv_heads=3)
    with pytest.raises(TypeError, match="unknown NSA size"):
        NativeSparseAttention(32, 4, window_size=3)
    with pytest.raises(ValueError, match=r"x must have shape"):
        NativeSparseAttention(32, 4)(torch.randn(2, 10, 16))


def test_moba_layer_is_topk_blocks_and_composes():
    torch.manual_seed(0)
    layer = MoBAAttention(32, 4, block=16, top_k=2, causal=True, extra=sliding_window(8, 0)).double()
    x = torch.randn(2, 70, 32, dtype=torch.float64, requires_grad=True)
    dense = layer(x)
    layer.backend = "blocked"
    blocked = layer(x)
    assert (dense - blocked).abs().max() < 1e-12
    (gd,), (gb,) = torch.autograd.grad(dense.sum(), [x]), torch.autograd.grad(blocked.sum(), [x])
    assert (gd - gb).abs().max() < 1e-10
    y = x.detach().clone()
    y[:, 40:] = 0
    assert torch.equal(layer(y)[:, :40], layer(x.detach())[:, :40])  # causal
    with pytest.raises(TypeError, match="builds its own pattern"):
        MoBAAttention(32, 4, pattern=la.full())


def test_selection_cost_bench_measures_every_row():
    from longattn.tools.selection_cost import LAYERS, cost_table, measure

    rows = measure([256], min_run_time=0.01, flex=False, progress=False)
    assert {r.layer for r in rows if r.mode == "fwd+bwd"} == set(LAYERS)
    assert all(r.ms > 0 for r in rows) and all(r.peak_mb > 0 for r in rows if r.layer in LAYERS)
    table = cost_table(rows)
    assert "moba: choice" in table and "choice's share" in table
