"""The package's layers (docs/design.md), checked on the import statements: a layer imports only from layers
below it, applications never import each other, and no module imports another package's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import longattn

ROOT = Path(longattn.__file__).parent

# Bottom to top; a unit is a top-level module or package of longattn. Peers share a layer and never import
# each other (the applications).
LAYERS = [
    {"caches", "io", "argtypes"},
    {"patterns"},
    {"backends"},
    {"functional"},
    {"modules"},
    {"training"},
    {"datasets"},
    {"models"},
    {"integrations"},
    {"tools"},
    {"lra", "lm", "vision", "longdoc"},
    {"cli"},
]
LEVEL = {unit: n for n, layer in enumerate(LAYERS) for unit in layer}


def _unit(parts: tuple[str, ...]) -> str:
    """The top-level unit of a module path inside longattn (``("backends", "blocked", "kernel")`` -> backends)."""
    return parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[tuple[str, ...], list[str], int]]:
    """(imported module path inside longattn, imported names, line) for every relative or longattn import."""
    module = path.relative_to(ROOT).with_suffix("").parts
    package = module[:-1]  # what a relative import of level 1 starts from (for __init__.py too)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = (*base, *(node.module.split(".") if node.module else ()))
            elif node.module and node.module.split(".")[0] == "longattn":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "longattn":
                    found.append((tuple(alias.name.split(".")[1:]), [], node.lineno))
    return found


FILES = sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] != "__init__.py")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers_and_never_into_private_names(path):
    own = _unit(path.relative_to(ROOT).parts)
    assert own in LEVEL, f"{own} is in no layer: add it to LAYERS and to docs/design.md"
    for target, names, line in _imports(path):
        if not target:  # `from . import x` at the top level of the package
            continue
        unit = _unit(target)
        where = f"{path.relative_to(ROOT)}:{line} imports longattn.{'.'.join(target)}"
        if unit != own:
            assert LEVEL[unit] < LEVEL[own], f"{where}: {unit} is not below {own}"
            private = [p for p in target if p.startswith("_") and p != "__init__"]
            private += [n for n in names if n.startswith("_")]
            assert not private, f"{where}: another package's private name {private}"
