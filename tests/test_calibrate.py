"""``longattn calibrate``: the stored profile, where it lives, what reads it, and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import longattn as la
from conftest import forced_compute
from longattn.backends import machine
from longattn.cli import main
from longattn.tools import calibrate


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(tmp_path))
    machine.forget()
    yield tmp_path
    machine.forget()
    la.clear_caches()


def test_calibrate_measures_saves_and_dispatch_reads_it(cache, capsys):
    profile = calibrate.calibrate(min_run_time=0.01, progress=False)
    assert set(profile.matmul_gflops) == {"fp32", "bf16", "fp16"} and profile.matmul_gflops["fp32"] > 0
    assert profile.compute["bf16"] in ("fp32", "bf16") and set(profile.limits) >= {"fp32", "bf16"}
    assert profile.limits["fp32"].crossover in (0, *calibrate.LENGTHS) and profile.limits["fp32"].dense_fraction > 0
    assert profile.tile_overhead_scores > 0
    path = calibrate.save(profile)
    assert json.loads(open(path).read())["machine"] == machine.machine_key()
    assert machine.current().source == f"calibration {path}"
    q = torch.randn(1, 2, 4096, 16)
    assert la.explain(q, q, q, pattern=la.sliding_window(64)).profile == f"calibration {path}"
    assert main(["calibrate", "--show"]) == 0
    assert "calibration" in capsys.readouterr().out
    assert main(["calibrate"]) == 0  # already calibrated: shown, not measured again
    assert "already calibrated" in capsys.readouterr().out


def test_calibration_of_another_machine_or_torch_is_ignored(cache):
    other = dataclasses.replace(machine.DEFAULTS, source="calibration",
                                machine={**machine.machine_key(), "torch": "0.0.1"})
    machine.calibration_path(machine.machine_key()).parent.mkdir(parents=True, exist_ok=True)
    machine.calibration_path(machine.machine_key()).write_text(json.dumps(other.to_json()))
    assert machine.load_calibration() is None
    assert machine.current() is machine.DEFAULTS
    machine.calibration_path(machine.machine_key()).write_text("{not json")
    assert machine.load_calibration() is None


def test_without_calibration_bf16_computes_in_fp32_and_forcing_switches_it():
    assert machine.DEFAULTS.compute_dtype(torch.bfloat16) == torch.float32
    assert machine.DEFAULTS.compute_dtype(torch.float32) == torch.float32
    with forced_compute("bf16"):
        assert machine.compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert machine.compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16  # fast everywhere there


def test_tile_overhead_from_the_profile_changes_the_schedule():
    from longattn.backends.blocked import schedule

    pattern, geo = la.sliding_window(256), la.patterns.Geometry(2048, 2048, 4, 1)
    tiles = {}
    for overhead in (1, 10**9):
        with machine.use(dataclasses.replace(machine.DEFAULTS, tile_overhead_scores=overhead)):
            tiles[overhead] = len(schedule.get_schedule(pattern, geo, 64, torch.device("cpu")).tiles)
    assert tiles[1] > tiles[10**9]  # a costly tile: fewer, wider tiles
