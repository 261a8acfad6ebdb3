"""The pre-LayerNorm Transformer block that LRA's encoder and FIT's layers share."""

from __future__ import annotations

from torch import Tensor, nn

from ..patterns import Pattern
from .sparse_self_attention import SparseSelfAttention


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` (LRA's encoder block, and
    FIT's local and global layers). ``attn``: another self-attention module over ``(B, N, C)`` taking
    ``key_padding_mask`` (``CombinerAttention``) instead of ``SparseSelfAttention`` with ``pattern``."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, *, pattern: Pattern | None = None,
                 qkv_dim: int | None = None, dropout: float = 0.0, attn_dropout: float = 0.0, backend: str = "auto",
                 attn: nn.Module | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.attn = attn if attn is not None else SparseSelfAttention(
            dim, heads, pattern=pattern, qkv_dim=qkv_dim, dropout=attn_dropout, backend=backend, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim, **factory), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim, **factory))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, documents: Pattern | None = None) -> Tensor:
        packed = {} if documents is None else {"documents": documents}  # only SparseSelfAttention packs
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask=key_padding_mask, **packed))
        return x + self.drop(self.mlp(self.norm2(x)))
