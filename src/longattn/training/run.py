"""A resumable training run: its progress, its checkpoint and its result file (LRA and LM trainers alike).

The checkpoint holds the run's identity (config, data, process count), the full model and optimizer state,
the progress (step, history, training seconds) and, per process, the RNG streams and the loss sums since the
last evaluation; a trainer adds what else its next step depends on (the LM's memory). Restoring all of it
makes the next step the one an uninterrupted run would take.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..io import write_json
from . import checkpoint
from .distributed import World, all_sum, barrier, gather_objects
from .progress import SilentBar
from .state import load_model_state, model_state, rng_state, set_rng_state


@dataclass
class Progress:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # training time, evaluation excluded
    running: Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))  # this process's sums


def save_checkpoint(path: Path, identity: dict, net: nn.Module, optimizer, run: Progress, world: World,
                    **extra) -> None:
    """Every process calls it (the state dicts and per-process values are gathered); the main one writes."""
    model_sd, optim_sd = model_state(net, optimizer)
    # RNG streams and the sums since the last evaluation differ per process: keep each one's.
    mine = {k: v.tolist() for k, v in rng_state().items()}
    per_process = gather_objects({**mine, "running": run.running.tolist()}, world)
    if world.main:
        per_process = [{k: torch.tensor(v, dtype=torch.float64 if k == "running" else torch.uint8)
                        for k, v in p.items()} for p in per_process]
        checkpoint.save(path, {"identity": identity, "model": model_sd, "optimizer": optim_sd, "step": run.step,
                               "history": run.history, "seconds": run.seconds, "per_process": per_process,
                               **extra})
    barrier(world)


def load_checkpoint(path: Path, identity: dict, net: nn.Module, optimizer, world: World, *,
                    differs: str) -> tuple[Progress, dict]:
    """Restore ``save_checkpoint``'s state into ``net``, ``optimizer`` and this process's RNG.

    Returns the progress and the whole state (for a trainer's extras). A checkpoint of another run (its
    identity differs: ``differs`` names what may) is refused rather than silently continued.
    """
    state = checkpoint.load(path)
    if not same_json(state["identity"], identity):
        raise ValueError(f"{path} belongs to another run ({differs} differ); use another --out or --no-resume")
    load_model_state(net, optimizer, state["model"], state["optimizer"])
    mine = dict(state["per_process"][world.rank])
    running = mine.pop("running").double()
    set_rng_state(mine)
    return Progress(state["step"], state["history"], state["seconds"], running), state


def same_json(a, b) -> bool:
    """Equal as JSON (key order aside): how configs read back from files are compared."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def finished_result(path: Path, config: dict) -> dict | None:
    """The ``result.json`` at ``path`` when its run finished with exactly ``config``, else None."""
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("finished") and same_json(result.get("config"), config) else None


def optimizer_step(net: nn.Module, optimizer, loss: Tensor, grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()


def machine(world: World) -> dict:
    """Where the numbers of a result were measured."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "device": str(world.device)}


def write_result(path: Path, result: dict) -> None:
    """``result.json``, atomically: a reader never sees half of one (its presence marks a finished run)."""
    write_json(path, result)


def warmup_cosine(peak: float, step: int, warmup: int, steps: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine decay to zero at
    ``steps``."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = max(0.0, (step - warmup) / max(1, steps - warmup))
    return peak * warm * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def batch_indices(n: int, batch: int, step: int, seed: int) -> Tensor:
    """The examples of global batch ``step``: epochs are seeded permutations, the remainder is dropped. A
    function of the step, so a resumed run draws the batches an uninterrupted one would."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"batch_size ({batch}) is larger than the training split ({n} examples)")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch:(i + 1) * batch]


def majority_rate(labels: Tensor) -> float:
    """Accuracy of always predicting the most frequent class: the floor a model must beat."""
    return float(torch.bincount(labels).max() / max(len(labels), 1)) if len(labels) else float("nan")


def train_steps(run: Progress, world: World, *, steps: int, stop_after: int | None, eval_every: int,
                step: Callable[[int], Tensor], evaluate: Callable[[float], dict], checkpoint: Callable[[], None],
                weight: float = 1.0, bar=None, postfix: Callable[[float], dict] | None = None) -> bool:
    """The loop every trainer shares: ``step(i)`` trains batch ``i`` and returns its (mean) loss, which counts
    ``weight`` times in the running mean (the LM: the targets of a step). Every ``eval_every`` steps (and at
    the end) the history gains ``{"step", **evaluate(mean loss since the last evaluation), "seconds"}``
    and ``checkpoint()`` saves. Stops after ``stop_after`` steps in total when given (saving first). The
    bar shows ``postfix(loss)`` (default: the loss), then the evaluation. True when the run reached ``steps``."""
    bar = bar if bar is not None else SilentBar()
    postfix = postfix or (lambda loss: {"loss": f"{loss:.3f}"})
    last = min(steps, stop_after if stop_after is not None else steps)
    while run.step < last:
        tick = time.perf_counter()
        loss = step(run.step).item()
        run.step += 1
        run.running += torch.tensor([loss * weight, weight], dtype=torch.float64)
        run.seconds += time.perf_counter() - tick
        bar.update(1)
        bar.set_postfix(postfix(loss))
        if run.step % eval_every == 0 or run.step == steps:
            total = all_sum(run.running, world)
            run.history.append({"step": run.step, **evaluate(float(total[0] / total[1])), "seconds": run.seconds})
            run.running.zero_()
            bar.set_postfix({k: f"{v:.3f}" for k, v in run.history[-1].items()
                             if k not in ("step", "lr", "seconds") and isinstance(v, float)})
            checkpoint()
    bar.close()
    if run.step < steps:  # stopped early on request: the checkpoint holds everything
        checkpoint()
        return False
    return True


@torch.no_grad()
def sharded_accuracy(model: nn.Module, n: int, world: World, *, batch: int,
                     predict: Callable[[Tensor], tuple[Tensor, Tensor]]) -> float:
    """Accuracy on examples ``0..n-1``, shared out over processes: ``predict(index)`` returns the logits and the
    labels of those examples. The model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    mine = torch.arange(world.rank, n, world.size)
    correct = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(mine), batch):
        logits, labels = predict(mine[start:start + batch])
        correct += torch.tensor([float((logits.argmax(-1).cpu() == labels.cpu()).sum()), len(labels)],
                                dtype=torch.float64)
    model.train(was_training)
    total = all_sum(correct, world)
    return float(total[0] / total[1]) if total[1] else float("nan")
