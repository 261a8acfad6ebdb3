"""A byte-level LM on FIT's causal decoder, behind Transformer-XL's interface (``longattn lm ... --pattern fit``).

FIT has no per-layer state to carry between segments the way Transformer-XL carries its hidden states, so its
memory is the previous bytes themselves: a segment of ``Nq`` bytes is decoded after the last ``mem_len``
bytes before it, recomputed. ``forward(ids, memory, targets=, mem_len=)`` returns an ``XLOutput`` whose
``memory`` is ``[bytes (B, M)]``, so training, evaluation at a longer memory and generation run unchanged;
the cost of a segment is FIT's ``O(L^(4/3))`` over the ``L = M + Nq`` bytes.

The decoder (``longattn.models.fit``, ``causal=True``) uses one learned set of latents for every group
(``shared_latents``) and no position encoding: causal attention inside a group and block-causal attention
among latents order the tokens, and nothing ties the model to a maximum length, so a longer memory at
evaluation is just a longer context. Groups are aligned to the segment's start (the context is front-padded
when the memory is not a whole number of groups), so a segment is grouped the same way whatever the memory.
Group size is FIT's optimum for the training context ``seg_len + mem_len`` with 4 latents per group; the
``depth`` local layers split around one run of global layers (``schedule_for_depth``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import hf_checkpoint as ckpt
from .fit import FIT, FITConfig, best_group_size, schedule_for_depth
from .xl import FIT_LM, XLConfig, XLOutput, byte_loss, check_ids

LATENTS = 4  # per group


def fit_config(cfg: XLConfig) -> FITConfig:
    """The FIT decoder an ``XLConfig`` with ``pattern="fit"`` stands for."""
    if cfg.pattern != FIT_LM:
        raise ValueError(f"FITLM needs XLConfig(pattern={FIT_LM!r}), got pattern={cfg.pattern!r}")
    if cfg.head_dim is not None or cfg.pos_dim is not None:
        raise ValueError("FITLM has no head_dim or pos_dim: its heads split dim, and it has no position encoding")
    return FITConfig(dim=cfg.dim, heads=cfg.heads, latents=LATENTS, max_len=cfg.seg_len + cfg.mem_len,
                     group_size=best_group_size(cfg.seg_len + cfg.mem_len, LATENTS),
                     schedule=schedule_for_depth(cfg.depth), ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                     attn_dropout=cfg.attn_dropout, causal=True, shared_latents=True)


class FITLM(ckpt.Pretrained, nn.Module):
    """Byte LM on FIT's causal decoder; ``forward(ids, memory)`` -> ``XLOutput`` like ``TransformerXL``."""

    MODEL_TYPE = "longattn-fit-lm"
    FAMILY = "longattn FIT LM"
    CONFIG = XLConfig

    def __init__(self, cfg: XLConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        factory = {"device": device, "dtype": dtype}
        self.fit_cfg = fit_config(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, **factory)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = FIT(self.fit_cfg, backend=backend, **factory)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size, **factory))  # logits tie to the embedding
        nn.init.normal_(self.embed.weight, std=cfg.init_std)

    def init_memory(self, batch: int, *, device=None, dtype=None) -> list[Tensor]:
        """No bytes before the first segment: one ``(B, 0)`` tensor."""
        return [torch.zeros(batch, 0, dtype=torch.int64, device=device or self.embed.weight.device)]

    def forward(self, ids: Tensor, memory: list[Tensor] | None = None, *, targets: Tensor | None = None,
                mem_len: int | None = None, attn_mask: Tensor | None = None) -> XLOutput:
        """Decode the segment ``ids: (B, Nq)`` after the bytes in ``memory`` (a previous ``XLOutput.memory``)."""
        check_ids(ids)
        if attn_mask is not None:
            raise ValueError("attn_mask: the FIT LM's groups and latents decide what each byte sees")
        b, n = ids.shape
        past = self.init_memory(b, device=ids.device)[0] if memory is None else memory[0]
        if len(memory or [past]) != 1 or past.dim() != 2 or past.shape[0] != b:
            raise ValueError(f"memory must be [bytes of shape (B={b}, M)], the previous output's memory")
        mem_len = self.cfg.mem_len if mem_len is None else mem_len
        context = torch.cat([past.to(ids), ids], dim=1)  # (B, M + Nq)
        pad = -past.shape[1] % self.fit_cfg.group_size  # a group starts where the segment does
        x = self.drop(self.embed(F.pad(context, (pad, 0))) * math.sqrt(self.cfg.dim))
        real = None
        if pad:
            real = torch.ones(b, pad + context.shape[1], dtype=torch.bool, device=ids.device)
            real[:, :pad] = False
        hidden = self.decoder(x, key_padding_mask=real).last_hidden_state[:, -n:]  # (B, Nq, C)
        logits = F.linear(self.drop(hidden), self.embed.weight, self.out_bias)
        new_memory = [context[:, max(0, context.shape[1] - mem_len):] if mem_len else context[:, :0]]
        return XLOutput(logits, new_memory, byte_loss(logits, targets, ids), hidden)
