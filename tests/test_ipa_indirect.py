"""Indirect profile download (SGP.32 §3.2.3, §6.3.2.1-5): the IPA downloads through the eIM.

In-process and real: the test PKI, the local SM-DP+ (testbed), the local eIM with
``indirect=True`` (its EimConfigurationData offers indirectProfileDownload, and it relays
ESipa initiateAuthentication / authenticateClient / getBoundProfilePackage / cancelSession /
handleNotification over ES9+' to the SM-DP+) and a simulated IoT eUICC reached through
ops.card.Card.  The IPA must never open an ES9+ connection itself: its context's server
settings refuse to make an ES9+ client, and the SM-DP+ records who calls it (User-Agent).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import codec, esipa, ops
from agent.errors import AgentError
from agent.es10 import Es10Error
from agent.esipa_download import (CANCEL_SESSION_OK, ERRORS, VIA_EIM, EsipaDownloadClient, error_answer,
                                  error_number)
from agent.ops import ServerSettings
from agent.sim.eim import Es9Relay, serve_eim
from agent.store import Outbox
from test_ipa import IotBed
from testbed import _HookedHandler, make_bed, testbed_pki  # noqa: F401 (fixtures)

S_SUCCEEDED, S_FAILED = 2, 3


class NoDirectEs9(ServerSettings):
    """Server settings under which the IPA cannot reach an SM-DP+ itself."""

    def pool(self, ci_pkids=None):
        raise AssertionError("the IPA made an ES9+ client: that is a direct download")


class PeerLog(_HookedHandler):
    """The SM-DP+'s handler, recording who calls each ES9+ function."""

    def _es9(self, app, function, body):
        self.server.peers.append((function, self.headers.get("User-Agent")))
        return super()._es9(app, function, body)


class IndirectBed(IotBed):
    """test_ipa's bed with the eIM relaying downloads, an ES9+ client forbidden to the IPA, and
    the SM-DP+ logging who talks to it."""

    def __init__(self, pki: Path, work: Path, smdp, *, version: str, binding: str, indirect: bool = True):
        super().__init__(pki, work, smdp, version=version, binding=binding, indirect=indirect,
                         servers=NoDirectEs9 if indirect else ServerSettings)
        httpd = smdp.server.httpd
        httpd.RequestHandlerClass = PeerLog
        httpd.peers = []

    @property
    def peers(self) -> list[tuple[str, str]]:
        return list(self.smdp.server.httpd.peers)


    def learn(self) -> tuple[str, dict]:
        self.run("ipa.add_eim", file=str(self.eim.config_path))
        first = self.run("ipa.poll")
        return first["eid"], self.euicc(first["eid"])

    def outbox(self) -> Outbox:
        return Outbox(self.ctx.outbox_path())


@pytest.fixture
def make_indirect(testbed_pki, make_bed, tmp_path):  # noqa: F811
    beds = []

    def make(**kw) -> IndirectBed:
        b = IndirectBed(testbed_pki, tmp_path / f"indirect{len(beds)}", make_bed(), **kw)
        beds.append(b)
        return b

    yield make
    for b in beds:
        b.close()


def _op_id(created) -> str:
    return created[0]["id"]


def _dl(out: dict) -> dict:
    found = [e for e in out["executed"] if e["kind"] == "profileDownloadTriggerRequest"]
    assert len(found) == 1, out
    return found[0]


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("version,binding", [("1.2", "asn1"), ("1.2", "json"), ("1.0", "asn1"), ("1.0", "json")])
def test_indirect_download_through_the_eim(make_indirect, version, binding):
    bed = make_indirect(version=version, binding=binding)
    eid, rec = bed.learn()
    eims = bed.run("ipa.list_eim")["eims"]
    assert eims[0]["indirect_download"] is True                  # the eUICC holds the eIM's offer
    order = bed.smdp.reserve(eid=eid)
    created = bed.schedule(rec["id"], {"action": {"id": 2}, "activation_code": bed.smdp.ac(order)})
    bed.smdp.server.httpd.peers.clear()

    out = bed.run("ipa.poll")

    dl = _dl(out)
    assert dl["mode"] == "indirect" and dl["outcome"] == "installed", dl
    iccid = dl["iccid"]
    # every ES9+ call the SM-DP+ saw came from the eIM's relay, none from the device
    peers = bed.peers
    assert [f for f, _ in peers] == ["initiateAuthentication", "authenticateClient", "getBoundProfilePackage",
                                     "handleNotification"], peers
    assert {ua for _, ua in peers} == {Es9Relay.USER_AGENT}, peers
    # the PIR reached the SM-DP+ (relayed by the eIM): the order is installed
    assert bed.smdp.wait_order(order["sid"], "installed")["iccid"] == iccid
    assert not bed.smdp.server.es9.sessions
    # the eIM: the operation succeeded and the eUICC record shows the new profile
    assert bed.operation(rec["id"], _op_id(created))["status"]["id"] == S_SUCCEEDED
    with bed.card() as card:
        assert iccid in {p.iccid for p in card.es10.get_profiles_info()}
        assert card.es10.list_notifications() == []              # delivered, so removed from the eUICC
    with bed.outbox() as ob:
        sent = [n for n in ob.list(eid) if n.iccid == iccid and n.operation == "install"]
    assert len(sent) == 1 and sent[0].status == "removed" and sent[0].address == VIA_EIM + f"127.0.0.1:{bed.eim.port}"
    assert dl["notifications"][0]["status"] == "delivered"


def test_indirect_download_then_enable_in_the_same_round(make_indirect):
    bed = make_indirect(version="1.2", binding="asn1")
    eid, rec = bed.learn()
    order = bed.smdp.reserve(eid=eid)
    created = bed.schedule(rec["id"], {"action": {"id": 2}, "activation_code": bed.smdp.ac(order), "enable": True})
    out = bed.run("ipa.poll")
    dl = _dl(out)
    assert dl["mode"] == "indirect" and dl["outcome"] == "installed"
    enable = [e for e in out["executed"] if e["kind"] == "euiccPackageRequest"]
    assert enable and enable[0]["iccid"] == dl["iccid"], out
    assert bed.operation(rec["id"], _op_id(created))["status"]["id"] == S_SUCCEEDED
    with bed.card() as card:
        assert next(p.iccid for p in card.es10.get_profiles_info() if p.state == "enabled") == dl["iccid"]


def test_without_the_offer_the_download_is_direct(make_indirect):
    bed = make_indirect(version="1.2", binding="asn1", indirect=False)
    eid, rec = bed.learn()
    assert bed.run("ipa.list_eim")["eims"][0]["indirect_download"] is False
    order = bed.smdp.reserve(eid=eid)
    bed.schedule(rec["id"], {"action": {"id": 2}, "activation_code": bed.smdp.ac(order)})
    dl = _dl(bed.run("ipa.poll"))
    assert dl["mode"] == "direct" and dl["outcome"] == "installed", dl
    assert {ua for _, ua in bed.peers} and Es9Relay.USER_AGENT not in {ua for _, ua in bed.peers}


@pytest.mark.parametrize("version,binding", [("1.2", "asn1"), ("1.2", "json"), ("1.0", "json")])
def test_refused_authentication_fails_the_operation_and_cancels(make_indirect, version, binding):
    bed = make_indirect(version=version, binding=binding)
    eid, rec = bed.learn()
    order = bed.smdp.reserve(eid=eid)
    wrong = bed.smdp.ac({"matching_id": "NOT-" + order["matching_id"]})
    created = bed.schedule(rec["id"], {"action": {"id": 2}, "activation_code": wrong})

    out = bed.run("ipa.poll")

    dl = _dl(out)
    assert dl["mode"] == "indirect" and dl["outcome"] == "error", dl
    assert dl["error"]["code"] == "matching_id_refused", dl
    assert dl["error"]["details"]["esipa_error"] == 6                # matchingIdRefused, from the eIM
    # the trigger's error result reached the eIM: the operation failed, and says why
    op = bed.operation(rec["id"], _op_id(created))
    assert op["status"]["id"] == S_FAILED, op
    assert "matching_id_refused" in json.dumps(op)
    # the session is cancelled: on the eUICC (ES10b CancelSession) and, relayed, at the SM-DP+
    calls = bed.smdp.es9_calls()
    assert [c["function"] for c in calls] == ["initiateAuthentication", "authenticateClient", "cancelSession"]
    txid = calls[1]["request"]["transactionId"]
    with bed.card() as card:
        with pytest.raises(Es10Error) as e:
            card.es10.cancel_session(bytes.fromhex(txid), 1)
        assert e.value.value == 5                                    # invalidTransactionId: no session left
    assert not bed.smdp.server.es9.sessions
    assert {ua for _, ua in bed.peers} == {Es9Relay.USER_AGENT}
    assert bed.smdp.order(order["sid"])["status"] == "available"     # the order is still usable


def test_install_result_the_eim_cannot_relay_is_kept_and_sent_next_poll(make_indirect):
    bed = make_indirect(version="1.2", binding="asn1")
    eid, rec = bed.learn()
    order = bed.smdp.reserve(eid=eid)
    bed.schedule(rec["id"], {"action": {"id": 2}, "activation_code": bed.smdp.ac(order)})
    bed.smdp.hook("handleNotification", "respond", 503, b"down for maintenance", "text/plain", times=10)

    dl = _dl(bed.run("ipa.poll"))

    assert dl["mode"] == "indirect" and dl["outcome"] == "installed", dl
    assert dl["notifications"][0]["status"] == "failed", dl
    assert bed.smdp.order(order["sid"])["status"] != "installed"
    with bed.card() as card:                                         # still on the eUICC ...
        held = [n.seq_number for n in card.es10.list_notifications()]
    with bed.outbox() as ob:                                         # ... and in the outbox, for the eIM
        pending = [n for n in ob.pending(eid) if n.address.startswith(VIA_EIM)]
    assert [n.seq_number for n in pending] == held and len(held) == 1
    # the generic delivery (a user's `notification process`, the daemon's outbox retry) leaves it
    # to the poll round: it is no SM-DP+ address to connect to
    peers = len(bed.peers)
    import dataclasses
    plain = dataclasses.replace(bed.ctx, servers=ServerSettings(ca=bed.ca))   # this bed's ctx refuses ES9+
    with bed.card() as card:
        proc = ops.run("notification.process", plain, card, {})
    assert [(d["seq_number"], d["status"]) for d in proc["notifications"]] == [(held[0], "waiting")], proc
    assert "ipa poll" in proc["notifications"][0]["last_error"] and len(bed.peers) == peers

    bed.smdp.server.httpd.testbed_hooks.clear()
    again = bed.run("ipa.poll")

    relayed = [e for e in again["executed"] if e["kind"] == "relayedNotifications"]
    assert relayed and relayed[0]["notifications"][0]["status"] == "delivered", again
    assert bed.smdp.wait_order(order["sid"], "installed")
    with bed.card() as card:
        assert card.es10.list_notifications() == []
    assert {ua for _, ua in bed.peers} == {Es9Relay.USER_AGENT}


def test_the_eim_refuses_an_unknown_download(make_indirect):
    """initiateAuthentication naming a trigger the eIM never sent: invalidEimTransactionId."""
    bed = make_indirect(version="1.2", binding="asn1")
    bed.learn()
    from agent.ops.ipa import client_for, select_eim
    with bed.card() as card:
        eim, url = select_eim(bed.ctx, card)
        client = client_for(bed.ctx, card, eim, url)
        try:
            relay = EsipaDownloadClient(client, eim_transaction_id=b"\x07" * 16)
            with pytest.raises(AgentError) as e:
                relay.initiate_authentication(card.es10.get_euicc_challenge(), card.es10.get_euicc_info1().raw,
                                              bed.smdp.address)
        finally:
            client.close()
    assert e.value.code == "invalid_eim_transaction_id" and e.value.details["esipa_error"] == 52
    assert bed.peers == []                                           # nothing reached the SM-DP+


# --------------------------------------------------------------------------- the messages

@pytest.mark.parametrize("version", esipa.VERSIONS)
def test_error_answers_are_the_esipa_error_alternatives(version):
    names = {"initiateAuthentication": ("initiateAuthenticationResponseEsipa", "initiateAuthenticationErrorEsipa"),
             "authenticateClient": ("authenticateClientResponseEsipa", "authenticateClientErrorEsipa"),
             "getBoundProfilePackage": ("getBoundProfilePackageResponseEsipa", "getBoundProfilePackageErrorEsipa"),
             "cancelSession": ("cancelSessionResponseEsipa", "cancelSessionError")}
    for function, table in ERRORS.items():
        for n in table:
            der = error_answer(function, n)
            assert esipa.decode_response(der, version=version) == (names[function][0], (names[function][1], n))
            assert esipa.encode_response(*esipa.decode_response(der, version=version), version=version) == der
    assert esipa.decode_response(CANCEL_SESSION_OK, version=version) == \
        ("cancelSessionResponseEsipa", ("cancelSessionOk", {}))


def test_error_numbers_for_smdp_failures():
    assert error_number("authenticateClient", "matching_id_refused") == 6
    assert error_number("getBoundProfilePackage", "unknown_transaction") == 95
    assert error_number("cancelSession", "unknown_transaction") == 1
    assert error_number("initiateAuthentication", "connection_refused") == 127
    assert error_number("authenticateClient", "eim_refused") == 127


def test_eim_configuration_offers_indirect_download_only_when_asked(testbed_pki, tmp_path):  # noqa: F811
    for indirect in (False, True):
        server = serve_eim(testbed_pki, state_path=tmp_path / f"state-{indirect}.json", indirect=indirect)
        try:
            cfg = codec.decode("EimConfigurationData", server.config_path.read_bytes())
        finally:
            server.shutdown()
        assert ("indirectProfileDownload" in cfg) is indirect
