"""Deadlines that mean what they say, and exit codes that depend on the cause (issue 9, items 1 and 2).

* APDUs: only the steps that really write (LoadBoundProfilePackage segments, enable, disable,
  delete, memory reset) get ``--long-timeout``; every other APDU of a download gets ``--timeout``,
  so a modem that goes silent during AuthenticateServer ends the download after ``--timeout``.
* HTTP: one deadline (``--http-timeout``, config ``http_timeout``) for a whole ES9+ function call,
  retries, connect, TLS handshake and body read included, and messages that say which deadline
  ran out after how many attempts. The servers here are loopback sockets that misbehave on purpose.
* The same cause gives the same error code and exit code from every command.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from agent.cli import main
from testbed import bed, make_bed, testbed_pki  # noqa: F401 (pytest fixtures)

PIR = bytes.fromhex("BF3708BF2705800101A200")


@pytest.fixture(autouse=True)
def agent_env(tmp_path, monkeypatch):
    """Keep the notification outbox and config out of the user's home and /etc."""
    monkeypatch.setenv("ESIM_AGENT_STATE_DIR", str(tmp_path / "agent-state"))
    monkeypatch.setenv("ESIM_AGENT_CONFIG", str(tmp_path / "no-such-agent.toml"))


def run_cli(capsys, *argv):
    """agent.cli.main in-process; returns (rc, JSON document, stderr, seconds)."""
    capsys.readouterr()
    t0 = time.monotonic()
    rc = main([str(a) for a in argv])
    secs = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, (json.loads(out) if out.strip() else None), err, secs


# --------------------------------------------------------------------------- 1a: APDU deadlines

class TimeoutSpy:
    """An Es10Channel in front of the real one: records the deadline each ES10 command asked for."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[str, float | None]] = []

    def es10(self, payload, *, timeout=None, what="ES10 command"):
        self.calls.append((what, timeout))
        return self.inner.es10(payload, timeout=timeout, what=what)


def test_only_profile_loading_uses_the_long_timeout_in_a_download(bed):
    from agent.es10 import Es10
    order = bed.reserve(matching_id=True)
    spy = TimeoutSpy(bed.es10.ch)
    es10 = Es10(spy, long_timeout=300.0)
    bed.download(matching_id=order["matching_id"], es10=es10, long_timeout=300.0)
    long_ = {what for what, t in spy.calls if t is not None}
    short = {what for what, t in spy.calls if t is None}
    assert long_ == {"LoadBoundProfilePackage"}, spy.calls
    assert {"AuthenticateServer", "PrepareDownload"} <= short


def test_the_writing_es10_calls_keep_the_long_timeout(bed):
    from agent.es10 import Es10
    order = bed.reserve(matching_id=True)
    res = bed.download(matching_id=order["matching_id"])
    spy = TimeoutSpy(bed.es10.ch)
    es10 = Es10(spy, long_timeout=123.0)
    es10.enable_profile(res.iccid, refresh=False)
    es10.disable_profile(res.iccid, refresh=False)
    es10.delete_profile(res.iccid)
    es10.get_profiles_info()
    assert [(w, t) for w, t in spy.calls] == [("EnableProfileRequest", 123.0), ("DisableProfileRequest", 123.0),
                                              ("DeleteProfileRequest", 123.0), ("ProfileInfoListRequest", None)]


@pytest.mark.parametrize("fault", ["silent@8", "silent@12"])
def test_silent_modem_during_a_download_ends_after_timeout(bed, sim_modem, capsys, fault):
    """The field finding: a modem silent during the download's first ES10 calls (AuthenticateServer
    among them) held the device for --long-timeout (300 s) whatever --timeout said."""
    order = bed.reserve(matching_id=True)
    bed.release_card()
    server = sim_modem(fault, card=bed.card)
    rc, doc, err, secs = run_cli(capsys, "--device", server.link, "--timeout", "2", "--long-timeout", "40",
                                 "--json", "profile", "download", bed.ac(order), "--ca", bed.ca, "--yes")
    assert rc == 3, (doc, err)
    assert doc["error"]["code"] == "timeout" and "within 2.0 s" in doc["error"]["message"], doc
    assert secs < 20, secs
    assert set(server.card._channels) == {0}


# --------------------------------------------------------------------------- 1b: one HTTP deadline

class BadServer:
    """A loopback TCP server that misbehaves on purpose, one thread per connection:

    * ``silent``: accepts (and, with TLS, completes the handshake), reads the request, never answers;
    * ``drip-headers``: as silent, then sends the status line and headers one byte a second;
    * ``drip-body``: as silent, then the headers at once and the body one byte a second;
    * ``no-handshake``: accepts TCP and never says a word (a TLS handshake that never completes).
    """

    def __init__(self, mode: str, pki_dir=None):
        import ssl
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.address = f"localhost:{self.port}"
        self.ctx = None
        if pki_dir is not None and mode != "no-handshake":
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(os.path.join(pki_dir, "dptls.pem"), os.path.join(pki_dir, "dptls.key.pem"))
        self.accepted = 0
        self.stop = threading.Event()
        self.held: list = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.held.append(c)
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c):
        try:
            if self.mode == "no-handshake":
                self.stop.wait()
                return
            if self.ctx is not None:
                c.settimeout(10)
                c = self.ctx.wrap_socket(c, server_side=True)
                self.held.append(c)
            c.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(4096)
                if not chunk:
                    return
                data += chunk
            if self.mode == "silent":
                self.stop.wait()
                return
            body = b'{"header": {"functionExecutionStatus": {"status": "Executed-Success"}}}'
            answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n")
            if self.mode == "drip-body":
                c.sendall(answer)
                answer = body
            else:
                answer += body
            for i in range(len(answer)):
                if self.stop.wait(1.0):
                    return
                c.sendall(answer[i:i + 1])
        except OSError:
            pass

    def close(self):
        self.stop.set()
        for c in self.held:
            try:
                c.close()
            except OSError:
                pass
        self.sock.close()


@pytest.fixture
def bad_server(testbed_pki):
    servers = []

    def start(mode, tls=True):
        s = BadServer(mode, testbed_pki if tls else None)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize("mode,tls,code,words", [
    ("silent", True, "read_timeout", "no answer from"),
    ("silent", False, "read_timeout", "no answer from"),
    ("drip-headers", True, "read_timeout", "no answer from"),
    ("drip-headers", False, "read_timeout", "no answer from"),
    ("drip-body", True, "response_deadline", "did not finish its answer"),
    ("drip-body", False, "response_deadline", "did not finish its answer"),
    ("no-handshake", True, "connect_timeout", "TLS handshake"),
])
@pytest.mark.parametrize("function", ["handleNotification", "getBoundProfilePackage"])
def test_one_deadline_for_the_whole_call(bad_server, testbed_pki, mode, tls, code, words, function):
    """A server that never answers, one that drips a byte a second, one that never completes the
    TLS handshake: each call ends within its one deadline (retries included), exit 3, and the
    message names the deadline and the number of attempts."""
    from agent.errors import TimeoutError_
    from agent.es9p import Es9pClient
    srv = bad_server(mode, tls)
    c = Es9pClient(srv.address, ca=None if not tls else testbed_pki / "ci.pem", insecure_http=not tls,
                   deadline=3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError_) as ei:
        if function == "handleNotification":
            c.handle_notification(PIR)
        else:
            c.get_bound_profile_package("A1B2C3D4", bytes.fromhex("BF2103800100"))
    secs = time.monotonic() - t0
    c.close()
    e = ei.value
    assert 3.0 <= secs < 4.5, secs
    assert e.exit_code == 3 and e.code == code, e.to_json()
    assert words in e.message and "within the 3 s deadline" in e.message, e.message
    n = e.details["attempts"]
    assert f"({n} attempt" in e.message and n >= 1
    assert e.details["deadline_s"] == 3
    if mode == "no-handshake" or function == "handleNotification":
        assert srv.accepted == n            # retried while there was time (nothing was sent, or idempotent)
    else:
        assert srv.accepted == 1            # getBoundProfilePackage is never sent twice


def test_retries_stop_at_the_deadline(testbed_pki):
    """Refused connections are retried with back-off, but never past the deadline."""
    from agent.errors import TransportError
    from agent.es9p import Es9pClient
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = Es9pClient(f"localhost:{port}", ca=testbed_pki / "ci.pem", deadline=2, retries=10, backoff=0.4)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as ei:
        c.handle_notification(PIR)
    assert time.monotonic() - t0 < 2.0
    e = ei.value
    assert e.code == "connection_refused" and e.exit_code == 3
    assert e.details["attempts"] == 3                       # 0 + 0.4 + 0.8 s; the next back-off (1.6 s) does not fit
    assert "(3 attempts; no time left for another within the 2 s deadline)" in e.message, e.message


def test_http_timeout_option_through_the_cli(bad_server, bed, capsys):
    srv = bad_server("silent")
    order = bed.reserve(matching_id=True)
    bed.release_card()
    rc, doc, err, secs = run_cli(capsys, "--sim", bed.card_path, "--json", "profile", "download",
                                 f"LPA:1${srv.address}${order['matching_id']}", "--http-timeout", "2",
                                 "--ca", bed.ca, "--yes")
    assert rc == 3, doc
    assert doc["error"]["code"] == "read_timeout" and "within the 2 s deadline" in doc["error"]["message"]
    assert doc["error"]["details"]["step"] == "initiateAuthentication"
    assert secs < 6, secs


def test_http_timeout_from_the_config_and_the_option_wins(bad_server, bed, capsys, tmp_path, monkeypatch):
    srv = bad_server("silent")
    cfg = tmp_path / "agent.toml"
    cfg.write_text("http_timeout = 1.5\n")
    monkeypatch.setenv("ESIM_AGENT_CONFIG", str(cfg))
    bed.release_card()
    ac = f"LPA:1${srv.address}$MID-1"
    rc, doc, err, secs = run_cli(capsys, "--sim", bed.card_path, "--json", "profile", "download", ac,
                                 "--ca", bed.ca, "--yes")
    assert rc == 3 and "within the 1.5 s deadline" in doc["error"]["message"], doc
    rc, doc, err, secs = run_cli(capsys, "--sim", bed.card_path, "--json", "profile", "download", ac,
                                 "--http-timeout", "2.5", "--ca", bed.ca, "--yes")
    assert rc == 3 and "within the 2.5 s deadline" in doc["error"]["message"], doc


@pytest.mark.parametrize("value", ["0", "-1", "nan", "3601", "abc"])
def test_bad_http_timeout_is_a_usage_error(capsys, tmp_path, value):
    rc, doc, err, secs = run_cli(capsys, "--sim", tmp_path / "card.json", "--json", "notification", "process",
                                 f"--http-timeout={value}")
    assert rc == 2, doc
    assert doc["error"]["code"] in ("bad_timeout", "bad_usage"), doc


def test_http_timeout_travels_as_a_request_param():
    """Through the daemon the CLI's --http-timeout is a job param, like --ca: ops.run moves it into
    the context's server settings, and the pool hands it to every ES9+ client."""
    from agent import ops
    seen = {}

    def fake(ctx, card, **params):
        seen["params"] = params
        seen["deadline"] = ctx.servers.pool()("smdp.example.com").deadline
        return {}
    ctx = ops.Context(servers=ops.ServerSettings(insecure_http=True, http_timeout=30.0))
    real = ops.registry

    def registry():
        return {**real(), "notification.process": fake}
    ops.registry = registry
    try:
        ops.run("notification.process", ctx, None, {"seqs": None, "http_timeout": 7.5})
    finally:
        ops.registry = real
    assert seen == {"params": {"seqs": None}, "deadline": 7.5}


# --------------------------------------------------------------------------- 2: exit codes by cause

@pytest.fixture
def no_dns(monkeypatch):
    """Names under example.com and .invalid do not resolve (and nothing leaves the machine)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *a, **kw):
        if isinstance(host, str) and (host.endswith(".invalid") or host.endswith("example.com")):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *a, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_dns_failure_is_one_code_and_one_exit_code_from_every_command(no_dns, bed, capsys, tmp_path):
    """The field finding: the same DNS failure was exit 3 from `profile download` and 1 from
    `notification process`."""
    from agent.sim.euicc import SimEuicc
    card = tmp_path / "card.json"
    SimEuicc.open(card, preload=2, pki_dir=bed.pki_dir)        # its profiles notify smdp.example.com
    sim = ["--sim", card, "--json"]
    rc, doc, _, _ = run_cli(capsys, *sim, "profile", "list")
    other = [p["iccid"] for p in doc["data"]["profiles"] if p["state"] != "enabled"][0]
    assert run_cli(capsys, *sim, "profile", "enable", other, "--no-notifications")[0] == 0
    rc1, doc1, _, _ = run_cli(capsys, *sim, "profile", "download", "LPA:1$no-such-host.invalid$MID-1",
                              "--ca", bed.ca, "--yes", "--no-notifications")
    rc2, doc2, _, _ = run_cli(capsys, *sim, "notification", "process", "--ca", bed.ca)
    assert (rc1, doc1["error"]["code"]) == (3, "dns_failure"), doc1
    assert (rc2, doc2["error"]["code"]) == (3, "dns_failure"), doc2
    # the next run only waits for the back-off of that address: exit 0, and it says so
    rc3, doc3, _, _ = run_cli(capsys, *sim, "notification", "process", "--ca", bed.ca)
    assert rc3 == 0 and len(doc3["data"]["waiting"]) == 2, doc3
    # `--now` tries again: the same cause, the same code
    rc4, doc4, _, _ = run_cli(capsys, *sim, "notification", "process", "--now", "--ca", bed.ca)
    assert (rc4, doc4["error"]["code"]) == (3, "dns_failure"), doc4


def test_no_ca_configured_is_one_code_and_one_exit_code_from_every_command(bed, capsys):
    order = bed.reserve(matching_id=True)
    bed.download(matching_id=order["matching_id"])            # its install notification is pending
    bed.release_card()
    sim = ["--sim", bed.card_path, "--json"]
    rc1, doc1, _, _ = run_cli(capsys, *sim, "profile", "download", bed.ac(bed.reserve(matching_id=True)), "--yes")
    rc2, doc2, _, _ = run_cli(capsys, *sim, "notification", "process")
    assert (rc1, doc1["error"]["code"]) == (2, "no_trusted_ci"), doc1
    assert (rc2, doc2["error"]["code"]) == (2, "no_trusted_ci"), doc2
    # a configuration problem is not the server's: no back-off, the next run tries again
    rc3, doc3, _, _ = run_cli(capsys, *sim, "notification", "process")
    assert (rc3, doc3["error"]["code"]) == (2, "no_trusted_ci"), doc3
    rc4, doc4, _, _ = run_cli(capsys, *sim, "notification", "process", "--ca", bed.ca)
    assert rc4 == 0 and [n["status"] for n in doc4["data"]["notifications"]] == ["delivered"], doc4


def test_a_dropped_connection_is_one_code_from_download_and_notification_process(bed, capsys):
    order = bed.reserve(matching_id=True)
    bed.download(matching_id=order["matching_id"])
    bed.release_card()
    bed.hook("initiateAuthentication", "drop", times=100)
    bed.hook("handleNotification", "drop", times=100)
    sim = ["--sim", bed.card_path, "--json"]
    rc1, doc1, _, _ = run_cli(capsys, *sim, "profile", "download", bed.ac(bed.reserve(matching_id=True)),
                              "--ca", bed.ca, "--yes", "--no-notifications")
    rc2, doc2, _, _ = run_cli(capsys, *sim, "notification", "process", "--ca", bed.ca)
    assert (rc1, doc1["error"]["code"]) == (rc2, doc2["error"]["code"]) == (3, "connection_lost"), (doc1, doc2)


def test_partial_delivery_exits_with_the_failures_cause(no_dns, bed, capsys, tmp_path):
    """Some delivered, some not: the exit code is the failure's (3 for DNS), not always 1."""
    from agent.sim.euicc import SimEuicc
    card = tmp_path / "card.json"
    SimEuicc.open(card, preload=2, pki_dir=bed.pki_dir)
    sim = ["--sim", card, "--json"]
    order = bed.reserve(matching_id=True)
    rc, doc, _, _ = run_cli(capsys, *sim, "profile", "download", bed.ac(order), "--ca", bed.ca, "--yes",
                            "--no-notifications")
    assert rc == 0, doc
    rc, doc, _, _ = run_cli(capsys, *sim, "profile", "list")
    other = [p["iccid"] for p in doc["data"]["profiles"] if p["state"] != "enabled" and
             p["iccid"] != order["iccid"]][0]
    assert run_cli(capsys, *sim, "profile", "enable", other, "--no-notifications")[0] == 0
    rc, doc, _, _ = run_cli(capsys, *sim, "notification", "process", "--ca", bed.ca)
    got = sorted((n["address"], n["status"], (n.get("error") or {}).get("code")) for n in doc["data"]["notifications"])
    assert got == [(bed.address, "delivered", None), ("smdp.example.com", "failed", "dns_failure"),
                   ("smdp.example.com", "waiting", None)], got
    assert rc == 3
