"""One counted log line per window for events a client can cause at will.

A refused bad frame, a poisoned send or a request that crashed a handler must not write a traceback each:
an attacker sending them at full rate would fill the disk and drown the lines that matter. A
:class:`ThrottledLog` writes the first event of a quiet period at once (with its traceback, if any),
then counts; the next event after ``window`` seconds writes one line with the count and the last detail:

    refused 3,412 bad sends in the last 10 s; last: OverflowError: int too big

The count is reported when the next event comes (there is no timer), so a burst that stops is reported
at the next event; :meth:`flush` writes what is pending (at shutdown, in tests).

A log without its own ``window`` uses :data:`ThrottledLog.default_window`, read at each event: the
process sets it once from ``logs.client_error_interval`` (im.observability.logs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledLog:
    """At most one line (and one traceback) per ``window`` seconds for one kind of event."""

    #: Seconds of the window of every log made without ``window`` (set once per process at start).
    default_window: float = 10.0

    __slots__ = ("_clock", "_count", "_last", "_level", "_logger", "_opened", "_what", "_window")

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        window: float | None = None,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what  # e.g. "bad sends": the line reads "refused 12 bad sends ..."
        self._window = window  # None: default_window
        self._level = level
        self._clock = clock
        self._opened: float | None = None  # when the current window started; None: quiet
        self._count = 0  # events in the current window not written yet
        self._last = ""

    def hit(self, detail: str, exc: BaseException | None = None) -> None:
        """Count one event; write it now if the window is quiet, else count it for the window's line."""
        now = self._clock()
        if self._opened is not None and now - self._opened < self.window:
            self._count += 1
            self._last = detail
            return
        self.flush()
        self._opened = now
        self._logger.log(
            self._level, "refused %s: %s", self._what, detail[:300], exc_info=exc if exc is not None else None
        )

    @property
    def window(self) -> float:
        return ThrottledLog.default_window if self._window is None else self._window

    def flush(self) -> None:
        """Write the count of the events not written yet (if any)."""
        if self._count:
            self._logger.log(
                self._level,
                "refused %s %s in the last %g s; last: %s",
                f"{self._count:,}",
                self._what,
                self.window,
                self._last[:300],
            )
        self._count = 0
        self._last = ""
        self._opened = None
