"""``longattn vision ...``: train, count, latency, attention for BoTNet and ResNet-50 (argparse wiring)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_RUN_FLAGS = ("width", "resolution", "preset", "difficulty", "examples", "steps", "batch_size", "lr", "warmup",
              "eval_every", "seed")


def _sizes(values: list[str]) -> list[tuple[int, int]]:
    """``224`` or ``320x200`` (height x width)."""
    out = []
    for v in values:
        parts = v.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--sizes: expected N or HxW (positive ints), got {v!r}")
        out.append((int(parts[0]), int(parts[-1])))
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from .compare import compare, table
    from .train import VisionRunConfig

    fields = {n: getattr(args, n) for n in _RUN_FLAGS if getattr(args, n) is not None}
    overrides = {"radius": args.radius} if args.radius is not None else {}
    cfg = VisionRunConfig(**fields, bf16=args.bf16, channels_last=not args.no_channels_last,
                          model_overrides=overrides)
    results = compare(args.models, cfg, data_dir=args.data_dir, out=args.out, resume=not args.no_resume)
    print(table(results))
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


def _cmd_count(args: argparse.Namespace) -> int:
    from .measure import cost_table

    sizes = _sizes(args.sizes)
    rows = cost_table(args.models, sizes, num_classes=args.num_classes)
    head = ["model", "params", "paper"] + [f"M.Adds {h}x{w}" for h, w in sizes] + ["paper (1024)"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        paper = lambda v, unit, scale: "-" if v is None else f"{v / scale:.2f}{unit}"  # noqa: E731
        cells = [r["model"], f"{r['params'] / 1e6:.2f}M", paper(r["paper_params"], "M", 1e6)]
        cells += [f"{r[f'madds_{h}x{w}'] / 1e9:.2f}B" for h, w in sizes]
        cells.append(paper(r["paper_madds_1024"], "B", 1e9))
        print("| " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
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
    print(f"| size | {args.baseline} ms | {args.model} ms | ratio |\n|---|---|---|---|")
    rows = []
    for size in _sizes(args.sizes):
        r = paired_latency(baseline, model, size, repeats=args.repeats, channels_last=not args.no_channels_last)
        rows.append({"size": list(size), "baseline_ms": r.baseline_ms, "model_ms": r.model_ms, "ratio": r.ratio})
        print(f"| {size[0]}x{size[1]} | {r.baseline_ms:.1f} | {r.model_ms:.1f} | {r.ratio:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "radius": args.radius, "baseline": args.baseline,
                                              "rows": rows}, indent=1))
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    from .measure import attention_cost

    rows = attention_cost(args.maps, radius=args.radius, min_run_time=args.min_run_time)
    print(f"one c5 MHSA (512 channels, 4 heads, batch 1, fp32): global vs a radius-{args.radius} window")
    print("| map | tokens | global ms | global MB | local ms | local MB |\n|---|---|---|---|---|---|")
    cell = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in rows:
        print(f"| {r['map']}x{r['map']} | {r['tokens']} | {cell(r['global_ms'])} | {cell(r['global_mb'])} | "
              f"{cell(r['local_ms'])} | {cell(r['local_mb'])} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


def add_parser(sub) -> None:
    vision = sub.add_parser("vision", help="BoTNet and ResNet-50: train on generated images, count, time")
    cmds = vision.add_subparsers(dest="vision_command", required=True)

    train = cmds.add_parser("train", help="train backbones on generated Pathfinder images under one budget")
    train.add_argument("--models", nargs="+", default=["botnet50", "resnet50"], help="registry names")
    train.add_argument("--out", default="results/vision", help="folder for the runs and report.md")
    train.add_argument("--data-dir", default="data/vision", help="where the generated images go")
    train.add_argument("--width", type=int, help="base width (64 = the paper's; default 16)")
    train.add_argument("--resolution", type=int, help="image side (default 128)")
    train.add_argument("--preset", choices=["simple", "official"], help="Pathfinder preset (default simple)")
    train.add_argument("--difficulty", choices=["easy", "intermediate", "hard"],
                       help="official preset: paths of 6, 9 or 14 dashes (default hard)")
    train.add_argument("--examples", type=int, help="images generated (default 6000)")
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--warmup", type=int)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--radius", type=int, default=None, help="BoTNet: 2-D local attention of this radius")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (slower on CPUs without bf16 oneDNN)")
    train.add_argument("--no-channels-last", action="store_true")
    train.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    train.set_defaults(func=_cmd_train)

    count = cmds.add_parser("count", help="parameters and multiply-adds, beside the BoTNet paper's figures")
    count.add_argument("--models", nargs="+", default=["resnet50", "botnet50"])
    count.add_argument("--sizes", nargs="+", default=["224", "1024"], help="input sizes: N or HxW")
    count.add_argument("--num-classes", type=int, default=1000)
    count.add_argument("--out", default=None, help="JSON file for the numbers")
    count.set_defaults(func=_cmd_count)

    lat = cmds.add_parser("latency", help="forward latency of a model against a baseline, as a ratio")
    lat.add_argument("--model", default="botnet50")
    lat.add_argument("--baseline", default="resnet50")
    lat.add_argument("--sizes", nargs="+", default=["224", "1024"], help="input sizes: N or HxW")
    lat.add_argument("--repeats", type=int, default=7)
    lat.add_argument("--radius", type=int, default=None, help="the model with 2-D local attention of this radius")
    lat.add_argument("--no-channels-last", action="store_true")
    lat.add_argument("--out", default=None, help="JSON file for the numbers")
    lat.set_defaults(func=_cmd_latency)

    att = cmds.add_parser("attention", help="one MHSA layer: global vs 2-D local window, time and peak memory")
    att.add_argument("--maps", nargs="+", type=int, default=[16, 32, 64, 96], help="square map sides")
    att.add_argument("--radius", type=int, default=7)
    att.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    att.add_argument("--out", default=None, help="JSON file for the numbers")
    att.set_defaults(func=_cmd_attention)
