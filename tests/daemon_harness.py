"""Fault-injection harness for the daemon (tests/test_daemon_faults.py); no hooks in agent/.

Run as a script:

    python tests/daemon_harness.py daemon --config F [-v]
        the daemon, exactly as ``run_daemon`` starts it (logging, signal handlers,
        ``Daemon(...).run()``), except that its card worker is started through this
        script (``worker`` below) so the fault below can be armed inside it;

    python tests/daemon_harness.py worker --config F [...]
        ``agent.daemon.worker.main()`` with the fault armed.

The fault comes from the environment (inherited by the worker from the daemon):

    FAULT_AT      where: a journal step name (``loading``, ``enable.enabled`` ...),
                  ``mark_sent`` (a notification the server accepted, before the outbox
                  records it; ``Outbox.mark_sent`` is patched) or ``finish`` (a job's final
                  state committed, before the daemon hears of it; ``Journal.finish``)
    FAULT_NTH     fire at the n-th occurrence of that point in this worker (default 1)
    FAULT_KIND    only in jobs of this kind (``profile.download`` ...; default any kind)
    FAULT_ACTION  ``power-cut`` (default): SIGKILL the daemon, then the worker itself;
                  ``modem-cut``: SIGKILL the simulated modem (pid in FAULT_MODEM_PID) and let
                  the worker carry on into the dead port
    FAULT_ONCE    a file: the fault fires only if it does not exist, and creates it (so a
                  worker the daemon starts again, or a restarted daemon, does not fire again)

Steps are recorded before they run (journal.py): with ``Journal.step`` patched to fire
*after* the step's row is committed, a fault "at step X" leaves the journal saying X
while X's action never happened -- the case the restart must reconcile.
"""
from __future__ import annotations

import os
import signal
import sys

HERE = os.path.abspath(__file__)


def _should_fire(name: str, jid: str | None, journal=None) -> bool:
    want = os.environ.get("FAULT_AT")
    if not want or name != want:
        return False
    kind = os.environ.get("FAULT_KIND")
    if kind and journal is not None and jid is not None:
        job = journal.get(jid)
        if job is None or job.kind != kind:
            return False
    once = os.environ.get("FAULT_ONCE")
    if once and os.path.exists(once):
        return False
    _should_fire.count = getattr(_should_fire, "count", 0) + 1
    if _should_fire.count < int(os.environ.get("FAULT_NTH") or 1):
        return False
    if once:
        fd = os.open(once, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.write(fd, f"{name} pid={os.getpid()}\n".encode())
        os.fsync(fd)
        os.close(fd)
    return True


def _fire(name: str) -> None:
    action = os.environ.get("FAULT_ACTION") or "power-cut"
    sys.stderr.write(f"harness: fault {action} at {name}\n")
    sys.stderr.flush()
    if action == "power-cut":
        os.kill(os.getppid(), signal.SIGKILL)       # the daemon ...
        os.kill(os.getpid(), signal.SIGKILL)        # ... and the worker: a power cut
    elif action == "modem-cut":
        pid = int(os.environ["FAULT_MODEM_PID"])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(pid)
    else:
        raise SystemExit(f"harness: unknown FAULT_ACTION {action!r}")


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:   # a zombie (our sibling, reaped by the test) still answers kill 0: look at its state
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.01)


def arm() -> None:
    """Patch Journal.step and Outbox.mark_sent in this process."""
    from agent import journal, store

    orig_step = journal.Journal.step

    def step(self, jid, name, data=None):
        orig_step(self, jid, name, data)          # recorded (committed) first, as in production
        if _should_fire(name, jid, self):
            _fire(name)

    journal.Journal.step = step

    orig_finish = journal.Journal.finish

    def finish(self, jid, state, **kw):
        orig_finish(self, jid, state, **kw)       # the job's end is committed ...
        if _should_fire("finish", jid, self):
            _fire("finish")                       # ... the daemon has not heard of it yet

    journal.Journal.finish = finish

    orig_mark_sent = store.Outbox.mark_sent

    def mark_sent(self, eid, seq):
        if _should_fire("mark_sent", None):
            _fire("mark_sent")                    # accepted by the server, not yet in the outbox
        return orig_mark_sent(self, eid, seq)

    store.Outbox.mark_sent = mark_sent


def run_worker(argv: list[str]) -> int:
    arm()
    from agent.daemon import worker
    return worker.main(argv)


def run_daemon(argv: list[str]) -> int:
    import argparse
    import logging

    from agent import config
    from agent.daemon import main as dmain

    p = argparse.ArgumentParser(prog="daemon_harness.py daemon")
    p.add_argument("--config", required=True)
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    cfg = config.load(a.config)

    class HarnessDaemon(dmain.Daemon):
        def _worker_cmd(self) -> list[str]:
            cmd = super()._worker_cmd()
            assert cmd[1:3] == ["-m", "agent.daemon.worker"], cmd
            return [cmd[0], HERE, "worker", *cmd[3:]]

    # What agent.daemon.main.run_daemon does, with the subclass.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if a.verbose or cfg.log_level == "debug" else logging.INFO)
    dmain._validate(cfg)
    d = HarnessDaemon(cfg, config_path=cfg.source, verbose=a.verbose)
    signal.signal(signal.SIGTERM, lambda *_: d.request_stop("terminated"))
    signal.signal(signal.SIGINT, lambda *_: d.request_stop("interrupted"))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return d.run()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("daemon", "worker"):
        sys.exit("usage: daemon_harness.py daemon|worker ARGS...")
    from agent.errors import AgentError
    try:
        sys.exit((run_daemon if sys.argv[1] == "daemon" else run_worker)(sys.argv[2:]))
    except AgentError as e:
        print(f"error: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
