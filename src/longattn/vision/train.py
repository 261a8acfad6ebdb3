"""Train a vision backbone of the model registry (BoTNet, ResNet-50) on generated images.

One loop for every model: AdamW with warm-up and cosine decay, channels-last tensors, optional bf16
autocast on CPU (``bf16``; see the README for when it pays), validation every ``eval_every`` steps, an
atomic checkpoint that resumes after a kill (the batch order is a function of the step; RNG streams are
saved), and ``result.json`` with the accuracy and the training images per second. Under ``torchrun`` it
trains data-parallel (``training.distributed``).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import create_model
from ..training.distributed import World, init_world
from ..training.run import machine, majority_rate, optimizer_step, sharded_accuracy, warmup_cosine
from ..training.setup import RunSpec, start
from .data import ImageData, pathfinder_images


@dataclass
class VisionRunConfig:
    model: str = "botnet50"  # a registry name (create_model)
    width: int = 16  # the backbone's base width (64 = the paper's; smaller trains faster on a CPU)
    resolution: int = 128  # image side; BoT50's first MHSA then attends over an 8 x 8 map
    preset: str = "simple"  # Pathfinder preset of the generated images
    difficulty: str = "hard"  # the official preset's path length: easy, intermediate or hard
    examples: int = 6000  # images generated in all (80/10/10 split)
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 30
    grad_clip: float | None = 1.0
    eval_every: int = 50
    channels_last: bool = True
    bf16: bool = False  # bf16 autocast (CPU and CUDA)
    seed: int = 0
    model_overrides: dict = field(default_factory=dict)  # more BotNetConfig fields (radius, heads, ...)

    def __post_init__(self):
        for name in ("width", "resolution", "examples", "steps", "batch_size", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_model(cfg: VisionRunConfig, *, device=None) -> nn.Module:
    """The run's backbone: Pathfinder's two classes and one gray channel, tables sized for ``resolution``."""
    return create_model(cfg.model, num_classes=2, in_chans=1, width=cfg.width, image_size=cfg.resolution,
                        device=device, **cfg.model_overrides)


def _autocast(cfg: VisionRunConfig, world: World):
    if not cfg.bf16:
        return nullcontext()
    return torch.autocast(world.device.type, dtype=torch.bfloat16)


def evaluate(model: nn.Module, data: ImageData, cfg: VisionRunConfig, world: World, *, batch: int = 128) -> float:
    """Accuracy on ``data``, shared out over processes."""
    def predict(index: Tensor) -> tuple[Tensor, Tensor]:
        x, y = data.batch(index, world.device, channels_last=cfg.channels_last)
        with _autocast(cfg, world):
            return model(x), y

    return sharded_accuracy(model, len(data), world, batch=batch, predict=predict)


def train_vision(cfg: VisionRunConfig, *, data_dir: Path | str, out_dir: Path | str,
                 data: dict[str, ImageData] | None = None, device: str = "cpu", strategy: str = "ddp",
                 progress: bool = True, resume: bool = True, stop_after: int | None = None) -> dict:
    """Train ``cfg`` and write ``checkpoint.safetensors``, ``model/`` and ``result.json`` into ``out_dir``.

    Args:
        data_dir: where the generated images are (generated there when missing).
        data: preloaded splits (to train several models on one set).
        resume: continue from ``out_dir``'s checkpoint when there is one (it must be of the same run).
        stop_after: end this process after that many steps in total (the checkpoint stays for a later call).
    """
    world = init_world(device)
    if data is None:
        data = pathfinder_images(data_dir, resolution=cfg.resolution, preset=cfg.preset, examples=cfg.examples,
                                 difficulty=cfg.difficulty, seed=cfg.seed)

    def build(dev: torch.device) -> nn.Module:
        model = build_model(cfg, device=dev)
        if world.size > 1 and world.device.type == "cuda":
            # batch statistics over the global batch, as one process would compute them (PyTorch's SyncBatchNorm
            # is GPU-only: on CPU each process normalises its own share)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model.to(memory_format=torch.channels_last) if cfg.channels_last else model

    spec = RunSpec(out_dir, {"config": cfg.to_dict()}, differs="config or process count", seed=cfg.seed,
                   batch_size=cfg.batch_size, steps=cfg.steps, optimizer=dict(lr=cfg.lr, weight_decay=cfg.weight_decay),
                   label=cfg.model, strategy=strategy, progress=progress, resume=resume)
    trainer = start(spec, world, build)
    net, run = trainer.net, trainer.run
    train = data["train"]

    def step(i: int) -> Tensor:
        index = trainer.batch(len(train), i)
        trainer.set_lr(warmup_cosine(cfg.lr, i, cfg.warmup, cfg.steps))
        x, y = train.batch(index, world.device, channels_last=cfg.channels_last)
        with _autocast(cfg, world):
            loss = F.cross_entropy(net(x).float(), y)
        optimizer_step(net, trainer.optimizer, loss, cfg.grad_clip)
        return loss.detach()

    finished = trainer.train(
        step, lambda loss: {"loss": loss, "val_acc": evaluate(net, data["val"], cfg, world)},
        eval_every=cfg.eval_every, stop_after=stop_after,
        postfix=lambda loss: {"loss": f"{loss:.3f}", "img_s": f"{run.step * cfg.batch_size / run.seconds:.0f}"})
    if not finished:
        return {"finished": False, "step": run.step}

    return trainer.finish({
        "model": cfg.model, "finished": True, "steps": run.step, "params": trainer.params, "world_size": world.size,
        "train_seconds": run.seconds, "images_per_second": run.step * cfg.batch_size / run.seconds,
        "val_acc": run.history[-1]["val_acc"], "test_acc": evaluate(net, data["test"], cfg, world),
        "test_majority": majority_rate(data["test"].labels), "history": run.history, "config": cfg.to_dict(),
        "machine": machine(world),
    }, save_model=True)
