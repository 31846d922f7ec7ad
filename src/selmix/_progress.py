"""Progress bars that do not flood log files.

A tqdm bar redraws itself with ``\\r`` several times a second: fine on a terminal, hundreds
of kilobytes in a redirected log. :func:`progress_bar` draws a bar only on a terminal; when
stderr is redirected it prints a plain line every ``every_percent`` percent instead (or
nothing, with ``every_percent=None``). ``TQDM_DISABLE=1`` (tqdm's own convention) and
``enabled=False`` (``--no-progress``) turn both off.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

__all__ = ["progress_bar", "progress_enabled"]

_TRUE = {"1", "true", "yes", "on"}


def progress_enabled(enabled: bool = True, stream: TextIO | None = None) -> bool:
    """Whether a redrawing bar should be shown: enabled, not TQDM_DISABLE, and a terminal."""
    if not enabled or os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


class _PlainProgress:
    """tqdm's interface (update, set_postfix, close, context manager) as occasional lines."""

    def __init__(
        self, total: int | None, desc: str, every_percent: float | None, stream: TextIO
    ) -> None:
        self.total, self.desc, self.stream = total, desc, stream
        self.n = 0
        self.postfix = ""
        self._step = None
        if every_percent is not None and total:
            self._step = max(1, int(total * every_percent / 100))
        self._next = self._step

    def update(self, count: int = 1) -> None:
        self.n += count
        if self._next is not None and self.n >= self._next:
            while self._next <= self.n:
                self._next += self._step
            percent = 100 * self.n / self.total
            postfix = f" {self.postfix}" if self.postfix else ""
            print(
                f"{self.desc}: {self.n}/{self.total} ({percent:.0f}%){postfix}",
                file=self.stream,
                flush=True,
            )

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **values: Any) -> None:
        items = dict(ordered_dict or {}, **values)
        self.postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int | None,
    desc: str = "",
    enabled: bool = True,
    *,
    every_percent: float | None = 10.0,
    stream: TextIO | None = None,
    **tqdm_kwargs: Any,
) -> Any:
    """A tqdm bar on a terminal, else occasional plain lines, else nothing.

    Args:
        total: the number of steps.
        desc: the bar's label, e.g. ``"selmix min_recall"``.
        enabled: False (``--no-progress``, ``progress: false``) shows nothing at all.
        every_percent: when stderr is not a terminal, print one line each time this
            percentage of ``total`` is passed (10: at most about 10 lines); None: print
            nothing.
        stream: where to write (default ``sys.stderr``, read at call time).
        **tqdm_kwargs: passed to ``tqdm`` (e.g. ``leave=False``, ``unit="step"``).

    Returns:
        An object with tqdm's ``update(n)``, ``set_postfix(...)``, ``write(text)`` and
        ``close()``, usable as a context manager.
    """
    stream = sys.stderr if stream is None else stream
    if progress_enabled(enabled, stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=stream, **tqdm_kwargs)
    quiet = not enabled or os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE
    return _PlainProgress(total, desc, None if quiet else every_percent, stream)
