"""Training a Transformer-XL byte LM: recurrence over segments, exact resume, torchrun DDP.

The training split is cut into ``batch_size`` streams; step ``s`` reads segment ``s mod n`` of every stream,
so consecutive steps see consecutive text and the memory carries over (it restarts, empty, at each epoch).
The batch is a function of the step, and the checkpoint holds everything else that the next step depends on
(weights, optimizer, each process's RNG state and memory), so a run killed at any moment and resumed from
its last checkpoint gives the losses of an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models.fit_lm import FITLM
from ..models.hf_checkpoint import read_config
from ..models.xl import FIT_LM, TransformerXL, XLConfig
from ..training import checkpoint
from ..training.distributed import World, init_world
from ..training.run import machine, optimizer_step, warmup_cosine
from ..training.setup import CHECKPOINT, MODEL_DIR, RunSpec, per_process, start
from .corpus import Corpus, load_corpus, num_segments, segment, streams, unigram_bits_per_byte
from .evaluate import LN2, evaluate


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


def lm_class(cfg: XLConfig) -> type[nn.Module]:
    """``FITLM`` for ``pattern="fit"``, else ``TransformerXL`` (every pattern and Combiner kind)."""
    return FITLM if cfg.pattern == FIT_LM else TransformerXL


def build_lm(cfg: XLConfig, **kwargs) -> nn.Module:
    """The LM a config stands for, freshly initialised (``kwargs``: backend, device, dtype)."""
    return lm_class(cfg)(cfg, **kwargs)


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
    t, mcfg = cfg.train, cfg.model
    local = per_process(t.batch_size, world)
    corpus = corpus or load_corpus(cfg.corpus)
    rows = streams(corpus.train, t.batch_size)[world.rank * local:(world.rank + 1) * local]  # (B/P, L)
    per_epoch = num_segments(rows.shape[1], mcfg.seg_len)
    if per_epoch < 1:
        raise ValueError(f"the training split ({corpus.train.numel()} bytes) is too short for {t.batch_size} "
                         f"streams of segments of {mcfg.seg_len}")
    spec = RunSpec(out_dir, {"config": cfg.to_dict(), "corpus": corpus.fingerprint},
                   differs="config, corpus or process count", seed=t.seed, batch_size=t.batch_size, steps=t.steps,
                   optimizer=dict(lr=t.lr, weight_decay=t.weight_decay), label="lm train", strategy=strategy,
                   progress=progress, resume=resume)
    trainer = start(spec, world, lambda dev: build_lm(mcfg, device=dev))
    model, net, run = trainer.model, trainer.net, trainer.run
    memory = None  # this process's streams' memory, carried from step to step
    if trainer.state is not None and trainer.state["memory"] is not None:
        memory = [m[world.rank * local:(world.rank + 1) * local].to(world.device) for m in trainer.state["memory"]]

    def step(i: int) -> Tensor:
        nonlocal memory
        index = i % per_epoch
        if index == 0:
            memory = None  # a new epoch starts each stream over: nothing before it to remember
        inputs, targets = (x.to(world.device) for x in segment(rows, index, mcfg.seg_len))
        trainer.set_lr(learning_rate(t, i))
        result = net(inputs, memory, targets=targets)
        optimizer_step(net, trainer.optimizer, result.loss, t.grad_clip)
        memory = result.memory
        return result.loss.detach()

    def evaluation(loss: float) -> dict:
        val = evaluate(model, corpus.valid, seg_len=mcfg.seg_len, mem_len=mcfg.mem_len, batch=t.eval_batch,
                       max_bytes=t.eval_bytes, world=world)
        return {"train_bpb": loss / LN2, "val_bpb": val.bits_per_byte, "lr": learning_rate(t, run.step - 1)}

    # every step has local * seg_len targets: its mean loss counts that often in the bits per byte
    finished = trainer.train(step, evaluation, eval_every=t.eval_every, stop_after=stop_after,
                             weight=local * mcfg.seg_len, postfix=lambda loss: {"bpb": f"{loss / LN2:.3f}"},
                             extra=lambda: {"memory": _gather_memory(memory, world)})
    if not finished:
        return {"finished": False, "step": run.step}

    return trainer.finish({
        "finished": True, "steps": run.step, "params": trainer.params,
        "pattern": mcfg.pattern or "full", "world_size": world.size, "train_seconds": run.seconds,
        "seconds_per_step": run.seconds / run.step if run.step else None, "history": run.history,
        "val_bpb": run.history[-1]["val_bpb"] if run.history else None,
        "unigram_bpb": unigram_bits_per_byte(corpus.train, corpus.valid[:t.eval_bytes]),
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint, "sizes": list(corpus.sizes)},
        "config": cfg.to_dict(),
        "machine": machine(world),
    }, save_model=True)


def load_lm(path: Path | str, *, device: str = "cpu") -> nn.Module:
    """A trained LM from a run directory (its ``model/`` or, mid-run, its checkpoint) or a model directory."""
    path = Path(path)
    for folder in (path, path / MODEL_DIR):
        if (folder / "config.json").exists():
            cls = FITLM if read_config(folder).get("model_type") == FITLM.MODEL_TYPE else TransformerXL
            return cls.from_pretrained(folder, device=device)
    if (path / CHECKPOINT).exists():
        state = checkpoint.load(path / CHECKPOINT)
        model = build_lm(LMRunConfig.from_dict(state["identity"]["config"]).model, device=device)
        model.load_state_dict(state["model"])
        return model.eval()
    raise FileNotFoundError(f"{path}: no config.json, {MODEL_DIR}/ or {CHECKPOINT} (not a model or LM run directory)")
