"""Patterns from text, for the command line: ``"longformer(window=512, global_idx=[0]) | causal()"``.

Only the registered constructors, literal arguments and the ``|`` / ``&`` operators are accepted; the
text is parsed with ``ast``, never evaluated.
"""

from __future__ import annotations

import ast
from typing import Callable

from ._base import Pattern
from .bigbird import bigbird
from .causal import causal
from .compose import per_head
from .documents import documents
from .full import full
from .global_tokens import global_tokens
from .longformer import longformer
from .random_blocks import random_blocks
from .sparse_transformer import fixed, sparse_transformer, strided
from .topk_blocks import topk_blocks
from .window import dilated, sliding_window
from .window_2d import window_2d

CONSTRUCTORS: dict[str, Callable[..., Pattern]] = {
    f.__name__: f
    for f in (full, sliding_window, dilated, global_tokens, random_blocks, bigbird, strided, fixed, causal,
              per_head, longformer, sparse_transformer, window_2d, documents, topk_blocks)
}


def parse_pattern(text: str) -> Pattern:
    """Build a pattern from an expression such as ``"causal(sliding_window(128)) | global_tokens([0])"``."""
    if not isinstance(text, str):
        raise TypeError(f"pattern expression must be a string, got {type(text).__name__}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"pattern: cannot parse {text!r}: {err.msg}") from None
    except (RecursionError, MemoryError):  # Python's own parser gives up on very long or deep expressions
        raise ValueError(f"pattern: the expression ({len(text):,} characters) is too long or deeply nested to "
                         f"parse; combine the patterns in Python (a | b, functools.reduce) instead") from None
    return _build(tree.body, text)


def _build(node: ast.AST, text: str):
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
        # a | b | c parses as ((a | b) | c): walk the left spine in a loop, so long unions do not recurse
        spine = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
            spine.append(node)
            node = node.left
        result = _build(node, text)
        for op in reversed(spine):
            right = _build(op.right, text)
            result = result | right if isinstance(op.op, ast.BitOr) else result & right
        return result
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id not in CONSTRUCTORS:
            raise ValueError(f"pattern: unknown constructor {node.func.id!r} in {text!r}; "
                             f"known: {', '.join(sorted(CONSTRUCTORS))}")
        args = [_build(a, text) for a in node.args]
        kwargs = {kw.arg: _build(kw.value, text) for kw in node.keywords}
        return CONSTRUCTORS[node.func.id](*args, **kwargs)
    if isinstance(node, ast.Name) and node.id in CONSTRUCTORS:
        return CONSTRUCTORS[node.id]()
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_build(e, text) for e in node.elts]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _build(node.operand, text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"pattern: unsupported expression {ast.unparse(node)!r} in {text!r}")
