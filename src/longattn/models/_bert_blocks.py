"""The BERT-family pieces that Longformer, BigBird and converted BERT/RoBERTa checkpoints share.

Modules keep Hugging Face's attribute names (``attention.self.query``, ``output.LayerNorm``, ...) so that a
checkpoint's state dict loads without a renaming table. Blocks are post-LN, as BERT:
``h = LN(h + Dropout(W_o attn(h)))``, then ``h = LN(h + Dropout(W_2 act(W_1 h)))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config_fields import check_fields

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class BertShape:
    """The fields every BERT-family ``config.json`` carries (Hugging Face's names and defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 768  # C
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # H; head dim = C / H
    intermediate_size: int = 3072  # feed-forward width
    hidden_act: str = "gelu"  # a key of ACTIVATIONS
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512  # rows of the position table
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02  # std of the normal initialisation
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, written back unchanged

    #: floors other than config_fields' default (ints >= 1, floats > 0), and the rates in [0, 1)
    MINIMUM: ClassVar[dict[str, float]] = {"pad_token_id": 0, "type_vocab_size": 0, "initializer_range": 0}
    RATES: ClassVar[tuple[str, ...]] = ("hidden_dropout_prob", "attention_probs_dropout_prob")

    def __post_init__(self):
        check_fields(self, minimum=self.MINIMUM, rates=self.RATES)
        self.check_shape()

    @classmethod
    def from_hf(cls, config: dict):
        """From a ``config.json`` dict: known keys become fields, the rest is kept in ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names and v is not None}
        cfg = cls(**known, extra={k: v for k, v in config.items() if k not in names})
        cfg.validate()
        return cfg

    def to_hf(self) -> dict:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return out

    def validate(self) -> None:
        """The checks that need every field settled (a family may also normalise fields here)."""
        self.check_shape()

    def check_shape(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (expected one of "
                             f"{sorted(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class EncoderOutput:
    last_hidden_state: Tensor  # (B, N, C)
    pooler_output: Tensor | None = None  # (B, C): tanh(W h_0 + b), None without a pooler


@dataclass(frozen=True)
class Padding:
    """A batch's padding, derived once per forward for every layer."""

    real: Tensor  # (B, N) bool, True = real token
    keys: Tensor | None  # ``real`` as the kernels' key_padding_mask; None when nothing is padded (no masking)

    @classmethod
    def of(cls, real: Tensor) -> "Padding":
        return cls(real, None if bool(real.all()) else real)


def roberta_position_ids(input_ids: Tensor, padding_idx: int) -> Tensor:
    """RoBERTa/Longformer positions: real tokens count from ``padding_idx + 1``, padding keeps ``padding_idx``."""
    real = input_ids.ne(padding_idx).int()
    return (torch.cumsum(real, dim=1).type_as(real) * real).long() + padding_idx


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (BERT, RoBERTa, Longformer, BigBird)."""

    def __init__(self, cfg: BertShape, *, roberta_positions: bool, rescale: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        c = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, c, padding_idx=cfg.pad_token_id, **factory)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, c,
                                                padding_idx=cfg.pad_token_id if roberta_positions else None,
                                                **factory)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, c, **factory)
        self.LayerNorm = nn.LayerNorm(c, eps=cfg.layer_norm_eps, **factory)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.roberta_positions, self.rescale, self.padding_idx = roberta_positions, rescale, cfg.pad_token_id

    def position_ids(self, input_ids: Tensor | None, batch: int, length: int, device) -> Tensor:
        if self.roberta_positions:
            if input_ids is not None:
                return roberta_position_ids(input_ids, self.padding_idx)
            start = self.padding_idx + 1  # no ids, so no padding to see: sequential, as Hugging Face
            return torch.arange(start, start + length, device=device).expand(batch, length)
        return torch.arange(length, device=device).expand(batch, length)

    def forward(self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x.shape[:2]
        if position_ids is None:
            position_ids = self.position_ids(input_ids, b, n, x.device)
        table = self.position_embeddings.num_embeddings
        if n and int(position_ids.max()) >= table:
            raise ValueError(f"a sequence of {n} tokens needs position {int(position_ids.max())}, but the position "
                             f"table has {table} entries (max_position_embeddings); shorten the input or extend "
                             f"the table with `longattn convert --to-long`")
        if token_type_ids is None:
            token_type_ids = torch.zeros(b, n, dtype=torch.long, device=x.device)
        if self.rescale:  # BigBird's rescale_embeddings
            x = x * self.word_embeddings.embedding_dim ** 0.5
        x = x + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class ResidualOutput(nn.Module):
    """``LN(residual + Dropout(dense(x)))``: BERT's SelfOutput and Output."""

    def __init__(self, d_in: int, cfg: BertShape, *, device=None, dtype=None):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size, device=device, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device, dtype=dtype)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class Intermediate(nn.Module):
    def __init__(self, cfg: BertShape, *, device=None, dtype=None):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size, device=device, dtype=dtype)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class AttentionBlock(nn.Module):
    """``attention.self`` (the model's own self-attention) + ``attention.output``."""

    def __init__(self, self_attention: nn.Module, cfg: BertShape, *, device=None, dtype=None):
        super().__init__()
        self.self = self_attention
        self.output = ResidualOutput(cfg.hidden_size, cfg, device=device, dtype=dtype)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.output(self.self(x, **kwargs), x)


class Layer(nn.Module):
    """One post-LN transformer block with Hugging Face's names."""

    def __init__(self, self_attention: nn.Module, cfg: BertShape, *, device=None, dtype=None):
        super().__init__()
        self.attention = AttentionBlock(self_attention, cfg, device=device, dtype=dtype)
        self.intermediate = Intermediate(cfg, device=device, dtype=dtype)
        self.output = ResidualOutput(cfg.intermediate_size, cfg, device=device, dtype=dtype)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        h = self.attention(x, **kwargs)
        return self.output(self.intermediate(h), h)


class LayerStack(nn.Module):
    """``encoder.layer.{i}``, run in order: ``forward(x (B, N, C), **kwargs) -> (B, N, C)``, each layer called
    as ``layer(x, **kwargs)``.

    ``gradient_checkpointing = True`` keeps only each layer's input for the backward pass and recomputes the
    layer there (``torch.utils.checkpoint``, non-reentrant, RNG state restored so dropout draws the same
    masks): activation memory per layer drops from all its intermediates to one (B, N, C) tensor, for one
    extra forward. It acts only while training with grad enabled, and is a flag of the module, not of the
    config, so a saved model never records it.
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layer:
            x = checkpoint(layer, x, use_reentrant=False, **kwargs) if recompute else layer(x, **kwargs)
        return x


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights and embeddings, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, H, N, D)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, C)


def check_ids(input_ids: Tensor | None, inputs_embeds: Tensor | None, hidden_size: int) -> tuple[int, int]:
    """(B, N) of the input; ``ValueError``/``TypeError`` naming the argument otherwise."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids (B, N) and inputs_embeds (B, N, C)")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, N), got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        return tuple(input_ids.shape)
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(f"inputs_embeds must have shape (B, N, C={hidden_size}), got {tuple(inputs_embeds.shape)}")
    return tuple(inputs_embeds.shape[:2])


def check_mask(mask: Tensor | None, name: str, shape: tuple[int, int]) -> Tensor | None:
    """A (B, N) 0/1 mask as bool, or ``ValueError`` naming ``name``."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape (B, N) = {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.bool()
