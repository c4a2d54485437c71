"""Our SGP.32 transcription (asn1/sgp32.asn, v1.2; asn1/sgp32v10.asn, the v1.0 wire forms).

Expected bytes are written out here from the SGP.32 tag layout (docs/protocol.md §2, §7,
§8), as tests/test_asn1.py does for SGP.22: every message is encoded, compared byte for
byte and decoded back.  The checks that matter most are the ~20 places where SGP.32
puts a tag in front of a reference to a tagged CHOICE: that tag is implicit (one BF51,
not BF51 BF51), which asn1tools only gets right because the module says IMPLICIT there.
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

EID = bytes.fromhex("89049032123451234512345678901235")
ICCID = bytes.fromhex("984494999999999940F9")
ICCID2 = bytes.fromhex("98001032547698103254")
AID = bytes.fromhex("A0000005591010FFFFFFFF8900001000")
SKI = bytes.fromhex("F54172BDF98A95D65CBEB88A38A1C11D800A85C3")
TXID = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")
EIM_TXID = bytes(range(0x40, 0x50))
SIG = bytes(range(64))
OTPK = bytes([0x04]) + bytes(range(64))
HASH_CC = bytes(range(0x20, 0x40))
EIM = "eim.test.example"
EIM2 = "eim2.test.example"
OID_2_999_10 = bytes.fromhex("88370A")


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


def contents(der: bytes) -> bytes:
    """The value part of one DER TLV with a one-byte tag (to re-tag a SEQUENCE implicitly)."""
    n = der[1]
    if n < 0x80:
        return der[2:2 + n]
    k = n & 0x7F
    return der[2 + k:]


def check(type_name, value, expected: bytes):
    """encode gives exactly `expected`, and decoding it gives `value` back."""
    got = codec.encode(type_name, value)
    assert got.hex().upper() == expected.hex().upper()
    assert codec.decode(type_name, expected) == value


# --- certificates and keys generated here ------------------------------------------------

@pytest.fixture(scope="module")
def keys():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test eIM")])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(0x5432)
            .not_valid_before(now).not_valid_after(now.replace(year=2060))
            .add_extension(x509.SubjectKeyIdentifier(SKI), critical=False)
            .sign(key, hashes.SHA256()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    return {"spki_der": spki, "spki": codec.decode("SubjectPublicKeyInfo", spki),
            "cert_der": cert_der, "cert": codec.decode("Certificate", cert_der)}


# --- building blocks used by several messages -----------------------------------------------

DEVICE_INFO = {"tac": h("35290611"), "deviceCapabilities": {"eutranEpcSupportedRelease": h("0F0000")},
               "imei": h("3529061100000010")}
DEVICE_INFO_DER = h("80 04 35290611 A1 05 85 03 0F0000 82 08 3529061100000010")
CTX1 = ("ctxParamsForCommonAuthentication", {"matchingId": "ABC", "deviceInfo": DEVICE_INFO})
CTX1_DER = tlv("A0", h("80 03") + b"ABC" + tlv("A1", DEVICE_INFO_DER))

EUICC_INFO2 = {
    "profileVersion": h("020301"), "svn": h("020500"), "euiccFirmwareVer": h("010203"),
    "extCardResource": h("810100 820300FFFF 830200FF"), "uiccCapability": (h("6FFFFF"), 24),
    "ts102241Version": h("090200"), "globalplatformVersion": h("020300"), "rspCapability": (h("90"), 4),
    "euiccCiPKIdListForVerification": [SKI], "euiccCiPKIdListForSigning": [SKI], "euiccCategory": 1,
    "ppVersion": h("010000"), "sasAcreditationNumber": "SAS-1",
    "ipaMode": 0, "iotSpecificInfo": {"iotVersion": [h("010200")], "fallbackSupported": None},
}
EUICC_INFO2_BODY = (h("81 03 020301 82 03 020500 83 03 010203 84 0C 810100820300FFFF830200FF 85 04 00 6FFFFF"
                      "86 03 090200 87 03 020300 88 02 04 90")
                    + tlv("A9", tlv("04", SKI)) + tlv("AA", tlv("04", SKI)) + h("8B 01 01")
                    + h("04 03 010000") + h("0C 05") + b"SAS-1"
                    + h("90 01 00") + tlv("B4", tlv("A0", h("04 03 010200")) + h("82 00")))

EPR_DATA = {"eimId": EIM, "counterValue": 8, "eimTransactionId": EIM_TXID, "seqNumber": 4,
            "euiccResult": [("enableResult", 0)]}
EPR = ("euiccPackageResultSigned", {"euiccPackageResultDataSigned": EPR_DATA, "euiccSignEPR": SIG})
EPR_BODY = tlv("A0", tlv("30", tlv("80", EIM.encode()) + h("81 01 08") + tlv("82", EIM_TXID) + h("83 01 04")
                         + tlv("30", h("83 01 00")))
               + tlv("5F37", SIG))
EPR_DER = tlv("BF51", EPR_BODY)

NOTIF_META = {"seqNumber": 11, "profileManagementOperation": (b"\x40", 2), "notificationAddress": "dp.test.example",
              "iccid": ICCID}
NOTIF_META_DER = tlv("BF2F", h("80 01 0B 81 02 06 40") + tlv("0C", b"dp.test.example") + tlv("5A", ICCID))
COMPACT_OTHER = ("compactOtherSignedNotification", {"tbsOtherNotification": NOTIF_META,
                                                    "euiccNotificationSignature": SIG})
COMPACT_OTHER_DER = tlv("A1", NOTIF_META_DER + tlv("5F37", SIG))

PIR = {"profileInstallationResultData": {
           "transactionId": TXID,
           "notificationMetadata": {"seqNumber": 10, "profileManagementOperation": (b"\x80", 1),
                                    "notificationAddress": "dp.test.example", "iccid": ICCID},
           "smdpOid": "2.999.10",
           "finalResult": ("successResult", {"aid": AID, "simaResponse": h("300780053003800100")})},
       "euiccSignPIR": SIG}
PIR_DER = tlv("BF37", tlv("BF27", tlv("80", TXID)
                          + tlv("BF2F", h("80 01 0A 81 02 07 80") + tlv("0C", b"dp.test.example") + tlv("5A", ICCID))
                          + tlv("06", OID_2_999_10)
                          + tlv("A2", tlv("A0", tlv("4F", AID) + tlv("04", h("300780053003800100")))))
              + tlv("5F37", SIG))

AC = "1$dp.test.example$MATCH-1"
TRIGGER = {"profileDownloadData": ("activationCode", AC), "eimTransactionId": EIM_TXID}
TRIGGER_DER = tlv("BF54", tlv("A0", tlv("80", AC.encode())) + tlv("82", EIM_TXID))

AUDIT = {"tagList": h("81 83 BF20 BF22 A8 A9 A0 A2"), "euiccCiPKIdentifierToBeUsed": SKI,
         "searchCriteriaNotification": ("seqNumber", 10), "searchCriteriaEuiccPackageResult": ("seqNumber", 3),
         "eimTransactionId": EIM_TXID}
AUDIT_DER = tlv("BF52", tlv("5C", h("81 83 BF20 BF22 A8 A9 A0 A2")) + tlv("04", SKI)
                + h("A1 03 80 01 0A") + h("A2 03 80 01 03") + tlv("83", EIM_TXID))

PACKAGE = {"euiccPackageSigned": {"eimId": EIM, "eidValue": EID, "counterValue": 9, "eimTransactionId": EIM_TXID,
                                  "euiccPackage": ("psmoList", [("enable", {"iccid": ICCID2, "rollbackFlag": None})])},
           "eimSignature": SIG}
PACKAGE_DER = tlv("BF51", tlv("30", tlv("80", EIM.encode()) + tlv("5A", EID) + h("81 01 09") + tlv("82", EIM_TXID)
                              + tlv("A0", tlv("A3", tlv("5A", ICCID2) + h("05 00"))))
                  + tlv("5F37", SIG))


# --- the module is compiled with the SGP.22 one ------------------------------------------------

def test_sgp32_types_sit_next_to_the_sgp22_ones():
    names = [Path(p).name for p in asn1tables.asn_sources()]
    assert names[:2] == ["rsp.asn", "pkix.asn"] and "sgp32.asn" in names and "sgp32v10.asn" in names
    for t in ("EsipaMessageFromIpaToEim", "EsipaMessageFromEimToIpa", "EuiccPackageRequest", "EuiccPackageResult",
              "IpaEuiccDataRequest", "IpaEuiccDataResponse", "ProfileDownloadTriggerRequest",
              "ProfileDownloadTriggerResult", "EimConfigurationData", "EimAcknowledgements", "AddInitialEimRequest",
              "GetEimConfigurationDataRequest", "ProfileRollbackRequest", "ImmediateEnableRequest",
              "ExecuteFallbackMechanismRequest", "ReturnFromFallbackRequest", "SGP32-EUICCInfo2",
              "SGP32-RetrieveNotificationsListRequest", "SGP32-ProfileInfoListResponse",
              "EsipaMessageFromIpaToEimV10", "EsipaMessageFromEimToIpaV10"):
        assert asn1tables.has_type(t), t
    # SGP.32's redefinitions carry the SGP32- prefix, so SGP.22's types of the same name survive
    # (asn1tools drops a name defined in two modules from its type table).
    for t in ("EUICCInfo2", "ProfileInfo", "ProfileInfoListResponse", "RetrieveNotificationsListRequest",
              "AuthenticateServerResponse", "PrepareDownloadResponse", "CancelSessionResponse",
              "EuiccMemoryResetRequest", "SetDefaultDpAddressRequest", "PendingNotification"):
        assert asn1tables.has_type(t) and asn1tables.has_type("SGP32-" + t), t
    assert codec.encode("SetDefaultDpAddressRequest", {"defaultDpAddress": "a"})[:2] == h("BF3F")
    assert codec.encode("SGP32-SetDefaultDpAddressRequest", {"defaultDpAddress": "a"})[:2] == h("BF65")


def test_cache_key_covers_the_sgp32_sources(tmp_path):
    srcs = [Path(p) for p in asn1tables.asn_sources()]
    k1 = asn1tables._cache_key(srcs)
    copies = []
    for p in srcs:
        q = tmp_path / p.name
        q.write_bytes(p.read_bytes())
        copies.append(q)
    assert asn1tables._cache_key(copies) == k1
    for name in ("sgp32.asn", "sgp32v10.asn"):
        q = tmp_path / name
        original = q.read_bytes()
        q.write_bytes(original + b"\n-- changed\n")
        assert asn1tables._cache_key(copies) != k1, name
        q.write_bytes(original)


def test_warm_cache_decodes_sgp32_without_the_asn1_parser(tmp_path):
    code = textwrap.dedent("""
        import sys
        from agent import asn1tables, codec
        v = codec.decode('EsipaMessageFromEimToIpa', bytes.fromhex('BF4F03020101'))
        assert v == ('getEimPackageResponse', ('eimPackageError', 1)), v
        print('pyparsing' in sys.modules)
    """)
    own_tmp = tmp_path / "tmpdir"
    own_tmp.mkdir()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO), TMPDIR=str(own_tmp))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True,
                           timeout=120) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert [r.stdout.strip() for r in runs] == ["True", "False"]   # cold compiles, warm only unpickles


# --- eUICC Package Request (ESep, signed by the eIM) ---------------------------------------------

def test_euicc_package_request_layout_of_a_real_trace():
    # docs/protocol.md §7: BF51 818A 30 45 80 0C <eimId> 5A 10 <EID> 81 01 05 82 10 <txid> A0 0E A3 0C 5A 0A <iccid>
    # 5F37 40 <sig>
    value = {"euiccPackageSigned": {"eimId": "eim.test.xyz", "eidValue": EID, "counterValue": 5,
                                    "eimTransactionId": EIM_TXID,
                                    "euiccPackage": ("psmoList", [("enable", {"iccid": ICCID})])},
             "eimSignature": SIG}
    check("EuiccPackageRequest", value,
          h("BF51 81 8A 30 45 80 0C") + b"eim.test.xyz" + h("5A 10") + EID + h("81 01 05 82 10") + EIM_TXID
          + h("A0 0E A3 0C 5A 0A") + ICCID + h("5F37 40") + SIG)


def test_euicc_package_request_every_psmo():
    psmos = [("enable", {"iccid": ICCID, "rollbackFlag": None}),
             ("disable", {"iccid": ICCID}),
             ("delete", {"iccid": ICCID}),
             ("listProfileInfo", {"searchCriteria": ("iccid", ICCID), "tagList": h("5A 9F70 9F26")}),
             ("getRAT", {}),
             ("configureImmediateEnable", {"immediateEnableFlag": None, "defaultSmdpOid": "2.999.10",
                                           "defaultSmdpAddress": "dp.test.example"}),
             ("setFallbackAttribute", {"iccid": ICCID2}),
             ("unsetFallbackAttribute", {}),
             ("setDefaultDpAddress", {"defaultDpAddress": "dp2.test.example"})]
    psmo_der = (tlv("A3", tlv("5A", ICCID) + h("05 00"))          # rollbackFlag keeps its universal NULL
                + tlv("A4", tlv("5A", ICCID)) + tlv("A5", tlv("5A", ICCID))
                + tlv("BF2D", tlv("A0", tlv("5A", ICCID)) + tlv("5C", h("5A 9F70 9F26")))
                + h("A6 00")
                + tlv("A7", h("80 00") + tlv("81", OID_2_999_10) + tlv("82", b"dp.test.example"))
                + tlv("A8", tlv("5A", ICCID2)) + h("A9 00")
                + tlv("BF65", tlv("80", b"dp2.test.example")))
    value = {"euiccPackageSigned": {"eimId": EIM, "eidValue": EID, "counterValue": 7, "eimTransactionId": EIM_TXID,
                                    "euiccPackage": ("psmoList", psmos)},
             "eimSignature": SIG}
    signed = tlv("30", tlv("80", EIM.encode()) + tlv("5A", EID) + h("81 01 07") + tlv("82", EIM_TXID)
                 + tlv("A0", psmo_der))
    check("EuiccPackageRequest", value, tlv("BF51", signed + tlv("5F37", SIG)))
    # the signed part is what the eIM signs: its DER must come out the same on its own
    assert codec.encode("EuiccPackageSigned", value["euiccPackageSigned"]) == signed


def test_euicc_package_request_every_eco_and_eim_configuration_data(keys):
    cfg = {"eimId": EIM2, "eimFqdn": EIM2, "eimIdType": 2, "counterValue": 0,
           "eimPublicKeyData": ("eimPublicKey", keys["spki"]), "eimSupportedProtocol": (b"\x80", 1),
           "euiccCiPKId": SKI, "indirectProfileDownload": None}
    # [5] before an untagged CHOICE is explicit; the CHOICE's automatic [0] replaces the SPKI's 30
    cfg_body = (tlv("80", EIM2.encode()) + tlv("81", EIM2.encode()) + h("82 01 02 83 01 00")
                + tlv("A5", tlv("A0", contents(keys["spki_der"]))) + h("87 02 07 80") + tlv("88", SKI) + h("89 00"))
    check("EimConfigurationData", cfg, tlv("30", cfg_body))
    ecos = [("addEim", cfg), ("deleteEim", {"eimId": EIM2}), ("updateEim", {"eimId": EIM2, "counterValue": 100}),
            ("listEim", {})]
    eco_der = (tlv("A8", cfg_body) + tlv("A9", tlv("80", EIM2.encode()))
               + tlv("AA", tlv("80", EIM2.encode()) + h("83 01 64")) + h("AB 00"))
    value = {"euiccPackageSigned": {"eimId": EIM, "eidValue": EID, "counterValue": 10,
                                    "euiccPackage": ("ecoList", ecos)},
             "eimSignature": SIG}
    check("EuiccPackageRequest", value,
          tlv("BF51", tlv("30", tlv("80", EIM.encode()) + tlv("5A", EID) + h("81 01 0A") + tlv("A1", eco_der))
              + tlv("5F37", SIG)))


def test_eim_configuration_data_with_certificates_and_vendor_data(keys):
    cfg = {"eimId": EIM, "associationToken": 3,
           "eimPublicKeyData": ("eimCertificate", keys["cert"]),
           "trustedPublicKeyDataTls": ("trustedCertificateTls", keys["cert"]),
           "eSipaProprietaryProtocolInformation": [{"vendorOid": "2.999.10", "vendorSpecificData": h("04 01 00")}]}
    body = (tlv("80", EIM.encode()) + h("84 01 03")
            + tlv("A5", tlv("A1", contents(keys["cert_der"]))) + tlv("A6", tlv("A1", contents(keys["cert_der"])))
            + tlv("AA", tlv("30", tlv("80", OID_2_999_10) + tlv("A1", h("04 01 00")))))
    check("EimConfigurationData", cfg, tlv("30", body))


# --- eUICC Package Result (signed by the eUICC) --------------------------------------------------

def test_euicc_package_result_every_result_kind():
    profile = {"iccid": ICCID, "profileState": 1, "profileClass": 2, "fallbackAttribute": False,
               "fallbackAllowed": True}
    rat = [{"pprIds": (b"\x40", 2), "allowedOperators": [{"mccMnc": h("00F110")}], "pprFlags": (b"\x80", 1)}]
    results = [("enableResult", 0), ("disableResult", 0), ("deleteResult", 21),
               ("listProfileInfoResult", ("profileInfoListOk", [profile])),
               ("getRATResult", rat), ("configureImmediateEnableResult", 0),
               ("addEimResult", ("associationToken", 2)), ("deleteEimResult", 0), ("updateEimResult", 6),
               ("listEimResult", ("eimIdList", [{"eimId": EIM, "eimIdType": 2}])),
               ("rollbackResult", 0), ("setFallbackAttributeResult", 2), ("unsetFallbackAttributeResult", 0),
               ("processingTerminated", 3),
               ("setDefaultDpAddressResult", {"setDefaultDpAddressResult": 0})]
    results_der = (h("83 01 00 84 01 00 85 01 15")
                   # listProfileInfoResult [45] IMPLICIT: one BF2D around A0 (not BF2D BF2D)
                   + tlv("BF2D", tlv("A0", tlv("E3", tlv("5A", ICCID) + h("9F70 01 01 95 01 02 9F67 01 FF"))))
                   + tlv("A6", tlv("30", h("80 02 06 40") + tlv("A1", tlv("30", h("80 03 00F110"))) + h("82 02 07 80")))
                   + h("87 01 00")
                   + h("A8 03 84 01 02")                       # untagged CHOICE: [8] is explicit
                   + h("89 01 00 8A 01 06")
                   + tlv("AB", tlv("A0", tlv("30", tlv("80", EIM.encode()) + h("82 01 02"))))
                   + h("8C 01 00 8D 01 02 8E 01 00")
                   + h("02 01 03")                             # processingTerminated: universal INTEGER
                   + h("BF65 03 80 01 00"))
    data = {"eimId": EIM, "counterValue": 7, "eimTransactionId": EIM_TXID, "seqNumber": 3, "euiccResult": results}
    data_der = tlv("30", tlv("80", EIM.encode()) + h("81 01 07") + tlv("82", EIM_TXID) + h("83 01 03")
                   + tlv("30", results_der))
    check("EuiccPackageResult", ("euiccPackageResultSigned", {"euiccPackageResultDataSigned": data,
                                                              "euiccSignEPR": SIG}),
          tlv("BF51", tlv("A0", data_der + tlv("5F37", SIG))))
    check("EuiccPackageResult", EPR, EPR_DER)


def test_euicc_package_errors():
    check("EuiccPackageResult",
          ("euiccPackageErrorSigned", {"euiccPackageErrorDataSigned": {"eimId": EIM, "counterValue": 7,
                                                                       "euiccPackageErrorCode": 4},
                                       "euiccSignEPE": SIG}),
          tlv("BF51", tlv("A1", tlv("30", tlv("80", EIM.encode()) + h("81 01 07 02 01 04")) + tlv("5F37", SIG))))
    check("EuiccPackageResult",
          ("euiccPackageErrorUnsigned", {"eimId": EIM, "eimTransactionId": EIM_TXID, "associationToken": 1,
                                         "euiccPackageUnsignedErrorCode": 127}),
          tlv("BF51", tlv("A2", tlv("80", EIM.encode()) + tlv("82", EIM_TXID) + h("84 01 01 8F 01 7F"))))


def test_a_v10_card_s_list_eim_result_loses_its_eim_id_type_when_re_encoded():
    """v1.0 cards put EimIdInfo.eimIdType at [4] (84), v1.2 at [2] (82).  Decoding skips the
    unknown component (extensibility), so re-encoding changes the signed bytes: the IPA relays
    the eUICC's blob as it came (docs/protocol.md §0), it never rebuilds it."""
    eim_info = tlv("30", tlv("80", EIM.encode()) + h("84 01 02"))
    data = tlv("30", tlv("80", EIM.encode()) + h("81 01 0A 83 01 07") + tlv("30", tlv("AB", tlv("A0", eim_info))))
    der = tlv("BF51", tlv("A0", data + tlv("5F37", SIG)))
    v = codec.decode("EuiccPackageResult", der)
    assert v[1]["euiccPackageResultDataSigned"]["euiccResult"] == [("listEimResult", ("eimIdList", [{"eimId": EIM}]))]
    assert codec.encode("EuiccPackageResult", v) != der


# --- IPA eUICC data, profile download trigger, acknowledgements --------------------------------

def test_ipa_euicc_data_request():
    check("IpaEuiccDataRequest", AUDIT, AUDIT_DER)
    check("IpaEuiccDataRequest", {"tagList": h("A5 A6")}, h("BF52 04 5C 02 A5 A6"))
    check("IpaEuiccDataRequest", {"tagList": h("A2"), "searchCriteriaNotification":
                                  ("profileManagementOperation", (b"\x40", 2))},
          h("BF52 09 5C 01 A2 A1 04 81 02 06 40"))


def test_ipa_euicc_data_response(keys):
    data = {"notificationsList": [COMPACT_OTHER], "defaultSmdpAddress": "dp.test.example",
            "euiccPackageResultList": [EPR],
            "euiccInfo1": {"svn": h("020500"), "euiccCiPKIdListForVerification": [SKI],
                           "euiccCiPKIdListForSigning": [SKI]},
            "euiccInfo2": EUICC_INFO2, "rootSmdsAddress": "lpa.ds.gsma.com", "associationToken": 1,
            "eumCertificate": keys["cert"], "euiccCertificate": keys["cert"], "eimTransactionId": EIM_TXID,
            "ipaCapabilities": {"ipaFeatures": (b"\xa0", 3), "ipaSupportedProtocols": (b"\x80", 1)},
            "deviceInfo": DEVICE_INFO}
    body = (tlv("A0", COMPACT_OTHER_DER) + tlv("81", b"dp.test.example") + tlv("A2", EPR_DER)
            + tlv("BF20", h("82 03 020500") + tlv("A9", tlv("04", SKI)) + tlv("AA", tlv("04", SKI)))
            + tlv("BF22", EUICC_INFO2_BODY) + tlv("83", b"lpa.ds.gsma.com") + h("84 01 01")
            # [5]/[6] Certificate: implicit, A5/A6 replace the certificate's 30
            + tlv("A5", contents(keys["cert_der"])) + tlv("A6", contents(keys["cert_der"]))
            + tlv("87", EIM_TXID) + h("A8 08 80 02 05 A0 81 02 07 80") + tlv("A9", DEVICE_INFO_DER))
    check("IpaEuiccDataResponse", ("ipaEuiccData", data), tlv("BF52", tlv("A0", body)))
    check("IpaEuiccDataResponse", ("ipaEuiccDataResponseError", {"eimTransactionId": EIM_TXID,
                                                                 "ipaEuiccDataErrorCode": 1}),
          tlv("BF52", tlv("A1", tlv("80", EIM_TXID) + h("02 01 01"))))


def test_profile_download_trigger_request_and_result():
    check("ProfileDownloadTriggerRequest", TRIGGER, TRIGGER_DER)
    check("ProfileDownloadTriggerRequest", {"profileDownloadData": ("contactDefaultSmdp", None)},
          h("BF54 04 A0 02 81 00"))
    check("ProfileDownloadTriggerRequest", {"profileDownloadData": ("contactSmds", {"smdsAddress": "lpa.ds.gsma.com"})},
          tlv("BF54", tlv("A0", tlv("A2", tlv("80", b"lpa.ds.gsma.com")))))
    check("ProfileDownloadTriggerResult",
          {"eimTransactionId": EIM_TXID, "profileDownloadTriggerResultData": ("profileInstallationResult", PIR)},
          tlv("BF54", tlv("82", EIM_TXID) + PIR_DER))
    # profileDownloadErrorReason is tagged, so errorResponse keeps its universal 04
    check("ProfileDownloadTriggerResult",
          {"profileDownloadTriggerResultData": ("profileDownloadError", {"profileDownloadErrorReason": 127,
                                                                         "errorResponse": h("BF3B 03 82 01 08")})},
          h("BF54 0D 30 0B 80 01 7F 04 06 BF3B03820108"))


def test_eim_acknowledgements():
    check("EimAcknowledgements", [1, 2, 300], h("BF53 0A 80 01 01 80 01 02 80 02 01 2C"))
    check("EimAcknowledgements", [], h("BF53 00"))


# --- SGP.32 ProfileInfo and EUICCInfo2 --------------------------------------------------------------

def test_sgp32_profile_info_fallback_attributes_and_profile_class():
    # fallbackAttribute DEFAULT FALSE: left out by DER, filled in on decode; profileClass is OPTIONAL
    # in SGP.32's ProfileInfo (SGP.22's is DEFAULT operational), so an operational profile says 95 01 02
    p1 = {"iccid": ICCID, "profileState": 0, "profileClass": 2, "fallbackAttribute": True, "fallbackAllowed": True,
          "ecallIndication": False}
    p2 = {"iccid": ICCID2, "profileState": 1, "fallbackAttribute": False}
    check("SGP32-ProfileInfoListResponse", ("profileInfoListOk", [p1, p2]),
          tlv("BF2D", tlv("A0", tlv("E3", tlv("5A", ICCID) + h("9F70 01 00 95 01 02 9F7B 01 00 9F26 01 FF 9F67 01 FF"))
                          + tlv("E3", tlv("5A", ICCID2) + h("9F70 01 01")))))
    assert codec.decode("SGP32-ProfileInfo", tlv("E3", tlv("5A", ICCID))) == {"iccid": ICCID, "fallbackAttribute": False}
    check("SGP32-ProfileInfoListResponse", ("profileInfoListError", 11), h("BF2D 03 81 01 0B"))


def test_sgp32_euicc_info2():
    check("SGP32-EUICCInfo2", EUICC_INFO2, tlv("BF22", EUICC_INFO2_BODY))
    # SGP.22's EUICCInfo2 reads the same bytes, skipping the IoT fields
    v22 = codec.decode("EUICCInfo2", tlv("BF22", EUICC_INFO2_BODY))
    assert "ipaMode" not in v22 and v22["ppVersion"] == h("010000")


# --- SGP.32 ES10b functions --------------------------------------------------------------------------

def test_add_initial_eim_and_get_eim_configuration_data(keys):
    cfg = {"eimId": EIM, "eimFqdn": EIM, "eimIdType": 2, "counterValue": 8, "associationToken": 1,
           "eimPublicKeyData": ("eimPublicKey", keys["spki"])}
    cfg_der = tlv("30", tlv("80", EIM.encode()) + tlv("81", EIM.encode()) + h("82 01 02 83 01 08 84 01 01")
                  + tlv("A5", tlv("A0", contents(keys["spki_der"]))))
    check("AddInitialEimRequest", {"eimConfigurationDataList": [cfg]}, tlv("BF57", tlv("A0", cfg_der)))
    check("AddInitialEimResponse", ("addInitialEimOk", [("associationToken", 1)]), h("BF57 05 A0 03 84 01 01"))
    check("AddInitialEimResponse", ("addInitialEimOk", [("addOk", None)]), h("BF57 04 A0 02 05 00"))
    check("AddInitialEimResponse", ("addInitialEimError", 2), h("BF57 03 81 01 02"))
    check("GetEimConfigurationDataRequest", {}, h("BF55 00"))
    check("GetEimConfigurationDataRequest", {"searchCriteria": ("eimId", EIM)},
          tlv("BF55", tlv("A0", tlv("80", EIM.encode()))))
    check("GetEimConfigurationDataResponse", {"eimConfigurationDataList": [cfg]}, tlv("BF55", tlv("A0", cfg_der)))


def test_retrieve_notifications_list_sgp32():
    check("SGP32-RetrieveNotificationsListRequest", {"searchCriteria": ("euiccPackageResults", None)},
          h("BF2B 04 A0 02 82 00"))
    check("SGP32-RetrieveNotificationsListRequest", {"searchCriteria": ("seqNumber", 10)}, h("BF2B 05 A0 03 80 01 0A"))
    check("SGP32-RetrieveNotificationsListResponse", ("euiccPackageResultList", [EPR]), tlv("BF2B", tlv("A2", EPR_DER)))
    compact_pir = ("compactProfileInstallationResult", {
        "compactProfileInstallationResultData": {"transactionId": TXID, "seqNumber": 12, "iccidPresent": True,
                                                 "compactFinalResult": ("compactSuccessResult",
                                                                        {"compactAid": h("1000")})},
        "euiccSignPIR": SIG})
    compact_pir_der = tlv("A0", tlv("A0", tlv("80", TXID) + h("02 01 0C") + h("A2 06 A0 04 4F 02 10 00"))
                          + tlv("5F37", SIG))
    check("SGP32-RetrieveNotificationsListResponse",
          ("notificationList", [("profileInstallationResult", PIR), COMPACT_OTHER, compact_pir]),
          tlv("BF2B", tlv("A0", PIR_DER + COMPACT_OTHER_DER + compact_pir_der)))
    check("SGP32-RetrieveNotificationsListResponse", ("notificationsListResultError", 127), h("BF2B 03 81 01 7F"))


@pytest.mark.parametrize("type_name, value, der", [
    ("ExecuteFallbackMechanismRequest", {"refreshFlag": True}, "BF5D 03 80 01 FF"),
    ("ExecuteFallbackMechanismResponse", {"executeFallbackMechanismResult": 6}, "BF5D 03 80 01 06"),
    ("ReturnFromFallbackRequest", {"refreshFlag": False}, "BF5E 03 80 01 00"),
    ("ReturnFromFallbackResponse", {"returnFromFallbackResult": 0}, "BF5E 03 80 01 00"),
    ("ImmediateEnableRequest", {"refreshFlag": True}, "BF5A 03 80 01 FF"),
    ("ImmediateEnableResponse", {"immediateEnableResult": 4}, "BF5A 03 80 01 04"),
    ("ProfileRollbackRequest", {"refreshFlag": True}, "BF58 03 80 01 FF"),
    ("ProfileRollbackResponse", {"cmdResult": 1}, "BF58 03 02 01 01"),
    ("ConfigureImmediateProfileEnablingRequest", {"immediateEnableFlag": None, "defaultSmdpOid": "2.999.10",
                                                  "defaultSmdpAddress": "dp"}, "BF59 0B 80 00 81 03 88370A 82 02 6470"),
    ("ConfigureImmediateProfileEnablingResponse", {"configImmediateEnableResult": 0}, "BF59 03 80 01 00"),
    # deleteOperationalProfiles(0) + resetEimConfigData(5): 6 bits, 2 unused
    ("SGP32-EuiccMemoryResetRequest", {"resetOptions": (b"\x84", 6)}, "BF64 04 82 02 02 84"),
    ("SGP32-EuiccMemoryResetResponse", {"resetResult": 0, "resetEimResult": 0}, "BF64 06 80 01 00 81 01 00"),
    ("EnableEmergencyProfileRequest", {"refreshFlag": True}, "BF5B 03 80 01 FF"),
    ("EnableEmergencyProfileResponse", {"enableEmergencyProfileResult": 8}, "BF5B 03 80 01 08"),
    ("DisableEmergencyProfileRequest", {"refreshFlag": False}, "BF5C 03 80 01 00"),
    ("DisableEmergencyProfileResponse", {"disableEmergencyProfileResult": 0}, "BF5C 03 80 01 00"),
    ("GetConnectivityParametersRequest", {}, "BF5F 00"),
    ("GetConnectivityParametersResponse", ("connectivityParameters", {"httpParams": h("0102")}),
     "BF5F 06 A0 04 81 02 0102"),
    ("GetConnectivityParametersResponse", ("connectivityParametersError", 1), "BF5F 03 81 01 01"),
    ("IpaeActivationRequest", {"ipaeOption": (b"\x80", 1)}, "BF42 04 80 02 07 80"),
    ("IpaeActivationResponse", {"ipaeActivationResult": 1}, "BF42 03 80 01 01"),
    ("ISDRProprietaryApplicationTemplateIoT", {"euiccConfiguration": (b"\xc0", 2)}, "E1 04 80 02 06 C0"),
    ("SGP32-SetDefaultDpAddressRequest", {"defaultDpAddress": "dp"}, "BF65 04 80 02 6470"),
    ("SGP32-SetDefaultDpAddressResponse", {"setDefaultDpAddressResult": 127}, "BF65 03 80 01 7F"),
    ("GetCertsRequest", {"euiccCiPKId": SKI}, "BF56 16 80 14" + SKI.hex()),
])
def test_es10b_functions(type_name, value, der):
    check(type_name, value, h(der))


def test_profile_rollback_response_carries_the_result_under_one_bf51():
    check("ProfileRollbackResponse", {"cmdResult": 0, "eUICCPackageResult": EPR}, tlv("BF58", h("02 01 00") + EPR_DER))


# --- ESipa messages -----------------------------------------------------------------------------------

SS1 = {"transactionId": TXID, "euiccChallenge": bytes(16), "serverAddress": "dp.test.example",
       "serverChallenge": bytes(range(16))}
SS1_DER = tlv("30", tlv("80", TXID) + tlv("81", bytes(16)) + tlv("83", b"dp.test.example")
              + tlv("84", bytes(range(16))))


def esipa(direction: str, alternative: str, value, der: bytes):
    """The message is the alternative's bare TLV, also when wrapped in EsipaMessageFrom…."""
    check(f"EsipaMessageFrom{direction}", (alternative, value), der)


def test_initiate_authentication(keys):
    req = {"euiccChallenge": bytes(range(16)), "smdpAddress": "dp.test.example",
           "euiccInfo1": {"svn": h("020500"), "euiccCiPKIdListForVerification": [SKI],
                          "euiccCiPKIdListForSigning": [SKI]},
           "eimTransactionId": EIM_TXID}
    req_der = tlv("BF39", tlv("81", bytes(range(16))) + tlv("83", b"dp.test.example")
                  + tlv("BF20", h("82 03 020500") + tlv("A9", tlv("04", SKI)) + tlv("AA", tlv("04", SKI)))
                  + tlv("82", EIM_TXID))
    check("InitiateAuthenticationRequestEsipa", req, req_der)
    esipa("IpaToEim", "initiateAuthenticationRequestEsipa", req, req_der)
    ok = {"transactionId": TXID, "serverSigned1": SS1, "serverSignature1": SIG, "euiccCiPKIdentifierToBeUsed": SKI,
          "serverCertificate": keys["cert"], "matchingId": "MATCH-1",
          "ctxParams1": ("ctxParamsForCommonAuthentication", {"deviceInfo": DEVICE_INFO})}
    ok_der = tlv("BF39", tlv("A0", tlv("80", TXID) + SS1_DER + tlv("5F37", SIG) + tlv("04", SKI) + keys["cert_der"]
                              + tlv("0C", b"MATCH-1") + tlv("A2", tlv("A0", tlv("A1", DEVICE_INFO_DER)))))
    esipa("EimToIpa", "initiateAuthenticationResponseEsipa", ("initiateAuthenticationOkEsipa", ok), ok_der)
    esipa("EimToIpa", "initiateAuthenticationResponseEsipa", ("initiateAuthenticationErrorEsipa", 52),
          h("BF39 03 81 01 34"))


def test_authenticate_client(keys):
    compact = ("compactAuthenticateResponseOk", {
        "signedData": ("compactEuiccSigned1", {"extCardResource": h("810100"), "ctxParams1": CTX1}),
        "euiccSignature1": SIG})
    compact_der = tlv("BF38", tlv("A2", tlv("A0", h("84 03 810100") + tlv("A2", CTX1_DER)) + tlv("5F37", SIG)))
    esipa("IpaToEim", "authenticateClientRequestEsipa", {"transactionId": TXID, "authenticateServerResponse": compact},
          tlv("BF3B", tlv("80", TXID) + compact_der))
    signed1 = {"transactionId": TXID, "serverAddress": "dp.test.example", "serverChallenge": bytes(range(16)),
               "euiccInfo2": EUICC_INFO2, "ctxParams1": CTX1}
    signed1_der = tlv("30", tlv("80", TXID) + tlv("83", b"dp.test.example") + tlv("84", bytes(range(16)))
                      + tlv("BF22", EUICC_INFO2_BODY) + CTX1_DER)
    full = ("authenticateResponseOk", {"euiccSigned1": signed1, "euiccSignature1": SIG,
                                       "euiccCertificate": keys["cert"], "eumCertificate": keys["cert"]})
    full_der = tlv("BF38", tlv("A0", signed1_der + tlv("5F37", SIG) + keys["cert_der"] + keys["cert_der"]))
    esipa("IpaToEim", "authenticateClientRequestEsipa", {"transactionId": TXID, "authenticateServerResponse": full},
          tlv("BF3B", tlv("80", TXID) + full_der))
    # the compact form that keeps the full EuiccSigned1 but leaves the certificates out
    compact_full = ("compactAuthenticateResponseOk", {"signedData": ("euiccSigned1", signed1), "euiccSignature1": SIG,
                                                      "eumCertificate": keys["cert"]})
    check("SGP32-AuthenticateServerResponse", compact_full,
          tlv("BF38", tlv("A2", signed1_der + tlv("5F37", SIG) + tlv("A2", contents(keys["cert_der"])))))
    error = ("authenticateResponseError", {"transactionId": TXID, "authenticateErrorCode": 2})
    error_der = tlv("BF38", tlv("A1", tlv("80", TXID) + h("02 01 02")))
    check("SGP32-AuthenticateClientRequest", {"transactionId": TXID, "authenticateServerResponse": error},
          tlv("BF3B", tlv("80", TXID) + error_der))

    meta = {"iccid": ICCID, "serviceProviderName": "SP", "profileName": "IoT", "profileClass": 2,
            "fallbackAllowed": True}
    ok_dp = {"transactionId": TXID, "profileMetaData": meta,
             "smdpSigned2": {"transactionId": TXID, "ccRequiredFlag": False}, "smdpSignature2": SIG,
             "smdpCertificate": keys["cert"], "hashCc": HASH_CC}
    ok_dp_der = tlv("BF3B", tlv("A0", tlv("80", TXID)
                                + tlv("BF25", tlv("5A", ICCID) + h("91 02") + b"SP" + h("92 03") + b"IoT" + h("9F67 01 FF"))
                                + tlv("30", tlv("80", TXID) + h("01 01 00")) + tlv("5F37", SIG) + keys["cert_der"]
                                + tlv("04", HASH_CC)))
    esipa("EimToIpa", "authenticateClientResponseEsipa", ("authenticateClientOkDPEsipa", ok_dp), ok_dp_der)
    esipa("EimToIpa", "authenticateClientResponseEsipa",
          ("authenticateClientOkDSEsipa", {"transactionId": TXID, "profileDownloadTrigger": TRIGGER}),
          tlv("BF3B", tlv("A1", tlv("80", TXID) + TRIGGER_DER)))
    esipa("EimToIpa", "authenticateClientResponseEsipa", ("authenticateClientErrorEsipa", 8), h("BF3B 03 82 01 08"))


def test_get_bound_profile_package():
    ok = ("downloadResponseOk", {"euiccSigned2": {"transactionId": TXID, "euiccOtpk": OTPK}, "euiccSignature2": SIG})
    esipa("IpaToEim", "getBoundProfilePackageRequestEsipa", {"transactionId": TXID, "prepareDownloadResponse": ok},
          tlv("BF3A", tlv("80", TXID) + tlv("BF21", tlv("A0", tlv("30", tlv("80", TXID) + tlv("5F49", OTPK))
                                                        + tlv("5F37", SIG)))))
    compact = ("compactDownloadResponseOk", {"compactEuiccSigned2": {"euiccOtpk": OTPK}, "euiccSignature2": SIG})
    esipa("IpaToEim", "getBoundProfilePackageRequestEsipa", {"transactionId": TXID, "prepareDownloadResponse": compact},
          tlv("BF3A", tlv("80", TXID) + tlv("BF21", tlv("A2", tlv("30", tlv("5F49", OTPK)) + tlv("5F37", SIG)))))
    bpp = {"initialiseSecureChannelRequest": {"remoteOpId": 1, "transactionId": TXID,
                                              "controlRefTemplate": {"keyType": h("88"), "keyLen": h("10"),
                                                                     "hostId": h("0102")},
                                              "smdpOtpk": OTPK, "smdpSign": SIG},
           "firstSequenceOf87": [h("AA")], "sequenceOf88": [h("BB")], "sequenceOf86": [h("CC"), h("DD")]}
    bpp_der = tlv("BF36", tlv("BF23", h("82 01 01") + tlv("80", TXID) + h("A6 0A 80 01 88 81 01 10 84 02 0102")
                              + tlv("5F49", OTPK) + tlv("5F37", SIG))
                  + h("A0 03 87 01 AA A1 03 88 01 BB A3 06 86 01 CC 86 01 DD"))
    esipa("EimToIpa", "getBoundProfilePackageResponseEsipa",
          ("getBoundProfilePackageOkEsipa", {"transactionId": TXID, "boundProfilePackage": bpp}),
          tlv("BF3A", tlv("A0", tlv("80", TXID) + bpp_der)))
    esipa("EimToIpa", "getBoundProfilePackageResponseEsipa", ("getBoundProfilePackageErrorEsipa", 95),
          h("BF3A 03 81 01 5F"))


def test_cancel_session():
    # automatic tags on an untagged SEQUENCE: 80 txId, and A1 *replacing* the CancelSessionResponse's BF41
    ok = ("cancelSessionResponseOk", {"euiccCancelSessionSigned": {"transactionId": TXID, "smdpOid": "2.999.10",
                                                                   "reason": 1},
                                      "euiccCancelSessionSignature": SIG})
    esipa("IpaToEim", "cancelSessionRequestEsipa", {"transactionId": TXID, "cancelSessionResponse": ok},
          tlv("BF41", tlv("80", TXID) + tlv("A1", tlv("A0", tlv("30", tlv("80", TXID) + tlv("81", OID_2_999_10)
                                                                + h("82 01 01")) + tlv("5F37", SIG)))))
    compact = ("compactCancelSessionResponseOk", {"compactEuiccCancelSessionSigned": {"reason": 0},
                                                  "euiccCancelSessionSignature": SIG})
    esipa("IpaToEim", "cancelSessionRequestEsipa", {"transactionId": TXID, "cancelSessionResponse": compact},
          tlv("BF41", tlv("80", TXID) + tlv("A1", tlv("A2", h("30 03 80 01 00") + tlv("5F37", SIG)))))
    esipa("IpaToEim", "cancelSessionRequestEsipa",
          {"transactionId": TXID, "cancelSessionResponse": ("cancelSessionResponseError", 5)},
          tlv("BF41", tlv("80", TXID) + h("A1 03 81 01 05")))
    esipa("EimToIpa", "cancelSessionResponseEsipa", ("cancelSessionOk", {}), h("BF41 02 A0 00"))
    esipa("EimToIpa", "cancelSessionResponseEsipa", ("cancelSessionError", 1), h("BF41 03 81 01 01"))


def test_handle_notification():
    # pendingNotification [0] stands before an untagged CHOICE: explicit, A0 around BF37 / A1 / 30
    esipa("IpaToEim", "handleNotificationEsipa", ("pendingNotification", ("profileInstallationResult", PIR)),
          tlv("BF3D", tlv("A0", PIR_DER)))
    esipa("IpaToEim", "handleNotificationEsipa", ("pendingNotification", COMPACT_OTHER),
          tlv("BF3D", tlv("A0", COMPACT_OTHER_DER)))
    esipa("IpaToEim", "handleNotificationEsipa",
          ("provideEimPackageResult", {"eidValue": EID, "eimPackageResult": ("euiccPackageResult", EPR)}),
          tlv("BF3D", tlv("BF50", tlv("5A", EID) + EPR_DER)))


def test_get_eim_package():
    esipa("IpaToEim", "getEimPackageRequest", {"eidValue": EID}, tlv("BF4F", tlv("5A", EID)))
    esipa("IpaToEim", "getEimPackageRequest", {"eidValue": EID, "notifyStateChange": None, "stateChangeCause": 1,
                                               "rPLMN": h("62F210")},
          tlv("BF4F", tlv("5A", EID) + h("80 00 81 01 01 82 03 62F210")))
    esipa("EimToIpa", "getEimPackageResponse", ("euiccPackageRequest", PACKAGE), tlv("BF4F", PACKAGE_DER))
    esipa("EimToIpa", "getEimPackageResponse", ("ipaEuiccDataRequest", AUDIT), tlv("BF4F", AUDIT_DER))
    esipa("EimToIpa", "getEimPackageResponse", ("profileDownloadTriggerRequest", TRIGGER), tlv("BF4F", TRIGGER_DER))
    # what a conforming eIM sends when it has nothing: BF4F 03 02 01 01 (not BF4F 05 BF4F 03 ...)
    esipa("EimToIpa", "getEimPackageResponse", ("eimPackageError", 1), h("BF4F 03 02 01 01"))
    check("GetEimPackageResponse", ("eimPackageError", 2), h("BF4F 03 02 01 02"))


def test_provide_eim_package_result():
    epr_and_notifs = ("ePRAndNotifications", {"euiccPackageResult": EPR, "notificationList": [COMPACT_OTHER]})
    cases = [
        ({"eidValue": EID, "eimPackageResult": ("euiccPackageResult", EPR)}, tlv("5A", EID) + EPR_DER),
        ({"eimPackageResult": ("euiccPackageResult", EPR)}, EPR_DER),
        ({"eidValue": EID, "eimPackageResult": epr_and_notifs},
         tlv("5A", EID) + tlv("30", EPR_DER + tlv("A0", COMPACT_OTHER_DER))),
        ({"eimPackageResult": ("ipaEuiccDataResponse", ("ipaEuiccData", {"defaultSmdpAddress": "dp"}))},
         h("BF52 06 A0 04 81 02 6470")),
        ({"eimPackageResult": ("profileDownloadTriggerResult",
                               {"eimTransactionId": EIM_TXID,
                                "profileDownloadTriggerResultData": ("profileInstallationResult", PIR)})},
         tlv("BF54", tlv("82", EIM_TXID) + PIR_DER)),
        ({"eidValue": EID, "eimPackageResult": ("eimPackageResultResponseError",
                                                {"eimTransactionId": EIM_TXID, "eimPackageResultErrorCode": 1})},
         tlv("5A", EID) + tlv("A0", tlv("80", EIM_TXID) + h("02 01 01"))),
    ]
    for value, body in cases:
        check("ProvideEimPackageResult", value, tlv("BF50", body))
        esipa("IpaToEim", "provideEimPackageResult", value, tlv("BF50", body))
    esipa("EimToIpa", "provideEimPackageResultResponse", ("eimAcknowledgements", [4]), h("BF50 06 BF53 03 80 01 04"))
    esipa("EimToIpa", "provideEimPackageResultResponse", ("emptyResponse", {}), h("BF50 02 30 00"))
    esipa("EimToIpa", "provideEimPackageResultResponse", ("provideEimPackageResultError", 2), h("BF50 03 02 01 02"))


def test_transfer_eim_package():
    esipa("EimToIpa", "transferEimPackageRequest", ("euiccPackageRequest", PACKAGE), tlv("BF4E", PACKAGE_DER))
    esipa("EimToIpa", "transferEimPackageRequest", ("ipaEuiccDataRequest", AUDIT), tlv("BF4E", AUDIT_DER))
    esipa("EimToIpa", "transferEimPackageRequest", ("eimAcknowledgements", [4, 5]), h("BF4E 09 BF53 06 80 01 04 80 01 05"))
    esipa("EimToIpa", "transferEimPackageRequest", ("profileDownloadTriggerRequest", TRIGGER), tlv("BF4E", TRIGGER_DER))
    esipa("IpaToEim", "transferEimPackageResponse", ("euiccPackageResult", EPR), tlv("BF4E", EPR_DER))
    esipa("IpaToEim", "transferEimPackageResponse",
          ("ePRAndNotifications", {"euiccPackageResult": EPR, "notificationList": []}),
          tlv("BF4E", tlv("30", EPR_DER + h("A0 00"))))
    esipa("IpaToEim", "transferEimPackageResponse",
          ("ipaEuiccDataResponse", ("ipaEuiccDataResponseError", {"ipaEuiccDataErrorCode": 5})),
          h("BF4E 08 BF52 05 A1 03 02 01 05"))
    esipa("IpaToEim", "transferEimPackageResponse", ("eimPackageReceived", None), h("BF4E 02 05 00"))
    esipa("IpaToEim", "transferEimPackageResponse", ("eimPackageError", 2), h("BF4E 03 02 01 02"))


# --- every tag in front of a tagged CHOICE is implicit ----------------------------------------------------

ERR_UNSIGNED = ("euiccPackageErrorUnsigned", {"eimId": "e"})
ERR_UNSIGNED_DER = h("BF51 05 A2 03 80 01 65")


@pytest.mark.parametrize("type_name, value, der", [
    ("EuiccResultData", ("listProfileInfoResult", ("profileInfoListError", 1)), "BF2D 03 81 01 01"),
    ("ProfileRollbackResponse", {"cmdResult": 0, "eUICCPackageResult": ERR_UNSIGNED},
     "BF58 0B 02 01 00" + ERR_UNSIGNED_DER.hex()),
    ("SGP32-AuthenticateClientRequest", {"transactionId": b"\x01", "authenticateServerResponse":
                                         ("authenticateResponseError", {"transactionId": b"\x01",
                                                                        "authenticateErrorCode": 7})},
     "BF3B 0E 80 01 01 BF38 08 A1 06 80 01 01 02 01 07"),
    ("AuthenticateClientRequestEsipa", {"transactionId": b"\x01", "authenticateServerResponse":
                                        ("authenticateResponseError", {"transactionId": b"\x01",
                                                                       "authenticateErrorCode": 7})},
     "BF3B 0E 80 01 01 BF38 08 A1 06 80 01 01 02 01 07"),
    ("GetBoundProfilePackageRequestEsipa", {"transactionId": b"\x01", "prepareDownloadResponse":
                                            ("downloadResponseError", {"transactionId": b"\x01",
                                                                       "downloadErrorCode": 5})},
     "BF3A 0E 80 01 01 BF21 08 A1 06 80 01 01 02 01 05"),
    ("CancelSessionRequestEsipa", {"transactionId": b"\x01",
                                   "cancelSessionResponse": ("cancelSessionResponseError", 127)},
     "BF41 08 80 01 01 A1 03 81 01 7F"),
    ("EsipaMessageFromIpaToEim", ("handleNotificationEsipa", ("provideEimPackageResult",
                                                              {"eimPackageResult": ("euiccPackageResult",
                                                                                    ERR_UNSIGNED)})),
     "BF3D 0B BF50 08" + ERR_UNSIGNED_DER.hex()),
    ("EsipaMessageFromIpaToEim", ("transferEimPackageResponse", ("eimPackageReceived", None)), "BF4E 02 05 00"),
    ("EsipaMessageFromEimToIpa", ("initiateAuthenticationResponseEsipa", ("initiateAuthenticationErrorEsipa", 1)),
     "BF39 03 81 01 01"),
    ("EsipaMessageFromEimToIpa", ("authenticateClientResponseEsipa", ("authenticateClientErrorEsipa", 8)),
     "BF3B 03 82 01 08"),
    ("EsipaMessageFromEimToIpa", ("getBoundProfilePackageResponseEsipa", ("getBoundProfilePackageErrorEsipa", 95)),
     "BF3A 03 81 01 5F"),
    ("EsipaMessageFromEimToIpa", ("cancelSessionResponseEsipa", ("cancelSessionOk", {})), "BF41 02 A0 00"),
    ("EsipaMessageFromEimToIpa", ("transferEimPackageRequest", ("eimAcknowledgements", [])), "BF4E 03 BF53 00"),
    ("EsipaMessageFromEimToIpa", ("getEimPackageResponse", ("eimPackageError", 127)), "BF4F 03 02 01 7F"),
    ("EsipaMessageFromEimToIpa", ("provideEimPackageResultResponse", ("emptyResponse", {})), "BF50 02 30 00"),
    ("ProvideEimPackageResult", {"eimPackageResult": ("euiccPackageResult", ERR_UNSIGNED)},
     "BF50 08" + ERR_UNSIGNED_DER.hex()),
    ("ProvideEimPackageResult", {"eimPackageResult": ("ePRAndNotifications", {"euiccPackageResult": ERR_UNSIGNED,
                                                                              "notificationList": []})},
     "BF50 0C 30 0A" + ERR_UNSIGNED_DER.hex() + "A0 00"),
    ("ProvideEimPackageResult", {"eimPackageResult": ("ipaEuiccDataResponse", ("ipaEuiccData", {}))},
     "BF50 05 BF52 02 A0 00"),
    ("TransferEimPackageResponse", ("euiccPackageResult", ERR_UNSIGNED), "BF4E 08" + ERR_UNSIGNED_DER.hex()),
    ("TransferEimPackageResponse", ("ePRAndNotifications", {"euiccPackageResult": ERR_UNSIGNED,
                                                            "notificationList": []}),
     "BF4E 0C 30 0A" + ERR_UNSIGNED_DER.hex() + "A0 00"),
    ("TransferEimPackageResponse", ("ipaEuiccDataResponse", ("ipaEuiccData", {})), "BF4E 05 BF52 02 A0 00"),
])
def test_a_tag_before_a_tagged_choice_is_implicit(type_name, value, der):
    check(type_name, value, h(der))


@pytest.mark.parametrize("type_name, doubled", [
    ("EsipaMessageFromEimToIpa", "BF4F 05 BF4F 03 02 01 01"),         # what asn1tools would emit unaided
    ("CancelSessionRequestEsipa", "BF41 0B 80 01 01 A1 06 BF41 03 81 01 7F"),
    ("ProvideEimPackageResult", "BF50 0B BF51 08 BF51 05 A2 03 80 01 65"),
])
def test_the_doubled_tag_form_is_refused(type_name, doubled):
    with pytest.raises(ProtocolError):
        codec.decode(type_name, h(doubled))


# --- v1.0 wire forms (sgp32v10.asn) -------------------------------------------------------------------

def test_v10_get_eim_package_request_rplmn_is_81():
    value = {"eidValue": EID, "notifyStateChange": None, "rPLMN": h("62F210")}
    der = tlv("BF4F", tlv("5A", EID) + h("80 00 81 03 62F210"))
    check("GetEimPackageRequestV10", value, der)
    check("EsipaMessageFromIpaToEimV10", ("getEimPackageRequest", value), der)
    # read as v1.2, the same bytes are a stateChangeCause: why the eIM must know the version
    assert codec.decode("GetEimPackageRequest", der)["stateChangeCause"] == 0x62F210


def test_v10_provide_eim_package_result_and_response():
    check("ProvideEimPackageResultV10", ("euiccPackageResult", EPR), tlv("BF50", EPR_DER))   # = v1.2 without EID
    assert codec.encode("ProvideEimPackageResult", {"eimPackageResult": ("euiccPackageResult", EPR)}) == \
        tlv("BF50", EPR_DER)
    check("ProvideEimPackageResultV10", ("eimPackageError", 1), h("BF50 03 02 01 01"))        # v1.2: A0 03 02 01 01
    check("ProvideEimPackageResultV10",
          ("ePRAndNotifications", {"euiccPackageResult": EPR, "notificationList": ("notificationList", [COMPACT_OTHER])}),
          tlv("BF50", tlv("30", EPR_DER + tlv("BF2B", tlv("A0", COMPACT_OTHER_DER)))))
    check("ProvideEimPackageResultV10",
          ("profileDownloadTriggerResult", {"profileDownloadTriggerResultData":
                                            ("profileDownloadError", {"errorResponse": h("BF3B 03 82 01 08")})}),
          h("BF50 0D BF54 0A 30 08 80 06 BF3B03820108"))
    check("ProvideEimPackageResultV10",
          ("ipaEuiccDataResponse", ("ipaEuiccData", {"defaultSmdpAddress": "dp",
                                                     "notificationsList": ("notificationList", [])})),
          h("BF50 0E BF52 0B A0 09 80 02 6470 BF2B 02 A0 00"))
    check("ProvideEimPackageResultV10", ("ipaEuiccDataResponse", ("ipaEuiccDataError", 1)), h("BF50 06 BF52 03 81 01 01"))
    check("EsipaMessageFromIpaToEimV10", ("provideEimPackageResult", ("eimPackageError", 2)), h("BF50 03 02 01 02"))
    check("ProvideEimPackageResultResponseV10", {}, h("BF50 00"))                           # v1.2: BF50 02 30 00
    check("EsipaMessageFromEimToIpaV10", ("provideEimPackageResultResponse", {"eimAcknowledgements": [4]}),
          h("BF50 06 BF53 03 80 01 04"))


def test_v10_handle_notification_uses_automatic_tags():
    check("EsipaMessageFromIpaToEimV10", ("handleNotificationEsipa", ("provideEimPackageResult",
                                                                      ("euiccPackageResult", EPR))),
          tlv("BF3D", tlv("A1", EPR_DER)))                                                     # v1.2: BF3D BF50 BF51
    check("HandleNotificationEsipaV10", ("pendingNotification", ("profileInstallationResult", PIR)),
          tlv("BF3D", tlv("A0", PIR_DER)))                                                     # same as v1.2


def test_v10_ipa_euicc_data_request_and_enable_using_dd():
    value = {"tagList": h("80 BF20"), "euiccCiPKId": SKI, "searchCriteria": ("euiccPackageResults", None)}
    der = tlv("BF52", h("5C 03 80 BF20") + tlv("04", SKI) + h("A1 02 82 00"))
    check("IpaEuiccDataRequestV10", value, der)
    check("EsipaMessageFromEimToIpaV10", ("getEimPackageResponse", ("ipaEuiccDataRequest", value)), tlv("BF4F", der))
    check("EsipaMessageFromEimToIpaV10", ("transferEimPackageRequest", ("ipaEuiccDataRequest", value)), tlv("BF4E", der))
    check("EnableUsingDDRequest", {}, h("BF5A 00"))
    check("EnableUsingDDResponse", {"enableUsingDDResult": 1}, h("BF5A 03 80 01 01"))
