"""Open a modem's AT port as an ApduTransport (docs/modem.md §6 items 2–3).

1. open the port exclusively + lock file, ``AT`` until ``OK``, ``ATE0``, ``AT+CMEE=1``;
2. read AT+CGMI / AT+CGMM and look up the quirks table, then apply forced quirks;
3. choose the way of carrying APDUs: forced, or ``auto``: probe ``AT+CCHO=?`` /
   ``AT+CGLA=?``; if a test form is refused (FG132, EM05-G, FM350 answer ERROR
   or nothing) try the real ``AT+CCHO`` on the ISD-R; CGLA when that works,
   AT+CSIM otherwise;
4. optionally send TERMINAL CAPABILITY (quirk ``terminal_capability``).
"""
from __future__ import annotations

import re

from .base import ISDR_AID
from ..errors import TimeoutError_, UsageError
from . import quirks as quirks_mod
from .at import AtPort, ModemError, ModemInfo, Trace, read_modem_info
from ..logs import get_logger

log = get_logger(__name__)

TRANSPORTS = ("auto", "csim", "cgla")
#: Deadline for capability probes: a silent "=?" must not cost the full command deadline.
PROBE_DEADLINE = 2.0


def open_transport(device: str, *, transport: str = "auto", timeout: float = 10.0, long_timeout: float = 300.0,
                   quirks: dict | None = None, trace: Trace | None = None, baud: int = 115200,
                   lock_dir: str | None = None, lock: bool = True, idle=None):
    """The modem at ``device`` as an ApduTransport (CsimTransport or CglaTransport).

    ``idle``: work for the port's waits from the session start on (AtPort.when_idle).

    Raises TransportError (``device_not_found``, ``port_lost`` ...), PortBusyError,
    TimeoutError_ (modem silent), UsageError (bad argument or quirk)."""
    transport = (transport or "auto").lower()
    if transport not in TRANSPORTS:
        raise UsageError(f"unknown transport {transport!r}: use auto, csim or cgla", code="bad_transport")
    if not timeout or timeout <= 0 or not long_timeout or long_timeout <= 0:
        raise UsageError("timeouts must be positive numbers of seconds", code="bad_timeout")
    user_quirks = quirks_mod.normalise(quirks)          # validate before touching the port
    port = AtPort(device, baud=baud or 115200, timeout=timeout, trace=trace, lock_dir=lock_dir, lock=lock)
    port.when_idle(idle)
    try:
        port.start()
        manufacturer = port.query("AT+CGMI", "+CGMI:")
        model = port.query("AT+CGMM", "+CGMM:")
        q = quirks_mod.effective(manufacturer, model, user_quirks)
        kind, spare = (transport, None) if transport != "auto" else choose_transport(port, q)
        log.info("modem %s %s: using AT+%s", manufacturer, model, "CGLA" if kind == "cgla" else "CSIM")
        from .cgla import CglaTransport
        from .csim import CsimTransport
        cls = CglaTransport if kind == "cgla" else CsimTransport
        t = cls(port, quirks=q, timeout=timeout, long_timeout=long_timeout, trace=trace,
                manufacturer=manufacturer, model=model)
        if spare is not None:
            t.adopt(ISDR_AID, spare)     # the probe's session: used, not leaked
        if q.get("terminal_capability"):
            t.send_terminal_capability()
        return t
    except BaseException:
        port.close()
        raise


def choose_transport(port: AtPort, q: dict) -> tuple[str, str | None]:
    """(``cgla`` or ``csim``, session id the probe left open on the ISD-R or None)
    for ``--transport auto``."""
    probe = min(port.timeout, PROBE_DEADLINE)
    if not q.get("no_test_forms"):
        if port.try_command("AT+CCHO=?", timeout=probe) and port.try_command("AT+CGLA=?", timeout=probe):
            return "cgla", None
    # A refused (or silent) test form is not proof: try the real thing on the ISD-R.
    # The session it opens is handed to the transport rather than closed, because some
    # modems cannot close it (no AT+CCHC on Sierra EM9191, CCHC=2..4 refused on FM350).
    try:
        r = port.command(f'AT+CCHO="{ISDR_AID.hex().upper()}"', prefix="+CCHO:", bare="hex", timeout=probe)
    except (ModemError, TimeoutError_) as e:
        return _csim_fallback(port, q, f"AT+CCHO does not work here ({e.message})"), None
    vals = r.lines or r.bare
    sid = vals[0].strip().strip('"').strip() if vals else ""
    if not re.fullmatch(r"[0-9A-Za-z]{1,32}", sid):
        return _csim_fallback(port, q, f"AT+CCHO answered no usable session id ({sid[:40]!r})"), None
    return "cgla", sid


def _csim_fallback(port: AtPort, q: dict, why: str) -> str:
    # AT+CSIM is the last resort whatever its test form says; the probe only
    # makes the log useful when it fails too.
    if not q.get("no_test_forms") and port.try_command("AT+CSIM=?", timeout=min(port.timeout, PROBE_DEADLINE)) is None:
        log.warning("%s, and the modem refuses AT+CSIM=? too; trying AT+CSIM anyway", why)
    else:
        log.info("%s; using AT+CSIM", why)
    return "csim"


def modem_info(device: str, *, timeout: float = 10.0, baud: int = 115200, trace: Trace | None = None,
               lock_dir: str | None = None) -> ModemInfo:
    """Open the port, read IMEI / ICCID / manufacturer / model / revision, close it."""
    with AtPort(device, baud=baud or 115200, timeout=timeout, trace=trace, lock_dir=lock_dir) as port:
        port.start()
        return read_modem_info(port)

