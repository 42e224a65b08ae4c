"""Progress bars that ``--quiet`` turns off; experiments never import tqdm themselves.

On a terminal a bar is tqdm's, redrawn in place. Anywhere else -- a CI log, ``| tee``, a file --
in-place redraws are carriage returns that pile up into one line thousands of characters long,
so there a bar prints plain lines instead: one at the start, one whenever another tenth of the
work is done or 30 s have passed since the last line, and the final state (``done`` or
``stopped``) when it closes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _LogBar:
    """A bar for a stream that is not a terminal: whole lines, now and then.

    The same interface as the tqdm bars the experiments use (``update``, ``set_postfix_str``,
    ``close``, a context manager). Lines look like
    ``moons: 12/40 run (30%) 1m12s, ~2m48s left [seed=3]``.
    """

    EVERY_FRACTION = 10  # a line per tenth of the total
    EVERY_SECONDS = 30.0  # ... or when this long has passed since the last line

    def __init__(
        self, total: int, desc: str, unit: str, stream: TextIO, clock: Callable[[], float]
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream, self.clock = stream, clock
        self.n = 0
        self.postfix = ""
        self.start = clock()
        self._last_n, self._last_time = 0, self.start
        self._finished = False
        self._print()

    def _tenths(self, n: int) -> int:
        return n * self.EVERY_FRACTION // self.total if self.total > 0 else 0

    def _print(self, status: str = "") -> None:
        now = self.clock()
        elapsed = now - self.start
        if self.total > 0:
            text = f"{self.desc}: {self.n}/{self.total} {self.unit} "
            text += f"({100 * self.n // self.total}%) {_duration(elapsed)}"
            if 0 < self.n < self.total and not status:
                text += f", ~{_duration(elapsed / self.n * (self.total - self.n))} left"
        else:
            text = f"{self.desc}: {self.n} {self.unit} {_duration(elapsed)}"
        if self.postfix:
            text += f" [{self.postfix}]"
        if status:
            text += f" {status}"
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_n, self._last_time = self.n, now

    def update(self, n: int = 1) -> None:
        if self._finished:
            return
        self.n += n
        if self.total > 0 and self.n >= self.total:
            self._finished = True
            self._print("done")
        elif self._tenths(self.n) > self._tenths(self._last_n) or (
            self.n != self._last_n and self.clock() - self._last_time >= self.EVERY_SECONDS
        ):
            self._print()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s  # shown with the next line; a postfix alone is no reason to print

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._print("done" if self.n >= self.total else "stopped")

    def __enter__(self) -> _LogBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Progress:
    """Makes progress bars, or silent stand-ins when disabled (``--quiet``).

    Args:
        enabled: ``False`` makes every bar silent.
        stream: where bars write; ``None`` means ``sys.stderr`` as it is when a bar is made.
        live: ``True`` for tqdm's in-place bar, ``False`` for plain lines, ``None`` (default)
            for tqdm exactly when ``stream`` is a terminal.
        clock: seconds, for the log lines' timing (a test passes a fake one).
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.stream = stream
        self.live = live
        self.clock = clock

    def bar(self, total: int, desc: str, unit: str = "step") -> Any:
        if not self.enabled:
            return _NullBar()
        stream = self.stream if self.stream is not None else sys.stderr
        live = self.live
        if live is None:
            try:
                live = bool(stream.isatty())
            except (AttributeError, ValueError):  # no isatty, or a closed stream
                live = False
        if not live:
            return _LogBar(total, desc, unit, stream, self.clock)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=False)


SILENT = Progress(enabled=False)
