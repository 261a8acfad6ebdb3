"""ETC (Ainslie et al. 2020, "ETC: Encoding Long and Structured Inputs in Transformers").

Two inputs: a long input ``x_long (B, N, C)`` and a small global input ``x_global (B, G, C)``, with one
global token per segment (sentence, paragraph) built by ``etc_structure``. Attention has four pieces:

==========  =============================  ==========================================
piece       query -> key                   allowed when
==========  =============================  ==========================================
g2g         global g -> global g'          always (padding aside)
g2l         global g -> long j             always, or only ``seg(j) == g`` (hard g2l)
l2g         long i   -> global g           always, or only ``seg(i) == g`` (hard l2g)
l2l         long i   -> long j             ``|i - j| <= r`` (the local radius)
==========  =============================  ==========================================

Each query runs one softmax over all of its keys (l2g and l2l share a softmax, as do g2g and g2l).
Relative positions follow ETC (Shaw et al.): every (query, key) pair has a label, and the score is
``scale * (q . k + q . E[label]) + bias[label]`` with a learned key embedding ``E (V, H, D)`` and bias
``(V, H)`` per label. Labels (``V = 2k + 3``): ``clip(j - i, -k, k) + k`` for l2l and for g2g (global
positions are the segment indices), ``2k + 2`` for an l2g/g2l pair of a token and its own segment's global
token, ``2k + 1`` for any other l2g/g2l pair. Global and long queries have separate tables, as in ETC.

Memory is linear in N: long queries run blocked (blocks of ``w = max(r, 1)`` queries score the three key
blocks around them plus the G globals, O(N (3w + G))); global queries score all G + N keys, O(G (G + N)).
Without relative labels or hard masks the computation is exactly ``longattn.attention`` over the
concatenation ``[globals; longs]`` with ``sliding_window(r) | global_tokens(range(G))``, and that path is
used (any longattn backend). ``attention()`` cannot add a per-pair label term without a dense ``(N, N)``
float mask, which is why the labelled path has its own banded kernel here.

Notation: B batch, H heads, D head dim, C model width, N long tokens, G global tokens, r local radius,
k max relative distance, w block length, nb number of blocks, V relative vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import attention
from ..patterns import global_tokens, sliding_window
from . import hf_checkpoint as ckpt
from ._bert_blocks import Padding

MODEL_TYPE = "longattn_etc"  # config.json's model_type of saved ETC models


# ---- structure: global tokens from segment ids -----------------------------------------------------

@dataclass
class EtcStructure:
    """How long tokens relate to global tokens (one global token per segment)."""

    long_to_global: Tensor  # (B, N) int64: the global token (= segment id) of each long token, -1 = padding
    long_mask: Tensor  # (B, N) bool, True = real long token
    global_mask: Tensor  # (B, G) bool, True = real global token (its segment has at least one token)

    @property
    def num_global(self) -> int:
        return self.global_mask.shape[1]


def etc_structure(segment_ids: Tensor, *, max_global: int | None = None) -> EtcStructure:
    """Global structure from ``segment_ids (B, N)`` int: the segment (sentence, paragraph) of each token.

    Segment ids are ``0 .. S - 1`` within each example, one global token per id (global token ``g`` stands
    for segment ``g``); a negative id marks padding. ``G`` is the largest number of segments in the batch
    (at least 1); examples with fewer segments get padding global tokens (``global_mask`` False), as do ids
    that no token uses. Raises ValueError when an example has more than ``max_global`` segments.
    """
    if not isinstance(segment_ids, Tensor) or segment_ids.is_floating_point() or segment_ids.is_complex() \
            or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor of shape (B, N), got {_describe(segment_ids)}")
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must have shape (B, N), got {tuple(segment_ids.shape)}")
    ids = segment_ids.long()
    long_mask = ids >= 0
    num = int(ids.max().item()) + 1 if ids.numel() else 0
    if max_global is not None and num > max_global:
        raise ValueError(f"segment_ids has {num} segments (ids 0..{num - 1}), more than max_global={max_global}")
    g = max(num, 1)
    b = ids.shape[0]
    long_to_global = torch.where(long_mask, ids, -1)
    counts = torch.zeros(b, g + 1, dtype=torch.long, device=ids.device)  # the last bucket collects padding
    counts.scatter_add_(1, torch.where(long_mask, ids, g), torch.ones_like(ids))
    return EtcStructure(long_to_global, long_mask, counts[:, :g] > 0)


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


# ---- relative labels -------------------------------------------------------------------------------

def relative_vocab_size(max_distance: int) -> int:
    """Labels: ``2k + 1`` clipped offsets, then "other segment" and "own segment" for the cross pieces."""
    return 2 * max_distance + 3


def _offset_labels(delta: Tensor, k: int) -> Tensor:
    return delta.clamp(-k, k) + k


def _cross_labels(own: Tensor, k: int) -> Tensor:
    return torch.where(own, 2 * k + 2, 2 * k + 1)


def _relative_scores(rq: Tensor, bias: Tensor, labels: Tensor) -> Tensor:
    """Read ``rq (B, H, ..., M, V)`` (scaled ``q . E[v]`` for every label v) at ``labels (B', 1, ..., M, K)``
    and add the label's per-head bias: ``(B, H, ..., M, K)``."""
    idx = labels.expand(*rq.shape[:-1], labels.shape[-1])
    return rq.gather(-1, idx) + bias[labels.squeeze(1)].movedim(-1, 1)


# ---- functional core -------------------------------------------------------------------------------

def _masked_softmax(scores: Tensor, keep: Tensor, dropout_p: float) -> Tensor:
    # The final product zeroes rows that keep nothing (a uniform softmax over the fill value otherwise).
    p = torch.softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=-1) * keep
    return F.dropout(p, dropout_p) if dropout_p > 0 else p


def _long_side(q: Tensor, k: Tensor, v: Tensor, k_g: Tensor, v_g: Tensor, st: EtcStructure, radius: int,
               relative: tuple[Tensor, Tensor] | None, hard_l2g: bool, scale: float, dropout_p: float) -> Tensor:
    """Long queries: l2g + l2l in one softmax, blocked so that memory is O(N (3w + G))."""
    b, h, n, d = q.shape
    g = k_g.shape[2]
    w = max(radius, 1)  # a block of w queries needs keys from its own block and the two beside it
    nb = -(-n // w)
    pad = nb * w - n
    qb = F.pad(q, (0, 0, 0, pad)).view(b, h, nb, w, d)  # (B, H, nb, w, D)

    def windows(t: Tensor) -> Tensor:  # (B, H, N, E) -> (B, H, nb, 3w, E), keys (blk - 1) w ..< (blk + 2) w
        return F.pad(t, (0, 0, w, pad + w)).unfold(2, 3 * w, w).transpose(-1, -2)

    key_ok = F.pad(st.long_mask, (w, pad + w)).unfold(1, 3 * w, w)  # (B, nb, 3w)
    pos = torch.arange(3 * w, device=q.device)
    delta = pos[None, :] - w - pos[:w, None]  # (w, 3w): key position minus query position
    local_ok = (delta.abs() <= radius) & key_ok[:, None, :, None, :]  # (B, 1, nb, w, 3w)
    seg = F.pad(st.long_to_global, (0, pad), value=-1).view(b, 1, nb, w, 1)
    own = seg == torch.arange(g, device=q.device)  # (B, 1, nb, w, G)
    global_ok = st.global_mask[:, None, None, None, :] & (own if hard_l2g else True)  # (B, 1, nb|1, w|1, G)

    s_local = qb @ windows(k).transpose(-1, -2) * scale  # (B, H, nb, w, 3w)
    s_global = qb @ k_g.transpose(-1, -2)[:, :, None] * scale  # (B, H, nb, w, G)
    if relative is not None:
        emb, bias = relative
        kd = (emb.shape[0] - 3) // 2
        rq = torch.einsum("bhnwd,vhd->bhnwv", qb, emb) * scale  # (B, H, nb, w, V)
        s_local = s_local + _relative_scores(rq, bias, _offset_labels(delta, kd).view(1, 1, 1, w, 3 * w))
        s_global = s_global + _relative_scores(rq, bias, _cross_labels(own, kd))
    scores = torch.cat([s_global, s_local], dim=-1)  # (B, H, nb, w, G + 3w)
    keep = torch.cat([global_ok.expand(b, 1, nb, w, g), local_ok], dim=-1)  # (B, 1, nb, w, G + 3w)
    p = _masked_softmax(scores, keep, dropout_p)
    out = p[..., :g] @ v_g[:, :, None] + p[..., g:] @ windows(v)  # (B, H, nb, w, Dv)
    return out.reshape(b, h, nb * w, -1)[:, :, :n]  # (B, H, N, Dv)


def _global_side(q_g: Tensor, k_g: Tensor, v_g: Tensor, k: Tensor, v: Tensor, st: EtcStructure,
                 relative: tuple[Tensor, Tensor] | None, hard_g2l: bool, scale: float, dropout_p: float) -> Tensor:
    """Global queries: g2g + g2l in one softmax over all G + N keys, O(G (G + N)) memory."""
    b, _, g, _ = q_g.shape
    scores = q_g @ torch.cat([k_g, k], dim=2).transpose(-1, -2) * scale  # (B, H, G, G + N)
    gi = torch.arange(g, device=q_g.device)
    own = gi[None, :, None] == st.long_to_global[:, None, :]  # (B, G, N)
    keep = torch.cat([st.global_mask, st.long_mask], dim=-1)[:, None, None, :]  # (B, 1, 1, G + N)
    if hard_g2l:
        keep = keep & torch.cat([own.new_ones(b, g, g), own], dim=-1)[:, None]  # (B, 1, G, G + N)
    if relative is not None:
        emb, bias = relative
        kd = (emb.shape[0] - 3) // 2
        g2g = _offset_labels(gi[None, :] - gi[:, None], kd).expand(b, g, g)
        labels = torch.cat([g2g, _cross_labels(own, kd)], dim=-1)[:, None]  # (B, 1, G, G + N)
        rq = torch.einsum("bhgd,vhd->bhgv", q_g, emb) * scale  # (B, H, G, V)
        scores = scores + _relative_scores(rq, bias, labels)
    p = _masked_softmax(scores, keep, dropout_p)
    return p @ torch.cat([v_g, v], dim=2)  # (B, H, G, Dv)


def global_local_attention(q_long: Tensor, k_long: Tensor, v_long: Tensor, q_global: Tensor, k_global: Tensor,
                           v_global: Tensor, *, local_radius: int, structure: EtcStructure | None = None,
                           long_relative: tuple[Tensor, Tensor] | None = None,
                           global_relative: tuple[Tensor, Tensor] | None = None, hard_g2l: bool = False,
                           hard_l2g: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                           backend: str = "auto") -> tuple[Tensor, Tensor]:
    """ETC's global-local attention (the table in the module docstring).

    Args:
        q_long, k_long, v_long: ``(B, H, N, D)`` (values ``(B, H, N, Dv)``) for the long input.
        q_global, k_global, v_global: ``(B, H, G, D)`` (values ``(B, H, G, Dv)``) for the global input.
        local_radius: r; long token i attends long tokens ``|i - j| <= r``.
        structure: masks (True = real token) and the long-to-global relation (``etc_structure``); None =
            no padding and no segments (then neither relative cross labels "own" nor hard masks apply).
        long_relative, global_relative: ``(E (V, H, D), bias (V, H))`` label tables for long and for global
            queries, ``V = 2k + 3`` (``relative_vocab_size(k)``); None = no relative term.
        hard_g2l / hard_l2g: restrict g2l / l2g to a token's own segment (need ``structure``).
        scale: score scale, default ``1 / sqrt(D)``.
        dropout_p: dropout on the attention probabilities.
        backend: ``longattn.attention`` backend for the unlabelled, unrestricted case (see module docstring).

    Returns:
        ``(out_long (B, H, N, Dv), out_global (B, H, G, Dv))``. A query with no allowed key gives zeros.
    """
    b, h, n, d = _check_qkv("long", q_long, k_long, v_long, None)
    g = _check_qkv("global", q_global, k_global, v_global, (b, h, d, v_long.shape[-1]))[2]
    if structure is None:
        if hard_g2l or hard_l2g:
            raise ValueError("hard_g2l/hard_l2g need a structure (which long tokens belong to which global)")
        dev = q_long.device
        structure = EtcStructure(torch.full((b, n), -1, device=dev), torch.ones(b, n, dtype=torch.bool, device=dev),
                                 torch.ones(b, g, dtype=torch.bool, device=dev))
    _check_structure(structure, b, n, g)
    if not isinstance(local_radius, int) or isinstance(local_radius, bool) or local_radius < 0:
        raise ValueError(f"local_radius must be an int >= 0, got {local_radius!r}")
    for name, rel in (("long_relative", long_relative), ("global_relative", global_relative)):
        _check_relative(name, rel, h, d)
    scale = d ** -0.5 if scale is None else scale
    if long_relative is None and global_relative is None and not (hard_g2l or hard_l2g):
        # [globals; longs]: global rows see every key, long rows see the globals and their window.
        pattern = sliding_window(local_radius) | global_tokens(list(range(g)))
        padding = torch.cat([structure.global_mask, structure.long_mask], dim=1)  # (B, G + N)
        out = attention(*(torch.cat(pair, dim=2) for pair in ((q_global, q_long), (k_global, k_long),
                                                               (v_global, v_long))),
                        pattern=pattern, key_padding_mask=Padding.of(padding).keys, scale=scale,
                        dropout_p=dropout_p, backend=backend)  # (B, H, G + N, Dv)
        return out[:, :, g:], out[:, :, :g]
    out_long = _long_side(q_long, k_long, v_long, k_global, v_global, structure, local_radius, long_relative,
                          hard_l2g, scale, dropout_p)
    out_global = _global_side(q_global, k_global, v_global, k_long, v_long, structure, global_relative, hard_g2l,
                              scale, dropout_p)
    return out_long, out_global


def _check_qkv(side: str, q: Tensor, k: Tensor, v: Tensor, like: tuple | None) -> tuple[int, int, int, int]:
    for name, t in ((f"q_{side}", q), (f"k_{side}", k), (f"v_{side}", v)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of shape (B, H, N, D), got {_describe(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(t.shape)}")
    b, h, n, d = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"k_{side} must have shape {tuple(q.shape)} and v_{side} (B, H, N, Dv) = ({b}, {h}, {n}, "
                         f"Dv) to match q_{side}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if like is not None and (b, h, d, v.shape[-1]) != like:
        raise ValueError(f"q_{side}/v_{side} must have shape (B, H, G, D) = ({like[0]}, {like[1]}, G, {like[2]}) "
                         f"and Dv = {like[3]} to match the long input, got {tuple(q.shape)} and {tuple(v.shape)}")
    return b, h, n, d


def _check_structure(st: EtcStructure, b: int, n: int, g: int) -> None:
    for name, t, shape in (("long_to_global", st.long_to_global, (b, n)), ("long_mask", st.long_mask, (b, n)),
                           ("global_mask", st.global_mask, (b, g))):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"structure.{name} must have shape {shape} (B, N long or G global), got {_describe(t)}")
        if (t.dtype == torch.bool) != name.endswith("mask") or t.is_floating_point():
            raise TypeError(f"structure.{name} must be a {'bool' if name.endswith('mask') else 'int64'} tensor, "
                            f"got {t.dtype}")


def _check_relative(name: str, rel: tuple[Tensor, Tensor] | None, h: int, d: int) -> None:
    if rel is None:
        return
    if not isinstance(rel, tuple) or len(rel) != 2:
        raise TypeError(f"{name} must be a tuple (E (V, H, D), bias (V, H)), got {type(rel).__name__}")
    emb, bias = rel
    v = emb.shape[0]
    if emb.shape != (v, h, d) or bias.shape != (v, h) or v < 3 or v % 2 == 0:
        raise ValueError(f"{name} must be (E (V, H={h}, D={d}), bias (V, H={h})) with V = 2k + 3, got "
                         f"{tuple(emb.shape)} and {tuple(bias.shape)}")


# ---- modules ---------------------------------------------------------------------------------------

class GlobalLocalAttention(nn.Module):
    """Multi-head global-local attention over ``x_long (B, N, C)`` and ``x_global (B, G, C)``.

    As ETC's defaults: one q/k/v projection shared by both streams (``share_qkv_projections``), separate
    output projections and separate relative tables for long and global queries. ``max_relative_distance``
    k (None = no relative labels) gives ``V = 2k + 3`` labels.
    """

    def __init__(self, dim: int, num_heads: int, *, local_radius: int, max_relative_distance: int | None = None,
                 hard_g2l: bool = False, hard_l2g: bool = False, dropout: float = 0.0, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.local_radius, self.max_relative_distance = local_radius, max_relative_distance
        self.hard_g2l, self.hard_l2g, self.dropout, self.backend = hard_g2l, hard_l2g, dropout, backend
        self.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.long_proj = nn.Linear(dim, dim, **factory)
        self.global_proj = nn.Linear(dim, dim, **factory)
        if max_relative_distance is None:
            self.long_rel_emb = self.long_rel_bias = self.global_rel_emb = self.global_rel_bias = None
        else:
            v = relative_vocab_size(max_relative_distance)
            self.long_rel_emb = nn.Parameter(torch.empty(v, num_heads, self.head_dim, **factory))
            self.long_rel_bias = nn.Parameter(torch.empty(v, num_heads, **factory))
            self.global_rel_emb = nn.Parameter(torch.empty(v, num_heads, self.head_dim, **factory))
            self.global_rel_bias = nn.Parameter(torch.empty(v, num_heads, **factory))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """BERT's initialisation (ETC's ``initializer_range``); relative biases start at zero as in ETC."""
        for lin in (self.qkv, self.long_proj, self.global_proj):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        if self.max_relative_distance is not None:
            nn.init.normal_(self.long_rel_emb, std=std)
            nn.init.normal_(self.global_rel_emb, std=std)
            nn.init.zeros_(self.long_rel_bias)
            nn.init.zeros_(self.global_rel_bias)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)

    def forward(self, x_long: Tensor, x_global: Tensor, structure: EtcStructure | None = None
                ) -> tuple[Tensor, Tensor]:
        for name, x in (("x_long", x_long), ("x_global", x_global)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
                raise ValueError(f"{name} must have shape (B, N, C={self.dim}), got {_describe(x)}")
        if x_global.shape[0] != x_long.shape[0]:
            raise ValueError(f"x_global must have shape (B={x_long.shape[0]}, G, C) to match x_long, "
                             f"got {tuple(x_global.shape)}")
        relative = self.max_relative_distance is not None
        out_l, out_g = global_local_attention(
            *self._heads(x_long), *self._heads(x_global), local_radius=self.local_radius, structure=structure,
            long_relative=(self.long_rel_emb, self.long_rel_bias) if relative else None,
            global_relative=(self.global_rel_emb, self.global_rel_bias) if relative else None,
            hard_g2l=self.hard_g2l, hard_l2g=self.hard_l2g, dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend)
        b, n, g = x_long.shape[0], x_long.shape[1], x_global.shape[1]
        return (self.long_proj(out_l.transpose(1, 2).reshape(b, n, self.dim)),  # (B, N, C)
                self.global_proj(out_g.transpose(1, 2).reshape(b, g, self.dim)))  # (B, G, C)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, local_radius={self.local_radius}, "
                f"max_relative_distance={self.max_relative_distance}, hard_g2l={self.hard_g2l}, "
                f"hard_l2g={self.hard_l2g}")


# ---- config and model ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EtcConfig:
    vocab_size: int  # long token ids are in [0, vocab_size)
    hidden: int = 768  # model width C
    layers: int = 12  # Transformer layers, each updating both streams
    heads: int = 12
    intermediate: int = 3072  # hidden width of the feed-forward block
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
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_global", "type_vocab_size",
                     "global_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_radius < 0 or (self.max_relative_distance is not None and self.max_relative_distance < 0):
            raise ValueError("local_radius and max_relative_distance must be >= 0")


class EtcLayer(nn.Module):
    """Post-LayerNorm (BERT/ETC) layer: ``ln(x + attn(x))`` per stream, then ``ln(x + ffn(x))``.

    As ETC's defaults (``share_feed_forward_params``, not ``share_att_output_projection``): the attention's
    output projection and LayerNorm are separate for long and global, the feed-forward block is shared.
    """

    def __init__(self, cfg: EtcConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.attn = GlobalLocalAttention(cfg.hidden, cfg.heads, local_radius=cfg.local_radius,
                                         max_relative_distance=cfg.max_relative_distance, hard_g2l=cfg.hard_g2l,
                                         hard_l2g=cfg.hard_l2g, dropout=cfg.attn_dropout, backend=backend, **factory)
        self.long_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **factory)
        self.global_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **factory)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, cfg.intermediate, **factory), nn.GELU(),
                                 nn.Linear(cfg.intermediate, cfg.hidden, **factory))
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **factory)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, g: Tensor, structure: EtcStructure) -> tuple[Tensor, Tensor]:
        a_long, a_global = self.attn(x, g, structure)
        x = self.long_norm(x + self.drop(a_long))
        g = self.global_norm(g + self.drop(a_global))
        both = torch.cat([x, g], dim=1)  # (B, N + G, C): one shared position-wise block
        both = self.ffn_norm(both + self.drop(self.ffn(both)))
        return both[:, : x.shape[1]], both[:, x.shape[1]:]


@dataclass
class EtcOutput:
    long_hidden_state: Tensor  # (B, N, C)
    global_hidden_state: Tensor  # (B, G, C)
    structure: EtcStructure  # masks and the long-to-global relation the layers used


class EtcModel(nn.Module):
    """ETC encoder over a long input with one global token per segment.

    ``forward(input_ids (B, N), segment_ids (B, N), *, token_type_ids=None, global_token_ids=None)``:
    ``segment_ids`` numbers each token's segment ``0 .. S - 1`` (negative = padding; see ``etc_structure``),
    ``global_token_ids (B, G)`` the kind of each global token (default 0). Long tokens are embedded as token +
    token type (ETC has no absolute positions: order comes from the relative labels), global tokens as their
    kind (+ the mean of their segment's long embeddings when ``cfg.global_segment_mean``). Returns ``EtcOutput``.
    """

    def __init__(self, cfg: EtcConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        factory = {"device": device, "dtype": dtype}
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.hidden, **factory)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.hidden, **factory)
        self.global_embed = nn.Embedding(cfg.global_vocab_size, cfg.hidden, **factory)
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **factory)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EtcLayer(cfg, backend=backend, **factory) for _ in range(cfg.layers))
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

    # ---- checkpoints: config.json + model.safetensors, as the Hugging Face-compatible models ----
    def save_pretrained(self, path: str | Path) -> Path:
        config = {"model_type": MODEL_TYPE, "architectures": ["EtcModel"], **dataclasses.asdict(self.cfg)}
        return ckpt.save_directory(path, config, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, *, backend: str = "auto", device=None, dtype=None) -> "EtcModel":
        config = ckpt.read_config(path)
        ckpt.check_model_type(config, (MODEL_TYPE,), "longattn ETC", path)
        fields = {f.name for f in dataclasses.fields(EtcConfig)}
        model = cls(EtcConfig(**{k: v for k, v in config.items() if k in fields}), backend=backend, device=device,
                    dtype=dtype)
        ckpt.load_into(model, ckpt.read_weights(path), path=path)
        return model.eval()
