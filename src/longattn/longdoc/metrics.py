"""Retrieval and classification metrics, per query so that any slice can be reported and bootstrapped.

Retrieval, for one query with relevant set R and ranking r_1, r_2, ...:
- ``Recall@k = |R ∩ {r_1..r_k}| / |R|`` (a query naming two licenses, ``gpl-2.0 OR mit``, needs both for 1.0);
- ``MRR@10 = 1 / (rank of the first relevant document)`` if it is within the top 10, else 0.
Classification: micro-F1 (= accuracy for single-label classes) and macro-F1 (the unweighted mean of the
per-class F1 over the classes present in the gold labels or the predictions; a class never predicted and never
present is left out).
"""

from __future__ import annotations

import torch
from torch import Tensor

RECALL_AT = (1, 5, 10)
MRR_AT = 10


def retrieval_metrics(ranking: Tensor, relevant: list[list[int]]) -> dict[str, Tensor]:
    """Per-query metrics: ``{"R@1": (Q,), "R@5": ..., "R@10": ..., "MRR@10": (Q,)}`` (float64).

    Args:
        ranking: (Q, K) document indices, best first, K >= 10.
        relevant: for each query, the indices of its relevant documents (at least one).
    """
    if ranking.dim() != 2 or ranking.shape[0] != len(relevant):
        raise ValueError(f"ranking must be (Q={len(relevant)}, K), got {tuple(ranking.shape)}")
    if ranking.shape[1] < max(max(RECALL_AT), MRR_AT):
        raise ValueError(f"ranking must hold at least {max(max(RECALL_AT), MRR_AT)} documents per query, "
                         f"got {ranking.shape[1]}")
    if any(not r for r in relevant):
        raise ValueError("every query needs at least one relevant document")
    hits = torch.zeros(ranking.shape, dtype=torch.bool)
    for i, rel in enumerate(relevant):
        hits[i] = torch.isin(ranking[i], torch.tensor(rel, dtype=ranking.dtype))
    sizes = torch.tensor([len(set(r)) for r in relevant], dtype=torch.float64)
    out = {f"R@{k}": hits[:, :k].sum(1).double() / sizes for k in RECALL_AT}
    first = torch.where(hits[:, :MRR_AT].any(1), hits[:, :MRR_AT].double().argmax(1) + 1.0, torch.inf)
    out[f"MRR@{MRR_AT}"] = 1.0 / first
    return out


def top_k(scores: Tensor, k: int) -> Tensor:
    """(Q, min(k, D)) indices of the highest scores, ties broken by the lower document index."""
    # a stable sort on the negated scores keeps equal scores in index order (topk does not promise that)
    return torch.sort(-scores, dim=1, stable=True).indices[:, :k]


def f1_scores(predicted: list[int] | Tensor, gold: list[int] | Tensor) -> dict[str, float]:
    """``{"micro_f1", "macro_f1"}`` of single-label predictions."""
    p, g = torch.as_tensor(predicted).long(), torch.as_tensor(gold).long()
    if p.shape != g.shape or p.dim() != 1:
        raise ValueError(f"predicted and gold must be two (N,) label lists, got {tuple(p.shape)} and {tuple(g.shape)}")
    if p.numel() == 0:
        raise ValueError("no predictions to score")
    f1s = []
    for c in torch.unique(torch.cat([p, g])).tolist():
        tp = float(((p == c) & (g == c)).sum())
        fp, fn = float(((p == c) & (g != c)).sum()), float(((p != c) & (g == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"micro_f1": float((p == g).double().mean()), "macro_f1": sum(f1s) / len(f1s)}


def paired_bootstrap(a: Tensor, b: Tensor, *, samples: int = 2000, seed: int = 0, level: float = 0.95
                     ) -> dict[str, float]:
    """The mean of ``a - b`` over queries with its percentile bootstrap interval (queries resampled with
    replacement, the same resample for both systems): ``{"diff", "low", "high", "n"}``."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"a and b must be two (Q,) per-query scores, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.numel()
    if n == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    d = (a - b).double()
    gen = torch.Generator().manual_seed(seed)
    means = d[torch.randint(n, (samples, n), generator=gen)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"diff": float(d.mean()), "low": lo, "high": hi, "n": n}
