"""The ``longattn`` command: ``show`` draws a pattern, ``bench`` times every path, ``calibrate`` measures the
machine for ``auto`` and the kernel, ``convert`` extends a
checkpoint to long inputs, ``lra`` runs Long Range Arena, ``lm`` the Transformer-XL language model, ``vision``
BoTNet and ResNet-50, ``longdoc`` the long legal documents of the ScanCode LicenseDB."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .argtypes import ExistingPath, at_least, device, nonnegative_int, positive_float, positive_int


def _cmd_show(args: argparse.Namespace) -> int:
    from .patterns import as_pattern, full
    from .patterns.presets import describe

    if args.list:
        width = max(len(name) for name, _ in describe())
        for name, text in describe():
            print(f"{name:<{width}}  {text}")
        return 0
    if args.pattern is None or args.seq_len is None:
        raise ValueError("a pattern and --seq-len are needed (or --list)")
    from .tools.viz import draw_pattern

    pattern = as_pattern(args.pattern, n=args.seq_len) or full()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", pattern.name).strip("_") + ".png"
    out = Path(args.plot) / name if args.plot and Path(args.plot).is_dir() else args.plot or name
    path = draw_pattern(pattern, args.seq_len, out, kv_len=args.kv_len, block=args.block, num_heads=args.heads,
                        head=args.head)
    density = pattern.density(args.seq_len, args.kv_len, num_heads=args.heads, block=args.block)
    print(f"{pattern.name}: density {density:.4f} at Nq={args.seq_len}; wrote {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.hf:
        from .tools import bench_hf

        bench_hf.run(args.hf, args.lengths or [4096], depth=args.depth, dim=args.dim, heads=args.heads,
                     repeats=args.repeats, out_dir=Path(args.out) if args.out else None)
        return 0
    if args.layer_cost:
        from .io import write_json
        from .tools.layer_cost import layer_table, measure_layers

        rows = measure_layers(args.layer_cost, args.lengths or [1024, 2048, 4096, 8192],
                              head_dim=args.head_dim,
                              min_run_time=args.min_run_time or 1.0, progress=not args.no_progress)
        table = layer_table(rows)
        print(table)
        if args.out:
            write_json(Path(args.out) / "layer_cost.json", [r.row() for r in rows])
            print(f"wrote {Path(args.out) / 'layer_cost.json'}")
        return 0
    if args.selection:
        import torch

        from .io import write_json
        from .tools.bench import matmul_gflops
        from .tools.selection_cost import cost_table, measure

        rows = measure(args.lengths or [4096, 8192, 16384, 32768, 65536], head_dim=args.head_dim,
                       min_run_time=args.min_run_time or 1.0, progress=not args.no_progress)
        rates = {name: matmul_gflops(dtype, torch.device("cpu")) for name, dtype in
                 (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        print(cost_table(rows))
        print(f"machine: {os.cpu_count()} cores, matmul fp32 {rates['fp32']:.0f} / bf16 {rates['bf16']:.0f} GFLOP/s, "
              f"load average {os.getloadavg()[0]:.1f}")
        if args.out:
            write_json(Path(args.out) / "selection_cost.json", [r.row() for r in rows])
            print(f"wrote {Path(args.out) / 'selection_cost.json'}")
        return 0
    if args.under_load:
        from .tools.contention import load_table, under_load

        results = under_load(args.patterns or ["longformer_512", "bigbird_64"], args.lengths or [4096],
                             heads=args.heads, head_dim=args.head_dim)
        print(load_table(results))
        return 0
    from .tools import bench

    cfg = bench.BenchConfig(device=args.device, heads=args.heads, head_dim=args.head_dim, batch=args.batch_size)
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
            from .tools.viz import draw_bench

            written.append(str(draw_bench([r.row() for r in results], Path(args.out) / "bench.png")))
        except ImportError:  # matplotlib is the optional `viz` extra
            pass
        print("wrote " + ", ".join(written))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .backends import machine
    from .tools import calibrate

    if args.show:
        print("\n".join(calibrate.describe(machine.current())))
        return 0
    stored = machine.load_calibration()
    if stored is not None and not args.force:
        print("\n".join(calibrate.describe(stored)))
        print("already calibrated for this machine and torch version (--force measures again)")
        return 0
    profile = calibrate.calibrate(progress=not args.no_progress)
    try:
        path = calibrate.save(profile)
    except OSError as err:  # a read-only home or cache directory
        raise ValueError(f"cannot write the calibration under {machine.cache_dir()} ({err}); set "
                         f"LONGATTN_CACHE_DIR to a writable folder") from None
    print("\n".join(calibrate.describe(machine.current())))
    print(f"wrote {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .integrations.convert import convert_to_long

    dst = convert_to_long(args.src, args.out, max_length=args.to_long, window=args.window,
                          copy_tokenizer=not args.no_tokenizer, overwrite=args.overwrite)
    print(f"wrote a Longformer checkpoint for {args.to_long} tokens to {dst} "
          f"(load it with longattn.models.LongformerModel.from_pretrained)")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's ``--help`` line ends with its default, except where there is none to show (``None``, an
    off switch) or the help text already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "default" in text
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``HelpFormatter``; sub-commands (and theirs) inherit the class, so every
    ``--help`` shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One line, naming the command and the flag, instead of the usage block and the message: a user error
        should read like one."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _renamed(parser: argparse.ArgumentParser, old: str, dest: str, **kwargs) -> None:
    """Accept a flag's former spelling without showing it in ``--help``."""
    parser.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``longattn`` parser. Flag names mean one thing in every sub-command: ``--out`` is the output folder
    (``--plot``/``--json`` name single files), ``--batch-size``, ``--heads``/``--dim``/``--depth`` (model
    shape, as the config fields), ``--model`` for one registry name and ``--models`` for several, and
    ``--no-progress`` wherever a progress bar is drawn."""
    from .tools.bench import BENCH_PATTERNS, DEFAULT_PATTERNS, DTYPES, MODES, PATHS, QUICK, BenchConfig
    from .tools.layer_cost import LAYERS

    parser = Parser(prog="longattn", description="Sparse attention for long inputs.")
    sub = parser.add_subparsers(dest="command", required=True)

    show = sub.add_parser("show", help="draw a pattern's token mask and block layout")
    show.add_argument("pattern", nargs="?", help='a preset name (see --list) or a pattern expression, e.g. '
                      '"longformer(window=512, global_idx=[0])"')
    show.add_argument("--list", action="store_true", help="list the named patterns (presets) and exit")
    show.add_argument("--seq-len", type=positive_int, default=None, help="query length Nq (required unless --list)")
    show.add_argument("--kv-len", type=positive_int, default=None, help="key length Nk (default: Nq)")
    show.add_argument("--block", type=positive_int, default=64, help="block size of the layout")
    show.add_argument("--heads", type=positive_int, default=1, help="heads (per-head patterns need a multiple)")
    _renamed(show, "--num-heads", "heads", type=positive_int)
    show.add_argument("--head", type=nonnegative_int, default=0, help="which head to draw")
    show.add_argument("--plot", default=None, help="image file to write, or a folder to write <pattern name>.png "
                      "into (default: <pattern name>.png here)")
    show.set_defaults(func=_cmd_show)

    base = BenchConfig()
    listed = lambda values: " ".join(map(str, values))  # noqa: E731
    b = sub.add_parser("bench", help="time patterns x paths against dense SDPA and FlexAttention")
    b.add_argument("--quick", action="store_true", help=f"a subset that runs in under 2 minutes: "
                   f"{', '.join(f'{k} {listed(v) if isinstance(v, list) else v}' for k, v in QUICK.items())}")
    b.add_argument("--patterns", nargs="+", choices=list(BENCH_PATTERNS), metavar="NAME",
                   help=f"presets (`longattn show --list`), of {listed(BENCH_PATTERNS)} "
                        f"(default: {listed(DEFAULT_PATTERNS)})")
    b.add_argument("--paths", nargs="+", choices=list(PATHS), metavar="PATH",
                   help=f"of {listed(PATHS)} (default: all)")
    b.add_argument("--modes", nargs="+", choices=list(MODES), metavar="MODE", help=f"of {listed(MODES)} (default: all)")
    b.add_argument("--lengths", nargs="+", type=positive_int, metavar="N",
                   help=f"sequence lengths (default: {listed(base.lengths)}; with --hf 4096)")
    b.add_argument("--dtypes", nargs="+", choices=list(DTYPES), metavar="DTYPE",
                   help=f"of {listed(DTYPES)} (default: {listed(base.dtypes)})")
    b.add_argument("--heads", type=positive_int, default=12, help="attention heads")
    b.add_argument("--head-dim", type=positive_int, default=64, help="width of one head")
    b.add_argument("--batch-size", type=positive_int, default=1, help="inputs per call")
    _renamed(b, "--batch", "batch_size", type=positive_int)
    b.add_argument("--device", type=device, default="cpu", help="torch device")
    b.add_argument("--min-run-time", type=positive_float, default=None,
                   help=f"seconds of timing per measurement (default: {base.min_run_time})")
    b.add_argument("--out", default=None, help="output folder for bench.json, bench.csv, bench.png, summary.txt "
                   "(with --hf: bench_hf.json, bench_hf.md); default: print only")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--hf", nargs="+", choices=["longformer", "bigbird"], default=None, metavar="MODEL",
                   help="instead: whole encoders (longformer, bigbird) vs transformers' on the same weights")
    b.add_argument("--depth", type=positive_int, default=12, help="--hf: encoder layers")
    _renamed(b, "--layers", "depth", type=positive_int)
    b.add_argument("--dim", type=positive_int, default=768, help="--hf: model width (heads from --heads)")
    _renamed(b, "--hidden", "dim", type=positive_int)
    b.add_argument("--repeats", type=positive_int, default=3, help="--hf: timed forwards per model")
    b.add_argument("--layer-cost", nargs="+", choices=list(LAYERS), metavar="LAYER", default=None,
                   help=f"instead: one Transformer layer (width 256, heads of --head-dim: 4 of 64) of each of "
                        f"{listed(LAYERS)}, fwd and fwd+bwd, with the log-log slope of time against N "
                        f"(default lengths 1024 2048 4096 8192)")
    b.add_argument("--selection", action="store_true", help="instead: content-chosen keys (MoBA, NSA) against causal "
                   "SDPA and a window of the same key budget, one layer fwd and fwd+bwd, time and peak memory; the "
                   "choice's share; FlexAttention with the same choice (default lengths 4096 ... 65536)")
    b.add_argument("--under-load", action="store_true", help="instead: blocked and SDPA forwards idle, then beside "
                   "one busy process per core (default patterns longformer_512 bigbird_64, length 4096)")
    b.set_defaults(func=_cmd_bench)

    cal = sub.add_parser("calibrate", help="measure this machine once (matmul rates, SDPA and blocked costs, "
                         "bf16 compute) for `auto` and the kernel; stored under the user's cache directory")
    cal.add_argument("--show", action="store_true", help="print the profile in force (calibration or defaults)")
    cal.add_argument("--force", action="store_true", help="measure again even if this machine is calibrated")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal.set_defaults(func=_cmd_calibrate)

    c = sub.add_parser("convert", help="extend a BERT/RoBERTa-family checkpoint to long inputs (Longformer recipe)")
    c.add_argument("--to-long", type=at_least(2, "a long model needs room for its special tokens"), required=True,
                   metavar="N",
                   help="new maximum length, e.g. 4096")
    c.add_argument("--window", type=positive_int, default=None,
                   help="attention window (even); default twice the source's length, exact on its inputs")
    c.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer files")
    c.add_argument("--out", required=True, help="output folder for the long checkpoint (never the source)")
    c.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
    c.add_argument("src", type=ExistingPath("checkpoint folder", folder=True),
                   help="Hugging Face checkpoint directory (config.json + weights)")
    c.set_defaults(func=_cmd_convert)

    from .lm.cli import add_parser as add_lm_parser
    from .longdoc.cli import add_parser as add_longdoc_parser
    from .lra.cli import add_parser as add_lra_parser
    from .vision.cli import add_parser as add_vision_parser

    add_lra_parser(sub)
    add_lm_parser(sub)
    add_vision_parser(sub)
    add_longdoc_parser(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """The error as one line (``LONGATTN_TRACEBACK=1`` shows the whole traceback instead)."""
    if isinstance(err, OSError) and err.errno is not None:  # the system's words: say what and where
        return f"{err.strerror}: {err.filename}" if err.filename else f"{type(err).__name__}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``longattn`` with ``argv``; the exit status (0 done, 2 a user error with its one-line message on
    stderr; ``--help`` is 0)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag (already reported): a status, as for any other error
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        code = args.func(args)
    except (ValueError, TypeError, OSError) as err:  # OSError: missing data, a folder in the way, a full disk
        if os.environ.get("LONGATTN_TRACEBACK"):
            raise
        words = [args.command] + [v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)]
        print(f"longattn {' '.join(words)}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    from .training.distributed import leave_world

    leave_world()  # under torchrun: every process finishes its last collective before any exits
    return code


if __name__ == "__main__":
    sys.exit(main())
