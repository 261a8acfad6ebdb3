"""Hugging Face checkpoint directories: read ``config.json`` + weights, write them back atomically.

A directory holds ``config.json`` and the weights as ``model.safetensors``, ``pytorch_model.bin`` (read with
``weights_only=True``: no pickled code runs) or a sharded ``*.index.json``. Task checkpoints
(``LongformerForMaskedLM``, ``BertForSequenceClassification``, ...) store the encoder under a prefix
(``longformer.``, ``bert.``, ``roberta.``) beside their heads; ``load_into`` strips the prefix and leaves
the heads out. Nothing here imports ``transformers``.

longattn's own families (ETC, Transformer-XL, BoTNet) save the same layout: ``Pretrained`` gives them
``save_pretrained``/``from_pretrained``, with ``config.json`` holding ``model_type``, ``architectures`` and
the fields of the model's config dataclass (old field names are renamed on load, see ``renames``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import ClassVar, Iterable, TypeVar

import torch
from torch import Tensor, nn

from ..io import atomic_path, write_json
from .renames import renamed_fields

C = TypeVar("C")

#: weight-file names in the order Hugging Face prefers them
_SINGLE = ("model.safetensors", "pytorch_model.bin")
_SHARDED = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(path: Path | str) -> dict:
    """The ``config.json`` of a checkpoint directory, as a dict."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist (expected a folder with config.json "
                         f"and model.safetensors or pytorch_model.bin)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object of config fields, found a {type(config).__name__}")
    return config


@contextlib.contextmanager
def config_errors(path: Path | str):
    """Prefix a config's ``ValueError``/``TypeError`` with the file it came from."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise type(err)(f"{Path(path) / 'config.json'}: {err}") from None


def check_model_type(config: dict, expected: Iterable[str], family: str, path: Path | str, hint: str = "") -> None:
    """``ValueError`` naming the architecture found when ``config['model_type']`` is not one we load."""
    expected = tuple(expected)
    found = config.get("model_type")
    if found not in expected:
        arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise ValueError(f"{path}: a {found!r} checkpoint ({arch}), not a {family} one (expected model_type in "
                         f"{list(expected)}){hint}")


def _read_file(file: Path) -> dict[str, Tensor]:
    """One weight file's tensors; ``ValueError`` naming the file when it is damaged (truncated, not a weight
    file) or holds anything but tensors."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        # weights_only: a .bin is a pickle, and only tensors may come out of it.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{file}: missing (named by the checkpoint's shard index)") from None
    except Exception as err:  # safetensors, pickle and zip each raise their own kinds for a damaged file
        raise ValueError(f"{file}: cannot read the weights ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a state dict of tensors, found a {type(state).__name__}")
    return state


def _shards(index: Path) -> list[Path]:
    """The weight files a shard index names, each inside the checkpoint folder (an index cannot make us read
    files elsewhere)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{index}: not a shard index ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a 'weight_map' object from tensor names to file names")
    folder = index.parent.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = (folder / name).resolve()
        if shard.parent != folder:
            raise ValueError(f"{index}: shard {name!r} lies outside the checkpoint folder {folder}")
        shards.append(shard)
    return shards


def read_weights(path: Path | str) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (single file or shards), by their stored names."""
    path = Path(path)
    for name in _SINGLE:
        if (path / name).is_file():
            return _read_file(path / name)
    for name in _SHARDED:
        index = path / name
        if index.is_file():
            state: dict[str, Tensor] = {}
            for shard in _shards(index):
                state.update(_read_file(shard))
            return state
    raise ValueError(f"{path}: no weights (expected one of {', '.join(_SINGLE + _SHARDED)})")


def _normalise(name: str) -> str:
    # Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name


def strip_prefix(weights: dict[str, Tensor], anchor: str) -> dict[str, Tensor]:
    """The tensors under the base-model prefix that ``anchor`` (an encoder parameter's name) is stored with
    (``longformer.``, ``bert.``, ... in task checkpoints; none in base ones), without that prefix; the rest
    (heads) is left out. ``weights`` unchanged when no name ends with ``anchor``."""
    prefixes = [k[: -len(anchor)] for k in weights if k.endswith(anchor) and k[: -len(anchor)][-1:] in ("", ".")]
    if not prefixes:
        return weights
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _layer_shape(name: str) -> str:
    """A parameter's name with its layer numbers replaced: ``encoder.layer.#.attention...``."""
    return re.sub(r"\.\d+(?=\.)", ".#", name)


def load_into(module: nn.Module, weights: dict[str, Tensor], *, path: Path | str, strict: bool = True) -> None:
    """Copy ``weights`` into ``module``, stripping the base-model prefix that the checkpoint uses.

    Raises ``ValueError`` listing the missing parameters, naming any parameter whose shape differs, and (with
    ``strict``) listing weights the module has no place for although they are of its own kind: more layers
    than the config asks for would otherwise be dropped without a word. Heads and other tensors of another
    kind are ignored: a task checkpoint holds them beside the encoder. ``strict=False`` loads what fits and
    leaves the extra layers out.
    """
    own = module.state_dict()
    weights = strip_prefix({_normalise(k): v for k, v in weights.items()}, next(iter(own)))
    missing = [k for k in own if k not in weights]
    if missing:
        raise ValueError(f"{path}: missing weights {_listed(missing)} ({len(missing)} of {len(own)} parameters; is "
                         f"the checkpoint truncated or of another model?)")
    kinds = {_layer_shape(k) for k in own}
    unused = [k for k in weights if k not in own and _layer_shape(k) in kinds]
    if unused and strict:
        raise ValueError(f"{path}: weights the config has no place for: {_listed(unused)} ({len(unused)} tensors; "
                         f"does config.json ask for fewer layers than the checkpoint holds? strict=False drops them)")
    for name, target in own.items():
        if tuple(weights[name].shape) != tuple(target.shape):
            raise ValueError(f"{path}: weight {name} has shape {tuple(weights[name].shape)}, the config asks for "
                             f"{tuple(target.shape)}")
    module.load_state_dict({k: weights[k] for k in own}, strict=False)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def save_directory(path: Path | str, config: dict, state: dict[str, Tensor]) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``path``, each file atomically (``longattn.io``:
    temp + rename, with the user's umask)."""
    from safetensors.torch import save_file

    path = Path(path)
    # Clones: safetensors refuses tensors that share storage (tied embeddings).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(path / "config.json", config, indent=2)
    return path


def config_from_dict(config_cls: type[C], config: dict, *, source: Path | str | None = None) -> C:
    """The config dataclass ``config_cls`` from a saved dict (``config.json``, a run's result): old field names
    move to their new ones (``renames.RENAMED``); keys that are no field (``model_type``, ...) are left out."""
    config = renamed_fields(config_cls.__name__, config, source=source)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in config.items() if k in fields})


class Pretrained:
    """``save_pretrained``/``from_pretrained`` for an ``nn.Module`` built as ``cls(cfg, *, backend, device,
    dtype)`` whose ``cfg`` is a dataclass: ``config.json`` (``model_type``, ``architectures``, the config's
    fields) and ``model.safetensors``, the layout of a Hugging Face checkpoint directory."""

    MODEL_TYPE: ClassVar[str]  # config.json's model_type
    FAMILY: ClassVar[str]  # named when a checkpoint of another model type is passed
    CONFIG: ClassVar[type]  # the config dataclass

    def save_pretrained(self, path: str | Path) -> Path:
        config = {"model_type": self.MODEL_TYPE, "architectures": [type(self).__name__],
                  **dataclasses.asdict(self.cfg)}
        return save_directory(path, config, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, *, backend: str = "auto", device=None, dtype=None,
                        strict: bool = True):
        """The model saved in ``path``, in eval mode (``strict``: ``load_into``'s check for unused layers)."""
        config = read_config(path)
        check_model_type(config, (cls.MODEL_TYPE,), cls.FAMILY, path)
        with config_errors(path):
            cfg = config_from_dict(cls.CONFIG, config, source=path)
        model = cls(cfg, backend=backend, device=device, dtype=dtype)
        load_into(model, read_weights(path), path=path, strict=strict)
        return model.eval()
