"""SGP.32 end to end through the simulated modem and the daemon, as an operator runs it.

Every part is a real process (tests/iot_testbed.py): `sim pki`, `sim smdpp` (reservations
through its Twilio-style API), `sim eim` (operations through its emnify-style REST API, over
HTTPS checked against the PKI's CI, with the Bearer token), `sim modem --iot --preload 2
--pki DIR` on a pseudo-terminal, the daemon with an ``[eim]`` table, and the CLI
(`ipa add-eim`, `ipa poll`, `profile list`, `ipa status`) going through the daemon.
What is asserted is what the eIM reports (operation status and error, the eUICC record's
profile statuses) and what the card really holds (`profile list` through the daemon).

Two beds, each module-scoped and used by the tests in file order:

* ``A``: every profile registers. The five emnify actions, an expired operation, failing
  ones, then a replayed package (the eIM's counter lowered while it was stopped) and a
  wrongly signed one (the eIM restarted with another signing key).
* ``B``: the second preloaded profile never registers (``--network ICCID:never``),
  rollback_after and fallback_after 3 s: an enable with rollback is rolled back; an enable
  without one sticks, and the daemon falls back to the fallback profile.
"""
from __future__ import annotations

import json
import time

import pytest
from conftest import time_limit
from iot_testbed import IotBed, make_iot_bed, wait_for

# emnify's ids (GET /api/v1/euicc/operation/status, /api/v1/euicc/profile/status)
SCHEDULED, SUCCEEDED, FAILED, EXPIRED = 1, 2, 3, 4
INSTALLED, DISABLED, ENABLED, DELETED = 5, 7, 8, 9
AUDIT, DOWNLOAD, ENABLE, FALLBACK, DELETE = 1, 2, 3, 4, 5

SETTLE_S = 3            # rollback_after and fallback_after of bed B


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(60):
        yield


@pytest.fixture(scope="module")
def A():
    with time_limit(60, "bed A set-up"):
        bed = make_iot_bed("a", config={"rollback_after": 10}, eim_lines=("poll_interval = 86400",
                                                                          "fallback_after = 0"))
    bed.notes = {}
    yield bed
    bed.close()


@pytest.fixture(scope="module")
def B():
    with time_limit(60, "bed B set-up"):
        bed = make_iot_bed("b", never=(1,), config={"rollback_after": SETTLE_S},
                           eim_lines=("poll_interval = 86400", f"fallback_after = {SETTLE_S}"))
    yield bed
    bed.close()


# --------------------------------------------------------------------------- helpers

def record(bed: IotBed) -> dict:
    return bed.eim.api("GET", f"/api/v1/euicc/{bed.euicc_id}")


def statuses(rec: dict) -> dict[str, int]:
    return {p["iccid_with_luhn"]: p["status"]["id"] for p in rec["profile"]}


def fallback_of(rec: dict) -> list[str]:
    return [p["iccid_with_luhn"] for p in rec["profile"] if p["fallback_attribute"]]


def card(bed: IotBed) -> dict[str, str]:
    """The card's profiles as the daemon reads them: {iccid: state}."""
    r = bed.world.cli("--json", "profile", "list")
    assert r.rc == 0 and r.doc["ok"], r
    return {p["iccid"]: p["state"] for p in r.doc["data"]["profiles"]}


def ipa_status(bed: IotBed) -> dict:
    r = bed.world.cli("--json", "ipa", "status")
    assert r.rc == 0 and r.doc["ok"], r
    return r.doc["data"]


def schedule(bed: IotBed, *items: dict) -> list[dict]:
    ops = bed.eim.api("POST", f"/api/v1/euicc/{bed.euicc_id}/operation", list(items))
    assert [o["status"]["id"] for o in ops] == [SCHEDULED] * len(items), ops
    return ops


def operation(bed: IotBed, op_id: str) -> dict:
    return bed.eim.api("GET", f"/api/v1/euicc/{bed.euicc_id}/operation/{op_id}")


def poll(bed: IotBed) -> dict:
    """`esim-agent --json ipa poll` (through the daemon)."""
    r = bed.world.cli("--json", "ipa", "poll")
    assert r.rc == 0 and r.doc["ok"], r
    assert r.doc["data"]["eid"] == bed.eid and r.doc["data"]["eim_id"] == "esim-agent-eim", r
    return r.doc["data"]


def final(bed: IotBed, op_id: str, timeout: float = 10) -> dict:
    """The operation once it left Scheduled."""
    return wait_for(lambda: (o := operation(bed, op_id))["status"]["id"] != SCHEDULED and o, timeout,
                    f"operation {op_id} is still scheduled", bed.world)


def run(bed: IotBed, *items: dict) -> list[dict]:
    """Schedule through the REST API, `ipa poll`, the operations as the eIM then reports them."""
    ops = schedule(bed, *items)
    bed.last_poll = poll(bed)
    return [final(bed, o["id"]) for o in ops]


def packages(data: dict, kind: str = "euiccPackageRequest") -> list[dict]:
    return [e for e in data["executed"] if e["kind"] == kind]


def restart_eim(bed: IotBed, change) -> None:
    """Stop the eIM, ``change()`` its files, start it again on the same port."""
    port = bed.eim.port
    bed.eim.stop()
    change()
    bed.eim.start()
    assert bed.eim.port == port


# =========================================================================== bed A: the five actions

def test_first_poll_learnt_the_euicc(A):
    rec = record(A)
    p1, p2 = A.iccids
    assert rec["eid"] == A.eid
    assert statuses(rec) == {p1: ENABLED, p2: DISABLED}
    assert all(p["preloaded"] for p in rec["profile"]) and fallback_of(rec) == []
    assert rec["last_polled"] and rec["last_audited"], rec
    assert card(A) == {p1: "enabled", p2: "disabled"}
    # the eIM checked the eUICC's certificate chain: it can verify the card's signatures
    assert A.eim.state()["euiccs"][A.eid]["cert_ok"] is True
    # every result the card signed was acknowledged and removed from it
    assert ipa_status(A)["undelivered_results"] == 0


def test_audit(A):
    before = record(A)
    time.sleep(0.01)          # the record's timestamps have millisecond resolution
    (op,) = run(A, {"action": {"id": AUDIT}, "validity_period": 600})
    assert (op["action"]["id"], op["status"]["id"], op.get("error")) == (AUDIT, SUCCEEDED, None), op
    assert op["finalization_date"]
    (pkg,) = packages(A.last_poll)
    assert (pkg["outcome"], pkg["operations"]) == ("executed", ["listProfileInfo"]), pkg
    assert sorted(pkg["results"][0]["result"]) == sorted(A.iccids), pkg
    rec = record(A)
    assert rec["last_audited"] > before["last_audited"] and rec["last_polled"] > before["last_polled"], rec
    assert statuses(rec) == statuses(before)


def test_download_two_profiles_one_enabled_with_rollback(A):
    keep, enable = A.smdp.reserve(), A.smdp.reserve()
    assert keep["iccid"] != enable["iccid"] and keep["activation_code"].startswith(f"1${A.smdp.address}$")
    p1, p2 = A.iccids
    op_keep, op_enable = run(
        A, {"action": {"id": DOWNLOAD}, "activation_code": "LPA:" + keep["activation_code"]},
        {"action": {"id": DOWNLOAD}, "activation_code": "LPA:" + enable["activation_code"], "enable": True,
         "rollback": True})
    assert op_keep["status"]["id"] == SUCCEEDED and op_enable["status"]["id"] == SUCCEEDED, (op_keep, op_enable)
    assert (op_keep["iccid_with_luhn"], op_enable["iccid_with_luhn"]) == (keep["iccid"], enable["iccid"])
    # one poll round: two direct downloads from the SM-DP+, then the enable PSMO (with rollbackFlag) at once
    dls = packages(A.last_poll, "profileDownloadTriggerRequest")
    assert [(d["outcome"], d["iccid"]) for d in dls] == [("installed", keep["iccid"]), ("installed", enable["iccid"])]
    (en,) = packages(A.last_poll)
    assert (en["operations"], en["outcome"], en["iccid"], en["previous"], en["attached"]) == \
        (["enable"], "executed", enable["iccid"], p1, True), en
    rec = record(A)
    assert statuses(rec) == {p1: DISABLED, p2: DISABLED, keep["iccid"]: INSTALLED, enable["iccid"]: ENABLED}
    assert card(A) == {p1: "disabled", p2: "disabled", keep["iccid"]: "disabled", enable["iccid"]: "enabled"}
    # the SM-DP+ heard of both installations (the PIRs went to it too)
    for order in (keep, enable):
        wait_for(lambda o=order: A.smdp.order(o["sid"])["status"] == "installed", 15,
                 f"order {order['sid']} is not installed", A.world)
    A.notes.update(kept=keep["iccid"], downloaded=enable["iccid"])


def test_set_fallback(A):
    p1 = A.iccids[0]
    (op,) = run(A, {"action": {"id": FALLBACK}, "iccid_with_luhn": p1})
    assert (op["status"]["id"], op["iccid_with_luhn"], op.get("error")) == (SUCCEEDED, p1, None), op
    assert fallback_of(record(A)) == [p1]
    st = ipa_status(A)
    assert (st["fallback_profile"], st["fallback_active"], st["enabled_profile"]) == \
        (p1, False, A.notes["downloaded"]), st


def test_enable(A):
    p1, p2 = A.iccids
    (op,) = run(A, {"action": {"id": ENABLE}, "iccid_with_luhn": p2, "rollback": True})
    assert (op["status"]["id"], op.get("error")) == (SUCCEEDED, None), op
    (pkg,) = packages(A.last_poll)
    assert (pkg["iccid"], pkg["previous"], pkg["attached"]) == (p2, A.notes["downloaded"], True), pkg
    rec = record(A)
    assert statuses(rec) == {p1: DISABLED, p2: ENABLED, A.notes["kept"]: INSTALLED, A.notes["downloaded"]: DISABLED}
    assert fallback_of(rec) == [p1]
    assert card(A)[p2] == "enabled" and list(card(A).values()).count("enabled") == 1


def test_delete(A):
    kept = A.notes["kept"]
    (op,) = run(A, {"action": {"id": DELETE}, "iccid_with_luhn": kept})
    assert (op["status"]["id"], op.get("error")) == (SUCCEEDED, None), op
    rec = record(A)
    assert statuses(rec)[kept] == DELETED
    profiles = card(A)
    assert kept not in profiles and sorted(profiles) == sorted([*A.iccids, A.notes["downloaded"]])
    assert ipa_status(A)["undelivered_results"] == 0


# =========================================================================== bed A: expired, failing

def test_expired_operation_is_never_executed(A):
    p2, downloaded = A.iccids[1], A.notes["downloaded"]
    before = card(A)
    (op,) = schedule(A, {"action": {"id": ENABLE}, "iccid_with_luhn": downloaded, "validity_period": 1})
    time.sleep(1.3)
    data = poll(A)
    assert data["executed"] == [], data                  # the eIM had nothing to send
    op = final(A, op["id"])
    assert (op["status"]["id"], op.get("error")) == (EXPIRED, None), op
    assert A.eim.state()["operations"][op["id"]]["sent"] is False
    assert card(A) == before and before[p2] == "enabled"
    assert statuses(record(A))[downloaded] == DISABLED


def test_failing_operations_are_failed_with_the_error(A):
    p1, p2 = A.iccids
    before = card(A)
    bogus = f"LPA:1${A.smdp.address}$NO-SUCH-MATCHING-ID"
    delete_fallback, download = run(A, {"action": {"id": DELETE}, "iccid_with_luhn": p1},
                                    {"action": {"id": DOWNLOAD}, "activation_code": bogus})
    # the eUICC refuses to delete the fallback profile (SGP.32 deleteResult returnFallbackProfile)
    assert delete_fallback["status"]["id"] == FAILED, delete_fallback
    err = delete_fallback["error"]
    assert (err["reason"], err["reason_name"]) == (21, "returnFallbackProfile"), err
    assert err["message"].startswith("returnFallbackProfile: "), err
    # the SM-DP+ knows no such matching id: the IPA answers the trigger with a profileDownloadError
    assert download["status"]["id"] == FAILED, download
    err = download["error"]
    assert (err["reason"], err["reason_name"]) == (127, "profileDownloadError"), err
    assert err["message"].startswith("profileDownloadError: the device could not download the profile: "), err
    assert card(A) == before and before[p2] == "enabled"
    rec = record(A)
    assert statuses(rec)[p1] == DISABLED and fallback_of(rec) == [p1]


# =========================================================================== bed A: replay, signature

def _card_counter(bed: IotBed) -> int:
    """The last counter the eUICC accepted from the eIM, from the simulated card's own state
    (GetEimConfigurationData gives back the configuration as it was added)."""
    (eim,) = json.loads(bed.world.card_path.read_text())["eims"]
    assert eim["eim_id"] == "esim-agent-eim", eim
    return eim["counter"]


def test_replayed_package_is_rejected_and_the_eim_hears_of_it(A):
    accepted = _card_counter(A)
    before = card(A)

    def lower_counter():
        st = A.eim.state()
        rec = st["euiccs"][A.eid]
        assert rec["counter"] == accepted and rec["inflight"] is None, rec
        rec["counter"] = accepted - 1           # the next package repeats the last accepted counter
        A.eim.state_path.write_text(json.dumps(st))
    restart_eim(A, lower_counter)

    (op,) = run(A, {"action": {"id": ENABLE}, "iccid_with_luhn": A.notes["downloaded"]})
    assert op["status"]["id"] == FAILED, op
    assert (op["error"]["reason"], op["error"]["reason_name"]) == (4, "replayError"), op
    assert op["error"]["message"].startswith("replayError: "), op
    (pkg,) = packages(A.last_poll)
    assert (pkg["outcome"], pkg["counter"]) == ("refused", accepted), pkg
    assert pkg["error"] == {"kind": "euiccPackageErrorSigned", "code": 4}, pkg
    assert card(A) == before and _card_counter(A) == accepted
    assert statuses(record(A))[A.notes["downloaded"]] == DISABLED
    # the counter moved past the card's: the next package is accepted
    (op,) = run(A, {"action": {"id": AUDIT}})
    assert op["status"]["id"] == SUCCEEDED, op
    assert _card_counter(A) == accepted + 1


def test_wrongly_signed_package_is_rejected_and_the_eim_hears_of_it(A):
    from agent import crypto
    eim_dir = A.pki / "eim"
    saved = {n: (eim_dir / n).read_bytes() for n in ("eim.pem", "eim.key.pem")}
    accepted = _card_counter(A)
    before = card(A)

    def other_key():
        # a key that does not match eim.pem: the eIM makes itself a new signing certificate,
        # which the eUICC was never given
        (eim_dir / "eim.key.pem").write_bytes(crypto.key_pem(crypto.generate_key()))
    restart_eim(A, other_key)
    assert (eim_dir / "eim.pem").read_bytes() != saved["eim.pem"]

    try:
        (op,) = run(A, {"action": {"id": ENABLE}, "iccid_with_luhn": A.notes["downloaded"]})
        assert op["status"]["id"] == FAILED, op
        # the card's euiccPackageErrorUnsigned carries no code: undefinedError(127)
        assert (op["error"]["reason"], op["error"]["reason_name"]) == (127, "euiccPackageErrorUnsigned"), op
        assert op["error"]["message"].startswith("euiccPackageErrorUnsigned: "), op
        assert "signature not verified" in op["error"]["message"], op
        (pkg,) = packages(A.last_poll)
        assert (pkg["outcome"], pkg["counter"]) == ("refused", accepted + 1), pkg
        assert pkg["error"] == {"kind": "euiccPackageErrorUnsigned", "code": None}, pkg
        assert card(A) == before and _card_counter(A) == accepted
        assert statuses(record(A))[A.notes["downloaded"]] == DISABLED
    finally:
        def restore():
            for n, b in saved.items():
                (eim_dir / n).write_bytes(b)
        restart_eim(A, restore)
    # with its own key again the eIM is obeyed
    (op,) = run(A, {"action": {"id": ENABLE}, "iccid_with_luhn": A.notes["downloaded"]})
    assert op["status"]["id"] == SUCCEEDED, op
    assert card(A)[A.notes["downloaded"]] == "enabled"


# =========================================================================== bed B: rollback, fallback

def test_enable_with_rollback_to_a_profile_that_cannot_attach(B):
    p1, p2 = B.iccids
    t = time.monotonic()
    (op,) = run(B, {"action": {"id": ENABLE}, "iccid_with_luhn": p2, "rollback": True})
    assert time.monotonic() - t >= SETTLE_S                    # it waited rollback_after for p2
    assert op["status"]["id"] == FAILED, op
    assert (op["error"]["reason"], op["error"]["reason_name"]) == (127, "rollback"), op
    assert "rolled back to the previous one" in op["error"]["message"], op
    (pkg,) = packages(B.last_poll)
    assert (pkg["outcome"], pkg["iccid"], pkg["previous"], pkg["attached"], pkg["rolled_back_to"]) == \
        ("rolled_back", p2, p1, False, p1), pkg
    assert pkg["previous_attached"] is True, pkg
    assert statuses(record(B)) == {p1: ENABLED, p2: DISABLED}
    assert card(B) == {p1: "enabled", p2: "disabled"}
    assert ipa_status(B)["undelivered_results"] == 0


def test_fallback_when_the_enabled_profile_loses_registration(B):
    p1, p2 = B.iccids
    # p2 becomes the enabled profile (no rollback asked): it never registers
    (op,) = run(B, {"action": {"id": ENABLE}, "iccid_with_luhn": p2})
    assert (op["status"]["id"], op.get("error")) == (SUCCEEDED, None), op
    (pkg,) = packages(B.last_poll)
    assert (pkg["iccid"], pkg["attached"]) == (p2, False) and "rolled_back_to" not in pkg, pkg
    assert card(B) == {p1: "disabled", p2: "enabled"}
    assert not any(j["kind"] == "ipa.fallback" for j in B.world.jobs())     # no fallback profile yet
    # the eIM makes p1 the fallback profile; the daemon, watching, falls back to it
    (op,) = run(B, {"action": {"id": FALLBACK}, "iccid_with_luhn": p1})
    assert op["status"]["id"] == SUCCEEDED and fallback_of(record(B)) == [p1], op
    job = wait_for(lambda: next((j for j in B.world.jobs() if j["kind"] == "ipa.fallback"
                                 and j["state"] in ("done", "failed")), None), 30, "no fallback", B.world)
    job = B.world.job(job["id"])
    assert (job["source"], job["state"]) == ("eim", "done"), job
    res = job["result"]
    assert (res["previous"], res["enabled"], res["attached"]) == (p2, p1, True), res
    assert res["report"]["state_change_cause"] == 1 and "report_error" not in res, res
    assert "why=no_registration" in B.world.daemon_logs()[0]
    assert card(B) == {p1: "enabled", p2: "disabled"}
    st = ipa_status(B)
    assert (st["enabled_profile"], st["fallback_profile"], st["fallback_active"]) == (p1, p1, True), st
    # an audit brings the eIM's record up to date
    (op,) = run(B, {"action": {"id": AUDIT}})
    assert op["status"]["id"] == SUCCEEDED, op
    rec = record(B)
    assert statuses(rec) == {p1: ENABLED, p2: DISABLED} and fallback_of(rec) == [p1], rec
