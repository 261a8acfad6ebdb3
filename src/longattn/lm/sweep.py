"""``longattn lm sweep``: the pattern x memory table of the byte LMs (Transformer-XL's patterns, Combiner, FIT).

One run per attention pattern, all with the same preset and number of steps (finished runs are reused,
interrupted ones resume), then each evaluated on one split at several memory lengths, by default the
training one, twice and four times it (the paper's claim: more memory at evaluation than in training lowers
bits per byte). Writes ``sweep.json``, ``sweep.md`` (the table) and ``sweep.png`` (bits per byte against
memory) into the output folder. Time per step is given twice: each run's own mean, and a median measured
with the patterns taking turns step by step (``paired_step_seconds``), the one to compare patterns by on a
machine whose speed drifts. Evaluations are kept in each run's ``evaluations.json`` and reused while the
run's weights are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from ..io import markdown_table, write_text
from ..training.run import finished_result, optimizer_step, write_result
from ..training.setup import MODEL_DIR, RESULT
from ..tools.viz import pyplot, save_figure
from .corpus import Corpus, load_corpus, num_segments, segment, streams, unigram_bits_per_byte
from .evaluate import evaluate
from .train import LMRunConfig, build_lm, load_lm, preset, train_lm

DEFAULT_PATTERNS = ("full", "window", "strided", "fixed", "bigbird", "combiner-fixed", "combiner-logsparse", "fit",
                    "moba", "nsa")
EVALUATIONS = "evaluations.json"


def run_dir_name(pattern: str) -> str:
    """A folder name for a preset name or a pattern expression."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", pattern).strip("_") or "pattern"


def _weights_digest(run: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((run / MODEL_DIR).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _evaluations(run: Path, key: dict, mem_lens: list[int], data: Tensor, progress: bool) -> dict[int, dict]:
    """Bits per byte and ms per byte of ``data`` at each memory length, from the cache when ``key`` matches."""
    path = run / EVALUATIONS
    cache = json.loads(path.read_text()) if path.exists() else {}
    if cache.get("key") != key:
        cache = {"key": key, "memory": {}}
    todo = [m for m in mem_lens if str(m) not in cache["memory"]]
    if todo:
        model = load_lm(run)
        for mem_len in todo:
            r = evaluate(model, data, seg_len=key["seg_len"], mem_len=mem_len, batch=key["batch"], progress=progress,
                         desc=f"{run.name} mem {mem_len}")
            cache["memory"][str(mem_len)] = {"bits_per_byte": r.bits_per_byte, "ms_per_byte": r.ms_per_byte,
                                             "bytes": r.bytes}
        write_result(path, cache)
    return {m: cache["memory"][str(m)] for m in mem_lens}


def paired_step_seconds(configs: dict[str, LMRunConfig], corpus: Corpus, *, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, optimizer) of each config, with a full memory.

    The configs take turns, one step each, ``repeats`` rounds: on a shared machine whose speed drifts, every
    config sees the same conditions, which the runs' own times (taken minutes apart) do not guarantee.
    """
    runs = {}  # name -> (model, optimizer, training streams)
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = build_lm(cfg.model).train()
        runs[name] = model, torch.optim.AdamW(model.parameters(), lr=cfg.train.lr), streams(corpus.train,
                                                                                              cfg.train.batch_size)
    memory = dict.fromkeys(configs)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for index in range(repeats + 2):  # two untimed rounds: warm-up, and the memory filled to mem_len
        for name, (model, optimizer, rows) in runs.items():
            cfg = configs[name]
            inputs, targets = segment(rows, index % num_segments(rows.shape[1], cfg.model.seg_len), cfg.model.seg_len)
            tick = time.perf_counter()
            out = model(inputs, memory[name], targets=targets)
            optimizer_step(model, optimizer, out.loss, cfg.train.grad_clip)
            if index >= 2:
                times[name].append(time.perf_counter() - tick)
            memory[name] = out.memory
    return {name: statistics.median(t) for name, t in times.items()}


def run_sweep(out: Path | str, *, patterns=DEFAULT_PATTERNS, preset_name: str = "small", steps: int = 300,
              mem_lens: list[int] | None = None, split: str = "test", max_bytes: int = 200_000, batch: int = 4,
              corpus: str | None = None, step_repeats: int = 5, progress: bool = True, log=print) -> dict:
    """Train and evaluate every pattern into ``out/<pattern>/``; returns (and writes) the sweep's rows.

    ``step_repeats``: rounds of ``paired_step_seconds`` (0: only the runs' own seconds per step).
    """
    out = Path(out)
    patterns = list(dict.fromkeys(patterns))  # each once
    if not patterns:
        raise ValueError("patterns must name at least one pattern")
    if steps < 1 or max_bytes < 1:
        raise ValueError(f"steps and max_bytes must be >= 1, got {steps} and {max_bytes}")
    data = load_corpus(corpus)
    base = preset(preset_name, corpus=corpus)
    mem_lens = sorted(set(mem_lens or [base.model.mem_len * k for k in (1, 2, 4)]))
    if min(mem_lens) < 0:
        raise ValueError(f"mem_lens must be >= 0, got {mem_lens}")
    test = data.split(split)[:max_bytes]
    rows, configs = [], {}
    for pattern in patterns:
        cfg = configs[pattern] = preset(preset_name, model={"pattern": pattern}, train={"steps": steps},
                                        corpus=corpus)
        run = out / run_dir_name(pattern)
        result = finished_result(run / RESULT, cfg.to_dict())
        if result is None:
            log(f"training {pattern} ({steps} steps of the {preset_name} preset) into {run}")
            result = train_lm(cfg, out_dir=run, corpus=data, progress=progress)
        key = {"weights": _weights_digest(run), "split": split, "max_bytes": max_bytes, "batch": batch,
               "seg_len": cfg.model.seg_len, "corpus": data.fingerprint}
        evals = _evaluations(run, key, mem_lens, test, progress)
        rows.append({"pattern": pattern, "params": result["params"], "seconds_per_step": result["seconds_per_step"],
                     "val_bpb": result["val_bpb"], "memory": {str(m): e for m, e in evals.items()}})
        log(f"{pattern:>10}: " + ", ".join(f"mem {m} {e['bits_per_byte']:.4f}" for m, e in evals.items())
            + " bits/byte")
    if step_repeats:
        log(f"timing training steps, the patterns taking turns ({step_repeats} rounds)")
        for row, seconds in zip(rows, paired_step_seconds(configs, data, repeats=step_repeats).values()):
            row["paired_seconds_per_step"] = seconds
    report = {"preset": preset_name, "steps": steps, "split": split, "bytes": int(test.numel()),
              "corpus": data.name, "train_mem_len": base.model.mem_len, "seg_len": base.model.seg_len,
              "mem_lens": mem_lens, "unigram_bpb": unigram_bits_per_byte(data.train, test), "rows": rows}
    write_result(out / "sweep.json", report)
    write_text(out / "sweep.md", table(report) + "\n")
    _plot(report, out / "sweep.png")
    return report


def table(report: dict) -> str:
    """The Markdown table: a row per pattern, bits per byte and evaluation speed per memory length."""
    mems = report["mem_lens"]
    paired = all("paired_seconds_per_step" in r for r in report["rows"])
    head = (["pattern", "params", "s/step (run)"] + ["s/step (paired)"] * paired + [f"bpb, mem {m}" for m in mems]
            + [f"ms/byte, mem {m}" for m in mems])
    formats = ["", "", ".2f"] + [".2f"] * paired + [".4f"] * len(mems) + [".3f"] * len(mems)
    rows = [[r["pattern"], f"{r['params'] / 1e6:.2f}M", r["seconds_per_step"]]
            + ([r["paired_seconds_per_step"]] if paired else [])
            + [r["memory"][str(m)]["bits_per_byte"] for m in mems]
            + [r["memory"][str(m)]["ms_per_byte"] for m in mems] for r in report["rows"]]
    lines = [markdown_table(head, rows, formats=formats)]
    lines.append(f"\n{report['split']} split, first {report['bytes']:,} bytes of {report['corpus']}; "
                 f"{report['steps']} steps of the {report['preset']} preset (segments of {report['seg_len']}, "
                 f"memory {report['train_mem_len']} in training); unigram baseline "
                 f"{report['unigram_bpb']:.3f} bits/byte. s/step (run): the run's mean training step; "
                 "(paired): the median step, the patterns taking turns on the same machine state.")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    try:
        plt = pyplot()
    except ImportError:  # matplotlib is the optional `viz` extra
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    mems = report["mem_lens"]
    for r in report["rows"]:
        ax.plot(mems, [r["memory"][str(m)]["bits_per_byte"] for m in mems], marker="o", label=r["pattern"])
    ax.axvline(report["train_mem_len"], ls=":", lw=0.8, color="grey")
    ax.set(xlabel="memory length at evaluation (dotted: training)", ylabel="bits per byte",
           title=f"{report['split']} bits per byte vs memory")
    if min(mems) > 0:
        ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
