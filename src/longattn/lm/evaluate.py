"""Bits per byte of a Transformer-XL LM: segment by segment with memory, or recomputing every position.

``evaluate`` is the paper's evaluation: the data is cut into B streams, each read segment after segment
with the memory carried along, so every byte is predicted once with up to ``mem_len + seg_len`` bytes of
context at the first layer (and more through the layers). ``evaluate_recompute`` is the vanilla
Transformer's evaluation (Al-Rfou et al.): each byte is predicted by a fresh forward over the ``context``
bytes before it, which costs a whole forward per byte; its time per byte against ``evaluate``'s is the speed
claim of the paper (up to 1,800x at 3,800 tokens on a GPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..training.distributed import World, all_sum
from ..training.progress import progress_bar
from .corpus import num_segments, segment, streams

LN2 = math.log(2.0)


@dataclass(frozen=True)
class EvalResult:
    bits_per_byte: float
    bytes: int  # bytes predicted
    seconds: float

    @property
    def ms_per_byte(self) -> float:
        return 1000.0 * self.seconds / max(self.bytes, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: Tensor, *, seg_len: int, mem_len: int, batch: int = 1,
             max_bytes: int | None = None, world: World | None = None, progress: bool = False,
             desc: str = "eval") -> EvalResult:
    """Bits per byte of ``data`` (1-D uint8) read as ``batch`` streams in segments of ``seg_len`` with memory.

    ``max_bytes`` evaluates a prefix only (quick checks during training). Under torchrun each process takes
    its share of the streams (``batch`` must divide by the number of processes).
    """
    world = world or World(0, 1, torch.device("cpu"))
    if batch % world.size:
        raise ValueError(f"batch ({batch}) must be divisible by the number of processes ({world.size})")
    was_training = model.training
    model.eval()
    data = data if max_bytes is None else data[:max_bytes]
    rows = streams(data, batch)  # (B, L)
    local = batch // world.size
    rows = rows[world.rank * local:(world.rank + 1) * local]
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)  # nats, bytes
    memory = None
    n = num_segments(rows.shape[1], seg_len)
    bar = progress_bar(progress and world.main, total=n, desc=desc, unit="seg", leave=False)
    start = time.perf_counter()
    for index in range(n):
        inputs, targets = (t.to(device) for t in segment(rows, index, seg_len))
        out = model(inputs, memory, targets=targets, mem_len=mem_len)
        memory = out.memory
        total += torch.tensor([out.loss.item() * targets.numel(), targets.numel()], dtype=torch.float64)
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    model.train(was_training)
    total = all_sum(total, world)
    return EvalResult(float(total[0] / total[1] / LN2) if total[1] else float("nan"), int(total[1]), seconds)


@dataclass(frozen=True)
class SpeedComparison:
    context: int
    memory: EvalResult  # segments of seg_len after a memory of `context` states
    recompute: EvalResult  # a fresh forward over `context` bytes per predicted byte

    @property
    def speedup(self) -> float:
        return self.recompute.ms_per_byte / self.memory.ms_per_byte


@torch.no_grad()
def memory_speedup(model: nn.Module, data: Tensor, *, context: int, seg_len: int, segments: int = 4,
                   positions: int = 32, progress: bool = False) -> SpeedComparison:
    """Time per predicted byte with a memory of ``context`` states against recomputing ``context`` bytes.

    The memory is filled by reading the first ``context`` bytes (untimed); then ``segments`` segments are
    timed, each byte seeing at least ``context`` earlier states. Recomputation predicts ``positions`` bytes
    from the same point, each from the ``context`` bytes before it.
    """
    need = context + max(segments * seg_len, positions) + 1
    if data.numel() < need:
        raise ValueError(f"data has {data.numel()} bytes; {need} needed for context {context}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = data[:need].long().to(device)[None]  # (1, need)
    memory = None
    for start in range(0, context, seg_len):  # fill the memory, untimed
        memory = model(ids[:, start:min(start + seg_len, context)], memory, mem_len=context).memory
    nats, tick = 0.0, time.perf_counter()
    for s in range(segments):
        lo = context + s * seg_len
        out = model(ids[:, lo:lo + seg_len], memory, targets=ids[:, lo + 1:lo + 1 + seg_len], mem_len=context)
        memory = out.memory
        nats += out.loss.item() * seg_len
    timed = EvalResult(nats / (segments * seg_len) / LN2, segments * seg_len, time.perf_counter() - tick)
    model.train(was_training)
    vanilla = evaluate_recompute(model, data[:need], context=context, positions=positions, progress=progress)
    return SpeedComparison(context, timed, vanilla)


@torch.no_grad()
def evaluate_recompute(model: nn.Module, data: Tensor, *, context: int, positions: int, batch: int = 8,
                       progress: bool = False) -> EvalResult:
    """Vanilla evaluation: byte ``t`` is predicted by a forward over bytes ``t - context .. t - 1``, no memory.

    Evaluates ``positions`` consecutive bytes after the first ``context`` ones, ``batch`` windows per forward
    (the same total work as one window per forward, with less per-call overhead: the fairest baseline).
    """
    if data.numel() < context + positions:
        raise ValueError(f"data has {data.numel()} bytes; context ({context}) + positions ({positions}) needed")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    offsets = torch.arange(context)
    nats = 0.0
    bar = progress_bar(progress, total=positions, desc=f"recompute@{context}", unit="B", leave=False)
    start = time.perf_counter()
    for first in range(context, context + positions, batch):
        ends = torch.arange(first, min(first + batch, context + positions))  # predicted positions
        windows = data[(ends[:, None] - context) + offsets].long().to(device)  # (b, context)
        logits = model(windows, mem_len=0).logits[:, -1]  # (b, vocab): the last position predicts data[end]
        nats += F.cross_entropy(logits.float(), data[ends].long().to(device), reduction="sum").item()
        if bar is not None:
            bar.update(len(ends))
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    model.train(was_training)
    return EvalResult(nats / positions / LN2, positions, seconds)
