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


# --------------------------------------------------------------------------- issue 9: the outbox never wedges

# The schema as esim-agent 0.3 wrote it (user_version 2): an upgrade must keep every row of it.
V2_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    eid                TEXT    NOT NULL,
    seq_number         INTEGER NOT NULL,
    operation          TEXT    NOT NULL,
    address            TEXT    NOT NULL,
    iccid              TEXT,
    der                BLOB    NOT NULL,
    status             TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'removed')),
    removed_externally INTEGER NOT NULL DEFAULT 0,
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT,
    next_attempt_at    TEXT,
    created_at         TEXT    NOT NULL,
    sent_at            TEXT,
    removed_at         TEXT,
    UNIQUE (eid, seq_number)
);
CREATE INDEX IF NOT EXISTS notifications_status ON notifications (status, eid);
-- A card that reuses a sequence number with different content (e.g. a reset simulator, a replaced
-- eUICC with the same EID): the old row is kept here, never silently overwritten.
CREATE TABLE IF NOT EXISTS notifications_superseded (
    eid            TEXT    NOT NULL,
    seq_number     INTEGER NOT NULL,
    operation      TEXT    NOT NULL,
    address        TEXT    NOT NULL,
    iccid          TEXT,
    der            BLOB    NOT NULL,
    status         TEXT    NOT NULL,
    attempts       INTEGER NOT NULL,
    last_error     TEXT,
    created_at     TEXT    NOT NULL,
    sent_at        TEXT,
    removed_at     TEXT,
    superseded_at  TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    namespace  TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
-- The daemon's job journal (journal.py): every operation is a job whose steps are recorded
-- before they run, so a restart after a crash can tell what already took effect.
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT    PRIMARY KEY,
    kind         TEXT    NOT NULL,
    params       TEXT    NOT NULL,
    source       TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'rolled_back',
                                                   'cancelled')),
    step         TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    not_before   TEXT,
    created_at   TEXT    NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    result       TEXT,
    error        TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS job_steps (
    job_id  TEXT    NOT NULL,
    n       INTEGER NOT NULL,
    step    TEXT    NOT NULL,
    data    TEXT    NOT NULL,
    at      TEXT    NOT NULL,
    PRIMARY KEY (job_id, n)
);
-- Reports to the operator's backend (report_url), delivered at least once, in order of creation.
CREATE TABLE IF NOT EXISTS reports (
    id            TEXT    PRIMARY KEY,
    job_id        TEXT,
    body          TEXT    NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    next_attempt_at TEXT,
    created_at    TEXT    NOT NULL,
    delivered_at  TEXT
);
"""


def _v2_database(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    c = sqlite3.connect(path)
    c.executescript(V2_SCHEMA)
    c.execute("INSERT INTO notifications (eid, seq_number, operation, address, iccid, der, status, attempts, "
              "last_error, created_at) VALUES (?, 3, 'install', 'smdp.example', NULL, ?, 'pending', 2, 'dns', "
              "'2026-01-01T00:00:00.000+00:00')", (EID, der(3)))
    c.execute("INSERT INTO notifications (eid, seq_number, operation, address, iccid, der, status, created_at, "
              "sent_at, removed_at) VALUES (?, 4, 'enable', 'smdp.example', '8944476500001224158', ?, 'removed', "
              "'2026-01-01T00:00:00.000+00:00', '2026-01-01T00:01:00.000+00:00', '2026-01-01T00:01:00.000+00:00')",
              (EID, OTHER))
    c.execute("INSERT INTO jobs (id, kind, params, source, state, created_at) VALUES "
              "('j1', 'sync', '{}', 'discovery', 'done', '2026-01-01T00:00:00.000+00:00')")
    c.execute("INSERT INTO reports (id, job_id, body, created_at) VALUES ('r1', 'j1', '{}', "
              "'2026-01-01T00:00:00.000+00:00')")
    c.execute("INSERT INTO kv VALUES ('ns', 'k', '1', 'now')")
    c.execute("PRAGMA user_version = 2")
    c.commit()
    c.close()


def test_schema_2_database_is_migrated_keeping_every_row(db):
    _v2_database(db)
    with Outbox(db) as ob:
        a, b = ob.get(EID, 3), ob.get(EID, 4)
        assert (a.status, a.attempts, a.last_error, a.der) == ("pending", 2, "dns", der(3))
        assert (b.status, b.iccid, b.der) == ("removed", "8944476500001224158", OTHER)
        assert ob.drop(EID, 3).status == "dropped"          # the new status is accepted
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION >= 3
    assert c.execute("SELECT id, state FROM jobs").fetchall() == [("j1", "done")]
    assert c.execute("SELECT id FROM reports").fetchall() == [("r1",)]
    assert c.execute("SELECT value FROM kv").fetchall() == [("1",)]
    assert c.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'notifications_status'"
                     ).fetchall() == [("notifications_status",)]
    c.close()
    with Outbox(db) as ob:                                  # opening again: nothing left to migrate
        assert ob.get(EID, 3).status == "dropped"


def test_drop_retires_an_undelivered_entry_and_keeps_it_in_history(db):
    now = dt.datetime(2026, 3, 1, 12, tzinfo=dt.timezone.utc)
    with Outbox(db, clock=lambda: now) as ob:
        ob.record(EID, 1, "install", "a", None, der(1))
        ob.record(EID, 2, "enable", "a", None, der(2))
        ob.mark_sent(EID, 2)
        n = ob.drop(EID, 1)
        assert (n.status, n.delivered, n.dropped_at) == ("dropped", False, now.isoformat(timespec="milliseconds"))
        assert ob.pending(EID) == [] and [x.seq_number for x in ob.list(EID, "dropped")] == [1]
        assert ob.get(EID, 1).der == der(1)                 # kept, never deleted
        assert ob.drop(EID, 1).status == "dropped"          # idempotent
        with pytest.raises(StoreError) as ei:
            ob.drop(EID, 2)                                 # delivered already: nothing to retire
        assert ei.value.code == "bad_store_input"
        with pytest.raises(StoreError) as ei:
            ob.drop(EID, 9)
        assert ei.value.code == "unknown_notification"
        assert ob.reconcile(EID, set()).nothing_to_do       # a dropped entry is not delivered …
        assert ob.reconcile(EID, {1}).remove_from_card == [1]   # … and is taken off a card that still holds it


def test_address_back_off_is_exponential_with_jitter_and_capped(db):
    t = [dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)]
    with Outbox(db, clock=lambda: t[0]) as ob:
        assert ob.waiting("smdp.example") is None
        delays = []
        for i in range(1, 16):
            w = ob.address_failed("smdp.example", f"dns failure {i}")
            assert w.failures == i and w.last_error == f"dns failure {i}"
            delays.append((dt.datetime.fromisoformat(w.next_attempt_at) - t[0]).total_seconds())
            assert ob.waiting("smdp.example") == w
            assert ob.waiting("other.example") is None      # per address
        base, cap = store.BACKOFF_BASE_S, store.BACKOFF_CAP_S
        for i, d in enumerate(delays[:4]):
            assert base * 2 ** i * 0.8 <= d <= base * 2 ** i * 1.2
        assert max(delays) <= cap and delays[-1] >= cap * 0.8
        t[0] += dt.timedelta(seconds=cap * 1.3)
        assert ob.waiting("smdp.example") is None           # due again once its time came
        assert ob.address_state("smdp.example").failures == 15
        ob.address_ok("smdp.example")
        assert ob.address_state("smdp.example") is None
        w = ob.address_failed("smdp.example", "x")
        assert w.failures == 1                              # a success started the count again


def test_retry_at_of_a_set_of_addresses(db):
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    with Outbox(db, clock=lambda: t0) as ob:
        a = ob.address_failed("a.example", "x")
        b = ob.address_failed("b.example", "x")
        assert ob.retry_at(["a.example", "b.example"]) == min(a.next_attempt_at, b.next_attempt_at)
        assert ob.retry_at(["a.example", "c.example"]) is None       # c is due now
        assert ob.retry_at([]) is None
