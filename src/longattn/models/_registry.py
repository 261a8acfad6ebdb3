"""Named model variants: ``create_model("bigbird-roberta-base")`` builds one with fresh weights.

Each entry is a model class and its config, the published sizes of the paper's checkpoints; keyword
overrides replace config fields (``create_model("longformer-base-4096", num_hidden_layers=6)``). To load
trained weights use the class's ``from_pretrained`` on a checkpoint directory instead.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from .bigbird import BigBirdConfig, BigBirdModel
from .botnet import BotNet, BotNetConfig
from .etc import EtcConfig, EtcModel
from .longformer import LongformerConfig, LongformerModel
from .renames import rename_hint
from .xl import TransformerXL, XLConfig

_ROBERTA = dict(vocab_size=50265, pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5)
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

_MODELS: dict[str, tuple[type[nn.Module], Callable[[], object]]] = {
    # allenai/longformer-{base,large}-4096: RoBERTa sizes, window 512, 4096 positions (+2 for the offset)
    "longformer-base-4096": (LongformerModel, lambda: LongformerConfig(**_ROBERTA, max_position_embeddings=4098)),
    "longformer-large-4096": (LongformerModel,
                              lambda: LongformerConfig(**_ROBERTA, **_LARGE, max_position_embeddings=4098)),
    # google/bigbird-roberta-{base,large}: block 64, 3 random blocks, 4096 positions
    "bigbird-roberta-base": (BigBirdModel, lambda: BigBirdConfig()),
    "bigbird-roberta-large": (BigBirdModel, lambda: BigBirdConfig(**_LARGE)),
    # ETC-base (Ainslie et al. 2020, Table 1): BERT vocabulary and sizes, radius 84, k = 12
    "etc-base": (EtcModel, lambda: EtcConfig(vocab_size=30522)),
    "etc-large": (EtcModel, lambda: EtcConfig(vocab_size=30522, dim=1024, depth=24, heads=16, ffn_dim=4096,
                                              local_radius=169)),
    # Transformer-XL's enwik8 base model (Dai et al. 2019): 12 layers, 512 wide, 8 heads, segments and memory
    # of 512 bytes; "small" is the 4-layer, 256-wide model that `longattn lm train --preset small` trains
    "transformer-xl-enwik8-base": (TransformerXL, lambda: XLConfig(dim=512, depth=12, heads=8, ffn_dim=2048,
                                                                   seg_len=512, mem_len=512)),
    "transformer-xl-small": (TransformerXL, lambda: XLConfig(dim=256, depth=4, heads=4, seg_len=256, mem_len=256)),
    # BoTNet (Srinivas et al. 2021): ResNet-50 and BoT50 (MHSA in c5, 4 heads), 224 x 224 ImageNet sizes;
    # the S1 models keep c5 at stride 1, with the paper's block counts for c2..c5 (T3 = S1-59, T4 = S1-110,
    # T5 = S1-128, T6 = S1-77) but plain bottlenecks (its T-series adds SE and SiLU, not built here)
    "resnet50": (BotNet, lambda: BotNetConfig(attention=False)),
    "botnet50": (BotNet, lambda: BotNetConfig()),
    "botnet50-s1": (BotNet, lambda: BotNetConfig(c5_stride=1)),
    "botnet-s1-59": (BotNet, lambda: BotNetConfig(layers=(3, 4, 6, 6), c5_stride=1)),
    "botnet-s1-77": (BotNet, lambda: BotNetConfig(layers=(3, 4, 6, 12), c5_stride=1)),
    "botnet-s1-110": (BotNet, lambda: BotNetConfig(layers=(3, 4, 23, 6), c5_stride=1)),
    "botnet-s1-128": (BotNet, lambda: BotNetConfig(layers=(3, 4, 23, 12), c5_stride=1)),
}


def list_models() -> list[str]:
    return sorted(_MODELS)


def default_config(name: str):
    """The config of a named model (a fresh copy)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _MODELS[name][1]()


def create_model(name: str, *, backend: str = "auto", device=None, dtype=None, **overrides) -> nn.Module:
    """A named model with fresh weights; ``overrides`` replace fields of its config."""
    config = default_config(name)
    cls = _MODELS[name][0]
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        kind = type(config).__name__
        raise ValueError(f"{kind} has no field {unknown[0]!r}{rename_hint(kind, unknown[0])}")
    return cls(dataclasses.replace(config, **overrides), backend=backend, device=device, dtype=dtype)
