"""``longattn convert --to-long N SRC DST``: the Longformer recipe for short BERT/RoBERTa-family checkpoints.

Beltagy et al. (2020, section 5) turn a RoBERTa checkpoint into a long-document model by (1) extending the
position table to the new length by copying the learned positions over and over, (2) replacing full
attention by a sliding window and (3) initialising the global projections ``query_global/key_global/
value_global`` from ``query/key/value``. The output is a Hugging Face Longformer directory that
``longattn.models.LongformerModel`` (and ``transformers.LongformerModel``) load. A sentence-transformers
source keeps its ``modules.json``, pooling and normalisation, so ``SentenceEncoder`` embeds with the long model
as the source did.

Positions: Longformer counts positions from ``pad_token_id + 1`` (RoBERTa's convention). A RoBERTa-family
source already does; for a BERT source (positions from 0) the table is shifted so that token ``t`` still
reads the source's row ``t``. The default window is twice the source's length, so every input that the
source accepted sees all its tokens and the converted model gives the source's outputs on it exactly;
``window=512`` is the paper's setting (exact only below 257 tokens), cheaper on long inputs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import torch

from ..io import write_json
from ..models import hf_checkpoint as ckpt
from ..models.longformer import LongformerConfig, LongformerModel

#: model_type of the sources this recipe applies to, and whether their positions start after the padding id
SOURCES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}
#: the files of a Hugging Face tokenizer, whichever of them a directory has
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json",
                   "added_tokens.json", "sentencepiece.bpe.model", "tokenizer_config.json")
# what AutoTokenizer picks from a source's model_type; recorded in the copy, whose model_type is longformer
_TOKENIZER_CLASS = {"bert": "BertTokenizer", "roberta": "RobertaTokenizer", "xlm-roberta": "XLMRobertaTokenizer",
                    "camembert": "CamembertTokenizer"}
_POSITIONS = "embeddings.position_embeddings.weight"
# sentence-transformers' description of how a sentence embedding is made (pooling, normalisation)
_SENTENCE_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def _encoder_weights(weights: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors without their task prefix (``bert.``, ``roberta.``), buffers left out."""
    weights = ckpt.strip_prefix(weights, _POSITIONS)
    if _POSITIONS not in weights:
        raise ValueError(f"{path}: no {_POSITIONS} in the weights (not a BERT-family encoder?)")
    return {k: v for k, v in weights.items() if not k.endswith(("position_ids", "token_type_ids"))}


def extend_positions(table: torch.Tensor, *, roberta_style: bool, pad_token_id: int, max_length: int
                     ) -> torch.Tensor:
    """(max_length + pad_token_id + 1, C): row ``pad_token_id + 1 + t`` holds the source's position
    ``t mod L`` (L = the source's learned positions); rows up to ``pad_token_id`` are the padding rows."""
    offset = pad_token_id + 1
    learned = table[offset:] if roberta_style else table  # (L, C)
    repeats = -(-max_length // learned.shape[0])
    head = table[:offset].clone() if roberta_style else table.new_zeros(offset, table.shape[1])
    return torch.cat([head, learned.repeat(repeats, 1)[:max_length]])


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """``dst`` may receive a checkpoint converted from ``src``: not the source itself, inside it or around it,
    not a file, and not a folder with contents unless ``overwrite``."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        where = "is" if d == s else "is inside" if s in d.parents else "holds"
        raise ValueError(f"dst {dst} {where} the source {src}: write the converted checkpoint to another folder")
    if d.exists() and not d.is_dir():
        raise ValueError(f"dst {dst} exists and is not a folder")
    if d.is_dir() and any(d.iterdir()) and not overwrite:
        raise ValueError(f"dst {dst} exists and is not empty: pass overwrite=True (longattn convert --overwrite) "
                         f"to replace it")


def _publish(staging: Path, dst: Path) -> None:
    """Move the finished ``staging`` folder to ``dst``, replacing what was there (a kill in between leaves the
    old contents in a hidden ``.<name>.old-<pid>`` folder beside it, never a half-written ``dst``)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        staging.rename(dst)
        shutil.rmtree(old)
    else:
        staging.rename(dst)


def convert_to_long(src: str | Path, dst: str | Path, *, max_length: int = 4096, window: int | None = None,
                    copy_tokenizer: bool = True, overwrite: bool = False) -> Path:
    """Write a Longformer directory to ``dst`` from the BERT/RoBERTa-family checkpoint directory ``src``.

    Args:
        max_length: tokens the converted model accepts (the new position table).
        window: ``attention_window`` of every layer (even); default twice the source's length.
        copy_tokenizer: copy the tokenizer files and raise their ``model_max_length`` to ``max_length``
            (recording the source's ``tokenizer_class``, which ``AutoTokenizer`` otherwise takes from the
            ``model_type``, now ``longformer``).

    A sentence-transformers source keeps ``modules.json``, the module folders it names (``1_Pooling/``,
    ``2_Normalize/``, ...), ``config_sentence_transformers.json`` and ``sentence_bert_config.json`` (its
    ``max_seq_length`` raised to ``max_length``), whatever ``copy_tokenizer`` says.

    ``dst`` is never the source (nor inside it), and a folder with contents is replaced only with
    ``overwrite``; the checkpoint is written into a hidden folder beside ``dst`` and moved into place when
    complete, so an interrupted conversion leaves no half-written ``dst``.
    """
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    hf = ckpt.read_config(src)
    ckpt.check_model_type(hf, SOURCES, "BERT/RoBERTa-family", src)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{src}: position_embedding_type {hf['position_embedding_type']!r}; only absolute "
                         f"position tables can be extended")
    roberta_style = SOURCES[hf["model_type"]]
    pad = int(hf.get("pad_token_id", 1 if roberta_style else 0))
    weights = _encoder_weights(ckpt.read_weights(src), src)
    table = weights[_POSITIONS]
    source_length = table.shape[0] - (pad + 1 if roberta_style else 0)
    if not isinstance(max_length, int) or max_length < source_length:
        raise ValueError(f"max_length must be an int >= the source's {source_length} positions, got {max_length!r}")
    window = 2 * source_length if window is None else window
    if not isinstance(window, int) or window < 2 or window % 2:
        raise ValueError(f"window must be a positive even int, got {window!r}")

    weights[_POSITIONS] = extend_positions(table, roberta_style=roberta_style, pad_token_id=pad,
                                           max_length=max_length)
    layers = int(hf["num_hidden_layers"])
    for i in range(layers):
        for name in ("query", "key", "value"):
            for part in ("weight", "bias"):
                local = weights.get(f"encoder.layer.{i}.attention.self.{name}.{part}")
                if local is not None:
                    weights[f"encoder.layer.{i}.attention.self.{name}_global.{part}"] = local.clone()

    config = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "_name_or_path")}
    config.update(max_position_embeddings=weights[_POSITIONS].shape[0], attention_window=[window] * layers,
                  pad_token_id=pad)
    model = LongformerModel(LongformerConfig.from_hf(config), add_pooling_layer="pooler.dense.weight" in weights)
    ckpt.load_into(model, weights, path=src)  # every parameter accounted for, shapes checked
    dst.parent.mkdir(parents=True, exist_ok=True)
    # mode 0o777 so that the kernel applies the umask (mkdtemp's folders are 0o700: others could not read it)
    staging = dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    staging.mkdir(mode=0o777)
    try:
        model.save_pretrained(staging)
        if copy_tokenizer:
            _copy_tokenizer(src, staging, max_length, _TOKENIZER_CLASS[hf["model_type"]])
        copy_sentence_modules(src, staging, max_length=max_length)
        _publish(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst


def _copy_tokenizer(src: Path, dst: Path, max_length: int, tokenizer_class: str) -> None:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        return
    for name in copied:
        shutil.copy2(src / name, dst / name)
    settings = dst / "tokenizer_config.json"
    data = json.loads(settings.read_text()) if settings.is_file() else {}
    data["model_max_length"] = max_length
    # Without it AutoTokenizer would pick the tokenizer of model_type longformer (RoBERTa's BPE), not the source's.
    data.setdefault("tokenizer_class", tokenizer_class)
    write_json(settings, data, indent=2)


def copy_sentence_modules(src: Path, dst: Path, *, max_length: int | None = None) -> None:
    """Keep a sentence-transformers model's pooling and normalisation (``modules.json`` and the module
    folders it names), so a model written from ``src`` still says how to embed a text (``SentenceEncoder``).
    With ``max_length``, ``sentence_bert_config.json``'s ``max_seq_length`` becomes it."""
    for name in _SENTENCE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "modules.json").is_file():
        for module in json.loads((src / "modules.json").read_text()):
            folder = Path(module.get("path") or ".")
            # a module path names a folder inside the model directory, never one outside dst
            inside = not folder.is_absolute() and ".." not in folder.parts and folder != Path(".")
            if inside and (src / folder).is_dir():
                shutil.copytree(src / folder, dst / folder, dirs_exist_ok=True)
    settings = dst / "sentence_bert_config.json"
    if max_length is not None and settings.is_file():
        data = json.loads(settings.read_text())
        data["max_seq_length"] = max_length
        write_json(settings, data, indent=2)
