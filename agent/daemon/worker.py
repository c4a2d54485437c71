"""The card worker: the one process that talks to the modem for the daemon.

The daemon (main.py) stays small — socket, timers, journal, reports — and
starts this worker when there is work, sending it job IDs on stdin, one JSON
object a line (``{"run": ID}``, ``{"cancel": ID}``, ``{"watch": true}``); it answers on stdout
(``{"event": "started"|"finished"|"snapshot"|"watch", ...}``). A watch is the
read-only look at the network registration the daemon's fallback rule needs
(ipa_schedule.py): not a journal job, it changes nothing. Jobs run one at a
time, so jobs queue for the port. The worker exits when stdin closes or after
it was idle for a while (the parsed ASN.1 modules, TLS and HTTP code cost tens
of MB that an idle gateway should not hold), and dies with the daemon
(PR_SET_PDEATHSIG): a killed daemon never leaves a worker holding the port.

Job execution, with the journal as the source of truth:
* ``start`` (attempts + 1) → recovery when the job ran before (a crash or a
  stop): a download whose RSP session may still be open is cancelled on the
  eUICC and at the SM-DP+ (reason postponed, so the order stays usable); then
  the operation runs, reading ``seen()`` steps so nothing that already took
  effect is done twice;
* outcome: ``done`` / ``rolled_back`` / ``failed`` (with the error) /
  ``cancelled``; a stop by SIGTERM or a transient failure of an unattended job
  puts it back in the queue (the daemon adds back-off).
"""
from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import threading
import time

from .log import kv

log = logging.getLogger("esim-agent.worker")

IDLE_EXIT_S = 15.0
WATCH = object()        # the inbox item of a registration watch
#: Unattended jobs are retried this many times on transient failures (network, modem).
MAX_ATTEMPTS = 5


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): the kernel kills us when the daemon dies."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:   # not Linux: stdin EOF still stops us
        pass


class Worker:
    def __init__(self, cfg, *, out=sys.stdout, idle_exit: float = IDLE_EXIT_S):
        from .. import config as config_mod
        from ..journal import Journal
        self.cfg = cfg
        self.out = out
        self.idle_exit = idle_exit
        self.journal = Journal(config_mod.state_dir(cfg))
        self.card = None
        self.inbox: queue.Queue = queue.Queue()
        self.current: tuple[str, object] | None = None      # (job id, CancelToken)
        self.stopping: str | None = None
        self._lock = threading.Lock()
        self.eim_unsupported = False        # the open card refused GetEimConfigurationData: do not ask again

    # --- messages -------------------------------------------------------------------
    def emit(self, **msg) -> None:
        try:
            self.out.write(json.dumps(msg, default=str) + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):
            self.stop("terminated")

    def stop(self, reason: str = "terminated") -> None:
        with self._lock:
            self.stopping = reason
            if self.current is not None:
                self.current[1].cancel(reason)
        self.inbox.put(None)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if self.current is not None and self.current[0] == job_id:
                self.current[1].cancel("cancelled")

    def read_stdin(self, stream=sys.stdin) -> None:
        for line in stream:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "run" in msg:
                self.inbox.put(msg["run"])
            elif msg.get("watch"):
                self.inbox.put(WATCH)
            elif "cancel" in msg:
                self.cancel(msg["cancel"])
            elif msg.get("stop"):
                self.stop(msg.get("reason", "terminated"))
        self.stop("terminated")     # the daemon went away

    # --- the card ---------------------------------------------------------------------
    def card_settings(self):
        from ..ops.card import CardSettings
        c = self.cfg
        return CardSettings(device=c.device, transport=c.transport, timeout=c.timeout, long_timeout=c.long_timeout,
                            segment_size=c.segment_size, baud=c.baud, aids=list(c.aids or []),
                            quirks=dict(c.quirks or {}), lock=False).validate()

    def ensure_card(self, token):
        from ..ops.card import Card
        if self.card is not None and not self.card.healthy:
            self.drop_card()
        if self.card is None or not self.card.is_open:
            card = Card(self.card_settings(), cancel=token)
            card.open()
            self.card = card
        else:
            self.card.watch(token)
        return self.card

    def drop_card(self) -> None:
        if self.card is not None:
            try:
                self.card.close()
            except Exception as e:
                log.debug("closing the card failed: %s", e)
            self.card = None
            self.eim_unsupported = False

    # --- jobs -----------------------------------------------------------------------
    def context(self, job, token, warnings: list):
        """The operation's context; its warnings (for people) are collected in ``warnings``
        and travel with the job's result, so the CLI shows them as it does in direct mode."""
        from .. import config as config_mod
        from ..journal import JournalSteps
        from ..ops import Context, ServerSettings
        c = self.cfg
        return Context(servers=ServerSettings(config_ca=c.ca_bundle, http_timeout=float(c.http_timeout)),
                       state_dir=config_mod.state_dir(c),
                       notifications=c.process_notifications, refresh=c.refresh,
                       rollback_after=float(c.rollback_after), default_smdp=c.default_smdp,
                       auto_enable=bool(c.auto_enable), eim=c.eim_settings(), cancel=token,
                       steps=JournalSteps(self.journal, job.id), warn=warnings.append)

    def run_job(self, job_id: str) -> None:
        from .. import ops
        from ..cancel import CancelToken, Cancelled
        from ..errors import AgentError, TransportError, UsageError
        from ..ops.switch import RolledBack
        job = self.journal.get(job_id)
        if job is None or job.state != "queued":
            return
        token = CancelToken()
        with self._lock:
            if self.stopping:
                return
            self.current = (job_id, token)
        resumed = job.attempts > 0
        self.journal.start(job_id)
        self.emit(event="started", job=job_id)
        state, result, error = "failed", None, None
        warnings: list[str] = []
        try:
            card = self.ensure_card(token)
            ctx = self.context(job, token, warnings)
            if resumed and job.kind in ("profile.download", "sync"):
                recover_download(ctx, card)
            result = ops.run(job.kind, ctx, card, job.params)
            state = "done"
        except RolledBack as e:
            state, error, result = "rolled_back", e.to_json(), e.details
        except Cancelled as e:
            error = e.to_json()
            if e.reason == "terminated" and job.kind not in ops.READ_ONLY:
                state = "requeue"       # the service is stopping: finish it on the next start
            else:
                state = "cancelled"
        except AgentError as e:
            error = e.to_json()
            error["exit_code"] = e.exit_code
            if isinstance(e, TransportError) or getattr(e, "exit_code", 1) == 3:
                self.drop_card()        # reopen the port before the next job
            transient = e.exit_code == 3 and not isinstance(e, UsageError)
            if transient and job.source != "cli" and job.attempts + 1 < MAX_ATTEMPTS:
                state = "requeue"
        except Exception as e:   # a bug: the job fails with it, the worker lives on
            log.exception("job %s: internal error", job_id)
            error = {"code": "internal_error", "message": f"internal error: {type(e).__name__}: {e}"}
            self.drop_card()
        for w in warnings:
            log.warning("%s", kv("job_warning", job=job_id, warning=w))
        if warnings:
            if isinstance(result, dict):
                result["warnings"] = warnings
            if error is not None:
                error.setdefault("details", {})["warnings"] = warnings
        if error is not None and "exit_code" not in error:
            error["exit_code"] = {"rolled_back": 1, "cancelled": _cancel_exit(error)}.get(state, 1)
        with self._lock:
            self.current = None
        if self.card is not None and not self.card.healthy:
            self.drop_card()        # the port died under an operation that carried on (e.g. notifications)
        # A read-only job changes nothing `status` shows and has no report: its caller (a CLI
        # waiting on the socket) gets the answer first, the status refresh (~0.1 s of AT commands
        # and APDUs) follows. Other jobs: the card after the job, for status and the job's report.
        quick = state != "requeue" and job.kind in ops.READ_ONLY
        snap = None if quick else self.snapshot()
        if state == "requeue":
            import datetime as dt
            # Stopped by the service manager: resume at the next start. Transient failure: back off.
            delay = 0.0 if (error or {}).get("code") == "terminated" else backoff(job.attempts + 1)
            self.journal.requeue(job_id, dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delay), error)
        else:
            report = None
            # Background outbox retries report only when they delivered (a gateway offline for a
            # week must not queue a failure report every back-off period).
            if self.cfg.report_url and job.kind not in ops.READ_ONLY and not (job.source == "outbox"
                                                                               and state != "done"):
                import datetime as dt

                from .report import report_body
                now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
                report = report_body(self.journal.get(job_id), snap or {}, state=state, error=error, finished_at=now)
            self.journal.finish(job_id, state, result=result, error=error, report=report)
        self.emit(event="finished", job=job_id, state=state)
        if quick:
            self.snapshot()

    def snapshot(self) -> None:
        """What `status` shows about the modem and the card, refreshed after every job; and the
        view (``"view"``): the answers of the read-only operations in VIEW_OPS as the card gave
        them now, from which the daemon answers `chip info` and `profile list` while nothing
        has used the card since (main.py, view_answer)."""
        if self.card is None or not self.card.is_open or self.stopping:
            return None
        from .. import ops
        from ..errors import AgentError
        snap: dict = {"at": time.time()}
        card_notes: list = []
        try:
            card = self.card
            snap["eid"] = card.eid
            m = card.modem_info()
            snap["modem"] = m.to_json() if m else None
            snap["transport"] = getattr(card.transport, "name", None) or type(card.transport).__name__
            read = ops.registry()         # the operations themselves: the view is their answers
            view: dict = {}
            view["profile.list"] = read["profile.list"](None, card)
            snap["profiles"] = view["profile.list"]["profiles"]
            # Notifications still on the card count too: one left there by a failed send (or a
            # cut before it was recorded) must start the daemon's retry, not wait for a user.
            card_notes = card.es10.list_notifications()
            snap["notifications_on_card"] = len(card_notes)
            try:
                view["chip.info"] = read["chip.info"](None, card)
                snap["free_nvm"] = view["chip.info"]["euicc_info2"].get("free_nvm")
            except AgentError:
                pass
            snap["view"] = view
            if card.at_port is not None:
                from ..network import query_registration
                reg = query_registration(card.at_port)
                snap["registration"] = reg.to_json() if reg else None
            count = self.eim_count(card)
            if count is not None:
                snap["eim_count"] = count
        except AgentError as e:
            snap["error"] = e.to_json()
        except Exception as e:  # never let status reading kill the worker
            snap["error"] = {"code": "internal_error", "message": str(e)}
        try:
            from ..store import Outbox
            with Outbox(self.journal.path) as ob:
                pend = ob.pending(snap.get("eid")) if snap.get("eid") else ob.pending()
                # What goes through the eIM (SGP.32 indirect download) leaves with the next poll
                # round, not with a notification job: it does not make the daemon run those.
                from ..flows.notifications import VIA_EIM
                via_eim = {n.seq_number for n in pend if n.address.startswith(VIA_EIM)}
                pend = [n for n in pend if not n.address.startswith(VIA_EIM)]
                snap["outbox_pending"] = len(pend)
                if via_eim:
                    snap["outbox_via_eim"] = len(via_eim)
                    card_notes = [n for n in card_notes if n.seq_number not in via_eim]
                    snap["notifications_on_card"] = len(card_notes)
                # Every address of what is pending backs off (store.py): the daemon's retry waits
                # until the first of them is due instead of running jobs that only wait.
                retry_at = ob.retry_at({n.address for n in pend} | {n.address for n in card_notes})
                if retry_at:
                    snap["outbox_retry_at"] = retry_at
        except Exception:
            pass
        self.emit(event="snapshot", data=snap)
        return snap

    def eim_count(self, card) -> int | None:
        """How many eIMs the eUICC is associated with (SGP.32 GetEimConfigurationData), so the
        daemon polls a card a technician associated; None when the card cannot say (not an IoT
        eUICC by its EUICCInfo2: asked once per opening of the card)."""
        from ..errors import AgentError, ProtocolError, TransportError
        if self.eim_unsupported:
            return None
        try:
            if not card.es10.get_iot_info().is_iot:     # an SGP.22 eUICC: no unknown command sent to it
                self.eim_unsupported = True
                return None
            return len(card.es10.get_eim_configuration_data())
        except ProtocolError:           # an answer that is no GetEimConfigurationDataResponse
            self.eim_unsupported = True
        except TransportError:
            raise                       # the port, not the card's answer
        except AgentError:              # a status word: not an SGP.32 eUICC
            self.eim_unsupported = True
        return None

    def watch(self) -> None:
        """The registration watch (no journal job; read-only): the network registration, the
        enabled profile and the fallback profile (SGP.32 fallbackAttribute)."""
        from ..cancel import CancelToken
        from ..errors import AgentError
        data: dict = {"at": time.time()}
        token = CancelToken()
        with self._lock:
            if self.stopping:
                return
            self.current = ("watch", token)
        try:
            card = self.ensure_card(token)
            profiles = card.es10.get_iot_profiles()
            data["enabled_iccid"] = next((p.iccid for p in profiles if p.state == "enabled"), None)
            data["fallback_iccid"] = next((p.iccid for p in profiles if p.fallback_attribute), None)
            data["registration"] = None
            if card.at_port is not None:
                from ..network import query_registration
                reg = query_registration(card.at_port)
                data["registration"] = reg.to_json() if reg else None
        except AgentError as e:
            data["error"] = e.to_json()
            if getattr(e, "exit_code", 1) == 3:
                self.drop_card()
        except Exception as e:  # never let the watch kill the worker
            log.exception("registration watch: internal error")
            data["error"] = {"code": "internal_error", "message": str(e)}
            self.drop_card()
        finally:
            with self._lock:
                self.current = None
        self.emit(event="watch", data=data)

    def loop(self) -> int:
        last = time.monotonic()
        while not self.stopping:
            try:
                item = self.inbox.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - last > self.idle_exit:
                    break
                continue
            if item is None:
                break
            if item is WATCH:
                self.watch()
            else:
                self.run_job(item)
            last = time.monotonic()
        self.drop_card()
        self.journal.close()
        return 0


def _cancel_exit(error: dict) -> int:
    return {"interrupted": 130, "terminated": 143, "deadline_exceeded": 3}.get(error.get("code"), 1)


def backoff(attempt: int, base: float = 30.0, cap: float = 3600.0) -> float:
    """Exponential back-off with ±20 % jitter (a fleet coming back online must not
    hit the servers in one wave)."""
    import random
    d = min(cap, base * (2 ** max(0, attempt - 1)))
    return d * random.uniform(0.8, 1.2)


def recover_download(ctx, card) -> None:
    """A download job that ran before and did not finish: if its RSP session may still
    be open, cancel it on the eUICC and at the SM-DP+ with reason postponed (SGP.22
    §3.1.3 / §5.6.5), so the card holds no half session and the operator's order goes
    back to available for the retry that follows. Best effort: a card that lost the
    session answers invalidTransactionId and the server times its session out."""
    from ..errors import AgentError
    from ..flows.download import REASON_POSTPONED
    steps = ctx.steps
    auth = steps.seen("authenticating")
    if auth is None or steps.seen("installed") is not None:
        return
    meta = steps.seen("metadata")
    if meta is not None:
        from ..ops.profiles import find_profile
        if find_profile(card, meta["iccid"]) is not None:
            return                      # installed before the crash: the operation's resume path reports it
    txid = auth.get("transaction_id")
    start = steps.seen("start") or {}
    log.info("recovering download: cancelling transaction %s", txid)
    steps.step("recover", transaction_id=txid)
    try:
        resp = card.es10.cancel_session(bytes.fromhex(txid), REASON_POSTPONED)
    except AgentError as e:
        log.info("the eUICC has no session %s any more (%s)", txid, e.message)
        return
    if not start.get("address"):
        return
    pool = ctx.servers.pool()
    try:
        pool(start["address"]).cancel_session(txid, resp)
    except AgentError as e:
        log.info("ES9+ cancelSession for %s failed: %s", txid, e.message)
    finally:
        pool.close()


class KvFormatter(logging.Formatter):
    """The worker's log lines in the daemon's key=value form (journald keeps both streams)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("event="):
            return msg
        return kv("log", level=record.levelname.lower(), logger=record.name, msg=msg,
                  traceback=self.formatException(record.exc_info) if record.exc_info else None)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .. import config
    _die_with_parent()
    p = argparse.ArgumentParser(prog="esim-agent-worker")
    p.add_argument("--config")
    p.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S)
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KvFormatter())
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, handlers=[handler])
    cfg = config.load(a.config)
    w = Worker(cfg, idle_exit=a.idle_exit)
    signal.signal(signal.SIGTERM, lambda *_: w.stop("terminated"))
    signal.signal(signal.SIGINT, lambda *_: w.stop("interrupted"))
    threading.Thread(target=w.read_stdin, daemon=True, name="stdin").start()
    return w.loop()


if __name__ == "__main__":
    sys.exit(main())
