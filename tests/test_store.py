"""Notification outbox and key/value store (agent/store.py) on real SQLite files."""
from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from agent import store
from agent.store import KeyValue, Outbox, StoreError

EID = "89049032123451234512345678901235"
EID2 = "89049032123451234512345678901243"
PIR = bytes.fromhex("BF3708BF2705800101A200")           # shape only: the outbox stores bytes opaquely
OTHER = bytes.fromhex("3009BF2F0680010281020780")


def der(n: int) -> bytes:
    return PIR + bytes([n])


@pytest.fixture
def db(tmp_path):
    return tmp_path / "state" / "agent.db"


def test_creates_private_wal_database(db):
    with Outbox(db):
        pass
    assert db.exists()
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    assert oct(db.parent.stat().st_mode & 0o777) == "0o700"
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION


def test_directory_path_and_default_state_dir(tmp_path, monkeypatch):
    with Outbox(tmp_path) as ob:
        assert ob.path == tmp_path / store.DB_NAME
    monkeypatch.setenv("ESIM_AGENT_STATE_DIR", str(tmp_path / "sd"))
    assert store.default_path() == tmp_path / "sd" / store.DB_NAME
    with Outbox() as ob:
        ob.record(EID, 1, "install", "smdp.example", None, der(1))
    assert (tmp_path / "sd" / store.DB_NAME).exists()


def test_lifecycle_record_sent_removed(db):
    with Outbox(db) as ob:
        n = ob.record(EID, 5, "install", "smdp.example.com", "8944476500001224158", der(5))
        assert (n.status, n.attempts, n.delivered, n.removed_externally) == ("pending", 0, False, False)
        assert n.der == der(5) and n.iccid == "8944476500001224158"
        assert [p.seq_number for p in ob.pending(EID)] == [5]

        n = ob.mark_failed(EID, 5, "connection refused")
        assert (n.status, n.attempts, n.last_error) == ("pending", 1, "connection refused")

        n = ob.mark_sent(EID, 5)
        assert (n.status, n.attempts, n.last_error) == ("sent", 2, None)
        assert n.sent_at and n.needs_card_removal
        assert ob.pending(EID) == []

        n = ob.mark_removed(EID, 5)
        assert n.status == "removed" and n.removed_at and not n.needs_card_removal
        assert ob.list(EID, "removed")[0].seq_number == 5


def test_record_is_idempotent_and_keeps_progress(db):
    with Outbox(db) as ob:
        ob.record(EID, 7, "enable", "a.example", None, der(7))
        ob.mark_sent(EID, 7)
        again = ob.record(EID, 7, "enable", "a.example", None, der(7))
        assert again.status == "sent"                       # a re-list of the card must not reset state
        assert len(ob.list(EID)) == 1
        assert ob.mark_sent(EID, 7).attempts == 1           # mark_sent twice is a no-op
        assert ob.mark_removed(EID, 7).status == "removed"
        assert ob.mark_removed(EID, 7).status == "removed"


def test_same_seq_different_der_is_superseded_not_lost(db):
    with Outbox(db) as ob:
        ob.record(EID, 3, "install", "a.example", None, der(3))
        n = ob.record(EID, 3, "delete", "b.example", None, OTHER)
        assert (n.status, n.operation, n.der) == ("pending", "delete", OTHER)
        old = ob.superseded(EID)
        assert len(old) == 1 and old[0]["der"] == der(3) and old[0]["status"] == "pending"
        assert ob.matches(EID, 3, OTHER) and not ob.matches(EID, 3, der(3))


def test_per_eid_isolation_and_unknown_entries(db):
    with Outbox(db) as ob:
        ob.record(EID, 1, "install", "a", None, der(1))
        ob.record(EID2, 1, "install", "a", None, der(2))
        assert [n.eid for n in ob.pending()] == sorted([EID, EID2])
        assert [n.der for n in ob.pending(EID2)] == [der(2)]
        with pytest.raises(StoreError) as ei:
            ob.mark_sent(EID, 99)
        assert ei.value.code == "unknown_notification"
        assert ob.mark_removed(EID, 99) is None
        assert ob.get(EID, 99) is None
        with pytest.raises(StoreError):
            ob.record(EID, -1, "install", "a", None, der(1))
        with pytest.raises(StoreError):
            ob.record(EID, 2, "install", "a", None, b"")


def test_reconcile_cases(db):
    with Outbox(db) as ob:
        for s in (1, 2, 3, 4, 5):
            ob.record(EID, s, "install", "a", None, der(s))
        ob.mark_sent(EID, 2)     # delivered, still on card   -> remove from card
        ob.mark_sent(EID, 3)     # delivered, gone from card  -> confirmed removed
        ob.mark_sent(EID, 5)
        ob.mark_removed(EID, 5)  # finished, but card still lists it -> remove again
        # pending 1 on card -> send; pending 4 gone from card -> deliver only; 9 unknown
        r = ob.reconcile(EID, {1, 2, 5, 9})
        assert r.remove_from_card == [2, 5]
        assert [n.seq_number for n in r.send] == [1]
        assert [n.seq_number for n in r.deliver_only] == [4]
        assert r.deliver_only[0].removed_externally
        assert r.unknown_on_card == [9]
        assert r.confirmed_removed == [3]
        assert not r.nothing_to_do
        assert ob.get(EID, 3).status == "removed"
        assert r.to_json()["deliver_only"] == [4]

        # the externally removed one is still deliverable and then finished without a card step
        assert 4 in [n.seq_number for n in ob.pending(EID)]
        n = ob.mark_sent(EID, 4)
        assert n.status == "removed" and not n.needs_card_removal

        # card lists 4 again?  (cannot happen for a real card; the flag is cleared if it does)
        ob.record(EID, 6, "install", "a", None, der(6))
        ob.reconcile(EID, {2})
        assert ob.get(EID, 6).removed_externally
        ob.reconcile(EID, {2, 6})
        assert not ob.get(EID, 6).removed_externally


def test_reconcile_clean(db):
    with Outbox(db) as ob:
        ob.record(EID, 1, "install", "a", None, der(1))
        ob.mark_sent(EID, 1)
        ob.mark_removed(EID, 1)
        assert ob.reconcile(EID, set()).nothing_to_do


def test_pending_mark_removed_keeps_it_deliverable(db):
    with Outbox(db) as ob:
        ob.record(EID, 8, "disable", "a", None, der(8))
        n = ob.mark_removed(EID, 8)            # e.g. lpac removed it behind our back
        assert n.status == "pending" and n.removed_externally
        assert [p.seq_number for p in ob.pending(EID)] == [8]


def test_due_respects_retry_at(db):
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with Outbox(db, clock=lambda: now) as ob:
        ob.record(EID, 1, "install", "a", None, der(1))
        ob.record(EID, 2, "install", "a", None, der(2))
        ob.mark_failed(EID, 1, "503", retry_at=now + dt.timedelta(minutes=5))
        assert [n.seq_number for n in ob.due(EID)] == [2]
        assert [n.seq_number for n in ob.due(EID, now + dt.timedelta(minutes=6))] == [1, 2]


def test_survives_reopen(db):
    with Outbox(db) as ob:
        ob.record(EID, 1, "install", "a", "89000000000000000001", der(1))
        ob.mark_sent(EID, 1)
        ob.record(EID, 2, "delete", "b", None, OTHER)
    with Outbox(db) as ob:
        assert ob.get(EID, 1).status == "sent"
        assert ob.get(EID, 2).der == OTHER and ob.get(EID, 2).operation == "delete"


CRASH_CHILD = textwrap.dedent("""
    import os, sys
    from agent.store import Outbox
    ob = Outbox(sys.argv[1])
    ob.record(sys.argv[2], 11, "install", "smdp.example", None, bytes.fromhex("BF370100"))
    ob.record(sys.argv[2], 12, "install", "smdp.example", None, bytes.fromhex("BF370101"))
    # the server acknowledged 11 ...
    ob.mark_sent(sys.argv[2], 11)
    # ... and the process dies before RemoveNotificationFromList: no close, no cleanup
    os._exit(9)
""")


def test_crash_between_sent_and_card_removal(db):
    db.parent.mkdir(parents=True)
    p = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(db), EID], timeout=30)
    assert p.returncode == 9
    with Outbox(db) as ob:
        # the card still holds both
        r = ob.reconcile(EID, {11, 12})
        assert r.remove_from_card == [11]               # delivered: remove now, do NOT resend
        assert [n.seq_number for n in r.send] == [12]   # never acknowledged: send
        assert ob.get(EID, 11).status == "sent"
        assert ob.mark_removed(EID, 11).status == "removed"
        # crash after the card removal but before mark_removed: reconcile finishes the bookkeeping
        ob.mark_sent(EID, 12)
        r = ob.reconcile(EID, set())
        assert r.confirmed_removed == [12] and r.nothing_to_do


def test_two_connections_wait_for_each_other(db):
    a = Outbox(db)
    b = Outbox(db, busy_timeout=5)
    a._conn.execute("BEGIN IMMEDIATE")            # another process holds the write lock for a moment
    a._conn.execute("INSERT INTO kv VALUES ('x', 'y', '1', 'now')")
    threading.Timer(0.3, lambda: a._conn.execute("COMMIT")).start()
    t0 = time.monotonic()
    b.record(EID, 1, "install", "a", None, der(1))  # waits (busy_timeout) instead of failing
    assert time.monotonic() - t0 >= 0.2
    assert a.get(EID, 1) is not None
    a.close()
    b.close()


def test_busy_beyond_timeout_is_a_clear_error(db):
    a = Outbox(db)
    b = Outbox(db, busy_timeout=0.2)
    a._conn.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError) as ei:
            b.record(EID, 1, "install", "a", None, der(1))
        assert ei.value.code == "store_busy"
    finally:
        a._conn.execute("ROLLBACK")
        a.close()
        b.close()


def test_unwritable_location_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(StoreError) as ei:
            Outbox(ro / "sub" / "x.db")
        assert ei.value.code == "store_unavailable" and "ESIM_AGENT_STATE_DIR" in ei.value.message
    finally:
        ro.chmod(0o700)


def test_newer_schema_refused(db):
    Outbox(db).close()
    c = sqlite3.connect(db)
    c.execute("PRAGMA user_version = 99")
    c.commit()
    c.close()
    with pytest.raises(StoreError) as ei:
        Outbox(db)
    assert ei.value.code == "store_too_new"


def test_key_value(db):
    with KeyValue(db) as kv, Outbox(db) as ob:
        assert kv.get("jobs", "a", 42) == 42
        kv.set("jobs", "a", {"state": "running", "n": [1, 2]})
        kv.set("jobs", "b", "x")
        kv.set("jobs", "a", {"state": "done"})
        assert kv.get("jobs", "a") == {"state": "done"}
        assert kv.items("jobs") == {"a": {"state": "done"}, "b": "x"}
        assert kv.delete("jobs", "b") and not kv.delete("jobs", "b")
        ob.record(EID, 1, "install", "a", None, der(1))   # same file, both tables
    with KeyValue(db) as kv:
        assert kv.get("jobs", "a") == {"state": "done"}
