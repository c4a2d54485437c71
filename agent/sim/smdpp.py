"""Local SM-DP+ for the test bed: ES9+ (SGP.22 JSON binding) plus the reservation API.

One HTTPS server on loopback (TLS >= 1.2 with CERT.DP.TLS from the test PKI) serves

* ``POST /gsma/rsp2/es9plus/{initiateAuthentication, authenticateClient,
  getBoundProfilePackage, handleNotification, cancelSession}`` — docs/protocol.md §3, §4, §6;
* ``/v1/ESimProfiles`` and ``/v1/Sims`` — the Super SIM-style reservation API
  (``agent.sim.twin``), which is also where download orders come from.

The ES9+ side (:class:`Es9Service`) is I/O free: JSON-decoded request in, (HTTP status,
JSON body) out. Signed eUICC data is always taken byte-for-byte out of the TLVs it
arrived in (docs/protocol.md §0.6) — nothing is decoded and re-encoded before verification.

Business errors are HTTP 200 with ``header.functionExecutionStatus.status = "Failed"``
and ``statusCodeData`` (SGP.22 subjectCode/reasonCode, docs/protocol.md §3.5); malformed
requests that are not JSON at all get HTTP 400 with the same envelope.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from cryptography.hazmat.primitives.asymmetric import ec
from urllib.parse import urlsplit

from .. import asn1tables, codec, crypto, tlv
from ..bpp import BPP_COMMAND_NAMES
from ..errors import AgentError, ProtocolError
from ..ids import eid_to_bytes, iccid_from_bytes, iccid_to_bytes
from .profiles import SERVICE_PROVIDER, profile_name
from .twin import OrderRefused, TwinApi, TwinStore

ES9_PREFIX = "/gsma/rsp2/es9plus/"
ADMIN_PROTOCOL = "gsma/rsp/v2.2.0"
JSON_CT = "application/json;charset=UTF-8"
MAX_BODY = 1 << 20                 # ES9+ messages are a few kB; a BPP response is not a request
SESSION_TTL = 600.0                # seconds an unfinished download session is kept
MAX_SESSIONS = 1000
CC_ATTEMPTS = 3                    # wrong Confirmation Codes before the order fails (8.2.7/6.4)
SOCKET_TIMEOUT = 30.0

# NotificationEvent bits (docs/protocol.md §6.2): DER BIT STRING contents with trailing zeros dropped.
PMO_BITS = {"install": b"\x07\x80", "enable": b"\x06\x40", "disable": b"\x05\x20", "delete": b"\x04\x10"}
# The same events as codec BIT STRING values (bytes, number of bits).
PMO_VALUES = {"install": (b"\x80", 1), "enable": (b"\x40", 2), "disable": (b"\x20", 3), "delete": (b"\x10", 4)}


AUTH_ERRORS = {1: "invalidCertificate", 2: "invalidSignature", 3: "unsupportedCurve",
               4: "noSessionContext", 5: "invalidOid", 6: "euiccChallengeMismatch",
               7: "ciPKUnknown", 127: "undefinedError"}
PREPARE_ERRORS = {1: "invalidCertificate", 2: "invalidSignature", 3: "unsupportedCurve",
                  4: "noSessionContext", 5: "invalidTransactionId", 127: "undefinedError"}
CANCEL_REASONS = {0: "endUserRejection", 1: "postponed", 2: "timeout", 3: "pprNotAllowed",
                  4: "metadataMismatch", 5: "loadBppExecutionError", 127: "undefinedReason"}
CANCEL_ERRORS = {5: "invalidTransactionId", 127: "undefinedError"}
# Cancellation reasons after which the order stays downloadable (SGP.22 §3.1.3 / §5.6.5):
# the user or the device deferred the download (postponed, timeout), or loading failed
# on the device's side before anything was installed (loadBppExecutionError, undefined).
CANCEL_KEEPS_ORDER = {1, 2, 5, 127}
# ErrorReason with the SGP.22 ASN.1 names, as an SM-DP+ reports them (the agent's codes
# come from es8p's short names).
BPP_ERRORS = {1: "incorrectInputValues", 2: "invalidSignature", 3: "invalidTransactionId",
              4: "unsupportedCrtValues", 5: "unsupportedRemoteOperationType",
              6: "unsupportedProfileClass", 7: "scp03tStructureError", 8: "scp03tSecurityError",
              9: "installFailedDueToIccidAlreadyExistsOnEuicc",
              10: "installFailedDueToInsufficientMemoryForProfile",
              11: "installFailedDueToInterruption", 12: "installFailedDueToPEProcessingError",
              13: "installFailedDueToIccidMismatch", 14: "testProfileInstallFailedDueToInvalidNaaKey",
              15: "pprNotAllowed", 127: "installFailedDueToUnknownError"}


_log = logging.getLogger("agent.sim.smdpp")


def log(msg: str) -> None:
    """Request log: shown by `esim-agent sim smdpp`, silent when embedded (demo, bench, tests)."""
    _log.info("%s", msg)


def _log_to_stderr() -> None:
    if not _log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("smdpp: %(message)s"))
        _log.addHandler(h)
    _log.setLevel(logging.INFO)


class Es9Failure(Exception):
    """A Failed functionExecutionStatus (subjectCode, reasonCode, message)."""

    def __init__(self, subject: str, reason: str, message: str, *, http_status: int = 200):
        super().__init__(message)
        self.subject, self.reason, self.message, self.http_status = subject, reason, message, http_status


def _fail(subject, reason, message, **kw) -> Es9Failure:
    return Es9Failure(subject, reason, message, **kw)


# --- message helpers ---------------------------------------------------------------------------


def pmo_name(value) -> str:
    """NotificationEvent (codec value) -> install | enable | disable | delete | unknown."""
    data, nbits = value
    bits = [i for i in range(nbits) if data[i // 8] & (0x80 >> (i % 8))]
    names = ("install", "enable", "disable", "delete")
    return names[bits[0]] if len(bits) == 1 and bits[0] < 4 else "unknown"


def _decode(type_name: str, raw: bytes, what: str, subject: str = "8.1"):
    """codec.decode with malformed input mapped to Failed <subject>/2.1."""
    try:
        return codec.decode(type_name, raw)
    except ProtocolError as e:
        raise _fail(subject, "2.1", f"{what} is malformed: {e.message}") from None


def _sig_tlv(sig: bytes) -> bytes:
    return tlv.encode(0x5F37, sig)


def _fields(t: tlv.Tlv, what: str, subject: str = "8.1") -> dict[int, tlv.Tlv]:
    """Children of a constructed TLV by tag (the first of each)."""
    try:
        kids = tlv.children(t)
    except ProtocolError as e:
        raise _fail(subject, "2.1", f"{what} is malformed: {e.message}") from None
    out: dict[int, tlv.Tlv] = {}
    for k in kids:
        out.setdefault(k.tag, k)
    return out


def _need(fields: dict, tag: int, what: str, subject: str = "8.1") -> tlv.Tlv:
    if tag not in fields:
        raise _fail(subject, "2.2", f"{what}: mandatory element {tag:X} is missing")
    return fields[tag]


# --- ES9+ service -----------------------------------------------------------------------------


@dataclass
class Session:
    txid: bytes
    euicc_challenge: bytes
    server_challenge: bytes
    ci_pkid: bytes
    created: float = field(default_factory=time.monotonic)
    stage: str = "initiated"           # initiated → authenticated → bound
    eid: str | None = None
    euicc_cert: object = None
    order_sid: str | None = None
    iccid: str | None = None
    cc_required: bool = False
    smdp_signature2_tlv: bytes = b""
    profile_metadata: bytes = b""
    bpp: bytes | None = None
    prepare_response: bytes | None = None


class Es9Service:
    """SM-DP+ side of ES9+; ``call(function, request_dict) -> (http_status, body | None)``."""

    def __init__(self, pki, store: TwinStore, *, cc_attempts: int = CC_ATTEMPTS,
                 profile_size: int | None = None, session_ttl: float = SESSION_TTL):
        self.pki = pki
        self.session_ttl = float(session_ttl)
        self.profile_size = profile_size
        self.store = store
        self.cc_attempts = cc_attempts
        self.sessions: dict[bytes, Session] = {}
        self._lock = threading.Lock()
        self.ci_pkid = crypto.ski(pki.ci.cert)
        self.smdp_oid = crypto.smdp_oid(pki.dpauth.cert) or pki.smdp_oid
        self.host_id = self.smdp_oid.encode()
        self._configure_isdp: bytes | None = None

    @property
    def address(self) -> str:
        return self.store.smdp_address

    def warm(self) -> None:
        """Do the one-time work of a first download ahead of it: load the ASN.1 tables, import
        the profile package and BPP code, and bind a throw-away package once (first use of
        every primitive). ``sim smdpp`` runs this in the background at start, so the first
        download's answers are as quick as later ones'; it touches no session or order."""
        from ..es8p import bind_bpp
        from .upp import make_upp
        asn1tables.warm()
        otpk = crypto.public_point(crypto.generate_key(self.pki.dppb.key.curve))
        upp = make_upp(iccid="89999000000000000000", imsi="001010000000000", ki=bytes(16), opc=bytes(16))
        metadata = codec.encode("StoreMetadataRequest", {"iccid": iccid_to_bytes("89999000000000000000"),
                                                         "serviceProviderName": SERVICE_PROVIDER,
                                                         "profileName": "warm-up"})
        bind_bpp(transaction_id=bytes(16), euicc_otpk=otpk, dppb_key=self.pki.dppb.key, eid=bytes(16),
                 host_id=self.host_id, configure_isdp=self.configure_isdp(), store_metadata=metadata, upp=upp)

    # Entry point -----------------------------------------------------------------------------

    FUNCTIONS = ("initiateAuthentication", "authenticateClient", "getBoundProfilePackage",
                 "handleNotification", "cancelSession")

    def call(self, function: str, req: dict) -> tuple[int, dict | None]:
        with self._lock:
            self._expire()
        handler = getattr(self, "_" + function, None) if function in self.FUNCTIONS else None
        if handler is None:
            raise _fail("1.2.1", "3.1", f"unknown ES9+ function {function!r}", http_status=404)
        if not isinstance(req, dict):
            raise _fail("1.2.1", "2.1", "request body must be a JSON object")
        try:
            out = handler(req)
        except AgentError as e:
            # A library check (certificate, key, TLV) tripped over content we did not
            # anticipate: still the caller's data, so a Failed status, not a server error.
            raise _fail("8.1", "2.1", f"{function}: unusable request content: {e.message}") from None
        if out is None:
            return 204, None
        return 200, {"header": {"functionExecutionStatus": {"status": "Executed-Success"}}, **out}

    @staticmethod
    def failure_body(f: Es9Failure) -> dict:
        return {"header": {"functionExecutionStatus": {
            "status": "Failed",
            "statusCodeData": {"subjectCode": f.subject, "reasonCode": f.reason, "message": f.message}}}}

    # Request field helpers ------------------------------------------------------------------------

    @staticmethod
    def _str(req: dict, name: str, subject: str) -> str:
        v = req.get(name)
        if v is None:
            raise _fail(subject, "2.2", f"mandatory field {name} is missing")
        if not isinstance(v, str):
            raise _fail(subject, "2.1", f"field {name} must be a string")
        return v

    def _b64(self, req: dict, name: str, subject: str = "8.1") -> bytes:
        v = self._str(req, name, subject)
        try:
            # Some Java LPAs wrap base64 lines (CRLF every 76 characters): accept that.
            return base64.b64decode(re.sub(r"[\r\n\t ]", "", v), validate=True)
        except (binascii.Error, ValueError):
            raise _fail(subject, "2.1", f"field {name} is not valid base64") from None

    def _tlv(self, req: dict, name: str, tags: tuple[int, ...], subject: str = "8.1") -> tlv.Tlv:
        raw = self._b64(req, name, subject)
        try:
            t = tlv.parse_single(raw)
        except ProtocolError as e:
            raise _fail(subject, "2.1", f"field {name} is not one DER TLV: {e.message}") from None
        if t.tag not in tags:
            want = " or ".join(f"{x:X}" for x in tags)
            raise _fail(subject, "2.1", f"field {name} starts with tag {t.tag:X}, expected {want}")
        return t

    def _session(self, req: dict, *stages: str) -> Session:
        hexid = self._str(req, "transactionId", "8.10.1")
        try:
            txid = bytes.fromhex(hexid)
        except ValueError:
            raise _fail("8.10.1", "2.1", "transactionId must be a hex string") from None
        with self._lock:
            self._expire()
            s = self.sessions.get(txid)
        if s is None:
            raise _fail("8.10.1", "3.9", f"unknown transactionId {hexid}")
        if s.stage not in stages:
            raise _fail("8.10.1", "3.9", f"transaction {hexid} is at step {s.stage}; "
                                         "this call does not fit there")
        return s

    def _expire(self) -> None:
        """Forget sessions older than ``session_ttl``. A session that handed out its BPP and
        never got a result (the eUICC lost its session: a power cut while loading, so no
        signed CancelSession can ever come) gives its order back: the same EID may try
        again, since single use means one installed profile, not one HTTP answer. If the
        profile did install, its PIR (delivered from the device's outbox) still finds the
        order by ICCID and marks it installed."""
        now = time.monotonic()
        for k in [k for k, s in self.sessions.items() if now - s.created > self.session_ttl]:
            s = self.sessions.pop(k)
            if s.stage == "bound" and s.order_sid:
                rec = self.store.release(s.order_sid)
                if rec is not None:
                    log(f"session {k.hex().upper()} expired after its BPP without a result: "
                        f"order {s.order_sid} is available again")

    def _drop(self, s: Session) -> None:
        with self._lock:
            self.sessions.pop(s.txid, None)

    # initiateAuthentication (docs/protocol.md §4) --------------------------------------------

    def _initiateAuthentication(self, req: dict) -> dict:
        challenge = self._b64(req, "euiccChallenge")
        if len(challenge) != 16:
            raise _fail("8.1", "2.1", f"euiccChallenge must be 16 bytes, got {len(challenge)}")
        info1 = self._tlv(req, "euiccInfo1", (0xBF20,))
        address = self._str(req, "smdpAddress", "8.8.1")
        if address.strip().lower() != self.address.lower():
            raise _fail("8.8.1", "3.8", f"this SM-DP+ is {self.address}, not {address!r}")
        info = _decode("EUICCInfo1", info1.raw, "euiccInfo1")
        if self.ci_pkid not in info["euiccCiPKIdListForSigning"]:
            raise _fail("8.8.2", "3.1", "none of the eUICC's CIs (euiccCiPKIdListForSigning) "
                                        f"issued this SM-DP+'s certificates (CI {self.ci_pkid.hex()})")
        if self.ci_pkid not in info["euiccCiPKIdListForVerification"]:
            raise _fail("8.8.4", "3.7", "the eUICC cannot verify CERT.DPauth: CI "
                                        f"{self.ci_pkid.hex()} is not in euiccCiPKIdListForVerification")
        txid, server_challenge = os.urandom(16), os.urandom(16)
        signed1 = codec.encode("ServerSigned1", {"transactionId": txid, "euiccChallenge": challenge,
                                                 "serverAddress": self.address, "serverChallenge": server_challenge})
        sig1 = crypto.sign_raw(self.pki.dpauth.key, signed1)
        with self._lock:
            self._expire()
            if len(self.sessions) >= MAX_SESSIONS:
                oldest = min(self.sessions.values(), key=lambda s: s.created)
                del self.sessions[oldest.txid]
            self.sessions[txid] = Session(txid, challenge, server_challenge, self.ci_pkid)
        return {"transactionId": txid.hex().upper(),
                "serverSigned1": _b64e(signed1),
                "serverSignature1": _b64e(_sig_tlv(sig1)),
                "euiccCiPKIdToBeUsed": _b64e(tlv.encode(0x04, self.ci_pkid)),
                "serverCertificate": _b64e(crypto.cert_der(self.pki.dpauth.cert))}

    # authenticateClient ---------------------------------------------------------------------------

    def _verify_euicc_chain(self, euicc_der: bytes, eum_der: bytes):
        """CERT.EUM against our CI (8.1.2), CERT.EUICC against the EUM (8.1.3); returns (euicc, eid)."""
        try:
            eum = crypto.load_cert(eum_der)
        except AgentError as e:
            raise _fail("8.1.2", "6.1", f"CERT.EUM unreadable: {e.message}") from None
        try:
            crypto.verify_chain(eum, [], [self.pki.ci.cert], role="eum")
        except crypto.CertError as e:
            raise _fail("8.1.2", "6.3" if e.reason == "expired" else "6.1", f"CERT.EUM: {e.message}") from None
        try:
            euicc = crypto.load_cert(euicc_der)
        except AgentError as e:
            raise _fail("8.1.3", "6.1", f"CERT.EUICC unreadable: {e.message}") from None
        try:
            crypto.verify_chain(euicc, [], [eum], role="euicc")
        except crypto.CertError as e:
            raise _fail("8.1.3", "6.3" if e.reason == "expired" else "6.1",
                        f"CERT.EUICC: {e.message}") from None
        if not isinstance(euicc.public_key(), ec.EllipticCurvePublicKey):
            raise _fail("8.1.3", "6.1", "CERT.EUICC does not carry an EC public key")
        eid = crypto.eid_of(euicc)
        if not eid or len(eid) != 32 or not eid.isdigit():
            raise _fail("8.1.3", "6.1", f"CERT.EUICC subject serialNumber {eid!r} is not an EID")
        if crypto.eid_permitted(eum, eid) is False:
            raise _fail("8.1.3", "6.1", f"EID {eid} is outside the EUM's permitted range")
        return euicc, eid

    def _ok_alternative(self, s: "Session", resp: tlv.Tlv, function: str, err_alt: str, err_field: str,
                        errors: dict) -> tlv.Tlv:
        """An eUICC response CHOICE: return the A0 (ok) alternative; on A1 the eUICC
        refused, which ends the session (SGP.22 §5.6.2, §5.6.3)."""
        type_name = f"{function}Response"
        try:
            alt = tlv.parse_single(resp.value)
        except ProtocolError as e:
            raise _fail("8.1", "2.1", f"{type_name} is malformed: {e.message}") from None
        if alt.tag == 0xA1:
            _, err = _decode(type_name, resp.raw, err_alt)
            code = err[err_field]
            self._drop(s)
            raise _fail("8.1", "3.8", f"the eUICC refused {function}: {errors.get(code, 'error')} ({code})")
        if alt.tag != 0xA0:
            raise _fail("8.1", "2.1", f"{type_name} holds tag {alt.tag:X}, expected A0 or A1")
        return alt

    def _authenticateClient(self, req: dict) -> dict:
        s = self._session(req, "initiated")
        resp = self._tlv(req, "authenticateServerResponse", (0xBF38,))
        alt = self._ok_alternative(s, resp, "AuthenticateServer", "authenticateResponseError",
                                   "authenticateErrorCode", AUTH_ERRORS)
        ok = _fields(alt, "authenticateResponseOk")
        signed1 = _need(ok, 0x30, "authenticateResponseOk.euiccSigned1")
        sig1 = _need(ok, 0x5F37, "authenticateResponseOk.euiccSignature1")
        try:
            kids = [k for k in tlv.children(alt) if k.tag == 0x30]
        except ProtocolError as e:  # pragma: no cover - _fields parsed the same bytes
            raise _fail("8.1", "2.1", str(e)) from None
        if len(kids) != 3:
            raise _fail("8.1", "2.2", "authenticateResponseOk must carry euiccSigned1, CERT.EUICC and CERT.EUM")
        euicc_cert, eid = self._verify_euicc_chain(kids[1].raw, kids[2].raw)
        # euiccSignature1 covers euiccSigned1 exactly as the eUICC encoded it (docs/protocol.md §4.3).
        if not crypto.verify_raw(euicc_cert, signed1.raw, sig1.value):
            raise _fail("8.1", "6.1", "euiccSignature1 does not verify with CERT.EUICC")
        f1 = _fields(signed1, "euiccSigned1")
        if _need(f1, 0x80, "euiccSigned1.transactionId").value != s.txid:
            raise _fail("8.10.1", "3.9", "euiccSigned1.transactionId is not this session's")
        if _need(f1, 0x84, "euiccSigned1.serverChallenge").value != s.server_challenge:
            raise _fail("8.1", "6.1", "serverChallenge in euiccSigned1 does not match the one we sent")
        if _need(f1, 0x83, "euiccSigned1.serverAddress").value.decode("utf-8", "replace").lower() \
                != self.address.lower():
            raise _fail("8.8.1", "3.8", "euiccSigned1.serverAddress is not this SM-DP+")
        ctx = _need(f1, 0xA0, "euiccSigned1.ctxParams1")
        kind, common = _decode("CtxParams1", ctx.raw, "ctxParams1")
        if kind != "ctxParamsForCommonAuthentication":
            raise _fail("8.1", "2.1", f"ctxParams1 is {kind}, not ctxParamsForCommonAuthentication")
        matching_id = common.get("matchingId")
        self.store.remember_cert(eid, kids[1].raw)
        try:
            order = self.store.claim(matching_id=matching_id or None, eid=eid)
        except OrderRefused as e:
            self._drop(s)
            raise _fail(e.subject, e.reason, e.message) from None
        s.eid, s.euicc_cert, s.order_sid, s.iccid = eid, euicc_cert, order["sid"], order["iccid"]
        s.cc_required = bool(order.get("_cc"))
        s.profile_metadata = self.profile_metadata(order)
        signed2 = codec.encode("SmdpSigned2", {"transactionId": s.txid, "ccRequiredFlag": s.cc_required})
        # smdpSignature2 covers smdpSigned2 followed by the eUICC's 5F37 TLV (docs/protocol.md §4.3).
        sig2 = crypto.sign_raw(self.pki.dppb.key, signed2 + sig1.raw)
        s.smdp_signature2_tlv = _sig_tlv(sig2)
        s.stage = "authenticated"
        log(f"authenticateClient {s.txid.hex().upper()}: EID {eid} -> order {order['sid']} "
            f"(ICCID {order['iccid']}{', CC required' if s.cc_required else ''})")
        return {"transactionId": req["transactionId"],   # echoed verbatim (docs/protocol.md §3.2)
                "profileMetadata": _b64e(s.profile_metadata),
                "smdpSigned2": _b64e(signed2),
                "smdpSignature2": _b64e(s.smdp_signature2_tlv),
                "smdpCertificate": _b64e(crypto.cert_der(self.pki.dppb.cert))}

    def profile_metadata(self, order: dict) -> bytes:
        """StoreMetadataRequest BF25 (SGP.22 §5.5.3): what the LPA shows and the eUICC stores.

        notificationConfigurationInfo asks for enable/disable/delete notifications to this
        SM-DP+ (the install PIR always comes here anyway, docs/protocol.md §6.1).
        """
        iccid = order["iccid"]
        value = {
            "iccid": iccid_to_bytes(iccid),
            "serviceProviderName": SERVICE_PROVIDER,
            "profileName": profile_name(iccid),
            # profileClass: operational is the DEFAULT, which DER leaves out.
            "notificationConfigurationInfo": [
                {"profileManagementOperation": PMO_VALUES[ev], "notificationAddress": self.address}
                for ev in ("enable", "disable", "delete")],
        }
        imsi = order.get("_imsi") or ""
        if len(imsi) >= 5 and imsi[:5].isdigit():
            # OperatorId.mccMnc in 3GPP TS 24.008 BCD: MCC2|MCC1, MNC3|MCC3, MNC2|MNC1 (2-digit MNC).
            d = imsi[:5] + "F"
            value["profileOwner"] = {"mccMnc": bytes([int(d[1] + d[0], 16), int(d[5] + d[2], 16),
                                                      int(d[4] + d[3], 16)])}
        return codec.encode("StoreMetadataRequest", value)

    def configure_isdp(self) -> bytes:
        """ConfigureISDPRequest BF24{B8 dpProprietaryData{80 dpOid}}: tells the eUICC which SM-DP+ made it
        (the same for every package of this SM-DP+: encoded once)."""
        if self._configure_isdp is None:
            self._configure_isdp = codec.encode("ConfigureISDPRequest",
                                                {"dpProprietaryData": {"dpOid": self.smdp_oid}})
        return self._configure_isdp

    # getBoundProfilePackage ---------------------------------------------------------------------

    def _getBoundProfilePackage(self, req: dict) -> dict:
        s = self._session(req, "authenticated", "bound")
        raw = self._tlv(req, "prepareDownloadResponse", (0xBF21,))
        if s.stage == "bound":
            # A retry of the same request (lost response) gets the same package; anything else
            # would need a new PrepareDownload in a new session.
            if raw.raw == s.prepare_response and s.bpp is not None:
                return {"transactionId": req["transactionId"], "boundProfilePackage": _b64e(s.bpp)}
            raise _fail("8.8.5", "6.4", "the profile of this session was already delivered")
        alt = self._ok_alternative(s, raw, "PrepareDownload", "downloadResponseError", "downloadErrorCode",
                                   PREPARE_ERRORS)
        ok = _fields(alt, "downloadResponseOk")
        signed2 = _need(ok, 0x30, "downloadResponseOk.euiccSigned2")
        sig2 = _need(ok, 0x5F37, "downloadResponseOk.euiccSignature2")
        # euiccSignature2 covers euiccSigned2 followed by our smdpSignature2 TLV (docs/protocol.md §4.3).
        if not crypto.verify_raw(s.euicc_cert, signed2.raw + s.smdp_signature2_tlv, sig2.value):
            raise _fail("8.1", "6.1", "euiccSignature2 does not verify with CERT.EUICC")
        f2 = _decode("EUICCSigned2", signed2.raw, "euiccSigned2")
        if f2["transactionId"] != s.txid:
            raise _fail("8.10.1", "3.9", "euiccSigned2.transactionId is not this session's")
        otpk = f2["euiccOtpk"]
        if s.cc_required:
            hash_cc = f2.get("hashCc")
            if hash_cc is None:
                raise _fail("8.2.7", "2.2", "this order needs a Confirmation Code and none was given")
            order = self.store.get(s.order_sid) or {}
            want = hashlib.sha256(hashlib.sha256((order.get("_cc") or "").encode()).digest() + s.txid).digest()
            if not secrets.compare_digest(hash_cc, want):
                n = self.store.cc_failure(s.order_sid, self.cc_attempts)
                if n >= self.cc_attempts:
                    self._drop(s)
                    raise _fail("8.2.7", "6.4", f"wrong Confirmation Code {n} times; the order is cancelled")
                raise _fail("8.2.7", "3.8", f"wrong Confirmation Code ({n} of {self.cc_attempts} attempts)")
        order = self.store.get(s.order_sid)
        if order is None or order["status"] != "available":
            self._drop(s)
            state = order["status"] if order else "gone"
            raise _fail("8.8.5", "6.4" if state in ("downloaded", "installed") else "4.1",
                        f"order {s.order_sid} is {state}; it can no longer be downloaded")
        try:
            crypto.point_to_public(otpk, self.pki.dppb.key.curve)
        except crypto.CryptoError as e:
            raise _fail("8.1", "2.1", f"otPK.EUICC.ECKA unusable: {e.message}") from None
        from .upp import make_upp
        from ..es8p import bind_bpp
        upp = make_upp(iccid=order["iccid"], imsi=order["_imsi"], ki=os.urandom(16), opc=os.urandom(16),
                       profile_name=profile_name(order["iccid"]), pad_to=self.profile_size)
        bpp, _otsk = bind_bpp(transaction_id=s.txid, euicc_otpk=otpk, dppb_key=self.pki.dppb.key,
                              eid=eid_to_bytes(s.eid), host_id=self.host_id,
                              configure_isdp=self.configure_isdp(), store_metadata=s.profile_metadata,
                              upp=upp, ppk=True if order.get("_ppk") else None)
        try:
            self.store.mark_downloaded(s.order_sid, s.eid)
        except OrderRefused as e:
            self._drop(s)
            raise _fail(e.subject, e.reason, e.message) from None
        s.stage, s.bpp, s.prepare_response = "bound", bpp, raw.raw
        log(f"getBoundProfilePackage {s.txid.hex().upper()}: {len(bpp)} bytes for ICCID {s.iccid}")
        return {"transactionId": req["transactionId"], "boundProfilePackage": _b64e(bpp)}

    # handleNotification (docs/protocol.md §6.3) ----------------------------------------------------

    def _handleNotification(self, req: dict) -> None:
        t = self._tlv(req, "pendingNotification", (0xBF37, 0x30))
        if t.tag == 0xBF37:
            self._pir(t)
        else:
            self._other_notification(t)
        return None

    def _pir(self, t: tlv.Tlv) -> None:
        f = _fields(t, "ProfileInstallationResult")
        data = _need(f, 0xBF27, "ProfileInstallationResult.profileInstallationResultData")
        sig = _need(f, 0x5F37, "ProfileInstallationResult.euiccSignPIR")
        d = _decode("ProfileInstallationResultData", data.raw, "profileInstallationResultData")
        txid = d["transactionId"]
        meta = d["notificationMetadata"]
        iccid = iccid_from_bytes(meta["iccid"]) if "iccid" in meta else None
        final_kind, final = d["finalResult"]
        with self._lock:
            s = self.sessions.get(txid)
        order = self.store.get(s.order_sid) if s and s.order_sid else (
            self.store.find_by_iccid(iccid) if iccid else None)
        if s is not None and s.euicc_cert is not None:
            certs = [s.euicc_cert]
        else:
            eid = order["eid"] if order else None
            certs = [crypto.load_cert(c) for c in self.store.certs_for(eid)] if eid else []
        if not certs:
            log(f"PIR for transaction {txid.hex().upper()} ignored: no eUICC certificate known to verify it")
            return
        if not any(crypto.verify_raw(c, data.raw, sig.value) for c in certs):
            raise _fail("8.1", "6.1", "euiccSignPIR does not verify with the eUICC's certificate")
        if d.get("smdpOid", self.smdp_oid) != self.smdp_oid:   # OPTIONAL in SGP.22
            log(f"PIR for transaction {txid.hex().upper()} names SM-DP+ OID "
                f"{d['smdpOid']}, not ours ({self.smdp_oid}); ignored")
            return
        if s is not None:
            self._drop(s)  # the SM-DP+ discards the session on the PIR (docs/protocol.md §6.3)
        if order is None:
            log(f"PIR for transaction {txid.hex().upper()} matches no order; ignored")
            return
        if final_kind == "successResult":
            self.store.finish(order["sid"], ok=True)
            log(f"PIR: ICCID {order['iccid']} installed (order {order['sid']})")
        else:
            cmd, reason = final["bppCommandId"], final["errorReason"]
            msg = (f"eUICC could not install the profile: {BPP_ERRORS.get(reason, 'error')} ({reason}) "
                   f"during {BPP_COMMAND_NAMES.get(cmd, f'command {cmd}')}")
            self.store.finish(order["sid"], ok=False, error_code=str(reason), error_message=msg)
            log(f"PIR: ICCID {order['iccid']} failed: {msg}")

    def _other_notification(self, t: tlv.Tlv) -> None:
        f = _fields(t, "OtherSignedNotification")
        tbs = _need(f, 0xBF2F, "OtherSignedNotification.tbsOtherNotification")
        sig = _need(f, 0x5F37, "OtherSignedNotification.euiccNotificationSignature")
        certs = [k for k in tlv.children(t) if k.tag == 0x30]
        if len(certs) != 2:
            raise _fail("8.1", "2.2", "OtherSignedNotification must carry CERT.EUICC and CERT.EUM")
        euicc, eid = self._verify_euicc_chain(certs[0].raw, certs[1].raw)
        if not crypto.verify_raw(euicc, tbs.raw, sig.value):
            raise _fail("8.1", "6.1", "euiccNotificationSignature does not verify with CERT.EUICC")
        m = _decode("NotificationMetadata", tbs.raw, "tbsOtherNotification")
        seq = m["seqNumber"]
        event = pmo_name(m["profileManagementOperation"])
        iccid = iccid_from_bytes(m["iccid"]) if "iccid" in m else None
        self.store.remember_cert(eid, certs[0].raw)
        self.store.record_event(eid=eid, iccid=iccid, event=event, seq=seq)
        log(f"notification: EID {eid} {event} ICCID {iccid} (seq {seq})")

    # cancelSession ----------------------------------------------------------------------------------

    def _cancelSession(self, req: dict) -> dict:
        s = self._session(req, "authenticated", "bound")
        t = self._tlv(req, "cancelSessionResponse", (0xBF41,))
        try:
            alt = tlv.parse_single(t.value)
        except ProtocolError as e:
            raise _fail("8.1", "2.1", f"CancelSessionResponse is malformed: {e.message}") from None
        if alt.tag == 0x81:
            _, code = _decode("CancelSessionResponse", t.raw, "cancelSessionResponseError")
            raise _fail("8.1", "3.8", f"the eUICC refused CancelSession: {CANCEL_ERRORS.get(code, 'error')} ({code})")
        if alt.tag != 0xA0:
            raise _fail("8.1", "2.1", f"CancelSessionResponse holds tag {alt.tag:X}, expected A0 or 81")
        ok = _fields(alt, "cancelSessionResponseOk")
        signed = _need(ok, 0x30, "cancelSessionResponseOk.euiccCancelSessionSigned")
        sig = _need(ok, 0x5F37, "cancelSessionResponseOk.euiccCancelSessionSignature")
        if not crypto.verify_raw(s.euicc_cert, signed.raw, sig.value):
            raise _fail("8.1", "6.1", "euiccCancelSessionSignature does not verify with CERT.EUICC")
        f = _decode("EuiccCancelSessionSigned", signed.raw, "euiccCancelSessionSigned")
        if f["transactionId"] != s.txid:
            raise _fail("8.10.1", "3.9", "euiccCancelSessionSigned.transactionId is not this session's")
        if f["smdpOid"] != self.smdp_oid:
            raise _fail("8.8", "3.8", f"euiccCancelSessionSigned names SM-DP+ OID {f['smdpOid']}, not ours")
        reason = f["reason"]
        name = CANCEL_REASONS.get(reason, f"reason {reason}")
        self._drop(s)
        if reason not in CANCEL_KEEPS_ORDER and s.order_sid:
            self.store.fail(s.order_sid, f"cancelled:{name}", f"the download was cancelled: {name} ({reason})")
        elif s.order_sid:
            self.store.release(s.order_sid)
        log(f"cancelSession {s.txid.hex().upper()}: {name} ({reason})"
            + ("; order kept" if reason in CANCEL_KEEPS_ORDER else "; order failed"))
        return {}


class ListenError(OSError):
    """The server cannot listen on (host, port); `sim smdpp` tells the user (sim/cli.py)."""

    def __init__(self, host: str, port: int, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.host, self.port = host, port


def _b64e(b: bytes) -> str:
    return base64.b64encode(b).decode()


# --- HTTPS server ---------------------------------------------------------------------------------


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, handler, ssl_ctx: ssl.SSLContext, app: "SmdpServer"):
        super().__init__(addr, handler)
        self.ssl_ctx = ssl_ctx
        self.app = app

    def finish_request(self, request, client_address):
        # The TLS handshake runs here, in the per-connection thread, so one slow or broken
        # client cannot stall the accept loop.
        request.settimeout(SOCKET_TIMEOUT)
        try:
            # Headers and body go out as separate small writes; without NODELAY, Nagle plus
            # the client's delayed ACK adds ~40 ms to every response.
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            conn = self.ssl_ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log(f"TLS handshake with {client_address[0]} failed: {getattr(e, 'reason', None) or e}")
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)):
            return
        log(f"internal error serving {client_address[0]}: {exc!r}")
        import traceback
        traceback.print_exc(file=sys.stderr)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "esim-agent-smdpp/1"
    sys_version = ""
    timeout = SOCKET_TIMEOUT

    def __getattr__(self, name):
        # Every method (PUT, DELETE, PATCH, OPTIONS, …) reaches _dispatch, so an unexpected
        # method gets a 405 rather than http.server's 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        pass

    def log_request(self, code="-", size="-"):
        log(f"{self.command} {self.path[:120]} -> {code}")

    # body -----------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                line = self.rfile.readline(1024)
                try:
                    n = int(line.split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    raise _HttpError(400, "malformed chunked body") from None
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                if len(out) + n > MAX_BODY:
                    raise _HttpError(413, "request body too large")
                out += self.rfile.read(n)
                self.rfile.readline(4)
        cl = self.headers.get("Content-Length")
        if cl is None:
            return b""
        try:
            n = int(cl)
        except ValueError:
            raise _HttpError(400, "Content-Length is not a number") from None
        if n < 0:
            raise _HttpError(400, "negative Content-Length")
        if n > MAX_BODY:
            raise _HttpError(413, "request body too large")
        return self.rfile.read(n)

    def _send(self, status: int, body: bytes, content_type: str | None, extra: dict | None = None) -> None:
        self.send_response(status)
        if content_type and body:
            self.send_header("Content-Type", content_type)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    # dispatch -------------------------------------------------------------------------------------

    def _request(self) -> tuple[str, str, bytes]:
        """(path, query, body) of the request (an absolute-form target reduced to its path);
        _HttpError for a body that cannot be read."""
        raw_path = self.path
        if raw_path.startswith(("http://", "https://")):
            raw_path = urlsplit(raw_path).path or "/"
        path, _, query = raw_path.partition("?")
        return path.split("#", 1)[0], query, self._read_body()

    def _dispatch(self) -> None:
        app: SmdpServer = self.server.app
        try:
            path, query, body = self._request()
        except _HttpError as e:
            self.close_connection = True
            return self._send(e.status, json.dumps({"message": e.message, "status": e.status}).encode(),
                              "application/json")
        if path == "/v1" or path.startswith("/v1/"):
            try:
                r = app.twin.handle(self.command, path, query, self.headers, body)
            except Exception as e:  # a bug here: answer 500 in Twilio's error shape, keep serving
                _log_bug(f"{self.command} {path[:80]}", e)
                return self._send(500, json.dumps({"code": 20500, "message": "Internal Server Error",
                                                   "more_info": "https://www.twilio.com/docs/errors/20500",
                                                   "status": 500}).encode(), "application/json")
            extra = dict(r.headers)
            if r.status == 401:
                extra["WWW-Authenticate"] = 'Basic realm="Twilio API"'
            if r.status == 405:
                extra["Allow"] = "GET, POST" if path.rstrip("/") == "/v1/ESimProfiles" else "GET"
            return self._send(r.status, r.encode(), "application/json", extra)
        if path.startswith(ES9_PREFIX):
            return self._es9(app, path[len(ES9_PREFIX):], body)
        return self._send(404, json.dumps({"code": 20404, "message": f"The requested resource {path[:200]} "
                                           "was not found", "more_info": "https://www.twilio.com/docs/errors/20404",
                                           "status": 404}).encode(), "application/json")

    def _es9(self, app: "SmdpServer", function: str, body: bytes) -> None:
        hdr = {"X-Admin-Protocol": ADMIN_PROTOCOL}
        try:
            if self.command != "POST":
                hdr["Allow"] = "POST"
                raise _fail("1.2.1", "2.1", "ES9+ functions are called with POST", http_status=405)
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise _fail("1.2.1", "2.1", f"Content-Type must be application/json, not {ctype or 'missing'}")
            proto = self.headers.get("X-Admin-Protocol")
            if proto is not None and not proto.lower().startswith("gsma/rsp/v"):
                raise _fail("1.2.1", "2.1", f"X-Admin-Protocol {proto!r} is not gsma/rsp/v<version>")
            try:
                req = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise _fail("1.2.1", "2.1", f"request body is not JSON: {e!s:.200}", http_status=400) from None
            status, out = app.es9.call(function, req)
        except Es9Failure as f:
            log(f"ES9+ {function[:40]}: Failed {f.subject}/{f.reason}: {f.message}")
            return self._send(f.http_status, json.dumps(Es9Service.failure_body(f)).encode(), JSON_CT, hdr)
        except Exception as e:  # a bug here: say so (500) with the envelope, keep serving
            _log_bug(f"ES9+ {function[:40]}", e)
            f = Es9Failure("8.8", "127", f"internal SM-DP+ error: {e!r}", http_status=500)
            return self._send(500, json.dumps(Es9Service.failure_body(f)).encode(), JSON_CT, hdr)
        if out is None:
            return self._send(status, b"", None, hdr)
        return self._send(status, json.dumps(out).encode(), JSON_CT, hdr)


def _log_bug(where: str, e: Exception) -> None:
    import traceback
    log(f"{where}: internal error {e!r}")
    traceback.print_exc(file=sys.stderr)


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class SmdpServer:
    """The local SM-DP+ (ES9+ and reservation API) on HTTPS; usable in-process.

    ``start()`` serves in a background thread; ``.port``, ``.address``, ``.url``,
    ``.store`` (reservations), ``stop()``. Also a context manager.
    """

    def __init__(self, pki_dir, *, port: int = 0, host: str = "127.0.0.1", address: str | None = None,
                 auth: tuple[str, str] | None = None, state_path=None, reserve_delay: float = 0.1,
                 cc_attempts: int = CC_ATTEMPTS, profile_size: int | None = None,
                 session_ttl: float = SESSION_TTL):
        from .pki import load_pki
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port {port!r} is not a TCP port (0-65535)")
        self.pki_dir = os.fspath(pki_dir)
        self.pki = load_pki(self.pki_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(os.path.join(self.pki_dir, "dptls.pem"), os.path.join(self.pki_dir, "dptls.key.pem"))
        try:
            self.httpd = _Httpd((host, port), _Handler, ctx, self)
        except OSError as e:
            raise ListenError(host, port, e) from None
        self.host = host
        self.port = self.httpd.server_address[1]
        self.address = address or f"localhost:{self.port}"
        account = auth[0] if auth else "AC" + "0" * 32
        self.store = TwinStore(account_sid=account, smdp_address=self.address, state_path=state_path,
                               reserve_delay=reserve_delay)
        self.twin = TwinApi(self.store, auth=tuple(auth) if auth else None)
        self.es9 = Es9Service(self.pki, self.store, cc_attempts=cc_attempts, profile_size=profile_size,
                              session_ttl=session_ttl)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}" if self.host in ("127.0.0.1", "0.0.0.0") \
            else f"https://{self.host}:{self.port}"

    def start(self) -> "SmdpServer":
        self.store.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="smdpp", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.store.start()
        self.httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever, so only when it runs
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()
        self.store.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _warm(es9: Es9Service) -> None:
    """Background: the SM-DP+'s one-time start-up work (Es9Service.warm)."""
    try:
        es9.warm()
    except Exception:  # only an optimisation: the first download does the same work
        _log.debug("warming the SM-DP+ failed", exc_info=True)


def serve_smdpp(pki_dir, *, port: int = 0, host: str = "127.0.0.1", address: str | None = None,
                auth: tuple[str, str] | None = None, state_path=None, ready=None,
                profile_size: int | None = None, session_ttl: float = SESSION_TTL) -> None:
    """Run the local SM-DP+ in the foreground until SIGINT/SIGTERM."""
    import signal
    _log_to_stderr()
    server = SmdpServer(pki_dir, port=port, host=host, address=address, auth=auth, state_path=state_path,
                        profile_size=profile_size, session_ttl=session_ttl)

    def _term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread
        pass
    threading.Thread(target=_warm, args=(server.es9,), name="smdpp-warm", daemon=True).start()
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        server.store.close()
