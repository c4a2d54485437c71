"""End-to-end tests of the gateway daemon (`esim-agent daemon`) with real processes.

Every daemon here is ``python -m agent daemon --config F`` in a subprocess; its card
worker is the real one it starts; the modem is ``python -m agent sim modem`` on a real
pseudo-terminal; the SM-DP+ is the local one (tests/testbed.py) over HTTPS on loopback;
the report receiver is an HTTPS server in this process with a self-signed certificate
(made with ``cryptography``) given to the daemon as ``report_ca``; systemd is played by
an AF_UNIX datagram socket named in ``$NOTIFY_SOCKET``. The CLI runs as
``python -m agent --config F ...`` in a subprocess.

Worlds (each: a modem process, a card, a config, one daemon), shared per module
where the tests are ordered to allow it:

* ``A`` (module): a card with two profiles from the local SM-DP+ (the first enabled;
  the second attaches 2 s after it is enabled), rollback_after = 10, report-back
  (the receiver answers 503 once, then 200), NOTIFY_SOCKET + WATCHDOG_USEC = 2 s.
  Tests run in file order: no daemon first (status, ``--direct`` baseline), then the
  daemon and its socket API, the CLI through it, reports, a checked switch, logs, and
  SIGTERM last.
* ``B``: preloaded profiles that never attach, rollback_after = 2.
* ``C``: modem quirk cfun_after_switch + the modem's ``--fault reenumerate``.
* ``D``: a 19200 baud modem, for a download slow enough to interrupt.
* bad configurations: the daemon refuses to start.

The SIGKILL fault campaign is tests/test_daemon_faults.py; nothing of it is repeated here.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import time_limit

from agent.daemon.main import VIEW_OPS
from testbed import REPO, Bed, testbed_pki  # noqa: F401  (pytest fixture)

FINAL = ("done", "failed", "rolled_back", "cancelled")
PER_TEST_LIMIT_S = 60
REPORT_TOKEN = "s3cret-report-token-7f3a9c"
UNKNOWN_ICCID = "8999000000000000009"


# --------------------------------------------------------------------------- a per-test time limit

@pytest.fixture(autouse=True)
def _time_limit():
    """No test hangs the suite (conftest.time_limit: SIGALRM, main thread)."""
    with time_limit(PER_TEST_LIMIT_S):
        yield


# --------------------------------------------------------------------------- small helpers

def _env(**extra) -> dict:
    """The environment for our subprocesses: none of the agent's or systemd's variables leak in."""
    drop = ("ESIM_AGENT_", "NOTIFY_SOCKET", "WATCHDOG_", "FAULT_", "LISTEN_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))          # a TOML basic string


@dataclass
class CliRun:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def doc(self) -> dict | None:
        try:
            return json.loads(self.stdout)
        except ValueError:
            return None

    @property
    def code(self) -> str | None:
        d = self.doc or {}
        return (d.get("error") or {}).get("code")

    def __str__(self) -> str:
        return f"rc={self.rc} ({self.seconds:.1f} s)\nstdout={self.stdout[-3000:]}\nstderr={self.stderr[-3000:]}"


def unix_http(path: str, method: str, target: str, body: bytes | None = None, *,
              timeout: float = 30.0) -> tuple[int, dict | None, bytes]:
    """One raw HTTP/1.1 request on the daemon's Unix socket: (status, JSON doc or None, raw body)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        head = f"{method} {target} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        s.sendall(head.encode() + b"\r\n" + (body or b""))
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    finally:
        s.close()
    raw = b"".join(chunks)
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = None
    return status, doc, payload


def _strip(obj, volatile: set[str]):
    """``obj`` without the keys in ``volatile`` (at any depth)."""
    if isinstance(obj, dict):
        return {k: _strip(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [_strip(v, volatile) for v in obj]
    return obj


def _parse_kv(line: str) -> dict:
    """A daemon log line ``event=NAME key=value ...`` → dict (shlex: quoted values may hold spaces)."""
    out = {}
    for tok in shlex.split(line):
        k, sep, v = tok.partition("=")
        assert sep and k and k.replace("_", "").isalnum(), f"not key=value: {tok!r} in {line!r}"
        out[k] = v
    return out


# --------------------------------------------------------------------------- TLS for the report receiver

def _self_signed(dirpath: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1/localhost (it is its own trust anchor): (cert, key) paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "esim-agent test report receiver")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    cert_path, key_path = dirpath / "report-cert.pem", dirpath / "report-key.pem"
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class ReportServer:
    """HTTPS on 127.0.0.1 recording every POST; answers ``statuses`` in turn (then 200)."""

    def __init__(self, dirpath: Path, statuses=(503,)):
        self.cert, key = _self_signed(dirpath)
        self.statuses = list(statuses)
        self.posts: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                with outer.lock:
                    status = outer.statuses.pop(0) if outer.statuses else 200
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = None
                    outer.posts.append({"at": time.monotonic(), "status": status, "path": self.path,
                                        "headers": {k.lower(): v for k, v in self.headers.items()},
                                        "body": body})
                payload = b'{"ok": true}' if status < 300 else b'{"error": "try later"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/esim/report"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True, name="report-receiver")
        self.thread.start()

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.posts)

    def wait_posts(self, n: int, timeout: float) -> list[dict]:
        end = time.monotonic() + timeout
        while True:
            posts = self.snapshot()
            if len(posts) >= n or time.monotonic() > end:
                return posts
            time.sleep(0.05)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


# --------------------------------------------------------------------------- systemd's side of sd_notify

class NotifyListener:
    """An AF_UNIX datagram socket (what systemd binds for NOTIFY_SOCKET), recording every
    message with its arrival time. ``on_ready`` runs in the receiving thread the moment
    READY=1 arrives (to check what is true at that moment)."""

    def __init__(self, path: Path, on_ready=None):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.on_ready = on_ready
        self.ready_check = None
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="notify-listener")
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            msg = data.decode(errors="replace")
            now = time.monotonic()
            if "READY=1" in msg.splitlines() and self.on_ready is not None and self.ready_check is None:
                try:
                    self.ready_check = self.on_ready()
                except Exception as e:
                    self.ready_check = e
            self.messages.append((now, msg))

    def assignments(self, key: str) -> list[tuple[float, str]]:
        out = []
        for t, msg in list(self.messages):
            for line in msg.splitlines():
                k, _, v = line.partition("=")
                if k == key:
                    out.append((t, v))
        return out

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> tuple[float, str]:
        end = time.monotonic() + timeout
        while True:
            for t, v in self.assignments(key):
                if value is None or v == value:
                    return t, v
            if time.monotonic() > end:
                raise AssertionError(f"no {key}{'=' + value if value else ''} within {timeout} s: "
                                     f"{[m for _, m in self.messages]}")
            time.sleep(0.02)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


# --------------------------------------------------------------------------- a world: card, modem, config, daemon

def _foreign_lock(node: str) -> bool:
    """True if some process holds esim-agent's lock file for this device node (transport/at.py PortLock)."""
    import errno
    import fcntl
    name = "esim-agent." + node.strip("/").replace("/", "_") + ".lock"
    for d in ("/run/lock", os.environ.get("XDG_RUNTIME_DIR"), "/tmp"):
        if not d or not os.path.exists(os.path.join(d, name)):
            continue
        try:
            fd = os.open(os.path.join(d, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
        finally:
            os.close(fd)
    return False


def _card_with_preload(path: Path, n: int) -> list[str]:
    """A simulated eUICC file with ``n`` preloaded profiles (the first enabled); their ICCIDs."""
    from agent.sim.euicc import SimEuicc
    card = SimEuicc.open(path, preload=n)
    return [p.iccid for p in card.state.profiles]


class World:
    def __init__(self, name: str, card_path: Path, *, modem_args=(), config: dict | None = None,
                 daemon_env: dict | None = None, workdir: Path | None = None):
        # A short directory: AF_UNIX socket paths must stay under 108 bytes.
        self.dir = workdir or Path(tempfile.mkdtemp(prefix=f"etd{name}-", dir="/tmp"))
        self.name = name
        self.card_path = Path(card_path)
        self.tty = self.dir / "tty"
        self.sock = self.dir / "agent.sock"
        self.state = self.dir / "state"
        self.state.mkdir(exist_ok=True)
        self.cfg = self.dir / "agent.toml"
        self.modem_args = list(modem_args)
        self.daemon_env = dict(daemon_env or {})
        self.modem: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.daemon_n = 0
        self.config = {"device": str(self.tty), "socket": str(self.sock), "state_dir": str(self.state),
                       "discovery_interval": 0, "timeout": 5, "long_timeout": 60, "http_timeout": 10,
                       **(config or {})}
        self.write_config()

    def write_config(self) -> None:
        quirks = self.config.get("quirks")
        lines = [f"{k} = {_toml(v)}" for k, v in self.config.items() if k != "quirks"]
        if quirks:
            lines.append("[quirks]")
            lines += [f"{k} = {_toml(v)}" for k, v in quirks.items()]
        self.cfg.write_text("\n".join(lines) + "\n")

    # -- logs --
    def daemon_logs(self, n: int | None = None) -> tuple[str, str]:
        i = self.daemon_n if n is None else n
        out = self.dir / f"daemon-{i}.out"
        err = self.dir / f"daemon-{i}.err"
        return (out.read_text(errors="replace") if out.exists() else "",
                err.read_text(errors="replace") if err.exists() else "")

    def log_tail(self) -> str:
        parts = []
        for p in sorted(self.dir.glob("*.out")) + sorted(self.dir.glob("*.err")) + sorted(self.dir.glob("*.log")):
            parts.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # -- the modem --
    def start_modem(self) -> None:
        """The simulated modem on a new pty. Lock files are global (/run/lock, by /dev/pts name):
        if another test run's process still holds the lock of the pts we got (a daemon whose
        modem was killed), take another pty before the daemon starts."""
        spares = []
        try:
            for _ in range(5):
                self._spawn_modem()
                if not _foreign_lock(os.path.realpath(self.tty)):
                    return
                spares.append(self.modem)       # kept alive while the next one takes another pty
            raise AssertionError(f"every pty we got is locked by another process: {os.path.realpath(self.tty)}")
        finally:
            for m in spares:
                m.terminate()
                m.wait(10)

    def _spawn_modem(self) -> None:
        old = os.readlink(self.tty) if os.path.islink(self.tty) else None
        log = open(self.dir / "modem.log", "a")
        self.modem = subprocess.Popen([sys.executable, "-m", "agent", "sim", "modem", "--state", str(self.card_path),
                                       "--link", str(self.tty), *self.modem_args],
                                      cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + 20
        while not (os.path.islink(self.tty) and os.readlink(self.tty) != old and os.path.exists(self.tty)):
            if self.modem.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"simulated modem did not come up\n{self.log_tail()}")
            time.sleep(0.02)

    # -- the daemon --
    def start_daemon(self, *, wait: bool = True, **env) -> subprocess.Popen:
        assert self.daemon is None or self.daemon.poll() is not None, "a daemon is running"
        self.daemon_n += 1
        out = open(self.dir / f"daemon-{self.daemon_n}.out", "w")
        err = open(self.dir / f"daemon-{self.daemon_n}.err", "w")
        self.daemon = subprocess.Popen([sys.executable, "-m", "agent", "daemon", "--config", str(self.cfg)],
                                       cwd=REPO, env=_env(**{**self.daemon_env, **env}), stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=err)
        out.close()
        err.close()
        if wait:
            self.wait_answers()
        return self.daemon

    def wait_answers(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while True:
            if self.daemon.poll() is not None:
                raise AssertionError(f"daemon exited {self.daemon.returncode}\n{self.log_tail()}")
            try:
                if unix_http(str(self.sock), "GET", "/status", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"daemon did not answer on {self.sock}\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def stop_daemon(self, timeout: float = 30) -> int | None:
        if self.daemon is None:
            return None
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        return self.daemon.returncode

    # -- the socket API --
    def http(self, method: str, target: str, body=None, *, raw: bytes | None = None, timeout: float = 30.0):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        return unix_http(str(self.sock), method, target, data, timeout=timeout)

    def status(self) -> dict:
        st, doc, raw = self.http("GET", "/status")
        assert st == 200 and doc and doc["ok"], raw
        return doc["data"]

    def job(self, jid: str, wait: float = 0) -> dict:
        st, doc, raw = self.http("GET", f"/jobs/{jid}?wait={wait}&full=1", timeout=wait + 30)
        assert st == 200, raw
        return doc["data"]["job"]

    def wait_job(self, jid: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while True:
            j = self.job(jid, wait=min(5.0, max(0.1, end - time.monotonic())))
            if j["state"] in FINAL:
                return j
            if time.monotonic() > end:
                raise AssertionError(f"job {jid} still {j['state']} after {timeout} s: {j}\n{self.log_tail()}")

    def submit(self, op: str, params: dict | None = None) -> str:
        st, doc, raw = self.http("POST", "/jobs", {"op": op, "params": params or {}})
        assert st == 202, raw
        return doc["data"]["job"]["id"]

    def run_job(self, op: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self.wait_job(self.submit(op, params), timeout)

    def jobs(self) -> list[dict]:
        st, doc, raw = self.http("GET", "/jobs")
        assert st == 200, raw
        return doc["data"]["jobs"]

    def enabled(self) -> str | None:
        j = self.run_job("profile.list")
        assert j["state"] == "done", j
        return next((p["iccid"] for p in j["result"]["profiles"] if p["state"] == "enabled"), None)

    # -- the CLI --
    def cli(self, *args, timeout: float = 90, env: dict | None = None) -> CliRun:
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "agent", "--config", str(self.cfg), *map(str, args)],
                           cwd=REPO, env=_env(**(env or {})), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return CliRun(p.returncode, p.stdout, p.stderr, time.monotonic() - t)

    def cli_popen(self, *args) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(self.cfg), *map(str, args)],
                                cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    # -- the journal, read-only (SQLite WAL: readers do not disturb the daemon) --
    def db(self, sql: str, args=()) -> list[sqlite3.Row]:
        from agent.store import DB_NAME
        con = sqlite3.connect(f"file:{self.state / DB_NAME}?mode=ro", uri=True, timeout=10)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def close(self) -> None:
        try:
            self.stop_daemon(timeout=20)
        finally:
            if self.modem is not None and self.modem.poll() is None:
                self.modem.terminate()
                try:
                    self.modem.wait(10)
                except subprocess.TimeoutExpired:
                    self.modem.kill()
                    self.modem.wait()


def _install_from_smdp(bed: Bed) -> str:
    """A profile from the bed's SM-DP+ installed on the card file in-process, its
    install notification delivered (so its later notifications go to the local SM-DP+)."""
    order = bed.reserve(matching_id=True)
    res = bed.download(matching_id=order["matching_id"])
    bed.process_notifications()
    bed.wait_order(order["sid"], "installed")
    return res.iccid


# =========================================================================== 1. bad configuration

BAD_CONFIGS = {
    "negative rollback_after": ('rollback_after = -3\n', "rollback_after",
                                "rollback_after must be seconds above 0, not -3"),
    "unknown key": ('rollbak_after = 30\n', "rollbak_after", "unknown key"),
    "TOML syntax error": ('rollback_after = = 3\n', "line 4", "not valid TOML"),
    "wrong type": ('discovery_interval = "often"\n', "discovery_interval", "discovery_interval must be seconds"),
    "plain http report_url": ('report_url = "http://fleet.example.com/r"\n', "report_url", "https://"),
    "relative socket": (None, "socket", "absolute path"),
    "no device": (None, "device", "device is not set"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_refuses_to_start(case):
    d = Path(tempfile.mkdtemp(prefix="etdcfg-", dir="/tmp"))
    try:
        sock = d / "agent.sock"
        tty = d / "tty"
        tty.write_text("")                       # a device path that exists (never opened: the config is bad)
        extra, key, reason = BAD_CONFIGS[case]
        lines = [f'socket = "{sock}"', f'state_dir = "{d / "state"}"']
        if case != "no device":
            lines.insert(0, f'device = "{tty}"')
        if case == "relative socket":
            lines[-2] = 'socket = "run/agent.sock"'
        cfg = d / "agent.toml"
        cfg.write_text("\n".join(lines) + "\n" + (extra or ""))
        p = subprocess.run([sys.executable, "-m", "agent", "daemon", "--config", str(cfg)], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        msg = p.stderr + p.stdout
        assert p.returncode == 2, f"{case}: rc={p.returncode}\n{msg}"
        assert str(cfg) in msg, f"the message does not name the file: {msg}"
        assert key in msg and reason in msg, f"the message does not name {key!r} / {reason!r}: {msg}"
        assert "Traceback" not in msg
        assert not sock.exists(), "a daemon with a bad config created its socket"
        if case == "relative socket":
            assert not (REPO / "run" / "agent.sock").exists()
        # --json: one JSON document with code config_invalid
        pj = subprocess.run([sys.executable, "-m", "agent", "daemon", "--config", str(cfg), "--json"], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert pj.returncode == 2
        assert json.loads(pj.stdout)["error"]["code"] == "config_invalid", pj.stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_missing_config_file_refuses_to_start(tmp_path):
    cfg = tmp_path / "nope.toml"
    p = subprocess.run([sys.executable, "-m", "agent", "daemon", "--config", str(cfg)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p
    assert str(cfg) in p.stderr and "does not exist" in p.stderr, p.stderr


# =========================================================================== world A

@pytest.fixture(scope="module")
def A(testbed_pki):
    """World A (see the module docstring). The daemon is started by the first test that needs it."""
    work = Path(tempfile.mkdtemp(prefix="etdA-", dir="/tmp"))
    bed = Bed(testbed_pki, work / "bed").start()
    reports = ReportServer(work, statuses=(503,))
    w = None
    notify = None
    try:
        first = _install_from_smdp(bed)
        second = _install_from_smdp(bed)
        bed.es10.enable_profile(first, refresh=True)
        bed.release_card()
        bed.reload_card()
        bed.process_notifications()
        assert not bed.notifications()
        eid = bed.eid
        bed.release_card()                     # the modem process owns the card file from now on
        sock_path = work / "agent.sock"

        def socket_answers_at_ready():
            return unix_http(str(sock_path), "GET", "/status", timeout=5)[0]

        notify = NotifyListener(work / "notify", on_ready=socket_answers_at_ready)
        w = World("A", bed.card_path, workdir=work,
                  modem_args=["--network", f"{second}:after=2"],
                  config={"ca_bundle": bed.ca, "default_smdp": bed.address, "rollback_after": 10,
                          "report_url": reports.url, "report_token": REPORT_TOKEN, "report_ca": reports.cert},
                  daemon_env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": 2_000_000})
        w.bed, w.reports, w.notify = bed, reports, notify
        w.first, w.second, w.eid = first, second, eid
        w.baseline = None
        w.start_modem()
        yield w
    finally:
        if w is not None:
            w.close()
        if notify is not None:
            notify.close()
        reports.close()
        bed.close()
        shutil.rmtree(work, ignore_errors=True)


def _daemon(A) -> World:
    if not A.running:
        A.start_daemon()
    return A


PARITY_COMMANDS = {
    "chip info": ("chip", "info"),
    "profile list": ("profile", "list"),
    "notification list": ("notification", "list"),
    "enable unknown ICCID": ("profile", "enable", UNKNOWN_ICCID),
}


def _direct_baseline(A) -> dict:
    """`--direct --json` of the parity commands with no daemon running (computed once)."""
    if A.baseline is None:
        was_running = A.running
        if was_running:
            assert A.stop_daemon() == 0
        A.baseline = {name: A.cli("--direct", "--json", *args) for name, args in PARITY_COMMANDS.items()}
        if was_running:
            A.start_daemon()
    return A.baseline


# --------------------------------------------------------------------------- 4. status without a daemon

def test_status_without_daemon_reads_the_card(A):
    if A.running:                              # only when run out of file order
        assert A.stop_daemon() == 0
    r = A.cli("--json", "status")
    assert r.rc == 0, r
    d = r.doc["data"]
    assert d["daemon"] is None
    assert str(A.sock) in d["daemon_message"]
    assert "card_error" not in d, d.get("card_error")
    assert d["euicc"]["eid"] == A.eid
    assert {p["iccid"] for p in d["profiles"]} == {A.first, A.second}
    assert d["enabled_iccid"] == A.first
    assert d["registration"]["registered"] is True
    # the readable form says so too
    t = A.cli("status")
    assert t.rc == 0, t
    assert "not running" in t.stdout and A.eid in t.stdout and A.first in t.stdout


def test_direct_baseline_without_daemon(A):
    base = _direct_baseline(A)
    for name in ("chip info", "profile list", "notification list"):
        assert base[name].rc == 0, f"{name}: {base[name]}"
    assert base["enable unknown ICCID"].rc == 1 and base["enable unknown ICCID"].code == "iccid_or_aid_not_found"


# --------------------------------------------------------------------------- 7. start-up: READY after the socket answers

def test_daemon_start_notifies_ready_after_socket_answers(A):
    if A.running:                              # only when run out of file order
        assert A.stop_daemon() == 0
    A.notify.messages.clear()
    A.notify.ready_check = None
    t0 = time.monotonic()
    A.start_daemon(wait=False)
    t_ready, _ = A.notify.wait_for("READY", "1", timeout=30)
    assert A.notify.ready_check == 200, f"at READY=1 the socket answered {A.notify.ready_check!r}"
    A.wait_answers()
    statuses = A.notify.assignments("STATUS")
    assert statuses and statuses[0][0] == t_ready, f"no STATUS= with READY=1: {A.notify.messages}"
    assert statuses[0][1].strip(), "empty STATUS="
    assert t_ready - t0 < 15
    # the socket is born 0660
    mode = stat.S_IMODE(os.stat(A.sock).st_mode)
    assert stat.S_ISSOCK(os.stat(A.sock).st_mode)
    assert mode == 0o660, oct(mode)


# --------------------------------------------------------------------------- 3. the CLI through the daemon = --direct

VOLATILE = {"uptime_s", "snapshot_age_s", "at", "created_at", "started_at", "finished_at"}


@pytest.mark.parametrize("name", list(PARITY_COMMANDS))
def test_cli_through_daemon_matches_direct(A, name):
    base = _direct_baseline(A)[name]
    _daemon(A)
    n_jobs = len(A.jobs())
    r = A.cli("--json", *PARITY_COMMANDS[name])
    assert r.rc == base.rc, f"through the daemon:\n{r}\ndirect:\n{base}"
    assert _strip(r.doc, VOLATILE) == _strip(base.doc, VOLATILE), f"through the daemon:\n{r}\ndirect:\n{base}"
    # it really went through the daemon: a job of that kind was added, or (chip info, profile
    # list) the daemon's view answered it, and that view still holds exactly what was printed
    jobs = A.jobs()
    kind = {"chip info": "chip.info", "profile list": "profile.list", "notification list": "notification.list",
            "enable unknown ICCID": "profile.enable"}[name]
    if kind in VIEW_OPS and len(jobs) == n_jobs:
        st, doc, raw = A.http("GET", f"/view/{kind}")
        assert st == 200 and doc["data"]["result"] == r.doc["data"], raw
        return
    assert len(jobs) >= n_jobs + 1
    assert jobs[0]["kind"] == kind and jobs[0]["source"] == "cli", jobs[0]
    if name == "enable unknown ICCID":
        assert r.code == "iccid_or_aid_not_found"
        assert jobs[0]["state"] == "failed" and jobs[0]["error"]["code"] == "iccid_or_aid_not_found"


def _wait_view(A, op: str, timeout: float = 20.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        st, doc, raw = A.http("GET", f"/view/{op}")
        if st == 200:
            return doc["data"]
        assert st == 409 and doc["error"]["code"] == "view_stale", raw
        assert time.monotonic() < end, f"the view of {op} never became fresh"
        time.sleep(0.05)


def test_quick_path_prints_what_a_job_prints_and_runs_none(A):
    """`chip info` / `profile list` for people: from the daemon's view (no job, no line time)
    the same text as through a job (forced by an option the quick path leaves to the full CLI)."""
    _daemon(A)
    for words, op in ((("chip", "info"), "chip.info"), (("profile", "list"), "profile.list")):
        by_job = A.cli("--timeout", "10", *words)
        assert by_job.rc == 0, by_job
        assert A.jobs()[0]["kind"] == op and A.jobs()[0]["source"] == "cli"
        _wait_view(A, op)
        n = len(A.jobs())
        quick = A.cli(*words)
        assert quick.rc == 0, quick
        assert quick.stdout == by_job.stdout and quick.stderr == by_job.stderr == ""
        assert len(A.jobs()) == n, "the quick path ran a job"


def test_quick_path_sees_a_change_made_through_the_daemon(A):
    """After a job that changes the card, the view is the card after it: `chip info` right
    after `chip set-default-dp` shows the new address, whichever way it is answered."""
    _daemon(A)
    for addr in ("smdp.quick.example", ""):
        r = A.cli("--json", "chip", "set-default-dp", addr)
        assert r.rc == 0, r
        info = A.cli("--json", "chip", "info")
        assert info.rc == 0, info
        assert info.doc["data"]["configured_addresses"]["default_dp_address"] == (addr or None)
        v = _wait_view(A, "chip.info")
        assert v["result"]["configured_addresses"]["default_dp_address"] == (addr or None)


@pytest.mark.parametrize("args, code", [
    (("profile", "enable"), "bad_usage"),                        # missing argument
    (("profile", "enable", "not-an-iccid"), "bad_profile_id"),   # a value the CLI checks itself
    (("profile", "frobnicate"), "bad_usage"),
])
def test_usage_errors_never_reach_the_daemon(A, args, code):
    _daemon(A)
    before = A.db("SELECT COUNT(*) AS n FROM jobs")[0]["n"]
    r = A.cli("--json", *args)
    assert r.rc == 2, r
    assert r.code == code, r
    assert A.db("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == before, "a usage error became a job"


def test_direct_while_daemon_runs_is_port_busy(A):
    _daemon(A)
    r = A.cli("--direct", "--json", "chip", "info")
    assert r.rc == 3, r
    assert r.code == "port_busy", r
    assert A.running
    assert A.status()["daemon"]["pid"] == A.daemon.pid


# --------------------------------------------------------------------------- 4. status with the daemon

def test_status_with_daemon(A):
    _daemon(A)
    r = A.cli("--json", "status")
    assert r.rc == 0, r
    d = r.doc["data"]
    assert d["daemon"]["pid"] == A.daemon.pid
    t = A.cli("status")
    assert t.rc == 0 and f"pid {A.daemon.pid}" in t.stdout, t


# --------------------------------------------------------------------------- 2. the socket API

def test_socket_status(A):
    _daemon(A)
    A.run_job("chip.info")                     # the snapshot is fresh after a job
    s = A.status()
    dm = s["daemon"]
    assert dm["pid"] == A.daemon.pid
    assert dm["version"] and isinstance(dm["version"], str)
    assert isinstance(dm["uptime_s"], (int, float)) and 0 <= dm["uptime_s"] < 600
    assert s["modem"]["device"] == str(A.tty)
    assert s["modem"]["imei"] and s["modem"]["manufacturer"]
    assert s["euicc"]["eid"] == A.eid
    assert {p["iccid"] for p in s["profiles"]} >= {A.first, A.second}
    assert s["enabled_iccid"] == A.first
    assert [p["iccid"] for p in s["profiles"] if p["state"] == "enabled"] == [A.first]
    assert s["registration"]["registered"] is True
    assert isinstance(s["jobs"], list) and s["jobs"]
    assert s["job_counts"].get("done", 0) >= 1
    assert set(s["outbox"]) >= {"pending", "delivered"}
    assert s["outbox"]["pending"] == 0


def test_socket_jobs_listing_and_one_job(A):
    _daemon(A)
    jid = A.submit("profile.list")
    st, doc, raw = A.http("GET", "/jobs")
    assert st == 200 and doc["ok"], raw
    assert jid in [j["id"] for j in doc["data"]["jobs"]]
    j = A.wait_job(jid)
    assert j["state"] == "done" and j["kind"] == "profile.list"
    assert "profiles" in j["result"]
    st, doc, raw = A.http("GET", f"/jobs/{jid}")
    assert st == 200 and doc["data"]["job"]["id"] == jid and "result" not in doc["data"]["job"]
    st, doc, raw = A.http("GET", "/jobs/j00000000000000-deadbeef")
    assert st == 404 and doc["error"]["code"] == "unknown_job", raw


@pytest.mark.parametrize("method, target, body, status, code", [
    ("POST", "/jobs", b'{"op": "profile.frobnicate"}', 400, "unknown_operation"),
    ("POST", "/jobs", b'{"op": "profile.list", "params": [1]}', 400, "bad_request"),
    ("POST", "/jobs", b'{"op": ', 400, "bad_json"),
    ("POST", "/jobs", b'[1, 2]', 400, "bad_json"),
    ("GET", "/nowhere", None, 404, "not_found"),
    ("POST", "/status", b'{}', 404, "not_found"),
    ("DELETE", "/jobs", None, 405, "method_not_allowed"),
    ("POST", "/downloads", b'{}', 400, "ac_missing"),
    ("POST", "/jobs", b'{"op": "chip.info", "device": "/dev/ttyUSB9"}', 409, "other_device"),
])
def test_socket_refuses_bad_requests(A, method, target, body, status, code):
    _daemon(A)
    before = A.db("SELECT COUNT(*) AS n FROM jobs")[0]["n"]
    st, doc, raw = A.http(method, target, raw=body)
    assert st == status, raw
    assert doc is not None and doc["ok"] is False and doc["error"]["code"] == code, raw
    assert doc["error"]["message"]
    assert A.db("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == before
    assert A.running


@pytest.mark.parametrize("ac, code, words", [
    ("LPA:1$$MATCHING", "ac_empty_address", "address"),
    ("LPA:9$smdp.example.com$X", "ac_unsupported_format", "format"),
    ("hello", "ac_bad_format", "LPA"),
])
def test_socket_download_with_malformed_activation_code(A, ac, code, words):
    _daemon(A)
    st, doc, raw = A.http("POST", "/downloads", {"activation_code": ac})
    assert st == 400, raw
    assert doc["error"]["code"] == code, raw
    assert words.lower() in doc["error"]["message"].lower(), raw


def test_socket_download_of_a_reservation(A):
    _daemon(A)
    order = A.bed.reserve(matching_id=True)
    st, doc, raw = A.http("POST", "/downloads", {"activation_code": A.bed.ac(order)})
    assert st == 202, raw
    job = doc["data"]["job"]
    assert job["kind"] == "profile.download" and job["state"] in ("queued", "running")
    assert job.get("source") == "api"
    j = A.wait_job(job["id"])
    assert j["state"] == "done", f"{j}\n{A.log_tail()}"
    assert j["result"]["profile"]["iccid"] == order["iccid"]
    assert A.bed.wait_order(order["sid"], "installed", timeout=20)["status"] == "installed"
    A.downloaded = order["iccid"]
    profiles = {p["iccid"]: p["state"] for p in A.status()["profiles"]}
    assert profiles.get(order["iccid"]) == "disabled"


def test_socket_sync_with_nothing_reserved_is_a_quiet_success(A):
    _daemon(A)
    st, doc, raw = A.http("POST", "/sync", raw=b"")
    assert st == 202, raw
    j = A.wait_job(doc["data"]["job"]["id"])
    assert j["kind"] == "sync"
    assert j["state"] == "done", j
    assert j.get("error") is None, j
    assert j["result"]["outcome"] == "nothing_waiting"
    assert j["result"]["smdp_address"] == A.bed.address
    # and the CLI's `sync` says so with exit 0
    r = A.cli("--json", "sync")
    assert r.rc == 0 and r.doc["data"]["outcome"] == "nothing_waiting", r


def test_sync_with_nothing_reserved_logs_no_warning(A):
    _daemon(A)
    err_path = A.dir / f"daemon-{A.daemon_n}.err"
    start = err_path.stat().st_size
    st, doc, raw = A.http("POST", "/sync", raw=b"")
    j = A.wait_job(doc["data"]["job"]["id"])
    assert j["state"] == "done" and j["result"]["outcome"] == "nothing_waiting", j
    with open(err_path, errors="replace") as f:
        f.seek(start)
        new = f.read()
    noisy = [ln for ln in new.splitlines() if "failed" in ln.lower() or "warning" in ln.lower()]
    assert not noisy, noisy


def test_two_cli_commands_at_once_queue_on_the_daemon(A):
    _daemon(A)
    procs = [A.cli_popen("--json", "chip", "info"), A.cli_popen("--json", "profile", "list")]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert json.loads(outs[0][0])["data"]["eid"] == A.eid
    assert A.first in {p["iccid"] for p in json.loads(outs[1][0])["data"]["profiles"]}


# --------------------------------------------------------------------------- 6. report-back

def _wait_first_report(A) -> dict:
    posts = A.reports.wait_posts(1, timeout=30)
    assert posts, f"no report POST within 30 s\n{A.log_tail()}"
    return posts[0]


def test_report_back_headers_and_body(A):
    _daemon(A)
    first = _wait_first_report(A)
    assert first["status"] == 503          # the receiver refused the first one
    h = first["headers"]
    assert h.get("authorization") == f"Bearer {REPORT_TOKEN}"
    key = h.get("idempotency-key")
    assert key
    assert h.get("content-type", "").startswith("application/json")
    assert first["path"] == "/esim/report"
    b = first["body"]
    assert b["eid"] == A.eid
    assert b["imei"] and len(b["imei"]) == 15 and b["imei"].isdigit()
    assert b["enabled_iccid"] == A.first
    assert {p["iccid"] for p in b["profiles"]} >= {A.first, A.second}
    assert all({"iccid", "state"} <= set(p) for p in b["profiles"])
    job = b["job"]
    assert {"id", "kind", "outcome", "error"} <= set(job)
    assert job["kind"] not in ("chip.info", "profile.list", "notification.list")
    assert job["outcome"] in FINAL
    row = A.db("SELECT * FROM jobs WHERE id = ?", (job["id"],))
    assert row and row[0]["state"] == job["outcome"]
    # the refused report is kept for a retry under the same key (its id); the daemon records the
    # refusal once it has read the 503, which can be just after the receiver logged the POST
    end = time.monotonic() + 10
    while True:
        rep = A.db("SELECT * FROM reports WHERE id = ?", (key,))
        if (rep and rep[0]["attempts"] >= 1) or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert rep, f"no report row {key}"
    assert rep[0]["job_id"] == job["id"]
    assert rep[0]["attempts"] >= 1 and "503" in (rep[0]["last_error"] or "")
    assert rep[0]["delivered_at"] is None or len(A.reports.snapshot()) > 1
    assert rep[0]["next_attempt_at"], rep[0]
    assert json.loads(rep[0]["body"])["job"]["id"] == job["id"]
    # the token is a secret: not in what the socket shows either
    assert REPORT_TOKEN not in A.http("GET", "/status")[2].decode()


# --------------------------------------------------------------------------- 9. checked switch: attaches after 2 s

def test_switch_attaching_after_two_seconds_succeeds(A):
    _daemon(A)
    t = time.monotonic()
    r = A.cli("--json", "profile", "enable", A.second)
    took = time.monotonic() - t
    assert r.rc == 0, f"{r}\n{A.log_tail()}"
    d = r.doc["data"]
    assert d["iccid"] == A.second and d["previous"] == A.first
    assert d["attached"] is True and d["registration"]["registered"] is True
    assert 1.5 <= took < 10, f"the switch took {took:.1f} s (the profile attaches after 2 s, rollback_after 10)"
    j = A.jobs()[0]
    assert j["kind"] == "profile.enable" and j["state"] == "done"
    assert A.status()["enabled_iccid"] == A.second


# --------------------------------------------------------------------------- 8. logs

def test_daemon_stdout_is_key_value_events(A):
    _daemon(A)
    out, err = A.daemon_logs()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, "the daemon logged nothing"
    events = []
    for ln in lines:
        kv = _parse_kv(ln)
        assert ln.startswith("event=") and kv.get("event"), f"not an event line: {ln!r}"
        events.append(kv)
    names = [e["event"] for e in events]
    assert names[0] == "started", names
    assert {"job_queued", "job_started", "job_finished"} <= set(names)
    started = events[0]
    assert started["pid"] == str(A.daemon.pid) and started["socket"] == str(A.sock)
    assert "Traceback" not in out and "Traceback" not in err, err[-3000:]
    for e in events:
        if e["event"] == "job_finished":
            assert e["state"] in FINAL and e.get("job") and e.get("kind")


# --------------------------------------------------------------------------- 6. report retry (placed late: the wait is mostly over)

def test_report_retried_with_same_key_after_503(A):
    _daemon(A)
    first = _wait_first_report(A)
    key = first["headers"]["idempotency-key"]
    end = first["at"] + 8.0
    while time.monotonic() < end:
        later = [p for p in A.reports.snapshot() if p["headers"].get("idempotency-key") == key and p is not first
                 and p["at"] > first["at"]]
        if later:
            break
        time.sleep(0.1)
    later = [p for p in A.reports.snapshot()[1:] if p["headers"].get("idempotency-key") == key]
    assert later, "the refused report was not retried within 8 s"
    assert later[0]["status"] == 200
    assert later[0]["headers"]["authorization"] == f"Bearer {REPORT_TOKEN}"
    assert later[0]["body"]["job"] == first["body"]["job"]


# --------------------------------------------------------------------------- 7. watchdog, SIGTERM (last for world A)

def test_watchdog_pings_about_every_second(A):
    _daemon(A)
    since = max(t for t, _ in A.notify.assignments("READY"))        # this daemon's pings only
    end = time.monotonic() + 5
    while True:          # in file order the daemon has pinged for a while already
        pings = [t for t, v in A.notify.assignments("WATCHDOG") if v == "1" and t >= since]
        if len(pings) >= 4 or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert len(pings) >= 2, A.notify.messages
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    gaps.sort()
    median = gaps[len(gaps) // 2]
    assert 0.7 <= median <= 1.3, f"median gap {median:.2f} s (want about 1 s = WATCHDOG_USEC/2): {gaps}"
    assert max(gaps) < 2.0, f"a gap of {max(gaps):.2f} s: systemd would have killed the service (WatchdogSec=2)"
    busy = [v for _, v in A.notify.assignments("STATUS") if v.startswith("busy")]
    assert busy, "no STATUS=busy... while jobs ran"


def test_sigterm_stops_cleanly(A):
    _daemon(A)
    pid = A.daemon.pid
    t = time.monotonic()
    A.daemon.send_signal(signal.SIGTERM)
    rc = A.daemon.wait(15)
    took = time.monotonic() - t
    assert rc == 0, A.log_tail()
    assert took < 5, f"the daemon took {took:.1f} s to stop"
    A.notify.wait_for("STOPPING", "1", timeout=2)
    assert not A.sock.exists(), "the socket file is left behind"
    assert not os.path.exists(f"/proc/{pid}")
    out, err = A.daemon_logs()
    assert "Traceback" not in out + err, err[-3000:]
    names = [_parse_kv(ln)["event"] for ln in out.splitlines() if ln.strip()]
    assert names[-2:] == ["stopping", "stopped"] or ("stopping" in names and names[-1] == "stopped"), names
    # the report token never reaches the logs (of any daemon run in this world)
    for n in range(1, A.daemon_n + 1):
        o, e = A.daemon_logs(n)
        assert REPORT_TOKEN not in o and REPORT_TOKEN not in e, f"the report token is in daemon-{n}'s log"


# =========================================================================== world B: profiles that never attach

@pytest.fixture(scope="module")
def B():
    work = Path(tempfile.mkdtemp(prefix="etdB-", dir="/tmp"))
    card = work / "card.json"
    first, never1, never2 = _card_with_preload(card, 3)
    w = World("B", card, workdir=work, modem_args=["--network", f"{never1}:never", "--network", f"{never2}:never"],
              # preloaded profiles send notifications to smdp.example.com: keep them on the card (loopback only)
              config={"rollback_after": 2, "process_notifications": False})
    w.first, w.never1, w.never2 = first, never1, never2
    w.no_rollback_run = None
    try:
        w.start_modem()
        w.start_daemon()
        yield w
    finally:
        w.close()
        shutil.rmtree(work, ignore_errors=True)


def test_switch_to_never_attaching_profile_rolls_back(B):
    t = time.monotonic()
    r = B.cli("--json", "profile", "enable", B.never1)
    took = time.monotonic() - t
    assert r.rc == 1, f"{r}\n{B.log_tail()}"
    assert r.code == "rolled_back", r
    assert B.never1 in r.doc["error"]["message"] and B.first in r.doc["error"]["message"]
    assert took >= 2, f"rolled back after {took:.1f} s, before rollback_after (2 s) passed"
    assert B.enabled() == B.first
    job = next(j for j in B.jobs() if j["kind"] == "profile.enable")
    assert job["state"] == "rolled_back", job
    assert job["error"]["code"] == "rolled_back"
    steps = [r["step"] for r in B.db("SELECT step FROM job_steps WHERE job_id = ? ORDER BY n", (job["id"],))]
    assert steps[:1] == ["start"] and "rollback" in steps and steps[-1] == "rolled_back", steps
    st = B.status()
    assert st["enabled_iccid"] == B.first and st["registration"]["registered"] is True


def _no_rollback_run(B) -> tuple[CliRun, dict]:
    if B.no_rollback_run is None:
        r = B.cli("profile", "enable", B.never2, "--no-rollback")      # readable output: warnings on stderr
        job = next(j for j in B.jobs() if j["kind"] == "profile.enable")
        B.no_rollback_run = (r, B.job(job["id"]))
    return B.no_rollback_run


def test_no_rollback_keeps_a_never_attaching_profile(B):
    r, job = _no_rollback_run(B)
    assert r.rc == 0, f"{r}\n{B.log_tail()}"
    assert B.never2 in r.stdout
    assert job["state"] == "done", job
    assert job["params"]["rollback"] is False
    assert job["result"]["iccid"] == B.never2
    assert job["result"]["attached"] is False
    assert job["result"]["attach_checked"] is True
    assert B.enabled() == B.never2
    # the daemon logged the warning for the operator
    out, err = B.daemon_logs()
    assert "did not register" in out + err, (out + err)[-3000:]


def test_no_rollback_warning_reaches_the_cli_user(B):
    r, job = _no_rollback_run(B)
    assert r.rc == 0
    assert "warning" in r.stderr.lower() and "did not register" in r.stderr, r


# =========================================================================== world C: CFUN cycle + re-enumeration

@pytest.fixture(scope="module")
def C():
    work = Path(tempfile.mkdtemp(prefix="etdC-", dir="/tmp"))
    card = work / "card.json"
    first, second = _card_with_preload(card, 2)
    w = World("C", card, workdir=work, modem_args=["--fault", "reenumerate"],
              config={"rollback_after": 10, "process_notifications": False,
                      "quirks": {"cfun_after_switch": True}})
    w.first, w.second = first, second
    w.switch_run = None
    w.grabbers = []
    try:
        w.start_modem()
        w.start_daemon()
        yield w
    finally:
        w.close()
        for g in w.grabbers:
            g.close()
        shutil.rmtree(work, ignore_errors=True)


class _PtyGrabber:
    """While the modem is gone (its --link vanished), take its old pty number ourselves (the
    kernel hands out the lowest free number: open ptys until we hold that one), so the modem
    comes back under a NEW /dev/pts name, as a USB modem that comes back as ttyUSB3 while
    ttyUSB2 is still held open somewhere."""

    def __init__(self, link: Path):
        self.link = str(link)
        self.target = os.path.realpath(self.link)
        self.fds: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="pty-grabber")
        self.thread.start()

    def _run(self) -> None:
        gone = False
        while not self.stop.is_set():
            if not os.path.lexists(self.link):
                gone = True
                # the number is free once every side closed it (the modem, and the worker
                # when it notices the port is gone): its /dev/pts node disappears then
                if not os.path.exists(self.target):
                    for _ in range(64):
                        master, slave = os.openpty()
                        self.fds += [master, slave]
                        if os.ttyname(slave) == self.target:
                            return
                    return
            elif gone:
                return          # the modem is back already (on another number: the old one was held)
            time.sleep(0.002)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _enumerations(w: World) -> int:
    """How many ptys the simulated modem has served (it prints each one's path on stdout)."""
    return sum(1 for ln in (w.dir / "modem.log").read_text().splitlines() if ln.startswith("/dev/"))


def _switch_with_reenumeration(C) -> None:
    if getattr(C, "switch_run", None) is not None:
        return
    pts_before = os.path.realpath(C.tty)
    C.enumerations_before = _enumerations(C)
    grab = _PtyGrabber(C.tty)
    C.grabbers = getattr(C, "grabbers", []) + [grab]
    r = C.cli("--json", "profile", "enable", C.second)
    grab.stop.set()
    C.switch_run = (r, pts_before, os.path.realpath(C.tty))


def test_switch_with_cfun_cycle_survives_reenumeration(C):
    _switch_with_reenumeration(C)
    r, pts_before, pts_after = C.switch_run
    assert r.rc == 0, f"{r}\n{C.log_tail()}"
    assert r.doc["data"]["iccid"] == C.second and r.doc["data"]["attached"] is True
    assert _enumerations(C) > C.enumerations_before, "the modem did not re-enumerate: the fault did not fire"
    assert pts_after != pts_before, (pts_before, pts_after)
    job = next(j for j in C.jobs() if j["kind"] == "profile.enable")
    assert job["state"] == "done", job
    steps = [r["step"] for r in C.db("SELECT step FROM job_steps WHERE job_id = ? ORDER BY n", (job["id"],))]
    assert "cfun" in steps, steps
    assert C.enabled() == C.second
    st = C.status()
    assert st["enabled_iccid"] == C.second and st["registration"]["registered"] is True
    assert C.running


def test_port_stays_owned_by_daemon_after_reenumeration(C):
    """After the modem came back under a new /dev/pts name the daemon must hold that
    node's lock (main.py follow_port): a --direct open still finds the port busy."""
    _switch_with_reenumeration(C)
    assert C.switch_run[1] != C.switch_run[2]
    r = C.cli("--direct", "--json", "chip", "info")
    assert r.rc == 3 and r.code == "port_busy", r


# =========================================================================== world D: interrupting a slow download

@pytest.fixture(scope="module")
def D(testbed_pki):
    work = Path(tempfile.mkdtemp(prefix="etdD-", dir="/tmp"))
    bed = Bed(testbed_pki, work / "bed").start()
    bed.release_card()
    # 19200 baud: authentication takes a few seconds, loading the package about ten more
    # (no default_smdp: the start-up discovery ends at once instead of using the slow line)
    w = World("D", bed.card_path, workdir=work, modem_args=["--baud", "19200"], config={"ca_bundle": bed.ca})
    w.bed = bed
    try:
        w.start_modem()
        w.start_daemon()
        yield w
    finally:
        w.close()
        bed.close()
        shutil.rmtree(work, ignore_errors=True)


def test_sigint_cancels_a_daemon_download(D):
    order = D.bed.reserve(matching_id=True)
    # the start-up discovery must be out of the way (the job we watch is the download)
    end = time.monotonic() + 30
    while any(j["state"] in ("queued", "running") for j in D.jobs()):
        assert time.monotonic() < end, D.jobs()
        time.sleep(0.1)
    free_before = D.run_job("chip.info")["result"]["euicc_info2"]["free_nvm"]
    cli = D.cli_popen("--json", "profile", "download", D.bed.ac(order), "--yes")
    try:
        end = time.monotonic() + 40
        job = None
        while True:
            job = next((j for j in D.jobs() if j["kind"] == "profile.download"), None)
            if job is not None and (job.get("step") or "").startswith("loading"):
                break
            assert cli.poll() is None, f"the CLI ended before the download was loading: {cli.communicate()}"
            assert time.monotonic() < end, f"the download did not reach loading: {job}\n{D.log_tail()}"
            time.sleep(0.05)
        t = time.monotonic()
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=30)
        took = time.monotonic() - t
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    doc = json.loads(out)
    assert took < 15, f"the CLI took {took:.1f} s to stop after SIGINT"
    j = D.wait_job(job["id"], timeout=30)
    if j["state"] == "done":
        # The request came while the last segment was on its way: the eUICC installs on it, so
        # the cancel waits for that answer (flows/download.py) instead of dropping the result of
        # an installation that happened. The job says so truthfully, nothing is lost.
        assert doc["ok"] and cli.returncode == 0, (cli.returncode, out, err)
        lst = D.run_job("profile.list")
        assert order["iccid"] in {p["iccid"] for p in lst["result"]["profiles"]}
        D.sigint_result = (cli.returncode, "installed_before_the_cancel")
        print("\n[outcome] SIGINT reached the daemon during the last segment: installed, job done")
        return
    code = doc["error"]["code"]
    assert (cli.returncode, code) in ((130, "interrupted"), (1, "cancelled")), (cli.returncode, out, err)
    assert j["state"] == "cancelled", j
    assert j["error"]["code"] in ("cancelled", "interrupted"), j
    # the operator's order is usable again, and the card holds nothing of it
    try:
        D.bed.wait_order(order["sid"], "available", timeout=20)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{D.log_tail()}") from None
    lst = D.run_job("profile.list")
    assert lst["state"] == "done"
    assert order["iccid"] not in {p["iccid"] for p in lst["result"]["profiles"]}
    assert D.run_job("chip.info")["result"]["euicc_info2"]["free_nvm"] == free_before, "memory of the half package"
    assert D.running
    D.sigint_result = (cli.returncode, code)
    print(f"\n[outcome] SIGINT to a CLI waiting on a daemon download: exit {cli.returncode} code {code} "
          f"after {took:.1f} s; job {j['state']}/{j['error']['code']}; reservation available")
