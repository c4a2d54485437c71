"""APDUs over AT+CSIM (TS 27.007 §8.17; docs/modem.md §1.1).

``AT+CSIM=<len>,"<hex>"`` carries any APDU on any channel, so logical
channels are opened with real MANAGE CHANNEL and SELECT APDUs (the shared
``apdu.open_channel_raw``, the same code the in-process transport uses) and the
channel number travels in CLA (``apdu.cla_for``).

``CsimTransport`` also holds what both AT transports share (AT+CGLA in
cgla.py builds on it): APDU size check, counters, tracing, re-opening the
logical channel after a time-out, and a close that never raises.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..apdu import cla_for, close_channel_raw, open_channel_raw
from ..errors import ProtocolError, TimeoutError_, TransportError
from . import quirks as quirks_mod
from .at import AtPort, ModemError, Reply, Trace, parse_len_hex, read_modem_info, ModemInfo
from ..logs import get_logger

log = get_logger(__name__)

#: Deadline for the best-effort clean-up commands (channel close on exit).
CLOSE_DEADLINE = 2.0


def channel_of(cla: int) -> int:
    """The logical channel a CLA byte addresses (ISO 7816-4 §5.4.1)."""
    if cla & 0x40:                     # further interindustry: channels 4..19
        return 4 + (cla & 0x0F)
    return cla & 0x03


def rechannel(cla: int, channel: int) -> int:
    """The same class byte addressed to another channel."""
    base = (cla & 0x90) if cla & 0x40 else (cla & 0x9C)
    return cla_for(base, channel)


@dataclass
class OpenChannel:
    """A logical channel this transport opened (the ISD-R's)."""
    aid: bytes
    actual: int            # the channel now carried in CLA (differs from the caller's after a re-open)
    sid: str | None = None  # AT+CCHO session id (opaque string), CGLA only


class CsimTransport:
    """ApduTransport over AT+CSIM. Build with ``open.open_transport``."""

    name = "csim"

    def __init__(self, port: AtPort, *, quirks: dict | None = None, timeout: float = 10.0,
                 long_timeout: float = 300.0, trace: Trace | None = None,
                 manufacturer: str | None = None, model: str | None = None):
        self.port = port
        self.quirks = quirks if quirks is not None else quirks_mod.effective()
        self.stats = port.stats
        self.timeout = float(timeout)
        self.long_timeout = float(long_timeout)
        self.trace = trace
        self.manufacturer = manufacturer
        self.model = model
        self._channels: dict[int, OpenChannel] = {}   # keyed by the channel the caller knows
        self._closed = False

    # --- ApduTransport ----------------------------------------------------------
    def transmit(self, apdu: bytes, *, timeout: float | None = None) -> bytes:
        apdu = bytes(apdu)
        if len(apdu) < 4:
            raise ValueError(f"C-APDU too short ({len(apdu)} bytes)")
        self._check_open()
        self._check_size(apdu)
        apdu = self._map(apdu)
        limit = self.timeout if timeout is None else float(timeout)
        self._trace("APDU>", apdu)
        try:
            rapdu = self._carry(apdu, limit)
        except TimeoutError_ as e:
            raise self._recover(e) from None
        self._trace("APDU<", rapdu)
        return rapdu

    def open_channel(self, aid: bytes) -> int:
        self._check_open()
        ch = open_channel_raw(self._raw, bytes(aid))
        self._channels[ch] = OpenChannel(bytes(aid), ch)
        return ch

    def close_channel(self, channel: int) -> None:
        st = self._channels.pop(channel, None)
        if self.port.closed or self.port.dead:
            return
        close_channel_raw(self._raw_short, st.actual if st else channel)

    def close(self) -> None:
        """Close every logical channel still open, then the port. Never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.port.closed and not self.port.dead:
                if self.port.pending:      # interrupted mid-command (Ctrl-C): get back in step first
                    self.port.resync(tries=1, deadline=min(1.0, self.timeout))
                for ch in list(self._channels):
                    self.close_channel(ch)
        except BaseException as e:  # noqa: BLE001 - clean-up must never raise (also on Ctrl-C)
            log.debug("closing channels failed: %r", e)
        finally:
            self._channels.clear()
            self.port.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- extras -------------------------------------------------------------------
    def modem_info(self) -> ModemInfo:
        """IMEI, active ICCID, manufacturer, model, revision (docs/modem.md §4)."""
        self._check_open()
        return read_modem_info(self.port, self.manufacturer, self.model)

    @property
    def urcs(self):
        return self.port.urcs

    def send_terminal_capability(self) -> None:
        """TERMINAL CAPABILITY with eUICC support (LPM + profile download) on the
        basic channel, for modems that do not send it themselves (docs/modem.md §4).
        Best effort: a refusal is logged, not raised."""
        apdu = quirks_mod.TERMINAL_CAPABILITY_APDU
        try:
            self._trace("APDU>", apdu)
            r = self._csim(apdu, self.timeout)
            self._trace("APDU<", r)
            if r[-2:] != b"\x90\x00":
                log.warning("TERMINAL CAPABILITY answered SW %s", r[-2:].hex().upper())
        except (ModemError, ProtocolError) as e:
            log.warning("TERMINAL CAPABILITY not accepted: %s", e)

    # --- carrying -------------------------------------------------------------------
    def _carry(self, apdu: bytes, timeout: float) -> bytes:
        return self._csim(apdu, timeout)

    def _csim(self, apdu: bytes, timeout: float, *, resync: bool = True) -> bytes:
        hx = apdu.hex().upper()     # always upper case (Qualcomm/Foxconn, docs/modem.md §2.1)
        self.stats.apdus += 1
        r = self.port.command(f'AT+CSIM={len(hx)},"{hx}"', prefix="+CSIM:", bare="hex", timeout=timeout,
                              resync=resync)
        return self._rapdu(r, "+CSIM")

    def _rapdu(self, reply: Reply, what: str) -> bytes:
        rapdu = parse_len_hex(self._value(reply, what), what)
        if len(rapdu) < 2:
            raise ProtocolError(f"{what} answer carries {len(rapdu)} bytes; an R-APDU has at least SW1 SW2",
                                code="bad_response")
        return rapdu

    def _value(self, reply: Reply, what: str) -> str:
        """The answer line: with its prefix, or bare when the modem omits it (FM350)."""
        if reply.lines:
            return reply.lines[0]
        if reply.bare:
            mode = self.quirks.get("no_prefix")
            if mode is None:
                log.info("modem answers %s without its prefix; accepting bare answers from now on", what)
                self.quirks["no_prefix"] = mode = True
            if mode:
                return reply.bare[0]
            raise ProtocolError(f"modem answered without the {what}: prefix ({reply.bare[0][:40]!r}); "
                                "set the quirk no_prefix = true for this modem", code="missing_prefix")
        others = f" (other lines: {', '.join(reply.urcs)[:80]})" if reply.urcs else ""
        raise ProtocolError(f"modem answered OK but sent no {what}: line{others}", code="missing_response")

    def _raw(self, apdu: bytes) -> bytes:
        """Basic-channel / channel-management APDUs: traced, no CLA mapping, no recovery."""
        self._trace("APDU>", apdu)
        r = self._csim(apdu, self.timeout)
        self._trace("APDU<", r)
        return r

    def _raw_short(self, apdu: bytes) -> bytes:
        self._trace("APDU>", apdu)
        r = self._csim(apdu, min(self.timeout, CLOSE_DEADLINE), resync=False)
        self._trace("APDU<", r)
        return r

    # --- channel bookkeeping -----------------------------------------------------------
    def _map(self, apdu: bytes) -> bytes:
        """After a re-open the card may have handed out another channel number:
        rewrite CLA from the caller's channel to the current one."""
        st = self._channels.get(channel_of(apdu[0]))
        if st is not None and st.actual != channel_of(apdu[0]):
            return bytes([rechannel(apdu[0], st.actual)]) + apdu[1:]
        return apdu

    def _reopen(self, st: OpenChannel) -> None:
        close_channel_raw(self._raw_short, st.actual)
        st.actual = open_channel_raw(self._raw, st.aid)

    def _recover(self, e: TimeoutError_) -> TimeoutError_:
        """After a time-out the port was re-synchronised by AtPort; re-open the
        logical channel(s) so a daemon can carry on (docs/modem.md §2.3)."""
        msg = e.message
        if e.details.get("resynced") and self._channels:
            for ch, st in list(self._channels.items()):
                try:
                    self._reopen(st)
                    msg += f"; logical channel {ch} re-opened"
                except Exception as err:  # noqa: BLE001 - report, keep the original time-out
                    self._channels.pop(ch, None)
                    msg += f"; re-opening logical channel {ch} failed ({err})"
        return TimeoutError_(msg, code=e.code, details=e.details)

    def _check_size(self, apdu: bytes) -> None:
        limit = self.quirks.get("max_apdu")
        if limit and len(apdu) > limit:
            raise TransportError(f"APDU of {len(apdu)} bytes is longer than this modem carries ({limit} bytes, "
                                 "quirk max_apdu); use a smaller --segment-size", code="apdu_too_long")

    def _check_open(self) -> None:
        if self._closed or self.port.closed:
            raise TransportError("the modem transport is closed", code="port_closed")

    def _trace(self, direction: str, data) -> None:
        if self.trace:
            try:
                self.trace(direction, data)
            except Exception:
                pass
