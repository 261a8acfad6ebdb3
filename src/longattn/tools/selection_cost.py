"""What content-chosen keys cost: one causal layer of MoBA and of NSA against full attention (SDPA) and a sliding
window of MoBA's key budget, forward and forward+backward, time and peak memory; then the attention alone,
forward: the choice's share of it, and compiled FlexAttention with a block mask built from the same choice.

Each layer is a pre-LN Transformer layer (attention + MLP) of width ``dim`` and heads of ``head_dim``, causal
(a decoder's prefill, MoBA's and NSA's headline setting):

- ``full``: causal SDPA;
- ``window``: ``causal(sliding_window(top_k * block - 1, 0))``, as many keys per query as MoBA attends;
- ``moba``: ``MoBAAttention(block, top_k, causal=True)``;
- ``nsa``: ``NativeSparseAttention`` with the paper's sizes (summaries of 32 every 16, the top 16 of the
  64-token blocks, a window of 512), one key head per query head.

``longattn bench --selection --lengths 4096 8192 16384 32768 65536``.
"""

from __future__ import annotations

import torch

from ..io import markdown_table
from ..modules import Block, MoBAAttention, NativeSparseAttention
from ..modules.native_sparse import NSAShape, select_blocks as nsa_select
from ..patterns import Geometry, causal, sliding_window
from ..patterns.topk_blocks import resolve, topk_blocks
from ..training.progress import progress_bar
from .layer_cost import LayerRow, time_layer
from .measure import median_ms

LAYERS = ("full", "window", "moba", "nsa")
MOBA_BLOCK, MOBA_TOP = 128, 4  # 512 keys per query
NSA = NSAShape()  # the paper's sizes


def build_layer(name: str, *, dim: int, heads: int) -> torch.nn.Module:
    ffn = 4 * dim
    if name == "moba":
        return Block(dim, heads, ffn, attn=MoBAAttention(dim, heads, block=MOBA_BLOCK, top_k=MOBA_TOP, causal=True))
    if name == "nsa":
        return Block(dim, heads, ffn, attn=NativeSparseAttention(dim, heads, shape=NSA, causal=True))
    if name == "window":
        return Block(dim, heads, ffn, pattern=causal(sliding_window(MOBA_TOP * MOBA_BLOCK - 1, 0)))
    if name == "full":
        return Block(dim, heads, ffn, pattern=causal())
    raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {name!r}")


def measure(lengths: list[int], *, layers: tuple[str, ...] = LAYERS, dim: int = 256, head_dim: int = 64,
            full_max: int = 32768, flex: bool = True, min_run_time: float = 1.0, progress: bool = True
            ) -> list[LayerRow]:
    """Every (layer, length, mode), then the attention-only forwards; full attention up to ``full_max`` tokens."""
    heads = dim // head_dim
    cpu = torch.device("cpu")
    jobs = [(name, n, mode) for n in lengths for name in layers for mode in ("fwd", "fwd+bwd")
            if name != "full" or n <= full_max]
    bar = progress_bar(progress, total=len(jobs) + len(lengths), desc="selection cost", unit="run", leave=False)
    rows = []
    for name, n, mode in jobs:
        torch.manual_seed(0)
        rows.append(time_layer(name, build_layer(name, dim=dim, heads=heads), n, mode, dim=dim, batch=1, device=cpu,
                               min_run_time=min_run_time))
        bar.update(1)
        bar.set_postfix(last=f"{name}@{n} {mode} {rows[-1].ms:.0f} ms")
    for n in lengths:
        rows += attention_only(n, heads=heads, head_dim=head_dim, flex=flex, min_run_time=min_run_time)
        bar.update(1)
    bar.close()
    return rows


@torch.no_grad()
def attention_only(n: int, *, heads: int, head_dim: int, flex: bool, min_run_time: float) -> list[LayerRow]:
    """Forward of the attention alone (B = 1): MoBA's choice, the whole call on the pair kernel, FlexAttention
    with a block mask from the same choice (building it, and the compiled kernel); NSA's choice (the compressed
    scores included) and its whole attention (three branches)."""
    from ..backends import flex as flex_backend
    from ..functional import attention
    from ..modules.native_sparse import native_sparse_attention

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim) for _ in range(3))
    pattern = topk_blocks(MOBA_TOP, MOBA_BLOCK, causal=True)
    out = []

    def timed(what: str, fn) -> None:
        fn()
        out.append(LayerRow(what, n, "fwd", median_ms(fn, cpu, min_run_time), None))

    timed("moba: choice", lambda: pattern.select(q, k))
    timed("moba: attention (pair kernel)", lambda: attention(q, k, v, pattern=pattern, backend="blocked"))
    if flex and flex_backend.available():
        resolved = resolve(pattern, q, k)
        geo = Geometry(n, n, heads, 1)
        timed("moba: flex block mask", lambda: flex_backend.build_block_mask(resolved.pattern, geo, cpu))
        mask = flex_backend.build_block_mask(resolved.pattern, geo, cpu)
        kernel = flex_backend.compiled_flex_attention()
        timed("moba: flex kernel (compiled)", lambda: kernel(q, k, v, block_mask=mask))
    summaries = n and NSA.num_summaries(n)
    k_cmp = torch.randn(1, heads, summaries, head_dim)
    timed("nsa: choice", lambda: nsa_select(q, k_cmp, NSA, causal=True, kv_len=n, group=1, scale=head_dim ** -0.5))
    branches = {"compressed": (k_cmp, k_cmp), "selected": (k, v), "window": (k, v)}
    gates = torch.full((1, heads, n, 3), 0.5)
    timed("nsa: attention (3 branches)", lambda: native_sparse_attention(q, branches, gates, NSA, causal=True))
    return out


def cost_table(rows: list[LayerRow]) -> str:
    lengths = sorted({r.length for r in rows})
    by = {(r.layer, r.length, r.mode): r for r in rows}
    out = []
    for mode in ("fwd", "fwd+bwd"):
        names = list(dict.fromkeys(r.layer for r in rows if r.mode == mode))
        head = ["layer" if mode == "fwd+bwd" else "layer / attention alone"] + [f"{n} ms (MB)" for n in lengths]
        body = []
        for name in names:
            cells = []
            for n in lengths:
                r = by.get((name, n, mode))
                cells.append("-" if r is None else f"{r.ms:.1f}" + ("" if r.peak_mb is None else f" ({r.peak_mb:.0f})"))
            body.append([name, *cells])
        out.append(f"{mode}:\n" + markdown_table(head, body))
    shares = []
    for n in lengths:
        for system in ("moba", "nsa"):
            choice = by.get((f"{system}: choice", n, "fwd"))
            whole = by.get((f"{system}: attention ({'pair kernel' if system == 'moba' else '3 branches'})", n, "fwd"))
            if choice and whole:
                shares.append(f"{system} {n}: {100 * choice.ms / whole.ms:.0f}%")
    if shares:
        out.append("choice's share of the attention's forward: " + ", ".join(shares))
    return "\n\n".join(out)
