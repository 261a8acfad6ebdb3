"""Run Hugging Face ``transformers`` models on longattn: ``register(name, pattern)``.

Notation: B batch, H query heads, Hkv key/value heads (GQA: H is a multiple of Hkv), Nq query length,
Nk key length (past + new tokens with a KV cache), D head dim. Masks are bool, **True = attend / real token**.

``register`` puts two functions under one name:

- in ``AttentionMaskInterface`` a *mask* function. transformers calls it once per forward (from
  ``create_causal_mask`` / ``create_bidirectional_mask``, ...) with the sizes of the call and the user's 2-D
  ``attention_mask``. Where ``sdpa_mask`` builds a ``(B, 1, Nq, Nk)`` grid, ours returns the ``(B, Nk)``
  padding mask itself, or None when nothing is padded: O(B·N) memory, never O(N²).
- in ``AttentionInterface`` an *attention* function, called by every attention module with
  ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk, D)`` and that mask. It calls ``longattn.attention`` with the
  pattern and ``key_padding_mask``, and returns ``(B, Nq, H, D)`` as transformers expects.

Positions are key slots, counted from the first slot of the batch (padding slots included), the frame of
transformers' own masks: with left padding a sliding window reaches as far back in slots, so it covers fewer
real tokens of a padded example, as in ``sdpa``; ``global_tokens([0])`` then names a padding slot.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..backends import BACKENDS
from ..functional import attention
from ..patterns import Pattern, as_pattern, causal, full
from ..patterns import sliding_window as window_pattern  # the name `sliding_window` is a kwarg below
from ..patterns.full import Full

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as err:  # transformers is the optional `hf` extra
    raise ImportError("longattn.integrations.hf needs transformers >= 4.53 (AttentionInterface and "
                      "AttentionMaskInterface): pip install 'longattn[hf]'") from err

__all__ = ["padding_mask", "register"]

# Replacing these would silently change every model that asked for them, not only longattn's.
_RESERVED = ("eager", "sdpa", "flex_attention")
_RESERVED_PREFIXES = ("flash_attention", "paged|")

# Keyword arguments some models pass that change the scores in ways longattn does not implement.
_UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Callable | None = None, attention_mask: Tensor | None = None,
                 **kwargs) -> Tensor | None:
    """Mask function for ``AttentionMaskInterface``: the padding of the keys of this call, ``(B, Nk')`` bool.

    Args (as transformers passes them to ``sdpa_mask``; the others are accepted and ignored):
        q_length, kv_length: Nq and Nk of the attention calls that will receive the mask.
        kv_offset: absolute position of key slot 0 (> 0 when a sliding-window cache dropped old keys).
        mask_function: the model's own ``mask_mod`` (causal, bidirectional, ...). Not evaluated: causality
            comes from the attention module, the pattern from ``register``.
        attention_mask: the user's ``(B, past + Nq)`` mask, already bool; None when there is none.

    Returns:
        None when no key is padding; otherwise ``attention_mask[:, kv_offset : kv_offset + kv_length]``.
        That is shorter than Nk (Nk' < Nk) only with a static cache, whose last ``Nk - Nk'`` slots are not
        filled yet; the attention function drops them, which also keeps bottom-right alignment right.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset:kv_offset + kv_length].bool()  # (B, Nk')
    # The check reads a value on the host; skip it under compilation, where a mask of ones costs nothing.
    if mask.shape[-1] == kv_length and not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


def _is_cross_attention(module: torch.nn.Module, nq: int, nk: int) -> bool:
    # Keys from another sequence (an encoder's): a pattern on one sequence's positions means nothing there.
    return nq != nk or getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__


def _make_attention(pattern: Pattern, backend: str) -> Callable:
    base = None if isinstance(pattern, Full) else pattern
    variants: dict[tuple[bool, int | None], Pattern | None] = {}

    def variant(is_causal: bool, window: int | None) -> Pattern | None:
        """The pattern of one kind of call, built once: ``base & window & causal`` where they apply."""
        if (is_causal, window) not in variants:
            p = base
            if window is not None:
                # transformers' `sliding_window=w` (Mistral, ModernBERT local layers) keeps |i - j| < w,
                # the flash-attn window (w - 1, w - 1); causality cuts the right half.
                w = window_pattern(window - 1)
                p = w if p is None else p & w
            variants[is_causal, window] = causal(p) if is_causal else p
        return variants[is_causal, window]

    def longattn_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, sliding_window: int | None = None,
                           **kwargs) -> tuple[Tensor, None]:
        """``AttentionInterface`` function: ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk, D)`` ->
        ``((B, Nq, H, D), None)``.

        ``attention_mask`` is what ``padding_mask`` returned, ``(B, Nk')`` or None, or a 4-D mask that the
        caller prepared itself (bool True = attend, or float added to the scores; used as is).

        Causal when ``is_causal`` says so, else when ``module.is_causal`` does (transformers' sdpa rule).
        With a KV cache Nq < Nk and the queries are the last Nq positions (bottom-right): for Nq = 2,
        Nk = 5, ``causal(sliding_window(1))`` allows::

                     key  0 1 2 3 4
            query 0 (i=3) 0 0 1 1 0
            query 1 (i=4) 0 0 0 1 1

        Raises:
            ValueError: ``output_attentions`` requested (no weights are formed), or a score modifier
                (``softcap``, attention sinks, position bias) that longattn does not implement.
        """
        config = getattr(module, "config", None)
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            raise ValueError(f"output_attentions: longattn attention ({pattern.name}) never forms the attention "
                             "weights; load the model with attn_implementation='eager' to get them")
        for arg in _UNSUPPORTED:
            if kwargs.get(arg) is not None:
                raise ValueError(f"{arg}: {type(module).__name__} modifies the attention scores, which longattn "
                                 "does not implement; use another attn_implementation for this model")
        nq, nk = query.shape[2], key.shape[2]
        kpm = extra = None
        if attention_mask is not None and attention_mask.dim() == 2:
            kpm = attention_mask.bool()
            # A static cache: the slots after the last real one are empty, drop them.
            key, value = key[:, :, :kpm.shape[-1]], value[:, :, :kpm.shape[-1]]  # (B, Hkv, Nk', D)
            nk = kpm.shape[-1]
        elif attention_mask is not None:
            extra = attention_mask[..., :nk]  # (B, 1 | H, Nq, Nk), sliced as transformers' sdpa does
        if query.shape[1] != key.shape[1]:
            # GQA: query head h reads key/value head h // (H / Hkv), as transformers' repeat_kv. The copies
            # cost O(H·Nk·D), linear in N; longattn's kernels take one head count for q, k and v.
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # (B, H, Nk, D)
        causal_call = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        if not causal_call and _is_cross_attention(module, nq, nk):
            pat = None
        else:
            pat = variant(causal_call, sliding_window)
        out = attention(query, key, value, pattern=pat, attn_mask=extra, key_padding_mask=kpm, scale=scaling,
                        dropout_p=dropout if module.training else 0.0, backend=backend)  # (B, H, Nq, D)
        return out.transpose(1, 2).contiguous(), None  # (B, Nq, H, D)

    longattn_attention.__name__ = f"longattn_attention_{pattern.name}"
    return longattn_attention


def register(name: str, pattern: Pattern | str, *, backend: str = "auto") -> str:
    """Make ``attn_implementation=name`` run transformers models on ``longattn.attention`` with ``pattern``.

    Works with every model that calls ``ALL_ATTENTION_FUNCTIONS`` and builds its masks with
    ``masking_utils`` (BERT, RoBERTa, ModernBERT, Llama, Mistral, Qwen2, ...)::

        register("longformer", "sliding_window(256) | global_tokens([0])")
        model = AutoModel.from_config(cfg, attn_implementation="longformer")  # or set_attn_implementation

    Args:
        name: the ``attn_implementation`` string. Registering a name again replaces it. The names of
            transformers' own implementations (eager, sdpa, flex_attention, flash_attention_*) are refused.
        pattern: a ``Pattern``, a preset name (``"longformer_512"``, see ``longattn.patterns.PRESETS``) or a
            pattern expression for ``longattn.parse_pattern``. Causal models (``module.is_causal``)
            get ``causal(pattern)``; a layer's own ``sliding_window`` is intersected with it; cross-attention
            (keys of another sequence) uses no pattern, only padding.
        backend: passed to ``longattn.attention`` (``"auto"``, ``"dense"``, ``"blocked"``, ``"flex"``).

    Returns:
        ``name``.

    Limitations: the model's ``mask_function`` is not evaluated, so extras it carries (packed-sequence
    boundaries found from ``position_ids``, chunked attention, image-token overlays) are not applied; a
    rolling sliding-window static cache is not supported (its slots are not in position order).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if name in _RESERVED or name.startswith(_RESERVED_PREFIXES):
        raise ValueError(f"name: {name!r} is one of transformers' own attention implementations; choose another")
    if isinstance(pattern, str):
        pattern = as_pattern(pattern)
        pattern = full() if pattern is None else pattern  # the "full" preset
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a longattn Pattern or a pattern string, got {type(pattern).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    AttentionInterface.register(name, _make_attention(pattern, backend))
    AttentionMaskInterface.register(name, padding_mask)
    return name
