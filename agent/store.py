"""Durable local state in SQLite: the notification outbox and a small key/value table.

Why an outbox (docs/protocol.md §6.3): an eUICC
notification removed from the card before the SM-DP+ acknowledged it is lost
for good, and the SM-DP+ then keeps a wrong view of the profile.  The rule the
flows follow, which this module makes crash-safe:

1. ``record()`` every notification the card holds (its exact DER) and commit,
   *before* anything is sent;
2. ``handleNotification``; only on acceptance ``mark_sent()`` (commit);
3. RemoveNotificationFromList on the card, then ``mark_removed()``.

A crash anywhere leaves a state ``reconcile()`` resolves on the next run
against the card's current list of sequence numbers:

* crash before 2 -> still ``pending`` -> sent again (at-least-once delivery;
  SM-DP+s tolerate a duplicate, they cannot recover a missing one);
* crash between 2 and 3 -> ``sent`` and still on the card -> removed from the
  card now, *not* resent;
* crash between 3 and the bookkeeping -> ``sent`` and gone from the card ->
  marked ``removed``.

If another tool removed a notification we had not delivered yet, we still
hold its DER: the entry stays ``pending`` with ``removed_externally`` set and
is delivered from the outbox (nothing left to remove on the card).

Status meaning: ``pending`` = not yet acknowledged by the server; ``sent`` =
acknowledged, still on the card; ``removed`` = acknowledged and off the card.
So ``removed`` always implies delivered.  ``dropped`` = retired on request
(`notification drop`, or `notification remove` of an entry only the outbox still
holds) without delivery: never sent, never deleted, kept as history.

Retries: every failed attempt counts (``attempts``, ``last_error``); a server
address that failed backs off (table ``notification_addresses``): it is not
tried again before its ``next_attempt_at``, which doubles with every failure
in a row (from BACKOFF_BASE_S, ±20 % jitter, at most BACKOFF_CAP_S) and is
forgotten after a success.  So one unreachable server neither makes every run
fail nor slows every later operation down.

Storage: one SQLite file in the state directory (config.state_dir()), WAL
journal so the CLI and the daemon can use it at the same time, busy_timeout so
they wait for each other instead of failing, synchronous=FULL so a committed
row survives power loss, BEGIN IMMEDIATE for every write so two writers never
deadlock on a lock upgrade.  File mode 0600 (notifications carry EID/ICCID).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable

TYPE_CHECKING = False   # typing's import (~5 ms) only for checkers: annotations are strings here
if TYPE_CHECKING:
    from typing import Any

from .errors import AgentError
from .logs import get_logger

log = get_logger(__name__)

DB_NAME = "esim-agent.db"
SCHEMA_VERSION = 3      # 3: notification status 'dropped' (+ dropped_at), notification_addresses
BUSY_TIMEOUT_S = 30.0
STATUSES = ("pending", "sent", "removed", "dropped")
#: Back-off of a notification address after failures in a row: BASE·2^(n−1), ±20 %, at most CAP.
BACKOFF_BASE_S = 60.0
BACKOFF_CAP_S = 6 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    eid                TEXT    NOT NULL,
    seq_number         INTEGER NOT NULL,
    operation          TEXT    NOT NULL,
    address            TEXT    NOT NULL,
    iccid              TEXT,
    der                BLOB    NOT NULL,
    status             TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'removed',
                                                                          'dropped')),
    removed_externally INTEGER NOT NULL DEFAULT 0,
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT,
    next_attempt_at    TEXT,
    created_at         TEXT    NOT NULL,
    sent_at            TEXT,
    removed_at         TEXT,
    dropped_at         TEXT,
    UNIQUE (eid, seq_number)
);
CREATE INDEX IF NOT EXISTS notifications_status ON notifications (status, eid);
-- Per server address: failures in a row and when it may be tried again (back-off).
CREATE TABLE IF NOT EXISTS notification_addresses (
    address          TEXT    PRIMARY KEY,
    failures         INTEGER NOT NULL,
    last_error       TEXT,
    next_attempt_at  TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL
);
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


class StoreError(AgentError):
    """The local state database cannot be used (exit 1)."""

    code = "store_error"


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def default_path() -> Path:
    """<state dir>/esim-agent.db; the state dir follows config.state_dir()
    ($ESIM_AGENT_STATE_DIR, config state_dir, /var/lib/esim-agent if writable, else
    $XDG_STATE_HOME or ~/.local/state /esim-agent)."""
    from . import config
    return config.state_dir() / DB_NAME


def _resolve(path: str | os.PathLike | None) -> Path:
    if path is None:
        return default_path()
    p = Path(path)
    try:
        is_dir = p.is_dir()
    except (OSError, ValueError):   # name too long, NUL byte: connect() reports it as store_unavailable
        is_dir = False
    if is_dir:
        return p / DB_NAME
    return p


def connect(path: str | os.PathLike | None = None, *, busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open (creating if needed) the state database with our durability settings."""
    p = _resolve(path)
    try:
        if not p.parent.exists():
            p.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        if not p.exists():
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(str(p), timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # e.g. a filesystem without shared memory: still correct, less concurrent
            log.warning("state database %s: WAL unavailable (journal_mode=%s)", p, mode)
        conn.execute("PRAGMA synchronous = FULL")
        _migrate(conn)
    except (OSError, ValueError, sqlite3.Error) as e:   # ValueError: a NUL byte in the path
        raise StoreError(f"cannot open the state database {p}: {e}. Check the directory permissions or set "
                         "ESIM_AGENT_STATE_DIR / state_dir in the config.", code="store_unavailable",
                         details={"path": str(p)}) from None
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    ver = conn.execute("PRAGMA user_version").fetchone()[0]
    if ver > SCHEMA_VERSION:
        raise StoreError(f"the state database was written by a newer esim-agent (schema {ver} > "
                         f"{SCHEMA_VERSION}); upgrade esim-agent", code="store_too_new")
    if ver < SCHEMA_VERSION:
        # Not executescript(): it would commit on its own.  Another process may be migrating at the
        # same moment; BEGIN IMMEDIATE serialises us and the statements are idempotent.
        conn.execute("BEGIN IMMEDIATE")
        try:
            _notifications_v3(conn)
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _notifications_v3(conn: sqlite3.Connection) -> None:
    """Schema 3: a notifications table of an older schema gets the status 'dropped' and
    dropped_at. SQLite cannot change a CHECK constraint in place, so the table is rebuilt
    with every row (inside the caller's transaction; a no-op when already done)."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'notifications'").fetchone()
    if row is None or "'dropped'" in row[0]:
        return
    cols = ("eid, seq_number, operation, address, iccid, der, status, removed_externally, attempts, last_error, "
            "next_attempt_at, created_at, sent_at, removed_at")
    conn.execute("DROP TABLE IF EXISTS notifications_v3")
    create = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS notifications ("):]
    create = create[:create.index(";")].replace("IF NOT EXISTS notifications (", "notifications_v3 (", 1)
    conn.execute(create)
    conn.execute(f"INSERT INTO notifications_v3 ({cols}) SELECT {cols} FROM notifications")
    conn.execute("DROP TABLE notifications")          # its index goes with it; _SCHEMA makes it again
    conn.execute("ALTER TABLE notifications_v3 RENAME TO notifications")


class _Db:
    def __init__(self, path: str | os.PathLike | None = None, *, clock: Callable[[], _dt.datetime] | None = None,
                 busy_timeout: float = BUSY_TIMEOUT_S):
        self.path = _resolve(path)
        self._conn = connect(self.path, busy_timeout=busy_timeout)
        self._conn.row_factory = sqlite3.Row
        self._clock = clock or _utcnow
        self._lock = threading.RLock()

    def _now(self) -> str:
        return self._clock().astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")

    @contextmanager
    def _tx(self):
        """One write transaction, taken with BEGIN IMMEDIATE (the write lock up front)."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreError(f"the state database {self.path} is busy or unwritable: {e}",
                                 code="store_busy") from None
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._conn.execute("ROLLBACK")
                raise StoreError(f"cannot commit to the state database {self.path}: {e}",
                                 code="store_unavailable") from None

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- outbox ------------------------------------------------------------------------

@dataclass(frozen=True)
class Notification:
    """A notification in the outbox: the card's signed bytes and where they go."""
    eid: str
    seq_number: int
    operation: str
    address: str
    iccid: str | None
    der: bytes
    status: str
    removed_externally: bool
    attempts: int
    last_error: str | None
    next_attempt_at: str | None
    created_at: str
    sent_at: str | None
    removed_at: str | None
    dropped_at: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status in ("sent", "removed")

    @property
    def needs_card_removal(self) -> bool:
        """Delivered and (as far as we know) still on the card."""
        return self.status == "sent"

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "der"}
        d["der_len"] = len(self.der)
        return d

    @classmethod
    def _from_row(cls, r: sqlite3.Row) -> "Notification":
        return cls(r["eid"], r["seq_number"], r["operation"], r["address"], r["iccid"], bytes(r["der"]),
                   r["status"], bool(r["removed_externally"]), r["attempts"], r["last_error"],
                   r["next_attempt_at"], r["created_at"], r["sent_at"], r["removed_at"], r["dropped_at"])


@dataclass
class ReconcileResult:
    """What to do after comparing the outbox with the card's notification list."""

    remove_from_card: list[int] = field(default_factory=list)  # delivered, still on the card: remove, don't resend
    send: list[Notification] = field(default_factory=list)     # pending, on the card: deliver, then remove
    deliver_only: list[Notification] = field(default_factory=list)  # pending, gone from the card: deliver only
    unknown_on_card: list[int] = field(default_factory=list)   # on the card, not recorded: fetch DER, record()
    confirmed_removed: list[int] = field(default_factory=list)  # were 'sent', now gone: marked removed

    @property
    def nothing_to_do(self) -> bool:
        return not (self.remove_from_card or self.send or self.deliver_only or self.unknown_on_card)

    def to_json(self) -> dict:
        return {"remove_from_card": self.remove_from_card,
                "send": [n.seq_number for n in self.send],
                "deliver_only": [n.seq_number for n in self.deliver_only],
                "unknown_on_card": self.unknown_on_card,
                "confirmed_removed": self.confirmed_removed}


#: Notification sequence numbers the outbox can hold (an SQLite INTEGER is signed 64-bit).
MAX_SEQ = 2 ** 63 - 1


def _seq_ok(seq) -> bool:
    return isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_SEQ


def _show_seq(seq) -> str:
    if isinstance(seq, int) and seq.bit_length() > 128:
        return f"(a {seq.bit_length()}-bit number)"
    return repr(seq)


_COLS = ("eid, seq_number, operation, address, iccid, der, status, removed_externally, attempts, last_error, "
         "next_attempt_at, created_at, sent_at, removed_at, dropped_at")


@dataclass(frozen=True)
class AddressState:
    """Back-off of one notification address: failures in a row, the last error, the next try."""
    address: str
    failures: int
    last_error: str | None
    next_attempt_at: str

    def to_json(self) -> dict:
        return {"address": self.address, "failures": self.failures, "last_error": self.last_error,
                "next_attempt_at": self.next_attempt_at}


def backoff_delay(failures: int, *, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S) -> float:
    """Seconds before an address that failed ``failures`` times in a row is tried again:
    exponential, ±20 % jitter (a fleet coming back online must not come in one wave), capped."""
    import random
    d = base * (2.0 ** min(max(0, failures - 1), 32))
    return min(cap, d * random.uniform(0.8, 1.2))


class Outbox(_Db):
    """The notification outbox (see module docstring for the protocol)."""

    def _row(self, eid: str, seq: int) -> sqlite3.Row | None:
        if not _seq_ok(seq):       # SQLite INTEGER is 64-bit: a larger number is in no row
            return None
        rows = self._conn.execute(f"SELECT {_COLS} FROM notifications WHERE eid = ? AND seq_number = ?",
                                  (eid, int(seq))).fetchall()
        return rows[0] if rows else None

    def _require(self, eid: str, seq: int) -> sqlite3.Row:
        r = self._row(eid, seq)
        if r is None:
            shown = seq if _seq_ok(seq) else _show_seq(seq)
            raise StoreError(f"notification {shown} of eUICC {eid} is not in the outbox", code="unknown_notification",
                             details={"eid": eid, "seq_number": shown})
        return r

    def record(self, eid: str, seq: int, operation: str, address: str, iccid: str | None,
               der: bytes) -> Notification:
        """Persist a notification (committed on return).  Idempotent for identical DER.

        The same sequence number with different DER means the card reused it; the old row
        is moved to notifications_superseded and the new one recorded as pending.
        """
        if not eid or not isinstance(eid, str):
            raise StoreError("record(): eid must be a non-empty string", code="bad_store_input")
        if not _seq_ok(seq):
            raise StoreError(f"record(): bad sequence number {_show_seq(seq)}", code="bad_store_input")
        der = bytes(der)
        if not der:
            raise StoreError("record(): empty notification DER", code="bad_store_input")
        with self._tx() as c:
            old = self._row(eid, seq)
            if old is not None:
                if bytes(old["der"]) == der:
                    return Notification._from_row(old)
                log.warning("eUICC %s reused notification sequence number %d with different content; "
                            "keeping the old entry (%s) in notifications_superseded", eid, seq, old["status"])
                c.execute("INSERT INTO notifications_superseded (eid, seq_number, operation, address, iccid, der, "
                          "status, attempts, last_error, created_at, sent_at, removed_at, superseded_at) "
                          "SELECT eid, seq_number, operation, address, iccid, der, status, attempts, last_error, "
                          "created_at, sent_at, removed_at, ? FROM notifications WHERE eid = ? AND seq_number = ?",
                          (self._now(), eid, seq))
                c.execute("DELETE FROM notifications WHERE eid = ? AND seq_number = ?", (eid, seq))
            c.execute("INSERT INTO notifications (eid, seq_number, operation, address, iccid, der, status, "
                      "created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                      (eid, seq, str(operation), str(address), iccid, der, self._now()))
            return Notification._from_row(self._row(eid, seq))

    def mark_sent(self, eid: str, seq: int) -> Notification:
        """The server acknowledged it.  If the card no longer holds it, it is finished ('removed')."""
        with self._tx() as c:
            r = self._require(eid, seq)
            if r["status"] == "pending":
                now = self._now()
                if r["removed_externally"]:
                    c.execute("UPDATE notifications SET status = 'removed', sent_at = ?, removed_at = ?, "
                              "attempts = attempts + 1, last_error = NULL, next_attempt_at = NULL "
                              "WHERE eid = ? AND seq_number = ?", (now, now, eid, seq))
                else:
                    c.execute("UPDATE notifications SET status = 'sent', sent_at = ?, attempts = attempts + 1, "
                              "last_error = NULL, next_attempt_at = NULL WHERE eid = ? AND seq_number = ?",
                              (now, eid, seq))
            return Notification._from_row(self._row(eid, seq))

    def mark_removed(self, eid: str, seq: int) -> Notification | None:
        """The card no longer holds it.  An undelivered entry stays pending (still deliverable)."""
        with self._tx() as c:
            r = self._row(eid, seq)
            if r is None:
                return None
            if r["status"] == "sent":
                c.execute("UPDATE notifications SET status = 'removed', removed_at = ? "
                          "WHERE eid = ? AND seq_number = ?", (self._now(), eid, seq))
            elif r["status"] == "pending" and not r["removed_externally"]:
                log.warning("notification %d of %s left the card before delivery; keeping it for delivery",
                            seq, eid)
                c.execute("UPDATE notifications SET removed_externally = 1, removed_at = ? "
                          "WHERE eid = ? AND seq_number = ?", (self._now(), eid, seq))
            return Notification._from_row(self._row(eid, seq))

    def mark_failed(self, eid: str, seq: int, error: str, *, retry_at: _dt.datetime | None = None) -> Notification:
        """A delivery attempt failed; the entry stays pending.  ``retry_at`` is advisory (see ``due``)."""
        with self._tx() as c:
            self._require(eid, seq)
            nxt = retry_at.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds") if retry_at else None
            c.execute("UPDATE notifications SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? "
                      "WHERE eid = ? AND seq_number = ? AND status = 'pending'",
                      (str(error)[:2000], nxt, eid, seq))
            return Notification._from_row(self._row(eid, seq))

    def drop(self, eid: str, seq: int) -> Notification:
        """Retire an undelivered entry on request: it is never sent, and kept as history
        (status 'dropped', dropped_at).  Idempotent; a delivered entry is refused."""
        with self._tx() as c:
            r = self._require(eid, seq)
            if r["status"] in ("sent", "removed"):
                raise StoreError(f"notification {seq} of eUICC {eid} was delivered already; nothing to drop",
                                 code="bad_store_input", details={"eid": eid, "seq_number": seq})
            if r["status"] == "pending":
                c.execute("UPDATE notifications SET status = 'dropped', dropped_at = ?, next_attempt_at = NULL "
                          "WHERE eid = ? AND seq_number = ?", (self._now(), eid, seq))
            return Notification._from_row(self._row(eid, seq))

    # -- per-address back-off --
    def _address_row(self, address: str) -> sqlite3.Row | None:
        rows = self._conn.execute("SELECT address, failures, last_error, next_attempt_at FROM "
                                  "notification_addresses WHERE address = ?", (str(address),)).fetchall()
        return rows[0] if rows else None

    def address_state(self, address: str) -> AddressState | None:
        with self._lock:
            r = self._address_row(address)
        return AddressState(r["address"], r["failures"], r["last_error"], r["next_attempt_at"]) if r else None

    def address_failed(self, address: str, error: str) -> AddressState:
        """A delivery to ``address`` failed: one more failure in a row, and its next try backs off."""
        with self._tx() as c:
            r = self._address_row(address)
            failures = (r["failures"] if r else 0) + 1
            now = self._clock().astimezone(_dt.timezone.utc)
            nxt = (now + _dt.timedelta(seconds=backoff_delay(failures))).isoformat(timespec="milliseconds")
            c.execute("INSERT INTO notification_addresses (address, failures, last_error, next_attempt_at, "
                      "updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET "
                      "failures = excluded.failures, last_error = excluded.last_error, "
                      "next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at",
                      (str(address), failures, str(error)[:2000], nxt, self._now()))
        return self.address_state(address)

    def address_ok(self, address: str) -> None:
        """A delivery to ``address`` succeeded: its back-off is forgotten."""
        with self._tx() as c:
            c.execute("DELETE FROM notification_addresses WHERE address = ?", (str(address),))

    def waiting(self, address: str, now: _dt.datetime | None = None) -> AddressState | None:
        """The address's back-off state if it must not be tried yet, else None."""
        st = self.address_state(address)
        ts = (now or self._clock()).astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")
        return st if st is not None and st.next_attempt_at > ts else None

    def retry_at(self, addresses: Iterable[str], now: _dt.datetime | None = None) -> str | None:
        """When the first of ``addresses`` may be tried again, if every one of them is waiting;
        None when one is due now (or there is none)."""
        times = []
        for a in set(addresses):
            w = self.waiting(a, now)
            if w is None:
                return None
            times.append(w.next_attempt_at)
        return min(times) if times else None

    def get(self, eid: str, seq: int) -> Notification | None:
        with self._lock:
            r = self._row(eid, seq)
        return Notification._from_row(r) if r else None

    def pending(self, eid: str | None = None) -> list[Notification]:
        """Undelivered notifications (including ones already gone from the card), oldest first."""
        if eid is None:
            rows = self._query(f"SELECT {_COLS} FROM notifications WHERE status = 'pending' "
                               "ORDER BY eid, seq_number")
        else:
            rows = self._query(f"SELECT {_COLS} FROM notifications WHERE status = 'pending' AND eid = ? "
                               "ORDER BY seq_number", (eid,))
        return [Notification._from_row(r) for r in rows]

    def due(self, eid: str | None = None, now: _dt.datetime | None = None) -> list[Notification]:
        """pending() minus entries whose next_attempt_at is still in the future."""
        ts = (now or self._clock()).astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")
        return [n for n in self.pending(eid) if not n.next_attempt_at or n.next_attempt_at <= ts]

    def list(self, eid: str | None = None, status: str | None = None) -> list[Notification]:
        sql, args = f"SELECT {_COLS} FROM notifications WHERE 1=1", []
        if eid is not None:
            sql += " AND eid = ?"
            args.append(eid)
        if status is not None:
            if status not in STATUSES:
                raise StoreError(f"unknown status {status!r}", code="bad_store_input")
            sql += " AND status = ?"
            args.append(status)
        return [Notification._from_row(r) for r in self._query(sql + " ORDER BY eid, seq_number", tuple(args))]

    def superseded(self, eid: str | None = None) -> list[dict]:
        sql = "SELECT * FROM notifications_superseded" + (" WHERE eid = ?" if eid else "") + " ORDER BY rowid"
        return [dict(r) for r in self._query(sql, (eid,) if eid else ())]

    def matches(self, eid: str, seq: int, der: bytes) -> bool:
        """True if the outbox holds exactly this DER under (eid, seq): check before removing from a card
        whose sequence numbers might have been reused."""
        n = self.get(eid, seq)
        return n is not None and n.der == bytes(der)

    def reconcile(self, eid: str, card_seqs: Iterable[int]) -> ReconcileResult:
        """Compare with the card's current notification sequence numbers and fix the bookkeeping.

        Applied here (one transaction): 'sent' entries gone from the card become 'removed';
        pending entries gone from the card get removed_externally (still deliverable);
        pending entries the card holds again lose that flag.
        """
        on_card = {int(s) for s in card_seqs}
        res = ReconcileResult()
        with self._tx() as c:
            rows = c.execute(f"SELECT {_COLS} FROM notifications WHERE eid = ? ORDER BY seq_number",
                             (eid,)).fetchall()
            known = set()
            now = self._now()
            for r in rows:
                seq = r["seq_number"]
                known.add(seq)
                here = seq in on_card
                st = r["status"]
                if st == "pending":
                    if here:
                        if r["removed_externally"]:
                            c.execute("UPDATE notifications SET removed_externally = 0, removed_at = NULL "
                                      "WHERE eid = ? AND seq_number = ?", (eid, seq))
                        res.send.append(Notification._from_row(self._row(eid, seq)))
                    else:
                        if not r["removed_externally"]:
                            c.execute("UPDATE notifications SET removed_externally = 1, removed_at = ? "
                                      "WHERE eid = ? AND seq_number = ?", (now, eid, seq))
                        res.deliver_only.append(Notification._from_row(self._row(eid, seq)))
                elif st == "sent":
                    if here:
                        res.remove_from_card.append(seq)
                    else:
                        c.execute("UPDATE notifications SET status = 'removed', removed_at = ? "
                                  "WHERE eid = ? AND seq_number = ?", (now, eid, seq))
                        res.confirmed_removed.append(seq)
                elif here:  # 'removed' (delivered) yet on the card: our removal did not take; remove again
                    res.remove_from_card.append(seq)
            res.unknown_on_card = sorted(on_card - known)
        return res


# --- key/value -------------------------------------------------------------------------

class KeyValue(_Db):
    """Small JSON key/value table (namespace, key) -> value, for jobs and bookkeeping."""

    def get(self, namespace: str, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM kv WHERE namespace = ? AND key = ?", (namespace, key))
        return json.loads(rows[0]["value"]) if rows else default

    def set(self, namespace: str, key: str, value: Any) -> None:
        data = json.dumps(value, separators=(",", ":"), sort_keys=True)
        with self._tx() as c:
            c.execute("INSERT INTO kv (namespace, key, value, updated_at) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
                      "updated_at = excluded.updated_at", (namespace, key, data, self._now()))

    def delete(self, namespace: str, key: str) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key)).rowcount > 0

    def items(self, namespace: str) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"])
                for r in self._query("SELECT key, value FROM kv WHERE namespace = ? ORDER BY key", (namespace,))}
