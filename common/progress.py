"""Progress bars for every wait longer than a few seconds: a count, a rate and an ETA, on stderr.

One wrapper around tqdm so every loop in the lab looks the same. In a terminal the bar redraws in place
(a loop inside another gets its own line below, gone when it ends). When stderr is not a terminal (pytest,
CI, a log file) a bar prints at most a few lines, and a loop inside another loop's bar prints nothing (004's
batches inside its pairs would fill a log with a few hundred lines), so logs stay readable.
"""
from __future__ import annotations

import sys
import weakref
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LOG_LINES = 4  # at most this many updates per loop when stderr is not a terminal
# The bars printing to a log (not a terminal): a bar opened while one of them is open stays silent. Weak
# references, so a bar left unfinished (an exception, a break) and dropped does not silence the ones after it.
_open_in_log: weakref.WeakSet = weakref.WeakSet()


def _is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Iterate over `items` with a progress bar labelled `description` (count, rate, ETA)."""
    return bar(description, total=total if total is not None else _length(items), unit=unit, iterable=items)


def bar(description: str, total: int | None, unit: str = "it", iterable=None) -> tqdm:
    """A tqdm bar to update by hand (`.update(n)`), for work that is not one loop; use it as a context manager."""
    if _is_terminal():
        return tqdm(iterable, desc=description, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                    leave=False)
    # Not a terminal: plain ASCII, and a refresh only every 1/LOG_LINES of the way (not every step); nothing at
    # all inside another bar. tqdm marks a closed bar `disable`.
    inside_another = any(not b.disable for b in _open_in_log)
    every = -(-total // LOG_LINES) if total else 1
    progress_bar = tqdm(iterable, desc=description, total=total, unit=unit, file=sys.stderr, ncols=80,
                        miniters=every, mininterval=30.0 if not total else 0.0, maxinterval=float("inf"), ascii=True,
                        disable=inside_another)
    if not progress_bar.disable:
        _open_in_log.add(progress_bar)
    return progress_bar


def _length(items) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None
