"""BigBird-ITC (Zaheer et al., 2020) on longattn's kernels, loading Hugging Face BigBird checkpoints.

Notation: b batch, h head, n tokens, nb = ceil(n / block) blocks, r random blocks per query block.

Each layer attends with ``longattn.bigbird(block, window_blocks=3, global_blocks=2, random_blocks=r)``:
the first and the last block are global rows and columns, every other query block sees its 3 neighbouring
blocks and r random key blocks. By default the random blocks are drawn once from ``random_seed + layer``
and are the same in training and evaluation (longattn's semantics), for any ``n`` (no padding to the block).

``hf_parity=True`` reproduces ``transformers.BigBirdModel`` in evaluation instead, quirks included:
- inputs of at most ``(5 + 2r) * block`` tokens use full attention (Hugging Face switches its
  ``attention_type`` to ``original_full``; here nothing is switched, each call decides);
- random blocks are *disabled* in evaluation: Hugging Face's random table is all zeros, so every non-global
  query block gathers key block 0 r more times. Block 0 then counts ``1 + r`` times in the softmax, which
  equals adding ``log(1 + r)`` to those scores; that bias is carried by one extra query/key dimension
  (``q_extra = log(1 + r) / scale`` on rows of blocks 1..nb-2, ``k_extra = 1`` on keys of block 0), so
  the sparse kernels compute it exactly, in linear memory;
- padding query rows output zeros (block-sparse mode) or attend normally (full mode).

A causal (decoder) BigBird, which Hugging Face refuses in block-sparse mode, is ``is_decoder=True``:
``causal(bigbird(...))`` with bottom-right alignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..functional import attention
from ..patterns import Pattern, bigbird, causal
from . import hf_checkpoint as ckpt
from ._bert_blocks import (BertShape, Embeddings, EncoderOutput, Layer, LayerStack, Padding, check_ids, check_mask,
                           init_bert_weights, merge_heads, split_heads)


# ---- config ------------------------------------------------------------------------------------------
@dataclass
class BigBirdConfig(BertShape):
    """Hugging Face's ``BigBirdConfig`` fields (same names and defaults), plus ``random_seed``."""

    vocab_size: int = 50358
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 4096
    attention_type: str = "block_sparse"  # or "original_full" (dense attention)
    block_size: int = 64  # tokens per block
    num_random_blocks: int = 3  # r, random key blocks per query block
    use_bias: bool = True  # bias on the query/key/value projections
    rescale_embeddings: bool = False  # word embeddings times sqrt(C)
    is_decoder: bool = False  # causal BigBird
    random_seed: int = 0  # longattn extension: layer l draws its random blocks from random_seed + l

    MINIMUM: ClassVar[dict[str, float]] = {**BertShape.MINIMUM, "num_random_blocks": 0, "random_seed": 0}

    def validate(self) -> None:
        super().validate()
        if self.attention_type not in ("block_sparse", "original_full"):
            raise ValueError(f"attention_type must be 'block_sparse' or 'original_full', got "
                             f"{self.attention_type!r}")
        if self.block_size < 1 or self.num_random_blocks < 0:
            raise ValueError(f"block_size must be >= 1 and num_random_blocks >= 0, got {self.block_size} and "
                             f"{self.num_random_blocks}")

    def to_hf(self) -> dict:
        return {**super().to_hf(), "model_type": "big_bird", "architectures": ["BigBirdModel"]}

    @property
    def full_attention_below(self) -> int:
        """Hugging Face uses full attention up to this many tokens: ``(5 + 2r) * block``."""
        return (5 + 2 * self.num_random_blocks) * self.block_size


# ---- self-attention ----------------------------------------------------------------------------------
def _block_zero_bias(q: Tensor, k: Tensor, block: int, random_blocks: int, scale: float) -> tuple[Tensor, Tensor]:
    """Append the extra dimension that adds ``log(1 + r)`` to the scores of rows in blocks 1..nb-2 against
    keys of block 0 (Hugging Face's all-zero random table in evaluation; see the module docstring)."""
    n = q.shape[2]
    nb = math.ceil(n / block)
    pos = torch.arange(n, device=q.device)
    middle_row = ((pos >= block) & (pos < (nb - 1) * block)).to(q.dtype)  # (N,)
    first_key = (pos < block).to(k.dtype)  # (N,)
    boost = math.log(1 + random_blocks) / scale
    q_extra = (boost * middle_row).expand(*q.shape[:2], n)[..., None]  # (B, H, N, 1)
    k_extra = first_key.expand(*k.shape[:2], n)[..., None]  # (B, H, N, 1)
    return torch.cat([q, q_extra], dim=-1), torch.cat([k, k_extra], dim=-1)


class BigBirdSelfAttention(nn.Module):
    """One layer's BigBird attention; ``x: (B, N, C)`` in and out."""

    def __init__(self, cfg: BigBirdConfig, layer: int, *, hf_parity: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        c, factory = cfg.hidden_size, {"device": device, "dtype": dtype}
        for name in ("query", "key", "value"):
            setattr(self, name, nn.Linear(c, c, bias=cfg.use_bias, **factory))
        self.cfg, self.layer, self.hf_parity, self.backend = cfg, layer, hf_parity, backend

    def pattern(self, n: int) -> Pattern | None:
        """The pattern for ``n`` tokens in the current mode (None = full attention)."""
        cfg = self.cfg
        parity_eval = self.hf_parity and not self.training
        if cfg.attention_type == "original_full" or (parity_eval and n <= cfg.full_attention_below):
            pattern = None
        else:
            r = 0 if parity_eval else cfg.num_random_blocks
            pattern = bigbird(cfg.block_size, 3, 2, r, seed=cfg.random_seed + self.layer)
        if cfg.is_decoder:
            return causal(pattern)
        return pattern

    def forward(self, x: Tensor, *, padding: Padding) -> Tensor:
        cfg, n = self.cfg, x.shape[1]
        h = cfg.num_attention_heads
        q, k, v = (split_heads(proj(x), h) for proj in (self.query, self.key, self.value))  # (B, H, N, D)
        pattern = self.pattern(n)
        scale = cfg.head_dim ** -0.5
        block_sparse = pattern is not None and not cfg.is_decoder
        if block_sparse and self.hf_parity and not self.training and cfg.num_random_blocks:
            q, k = _block_zero_bias(q, k, cfg.block_size, cfg.num_random_blocks, scale)
        p = cfg.attention_probs_dropout_prob if self.training else 0.0
        out = merge_heads(attention(q, k, v, pattern=pattern, key_padding_mask=padding.keys, scale=scale,
                                    dropout_p=p, backend=self.backend))  # (B, N, C)
        if block_sparse:
            out = out * padding.real[..., None].to(out.dtype)  # Hugging Face's block-sparse path zeroes padding rows
        return out


# ---- model -------------------------------------------------------------------------------------------
class BigBirdModel(nn.Module):
    """Hugging Face ``BigBirdModel``-compatible encoder (or causal decoder) on longattn's sparse kernels.

    ``forward(input_ids (B, N) | inputs_embeds (B, N, C), attention_mask=(B, N) 1 real / 0 padding,
    token_type_ids, position_ids)`` returns ``EncoderOutput(last_hidden_state (B, N, C), pooler_output
    (B, C))``. With ``hf_parity=True`` the outputs in evaluation equal ``transformers.BigBirdModel``'s on the
    same weights (tested to 1e-4 in fp32); see the module docstring for what that mode changes.
    """

    model_types = ("big_bird",)

    def __init__(self, config: BigBirdConfig, *, add_pooling_layer: bool = True, hf_parity: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config, self.hf_parity = config, hf_parity
        factory = {"device": device, "dtype": dtype}
        self.embeddings = Embeddings(config, roberta_positions=False, rescale=config.rescale_embeddings, **factory)
        self.encoder = LayerStack([
            Layer(BigBirdSelfAttention(config, i, hf_parity=hf_parity, backend=backend, **factory), config,
                  **factory)
            for i in range(config.num_hidden_layers)])
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size, **factory) if add_pooling_layer else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_bert_weights(self, self.config.initializer_range)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> EncoderOutput:
        shape = check_ids(input_ids, inputs_embeds, self.config.hidden_size)
        padding = check_mask(attention_mask, "attention_mask", shape)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        padding = torch.ones(shape, dtype=torch.bool, device=device) if padding is None else padding
        x = self.embeddings(input_ids, inputs_embeds=inputs_embeds, token_type_ids=token_type_ids,
                            position_ids=position_ids)
        padding = Padding.of(padding)
        for layer in self.encoder.layer:
            x = layer(x, padding=padding)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return EncoderOutput(last_hidden_state=x, pooler_output=pooled)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, hf_parity: bool = False, backend: str = "auto", device=None,
                        dtype=None, strict: bool = True) -> "BigBirdModel":
        """Load a Hugging Face BigBird directory (``BigBirdModel`` or a task model built on it). ``strict``:
        layers the config has no place for are an error (``hf_checkpoint.load_into``)."""
        hf = ckpt.read_config(path)
        ckpt.check_model_type(hf, cls.model_types, "BigBird", path)
        with ckpt.config_errors(path):
            config = BigBirdConfig.from_hf(hf)
        weights = ckpt.read_weights(path)
        has_pooler = any(k.endswith("pooler.weight") and "dense" not in k for k in weights)
        model = cls(config, add_pooling_layer=has_pooler, hf_parity=hf_parity, backend=backend, device=device,
                    dtype=dtype)
        ckpt.load_into(model, weights, path=path, strict=strict)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` that both longattn and ``transformers`` load."""
        return ckpt.save_directory(path, self.config.to_hf(), self.state_dict())
