"""LRA's speed and memory table (the paper's Table 2): every variant against full attention at 1K-4K.

The model is the Text task's (byte-level, CLS pooling; LRA timed its models on that task) at batch 1 by
default. One training step is forward, backward and the AdamW update; one inference step is a forward
under ``no_grad``. Times are medians of ``torch.utils.benchmark`` on CPU (synchronised on GPU); memory is
the extra peak tensor memory of one step above the weights and optimizer state that exist before it.

Two baselines: ``full`` is full attention as longattn runs it (PyTorch's fused SDPA kernel, which never
stores the N x N scores: linear memory), and ``vanilla`` is full attention as LRA's Transformer (and
Hugging Face's eager BERT) computes it: softmax(QK^T)V with the scores materialised (SDPA's math kernel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..tools.measure import median_ms, peak_mb
from ..functional import explain
from .attentions import build_attention
from .configs import ModelShape
from ..models import EncoderConfig, SparseEncoderClassifier
from ..patterns import Pattern
from ..training.progress import progress_bar

LENGTHS = (1024, 2048, 3072, 4096)
MODES = ("train", "infer")
# LRA's Text model (4 layers, width 256, 4 heads of 64, MLP 1024) and a 2-layer version for the quick suite.
TEXT_SHAPE = ModelShape(dim=256, depth=4, heads=4, ffn_dim=1024, dropout=0.0, attn_dropout=0.0)
QUICK_SHAPE = ModelShape(dim=128, depth=2, heads=2, ffn_dim=512, dropout=0.0, attn_dropout=0.0)


@dataclass(frozen=True)
class SpeedRow:
    attention: str
    seq_len: int  # input tokens (the attention also sees the CLS token)
    mode: str  # "train" (forward + backward + AdamW step) or "infer" (forward)
    ms: float  # median time of one step
    steps_per_second: float
    peak_mb: float | None  # extra peak tensor memory of one step
    backend: str  # what longattn.attention chose for this pattern and length

    def row(self) -> dict:
        return asdict(self)


def _backend(model: SparseEncoderClassifier, batch: int, device: torch.device) -> str:
    """The backend ``auto`` picks inside the model's attention (a label for the table)."""
    cfg = model.cfg
    if model.pattern is not None and not isinstance(model.pattern, Pattern):
        return f"{model.pattern.name}: auto per call"  # Combiner or FIT: several attention calls
    q = torch.empty(batch, cfg.heads, cfg.seq_len, (cfg.qkv_dim or cfg.dim) // cfg.heads, device=device)
    return explain(q, q, q, pattern=model.pattern).backend


def measure(attentions: list[str], lengths=LENGTHS, *, shape: ModelShape = TEXT_SHAPE, batch: int = 1,
            modes=MODES, settings: dict[str, dict] | None = None, min_run_time: float = 0.5,
            device: str = "cpu", progress: bool = True) -> list[SpeedRow]:
    """Time and measure every (attention, length, mode)."""
    dev = torch.device(device)
    jobs = [(a, n, m) for n in lengths for a in attentions for m in modes]
    bar = progress_bar(progress, total=len(jobs), desc="speed/memory", unit="run", leave=False)
    rows = []
    for attention, n, mode in jobs:
        torch.manual_seed(0)
        enc = EncoderConfig(vocab_size=256, num_classes=2, max_len=n, dim=shape.dim, depth=shape.depth,
                            heads=shape.heads, qkv_dim=shape.qkv_dim, ffn_dim=shape.ffn_dim, dropout=0.0,
                            attn_dropout=0.0, pooling="cls")
        vanilla = attention == "vanilla"
        pattern = None if vanilla else build_attention(attention, enc.seq_len, (settings or {}).get(attention))
        model = SparseEncoderClassifier(enc, pattern, device=dev)
        tokens = torch.randint(1, 256, (batch, n), device=dev)
        lengths_ = torch.full((batch,), n, device=dev)
        labels = torch.zeros(batch, dtype=torch.long, device=dev)
        if mode == "train":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                loss = F.cross_entropy(model(tokens, lengths_), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            model.eval()

            def step():
                with torch.no_grad():
                    model(tokens, lengths_)
        with sdpa_kernel(SDPBackend.MATH) if vanilla else contextlib.nullcontext():
            step()  # warm-up: plans and schedules, optimizer state
            ms = median_ms(step, dev, min_run_time)
            peak = peak_mb(step, dev, compiled=False)
        label = "math (scores stored)" if vanilla else _backend(model, batch, dev)
        rows.append(SpeedRow(attention, n, mode, ms, 1e3 / ms, peak, label))
        bar.update(1)
        bar.set_postfix(last=f"{attention}@{n} {mode} {ms:.0f} ms")
    bar.close()
    return rows


def relative(rows: list[SpeedRow], baselines=("full", "vanilla")) -> list[dict]:
    """Each row with its speed-up and memory ratio against each baseline at the same length and mode:
    ``speedup``/``memory_ratio`` against ``full``, ``speedup_vs_vanilla``/``memory_vs_vanilla``."""
    out = [r.row() for r in rows]
    for baseline in baselines:
        suffix = "" if baseline == "full" else f"_vs_{baseline}"
        base = {(r.seq_len, r.mode): r for r in rows if r.attention == baseline}
        for d, r in zip(out, rows):
            b = base.get((r.seq_len, r.mode))
            d["speedup" + suffix] = b.ms / r.ms if b else None
            d[("memory_ratio" if baseline == "full" else "memory") + suffix] = (
                r.peak_mb / b.peak_mb if b and r.peak_mb and b.peak_mb else None)
    return out
