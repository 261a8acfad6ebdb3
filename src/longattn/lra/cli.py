"""``longattn lra ...``: run, suite, report, generate, stats (argparse wiring for ``longattn.cli``)."""

from __future__ import annotations

import argparse
import ast
import json
import os
from dataclasses import replace
from pathlib import Path

from ..argtypes import ExistingPath, fraction, positive_float, positive_int, seed
from ..io import write_json
from ..training.setup import add_run_arguments, run_options
from .tasks import GENERATED_TASKS, TASK_NAMES


def _settings(pairs: list[str]) -> dict:
    """``["max_depth=6", "num_train=1000"]`` -> ``{"max_depth": 6, "num_train": 1000}`` (values are Python
    literals)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _config(args: argparse.Namespace):
    from .configs import get_config, scaled

    cfg = scaled(get_config(args.task, quick=args.quick), args.scale)
    train = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr),
                               ("eval_every", args.eval_every)) if v is not None}
    if train:
        cfg = replace(cfg, train=replace(cfg.train, **train))
    if args.max_len is not None:
        cfg = replace(cfg, max_len=args.max_len)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    return cfg


def _data_root(args) -> Path:
    return Path(args.data_dir) if args.data_dir else Path("data") / "lra"


def _cmd_run(args: argparse.Namespace) -> int:
    from .attentions import check_attention
    from .suite import prepare_data
    from .train import load_splits, train_run

    check_attention(args.attention)
    cfg = _config(args)
    task = prepare_data(cfg, _data_root(args), quick=args.quick) if not args.no_generate else None
    out = Path(args.out) / "runs" / cfg.task / args.attention.replace("/", "_")
    data_dir = task.data_dir if task is not None else _data_root(args)
    result = train_run(cfg, args.attention, data_dir=data_dir, out_dir=out, **run_options(args),
                       data=load_splits(cfg, task) if task is not None else None)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the first process speaks for all
        return 0
    if result.get("finished"):
        print(f"{cfg.task}/{args.attention}: test accuracy {100 * result['test_acc']:.2f}% (majority "
              f"{100 * result['test_majority']:.2f}%), {result['steps_per_second']:.2f} steps/s; wrote {out}")
    else:
        print(f"stopped at step {result['step']}; the checkpoint in {out} resumes it")
    return 0


def _cmd_suite(args: argparse.Namespace) -> int:
    from .suite import run_suite

    report = run_suite(args.out, quick=args.quick, data_dir=args.data_dir, tasks=args.tasks,
                       attentions=args.attentions, scale=args.scale, speed=not args.no_speed, jobs=args.jobs,
                       progress=not args.no_progress)
    print(f"wrote {report} and {report.with_suffix('.html')}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.out)
    print(path.read_text())
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .tasks import get_task

    task = get_task(args.task, args.data_dir)
    quiet = {"progress": False} if args.no_progress else {}  # otherwise a bar for large sets only
    task.generate(seed=args.seed or 0, **quiet, **_settings(args.set))
    print(f"wrote {task.name} into {args.data_dir}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .tasks import get_task

    stats = get_task(args.task, args.data_dir).statistics()
    if args.json == "-":
        print(json.dumps(stats, indent=1))
        return 0
    if args.json:
        write_json(args.json, stats)
    for split, values in stats.items():
        print(f"[{split}]" if isinstance(values, dict) else f"{split}: {values}")
        if isinstance(values, dict):
            for key, value in values.items():
                print(f"  {key}: {_short(value)}")
    return 0


def _short(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def add_parser(sub) -> None:
    """Add ``lra`` and its sub-commands to the ``longattn`` parser."""
    from .attentions import ATTENTIONS
    from .report import ATTENTION_ORDER
    from .suite import FULL_TASKS, QUICK_TASKS

    lra = sub.add_parser("lra", help="Long Range Arena: train, time and report every attention variant")
    cmds = lra.add_subparsers(dest="lra_command", required=True)
    task_names = list(TASK_NAMES) + ["pathx"]

    run = cmds.add_parser("run", help="train one attention variant on one task")
    run.add_argument("--task", required=True, choices=task_names, help="LRA task")
    run.add_argument("--attention", required=True,
                     help=f"one of {', '.join(ATTENTIONS)}, or a pattern expression like 'sliding_window(64)'")
    run.add_argument("--quick", action="store_true", help="the quick suite's reduced config and generated data")
    run.add_argument("--scale", type=fraction, default=1.0, help="shrink widths, depth, steps and data (0, 1]")
    run.add_argument("--steps", type=positive_int, help="training steps (default: the task config's)")
    run.add_argument("--batch-size", type=positive_int,
                     help="global batch, split over torchrun processes (default: the "
"task config's)")
    run.add_argument("--lr", type=positive_float, help="peak learning rate (default: the task config's)")
    run.add_argument("--eval-every", type=positive_int, help="steps between evaluations (default: the task config's)")
    run.add_argument("--max-len", type=positive_int, help="input length (default: the task's)")
    run.add_argument("--seed", type=seed, help="default: the task config's (0)")
    run.add_argument("--data-dir", help="folder of the task folders (default: data/lra)")
    run.add_argument("--no-generate", action="store_true", help="read --data-dir as the task's own folder as is")
    run.add_argument("--out", default="results/lra", help="output folder (the run goes to runs/<task>/<attention>)")
    add_run_arguments(run)
    run.set_defaults(func=_cmd_run)

    suite = cmds.add_parser("suite", help="every task x attention, the speed/memory table and the report")
    suite.add_argument("--quick", action="store_true", help="generated ListOps + Pathfinder, reduced (make demo)")
    suite.add_argument("--tasks", nargs="+", choices=task_names, metavar="TASK",
                       help=f"of {' '.join(task_names)} (default: {' '.join(FULL_TASKS)}; with --quick "
                            f"{' '.join(QUICK_TASKS)})")
    suite.add_argument("--attentions", nargs="+", metavar="ATTENTION",
                       help=f"of {' '.join(ATTENTIONS)} or pattern expressions (default: "
                            f"{' '.join(ATTENTION_ORDER)})")
    suite.add_argument("--scale", type=fraction, default=1.0, help="shrink widths, depth, steps and data (0, 1]")
    suite.add_argument("--data-dir", help="folder of the task folders (default: data/lra)")
    suite.add_argument("--out", default="results/lra", help="output folder: runs/, speed.json, report.md")
    suite.add_argument("--no-speed", action="store_true", help="skip the speed/memory table")
    suite.add_argument("--jobs", type=positive_int,
                       help="training runs at once, one thread each (default: cores if --quick)")
    suite.add_argument("--no-progress", action="store_true", help="no progress bars")
    suite.set_defaults(func=_cmd_suite)

    report = cmds.add_parser("report", help="write report.md/report.html from a results folder")
    report.add_argument("--out", default="results/lra", help="results folder to read and write the report into")
    report.set_defaults(func=_cmd_report)

    gen = cmds.add_parser("generate", help="write a synthetic dataset in the official format (ListOps, Pathfinder)")
    gen.add_argument("--task", required=True, choices=list(GENERATED_TASKS) + ["pathx"],
                     help="listops or a pathfinder size (the "
"other tasks read the official files)")
    gen.add_argument("--data-dir", required=True, help="the task's own folder")
    gen.add_argument("--seed", type=seed, default=0, help="random seed of the generator")
    gen.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                     help="generator settings, e.g. max_depth=6 num_train=1000 (fields of ListOpsSettings, "
                          "PathfinderSettings)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar (default: one for large sets)")
    gen.set_defaults(func=_cmd_generate)

    stats = cmds.add_parser("stats", help="statistics of a task's data (lengths, labels, task-specific)")
    stats.add_argument("--task", required=True, choices=task_names, help="LRA task")
    stats.add_argument("--data-dir", required=True, type=ExistingPath("data folder", folder=True),
                       help="the task's own folder")
    stats.add_argument("--json", nargs="?", const="-", metavar="PATH",
                       help="write the statistics as JSON to PATH; without PATH (or '-') print them as JSON "
                            "instead of the listing")
    stats.set_defaults(func=_cmd_stats)
