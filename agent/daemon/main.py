"""`esim-agent daemon`: the gateway service (systemd Type=notify, runs in the foreground).

What it does, and why it is split the way it is:
* holds the modem port's lock for its whole life, so no other tool (nor a
  technician's `esim-agent --direct`) interleaves commands with it; the CLI talks
  to it through its socket instead (server.py);
* keeps the job journal (journal.py): every operation is a job, recorded
  before it runs; at start-up the jobs a crash left open are queued again and
  the card worker reconciles them with the eUICC and the SM-DP+;
* runs jobs one at a time in the card worker process (worker.py), started when
  there is work and gone when idle, so the idle service stays small;
* discovery: at start-up, every ``discovery_interval`` and on `esim-agent sync`,
  a ``sync`` job asks the default SM-DP+ whether a profile waits for this eUICC;
* retries notifications left in the outbox with back-off, and delivers reports
  to ``report_url`` (report.py);
* SGP.32 IPAd, with ``[eim]`` or once the eUICC has an eIM: ``ipa.poll`` jobs at
  start-up, every ``poll_interval`` and when connectivity returns, and
  ``ipa.fallback`` when the enabled profile stays unregistered for
  ``fallback_after`` (the rules: ipa_schedule.py);
* tells systemd READY=1, STATUS= and WATCHDOG=1 (sdnotify.py).

Logs: one ``key=value`` line per event on stdout (journald); no secrets.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from ..errors import AgentError, TransportError, UsageError
from .log import emit
from .client import socket_answers
from .server import HttpError, UnixHttpServer

log = logging.getLogger("esim-agent.daemon")

VERSION = "0.3.0"
RECENT_JOBS = 20
JOB_KINDS = {"chip.info", "chip.set_default_dp", "chip.reset", "profile.list", "profile.enable", "profile.disable",
             "profile.delete", "profile.nickname", "profile.download", "notification.list", "notification.remove",
             "notification.drop", "notification.process", "sync",
             "ipa.add_eim", "ipa.list_eim", "ipa.poll", "ipa.status", "ipa.return_from_fallback", "ipa.fallback"}
#: Read-only operations whose answers the card worker's snapshot carries (its "view"), and how
#: old that view may be for `GET /view/OP` to answer from it: within this, a technician's
#: `chip info` or `profile list` needs no line time (issue #8: through the daemon within 2 x the
#: start of `python -c "import serial"`; the card's own answers take ~45 ms at 115200 baud and
#: far more on a modem's 80 ms per command). Older, the CLI runs the operation as a job.
VIEW_OPS = ("chip.info", "profile.list")
VIEW_MAX_AGE = 10.0


class Daemon:
    def __init__(self, cfg, *, config_path: str | None = None, verbose: int = 0, worker_idle: float | None = None):
        from .. import config as config_mod
        from ..journal import Journal
        self.cfg = cfg
        self.config_path = config_path
        self.verbose = verbose
        self.worker_idle = worker_idle
        self.started = time.time()
        self.state_dir = config_mod.state_dir(cfg)
        self.journal = Journal(self.state_dir)
        self.lock = threading.Condition()
        self.stop_reason: str | None = None
        self.worker: subprocess.Popen | None = None
        self.worker_busy: str | None = None        # job id being run
        self.sent_to_worker: set[str] = set()
        self.snapshot: dict = {}
        # The view: VIEW_OPS' answers as last read, op -> {"epoch", "at", "result"}, from the
        # worker's snapshots and from those operations' own jobs. An answer is usable while no
        # job was handed to the worker since it was read: each hand-over counts one (view_epoch),
        # as does a failed registration watch (a watch only reads), and each answer notes the
        # count it was read under. A job that failed on the port leaves no snapshot behind, so
        # what was read before it stays unusable.
        self.view: dict[str, dict] = {}
        self.view_epoch = 0
        self.port_lock = None
        self.locked_path: str | None = None
        self.next_discovery = 0.0
        self.notif_failures = 0
        self.next_notifications: float | None = None
        self.reporter = None
        self.server: UnixHttpServer | None = None
        self.ipa = None                            # ipa_schedule.IpaSchedule, made in run()
        self.watch_wanted = False                  # a registration watch waits for an idle worker
        self.watch_sent = False
        self.ipa_last: dict = {}                   # the daemon's last eIM poll, for status

    # --- start-up -----------------------------------------------------------------
    def take_port(self) -> None:
        """The port's lock file for the daemon's life: other esim-agent processes see the port busy."""
        from ..transport.at import PortLock
        dev = self.cfg.device
        if not dev:
            raise UsageError(f"config {self.cfg.source or '(none)'}: device is not set: the daemon needs the "
                             "modem's AT port", code="config_invalid")
        if not os.path.exists(dev):
            raise TransportError(f"modem port {dev} not found", code="device_not_found")
        self.port_lock = PortLock(os.path.realpath(dev))
        self.locked_path = os.path.realpath(dev)

    def follow_port(self) -> None:
        """A USB modem that re-enumerated (after AT+CFUN or a SIM reset) may come back as
        another ttyUSBn behind the same /dev/serial/by-id link: lock that node instead."""
        from ..transport.at import PortLock
        dev = self.cfg.device
        real = os.path.realpath(dev)
        if self.port_lock is None or real == self.locked_path or not os.path.exists(real):
            return
        try:
            new = PortLock(real)
        except AgentError as e:
            emit("port_lock_failed", logging.WARNING, device=dev, node=real, error=e.message)
            return
        self.port_lock.release()
        self.port_lock, self.locked_path = new, real
        emit("port_moved", device=dev, node=real)

    def recover(self) -> None:
        """Jobs a crash (or a stop) left running go back to the queue; the worker
        reconciles them with the card and the SM-DP+ before anything else."""
        for job in self.journal.jobs(states=("running",), limit=1000):
            emit("job_recovered", job=job.id, kind=job.kind, step=job.step)
            self.journal.requeue(job.id, dt.datetime.now(dt.timezone.utc), job.error)

    def open_socket(self) -> None:
        path = self.cfg.socket
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            if socket_answers(path):
                raise UsageError(f"another esim-agent daemon answers on {path}", code="daemon_running")
            os.unlink(path)         # left by a killed daemon
        old = os.umask(0o117)       # the socket is born 0660 (no window with wider access)
        try:
            self.server = UnixHttpServer(path, self)
        finally:
            os.umask(old)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 3600}, daemon=True,
                         name="socket").start()

    # --- the worker ---------------------------------------------------------------------
    def _worker_cmd(self) -> list[str]:
        cmd = [sys.executable, "-m", "agent.daemon.worker"]
        if self.config_path:
            cmd += ["--config", os.path.abspath(self.config_path)]
        if self.worker_idle is not None:
            cmd += ["--idle-exit", str(self.worker_idle)]
        if self.verbose:
            cmd.append("-v")
        return cmd

    def _ensure_worker(self) -> subprocess.Popen:
        if self.worker is not None and self.worker.poll() is None:
            return self.worker
        env = dict(os.environ)
        env["ESIM_AGENT_STATE_DIR"] = str(self.state_dir)
        self.worker = subprocess.Popen(self._worker_cmd(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, bufsize=1, env=env)
        self.sent_to_worker.clear()
        self.worker_busy = None
        emit("worker_started", pid=self.worker.pid)
        threading.Thread(target=self._read_worker, args=(self.worker,), daemon=True, name="worker-out").start()
        return self.worker

    def _read_worker(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("event")
            with self.lock:
                if ev == "started":
                    self.worker_busy = msg["job"]
                    emit("job_started", job=msg["job"])
                elif ev == "finished":
                    self.worker_busy = None
                    self.sent_to_worker.discard(msg["job"])
                    self._job_finished(msg["job"])
                elif ev == "snapshot":
                    self.snapshot = msg.get("data") or {}
                    view = self.snapshot.pop("view", None) or {}      # kept once, in self.view
                    if "error" in self.snapshot:
                        self.view_epoch += 1    # the card failed to answer: nothing read before counts
                    else:
                        for op, result in view.items():
                            self._saw(op, result, self.snapshot.get("at"))
                    self._after_snapshot()
                    self.follow_port()
                elif ev == "watch":
                    self.watch_sent = False
                    self._after_watch(msg.get("data") or {})
                self.lock.notify_all()
        proc.wait()
        with self.lock:
            if self.worker is proc:
                self.watch_sent = False
                self.view_epoch += 1        # whatever it did to the card last is unknown
                if self.worker_busy:
                    # The worker died mid-job (a bug, or killed): the job is reconciled on the next run.
                    emit("worker_died", logging.WARNING, job=self.worker_busy, rc=proc.returncode)
                    job = self.journal.get(self.worker_busy)
                    if job is not None and job.state == "running":
                        self.journal.requeue(job.id, dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5),
                                             {"code": "worker_died", "message": f"card worker exited {proc.returncode}"})
                self.worker, self.worker_busy = None, None
                self.sent_to_worker.clear()
                emit("worker_stopped", rc=proc.returncode)
            self.lock.notify_all()

    def _job_finished(self, jid: str) -> None:
        job = self.journal.get(jid)
        if job is None:
            return
        fields = {"job": jid, "kind": job.kind, "state": job.state}
        if job.error:
            fields["error"] = job.error.get("code")
        emit("job_finished", logging.WARNING if job.state in ("failed", "rolled_back") else logging.INFO, **fields)
        if job.kind in VIEW_OPS and job.state == "done" and not job.params and isinstance(job.result, dict) \
                and "warnings" not in job.result:
            self._saw(job.kind, job.result, time.time())     # the card's answer just now
        if self.reporter is not None:
            self.reporter.wake()    # the worker wrote this job's report with its end (one transaction)
        if job.kind == "sync" and job.state == "done" and isinstance(job.result, dict):
            if job.result.get("outcome") == "nothing_waiting":
                emit("discovery", outcome="nothing_waiting", smdp=job.result.get("smdp_address"))
        if job.kind.startswith("ipa."):
            self._ipa_job_finished(job)
        if job.kind == "notification.process":
            if job.state == "done" and not any(n.get("status") == "failed"
                                               for n in (job.result or {}).get("notifications", [])):
                self.notif_failures = 0
            else:
                self.notif_failures += 1

    # --- SGP.32: eIM polls, the registration watch, fallback ------------------------------
    def _ipa_queue(self, jobs) -> None:
        for j in jobs:
            if j.kind == "watch":
                self.watch_wanted = True
                continue
            if self._open_of_kind(j.kind):
                continue            # one waiting poll (or fallback) is enough
            job = self.journal.create(j.kind, j.params, source="eim")
            emit("job_queued", job=job.id, kind=j.kind, source="eim", why=j.why)

    def _ipa_observe(self, data: dict, **watch) -> None:
        if self.ipa is None:
            return
        now = time.monotonic()
        if "eim_count" in data:
            self._ipa_queue(self.ipa.card_eim_count(data["eim_count"], now))
        reg = data.get("registration")
        registered = reg.get("registered") if isinstance(reg, dict) else None
        enabled = next((p.get("iccid") for p in data.get("profiles") or [] if p.get("state") == "enabled"),
                       data.get("enabled_iccid"))
        was = self.ipa.registered
        self._ipa_queue(self.ipa.observe(registered=registered, enabled_iccid=enabled, now=now, **watch))
        if registered is not None and registered != was and was is not None:
            emit("registration", registered=registered, iccid=enabled)

    def _after_watch(self, data: dict) -> None:
        if "error" in data:
            self.view_epoch += 1        # the watch only reads, but failed: the card may be gone
            emit("watch_failed", logging.WARNING, error=(data["error"] or {}).get("code"))
        self._ipa_observe(data, fallback_iccid=data.get("fallback_iccid"),
                          fallback_known="fallback_iccid" in data)

    def _ipa_job_finished(self, job) -> None:
        if self.ipa is not None:
            self.ipa.job_finished(job.kind, job.state, job.params, job.result)
        if job.kind == "ipa.poll":
            res = job.result if isinstance(job.result, dict) else {}
            self.ipa_last = {"job": job.id, "source": job.source, "state": job.state, "finished_at": job.finished_at,
                             "error": (job.error or {}).get("code"), "eim_id": res.get("eim_id"),
                             "eim_url": res.get("eim_url"),
                             "executed": len(res["executed"]) if isinstance(res.get("executed"), list) else None}
            emit("eim_polled", job=job.id, state=job.state, eim=res.get("eim_id"),
                 executed=self.ipa_last["executed"])
        elif job.kind == "ipa.fallback" and job.state == "done":
            emit("fallback", iccid=(job.result or {}).get("iccid") if isinstance(job.result, dict) else None)

    def _send_watch(self) -> None:
        """The registration watch: a read in the card worker (not a journal job: every few
        minutes for years would crowd the journal and `status`), only while no job waits."""
        w = self._ensure_worker()
        try:
            w.stdin.write(json.dumps({"watch": True}) + "\n")
            w.stdin.flush()
            self.watch_wanted, self.watch_sent = False, True
        except (BrokenPipeError, OSError):
            pass

    def _after_snapshot(self) -> None:
        self._ipa_observe(self.snapshot)
        pending = max(self.snapshot.get("outbox_pending") or 0, self.snapshot.get("notifications_on_card") or 0)
        if pending and self.next_notifications is None:
            from .worker import backoff
            delay = backoff(self.notif_failures + 1) if self.notif_failures else 30.0
            # Every server address concerned backs off (store.py): no job before the first is due.
            # Waiting for a back-off is not a failure: notif_failures counts failed jobs only.
            wait = _seconds_until(self.snapshot.get("outbox_retry_at"))
            if wait is not None and wait > delay:
                delay = wait
            self.next_notifications = time.monotonic() + delay
            emit("notifications_waiting", count=pending, retry_in_s=round(delay))
        elif not pending:
            self.next_notifications = None
            self.notif_failures = 0

    # --- jobs ---------------------------------------------------------------------------
    def submit(self, kind: str, params: dict, source: str):
        if kind not in JOB_KINDS:
            raise HttpError(400, "unknown_operation", f"unknown operation {kind!r}")
        job = self.journal.create(kind, params, source=source)
        emit("job_queued", job=job.id, kind=kind, source=source)
        with self.lock:
            self.lock.notify_all()
        return job

    def _open_of_kind(self, kind: str) -> bool:
        return any(j.kind == kind for j in self.journal.jobs(states=("queued", "running")))

    def _dispatch(self) -> float | None:
        """Hand the next due job to the worker. Returns seconds until a queued job becomes due."""
        if self.stop_reason:
            return None
        if self.worker_busy or self.watch_sent or (self.sent_to_worker and self.worker is not None
                                                   and self.worker.poll() is None):
            return None
        job, later = self.journal.next_due()
        if job is None:
            if self.watch_wanted and not self.watch_sent:
                self._send_watch()
                return None
            if later is None:
                return None
            t = dt.datetime.fromisoformat(later)
            return max(0.1, (t - dt.datetime.now(dt.timezone.utc)).total_seconds())
        w = self._ensure_worker()
        self.view_epoch += 1
        try:
            w.stdin.write(json.dumps({"run": job.id}) + "\n")
            w.stdin.flush()
            self.sent_to_worker.add(job.id)
        except (BrokenPipeError, OSError):
            pass
        return None

    def cancel(self, jid: str) -> None:
        job = self.journal.get(jid)
        if job is None:
            raise HttpError(404, "unknown_job", f"no job {jid}")
        if job.state == "queued" and jid not in self.sent_to_worker:
            self.journal.finish(jid, "cancelled", error={"code": "cancelled", "message": "cancelled on request",
                                                         "exit_code": 1})
            return
        if self.worker is not None and self.worker.poll() is None:
            try:
                self.worker.stdin.write(json.dumps({"cancel": jid}) + "\n")
                self.worker.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    # --- the socket API ---------------------------------------------------------------------
    def handle(self, method: str, parts: list[str], query: dict, body: dict):
        if method == "GET" and parts == ["status"]:
            return 200, self.status()
        if method == "GET" and parts == ["jobs"]:
            return 200, {"jobs": [j.to_json() for j in self.journal.jobs(limit=RECENT_JOBS)]}
        if method == "GET" and len(parts) == 2 and parts[0] == "jobs":
            wait = min(float(query.get("wait") or 0), 30.0)
            end = time.monotonic() + wait
            with self.lock:
                while True:
                    job = self.journal.get(parts[1])
                    if job is None:
                        raise HttpError(404, "unknown_job", f"no job {parts[1]}")
                    left = end - time.monotonic()
                    if not job.open or left <= 0:
                        break
                    self.lock.wait(left)
            return 200, {"job": job.to_json(full=bool(query.get("full")))}
        if method == "GET" and len(parts) == 2 and parts[0] == "view":
            return 200, self.view_answer(parts[1])
        if method == "POST" and parts == ["jobs"]:
            op, params = body.get("op"), body.get("params") or {}
            if not isinstance(params, dict):
                raise HttpError(400, "bad_request", "params must be an object")
            dev = body.get("device")
            if dev and os.path.realpath(dev) != os.path.realpath(self.cfg.device or ""):
                raise HttpError(409, "other_device", f"this daemon owns {self.cfg.device}, not {dev}")
            return 202, {"job": self.submit(op, params, "cli").to_json()}
        if method == "POST" and len(parts) == 3 and parts[0] == "jobs" and parts[2] == "cancel":
            self.cancel(parts[1])
            return 202, {"job": self.journal.get(parts[1]).to_json()}
        if method == "POST" and parts == ["downloads"]:
            ac = body.get("activation_code")
            if not isinstance(ac, str) or not ac:
                raise HttpError(400, "ac_missing", "activation_code (a string LPA:1$…) is required")
            from ..ac import parse_activation_code
            try:
                parse_activation_code(ac.strip())
            except AgentError as e:
                raise HttpError(400, e.code, e.message) from None
            params = {"activation_code": ac.strip(), "yes": True}
            if body.get("confirmation_code"):
                params["confirmation_code"] = str(body["confirmation_code"])
            return 202, {"job": self.submit("profile.download", params, "api").to_json()}
        if method == "POST" and parts == ["sync"]:
            return 202, {"job": self.submit("sync", {}, "api").to_json()}
        raise HttpError(404, "not_found", f"no endpoint {method} /{'/'.join(parts)}")

    def _saw(self, op: str, result, at) -> None:
        """Note ``op``'s answer as read at ``at`` (time.time()) under the present view_epoch."""
        if op in VIEW_OPS and isinstance(result, dict) and isinstance(at, (int, float)):
            self.view[op] = {"epoch": self.view_epoch, "at": at, "result": result}

    def view_answer(self, op: str) -> dict:
        """``GET /view/OP``: operation ``op``'s answer as the card worker last read it, when
        nothing was handed to the worker since, the worker is idle and the read is at most
        VIEW_MAX_AGE old (409 ``view_stale`` otherwise: run the operation as a job). The daemon
        holds the port's lock, so no other esim-agent changed the card meanwhile."""
        if op not in VIEW_OPS:
            raise HttpError(404, "not_in_view", f"the daemon's view holds no answer to {op!r} "
                                                f"(only {', '.join(VIEW_OPS)}): run it as a job")
        with self.lock:
            seen = self.view.get(op)
            idle = not self.worker_busy and not self.sent_to_worker and not self.watch_sent
            age = time.time() - seen["at"] if seen else -1.0
            fresh = seen is not None and idle and seen["epoch"] == self.view_epoch and 0 <= age <= VIEW_MAX_AGE
        if not fresh:
            raise HttpError(409, "view_stale", f"the daemon has no fresh reading of {op}: run it as a job")
        return {"op": op, "result": seen["result"], "age_s": round(age, 3)}

    def status(self) -> dict:
        snap = dict(self.snapshot)
        jobs = self.journal.jobs(limit=RECENT_JOBS)
        open_jobs = self.journal.jobs(states=("queued", "running"), limit=100)
        seen = {j.id for j in jobs}
        listed = [j.to_json() for j in open_jobs if j.id not in seen] + [j.to_json() for j in jobs]
        outbox = {}
        try:
            from ..store import Outbox
            with Outbox(self.journal.path) as ob:
                outbox = {"pending": len(ob.pending()), "delivered": len(ob.list(status="removed"))
                          + len(ob.list(status="sent")), "dropped": len(ob.list(status="dropped")),
                          "retry_at": snap.get("outbox_retry_at")}
        except AgentError:
            pass
        return {
            "daemon": {"pid": os.getpid(), "version": VERSION, "uptime_s": round(time.time() - self.started, 1),
                       "socket": self.cfg.socket, "state_dir": str(self.state_dir), "config": self.cfg.source,
                       "worker_pid": self.worker.pid if self.worker is not None and self.worker.poll() is None
                       else None},
            "modem": ({**(snap.get("modem") or {}), "device": self.cfg.device, "transport": snap.get("transport")}
                      if snap else {"device": self.cfg.device}),
            "euicc": {"eid": snap.get("eid"), "free_nvm": snap.get("free_nvm")} if snap else None,
            "profiles": snap.get("profiles"),
            "enabled_iccid": next((p["iccid"] for p in snap.get("profiles") or [] if p.get("state") == "enabled"),
                                  None),
            "registration": snap.get("registration"),
            "snapshot_age_s": round(time.time() - snap["at"], 1) if snap.get("at") else None,
            "jobs": listed,
            "job_counts": self.journal.counts(),
            "outbox": outbox,
            "reports": self.journal.report_counts(),
            "ipa": self._ipa_status(jobs),
        }

    def _ipa_status(self, jobs) -> dict | None:
        """The eIM side of `status`: whether and when the daemon polls, the last poll, the fallback watch."""
        sch = self.ipa
        if sch is None or (self.cfg.eim is None and not sch.active):
            return None
        eim = self.cfg.eim_settings()
        now = time.monotonic()
        last = self.ipa_last or next(({"job": j.id, "source": j.source, "state": j.state,
                                       "finished_at": j.finished_at, "error": (j.error or {}).get("code")}
                                      for j in jobs if j.kind == "ipa.poll" and not j.open), None)
        return {"configured": self.cfg.eim is not None, "polling": sch.active,
                "url": eim.url, "esipa_version": eim.esipa_version, "binding": eim.binding,
                "card_eims": sch.card_eims, "poll_interval": eim.poll_interval,
                "next_poll_in_s": round(sch.next_poll - now, 1) if sch.next_poll is not None else None,
                "last_poll": last,
                "fallback_after": sch.fallback_after or None,
                "fallback_iccid": sch.fallback_iccid,
                "unregistered_for_s": round(now - sch.lost_since, 1) if sch.lost_since is not None else None,
                "pending_state_change_cause": sch.pending_cause}

    # --- the main loop -------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        with self.lock:
            if not self.stop_reason:
                self.stop_reason = reason
            self.lock.notify_all()

    def run(self) -> int:
        from .. import sdnotify
        self.take_port()
        self.journal.prune()
        self.recover()
        self.open_socket()
        if self.cfg.report_url:
            from .report import Reporter
            self.reporter = Reporter(self.cfg, self.journal)
            self.reporter.start()
        emit("started", pid=os.getpid(), version=VERSION, device=self.cfg.device, socket=self.cfg.socket,
             state_dir=self.state_dir)
        sdnotify.ready(f"idle; modem {self.cfg.device}")
        wd = sdnotify.watchdog_interval()
        next_wd = time.monotonic() + wd if wd else None
        # Discovery at start-up, then every discovery_interval (0: only at start-up and on `sync`).
        self.next_discovery = time.monotonic()
        eim = self.cfg.eim_settings()
        from .ipa_schedule import IpaSchedule
        self.ipa = IpaSchedule(configured=self.cfg.eim is not None, url=bool(eim.url),
                               poll_interval=eim.poll_interval, fallback_after=eim.fallback_after,
                               now=self.next_discovery)
        last_status = None
        with self.lock:
            while not self.stop_reason:
                now = time.monotonic()
                if self.next_discovery is not None and now >= self.next_discovery:
                    if not self._open_of_kind("sync"):
                        self.journal.create("sync", {}, source="discovery")
                    iv = float(self.cfg.discovery_interval or 0)
                    self.next_discovery = now + iv if iv > 0 else None
                if self.next_notifications is not None and now >= self.next_notifications:
                    self.next_notifications = None
                    if not self._open_of_kind("notification.process"):
                        self.journal.create("notification.process", {}, source="outbox")
                self._ipa_queue(self.ipa.due(now))
                due_in = self._dispatch()
                if next_wd is not None and now >= next_wd:
                    sdnotify.watchdog()
                    next_wd = now + wd
                st = f"busy: job {self.worker_busy}" if self.worker_busy else "idle"
                if st != last_status:
                    sdnotify.status(st)
                    last_status = st
                waits = [t - now for t in (self.next_discovery, self.next_notifications, next_wd,
                                           self.ipa.next_time()) if t is not None]
                if due_in is not None:
                    waits.append(due_in)
                self.lock.wait(max(0.05, min(waits)) if waits else None)
        return self.shutdown()

    def shutdown(self) -> int:
        from .. import sdnotify
        sdnotify.stopping()
        emit("stopping", reason=self.stop_reason)
        w = self.worker
        if w is not None and w.poll() is None:
            try:
                w.stdin.write(json.dumps({"stop": True, "reason": "terminated"}) + "\n")
                w.stdin.flush()
                w.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        if self.reporter is not None:
            self.reporter.stop()
        if self.server is not None:
            # No shutdown(): serve_forever polls once an hour (an idle daemon does not spin);
            # closing the listening socket is enough, its thread is a daemon thread.
            self.server.server_close()
        if self.port_lock is not None:
            self.port_lock.release()
        self.journal.close()
        emit("stopped")
        return 0


def _seconds_until(iso: str | None) -> float | None:
    """Seconds from now until an ISO 8601 UTC time (None for None or a value that does not parse)."""
    if not iso:
        return None
    try:
        t = dt.datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return (t - dt.datetime.now(dt.timezone.utc)).total_seconds()


def run_daemon(cfg, *, verbose: int = 0) -> int:
    """Entry point of `esim-agent daemon`: exit 2 on a bad config (refuses to start)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.DEBUG if verbose or getattr(cfg, "log_level", "info") == "debug" else logging.INFO
    root.setLevel(level)
    _validate(cfg)
    d = Daemon(cfg, config_path=cfg.source, verbose=verbose)
    signal.signal(signal.SIGTERM, lambda *_: d.request_stop("terminated"))
    signal.signal(signal.SIGINT, lambda *_: d.request_stop("interrupted"))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return d.run()


def _validate(cfg) -> None:
    where = cfg.source or "(no config file)"
    if not cfg.device:
        raise UsageError(f"config {where}: device is not set (the modem's AT port, e.g. "
                         "/dev/serial/by-id/usb-…-if02-port0)", code="config_invalid")
    if not getattr(cfg, "socket", None):
        raise UsageError(f"config {where}: socket is empty", code="config_invalid")
