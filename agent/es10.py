"""ES10a/b/c client (SGP.22 §5.7): typed calls returning dataclasses (es10_types.py, but for
the two a command's first calls return: EuiccInfo1 and ConfiguredAddresses).

Each function encodes its request with the ASN.1 codec, sends it as one ES10
command through an ``Isdr`` session (STORE DATA), decodes the response and
turns error results into ``Es10Error`` carrying the spec's outcome name
(``iccidOrAidNotFound``, ``disallowedByPolicy``, ``catBusy`` …).

Signed blobs (notifications, authenticate/prepare responses) are returned as
the exact bytes the eUICC sent: they are forwarded, never re-encoded
(docs/protocol.md §0.6).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import codec, tlv
from .errors import CardError, InputError, ProtocolError, code_for
from .ids import iccid_from_bytes, iccid_to_bytes

TYPE_CHECKING = False   # typing's import (~5 ms) only for checkers: annotations are strings here
if TYPE_CHECKING:
    from typing import Any

    from .es10_iot import AddInitialEimResult, EimConfig, IotInfo, IotProfileInfo
    from .es10_types import EuiccInfo2, NotificationInfo, PendingNotification, ProfileInfo, RatRule


class Es10Channel:
    """What Es10 needs of its channel (``apdu.Isdr``): one ES10 command out, its answer back.
    Duck-typed, like transport/base.py's ApduTransport."""

    def es10(self, payload: bytes, *, timeout: float | None = None, what: str = ...) -> bytes: ...


class Es10Error(CardError):
    """The eUICC answered an ES10 function with an error result."""

    def __init__(self, function: str, outcome: str, value: int, hint: str = ""):
        msg = f"{function}: the eUICC answered {outcome} ({value})"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg, code=outcome_code(outcome), details={"function": function, "result": value})
        self.function = function
        self.outcome = outcome
        self.value = value


# --- result code tables (SGP.22 §5.7.x ASN.1 named numbers) -----------------

ENABLE_RESULTS = {0: "ok", 1: "iccidOrAidNotFound", 2: "profileNotInDisabledState", 3: "disallowedByPolicy",
                  4: "wrongProfileReenabling", 5: "catBusy", 127: "undefinedError"}
DISABLE_RESULTS = {0: "ok", 1: "iccidOrAidNotFound", 2: "profileNotInEnabledState", 3: "disallowedByPolicy",
                   5: "catBusy", 127: "undefinedError"}
DELETE_RESULTS = {0: "ok", 1: "iccidOrAidNotFound", 2: "profileNotInDisabledState", 3: "disallowedByPolicy",
                  127: "undefinedError"}
NICKNAME_RESULTS = {0: "ok", 1: "iccidNotFound", 127: "undefinedError"}
RESET_RESULTS = {0: "ok", 1: "nothingToDelete", 5: "catBusy", 127: "undefinedError"}
NOTIF_SENT_RESULTS = {0: "ok", 1: "nothingToDelete", 127: "undefinedError"}
SET_DP_RESULTS = {0: "ok", 127: "undefinedError"}
PROFILE_INFO_ERRORS = {1: "incorrectInputValues", 127: "undefinedError"}
CANCEL_SESSION_ERRORS = {5: "invalidTransactionId", 127: "undefinedError"}
AUTH_SERVER_ERRORS = {1: "invalidCertificate", 2: "invalidSignature", 3: "unsupportedCurve",
                      4: "noSessionContext", 5: "invalidOid", 6: "euiccChallengeMismatch",
                      7: "ciPKUnknown", 127: "undefinedError"}
PREPARE_DOWNLOAD_ERRORS = {1: "invalidCertificate", 2: "invalidSignature", 3: "unsupportedCurve",
                           4: "noSessionContext", 5: "invalidTransactionId", 127: "undefinedError"}
# SGP.32 ES10b (SGP.32 §5.9; docs/protocol.md §7)
ADD_INITIAL_EIM_ERRORS = {1: "insufficientMemory", 2: "associatedEimAlreadyExists", 3: "ciPKUnknown",
                          5: "invalidAssociationToken", 6: "counterValueOutOfRange", 7: "commandError",
                          127: "undefinedError"}
ROLLBACK_RESULTS = {0: "ok", 1: "rollbackNotAllowed", 5: "catBusy", 7: "commandError", 127: "undefinedError"}
FALLBACK_RESULTS = {0: "ok", 2: "profileNotInDisabledState", 5: "catBusy", 6: "fallbackNotAvailable",
                    7: "commandError", 104: "ecallActive", 127: "undefinedError"}
RETURN_FROM_FALLBACK_RESULTS = {0: "ok", 5: "catBusy", 6: "fallbackNotAvailable", 7: "commandError",
                                127: "undefinedError"}
IMMEDIATE_ENABLE_RESULTS = {0: "ok", 1: "immediateEnableNotAvailable", 4: "noSessionContext", 5: "catBusy",
                            127: "undefinedError"}
CONFIGURE_IMMEDIATE_RESULTS = {0: "ok", 1: "insufficientMemory", 2: "associatedEimAlreadyExists",
                               127: "undefinedError"}
GET_CERTS_ERRORS = {1: "invalidCiPKId", 127: "undefinedError"}
RESULT_TABLES = (ENABLE_RESULTS, DISABLE_RESULTS, DELETE_RESULTS, NICKNAME_RESULTS, RESET_RESULTS,
                 NOTIF_SENT_RESULTS, SET_DP_RESULTS, PROFILE_INFO_ERRORS, CANCEL_SESSION_ERRORS,
                 AUTH_SERVER_ERRORS, PREPARE_DOWNLOAD_ERRORS, ADD_INITIAL_EIM_ERRORS, ROLLBACK_RESULTS,
                 FALLBACK_RESULTS, RETURN_FROM_FALLBACK_RESULTS, IMMEDIATE_ENABLE_RESULTS,
                 CONFIGURE_IMMEDIATE_RESULTS, GET_CERTS_ERRORS)
_OUTCOMES = frozenset(name for t in RESULT_TABLES for name in t.values() if name != "ok")


def outcome_code(outcome: str) -> str:
    """Error code of an ES10 outcome name: code_for() of a name from the tables above
    (ciPKUnknown → ci_pk_unknown); ``unknown_result`` for a number no table names
    (the number itself is in the error's details)."""
    return code_for(outcome) if outcome in _OUTCOMES else "unknown_result"


_HINTS = {
    "iccidOrAidNotFound": "check the ICCID/AID with `profile list`",
    "profileNotInDisabledState": "the profile is enabled; disable it (or enable another one) first",
    "profileNotInEnabledState": "the profile is already disabled",
    "disallowedByPolicy": "the profile's policy rules (PPR) forbid this operation",
    "catBusy": "the card's toolkit is busy; retry after the modem has re-read the SIM",
    "wrongProfileReenabling": "the profile is already enabled",
    "iccidNotFound": "check the ICCID with `profile list`",
    "associatedEimAlreadyExists": "the eUICC already has an eIM; AddInitialEim only works on a card without one "
                                  "(see `ipa list-eim`)",
    "rollbackNotAllowed": "no enable with a rollback flag is pending, or its one rollback was used",
    "fallbackNotAvailable": "no profile carries the fallback attribute, or the fallback is already active",
}


def _check(function: str, table: dict[int, str], value: int) -> None:
    if value != 0:
        name = table.get(value, f"unknownResult{value}")
        raise Es10Error(function, name, value, _HINTS.get(name, ""))


# --- bit strings --------------------------------------------------------------

PMO_BITS = {"install": 0, "enable": 1, "disable": 2, "delete": 3}
PMO_NAMES = {v: k for k, v in PMO_BITS.items()}
PPR_NAMES = {0: "pprUpdateControl", 1: "ppr1", 2: "ppr2", 3: "ppr3"}
PROFILE_CLASSES = {0: "test", 1: "provisioning", 2: "operational"}
PROFILE_STATES = {0: "disabled", 1: "enabled"}


def bits_set(value: tuple[bytes, int] | None) -> list[int]:
    if not value:
        return []
    data, nbits = value
    return [i for i in range(min(nbits, 8 * len(data))) if data[i // 8] & (0x80 >> (i % 8))]


def make_bits(indices) -> tuple[bytes, int]:
    """DER named-bit BIT STRING value: trailing zero bits dropped (X.690 §11.2.2)."""
    indices = sorted(set(indices))
    if not indices:
        return b"", 0
    nbits = indices[-1] + 1
    buf = bytearray((nbits + 7) // 8)
    for i in indices:
        buf[i // 8] |= 0x80 >> (i % 8)
    return bytes(buf), nbits


def search_criteria(seq: int | None = None, operation: str | None = None) -> tuple | None:
    """The searchCriteria of a RetrieveNotificationsList (SGP.22 §5.7.10): one sequence number,
    or one kind of profile management operation; None: everything pending."""
    if seq is not None:
        return ("seqNumber", seq)
    if operation is not None:
        return ("profileManagementOperation", pmo_bits(operation))
    return None


def pmo_bits(operation: str) -> tuple[bytes, int]:
    return make_bits([PMO_BITS[operation]])


def pmo_name(value) -> str:
    ops = [PMO_NAMES.get(i, f"bit{i}") for i in bits_set(value)]
    return ops[0] if len(ops) == 1 else ",".join(ops) or "none"


def version_str(v: bytes | None) -> str | None:
    return ".".join(str(b) for b in v) if v is not None else None


# --- dataclasses ----------------------------------------------------------------

@dataclass
class EuiccInfo1:
    """EUICCInfo1 (SGP.22 §5.7.8): what the SM-DP+ gets in initiateAuthentication."""
    svn: str
    ci_pkids_for_verification: list[str]
    ci_pkids_for_signing: list[str]
    raw: bytes = field(repr=False, default=b"")

    def to_json(self) -> dict:
        return {"svn": self.svn, "ci_pkids_for_verification": self.ci_pkids_for_verification,
                "ci_pkids_for_signing": self.ci_pkids_for_signing}


@dataclass
class ConfiguredAddresses:
    """The eUICC's default SM-DP+ and root SM-DS addresses (SGP.22 §5.7.3)."""
    default_dp_address: str | None
    root_ds_address: str | None


# --- helpers -------------------------------------------------------------------

#: Requests with nothing to fill in, as the codec encodes them (tests/test_es10.py holds each
#: equal to codec.encode and to the independent reference vectors): sent without the ASN.1
#: tables, which load while the card answers (agent/preload.py).
FIXED_REQUESTS = {
    "GetEuiccDataRequest": bytes.fromhex("BF3E035C015A"),     # tagList: the EID (5A)
    "GetEuiccInfo1Request": bytes.fromhex("BF2000"),
    "GetEuiccInfo2Request": bytes.fromhex("BF2200"),
    "GetEuiccChallengeRequest": bytes.fromhex("BF2E00"),
    "EuiccConfiguredAddressesRequest": bytes.fromhex("BF3C00"),
}


def _key_ids(seq_of: bytes) -> list[str]:
    """SEQUENCE OF SubjectKeyIdentifier (OCTET STRING, 04) contents → hex key IDs."""
    ids = []
    try:
        keys = tlv.parse_all(seq_of)
    except ProtocolError as e:
        raise ProtocolError(f"malformed EUICCInfo1: {e}", code="malformed_asn1") from None
    for t in keys:
        if t.tag != 0x04:
            raise ProtocolError(f"malformed EUICCInfo1: a CI key ID list holds tag {t.tag:X}, not 04",
                                code="malformed_asn1")
        ids.append(t.value.hex().upper())
    return ids


#: SGP.02 / SGP.22: an ISD-P AID is 16 bytes (RID A000000559 + PIX), typically A0000005591010FFFFFFFF89…
ISDP_AID_LENGTH = 16
_HEX_TEXT = r"[0-9A-Fa-f]+"     # compiled by re on first use (its cache), not at import


def profile_identifier(ident: str) -> tuple[str, bytes]:
    """Turn a CLI argument into ('iccid', bytes) or ('isdpAid', bytes).

    ICCIDs go through the one ICCID parser (``ids.parse_iccid``: 18–20 digits, F padding
    accepted); ISD-P AIDs are 16 bytes of hex (32 digits), refused here otherwise so a
    wrong one never reaches the card."""
    s = ident.strip().replace(" ", "") if isinstance(ident, str) else ""
    if s.isascii() and s.rstrip("Ff").isdigit() and (len(s) != 32 or not s.isdigit()):
        try:
            return "iccid", iccid_to_bytes(s)
        except InputError:
            raise InputError(f"{ident!r} is not an ICCID (18–20 digits 0-9, F padding accepted) nor an ISD-P AID "
                             "(32 hex digits)", code="bad_profile_id") from None
    if s[:1] in ("A", "D", "a", "d") and re.fullmatch(_HEX_TEXT, s):
        if len(s) != 2 * ISDP_AID_LENGTH:
            raise InputError(f"{ident!r} is not an ISD-P AID: it has {len(s)} hex digits, an ISD-P AID is "
                             f"{ISDP_AID_LENGTH} bytes (32 hex digits, e.g. A0000005591010FFFFFFFF8900001000)",
                             code="bad_profile_id")
        return "isdpAid", bytes.fromhex(s)
    hint = "; 32 digits look like an EID (the eUICC's own identifier)" if len(s) == 32 and s.isdigit() else ""
    raise InputError(f"{ident!r} is neither an ICCID (18–20 digits) nor an ISD-P AID (32 hex digits){hint}",
                     code="bad_profile_id")


def canonical_profile_id(ident: str) -> str:
    """A profile argument as we show it back: the ICCID's digits, or the AID in upper-case hex
    (no surrounding spaces, no F padding)."""
    kind, value = profile_identifier(ident)
    return iccid_from_bytes(value) if kind == "iccid" else value.hex().upper()


#: profileNickname is UTF8String (SIZE(0..64)) (SGP.22 §5.7.21, ProfileInfo tag 90); the size of a
#: character string type counts characters (X.680), so 64 characters, whatever their UTF-8 length.
MAX_NICKNAME = 64
# Control, format, surrogate, private-use and unassigned characters, and line/paragraph separators:
# they would corrupt every listing of the profiles (terminal escapes, line breaks, bidi overrides).
_NICKNAME_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_NICKNAME_JOINERS = frozenset("\u200c\u200d")        # ZWNJ / ZWJ: part of some scripts and emoji


def nickname_value(name: str, *, allow_empty: bool = False) -> str:
    """A profile nickname, checked and normalised (surrounding whitespace dropped, Unicode NFC).
    An empty name clears the nickname in SetNickname; only ``allow_empty`` callers mean that."""
    import unicodedata
    if not isinstance(name, str):
        raise InputError("a profile nickname must be text", code="bad_nickname")
    n = unicodedata.normalize("NFC", name.strip())
    if not n and not allow_empty:
        raise InputError("the nickname is empty: give a name, or remove the nickname with "
                         "`profile nickname ICCID --clear`", code="bad_nickname")
    for i, ch in enumerate(n):
        if unicodedata.category(ch) in _NICKNAME_BAD_CATEGORIES and ch not in _NICKNAME_JOINERS:
            raise InputError(f"the nickname contains the control character U+{ord(ch):04X} at position {i + 1}; "
                             "a nickname is one line of printable text", code="bad_nickname")
    if len(n) > MAX_NICKNAME:
        raise InputError(f"the nickname is {len(n)} characters long; SGP.22 allows at most {MAX_NICKNAME} "
                         "characters (profileNickname, §5.7.21)", code="bad_nickname")
    return n


#: Largest notification sequence number we accept: the outbox keeps it in an SQLite INTEGER
#: (signed 64-bit).  SGP.22 leaves seqNumber unbounded; cards count up from 0 or 1.
MAX_SEQ_NUMBER = 2 ** 63 - 1


def seq_number(value, where: str = "notification") -> int:
    """A seqNumber from the card, checked: 0 ≤ n ≤ MAX_SEQ_NUMBER, else ProtocolError."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ_NUMBER:
        shown = value if isinstance(value, int) and value.bit_length() <= 128 else "a number too large to show"
        raise ProtocolError(f"the eUICC sent a {where} with sequence number {shown}, outside "
                            f"0..{MAX_SEQ_NUMBER}", code="malformed_asn1", details={"seq_number": str(shown)})
    return value


# --- the client ------------------------------------------------------------------

class Es10:
    """ES10a/b/c functions over an open ISD-R session (``apdu.Isdr``)."""

    def __init__(self, channel: Es10Channel, *, long_timeout: float | None = None):
        self.ch = channel
        self.long_timeout = long_timeout

    def call_raw(self, request: bytes, *, what: str, timeout: float | None = None) -> bytes:
        return self.ch.es10(request, timeout=timeout, what=what)

    def answer(self, request: bytes, what: str, expected: str, *, timeout: float | None = None) -> bytes:
        """The card's answer to ``request`` (ES10 function ``what``), refused if empty; not decoded
        (es10_iot.py keeps the raw bytes of several answers)."""
        resp = self.call_raw(request, what=what, timeout=timeout)
        if not resp:
            raise ProtocolError(f"{what}: the eUICC returned no data (expected {expected})", code="empty_response")
        return resp

    def _call(self, req_type: str, value: Any, resp_type: str, *, timeout: float | None = None) -> Any:
        return codec.decode(resp_type, self.answer(codec.encode(req_type, value), req_type, resp_type,
                                                   timeout=timeout))

    def _fixed(self, req_type: str, resp_type: str) -> bytes:
        """Send a request of FIXED_REQUESTS; its answer, refused if empty, not decoded."""
        return self.answer(FIXED_REQUESTS[req_type], req_type, resp_type)

    # ES10c GetEID (SGP.22 §5.7.20). Read with the TLV parser (codec.read_fields), like
    # GetEUICCInfo1 and GetEUICCChallenge: a command's first calls need no ASN.1 tables.
    def get_eid(self) -> str:
        raw = self._fixed("GetEuiccDataRequest", "GetEuiccDataResponse")
        eid, = codec.read_fields("GetEuiccDataResponse", raw, 0xBF3E, (0x5A,))
        return eid.hex().upper()

    # ES10b GetEUICCInfo1 (§5.7.8): BF20 { 82 svn, A9 { 04 ... }, AA { 04 ... } }
    def get_euicc_info1(self) -> EuiccInfo1:
        raw = self._fixed("GetEuiccInfo1Request", "EUICCInfo1")
        svn, verification, signing = codec.read_fields("EUICCInfo1", raw, 0xBF20, (0x82, 0xA9, 0xAA))
        return EuiccInfo1(version_str(svn), _key_ids(verification), _key_ids(signing), raw=raw)

    # ES10b GetEUICCInfo2 (§5.7.8)
    def get_euicc_info2(self) -> EuiccInfo2:
        raw = self._fixed("GetEuiccInfo2Request", "EUICCInfo2")
        from .es10_types import euicc_info2_from_asn1
        return euicc_info2_from_asn1(codec.decode("EUICCInfo2", raw), raw)

    # ES10a GetEuiccConfiguredAddresses (§5.7.3)
    def get_configured_addresses(self) -> ConfiguredAddresses:
        raw = self._fixed("EuiccConfiguredAddressesRequest", "EuiccConfiguredAddressesResponse")
        v = codec.decode("EuiccConfiguredAddressesResponse", raw)
        return ConfiguredAddresses(v.get("defaultDpAddress") or None, v.get("rootDsAddress") or None)

    # ES10a SetDefaultDpAddress (§5.7.4)
    def set_default_dp_address(self, address: str) -> None:
        v = self._call("SetDefaultDpAddressRequest", {"defaultDpAddress": address}, "SetDefaultDpAddressResponse")
        _check("SetDefaultDpAddress", SET_DP_RESULTS, v["setDefaultDpAddressResult"])

    # ES10c GetProfilesInfo (§5.7.15)
    def get_profiles_info(self, *, iccid: str | None = None, isdp_aid: bytes | None = None,
                          profile_class: int | None = None, tags: bytes | None = None) -> list[ProfileInfo]:
        req: dict = {}
        if iccid is not None:
            req["searchCriteria"] = ("iccid", iccid_to_bytes(iccid))
        elif isdp_aid is not None:
            req["searchCriteria"] = ("isdpAid", isdp_aid)
        elif profile_class is not None:
            req["searchCriteria"] = ("profileClass", profile_class)
        if tags is not None:
            req["tagList"] = tags
        kind, v = self._call("ProfileInfoListRequest", req, "ProfileInfoListResponse")
        if kind == "profileInfoListError":
            raise Es10Error("GetProfilesInfo", PROFILE_INFO_ERRORS.get(v, f"unknownResult{v}"), v)
        from .es10_types import profile_from_asn1
        return [profile_from_asn1(p) for p in v]

    # ES10c EnableProfile / DisableProfile / DeleteProfile (§5.7.16–18)
    def enable_profile(self, ident: str, *, refresh: bool = True) -> None:
        v = self._call("EnableProfileRequest", {"profileIdentifier": profile_identifier(ident), "refreshFlag": refresh},
                       "EnableProfileResponse", timeout=self.long_timeout)
        _check("EnableProfile", ENABLE_RESULTS, v["enableResult"])

    def disable_profile(self, ident: str, *, refresh: bool = True) -> None:
        v = self._call("DisableProfileRequest", {"profileIdentifier": profile_identifier(ident), "refreshFlag": refresh},
                       "DisableProfileResponse", timeout=self.long_timeout)
        _check("DisableProfile", DISABLE_RESULTS, v["disableResult"])

    def delete_profile(self, ident: str) -> None:
        v = self._call("DeleteProfileRequest", profile_identifier(ident), "DeleteProfileResponse",
                       timeout=self.long_timeout)
        _check("DeleteProfile", DELETE_RESULTS, v["deleteResult"])

    # ES10c SetNickname (§5.7.21)
    def set_nickname(self, iccid: str, nickname: str) -> None:
        """An empty nickname clears it (SIZE(0..64)); see ``nickname_value``."""
        nickname = nickname_value(nickname, allow_empty=True)
        v = self._call("SetNicknameRequest", {"iccid": iccid_to_bytes(iccid), "profileNickname": nickname},
                       "SetNicknameResponse")
        _check("SetNickname", NICKNAME_RESULTS, v["setNicknameResult"])

    # ES10b ListNotification (§5.7.9)
    def list_notifications(self, operation: str | None = None) -> list[NotificationInfo]:
        req = {"profileManagementOperation": pmo_bits(operation)} if operation else {}
        kind, v = self._call("ListNotificationRequest", req, "ListNotificationResponse")
        if kind != "notificationMetadataList":
            raise Es10Error("ListNotification", "undefinedError", v)
        from .es10_types import notification_from_metadata
        return [notification_from_metadata(md) for md in v]

    # ES10b RetrieveNotificationsList (§5.7.10): keep each element's exact bytes
    def retrieve_notifications(self, *, seq: int | None = None, operation: str | None = None) -> list[PendingNotification]:
        from .es10_types import pending_from_der
        return [pending_from_der(raw) for raw in self.retrieve_raw(
            "RetrieveNotificationsListRequest", "RetrieveNotificationsListResponse", search_criteria(seq, operation))]

    def retrieve_raw(self, req_type: str, resp_type: str, criteria: tuple | None) -> list[bytes]:
        """RetrieveNotificationsList as ``req_type``/``resp_type`` (SGP.22 §5.7.10, or SGP.32's,
        which also lists eUICC Package Results): each listed element's exact bytes, as the eUICC
        signed them; [] for noResultAvailable (nothing matching is pending)."""
        req = {"searchCriteria": criteria} if criteria is not None else {}
        resp = self.answer(codec.encode(req_type, req), "RetrieveNotificationsList", resp_type)
        kind, v = codec.decode(resp_type, resp)        # validates the whole structure
        if kind == "notificationsListResultError":
            if v == 1:
                return []
            raise Es10Error("RetrieveNotificationsList", "undefinedError", v)
        inner = tlv.parse_single(tlv.parse_single(resp).value)      # A0 notificationList
        return [t.raw for t in tlv.children(inner)]

    # ES10b RemoveNotificationFromList (§5.7.11). Returns False for nothingToDelete.
    def remove_notification(self, seq: int) -> bool:
        v = self._call("NotificationSentRequest", {"seqNumber": seq}, "NotificationSentResponse")
        status = v["deleteNotificationStatus"]
        if status == 1:
            return False
        _check("RemoveNotificationFromList", NOTIF_SENT_RESULTS, status)
        return True

    # ES10c eUICCMemoryReset (§5.7.19)
    def memory_reset(self, *, operational: bool = True, test: bool = True, default_dp: bool = True) -> None:
        bits = [i for i, on in ((0, operational), (1, test), (2, default_dp)) if on]
        v = self._call("EuiccMemoryResetRequest", {"resetOptions": make_bits(bits)}, "EuiccMemoryResetResponse",
                       timeout=self.long_timeout)
        _check("eUICCMemoryReset", RESET_RESULTS, v["resetResult"])

    # ES10b GetRAT (§5.7.5)
    def get_rat(self) -> list[RatRule]:
        v = self._call("GetRatRequest", {}, "GetRatResponse")
        from .es10_types import RatRule
        out = []
        for r in v.get("rat", []):
            ops = [{"mcc_mnc": o["mccMnc"].hex().upper(),
                    **({"gid1": o["gid1"].hex().upper()} if o.get("gid1") is not None else {}),
                    **({"gid2": o["gid2"].hex().upper()} if o.get("gid2") is not None else {})}
                   for o in r.get("allowedOperators", [])]
            out.append(RatRule([PPR_NAMES.get(i, f"bit{i}") for i in bits_set(r.get("pprIds"))], ops,
                               0 in bits_set(r.get("pprFlags"))))
        return out

    # ES10b GetEUICCChallenge (§5.7.7): BF2E { 80 challenge }
    def get_euicc_challenge(self) -> bytes:
        raw = self._fixed("GetEuiccChallengeRequest", "GetEuiccChallengeResponse")
        challenge, = codec.read_fields("GetEuiccChallengeResponse", raw, 0xBF2E, (0x80,))
        return challenge

    # ES10b CancelSession (§5.7.14): returns the raw BF41 response for ES9+ cancelSession
    def cancel_session(self, transaction_id: bytes, reason: int) -> bytes:
        raw = self.call_raw(codec.encode("CancelSessionRequest", {"transactionId": transaction_id, "reason": reason}),
                            what="CancelSessionRequest")
        kind, v = codec.decode("CancelSessionResponse", raw)
        if kind != "cancelSessionResponseOk":
            raise Es10Error("CancelSession", CANCEL_SESSION_ERRORS.get(v, "undefinedError"), v)
        return raw

    # --- SGP.32 (IoT) ES10b functions (SGP.32 §5.9): es10_iot.py, imported on first use -------

    def load_euicc_package(self, package_der: bytes) -> bytes:
        return _iot().load_euicc_package(self, package_der)

    def add_initial_eim(self, configs) -> AddInitialEimResult:
        return _iot().add_initial_eim(self, configs)

    def get_eim_configuration_data(self, eim_id: str | None = None) -> list[EimConfig]:
        return _iot().get_eim_configuration_data(self, eim_id)

    def profile_rollback(self, refresh: bool = True) -> tuple[int, bytes | None]:
        return _iot().profile_rollback(self, refresh)

    def execute_fallback_mechanism(self, refresh: bool = True) -> None:
        return _iot().execute_fallback_mechanism(self, refresh)

    def return_from_fallback(self, refresh: bool = True) -> None:
        return _iot().return_from_fallback(self, refresh)

    def immediate_enable(self, refresh: bool = True) -> None:
        return _iot().immediate_enable(self, refresh)

    def configure_immediate_profile_enabling(self, enable: bool, *, smdp_oid: str | None = None,
                                             smdp_address: str | None = None) -> None:
        return _iot().configure_immediate_profile_enabling(self, enable, smdp_oid=smdp_oid,
                                                           smdp_address=smdp_address)

    def get_certs(self, ci_pkid: bytes | None = None) -> tuple[bytes, bytes]:
        return _iot().get_certs(self, ci_pkid)

    def retrieve_sgp32(self, *, seq: int | None = None, euicc_package_results: bool = False,
                       operation: str | None = None) -> list[bytes]:
        return _iot().retrieve_sgp32(self, seq=seq, euicc_package_results=euicc_package_results,
                                     operation=operation)

    def euicc_package_results(self) -> list[bytes]:
        return _iot().euicc_package_results(self)

    def get_iot_info(self) -> IotInfo:
        return _iot().get_iot_info(self)

    def get_iot_profiles(self) -> list[IotProfileInfo]:
        return _iot().get_iot_profiles(self)


def _iot():
    from . import es10_iot
    return es10_iot
