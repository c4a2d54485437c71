"""Shared download test bed: test PKI + local SM-DP+ + simulated eUICC + ES10 over DirectTransport.

Everything is real: the PKI is made by ``agent.sim.pki.make_pki``, the SM-DP+ is
``agent.sim.smdpp.SmdpServer`` on HTTPS loopback (reservations through its Twilio-style
``/v1/ESimProfiles`` API, like a backend would make them), the card is a
``SimEuicc`` whose identity comes from the same PKI, and the agent talks to it through
``DirectTransport`` + ``apdu.Isdr`` + ``es10.Es10``.

Use from a test module (no conftest change needed; ``tests/`` is on sys.path)::

    from testbed import bed, make_bed, testbed_pki, other_pki  # noqa: F401  (pytest fixtures)

    def test_something(bed):
        order = bed.reserve(matching_id=True)          # waits for 'available'
        res = bed.download(matching_id=order["matching_id"])
        bed.process_notifications()
        assert bed.wait_order(order["sid"], "installed")["iccid"] == res.iccid

    def test_cli(bed):
        order = bed.reserve()
        run = bed.cli("--json", "profile", "download", bed.ac(order), "--ca", bed.ca, "--yes")
        assert run.rc == 0 and run.doc["ok"]

Fixtures:

* ``testbed_pki`` (session): directory of the main PKI (TLS name ``localhost``);
* ``other_pki`` (session): an unrelated PKI (other CI) whose TLS certificate names only
  ``other.example`` — for wrong-CI / untrusted-CA / host-name-mismatch tests;
* ``bed``: a started :class:`Bed` (fresh server and card, main PKI) — stopped at teardown;
* ``make_bed``: factory ``make_bed(pki_dir=None, card_pki_dir=None, preload=0, **server_kw)``.

Server-side fault injection (``Bed.hook``) swaps the SM-DP+'s request handler class for a
subclass on this one server instance only: drop the connection before or after the server
acted on a request, answer a canned HTTP response, or rewrite the JSON it sends back.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from agent import tlv
from agent.apdu import Isdr
from agent.es10 import Es10
from agent.es9p import Es9pClient
from agent.sim import pki as simpki
from agent.sim import smdpp as _smdpp
from agent.sim.euicc import SimEuicc
from agent.transport.direct import DirectTransport

REPO = Path(__file__).resolve().parents[1]
ACCOUNT_SID = "AC" + "1f" * 16
AUTH_TOKEN = "testbed-token"
ES9_PATH = "/gsma/rsp2/es9plus/"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def testbed_pki(tmp_path_factory) -> Path:
    """The main test PKI (CI, EUM, DPauth, DPpb, DPtls for ``localhost`` + 127.0.0.1)."""
    d = tmp_path_factory.mktemp("testbed-pki")
    simpki.make_pki(d)
    return d


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory) -> Path:
    """A second, unrelated PKI (its own CI); its TLS certificate names only other.example."""
    d = tmp_path_factory.mktemp("testbed-other-pki")
    simpki.make_pki(d, tls_names=("other.example",))
    return d


@pytest.fixture
def make_bed(testbed_pki, tmp_path):
    """Factory for started beds; all are closed at teardown."""
    beds: list[Bed] = []

    def make(pki_dir=None, *, card_pki_dir=None, preload: int = 0, **server_kw) -> "Bed":
        b = Bed(pki_dir or testbed_pki, tmp_path / f"bed{len(beds)}", card_pki_dir=card_pki_dir,
                preload=preload, **server_kw)
        beds.append(b)
        return b.start()

    yield make
    for b in beds:
        b.close()


@pytest.fixture
def bed(make_bed) -> "Bed":
    """A started test bed on the main PKI: fresh SM-DP+ and a fresh eUICC without profiles."""
    return make_bed()


# --------------------------------------------------------------------------- spies


@dataclass
class Call:
    name: str
    args: tuple
    kwargs: dict
    result: Any = None
    error: BaseException | None = None


class Spy:
    """Delegates to ``inner`` and records every method call (arguments, result or exception).

    ``after={"method": fn}`` rewrites a method's result (e.g. tamper with a BPP);
    ``before={"method": fn}`` runs ``fn(*args, **kwargs)`` first and, if it returns a
    (args, kwargs) pair, calls the method with those instead."""

    def __init__(self, inner, *, before: dict | None = None, after: dict | None = None):
        self._inner = inner
        self._before = dict(before or {})
        self._after = dict(after or {})
        self.calls: list[Call] = []

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            rec = Call(name, args, kwargs)
            self.calls.append(rec)
            hook = self._before.get(name)
            if hook is not None:
                changed = hook(*args, **kwargs)
                if changed is not None:
                    args, kwargs = changed
            try:
                res = attr(*args, **kwargs)
            except BaseException as e:
                rec.error = e
                raise
            if name in self._after:
                res = self._after[name](res)
            rec.result = res
            return res

        return call

    def called(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


def flip_in_bpp(bpp: bytes, tag: int, *, index: int = 0) -> bytes:
    """Flip one bit in the middle of the value of the ``index``-th ``tag`` TLV of a
    BoundProfilePackage (BF36 → BF23 | A0{87…} | A1{88…} | A2{87} | A3{86…})."""
    _, length, off = tlv.read_header(bpp, 0)
    end = off + length
    seen = 0
    while off < end:
        t, n, v = tlv.read_header(bpp, off)
        spans = [(t, n, v)]
        if t in (0xA0, 0xA1, 0xA2, 0xA3):
            spans, o = [], v
            while o < v + n:
                t2, n2, v2 = tlv.read_header(bpp, o)
                spans.append((t2, n2, v2))
                o = v2 + n2
        for t2, n2, v2 in spans:
            if t2 == tag:
                if seen == index:
                    pos = v2 + n2 // 2
                    return bpp[:pos] + bytes([bpp[pos] ^ 0x01]) + bpp[pos + 1:]
                seen += 1
        off = v + n
    raise AssertionError(f"no TLV {tag:X} #{index} in the BPP")


# --------------------------------------------------------------------------- server hooks


class _HookedHandler(_smdpp._Handler):
    """The SM-DP+ handler with per-function fault injection (see Bed.hook)."""

    _swallow = False
    _rewrite: Callable[[dict], dict] | None = None

    def _es9(self, app, function, body):
        # One handler instance serves every request of a keep-alive connection: per-request state.
        self._swallow, self._rewrite = False, None
        try:
            return self._es9_hooked(app, function, body)
        finally:
            self._rewrite = None

    def _es9_hooked(self, app, function, body):
        hooks: dict = getattr(self.server, "testbed_hooks", {})
        with self.server.testbed_lock:
            queue = hooks.get(function)
            action = queue.pop(0) if queue else None
        if action is None:
            return super()._es9(app, function, body)
        kind = action[0]
        self.server.testbed_fired.append((function, kind))
        if kind == "drop":                 # the request never reaches the SM-DP+ logic
            self.close_connection = True
            return None
        if kind == "drop-after":           # the SM-DP+ acts on it, the answer is lost
            self._swallow = True
            self.close_connection = True
            return super()._es9(app, function, body)
        if kind == "delay":                # a slow server: wait, then act normally
            time.sleep(action[1])
            return super()._es9(app, function, body)
        if kind == "respond":
            _, status, payload, ctype = action
            return self._send(status, payload, ctype)
        if kind == "rewrite":
            self._rewrite = action[1]
            return super()._es9(app, function, body)
        raise AssertionError(f"unknown hook {kind}")

    def _send(self, status, body, content_type, extra=None):
        if self._swallow:
            return None
        if self._rewrite is not None and body:
            body = json.dumps(self._rewrite(json.loads(body))).encode()
        return super()._send(status, body, content_type, extra)


# --------------------------------------------------------------------------- the bed


@dataclass
class CliRun:
    rc: int
    stdout: str
    stderr: str
    doc: dict | None = field(default=None)

    def __str__(self) -> str:
        return f"rc={self.rc}\nstdout={self.stdout[-2000:]}\nstderr={self.stderr[-2000:]}"


class Bed:
    """One SM-DP+ + one simulated eUICC (+ state dir for the outbox) in ``workdir``."""

    def __init__(self, pki_dir, workdir, *, card_pki_dir=None, preload: int = 0, **server_kw):
        self.pki_dir = Path(pki_dir)
        self.work = Path(workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.work / "state"
        self.state_dir.mkdir(exist_ok=True)
        self.ca = str(self.pki_dir / "ci.pem")
        server_kw.setdefault("reserve_delay", 0.01)
        self.server = _smdpp.SmdpServer(self.pki_dir, auth=(ACCOUNT_SID, AUTH_TOKEN), **server_kw)
        # Every ES9+ call the SM-DP+ handled: {"function", "request", "status" | "failure"}.
        self.es9_log: list[dict] = []
        self._wrap_es9_service()
        httpd = self.server.httpd
        httpd.RequestHandlerClass = _HookedHandler
        httpd.testbed_hooks = {}
        httpd.testbed_fired = []
        httpd.testbed_lock = threading.Lock()
        self.card_path = self.work / "card.json"
        SimEuicc.open(self.card_path, preload=preload, pki_dir=card_pki_dir or pki_dir)
        self.card: SimEuicc = SimEuicc.open(self.card_path)
        self._transport: DirectTransport | None = None
        self._isdr: Isdr | None = None
        self._es10: Es10 | None = None
        self._api = requests.Session()
        self._api.auth = (ACCOUNT_SID, AUTH_TOKEN)

    def _wrap_es9_service(self) -> None:
        orig = self.server.es9.call

        def recording(function, req):
            entry: dict = {"function": function, "request": req}
            self.es9_log.append(entry)
            try:
                out = orig(function, req)
            except _smdpp.Es9Failure as f:
                entry["failure"] = (f.subject, f.reason, f.message)
                raise
            except Exception as e:
                entry["failure"] = ("exception", "", repr(e))
                raise
            entry["status"] = out[0]
            return out

        self.server.es9.call = recording

    # -- lifecycle --
    def start(self) -> "Bed":
        self.server.start()
        return self

    def close(self) -> None:
        self.release_card()
        self._api.close()
        self.server.stop()

    # -- addresses --
    @property
    def address(self) -> str:
        return self.server.address

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"   # always in CERT.DP.TLS (make_pki)

    @property
    def eid(self) -> str:
        return self.card.eid

    def ac(self, order: dict, *, prefix: str = "LPA:") -> str:
        return f"{prefix}1${self.address}${order['matching_id'] or ''}"

    # -- reservations (the Twilio-style API) --
    def reserve(self, *, eid: str | None | bool = None, matching_id: bool = True, cc: str | None = None,
                wait: bool = True, timeout: float = 10.0) -> dict:
        """POST /v1/ESimProfiles. ``eid=True`` reserves for this bed's card; a string for that EID.
        Waits until the order is ``available`` (unless ``wait=False``)."""
        form: dict[str, str] = {}
        if eid is True:
            form["Eid"] = self.eid
        elif isinstance(eid, str):
            form["Eid"] = eid
        if matching_id:
            form["GenerateMatchingId"] = "true"
        if cc is not None:
            form["ConfirmationCode"] = cc
        # verify= per request: a session-level verify loses to $REQUESTS_CA_BUNDLE in requests.
        r = self._api.post(self.api_url + "/v1/ESimProfiles", data=form, timeout=10, verify=self.ca)
        assert r.status_code == 201, r.text
        order = r.json()
        return self.wait_order(order["sid"], "available", timeout=timeout) if wait else order

    def order(self, sid: str) -> dict:
        r = self._api.get(f"{self.api_url}/v1/ESimProfiles/{sid}", timeout=10, verify=self.ca)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_order(self, sid: str, *statuses: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            o = self.order(sid)
            if o["status"] in statuses:
                return o
            if time.monotonic() > deadline:
                raise AssertionError(f"order {sid} is {o['status']} ({o.get('error_code')}: "
                                     f"{o.get('error_message')}), expected {' or '.join(statuses)}")
            time.sleep(0.01)

    # -- the card, through the agent's own layers --
    @property
    def es10(self) -> Es10:
        """An Es10 on an open ISD-R logical channel of this bed's card (opened on first use)."""
        if self._es10 is None:
            self._transport = DirectTransport(self.card)
            self._isdr = Isdr(self._transport).open()
            self._es10 = Es10(self._isdr)
        return self._es10

    def release_card(self) -> None:
        """Close the channel/transport (e.g. before another process uses the card file)."""
        if self._isdr is not None:
            self._isdr.close()
        if self._transport is not None:
            self._transport.close()
        self._transport = self._isdr = self._es10 = None

    def reload_card(self) -> None:
        """Re-read the card from its state file (after another process changed it)."""
        self.release_card()
        self.card = SimEuicc.open(self.card_path)

    def profiles(self) -> list:
        return self.es10.get_profiles_info()

    def iccids(self) -> set[str]:
        return {p.iccid for p in self.profiles()}

    def notifications(self) -> list:
        return self.es10.list_notifications()

    def card_has_session(self, transaction_id: str) -> bool:
        """True if the eUICC still holds a download session for this transaction.

        Asked through ES10b CancelSession, which ends such a session (it answers
        invalidTransactionId when there is none), so only call it to check."""
        from agent.es10 import Es10Error
        try:
            self.es10.cancel_session(bytes.fromhex(transaction_id), 1)
        except Es10Error as e:
            assert e.value == 5, e   # invalidTransactionId
            return False
        return True

    def server_has_session(self, transaction_id: str) -> bool:
        return bytes.fromhex(transaction_id) in self.server.es9.sessions

    # -- the agent's ES9+ side --
    def client(self, *, ca=None, address: str | None = None, **kw) -> Es9pClient:
        kw.setdefault("retries", 0)
        kw.setdefault("timeout", (5.0, 15.0))
        return Es9pClient(address or self.address, ca=ca or self.ca, **kw)

    def download(self, *, matching_id: str | None = None, es9=None, es10=None, consent=None, **opts):
        """Run agent.flows.download.Downloader against this bed; returns the DownloadResult."""
        from agent.flows.download import DownloadOptions, Downloader
        own = es9 is None
        es9 = es9 if es9 is not None else self.client()
        try:
            o = DownloadOptions(address=opts.pop("address", self.address), matching_id=matching_id,
                                consent=consent or (lambda meta: True), **opts)
            return Downloader(es10 if es10 is not None else self.es10, es9, o).run()
        finally:
            if own:
                es9.close()

    def outbox(self):
        from agent.store import Outbox
        return Outbox(self.state_dir)

    def process_notifications(self, seqs=None, *, client_for=None, ca=None):
        """agent.flows.notifications.process with a ClientPool trusting this bed's CI."""
        from agent.ops import ClientPool
        from agent.flows.notifications import process
        pool = ClientPool(ca=ca or self.ca)
        try:
            with self.outbox() as ob:
                return process(self.es10, ob, client_for or pool, eid=self.eid, seqs=seqs)
        finally:
            pool.close()

    # -- fault injection on the SM-DP+ --
    def hook(self, function: str, kind: str, *args, times: int = 1) -> None:
        """Next ``times`` ES9+ ``function`` requests: ``drop`` (close, untouched), ``drop-after``
        (the server acts, the answer is lost), ``delay`` (seconds, then act normally),
        ``respond`` (status, body bytes, content type) or ``rewrite`` (fn(json dict) -> json
        dict applied to the server's answer)."""
        with self.server.httpd.testbed_lock:
            self.server.httpd.testbed_hooks.setdefault(function, []).extend([(kind, *args)] * times)

    @property
    def hooks_fired(self) -> list[tuple[str, str]]:
        return list(self.server.httpd.testbed_fired)

    def es9_calls(self, function: str | None = None) -> list[dict]:
        return [e for e in self.es9_log if function is None or e["function"] == function]

    # -- the CLI in a subprocess --
    def cli_env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESIM_AGENT_")}
        env.update(ESIM_AGENT_STATE_DIR=str(self.state_dir),
                   ESIM_AGENT_CONFIG=str(self.work / "no-such-config.toml"),
                   PYTHONUNBUFFERED="1")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def cli(self, *args, env: dict | None = None, timeout: float = 60.0, stdin: str | None = None,
            entry: list[str] | None = None) -> CliRun:
        """``python -m agent --sim <card> ARGS…`` with this bed's state dir; the card is released
        first and re-read afterwards.  ``entry`` replaces ``-m agent`` (e.g. a test's own
        script that patches something, then calls ``agent.cli.main()``)."""
        self.release_card()
        try:
            p = subprocess.run([sys.executable, *(entry or ["-m", "agent"]), "--sim", str(self.card_path),
                                *map(str, args)],
                               cwd=REPO, env=self.cli_env(**(env or {})), capture_output=True, text=True,
                               timeout=timeout, input=stdin if stdin is not None else "")
        finally:
            self.reload_card()
        doc = None
        try:
            doc = json.loads(p.stdout) if p.stdout.strip() else None
        except ValueError:
            pass
        return CliRun(p.returncode, p.stdout, p.stderr, doc)


# --------------------------------------------------------------------------- a garbage ES9+ server


class FakeEs9Server:
    """A tiny HTTPS server with the PKI's DP TLS certificate that answers every ES9+ POST
    with ``responder(function, request_json) -> (status, body bytes, content type)``.
    For malformed-answer tests: a real TLS peer, trusted, that speaks nonsense."""

    def __init__(self, pki_dir, responder: Callable[[str, Any], tuple[int, bytes, str]]):
        self.requests: list[tuple[str, Any]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                try:
                    req = json.loads(raw)
                except ValueError:
                    req = raw
                fn = self.path[len(ES9_PATH):] if self.path.startswith(ES9_PATH) else self.path
                outer.requests.append((fn, req))
                status, body, ctype = responder(fn, req)
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(pki_dir, "dptls.pem"), os.path.join(pki_dir, "dptls.key.pem"))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        # Handshake lazily, in the per-connection thread (never in the accept loop).
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self.address = f"localhost:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> "FakeEs9Server":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def es9_ok(**fields) -> bytes:
    """An Executed-Success ES9+ JSON body with ``fields``."""
    return json.dumps({"header": {"functionExecutionStatus": {"status": "Executed-Success"}}, **fields}).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.contextmanager
def no_env(*names: str):
    """Temporarily remove environment variables."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
