"""mkdocs hook: pages write ``<!-- presets -->`` where the table of named patterns belongs, and the build fills
it in from ``longattn.patterns.presets``, so the docs never keep a second copy of that table."""

from __future__ import annotations

MARKER = "<!-- presets -->"


def presets_table() -> str:
    from longattn.patterns.presets import describe

    escape = str.maketrans({"|": "\\|"})  # a | inside a cell would end it
    rows = [f"| `{name}` | {text.translate(escape)} |" for name, text in describe()]
    return "\n".join(["| name | pattern |", "|---|---|", *rows])


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(MARKER, presets_table()) if MARKER in markdown else markdown
