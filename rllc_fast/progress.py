"""Progress reports and log lines on stderr, readable on a terminal and in a log file.

On a terminal a ``Progress`` is a tqdm bar (bars opened inside another bar, such as an estimate's SGLD bar
inside a sweep's, are erased when they close). When stderr is not a terminal (Slurm, nohup, a pipe) no
carriage-return redraws are written: a ``Progress`` prints plain lines ("what: done/total unit (pct),
elapsed, ETA") at most once per ``every`` seconds (default ``LINE_INTERVAL``, one minute; ``every=0``:
one line per update, as a sweep does per unit), plus a closing line when it has printed any.

``logger(quiet)`` is the one log function of the command line; ``quiet_libraries`` silences transformers'
and huggingface_hub's progress bars (and, when asked, their warnings) for a scope and restores them after.
"""
from __future__ import annotations

import contextlib
import sys
import time
import weakref
from typing import Callable, Iterable, Iterator, Optional, TextIO

#: Seconds between two plain progress lines of one task when stderr is not a terminal.
LINE_INTERVAL = 60.0

_open_bars: "weakref.WeakSet[Progress]" = weakref.WeakSet()  # this module's tqdm bars still on screen


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is an interactive terminal (where bars may redraw)."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def format_seconds(seconds: float) -> str:
    """``seconds`` as ``45s``, ``3m05s`` or ``2h07m`` (``?`` when unknown or infinite)."""
    if seconds is None or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of ``total`` units of work (default: SGLD steps) on stderr when ``enabled``, else silent.

    A tqdm bar on a terminal; plain lines elsewhere (see the module doc). ``every``: seconds between plain
    lines (None: ``LINE_INTERVAL``; 0: a line on every update). ``stream`` and ``clock`` (seconds,
    monotonic) are for tests.
    """

    def __init__(self, total: int, enabled: bool, desc: str = "SGLD steps", unit: str = "step",
                 every: Optional[float] = None, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = int(total), desc, unit
        self._enabled = bool(enabled)
        self._stream = sys.stderr if stream is None else stream
        self._every = LINE_INTERVAL if every is None else float(every)
        self._clock = clock
        self._bar = None
        self.n = 0
        self._label = ""
        self._postfix = ""
        self._start = self._last_line = clock()
        self._lines = 0
        self._printed_n = 0
        if self._enabled and is_terminal(self._stream):
            from tqdm.auto import tqdm

            nested = any(b._bar is not None for b in _open_bars)
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self._stream, dynamic_ncols=True,
                             leave=not nested)
            _open_bars.add(self)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def update(self, n: int = 1) -> None:
        self.update_to(self.n + n)

    def update_to(self, n: int) -> None:
        """Show ``n`` done (never moves backwards)."""
        if not self._enabled or n <= self.n:
            return
        if self._bar is not None:
            self._bar.update(n - self.n)
        self.n = n
        if self._bar is None and self._clock() - self._last_line >= self._every:
            self._line()

    def set_description(self, text: str) -> None:
        """What is being worked on now (the bar's title; in plain lines, shown after the counts)."""
        self._label = text
        if self._bar is not None:
            self._bar.set_description(text)

    def set_postfix(self, **values) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Close the bar; in plain mode print a closing line when a line was printed and work was done since."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            _open_bars.discard(self)
        elif self._enabled and self._lines and self.n > self._printed_n:
            self._line()
        self._enabled = False

    def _line(self) -> None:
        now = self._clock()
        elapsed = now - self._start
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else ""
        eta = (self.total - self.n) * elapsed / self.n if self.n and self.total >= self.n else float("nan")
        extra = [x for x in (self._label if self._label != self.desc else "", self._postfix) if x]
        text = (f"{self.desc}: {self.n}/{self.total} {self.unit}s{pct}, {format_seconds(elapsed)} elapsed, "
                f"ETA {format_seconds(eta)}" + (f" [{'; '.join(extra)}]" if extra else ""))
        print(text, file=self._stream, flush=True)
        self._last_line, self._lines, self._printed_n = now, self._lines + 1, self.n


def progress_iter(items: Iterable, desc: str, enabled: bool, unit: str = "item",
                  every: Optional[float] = None) -> Iterator:
    """Yield ``items`` while reporting them as a ``Progress`` (one update per item)."""
    items = list(items)
    bar = Progress(len(items), enabled, desc=desc, unit=unit, every=every)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def log(message: str, stream: Optional[TextIO] = None) -> None:
    """Print one log line on stderr (above any open bar on a terminal, instead of through it)."""
    stream = sys.stderr if stream is None else stream
    if any(b._bar is not None for b in _open_bars):
        from tqdm.auto import tqdm

        tqdm.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)


def logger(quiet: bool = False) -> Callable[[str], None]:
    """The log function of a command: ``log`` on stderr, or one that prints nothing when ``quiet``."""
    return (lambda message: None) if quiet else log


def close_bars() -> None:
    """Close every bar still on screen (after an interruption), so a final message starts on a fresh line."""
    for bar in list(_open_bars):
        bar.close()


@contextlib.contextmanager
def quiet_libraries(bars: bool = True, warnings: bool = False) -> Iterator[None]:
    """For the scope: turn off transformers' and huggingface_hub's progress bars (``bars``) and their
    warnings and info logs (``warnings``: verbosity ERROR); restore each setting after. A no-op for a
    library that is not installed."""
    restore = []
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    hub_was_off = are_progress_bars_disabled()
    try:
        if bars:  # undone last: transformers' enable_progress_bar turns huggingface_hub's on as well
            restore.append(lambda: (disable_progress_bars if hub_was_off else enable_progress_bars)())
            if not hub_was_off:
                disable_progress_bars()
            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                restore.append(hf_logging.enable_progress_bar)
        if warnings:
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            restore.append(lambda: hf_logging.set_verbosity(level))
        yield
    finally:
        for undo in reversed(restore):
            undo()
