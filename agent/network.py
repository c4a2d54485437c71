"""Network registration: parsing ``+CEREG`` / ``+CREG`` / ``+C5GREG`` lines (I/O free)
and two small helpers for the agent's checked profile switch.

TS 27.007 answers a read command in the *solicited* form, whose first number is
the URC mode ``<n>`` the command set::

    +CEREG: <n>,<stat>[,[<tac>],[<ci>],[<AcT>][,<cause_type>,<reject_cause>][,...]]
    +CREG: <n>,<stat>[,[<lac>],[<ci>],[<AcT>][,...]]
    +C5GREG: <n>,<stat>[,[<tac>],[<ci>],[<AcT>],[<Allowed_NSSAI_length>],[<Allowed_NSSAI>][,...]]

and sends changes *unsolicited*, without ``<n>``::

    +CEREG: <stat>[,[<tac>],[<ci>],[<AcT>][,...]]

The two cannot be told apart from the text alone (``+CEREG: 1,2`` is n=1 stat=2
or stat=1 with a bad tac), so the caller says which it has: the answer to the
read command it sent (``solicited=True``) or a line that arrived on its own.

``<stat>``: 0 not registered, not searching; 1 registered, home; 2 not
registered, searching; 3 registration denied; 4 unknown; 5 registered,
roaming; 6-10 SMS-only / CSFB-not-preferred variants; 11 emergency only.
``Registration.registered`` counts 1 and 5 only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ProtocolError, TimeoutError_, TransportError
from .transport.at import PortLostError
from .logs import get_logger

log = get_logger(__name__)

#: Registrations we read, in the order they are asked and preferred on a tie.
TECHS = ("CEREG", "C5GREG", "CREG")
STAT_TEXT = {
    0: "not registered", 1: "registered (home)", 2: "searching", 3: "registration denied", 4: "unknown",
    5: "registered (roaming)", 6: "registered for SMS only (home)", 7: "registered for SMS only (roaming)",
    8: "emergency services only", 9: "registered, CSFB not preferred (home)",
    10: "registered, CSFB not preferred (roaming)", 11: "emergency services only",
}
#: Registered with a data path (TS 27.007 §10.1.22): home, roaming, and the EPS
#: "CSFB not preferred" registrations 9/10 (data works, only voice fallback differs).
#: SMS-only (6/7) and emergency-only (8/11) registrations do not carry data: not attached.
REGISTERED = (1, 5, 9, 10)
ROAMING = (5, 7, 10)
#: The longest line we try to parse: a registration line with every optional field
#: (NSSAI lists included) is far shorter.
MAX_LINE = 1024
MAX_FIELDS = 32
#: How "informative" an unregistered stat is when nothing is registered: a denial
#: says most, then searching; 0 (not even searching) least.
_RANK = {3: 6, 2: 5, 8: 4, 11: 4, 6: 3, 7: 3, 9: 3, 10: 3, 4: 1, 0: 0}

_PREFIX = re.compile(r"^\s*\+(CEREG|CREG|C5GREG)\s*:\s*", re.I | re.A)
_INT = re.compile(r"[0-9]{1,3}", re.A)
_HEX = re.compile(r"[0-9A-Fa-f]{1,16}", re.A)


@dataclass(frozen=True)
class Registration:
    """One registration report. ``tac`` is the LAC for CREG; tac/ci are upper-case hex."""

    tech: str                      # 'CEREG' | 'CREG' | 'C5GREG'
    stat: int
    n: int | None = None           # the URC mode (solicited form only)
    tac: str | None = None
    ci: str | None = None
    act: int | None = None
    extra: tuple = field(default=())   # the fields after <AcT>, as sent (reject cause, PSM timers, NSSAI ...)

    @property
    def registered(self) -> bool:
        return self.stat in REGISTERED

    @property
    def roaming(self) -> bool:
        return self.stat in ROAMING

    @property
    def searching(self) -> bool:
        return self.stat == 2

    @property
    def denied(self) -> bool:
        return self.stat == 3

    @property
    def stat_text(self) -> str:
        return STAT_TEXT.get(self.stat, f"stat {self.stat}")

    def describe(self) -> str:
        """For people: ``searching (+CEREG stat 2)``, ``registered (home) (+CEREG stat 1, tac 1A2B)``."""
        where = f", tac {self.tac}" if self.tac else ""
        return f"{self.stat_text} (+{self.tech} stat {self.stat}{where})"

    def to_json(self) -> dict:
        d = {"tech": self.tech, "stat": self.stat, "stat_text": self.stat_text, "registered": self.registered,
             "roaming": self.roaming}
        for k in ("n", "tac", "ci", "act"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.extra:
            d["extra"] = list(self.extra)
        return d


# --------------------------------------------------------------------------- parsing (no I/O)

def _bad(line: str, why: str) -> ProtocolError:
    shown = line if len(line) <= 80 else line[:77] + "..."
    return ProtocolError(f"cannot parse the registration line {shown!r}: {why}", code="bad_registration",
                         details={"line": line[:200]})


def _fields(payload: str, line: str) -> list[str]:
    """Comma-separated fields; a field may be "quoted" (quotes removed, no comma inside)."""
    out: list[str] = []
    i, n = 0, len(payload)
    while True:
        while i < n and payload[i] in " \t":
            i += 1
        if i < n and payload[i] == '"':
            j = payload.find('"', i + 1)
            if j < 0:
                raise _bad(line, "unbalanced quote")
            out.append(payload[i + 1:j])
            i = j + 1
            while i < n and payload[i] in " \t":
                i += 1
            if i < n and payload[i] != ",":
                raise _bad(line, "text after a quoted field")
        else:
            j = payload.find(",", i)
            if j < 0:
                j = n
            tok = payload[i:j].strip(" \t")
            if '"' in tok:
                raise _bad(line, "stray quote")
            out.append(tok)
            i = j
        if len(out) > MAX_FIELDS:
            raise _bad(line, f"more than {MAX_FIELDS} fields")
        if i >= n:
            return out
        i += 1                      # the comma


def _int(text: str, line: str, what: str, hi: int) -> int:
    if not _INT.fullmatch(text):
        raise _bad(line, f"{what} {text!r} is not a number")
    v = int(text)
    if v > hi:
        raise _bad(line, f"{what} {v} is out of range (0-{hi})")
    return v


def _hex(text: str, line: str, what: str) -> str | None:
    if text == "":
        return None
    if not _HEX.fullmatch(text):
        raise _bad(line, f"{what} {text!r} is not hex")
    return text.upper()


def parse_registration(line: str, *, solicited: bool) -> Registration:
    """``+CEREG: 0,1`` (solicited) / ``+CEREG: 1,"1A2B","01C2D3E4",7`` (unsolicited) → Registration.

    ``solicited``: the line answers a read command (``AT+CEREG?``), so its first number
    is ``<n>``; otherwise it is a URC and starts with ``<stat>``. Anything malformed
    raises ProtocolError (code ``bad_registration``) naming the line."""
    if not isinstance(line, str):
        raise ProtocolError(f"registration line must be text, not {type(line).__name__}", code="bad_registration")
    if len(line) > MAX_LINE:
        raise _bad(line, f"longer than {MAX_LINE} characters")
    m = _PREFIX.match(line)
    if not m:
        raise _bad(line, "expected +CEREG:, +CREG: or +C5GREG:")
    tech = m.group(1).upper()
    fields = _fields(line[m.end():].rstrip(" \t\r\n"), line)
    n = None
    if solicited:
        if len(fields) < 2:
            raise _bad(line, "an answer to the read command has <n>,<stat>")
        n = _int(fields.pop(0), line, "<n>", 9)
    stat = _int(fields[0], line, "<stat>", 11)
    rest = fields[1:]
    tac = _hex(rest[0], line, "<tac>" if tech != "CREG" else "<lac>") if len(rest) > 0 else None
    ci = _hex(rest[1], line, "<ci>") if len(rest) > 1 else None
    act = None
    if len(rest) > 2 and rest[2] != "":
        act = _int(rest[2], line, "<AcT>", 255)
    return Registration(tech=tech, stat=stat, n=n, tac=tac, ci=ci, act=act, extra=tuple(rest[3:]))


def best_registration(regs) -> Registration | None:
    """Registered wins (home before roaming, then the order given); otherwise the most
    informative report: denied, searching ..., with location info before without."""
    regs = [r for r in regs if r is not None]
    if not regs:
        return None

    def key(ir):
        i, r = ir
        if r.registered:
            return (2, 1 if r.stat == 1 else 0, 0, -i)
        return (0, _RANK.get(r.stat, 2), 1 if (r.tac or r.ci) else 0, -i)
    return max(enumerate(regs), key=key)[1]


# --------------------------------------------------------------------------- helpers over an AtPort

def _read_one(port, tech: str, timeout: float | None) -> Registration | None:
    reply = port.try_command(f"AT+{tech}?", prefix=f"+{tech}:", timeout=timeout)
    if reply is None:                 # ERROR / CME: this modem has no such registration; normal
        return None
    # A URC (+CEREG: <stat>) may arrive among the answer's lines: the answer is the
    # last line that parses in the solicited form.
    for payload in reversed(reply.lines):
        try:
            return parse_registration(f"+{tech}: {payload}", solicited=True)
        except ProtocolError as e:
            log.debug("AT+%s?: %s", tech, e.message)
    if reply.lines:
        log.warning("AT+%s? answered %r, which is not a registration report", tech, reply.lines[-1][:80])
    return None


def query_registration(port, *, timeout: float | None = None) -> Registration | None:
    """Ask AT+CEREG?, AT+C5GREG?, AT+CREG? (a modem answering ERROR to one is normal:
    it is skipped) and return the best answer (see ``best_registration``), or None
    when none gave one. Raises the port's TransportError (e.g. PortLostError) if the
    port goes away."""
    return best_registration([_read_one(port, tech, timeout) for tech in TECHS])


def cfun_cycle(port, timeout: float = 15.0) -> None:
    """Radio off and on again: AT+CFUN=0, then AT+CFUN=1 (the modem drops and redoes its
    registration and re-reads the card).

    A modem may reset or re-enumerate on AT+CFUN=0 (USB modems do): the port then
    vanishes and ``agent.transport.at.PortLostError`` is raised — close the port, wait
    for the device path to come back, reopen it (the modem is then in CFUN=1). If
    AT+CFUN=0 times out, AT+CFUN=1 is still sent (a modem left with its radio off is
    the worst outcome) before the time-out is raised. ModemError if the modem refuses."""
    try:
        port.command("AT+CFUN=0", timeout=timeout)
    except TimeoutError_:
        try:
            port.command("AT+CFUN=1", timeout=timeout)
        except PortLostError:
            raise
        except TransportError as e:
            log.debug("AT+CFUN=1 after a timed-out AT+CFUN=0: %s", e)
        raise
    port.command("AT+CFUN=1", timeout=timeout)
