"""One session with the eUICC: transport (modem AT port or the in-process
simulator) → ISD-R logical channel → ES10 client, plus what the modem itself
tells (IMEI, make, model, registration).

The CLI opens one for a command; the daemon's card worker keeps one open
across jobs and reconnects it when the modem went away (re-enumeration after
a profile switch, docs/modem.md §3).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..errors import AgentError, TransportError, UsageError
from ..logs import get_logger

log = get_logger(__name__)


@dataclass
class CardSettings:
    """How to reach the eUICC. Plain values: the CLI, the daemon and the tests build it."""
    device: str | None = None
    sim: str | None = None                  # simulated eUICC state file (in-process), instead of a modem
    transport: str = "auto"
    timeout: float = 10.0
    long_timeout: float = 300.0
    segment_size: int = 255
    baud: int = 115200
    aids: list[bytes] = field(default_factory=list)
    quirks: dict = field(default_factory=dict)
    lock: bool = True                       # False: a parent process holds the port's lock for us
    trace: object = None                    # callable(direction, data) or None

    def validate(self) -> "CardSettings":
        from ..transport.base import ISDR_AID, MAX_SEGMENT
        for name, v in (("--timeout", self.timeout), ("--long-timeout", self.long_timeout)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
                raise UsageError(f"{name} must be a number of seconds above 0 (at most 3600), not {v!r}",
                                 code="bad_timeout")
        if isinstance(self.segment_size, bool) or not isinstance(self.segment_size, int) \
                or not 1 <= self.segment_size <= MAX_SEGMENT:
            raise UsageError(f"--segment-size must be 1..{MAX_SEGMENT} bytes (STORE DATA Lc), not "
                             f"{self.segment_size!r}", code="bad_segment_size")
        if isinstance(self.baud, bool) or not isinstance(self.baud, int) or self.baud <= 0:
            raise UsageError(f"--baud must be a positive number, not {self.baud!r}", code="bad_baud")
        aids = []
        for a in self.aids or []:
            if isinstance(a, (bytes, bytearray)):
                b = bytes(a)
                shown = b.hex().upper()
            else:
                shown = str(a).strip().replace(" ", "")
                try:
                    b = bytes.fromhex(shown)
                except ValueError:
                    b = b""
            if not 5 <= len(b) <= 16:
                raise UsageError(f"--aid {shown!r} is not an AID (5 to 16 bytes of hex, e.g. "
                                 f"{ISDR_AID.hex().upper()})", code="bad_aid")
            aids.append(b)
        self.aids = aids or [ISDR_AID]
        self.timeout, self.long_timeout = float(self.timeout), float(self.long_timeout)
        if self.sim and self.device:
            raise UsageError("use either --device (a modem's AT port) or --sim (simulated eUICC), not both")
        if not self.sim and not self.device:
            raise UsageError("no modem given: pass --device /dev/ttyUSBx (the modem's AT port) "
                             "or --sim STATEFILE for the simulated eUICC", code="no_device")
        return self


#: The module each ``transport`` setting has the session start import (cgla.py imports csim.py).
_TRANSPORT_MODULES = {"auto": ("agent.transport.csim", "agent.transport.cgla"),
                      "cgla": ("agent.transport.csim", "agent.transport.cgla"), "csim": ("agent.transport.csim",)}


class Card:
    """Transport + ISD-R session + ES10 client. ``open()``/``close()`` or a ``with`` block."""

    def __init__(self, settings: CardSettings, cancel=None, *, read_only: bool = False,
                 preload: tuple[str, ...] = (), session_preload: tuple[str, ...] = ()):
        self.settings = settings
        # Modules the operation imports next: imported while the modem answers (agent/preload.py);
        # ``session_preload`` once the ISD-R session is open.
        self.preload = preload
        self.session_preload = session_preload
        self.cancel = cancel            # CancelToken the AT port watches while it waits
        # The operation only reads: a simulated card's state file held by another writer
        # (`sim modem --state`) may then be read as a snapshot (sim/state.py).
        self.read_only = read_only
        self._sim = None
        self.transport = None
        self.isdr = None
        self.es10 = None
        self._eid: str | None = None
        self._modem_info = None
        self._steps = None              # the port's pending idle work (agent/preload.py)

    # --- life cycle -------------------------------------------------------------
    def open(self) -> "Card":
        s = self.settings
        if s.sim:
            from ..sim.euicc import SimEuicc
            from ..transport.direct import DirectTransport
            self._sim = SimEuicc.open(s.sim, lock=s.lock, read_only_if_busy=self.read_only)
            t = DirectTransport(self._sim, trace=s.trace)
        else:
            from ..transport.open import open_transport
            work = None
            if self.preload:
                from ..preload import Steps
                # the transport's module first: the session start picks it after two probes
                self._steps = Steps(_TRANSPORT_MODULES.get(s.transport, ()) + tuple(self.preload))
                work = self._steps or None
                self.preload = ()       # once: a reconnect finds them imported
            t = open_transport(s.device, transport=s.transport, timeout=s.timeout, long_timeout=s.long_timeout,
                               quirks=dict(s.quirks) or None, trace=s.trace, baud=s.baud, lock=s.lock,
                               idle=work)
            if self.cancel is not None:
                t.port.watch(self.cancel)
        from ..apdu import Isdr
        from ..es10 import Es10
        try:
            isdr = Isdr(t, aids=s.aids, segment_size=s.segment_size, timeout=s.timeout).open()
        except BaseException:
            t.close()
            self._release_sim()
            raise
        self.transport, self.isdr = t, isdr
        self.es10 = Es10(isdr, long_timeout=s.long_timeout)
        if self.session_preload:
            self.while_waiting(self.session_preload)
            self.session_preload = ()
        return self

    def close(self) -> None:
        isdr, t = self.isdr, self.transport
        self.isdr = self.transport = self.es10 = None
        self._modem_info = None
        try:
            if isdr is not None:
                isdr.close()
        finally:
            if t is not None:
                t.close()
            self._release_sim()

    def _release_sim(self) -> None:
        sim, self._sim = self._sim, None
        if sim is not None:
            sim.close()

    def while_waiting(self, steps) -> None:
        """Run ``steps`` (agent/preload.py), after any still pending, while the modem is being
        waited for; nothing for the in-process simulator, where nothing waits (the operation
        imports and sets up what it needs when it needs it)."""
        port = self.at_port
        if port is not None:
            if self._steps is None:
                from ..preload import Steps
                self._steps = Steps()
            self._steps.add(steps)
            if self._steps:
                port.when_idle(self._steps)

    def watch(self, token) -> None:
        """A new operation with its own CancelToken (the daemon's worker, job by job)."""
        self.cancel = token
        if self.at_port is not None:
            self.at_port.watch(token)

    @property
    def is_open(self) -> bool:
        return self.es10 is not None

    @property
    def healthy(self) -> bool:
        """Open, and the modem port has not been lost (a worker must not reuse a dead port)."""
        port = self.at_port
        return self.is_open and (port is None or not (port.closed or port.dead))

    def __enter__(self) -> "Card":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def reconnect(self, *, within: float = 60.0, cancel=None, pause: float = 0.5) -> None:
        """Close everything and open again, waiting while the port is gone (a modem
        re-enumerates on USB after AT+CFUN or a SIM reset) or the card is busy.

        Uses the configured path, so a /dev/serial/by-id/ link keeps working when the
        kernel gives the modem a new ttyUSBn."""
        self.close()
        deadline = time.monotonic() + within
        while True:
            if cancel is not None:
                cancel.check()
            try:
                if self.settings.device and not os.path.exists(self.settings.device):
                    raise TransportError(f"modem port {self.settings.device} is not there (yet)",
                                         code="device_not_found")
                self.open()
                return
            except (TransportError,) + _card_errors() as e:
                if time.monotonic() + pause > deadline:
                    raise TransportError(f"the modem/eUICC did not come back within {within:.0f} s: {e.message}",
                                         code="card_not_back") from e
                log.info("card not reachable yet (%s); retrying", e.message)
                time.sleep(pause)

    # --- what the card and modem tell ---------------------------------------------------
    @property
    def eid(self) -> str:
        if self._eid is None:
            self._eid = self.es10.get_eid()
        return self._eid

    @property
    def at_port(self):
        """The modem's AtPort, or None for the in-process simulator."""
        return getattr(self.transport, "port", None)

    def modem_info(self):
        """IMEI, active ICCID, make and model from the modem (None for the in-process simulator)."""
        if self._modem_info is None:
            info = getattr(self.transport, "modem_info", None)
            if info is None:
                return None
            try:
                self._modem_info = info()
            except AgentError:
                return None
        return self._modem_info

    def imei(self) -> str | None:
        """The modem's IMEI for DeviceInfo, or None (with a warning) when it is not a usable IMEI.
        Only the IMEI is asked for (AT+CGSN) unless the modem's identity was read already: a
        download needs nothing else, and each further AT command is a round trip."""
        from ..ids import imei_to_bytes
        if self._modem_info is not None:
            imei = self._modem_info.imei
        elif self.at_port is not None:
            from ..transport.at import read_imei
            try:
                imei = read_imei(self.at_port)
            except AgentError:
                return None
        else:
            return None
        if not imei:
            return None
        try:
            imei_to_bytes(imei)
        except AgentError:
            log.warning("the modem's IMEI %r is not usable; DeviceInfo goes without it", imei)
            return None
        return imei


def _card_errors() -> tuple:
    from ..errors import StatusWordError
    return (StatusWordError,)
