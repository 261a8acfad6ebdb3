"""timm registration of longattn's vision backbones, attempted only when timm imports (never a dependency).

``register()`` adds ``longattn_botnet50``, ``longattn_resnet50``, ... to timm's registry, so that
``timm.create_model("longattn_botnet50", num_classes=10)`` builds ``longattn.models.BotNet``. The ``longattn_``
prefix keeps them apart from timm's own, differently built ``botnet26t``/``botnet50ts``. ``import longattn``
calls it when timm is already imported; otherwise call it after importing timm.
"""

from __future__ import annotations

from typing import Callable

from ..models import create_model, default_config, list_models
from ..models.botnet import BotNetConfig

_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm passes these; no weights to load


def _entrypoint(name: str) -> Callable:
    def build(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"longattn_{name}: no pretrained weights are published; load a checkpoint with "
                             f"BotNet.from_pretrained instead")
        for key in _TIMM_ARGS:
            kwargs.pop(key, None)
        return create_model(name, **kwargs)

    build.__name__ = f"longattn_{name.replace('-', '_')}"
    build.__qualname__ = build.__name__
    build.__module__ = __name__
    build.__doc__ = f"longattn's {name} (``longattn.models.create_model({name!r})``)."
    return build


def register() -> list[str]:
    """Register every vision model of longattn's registry with timm; returns the names (``[]`` without timm)."""
    try:
        from timm.models import register_model
    except ImportError:
        return []
    names = []
    for name in list_models():
        if isinstance(default_config(name), BotNetConfig):
            fn = _entrypoint(name)
            register_model(fn)
            names.append(fn.__name__)
    return names
