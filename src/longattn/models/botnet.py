"""BoTNet (Srinivas et al. 2021, "Bottleneck Transformers for Visual Recognition") and its ResNet-50 baseline.

BoT50 is ResNet-50 whose three c5 bottleneck blocks replace the 3x3 convolution with multi-head
self-attention (4 heads, split relative positions: ``modules.BottleneckAttention2d``). The first c5 block
downsamples by a 2x2 average pool after the attention; BoT-S1 models keep c5 at stride 1 (output stride 16).
With ``attention=False`` the same class is ResNet-50 v1.5 (stride on the 3x3 convolution), with
torchvision's parameter names, so its state dicts load.

Stages (strides for a stride-2 c5; c5 of an S1 model has stride 16)::

    stem: 7x7/2 conv, BN, ReLU, 3x3/2 max pool           (width)            stride 4
    c2: layers[0] bottlenecks, width    -> 4 x width                          stride 4
    c3: layers[1] bottlenecks, 2 width  -> 8 x width                          stride 8
    c4: layers[2] bottlenecks, 4 width  -> 16 x width                         stride 16
    c5: layers[3] bottlenecks, 8 width  -> 32 x width (MHSA blocks in BoTNet)  stride 32
    head: global average pool, linear classifier
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from ..modules.bottleneck_attention import RESIZE, BottleneckAttention2d, as_pair
from . import hf_checkpoint as ckpt
from .config_fields import check_fields

EXPANSION = 4  # a bottleneck's output channels over its inner width


@dataclass
class BotNetConfig:
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # bottleneck blocks in c2..c5 (ResNet-50)
    attention: bool = True  # MHSA instead of the 3x3 convolution in every c5 block; False = ResNet
    width: int = 64  # stem and c2 inner width; stages double it (scaled-down models use less)
    num_classes: int = 1000  # classifier outputs; 0 = no classifier (forward returns pooled features)
    in_chans: int = 3  # input image channels
    heads: int = 4  # MHSA heads (the paper: 4)
    c5_stride: int = 2  # 2 = BoT50; 1 = BoT-S1 (c5 keeps c4's resolution)
    image_size: int | tuple[int, int] = 224  # the input the relative tables are sized for; others work too
    radius: int | None = None  # None = global MHSA (the paper); int = 2-D local window of this radius
    resize: str = "interpolate"  # how relative tables grow on larger maps ("interpolate" or "clamp")
    zero_init_last: bool = True  # each block's last BN starts at 0, so every block starts as identity

    def __post_init__(self):
        check_fields(self, minimum={"num_classes": 0, "radius": 0})
        self.layers = tuple(self.layers)
        if len(self.layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in self.layers):
            raise ValueError(f"layers must be four positive ints (blocks in c2..c5), got {self.layers!r}")
        for name in ("width", "in_chans", "heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.c5_stride not in (1, 2):
            raise ValueError(f"c5_stride must be 1 or 2, got {self.c5_stride!r}")
        if self.attention and (8 * self.width) % self.heads:
            raise ValueError(f"c5's inner width 8 x width = {8 * self.width} must be divisible by heads "
                             f"({self.heads})")
        if self.resize not in RESIZE:
            raise ValueError(f"resize must be one of {RESIZE}, got {self.resize!r}")
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        as_pair(self.image_size, "image_size")

    @property
    def reductions(self) -> tuple[int, int, int, int]:
        """Output stride of c2..c5."""
        return (4, 8, 16, 16 * self.c5_stride)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BotNetConfig":
        return ckpt.config_from_dict(cls, d)


@dataclass
class FeatureMaps:
    """``forward_features``' output: the four stages' maps, as an FPN takes them (strides in ``reductions``)."""

    c2: Tensor  # (B, 4 width, H/4, W/4)
    c3: Tensor  # (B, 8 width, H/8, W/8)
    c4: Tensor  # (B, 16 width, H/16, W/16)
    c5: Tensor  # (B, 32 width, H/32, W/32), or H/16 for BoT-S1

    def as_list(self) -> list[Tensor]:
        return [self.c2, self.c3, self.c4, self.c5]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 convolution (or MHSA), 1x1 expand, plus the shortcut; BN after each, ReLU between."""

    def __init__(self, in_ch: int, width: int, stride: int, *, attention: BottleneckAttention2d | None = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False, **factory)
        self.bn1 = nn.BatchNorm2d(width, **factory)
        if attention is None:
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False, **factory)
        else:
            self.attn = attention  # strides by its own average pool
        self.bn2 = nn.BatchNorm2d(width, **factory)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False, **factory)
        self.bn3 = nn.BatchNorm2d(out_ch, **factory)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False, **factory),
                                            nn.BatchNorm2d(out_ch, **factory))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attn(out) if hasattr(self, "attn") else self.conv2(out)
        out = self.relu(self.bn2(out))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class BotNet(ckpt.Pretrained, nn.Module):
    """ResNet-50-style backbone with BoTNet's MHSA in c5 (or plain ResNet with ``attention=False``).

    ``forward(x: (B, in_chans, H, W)) -> (B, num_classes)`` logits (pooled ``(B, 32 width)`` features when
    ``num_classes == 0``); any ``H, W`` that ResNet-50 accepts (the relative tables adapt, see
    ``BottleneckAttention2d``). ``forward_features`` returns the c2..c5 maps.
    """

    MODEL_TYPE = "longattn-botnet"
    FAMILY = "longattn BoTNet/ResNet"
    CONFIG = BotNetConfig

    def __init__(self, cfg: BotNetConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        factory = {"device": device, "dtype": dtype}
        w = cfg.width
        self.conv1 = nn.Conv2d(cfg.in_chans, w, 7, stride=2, padding=3, bias=False, **factory)
        self.bn1 = nn.BatchNorm2d(w, **factory)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        image = as_pair(cfg.image_size, "image_size")
        in_ch = w
        for stage, (blocks, stride) in enumerate(zip(cfg.layers, (1, 2, 2, cfg.c5_stride))):
            width = w * 2 ** stage
            layer = []
            for i in range(blocks):
                block_stride = stride if i == 0 else 1
                attention = None
                if cfg.attention and stage == 3:
                    # The map this block attends over at image_size: c4's (first block) or c5's.
                    reduction = 16 if i == 0 else cfg.reductions[3]
                    feat = tuple(-(-s // reduction) for s in image)
                    attention = BottleneckAttention2d(width, heads=cfg.heads, feat_size=feat, stride=block_stride,
                                                      radius=cfg.radius, resize=cfg.resize, backend=backend, **factory)
                layer.append(Bottleneck(in_ch, width, block_stride, attention=attention, **factory))
                in_ch = width * EXPANSION
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, cfg.num_classes, **factory) if cfg.num_classes else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BottleneckAttention2d):
                m.reset_parameters()  # its own initialisation, after the conv loop above touched m.qkv
            elif isinstance(m, Bottleneck) and self.cfg.zero_init_last:
                nn.init.zeros_(m.bn3.weight)

    @property
    def feature_info(self) -> list[dict]:
        """Channels and stride of c2..c5, for detection necks."""
        return [{"name": f"c{i + 2}", "channels": self.cfg.width * 2 ** i * EXPANSION, "reduction": r}
                for i, r in enumerate(self.cfg.reductions)]

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"x must have shape (B, in_chans={self.cfg.in_chans}, H, W), got {tuple(x.shape)}")

    def forward_features(self, x: Tensor) -> FeatureMaps:
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return FeatureMaps(c2, c3, c4, self.layer4(c4))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.forward_features(x).c5.mean((2, 3))  # (B, 32 width)
        return self.fc(pooled)
