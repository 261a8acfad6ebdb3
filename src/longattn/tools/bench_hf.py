"""``longattn bench --hf longformer bigbird``: longattn's encoders against ``transformers``' on the same weights.

For each model and length a random-weight Hugging Face model is built from a config (base size by default:
12 layers, 768 wide, 12 heads), saved to a temporary directory and loaded by longattn's ``from_pretrained``,
so both run the same weights. One input (batch 1, a global CLS token for Longformer) goes through both,
alternating, ``repeats`` times; the table gives median forward times, the time spent inside the layers'
self-attention modules (summed by forward hooks, the same way for both libraries), the rest (embeddings,
projections, feed-forward, LayerNorms: the same dense work in both) and the largest output difference.
BigBird runs longattn's ``hf_parity`` mode, so the outputs are expected to agree. Peak memory is the extra
live tensor bytes of one forward (counted exactly, after the timed runs).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .measure import peak_mb
from ..io import markdown_table, write_json, write_text

HF_MODELS = ("longformer", "bigbird")


@dataclass(frozen=True)
class HFExperiment:
    model: str  # "longformer" or "bigbird"
    length: int  # N
    depth: int = 12  # encoder layers (num_hidden_layers)
    dim: int = 768  # model width (hidden_size)
    heads: int = 12
    window: int = 512  # Longformer attention_window
    block: int = 64  # BigBird block_size
    random_blocks: int = 3  # BigBird num_random_blocks
    global_tokens: int = 1  # Longformer: the first tokens get global attention (CLS)


@dataclass
class HFResult:
    exp: HFExperiment
    hf_ms: float  # median forward of transformers' model
    ours_ms: float  # median forward of longattn's model
    hf_attention_ms: float  # of which inside the self-attention modules
    ours_attention_ms: float
    max_abs_diff: float  # last_hidden_state, same input and weights
    hf_peak_mb: float | None = None  # extra peak of live tensor bytes during one forward
    ours_peak_mb: float | None = None

    @property
    def speedup(self) -> float:
        return self.hf_ms / self.ours_ms

    @property
    def attention_speedup(self) -> float:
        return self.hf_attention_ms / self.ours_attention_ms

    def row(self) -> dict:
        return {**asdict(self.exp), "hf_ms": self.hf_ms, "ours_ms": self.ours_ms, "speedup": self.speedup,
                "hf_attention_ms": self.hf_attention_ms, "ours_attention_ms": self.ours_attention_ms,
                "attention_speedup": self.attention_speedup, "max_abs_diff": self.max_abs_diff,
                "hf_peak_mb": self.hf_peak_mb, "ours_peak_mb": self.ours_peak_mb}


def build_pair(exp: HFExperiment, folder: Path) -> tuple[nn.Module, nn.Module]:
    """(transformers model, longattn model) with the same random weights, both in eval mode."""
    import transformers

    from ..models.bigbird import BigBirdModel
    from ..models.longformer import LongformerModel

    shape = dict(hidden_size=exp.dim, num_hidden_layers=exp.depth, num_attention_heads=exp.heads,
                 intermediate_size=4 * exp.dim, vocab_size=1000)
    if exp.model == "longformer":
        cfg = transformers.LongformerConfig(max_position_embeddings=exp.length + 2, attention_window=exp.window,
                                            **shape)
        hf, ours_cls, kwargs = transformers.LongformerModel(cfg), LongformerModel, {}
    elif exp.model == "bigbird":
        cfg = transformers.BigBirdConfig(max_position_embeddings=exp.length, block_size=exp.block,
                                         num_random_blocks=exp.random_blocks, **shape)
        hf, ours_cls, kwargs = transformers.BigBirdModel(cfg), BigBirdModel, {"hf_parity": True}
    else:
        raise ValueError(f"model must be one of {HF_MODELS}, got {exp.model!r}")
    hf.save_pretrained(folder)
    return hf.eval(), ours_cls.from_pretrained(folder, **kwargs).eval()


class AttentionTimer:
    """Sums the wall time spent inside every ``attention.self`` module of a model (forward hooks)."""

    def __init__(self, model: nn.Module):
        self.total = 0.0
        self._start: dict[int, float] = {}
        self._handles = []
        for name, module in model.named_modules():
            if name.endswith("attention.self"):
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._exit))
        if not self._handles:
            raise ValueError(f"{type(model).__name__} has no attention.self modules to time")

    def _enter(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _exit(self, module, args, out):
        self.total += time.perf_counter() - self._start.pop(id(module))


def _inputs(exp: HFExperiment) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (1, exp.length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if exp.model == "longformer" and exp.global_tokens:
        glob = torch.zeros_like(ids)
        glob[:, : exp.global_tokens] = 1
        inputs["global_attention_mask"] = glob
    return inputs


def run_experiment(exp: HFExperiment, *, repeats: int = 3, log: Callable[[str], None] = print) -> HFResult:
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        hf, ours = build_pair(exp, Path(folder))
        inputs = _inputs(exp)
        models = {"hf": hf, "ours": ours}
        outs = {key: models[key](**inputs).last_hidden_state for key in models}  # warm-up, and the outputs
        # Hooks after the warm-up: transformers' BigBird swaps its attention modules on a short first call.
        timers = {"hf": AttentionTimer(hf), "ours": AttentionTimer(ours)}
        diff = float((outs["hf"] - outs["ours"]).abs().max())
        totals: dict[str, list[float]] = {"hf": [], "ours": []}
        attn: dict[str, list[float]] = {"hf": [], "ours": []}
        for rep in range(repeats):
            for key in ("hf", "ours"):  # alternating, so that load changes hit both alike
                timers[key].total = 0.0
                start = time.perf_counter()
                models[key](**inputs)
                totals[key].append(time.perf_counter() - start)
                attn[key].append(timers[key].total)
            log(f"  {exp.model} N={exp.length} repeat {rep + 1}/{repeats}: transformers {totals['hf'][-1]:.2f} s, "
                f"longattn {totals['ours'][-1]:.2f} s")
        # Memory last and apart from the timing: counting every tensor slows the call down.
        peaks = {key: peak_mb(lambda m=models[key]: m(**inputs), torch.device("cpu"), compiled=False)
                 for key in models}

    def median_ms(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2] * 1e3

    return HFResult(exp, median_ms(totals["hf"]), median_ms(totals["ours"]), median_ms(attn["hf"]),
                    median_ms(attn["ours"]), diff, peaks["hf"], peaks["ours"])


def format_table(results: list[HFResult]) -> str:
    headers = ["model", "N", "transformers ms", "longattn ms", "speedup", "attention ms (transformers / longattn)",
               "attention speedup", "rest ms (transformers / longattn)", "peak MB (transformers / longattn)",
               "max abs diff"]
    rows = []
    for r in results:
        rest_hf, rest_ours = r.hf_ms - r.hf_attention_ms, r.ours_ms - r.ours_attention_ms
        rows.append([r.exp.model, r.exp.length, r.hf_ms, r.ours_ms, f"{r.speedup:.2f}x",
                     f"{r.hf_attention_ms:.0f} / {r.ours_attention_ms:.0f}", f"{r.attention_speedup:.2f}x",
                     f"{rest_hf:.0f} / {rest_ours:.0f}", f"{r.hf_peak_mb:.1f} / {r.ours_peak_mb:.1f}", r.max_abs_diff])
    return markdown_table(headers, rows, formats=["", "d", ".0f", ".0f", "", "", "", "", "", ".1e"])


def run(models: list[str], lengths: list[int], *, depth: int = 12, dim: int = 768, heads: int = 12,
        repeats: int = 3, out_dir: Path | None = None) -> list[HFResult]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("longattn bench --hf needs transformers: pip install 'longattn[hf]'") from None
    results = [run_experiment(HFExperiment(m, n, depth=depth, dim=dim, heads=heads), repeats=repeats)
               for m in models for n in lengths]
    table = format_table(results)
    print(table)
    if out_dir is not None:
        write_json(out_dir / "bench_hf.json", [r.row() for r in results], indent=2)
        write_text(out_dir / "bench_hf.md", table + "\n")
        print(f"wrote {out_dir / 'bench_hf.json'}, {out_dir / 'bench_hf.md'}")
    return results
