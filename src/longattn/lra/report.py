"""``longattn lra report``: results folder -> Markdown and HTML page with the LRA tables and plots.

Layout of a results folder (what ``lra run`` / ``lra suite`` write)::

    OUT/runs/<task>/<attention>/result.json   one training run
    OUT/speed.json                            the speed/memory table (``speed.measure``)
    OUT/suite.json                            how the suite was run (quick or not, scale, seeds)

The accuracy table puts the LRA paper's Table 1 number beside ours where the setting matches (the task's
base config at full scale on the official data); reduced runs are ours alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import Report
from ..tools.viz import pyplot, save_figure

# LRA paper (Tay et al., 2021), Table 1: test accuracy (%) of the variants longattn implements.
PAPER_ACCURACY = {
    "full": {"listops": 36.37, "text": 64.27, "retrieval": 57.46, "image": 42.44, "pathfinder32": 71.40},
    "local": {"listops": 15.82, "text": 52.98, "retrieval": 53.39, "image": 41.46, "pathfinder32": 66.63},
    "strided": {"listops": 17.07, "text": 63.58, "retrieval": 59.59, "image": 44.24, "pathfinder32": 71.71},
    "longformer": {"listops": 35.63, "text": 62.85, "retrieval": 56.89, "image": 42.22, "pathfinder32": 69.71},
    "bigbird": {"listops": 36.05, "text": 64.02, "retrieval": 59.29, "image": 40.83, "pathfinder32": 74.87},
}
TASK_ORDER = ("listops", "text", "retrieval", "image", "pathfinder16", "pathfinder32", "pathfinder64", "pathfinder128")
ATTENTION_ORDER = ("full", "local", "longformer", "bigbird", "strided", "fixed", "moba", "combiner-fixed",
                   "combiner-axial", "fit", "nsa")


def load_results(out: Path) -> list[dict]:
    """Every finished run under ``out/runs``."""
    results = []
    for path in sorted((out / "runs").glob("*/*/result.json")):
        r = json.loads(path.read_text())
        if r.get("finished"):
            results.append(r)
    return results


def _order(values, preferred) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def accuracy_table(results: list[dict], *, paper_comparable: set[str] = frozenset()) -> list[list[str]]:
    """Rows: attention; columns: tasks (test accuracy %, the paper's beside it when comparable)."""
    tasks = _order([r["task"] for r in results], TASK_ORDER)
    attentions = _order([r["attention"] for r in results], ATTENTION_ORDER)
    by = {(r["task"], r["attention"]): r for r in results}
    header = ["attention"] + [f"{t} test % (val %)" for t in tasks]
    rows = [header]
    for a in attentions:
        row = [a]
        for t in tasks:
            r = by.get((t, a))
            cell = "—" if r is None else f"{_pct(r['test_acc'])} ({_pct(r['best_val_acc'])})"
            paper = PAPER_ACCURACY.get(a, {}).get(t)
            if t in paper_comparable and paper is not None and r is not None:
                cell += f" · paper {paper:.2f}"
            row.append(cell)
        rows.append(row)
    majority = ["majority class"]
    for t in tasks:
        r = next((r for r in results if r["task"] == t), None)
        majority.append(_pct(r["test_majority"]) if r else "—")
    rows.append(majority)
    return rows


def training_table(results: list[dict]) -> list[list[str]]:
    rows = [["task", "attention", "pattern", "params", "steps", "train s", "steps/s", "test %", "margin over majority"]]
    for r in sorted(results, key=lambda r: (TASK_ORDER.index(r["task"]) if r["task"] in TASK_ORDER else 99,
                                            _order([r["attention"]], ATTENTION_ORDER)[0])):
        rows.append([r["task"], r["attention"], r["pattern"], f"{r['params']:,}", str(r["steps"]),
                     f"{r['train_seconds']:.1f}", f"{r['steps_per_second']:.2f}", _pct(r["test_acc"]),
                     f"{100 * (r['test_acc'] - r['test_majority']):+.1f} points"])
    return rows


def _ratio(x: float | None) -> str:
    return "?" if not x else f"{x:.2f}×"


def speed_tables(speed: list[dict]) -> list[tuple[str, list[list[str]]]]:
    """LRA Table 2 layout, one table for time and one for memory: a row per attention and mode, a column
    per length; each cell gives the ratio to full attention (fused SDPA) and to vanilla full attention."""
    lengths = sorted({r["seq_len"] for r in speed})
    header = ["attention", "mode"] + [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths]
    keys = _order([(r["attention"], r["mode"]) for r in speed],
                  [(a, m) for a in ("vanilla",) + ATTENTION_ORDER for m in ("train", "infer")])
    by = {(r["attention"], r["mode"], r["seq_len"]): r for r in speed}
    time_rows, memory_rows = [header + ["backend"]], [header]
    for a, mode in keys:
        t_row, m_row = [a, mode], [a, mode]
        for n in lengths:
            r = by.get((a, mode, n))
            if r is None:
                t_row.append("—")
                m_row.append("—")
                continue
            t_row.append(f"{r['ms']:.0f} ms ({_ratio(r.get('speedup'))} / {_ratio(r.get('speedup_vs_vanilla'))})")
            m_row.append(f"{r['peak_mb']:.0f} MB ({_ratio(r.get('memory_ratio'))} / "
                         f"{_ratio(r.get('memory_vs_vanilla'))})")
        t_row.append(by.get((a, mode, lengths[-1]), {}).get("backend", "?"))
        time_rows.append(t_row)
        memory_rows.append(m_row)
    return [("Speed: time per step (speed-up over full / over vanilla full attention)", time_rows),
            ("Memory: extra peak of one step (ratio to full / to vanilla full attention)", memory_rows)]


def _plots(results: list[dict], speed: list[dict], out: Path) -> list[str]:
    try:
        plt = pyplot()
    except ImportError:  # matplotlib is the optional `viz` extra
        return []
    written = []
    if results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for task in _order([r["task"] for r in results], TASK_ORDER):
            rs = [r for r in results if r["task"] == task]
            ax.scatter([r["steps_per_second"] for r in rs], [100 * r["test_acc"] for r in rs], label=task)
            for r in rs:
                ax.annotate(r["attention"], (r["steps_per_second"], 100 * r["test_acc"]), fontsize=7)
            ax.axhline(100 * rs[0]["test_majority"], ls=":", lw=0.8, color=ax.collections[-1].get_facecolor()[0])
        ax.set(xlabel="training steps / s", ylabel="test accuracy (%)", title="accuracy vs speed (dotted: majority)")
        ax.legend(fontsize=8)
        save_figure(fig, out / "accuracy_vs_speed.png", dpi=120)
        written.append("accuracy_vs_speed.png")
    if speed:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for a in _order([r["attention"] for r in speed], ("vanilla",) + ATTENTION_ORDER):
            rs = sorted((r for r in speed if r["attention"] == a and r["mode"] == "train"), key=lambda r: r["seq_len"])
            if not rs:
                continue
            axes[0].plot([r["seq_len"] for r in rs], [r["ms"] for r in rs], marker="o", label=a)
            axes[1].plot([r["seq_len"] for r in rs], [r["peak_mb"] for r in rs], marker="o", label=a)
        axes[0].set(xlabel="sequence length", ylabel="ms per training step", title="training step time")
        axes[1].set(xlabel="sequence length", ylabel="peak MB of a training step", title="memory vs length")
        axes[0].legend(fontsize=8)
        save_figure(fig, out / "memory_vs_length.png", dpi=120)
        written.append("memory_vs_length.png")
    return written


def write_report(out: Path | str) -> Path:
    """Write ``report.md``, ``report.html`` and the plots into ``out``; returns the Markdown path."""
    out = Path(out)
    results = load_results(out)
    speed = json.loads((out / "speed.json").read_text())["rows"] if (out / "speed.json").exists() else []
    suite = json.loads((out / "suite.json").read_text()) if (out / "suite.json").exists() else {}
    if not results and not speed:
        raise FileNotFoundError(f"{out}: no runs/<task>/<attention>/result.json and no speed.json to report")
    comparable = set(suite.get("comparable", []))
    sections = [("Accuracy", accuracy_table(results, paper_comparable=comparable))] if results else []
    if results:
        sections.append(("Training runs", training_table(results)))
    if speed:
        sections += speed_tables(speed)
    plots = _plots(results, speed, out)
    report = Report("Long Range Arena — longattn")
    report.text(suite.get("description", "Long Range Arena results."))
    for title, rows in sections:
        report.table(title, rows[0], rows[1:])
    if speed:
        report.text("full = full attention through PyTorch's fused SDPA kernel (linear memory); vanilla = full "
                    "attention with the N x N scores stored, as LRA's Transformer computes it. train = forward, "
                    "backward and AdamW step; infer = forward. backend = what `auto` chose at the longest length.")
    for p in plots:
        report.image(p)
    return report.write(out)
