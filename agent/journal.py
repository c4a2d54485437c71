"""The daemon's durable job journal (SQLite WAL, the same file as the outbox).

Every operation the daemon runs is a job: ``queued`` → ``running`` → one of
``done``, ``failed``, ``rolled_back``, ``cancelled``. A job's steps are
written (and committed, synchronous=FULL) *before* they run, with what a
restart needs to reconcile — a download's transaction ID and ICCID, a
switch's target and previous profile — so that after SIGKILL or a power cut
the next daemon can look at the eUICC's real state and finish, retry or fail
the job without repeating a step that already took effect (ops/ functions
read ``seen()`` for that).

Reports for the operator's backend wait in the ``reports`` table until a
server answered 2xx (at-least-once delivery, with an idempotency key).
"""
from __future__ import annotations

import datetime as _dt
import json
import secrets
from dataclasses import dataclass
from typing import Any

from .store import _Db

OPEN_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "rolled_back", "cancelled")


def new_id() -> str:
    # Sortable by creation time, unique without coordination.
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d%H%M%S")
    return f"j{now}-{secrets.token_hex(4)}"


@dataclass
class Job:
    """One job in the daemon's journal."""
    id: str
    kind: str
    params: dict
    source: str
    state: str
    step: str | None
    attempts: int
    not_before: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    result: Any
    error: dict | None

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    def to_json(self, *, full: bool = False) -> dict:
        d = {"id": self.id, "kind": self.kind, "source": self.source, "state": self.state, "step": self.step,
             "attempts": self.attempts, "created_at": self.created_at, "started_at": self.started_at,
             "finished_at": self.finished_at}
        if self.not_before and self.state == "queued":
            d["not_before"] = self.not_before
        if self.error:
            d["error"] = self.error
        if full:
            d["params"] = _public_params(self.params)
            d["result"] = self.result
        return d


def _public_params(params: dict) -> dict:
    """Parameters as shown on the socket and in reports: no secrets (confirmation codes)."""
    return {k: ("***" if k in ("confirmation_code",) and v else v) for k, v in params.items()}


class Journal(_Db):
    # --- jobs ---------------------------------------------------------------------
    def create(self, kind: str, params: dict, *, source: str) -> Job:
        jid = new_id()
        with self._tx() as c:
            c.execute("INSERT INTO jobs (id, kind, params, source, state, created_at) VALUES (?, ?, ?, ?, 'queued', ?)",
                      (jid, kind, json.dumps(params, sort_keys=True), source, self._now()))
        return self.get(jid)

    def get(self, jid: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (jid,))
        return _job(rows[0]) if rows else None

    def start(self, jid: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, ?), "
                      "attempts = attempts + 1 WHERE id = ?", (self._now(), jid))

    def step(self, jid: str, name: str, data: dict | None = None) -> None:
        """Record a step before it runs (committed when this returns)."""
        with self._tx() as c:
            n = c.execute("SELECT COALESCE(MAX(n), 0) + 1 FROM job_steps WHERE job_id = ?", (jid,)).fetchone()[0]
            c.execute("INSERT INTO job_steps (job_id, n, step, data, at) VALUES (?, ?, ?, ?, ?)",
                      (jid, n, name, json.dumps(data or {}, sort_keys=True), self._now()))
            c.execute("UPDATE jobs SET step = ? WHERE id = ?", (name, jid))

    def steps(self, jid: str) -> list[tuple[str, dict, str]]:
        return [(r["step"], json.loads(r["data"]), r["at"])
                for r in self._query("SELECT step, data, at FROM job_steps WHERE job_id = ? ORDER BY n", (jid,))]

    def finish(self, jid: str, state: str, *, result: Any = None, error: dict | None = None,
               report: dict | None = None) -> None:
        """End a job; ``report`` (for report_url) is queued in the same transaction, so a
        power cut can never leave a finished job without its report."""
        assert state in FINAL_STATES, state
        with self._tx() as c:
            c.execute("UPDATE jobs SET state = ?, finished_at = ?, result = ?, error = ? WHERE id = ?",
                      (state, self._now(), json.dumps(result) if result is not None else None,
                       json.dumps(error) if error else None, jid))
            if report is not None:
                c.execute("INSERT INTO reports (id, job_id, body, created_at) VALUES (?, ?, ?, ?)",
                          ("r" + new_id()[1:], jid, json.dumps(report, sort_keys=True), self._now()))

    def requeue(self, jid: str, not_before: _dt.datetime, error: dict | None) -> None:
        """Back to the queue (transient failure): runs again not before ``not_before``."""
        with self._tx() as c:
            c.execute("UPDATE jobs SET state = 'queued', not_before = ?, error = ? WHERE id = ?",
                      (not_before.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                       json.dumps(error) if error else None, jid))

    def jobs(self, *, states: tuple[str, ...] | None = None, limit: int = 50) -> list[Job]:
        if states:
            q = ",".join("?" * len(states))
            rows = self._query(f"SELECT * FROM jobs WHERE state IN ({q}) ORDER BY created_at, id LIMIT ?",
                               (*states, limit))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def next_due(self, now: _dt.datetime | None = None) -> tuple[Job | None, str | None]:
        """The oldest queued job that may run now, and the earliest not_before of those that may not."""
        now_s = (now or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="milliseconds")
        rows = self._query("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, id")
        later = None
        for r in rows:
            nb = r["not_before"]
            if nb is None or nb <= now_s:
                return _job(r), None
            later = nb if later is None or nb < later else later
        return None, later

    def counts(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}

    def prune(self, keep: int = 1000) -> int:
        """Forget all but the newest ``keep`` finished jobs (and their steps): the journal of a
        gateway that runs for years must not grow without bound. Open jobs are never pruned."""
        with self._tx() as c:
            old = [r[0] for r in c.execute(
                "SELECT id FROM jobs WHERE state NOT IN ('queued', 'running') ORDER BY created_at DESC, id DESC "
                "LIMIT -1 OFFSET ?", (keep,)).fetchall()]
            for jid in old:
                c.execute("DELETE FROM job_steps WHERE job_id = ?", (jid,))
                c.execute("DELETE FROM jobs WHERE id = ?", (jid,))
            c.execute("DELETE FROM reports WHERE delivered_at IS NOT NULL AND id NOT IN "
                      "(SELECT id FROM reports ORDER BY created_at DESC LIMIT ?)", (keep,))
        return len(old)

    # --- reports --------------------------------------------------------------------
    def add_report(self, job_id: str | None, body: dict) -> str:
        rid = "r" + new_id()[1:]
        with self._tx() as c:
            c.execute("INSERT INTO reports (id, job_id, body, created_at) VALUES (?, ?, ?, ?)",
                      (rid, job_id, json.dumps(body, sort_keys=True), self._now()))
        return rid

    def due_reports(self, now: _dt.datetime | None = None) -> list[dict]:
        now_s = (now or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="milliseconds")
        rows = self._query("SELECT * FROM reports WHERE delivered_at IS NULL AND "
                           "(next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY created_at, id", (now_s,))
        return [{"id": r["id"], "job_id": r["job_id"], "body": json.loads(r["body"]), "attempts": r["attempts"]}
                for r in rows]

    def next_report_time(self) -> str | None:
        rows = self._query("SELECT MIN(next_attempt_at) AS t FROM reports WHERE delivered_at IS NULL")
        return rows[0]["t"] if rows else None

    def report_delivered(self, rid: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE reports SET delivered_at = ?, attempts = attempts + 1 WHERE id = ?",
                      (self._now(), rid))

    def report_failed(self, rid: str, error: str, retry_at: _dt.datetime) -> None:
        with self._tx() as c:
            c.execute("UPDATE reports SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE id = ?",
                      (error, retry_at.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds"), rid))

    def report_counts(self) -> dict[str, int]:
        r = self._query("SELECT SUM(delivered_at IS NULL) AS waiting, SUM(delivered_at IS NOT NULL) AS delivered "
                        "FROM reports")[0]
        return {"waiting": r["waiting"] or 0, "delivered": r["delivered"] or 0}


def _job(r) -> Job:
    return Job(id=r["id"], kind=r["kind"], params=json.loads(r["params"]), source=r["source"], state=r["state"],
               step=r["step"], attempts=r["attempts"], not_before=r["not_before"], created_at=r["created_at"],
               started_at=r["started_at"], finished_at=r["finished_at"],
               result=json.loads(r["result"]) if r["result"] else None,
               error=json.loads(r["error"]) if r["error"] else None)


class JournalSteps:
    """ops.Steps backed by the journal, for one job (``prefix`` for sub-operations)."""

    def __init__(self, journal: Journal, job_id: str, prefix: str = ""):
        self.journal, self.job_id, self.prefix = journal, job_id, prefix
        self._seen = {name: data for name, data, _ in journal.steps(job_id)}

    def step(self, name: str, **data: Any) -> None:
        full = self.prefix + name
        self.journal.step(self.job_id, full, data)
        self._seen[full] = data

    def seen(self, name: str) -> dict | None:
        return self._seen.get(self.prefix + name)

    def child(self, prefix: str) -> "JournalSteps":
        return JournalSteps(self.journal, self.job_id, self.prefix + prefix + ".")
