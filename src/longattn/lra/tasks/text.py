"""LRA Text: byte-level sentiment classification of IMDb movie reviews, read from Stanford's release.

LRA loads IMDb through TFDS (``imdb_reviews``), which builds it from Stanford's ``aclImdb_v1.tar.gz``;
this task reads the extracted folder itself::

    aclImdb/train/neg/*.txt   aclImdb/train/pos/*.txt     (12,500 + 12,500 reviews)
    aclImdb/test/neg/*.txt    aclImdb/test/pos/*.txt      (12,500 + 12,500 reviews)

(``aclImdb/train/unsup`` and the ``*.feat``/vocabulary files are not used.) What LRA does, reproduced here:

- text: the file's bytes with surrounding whitespace stripped (TFDS ``read().strip()``); the ``<br />``
  markup stays in (neither TFDS nor LRA removes it);
- tokens: LRA's ``ByteTextEncoder`` maps byte ``b`` to id ``b + 1`` (0 is padding), so ``vocab_size`` is 257;
- length: cut to ``max_length`` bytes and padded. LRA's paper uses 4K; the released config
  (``text_classification/configs/base_tc_config.py``) sets ``max_length = 1000``. Default 4000;
- labels: ``neg`` = 0, ``pos`` = 1 (TFDS ``ClassLabel(names=["neg", "pos"])``);
- splits: train is ``aclImdb/train``; LRA has no validation set and evaluates on the test set for both
  (``get_imdb_dataset``: ``valid_raw = data['test']``), so ``val`` and ``test`` are both ``aclImdb/test``;
- pooling: ``classifier_pool = "CLS"`` in ``base_tc_config.py``.

TFDS stores the reviews in a hashed order; here the order is fixed and documented instead: all ``neg``
reviews, then all ``pos``, each by the numeric id in the file name ``<id>_<rating>.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...datasets.files import check_split, locate, missing
from ._base import CappedTask, Split
from ._bytes import BYTE_VOCAB, byte_tokens

SUBDIRS = ("aclImdb",)  # the release's top folder, when data_dir is the folder that holds it
LABELS = ("neg", "pos")  # class id = index
SOURCE_FOLDER = {"train": "train", "val": "test", "test": "test"}  # LRA validates on the test set
FOLDERS = tuple(f"{top}/{label}" for top in ("train", "test") for label in LABELS)
LAYOUT = "each folder holds one review per file, <id>_<rating>.txt"
SOURCE = ("Stanford's Large Movie Review Dataset, https://ai.stanford.edu/~amaas/data/sentiment/"
          "aclImdb_v1.tar.gz (extract it with: tar xzf aclImdb_v1.tar.gz)")


def _review_order(name: str) -> tuple:
    stem = name.split("_", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _reviews(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.endswith(".txt") and e.is_file()]
    return sorted(names, key=_review_order)


class Text(CappedTask):
    """IMDb reviews as UTF-8 bytes (ids ``byte + 1``), ``max_length`` long, classified from a CLS token."""

    name = "text"
    num_classes = 2
    vocab_size = BYTE_VOCAB
    pooling = "cls"

    default_length = 4000

    def _needed(self, split: str) -> list[str]:
        top = SOURCE_FOLDER[check_split(split)]
        return [f"{top}/{label}" for label in LABELS]

    def _root(self, split: str) -> Path:
        needed = self._needed(split)
        root = locate(self.data_dir, SUBDIRS, needed)
        if root is None:
            raise missing(self.name, self.data_dir, SUBDIRS, FOLDERS, SOURCE, hint=LAYOUT)
        return root

    def _check_files(self, split: str) -> None:
        self._root(split)

    def load(self, split: str) -> Split:
        """Read ``aclImdb/train`` (``train``) or ``aclImdb/test`` (``val`` and ``test``): neg reviews, then pos."""
        root = self._root(split)
        docs, labels = [], []
        for label, folder in enumerate(root / n for n in self._needed(split)):
            names = _reviews(folder)
            if not names:
                raise missing(self.name, self.data_dir, SUBDIRS, FOLDERS, SOURCE,
                              hint=f"{folder} holds no review; {LAYOUT}")
            for name in names:
                with open(folder / name, "rb") as f:
                    docs.append(f.read().strip()[: self.max_length])
            labels += [label] * len(names)
        tokens, lengths = byte_tokens(docs, self.max_length)
        return Split(tokens, lengths, torch.tensor(labels, dtype=torch.int64))
