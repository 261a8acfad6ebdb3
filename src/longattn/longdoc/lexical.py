"""The lexical anchors: BM25 for retrieval, TF-IDF features for the classification probe.

BM25 is ``bm25s`` (Lucene's variant, k1 = 1.5, b = 0.75). Texts are lower-cased and split on non-word
characters by ``bm25s.tokenize`` with English stop words removed; no stemming (it would need another
package). TF-IDF uses the same words: the ``vocab`` most frequent in the training documents, sublinear term
frequency ``1 + log tf``, smoothed idf, rows L2-normalised.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch
from torch import Tensor


class BM25Index:
    def __init__(self, texts: Sequence[str]):
        try:
            import bm25s
        except ImportError:
            raise ImportError("BM25 needs bm25s: pip install 'longattn[longdoc]'") from None
        if not texts:
            raise ValueError("texts must hold at least one document")
        self._bm25s = bm25s
        self.size = len(texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def scores(self, queries: Sequence[str]) -> Tensor:
        """(Q, D) BM25 scores (float32)."""
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False, return_ids=False)
        return torch.stack([torch.as_tensor(self.retriever.get_scores(q), dtype=torch.float32) for q in tokens])


_WORD = re.compile(r"(?u)\b\w\w+\b")


def tfidf_features(train: Sequence[str], texts: Sequence[str], *, vocab: int = 4096) -> Tensor:
    """(len(texts), vocab) TF-IDF rows of ``texts`` over the vocabulary of the ``train`` documents."""
    counts = [Counter(_WORD.findall(t.lower())) for t in train]
    df = Counter(w for c in counts for w in c)
    words = [w for w, _ in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab]]
    index = {w: i for i, w in enumerate(words)}
    idf = torch.tensor([math.log((1 + len(train)) / (1 + df[w])) + 1 for w in words], dtype=torch.float32)
    out = torch.zeros(len(texts), len(words))
    for row, text in enumerate(texts):
        for w, tf in Counter(_WORD.findall(text.lower())).items():
            if w in index:
                out[row, index[w]] = 1 + math.log(tf)
    out *= idf
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
