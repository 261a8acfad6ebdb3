"""A linear probe: multinomial logistic regression on frozen features, its L2 strength chosen on validation.

Features are standardised with the training split's mean and deviation; the loss is cross-entropy, class
weighted (inverse frequency) when ``balanced`` so that rare categories count for macro-F1; fitted full batch by
L-BFGS in float64 (a convex problem: the same answer on every machine). The grid of L2 strengths and the
class weighting are searched on the validation split by macro-F1, then the probe is refitted on train alone
(the test split is never seen while choosing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .metrics import f1_scores

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class Probe:
    weight: Tensor  # (K, F)
    bias: Tensor  # (K,)
    mean: Tensor  # (F,)
    std: Tensor  # (F,)
    l2: float
    balanced: bool

    def predict(self, x: Tensor) -> Tensor:
        z = (x.double() - self.mean) / self.std
        return (z @ self.weight.T + self.bias).argmax(1)


def fit_probe(x: Tensor, y: Tensor, classes: int, *, l2: float, balanced: bool, steps: int = 200) -> Probe:
    """Fit on (N, F) features and (N,) labels in [0, classes)."""
    x, y = x.double(), torch.as_tensor(y).long()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    counts = torch.bincount(y, minlength=classes).double()
    weights = torch.where(counts > 0, counts.sum() / (classes * counts.clamp_min(1)), 0.0) if balanced else None
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y, weight=weights) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(w.detach(), b.detach(), mean, std, l2, balanced)


def select_probe(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], classes: int) -> Probe:
    """The probe of the (L2, balanced) setting with the best validation macro-F1 (ties: the stronger L2).
    With an empty validation split (a tiny data set) the training split chooses."""
    if len(val[1]) == 0:
        val = train
    best, best_f1 = None, -1.0
    for balanced in (False, True):
        for l2 in sorted(L2_GRID, reverse=True):
            probe = fit_probe(*train, classes, l2=l2, balanced=balanced)
            f1 = f1_scores(probe.predict(val[0]), val[1])["macro_f1"]
            if f1 > best_f1:
                best, best_f1 = probe, f1
    return best
