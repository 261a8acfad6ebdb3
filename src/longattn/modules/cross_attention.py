"""Multi-head cross-attention on ``longattn.attention``: queries from one sequence, keys and values from another
(FIT's latents reading their group's tokens and the tokens reading their latents)."""

from __future__ import annotations

from torch import Tensor, nn

from ..functional import attention
from ..patterns import Pattern


class CrossAttention(nn.Module):
    """``x: (B, Nq, C)`` attends ``context: (B, Nk, C)``; returns ``(B, Nq, C)`` (no residual, no norm).

    Args:
        dim: width C of ``x``, ``context`` and the output.
        heads: number of heads H; ``dim`` must be divisible by it.
        dropout: on the attention probabilities, in training.
        backend: passed to ``longattn.attention``.
    """

    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.heads, self.head_dim, self.dropout, self.backend = dim, heads, dim // heads, dropout, backend
        self.q = nn.Linear(dim, dim, **factory)
        self.kv = nn.Linear(dim, 2 * dim, **factory)
        self.proj = nn.Linear(dim, dim, **factory)

    def forward(self, x: Tensor, context: Tensor, *, key_padding_mask: Tensor | None = None,
                pattern: Pattern | None = None) -> Tensor:
        """``key_padding_mask: (B, Nk)`` True for real context rows; a row with none outputs zeros."""
        for name, t in (("x", x), ("context", context)):
            if t.dim() != 3 or t.shape[-1] != self.dim:
                raise ValueError(f"{name} must have shape (B, N, C={self.dim}), got {tuple(t.shape)}")
        b, nq, _ = x.shape
        nk = context.shape[1]
        q = self.q(x).view(b, nq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, nk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, pattern=pattern, key_padding_mask=key_padding_mask,
                        dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, nq, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, backend={self.backend!r}"
