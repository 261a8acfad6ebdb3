"""Sentence splitting for legal text, the units of the Paraformer-style retriever.

Licenses are laid out in paragraphs, numbered clauses and long enumerations, often without final punctuation.
A sentence here ends at a blank line, or at ``.``, ``;``, ``:``, ``?`` or ``!`` followed by white space and an
upper-case letter, a digit, a bracket or a quote; pieces longer than ``max_words`` are cut into equal runs of
at most ``max_words`` words (a sentence encoder trained on short texts reads them whole instead of truncating them).
Runs of white space collapse to one space.
"""

from __future__ import annotations

import re

MAX_WORDS = 64
_PARAGRAPH = re.compile(r"\n\s*\n")
_BOUNDARY = re.compile(r"(?<=[.;:?!])\s+(?=[A-Z0-9(\[\"'])")


def split_sentences(text: str, *, max_words: int = MAX_WORDS) -> list[str]:
    """The sentences of ``text`` in order; at least one (the text itself) for a non-blank text."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    out = []
    for paragraph in _PARAGRAPH.split(text):
        for sentence in _BOUNDARY.split(" ".join(paragraph.split())):
            tokens = sentence.split()
            size = -(-len(tokens) // -(-len(tokens) // max_words)) if tokens else 1  # equal pieces
            out += [" ".join(tokens[i:i + size]) for i in range(0, len(tokens), size)]
    return out
