"""Progress as plain lines, for a log without a terminal (a batch job's), where a bar prints nothing readable until
the end: the work done, what it is, the time elapsed and an ETA, at a bounded rate. One home for `prepare`,
`generate`, evaluation and training (`lightning_modules.progress`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


def duration(seconds: float) -> str:
    """Seconds for a log line: "42s", "7m05s", "3h12m"; "?" for an unknown (infinite) time."""
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines:
    """`label done/total detail, 1m02s elapsed, ETA 23m58s` lines: one at the first update (a sign of life and
    pace), then one once `interval` seconds of `clock` or (if given) `fraction` of the work have passed since the
    last line, whichever comes first, and one at the end. `update(n)` counts like a tqdm bar's, so the two are
    interchangeable; `detail`: what follows the count when an update gives none; `first`: work done before this
    process started (a resumed run), left out of the pace. `total` None: no ETA. `clock` and `stream` (default
    stderr) are injectable for tests."""

    def __init__(self, total: int | None, label: str, detail: str = "", interval: float = 60.0,
                 fraction: float | None = None, first: int = 0, clock: Callable[[], float] = time.monotonic,
                 stream: TextIO | None = None):
        self.total, self.label, self.detail, self.interval, self.fraction = total, label, detail, interval, fraction
        self.clock, self.stream = clock, stream
        self.first = self.done = self.shown = first
        self.start, self.last = clock(), None

    def update(self, n: int = 1, detail: str | None = None) -> str | None:
        """`n` more done; the line printed if one is due, else None."""
        self.done += n
        now = self.clock()
        ended = self.total is not None and self.done >= self.total
        step = self.fraction is not None and self.total and self.done - self.shown >= self.fraction * self.total
        if self.last is not None and now - self.last < self.interval and not step and not ended:
            return None
        self.shown, self.last = self.done, now
        elapsed, pace = now - self.start, self.done - self.first
        line = f"{self.label} {self.done}" if self.total is None else f"{self.label} {self.done}/{self.total}"
        line += f"{self.detail if detail is None else detail}, {duration(elapsed)} elapsed"
        if self.total is not None:
            line += f", ETA {duration(elapsed / pace * (self.total - self.done) if pace > 0 else float('inf'))}"
        print(line, file=self.stream or sys.stderr, flush=True)
        return line

    def close(self) -> None:
        """Nothing to tear down (a tqdm bar's interface)."""


@contextmanager
def hf_loading_bars(shown: bool) -> Iterator[None]:
    """Hugging Face's weight-loading bars only where `shown` (a terminal): in a batch job's log each is a line of
    carriage returns."""
    from transformers.utils import logging

    hide = not shown and logging.is_progress_bar_enabled()
    if hide:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            logging.enable_progress_bar()
