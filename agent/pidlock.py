"""Lock files that name their holder.

An exclusive, non-blocking ``flock`` on a small file that holds the holder's PID: the
kernel drops the lock when the holder exits (even on SIGKILL), and whoever is refused can
read the PID back and say who holds it (``/proc/PID/cmdline``). Used for a modem port
(transport/at.py PortLock), a simulated card's state file (sim/state.py) and a simulated
modem's ``--link`` (sim/modem.py).

Only the lock file's existence is shared between processes: the lock itself is the
flock, so a PID left in a file nobody locks means nothing.
"""
from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

from .pidfile import write_pid

#: Options of esim-agent that take a value, to find the sub-command in a command line.
_VALUE_OPTIONS = {"--config", "--device", "--sim", "--transport", "--aid", "--timeout", "--long-timeout",
                  "--baud", "--segment-size", "--http-timeout"}


@dataclass
class Holder:
    """The process named by a lock file."""
    pid: int
    argv: list[str] | None          # None: its command line cannot be read (gone, or hidden from us)

    @property
    def esim_agent(self) -> bool:
        return self.argv is not None and _agent_args(self.argv) is not None

    @property
    def command(self) -> str | None:
        """The esim-agent sub-command (``daemon``, ``sim modem`` …), or None."""
        args = _agent_args(self.argv or [])
        if args is None:
            return None
        words, skip = [], False
        for a in args:
            if skip:
                skip = False
                continue
            if a.startswith("-"):
                skip = "=" not in a and a in _VALUE_OPTIONS
                continue
            words.append(a)
            if len(words) == 2 or words[0] not in ("sim", "chip", "profile", "notification", "bench"):
                break
        return " ".join(words) or None

    @property
    def daemon(self) -> bool:
        return self.command == "daemon"

    def shown(self, limit: int = 80) -> str:
        """``PID 1234: esim-agent sim modem --state card.json`` (bounded), or ``PID 1234``."""
        if not self.argv:
            return f"PID {self.pid}"
        args = _agent_args(self.argv)
        words = ["esim-agent", *args] if args is not None else [os.path.basename(self.argv[0]), *self.argv[1:]]
        text = " ".join(words)
        if len(text) > limit:
            text = text[:limit - 1] + "…"
        return f"PID {self.pid}: {text}"


def _agent_args(argv: list[str]) -> list[str] | None:
    """The arguments after the program when ``argv`` runs esim-agent (the console script,
    ``python …/esim-agent``, ``python -m agent``), else None."""
    if not argv:
        return None
    if os.path.basename(argv[0]).startswith("esim-agent"):
        return argv[1:]
    if "python" in os.path.basename(argv[0]):
        rest = argv[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]                      # interpreter options (-u, -X dev …)
        if rest[:2] == ["-m", "agent"]:
            return rest[2:]
        if rest and os.path.basename(rest[0]).startswith("esim-agent"):
            return rest[1:]
    return None


def cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(8192)
    except OSError:
        return None
    parts = [p.decode("utf-8", "replace") for p in raw.split(b"\0")]
    while parts and parts[-1] == "":
        parts.pop()
    return parts or None


def read_holder(path: str) -> Holder | None:
    """The process a lock file names (first line: its PID), or None when it names none."""
    try:
        with open(path, "rb") as f:
            first = f.read(64).split(b"\n", 1)[0].strip()
    except OSError:
        return None
    if not first.isdigit() or len(first) > 9:
        return None
    pid = int(first)
    return Holder(pid, cmdline(pid))


class Busy(Exception):
    """The lock is held; ``holder`` is who (None when the file names nobody readable)."""

    def __init__(self, path: str, holder: Holder | None):
        super().__init__(path)
        self.path, self.holder = path, holder


class PidLock:
    """``PidLock(path).acquire()``: flock ``path`` (created 0644) and write our PID in it.
    Raises Busy when another open file holds it — another process, or this one through
    another open (flock locks belong to open files, so two users in one process exclude
    each other too). OSError when the file cannot be created."""

    def __init__(self, path: str, *, mode: int = 0o644):
        self.path = os.fspath(path)
        self.mode = mode
        self.fd: int | None = None

    def acquire(self) -> "PidLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Busy(self.path, read_holder(self.path)) from None
            raise
        self.fd = fd
        write_pid(fd)
        return self

    def release(self, *, remove: bool = False) -> None:
        """Drop the lock; ``remove`` also deletes the file (while still holding it)."""
        if self.fd is None:
            return
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None
