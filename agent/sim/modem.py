"""Simulated cellular modem: an AT command interpreter in front of the simulated
eUICC, served on a real pseudo-terminal (DESIGN.md "The simulated modem
exposes a real pseudo-terminal path"), with fault injection (modem.md §7).

Commands: AT, ATE0/ATE1, ATZ, ATI, AT+CMEE, AT+CGMI/CGMM/CGMR (+GMI/GMM/GMR),
AT+CGSN/GSN, AT+CCID, AT+CSIM, AT+CCHO/CGLA/CCHC (and their ``=?`` forms),
AT+CFUN, AT+CPIN?, AT+CREG?/CEREG?/COPS?. Like a real modem, echo is on until
ATE0 and errors are plain ``ERROR`` until AT+CMEE=1/2.

Faults (``--fault``, repeatable):

==================  ==========================================================
``echo``            echo stays on whatever ATE0 says
``urc``             unsolicited lines before every reply and between the
                    response line and the final result
``lowercase``       hex in CSIM/CGLA/CCHO answers in lower case
``no-prefix``       CCHO/CGLA/CSIM answers without ``+XXX: `` (FM350 style)
``no-test-forms``   every ``=?`` test command answers ERROR
``error@N``         the N-th APDU-carrying command answers ERROR
``cme=CODE@N``      ... answers ``+CME ERROR: CODE`` (number or text)
``silent@N``        ... gets no answer at all (and never reaches the card)
``delay=S[@N]``     answers to APDU-carrying commands (or only the N-th) come S s late
``garbage``         binary junk (NUL, 0xFF, broken UTF-8) before every reply
``max-apdu=BYTES``  APDUs longer than BYTES → ``+CME ERROR: 3``
``opaque-session``  AT+CCHO hands out 64-bit handles (Sierra MC7455 style)
==================  ==========================================================

"APDU-carrying command" means AT+CSIM and AT+CGLA (not their ``=?`` forms).
AT+CCHO/AT+CCHC are not counted: they manage a channel and carry no APDU of
the caller's; counting them would make ``@N`` depend on the transport's
channel handling. Error and silent faults drop the command before the card
sees it, so the card state is what it was before.

``--baud N`` emulates a UART: a command of n bytes is handled no earlier than
n·10/baud after its first byte arrived, and replies are written at n·10/baud.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import select
import signal
import sys
import threading
import time
import tty
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..errors import UsageError
from ..ids import luhn_check_digit

log = logging.getLogger(__name__)

MANUFACTURER = "esim-agent"
MODEL = "SIMMODEM-1"
REVISION = "SIMMODEM-1.0"

MAX_INPUT_LINE = 4096
URCS = ['+CEREG: 1,"1A2B","01C2D3E4",7', "+QUSIM: 1", "+CPIN: READY", "RDY", '+QIND: "csq",20,99',
        "^SYSSTART", "+CREG: 1"]
JUNK = [b"\x00\xff\xfe\x00", b"\xc3\x80\xa0\xa1\x00", b"\xff\xff\x80\x9c\x00\x1b", b"\x00\x00\xe2\x82"]
CME_TEXT = {3: "operation not allowed", 4: "operation not supported", 10: "SIM not inserted",
            13: "SIM failure", 14: "SIM busy", 21: "invalid index", 100: "unknown"}


# --------------------------------------------------------------------------- faults

@dataclass
class Faults:
    echo: bool = False
    urc: bool = False
    lowercase: bool = False
    no_prefix: bool = False
    no_test_forms: bool = False
    garbage: bool = False
    opaque_session: bool = False
    errors: dict = field(default_factory=dict)      # N -> "ERROR" or ("cme", code)
    silent: set = field(default_factory=set)
    delay: float = 0.0
    delay_at: dict = field(default_factory=dict)    # N -> seconds
    max_apdu: int | None = None
    refresh: bool = False


#: How long the modem answers SIM busy after a REFRESH (fault "refresh").
REFRESH_BUSY_S = 0.5

_FLAGS = {"echo": "echo", "urc": "urc", "lowercase": "lowercase", "no-prefix": "no_prefix",
          "no-test-forms": "no_test_forms", "garbage": "garbage", "opaque-session": "opaque_session",
          "refresh": "refresh"}
FAULT_HELP = ("echo, urc, lowercase, no-prefix, no-test-forms, garbage, opaque-session, refresh, error@N, "
              "cme=CODE@N, silent@N, delay=SECONDS[@N], max-apdu=BYTES")


def _pos_int(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"fault {spec!r}: {text!r} is not a positive number", code="bad_fault")
    return int(text)


def parse_faults(specs: Iterable[str] | Faults | None) -> Faults:
    """``["echo", "cme=14@3", ...]`` → Faults; an unknown spec is a UsageError."""
    if isinstance(specs, Faults):
        return specs
    f = Faults()
    for raw in specs or ():
        spec = str(raw).strip()
        key = spec.lower()
        if key in _FLAGS:
            setattr(f, _FLAGS[key], True)
        elif key.startswith("error@"):
            f.errors[_pos_int(spec[6:], spec)] = "ERROR"
        elif key.startswith("silent@"):
            f.silent.add(_pos_int(spec[7:], spec))
        elif key.startswith("cme="):
            code, sep, n = spec[4:].rpartition("@")
            if not sep or not code.strip():
                raise UsageError(f"fault {spec!r}: write cme=CODE@N, e.g. cme=14@3", code="bad_fault")
            code = code.strip()
            f.errors[_pos_int(n, spec)] = ("cme", int(code) if code.isdigit() else code)
        elif key.startswith("delay="):
            secs, sep, n = spec[6:].partition("@")
            try:
                d = float(secs)
            except ValueError:
                d = -1.0
            if not 0 <= d <= 3600:
                raise UsageError(f"fault {spec!r}: delay wants seconds (0..3600)", code="bad_fault")
            if sep:
                f.delay_at[_pos_int(n, spec)] = d
            else:
                f.delay = d
        elif key.startswith("max-apdu="):
            f.max_apdu = _pos_int(spec[9:], spec)
            if f.max_apdu < 4:
                raise UsageError(f"fault {spec!r}: an APDU has at least 4 bytes", code="bad_fault")
        else:
            raise UsageError(f"unknown modem fault {spec!r}; known: {FAULT_HELP}", code="bad_fault")
    return f


# --------------------------------------------------------------------------- the AT interpreter (no I/O)

def imei_for(eid: str) -> str:
    """A fixed, valid (Luhn) IMEI per card, derived from its EID."""
    h = int.from_bytes(hashlib.sha256(f"imei:{eid}".encode()).digest()[:8], "big")
    body = "35" + f"{h % 10**12:012d}"
    return body + luhn_check_digit(body)


def _cla_for(cla: int, channel: int) -> int:
    from ..apdu import cla_for
    base = (cla & 0x90) if cla & 0x40 else (cla & 0x9C)
    return cla_for(base, channel)


_CSIM = re.compile(r'^(\d+)\s*,\s*"?([0-9A-Fa-f]*)"?$')
_CGLA = re.compile(r'^"?([0-9A-Za-z]+)"?\s*,\s*(\d+)\s*,\s*"?([0-9A-Fa-f]*)"?$')


@dataclass
class Answer:
    """What to send back for one command line."""

    lines: list = field(default_factory=list)   # information response lines
    final: str = "OK"
    after: list = field(default_factory=list)   # URCs after the final result
    silent: bool = False
    delay: float = 0.0


class ModemLogic:
    """Parses one command line, drives the card, builds the answer (no I/O)."""

    def __init__(self, card, faults: Faults | None = None):
        self.card = card
        self.f = faults or Faults()
        self.echo = True          # factory default E1
        self.cmee = 0
        self.cfun = 1
        self.sessions: dict[str, int] = {}    # AT+CCHO session id -> logical channel
        self.apdu_count = 0
        self._urc_i = 0
        self._junk_i = 0
        self._handle_seq = 0
        self.imei = imei_for(card.eid)
        # Fault "refresh": like a real modem, act on the card's REFRESH after an enable or
        # disable with refreshFlag: reset the UICC (all logical channels close) and answer
        # SIM busy for a moment (modem.md §3).
        self._refresh_pending = False
        self._busy_until = 0.0
        if self.f.refresh and hasattr(card, "on_profile_change"):
            card.on_profile_change = self._profile_changed

    def _profile_changed(self, iccid) -> None:
        isdr = getattr(self.card, "isdr", None)
        if getattr(isdr, "last_refresh_flag", False):
            self._refresh_pending = True

    def _after_card(self) -> None:
        if self._refresh_pending:
            self._refresh_pending = False
            self._reset_card()
            self._busy_until = time.monotonic() + REFRESH_BUSY_S

    def _sim_busy(self) -> bool:
        return time.monotonic() < self._busy_until

    # --- helpers -------------------------------------------------------------------
    def _err(self, code: int | str) -> Answer:
        return Answer(final=self._cme(code))

    def _cme(self, code: int | str) -> str:
        if self.cmee == 0:
            return "ERROR"
        if self.cmee == 2 and isinstance(code, int):
            return f"+CME ERROR: {CME_TEXT.get(code, code)}"
        return f"+CME ERROR: {code}"

    def _hex(self, b: bytes) -> str:
        h = b.hex()
        return h if self.f.lowercase else h.upper()

    def _resp(self, prefix: str, value: str) -> str:
        return value if self.f.no_prefix else f"{prefix}: {value}"

    def _card(self, apdu: bytes) -> bytes:
        try:
            r = bytes(self.card.apdu(apdu))
        except Exception:  # the card must not take the modem down
            log.exception("simulated card failed on %s", apdu.hex().upper())
            raise _SimFailure() from None
        if len(r) < 2:
            log.error("simulated card returned %r", r)
            raise _SimFailure()
        return r

    def next_urc(self) -> str:
        u = URCS[self._urc_i % len(URCS)]
        self._urc_i += 1
        return u

    def next_junk(self) -> bytes:
        j = JUNK[self._junk_i % len(JUNK)]
        self._junk_i += 1
        return j

    # --- dispatch --------------------------------------------------------------------
    def handle(self, line: str) -> Answer | None:
        """One command line (without its terminator) → Answer, or None to ignore it."""
        cmd = line.strip()
        if len(cmd) < 2 or cmd[:2].upper() != "AT":
            return None                     # real modems ignore lines that are not commands
        body = cmd[2:]
        up = body.upper()
        if up == "":
            return Answer()
        if up in ("E0", "E1", "E"):
            self.echo = up == "E1"
            return Answer()
        if up in ("Z", "Z0", "&F"):
            self.echo, self.cmee = True, 0
            return Answer()
        if up in ("I", "I0"):
            return Answer([MANUFACTURER, MODEL, f"Revision: {REVISION}"])
        if not up.startswith(("+", "^")):
            return Answer(final="ERROR")
        name, sep, arg = body[1:].partition("=")
        name = name.upper()
        query = False
        if not sep and name.endswith("?"):
            name, query = name[:-1], True
        if sep and arg.strip() == "?":
            if self.f.no_test_forms:
                return Answer(final="ERROR")
            return self._test_form(name)
        fn = getattr(self, "_at_" + name.lower(), None) if name.isalnum() else None
        if fn is None:
            return Answer(final="ERROR")
        try:
            return fn(arg.strip() if sep else None, query)
        except _SimFailure:
            return self._err(13)

    def _test_form(self, name: str) -> Answer:
        forms = {"CSIM": [], "CCHO": [], "CGLA": [], "CCHC": [], "CMEE": ["+CMEE: (0-2)"],
                 "CFUN": ["+CFUN: (0,1,4),(0,1)"], "CGSN": [], "CCID": []}
        if name in forms:
            return Answer(forms[name])
        return Answer(final="ERROR")

    # --- identity ---------------------------------------------------------------------
    def _at_cmee(self, arg, query):
        if query:
            return Answer([f"+CMEE: {self.cmee}"])
        if arg not in ("0", "1", "2"):
            return self._err(4)
        self.cmee = int(arg)
        return Answer()

    def _at_cgmi(self, arg, query):
        return Answer([MANUFACTURER])

    def _at_cgmm(self, arg, query):
        return Answer([MODEL])

    def _at_cgmr(self, arg, query):
        return Answer([REVISION])

    _at_gmi, _at_gmm, _at_gmr = _at_cgmi, _at_cgmm, _at_cgmr

    def _at_cgsn(self, arg, query):
        if arg == "1":
            return Answer([f'+CGSN: "{self.imei}"'])
        if arg not in (None, "0"):
            return self._err(4)
        return Answer([self.imei])

    def _at_gsn(self, arg, query):
        return Answer([self.imei])

    def _at_ccid(self, arg, query):
        if self.cfun == 0:
            return self._err(13)
        iccid = self.card.enabled_iccid()
        if not iccid:
            return self._err(10)
        return Answer([f"+CCID: {iccid}"])

    # --- network ------------------------------------------------------------------------
    def _registered(self) -> bool:
        return self.cfun == 1 and bool(self.card.enabled_iccid())

    def _at_cfun(self, arg, query):
        if query:
            return Answer([f"+CFUN: {self.cfun}"])
        parts = [p.strip() for p in (arg or "").split(",")]
        if not parts[0] in ("0", "1", "4") or len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("0", "1")):
            return self._err(4)
        new, rst = int(parts[0]), len(parts) == 2 and parts[1] == "1"
        after = []
        if rst or (new != 0 and self.cfun == 0):
            self._reset_card()
            if rst:
                after = ["RDY", "+CPIN: READY"]
        elif new == 0:
            self.sessions.clear()
        self.cfun = new
        return Answer(after=after)

    def _reset_card(self) -> None:
        self.sessions.clear()
        reset = getattr(self.card, "reset", None)
        if reset:
            reset()

    def _at_cpin(self, arg, query):
        if not query:
            return self._err(3)
        if self.cfun == 0:
            return self._err(13)
        return Answer(["+CPIN: READY"])

    def _at_creg(self, arg, query):
        return self._reg("+CREG", arg, query)

    def _at_cereg(self, arg, query):
        return self._reg("+CEREG", arg, query)

    def _reg(self, prefix, arg, query):
        if query:
            return Answer([f"{prefix}: 0,{1 if self._registered() else 0}"])
        return Answer() if arg in ("0", "1", "2") else self._err(4)

    def _at_cops(self, arg, query):
        if not query:
            return Answer()
        if self._registered():
            return Answer(['+COPS: 0,0,"SIMNET",7'])
        return Answer(["+COPS: 0"])

    # --- APDU-carrying commands ------------------------------------------------------------
    def _apdu_fault(self) -> Answer | None:
        """Count one APDU-carrying command and apply the faults for it."""
        self.apdu_count += 1
        n = self.apdu_count
        if n in self.f.silent:
            return Answer(silent=True)
        e = self.f.errors.get(n)
        if e == "ERROR":
            return Answer(final="ERROR")
        if e is not None:
            return Answer(final=self._cme(e[1]))
        return None

    def _delay(self) -> float:
        return self.f.delay_at.get(self.apdu_count, self.f.delay)

    def _apdu_checks(self, nchars: int, hx: str) -> bytes | Answer:
        if self._sim_busy():
            return self._err(14)
        if nchars != len(hx) or len(hx) % 2 or len(hx) < 8:
            return self._err(3)
        apdu = bytes.fromhex(hx)
        if self.f.max_apdu and len(apdu) > self.f.max_apdu:
            return self._err(3)
        if self.cfun == 0:
            return self._err(13)
        return apdu

    def _at_csim(self, arg, query):
        if arg is None:
            return Answer(final="ERROR")
        fault = self._apdu_fault()
        if fault:
            return fault
        m = _CSIM.match(arg)
        if not m:
            return self._err(3)
        apdu = self._apdu_checks(int(m.group(1)), m.group(2))
        if isinstance(apdu, Answer):
            return apdu
        r = self._card(apdu)
        self._after_card()
        hx = self._hex(r)
        return Answer([self._resp("+CSIM", f'{len(hx)},"{hx}"')], delay=self._delay())

    def _at_cgla(self, arg, query):
        if arg is None:
            return Answer(final="ERROR")
        fault = self._apdu_fault()
        if fault:
            return fault
        m = _CGLA.match(arg)
        if not m:
            return self._err(3)
        ch = self.sessions.get(m.group(1).lower())
        if ch is None:
            return self._err(21)
        apdu = self._apdu_checks(int(m.group(2)), m.group(3))
        if isinstance(apdu, Answer):
            return apdu
        # TS 27.007 §8.45: the MT manages the channel bits of CLA.
        apdu = bytes([_cla_for(apdu[0], ch)]) + apdu[1:]
        r = self._card(apdu)
        self._after_card()
        hx = self._hex(r)
        return Answer([self._resp("+CGLA", f'{len(hx)},"{hx}"')], delay=self._delay())

    def _at_ccho(self, arg, query):
        if not arg:
            return Answer(final="ERROR")
        aid_hex = arg.strip().strip('"')
        if not re.fullmatch(r"[0-9A-Fa-f]{10,32}", aid_hex) or len(aid_hex) % 2:
            return self._err(3)
        if self._sim_busy():
            return self._err(14)
        if self.cfun == 0:
            return self._err(13)
        aid = bytes.fromhex(aid_hex)
        r = self._card(bytes.fromhex("0070000001"))
        if r[-2:] != b"\x90\x00" or len(r) != 3:
            return self._err(4)
        ch = r[0]
        sel = self._card(bytes([_cla_for(0, ch), 0xA4, 0x04, 0x00, len(aid)]) + aid + b"\x00")
        n = 0
        while sel[-2] == 0x61 and n < 64:        # the modem fetches the FCI itself
            sel = self._card(bytes([_cla_for(0, ch), 0xC0, 0, 0, sel[-1]]))
            n += 1
        if not (sel[-2] == 0x90 or sel[-2] == 0x91):
            self._card(bytes([0x00, 0x70, 0x80, ch]))
            return self._err(4)
        if self.f.opaque_session:
            self._handle_seq += 1
            sid = f"{0x0385A7C0 + self._handle_seq * 0x1F3 + ch:016x}"
        else:
            sid = str(ch)
        self.sessions[sid] = ch
        shown = sid if self.f.lowercase or not self.f.opaque_session else sid.upper()
        return Answer([self._resp("+CCHO", shown)])

    def _at_cchc(self, arg, query):
        if not arg:
            return Answer(final="ERROR")
        ch = self.sessions.pop(arg.strip().strip('"').lower(), None)
        if ch is None:
            return self._err(21)
        self._card(bytes([0x00, 0x70, 0x80, ch]))
        return Answer()

    # --- output -----------------------------------------------------------------------
    def render(self, a: Answer) -> bytes:
        """Verbose (V1) result formatting: ``\\r\\n<line>\\r\\n`` ... ``\\r\\n<final>\\r\\n``."""
        out = []
        if self.f.garbage:
            out.append(self.next_junk())
        if self.f.urc:
            out.append(f"\r\n{self.next_urc()}\r\n".encode())
        for line in a.lines:
            out.append(f"\r\n{line}\r\n".encode())
        if self.f.urc:
            out.append(f"\r\n{self.next_urc()}\r\n".encode())
        out.append(f"\r\n{a.final}\r\n".encode())
        for u in a.after:
            out.append(f"\r\n{u}\r\n".encode())
        return b"".join(out)


class _SimFailure(Exception):
    pass


class _Stop(Exception):
    pass


# --------------------------------------------------------------------------- the pty server

class ModemServer:
    """Serves one ModemLogic on a pseudo-terminal. ``serve()`` blocks until ``stop()``."""

    def __init__(self, logic: ModemLogic, *, link: str | None = None, baud: int | None = None):
        self.logic = logic
        self.card = logic.card
        self.baud = baud
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)                  # no line discipline: bytes pass as they are
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self.link = os.path.abspath(link) if link else None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._line_free = 0.0                    # when the emulated UART finishes the last reply
        if self.link:
            try:
                self._make_link()
            except BaseException:
                self.link = None
                self._cleanup()
                raise

    # --- life cycle -------------------------------------------------------------------
    def _make_link(self) -> None:
        parent = os.path.dirname(self.link)
        os.makedirs(parent, exist_ok=True)
        if os.path.lexists(self.link) and not os.path.islink(self.link):
            raise UsageError(f"{self.link} exists and is not a symlink; not replacing it", code="link_exists")
        tmp = f"{self.link}.{os.getpid()}.{threading.get_ident()}.tmp"
        os.symlink(self.path, tmp)
        os.replace(tmp, self.link)               # atomically replaces a stale link

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _cleanup(self) -> None:
        if self.link:
            try:
                if os.path.islink(self.link) and os.readlink(self.link) == self.path:
                    os.unlink(self.link)
            except OSError:
                pass
        for fd in (self.master, self._slave, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # --- timing -------------------------------------------------------------------------
    def _sleep_until(self, t: float) -> None:
        while True:
            if self._stop.is_set():
                raise _Stop()
            left = t - time.monotonic()
            if left <= 0:
                return
            select.select([self._wake_r], [], [], left)

    def _write_now(self, data: bytes) -> None:
        view = memoryview(data)
        give_up = time.monotonic() + 2.0
        while view:
            try:
                n = os.write(self.master, view)
                view = view[n:]
            except BlockingIOError:
                # Nobody reads the slave (client gone) and its queue is full: drop
                # the rest after a while rather than block the modem forever.
                if time.monotonic() > give_up:
                    log.debug("dropping %d bytes nobody reads", len(view))
                    return
                select.select([self._wake_r], [self.master], [], 0.05)
                if self._stop.is_set():
                    raise _Stop()
            except OSError as e:
                if e.errno == errno.EIO:
                    return
                raise

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if not self.baud:
            self._write_now(data)
            return
        per = 10.0 / self.baud                  # 8N1: 10 bit times per byte
        t0 = max(time.monotonic(), self._line_free)
        chunk = max(16, int(self.baud / 10 * 0.004))   # ~4 ms of line time per write
        sent = 0
        while sent < len(data):
            piece = data[sent:sent + chunk]
            sent += len(piece)
            self._sleep_until(t0 + sent * per)  # the last byte of this piece is "on the wire" now
            self._write_now(piece)
        self._line_free = t0 + len(data) * per

    # --- main loop ---------------------------------------------------------------------------
    def serve(self) -> None:
        buf = b""
        first = None                # arrival time of the current command's first byte
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([self.master, self._wake_r], [], [], 1.0)
                if self._wake_r in r or self._stop.is_set():
                    break
                if self.master not in r:
                    continue
                try:
                    data = os.read(self.master, 65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno == errno.EIO:     # no slave open (cannot happen while we hold one)
                        self._sleep_until(time.monotonic() + 0.05)
                        continue
                    raise
                if not data:
                    continue
                now = time.monotonic()
                if first is None:
                    first = now
                buf += data
                while True:
                    m = re.search(rb"[\r\n]", buf)
                    if m is None:
                        if len(buf) > MAX_INPUT_LINE:       # bounded: junk without a line end
                            buf, first = b"", None
                        break
                    raw, buf = buf[:m.start()], buf[m.end():]
                    if raw.strip():
                        self._command(raw, first or now, len(raw) + 1)
                    first = time.monotonic() if buf.strip(b"\r\n") else None
        except _Stop:
            pass

    def _command(self, raw: bytes, first: float, nbytes: int) -> None:
        if len(raw) > MAX_INPUT_LINE:
            self._write(b"\r\nERROR\r\n")
            return
        if self.baud:
            self._sleep_until(first + nbytes * 10.0 / self.baud)
        line = raw.decode("ascii", "replace")
        logic = self.logic
        echo = logic.echo or logic.f.echo
        answer = logic.handle(line)
        if echo:
            self._write(raw + b"\r")
        if answer is None or answer.silent:
            return
        if answer.delay:
            self._sleep_until(time.monotonic() + answer.delay)
        self._write(logic.render(answer))


# --------------------------------------------------------------------------- entry point

def serve_modem(state_path, *, link: str | None = None, preload: int = 0, baud: int | None = None,
                faults=(), pki_dir=None, ready: Callable[[ModemServer], None] | None = None,
                euicc_kwargs: dict | None = None, card=None) -> None:
    """Serve a simulated modem + eUICC on a new pseudo-terminal until SIGTERM/SIGINT
    (or ``server.stop()``, e.g. from the ``ready`` callback's argument).

    Prints the pty path on stdout; symlinks it at ``link`` (removed on exit).
    ``card`` replaces the SimEuicc (tests)."""
    f = parse_faults(faults)
    if baud is not None and baud <= 0:
        raise UsageError("--baud wants a positive number", code="bad_baud")
    if card is None:
        from .euicc import SimEuicc
        card = SimEuicc.open(state_path, preload=preload, pki_dir=pki_dir, **(euicc_kwargs or {}))
    server = ModemServer(ModemLogic(card, f), link=link, baud=baud)
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda *_: server.stop())
    try:
        print(server.path, flush=True)
        if ready is not None:
            ready(server)
        server.serve()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        server._cleanup()


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m agent.sim.modem",
                                description="Simulated modem + eUICC on a pseudo-terminal (until SIGTERM/Ctrl-C).")
    p.add_argument("--state", required=True, metavar="FILE", help="simulated eUICC state file (created if missing)")
    p.add_argument("--link", metavar="PATH", help="symlink the pty at PATH")
    p.add_argument("--preload", type=int, default=0, metavar="N", help="test profiles on a new card")
    p.add_argument("--baud", type=int, metavar="N", help="emulate a UART at N baud")
    p.add_argument("--pki", metavar="DIR", help="take the eUICC identity from a test PKI")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC", help=f"repeatable: {FAULT_HELP}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        serve_modem(args.state, link=args.link, preload=args.preload, baud=args.baud, faults=args.fault,
                    pki_dir=args.pki)
    except UsageError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
