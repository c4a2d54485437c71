"""Notification delivery (agent.flows.notifications + the SQLite outbox) against the real
local SM-DP+ and the simulated eUICC (tests/testbed.py).

The rule under test (docs/protocol.md §6.3, store.py): a notification leaves the eUICC only after
the SM-DP+ accepted it, and a crash at the worst moment (accepted, not yet removed) loses
nothing: the next run finishes the job.
"""
from __future__ import annotations

import json
import pathlib

import pytest

from agent import codec
from agent.store import Outbox
from agent.es8p import split_bpp
from testbed import Spy, bed, make_bed, testbed_pki  # noqa: F401 (pytest fixtures)

FAULT_EXIT = 86

# Run by the crash test instead of `python -m agent`: the CLI, except that the process
# dies right after the SM-DP+ accepted a notification, before any bookkeeping or removal:
# the worst moment for a crash.
CRASH_AFTER_SEND = """\
import os, sys
sys.path.insert(0, {repo!r})
from agent import es9p
from agent.cli import main

accept = es9p.Es9pClient.handle_notification

def accept_then_die(self, *args, **kw):
    accept(self, *args, **kw)
    os._exit({exit})

es9p.Es9pClient.handle_notification = accept_then_die
sys.exit(main())
"""


def backoff_over(bed) -> None:
    """Let the back-off of every notification address run out (as time passing would)."""
    with bed.outbox() as ob, ob._tx() as c:
        c.execute("UPDATE notification_addresses SET next_attempt_at = '2000-01-01T00:00:00.000+00:00'")


def installed(bed, *, deliver: bool = True):
    """Reserve + download one profile; optionally deliver its install notification. Returns (order, result)."""
    order = bed.reserve(matching_id=True)
    res = bed.download(matching_id=order["matching_id"])
    if deliver:
        [d] = bed.process_notifications()
        assert (d.operation, d.status) == ("install", "delivered")
        bed.wait_order(order["sid"], "installed")
    return order, res


class OnCardAtSend:
    """client_for wrapper: records, for every handleNotification, whether the notification
    was still on the card at that moment (it must be: removal comes only after acceptance)."""

    def __init__(self, bed, pool):
        self.bed, self.pool = bed, pool
        self.seen: list[tuple[int, bool]] = []

    def __call__(self, address):
        outer = self
        inner = self.pool(address)

        class Client:
            def handle_notification(self, der):
                seq = codec.decode("PendingNotification", der)
                seq = _seq_of(seq)
                on_card = seq in {n.seq_number for n in outer.bed.notifications()}
                outer.seen.append((seq, on_card))
                return inner.handle_notification(der)
        return Client()


def _seq_of(pending) -> int:
    kind, v = pending
    if kind == "profileInstallationResult":
        return v["profileInstallationResultData"]["notificationMetadata"]["seqNumber"]
    return v["tbsOtherNotification"]["seqNumber"]


def test_enable_disable_delete_delivered_then_removed(bed):
    from agent.ops import ClientPool
    order, res = installed(bed)
    iccid = order["iccid"]
    steps = [("enable", bed.es10.enable_profile), ("disable", bed.es10.disable_profile),
             ("delete", bed.es10.delete_profile)]
    for op, action in steps:
        action(iccid)
        [n] = bed.notifications()
        assert (n.operation, n.address, n.iccid) == (op, bed.address, iccid)
        pool = ClientPool(ca=bed.ca)
        spy = OnCardAtSend(bed, pool)
        try:
            deliveries = bed.process_notifications(client_for=spy)
        finally:
            pool.close()
        assert [(d.seq_number, d.operation, d.status, d.iccid) for d in deliveries] == \
               [(n.seq_number, op, "delivered", iccid)]
        assert spy.seen == [(n.seq_number, True)]      # sent while still on the card …
        assert bed.notifications() == []                # … removed only after the server took it
        with bed.outbox() as ob:
            assert ob.get(bed.eid, n.seq_number).status == "removed"
        # The SM-DP+ verified the eUICC's signature and recorded the event.
        ev = bed.server.store.events()[-1]
        assert (ev["event"], ev["iccid"], ev["seq"], ev["eid"]) == (op, iccid, n.seq_number, bed.eid)
    assert [e["event"] for e in bed.server.store.events()] == ["enable", "disable", "delete"]
    assert bed.profiles() == []
    assert len(bed.es9_calls("handleNotification")) == 4      # install + three, each exactly once


@pytest.mark.parametrize("answer", ["plain-500", "failed-envelope-500"])
def test_server_error_keeps_notification_on_card_and_pending(bed, answer):
    order, res = installed(bed, deliver=False)
    if answer == "plain-500":
        bed.hook("handleNotification", "respond", 500, b"<html>upstream exploded</html>", "text/html")
        code = "http_status"
    else:
        body = {"header": {"functionExecutionStatus": {"status": "Failed", "statusCodeData": {
            "subjectCode": "8.8", "reasonCode": "127", "message": "try later"}}}}
        bed.hook("handleNotification", "respond", 500, json.dumps(body).encode(), "application/json")
        code = "smdp_refused"
    [d] = bed.process_notifications()
    assert (d.seq_number, d.status, d.error["code"]) == (res.notification_seq, "failed", code)
    assert bed.hooks_fired == [("handleNotification", "respond")]
    # Still on the card, still pending in the outbox, the server's view unchanged.
    assert [n.seq_number for n in bed.notifications()] == [res.notification_seq]
    with bed.outbox() as ob:
        n = ob.get(bed.eid, res.notification_seq)
        assert (n.status, n.attempts, n.removed_externally) == ("pending", 1, False)
        assert n.last_error and n.der[:2] == b"\xbf\x37"
        assert [p.seq_number for p in ob.pending(bed.eid)] == [res.notification_seq]
    assert bed.order(order["sid"])["status"] == "downloaded"

    # The server is back (and its back-off ran out): the next run delivers it and only then removes it.
    backoff_over(bed)
    [d] = bed.process_notifications()
    assert (d.seq_number, d.status) == (res.notification_seq, "delivered")
    assert bed.notifications() == []
    bed.wait_order(order["sid"], "installed")
    with bed.outbox() as ob:
        n = ob.get(bed.eid, res.notification_seq)
        assert (n.status, n.attempts) == ("removed", 2)


def test_process_only_the_selected_sequence_numbers(bed):
    order, res = installed(bed, deliver=False)
    bed.es10.enable_profile(order["iccid"])
    install_seq = res.notification_seq
    [enable_seq] = [n.seq_number for n in bed.notifications() if n.operation == "enable"]
    [d] = bed.process_notifications(seqs=[enable_seq])
    assert (d.seq_number, d.operation, d.status) == (enable_seq, "enable", "delivered")
    assert [n.seq_number for n in bed.notifications()] == [install_seq]
    assert bed.order(order["sid"])["status"] == "downloaded"   # the PIR was not sent
    [d] = bed.process_notifications()
    assert (d.seq_number, d.status) == (install_seq, "delivered")
    bed.wait_order(order["sid"], "installed")


def test_unknown_sequence_number_in_process(bed):
    order, res = installed(bed, deliver=False)
    [d] = bed.process_notifications(seqs=[99])
    assert (d.seq_number, d.status, d.error["code"]) == (99, "failed", "notification_not_found")
    assert [n.seq_number for n in bed.notifications()] == [res.notification_seq]   # untouched
    assert bed.es9_calls("handleNotification") == []


def test_cli_unknown_sequence_number(bed):
    order, res = installed(bed, deliver=False)
    run = bed.cli("--json", "notification", "process", "99", "--ca", bed.ca)
    assert run.rc == 1, run
    assert run.doc["ok"] is False and run.doc["error"]["code"] == "notification_not_found", run
    assert "99" in run.doc["error"]["message"]
    assert [n.seq_number for n in bed.notifications()] == [res.notification_seq]
    assert bed.es9_calls("handleNotification") == []


def test_crash_between_send_and_remove_loses_nothing(bed, tmp_path):
    """Kill the process right after the SM-DP+ accepted the first of two notifications."""
    order, res = installed(bed, deliver=False)
    bed.es10.enable_profile(order["iccid"])
    seqs = sorted(n.seq_number for n in bed.notifications())
    assert len(seqs) == 2                                # install (PIR) + enable

    script = tmp_path / "crash_after_send.py"
    script.write_text(CRASH_AFTER_SEND.format(repo=str(pathlib.Path(__file__).resolve().parents[1]),
                                              exit=FAULT_EXIT))
    run = bed.cli("--json", "notification", "process", "--ca", bed.ca, entry=[str(script)])
    assert run.rc == FAULT_EXIT, run
    # The server has the first one (the PIR: the order is installed) …
    assert len(bed.es9_calls("handleNotification")) == 1
    bed.wait_order(order["sid"], "installed")
    # … but it was not removed from the card, and the outbox still holds both, exact DER included.
    assert sorted(n.seq_number for n in bed.notifications()) == seqs
    with bed.outbox() as ob:
        rows = {n.seq_number: n for n in ob.list(bed.eid)}
        assert sorted(rows) == seqs and all(n.status == "pending" for n in rows.values())
        on_card = {p.seq_number: p.der for p in bed.es10.retrieve_notifications()}
        assert {s: rows[s].der for s in seqs} == on_card

    run = bed.cli("--json", "notification", "process", "--ca", bed.ca)
    assert run.rc == 0, run
    got = {n["seq_number"]: (n["operation"], n["status"]) for n in run.doc["data"]["notifications"]}
    assert got == {seqs[0]: ("install", "delivered"), seqs[1]: ("enable", "delivered")}
    assert bed.notifications() == []
    with bed.outbox() as ob:
        assert [(n.seq_number, n.status) for n in ob.list(bed.eid)] == [(s, "removed") for s in seqs]
    assert [e["event"] for e in bed.server.store.events()] == ["enable"]
    assert bed.order(order["sid"])["status"] == "installed"
    # At-least-once: the accepted-but-unremoved PIR went out again; the server took the duplicate.
    calls = bed.es9_calls("handleNotification")
    assert len(calls) == 3 and all("failure" not in c for c in calls)


def test_nothing_pending(bed):
    assert bed.process_notifications() == []
    run = bed.cli("--json", "notification", "process", "--ca", bed.ca)
    assert run.rc == 0 and run.doc == {"ok": True, "data": {"notifications": [], "waiting": []}}, run


def test_error_pir_after_refused_bpp_is_delivered(make_bed):
    """The signed error result of a refused package is a notification like any other; here the
    second of several profile-element segments is corrupted."""
    from agent.flows.download import DownloadError
    from testbed import flip_in_bpp
    bed = make_bed(profile_size=3000)
    order = bed.reserve(matching_id=True)
    es9 = Spy(bed.client(), after={"get_bound_profile_package": lambda bpp: flip_in_bpp(bpp, 0x86, index=1)})
    es10 = Spy(bed.es10)
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es9=es9, es10=es10)
    assert ei.value.details["bpp_command"] == "loadProfileElements"
    # The eUICC answered with its result exactly at the corrupted segment; the LPA sent no more.
    commands = split_bpp(es9.called("get_bound_profile_package")[0].result)
    second_86 = [i for i, c in enumerate(commands) if c[0] == 0x86][1]
    sent = [c.args[0] for c in es10.called("call_raw") if c.kwargs.get("what") == "LoadBoundProfilePackage"]
    assert sent == commands[:second_86 + 1] and len(commands) > second_86 + 1
    seq = ei.value.details["notification_seq"]
    [d] = bed.process_notifications()
    assert (d.seq_number, d.operation, d.status) == (seq, "install", "delivered")
    assert bed.wait_order(order["sid"], "failed")["error_code"] == "8"
    assert bed.notifications() == [] and bed.profiles() == []


def test_removed_notification_is_still_delivered(bed):
    """`notification remove` frees the eUICC's list but records each notification in the
    outbox first; `notification process` then delivers it and the reservation completes."""
    order = bed.reserve(matching_id=True)
    bed.download(matching_id=order["matching_id"])
    assert [n.operation for n in bed.notifications()] == ["install"]
    r = bed.cli("--json", "notification", "remove", "--all")
    assert r.rc == 0 and len(r.doc["data"]["kept_in_outbox"]) == 1
    assert bed.notifications() == []
    assert bed.order(order["sid"])["status"] == "downloaded"
    r = bed.cli("--json", "notification", "list")
    assert r.doc["data"]["notifications"] == [] and r.doc["data"]["outbox_only"][0]["operation"] == "install"
    r = bed.cli("--json", "notification", "process", "--ca", bed.ca)
    assert r.rc == 0, r.stdout + r.stderr
    assert [n["status"] for n in r.doc["data"]["notifications"]] == ["delivered"]
    bed.wait_order(order["sid"], "installed")
    with bed.outbox() as ob:
        assert ob.pending(bed.eid) == []


def test_reused_sequence_number_loses_nothing(bed):
    """An undelivered outbox entry and a different notification on the card under the same
    sequence number (a reset or replaced card): both get delivered, neither is dropped, and
    the card's one is removed only after it was sent itself."""
    order = bed.reserve(matching_id=True)
    bed.download(matching_id=order["matching_id"])
    (card_note,) = bed.es10.retrieve_notifications()
    seq = card_note.seq_number
    stale = b"\x30\x03\x80\x01\x01"                       # an older notification, same number
    with bed.outbox() as ob:
        ob.record(bed.eid, seq, "enable", bed.address, None, stale)
    sent = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def handle_notification(self, der):
            sent.append(bytes(der))
            if der != stale:
                self.inner.handle_notification(der)

    pool_client = bed.client()
    try:
        first = bed.process_notifications(client_for=lambda addr: Recording(pool_client))
        assert sent == [stale] and [d.status for d in first] == ["delivered"]
        assert [p.der for p in bed.es10.retrieve_notifications()] == [card_note.der]   # still on the card
        second = bed.process_notifications(client_for=lambda addr: Recording(pool_client))
        assert sent == [stale, card_note.der] and [d.status for d in second] == ["delivered"]
    finally:
        pool_client.close()
    assert bed.es10.retrieve_notifications() == []
    bed.wait_order(order["sid"], "installed")


# --------------------------------------------------------------------------- issue 9: the outbox never wedges

def _warnings(stderr: str) -> list[str]:
    return ["warning: " + w for w in stderr.split("warning: ")[1:]]


def _hooks_cleared(bed) -> None:
    with bed.server.httpd.testbed_lock:
        bed.server.httpd.testbed_hooks.clear()


def test_unreachable_server_backs_off_and_process_exits_0_while_waiting(bed):
    """A server that cannot be reached made `notification process` exit non-zero on every run (a
    systemd timer failing for ever) and every run try it again. Now its address backs off: a run
    that only has to wait exits 0 and says so; --now tries at once; a success forgets the back-off."""
    order, res = installed(bed, deliver=False)
    seq = res.notification_seq
    bed.hook("handleNotification", "drop", times=1000)
    r = bed.cli("--json", "notification", "process", "--ca", bed.ca)
    assert r.rc == 3 and r.doc["error"]["code"] == "connection_lost", r
    [d] = r.doc["error"]["details"]["notifications"]
    assert (d["status"], d["attempts"], d["held_in"]) == ("failed", 1, "euicc+outbox") and d["next_attempt_at"]
    tried = len(bed.hooks_fired)
    with bed.outbox() as ob:
        n = ob.get(bed.eid, seq)
        w = ob.waiting(bed.address)
        assert (n.status, n.attempts, n.next_attempt_at) == ("pending", 1, w.next_attempt_at) and n.last_error
        assert w.failures == 1 and "dropped" in w.last_error

    # The timer's next run: nothing is due, nothing is tried, exit 0, and it says what waits.
    r = bed.cli("--json", "notification", "process", "--ca", bed.ca)
    assert r.rc == 0, r
    assert r.doc["data"]["waiting"] == [{"seq_number": seq, "address": bed.address,
                                        "next_attempt_at": w.next_attempt_at, "attempts": 1,
                                        "held_in": "euicc+outbox"}]
    assert [x["status"] for x in r.doc["data"]["notifications"]] == ["waiting"]
    r = bed.cli("notification", "process", "--ca", bed.ca)
    assert r.rc == 0 and "wait for their server's back-off" in r.stdout and "--now" in r.stdout, r
    assert len(bed.hooks_fired) == tried
    assert [x.seq_number for x in bed.notifications()] == [seq]          # still on the card

    # --now: tried at once, fails again, backs off longer.
    r = bed.cli("--json", "notification", "process", "--now", "--ca", bed.ca)
    assert r.rc == 3 and len(bed.hooks_fired) > tried, r
    with bed.outbox() as ob:
        assert ob.get(bed.eid, seq).attempts == 2 and ob.waiting(bed.address).failures == 2

    # The server is back: delivered, removed from the card, back-off forgotten.
    _hooks_cleared(bed)
    r = bed.cli("--json", "notification", "process", "--now", "--ca", bed.ca)
    assert r.rc == 0 and [x["status"] for x in r.doc["data"]["notifications"]] == ["delivered"], r
    assert bed.notifications() == []
    with bed.outbox() as ob:
        assert ob.address_state(bed.address) is None and ob.get(bed.eid, seq).status == "removed"
    bed.wait_order(order["sid"], "installed")


def test_one_failure_per_address_and_run(bed):
    """Two notifications to a server that fails: the first is tried, the second waits (it is not
    sent into the same failure, which would hold the device once per notification)."""
    order, res = installed(bed, deliver=False)
    bed.es10.enable_profile(order["iccid"])
    seqs = sorted(n.seq_number for n in bed.notifications())
    bed.hook("handleNotification", "respond", 503, b"down", "text/html", times=1000)
    results = bed.process_notifications()
    assert [(d.seq_number, d.status) for d in results] == [(seqs[0], "failed"), (seqs[1], "waiting")]
    assert results[0].error["code"] == "http_status" and results[1].next_attempt_at == results[0].next_attempt_at
    assert len(bed.hooks_fired) == 1


def test_explicit_sequence_numbers_ignore_the_back_off(bed):
    order, res = installed(bed, deliver=False)
    bed.hook("handleNotification", "respond", 503, b"down", "text/html")
    [d] = bed.process_notifications()
    assert d.status == "failed"
    r = bed.cli("--json", "notification", "process", res.notification_seq, "--ca", bed.ca)
    assert r.rc == 0 and [x["status"] for x in r.doc["data"]["notifications"]] == ["delivered"], r
    bed.wait_order(order["sid"], "installed")


def test_outbox_only_notification_is_dropped_on_request_and_kept_as_history(bed):
    """After `notification remove` a notification lives only in the outbox. It could not be retired:
    `remove` answered nothingToDelete from the card, `remove --all` removed nothing. Now `drop`
    retires it (never sent, kept as history) and `remove --all` says what is left."""
    order, res = installed(bed, deliver=False)
    seq = res.notification_seq
    r = bed.cli("--json", "notification", "remove", "--all")
    assert r.rc == 0 and (r.doc["data"]["removed"], r.doc["data"]["outbox_only"]) == ([seq], [seq]), r
    r = bed.cli("notification", "remove", "--all")              # nothing left on the card: says what it did
    assert r.rc == 0, r
    assert "removed 0 notification(s) from the eUICC" in r.stdout
    assert f"held only in the outbox: {seq}" in r.stdout and "notification drop --all" in r.stdout
    r = bed.cli("--json", "notification", "list")
    [o] = r.doc["data"]["outbox_only"]
    assert (o["seq_number"], o["status"], o["attempts"]) == (seq, "pending", 0)
    assert "outbox: pending" in bed.cli("notification", "list").stdout

    r = bed.cli("--json", "notification", "drop", seq)
    assert r.rc == 0 and r.doc["data"] == {"dropped": [seq], "not_found": [], "on_euicc": []}, r
    with bed.outbox() as ob:
        n = ob.get(bed.eid, seq)
        assert n.status == "dropped" and n.dropped_at and n.der[:2] == b"\xbf\x37"     # kept, never deleted
    r = bed.cli("--json", "notification", "list")
    assert r.doc["data"] == {"notifications": [], "outbox_only": []}, r
    r = bed.cli("--json", "notification", "list", "--history")
    [h] = r.doc["data"]["history"]
    assert (h["seq_number"], h["status"], h["operation"]) == (seq, "dropped", "install")
    assert "dropped" in bed.cli("notification", "list", "--history").stdout
    r = bed.cli("--json", "notification", "process", "--ca", bed.ca)
    assert r.rc == 0 and r.doc["data"]["notifications"] == [], r
    assert bed.es9_calls("handleNotification") == []                  # a dropped one is never sent
    assert bed.order(order["sid"])["status"] == "downloaded"
    r = bed.cli("--json", "notification", "drop", seq)
    assert r.rc == 1 and r.doc["error"]["code"] == "notification_not_found", r


def test_remove_of_an_outbox_only_notification_drops_it(bed):
    order, res = installed(bed, deliver=False)
    seq = res.notification_seq
    assert bed.cli("--json", "notification", "remove", seq).rc == 0          # off the card, in the outbox
    r = bed.cli("--json", "notification", "remove", seq)                      # named again: retired
    assert r.rc == 0, r
    assert (r.doc["data"]["removed"], r.doc["data"]["dropped"], r.doc["data"]["not_found"]) == ([], [seq], [])
    r = bed.cli("notification", "remove", seq)
    assert r.rc == 1 and "nothing" in r.stderr.lower()                        # now there is nothing left
    with bed.outbox() as ob:
        assert ob.get(bed.eid, seq).status == "dropped"


def test_drop_refuses_a_notification_still_on_the_euicc(bed):
    order, res = installed(bed, deliver=False)
    seq = res.notification_seq
    r = bed.cli("--json", "notification", "drop", seq)
    assert r.rc == 2 and r.doc["error"]["code"] == "notification_on_euicc", r
    assert "notification remove" in r.doc["error"]["message"]
    assert [n.seq_number for n in bed.notifications()] == [seq]
    r = bed.cli("--json", "notification", "drop", "--all")
    assert r.rc == 0 and r.doc["data"]["dropped"] == [], r
    assert [n.seq_number for n in bed.notifications()] == [seq]


def test_warnings_say_where_each_undelivered_notification_is(bed):
    """Warnings after an operation said the notifications were "pending on the eUICC" even for one
    that only the outbox held. Each warning now names where its notifications are."""
    order, res = installed(bed, deliver=False)
    pir = res.notification_seq
    assert bed.cli("notification", "remove", "--all").rc == 0                  # the PIR: outbox only
    bed.hook("handleNotification", "drop", times=1000)
    r = bed.cli("profile", "enable", order["iccid"], "--ca", bed.ca)
    assert r.rc == 0, r
    [enable_seq] = [n.seq_number for n in bed.notifications()]
    warnings = _warnings(r.stderr)
    [w_pir] = [w for w in warnings if f"notification(s) {pir} " in w]
    [w_enable] = [w for w in warnings if f"notification(s) {enable_seq} " in w]
    assert "held only in the outbox (no longer on the eUICC)" in w_pir, w_pir
    assert "stay on the eUICC and in the outbox" in w_enable, w_enable
    assert "pending on the eUICC" not in r.stderr
    # One of them was tried and failed; the other waited for the address's back-off.
    assert sorted(["failed before" in w_pir, "failed before" in w_enable]) == [False, True]
    assert all("no new attempt before" in w or "the server backs off" in w for w in (w_pir, w_enable))


def test_daemon_waits_for_the_back_off_and_does_not_count_it_as_a_failure(tmp_path, monkeypatch):
    """The daemon's outbox retry: pending notifications whose addresses all back off schedule the
    next `notification process` job when the first is due, and a job that only waited is no failure."""
    import datetime as dt
    import time as _time

    from agent.daemon import main as dmain
    d = dmain.Daemon.__new__(dmain.Daemon)
    d.next_notifications, d.notif_failures, d.ipa = None, 0, None   # no [eim]: no IPA schedule
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=900)).isoformat(timespec="milliseconds")
    d.snapshot = {"outbox_pending": 1, "notifications_on_card": 1, "outbox_retry_at": later}
    d._after_snapshot()
    assert 880 < d.next_notifications - _time.monotonic() <= 900
    d.next_notifications = None
    d.snapshot = {"outbox_pending": 1, "notifications_on_card": 0}                     # due now
    d._after_snapshot()
    assert d.next_notifications - _time.monotonic() <= 30

    class Job:
        kind, state = "notification.process", "done"
        result = {"notifications": [{"seq_number": 1, "status": "waiting"}], "waiting": [{"seq_number": 1}]}
        error = None

    class Journal:
        def get(self, jid):
            return Job()
    d.journal, d.reporter, d.notif_failures = Journal(), None, 2
    d._job_finished("j1")
    assert d.notif_failures == 0


def test_notification_process_exit_code_comes_from_the_cause():
    from agent.ops.notifications import failure_exit_code
    assert failure_exit_code({"notifications": []}) == 0
    assert failure_exit_code({"notifications": [{"status": "waiting"}, {"status": "delivered"}]}) == 0
    for code, rc in (("dns_failure", 3), ("no_trusted_ci", 2), ("http_status", 1), ("not_a_code", 1)):
        assert failure_exit_code({"notifications": [{"status": "delivered"},
                                                    {"status": "failed", "error": {"code": code}}]}) == rc


def test_worker_snapshot_tells_the_daemon_when_the_outbox_is_due(bed, tmp_path):
    """The card worker's snapshot carries outbox_retry_at when every address concerned waits."""
    import io

    from agent.daemon.worker import Worker
    from agent.journal import Journal
    from agent.ops.card import Card, CardSettings
    order, res = installed(bed, deliver=False)
    bed.release_card()
    w = Worker.__new__(Worker)
    w.journal, w.out, w.stopping = Journal(tmp_path / "state"), io.StringIO(), None
    w.card = Card(CardSettings(sim=str(bed.card_path)).validate()).open()
    try:
        assert "outbox_retry_at" not in w.snapshot()                    # due now: nothing waits
        with Outbox(w.journal.path) as ob:
            st = ob.address_failed(bed.address, "connection refused")
        snap = w.snapshot()
        assert snap["notifications_on_card"] == 1 and snap["outbox_retry_at"] == st.next_attempt_at
    finally:
        w.card.close()
        w.journal.close()


def test_a_download_that_went_through_ends_its_servers_back_off(bed):
    """The SM-DP+ that just installed a profile answers: its install result is sent at once even if
    its address was backing off after earlier failures."""
    with bed.outbox() as ob:
        ob.address_failed(bed.address, "an earlier failure")
    order = bed.reserve(matching_id=True)
    r = bed.cli("--json", "profile", "download", bed.ac(order), "--ca", bed.ca, "--yes")
    assert r.rc == 0, r
    assert [(n["operation"], n["status"]) for n in r.doc["data"]["notifications"]] == [("install", "delivered")]
    bed.wait_order(order["sid"], "installed")


def test_a_download_sends_its_install_result_without_reading_it_back(bed):
    """The ProfileInstallationResult the eUICC returned for the last segment is its pending install
    notification: it goes to the SM-DP+ as is, without RetrieveNotificationsList (BF2B), and the
    installed profile is described without a ProfileInfoListRequest (BF2D); issue #8, no ES10 call
    whose answer the run already holds."""
    order = bed.reserve(matching_id=True)
    r = bed.cli("--json", "--trace", "profile", "download", bed.ac(order), "--ca", bed.ca, "--yes")
    assert r.rc == 0, r
    sent = [line.split()[2] for line in r.stderr.splitlines() if line.startswith("[trace] APDU>")]
    # STORE DATA: CLA E2 P1 P2 Lc, then the ES10 request's tag (first block of each command only).
    tags = [a[10:14] for a in sent if a[2:4] == "E2" and a[4:6] in ("91", "11") and a[6:8] == "00"]
    assert "BF2B" not in tags and "BF2D" not in tags, tags
    assert "BF28" in tags and "BF30" in tags         # ListNotification, then NotificationSent
    [n] = r.doc["data"]["notifications"]
    assert (n["operation"], n["status"]) == ("install", "delivered")
    assert r.doc["data"]["profile"]["state"] == "disabled"
    bed.wait_order(order["sid"], "installed")
    assert bed.notifications() == []
