"""Value types for the ``longattn`` command line: each checks one flag's value as argparse reads it, so a bad
value stops the command before any work with one line that names the flag (argparse adds the flag's name to the
message) and exit status 2, never a traceback from deep inside a run.

Every numeric flag of every sub-command uses one of these (a test walks the parser to keep it so), and each
type carries ``bad``: values it must refuse, which the table-driven CLI test feeds to every flag."""

from __future__ import annotations

import argparse
import math


class _Type:
    """A flag's value type; argparse names it by ``__name__`` in its own messages."""

    __name__ = "value"

    def __repr__(self) -> str:
        return self.__name__


class Number(_Type):
    """An int or float flag within ``[low, high]`` (``low_open``: ``low`` itself refused); finite always."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 name: str | None = None, why: str = "", bad: tuple[str, ...] = ()) -> None:
        self.kind, self.low, self.high, self.low_open, self.why = kind, low, high, low_open, why
        self.__name__ = name or kind.__name__
        self.bad = ("x", "1e400" if kind is float else "1.5") + bad

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            what = f"{what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            what = f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{what} ({self.why})" if self.why else what


positive_int = Number(int, 1, name="positive int", bad=("0", "-1"))
nonnegative_int = Number(int, 0, name="non-negative int", bad=("-1",))
seed = Number(int, 0, 2**63 - 1, name="seed", bad=("-1",))
positive_float = Number(float, 0, low_open=True, name="positive number", bad=("0", "-1", "nan", "inf"))
nonnegative_float = Number(float, 0, name="non-negative number", bad=("-1", "nan", "inf"))
fraction = Number(float, 0, 1, low_open=True, name="fraction", bad=("0", "1.5", "nan"))  # (0, 1]
rate = Number(float, 0, 0.999, name="rate", bad=("-0.1", "1", "nan"))  # dropout, masking: [0, 1)


def at_least(low: int, why: str) -> Number:
    """An int flag with a floor that has a reason (``why`` is shown with a refused value)."""
    return Number(int, low, name=f"int >= {low}", why=why, bad=(str(low - 1),))


class Device(_Type):
    """A torch device string that names a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""

    __name__ = "device"
    bad = ("nope", "cuda:x")

    def __call__(self, text: str) -> str:
        import torch

        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda:0, got {text!r}") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (use cpu)")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                                 f"device(s)")
        elif device.type == "mps" and not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine (use cpu)")
        elif device.type not in ("cpu", "cuda", "mps", "xpu"):
            raise argparse.ArgumentTypeError(f"expected cpu, cuda[:N], mps or xpu, got {text!r}")
        return text


device = Device()


class ExistingPath(_Type):
    """A path that must exist already (an input: a run, a checkpoint, a data folder)."""

    def __init__(self, what: str, *, folder: bool | None = None) -> None:
        self.what, self.folder = what, folder
        self.__name__ = what
        self.bad = ("/nonexistent/longattn-missing",)

    def __call__(self, text: str) -> str:
        from pathlib import Path

        path = Path(text)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{self.what} {text!r} does not exist")
        if self.folder is True and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{self.what} {text!r} is not a folder")
        if self.folder is False and path.is_dir():
            raise argparse.ArgumentTypeError(f"{self.what} {text!r} is a folder, expected a file")
        return text


TYPES = (Number, Device, ExistingPath)  # what a numeric or input flag's ``type`` must be (tests check it)
