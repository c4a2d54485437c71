"""Profile download end to end (issue item 10: "tests for every step and failure").

agent.flows.download.Downloader drives a real simulated eUICC (DirectTransport → Isdr →
Es10) against the real local SM-DP+ over HTTPS on loopback; see tests/testbed.py.
Failures are injected where they happen in the field: between the server and the card
(tampered BPP), in the PKI (wrong CI, untrusted CA, wrong TLS name), in the order
(unknown matching ID, other EID, confirmation code), on the network (connection dropped
mid-download), at the user (Ctrl-C) and in the server's answers (garbage).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import time

import pytest

from agent import codec, tlv
from agent.errors import AgentError, ProtocolError, ServerError
from agent.es9p import ci_pkids_for_verification
from agent.flows.download import DownloadError
from agent.sim import pki as simpki
from testbed import (FakeEs9Server, Spy, b64, bed, es9_ok, flip_in_bpp, make_bed,  # noqa: F401 (fixtures)
                     other_pki, testbed_pki)

OTHER_EID = "89049032123451234512345678901235"
END_USER_REJECTION, POSTPONED, TIMEOUT = 0, 1, 2

needs_ac = pytest.mark.skipif(importlib.util.find_spec("agent.ac") is None,
                              reason="agent/ac.py (activation codes, H1) has not landed yet")


def spies(bed, *, es9_after=None, es9_before=None):
    """(es10 spy, es9 spy) for one download."""
    return Spy(bed.es10), Spy(bed.client(), after=es9_after, before=es9_before)


def txid_of(es9) -> str:
    return es9.called("initiate_authentication")[0].result.transaction_id


def assert_cancelled_both_sides(bed, es10, es9, *, reason=None, server_accepts=True):
    """ES10b CancelSession went to the card for this transaction (with ``reason``), the card holds no
    session any more, the eUICC's signed answer went to the SM-DP+ (and was accepted)."""
    txid = txid_of(es9)
    cancels = es10.called("cancel_session")
    assert [c.args[0].hex().upper() for c in cancels] == [txid.upper()], "exactly one ES10b CancelSession"
    assert cancels[0].error is None
    kind, ok = codec.decode("CancelSessionResponse", cancels[0].result)
    signed = ok["euiccCancelSessionSigned"]
    assert kind == "cancelSessionResponseOk" and signed["transactionId"].hex().upper() == txid.upper()
    if reason is not None:
        assert cancels[0].args[1] == reason and signed["reason"] == reason
    assert not bed.card_has_session(txid)
    sent = es9.called("cancel_session")
    assert len(sent) == 1 and sent[0].args[0] == txid and sent[0].args[1] == cancels[0].result
    if server_accepts:
        assert sent[0].error is None, sent[0].error
        assert [e.get("failure") for e in bed.es9_calls("cancelSession")] == [None]
    assert not bed.server_has_session(txid)


def assert_nothing_installed(bed, *, notifications=0):
    assert bed.profiles() == []
    assert len(bed.notifications()) == notifications


def install_and_confirm(bed, order, **download_kw):
    """Download, deliver the install notification, and check the order reaches 'installed'."""
    res = bed.download(**download_kw)
    assert res.iccid == order["iccid"]
    assert bed.iccids() == {order["iccid"]}
    deliveries = bed.process_notifications()
    assert [(d.operation, d.status) for d in deliveries] == [("install", "delivered")]
    assert bed.wait_order(order["sid"], "installed")["eid"] == bed.eid
    return res


# --------------------------------------------------------------------------- success


def test_download_by_matching_id_installs_and_reaches_installed(bed):
    order = bed.reserve(matching_id=True)               # by matching ID only, no EID
    assert order["eid"] is None and order["matching_id"]
    steps = []

    def no_cc():
        raise AssertionError("no confirmation code is needed for this order")

    res = bed.download(matching_id=order["matching_id"], ask_confirmation_code=no_cc,
                       progress=lambda step, done, total: steps.append(step))

    # The result describes the installed profile as the card then lists it (GetProfilesInfo),
    # built from the StoreMetadata and the result's ISD-P AID without asking the card again.
    assert res.iccid == order["iccid"] and res.metadata.iccid == order["iccid"]
    assert res.profile is not None and res.profile.iccid == order["iccid"] and res.profile.state == "disabled"
    assert res.isdp_aid == res.profile.isdp_aid
    assert res.metadata.service_provider_name and res.metadata.profile_name
    assert res.apdu_bytes_loaded > 0
    [p] = bed.profiles()
    assert res.profile == p
    assert (p.iccid, p.state, p.profile_name) == (order["iccid"], "disabled", res.metadata.profile_name)
    for step in ("initiateAuthentication", "AuthenticateServer", "authenticateClient", "consent",
                 "PrepareDownload", "getBoundProfilePackage", "loading profile", "installed"):
        assert step in steps
    assert steps.index("AuthenticateServer") < steps.index("PrepareDownload") < steps.index("installed")

    # The SM-DP+ handed the BPP out to this EID; the card holds the install notification for it.
    o = bed.order(order["sid"])
    assert (o["status"], o["eid"]) == ("downloaded", bed.eid)
    [n] = bed.notifications()
    assert (n.seq_number, n.operation, n.address, n.iccid) == (res.notification_seq, "install", bed.address,
                                                              order["iccid"])
    # Delivered → removed from the card → the order is installed.
    [d] = bed.process_notifications()
    assert (d.seq_number, d.operation, d.status) == (res.notification_seq, "install", "delivered")
    assert bed.wait_order(order["sid"], "installed")["error_code"] is None
    assert bed.notifications() == []
    with bed.outbox() as ob:
        assert ob.get(bed.eid, res.notification_seq).status == "removed"
    assert not bed.server.es9.sessions                  # the PIR ended the session on the server
    assert not bed.card_has_session(res.transaction_id)


@pytest.mark.parametrize("matching_id", ["", None], ids=["empty-matching-id", "no-matching-id"])
def test_download_from_default_smdp_reserved_by_eid(bed, matching_id):
    order = bed.reserve(eid=True, matching_id=False)
    assert order["matching_id"] is None and order["eid"] == bed.eid
    install_and_confirm(bed, order, matching_id=matching_id)


@pytest.mark.parametrize("how", ["option", "asked"])
def test_download_with_confirmation_code(bed, how):
    order = bed.reserve(cc="4711-0815")
    asked = []

    def ask():
        asked.append(1)
        return "4711-0815"

    kw = {"confirmation_code": "4711-0815"} if how == "option" else {"ask_confirmation_code": ask}
    install_and_confirm(bed, order, matching_id=order["matching_id"], **kw)
    assert asked == ([] if how == "option" else [1])
    # hashCc went to the server inside euiccSigned2; the code itself never did.
    [gbpp] = bed.es9_calls("getBoundProfilePackage")
    assert "4711" not in str(gbpp["request"])


# --------------------------------------------------------------------------- order refused


def test_unknown_matching_id_refused_and_session_cancelled(bed):
    bed.reserve()                                       # some other, valid order exists
    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id="NO-SUCH-ORDER", es10=es10, es9=es9)
    e = ei.value
    assert (e.step, e.code, e.exit_code) == ("authenticateClient", "matching_id_refused", 1)
    assert "NO-SUCH-ORDER" in e.message and e.details["subject_code"] == "8.2.6"
    # The SM-DP+ already ended its side; the card's session must still be cancelled.
    assert_cancelled_both_sides(bed, es10, es9, server_accepts=False)
    assert_nothing_installed(bed)


def test_eid_mismatch(bed):
    order = bed.reserve(eid=OTHER_EID, matching_id=True)
    assert bed.eid != OTHER_EID
    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    assert (ei.value.step, ei.value.code) == ("authenticateClient", "eid_mismatch")
    assert_cancelled_both_sides(bed, es10, es9, server_accepts=False)
    assert_nothing_installed(bed)
    assert bed.order(order["sid"])["status"] == "available"   # still there for its own eUICC


def test_missing_confirmation_code_cancels_and_keeps_order(bed):
    order = bed.reserve(cc="1234")
    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9, ask_confirmation_code=lambda: None)
    e = ei.value
    assert (e.step, e.code, e.exit_code) == ("PrepareDownload", "confirmation_code_required", 2)
    assert "confirmation code" in e.message
    assert_cancelled_both_sides(bed, es10, es9, reason=POSTPONED)
    assert not es9.called("get_bound_profile_package")  # nothing was fetched
    assert_nothing_installed(bed)
    # Postponed: the order stays downloadable, and a retry with the code installs it.
    assert bed.order(order["sid"])["status"] == "available"
    install_and_confirm(bed, order, matching_id=order["matching_id"], confirmation_code="1234")


def test_user_declines_cancels_with_end_user_rejection(bed):
    order = bed.reserve(matching_id=True)
    shown = []
    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9,
                     consent=lambda meta: shown.append(meta) or False)
    e = ei.value
    assert (e.step, e.code, e.exit_code) == ("consent", "user_rejected", 1)
    assert [m.iccid for m in shown] == [order["iccid"]]     # the user saw what was offered
    assert_cancelled_both_sides(bed, es10, es9, reason=END_USER_REJECTION)
    assert "PrepareDownload" not in [c.kwargs.get("what") for c in es10.called("call_raw")]
    assert_nothing_installed(bed)
    # A rejection is final for the SM-DP+ (SGP.22 §3.1.3): the order fails.
    o = bed.wait_order(order["sid"], "failed")
    assert "endUserRejection" in o["error_message"]


def _tamper_smdp_signature2(ac):
    sig = tlv.parse_single(ac.smdp_signature2)
    return dataclasses.replace(ac, smdp_signature2=tlv.encode(0x5F37, bytes([sig.value[0] ^ 0x80]) + sig.value[1:]))


def _refused_prepare_download(bed):
    order = bed.reserve(matching_id=True)
    es10, es9 = spies(bed, es9_after={"authenticate_client": _tamper_smdp_signature2})
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    return order, es10, es9, ei.value


def test_euicc_refuses_prepare_download(bed):
    order, es10, es9, e = _refused_prepare_download(bed)
    assert (e.step, e.code) == ("PrepareDownload", "invalid_signature")
    # The eUICC's error answer went to the SM-DP+ (in place of a PrepareDownloadResponse), which ended it.
    [g] = bed.es9_calls("getBoundProfilePackage")
    assert g["failure"][:2] == ("8.1", "3.8") and "invalidSignature" in g["failure"][2]
    assert not bed.server.es9.sessions
    assert_nothing_installed(bed)
    assert bed.order(order["sid"])["status"] == "available"


def test_no_card_session_left_after_prepare_download_refusal(bed):
    _, _, es9, _ = _refused_prepare_download(bed)
    assert not bed.card_has_session(txid_of(es9))


def _rewrite_server_signed1(field, value):
    def after(ia):
        v = codec.decode("ServerSigned1", ia.server_signed1)
        v[field] = value
        return dataclasses.replace(ia, server_signed1=codec.encode("ServerSigned1", v))
    return after


@pytest.mark.parametrize("field,value,code", [
    ("serverAddress", "smdp.example.net", "smdp_address_mismatch"),
    ("euiccChallenge", b"\x00" * 16, "challenge_mismatch")])
def test_lpa_checks_server_signed1(bed, field, value, code):
    order = bed.reserve(matching_id=True)
    es10, es9 = spies(bed, es9_after={"initiate_authentication": _rewrite_server_signed1(field, value)})
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    assert (ei.value.step, ei.value.code) == ("initiateAuthentication", code)
    # Caught before the eUICC was asked to authenticate the server.
    assert [c.kwargs.get("what") for c in es10.called("call_raw")] == []
    assert_nothing_installed(bed)


def test_wrong_confirmation_code_then_retries_exceeded(make_bed):
    bed = make_bed(cc_attempts=2)
    order = bed.reserve(cc="1234")
    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9, confirmation_code="9999")
    e = ei.value
    assert (e.step, e.code, e.exit_code) == ("getBoundProfilePackage", "confirmation_code_wrong", 1)
    assert_cancelled_both_sides(bed, es10, es9)
    assert_nothing_installed(bed)
    assert bed.order(order["sid"])["status"] == "available"   # one wrong try of two

    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9, confirmation_code="0000")
    assert (ei.value.step, ei.value.code) == ("getBoundProfilePackage", "confirmation_code_retries_exceeded")
    assert not bed.card_has_session(txid_of(es9)) and not bed.server_has_session(txid_of(es9))
    assert bed.wait_order(order["sid"], "failed")["status"] == "failed"
    assert_nothing_installed(bed)

    # The order is blocked: even the right code no longer gets the profile.
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], confirmation_code="1234")
    assert ei.value.code == "matching_id_refused"
    assert_nothing_installed(bed)


# --------------------------------------------------------------------------- PKI / TLS


def test_card_with_other_ci_is_refused_by_the_server(make_bed, other_pki):
    bed = make_bed(card_pki_dir=other_pki)              # the eUICC knows another CI than the SM-DP+
    order = bed.reserve(matching_id=True)
    with pytest.raises(AgentError) as ei:
        bed.download(matching_id=order["matching_id"])
    e = ei.value
    assert e.code == "unsupported_ci_pkid" and e.exit_code == 1
    assert "CI" in e.message
    assert [(c["function"], c["failure"][:2]) for c in bed.es9_log] == [("initiateAuthentication", ("8.8.2", "3.1"))]
    assert_nothing_installed(bed)
    assert bed.order(order["sid"])["status"] == "available"


def _claim_server_ci(bed):
    """An LPA-side rewrite of euiccInfo1 (not signed) claiming the server's CI, so the SM-DP+
    goes ahead and the *eUICC* has to refuse CERT.DPauth."""
    server_ci = simpki.load_pki(bed.pki_dir).ci.ski

    def before(challenge, info1, address):
        v = codec.decode("EUICCInfo1", info1)
        v["euiccCiPKIdListForVerification"] = [server_ci]
        v["euiccCiPKIdListForSigning"] = [server_ci]
        return (challenge, codec.encode("EUICCInfo1", v), address), {}
    return before


def _tamper_signature1(ia):
    sig = tlv.parse_single(ia.server_signature1)
    bad = tlv.encode(0x5F37, bytes([sig.value[0] ^ 0x01]) + sig.value[1:])
    return dataclasses.replace(ia, server_signature1=bad)


@pytest.mark.parametrize("case", ["ci_unknown", "bad_signature"])
def test_euicc_refuses_authenticate_server(make_bed, other_pki, case):
    if case == "ci_unknown":
        bed = make_bed(card_pki_dir=other_pki)
        es9 = Spy(bed.client(narrow_trust=False), before={"initiate_authentication": _claim_server_ci(bed)})
        outcome = "ciPKUnknown"
    else:
        bed = make_bed()
        es9 = Spy(bed.client(), after={"initiate_authentication": _tamper_signature1})
        outcome = "invalidSignature"
    order = bed.reserve(matching_id=True)
    es10 = Spy(bed.es10)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    e = ei.value
    assert e.step == "AuthenticateServer" and e.details["function"] == "AuthenticateServer"
    assert outcome in e.message and e.exit_code == 1
    assert e.details["result"] == {"ci_unknown": 7, "bad_signature": 2}[case]   # SGP.22 AuthenticateErrorCode
    # The SM-DP+ got the eUICC's error answer and ended the transaction; nothing else happened.
    [ac] = bed.es9_calls("authenticateClient")
    assert ac["failure"][:2] == ("8.1", "3.8") and outcome in ac["failure"][2]
    assert not bed.server.es9.sessions
    assert not es9.called("get_bound_profile_package") and not es10.called("cancel_session")
    assert_nothing_installed(bed)


def test_untrusted_tls_certificate_sends_nothing(bed, other_pki):
    order = bed.reserve(matching_id=True)
    with pytest.raises(AgentError) as ei:
        bed.download(matching_id=order["matching_id"], es9=bed.client(ca=str(other_pki / "ci.pem")))
    e = ei.value
    assert e.code == "tls_untrusted" and e.exit_code == 3
    assert "localhost" in e.message
    assert bed.es9_log == []                           # no ES9+ request reached the SM-DP+
    assert_nothing_installed(bed)
    assert bed.order(order["sid"])["status"] == "available"


def test_tls_host_name_mismatch(make_bed, other_pki):
    bed = make_bed(other_pki)                           # CERT.DP.TLS names other.example, we dial localhost
    order = bed.reserve(matching_id=True)
    with pytest.raises(AgentError) as ei:
        bed.download(matching_id=order["matching_id"])
    e = ei.value
    assert e.code == "tls_hostname_mismatch" and e.exit_code == 3
    assert "localhost" in e.message
    assert bed.es9_log == []
    assert_nothing_installed(bed)


# --------------------------------------------------------------------------- BPP tampering


@pytest.mark.parametrize("tag,command", [(0x87, "configureISDP"), (0x88, "storeMetadata"),
                                         (0x86, "loadProfileElements")])
def test_tampered_bpp_segment_is_refused_and_reported(bed, tag, command):
    order = bed.reserve(matching_id=True)
    es10, es9 = spies(bed, es9_after={"get_bound_profile_package": lambda bpp: flip_in_bpp(bpp, tag)})
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    e = ei.value
    assert (e.step, e.code) == ("loading profile", "install_scp03t_security_error")
    assert (e.details["bpp_command"], e.details["error_reason"]) == (command, "scp03tSecurityError")
    # The eUICC ended the session itself with a signed error result: nothing to cancel.
    assert not es10.called("cancel_session") and not bed.card_has_session(txid_of(es9))
    assert bed.profiles() == []

    # The error PIR waits on the card; it names the command and the reason.
    [n] = bed.notifications()
    assert (n.seq_number, n.operation) == (e.details["notification_seq"], "install")
    # The ICCID is known to the eUICC only once StoreMetadata went through.
    assert n.iccid == (order["iccid"] if tag == 0x86 else None)
    [p] = bed.es10.retrieve_notifications(seq=n.seq_number)
    pir = codec.decode("ProfileInstallationResult", p.der)["profileInstallationResultData"]
    kind, res = pir["finalResult"]
    cmd_ids = {"configureISDP": 1, "storeMetadata": 2, "loadProfileElements": 5}
    assert (kind, res["bppCommandId"], res["errorReason"]) == ("errorResult", cmd_ids[command], 8)
    assert pir["transactionId"].hex().upper() == txid_of(es9).upper()

    # Delivered to the SM-DP+, which fails the order with the eUICC's reason.
    [d] = bed.process_notifications()
    assert (d.seq_number, d.status) == (n.seq_number, "delivered")
    o = bed.wait_order(order["sid"], "failed")
    assert o["error_code"] == "8" and "scp03tSecurityError" in o["error_message"]
    assert bed.notifications() == []


# --------------------------------------------------------------------------- network failures


def test_connection_dropped_before_bpp_then_retry_works(bed):
    order = bed.reserve(matching_id=True)
    bed.hook("getBoundProfilePackage", "drop")          # the request never reaches the SM-DP+
    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    e = ei.value
    assert bed.hooks_fired == [("getBoundProfilePackage", "drop")]
    assert (e.step, e.code, e.exit_code) == ("getBoundProfilePackage", "connection_lost", 3)
    assert "getBoundProfilePackage" in e.message
    assert_cancelled_both_sides(bed, es10, es9)
    assert_nothing_installed(bed)
    assert bed.order(order["sid"])["status"] == "available"
    # A fresh session from the start works and the profile gets installed.
    install_and_confirm(bed, order, matching_id=order["matching_id"])


def test_slow_server_times_out_cancels_with_timeout_and_order_survives(bed):
    order = bed.reserve(matching_id=True)
    bed.hook("getBoundProfilePackage", "delay", 0.8)
    es10 = Spy(bed.es10)
    es9 = Spy(bed.client(timeout=(5.0, 0.3)))
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    e = ei.value
    assert (e.step, e.code, e.exit_code) == ("getBoundProfilePackage", "read_timeout", 3)
    assert_cancelled_both_sides(bed, es10, es9, reason=TIMEOUT)
    # The late request then finds its transaction cancelled, so the order is never handed out.
    deadline = time.monotonic() + 5
    while not bed.es9_calls("getBoundProfilePackage") or "failure" not in bed.es9_calls("getBoundProfilePackage")[0]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert bed.es9_calls("getBoundProfilePackage")[0]["failure"][:2] == ("8.10.1", "3.9")
    assert_nothing_installed(bed)
    assert bed.order(order["sid"])["status"] == "available"
    install_and_confirm(bed, order, matching_id=order["matching_id"])


def _drop_bpp_answer(bed):
    """Download with the getBoundProfilePackage answer lost after the server produced it."""
    order = bed.reserve(matching_id=True)
    bed.hook("getBoundProfilePackage", "drop-after")
    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    assert bed.hooks_fired == [("getBoundProfilePackage", "drop-after")]
    return order, es10, es9, ei.value


def test_connection_dropped_after_server_bound_the_bpp(bed):
    order, es10, es9, e = _drop_bpp_answer(bed)
    assert (e.step, e.code, e.exit_code) == ("getBoundProfilePackage", "connection_lost", 3)
    assert len(bed.es9_calls("getBoundProfilePackage")) == 1   # not resent (not idempotent)
    assert_cancelled_both_sides(bed, es10, es9)
    assert_nothing_installed(bed)                       # no half-installed profile, no PIR
    # A fresh challenge and session can be started on the card.
    assert len(bed.es10.get_euicc_challenge()) == 16


def test_retry_after_lost_bpp_answer_installs(bed):
    order, _, _, _ = _drop_bpp_answer(bed)
    install_and_confirm(bed, order, matching_id=order["matching_id"])


# --------------------------------------------------------------------------- Ctrl-C


class _Interrupt:
    def __init__(self, at_step: str, after_bytes: bool = False):
        self.at_step, self.after_bytes, self.fired = at_step, after_bytes, False

    def __call__(self, step, done, total):
        if step == self.at_step and (done > 0 or not self.after_bytes) and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def _raise_interrupt(meta):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["consent", "progress-PrepareDownload", "progress-loading"])
def test_ctrl_c_cancels_session_postponed(bed, where):
    order = bed.reserve(matching_id=True)
    es10, es9 = spies(bed)
    kw: dict = {}
    if where == "consent":
        kw["consent"] = _raise_interrupt
    elif where == "progress-PrepareDownload":
        kw["progress"] = _Interrupt("PrepareDownload")
    else:
        kw["progress"] = _Interrupt("loading profile", after_bytes=True)   # after the first segment
    with pytest.raises(KeyboardInterrupt):
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9, **kw)
    assert_cancelled_both_sides(bed, es10, es9, reason=POSTPONED)
    loaded = [c for c in es10.called("call_raw") if c.kwargs.get("what") == "LoadBoundProfilePackage"]
    assert len(loaded) == (1 if where == "progress-loading" else 0)
    assert_nothing_installed(bed)
    if where != "progress-loading":
        assert bed.order(order["sid"])["status"] == "available"


# --------------------------------------------------------------------------- garbage from the server


GARBAGE = {
    "malformed_json": (200, b'{"header": {"functionExecutionStatus": ', "application/json"),
    "malformed_base64": (200, es9_ok(transactionId="0A0B0C0D", serverSigned1="MIIB*not base64*"),
                         "application/json"),
    "malformed_der": (200, es9_ok(transactionId="0A0B0C0D", serverSigned1=b64(b"\x30\x20\x80\x04\x0a\x0b")),
                      "application/json"),
    "http_status": (500, b"<html><body>Internal error</body></html>", "text/html"),
}


@pytest.mark.parametrize("code", list(GARBAGE))
def test_garbage_from_a_fake_smdp(bed, code):
    status, body, ctype = GARBAGE[code]
    with FakeEs9Server(bed.pki_dir, lambda fn, req: (status, body, ctype)) as fake:
        with pytest.raises(AgentError) as ei:
            bed.download(matching_id="X", address=fake.address, es9=bed.client(address=fake.address))
    e = ei.value
    assert isinstance(e, DownloadError) and e.step == "initiateAuthentication"
    assert e.code == code
    assert isinstance(e.__cause__, ServerError if code == "http_status" else ProtocolError)
    assert e.exit_code == (1 if code == "http_status" else 3)
    assert e.details["function"] == "initiateAuthentication"
    assert [fn for fn, _ in fake.requests] == ["initiateAuthentication"]
    assert_nothing_installed(bed)


def _bpp_field(value_of):
    def rewrite(obj):
        obj["boundProfilePackage"] = value_of(obj["boundProfilePackage"])
        return obj
    return rewrite


def _truncated_b64(v):
    import base64
    return b64(base64.b64decode(v)[:-7])


@pytest.mark.parametrize("code", ["malformed_json", "malformed_base64", "malformed_der"])
def test_garbage_bpp_answer_cancels_session(bed, code):
    order = bed.reserve(matching_id=True)
    if code == "malformed_json":
        bed.hook("getBoundProfilePackage", "respond", 200, b"\x00\xffnot json", "application/json")
    elif code == "malformed_base64":
        bed.hook("getBoundProfilePackage", "rewrite", _bpp_field(lambda v: "%%" + v[2:]))
    else:
        bed.hook("getBoundProfilePackage", "rewrite", _bpp_field(_truncated_b64))
    es10, es9 = spies(bed)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9)
    e = ei.value
    assert (e.step, e.code, e.exit_code) == ("getBoundProfilePackage", code, 3)
    assert isinstance(e.__cause__, ProtocolError)
    assert_cancelled_both_sides(bed, es10, es9)
    assert not [c for c in es10.called("call_raw") if c.kwargs.get("what") == "LoadBoundProfilePackage"]
    assert_nothing_installed(bed)


def test_trust_is_narrowed_to_the_euicc_cis(bed):
    """Sanity check of the bed itself: the card lists exactly the bed's CI."""
    info1 = bed.es10.get_euicc_info1()
    assert ci_pkids_for_verification(info1.raw) == [simpki.load_pki(bed.pki_dir).ci.ski]


# --------------------------------------------------------------------------- the CLI


@needs_ac
def test_cli_download_with_activation_code(bed):
    order = bed.reserve(matching_id=True)
    run = bed.cli("--json", "profile", "download", bed.ac(order), "--ca", bed.ca, "--yes")
    assert run.rc == 0, run
    assert run.doc["ok"] is True, run
    data = run.doc["data"]
    assert data["profile"]["iccid"] == order["iccid"]
    assert data["smdp_address"] == bed.address
    assert [(n["operation"], n["status"]) for n in data["notifications"]] == [("install", "delivered")]
    assert bed.iccids() == {order["iccid"]}
    assert bed.notifications() == []
    assert bed.wait_order(order["sid"], "installed")
    with bed.outbox() as ob:
        assert [(n.operation, n.status) for n in ob.list(bed.eid)] == [("install", "removed")]


@needs_ac
def test_cli_download_from_smdp_address_without_matching_id(bed):
    order = bed.reserve(eid=True, matching_id=False)
    run = bed.cli("--json", "profile", "download", "--smdp", bed.address, "--ca", bed.ca, "--yes")
    assert run.rc == 0, run
    assert run.doc["data"]["profile"]["iccid"] == order["iccid"]
    assert bed.wait_order(order["sid"], "installed")


@needs_ac
def test_cli_download_refused_reports_step_and_code(bed):
    run = bed.cli("--json", "profile", "download", f"LPA:1${bed.address}$NOT-AN-ORDER", "--ca", bed.ca, "--yes")
    assert run.rc == 1, run
    assert run.doc["ok"] is False
    err = run.doc["error"]
    assert err["code"] == "matching_id_refused" and err["details"]["step"] == "authenticateClient"
    assert "Traceback" not in run.stderr
    assert bed.profiles() == []


@needs_ac
def test_cli_download_untrusted_ca(bed, other_pki):
    order = bed.reserve(matching_id=True)
    run = bed.cli("--json", "profile", "download", bed.ac(order), "--ca", other_pki / "ci.pem", "--yes")
    assert run.rc == 3, run
    assert run.doc["error"]["code"] == "tls_untrusted"
    assert bed.es9_log == [] and bed.profiles() == []


def test_activation_code_oid_must_match_dpauth(bed):
    """SGP.22 §4.1: an SM-DP+ OID in the activation code names the server; CERT.DPauth carries it."""
    order = bed.reserve(matching_id=True)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], smdp_oid="1.2.3.4")
    assert ei.value.code == "smdp_oid_mismatch" and ei.value.step == "initiateAuthentication"
    assert "1.2.3.4" in ei.value.message
    assert_nothing_installed(bed)
    # the right OID (the test PKI's) passes
    from agent.sim.pki import load_pki
    res = bed.download(matching_id=order["matching_id"], smdp_oid=load_pki(bed.pki_dir).smdp_oid)
    assert res.iccid == order["iccid"]


def test_ctx_params1_announces_lte_and_codes_tac_and_imei():
    """DeviceCapabilities must carry eutranEpcSupportedRelease (tag 85) or an SM-DP+ may find no
    eligible profile; TAC/IMEI follow SGP.22 §4.2 codings."""
    from agent import codec, tlv
    from agent.flows.download import ctx_params1
    raw = ctx_params1("MID-1", "356938035643809")
    kind, v = codec.decode("CtxParams1", raw)
    caps = v["deviceInfo"]["deviceCapabilities"]
    assert caps["eutranEpcSupportedRelease"][0] >= 8 and "rspCrlSupportedVersion" not in caps
    assert v["deviceInfo"]["tac"] == bytes.fromhex("53968330")
    assert v["deviceInfo"]["imei"] == bytes.fromhex("539683306534089F")
    assert v["matchingId"] == "MID-1"
    dev = tlv.find(tlv.children(tlv.find(tlv.children(tlv.parse_single(raw)), 0xA1)), 0xA1)
    assert 0x85 in [t.tag for t in tlv.children(dev)]


def test_the_es9_client_is_made_when_the_first_es9_call_is_due():
    """Downloader(make_es9=...) (ops/download.py): the client's set-up runs after the card's first
    ES10 calls (it overlaps them in a CLI run), and not at all when the card fails first."""
    from agent.errors import CardError
    from agent.flows.download import DownloadOptions, Downloader
    made, order = [], []

    class Es10Fake:
        def __init__(self, fail):
            self.fail = fail

        def get_euicc_info1(self):
            order.append("info1")
            if self.fail:
                raise CardError("no card", code="card_gone")
            return type("Info1", (), {"raw": bytes.fromhex("BF2000")})()

        def get_euicc_challenge(self):
            order.append("challenge")
            return bytes(16)

    class Es9Fake:
        def initiate_authentication(self, *a):
            order.append("initiateAuthentication")
            raise ServerError("refused", code="es9_refused")

    def make():
        made.append(1)
        order.append("make_es9")
        return Es9Fake()

    with pytest.raises(DownloadError):
        Downloader(Es10Fake(True), None, DownloadOptions(address="smdp.example.com"), make_es9=make).run()
    assert made == [] and order == ["info1"]
    order.clear()
    with pytest.raises(DownloadError):
        Downloader(Es10Fake(False), None, DownloadOptions(address="smdp.example.com"), make_es9=make).run()
    assert made == [1] and order == ["info1", "challenge", "make_es9", "initiateAuthentication"]
