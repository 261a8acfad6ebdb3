"""Field-by-field checks of a model config dataclass, run when the config is built: each field's type from its
annotation and its range, so that a wrong ``config.json`` value is named where it is read and not met as a
``ZeroDivisionError`` or a format error deep inside a model.

The rules: an ``int`` field holds an int (not a bool, not ``16.0``), a ``float`` field an int or a finite float,
a ``list[int] | int`` field either; ``X | None`` also allows None. No number in a config may be negative: ints
are >= 1 and floats > 0 unless the config names another floor (``minimum``, inclusive) or the field is a rate
(``rates``: dropout, in [0, 1)). Fields of other types (tuples, nested configs) are left to the config."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Iterable


def _allowed(hint) -> tuple[set, bool]:
    """The simple types a field's annotation allows (of int, float, bool, str, dict, list) and whether None is
    one; an empty set for annotations these checks do not cover."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    simple, nullable = set(), False
    for arg in args:
        if arg is type(None):
            nullable = True
        elif arg in (int, float, bool, str, dict):
            simple.add(arg)
        elif typing.get_origin(arg) is list and typing.get_args(arg) in ((int,), (float,)):
            simple.add(list)
        else:
            return set(), nullable
    return simple, nullable


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple)) and all(_is(v, int) for v in value)
    return isinstance(value, kind)


_NAMES = {int: "an int", float: "a number", bool: "true or false", str: "a string", dict: "an object",
          list: "a list of ints"}


def check_fields(cfg, *, minimum: dict[str, float] | None = None, rates: Iterable[str] = ()) -> None:
    """``TypeError`` naming the first field whose value has the wrong type, ``ValueError`` naming the first out
    of range (see the module docstring for the rules)."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    minimum, rates = minimum or {}, set(rates)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds, nullable = _allowed(hints[f.name])
        if not kinds or (value is None and nullable):
            continue
        if not any(_is(value, kind) for kind in kinds):
            expected = " or ".join(_NAMES[k] for k in sorted(kinds, key=list(_NAMES).index))
            raise TypeError(f"{cls.__name__}: {f.name} must be {expected}{' or null' if nullable else ''}, got "
                            f"{value!r}")
        numbers = list(value) if isinstance(value, (list, tuple)) else [value]
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            if not math.isfinite(number):
                raise ValueError(f"{cls.__name__}: {f.name} must be finite, got {number!r}")
            if f.name in rates:
                if not 0 <= number < 1:
                    raise ValueError(f"{cls.__name__}: {f.name} must be in [0, 1), got {number!r}")
            elif f.name in minimum:
                if number < minimum[f.name]:
                    raise ValueError(f"{cls.__name__}: {f.name} must be >= {minimum[f.name]}, got {number!r}")
            elif isinstance(number, int) and float not in kinds:
                if number < 1:
                    raise ValueError(f"{cls.__name__}: {f.name} must be >= 1, got {number!r}")
            elif not number > 0:
                raise ValueError(f"{cls.__name__}: {f.name} must be > 0, got {number!r}")
