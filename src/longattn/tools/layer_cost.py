"""One layer's cost against the sequence length: full attention (SDPA), the fixed pattern Combiner is built on,
Combiner's kinds and FIT, forward and forward+backward, with the log-log slope of time against N.

Each layer is a whole pre-LN Transformer layer (attention + MLP) of the same width, so that FIT, whose
"layer" is a local layer, a write, a global layer over the latents and a read, is compared on equal terms:

- ``full``: ``Block`` with full attention (dense SDPA at every length);
- ``fixed``: ``Block`` with ``SameBlock(ceil(sqrt N))``, the fixed blocks alone (what Combiner-Fixed adds
  its abstractions to);
- ``combiner-<kind>``: ``Block`` with ``CombinerAttention(kind)``;
- ``fit``: ``FIT`` with schedule ``(1)1(0)``: one local layer, write, one global layer (no read: the last
  block's reads are never done).

``longattn bench --layers full fixed combiner-fixed combiner-axial fit --lengths 1024 4096 16384``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..io import markdown_table
from ..models.encoder import FITMixer
from ..models.fit import FIT, FITConfig
from ..modules import Block, CombinerAttention
from ..modules.combiner import KINDS as COMBINER_KINDS
from ..patterns.sparse_transformer import SameBlock
from ..training.progress import progress_bar
from .measure import median_ms, peak_mb

LAYERS = ("full", "fixed", *(f"combiner-{kind}" for kind in COMBINER_KINDS), "fit")


@dataclass
class LayerRow:
    layer: str
    length: int
    mode: str  # "fwd" or "fwd+bwd"
    ms: float
    peak_mb: float | None

    def row(self) -> dict:
        return asdict(self)


def build_layer(name: str, length: int, *, dim: int, heads: int) -> torch.nn.Module:
    """The layer ``name`` (see the module docstring) for inputs of ``length`` tokens."""
    if name not in LAYERS:
        raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {name!r}")
    ffn = 4 * dim
    if name == "fit":
        mixer = FITMixer()
        return FIT(FITConfig(dim=dim, heads=heads, group_size=mixer.group(length), latents=mixer.latents,
                             max_len=length, schedule="(1)1(0)", ffn_dim=ffn))
    if name.startswith("combiner-"):
        return Block(dim, heads, ffn, attn=CombinerAttention(dim, heads, kind=name.removeprefix("combiner-")))
    pattern = SameBlock(math.ceil(math.sqrt(length))) if name == "fixed" else None
    return Block(dim, heads, ffn, pattern=pattern)


def measure_layers(layers: list[str], lengths: list[int], *, dim: int = 256, head_dim: int = 64, batch: int = 1,
                   min_run_time: float = 1.0, progress: bool = True) -> list[LayerRow]:
    """Time and peak memory of every (layer, length, mode) on the CPU, fp32; ``dim / head_dim`` heads."""
    if dim % head_dim:
        raise ValueError(f"head_dim ({head_dim}) must divide the layers' width {dim}")
    heads = dim // head_dim
    device = torch.device("cpu")
    jobs = [(name, n, mode) for n in lengths for name in layers for mode in ("fwd", "fwd+bwd")]
    bar = progress_bar(progress, total=len(jobs), desc="layers", unit="run", leave=False)
    rows = []
    for name, n, mode in jobs:
        torch.manual_seed(0)
        rows.append(time_layer(name, build_layer(name, n, dim=dim, heads=heads), n, mode, dim=dim, batch=batch,
                               device=device, min_run_time=min_run_time))
        bar.update(1)
        bar.set_postfix(last=f"{name}@{n} {mode} {rows[-1].ms:.0f} ms")
    bar.close()
    return rows


def time_layer(name: str, layer: torch.nn.Module, n: int, mode: str, *, dim: int, batch: int,
               device: torch.device, min_run_time: float) -> LayerRow:
    """One layer's median time and peak memory on ``batch`` random inputs of ``n`` tokens, forward ("fwd") or
    forward+backward, after a warm-up call (plans and schedules)."""
    x = torch.randn(batch, n, dim, requires_grad=mode != "fwd")

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                run(layer, x)
        else:
            run(layer, x).sum().backward()

    step()
    return LayerRow(name, n, mode, median_ms(step, device, min_run_time), peak_mb(step, device, False))


def run(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x).last_hidden_state if isinstance(layer, FIT) else layer(x, None)


def slope(rows: list[LayerRow], name: str, mode: str) -> float | None:
    """The least-squares slope of log(ms) against log(N) (1: linear, 2: quadratic)."""
    points = [(math.log(r.length), math.log(r.ms)) for r in rows if r.layer == name and r.mode == mode]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    return sum((a - mx) * (b - my) for a, b in points) / sum((a - mx) ** 2 for a, _ in points)


#: the complexity each layer's attention should follow
EXPECTED = {"full": "N^2", "fixed": "N^1.5", "combiner-fixed": "N^1.5", "combiner-logsparse": "N log N",
            "combiner-axial": "N^1.5", "combiner-mixture": "N^1.5", "fit": "N^(4/3)"}


def layer_table(rows: list[LayerRow]) -> str:
    lengths = sorted({r.length for r in rows})
    names = list(dict.fromkeys(r.layer for r in rows))
    by = {(r.layer, r.length, r.mode): r for r in rows}
    out = []
    for mode in ("fwd", "fwd+bwd"):
        head = ["layer"] + [f"{n} ms (MB)" for n in lengths] + ["slope", "paper"]
        body = []
        for name in names:
            cells = []
            for n in lengths:
                r = by.get((name, n, mode))
                cells.append("-" if r is None else f"{r.ms:.1f} ({r.peak_mb:.0f})" if r.peak_mb is not None
                             else f"{r.ms:.1f}")
            s = slope(rows, name, mode)
            body.append([name, *cells, "-" if s is None else f"{s:.2f}", EXPECTED[name]])
        out.append(f"{mode}:\n" + markdown_table(head, body))
    return "\n\n".join(out)
