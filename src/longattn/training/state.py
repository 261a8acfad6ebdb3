"""Exact resume: full model/optimizer state dicts (plain, DDP or FSDP2 alike) and RNG streams."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


def model_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) state dicts of the model and optimizer, whatever wraps the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Inverse of ``model_state``; every process loads the full state (no broadcast needed).

    The model must match exactly; the optimizer may lack state for a parameter that never had a gradient (FIT's
    final latent norm when only the tokens are used): such a parameter has no state in the run either.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=dataclasses.replace(options, strict=False))


def rng_state() -> dict:
    """This process's RNG streams (dropout, sampling) as uint8 tensors."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

