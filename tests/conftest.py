"""Shared pytest fixtures. Add yours below with a clear name and a docstring.

AT / modem fixtures (H2): ``fake_euicc``, ``sim_modem``, ``hang_guard``.
CLI fixtures (H9): ``shared_sim_modem`` (module-scoped, read-only tests).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest

ISDR_AID = bytes.fromhex("A0000005591010FFFFFFFF8900000100")


@pytest.fixture(autouse=True, scope="session")
def private_lock_dir(tmp_path_factory):
    """Port lock files of this test run in a directory of its own: pty numbers are reused,
    and a lock left in /run/lock by another run (or a leaked process) must not make a
    test's fresh pty look busy. Child processes (daemon, CLI) inherit it."""
    d = tmp_path_factory.mktemp("locks")
    old = os.environ.get("ESIM_AGENT_LOCK_DIR")
    os.environ["ESIM_AGENT_LOCK_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("ESIM_AGENT_LOCK_DIR", None)
    else:
        os.environ["ESIM_AGENT_LOCK_DIR"] = old


class FakeEuicc:
    """A tiny ISO 7816-4 card for transport tests (no ES10, no crypto).

    MANAGE CHANNEL open → lowest free channel + 9000, close → 9000; SELECT of
    the ISD-R AID → 9000, other AIDs → 6A88; any other command on a channel
    with the ISD-R selected → CLA as the card saw it + the command data + 9000
    (so tests can check both the channel encoding and the payload).
    """

    def __init__(self, *, isdr: bool = True, iccid: str | None = "8944476500001224158",
                 eid: str = "89049032123451234512345678901235"):
        self.has_isdr = isdr
        self.iccid = iccid
        self.eid = eid
        self.channels: dict[int, str | None] = {0: None}
        self.log: list[bytes] = []
        self.resets = 0

    @staticmethod
    def _sw(sw: int) -> bytes:
        return sw.to_bytes(2, "big")

    def apdu(self, c: bytes) -> bytes:
        c = bytes(c)
        self.log.append(c)
        if len(c) < 4:
            return self._sw(0x6700)
        cla, ins, p1, p2 = c[:4]
        ch = 4 + (cla & 0x0F) if cla & 0x40 else cla & 0x03
        if ch not in self.channels:
            return self._sw(0x6881)
        data = c[5:5 + c[4]] if len(c) > 5 else b""
        if ins == 0x70:
            if p1 == 0x00:
                free = [n for n in range(1, 20) if n not in self.channels]
                if not free:
                    return self._sw(0x6A81)
                self.channels[free[0]] = None
                return bytes([free[0]]) + self._sw(0x9000)
            target = p2 or ch
            if target == 0 or target not in self.channels:
                return self._sw(0x6881)
            del self.channels[target]
            return self._sw(0x9000)
        if ins == 0xA4:
            if self.has_isdr and data == ISDR_AID:
                self.channels[ch] = "isdr"
                return self._sw(0x9000)
            return self._sw(0x6A88)
        if ch != 0 and self.channels[ch] != "isdr":
            return self._sw(0x6985)
        return bytes([cla]) + data + self._sw(0x9000)

    def reset(self) -> None:
        self.channels = {0: None}
        self.resets += 1

    def enabled_iccid(self) -> str | None:
        return self.iccid


@pytest.fixture
def fake_euicc() -> FakeEuicc:
    """A FakeEuicc (ISD-R present, one enabled ICCID)."""
    return FakeEuicc()


@pytest.fixture
def sim_modem(tmp_path):
    """Factory: ``sim_modem(*faults, card=None, baud=None, link=None)`` serves
    agent.sim.modem on a real pty in a thread and returns the ModemServer
    (``.path``, ``.link``, ``.card``, ``.logic``). ``card`` defaults to a
    FakeEuicc; pass ``card="real"`` for a SimEuicc with 2 preloaded profiles.
    Every server is stopped at teardown."""
    started = []

    def start(*faults, card=None, baud=None, link=None):
        n = len(started)
        link = link or str(tmp_path / f"modem{n}.tty")
        if card is None:
            card = FakeEuicc()
        elif card == "real":
            card = None
        server, th = _serve_in_thread(tmp_path / f"card{n}.json", link, faults, card, baud=baud)
        started.append((server, th))
        return server

    yield start
    for server, th in started:
        server.stop()
        th.join(5)


class _Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "test"):
    """Fail (raise) instead of hanging when the block runs longer than ``seconds``
    (pytest-timeout is not installed). SIGALRM: main thread only, elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _Hang(f"{what} exceeded {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def hang_guard():
    """Fail a test that runs longer than 15 s instead of hanging the suite."""
    with time_limit(15.0, "test (hang guard)"):
        yield


def _serve_in_thread(state_path, link, faults, card, *, baud=None, preload=2):
    """Start agent.sim.modem's serve_modem in a daemon thread; return (server, thread)."""
    from agent.sim.modem import serve_modem

    box: dict = {}
    ready = threading.Event()

    def on_ready(server):
        box["server"] = server
        ready.set()

    def run():
        try:
            serve_modem(state_path, link=link, preload=preload, baud=baud, faults=faults, ready=on_ready, card=card)
        except BaseException as e:  # surface start-up errors to the test
            box["error"] = e
            ready.set()

    th = threading.Thread(target=run, name=f"sim-modem-{os.path.basename(str(link))}", daemon=True)
    th.start()
    if not ready.wait(30):
        raise RuntimeError("simulated modem did not start within 30 s")
    if "error" in box:
        raise box["error"]
    return box["server"], th


@pytest.fixture(scope="module")
def shared_sim_modem(tmp_path_factory):
    """Module-scoped ``sim_modem`` for tests that do not change the card (H9):
    ``shared_sim_modem(*faults)`` returns a ModemServer in front of a real
    SimEuicc with 2 preloaded profiles, one per distinct fault set per module
    (the same server for the same faults). Tests that enable, delete, reset ...
    must use the function-scoped ``sim_modem(..., card="real")`` instead."""
    base = tmp_path_factory.mktemp("shared-modem")
    servers: dict = {}

    def get(*faults):
        key = tuple(faults)
        if key not in servers:
            n = len(servers)
            servers[key] = _serve_in_thread(base / f"card{n}.json", str(base / f"modem{n}.tty"), faults, None)
        return servers[key][0]

    yield get
    for server, th in servers.values():
        server.stop()
        th.join(5)
