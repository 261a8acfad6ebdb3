"""Bridges to other libraries. Each submodule imports its library when it is imported itself (an optional
extra), so ``import longattn`` never imports them: ``from longattn.integrations import hf`` needs
``pip install 'longattn[hf]'``.

``SentenceEncoder`` (text -> embedding with a checkpoint directory's own pooling) is re-exported here; it
imports ``transformers`` only when a model is loaded.
"""

from .sentence_encoder import Chunks, Pooling, SentenceEncoder

__all__ = ["Chunks", "Pooling", "SentenceEncoder"]
