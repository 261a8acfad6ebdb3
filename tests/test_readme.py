"""The README's usage example runs verbatim, and the CLI works headless (the examples of the pages in docs/ run
in test_docs.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longattn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs_verbatim():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    exec(compile(block, "README.md", "exec"), {})


def test_show_writes_png(tmp_path, capsys):
    out = tmp_path / "p.png"
    assert main(["show", "causal(sliding_window(8)) | global_tokens([0])", "--seq-len", "97", "--block", "16",
                 "--plot", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "density" in capsys.readouterr().out


def test_show_reports_bad_pattern(capsys):
    assert main(["show", "sliding_window(-1)", "--seq-len", "10", "--plot", "/dev/null"]) == 2
    assert "left must be >= 0" in capsys.readouterr().err


def test_bench_tiny_run_writes_json_and_csv(tmp_path, monkeypatch):
    from longattn.tools import bench

    monkeypatch.setattr(bench, "PAIRED_MAX_MS", float("inf"))  # pair with SDPA however slow a busy machine is
    assert main(["bench", "--patterns", "longformer_512", "--paths", "sdpa", "blocked", "auto", "--lengths", "1100",
                 "--heads", "2", "--head-dim", "16", "--min-run-time", "0.01", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {r["path"] for r in rows} == {"sdpa", "blocked", "auto"}
    assert all(r["time_ms"] > 0 and r["peak_mb"] is not None for r in rows)
    assert (tmp_path / "bench.csv").read_text().startswith("pattern,")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    blocked = next(r for r in rows if r["path"] == "blocked")
    assert blocked["vs_sdpa"] > 0 and 0 < blocked["of_matmul"] < 1.5
    assert blocked["sdpa_paired_ms"] > 0  # short inputs: SDPA timed alternately with the path
    summary = (tmp_path / "summary.txt").read_text()
    assert "longformer_512 fwd N=1100 fp32" in summary and "x SDPA" in summary and "of matmul rate" in summary
    assert "goals on this machine" in summary


def test_bench_summary_states_each_headline_ratio():
    from longattn.tools.bench import Experiment, Result, summary

    def result(path, n, dtype, ms, peak):
        return Result(Experiment("p", path, "fwd", n, dtype), ms, 1.0, 50.0, peak, 0.1)

    rows = [result("blocked", 8, "fp32", 10.0, 100.0), result("blocked", 16, "fp32", 20.0, 210.0),
            result("flex_plain", 16, "fp32", 30.0, None), result("sdpa", 16, "fp32", 80.0, 5.0),
            result("blocked", 16, "bf16", 16.0, 200.0)]
    lines = summary(rows, {"matmul_gflops": {"fp32": 100.0, "bf16": 50.0}})
    line16 = next(x for x in lines if "N=16 fp32" in x)
    assert "1.50x compiled flex" in line16 and "4.0x SDPA" in line16 and "50% of matmul rate" in line16
    assert "peak 2.10x N=8" in line16
    assert "bf16 1.25x fp32" in next(x for x in lines if "bf16" in x)


def test_bench_verdicts_judge_each_goal_on_its_worst_case():
    from longattn.tools.bench import Experiment, Result, verdict_table, verdicts

    def result(pattern, path, mode, n, dtype, ms, peak=None, gflops=None):
        return Result(Experiment(pattern, path, mode, n, dtype), ms, 1.0, gflops, peak, 0.1)

    rows = [result("longformer_512", "blocked", "fwd", 4096, "fp32", 10.0),
            result("longformer_512", "flex_plain", "fwd", 4096, "fp32", 20.0),
            result("bigbird_64", "blocked", "fwd", 8192, "fp32", 10.0),
            result("bigbird_64", "flex_plain", "fwd", 8192, "fp32", 12.0),
            result("bigbird_64", "blocked", "fwd+bwd", 8192, "fp32", 100.0, 100.0, 60.0),
            result("bigbird_64", "sdpa", "fwd+bwd", 8192, "fp32", 900.0),
            result("bigbird_64", "blocked", "fwd+bwd", 16384, "fp32", 200.0, 210.0, 60.0),
            result("bigbird_64", "blocked", "fwd+bwd", 8192, "bf16", 120.0)]
    machine = {"matmul_gflops": {"fp32": 100.0, "bf16": 200.0}, "device": "cpu", "threads": 2}
    by_goal = {v.goal.split(" (")[0]: v for v in verdicts(rows, machine)}
    flex = by_goal["CPU forward vs compiled FlexAttention"]
    assert flex.met is False and flex.measured.startswith("1.20 (bigbird_64 N=8192")  # the worst of 2.0 and 1.2
    assert by_goal["CPU forward+backward vs SDPA"].met is True
    assert by_goal["useful throughput, forward+backward"].met is True  # 60 of 100 GFLOP/s
    assert by_goal["bf16 faster than fp32"].met is False  # 120 ms against fp32's 100
    assert by_goal["memory linear in N"].met is True  # 2.1x
    assert by_goal["short inputs: auto vs SDPA"].met is None
    table = verdict_table(verdicts(rows, machine), machine)
    assert "NOT MET" in table and "matmul GFLOP/s fp32 100" in table


@pytest.mark.slow
def test_bench_quick_finishes(tmp_path):
    assert main(["bench", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0


def test_bench_under_load_times_idle_and_busy(capsys):
    from longattn.tools.contention import load_table, under_load

    results = under_load(["longformer_512"], [300], heads=2, head_dim=16, repeats=2, competitors=1)
    assert [r.path for r in results] == ["blocked longformer_512", "sdpa"]
    assert all(r.idle_ms > 0 and r.busy_ms > 0 and r.worst_slowdown >= r.slowdown for r in results)
    assert "slowdown" in load_table(results)
