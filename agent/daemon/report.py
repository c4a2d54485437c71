"""Report-back: after each job, a JSON report to the operator's ``report_url``.

The report (EID, IMEI, enabled ICCID, profile list, job id/kind/outcome/error,
timestamps) is written to the journal's ``reports`` table first, then POSTed
with ``Authorization: Bearer <report_token>`` over verified TLS; it stays
queued until a 2xx answer, retried with exponential back-off and jitter. The
``Idempotency-Key`` header carries the report's id, so a delivery repeated
after a lost answer or a crash is harmless to the receiver.

The package's one HTTP client (httpdeadline.HttpSession: ssl and our own HTTP/1.1 answer
reader, no http.client or requests), one connection per report; connected straight, not
through https_proxy as ES9+ traffic is, as before.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
import threading
import time
from urllib.parse import urlsplit

from ..http1 import IncompleteAnswer
from ..httpdeadline import HttpFailure, HttpSession
from .log import emit

log = logging.getLogger("esim-agent.daemon")

#: First retry of a refused report after about this long, doubling up to an hour: a backend
#: that blinked (a 503 during a deploy) gets the report within seconds, one that is down
#: for a day is asked about once an hour. Later reports wait behind the first (order kept).
REPORT_RETRY_BASE_S = 5.0


def report_body(job, snap: dict, *, state: str | None = None, error: dict | None = None,
                finished_at: str | None = None) -> dict:
    """The report of ``job`` (a journal Job as it was when it started; ``state``, ``error``
    and ``finished_at`` give its end) with the card's state ``snap`` after it."""
    profiles = snap.get("profiles") or []
    error = error if error is not None else job.error
    err = {k: v for k, v in error.items() if k not in ("details", "exit_code")} if error else None
    return {
        "eid": snap.get("eid"),
        "imei": (snap.get("modem") or {}).get("imei"),
        "enabled_iccid": next((p.get("iccid") for p in profiles if p.get("state") == "enabled"), None),
        "profiles": [{"iccid": p.get("iccid"), "state": p.get("state"), "profile_name": p.get("profile_name"),
                      "service_provider_name": p.get("service_provider_name")} for p in profiles],
        "job": {"id": job.id, "kind": job.kind, "source": job.source, "outcome": state or job.state, "error": err,
                "created_at": job.created_at, "started_at": job.started_at,
                "finished_at": finished_at or job.finished_at},
        "reported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
    }


class Reporter:
    def __init__(self, cfg, journal, *, timeout: float | None = None):
        self.url = cfg.report_url
        self.token = cfg.report_token
        self.insecure_http = bool(getattr(cfg, "report_insecure_http", False))
        self.ca = getattr(cfg, "report_ca", None)
        self.timeout = float(timeout or getattr(cfg, "http_timeout", 30) or 30)
        self.journal = journal
        self.failures = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """A new report may be waiting (the worker writes them)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="reports")
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)

    def _loop(self) -> None:
        while not self._stop:
            wait = self.deliver_due()
            self._wake.wait(wait)
            self._wake.clear()

    def deliver_due(self) -> float | None:
        """Send what is due; returns seconds until the next try (None: nothing waiting)."""
        from .worker import backoff
        for r in self.journal.due_reports():
            if self._stop:
                return None
            try:
                self.post(r["id"], r["body"])
            except ReportError as e:
                self.failures += 1
                delay = backoff(r["attempts"] + 1, base=REPORT_RETRY_BASE_S)
                self.journal.report_failed(r["id"], str(e), dt.datetime.now(dt.timezone.utc)
                                           + dt.timedelta(seconds=delay))
                emit("report_failed", logging.WARNING, report=r["id"], job=r["job_id"], error=str(e),
                     retry_in_s=round(delay))
                break       # keep the order: later reports wait for this one
            self.journal.report_delivered(r["id"])
            self.failures = 0
            emit("report_delivered", report=r["id"], job=r["job_id"])
        t = self.journal.next_report_time()
        if t is None:
            return None
        return max(0.5, (dt.datetime.fromisoformat(t) - dt.datetime.now(dt.timezone.utc)).total_seconds())

    def post(self, rid: str, body: dict) -> None:
        u = urlsplit(self.url)
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": rid,
                   "User-Agent": "esim-agent"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        start = time.monotonic()
        try:
            if u.scheme == "https":
                ctx = ssl.create_default_context(cafile=self.ca) if self.ca else ssl.create_default_context()
                session = HttpSession(ctx, use_proxy=False)
            elif u.scheme == "http" and self.insecure_http:
                session = HttpSession(use_proxy=False)
            else:
                raise ReportError(f"report_url {self.url!r} is not https:// (plain HTTP needs report_insecure_http)")
            with session:
                resp = session.request("POST", self.url, data, headers, connect_timeout=self.timeout,
                                       read_timeout=self.timeout)
                got = 0
                try:
                    while got < 64 * 1024:      # read (and drop) at most 64 KiB of the answer
                        chunk = session.read1(resp, 64 * 1024 - got)
                        if not chunk:
                            break
                        got += len(chunk)
                except HttpFailure as e:
                    if not isinstance(e.cause, IncompleteAnswer):
                        raise               # a body cut short still leaves the status to go by
        except ReportError:
            raise
        except HttpFailure as e:
            c = e.cause
            raise ReportError(f"{u.hostname}: {type(c).__name__}: {c} after {time.monotonic() - start:.1f} s") from None
        except (OSError, ssl.SSLError) as e:
            raise ReportError(f"{u.hostname}: {type(e).__name__}: {e} after {time.monotonic() - start:.1f} s") from None
        if not 200 <= resp.status < 300:
            raise ReportError(f"{u.hostname} answered HTTP {resp.status}")


class ReportError(Exception):
    pass
