"""Models built on longattn's attention: one family per file."""

from .encoder import EncoderConfig, SparseEncoderClassifier
from .etc import EtcConfig, EtcModel, EtcStructure, etc_structure

__all__ = ["EncoderConfig", "EtcConfig", "EtcModel", "EtcStructure", "SparseEncoderClassifier", "etc_structure"]
