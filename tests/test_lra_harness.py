"""The LRA harness: encoder classifier, configs, checkpoints, training loop (resume, determinism), report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import longattn as la
from longattn.training import checkpoint
from longattn.lra import train as train_mod
from longattn.lra.attentions import ATTENTIONS, build_attention
from longattn.lra.configs import BASE, QUICK, LRAConfig, ModelShape, Training, get_config, scaled
from longattn.lra.report import write_report
from longattn.lra.tasks import Split, Task
from longattn.models import EncoderConfig, SparseEncoderClassifier

ROOT = Path(__file__).resolve().parents[1]


class Majority(Task):
    """In-memory task: most tokens of a row repeat one value v, the class is v mod 4 (learnt in a few steps)."""

    name, num_classes, vocab_size, pooling = "fake", 4, 16, "cls"
    seq_len = 40

    def load(self, split):
        gen = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        n = {"train": 256, "val": 64, "test": 64}[split]
        value = torch.randint(1, 16, (n, 1), generator=gen)
        noise = torch.randint(1, 16, (n, self.seq_len), generator=gen)
        tokens = torch.where(torch.rand(n, self.seq_len, generator=gen) < 0.6, value, noise)
        lengths = torch.randint(10, self.seq_len + 1, (n,), generator=gen)
        return Split(tokens.to(torch.int16), lengths, value[:, 0] % 4)


def tiny_config(**train) -> LRAConfig:
    return LRAConfig("fake", ModelShape(dim=16, depth=1, heads=2, ffn_dim=32, dropout=0.1, attn_dropout=0.1),
                     Training(**{"steps": 12, "batch_size": 8, "lr": 3e-3, "weight_decay": 0.01, "warmup": 2,
                                 "schedule": "cosine", "eval_every": 4, "eps": 1e-8, **train}))


@pytest.fixture
def fake_task(monkeypatch):
    monkeypatch.setattr(train_mod, "get_task", lambda name, data_dir: Majority(data_dir))


# ---- model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_never_changes_the_output(pooling):
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=16, num_classes=3, max_len=30, dim=16, depth=2, heads=2, ffn_dim=32,
                        dropout=0.0, attn_dropout=0.0, pooling=pooling)
    model = SparseEncoderClassifier(cfg, la.sliding_window(4)).eval()
    tokens = torch.randint(1, 16, (2, 30))
    lengths = torch.tensor([30, 11])
    garbage = tokens.clone()
    garbage[1, 11:] = torch.randint(1, 16, (19,))
    torch.testing.assert_close(model(tokens, lengths), model(garbage, lengths))
    alone = model(tokens[1:, :11], lengths[1:])
    torch.testing.assert_close(model(tokens, lengths)[1:], alone, atol=1e-5, rtol=1e-5)


def test_pair_model_and_errors():
    cfg = EncoderConfig(vocab_size=8, num_classes=2, max_len=12, dim=16, depth=1, heads=2, ffn_dim=16, pair=True,
                        qkv_dim=8, learned_positions=False)
    model = SparseEncoderClassifier(cfg)
    t, n = torch.randint(0, 8, (3, 12)), torch.full((3,), 12)
    assert model(t, n, t, n).shape == (3, 2)
    with pytest.raises(ValueError, match="tokens2"):
        model(t, n)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(3, 13, dtype=torch.long), n, t, n)
    with pytest.raises(ValueError, match="divisible by heads"):
        EncoderConfig(vocab_size=8, num_classes=2, max_len=12, dim=16, heads=3)
    with pytest.raises(ValueError, match="pooling"):
        EncoderConfig(vocab_size=8, num_classes=2, max_len=12, pooling="max")


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_every_variant_builds_and_matches_the_dense_oracle(name):
    """The model with variant `name` gives the same logits on the blocked and the dense backend."""
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=16, num_classes=3, max_len=96, dim=32, depth=1, heads=2, ffn_dim=32,
                        dropout=0.0, attn_dropout=0.0)
    settings = {"local": {"window": 16}, "longformer": {"window": 16}, "bigbird": {"block": 8},
                "moba": {"block": 16, "top_k": 2}, "nsa": {"cmp_length": 16, "cmp_stride": 8, "select_block": 16,
                                                           "select_top": 3, "window": 16}}.get(name)
    pattern = build_attention(name, cfg.seq_len, settings)
    tokens, lengths = torch.randint(1, 16, (2, 96)), torch.tensor([96, 50])
    outs = []
    for backend in ("dense", "blocked"):
        torch.manual_seed(1)
        outs.append(SparseEncoderClassifier(cfg, pattern, backend=backend)(tokens, lengths))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_attention_expressions_and_bad_names():
    assert build_attention("sliding_window(4) | global_tokens([0])", 50).name
    assert build_attention("full", 50) is None
    with pytest.raises(ValueError, match="attention must be one of"):
        build_attention("performer", 50)
    with pytest.raises(ValueError, match="bad settings"):
        build_attention("local", 50, {"widow": 3})


# ---- configs -----------------------------------------------------------------------------------------------

def test_base_configs_are_lras():
    assert BASE["listops"].model == ModelShape(dim=512, depth=6, heads=8, ffn_dim=2048)
    assert BASE["listops"].train.batch_size == 32 and BASE["listops"].train.schedule == "rsqrt"
    assert BASE["pathfinder32"].model.qkv_dim == 64 and not BASE["pathfinder32"].model.learned_positions
    assert BASE["text"].max_len == 4000 and BASE["retrieval"].max_len == 4000
    assert set(QUICK) <= set(BASE)


def test_scale_shrinks_and_round_trips():
    small = scaled(get_config("text"), 0.25)
    assert small.model.dim == 64 and small.model.depth == 1 and small.train.steps == 5000
    assert small.model.dim % small.model.heads == 0 and small.train_fraction == 0.25
    assert LRAConfig.from_dict(json.loads(json.dumps(small.to_dict()))) == small
    with pytest.raises(ValueError, match="scale"):
        scaled(get_config("text"), 0)


def test_schedules():
    cfg = get_config("listops")
    lrs = [train_mod.learning_rate(cfg, s) for s in (0, 499, 999, 3999)]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[3] == pytest.approx(lrs[2] / 2, rel=1e-3)  # rsqrt after warm-up
    cos = get_config("image")
    assert train_mod.learning_rate(cos, cos.train.steps - 1) < 1e-3 * cos.train.lr


# ---- checkpoints -------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_atomicity(tmp_path):
    state = {"model": {"w": torch.randn(3, 2)}, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                                                             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.98)}]},
             "history": [{"step": 1, "loss": 0.5}], "rng": [torch.get_rng_state()], "none": None}
    path = checkpoint.save(tmp_path / "c.safetensors", state)
    back = checkpoint.load(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and 0 in back["optimizer"]["state"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98) and back["history"] == state["history"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left behind
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.safetensors"):
        checkpoint.load(tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="cannot store"):
        checkpoint.save(tmp_path / "d.safetensors", {"x": object()})


# ---- training loop -----------------------------------------------------------------------------------------

def test_training_learns_and_is_deterministic(tmp_path, fake_task):
    cfg = tiny_config(steps=40, eval_every=20, lr=1e-2)
    a = train_mod.train_run(cfg, "longformer", data_dir=tmp_path, out_dir=tmp_path / "a", progress=False)
    b = train_mod.train_run(cfg, "longformer", data_dir=tmp_path, out_dir=tmp_path / "b", progress=False)
    assert a["history"][-1]["loss"] < a["history"][0]["loss"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["test_acc"] == b["test_acc"] and a["test_acc"] > a["test_majority"]
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    assert saved["test_acc"] == a["test_acc"] and "sliding_window" in saved["pattern"]


def test_resume_after_a_stop_gives_the_same_run(tmp_path, fake_task):
    cfg = tiny_config()
    whole = train_mod.train_run(cfg, "bigbird", data_dir=tmp_path, out_dir=tmp_path / "whole", progress=False)
    part = train_mod.train_run(cfg, "bigbird", data_dir=tmp_path, out_dir=tmp_path / "cut", progress=False,
                               stop_after=6)  # mid-interval: the loss sum since the last evaluation is kept
    assert part == {"finished": False, "step": 6}
    resumed = train_mod.train_run(cfg, "bigbird", data_dir=tmp_path, out_dir=tmp_path / "cut", progress=False)
    assert resumed["history"] == [{**h, "seconds": r["seconds"]} for h, r in zip(whole["history"],
                                                                                  resumed["history"])]
    assert resumed["test_acc"] == whole["test_acc"]
    other = replace(cfg, seed=1)
    with pytest.raises(ValueError, match="another run"):
        train_mod.train_run(other, "bigbird", data_dir=tmp_path, out_dir=tmp_path / "cut", progress=False)


def test_heads_must_fit_a_per_head_variant(tmp_path, fake_task):
    cfg = replace(tiny_config(), model=replace(tiny_config().model, heads=1))
    with pytest.raises(ValueError, match="alternates over 2 heads"):
        train_mod.train_run(cfg, "strided", data_dir=tmp_path, out_dir=tmp_path / "x", progress=False)


# ---- report --------------------------------------------------------------------------------------------------

def test_report_from_results(tmp_path, fake_task):
    cfg = tiny_config(steps=4)
    for attention in ("full", "local"):
        train_mod.train_run(cfg, attention, data_dir=tmp_path, out_dir=tmp_path / "runs" / "fake" / attention,
                            progress=False)
    speed = [{"attention": a, "seq_len": 1024, "mode": "train", "ms": ms, "steps_per_second": 1e3 / ms,
              "peak_mb": mb, "backend": "dense", "speedup": 100 / ms, "memory_ratio": mb / 10}
             for a, ms, mb in (("full", 100, 10), ("local", 50, 5))]
    (tmp_path / "speed.json").write_text(json.dumps({"rows": speed}))
    md = write_report(tmp_path).read_text()
    assert "| full |" in md and "| local |" in md and "2.00×" in md and "Memory" in md and "majority class" in md
    assert (tmp_path / "report.html").exists() and (tmp_path / "memory_vs_length.png").exists()


# ---- command line and torchrun -----------------------------------------------------------------------------

def _cli(*args, torchrun: int = 0, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    return subprocess.run([*launcher, "-m", "longattn.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_torchrun_two_processes_train_like_one_with_the_whole_batch(tmp_path):
    data = tmp_path / "listops"
    gen = _cli("lra", "generate", "--task", "listops", "--data-dir", str(data), "--set", "num_train=64",
               "num_val=16", "num_test=16", "min_length=10", "max_length=60", "max_depth=4")
    assert gen.returncode == 0, gen.stderr
    common = ["lra", "run", "--task", "listops", "--attention", "longformer", "--quick", "--no-generate",
              "--data-dir", str(data), "--max-len", "64", "--steps", "6", "--batch-size", "8", "--eval-every", "3",
              "--no-progress"]
    one = _cli(*common, "--out", str(tmp_path / "one"))
    two = _cli(*common, "--out", str(tmp_path / "two"), torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    results = [json.loads((tmp_path / d / "runs/listops/longformer/result.json").read_text()) for d in ("one", "two")]
    assert results[1]["world_size"] == 2
    for h1, h2 in zip(results[0]["history"], results[1]["history"]):
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5, abs=1e-6)
        assert h1["val_acc"] == h2["val_acc"]
    assert results[0]["test_acc"] == results[1]["test_acc"]


def test_quick_suite_end_to_end_and_rerun_skips(tmp_path, monkeypatch):
    """The suite generates data, trains each variant, times them and writes the report; a re-run reuses
    finished runs. (The real quick configs are exercised by `make demo`; here they are shrunk.)"""
    from longattn.lra import configs, suite

    tiny = replace(configs.QUICK["listops"], max_len=64, model=ModelShape(dim=16, depth=1, heads=2, ffn_dim=16),
                   train=replace(configs.QUICK["listops"].train, steps=3, eval_every=3, batch_size=4),
                   generate={"min_length": 10, "max_length": 60, "max_depth": 4, "num_train": 16, "num_val": 8,
                             "num_test": 8})
    monkeypatch.setitem(configs.QUICK, "listops", tiny)
    logs = []
    report = suite.run_suite(tmp_path, quick=True, tasks=["listops"], attentions=["full", "strided"],
                             speed_lengths=(64,), jobs=1, progress=False, log=logs.append)
    md = report.read_text()
    assert "| strided |" in md and "vanilla" in md and "Quick suite" in md
    assert (tmp_path / "runs/listops/strided/result.json").exists() and (tmp_path / "data/listops-quick").is_dir()
    logs.clear()
    suite.run_suite(tmp_path, quick=True, tasks=["listops"], attentions=["full", "strided", "combiner-axial"],
                    speed=False, jobs=1, progress=False, log=logs.append)
    assert not any("generating" in line for line in logs) and len(logs) == 2  # both runs reused
    assert not (tmp_path / "runs/listops/combiner-axial").exists()  # rows of an image: not run on ListOps


# --- Combiner, FIT and NSA as LRA variants ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["combiner-fixed", "combiner-logsparse", "combiner-axial", "combiner-mixture",
                                  "fit", "nsa"])
def test_combiner_fit_and_nsa_variants_train_and_ignore_padding(name):
    from longattn.models import CombinerMixer, FITMixer, NSAMixer

    settings = {"cmp_length": 8, "cmp_stride": 4, "select_block": 8, "select_top": 3, "window": 8} if name == "nsa" \
        else None
    mixer = build_attention(name, 65, settings)
    assert isinstance(mixer, {"fit": FITMixer, "nsa": NSAMixer}.get(name, CombinerMixer))
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=20, num_classes=3, max_len=64, dim=16, depth=2, heads=2, ffn_dim=32,
                        dropout=0.0, attn_dropout=0.0, pooling="cls")
    model = SparseEncoderClassifier(cfg, mixer).double()
    tokens = torch.randint(1, 20, (2, 64))
    logits = model(tokens, torch.tensor([64, 40]))
    logits.sum().backward()
    unused = {"fit.norm_latents.weight", "fit.norm_latents.bias"}  # FIT's latent output: no classifier reads it
    assert all(p.grad is not None for n, p in model.named_parameters() if n not in unused)
    alone = model(tokens[1:, :40], torch.tensor([40]))
    torch.testing.assert_close(logits[1:], alone, atol=1e-10, rtol=1e-10)  # padding never reaches a real row
    with pytest.raises(ValueError, match="depends on absolute positions"):
        model.encode_documents([tokens[0, :10], tokens[1, :12]])


def test_variant_settings_reach_the_mixer():
    assert build_attention("combiner-axial", 1024, {"region": 32}).region == 32
    fit = build_attention("fit", 2048, {"group_size": 16, "latents": 2})
    assert (fit.group(2048), fit.latents) == (16, 2)
    assert build_attention("fit", 2048).group(2048) == 40  # (2 L m^2)^(1/3) = 40.3 for L = 2048, m = 4
    assert {"combiner-fixed", "combiner-axial", "fit"} <= set(ATTENTIONS)


def test_layer_cost_builds_every_layer_and_fits_slopes():
    from longattn.tools.layer_cost import LAYERS, LayerRow, build_layer, layer_table, run, slope

    for name in LAYERS:
        out = run(build_layer(name, 50, dim=16, heads=2), torch.randn(1, 50, 16))
        assert out.shape == (1, 50, 16)
    rows = [LayerRow("full", n, "fwd", 1e-3 * n**2, None) for n in (256, 512, 1024)]
    assert slope(rows, "full", "fwd") == pytest.approx(2.0)
    assert "| full | 65.5 | 262.1 | 1048.6 | 2.00 | N^2 |" in layer_table(rows)
