"""Task 2, classification (license text -> category): a linear probe on each frozen representation.

Representations (``CLASSIFICATION_SYSTEMS``): TF-IDF (the lexical anchor), all-MiniLM-L6-v2 on the first 512
tokens, the mean of its 512-token windows, the mean of its sentence vectors, and the converted long encoder
on whole documents. Every probe is chosen on validation and scored on test (``probe.select_probe``). Beside
micro- and macro-F1 the result keeps the excess fraction, the share of test documents longer than 512
tokens, as BigBird's table does. Results go to ``<out>/classification/<system>.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..io import write_json
from .lexical import tfidf_features
from .metrics import f1_scores
from .probe import select_probe
from .retrieval import Context, Settings, chunk_means
from .tasks import SPLITS, ClassificationTask

EXCESS_TOKENS = 512


def _dense(view: Callable[[list[str]], tuple[Tensor, float]]) -> Callable[[Context, dict], tuple[dict, float]]:
    def features(ctx: Context, texts: dict[str, list[str]]) -> tuple[dict, float]:
        out, seconds = {}, 0.0
        for split, ts in texts.items():
            out[split], s = view(ctx)(ts)
            seconds += s
        return out, seconds
    return features


def _tfidf(ctx: Context, texts: dict[str, list[str]]) -> tuple[dict, float]:
    start = time.perf_counter()
    out = {s: tfidf_features(texts["train"], ts) for s, ts in texts.items()}
    return out, time.perf_counter() - start


def _chunk_mean(ctx: Context):
    def view(ts):
        chunks, doc, seconds = ctx.views("short").chunks(ts)
        return chunk_means(chunks, doc, len(ts)), seconds
    return view


def _sentence_mean(ctx: Context):
    def view(ts):
        vectors, seconds = ctx.views("short").sentences(ts)
        return torch.stack([v.mean(0) for v in vectors]), seconds
    return view


CLASSIFICATION_SYSTEMS = {
    "tfidf": _tfidf,
    "minilm-512": _dense(lambda ctx: ctx.views("short").trunc),
    "minilm-chunks-mean": _dense(_chunk_mean),
    "minilm-sentences-mean": _dense(_sentence_mean),
    "minilm-long": _dense(lambda ctx: ctx.views("long").full),
}


def run_classification(task: ClassificationTask, ctx: Context, systems: list[str]) -> list[dict]:
    unknown = [s for s in systems if s not in CLASSIFICATION_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown classification system(s) {unknown}; choose from {list(CLASSIFICATION_SYSTEMS)}")
    settings: Settings = ctx.settings
    texts = {s: [lic.text for lic in task.documents[s]] for s in SPLITS}
    targets = {s: torch.tensor(task.targets(s)) for s in SPLITS}
    counts = ctx.views("short").encoder.count_tokens(texts["test"])
    excess = sum(c > EXCESS_TOKENS for c in counts) / len(counts)
    identity = {"quick": ctx.task.quick, "sizes": {s: len(t) for s, t in texts.items()}, "labels": task.labels}
    results = []
    for name in systems:
        path = Path(settings.out) / "classification" / f"{name}.json"
        if settings.resume and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("task") == identity:
                results.append(saved)
                continue
        features, seconds = CLASSIFICATION_SYSTEMS[name](ctx, texts)
        start = time.perf_counter()
        probe = select_probe((features["train"], targets["train"]), (features["val"], targets["val"]),
                             len(task.labels))
        predicted = probe.predict(features["test"])
        result = {"system": name, "task": identity, **f1_scores(predicted, targets["test"]),
                  "val": f1_scores(probe.predict(features["val"]), targets["val"]) if len(targets["val"]) else None,
                  "excess_fraction": excess, "probe": {"l2": probe.l2, "balanced": probe.balanced},
                  "predicted": predicted.tolist(), "gold": targets["test"].tolist(),
                  "seconds": {"features": seconds, "probe": time.perf_counter() - start}}
        write_json(path, result)
        results.append(result)
    return results
