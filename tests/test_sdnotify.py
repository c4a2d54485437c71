"""systemd notify protocol: datagrams on a real AF_UNIX socket (path and abstract), no-op outside systemd."""
import logging
import os
import socket
import uuid

import pytest

from agent import sdnotify


@pytest.fixture
def listener(tmp_path, monkeypatch):
    """A datagram socket bound in a temp dir, named in $NOTIFY_SOCKET; returns a receive function."""
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield lambda: s.recv(4096).decode()
    s.close()


def test_messages_reach_a_path_socket(listener):
    assert sdnotify.ready() is True
    assert listener() == "READY=1"
    assert sdnotify.ready("listening on /run/esim-agent/agent.sock")
    assert listener() == "READY=1\nSTATUS=listening on /run/esim-agent/agent.sock"
    assert sdnotify.status("downloading 8944123456789012345")
    assert listener() == "STATUS=downloading 8944123456789012345"
    assert sdnotify.watchdog() and listener() == "WATCHDOG=1"
    assert sdnotify.stopping() and listener() == "STOPPING=1"
    assert sdnotify.notify("RELOADING=1\nSTATUS=x") and listener() == "RELOADING=1\nSTATUS=x"


def test_status_stays_one_assignment(listener):
    """A line break in the text must not smuggle in another KEY=VALUE (e.g. READY=1)."""
    assert sdnotify.status("line one\nREADY=1")
    assert listener() == "STATUS=line one READY=1"


@pytest.mark.skipif(not os.path.exists("/proc/net/unix"), reason="abstract sockets are Linux only")
def test_abstract_socket(monkeypatch):
    name = f"esim-agent-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert sdnotify.ready("up")
        assert s.recv(4096) == b"READY=1\nSTATUS=up"
        assert sdnotify.watchdog() and s.recv(4096) == b"WATCHDOG=1"
    finally:
        s.close()


def test_no_notify_socket_is_a_silent_no_op(monkeypatch, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with caplog.at_level(logging.DEBUG, logger="agent.sdnotify"):
        assert sdnotify.ready() is False
        assert sdnotify.status("x") is False
        assert sdnotify.watchdog() is False
        assert sdnotify.stopping() is False
    assert caplog.records == []
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("where", ["missing", "not-a-socket", "stream", "relative", "vsock"])
def test_send_failure_never_raises(tmp_path, monkeypatch, caplog, where):
    target = {"missing": str(tmp_path / "gone"), "not-a-socket": str(tmp_path / "file"),
              "stream": str(tmp_path / "stream"), "relative": "notify.sock", "vsock": "vsock:2:1234"}[where]
    (tmp_path / "file").write_text("")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(tmp_path / "stream"))
    monkeypatch.setenv("NOTIFY_SOCKET", target)
    try:
        with caplog.at_level(logging.DEBUG, logger="agent.sdnotify"):
            assert sdnotify.ready() is False
        assert caplog.records and all(r.levelno == logging.DEBUG for r in caplog.records)
    finally:
        stream.close()


def test_unencodable_text_never_raises(listener):
    assert sdnotify.status("bad \udcff surrogate") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "120000000")            # WatchdogSec=120
    assert sdnotify.watchdog_interval() == 60.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 60.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))    # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "x")
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None
