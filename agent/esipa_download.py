"""Indirect profile download: ES9+ through the eIM over ESipa (SGP.32 §3.2.3, §6.3.2.1-5;
docs/protocol.md §7.2, §7.5).

In an indirect download the IPA never talks to the SM-DP+.  The steps of a direct download
(flows/download.py) go to the eIM instead, as ESipa initiateAuthentication (BF39),
authenticateClient (BF3B), getBoundProfilePackage (BF3A) and cancelSession (BF41); the eIM
relays each over ES9+' and answers with the SM-DP+'s data in the ESipa response types.  The
install result (the PIR) goes the same way, in handleNotification (BF3D).

:class:`EsipaDownloadClient` offers flows.download.Downloader exactly the ES9+ client methods
it calls, with the same results (es9p.InitiateAuthResult, es9p.AuthClientResult, the BPP
bytes), so there is one download flow for both kinds.  Signed data is relayed byte for byte
(docs/protocol.md §0.6) both ways: what the eUICC signed must appear unchanged in the encoded
ESipa request (eim_client.EimClient.download_call checks it), and what the SM-DP+ signed is
cut out of the eIM's answer as received, never decoded and re-encoded.

The eIM's error alternatives are plain numbers (asn1/sgp32.asn); each becomes one of our
stable codes, the same code es9p.py gives the SM-DP+'s equivalent Failed status where there
is one (so e.g. invalidTransactionId is ``unknown_transaction`` on either path).  The tables
and the answer builders (``*_ok``) are shared with the local eIM's relay (agent/sim/eim.py).
"""
from __future__ import annotations


from . import codec, tlv
from .errors import InputError, ProtocolError, ServerError
from .es9p import STATUS_CODES, AuthClientResult, InitiateAuthResult
from .flows.notifications import VIA_EIM  # noqa: F401 - re-exported for ipa.py
from .logs import get_logger

log = get_logger(__name__)

# VIA_EIM (flows/notifications.py): the outbox address prefix (``esipa:`` + the eIM's host:port) of
# a notification that goes to the SM-DP+ through the eIM: the outbox keeps it until the eIM accepted
# it, and only the IPA's poll round delivers it (ipa.py), since the device may not reach the SM-DP+.

def _err(name: str, *, code: str) -> tuple[str, str]:
    """(spec name, our code); ``code=`` by keyword, where tests/test_error_codes.py looks for codes."""
    return name, code


# ESipa error number -> (spec name, our error code), per function (asn1/sgp32.asn).
INITIATE_AUTH_ERRORS = {
    1: _err("invalidDpAddress", code="invalid_smdp_address"),
    2: _err("euiccVersionNotSupportedByDp", code="svn_not_supported"),
    3: _err("ciPKIdNotSupported", code="unsupported_ci_pkid"),
    50: _err("smdpAddressMismatch", code="smdp_address_mismatch"),
    51: _err("smdpOidMismatch", code="smdp_oid_mismatch"),
    52: _err("invalidEimTransactionId", code="invalid_eim_transaction_id"),
    127: _err("undefinedError", code="eim_refused"),
}
AUTH_CLIENT_ERRORS = {
    1: _err("eumCertificateInvalid", code="eum_certificate_invalid"),
    2: _err("eumCertificateExpired", code="eum_certificate_expired"),
    3: _err("euiccCertificateInvalid", code="euicc_certificate_invalid"),
    4: _err("euiccCertificateExpired", code="euicc_certificate_expired"),
    5: _err("euiccSignatureInvalid", code="euicc_signature_invalid"),
    6: _err("matchingIdRefused", code="matching_id_refused"),
    7: _err("eidMismatch", code="eid_mismatch"),
    8: _err("noEligibleProfile", code="no_eligible_profile"),
    9: _err("ciPKUnknown", code="unknown_ci_public_key"),
    10: _err("invalidTransactionId", code="unknown_transaction"),
    11: _err("insufficientMemory", code="insufficient_memory"),
    18: _err("downloadOrderExpired", code="order_expired"),
    50: _err("pprNotAllowed", code="ppr_not_allowed"),
    56: _err("eventIdUnknown", code="event_id_unknown"),
    127: _err("undefinedError", code="eim_refused"),
}
GET_BPP_ERRORS = {
    1: _err("euiccSignatureInvalid", code="euicc_signature_invalid"),
    2: _err("confirmationCodeMissing", code="confirmation_code_required"),
    3: _err("confirmationCodeRefused", code="confirmation_code_wrong"),
    4: _err("confirmationCodeRetriesExceeded", code="confirmation_code_retries_exceeded"),
    5: _err("bppRebindingRefused", code="bpp_rebinding_refused"),
    6: _err("downloadOrderExpired", code="order_expired"),
    50: _err("metadataMismatch", code="metadata_mismatch"),
    95: _err("invalidTransactionId", code="unknown_transaction"),
    127: _err("undefinedError", code="eim_refused"),
}
CANCEL_ERRORS = {
    1: _err("invalidTransactionId", code="unknown_transaction"),
    2: _err("euiccSignatureInvalid", code="euicc_signature_invalid"),
    127: _err("undefinedError", code="eim_refused"),
}
#: function -> its error table
ERRORS = {"initiateAuthentication": INITIATE_AUTH_ERRORS, "authenticateClient": AUTH_CLIENT_ERRORS,
          "getBoundProfilePackage": GET_BPP_ERRORS, "cancelSession": CANCEL_ERRORS}
UNDEFINED_ERROR = 127

# what each shared code means, as es9p.py says it for the SM-DP+'s statuses
_MEANINGS = {code: meaning for code, meaning in STATUS_CODES.values()}


def error_number(function: str, code: str) -> int:
    """The ESipa error number the eIM answers for an ES9+' failure with our stable ``code``
    (es9p.py's for the SM-DP+'s status), undefinedError when the function has none for it."""
    for n, (_, c) in ERRORS[function].items():
        if c == code and n != UNDEFINED_ERROR:
            return n
    return UNDEFINED_ERROR


class EsipaDownloadError(ServerError):
    """The eIM answered a download function with its error alternative (exit 1).

    ``details``: function, esipa_error (the number), esipa_error_name."""

    code = "eim_refused"


def _refused(function: str, number: int, address: str) -> EsipaDownloadError:
    name, code = ERRORS[function].get(number, ("error", "eim_refused"))
    meaning = _MEANINGS.get(code) or ("the eIM (or the SM-DP+ behind it) refused the request"
                                      if code == "eim_refused" else name)
    return EsipaDownloadError(f"{function} through eIM {address}: {meaning} ({name} {number})", code=code,
                              details={"function": function, "esipa_error": number, "esipa_error_name": name})


# --- answers, as the eIM builds them (DER cut together, signed parts as the SM-DP+ sent them) --

def _txid_tlv(transaction_id: str) -> bytes:
    return tlv.encode(0x80, bytes.fromhex(transaction_id))


def initiate_authentication_ok(ia: InitiateAuthResult) -> bytes:
    """BF39 A0{80 transactionId, 30 serverSigned1, 5F37, 04 euiccCiPKIdToBeUsed, 30 serverCertificate}."""
    return tlv.encode(0xBF39, tlv.encode(0xA0, _txid_tlv(ia.transaction_id) + ia.server_signed1
                                         + ia.server_signature1 + ia.euicc_ci_pkid_to_be_used
                                         + ia.server_certificate))


def authenticate_client_ok(ac: AuthClientResult) -> bytes:
    """BF3B A0{80 transactionId, BF25 profileMetaData, 30 smdpSigned2, 5F37, 30 smdpCertificate}."""
    return tlv.encode(0xBF3B, tlv.encode(0xA0, _txid_tlv(ac.transaction_id) + ac.profile_metadata
                                         + ac.smdp_signed2 + ac.smdp_signature2 + ac.smdp_certificate))


def get_bound_profile_package_ok(transaction_id: str, bpp: bytes) -> bytes:
    """BF3A A0{80 transactionId, BF36 boundProfilePackage}."""
    return tlv.encode(0xBF3A, tlv.encode(0xA0, _txid_tlv(transaction_id) + bpp))


def error_answer(function: str, number: int) -> bytes:
    """The function's error alternative: BF39 81 | BF3B 82 | BF3A 81 | BF41 81, an INTEGER."""
    tag, alt = {"initiateAuthentication": (0xBF39, 0x81), "authenticateClient": (0xBF3B, 0x82),
                "getBoundProfilePackage": (0xBF3A, 0x81), "cancelSession": (0xBF41, 0x81)}[function]
    return tlv.encode(tag, tlv.encode(alt, number.to_bytes(max(1, (number.bit_length() + 8) // 8), "big")))


CANCEL_SESSION_OK = bytes.fromhex("BF4102A000")      # BF41 A0{} cancelSessionOk


def card_cancel_response(esipa_request: bytes) -> bytes:
    """The eUICC's CancelSessionResponse (BF41 ...) out of a CancelSessionRequestEsipa as received:
    there the implicit [1] (A1) replaced its BF41, the content is unchanged."""
    for t in tlv.children(tlv.parse_single(esipa_request)):
        if t.tag == 0xA1:
            return tlv.encode(0xBF41, t.value)
    raise ProtocolError("cancelSession carries no cancelSessionResponse", code="bad_esipa_message")


def relayed_part(esipa_request: bytes, tag: int) -> bytes:
    """The component with ``tag`` of an ESipa request as received (BF38 in authenticateClient, BF21 in
    getBoundProfilePackage, BF20 in initiateAuthentication), byte for byte."""
    for t in tlv.children(tlv.parse_single(esipa_request)):
        if t.tag == tag:
            return t.raw
    raise ProtocolError(f"the ESipa request carries no {tag:X}", code="bad_esipa_message")


def relayed_notification(esipa_request: bytes) -> bytes | None:
    """The PendingNotification (BF37 PIR | 30 other) of a handleNotification as received
    (BF3D A0{...}: the [0] is explicit around the untagged CHOICE); None for the other alternative."""
    kids = tlv.children(tlv.parse_single(esipa_request))
    if len(kids) == 1 and kids[0].tag == 0xA0:
        inner = tlv.children(kids[0])
        if len(inner) == 1:
            return inner[0].raw
    return None


# --- the IPA side ------------------------------------------------------------------------------

class EsipaDownloadClient:
    """The ES9+ client interface of flows.download.Downloader, over ESipa to the eIM of ``client``
    (an eim_client.EimClient, either binding, either ESipa version).

    ``eim_transaction_id``: the trigger's, echoed in initiateAuthentication so the eIM knows which
    of its download orders this is (v1.2; v1.0 has no such field)."""

    server_kind = "eIM"

    def __init__(self, client, *, eim_transaction_id: bytes | None = None):
        self.client = client
        self.address = client.address
        self.eim_transaction_id = eim_transaction_id if client.version != "1.0" else None

    @property
    def outbox_address(self) -> str:
        return VIA_EIM + self.client.address

    def _ok(self, function: str, name: str, value, relayed: list[bytes], ok_tags: tuple[int, ...]) -> tlv.Tlv:
        """Send; return the ok alternative's TLV as received, or raise the eIM's error."""
        _, answer, raw = self.client.download_call(name, value, relayed=relayed)
        alt, v = answer
        if isinstance(v, int):
            raise _refused(function, v, self.address)
        try:
            kids = tlv.children(tlv.parse_single(raw))
        except ProtocolError as e:
            raise ProtocolError(f"eIM {self.address} answered {function} with malformed DER: {e.message}",
                                code="bad_esipa_message") from None
        if len(kids) != 1 or kids[0].tag not in ok_tags:
            raise ProtocolError(f"eIM {self.address} answered {function} with {alt}, not a usable answer",
                                code="bad_esipa_message", details={"function": function})
        return kids[0]

    @staticmethod
    def _fields(ok: tlv.Tlv) -> list[tlv.Tlv]:
        return tlv.children(ok)

    def _missing(self, function: str, what: str) -> ProtocolError:
        return ProtocolError(f"eIM {self.address} answered {function} without {what}", code="missing_field",
                             details={"function": function, "field": what})

    def _check_txid(self, function: str, kids: list[tlv.Tlv], transaction_id: str) -> None:
        got = tlv.find(kids, 0x80)
        if got is not None and got.value != bytes.fromhex(transaction_id):
            raise ProtocolError(f"eIM {self.address} answered {function} for transaction {got.value.hex().upper()}, "
                                f"but we sent {transaction_id}", code="transaction_id_mismatch",
                                details={"function": function})

    # -- what Downloader calls --
    def initiate_authentication(self, euicc_challenge: bytes, euicc_info1: bytes,
                                smdp_address: str) -> InitiateAuthResult:
        f = "initiateAuthentication"
        if len(euicc_challenge) != 16:
            raise InputError(f"euiccChallenge must be 16 bytes, got {len(euicc_challenge)}", code="bad_es9p_input")
        req: dict = {"euiccChallenge": euicc_challenge, "smdpAddress": smdp_address,
                     "euiccInfo1": codec.decode("EUICCInfo1", euicc_info1)}
        if self.eim_transaction_id is not None:
            req["eimTransactionId"] = self.eim_transaction_id
        ok = self._ok(f, "initiateAuthenticationRequestEsipa", req, [euicc_info1], (0xA0,))
        kids = self._fields(ok)
        seqs = [k for k in kids if k.tag == 0x30]
        sig, pkid = tlv.find(kids, 0x5F37), tlv.find(kids, 0x04)
        if len(seqs) < 2 or sig is None or pkid is None:
            raise self._missing(f, "serverSigned1, serverSignature1, euiccCiPKIdentifierToBeUsed and serverCertificate")
        signed1 = seqs[0]
        inner = tlv.find(tlv.children(signed1), 0x80)         # serverSigned1.transactionId
        given = tlv.find(kids, 0x80)
        if inner is None:
            raise self._missing(f, "a transactionId in serverSigned1")
        if given is not None and given.value != inner.value:
            raise ProtocolError(f"eIM {self.address} {f}: transactionId {given.value.hex().upper()} differs from "
                                f"the one in serverSigned1 ({inner.value.hex().upper()})",
                                code="transaction_id_mismatch", details={"function": f})
        if not 1 <= len(inner.value) <= 16:
            raise ProtocolError(f"eIM {self.address} {f}: transactionId is not 1-16 bytes", code="bad_transaction_id")
        return InitiateAuthResult(transaction_id=inner.value.hex().upper(), server_signed1=signed1.raw,
                                  server_signature1=sig.raw, euicc_ci_pkid_to_be_used=pkid.raw,
                                  server_certificate=seqs[1].raw)

    def authenticate_client(self, transaction_id: str, authenticate_server_response: bytes) -> AuthClientResult:
        f = "authenticateClient"
        req = {"transactionId": bytes.fromhex(transaction_id),
               "authenticateServerResponse": codec.decode("SGP32-AuthenticateServerResponse",
                                                          authenticate_server_response)}
        ok = self._ok(f, "authenticateClientRequestEsipa", req, [authenticate_server_response], (0xA0, 0xA1))
        if ok.tag == 0xA1:
            # authenticateClientOkDSEsipa: an SM-DS event answer; an activation-code download has none
            raise ProtocolError(f"eIM {self.address} answered {f} with an SM-DS event (authenticateClientOkDS), "
                                "not a profile download", code="bad_esipa_message", details={"function": f})
        kids = self._fields(ok)
        self._check_txid(f, kids, transaction_id)
        meta, sig = tlv.find(kids, 0xBF25), tlv.find(kids, 0x5F37)
        seqs = [k for k in kids if k.tag == 0x30]
        if meta is None:
            raise self._missing(f, "profileMetaData")
        if len(seqs) < 2 or sig is None:
            raise self._missing(f, "smdpSigned2, smdpSignature2 and smdpCertificate")
        return AuthClientResult(transaction_id=transaction_id, profile_metadata=meta.raw, smdp_signed2=seqs[0].raw,
                                smdp_signature2=sig.raw, smdp_certificate=seqs[1].raw)

    def get_bound_profile_package(self, transaction_id: str, prepare_download_response: bytes) -> bytes:
        f = "getBoundProfilePackage"
        req = {"transactionId": bytes.fromhex(transaction_id),
               "prepareDownloadResponse": codec.decode("SGP32-PrepareDownloadResponse", prepare_download_response)}
        ok = self._ok(f, "getBoundProfilePackageRequestEsipa", req, [prepare_download_response], (0xA0,))
        kids = self._fields(ok)
        self._check_txid(f, kids, transaction_id)
        bpp = tlv.find(kids, 0xBF36)
        if bpp is None:
            raise self._missing(f, "boundProfilePackage")
        return bpp.raw

    def cancel_session(self, transaction_id: str, cancel_session_response: bytes) -> None:
        f = "cancelSession"
        req = {"transactionId": bytes.fromhex(transaction_id),
               "cancelSessionResponse": codec.decode("SGP32-CancelSessionResponse", cancel_session_response)}
        # the implicit [1] replaces the eUICC's BF41: its content goes as it is
        self._ok(f, "cancelSessionRequestEsipa", req, [tlv.parse_single(cancel_session_response).value], (0xA0,))

    def handle_notification(self, pending_notification: bytes) -> None:
        """handleNotification (SGP.32 §6.3.2.4): the eIM relays it to the SM-DP+.  Returns only
        when the eIM accepted it (2xx), so the caller may remove it from the eUICC then."""
        value = ("pendingNotification", codec.decode("SGP32-PendingNotification", pending_notification))
        self.client.download_call("handleNotificationEsipa", value, relayed=[pending_notification])

    def close(self) -> None:
        """The EimClient belongs to the poll round, which closes it."""
