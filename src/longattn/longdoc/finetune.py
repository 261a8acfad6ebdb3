"""Fine-tuning the long encoder on the LicenseDB tasks: contrastive retrieval and a classification head.

Both start from a model directory ``source`` (what ``longattn convert --to-long`` writes; any directory that
``SentenceEncoder.load`` reads) and embed as ``SentenceEncoder`` does: the model's token states, pooled and
normalised by the directory's own ``Pooling`` (mean + L2 for all-MiniLM-L6-v2), CLS global on a Longformer.
Every text, query or license, is tokenised with its special tokens and **cut to its first ``max_tokens``
tokens** (CLS and SEP included): that, the steps and the training seconds are the budget each result states.

**Retrieval** (``finetune_retrieval``): a step takes ``batch_size`` train queries (rules) and one relevant
license of each, drawn at random; queries and licenses go through the same model, and the loss is InfoNCE
over the in-batch licenses at the fixed temperature ``TEMPERATURE``, ``logsumexp(all) - logsumexp(relevant)``
per query, so a license relevant to two queries of the batch is a positive of both. Validation is the same
loss on a fixed batch of ``VAL_QUERIES`` val queries and their first relevant license (MRR over the whole
corpus would encode every license at each evaluation). The model is written as a complete directory,
``out/model`` (``save_model_dir``), which ``SentenceEncoder.load`` reads.

**Classification** (``finetune_classifier``): a linear head on the sentence embedding, class-weighted cross
entropy. The head is new, so the first ``head_warmup`` steps train it alone at ``head_lr`` (the encoder frozen
and run without gradients, a linear probe), then everything at ``lr``: LP-FT (Kumar et al., 2022), which
keeps a random head from tearing the pretrained features. Validation: F1 on the val split.

Both run in one process through the shared trainer (``training.setup``): gradient checkpointing, AdamW with
gradient clipping, warm-up + cosine learning rate, a checkpoint at each of the ``evals`` evaluations; a run
killed (or stopped on purpose with ``stop_after``) resumes to the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from ..integrations.convert import TOKENIZER_FILES, copy_sentence_modules
from ..integrations.sentence_encoder import Pooling, SentenceEncoder
from ..models.longformer import LongformerModel
from ..training.distributed import World, init_world
from ..training.run import optimizer_step, warmup_cosine
from ..training.setup import MODEL_DIR, RunSpec, Trainer, start
from .metrics import f1_scores
from .tasks import ClassificationTask, RetrievalTask

if TYPE_CHECKING:
    from .retrieval import Settings

TEMPERATURE = 0.05  # fixed InfoNCE temperature on cosine scores (sentence-transformers' MNRL uses 1/20)
VAL_QUERIES = 16  # the fixed validation batch of retrieval
TOKENS_PER_GROUP = 16384  # padded tokens per forward pass: a batch is run in groups of similar length
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
HEAD_LR = 1e-3  # a new head's learning rate while it trains alone
EVALS = 10  # evaluations (and checkpoints) per run


@dataclass(frozen=True)
class Budget:
    """What a run may spend."""

    steps: int
    batch_size: int  # texts (queries, documents, packed sequences) per step
    max_tokens: int  # tokens per text, special tokens included (pretraining: per packed sequence)
    lr: float
    evals: int = EVALS  # evaluations (and checkpoints) in the run


#: ``longattn longdoc finetune/pretrain``'s defaults and what ``longdoc run`` trains. "full": the 2-core CPU
#: budget of the reported numbers, about 20 minutes each on a 2-core AMD EPYC (fp32 matmul ~190 GFLOP/s);
#: "quick": seconds, for --quick
BUDGETS = {
    "retrieval": {"full": Budget(60, 8, 1024, 2e-5), "quick": Budget(6, 4, 256, 2e-5, evals=2)},
    "classification": {"full": Budget(80, 8, 2048, 2e-5, evals=2), "quick": Budget(6, 4, 256, 2e-5, evals=2)},
    "pretrain": {"full": Budget(80, 2, 4096, 5e-5), "quick": Budget(6, 2, 256, 5e-5, evals=2)},
}


# ---- helpers -------------------------------------------------------------------------------------------
def load_source(source: Path | str, *, max_tokens: int, device="cpu", name: str = "max_tokens") -> SentenceEncoder:
    """The encoder of ``source`` with gradient checkpointing on; ``ValueError`` (naming the argument ``name``)
    unless ``max_tokens`` fits its positions."""
    encoder = SentenceEncoder.load(source, device=device)
    least = encoder.tokenizer.num_special_tokens_to_add() + 1
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not least <= max_tokens <= encoder.max_length:
        raise ValueError(f"{name} must be an int in [{least}, {encoder.max_length}] (tokens per text, special "
                         f"tokens included, up to the model's positions), got {max_tokens!r}")
    # Hugging Face models now call it activation checkpointing (the old name warns); longattn's keep the old name
    model = encoder.model
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return encoder


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text's first ``max_tokens`` token ids, its special tokens included (CLS ... SEP)."""
    if not texts:
        return []
    return tokenizer(list(texts), truncation=True, max_length=max_tokens, verbose=False)["input_ids"]


def encoder_states(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """(B, N) ids and 1/0 mask -> (B, N, C) token states; a Longformer's CLS attends globally, as in
    ``SentenceEncoder``."""
    if isinstance(model, LongformerModel):
        flags = torch.zeros_like(mask)
        flags[:, 0] = 1
        return model(ids, attention_mask=mask, global_attention_mask=flags).last_hidden_state
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


def save_model_dir(model: nn.Module, source: Path | str, dst: Path | str) -> Path:
    """Write ``model`` (its ``save_pretrained``: ``config.json`` + ``model.safetensors``) to ``dst`` with
    ``source``'s tokenizer files, ``modules.json`` and the module folders it names (pooling, normalisation),
    so that ``SentenceEncoder.load(dst)`` embeds as ``source`` does, with the new weights."""
    source, dst = Path(source), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dst / name)
    copy_sentence_modules(source, dst)
    return dst


def multi_positive_infonce(scores: Tensor, positive: Tensor) -> Tensor:
    """Mean over queries of ``logsumexp(scores[i]) - logsumexp(scores[i, positive[i]])``: (Q, D) scores and a
    (Q, D) bool mask with at least one positive per row -> a scalar."""
    if positive.shape != scores.shape or positive.dtype != torch.bool:
        raise ValueError(f"positive must be a bool tensor of the scores' shape {tuple(scores.shape)}, got "
                         f"{positive.dtype} {tuple(positive.shape)}")
    if not bool(positive.any(1).all()):
        raise ValueError("every query (row of positive) needs at least one positive document")
    return (scores.logsumexp(1) - scores.masked_fill(~positive, -torch.inf).logsumexp(1)).mean()


def two_phase_lr(step: int, *, steps: int, lr: float, head_warmup: int, head_lr: float) -> float:
    """``head_lr`` while the head trains alone (steps < ``head_warmup``), then warm-up + cosine to ``lr``."""
    if step < head_warmup:
        return head_lr
    rest = steps - head_warmup
    return warmup_cosine(lr, step - head_warmup, max(1, rest // 10), rest)


def check_head_warmup(head_warmup: int | None, steps: int) -> int:
    head_warmup = steps // 5 if head_warmup is None else head_warmup
    if isinstance(head_warmup, bool) or not isinstance(head_warmup, int) or not 0 <= head_warmup <= steps:
        raise ValueError(f"head_warmup must be an int in [0, steps={steps}], got {head_warmup!r}")
    return head_warmup


def complete_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter without one the zero AdamW state it would get at its first gradient.

    The trainer's checkpoint (``torch.distributed.checkpoint`` state dicts) refuses to restore a parameter
    that requires grad but has no optimizer state: the pooler, which pooling never reads, and the encoder
    while a new head trains alone. Zero moments at step 0 are AdamW's own lazy initialisation, so the
    steps taken do not change; a resumed run gets the state back from its checkpoint."""
    for group in optimizer.param_groups:
        assert not (group.get("fused") or group.get("capturable") or group.get("amsgrad")), "plain AdamW expected"
        for p in group["params"]:
            if p.requires_grad and not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def eval_interval(steps: int, evals: int) -> int:
    """Steps between evaluations for ``evals`` of them in ``steps``; ``ValueError`` unless evals >= 1."""
    if isinstance(evals, bool) or not isinstance(evals, int) or evals < 1:
        raise ValueError(f"evals must be an int >= 1, got {evals!r}")
    return max(1, steps // evals)


def one_process(device) -> World:
    world = init_world(device)
    if world.size > 1:  # in-batch negatives and the unused pooler would need more than DDP gives
        raise ValueError(f"fine-tuning and pretraining run in one process, not {world.size} (no torchrun)")
    return world


# ---- modules -------------------------------------------------------------------------------------------
class SentenceEmbedder(nn.Module):
    """A trainable sentence embedding: ``encoder``'s token states pooled (and normalised) by ``pooling``."""

    def __init__(self, encoder: nn.Module, pooling: Pooling, pad_id: int):
        super().__init__()
        self.encoder, self.pooling, self.pad_id = encoder, pooling, pad_id

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, N) ids and 1/0 mask -> (B, C) float32 embeddings."""
        return self.pooling.finish(self.pooling(encoder_states(self.encoder, ids, mask).float(), mask))

    def embed(self, windows: list[list[int]], *, tokens_per_group: int = TOKENS_PER_GROUP) -> Tensor:
        """(n, C) embeddings of token-id lists (special tokens included), run longest first in groups of at
        most ``tokens_per_group`` padded tokens (always one list), so that little is padded."""
        device = next(self.parameters()).device
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
        parts, i = [], 0
        while i < len(order):
            rows = order[i:i + max(1, tokens_per_group // len(windows[order[i]]))]
            ids = torch.full((len(rows), len(windows[rows[0]])), self.pad_id, dtype=torch.long)  # (B, N)
            mask = torch.zeros_like(ids)
            for r, j in enumerate(rows):
                ids[r, :len(windows[j])] = torch.tensor(windows[j])
                mask[r, :len(windows[j])] = 1
            parts.append(self(ids.to(device), mask.to(device)))
            i += len(rows)
        out = torch.cat(parts)  # (n, C) in ``order``
        return out[torch.argsort(torch.tensor(order, device=out.device))]


class PooledClassifier(nn.Module):
    """A linear head on a ``SentenceEmbedder``'s embedding."""

    def __init__(self, embedder: SentenceEmbedder, classes: int, *, device=None, dtype=None):
        super().__init__()
        self.embedder = embedder
        self.head = nn.Linear(embedder.encoder.config.hidden_size, classes, device=device, dtype=dtype)

    def forward(self, windows: list[list[int]], *, frozen: bool = False) -> Tensor:
        """(n, K) logits of token-id lists; ``frozen`` runs the encoder without gradients (only the head learns)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            x = self.embedder.embed(windows)
        return self.head(x)


# ---- retrieval -----------------------------------------------------------------------------------------
@dataclass
class PairBatch:
    """Queries and the distinct licenses drawn for them, as token ids."""

    queries: list[list[int]]
    documents: list[list[int]]
    positive: Tensor  # (Q, D) bool: document j is relevant to query i


def pair_batch(query_ids: list[list[int]], relevant: list[list[int]], picked: list[int],
               document_ids: dict[int, list[int]]) -> PairBatch:
    """The batch of queries ``query_ids`` with relevant corpus indices ``relevant`` and the picked license of
    each (``picked``, corpus indices whose tokens ``document_ids`` holds); a license picked twice is one column."""
    docs = sorted(set(picked))
    column = {d: j for j, d in enumerate(docs)}
    positive = torch.zeros(len(query_ids), len(docs), dtype=torch.bool)
    for r, rel in enumerate(relevant):
        for d in rel:
            if d in column:
                positive[r, column[d]] = True
    return PairBatch(query_ids, [document_ids[d] for d in docs], positive)


def contrastive_loss(model: SentenceEmbedder, batch: PairBatch) -> Tensor:
    """InfoNCE of the batch's queries over its licenses (cosine / ``TEMPERATURE``), several positives allowed."""
    scores = model.embed(batch.queries) @ model.embed(batch.documents).T / TEMPERATURE  # (Q, D)
    return multi_positive_infonce(scores, batch.positive.to(scores.device))


def _budget(trainer: Trainer, batch_size: int, max_tokens: int, lr: float, **more) -> dict:
    return {"steps": trainer.spec.steps, "batch_size": batch_size, "max_tokens": max_tokens, "lr": lr,
            "seconds": trainer.run.seconds, **more}


def finetune_retrieval(task: RetrievalTask, settings: Settings, *, source: Path | str, steps: int, batch_size: int,
                       max_tokens: int, lr: float, out: Path | str, evals: int = EVALS, stop_after: int | None = None,
                       seed: int = 0, device="cpu") -> Path | None:
    """Fine-tune ``source`` contrastively on ``task``'s train queries (see the module docstring) and write it to
    ``out/model``; returns that path, or None when ``stop_after`` ended the run early (run again to resume).

    ``out`` also receives ``checkpoint.safetensors`` and ``result.json`` (the loss history: ``train_loss``,
    the mean since the last evaluation, and ``val_loss`` on the fixed val batch; the budget).
    """
    source, out = Path(source), Path(out)
    encoder = load_source(source, max_tokens=max_tokens, device=device)
    train, val = task.queries["train"], task.queries["val"][:VAL_QUERIES]
    index = task.index()
    relevant = [[index[k] for k in q.relevant] for q in train]
    documents = [lic.text for lic in task.corpus]
    spec = RunSpec(out_dir=out, seed=seed, batch_size=batch_size, steps=steps,
                   identity={"task": "retrieval", "source": encoder.fingerprint, "steps": steps, "lr": lr,
                             "batch_size": batch_size, "max_tokens": max_tokens, "temperature": TEMPERATURE,
                             "train_queries": len(train), "corpus": len(documents),
                             "first_queries": [q.name for q in train[:5]]},
                   differs="the source model, the budget or the data",
                   optimizer={"lr": lr, "weight_decay": WEIGHT_DECAY}, label="finetune retrieval",
                   progress=settings.progress, resume=settings.resume)
    pad = encoder.tokenizer.pad_token_id or 0
    trainer = start(spec, one_process(device), lambda _: SentenceEmbedder(encoder.model, encoder.pooling, pad))
    complete_adam_state(trainer.optimizer)
    model = trainer.model

    def batch_of(queries, rel, picked) -> PairBatch:
        docs = sorted(set(picked))
        tokens = dict(zip(docs, tokenize(encoder.tokenizer, [documents[d] for d in docs], max_tokens)))
        return pair_batch(tokenize(encoder.tokenizer, [q.text for q in queries], max_tokens), rel, picked, tokens)

    val_rel = [[index[k] for k in q.relevant] for q in val]
    val_batch = batch_of(val, val_rel, [rel[0] for rel in val_rel]) if val else None
    gen = torch.Generator()

    def step(i: int) -> Tensor:
        trainer.set_lr(warmup_cosine(lr, i, max(1, steps // 10), steps))
        rows = trainer.batch(len(train), i).tolist()
        gen.manual_seed(seed * 1_000_003 + i)  # a function of the step: a resumed run draws the same licenses
        picked = [relevant[q][int(torch.randint(len(relevant[q]), (1,), generator=gen))] for q in rows]
        loss = contrastive_loss(model, batch_of([train[q] for q in rows], [relevant[q] for q in rows], picked))
        optimizer_step(trainer.net, trainer.optimizer, loss, GRAD_CLIP)
        return loss.detach()

    def evaluate(loss: float) -> dict:
        val_loss = None
        if val_batch is not None:
            model.eval()
            with torch.no_grad():
                val_loss = float(contrastive_loss(model, val_batch))
            model.train()
        return {"train_loss": loss, "val_loss": val_loss, "lr": trainer.optimizer.param_groups[0]["lr"]}

    if not trainer.train(step, evaluate, eval_every=eval_interval(steps, evals), stop_after=stop_after):
        return None
    return save_and_finish(trainer, model.encoder, source, out,
                           budget=_budget(trainer, batch_size, max_tokens, lr, val_queries=len(val)))


def save_and_finish(trainer, encoder, source: Path, out: Path, **result) -> Path:
    """Write the trained encoder as a complete model directory (``out/model``, from the main process) and the
    run's ``result.json``; returns the directory."""
    path = out / MODEL_DIR
    if trainer.world.main:
        save_model_dir(encoder, source, path)
    trainer.finish({"finished": True, "config": trainer.identity, "model": str(path), "source": str(source),
                    "history": trainer.run.history, "params": trainer.params, **result})
    return path


# ---- classification ------------------------------------------------------------------------------------
def class_weights(targets: Tensor, classes: int) -> Tensor:
    """(K,) ``n / (present classes * count)`` per class (0 for a class absent from ``targets``)."""
    counts = torch.bincount(targets, minlength=classes).double()
    present = int((counts > 0).sum())
    return torch.where(counts > 0, len(targets) / (present * counts.clamp_min(1)), 0.0).float()


@torch.no_grad()
def predict(model: PooledClassifier, windows: list[list[int]]) -> Tensor:
    """(n,) argmax labels, the model in evaluation mode meanwhile."""
    was = model.training
    model.eval()
    labels = model(windows).argmax(-1).cpu() if windows else torch.empty(0, dtype=torch.long)
    model.train(was)
    return labels


def finetune_classifier(task: ClassificationTask, settings: Settings, *, source: Path | str, steps: int,
                        batch_size: int, max_tokens: int, lr: float, out: Path | str, evals: int = EVALS,
                        head_warmup: int | None = None, head_lr: float = HEAD_LR, stop_after: int | None = None,
                        seed: int = 0, device="cpu") -> dict:
    """Fine-tune ``source`` with a linear head on ``task``'s train licenses (see the module docstring).

    ``head_warmup`` (default ``steps // 5``) steps train the head alone at ``head_lr``. Returns ``{"predicted":
    [label index per test license, in task.labels], "gold", "micro_f1", "macro_f1", "val", "history",
    "budget", ...}``, also written to ``out/result.json``; when ``stop_after`` ended the run early,
    ``{"finished": False, "predicted": None, "history", "budget"}`` (run again to resume).
    """
    out = Path(out)
    head_warmup = check_head_warmup(head_warmup, steps)
    encoder = load_source(source, max_tokens=max_tokens, device=device)
    classes = len(task.labels)
    windows = {s: tokenize(encoder.tokenizer, [lic.text for lic in task.documents[s]], max_tokens)
               for s in ("train", "val", "test")}
    targets = {s: torch.tensor(task.targets(s), dtype=torch.long) for s in ("train", "val", "test")}
    weights = class_weights(targets["train"], classes)
    spec = RunSpec(out_dir=out, seed=seed, batch_size=batch_size, steps=steps,
                   identity={"task": "classification", "source": encoder.fingerprint, "steps": steps, "lr": lr,
                             "batch_size": batch_size, "max_tokens": max_tokens, "head_warmup": head_warmup,
                             "head_lr": head_lr, "labels": task.labels,
                             "sizes": {s: len(w) for s, w in windows.items()}},
                   differs="the source model, the budget or the data",
                   optimizer={"lr": lr, "weight_decay": WEIGHT_DECAY}, label="finetune classification",
                   progress=settings.progress, resume=settings.resume)
    pad = encoder.tokenizer.pad_token_id or 0
    trainer = start(spec, one_process(device), lambda dev: PooledClassifier(
        SentenceEmbedder(encoder.model, encoder.pooling, pad), classes, device=dev))
    complete_adam_state(trainer.optimizer)
    model = trainer.model
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(trainer.world.device))

    def step(i: int) -> Tensor:
        trainer.set_lr(two_phase_lr(i, steps=steps, lr=lr, head_warmup=head_warmup, head_lr=head_lr))
        rows = trainer.batch(len(windows["train"]), i).tolist()
        logits = model([windows["train"][r] for r in rows], frozen=i < head_warmup)
        loss = loss_fn(logits, targets["train"][rows].to(logits.device))
        optimizer_step(trainer.net, trainer.optimizer, loss, GRAD_CLIP)
        return loss.detach()

    def val_scores() -> dict | None:
        return f1_scores(predict(model, windows["val"]), targets["val"]) if windows["val"] else None

    def evaluate(loss: float) -> dict:
        val = val_scores() or {}
        return {"train_loss": loss, **{f"val_{k}": v for k, v in val.items()},
                "lr": trainer.optimizer.param_groups[0]["lr"]}

    def budget(**more) -> dict:
        return _budget(trainer, batch_size, max_tokens, lr, head_warmup=head_warmup, head_lr=head_lr, **more)

    if not trainer.train(step, evaluate, eval_every=eval_interval(steps, evals), stop_after=stop_after):
        return {"finished": False, "predicted": None, "history": trainer.run.history, "budget": budget()}
    began = time.perf_counter()
    predicted = predict(model, windows["test"])
    scores = f1_scores(predicted, targets["test"]) if len(predicted) else {}
    result = {"finished": True, "config": trainer.identity, "labels": task.labels, "predicted": predicted.tolist(),
              "gold": targets["test"].tolist(), **scores, "val": val_scores(), "history": trainer.run.history,
              "params": trainer.params, "source": str(source),
              "budget": budget(predict_seconds=time.perf_counter() - began)}
    return trainer.finish(result)


__all__ = ["BUDGETS", "Budget", "PairBatch", "PooledClassifier", "SentenceEmbedder", "class_weights",
           "complete_adam_state", "contrastive_loss", "encoder_states", "finetune_classifier", "finetune_retrieval",
           "load_source", "multi_positive_infonce", "pair_batch", "predict", "save_model_dir", "tokenize",
           "two_phase_lr"]
