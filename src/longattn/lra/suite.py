"""``longattn lra suite``: every task x every attention variant, the speed/memory table, the report.

The quick suite (``make demo``) generates ListOps and Pathfinder at a reduced scale, trains every variant
for about half a minute each on CPU, measures the speed/memory table at 1K-4K and writes the report. The
full suite runs LRA's six tasks with their published configs: generated tasks are generated at full size
when their files are absent, the others are read from ``--data-dir`` or skipped with the message that says
where to put the files. Finished runs are kept (a re-run skips them) and interrupted ones resume.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ..io import write_json
from ..training.progress import progress_bar
from ..training.run import finished_result
from . import speed as speed_mod
from .attentions import check_attention, suits
from .configs import LRAConfig, get_config, scaled
from .report import ATTENTION_ORDER, write_report
from .tasks import MissingDataError
from ..training.setup import RESULT
from .train import load_splits, make_task, train_run

QUICK_TASKS = ("listops", "pathfinder16")
FULL_TASKS = ("listops", "text", "retrieval", "image", "pathfinder32", "pathfinder128")


def task_data_dir(root: Path, cfg: LRAConfig, quick: bool) -> Path:
    return root / (f"{cfg.task}-quick" if quick else cfg.task)


def prepare_data(cfg: LRAConfig, root: Path, *, quick: bool, log=print):
    """The task reading its folder under ``root``, generating the data first when it can and must."""
    folder = task_data_dir(root, cfg, quick)
    task = make_task(cfg, folder)
    if not task.available():
        if not task.can_generate:
            raise MissingDataError(str(_missing_message(task)))
        log(f"generating {cfg.task} into {folder} ...")
        tick = time.perf_counter()
        task.generate(seed=cfg.seed, **(cfg.generate or {}))
        log(f"  done in {time.perf_counter() - tick:.1f} s")
    return task


def _missing_message(task) -> str:
    try:
        task.load("train")
    except MissingDataError as err:
        return str(err)
    return f"{task.name}: data missing in {task.data_dir}"


def _run_parallel(todo: list, jobs: int, progress: bool, log) -> None:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds OpenMP threads
    bar = progress_bar(progress, total=len(todo), desc="training runs", unit="run")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_run_in_worker, cfg.to_dict(), attention, str(task.data_dir), str(run_dir), 1):
                   (cfg.task, attention) for cfg, attention, task, run_dir in todo}
        for future in as_completed(futures):
            name, attention = futures[future]
            result = future.result()
            bar.update(1)
            _log_result(log, name, attention, result)
    bar.close()


def _finished(out: Path, cfg: LRAConfig, attention: str) -> dict | None:
    result = finished_result(out / RESULT, cfg.to_dict())
    return result if result is not None and result.get("attention") == attention else None


def _run_in_worker(cfg_dict: dict, attention: str, data_dir: str, run_dir: str, threads: int) -> dict:
    """One training run in a worker process with ``threads`` threads (the quick suite runs several at once)."""
    import torch

    torch.set_num_threads(threads)
    cfg = LRAConfig.from_dict(cfg_dict)
    return train_run(cfg, attention, data_dir=data_dir, out_dir=run_dir, progress=False)


def _log_result(log, name: str, attention: str, result: dict) -> None:
    log(f"{name:>13} {attention:>10}: test {100 * result['test_acc']:.1f}% "
        f"(majority {100 * result['test_majority']:.1f}%), {result['steps_per_second']:.1f} steps/s")


def run_suite(out: Path | str, *, quick: bool = False, data_dir: Path | str | None = None,
              tasks: list[str] | None = None, attentions: list[str] | None = None, scale: float = 1.0,
              speed: bool = True, speed_lengths=speed_mod.LENGTHS, jobs: int | None = None, progress: bool = True,
              log=print) -> Path:
    """Run the suite into ``out`` and return the report's path.

    ``jobs``: training runs at once, each in its own process with one thread (default: one per CPU core
    for the quick suite, whose tiny models gain nothing from a second thread; 1 with all threads
    otherwise). One thread per run also makes the numbers independent of the machine's core count.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_dir) if data_dir else out / "data"
    tasks = list(tasks or (QUICK_TASKS if quick else FULL_TASKS))
    attentions = list(attentions or ATTENTION_ORDER)
    for name in attentions:
        check_attention(name)
    jobs = jobs or ((os.cpu_count() or 1) if quick else 1)
    started = time.perf_counter()
    generated, skipped, todo = [], {}, []
    for name in tasks:
        cfg = scaled(get_config(name, quick=quick), scale)
        try:
            task = prepare_data(cfg, root, quick=quick, log=log)
        except MissingDataError as err:
            skipped[name] = str(err)
            log(f"skipping {name}: {err}")
            continue
        if task.can_generate:
            generated.append(name)
        for attention in attentions:
            if not suits(attention, name):  # combiner-axial: rows of an image, not of a token sequence
                continue
            run_dir = out / "runs" / name / attention
            result = _finished(run_dir, cfg, attention)
            if result is None:
                todo.append((cfg, attention, task, run_dir))
            else:
                _log_result(log, name, attention, result)
    if jobs == 1:
        loaded: dict[str, dict] = {}
        for cfg, attention, task, run_dir in todo:
            if cfg.task not in loaded:  # each task is loaded once for all its variants
                loaded[cfg.task] = load_splits(cfg, task)
            data = loaded[cfg.task]
            _log_result(log, cfg.task, attention, train_run(cfg, attention, data_dir=task.data_dir, out_dir=run_dir,
                                                             data=data, progress=progress))
    elif todo:
        _run_parallel(todo, jobs, progress, log)
    if speed:
        shape = speed_mod.QUICK_SHAPE if quick else speed_mod.TEXT_SHAPE
        # The quick suite times training only (the harder case, and the one FlexAttention cannot do on CPU).
        rows = speed_mod.measure(["vanilla", *attentions], speed_lengths, shape=shape,
                                 modes=("train",) if quick else ("train", "infer"),
                                 min_run_time=0.25 if quick else 1.0, progress=progress)
        write_json(out / "speed.json", {"shape": shape.__dict__, "rows": speed_mod.relative(rows)})
    description = (
        ("Quick suite (`longattn lra suite --quick`): generated ListOps and Pathfinder at a reduced scale, small "
         "models, a few hundred CPU steps per run; not comparable with the paper's numbers."
         if quick else f"Full suite at scale {scale}.")
        + f" Wall time {time.perf_counter() - started:.0f} s."
        + ("" if not skipped else " Skipped (no data): " + ", ".join(skipped) + "."))
    # The paper's numbers sit beside ours only at its setting: full configs on the official data (ListOps
    # is generated by the original's procedure either way; generated Pathfinder images are not the release).
    comparable = [] if quick or scale != 1 else [t for t in tasks if t not in skipped
                                                   and (t == "listops" or t not in generated)]
    write_json(out / "suite.json", {"quick": quick, "scale": scale, "tasks": tasks, "attentions": attentions,
                                    "generated": generated, "comparable": comparable, "skipped": skipped,
                                    "description": description})
    return write_report(out)

