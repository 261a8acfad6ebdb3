"""The one progress bar of the package: a tqdm bar when asked for and tqdm is installed, else a silent one.

Callers never test for ``None``: a disabled bar takes the same calls (``update``, ``set_postfix``,
``set_postfix_str``, ``close``, ``with``) and does nothing, so loops have one code path. tqdm is optional.
"""

from __future__ import annotations


class SilentBar:
    """What ``progress_bar`` returns when no bar is shown: every tqdm call it takes is a no-op."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "SilentBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(enabled: bool, **kwargs):
    """``tqdm.auto.tqdm(**kwargs)`` when ``enabled`` and tqdm is installed, else a ``SilentBar``."""
    if not enabled:
        return SilentBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return SilentBar()
    return tqdm(**kwargs)


__all__ = ["SilentBar", "progress_bar"]
