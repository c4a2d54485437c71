"""Issue 9 item 7: the test bed is a product too. `esim-agent sim ...` refuses what it cannot
do with a clear message and exit 2 (never "internal error ... a bug"), a running simulated
modem keeps its --link, and one card state file has one writer at a time."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from agent.cli import main

pytestmark = pytest.mark.usefixtures("hang_guard")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def agent_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ESIM_AGENT_STATE_DIR", str(tmp_path / "agent-state"))
    monkeypatch.setenv("ESIM_AGENT_CONFIG", str(tmp_path / "no-such-agent.toml"))


def sub(tmp_path, *argv, timeout=30):
    env = dict(os.environ, ESIM_AGENT_STATE_DIR=str(tmp_path / "agent-state"),
               ESIM_AGENT_CONFIG=str(tmp_path / "no-such-agent.toml"), PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "agent", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, stdin=subprocess.DEVNULL)


def refused(p, code: str, *words: str):
    """Exit 2 with one JSON error document of ``code`` whose message holds ``words``; no 'internal error'."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    doc = json.loads(p.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == code, doc
    msg = doc["error"]["message"]
    assert "internal error" not in msg and "a bug" not in msg and "Traceback" not in p.stderr
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    from agent.sim.pki import make_pki
    d = tmp_path_factory.mktemp("sim-cli-pki")
    make_pki(d)
    return d


# --------------------------------------------------------------------------- sim pki / sim smdpp

def test_sim_pki_on_an_existing_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    refused(sub(tmp_path, "--json", "sim", "pki", f), "pki_not_a_directory", str(f), "not a directory")
    assert f.read_text() == "x"


def test_sim_pki_on_an_unwritable_path(tmp_path):
    refused(sub(tmp_path, "--json", "sim", "pki", "/proc/no-such-process/pki"), "pki_unwritable",
            "/proc/no-such-process/pki")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as root: every directory is writable")
        refused(sub(tmp_path, "--json", "sim", "pki", d / "pki"), "pki_unwritable", str(d / "pki"))
    finally:
        d.chmod(0o700)


def test_sim_smdpp_with_a_missing_pki(tmp_path):
    msg = refused(sub(tmp_path, "--json", "sim", "smdpp", "--pki", tmp_path / "missing"), "pki_missing",
                  f"esim-agent sim pki {tmp_path / 'missing'}")
    assert "make_pki" not in msg


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_sim_smdpp_port_out_of_range(tmp_path, pki_dir, port):
    refused(sub(tmp_path, "--json", "sim", "smdpp", "--pki", pki_dir, "--port", port), "bad_listen_port",
            port, "0-65535")


def test_sim_smdpp_port_in_use(tmp_path, pki_dir):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        refused(sub(tmp_path, "--json", "sim", "smdpp", "--pki", pki_dir, "--port", port), "listen_port_in_use",
                f"port {port}", "--port")
    finally:
        s.close()


# --------------------------------------------------------------------------- sim modem --link

def _start_modem(tmp_path, state, link, *extra):
    """`esim-agent sim modem` in a child; returns (process, pty path) once it serves."""
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.Popen([sys.executable, "-m", "agent", "sim", "modem", "--state", str(state), "--link", str(link),
                          "--preload", "2", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=REPO)
    line = p.stdout.readline().strip()
    if not line:
        out, err = p.communicate(timeout=10)
        return p, None, err
    deadline = time.monotonic() + 10
    while not os.path.islink(link) and time.monotonic() < deadline:
        time.sleep(0.02)
    return p, line, ""


def _stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_sim_modem_keeps_a_live_link(tmp_path):
    link = tmp_path / "tty"
    first, pty, err = _start_modem(tmp_path, tmp_path / "a.json", link)
    try:
        assert pty and os.readlink(link) == pty, err
        second = sub(tmp_path, "--json", "sim", "modem", "--state", tmp_path / "b.json", "--link", link)
        refused(second, "link_in_use", str(link), f"PID {first.pid}")
        assert os.readlink(link) == pty                       # still the first modem's
        assert not (tmp_path / "b.json").exists()             # refused before a card was made
    finally:
        _stop(first)
    assert not os.path.lexists(link)
    # The first one is gone: its link can be taken over.
    third, pty3, err = _start_modem(tmp_path, tmp_path / "a.json", link)
    try:
        assert pty3 and os.readlink(link) == pty3, err
    finally:
        _stop(third)


def test_sim_modem_replaces_a_stale_link(tmp_path):
    link = tmp_path / "tty"
    os.symlink("/dev/pts/999999", link)                       # left behind by a killed modem
    p, pty, err = _start_modem(tmp_path, tmp_path / "a.json", link)
    try:
        assert pty and os.readlink(link) == pty, err
    finally:
        _stop(p)


def test_sim_modem_does_not_create_missing_directories(tmp_path):
    link = tmp_path / "no" / "such" / "dir" / "tty"
    refused(sub(tmp_path, "--json", "sim", "modem", "--state", tmp_path / "a.json", "--link", link),
            "link_dir_missing", str(link.parent), "mkdir -p")
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------- one writer per state file

def test_second_writer_of_a_state_file_is_refused(tmp_path):
    state = tmp_path / "card.json"
    modem, pty, err = _start_modem(tmp_path, state, tmp_path / "tty")
    try:
        assert pty, err
        # A second simulated modem on the same card.
        refused(sub(tmp_path, "--json", "sim", "modem", "--state", state, "--link", tmp_path / "tty2"),
                "sim_state_busy", str(state), f"PID {modem.pid}")
        # The CLI's in-process card: a change would be lost when the modem next saves.
        from agent.sim.euicc import SimEuicc
        iccid = SimEuicc.open(state).state.profiles[1].iccid
        before = state.read_bytes()
        refused(sub(tmp_path, "--json", "--sim", state, "profile", "nickname", iccid, "x"), "sim_state_busy",
                str(state), f"PID {modem.pid}", "--device")
        assert state.read_bytes() == before
        # Reading beside the running modem is fine (the README shows it).
        p = sub(tmp_path, "--json", "--sim", state, "profile", "list")
        assert p.returncode == 0, p.stdout + p.stderr
        assert len(json.loads(p.stdout)["data"]["profiles"]) == 2
        # Through the modem, the change lands.
        p = sub(tmp_path, "--json", "--device", tmp_path / "tty", "--timeout", "5", "profile", "nickname", iccid, "x")
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        _stop(modem)
    assert SimEuicc.open(state).state.profiles[1].nickname == "x"
    # Nobody holds it now: --sim writes again.
    p = sub(tmp_path, "--json", "--sim", state, "profile", "nickname", iccid, "y")
    assert p.returncode == 0, p.stdout + p.stderr
    assert SimEuicc.open(state).state.profiles[1].nickname == "y"


def test_in_process_sim_writer_holds_the_file(tmp_path, capsys):
    """Within one process too: an open in-process card (the CLI's --sim) and a second writer."""
    from agent.errors import AgentError
    from agent.sim.euicc import SimEuicc
    state = tmp_path / "card.json"
    card = SimEuicc.open(state, preload=1, lock=True)
    try:
        with pytest.raises(AgentError) as ei:
            SimEuicc.open(state, lock=True)
        assert ei.value.code == "sim_state_busy" and ei.value.exit_code == 2
        assert f"PID {os.getpid()}" in ei.value.message
        ro = SimEuicc.open(state, lock=True, read_only_if_busy=True)        # a reader gets a snapshot
        assert ro.state.profiles[0].iccid == card.state.profiles[0].iccid
        with pytest.raises(AgentError) as ei:
            ro.state.save()
        assert ei.value.code == "sim_state_busy"
    finally:
        card.close()
    again = SimEuicc.open(state, lock=True)
    again.close()
    rc = main(["--sim", str(state), "--json", "profile", "nickname", card.state.profiles[0].iccid, "n1"])
    assert rc == 0, capsys.readouterr()
