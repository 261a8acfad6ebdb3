"""What a vision backbone costs: parameters, multiply-adds at an input size, forward latency against a baseline.

Multiply-adds are counted by ``torch.utils.flop_counter`` on a real forward (convolutions, matmuls, the
attention's two products; one multiply-add = two FLOPs); element-wise work (BN, ReLU, softmax, the
relative-logit bias additions) is not counted, as in the papers' figures. PyTorch has no formula for SDPA's
fused CPU kernel; it gets the same one as the GPU kernels.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..models import create_model

#: Srinivas et al. 2021 (1000 classes): parameters (Table 13 / text) and multiply-adds at 1024 x 1024 (COCO).
PAPER = {"resnet50": {"params": 25.5e6, "madds_1024": 85.4e9}, "botnet50": {"params": 20.8e6, "madds_1024": 102.98e9}}


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def multiply_adds(model: nn.Module, size: tuple[int, int], *, in_chans: int = 3) -> float:
    """Multiply-adds of one forward on a ``size`` image (batch 1)."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu})
    with counter:
        model.eval()(torch.zeros(1, in_chans, *size))
    return counter.get_total_flops() / 2


@dataclass(frozen=True)
class LatencyRow:
    size: tuple[int, int]
    baseline_ms: float  # median forward, batch 1
    model_ms: float

    @property
    def ratio(self) -> float:
        return self.model_ms / self.baseline_ms


@torch.no_grad()
def paired_latency(baseline: nn.Module, model: nn.Module, size: tuple[int, int], *, repeats: int = 7,
                   in_chans: int = 3, channels_last: bool = True) -> LatencyRow:
    """Median forward time of both models on one ``size`` image, the two taking turns (so that a drifting
    machine slows both alike), after one warm-up each."""
    x = torch.randn(1, in_chans, *size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    nets = [m.eval().to(memory_format=fmt) for m in (baseline, model)]
    times: list[list[float]] = [[], []]
    for net in nets:
        net(x)
    for _ in range(repeats):
        for net, ts in zip(nets, times):
            tick = time.perf_counter()
            net(x)
            ts.append((time.perf_counter() - tick) * 1e3)
    return LatencyRow(tuple(size), statistics.median(times[0]), statistics.median(times[1]))


def cost_table(names: list[str], sizes: list[tuple[int, int]], *, num_classes: int = 1000) -> list[dict]:
    """Parameters and multiply-adds of named models (``create_model``) at each size, beside the paper's."""
    rows = []
    for name in names:
        model = create_model(name, num_classes=num_classes)
        row = {"model": name, "params": parameters(model), "paper_params": PAPER.get(name, {}).get("params")}
        for size in sizes:
            row[f"madds_{size[0]}x{size[1]}"] = multiply_adds(model, size)
        row["paper_madds_1024"] = PAPER.get(name, {}).get("madds_1024")
        rows.append(row)
    return rows


def attention_cost(map_sizes: list[int], *, radius: int, dim: int = 512, heads: int = 4,
                   min_run_time: float = 1.0) -> list[dict]:
    """Forward time and peak extra memory of one BoT50 c5 MHSA (512 channels, 4 heads, batch 1) on square
    ``s x s`` maps: global attention against a ``radius`` window. Global needs the ``(h, N, N)`` logit bias,
    so it stops (None) past 2**31 bias elements."""
    from ..tools.measure import median_ms, peak_mb
    from ..modules import BottleneckAttention2d

    cpu = torch.device("cpu")
    rows = []
    for s in map_sizes:
        x = torch.randn(1, dim, s, s).contiguous(memory_format=torch.channels_last)
        row = {"map": s, "tokens": s * s}
        for name, r in (("global", None), ("local", radius)):
            if r is None and heads * (s * s) ** 2 > 2 ** 31:
                row[f"{name}_ms"] = row[f"{name}_mb"] = None
                continue
            m = BottleneckAttention2d(dim, heads=heads, feat_size=s, radius=r).eval()
            with torch.no_grad():
                fn = lambda: m(x)  # noqa: E731
                row[f"{name}_ms"] = median_ms(fn, cpu, min_run_time)
                row[f"{name}_mb"] = peak_mb(fn, cpu, compiled=False)
        rows.append(row)
    return rows
