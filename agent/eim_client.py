"""ESipa client (IPA -> eIM) over HTTPS, in both bindings (SGP.32 §6; docs/protocol.md §7).

One class, one eIM.  The bodies come from agent/esipa.py (ASN.1 binding: ``POST
/gsma/rsp2/asn1`` with the DER of EsipaMessageFromIpaToEim; JSON binding: ``POST
/gsma/rsp2/esipa/<function>``); this module only moves them.  The HTTP machinery is
es9p.py's (one deadline per call, retries only before a request can have left, TLS
error mapping), reused through ``Es9pClient._send``.

TLS is always verified.  What is trusted, in order (SGP.32 §2.11.1.1.1 names the
eIM's TLS trust anchor in its configuration): the ``[eim] ca`` file; else the
certificate the eUICC's eIM configuration carries in trustedPublicKeyDataTls (the
eIM's TLS certificate or its CA); else the system store.  The eIM is no GSMA RSP
role server, so its certificate is not checked for an RSP role OID.

The answers are checked and decoded here; what the IPA relays (the eIM's
EuiccPackageRequest) is kept as the exact bytes received (``EimPackage.raw``).
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import esipa, tlv
from .errors import ProtocolError, ServerError
from .es9p import Es9pClient, _excerpt
from .ids import eid_to_bytes
from .tls import Trust, TrustError, load_ca_certs
from .logs import get_logger

log = get_logger(__name__)

# SGP.32 does not say which X-Admin-Protocol value ESipa carries (docs/protocol.md §7): we send
# the SGP.22 v2 form, as other IPAs do.
ADMIN_PROTOCOL = "gsma/rsp/v2.1.0"

#: GetEimPackageResponse alternatives that carry work, with their leading tag.
PACKAGE_TAGS = {0xBF51: "euiccPackageRequest", 0xBF52: "ipaEuiccDataRequest",
                0xBF54: "profileDownloadTriggerRequest"}
#: The ESipa messages of an indirect download (SGP.32 §6.3.2.1-5): their answers are ESipa
#: messages too (esipa.py carries them whole in the JSON binding), handleNotification has none.
DOWNLOAD_MESSAGES = ("initiateAuthenticationRequestEsipa", "authenticateClientRequestEsipa",
                     "getBoundProfilePackageRequestEsipa", "cancelSessionRequestEsipa", "handleNotificationEsipa")
GET_PACKAGE_ERRORS = {1: "noEimPackageAvailable", 2: "eidNotFound", 3: "invalidEid", 4: "missingEid",
                      127: "undefinedError"}


@dataclass
class EimPackage:
    """What getEimPackage brought.

    ``kind`` is the GetEimPackageResponse alternative, or "undecodable" when the eIM sent
    a package alternative whose contents do not parse (``alternative`` names it: the IPA
    answers it with invalidPackageFormat, never silence).  ``raw`` is the package's TLV
    exactly as received (the BF51 goes to the eUICC unchanged)."""
    kind: str
    value: object = None
    raw: bytes | None = None
    alternative: str | None = None
    error: str | None = None


@dataclass
class ProvideAnswer:
    """The eIM's answer to provideEimPackageResult."""
    acknowledgements: list[int]
    error: int | None = None


class _EimTrust(Trust):
    """Trust for the eIM's TLS server: chain, name and validity (OpenSSL); no RSP role policy."""

    def check_peer(self, der: bytes | None, host: str) -> None:
        if not der:
            from .tls import TlsError
            raise TlsError(f"{host} presented no TLS certificate", code="tls_untrusted")


def _system_trust() -> Trust:
    paths = ssl.get_default_verify_paths()
    for p in (paths.cafile, paths.openssl_cafile):
        if p and os.path.isfile(p):
            return _EimTrust(tuple(load_ca_certs(p)), f"the system store ({p})", expected_roles=())
    raise TrustError("no CA configured for the eIM (set [eim] ca), its configuration on the eUICC carries no "
                     "TLS certificate, and no system CA store was found", code="no_trusted_ci")


def eim_trust(ca: str | None = None, tls_trust: tuple[str, bytes] | None = None) -> Trust:
    """The TLS trust for an eIM: ``ca`` file, else the eIM configuration's trustedCertificateTls,
    else the system store (see the module docstring)."""
    if ca:
        if not Path(ca).exists():
            raise TrustError(f"CA file {ca} for the eIM does not exist", code="bad_ca_file")
        return _EimTrust(tuple(load_ca_certs(ca)), str(ca), expected_roles=())
    if tls_trust is not None and tls_trust[0] == "trustedCertificateTls":
        fd, path = tempfile.mkstemp(prefix="esim-agent-eim-tls-", suffix=".der")   # 0600
        with os.fdopen(fd, "wb") as f:
            f.write(tls_trust[1])
        try:
            t = _EimTrust(tuple(load_ca_certs(path)), "the eIM configuration's trustedCertificateTls",
                          expected_roles=())
        finally:
            os.unlink(path)
        return t
    if tls_trust is not None:
        log.warning("the eIM configuration pins a TLS public key (trustedEimPkTls), which this IPA cannot "
                    "use as a trust anchor; verifying the eIM against the system store")
    return _system_trust()


class EimClient(Es9pClient):
    """ESipa to one eIM.  ``binding`` "asn1" | "json", ``version`` "1.2" | "1.0"."""

    server_kind = "eIM"

    def __init__(self, address: str, *, eid: str, binding: str = "asn1", version: str = "1.2",
                 ca: str | None = None, tls_trust: tuple[str, bytes] | None = None,
                 deadline: float | None = None, trust: Trust | None = None, **kw):
        if binding not in esipa.BINDINGS:
            raise ProtocolError(f"ESipa binding {binding!r} is not one of {', '.join(esipa.BINDINGS)}",
                                code="bad_esipa_message")
        esipa._check_version(version)
        super().__init__(address, trust=trust or eim_trust(ca, tls_trust), deadline=deadline,
                         narrow_trust=False, **kw)
        self.eid = eid
        self.binding = binding
        self.version = version

    # -- transport --
    def _exchange(self, name: str, value) -> tuple[str, object, bytes]:
        """Send one IPA -> eIM message; returns (response name, value, raw body or JSON member)."""
        function = esipa.FUNCTIONS[name]
        if self.binding == "asn1":
            data = esipa.encode_request(name, value, version=self.version)
            headers = {"Content-Type": esipa.ASN1_CONTENT_TYPE, "Accept": esipa.ASN1_CONTENT_TYPE,
                       "X-Admin-Protocol": ADMIN_PROTOCOL, "User-Agent": self.user_agent}
            status, content = self._send(function, self.base_url + esipa.ASN1_PATH, data, headers)
            self._check_status(function, status, content)
            return self._decode_asn1(name, function, content)
        path, body = esipa.request_to_json(name, value, version=self.version)
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "X-Admin-Protocol": ADMIN_PROTOCOL, "User-Agent": self.user_agent}
        status, content = self._send(function, self.base_url + path, data, headers)
        self._check_status(function, status, content)
        return self._decode_json(name, function, content)

    def _check_status(self, function: str, status: int, content: bytes) -> None:
        if not 200 <= status < 300:
            hint = " (wrong eIM address or path?)" if status == 404 else (
                " (server-side problem; try again later)" if status >= 500 else "")
            raise ServerError(f"eIM {self.address} answered HTTP {status} to {function}{hint}: "
                              f"{_excerpt(content) or '(empty body)'}", code="http_status",
                              details={"function": function, "http_status": status,
                                       "body_excerpt": _excerpt(content)})

    def _bad(self, function: str, why: str) -> ProtocolError:
        return ProtocolError(f"eIM {self.address} answered {function} with {why}", code="bad_esipa_message",
                             details={"function": function})

    def _decode_asn1(self, name: str, function: str, content: bytes):
        if name == "handleNotificationEsipa":        # no answer but the HTTP status (SGP.32 §6.3.2.4)
            return None, None, b""
        if not content:
            if name == "provideEimPackageResult":     # HTTP 204: nothing acknowledged
                return esipa.RESPONSE_FOR[name], None, b""
            raise self._bad(function, "an empty body")
        try:
            got, value = esipa.decode_response(content, version=self.version)
        except ProtocolError as e:
            if name == "getEimPackageRequest":
                bad = self._undecodable_package(content)
                if bad is not None:
                    return esipa.RESPONSE_FOR[name], bad, content
            raise self._bad(function, f"a body that is not an ESipa message: {e.message}") from None
        want = esipa.RESPONSE_FOR[name]
        if got != want:
            raise self._bad(function, f"a {got}, not a {want}")
        return got, value, content

    @staticmethod
    def _undecodable_package(content: bytes) -> EimPackage | None:
        """BF4F around a package TLV that does not decode: which package it claims to be."""
        try:
            outer = tlv.parse_single(content)
            if outer.tag != 0xBF4F:
                return None
            inner = tlv.children(outer)
        except ProtocolError:
            return None
        if len(inner) == 1 and inner[0].tag in PACKAGE_TAGS:
            return EimPackage("undecodable", raw=inner[0].raw, alternative=PACKAGE_TAGS[inner[0].tag],
                              error="the package does not decode")
        return None

    def _decode_json(self, name: str, function: str, content: bytes):
        if name == "handleNotificationEsipa":
            return None, None, b""
        if not content.strip():
            if name == "provideEimPackageResult":
                return esipa.RESPONSE_FOR[name], None, b""
            raise self._bad(function, "an empty body")
        try:
            body = json.loads(content.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError(f"eIM {self.address} sent malformed JSON in its answer to {function}: "
                                f"{_excerpt(content)!r}", code="malformed_json",
                                details={"function": function}) from None
        try:
            got, value = esipa.response_from_json(name, body, version=self.version)
        except ProtocolError as e:
            if name == "getEimPackageRequest" and isinstance(body, dict):
                for alt in PACKAGE_TAGS.values():
                    if alt in body:
                        return esipa.RESPONSE_FOR[name], EimPackage(
                            "undecodable", raw=_b64_or_none(body[alt]), alternative=alt, error=e.message), b""
            raise self._bad(function, e.message) from None
        raw = b""
        if name == "getEimPackageRequest" and isinstance(value, tuple) and value[0] in body:
            raw = _b64_or_none(body[value[0]]) or b""
        elif name in DOWNLOAD_MESSAGES:
            raw = _b64_or_none(body.get("message")) or b""     # the whole message's DER (esipa.py)
        return got, value, raw

    # -- ESipa functions --
    def get_eim_package(self, *, notify_state_change: bool = False,
                        state_change_cause: int | None = None) -> EimPackage:
        """getEimPackage (SGP.32 §6.3.2.6): the next package, or kind "eimPackageError"
        with the error number (1 noEimPackageAvailable: nothing to do)."""
        req: dict = {"eidValue": eid_to_bytes(self.eid)}
        if notify_state_change or state_change_cause is not None:
            req["notifyStateChange"] = None
        if state_change_cause is not None and self.version != "1.0":   # v1.0 has no cause
            req["stateChangeCause"] = state_change_cause
        _, value, raw = self._exchange("getEimPackageRequest", req)
        if isinstance(value, EimPackage):
            return value
        alt, v = value
        if alt == "eimPackageError":
            return EimPackage(alt, v)
        if self.binding == "asn1":
            raw = tlv.children(tlv.parse_single(raw))[0].raw       # the package TLV inside BF4F
        return EimPackage(alt, v, raw=raw)

    def provide_eim_package_result(self, value, *, relayed: list[bytes] = ()) -> ProvideAnswer:
        """provideEimPackageResult (SGP.32 §6.3.2.7).  ``value`` is the ProvideEimPackageResult
        value of this ESipa version; ``relayed`` the signed blobs it carries, which must go out
        byte for byte (checked in the encoded body)."""
        self._check_relayed(value, relayed)
        _, answer, _ = self._exchange("provideEimPackageResult", value)
        if answer is None:
            return ProvideAnswer([])
        if self.version == "1.0":
            return ProvideAnswer(list(answer.get("eimAcknowledgements", [])))
        alt, v = answer
        if alt == "eimAcknowledgements":
            return ProvideAnswer(list(v))
        if alt == "provideEimPackageResultError":
            return ProvideAnswer([], error=v)
        return ProvideAnswer([])

    def download_call(self, name: str, value, *, relayed: list[bytes] = ()) -> tuple[str | None, object, bytes]:
        """One ESipa message of an indirect profile download (SGP.32 §6.3.2.1-5; esipa_download.py
        uses it): returns (response name, decoded value, DER of the whole response message as
        received), or (None, None, b"") for handleNotification, which has no answer.  ``relayed``:
        the eUICC's signed blobs, which must appear byte for byte in the encoded request."""
        if name not in DOWNLOAD_MESSAGES:
            raise ValueError(f"{name} is not an ESipa download message")
        der = esipa.encode_request(name, value, version=self.version)
        for blob in relayed:
            if bytes(blob) not in der:
                raise ProtocolError(f"what the eUICC signed would not go to the eIM byte for byte in {name} (it "
                                    "is not DER); not sending a re-encoded copy", code="bad_esipa_message")
        return self._exchange(name, value)

    def _check_relayed(self, value, relayed) -> None:
        if not relayed:
            return
        if self.binding == "asn1":
            body = esipa.encode_request("provideEimPackageResult", value, version=self.version)
        else:
            _, j = esipa.request_to_json("provideEimPackageResult", value, version=self.version)
            body = base64.b64decode(j["eimPackageResult"])
        for blob in relayed:
            if bytes(blob) not in body:
                raise ProtocolError("a signed result from the eUICC would not go to the eIM byte for byte (it is "
                                    "not DER); not sending a re-encoded copy", code="bad_euicc_package_result")


def _b64_or_none(s) -> bytes | None:
    if not isinstance(s, str):
        return None
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        return None
