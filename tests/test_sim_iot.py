"""The simulated eUICC in IoT mode (SGP.32 v1.2, agent/sim/iot.py, docs/protocol.md §7).

Every ES10b function is driven through ``Isdr.handle`` with DER bytes (no I/O), with real
keys: a test PKI (CI, EUM, eUICC) and an eIM key whose certificate that CI signed.  One
test runs ``esim-agent sim modem --iot`` on a real pseudo-terminal and checks that the
SGP.22 commands (chip info, profile list, enable) still work against it.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from agent import codec, crypto, esep, tlv
from agent.errors import AgentError
from agent.es10 import bits_set
from agent.ids import eid_to_bytes, iccid_from_bytes, iccid_to_bytes
from agent.sim import pki as pki_mod
from agent.sim.euicc import SimEuicc
from agent.sim.isdr import SwError
from agent.sim.state import EPR_OPERATION, load_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIM_ID = "esim-agent-eim"


# --- fixtures and helpers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return pki_mod.make_pki(tmp_path_factory.mktemp("pki"))


def _eim_cert(pki, key) -> x509.Certificate:
    """An eIM signing certificate issued by the test CI."""
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "esim-agent test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "test eIM")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(pki.ci.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier(crypto.ski(pki.ci.cert), None, None), critical=False)
            .sign(pki.ci.key, hashes.SHA256()))


@pytest.fixture(scope="module")
def eim(pki):
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _eim_cert(pki, key)


def eim_config(pki, cert=None, *, eim_id=EIM_ID, token=None, counter=None, ci_pkid=None, spki_key=None,
               with_key=True) -> bytes:
    """EimConfigurationData DER, built field by field (tags: asn1/sgp32.asn)."""
    body = tlv.encode(0x80, eim_id.encode()) + tlv.encode(0x81, b"127.0.0.1:8443") + tlv.encode(0x82, b"\x02")
    if counter is not None:
        body += tlv.encode(0x83, esep._int_content(counter))
    if token is not None:
        body += tlv.encode(0x84, esep._int_content(token))
    if with_key:
        if spki_key is not None:
            spki = spki_key.public_key().public_bytes(serialization.Encoding.DER,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
            body += tlv.encode(0xA5, tlv.encode(0xA0, tlv.parse_single(spki).value))
        else:
            body += tlv.encode(0xA5, tlv.encode(0xA1, tlv.parse_single(crypto.cert_der(cert)).value))
    body += tlv.encode(0x87, b"\x07\x80")                             # eimRetrieveHttps
    body += tlv.encode(0x88, ci_pkid if ci_pkid is not None else pki.ci_pkid)
    return tlv.encode(0x30, body)


def add_initial(isdr, *configs) -> tuple:
    req = tlv.encode(0xBF57, tlv.encode(0xA0, b"".join(configs)))
    return codec.decode("AddInitialEimResponse", isdr.handle(req))


@pytest.fixture
def card(tmp_path, pki):
    return SimEuicc.open(tmp_path / "iot.json", preload=3, pki_dir=pki.directory, iot=True)


@pytest.fixture
def bound(card, pki, eim):
    """An IoT card with the test eIM associated (no association token)."""
    assert add_initial(card.isdr, eim_config(pki, eim[1])) == ("addInitialEimOk", [("addOk", None)])
    return card


class Eim:
    """Signs packages for one card, counting up."""

    def __init__(self, card, key, *, eim_id=EIM_ID, token=None):
        self.card, self.key, self.eim_id, self.token = card, key, eim_id, token
        self.counter = 0

    def package(self, ops, *, kind="psmoList", counter=None, eid=None, txid=b"\x01\x02", key=None) -> bytes:
        if counter is None:
            self.counter += 1
            counter = self.counter
        return esep.build_package_request(key or self.key, eim_id=self.eim_id, eid=eid or self.card.eid,
                                          counter=counter, operations=ops, kind=kind, transaction_id=txid,
                                          association_token=self.token)

    def run(self, ops, **kw) -> esep.PackageResult:
        res = esep.decode_package_result(self.card.isdr.handle(self.package(ops, **kw)))
        if res.signed_der is not None:
            assert res.verify(self.card.state.identity.euicc_cert, association_token=self.token)
        return res


def iccids(card) -> list[str]:
    return [p.iccid for p in card.state.profiles]


def enabled(card) -> str | None:
    p = card.state.enabled_profile()
    return p.iccid if p else None


def ic(iccid: str) -> bytes:
    return iccid_to_bytes(iccid)


def es10(card, type_name: str, value, response_type: str):
    return codec.decode(response_type, card.isdr.handle(codec.encode(type_name, value)))


def retrieve(card, criteria=None) -> tuple[str, list[bytes]]:
    """RetrieveNotificationsList → (alternative, [raw DER of each item])."""
    req = codec.encode("SGP32-RetrieveNotificationsListRequest",
                       {} if criteria is None else {"searchCriteria": criteria})
    outer = tlv.parse_single(card.isdr.handle(req))
    inner = tlv.children(outer)[0]
    return {0xA0: "notificationList", 0xA2: "euiccPackageResultList"}[inner.tag], \
        [k.raw for k in tlv.children(inner)]


def remove(card, seq: int) -> int:
    return es10(card, "NotificationSentRequest", {"seqNumber": seq}, "NotificationSentResponse")[
        "deleteNotificationStatus"]


# --- what an IoT card reports -----------------------------------------------------------

def test_iot_euicc_info2_fci_and_sgp22_view(card, tmp_path, pki):
    raw = card.isdr.handle(bytes.fromhex("BF2200"))
    info = codec.decode("SGP32-EUICCInfo2", raw)
    assert info["ipaMode"] == 0                                          # ipad
    assert info["iotSpecificInfo"]["iotVersion"] == [bytes([1, 2, 0])]
    assert "fallbackSupported" in info["iotSpecificInfo"]
    # an SGP.22 decoder (extensible EUICCInfo2) reads the same bytes
    assert codec.decode("EUICCInfo2", raw)["svn"] == info["svn"]
    fci = tlv.parse_single(card.isdr.fci())
    e1 = tlv.find(tlv.children(fci), 0xE1)
    v = codec.decode("ISDRProprietaryApplicationTemplateIoT", e1.raw)
    assert bits_set(v["euiccConfiguration"]) == [1]                      # a profile is enabled, no IPAe
    plain = SimEuicc.open(tmp_path / "sgp22.json", preload=1, pki_dir=pki.directory)
    assert tlv.find(tlv.children(tlv.parse_single(plain.isdr.fci())), 0xE1) is None
    assert "ipaMode" not in codec.decode("SGP32-EUICCInfo2", plain.isdr.handle(bytes.fromhex("BF2200")))
    with pytest.raises(SwError) as e:                                    # no SGP.32 functions on it
        plain.isdr.handle(tlv.encode(0xBF57, tlv.encode(0xA0, b"")))
    assert e.value.sw == 0x6A88


def test_iot_flag_persists_and_old_state_files_load(tmp_path, pki, eim):
    path = tmp_path / "card.json"
    plain = SimEuicc.open(path, preload=1, pki_dir=pki.directory)
    doc = json.loads(path.read_text())
    for k in ("iot", "eims", "esipa_version", "rollback", "fallback_return", "immediate_enable"):
        doc.pop(k, None)
    for p in doc["profiles"]:
        p.pop("fallback", None)
        p.pop("fallback_allowed", None)
    path.write_text(json.dumps(doc))                                     # a file from before SGP.32
    old = load_state(path)
    assert old.iot is False and old.eims == [] and old.profiles[0].fallback is False
    assert old.eid == plain.eid
    card = SimEuicc.open(path, iot=True)                                 # --iot turns it into an IoT card
    assert card.state.iot and card.isdr.iot is not None
    add_initial(card.isdr, eim_config(pki, eim[1], token=0))
    again = SimEuicc.open(path)                                          # and it stays one, with its eIM
    assert again.state.iot and again.state.eims[0].eim_id == EIM_ID
    assert again.state.eims[0].association_token == 1
    doc = json.loads(path.read_text())
    doc["esipa_version"] = "2.0"
    path.write_text(json.dumps(doc))
    with pytest.raises(AgentError) as e:
        load_state(path)
    assert e.value.code == "sim_state_corrupt"


# --- AddInitialEim, GetEimConfigurationData, GetCerts --------------------------------------

def test_add_initial_eim_and_get_configuration(card, pki, eim):
    other = ec.generate_private_key(ec.SECP256R1())
    cfg1 = eim_config(pki, eim[1], token=0)
    cfg2 = eim_config(pki, eim_id="second-eim", spki_key=other)
    assert add_initial(card.isdr, cfg1, cfg2) == ("addInitialEimOk", [("associationToken", 1), ("addOk", None)])
    # only the first association is unsigned
    assert add_initial(card.isdr, eim_config(pki, eim[1], eim_id="x")) == ("addInitialEimError", 2)
    got = codec.decode("GetEimConfigurationDataResponse", card.isdr.handle(bytes.fromhex("BF5500")))
    lst = got["eimConfigurationDataList"]
    assert [c["eimId"] for c in lst] == [EIM_ID, "second-eim"]
    assert lst[0]["associationToken"] == 1 and "associationToken" not in lst[1]
    assert lst[0]["eimPublicKeyData"][0] == "eimCertificate" and lst[1]["eimPublicKeyData"][0] == "eimPublicKey"
    # the stored config is the one sent, with the card's token in place of the placeholder
    assert tlv.find(tlv.children(tlv.parse_single(card.state.eims[1].config_der)), 0x80).value == b"second-eim"
    only = codec.decode("GetEimConfigurationDataResponse", card.isdr.handle(codec.encode(
        "GetEimConfigurationDataRequest", {"searchCriteria": ("eimId", "second-eim")})))
    assert [c["eimId"] for c in only["eimConfigurationDataList"]] == ["second-eim"]


@pytest.mark.parametrize("case,code", [
    ("unknown_ci", 3), ("counter_too_big", 6), ("no_key", 7), ("duplicate", 7), ("empty", 7), ("too_many", 1),
    ("non_ec_key", 7)])
def test_add_initial_eim_errors(card, pki, eim, case, code):
    cert = eim[1]
    configs = {
        "unknown_ci": [eim_config(pki, cert, ci_pkid=b"\x11" * 20)],
        "counter_too_big": [eim_config(pki, cert, counter=esep.COUNTER_MAX + 1)],
        "no_key": [eim_config(pki, cert, with_key=False)],
        "duplicate": [eim_config(pki, cert), eim_config(pki, cert)],
        "empty": [],
        "too_many": [eim_config(pki, cert, eim_id=f"e{i}") for i in range(9)],
        "non_ec_key": [eim_config(pki, spki_key=ed25519.Ed25519PrivateKey.generate())],
    }[case]
    assert add_initial(card.isdr, *configs) == ("addInitialEimError", code)
    assert card.state.eims == []                                         # nothing half-stored


def test_add_initial_eim_malformed_is_a_card_refusal(card):
    with pytest.raises(SwError) as e:
        card.isdr.handle(bytes.fromhex("BF5703A00104"))
    assert e.value.sw == 0x6A80


def test_get_certs(card, pki):
    for req in (bytes.fromhex("BF5600"), codec.encode("GetCertsRequest", {"euiccCiPKId": pki.ci_pkid})):
        kind, v = codec.decode("GetCertsResponse", card.isdr.handle(req))
        assert kind == "certs"
        raw = tlv.children(tlv.children(tlv.parse_single(card.isdr.handle(req)))[0])
        assert tlv.encode(0x30, raw[1].value) == card.state.identity.euicc_cert_der
        eum = crypto.load_cert(tlv.encode(0x30, raw[0].value))
        assert crypto.verify_issued_by(crypto.load_cert(tlv.encode(0x30, raw[1].value)), eum)
    bad = codec.encode("GetCertsRequest", {"euiccCiPKId": b"\x22" * 20})
    assert codec.decode("GetCertsResponse", card.isdr.handle(bad)) == ("getCertsError", 1)


# --- LoadEuiccPackage: the checks -----------------------------------------------------------

def test_package_from_unknown_eim_or_bad_signature_is_unsigned_error(card, pki, eim):
    e = Eim(card, eim[0])
    r = e.run([("listProfileInfo", {})])                                 # no eIM associated yet
    assert r.kind == "euiccPackageErrorUnsigned" and r.eim_id == EIM_ID and r.transaction_id == b"\x01\x02"
    add_initial(card.isdr, eim_config(pki, eim[1]))
    r = e.run([("listProfileInfo", {})], key=ec.generate_private_key(ec.SECP256R1()))
    assert r.kind == "euiccPackageErrorUnsigned"
    assert card.state.eims[0].counter == 0                               # nothing accepted
    assert e.run([("listProfileInfo", {})], counter=1).ok


def test_association_token_is_part_of_the_signature(card, pki, eim):
    add_initial(card.isdr, eim_config(pki, eim[1], token=0))
    token = card.state.eims[0].association_token
    r = Eim(card, eim[0]).run([("getRAT", {})])                          # signed without the token
    assert r.kind == "euiccPackageErrorUnsigned" and r.association_token == token
    r = Eim(card, eim[0], token=token).run([("getRAT", {})])
    assert r.ok and r.verify(card.state.identity.euicc_cert, association_token=token)
    assert not r.verify(card.state.identity.euicc_cert, association_token=None)


def test_package_eid_replay_and_counter_range(bound, eim):
    e = Eim(bound, eim[0])
    r = e.run([("getRAT", {})], eid="89049032123451234512345678901235")
    assert r.kind == "euiccPackageErrorSigned" and r.error == esep.INVALID_EID
    assert e.run([("getRAT", {})], counter=5).ok
    for c in (5, 4, 0, -1):
        r = e.run([("getRAT", {})], counter=c)
        assert r.kind == "euiccPackageErrorSigned" and r.error == esep.REPLAY_ERROR and r.counter == c
    r = e.run([("getRAT", {})], counter=esep.COUNTER_MAX + 1)
    assert r.error == esep.COUNTER_OUT_OF_RANGE
    assert bound.state.eims[0].counter == 5
    assert e.run([("getRAT", {})], counter=esep.COUNTER_MAX).ok
    # signed errors are answers only: not kept as notifications
    assert sum(n.operation == EPR_OPERATION for n in bound.state.notifications) == 2


def _hand_made_package(eim_id: bytes, eid: bytes, txid: bytes) -> bytes:
    """A BF51 whose fields break the SIZE constraints (an encoder would refuse to make it)."""
    signed = tlv.encode(0x30, tlv.encode(0x80, eim_id) + tlv.encode(0x5A, eid) + tlv.encode(0x81, b"\x05")
                        + tlv.encode(0x82, txid) + tlv.encode(0xA0, tlv.encode(0xA6, b"")))
    return tlv.encode(0xBF51, signed + tlv.encode(0x5F37, bytes(64)))


def test_malformed_package_is_a_card_refusal(bound, eim):
    good = Eim(bound, eim[0]).package([("getRAT", {})])
    eid = eid_to_bytes(bound.eid)
    for bad in (good[:-3], bytes.fromhex("BF5100"), tlv.encode(0xBF51, tlv.encode(0x30, b"")),
                _hand_made_package(b"x" * 129, eid, b"\x01"), _hand_made_package(b"", eid, b"\x01"),
                _hand_made_package(b"e", eid[:15], b"\x01"), _hand_made_package(b"e", eid, bytes(17))):
        with pytest.raises(SwError):
            bound.isdr.handle(bad)


# --- PSMOs ------------------------------------------------------------------------------------

def test_psmo_enable_disable_delete_and_the_modem_hook(bound, eim):
    a, b, c = iccids(bound)
    seen = []
    bound.on_profile_change = seen.append
    e = Eim(bound, eim[0])
    r = e.run([("enable", {"iccid": ic(b)})])
    assert r.results == [("enableResult", 0)] and enabled(bound) == b and seen == [b]
    assert bound.isdr.last_refresh_flag is True
    r = e.run([("enable", {"iccid": ic(b)}), ("disable", {"iccid": ic(b)})])
    # the first fails (already enabled): the rest is not run
    assert r.results == [("enableResult", 2), ("processingTerminated", 3)] and enabled(bound) == b
    r = e.run([("delete", {"iccid": ic(b)})])
    assert r.results == [("deleteResult", 2)]                            # profileNotInDisabledState
    r = e.run([("disable", {"iccid": ic(b)}), ("delete", {"iccid": ic(b)}), ("delete", {"iccid": ic(b)})])
    assert r.results == [("disableResult", 0), ("deleteResult", 0), ("deleteResult", 1)]
    assert enabled(bound) is None and iccids(bound) == [a, c] and seen == [b, None]
    r = e.run([("disable", {"iccid": ic(a)}), ("enable", {"iccid": ic("8949000000000000001")})])
    assert r.results == [("disableResult", 2), ("processingTerminated", 3)]
    bound.isdr.cat_busy = True
    assert e.run([("enable", {"iccid": ic(a)})]).results == [("enableResult", 5)]
    bound.isdr.cat_busy = False
    # the SGP.22 notifications of the PSMOs' changes are there too, signed as ES10c's
    ops = [n.operation for n in bound.state.notifications if n.operation != EPR_OPERATION]
    assert ops == ["disable", "enable", "disable", "delete"]


def test_psmo_policy_rules(bound, eim):
    a, b, _ = iccids(bound)
    bound.state.find_iccid(a).ppr = [1]                                  # PPR1: the enabled one stays
    bound.state.find_iccid(b).ppr = [2]                                  # PPR2: never deleted
    e = Eim(bound, eim[0])
    assert e.run([("enable", {"iccid": ic(b)})]).results == [("enableResult", 3)]
    assert e.run([("disable", {"iccid": ic(a)})]).results == [("disableResult", 3)]
    assert e.run([("delete", {"iccid": ic(b)})]).results == [("deleteResult", 3)]


def test_psmo_list_rat_immediate_config_default_dp(bound, eim):
    a, *_ = iccids(bound)
    e = Eim(bound, eim[0])
    r = e.run([("listProfileInfo", {}), ("getRAT", {}),
               ("configureImmediateEnable", {"immediateEnableFlag": None, "defaultSmdpOid": "2.999.10",
                                             "defaultSmdpAddress": "smdp.example.org"}),
               ("setDefaultDpAddress", {"defaultDpAddress": "dp.example.net"}),
               ("listProfileInfo", {"searchCriteria": ("iccid", ic(a)), "tagList": bytes.fromhex("5A9F70")})])
    (n1, lst), (n2, rat), (n3, cie), (n4, dp), (n5, one) = r.results
    assert (n1, n2, n3, n4, n5) == ("listProfileInfoResult", "getRATResult", "configureImmediateEnableResult",
                                    "setDefaultDpAddressResult", "listProfileInfoResult")
    assert lst[0] == "profileInfoListOk" and [iccid_from_bytes(p["iccid"]) for p in lst[1]] == iccids(bound)
    assert rat[0]["allowedOperators"] == [{"mccMnc": b"\xee\xee\xee"}]
    assert cie == 0 and dp == {"setDefaultDpAddressResult": 0}
    assert one == ("profileInfoListOk", [{"iccid": ic(a), "profileState": 1, "fallbackAttribute": False}])
    assert bound.state.immediate_enable == {"flag": True, "smdp_oid": "2.999.10", "smdp_address": "smdp.example.org"}
    assert bound.state.default_dp_address == "dp.example.net"
    r = e.run([("listProfileInfo", {"tagList": b"\x9f"}), ("getRAT", {})])
    assert r.results == [("listProfileInfoResult", ("profileInfoListError", 1)), ("processingTerminated", 3)]


def test_eprs_are_kept_until_removed_and_found_by_the_sgp32_criteria(bound, eim):
    _, b, _ = iccids(bound)
    e = Eim(bound, eim[0])
    r1 = e.run([("getRAT", {})])
    r2 = e.run([("enable", {"iccid": ic(b)})])
    assert r2.seq_number > r1.seq_number
    kind, items = retrieve(bound, ("euiccPackageResults", None))
    assert kind == "euiccPackageResultList" and items == [r1.der, r2.der]
    assert retrieve(bound, ("seqNumber", r2.seq_number)) == ("euiccPackageResultList", [r2.der])
    # SGP.22 views: the plain list, the PMO filter and ListNotification skip the EPRs
    kind, notes = retrieve(bound)
    assert kind == "notificationList" and len(notes) == 2
    assert all(codec.decode("SGP32-PendingNotification", n)[0] == "otherSignedNotification" for n in notes)
    enable_note = [n for n in bound.state.notifications if n.operation == "enable"][0]
    assert retrieve(bound, ("seqNumber", enable_note.seq)) == ("notificationList", [enable_note.der_bytes])
    kind, only = retrieve(bound, ("profileManagementOperation", (b"\x40", 2)))    # notificationEnable
    assert only == [enable_note.der_bytes]
    listed = codec.decode("ListNotificationResponse", bound.isdr.handle(bytes.fromhex("BF2800")))[1]
    assert sorted(m["seqNumber"] for m in listed) == sorted(
        n.seq for n in bound.state.notifications if n.operation != EPR_OPERATION)
    # what an SGP.22 LPA decodes: RetrieveNotificationsListResponse with the notifications only
    kind, sgp22 = codec.decode("RetrieveNotificationsListResponse", bound.isdr.handle(bytes.fromhex("BF2B00")))
    assert kind == "notificationList" and len(sgp22) == 2
    assert remove(bound, r1.seq_number) == 0 and remove(bound, r1.seq_number) == 1
    assert retrieve(bound, ("euiccPackageResults", None))[1] == [r2.der]
    assert retrieve(bound, ("seqNumber", 999)) == ("notificationList", [])


def test_epr_signature_v10_input_is_selectable(bound, eim):
    bound.state.esipa_version = "1.0"
    e = Eim(bound, eim[0])
    req = e.package([("getRAT", {})])
    r = esep.decode_package_result(bound.isdr.handle(req))
    sig = esep.decode_package_request(req).signature
    pub = bound.state.identity.euicc_cert
    assert r.verify(pub, association_token=None, eim_signature=sig, version="1.0")
    assert not r.verify(pub, association_token=None, version="1.2")


# --- rollback ---------------------------------------------------------------------------------

def rollback(card, refresh=True) -> tuple[int, esep.PackageResult | None]:
    raw = card.isdr.handle(codec.encode("ProfileRollbackRequest", {"refreshFlag": refresh}))
    v = codec.decode("ProfileRollbackResponse", raw)
    kids = tlv.children(tlv.parse_single(raw))
    assert ("eUICCPackageResult" in v) == (len(kids) == 2)
    return v["cmdResult"], esep.decode_package_result(kids[1].raw) if len(kids) == 2 else None


def test_profile_rollback_once(bound, eim):
    a, b, c = iccids(bound)
    e = Eim(bound, eim[0])
    assert rollback(bound) == (1, None)                                  # nothing to roll back
    r = e.run([("getRAT", {}), ("enable", {"iccid": ic(b), "rollbackFlag": None})])
    assert r.results[1] == ("enableResult", 0) and enabled(bound) == b
    # the profile a rollback would return to cannot be deleted meanwhile
    assert e.run([("delete", {"iccid": ic(a)})]).results == [("deleteResult", 20)]
    seen = []
    bound.on_profile_change = seen.append
    code, epr = rollback(bound)
    assert code == 0 and enabled(bound) == a and seen == [a]
    assert epr.verify(bound.state.identity.euicc_cert, association_token=None)
    assert epr.results == [("getRATResult", r.results[0][1]), ("rollbackResult", 0)]
    assert (epr.eim_id, epr.counter, epr.transaction_id) == (EIM_ID, r.counter, r.transaction_id)
    assert epr.seq_number not in (r.seq_number,)
    kept = retrieve(bound, ("euiccPackageResults", None))[1]
    assert r.der not in kept and epr.der in kept                         # the rollback's EPR replaces it
    assert rollback(bound) == (1, None)                                  # one attempt only


def test_rollback_ends_when_the_result_was_delivered_or_the_profile_changed(bound, eim):
    a, b, c = iccids(bound)
    e = Eim(bound, eim[0])
    r = e.run([("enable", {"iccid": ic(b), "rollbackFlag": None})])
    assert remove(bound, r.seq_number) == 0                              # delivered over the new profile
    assert rollback(bound) == (1, None) and enabled(bound) == b
    e.run([("enable", {"iccid": ic(c), "rollbackFlag": None})])
    assert es10(bound, "EnableProfileRequest", {"profileIdentifier": ("iccid", ic(a)), "refreshFlag": False},
                "EnableProfileResponse")["enableResult"] == 0            # ES10c enable in between
    assert rollback(bound) == (1, None) and enabled(bound) == a
    e.run([("enable", {"iccid": ic(b), "rollbackFlag": None})])
    bound.isdr.cat_busy = True
    assert rollback(bound) == (5, None)
    bound.isdr.cat_busy = False
    assert rollback(bound)[0] == 0
    # rollbackFlag with nothing enabled: nothing to return to
    e.run([("disable", {"iccid": ic(a)})])
    r = e.run([("enable", {"iccid": ic(b), "rollbackFlag": None})])
    assert r.results == [("enableResult", 20)] and enabled(bound) is None


# --- fallback ---------------------------------------------------------------------------------

def fallback(card, tag: int, refresh=True) -> int:
    req = tlv.encode(tag, tlv.encode(0x80, b"\xff" if refresh else b"\x00"))
    resp = tlv.parse_single(card.isdr.handle(req))
    return int.from_bytes(tlv.children(resp)[0].value, "big")


EXECUTE, RETURN = 0xBF5D, 0xBF5E


def test_fallback_attribute_execute_and_return(bound, eim):
    a, b, c = iccids(bound)
    e = Eim(bound, eim[0])
    assert fallback(bound, EXECUTE) == 6                                 # no Fallback Profile
    assert e.run([("unsetFallbackAttribute", {})]).results == [("unsetFallbackAttributeResult", 2)]
    assert e.run([("setFallbackAttribute", {"iccid": ic("8949000000000000001")})]).results == [
        ("setFallbackAttributeResult", 1)]
    assert e.run([("setFallbackAttribute", {"iccid": ic(b)})]).results == [("setFallbackAttributeResult", 0)]
    assert e.run([("setFallbackAttribute", {"iccid": ic(c)})]).ok
    assert [p.fallback for p in bound.state.profiles] == [False, False, True]   # the mark moved
    infos = codec.decode("SGP32-ProfileInfoListResponse", bound.isdr.handle(bytes.fromhex("BF2D00")))[1]
    assert [i["fallbackAttribute"] for i in infos] == [False, False, True]
    tagged = codec.decode("SGP32-ProfileInfoListResponse", bound.isdr.handle(codec.encode(
        "ProfileInfoListRequest", {"tagList": bytes.fromhex("5A9F26")})))[1]
    assert tagged[2] == {"iccid": ic(c), "fallbackAttribute": True}
    # the Fallback Profile stays on the card
    assert e.run([("delete", {"iccid": ic(c)})]).results == [("deleteResult", 21)]
    seen = []
    bound.on_profile_change = seen.append
    assert fallback(bound, RETURN) == 6                                  # not in fallback
    assert fallback(bound, EXECUTE) == 0 and enabled(bound) == c and seen == [c]
    assert fallback(bound, EXECUTE) == 2                                 # already on it
    assert e.run([("setFallbackAttribute", {"iccid": ic(b)})]).results == [("setFallbackAttributeResult", 3)]
    assert e.run([("unsetFallbackAttribute", {})]).results == [("unsetFallbackAttributeResult", 3)]
    bound.isdr.cat_busy = True
    assert fallback(bound, RETURN) == 5
    bound.isdr.cat_busy = False
    assert fallback(bound, RETURN) == 0 and enabled(bound) == a and seen == [c, a]
    assert fallback(bound, RETURN) == 6
    assert e.run([("unsetFallbackAttribute", {})]).results == [("unsetFallbackAttributeResult", 0)]
    assert bound.state.fallback_profile() is None


def test_fallback_refusals(bound, eim):
    a, b, c = iccids(bound)
    e = Eim(bound, eim[0])
    bound.state.find_iccid(b).fallback_allowed = False
    assert e.run([("setFallbackAttribute", {"iccid": ic(b)})]).results == [("setFallbackAttributeResult", 2)]
    e.run([("setFallbackAttribute", {"iccid": ic(c)})])
    bound.isdr.cat_busy = True
    assert fallback(bound, EXECUTE) == 5
    bound.isdr.cat_busy = False
    assert fallback(bound, EXECUTE) == 0
    # the profile to return to was deleted meanwhile: nothing to return to
    assert e.run([("delete", {"iccid": ic(a)})]).results == [("deleteResult", 0)]
    assert fallback(bound, RETURN) == 7 and enabled(bound) == c


# --- eCOs ---------------------------------------------------------------------------------------

def _eco_config(cfg: bytes, _tag: int = 0):
    """The value asn1tools wants for an addEim/updateEim eCO built from config DER."""
    return codec.decode("EimConfigurationData", cfg)


def test_ecos_add_list_update_delete(bound, pki, eim):
    e = Eim(bound, eim[0])
    key2 = ec.generate_private_key(ec.SECP256R1())
    cfg2 = eim_config(pki, eim_id="eim-two", spki_key=key2, token=0)
    r = e.run([("addEim", _eco_config(cfg2, 0xA8)), ("listEim", {})], kind="ecoList")
    assert r.results[0] == ("addEimResult", ("associationToken", 1))
    assert r.results[1] == ("listEimResult", ("eimIdList", [{"eimId": EIM_ID, "eimIdType": 2},
                                                             {"eimId": "eim-two", "eimIdType": 2}]))
    r = e.run([("addEim", _eco_config(cfg2, 0xA8))], kind="ecoList")
    assert r.results == [("addEimResult", ("addEimResultCode", 2))]
    r = e.run([("addEim", _eco_config(eim_config(pki, eim_id="e3", ci_pkid=b"\x01" * 20,
                                                  spki_key=key2), 0xA8))], kind="ecoList")
    assert r.results == [("addEimResult", ("addEimResultCode", 3))]
    # the second eIM signs with its token and its own counter
    two = Eim(bound, key2, eim_id="eim-two", token=1)
    assert two.run([("getRAT", {})]).ok
    # updateEim: new counter start and a new key; the token stays the card's
    key3 = ec.generate_private_key(ec.SECP256R1())
    upd = eim_config(pki, eim_id="eim-two", spki_key=key3, counter=100)
    r = e.run([("updateEim", _eco_config(upd, 0xAA)),
               ("updateEim", _eco_config(eim_config(pki, eim_id="nobody", spki_key=key3), 0xAA))], kind="ecoList")
    assert r.results == [("updateEimResult", 0), ("updateEimResult", 1)]
    entry = bound.state.find_eim("eim-two")
    assert entry.counter == 100 and entry.association_token == 1
    assert codec.decode("EimConfigurationData", entry.config_der)["associationToken"] == 1
    two.key = key3
    assert two.run([("getRAT", {})]).kind == "euiccPackageErrorSigned"          # counter 2 <= 100: replay
    assert two.run([("getRAT", {})], counter=101).ok
    r = e.run([("updateEim", _eco_config(eim_config(pki, eim_id="eim-two", counter=esep.COUNTER_MAX + 1,
                                                     with_key=False), 0xAA))], kind="ecoList")
    assert r.results == [("updateEimResult", 6)]
    # an update without a key keeps the old one
    r = e.run([("updateEim", _eco_config(eim_config(pki, eim_id="eim-two", with_key=False), 0xAA))], kind="ecoList")
    assert r.results == [("updateEimResult", 0)]
    assert two.run([("getRAT", {})], counter=102).ok
    cfgs = codec.decode("GetEimConfigurationDataResponse", bound.isdr.handle(bytes.fromhex("BF5500")))
    assert cfgs["eimConfigurationDataList"][1]["eimPublicKeyData"][0] == "eimPublicKey"
    # deleteEim: unknown, then the other, then the last one
    r = e.run([("deleteEim", {"eimId": "nobody"})], kind="ecoList")
    assert r.results == [("deleteEimResult", 1)]
    r = e.run([("deleteEim", {"eimId": "eim-two"}), ("deleteEim", {"eimId": EIM_ID}), ("listEim", {})],
              kind="ecoList")
    assert r.results == [("deleteEimResult", 0), ("deleteEimResult", 2), ("listEimResult", ("eimIdList", []))]
    assert two.run([("getRAT", {})], counter=103).kind == "euiccPackageErrorUnsigned"
    # no eIM left: the unsigned way in is open again
    assert add_initial(bound.isdr, eim_config(pki, eim[1]))[0] == "addInitialEimOk"


# --- immediate enable, default DP address, memory reset -------------------------------------------

def immediate(card, refresh=False) -> int:
    return es10(card, "ImmediateEnableRequest", {"refreshFlag": refresh}, "ImmediateEnableResponse")[
        "immediateEnableResult"]


def configure(card, **v) -> int:
    return es10(card, "ConfigureImmediateProfileEnablingRequest", v, "ConfigureImmediateProfileEnablingResponse")[
        "configImmediateEnableResult"]


def test_immediate_enable(card, pki, eim):
    a, b, _ = iccids(card)
    assert immediate(card) == 1                                          # not configured
    assert configure(card, immediateEnableFlag=None, defaultSmdpOid="2.999.10") == 0
    assert immediate(card) == 4                                          # nothing downloaded
    # what Isdr._install leaves after a download from that SM-DP+
    p = card.state.find_iccid(b)
    p.smdp_oid, p.smdp_address = "2.999.10", "smdp.example.org"
    card.state.immediate_candidate = b
    card.isdr.cat_busy = True
    assert immediate(card) == 5
    card.isdr.cat_busy = False
    assert immediate(card) == 0 and enabled(card) == b
    assert immediate(card) == 4                                          # used up
    card.state.immediate_candidate = a
    card.state.find_iccid(a).smdp_oid = "2.999.99"                       # from another SM-DP+
    assert immediate(card) == 4
    assert configure(card) == 0
    assert immediate(card) == 1                                          # flag cleared
    add_initial(card.isdr, eim_config(pki, eim[1]))
    assert configure(card, immediateEnableFlag=None) == 2                # the eIM's business now


def test_set_default_dp_address_and_sgp32_memory_reset(bound, pki, eim):
    resp = es10(bound, "SGP32-SetDefaultDpAddressRequest", {"defaultDpAddress": "dp.example.com"},
                "SGP32-SetDefaultDpAddressResponse")
    assert resp == {"setDefaultDpAddressResult": 0} and bound.state.default_dp_address == "dp.example.com"
    configure_psmo = Eim(bound, eim[0]).run([("configureImmediateEnable", {"immediateEnableFlag": None})])
    assert configure_psmo.ok
    r = es10(bound, "SGP32-EuiccMemoryResetRequest", {"resetOptions": ((b"\x06", 7))},
             "SGP32-EuiccMemoryResetResponse")                           # bits 5, 6: eIMs and IEC
    assert r == {"resetResult": 0, "resetEimResult": 0, "resetImmediateEnableConfigResult": 0}
    assert bound.state.eims == [] and bound.state.immediate_enable is None and len(bound.state.profiles) == 3
    r = es10(bound, "SGP32-EuiccMemoryResetRequest", {"resetOptions": (b"\xa4", 6)},  # 0, 2, 5
             "SGP32-EuiccMemoryResetResponse")
    assert r == {"resetResult": 0, "resetEimResult": 1}
    assert bound.state.profiles == [] and bound.state.default_dp_address is None
    r = es10(bound, "SGP32-EuiccMemoryResetRequest", {"resetOptions": (b"\x80", 1)},
             "SGP32-EuiccMemoryResetResponse")
    assert r == {"resetResult": 1}


# --- SGP.22 functions on an IoT card ---------------------------------------------------------------

def test_sgp22_functions_still_work_on_an_iot_card(bound, eim):
    a, b, _ = iccids(bound)
    Eim(bound, eim[0]).run([("setFallbackAttribute", {"iccid": ic(b)})])
    infos = codec.decode("ProfileInfoListResponse", bound.isdr.handle(bytes.fromhex("BF2D00")))[1]
    assert [iccid_from_bytes(i["iccid"]) for i in infos] == iccids(bound)
    assert es10(bound, "EnableProfileRequest", {"profileIdentifier": ("iccid", ic(b)), "refreshFlag": True},
                "EnableProfileResponse") == {"enableResult": 0}
    assert es10(bound, "DeleteProfileRequest", ("iccid", ic(b)), "DeleteProfileResponse") == {"deleteResult": 2}
    assert es10(bound, "EnableProfileRequest", {"profileIdentifier": ("iccid", ic(a)), "refreshFlag": True},
                "EnableProfileResponse") == {"enableResult": 0}
    # ES10c delete obeys the SGP.32 rule too: the Fallback Profile stays
    assert es10(bound, "DeleteProfileRequest", ("iccid", ic(b)), "DeleteProfileResponse") == {"deleteResult": 21}
    eid = codec.decode("GetEuiccDataResponse", bound.isdr.handle(bytes.fromhex("BF3E035C015A")))["eidValue"]
    assert eid == eid_to_bytes(bound.eid)


# --- over a real pty: `esim-agent sim modem --iot` with SGP.22 commands -----------------------------

def _env(tmp_path) -> dict:
    return dict(os.environ, ESIM_AGENT_STATE_DIR=str(tmp_path / "agent-state"),
                ESIM_AGENT_CONFIG=str(tmp_path / "no-such-agent.toml"), PYTHONPATH=REPO)


def _cli(tmp_path, *argv) -> dict:
    p = subprocess.run([sys.executable, "-m", "agent", *map(str, argv)], capture_output=True, text=True,
                       timeout=60, env=_env(tmp_path), cwd=REPO, stdin=subprocess.DEVNULL)
    assert "Traceback" not in p.stderr, p.stderr
    doc = json.loads(p.stdout)
    assert p.returncode == 0 and doc["ok"], (p.returncode, p.stdout, p.stderr)
    return doc["data"]


def test_sgp22_cli_against_sim_modem_iot_on_a_pty(tmp_path, pki):
    state, link = tmp_path / "iot.json", tmp_path / "modem.tty"
    modem = subprocess.Popen([sys.executable, "-m", "agent", "sim", "modem", "--iot", "--state", state,
                              "--preload", "2", "--pki", pki.directory, "--link", link],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path), cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(link):
            assert modem.poll() is None, modem.stderr.read().decode()
            assert time.monotonic() < deadline, "sim modem --iot did not come up"
            time.sleep(0.05)
        dev = ["--device", link, "--timeout", "5"]
        info = _cli(tmp_path, *dev, "--json", "chip", "info")
        card = load_state(state)
        assert card.iot and info["eid"] == card.eid
        listed = _cli(tmp_path, *dev, "--json", "profile", "list")["profiles"]
        assert [(p["iccid"], p["state"]) for p in listed] == [(p.iccid, p.state) for p in card.profiles]
        second = card.profiles[1].iccid
        _cli(tmp_path, *dev, "--json", "profile", "enable", second)
        listed = _cli(tmp_path, *dev, "--json", "profile", "list")["profiles"]
        assert [p["state"] for p in listed] == ["disabled", "enabled"]
    finally:
        modem.terminate()
        modem.wait(10)
    assert load_state(state).enabled_profile().iccid == second


# --- malformed input never escapes as anything but a card refusal -----------------------------------

@pytest.mark.fuzz
def test_fuzz_load_euicc_package_and_add_initial_eim(tmp_path_factory, pki, eim):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    card = SimEuicc.open(tmp_path_factory.mktemp("fuzz") / "iot.json", preload=2, pki_dir=pki.directory, iot=True)
    add_initial(card.isdr, eim_config(pki, eim[1]))
    e = Eim(card, eim[0])
    seeds = [e.package([("enable", {"iccid": ic(card.state.profiles[1].iccid), "rollbackFlag": None})]),
             e.package([("addEim", codec.decode("EimConfigurationData", eim_config(pki, eim[1], eim_id="z")))],
                       kind="ecoList"),
             tlv.encode(0xBF57, tlv.encode(0xA0, eim_config(pki, eim[1], token=0)))]

    @st.composite
    def spoilt(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data) - 1))
            op = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
            if op == "flip":
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "set":
                data[pos] = draw(st.integers(0, 255))
            elif op == "cut":
                del data[pos:pos + draw(st.integers(1, 8))]
            else:
                data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
            if not data:
                data = bytearray(b"\xbf\x51")
        return bytes(data)

    prefixed = st.tuples(st.sampled_from([b"\xbf\x51", b"\xbf\x57"]), st.binary(max_size=200)).map(
        lambda t: t[0] + bytes([len(t[1]) & 0x7F]) + t[1])

    @given(st.one_of(spoilt(), prefixed, st.binary(max_size=100)))
    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(data):
        try:
            out = card.isdr.handle(data)
        except SwError:
            return
        except AgentError as err:                # our own errors are fine; a traceback is not
            assert err.code
            return
        assert isinstance(out, bytes) and tlv.parse_single(out)

    check()


# --- a profile download onto an IoT card, then ImmediateEnable -------------------------------------

def test_download_onto_iot_card_then_immediate_enable(card, pki):
    from test_sim_euicc import Dp, _auth_and_prepare, _load, _Transport

    from agent import apdu as A
    from agent.es10 import Es10
    from agent.ids import make_iccid

    assert configure(card, immediateEnableFlag=None, defaultSmdpOid=pki.smdp_oid) == 0
    new = make_iccid("8944123", 77, 19)
    with A.Isdr(_Transport(card), segment_size=120) as isdr:
        es = Es10(isdr)
        dp = Dp(pki, card)
        otpk = _auth_and_prepare(es, dp)          # euiccSigned1 carries the SGP32-EUICCInfo2, signed
        answers = _load(es, dp.bpp(otpk, new))
    pir = codec.decode("ProfileInstallationResult", answers[-1])["profileInstallationResultData"]
    assert pir["finalResult"][0] == "successResult"
    assert card.state.immediate_candidate == new
    assert immediate(card, refresh=True) == 0 and enabled(card) == new
    assert card.state.immediate_candidate is None


def test_rollback_and_fallback_survive_a_power_cycle(bound, eim):
    a, b, c = iccids(bound)
    Eim(bound, eim[0]).run([("enable", {"iccid": ic(b), "rollbackFlag": None})])
    again = SimEuicc.open(bound.state.path)               # the state file is all a card remembers
    assert rollback(again)[0] == 0 and enabled(again) == a
    assert load_state(bound.state.path).rollback is None   # spent, on disk too
    e = Eim(again, eim[0])
    e.counter = 10
    e.run([("setFallbackAttribute", {"iccid": ic(c)})])
    assert fallback(again, EXECUTE) == 0
    third = SimEuicc.open(bound.state.path)
    assert fallback(third, RETURN) == 0 and enabled(third) == a
    assert load_state(bound.state.path).fallback_return is None
