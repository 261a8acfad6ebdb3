"""Models built on longattn's attention: one family per file; ``create_model(name)`` builds named variants."""

from ._registry import create_model, default_config, list_models
from .bigbird import BigBirdConfig, BigBirdModel
from .botnet import BotNet, BotNetConfig, FeatureMaps
from .encoder import CombinerMixer, EncoderConfig, FITMixer, NSAMixer, SparseEncoderClassifier
from .etc import EtcConfig, EtcModel, EtcOutput, EtcStructure, etc_structure
from .fit import FIT, FITConfig, FITOutput
from .fit_lm import FITLM
from .longformer import LongformerConfig, LongformerModel
from .paraformer import DocumentStates, ParaformerConfig, ParaformerRetriever, pad_documents
from .xl import TransformerXL, XLConfig, XLOutput

__all__ = ["FIT", "FITLM", "BigBirdConfig", "BigBirdModel", "BotNet", "BotNetConfig", "CombinerMixer", "DocumentStates",
           "EncoderConfig", "EtcConfig", "EtcModel", "EtcOutput", "EtcStructure", "FITConfig", "FITMixer", "FITOutput",
           "NSAMixer",
           "FeatureMaps", "LongformerConfig", "LongformerModel", "ParaformerConfig", "ParaformerRetriever",
           "SparseEncoderClassifier", "TransformerXL", "XLConfig", "XLOutput", "create_model", "default_config",
           "etc_structure", "list_models", "pad_documents"]
