"""Progress of the long stages (capture, solve, bits, sensitivity).

On a terminal: a tqdm bar that disappears when done. Elsewhere (logs, CI, a pipe): plain lines on stderr, one when
the stage starts, one when it ends, and at most one every ``INTERVAL_S`` seconds in between, so a log shows the
progress without carriage returns::

    onnxcomq: capture: 0/512 samples
    onnxcomq: capture: 256/512 samples (10 s)
    onnxcomq: capture: 512/512 samples in 18.3 s
"""

from __future__ import annotations

import sys
import time

# seconds between two progress lines of one stage when stderr is not a terminal
INTERVAL_S = 10.0


def enabled_for(quiet: bool) -> bool:
    """Whether to show progress: always, unless --quiet."""
    return not quiet


def _isatty(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _plural(unit: str, n) -> str:
    return unit if n == 1 or not unit or unit.endswith("s") else unit + "s"


class LineProgress:
    """tqdm's update/close (and ``with``) for a non-terminal: progress as whole lines on ``stream``."""

    def __init__(self, total: int | None, desc: str, unit: str, stream=None, interval: float = INTERVAL_S,
                 clock=time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self._clock = interval, clock
        self.start = self._last = clock()
        self.closed = False
        self.postfix = ""
        self._write(self._count())

    def _count(self) -> str:
        ref = self.total if self.total is not None else self.n
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        return f"{done} {_plural(self.unit, ref)}"

    def _write(self, text: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(f"onnxcomq: {self.desc}: {text}\n" if self.desc else f"onnxcomq: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop the run
            pass

    def update(self, n: int = 1) -> None:
        if self.closed:
            return
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            self._write(f"{self._count()} ({now - self.start:.0f} s)" + (f" {self.postfix}" if self.postfix else ""))

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """What is being worked on now (tqdm's name): shown on the next progress line."""
        self.postfix = text

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._write(f"{self._count()} in {self._clock() - self.start:.1f} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(enabled: bool, total: int | None = None, desc: str = "", unit: str = "it", *, tty: bool | None = None):
    """A progress object with update(n), close() and ``with`` support, or None when not ``enabled``. A tqdm bar
    (leave=False, dynamic_ncols=True) when stderr is a terminal (``tty`` overrides the check), else a LineProgress
    writing plain lines to stderr."""
    if not enabled:
        return None
    if tty is None:
        tty = _isatty(sys.stderr)
    if tty:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return LineProgress(total, desc, unit)


class NullBar:
    """The progress object of a run without progress: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def bars(enabled: bool):
    """A function ``(total, desc, unit) -> progress object`` (a NullBar where progress is off)."""
    def make(total: int | None = None, desc: str = "", unit: str = "it"):
        return bar(enabled, total=total, desc=desc, unit=unit) or NullBar()
    return make


__all__ = ["INTERVAL_S", "LineProgress", "NullBar", "bar", "bars", "enabled_for"]
