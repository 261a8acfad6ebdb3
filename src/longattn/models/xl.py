"""Transformer-XL (Dai et al., 2019): a byte-level decoder LM with segment memory and relative positions.

Each layer keeps a memory: its inputs for the last ``mem_len`` positions, detached. A segment of ``Nq`` new
bytes attends ``[memory; segment]`` (``Nk = M + Nq`` keys, queries bottom-right aligned) through
``RelativeAttention``, whose causal pattern may be any longattn pattern (full, sliding window, Sparse
Transformer strided/fixed, causal BigBird), or causal Combiner attention (``pattern="combiner-fixed"``,
``"combiner-logsparse"``, ``"combiner-mixture"``: every earlier position of the context reachable through
region summaries). Relative encodings make positions independent of where the segment starts, so evaluation
can use a longer memory than training did (the paper's claim).

Running segment after segment with memory equals one pass over the concatenated segments in which a query
of segment ``s`` sees keys from ``start(s) - mem_len`` on (``block_recurrent_mask``), and decoding one byte
at a time with ``mem_len`` states equals one pass with a causal window of ``mem_len`` keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules.native_sparse import NSAShape
from ..modules.relative import COMBINER_KINDS, METHODS, RelativeAttention, RelativePositions
from ..patterns import Pattern, as_pattern, causal, sliding_window
from . import hf_checkpoint as ckpt
from .config_fields import check_fields

#: the LM's short names for ``XLConfig.pattern``: presets of ``longattn.patterns.PRESETS`` (None = full). Any
#: other preset name or pattern expression works too; the model makes every pattern causal.
PATTERN_PRESETS: dict[str, str | None] = {
    "full": None,
    "window": "lookback",  # the last 256 keys: sliding_window(255, 0)
    "moba": "moba_32_causal",  # MoBA: the top 8 of the 32-token key blocks (256 keys), chosen per query
    "strided": "strided_32",  # Sparse Transformer: heads alternate 32 local keys / every 32nd key
    "fixed": "fixed_32_4",  # Sparse Transformer: heads alternate own 32-block / last 4 of every block
    "bigbird": "bigbird_32",  # causal BigBird: window, global and random blocks of 32 tokens
}


#: ``XLConfig.pattern`` names that are not patterns: causal Combiner layers (``combiner-<kind>[-<region>]``,
#: region default 32) and ``"fit"``, the byte LM on FIT's causal decoder (``longattn.models.FITLM``)
COMBINER_REGION = 32
FIT_LM = "fit"
#: ``XLConfig.pattern = "nsa"``: causal Native Sparse Attention in every layer, sized for the byte LM's 256 + 256
#: keys: 16-token summaries every 8, the top 4 of the 32-token blocks (the first and the two latest included)
#: and the last 128 keys
NSA_LM = "nsa"
NSA_LM_SHAPE = NSAShape(cmp_length=16, cmp_stride=8, select_block=32, select_top=4, window=128, init_blocks=1,
                        local_blocks=2)


def combiner_spec(spec: str | None) -> tuple[str, int] | None:
    """``"combiner-fixed"``, ``"combiner-logsparse-64"`` ... -> ``(kind, region)``; None for anything else."""
    if not isinstance(spec, str) or not spec.startswith("combiner"):
        return None
    found = re.fullmatch(rf"combiner-({'|'.join(COMBINER_KINDS)})(?:-(\d+))?", spec)
    if not found:
        raise ValueError(f"pattern {spec!r}: the LM's Combiner layers are combiner-<kind>[-<region>] with kind one "
                         f"of {', '.join(COMBINER_KINDS)} (axial needs a 2-D layout), e.g. combiner-fixed-64")
    region = int(found.group(2) or COMBINER_REGION)
    if region < 1:
        raise ValueError(f"pattern {spec!r}: the region must be a positive number of tokens")
    return found.group(1), region


def resolve_pattern(spec: str | None) -> Pattern | None:
    """A name of ``PATTERN_PRESETS``, another preset name or a pattern expression (``as_pattern``); None = full."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise TypeError(f"pattern must be a preset name or a pattern expression, got {type(spec).__name__}")
    name = PATTERN_PRESETS.get(spec, spec)
    return None if name is None else as_pattern(name)


def block_recurrent_mask(total: int, seg_len: int, mem_len: int, *, device=None) -> Tensor:
    """``(total, total)`` bool: the one-pass equivalent of segment-wise evaluation with memory.

    A query of segment ``s`` (positions ``[s * seg_len, (s + 1) * seg_len)``) sees keys
    ``start(s) - mem_len <= j <= i``. For seg_len 2, mem_len 2::

        1 0 0 0 0 0
        1 1 0 0 0 0
        1 1 1 0 0 0
        1 1 1 1 0 0
        0 0 1 1 1 0
        0 0 1 1 1 1
    """
    i = torch.arange(total, device=device)[:, None]
    j = torch.arange(total, device=device)[None, :]
    return (j <= i) & (j >= torch.div(i, seg_len, rounding_mode="floor") * seg_len - mem_len)


@dataclass
class XLConfig:
    vocab_size: int = 256  # bytes
    dim: int = 256  # model width C
    depth: int = 4  # layers
    heads: int = 4  # attention heads
    head_dim: int | None = None  # default dim // heads
    ffn_dim: int | None = None  # feed-forward width, default 4 * dim
    pos_dim: int | None = None  # sinusoid width of the relative encodings, default dim (the paper's)
    dropout: float = 0.1  # on embeddings, attention output and feed-forward
    attn_dropout: float = 0.0  # on attention probabilities
    pattern: str | None = None  # a PATTERN_PRESETS name, a preset, a pattern expression, combiner-<kind>, "fit", "nsa";
    # None = full causal
    seg_len: int = 512  # bytes per training segment (the paper's tgt_len)
    mem_len: int = 512  # memory length in training; evaluation may pass a longer one
    same_length: bool = False  # every query attends the same number (mem_len) of keys
    clamp_len: int | None = None  # distances beyond it share one encoding
    method: str = "auto"  # RelativeAttention's position-term method
    init_std: float = 0.02

    def __post_init__(self):
        check_fields(self, minimum={"mem_len": 0}, rates=("dropout", "attn_dropout"))
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads}), or set head_dim")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.pattern in (FIT_LM, NSA_LM) or combiner_spec(self.pattern):
            if self.same_length or self.clamp_len is not None or self.method == "shift":
                raise ValueError(f"pattern {self.pattern!r} has no same_length, clamp_len or method='shift' (those "
                                 "need Transformer-XL's attention over its keys; this one attends through summaries)")
        else:
            resolve_pattern(self.pattern)  # fail here, not at the first forward

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "XLConfig":
        return ckpt.config_from_dict(cls, d)


@dataclass
class XLOutput:
    logits: Tensor  # (B, Nq, vocab)
    memory: list[Tensor]  # per layer (B, M', C): the memory for the next segment, detached
    loss: Tensor | None = None  # mean cross-entropy in nats when targets were given
    hidden: Tensor | None = field(default=None, repr=False)  # (B, Nq, C) final hidden states


def check_ids(ids: Tensor) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be an int64 tensor of shape (B, N), got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")


def byte_loss(logits: Tensor, targets: Tensor | None, ids: Tensor) -> Tensor | None:
    """Mean cross-entropy (nats) of ``targets`` (the shape of ``ids``) under ``logits``; None without targets."""
    if targets is None:
        return None
    if targets.shape != ids.shape:
        raise ValueError(f"targets must have the shape of ids {tuple(ids.shape)}, got {tuple(targets.shape)}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class XLBlock(nn.Module):
    """Pre-norm Transformer-XL layer: relative attention over ``[memory; x]``, then a feed-forward net."""

    def __init__(self, cfg: XLConfig, pattern: Pattern | None, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        ffn = cfg.ffn_dim or 4 * cfg.dim
        self.norm1 = nn.LayerNorm(cfg.dim, **factory)
        kind, region = combiner_spec(cfg.pattern) or (None, COMBINER_REGION)
        self.attn = RelativeAttention(cfg.dim, cfg.heads, head_dim=cfg.head_dim, pattern=pattern,
                                      pos_dim=cfg.pos_dim, clamp_len=cfg.clamp_len, dropout=cfg.attn_dropout,
                                      method=cfg.method, backend=backend, combiner=kind, region=region,
                                      nsa=NSA_LM_SHAPE if cfg.pattern == NSA_LM else None, **factory)
        self.norm2 = nn.LayerNorm(cfg.dim, **factory)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, ffn, **factory), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(ffn, cfg.dim, **factory))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, memory: Tensor | None, positions: RelativePositions, pattern: Pattern,
                attn_mask: Tensor | None = None) -> Tensor:
        mem = None if memory is None or memory.shape[1] == 0 else self.norm1(memory)
        x = x + self.drop(self.attn(self.norm1(x), mem, positions=positions, pattern=pattern, attn_mask=attn_mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class TransformerXL(ckpt.Pretrained, nn.Module):
    """Byte-level Transformer-XL LM. ``forward(ids, memory)`` -> ``XLOutput`` (logits, next memory, loss).

    Args:
        cfg: ``XLConfig``.
        backend: passed to ``longattn.attention`` (``"auto"`` picks per call).
    """

    MODEL_TYPE = "longattn-transformer-xl"
    FAMILY = "longattn Transformer-XL"
    CONFIG = XLConfig

    def __init__(self, cfg: XLConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        factory = {"device": device, "dtype": dtype}
        if cfg.pattern == FIT_LM:
            raise ValueError("pattern 'fit' is the FIT decoder LM: build longattn.models.FITLM (longattn.lm.build_lm "
                             "picks the class from the config)")
        attends_itself = combiner_spec(cfg.pattern) or cfg.pattern == NSA_LM  # no pattern: its own keys
        self.base_pattern = None if attends_itself else resolve_pattern(cfg.pattern)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, **factory)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(XLBlock(cfg, self.base_pattern, backend=backend, **factory)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, **factory)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size, **factory))  # logits tie to the embedding
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.zeros_(self.out_bias)
        for block in self.blocks:
            block.attn.reset_parameters()
            for lin in (block.ffn[0], block.ffn[3]):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    @property
    def pos_dim(self) -> int:
        return self.blocks[0].attn.pos_dim

    def attention_pattern(self, mem_len: int) -> Pattern:
        """The causal pattern every layer applies; ``same_length`` keeps the last ``mem_len`` keys only."""
        pattern = causal(self.base_pattern)
        if self.cfg.same_length and mem_len > 0:
            pattern = pattern & sliding_window(mem_len - 1, 0)
        return pattern

    def init_memory(self, batch: int, *, device=None, dtype=None) -> list[Tensor]:
        """Empty memories, one ``(B, 0, C)`` per layer."""
        p = self.embed.weight
        return [p.new_zeros(batch, 0, self.cfg.dim, device=device, dtype=dtype) for _ in self.blocks]

    def forward(self, ids: Tensor, memory: list[Tensor] | None = None, *, targets: Tensor | None = None,
                mem_len: int | None = None, attn_mask: Tensor | None = None) -> XLOutput:
        """Run one segment.

        Args:
            ids: ``(B, Nq)`` int64 byte values.
            memory: the previous call's ``XLOutput.memory`` (or None: no context before this segment).
            targets: ``(B, Nq)`` next bytes; when given, ``loss`` is their mean cross-entropy (nats).
            mem_len: how many states to keep for the next segment (default ``cfg.mem_len``): evaluation may use
                more than training did.
            attn_mask: optional ``(Nq, M + Nq)`` bool mask applied on top of the pattern (tests use it).
        """
        check_ids(ids)
        b, n = ids.shape
        if memory is None:
            memory = self.init_memory(b)
        if len(memory) != len(self.blocks) or any(m.dim() != 3 or m.shape[0] != b or m.shape[2] != self.cfg.dim
                                                   for m in memory):
            raise ValueError(f"memory must be {len(self.blocks)} tensors of shape (B={b}, M, C={self.cfg.dim})")
        mem_len = self.cfg.mem_len if mem_len is None else mem_len
        m = memory[0].shape[1]
        x = self.drop(self.embed(ids) * math.sqrt(self.cfg.dim))  # (B, Nq, C); the paper's embedding scale
        positions = RelativePositions.build(n, m + n, self.pos_dim, clamp_len=self.cfg.clamp_len, device=ids.device,
                                            dtype=x.dtype)
        pattern = self.attention_pattern(mem_len)
        inputs = []
        for block, mem in zip(self.blocks, memory):
            inputs.append(x)
            x = block(x, mem, positions, pattern, attn_mask)
        # The memory for the next segment: each layer's inputs, the last mem_len positions, no gradient.
        new_memory = [torch.cat([mem, h], dim=1)[:, max(0, m + n - mem_len):].detach() if mem_len else mem[:, :0]
                      for mem, h in zip(memory, inputs)]
        hidden = self.norm(x)
        logits = F.linear(self.drop(hidden), self.embed.weight, self.out_bias)  # (B, Nq, vocab)
        return XLOutput(logits, new_memory, byte_loss(logits, targets, ids), hidden)
