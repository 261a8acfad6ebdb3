"""Continued masked-LM pretraining of a converted long encoder: the second half of the Longformer recipe.

Beltagy et al. (2020, section 5) copy a short model's learned positions up to the new length
(``convert_to_long``) and then continue its masked-LM pretraining on long documents, so that the copied
positions and the sliding window adapt. ``pretrain_mlm`` does the second step for a converted directory:

- **packing**: the texts are tokenised without special tokens, joined with a SEP between documents and cut
  into sequences of ``seq_len - 2`` tokens, each wrapped in CLS ... SEP (RoBERTa's full-sentences packing:
  a sequence may span two documents); the tail shorter than a sequence is dropped;
- **masking** (BERT's): ``mask_prob`` of the tokens that are not special are chosen; of those 80% become
  MASK, 10% a random token that is not special, 10% stay; special tokens (CLS, SEP, PAD, UNK, MASK) are never
  chosen; the loss is cross entropy on the chosen tokens;
- **the head**: dense + GELU + LayerNorm + a decoder tied to the word embeddings + a bias (BERT's). It is new
  (all-MiniLM-L6-v2 ships no MLM head), so the first ``head_warmup`` steps train it alone at ``head_lr``
  with the encoder frozen (run without gradients, the tied decoder weight included), then everything at
  ``lr`` with warm-up + cosine;
- CLS attends globally, as the model is used (``SentenceEncoder``); gradient checkpointing; resumable
  through ``training.setup`` like ``longdoc.finetune``; the continued encoder, the head dropped, is written
  as a complete model directory to ``out/model`` (``finetune.save_model_dir``).

The history holds ``train_loss`` (MLM loss, mean since the last evaluation) and ``fixed_loss``, the MLM loss
of a fixed batch (the first sequences, masked with a fixed seed) in evaluation mode.

For the benchmark (``longattn longdoc pretrain``) the texts are every license text of the corpus: label-free
text of the very documents the tasks read, so this is transductive, as the recipe's continued pretraining on
the target domain is; no query and no label is read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..training.run import optimizer_step
from ..training.setup import RunSpec, start
from .finetune import (EVALS, GRAD_CLIP, HEAD_LR, WEIGHT_DECAY, check_head_warmup, complete_adam_state,
                       encoder_states, eval_interval, load_source, one_process, save_and_finish, two_phase_lr)

IGNORE = -100  # label of a token that is not predicted (cross_entropy's ignore_index)
FIXED_SEED = 12345  # the masking of the fixed evaluation batch


# ---- data ----------------------------------------------------------------------------------------------
def pack_sequences(token_ids: Sequence[Sequence[int]], seq_len: int, *, prefix: Sequence[int],
                   suffix: Sequence[int], separator: int) -> Tensor:
    """(S, seq_len) long: the documents' tokens (without special tokens) joined by ``separator``, cut into
    pieces of ``seq_len - len(prefix) - len(suffix)`` tokens, each wrapped in ``prefix`` ... ``suffix``; the
    last, shorter piece is dropped."""
    size = seq_len - len(prefix) - len(suffix)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or size < 1:
        raise ValueError(f"seq_len must be an int > {len(prefix) + len(suffix)} (the special tokens), got {seq_len!r}")
    stream: list[int] = []
    for i, ids in enumerate(token_ids):
        stream.extend(([separator] if i else []) + list(ids))
    pieces = [stream[s:s + size] for s in range(0, len(stream) - size + 1, size)]
    return torch.tensor([[*prefix, *p, *suffix] for p in pieces], dtype=torch.long).reshape(len(pieces), seq_len)


def mask_tokens(ids: Tensor, *, special_ids: Sequence[int], mask_id: int, vocab_size: int, mask_prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masking of (B, N) token ids -> (inputs (B, N), labels (B, N)).

    Each token that is not in ``special_ids`` is chosen with probability ``mask_prob``; a chosen token becomes
    ``mask_id`` (80%), a random id of ``[0, vocab_size)`` that is not special (10%) or stays (10%). Labels are
    the original id where chosen, ``IGNORE`` (-100) elsewhere.
    """
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob!r}")
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    candidates = allowed.nonzero().squeeze(1)  # (V',) ids a random replacement may take
    if not len(candidates):
        raise ValueError(f"vocab_size {vocab_size} leaves no id that is not special")
    u = torch.rand(ids.shape, generator=generator)  # (B, N) chooses
    v = torch.rand(ids.shape, generator=generator)  # (B, N) what a chosen token becomes
    chosen = (u < mask_prob) & ~torch.isin(ids, special)
    randoms = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]
    inputs = torch.where(chosen & (v < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (v >= 0.8) & (v < 0.9), randoms, inputs)
    return inputs, torch.where(chosen, ids, torch.full_like(ids, IGNORE))


# ---- modules -------------------------------------------------------------------------------------------
class MLMHead(nn.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, then a decoder tied to the word embeddings + bias."""

    def __init__(self, hidden_size: int, vocab_size: int, *, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dense = nn.Linear(hidden_size, hidden_size, **factory)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **factory)
        self.bias = nn.Parameter(torch.empty(vocab_size, **factory))
        self.initializer_range = initializer_range
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.dense.weight, std=self.initializer_range)
        nn.init.zeros_(self.dense.bias)
        self.LayerNorm.reset_parameters()
        nn.init.zeros_(self.bias)

    def forward(self, states: Tensor, embeddings: Tensor) -> Tensor:
        """(M, C) token states and the (V, C) word embeddings -> (M, V) logits."""
        return F.linear(self.LayerNorm(F.gelu(self.dense(states))), embeddings, self.bias)


class MaskedLM(nn.Module):
    """An encoder and its ``MLMHead``; ``forward`` returns the mean MLM loss of the chosen tokens."""

    def __init__(self, encoder: nn.Module, *, device=None, dtype=None):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        self.head = MLMHead(cfg.hidden_size, encoder.embeddings.word_embeddings.num_embeddings,
                            layer_norm_eps=cfg.layer_norm_eps, initializer_range=cfg.initializer_range,
                            device=device, dtype=dtype)

    def forward(self, inputs: Tensor, labels: Tensor, *, frozen: bool = False) -> Tensor:
        """(B, N) masked ids and labels (``IGNORE`` where not chosen) -> scalar loss; ``frozen`` runs the
        encoder without gradients and detaches the tied decoder weight (only the head learns)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            states = encoder_states(self.encoder, inputs, torch.ones_like(inputs))  # (B, N, C)
        chosen = labels != IGNORE
        weight = self.encoder.embeddings.word_embeddings.weight
        logits = self.head(states[chosen], weight.detach() if frozen else weight)  # (M, V)
        if not bool(chosen.any()):  # nothing chosen in this batch: a zero that still reaches the head
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels[chosen])


# ---- the run -------------------------------------------------------------------------------------------
def pretrain_mlm(texts: list[str], *, source: Path | str, out: Path | str, steps: int, seq_len: int, batch_size: int,
                 lr: float, evals: int = EVALS, mask_prob: float = 0.15, head_warmup: int | None = None,
                 head_lr: float = HEAD_LR,
                 stop_after: int | None = None, seed: int = 0, device="cpu", progress: bool = True,
                 resume: bool = True) -> Path | None:
    """Continue ``source``'s masked-LM pretraining on ``texts`` (see the module docstring) and write the
    continued encoder to ``out/model``; returns that path, or None when ``stop_after`` ended the run early
    (run again to resume). ``head_warmup`` defaults to ``steps // 5``. ``out/result.json`` holds the MLM loss
    history and the budget (steps, sequences of ``seq_len`` tokens, tokens seen, seconds)."""
    source, out = Path(source), Path(out)
    head_warmup = check_head_warmup(head_warmup, steps)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    encoder = load_source(source, max_tokens=seq_len, device=device, name="seq_len")
    tok = encoder.tokenizer
    ids = tok(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if texts else []
    sequences = pack_sequences(ids, seq_len, prefix=[tok.cls_token_id], suffix=[tok.sep_token_id],
                               separator=tok.sep_token_id)  # (S, seq_len)
    if len(sequences) < batch_size:
        raise ValueError(f"texts hold {sum(map(len, ids))} tokens: {len(sequences)} sequences of seq_len={seq_len}, "
                         f"fewer than batch_size={batch_size}")
    masking = dict(special_ids=tok.all_special_ids, mask_id=tok.mask_token_id, vocab_size=len(tok), mask_prob=mask_prob)
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    spec = RunSpec(out_dir=out, seed=seed, batch_size=batch_size, steps=steps,
                   identity={"task": "mlm", "source": encoder.fingerprint, "texts": digest, "steps": steps,
                             "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "mask_prob": mask_prob,
                             "head_warmup": head_warmup, "head_lr": head_lr},
                   differs="the source model, the budget or the texts",
                   optimizer={"lr": lr, "weight_decay": WEIGHT_DECAY}, label="pretrain mlm", progress=progress,
                   resume=resume)
    trainer = start(spec, one_process(device), lambda dev: MaskedLM(encoder.model, device=dev))
    complete_adam_state(trainer.optimizer)
    model, dev = trainer.model, trainer.world.device
    fixed = mask_tokens(sequences[:batch_size], generator=torch.Generator().manual_seed(FIXED_SEED), **masking)
    gen = torch.Generator()

    def step(i: int) -> Tensor:
        trainer.set_lr(two_phase_lr(i, steps=steps, lr=lr, head_warmup=head_warmup, head_lr=head_lr))
        gen.manual_seed(seed * 1_000_003 + i)  # a function of the step: a resumed run masks the same tokens
        inputs, labels = mask_tokens(sequences[trainer.batch(len(sequences), i)], generator=gen, **masking)
        loss = model(inputs.to(dev), labels.to(dev), frozen=i < head_warmup)
        optimizer_step(trainer.net, trainer.optimizer, loss, GRAD_CLIP)
        return loss.detach()

    def evaluate(loss: float) -> dict:
        model.eval()
        with torch.no_grad():
            fixed_loss = float(model(fixed[0].to(dev), fixed[1].to(dev)))
        model.train()
        return {"train_loss": loss, "fixed_loss": fixed_loss, "lr": trainer.optimizer.param_groups[0]["lr"]}

    if not trainer.train(step, evaluate, eval_every=eval_interval(steps, evals), stop_after=stop_after):
        return None
    return save_and_finish(trainer, model.encoder, source, out, sequences=len(sequences),
                           budget={"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
                                   "head_warmup": head_warmup, "tokens": steps * batch_size * seq_len,
                                   "seconds": trainer.run.seconds})


__all__ = ["IGNORE", "MLMHead", "MaskedLM", "mask_tokens", "pack_sequences", "pretrain_mlm"]
