"""The ``longattn`` command line: every sub-command's ``--help`` runs and shows defaults; one flag name per idea."""

from __future__ import annotations

import argparse
import re

import pytest

from longattn.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """Every leaf sub-command's parser, by its words (``("lra", "run")``)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, path + (name,)))
    return found or {path: parser}


COMMANDS = _commands(build_parser())
NAMES = [" ".join(words) for words in COMMANDS]


def _options(words: str) -> dict[str, argparse.Action]:
    """The options ``--help`` documents, by each of their spellings."""
    parser = COMMANDS[tuple(words.split())]
    return {flag: a for a in parser._actions if a.help is not argparse.SUPPRESS for flag in a.option_strings}


def _shows_a_default(action: argparse.Action) -> bool:
    return action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS


def test_every_command_is_found():
    assert {"show", "bench", "convert", "lra run", "lra suite", "lm train", "lm eval", "vision train"} <= set(NAMES)


@pytest.mark.parametrize("words", NAMES)
def test_help_runs_and_shows_every_default(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*words.split(), "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: longattn {words}")
    # one entry per option: the lines from its flags up to the next option's
    body = text.split("options:", 1)[1]
    entries = {re.match(r"\s*(-[\w-]+)", e).group(1): " ".join(e.split())
               for e in re.split(r"\n(?=  -)", body) if e.strip()}
    for flag, action in _options(words).items():
        if flag in entries and _shows_a_default(action):
            assert "default" in entries[flag], f"longattn {words} --help: {flag} hides its default"


# One name per idea: every command that has the idea spells it this way.
SHARED = {
    "--no-progress": ["bench", "lra run", "lra suite", "lra generate", "lm train", "lm eval", "lm sweep",
                      "lm generate", "vision train"],
    "--out": ["bench", "convert", "lra run", "lra suite", "lra report", "lm train", "lm sweep", "vision train"],
    "--json": ["lra stats", "lm eval", "vision count", "vision latency", "vision attention"],
    "--batch-size": ["bench", "lra run", "lm train", "lm eval", "vision train"],
    "--heads": ["show", "bench", "lm train"],
    "--dim": ["bench", "lm train"],
    "--depth": ["bench", "lm train"],
    "--seed": ["lra run", "lra generate", "lm train", "lm generate", "vision train"],
    "--device": ["bench", "lra run", "lm train", "lm eval", "lm generate", "vision train"],
    # how a training run executes: one helper (training.setup.add_run_arguments) adds them everywhere
    "--strategy": ["lra run", "lm train", "vision train"],
    "--no-resume": ["lra run", "lm train", "vision train"],
    "--stop-after": ["lra run", "lm train"],
}
RETIRED = ["--num-heads", "--batch", "--hidden", "--layers", "--hidden-size", "--num-layers", "--mlp-dim",
           "--intermediate-size"]


@pytest.mark.parametrize("flag, words", [(f, w) for f, ws in SHARED.items() for w in ws])
def test_shared_flag_names(flag, words):
    assert flag in _options(words), f"longattn {words} lacks {flag}"


@pytest.mark.parametrize("words", NAMES)
def test_no_retired_spelling_is_documented(words):
    options = _options(words)
    assert not [f for f in RETIRED if f in options]
    # --models takes several registry names, --model exactly one
    assert "--models" not in options or options["--models"].nargs == "+"
    assert "--model" not in options or options["--model"].nargs is None


@pytest.mark.parametrize("argv, dest, value", [
    (["show", "full()", "--seq-len", "8", "--num-heads", "2"], "heads", 2),
    (["bench", "--batch", "3"], "batch_size", 3),
    (["bench", "--hf", "longformer", "--hidden", "32", "--layers", "1"], "dim", 32),
    (["lm", "eval", "run", "--batch", "2"], "batch_size", 2),
])
def test_former_spellings_still_parse(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_defaults_unchanged_by_the_aliases():
    args = build_parser().parse_args(["bench"])
    assert (args.batch_size, args.heads, args.dim, args.depth) == (1, 12, 768, 12)
    assert build_parser().parse_args(["show", "full()", "--seq-len", "8"]).heads == 1


def test_package_is_marked_typed():
    from importlib.resources import files

    assert files("longattn").joinpath("py.typed").is_file()  # PEP 561: type checkers read our annotations
