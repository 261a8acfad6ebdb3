"""``SparseSelfAttention``: multi-head self-attention over ``x: (B, N, C)`` with a longattn pattern."""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from ..functional import attention
from ..patterns import Pattern


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention whose score pattern is a longattn ``Pattern``.

    Args:
        dim: model width C.
        heads: number of heads H (per-head patterns need a multiple of their head count).
        qkv_dim: total width of the queries, keys and values (H x head dim), default ``dim``; must be
            divisible by ``heads`` (LRA's image models use ``qkv_dim = dim / 2``).
        pattern: the attention pattern; ``None`` = full attention.
        qkv_bias: bias on the q/k/v projection.
        dropout: attention-probability dropout, active in training mode only.
        backend: passed to ``longattn.attention``.
    """

    def __init__(self, dim: int, heads: int, *, pattern: Pattern | None = None, qkv_dim: int | None = None,
                 qkv_bias: bool = True, proj_bias: bool = True, dropout: float = 0.0, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("qkv_dim", qkv_dim)):
            if value is None and name == "qkv_dim":
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        inner = dim if qkv_dim is None else qkv_dim
        if inner % heads:
            raise ValueError(f"{'dim' if qkv_dim is None else 'qkv_dim'} ({inner}) must be divisible by "
                             f"heads ({heads})")
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a longattn Pattern or None, got {type(pattern).__name__}")
        self.dim, self.heads, self.head_dim = dim, heads, inner // heads
        self.pattern, self.dropout, self.backend = pattern, dropout, backend
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, **factory)
        self.proj = nn.Linear(inner, dim, bias=proj_bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.qkv, self.proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                documents: Pattern | None = None) -> Tensor:
        """``x: (B, N, C)``; ``documents``: a packed batch's ``documents(...)`` pattern, intersected with this
        module's pattern (nothing crosses a document boundary)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, C={self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        pattern = self.pattern
        if documents is not None:
            pattern = documents if pattern is None else documents & pattern
        out = attention(q, k, v, pattern=pattern, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                        dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, C)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, pattern={self.pattern}, backend={self.backend!r}"
