"""Training the Paraformer-style retriever (``models.paraformer``) on the train rules, then ranking the test.

Inputs are frozen: each license's sentence vectors and each rule's query vector come from all-MiniLM-L6-v2
through the embedding cache, so a step only runs the small sentence-level layer. A step takes ``batch``
train queries; the candidates are one relevant license per query and one BM25 hard negative per query (drawn
from BM25's top ``HARD_NEGATIVES`` licenses that are not relevant), shared by the whole batch (in-batch
negatives). The loss is InfoNCE with several positives: ``logsumexp(all candidates) - logsumexp(the query's
relevant candidates)``, so a license relevant to two queries of the batch is never pushed away from either.
Validation MRR@10 over the whole corpus is logged every ``eval_every`` steps; the run (``<out>/paraformer``)
checkpoints there and resumes after a kill through the shared trainer (``training.setup``).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ..models.paraformer import DocumentStates, ParaformerConfig, ParaformerRetriever, pad_documents
from ..training.distributed import init_world
from ..training.run import warmup_cosine
from ..training.setup import RunSpec, start
from .lexical import BM25Index
from .metrics import retrieval_metrics, top_k

HARD_NEGATIVES = 8
FFN_DIM = 768  # twice the width: the layer only mixes neighbouring sentences, and a 2-core step stays < 1 s
BATCH = 32
LR = 5e-4
DOCS_PER_GROUP = 64  # documents encoded at once
SLOTS_PER_GROUP = 8192  # padded sentence slots encoded at once


def document_states(model: ParaformerRetriever, documents: list[Tensor], ids: list[int] | None = None
                    ) -> tuple[DocumentStates, Tensor]:
    """The packed states of ``documents[ids]`` (default: all), encoded in groups of similar length so that
    little is padded (at most ``SLOTS_PER_GROUP`` sentence slots a group), and ``placed`` (D,): document j
    of the states is document ``placed[j]`` of ``documents``."""
    ids = sorted(range(len(documents)) if ids is None else ids, key=lambda i: len(documents[i]))
    parts, group = [], []
    for i in ids + [None]:
        if group and (i is None or len(group) == DOCS_PER_GROUP or (len(group) + 1) * len(documents[i]) > SLOTS_PER_GROUP):
            parts.append(model.encode_documents(*pad_documents([documents[j] for j in group])))
            group = []
        if i is not None:
            group.append(i)
    return DocumentStates.cat(parts), torch.tensor(ids)


@torch.no_grad()
def rank_corpus(model: ParaformerRetriever, documents: list[Tensor], queries: Tensor, batch: int = 256) -> Tensor:
    """(Q, D) scores of ``queries`` against every document, in the order of ``documents``."""
    model.eval()
    states, placed = document_states(model, documents)
    out = torch.empty(len(queries), len(documents))
    for i in range(0, len(queries), batch):
        out[i:i + batch, placed] = model.score(queries[i:i + batch], states)
    return out


def hard_negatives(ctx, split: str = "train") -> list[list[int]]:
    """Per query of ``split``, BM25's top ``HARD_NEGATIVES`` licenses that are not relevant."""
    index = BM25Index(ctx.documents)
    relevant = ctx.relevant(split)
    out = []
    texts = ctx.queries(split)
    for s in range(0, len(texts), 1024):
        ranking = top_k(index.scores(texts[s:s + 1024]), HARD_NEGATIVES + 4)
        for row, rel in zip(ranking.tolist(), relevant[s:s + 1024]):
            out.append([d for d in row if d not in rel][:HARD_NEGATIVES])
    return out


def train_and_score(ctx):
    from .retrieval import SystemRun

    settings = ctx.settings
    views = ctx.views("short")
    documents, corpus_seconds = views.sentences(ctx.documents)
    queries = {}
    query_seconds = 0.0
    for split in ("train", "val", "test"):
        queries[split], s = views.trunc(ctx.queries(split))
        query_seconds += s
    relevant = {s: ctx.relevant(s) for s in ("train", "val", "test")}
    began = time.perf_counter()
    negatives = hard_negatives(ctx)
    config = ParaformerConfig(dim=queries["train"].shape[1], ffn_dim=FFN_DIM)
    steps = settings.paraformer_steps
    spec = RunSpec(out_dir=Path(settings.out) / "paraformer", seed=0, batch_size=BATCH, steps=steps,
                   identity={"config": asdict(config), "steps": steps, "batch": BATCH, "lr": LR,
                             "train_queries": len(queries["train"]), "corpus": len(documents)},
                   differs="the model, the steps or the data", optimizer={"lr": LR, "weight_decay": 0.01},
                   label="paraformer", progress=settings.progress, resume=settings.resume)
    trainer = start(spec, init_world("cpu"), lambda device: ParaformerRetriever(config, device=device))
    model = trainer.model  # one process: the whole corpus and every query are in memory here
    gen = torch.Generator()

    def step(i: int) -> Tensor:
        trainer.set_lr(warmup_cosine(LR, i, max(1, steps // 10), steps))
        batch = trainer.batch(len(queries["train"]), i).tolist()
        gen.manual_seed(i)
        candidates: list[int] = []
        for q in batch:
            pos = relevant["train"][q]
            candidates.append(pos[int(torch.randint(len(pos), (1,), generator=gen))])
            if negatives[q]:
                candidates.append(negatives[q][int(torch.randint(len(negatives[q]), (1,), generator=gen))])
        states, placed = document_states(model, documents, sorted(set(candidates)))
        column = {d: j for j, d in enumerate(placed.tolist())}
        scores = model.score(queries["train"][batch], states)
        positive = torch.zeros_like(scores, dtype=torch.bool)
        for r, q in enumerate(batch):
            for d in relevant["train"][q]:
                if d in column:
                    positive[r, column[d]] = True
        loss = (scores.logsumexp(1) - scores.masked_fill(~positive, -torch.inf).logsumexp(1)).mean()
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        return loss.detach()

    def evaluate(loss: float) -> dict:
        ranking = top_k(rank_corpus(model, documents, queries["val"]), 10)
        metrics = retrieval_metrics(ranking, relevant["val"])
        model.train()
        return {"train_loss": loss, "val_mrr10": float(metrics["MRR@10"].mean()),
                "val_r10": float(metrics["R@10"].mean())}

    trainer.train(step, evaluate, eval_every=max(1, steps // 5))
    trainer.finish({"history": trainer.run.history, "params": trainer.params, "config": asdict(config)})
    train_seconds = time.perf_counter() - began
    scores = rank_corpus(model, documents, queries["test"])
    return SystemRun(scores, {"corpus": corpus_seconds, "queries": query_seconds, "train": train_seconds},
                     {"history": trainer.run.history, "params": trainer.params, "config": asdict(config)})
