"""Shared SGP.22 cryptography, free of I/O (docs/protocol.md §4).

Used from both sides of every exchange: the agent, the simulated eUICC and the
test SM-DP+.  Everything here works on bytes and ``cryptography`` objects.

* ECDSA with SHA-256.  Inside every ``5F37`` the signature is the 64-byte plain
  ``r||s`` form of BSI TR-03111 (docs/protocol.md §4.4); X.509 certificates keep
  the DER ECDSA-Sig-Value.  ``sign_raw``/``verify_raw`` speak the plain form.
* ECKA (ECDH) giving the shared secret ShS = X coordinate, then the ANSI X9.63
  KDF (SHA-256) to derive the BSP session keys (docs/protocol.md §4.5).
* Certificate helpers for the SGP.22 certificate profiles: role policy OIDs
  ``2.23.146.1.2.1.x``, the SM-DP+ OID as SAN registeredID, the EID as subject
  serialNumber, SKI/AKI (CI PKID), and a small chain check.  The agent's own
  path (TLS trust, the SM-DP+ OID check) reads the same fields without
  ``cryptography`` through cert.py; these read them from the ``cryptography``
  objects the simulator already holds (tests/test_cert.py checks both agree).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.x509.oid import ExtensionOID, NameOID

# One definition each, in cert.py (which the agent's TLS path uses without ``cryptography``):
# the role policy OIDs (docs/protocol.md §4.8) and the error classes, re-exported here.
from .cert import ROLE_NAMES, ROLE_OID_PREFIX, ROLE_OIDS, CertError, CryptoError  # noqa: F401

SECP256R1 = ec.SECP256R1
BRAINPOOLP256R1 = ec.BrainpoolP256R1


# --- ECDSA (plain r||s inside 5F37) ---------------------------------------

def _field_len(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


def as_public_key(key) -> ec.EllipticCurvePublicKey:
    """The EC public key of a public key, private key or certificate."""
    if isinstance(key, x509.Certificate):
        key = key.public_key()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CryptoError(f"expected an EC public key or certificate, got {type(key).__name__}",
                          code="bad_key")
    return key


def sign_raw(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-SHA256 over ``data``; returns plain r||s (64 bytes for 256-bit curves)."""
    der = private_key.sign(bytes(data), ec.ECDSA(hashes.SHA256()))
    return der_to_raw(der, _field_len(private_key.curve))


def verify_raw(public_key, data: bytes, sig: bytes) -> bool:
    """Check a plain r||s signature.  False for a wrong *or malformed* signature.

    ``public_key`` may be a public key, a private key or a certificate."""
    pub = as_public_key(public_key)
    n = _field_len(pub.curve)
    if not isinstance(sig, (bytes, bytearray)) or len(sig) != 2 * n:
        return False
    try:
        der = raw_to_der(bytes(sig))
    except (ValueError, CryptoError):
        return False
    try:
        pub.verify(der, bytes(data), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def raw_to_der(sig: bytes) -> bytes:
    """Plain r||s (even length) -> DER ECDSA-Sig-Value."""
    if len(sig) == 0 or len(sig) % 2:
        raise CryptoError(f"plain ECDSA signature must have an even, non-zero length, got {len(sig)}",
                          code="bad_signature_format")
    half = len(sig) // 2
    return encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))


def der_to_raw(der: bytes, size: int = 32) -> bytes:
    """DER ECDSA-Sig-Value -> plain r||s, each left-padded to ``size`` bytes."""
    try:
        r, s = decode_dss_signature(bytes(der))
    except ValueError as e:
        raise CryptoError(f"malformed DER ECDSA signature: {e}", code="bad_signature_format") from None
    if r.bit_length() > 8 * size or s.bit_length() > 8 * size:
        raise CryptoError(f"ECDSA signature integers do not fit {size} bytes", code="bad_signature_format")
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# --- EC points and ECKA -----------------------------------------------------

def public_point(key) -> bytes:
    """Uncompressed point 04||X||Y of a private key, public key or certificate."""
    return as_public_key(key).public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)


def _curve_instance(curve) -> ec.EllipticCurve:
    if isinstance(curve, type):
        return curve()
    return curve


def point_to_public(point: bytes, curve=SECP256R1) -> ec.EllipticCurvePublicKey:
    """Uncompressed point -> public key, raising CryptoError if it is not on the curve."""
    c = _curve_instance(curve)
    n = _field_len(c)
    point = bytes(point)
    if len(point) != 1 + 2 * n or point[0] != 0x04:
        raise CryptoError(
            f"EC public key must be an uncompressed point (04||X||Y, {1 + 2 * n} bytes) "
            f"on {c.name}; got {len(point)} bytes starting {point[:1].hex() or 'nothing'}",
            code="bad_point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(c, point)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CryptoError(f"EC public key is not a valid point on {c.name}: {e}", code="bad_point") from None


def generate_key(curve=SECP256R1) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_curve_instance(curve))


def ecka(private_key: ec.EllipticCurvePrivateKey, peer_point: bytes) -> bytes:
    """ECKA-DH (BSI TR-03111): the shared secret ShS is the X coordinate."""
    peer = point_to_public(peer_point, private_key.curve)
    return private_key.exchange(ec.ECDH(), peer)


def x963_kdf(shs: bytes, shared_info: bytes, length: int) -> bytes:
    """ANSI X9.63 KDF with SHA-256 (counter from 1, 32-bit big-endian)."""
    return X963KDF(algorithm=hashes.SHA256(), length=length, sharedinfo=bytes(shared_info)).derive(bytes(shs))


@dataclass(frozen=True)
class BspKeys:
    """The BSP session keys and initial MAC chaining value (docs/protocol.md §4.5)."""
    initial_mcv: bytes
    s_enc: bytes
    s_mac: bytes


def bsp_shared_info(*, key_type: int = 0x88, key_len: int = 16, host_id: bytes, eid: bytes) -> bytes:
    """SharedInfo = keyType || keyLen || len(hostId) || hostId || len(EID) || EID (docs/protocol.md §4.5)."""
    host_id, eid = bytes(host_id), bytes(eid)
    if len(host_id) > 255:
        raise CryptoError("hostId longer than 255 bytes", code="bad_host_id")
    if len(eid) != 16:
        raise CryptoError(f"EID must be 16 bytes in the KDF, got {len(eid)}", code="bad_eid")
    return bytes([key_type, key_len, len(host_id)]) + host_id + bytes([len(eid)]) + eid


def derive_bsp_keys(shs: bytes, *, key_type: int = 0x88, key_len: int = 16,
                    host_id: bytes, eid: bytes) -> BspKeys:
    """X9.63 KDF over ShS; output split initial MCV | S-ENC | S-MAC (docs/protocol.md §4.5)."""
    info = bsp_shared_info(key_type=key_type, key_len=key_len, host_id=host_id, eid=eid)
    out = x963_kdf(shs, info, 3 * key_len)
    return BspKeys(out[:key_len], out[key_len:2 * key_len], out[2 * key_len:])


# --- Certificates and keys ----------------------------------------------------

#: What cryptography raises for a certificate it parsed but whose parts are unusable: a bad
#: extension or name (ValueError), an extension listed twice (RFC 5280 §4.2 forbids it), a
#: GeneralName type it does not support.  Not ValueError subclasses, so named here.
_CERT_DEFECTS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _parsed(cert: x509.Certificate) -> x509.Certificate:
    """Touch the lazily parsed parts now, so a defect is a CertError at load time and not a
    bare exception from whichever check reads the extensions first."""
    try:
        cert.extensions
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
    except _CERT_DEFECTS as e:
        raise CertError("malformed", f"cannot parse certificate: {e}") from None
    return cert


def load_cert(data: bytes | str) -> x509.Certificate:
    """Load a certificate from DER or PEM bytes (or PEM text)."""
    if isinstance(data, str):
        data = data.encode()
    data = bytes(data)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise CertError("malformed", f"cannot parse certificate: {e}") from None
    return _parsed(cert)


def load_certs(data: bytes | str) -> list[x509.Certificate]:
    """All certificates of a PEM bundle (or one DER certificate)."""
    if isinstance(data, str):
        data = data.encode()
    if bytes(data).lstrip().startswith(b"-----BEGIN"):
        try:
            certs = x509.load_pem_x509_certificates(bytes(data))
        except ValueError as e:
            raise CertError("malformed", f"cannot parse PEM certificates: {e}") from None
        return [_parsed(c) for c in certs]
    return [load_cert(data)]


def load_key(data: bytes | str, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key from PEM (PKCS#8 or SEC1) or DER PKCS#8."""
    if isinstance(data, str):
        data = data.encode()
    data = bytes(data)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password)
        else:
            key = serialization.load_der_private_key(data, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CryptoError(f"cannot parse private key: {e}", code="bad_key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CryptoError(f"expected an EC private key, got {type(key).__name__}", code="bad_key")
    return key


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ext(cert: x509.Certificate, oid):
    try:
        return cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    except _CERT_DEFECTS as e:  # unparsable or duplicated extension
        raise CertError("malformed", f"certificate extension {oid.dotted_string} is malformed: {e}") from None


def ski(cert: x509.Certificate) -> bytes | None:
    """SubjectKeyIdentifier (a CI's SKI is its CI PKID)."""
    v = _ext(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    return v.digest if v is not None else None


def aki(cert: x509.Certificate) -> bytes | None:
    """AuthorityKeyIdentifier keyIdentifier."""
    v = _ext(cert, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    return v.key_identifier if v is not None else None


def role_oids(cert: x509.Certificate) -> list[str]:
    """Certificate policy OIDs (the SGP.22 role is one of ROLE_OIDS)."""
    v = _ext(cert, ExtensionOID.CERTIFICATE_POLICIES)
    return [p.policy_identifier.dotted_string for p in v] if v is not None else []


def roles(cert: x509.Certificate) -> list[str]:
    """Role names (ci, euicc, eum, dp-tls, dp-auth, dp-pb, …) found in the policies."""
    return [ROLE_NAMES[o] for o in role_oids(cert) if o in ROLE_NAMES]


def smdp_oid(cert: x509.Certificate) -> str | None:
    """The SM-DP+ OID: SAN registeredID of CERT.DPauth / CERT.DPpb."""
    v = _ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if v is None:
        return None
    ids = v.get_values_for_type(x509.RegisteredID)
    return ids[0].dotted_string if ids else None


def eid_of(cert: x509.Certificate) -> str | None:
    """The EID: subject serialNumber of CERT.EUICC (32 digits)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return str(attrs[0].value) if attrs else None


def is_ca(cert: x509.Certificate) -> bool | None:
    """basicConstraints cA, or None when the extension is absent."""
    v = _ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    return None if v is None else bool(v.ca)


def _signature_ok(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _names_issuer(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Issuer DN matches, and AKI = SKI when both are present."""
    if cert.issuer != issuer.subject:
        return False
    a, s = aki(cert), ski(issuer)
    return a is None or s is None or a == s


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer`` is named by ``cert`` (DN and AKI/SKI) and its key signed ``cert``."""
    return _names_issuer(cert, issuer) and _signature_ok(cert, issuer)


def _now(now: _dt.datetime | None) -> _dt.datetime:
    if now is None:
        return _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=_dt.timezone.utc)
    return now


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def check_validity(cert: x509.Certificate, now: _dt.datetime | None = None) -> None:
    """Raise CertError(expired | not_yet_valid) if ``now`` is outside the validity period."""
    now = _now(now)
    if now < cert.not_valid_before_utc:
        raise CertError("not_yet_valid", f"certificate {_subject(cert)} is not valid before "
                        f"{cert.not_valid_before_utc.isoformat()} (check the system clock)")
    if now > cert.not_valid_after_utc:
        raise CertError("expired", f"certificate {_subject(cert)} expired on "
                        f"{cert.not_valid_after_utc.isoformat()}")


def _role_oid(role: str) -> str:
    return ROLE_OIDS.get(role, role)


def verify_chain(leaf: x509.Certificate, intermediates: Iterable[x509.Certificate],
                 trusted_roots: Iterable[x509.Certificate], *, role: str | None,
                 now: _dt.datetime | None = None, max_depth: int = 4) -> list[x509.Certificate]:
    """Check ``leaf`` up to one of ``trusted_roots``; return the path [leaf, …, root].

    ``role`` is a role name from ROLE_OIDS ("euicc", "eum", "dp-auth", "dp-pb",
    "dp-tls", …) or a policy OID the leaf must carry; None skips the role check.
    Every certificate on the path (the root too) must be inside its validity
    period; every issuer must carry basicConstraints cA=TRUE.

    Raises CertError with reason expired, not_yet_valid, bad_signature,
    unknown_issuer, wrong_role or not_ca.
    """
    now = _now(now)
    intermediates = list(intermediates)
    roots = list(trusted_roots)
    if role is not None:
        want = _role_oid(role)
        if want not in role_oids(leaf):
            raise CertError("wrong_role", f"certificate {_subject(leaf)} does not carry the "
                            f"{role} policy {want} (it has {role_oids(leaf) or 'none'})")
    path = [leaf]
    cur = leaf
    while True:
        check_validity(cur, now)
        issuer, is_root = _find_issuer(cur, roots, intermediates)
        if issuer != cur and not is_ca(issuer):
            # RFC 5280 §4.2.1.9; every SGP.22 CI and EUM certificate carries cA=TRUE.
            raise CertError("not_ca", f"issuer {_subject(issuer)} is not a CA (no basicConstraints cA)")
        if is_root:
            if issuer != cur:  # a trusted self-signed leaf is its own path
                check_validity(issuer, now)
                path.append(issuer)
            return path
        if issuer in path or len(path) > max_depth:
            raise CertError("unknown_issuer", f"certificate chain of {_subject(leaf)} loops or is "
                            f"longer than {max_depth} without reaching a trusted root")
        path.append(issuer)
        cur = issuer


def _find_issuer(cur: x509.Certificate, roots: list, intermediates: list) -> tuple[x509.Certificate, bool]:
    """Trusted roots first, then intermediates; bad_signature if only impostors match."""
    for pool, is_root in ((roots, True), (intermediates, False)):
        named = [c for c in pool if _names_issuer(cur, c)]
        if not named:
            continue
        for c in named:
            if _signature_ok(cur, c):
                return c, is_root
        raise CertError("bad_signature", f"signature on {_subject(cur)} does not verify with "
                        f"the key of its issuer {_subject(named[0])}")
    a = aki(cur)
    raise CertError("unknown_issuer", f"no trusted issuer for {_subject(cur)} "
                    f"(issuer {cur.issuer.rfc4514_string()}{', AKI ' + a.hex() if a else ''})")


def eid_permitted(eum: x509.Certificate, eid: str) -> bool | None:
    """Does the EUM's nameConstraints allow this EID?  None when it has no constraint.

    SGP.22 EUM certificates restrict the EIDs they may issue with permitted
    directoryName subtrees whose serialNumber is an EID prefix (the IIN); we read
    only that form (the GSMA extension 2.23.146.1.2.2.0 is not modelled)."""
    v = _ext(eum, ExtensionOID.NAME_CONSTRAINTS)
    if v is None or not v.permitted_subtrees:
        return None
    prefixes = []
    for gn in v.permitted_subtrees:
        if isinstance(gn, x509.DirectoryName):
            for a in gn.value.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
                prefixes.append(str(a.value))
    if not prefixes:
        return None
    return any(eid.startswith(p) for p in prefixes)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
