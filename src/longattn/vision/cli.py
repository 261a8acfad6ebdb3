"""``longattn vision ...``: train, count, latency, attention for BoTNet and ResNet-50 (argparse wiring)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..argtypes import nonnegative_int, positive_float, positive_int, seed
from ..io import markdown_table, write_json
from ..training.setup import add_run_arguments, run_options

_RUN_FLAGS = ("width", "resolution", "preset", "difficulty", "examples", "steps", "batch_size", "lr", "warmup",
              "eval_every", "seed")


def image_size(text: str) -> tuple[int, int]:
    """``224`` or ``320x200`` (height x width), as an argparse type."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected N or HxW (positive ints), got {text!r}")
    return int(parts[0]), int(parts[-1])


image_size.bad = ("0", "3x", "-224", "axb")


def _cmd_train(args: argparse.Namespace) -> int:
    from .compare import compare, table
    from .train import VisionRunConfig

    fields = {n: getattr(args, n) for n in _RUN_FLAGS if getattr(args, n) is not None}
    overrides = {"radius": args.radius} if args.radius is not None else {}
    cfg = VisionRunConfig(**fields, bf16=args.bf16, channels_last=not args.no_channels_last,
                          model_overrides=overrides)
    results = compare(args.models, cfg, data_dir=args.data_dir, out=args.out, **run_options(args))
    print(table(results))
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


def _cmd_count(args: argparse.Namespace) -> int:
    from .measure import cost_table

    sizes = args.sizes
    rows = cost_table(args.models, sizes, num_classes=args.num_classes)
    paper = lambda v, unit, scale: None if v is None else f"{v / scale:.2f}{unit}"  # noqa: E731
    head = ["model", "params", "paper"] + [f"M.Adds {h}x{w}" for h, w in sizes] + ["paper (1024)"]
    table = [[r["model"], f"{r['params'] / 1e6:.2f}M", paper(r["paper_params"], "M", 1e6)]
             + [f"{r[f'madds_{h}x{w}'] / 1e9:.2f}B" for h, w in sizes]
             + [paper(r["paper_madds_1024"], "B", 1e9)] for r in rows]
    print(markdown_table(head, table))
    if args.json:
        write_json(args.json, rows)
    return 0


def _cmd_latency(args: argparse.Namespace) -> int:
    import torch

    from ..models import create_model
    from .measure import paired_latency

    torch.manual_seed(0)
    baseline = create_model(args.baseline)
    model = create_model(args.model, **({} if args.radius is None else {"radius": args.radius}))
    name = args.model if args.radius is None else f"{args.model} (radius {args.radius})"
    print(f"{name} vs {args.baseline}: forward, batch 1, fp32, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} (taking turns), {'NCHW' if args.no_channels_last else 'channels-last'}")
    rows = []
    for size in args.sizes:
        r = paired_latency(baseline, model, size, repeats=args.repeats, channels_last=not args.no_channels_last)
        rows.append({"size": list(size), "baseline_ms": r.baseline_ms, "model_ms": r.model_ms, "ratio": r.ratio})
    print(markdown_table(["size", f"{args.baseline} ms", f"{args.model} ms", "ratio"],
                         [["x".join(map(str, r["size"])), r["baseline_ms"], r["model_ms"], r["ratio"]] for r in rows],
                         formats=["", ".1f", ".1f", ".3f"]))
    if args.json:
        write_json(args.json, {"model": args.model, "radius": args.radius, "baseline": args.baseline, "rows": rows})
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    from .measure import attention_cost

    rows = attention_cost(args.maps, radius=args.radius, min_run_time=args.min_run_time)
    print(f"one c5 MHSA (512 channels, 4 heads, batch 1, fp32): global vs a radius-{args.radius} window")
    keys = ["global_ms", "global_mb", "local_ms", "local_mb"]
    print(markdown_table(["map", "tokens", "global ms", "global MB", "local ms", "local MB"],
                         [[f"{r['map']}x{r['map']}", r["tokens"]] + [r[k] for k in keys] for r in rows],
                         formats=["", "d"] + [".1f"] * len(keys)))
    if args.json:
        write_json(args.json, rows)
    return 0


def add_parser(sub) -> None:
    from .train import VisionRunConfig

    base = VisionRunConfig()
    vision = sub.add_parser("vision", help="BoTNet and ResNet-50: train on generated images, count, time")
    cmds = vision.add_subparsers(dest="vision_command", required=True)

    train = cmds.add_parser("train", help="train backbones on generated Pathfinder images under one budget")
    train.add_argument("--models", nargs="+", default=["botnet50", "resnet50"], help="registry names")
    train.add_argument("--out", default="results/vision", help="output folder: a run per model and report.md")
    train.add_argument("--data-dir", default="data/vision", help="where the generated images go")
    train.add_argument("--width", type=positive_int, help=f"base width (64 = the paper's; default: {base.width})")
    train.add_argument("--resolution", type=positive_int, help=f"image side (default: {base.resolution})")
    train.add_argument("--preset", choices=["simple", "official"], help=f"Pathfinder preset (default: {base.preset})")
    train.add_argument("--difficulty", choices=["easy", "intermediate", "hard"],
                       help=f"official preset: paths of 6, 9 or 14 dashes (default: {base.difficulty})")
    train.add_argument("--examples", type=positive_int, help=f"images generated (default: {base.examples})")
    train.add_argument("--steps", type=positive_int, help=f"training steps (default: {base.steps})")
    train.add_argument("--batch-size", type=positive_int, help=f"images per step (default: {base.batch_size})")
    train.add_argument("--lr", type=positive_float, help=f"peak learning rate (default: {base.lr})")
    train.add_argument("--warmup", type=nonnegative_int, help=f"warm-up steps (default: {base.warmup})")
    train.add_argument("--eval-every", type=positive_int,
                       help=f"steps between validations (default: {base.eval_every})")
    train.add_argument("--seed", type=seed, help=f"random seed (default: {base.seed})")
    train.add_argument("--radius", type=positive_int, default=None, help="BoTNet: 2-D local attention of this radius "
                       "(default: global attention)")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (slower on CPUs without bf16 oneDNN)")
    train.add_argument("--no-channels-last", action="store_true", help="keep the NCHW memory format")
    add_run_arguments(train, stop_after=False)  # several models in turn: each run is finished before the next
    train.set_defaults(func=_cmd_train)

    count = cmds.add_parser("count", help="parameters and multiply-adds, beside the BoTNet paper's figures")
    count.add_argument("--models", nargs="+", default=["resnet50", "botnet50"], help="registry names")
    count.add_argument("--sizes", nargs="+", type=image_size, default=[(224, 224), (1024, 1024)],
                       help="input sizes: N or HxW (default: 224 1024)")
    count.add_argument("--num-classes", type=positive_int, default=1000, help="classifier outputs")
    count.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    count.set_defaults(func=_cmd_count)

    lat = cmds.add_parser("latency", help="forward latency of a model against a baseline, as a ratio")
    lat.add_argument("--model", default="botnet50", help="registry name of the model timed")
    lat.add_argument("--baseline", default="resnet50", help="registry name of the model it is compared with")
    lat.add_argument("--sizes", nargs="+", type=image_size, default=[(224, 224), (1024, 1024)],
                     help="input sizes: N or HxW (default: 224 1024)")
    lat.add_argument("--repeats", type=positive_int, default=7, help="timed forwards per model and size")
    lat.add_argument("--radius", type=positive_int, default=None,
                     help="the model with 2-D local attention of this radius "
"(default: global attention)")
    lat.add_argument("--no-channels-last", action="store_true", help="keep the NCHW memory format")
    lat.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    lat.set_defaults(func=_cmd_latency)

    att = cmds.add_parser("attention", help="one MHSA layer: global vs 2-D local window, time and peak memory")
    att.add_argument("--maps", nargs="+", type=positive_int, default=[16, 32, 64, 96], help="square map sides")
    att.add_argument("--radius", type=positive_int, default=7, help="radius of the local window")
    att.add_argument("--min-run-time", type=positive_float, default=1.0, help="seconds of timing per measurement")
    att.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    att.set_defaults(func=_cmd_attention)
