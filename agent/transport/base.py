"""The APDU seam: everything below ES10 implements this small interface
(DESIGN.md "Keep the seams narrow").

A transport carries raw C-APDUs to the card and returns raw R-APDUs (data +
SW1 SW2). It also knows how to open a logical channel to an application,
because the two AT ways differ: AT+CSIM sends MANAGE CHANNEL and SELECT as
APDUs (done generically in ``apdu.open_channel_raw``), AT+CCHO does both
inside the modem and hands back an opaque session id.

Implementations: ``transport.csim.CsimTransport``, ``transport.cgla.CglaTransport``,
``transport.direct.DirectTransport`` (in-process simulated eUICC).
"""
from __future__ import annotations

#: SGP.22 ISD-R AID (docs/protocol.md §1.1), what a transport's session opens. Some cards use
#: another one; the list is configurable. (Here rather than in apdu.py: opening the port needs it.)
ISDR_AID = bytes.fromhex("A0000005591010FFFFFFFF8900000100")

#: The most a short APDU carries (Lc ≤ 255): the largest STORE DATA block.
MAX_SEGMENT = 255


class ApduTransport:
    """The interface, duck-typed: implementations do not subclass it (a typing.Protocol base
    would cost every command the typing import)."""

    #: Short name for traces and JSON ("csim", "cgla", "direct").
    name: str

    def transmit(self, apdu: bytes, *, timeout: float | None = None) -> bytes:
        """Send one C-APDU (CLA already carries the channel bits); return R-APDU incl. SW.

        ``timeout`` overrides the per-command deadline (e.g. the long one used
        while loading a Bound Profile Package). Raises TransportError /
        TimeoutError_ on failure."""
        ...

    def open_channel(self, aid: bytes) -> int:
        """Open a logical channel and SELECT ``aid`` on it.

        Returns the channel number to encode in CLA (0 when the modem patches
        CLA itself, as AT+CGLA allows per TS 27.007 §8.43). Raises
        StatusWordError (e.g. 6A88) when the application is not there."""
        ...

    def close_channel(self, channel: int) -> None:
        """Close the channel opened by ``open_channel``; must not raise on a dead link."""
        ...

    def close(self) -> None:
        """Release the port / resources."""
        ...
