"""Task 1, retrieval: every system ranks the whole corpus for each test query; per-query metrics are saved.

Systems (``RETRIEVAL_SYSTEMS``), all on the same corpus and queries:
- ``bm25``: the lexical anchor.
- ``minilm-512``: all-MiniLM-L6-v2 on the first 512 tokens of each license (how it is run today).
- ``minilm-chunks-max`` / ``-mean``: the usual workaround, 512-token windows with 128 tokens of overlap,
  a document scored by its best window or by the mean of its windows' vectors.
- ``minilm-long``: the same weights converted to a long encoder (window 512 + global CLS), whole documents up
  to ``max_length`` tokens, zero-shot.
- ``minilm-long-ft``: the long encoder fine-tuned contrastively on the train rules at a 2-core CPU budget
  (``longdoc.trained``), whole documents as ``minilm-long``.
- ``minilm-long-mlm``: the long encoder after continued masked-LM pretraining on the license texts (the second
  half of the Longformer recipe), whole documents as ``minilm-long``.
- ``paraformer``: the hierarchical attentive retriever trained on the train rules (``longdoc.paraformer``).
Each system's result is ``<out>/retrieval/<system>.json``; a system whose result exists for the same task
is not run again (``resume=False`` reruns it; embeddings still come from the cache).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..integrations.sentence_encoder import SentenceEncoder
from ..io import write_json
from .encoders import Views, long_encoder, short_encoder
from .lexical import BM25Index
from .metrics import retrieval_metrics, top_k
from .tasks import RetrievalTask

RANK_DEPTH = 10
TRAINED_VIEWS = {"long-ft": "retrieval", "long-mlm": "pretrain"}  # view -> its training run (``longdoc.trained``)


@dataclass
class Settings:
    """How a benchmark command runs (``longattn longdoc ...``)."""

    out: Path  # results, the embedding cache (out/cache) and the converted models (out/models)
    quick: bool = False
    max_length: int = 16384  # the long encoder's positions
    progress: bool = True
    resume: bool = True
    paraformer_steps: int = 600  # training steps of the Paraformer-style retriever (--quick: 100)

    @property
    def cache(self) -> Path:
        return Path(self.out) / "cache"


@dataclass
class Context:
    """What the systems share: the task, the corpus and query texts, the encoders' cached views."""

    task: RetrievalTask
    settings: Settings
    _views: dict = field(default_factory=dict)

    @property
    def documents(self) -> list[str]:
        return [lic.text for lic in self.task.corpus]

    def queries(self, split: str = "test") -> list[str]:
        return [q.text for q in self.task.queries[split]]

    def relevant(self, split: str = "test") -> list[list[int]]:
        index = self.task.index()
        return [[index[k] for k in q.relevant] for q in self.task.queries[split]]

    def views(self, which: str) -> Views:
        """``short``, ``long`` or a trained long encoder, ``long-ft`` or ``long-mlm`` (loaded once; trained first
        if its run has not finished)."""
        if which not in self._views:
            s = self.settings
            if which == "short":
                encoder = short_encoder()
            elif which == "long":
                encoder = long_encoder(Path(s.out) / "models", s.max_length)
            else:
                from .trained import trained_model_dir

                encoder = SentenceEncoder.load(trained_model_dir(self.task, s, TRAINED_VIEWS[which]))
            self._views[which] = Views(encoder, s.cache, progress=s.progress, label=f"minilm-{which}")
        return self._views[which]


@dataclass
class SystemRun:
    scores: Tensor  # (Q, D) for the test queries
    seconds: dict[str, float]  # corpus, queries, train, score
    info: dict = field(default_factory=dict)


def _timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def run_bm25(ctx: Context) -> SystemRun:
    index, build = _timed(lambda: BM25Index(ctx.documents))
    scores, query = _timed(lambda: index.scores(ctx.queries()))
    return SystemRun(scores, {"corpus": build, "queries": query})


def run_truncated(ctx: Context) -> SystemRun:
    views = ctx.views("short")
    docs, corpus = views.trunc(ctx.documents)
    queries, query = views.trunc(ctx.queries())
    return SystemRun(queries @ docs.T, {"corpus": corpus, "queries": query})


def chunk_scores(queries: Tensor, chunks: Tensor, doc: Tensor, documents: int, reduce: str) -> Tensor:
    """(Q, D): a document's best window (``max``) or the query against its windows' mean vector (``mean``)."""
    if reduce == "max":
        sims = queries @ chunks.T  # (Q, M)
        out = sims.new_full((queries.shape[0], documents), -torch.inf)
        return out.scatter_reduce(1, doc.expand_as(sims), sims, reduce="amax")
    return queries @ chunk_means(chunks, doc, documents).T


def chunk_means(chunks: Tensor, doc: Tensor, documents: int) -> Tensor:
    """(D, C): the mean of each document's window vectors (zero for a document with none)."""
    means = torch.zeros(documents, chunks.shape[1]).index_add_(0, doc, chunks)
    return means / torch.bincount(doc, minlength=documents).clamp_min(1)[:, None]


def _run_chunks(ctx: Context, reduce: str) -> SystemRun:
    views = ctx.views("short")
    chunks, doc, corpus = views.chunks(ctx.documents)
    queries, query = views.trunc(ctx.queries())
    return SystemRun(chunk_scores(queries, chunks, doc, len(ctx.documents), reduce), {"corpus": corpus, "queries": query},
                     {"windows": len(chunks)})


def run_long(ctx: Context, which: str = "long") -> SystemRun:
    """A long encoder (``Context.views``) on whole documents; a trained one adds its training seconds."""
    views = ctx.views(which)
    docs, corpus = views.full(ctx.documents)
    queries, query = views.trunc(ctx.queries())
    seconds, info = {"corpus": corpus, "queries": query}, {"max_length": views.encoder.max_length}
    if which != "long":
        from .trained import finished

        result = finished(ctx.settings.out, TRAINED_VIEWS[which])
        seconds["train"], info["budget"] = result["budget"]["seconds"], result["budget"]
    return SystemRun(queries @ docs.T, seconds, info)


def run_paraformer(ctx: Context) -> SystemRun:
    from .paraformer import train_and_score

    return train_and_score(ctx)


RETRIEVAL_SYSTEMS: dict[str, Callable[[Context], SystemRun]] = {
    "bm25": run_bm25,
    "minilm-512": run_truncated,
    "minilm-chunks-max": lambda ctx: _run_chunks(ctx, "max"),
    "minilm-chunks-mean": lambda ctx: _run_chunks(ctx, "mean"),
    "minilm-long": run_long,
    "minilm-long-ft": lambda ctx: run_long(ctx, "long-ft"),
    "minilm-long-mlm": lambda ctx: run_long(ctx, "long-mlm"),
    "paraformer": run_paraformer,
}


def task_identity(task: RetrievalTask) -> dict:
    return {"quick": task.quick, "corpus": len(task.corpus), "test": [q.name for q in task.queries["test"]][:5],
            "test_queries": len(task.queries["test"])}


def run_retrieval(task: RetrievalTask, settings: Settings, systems: list[str]) -> list[dict]:
    """Run ``systems`` (names of ``RETRIEVAL_SYSTEMS``) and return their results (also written to
    ``<out>/retrieval/<system>.json``)."""
    unknown = [s for s in systems if s not in RETRIEVAL_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown retrieval system(s) {unknown}; choose from {list(RETRIEVAL_SYSTEMS)}")
    if not task.queries["test"]:
        raise ValueError("the retrieval task has no test queries (too few rules in the data?)")
    ctx, results = Context(task, settings), []
    relevant = ctx.relevant()
    save_slices(ctx)
    for name in systems:
        path = Path(settings.out) / "retrieval" / f"{name}.json"
        if settings.resume and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("task") == task_identity(task):
                results.append(saved)
                continue
        run = RETRIEVAL_SYSTEMS[name](ctx)
        start = time.perf_counter()
        ranking = top_k(run.scores, RANK_DEPTH)
        run.seconds["score"] = run.seconds.get("score", 0.0) + time.perf_counter() - start
        metrics = retrieval_metrics(ranking, relevant)
        result = {"system": name, "task": task_identity(task), "queries": [q.name for q in task.queries["test"]],
                  "metrics": {k: v.tolist() for k, v in metrics.items()},
                  "mean": {k: float(v.mean()) for k, v in metrics.items()},
                  "top": ranking[:, :RANK_DEPTH].tolist(), "seconds": run.seconds, "info": run.info}
        write_json(path, result)
        results.append(result)
    return results


# ---- the slices the report breaks results down by ----------------------------------------------------
LENGTH_BUCKETS = ((512, "<= 512"), (2048, "512-2K"), (8192, "2K-8K"), (float("inf"), "> 8K"))


def length_bucket(tokens: int) -> str:
    return next(label for limit, label in LENGTH_BUCKETS if tokens <= limit)


def query_slices(ctx: Context) -> dict:
    """Per test query: its rule kind, the length bucket of its longest relevant license (tokens of the short
    encoder, special tokens included) and its beyond-512 offsets (strict and loose; ``locate``)."""
    from .locate import LOOSE_FRACTION, beyond_slice

    encoder = ctx.views("short").encoder
    queries = ctx.task.queries["test"]
    needed = sorted({k for q in queries for k in q.relevant})
    texts = {lic.key: lic.text for lic in ctx.task.corpus}
    tokens = dict(zip(needed, encoder.count_tokens([texts[k] for k in needed])))
    kept = encoder.max_length - 2  # CLS and SEP
    strict = beyond_slice(queries, texts, encoder.token_starts, kept_tokens=kept)
    loose = beyond_slice(queries, texts, encoder.token_starts, kept_tokens=kept, found_fraction=LOOSE_FRACTION)
    return {"queries": [q.name for q in queries], "kind": [q.kind for q in queries],
            "bucket": [length_bucket(max(tokens[k] for k in q.relevant)) for q in queries],
            "beyond": [strict[q.name] for q in queries], "beyond_loose": [loose[q.name] for q in queries],
            "relevant_tokens": [max(tokens[k] for k in q.relevant) for q in queries]}


def save_slices(ctx: Context) -> dict:
    path = Path(ctx.settings.out) / "retrieval" / "slices.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("task") == task_identity(ctx.task):
            return saved
    slices = {"task": task_identity(ctx.task), **query_slices(ctx)}
    write_json(path, slices)
    return slices
