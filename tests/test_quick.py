"""The CLI's quick path (agent/quick.py) and the daemon's view it reads (GET /view/OP).

The end-to-end parity with the full CLI through a real daemon is in test_daemon.py
(test_cli_through_daemon_matches_direct, test_quick_path_*); here: the command line it takes,
the configuration cache, its reading of the daemon's answer (hostile bytes included) and the
daemon's rule for when its view may answer.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config, quick, render
from agent.daemon import main as dmain
from agent.daemon.server import HttpError

REPO = Path(__file__).resolve().parent.parent

CHIP = {"eid": "89049032001002000018331483037110",
        "euicc_info2": {"svn": "2.2.2", "profile_version": "2.3.1", "firmware_version": "1.4.0", "free_nvm": 491520,
                        "euicc_category": "mediumEuicc", "ci_pkids_for_verification": ["5F5A"],
                        "ci_pkids_for_signing": ["5F5A"]},
        "configured_addresses": {"default_dp_address": None, "root_ds_address": "lpa.ds.gsma.com"}}


# --------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("argv, want", [
    (["chip", "info"], ("chip.info", None, False)),
    (["--json", "chip", "info"], ("chip.info", None, True)),
    (["chip", "info", "--json"], ("chip.info", None, True)),
    (["--config", "/x.toml", "-vv", "profile", "list"], ("profile.list", "/x.toml", False)),
    (["--config=/x.toml", "--verbose", "--json", "profile", "list"], ("profile.list", "/x.toml", True)),
    (["--config", "chip", "chip", "info"], ("chip.info", "chip", False)),       # a value, not a word
])
def test_command_lines_it_takes(argv, want):
    assert quick._command_line(argv) == want


@pytest.mark.parametrize("argv", [
    ["chip", "info"], ["--json", "chip", "info"], ["chip", "info", "--json", "-v"], ["-vv", "profile", "list"],
    ["--config", "/x.toml", "profile", "list", "--json"], ["profile", "list", "--config=/x.toml"],
])
def test_what_it_takes_the_full_parser_takes_alike(argv):
    """Each command line the quick path answers is one the full CLI accepts, with the same meaning."""
    from agent import cli
    op, config, as_json = quick._command_line(argv)
    a = cli.parse_args(argv)
    assert (a.cmd, a.sub) == tuple(op.split(".")) and a.json == as_json and a.config_path == config


@pytest.mark.parametrize("argv", [
    [], ["chip"], ["chip", "info", "extra"], ["info", "chip"], ["profile", "enable", "89"],
    ["notification", "list"], ["status"],
    ["--device", "/dev/ttyUSB2", "chip", "info"],        # the daemon may own another modem: full CLI
    ["--direct", "chip", "info"], ["--sim", "c.json", "chip", "info"], ["--timeout", "3", "chip", "info"],
    ["chip", "info", "-h"], ["--help"], ["--jso", "chip", "info"],     # abbreviations: argparse's to read
    ["--config"], ["--config", "", "chip", "info"], ["--config=", "chip", "info"], ["-", "chip", "info"],
    ["-vx", "chip", "info"], ["--", "chip", "info"],
    ["chip", "--json", "info"], ["profile", "--config", "x.toml", "list"],   # argparse refuses these
])
def test_command_lines_it_leaves_to_the_full_cli(argv):
    assert quick._command_line(argv) is None


def test_defaults_match_config():
    assert quick.DEFAULT_CONFIG == config.DEFAULT_PATH
    assert quick.DEFAULT_SOCKET == config.DEFAULT_SOCKET


# --------------------------------------------------------------------------- the configuration's socket

@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)      # re-read TMPDIR
    monkeypatch.delenv("ESIM_AGENT_CONFIG", raising=False)
    return d / "esim-agent"


def _config(tmp_path, text='socket = "/tmp/q/agent.sock"\n') -> str:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return str(p)


def test_socket_of_a_validated_config_is_remembered(tmp_path, cache):
    p = _config(tmp_path)
    assert quick._socket_for(p) is None                  # never validated: only the full CLI can tell
    quick.remember(config.load(p))
    assert quick._socket_for(p) == "/tmp/q/agent.sock"
    (f,) = cache.glob("config-socket-*.json")
    assert os.stat(f).st_mode & 0o022 == 0


def test_an_edited_config_is_not_trusted_until_validated_again(tmp_path, cache):
    p = _config(tmp_path)
    quick.remember(config.load(p))
    time.sleep(0.01)
    Path(p).write_text('socket = "/tmp/q/other.sock"\n')   # same size: mtime/ctime still differ
    assert quick._socket_for(p) is None
    quick.remember(config.load(p))
    assert quick._socket_for(p) == "/tmp/q/other.sock"


def test_a_replaced_config_is_not_trusted(tmp_path, cache):
    p = _config(tmp_path)
    quick.remember(config.load(p))
    q = tmp_path / "new.toml"
    q.write_text('socket = "/tmp/q/agent.sock"\n')
    os.replace(q, p)                                      # another inode
    assert quick._socket_for(p) is None


def test_default_socket_without_a_config_file(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("ESIM_AGENT_CONFIG", str(tmp_path / "absent.toml"))
    assert quick._socket_for(None) == quick.DEFAULT_SOCKET
    assert quick._socket_for(str(tmp_path / "absent.toml")) is None   # --config FILE missing: full CLI's error


def test_config_from_the_environment(tmp_path, cache, monkeypatch):
    p = _config(tmp_path)
    quick.remember(config.load(p))
    monkeypatch.setenv("ESIM_AGENT_CONFIG", p)
    assert quick._socket_for(None) == "/tmp/q/agent.sock"


def test_a_cache_others_can_write_is_not_read(tmp_path, cache):
    p = _config(tmp_path)
    quick.remember(config.load(p))
    (f,) = cache.glob("config-socket-*.json")
    f.write_text(json.dumps({**json.loads(f.read_text()), "socket": "/tmp/evil.sock"}))
    os.chmod(f, 0o666)
    assert quick._socket_for(p) is None
    os.chmod(f, 0o600)
    cache.chmod(0o777)
    assert quick._socket_for(p) is None


@pytest.mark.parametrize("junk", [b"", b"not json", b"[" * 100000, b'{"format": 1}', b"\xff\xfe"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(tmp_path, cache, junk):
    p = _config(tmp_path)
    quick.remember(config.load(p))
    (f,) = cache.glob("config-socket-*.json")
    f.write_bytes(junk)
    assert _capture(lambda: quick.main(["--config", p, "chip", "info"])) == (None, "")
    quick.remember(config.load(p))
    assert quick._socket_for(p) == "/tmp/q/agent.sock"


def test_a_config_without_socket_key_remembers_the_default(tmp_path, cache):
    p = _config(tmp_path, 'timeout = 5\n')
    quick.remember(config.load(p))
    assert quick._socket_for(p) == config.DEFAULT_SOCKET


def test_source_id_is_not_in_the_settings_shown(tmp_path, cache):
    cfg = config.load(_config(tmp_path))
    assert cfg.source_id and "source_id" not in cfg.to_json()


# --------------------------------------------------------------------------- reading the daemon's answer

class FakeDaemon:
    """A Unix socket that answers every connection with ``answer`` (bytes) and records requests."""

    def __init__(self, path: str, answer: bytes):
        self.answer, self.requests = answer, []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with c:
                c.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = c.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    c.sendall(self.answer)
                except OSError:
                    pass

    def close(self):
        self.srv.close()


def _http(status: int, doc, *, length_delta: int = 0) -> bytes:
    body = (json.dumps(doc) + "\n").encode()
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body) + length_delta}"
            f"\r\nConnection: close\r\n\r\n").encode() + body


@pytest.fixture
def sock_path(tmp_path):
    p = tmp_path / "s"
    p.mkdir()
    return str(p / "agent.sock")


def _ok(op="chip.info", result=CHIP):
    return _http(200, {"ok": True, "data": {"op": op, "result": result, "age_s": 0.4}})


def test_view_answer_is_read(sock_path):
    fake = FakeDaemon(sock_path, _ok())
    try:
        assert quick._view(sock_path, "chip.info") == CHIP
        assert fake.requests[0].startswith(b"GET /view/chip.info HTTP/1.1\r\n")
    finally:
        fake.close()


@pytest.mark.parametrize("answer", [
    _http(409, {"ok": False, "error": {"code": "view_stale", "message": "x"}}),
    _http(200, {"ok": False, "error": {"code": "x", "message": "x"}}),
    _ok(op="profile.list"),                                   # another operation's answer
    _ok(result=[1, 2]),                                       # not an object
    _ok()[:-5],                                               # cut short
    _http(200, {"ok": True, "data": {"op": "chip.info", "result": CHIP}}, length_delta=3),
    b"HTTP/1.0 200 OK\r\n\r\n{}", b"", b"garbage",
    (lambda body: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)(b"[" * 100000),
])
def test_anything_but_a_fresh_answer_leaves_it_to_the_full_cli(sock_path, answer):
    fake = FakeDaemon(sock_path, answer)
    try:
        try:
            got = quick._view(sock_path, "chip.info")
        except (OSError, ValueError, RecursionError):
            got = None              # main() catches these: the full CLI runs
        assert got is None
    finally:
        fake.close()


def test_a_deeply_nested_answer_falls_back(tmp_path, cache, sock_path):
    cfg = _config(tmp_path, f'socket = "{sock_path}"\n')
    quick.remember(config.load(cfg))
    body = b"[" * 100000
    fake = FakeDaemon(sock_path, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    try:
        assert _capture(lambda: quick.main(["--config", cfg, "chip", "info"])) == (None, "")
    finally:
        fake.close()


def test_no_socket_no_answer(tmp_path):
    assert quick._view(str(tmp_path / "none.sock"), "chip.info") is None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "dead.sock"))          # a socket file nobody listens on (a killed daemon's)
    s.close()
    with pytest.raises(OSError):
        quick._view(str(tmp_path / "dead.sock"), "chip.info")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=400),
                 st.builds(lambda b, n: _ok()[:n] + b, st.binary(max_size=40), st.integers(0, 400)),
                 st.builds(lambda d: _http(200, d), st.recursive(
                     st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
                         ["ok", "data", "op", "result", "eid", "profiles"]), c, max_size=4), max_leaves=12))))
def test_hostile_answers_only_ever_fall_back(tmp_path_factory, answer):
    """Whatever bytes come back, main() prints an answer or returns None within the socket's
    time-out: it never raises, and never prints half an answer."""
    d = tmp_path_factory.mktemp("h")
    cfg = d / "agent.toml"
    path = str(d / "agent.sock")
    cfg.write_text(f'socket = "{path}"\n')
    os.environ["XDG_CACHE_HOME"] = str(d / "cache")
    try:
        quick.remember(config.load(str(cfg)))
        fake = FakeDaemon(path, answer)
        try:
            t = time.monotonic()
            out = _capture(lambda: quick.main(["--config", str(cfg), "chip", "info"]))
            assert time.monotonic() - t < quick.SOCKET_TIMEOUT + 1
        finally:
            fake.close()
    finally:
        del os.environ["XDG_CACHE_HOME"]
    rc, printed = out
    assert rc in (None, 0)
    if rc is None:
        assert printed == ""
    else:
        assert printed == render.chip_info_text(json.loads(answer.partition(b"\r\n\r\n")[2])["data"]["result"]) + "\n"


def _capture(fn):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = fn()
    return rc, buf.getvalue()


def test_main_prints_the_full_clis_document(tmp_path, cache, sock_path):
    cfg = _config(tmp_path, f'socket = "{sock_path}"\n')
    quick.remember(config.load(cfg))
    fake = FakeDaemon(sock_path, _ok())
    try:
        rc, printed = _capture(lambda: quick.main(["--config", cfg, "--json", "chip", "info"]))
        assert rc == 0 and json.loads(printed) == {"ok": True, "data": CHIP}
        rc, printed = _capture(lambda: quick.main(["--config", cfg, "chip", "info"]))
        assert rc == 0 and printed == render.chip_info_text(CHIP) + "\n"
        assert printed.startswith("EID:               89049032001002000018331483037110\n")
    finally:
        fake.close()


def test_the_quick_path_imports_nothing_heavy(tmp_path, sock_path):
    """What a command answered from the view loads: no argparse, tomllib, dataclasses, logging,
    socket.py, nor any of the agent's command modules."""
    cfg = _config(tmp_path, f'socket = "{sock_path}"\n')
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("ESIM_AGENT_CONFIG", None)
    subprocess.run([sys.executable, "-c", f"from agent import config, quick; quick.remember(config.load({cfg!r}))"],
                   env=env, check=True)
    fake = FakeDaemon(sock_path, _ok())
    try:
        code = ("import sys\nfrom agent import entry\nsys.argv = ['esim-agent', '--config', %r, '--json', 'chip', 'info']\n"
                "import atexit\natexit.register(lambda: print(sorted(m for m in sys.modules), file=sys.stderr))\n"
                "entry.run()\n") % cfg
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    finally:
        fake.close()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["data"] == CHIP
    loaded = set(eval(r.stderr.strip().splitlines()[-1]))
    heavy = {"argparse", "tomllib", "dataclasses", "logging", "socket", "agent.cli", "agent.config",
             "agent.commands", "agent.errors", "typing", "inspect"}
    assert not loaded & heavy, loaded & heavy
    assert "agent.quick" in loaded


# --------------------------------------------------------------------------- the daemon's rule

@pytest.fixture
def daemon(tmp_path):
    cfg = config.Config(device="/dev/null", socket=str(tmp_path / "agent.sock"), state_dir=str(tmp_path / "state"))
    d = dmain.Daemon(cfg)
    yield d
    d.journal.close()


def _snap(d, age=0.5, view=None):
    """What _read_worker does with a snapshot event carrying ``view``."""
    at = time.time() - age
    for op, result in (view if view is not None else {"chip.info": CHIP, "profile.list": {"profiles": []}}).items():
        d._saw(op, result, at)


def test_view_answers_after_a_snapshot(daemon):
    _snap(daemon)
    a = daemon.view_answer("chip.info")
    assert a["op"] == "chip.info" and a["result"] == CHIP and 0 <= a["age_s"] <= 1
    assert daemon.view_answer("profile.list")["result"] == {"profiles": []}


def test_view_is_stale_once_anything_is_handed_to_the_worker(daemon):
    _snap(daemon)
    daemon.view_epoch += 1                  # what _dispatch and _send_watch do
    with pytest.raises(HttpError) as e:
        daemon.view_answer("chip.info")
    assert (e.value.status, e.value.code) == (409, "view_stale")
    _snap(daemon, view={"chip.info": {**CHIP, "eid": "2"}})     # the snapshot after that job
    assert daemon.view_answer("chip.info")["result"]["eid"] == "2"
    with pytest.raises(HttpError):
        daemon.view_answer("profile.list")          # read before the job: not in that snapshot


def test_a_snapshot_that_failed_makes_the_view_stale(daemon, monkeypatch):
    """The snapshot after a job reads the card again; when that fails (the port gone?), what the
    job itself answered a moment before no longer counts."""
    import io
    jobs = {"j1": _Job("chip.info", result=CHIP)}
    monkeypatch.setattr(daemon.journal, "get", lambda jid: jobs.get(jid))
    daemon._job_finished("j1")
    assert daemon.view_answer("chip.info")["result"] == CHIP

    class Proc:
        stdout = io.StringIO(json.dumps({"event": "snapshot", "data": {
            "at": time.time(), "view": {"chip.info": CHIP}, "error": {"code": "port_lost", "message": "x"}}}) + "\n")

        def wait(self):
            return 0
    monkeypatch.setattr(daemon, "_after_snapshot", lambda: None)
    monkeypatch.setattr(daemon, "follow_port", lambda: None)
    daemon._read_worker(Proc())
    with pytest.raises(HttpError):
        daemon.view_answer("chip.info")


def test_a_registration_watch_leaves_the_view_usable_unless_it_failed(daemon):
    """A watch only reads (profiles, registration): while it runs the view waits (the worker is
    busy), after it the view answers again; a failed watch (the port gone?) makes it stale."""
    _snap(daemon)
    daemon._after_watch({"at": time.time(), "enabled_iccid": "8944"})
    assert daemon.view_answer("chip.info")["result"] == CHIP
    daemon._after_watch({"at": time.time(), "error": {"code": "port_lost", "message": "x"}})
    with pytest.raises(HttpError):
        daemon.view_answer("chip.info")


@pytest.mark.parametrize("busy", ["worker_busy", "sent_to_worker", "watch_sent"])
def test_view_is_stale_while_the_worker_works(daemon, busy):
    _snap(daemon)
    setattr(daemon, busy, {"sent_to_worker": {"j1"}}.get(busy, "j1" if busy == "worker_busy" else True))
    with pytest.raises(HttpError):
        daemon.view_answer("chip.info")


@pytest.mark.parametrize("age", [dmain.VIEW_MAX_AGE + 0.5, -5.0])
def test_view_is_stale_when_old_or_from_the_future(daemon, age):
    _snap(daemon, age=age)
    with pytest.raises(HttpError):
        daemon.view_answer("chip.info")


def test_view_without_the_answer_or_for_other_operations(daemon):
    _snap(daemon, view={"profile.list": {"profiles": []}})        # chip.info's read failed
    with pytest.raises(HttpError) as e:
        daemon.view_answer("chip.info")
    assert e.value.code == "view_stale"
    with pytest.raises(HttpError) as e:
        daemon.view_answer("notification.list")
    assert (e.value.status, e.value.code) == (404, "not_in_view")
    daemon.view.clear()
    with pytest.raises(HttpError):
        daemon.view_answer("profile.list")


class _Job:
    def __init__(self, kind, state="done", params=None, result=None):
        self.id, self.kind, self.state, self.params, self.result, self.error = "j1", kind, state, params or {}, \
            result, None


def test_a_view_operations_own_job_refreshes_its_answer(daemon, monkeypatch):
    """A chip.info job's result is the card's answer just now: the next `chip info` needs no job,
    even before the snapshot that follows it (back-to-back commands would otherwise keep missing)."""
    jobs = {}
    monkeypatch.setattr(daemon.journal, "get", lambda jid: jobs.get(jid))
    _snap(daemon)
    daemon.view_epoch += 1                                  # the job was handed to the worker
    jobs["j1"] = _Job("chip.info", result={**CHIP, "eid": "3"})
    daemon._job_finished("j1")
    assert daemon.view_answer("chip.info")["result"]["eid"] == "3"
    with pytest.raises(HttpError):
        daemon.view_answer("profile.list")
    for job in (_Job("chip.info", state="failed"), _Job("chip.info", result={**CHIP, "warnings": ["w"]}),
                _Job("profile.list", params={"x": 1}, result={"profiles": []})):
        daemon.view_epoch += 1
        jobs["j1"] = job
        daemon._job_finished("j1")
        with pytest.raises(HttpError):
            daemon.view_answer(job.kind)
