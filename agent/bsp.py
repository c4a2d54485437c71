"""BSP — the SCP03t-derived protection of the Bound Profile Package's 86/87/88
TLVs (SGP.22 §2.5.4, docs/protocol.md §4.6).

One ``BspSession`` object lives on each side of a download.  It keeps the
block counter (ICV derivation) and the MAC chaining value; ``wrap`` and
``unwrap`` must therefore be called in the same order on both sides:

* encrypted TLVs (87, 86): AES-128-CBC with S-ENC, ICV = AES-ECB(S-ENC, counter
  as 16-byte big-endian), always padded with ``80 00…``;
* MAC: AES-CMAC(S-MAC, MCV || tag || length || ciphertext) where length counts
  the 8-byte MAC; the first 8 bytes are sent, the full 16 become the next MCV;
* the counter starts at 1 and moves on for every segment, MAC-only 88 included;
* ReplaceSessionKeys (A2) restarts with the PPK keys: MCV = its initialMCV,
  counter = 1 (``replace_keys``).
"""
from __future__ import annotations

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import tlv
from .errors import CardError

BLOCK = 16
MAC_LEN = 8
MAX_SEGMENT = 1020  # bytes of one protected TLV incl. tag, length and MAC (docs/protocol.md §4.6)


class BspError(CardError):
    """An 86/87/88 TLV failed BSP processing.

    ``reason`` is "mac" (security error, SGP.22 errorReason 8), "padding" or
    "structure" (structure error, errorReason 7).  ``error_reason`` gives the
    ErrorReason number to report in a ProfileInstallationResult."""

    code = "bsp_error"

    def __init__(self, reason: str, message: str):
        super().__init__(message, code=f"bsp_{reason}", details={"reason": reason})
        self.reason = reason
        self.error_reason = 8 if reason == "mac" else 7


def _check_key(name: str, k: bytes) -> bytes:
    k = bytes(k)
    if len(k) not in (16, 24, 32):
        raise ValueError(f"{name} must be an AES key (16/24/32 bytes), got {len(k)} bytes")
    return k


def pad(data: bytes) -> bytes:
    """ISO/IEC 9797-1 method 2: always append 80, then 00 up to the block size."""
    data = bytes(data) + b"\x80"
    return data + b"\x00" * (-len(data) % BLOCK)


def unpad(data: bytes) -> bytes:
    i = len(data) - 1
    while i >= 0 and data[i] == 0 and len(data) - i <= BLOCK:
        i -= 1
    if i < 0 or data[i] != 0x80 or len(data) - i > BLOCK:
        raise BspError("padding", "BSP padding is not 80 00…: decryption with wrong keys or a damaged segment")
    return data[:i]


def cmac_aes(key: bytes, data: bytes) -> bytes:
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def _ecb(key: bytes, block: bytes) -> bytes:
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def _header(tag: int, value_len: int) -> bytes:
    return tlv.encode_tag(tag) + tlv.encode_length(value_len)


def max_plaintext(tag: int, *, encrypt: bool = True, segment_size: int = MAX_SEGMENT) -> int:
    """Largest plaintext whose protected TLV fits ``segment_size`` bytes (1007 for an
    encrypted 86/87 and 1008 for a MAC-only 88 at the default 1020)."""
    tag_len = len(tlv.encode_tag(tag))
    value = segment_size - tag_len - 1
    while value > 0 and tag_len + len(tlv.encode_length(value)) + value > segment_size:
        value -= 1
    body = value - MAC_LEN
    if encrypt:
        body = body - body % BLOCK - 1  # whole blocks, at least one byte of padding
    if body < 1:
        raise ValueError(f"segment size {segment_size} is too small for tag {tag:X}")
    return body


class BspSession:
    """One direction-agnostic BSP context (the DP wraps, the eUICC unwraps)."""

    def __init__(self, s_enc: bytes, s_mac: bytes, initial_mcv: bytes):
        self.replace_keys(s_enc, s_mac, initial_mcv)

    @classmethod
    def from_keys(cls, keys) -> "BspSession":
        """From a crypto.BspKeys."""
        return cls(keys.s_enc, keys.s_mac, keys.initial_mcv)

    def replace_keys(self, s_enc: bytes, s_mac: bytes, initial_mcv: bytes) -> None:
        """ReplaceSessionKeys: new keys, MCV = initialMCV, counter back to 1 (docs/protocol.md §4.7)."""
        self.s_enc = _check_key("S-ENC", s_enc)
        self.s_mac = _check_key("S-MAC", s_mac)
        mcv = bytes(initial_mcv)
        if len(mcv) != BLOCK:
            raise ValueError(f"initial MCV must be 16 bytes, got {len(mcv)}")
        self.mcv = mcv
        self.counter = 1

    # -- helpers ---------------------------------------------------------------
    def _icv(self) -> bytes:
        return _ecb(self.s_enc, self.counter.to_bytes(BLOCK, "big"))

    def _mac(self, header: bytes, body: bytes) -> bytes:
        return cmac_aes(self.s_mac, self.mcv + header + body)

    # -- sender ------------------------------------------------------------------
    def wrap(self, tag: int, plaintext: bytes, *, encrypt: bool = True) -> bytes:
        """Protect one segment; returns tag || length || (ciphertext|plaintext) || MAC8."""
        plaintext = bytes(plaintext)
        if encrypt:
            enc = Cipher(algorithms.AES(self.s_enc), modes.CBC(self._icv())).encryptor()
            body = enc.update(pad(plaintext)) + enc.finalize()
        else:
            body = plaintext
        header = _header(tag, len(body) + MAC_LEN)
        full = self._mac(header, body)
        self.mcv = full
        self.counter += 1
        return header + body + full[:MAC_LEN]

    def wrap_segments(self, tag: int, data: bytes, *, encrypt: bool = True,
                      segment_size: int = MAX_SEGMENT) -> list[bytes]:
        """Split ``data`` into as few segments as fit ``segment_size`` and wrap each."""
        n = max_plaintext(tag, encrypt=encrypt, segment_size=segment_size)
        data = bytes(data)
        chunks = [data[i:i + n] for i in range(0, len(data), n)] or [b""]
        return [self.wrap(tag, c, encrypt=encrypt) for c in chunks]

    # -- receiver ----------------------------------------------------------------
    def unwrap(self, tlv_bytes: bytes, *, encrypted: bool = True, expected_tag: int | None = None) -> bytes:
        """Check and open one protected TLV; returns the plaintext.

        The session state only advances when the segment is accepted."""
        try:
            t = tlv.parse_single(bytes(tlv_bytes))
        except Exception as e:  # ProtocolError from the TLV layer
            raise BspError("structure", f"BSP segment is not one well-formed TLV: {e}") from None
        if expected_tag is not None and t.tag != expected_tag:
            raise BspError("structure", f"BSP segment has tag {t.tag:X}, expected {expected_tag:X}")
        if len(t.value) < MAC_LEN + (BLOCK if encrypted else 0):
            raise BspError("structure", f"BSP segment {t.tag:X} too short ({len(t.value)} bytes) "
                           "to hold data and an 8-byte MAC")
        body, mac = t.value[:-MAC_LEN], t.value[-MAC_LEN:]
        header = t.raw[:t.header_len]
        full = self._mac(header, body)
        if full[:MAC_LEN] != mac:
            raise BspError("mac", f"BSP MAC check failed on segment {t.tag:X} #{self.counter} "
                           "(wrong session keys or altered data)")
        if encrypted:
            if len(body) % BLOCK:
                raise BspError("structure", f"BSP ciphertext of {len(body)} bytes is not a multiple of 16")
            dec = Cipher(algorithms.AES(self.s_enc), modes.CBC(self._icv())).decryptor()
            plaintext = unpad(dec.update(body) + dec.finalize())
        else:
            plaintext = body
        self.mcv = full
        self.counter += 1
        return plaintext
