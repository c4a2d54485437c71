"""ISO 7816-4 APDU layer between the transports and ES10 (docs/protocol.md §1).

* logical channels: class byte encoding for channels 0–3 and 4–19,
  MANAGE CHANNEL open/close and SELECT by AID over any raw ``transmit``;
* response chaining: 61xx → GET RESPONSE (capped loop: some modems answer
  6100 forever, docs/modem.md §1.5 EC800G), 6Cxx → re-issue with the right Le;
* ES10 STORE DATA segmentation (SGP.22 §5.7.2, docs/protocol.md §1.3):
  P1 0x11 while more blocks follow, 0x91 on the last, P2 the block number from
  00 for each ES10 command, Lc ≤ 255 (default 120, as modems cap it);
* status words mapped to named errors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import ProtocolError, StatusWordError, TransportError, UsageError
from .transport.base import ISDR_AID, MAX_SEGMENT, ApduTransport  # noqa: F401 (ISDR_AID: apdu's too)
from .logs import get_logger

log = get_logger(__name__)

#: STORE DATA block size: the largest a short APDU carries (Lc ≤ 255, MAX_SEGMENT). Fewer blocks
#: mean fewer AT round trips, and on real modems (66-94 ms an AT+CSIM/CGLA) the round trips
#: dominate a download. A modem that refuses long APDUs (CME 3/4) makes the command go again with half.
DEFAULT_SEGMENT = MAX_SEGMENT
MIN_FALLBACK_SEGMENT = 16
GET_RESPONSE_CAP = 64          # 64 × 256 bytes = 16 KiB, far above any ES10 response

INS_MANAGE_CHANNEL = 0x70
INS_SELECT = 0xA4
INS_GET_RESPONSE = 0xC0
INS_STORE_DATA = 0xE2

# ISO 7816-4 §5.6 status words that matter here: (code, message).
_SW = {
    0x6700: ("wrong_length", "wrong length"),
    0x6881: ("channel_not_supported", "logical channel not supported or not open"),
    0x6882: ("secure_messaging_not_supported", "secure messaging not supported"),
    0x6982: ("security_status_not_satisfied", "security status not satisfied"),
    0x6985: ("conditions_not_satisfied", "conditions of use not satisfied (wrong state or sequence)"),
    0x6A80: ("incorrect_data", "incorrect data in the command (malformed TLV?)"),
    0x6A81: ("function_not_supported", "function not supported"),
    0x6A82: ("file_not_found", "application or file not found"),
    0x6A84: ("not_enough_memory", "not enough memory space"),
    0x6A86: ("incorrect_p1p2", "incorrect parameters P1-P2"),
    0x6A88: ("referenced_data_not_found", "referenced data or application not found"),
    0x6D00: ("ins_not_supported", "instruction not supported"),
    0x6E00: ("cla_not_supported", "class not supported"),
    0x6F00: ("card_error", "no precise diagnosis (card error)"),
}


def sw_error(sw: int, what: str) -> StatusWordError:
    code, text = _SW.get(sw, (None, None))
    if code is None:
        hi = sw >> 8
        if hi == 0x64 or hi == 0x65:
            code, text = "card_memory_error", "execution error / memory failure"
        elif hi == 0x6C:
            code, text = "wrong_le", "wrong Le"
        else:
            code, text = "status_word", "unexpected status word"
    return StatusWordError(sw, f"{what}: the card answered SW {sw:04X} ({text})", code=f"sw_{code}")


def is_success(sw: int) -> bool:
    # 90xx and 91xx (proactive command pending — the modem's STK engine fetches it,
    # docs/modem.md §2.2) both mean the command itself succeeded.
    return sw == 0x9000 or (sw >> 8) == 0x91


def _apdu_too_long(e: Exception) -> bool:
    """+CME ERROR 3 (operation not allowed) / 4 (not supported): what modems answer
    for an APDU above their size limit, before it reaches the card."""
    cme = getattr(e, "cme", None)
    if isinstance(cme, str):
        return cme.strip().lower() in ("operation not allowed", "operation not supported")
    return cme in (3, 4)


def split_rapdu(rapdu: bytes) -> tuple[bytes, int]:
    if len(rapdu) < 2:
        raise ProtocolError(f"R-APDU too short ({rapdu.hex().upper() or 'empty'}): need at least SW1 SW2",
                            code="short_rapdu")
    return rapdu[:-2], int.from_bytes(rapdu[-2:], "big")


def cla_for(cla: int, channel: int) -> int:
    """Put the logical channel number into CLA (ISO 7816-4 §5.4.1).

    Channels 0–3: first interindustry values, channel in b2–b1.
    Channels 4–19: further interindustry values, 0x40 | (channel − 4), keeping
    the proprietary-class bit 0x80 (so STORE DATA on channel 5 is 0xC1)."""
    if not 0 <= channel <= 19:
        raise ValueError(f"logical channel {channel} out of range 0..19")
    if channel <= 3:
        # b8 proprietary, b5 chaining, b4-b3 secure messaging kept; b2-b1 channel
        return (cla & 0x9C) | channel
    # b8 proprietary, b7 = 1, b5 chaining kept; b4-b1 = channel - 4
    return (cla & 0x80) | 0x40 | (cla & 0x10) | (channel - 4)


def build(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
    """Short APDU (cases 1–4). ``le`` 0..256, 256 encoded as 00."""
    if len(data) > 255:
        raise ValueError("short APDU data is limited to 255 bytes")
    apdu = bytes([cla, ins, p1, p2])
    if data:
        apdu += bytes([len(data)]) + data
    if le is not None:
        apdu += bytes([le & 0xFF])
    return apdu


def with_le(apdu: bytes, le: int) -> bytes:
    """The same short APDU with its Le replaced (or added)."""
    if len(apdu) == 4:                      # case 1
        return apdu + bytes([le])
    if len(apdu) == 5:                      # case 2: the 5th byte is Le
        return apdu[:4] + bytes([le])
    lc = apdu[4]
    return apdu[:5 + lc] + bytes([le])      # case 3 or 4


Transmit = Callable[[bytes], bytes]


def open_channel_raw(transmit: Transmit, aid: bytes) -> int:
    """MANAGE CHANNEL open, then SELECT ``aid`` on the new channel.

    Used by transports that carry raw APDUs (AT+CSIM, the in-process
    simulator). Closes the channel again if SELECT fails."""
    data, sw = split_rapdu(transmit(build(0x00, INS_MANAGE_CHANNEL, 0x00, 0x00, le=1)))
    if not is_success(sw):
        raise sw_error(sw, "MANAGE CHANNEL open")
    if len(data) != 1 or not 1 <= data[0] <= 19:
        raise TransportError(f"MANAGE CHANNEL open returned {data.hex().upper() or 'no channel number'}",
                             code="protocol_error")
    ch = data[0]
    try:
        select_raw(transmit, ch, aid)
    except BaseException:
        close_channel_raw(transmit, ch)
        raise
    return ch


def select_raw(transmit: Transmit, channel: int, aid: bytes) -> bytes:
    rapdu = transmit(build(cla_for(0x00, channel), INS_SELECT, 0x04, 0x00, aid, le=0))
    data, sw = split_rapdu(rapdu)
    if sw >> 8 == 0x61:
        # FCI available: fetch it so nothing is left pending on the channel.
        data, sw = _get_response_loop(transmit, channel, sw, data)
    if not is_success(sw):
        raise sw_error(sw, f"SELECT {aid.hex().upper()}")
    return data


def close_channel_raw(transmit: Transmit, channel: int) -> None:
    """MANAGE CHANNEL close, best effort. ISO 7816-4 makes it a 4-byte case-1 APDU;
    some modems refuse AT+CSIM shorter than 5 bytes (Wavecom/Moxa: length 10..522 hex
    characters, docs/modem.md §1.1), so a refused close is sent again as 00 70 80 ch 00."""
    for apdu in (build(0x00, INS_MANAGE_CHANNEL, 0x80, channel),
                 build(0x00, INS_MANAGE_CHANNEL, 0x80, channel, le=0)):
        try:
            _, sw = split_rapdu(transmit(apdu))
        except TransportError as e:
            if e.code not in ("modem_error", "modem_cme_error"):
                log.warning("MANAGE CHANNEL close %d failed: %s", channel, e.message)
                return                       # the link itself is gone: nothing more to try
            sw, why = None, e.message        # the modem refused the command: try the other form
        else:
            why = f"SW {sw:04X}"
        if sw is not None and is_success(sw):
            return
        if sw is not None and sw not in (0x6700, 0x6A86):
            break                            # refused for another reason than the form
    log.warning("could not close logical channel %d (%s); it stays open until the card is reset",
                channel, why)


def _get_response_loop(transmit: Transmit, channel: int, sw: int, data: bytes,
                       cap: int = GET_RESPONSE_CAP) -> tuple[bytes, int]:
    out = bytearray(data)
    n = 0
    while sw >> 8 == 0x61:
        n += 1
        if n > cap:
            raise TransportError(
                f"card kept answering 61xx after {cap} GET RESPONSE commands; giving up "
                "(a known modem firmware loop, see the 'max_get_response' quirk)", code="get_response_loop")
        le = sw & 0xFF
        rapdu = transmit(build(cla_for(0x00, channel), INS_GET_RESPONSE, 0, 0, le=le))
        chunk, sw = split_rapdu(rapdu)
        out += chunk
    return bytes(out), sw


class Isdr:
    """A session with the ISD-R on a logical channel: open → ES10 commands → close.

    Use as a context manager so the channel is always closed, also on errors
    and Ctrl-C (issue #2 item 4)."""

    def __init__(self, transport: ApduTransport, *, aids: Sequence[bytes] = (ISDR_AID,),
                 segment_size: int = DEFAULT_SEGMENT, timeout: float | None = None,
                 get_response_cap: int = GET_RESPONSE_CAP):
        if not 1 <= segment_size <= MAX_SEGMENT:
            raise ValueError(f"segment size must be 1..{MAX_SEGMENT}")
        quirks = getattr(transport, "quirks", None) or {}
        max_apdu = quirks.get("max_apdu") if isinstance(quirks, dict) else getattr(quirks, "max_apdu", None)
        if max_apdu:
            # header (5) + Lc data + Le must fit the modem's limit
            segment_size = max(1, min(segment_size, int(max_apdu) - 6))
        max_gr = quirks.get("max_get_response") if isinstance(quirks, dict) else getattr(quirks, "max_get_response", None)
        if max_gr:
            get_response_cap = int(max_gr)
        self.transport = transport
        self.aids = list(aids)
        self.segment_size = segment_size
        self.timeout = timeout
        self.get_response_cap = get_response_cap
        self.channel: int | None = None
        self.aid: bytes | None = None

    # --- channel --------------------------------------------------------
    def open(self) -> "Isdr":
        last: Exception | None = None
        for aid in self.aids:
            try:
                self.channel = self.transport.open_channel(aid)
                self.aid = aid
                return self
            except StatusWordError as e:
                # 6A82/6A88: not this AID, try the next configured one.
                if e.sw in (0x6A82, 0x6A88):
                    last = e
                    continue
                raise
        tried = ", ".join(a.hex().upper() for a in self.aids)
        raise StatusWordError(getattr(last, "sw", 0x6A88),
                              f"no ISD-R found (tried AID {tried}); is this SIM an eUICC? "
                              "A card with a proprietary ISD-R AID needs --aid",
                              code="isdr_not_found")

    def close(self) -> None:
        if self.channel is not None:
            ch, self.channel = self.channel, None
            try:
                self.transport.close_channel(ch)
            except Exception as e:  # never mask the original error
                log.debug("closing channel %s failed: %s", ch, e)

    def reopen(self, *, within: float = 20.0, pause: float = 0.5) -> None:
        """Close and open the ISD-R channel again, retrying while the card comes back.

        After EnableProfile/DisableProfile with refreshFlag the eUICC issues REFRESH
        (UICC reset): the modem re-reads the SIM, the logical channel is gone and the
        modem answers SIM busy for a while (docs/modem.md §3). Before anything else is sent
        (the notifications the switch produced) the channel must be opened anew."""
        import time
        self.close()
        deadline = time.monotonic() + within
        while True:
            try:
                self.open()
                return
            except (TransportError, StatusWordError) as e:
                if time.monotonic() + pause > deadline:
                    raise TransportError(f"the eUICC did not come back within {within:.0f} s after the profile "
                                         f"switch: {e.message}", code="card_not_back") from e
                log.info("ISD-R not reachable yet after refresh (%s); retrying", e.message)
                time.sleep(pause)

    def __enter__(self) -> "Isdr":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- APDU exchange ----------------------------------------------------
    def _tx(self, apdu: bytes, timeout: float | None) -> bytes:
        return self.transport.transmit(apdu, timeout=timeout if timeout is not None else self.timeout)

    def exchange(self, apdu: bytes, *, timeout: float | None = None, what: str = "APDU") -> tuple[bytes, int]:
        """Send one APDU; follow 61xx and 6Cxx; return (data, final SW)."""
        data, sw = split_rapdu(self._tx(apdu, timeout))
        if sw >> 8 == 0x6C:
            # T=0 wrong Le: re-issue the same command with Le = SW2 (ISO 7816-3 §10.3.3).
            data, sw = split_rapdu(self._tx(with_le(apdu, sw & 0xFF), timeout))
        if sw >> 8 == 0x61:
            ch = self.channel or 0
            data, sw = _get_response_loop(lambda a: self._tx(a, timeout), ch, sw, data, self.get_response_cap)
        return data, sw

    def store_data(self, payload: bytes, *, timeout: float | None = None, what: str = "ES10 command") -> bytes:
        """Send one ES10 command (a DER TLV) as STORE DATA blocks; return the response data.

        A modem that refuses an APDU as too long answers +CME ERROR: 3/4 without
        passing it to the card (docs/modem.md §1.1, Wavecom/Moxa limits). Then the whole
        command is sent again from block 00 with half the block size (block 00
        always starts a new command), and the smaller size is kept for the session."""
        if not payload:
            raise ValueError("empty ES10 command")
        while True:
            try:
                return self._store_data(payload, timeout, what)
            except TransportError as e:
                if not _apdu_too_long(e) or self.segment_size <= MIN_FALLBACK_SEGMENT:
                    raise
                smaller = max(MIN_FALLBACK_SEGMENT, self.segment_size // 2)
                log.warning("modem refused a %d-byte STORE DATA block (%s); retrying with %d-byte blocks "
                            "(set the max_apdu quirk or --segment-size to avoid this)",
                            self.segment_size, e.message, smaller)
                self.segment_size = smaller

    def _store_data(self, payload: bytes, timeout: float | None, what: str) -> bytes:
        ch = self.channel or 0
        cla = cla_for(0x80, ch)
        seg = self.segment_size
        blocks = [payload[i:i + seg] for i in range(0, len(payload), seg)]
        if len(blocks) > 256:
            raise UsageError(f"{what} ({len(payload)} bytes) needs {len(blocks)} STORE DATA blocks of "
                             f"{seg} bytes, but P2 numbers at most 256: use a larger --segment-size",
                             code="segment_size_too_small")
        for n, block in enumerate(blocks):
            last = n == len(blocks) - 1
            # Le=00 on the last block: the response is expected there. Omitting it makes
            # T=0 paths answer 61xx and cost a GET RESPONSE, and some modem/card paths then
            # return no data at all (docs/protocol.md §1.3).
            apdu = build(cla, INS_STORE_DATA, 0x91 if last else 0x11, n, block, le=0 if last else None)
            data, sw = self.exchange(apdu, timeout=timeout, what=what)
            if not is_success(sw):
                raise sw_error(sw, f"{what} (STORE DATA block {n + 1}/{len(blocks)})")
            if last:
                return data
        return b""  # unreachable

    es10 = store_data

