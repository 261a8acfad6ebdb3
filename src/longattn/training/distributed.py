"""Several processes under ``torchrun``: DDP (default) or FSDP2, gloo on CPU, NCCL on GPUs.

Without torchrun's environment everything here is a no-op for one process, so the training loop has one
code path. Each process takes an equal slice of every global batch; gradients are averaged by DDP (or
reduce-scattered by FSDP2), so N processes with batch B/N train exactly like one process with batch B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str = "cpu") -> World:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if size == 1:
        return World(0, 1, dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), dev)


def wrap(model: nn.Module, world: World, strategy: str = "ddp") -> nn.Module:
    """The model as the processes train it: itself alone, DDP, or FSDP2 (``fully_shard`` per block)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if world.size == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    return fully_shard(model)


def all_sum(values: Tensor, world: World) -> Tensor:
    """Sum over processes (a copy; the input is untouched)."""
    values = values.clone()
    if world.size > 1:
        dist.all_reduce(values)
    return values


def gather_objects(obj, world: World) -> list:
    """Every process's ``obj`` (JSON-able), in rank order."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def leave_world() -> None:
    """Leave torchrun's process group together: a process that exits while another is still in a collective,
    or with the group alive, can abort its peer (gloo raises SIGABRT at teardown)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
