"""Profile download, LPA side (SGP.22 §3.1.3, docs/protocol.md §4.1).

GetEUICCInfo1 + GetEUICCChallenge → ES9+ initiateAuthentication →
ES10b AuthenticateServer → ES9+ authenticateClient → consent (+ confirmation
code) → ES10b PrepareDownload → ES9+ getBoundProfilePackage →
ES10b LoadBoundProfilePackage (segmented per SGP.22 §2.5.5) → result.

Every blob the eUICC or the server signed is relayed byte for byte: requests
to the eUICC are assembled by concatenating the exact TLVs received, never by
decoding and re-encoding (docs/protocol.md §0.6).

After authentication, any failure or Ctrl-C cancels the session on both
sides (ES10b CancelSession, then ES9+ cancelSession with the eUICC's signed
answer) and the error names the failed step.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from collections.abc import Callable

from .. import codec, logs, tlv
from ..cancel import Cancelled
from ..errors import AgentError, CardError, InputError, ProtocolError, TimeoutError_, code_for
from ..es10 import AUTH_SERVER_ERRORS, PREPARE_DOWNLOAD_ERRORS, PROFILE_CLASSES, Es10, Es10Error, seq_number
from ..ids import iccid_from_bytes, imei_to_bytes, tac_from_imei

TYPE_CHECKING = False   # annotations are strings here: no typing import at run time
if TYPE_CHECKING:
    from ..es10_types import ProfileInfo

log = logs.get_logger(__name__)

# SGP.22 CancelSessionReason
REASON_END_USER_REJECTION = 0
REASON_POSTPONED = 1
REASON_TIMEOUT = 2
REASON_PPR_NOT_ALLOWED = 3
REASON_METADATA_MISMATCH = 4
REASON_LOAD_BPP_EXECUTION_ERROR = 5
REASON_UNDEFINED = 127

#: What a consent callback answers: True installs, False rejects (endUserRejection: final, the
#: operator's order fails at the SM-DP+), POSTPONE stops for now (postponed: the order stays usable).
POSTPONE = "later"


class DownloadError(AgentError):
    """A download step failed; ``step`` names it."""

    def __init__(self, step: str, cause: AgentError | str, *, code: str | None = None, exit_code: int | None = None):
        msg = cause.message if isinstance(cause, AgentError) else str(cause)
        super().__init__(f"download failed at {step}: {msg}",
                         code=code or (cause.code if isinstance(cause, AgentError) else "download_failed"),
                         details={"step": step, **(cause.details if isinstance(cause, AgentError) else {})})
        self.step = step
        self.exit_code = exit_code if exit_code is not None else (
            cause.exit_code if isinstance(cause, AgentError) else 1)

    def with_cancel(self, reason: int, *, server: bool = True) -> "DownloadError":
        """Mark that the session must be cancelled with this CancelSessionReason
        (``server=False``: the server has ended its session already; only the card's)."""
        self.details["cancel_reason"] = reason
        if not server:
            self.details["cancel_card_only"] = True
        return self


@dataclass
class ProfileMetadata:
    """The profile's StoreMetadata, as shown to the user for consent."""
    iccid: str
    service_provider_name: str | None
    profile_name: str | None
    profile_class: str | None
    icon_type: str | None = None
    raw: bytes = field(repr=False, default=b"")

    def to_json(self) -> dict:
        return {"iccid": self.iccid, "service_provider_name": self.service_provider_name,
                "profile_name": self.profile_name, "profile_class": self.profile_class}


@dataclass
class DownloadResult:
    """What a download installed, and the install result to send as its notification."""
    transaction_id: str
    iccid: str
    isdp_aid: str | None
    profile: ProfileInfo | None
    metadata: ProfileMetadata
    apdu_bytes_loaded: int
    notification_seq: int | None
    result_der: bytes = b""        # the ProfileInstallationResult, exactly as the eUICC returned it


@dataclass
class DownloadOptions:
    """What one download needs besides the card and the SM-DP+: identifiers, consent, hooks."""
    address: str
    matching_id: str | None = None
    confirmation_code: str | None = None
    imei: str | None = None
    # Called with the metadata: True installs, False rejects (→ endUserRejection, final for the
    # order), POSTPONE postpones (→ postponed, the order stays usable).
    consent: Callable[[ProfileMetadata], bool | str] | None = None
    # Called when the server requires a confirmation code and none was given.
    ask_confirmation_code: Callable[[], str | None] | None = None
    progress: Callable[[str, int, int], None] | None = None
    long_timeout: float | None = None
    # SM-DP+ OID from the activation code (SGP.22 §4.1): must match CERT.DPauth.
    smdp_oid: str | None = None
    # CancelToken checked between steps (Ctrl-C, SIGTERM, a daemon client's cancel).
    cancel: object = None
    # record(step, **data): called before a step runs, with what a restarted daemon needs
    # to reconcile (the transaction ID, the ICCID); the daemon's job journal.
    record: Callable[..., None] | None = None


def hash_confirmation_code(code: str, transaction_id: bytes) -> bytes:
    """SGP.22 §3.1.3: SHA-256(SHA-256(CC) ‖ TransactionID)."""
    import hashlib          # here: hashlib's OpenSSL set-up costs ~4 ms, and most orders have no code
    return hashlib.sha256(hashlib.sha256(code.encode("utf-8")).digest() + transaction_id).digest()


def device_info(imei: str | None) -> dict:
    """DeviceInfo for ctxParams1 (SGP.22 §4.2): TAC (+ IMEI) and capabilities.

    Capabilities state what a cellular IoT gateway supports: LTE/E-UTRAN and
    GSM/UTRAN releases and the eUICC/RSP release we implement (v2.2)."""
    rel = lambda major: bytes([major, 0, 0])  # noqa: E731 - VersionType: major, minor, revision
    # No rspCrlSupportedVersion: the agent does not process CRLs (LoadCRL), so it must not claim to.
    caps = {"gsmSupportedRelease": rel(15), "utranSupportedRelease": rel(15),
            "eutranEpcSupportedRelease": rel(15)}
    info: dict = {"tac": tac_from_imei(imei) if imei else bytes(4), "deviceCapabilities": caps}
    if imei:
        info["imei"] = imei_to_bytes(imei)
    return info


#: DeviceCapabilities' fields by their automatic context tags (asn1/rsp.asn; SGP.22 §5.7.13).
_CAPABILITY_TAGS = {"gsmSupportedRelease": 0x80, "utranSupportedRelease": 0x81, "cdma2000onexSupportedRelease": 0x82,
                    "cdma2000hrpdSupportedRelease": 0x83, "cdma2000ehrpdSupportedRelease": 0x84,
                    "eutranEpcSupportedRelease": 0x85, "contactlessSupportedRelease": 0x86,
                    "rspCrlSupportedVersion": 0x87}


def ctx_params1(matching_id: str | None, imei: str | None) -> bytes:
    return encode_ctx_params1(matching_id, device_info(imei))


def encode_ctx_params1(matching_id: str | None, info: dict) -> bytes:
    """CtxParams1 for AuthenticateServer: A0 { 80 matchingId?, A1 DeviceInfo { 80 tac,
    A1 { capabilities }, 82 imei? } } (SGP.22 §5.7.13), built with the TLV encoder so that a
    download reaches the card's AuthenticateServer before the ASN.1 tables have loaded (they load
    while it runs, agent/preload.py). tests/test_download.py holds it equal to codec.encode and
    to an independent encoder's vector."""
    caps = b"".join(tlv.encode(_CAPABILITY_TAGS[name], value)
                    for name, value in sorted(info["deviceCapabilities"].items(), key=lambda kv: _CAPABILITY_TAGS[kv[0]]))
    body = tlv.encode(0x80, info["tac"]) + tlv.encode(0xA1, caps)
    if "imei" in info:
        body += tlv.encode(0x82, info["imei"])
    mid = tlv.encode(0x80, matching_id.encode("utf-8")) if matching_id is not None else b""
    return tlv.encode(0xA0, mid + tlv.encode(0xA1, body))


def parse_metadata(raw: bytes) -> ProfileMetadata:
    md = codec.decode("StoreMetadataRequest", raw)
    return ProfileMetadata(
        iccid=iccid_from_bytes(md["iccid"]),
        service_provider_name=md.get("serviceProviderName"),
        profile_name=md.get("profileName"),
        profile_class=PROFILE_CLASSES.get(md.get("profileClass", 2)),
        icon_type={0: "jpg", 1: "png"}.get(md.get("iconType")) if "iconType" in md else None,
        raw=raw,
    )


def installed_profile(meta: ProfileMetadata, isdp_aid: bytes | None):
    """The ProfileInfo of a profile just installed, known without asking the eUICC again: its
    StoreMetadata fields are ProfileInfo's own (SGP.22 §2.4a, §5.7.15: same names and tags, stored
    as the package gave them), the ISD-P AID is the successResult's, and a new profile is disabled
    with no nickname (§3.1.3). A ProfileInfoListRequest here would cost a round trip to the card
    (and at 115200 baud ~40 ms) for nothing we do not hold."""
    md = dict(codec.decode("StoreMetadataRequest", meta.raw))
    md.setdefault("profileClass", 2)        # DEFAULT operational (SGP.22 §2.4a)
    md["profileState"] = 0                  # disabled
    if isdp_aid:
        md["isdpAid"] = isdp_aid
    from ..es10_types import profile_from_asn1    # loaded while the card ran AuthenticateServer
    return profile_from_asn1(md)


def _first_child(raw: bytes, tag: int) -> tlv.Tlv | None:
    outer = tlv.parse_single(raw)
    return tlv.find(tlv.children(outer), tag)


class Downloader:
    """One download session. I/O goes through ``es10`` (the card) and ``es9`` (the server).

    ``make_es9`` instead of ``es9``: a function returning the ES9+ client, called when the first
    ES9+ call is due; its set-up (the TLS stack's imports, the trust store) then runs while the
    card answers the first ES10 calls (agent/preload.py) rather than before them."""

    def __init__(self, es10: Es10, es9, opts: DownloadOptions, *, make_es9: Callable[[], object] | None = None):
        self.es10 = es10
        self._es9 = es9
        self._make_es9 = make_es9
        self.opts = opts
        self.txid: str | None = None     # hex, as the server sent it
        self.step = "start"
        # What there is to cancel (SGP.22 §3.1.3): the eUICC holds a session for txid only once
        # AuthenticateServer succeeded (None: not asked; "unknown": asked, no answer; True);
        # ES9+ cancelSession carries the eUICC's signed answer and fits the SM-DP+'s session only
        # once it was given authenticateClient.
        self._card_session: bool | str | None = None
        self._server_authenticated = False

    @property
    def es9(self):
        if self._es9 is None and self._make_es9 is not None:
            self._es9 = self._make_es9()
        return self._es9

    def _progress(self, step: str, done: int = 0, total: int = 0) -> None:
        self.step = step
        if self.opts.cancel is not None:
            self.opts.cancel.check()
        if self.opts.progress:
            self.opts.progress(step, done, total)

    def _record(self, step: str, **data) -> None:
        if self.opts.record is not None:
            self.opts.record(step, **data)

    # --- cancellation (SGP.22 §3.1.3 / §5.6.5) -------------------------------
    def cancel(self, reason: int, *, server: bool = True) -> None:
        """Best-effort: CancelSession on the eUICC, then ES9+ cancelSession."""
        if not self.txid:
            return
        if not self._card_session:
            # Stopped before AuthenticateServer: the eUICC has no session for this transaction and
            # there is no signed answer to relay; the SM-DP+ lets its own session expire.
            log.debug("nothing to cancel for transaction %s: the eUICC never opened a session", self.txid)
            return
        try:
            resp = self.es10.cancel_session(bytes.fromhex(self.txid), reason)
        except Exception as e:  # the card may be unreachable; the server times the session out
            # AuthenticateServer got no answer (time-out, stop): the card may never have opened it.
            expected = self._card_session == "unknown" and getattr(e, "code", "") == "invalid_transaction_id"
            log.log(logs.DEBUG if expected else logs.WARNING, "ES10b CancelSession failed: %s", e)
            return
        if not server:
            return
        if not self._server_authenticated:
            log.debug("ES9+ cancelSession not sent for %s: the SM-DP+ was not given authenticateClient, so it "
                      "holds no order for this session and ends it on its own", self.txid)
            return
        try:
            self.es9.cancel_session(self.txid, resp)
        except Exception as e:
            # After a refusal the SM-DP+ has usually ended its session already and says it does
            # not know the transaction: expected (e.g. every "nothing waiting" sync), not a warning.
            expected = getattr(e, "code", "") == "unknown_transaction"
            log.log(logs.DEBUG if expected else logs.WARNING, "ES9+ cancelSession failed: %s", e)

    # --- the flow ------------------------------------------------------------
    def run(self) -> DownloadResult:
        o = self.opts
        self._progress("reading eUICC info")
        try:
            info1 = self.es10.get_euicc_info1()
            challenge = self.es10.get_euicc_challenge()
        except AgentError as e:
            raise DownloadError("reading eUICC info", e) from e

        self._progress("initiateAuthentication")
        try:
            ia = self.es9.initiate_authentication(challenge, info1.raw, o.address)
        except DownloadError:
            raise
        except AgentError as e:   # no session yet on either side: nothing to cancel
            raise DownloadError("initiateAuthentication", e) from e
        self.txid = ia.transaction_id
        self._record("authenticating", transaction_id=self.txid)
        self._check_server_signed1(ia.server_signed1, challenge, o.address)
        if o.smdp_oid:
            self._check_smdp_oid(ia.server_certificate, o.smdp_oid)
        try:
            return self._after_initiate(ia)
        except (KeyboardInterrupt, Cancelled):
            # Stopped by the user or the service manager: the order stays usable (postponed).
            self.cancel(REASON_POSTPONED)
            raise
        except DownloadError as e:
            if e.details.get("cancel_reason") is not None:
                self.cancel(e.details.pop("cancel_reason"), server=not e.details.pop("cancel_card_only", False))
            raise
        except TimeoutError_ as e:
            self.cancel(REASON_TIMEOUT)
            raise DownloadError(self.step, e) from e
        except AgentError as e:
            self.cancel(REASON_LOAD_BPP_EXECUTION_ERROR if self.step.startswith("loading") else REASON_UNDEFINED)
            raise DownloadError(self.step, e) from e
        except Exception:   # a bug must not leave sessions open on the card and the server
            self.cancel(REASON_LOAD_BPP_EXECUTION_ERROR if self.step.startswith("loading") else REASON_UNDEFINED)
            raise

    def _check_server_signed1(self, raw: bytes, challenge: bytes, address: str) -> None:
        """LPA checks on serverSigned1 (SGP.22 §3.1.3.1): our challenge echoed and
        the server names the address we contacted."""
        try:
            _txid, echoed, named, _challenge = codec.read_fields("ServerSigned1", raw, 0x30, (0x80, 0x81, 0x83, 0x84))
            named = named.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DownloadError("initiateAuthentication", ProtocolError(
                f"malformed ServerSigned1: serverAddress is not UTF-8 ({e})", code="malformed_asn1")) from None
        except ProtocolError as e:
            raise DownloadError("initiateAuthentication", e) from e
        if echoed != challenge:
            raise DownloadError("initiateAuthentication",
                                ProtocolError("the SM-DP+ did not echo the eUICC challenge", code="challenge_mismatch"))
        if named.lower() != address.lower():
            raise DownloadError("initiateAuthentication",
                                ProtocolError(f"the SM-DP+ calls itself {named!r}, "
                                              f"but we contacted {address!r}", code="smdp_address_mismatch"))

    def _check_smdp_oid(self, cert_der: bytes, want: str) -> None:
        """The activation code names the SM-DP+ by OID; CERT.DPauth carries it as its
        SAN registeredID (SGP.22 §4.1, §4.5.2.1). A mismatch means the code points at
        another server than the one answering."""
        from ..cert import CertError, parse   # read-only fields: no `cryptography` import (cert.py)
        try:
            ids = parse(cert_der).registered_ids
        except CertError as e:
            raise DownloadError("initiateAuthentication",
                                ProtocolError(f"unreadable SM-DP+ certificate: {e}", code="malformed_certificate"))
        got = ids[0] if ids else None
        if got != want:
            raise DownloadError("initiateAuthentication", ProtocolError(
                f"the activation code expects SM-DP+ OID {want}, but the server's certificate says {got or 'none'}",
                code="smdp_oid_mismatch"))

    def _after_initiate(self, ia) -> DownloadResult:
        o = self.opts
        # ES10b AuthenticateServer: BF38 { serverSigned1, serverSignature1, euiccCiPKIdToBeUsed,
        # serverCertificate, ctxParams1 } — the first four exactly as the server sent them.
        self._progress("AuthenticateServer")
        req = tlv.encode(0xBF38, ia.server_signed1 + ia.server_signature1 + ia.euicc_ci_pkid_to_be_used
                         + ia.server_certificate + ctx_params1(o.matching_id, o.imei))
        # --timeout, not --long-timeout: only what writes the card's NVM waits longer (profile
        # loading, enable, disable, delete, memory reset); docs/modem.md §2.3.
        self._card_session = "unknown"
        asr = self.es10.call_raw(req, what="AuthenticateServer")
        kind, val = codec.decode("AuthenticateServerResponse", asr)
        self._card_session = kind == "authenticateResponseOk"

        self._progress("authenticateClient")
        if kind != "authenticateResponseOk":
            raise self._card_refused("AuthenticateServer", val, "authenticateErrorCode", AUTH_SERVER_ERRORS,
                                     self.es9.authenticate_client, asr)
        self._server_authenticated = True       # from here the SM-DP+ may have bound an order to it
        ac = self.es9.authenticate_client(self.txid, asr)

        meta = parse_metadata(ac.profile_metadata)
        self._record("metadata", transaction_id=self.txid, iccid=meta.iccid)
        self._progress("consent")
        answer = True if o.consent is None else o.consent(meta)
        if answer == POSTPONE:
            raise DownloadError("consent", AgentError(
                "postponed by the user: nothing was installed and the order stays usable; run the download "
                "again when ready", code="postponed"), code="postponed").with_cancel(REASON_POSTPONED)
        if not answer:
            raise DownloadError("consent", CardError(
                "rejected by the user: the SM-DP+ was told (endUserRejection) and the operator's order cannot "
                "be used again", code="user_rejected"), code="user_rejected").with_cancel(REASON_END_USER_REJECTION)

        ss2 = codec.decode("SmdpSigned2", ac.smdp_signed2)
        hash_cc = b""
        if ss2["ccRequiredFlag"]:
            cc = o.confirmation_code
            if cc is None and o.ask_confirmation_code:
                cc = o.ask_confirmation_code()
            if not cc:
                raise DownloadError("PrepareDownload",
                                    InputError("this profile needs a confirmation code: pass --confirmation-code "
                                               "(the operator gives it with the activation code)",
                                               code="confirmation_code_required"),
                                    code="confirmation_code_required").with_cancel(REASON_POSTPONED)
            hash_cc = tlv.encode(0x04, hash_confirmation_code(cc, bytes.fromhex(self.txid)))

        # ES10b PrepareDownload: BF21 { smdpSigned2, smdpSignature2, hashCc?, smdpCertificate }
        self._progress("PrepareDownload")
        pdr = self.es10.call_raw(tlv.encode(0xBF21, ac.smdp_signed2 + ac.smdp_signature2 + hash_cc
                                            + ac.smdp_certificate), what="PrepareDownload")
        kind, val = codec.decode("PrepareDownloadResponse", pdr)
        if kind != "downloadResponseOk":
            # The card keeps its session after refusing PrepareDownload: cancel it too.
            raise self._card_refused("PrepareDownload", val, "downloadErrorCode", PREPARE_DOWNLOAD_ERRORS,
                                     self.es9.get_bound_profile_package, pdr
                                     ).with_cancel(REASON_UNDEFINED, server=False)

        self._progress("getBoundProfilePackage")
        bpp = self.es9.get_bound_profile_package(self.txid, pdr)
        return self._load(bpp, meta)

    def _card_refused(self, step: str, val, field: str, table: dict, relay, response: bytes) -> "DownloadError":
        """The eUICC answered with its error alternative. Relay that answer to the server
        in the next ES9+ call (it ends its session on it), then report."""
        code = val.get(field) if isinstance(val, dict) else val
        name = table.get(code, f"error{code}")
        try:
            relay(self.txid, response)
        except AgentError:
            pass
        return DownloadError(step, Es10Error(step, name, code, _refusal_hint(name)))

    def _load(self, bpp: bytes, meta: ProfileMetadata) -> DownloadResult:
        from ..bpp import split_bpp
        o = self.opts
        commands = split_bpp(bpp)
        total = sum(len(c) for c in commands)
        done = 0
        pir_raw = b""
        self._record("loading", transaction_id=self.txid, iccid=meta.iccid)
        self._progress("loading profile", 0, total)
        for cmd in commands[:-1]:
            resp = self.es10.call_raw(cmd, what="LoadBoundProfilePackage", timeout=o.long_timeout)
            done += len(cmd)
            self._progress("loading profile", done, total)
            if resp:
                # SGP.22 §2.5.5: a ProfileInstallationResult may come early (on error); stop there.
                pir_raw = resp
                break
        # The last segment is the commit point (SGP.22 §2.5.5): the eUICC installs on it. A cancel
        # from here on would drop its ProfileInstallationResult and report "cancelled" for a
        # profile that is on the card, so it waits until the result is read.
        with o.cancel.held() if o.cancel is not None else contextlib.nullcontext():
            if not pir_raw and commands:
                pir_raw = self.es10.call_raw(commands[-1], what="LoadBoundProfilePackage", timeout=o.long_timeout)
                self._progress("loading profile", total, total)
            return self._installed(pir_raw, meta, total)

    def _installed(self, pir_raw: bytes, meta: ProfileMetadata, total: int) -> DownloadResult:
        """Read the ProfileInstallationResult of a loaded package."""
        from ..bpp import BPP_COMMAND_NAMES, ERROR_REASON_NAMES
        if not pir_raw:
            # Some modem paths lose the last answer: the profile may be installed with its
            # result pending as a notification (the caller processes notifications).
            raise DownloadError("loading profile", ProtocolError(
                "the eUICC returned no ProfileInstallationResult after the last segment; the profile may "
                "still have been installed: check `profile list` and `notification list`",
                code="no_install_result")).with_cancel(REASON_LOAD_BPP_EXECUTION_ERROR)
        pir = codec.decode("ProfileInstallationResult", pir_raw)
        data = pir["profileInstallationResultData"]
        seq = seq_number(data["notificationMetadata"]["seqNumber"], "ProfileInstallationResult")
        kind, res = data["finalResult"]
        if kind != "successResult":
            cmd = BPP_COMMAND_NAMES.get(res["bppCommandId"], str(res["bppCommandId"]))
            reason = ERROR_REASON_NAMES.get(res["errorReason"], "unknownError")
            # The eUICC ended the session itself; its signed result is a pending
            # notification that tells the SM-DP+ (processed by the caller).
            err = CardError(f"the eUICC refused the profile package at {cmd}: {reason}",
                            code=f"install_{code_for(reason)}", details={"bpp_command": cmd, "error_reason": reason,
                                                                      "notification_seq": seq})
            self.txid = None  # nothing left to cancel
            raise DownloadError("loading profile", err)
        aid = res.get("aid")
        self._progress("installed", total, total)
        return DownloadResult(self.txid or "", meta.iccid, aid.hex().upper() if aid else None,
                              installed_profile(meta, aid), meta, total, seq, bytes(pir_raw))


def _refusal_hint(name: str) -> str:
    return {
        "ciPKUnknown": "the SM-DP+ certificate comes from a CI this eUICC does not trust",
        "invalidCertificate": "the SM-DP+ certificate does not verify against the CIs this eUICC trusts",
        "invalidSignature": "the SM-DP+ signature is wrong",
        "euiccChallengeMismatch": "the session got mixed up; retry",
        "noSessionContext": "the eUICC has no session (was it reset?); retry",
    }.get(name, "")

