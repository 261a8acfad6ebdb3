"""The attention variants of Long Range Arena, by name: presets of ``longattn.patterns.presets``.

LRA compares its models at fixed settings (Longformer: a 512-token window and a global CLS; BigBird: 64-token
blocks with 3 window, 2 global and 3 random blocks; Sparse Transformer: strided and fixed factorizations,
both ways here since the models are encoders; local attention). Each is the preset of the same name,
built for the attention length ``n`` (CLS included) with keyword settings, so that a config can shrink a
window for a short input (``window`` is Longformer's w: w/2 keys on each side, even). Any other preset
name or pattern expression (``"causal(sliding_window(64))"``) works too.
"""

from __future__ import annotations

from dataclasses import replace

from ..models.encoder import CombinerMixer, FITMixer, NSAMixer
from ..modules.combiner import KINDS as COMBINER_KINDS
from ..patterns import PRESETS, Pattern, as_pattern

#: variants that are no pattern: Combiner attention in every block, FIT's groups and latents, or NSA's branches
MIXERS: dict[str, CombinerMixer | FITMixer | NSAMixer] = {
    **{f"combiner-{kind}": CombinerMixer(kind) for kind in COMBINER_KINDS},
    # NSA sparser than the paper's sizes, which at LRA's lengths would cover nearly every key
    "fit": FITMixer(), "nsa": NSAMixer(select_top=4, window=128)}
#: variants meant for inputs that are images (rows of pixels); the suite runs them on those tasks only
IMAGE_ONLY = frozenset({"combiner-axial"})


def suits(attention: str, task: str) -> bool:
    """Whether the suite runs ``attention`` on ``task``: image-only variants need an image-shaped task."""
    return attention not in IMAGE_ONLY or task.startswith(("pathfinder", "image", "pathx"))


#: the variants of the LRA paper, each a preset of the same name, then MoBA (a preset), Combiner, FIT and NSA
ATTENTIONS: tuple[str, ...] = ("full", "local", "longformer", "bigbird", "strided", "fixed", "moba", *MIXERS)
ALIASES = {"transformer": "full", "sparse_transformer": "strided", "sparse-transformer": "strided"}
#: LRA's settings over the presets' defaults: Longformer with a global CLS token, as LRA ran it
LRA_SETTINGS: dict[str, dict] = {"longformer": {"global_cls": True}}


def check_attention(name: str) -> None:
    """The ``ValueError`` that ``build_attention`` would raise for ``name``, before any data is generated."""
    if ALIASES.get(name, name) not in PRESETS and ALIASES.get(name, name) not in MIXERS:
        build_attention(name, 1)  # an expression does not depend on the length


def build_attention(name: str, n: int, settings: dict | None = None
                    ) -> Pattern | CombinerMixer | FITMixer | NSAMixer | None:
    """The pattern of variant ``name`` for attention length ``n`` (None = full attention).

    ``name`` is one of ``ATTENTIONS`` (or an alias), or any preset of ``longattn.patterns.PRESETS``, with
    optional ``settings`` for its keywords; or a pattern expression for ``longattn.parse_pattern``.
    """
    key = ALIASES.get(name, name)
    if key in MIXERS:  # settings: region for Combiner; group_size, latents for FIT; NSAMixer's sizes for NSA
        return replace(MIXERS[key], **(settings or {}))
    if key in PRESETS:
        return as_pattern(key, n, **{**LRA_SETTINGS.get(key, {}), **(settings or {})})
    if "(" not in name:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, another preset ({', '.join(PRESETS)}) "
                         f"or a pattern expression such as 'sliding_window(64)', got {name!r}")
    return as_pattern(name)
