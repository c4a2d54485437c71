"""Simulated cellular modem: an AT command interpreter in front of the simulated
eUICC, served on a real pseudo-terminal (DESIGN.md "The simulated modem
exposes a real pseudo-terminal path"), with fault injection (docs/modem.md §7).

Commands: AT, ATE0/ATE1, ATZ, ATI, AT+CMEE, AT+CGMI/CGMM/CGMR (+GMI/GMM/GMR),
AT+CGSN/GSN, AT+CCID, AT+CSIM, AT+CCHO/CGLA/CCHC (and their ``=?`` forms),
AT+CFUN, AT+CPIN?, AT+CREG/CEREG/C5GREG (set and read), AT+COPS?. Like a real
modem, echo is on until ATE0 and errors are plain ``ERROR`` until AT+CMEE=1/2.

Network registration (``--network ICCID:MODE``, repeatable) follows the profile
ENABLED on the card and the time since it became enabled (or since the radio
came back: AT+CFUN=1 after 0/4, AT+CFUN=1,1, a card REFRESH, a re-enumeration):

====================  ==========================================================
``ok``                registered, home network (stat 1) at once (the default for
                      every ICCID not named)
``roaming``           registered, roaming (stat 5) at once
``never``             stat 2 "not registered, searching" for ever: what a modem
                      shows while it keeps looking for a network it can attach
                      to (3 "denied" needs an explicit reject from the network)
``denied``            stat 3 "registration denied" at once
``after=S``           stat 2 until S seconds have passed, then 1
====================  ==========================================================

No enabled profile, or AT+CFUN=0/4: stat 0. AT+CREG?, AT+CEREG? and AT+C5GREG?
all report the same stat (a simplification: a real LTE-only modem answers
``+C5GREG: 0,0``), as ``+CEREG: <n>,<stat>[,<tac>,<ci>,<AcT>]`` (TS 27.007
§10.1.22; location only with n=2 and registered). ``AT+CEREG=<n>`` (0-2, also
CREG/C5GREG; power-on default 0) with n≥1 makes the modem send ``+CEREG: <stat>``
(n=2: ``+CEREG: <stat>[,<tac>,<ci>,<AcT>]``) when the stat changes: after the
answer to the command that changed it, or on its own at the moment an
``after=S`` timer runs out (the server loop wakes up for it).

Faults (``--fault``, repeatable):

====================  ==========================================================
``echo``              echo stays on whatever ATE0 says
``urc``               unsolicited lines before every reply and between the
                      response line and the final result
``lowercase``         hex in CSIM/CGLA/CCHO answers in lower case
``no-prefix``         CCHO/CGLA/CSIM answers without ``+XXX: `` (FM350 style)
``no-test-forms``     every ``=?`` test command answers ERROR
``error@N``           the N-th APDU-carrying command answers ERROR
``cme=CODE@N``        ... answers ``+CME ERROR: CODE`` (number or text)
``silent@N``          ... gets no answer at all (and never reaches the card)
``delay=S[@N]``       answers to APDU-carrying commands (or only the N-th) come S s late
``garbage``           binary junk (NUL, 0xFF, broken UTF-8) before every reply
``max-apdu=BYTES``    APDUs longer than BYTES → ``+CME ERROR: 3``
``opaque-session``    AT+CCHO hands out 64-bit handles (Sierra MC7455 style)
``refresh``           act on the card's REFRESH after enable/disable (card reset,
                      SIM busy for a moment)
``reenumerate[=S]``   AT+CFUN=0 and AT+CFUN=1,1 make the port vanish as a USB
                      modem re-enumerates: after the OK the pty is closed (the
                      host's reads and writes fail), the ``--link`` is removed,
                      and S seconds later (default 1) a NEW pty appears and the
                      link is pointed at it. The modem is then at power-on
                      defaults (CFUN=1, ATE1, CMEE=0, CEREG=0, card reset).
====================  ==========================================================

"APDU-carrying command" means AT+CSIM and AT+CGLA (not their ``=?`` forms).
AT+CCHO/AT+CCHC are not counted: they manage a channel and carry no APDU of
the caller's; counting them would make ``@N`` depend on the transport's
channel handling. Error and silent faults drop the command before the card
sees it, so the card state is what it was before.

``--baud N`` emulates a UART (8N1: 10 bit times a byte), both ways on absolute
schedules, never faster than the line and not slower either:

* receiving: every byte the host writes takes its 10/baud slot on the modem's receive
  line, from when it reaches the pty or when the line has finished the bytes before it,
  whichever is later; a command is answered no earlier than its terminator has been
  received (an n-byte command written at once: n·10/baud after its first byte arrived).
  Commands run once received, except that with echo off AT+CSIM/CGLA/CCHO/CCHC run as soon
  as the pty holds all of the line, so that the card's work overlaps the receive time;
* sending: reply byte k is released no earlier than start + k·10/baud, start being when
  the reply is ready or when the line has sent the previous reply, whichever is later;
  the last deadlines of a command and of a reply are kept to a few microseconds
  (select's wake-up, ~0.1 ms late, is finished by spinning);
* the ``--stats`` file is rewritten while a reply is on the line when the reply is long
  enough to hide the write (before its last byte leaves), else right after the reply.
"""
from __future__ import annotations

import errno
import json
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

from ..errors import AgentError, UsageError
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
    reenumerate: float | None = None                # seconds the port is gone; None: no re-enumeration


#: The last part of a deadline that matters (a command fully received, the last byte of a
#: reply) is waited for by spinning: select's wake-up comes ~0.1 ms late.
SPIN_S = 0.0004
#: How long the modem answers SIM busy after a REFRESH (fault "refresh").
REFRESH_BUSY_S = 0.5
#: How long the port is gone when the modem re-enumerates (fault "reenumerate").
REENUMERATE_S = 1.0
#: After the answer to the command that makes it re-enumerate, the modem waits this
#: long before the port vanishes (the host can read the OK, as from a real modem).
REENUMERATE_GRACE_S = 0.1

_FLAGS = {"echo": "echo", "urc": "urc", "lowercase": "lowercase", "no-prefix": "no_prefix",
          "no-test-forms": "no_test_forms", "garbage": "garbage", "opaque-session": "opaque_session",
          "refresh": "refresh"}
FAULT_HELP = ("echo, urc, lowercase, no-prefix, no-test-forms, garbage, opaque-session, refresh, error@N, "
              "cme=CODE@N, silent@N, delay=SECONDS[@N], max-apdu=BYTES, reenumerate[=SECONDS]")


def _pos_int(text: str, spec: str) -> int:
    # ASCII digits only, and short: "²".isdigit() is true but int() refuses it, as it refuses 4301 digits
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or int(text) < 1:
        raise UsageError(f"fault {spec[:60]!r}: {text[:20]!r} is not a positive number", code="bad_fault")
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
            f.errors[_pos_int(n, spec)] = ("cme", int(code) if code.isascii() and code.isdigit() and len(code) <= 9
                                           else code)
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
        elif key == "reenumerate" or key.startswith("reenumerate="):
            secs = spec[12:] if "=" in spec else str(REENUMERATE_S)
            try:
                d = float(secs)
            except ValueError:
                d = -1.0
            if not 0 <= d <= 60:
                raise UsageError(f"fault {spec!r}: reenumerate wants seconds (0..60)", code="bad_fault")
            f.reenumerate = d
        elif key.startswith("max-apdu="):
            f.max_apdu = _pos_int(spec[9:], spec)
            if f.max_apdu < 4:
                raise UsageError(f"fault {spec!r}: an APDU has at least 4 bytes", code="bad_fault")
        else:
            raise UsageError(f"unknown modem fault {spec!r}; known: {FAULT_HELP}", code="bad_fault")
    return f


# --------------------------------------------------------------------------- network behaviour per profile

#: TS 27.007 <stat> values the simulated modem reports.
STAT_NOT_REGISTERED, STAT_HOME, STAT_SEARCHING, STAT_DENIED, STAT_ROAMING = 0, 1, 2, 3, 5
NETWORK_HELP = "ICCID:ok|roaming|never|denied|after=SECONDS"
#: Longest after=S accepted (a day): anything longer is a typo, not a test.
MAX_AFTER_S = 86400.0


@dataclass(frozen=True)
class NetworkMode:
    """How the network treats one profile: ``kind`` is ok, roaming, never, denied or after."""

    kind: str = "ok"
    after: float = 0.0

    def stat(self, elapsed: float) -> int:
        """The registration stat ``elapsed`` seconds after the radio started on this profile."""
        if self.kind == "ok":
            return STAT_HOME
        if self.kind == "roaming":
            return STAT_ROAMING
        if self.kind == "denied":
            return STAT_DENIED
        if self.kind == "after" and elapsed >= self.after:
            return STAT_HOME
        return STAT_SEARCHING

    def change_in(self, elapsed: float) -> float | None:
        """Seconds until ``stat`` changes on its own, or None."""
        if self.kind == "after" and elapsed < self.after:
            return self.after - elapsed
        return None


NETWORK_OK = NetworkMode()
_NETWORK_KINDS = ("ok", "roaming", "never", "denied")


def normalise_iccid(text: str) -> str | None:
    """``8944...158`` (18-20 digits, F padding allowed) → the digits; anything else → None."""
    t = str(text).strip().upper().rstrip("F")
    return t if re.fullmatch(r"[0-9]{18,20}", t) else None


def parse_network(specs: Iterable[str] | dict | None) -> dict[str, NetworkMode]:
    """``["8944...158:never", "8944...166:after=5"]`` → {iccid: NetworkMode}.

    A bad ICCID, an unknown mode, a bad or negative number of seconds, or the same
    ICCID given twice with different modes is a UsageError (``bad_network``)."""
    if isinstance(specs, dict):
        return dict(specs)
    out: dict[str, NetworkMode] = {}
    for raw in specs or ():
        spec = str(raw).strip()
        iccid_text, sep, mode_text = spec.partition(":")
        if not sep:
            raise UsageError(f"--network {spec!r}: write {NETWORK_HELP}", code="bad_network")
        iccid = normalise_iccid(iccid_text)
        if iccid is None:
            raise UsageError(f"--network {spec!r}: {iccid_text.strip()!r} is not an ICCID (18 to 20 digits)",
                             code="bad_network")
        m = mode_text.strip().lower()
        if m in _NETWORK_KINDS:
            mode = NetworkMode(m)
        elif m.startswith("after="):
            secs = m[6:].strip()
            try:
                after = float(secs)
            except ValueError:
                raise UsageError(f"--network {spec!r}: after= wants a number of seconds, not {secs!r}",
                                 code="bad_network") from None
            if after != after or after < 0:
                raise UsageError(f"--network {spec!r}: after= wants seconds >= 0, not {secs}", code="bad_network")
            if after > MAX_AFTER_S:
                raise UsageError(f"--network {spec!r}: after= is at most {MAX_AFTER_S:g} s", code="bad_network")
            mode = NetworkMode("after", after)
        else:
            raise UsageError(f"--network {spec!r}: unknown mode {mode_text.strip()!r}; write {NETWORK_HELP}",
                             code="bad_network")
        if out.get(iccid, mode) != mode:
            raise UsageError(f"--network: ICCID {iccid} is given twice with different modes", code="bad_network")
        out[iccid] = mode
    return out


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


#: The commands that reach the card (whose work may overlap their receive time, see --baud).
_CARD_COMMAND = re.compile(rb"\s*AT\+(CSIM|CGLA|CCHO|CCHC)=", re.IGNORECASE)
_CSIM = re.compile(r'^(\d+)\s*,\s*"?([0-9A-Fa-f]*)"?$')
_CGLA = re.compile(r'^"?([0-9A-Za-z]+)"?\s*,\s*(\d+)\s*,\s*"?([0-9A-Fa-f]*)"?$')


#: The registrations the modem answers, and the location it reports for each with n=2
#: (tac/lac, cell id, AcT: 7 E-UTRAN, 11 NR connected to 5GCN).
REG_PREFIXES = ("+CREG", "+CEREG", "+C5GREG")
REG_LOCATION = {"+CREG": ',"1A2B","01C2D3E4",7', "+CEREG": ',"1A2B","01C2D3E4",7',
                "+C5GREG": ',"001A2B","0001C2D3E4",11'}


@dataclass
class Answer:
    """What to send back for one command line."""

    lines: list = field(default_factory=list)   # information response lines
    final: str = "OK"
    after: list = field(default_factory=list)   # URCs after the final result
    silent: bool = False
    delay: float = 0.0
    reenumerate: bool = False                    # the port vanishes after this answer (fault "reenumerate")


@dataclass
class ModemStats:
    """What crossed the line and what reached the card (``sim modem --stats FILE``), so any
    client's run — ours or another LPA's — can be held against the line bound bytes × 10 / baud."""
    bytes_host_to_modem: int = 0
    bytes_modem_to_host: int = 0        # echo, answers and URCs
    echo_bytes: int = 0
    at_commands: int = 0
    csim_commands: int = 0
    cgla_commands: int = 0
    apdus_to_card: int = 0              # every APDU the card executed, GET RESPONSE included
    get_response: int = 0

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class ModemLogic:
    """Parses one command line, drives the card, builds the answer (no I/O)."""

    def __init__(self, card, faults: Faults | None = None, *, network: dict | Iterable[str] | None = None,
                 clock: Callable[[], float] = time.monotonic, latency: float = 0.0):
        self.card = card
        self.stats = ModemStats()
        # Real modems answer AT+CSIM/CGLA after 66-94 ms (a Quectel EC800G measured in the
        # field): on hardware a download's time is dominated by the number of APDUs.
        self.latency = float(latency)
        self.f = faults or Faults()
        self.network = parse_network(network)
        self.clock = clock
        self.echo = True          # factory default E1
        self.cmee = 0
        self.cfun = 1
        self.reg_n = dict.fromkeys(REG_PREFIXES, 0)   # AT+CREG=<n> ... (power-on default 0)
        self.sessions: dict[str, int] = {}    # AT+CCHO session id -> logical channel
        self.apdu_count = 0
        self._urc_i = 0
        self._junk_i = 0
        self._handle_seq = 0
        self.imei = imei_for(card.eid)
        # Fault "refresh": like a real modem, act on the card's REFRESH after an enable or
        # disable with refreshFlag: reset the UICC (all logical channels close) and answer
        # SIM busy for a moment (docs/modem.md §3).
        self._refresh_pending = False
        self._busy_until = 0.0
        # Registration: the profile the radio runs on and since when (see reg_stat).
        self._net_iccid = self._enabled_iccid()
        self._net_since = self.clock()
        self._last_stat = self.reg_stat()
        if hasattr(card, "on_profile_change"):
            card.on_profile_change = self._profile_changed

    def _profile_changed(self, iccid) -> None:
        self._restart_network()          # the radio starts over on the new profile
        isdr = getattr(self.card, "isdr", None)
        if self.f.refresh and getattr(isdr, "last_refresh_flag", False):
            self._refresh_pending = True

    def _after_card(self) -> None:
        if self._refresh_pending:
            self._refresh_pending = False
            self._reset_card()
            self._restart_network()
            self._busy_until = time.monotonic() + REFRESH_BUSY_S

    def power_on(self) -> None:
        """State after a power cycle / USB re-enumeration: factory E1, CMEE=0, CFUN=1,
        no registration URCs, the card reset (channels closed), registration starting over."""
        self.echo, self.cmee, self.cfun = True, 0, 1
        self.reg_n = dict.fromkeys(REG_PREFIXES, 0)
        self._refresh_pending = False
        self._busy_until = 0.0
        self._reset_card()
        self._restart_network()
        self._last_stat = self.reg_stat()

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
        self.stats.apdus_to_card += 1
        if len(apdu) >= 2 and apdu[1] == 0xC0:
            self.stats.get_response += 1
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
        self.stats.at_commands += 1
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
                 "CFUN": ["+CFUN: (0,1,4),(0,1)"], "CGSN": [], "CCID": [], "CREG": ["+CREG: (0-2)"],
                 "CEREG": ["+CEREG: (0-2)"], "C5GREG": ["+C5GREG: (0-2)"]}
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
    def _enabled_iccid(self) -> str | None:
        try:
            iccid = self.card.enabled_iccid()
        except Exception:  # the card must not take the modem down
            log.exception("simulated card failed to say which profile is enabled")
            return None
        return normalise_iccid(iccid) if iccid else None

    def _restart_network(self) -> None:
        self._net_iccid = self._enabled_iccid()
        self._net_since = self.clock()

    def _radio(self) -> tuple[NetworkMode | None, float]:
        """(mode of the profile the radio runs on, seconds since it started), or (None, 0)
        when there is nothing to register with (CFUN 0/4, no enabled profile)."""
        iccid = self._enabled_iccid()
        if iccid != self._net_iccid:      # changed behind our back (a card without the callback)
            self._net_iccid, self._net_since = iccid, self.clock()
        if self.cfun != 1 or not iccid:
            return None, 0.0
        return self.network.get(iccid, NETWORK_OK), max(0.0, self.clock() - self._net_since)

    def reg_stat(self) -> int:
        """TS 27.007 <stat> now (the same for CREG, CEREG and C5GREG)."""
        mode, elapsed = self._radio()
        return STAT_NOT_REGISTERED if mode is None else mode.stat(elapsed)

    def next_change(self) -> float | None:
        """Seconds until the stat changes without any command (an after=S timer), or None."""
        mode, elapsed = self._radio()
        return None if mode is None else mode.change_in(elapsed)

    def poll_urcs(self) -> list[str]:
        """Unsolicited ``+CEREG: <stat>`` ... lines for a stat change since the last call
        (only for the registrations switched on with n>=1)."""
        stat = self.reg_stat()
        if stat == self._last_stat:
            return []
        self._last_stat = stat
        out = []
        for prefix in ("+CEREG", "+C5GREG", "+CREG"):
            n = self.reg_n[prefix]
            if n >= 1:
                loc = self._location(prefix, stat) if n == 2 else ""
                out.append(f"{prefix}: {stat}{loc}")
        return out

    def _location(self, prefix: str, stat: int) -> str:
        if stat not in (STAT_HOME, STAT_ROAMING):
            return ""
        return REG_LOCATION[prefix]

    def _registered(self) -> bool:
        return self.reg_stat() in (STAT_HOME, STAT_ROAMING)

    def _at_cfun(self, arg, query):
        if query:
            return Answer([f"+CFUN: {self.cfun}"])
        parts = [p.strip() for p in (arg or "").split(",")]
        if not parts[0] in ("0", "1", "4") or len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("0", "1")):
            return self._err(4)
        new, rst = int(parts[0]), len(parts) == 2 and parts[1] == "1"
        old = self.cfun
        after = []
        if rst or (new != 0 and self.cfun == 0):
            self._reset_card()
            if rst:
                after = ["RDY", "+CPIN: READY"]
        elif new == 0:
            self.sessions.clear()
        self.cfun = new
        if new == 1 and (old != 1 or rst):
            self._restart_network()          # the radio starts searching again
        reenumerate = self.f.reenumerate is not None and (new == 0 or rst)
        return Answer(after=[] if reenumerate else after, reenumerate=reenumerate)

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

    def _at_c5greg(self, arg, query):
        return self._reg("+C5GREG", arg, query)

    def _reg(self, prefix, arg, query):
        if query:
            n, stat = self.reg_n[prefix], self.reg_stat()
            loc = self._location(prefix, stat) if n == 2 else ""
            return Answer([f"{prefix}: {n},{stat}{loc}"])
        if arg == "":
            arg = "0"                     # TS 27.007: an omitted <n> is 0
        if arg not in ("0", "1", "2"):
            return self._err(4)
        self.reg_n[prefix] = int(arg)
        return Answer()

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
        return self.latency + self.f.delay_at.get(self.apdu_count, self.f.delay)

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
        self.stats.csim_commands += 1
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
        self.stats.cgla_commands += 1
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
    """Serves one ModemLogic on a pseudo-terminal. ``serve()`` blocks until ``stop()``.

    With the fault "reenumerate" the pty is replaced by a new one (``path`` changes,
    ``enumerations`` counts the re-enumerations, ``on_new_port(server)`` is called
    in the serving thread when the new port is there)."""

    def __init__(self, logic: ModemLogic, *, link: str | None = None, baud: int | None = None,
                 stats_path: str | None = None, link_claim=None):
        self.logic = logic
        self._link_lock = None                   # claim_link(): held while this modem owns the link
        self.stats_path = os.path.abspath(stats_path) if stats_path else None
        self.card = logic.card
        self.baud = baud
        self.master, self._slave = -1, -1
        self._open_pty()
        self.link = os.path.abspath(link) if link else None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._line_free = 0.0                    # when the emulated UART finishes the last reply
        self._rx_free = 0.0                      # when its receive side has taken in all bytes read
        # receive schedule of the bytes not yet consumed as commands: [start, count] runs,
        # byte i of a run done receiving at start + (i + 1)·10/baud
        self._rx_runs: list[list] = []
        self._stats_saved: tuple | None = None   # the counters the --stats file holds
        self._stats_cost = 0.0005                # how long rewriting it takes (running estimate)
        self._back_at: float | None = None       # while re-enumerating: when the new port appears
        self.enumerations = 0
        self.on_new_port: Callable[["ModemServer"], None] | None = None
        if self.link:
            try:
                self._link_lock = link_claim or claim_link(self.link)
                self._make_link()
            except BaseException:
                self.link = None
                self._cleanup()
                raise
        elif link_claim is not None:
            link_claim.release(remove=True)

    # --- life cycle -------------------------------------------------------------------
    def _open_pty(self) -> None:
        master, slave = os.openpty()
        try:
            tty.setraw(slave)                    # no line discipline: bytes pass as they are
            os.set_blocking(master, False)
            self.path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self.master, self._slave = master, slave

    def _close_pty(self) -> None:
        """Close our ends: the host's open file on the slave is hung up (reads end, writes fail
        with EIO) and the /dev/pts node goes away."""
        for fd in (self.master, self._slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master, self._slave = -1, -1     # never close a reused descriptor number later

    def _make_link(self) -> None:
        if os.path.lexists(self.link) and not os.path.islink(self.link):
            raise UsageError(f"{self.link} exists and is not a symlink; not replacing it", code="link_exists")
        tmp = f"{self.link}.{os.getpid()}.{threading.get_ident()}.tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)                       # left over from a crash
        os.symlink(self.path, tmp)
        os.replace(tmp, self.link)               # atomically replaces a stale link

    def _remove_link(self) -> None:
        if self.link:
            try:
                if os.path.islink(self.link) and os.readlink(self.link) == self.path:
                    os.unlink(self.link)
            except OSError:
                pass

    def _vanish(self, gone_for: float) -> None:
        """The USB device goes away: the port closes and the link disappears."""
        self._sleep_until(time.monotonic() + REENUMERATE_GRACE_S)
        log.info("simulated modem re-enumerating: %s goes away for %g s", self.path, gone_for)
        self._remove_link()
        self._close_pty()
        self._back_at = time.monotonic() + gone_for

    def _come_back(self) -> None:
        """The device is back: a new pty, the link pointed at it, the modem at power-on state."""
        self._back_at = None
        self._open_pty()
        self._line_free = self._rx_free = 0.0
        self._rx_runs = []
        self.logic.power_on()
        self.enumerations += 1
        if self.link:
            try:
                self._make_link()
            except (OSError, UsageError) as e:
                log.error("cannot point %s at the new port %s: %s", self.link, self.path, e)
        log.info("simulated modem is back on %s", self.path)
        if self.on_new_port is not None:
            try:
                self.on_new_port(self)
            except Exception:
                log.exception("on_new_port callback failed")

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _cleanup(self) -> None:
        self._remove_link()
        if self._link_lock is not None:
            self._link_lock.release(remove=True)
            self._link_lock = None
        self._close_pty()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # --- timing -------------------------------------------------------------------------
    def _sleep_until(self, t: float, *, precise: bool = False) -> None:
        """Return at ``t``, never before. ``precise``: also not noticeably after (select's
        wake-up comes ~0.1 ms late; the last SPIN_S is spun instead)."""
        margin = SPIN_S if precise else 0.0
        while True:
            if self._stop.is_set():
                raise _Stop()
            left = t - time.monotonic()
            if left <= 0:
                return
            if left <= margin:
                while time.monotonic() < t:
                    pass
                return
            select.select([self._wake_r], [], [], left - margin)

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

    def _write(self, data: bytes, *, start: float | None = None, reply: bool = False) -> None:
        """Send ``data``, paced at the baud rate from ``start`` (default: now) or from when
        the line is free, whichever is later: byte k leaves no earlier than t0 + k·10/baud
        (an absolute schedule, so the per-write overheads do not add up). ``reply``: the
        answer that completes a command; the --stats file is rewritten while it is on the
        line if that hides the write."""
        if not data:
            return
        self.logic.stats.bytes_modem_to_host += len(data)
        if not self.baud:
            if start is not None:
                self._sleep_until(start)          # a delayed answer; no-op for one due already
            self._write_now(data)
            return
        per = 10.0 / self.baud                  # 8N1: 10 bit times per byte
        t0 = max(time.monotonic() if start is None else start, self._line_free)
        end = t0 + len(data) * per
        self._line_free = end
        if reply:
            self._save_stats_before(end)
        chunk = max(16, int(self.baud / 10 * 0.004))   # ~4 ms of line time per write
        sent = 0
        while sent < len(data):
            piece = data[sent:sent + chunk]
            sent += len(piece)
            # the last byte of this piece is "on the wire" now
            self._sleep_until(t0 + sent * per, precise=sent >= len(data))
            self._write_now(piece)

    # --- main loop ---------------------------------------------------------------------------
    def _wait(self) -> float:
        """How long the loop may sleep: at most 1 s, less when a registration change is due."""
        due = self.logic.next_change()
        if due is None:
            return 1.0
        return min(1.0, due + 0.005)      # wake just after the change, not just before

    def _send_urcs(self) -> None:
        for u in self.logic.poll_urcs():
            self._write(f"\r\n{u}\r\n".encode())

    def _received(self, n: int, now: float) -> None:
        """``n`` bytes reached the pty at ``now``: put them on the receive line's schedule."""
        start = max(now, self._rx_free)
        self._rx_runs.append([start, n])
        self._rx_free = start + n * 10.0 / self.baud if self.baud else start

    def _take(self, n: int) -> tuple[float, float]:
        """Consume the next ``n`` bytes of the receive schedule: (when the first of them
        started arriving, when the last one had arrived)."""
        per = 10.0 / self.baud if self.baud else 0.0
        runs = self._rx_runs
        first = runs[0][0] if runs else time.monotonic()
        done = first
        while n > 0 and runs:
            run = runs[0]
            k = min(n, run[1])
            done = run[0] + k * per
            n -= k
            if k == run[1]:
                runs.pop(0)
            else:
                run[0], run[1] = done, run[1] - k
        return first, done

    def serve(self) -> None:
        buf = b""
        try:
            while not self._stop.is_set():
                if self._back_at is not None:            # re-enumerating: no port at all
                    self._sleep_until(self._back_at)
                    self._come_back()
                    buf = b""
                    continue
                r, _, _ = select.select([self.master, self._wake_r], [], [], self._wait())
                if self._wake_r in r or self._stop.is_set():
                    break
                self._send_urcs()                        # e.g. an after=S timer ran out
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
                self.logic.stats.bytes_host_to_modem += len(data)
                self._received(len(data), time.monotonic())
                buf += data
                while True:
                    m = re.search(rb"[\r\n]", buf)
                    if m is None:
                        if len(buf) > MAX_INPUT_LINE:       # bounded: junk without a line end
                            buf = b""
                            self._rx_runs.clear()
                        break
                    raw, buf = buf[:m.start()], buf[m.end():]
                    first, done = self._take(m.end())
                    if raw.strip():
                        answer = self._command(raw, first, done)
                        if answer is not None and answer.reenumerate:
                            self._vanish(self.logic.f.reenumerate or 0.0)
                            buf = b""                 # whatever else was sent is lost with the port
                            self._rx_runs.clear()
                            break
                        self._send_urcs()             # a change this command caused
                        self._save_stats()            # unless written with the reply already
        except _Stop:
            pass

    def _command(self, raw: bytes, first: float, done: float) -> Answer | None:
        """One command line: ``first`` is when its first byte started arriving on the
        emulated line, ``done`` when its terminator had arrived."""
        try:
            return self._command_inner(raw, first, done)
        finally:
            self._save_stats()

    def _command_inner(self, raw: bytes, first: float, done: float) -> Answer | None:
        if len(raw) > MAX_INPUT_LINE:
            self._write(b"\r\nERROR\r\n")
            return None
        logic = self.logic
        echo = logic.echo or logic.f.echo       # the state before this command (ATE0 is echoed)
        if echo:
            # A UART echoes each byte as it receives it (full duplex): the echo leaves paced
            # from the command's first byte and ends as the command's last byte arrives.
            logic.stats.echo_bytes += len(raw) + 1
            self._write(raw + b"\r", start=first)
        if self.baud and (echo or not _CARD_COMMAND.match(raw)):
            self._sleep_until(done, precise=True)
        # Else a command for the card runs as soon as all of it is in the pty (which delivers
        # it at once), while the emulated line is still receiving it: the card's computing
        # then hides in line time instead of adding to it. Its answer leaves no earlier than
        # the command's last byte has arrived on the line, as from a real modem.
        line = raw.decode("ascii", "replace")
        answer = logic.handle(line)
        if answer is None or answer.silent:
            return answer
        # a delayed answer (--latency, fault delay) starts on the line that much later
        self._write(logic.render(answer), start=max(done, time.monotonic()) + answer.delay, reply=True)
        return answer

    def _stats_key(self) -> tuple:
        st = self.logic.stats
        return tuple(getattr(st, f) for f in st.__dataclass_fields__)

    def _save_stats_before(self, deadline: float) -> None:
        """Rewrite the --stats file now if that is done well before ``deadline`` (the last
        byte of the reply on the line): the write is then hidden in line time."""
        if (self.stats_path and self._stats_saved != self._stats_key()
                and deadline - time.monotonic() > 1.5 * self._stats_cost + SPIN_S):
            self._save_stats()

    def _save_stats(self) -> None:
        """Rewrite the --stats file (atomically) when the counters changed since it was last
        written: after every command at the latest."""
        if not self.stats_path:
            return
        key = self._stats_key()
        if key == self._stats_saved:
            return
        t = time.monotonic()
        data = json.dumps({**self.logic.stats.to_json(), "baud": self.baud}).encode()
        tmp = f"{self.stats_path}.tmp{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.stats_path)
        except OSError as e:
            log.warning("cannot write modem stats to %s: %s", self.stats_path, e)
            return
        self._stats_saved = key
        self._stats_cost = 0.7 * self._stats_cost + 0.3 * (time.monotonic() - t)


# --------------------------------------------------------------------------- entry point

def serve_modem(state_path, *, link: str | None = None, preload: int = 0, baud: int | None = None,
                faults=(), pki_dir=None, ready: Callable[[ModemServer], None] | None = None,
                euicc_kwargs: dict | None = None, card=None, network=(), stats_path: str | None = None,
                latency: float = 0.0, iot: bool = False) -> None:
    """Serve a simulated modem + eUICC on a new pseudo-terminal until SIGTERM/SIGINT
    (or ``server.stop()``, e.g. from the ``ready`` callback's argument).

    Prints the pty path on stdout (again after every re-enumeration); symlinks it at
    ``link`` (removed on exit). ``network``: ``--network`` specs (see parse_network).
    ``iot``: the card is an SGP.32 IoT eUICC (sim/iot.py; an existing card becomes one).
    ``card`` replaces the SimEuicc (tests)."""
    f = parse_faults(faults)
    net = parse_network(network)
    if baud is not None and baud <= 0:
        raise UsageError("--baud wants a positive number", code="bad_baud")
    # The link first: a modem refused its --link must not create or lock a card state file.
    claim = claim_link(link) if link else None
    opened = None
    try:
        if card is None:
            from .euicc import SimEuicc
            # lock: this modem is the card's one writer while it runs (sim/state.py StateLock).
            card = opened = SimEuicc.open(state_path, preload=preload, pki_dir=pki_dir, lock=True, iot=iot,
                                          **(euicc_kwargs or {}))
        _warn_unknown_iccids(card, net)
        if latency < 0 or latency > 10:
            raise UsageError("--latency wants seconds between 0 and 10", code="bad_latency")
        server = ModemServer(ModemLogic(card, f, network=net, latency=latency), link=link, baud=baud,
                             stats_path=stats_path, link_claim=claim)
    except BaseException:
        if claim is not None:
            claim.release(remove=True)
        if opened is not None:
            opened.close()
        raise
    server.on_new_port = lambda s: print(s.path, flush=True)
    if opened is not None:
        threading.Thread(target=_warm_card, args=(opened,), name="sim-card-warm", daemon=True).start()
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
        if opened is not None:
            opened.close()


def _warm_card(card) -> None:
    """Background: the card's one-time start-up work (SimEuicc.warm) before the host needs it."""
    try:
        card.warm()
    except Exception:  # only an optimisation: the card does the same work on first use
        log.debug("warming the simulated card failed", exc_info=True)


def claim_link(link: str):
    """Take ``--link PATH`` for this modem (a PidLock on PATH.lock, released when it stops).

    The link's directory must exist: it is not created behind the user's back (a typo would
    otherwise put the link somewhere nobody looks). A link that another running simulated
    modem holds is refused, naming that modem; a link left by a modem that is gone (killed,
    crashed: its lock went with it) is replaced."""
    from ..pidlock import Busy, PidLock
    link = os.path.abspath(link)
    parent = os.path.dirname(link)
    if not os.path.isdir(parent):
        raise UsageError(f"the directory {parent} for --link {link} does not exist; create it first "
                         f"(mkdir -p {parent})", code="link_dir_missing")
    if os.path.lexists(link) and not os.path.islink(link):
        raise UsageError(f"{link} exists and is not a symlink; not replacing it", code="link_exists")
    lock = PidLock(link + ".lock")
    try:
        lock.acquire()
    except Busy as e:
        who = e.holder.shown() if e.holder is not None else "another process"
        raise UsageError(f"{link} is the link of another running simulated modem ({who}); pick another --link, "
                         "or stop that modem first", code="link_in_use",
                         details={"pid": e.holder.pid} if e.holder is not None else {}) from None
    except OSError as e:
        raise UsageError(f"cannot create {link}.lock next to the link: {e.strerror or e}",
                         code="bad_file") from None
    return lock


def _warn_unknown_iccids(card, network: dict) -> None:
    """A --network ICCID that is not on the card is allowed (it may be downloaded later),
    but is most often a typo: say so."""
    state = getattr(card, "state", None)
    profiles = getattr(state, "profiles", None)
    if not network or profiles is None:
        return
    try:
        known = {normalise_iccid(p.iccid) for p in profiles}
    except Exception:
        return
    for iccid in network:
        if iccid not in known:
            log.warning("--network names ICCID %s, which is not on the card (yet)", iccid)


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
    p.add_argument("--network", action="append", default=[], metavar=NETWORK_HELP,
                   help="repeatable: how the network treats the profile with ICCID (default ok)")
    p.add_argument("--stats", metavar="FILE", help="keep JSON line/APDU counters in FILE")
    p.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="per AT+CSIM/CGLA answer delay")
    p.add_argument("--iot", action="store_true", help="an SGP.32 IoT eUICC (eIM packages, fallback, rollback)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        serve_modem(args.state, link=args.link, preload=args.preload, baud=args.baud, faults=args.fault,
                    pki_dir=args.pki, network=args.network, stats_path=args.stats, latency=args.latency,
                    iot=args.iot)
    except AgentError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
