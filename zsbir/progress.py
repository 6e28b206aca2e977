"""One small progress API for every phase that can take more than a couple of seconds.

Library code (data indexing, model building, training, embedding, hashing, evaluation)
reports progress the same way, whatever is watching::

    from zsbir.progress import phase

    with phase("embedding gallery", total=len(split), unit="images") as advance:
        for batch in batches:
            ...
            advance(len(batch))

What is shown depends on the :func:`display` the command line sets up:

- on a terminal: a rich progress bar per open phase (description, bar, count, elapsed,
  time left), removed when the phase ends;
- otherwise (a pipe, a log file, CI, tests): plain lines through :mod:`logging`, at most one
  every ``interval`` seconds per phase (``ZSBIR_PROGRESS_INTERVAL``, default 10 s) and at
  most one per tenth of the phase's running time, so a long phase is never silent, an
  hour-long one prints a few dozen lines, and a short one prints only its closing line.

Every phase also logs its start and its end (``"<name>: done, 500 images in 3.2 s"``) to the
``zsbir`` logger, so a run's ``log.txt`` records how long each phase took. Without a
display (library use), only those log records are emitted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Advance", "ConsoleLogHandler", "console_output", "display", "format_seconds",
           "live_console", "phase"]

log = logging.getLogger("zsbir.progress")

#: ``advance(n=1, info=None, completed=None)``: n more items done (or ``completed`` in all);
#: ``info`` replaces the text shown beside the bar (e.g. the current loss)
Advance = Callable[..., None]


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``"1 min 15 s"``; ``8.04`` -> ``"8.0 s"``; ``3725`` -> ``"1 h 02 min"``."""
    if seconds != seconds or seconds < 0:  # NaN or negative: unknown
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class _Display:
    """What :func:`phase` reports to: a rich Progress (live) or periodic log lines."""

    def __init__(self, console: Any = None, live: bool = False, interval: float | None = None):
        self.console = console
        self.live = live and console is not None
        self.interval = interval if interval is not None else float(
            os.environ.get("ZSBIR_PROGRESS_INTERVAL", "10"))
        self.progress: Any = None
        self.open = 0

    def start_bar(self) -> Any:
        if self.progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                TextColumn("elapsed,"), TimeRemainingColumn(), TextColumn("left"),
                console=self.console, transient=True)
            self.progress.start()
        self.open += 1
        return self.progress

    def stop_bar(self) -> None:
        self.open -= 1
        if self.open <= 0 and self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.open = 0


_DISPLAY = _Display()
_depth = 0
#: a nested phase shorter than this logs its end at DEBUG only
NESTED_QUIET_S = 1.0


@contextlib.contextmanager
def display(console: Any = None, live: bool = False,
            interval: float | None = None) -> Iterator[None]:
    """Route :func:`phase` to ``console``: rich bars when ``live`` (a terminal), else
    periodic plain log lines every ``interval`` seconds. Restores the previous display."""
    global _DISPLAY
    previous, _DISPLAY = _DISPLAY, _Display(console, live, interval)
    try:
        yield
    finally:
        if _DISPLAY.progress is not None:
            _DISPLAY.progress.stop()
        _DISPLAY = previous


def live_console() -> Any:
    """The console of the active live display (print through it so lines appear above
    the bars), or None."""
    return _DISPLAY.console if _DISPLAY.live else None


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "items") -> Iterator[Advance]:
    """A named phase of work with an optional ``total``; yields
    ``advance(n=1, info=None, completed=None)`` (``completed`` sets the absolute count).

    Logs ``"<name> ..."`` at the start and ``"<name>: done[, N unit] in T"`` at the end
    (``"<name>: failed after T"`` if it raised); in between, a bar or periodic lines with
    the count, the rate and the time left (when ``total`` is known).
    """
    global _depth
    disp = _DISPLAY
    t0 = time.perf_counter()
    done = base = 0
    last_line = t0
    # a phase inside another one says when it starts only in debug logs, and that it ended
    # only when it took a while: short nested phases stay quiet
    nested = _depth > 0
    log.log(logging.DEBUG if nested else logging.INFO, "%s ...", name)
    _depth += 1
    bar = task = None
    if disp.live:
        bar = disp.start_bar()
        task = bar.add_task(name, total=total, info="")

    def advance(n: int = 1, info: str | None = None, completed: int | None = None) -> None:
        nonlocal done, last_line, base
        if completed is not None:  # an absolute position (e.g. a resumed run's first step)
            if done == 0 and base == 0:
                base = completed
            done = completed
        else:
            done += n
        if bar is not None:
            fields = {} if info is None else {"info": info}
            bar.update(task, completed=done, **fields)
            return
        now = time.perf_counter()
        # every `interval` s at first, then at most every tenth of the time so far: a long
        # phase prints a few lines per order of magnitude of its duration
        if now - last_line >= max(disp.interval, 0.1 * (now - t0)):
            last_line = now
            log.info("%s: %s", name, _status(done - base, done, total, unit, now - t0, info))

    try:
        yield advance
    except BaseException:
        # log.txt only: the console shows the error itself
        log.info("%s: failed after %s", name, format_seconds(time.perf_counter() - t0),
                 extra={"console": False})
        raise
    finally:
        _depth -= 1
        if bar is not None:
            bar.remove_task(task)
            disp.stop_bar()
    elapsed = time.perf_counter() - t0
    count = f", {done} {unit}" if done else ""
    level = logging.DEBUG if nested and elapsed < NESTED_QUIET_S else logging.INFO
    log.log(level, "%s: done%s in %s", name, count, format_seconds(elapsed))


@contextlib.contextmanager
def console_output(console: Any, quiet: bool = False) -> Iterator[None]:
    """What a command line shows while it works: :func:`display` on ``console`` (bars on a
    terminal, periodic lines otherwise) and the ``zsbir`` log records as plain lines
    (only warnings and errors when ``quiet``)."""
    logger = logging.getLogger("zsbir")
    handler = ConsoleLogHandler(console, logging.WARNING if quiet else logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        with display(console, live=bool(console.is_terminal) and not quiet):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _status(new: int, done: int, total: int | None, unit: str, elapsed: float,
            info: str | None) -> str:
    rate = new / elapsed if elapsed > 0 else 0.0
    text = f"{done}/{total} {unit}" if total else f"{done} {unit}"
    if total:
        text += f" ({100 * done / total:.0f}%)"
    text += f", {format_seconds(elapsed)} elapsed"
    if total and rate > 0:
        text += f", {format_seconds((total - done) / rate)} left"
    if info:
        text += f"; {info}"
    return text


class ConsoleLogHandler(logging.Handler):
    """Shows ``zsbir`` log records on a rich console as plain lines (warnings in yellow,
    errors in red); through the live display's console, so lines appear above the bars.
    Records logged with ``extra={"console": False}`` are for log files only."""

    def __init__(self, console: Any, level: int = logging.INFO):
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "console", True) is False:  # log.txt only
            return
        try:
            msg = record.getMessage()
            if record.levelno >= logging.ERROR:
                style = "red"
            elif record.levelno >= logging.WARNING:
                style = "yellow"
                msg = f"warning: {msg}"
            else:
                style = None
            # soft_wrap: one record, one line, also in pipes and log captures
            self.console.print(msg, style=style, highlight=False, markup=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
