"""Training a Transformer-XL byte LM: recurrence over segments, exact resume, torchrun DDP.

The training split is cut into ``batch_size`` streams; step ``s`` reads segment ``s mod n`` of every stream,
so consecutive steps see consecutive text and the memory carries over (it restarts, empty, at each epoch).
The batch is a function of the step, and the checkpoint holds everything else that the next step depends on
(weights, optimizer, each process's RNG state and memory), so a run killed at any moment and resumed from
its last checkpoint gives the losses of an uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..models.xl import TransformerXL, XLConfig
from ..training import checkpoint
from ..training.distributed import World, all_sum, barrier, init_world, wrap
from ..training.run import (Progress, load_checkpoint, machine, optimizer_step, save_checkpoint, warmup_cosine,
                            write_result)
from ..training.state import progress_bar
from .corpus import Corpus, load_corpus, num_segments, segment, streams, unigram_bits_per_byte
from .evaluate import LN2, evaluate

CHECKPOINT = "checkpoint.safetensors"
RESULT = "result.json"
MODEL_DIR = "model"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # streams per step, over all processes
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 0.25  # the paper's clip
    eval_every: int = 100
    eval_bytes: int = 100_000  # validation prefix evaluated during training
    eval_batch: int = 4
    seed: int = 0


@dataclass
class LMRunConfig:
    model: XLConfig = field(default_factory=XLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    corpus: str | None = None  # None = the Python standard library corpus; else a raw file or .zip

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMRunConfig":
        return cls(XLConfig.from_dict(d["model"]), TrainConfig(**d["train"]), d.get("corpus"))


#: named sizes; ``small`` is the issue's "4 layers, 256 wide", ``tiny`` keeps tests and CI fast
PRESETS: dict[str, dict] = {
    "small": dict(model=dict(dim=256, depth=4, heads=4, seg_len=256, mem_len=256, dropout=0.0),
                  train=dict(batch_size=16, lr=1e-3, warmup=100)),
    "tiny": dict(model=dict(dim=32, depth=2, heads=2, seg_len=32, mem_len=32, dropout=0.0),
                 train=dict(batch_size=4, lr=3e-3, warmup=10, eval_every=10, eval_bytes=4096)),
}


def preset(name: str, *, model: dict | None = None, train: dict | None = None, corpus: str | None = None
           ) -> LMRunConfig:
    """A named run config with field overrides: ``preset("small", model={"pattern": "window"})``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[name]
    return LMRunConfig(XLConfig(**{**base["model"], **(model or {})}),
                       TrainConfig(**{**base["train"], **(train or {})}), corpus)


def learning_rate(t: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``t.steps`` (the paper's schedule)."""
    return warmup_cosine(t.lr, step, t.warmup, t.steps)


def _gather_memory(memory: list[Tensor] | None, world: World) -> list[Tensor] | None:
    """Every process's memory rows, concatenated in rank order (the global stream order)."""
    if memory is None or world.size == 1:
        return memory
    gathered = []
    for m in memory:
        parts = [torch.empty_like(m) for _ in range(world.size)]
        dist.all_gather(parts, m.contiguous())
        gathered.append(torch.cat(parts, dim=0))
    return gathered


def train_lm(cfg: LMRunConfig, *, out_dir: Path | str, corpus: Corpus | None = None, device: str = "cpu",
             strategy: str = "ddp", progress: bool = True, resume: bool = True,
             stop_after: int | None = None) -> dict:
    """Train ``cfg`` and write ``checkpoint.safetensors``, ``model/`` and ``result.json`` into ``out_dir``.

    Args:
        corpus: preloaded corpus (default ``load_corpus(cfg.corpus)``).
        strategy: "ddp" or "fsdp" under torchrun.
        resume: continue from ``out_dir``'s checkpoint when there is one (it must be of the same run).
        stop_after: end this process after that many steps in total (the checkpoint stays for a later call).
    """
    world = init_world(device)
    out = Path(out_dir)
    t, mcfg = cfg.train, cfg.model
    if t.batch_size % world.size:
        raise ValueError(f"batch_size ({t.batch_size}) must be divisible by the number of processes ({world.size})")
    corpus = corpus or load_corpus(cfg.corpus)
    local = t.batch_size // world.size
    rows = streams(corpus.train, t.batch_size)[world.rank * local:(world.rank + 1) * local]  # (B/P, L)
    per_epoch = num_segments(rows.shape[1], mcfg.seg_len)
    if per_epoch < 1:
        raise ValueError(f"the training split ({corpus.train.numel()} bytes) is too short for {t.batch_size} "
                         f"streams of segments of {mcfg.seg_len}")
    torch.manual_seed(t.seed)  # same initial weights on every process
    model = TransformerXL(mcfg, device=world.device)
    net = wrap(model, world, strategy)
    optimizer = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    identity = {"config": cfg.to_dict(), "corpus": corpus.fingerprint, "world_size": world.size}

    run, memory = Progress(), None
    torch.manual_seed(t.seed + 1 + world.rank)  # dropout streams differ per process
    path = out / CHECKPOINT
    if resume and path.exists():
        run, state = load_checkpoint(path, identity, net, optimizer, world, differs="config, corpus or process count")
        if state["memory"] is not None:
            memory = [m[world.rank * local:(world.rank + 1) * local].to(world.device) for m in state["memory"]]

    def save() -> None:
        save_checkpoint(path, identity, net, optimizer, run, world, memory=_gather_memory(memory, world))

    last = min(t.steps, stop_after if stop_after is not None else t.steps)
    bar = progress_bar(progress and world.main, total=t.steps, initial=run.step, desc="lm train", unit="step",
                       leave=False)
    net.train()
    while run.step < last:
        tick = time.perf_counter()
        index = run.step % per_epoch
        if index == 0:
            memory = None  # a new epoch starts each stream over: nothing before it to remember
        inputs, targets = (x.to(world.device) for x in segment(rows, index, mcfg.seg_len))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(t, run.step)
        result = net(inputs, memory, targets=targets)
        optimizer_step(net, optimizer, result.loss, t.grad_clip)
        memory = result.memory
        run.step += 1
        run.running += torch.tensor([result.loss.item() * targets.numel(), targets.numel()], dtype=torch.float64)
        run.seconds += time.perf_counter() - tick
        if bar is not None:
            bar.update(1)
            bar.set_postfix(bpb=f"{result.loss.item() / LN2:.3f}")
        if run.step % t.eval_every == 0 or run.step == t.steps:
            total = all_sum(run.running, world)
            val = evaluate(model, corpus.valid, seg_len=mcfg.seg_len, mem_len=mcfg.mem_len, batch=t.eval_batch,
                           max_bytes=t.eval_bytes, world=world)
            run.history.append({"step": run.step, "train_bpb": float(total[0] / total[1] / LN2),
                                "val_bpb": val.bits_per_byte, "lr": learning_rate(t, run.step - 1),
                                "seconds": run.seconds})
            run.running.zero_()
            if bar is not None:
                bar.set_postfix(bpb=f"{run.history[-1]['train_bpb']:.3f}", val=f"{val.bits_per_byte:.3f}")
            save()
    if bar is not None:
        bar.close()
    if run.step < t.steps:  # stopped early on request: the checkpoint holds everything
        save()
        return {"finished": False, "step": run.step}

    result = {
        "finished": True, "steps": run.step, "params": sum(p.numel() for p in model.parameters()),
        "pattern": mcfg.pattern or "full", "world_size": world.size, "train_seconds": run.seconds,
        "seconds_per_step": run.seconds / run.step if run.step else None, "history": run.history,
        "val_bpb": run.history[-1]["val_bpb"] if run.history else None,
        "unigram_bpb": unigram_bits_per_byte(corpus.train, corpus.valid[:t.eval_bytes]),
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint, "sizes": list(corpus.sizes)},
        "config": cfg.to_dict(),
        "machine": machine(world),
    }
    if world.main:
        model.save_pretrained(out / MODEL_DIR)
        write_result(out / RESULT, result)
    barrier(world)
    return result


def load_lm(path: Path | str, *, device: str = "cpu") -> TransformerXL:
    """A trained LM from a run directory (its ``model/`` or, mid-run, its checkpoint) or a model directory."""
    path = Path(path)
    if (path / "config.json").exists():
        return TransformerXL.from_pretrained(path, device=device)
    if (path / MODEL_DIR / "config.json").exists():
        return TransformerXL.from_pretrained(path / MODEL_DIR, device=device)
    if (path / CHECKPOINT).exists():
        state = checkpoint.load(path / CHECKPOINT)
        model = TransformerXL(LMRunConfig.from_dict(state["identity"]["config"]).model, device=device)
        model.load_state_dict(state["model"])
        return model.eval()
    raise FileNotFoundError(f"{path}: no config.json, {MODEL_DIR}/ or {CHECKPOINT} (not a model or LM run directory)")
