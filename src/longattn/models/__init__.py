"""Models built on longattn's attention: one family per file."""

from .bigbird import BigBirdConfig, BigBirdModel
from .encoder import EncoderConfig, SparseEncoderClassifier
from .etc import EtcConfig, EtcModel, EtcStructure, etc_structure
from .longformer import LongformerConfig, LongformerModel

__all__ = ["BigBirdConfig", "BigBirdModel", "EncoderConfig", "EtcConfig", "EtcModel", "EtcStructure", "LongformerConfig",
           "LongformerModel", "SparseEncoderClassifier", "etc_structure"]
