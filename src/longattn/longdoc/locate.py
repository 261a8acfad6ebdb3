"""Where a query's text sits in a license: the beyond-512 slice, where truncation cannot see the evidence.

A query is *found* in a license when at least half of its word 5-grams (lower-cased runs of letters and
digits; queries under 5 words are never located: one or two words such as ``MIT`` occur everywhere) occur in
the license's text. Its *location* is the token offset, in the encoder's tokenization, of the first
occurrence of any of its 5-grams. A query belongs to the beyond-512 slice when it is found in at least one
of its relevant licenses and, in every relevant license where it is found, none of its 5-grams starts
within the tokens a 512-token truncation keeps (510 text tokens plus CLS and SEP). Few queries qualify
(most rules that a license contains come from its opening), so the report also gives a loose slice in which
a tenth of the 5-grams suffices (``LOOSE_FRACTION``).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Callable

SHINGLE = 5
FOUND_FRACTION = 0.5
LOOSE_FRACTION = 0.1
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> tuple[list[str], list[int]]:
    """The lower-cased words of ``text`` and their character offsets."""
    found = list(_WORD.finditer(text.lower()))
    return [m.group() for m in found], [m.start() for m in found]


def shingles(tokens: list[str]) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + SHINGLE]) for i in range(len(tokens) - SHINGLE + 1)]


@dataclass
class DocumentIndex:
    """The first character offset of every word 5-gram of one document."""

    first: dict[tuple[str, ...], int]

    @classmethod
    def of(cls, text: str) -> "DocumentIndex":
        tokens, starts = words(text)
        first: dict[tuple[str, ...], int] = {}
        for i, s in enumerate(shingles(tokens)):
            first.setdefault(s, starts[i])
        return cls(first)

    def locate(self, query: str, found_fraction: float = FOUND_FRACTION) -> int | None:
        """Character offset of the query's first matched 5-gram if the query is found here (at least
        ``found_fraction`` of its 5-grams occur), else None."""
        grams = shingles(words(query)[0])
        hits = [self.first[g] for g in grams if g in self.first]
        if not grams or not hits or len(hits) < found_fraction * len(grams):
            return None
        return min(hits)


def token_offset(token_starts: list[int], char: int) -> int:
    """Index of the token holding character ``char``, from the tokens' start characters (sorted)."""
    return max(0, bisect.bisect_right(token_starts, char) - 1)


def beyond_slice(queries, corpus_texts: dict[str, str], token_starts: Callable[[str], list[int]], *,
                 kept_tokens: int = 510, found_fraction: float = FOUND_FRACTION) -> dict[str, int | None]:
    """For each query (``.name``, ``.text``, ``.relevant`` keys): the token offset of its earliest location
    over its relevant licenses if it belongs to the beyond-``kept_tokens`` slice, else None.

    ``token_starts(text)`` gives the start character of each text token (special tokens excluded)."""
    indexes: dict[str, DocumentIndex] = {}
    starts: dict[str, list[int]] = {}
    out: dict[str, int | None] = {}
    for q in queries:
        offsets = []
        for key in q.relevant:
            if key not in indexes:
                indexes[key] = DocumentIndex.of(corpus_texts[key])
            char = indexes[key].locate(q.text, found_fraction)
            if char is not None:
                if key not in starts:
                    starts[key] = token_starts(corpus_texts[key])
                offsets.append(token_offset(starts[key], char))
        out[q.name] = min(offsets) if offsets and min(offsets) >= kept_tokens else None
    return out
