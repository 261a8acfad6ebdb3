"""Byte-level language modelling with Transformer-XL: corpora, training, evaluation, generation.

``longattn lm train|eval|generate|sweep`` is the command line; ``train_lm``, ``evaluate``, ``generate`` and
``run_sweep`` the API.
"""

from .corpus import Corpus, load_corpus, read_corpus, stdlib_corpus, unigram_bits_per_byte
from .evaluate import EvalResult, SpeedComparison, evaluate, evaluate_recompute, memory_speedup
from .generate import generate
from .sweep import run_sweep
from .train import LMRunConfig, TrainConfig, build_lm, load_lm, preset, train_lm

__all__ = ["Corpus", "EvalResult", "LMRunConfig", "SpeedComparison", "TrainConfig", "build_lm", "evaluate",
           "evaluate_recompute", "generate", "load_corpus", "load_lm", "memory_speedup", "preset", "read_corpus",
           "run_sweep", "stdlib_corpus", "train_lm", "unigram_bits_per_byte"]
