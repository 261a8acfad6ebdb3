"""Global tokens (Longformer, ETC-style ITC): chosen positions attend everywhere and are attended by all."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, Snapshot, any_in_range, block_ranges, pattern_dataclass


@pattern_dataclass
class GlobalTokens(Pattern):
    #: sorted distinct absolute positions, or a Snapshot of a (B, N) bool mask (True = global) per example
    idx: tuple[int, ...] | Snapshot

    def __post_init__(self):
        idx = self.idx
        if isinstance(idx, Tensor) and idx.dtype == torch.bool:
            if idx.dim() != 2:
                raise ValueError(f"idx as a bool mask must have shape (B, N), got {tuple(idx.shape)}")
            # Keyed by content, so batches with the same global positions (a CLS token, the same question
            # length) reuse cached plans instead of rebuilding them on every call.
            object.__setattr__(self, "idx", Snapshot(idx))
        elif not isinstance(idx, Snapshot):
            values = idx.tolist() if isinstance(idx, Tensor) else list(idx)
            if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                raise TypeError("idx must be a sequence of ints or a (B, N) bool tensor")
            object.__setattr__(self, "idx", tuple(sorted(set(values))))

    @property
    def indices(self) -> tuple[int, ...] | None:
        """The global positions shared by every example; None for a per-example mask."""
        return None if isinstance(self.idx, Snapshot) else self.idx

    @property
    def flags(self) -> Tensor | None:
        """The (B, N) bool mask of a per-example pattern; None for shared positions."""
        return self.idx.tensor if isinstance(self.idx, Snapshot) else None

    def _label(self) -> str:
        if self.indices is None:
            return "global_tokens_per_example"
        shown = ",".join(map(str, self.indices[:4])) + (",..." if len(self.indices) > 4 else "")
        return f"global_tokens_{shown}"

    def validate(self, geo: Geometry) -> None:
        if self.indices is not None:
            bad = [v for v in self.indices if not 0 <= v < geo.kv_len]
            if bad:
                raise ValueError(f"global_tokens: index {bad[0]} out of range for a key length of {geo.kv_len} "
                                 f"(expected 0 <= idx < {geo.kv_len})")
        elif self.flags.shape[-1] != geo.kv_len or self.flags.shape[0] not in (1, geo.batch):
            raise ValueError(f"global_tokens: mask must have shape (B, Nk) = ({geo.batch}, {geo.kv_len}), "
                             f"got {tuple(self.flags.shape)}")

    def _flags(self, geo: Geometry, device: torch.device) -> Tensor:
        """(B' , Nk) bool: which absolute positions are global."""
        if self.flags is not None:
            return self.flags.to(device=device)
        flags = torch.zeros(1, geo.kv_len, dtype=torch.bool, device=device)
        flags[0, list(self.indices)] = True
        return flags

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        flags = self._flags(geo, device)
        last = geo.kv_len - 1
        # Positions are clamped because kernels also evaluate padding rows/columns (masked afterwards).
        if flags.shape[0] == 1:
            row = flags[0]
            return lambda b, h, i, j: (row[i.clamp(0, last)] & (i >= 0)) | row[j.clamp(0, last)]
        return lambda b, h, i, j: (flags[b, i.clamp(0, last)] & (i >= 0)) | flags[b, j.clamp(0, last)]

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        flags = self._flags(geo, device)  # (B', Nk)
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        q_global = any_in_range(flags, q_lo, q_hi)  # (B', nQB, 1)
        k_global = any_in_range(flags, k_lo, k_hi)  # (B', 1, nKB)
        return (q_global | k_global).unsqueeze(1)


def global_tokens(idx: Sequence[int] | Tensor) -> Pattern:
    """Symmetric global attention: query i attends key j when ``i in idx`` or ``j in idx``.

    ``idx`` is a list of absolute key positions, or a ``(B, N)`` bool tensor (True = global) when each
    example chooses its own global tokens, as Longformer's task-specific ``global_attention_mask``.
    """
    return GlobalTokens(idx)
