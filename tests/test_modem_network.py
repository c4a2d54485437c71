"""The simulated modem's network behaviour (``--network``), its re-enumeration fault
(``--fault reenumerate``), and the AT transport leaving the modem as it found it —
on real pseudo-terminals, with agent/network.py's helpers."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import threading
import time
import tty

import pytest

from agent.errors import UsageError
from agent.network import cfun_cycle, parse_registration, query_registration
from agent.sim.modem import ModemLogic, NetworkMode, parse_faults, parse_network, serve_modem
from agent.transport.at import AtPort, PortLostError
from agent.transport.open import open_transport

from conftest import ISDR_AID, FakeEuicc

pytestmark = pytest.mark.usefixtures("hang_guard")

ICCID = "8944476500001224158"          # FakeEuicc's
OTHER = "8944476500001224166"


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def modem(tmp_path):
    """modem(*faults, card=None, network=()) → a ModemServer served in a thread (stopped at
    teardown). ``card="real"``: a SimEuicc with 2 preloaded profiles."""
    started = []

    def start(*faults, card=None, network=()):
        n = len(started)
        box: dict = {}
        ready = threading.Event()

        def on_ready(server):
            box["server"] = server
            ready.set()

        def run():
            try:
                serve_modem(tmp_path / f"card{n}.json", link=str(tmp_path / f"modem{n}.tty"), preload=2,
                            faults=faults, network=network, ready=on_ready,
                            card=None if card == "real" else (card or FakeEuicc()))
            except BaseException as e:  # surface start-up errors to the test
                box["error"] = e
                ready.set()

        th = threading.Thread(target=run, daemon=True)
        th.start()
        assert ready.wait(30), "simulated modem did not start"
        if "error" in box:
            raise box["error"]
        started.append((box["server"], th))
        return box["server"]

    yield start
    for server, th in started:
        server.stop()
        th.join(5)


class Raw:
    """The modem port opened the plain way (what another program on the port sees)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        termios.tcflush(self.fd, termios.TCIOFLUSH)
        self.buf = b""

    def read_until(self, token: bytes, limit: float = 3.0) -> bytes:
        end = time.monotonic() + limit
        while token not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {token!r} within {limit} s; got {self.buf!r}")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                data = os.read(self.fd, 4096)
                if not data:
                    raise EOFError("port hung up")
                self.buf += data
        i = self.buf.index(token) + len(token)
        got, self.buf = self.buf[:i], self.buf[i:]
        return got

    def cmd(self, line: str) -> bytes:
        """Send a command; everything up to and including its final result."""
        os.write(self.fd, line.encode() + b"\r")
        out = b""
        while True:
            out += self.read_until(b"\r\n")
            if out.rstrip().endswith((b"OK", b"ERROR")) or b"+CME ERROR" in out.splitlines()[-1]:
                return out

    def close(self) -> None:
        os.close(self.fd)


def lines_of(raw: bytes) -> list[str]:
    return [x for x in raw.decode().replace("\r", "\n").split("\n") if x]


def at_port(server, tmp_path, **kw) -> AtPort:
    p = AtPort(server.link, timeout=kw.pop("timeout", 2.0), lock_dir=str(tmp_path), **kw)
    p.start()
    return p


def wait_for(cond, limit: float = 5.0, what: str = "condition"):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {limit} s")
        time.sleep(0.02)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- --network specs

def test_network_specs():
    net = parse_network([f"{ICCID}:ok", f" {OTHER}F : After=2.5 ", "89444765000012241741:never",
                         "894447650000122418:denied", "8944476500001224190:roaming", f"{ICCID}:OK"])
    assert net[ICCID] == NetworkMode("ok") and net[OTHER] == NetworkMode("after", 2.5)
    assert net["89444765000012241741"].kind == "never" and net["894447650000122418"].kind == "denied"
    assert parse_network(None) == {} and parse_network([f"{ICCID}:after=0"])[ICCID].after == 0


@pytest.mark.parametrize("spec,says", [
    (f"{ICCID}", "ICCID:ok"), ("12345:ok", "not an ICCID"), ("8944476500001224158X:ok", "not an ICCID"),
    (f"{ICCID}:sometimes", "unknown mode"), (f"{ICCID}:", "unknown mode"), (f"{ICCID}:after=-1", ">= 0"),
    (f"{ICCID}:after=soon", "number of seconds"), (f"{ICCID}:after=nan", ">= 0"),
    (f"{ICCID}:after=1e9", "at most"),
])
def test_bad_network_specs(spec, says):
    with pytest.raises(UsageError) as ei:
        parse_network([spec])
    assert ei.value.code == "bad_network" and ei.value.exit_code == 2 and says in ei.value.message
    assert spec.strip().split(":")[0][:12] in ei.value.message


def test_same_iccid_twice_with_different_modes():
    with pytest.raises(UsageError) as ei:
        parse_network([f"{ICCID}:ok", f"{ICCID}:never"])
    assert "twice" in ei.value.message


def test_cli_rejects_bad_network_with_exit_2(tmp_path, capsys, monkeypatch):
    from agent.cli import main
    monkeypatch.setenv("ESIM_AGENT_STATE_DIR", str(tmp_path / "agent-state"))
    monkeypatch.setenv("ESIM_AGENT_CONFIG", str(tmp_path / "none.toml"))
    state = tmp_path / "card.json"
    rc = main(["sim", "modem", "--state", str(state), "--network", f"{ICCID}:after=-3"])
    err = capsys.readouterr().err
    assert rc == 2 and "after=" in err and "Traceback" not in err
    assert not state.exists()                              # refused before the card was made
    rc = main(["sim", "modem", "--state", str(state), "--network", "1234:ok"])
    assert rc == 2 and "not an ICCID" in capsys.readouterr().err


def test_module_runner_rejects_bad_network(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agent.sim.modem", "--state", str(tmp_path / "c.json"),
                        "--network", f"{ICCID}:maybe"], capture_output=True, timeout=20)
    assert r.returncode == 2 and b"unknown mode 'maybe'" in r.stderr


def test_reenumerate_fault_spec():
    assert parse_faults(["reenumerate"]).reenumerate == 1.0
    assert parse_faults(["reenumerate=0.25"]).reenumerate == 0.25
    assert parse_faults([]).reenumerate is None
    for bad in ("reenumerate=-1", "reenumerate=x", "reenumerate=100"):
        with pytest.raises(UsageError):
            parse_faults([bad])


# --------------------------------------------------------------------------- the logic (no I/O, a test clock)

def test_registration_follows_the_enabled_profile_and_time():
    card, clock = FakeEuicc(), Clock()
    m = ModemLogic(card, network=[f"{ICCID}:after=5", f"{OTHER}:never"], clock=clock)
    assert m.handle("AT+CEREG?").lines == ["+CEREG: 0,2"]
    assert m.next_change() == 5.0
    clock.t += 4.9
    assert m.handle("AT+CREG?").lines == ["+CREG: 0,2"] and m.handle("AT+COPS?").lines == ["+COPS: 0"]
    clock.t += 0.1
    assert m.handle("AT+CEREG?").lines == ["+CEREG: 0,1"] and m.next_change() is None
    assert m.handle("AT+C5GREG?").lines == ["+C5GREG: 0,1"]
    assert m.handle("AT+COPS?").lines == ['+COPS: 0,0,"SIMNET",7']
    # the other profile never attaches
    card.iccid = OTHER
    clock.t += 1000
    assert m.handle("AT+CEREG?").lines == ["+CEREG: 0,2"] and m.next_change() is None
    # back to the first: its timer starts again
    card.iccid = ICCID
    assert m.handle("AT+CEREG?").lines == ["+CEREG: 0,2"] and m.next_change() == 5.0
    # no enabled profile
    card.iccid = None
    assert m.handle("AT+CEREG?").lines == ["+CEREG: 0,0"] and m.next_change() is None


def test_radio_off_and_on_restarts_registration():
    card, clock = FakeEuicc(), Clock()
    m = ModemLogic(card, network={ICCID: NetworkMode("after", 2)}, clock=clock)
    clock.t += 3
    assert m.reg_stat() == 1
    for fun in ("0", "4"):
        m.handle(f"AT+CFUN={fun}")
        assert m.handle("AT+CEREG?").lines == ["+CEREG: 0,0"]
        clock.t += 10
        assert m.reg_stat() == 0
        m.handle("AT+CFUN=1")
        assert m.reg_stat() == 2                           # searching again from now
        clock.t += 2
        assert m.reg_stat() == 1
    m.handle("AT+CFUN=1")                                  # already on: nothing restarts
    assert m.reg_stat() == 1
    m.handle("AT+CFUN=1,1")                                # a reset does
    assert m.reg_stat() == 2


def test_default_ok_denied_and_roaming():
    card = FakeEuicc()
    assert ModemLogic(card).handle("AT+CEREG?").lines == ["+CEREG: 0,1"]
    assert ModemLogic(card, network=[f"{OTHER}:never"]).reg_stat() == 1      # not named: ok
    assert ModemLogic(card, network=[f"{ICCID}:denied"]).reg_stat() == 3
    m = ModemLogic(card, network=[f"{ICCID}:roaming"])
    m.handle("AT+CEREG=2")
    assert m.handle("AT+CEREG?").lines == ['+CEREG: 2,5,"1A2B","01C2D3E4",7']
    assert m.handle("AT+COPS?").lines == ['+COPS: 0,0,"SIMNET",7']


def test_reg_modes_and_location_format():
    m = ModemLogic(FakeEuicc(), network=[f"{ICCID}:never"])
    assert m.handle("AT+CEREG=?").lines == ["+CEREG: (0-2)"]
    assert m.handle("AT+CEREG=3").final == "ERROR" and m.handle("AT+CREG").final == "ERROR"
    m.handle("AT+CEREG=2")
    assert m.handle("AT+CEREG?").lines == ["+CEREG: 2,2"]              # no location while searching
    ok = ModemLogic(FakeEuicc())
    for cmd in ("AT+CREG=2", "AT+CEREG=2", "AT+C5GREG=2"):
        assert ok.handle(cmd).final == "OK"
    assert ok.handle("AT+CREG?").lines == ['+CREG: 2,1,"1A2B","01C2D3E4",7']
    assert ok.handle("AT+C5GREG?").lines == ['+C5GREG: 2,1,"001A2B","0001C2D3E4",11']
    ok.handle("AT+CEREG=")                                            # omitted <n> is 0
    assert ok.handle("AT+CEREG?").lines == ["+CEREG: 0,1"]
    # every answer is something agent.network parses
    for tech in ("CREG", "CEREG", "C5GREG"):
        r = parse_registration(ok.handle(f"AT+{tech}?").lines[0], solicited=True)
        assert r.registered and r.tech == tech


def test_urcs_on_change_only_for_enabled_registrations():
    card, clock = FakeEuicc(), Clock()
    m = ModemLogic(card, network=[f"{ICCID}:after=1"], clock=clock)
    m.handle("AT+CEREG=1")
    m.handle("AT+CREG=2")
    assert m.poll_urcs() == []
    clock.t += 1
    assert m.poll_urcs() == ["+CEREG: 1", '+CREG: 1,"1A2B","01C2D3E4",7']
    assert m.poll_urcs() == []
    m.handle("AT+CFUN=4")
    assert m.poll_urcs() == ["+CEREG: 0", "+CREG: 0"]
    m.handle("AT+CREG=0")
    m.handle("AT+CFUN=1")
    assert m.poll_urcs() == ["+CEREG: 2"]
    assert parse_registration("+CEREG: 2", solicited=False).searching      # what agent.network reads


def test_reenumerate_answers_and_power_on():
    card = FakeEuicc()
    m = ModemLogic(card, parse_faults(["reenumerate"]))
    assert not m.handle("AT+CFUN=4").reenumerate and not m.handle("AT+CFUN=1").reenumerate
    assert m.handle("AT+CFUN=0").reenumerate and m.handle("AT+CFUN=1,1").reenumerate
    assert not ModemLogic(card).handle("AT+CFUN=0").reenumerate           # only with the fault
    for cmd in ("ATE0", "AT+CMEE=2", "AT+CEREG=2", "AT+CFUN=0", f'AT+CCHO="{ISDR_AID.hex()}"'):
        m.handle(cmd)
    resets = card.resets
    m.power_on()
    assert (m.echo, m.cmee, m.cfun, m.reg_n["+CEREG"], m.sessions) == (True, 0, 1, 0, {})
    assert card.resets == resets + 1 and card.channels == {0: None}


# --------------------------------------------------------------------------- on a pty

def test_urc_arrives_when_the_timer_runs_out(modem):
    server = modem(network=[f"{ICCID}:after=0.5"])
    raw = Raw(server.link)
    try:
        raw.cmd("ATE0")
        raw.cmd("AT+CEREG=1")
        assert "+CEREG: 1,2" in lines_of(raw.cmd("AT+CEREG?"))
        assert raw.read_until(b"+CEREG: 1\r\n", limit=5).strip() == b"+CEREG: 1"   # nothing sent: a URC
        assert "+CEREG: 1,1" in lines_of(raw.cmd("AT+CEREG?"))
        out = raw.cmd("AT+CFUN=4")                                   # the change a command makes:
        assert lines_of(out)[-1] == "OK"                             # after the final result
        assert raw.read_until(b"\r\n+CEREG: 0\r\n", limit=2)
    finally:
        raw.close()


def test_checked_switch_on_the_real_card(modem, tmp_path):
    """Enable another profile over AT: registration follows it, the agent's helpers read it."""
    from agent.apdu import Isdr
    from agent.es10 import Es10
    server = modem(card="real", network=[])
    profiles = server.card.state.profiles
    first, second = profiles[0].iccid, profiles[1].iccid
    assert server.card.enabled_iccid() == first
    server.logic.network = parse_network([f"{second}:never", f"{first}:after=0.3"])
    t = open_transport(server.link, transport="cgla", timeout=3.0, lock_dir=str(tmp_path))
    try:
        t.port.command("AT+CEREG=1")
        # the first one registers 0.3 s after the network was set (opening the port may be quicker)
        wait_for(lambda: query_registration(t.port).registered, what="registration on the first profile")
        with Isdr(t) as isdr:
            Es10(isdr).enable_profile(second, refresh=False)
        assert server.card.enabled_iccid() == second
        r = query_registration(t.port)
        assert r.tech == "CEREG" and r.stat == 2 and not r.registered
        assert "+CEREG: 2" in t.port.urcs                              # the change was reported
        # (the first registration may have sent its own +CEREG: 1 already: count the new ones)
        before = list(t.port.urcs).count("+CEREG: 1")
        with Isdr(t) as isdr:
            Es10(isdr).enable_profile(first, refresh=False)
        assert query_registration(t.port).stat == 2                    # after=0.3: searching first ...
        # the modem says so on its own when the timer runs out (seen between commands)
        wait_for(lambda: t.port.command("AT") and list(t.port.urcs).count("+CEREG: 1") > before,
                 what="the +CEREG: 1 URC")
        assert query_registration(t.port).registered
    finally:
        t.close()


def test_query_registration_against_the_modem(modem, tmp_path):
    server = modem(network=[f"{ICCID}:denied"])
    with AtPort(server.link, timeout=2.0, lock_dir=str(tmp_path)) as p:
        p.start()
        r = query_registration(p)
        assert r.denied and r.tech == "CEREG" and r.n == 0
        p.command("AT+CFUN=0")
        assert query_registration(p).stat == 0
        p.command("AT+CFUN=1")
        cfun_cycle(p, timeout=2.0)                                    # no re-enumeration: just works
        assert query_registration(p).stat == 3 and server.logic.cfun == 1


# --------------------------------------------------------------------------- re-enumeration

def test_reenumeration_on_cfun0(modem, tmp_path):
    server = modem("reenumerate=0.3")
    card = server.card
    link, old_path = server.link, server.path
    t = open_transport(link, transport="cgla", timeout=2.0, lock_dir=str(tmp_path))
    t.open_channel(ISDR_AID)
    assert card.channels[1] == "isdr"
    with pytest.raises(PortLostError) as ei:
        cfun_cycle(t.port, timeout=2.0)
    assert ei.value.code == "port_lost" and ei.value.exit_code == 3
    assert not os.path.lexists(link) or os.readlink(link) != old_path        # gone (or already new)
    # the old port is dead for good: another read on it ends at once
    with pytest.raises(PortLostError):
        t.port.command("AT", timeout=1.0)
    # the new port appears, the link points at it (we still hold the old one: another pty)
    wait_for(lambda: os.path.islink(link) and os.readlink(link) != old_path, what="the new port")
    assert server.enumerations == 1 and os.readlink(link) == server.path != old_path
    t.close()                                                     # no exception, lock released
    assert t.port.closed
    # power-on state: CFUN=1, card reset, echo on, CMEE=0
    assert server.logic.cfun == 1 and card.channels == {0: None}
    raw = Raw(link)
    try:
        assert b"AT\r" in raw.cmd("AT")                              # echo on again
        assert "+CMEE: 0" in lines_of(raw.cmd("AT+CMEE?"))
        assert "+CFUN: 1" in lines_of(raw.cmd("AT+CFUN?"))
    finally:
        raw.close()
    t2 = open_transport(link, transport="cgla", timeout=2.0, lock_dir=str(tmp_path))
    try:
        assert t2.open_channel(ISDR_AID) == 1
    finally:
        t2.close()


def test_reenumeration_on_reset_and_the_host_sees_hangup(modem, tmp_path):
    server = modem("reenumerate=0.2")
    link, old_path = server.link, server.path
    raw = Raw(link)
    try:
        os.write(raw.fd, b"AT+CFUN=1,1\r")
        with pytest.raises((EOFError, OSError)):                       # hung up: EOF / EIO
            raw.read_until(b"never", limit=3)
        with pytest.raises(OSError):
            os.write(raw.fd, b"AT\r")
        wait_for(lambda: server.enumerations == 1 and os.path.islink(link), what="the new port")
        assert os.readlink(link) == server.path != old_path
    finally:
        raw.close()
    with AtPort(link, timeout=2.0, lock_dir=str(tmp_path)) as p:
        p.start()
        assert p.query("AT+CFUN?", "+CFUN:") == "1"


def test_a_client_reopening_during_the_gap_finds_nothing_then_the_new_port(modem, tmp_path):
    server = modem("reenumerate")
    link = server.link
    with AtPort(link, timeout=2.0, lock_dir=str(tmp_path)) as p:
        p.start()
        try:
            p.command("AT+CFUN=0")
        except PortLostError:           # gone before we read the OK (a slow host)
            pass
        wait_for(lambda: not os.path.lexists(link), limit=2, what="the link going away")
    from agent.errors import TransportError
    with pytest.raises(TransportError) as ei:
        AtPort(link, timeout=1.0, lock_dir=str(tmp_path))
    assert ei.value.code == "device_not_found"
    wait_for(lambda: os.path.islink(link), what="the link coming back")
    with AtPort(link, timeout=2.0, lock_dir=str(tmp_path)) as p:
        p.start()
        assert p.query("AT+CGMM", "+CGMM:") == "SIMMODEM-1"


# --------------------------------------------------------------------------- leaving the modem as found

def test_at_port_restores_echo_and_cmee(modem, tmp_path):
    server = modem()
    assert server.logic.echo is True and server.logic.cmee == 0     # power-on defaults
    p = at_port(server, tmp_path)
    assert p._echo_before is True and server.logic.echo is False and server.logic.cmee == 1
    p.close()
    assert server.logic.echo is True and server.logic.cmee == 0
    raw = Raw(server.link)
    try:
        assert lines_of(raw.cmd("AT")) == ["AT", "OK"]                # echo is back
        assert lines_of(raw.cmd("AT+CMEE?"))[-2:] == ["+CMEE: 0", "OK"]
        # another program leaves echo off and verbose errors on: we leave it so too
        raw.cmd("ATE0")
        raw.cmd("AT+CMEE=2")
    finally:
        raw.close()
    p = at_port(server, tmp_path)
    assert p._echo_before is False
    p.close()
    raw = Raw(server.link)
    try:
        assert lines_of(raw.cmd("AT")) == ["OK"]
        assert lines_of(raw.cmd("AT+CMEE?")) == ["+CMEE: 2", "OK"]
    finally:
        raw.close()


def test_open_transport_restores_echo_too(modem, tmp_path):
    server = modem("urc")
    t = open_transport(server.link, transport="auto", timeout=2.0, lock_dir=str(tmp_path))
    t.close()
    assert server.logic.echo is True and server.logic.cmee == 0
