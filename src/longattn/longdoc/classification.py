"""Task 2, classification (license text -> category): a linear probe on each frozen representation, and the
long encoder fine-tuned with a classification head.

Probes (``PROBES``): TF-IDF (the lexical anchor), all-MiniLM-L6-v2 on the first 512 tokens, the mean of its
512-token windows, the mean of its sentence vectors, the converted long encoder on whole documents, and the
same after continued masked-LM pretraining (``minilm-long-mlm``). Every probe is chosen on validation and
scored on test (``probe.select_probe``). ``minilm-long-ft`` is the long encoder fine-tuned end to end with a
linear head at a 2-core CPU budget (``longdoc.trained``; its documents cut to the budget's tokens). Beside
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


PROBES = {
    "tfidf": _tfidf,
    "minilm-512": _dense(lambda ctx: ctx.views("short").trunc),
    "minilm-chunks-mean": _dense(_chunk_mean),
    "minilm-sentences-mean": _dense(_sentence_mean),
    "minilm-long": _dense(lambda ctx: ctx.views("long").full),
    "minilm-long-mlm": _dense(lambda ctx: ctx.views("long-mlm").full),
}
FINE_TUNED = ("minilm-long-ft",)  # the long encoder fine-tuned with a classification head (``longdoc.trained``)
CLASSIFICATION_SYSTEMS = [*PROBES, *FINE_TUNED]


def _run_probe(name: str, ctx: Context, texts: dict, targets: dict, classes: int) -> dict:
    features, seconds = PROBES[name](ctx, texts)
    start = time.perf_counter()
    probe = select_probe((features["train"], targets["train"]), (features["val"], targets["val"]), classes)
    predicted = probe.predict(features["test"])
    return {**f1_scores(predicted, targets["test"]),
            "val": f1_scores(probe.predict(features["val"]), targets["val"]) if len(targets["val"]) else None,
            "probe": {"l2": probe.l2, "balanced": probe.balanced}, "predicted": predicted.tolist(),
            "seconds": {"features": seconds, "probe": time.perf_counter() - start}}


def _run_fine_tuned(task: ClassificationTask, ctx: Context) -> dict:
    from .trained import classifier_result

    r = classifier_result(task, ctx.settings)
    return {"micro_f1": r["micro_f1"], "macro_f1": r["macro_f1"], "val": r["val"], "probe": None,
            "predicted": r["predicted"], "budget": r["budget"],
            "seconds": {"train": r["budget"]["seconds"], "predict": r["budget"]["predict_seconds"]}}


def run_classification(task: ClassificationTask, ctx: Context, systems: list[str]) -> list[dict]:
    unknown = [s for s in systems if s not in CLASSIFICATION_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown classification system(s) {unknown}; choose from {CLASSIFICATION_SYSTEMS}")
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
        run = (_run_fine_tuned(task, ctx) if name in FINE_TUNED
               else _run_probe(name, ctx, texts, targets, len(task.labels)))
        result = {"system": name, "task": identity, **run, "excess_fraction": excess, "gold": targets["test"].tolist()}
        write_json(path, result)
        results.append(result)
    return results
