"""Our SGP.22 ASN.1 transcription (asn1/rsp.asn, asn1/pkix.asn) and agent.codec.

Expected bytes are written out here from the SGP.22 tag layout (docs/protocol.md §0,
§2, §4, §6, §8); where a message mixes automatic and universal tags (X.680
§25.3), the test names which components keep their universal tag.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import asn1tables, codec
from agent.errors import ProtocolError

REPO = Path(__file__).resolve().parent.parent

TXID = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")
ICCID = bytes.fromhex("984494999999999940F9")          # 8944499999999999049 swapped BCD
EID = bytes.fromhex("89049032123451234512345678901235")
AID = bytes.fromhex("A0000005591010FFFFFFFF8900001000")
SKI = bytes.fromhex("F54172BDF98A95D65CBEB88A38A1C11D800A85C3")
OTPK = bytes([0x04]) + bytes(range(64))
SIG = bytes(range(64))
HASH_CC = bytes(range(0x20, 0x40))


def h(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


def tlv(tag: str, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        ln = bytes([n])
    elif n < 0x100:
        ln = bytes([0x81, n])
    else:
        ln = bytes([0x82]) + n.to_bytes(2, "big")
    return h(tag) + ln + value


def check(type_name, value, expected: bytes):
    """encode gives exactly `expected`, and decoding it gives `value` back."""
    got = codec.encode(type_name, value)
    assert got.hex().upper() == expected.hex().upper()
    assert codec.decode(type_name, expected) == value


# --- a real certificate, generated here (Certificate must round-trip byte-exact) ------

@pytest.fixture(scope="module")
def cert_der() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test DPauth"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "esim-agent tests")])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(0x1234)
            .not_valid_before(now).not_valid_after(now.replace(year=2060))
            .add_extension(x509.SubjectKeyIdentifier(SKI), critical=False)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.CertificatePolicies([x509.PolicyInformation(
                x509.ObjectIdentifier("2.23.146.1.2.1.4"), None)]), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.RegisteredID(x509.ObjectIdentifier("2.999.10"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_certificate_round_trips_byte_exact(cert_der):
    v = codec.decode("Certificate", cert_der)
    assert v["tbsCertificate"]["version"] == 2
    assert v["tbsCertificate"]["serialNumber"] == 0x1234
    assert codec.encode("Certificate", v) == cert_der
    exts = {e["extnID"]: e for e in v["tbsCertificate"]["extensions"]}
    assert exts["2.5.29.14"]["extnValue"] == b"\x04\x14" + SKI
    assert exts["2.5.29.15"]["critical"] is True
    assert exts["2.5.29.14"]["critical"] is False          # DEFAULT FALSE filled in
    san = codec.decode("SubjectAltName", exts["2.5.29.17"]["extnValue"])
    assert san == [("registeredID", "2.999.10")]


# --- ES10c ---------------------------------------------------------------------------

def test_get_eid_request_exact_bytes():
    check("GetEuiccDataRequest", {"tagList": b"\x5A"}, h("BF3E 03 5C 01 5A"))


def test_get_eid_response():
    check("GetEuiccDataResponse", {"eidValue": EID}, h("BF3E 12 5A 10") + EID)


def test_enable_profile_request_profile_identifier_is_explicit_a0():
    # untagged CHOICE component gets automatic [0] (explicit: CHOICE) -> A0{5A..}; refreshFlag -> 81
    check("EnableProfileRequest", {"profileIdentifier": ("iccid", ICCID), "refreshFlag": True},
          h("BF31 11 A0 0C 5A 0A") + ICCID + h("81 01 FF"))
    check("EnableProfileRequest", {"profileIdentifier": ("isdpAid", AID), "refreshFlag": False},
          h("BF31 17 A0 12 4F 10") + AID + h("81 01 00"))
    check("DisableProfileRequest", {"profileIdentifier": ("iccid", ICCID), "refreshFlag": False},
          h("BF32 11 A0 0C 5A 0A") + ICCID + h("81 01 00"))


def test_delete_profile_request_is_a_tagged_choice():
    check("DeleteProfileRequest", ("iccid", ICCID), h("BF33 0C 5A 0A") + ICCID)
    check("DeleteProfileRequest", ("isdpAid", AID), h("BF33 12 4F 10") + AID)


def test_result_responses():
    check("EnableProfileResponse", {"enableResult": 0}, h("BF31 03 80 01 00"))
    check("DisableProfileResponse", {"disableResult": 2}, h("BF32 03 80 01 02"))
    check("DeleteProfileResponse", {"deleteResult": 3}, h("BF33 03 80 01 03"))
    check("SetNicknameResponse", {"setNicknameResult": 1}, h("BF29 03 80 01 01"))
    check("EuiccMemoryResetResponse", {"resetResult": 0}, h("BF34 03 80 01 00"))
    check("SetDefaultDpAddressResponse", {"setDefaultDpAddressResult": 127}, h("BF3F 03 80 01 7F"))
    check("NotificationSentResponse", {"deleteNotificationStatus": 1}, h("BF30 03 80 01 01"))


def test_set_nickname_uses_tag_90():
    check("SetNicknameRequest", {"iccid": ICCID, "profileNickname": "field"},
          h("BF29 13 5A 0A") + ICCID + h("90 05") + b"field")


def test_memory_reset_options_bits():
    # deleteOperationalProfiles(0), deleteFieldLoadedTestProfiles(1), resetDefaultSmdpAddress(2)
    check("EuiccMemoryResetRequest", {"resetOptions": (b"\xE0", 3)}, h("BF34 04 82 02 05 E0"))


def test_profile_info_list_request():
    check("ProfileInfoListRequest", {}, h("BF2D 00"))
    check("ProfileInfoListRequest", {"searchCriteria": ("iccid", ICCID), "tagList": h("5A 4F 9F70 90 91 92 95")},
          h("BF2D 18 A0 0C 5A 0A") + ICCID + h("5C 08 5A 4F 9F70 90 91 92 95"))
    check("ProfileInfoListRequest", {"searchCriteria": ("profileClass", 0)}, h("BF2D 05 A0 03 95 01 00"))


def test_profile_info_tags_and_default_profile_class():
    pi = {"iccid": ICCID, "isdpAid": AID, "profileState": 1, "profileNickname": "n",
          "serviceProviderName": "SP", "profileName": "P", "iconType": 1, "profileClass": 0,
          "notificationConfigurationInfo": [{"profileManagementOperation": (b"\x70", 4),
                                             "notificationAddress": "a.example"}],
          "profileOwner": {"mccMnc": h("00F110")},
          "dpProprietaryData": {"dpOid": "2.999.10"},
          "profilePolicyRules": (b"\x40", 2)}
    body = (h("5A 0A") + ICCID + h("4F 10") + AID + h("9F70 01 01") + h("90 01") + b"n" + h("91 02") + b"SP"
            + h("92 01") + b"P" + h("93 01 01") + h("95 01 00")
            + tlv("B6", tlv("30", h("80 02 04 70") + h("81 09") + b"a.example"))
            + h("B7 05 80 03 00F110") + h("B8 05 80 03 88 37 0A") + h("99 02 06 40"))
    check("ProfileInfoListResponse", ("profileInfoListOk", [pi]), tlv("BF2D", tlv("A0", tlv("E3", body))))
    # profileClass DEFAULT operational(2): DER omits it, decoding fills it in
    enc = codec.encode("ProfileInfo", {"iccid": ICCID, "profileClass": 2})
    assert enc == h("E3 0C 5A 0A") + ICCID
    assert codec.decode("ProfileInfo", enc) == {"iccid": ICCID, "profileClass": 2}
    check("ProfileInfoListResponse", ("profileInfoListError", 1), h("BF2D 03 81 01 01"))


# --- ES10a ---------------------------------------------------------------------------

def test_configured_addresses():
    check("EuiccConfiguredAddressesRequest", {}, h("BF3C 00"))
    check("EuiccConfiguredAddressesResponse", {"defaultDpAddress": "dp.example", "rootDsAddress": "lpa.ds.gsma.com"},
          h("BF3C 1D 80 0A") + b"dp.example" + h("81 0F") + b"lpa.ds.gsma.com")
    check("EuiccConfiguredAddressesResponse", {"rootDsAddress": "ds"}, h("BF3C 04 81 02") + b"ds")
    check("SetDefaultDpAddressRequest", {"defaultDpAddress": "dp.example"}, h("BF3F 0C 80 0A") + b"dp.example")


# --- ES10b: info, challenge ------------------------------------------------------------

EUICC_INFO2 = {
    "profileVersion": h("020301"), "svn": h("020200"), "euiccFirmwareVer": h("010203"),
    "extCardResource": h("810100 820300FFFF 830200FF"), "uiccCapability": (h("6FFFFF"), 24),
    "ts102241Version": h("090200"), "globalplatformVersion": h("020300"), "rspCapability": (h("D0"), 4),
    "euiccCiPKIdListForVerification": [SKI], "euiccCiPKIdListForSigning": [SKI],
    "ppVersion": h("000201"), "sasAcreditationNumber": "SAS-1",
}
EUICC_INFO2_BODY = (h("81 03 020301 82 03 020200 83 03 010203 84 0C 810100820300FFFF830200FF 85 04 00 6FFFFF"
                      "86 03 090200 87 03 020300 88 02 04 D0")
                    + tlv("A9", tlv("04", SKI)) + tlv("AA", tlv("04", SKI))
                    + h("04 03 000201") + h("0C 05") + b"SAS-1")   # ppVersion 04, sasAcreditationNumber 0C


def test_euicc_info1_and_2():
    check("GetEuiccInfo1Request", {}, h("BF20 00"))
    check("GetEuiccInfo2Request", {}, h("BF22 00"))
    check("EUICCInfo1", {"svn": h("020200"), "euiccCiPKIdListForVerification": [SKI],
                         "euiccCiPKIdListForSigning": [SKI]},
          tlv("BF20", h("82 03 020200") + tlv("A9", tlv("04", SKI)) + tlv("AA", tlv("04", SKI))))
    check("EUICCInfo2", EUICC_INFO2, tlv("BF22", EUICC_INFO2_BODY))


def test_euicc_info2_skips_unknown_newer_fields():
    # an SGP.32 card adds e.g. 90 ipaMode and B4 iotSpecificInfo: must still decode
    v = codec.decode("EUICCInfo2", tlv("BF22", EUICC_INFO2_BODY + h("90 01 00") + h("B4 04 A0 02 04 00")))
    assert v == EUICC_INFO2


def test_euicc_challenge():
    ch = bytes(range(16))
    check("GetEuiccChallengeRequest", {}, h("BF2E 00"))
    check("GetEuiccChallengeResponse", {"euiccChallenge": ch}, h("BF2E 12 80 10") + ch)


# --- ES10b: AuthenticateServer -----------------------------------------------------------

DEVICE_INFO = {"tac": h("35290611"), "deviceCapabilities": {"eutranEpcSupportedRelease": h("0F0000")},
               "imei": h("3529061100000010")}
DEVICE_INFO_DER = h("80 04 35290611 A1 05 85 03 0F0000 82 08 3529061100000010")
SERVER_SIGNED1 = {"transactionId": TXID, "euiccChallenge": bytes(16), "serverAddress": "dp.example",
                  "serverChallenge": bytes(range(16))}
SERVER_SIGNED1_DER = tlv("30", h("80 10") + TXID + h("81 10") + bytes(16) + h("83 0A") + b"dp.example"
                         + h("84 10") + bytes(range(16)))


def test_device_info_and_ctx_params():
    check("DeviceInfo", DEVICE_INFO, tlv("30", DEVICE_INFO_DER))
    check("CtxParamsForCommonAuthentication", {"matchingId": "ABC", "deviceInfo": DEVICE_INFO},
          tlv("30", h("80 03") + b"ABC" + tlv("A1", DEVICE_INFO_DER)))
    check("CtxParams1", ("ctxParamsForCommonAuthentication", {"deviceInfo": DEVICE_INFO}),
          tlv("A0", tlv("A1", DEVICE_INFO_DER)))


def test_server_signed1():
    check("ServerSigned1", SERVER_SIGNED1, SERVER_SIGNED1_DER)


def test_authenticate_server_request(cert_der):
    cert = codec.decode("Certificate", cert_der)
    value = {"serverSigned1": SERVER_SIGNED1, "serverSignature1": SIG, "euiccCiPKIdToBeUsed": SKI,
             "serverCertificate": cert,
             "ctxParams1": ("ctxParamsForCommonAuthentication", {"matchingId": "ABC", "deviceInfo": DEVICE_INFO})}
    # serverSignature1 is tagged, so the rest keep universal tags (30, 04, 30); ctxParams1 shows as A0
    expected = tlv("BF38", SERVER_SIGNED1_DER + tlv("5F37", SIG) + tlv("04", SKI) + cert_der
                   + tlv("A0", h("80 03") + b"ABC" + tlv("A1", DEVICE_INFO_DER)))
    check("AuthenticateServerRequest", value, expected)


def test_authenticate_server_response(cert_der):
    cert = codec.decode("Certificate", cert_der)
    signed1 = {"transactionId": TXID, "serverAddress": "dp.example", "serverChallenge": bytes(range(16)),
               "euiccInfo2": EUICC_INFO2, "ctxParams1": ("ctxParamsForCommonAuthentication",
                                                          {"deviceInfo": DEVICE_INFO})}
    signed1_der = tlv("30", h("80 10") + TXID + h("83 0A") + b"dp.example" + h("84 10") + bytes(range(16))
                      + tlv("BF22", EUICC_INFO2_BODY) + tlv("A0", tlv("A1", DEVICE_INFO_DER)))
    check("EuiccSigned1", signed1, signed1_der)
    check("AuthenticateServerResponse",
          ("authenticateResponseOk", {"euiccSigned1": signed1, "euiccSignature1": SIG,
                                      "euiccCertificate": cert, "eumCertificate": cert}),
          tlv("BF38", tlv("A0", signed1_der + tlv("5F37", SIG) + cert_der + cert_der)))
    # error: transactionId [0] is tagged, so the code keeps INTEGER 02
    check("AuthenticateServerResponse",
          ("authenticateResponseError", {"transactionId": TXID, "authenticateErrorCode": 6}),
          h("BF38 17 A1 15 80 10") + TXID + h("02 01 06"))


# --- ES10b: PrepareDownload ---------------------------------------------------------------

def test_smdp_signed2_mixed_tags():
    check("SmdpSigned2", {"transactionId": TXID, "ccRequiredFlag": False, "bppEuiccOtpk": OTPK},
          tlv("30", h("80 10") + TXID + h("01 01 00") + tlv("5F49", OTPK)))
    check("SmdpSigned2", {"transactionId": TXID, "ccRequiredFlag": True},
          h("30 15 80 10") + TXID + h("01 01 FF"))


def test_prepare_download_request(cert_der):
    cert = codec.decode("Certificate", cert_der)
    value = {"smdpSigned2": {"transactionId": TXID, "ccRequiredFlag": True}, "smdpSignature2": SIG,
             "hashCc": HASH_CC, "smdpCertificate": cert}
    check("PrepareDownloadRequest", value,
          tlv("BF21", h("30 15 80 10") + TXID + h("01 01 FF") + tlv("5F37", SIG) + tlv("04", HASH_CC) + cert_der))


def test_euicc_signed2_and_prepare_download_response():
    signed2 = {"transactionId": TXID, "euiccOtpk": OTPK, "hashCc": HASH_CC}
    signed2_der = tlv("30", h("80 10") + TXID + tlv("5F49", OTPK) + tlv("04", HASH_CC))
    check("EUICCSigned2", signed2, signed2_der)
    check("PrepareDownloadResponse", ("downloadResponseOk", {"euiccSigned2": signed2, "euiccSignature2": SIG}),
          tlv("BF21", tlv("A0", signed2_der + tlv("5F37", SIG))))
    check("PrepareDownloadResponse", ("downloadResponseError", {"transactionId": TXID, "downloadErrorCode": 5}),
          h("BF21 17 A1 15 80 10") + TXID + h("02 01 05"))


# --- notifications --------------------------------------------------------------------------

@pytest.mark.parametrize("bit,der", [(0, "07 80"), (1, "06 40"), (2, "05 20"), (3, "04 10")])
def test_notification_event_bit_strings(bit, der):
    value = (bytes([0x80 >> bit]), bit + 1)
    check("ListNotificationRequest", {"profileManagementOperation": value}, h("BF28 04 81 02") + h(der))
    check("NotificationConfigurationInformation", {"profileManagementOperation": value,
                                                   "notificationAddress": "x"},
          h("30 07 80 02") + h(der) + h("81 01") + b"x")


NOTIF_META = {"seqNumber": 7, "profileManagementOperation": (b"\x80", 1), "notificationAddress": "dp.example",
              "iccid": ICCID}
NOTIF_META_DER = tlv("BF2F", h("80 01 07 81 02 07 80 0C 0A") + b"dp.example" + h("5A 0A") + ICCID)


def test_notification_metadata_mixed_tags():
    check("NotificationMetadata", NOTIF_META, NOTIF_META_DER)


def test_list_notification():
    check("ListNotificationRequest", {}, h("BF28 00"))
    check("ListNotificationResponse", ("notificationMetadataList", [NOTIF_META]),
          tlv("BF28", tlv("A0", NOTIF_META_DER)))
    check("ListNotificationResponse", ("listNotificationsResultError", 127), h("BF28 03 81 01 7F"))


PIR_DATA = {"transactionId": TXID,
            "notificationMetadata": {"seqNumber": 1, "profileManagementOperation": (b"\x80", 1),
                                     "notificationAddress": "dp.example"},
            "smdpOid": "2.999.10",
            "finalResult": ("successResult", {"aid": AID, "simaResponse": h("30 07 A0 05 30 03 80 01 00")})}
PIR_DATA_DER = tlv("BF27", h("80 10") + TXID + tlv("BF2F", h("80 01 01 81 02 07 80 0C 0A") + b"dp.example")
                   + h("06 03 88 37 0A")
                   + tlv("A2", tlv("A0", tlv("4F", AID) + h("04 09 30 07 A0 05 30 03 80 01 00"))))
PIR = {"profileInstallationResultData": PIR_DATA, "euiccSignPIR": SIG}
PIR_DER = tlv("BF37", PIR_DATA_DER + tlv("5F37", SIG))


def test_success_and_error_result():
    check("SuccessResult", {"aid": AID, "simaResponse": h("3000")}, tlv("30", tlv("4F", AID) + h("04 02 30 00")))
    check("ErrorResult", {"bppCommandId": 5, "errorReason": 8, "simaResponse": h("3000")},
          h("30 0A 80 01 05 81 01 08 82 02 30 00"))


def test_profile_installation_result():
    check("ProfileInstallationResultData", PIR_DATA, PIR_DATA_DER)
    check("ProfileInstallationResult", PIR, PIR_DER)
    err = dict(PIR_DATA, finalResult=("errorResult", {"bppCommandId": 1, "errorReason": 8}))
    check("ProfileInstallationResultData", err,
          tlv("BF27", h("80 10") + TXID + tlv("BF2F", h("80 01 01 81 02 07 80 0C 0A") + b"dp.example")
              + h("06 03 88 37 0A A2 08 A1 06 80 01 01 81 01 08")))


def test_smdp_oid_with_first_arc_2_decodes_correctly():
    # 2.999.10 -> first sub-identifier 2*40+999 = 1079 = 88 37 (asn1tools alone gives 26.39.10)
    assert codec.decode("EuiccCancelSessionSigned", h("30 0B 80 01 01 81 03 88 37 0A 82 01 00"))["smdpOid"] == "2.999.10"
    assert codec.decode("DpProprietaryData", h("30 04 80 02 2A 03"))["dpOid"] == "1.2.3"
    assert codec.decode("DpProprietaryData", h("30 04 80 02 51 01"))["dpOid"] == "2.1.1"


def test_other_signed_notification_and_retrieve_list(cert_der):
    cert = codec.decode("Certificate", cert_der)
    osn = {"tbsOtherNotification": NOTIF_META, "euiccNotificationSignature": SIG,
           "euiccCertificate": cert, "eumCertificate": cert}
    osn_der = tlv("30", NOTIF_META_DER + tlv("5F37", SIG) + cert_der + cert_der)
    check("OtherSignedNotification", osn, osn_der)
    check("RetrieveNotificationsListRequest", {}, h("BF2B 00"))
    check("RetrieveNotificationsListRequest", {"searchCriteria": ("seqNumber", 7)}, h("BF2B 05 A0 03 80 01 07"))
    check("RetrieveNotificationsListRequest", {"searchCriteria": ("profileManagementOperation", (b"\x40", 2))},
          h("BF2B 06 A0 04 81 02 06 40"))
    check("RetrieveNotificationsListResponse",
          ("notificationList", [("profileInstallationResult", PIR), ("otherSignedNotification", osn)]),
          tlv("BF2B", tlv("A0", PIR_DER + osn_der)))
    check("RetrieveNotificationsListResponse", ("notificationsListResultError", 1), h("BF2B 03 81 01 01"))
    check("NotificationSentRequest", {"seqNumber": 7}, h("BF30 03 80 01 07"))


def test_handle_notification_wraps_the_choice_in_a0(cert_der):
    check("HandleNotification", {"pendingNotification": ("profileInstallationResult", PIR)},
          tlv("BF3D", tlv("A0", PIR_DER)))
    cert = codec.decode("Certificate", cert_der)
    osn = {"tbsOtherNotification": NOTIF_META, "euiccNotificationSignature": SIG,
           "euiccCertificate": cert, "eumCertificate": cert}
    osn_der = tlv("30", NOTIF_META_DER + tlv("5F37", SIG) + cert_der + cert_der)
    check("HandleNotification", {"pendingNotification": ("otherSignedNotification", osn)},
          tlv("BF3D", tlv("A0", osn_der)))


# --- CancelSession ------------------------------------------------------------------------------

def test_cancel_session():
    check("CancelSessionRequest", {"transactionId": TXID, "reason": 0}, h("BF41 15 80 10") + TXID + h("81 01 00"))
    signed = {"transactionId": TXID, "smdpOid": "2.999.10", "reason": 1}
    signed_der = h("30 1A 80 10") + TXID + h("81 03 88 37 0A 82 01 01")
    check("EuiccCancelSessionSigned", signed, signed_der)
    ok = ("cancelSessionResponseOk", {"euiccCancelSessionSigned": signed, "euiccCancelSessionSignature": SIG})
    ok_der = tlv("BF41", tlv("A0", signed_der + tlv("5F37", SIG)))
    check("CancelSessionResponse", ok, ok_der)
    check("CancelSessionResponse", ("cancelSessionResponseError", 5), h("BF41 03 81 01 05"))
    # ES9+ wrapper: automatic tags, the implicit [1] replaces the inner BF41
    check("CancelSessionRequestEs9", {"transactionId": TXID, "cancelSessionResponse": ok},
          tlv("BF41", h("80 10") + TXID + tlv("A1", tlv("A0", signed_der + tlv("5F37", SIG)))))
    check("CancelSessionRequestEs9", {"transactionId": TXID,
                                      "cancelSessionResponse": ("cancelSessionResponseError", 5)},
          tlv("BF41", h("80 10") + TXID + h("A1 03 81 01 05")))
    check("CancelSessionResponseEs9", ("cancelSessionOk", {}), h("BF41 02 A0 00"))
    check("CancelSessionResponseEs9", ("cancelSessionError", 2), h("BF41 03 81 01 02"))


# --- ES8+ objects in the BPP -----------------------------------------------------------------------

def test_bpp_objects():
    crt = {"keyType": b"\x88", "keyLen": b"\x10", "hostId": b"HOST"}
    isc = {"remoteOpId": 1, "transactionId": TXID, "controlRefTemplate": crt, "smdpOtpk": OTPK, "smdpSign": SIG}
    isc_der = tlv("BF23", h("82 01 01 80 10") + TXID + h("A6 0C 80 01 88 81 01 10 84 04") + b"HOST"
                  + tlv("5F49", OTPK) + tlv("5F37", SIG))
    check("InitialiseSecureChannelRequest", isc, isc_der)
    bpp = {"initialiseSecureChannelRequest": isc, "firstSequenceOf87": [b"\x01\x02"], "sequenceOf88": [b"\x03"],
           "secondSequenceOf87": [b"\x04"], "sequenceOf86": [b"\x05", b"\x06\x07"]}
    check("BoundProfilePackage", bpp,
          tlv("BF36", isc_der + h("A0 04 87 02 01 02 A1 03 88 01 03 A2 03 87 01 04 A3 07 86 01 05 86 02 06 07")))
    check("ConfigureISDPRequest", {}, h("BF24 00"))
    check("ConfigureISDPRequest", {"dpProprietaryData": {"dpOid": "2.999.10"}}, h("BF24 07 B8 05 80 03 88 37 0A"))
    check("ReplaceSessionKeysRequest", {"initialMacChainingValue": bytes(16), "ppkEnc": bytes(range(16)),
                                        "ppkCmac": bytes(range(16, 32))},
          h("BF26 36 80 10") + bytes(16) + h("81 10") + bytes(range(16)) + h("82 10") + bytes(range(16, 32)))


def test_store_metadata_request():
    smd = {"iccid": ICCID, "serviceProviderName": "SP", "profileName": "Prof", "profileClass": 0,
           "notificationConfigurationInfo": [{"profileManagementOperation": (b"\x80", 1),
                                              "notificationAddress": "dp.example"}],
           "profileOwner": {"mccMnc": h("00F110"), "gid1": b"\x01"},
           "profilePolicyRules": (b"\x40", 2)}
    check("StoreMetadataRequest", smd,
          tlv("BF25", h("5A 0A") + ICCID + h("91 02") + b"SP" + h("92 04") + b"Prof" + h("95 01 00")
              + tlv("B6", tlv("30", h("80 02 07 80 81 0A") + b"dp.example"))
              + h("B7 08 80 03 00F110 81 01 01") + h("99 02 06 40")))
    # operational (the DEFAULT) is not encoded
    assert codec.encode("StoreMetadataRequest", {"iccid": ICCID, "serviceProviderName": "", "profileName": "",
                                                 "profileClass": 2}) == h("BF25 10 5A 0A") + ICCID + h("91 00 92 00")


# --- other ES10b ---------------------------------------------------------------------------------------

def test_get_rat():
    check("GetRatRequest", {}, h("BF43 00"))
    rule = {"pprIds": (b"\x40", 2), "allowedOperators": [{"mccMnc": h("00F110")}], "pprFlags": (b"\x80", 1)}
    check("GetRatResponse", {"rat": [rule]},
          h("BF43 15 A0 13 30 11 80 02 06 40 A1 07 30 05 80 03 00F110 82 02 07 80"))


def test_get_certs(cert_der):
    cert = codec.decode("Certificate", cert_der)
    check("GetCertsRequest", {}, h("BF56 00"))
    check("GetCertsRequest", {"euiccCiPKId": SKI}, tlv("BF56", tlv("80", SKI)))
    check("GetCertsResponse", ("certs", {"eumCertificate": cert, "euiccCertificate": cert}),
          tlv("BF56", tlv("A0", b"\xA5" + cert_der[1:] + b"\xA6" + cert_der[1:])))
    check("GetCertsResponse", ("getCertsError", 1), h("BF56 03 81 01 01"))


def test_lpae_and_crl_types_present():
    check("LpaeActivationResponse", {"lpaeActivationResult": 1}, h("BF42 03 80 01 01"))
    check("LoadCRLResponse", ("loadCRLResponseError", 5), h("BF35 03 81 01 05"))
    check("LoadCRLResponse", ("loadCRLResponseOk", {}), h("BF35 02 A0 00"))


# --- ES9+ / ES11 ASN.1 binding -----------------------------------------------------------------------

def test_es9_binding_messages():
    info1 = {"svn": h("020200"), "euiccCiPKIdListForVerification": [SKI], "euiccCiPKIdListForSigning": [SKI]}
    info1_der = tlv("BF20", h("82 03 020200") + tlv("A9", tlv("04", SKI)) + tlv("AA", tlv("04", SKI)))
    req = {"euiccChallenge": bytes(16), "smdpAddress": "dp.example", "euiccInfo1": info1}
    req_der = tlv("BF39", h("81 10") + bytes(16) + h("83 0A") + b"dp.example" + info1_der)
    check("InitiateAuthenticationRequest", req, req_der)
    check("RemoteProfileProvisioningRequest", ("initiateAuthenticationRequest", req), tlv("A2", req_der))
    check("InitiateAuthenticationResponse", ("initiateAuthenticationError", 1), h("BF39 03 81 01 01"))
    check("RemoteProfileProvisioningResponse",
          ("initiateAuthenticationResponse", ("initiateAuthenticationError", 3)), h("A2 06 BF39 03 81 01 03"))
    check("RemoteProfileProvisioningResponse",
          ("cancelSessionResponseEs9", ("cancelSessionOk", {})), h("A2 05 BF41 02 A0 00"))
    # the spec's implicit [56] repeats AuthenticateServerResponse's own tag: one BF38, not two
    auth_err = ("authenticateResponseError", {"transactionId": TXID, "authenticateErrorCode": 2})
    check("AuthenticateClientRequest", {"transactionId": TXID, "authenticateServerResponse": auth_err},
          tlv("BF3B", h("80 10") + TXID + h("BF38 17 A1 15 80 10") + TXID + h("02 01 02")))
    check("RemoteProfileProvisioningRequest",
          ("authenticateClientRequest", {"transactionId": TXID, "authenticateServerResponse": auth_err}),
          tlv("A2", tlv("BF3B", h("80 10") + TXID + h("BF38 17 A1 15 80 10") + TXID + h("02 01 02"))))
    gbpp = {"transactionId": TXID,
            "prepareDownloadResponse": ("downloadResponseError", {"transactionId": TXID, "downloadErrorCode": 4})}
    check("GetBoundProfilePackageRequest", gbpp,
          tlv("BF3A", h("80 10") + TXID + h("BF21 17 A1 15 80 10") + TXID + h("02 01 04")))
    check("GetBoundProfilePackageResponse", ("getBoundProfilePackageError", 95), h("BF3A 03 81 01 5F"))
    check("AuthenticateClientResponseEs9", ("authenticateClientError", 8), h("BF3B 03 81 01 08"))
    es11 = ("authenticateClientOk", {"transactionId": TXID,
                                     "eventEntries": [{"eventId": "E1", "rspServerAddress": "dp.example"}]})
    check("AuthenticateClientResponseEs11", es11,
          tlv("BF40", tlv("A0", h("80 10") + TXID + tlv("A1", tlv("30", h("80 02") + b"E1" + h("81 0A")
                                                                   + b"dp.example")))))
    check("RemoteProfileProvisioningResponse", ("authenticateClientResponseEs11", es11),
          tlv("A2", tlv("BF40", tlv("A0", h("80 10") + TXID + tlv("A1", tlv("30", h("80 02") + b"E1"
                                                                         + h("81 0A") + b"dp.example"))))))


# --- round trip of every ES10 request / response type ---------------------------------------------------

ROUND_TRIP = {
    "GetEuiccDataRequest": {"tagList": b"\x5A"},
    "GetEuiccDataResponse": {"eidValue": EID},
    "GetEuiccChallengeRequest": {},
    "GetEuiccChallengeResponse": {"euiccChallenge": bytes(16)},
    "GetEuiccInfo1Request": {},
    "EUICCInfo1": {"svn": h("020300"), "euiccCiPKIdListForVerification": [SKI, SKI[::-1]],
                   "euiccCiPKIdListForSigning": []},
    "GetEuiccInfo2Request": {},
    "EUICCInfo2": dict(EUICC_INFO2, euiccCategory=1, forbiddenProfilePolicyRules=(b"\xC0", 2),
                       certificationDataObject={"platformLabel": "p", "discoveryBaseURL": "u"},
                       treProperties=(b"\x80", 1), treProductReference="t",
                       additionalEuiccProfilePackageVersions=[h("030100")]),
    "EuiccConfiguredAddressesRequest": {},
    "EuiccConfiguredAddressesResponse": {"defaultDpAddress": "", "rootDsAddress": "ds"},
    "SetDefaultDpAddressRequest": {"defaultDpAddress": ""},
    "SetDefaultDpAddressResponse": {"setDefaultDpAddressResult": 0},
    "ProfileInfoListRequest": {"searchCriteria": ("isdpAid", AID), "tagList": b"\x5A"},
    "ProfileInfoListResponse": ("profileInfoListOk", [{"iccid": ICCID, "profileClass": 2}, {"profileClass": 1}]),
    "EnableProfileRequest": {"profileIdentifier": ("isdpAid", AID), "refreshFlag": True},
    "EnableProfileResponse": {"enableResult": 5},
    "DisableProfileRequest": {"profileIdentifier": ("iccid", ICCID), "refreshFlag": True},
    "DisableProfileResponse": {"disableResult": 127},
    "DeleteProfileRequest": ("iccid", ICCID),
    "DeleteProfileResponse": {"deleteResult": 2},
    "SetNicknameRequest": {"iccid": ICCID, "profileNickname": "ü" * 32},
    "SetNicknameResponse": {"setNicknameResult": 0},
    "EuiccMemoryResetRequest": {"resetOptions": (b"\x80", 1)},
    "EuiccMemoryResetResponse": {"resetResult": 1},
    "ListNotificationRequest": {"profileManagementOperation": (b"\x10", 4)},
    "ListNotificationResponse": ("notificationMetadataList", []),
    "RetrieveNotificationsListRequest": {"searchCriteria": ("seqNumber", 300)},
    "RetrieveNotificationsListResponse": ("notificationList", [("profileInstallationResult", PIR)]),
    "NotificationSentRequest": {"seqNumber": 65536},
    "NotificationSentResponse": {"deleteNotificationStatus": 0},
    "GetRatRequest": {},
    "GetRatResponse": {"rat": []},
    "CancelSessionRequest": {"transactionId": b"\x01", "reason": 127},
    "CancelSessionResponse": ("cancelSessionResponseError", 127),
    "PrepareDownloadResponse": ("downloadResponseOk", {"euiccSigned2": {"transactionId": TXID, "euiccOtpk": OTPK},
                                                       "euiccSignature2": SIG}),
    "AuthenticateServerResponse": ("authenticateResponseError", {"transactionId": TXID,
                                                                 "authenticateErrorCode": 127}),
    "ProfileInstallationResult": PIR,
    "LoadCRLResponse": ("loadCRLResponseOk", {"missingParts": [1, 2]}),
    "LpaeActivationRequest": {"lpaeOption": (b"\x80", 1)},
    "LpaeActivationResponse": {"lpaeActivationResult": 0},
}


@pytest.mark.parametrize("type_name", sorted(ROUND_TRIP))
def test_round_trip(type_name):
    value = ROUND_TRIP[type_name]
    der = codec.encode(type_name, value)
    assert codec.decode(type_name, der) == value
    assert codec.encode(type_name, codec.decode(type_name, der)) == der


def test_load_crl_request_round_trip(cert_der):
    # a CRL built from the same primitives as the certificate
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    t = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CI")]))
           .last_update(t).next_update(t.replace(year=2030))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(5).revocation_date(t).build())
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    # automatic tags: crl is [0] IMPLICIT, so the CRL's 30 becomes A0
    der = tlv("BF35", b"\xA0" + crl[1:])
    v = codec.decode("LoadCRLRequest", der)
    assert v["crl"]["tbsCertList"]["revokedCertificates"][0]["userCertificate"] == 5
    assert codec.encode("LoadCRLRequest", v) == der


# --- malformed input ----------------------------------------------------------------------------------------

GOOD_EID_RESP = h("BF3E 12 5A 10") + EID


@pytest.mark.parametrize("data,why", [
    (b"", "no data"),
    (GOOD_EID_RESP[:-1], "truncated value"),
    (GOOD_EID_RESP[:2], "truncated header"),
    (GOOD_EID_RESP[:3], "contents missing"),
    (GOOD_EID_RESP + b"\x00", "one trailing byte"),
    (GOOD_EID_RESP + h("9000"), "status word left on"),
    (h("BF3E 11 5A 10") + EID, "outer length one short"),
    (h("BF3E 13 5A 10") + EID + b"\x00", "outer length one long, garbage inside"),
    (h("BF3E 12 5A 11") + EID, "inner length longer than parent"),
    (h("BF3E 12 5A 0F") + EID, "inner length shorter, leftover byte is no TLV"),
    (h("BF3F 12 5A 10") + EID, "wrong outer tag"),
    (h("BF3E 12 5B 10") + EID, "wrong inner tag"),
    (h("BF3E 80 5A 10") + EID + h("0000"), "indefinite length (not DER)"),
    (h("BF3E 00"), "mandatory component missing"),
    (h("30 12 5A 10") + EID, "universal SEQUENCE instead of BF3E"),
])
def test_malformed_input_is_protocol_error(data, why):
    with pytest.raises(ProtocolError) as ei:
        codec.decode("GetEuiccDataResponse", data)
    assert ei.value.code == "malformed_asn1", why
    assert str(ei.value).startswith("malformed GetEuiccDataResponse: ")


@pytest.mark.parametrize("type_name,data", [
    ("AuthenticateServerResponse", h("BF38 02 A2 00")),          # no such alternative
    ("ListNotificationResponse", h("BF28 03 82 01 00")),
    ("EnableProfileRequest", h("BF31 08 A0 03 82 01 00 81 01 00")),
    ("CancelSessionRequestEs9", h("BF41 07 80 01 01 81 02 A0 00")),   # inner choice must be under A1
    ("EuiccCancelSessionSigned", h("30 09 80 01 01 81 01 88 82 01 00")),  # OID ends mid sub-identifier
    ("ProfileInstallationResult", PIR_DER[:-1]),
    ("NotificationMetadata", NOTIF_META_DER[:-3]),
])
def test_malformed_structures(type_name, data):
    with pytest.raises(ProtocolError) as ei:
        codec.decode(type_name, data)
    assert ei.value.code == "malformed_asn1"


def test_constraints_checked_on_request():
    short_iccid = h("BF2D 0B A0 09 5A 07 98449499999999")
    assert codec.decode("ProfileInfoListRequest", short_iccid) == {"searchCriteria": ("iccid", ICCID[:7])}
    with pytest.raises(ProtocolError) as ei:
        codec.decode("ProfileInfoListRequest", short_iccid, check_constraints=True)
    assert ei.value.code == "malformed_asn1"
    assert codec.decode("GetEuiccDataResponse", GOOD_EID_RESP, check_constraints=True) == {"eidValue": EID}


def test_encode_rejects_bad_values():
    with pytest.raises(ValueError, match="GetEuiccDataResponse"):
        codec.encode("GetEuiccDataResponse", {"eidValue": b"\x89" * 15})     # SIZE(16)
    with pytest.raises(ValueError):
        codec.encode("CancelSessionRequest", {"transactionId": TXID})         # reason missing
    with pytest.raises(ValueError):
        codec.encode("CancelSessionRequest", {"transactionId": bytes(17), "reason": 0})  # SIZE(1..16)
    with pytest.raises(ValueError):
        codec.encode("EnableProfileRequest", {"profileIdentifier": ("imsi", b""), "refreshFlag": True})
    with pytest.raises(KeyError):
        codec.encode("NoSuchType", {})


# --- compile cache --------------------------------------------------------------------------------------

def _run(code: str, cache: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    # a private TMPDIR too, so the fallback cache of other runs is not picked up
    own_tmp = cache.parent / f"{cache.name}-tmpdir"
    own_tmp.mkdir(exist_ok=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONPATH=str(REPO), TMPDIR=str(own_tmp))
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)


DECODE_EID = """
    from agent import asn1tables, codec
    v = codec.decode('GetEuiccDataResponse', bytes.fromhex('BF3E125A10' + '89049032123451234512345678901235'))
    assert v['eidValue'].hex() == '89049032123451234512345678901235'
"""


def test_cache_is_written_then_used_without_importing_the_asn1_parser(tmp_path):
    r = _run(DECODE_EID + """
    import sys
    assert 'asn1tools.compiler' in sys.modules      # cold: really compiled
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    pickles = sorted((tmp_path / "esim-agent").glob("asn1-*.pickle"))
    assert [p.name.rsplit("-", 1)[1] for p in pickles] == ["base.pickle", "sgp32.pickle"]   # the two sets
    warm = DECODE_EID + """
    import sys
    assert 'pyparsing' not in sys.modules, 'warm path imported pyparsing'
    assert 'asn1tools.compiler' not in sys.modules
    assert 'asn1tools.codecs.constraints_checker' not in sys.modules
    assert not asn1tables._extra_loaded and 'hashlib' not in sys.modules  # SGP.22 only: the SGP.32 set stays on disk
    assert asn1tables.has_type('EsipaMessageFromEimToIpa') and not asn1tables._extra_loaded
    # encoding still works (constraints checkers load lazily) and so does the real package afterwards
    assert codec.encode('GetEuiccDataRequest', {'tagList': b'Z'}) == bytes.fromhex('BF3E035C015A')
    import asn1tools
    assert asn1tools.compile_string('A DEFINITIONS ::= BEGIN X ::= INTEGER END').encode('X', 5) == b'\\x02\\x01\\x05'
    """
    r = _run(warm, tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted((tmp_path / "esim-agent").glob("asn1-*.pickle")) == pickles


def test_corrupt_cache_is_recompiled_silently(tmp_path):
    assert _run(DECODE_EID, tmp_path).returncode == 0
    (p,) = (tmp_path / "esim-agent").glob("asn1-*-base.pickle")
    p.write_bytes(b"\x80\x05garbage")
    r = _run(DECODE_EID, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert p.read_bytes() != b"\x80\x05garbage" and len(p.read_bytes()) > 10000   # rewritten


def test_unwritable_cache_falls_back(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = _run(DECODE_EID, blocker, {"TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr
    assert list(tmp.glob("esim-agent-*/asn1-*.pickle"))


def test_cache_key_changes_with_the_sources(tmp_path, monkeypatch):
    srcs = [Path(p) for p in asn1tables.asn_sources()]
    k1 = asn1tables._cache_key(srcs)
    copies = []
    for p in srcs:
        q = tmp_path / p.name
        q.write_bytes(p.read_bytes())
        copies.append(q)
    assert asn1tables._cache_key(copies) == k1
    copies[0].write_bytes(copies[0].read_bytes() + b"\n-- changed\n")
    assert asn1tables._cache_key(copies) != k1


def test_cache_in_a_directory_others_can_write_is_not_trusted(tmp_path):
    assert _run(DECODE_EID, tmp_path).returncode == 0
    d = tmp_path / "esim-agent"
    (p,) = d.glob("asn1-*-base.pickle")
    before = p.stat().st_mtime_ns
    d.chmod(0o777)        # e.g. a pre-created shared directory: never unpickle from or write to it
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = _run(DECODE_EID, tmp_path, {"TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr
    assert p.stat().st_mtime_ns == before                         # not rewritten there
    assert list(tmp.glob("esim-agent-*/asn1-*.pickle"))           # used the private fallback instead


def test_encode_rejects_unknown_fields():
    """asn1tools drops unknown dict keys silently; a misspelt field must be an error instead."""
    caps = {"gsmSupportedRelease": b"\x0f\x00\x00", "eutranSupportedRelease": b"\x0f\x00\x00"}
    with pytest.raises(ValueError, match="eutranSupportedRelease"):
        codec.encode("CtxParams1", ("ctxParamsForCommonAuthentication",
                                    {"deviceInfo": {"tac": bytes(4), "deviceCapabilities": caps}}))
    with pytest.raises(ValueError, match="bogus"):
        codec.encode("ListNotificationResponse", ("notificationMetadataList", [
            {"seqNumber": 1, "profileManagementOperation": (b"\x80", 1), "notificationAddress": "a.b", "bogus": 1}]))


def test_pir_data_without_smdp_oid_decodes():
    """smdpOid is OPTIONAL in ProfileInstallationResultData (SGP.22 §5.7.6)."""
    v = {"transactionId": bytes(16),
         "notificationMetadata": {"seqNumber": 1, "profileManagementOperation": (b"\x80", 1),
                                  "notificationAddress": "smdp.example.com"},
         "finalResult": ("successResult", {"aid": bytes.fromhex("A0000005591010FFFFFFFF8900001000"),
                                           "simaResponse": bytes.fromhex("300780053003800100")})}
    der = codec.encode("ProfileInstallationResultData", v)
    assert b"\x06" not in der[:der.index(b"\xa2")][-3:]
    assert codec.decode("ProfileInstallationResultData", der)["finalResult"][0] == "successResult"
