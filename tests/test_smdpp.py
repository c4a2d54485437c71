"""agent/sim/smdpp.py: the local SM-DP+'s ES9+ endpoints over real HTTPS on loopback.

The eUICC side is hand-rolled here from the test PKI (pki.issue_euicc) so each
message can be built correctly *or* broken on purpose: every signature the
server checks is made with a real key over the exact DER bytes (docs/protocol.md §4.3),
and everything the server returns is verified with its certificates.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import time

import pytest
import requests

from agent import crypto, tlv
from agent.es8p import BppReceiver
from agent.ids import eid_to_bytes, iccid_from_bytes, iccid_to_bytes
from agent.sim import pki as simpki
from agent.sim.smdpp import PMO_BITS, PMO_VALUES, SmdpServer, pmo_name
from agent.sim.upp import upp_iccid

EID_A = "89049032123451234512345678901235"
EID_B = "89049032123451234512345678909999"
ES9 = "/gsma/rsp2/es9plus/"
HDRS = {"Content-Type": "application/json", "X-Admin-Protocol": "gsma/rsp/v2.2.2", "User-Agent": "gsma-rsp-lpad"}


def _oid_content(dotted: str) -> bytes:
    """OBJECT IDENTIFIER contents (X.690 §8.19), written out here independently of the codec."""
    arcs = [int(p) for p in dotted.split(".")]
    out = bytearray()
    for n in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [n & 0x7F]
        while n > 0x7F:
            n >>= 7
            chunk.append(0x80 | (n & 0x7F))
        out += bytes(reversed(chunk))
    return bytes(out)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    simpki.make_pki(d)
    return d


@pytest.fixture
def srv(pki_dir):
    s = SmdpServer(pki_dir, reserve_delay=0.01, cc_attempts=3)
    s.start()
    yield s
    s.stop()


class Card:
    """The eUICC side of one download, enough of SGP.22 ES10b to drive the server."""

    def __init__(self, pki, eid: str, *, eum=None, ci_pkid=None):
        self.pki = pki
        self.eid = eid
        self.eum = eum or pki.eum
        self.ident = simpki.issue_euicc(self.eum, eid)
        self.ci_pkid = ci_pkid or pki.ci_pkid
        self.challenge = os.urandom(16)

    def info1(self, verify=None, sign=None) -> bytes:
        lst = lambda ids: b"".join(tlv.encode(0x04, i) for i in ids)  # noqa: E731
        return tlv.encode(0xBF20, tlv.encode(0x82, b"\x02\x02\x00")
                          + tlv.encode(0xA9, lst(verify or [self.ci_pkid]))
                          + tlv.encode(0xAA, lst(sign or [self.ci_pkid])))

    def authenticate_server(self, init: dict, matching_id: str | None, *, tamper_sig=False,
                            server_challenge=None) -> bytes:
        """Check what initiateAuthentication returned, then build BF38 (AuthenticateServerResponse)."""
        signed1 = tlv.parse_single(unb64(init["serverSigned1"]))
        f = {t.tag: t.value for t in tlv.children(signed1)}
        sig1 = tlv.parse_single(unb64(init["serverSignature1"]))
        dpauth = crypto.load_cert(unb64(init["serverCertificate"]))
        assert crypto.verify_raw(dpauth, signed1.raw, sig1.value), "serverSignature1 must verify"
        assert crypto.verify_issued_by(dpauth, self.pki.ci.cert)
        assert f[0x81] == self.challenge and f[0x80].hex().upper() == init["transactionId"]
        assert unb64(init["euiccCiPKIdToBeUsed"]) == tlv.encode(0x04, self.pki.ci_pkid)
        ctx_inner = b"" if matching_id is None else tlv.encode(0x80, matching_id.encode())
        ctx_inner += tlv.encode(0xA1, tlv.encode(0x80, bytes.fromhex("35290611")) + tlv.encode(0xA1, b""))
        signed = tlv.encode(0x30, tlv.encode(0x80, f[0x80]) + tlv.encode(0x83, f[0x83])
                            + tlv.encode(0x84, server_challenge or f[0x84])
                            + tlv.encode(0xBF22, tlv.encode(0x81, b"\x02\x02\x00"))
                            + tlv.encode(0xA0, ctx_inner))  # ctxParams1: CHOICE alternative A0
        sig = crypto.sign_raw(self.ident.key, signed)
        if tamper_sig:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        self.sig1_tlv = tlv.encode(0x5F37, sig)
        self.txid = f[0x80]
        return tlv.encode(0xBF38, tlv.encode(0xA0, signed + self.sig1_tlv + self.ident.der + self.eum.der))

    def prepare_download(self, ac: dict, cc: str | None = None, *, cc_hash=None) -> bytes:
        """Check authenticateClient's answer, then build BF21 (PrepareDownloadResponse)."""
        signed2 = tlv.parse_single(unb64(ac["smdpSigned2"]))
        sig2 = tlv.parse_single(unb64(ac["smdpSignature2"]))
        dppb = crypto.load_cert(unb64(ac["smdpCertificate"]))
        assert crypto.verify_raw(dppb, signed2.raw + self.sig1_tlv, sig2.value), "smdpSignature2 must verify"
        f = {t.tag: t.value for t in tlv.children(signed2)}
        assert f[0x80] == self.txid
        self.cc_required = f[0x01] == b"\xff"
        self.metadata = unb64(ac["profileMetadata"])
        self.dppb = dppb
        self.otsk = crypto.generate_key()
        body = tlv.encode(0x80, self.txid) + tlv.encode(0x5F49, crypto.public_point(self.otsk))
        if cc_hash is not None:
            body += tlv.encode(0x04, cc_hash)
        elif cc is not None:
            body += tlv.encode(0x04, hashlib.sha256(hashlib.sha256(cc.encode()).digest() + self.txid).digest())
        signed = tlv.encode(0x30, body)
        sig = crypto.sign_raw(self.ident.key, signed + sig2.raw)
        return tlv.encode(0xBF21, tlv.encode(0xA0, signed + tlv.encode(0x5F37, sig)))

    def load(self, bpp_b64: str) -> BppReceiver:
        rx = BppReceiver(euicc_otsk=self.otsk, dppb_public_key=self.dppb, eid=eid_to_bytes(self.eid),
                         expected_transaction_id=self.txid)
        rx.feed(unb64(bpp_b64))
        assert rx.complete
        return rx

    def pir(self, iccid: str, *, ok=True, smdp_oid=None, key=None) -> bytes:
        meta = tlv.encode(0xBF2F, tlv.encode(0x80, b"\x01") + tlv.encode(0x81, PMO_BITS["install"])
                          + tlv.encode(0x0C, b"localhost") + tlv.encode(0x5A, iccid_to_bytes(iccid)))
        result = (tlv.encode(0xA0, tlv.encode(0x4F, bytes.fromhex("A0000005591010FFFFFFFF8900001000"))
                             + tlv.encode(0x04, b"")) if ok
                  else tlv.encode(0xA1, tlv.encode(0x80, b"\x05") + tlv.encode(0x81, b"\x09")))
        data = tlv.encode(0xBF27, tlv.encode(0x80, self.txid) + meta
                          + tlv.encode(0x06, _oid_content(smdp_oid or self.pki.smdp_oid))
                          + tlv.encode(0xA2, result))
        sig = crypto.sign_raw(key or self.ident.key, data)
        return tlv.encode(0xBF37, data + tlv.encode(0x5F37, sig))

    def cancel(self, reason: int, *, smdp_oid=None) -> bytes:
        signed = tlv.encode(0x30, tlv.encode(0x80, self.txid)
                            + tlv.encode(0x81, _oid_content(smdp_oid or self.pki.smdp_oid))
                            + tlv.encode(0x82, bytes([reason])))
        sig = crypto.sign_raw(self.ident.key, signed)
        return tlv.encode(0xBF41, tlv.encode(0xA0, signed + tlv.encode(0x5F37, sig)))

    def other_notification(self, event: str, iccid: str, seq: int = 7) -> bytes:
        tbs = tlv.encode(0xBF2F, tlv.encode(0x80, bytes([seq])) + tlv.encode(0x81, PMO_BITS[event])
                         + tlv.encode(0x0C, b"localhost") + tlv.encode(0x5A, iccid_to_bytes(iccid)))
        sig = crypto.sign_raw(self.ident.key, tbs)
        return tlv.encode(0x30, tbs + tlv.encode(0x5F37, sig) + self.ident.der + self.eum.der)


def call(srv, fn: str, body, *, headers=None, raw: bytes | None = None) -> requests.Response:
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(f"{srv.url}{ES9}{fn}", data=data, headers=headers or HDRS,
                         verify=str(srv.pki_dir) + "/ci.pem", timeout=10)


def ok(r: requests.Response) -> dict:
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["X-Admin-Protocol"].startswith("gsma/rsp/v2")
    d = r.json()
    assert d["header"]["functionExecutionStatus"]["status"] == "Executed-Success", d
    return d


def failed(r: requests.Response, subject: str, reason: str) -> str:
    assert r.status_code == 200, r.text
    st = r.json()["header"]["functionExecutionStatus"]
    assert st["status"] == "Failed", st
    assert (st["statusCodeData"]["subjectCode"], st["statusCodeData"]["reasonCode"]) == (subject, reason), st
    return st["statusCodeData"]["message"]


def order(srv, **kw) -> dict:
    rec = srv.store.create(**kw)
    return wait_status(srv, rec["sid"], "available")


def wait_status(srv, sid: str, want: str, timeout: float = 3.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rec = srv.store.get(sid)
        if rec["status"] == want:
            return rec
        time.sleep(0.01)
    raise AssertionError(f"order {sid} is {srv.store.get(sid)['status']}, wanted {want}")


def initiate(srv, card: Card, address=None) -> requests.Response:
    return call(srv, "initiateAuthentication", {"euiccChallenge": b64(card.challenge),
                                                "euiccInfo1": b64(card.info1()),
                                                "smdpAddress": address or srv.address})


def authenticate(srv, card: Card, matching_id: str | None, **kw):
    init = ok(initiate(srv, card))
    assert len(init["transactionId"]) == 32 and init["transactionId"] == init["transactionId"].upper()
    bf38 = card.authenticate_server(init, matching_id, **kw)
    return init["transactionId"], call(srv, "authenticateClient",
                                       {"transactionId": init["transactionId"],
                                        "authenticateServerResponse": b64(bf38)})


def download(srv, card: Card, matching_id: str | None, cc: str | None = None):
    txid, r = authenticate(srv, card, matching_id)
    ac = ok(r)
    pdr = card.prepare_download(ac, cc)
    r = call(srv, "getBoundProfilePackage", {"transactionId": txid, "prepareDownloadResponse": b64(pdr)})
    return txid, ac, r


def notify(srv, blob: bytes) -> requests.Response:
    return call(srv, "handleNotification", {"pendingNotification": b64(blob)})


# --- the happy paths -------------------------------------------------------------------------


def test_activation_code_download_to_installed(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    card = Card(pki, EID_A)
    txid, ac, r = download(srv, card, o["matching_id"])
    assert card.cc_required is False
    # profileMetadata: StoreMetadataRequest for this order's ICCID, with notification addresses
    md = {t.tag: t for t in tlv.children(tlv.parse_single(card.metadata))}
    assert iccid_from_bytes(md[0x5A].value) == o["iccid"]
    assert md[0x91].value and md[0x92].value
    nci = [{c.tag: c.value for c in tlv.children(e)} for e in tlv.children(md[0xB6])]
    assert {n[0x80] for n in nci} == {PMO_BITS["enable"], PMO_BITS["disable"], PMO_BITS["delete"]}
    assert all(n[0x81] == srv.address.encode() for n in nci)
    assert 0x95 not in md                                   # operational is the DER default
    assert md[0xB7].value == tlv.encode(0x80, bytes.fromhex("00F110"))  # owner MCC 001 MNC 01
    bpp = ok(r)
    assert bpp["transactionId"] == txid
    rx = card.load(bpp["boundProfilePackage"])
    assert rx.store_metadata_request == card.metadata     # the BPP carries the same metadata bytes
    assert upp_iccid(bytes(rx.upp)) == o["iccid"]
    assert not rx.ppk_used
    assert srv.store.get(o["sid"])["status"] == "downloaded"
    assert srv.store.get(o["sid"])["eid"] == EID_A       # bound to the EID that fetched it
    r = notify(srv, card.pir(o["iccid"]))
    assert r.status_code == 204 and r.content == b""
    assert srv.store.get(o["sid"])["status"] == "installed"
    # the session is gone after the PIR; a duplicate PIR is acknowledged and changes nothing
    assert notify(srv, card.pir(o["iccid"])).status_code == 204
    assert srv.store.get(o["sid"])["status"] == "installed"
    failed(call(srv, "getBoundProfilePackage", {"transactionId": txid, "prepareDownloadResponse": b64(b"\xbf\x21\x00")}),
           "8.10.1", "3.9")


def test_default_smdp_download_by_eid(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, eid=EID_A)
    card = Card(pki, EID_A)
    _, _, r = download(srv, card, None)           # no matchingId at all
    card.load(ok(r)["boundProfilePackage"])
    assert srv.store.get(o["sid"])["status"] == "downloaded"
    o2 = order(srv, eid=EID_A)
    _, _, r = download(srv, Card(pki, EID_A), "")  # empty matchingId: same default path
    ok(r)
    assert srv.store.get(o2["sid"])["status"] == "downloaded"


def test_confirmation_code_and_ppk(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True, confirmation_code="1234", use_ppk=True)
    card = Card(pki, EID_A)
    _, _, r = download(srv, card, o["matching_id"], cc="1234")
    assert card.cc_required is True
    rx = card.load(ok(r)["boundProfilePackage"])
    assert rx.ppk_used and upp_iccid(bytes(rx.upp)) == o["iccid"]


def test_bpp_retry_with_same_request_gets_same_package(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    card = Card(pki, EID_A)
    txid, r = authenticate(srv, card, o["matching_id"])
    pdr = card.prepare_download(ok(r))
    body = {"transactionId": txid, "prepareDownloadResponse": b64(pdr)}
    first = ok(call(srv, "getBoundProfilePackage", body))["boundProfilePackage"]
    again = ok(call(srv, "getBoundProfilePackage", body))["boundProfilePackage"]
    assert first == again


def test_notification_event_encodings_agree():
    from agent import codec
    for ev, raw in PMO_BITS.items():
        enc = codec.encode("NotificationMetadata", {"seqNumber": 1, "profileManagementOperation": PMO_VALUES[ev],
                                                    "notificationAddress": "x"})
        assert tlv.encode(0x81, raw) in enc
        assert pmo_name(codec.decode("NotificationMetadata", enc)["profileManagementOperation"]) == ev


# --- refusals ----------------------------------------------------------------------------------


def test_wrong_smdp_address(srv, pki_dir):
    card = Card(simpki.load_pki(pki_dir), EID_A)
    failed(initiate(srv, card, address="other.example.com"), "8.8.1", "3.8")


def test_no_common_ci(srv, pki_dir):
    card = Card(simpki.load_pki(pki_dir), EID_A, ci_pkid=os.urandom(20))
    failed(initiate(srv, card), "8.8.2", "3.1")


def test_unknown_matching_id(srv, pki_dir):
    card = Card(simpki.load_pki(pki_dir), EID_A)
    _, r = authenticate(srv, card, "NOPE-NOPE")
    failed(r, "8.2.6", "3.8")


def test_eid_mismatch(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, eid=EID_A, generate_matching_id=True)
    _, r = authenticate(srv, Card(pki, EID_B), o["matching_id"])
    failed(r, "8.1.1", "3.8")
    assert srv.store.get(o["sid"])["status"] == "available"


def test_no_eligible_profile_for_default_path(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    order(srv, eid=EID_A)
    _, r = authenticate(srv, Card(pki, EID_B), None)
    failed(r, "8.2.5", "4.3")


def test_bad_euicc_signature_and_foreign_eum(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    _, r = authenticate(srv, Card(pki, EID_A), o["matching_id"], tamper_sig=True)
    failed(r, "8.1", "6.1")
    _, r = authenticate(srv, Card(pki, EID_A), o["matching_id"], server_challenge=os.urandom(16))
    failed(r, "8.1", "6.1")
    _, eum2 = simpki.new_ci_and_eum()                  # an EUM from some other CI
    _, r = authenticate(srv, Card(pki, EID_A, eum=eum2), o["matching_id"])
    failed(r, "8.1.2", "6.1")
    assert srv.store.get(o["sid"])["status"] == "available"


def test_confirmation_code_missing_wrong_and_retries(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True, confirmation_code="2468")
    card = Card(pki, EID_A)
    txid, r = authenticate(srv, card, o["matching_id"])
    ac = ok(r)

    def gbpp(**kw):
        return call(srv, "getBoundProfilePackage",
                    {"transactionId": txid, "prepareDownloadResponse": b64(card.prepare_download(ac, **kw))})

    failed(gbpp(), "8.2.7", "2.2")
    failed(gbpp(cc="0000"), "8.2.7", "3.8")
    failed(gbpp(cc="1111"), "8.2.7", "3.8")
    failed(gbpp(cc="9999"), "8.2.7", "6.4")
    rec = srv.store.get(o["sid"])
    assert rec["status"] == "failed" and rec["error_code"]
    failed(gbpp(cc="2468"), "8.10.1", "3.9")           # session ended with the order
    _, r = authenticate(srv, Card(pki, EID_A), o["matching_id"])
    failed(r, "8.2.6", "3.8")


def test_downloaded_order_is_single_use(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    _, _, r = download(srv, Card(pki, EID_A), o["matching_id"])
    ok(r)
    _, r = authenticate(srv, Card(pki, EID_A), o["matching_id"])
    assert "already downloaded" in failed(r, "8.2.6", "3.8")
    _, r = authenticate(srv, Card(pki, EID_B), o["matching_id"])
    failed(r, "8.1.1", "3.8")                          # now bound to EID_A
    _, r = authenticate(srv, Card(pki, EID_A), None)
    failed(r, "8.2.5", "4.3")


def test_expired_session_after_bpp_gives_the_order_back(srv, pki_dir):
    """The eUICC lost its session while loading (modem power cut): no signed cancel can come.
    When the session expires without a result the order is available again for the same EID,
    and a late PIR of an install that did happen still marks it installed."""
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    _, _, r = download(srv, Card(pki, EID_A), o["matching_id"])
    ok(r)
    assert srv.store.get(o["sid"])["status"] == "downloaded"
    srv.es9.session_ttl = 0.0
    with srv.es9._lock:
        srv.es9._expire()
    assert srv.store.get(o["sid"])["status"] == "available" and not srv.es9.sessions
    srv.es9.session_ttl = 600.0
    _, _, r = download(srv, Card(pki, EID_A), o["matching_id"])   # the retry gets the order
    ok(r)
    assert srv.store.get(o["sid"])["status"] == "downloaded"


def test_unexpired_bound_session_keeps_the_order(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    _, _, r = download(srv, Card(pki, EID_A), o["matching_id"])
    ok(r)
    with srv.es9._lock:
        srv.es9._expire()
    assert srv.store.get(o["sid"])["status"] == "downloaded"


def test_two_sessions_race_for_one_order(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    a, b = Card(pki, EID_A), Card(pki, EID_B)
    ta, ra = authenticate(srv, a, o["matching_id"])
    tb, rb = authenticate(srv, b, o["matching_id"])
    pa, pb = a.prepare_download(ok(ra)), b.prepare_download(ok(rb))
    ok(call(srv, "getBoundProfilePackage", {"transactionId": ta, "prepareDownloadResponse": b64(pa)}))
    failed(call(srv, "getBoundProfilePackage", {"transactionId": tb, "prepareDownloadResponse": b64(pb)}),
           "8.8.5", "6.4")
    assert srv.store.get(o["sid"])["eid"] == EID_A


def test_unknown_transaction_id(srv):
    r = call(srv, "authenticateClient", {"transactionId": "00" * 16,
                                         "authenticateServerResponse": b64(b"\xbf\x38\x00")})
    failed(r, "8.10.1", "3.9")
    failed(call(srv, "cancelSession", {"transactionId": "ABCD", "cancelSessionResponse": "vyEA"}), "8.10.1", "3.9")


def test_euicc_error_alternatives_are_reported(srv, pki_dir):
    card = Card(simpki.load_pki(pki_dir), EID_A)
    init = ok(initiate(srv, card))
    err = tlv.encode(0xBF38, tlv.encode(0xA1, tlv.encode(0x80, bytes.fromhex(init["transactionId"]))
                                        + tlv.encode(0x02, b"\x06")))
    msg = failed(call(srv, "authenticateClient", {"transactionId": init["transactionId"],
                                                  "authenticateServerResponse": b64(err)}), "8.1", "3.8")
    assert "euiccChallengeMismatch" in msg


# --- notifications and cancellation ---------------------------------------------------------------


def test_pir_with_error_marks_order_failed(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    card = Card(pki, EID_A)
    _, _, r = download(srv, card, o["matching_id"])
    ok(r)
    assert notify(srv, card.pir(o["iccid"], ok=False)).status_code == 204
    rec = srv.store.get(o["sid"])
    assert rec["status"] == "failed" and rec["error_code"] == "9" and "IccidAlreadyExists" in rec["error_message"]


def test_pir_with_bad_signature_is_refused(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    card = Card(pki, EID_A)
    ok(download(srv, card, o["matching_id"])[2])
    failed(notify(srv, card.pir(o["iccid"], key=crypto.generate_key())), "8.1", "6.1")
    assert srv.store.get(o["sid"])["status"] == "downloaded"


def test_pir_after_restart_verified_with_remembered_cert(pki_dir, tmp_path):
    pki = simpki.load_pki(pki_dir)
    state = tmp_path / "smdp.json"
    with SmdpServer(pki_dir, state_path=state, reserve_delay=0.01) as s1:
        o = order(s1, generate_matching_id=True)
        card = Card(pki, EID_A)
        ok(download(s1, card, o["matching_id"])[2])
    with SmdpServer(pki_dir, state_path=state, reserve_delay=0.01) as s2:
        assert s2.store.get(o["sid"])["status"] == "downloaded"
        assert notify(s2, card.pir(o["iccid"])).status_code == 204
        assert s2.store.get(o["sid"])["status"] == "installed"


def test_other_signed_notification_recorded(srv, pki_dir):
    card = Card(simpki.load_pki(pki_dir), EID_A)
    r = notify(srv, card.other_notification("enable", "8999900000000000017"))
    assert r.status_code == 204
    ev = srv.store.events()[-1]
    assert ev["event"] == "enable" and ev["eid"] == EID_A and ev["iccid"] == "8999900000000000017"
    foreign_ci, foreign_eum = simpki.new_ci_and_eum()
    bad = Card(simpki.load_pki(pki_dir), EID_B, eum=foreign_eum)
    failed(notify(srv, bad.other_notification("delete", "8999900000000000017")), "8.1.2", "6.1")


@pytest.mark.parametrize("reason,status", [(1, "available"), (2, "available"), (0, "failed"), (3, "failed")])
def test_cancel_session(srv, pki_dir, reason, status):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    card = Card(pki, EID_A)
    txid, r = authenticate(srv, card, o["matching_id"])
    ok(r)
    wrong = call(srv, "cancelSession", {"transactionId": txid, "cancelSessionResponse": b64(card.cancel(1, smdp_oid="2.999.77"))})
    failed(wrong, "8.8", "3.8")
    ok(call(srv, "cancelSession", {"transactionId": txid, "cancelSessionResponse": b64(card.cancel(reason))}))
    assert srv.store.get(o["sid"])["status"] == status
    failed(call(srv, "cancelSession", {"transactionId": txid, "cancelSessionResponse": b64(card.cancel(reason))}),
           "8.10.1", "3.9")


# --- malformed input never gets a 5xx -----------------------------------------------------------------


def test_http_level_errors(srv):
    r = call(srv, "initiateAuthentication", None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["header"]["functionExecutionStatus"]["status"] == "Failed"
    r = call(srv, "initiateAuthentication", {"a": 1}, headers={"Content-Type": "text/plain"})
    failed(r, "1.2.1", "2.1")
    r = requests.get(f"{srv.url}{ES9}initiateAuthentication", verify=str(srv.pki_dir) + "/ci.pem", timeout=5)
    assert r.status_code == 405
    assert call(srv, "noSuchFunction", {}).status_code == 404
    assert requests.get(f"{srv.url}/nowhere", verify=str(srv.pki_dir) + "/ci.pem", timeout=5).status_code == 404
    failed(call(srv, "initiateAuthentication", {"euiccChallenge": "***", "euiccInfo1": "", "smdpAddress": "x"}),
           "8.1", "2.1")
    failed(call(srv, "initiateAuthentication", {"euiccInfo1": "", "smdpAddress": "x"}), "8.1", "2.2")
    failed(call(srv, "initiateAuthentication", ["list"]), "1.2.1", "2.1")
    assert call(srv, "initiateAuthentication", None, raw=b"[" * 200000).status_code == 400   # nesting bomb
    # a chunked request body is read like any other
    body = json.dumps({"euiccInfo1": "", "smdpAddress": "x"}).encode()
    r = requests.post(f"{srv.url}{ES9}initiateAuthentication", data=iter([body[:5], body[5:]]), headers=HDRS,
                      verify=str(srv.pki_dir) + "/ci.pem", timeout=5)
    failed(r, "8.1", "2.2")


def test_garbage_never_crashes_the_server(srv, pki_dir):
    pki = simpki.load_pki(pki_dir)
    o = order(srv, generate_matching_id=True)
    rnd = random.Random(5)
    card = Card(pki, EID_A)
    txid, r = authenticate(srv, card, o["matching_id"])
    good = {"authenticateClient": None, "getBoundProfilePackage": card.prepare_download(ok(r)),
            "handleNotification": card.pir(o["iccid"]), "cancelSession": card.cancel(1)}
    fields = {"authenticateClient": "authenticateServerResponse", "getBoundProfilePackage": "prepareDownloadResponse",
              "handleNotification": "pendingNotification", "cancelSession": "cancelSessionResponse"}
    for _ in range(120):
        fn = rnd.choice(list(fields))
        blob = good[fn] or card.authenticate_server(ok(initiate(srv, card)), o["matching_id"])
        blob = bytearray(blob)
        for _ in range(rnd.randint(1, 4)):           # flip, cut or extend a few bytes
            kind = rnd.randrange(3)
            if kind == 0 and blob:
                blob[rnd.randrange(len(blob))] ^= 1 << rnd.randrange(8)
            elif kind == 1 and blob:
                del blob[rnd.randrange(len(blob)):]
            else:
                blob += bytes([rnd.randrange(256)])
        body = {fields[fn]: b64(bytes(blob)), "transactionId": rnd.choice([txid, "zz", "", 5, None])}
        r = call(srv, fn, body)
        assert r.status_code < 500, (fn, r.status_code, r.text)
    for fn in list(fields) + ["initiateAuthentication"]:
        for body in ({}, {"transactionId": txid}, {fields.get(fn, "euiccInfo1"): 12}, {"transactionId": [1]}):
            assert call(srv, fn, body).status_code < 500


# --- with the real agent pieces: simulated eUICC (ES10) + ES9+ client + download flow ---------------


def _agent_side(tmp_path, pki_dir):
    euicc = pytest.importorskip("agent.sim.euicc")
    from agent.apdu import Isdr
    from agent.es10 import Es10
    from agent.es9p import Es9pClient
    from agent.transport.direct import DirectTransport
    card = euicc.SimEuicc.open(tmp_path / "card.json", pki_dir=pki_dir)
    isdr = Isdr(DirectTransport(card))
    return card, isdr, Es10, Es9pClient


def test_agent_downloads_installs_and_reports_events(srv, pki_dir, tmp_path):
    from agent.flows.download import DownloadError, DownloadOptions, Downloader
    card, isdr, Es10, Es9pClient = _agent_side(tmp_path, pki_dir)
    by_ac = order(srv, generate_matching_id=True, confirmation_code="4321")
    by_eid = order(srv, eid=card.eid)
    with isdr:
        es10 = Es10(isdr)
        es9 = Es9pClient(srv.address, ca=str(pki_dir / "ci.pem"))

        def run(mid, cc=None):
            opts = DownloadOptions(address=srv.address, matching_id=mid, confirmation_code=cc,
                                   consent=lambda m: True)
            return Downloader(es10, es9, opts).run()

        with pytest.raises(DownloadError) as e:
            run(by_ac["matching_id"], cc="0000")
        assert "confirmation" in str(e.value).lower()
        assert srv.store.get(by_ac["sid"])["status"] == "available"   # one wrong CC is not fatal
        assert run(by_ac["matching_id"], cc="4321").iccid == by_ac["iccid"]
        assert run("").iccid == by_eid["iccid"]                        # default SM-DP+ path
        for p in es10.retrieve_notifications():
            es9.handle_notification(p.der)
            es10.remove_notification(p.seq_number)
        assert srv.store.get(by_ac["sid"])["status"] == "installed"
        assert srv.store.get(by_eid["sid"])["status"] == "installed"
        es10.enable_profile(by_eid["iccid"])
        for p in es10.retrieve_notifications():
            es9.handle_notification(p.der)
        events = {(ev["event"], ev["iccid"]) for ev in srv.store.events()}
        assert ("enable", by_eid["iccid"]) in events
        assert all(ev["eid"] == card.eid for ev in srv.store.events())
        es9.close()


def test_line_wrapped_base64_is_accepted(srv, pki_dir):
    """Some Java LPAs wrap base64 at 76 characters with CRLF; the server must still read it."""
    import textwrap
    card = Card(simpki.load_pki(pki_dir), EID_A)
    wrapped = "\r\n".join(textwrap.wrap(b64(card.info1()), 32))
    assert "\r\n" in wrapped
    r = call(srv, "initiateAuthentication", {"euiccChallenge": b64(card.challenge), "euiccInfo1": wrapped,
                                             "smdpAddress": srv.address})
    assert len(ok(r)["transactionId"]) == 32
    r = call(srv, "initiateAuthentication", {"euiccChallenge": b64(card.challenge), "euiccInfo1": "@@notb64@@",
                                             "smdpAddress": srv.address})
    failed(r, "8.1", "2.1")
