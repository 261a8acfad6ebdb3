"""Longformer (Beltagy et al., 2020) on longattn's kernels, loading Hugging Face Longformer checkpoints.

Notation: b batch, h head, n tokens, g global tokens of one example (padded to the batch's largest count),
c model width, d head dim.

Attention of one layer, as Hugging Face's ``LongformerSelfAttention`` computes it:
- a *local* query i (``global_attention_mask = 0``) attends keys ``|i - j| <= w/2`` (``w`` = the layer's
  ``attention_window``; with a dilation ``d``, the keys ``i + k*d`` for ``|k| <= w/2``) and every global key,
  each once, with the projections ``query/key/value``; padding keys are never attended;
- a *global* query attends every non-padding key with the separate projections ``query_global/key_global/
  value_global``;
- padding queries output zeros.
The local part is one ``longattn.attention`` call with the pattern ``window | global_tokens(mask)`` (linear
memory). The global rows are computed from the hidden states directly: with g global tokens,
``softmax(q_g (W_k x + b_k)^T) (W_v x + b_v)`` is evaluated as ``softmax((q_g W_k) x^T + q_g b_k) x W_v^T
+ b_v``, which costs O(g n c) instead of the O(n c^2) of projecting every token (used while g*h < c).
Hugging Face pads the input to a multiple of the window; the kernels here need no padding, and since padding
is never attended the outputs of real tokens are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..functional import attention
from ..patterns import Pattern, dilated, documents, global_tokens, sliding_window
from ..patterns.documents import PAD
from . import hf_checkpoint as ckpt
from .packing import document_positions
from ._bert_blocks import (BertShape, Embeddings, EncoderOutput, Layer, LayerStack, Padding, check_ids, check_mask,
                           init_bert_weights, merge_heads, split_heads)


# ---- config ------------------------------------------------------------------------------------------
@dataclass
class LongformerConfig(BertShape):
    """Hugging Face's ``LongformerConfig`` fields (same names and defaults), plus a per-layer dilation."""

    attention_window: list[int] | int = 512  # keys per query window (w/2 each side), per layer or one for all
    attention_dilation: list[int] | int = 1  # longattn extension: spacing of the window keys (Hugging Face: 1)
    pad_token_id: int = 1

    def validate(self) -> None:
        super().validate()
        layers = self.num_hidden_layers
        for name in ("attention_window", "attention_dilation"):
            value = getattr(self, name)
            values = [value] * layers if isinstance(value, int) else list(value)
            if len(values) != layers:
                raise ValueError(f"{name} must hold one value per layer ({layers}), got {len(values)}")
            if any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must hold positive ints, got {values}")
            setattr(self, name, values)
        odd = [w for w in self.attention_window if w % 2]
        if odd:
            raise ValueError(f"attention_window must be even (w/2 keys on each side), got {odd[0]}")

    def to_hf(self) -> dict:
        out = super().to_hf()
        if all(d == 1 for d in self.attention_dilation):
            out.pop("attention_dilation")  # Hugging Face has no dilation; keep its files clean
        return {**out, "model_type": "longformer", "architectures": ["LongformerModel"]}


# ---- self-attention ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlobalTokens:
    """A batch's global tokens, derived once per forward for every layer."""

    pattern: Pattern  # global_tokens(...) for the local attention call
    slots: Tensor  # (B, G) positions of each example's global tokens, padded with 0
    valid: Tensor  # (B, G) bool: the slot is a real global token
    keys: Tensor | None = None  # (B, G, N) bool: the keys each global row attends (packed: its document's)

    def within(self, segment_ids: Tensor, real: Tensor) -> "GlobalTokens":
        """The same tokens in a packed batch: each global row attends its own document's keys only."""
        own = segment_ids.gather(1, self.slots)  # (B, G)
        return replace(self, keys=(own[:, :, None] == segment_ids[:, None, :]) & real[:, None, :])

    @classmethod
    def of(cls, flags: Tensor) -> "GlobalTokens":
        # The same positions in every example (a CLS token, batch 1): a static pattern whose plan is cached;
        # otherwise the (B, N) mask itself.
        same = bool((flags == flags[:1]).all())
        pattern = global_tokens(flags[0].nonzero().flatten().tolist() if same else flags)
        counts = flags.sum(1)
        g = int(counts.max())
        # Stable sort puts the global positions first, in order.
        order = torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices[:, :g]  # (B, G)
        valid = torch.arange(g, device=flags.device)[None, :] < counts[:, None]
        return cls(pattern, torch.where(valid, order, torch.zeros_like(order)), valid)


class LongformerSelfAttention(nn.Module):
    """One layer's local + global attention (see the module docstring); ``x: (B, N, C)`` in and out."""

    def __init__(self, cfg: LongformerConfig, layer: int, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        c, factory = cfg.hidden_size, {"device": device, "dtype": dtype}
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(self, name, nn.Linear(c, c, **factory))
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.window, self.dilation = cfg.attention_window[layer], cfg.attention_dilation[layer]
        self.dropout, self.backend = cfg.attention_probs_dropout_prob, backend
        half = self.window // 2
        self.local_pattern: Pattern = sliding_window(half) if self.dilation == 1 else dilated(self.window,
                                                                                              self.dilation)

    def forward(self, x: Tensor, *, padding: Padding, globals_: GlobalTokens | None,
                documents: Pattern | None = None) -> Tensor:
        h, p = self.heads, (self.dropout if self.training else 0.0)
        q, k, v = (split_heads(proj(x), h) for proj in (self.query, self.key, self.value))  # (B, H, N, D)
        pattern = self.local_pattern if globals_ is None else self.local_pattern | globals_.pattern
        if documents is not None:  # a packed batch: nothing crosses a document boundary
            pattern = documents & pattern
        out = merge_heads(attention(q, k, v, pattern=pattern, key_padding_mask=padding.keys, dropout_p=p,
                                    backend=self.backend))  # (B, N, C)
        if globals_ is not None:
            out = self._global_rows(x, out, padding.real, globals_, p)
        return out * padding.real[..., None].to(out.dtype)  # padding queries output zeros, as Hugging Face

    def _global_rows(self, x: Tensor, out: Tensor, padding: Tensor, globals_: GlobalTokens, p: float) -> Tensor:
        b, n, c = x.shape
        h, d = self.heads, self.head_dim
        slots, valid = globals_.slots, globals_.valid  # (B, G)
        g = slots.shape[1]
        xg = x.gather(1, slots[..., None].expand(b, g, c))  # (B, G, C)
        qg = split_heads(self.query_global(xg), h) * d ** -0.5  # (B, H, G, D)
        keys = padding[:, None, :] if globals_.keys is None else globals_.keys  # (B, 1 | G, N)
        if g * h < c:
            ctx = self._absorbed(x, qg, keys, p)
        else:
            kg, vg = split_heads(self.key_global(x), h), split_heads(self.value_global(x), h)
            ctx = attention(qg, kg, vg, attn_mask=keys[:, None], scale=1.0, dropout_p=p, backend="dense")
        ctx = merge_heads(ctx)  # (B, G, C)
        rows = torch.arange(b, device=x.device)[:, None].expand(b, g)
        out = out.clone()
        out[rows[valid], slots[valid]] = ctx[valid].to(out.dtype)
        return out

    def _absorbed(self, x: Tensor, qg: Tensor, keys: Tensor, p: float) -> Tensor:
        """Global rows without projecting all n tokens: the key/value projections move to the g queries."""
        h, d = self.heads, self.head_dim
        wk = self.key_global.weight.view(h, d, -1)  # (H, D, C)
        wv = self.value_global.weight.view(h, d, -1)  # (H, D, C)
        q_in = torch.einsum("bhgd,hdc->bhgc", qg, wk)  # (B, H, G, C)
        bias = torch.einsum("bhgd,hd->bhg", qg, self.key_global.bias.view(h, d))  # (B, H, G)
        scores = torch.einsum("bhgc,bnc->bhgn", q_in, x) + bias[..., None]  # (B, H, G, N)
        scores = scores.masked_fill(~keys[:, None], float("-inf"))  # keys: (B, 1 | G, N)
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        probs = nn.functional.dropout(probs, p=p, training=p > 0)
        mixed = torch.einsum("bhgn,bnc->bhgc", probs, x)  # (B, H, G, C)
        return torch.einsum("bhgc,hdc->bhgd", mixed, wv) + self.value_global.bias.view(h, 1, d)  # (B, H, G, D)


# ---- model -------------------------------------------------------------------------------------------
class LongformerModel(nn.Module):
    """Hugging Face ``LongformerModel``-compatible encoder running on longattn's sparse kernels.

    ``forward(input_ids (B, N) | inputs_embeds (B, N, C), attention_mask=(B, N) 1 real / 0 padding (2 = global,
    the original Longformer convention), global_attention_mask=(B, N) 1 global / 0 local, token_type_ids,
    position_ids)`` returns
    ``EncoderOutput(last_hidden_state (B, N, C), pooler_output (B, C))``, the same numbers as
    ``transformers.LongformerModel`` on the same weights (tested to 1e-4 in fp32). Any ``N`` works up to the
    position table (``max_position_embeddings - pad_token_id - 1`` tokens): no padding to the window.

    Packed batches (``models.packing.pack``): ``segment_ids=(B, N)`` names each position's document (-1
    after the last); attention, global tokens and positions then stay inside each document, and every
    document's states equal those of running it alone (``unpack`` gives them back). ``pooler_output`` is
    position 0's, as always: pool per document from ``PackedBatch.first_tokens``.
    ``gradient_checkpointing_enable()`` trades one extra forward for the layers' activation memory when
    fine-tuning on 4K+ tokens.
    """

    model_types = ("longformer",)

    def __init__(self, config: LongformerConfig, *, add_pooling_layer: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.embeddings = Embeddings(config, roberta_positions=True, **factory)
        self.encoder = LayerStack([
            Layer(LongformerSelfAttention(config, i, backend=backend, **factory), config, **factory)
            for i in range(config.num_hidden_layers)])
        if add_pooling_layer:
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(config.hidden_size, config.hidden_size, **factory)
        else:
            self.pooler = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_bert_weights(self, self.config.initializer_range)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                global_attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                segment_ids: Tensor | None = None) -> EncoderOutput:
        shape = check_ids(input_ids, inputs_embeds, self.config.hidden_size)
        padding = check_mask(attention_mask, "attention_mask", shape)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        padding = torch.ones(shape, dtype=torch.bool, device=device) if padding is None else padding
        documents = None
        if segment_ids is not None:
            documents, padding, position_ids = self._packed(segment_ids, shape, padding, position_ids)
        flags = check_mask(global_attention_mask, "global_attention_mask", shape)
        if attention_mask is not None and bool((attention_mask == 2).any()):
            # Longformer's original API: 2 in attention_mask marks a global token (Hugging Face keeps it).
            legacy = attention_mask == 2
            flags = legacy if flags is None else flags | legacy
        if flags is not None:
            flags = flags & padding  # a padding token is never global
            flags = flags if bool(flags.any()) else None
        x = self.embeddings(input_ids, inputs_embeds=inputs_embeds, token_type_ids=token_type_ids,
                            position_ids=position_ids)
        padding, globals_ = Padding.of(padding), None if flags is None else GlobalTokens.of(flags)
        if globals_ is not None and documents is not None:
            globals_ = globals_.within(segment_ids, padding.real)
        x = self.encoder(x, padding=padding, globals_=globals_, documents=documents)
        pooled = torch.tanh(self.pooler.dense(x[:, 0])) if self.pooler is not None else None
        return EncoderOutput(last_hidden_state=x, pooler_output=pooled)

    def _packed(self, segment_ids: Tensor, shape: tuple[int, int], padding: Tensor, position_ids: Tensor | None
                ) -> tuple[Pattern, Tensor, Tensor]:
        """The documents pattern, the padding (PAD positions included) and RoBERTa positions restarting at
        every document, for ``segment_ids``."""
        if not isinstance(segment_ids, Tensor) or segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
            raise TypeError("segment_ids must be an integer tensor of shape (B, N)")
        if tuple(segment_ids.shape) != tuple(shape):
            raise ValueError(f"segment_ids must have shape (B, N) = {tuple(shape)}, got {tuple(segment_ids.shape)}")
        segment_ids = segment_ids.long()
        real = padding & (segment_ids != PAD)
        if position_ids is None:
            position_ids = torch.where(real, document_positions(segment_ids) + self.config.pad_token_id + 1,
                                       torch.full_like(segment_ids, self.config.pad_token_id))
        return documents(segment_ids=segment_ids), real, position_ids

    # ---- fine-tuning on long inputs ----
    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations (Hugging Face's name):
        the same loss and gradients for one extra forward, while training with grad enabled only."""
        self.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    # ---- Hugging Face directories ----
    @classmethod
    def from_pretrained(cls, path: str | Path, *, backend: str = "auto", device=None, dtype=None,
                        strict: bool = True) -> "LongformerModel":
        """Load a Hugging Face Longformer directory (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``), from ``LongformerModel`` or a task model (``LongformerForMaskedLM``, ...).
        ``strict``: layers the config has no place for are an error (``hf_checkpoint.load_into``)."""
        hf = ckpt.read_config(path)
        ckpt.check_model_type(hf, cls.model_types, "Longformer", path,
                              hint="; convert a BERT/RoBERTa checkpoint with `longattn convert --to-long N`")
        with ckpt.config_errors(path):
            config = LongformerConfig.from_hf(hf)
        weights = ckpt.read_weights(path)
        has_pooler = any(k.endswith("pooler.dense.weight") for k in weights)
        model = cls(config, add_pooling_layer=has_pooler, backend=backend, device=device, dtype=dtype)
        ckpt.load_into(model, weights, path=path, strict=strict)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` that both longattn and ``transformers`` load."""
        return ckpt.save_directory(path, self.config.to_hf(), self.state_dict())
