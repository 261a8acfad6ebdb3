"""LRA Retrieval: byte-level matching of two ACL Anthology Network papers (does one cite the other?).

Reads LRA's release files (``lra_release.gz``, folder ``lra_release/tsv_data/``)::

    new_aan_pairs.train.tsv   new_aan_pairs.eval.tsv   new_aan_pairs.test.tsv

Format, as LRA's ``matching/input_pipeline.py`` reads it (``make_csv_dataset``): one pair per line, five
tab-separated columns ``label id1 id2 text1 text2``, no header line, no quoting (``use_quote_delim=False``),
the label parsed as a float (``0``/``1``). The text fields are used verbatim: in the release they are
Python bytes literals (``b'...'`` with ``\\n``-style escapes), and LRA tokenizes those characters as they
are, so this loader does too (it does not unescape them).

What LRA does, reproduced here:

- tokens: each text is cut to its first 10,000 bytes, byte-encoded by ``ByteTextEncoder`` (byte ``b`` ->
  id ``b + 1``, 0 is padding, ``vocab_size`` 257), then cut to ``max_length``;
- length: ``max_length = 4000`` per document (``matching/configs/base_match_config.py``);
- splits: ``train`` <- ``.train.tsv``, ``val`` <- ``.eval.tsv``, ``test`` <- ``.test.tsv``; file order kept;
- pooling: ``pooling_mode = "CLS"``; the two documents are encoded separately by one shared encoder
  (``TransformerDualEncoder``), so this is a pair task: ``Split.tokens2``/``lengths2`` hold the second text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...datasets.files import check_split, count_lines, iter_tsv, locate, missing, parse_label
from ._base import CappedTask, Split
from ._bytes import BYTE_VOCAB, ByteRows

# The release unpacks to lra_release/lra_release/tsv_data (LRA's dataset_setup.sh) or lra_release/tsv_data.
SUBDIRS = ("tsv_data", "lra_release/tsv_data", "lra_release/lra_release/tsv_data")
FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
COLUMNS = 5  # label id1 id2 text1 text2
LRA_FIELD_BYTES = 10_000  # LRA encodes s[:10000] of each text before cutting to max_length
CHUNK = 4096  # rows tokenized at once: bounds the memory of raw text held beside the token matrix
SOURCE = ("the official LRA release, https://storage.googleapis.com/long-range-arena/lra_release.gz "
          "(extract it with: tar xzf lra_release.gz; the files are in its tsv_data folder)")


class Retrieval(CappedTask):
    """AAN paper pairs: two byte-level documents of ``max_length`` each, a binary citation label."""

    name = "retrieval"
    num_classes = 2
    vocab_size = BYTE_VOCAB
    pooling = "cls"
    pair = True

    default_length = 4000

    def _path(self, split: str) -> Path:
        name = FILES[check_split(split)]
        folder = locate(self.data_dir, SUBDIRS, [name])
        if folder is None:
            raise missing(self.name, self.data_dir, SUBDIRS, list(FILES.values()), SOURCE)
        return folder / name

    def _check_files(self, split: str) -> None:
        self._path(split)

    def load(self, split: str) -> Split:
        """Read one TSV; ``DataFormatError`` names the line with a wrong column count or a bad label."""
        path = self._path(split)
        cut = min(self.max_length, LRA_FIELD_BYTES)
        capacity = count_lines(path)
        first, second = ByteRows(capacity, self.max_length), ByteRows(capacity, self.max_length)
        labels: list[int] = []
        docs1: list[bytes] = []
        docs2: list[bytes] = []

        def flush():
            first.extend(docs1)
            second.extend(docs2)
            docs1.clear()
            docs2.clear()

        for line, (label, _id1, _id2, text1, text2) in iter_tsv(path, COLUMNS):
            labels.append(parse_label(label, self.num_classes, path, line))
            docs1.append(text1[:cut])
            docs2.append(text2[:cut])
            if len(docs1) == CHUNK:
                flush()
        flush()
        tokens, lengths = first.finish()
        tokens2, lengths2 = second.finish()
        return Split(tokens, lengths, torch.tensor(labels, dtype=torch.int64), tokens2, lengths2)
