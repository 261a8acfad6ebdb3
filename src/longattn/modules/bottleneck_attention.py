"""``BottleneckAttention2d``: BoTNet's multi-head self-attention over a 2-D feature map (Srinivas et al. 2021).

Notation: b batch, h heads, d head dim, (y, x) a query's row and column, (y', x') a key's. The map of
``H x W`` positions is read row-major as ``N = H W`` tokens. The logit of query i and key j is

    l_ij = s q_i . (k_j + R_h[y' - y] + R_w[x' - x]),        s = d ** -0.5

the content-content term plus the content-position term of the paper's Figure 4, with *split* relative
encodings: one learned table for height offsets and one for width offsets (Bello et al. 2019), each
``(2 reach + 1, d)`` and shared by the heads. Softmax over all keys (the paper) or over a 2-D local window
(``radius``: ``patterns.window_2d``), then the values; no output projection (the block's next 1x1
convolution is one). With ``stride=2`` a 2x2 average pool follows the attention, as the paper's first c5 block.

Any map size: the tables are sized from ``feat_size`` (the map the model is built for). A map whose offsets
stay within the table reads the table's middle part: the same offsets, exact. Larger offsets need more
entries: ``resize="interpolate"`` (default) stretches the table linearly to the new size, as vision models
resize position tables when fine-tuned at a higher resolution (offset 2 of a twice as wide map reads the
old offset 1); ``resize="clamp"`` keeps the offsets exact and gives every offset beyond the table the
table's last entry (Transformer-XL's ``clamp_len``). With a local window, offsets never exceed ``radius``,
so the table is ``2 radius + 1`` long and never resized.

Two exact ways to compute the position term (``attention`` does the softmax either way):

- global: the relative logits form an additive ``(B, h, N, N)`` bias, broadcast from a height part
  ``(B, h, N, H)`` and a width part ``(B, h, N, W)``, as the paper does; SDPA applies it.
- local: the bias would be quadratic, so the position term becomes extra features instead: query i gets
  ``[s q_i, s q_i . R_h[y' - y] for each row slot, s q_i . R_w[x' - x] for each column slot]`` and key j
  ``[k_j, onehot(slot of y_j), onehot(slot of x_j)]``, whose dot product is exactly l_ij on every pair
  the window allows. A window spans ``2 radius + 1`` rows, all different modulo ``2 radius + 1``, so that
  many slots suffice (``slot_offsets``): attention of width ``d + 2 (2 radius + 1)`` (at most ``d + H + W``)
  on the window pattern runs in linear memory on the blocked backend, the tokens read row by row or in
  8 x 8 tiles, whichever needs fewer key blocks (``local_pattern``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..caches import named_cache
from ..functional import attention
from ..patterns import Geometry, window_2d
from ..patterns.window_2d import Window2d

RESIZE = ("interpolate", "clamp")
LOCAL_TILE = 8  # 8 x 8 tiles: one 64-token block of the blocked backend each

# Per map size (and device): built once, as building costs more than a forward on small maps.
_LOCAL_PATTERNS = named_cache("bottleneck_local_patterns", 64)
_LOCAL_TOKENS = named_cache("bottleneck_local_tokens", 64)


def as_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``(height, width)`` from one positive int or a pair; ``ValueError`` naming ``name`` otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {value!r}")
    return pair  # type: ignore[return-value]


def relative_table(table: Tensor, reach: int, *, resize: str = "interpolate") -> Tensor:
    """The ``(2 reach + 1, d)`` rows of a relative table for offsets ``-reach..reach``.

    ``table`` holds offsets ``-R..R`` (``2 R + 1`` rows, offset 0 in the middle). ``reach <= R`` reads the
    middle rows (exact); a larger ``reach`` interpolates the table linearly or clamps the offsets.
    """
    big = (table.shape[0] - 1) // 2
    if reach <= big:
        return table[big - reach: big + reach + 1]
    if resize == "clamp":
        offsets = torch.arange(-reach, reach + 1, device=table.device).clamp(-big, big)
        return table[offsets + big]
    if table.shape[0] == 1:  # a single entry (a 1-wide map) stretches to a constant
        return table.expand(2 * reach + 1, -1)
    stretched = F.interpolate(table.t()[None], size=2 * reach + 1, mode="linear", align_corners=True)
    return stretched[0].t()  # (2 reach + 1, d)


def relative_logits(q: Tensor, table: Tensor, offsets: Tensor, axis: int) -> Tensor:
    """``q . R[offsets[y, m]]`` for every query row ``y`` and slot ``m`` (``axis=0``; columns for ``axis=1``).

    q: ``(B, h, H, W, d)``; table: ``(2 reach + 1, d)`` for offsets ``-reach..reach`` (larger offsets are
    clamped: only masked pairs have them); offsets: ``(size, K)`` key-minus-query offsets. Returns
    ``(B, h, H, W, K)``.
    """
    reach = (table.shape[0] - 1) // 2
    rows = table[offsets.clamp(-reach, reach) + reach]  # (size, K, d)
    if axis == 0:
        return torch.einsum("bhyxd,ykd->bhyxk", q, rows)
    return torch.einsum("bhyxd,xkd->bhyxk", q, rows)


def slot_offsets(size: int, radius: int | None, device=None) -> tuple[Tensor, int]:
    """The key-minus-query offset of every (query coordinate, key slot) along one axis, and the slot count.

    Global (or a window covering the axis): one slot per key coordinate, offset ``m - y``. A window of
    ``2 radius + 1 < size`` coordinates: slot ``m`` holds the one key coordinate ``y'`` of the window with
    ``y' = m (mod 2 radius + 1)``, so ``2 radius + 1`` slots serve every query (offset
    ``((m - y + radius) mod (2 radius + 1)) - radius``).
    """
    pos = torch.arange(size, device=device)
    if radius is None or 2 * radius + 1 >= size:
        return pos[None, :] - pos[:, None], size
    period = 2 * radius + 1
    slots = torch.arange(period, device=device)
    return torch.remainder(slots[None, :] - pos[:, None] + radius, period) - radius, period


def local_pattern(radius: int, height: int, width: int) -> Window2d:
    """The window in the token order whose blocks need fewer key blocks: row-major (narrow maps, small radius:
    a row of 64 tokens needs ``2 radius + 1`` rows) or 8 x 8 tiles (wide maps: a tile needs 3 x 3 tiles)."""
    def build() -> Window2d:
        n = height * width
        options = [window_2d(radius, height, width), window_2d(radius, height, width, tile=LOCAL_TILE)]
        return min(options, key=lambda p: int(p.candidates(Geometry(n, n), LOCAL_TILE ** 2).sum()))

    return _LOCAL_PATTERNS.get_or_build((radius, height, width), build)


@dataclass(frozen=True, eq=False)
class _LocalTokens:
    order: Tensor  # (N,): the window pattern's token order (row-major or tile-major)
    inverse: Tensor  # (N,): back to row-major
    slots: Tensor  # (N, P_h + P_w): each key's row and column slot one-hots, in ``order``


def _local_tokens(radius: int, height: int, width: int, device: torch.device) -> _LocalTokens:
    """Per map, built once: the window's token order, its inverse and each key's slot one-hots in that order."""
    def build() -> _LocalTokens:
        order = local_pattern(radius, height, width).order(device)
        slots_h, slots_w = slot_offsets(height, radius)[1], slot_offsets(width, radius)[1]
        rows, cols = order // width, order % width
        slots = torch.cat([F.one_hot(rows % slots_h, slots_h), F.one_hot(cols % slots_w, slots_w)], -1)
        return _LocalTokens(order, torch.argsort(order), slots)

    return _LOCAL_TOKENS.get_or_build((radius, height, width, device), build)


class BottleneckAttention2d(nn.Module):
    """Multi-head self-attention on ``x: (B, C, H, W)`` with split relative position logits (BoTNet's MHSA).

    Args:
        dim: input channels C.
        dim_out: output channels (= heads x head dim), default ``dim``.
        heads: attention heads (BoTNet: 4).
        feat_size: the ``(H, W)`` map (or one int) the relative tables are sized for; other sizes work
            (see the module docstring).
        stride: 1, or 2 for a 2x2 average pool after the attention (``ceil_mode``: odd maps keep their last
            row, as a stride-2 convolution's ``ceil(H / 2)``).
        radius: None = global attention (the paper); an int = each position attends its
            ``(2 radius + 1)^2`` neighbourhood only (``patterns.window_2d``), linear memory for large maps.
        qkv_bias: bias on the 1x1 query/key/value projection (the paper has none).
        resize: how tables grow for larger maps, ``"interpolate"`` or ``"clamp"``.
        backend: passed to ``longattn.attention``.

    Returns ``(B, dim_out, ceil(H / stride), ceil(W / stride))``, channels-last strides.
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, heads: int = 4,
                 feat_size: int | tuple[int, int] = 14, stride: int = 1, radius: int | None = None,
                 qkv_bias: bool = False, resize: str = "interpolate", backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        if dim_out % heads:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by heads ({heads})")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if radius is not None and (not isinstance(radius, int) or radius < 0):
            raise ValueError(f"radius must be None (global attention) or an int >= 0, got {radius!r}")
        if resize not in RESIZE:
            raise ValueError(f"resize must be one of {RESIZE}, got {resize!r}")
        self.dim, self.dim_out, self.heads, self.head_dim = dim, dim_out, heads, dim_out // heads
        self.feat_size, self.stride, self.radius = as_pair(feat_size, "feat_size"), stride, radius
        self.resize, self.backend = resize, backend
        reach = [s - 1 if radius is None else radius for s in self.feat_size]
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Conv2d(dim, 3 * dim_out, 1, bias=qkv_bias, **factory)
        self.rel_height = nn.Parameter(torch.empty(2 * reach[0] + 1, self.head_dim, **factory))
        self.rel_width = nn.Parameter(torch.empty(2 * reach[1] + 1, self.head_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.qkv.weight, mode="fan_in", nonlinearity="linear")
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        for table in (self.rel_height, self.rel_width):
            nn.init.normal_(table, std=self.head_dim ** -0.5)  # the reference implementation's scale

    def tables(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The height and width tables this module uses on a ``height x width`` map."""
        reach_h, reach_w = height - 1, width - 1
        if self.radius is not None:
            reach_h, reach_w = min(reach_h, self.radius), min(reach_w, self.radius)
        return (relative_table(self.rel_height, reach_h, resize=self.resize),
                relative_table(self.rel_width, reach_w, resize=self.resize))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, C={self.dim}, H, W), got {tuple(x.shape)}")
        b, _, height, width = x.shape
        n, heads, d = height * width, self.heads, self.head_dim
        # Channels-last makes the head dim contiguous (a view for channels-last x): SDPA's fused CPU kernel
        # needs it and falls back to the quadratic-temporaries math kernel otherwise.
        qkv = self.qkv(x).contiguous(memory_format=torch.channels_last)
        qkv = qkv.permute(0, 2, 3, 1).reshape(b, n, 3, heads, d)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        q = q * d ** -0.5
        table_h, table_w = self.tables(height, width)
        q2d = q.view(b, heads, height, width, d)
        off_h, slots_h = slot_offsets(height, self.radius, x.device)
        off_w, slots_w = slot_offsets(width, self.radius, x.device)
        rel_h = relative_logits(q2d, table_h, off_h, axis=0).reshape(b, heads, n, slots_h)  # (B, h, N, P_h)
        rel_w = relative_logits(q2d, table_w, off_w, axis=1).reshape(b, heads, n, slots_w)  # (B, h, N, P_w)
        if self.radius is None:
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, n, n)  # (B, h, N, H W)
            out = attention(q, k, v, attn_mask=bias, scale=1.0, backend=self.backend)
        else:
            # row-major, or tile-major (a block of tokens is a square patch)
            tokens = _local_tokens(self.radius, height, width, x.device)
            order = tokens.order
            q_ext = torch.cat([q, rel_h, rel_w], -1)[:, :, order]  # (B, h, N, d + P_h + P_w)
            k_ext = torch.cat([k[:, :, order], tokens.slots.to(k.dtype).expand(b, heads, n, -1)], -1)
            out = attention(q_ext, k_ext, v[:, :, order], pattern=local_pattern(self.radius, height, width),
                            scale=1.0, backend=self.backend)
            out = out[:, :, tokens.inverse]  # back to row-major
        out = out.transpose(1, 2).reshape(b, height, width, self.dim_out).permute(0, 3, 1, 2)  # (B, C', H, W)
        if self.stride == 2:
            out = F.avg_pool2d(out, 2, 2, ceil_mode=True)
        return out

    def extra_repr(self) -> str:
        local = "global" if self.radius is None else f"radius={self.radius}"
        return (f"{self.dim}, {self.dim_out}, heads={self.heads}, feat_size={self.feat_size}, "
                f"stride={self.stride}, {local}, resize={self.resize!r}")
