"""Minimal BER-TLV helpers (ISO 7816-4 / X.690) for raw byte work.

asn1tools does the full encode/decode; these helpers exist for the places
where the exact bytes matter and must not be re-encoded: splitting a Bound
Profile Package into its ES10 commands (SGP.22 §2.5.5), extracting signed
blobs byte-for-byte (signatures cover exact DER, docs/protocol.md §0.6), and the
simulated eUICC's streaming LoadBoundProfilePackage state machine.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ProtocolError


@dataclass(frozen=True)
class Tlv:
    """One BER-TLV element as parsed."""
    tag: int          # tag as an integer of its encoded bytes, e.g. 0xBF36
    header_len: int   # bytes of tag + length
    value: bytes
    raw: bytes        # tag + length + value, exactly as received

    @property
    def constructed(self) -> bool:
        first = self.tag
        while first > 0xFF:
            first >>= 8
        return bool(first & 0x20)


def read_tag(buf: bytes, off: int = 0) -> tuple[int, int]:
    """Return (tag, new offset)."""
    if off >= len(buf):
        raise ProtocolError("truncated TLV: missing tag", code="malformed_tlv")
    first = buf[off]
    tag = first
    off += 1
    if first & 0x1F == 0x1F:
        while True:
            if off >= len(buf):
                raise ProtocolError("truncated TLV: multi-byte tag cut short", code="malformed_tlv")
            b = buf[off]
            tag = (tag << 8) | b
            off += 1
            if not b & 0x80:
                break
            if tag > 0xFFFFFFFF:
                raise ProtocolError("TLV tag longer than 4 bytes", code="malformed_tlv")
    return tag, off


def read_length(buf: bytes, off: int) -> tuple[int, int]:
    if off >= len(buf):
        raise ProtocolError("truncated TLV: missing length", code="malformed_tlv")
    b = buf[off]
    off += 1
    if b < 0x80:
        return b, off
    n = b & 0x7F
    if n == 0 or n > 4:
        raise ProtocolError(f"unsupported TLV length form 0x{b:02X}", code="malformed_tlv")
    if off + n > len(buf):
        raise ProtocolError("truncated TLV: length bytes cut short", code="malformed_tlv")
    return int.from_bytes(buf[off:off + n], "big"), off + n


def read_header(buf: bytes, off: int = 0) -> tuple[int, int, int]:
    """Return (tag, length, value offset) without requiring the value to be present."""
    tag, o = read_tag(buf, off)
    length, o = read_length(buf, o)
    return tag, length, o


def parse_one(buf: bytes, off: int = 0) -> tuple[Tlv, int]:
    """Parse one TLV at ``off``; return it and the offset after it."""
    tag, length, voff = read_header(buf, off)
    end = voff + length
    if end > len(buf):
        raise ProtocolError(
            f"truncated TLV: tag {tag:X} says {length} bytes, only {len(buf) - voff} present",
            code="malformed_tlv")
    return Tlv(tag, voff - off, buf[voff:end], buf[off:end]), end


def parse_all(buf: bytes) -> list[Tlv]:
    """Parse a concatenation of TLVs that must fill ``buf`` exactly."""
    out, off = [], 0
    while off < len(buf):
        t, off = parse_one(buf, off)
        out.append(t)
    return out


def parse_single(buf: bytes) -> Tlv:
    """Parse ``buf`` as exactly one TLV (no trailing bytes)."""
    t, end = parse_one(buf, 0)
    if end != len(buf):
        raise ProtocolError(f"{len(buf) - end} trailing bytes after TLV {t.tag:X}", code="malformed_tlv")
    return t


def children(t: Tlv) -> list[Tlv]:
    return parse_all(t.value)


def find(tlvs: list[Tlv], tag: int) -> Tlv | None:
    for t in tlvs:
        if t.tag == tag:
            return t
    return None


def encode_tag(tag: int) -> bytes:
    n = (tag.bit_length() + 7) // 8 or 1
    return tag.to_bytes(n, "big")


def encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def encode(tag: int, value: bytes) -> bytes:
    return encode_tag(tag) + encode_length(len(value)) + value


def parse_tag_list(data: bytes) -> list[int]:
    """The tags of a tag list (the value of a 5C tagList), multi-byte tags (9F70, BF22 …) as one
    integer each."""
    tags, off = [], 0
    while off < len(data):
        tag, off = read_tag(data, off)
        tags.append(tag)
    return tags
