"""In-process transport to the simulated eUICC (``--sim``; tests).

No modem in between: ``transmit`` hands the C-APDU to ``SimEuicc.apdu``.
Channels are opened exactly as over AT+CSIM — MANAGE CHANNEL + SELECT through
the shared ``apdu.open_channel_raw`` — so the same card-side code paths run.
"""
from __future__ import annotations


from ..apdu import close_channel_raw, open_channel_raw
from ..errors import TransportError
from .stats import Stats, Trace
from ..logs import get_logger

log = get_logger(__name__)


class DirectTransport:
    name = "direct"

    def __init__(self, sim_euicc, trace: Trace | None = None, *, quirks: dict | None = None):
        self.card = sim_euicc
        self.trace = trace
        self.quirks: dict = dict(quirks or {})
        self.stats = Stats()
        self._channels: set[int] = set()
        self._closed = False

    def transmit(self, apdu: bytes, *, timeout: float | None = None) -> bytes:
        if self._closed:
            raise TransportError("the simulated eUICC transport is closed", code="port_closed")
        apdu = bytes(apdu)
        limit = self.quirks.get("max_apdu")
        if limit and len(apdu) > limit:
            raise TransportError(f"APDU of {len(apdu)} bytes is longer than the configured limit ({limit} bytes, "
                                 "quirk max_apdu)", code="apdu_too_long")
        self._trace("APDU>", apdu)
        self.stats.apdus += 1
        self.stats.bytes_out += len(apdu)
        rapdu = bytes(self.card.apdu(apdu))
        self.stats.bytes_in += len(rapdu)
        self._trace("APDU<", rapdu)
        return rapdu

    def open_channel(self, aid: bytes) -> int:
        ch = open_channel_raw(self.transmit, bytes(aid))
        self._channels.add(ch)
        return ch

    def close_channel(self, channel: int) -> None:
        self._channels.discard(channel)
        if not self._closed:
            close_channel_raw(self.transmit, channel)

    def close(self) -> None:
        if self._closed:
            return
        try:
            for ch in sorted(self._channels):
                self.close_channel(ch)
        except BaseException as e:  # noqa: BLE001 - never raise from close
            log.debug("closing channels failed: %r", e)
        self._channels.clear()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _trace(self, direction: str, data) -> None:
        if self.trace:
            try:
                self.trace(direction, data)
            except Exception:
                pass
