"""ESep: the end-to-end messages between an eIM and an eUICC (SGP.32 §2.11).

An eUICC Package (``BF51`` EuiccPackageRequest) is signed by the eIM and checked by
the eUICC; its result (``BF51`` EuiccPackageResult) is signed by the eUICC and checked
by the eIM.  The IPA in between only relays both byte for byte (docs/protocol.md §7).

This module is I/O-free and holds the one definition of what is signed, shared by
the simulated eUICC (verify packages, sign results), the local eIM (sign packages,
verify results) and the IPA (read results):

* eimSignature  = ECDSA(SK.eIM) over ``DER(euiccPackageSigned) ‖ associationToken TLV``
  (the ``84`` TLV only when the eUICC assigned the eIM a token) — SGP.32 §2.11.1.1;
* euiccSignEPR / euiccSignEPE = ECDSA(SK.EUICC.SIG) over
  ``DER(euiccPackageResultDataSigned or euiccPackageErrorDataSigned) ‖ associationToken TLV``
  in v1.1 and later (SGP.32 §2.11.2.1); v1.0 appended the request's ``5F37``
  eimSignature TLV instead.  ``result_signing_input`` takes the version.

Signatures are the plain r‖s form of BSI TR-03111 (64 bytes for P-256), as every
SGP.22 signature in a ``5F37`` (docs/protocol.md §4.4).

Verification always runs over the bytes as received (``signed_der`` below), never a
re-encoding: a BER-but-not-DER sender must fail, not be silently repaired.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import codec, crypto, tlv
from .errors import ProtocolError
from .ids import eid_from_bytes, eid_to_bytes, iccid_from_bytes

VERSIONS = ("1.2", "1.0")

# EuiccPackageErrorCode (SGP.32 §2.11.2.1)
INVALID_EID = 3
REPLAY_ERROR = 4
COUNTER_OUT_OF_RANGE = 6
SIZE_OVERFLOW = 15
UNDEFINED_ERROR = 127
# SGP.32 §2.11.1.1.1 bounds the counter; the upper value is the largest 3-byte
# positive INTEGER (docs/protocol.md §7).
COUNTER_MAX = 0x7FFFFF


def association_token_tlv(token: int | None) -> bytes:
    """The ``84`` TLV of an association token as it appears in EimConfigurationData."""
    if token is None:
        return b""
    return tlv.encode(0x84, _int_content(token))


def _int_content(n: int) -> bytes:
    """Minimal two's-complement INTEGER content octets (X.690 §8.3)."""
    length = max(1, (n.bit_length() + 8) // 8)
    return n.to_bytes(length, "big", signed=True)


def package_signing_input(signed_der: bytes, association_token: int | None) -> bytes:
    """What eimSignature covers (SGP.32 §2.11.1.1)."""
    return signed_der + association_token_tlv(association_token)


def result_signing_input(data_signed_der: bytes, *, association_token: int | None,
                         eim_signature: bytes | None, version: str = "1.2") -> bytes:
    """What euiccSignEPR / euiccSignEPE covers (SGP.32 §2.11.2.1; v1.0 differs)."""
    if version == "1.0":
        return data_signed_der + (tlv.encode(0x5F37, eim_signature) if eim_signature is not None else b"")
    return data_signed_der + association_token_tlv(association_token)


# --- eUICC Package Request ---------------------------------------------------------

@dataclass
class PackageRequest:
    """A decoded BF51 EuiccPackageRequest, with the bytes its signature covers."""
    eim_id: str
    eid: str
    counter: int
    transaction_id: bytes | None
    kind: str                  # "psmoList" | "ecoList"
    operations: list           # asn1tools values of the Psmo / Eco alternatives: [(name, value), ...]
    signed_der: bytes          # euiccPackageSigned exactly as received
    signature: bytes           # eimSignature (5F37 content)
    der: bytes                 # the whole BF51 as received

    def verify(self, public_key, association_token: int | None) -> bool:
        return crypto.verify_raw(public_key, package_signing_input(self.signed_der, association_token),
                                 self.signature)


def build_package_request(private_key, *, eim_id: str, eid: str, counter: int, operations: list,
                          kind: str = "psmoList", transaction_id: bytes | None = None,
                          association_token: int | None = None) -> bytes:
    """Sign and encode a BF51 EuiccPackageRequest (the eIM's side)."""
    signed = {"eimId": eim_id, "eidValue": eid_to_bytes(eid), "counterValue": counter,
              "euiccPackage": (kind, list(operations))}
    if transaction_id is not None:
        signed["eimTransactionId"] = transaction_id
    signed_der = codec.encode("EuiccPackageSigned", signed)
    sig = crypto.sign_raw(private_key, package_signing_input(signed_der, association_token))
    return tlv.encode(0xBF51, signed_der + tlv.encode(0x5F37, sig))


def decode_package_request(der: bytes) -> PackageRequest:
    """Parse a BF51 EuiccPackageRequest; ProtocolError (code ``bad_euicc_package``) if it is not one."""
    value = codec.decode("EuiccPackageRequest", der)
    outer = tlv.parse_single(der)
    kids = tlv.children(outer)
    if len(kids) != 2 or kids[0].tag != 0x30 or kids[1].tag != 0x5F37:
        raise ProtocolError("eUICC package: expected euiccPackageSigned then eimSignature",
                            code="bad_euicc_package")
    s = value["euiccPackageSigned"]
    kind, ops = s["euiccPackage"]
    return PackageRequest(eim_id=s["eimId"], eid=eid_from_bytes(s["eidValue"]), counter=s["counterValue"],
                          transaction_id=s.get("eimTransactionId"), kind=kind, operations=list(ops),
                          signed_der=kids[0].raw, signature=value["eimSignature"], der=der)


# --- eUICC Package Result ----------------------------------------------------------

@dataclass
class PackageResult:
    """A decoded BF51 EuiccPackageResult.

    ``kind`` is the CHOICE alternative: euiccPackageResultSigned (results),
    euiccPackageErrorSigned (``error``: EuiccPackageErrorCode) or
    euiccPackageErrorUnsigned (``error``: the unsigned code or None)."""
    kind: str
    eim_id: str
    counter: int | None = None
    transaction_id: bytes | None = None
    seq_number: int | None = None
    results: list = field(default_factory=list)   # [(alternative name, value), ...] of EuiccResultData
    error: int | None = None
    association_token: int | None = None
    signed_der: bytes | None = None               # the signed data object as received
    signature: bytes | None = None
    der: bytes = b""

    @property
    def ok(self) -> bool:
        return self.kind == "euiccPackageResultSigned"

    def verify(self, public_key, *, association_token: int | None, eim_signature: bytes | None = None,
               version: str = "1.2") -> bool:
        if self.signed_der is None or self.signature is None:
            return False
        data = result_signing_input(self.signed_der, association_token=association_token,
                                    eim_signature=eim_signature, version=version)
        return crypto.verify_raw(public_key, data, self.signature)


def sign_result(private_key, *, eim_id: str, counter: int, seq_number: int, results: list,
                transaction_id: bytes | None = None, association_token: int | None = None,
                eim_signature: bytes | None = None, version: str = "1.2") -> bytes:
    """Encode a signed BF51 EuiccPackageResult (the eUICC's side)."""
    data = {"eimId": eim_id, "counterValue": counter, "seqNumber": seq_number, "euiccResult": list(results)}
    if transaction_id is not None:
        data["eimTransactionId"] = transaction_id
    data_der = codec.encode("EuiccPackageResultDataSigned", data)
    sig = crypto.sign_raw(private_key, result_signing_input(
        data_der, association_token=association_token, eim_signature=eim_signature, version=version))
    return tlv.encode(0xBF51, tlv.encode(0xA0, data_der + tlv.encode(0x5F37, sig)))


def sign_error(private_key, *, eim_id: str, counter: int, error: int, transaction_id: bytes | None = None,
               association_token: int | None = None, eim_signature: bytes | None = None,
               version: str = "1.2") -> bytes:
    """Encode a signed BF51 EuiccPackageResult carrying euiccPackageErrorSigned."""
    data = {"eimId": eim_id, "counterValue": counter, "euiccPackageErrorCode": error}
    if transaction_id is not None:
        data["eimTransactionId"] = transaction_id
    data_der = codec.encode("EuiccPackageErrorDataSigned", data)
    sig = crypto.sign_raw(private_key, result_signing_input(
        data_der, association_token=association_token, eim_signature=eim_signature, version=version))
    return tlv.encode(0xBF51, tlv.encode(0xA1, data_der + tlv.encode(0x5F37, sig)))


def unsigned_error(*, eim_id: str, transaction_id: bytes | None = None, association_token: int | None = None,
                   error: int | None = None) -> bytes:
    """Encode BF51 euiccPackageErrorUnsigned (eIM unknown, or its signature does not verify)."""
    v: dict = {"eimId": eim_id}
    if transaction_id is not None:
        v["eimTransactionId"] = transaction_id
    if association_token is not None:
        v["associationToken"] = association_token
    if error is not None:
        v["euiccPackageUnsignedErrorCode"] = error
    return codec.encode("EuiccPackageResult", ("euiccPackageErrorUnsigned", v))


def decode_package_result(der: bytes) -> PackageResult:
    """Parse a BF51 EuiccPackageResult, keeping the signed bytes as received."""
    kind, v = codec.decode("EuiccPackageResult", der)
    if kind == "euiccPackageErrorUnsigned":
        return PackageResult(kind=kind, eim_id=v["eimId"], transaction_id=v.get("eimTransactionId"),
                             association_token=v.get("associationToken"),
                             error=v.get("euiccPackageUnsignedErrorCode"), der=der)
    inner = tlv.children(tlv.parse_single(der))[0]     # A0 / A1
    parts = tlv.children(inner)
    if len(parts) != 2 or parts[0].tag != 0x30 or parts[1].tag != 0x5F37:
        raise ProtocolError("eUICC package result: expected signed data then a signature",
                            code="bad_euicc_package_result")
    if kind == "euiccPackageResultSigned":
        d = v["euiccPackageResultDataSigned"]
        return PackageResult(kind=kind, eim_id=d["eimId"], counter=d["counterValue"],
                             transaction_id=d.get("eimTransactionId"), seq_number=d["seqNumber"],
                             results=list(d["euiccResult"]), signed_der=parts[0].raw,
                             signature=v["euiccSignEPR"], der=der)
    d = v["euiccPackageErrorDataSigned"]
    return PackageResult(kind=kind, eim_id=d["eimId"], counter=d["counterValue"],
                         transaction_id=d.get("eimTransactionId"), error=d["euiccPackageErrorCode"],
                         signed_der=parts[0].raw, signature=v["euiccSignEPE"], der=der)


def iccid_of(value: dict) -> str:
    """The ICCID of a PSMO body (``{iccid: bytes, ...}``) as digits."""
    return iccid_from_bytes(value["iccid"])
