"""Cancellation by token, not by exceptions thrown from signal handlers.

A ``CancelToken`` is handed to every operation. Whoever wants it stopped —
a SIGINT/SIGTERM handler in the CLI, the daemon on SIGTERM, a socket client
asking to cancel its job, a deadline — calls ``cancel(reason)``; the
operation calls ``check()`` between steps (and the AT port between reads), so
it stops at a point where it can clean up: close the logical channel, cancel
an RSP session on both sides with the right reason (SGP.22 §3.1.3), leave the
journal consistent. A signal handler therefore only sets a flag.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from .errors import AgentError

#: reason → (error code, exit code, message). Exit codes follow the shell's 128+signal
#: convention for the two signals, so `systemctl stop` and Ctrl-C read as usual.
REASONS = {
    "interrupted": ("interrupted", 130, "interrupted"),
    "terminated": ("terminated", 143, "terminated by a signal"),
    "cancelled": ("cancelled", 1, "cancelled on request"),
    "deadline": ("deadline_exceeded", 3, "the operation's deadline passed"),
}


class Cancelled(AgentError):
    """The operation was stopped through its CancelToken."""

    code = "cancelled"

    def __init__(self, reason: str = "cancelled", detail: str = ""):
        code, exit_code, msg = REASONS.get(reason, REASONS["cancelled"])
        super().__init__(msg + (f"; {detail}" if detail else ""), code=code)
        self.reason = reason
        self.exit_code = exit_code


class CancelToken:
    """Thread-safe, one-way: once cancelled it stays cancelled."""

    def __init__(self, *, deadline: float | None = None):
        self._event = threading.Event()
        self.reason: str | None = None
        self.deadline = deadline        # time.monotonic() value, or None
        self._holds = 0                 # > 0: inside held(), a request waits until the step is over

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        if self._holds:
            return False
        if self._event.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.cancel("deadline")
            return True
        return False

    @contextmanager
    def held(self):
        """A step that must not be cut: a cancel request made meanwhile takes effect after it.
        For commit points, where stopping half-way would lose the only record of what the
        other side did (the last LoadBoundProfilePackage segment: the eUICC installs on it,
        and its ProfileInstallationResult is the answer we would drop)."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    def requested(self) -> bool:
        """Whether a cancel was asked for, also inside held()."""
        return self._event.is_set()

    def check(self, detail: str = "") -> None:
        """Raise Cancelled if the token was cancelled (or its deadline passed)."""
        if self.cancelled:
            raise Cancelled(self.reason or "cancelled", detail)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early (and raising Cancelled) when cancelled."""
        end = time.monotonic() + max(0.0, seconds)
        if self.deadline is not None:
            end = min(end, self.deadline)
        self._event.wait(max(0.0, end - time.monotonic()))
        self.check()

