"""Packed against padded: a Longformer over a batch of real license texts of long-tailed lengths.

License texts run from a few hundred bytes to tens of thousands; a padded batch makes every example as
long as the longest, a packed one (``models/packing.py``) puts the documents one after another in rows
and keeps attention inside each document. This measures both on the same documents and weights (bytes
as tokens, as in LRA's byte-level text task): time and peak memory of one forward, the share of padding,
and the largest difference of the outputs on real tokens.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io import markdown_table, write_json
from ..models.longformer import LongformerConfig, LongformerModel
from ..models.packing import pack, unpack
from ..tools.measure import median_ms, peak_mb
from .licensedb import load_licensedb

BYTE_OFFSET = 1  # token = byte + 1; 0 is padding


@dataclass(frozen=True)
class PackedSettings:
    documents: int = 32  # license texts drawn (seeded) from the LicenseDB
    max_len: int = 4096  # bytes kept per text (LRA's text task keeps 4K) and the packed row length
    layers: int = 2
    dim: int = 256
    heads: int = 4
    window: int = 256  # Longformer's w (w/2 keys each side)
    seed: int = 0
    min_run_time: float = 2.0  # per timing
    rounds: int = 3  # timings per batch, taking turns


def license_bytes(settings: PackedSettings, data_dir: Path | None = None) -> list[torch.Tensor]:
    """``documents`` license texts (seeded draw) as byte tokens, each cut at ``max_len``."""
    db = load_licensedb(data_dir, rules=False)
    texts = [lic.text for lic in db.licenses.values() if lic.text]
    chosen = random.Random(settings.seed).sample(texts, min(settings.documents, len(texts)))
    return [torch.tensor(list(t.encode("utf-8")[: settings.max_len]), dtype=torch.long) + BYTE_OFFSET
            for t in chosen]


def _model(settings: PackedSettings) -> LongformerModel:
    torch.manual_seed(settings.seed)
    cfg = LongformerConfig(vocab_size=256 + BYTE_OFFSET, hidden_size=settings.dim,
                           num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                           intermediate_size=4 * settings.dim, attention_window=[settings.window] * settings.layers,
                           max_position_embeddings=settings.max_len + 2, pad_token_id=0)
    return LongformerModel(cfg, add_pooling_layer=False).eval()


def run_packed(settings: PackedSettings = PackedSettings(), *, out: Path | None = None,
               data_dir: Path | None = None) -> dict:
    """Time, memory and agreement of the padded and the packed batch; written to ``out/packed.json``."""
    docs = license_bytes(settings, data_dir)
    model = _model(settings)
    lengths = [int(d.numel()) for d in docs]
    longest = max(lengths)
    # Padded: one row per document, the first token global (a CLS position), padding masked.
    padded = torch.zeros(len(docs), longest, dtype=torch.long)
    for i, d in enumerate(docs):
        padded[i, : d.numel()] = d
    real = padded != 0
    first = torch.zeros_like(padded)
    first[:, 0] = 1
    packed = pack(docs, row_len=settings.max_len)
    starts = torch.zeros_like(packed.input_ids)
    rows, cols = packed.first_tokens
    starts[rows, cols] = 1

    def run_padded():
        return model(padded, attention_mask=real.long(), global_attention_mask=first).last_hidden_state

    def run_pack():
        return model(packed.input_ids, attention_mask=packed.real.long(), global_attention_mask=starts,
                     segment_ids=packed.segment_ids).last_hidden_state

    device = torch.device("cpu")
    result = {"settings": asdict(settings), "lengths": lengths, "threads": torch.get_num_threads()}
    calls = {"padded": (run_padded, tuple(padded.shape)), "packed": (run_pack, tuple(packed.input_ids.shape))}
    with torch.no_grad():
        a, b = run_padded(), run_pack()
        diff = max(float((a[i, :n] - u).abs().max()) for i, (n, u) in enumerate(zip(lengths, unpack(b, packed))))
        # The two batches take turns, so that a shared machine's drift hits both alike (one call takes seconds).
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(settings.rounds):
            for name, (fn, _) in calls.items():
                times[name].append(median_ms(fn, device, settings.min_run_time))
        for name, (fn, shape) in calls.items():
            result[name] = {"shape": shape, "tokens": shape[0] * shape[1],
                            "time_ms": round(sorted(times[name])[len(times[name]) // 2], 1),
                            "times_ms": [round(t, 1) for t in times[name]],
                            "peak_mb": round(peak_mb(fn, device, compiled=False), 1)}
    result["real_tokens"] = sum(lengths)
    result["max_abs_diff"] = diff
    result["speedup"] = round(result["padded"]["time_ms"] / result["packed"]["time_ms"], 2)
    result["memory_ratio"] = round(result["padded"]["peak_mb"] / result["packed"]["peak_mb"], 2)
    if out is not None:
        write_json(Path(out) / "packed.json", result)
    return result


def packed_table(result: dict) -> str:
    rows = []
    for name in ("padded", "packed"):
        r = result[name]
        rows.append([name, "x".join(map(str, r["shape"])), r["tokens"], result["real_tokens"] / r["tokens"],
                     r["time_ms"], r["peak_mb"]])
    return markdown_table(["batch", "shape", "positions", "real share", "forward ms", "peak MB"], rows,
                          formats=["", "", ",", ".2f", ".1f", ".1f"])
