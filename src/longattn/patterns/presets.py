"""The one table of named patterns: every pattern name that a command, a config or ``register()`` accepts.

A preset has a name, a one-line description and a builder ``build(n, **settings) -> Pattern | None``: ``n``
is the attention length (keys, a CLS token included) for presets whose size follows it (Sparse
Transformer's stride ~ sqrt(n)), None otherwise; ``settings`` override the preset's keyword defaults (a
config shrinking a window for a short input). None stands for full attention (``pattern=None``).

Variants are presets with some settings fixed, named after them (``longformer_512``, ``strided_64``), so a
benchmark or a model can name exactly the pattern it runs. Applications keep their own short names on top
of this table and say which preset each one is: LRA adds ``global_cls=True`` to ``longformer`` (Longformer
with a global CLS token, as LRA ran it) and the language model maps ``"strided"`` to ``strided_32`` (the
paper's causal factorization), where LRA's ``"strided"`` is this table's bidirectional one.

``window`` means Longformer's w everywhere: w / 2 keys on each side of the query, so it must be even.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ._base import Pattern, _check_int
from .bigbird import bigbird
from .causal import causal as _causal
from .compose import per_head
from .longformer import longformer
from .parse import CONSTRUCTORS, parse_pattern
from .sparse_transformer import StrideColumns, sparse_transformer
from .topk_blocks import topk_blocks
from .window import check_window, sliding_window

Builder = Callable[..., "Pattern | None"]


@dataclass(frozen=True, eq=False)
class Preset:
    """A named pattern: calling it, ``p(n, **settings)``, builds it (None = full attention)."""

    name: str
    description: str  # one line, shown by ``longattn show --list`` and in the docs
    build: Builder  # build(n, **settings); n is the attention length or None
    settings: Mapping[str, Any] = field(default_factory=dict)  # fixed settings of a variant

    def __call__(self, n: int | None = None, **settings: Any) -> Pattern | None:
        known = _keywords(self.build)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"preset {self.name!r}: bad settings {settings}: unknown {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known)) or 'none'})")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"n must be a positive int (the attention length) or None, got {n!r}")
        return self.build(n, **{**self.settings, **settings})

    def variant(self, name: str, description: str, **settings: Any) -> "Preset":
        """This preset with ``settings`` fixed, under ``name``."""
        return Preset(name, description, self.build, {**self.settings, **settings})


def _keywords(build: Builder) -> set[str]:
    params = inspect.signature(build).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _sqrt_size(n: int | None, value: int | None, preset: str, setting: str) -> int:
    """``value``, or Sparse Transformer's choice ~sqrt(n) for each factor."""
    if value is not None:
        return value
    if n is None:
        raise ValueError(f"preset {preset!r} sizes itself from the attention length: give n, or the "
                         f"{setting!r} setting")
    return max(1, round(math.sqrt(n)))


# ---- builders ----------------------------------------------------------------------------------------------

def _full(n: int | None) -> None:
    return None  # SDPA without a mask


def _local(n: int | None, *, window: int = 256) -> Pattern:
    # LRA's local attention cuts the sequence into disjoint chunks; a band is the same budget without the
    # chunk-border blind spots.
    return sliding_window(check_window(window) // 2)


def _lookback(n: int | None, *, keys: int = 256) -> Pattern:
    if not isinstance(keys, int) or isinstance(keys, bool) or keys < 1:
        raise ValueError(f"keys must be a positive int (the query itself included), got {keys!r}")
    return sliding_window(keys - 1, 0)


def _longformer(n: int | None, *, window: int = 512, dilation: int = 1, global_cls: bool = False) -> Pattern:
    return longformer(window, dilation, global_idx=[0] if global_cls else None)


def _bigbird(n: int | None, *, block: int = 64, window_blocks: int = 3, global_blocks: int = 2,
             random_blocks: int = 3, seed: int = 0) -> Pattern:
    return bigbird(block, window_blocks=window_blocks, global_blocks=global_blocks, random_blocks=random_blocks,
                   seed=seed)


def _strided(n: int | None, *, stride: int | None = None, bidirectional: bool = True,
             causal: bool = False) -> Pattern:
    s = _check_int(_sqrt_size(n, stride, "strided", "stride"), "stride", minimum=1)
    if not bidirectional:  # the paper's factors: head A looks back `stride` keys, head B every stride-th key
        return sparse_transformer("strided", stride=s, causal=causal)
    # An encoder reads both ways: head A is the band |i - j| < stride, head B every stride-th key on both
    # sides. (With the one-sided head A, a CLS token at position 0 sees nothing but its column, and the model
    # fails ListOps, as LRA's Sparse Transformer did: 17.07%, the majority rate.)
    pattern = per_head([sliding_window(s - 1), StrideColumns(s)], name=f"strided_bidirectional_{s}")
    return _causal(pattern) if causal else pattern


def _fixed(n: int | None, *, block: int | None = None, c: int = 8, causal: bool = False) -> Pattern:
    block = _sqrt_size(n, block, "fixed", "block")
    return sparse_transformer("fixed", block=block, c=min(c, block), causal=causal)


def _moba(n: int | None, *, block: int = 64, top_k: int = 3, causal: bool = False) -> Pattern:
    return topk_blocks(top_k, block, causal=causal)


def _table(*presets: Preset) -> dict[str, Preset]:
    return {p.name: p for p in presets}


_LONGFORMER = Preset("longformer", "Longformer: a window of `window` keys (window/2 each side, spaced `dilation` "
                     "apart), optionally a global first token (`global_cls`)", _longformer)
_BIGBIRD = Preset("bigbird", "BigBird-ITC: `window_blocks` (odd) centred blocks, `global_blocks` global and "
                  "`random_blocks` seeded random blocks of `block` tokens", _bigbird)
_STRIDED = Preset("strided", "Sparse Transformer strided, heads alternate: a band of `stride` keys / every "
                  "stride-th key; both directions (encoders) unless bidirectional=False; stride ~sqrt(n)",
                  _strided)
_FIXED = Preset("fixed", "Sparse Transformer fixed, heads alternate: the own `block` / the last `c` keys of every "
                "block; block ~sqrt(n)", _fixed)
_LOOKBACK = Preset("lookback", "the last `keys` keys, the query's own included (a causal model's local window)",
                   _lookback)

_MOBA = Preset("moba", "MoBA: each query attends the `top_k` key blocks of `block` tokens whose mean key scores "
               "highest with it, its own block included (chosen per call from q and k); `causal` for decoders",
               _moba)

#: every named pattern, by name
PRESETS: dict[str, Preset] = _table(
    Preset("full", "every query attends every key (None: SDPA without a mask)", _full),
    Preset("local", "a band of `window` keys centred on each query (window/2 each side)", _local),
    _LOOKBACK,
    _LONGFORMER,
    _BIGBIRD,
    _STRIDED,
    _FIXED,
    _MOBA,
    # The benchmark's patterns (DESIGN.md's reference points).
    _LONGFORMER.variant("longformer_512", "Longformer's window of 512 (256 each side), no global tokens",
                        window=512),
    _BIGBIRD.variant("bigbird_64", "BigBird-64: 3 window, 2 global and 3 random blocks of 64 tokens, seed 0",
                     block=64),
    _STRIDED.variant("strided_128_causal", "causal Sparse Transformer strided, stride 128 (the paper's setting)",
                     stride=128, bidirectional=False, causal=True),
    _STRIDED.variant("strided_64", "Sparse Transformer strided(64): heads alternate 64 keys back / every 64th key",
                     stride=64, bidirectional=False),
    _FIXED.variant("fixed_128_8", "Sparse Transformer fixed(128, 8): heads alternate own 128-block / last 8 of each",
                   block=128, c=8),
    # The language model's patterns (it makes every pattern causal).
    _STRIDED.variant("strided_32", "Sparse Transformer strided(32): heads alternate 32 keys back / every 32nd key",
                     stride=32, bidirectional=False),
    _FIXED.variant("fixed_32_4", "Sparse Transformer fixed(32, 4): heads alternate own 32-block / last 4 of each",
                   block=32, c=4),
    _BIGBIRD.variant("bigbird_32", "BigBird-32: 3 window, 2 global and 3 random blocks of 32 tokens, seed 0",
                     block=32),
    _MOBA.variant("moba_32_causal", "causal MoBA: the top 8 of the key blocks of 32 tokens (256 keys, as lookback)",
                  block=32, top_k=8, causal=True),
)


def build_preset(name: str, n: int | None = None, **settings: Any) -> Pattern | None:
    """The pattern of preset ``name`` for attention length ``n`` with ``settings`` (None = full attention).

    ``build_preset("longformer", window=256)`` is ``longformer(256)``; ``build_preset("strided", 4096)`` is the
    bidirectional strided pattern with stride 64."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](n, **settings)


def as_pattern(spec: Pattern | str | None, n: int | None = None, **settings: Any) -> Pattern | None:
    """What every place that takes a pattern accepts: a ``Pattern`` (as is), None (full attention), a preset
    name (built for ``n`` with ``settings``) or a pattern expression for ``parse_pattern``
    (``"causal(sliding_window(64)) | global_tokens([0])"``).

    A preset name wins over a constructor of the same name called without arguments (``"bigbird"`` is the
    preset, ``"bigbird()"`` the constructor; both give BigBird-64 today)."""
    if spec is None or isinstance(spec, Pattern):
        if settings:
            raise ValueError(f"settings {settings} apply to preset names only, got {spec!r}")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"pattern must be a Pattern, a preset name or a pattern expression, got "
                        f"{type(spec).__name__}")
    text = spec.strip()
    if text in PRESETS:
        return PRESETS[text](n, **settings)
    if settings:
        raise ValueError(f"settings {settings} apply to preset names only, got the expression {spec!r}")
    if text.isidentifier() and text not in CONSTRUCTORS:
        raise ValueError(f"unknown pattern {spec!r}: not a preset ({', '.join(PRESETS)}) nor a constructor "
                         f"({', '.join(sorted(CONSTRUCTORS))})")
    return parse_pattern(text)


def describe() -> list[tuple[str, str]]:
    """(name, description) of every preset, in table order: for ``--help`` and ``longattn show --list``."""
    return [(p.name, p.description) for p in PRESETS.values()]
