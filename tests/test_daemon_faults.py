"""Fault campaign for the gateway daemon: power cuts and modem cuts at every step.

For a profile download and for a checked switch (profile.enable, with and without
rollback), the daemon is started through ``tests/daemon_harness.py``, which arms a
fault inside the card worker *by step* (``Journal.step`` is patched; steps are
recorded before they run, so "at step X" = X is in the journal, X's action has not
happened). Two kinds of fault:

* power cut: SIGKILL the daemon and the worker (no clean-up of any kind); the next
  daemon is a plain ``python -m agent daemon --config F``;
* modem cut: SIGKILL the simulated modem process (``esim-agent sim modem``), restart
  it on the same --state/--link; the daemon keeps running.

After each fault the test waits (bounded) until the daemon has no queued or running
job and checks what the issue asks for:

* every job ended done / rolled_back / failed-with-an-error-code (never left open);
* downloads: the card holds the profile once or not at all; the reservation
  (``GET /v1/ESimProfiles/SID`` on the local SM-DP+) is ``installed`` iff the card
  holds it, else ``available`` -- and then a retry with the same activation code
  installs it;
* switches: the enabled profile is the target (it attaches) or the previous one
  (rolled back), and it is registered on the network;
* notifications: after a ``notification process`` through the daemon, the outbox has
  nothing pending, the card's list is empty, and the SM-DP+ saw every one (PIR ->
  order ``installed``; enable/disable -> the twin's notification events);
* reports: every finished job that changes something got at least one POST on the
  test's HTTPS report server (``Idempotency-Key`` = the report id).

Everything runs on loopback: the SM-DP+ is in-process (tests/testbed.py), the modem,
daemon and worker are subprocesses.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import time_limit

from testbed import REPO, make_bed, testbed_pki  # noqa: F401  (pytest fixtures)

HARNESS = Path(__file__).with_name("daemon_harness.py")
PER_TEST_TIMEOUT_S = 150
FINAL = ("done", "failed", "rolled_back", "cancelled")
READ_ONLY_KINDS = ("chip.info", "profile.list", "notification.list")


# --------------------------------------------------------------------------- per-test time limit

@pytest.fixture(autouse=True)
def _time_limit():
    """No test hangs the suite (conftest.time_limit: SIGALRM, main thread)."""
    with time_limit(PER_TEST_TIMEOUT_S):
        yield


# --------------------------------------------------------------------------- the report receiver

def _make_tls(dirpath: Path) -> tuple[str, str, str]:
    """A private CA and a server certificate for 127.0.0.1/localhost, made with `cryptography`.
    Returns (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fault-campaign report CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = (dirpath / "report-ca.pem", dirpath / "report.pem", dirpath / "report.key.pem")
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tuple(map(str, paths))


class ReportServer:
    """HTTPS on 127.0.0.1 that records every report POST: (Idempotency-Key, Authorization, body)."""

    def __init__(self, dirpath: Path):
        self.ca, cert, key = _make_tls(dirpath)
        self.posts: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with outer._lock:
                    outer.posts.append({"key": self.headers.get("Idempotency-Key"),
                                        "auth": self.headers.get("Authorization"), "path": self.path,
                                        "body": body})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/esim/report"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="report-server")
        self._thread.start()

    def jobs_reported(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        with self._lock:
            for p in self.posts:
                jid = ((p["body"] or {}).get("job") or {}).get("id")
                out.setdefault(jid, []).append(p)
        return out

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


# --------------------------------------------------------------------------- the world: modem + daemon

def _pts_lock_busy(realpath: str) -> bool:
    """True if some process holds the agent's port lock (transport/at.py PortLock) for this pty."""
    import fcntl
    name = "esim-agent." + realpath.strip("/").replace("/", "_") + ".lock"
    for d in ("/run/lock", os.environ.get("XDG_RUNTIME_DIR"), "/tmp"):
        if not d:
            continue
        p = os.path.join(d, name)
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False      # PortLock uses the first directory where it can create the file
    return False


class World:
    """The simulated modem (subprocess) in front of the bed's card file, a daemon config, and
    the daemon (subprocess: the harness with a fault armed, or the plain `esim-agent daemon`)."""

    def __init__(self, bed, *, network: tuple[str, ...] = (), rollback_after: float = 20.0):
        self.bed = bed
        bed.release_card()                       # the modem process owns the card file from now on
        # A short directory: the AF_UNIX socket path must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="edf-", dir="/tmp"))
        self.tty = self.dir / "tty"
        self.sock = self.dir / "agent.sock"
        self.state = self.dir / "state"
        self.state.mkdir()
        self.cfg = self.dir / "agent.toml"
        self.once = self.dir / "fault-fired"
        self.network = tuple(network)
        self.modem: subprocess.Popen | None = None
        self.modem_n = 0
        self.daemon: subprocess.Popen | None = None
        self.daemon_n = 0
        self.reports = ReportServer(self.dir)
        self.cfg.write_text("\n".join([
            f'device = "{self.tty}"',
            f'socket = "{self.sock}"',
            f'state_dir = "{self.state}"',
            f'ca_bundle = "{bed.ca}"',
            f"rollback_after = {rollback_after}",
            "discovery_interval = 0",
            "timeout = 5",
            "long_timeout = 30",
            "http_timeout = 10",
            f'report_url = "{self.reports.url}"',
            'report_token = "fault-campaign-token"',
            f'report_ca = "{self.reports.ca}"',
        ]) + "\n")

    # -- environment --
    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ESIM_AGENT_", "FAULT_"))}
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("SSL_CERT_FILE", None)       # the report server's CA is trusted via report_ca only
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def log_tail(self, n: int = 40) -> str:
        out = []
        for p in sorted(self.dir.glob("*.log")):
            lines = p.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # -- the modem --
    def start_modem(self, *, free_lock: bool = False) -> None:
        """``esim-agent sim modem`` (its module entry point) on the card file, linked at self.tty.
        ``free_lock``: make sure no other process holds the agent's lock file for the new pty
        (a daemon left by someone else on a pty number the kernel has since reused would make
        ours refuse to start with port_busy): if it is held, take another pty."""
        busy: list[subprocess.Popen] = []
        try:
            for _ in range(8):
                self._spawn_modem()
                if not free_lock or not _pts_lock_busy(os.readlink(self.tty)):
                    return
                busy.append(self.modem)       # keep it alive so the next modem gets another number
            raise AssertionError("every pty the modem got is locked by another process")
        finally:
            for p in busy:
                p.terminate()
                p.wait(10)

    def _spawn_modem(self) -> None:
        self.modem_n += 1
        logpath = self.dir / f"modem-{self.modem_n}.log"
        log = open(logpath, "w")
        args = [sys.executable, "-m", "agent.sim.modem", "--state", str(self.bed.card_path), "--link", str(self.tty)]
        for spec in self.network:
            args += ["--network", spec]
        self.modem = subprocess.Popen(args, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        log.close()
        end = time.monotonic() + 20
        while time.monotonic() < end:
            # It prints its pty path, then serves; the link must point there (a killed modem's
            # link is stale, and the kernel may hand the new one the same pty number).
            printed = logpath.read_text().split("\n", 1)[0].strip()
            if printed.startswith("/dev/") and os.path.islink(self.tty) and os.readlink(self.tty) == printed:
                return
            if self.modem.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"simulated modem did not come up\n{self.log_tail()}")

    def wait_modem_dead(self, timeout: float = 20) -> None:
        assert self.modem is not None
        self.modem.wait(timeout)

    def stop_modem(self) -> None:
        if self.modem is not None and self.modem.poll() is None:
            self.modem.terminate()
            try:
                self.modem.wait(10)
            except subprocess.TimeoutExpired:
                self.modem.kill()
                self.modem.wait()
        self.modem = None

    # -- the daemon --
    def start_daemon(self, fault: dict | None = None) -> subprocess.Popen:
        assert self.daemon is None or self.daemon.poll() is not None, "a daemon is running"
        self.daemon_n += 1
        self._daemon_started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        log = open(self.dir / f"daemon-{self.daemon_n}.log", "w")
        if fault:
            self.fault_at = fault["FAULT_AT"]
            extra = {"FAULT_ONCE": self.once, **fault}
            if extra.get("FAULT_ACTION") == "modem-cut":
                extra["FAULT_MODEM_PID"] = self.modem.pid
            cmd = [sys.executable, str(HARNESS), "daemon", "--config", str(self.cfg)]
        else:
            extra = {}
            cmd = [sys.executable, "-m", "agent", "daemon", "--config", str(self.cfg)]
        self.daemon = subprocess.Popen(cmd, cwd=REPO, env=self.env(**extra), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        log.close()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if self.daemon.poll() is not None:
                raise AssertionError(f"daemon exited {self.daemon.returncode}\n{self.log_tail()}")
            try:
                self.client().status()
            except Exception:
                time.sleep(0.05)
                continue
            # The start-up discovery (a `sync` job, created by the main loop) ends before the
            # test queues anything: a fault then always hits the test's own job.
            self.wait_quiet(timeout=60, started_sync=True)
            return self.daemon
        raise AssertionError(f"daemon did not answer on {self.sock}\n{self.log_tail()}")

    def wait_power_cut(self, timeout: float = 60) -> None:
        """The armed fault killed the daemon (SIGKILL) and its worker."""
        try:
            rc = self.daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the fault did not fire within {timeout} s\n{self.log_tail()}") from None
        assert rc == -signal.SIGKILL, f"daemon exited {rc}, not by SIGKILL\n{self.log_tail()}"
        assert self.once.exists()
        assert self.once.read_text().split()[0] == self.fault_at
        pid = int(self.once.read_text().split("pid=")[1])
        end = time.monotonic() + 10
        while time.monotonic() < end and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.02)       # the worker: killed itself (and PR_SET_PDEATHSIG)

    def wait_fault_fired(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not self.once.exists() or not self.once.read_text().endswith("\n"):
            if time.monotonic() > end:
                raise AssertionError(f"the fault did not fire within {timeout} s\n{self.log_tail()}")
            time.sleep(0.02)
        assert self.once.read_text().split()[0] == self.fault_at

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(70)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    # -- the socket API --
    def client(self):
        from agent.daemon.client import DaemonClient
        return DaemonClient(str(self.sock), timeout=30.0)

    def status(self) -> dict:
        return self.client().status()

    def submit(self, op: str, params: dict) -> str:
        return self.client().submit(op, params)["job"]["id"]

    def job(self, jid: str, wait: float = 0) -> dict:
        c = self.client()
        return c._data(*c.request("GET", f"/jobs/{jid}?wait={wait}&full=1", timeout=wait + 10))["job"]

    def wait_job(self, jid: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while True:
            j = self.job(jid, wait=min(5.0, max(0.1, end - time.monotonic())))
            if j["state"] in FINAL:
                return j
            if time.monotonic() > end:
                raise AssertionError(f"job {jid} still {j['state']} after {timeout} s: {j}\n{self.log_tail()}")

    def run(self, op: str, params: dict, timeout: float = 60) -> dict:
        return self.wait_job(self.submit(op, params), timeout)

    def wait_quiet(self, timeout: float = 90, *, started_sync: bool = False) -> dict:
        """Poll the status until no job is queued or running (what the acceptance checks do).
        ``started_sync``: also until this daemon's start-up sync job exists."""
        end = time.monotonic() + timeout
        while True:
            st = self.status()
            open_jobs = [j for j in st["jobs"] if j["state"] in ("queued", "running")]
            synced = not started_sync or any(j["kind"] == "sync" and j["source"] == "discovery"
                                             and j["created_at"] >= self._daemon_started for j in st["jobs"])
            if synced and not open_jobs and not st["job_counts"].get("queued") \
                    and not st["job_counts"].get("running"):
                return st
            if time.monotonic() > end:
                raise AssertionError(f"jobs still open after {timeout} s: {open_jobs}\n{self.log_tail()}")
            time.sleep(0.2)

    def cli_status(self) -> dict:
        """`esim-agent --config F --json status` (goes through the daemon's socket)."""
        p = subprocess.run([sys.executable, "-m", "agent", "--config", str(self.cfg), "--json", "status"],
                           cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        doc = json.loads(p.stdout)
        assert p.returncode == 0 and doc["ok"], f"status rc={p.returncode} {p.stdout} {p.stderr}"
        assert doc["data"]["daemon"]["pid"] == self.daemon.pid, "the CLI did not ask the daemon"
        return doc["data"]

    def assert_quiet_by_cli(self) -> None:
        st = self.cli_status()
        open_jobs = [j for j in st["jobs"] if j["state"] in ("queued", "running")]
        assert not open_jobs, open_jobs

    # -- what the card holds, through the daemon --
    def profiles(self) -> list[dict]:
        j = self.run("profile.list", {})
        assert j["state"] == "done", f"profile list: {j}\n{self.log_tail()}"
        return j["result"]["profiles"]

    def enabled(self) -> str | None:
        return next((p["iccid"] for p in self.profiles() if p["state"] == "enabled"), None)

    # -- the journal and the outbox, read-only from the test (SQLite WAL) --
    def journal_jobs(self) -> list:
        from agent.journal import Journal
        with Journal(self.state) as j:
            return j.jobs(limit=1000)

    def journal_steps(self, jid: str) -> list[str]:
        from agent.journal import Journal
        with Journal(self.state) as j:
            return [s for s, _, _ in j.steps(jid)]

    def outbox_rows(self) -> list:
        from agent.store import Outbox
        with Outbox(self.state) as ob:
            return ob.list()

    def close(self) -> None:
        self.stop_daemon()
        self.stop_modem()
        self.reports.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- scenarios

def _reserve(bed) -> dict:
    order = bed.reserve(matching_id=True)
    order["ac"] = bed.ac(order)
    return order


def _download_in_process(bed) -> str:
    """A profile from the local SM-DP+ installed straight on the card file (no modem, no daemon),
    its install notification delivered: setup for the switch scenarios."""
    order = _reserve(bed)
    res = bed.download(matching_id=order["matching_id"])
    bed.process_notifications()
    assert bed.wait_order(order["sid"], "installed")["iccid"] == res.iccid
    return res.iccid


@pytest.fixture
def world_factory(make_bed):
    made: list[World] = []

    def make(*, switch: bool = False, never: bool = False, rollback_after: float = 20.0,
             session_ttl: float | None = None):
        bed = make_bed(**({"session_ttl": session_ttl} if session_ttl else {}))
        info = {"bed": bed}
        network: tuple[str, ...] = ()
        if switch:
            # Two profiles from the local SM-DP+ (their enable/disable notifications go to it),
            # the first one enabled: the switch goes from `previous` to `target`.
            previous = _download_in_process(bed)
            target = _download_in_process(bed)
            bed.es10.enable_profile(previous, refresh=True)
            bed.release_card()
            bed.reload_card()
            bed.process_notifications()
            assert not bed.notifications()
            info.update(previous=previous, target=target)
            if never:
                network = (f"{target}:never",)
        w = World(bed, network=network, rollback_after=rollback_after)
        w.info = info
        made.append(w)
        w.start_modem(free_lock=True)
        return w

    yield make
    failed = []
    for w in made:
        try:
            w.close()
        except Exception as e:   # never mask the test's own failure
            failed.append(e)
    if failed:
        raise failed[0]


# --------------------------------------------------------------------------- the checks after recovery

def _assert_jobs_closed(w: World) -> list:
    jobs = w.journal_jobs()
    for j in jobs:
        assert j.state in FINAL, f"job {j.id} ({j.kind}) left {j.state}\n{w.log_tail()}"
        if j.state == "failed":
            assert j.error and j.error.get("code"), f"job {j.id} failed without an error code: {j.error}"
    return jobs


def _deliver_all_notifications(w: World) -> dict:
    """`notification process` through the daemon; then nothing may be pending anywhere."""
    j = w.run("notification.process", {})
    assert j["state"] == "done", f"notification process: {j}\n{w.log_tail()}"
    listed = w.run("notification.list", {})
    assert listed["state"] == "done", listed
    assert listed["result"]["notifications"] == [], f"still on the card: {listed['result']}"
    assert listed["result"]["outbox_only"] == [], f"still only in the outbox: {listed['result']}"
    st = w.status()
    assert st["outbox"]["pending"] == 0, st["outbox"]
    rows = w.outbox_rows()
    assert all(r.status in ("sent", "removed") for r in rows), [(r.seq_number, r.status) for r in rows]
    return {"outbox": rows, "status": st}


def _assert_twin_saw(w: World, rows) -> None:
    """Every notification the agent ever recorded reached the SM-DP+ twin (PIR: the order is
    installed; enable/disable/delete: a notification event with that seq and ICCID)."""
    store = w.bed.server.store
    events = {(e.get("event"), e.get("iccid"), e.get("seq")) for e in store.events()}
    for r in rows:
        if r.operation == "install":
            order = store.find_by_iccid(r.iccid)
            assert order is not None and order["status"] == "installed", (r, order)
        else:
            assert (r.operation, r.iccid, r.seq_number) in events, (r.operation, r.iccid, r.seq_number, events)


def _assert_reports(w: World, timeout: float = 20) -> dict[str, list[dict]]:
    """Every finished job that changes something got at least one report (with an Idempotency-Key)."""
    want = {j.id for j in w.journal_jobs() if j.state in FINAL and j.kind not in READ_ONLY_KINDS}
    end = time.monotonic() + timeout
    while True:
        got = w.reports.jobs_reported()
        missing = want - set(got)
        if not missing:
            break
        if time.monotonic() > end:
            kinds = {j.id: (j.kind, j.state) for j in w.journal_jobs() if j.id in missing}
            raise AssertionError(f"no report for finished job(s) {kinds}; reports: {w.status()['reports']}\n"
                                 f"{w.log_tail()}")
        time.sleep(0.1)
    job_of_key: dict[str, str] = {}
    for jid, posts in got.items():
        for p in posts:
            assert p["key"] and p["auth"] == "Bearer fault-campaign-token", p
            assert p["body"]["job"]["outcome"] in FINAL
            # A repeated delivery carries the same Idempotency-Key, and a key names one job.
            assert job_of_key.setdefault(p["key"], jid) == jid, (p["key"], jid, job_of_key[p["key"]])
    return got


def _registered(w: World, timeout: float = 15) -> dict:
    """The daemon's snapshot says the modem is registered (refreshed after every job)."""
    end = time.monotonic() + timeout
    while True:
        w.run("chip.info", {})
        reg = w.status().get("registration") or {}
        if reg.get("registered"):
            return reg
        if time.monotonic() > end:
            raise AssertionError(f"not registered: {reg}")
        time.sleep(0.5)


OUTCOMES: dict[str, str] = {}     # test id -> one line, printed at the end (-s / -rA)


def _note(request, text: str) -> None:
    OUTCOMES[request.node.name] = text
    print(f"\n[outcome] {request.node.name}: {text}")


def _first_contact(w: World) -> str:
    """The first job after the modem came back (chip.info). Returns "" or a note when it failed."""
    j = w.run("chip.info", {})
    if j["state"] == "done":
        return ""
    assert j["state"] == "failed" and j["error"]["code"], j
    return f"; first job after the modem returned failed/{j['error']['code']} (worker reused the dead port)"


def _check_download(w: World, order: dict, jid: str, *, after_modem_cut: bool = False) -> str:
    w.wait_quiet()
    w.assert_quiet_by_cli()
    note = _first_contact(w) if after_modem_cut else ""
    job = w.job(jid)
    first = job["state"] + (f"/{job['error']['code']}" if job.get("error") and job["state"] != "done" else "")
    _assert_jobs_closed(w)
    iccid = order["iccid"]
    on_card = [p for p in w.profiles() if p["iccid"] == iccid]
    assert len(on_card) <= 1, on_card
    held = bool(on_card)
    reservation_before = w.bed.order(order["sid"])["status"]      # before any explicit notification run
    if after_modem_cut and not held and reservation_before == "downloaded":
        # The eUICC lost its session with the modem's power: no signed cancel can come. The
        # SM-DP+ gives the order back when the session expires (session_ttl of this world).
        es9 = w.bed.server.es9
        time.sleep(max(0.0, es9.session_ttl - (time.monotonic() - min(s.created for s in es9.sessions.values()))
                       if es9.sessions else 0.0) + 0.2)
        with es9._lock:
            es9._expire()
    delivered = _deliver_all_notifications(w)
    _assert_twin_saw(w, delivered["outbox"])
    _assert_reports(w)
    status = w.bed.order(order["sid"])["status"]
    if held:
        assert status == "installed", f"card holds {iccid} but the reservation is {status}"
    else:
        assert status == "available", f"card does not hold {iccid} and the reservation is {status}"
    retried = ""
    if not held:
        j2 = w.run("profile.download", {"activation_code": order["ac"], "yes": True})
        assert j2["state"] == "done", f"retry: {j2}\n{w.log_tail()}"
        delivered = _deliver_all_notifications(w)
        _assert_twin_saw(w, delivered["outbox"])
        retried = "; retry with the same AC: done"
    assert len([p for p in w.profiles() if p["iccid"] == iccid]) == 1
    assert w.bed.order(order["sid"])["status"] == "installed"
    _assert_jobs_closed(w)
    _assert_reports(w)
    return (f"job {first} (steps {','.join(w.journal_steps(jid))}); after recovery card "
            f"{'holds' if held else 'lacks'} the profile, reservation {reservation_before} -> {status} after "
            f"`notification process`{retried}; final: on card once, reservation installed, outbox empty, "
            f"{len(w.reports.posts)} report POSTs{note}")


def _check_switch(w: World, jid: str, *, expect: tuple[str, ...], after_modem_cut: bool = False) -> str:
    prev, target = w.info["previous"], w.info["target"]
    w.wait_quiet()
    w.assert_quiet_by_cli()
    note = _first_contact(w) if after_modem_cut else ""
    job = w.job(jid)
    _assert_jobs_closed(w)
    assert job["state"] in expect, f"switch job {job['state']} {job.get('error')}\n{w.log_tail()}"
    now = w.enabled()
    if job["state"] == "done":
        assert now == target
    elif job["state"] == "rolled_back":
        assert now == prev
        assert job["error"]["code"] == "rolled_back"
    else:
        assert now in (prev, target)
    reg = _registered(w)
    delivered = _deliver_all_notifications(w)
    _assert_twin_saw(w, delivered["outbox"])
    ops = [(r.operation, r.iccid) for r in delivered["outbox"]]
    if now == target:
        assert ("enable", target) in ops, ops
    if job["state"] == "rolled_back":
        assert ("enable", target) in ops and ("enable", prev) in ops, ops
    _assert_jobs_closed(w)
    _assert_reports(w)
    err = (job.get("error") or {}).get("code")
    return (f"job {job['state']}{'/' + err if err and job['state'] == 'failed' else ''} (steps "
            f"{','.join(w.journal_steps(jid))}); enabled: {'target' if now == target else 'previous'}, "
            f"registered (stat {reg.get('stat')}); notifications delivered {sorted(set(o for o, _ in ops))}; "
            f"{len(w.reports.posts)} report POSTs{note}")


# --------------------------------------------------------------------------- power cut: download

DOWNLOAD_KILL_POINTS = ["start", "authenticating", "metadata", "loading", "installed", "mark_sent"]


def _fault(point: str, kind: str, action: str = "power-cut") -> dict:
    f = {"FAULT_AT": point, "FAULT_ACTION": action}
    if point != "mark_sent":      # Outbox.mark_sent has no job id; the test runs one job at a time anyway
        f["FAULT_KIND"] = kind
    return f


@pytest.mark.parametrize("point", DOWNLOAD_KILL_POINTS)
def test_power_cut_during_download(world_factory, point, request):
    w = world_factory()
    order = _reserve(w.bed)
    w.start_daemon(_fault(point, "profile.download"))
    jid = w.submit("profile.download", {"activation_code": order["ac"], "yes": True})
    w.wait_power_cut()
    w.start_daemon()                      # the plain `esim-agent daemon --config F`
    if point != "mark_sent":
        assert point in w.journal_steps(jid), (point, w.journal_steps(jid))   # the fault hit its step
    _note(request, _check_download(w, order, jid))


# --------------------------------------------------------------------------- power cut: switch

SWITCH_KILL_POINTS = ["start", "enable", "enabled", "attach_wait", "mark_sent"]


@pytest.mark.parametrize("point", SWITCH_KILL_POINTS)
def test_power_cut_during_switch(world_factory, point, request):
    w = world_factory(switch=True)
    w.start_daemon(_fault(point, "profile.enable"))
    jid = w.submit("profile.enable", {"id": w.info["target"]})
    w.wait_power_cut()
    w.start_daemon()
    if point != "mark_sent":
        assert point in w.journal_steps(jid), (point, w.journal_steps(jid))   # the fault hit its step
    _note(request, _check_switch(w, jid, expect=("done",)))


ROLLBACK_KILL_POINTS = ["attach_wait", "rollback", "rolled_back"]


@pytest.mark.parametrize("point", ROLLBACK_KILL_POINTS)
def test_power_cut_during_rollback(world_factory, point, request):
    """The target never attaches (--network ICCID:never, rollback_after 2 s): the switch rolls back."""
    w = world_factory(switch=True, never=True, rollback_after=2.0)
    w.start_daemon(_fault(point, "profile.enable"))
    jid = w.submit("profile.enable", {"id": w.info["target"]})
    w.wait_power_cut()
    w.start_daemon()
    if point != "mark_sent":
        assert point in w.journal_steps(jid), (point, w.journal_steps(jid))   # the fault hit its step
    _note(request, _check_switch(w, jid, expect=("rolled_back",)))


def test_kill_points_cover_at_least_twelve_steps():
    assert len(DOWNLOAD_KILL_POINTS) + len(SWITCH_KILL_POINTS) + len(ROLLBACK_KILL_POINTS) >= 12


# --------------------------------------------------------------------------- modem cut

MODEM_DOWNLOAD_POINTS = ["authenticating", "metadata", "loading", "installed"]


@pytest.mark.parametrize("point", MODEM_DOWNLOAD_POINTS)
def test_modem_cut_during_download(world_factory, point, request):
    w = world_factory(session_ttl=15.0)
    order = _reserve(w.bed)
    w.start_daemon(_fault(point, "profile.download", "modem-cut"))
    jid = w.submit("profile.download", {"activation_code": order["ac"], "yes": True})
    w.wait_fault_fired()
    w.wait_modem_dead()
    w.start_modem()                               # same --state and --link
    if point != "mark_sent":
        assert point in w.journal_steps(jid), (point, w.journal_steps(jid))   # the fault hit its step
    _note(request, _check_download(w, order, jid, after_modem_cut=True))


MODEM_SWITCH_POINTS = ["enable", "enabled", "attach_wait"]


@pytest.mark.parametrize("point", MODEM_SWITCH_POINTS)
def test_modem_cut_during_switch(world_factory, point, request):
    w = world_factory(switch=True)
    w.start_daemon(_fault(point, "profile.enable", "modem-cut"))
    jid = w.submit("profile.enable", {"id": w.info["target"]})
    w.wait_fault_fired()
    w.wait_modem_dead()
    w.start_modem()
    if point != "mark_sent":
        assert point in w.journal_steps(jid), (point, w.journal_steps(jid))   # the fault hit its step
    text = _check_switch(w, jid, expect=("done", "failed"), after_modem_cut=True)
    if w.enabled() != w.info["target"]:
        # The job failed on the dead port before the switch took effect: a retry completes it.
        j2 = w.run("profile.enable", {"id": w.info["target"]})
        assert j2["state"] == "done", f"retry: {j2}\n{w.log_tail()}"
        assert w.enabled() == w.info["target"]
        _registered(w)
        _assert_twin_saw(w, _deliver_all_notifications(w)["outbox"])
        _assert_jobs_closed(w)
        _assert_reports(w)
        text += "; retry: done, target enabled and registered"
    _note(request, text)


def test_first_job_after_modem_cut_in_notifications_succeeds(world_factory):
    """Modem cut after the profile was installed, while its notification was being sent: the
    download job ends done (with notifications_error); the modem comes back; the user's next
    command must work."""
    w = world_factory()
    order = _reserve(w.bed)
    w.start_daemon(_fault("installed", "profile.download", "modem-cut"))
    jid = w.submit("profile.download", {"activation_code": order["ac"], "yes": True})
    w.wait_fault_fired()
    w.wait_modem_dead()
    w.start_modem()
    assert w.wait_job(jid)["state"] == "done"
    w.wait_quiet()
    j = w.run("profile.list", {})
    assert j["state"] == "done", j.get("error")


# --------------------------------------------------------------------------- reports

def test_power_cut_between_job_end_and_report_loses_no_report(world_factory):
    w = world_factory()
    order = _reserve(w.bed)
    w.start_daemon(_fault("finish", "profile.download"))
    jid = w.submit("profile.download", {"activation_code": order["ac"], "yes": True})
    w.wait_power_cut()
    w.start_daemon()
    w.wait_quiet()
    assert w.job(jid)["state"] == "done"
    end = time.monotonic() + 8
    while jid not in w.reports.jobs_reported() and time.monotonic() < end:
        time.sleep(0.1)
    assert jid in w.reports.jobs_reported(), f"no report for job {jid}: {w.status()['reports']}"


def test_outcomes_summary():
    """Prints one line per kill point (run with -s or -rA to see it); runs last in the file."""
    for name, text in OUTCOMES.items():
        print(f"{name}: {text}")
