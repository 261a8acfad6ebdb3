"""``longattn longdoc ...``: the ScanCode LicenseDB benchmark (stats, retrieve, classify, report, run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..argtypes import ExistingPath, at_least, fraction, nonnegative_int, positive_float, positive_int, seed
from ..training.setup import add_run_arguments

_DATA_DIR = ExistingPath("LicenseDB data folder", folder=True)


def _db(args, rules: bool = True):
    from .licensedb import load_licensedb

    return load_licensedb(args.data_dir, rules=rules)


def _settings(args):
    from .retrieval import Settings

    max_length = args.max_length or (4096 if args.quick else 16384)
    out = Path(args.out) / ("quick" if args.quick else "full")
    return Settings(out=out, quick=args.quick, max_length=max_length, progress=not args.no_progress,
                    resume=not args.no_resume, paraformer_steps=getattr(args, "paraformer_steps", None)
                    or (100 if args.quick else 600))


def _cmd_stats(args: argparse.Namespace) -> int:
    from .stats import database_stats

    count = None
    if not args.words_only:
        from .encoders import short_encoder

        count = short_encoder().count_tokens
    stats = database_stats(_db(args), quick=args.quick, count_tokens=count)
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    from .report import stats_text

    print(stats_text(stats))
    return 0


def _retrieve(args, settings):
    from .retrieval import RETRIEVAL_SYSTEMS, run_retrieval
    from .tasks import retrieval_task

    task = retrieval_task(_db(args), quick=settings.quick)
    return task, run_retrieval(task, settings, args.systems or list(RETRIEVAL_SYSTEMS))


def _cmd_retrieve(args: argparse.Namespace) -> int:
    from .report import retrieval_summary

    settings = _settings(args)
    _, results = _retrieve(args, settings)
    print(retrieval_summary(results))
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from .classification import CLASSIFICATION_SYSTEMS, run_classification
    from .report import classification_summary
    from .retrieval import Context
    from .tasks import classification_task, retrieval_task

    settings = _settings(args)
    db = _db(args)
    ctx = Context(retrieval_task(db, quick=settings.quick), settings)
    results = run_classification(classification_task(db, quick=settings.quick), ctx,
                                 args.systems or list(CLASSIFICATION_SYSTEMS))
    print(classification_summary(results))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    settings = _settings(args)
    print(f"wrote {write_report(settings.out)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .classification import CLASSIFICATION_SYSTEMS, run_classification
    from .report import write_report
    from .retrieval import RETRIEVAL_SYSTEMS, Context, run_retrieval
    from .tasks import classification_task, retrieval_task

    from ..io import write_json
    from .encoders import long_model_dir
    from .throughput import machine, measure_throughput
    from .trained import TRAINED_SYSTEMS

    settings = _settings(args)
    db = _db(args)
    write_json(settings.out / "machine.json", machine())
    ctx = Context(retrieval_task(db, quick=settings.quick), settings)
    trained = not settings.quick if args.trained is None else args.trained
    run_retrieval(ctx.task, settings, [s for s in RETRIEVAL_SYSTEMS if trained or s not in TRAINED_SYSTEMS])
    run_classification(classification_task(db, quick=settings.quick), ctx,
                       [s for s in CLASSIFICATION_SYSTEMS if trained or s not in TRAINED_SYSTEMS])
    if not settings.quick and not (settings.out / "throughput.json").exists():
        measure_throughput(long_model_dir(settings.out / "models", settings.max_length), settings.out,
                           tokens=min(4096, settings.max_length))
    print(f"wrote {write_report(settings.out)}")
    return 0


def _cmd_throughput(args: argparse.Namespace) -> int:
    from .encoders import long_model_dir
    from .throughput import measure_throughput

    settings = _settings(args)
    result = measure_throughput(long_model_dir(settings.out / "models", settings.max_length), settings.out,
                                tokens=args.tokens)
    for row in result["rows"]:
        print(f"{row['attention']:48s} {row['mode']:10s} {row['ms']:8.0f} ms {row['tokens_per_s']:8.0f} tokens/s "
              f"{row['peak_mb']:8.0f} MB")
    return 0


def _cmd_packed(args: argparse.Namespace) -> int:
    from .packed import PackedSettings, packed_table, run_packed

    settings = PackedSettings(documents=args.documents, max_len=args.max_len, layers=args.depth, dim=args.dim,
                              heads=args.heads, window=args.window, seed=args.seed, min_run_time=args.min_run_time,
                              rounds=args.rounds)
    result = run_packed(settings, out=Path(args.out) if args.out else None,
                        data_dir=Path(args.data_dir) if args.data_dir else None)
    print(packed_table(result))
    print(f"packed {result['speedup']}x faster, {result['memory_ratio']}x less memory; largest difference on real "
          f"tokens {result['max_abs_diff']:.2e} ({result['threads']} threads)")
    return 0


def _common(p, *, systems: bool = False, paraformer: bool = False) -> None:
    p.add_argument("--data-dir", type=_DATA_DIR, default=None,
                   help="a LicenseDB data folder (licenses/, rules/); default: the installed licensedcode-data")
    p.add_argument("--quick", action="store_true", help="a deterministic subset: under 5 minutes on 2 cores")
    p.add_argument("--out", default="results/longdoc", help="output folder (full/ or quick/ inside)")
    p.add_argument("--max-length", type=at_least(512, "the source model's positions"), default=None,
                   help="tokens the long encoder reads (default: 16384; 4096 with --quick)")
    if paraformer:
        p.add_argument("--paraformer-steps", type=positive_int, default=None,
                       help="training steps of the Paraformer retriever (default: 600; 100 with --quick)")
    if systems:
        p.add_argument("--systems", nargs="+", default=None, help="systems to run (default: all)")
    add_run_arguments(p, stop_after=False)


def add_parser(sub) -> None:
    longdoc = sub.add_parser("longdoc", help="long legal documents: retrieval and classification on the ScanCode "
                                             "LicenseDB")
    cmds = longdoc.add_subparsers(dest="longdoc_command", required=True)

    stats = cmds.add_parser("stats", help="counts per category and rule kind, length percentiles, split sizes")
    stats.add_argument("--data-dir", type=_DATA_DIR, default=None,
                       help="a LicenseDB data folder (default: the installed one)")
    stats.add_argument("--quick", action="store_true", help="split sizes of the --quick subset")
    stats.add_argument("--json", action="store_true", help="print a JSON object")
    stats.add_argument("--words-only", action="store_true", help="lengths in words only (no tokenizer)")
    stats.set_defaults(func=_cmd_stats)

    retrieve = cmds.add_parser("retrieve", help="task 1: rule text -> its licenses, every retrieval system")
    _common(retrieve, systems=True, paraformer=True)
    retrieve.set_defaults(func=_cmd_retrieve)

    classify = cmds.add_parser("classify", help="task 2: license text -> category, a probe per representation")
    _common(classify, systems=True)
    classify.set_defaults(func=_cmd_classify)

    report = cmds.add_parser("report", help="write report.md and report.html from the saved results")
    _common(report)
    report.set_defaults(func=_cmd_report)

    throughput = cmds.add_parser("throughput", help="the long encoder against dense attention on one document")
    _common(throughput)
    throughput.add_argument("--tokens", type=positive_int, default=4096, help="document length")
    throughput.set_defaults(func=_cmd_throughput)

    packed = cmds.add_parser("packed", help="a padded against a packed batch of license texts (bytes): time, "
                             "memory, equal outputs")
    packed.add_argument("--data-dir", type=_DATA_DIR, default=None,
                        help="a LicenseDB data folder; default: licensedcode-data")
    packed.add_argument("--documents", type=positive_int, default=32, help="license texts in the batch")
    packed.add_argument("--max-len", type=positive_int, default=4096,
                        help="bytes kept per text, and the packed row length")
    packed.add_argument("--depth", type=positive_int, default=2, help="Longformer layers")
    packed.add_argument("--dim", type=positive_int, default=256, help="model width")
    packed.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    packed.add_argument("--window", type=positive_int, default=256, help="Longformer window w (w/2 keys each side)")
    packed.add_argument("--seed", type=seed, default=0, help="which texts are drawn")
    packed.add_argument("--min-run-time", type=positive_float, default=2.0, help="seconds of timing per measurement")
    packed.add_argument("--rounds", type=positive_int, default=3,
                        help="measurements per batch, the batches taking turns")
    packed.add_argument("--out", default=None, help="folder for packed.json (default: print only)")
    packed.set_defaults(func=_cmd_packed)

    run = cmds.add_parser("run", help="both tasks, every system, then the report")
    _common(run, paraformer=True)
    run.add_argument("--trained", action=argparse.BooleanOptionalAction, default=None,
                     help="include the trained long encoders (minilm-long-ft, minilm-long-mlm), training them "
                          "if their runs are missing (default: yes, but no with --quick: their training and "
                          "encoding do not fit a 5-minute demo)")
    run.set_defaults(func=_cmd_run)

    _add_training_parsers(cmds)


def _budget_args(args, which: str) -> dict:
    """The budget fields given on the command line (``--steps``, ``--batch-size``, ``--max-tokens`` or
    ``--seq-len``, ``--lr``); the others come from ``BUDGETS``."""
    tokens = "seq_len" if which == "pretrain" else "max_tokens"
    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, tokens: getattr(args, tokens),
             "evals": args.evals}
    return {k: v for k, v in given.items() if v is not None}


def _print_run(path, out: Path, stop_after) -> None:
    """Where the model went and its loss history (``out/result.json``), or that the run stopped early."""
    if path is None:
        print(f"stopped after {stop_after} steps; run again to resume")
        return
    result = json.loads((out / "result.json").read_text())
    for row in result["history"]:
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    budget = result["budget"]
    print(f"wrote {path} ({budget['steps']} steps of {budget['batch_size']}, {budget['seconds']:.0f} s)")


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .tasks import classification_task, retrieval_task
    from .trained import run_dir, train_classification, train_retrieval

    settings = _settings(args)
    run = dict(source=args.source and Path(args.source), stop_after=args.stop_after, device=args.device,
               **_budget_args(args, args.task))
    if args.task == "retrieval":
        path = train_retrieval(retrieval_task(_db(args), quick=settings.quick), settings, **run)
        _print_run(path, run_dir(settings.out, "retrieval"), args.stop_after)
        return 0
    result = train_classification(classification_task(_db(args, rules=False), quick=settings.quick), settings,
                                  head_warmup=args.head_warmup, **run)
    if not result["finished"]:
        print(f"stopped after {args.stop_after} steps; run again to resume")
    else:
        nan = float("nan")
        print(f"micro-F1 {result.get('micro_f1', nan):.3f}  macro-F1 {result.get('macro_f1', nan):.3f}"
              f"  ({result['budget']['steps']} steps, {result['budget']['max_tokens']} tokens per document, "
              f"{result['budget']['seconds']:.0f} s); wrote {run_dir(settings.out, 'classification') / 'result.json'}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .tasks import retrieval_task
    from .trained import run_dir, train_pretrain

    settings = _settings(args)
    path = train_pretrain(retrieval_task(_db(args, rules=False), quick=settings.quick), settings,
                          source=args.source and Path(args.source), stop_after=args.stop_after, device=args.device,
                          mask_prob=args.mask_prob, head_warmup=args.head_warmup, **_budget_args(args, "pretrain"))
    _print_run(path, run_dir(settings.out, "pretrain"), args.stop_after)
    return 0


def _training_flags(p, *, budgets: list[str]) -> None:
    from .finetune import BUDGETS

    def default(field: str) -> str:
        return "default: " + "; ".join(f"{w} {getattr(BUDGETS[w]['full'], field)}, "
                                       f"{getattr(BUDGETS[w]['quick'], field)} with --quick" for w in budgets)

    p.add_argument("--source", type=ExistingPath("model folder", folder=True), default=None,
                   help="the model directory to start from (default: the converted MiniLM, "
                        "out/models/minilm-long-<max-length>)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"optimizer steps ({default('steps')})")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"texts per step ({default('batch_size')})")
    if budgets == ["pretrain"]:
        p.add_argument("--seq-len", type=at_least(3, "CLS, a token and SEP"), default=None,
                       help=f"tokens per packed sequence, CLS and SEP included ({default('max_tokens')})")
    else:
        p.add_argument("--max-tokens", type=at_least(3, "CLS, a token and SEP"), default=None,
                       help=f"tokens each text is cut to, special tokens included ({default('max_tokens')})")
    p.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate ({default('lr')})")
    p.add_argument("--evals", type=positive_int, default=None,
                   help=f"evaluations (and checkpoints) in the run ({default('evals')})")
    p.add_argument("--head-warmup", type=nonnegative_int, default=None,
                   help="classification and pretraining: first steps that train the new head alone, the "
                        "encoder frozen (default: steps // 5)")
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="end after this many steps in total (resume later)")


def _add_training_parsers(cmds) -> None:
    finetune = cmds.add_parser("finetune", help="fine-tune the long encoder: contrastive retrieval or a "
                                                "classification head (resumable)")
    _common(finetune)
    finetune.add_argument("--task", required=True, choices=["retrieval", "classification"], help="which task")
    _training_flags(finetune, budgets=["retrieval", "classification"])
    finetune.set_defaults(func=_cmd_finetune)

    pretrain = cmds.add_parser("pretrain", help="continued masked-LM pretraining of the long encoder on every "
                                                "license text (resumable)")
    _common(pretrain)
    _training_flags(pretrain, budgets=["pretrain"])
    pretrain.add_argument("--mask-prob", type=fraction, default=0.15, help="share of tokens masked (BERT: 80/10/10)")
    pretrain.set_defaults(func=_cmd_pretrain)
