"""Unit tests for agent/es10.py: the typed ES10a/b/c client (SGP.22 §5.7, docs/protocol.md §2, §6, §8).

The fake card below plays the eUICC at the ES10 level: it decodes every request
with agent.codec (so a request that is not valid DER of the right type fails the
test), records it, and answers with a response encoded by the codec, or with raw
bytes when a test needs exact or broken encodings.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import codec, tlv
from agent.errors import CardError, InputError, ProtocolError
from agent.es10_types import EuiccInfo2, PendingNotification
from agent.es10 import (Es10, Es10Error, EuiccInfo1, bits_set, make_bits,
                        canonical_profile_id, nickname_value, pmo_bits, pmo_name, profile_identifier,
                        version_str)
from agent.ids import iccid_to_bytes, make_eid

H = bytes.fromhex

# request tag -> (request type, response type)
TYPES = {
    0xBF3E: ("GetEuiccDataRequest", "GetEuiccDataResponse"),
    0xBF20: ("GetEuiccInfo1Request", "EUICCInfo1"),
    0xBF22: ("GetEuiccInfo2Request", "EUICCInfo2"),
    0xBF3C: ("EuiccConfiguredAddressesRequest", "EuiccConfiguredAddressesResponse"),
    0xBF3F: ("SetDefaultDpAddressRequest", "SetDefaultDpAddressResponse"),
    0xBF2D: ("ProfileInfoListRequest", "ProfileInfoListResponse"),
    0xBF31: ("EnableProfileRequest", "EnableProfileResponse"),
    0xBF32: ("DisableProfileRequest", "DisableProfileResponse"),
    0xBF33: ("DeleteProfileRequest", "DeleteProfileResponse"),
    0xBF29: ("SetNicknameRequest", "SetNicknameResponse"),
    0xBF28: ("ListNotificationRequest", "ListNotificationResponse"),
    0xBF2B: ("RetrieveNotificationsListRequest", "RetrieveNotificationsListResponse"),
    0xBF30: ("NotificationSentRequest", "NotificationSentResponse"),
    0xBF34: ("EuiccMemoryResetRequest", "EuiccMemoryResetResponse"),
    0xBF43: ("GetRatRequest", "GetRatResponse"),
    0xBF2E: ("GetEuiccChallengeRequest", "GetEuiccChallengeResponse"),
    0xBF41: ("CancelSessionRequest", "CancelSessionResponse"),
}


@dataclass
class Call:
    req_type: str
    value: object
    payload: bytes
    timeout: float | None
    what: str


class FakeCard:
    """Es10Channel double. ``answer`` is a response value (encoded with the
    response type of the request), raw bytes, or a callable(request value) -> either."""

    def __init__(self, answer=None):
        self.answer = answer
        self.calls: list[Call] = []

    def es10(self, payload: bytes, *, timeout: float | None = None, what: str = "ES10 command") -> bytes:
        tag, _ = tlv.read_tag(payload)
        req_type, resp_type = TYPES[tag]
        value = codec.decode(req_type, payload)        # the request must be valid DER of its type
        self.calls.append(Call(req_type, value, payload, timeout, what))
        out = self.answer(value) if callable(self.answer) else self.answer
        if out is None:
            raise AssertionError(f"no answer scripted for {req_type}")
        return out if isinstance(out, bytes) else codec.encode(resp_type, out)

    @property
    def last(self) -> Call:
        return self.calls[-1]


def client(answer=None, **kw) -> tuple[Es10, FakeCard]:
    card = FakeCard(answer)
    return Es10(card, **kw), card


ICCID = "8944123456789012345"
ICCID_BYTES = H("984421436587092143F5")
ICCID20 = "89440123456789012344"
AID = "A0000005591010FFFFFFFF8900001000"
EID = make_eid("890490320000000000000000000000")
SMDP_OID = "2.999.10"


# --- GetEID / EUICCInfo ---------------------------------------------------------------

def test_get_eid():
    es, card = client({"eidValue": bytes.fromhex(EID)})
    assert es.get_eid() == EID
    assert card.last.payload == H("BF3E035C015A")
    assert card.last.timeout is None
    assert card.last.what == "GetEuiccDataRequest"


def test_get_euicc_info1_keeps_raw():
    pk1, pk2 = bytes(range(20)), bytes(range(1, 21))
    raw = codec.encode("EUICCInfo1", {"svn": H("020200"), "euiccCiPKIdListForVerification": [pk1, pk2],
                                      "euiccCiPKIdListForSigning": [pk1]})
    es, card = client(raw)
    info = es.get_euicc_info1()
    assert card.last.payload == H("BF2000")
    assert isinstance(info, EuiccInfo1)
    assert info.svn == "2.2.0"
    assert info.ci_pkids_for_verification == [pk1.hex().upper(), pk2.hex().upper()]
    assert info.ci_pkids_for_signing == [pk1.hex().upper()]
    assert info.raw == raw
    assert "raw" not in info.to_json()


def _info2(**over):
    v = {
        "profileVersion": H("020300"), "svn": H("020200"), "euiccFirmwareVer": H("040A01"),
        # 81 installedApps=5, 82 freeNVM=100000, 83 freeVM=4096
        "extCardResource": H("81010582030186A083021000"),
        "uiccCapability": make_bits([1, 2, 4]),
        "ts102241Version": H("090200"), "globalplatformVersion": H("020301"),
        "rspCapability": make_bits([0, 2, 3]),
        "euiccCiPKIdListForVerification": [bytes([0xF5]) * 20], "euiccCiPKIdListForSigning": [bytes([0xAB]) * 20],
        "euiccCategory": 2, "forbiddenProfilePolicyRules": make_bits([1, 3]),
        "ppVersion": H("010000"), "sasAcreditationNumber": "GI-BA-UP-0419",
    }
    v.update(over)
    return v


def test_get_euicc_info2_mapping():
    raw = codec.encode("EUICCInfo2", _info2())
    es, card = client(raw)
    i = es.get_euicc_info2()
    assert card.last.payload == H("BF2200")
    assert isinstance(i, EuiccInfo2)
    assert (i.profile_version, i.svn, i.firmware_version) == ("2.3.0", "2.2.0", "4.10.1")
    assert (i.installed_applications, i.free_nvm, i.free_vm) == (5, 100000, 4096)
    assert i.uicc_capability == [1, 2, 4]
    assert (i.ts102241_version, i.gp_version, i.pp_version) == ("9.2.0", "2.3.1", "1.0.0")
    assert i.rsp_capability == [0, 2, 3]
    assert i.ci_pkids_for_verification == ["F5" * 20] and i.ci_pkids_for_signing == ["AB" * 20]
    assert i.euicc_category == "mediumEuicc"
    assert i.forbidden_profile_policy_rules == ["ppr1", "ppr3"]
    assert i.sas_accreditation_number == "GI-BA-UP-0419"
    assert i.raw == raw
    j = i.to_json()
    assert "raw" not in j and j["free_nvm"] == 100000 and j["svn"] == "2.2.0"


def test_get_euicc_info2_optional_fields_absent():
    v = _info2(extCardResource=H("8203010000"))        # only freeNVM
    for k in ("ts102241Version", "globalplatformVersion", "euiccCategory", "forbiddenProfilePolicyRules"):
        del v[k]
    es, _ = client(codec.encode("EUICCInfo2", v))
    i = es.get_euicc_info2()
    assert (i.installed_applications, i.free_nvm, i.free_vm) == (None, 65536, None)
    assert i.ts102241_version is None and i.gp_version is None
    assert i.euicc_category is None and i.forbidden_profile_policy_rules == []


def test_get_euicc_info2_bad_ext_card_resource_is_tolerated():
    es, _ = client(codec.encode("EUICCInfo2", _info2(extCardResource=H("82050102"))))
    i = es.get_euicc_info2()
    assert (i.installed_applications, i.free_nvm, i.free_vm) == (None, None, None)
    assert i.svn == "2.2.0"


@pytest.mark.parametrize("cat,name", [(0, "other"), (1, "basicEuicc"), (3, "contactlessEuicc")])
def test_get_euicc_info2_categories(cat, name):
    es, _ = client(codec.encode("EUICCInfo2", _info2(euiccCategory=cat)))
    assert es.get_euicc_info2().euicc_category == name


def test_version_str():
    assert version_str(H("020200")) == "2.2.0"
    assert version_str(H("0A0B0C")) == "10.11.12"
    assert version_str(None) is None


# --- ES10a addresses -------------------------------------------------------------------

def test_get_configured_addresses():
    es, card = client({"defaultDpAddress": "smdp.example.com", "rootDsAddress": "lpa.ds.gsma.com"})
    a = es.get_configured_addresses()
    assert card.last.payload == H("BF3C00")
    assert (a.default_dp_address, a.root_ds_address) == ("smdp.example.com", "lpa.ds.gsma.com")


@pytest.mark.parametrize("value", [{"rootDsAddress": "lpa.ds.gsma.com"},
                                   {"defaultDpAddress": "", "rootDsAddress": "lpa.ds.gsma.com"}])
def test_get_configured_addresses_no_default(value):
    es, _ = client(value)
    a = es.get_configured_addresses()
    assert a.default_dp_address is None and a.root_ds_address == "lpa.ds.gsma.com"


def test_set_default_dp_address():
    es, card = client({"setDefaultDpAddressResult": 0})
    assert es.set_default_dp_address("smdp.example.com") is None
    assert card.last.value == {"defaultDpAddress": "smdp.example.com"}
    assert card.last.payload == H("BF3F12") + H("8010") + b"smdp.example.com"
    es.set_default_dp_address("")                         # empty string removes it
    assert card.last.payload == H("BF3F028000")


def test_set_default_dp_address_error():
    es, _ = client({"setDefaultDpAddressResult": 127})
    with pytest.raises(Es10Error) as ei:
        es.set_default_dp_address("smdp.example.com")
    assert ei.value.outcome == "undefinedError" and ei.value.code == "undefined_error" and ei.value.value == 127


# --- GetProfilesInfo -----------------------------------------------------------------------

FULL_PROFILE = {
    "iccid": ICCID_BYTES, "isdpAid": bytes.fromhex(AID), "profileState": 1, "profileNickname": "work",
    "serviceProviderName": "Example Mobile", "profileName": "Example IoT", "iconType": 1, "profileClass": 0,
    "notificationConfigurationInfo": [
        {"profileManagementOperation": pmo_bits("install"), "notificationAddress": "smdp.example.com"},
        {"profileManagementOperation": pmo_bits("delete"), "notificationAddress": "notify.example.com"},
    ],
    "profileOwner": {"mccMnc": H("21F354"), "gid1": H("AB")},
    "profilePolicyRules": make_bits([1, 2]),
}


def test_get_profiles_info_all_no_criteria():
    es, card = client(("profileInfoListOk", []))
    assert es.get_profiles_info() == []
    assert card.last.payload == H("BF2D00")


def test_get_profiles_info_mapping():
    minimal = {"iccid": iccid_to_bytes(ICCID20), "profileState": 0}
    es, card = client(("profileInfoListOk", [FULL_PROFILE, minimal]))
    p, q = es.get_profiles_info()
    assert p.iccid == ICCID and p.isdp_aid == AID
    assert p.state == "enabled" and p.nickname == "work"
    assert p.service_provider_name == "Example Mobile" and p.profile_name == "Example IoT"
    assert p.profile_class == "test" and p.icon_type == "png"
    assert p.policy_rules == ["ppr1", "ppr2"]
    assert p.owner == {"mcc_mnc": "21F354", "gid1": "AB"}
    assert p.notification_configuration == [{"operation": "install", "address": "smdp.example.com"},
                                            {"operation": "delete", "address": "notify.example.com"}]
    # absent fields; profileClass DEFAULT 2 is filled in on decode
    assert q.iccid == ICCID20 and q.state == "disabled" and q.isdp_aid is None
    assert q.nickname is None and q.profile_name is None and q.icon_type is None
    assert q.profile_class == "operational"
    assert q.policy_rules == [] and q.owner is None and q.notification_configuration == []
    assert p.to_json()["owner"] == {"mcc_mnc": "21F354", "gid1": "AB"}


@pytest.mark.parametrize("cls,name", [(1, "provisioning"), (2, "operational")])
def test_get_profiles_info_classes(cls, name):
    es, _ = client(("profileInfoListOk", [{"iccid": ICCID_BYTES, "profileClass": cls}]))
    assert es.get_profiles_info()[0].profile_class == name


def test_get_profiles_info_search_by_iccid():
    es, card = client(("profileInfoListOk", [FULL_PROFILE]))
    es.get_profiles_info(iccid=ICCID)
    assert card.last.value == {"searchCriteria": ("iccid", ICCID_BYTES)}
    assert card.last.payload == H("BF2D0EA00C5A0A") + ICCID_BYTES


def test_get_profiles_info_search_by_aid():
    es, card = client(("profileInfoListOk", []))
    es.get_profiles_info(isdp_aid=bytes.fromhex(AID))
    assert card.last.payload == H("BF2D14A0124F10") + bytes.fromhex(AID)


def test_get_profiles_info_search_by_class_and_tags():
    es, card = client(("profileInfoListOk", []))
    es.get_profiles_info(profile_class=0)
    assert card.last.payload == H("BF2D05A003950100")
    es.get_profiles_info(tags=H("5A9F70"))
    assert card.last.payload == H("BF2D055C035A9F70")
    es.get_profiles_info(iccid=ICCID, tags=H("5A"))
    assert card.last.value == {"searchCriteria": ("iccid", ICCID_BYTES), "tagList": H("5A")}


@pytest.mark.parametrize("err,outcome,code", [(1, "incorrectInputValues", "incorrect_input_values"),
                                              (127, "undefinedError", "undefined_error")])
def test_get_profiles_info_error(err, outcome, code):
    es, _ = client(("profileInfoListError", err))
    with pytest.raises(Es10Error) as ei:
        es.get_profiles_info(iccid=ICCID)
    e = ei.value
    assert (e.outcome, e.code, e.value, e.exit_code) == (outcome, code, err, 1)
    assert isinstance(e, CardError) and e.function == "GetProfilesInfo"


# --- Enable / Disable / Delete --------------------------------------------------------

OPS = {
    "enable": ("EnableProfileResponse", "enableResult"),
    "disable": ("DisableProfileResponse", "disableResult"),
    "delete": ("DeleteProfileResponse", "deleteResult"),
}


def _op(es, op, ident, **kw):
    return getattr(es, f"{op}_profile")(ident, **kw)


@pytest.mark.parametrize("op", ["enable", "disable"])
def test_enable_disable_by_iccid_exact_bytes(op):
    es, card = client({OPS[op][1]: 0}, long_timeout=90.0)
    assert _op(es, op, ICCID) is None
    tag = {"enable": "BF31", "disable": "BF32"}[op]
    assert card.last.payload == H(tag + "11A00C5A0A") + ICCID_BYTES + H("8101FF")
    assert card.last.value == {"profileIdentifier": ("iccid", ICCID_BYTES), "refreshFlag": True}
    assert card.last.timeout == 90.0


@pytest.mark.parametrize("op", ["enable", "disable"])
def test_enable_disable_by_aid_without_refresh(op):
    es, card = client({OPS[op][1]: 0})
    _op(es, op, AID.lower(), refresh=False)
    assert card.last.value == {"profileIdentifier": ("isdpAid", bytes.fromhex(AID)), "refreshFlag": False}
    assert card.last.payload.endswith(H("810100"))


def test_delete_by_iccid_and_aid():
    es, card = client({"deleteResult": 0}, long_timeout=60.0)
    es.delete_profile(ICCID)
    assert card.last.payload == H("BF330C5A0A") + ICCID_BYTES
    assert card.last.timeout == 60.0
    es.delete_profile(AID)
    assert card.last.payload == H("BF33124F10") + bytes.fromhex(AID)
    assert card.last.value == ("isdpAid", bytes.fromhex(AID))


ERRORS = [
    ("enable", 1, "iccidOrAidNotFound", "iccid_or_aid_not_found"),
    ("enable", 2, "profileNotInDisabledState", "profile_not_in_disabled_state"),
    ("enable", 3, "disallowedByPolicy", "disallowed_by_policy"),
    ("enable", 4, "wrongProfileReenabling", "wrong_profile_reenabling"),
    ("enable", 5, "catBusy", "cat_busy"),
    ("enable", 127, "undefinedError", "undefined_error"),
    ("disable", 1, "iccidOrAidNotFound", "iccid_or_aid_not_found"),
    ("disable", 2, "profileNotInEnabledState", "profile_not_in_enabled_state"),
    ("disable", 3, "disallowedByPolicy", "disallowed_by_policy"),
    ("disable", 5, "catBusy", "cat_busy"),
    ("disable", 127, "undefinedError", "undefined_error"),
    ("delete", 1, "iccidOrAidNotFound", "iccid_or_aid_not_found"),
    ("delete", 2, "profileNotInDisabledState", "profile_not_in_disabled_state"),
    ("delete", 3, "disallowedByPolicy", "disallowed_by_policy"),
    ("delete", 127, "undefinedError", "undefined_error"),
]


@pytest.mark.parametrize("op,result,outcome,code", ERRORS)
@pytest.mark.parametrize("ident", [ICCID, AID])
def test_profile_operation_errors(op, result, outcome, code, ident):
    es, card = client({OPS[op][1]: result})
    with pytest.raises(Es10Error) as ei:
        _op(es, op, ident)
    e = ei.value
    assert (e.outcome, e.code, e.value, e.exit_code) == (outcome, code, result, 1)
    assert e.function == {"enable": "EnableProfile", "disable": "DisableProfile", "delete": "DeleteProfile"}[op]
    assert outcome in e.message and f"({result})" in e.message
    assert e.to_json()["details"] == {"function": e.function, "result": result}
    assert len(card.calls) == 1


def test_profile_operation_error_hints():
    es, _ = client({"enableResult": 3})
    with pytest.raises(Es10Error) as ei:
        es.enable_profile(ICCID)
    assert "policy" in ei.value.message


@pytest.mark.parametrize("op", ["enable", "disable", "delete"])
def test_profile_operation_unknown_result(op):
    es, _ = client({OPS[op][1]: 9})
    with pytest.raises(Es10Error) as ei:
        _op(es, op, ICCID)
    # One stable code for any number the spec does not name; the number is in the details.
    assert ei.value.outcome == "unknownResult9" and ei.value.code == "unknown_result"
    assert ei.value.details["result"] == 9 and ei.value.exit_code == 1


@pytest.mark.parametrize("op", ["enable", "disable", "delete"])
def test_profile_operation_bad_identifier_sends_nothing(op):
    es, card = client({OPS[op][1]: 0})
    with pytest.raises(InputError) as ei:
        _op(es, op, "not-a-profile")
    assert ei.value.code == "bad_profile_id" and ei.value.exit_code == 2
    assert card.calls == []


# --- SetNickname -------------------------------------------------------------------

def test_set_nickname():
    es, card = client({"setNicknameResult": 0})
    es.set_nickname(ICCID, "travel")
    assert card.last.value == {"iccid": ICCID_BYTES, "profileNickname": "travel"}
    assert card.last.payload == H("BF29145A0A") + ICCID_BYTES + H("9006") + b"travel"


@pytest.mark.parametrize("nick", ["x" * 64, "é" * 32, "é" * 64, "€" * 64, ""])
def test_set_nickname_up_to_64_characters(nick):
    es, card = client({"setNicknameResult": 0})
    es.set_nickname(ICCID, nick)
    assert card.last.value["profileNickname"] == nick


@pytest.mark.parametrize("nick", ["x" * 65, "é" * 65, "€" * 65])
def test_set_nickname_too_long(nick):
    es, card = client({"setNicknameResult": 0})
    with pytest.raises(InputError) as ei:
        es.set_nickname(ICCID, nick)
    assert ei.value.exit_code == 2
    assert card.calls == []


def test_set_nickname_errors():
    es, _ = client({"setNicknameResult": 1})
    with pytest.raises(Es10Error) as ei:
        es.set_nickname(ICCID, "a")
    assert (ei.value.outcome, ei.value.code) == ("iccidNotFound", "iccid_not_found")
    es2, card2 = client({"setNicknameResult": 0})
    with pytest.raises(InputError):
        es2.set_nickname("12345", "a")
    assert card2.calls == []


# --- notifications ----------------------------------------------------------------

def test_list_notifications_no_filter():
    mds = [
        {"seqNumber": 1, "profileManagementOperation": pmo_bits("install"),
         "notificationAddress": "smdp.example.com", "iccid": ICCID_BYTES},
        {"seqNumber": 300, "profileManagementOperation": pmo_bits("delete"), "notificationAddress": "n.example.com"},
    ]
    es, card = client(("notificationMetadataList", mds))
    a, b = es.list_notifications()
    assert card.last.payload == H("BF2800")
    assert (a.seq_number, a.operation, a.address, a.iccid) == (1, "install", "smdp.example.com", ICCID)
    assert (b.seq_number, b.operation, b.address, b.iccid) == (300, "delete", "n.example.com", None)
    assert a.to_json() == {"seq_number": 1, "operation": "install", "address": "smdp.example.com", "iccid": ICCID}


@pytest.mark.parametrize("op,bits", [("install", "0780"), ("enable", "0640"), ("disable", "0520"),
                                     ("delete", "0410")])
def test_list_notifications_pmo_filter(op, bits):
    es, card = client(("notificationMetadataList", []))
    assert es.list_notifications(op) == []
    assert card.last.payload == H("BF28048102" + bits)


def test_list_notifications_error():
    es, _ = client(("listNotificationsResultError", 127))
    with pytest.raises(Es10Error) as ei:
        es.list_notifications()
    assert ei.value.outcome == "undefinedError"


@pytest.fixture(scope="module")
def certs():
    """Two real certificates (CERT.EUICC-like and CERT.EUM-like) as codec values."""
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    out = []
    for cn in ("Test EUM", "Test eUICC"):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        der = cert.public_bytes(serialization.Encoding.DER)
        out.append(codec.decode("Certificate", der))
    return out


def _pir(seq: int) -> bytes:
    return codec.encode("ProfileInstallationResult", {
        "profileInstallationResultData": {
            "transactionId": bytes(range(16)),
            "notificationMetadata": {"seqNumber": seq, "profileManagementOperation": pmo_bits("install"),
                                     "notificationAddress": "smdp.example.com", "iccid": ICCID_BYTES},
            "smdpOid": SMDP_OID,
            "finalResult": ("successResult", {"aid": bytes.fromhex(AID), "simaResponse": H("3007A0053003800100")}),
        },
        "euiccSignPIR": bytes([0x5A]) * 64,
    })


def _osn(certs, seq: int, op: str, iccid: bytes | None = ICCID_BYTES) -> bytes:
    md = {"seqNumber": seq, "profileManagementOperation": pmo_bits(op), "notificationAddress": "notify.example.com"}
    if iccid is not None:
        md["iccid"] = iccid
    return codec.encode("OtherSignedNotification", {
        "tbsOtherNotification": md, "euiccNotificationSignature": bytes([0x33]) * 64,
        "euiccCertificate": certs[1], "eumCertificate": certs[0]})


def _list_response(*elements: bytes) -> bytes:
    return tlv.encode(0xBF2B, tlv.encode(0xA0, b"".join(elements)))


def test_retrieve_notifications_exact_der(certs):
    pir, osn = _pir(5), _osn(certs, 6, "enable")
    resp = _list_response(pir, osn)
    # the hand-built response is what the codec would produce too
    assert resp == codec.encode("RetrieveNotificationsListResponse", (
        "notificationList", [("profileInstallationResult", codec.decode("ProfileInstallationResult", pir)),
                             ("otherSignedNotification", codec.decode("OtherSignedNotification", osn))]))
    assert len(resp) > 255                          # long-form lengths on the outer TLVs
    es, card = client(resp)
    a, b = es.retrieve_notifications()
    assert card.last.payload == H("BF2B00")
    assert isinstance(a, PendingNotification) and isinstance(b, PendingNotification)
    assert a.der == pir and b.der == osn
    assert (a.seq_number, a.operation, a.address, a.iccid) == (5, "install", "smdp.example.com", ICCID)
    assert (b.seq_number, b.operation, b.address, b.iccid) == (6, "enable", "notify.example.com", ICCID)
    assert "der" not in a.to_json() and a.to_json()["seq_number"] == 5


def test_retrieve_notifications_does_not_reencode(certs):
    # BER-legal but non-minimal length on the signature: a decode/re-encode would
    # "repair" it and so change bytes the eUICC signed / the server hashes.
    osn = _osn(certs, 7, "delete", iccid=None)
    good_sig = H("5F3740") + bytes([0x33]) * 64
    assert good_sig in osn
    odd = tlv.encode(0x30, tlv.parse_single(osn).value.replace(good_sig, H("5F378140") + bytes([0x33]) * 64))
    codec.decode("OtherSignedNotification", odd)   # still accepted by the decoder
    es, _ = client(_list_response(odd))
    (n,) = es.retrieve_notifications()
    assert n.der == odd and n.der != osn
    assert (n.seq_number, n.operation, n.iccid) == (7, "delete", None)


def test_retrieve_notifications_search_criteria():
    es, card = client(("notificationList", []))
    assert es.retrieve_notifications(seq=5) == []
    assert card.last.payload == H("BF2B05A003800105")
    es.retrieve_notifications(operation="install")
    assert card.last.payload == H("BF2B06A00481020780")
    assert card.last.value == {"searchCriteria": ("profileManagementOperation", (b"\x80", 1))}


def test_retrieve_notifications_errors():
    es, _ = client(("notificationsListResultError", 1))
    assert es.retrieve_notifications(seq=9) == []          # nothing with that sequence number
    assert es.retrieve_notifications() == []               # noResultAvailable: nothing pending at all
    es2, _ = client(("notificationsListResultError", 127))
    with pytest.raises(Es10Error) as ei:
        es2.retrieve_notifications(seq=9)
    assert ei.value.outcome == "undefinedError"


def test_retrieve_notifications_malformed(certs):
    resp = _list_response(_pir(1))
    for bad in (resp[:-3], resp + b"\x00", H("BF2800"), b""):
        es, _ = client(bad)
        with pytest.raises(ProtocolError) as ei:
            es.retrieve_notifications()
        assert ei.value.code in ("malformed_asn1", "empty_response")


def test_remove_notification():
    es, card = client({"deleteNotificationStatus": 0})
    assert es.remove_notification(7) is True
    assert card.last.payload == H("BF3003800107")
    card.answer = {"deleteNotificationStatus": 1}
    assert es.remove_notification(7) is False
    card.answer = {"deleteNotificationStatus": 127}
    with pytest.raises(Es10Error) as ei:
        es.remove_notification(7)
    assert ei.value.outcome == "undefinedError"


# --- memory reset / RAT / challenge / cancel ------------------------------------------

@pytest.mark.parametrize("kw,bits", [
    ({}, "05E0"),
    ({"test": False, "default_dp": False}, "0780"),
    ({"operational": False, "default_dp": False}, "0640"),
    ({"operational": False, "test": False}, "0520"),
    ({"test": False}, "05A0"),
])
def test_memory_reset_bits(kw, bits):
    es, card = client({"resetResult": 0}, long_timeout=120.0)
    es.memory_reset(**kw)
    assert card.last.payload == H("BF34048202" + bits)
    assert card.last.timeout == 120.0


@pytest.mark.parametrize("res,outcome,code", [(1, "nothingToDelete", "nothing_to_delete"), (5, "catBusy", "cat_busy"),
                                              (127, "undefinedError", "undefined_error")])
def test_memory_reset_errors(res, outcome, code):
    es, _ = client({"resetResult": res})
    with pytest.raises(Es10Error) as ei:
        es.memory_reset()
    assert (ei.value.outcome, ei.value.code, ei.value.function) == (outcome, code, "eUICCMemoryReset")


def test_get_rat():
    rat = [
        {"pprIds": make_bits([1]), "allowedOperators": [{"mccMnc": H("21F354"), "gid1": H("01")},
                                                        {"mccMnc": H("FFFFFF")}],
         "pprFlags": make_bits([0])},
        {"pprIds": make_bits([1, 2]), "allowedOperators": [], "pprFlags": make_bits([])},
    ]
    es, card = client({"rat": rat})
    r1, r2 = es.get_rat()
    assert card.last.payload == H("BF4300")
    assert r1.ppr_ids == ["ppr1"] and r1.consent_required is True
    assert r1.allowed_operators == [{"mcc_mnc": "21F354", "gid1": "01"}, {"mcc_mnc": "FFFFFF"}]
    assert r2.ppr_ids == ["ppr1", "ppr2"] and r2.allowed_operators == [] and r2.consent_required is False
    assert r1.to_json()["ppr_ids"] == ["ppr1"]
    card.answer = {"rat": []}
    assert es.get_rat() == []


def test_get_euicc_challenge():
    ch = bytes(range(100, 116))
    es, card = client({"euiccChallenge": ch})
    assert es.get_euicc_challenge() == ch
    assert card.last.payload == H("BF2E00")


def test_cancel_session_ok_returns_raw():
    txid = bytes(range(16))
    raw = codec.encode("CancelSessionResponse", ("cancelSessionResponseOk", {
        "euiccCancelSessionSigned": {"transactionId": txid, "smdpOid": SMDP_OID, "reason": 1},
        "euiccCancelSessionSignature": bytes([0x11]) * 64}))
    es, card = client(raw)
    assert es.cancel_session(txid, 1) == raw
    assert card.last.payload == H("BF41158010") + txid + H("810101")
    assert card.last.value == {"transactionId": txid, "reason": 1}


def test_cancel_session_returns_the_exact_bytes():
    # a BER-legal, non-minimal length on the signature survives: the blob is forwarded, not re-encoded
    txid = bytes(range(16))
    signed = codec.encode("EuiccCancelSessionSigned", {"transactionId": txid, "smdpOid": SMDP_OID, "reason": 0})
    raw = tlv.encode(0xBF41, tlv.encode(0xA0, signed + H("5F378140") + bytes([0x22]) * 64))
    es, _ = client(raw)
    assert es.cancel_session(txid, 0) == raw


@pytest.mark.parametrize("err,outcome", [(5, "invalidTransactionId"), (127, "undefinedError")])
def test_cancel_session_error(err, outcome):
    es, _ = client(("cancelSessionResponseError", err))
    with pytest.raises(Es10Error) as ei:
        es.cancel_session(bytes(16), 0)
    assert ei.value.outcome == outcome and ei.value.function == "CancelSession"
    assert ei.value.code == {5: "invalid_transaction_id", 127: "undefined_error"}[err]


# --- malformed responses --------------------------------------------------------------

# (method call, a good response) for the functions going through Es10._call
CALLS = [
    (lambda es: es.get_eid(), codec.encode("GetEuiccDataResponse", {"eidValue": bytes(16)})),
    (lambda es: es.get_configured_addresses(), codec.encode("EuiccConfiguredAddressesResponse", {"rootDsAddress": "a"})),
    (lambda es: es.set_default_dp_address("a"), codec.encode("SetDefaultDpAddressResponse", {"setDefaultDpAddressResult": 0})),
    (lambda es: es.get_profiles_info(), codec.encode("ProfileInfoListResponse", ("profileInfoListOk", []))),
    (lambda es: es.enable_profile(ICCID), codec.encode("EnableProfileResponse", {"enableResult": 0})),
    (lambda es: es.disable_profile(ICCID), codec.encode("DisableProfileResponse", {"disableResult": 0})),
    (lambda es: es.delete_profile(ICCID), codec.encode("DeleteProfileResponse", {"deleteResult": 0})),
    (lambda es: es.set_nickname(ICCID, "a"), codec.encode("SetNicknameResponse", {"setNicknameResult": 0})),
    (lambda es: es.list_notifications(), codec.encode("ListNotificationResponse", ("notificationMetadataList", []))),
    (lambda es: es.remove_notification(1), codec.encode("NotificationSentResponse", {"deleteNotificationStatus": 0})),
    (lambda es: es.memory_reset(), codec.encode("EuiccMemoryResetResponse", {"resetResult": 0})),
    (lambda es: es.get_rat(), codec.encode("GetRatResponse", {"rat": []})),
    (lambda es: es.get_euicc_challenge(), codec.encode("GetEuiccChallengeResponse", {"euiccChallenge": bytes(16)})),
]
RAW_CALLS = [
    (lambda es: es.get_euicc_info1(), codec.encode("EUICCInfo1", {"svn": H("020200"), "euiccCiPKIdListForVerification": [],
                                                                  "euiccCiPKIdListForSigning": []})),
    (lambda es: es.get_euicc_info2(), codec.encode("EUICCInfo2", _info2())),
    (lambda es: es.retrieve_notifications(), codec.encode("RetrieveNotificationsListResponse", ("notificationList", []))),
    (lambda es: es.cancel_session(bytes(16), 0), codec.encode("CancelSessionResponse", ("cancelSessionResponseError", 5))),
]


def _wrong_tag(good: bytes) -> bytes:
    # same content under another ES10 tag (BF3F is never a valid answer to these requests)
    t = tlv.parse_single(good)
    return tlv.encode(0xBF3F if t.tag != 0xBF3F else 0xBF3E, t.value)


@pytest.mark.parametrize("i", range(len(CALLS)))
def test_good_responses_decode(i):
    call, good = CALLS[i]
    es, _ = client(good)
    call(es)                      # the control case: the same response unbroken is accepted


@pytest.mark.parametrize("i", range(len(CALLS) + len(RAW_CALLS)))
@pytest.mark.parametrize("how", ["truncated", "trailing", "wrong_tag"])
def test_malformed_responses(i, how):
    call, good = (CALLS + RAW_CALLS)[i]
    bad = {"truncated": good[:-1], "trailing": good + b"\x00", "wrong_tag": _wrong_tag(good)}[how]
    es, _ = client(bad)
    with pytest.raises(ProtocolError) as ei:
        call(es)
    assert ei.value.code == "malformed_asn1" and ei.value.exit_code == 3


@pytest.mark.parametrize("i", range(len(CALLS)))
def test_empty_response(i):
    call, _ = CALLS[i]
    es, _ = client(b"")
    with pytest.raises(ProtocolError) as ei:
        call(es)
    assert ei.value.code == "empty_response" and ei.value.exit_code == 3


@pytest.mark.parametrize("i", range(len(RAW_CALLS)))
def test_empty_response_raw_calls(i):
    call, _ = RAW_CALLS[i]
    es, _ = client(b"")
    with pytest.raises(ProtocolError) as ei:
        call(es)
    assert ei.value.code in ("malformed_asn1", "empty_response")


def test_card_errors_propagate_unchanged():
    from agent.errors import StatusWordError
    boom = StatusWordError(0x6A80, "STORE DATA: 6A80", code="sw_incorrect_data")

    def fail(_):
        raise boom
    es, _ = client(fail)
    with pytest.raises(StatusWordError) as ei:
        es.get_eid()
    assert ei.value is boom


# --- profile_identifier -------------------------------------------------------------

@pytest.mark.parametrize("ident,expect", [
    ("8944123456789012345", ("iccid", ICCID_BYTES)),
    ("89440123456789012344", ("iccid", H("98441032547698103244"))),
    ("894412345678901234", ("iccid", iccid_to_bytes("894412345678901234"))),
    (" 8944 1234 5678 9012 345 ", ("iccid", ICCID_BYTES)),
    (AID, ("isdpAid", bytes.fromhex(AID))),
    (AID.lower(), ("isdpAid", bytes.fromhex(AID))),
    ("A0000005591010FFFFFFFF8900001100", ("isdpAid", H("A0000005591010FFFFFFFF8900001100"))),
])
def test_profile_identifier(ident, expect):
    assert profile_identifier(ident) == expect


def test_profile_identifier_20_digit_iccid_bytes():
    kind, b = profile_identifier("89440123456789012344")
    assert kind == "iccid" and len(b) == 10 and b[-1] == 0x44


@pytest.mark.parametrize("ident", ["", "   ", "hello", "12345", "8944123456789012",     # too short
                                   "894412345678901234567",                               # 21 digits
                                   AID[:-1], AID + "00", "G" * 32, "8944-1234-5678-9012-345",
                                   "89049032123451234512345678901235"])                   # an EID is not a profile
def test_profile_identifier_garbage(ident):
    with pytest.raises(InputError) as ei:
        profile_identifier(ident)
    assert ei.value.code == "bad_profile_id" and ei.value.exit_code == 2


def test_profile_identifier_f_padded_iccid():
    assert profile_identifier("8944123456789012345F") == ("iccid", ICCID_BYTES)


# --- bit strings ---------------------------------------------------------------------

@pytest.mark.parametrize("idx,expect", [
    ([], (b"", 0)), ([0], (b"\x80", 1)), ([1], (b"\x40", 2)), ([2], (b"\x20", 3)), ([3], (b"\x10", 4)),
    ([0, 1, 2], (b"\xE0", 3)), ([7], (b"\x01", 8)), ([8], (b"\x00\x80", 9)), ([1, 9], (b"\x40\x40", 10)),
    ([3, 1, 3], (b"\x50", 4)),
])
def test_make_bits(idx, expect):
    assert make_bits(idx) == expect


@pytest.mark.parametrize("idx", [[], [0], [5], [0, 7], [8], [2, 3, 4], [15], [16], [0, 9, 17], list(range(20))])
def test_bits_round_trip_and_der_rule(idx):
    value = make_bits(idx)
    assert bits_set(value) == sorted(idx)
    der = codec.encode("PprIds", value)
    data, nbits = value
    assert der[0] == 0x03 and der[1] == 1 + len(data)
    if data:
        assert der[2] == 8 * len(data) - nbits and 0 <= der[2] <= 7
        assert data[-1] & (0x80 >> ((nbits - 1) % 8))      # the last encoded bit is a 1
    else:
        assert der == H("030100")
    dec = codec.decode("PprIds", der)
    assert bits_set(dec) == sorted(idx)
    assert codec.encode("PprIds", dec) == der


def test_bits_set_edge_cases():
    assert bits_set(None) == []
    assert bits_set((b"", 0)) == []
    assert bits_set((b"\xFF", 3)) == [0, 1, 2]          # padding bits ignored
    assert bits_set((b"\x01\x80", 9)) == [7, 8]


def test_pmo_bits_and_names():
    assert pmo_bits("install") == (b"\x80", 1)
    assert pmo_bits("enable") == (b"\x40", 2)
    assert pmo_bits("disable") == (b"\x20", 3)
    assert pmo_bits("delete") == (b"\x10", 4)
    for op in ("install", "enable", "disable", "delete"):
        assert pmo_name(pmo_bits(op)) == op
    assert pmo_name(make_bits([0, 3])) == "install,delete"
    assert pmo_name(make_bits([])) == "none"
    assert pmo_name(None) == "none"
    assert pmo_name(make_bits([5])) == "bit5"


def test_es10_error_is_card_error():
    e = Es10Error("EnableProfile", "catBusy", 5, "retry")
    assert isinstance(e, CardError) and e.exit_code == 1
    assert e.code == "cat_busy" and e.message == "EnableProfile: the eUICC answered catBusy (5); retry"


# --- issue 9 item 5: nicknames and profile identifiers as SGP.22 defines them -----------------------

@pytest.mark.parametrize("nick,words", [
    ("work\nhome", "control character U+000A"),
    ("\x1b[31mred", "control character U+001B"),
    ("tab\there", "control character U+0009"),
    ("del\x7f", "control character U+007F"),
    ("\u202eevil", "control character U+202E"),            # right-to-left override: spoofs `profile list`
    ("a\u2028b", "control character U+2028"),               # line separator
    ("", "empty"),
    ("   ", "empty"),
    ("x" * 65, "65 characters"),
    ("é" * 65, "at most 64 characters"),
])
def test_nickname_refused(nick, words):
    """profileNickname is UTF8String (SIZE(0..64)): 64 characters (X.680 counts a character string's
    size in characters); control characters would break every listing of the profiles."""
    with pytest.raises(InputError) as ei:
        nickname_value(nick)
    assert ei.value.code == "bad_nickname" and ei.value.exit_code == 2 and words in ei.value.message


def test_nickname_normalised():
    assert nickname_value("  work  ") == "work"
    assert nickname_value("Cafe\u0301") == "Caf\u00e9"                  # NFC: one character, not two
    assert nickname_value("é" * 64) == "é" * 64
    assert nickname_value("", allow_empty=True) == ""             # SetNickname with an empty name clears it


@pytest.mark.parametrize("nick", ["a\x00b", "\x1b[2J", "x" * 65])
def test_set_nickname_refuses_before_the_card(nick):
    es, card = client({"setNicknameResult": 0})
    with pytest.raises(InputError) as ei:
        es.set_nickname(ICCID, nick)
    assert ei.value.code == "bad_nickname" and card.calls == []


def test_set_nickname_sends_the_normalised_name_and_accepts_an_f_padded_iccid():
    es, card = client({"setNicknameResult": 0})
    es.set_nickname(ICCID + "F", "  travel ")
    assert card.last.value == {"iccid": ICCID_BYTES, "profileNickname": "travel"}


@pytest.mark.parametrize("aid", ["A0000005591010FFFFFFFF89000011",        # 15 bytes
                                 "A0000005591010",                          # 7 bytes
                                 "A0000005591010FFFFFFFF890000100000"])     # 17 bytes
def test_isdp_aid_must_be_16_bytes(aid):
    es, card = client({"enableResult": 0})
    with pytest.raises(InputError) as ei:
        es.enable_profile(aid)
    assert ei.value.code == "bad_profile_id" and "16 bytes" in ei.value.message and card.calls == []


@pytest.mark.parametrize("ident,canonical", [
    (" 8944123456789012345 ", "8944123456789012345"), ("8944123456789012345F", "8944123456789012345"),
    ("8944 1234 5678 9012 345", "8944123456789012345"), (AID.lower(), AID), (f" {AID}\n", AID)])
def test_canonical_profile_id(ident, canonical):
    assert canonical_profile_id(ident) == canonical
