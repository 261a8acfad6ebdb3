"""The ``longattn`` command line: every sub-command's ``--help`` runs and shows defaults; one flag name per idea."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from longattn import argtypes
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
    assert main([*words.split(), "--help"]) == 0
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
    (["lm", "eval", ".", "--batch", "2"], "batch_size", 2),
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


# --- bad input: exit 2, one line naming the flag, never a traceback -------------------------------------------

def _typed_actions() -> list[tuple[str, argparse.Action]]:
    """Every (command, flag) whose value has a type, hidden former spellings included."""
    return [(words, a) for words, parser in zip(NAMES, COMMANDS.values()) for a in parser._actions
            if a.type is not None]


def test_every_number_and_input_path_flag_is_validated():
    """Bare ``int``/``float`` accept -5 and 0 where they mean nothing: every typed flag uses ``argtypes``."""
    loose = [f"{words} {a.option_strings or a.dest}" for words, a in _typed_actions()
             if not isinstance(a.type, argtypes.TYPES) and not hasattr(a.type, "bad")]
    assert not loose, f"flags without a validating type: {loose}"


def _bad_cases() -> list[tuple[str, list[str], str]]:
    """(command, argv, name the message must carry) for every typed flag and each value its type refuses."""
    cases = []
    for words, action in _typed_actions():
        bad = list(getattr(action.type, "bad", ()))
        if isinstance(action.type, argtypes.Device) and not torch.cuda.is_available():
            bad.append("cuda")
        flag = action.option_strings[0] if action.option_strings else None
        for value in bad:
            argv = [*words.split(), *([flag, value] if flag else [value])]
            cases.append((words, argv, flag or action.dest))
    return cases


BAD_FLAGS = _bad_cases()


def _fails_cleanly(argv: list[str], capsys, name: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"longattn {' '.join(argv)}: exit {code}"
    assert "Traceback" not in err and err.count("\n") == 1, f"longattn {' '.join(argv)}: {err!r}"
    assert name in err and err.startswith("longattn "), err
    return err


def test_the_bad_value_table_covers_every_command_with_numbers():
    commands = {words for words, _, _ in BAD_FLAGS}
    assert len(BAD_FLAGS) >= 250 and {"bench", "show", "convert", "lra run", "lm eval", "lm generate",
                                       "vision attention", "vision latency", "longdoc packed"} <= commands


@pytest.mark.parametrize("words, argv, name", BAD_FLAGS, ids=[" ".join(argv) for _, argv, _ in BAD_FLAGS])
def test_a_bad_value_exits_2_with_one_line(words, argv, name, capsys):
    _fails_cleanly(argv, capsys, name)


def test_argument_errors_name_the_command_and_the_flag(capsys):
    err = _fails_cleanly(["bench", "--lengths", "-5"], capsys, "--lengths")
    assert err.startswith("longattn bench: error: argument --lengths: expected an integer >= 1, got '-5'")
    err = _fails_cleanly(["longdoc", "retrieve", "--max-length", "100"], capsys, "--max-length")
    assert "512 (the source model's positions)" in err


# Errors found after parsing (combinations, files, names) take the same one-line form.
def _after_parsing(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir()
    (tmp / "src").mkdir()
    (tmp / "src" / "config.json").write_text("{}")
    return [
        (["show"], "--seq-len"),
        (["show", "sliding_window(", "--seq-len", "10"], "cannot parse"),
        (["show", "longformer_512", "--seq-len", "64", "--head", "3"], "head must be in [0, 1)"),
        (["lra", "generate", "--task", "listops", "--data-dir", str(tmp / "d"), "--set", "train=1000"],
         "unknown ListOpsSettings setting 'train'; the settings are max_depth, max_args, min_length, max_length, "
         "num_train"),
        (["lra", "generate", "--task", "pathfinder16", "--data-dir", str(tmp / "d"), "--set", "bogus=1"],
         "unknown PathfinderSettings setting 'bogus'"),
        (["lra", "generate", "--task", "listops", "--data-dir", str(tmp / "d"), "--set", "max_depth"], "KEY=VALUE"),
        (["lra", "generate", "--task", "listops", "--data-dir", str(tmp / "d"), "--set", "max_depth=0"], "max_depth"),
        (["lra", "stats", "--task", "listops", "--data-dir", str(tmp / "empty")], "basic_train.tsv"),
        (["lra", "run", "--task", "listops", "--attention", "nonsense", "--out", str(tmp)], "'nonsense'"),
        (["lra", "suite", "--attentions", "full", "nonsense", "--out", str(tmp)], "'nonsense'"),
        (["convert", "--to-long", "128", "--out", str(tmp / "src"), str(tmp / "src")], "is the source"),
        (["lm", "eval", str(tmp / "empty")], "not a model or LM run directory"),
        (["lm", "generate", str(tmp / "empty")], "not a model or LM run directory"),
        (["lm", "train", "--out", str(tmp / "lm"), "--pattern", "nonsense("], "cannot parse"),
        (["lm", "train", "--out", str(tmp / "lm"), "--heads", "3"], "divisible by heads"),
        (["vision", "train", "--models", "nope", "--out", str(tmp)], "unknown model 'nope'"),
        (["vision", "latency", "--model", "nope"], "unknown model 'nope'"),
    ]


def test_errors_found_after_parsing_take_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written where the tests run
    for argv, name in _after_parsing(tmp_path):
        _fails_cleanly(argv, capsys, name)
    assert not (tmp_path / "data").exists(), "data was generated before the bad name was seen"


def test_lra_generate_offers_only_tasks_it_can_generate(capsys):
    _fails_cleanly(["lra", "generate", "--task", "text", "--data-dir", "x"], capsys, "invalid choice: 'text'")


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("LONGATTN_TRACEBACK", "1")
    with pytest.raises(ValueError, match="cannot parse"):
        main(["show", "sliding_window(", "--seq-len", "10"])


def test_show_reports_the_file_it_wrote(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["show", "sliding_window(4)", "--seq-len", "32", "--plot", str(tmp_path / "pic")]) == 0
    assert capsys.readouterr().out.rstrip().endswith(str(tmp_path / "pic.png")) and (tmp_path / "pic.png").is_file()
    assert main(["show", "sliding_window(4)", "--seq-len", "32", "--plot", str(tmp_path)]) == 0
    assert (tmp_path / "sliding_window_4.png").is_file()
