"""The start and end of a training run that every trainer shares (LRA classifiers, the byte LM, vision).

``start(spec, world, build)`` goes world -> seeded model -> DDP/FSDP2 wrapping -> AdamW -> identity -> resume
from the run's checkpoint -> progress bar, and returns a ``Trainer``; the trainer then supplies what differs
(its step, its evaluation, its checkpoint extras) to ``Trainer.train`` and its result to ``Trainer.finish``.
The order of the seeds is fixed here once: ``spec.seed`` right before the model is built (the same initial
weights on every process), ``spec.seed + 1 + rank`` after it (dropout streams differ per process), so a run
resumed from its checkpoint takes the steps an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..argtypes import device, positive_int
from ..io import remove_leftover_temps
from .distributed import World, barrier, wrap
from .progress import progress_bar
from .run import Progress, batch_indices, load_checkpoint, save_checkpoint, train_steps, write_result

CHECKPOINT = "checkpoint.safetensors"
RESULT = "result.json"
MODEL_DIR = "model"


@dataclass
class RunSpec:
    """What a trainer tells ``start`` about its run."""

    out_dir: Path | str  # CHECKPOINT, RESULT (and MODEL_DIR) go here
    identity: dict  # what makes a checkpoint this run's (config, data); the process count is added
    differs: str  # what may differ in the identity, for the message refusing another run's checkpoint
    seed: int  # initial weights; dropout streams use seed + 1 + rank
    batch_size: int  # global batch, over all processes
    steps: int
    optimizer: dict = field(default_factory=dict)  # torch.optim.AdamW keyword arguments (lr, weight_decay, ...)
    label: str = "train"  # the progress bar's description
    strategy: str = "ddp"  # "ddp" or "fsdp" under torchrun
    progress: bool = True
    resume: bool = True  # continue from out_dir's checkpoint when there is one


def add_run_arguments(parser, *, stop_after: bool = True) -> None:
    """The flags of how a run executes, the same on every training command (``lra run``, ``lm train``, ``vision
    train``): ``--device``, ``--strategy``, ``--no-resume``, ``--stop-after`` and ``--no-progress``. None of
    them enters a run's identity, so a run may resume on another device or after ``--stop-after``."""
    parser.add_argument("--device", type=device, default="cpu", help="torch device")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="data parallelism under torchrun")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    if stop_after:
        parser.add_argument("--stop-after", type=positive_int, help="end after this many steps in total (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_options(args) -> dict:
    """``add_run_arguments``' flags as the trainers' keyword arguments."""
    options = dict(device=args.device, strategy=args.strategy, resume=not args.no_resume,
                   progress=not args.no_progress)
    if hasattr(args, "stop_after"):
        options["stop_after"] = args.stop_after
    return options


def per_process(batch_size: int, world: World) -> int:
    """Each process's share of a global batch; ``ValueError`` unless the processes divide it."""
    if batch_size % world.size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world.size})")
    return batch_size // world.size


@dataclass
class Trainer:
    """A started run: the model as built and as the processes train it, its optimizer and its progress."""

    spec: RunSpec
    world: World
    model: nn.Module  # as built: what is saved and counted
    net: nn.Module  # as trained: the model itself, DDP or FSDP2
    optimizer: torch.optim.Optimizer
    identity: dict
    run: Progress
    params: int  # parameters of the model
    state: dict | None = None  # the checkpoint resumed from (a trainer's extras: the LM's memory), else None
    bar: object = None  # the progress bar

    @property
    def out(self) -> Path:
        return Path(self.spec.out_dir)

    @property
    def local(self) -> int:
        """This process's share of a global batch."""
        return per_process(self.spec.batch_size, self.world)

    def batch(self, n: int, step: int) -> Tensor:
        """This process's examples of global batch ``step`` over a split of ``n`` (``run.batch_indices``)."""
        rank, local = self.world.rank, self.local
        return batch_indices(n, self.spec.batch_size, step, self.spec.seed)[rank * local:(rank + 1) * local]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def save(self, **extra) -> None:
        """Checkpoint the run (every process calls it); ``extra`` is stored beside the standard state."""
        save_checkpoint(self.out / CHECKPOINT, self.identity, self.net, self.optimizer, self.run, self.world, **extra)

    def train(self, step: Callable[[int], Tensor], evaluate: Callable[[float], dict], *, eval_every: int,
              stop_after: int | None = None, weight: float = 1.0, postfix: Callable[[float], dict] | None = None,
              extra: Callable[[], dict] | None = None) -> bool:
        """Train to ``spec.steps`` (or ``stop_after`` steps in all) with ``run.train_steps``; checkpoints hold
        ``extra()`` besides the standard state. True when the run reached its last step."""
        self.net.train()
        return train_steps(self.run, self.world, steps=self.spec.steps, stop_after=stop_after, eval_every=eval_every,
                           step=step, evaluate=evaluate, weight=weight, postfix=postfix, bar=self.bar,
                           checkpoint=lambda: self.save(**(extra() if extra else {})))

    def finish(self, result: dict, *, save_model: bool = False) -> dict:
        """Write ``result.json`` (and the model's ``save_pretrained`` folder) from the main process."""
        if self.world.main:
            if save_model:
                self.model.save_pretrained(self.out / MODEL_DIR)
            write_result(self.out / RESULT, result)
        barrier(self.world)
        return result


def start(spec: RunSpec, world: World, build: Callable[[torch.device], nn.Module]) -> Trainer:
    """Build ``build(device)`` under the run's seed, wrap it for ``world``, make its AdamW optimizer and resume
    from ``spec.out_dir``'s checkpoint when there is one (refused when it is another run's)."""
    per_process(spec.batch_size, world)
    torch.manual_seed(spec.seed)  # same initial weights on every process
    model = build(world.device)
    params = sum(p.numel() for p in model.parameters())
    net = wrap(model, world, spec.strategy)
    optimizer = torch.optim.AdamW(net.parameters(), **spec.optimizer)
    identity = {**spec.identity, "world_size": world.size}
    run, state = Progress(), None  # its running sums: loss and steps since the last evaluation
    torch.manual_seed(spec.seed + 1 + world.rank)  # dropout streams differ per process
    path = Path(spec.out_dir) / CHECKPOINT
    if world.main:  # a write killed mid-way left its temporary file (as large as a checkpoint) behind
        remove_leftover_temps(path)
    if spec.resume and path.exists():
        run, state = load_checkpoint(path, identity, net, optimizer, world, differs=spec.differs)
    bar = progress_bar(spec.progress and world.main, total=spec.steps, initial=run.step, desc=spec.label,
                       unit="step", leave=False)
    return Trainer(spec, world, model, net, optimizer, identity, run, params, state, bar)


__all__ = ["CHECKPOINT", "MODEL_DIR", "RESULT", "RunSpec", "Trainer", "per_process", "start"]
