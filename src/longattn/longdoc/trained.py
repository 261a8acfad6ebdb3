"""The trained long encoders the benchmark reports beside the zero-shot ones, found in their run folders.

Three runs start from the converted MiniLM (``encoders.long_model_dir``), each in its own folder under the
benchmark's output, resumable (``longattn longdoc finetune`` / ``pretrain`` run the same functions with a
budget of the user's choosing):

- ``finetune-retrieval/``: contrastive fine-tuning on the train rules (``finetune.finetune_retrieval``); the
  retrieval system ``minilm-long-ft``.
- ``pretrain/``: continued masked-LM pretraining on the license texts (``pretrain.pretrain_mlm``); the
  retrieval system ``minilm-long-mlm`` and its classification probe. It answers whether the second half of
  the Longformer recipe changes retrieval.
- ``finetune-classification/``: the classification head fine-tuned with the encoder
  (``finetune.finetune_classifier``); the classification system ``minilm-long-ft``.

A system whose run has not finished trains it first at the default budget (``finetune.BUDGETS``: the 2-core
CPU budget the reported numbers come from, or the tiny ``quick`` one), so ``longattn longdoc run`` reproduces
the whole report; a finished run of any budget is used as it is, and its ``result.json`` states the budget.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..training.setup import MODEL_DIR, RESULT
from .encoders import long_model_dir
from .finetune import BUDGETS, HEAD_LR, finetune_classifier, finetune_retrieval
from .pretrain import pretrain_mlm
from .tasks import ClassificationTask, RetrievalTask

RUNS = {"retrieval": "finetune-retrieval", "classification": "finetune-classification", "pretrain": "pretrain"}
TRAINED_SYSTEMS = ("minilm-long-ft", "minilm-long-mlm")  # the systems (in either task) these runs feed


def run_dir(out: Path | str, which: str) -> Path:
    """The folder of run ``which`` (``retrieval``, ``classification`` or ``pretrain``) in the benchmark's
    output folder ``out``."""
    return Path(out) / RUNS[which]


def finished(out: Path | str, which: str) -> dict | None:
    """The finished run's ``result.json`` (in the output folder ``out``), or None."""
    path = run_dir(out, which) / RESULT
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("finished") else None


def default_budget(settings, which: str) -> dict:
    budget = asdict(BUDGETS[which]["quick" if settings.quick else "full"])
    if which == "pretrain":
        budget["seq_len"] = budget.pop("max_tokens")
    return budget


def source_dir(settings) -> Path:
    return long_model_dir(Path(settings.out) / "models", settings.max_length)


def pretrain_texts(task: RetrievalTask) -> list[str]:
    """Every license text of the corpus: label-free text of the documents both tasks read (transductive, as
    the recipe's continued pretraining on the target domain is); no query and no label."""
    return [lic.text for lic in task.corpus]


def train_retrieval(task: RetrievalTask, settings, *, source: Path | None = None, stop_after: int | None = None,
                    device="cpu", **budget) -> Path | None:
    """``finetune_retrieval`` into ``run_dir(settings.out, "retrieval")``; ``budget`` overrides the default's fields."""
    return finetune_retrieval(task, settings, source=source or source_dir(settings), out=run_dir(settings.out, "retrieval"),
                              stop_after=stop_after, device=device, **{**default_budget(settings, "retrieval"), **budget})


def train_pretrain(task: RetrievalTask, settings, *, source: Path | None = None, stop_after: int | None = None,
                   device="cpu", mask_prob: float = 0.15, head_warmup: int | None = None, **budget) -> Path | None:
    """``pretrain_mlm`` on ``pretrain_texts(task)`` into ``run_dir(settings.out, "pretrain")``."""
    return pretrain_mlm(pretrain_texts(task), source=source or source_dir(settings), out=run_dir(settings.out, "pretrain"),
                        mask_prob=mask_prob, head_warmup=head_warmup, head_lr=HEAD_LR, stop_after=stop_after,
                        device=device, progress=settings.progress, resume=settings.resume,
                        **{**default_budget(settings, "pretrain"), **budget})


def train_classification(task: ClassificationTask, settings, *, source: Path | None = None,
                         stop_after: int | None = None, device="cpu", head_warmup: int | None = None,
                         **budget) -> dict:
    """``finetune_classifier`` into ``run_dir(settings.out, "classification")``."""
    return finetune_classifier(task, settings, source=source or source_dir(settings),
                               out=run_dir(settings.out, "classification"), head_warmup=head_warmup,
                               stop_after=stop_after, device=device,
                               **{**default_budget(settings, "classification"), **budget})


def trained_model_dir(task: RetrievalTask, settings, which: str) -> Path:
    """The model directory of the finished ``retrieval`` or ``pretrain`` run, trained first if need be."""
    if finished(settings.out, which) is None:
        (train_retrieval if which == "retrieval" else train_pretrain)(task, settings)
    return run_dir(settings.out, which) / MODEL_DIR


def classifier_result(task: ClassificationTask, settings) -> dict:
    """The finished classification fine-tuning's result (trained first if need be)."""
    return finished(settings.out, "classification") or train_classification(task, settings)


__all__ = ["RUNS", "TRAINED_SYSTEMS", "classifier_result", "default_budget", "finished", "pretrain_texts", "run_dir", "source_dir",
           "train_classification", "train_pretrain", "train_retrieval", "trained_model_dir"]
