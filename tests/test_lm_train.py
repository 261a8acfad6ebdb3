"""longattn.lm: Transformer-XL byte-LM training (exact resume after a kill, torchrun DDP), schedule, loading,
and the ``longattn lm train|eval|generate`` command line.

Every run is the ``tiny`` preset on a synthetic ~100 KB corpus (random sentences over 20 words, learnable in
a few hundred tiny steps), never the 31 MB standard-library default.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longattn.cli import main
from longattn.lm import LMRunConfig, TrainConfig, load_corpus, load_lm, preset, train_lm
from longattn.lm.train import learning_rate
from longattn.training.setup import CHECKPOINT, MODEL_DIR, RESULT
from longattn.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200  # the shared run: long enough to be killed mid-run and to come in well under the unigram baseline
WORDS = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "a", "big", "red", "house", "def", "return",
         "self", "value", "print", "import", "lambda"]


def _text(size: int, seed: int = 0) -> bytes:
    """Sentences of 3-9 words drawn from ``WORDS``: about 1 bit per byte for a model that spells the words,
    4.1 for the unigram baseline."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + ".\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_bytes(_text(100_000))
    return path


@pytest.fixture(scope="module")
def corpus(corpus_file):
    return load_corpus(corpus_file)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use one thread, like the subprocesses (OMP_NUM_THREADS=1): tiny models gain nothing
    from more, and on a busy machine spinning threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _cli(*args, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    return subprocess.run([*launcher, "-m", "longattn.cli", *args], capture_output=True, text=True, env=_env(),
                          timeout=300)


def _train_args(corpus_file: Path, out: Path, *, steps: int = STEPS, dropout: float = 0.1) -> list[str]:
    """``lm train`` of the tiny preset; dropout by default, so that an exact resume needs the RNG states."""
    return ["lm", "train", "--preset", "tiny", "--steps", str(steps), "--eval-every", "5", "--dropout", str(dropout),
            "--corpus", str(corpus_file), "--out", str(out)]


def _small(corpus_file: Path, *, model: dict | None = None, **train) -> LMRunConfig:
    """12 tiny steps with dropout, evaluated at 5, 10 and 12: quick in-process runs."""
    return preset("tiny", model={"dropout": 0.1, **(model or {})}, train={"steps": 12, "eval_every": 5, **train},
                  corpus=str(corpus_file))


def _losses(result: dict) -> list[tuple]:
    """The history without its wall-clock seconds."""
    return [(h["step"], h["train_bpb"], h["val_bpb"], h["lr"]) for h in result["history"]]


def _assert_same_weights(model: torch.nn.Module, state_dict: dict) -> None:
    mine = model.state_dict()
    assert mine.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(mine[key], value), key


@pytest.fixture(scope="module")
def trained_run(corpus_file, tmp_path_factory) -> Path:
    """``lm train --preset tiny --steps 200 --dropout 0.1`` from the command line, uninterrupted."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    run = _cli(*_train_args(corpus_file, out))
    assert run.returncode == 0, run.stderr[-2000:]
    return out


# ---- training ----------------------------------------------------------------------------------------------

def test_resume_after_a_kill_gives_the_uninterrupted_run(corpus_file, trained_run, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "longattn.cli", *_train_args(corpus_file, out)]
    path = out / CHECKPOINT
    with open(tmp_path / "stderr.txt", "w") as log:  # not a pipe: an unread pipe would block tqdm's writes
        proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
        killed, deadline = False, time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                # The file is replaced atomically (os.replace), so a read sees a whole checkpoint.
                if path.exists() and 10 <= checkpoint.load(path)["step"] < STEPS:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None and not killed:
                proc.kill()
            proc.wait()
    assert killed and proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-run (exit {proc.returncode}): {(tmp_path / 'stderr.txt').read_text()[-2000:]}")
    assert not (out / RESULT).exists()
    last = checkpoint.load(path)  # the last one written before the kill, maybe a few steps after the poll
    assert 10 <= last["step"] < STEPS and last["memory"] is not None
    leftover = out / f".{CHECKPOINT}.0123abcd.tmp"  # what a kill inside a checkpoint write leaves
    leftover.write_bytes(b"half a checkpoint")

    rerun = _cli(*_train_args(corpus_file, out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not leftover.exists()  # the resume removed it
    resumed = json.loads((out / RESULT).read_text())
    whole = json.loads((trained_run / RESULT).read_text())
    # It resumed: the evaluations before the kill are the checkpoint's, wall-clock seconds included.
    assert resumed["history"][:len(last["history"])] == last["history"]
    assert resumed["steps"] == whole["steps"] == STEPS
    assert _losses(resumed) == _losses(whole)  # exact: the batch is a function of the step, the rest is saved
    _assert_same_weights(load_lm(out), checkpoint.load(trained_run / CHECKPOINT)["model"])


def test_stop_and_resume_in_process_equals_one_run_and_saves_the_memory(corpus_file, corpus, tmp_path):
    cfg = _small(corpus_file)
    whole = train_lm(cfg, out_dir=tmp_path / "whole", corpus=corpus, progress=False)
    part = train_lm(cfg, out_dir=tmp_path / "cut", corpus=corpus, progress=False, stop_after=7)
    assert part == {"finished": False, "step": 7}  # mid-interval: the running loss sum is in the checkpoint too
    state = checkpoint.load(tmp_path / "cut" / CHECKPOINT)
    assert state["step"] == 7 and [h["step"] for h in state["history"]] == [5]
    memory = state["memory"]
    assert isinstance(memory, list) and len(memory) == cfg.model.depth
    for m in memory:
        assert m.shape == (cfg.train.batch_size, cfg.model.mem_len, cfg.model.dim)
    resumed = train_lm(cfg, out_dir=tmp_path / "cut", corpus=corpus, progress=False)
    assert resumed["finished"] and _losses(resumed) == _losses(whole)

    # The memory matters: resuming from the same checkpoint without it gives other losses.
    checkpoint.save(tmp_path / "forgetful" / CHECKPOINT, {**state, "memory": None})
    forgetful = train_lm(cfg, out_dir=tmp_path / "forgetful", corpus=corpus, progress=False)
    assert _losses(forgetful)[0] == _losses(whole)[0] and _losses(forgetful)[1:] != _losses(whole)[1:]


@pytest.mark.parametrize("change", [{"seed": 1}, {"model": {"mem_len": 16}}], ids=["seed", "mem_len"])
def test_a_checkpoint_of_another_run_is_refused_unless_resume_is_off(corpus_file, corpus, tmp_path, change):
    train_lm(_small(corpus_file), out_dir=tmp_path, corpus=corpus, progress=False, stop_after=1)
    other = _small(corpus_file, **change)
    with pytest.raises(ValueError, match="another run"):
        train_lm(other, out_dir=tmp_path, corpus=corpus, progress=False)
    fresh = train_lm(other, out_dir=tmp_path, corpus=corpus, progress=False, resume=False, stop_after=2)
    assert fresh == {"finished": False, "step": 2}
    assert checkpoint.load(tmp_path / CHECKPOINT)["identity"]["config"] == other.to_dict()


def test_tiny_model_learns_below_the_unigram_baseline(trained_run):
    result = json.loads((trained_run / RESULT).read_text())
    vals = [h["val_bpb"] for h in result["history"]]
    assert [h["step"] for h in result["history"]] == list(range(5, STEPS + 1, 5))
    assert result["val_bpb"] == vals[-1] < 0.8 * result["unigram_bpb"]  # about 2.9 against 4.1
    assert vals[0] > result["unigram_bpb"] and vals[-1] < min(vals[:-1]) + 0.01


def test_torchrun_two_processes_train_like_one_with_the_whole_batch(corpus_file, corpus, tmp_path):
    # No dropout: each process draws its own dropout masks, so only a deterministic model trains alike.
    two = _cli(*_train_args(corpus_file, tmp_path / "two", steps=10, dropout=0.0), "--batch-size", "4", torchrun=2)
    assert two.returncode == 0, two.stderr[-2000:]
    cfg = preset("tiny", train={"steps": 10, "eval_every": 5, "batch_size": 4}, corpus=str(corpus_file))
    one = train_lm(cfg, out_dir=tmp_path / "one", corpus=corpus, progress=False)
    result = json.loads((tmp_path / "two" / RESULT).read_text())
    assert result["world_size"] == 2 and one["world_size"] == 1
    assert [h["step"] for h in result["history"]] == [h["step"] for h in one["history"]] == [5, 10]
    for h2, h1 in zip(result["history"], one["history"]):
        assert h2["train_bpb"] == pytest.approx(h1["train_bpb"], rel=1e-5, abs=1e-6)
        assert h2["val_bpb"] == pytest.approx(h1["val_bpb"], rel=1e-5, abs=1e-6)
    # Both processes' memories are in the checkpoint, in the global stream order.
    memories = [checkpoint.load(tmp_path / d / CHECKPOINT)["memory"] for d in ("two", "one")]
    for m2, m1 in zip(*memories):
        assert m2.shape == m1.shape == (4, cfg.model.mem_len, cfg.model.dim)
        torch.testing.assert_close(m2, m1, rtol=1e-4, atol=1e-4)


def test_learning_rate_warms_up_then_decays_by_cosine_to_zero_at_steps():
    t = TrainConfig(steps=100, lr=1e-3, warmup=10)
    lrs = [learning_rate(t, s) for s in range(t.steps + 1)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # then strictly down
    assert learning_rate(t, 55) == pytest.approx(0.5e-3)  # halfway through the decay
    assert lrs[100] == 0.0 and learning_rate(t, 150) == 0.0
    assert learning_rate(TrainConfig(steps=10, lr=1e-3, warmup=0), 0) == pytest.approx(1e-3)


# ---- loading and the command line -----------------------------------------------------------------------------

def test_load_lm_from_a_run_its_model_directory_or_a_checkpoint_only_run(corpus_file, corpus, trained_run, tmp_path):
    final = checkpoint.load(trained_run / CHECKPOINT)
    assert final["step"] == STEPS
    for path in (trained_run, trained_run / MODEL_DIR):
        model = load_lm(path)
        assert not model.training and model.cfg.to_dict() == final["identity"]["config"]["model"]
        _assert_same_weights(model, final["model"])
    cut = tmp_path / "cut"
    train_lm(_small(corpus_file), out_dir=cut, corpus=corpus, progress=False, stop_after=3)
    assert not (cut / MODEL_DIR).exists() and not (cut / RESULT).exists()
    _assert_same_weights(load_lm(cut), checkpoint.load(cut / CHECKPOINT)["model"])
    with pytest.raises(FileNotFoundError, match="not a model or LM run directory"):
        load_lm(tmp_path / "empty")


def test_cli_eval_reports_each_memory_length_and_the_recompute_speedup(corpus_file, trained_run, tmp_path):
    out = tmp_path / "eval.json"
    run = _cli("lm", "eval", str(trained_run), "--mem-len", "32", "64", "--max-bytes", "20000", "--recompute", "64",
               "--recompute-positions", "8", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["corpus"] == corpus_file.name and report["split"] == "test"  # the run's corpus, by default
    assert [row["mem_len"] for row in report["memory"]] == [32, 64]
    for row in report["memory"]:
        assert math.isfinite(row["bits_per_byte"]) and 0 < row["bits_per_byte"] < 8 and row["bytes"] > 0
    [recompute] = report["recompute"]
    assert recompute["context"] == 64 and recompute["speedup"] > 0
    assert math.isfinite(recompute["memory_bits_per_byte"]) and math.isfinite(recompute["recompute_bits_per_byte"])


def test_cli_generate_greedy_is_deterministic(trained_run, capsys):
    prompt = "the cat "
    args = ["lm", "generate", str(trained_run), "--prompt", prompt, "--bytes", "20", "--temperature", "0"]
    run = _cli(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout[:-1]  # print's newline
    assert text.startswith(prompt) and len(text.encode()) == len(prompt) + 20  # ASCII: the corpus is
    assert main(args) == 0
    assert capsys.readouterr().out == run.stdout  # same bytes in another process


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_cli_bad_run_directory_exits_2_naming_it(tmp_path, capsys, command):
    bad = tmp_path / "no-such-run"
    assert main(["lm", command, str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"longattn lm {command}: error: argument run: run '{bad}' does not exist" in err


def test_cli_eval_of_a_run_still_in_progress_uses_the_runs_corpus(corpus_file, corpus, tmp_path):
    run = tmp_path / "cut"
    train_lm(_small(corpus_file), out_dir=run, corpus=corpus, progress=False, stop_after=3)  # no result.json yet
    out = tmp_path / "eval.json"
    assert main(["lm", "eval", str(run), "--max-bytes", "2000", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["corpus"] == corpus_file.name and math.isfinite(report["memory"][0]["bits_per_byte"])


def test_sweep_trains_each_pattern_evaluates_each_memory_and_reuses_both(corpus_file, corpus, tmp_path):
    from longattn.lm.evaluate import evaluate
    from longattn.lm.sweep import run_sweep

    logged = []
    kwargs = dict(patterns=["full", "sliding_window(7, 0)"], preset_name="tiny", steps=6, mem_lens=[0, 32, 128],
                  max_bytes=3000, corpus=str(corpus_file), step_repeats=2, progress=False, log=logged.append)
    report = run_sweep(tmp_path, **kwargs)
    assert [r["pattern"] for r in report["rows"]] == ["full", "sliding_window(7, 0)"]
    assert sum(line.startswith("training ") for line in logged) == 2
    window = load_lm(tmp_path / "sliding_window_7_0")
    assert window.cfg.pattern == "sliding_window(7, 0)" and window.cfg.seg_len == 32
    direct = evaluate(window, corpus.test[:3000], seg_len=32, mem_len=128, batch=4)
    assert report["rows"][1]["memory"]["128"]["bits_per_byte"] == pytest.approx(direct.bits_per_byte, abs=1e-6)
    # the window reaches 8 keys: memory beyond that changes nothing; full attention uses it
    window_bpb = [report["rows"][1]["memory"][m]["bits_per_byte"] for m in ("32", "128")]
    assert window_bpb[0] == pytest.approx(window_bpb[1], abs=1e-5)
    table = (tmp_path / "sweep.md").read_text()
    assert "| full |" in table and "bpb, mem 128" in table and "unigram baseline" in table
    assert "s/step (paired)" in table and all(r["paired_seconds_per_step"] > 0 for r in report["rows"])
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    logged.clear()
    cached = (tmp_path / "full" / "evaluations.json").stat().st_mtime_ns
    again = run_sweep(tmp_path, **kwargs)  # finished runs and their evaluations are reused
    assert not any(line.startswith("training ") for line in logged)
    assert (tmp_path / "full" / "evaluations.json").stat().st_mtime_ns == cached
    for row in (*again["rows"], *report["rows"]):
        row.pop("paired_seconds_per_step")  # timed afresh, the rest reused
    assert again["rows"] == report["rows"]
    untimed = run_sweep(tmp_path, **{**kwargs, "step_repeats": 0})  # no pairing: the table has no such column
    assert "s/step (paired)" not in (tmp_path / "sweep.md").read_text() and len(untimed["rows"]) == 2
    with pytest.raises(ValueError, match="patterns"):
        run_sweep(tmp_path, **{**kwargs, "patterns": []})
