"""One training loop for every Long Range Arena task and attention variant.

``train_run(config, attention, ...)`` builds the encoder classifier with the variant's pattern, trains it
with LRA's optimiser (Adam with decoupled weight decay) and schedule, evaluates on the validation split
every ``eval_every`` steps, checkpoints atomically, resumes from the last checkpoint after a kill (same
losses as an uninterrupted run: the batch order is a function of the step, RNG states are saved), and
writes ``result.json``. Under ``torchrun`` it trains data-parallel (see ``distributed.py``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import EncoderConfig, SparseEncoderClassifier
from ..patterns import Pattern
from ..training.distributed import World, init_world
from ..training.run import machine, majority_rate, optimizer_step, sharded_accuracy, warmup_cosine
from ..training.setup import RunSpec, start
from .attentions import ALIASES, build_attention
from .configs import LRAConfig
from .tasks import Split, Task, get_task


def learning_rate(cfg: LRAConfig, step: int) -> float:
    """LRA's schedules at ``step`` (0-based): linear warm-up, then rsqrt or cosine decay."""
    t = cfg.train
    warm = min(1.0, (step + 1) / t.warmup) if t.warmup else 1.0
    if t.schedule == "rsqrt":  # constant * linear_warmup * rsqrt_decay
        return t.lr * warm / math.sqrt(max(step + 1, t.warmup, 1))
    if t.schedule == "cosine":  # constant * linear_warmup * cosine_decay over the run
        return warmup_cosine(t.lr, step, t.warmup, t.steps)
    raise ValueError(f"schedule must be 'rsqrt' or 'cosine', got {t.schedule!r}")


def _inputs(data: Split, index: Tensor, device: torch.device) -> tuple:
    args = [data.tokens[index], data.lengths[index]]
    if data.pair:
        args += [data.tokens2[index], data.lengths2[index]]
    return tuple(a.to(device) for a in args)


def build_model(cfg: LRAConfig, attention: str, task: Task, max_len: int, *, device=None) -> SparseEncoderClassifier:
    """The encoder classifier of ``cfg`` for ``task`` with variant ``attention``."""
    key = ALIASES.get(attention, attention)
    shape = replace(cfg.model, **cfg.model_overrides.get(key, {}))
    enc = EncoderConfig(vocab_size=task.vocab_size, num_classes=task.num_classes, max_len=max_len, dim=shape.dim,
                        depth=shape.depth, heads=shape.heads, qkv_dim=shape.qkv_dim, ffn_dim=shape.ffn_dim,
                        dropout=shape.dropout, attn_dropout=shape.attn_dropout, pooling=task.pooling,
                        pair=task.pair, learned_positions=shape.learned_positions)
    pattern = build_attention(attention, enc.seq_len, cfg.attention_settings.get(key))
    need = (pattern.head_period if isinstance(pattern, Pattern) else None) or 1
    if shape.heads % need:
        raise ValueError(f"attention {attention!r} alternates over {need} heads; the model has {shape.heads} "
                         f"(set model_overrides[{key!r}]['heads'] to a multiple of {need})")
    return SparseEncoderClassifier(enc, pattern, device=device)


def evaluate(model: nn.Module, data: Split, world: World, *, batch: int, limit: int | None = None) -> float:
    """Accuracy on the first ``limit`` examples of ``data`` (all when None), shared out over processes."""
    n = len(data) if limit is None else min(limit, len(data))
    return sharded_accuracy(model, n, world, batch=batch,
                            predict=lambda index: (model(*_inputs(data, index, world.device)), data.labels[index]))


def load_splits(cfg: LRAConfig, task: Task) -> dict[str, Split]:
    """The task's three splits, the training split cut to ``cfg.train_fraction``."""
    data = {split: task.load(split) for split in ("train", "val", "test")}
    if cfg.train_fraction < 1:
        keep = max(cfg.train.batch_size, round(len(data["train"]) * cfg.train_fraction))
        data["train"] = data["train"].subset(slice(0, keep))
    return data


def make_task(cfg: LRAConfig, data_dir: Path | str) -> Task:
    task = get_task(cfg.task, data_dir)
    if cfg.max_len is not None and hasattr(task, "max_length"):
        task.max_length = cfg.max_len
    return task


def train_run(cfg: LRAConfig, attention: str, *, data_dir: Path | str, out_dir: Path | str,
              data: dict[str, Split] | None = None, device: str = "cpu", strategy: str = "ddp",
              progress: bool = True, resume: bool = True, stop_after: int | None = None) -> dict:
    """Train variant ``attention`` on ``cfg.task``; returns (and writes to ``out_dir``) the result.

    Args:
        cfg: the run's config (``configs.get_config`` / ``scaled``).
        attention: a name of ``attentions.ATTENTIONS`` or a pattern expression.
        data_dir: where the task's files are.
        out_dir: where ``checkpoint.safetensors`` and ``result.json`` go; a checkpoint there is resumed.
        data: preloaded splits (the suite loads each task once for all variants).
        strategy: "ddp" or "fsdp" under torchrun.
        stop_after: end this process after that many steps in total (the checkpoint stays; a later call
            resumes). For training in chunks, and for the resume test.
    """
    world = init_world(device)
    task = make_task(cfg, data_dir)
    data = data or load_splits(cfg, task)
    max_len = data["train"].tokens.shape[1]
    t = cfg.train
    spec = RunSpec(out_dir, {"config": cfg.to_dict(), "attention": attention},
                   differs="config, attention or process count", seed=cfg.seed, batch_size=t.batch_size,
                   steps=t.steps, optimizer=dict(lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay),
                   label=f"{cfg.task}/{attention}", strategy=strategy, progress=progress, resume=resume)
    trainer = start(spec, world, lambda dev: build_model(cfg, attention, task, max_len, device=dev))
    net, run = trainer.net, trainer.run
    train, eval_batch = data["train"], max(trainer.local, 64)

    def step(i: int) -> Tensor:
        index = trainer.batch(len(train), i)
        trainer.set_lr(learning_rate(cfg, i))
        loss = F.cross_entropy(net(*_inputs(train, index, world.device)), train.labels[index].to(world.device))
        optimizer_step(net, trainer.optimizer, loss, t.grad_clip)
        return loss.detach()

    finished = trainer.train(
        step, lambda loss: {"loss": loss, "val_acc": evaluate(net, data["val"], world, batch=eval_batch,
                                                              limit=t.eval_examples),
                            "lr": learning_rate(cfg, run.step - 1)},
        eval_every=t.eval_every, stop_after=stop_after)
    if not finished:
        return {"finished": False, "step": run.step}

    model = trainer.model
    return trainer.finish({
        "task": cfg.task, "attention": attention, "pattern": getattr(model.pattern, "name", "full"),
        "finished": True, "steps": run.step, "params": trainer.params, "world_size": world.size,
        "train_seconds": run.seconds, "steps_per_second": run.step / run.seconds if run.seconds else None,
        "val_acc": run.history[-1]["val_acc"] if run.history else None,
        "best_val_acc": max((h["val_acc"] for h in run.history), default=None),
        "test_acc": evaluate(net, data["test"], world, batch=eval_batch),
        "test_majority": majority_rate(data["test"].labels), "seq_len": model.cfg.seq_len,
        "history": run.history, "config": cfg.to_dict(), "machine": machine(world),
    })
