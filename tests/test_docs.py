"""The documentation builds strictly (no broken link, page or API name), its links hold, and the Python
examples of its pages run verbatim."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def run_block(page: str, marker: str) -> dict:
    block = next(b for b in python_blocks(page) if marker in b)
    scope: dict = {}
    exec(compile(block, f"docs/{page}", "exec"), scope)
    return scope


def test_mkdocs_builds_strictly(tmp_path):
    # Not a skip: CI installs the docs extra, and this test is what proves the site builds.
    for module in ("mkdocs", "mkdocstrings_handlers.python"):
        assert importlib.util.find_spec(module) is not None, f"{module} missing: pip install -e '.[docs]'"
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The API reference is generated from the docstrings, not left empty.
    api = (site / "api" / "longattn.html").read_text()
    assert 'id="longattn.attention"' in api and 'id="longattn.explain"' in api
    assert "register" in (site / "api" / "hf.html").read_text()
    for page in ("semantics", "patterns", "backends", "benchmarks", "lra", "models", "lm", "vision", "testing",
                 "design"):
        assert (site / f"{page}.html").is_file()


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_semantics_page_draws_the_alignment_matrix():
    # The matrices of the semantics page are the patterns' own masks.
    import longattn as la

    text = (DOCS / "semantics.md").read_text()
    for pattern, nq, nk in ((la.causal(), 2, 5), (la.causal(la.sliding_window(1, 0)), 2, 5), (la.causal(), 4, 2)):
        rows = pattern.dense(nq, nk)[0].int().tolist()
        lines = [f"query row {r} (i = {r + nk - nq})".ljust(21) + " ".join(map(str, row)) for r, row in
                 enumerate(rows)]
        assert all(line in text for line in lines), (pattern.name, lines)


@pytest.mark.parametrize("page", ["index.md", "patterns.md", "backends.md"])
def test_short_examples_run_verbatim(page):
    blocks = python_blocks(page)
    assert blocks
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), {})


def test_models_example_runs_verbatim():
    pytest.importorskip("transformers")
    scope = run_block("models.md", "LongformerModel")
    assert scope["out"].shape == (2, 1000, 64)
    ids = scope["torch"].randint(3, 100, (2, 50))
    mask = scope["torch"].ones_like(ids)
    mask[1, 30:] = 0
    assert scope["bert"](ids, attention_mask=mask).last_hidden_state.shape == (2, 50, 64)


def test_language_model_example_runs_verbatim():
    scope = run_block("lm.md", "TransformerXL")
    assert scope["text"].shape == (2, 30) and scope["out"].logits.shape == (2, 32, 256)
    assert [m.shape for m in scope["memory"]] == [(2, 96, 64)] * 2


def test_vision_example_runs_verbatim():
    scope = run_block("vision.md", "botnet50")
    assert scope["logits"].shape == (2, 10)
    assert [tuple(c.shape[1:]) for c in (scope[n] for n in ("c2", "c3", "c4", "c5"))] == [
        (256, 128, 128), (512, 64, 64), (1024, 32, 32), (2048, 16, 16)]
    assert scope["local"].feature_info[-1]["reduction"] == 16


def documented_commands() -> list[tuple[str, str, bool]]:
    """Every ``longattn`` command of the README and docs/: (file, command, whole), where ``whole`` is a line of
    a bash block (a command to run) and not ``whole`` a mention in the prose (possibly a fragment)."""
    found = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if "longattn " in line and not line.lstrip().startswith(("pip", "make", "#")):
                    found.append((path.name, line, True))
        found += [(path.name, cmd, False) for cmd in re.findall(r"`(longattn [^`]+)`", text)]
    return found


def test_documented_commands_use_current_flags(monkeypatch):
    """A command in the docs must parse with today's CLI, using the flag names its --help shows (renamed flags
    are still accepted, silently, so parsing alone would not notice a stale spelling). The paths they name
    exist on the reader's machine, not here: input paths are not checked."""
    import argparse
    import shlex

    from longattn import argtypes

    monkeypatch.setattr(argtypes.ExistingPath, "__call__", lambda self, text: text)

    from longattn.cli import build_parser

    def subparsers(parser):
        return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)

    problems, commands = [], documented_commands()
    assert len(commands) > 20
    for page, line, whole in commands:
        tokens = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
        start = next(i for i, t in enumerate(tokens) if t in ("longattn", "longattn.cli")) + 1
        argv, parser = tokens[start:], build_parser()
        depth = 0
        while (choices := subparsers(parser)) is not None and depth < len(argv) and argv[depth] in choices.choices:
            parser, depth = choices.choices[argv[depth]], depth + 1
        shown = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
        stale = [t.split("=")[0] for t in argv if t.startswith("--") and t.split("=")[0] not in shown]
        if stale:
            problems.append(f"{page}: {line.strip()!r}: {stale} not in --help")
        elif whole and not any(t.isupper() for t in argv):  # SRC, DST, N: a synopsis, not a command
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                problems.append(f"{page}: {line.strip()!r} does not parse")
    assert not problems, "\n".join(problems)
