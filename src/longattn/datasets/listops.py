"""ListOps: nested list expressions over the digits 0-9, their value, and a generator of LRA's files.

ListOps (Nangia & Bowman, 2018) nests four operators over the digits 0-9: ``MIN``, ``MAX``, ``MED`` (the
median, rounded down: ``int(np.median(args))``) and ``SM`` (the sum modulo 10). An expression reads
``[MAX 2 9 [MIN 4 7 ] 0 ]``; its value is 9. LRA's release (``lra_release/listops-1000/``) holds three
tab-separated files, ``basic_train.tsv``, ``basic_val.tsv`` and ``basic_test.tsv``, each with the header
``Source<TAB>Target`` and one expression per line, written as its binary parse tree with every node in
parentheses (``to_string`` in LRA's ``lra_benchmarks/data/listops.py``)::

    ( ( ( [MAX 2 ) 9 ) ] )                                          [MAX 2 9 ]
    ( ( ( ( [SM ( ( ( [MED 6 ) 8 ) ] ) ) 0 ) 2 ) ] )                [SM [MED 6 8 ] 0 2 ]

That is: an operator with k arguments is written as k + 1 opening parentheses, the operator, each argument
followed by ``)``, then ``] )``. Lines end in ``\\r\\n`` (Python's ``csv`` writer).

The generator grows trees as LRA's does: a node shallower than ``max_depth`` is an operator with probability 0.25,
drawn uniformly with 2..``max_args`` arguments, else a uniform digit; a tree is kept when its token count
(operators, digits and ``]``, without the parentheses: what LRA's input pipeline reads) lies strictly between
``min_length`` and ``max_length``, and only distinct trees are kept. LRA's defaults: depth 10, 10 arguments,
lengths 500-2000, and 96,000 / 2,000 / 2,000 examples. How a model reads the files (token ids, cutting) is
the LRA task's business (``longattn.lra.tasks.listops``).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..io import atomic_path
from ..training.progress import progress_bar
from .files import SPLITS

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
_IGNORED = ("(", ")")  # the parse-tree parentheses of the official files; LRA deletes them

FILE_NAMES = {split: f"basic_{split}.tsv" for split in SPLITS}  # LRA's task_name "basic"
HEADER = ("Source", "Target")
SUBDIRS = ("listops-1000",)  # the release's folder, when data_dir is lra_release/
SOURCE = "LRA's lra_release/listops-1000/ (basic_*.tsv), or the generator"


# ----------------------------------------------------------------------------------------------- semantics
def apply(op: str, args: list[int]) -> int:
    """The value of operator ``op`` (one of ``OPERATORS``) over its arguments' values."""
    if not args:
        raise ValueError(f"{op} has no arguments")
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        s, n = sorted(args), len(args)
        # int(np.median(...)) in the original: the mean of the two middle values, truncated (values are >= 0)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    return sum(args) % 10  # [SM


def expression_tokens(tokens: Sequence[str] | str) -> list[str]:
    """The tokens of an expression (a list, or text split on whitespace) without the parse-tree parentheses."""
    return [t for t in (tokens.split() if isinstance(tokens, str) else tokens) if t not in _IGNORED]


def evaluate(tokens: Sequence[str] | str) -> int:
    """The value of one expression, from its tokens (``["[MAX", "2", "9", "]"]``) or its text.

    Parentheses are ignored, so the official file format and LRA's token sequence both work. ``MED`` of an
    even number of arguments is the mean of the middle two rounded down (``[MED 3 4 ]`` is 3), as LRA's
    ``int(np.median(...))``; ``SM`` is the sum modulo 10. ``ValueError`` for an unknown token, an unbalanced
    ``]``, an operator without arguments, or anything but exactly one expression.
    """
    stack: list[tuple[str, list[int]]] = []  # open operators and their arguments so far
    result: list[int] = []
    for tok in expression_tokens(tokens):
        if tok in OPERATORS:
            stack.append((tok, []))
            continue
        if tok == CLOSE:
            if not stack:
                raise ValueError("']' closes no operator")
            value = apply(*stack.pop())
        elif len(tok) == 1 and tok.isdigit():
            value = int(tok)
        else:
            raise ValueError(f"unknown ListOps token {tok!r}")
        (stack[-1][1] if stack else result).append(value)
    if stack:
        raise ValueError(f"{len(stack)} operator(s) not closed by ']'")
    if len(result) != 1:
        raise ValueError(f"expected one expression, found {len(result)}")
    return result[0]


def tree_depth(tokens: Sequence[str] | str) -> int:
    """Levels of the tree, counted as the generator's ``max_depth``: a digit is 1, ``[MAX 2 9 ]`` is 2."""
    depth = level = 0
    for tok in expression_tokens(tokens):
        level += (tok in OPERATORS) - (tok == CLOSE)
        depth = max(depth, level + 1)
    return depth


# ----------------------------------------------------------------------------------------------- generator
@dataclass(frozen=True)
class ListOpsSettings:
    """How the generator grows trees; the defaults are LRA's (``lra_benchmarks/data/listops.py`` flags)."""

    max_depth: int = 10  # tree levels, the root at 1; nodes at this level are digits
    max_args: int = 10  # an operator takes 2..max_args arguments, uniformly
    min_length: int = 500  # keep a tree when min_length < tokens < max_length (both exclusive, as LRA)
    max_length: int = 2000
    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000
    min_value: int = 0  # digits are drawn uniformly from min_value..max_value
    max_value: int = 9
    operator_prob: float = 0.25  # chance that a node shallower than max_depth is an operator (LRA's VALUE_P)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name != "operator_prob" and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"ListOpsSettings: {name} must be an int, got {value!r}")
        lows = {"max_depth": 1, "max_args": 2, "min_length": 0, "num_train": 0, "num_val": 0, "num_test": 0,
                "min_value": 0}
        for name, low in lows.items():
            if getattr(self, name) < low:
                raise ValueError(f"ListOpsSettings: {name} must be >= {low}, got {getattr(self, name)}")
        if self.max_depth > 200:  # the serialiser recurses once per level
            raise ValueError(f"ListOpsSettings: max_depth must be <= 200, got {self.max_depth}")
        if self.max_length < self.min_length + 2:
            raise ValueError(f"ListOpsSettings: no length lies strictly between min_length {self.min_length} and "
                             f"max_length {self.max_length}")
        if not self.min_value <= self.max_value <= 9:
            raise ValueError(f"ListOpsSettings: need 0 <= min_value <= max_value <= 9, got "
                             f"{self.min_value}..{self.max_value}")
        if not 0.0 < self.operator_prob <= 1.0:
            raise ValueError(f"ListOpsSettings: operator_prob must be in (0, 1], got {self.operator_prob}")

    @property
    def counts(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


def _check_reachable(s: ListOpsSettings) -> None:
    """``ValueError`` unless some tree of these settings has a length strictly inside the range."""
    if s.max_length > 20_000:  # the exact check below costs O(max_length^2); keep it for sane sizes
        longest = 1
        for _ in range(s.max_depth - 1):
            longest = 2 + s.max_args * longest
        ok = longest > s.min_length
    else:
        # Bit L of `reach` is set when a subtree rooted at the current level can have L tokens (< max_length).
        mask = (1 << s.max_length) - 1
        reach = 1 << 1  # the deepest level: a digit
        for _ in range(s.max_depth - 1):
            lengths = [i for i in range(reach.bit_length()) if reach >> i & 1]
            args, total = reach, 0  # lengths of 1 argument, then of 2, 3, ... together
            for _k in range(2, s.max_args + 1):
                args = _sum_set(args, lengths, mask)
                total |= args
            reach = (1 << 1) | ((total << 2) & mask)  # a digit, or an operator and "]" around 2+ arguments
        inside = reach >> (s.min_length + 1)
        ok = inside != 0
        longest = reach.bit_length() - 1
    if not ok:
        raise ValueError(
            f"ListOps settings cannot reach the length range: a tree must have more than {s.min_length} and "
            f"fewer than {s.max_length} tokens, but with max_depth={s.max_depth} and max_args={s.max_args} "
            f"the longest below {s.max_length} has {longest}; raise max_depth or max_args, or lower min_length")


def _sum_set(a: int, lengths: list[int], mask: int) -> int:
    out = 0
    for length in lengths:
        out |= a << length
    return out & mask


_FRUITLESS = 200_000  # draws without a new example before the generator gives up


def generate_examples(settings: ListOpsSettings | None = None, *, seed: int = 0,
                      progress: bool | None = None) -> Iterator[tuple[str, int]]:
    """Distinct ``(source, label)`` pairs in the official text format, ``sum(settings.counts)`` of them.

    Deterministic for a ``seed`` (its own ``random.Random``). The first ``num_train`` are the training split,
    then ``num_val``, then ``num_test`` (LRA cuts one set of distinct trees the same way). ``progress``
    shows a tqdm bar (default: for more than 10,000 examples, when tqdm is installed). ``ValueError`` at once
    when no tree can reach the length range, and during the run when 200,000 draws in a row bring nothing
    new (a range that is reachable only with negligible probability, or too few distinct trees).
    """
    settings = settings or ListOpsSettings()
    _check_reachable(settings)
    return _examples(settings, seed, progress)


def _grow(s: ListOpsSettings, draw, digits: list[str]) -> tuple[list[list], int]:
    """One tree: ``(levels, tokens)``, or ``tokens >= max_length`` once it is known to be too long.

    Breadth first: level d lists its nodes (a digit, or ``(arguments, operator index)``), and an operator's
    arguments are contiguous in level d + 1, in their parent's order. Counting one token for each node not
    yet expanded bounds the length from below, so an oversized tree is dropped a few levels in instead of
    after ``max_length`` tokens. The distribution is the original's: every node is drawn independently.
    """
    p, hi, spread, n_digits, n_ops = s.operator_prob, s.max_length, s.max_args - 1, len(digits), len(OPERATORS)
    if s.max_depth == 1 or draw() > p:
        return [[digits[int(draw() * n_digits)]]], 1
    k = 2 + int(draw() * spread)
    levels = [[(k, int(draw() * n_ops))]]
    width, length = k, 2 + k  # an operator is 2 tokens (itself and "]") plus its arguments
    for depth in range(2, s.max_depth + 1):
        if depth == s.max_depth:
            levels.append([digits[int(draw() * n_digits)] for _ in range(width)])
            break
        level, width_next = [], 0
        for _ in range(width):
            if draw() <= p:
                k = 2 + int(draw() * spread)
                level.append((k, int(draw() * n_ops)))
                width_next += k
                length += 1 + k
                if length >= hi:
                    return levels, length
            else:
                level.append(digits[int(draw() * n_digits)])
        levels.append(level)
        width = width_next
        if not width:
            break
    return levels, length


def _examples(s: ListOpsSettings, seed: int, progress: bool | None) -> Iterator[tuple[str, int]]:
    total = sum(s.counts.values())
    bar = progress_bar(total > 10_000 if progress is None else progress, total=total, desc="listops", unit="ex")
    draw = random.Random(seed).random
    digits = [str(v) for v in range(s.min_value, s.max_value + 1)]
    seen: set[bytes] = set()  # digests, not texts: 100k full-size sources would take ~650 MB
    fruitless = 0
    try:
        while len(seen) < total:
            fruitless += 1
            if fruitless > _FRUITLESS:
                raise ValueError(f"ListOps generator: {_FRUITLESS} draws in a row gave no new example with "
                                 f"{s.min_length} < length < {s.max_length} after {len(seen)} of {total}; "
                                 f"widen the range or change max_depth, max_args or operator_prob")
            levels, length = _grow(s, draw, digits)
            if not s.min_length < length < s.max_length:
                continue
            chunks: list[str] = []
            label = _serialise(levels, [0] * len(levels), 0, chunks)
            source = " ".join(chunks)
            digest = hashlib.blake2b(source.encode(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            fruitless = 0
            bar.update()
            yield source, label
    finally:
        bar.close()


def _serialise(levels: list[list], cursor: list[int], depth: int, out: list[str]) -> int:
    """Write the next node of ``levels[depth]`` depth-first in the official format; return its value."""
    node = levels[depth][cursor[depth]]
    cursor[depth] += 1
    if isinstance(node, str):
        out.append(node)
        return int(node)
    k, op = node
    out.append("( " * (k + 1) + OPERATORS[op])
    args = []
    for _ in range(k):
        args.append(_serialise(levels, cursor, depth + 1, out))
        out.append(")")
    out.append("] )")
    return apply(OPERATORS[op], args)


# ----------------------------------------------------------------------------------------------- files
def write_files(data_dir: Path | str, settings: ListOpsSettings | None = None, *, seed: int = 0,
                progress: bool | None = None) -> None:
    """Write ``basic_{train,val,test}.tsv`` into ``data_dir`` from ``generate_examples(settings, seed=seed)``.

    The three files replace earlier ones only once all three are complete, so an interrupted or failed run
    leaves the folder as it was.
    """
    settings = settings or ListOpsSettings()
    examples = generate_examples(settings, seed=seed, progress=progress)
    data_dir = Path(data_dir)
    with ExitStack() as stack:  # every file's atomic_path exits (renames) only after the last one is written
        for split, count in settings.counts.items():
            tmp = stack.enter_context(atomic_path(data_dir / FILE_NAMES[split]))
            with open(tmp, "w", encoding="ascii", newline="") as f:
                f.write("\t".join(HEADER) + "\r\n")
                for source, label in itertools.islice(examples, count):
                    f.write(f"{source}\t{label}\r\n")


__all__ = ["CLOSE", "FILE_NAMES", "HEADER", "OPERATORS", "SOURCE", "SUBDIRS", "ListOpsSettings", "apply",
           "evaluate", "expression_tokens", "generate_examples", "tree_depth", "write_files"]
