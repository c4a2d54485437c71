"""The AT line protocol over a serial port (docs/modem.md §2.1, §6).

``AtPort`` sends one command at a time and collects its answer:

* lines end in CR, LF or both; empty lines are ignored; bytes that are not
  printable ASCII (NUL, 0xFF, broken UTF-8 after a modem reboot) are dropped,
  so garbage before a response never crashes the parser;
* echo is switched off (ATE0) but still tolerated: a line equal to the command
  just sent is dropped;
* final result codes: ``OK``, ``ERROR``, ``+CME ERROR: <n|text>``,
  ``+CMS ERROR: ...`` (the errors become ``ModemError`` subclasses);
* response lines are matched by their expected prefix (``+CSIM:``); an
  unprefixed line is only kept as a candidate answer when the caller allows it
  (strictly hex/digits for APDU answers, plain text for identity reads);
  anything else is an unsolicited result code, kept in a bounded list;
* every command has a deadline; the port is read in short slices so nothing
  blocks forever. After a time-out the port is re-synchronised (input drained,
  ``AT`` until ``OK``) before ``TimeoutError_`` is raised;
* a port that goes away (USB modem reset or re-enumerated, unplugged: EIO on
  write, end of file or EIO on read) raises ``PortLostError``; reopen the
  device path to go on.

``start()`` switches echo off and numeric CME errors on; ``close()`` puts both
back as they were (see ``start``), so the next program on the port finds the
modem as we found it.

Opening takes the port exclusively (pyserial ``exclusive=True``) and a lock
file keyed by the device's real path (docs/modem.md §2.4).

This module only imports the standard library at load time (pyserial is
imported when a port is opened) so in-process transports can share ``Stats``
without slowing the CLI's start.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import os
import re
import time
from dataclasses import asdict, dataclass

from ..errors import AgentError, PortBusyError, ProtocolError, TimeoutError_, TransportError
from .stats import Stats, Trace  # noqa: F401 - Stats re-exported for callers of at.py
from ..logs import get_logger

log = get_logger(__name__)


#: Longest line we keep. The longest legitimate line is a +CGLA answer for a
#: 256-byte response: ~530 characters. Anything far longer is garbage.
MAX_LINE = 8192
#: How many unsolicited lines we remember.
URC_KEEP = 64
#: Read slice: the deadline is checked at least this often.
READ_SLICE = 0.05
#: Resynchronisation after a time-out: AT attempts and the deadline of each.
RESYNC_TRIES = 3
RESYNC_DEADLINE = 1.0
#: After a resync OK, wait this long for stragglers (a late answer to the
#: command that timed out) and throw them away.
QUIET = 0.1
RESYNC_QUIET = 0.3

_ERROR_FINALS = {"ERROR", "NO CARRIER", "COMMAND NOT SUPPORT", "TOO MANY PARAMETERS", "ABORTED"}
_CME = re.compile(r"^\+CME ERROR:\s*(.*)$", re.I)
_CMS = re.compile(r"^\+CMS ERROR:\s*(.*)$", re.I)
# Well-known unsolicited lines without a '+' (Quectel/SIMCom boot messages).
_URC_WORDS = {"RDY", "SMS DONE", "PB DONE", "CALL READY", "SMS READY", "POWERED DOWN",
              "NORMAL POWER DOWN", "READY", "RING", "START"}
_ALNUM = re.compile(r"[0-9A-Za-z]")
_HEX_LINE = re.compile(r"^[0-9A-Fa-f]+$")
_LEN_HEX = re.compile(r'^([0-9]+)\s*,\s*("?)([0-9A-Fa-f]*)("?)$')
# A numeric field we turn into an int: ASCII digits, short enough to be a real value
# (int() of "²" fails although "²".isdigit(), and of 4301 digits too).
_SMALL_NUMBER = re.compile(r"\A[0-9]{1,9}\Z")
# bytes.translate(None, _JUNK) drops everything that is not printable ASCII (or TAB).
_JUNK = bytes(b for b in range(256) if not (0x20 <= b <= 0x7E or b == 0x09))
_SPLIT = re.compile(rb"[\r\n]")
_CMEE_VALUE = re.compile(r"^\+CMEE:\s*([0-9])$", re.I)

# TS 27.007 §9.2 codes seen with SIM access (docs/modem.md §1.4).
CME_TEXT = {
    3: "operation not allowed", 4: "operation not supported", 10: "SIM not inserted",
    11: "SIM PIN required", 12: "SIM PUK required", 13: "SIM failure", 14: "SIM busy",
    15: "SIM wrong", 21: "invalid index", 100: "unknown error",
}


# --------------------------------------------------------------------------- errors

class ModemError(TransportError):
    """The modem answered a command with ERROR (or another error final)."""

    code = "modem_error"

    def __init__(self, message: str, *, command: str = "", result: str = "", code: str | None = None):
        super().__init__(message, code=code, details={"command": command, "result": result})
        self.command = command
        self.result = result


class ModemCmeError(ModemError):
    """``+CME ERROR: <n|text>``; ``.cme`` is the number (int) or the text."""

    code = "modem_cme_error"

    def __init__(self, message: str, *, cme: int | str, command: str = "", result: str = ""):
        super().__init__(message, command=command, result=result)
        self.cme = cme
        self.details["cme"] = cme


class PortLostError(TransportError):
    """The port went away under us (EIO / hang-up: modem reset, re-enumerated or unplugged).
    The device path may come back (a new tty): close this AtPort and open the path again."""

    code = "port_lost"


class ModemCmsError(ModemError):
    code = "modem_cms_error"

    def __init__(self, message: str, *, cms: int | str, command: str = "", result: str = ""):
        super().__init__(message, command=command, result=result)
        self.cms = cms
        self.details["cms"] = cms


def command_name(cmd: str) -> str:
    """``AT+CGLA=1,10,"..."`` → ``AT+CGLA`` (for messages; never the whole APDU)."""
    m = re.match(r"^(AT[+^#%$]?[A-Za-z0-9]*)", cmd, re.I)
    name = m.group(1) if m else cmd[:16]
    return name + ("=?" if cmd.endswith("=?") else "?" if cmd.endswith("?") else "")


def _clip(text: str, n: int = 60) -> str:
    """A modem's text for a message: bounded (the whole line stays in details["result"])."""
    return text if len(text) <= n else text[:n] + "…"


def error_from_final(cmd: str, final: str) -> ModemError:
    what = command_name(cmd)
    m = _CME.match(final)
    if m:
        raw = m.group(1).strip().strip('"')
        cme: int | str = int(raw) if _SMALL_NUMBER.match(raw) else raw
        text = f" ({CME_TEXT[cme]})" if isinstance(cme, int) and cme in CME_TEXT else ""
        return ModemCmeError(f"modem answered {what} with +CME ERROR: {_clip(raw)}{text}", cme=cme, command=what,
                             result=final)
    m = _CMS.match(final)
    if m:
        raw = m.group(1).strip().strip('"')
        return ModemCmsError(f"modem answered {what} with +CMS ERROR: {_clip(raw)}",
                             cms=int(raw) if _SMALL_NUMBER.match(raw) else raw, command=what, result=final)
    return ModemError(f"modem answered {what} with {final}", command=what, result=final)


# --------------------------------------------------------------------------- line parsing (no I/O)

def clean_line(raw: bytes) -> str:
    """Printable ASCII only, stripped."""
    return raw.translate(None, _JUNK).decode("ascii").strip()


class LineSplitter:
    """Bytes in, clean lines out. The partial line is bounded by MAX_LINE."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._buf = b""
        self.dropped = 0     # overlong lines thrown away

    def feed(self, data: bytes) -> list[str]:
        buf = self._buf + data
        parts = _SPLIT.split(buf)
        self._buf = parts.pop()
        if len(self._buf) > self.max_line:
            self._buf = b""
            self.dropped += 1
        out = []
        for p in parts:
            if not p:
                continue
            if len(p) > self.max_line:
                self.dropped += 1
                continue
            s = clean_line(p)
            if s:
                out.append(s)
        return out

    def clear(self) -> None:
        self._buf = b""


def is_urc_like(line: str) -> bool:
    return line[:1] in "+^#%$" or line.upper() in _URC_WORDS


def is_bare_hex(line: str) -> bool:
    """A bare APDU-ish answer: all hex/digits, or ``<len>,"<hex>"`` without the prefix."""
    return bool(_HEX_LINE.match(line) or _LEN_HEX.match(line))


@dataclass
class Reply:
    """What one command produced."""

    command: str
    lines: list            # payloads of the lines with the expected prefix (prefix removed)
    bare: list             # unprefixed candidate lines (see ``bare=``)
    urcs: list             # everything else
    final: str = ""
    echoed: bool = False   # the modem echoed the command line (its echo was on when it read it)

    @property
    def ok(self) -> bool:
        return self.final == "OK"


class Collector:
    """Sorts the lines that follow a command (docs/modem.md §6 item 4).

    ``prefix`` is the expected response prefix (``+CSIM:``) or None;
    ``bare`` is None (no unprefixed answer expected), ``"hex"`` (accept an
    unprefixed line only when it is all hex/digits, FM350 style) or
    ``"text"`` (identity reads: any line that does not look like a URC).
    """

    def __init__(self, command: str, prefix: str | None = None, bare: str | None = None):
        self.command = command
        self._echo = command.strip().upper()
        self.prefix = prefix.upper() if prefix else None
        self.bare = bare
        self.reply = Reply(command, [], [], [])
        self.echoes = 0

    def add(self, line: str) -> bool:
        """Feed one clean line; True when it was the final result code."""
        up = line.upper()
        if up == self._echo:
            self.echoes += 1
            return False
        if up == "OK" or up in _ERROR_FINALS or _CME.match(line) or _CMS.match(line):
            self.reply.final = line if up != "OK" else "OK"
            return True
        if self.prefix and up.startswith(self.prefix):
            self.reply.lines.append(line[len(self.prefix):].strip())
            return False
        if self.bare == "hex" and is_bare_hex(line):
            self.reply.bare.append(line)
        elif self.bare == "text" and not is_urc_like(line) and not up.startswith("AT") and _ALNUM.search(line):
            self.reply.bare.append(line)
        else:
            self.reply.urcs.append(line)
        return False


def parse_len_hex(value: str, what: str) -> bytes:
    """``<len>,"<hex>"`` (quotes optional) or a bare hex string → bytes.

    ``<len>`` counts hex characters (TS 27.007 §8.17/§8.43); a mismatch is a
    ProtocolError naming both numbers (docs/modem.md §2.1)."""
    v = value.strip()
    m = _LEN_HEX.match(v)
    if m:
        digits, q1, hx, q2 = m.group(1), m.group(2), m.group(3), m.group(4)
        if not _SMALL_NUMBER.match(digits):
            raise ProtocolError(f"{what} length field has {len(digits)} digits ({v[:40]!r}…); not an answer "
                                "length", code="length_mismatch")
        n = int(digits)
        if q1 != q2:
            log.debug("%s: unbalanced quotes in %r", what, v)
        if n != len(hx):
            raise ProtocolError(f"{what} length field says {n} hex characters but the modem sent {len(hx)} "
                                f"({v[:60]!r})", code="length_mismatch")
    elif _HEX_LINE.match(v):
        hx = v
    else:
        raise ProtocolError(f"cannot parse the {what} answer {v[:80]!r} (expected <length>,\"<hex>\")",
                            code="bad_response")
    if len(hx) % 2:
        raise ProtocolError(f"{what} answer has an odd number of hex digits ({len(hx)})", code="bad_response")
    return bytes.fromhex(hx)


# --------------------------------------------------------------------------- locking

def _lock_dirs(lock_dir: str | None) -> list[str]:
    """Where port lock files go: the caller's choice, $ESIM_AGENT_LOCK_DIR (systems where
    /run/lock is not shared or not writable), else /run/lock (FHS), $XDG_RUNTIME_DIR, /tmp."""
    lock_dir = lock_dir or os.environ.get("ESIM_AGENT_LOCK_DIR")
    if lock_dir:
        return [lock_dir]
    dirs = ["/run/lock"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append(os.environ["XDG_RUNTIME_DIR"])
    dirs.append("/tmp")
    return dirs


def _busy_hint(device: str) -> str:
    return (f"another program is using {device} — often ModemManager. Keep ModemManager off this port "
            "with a udev rule setting ENV{ID_MM_PORT_IGNORE}=\"1\" for it (or `systemctl stop ModemManager`), "
            "and make sure no other esim-agent runs. If the esim-agent daemon owns the port, run the command "
            "without --direct: it goes through the daemon's socket")


def _port_busy(device: str, lock_file: str) -> PortBusyError:
    """port_busy that names the holder the lock file records (its PID, /proc/PID/cmdline): the
    esim-agent daemon, another esim-agent command, or another program — only then the usual
    suspects (ModemManager)."""
    from ..pidlock import read_holder
    h = read_holder(lock_file)
    details: dict = {"lock_file": lock_file}
    if h is not None:
        details["pid"] = h.pid
        if h.argv:
            details["holder"] = h.shown()
    if h is not None and h.daemon:
        msg = (f"{device} is held by the esim-agent daemon (PID {h.pid}), which owns the modem while it runs: "
               "run the command without --direct (it then goes through the daemon's socket), or stop the service "
               "first (systemctl stop esim-agent)")
    elif h is not None and h.esim_agent:
        msg = f"{device} is in use by another esim-agent ({h.shown()}); wait for it to finish, or stop it"
    else:
        who = f" ({h.shown()})" if h is not None else ""
        msg = f"{device} is locked by another process{who}, lock file {lock_file}: " + _busy_hint(device)
    return PortBusyError(msg, details=details)


class PortLock:
    """flock on <dir>/esim-agent.<realpath with / → _>.lock (non-blocking)."""

    def __init__(self, realpath: str, lock_dir: str | None = None):
        name = "esim-agent." + realpath.strip("/").replace("/", "_") + ".lock"
        self.path = None
        self.fd = None
        last: OSError | None = None
        for d in _lock_dirs(lock_dir):
            p = os.path.join(d, name)
            try:
                fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                last = e
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _port_busy(realpath, p) from None
                raise
            self.path, self.fd = p, fd
            from ..pidfile import write_pid
            write_pid(fd)
            return
        raise TransportError(f"cannot create a lock file for {realpath} in {', '.join(_lock_dirs(lock_dir))}: {last}",
                             code="lock_failed")

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)       # closing drops the flock
            except OSError:
                pass
            self.fd = None


# --------------------------------------------------------------------------- the port

class AtPort:
    """One modem AT port. ``command()`` sends a line and returns its ``Reply``.

    ``timeout`` is the default deadline per command. ``trace(direction, data)``
    sees every line: ``AT>`` sent, ``AT<`` received.
    """

    def __init__(self, device: str, *, baud: int = 115200, timeout: float = 10.0, trace: Trace | None = None,
                 lock_dir: str | None = None, stats: Stats | None = None, lock: bool = True):
        if timeout is None or timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.device = device
        self.timeout = float(timeout)
        self.trace = trace
        self.stats = stats or Stats()
        self.urcs: collections.deque[str] = collections.deque(maxlen=URC_KEEP)
        self._split = LineSplitter()
        self._queue: collections.deque[str] = collections.deque()
        self._ser = None
        self._lock: PortLock | None = None
        self._cmee_before: str | None = None
        self._echo_before: bool | None = None     # True: echo was on when start() switched it off
        self._resync_echoed: bool | None = None   # the last successful resync's AT came back echoed
        self._cancel = None           # CancelToken watched while waiting for an answer (see watch())
        self._cancel_raised = False
        self.pending = False          # a command was interrupted before its final result
        self.dead = False             # the port stopped answering even AT
        self._stale_at_open = False   # input was waiting when the port was opened (see start())
        self._idle = None             # work to do instead of blocking on a read (when_idle)
        if not os.path.exists(device):
            why = "a dangling link" if os.path.islink(device) else "no such file"
            raise TransportError(f"modem port {device} not found ({why}): check the modem is connected and "
                                 "the path (ls -l /dev/serial/by-id/)", code="device_not_found")
        real = os.path.realpath(device)
        self.realpath = real
        # lock=False: the caller's parent process (the daemon) holds the port's lock file and
        # hands the port to this process (its card worker).
        self._lock = PortLock(real, lock_dir) if lock else None
        try:
            self._ser = self._open_serial(real, baud)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _open_serial(self, real: str, baud: int):
        import serial  # pyserial; imported here to keep CLI start-up light
        self._serial = serial
        try:
            ser = serial.Serial(real, baudrate=baud, timeout=READ_SLICE, write_timeout=self.timeout,
                                exclusive=True)
        except serial.SerialException as e:
            err = getattr(e, "errno", None)
            text = str(e)
            if "exclusively lock" in text or err in (errno.EBUSY, errno.EWOULDBLOCK):
                raise PortBusyError(f"cannot open {self.device} exclusively: " + _busy_hint(self.device)) from None
            if err == errno.ENOENT:
                raise TransportError(f"modem port {self.device} not found", code="device_not_found") from None
            if err in (errno.EACCES, errno.EPERM):
                raise TransportError(f"no permission to open {self.device}: run as root or add the user to the "
                                     "port's group (usually `dialout`)", code="permission_denied") from None
            raise TransportError(f"cannot open modem port {self.device}: {text}", code="port_open_failed") from None
        try:
            # Bytes already waiting at open belong to someone else's session: note them, so
            # start() resynchronises with the quiet wait instead of taking the fast path.
            self._stale_at_open = bool(ser.in_waiting)
            ser.reset_input_buffer()
        except Exception:
            self._stale_at_open = True
        return ser

    # --- raw I/O -------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        serial = self._serial
        try:
            self._ser.write(data)
        except serial.SerialTimeoutException:
            raise TimeoutError_(f"could not write to {self.device} within {self.timeout:g} s (flow control?)",
                                code="write_timeout") from None
        except (serial.SerialException, OSError) as e:
            self.dead = True
            raise PortLostError(f"lost the modem port {self.device} while writing: {e} "
                                "(modem reset or unplugged?)") from None
        self.stats.bytes_out += len(data)

    def when_idle(self, work) -> None:
        """Call ``work()`` instead of blocking while nothing is waiting from the modem, until it
        returns False (agent/preload.py: a command's next imports while the modem answers). A
        step delays reading an answer that arrives meanwhile by its own length, never longer."""
        self._idle = work if work else None

    def _read_some(self) -> bytes:
        """Whatever is waiting, or wait up to one READ_SLICE for at least one byte."""
        serial = self._serial
        try:
            waiting = self._ser.in_waiting
            while not waiting and self._idle is not None:
                idle, self._idle = self._idle, None
                try:
                    more = idle()
                except Exception:            # idle work must never break the session
                    more = False
                if more and self._idle is None:
                    self._idle = idle
                waiting = self._ser.in_waiting
            data = self._ser.read(waiting or 1)
        except (serial.SerialException, OSError) as e:
            self.dead = True
            raise PortLostError(f"lost the modem port {self.device} while reading: {e} "
                                "(modem reset or unplugged?)") from None
        if data:
            self.stats.bytes_in += len(data)
            for line in self._split.feed(data):
                self._queue.append(line)
        return data

    def _note_urc(self, line: str) -> None:
        self.urcs.append(line)
        log.debug("URC %s", line)

    def _drain_pending(self) -> None:
        """Lines that arrived between commands are unsolicited (or stale): set them aside."""
        try:
            waiting = self._ser.in_waiting
        except Exception:
            waiting = 0
        if waiting:
            self._read_some()
        while self._queue:
            line = self._queue.popleft()
            self._trace("AT<", line)
            up = line.upper()
            if up != "OK" and up not in _ERROR_FINALS:     # stray finals of an abandoned command: drop
                self._note_urc(line)

    def _flush(self) -> None:
        try:
            self._ser.reset_input_buffer()
        except Exception:
            pass
        self._split.clear()
        self._queue.clear()

    def _trace(self, direction: str, data) -> None:
        if self.trace:
            try:
                self.trace(direction, data)
            except Exception:  # a broken tracer must not break the modem session
                pass

    # --- commands ---------------------------------------------------------------
    def command(self, cmd: str, *, prefix: str | None = None, bare: str | None = None,
                timeout: float | None = None, resync: bool = True) -> Reply:
        """Send ``cmd`` and wait for its final result code.

        Returns the Reply on OK; raises ModemError (ERROR / CME / CMS),
        TimeoutError_ (after re-synchronising the port unless resync=False),
        PortLostError (the port went away), TransportError (port closed)."""
        if self._ser is None:
            raise TransportError(f"modem port {self.device} is closed", code="port_closed")
        limit = self.timeout if timeout is None else float(timeout)
        if self.pending:
            self._finish_interrupted()
        self._drain_pending()
        coll = Collector(cmd, prefix, bare)
        self.pending = True
        self._write(cmd.encode("ascii") + b"\r")
        self.stats.at_commands += 1
        self._trace("AT>", cmd)
        deadline = time.monotonic() + limit
        while True:
            while self._queue:
                line = self._queue.popleft()
                self._trace("AT<", line)
                if coll.add(line):
                    self.pending = False
                    coll.reply.echoed = coll.echoes > 0
                    for u in coll.reply.urcs:
                        self._note_urc(u)
                    if not coll.reply.ok:
                        raise error_from_final(cmd, coll.reply.final)
                    return coll.reply
            if time.monotonic() >= deadline:
                break
            if self._cancel is not None and not self._cancel_raised and self._cancel.cancelled:
                # Stop waiting (the command stays pending: its late answer is dropped before the
                # next command). Raised once per token, so the clean-up that follows
                # (CancelSession, closing the channel) can still use the port.
                self._cancel_raised = True
                from ..cancel import Cancelled
                raise Cancelled(self._cancel.reason or "cancelled", f"while waiting for {command_name(cmd)}")
            self._read_some()
        # Deadline passed without a final result code.
        for u in coll.reply.urcs:
            self._note_urc(u)
        name = command_name(cmd)
        if not resync:
            raise TimeoutError_(f"modem did not answer {name} within {float(limit)} s",
                                details={"command": name, "timeout_s": limit, "resynced": False})
        ok = self.resync()
        if ok:
            msg = f"modem did not answer {name} within {float(limit)} s; port re-synchronised"
        else:
            msg = (f"modem did not answer {name} within {float(limit)} s and then did not answer AT either "
                   f"({RESYNC_TRIES} tries); check the modem and that {self.device} is its AT port")
        raise TimeoutError_(msg, details={"command": name, "timeout_s": limit, "resynced": ok})

    def watch(self, token) -> None:
        """Abort a wait for an answer when ``token`` (a CancelToken) is cancelled."""
        self._cancel, self._cancel_raised = token, False

    def _finish_interrupted(self) -> None:
        """The previous command was interrupted (Ctrl-C, SIGTERM) before its final result.
        Its answer may still be on the way: wait for that final result code and drop it,
        so it is not taken for the answer to the next command (e.g. the CancelSession
        sent right after the interrupt). Without it within the deadline, resynchronise."""
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            while self._queue:
                line = self._queue.popleft()
                self._trace("AT<", line)
                up = line.strip().upper()
                if up == "OK" or up in _ERROR_FINALS or _CME.match(line) or _CMS.match(line):
                    self.pending = False
                    return
            self._read_some()
        self.resync()
        self.pending = False

    def resync(self, tries: int = RESYNC_TRIES, deadline: float = RESYNC_DEADLINE) -> bool:
        """Drain input, send ``AT`` until ``OK`` (bounded), then drop stragglers."""
        if self._ser is None:
            return False
        each = min(deadline, self.timeout)
        for _ in range(tries):
            self._flush()
            try:
                self._write(b"AT\r")
            except TransportError:
                return False
            self.stats.at_commands += 1
            self._trace("AT>", "AT")
            end = time.monotonic() + each
            got = echoed = False
            while not got and time.monotonic() < end:
                try:
                    self._read_some()
                except TransportError:
                    return False
                while self._queue:
                    line = self._queue.popleft()
                    self._trace("AT<", line)
                    up = line.upper()
                    if up == "OK":
                        got = True
                    elif up == "AT":
                        echoed = True
            if got:
                self._resync_echoed = echoed
                # The OK may have been the timed-out command's late final result; its own
                # OK then follows: stay until the line is quiet for a while (not 0.1 s).
                self._quiet(window=RESYNC_QUIET)
                self.pending = False
                self.dead = False
                return True
        self.dead = True
        return False

    def _quiet(self, window: float = QUIET, limit: float = 1.0) -> None:
        """Read and discard until the line has been silent for ``window`` seconds."""
        end = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() < end and time.monotonic() - last < window:
            try:
                if self._read_some():
                    last = time.monotonic()
            except TransportError:
                return
        while self._queue:
            self._trace("AT<", self._queue.popleft())

    def try_command(self, cmd: str, *, timeout: float | None = None, **kw) -> Reply | None:
        """``command`` that returns None on ERROR / CME / CMS / time-out."""
        try:
            return self.command(cmd, timeout=timeout, **kw)
        except (ModemError, TimeoutError_) as e:
            log.debug("%s failed: %s", command_name(cmd), e)
            return None

    def query(self, cmd: str, prefix: str | None = None, *, timeout: float | None = None) -> str | None:
        """A one-value read (AT+CGMI, AT+CGSN ...): the prefixed value, else the
        first plain line, else None (also when the modem answers ERROR)."""
        try:
            r = self.command(cmd, prefix=prefix, bare="text", timeout=timeout)
        except ModemError:
            return None
        vals = r.lines or r.bare
        return vals[0].strip().strip('"').strip() if vals else None

    def start(self) -> None:
        """Session start (docs/modem.md §6 item 3): AT until OK, ATE0, AT+CMEE=1.

        ``close()`` restores what this changes. ATE has no query form, but a modem
        echoes a command line as it reads it, before acting on it: the answer to our
        ATE0 came back echoed exactly when echo was on. (Without an answer to ATE0,
        the ``AT`` of the resynchronisation before it tells the same.)"""
        each = min(self.timeout, 1.5)
        fast = self._fast_sync(each)
        if fast is None:
            # Trouble (stale input, a straggler, garbage, a URC, no answer): the full
            # resynchronisation, quiet wait included. The fast attempt was the first of 5 tries.
            if not self.resync(tries=4, deadline=each):
                raise TimeoutError_(f"no answer to AT on {self.device} (5 tries): is this the modem's AT port? "
                                    "(QMI, diag and NMEA ports stay silent)", code="modem_not_responding")
            r = self.try_command("ATE0")
            self._echo_before = r.echoed if r is not None else self._resync_echoed
            # Remember the error-report mode to restore it on close: other tools that share
            # the port (lpac's AT driver) treat only OK/ERROR as final and would hang on the
            # "+CME ERROR" we switch on.
            before = self.query("AT+CMEE?", "+CMEE:", timeout=min(self.timeout, 2.0))
            self._cmee_before = before.strip() if before and before.strip().isdigit() else None
            self.try_command("AT+CMEE=1")
            return
        echoed, cmee = fast
        # Echo was on exactly when our AT+CMEE? came back echoed; nothing to switch (or to
        # restore on close) when echo is already off and numeric errors already on.
        if echoed:
            r = self.try_command("ATE0")
            self._echo_before = r.echoed if r is not None else True
        else:
            self._echo_before = False
        self._cmee_before = cmee
        if cmee != "1":
            self.try_command("AT+CMEE=1")

    def _fast_sync(self, deadline: float) -> tuple[bool, str] | None:
        """The happy-path session start: one ``AT+CMEE?``, with no quiet wait.

        Its answer proves the line is in step: a ``+CMEE: <n>`` line comes before the
        ``OK``, so a late final result of someone else's command (a bare ``OK``) cannot
        be taken for ours. Returns (echo was on, the CMEE mode) — or None on any trouble:
        input waiting at open, a line that is neither our echo nor our answer (a
        straggler, garbage, a URC), an error, no answer within ``deadline``. The caller
        then resynchronises the slow way (``resync``: AT until OK, then the quiet wait)."""
        if self._stale_at_open or self._queue:
            return None
        try:
            if self._ser.in_waiting:
                return None
        except Exception:
            return None
        self._split.clear()
        cmd = "AT+CMEE?"
        try:
            self._write(cmd.encode("ascii") + b"\r")
        except TransportError:
            return None
        self.stats.at_commands += 1
        self._trace("AT>", cmd)
        end = time.monotonic() + deadline
        echoed, value = False, None
        while time.monotonic() < end:
            while self._queue:
                line = self._queue.popleft()
                self._trace("AT<", line)
                up = line.upper()
                if up == cmd and value is None and not echoed:
                    echoed = True
                    continue
                m = _CMEE_VALUE.match(line)
                if m and value is None:
                    value = m.group(1)
                    continue
                if up == "OK" and value is not None:
                    self._resync_echoed = echoed
                    return echoed, value
                log.debug("session start: unexpected %r; resynchronising", line[:40])
                return None
            try:
                self._read_some()
            except TransportError:
                return None
        log.debug("session start: no answer to %s within %g s; resynchronising", cmd, deadline)
        return None

    # --- life cycle ---------------------------------------------------------------
    def _restore_settings(self) -> None:
        """Put back what start() changed: the AT+CMEE mode, then echo (ATE1 if it was on)."""
        cmee, echo = self._cmee_before, self._echo_before
        self._cmee_before = self._echo_before = None
        todo = ([f"AT+CMEE={cmee}"] if cmee not in (None, "1") else []) + (["ATE1"] if echo else [])
        for cmd in todo:
            if self.dead:                 # not answering (or gone): nothing left to restore
                return
            try:
                self.try_command(cmd, timeout=0.5)
            except AgentError as e:       # the port went away meanwhile (or a cancel): close anyway
                log.debug("not restoring %s: %s", cmd, e)
                return

    def close(self) -> None:
        if self._ser is not None:
            self._restore_settings()
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except Exception:
                pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def closed(self) -> bool:
        return self._ser is None

    def __enter__(self) -> "AtPort":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- identity reads (docs/modem.md §4)

@dataclass
class ModemInfo:
    """The modem's identification (AT+CGMI/CGMM/CGMR/CGSN) and the SIM's ICCID."""
    manufacturer: str | None = None
    model: str | None = None
    revision: str | None = None
    imei: str | None = None
    iccid: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def read_imei(port: AtPort) -> str | None:
    for cmd, prefix in (("AT+CGSN", "+CGSN:"), ("AT+GSN", "+GSN:")):
        v = port.query(cmd, prefix)
        digits = re.sub(r"\D", "", v or "")
        if 14 <= len(digits) <= 17:
            return digits
    return None


#: +CME ERROR codes about the SIM itself (TS 27.007 §9.2: 10 not inserted, 11 PIN, 12 PUK, 13 failure,
#: 14 busy, 15 wrong): any other ICCID command would get the same answer.
SIM_STATE_CME = frozenset(range(10, 16))
_SIM_STATE_CME_TEXT = frozenset(CME_TEXT[c].lower() for c in SIM_STATE_CME)


def sim_state_error(e: ModemError) -> bool:
    """The modem refused because of the SIM's state (numeric or verbose CME 10-15), not the command."""
    if not isinstance(e, ModemCmeError):
        return False
    return e.cme in SIM_STATE_CME if isinstance(e.cme, int) else e.cme.strip().lower() in _SIM_STATE_CME_TEXT


def read_iccid(port: AtPort) -> str | None:
    """The active profile's ICCID: AT+CCID, then Quectel AT+QCCID, then AT+ICCID.

    The fallbacks are for modems that do not know AT+CCID (ERROR, CME 3/4, no value); when it
    answers a SIM-state error (not inserted, PIN, PUK, failure, busy, wrong), the others would
    say the same, so they are not sent (two commands saved at every opening without a SIM)."""
    for cmd, prefix in (("AT+CCID", "+CCID:"), ("AT+QCCID", "+QCCID:"), ("AT+ICCID", "+ICCID:")):
        try:
            r = port.command(cmd, prefix=prefix, bare="text")
        except ModemError as e:
            if sim_state_error(e):
                return None
            continue
        vals = r.lines or r.bare
        v = vals[0].strip().strip('"').strip() if vals else None
        if not v:
            continue
        digits = re.sub(r"\D", "", v.upper().rstrip("F"))
        if 18 <= len(digits) <= 20:
            return digits
    return None


def read_modem_info(port: AtPort, manufacturer: str | None = None, model: str | None = None) -> ModemInfo:
    return ModemInfo(manufacturer=manufacturer or port.query("AT+CGMI", "+CGMI:"),
                     model=model or port.query("AT+CGMM", "+CGMM:"),
                     revision=port.query("AT+CGMR", "+CGMR:"),
                     imei=read_imei(port), iccid=read_iccid(port))
