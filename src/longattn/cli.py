"""The ``longattn`` command: ``show`` draws a pattern, ``bench`` times every path, ``convert`` extends a
checkpoint to long inputs, ``lra`` runs Long Range Arena, ``lm`` the Transformer-XL language model, ``vision``
BoTNet and ResNet-50."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def _cmd_show(args: argparse.Namespace) -> int:
    from .patterns import parse_pattern
    from .viz import draw_pattern

    pattern = parse_pattern(args.pattern)
    out = args.out or re.sub(r"[^A-Za-z0-9_.-]+", "_", pattern.name).strip("_") + ".png"
    path = draw_pattern(pattern, args.seq_len, out, kv_len=args.kv_len, block=args.block, num_heads=args.num_heads,
                        head=args.head)
    density = pattern.density(args.seq_len, args.kv_len, num_heads=args.num_heads, block=args.block)
    print(f"{pattern.name}: density {density:.4f} at Nq={args.seq_len}; wrote {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.hf:
        from . import bench_hf

        bench_hf.run(args.hf, args.lengths or [4096], layers=args.layers, hidden=args.hidden, heads=args.heads,
                     repeats=args.repeats, out_dir=Path(args.out) if args.out else None)
        return 0
    from . import bench

    cfg = bench.BenchConfig(device=args.device, heads=args.heads, head_dim=args.head_dim, batch=args.batch)
    if args.quick:
        for key, value in bench.QUICK.items():
            setattr(cfg, key, value)
    for key in ("patterns", "paths", "modes", "lengths", "dtypes"):
        value = getattr(args, key)
        if value:
            setattr(cfg, key, value)
    if args.min_run_time is not None:
        cfg.min_run_time = args.min_run_time
    results = bench.run(cfg, Path(args.out) if args.out else None, progress=not args.no_progress)
    if args.out:
        written = [f"{args.out}/bench.json", f"{args.out}/bench.csv"]
        try:
            from .viz import draw_bench

            written.append(str(draw_bench([r.row() for r in results], Path(args.out) / "bench.png")))
        except ImportError:  # matplotlib is the optional `viz` extra
            pass
        print("wrote " + ", ".join(written))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .integrations.convert import convert_to_long

    dst = convert_to_long(args.src, args.dst, max_length=args.to_long, window=args.window,
                          copy_tokenizer=not args.no_tokenizer)
    print(f"wrote a Longformer checkpoint for {args.to_long} tokens to {dst} "
          f"(load it with longattn.models.LongformerModel.from_pretrained)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import BENCH_PATTERNS, DTYPES, MODES, PATHS

    parser = argparse.ArgumentParser(prog="longattn", description="Sparse attention for long inputs.")
    sub = parser.add_subparsers(dest="command", required=True)

    show = sub.add_parser("show", help="draw a pattern's token mask and block layout")
    show.add_argument("pattern", help='pattern expression, e.g. "longformer(window=512, global_idx=[0])"')
    show.add_argument("--seq-len", type=int, required=True, help="query length Nq")
    show.add_argument("--kv-len", type=int, default=None, help="key length Nk (default: Nq)")
    show.add_argument("--block", type=int, default=64, help="block size of the layout")
    show.add_argument("--num-heads", type=int, default=1, help="heads (per-head patterns need a multiple)")
    show.add_argument("--head", type=int, default=0, help="which head to draw")
    show.add_argument("--out", default=None, help="PNG path (default: <pattern name>.png)")
    show.set_defaults(func=_cmd_show)

    b = sub.add_parser("bench", help="time patterns x paths against dense SDPA and FlexAttention")
    b.add_argument("--quick", action="store_true", help="a subset that runs in under 2 minutes")
    b.add_argument("--patterns", nargs="+", choices=list(BENCH_PATTERNS))
    b.add_argument("--paths", nargs="+", choices=list(PATHS))
    b.add_argument("--modes", nargs="+", choices=list(MODES))
    b.add_argument("--lengths", nargs="+", type=int)
    b.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    b.add_argument("--heads", type=int, default=12)
    b.add_argument("--head-dim", type=int, default=64)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--device", default="cpu")
    b.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per measurement")
    b.add_argument("--out", default=None, help="folder for bench.json and bench.csv")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--hf", nargs="+", choices=["longformer", "bigbird"], default=None,
                   help="instead: whole encoders vs transformers' on the same weights (default N=4096)")
    b.add_argument("--layers", type=int, default=12, help="--hf: encoder layers")
    b.add_argument("--hidden", type=int, default=768, help="--hf: model width (heads from --heads)")
    b.add_argument("--repeats", type=int, default=3, help="--hf: timed forwards per model")
    b.set_defaults(func=_cmd_bench)

    c = sub.add_parser("convert", help="extend a BERT/RoBERTa-family checkpoint to long inputs (Longformer recipe)")
    c.add_argument("--to-long", type=int, required=True, metavar="N", help="new maximum length, e.g. 4096")
    c.add_argument("--window", type=int, default=None,
                   help="attention window (even); default twice the source's length, exact on its inputs")
    c.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer files")
    c.add_argument("src", help="Hugging Face checkpoint directory (config.json + weights)")
    c.add_argument("dst", help="output directory")
    c.set_defaults(func=_cmd_convert)

    from .lm.cli import add_parser as add_lm_parser
    from .lra.cli import add_parser as add_lra_parser
    from .vision.cli import add_parser as add_vision_parser

    add_lra_parser(sub)
    add_lm_parser(sub)
    add_vision_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:  # FileNotFoundError: missing LRA data
        print(f"longattn {args.command}: error: {err}", file=sys.stderr)
        return 2
    from .training.distributed import leave_world

    leave_world()  # under torchrun: every process finishes its last collective before any exits
    return code


if __name__ == "__main__":
    sys.exit(main())
