"""``longattn lm ...``: train, eval and generate with the Transformer-XL byte LM (argparse wiring)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..argtypes import (ExistingPath, device, nonnegative_float, nonnegative_int, positive_float, positive_int, rate,
                        seed)
from ..io import write_json
from ..training.setup import add_run_arguments, run_options

_MODEL_FLAGS = ("pattern", "seg_len", "mem_len", "same_length", "clamp_len", "dim", "ffn_dim", "depth", "heads",
                "dropout")
_TRAIN_FLAGS = ("steps", "batch_size", "lr", "warmup", "eval_every", "eval_bytes", "seed")


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import preset, train_lm

    pick = lambda names: {n: getattr(args, n) for n in names if getattr(args, n) is not None}  # noqa: E731
    cfg = preset(args.preset, model=pick(_MODEL_FLAGS), train=pick(_TRAIN_FLAGS), corpus=args.corpus)
    result = train_lm(cfg, out_dir=args.out, **run_options(args))
    if not result["finished"]:
        print(f"stopped at step {result['step']}; the checkpoint in {args.out} resumes it")
        return 0
    print(f"{result['steps']} steps in {result['train_seconds']:.0f} s ({result['seconds_per_step']:.3f} s/step): "
          f"validation {result['val_bpb']:.3f} bits/byte (unigram {result['unigram_bpb']:.3f}); model in "
          f"{Path(args.out) / 'model'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .corpus import load_corpus, unigram_bits_per_byte
    from .evaluate import evaluate, memory_speedup
    from .train import load_lm

    model = load_lm(args.run, device=args.device)
    corpus = load_corpus(args.corpus if args.corpus is not None else model_corpus(args.run))
    data = corpus.split(args.split)
    data = data if args.max_bytes is None else data[:args.max_bytes]
    seg_len = args.seg_len or model.cfg.seg_len
    rows = []
    print(f"{args.split} split of {corpus.name}: {data.numel():,} bytes; unigram "
          f"{unigram_bits_per_byte(corpus.train, data):.3f} bits/byte; trained with mem_len {model.cfg.mem_len}")
    for mem_len in args.mem_len or [model.cfg.mem_len]:
        r = evaluate(model, data, seg_len=seg_len, mem_len=mem_len, batch=args.batch_size,
                     progress=not args.no_progress, desc=f"mem {mem_len}")
        rows.append({"mem_len": mem_len, "seg_len": seg_len, "bits_per_byte": r.bits_per_byte, "bytes": r.bytes,
                     "ms_per_byte": r.ms_per_byte})
        print(f"  mem_len {mem_len:6d} seg_len {seg_len:5d}: {r.bits_per_byte:.4f} bits/byte, "
              f"{r.ms_per_byte:.4f} ms/byte")
    report = {"run": str(args.run), "split": args.split, "corpus": corpus.name, "memory": rows}
    for context in args.recompute or []:
        cmp = memory_speedup(model, data, context=context, seg_len=seg_len, positions=args.recompute_positions,
                             progress=not args.no_progress)
        report.setdefault("recompute", []).append(
            {"context": context, "memory_ms_per_byte": cmp.memory.ms_per_byte, "recompute_ms_per_byte":
             cmp.recompute.ms_per_byte, "speedup": cmp.speedup, "memory_bits_per_byte": cmp.memory.bits_per_byte,
             "recompute_bits_per_byte": cmp.recompute.bits_per_byte})
        print(f"context {context}: memory {cmp.memory.ms_per_byte:.3f} ms/byte, recomputing "
              f"{cmp.recompute.ms_per_byte:.1f} ms/byte: {cmp.speedup:.0f}x faster with memory")
    if args.json:
        write_json(args.json, report)
    return 0


def model_corpus(run: str) -> str | None:
    """The corpus a run directory was trained on (its result.json or, mid-run, its checkpoint), None for the
    default."""
    from ..training import checkpoint
    from ..training.setup import CHECKPOINT, RESULT

    run = Path(run)
    if (run / RESULT).exists():
        return json.loads((run / RESULT).read_text())["config"].get("corpus")
    if (run / CHECKPOINT).exists():  # load_lm reads such a run too: evaluate it on its own corpus
        return checkpoint.load(run / CHECKPOINT)["identity"]["config"].get("corpus")
    return None


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate
    from .train import load_lm

    model = load_lm(args.run, device=args.device)
    prompt = torch.tensor(list(args.prompt.encode("utf-8")), dtype=torch.long)[None]
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(model, prompt, args.bytes, mem_len=args.mem_len, temperature=args.temperature, top_k=args.top_k,
                   generator=gen, progress=not args.no_progress)
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    report = run_sweep(args.out, patterns=args.patterns, preset_name=args.preset, steps=args.steps,
                       mem_lens=args.mem_len, split=args.split, max_bytes=args.max_bytes, corpus=args.corpus,
                       step_repeats=args.step_repeats, progress=not args.no_progress)
    print(f"table in {Path(args.out) / 'sweep.md'}, plot in {Path(args.out) / 'sweep.png'}; "
          f"unigram {report['unigram_bpb']:.3f} bits/byte")
    return 0


def add_parser(sub) -> None:
    from .sweep import DEFAULT_PATTERNS
    from .train import PRESETS

    lm = sub.add_parser("lm", help="byte-level Transformer-XL language model: train, eval, generate")
    cmds = lm.add_subparsers(dest="lm_command", required=True)

    train = cmds.add_parser("train", help="train on the standard-library corpus (default) or an enwik8-style file")
    train.add_argument("--out", required=True, help="output folder of the run (checkpoint, model/, result.json); "
                       "an unfinished run there resumes")
    train.add_argument("--preset", default="small", choices=sorted(PRESETS), help="base config")
    train.add_argument("--corpus", type=ExistingPath("corpus file", folder=False),
                       help="raw byte file or .zip (enwik8); default: this Python's standard library")
    train.add_argument("--pattern", help="full, window, strided, fixed, bigbird, moba (content-chosen blocks), a "
                       "pattern expression, combiner-fixed|combiner-logsparse|combiner-mixture[-REGION] (causal "
                       "Combiner, region 32), fit (the FIT decoder LM) or nsa (Native Sparse Attention) (default: "
                       "the preset's)")
    for flag, kind, text in (("--seg-len", positive_int, "bytes per training segment"),
                             ("--mem-len", nonnegative_int, "memory length"),
                             ("--clamp-len", positive_int, "relative distances beyond it share one encoding"),
                             ("--dim", positive_int, "model width"), ("--ffn-dim", positive_int, "feed-forward width"),
                             ("--depth", positive_int, "layers"), ("--heads", positive_int, "attention heads"),
                             ("--dropout", rate, "dropout rate"), ("--steps", positive_int, "training steps"),
                             ("--batch-size", positive_int, "streams per step over all processes"),
                             ("--lr", positive_float, "peak learning rate"),
                             ("--warmup", nonnegative_int, "warm-up steps"),
                             ("--eval-every", positive_int, "steps between validations"),
                             ("--eval-bytes", positive_int, "validation bytes evaluated during training"),
                             ("--seed", seed, "random seed")):
        train.add_argument(flag, type=kind, help=f"{text} (default: the preset's)")
    train.add_argument("--same-length", action="store_true", default=None,
                       help="every query attends the same number of keys (default: the preset's)")
    add_run_arguments(train)
    train.set_defaults(func=_cmd_train)

    ev = cmds.add_parser("eval", help="bits per byte with one or more memory lengths; speed against recomputing")
    ev.add_argument("run", type=ExistingPath("run"), help="run directory or model directory")
    ev.add_argument("--mem-len", type=nonnegative_int, nargs="+",
                    help="memory lengths to evaluate (default: the training one)")
    ev.add_argument("--seg-len", type=positive_int, help="segment length (default: the training one)")
    ev.add_argument("--split", default="test", choices=["valid", "test"], help="corpus split")
    ev.add_argument("--max-bytes", type=positive_int, help="evaluate a prefix of the split only (default: all of it)")
    ev.add_argument("--batch-size", type=positive_int, default=4, help="parallel streams")
    ev.add_argument("--batch", dest="batch_size", type=positive_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ev.add_argument("--corpus", type=ExistingPath("corpus file", folder=False), help="default: the run's corpus")
    ev.add_argument("--recompute", type=positive_int, nargs="+", metavar="CONTEXT",
                    help="also time recomputing each byte from CONTEXT previous bytes against a memory of CONTEXT")
    ev.add_argument("--recompute-positions", type=positive_int, default=32, help="bytes predicted by recomputation")
    ev.add_argument("--device", type=device, default="cpu", help="torch device")
    ev.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_cmd_eval)

    sweep = cmds.add_parser("sweep", help="train every pattern, evaluate each at several memory lengths: the table")
    sweep.add_argument("--out", default="results/lm", help="output folder: runs in OUT/<pattern>/, the table in "
                       "OUT/sweep.md")
    sweep.add_argument("--patterns", nargs="+", default=list(DEFAULT_PATTERNS),
                       help="preset names or pattern expressions")
    sweep.add_argument("--preset", default="small", choices=sorted(PRESETS), help="base config of every run")
    sweep.add_argument("--steps", type=positive_int, default=300, help="training steps of every run")
    sweep.add_argument("--mem-len", type=nonnegative_int, nargs="+",
                       help="default: the training memory times 1, 2 and 4")
    sweep.add_argument("--split", default="test", choices=["valid", "test"], help="corpus split")
    sweep.add_argument("--max-bytes", type=positive_int, default=200_000, help="evaluate a prefix of the split")
    sweep.add_argument("--corpus", type=ExistingPath("corpus file", folder=False),
                       help="raw byte file or .zip; default: this Python's standard library")
    sweep.add_argument("--step-repeats", type=nonnegative_int, default=5,
                       help="rounds of training steps timed with the patterns taking turns (0: skip)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.set_defaults(func=_cmd_sweep)

    gen = cmds.add_parser("generate", help="continue a prompt, with cached memory")
    gen.add_argument("run", type=ExistingPath("run"), help="run directory or model directory")
    gen.add_argument("--prompt", default="def ", help="text to continue")
    gen.add_argument("--bytes", type=positive_int, default=400, help="bytes to generate")
    gen.add_argument("--mem-len", type=nonnegative_int, help="memory length (default: the training one)")
    gen.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0: greedy")
    gen.add_argument("--top-k", type=positive_int, help="sample from the k likeliest bytes only (default: all)")
    gen.add_argument("--seed", type=seed, default=0, help="random seed of the sampling")
    gen.add_argument("--device", type=device, default="cpu", help="torch device")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=_cmd_generate)
