"""The local eIM (agent/sim/eim.py, eim_api.py): ESipa server side and the emnify-style operations API.

No card here: the test plays the IPA (ESipa over real HTTPS on loopback, both bindings and
versions) and the eUICC (checks the eIM's signature and counter with agent.esep, signs its
results with a key whose certificate the test PKI's EUM issued)."""
from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import codec, crypto, esep, esipa
from agent.ids import eid_to_bytes, iccid_from_bytes, iccid_to_bytes, make_eid, make_iccid
from agent.sim import pki as simpki
from agent.sim.eim import EIM_ID, EimServer, serve_eim

TOKEN = "test-token"
ICCID_A = make_iccid("8988303", 1001, 20)
ICCID_B = make_iccid("8988303", 1002, 20)
ICCID_NEW = make_iccid("8988303", 2001, 19)
AC = "LPA:1$smdp.example$MATCHING-ID"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eim-pki")
    simpki.make_pki(d)
    return d


@pytest.fixture
def make_server(pki_dir, tmp_path):
    servers = []

    def make(version="1.2", token=TOKEN):
        s = serve_eim(pki_dir, 0, token, version, state_path=tmp_path / f"state{len(servers)}.json")
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.shutdown()


@pytest.fixture
def server(make_server):
    return make_server()


def _session(server) -> requests.Session:
    s = requests.Session()
    s.verify = str(server.pki.directory.parent / "ci.pem")
    s.trust_env = False
    return s


def api(server, method, path, *, token=TOKEN, **kw) -> requests.Response:
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = "Bearer " + token
    return _session(server).request(method, server.url + path, headers=headers, timeout=10, **kw)


# --------------------------------------------------------------------------- the eUICC and the IPA


class Card:
    """An IoT eUICC as far as the eIM can tell: identity from the test PKI, eIM association
    (public key from the eIM certificate, last counter), profiles, notification numbers."""

    def __init__(self, pki_dir, eid=None, *, profiles=((ICCID_A, True), (ICCID_B, False))):
        pki = simpki.load_pki(pki_dir)
        self.eid = eid or make_eid("89049032000000000000000000" + str(uuid.uuid4().int % 10000).zfill(4))
        ck = simpki.issue_euicc(pki.eum, self.eid)
        self.key, self.cert_der, self.eum_der = ck.key, ck.der, pki.eum.der
        self.eim_pub = crypto.load_cert((pki_dir / "eim" / "eim.pem").read_bytes()).public_key()
        self.counter = 0
        self.seq = 0
        self.profiles = {i: {"enabled": en, "fallback": False} for i, en in profiles}
        self.previous = None

    def info(self, version, txid=None) -> dict:
        d = {"euiccCertificate": codec.decode("Certificate", self.cert_der),
             "eumCertificate": codec.decode("Certificate", self.eum_der),
             "defaultSmdpAddress": "smdp.example"}
        if txid is not None and version == "1.2":
            d["eimTransactionId"] = txid
        return d

    def execute(self, der: bytes, *, version="1.2", forge=False) -> bytes:
        req = esep.decode_package_request(der)
        assert req.verify(self.eim_pub, None), "the eIM's signature does not verify"
        assert req.eid == self.eid and req.eim_id == EIM_ID
        self.seq += 1
        if req.counter <= self.counter:
            return esep.sign_error(self.key, eim_id=req.eim_id, counter=req.counter, error=esep.REPLAY_ERROR,
                                   transaction_id=req.transaction_id, eim_signature=req.signature, version=version)
        self.counter = req.counter
        results = [self._psmo(name, v) for name, v in req.operations]
        key = crypto.generate_key() if forge else self.key
        return esep.sign_result(key, eim_id=req.eim_id, counter=req.counter, seq_number=self.seq, results=results,
                                transaction_id=req.transaction_id, eim_signature=req.signature, version=version)

    def _psmo(self, name, v):
        if name == "listProfileInfo":
            return ("listProfileInfoResult", ("profileInfoListOk", [
                {"iccid": iccid_to_bytes(i), "profileState": int(p["enabled"]), "fallbackAttribute": p["fallback"],
                 "profileName": f"profile {i[-4:]}"} for i, p in self.profiles.items()]))
        iccid = iccid_from_bytes(v["iccid"])
        p = self.profiles.get(iccid)
        if name == "enable":
            if p is None:
                return ("enableResult", 1)
            if p["enabled"]:
                return ("enableResult", 2)
            for q in self.profiles.values():
                q["enabled"] = False
            p["enabled"] = True
            return ("enableResult", 0)
        if name == "delete":
            if p is None:
                return ("deleteResult", 1)
            if p["enabled"]:
                return ("deleteResult", 2)
            del self.profiles[iccid]
            return ("deleteResult", 0)
        if name == "setFallbackAttribute":
            if p is None:
                return ("setFallbackAttributeResult", 1)
            for q in self.profiles.values():
                q["fallback"] = False
            p["fallback"] = True
            return ("setFallbackAttributeResult", 0)
        raise AssertionError(name)

    def install(self, iccid) -> dict:
        self.seq += 1
        self.profiles[iccid] = {"enabled": False, "fallback": False}
        return {"profileInstallationResultData": {
            "transactionId": b"\x01" * 16,
            "notificationMetadata": {"seqNumber": self.seq, "profileManagementOperation": (b"\x80", 1),
                                     "notificationAddress": "smdp.example", "iccid": iccid_to_bytes(iccid)},
            "finalResult": ("successResult", {"aid": bytes.fromhex("A0000005591010FFFFFFFF8900001000"),
                                              "simaResponse": bytes.fromhex("300780053003800100")})},
            "euiccSignPIR": b"\x00" * 64}


class Ipa:
    """Talks ESipa to the eIM like the IPA: one binding, one version."""

    def __init__(self, server, card, *, binding="asn1", version="1.2"):
        self.server, self.card, self.binding, self.version = server, card, binding, version
        self.http = _session(server)
        self.acked: list[int] = []

    def call(self, name, value):
        if self.binding == "asn1":
            r = self.http.post(self.server.url + esipa.ASN1_PATH, timeout=10,
                               data=esipa.encode_request(name, value, version=self.version),
                               headers={"Content-Type": esipa.ASN1_CONTENT_TYPE})
            if r.status_code == 204:
                return None
            assert r.status_code == 200, r.text
            assert r.headers["Content-Type"] == esipa.ASN1_CONTENT_TYPE
            rname, rvalue = esipa.decode_response(r.content, version=self.version)
            assert rname == esipa.RESPONSE_FOR[name]
            return rvalue
        path, body = esipa.request_to_json(name, value, version=self.version)
        r = self.http.post(self.server.url + path, json=body, timeout=10)
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        return esipa.response_from_json(name, r.json(), version=self.version)[1]

    def get_package(self):
        return self.call("getEimPackageRequest", {"eidValue": eid_to_bytes(self.card.eid)})

    def provide(self, result):
        if self.version == "1.0":
            value = result
        else:
            value = {"eidValue": eid_to_bytes(self.card.eid), "eimPackageResult": result}
        answer = self.call("provideEimPackageResult", value)
        if self.version == "1.0":
            acks = answer.get("eimAcknowledgements", [])
        else:
            acks = answer[1] if answer[0] == "eimAcknowledgements" else []
        self.acked += acks
        return acks

    def poll(self, *, forge=False, install=ICCID_NEW, limit=10) -> list[str]:
        """Poll until noEimPackageAvailable; returns the kinds of packages executed."""
        done = []
        for _ in range(limit):
            alt, v = self.get_package()
            if alt == "eimPackageError":
                assert v == esipa.NO_EIM_PACKAGE_AVAILABLE
                return done
            done.append(alt)
            self.execute(alt, v, forge=forge, install=install)
        raise AssertionError(f"the eIM kept sending packages: {done}")

    def execute(self, alt, v, *, forge=False, install=ICCID_NEW):
        if alt == "ipaEuiccDataRequest":
            return self.provide(("ipaEuiccDataResponse", ("ipaEuiccData", self.card.info(
                self.version, v.get("eimTransactionId")))))
        if alt == "euiccPackageRequest":
            der = codec.encode("EuiccPackageRequest", v)
            epr = self.card.execute(der, version=self.version, forge=forge)
            return self.provide(("euiccPackageResult", codec.decode("EuiccPackageResult", epr)))
        if alt == "profileDownloadTriggerRequest":
            assert v["profileDownloadData"] == ("activationCode", AC[4:])
            return self.provide(("profileDownloadTriggerResult", {
                "eimTransactionId": v["eimTransactionId"],
                "profileDownloadTriggerResultData": ("profileInstallationResult", self.card.install(install))}))
        raise AssertionError(alt)


def euicc_of(server, card) -> dict:
    r = api(server, "GET", f"/api/v1/euicc?q=eid:{card.eid}")
    assert r.status_code == 200, r.text
    (rec,) = r.json()
    return rec


def statuses(rec) -> dict[str, int]:
    return {p["iccid_with_luhn"]: p["status"]["id"] for p in rec["profile"]}


def schedule(server, euicc_id, ops) -> requests.Response:
    return api(server, "POST", f"/api/v1/euicc/{euicc_id}/operation", json=ops)


def op(server, euicc_id, op_id) -> dict:
    r = api(server, "GET", f"/api/v1/euicc/{euicc_id}/operation/{op_id}")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def learnt(server, pki_dir):
    """A server that has learnt one card (after its first poll round)."""
    card = Card(pki_dir)
    ipa = Ipa(server, card)
    assert ipa.poll() == ["ipaEuiccDataRequest", "euiccPackageRequest"]
    return server, card, ipa, euicc_of(server, card)["id"]


# --------------------------------------------------------------------------- files and configuration


def test_files_and_eim_configuration(server, pki_dir):
    d = pki_dir / "eim"
    for f in ("eim.pem", "eim.key.pem", "tls.pem", "tls.key.pem", "eim-config.der"):
        assert (d / f).is_file(), f
    cfg = codec.decode("EimConfigurationData", (d / "eim-config.der").read_bytes())
    ci = crypto.load_cert((pki_dir / "ci.pem").read_bytes())
    assert cfg["eimId"] == EIM_ID and cfg["eimFqdn"] == f"127.0.0.1:{server.port}"
    assert cfg["eimIdType"] == 2 and cfg["counterValue"] == 0 and "associationToken" not in cfg
    assert cfg["euiccCiPKId"] == crypto.ski(ci)
    assert cfg["eimSupportedProtocol"][0][0] & 0x80
    kind, cert = cfg["eimPublicKeyData"]
    assert kind == "eimCertificate"
    eim_cert = crypto.load_cert(codec.encode("Certificate", cert))
    assert crypto.verify_issued_by(eim_cert, ci)
    assert codec.encode("Certificate", cfg["trustedPublicKeyDataTls"][1]) == crypto.cert_der(ci)
    # the TLS certificate chains to ci.pem for 127.0.0.1 (requests verifies it here)
    assert api(server, "GET", "/api/v1/euicc").status_code == 200


def test_certificates_are_kept_and_remade_for_a_new_ci(tmp_path):
    simpki.make_pki(tmp_path)
    first = simpki.ensure_eim_pki(tmp_path)
    again = simpki.ensure_eim_pki(tmp_path)
    assert again.sign.der == first.sign.der and again.tls.der == first.tls.der
    simpki.make_pki(tmp_path)                     # a new CI: the old eIM certificates no longer chain
    fresh = simpki.ensure_eim_pki(tmp_path)
    assert fresh.sign.der != first.sign.der
    assert crypto.verify_issued_by(fresh.sign.cert, fresh.ci.cert)


def test_a_second_eim_on_the_same_state_is_refused(pki_dir, tmp_path):
    from agent.errors import AgentError
    with EimServer(pki_dir, state_path=tmp_path / "s.json"):
        with pytest.raises(AgentError) as e:
            EimServer(pki_dir, state_path=tmp_path / "s.json")
        assert e.value.code == "sim_state_busy"


# --------------------------------------------------------------------------- learning and ESipa


@pytest.mark.parametrize("binding", ["asn1", "json"])
@pytest.mark.parametrize("version", ["1.2", "1.0"])
def test_first_poll_learns_the_euicc_then_audits(make_server, pki_dir, binding, version):
    server = make_server(version)
    card = Card(pki_dir)
    ipa = Ipa(server, card, binding=binding, version=version)
    assert api(server, "GET", f"/api/v1/euicc?q=eid:{card.eid}").json() == []
    assert ipa.poll() == ["ipaEuiccDataRequest", "euiccPackageRequest"]
    rec = euicc_of(server, card)
    assert rec["eid"] == card.eid and rec["last_polled"] and rec["last_audited"]
    assert statuses(rec) == {ICCID_A: 8, ICCID_B: 7}
    assert card.counter == 1 and ipa.acked == [1]         # the audit's EPR, acknowledged
    # the five actions, each to Succeeded, through this binding and version
    eid = rec["id"]
    ids = []
    for ops in ([{"action": {"id": 1}}],
                [{"action": {"id": 2}, "activation_code": AC, "enable": True, "rollback": True}],
                [{"action": {"id": 4}, "iccid_with_luhn": ICCID_A}],
                [{"action": {"id": 3}, "iccid_with_luhn": ICCID_B, "rollback": True}],
                [{"action": {"id": 5}, "iccid_with_luhn": ICCID_NEW}]):
        r = schedule(server, eid, ops)
        assert r.status_code == 201, r.text
        ids.append(r.json()[0]["id"])
        ipa.poll()
        assert op(server, eid, ids[-1])["status"] == {"id": 2, "description": "Succeeded"}, ops
    rec = euicc_of(server, card)
    assert statuses(rec)[ICCID_B] == 8 and statuses(rec)[ICCID_NEW] == 9 and statuses(rec)[ICCID_A] == 7
    assert [p["iccid_with_luhn"] for p in rec["profile"] if p["fallback_attribute"]] == [ICCID_A]
    assert card.counter == 6 and ICCID_NEW not in card.profiles


def test_download_then_enable_in_one_round(learnt):
    server, card, ipa, eid = learnt
    r = schedule(server, eid, [{"action": {"id": 2}, "activation_code": AC, "enable": True}])
    oid = r.json()[0]["id"]
    assert ipa.poll() == ["profileDownloadTriggerRequest", "euiccPackageRequest"]
    o = op(server, eid, oid)
    assert o["status"]["id"] == 2 and o["iccid_with_luhn"] == ICCID_NEW and "finalization_date" in o
    s = statuses(euicc_of(server, card))
    assert s[ICCID_NEW] == 8 and s[ICCID_A] == 7


def test_download_without_enable_is_installed(learnt):
    server, card, ipa, eid = learnt
    oid = schedule(server, eid, [{"action": {"id": 2}, "activation_code": AC}]).json()[0]["id"]
    assert ipa.poll() == ["profileDownloadTriggerRequest"]
    assert op(server, eid, oid)["status"]["id"] == 2
    assert statuses(euicc_of(server, card))[ICCID_NEW] == 5        # Installed


def test_download_error_fails_the_operation(learnt):
    server, card, ipa, eid = learnt
    oid = schedule(server, eid, [{"action": {"id": 2}, "activation_code": AC, "enable": True}]).json()[0]["id"]
    alt, v = ipa.get_package()
    assert alt == "profileDownloadTriggerRequest"
    ipa.provide(("profileDownloadTriggerResult", {
        "eimTransactionId": v["eimTransactionId"],
        "profileDownloadTriggerResultData": ("profileDownloadError", {
            "profileDownloadErrorReason": 127, "errorResponse": b"8.2.6/3.8 matchingId refused"})}))
    o = op(server, eid, oid)
    assert o["status"]["id"] == 3 and o["error"]["reason"] == 127 and "matchingId refused" in o["error"]["message"]
    assert ipa.poll() == []


def test_repeated_poll_resends_the_same_package(learnt):
    server, card, ipa, eid = learnt
    oid = schedule(server, eid, [{"action": {"id": 3}, "iccid_with_luhn": ICCID_B}]).json()[0]["id"]
    first = ipa.get_package()
    second = ipa.get_package()
    assert first == second and first[0] == "euiccPackageRequest"
    assert op(server, eid, oid)["status"]["id"] == 1
    ipa.execute(*second)
    assert op(server, eid, oid)["status"]["id"] == 2
    assert ipa.get_package() == ("eimPackageError", 1)
    assert card.counter == 2


def test_expired_operation_is_never_sent(learnt):
    server, card, ipa, eid = learnt
    r = schedule(server, eid, [{"action": {"id": 3}, "iccid_with_luhn": ICCID_B, "validity_period": 1}])
    o = r.json()[0]
    assert o["status"]["id"] == 1 and o["expiry_date"] > o["creation_date"]
    time.sleep(1.3)
    assert ipa.poll() == []
    o = op(server, eid, o["id"])
    assert o["status"] == {"id": 4, "description": "Expired"} and "finalization_date" in o
    assert card.profiles[ICCID_A]["enabled"] and card.counter == 1


def test_forged_result_signature_fails_and_is_not_acknowledged(learnt):
    server, card, ipa, eid = learnt
    oid = schedule(server, eid, [{"action": {"id": 3}, "iccid_with_luhn": ICCID_B}]).json()[0]["id"]
    before = list(ipa.acked)
    assert ipa.poll(forge=True) == ["euiccPackageRequest"]
    o = op(server, eid, oid)
    assert o["status"]["id"] == 3 and o["error"]["reason_name"] == "euiccSignatureInvalid"
    assert ipa.acked == before
    assert statuses(euicc_of(server, card))[ICCID_B] == 7       # the record did not follow the forgery


def test_error_results_fail_with_the_spec_reason(learnt):
    server, card, ipa, eid = learnt
    # the card lost profile B behind the eIM's back: the enable fails with iccidOrAidNotFound (1)
    del card.profiles[ICCID_B]
    oid = schedule(server, eid, [{"action": {"id": 3}, "iccid_with_luhn": ICCID_B}]).json()[0]["id"]
    ipa.poll()
    o = op(server, eid, oid)
    assert o["status"]["id"] == 3
    assert o["error"]["reason"] == 1 and o["error"]["message"].startswith("iccidOrAidNotFound")
    # a replayed counter: the card's signed error
    card.counter = 99
    schedule(server, eid, [{"action": {"id": 1}}])
    oid = api(server, "GET", f"/api/v1/euicc/{eid}/operation?q=action:1").json()[-1]["id"]
    ipa.poll()
    o = op(server, eid, oid)
    assert o["status"]["id"] == 3 and o["error"]["reason"] == 4 and "replayError" in o["error"]["message"]


def test_unsigned_error_and_ipa_error(learnt):
    server, card, ipa, eid = learnt
    oid = schedule(server, eid, [{"action": {"id": 1}}]).json()[0]["id"]
    alt, v = ipa.get_package()
    txid = v["euiccPackageSigned"]["eimTransactionId"]
    ipa.provide(("euiccPackageResult", codec.decode("EuiccPackageResult",
                                                    esep.unsigned_error(eim_id=EIM_ID, transaction_id=txid))))
    assert op(server, eid, oid)["status"]["id"] == 3
    oid = schedule(server, eid, [{"action": {"id": 1}}]).json()[0]["id"]
    alt, v = ipa.get_package()
    ipa.provide(("eimPackageResultResponseError", {"eimTransactionId": v["euiccPackageSigned"]["eimTransactionId"],
                                                   "eimPackageResultErrorCode": 1}))
    o = op(server, eid, oid)
    assert o["status"]["id"] == 3 and o["error"]["reason"] == 1
    assert ipa.poll() == []


def test_rollback_result_restores_the_previous_profile(learnt):
    server, card, ipa, eid = learnt
    oid = schedule(server, eid, [{"action": {"id": 3}, "iccid_with_luhn": ICCID_B, "rollback": True}]).json()[0]["id"]
    alt, v = ipa.get_package()
    req = esep.decode_package_request(codec.encode("EuiccPackageRequest", v))
    assert req.operations == [("enable", {"iccid": iccid_to_bytes(ICCID_B), "rollbackFlag": None})]
    epr = esep.sign_result(card.key, eim_id=EIM_ID, counter=req.counter, seq_number=50,
                           results=[("enableResult", 0), ("rollbackResult", 0)], transaction_id=req.transaction_id)
    assert ipa.provide(("euiccPackageResult", codec.decode("EuiccPackageResult", epr))) == [50]
    o = op(server, eid, oid)
    assert o["status"]["id"] == 3 and o["error"]["reason_name"] == "rollback"
    assert statuses(euicc_of(server, card)) == {ICCID_A: 8, ICCID_B: 7}


def test_notifications_in_the_result_are_acknowledged(learnt):
    server, card, ipa, eid = learnt
    schedule(server, eid, [{"action": {"id": 1}}])
    alt, v = ipa.get_package()
    epr = card.execute(codec.encode("EuiccPackageRequest", v))
    pir = card.install(ICCID_NEW)
    acks = ipa.provide(("ePRAndNotifications", {"euiccPackageResult": codec.decode("EuiccPackageResult", epr),
                                                "notificationList": [("profileInstallationResult", pir)]}))
    assert sorted(acks) == sorted([card.seq - 1, card.seq])
    # handleNotification: accepted, 204
    assert ipa.call("handleNotificationEsipa", ("pendingNotification", ("profileInstallationResult", pir))) is None


def test_unknown_eid_in_a_result_and_garbage_bodies(learnt):
    server, card, ipa, eid = learnt
    other = Card(server.pki.directory.parent)
    stranger = Ipa(server, other)
    answer = stranger.call("provideEimPackageResult", {
        "eidValue": eid_to_bytes(other.eid),
        "eimPackageResult": ("eimPackageResultResponseError", {"eimPackageResultErrorCode": 127})})
    assert answer == ("provideEimPackageResultError", esipa.EID_NOT_FOUND)
    http = _session(server)
    for data in (b"", b"\x00", b"\xbf\x4f\x05garbage", b"\x30" * 50):
        r = http.post(server.url + esipa.ASN1_PATH, data=data, headers={"Content-Type": esipa.ASN1_CONTENT_TYPE})
        assert r.status_code == 400, data
    for path, body in (("getEimPackage", "not json"), ("getEimPackage", "[]"), ("getEimPackage", '{"eidValue": 1}'),
                       ("provideEimPackageResult", '{"eimPackageResult": "!!"}'), ("nope", "{}")):
        r = http.post(server.url + esipa.JSON_PATH_PREFIX + path, data=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code)
    assert http.get(server.url + esipa.ASN1_PATH).status_code == 405


def test_state_survives_a_restart(pki_dir, tmp_path):
    state = tmp_path / "state.json"
    card = Card(pki_dir)
    with EimServer(pki_dir, state_path=state) as s1:
        Ipa(s1, card).poll()
    with EimServer(pki_dir, state_path=state) as s2:
        rec = api(s2, "GET", f"/api/v1/euicc?q=eid:{card.eid}", token=None).json()[0]
        assert statuses(rec) == {ICCID_A: 8, ICCID_B: 7}
        api(s2, "POST", f"/api/v1/euicc/{rec['id']}/operation", token=None, json=[{"action": {"id": 1}}])
        assert Ipa(s2, card).poll() == ["euiccPackageRequest"]
        assert card.counter == 2              # the counter went on from the stored one


# --------------------------------------------------------------------------- REST API


def test_authorization(server):
    for path in ("/api/v1/euicc", "/api/v1/euicc/1", "/api/v1/euicc/profile/status",
                 "/api/v1/euicc/operation/action", "/api/v1/euicc/1/operation"):
        for token in (None, "wrong"):
            r = api(server, "GET", path, token=token)
            assert r.status_code == 401 and r.headers["Content-Type"] == "application/json"
            assert r.json()["status_code"] == 401 and r.json()["message"]
    r = api(server, "GET", "/api/v1/euicc", token=None, headers={"Authorization": "Basic " + TOKEN})
    assert r.status_code == 401


def test_status_and_action_lists(server):
    assert api(server, "GET", "/api/v1/euicc/profile/status").json() == [
        {"id": i, "description": d} for i, d in enumerate(
            ["Available", "Reserved", "Downloading", "Downloaded", "Installed", "Disabling", "Disabled",
             "Enabled", "Deleted", "Unknown"], start=1)]
    assert api(server, "GET", "/api/v1/euicc/operation/action").json() == [
        {"id": 1, "description": "Audit"}, {"id": 2, "description": "Download"}, {"id": 3, "description": "Enable"},
        {"id": 4, "description": "Set fallback"}, {"id": 5, "description": "Delete"}]
    assert [s["description"] for s in api(server, "GET", "/api/v1/euicc/operation/status").json()] == [
        "Scheduled", "Succeeded", "Failed", "Expired", "Canceled"]
    assert api(server, "GET", "/api/v1/euicc/status").status_code == 200


def test_euicc_record_shape(learnt):
    server, card, ipa, eid = learnt
    rec = api(server, "GET", f"/api/v1/euicc/{eid}").json()
    for k in ("id", "eid", "created", "profile", "status", "supported_profile_type", "eim",
              "last_audited", "last_polled", "last_synced"):
        assert k in rec
    p = next(p for p in rec["profile"] if p["iccid_with_luhn"] == ICCID_A)
    assert p["status"] == {"id": 8, "description": "Enabled"}
    assert p["fallback_attribute"] is False and "fallback_allowed" in p and p["preloaded"] is True
    assert rec["status"]["id"] == 1 and rec["created"].endswith("Z")


def test_list_filters_pagination_sorting(server, pki_dir):
    cards = [Card(pki_dir) for _ in range(3)]
    for c in cards:
        Ipa(server, c).poll()
    every = api(server, "GET", "/api/v1/euicc").json()
    assert [r["eid"] for r in every] == [c.eid for c in cards]
    r = api(server, "GET", "/api/v1/euicc", params={"page": 2, "per_page": 2})
    assert [x["eid"] for x in r.json()] == [cards[2].eid]
    assert r.headers["X-Total-Count"] == "3" and r.headers["X-Total-Pages"] == "2"
    assert api(server, "GET", "/api/v1/euicc", params={"page": 3, "per_page": 2}).json() == []
    assert [x["id"] for x in api(server, "GET", "/api/v1/euicc", params={"sort": "-id"}).json()] == \
        [x["id"] for x in reversed(every)]
    assert [x["eid"] for x in api(server, "GET", "/api/v1/euicc", params={"q": f"id:{every[1]['id']}"}).json()] == \
        [cards[1].eid]
    assert len(api(server, "GET", "/api/v1/euicc", params={"q": "status:1,eim:1"}).json()) == 3
    assert api(server, "GET", "/api/v1/euicc", params={"q": "status:2"}).json() == []
    for bad in ({"page": 0}, {"page": "x"}, {"per_page": 1001}, {"per_page": 0}, {"q": "color:red"},
                {"q": "eid"}, {"q": "id:abc"}, {"sort": "color"}):
        r = api(server, "GET", "/api/v1/euicc", params=bad)
        assert r.status_code == 400 and r.json()["status_code"] == 400, bad


def test_not_found_and_methods(learnt):
    server, card, ipa, eid = learnt
    for path in ("/api/v1/euicc/999999", "/api/v1/euicc/abc", "/api/v1/euicc/-1", "/api/v1/euicc/999/operation",
                 f"/api/v1/euicc/{eid}/operation/not-a-uuid", f"/api/v1/euicc/{eid}/operation/{uuid.uuid4()}",
                 "/api/v1/nothing", f"/api/v1/euicc/{eid}/other"):
        r = api(server, "GET", path)
        assert r.status_code == 404 and r.json()["status_code"] == 404, path
    assert schedule(server, 999999, [{"action": {"id": 1}}]).status_code == 404
    r = api(server, "PUT", f"/api/v1/euicc/{eid}")
    assert r.status_code == 405 and r.json()["status_code"] == 405


@pytest.mark.parametrize("body, why", [
    ({"action": {"id": 1}}, "array"),
    ([], "no operation"),
    ([1], "not an object"),
    ([{"action": {"id": 6}}], "action.id"),
    ([{"action": {"id": True}}], "action.id"),
    ([{"action": 1}], "action.id"),
    ([{"action": {"id": 1}, "validity_period": 0}], "validity_period"),
    ([{"action": {"id": 1}, "validity_period": 86401}], "validity_period"),
    ([{"action": {"id": 1}, "validity_period": "10"}], "validity_period"),
    ([{"action": {"id": 2}}], "activation_code"),
    ([{"action": {"id": 2}, "activation_code": "not an AC"}], ""),
    ([{"action": {"id": 3}}], "iccid_with_luhn"),
    ([{"action": {"id": 4}}], "iccid_with_luhn"),
    ([{"action": {"id": 5}}], "iccid_with_luhn"),
    ([{"action": {"id": 3}, "iccid_with_luhn": "89000000000000000000"}], "no profile"),
    ([{"action": {"id": 5}, "iccid_with_luhn": ICCID_A}], "cannot be deleted"),
    ([{"action": {"id": 4}, "iccid_with_luhn": ICCID_A}], "only a disabled profile"),
    ([{"action": {"id": 3}, "iccid_with_luhn": ICCID_A}], "already enabled"),
    ([{"action": {"id": 1}}, {"action": {"id": 9}}], "operation 2"),
    ([{"action": {"id": 3}, "iccid_with_luhn": ICCID_B, "rollback": "yes"}], "rollback"),
])
def test_schedule_validation(learnt, body, why):
    server, card, ipa, eid = learnt
    r = schedule(server, eid, body)
    assert r.status_code == 400 and r.json()["status_code"] == 400 and why in r.json()["message"], r.text
    assert api(server, "GET", f"/api/v1/euicc/{eid}/operation").json() == []   # nothing was created


def test_schedule_answer_and_link(learnt):
    server, card, ipa, eid = learnt
    r = schedule(server, eid, [{"action": {"id": 1}}, {"action": {"id": 4}, "iccid_with_luhn": ICCID_B,
                                                        "validity_period": 60}])
    assert r.status_code == 201 and r.headers["Content-Type"] == "application/json"
    ops = r.json()
    assert [o["status"]["id"] for o in ops] == [1, 1] and [o["action"]["id"] for o in ops] == [1, 4]
    assert all(uuid.UUID(o["id"]) for o in ops) and "finalization_date" not in ops[0]
    assert ops[1]["iccid_with_luhn"] == ICCID_B and ops[0]["user"]["name"]
    assert r.headers["Link"] == ", ".join(f'</api/v1/euicc/{eid}/operation/{o["id"]}>; rel="item"' for o in ops)
    assert ipa.poll() == ["euiccPackageRequest", "euiccPackageRequest"]


def test_contradicting_operations_only_the_first_applies(learnt):
    server, card, ipa, eid = learnt
    card.profiles[ICCID_NEW] = {"enabled": False, "fallback": False}
    schedule(server, eid, [{"action": {"id": 1}}])
    ipa.poll()                                               # the audit finds the third profile
    schedule(server, eid, [{"action": {"id": 1}}])           # pending: audit (contradicts nothing)
    r = schedule(server, eid, [{"action": {"id": 3}, "iccid_with_luhn": ICCID_B},
                               {"action": {"id": 3}, "iccid_with_luhn": ICCID_NEW},
                               {"action": {"id": 5}, "iccid_with_luhn": ICCID_B},
                               {"action": {"id": 4}, "iccid_with_luhn": ICCID_NEW}])
    ops = r.json()
    assert [o["status"]["id"] for o in ops] == [1, 5, 5, 1]
    assert ops[0]["id"] in ops[1]["error"]["message"] and ops[0]["id"] in ops[2]["error"]["message"]
    # against a pending one
    later = schedule(server, eid, [{"action": {"id": 4}, "iccid_with_luhn": ICCID_B}]).json()[0]
    assert later["status"]["id"] == 5
    ipa.poll()
    assert [op(server, eid, o["id"])["status"]["id"] for o in ops] == [2, 5, 5, 2]
    assert card.profiles[ICCID_B]["enabled"] and card.profiles[ICCID_NEW]["fallback"]


def test_operation_list_filters_and_sorting(learnt):
    server, card, ipa, eid = learnt
    ids = [schedule(server, eid, [o]).json()[0]["id"] for o in (
        {"action": {"id": 1}}, {"action": {"id": 4}, "iccid_with_luhn": ICCID_B}, {"action": {"id": 1}})]
    ipa.poll()
    lst = lambda **p: api(server, "GET", f"/api/v1/euicc/{eid}/operation", params=p)  # noqa: E731
    assert [o["id"] for o in lst().json()] == ids
    assert [o["id"] for o in lst(q="action:1").json()] == [ids[0], ids[2]]
    assert [o["id"] for o in lst(q="status:2").json()] == ids
    assert lst(q="status:1").json() == []
    assert [o["id"] for o in lst(q=f"iccid_with_luhn:{ICCID_B}").json()] == [ids[1]]
    assert [o["id"] for o in lst(q=f"id:{ids[2]}").json()] == [ids[2]]
    assert [o["id"] for o in lst(sort="-creation_date").json()] == ids[::-1]
    assert [o["action"]["id"] for o in lst(sort="-action,creation_date").json()] == [4, 1, 1]
    assert [o["id"] for o in lst(page=2, per_page=2).json()] == [ids[2]]
    for bad in ({"q": "eid:1"}, {"sort": "eid"}, {"per_page": -1}, {"q": "action:x"}):
        assert lst(**bad).status_code == 400, bad


def test_cancel_operation(learnt):
    server, card, ipa, eid = learnt
    oid = schedule(server, eid, [{"action": {"id": 1}}]).json()[0]["id"]
    assert api(server, "DELETE", f"/api/v1/euicc/{eid}/operation/{oid}").status_code == 204
    assert op(server, eid, oid)["status"]["id"] == 5
    assert api(server, "DELETE", f"/api/v1/euicc/{eid}/operation/{oid}").status_code == 400
    assert ipa.poll() == []


# --------------------------------------------------------------------------- fuzzing: never a 5xx

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=30),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=20), kids, max_size=4),
                     max_leaves=20)
_op = st.fixed_dictionaries({"action": st.fixed_dictionaries({"id": st.integers(-1, 7) | _json})},
                            optional={"validity_period": st.integers(-5, 90000) | _json,
                                      "iccid_with_luhn": st.sampled_from([ICCID_A, ICCID_B, ICCID_NEW]) | _json,
                                      "activation_code": st.just(AC) | _json,
                                      "enable": st.booleans() | _json, "rollback": st.booleans() | _json})


@pytest.mark.fuzz
def test_fuzzed_requests_never_get_a_server_error(learnt):
    server, card, ipa, eid = learnt
    http = _session(server)
    auth = {"Authorization": "Bearer " + TOKEN}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=st.lists(_op, max_size=3) | _json, raw=st.binary(max_size=200),
           function=st.sampled_from(sorted(esipa.REQUEST_FOR) + ["x"]), path=st.text(max_size=20))
    def prop(body, raw, function, path):
        r = http.post(f"{server.url}/api/v1/euicc/{eid}/operation", headers=auth, data=json.dumps(body))
        assert r.status_code in (201, 400), r.text
        r = http.get(f"{server.url}/api/v1/euicc/{eid}/operation", headers=auth,
                     params={"q": path, "sort": path, "page": path})
        assert r.status_code in (200, 400)
        r = http.post(server.url + esipa.ASN1_PATH, data=raw, headers={"Content-Type": esipa.ASN1_CONTENT_TYPE})
        assert r.status_code < 500
        r = http.post(server.url + esipa.JSON_PATH_PREFIX + function, data=json.dumps(body))
        assert r.status_code < 500
        r = http.post(server.url + esipa.JSON_PATH_PREFIX + "provideEimPackageResult",
                      json={"eidValue": card.eid, "eimPackageResult": base64.b64encode(raw).decode()})
        assert r.status_code < 500
    prop()
