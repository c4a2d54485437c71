"""Session start on an AT port (AtPort.start): the fast path when the line is clean, the full
resynchronisation (AT until OK, then the quiet wait) as soon as anything looks wrong."""
from __future__ import annotations

import os
import threading
import time

import pytest

from agent.transport import at as at_mod
from agent.transport.at import AtPort


class Script:
    """A scripted modem on the master side of a pty. Echo on (as after power-on) unless told,
    CMEE 0; answers AT, ATE0/1, AT+CMEE?/=n, AT+CGMI. ``before_first`` is written just before
    the answer to the first command (a straggler of someone else's command)."""

    def __init__(self, *, echo: bool = True, cmee: int = 0, before_first: bytes = b"", stale: bytes = b""):
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.echo, self.cmee = echo, cmee
        self.before_first = before_first
        self.commands: list[str] = []
        if stale:
            os.write(self.master, stale)        # waiting on the line before anyone opens it
            # The pty hands written bytes to the other side from a kernel work queue: wait until
            # they are there, or a loaded machine opens the port before they "were waiting".
            import fcntl
            import select
            import termios
            end = time.monotonic() + 5
            while time.monotonic() < end:
                select.select([self.slave], [], [], 0.05)
                if int.from_bytes(fcntl.ioctl(self.slave, termios.FIONREAD, b"\0\0\0\0"), "little") >= len(stale):
                    break
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _answer(self, cmd: str) -> list[str]:
        up = cmd.upper()
        if up == "AT":
            return ["OK"]
        if up in ("ATE0", "ATE1"):
            self.echo = up == "ATE1"
            return ["OK"]
        if up == "AT+CMEE?":
            return [f"+CMEE: {self.cmee}", "OK"]
        if up.startswith("AT+CMEE="):
            self.cmee = int(up[8:])
            return ["OK"]
        if up == "AT+CGMI":
            return ["SCRIPTED", "OK"]
        return ["ERROR"]

    def _run(self) -> None:
        buf = b""
        while not self._stop:
            try:
                data = os.read(self.master, 256)
            except OSError:
                return
            buf += data
            while b"\r" in buf:
                line, buf = buf.split(b"\r", 1)
                cmd = line.decode().strip()
                if not cmd:
                    continue
                out = b""
                if self.echo:
                    out += line + b"\r"
                if not self.commands and self.before_first:
                    out += self.before_first
                self.commands.append(cmd)
                for a in self._answer(cmd):
                    out += b"\r\n" + a.encode() + b"\r\n"
                os.write(self.master, out)

    def close(self) -> None:
        self._stop = True
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def script(tmp_path):
    made = []

    def make(**kw):
        s = Script(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _open(s: Script, tmp_path) -> AtPort:
    return AtPort(s.path, timeout=2.0, lock_dir=str(tmp_path))


def test_clean_line_starts_without_a_quiet_wait(script, tmp_path, monkeypatch):
    quiet = []
    monkeypatch.setattr(AtPort, "_quiet", lambda self, **kw: quiet.append(kw))
    s = script()
    with _open(s, tmp_path) as p:
        t0 = time.monotonic()
        p.start()
        took = time.monotonic() - t0
        assert quiet == [] and took < at_mod.RESYNC_QUIET
        assert s.commands == ["AT+CMEE?", "ATE0", "AT+CMEE=1"]
        assert p._echo_before is True and p._cmee_before == "0"
        assert p.query("AT+CGMI", "+CGMI:") == "SCRIPTED"
    assert s.echo is True and s.cmee == 0                       # left as found


def test_nothing_to_switch_when_echo_is_off_and_cmee_on(script, tmp_path):
    s = script(echo=False, cmee=1)
    with _open(s, tmp_path) as p:
        p.start()
        assert s.commands == ["AT+CMEE?"]
        assert p._echo_before is False
    assert s.commands == ["AT+CMEE?"] and s.echo is False and s.cmee == 1


@pytest.mark.parametrize("kw", [
    {"before_first": b"\r\nOK\r\n"},                            # a late final of another program's command
    {"before_first": b"\r\n+CSIM: 4,\"9000\"\r\nOK\r\n"},       # a late answer with its final
    {"before_first": b"\xff\x00garbage\r\n"},                   # garbage after a modem reboot
    {"stale": b"\r\nOK\r\n"},                                   # waiting before we opened the port
])
def test_trouble_at_start_takes_the_full_resync(script, tmp_path, monkeypatch, kw):
    quiet = []
    real_quiet = AtPort._quiet

    def spy(self, **k):
        quiet.append(k)
        return real_quiet(self, **k)

    monkeypatch.setattr(AtPort, "_quiet", spy)
    s = script(**kw)
    with _open(s, tmp_path) as p:
        p.start()
        assert quiet and quiet[0].get("window") == at_mod.RESYNC_QUIET
        assert p._cmee_before == "0" and p._echo_before is True
        # in step: each command gets its own answer
        assert p.query("AT+CGMI", "+CGMI:") == "SCRIPTED"
        assert p.query("AT+CMEE?", "+CMEE:") == "1"
    assert s.echo is True and s.cmee == 0


def test_idle_work_runs_while_the_modem_is_awaited_and_changes_no_answer(script, tmp_path):
    """AtPort.when_idle (agent/preload.py): the work runs instead of blocking reads, one piece
    at a time, until it says it is done; a piece that raises ends it; answers are unchanged."""
    done = []

    def work():
        done.append(len(done))
        return len(done) < 3

    s = script()
    with _open(s, tmp_path) as p:
        p.start()
        # A read with no command outstanding is all waiting (an answer already waiting would be
        # read first, so a wait during a command may or may not leave room for the work).
        p.when_idle(work)
        p._read_some()
        assert done == [0, 1, 2]                     # all three ran, and nothing after "done"
        assert p._idle is None
        assert p.query("AT+CGMI", "+CGMI:") == "SCRIPTED"

        def broken():
            raise RuntimeError("a bad import step")
        p.when_idle(broken)
        p._read_some()
        assert p._idle is None
        assert p.query("AT+CGMI", "+CGMI:") == "SCRIPTED"
    assert s.echo is True and s.cmee == 0             # left as found
