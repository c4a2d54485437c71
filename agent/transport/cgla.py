"""APDUs over AT+CCHO / AT+CGLA / AT+CCHC (TS 27.007 §8.45, §8.43, §8.46; docs/modem.md §1.2).

The modem opens the logical channel itself (MANAGE CHANNEL + SELECT) and
hands back a *session id*. That id is an opaque string — a Sierra MC7455
answers ``000000000385a7cf`` — so it is never turned into a number blindly:

* if it is a small integer 1..19 it is also put into the CLA channel bits
  (what Quectel EG25 expects; quirk ``cgla_channel_in_cla``),
* otherwise CLA keeps channel bits 0 and, per §8.45, the MT patches them.

APDUs for the basic channel (no session) go through AT+CSIM.
"""
from __future__ import annotations

import re

from ..errors import ProtocolError, StatusWordError, TimeoutError_
from .at import ModemError
from .csim import CLOSE_DEADLINE, CsimTransport, OpenChannel, channel_of
from ..logs import get_logger

log = get_logger(__name__)

_SID = re.compile(r"^[0-9A-Za-z]{1,32}$")


class CglaTransport(CsimTransport):
    name = "cgla"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._spare: dict[bytes, str] = {}

    def adopt(self, aid: bytes, sid: str) -> None:
        """Take over a session the transport probe opened on ``aid`` (open.choose_transport)."""
        self._spare[bytes(aid)] = sid

    def open_channel(self, aid: bytes) -> int:
        self._check_open()
        aid = bytes(aid)
        sid = self._spare.pop(aid, None) or self._ccho(aid, self.timeout)
        ch = self._cla_channel(sid)
        old = self._channels.get(ch)
        if old is not None:
            log.warning("a second session (%s) maps to channel %d; closing the earlier one (%s)", sid, ch, old.sid)
            self._cchc(old.sid)
        self._channels[ch] = OpenChannel(aid, ch, sid)
        return ch

    def close(self) -> None:
        for sid in self._spare.values():          # a probe session never used
            if not (self.port.closed or self.port.dead):
                self._cchc(sid)
        self._spare.clear()
        super().close()

    def close_channel(self, channel: int) -> None:
        st = self._channels.pop(channel, None)
        if st is None or self.port.closed or self.port.dead:
            return
        self._cchc(st.sid)

    @property
    def session_ids(self) -> list[str]:
        return [st.sid for st in self._channels.values()]

    # --- AT commands ----------------------------------------------------------------
    def _ccho(self, aid: bytes, timeout: float) -> str:
        try:
            r = self.port.command(f'AT+CCHO="{aid.hex().upper()}"', prefix="+CCHO:", bare="hex", timeout=timeout)
        except TimeoutError_:
            raise
        except ModemError as e:
            # comma/lpac experience: any CCHO error on the ISD-R AID means "not here"
            # (docs/modem.md §2.5). 6A88 lets the caller try another AID.
            raise StatusWordError(0x6A88, f"the modem could not open a logical channel to {aid.hex().upper()}: "
                                  f"{e.message} (no such application on the card, or this modem's AT+CCHO "
                                  "does not work: try --transport csim)", code="channel_open_refused") from None
        sid = self._value(r, "+CCHO").strip().strip('"').strip()
        if not _SID.match(sid):
            raise ProtocolError(f"cannot use the AT+CCHO session id {sid[:40]!r}", code="bad_response")
        return sid

    def _cchc(self, sid: str | None) -> None:
        if sid is None or self.quirks.get("no_cchc"):
            return
        try:
            self.port.command(f"AT+CCHC={sid}", timeout=min(self.timeout, CLOSE_DEADLINE), resync=False)
        except Exception as e:  # noqa: BLE001 - closing is best effort (FM350 refuses CCHC=2..4)
            log.debug("AT+CCHC=%s failed: %s", sid, e)

    def _cla_channel(self, sid: str) -> int:
        """The channel number to put in CLA for this session (0 = let the MT patch it)."""
        if self.quirks.get("cgla_channel_in_cla") is False:
            return 0
        if sid.isdigit() and len(sid) <= 2 and 1 <= int(sid) <= 19:
            return int(sid)
        return 0

    # --- carrying ---------------------------------------------------------------------
    def _session(self, apdu: bytes) -> OpenChannel | None:
        ch = channel_of(apdu[0])
        for st in self._channels.values():
            if st.actual == ch:
                return st
        return None

    def _carry(self, apdu: bytes, timeout: float) -> bytes:
        st = self._session(apdu)
        if st is None:
            return self._csim(apdu, timeout)     # basic channel: AT+CGLA needs a session
        hx = apdu.hex().upper()
        self.stats.apdus += 1
        r = self.port.command(f'AT+CGLA={st.sid},{len(hx)},"{hx}"', prefix="+CGLA:", bare="hex", timeout=timeout)
        return self._rapdu(r, "+CGLA")

    def _reopen(self, st: OpenChannel) -> None:
        self._cchc(st.sid)
        st.sid = self._ccho(st.aid, self.timeout)
        st.actual = self._cla_channel(st.sid)
