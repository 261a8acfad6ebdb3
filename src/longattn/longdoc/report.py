"""``report.md`` + ``report.html`` of the LicenseDB benchmark, from the saved results alone.

Tables: retrieval overall (with each system's cost), by rule kind, by the length of the relevant license, the
beyond-512 slices with paired bootstrap margins; classification micro/macro-F1 with the excess fraction; the
trained long encoders' budgets; the long encoder's throughput and memory against dense attention. Plots: recall against the relevant
document's length per system, and quality against encoding time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import Report, markdown_table
from ..tools.viz import pyplot, save_figure
from .metrics import paired_bootstrap
from .retrieval import LENGTH_BUCKETS

KINDS = ("notice", "reference", "text", "tag")
#: (system, baseline) pairs whose margin on the beyond-512 slices the report bootstraps
MARGINS = (("minilm-long", "minilm-512"), ("minilm-long", "minilm-chunks-max"), ("minilm-long", "minilm-chunks-mean"),
           ("minilm-long-ft", "minilm-long"), ("minilm-long-ft", "minilm-512"), ("minilm-long-ft", "minilm-chunks-max"),
           ("minilm-long-mlm", "minilm-long"), ("paraformer", "minilm-512"), ("paraformer", "minilm-chunks-max"),
           ("minilm-chunks-max", "minilm-512"))
ATTRIBUTION = ("Data: ScanCode LicenseDB (licensedcode-data {version}), CC-BY-4.0, by nexB Inc. and the "
               "ScanCode contributors (https://scancode-licensedb.aboutcode.org). The license texts themselves "
               "are under their own terms.")


def _load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "slices.json"]


def _f(x: float) -> str:
    return f"{x:.3f}"


def _seconds(result: dict) -> float:
    return sum(result["seconds"].values())


def _subset(result: dict, rows: list[int], metric: str) -> float | None:
    values = [result["metrics"][metric][i] for i in rows]
    return sum(values) / len(values) if values else None


def retrieval_summary(results: list[dict]) -> str:
    rows = [[r["system"], *(_f(r["mean"][m]) for m in ("R@1", "R@5", "R@10", "MRR@10")), f"{_seconds(r):.0f}"]
            for r in results]
    return markdown_table(["system", "R@1", "R@5", "R@10", "MRR@10", "seconds"], rows, pad=True)


def classification_summary(results: list[dict]) -> str:
    rows = [[r["system"], _f(r["micro_f1"]), _f(r["macro_f1"]), f"{r['excess_fraction']:.2f}",
             f"{sum(r['seconds'].values()):.0f}"] for r in results]
    return markdown_table(["system", "micro-F1", "macro-F1", "excess fraction", "seconds"], rows, pad=True)


def stats_text(stats: dict) -> str:
    lines = [f"LicenseDB at {stats['source']}: {stats['licenses']} licenses ({stats['licenses_without_text']} "
             f"without text), {stats['rules']} rules",
             markdown_table(["category", "licenses"], list(stats["categories"].items()), pad=True),
             markdown_table(["rule kind", "rules"], list(stats["rule_kinds"].items()), pad=True)]
    lengths = [("license words", stats["license_words"]), ("rule words", stats["rule_words"])]
    if "license_tokens" in stats:
        lengths.append(("license tokens", stats["license_tokens"]))
    keys = list(stats["license_words"])
    lines.append(markdown_table(["length", *keys], [[n, *(v[k] for k in keys)] for n, v in lengths], pad=True))
    lines.append(f"retrieval: {stats['retrieval']}; classification: {stats['classification']}")
    return "\n\n".join(lines)


def _slice_rows(slices: dict) -> dict[str, list[int]]:
    n = len(slices["queries"])
    out = {f"kind {k}": [i for i in range(n) if slices["kind"][i] == k] for k in KINDS}
    for _, label in LENGTH_BUCKETS:
        out[f"length {label}"] = [i for i in range(n) if slices["bucket"][i] == label]
    out["beyond-512"] = [i for i in range(n) if slices["beyond"][i] is not None]
    out["beyond-512 (loose)"] = [i for i in range(n) if slices["beyond_loose"][i] is not None]
    return out


def _plots(retrieval: list[dict], rows: dict[str, list[int]], out: Path) -> list[str]:
    try:
        plt = pyplot()
    except ImportError:
        return []
    labels = [label for _, label in LENGTH_BUCKETS]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in retrieval:
        ys = [_subset(r, rows[f"length {b}"], "R@10") for b in labels]
        ax.plot(labels, [float("nan") if y is None else y for y in ys], marker="o", label=r["system"])
    counts = [len(rows[f"length {b}"]) for b in labels]
    ax.set(xlabel="tokens of the relevant license (queries: " + ", ".join(map(str, counts)) + ")",
           ylabel="Recall@10", title="recall against the relevant document's length")
    ax.legend(fontsize=7)
    save_figure(fig, out / "recall_vs_length.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in retrieval:
        ax.scatter(max(_seconds(r), 0.1), r["mean"]["MRR@10"])
        ax.annotate(r["system"], (max(_seconds(r), 0.1), r["mean"]["MRR@10"]), fontsize=7)
    ax.set(xscale="log", xlabel="seconds (encoding corpus + queries, training, scoring)", ylabel="MRR@10",
           title="quality against cost")
    save_figure(fig, out / "quality_vs_time.png", dpi=120)
    return ["recall_vs_length.png", "quality_vs_time.png"]


def _retrieval_sections(report: Report, retrieval: list[dict], slices: dict, out: Path) -> None:
    rows = _slice_rows(slices)
    n = len(slices["queries"])
    report.table(f"Retrieval: {n} test queries against {retrieval[0]['task']['corpus']} licenses",
                 ["system", "R@1", "R@5", "R@10", "MRR@10", "corpus s", "queries s", "train s", "total s"],
                 [[r["system"], *(r["mean"][m] for m in ("R@1", "R@5", "R@10", "MRR@10")),
                   r["seconds"].get("corpus", 0.0), r["seconds"].get("queries", 0.0), r["seconds"].get("train"),
                   _seconds(r)] for r in retrieval],
                 formats=["", ".3f", ".3f", ".3f", ".3f", ".0f", ".0f", ".0f", ".0f"])
    for title, prefix, metric in (("MRR@10 by rule kind", "kind ", "MRR@10"),
                                  ("Recall@10 by the length of the relevant license (tokens)", "length ", "R@10")):
        names = [k for k in rows if k.startswith(prefix)]
        report.table(title, ["system", *(f"{k[len(prefix):]} (n={len(rows[k])})" for k in names)],
                     [[r["system"], *(_subset(r, rows[k], metric) for k in names)] for r in retrieval],
                     formats=".3f")
    report.heading("Beyond 512 tokens")
    report.text("beyond-512: test queries found in a relevant license (at least half of their word 5-grams "
                "occur in it) only after the 510 text tokens a 512-token truncation keeps; loose: a tenth of "
                "the 5-grams suffices. Truncation cannot see the matching text of these queries.")
    slice_names = ["beyond-512", "beyond-512 (loose)"]
    report.table(None, ["system", *(f"{k} R@10 (n={len(rows[k])})" for k in slice_names),
                        *(f"{k} MRR@10" for k in slice_names)],
                 [[r["system"], *(_subset(r, rows[k], "R@10") for k in slice_names),
                   *(_subset(r, rows[k], "MRR@10") for k in slice_names)] for r in retrieval], formats=".3f")
    by = {r["system"]: r for r in retrieval}
    margin_rows = []
    for a, b in MARGINS:
        if a in by and b in by:
            for k in slice_names + ["all"]:
                idx = rows.get(k, list(range(n)))
                for metric in ("R@10", "MRR@10"):
                    m = paired_bootstrap(*(torch.tensor([by[s]["metrics"][metric][i] for i in idx]) for s in (a, b)))
                    margin_rows.append([f"{a} - {b}", k, metric, m["n"], m["diff"], m["low"], m["high"]])
    if margin_rows:
        report.table("Margins with 95% paired bootstrap intervals (2,000 resamples of the queries)",
                     ["systems", "queries", "metric", "n", "margin", "low", "high"], margin_rows,
                     formats=["", "", "", "", "+.3f", "+.3f", "+.3f"])
    for p in _plots(retrieval, rows, out):
        report.image(p)


def _how(result: dict) -> str:
    """A classification system's method: its probe, or its fine-tuning budget."""
    if result.get("probe"):
        return f"probe l2={result['probe']['l2']:g}{' balanced' if result['probe']['balanced'] else ''}"
    b = result["budget"]
    return f"fine-tuned {b['steps']} x {b['batch_size']}, {b['max_tokens']} tokens"


def _budget_section(report: Report, out: Path) -> None:
    """The budgets and loss histories of the trained long encoders (``longdoc.trained``' run folders)."""
    from .trained import RUNS, finished

    rows, histories = [], []
    for which, folder in RUNS.items():
        r = finished(out, which)
        if r is None:
            continue
        b = r["budget"]
        tokens = b.get("max_tokens", b.get("seq_len"))
        rows.append([folder, b["steps"], b["batch_size"], tokens, f"{b['lr']:g}", b["seconds"] / 60])
        first, last = r["history"][0], r["history"][-1]
        watched = next((k for k in ("val_loss", "val_macro_f1", "fixed_loss") if last.get(k) is not None), None)
        if watched:  # a run without validation data has none
            histories.append([folder, watched, first["step"], first.get(watched), last["step"], last[watched]])
    if not rows:
        return
    report.table("Trained long encoders: the budget (one process, 2-core CPU unless the machine line says "
                 "otherwise)", ["run", "steps", "texts per step", "tokens per text", "peak lr", "minutes"], rows,
                 formats=["", "", "", "", "", ".1f"])
    if histories:
        report.table("Their validation signal, first and last evaluation",
                     ["run", "measure", "step", "value", "step", "value"], histories,
                     formats=["", "", "", ".3f", "", ".3f"])


def write_report(out: Path | str) -> Path:
    """Write ``report.md``/``report.html`` (and the plots) into ``out`` from ``out/retrieval``,
    ``out/classification`` and ``out/throughput.json``."""
    out = Path(out)
    retrieval, classification = _load(out / "retrieval"), _load(out / "classification")
    if not retrieval and not classification:
        raise FileNotFoundError(f"{out}: no results to report (run `longattn longdoc run` first)")
    report = Report("Long legal documents: the ScanCode LicenseDB — longattn")
    try:
        from importlib.metadata import version

        report.text(ATTRIBUTION.format(version=version("licensedcode-data")))
    except Exception:  # a --data-dir copy without the package installed
        report.text(ATTRIBUTION.format(version="?"))
    machine = out / "machine.json"
    if machine.exists():
        m = json.loads(machine.read_text())
        report.text(f"Machine: {m.get('cpu', '?')}, {m.get('threads')} threads, torch {m.get('torch')}; matmul "
                    f"fp32 {m.get('fp32_gflops', 0):.0f} GFLOP/s, bf16 {m.get('bf16_gflops', 0):.0f} GFLOP/s.")
    if retrieval:
        slices = json.loads((out / "retrieval" / "slices.json").read_text())
        _retrieval_sections(report, retrieval, slices, out)
    if classification:
        c = classification[0]
        report.table(f"Classification: license text -> one of {len(c['task']['labels'])} categories "
                     f"({c['task']['sizes']['test']} test licenses)",
                     ["system", "micro-F1", "macro-F1", "excess fraction", "val macro-F1", "seconds", "how"],
                     [[r["system"], r["micro_f1"], r["macro_f1"], r["excess_fraction"], (r["val"] or {}).get("macro_f1"),
                       sum(r["seconds"].values()), _how(r)] for r in classification],
                     formats=["", ".3f", ".3f", ".2f", ".3f", ".0f", ""])
        report.text("seconds: features + probe for a probe (features from the embedding cache's recorded "
                    "encoding time), training + test prediction for a fine-tuned model.")
    _budget_section(report, out)
    throughput = out / "throughput.json"
    if throughput.exists():
        t = json.loads(throughput.read_text())
        report.table(f"The long encoder against the same weights with dense attention, one "
                     f"{t['rows'][0]['tokens']}-token document", ["attention", "mode", "ms", "tokens/s", "peak MB"],
                     [[r["attention"], r["mode"], r["ms"], r["tokens_per_s"], r["peak_mb"]] for r in t["rows"]],
                     formats=["", "", ".0f", ".0f", ".0f"])
        report.text("peak MB: the largest total of live tensors during the call (exact on CPU). train step: "
                    "forward + backward of a mean-square loss on the last hidden states.")
    return report.write(out)
