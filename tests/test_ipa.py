"""The IPAd (SGP.32): ES10b additions, ESipa client, the poll round and the ipa.* operations.

End to end in-process: the test PKI, the local SM-DP+ (testbed.Bed), the local eIM
(agent.sim.eim.EimServer, real HTTPS on loopback) and a simulated IoT eUICC
(agent.sim.euicc with ``iot``) reached through ops.card.Card, as the CLI does.  The
rollback case runs through a real pseudo-terminal (`sim modem --iot --network ICCID:never`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from agent import codec, esep, esipa, ops, tlv
from agent.errors import AgentError
from agent.ops import Context, EimSettings, ServerSettings
from agent.ops.card import Card, CardSettings
from agent.sim.eim import EimServer
from agent.sim.euicc import SimEuicc
from testbed import make_bed, testbed_pki  # noqa: F401 (fixtures)

TOKEN = "ipa-test-token"


# --------------------------------------------------------------------------- the bed

class IotBed:
    """A simulated IoT eUICC (state file), the local eIM in-process and a Context for the IPA."""

    def __init__(self, pki: Path, work: Path, smdp, *, version: str = "1.2", binding: str = "asn1",
                 preload: int = 2, indirect: bool = False, servers=ServerSettings):
        self.pki, self.work, self.smdp = pki, work, smdp
        work.mkdir(parents=True, exist_ok=True)
        self.card_path = work / "iot-card.json"
        SimEuicc.open(self.card_path, preload=preload, pki_dir=pki, iot=True).close()
        if version == "1.0":            # a v1.0 card signs its results the v1.0 way (esep.py)
            st = json.loads(self.card_path.read_text())
            st["esipa_version"] = "1.0"
            self.card_path.write_text(json.dumps(st))
        self.eim = EimServer(pki, token=TOKEN, version=version, state_path=work / "eim-state.json",
                             indirect=indirect).start()
        self.state_dir = work / "state"
        self.ctx = Context(servers=servers(ca=str(pki / "ci.pem"), http_timeout=20),
                           state_dir=self.state_dir, rollback_after=1.0, registration_poll=0.1,
                           eim=EimSettings(esipa_version=version, binding=binding))
        self.api = requests.Session()
        self.api.headers["Authorization"] = f"Bearer {TOKEN}"
        self.ca = str(pki / "ci.pem")      # per request: a session's verify loses to $REQUESTS_CA_BUNDLE

    def card(self) -> Card:
        return Card(CardSettings(sim=str(self.card_path)).validate())

    def run(self, name: str, **params):
        with self.card() as card:
            return ops.run(name, self.ctx, card, params)

    def close(self):
        self.api.close()
        self.eim.shutdown()

    # -- the eIM's REST API --
    def get(self, path: str, **kw):
        r = self.api.get(self.eim.url + "/api/v1" + path, timeout=10, verify=self.ca, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def euicc(self, eid: str) -> dict:
        lst = self.get("/euicc", params={"q": f"eid:{eid}"})
        assert len(lst) == 1, lst
        return lst[0]

    def schedule(self, euicc_id, *items) -> list:
        r = self.api.post(f"{self.eim.url}/api/v1/euicc/{euicc_id}/operation", json=list(items), timeout=10,
                          verify=self.ca)
        assert r.status_code == 201, r.text
        return r.json()

    def operations(self, euicc_id) -> list:
        return self.get(f"/euicc/{euicc_id}/operation")

    def operation(self, euicc_id, op_id) -> dict:
        return self.get(f"/euicc/{euicc_id}/operation/{op_id}")


@pytest.fixture
def make_iot(testbed_pki, make_bed, tmp_path):  # noqa: F811
    beds = []

    def make(**kw) -> IotBed:
        smdp = make_bed()
        b = IotBed(testbed_pki, tmp_path / f"iot{len(beds)}", smdp, **kw)
        beds.append(b)
        return b

    yield make
    for b in beds:
        b.close()


def _eid(bed: IotBed) -> str:
    with bed.card() as card:
        return card.eid


def _associate_and_learn(bed: IotBed) -> tuple[str, dict]:
    out = bed.run("ipa.add_eim", file=str(bed.eim.config_path))
    assert out["added"][0]["eim_id"] == "esim-agent-eim"
    first = bed.run("ipa.poll")
    kinds = [e["kind"] for e in first["executed"]]
    assert "ipaEuiccDataRequest" in kinds and "euiccPackageRequest" in kinds, first
    eid = first["eid"]
    return eid, bed.euicc(eid)


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("version,binding", [("1.2", "asn1"), ("1.2", "json"), ("1.0", "asn1"), ("1.0", "json")])
def test_learn_audit_and_enable(make_iot, version, binding):
    bed = make_iot(version=version, binding=binding)
    eid, rec = _associate_and_learn(bed)
    # the audit reached the eIM: it lists the profiles
    assert len(rec.get("profiles") or rec.get("profile") or []) >= 1 or rec, rec
    with bed.card() as card:
        profiles = card.es10.get_profiles_info()
        disabled = next(p for p in profiles if p.state != "enabled")
        assert card.es10.euicc_package_results() == []        # acknowledged results are gone
    bed.schedule(rec["id"], {"action": {"id": 3}, "iccid_with_luhn": disabled.iccid})
    out = bed.run("ipa.poll")
    enable = [e for e in out["executed"] if e["kind"] == "euiccPackageRequest"]
    assert enable and enable[0]["outcome"] == "executed" and enable[0]["iccid"] == disabled.iccid, out
    with bed.card() as card:
        assert card.es10.get_profiles_info()
        assert next(p.iccid for p in card.es10.get_profiles_info() if p.state == "enabled") == disabled.iccid
        assert card.es10.euicc_package_results() == []
    ops_ = bed.operations(rec["id"])
    assert any(o["action"]["id"] == 3 and o["status"]["id"] in (2, 3, 4) for o in ops_), ops_


def test_download_trigger_end_to_end(make_iot):
    bed = make_iot()
    eid, rec = _associate_and_learn(bed)
    order = bed.smdp.reserve(eid=eid)
    bed.schedule(rec["id"], {"action": {"id": 2}, "activation_code": bed.smdp.ac(order)})
    out = bed.run("ipa.poll")
    dl = [e for e in out["executed"] if e["kind"] == "profileDownloadTriggerRequest"]
    assert dl and dl[0]["outcome"] == "installed", out
    assert any(o["action"]["id"] == 2 and o["status"]["id"] in (2, 3, 4) for o in bed.operations(rec["id"]))


# --------------------------------------------------------------------------- a recording eIM

class RecordingEim:
    """Stands in for EimClient: hands out queued packages, records every result exactly as the
    IPA encoded it (the ESipa body it would send), acknowledges only when told to."""

    def __init__(self, version="1.2", ack=True):
        self.version, self.ack = version, ack
        self.queue: list = []
        self.sent: list = []
        self.address = "fake-eim"

    def get_eim_package(self, **kw):
        from agent.eim_client import EimPackage
        if not self.queue:
            return EimPackage("eimPackageError", esipa.NO_EIM_PACKAGE_AVAILABLE)
        return self.queue.pop(0)

    def provide_eim_package_result(self, value, *, relayed=()):
        from agent.eim_client import ProvideAnswer
        body = esipa.encode_request("provideEimPackageResult", value, version=self.version)
        for blob in relayed:
            assert blob in body
        self.sent.append((value, body))
        if not self.ack:
            return ProvideAnswer([])
        alt, v = value["eimPackageResult"] if self.version == "1.2" else value
        seqs = []
        if alt in ("euiccPackageResult", "ePRAndNotifications"):
            epr = v if alt == "euiccPackageResult" else v["euiccPackageResult"]
            if epr[0] == "euiccPackageResultSigned":
                seqs.append(epr[1]["euiccPackageResultDataSigned"]["seqNumber"])
        return ProvideAnswer(seqs)


def _ipa(bed, client):
    from agent.ipa import Ipa
    card = bed.card().open()
    eim = card.es10.get_eim_configuration_data()[0]
    return Ipa(bed.ctx, card, client, eim), card


def _package(bed, eid, counter, ops_, key=None):
    from agent import crypto
    from agent.eim_client import EimPackage
    key = key or crypto.load_key((bed.pki / "eim" / "eim.key.pem").read_bytes())
    der = esep.build_package_request(key, eim_id="esim-agent-eim", eid=eid, counter=counter, operations=ops_,
                                     transaction_id=bytes(range(16)))
    return EimPackage("euiccPackageRequest", codec.decode("EuiccPackageRequest", der), raw=der)


def test_refused_packages_reach_the_eim_byte_for_byte(make_iot):
    from agent import crypto
    bed = make_iot()
    eid, _ = _associate_and_learn(bed)
    fake = RecordingEim()
    ipa, card = _ipa(bed, fake)
    try:
        listing = [("listProfileInfo", {})]
        # a replay: counter 1 was used by the eIM's audit already
        fake.queue.append(_package(bed, eid, 1, listing))
        # a wrong signature: signed by another key
        fake.queue.append(_package(bed, eid, 10_000, listing, key=crypto.generate_key()))
        done = ipa.poll()
    finally:
        card.close()
    assert [e["outcome"] for e in done] == ["refused", "refused"], done
    kinds = [esep.decode_package_result(_epr_from(body)).kind for _, body in fake.sent]
    assert kinds == ["euiccPackageErrorSigned", "euiccPackageErrorUnsigned"]
    assert esep.decode_package_result(_epr_from(fake.sent[0][1])).error == esep.REPLAY_ERROR


def _epr_from(body: bytes) -> bytes:
    outer = tlv.parse_single(body)                   # BF50
    for t in tlv.children(outer):
        if t.tag == 0xBF51:
            return t.raw
        if t.tag == 0x30:
            return tlv.find(tlv.children(t), 0xBF51).raw
    raise AssertionError(body.hex())


@pytest.mark.parametrize("version", ["1.2", "1.0"])
def test_unusable_trigger_is_answered_with_an_error(make_iot, version):
    from agent.eim_client import EimPackage
    bed = make_iot(version=version)
    _associate_and_learn(bed)
    fake = RecordingEim(version=version)
    fake.queue.append(EimPackage("profileDownloadTriggerRequest",
                                 {"profileDownloadData": ("activationCode", "LPA:9$nonsense"),
                                  "eimTransactionId": b"\x01" * 16}))
    ipa, card = _ipa(bed, fake)
    try:
        done = ipa.poll()
    finally:
        card.close()
    assert done[0]["outcome"] == "error" and done[0]["error"]["code"].startswith("ac_"), done
    value = fake.sent[0][0]
    alt, v = value["eimPackageResult"] if version == "1.2" else value
    assert alt == "profileDownloadTriggerResult"
    kind, err = v["profileDownloadTriggerResultData"]
    assert kind == "profileDownloadError" and b"ac_" in err["errorResponse"]
    if version == "1.2":
        assert err["profileDownloadErrorReason"] == 127 and v["eimTransactionId"] == b"\x01" * 16


def test_results_are_removed_only_after_the_acknowledgement(make_iot):
    bed = make_iot()
    eid, _ = _associate_and_learn(bed)
    silent = RecordingEim(ack=False)
    silent.queue.append(_package(bed, eid, 50, [("listProfileInfo", {})]))
    ipa, card = _ipa(bed, silent)
    try:
        done = ipa.poll()
        assert done[0]["outcome"] == "executed" and done[0]["acknowledged"] == []
        held = card.es10.euicc_package_results()
        assert len(held) == 1                                   # not acknowledged: still on the card
        # next poll: the result is delivered again, before any new work, and removed once acknowledged
        acking = RecordingEim()
        ipa.client = acking
        again = ipa.poll()
        assert again[0]["outcome"] == "redelivered" and again[0]["seq_number"] == done[0]["seq_number"]
        assert _epr_from(acking.sent[0][1]) == held[0]          # byte for byte
        assert card.es10.euicc_package_results() == []
    finally:
        card.close()


def test_unknown_tag_gets_incorrect_tag_list(make_iot):
    from agent.eim_client import EimPackage
    bed = make_iot()
    _associate_and_learn(bed)
    fake = RecordingEim()
    fake.queue.append(EimPackage("ipaEuiccDataRequest", {"tagList": b"\xBF\x22\x9F\x70"}))
    ipa, card = _ipa(bed, fake)
    try:
        done = ipa.poll()
    finally:
        card.close()
    assert done[0]["outcome"] == "error"
    alt, v = fake.sent[0][0]["eimPackageResult"]
    assert v == ("ipaEuiccDataResponseError", {"ipaEuiccDataErrorCode": 1})


def test_add_eim_file_errors(make_iot, tmp_path):
    bed = make_iot()
    with pytest.raises(AgentError) as e:
        bed.run("ipa.add_eim", file=str(tmp_path / "missing.der"))
    assert e.value.code == "eim_config_unreadable"
    bad = tmp_path / "bad.der"
    bad.write_bytes(b"\x30\x03\x80\x01")
    with pytest.raises(AgentError) as e:
        bed.run("ipa.add_eim", file=str(bad))
    assert e.value.code == "bad_eim_config"
    with pytest.raises(AgentError) as e:
        bed.run("ipa.poll")
    assert e.value.code == "no_eim_configured"
