"""Native Sparse Attention (Yuan et al., DeepSeek, 2025): three branches mixed by learned gates.

For query i (token position p; every branch has its own keys and values, as the paper, so that no branch
learns a shortcut through another's):

- **compressed**: blocks of ``cmp_length`` keys every ``cmp_stride`` tokens, each summarised by a learned MLP
  over the block's keys plus an intra-block position embedding (one MLP for keys, one for values, shared by the
  heads); the query attends every summary of real tokens (causal: whose block has ended at p);
- **selected**: the keys of ``select_top`` blocks of ``select_block`` tokens. A block's importance is the
  compressed branch's attention probability spread over its tokens: each summary's probability is divided
  evenly over the ``cmp_length / cmp_stride`` stride cells it covers and a block sums its cells (the paper's
  eq. 9 distributes the same mass with its own offsets). Importance is summed over the heads of a GQA group,
  which share one choice (the paper's hardware rule). The first ``init_blocks`` blocks and the
  ``local_blocks`` blocks ending with the query's own are always chosen (even when they hold only padding);
  the rest go to the most important eligible blocks (causal: not starting after p; a block with no real key
  is not eligible), ties to the lower block; inside its own block a causal query sees ``j <= p``. The choice
  is not differentiated;
- **window**: causal, the last ``window`` keys (``j`` in ``[p - window + 1, p]``); bidirectional, ``window / 2``
  keys on each side;

``o_i = g_cmp * o_cmp + g_sel * o_sel + g_win * o_win`` with sigmoid gates per head from the token's input.

Every branch is one ``longattn.attention`` call: the compressed one with ``compressed_causal`` (linear memory
on the blocked backend), the selected one with the chosen blocks (the pair kernel of ``topk_blocks``), the
window with ``sliding_window``. The choice reads the compressed probabilities a chunk of queries at a time.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import attention
from ..patterns import Pattern, causal as causal_pattern, compressed_causal, sliding_window
from ..patterns.topk_blocks import SelectedBlocks, increasing, top_indices

BRANCHES = ("compressed", "selected", "window")
_SELECT_CHUNK = 1 << 22  # compressed scores evaluated at once while choosing


@dataclass(frozen=True)
class NSAShape:
    """The sizes of NSA's three branches (the paper's: 32, 16, 64, 16, 512, 1, 2)."""

    cmp_length: int = 32
    cmp_stride: int = 16
    select_block: int = 64
    select_top: int = 16
    window: int = 512
    init_blocks: int = 1
    local_blocks: int = 2

    def __post_init__(self):
        for name in ("cmp_length", "cmp_stride", "select_block", "select_top", "window", "local_blocks"):
            _positive(getattr(self, name), name)
        _positive(self.init_blocks, "init_blocks", minimum=0)
        if self.cmp_length % self.cmp_stride or self.select_block % self.cmp_stride:
            raise ValueError(f"cmp_stride ({self.cmp_stride}) must divide cmp_length ({self.cmp_length}) and "
                             f"select_block ({self.select_block}): importance is counted in stride cells")
        if self.init_blocks + self.local_blocks > self.select_top:
            raise ValueError(f"init_blocks + local_blocks ({self.init_blocks} + {self.local_blocks}) must be at most "
                             f"select_top ({self.select_top})")

    def num_summaries(self, n: int) -> int:
        """Summaries of n tokens: whole blocks only."""
        return 0 if n < self.cmp_length else (n - self.cmp_length) // self.cmp_stride + 1


def _positive(value: object, name: str, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def summarise(compress_k: "BlockCompressor", compress_v: "BlockCompressor", k: Tensor, v: Tensor, stride: int,
              key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The compressed branch's summaries (B, H, S, D) of keys and values (B, H, N, D); padded tokens are zeroed
    first (a summary over padding is masked anyway, ``summary_real``: this keeps NaN in padding out of it)."""
    if key_padding_mask is not None:
        k, v = (t * key_padding_mask[:, None, :, None].to(t.dtype) for t in (k, v))
    return compress_k(k, stride), compress_v(v, stride)


class BlockCompressor(nn.Module):
    """phi: a block of ``length`` vectors of width ``dim`` -> one vector (an MLP over the block's vectors plus a
    learned intra-block position embedding)."""

    def __init__(self, length: int, dim: int, hidden: int | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.length, self.dim = length, dim
        self.position = nn.Parameter(torch.zeros(length, dim, **factory))
        self.mlp = nn.Sequential(nn.Linear(length * dim, hidden or 2 * dim, **factory), nn.GELU(),
                                 nn.Linear(hidden or 2 * dim, dim, **factory))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: Tensor, stride: int) -> Tensor:
        """x (B, H, N, D) -> (B, H, S, D) summaries of the blocks ``[t * stride, t * stride + length)``."""
        b, h, n, d = x.shape
        if n < self.length:
            return x.new_zeros(b, h, 0, d)
        blocks = x.unfold(2, self.length, stride).transpose(-1, -2)  # (B, H, S, length, D)
        return self.mlp((blocks + self.position).flatten(-2))


def summary_real(real: Tensor, shape: NSAShape) -> Tensor:
    """(B, N) real tokens -> (B, S): the summary's block is all real tokens. A summary over padding would be
    another summary than the same input alone has (its block would end inside the padding): it is left out."""
    if real.shape[1] < shape.cmp_length:
        return real[:, :0]
    return real.unfold(1, shape.cmp_length, shape.cmp_stride).all(-1)


@torch.no_grad()
def select_blocks(q: Tensor, k_cmp: Tensor, shape: NSAShape, *, causal: bool, kv_len: int, group: int,
                  scale: float, key_padding_mask: Tensor | None = None) -> Tensor:
    """NSA's choice (B, H / group, Nq, select_top) long, increasing, -1 = none, from queries q (B, H, Nq, D) and
    the compressed keys k_cmp (B, H / group, S, D), shared by the ``group`` query heads of a key head. Queries
    are the last Nq of ``kv_len`` tokens."""
    b, h, nq, _ = q.shape
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    real = torch.ones(b, kv_len, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    s = shape.num_summaries(kv_len)
    block, cells = shape.select_block, shape.cmp_length // shape.cmp_stride
    nsb = -(-kv_len // block)
    per_block = block // shape.cmp_stride
    has_keys = F.pad(real, (0, nsb * block - kv_len)).view(b, nsb, block).any(-1)[:, None, None, :]
    summary_ok = summary_real(real, shape)[:, None, None, :]  # (B, 1, 1, S)
    keys = k_cmp.to(dtype).repeat_interleave(group, dim=1)  # (B, H, S, D)
    starts = torch.arange(nsb, device=q.device) * block
    offset = kv_len - nq
    rows = max(1, _SELECT_CHUNK // max(1, b * h * max(s, nsb)))
    out = torch.full((b, h // group, nq, shape.select_top), -1, dtype=torch.long, device=q.device)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        p = torch.arange(r0, r1, device=q.device) + offset  # token positions (c,)
        if not s:
            importance = torch.zeros(b, h // group, r1 - r0, nsb, dtype=dtype, device=q.device)
        else:
            scores = torch.matmul(q[:, :, r0:r1].to(dtype) * scale, keys.transpose(-1, -2))  # (B, H, c, S)
            visible = summary_ok
            if causal:
                ends = torch.arange(s, device=q.device) * shape.cmp_stride + shape.cmp_length - 1
                visible = visible & (ends <= p[:, None])
            probs = torch.softmax(scores.masked_fill_(~visible, float("-inf")), -1)
            blind = ~visible.any(-1)  # (B, 1, c): rows that see no summary (NaN): importance 0
            if bool(blind.any()):
                probs[blind.expand(b, h, -1)] = 0.0
            if group > 1:  # GQA: one choice per key head
                probs = probs.view(b, h // group, group, r1 - r0, s).sum(2)
            # Summary t covers the stride cells [t, t + cells): each gets 1/cells of it; a block sums its cells.
            cell = probs.new_zeros(*probs.shape[:-1], nsb * per_block)
            for shift in range(cells):
                cell[..., shift:shift + s] += probs
            importance = cell.view(*cell.shape[:-1], nsb, per_block).sum(-1).div_(cells)
        own = p.div(block, rounding_mode="floor")[:, None]  # (c, 1)
        j = torch.arange(nsb, device=q.device)
        forced = (j < shape.init_blocks) | ((j <= own) & (j > own - shape.local_blocks))  # (c, nSB)
        eligible = has_keys
        if causal:
            started = starts <= p[:, None]
            forced, eligible = forced & started, eligible & started
        eligible = eligible | forced  # the own block is chosen even when it holds only padding
        scores = importance.masked_fill(forced, float("inf")).masked_fill(~eligible, float("-inf"))
        out[:, :, r0:r1] = increasing(top_indices(scores, shape.select_top))
    return out


def native_sparse_attention(q: Tensor, branches: dict[str, tuple[Tensor, Tensor]], gates: Tensor, shape: NSAShape,
                            *, causal: bool, key_padding_mask: Tensor | None = None, scale: float | None = None,
                            dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """The three branches and their gates.

    Args:
        q: (B, H, Nq, D) queries, the last Nq of the Nk tokens.
        branches: per branch name (``BRANCHES``) its keys and values, (B, Hk, Nk, D) tokens for "selected" and
            "window", (B, Hk, S, D) summaries for "compressed"; Hk divides H (GQA: query head h reads key head
            h // (H / Hk)).
        gates: (B, H, Nq, 3) gate values for the branches in ``BRANCHES`` order.
        key_padding_mask: (B, Nk) bool, True = real token.

    Returns: (B, H, Nq, D).
    """
    b, h, nq, d = q.shape
    k_sel = branches["selected"][0]
    nk = k_sel.shape[2]
    group = h // k_sel.shape[1]
    scale = d ** -0.5 if scale is None else scale
    widen = lambda t: t.repeat_interleave(group, dim=1) if group > 1 else t  # noqa: E731
    real = None if key_padding_mask is None else key_padding_mask
    k_cmp, v_cmp = branches["compressed"]
    cmp_real = None if real is None else summary_real(real, shape)
    if k_cmp.shape[2]:
        cmp_pattern = compressed_causal(shape.cmp_length, shape.cmp_stride, nk - nq) if causal else None
        o_cmp = attention(q, widen(k_cmp), widen(v_cmp), pattern=cmp_pattern, key_padding_mask=cmp_real,
                          scale=scale, dropout_p=dropout_p, backend=backend)
    else:  # shorter than one summary block: the branch has no key
        o_cmp = q.new_zeros(b, h, nq, v_cmp.shape[-1])
    blocks = select_blocks(q, k_cmp, shape, causal=causal, kv_len=nk, group=group, scale=scale,
                           key_padding_mask=real)
    selected = SelectedBlocks(blocks.repeat_interleave(group, dim=1), shape.select_block, causal)
    o_sel = attention(q, widen(k_sel), widen(branches["selected"][1]), pattern=selected, key_padding_mask=real,
                      scale=scale, dropout_p=dropout_p, backend=backend)
    k_win, v_win = branches["window"]
    o_win = attention(q, widen(k_win), widen(v_win), pattern=window_pattern(shape.window, causal),
                      key_padding_mask=real, scale=scale, dropout_p=dropout_p, backend=backend)
    g = gates.to(o_cmp.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_sel + g[..., 2:3] * o_win


def window_pattern(window: int, causal: bool) -> Pattern:
    """The window branch: the last ``window`` keys (causal) or ``window // 2`` on each side."""
    return causal_pattern(sliding_window(window - 1, 0)) if causal else sliding_window(window // 2)


class NativeSparseAttention(nn.Module):
    """Multi-head NSA over ``x: (B, N, C)`` (module docstring).

    Args:
        dim: model width C.
        heads: query heads H.
        kv_heads: key/value heads (GQA; they share the choice of their query heads); default H.
        head_dim: D, default C / H.
        shape: the branches' sizes (``NSAShape``); keyword overrides (``select_top=8``) are applied to it.
        causal: a decoder.
        dropout: attention-probability dropout in every branch, in training mode.
        backend: passed to ``longattn.attention``.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 shape: NSAShape | None = None, causal: bool = False, dropout: float = 0.0, backend: str = "auto",
                 device=None, dtype=None, **sizes):
        super().__init__()
        _positive(dim, "dim")
        _positive(heads, "heads")
        kv_heads = heads if kv_heads is None else _positive(kv_heads, "kv_heads")
        if heads % kv_heads:
            raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        if head_dim is None and dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or give head_dim")
        head_dim = dim // heads if head_dim is None else _positive(head_dim, "head_dim")
        shape = shape or NSAShape()
        if sizes:
            unknown = set(sizes) - set(NSAShape.__dataclass_fields__)
            if unknown:
                raise TypeError(f"unknown NSA size(s): {', '.join(sorted(unknown))}")
            shape = NSAShape(**{**shape.__dict__, **sizes})
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.shape, self.causal, self.dropout, self.backend = shape, causal, dropout, backend
        factory = {"device": device, "dtype": dtype}
        self.q = nn.Linear(dim, heads * head_dim, bias=False, **factory)
        self.kv = nn.Linear(dim, len(BRANCHES) * 2 * kv_heads * head_dim, bias=False, **factory)
        self.compress_k = BlockCompressor(shape.cmp_length, head_dim, **factory)
        self.compress_v = BlockCompressor(shape.cmp_length, head_dim, **factory)
        self.gate = nn.Linear(dim, len(BRANCHES) * heads, **factory)
        self.proj = nn.Linear(heads * head_dim, dim, **factory)

    def branches(self, x: Tensor, key_padding_mask: Tensor | None = None
                 ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]], Tensor]:
        """Queries (B, H, N, D), each branch's keys and values (summaries for "compressed") and the gates
        (B, H, N, 3), from x (B, N, C)."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).view(b, n, len(BRANCHES), 2, self.kv_heads, self.head_dim).permute(2, 3, 0, 4, 1, 5)
        (k_cmp, v_cmp), (k_sel, v_sel), (k_win, v_win) = kv.unbind(0)
        summaries = summarise(self.compress_k, self.compress_v, k_cmp, v_cmp, self.shape.cmp_stride, key_padding_mask)
        branches = {"compressed": summaries, "selected": (k_sel, v_sel), "window": (k_win, v_win)}
        gates = torch.sigmoid(self.gate(x)).view(b, n, self.heads, len(BRANCHES)).transpose(1, 2)
        return q, branches, gates

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, C={self.dim}), got {tuple(x.shape)}")
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                             or key_padding_mask.shape != x.shape[:2]):
            raise ValueError(f"key_padding_mask must be a bool tensor of shape (B, N) = {tuple(x.shape[:2])}")
        q, branches, gates = self.branches(x, key_padding_mask)
        out = native_sparse_attention(q, branches, gates, self.shape, causal=self.causal,
                                      key_padding_mask=key_padding_mask,
                                      dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        b, n, _ = x.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, causal={self.causal}, "
                f"{self.shape}")
