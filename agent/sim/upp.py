"""Small, well-formed SAIP Unprotected Profile Packages for the test bed.

A UPP is a DER concatenation of Profile Elements (TCA "eUICC Profile Package:
Interoperable Format Technical Specification", module PEDefinitions, AUTOMATIC
TAGS).  The SM-DP+ binds one into the BPP's 86 segments (docs/protocol.md §4.6); the
simulated eUICC reads the ICCID (iccidMismatch check against StoreMetadata)
and the IMSI back out.  We emit only what the test bed needs, relying on the
TCA file templates for every file we do not override:

    A0 ProfileHeader   {80 major, 81 minor, 82 profileType, 83 iccid,
                        A5 eUICC-Mandatory-services, A6 GFSTE template OIDs}
    B0 PE-MF           (template 2.23.143.1.2.1: EF-ICCID, EF-DIR)
    A3 PE-PUKCodes, A2 PE-PINCodes
    B3 PE-USIM         (template 2.23.143.1.2.4: ADF AID, EF-IMSI, EF-SPN, EF-ACC)
    A4 PE-AKAParameter (Milenage: Ki, OPc)
    [A1 PE-GenericFileManagement: a filler EF when ``pad_to`` asks for size]
    AA PE-End

Every PE but the header starts with a PEHeader ``A0{80 00 mandated, 81 id}``.
File contents are ``File ::= SEQUENCE OF CHOICE {doNotCreate 80, fileDescriptor
A1 (Fcp), fillFileOffset 82, fillFileContent 83}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import tlv
from ..errors import InputError, ProtocolError
from ..ids import iccid_to_bytes

# Template OIDs (2.23.143.1.2.x), content bytes of the OBJECT IDENTIFIER.
OID_TEMPLATE_MF = bytes.fromhex("67810f010201")
OID_TEMPLATE_USIM = bytes.fromhex("67810f010204")

PE_HEADER = 0xA0
PE_GFM = 0xA1
PE_PIN = 0xA2
PE_PUK = 0xA3
PE_AKA = 0xA4
PE_END = 0xAA
PE_MF = 0xB0
PE_USIM = 0xB3

USIM_AID = bytes.fromhex("A0000000871002FF33FFFF8900000100")  # 3GPP RID + USIM PIX, test values
USIM_TEMP_FID = bytes.fromhex("7FF1")  # temporary file ID of the ADF during installation

ALGO_MILENAGE = 1
# algorithmOptions: the TCA spec leaves the byte's meaning to its own tables; 02 is what
# the GSMA TS.48 test profiles carry (unverified beyond that).
ALGO_OPTIONS = 0x02


def _enc(tag: int, value: bytes) -> bytes:
    return tlv.encode(tag, value)


def _pe_header(ident: int) -> bytes:
    return _enc(0xA0, _enc(0x80, b"") + _enc(0x81, _uint(ident)))


def _uint(n: int) -> bytes:
    """DER INTEGER content of a non-negative number (a leading 00 keeps it positive)."""
    b = n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return b"\x00" + b if b[0] & 0x80 else b


def _fcp(*, fid: bytes | None = None, df_name: bytes | None = None, size: int | None = None,
         descriptor: bytes | None = None) -> bytes:
    """Fcp fields in SEQUENCE order: 82 fileDescriptor, 83 fileID, 84 dfName, 80 efFileSize."""
    out = b""
    if descriptor is not None:
        out += _enc(0x82, descriptor)
    if fid is not None:
        out += _enc(0x83, fid)
    if df_name is not None:
        out += _enc(0x84, df_name)
    if size is not None:
        out += _enc(0x80, size.to_bytes(max(1, (size.bit_length() + 7) // 8), "big"))
    return out


def _file(tag: int, *, fcp: bytes | None = None, content: bytes | None = None) -> bytes:
    """A File field: optional A1 Fcp override, optional 83 fillFileContent."""
    body = b""
    if fcp is not None:
        body += _enc(0xA1, fcp)
    if content is not None:
        body += _enc(0x83, content)
    return _enc(tag, body)


def header_iccid_bytes(iccid: str) -> bytes:
    """ProfileHeader.iccid is 10 bytes of *plain* BCD, F padded (unlike EF-ICCID and the
    ES10 5A, whose nibbles are swapped; the GSMA TS.48 packages show both forms)."""
    iccid_to_bytes(iccid)  # same validation as everywhere else
    return bytes.fromhex(iccid.strip().ljust(20, "F"))


def header_iccid_from_bytes(b: bytes) -> str:
    return b.hex().upper().rstrip("F")


def encode_imsi(imsi: str) -> bytes:
    """EF-IMSI (TS 31.102 §4.2.2): length byte, then parity/type nibble + digits, BCD swapped, FF padded."""
    if not imsi.isdigit() or not 6 <= len(imsi) <= 15:
        raise InputError(f"IMSI {imsi!r} must be 6 to 15 digits", code="bad_imsi")
    first = (int(imsi[0]) << 4) | (0x9 if len(imsi) % 2 else 0x1)
    rest = imsi[1:]
    if len(rest) % 2:
        rest += "F"
    body = bytes([first]) + bytes(int(rest[i + 1] + rest[i], 16) for i in range(0, len(rest), 2))
    return (bytes([len(body)]) + body).ljust(9, b"\xff")


def decode_imsi(ef: bytes) -> str:
    if not ef or ef[0] == 0xFF or ef[0] == 0 or ef[0] + 1 > len(ef):
        raise ProtocolError("EF-IMSI content is empty or malformed", code="malformed_upp")
    body = ef[1:1 + ef[0]]
    digits = [str(body[0] >> 4)]
    for b in body[1:]:
        for nib in (b & 0x0F, b >> 4):
            if nib != 0xF:
                digits.append(str(nib))
    return "".join(digits)


def _acc(imsi: str) -> bytes:
    """EF-ACC: access class = last IMSI digit (TS 22.011 §4.2)."""
    return (1 << int(imsi[-1])).to_bytes(2, "big")


def _spn(name: str) -> bytes:
    """EF-SPN: display condition, then the name (GSM default alphabet ≈ ASCII here) FF padded to 16."""
    raw = name.encode("ascii", "replace")[:16]
    return b"\x01" + raw.ljust(16, b"\xff")


def _ef_dir_record(aid: bytes, label: str) -> bytes:
    app = _enc(0x4F, aid) + _enc(0x50, label.encode("ascii"))
    return _enc(0x61, app)


def make_upp(*, iccid: str, imsi: str, ki: bytes, opc: bytes,
             profile_name: str = "esim-agent test profile", spn: str = "esim-agent",
             pin1: str = "0000", puk1: str = "12345678", adm1: str = "88888888",
             pad_to: int | None = None) -> bytes:
    """Build a UPP (DER Profile Elements).  ``pad_to`` adds a filler EF so the package is
    exactly that many bytes (for realistic ~12 KB benchmark packages)."""
    ki, opc = bytes(ki), bytes(opc)
    if len(ki) != 16 or len(opc) != 16:
        raise InputError("Ki and OPc must be 16 bytes each for Milenage", code="bad_key")
    if not 1 <= len(profile_name) <= 100:
        raise InputError("profile name must be 1..100 characters", code="bad_input")
    iccid_ef = iccid_to_bytes(iccid)           # EF-ICCID: nibble-swapped BCD
    iccid_hdr = header_iccid_bytes(iccid)      # ProfileHeader.iccid: plain BCD

    def pin_value(p: str) -> bytes:
        if not p.isdigit() or not 4 <= len(p) <= 8:
            raise InputError(f"PIN/PUK/ADM value {p!r} must be 4..8 digits", code="bad_input")
        return p.encode().ljust(8, b"\xff")

    ident = iter(range(1, 1000))
    pes: list[bytes] = []

    services = _enc(0x81, b"") + _enc(0x84, b"")  # usim [1], milenage [4]
    templates = _enc(0x06, OID_TEMPLATE_MF) + _enc(0x06, OID_TEMPLATE_USIM)
    header = (_enc(0x80, _uint(2)) + _enc(0x81, _uint(3)) + _enc(0x82, profile_name.encode("utf-8"))
              + _enc(0x83, iccid_hdr) + _enc(0xA5, services) + _enc(0xA6, templates))
    pes.append(_enc(PE_HEADER, header))

    mf = (_pe_header(next(ident)) + _enc(0x81, OID_TEMPLATE_MF)
          + _file(0xA2)                                                    # mf: template default
          + _file(0xA4, fcp=_fcp(fid=b"\x2f\xe2"), content=iccid_ef)        # ef-iccid
          + _file(0xA5, fcp=_fcp(fid=b"\x2f\x00"), content=_ef_dir_record(USIM_AID, "USIM"))  # ef-dir
          + _file(0xA6))                                                   # ef-arr: template default
    pes.append(_enc(PE_MF, mf))

    puk = _enc(0x30, _enc(0x80, _uint(1)) + _enc(0x81, pin_value(puk1)))
    pes.append(_enc(PE_PUK, _pe_header(next(ident)) + _enc(0xA1, puk)))

    pins = (_enc(0x30, _enc(0x80, _uint(1)) + _enc(0x81, pin_value(pin1)) + _enc(0x82, _uint(1))
                 + _enc(0x83, _uint(6)))
            + _enc(0x30, _enc(0x80, _uint(10)) + _enc(0x81, pin_value(adm1)) + _enc(0x83, _uint(3))))
    pes.append(_enc(PE_PIN, _pe_header(next(ident)) + _enc(0xA1, _enc(0xA0, pins))))

    usim = (_pe_header(next(ident)) + _enc(0x81, OID_TEMPLATE_USIM)
            + _file(0xA2, fcp=_fcp(fid=USIM_TEMP_FID, df_name=USIM_AID))   # adf-usim
            + _file(0xA3, fcp=_fcp(fid=b"\x6f\x07"), content=encode_imsi(imsi))  # ef-imsi
            + _file(0xA4)                                                  # ef-arr
            + _file(0xA8)                                                  # ef-ust
            + _file(0xAD, fcp=_fcp(fid=b"\x6f\x46"), content=_spn(spn))    # ef-spn
            + _file(0xAE)                                                  # ef-est
            + _file(0xB2, fcp=_fcp(fid=b"\x6f\x78"), content=_acc(imsi))   # ef-acc
            + _file(0xB6))                                                 # ef-ecc
    pes.append(_enc(PE_USIM, usim))

    algo = (_enc(0x80, _uint(ALGO_MILENAGE)) + _enc(0x81, bytes([ALGO_OPTIONS]))
            + _enc(0x82, ki) + _enc(0x83, opc))
    pes.append(_enc(PE_AKA, _pe_header(next(ident)) + _enc(0xA1, _enc(0xA1, algo))))

    filler_id = next(ident)
    end = _enc(PE_END, _pe_header(filler_id + 1))
    base = len(b"".join(pes)) + len(end)
    if pad_to is None or pad_to <= base:
        end = _enc(PE_END, _pe_header(filler_id))  # no filler: keep the ids contiguous
    else:
        n = pad_to - base
        # The largest filler content whose whole PE (with its headers) fits in n bytes. The
        # headers cost len(pe) - content, which only grows with the content (longer length
        # fields): n minus the headers of an n-byte content always fits, and at most a few
        # bytes more may fit too.
        content_len = max(0, n - (len(_filler_pe(filler_id, n)) - n))
        while content_len < n and len(_filler_pe(filler_id, content_len + 1)) <= n:
            content_len += 1
        # (a length-field step can make an exact fit impossible: then a few bytes short)
        pes.append(_filler_pe(filler_id, content_len))
    return b"".join(pes) + end


#: The filler pattern, byte i = (7·i + 3) mod 256, repeats every 256 bytes.
_FILLER_PERIOD = bytes((i * 7 + 3) & 0xFF for i in range(256))


def _filler_pe(ident: int, size: int) -> bytes:
    """PE-GenericFileManagement creating a transparent EF 2FB0 under the MF, filled
    with a deterministic pattern (benchmark padding)."""
    content = (_FILLER_PERIOD * (size // 256 + 1))[:size]
    cmd = (_enc(0x80, b"")                                                   # filePath: MF
           + _enc(0x62, _fcp(descriptor=b"\x41\x21", fid=b"\x2f\xb0", size=max(size, 1)))
           + _enc(0x81, content))
    return _enc(PE_GFM, _pe_header(ident) + _enc(0xA1, _enc(0x30, cmd)))


@dataclass
class UppInfo:
    iccid: str
    profile_type: str | None = None
    imsi: str | None = None
    ki: bytes | None = None
    opc: bytes | None = None
    algorithm_id: int | None = None
    pe_tags: list[int] = field(default_factory=list)
    ended: bool = False


def _bad(msg: str) -> ProtocolError:
    return ProtocolError(f"malformed profile package: {msg}", code="malformed_upp")


def parse_upp(upp: bytes) -> UppInfo:
    """Read what the simulated eUICC needs out of a UPP: ICCID and profile type from the
    ProfileHeader, IMSI from the USIM PE, Ki/OPc from the AKA PE."""
    try:
        pes = tlv.parse_all(bytes(upp))
    except ProtocolError as e:
        raise _bad(str(e)) from None
    if not pes or pes[0].tag != PE_HEADER:
        raise _bad("the first Profile Element must be the ProfileHeader (A0)")
    try:
        hdr = {t.tag: t.value for t in tlv.children(pes[0])}
    except ProtocolError as e:
        raise _bad(f"ProfileHeader: {e}") from None
    if 0x83 not in hdr or len(hdr[0x83]) != 10:
        raise _bad("ProfileHeader lacks a 10-byte iccid (83)")
    info = UppInfo(iccid=header_iccid_from_bytes(hdr[0x83]),
                   profile_type=hdr[0x82].decode("utf-8", "replace") if 0x82 in hdr else None,
                   pe_tags=[p.tag for p in pes])
    try:
        for pe in pes[1:]:
            if pe.tag == PE_USIM and info.imsi is None:
                f = tlv.find(tlv.children(pe), 0xA3)
                if f is not None:
                    content = tlv.find(tlv.children(f), 0x83)
                    if content is not None:
                        info.imsi = decode_imsi(content.value)
            elif pe.tag == PE_AKA and info.ki is None:
                cfg = tlv.find(tlv.children(pe), 0xA1)
                algo = tlv.find(tlv.children(cfg), 0xA1) if cfg is not None else None
                if algo is not None:
                    a = {t.tag: t.value for t in tlv.children(algo)}
                    info.algorithm_id = int.from_bytes(a.get(0x80, b"\x00"), "big")
                    info.ki, info.opc = a.get(0x82), a.get(0x83)
            elif pe.tag == PE_END:
                info.ended = True
    except ProtocolError as e:
        raise _bad(str(e)) from None
    return info


def upp_iccid(upp: bytes) -> str:
    """ICCID from the ProfileHeader (compare with StoreMetadata's 5A: iccidMismatch)."""
    try:
        first, _ = tlv.parse_one(bytes(upp), 0)
        if first.tag != PE_HEADER:
            raise _bad("the first Profile Element must be the ProfileHeader (A0)")
        f = tlv.find(tlv.children(first), 0x83)
    except ProtocolError as e:
        if e.code == "malformed_upp":
            raise
        raise _bad(str(e)) from None
    if f is None or len(f.value) != 10:
        raise _bad("ProfileHeader lacks a 10-byte iccid (83)")
    return header_iccid_from_bytes(f.value)
