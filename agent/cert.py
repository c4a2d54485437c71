"""Read-only X.509 certificate fields (RFC 5280) from DER, without the ``cryptography`` package.

The agent reads certificates but never verifies them itself: OpenSSL (the ssl module) checks
chain, host name and validity of a server's TLS certificate, the eUICC checks CERT.DPauth.
What the agent needs is a handful of fields for its own policy and messages: the CI's
SubjectKeyIdentifier (= CI PKID), notBefore (clock check), subject/issuer (messages), the
certificatePolicies role OID (docs/protocol.md §4.8) and the SAN registeredID (SM-DP+ OID),
plus PEM for ssl's ``cadata``.  Importing ``cryptography`` for that costs a CLI process
~0.1 s and ~8 MB, so this module reads them with tlv.py.

Only the parts read are checked, and strictly (DER, X.690 §10): minimal lengths and OID
sub-identifiers, UTCTime/GeneralizedTime in the RFC 5280 §4.1.2.5 forms, each extension at most
once (RFC 5280 §4.2).  Every defect is a :class:`CertError` with reason ``malformed``
(code ``cert_malformed``) whose message says what is wrong.

The role policy OIDs and the CryptoError/CertError classes live here, free of
``cryptography``; crypto.py (which does the signature work) re-exports them.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import re
from dataclasses import dataclass, field

from . import tlv
from .errors import AgentError, ProtocolError

# Role policy OIDs (SGP.22 §4.5.2.1 certificate profiles), docs/protocol.md §4.8.
ROLE_OID_PREFIX = "2.23.146.1.2.1."
ROLE_OIDS = {
    "ci": "2.23.146.1.2.1.0",
    "euicc": "2.23.146.1.2.1.1",
    "eum": "2.23.146.1.2.1.2",
    "dp-tls": "2.23.146.1.2.1.3",
    "dp-auth": "2.23.146.1.2.1.4",
    "dp-pb": "2.23.146.1.2.1.5",
    "ds-tls": "2.23.146.1.2.1.6",
    "ds-auth": "2.23.146.1.2.1.7",
}
ROLE_NAMES = {v: k for k, v in ROLE_OIDS.items()}


class CryptoError(AgentError):
    """A key, point or signature is unusable (exit 1)."""

    code = "crypto_error"
    exit_code = 1


class CertError(CryptoError):
    """A certificate failed a check.  ``reason`` is one of: expired,
    not_yet_valid, bad_signature, unknown_issuer, wrong_role, not_ca,
    malformed, eid_not_permitted."""

    code = "certificate_error"

    def __init__(self, reason: str, message: str):
        super().__init__(message, code=f"cert_{reason}", details={"reason": reason})
        self.reason = reason


def _bad(what: str) -> CertError:
    return CertError("malformed", f"certificate: {what}")


# --- DER primitives (X.690) ---------------------------------------------------------------

_SEQUENCE, _SET, _INTEGER, _OID, _OCTETS, _BITS, _BOOLEAN = 0x30, 0x31, 0x02, 0x06, 0x04, 0x03, 0x01
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18

#: Longest OID sub-identifier we read (bytes of 7 bits): 2.25.<128-bit UUID> needs 19; a
#: longer one only makes numbers too long to print (int -> str stops at 4300 digits).
MAX_ARC_OCTETS = 20
#: Longest serial number we read: RFC 5280 §4.1.2.2 allows 20 octets (21 with a sign octet);
#: we leave room for non-conforming issuers but not for numbers Python cannot print.
MAX_SERIAL_OCTETS = 64


def _items(data: bytes, what: str) -> list[tlv.Tlv]:
    """The TLVs filling ``data`` exactly, each in DER's minimal length form (X.690 §10.1)."""
    try:
        items = tlv.parse_all(data)
    except ProtocolError as e:
        raise _bad(f"{what}: {e.message}") from None
    for t in items:
        n = len(t.value)
        length_octets = 1 if n < 0x80 else 1 + (n.bit_length() + 7) // 8
        if t.header_len != length_octets + (1 if t.tag <= 0xFF else len(tlv.encode_tag(t.tag))):
            raise _bad(f"{what}: length of tag {t.tag:02X} not in its shortest form (DER)")
    return items


def _one(data: bytes, what: str) -> tlv.Tlv:
    items = _items(data, what)
    if len(items) != 1:
        raise _bad(f"{what}: expected one element, found {len(items)}")
    return items[0]


def _expect(t: tlv.Tlv, tag: int, what: str) -> tlv.Tlv:
    if t.tag != tag:
        raise _bad(f"{what}: tag {t.tag:02X}, expected {tag:02X}")
    return t


def decode_oid(content: bytes) -> str:
    """OBJECT IDENTIFIER contents (X.690 §8.19) -> dotted string.

    Sub-identifiers are base 128, high bit set on all but the last octet, in the fewest
    octets (a leading 0x80 is not DER).  The first one packs two arcs (§8.19.4): X*40 + Y
    with X in 0..2, and for X = 2 the second arc may exceed 39 (2.999 is 0x88 0x37)."""
    if not content:
        raise _bad("empty OBJECT IDENTIFIER")
    arcs: list[int] = []
    value, start = 0, True
    for b in content:
        if start and b == 0x80:
            raise _bad(f"OBJECT IDENTIFIER sub-identifier {len(arcs) + 1} is not minimally encoded")
        start = False
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value, start = 0, True
        elif value >> (7 * MAX_ARC_OCTETS - 7):
            raise _bad(f"OBJECT IDENTIFIER sub-identifier longer than {MAX_ARC_OCTETS} octets")
    if not start:
        raise _bad("OBJECT IDENTIFIER ends inside a sub-identifier")
    first = arcs[0]
    head = [first // 40, first % 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _oid(t: tlv.Tlv, what: str) -> str:
    return decode_oid(_expect(t, _OID, what).value)


def _time(t: tlv.Tlv, what: str) -> _dt.datetime:
    """RFC 5280 §4.1.2.5: UTCTime YYMMDDHHMMSSZ (YY >= 50 is 19YY, else 20YY) through 2049,
    GeneralizedTime YYYYMMDDHHMMSSZ from 2050; always UTC ("Z"), seconds, no fractions."""
    s = t.value
    if t.tag == _UTC_TIME and len(s) == 13:
        digits = s[:12]
    elif t.tag == _GENERALIZED_TIME and len(s) == 15:
        digits = s[:14]
    else:
        raise _bad(f"{what} is not a UTCTime/GeneralizedTime of the RFC 5280 form")
    if s[-1:] != b"Z" or not digits.isdigit():   # bytes.isdigit: ASCII 0-9 only
        raise _bad(f"{what} is not a UTCTime/GeneralizedTime of the RFC 5280 form")
    n = [int(digits[i:i + 2]) for i in range(0, len(digits), 2)]
    if t.tag == _UTC_TIME:
        year = (1900 if n[0] >= 50 else 2000) + n[0]
        rest = n[1:]
    else:
        year = n[0] * 100 + n[1]
        rest = n[2:]
    try:
        return _dt.datetime(year, *rest, tzinfo=_dt.timezone.utc)
    except ValueError:
        raise _bad(f"{what} is not a valid date and time ({s.decode('ascii')})") from None


# --- names (RFC 5280 §4.1.2.4, printed as RFC 4514) -----------------------------------------

#: Attribute short names (RFC 4514 §3, plus serialNumber, which SGP.22 puts the EID in).
SHORT_NAMES = {
    "2.5.4.3": "CN", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
    "2.5.4.6": "C", "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID", "2.5.4.5": "serialNumber",
}
#: DirectoryString and the other string types a name attribute has, with their codecs.
_STRING_CODECS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x12: "ascii", 0x1A: "ascii",
                  0x14: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}


def _escape(value: str) -> str:
    """RFC 4514 §2.4 escaping of an attribute value."""
    for ch in '\\"+,;<>':
        value = value.replace(ch, "\\" + ch)
    value = value.replace("\0", "\\00")
    if value[:1] in ("#", " "):
        value = "\\" + value
    if value[-1:] == " ":
        value = value[:-1] + "\\ "
    return value


def _attribute_value(t: tlv.Tlv) -> str:
    codec = _STRING_CODECS.get(t.tag)
    if codec is not None:
        try:
            return _escape(t.value.decode(codec))
        except UnicodeDecodeError:
            raise _bad(f"name attribute string (tag {t.tag:02X}) does not decode as {codec}") from None
    return "#" + t.raw.hex()     # RFC 4514 §2.4: another type is its BER encoding in hex


def _name(t: tlv.Tlv, what: str) -> str:
    """Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF AttributeTypeAndValue), as an
    RFC 4514 string: last RDN first, the attributes of a multi-valued RDN joined by "+"."""
    rdns = []
    for rdn in _items(_expect(t, _SEQUENCE, what).value, what):
        parts = []
        for atv in _items(_expect(rdn, _SET, what).value, what):
            typ_val = _items(_expect(atv, _SEQUENCE, what).value, what)
            if len(typ_val) != 2:
                raise _bad(f"{what}: an attribute is not a (type, value) pair")
            oid = _oid(typ_val[0], f"{what} attribute type")
            parts.append(f"{SHORT_NAMES.get(oid, oid)}={_attribute_value(typ_val[1])}")
        if not parts:
            raise _bad(f"{what}: empty relative distinguished name")
        rdns.append("+".join(parts))
    return ",".join(reversed(rdns))


# --- extensions (RFC 5280 §4.2) -------------------------------------------------------------

_EXT_SKI = "2.5.29.14"        # §4.2.1.2
_EXT_AKI = "2.5.29.35"        # §4.2.1.1
_EXT_POLICIES = "2.5.29.32"   # §4.2.1.4
_EXT_SAN = "2.5.29.17"        # §4.2.1.6


def _extensions(t: tlv.Tlv) -> dict[str, bytes]:
    """[3] EXPLICIT Extensions: extnID -> extnValue contents (the DER inside the OCTET STRING)."""
    exts = _one(t.value, "extensions")
    out: dict[str, bytes] = {}
    for ext in _items(_expect(exts, _SEQUENCE, "extensions").value, "extensions"):
        parts = _items(_expect(ext, _SEQUENCE, "extension").value, "extension")
        if len(parts) == 3 and parts[1].tag == _BOOLEAN:      # critical BOOLEAN DEFAULT FALSE
            parts = [parts[0], parts[2]]
        if len(parts) != 2:
            raise _bad("extension is not (extnID, critical?, extnValue)")
        oid = _oid(parts[0], "extension extnID")
        if oid in out:
            raise _bad(f"extension {oid} appears twice (RFC 5280 §4.2)")
        out[oid] = _expect(parts[1], _OCTETS, f"extension {oid} extnValue").value
    return out


def _ski(value: bytes) -> bytes:
    """SubjectKeyIdentifier ::= KeyIdentifier (OCTET STRING), §4.2.1.2."""
    return _expect(_one(value, "subjectKeyIdentifier"), _OCTETS, "subjectKeyIdentifier").value


def _aki(value: bytes) -> bytes | None:
    """AuthorityKeyIdentifier ::= SEQUENCE { keyIdentifier [0] IMPLICIT OPTIONAL, … }, §4.2.1.1."""
    seq = _expect(_one(value, "authorityKeyIdentifier"), _SEQUENCE, "authorityKeyIdentifier")
    for part in _items(seq.value, "authorityKeyIdentifier"):
        if part.tag == 0x80:
            return part.value
    return None


def _policies(value: bytes) -> tuple[str, ...]:
    """certificatePolicies ::= SEQUENCE OF PolicyInformation { policyIdentifier, qualifiers? }, §4.2.1.4."""
    seq = _expect(_one(value, "certificatePolicies"), _SEQUENCE, "certificatePolicies")
    out = []
    for info in _items(seq.value, "certificatePolicies"):
        parts = _items(_expect(info, _SEQUENCE, "PolicyInformation").value, "PolicyInformation")
        if not parts:
            raise _bad("PolicyInformation without a policyIdentifier")
        out.append(_oid(parts[0], "policyIdentifier"))
    return tuple(out)


def _registered_ids(value: bytes) -> tuple[str, ...]:
    """subjectAltName ::= GeneralNames; registeredID is [8] IMPLICIT OBJECT IDENTIFIER, §4.2.1.6."""
    seq = _expect(_one(value, "subjectAltName"), _SEQUENCE, "subjectAltName")
    return tuple(decode_oid(gn.value) for gn in _items(seq.value, "subjectAltName") if gn.tag == 0x88)


# --- the certificate ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificate:
    """The fields of one X.509 certificate the agent reads.  Equal when the DER is."""

    der: bytes
    serial: int = field(compare=False)
    issuer: str = field(compare=False)              # RFC 4514 form, for messages
    subject: str = field(compare=False)
    not_before: _dt.datetime = field(compare=False)  # timezone-aware UTC
    not_after: _dt.datetime = field(compare=False)
    ski: bytes | None = field(compare=False)         # SubjectKeyIdentifier (a CI's is its CI PKID)
    aki: bytes | None = field(compare=False)         # AuthorityKeyIdentifier keyIdentifier
    policy_oids: tuple[str, ...] = field(compare=False)     # certificatePolicies (SGP.22 role OIDs)
    registered_ids: tuple[str, ...] = field(compare=False)  # SAN registeredID (the SM-DP+ OID)

    def to_pem(self) -> bytes:
        return to_pem(self.der)


def parse(der: bytes) -> Certificate:
    """One DER certificate (exactly: no trailing bytes)."""
    der = bytes(der)
    outer = _expect(_one(der, "DER"), _SEQUENCE, "Certificate")
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }, §4.1.1
    parts = _items(outer.value, "Certificate")
    if len(parts) != 3:
        raise _bad(f"{len(parts)} elements, expected tbsCertificate, signatureAlgorithm, signatureValue")
    tbs_t = _expect(parts[0], _SEQUENCE, "tbsCertificate")
    _expect(parts[1], _SEQUENCE, "signatureAlgorithm")
    _expect(parts[2], _BITS, "signatureValue")
    tbs = _items(tbs_t.value, "tbsCertificate")
    # TBSCertificate ::= SEQUENCE { version [0] EXPLICIT DEFAULT v1, serialNumber, signature,
    #   issuer, validity, subject, subjectPublicKeyInfo, [1] [2] uniqueIDs, [3] extensions }, §4.1.2
    if tbs and tbs[0].tag == 0xA0:
        v = _expect(_one(tbs[0].value, "version"), _INTEGER, "version").value
        if v not in (b"\x00", b"\x01", b"\x02"):
            raise _bad(f"version {v.hex()} is not v1, v2 or v3 (§4.1.2.1)")
        tbs = tbs[1:]
    if len(tbs) < 6:
        raise _bad(f"tbsCertificate has {len(tbs)} of its 6 required fields after the version")
    serial_t, sig_t, issuer_t, validity_t, subject_t, spki_t = tbs[:6]
    s = _expect(serial_t, _INTEGER, "serialNumber").value
    if not s or len(s) > MAX_SERIAL_OCTETS:
        raise _bad(f"serialNumber of {len(s)} octets (§4.1.2.2)")
    _expect(sig_t, _SEQUENCE, "tbsCertificate signature")
    issuer = _name(issuer_t, "issuer")
    subject = _name(subject_t, "subject")
    validity = _items(_expect(validity_t, _SEQUENCE, "validity").value, "validity")
    if len(validity) != 2:
        raise _bad("validity is not (notBefore, notAfter)")
    _expect(spki_t, _SEQUENCE, "subjectPublicKeyInfo")
    exts: dict[str, bytes] = {}
    optional = [0x81, 0x82, 0xA3]          # issuerUniqueID [1], subjectUniqueID [2], extensions [3]
    for t in tbs[6:]:
        if t.tag not in optional:
            raise _bad(f"unexpected or repeated tag {t.tag:02X} at the end of tbsCertificate")
        del optional[:optional.index(t.tag) + 1]
        if t.tag == 0xA3:
            exts = _extensions(t)
    return Certificate(
        der=der, serial=int.from_bytes(s, "big", signed=True), issuer=issuer, subject=subject,
        not_before=_time(validity[0], "validity notBefore"), not_after=_time(validity[1], "validity notAfter"),
        ski=_ski(exts[_EXT_SKI]) if _EXT_SKI in exts else None,
        aki=_aki(exts[_EXT_AKI]) if _EXT_AKI in exts else None,
        policy_oids=_policies(exts[_EXT_POLICIES]) if _EXT_POLICIES in exts else (),
        registered_ids=_registered_ids(exts[_EXT_SAN]) if _EXT_SAN in exts else ())


# --- PEM / DER containers -----------------------------------------------------------------------

_PEM_BLOCK = re.compile(rb"-----BEGIN (X509 CERTIFICATE|CERTIFICATE)-----(.*?)-----END \1-----", re.DOTALL)


def load_der(data: bytes) -> list[Certificate]:
    """One DER certificate or several concatenated."""
    return [parse(t.raw) for t in _items(bytes(data), "DER certificates")]


def load_pem(data: bytes | str) -> list[Certificate]:
    """Every CERTIFICATE block of a PEM text (RFC 7468), in order; text around and between the
    blocks (comments, other kinds of blocks) is ignored.  No certificate block is an error."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    out = []
    for m in _PEM_BLOCK.finditer(bytes(data)):
        try:
            der = base64.b64decode(b"".join(m.group(2).split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad(f"PEM block {len(out) + 1} is not base64 ({e})") from None
        out.append(parse(der))
    if not out:
        raise _bad("no -----BEGIN CERTIFICATE----- block in the PEM text")
    return out


def load(data: bytes | str) -> list[Certificate]:
    """PEM (any number of certificates) when the data holds a "-----BEGIN" line, else DER."""
    if isinstance(data, str) or b"-----BEGIN" in data:
        return load_pem(data)
    return load_der(data)


def to_pem(der: bytes) -> bytes:
    """PEM as OpenSSL writes it: 64 base64 characters a line."""
    b64 = base64.b64encode(bytes(der))
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"
