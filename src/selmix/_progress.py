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
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

from selmix._config import Flag, setting

__all__ = ["progress_bar", "progress_enabled", "progress_setting"]

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
        self,
        total: int | None,
        desc: str,
        every_percent: float | None,
        stream: TextIO,
        iterable: Iterable[Any] | None = None,
        initial: int = 0,
    ) -> None:
        self.total, self.desc, self.stream = total, desc, stream
        self.iterable = iterable
        self.n = initial
        self.postfix = ""
        self._step = None
        self._next: int | None = None
        if every_percent is not None and total:
            self._step = max(1, int(total * every_percent / 100))
            # the next multiple of the step after `initial` (a resumed run goes on counting)
            self._next = (initial // self._step + 1) * self._step

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, count: int = 1) -> None:
        self.n += count
        if self._next is not None and self._step is not None and self.n >= self._next:
            while self._next <= self.n:
                self._next += self._step
            percent = 100 * self.n / self.total if self.total else 100.0
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
    steps: int | Iterable[Any] | None,
    desc: str = "",
    enabled: bool = True,
    *,
    every_percent: float | None = 10.0,
    stream: TextIO | None = None,
    initial: int = 0,
    disable: bool = False,
    **tqdm_kwargs: Any,
) -> Any:
    """A tqdm bar on a terminal, else occasional plain lines, else nothing.

    A drop-in for the ``tqdm(...)`` calls of the trainers: ``progress_bar(range(epochs),
    "pretrain", disable=not progress, leave=False)`` iterates like tqdm does.

    Args:
        steps: the number of steps, or an iterable to wrap (its ``len`` is the total
            unless ``total=`` is also given among ``tqdm_kwargs``, as a resumed run does:
            ``progress_bar(range(first, n), initial=first, total=n)``).
        desc: the bar's label, e.g. ``"selmix min_recall"``.
        enabled: False (``--no-progress``, ``progress: false``) shows nothing at all.
        every_percent: when stderr is not a terminal, print one line each time this
            percentage of ``total`` is passed (10: at most about 10 lines); None: print
            nothing.
        stream: where to write (default ``sys.stderr``, read at call time).
        initial: the count to start from (a resumed run).
        disable: tqdm's spelling of ``enabled=False``.
        **tqdm_kwargs: passed to ``tqdm`` (e.g. ``leave=False``, ``unit="step"``).

    Returns:
        An object with tqdm's ``update(n)``, ``set_postfix(...)``, ``write(text)`` and
        ``close()``, usable as a context manager.
    """
    stream = sys.stderr if stream is None else stream
    enabled = enabled and not disable
    iterable = None
    total: int | None = steps if isinstance(steps, int) else None
    if steps is not None and not isinstance(steps, int):
        iterable = steps
        total = tqdm_kwargs.pop("total", None)
        if total is None:
            total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
    if progress_enabled(enabled, stream):

        return tqdm(iterable, total=total, desc=desc, file=stream, initial=initial, **tqdm_kwargs)
    quiet = not enabled or os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE
    return _PlainProgress(total, desc, None if quiet else every_percent, stream, iterable, initial)


def progress_setting(**metadata: Any) -> Any:
    """The ``progress`` field of a run configuration: on by default, a command-line flag
    (``metadata`` adds ``run``, ``extra``)."""
    return setting(
        True, check=Flag(), flag=True, **metadata,
        help="show progress (a bar on a terminal, a plain line every tenth of the run "
        "otherwise; TQDM_DISABLE=1 also turns it off)",
    )  # fmt: skip
