"""ETC (Ainslie et al. 2020, "ETC: Encoding Long and Structured Inputs in Transformers"): the model.

Two inputs: a long input of token ids and a small global input with one global token per segment
(sentence, paragraph), related by ``etc_structure``. Every layer runs ETC's global-local attention
(``longattn.modules.GlobalLocalAttention``: g2g, g2l, l2g and l2l pieces with relative labels, linear memory
in N) on both streams, then a feed-forward block shared by them.

Notation: B batch, C model width, N long tokens, G global tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..modules.global_local_attention import EtcStructure, GlobalLocalAttention, etc_structure
from . import hf_checkpoint as ckpt
from .config_fields import check_fields



def segment_mean(x: Tensor, structure: EtcStructure) -> Tensor:
    """Mean of each segment's long vectors: ``x (B, N, C)`` -> ``(B, G, C)`` (zeros for empty segments)."""
    b, n, c = x.shape
    g = structure.num_global
    idx = torch.where(structure.long_to_global >= 0, structure.long_to_global, g)  # padding into bucket g
    sums = x.new_zeros(b, g + 1, c).scatter_add_(1, idx[..., None].expand(b, n, c), x)  # (B, G + 1, C)
    counts = torch.zeros(b, g + 1, dtype=x.dtype, device=x.device).scatter_add_(1, idx, torch.ones_like(x[..., 0]))
    return sums[:, :g] / counts[:, :g, None].clamp_min(1)


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


# ---- config and model ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EtcConfig:
    vocab_size: int  # long token ids are in [0, vocab_size)
    dim: int = 768  # model width C
    depth: int = 12  # Transformer layers, each updating both streams
    heads: int = 12  # attention heads; head dim = dim / heads
    ffn_dim: int = 3072  # hidden width of the feed-forward block
    local_radius: int = 84  # r: long token i attends long tokens |i - j| <= r (ETC's default)
    max_relative_distance: int | None = 12  # k: relative labels clip(j - i, -k, k); None = no relative labels
    max_global: int = 256  # most global tokens (segments) per example
    dropout: float = 0.1  # on embeddings and residual branches
    attn_dropout: float = 0.1  # on attention probabilities
    type_vocab_size: int = 2  # token types of the long input (BERT's segment A/B)
    global_vocab_size: int = 1  # kinds of global token (sentence, paragraph, question ...); ids in [0, this)
    global_segment_mean: bool = False  # add the mean of a segment's long embeddings to its global token
    hard_g2l: bool = False  # a global token attends only its own segment's long tokens
    hard_l2g: bool = False  # a long token attends only its own segment's global token
    layer_norm_eps: float = 1e-12  # BERT's
    initializer_range: float = 0.02  # std of the normal initialisation (BERT, ETC)

    def __post_init__(self):
        check_fields(self, minimum={"local_radius": 0, "max_relative_distance": 0, "initializer_range": 0},
                     rates=("dropout", "attn_dropout"))
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")


class EtcLayer(nn.Module):
    """Post-LayerNorm (BERT/ETC) layer: ``ln(x + attn(x))`` per stream, then ``ln(x + ffn(x))``.

    As ETC's defaults (``share_feed_forward_params``, not ``share_att_output_projection``): the attention's
    output projection and LayerNorm are separate for long and global, the feed-forward block is shared.
    """

    def __init__(self, cfg: EtcConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.attn = GlobalLocalAttention(cfg.dim, cfg.heads, local_radius=cfg.local_radius,
                                         max_relative_distance=cfg.max_relative_distance, hard_g2l=cfg.hard_g2l,
                                         hard_l2g=cfg.hard_l2g, dropout=cfg.attn_dropout, backend=backend, **factory)
        self.long_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps, **factory)
        self.global_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps, **factory)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim, **factory), nn.GELU(),
                                 nn.Linear(cfg.ffn_dim, cfg.dim, **factory))
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps, **factory)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, g: Tensor, structure: EtcStructure) -> tuple[Tensor, Tensor]:
        attended = self.attn(x, g, structure)
        x = self.long_norm(x + self.drop(attended.long))
        g = self.global_norm(g + self.drop(attended.global_))
        both = torch.cat([x, g], dim=1)  # (B, N + G, C): one shared position-wise block
        both = self.ffn_norm(both + self.drop(self.ffn(both)))
        return both[:, : x.shape[1]], both[:, x.shape[1]:]


@dataclass
class EtcOutput:
    long_hidden_state: Tensor  # (B, N, C)
    global_hidden_state: Tensor  # (B, G, C)
    structure: EtcStructure  # masks and the long-to-global relation the layers used


class EtcModel(ckpt.Pretrained, nn.Module):
    """ETC encoder over a long input with one global token per segment.

    ``forward(input_ids (B, N), segment_ids (B, N), *, token_type_ids=None, global_token_ids=None)``:
    ``segment_ids`` numbers each token's segment ``0 .. S - 1`` (negative = padding; see ``etc_structure``),
    ``global_token_ids (B, G)`` the kind of each global token (default 0). Long tokens are embedded as token +
    token type (ETC has no absolute positions: order comes from the relative labels), global tokens as their
    kind (+ the mean of their segment's long embeddings when ``cfg.global_segment_mean``). Returns ``EtcOutput``.
    """

    MODEL_TYPE = "longattn_etc"  # config.json's model_type of saved ETC models
    FAMILY = "longattn ETC"
    CONFIG = EtcConfig

    def __init__(self, cfg: EtcConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        factory = {"device": device, "dtype": dtype}
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.dim, **factory)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.dim, **factory)
        self.global_embed = nn.Embedding(cfg.global_vocab_size, cfg.dim, **factory)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps, **factory)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EtcLayer(cfg, backend=backend, **factory) for _ in range(cfg.depth))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, GlobalLocalAttention):
                module.reset_parameters(std)

    def forward(self, input_ids: Tensor, segment_ids: Tensor, *, token_type_ids: Tensor | None = None,
                global_token_ids: Tensor | None = None) -> EtcOutput:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, N), got {_describe(input_ids)}")
        if not isinstance(segment_ids, Tensor) or segment_ids.shape != input_ids.shape:
            raise ValueError(f"segment_ids must have shape (B, N) = {tuple(input_ids.shape)} like input_ids, "
                             f"got {_describe(segment_ids)}")
        structure = etc_structure(segment_ids, max_global=self.cfg.max_global)
        b, g = input_ids.shape[0], structure.num_global
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids must have shape (B, N) = {tuple(input_ids.shape)}, "
                             f"got {tuple(token_type_ids.shape)}")
        if global_token_ids is None:
            global_token_ids = torch.zeros(b, g, dtype=torch.long, device=input_ids.device)
        elif global_token_ids.shape != (b, g):
            raise ValueError(f"global_token_ids must have shape (B, G) = ({b}, {g}) (G = number of segments), "
                             f"got {tuple(global_token_ids.shape)}")
        x = self.token_embed(input_ids.long()) + self.type_embed(token_type_ids.long())  # (B, N, C)
        gx = self.global_embed(global_token_ids.long())  # (B, G, C)
        if self.cfg.global_segment_mean:
            gx = gx + segment_mean(x, structure)
        x, gx = self.drop(self.embed_norm(x)), self.drop(self.embed_norm(gx))
        for layer in self.layers:
            x, gx = layer(x, gx, structure)
        return EtcOutput(x, gx, structure)
