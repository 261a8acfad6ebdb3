"""A sparse Transformer encoder classifier: Long Range Arena's model, with any longattn pattern.

Tokens are embedded, a learned CLS vector is prepended when pooling is ``"cls"``, positions are added
(learned, or fixed sinusoids as in LRA's Pathfinder configs), pre-LayerNorm blocks run ``SparseSelfAttention``
and an MLP, and a final LayerNorm feeds the pooled vector to a two-layer classifier head. Pair tasks
(LRA Retrieval) encode both documents with the same encoder and classify LRA's feature combination
``[u, v, u * v, u - v]`` (two towers, shared weights).

Notation: B batch, N tokens (N + 1 with CLS), C model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..modules import Block, CombinerAttention, NativeSparseAttention, NSAShape
from ..patterns import Pattern
from ..patterns import documents as documents_pattern
from .config_fields import check_fields
from .fit import FIT, FITConfig, best_group_size, schedule_for_depth
from ..patterns.documents import PAD
from . import packing

POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class CombinerMixer:
    """Every block attends with ``CombinerAttention(kind, region)`` instead of a pattern."""

    kind: str = "fixed"
    region: int | None = None  # fixed blocks' size or axial rows' width; default ceil(sqrt(seq_len))
    shift_invariant = False  # regions sit on absolute positions: documents cannot be packed

    @property
    def name(self) -> str:
        return f"combiner-{self.kind}"


@dataclass(frozen=True)
class FITMixer:
    """FIT's groups, latents and interleaved local/global layers instead of the stack of blocks: the
    encoder's ``depth`` local layers split around one run of global layers, ``(ceil(d/2))max(1, d//2)(d//2)``."""

    group_size: int | None = None  # default FIT's cost optimum (2 L m^2)^(1/3), a multiple of 8
    latents: int = 4  # m, latent tokens per group
    shift_invariant = False  # groups sit on absolute positions
    name = "fit"

    def group(self, length: int) -> int:
        return self.group_size or best_group_size(length, self.latents)

    schedule = staticmethod(schedule_for_depth)


@dataclass(frozen=True)
class NSAMixer(NSAShape):
    """Every block attends with bidirectional ``NativeSparseAttention`` of these sizes (``NSAShape``)."""

    shift_invariant = False  # blocks sit on absolute positions
    name = "nsa"


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int  # token ids are in [0, vocab_size)
    num_classes: int
    max_len: int  # longest input in tokens (without CLS)
    dim: int = 256  # model width C (LRA: emb_dim = qkv_dim)
    depth: int = 4  # Transformer blocks
    heads: int = 4
    qkv_dim: int | None = None  # total width of q/k/v, default dim (LRA's image tasks: dim / 2)
    ffn_dim: int = 1024  # hidden width of each block's feed-forward MLP and of the classifier head (LRA: mlp_dim)
    dropout: float = 0.1
    attn_dropout: float = 0.1  # on attention probabilities
    pooling: str = "cls"  # "cls": a learned token prepended at position 0; "mean": over real tokens
    pair: bool = False  # two documents per example, LRA's two-tower combination
    learned_positions: bool = True  # False: fixed sinusoids (LRA's Pathfinder: learn_pos_emb=False)

    def __post_init__(self):
        check_fields(self, rates=("dropout", "attn_dropout"))
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if (self.qkv_dim or self.dim) % self.heads:
            raise ValueError(f"qkv_dim ({self.qkv_dim or self.dim}) must be divisible by heads ({self.heads})")

    @property
    def seq_len(self) -> int:
        """Tokens the attention sees: the input plus CLS when pooling is "cls"."""
        return self.max_len + (self.pooling == "cls")


def sinusoids(length: int, dim: int) -> Tensor:
    """Transformer's fixed sine/cosine position table ``(length, dim)``."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.float()


class SparseEncoderClassifier(nn.Module):
    """LRA's encoder classifier over ``tokens: (B, N)`` with attention restricted to ``pattern``.

    Args:
        cfg: the model's shape (``EncoderConfig``).
        pattern: the attention pattern over the ``cfg.seq_len`` positions (CLS is position 0 when
            pooling is "cls"); ``None`` = full attention.
        backend: passed to ``longattn.attention`` (default ``"auto"``).

    ``forward(tokens, lengths, tokens2=None, lengths2=None)`` returns logits ``(B, num_classes)``;
    ``lengths (B,)`` gives the real tokens of each row (the rest is padding and is never attended).
    """

    def __init__(self, cfg: EncoderConfig, pattern: Pattern | None = None, *, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        self.cfg, self.pattern = cfg, pattern
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, **factory)
        self.cls = nn.Parameter(torch.empty(1, 1, cfg.dim, **factory)) if cfg.pooling == "cls" else None
        if cfg.learned_positions:
            self.positions = nn.Parameter(torch.empty(cfg.seq_len, cfg.dim, **factory))
        else:
            self.register_buffer("positions", sinusoids(cfg.seq_len, cfg.dim).to(**factory), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.fit = None
        if isinstance(pattern, FITMixer):
            self.fit = FIT(FITConfig(dim=cfg.dim, heads=cfg.heads, group_size=pattern.group(cfg.seq_len),
                                     latents=pattern.latents, max_len=cfg.seq_len,
                                     schedule=pattern.schedule(cfg.depth), ffn_dim=cfg.ffn_dim,
                                     dropout=cfg.dropout, attn_dropout=cfg.attn_dropout), backend=backend, **factory)

        def attn() -> nn.Module | None:
            if isinstance(pattern, NSAMixer):
                return NativeSparseAttention(cfg.dim, cfg.heads, head_dim=(cfg.qkv_dim or cfg.dim) // cfg.heads,
                                             shape=pattern, dropout=cfg.attn_dropout, backend=backend, **factory)
            if not isinstance(pattern, CombinerMixer):
                return None
            # one partition for every batch: the regions of the longest input, whatever a batch is padded to
            region = pattern.region or math.ceil(math.sqrt(cfg.seq_len))
            return CombinerAttention(cfg.dim, cfg.heads, kind=pattern.kind, region=region,
                                     qkv_dim=cfg.qkv_dim, dropout=cfg.attn_dropout, backend=backend, **factory)

        plain = pattern if isinstance(pattern, Pattern) else None
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.ffn_dim, pattern=plain, qkv_dim=cfg.qkv_dim, dropout=cfg.dropout,
                  attn_dropout=cfg.attn_dropout, backend=backend, attn=attn(), **factory)
            for _ in range(0 if self.fit is not None else cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, **factory)
        features = 4 * cfg.dim if cfg.pair else cfg.dim
        self.head = nn.Sequential(nn.Linear(features, cfg.ffn_dim, **factory), nn.ReLU(),
                                  nn.Linear(cfg.ffn_dim, cfg.num_classes, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Token embeddings on the scale of the positions they are added to: unit variance beside fixed
        # sinusoids (with BERT's 0.02 a sinusoid-positioned model sees only positions at first, and quick
        # Pathfinder never starts learning), BERT's 0.02 beside learned positions of the same init.
        nn.init.normal_(self.embed.weight, std=0.02 if self.cfg.learned_positions else 1.0)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)
        if self.cfg.learned_positions:
            nn.init.normal_(self.positions, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def encode(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Pooled features ``(B, C)`` of one document per row."""
        b, n = tokens.shape
        if n > self.cfg.max_len:
            raise ValueError(f"tokens has {n} positions, more than max_len={self.cfg.max_len}")
        if lengths.shape != (b,):
            raise ValueError(f"lengths must have shape (B={b},), got {tuple(lengths.shape)}")
        real = torch.arange(n, device=tokens.device) < lengths.to(tokens.device)[:, None]  # (B, N)
        x = self.embed(tokens.long())  # (B, N, C)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, 1, -1), x], dim=1)  # (B, N + 1, C)
            real = torch.cat([real.new_ones(b, 1), real], dim=1)
        x = self.drop(x + self.positions[: x.shape[1]])
        mask = None if bool(real.all()) else real
        if self.fit is not None:
            x = self.fit(x, key_padding_mask=mask).last_hidden_state
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        if self.cfg.pooling == "cls":
            return x[:, 0]
        weights = real.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def encode_documents(self, documents: Sequence[Tensor], *, row_len: int | None = None) -> Tensor:
        """Pooled features ``(D, C)`` of 1-D token tensors of any lengths, packed into rows of at most
        ``row_len`` positions (default ``cfg.seq_len``) instead of padded to the longest: each equals
        ``encode`` of that document alone. The pattern must mean the same in every document (a window,
        causal, full: ``Pattern.shift_invariant``); positions, CLS and pooling are per document."""
        if self.pattern is not None and not self.pattern.shift_invariant:
            raise ValueError(f"pattern {self.pattern.name} depends on absolute positions (global tokens, blocks): "
                             "packed documents would see another pattern than alone; pad them instead")
        cls = int(self.cls is not None)
        lengths = [int(d.numel()) + cls for d in documents]
        if max(lengths, default=0) > self.cfg.seq_len:
            raise ValueError(f"a document of {max(lengths) - cls} tokens is longer than max_len={self.cfg.max_len}")
        rows, starts, count, width = packing.layout(lengths, row_len or self.cfg.seq_len)
        x = self.positions.new_zeros(count, width, self.cfg.dim)  # (R, L, C)
        for doc, row, start, n in zip(documents, rows, starts, lengths):
            e = self.embed(doc.long().to(x.device))  # (n - cls, C)
            if cls:
                e = torch.cat([self.cls[0], e])
            x[row, start:start + n] = e + self.positions[:n]
        seg = packing.segments(rows, starts, lengths, (count, width), x.device)
        real = seg != PAD
        x, pattern = self.drop(x), documents_pattern(segment_ids=seg)
        mask = None if bool(real.all()) else real
        for block in self.blocks:
            x = block(x, mask, pattern)
        x = self.norm(x)
        pooled = [x[row, start] if cls else x[row, start:start + n].mean(0)
                  for row, start, n in zip(rows, starts, lengths)]
        return torch.stack(pooled)

    def forward(self, tokens: Tensor, lengths: Tensor, tokens2: Tensor | None = None,
                lengths2: Tensor | None = None) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (B, N), got {tuple(tokens.shape)}")
        if self.cfg.pair != (tokens2 is not None):
            raise ValueError("tokens2/lengths2 are required for a pair model and only for one "
                             f"(pair={self.cfg.pair})")
        u = self.encode(tokens, lengths)
        if tokens2 is None:
            return self.head(u)
        v = self.encode(tokens2, lengths2)
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))  # LRA's two-tower combination
