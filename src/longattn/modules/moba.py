"""MoBA (Lu et al., Moonshot AI, 2025, "Mixture of Block Attention"): each query attends the key blocks its
gate picks, the top-k by affinity to the blocks' mean keys, its own block always among them.

The layer is ``SparseSelfAttention`` with the content-dependent pattern ``topk_blocks(top_k, block)``
(definition in ``longattn.patterns.topk_blocks``), optionally united with a sliding window or global tokens
(``extra``). The choice is made per call and not differentiated; the attention over the chosen keys is.
Unlike the reference implementation (flash-attn varlen, CUDA only) it runs on every backend, trains on CPU,
and composes with any pattern.
"""

from __future__ import annotations

from ..patterns import Pattern
from ..patterns.topk_blocks import topk_blocks
from .sparse_self_attention import SparseSelfAttention


class MoBAAttention(SparseSelfAttention):
    """Multi-head MoBA over ``x: (B, N, C)``.

    Args:
        dim: model width C.
        heads: number of heads H.
        block: key block size (MoBA's block; 512 in the paper at 32K tokens, smaller for short inputs).
        top_k: blocks each query attends, its own included (the paper's 3).
        causal: a decoder: future blocks are never chosen, the own block is causal inside.
        extra: a pattern united with the choice (``sliding_window(256)``, ``global_tokens([0])``); None: none.
        **kwargs: the other arguments of ``SparseSelfAttention`` (``qkv_dim``, ``dropout``, ``backend``, ...).
    """

    def __init__(self, dim: int, heads: int, *, block: int = 64, top_k: int = 3, causal: bool = False,
                 extra: Pattern | None = None, **kwargs):
        if "pattern" in kwargs:
            raise TypeError("MoBAAttention builds its own pattern from block and top_k; use extra= to add another")
        if extra is not None and not isinstance(extra, Pattern):
            raise TypeError(f"extra must be a longattn Pattern or None, got {type(extra).__name__}")
        pattern = topk_blocks(top_k, block, causal=causal)
        super().__init__(dim, heads, pattern=pattern if extra is None else pattern | extra, **kwargs)
        self.block, self.top_k, self.causal = block, top_k, causal
