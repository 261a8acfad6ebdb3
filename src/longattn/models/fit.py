"""FIT, Far-reaching Interleaved Transformers (Chen & Li, 2023), as an encoder and as a causal decoder.

The tokens ``x: (B, N, C)`` are cut into ``t = ceil(N / n)`` groups of ``n = group_size`` (the last one padded);
each group owns ``m = latents`` latent tokens, learned per (group, slot) (or per slot, shared by every group,
with ``shared_latents``: the byte LM's choice, so that it runs on contexts longer than it was trained on).
One FIT block, in the order of the reference (``pix2seq``'s ``architectures/transformers.py``):

1. *local* layers: pre-LN Transformer layers inside each group (block-diagonal attention; causal inside the
   group for the decoder);
2. *write*: each group's latents cross-attend to their group's tokens, ``lat += CrossAttn(LN(lat), LN(x))``;
3. *global* layers: pre-LN Transformer layers over all ``t * m`` latents (block-causal for the decoder: group
   g's latents see the latents of groups <= g);
4. *read* (every block but the last): each token cross-attends to its group's latents,
   ``x += CrossAttn(LN(x), LN(lat))``. In the decoder a group reads the latents of the group *before* it
   (which summarise only earlier tokens); group 0 reads none and gets zeros (the reference passes zeros
   through the key norm instead, so it adds that norm's bias: a learned constant we leave out).

Latents persist from block to block. The layer schedule is FIT's string: ``"(2)2(2)"`` is 2 local layers,
write, 2 global, read, 2 local. Attention cost per layer: local ``N * n``, global ``(N m / n)^2``,
cross ``N * m``: with ``n`` ~ ``N^(1/3)`` the whole is O(N^(4/3)).

Padding: groups with no real token are left out of the global layers (their latents are neither attended nor
changed by the real ones), so a padded example gives the result of the same example alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..modules import Block
from ..modules.cross_attention import CrossAttention
from ..patterns import Pattern, causal
from ..patterns.sparse_transformer import SameBlock
from .config_fields import check_fields


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """FIT's layer string -> ``[(local, global), ...]`` per block: ``"(2)2(2)"`` -> ``[(2, 2), (2, 0)]``."""
    if not isinstance(text, str) or not re.fullmatch(r"(\(\d+\)\d*)+", text.replace(" ", "")):
        raise ValueError(f"schedule must look like '(2)2(2)': (local layers) then global layers, per block; "
                         f"got {text!r}")
    blocks = [(int(a), int(b or 0)) for a, b in re.findall(r"\((\d+)\)(\d*)", text.replace(" ", ""))]
    if any(g == 0 for _, g in blocks[:-1]):
        raise ValueError(f"schedule {text!r}: every block but the last needs global layers (else the next local "
                         f"layers simply continue the block)")
    if blocks[-1][1]:
        raise ValueError(f"schedule {text!r}: the last block's global layers would never be read back into the "
                         f"tokens; end with local layers, e.g. '(2)2(2)'")
    return blocks


@dataclass
class FITConfig:
    dim: int = 256  # width C of tokens and latents
    heads: int = 4  # attention heads of every layer and cross-attention
    group_size: int = 64  # n, tokens per group
    latents: int = 4  # m, latent tokens per group
    max_len: int = 4096  # longest input: the latent table holds ceil(max_len / group_size) groups
    schedule: str = "(2)2(2)"  # FIT's layer string: (local)global per block, ending with local layers
    ffn_dim: int | None = None  # feed-forward width, default 4 * dim
    dropout: float = 0.0  # on residual branches and the feed-forward hidden layer
    attn_dropout: float = 0.0  # on attention probabilities
    causal: bool = False  # the decoder: causal local layers, block-causal global layers, shifted reads
    shared_latents: bool = False  # one learned set of latents for every group: no max_len, no absolute groups

    def __post_init__(self):
        check_fields(self, rates=("dropout", "attn_dropout"))
        if self.dim % self.heads:
            raise ValueError(f"FITConfig: dim ({self.dim}) must be divisible by heads ({self.heads})")
        parse_schedule(self.schedule)

    @property
    def max_groups(self) -> int:
        return math.ceil(self.max_len / self.group_size)


def best_group_size(length: int, latents: int) -> int:
    """FIT's cost optimum ``n = (2 L m^2)^(1/3)`` for ``length`` tokens and ``latents`` per group, a multiple
    of 8 (at least 8)."""
    return max(8, round((2 * length * latents**2) ** (1 / 3) / 8) * 8)


def schedule_for_depth(depth: int) -> str:
    """``depth`` local layers split around one run of global layers: ``(ceil(d/2))max(1, d//2)(d//2)``."""
    first = -(-depth // 2)
    return f"({first}){max(1, depth // 2)}({depth - first})"


@dataclass
class FITOutput:
    last_hidden_state: Tensor  # (B, N, C) the tokens after the last local layers, normalised
    latents: Tensor  # (B, t, m, C) the latents after the last global layers, normalised


class FITBlock(nn.Module):
    """Local layers, write, global layers and (unless last) read: one block of FIT's schedule."""

    def __init__(self, cfg: FITConfig, local: int, global_: int, *, read: bool, backend: str, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        ffn = cfg.ffn_dim or 4 * cfg.dim
        local_pattern: Pattern | None = causal() if cfg.causal else None
        # group g's latents see every latent of groups <= g: earlier groups (j <= i) or their own group
        global_pattern: Pattern | None = (causal() | SameBlock(cfg.latents)) if cfg.causal else None

        def layers(count: int, pattern: Pattern | None) -> nn.ModuleList:
            return nn.ModuleList(Block(cfg.dim, cfg.heads, ffn, pattern=pattern, dropout=cfg.dropout,
                                       attn_dropout=cfg.attn_dropout, backend=backend, **factory)
                                 for _ in range(count))

        def cross() -> nn.ModuleDict:
            return nn.ModuleDict({"norm_q": nn.LayerNorm(cfg.dim, **factory),
                                  "norm_kv": nn.LayerNorm(cfg.dim, **factory),
                                  "attn": CrossAttention(cfg.dim, cfg.heads, dropout=cfg.attn_dropout,
                                                         backend=backend, **factory)})

        self.local = layers(local, local_pattern)
        self.write = cross() if global_ else None
        self.global_ = layers(global_, global_pattern)
        self.read = cross() if read else None


def _cross(step: nn.ModuleDict, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
    return x + step["attn"](step["norm_q"](x), step["norm_kv"](context), key_padding_mask=mask)


class FIT(nn.Module):
    """FIT over ``x: (B, N, C)`` (see the module docstring); ``forward`` returns ``FITOutput``.

    ``key_padding_mask: (B, N)`` is True for real tokens. ``N`` may be any length up to ``cfg.max_len``.
    """

    def __init__(self, cfg: FITConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        factory = {"device": device, "dtype": dtype}
        schedule = parse_schedule(cfg.schedule)
        groups = 1 if cfg.shared_latents else cfg.max_groups
        self.latent_init = nn.Parameter(torch.empty(groups * cfg.latents, cfg.dim, **factory))
        self.blocks = nn.ModuleList(FITBlock(cfg, a, g, read=i < len(schedule) - 1, backend=backend, **factory)
                                    for i, (a, g) in enumerate(schedule))
        self.norm = nn.LayerNorm(cfg.dim, **factory)
        self.norm_latents = nn.LayerNorm(cfg.dim, **factory)
        nn.init.trunc_normal_(self.latent_init, std=0.02)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None) -> FITOutput:
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"x must have shape (B, N, C={cfg.dim}), got {tuple(x.shape)}")
        b, length, c = x.shape
        n, m = cfg.group_size, cfg.latents
        t = max(1, math.ceil(length / n))
        if t > cfg.max_groups and not cfg.shared_latents:
            raise ValueError(f"x has {length} tokens, more than max_len ({cfg.max_len}) allows")
        if key_padding_mask is not None and key_padding_mask.shape != (b, length):
            raise ValueError(f"key_padding_mask must have shape (B, N) = ({b}, {length}), got "
                             f"{tuple(key_padding_mask.shape)}")
        real = key_padding_mask if key_padding_mask is not None else x.new_ones(b, length, dtype=torch.bool)
        real = nn.functional.pad(real, (0, t * n - length))  # the last group's padding
        tokens = nn.functional.pad(x, (0, 0, 0, t * n - length)).reshape(b * t, n, c)
        token_mask = None if bool(real.all()) else real.reshape(b * t, n)
        live = real.view(b, t, n).any(-1)  # (B, t): groups with a real token
        latent_mask = None if bool(live.all()) else live.repeat_interleave(m, dim=1)  # (B, t * m)
        init = self.latent_init.repeat(t, 1) if cfg.shared_latents else self.latent_init[: t * m]
        latents = init.unsqueeze(0).expand(b, -1, -1)  # (B, t * m, C)
        for block in self.blocks:
            for layer in block.local:
                tokens = layer(tokens, token_mask)
            if block.write is not None:
                latents = _cross(block.write, latents.reshape(b * t, m, c), tokens, token_mask).view(b, t * m, c)
                for layer in block.global_:
                    latents = layer(latents, latent_mask)
            if block.read is not None:
                tokens = _cross(block.read, tokens, *self._readable(latents, latent_mask, b, t))
        out = self.norm(tokens.view(b, t * n, c)[:, :length])
        return FITOutput(out, self.norm_latents(latents).view(b, t, m, c))

    def _readable(self, latents: Tensor, latent_mask: Tensor | None, b: int, t: int) -> tuple[Tensor, Tensor | None]:
        """Each group's latents as the read step's context ``(B t, m, C)`` and its mask: the group's own, or in
        the decoder the previous group's (group 0 has none)."""
        m, c = self.cfg.latents, self.cfg.dim
        live = (latent_mask if latent_mask is not None
                else latents.new_ones(b, t * m, dtype=torch.bool)).view(b, t, m)
        latents = latents.view(b, t, m, c)
        if self.cfg.causal:
            latents = torch.cat([latents.new_zeros(b, 1, m, c), latents[:, :-1]], dim=1)
            live = torch.cat([live.new_zeros(b, 1, m), live[:, :-1]], dim=1)
        mask = None if bool(live.all()) else live.reshape(b * t, m)
        return latents.reshape(b * t, m, c), mask
