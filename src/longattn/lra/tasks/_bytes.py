"""Byte strings as token rows: how Text, Retrieval and ListOps turn the lines of a file into one padded matrix.

Rows are packed without a Python loop per token, and a large file is packed chunk by chunk so that its text
and its tokens are never in memory at once.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._base import PAD

BYTE_SHIFT = 1  # LRA's ByteTextEncoder (TFDS) maps byte b to id b + 1, keeping 0 for padding
BYTE_VOCAB = 256 + BYTE_SHIFT


class ByteRows:
    """Byte strings written as token rows ``byte + shift`` into a preallocated ``(capacity, length)`` matrix.

    Rows are added in chunks (``extend``) so that a large file never holds its text and its tokens in
    memory at once; each chunk is a few whole-tensor operations, no loop over tokens. ``finish``
    returns ``(tokens, lengths)`` for the rows written, int16 tokens padded with ``PAD``.
    """

    def __init__(self, capacity: int, length: int, *, shift: int = BYTE_SHIFT):
        self.tokens = torch.full((capacity, length), PAD, dtype=torch.int16)
        self.lengths = torch.zeros(capacity, dtype=torch.int64)
        self.length, self.shift, self.rows = length, shift, 0

    def extend(self, docs: Sequence[bytes]) -> None:
        n, start = len(docs), self.rows
        if start + n > self.tokens.shape[0]:
            raise ValueError(f"ByteRows: {start + n} rows exceed the capacity {self.tokens.shape[0]}")
        if n == 0:
            return
        length = self.length
        docs = [d[:length] for d in docs]
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
        self.lengths[start:start + n] = lengths
        self.rows += n
        # Rows padded to full length in one bytes buffer, then shifted and re-padded with masked_fill:
        # elementwise ops only (boolean-index assignment would build int64 index tensors, 16 bytes per token).
        padded = b"".join(d.ljust(length, b"\0") for d in docs)
        block = self.tokens[start:start + n]  # (n, length) view
        block.copy_(torch.frombuffer(bytearray(padded), dtype=torch.uint8).view(n, length))
        block += self.shift
        block.masked_fill_(torch.arange(length) >= lengths[:, None], PAD)

    def finish(self) -> tuple[Tensor, Tensor]:
        n = self.rows
        if n == self.tokens.shape[0]:
            return self.tokens, self.lengths
        return self.tokens[:n].clone(), self.lengths[:n].clone()


def byte_tokens(docs: Sequence[bytes], length: int, *, shift: int = BYTE_SHIFT) -> tuple[Tensor, Tensor]:
    """``(tokens (n, length) int16, lengths (n,))``: each byte string cut to ``length``, ids ``byte + shift``."""
    rows = ByteRows(len(docs), length, shift=shift)
    rows.extend(docs)
    return rows.finish()

