"""LRA ListOps as a task: the official files (``longattn.datasets.listops``) read as token ids.

Tokens, as LRA's input pipeline reads them (``lra_benchmarks/listops/input_pipeline.py``, after the fix of
issues #6 and #14, which had dropped the brackets): the parentheses are deleted, ``]`` is kept (renamed ``X``
there) and the rest splits on whitespace, so ``[MAX 2 9 ]`` is 4 tokens. The ids here are fixed, PAD = 0,
digits 1-10, ``[MIN [MAX [MED [SM`` 11-14, ``]`` 15, so ``vocab_size`` is 16. (LRA numbers the 15 tokens in
the order of a Python set, which changes from run to run, and adds one never-used out-of-vocabulary id, 17
in all.) Examples are cut to ``max_length`` tokens (LRA: 2000) and classified from a CLS token.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from ...datasets.files import (SPLITS, DataFormatError, check_settings, check_split, count_lines, iter_tsv, locate,
                               missing, parse_label)
from ...datasets.listops import (CLOSE, FILE_NAMES, HEADER, OPERATORS, SOURCE, SUBDIRS, ListOpsSettings,
                                 expression_tokens, write_files)
from ._base import CappedTask, Split
from ._bytes import ByteRows

VOCAB = ("<pad>", *"0123456789", *OPERATORS, CLOSE)  # token id = index; 0 is PAD
TOKEN_IDS = {tok: i for i, tok in enumerate(VOCAB) if i}
OPERATOR_IDS = range(11, 15)
CLOSE_ID = 15


def encode(source: str) -> list[int]:
    """Token ids of an expression's text, as ``load`` reads it: parentheses dropped, PAD never produced."""
    try:
        return [TOKEN_IDS[t] for t in expression_tokens(source)]
    except KeyError as e:
        raise ValueError(f"unknown ListOps token {e.args[0]!r}") from None


def decode(ids: Sequence[int] | torch.Tensor) -> list[str]:
    """Tokens of a row of ids (padding dropped): ``evaluate(decode(split.tokens[i]))`` is its label."""
    return [VOCAB[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids) if i]


# Fast path of the loader: the official files space their tokens with single spaces, so after the multi-letter
# operators become one byte each, tokens sit at even offsets and spaces at odd ones; one translate maps bytes
# to ids. Anything else (other spacing, unknown tokens) takes the token-by-token path, which names the problem.
_SHORT = [(op.encode(), bytes([1 + i])) for i, op in enumerate(OPERATORS)]
_ALLOWED = b"0123456789()[] MINAXEDS"


def _byte_ids() -> bytes:
    table = bytearray([0xFE] * 256)  # 0xFE: not a token
    table[ord("(")] = table[ord(")")] = 0xFF  # 0xFF: dropped
    for tok, i in TOKEN_IDS.items():
        table[tok.encode()[0] if len(tok) == 1 else _SHORT[OPERATORS.index(tok)][1][0]] = i
    return bytes(table)


_BYTE_IDS = _byte_ids()


def _encode_bytes(source: bytes) -> bytes:
    """Token ids (one byte each) of one Source field; ``ValueError`` naming the bad token."""
    s = source.strip(b" ")
    if not s.translate(None, _ALLOWED):
        for long, short in _SHORT:
            s = s.replace(long, short)
        if len(s) % 2 and not s[1::2].strip(b" ") and b" " not in s[0::2]:
            ids = s[0::2].translate(_BYTE_IDS).translate(None, b"\xff")
            if b"\xfe" not in ids:
                if not ids:
                    raise ValueError("the expression has no tokens")
                return ids
    ids = bytearray()
    for tok in source.split():
        if tok in (b"(", b")"):
            continue
        i = TOKEN_IDS.get(tok.decode("utf-8", "replace"))
        if i is None:
            raise ValueError(f"unknown token {tok.decode('utf-8', 'replace')!r} (ListOps has 0-9, "
                             f"{' '.join(OPERATORS)}, ']' and parentheses)")
        ids.append(i)
    if not ids:
        raise ValueError("the expression has no tokens")
    return bytes(ids)


# ----------------------------------------------------------------------------------------------- task
class ListOps(CappedTask):
    """LRA ListOps over ``data_dir``: ``basic_{train,val,test}.tsv``, here or in ``listops-1000/``.

    ``load`` cuts rows to ``max_length`` tokens (LRA: 2000; the generator's default range never needs it)
    and records how many it cut in ``truncated[split]``, with a warning.
    """

    name = "listops"
    num_classes = 10
    vocab_size = len(VOCAB)  # 16
    pooling = "cls"
    can_generate = True

    default_length = 2000

    def __init__(self, data_dir: Path | str, *, max_length: int | None = None):
        super().__init__(data_dir, max_length=max_length)
        self.truncated: dict[str, int] = {}
        self._memo: dict[str, Split] | None = None  # only while statistics() runs

    def _path(self, split: str) -> Path:
        name = FILE_NAMES[check_split(split)]
        folder = locate(self.data_dir, SUBDIRS, [name])
        if folder is None:
            raise missing(self.name, self.data_dir, SUBDIRS, list(FILE_NAMES.values()), SOURCE,
                          hint=f"write them with: longattn lra generate --task listops --data-dir {self.data_dir}")
        return folder / name

    def _check_files(self, split: str) -> None:
        self._path(split)

    def load(self, split: str) -> Split:
        """Read ``basic_{split}.tsv``; ``DataFormatError`` names the file and line of anything malformed."""
        if self._memo is not None and split in self._memo:
            return self._memo[split]
        path = self._path(split)
        rows = ByteRows(max(count_lines(path) - 1, 0), self.max_length, shift=0)
        labels, chunk, cut = [], [], 0
        source_col = target_col = None
        for line, fields in iter_tsv(path, 2):
            if source_col is None:
                names = [f.strip().decode("utf-8", "replace") for f in fields]
                if sorted(names) != sorted(HEADER):
                    raise DataFormatError(path, line, f"expected the header 'Source<TAB>Target', found {names}")
                source_col, target_col = names.index("Source"), names.index("Target")
                continue
            labels.append(parse_label(fields[target_col], self.num_classes, path, line))
            try:
                ids = _encode_bytes(fields[source_col])
            except ValueError as e:
                raise DataFormatError(path, line, str(e)) from None
            cut += len(ids) > self.max_length
            chunk.append(ids)
            if len(chunk) == 4096:
                rows.extend(chunk)
                chunk = []
        if source_col is None:
            raise DataFormatError(path, 1, "empty file: expected the header 'Source<TAB>Target'")
        rows.extend(chunk)
        self.truncated[split] = cut
        if cut:
            warnings.warn(f"{path}: {cut} of {len(labels)} examples are longer than max_length="
                          f"{self.max_length} tokens and were cut", stacklevel=2)
        tokens, lengths = rows.finish()
        return Split(tokens, lengths, torch.tensor(labels, dtype=torch.int64))

    def generate(self, *, seed: int = 0, progress: bool | None = None, **settings) -> None:
        """Write ``basic_{train,val,test}.tsv`` into ``data_dir`` from ``ListOpsSettings(**settings)``
        (``datasets.listops.write_files``: an interrupted run leaves earlier files as they were)."""
        check_settings(ListOpsSettings, settings)
        write_files(self.data_dir, ListOpsSettings(**settings), seed=seed, progress=progress)

    def statistics(self) -> dict:
        """The base statistics plus, per split: ``length_histogram`` (``bin_width`` 100, ``counts[i]`` for
        lengths in ``[100 i, 100 (i + 1))``), ``majority_class`` and ``majority_rate``, ``depth_histogram``
        (``[i]``: examples of depth i, as ``tree_depth``), ``operator_counts`` and ``truncated``."""
        self._memo = {}
        try:
            for split in SPLITS:
                self._memo[split] = self.load(split)
            stats = super().statistics()
            for split, data in self._memo.items():
                stats[split].update(_split_statistics(data, self.max_length, self.num_classes))
                stats[split]["truncated"] = self.truncated.get(split, 0)
        finally:
            self._memo = None
        return stats


def _split_statistics(data: Split, seq_len: int, num_classes: int, bin_width: int = 100) -> dict:
    n = len(data)
    counts = torch.bincount(data.labels, minlength=num_classes)
    lengths = torch.bincount(data.lengths // bin_width, minlength=seq_len // bin_width + 1)
    depths = torch.zeros(0, dtype=torch.int64)
    ops = torch.zeros(len(OPERATOR_IDS), dtype=torch.int64)
    for start in range(0, n, 4096):  # bounded memory: (4096, L) at a time
        tokens = data.tokens[start:start + 4096].long()
        is_op = (tokens >= OPERATOR_IDS[0]) & (tokens <= OPERATOR_IDS[-1])
        level = (is_op.int() - (tokens == CLOSE_ID).int()).cumsum(1)  # (rows, L) open operators
        depth = torch.where(data.lengths[start:start + 4096] > 0, level.max(1).values + 1, 0)
        depths = torch.cat([depths, depth])
        ops += torch.bincount(tokens[is_op] - OPERATOR_IDS[0], minlength=len(OPERATOR_IDS))
    depth_hist = torch.bincount(depths).tolist() if n else []
    return {
        "length_histogram": {"bin_width": bin_width, "counts": lengths.tolist()},
        "majority_class": int(counts.argmax()) if n else None,
        "majority_rate": round(int(counts.max()) / n, 4) if n else 0.0,
        "depth_histogram": depth_hist,
        "operator_counts": {op[1:]: int(c) for op, c in zip(OPERATORS, ops.tolist())},
    }


__all__ = ["VOCAB", "ListOps", "decode", "encode"]
