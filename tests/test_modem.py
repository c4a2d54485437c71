"""End to end: the AT transports (agent/transport/*) against the simulated modem
(agent/sim/modem.py) on a real pseudo-terminal, with every fault it injects."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agent.apdu import Isdr, cla_for
from agent.errors import PortBusyError, StatusWordError, TimeoutError_, TransportError, UsageError
from agent.ids import luhn_valid
from agent.transport.at import AtPort, ModemCmeError, ModemError
from agent.transport.cgla import CglaTransport
from agent.transport.csim import CsimTransport
from agent.transport.open import modem_info, open_transport

from conftest import ISDR_AID, FakeEuicc

pytestmark = pytest.mark.usefixtures("hang_guard")

BOTH = ["csim", "cgla"]


@pytest.fixture
def connect(tmp_path):
    """connect(server, transport, **kw) → an open transport (closed at teardown)."""
    opened = []

    def open_(server, transport="auto", **kw):
        kw.setdefault("timeout", 2.0)
        kw.setdefault("lock_dir", str(tmp_path))
        t = open_transport(server.link, transport=transport, **kw)
        opened.append(t)
        return t

    yield open_
    for t in opened:
        t.close()


def roundtrip(t, ch: int, payload: bytes) -> None:
    """One APDU on the channel; the fake card echoes CLA + data."""
    cla = cla_for(0x80, ch)
    r = t.transmit(bytes([cla, 0xCA, 0x00, 0x00, len(payload)]) + payload)
    assert r[-2:] == b"\x90\x00"
    assert r[1:-2] == payload
    return r[0]


def card_channel(t, ch: int) -> int:
    """The channel the card saw for the caller's channel ``ch`` (from the echoed CLA)."""
    from agent.transport.csim import channel_of
    return channel_of(roundtrip(t, ch, b"\x01\x02"))


# --------------------------------------------------------------------------- basics

@pytest.mark.parametrize("tr", BOTH)
def test_transport_basics(sim_modem, connect, tr):
    server = sim_modem()
    card = server.card
    t = connect(server, tr)
    assert t.name == tr and isinstance(t, CglaTransport if tr == "cgla" else CsimTransport)
    ch = t.open_channel(ISDR_AID)
    assert ch == 1 and card.channels[1] == "isdr"
    for n in (1, 100, 250):
        roundtrip(t, ch, bytes(range(n % 256))[:n] if n < 256 else bytes(n))
    assert card_channel(t, ch) == 1
    before = t.stats.apdus
    roundtrip(t, ch, b"\xAA")
    assert t.stats.apdus == before + 1 and t.stats.at_commands > 5
    assert t.stats.bytes_out > 500 and t.stats.bytes_in > 500
    assert t.quirks["max_apdu"] is None and "no_prefix" in t.quirks
    t.close_channel(ch)
    assert card.channels == {0: None}
    t.close()
    t.close()                                                      # idempotent


@pytest.mark.parametrize("tr", BOTH)
def test_unknown_aid_is_6a88(sim_modem, connect, tr):
    server = sim_modem(card=FakeEuicc(isdr=False))
    t = connect(server, tr)
    with pytest.raises(StatusWordError) as ei:
        t.open_channel(ISDR_AID)
    assert ei.value.sw == 0x6A88
    assert server.card.channels == {0: None}


def test_auto_prefers_cgla_and_falls_back_to_csim(sim_modem, connect):
    assert connect(sim_modem(), "auto").name == "cgla"
    # =? answered ERROR: the real AT+CCHO decides
    lines = []
    t = connect(sim_modem("no-test-forms"), "auto", trace=lambda d, x: lines.append((d, x)))
    assert t.name == "cgla"
    assert ("AT>", f'AT+CCHO="{ISDR_AID.hex().upper()}"') in lines
    # the real AT+CCHO fails (no ISD-R behind it): AT+CSIM
    t = connect(sim_modem("no-test-forms", card=FakeEuicc(isdr=False)), "auto")
    assert t.name == "csim"


def test_forced_transport_and_bad_arguments(sim_modem, connect, tmp_path):
    server = sim_modem()
    assert connect(server, "csim").name == "csim"
    with pytest.raises(UsageError):
        open_transport(server.link, transport="qmi")
    with pytest.raises(UsageError):
        open_transport(server.link, quirks={"bogus": 1})


def test_cla_channels_4_to_19_over_csim(sim_modem, connect):
    server = sim_modem()
    t = connect(server, "csim")
    chans = [t.open_channel(ISDR_AID) for _ in range(6)]
    assert chans == [1, 2, 3, 4, 5, 6]
    for ch in chans:
        assert card_channel(t, ch) == ch
    t.close()
    assert server.card.channels == {0: None}                      # all closed by close()


# --------------------------------------------------------------------------- faults tolerated

TOLERATED = [("echo",), ("urc",), ("lowercase",), ("no-prefix",), ("no-test-forms",), ("garbage",),
             ("echo", "urc", "lowercase", "garbage", "no-prefix")]


@pytest.mark.parametrize("tr", BOTH)
@pytest.mark.parametrize("faults", TOLERATED, ids="+".join)
def test_tolerated_faults(sim_modem, connect, tr, faults):
    server = sim_modem(*faults)
    t = connect(server, tr)
    ch = t.open_channel(ISDR_AID)
    for n in (3, 120):
        roundtrip(t, ch, bytes([n]) * n)
    if "urc" in faults:
        assert any(u.startswith(("+CEREG", "+QUSIM", "+CPIN", "RDY", "+QIND", "^SYS", "+CREG")) for u in t.urcs)
    if "no-prefix" in faults:
        assert t.quirks["no_prefix"] is True                       # learnt
    t.close()
    assert server.card.channels == {0: None}


def test_no_prefix_refused_when_quirk_forced_off(sim_modem, connect):
    from agent.errors import ProtocolError
    server = sim_modem("no-prefix")
    t = connect(server, "csim", quirks={"no_prefix": False})
    with pytest.raises(ProtocolError) as ei:
        t.open_channel(ISDR_AID)
    assert ei.value.code == "missing_prefix" and "no_prefix" in ei.value.message


def test_opaque_session_id_keeps_channel_bits_zero(sim_modem, connect):
    server = sim_modem("opaque-session")
    t = connect(server, "cgla")
    ch = t.open_channel(ISDR_AID)
    assert ch == 0                                                  # the MT patches CLA (TS 27.007 §8.45)
    sid = t.session_ids[0]
    assert len(sid) == 16
    assert card_channel(t, ch) == 1                                # the card saw channel 1 anyway
    t.close()
    assert server.card.channels == {0: None}


def test_session_id_in_cla_can_be_switched_off(sim_modem, connect):
    server = sim_modem()
    t = connect(server, "cgla", quirks={"cgla_channel_in_cla": False})
    ch = t.open_channel(ISDR_AID)
    assert ch == 0 and card_channel(t, ch) == 1


# --------------------------------------------------------------------------- faults that fail cleanly

@pytest.mark.parametrize("tr", BOTH)
def test_error_at_n_then_recovers(sim_modem, connect, tr):
    server = sim_modem("error@3")                                   # csim: MC, SELECT, #3; cgla: #3
    t = connect(server, tr)
    ch = t.open_channel(ISDR_AID)
    done = 2 if tr == "csim" else 0
    for _ in range(2 - done):
        roundtrip(t, ch, b"\x11")
    with pytest.raises(ModemError) as ei:
        roundtrip(t, ch, b"\x22")
    assert ei.value.code == "modem_error" and ei.value.exit_code == 3
    assert "AT+C" in ei.value.message and "ERROR" in ei.value.message
    roundtrip(t, ch, b"\x33")                                       # next command fine


@pytest.mark.parametrize("tr", BOTH)
@pytest.mark.parametrize("code,expect", [("14", 14), ("SIM busy", "SIM busy")])
def test_cme_at_n(sim_modem, connect, tr, code, expect):
    server = sim_modem(f"cme={code}@3")
    t = connect(server, tr)
    ch = t.open_channel(ISDR_AID)
    for _ in range(2 if tr == "cgla" else 0):
        roundtrip(t, ch, b"\x11")
    with pytest.raises(ModemCmeError) as ei:
        roundtrip(t, ch, b"\x22")
    assert ei.value.cme == expect and ei.value.code == "modem_cme_error"
    assert "SIM busy" in ei.value.message                           # 14 is explained too
    roundtrip(t, ch, b"\x33")


@pytest.mark.parametrize("tr", BOTH)
def test_silent_times_out_resyncs_and_reopens(sim_modem, connect, tr):
    server = sim_modem("silent@3")
    t = connect(server, tr, timeout=0.5)
    ch = t.open_channel(ISDR_AID)
    for _ in range(2 if tr == "cgla" else 0):
        roundtrip(t, ch, b"\x11")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError_) as ei:
        roundtrip(t, ch, b"\x22")
    took = time.monotonic() - t0
    assert 0.5 <= took < 3.0
    name = "AT+CGLA" if tr == "cgla" else "AT+CSIM"
    assert ei.value.message.startswith(f"modem did not answer {name} within 0.5 s; port re-synchronised")
    assert "logical channel 1 re-opened" in ei.value.message and ei.value.exit_code == 3
    roundtrip(t, ch, b"\x33")                                       # the daemon can carry on
    assert card_channel(t, ch) in server.card.channels and len(server.card.channels) == 2
    t.close()
    assert server.card.channels == {0: None}


@pytest.mark.parametrize("tr", BOTH)
def test_delay_within_deadline(sim_modem, connect, tr):
    server = sim_modem("delay=0.3")
    t = connect(server, tr, timeout=2.0)
    ch = t.open_channel(ISDR_AID)
    t0 = time.monotonic()
    roundtrip(t, ch, b"\x01")
    assert 0.3 <= time.monotonic() - t0 < 1.5


@pytest.mark.parametrize("tr", BOTH)
def test_late_answer_is_not_taken_for_the_next_one(sim_modem, connect, tr):
    server = sim_modem("delay=0.8@3")
    t = connect(server, tr, timeout=0.3)
    ch = t.open_channel(ISDR_AID)
    for _ in range(2 if tr == "cgla" else 0):
        roundtrip(t, ch, b"\x11")
    with pytest.raises(TimeoutError_):
        roundtrip(t, ch, b"\x22")
    for n in range(3):                                               # each answer matches its request
        roundtrip(t, ch, bytes([0x40 + n]) * (n + 1))


@pytest.mark.parametrize("tr", BOTH)
def test_max_apdu(sim_modem, connect, tr):
    server = sim_modem("max-apdu=25")                               # SELECT ISD-R is 22 bytes
    t = connect(server, tr)
    ch = t.open_channel(ISDR_AID)
    roundtrip(t, ch, bytes(20))                                     # 25 bytes: fine
    with pytest.raises(ModemCmeError) as ei:
        roundtrip(t, ch, bytes(21))
    assert ei.value.cme == 3
    roundtrip(t, ch, bytes(20))
    t2 = connect(sim_modem("max-apdu=25"), tr, quirks={"max_apdu": 25})
    ch2 = t2.open_channel(ISDR_AID)
    with pytest.raises(TransportError) as ei:
        roundtrip(t2, ch2, bytes(21))
    assert ei.value.code == "apdu_too_long"                         # refused before the modem sees it


def test_terminal_capability_quirk(sim_modem, connect):
    server = sim_modem()
    connect(server, "csim", quirks={"terminal_capability": True})
    assert bytes.fromhex("80AA00000AA9088100820101830107") in server.card.log


# --------------------------------------------------------------------------- port handling

def test_busy_port(sim_modem, connect, tmp_path):
    server = sim_modem()
    connect(server, "csim")
    with pytest.raises(PortBusyError) as ei:
        open_transport(server.link, transport="csim", timeout=1.0, lock_dir=str(tmp_path))
    assert "ModemManager" in ei.value.message and "ID_MM_PORT_IGNORE" in ei.value.message
    assert ei.value.exit_code == 3
    # the pyserial exclusive flock alone also refuses (different lock dir)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(PortBusyError):
        open_transport(server.link, transport="csim", timeout=1.0, lock_dir=str(other))


def test_default_lock_dir_keyed_by_realpath(sim_modem):
    server = sim_modem()
    with AtPort(server.link, timeout=1.0) as p:
        assert p._lock.path.endswith(".lock")
        assert server.path.strip("/").replace("/", "_") in p._lock.path
        with pytest.raises(PortBusyError):
            AtPort(server.path, timeout=1.0)                        # same device, other name


def test_missing_device(tmp_path):
    with pytest.raises(TransportError) as ei:
        open_transport(str(tmp_path / "ttyUSB9"))
    assert ei.value.code == "device_not_found" and "ttyUSB9" in ei.value.message
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(TransportError) as ei:
        open_transport(str(tmp_path / "dangling"))
    assert ei.value.code == "device_not_found"


def test_silent_port_is_a_timeout_not_a_hang(tmp_path):
    master, slave = os.openpty()                                   # nobody answers on the other side
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError_) as ei:
            open_transport(os.ttyname(slave), timeout=0.2, lock_dir=str(tmp_path))
        assert time.monotonic() - t0 < 3 and "AT port" in ei.value.message
    finally:
        os.close(master)
        os.close(slave)


def test_reconnect_after_client_close(sim_modem, connect):
    server = sim_modem()
    for _ in range(3):
        t = connect(server, "cgla")
        roundtrip(t, t.open_channel(ISDR_AID), b"\x01")
        t.close()
    assert server.card.channels == {0: None}


def test_channel_closed_on_ctrl_c(sim_modem, connect):
    server = sim_modem()
    with pytest.raises(KeyboardInterrupt):
        with connect(server, "cgla") as t:
            t.open_channel(ISDR_AID)
            raise KeyboardInterrupt
    assert server.card.channels == {0: None}


def test_modem_info(sim_modem, connect, tmp_path):
    server = sim_modem("urc", "echo")
    info = connect(server, "csim").modem_info()
    assert info.manufacturer == "esim-agent" and info.model == "SIMMODEM-1"
    assert info.iccid == "8944476500001224158"
    assert len(info.imei) == 15 and luhn_valid(info.imei)
    server2 = sim_modem(card=FakeEuicc(iccid=None))
    info2 = modem_info(server2.link, timeout=1.0, lock_dir=str(tmp_path))
    assert info2.iccid is None and info2.imei == server2.logic.imei


# --------------------------------------------------------------------------- line speed

def test_baud_pacing(sim_modem, connect):
    baud = 38400
    server = sim_modem(baud=baud)
    t = connect(server, "cgla")
    ch = t.open_channel(ISDR_AID)
    b0 = t.stats.bytes_in + t.stats.bytes_out
    t0 = time.monotonic()
    for _ in range(3):
        roundtrip(t, ch, bytes(200))
    took = time.monotonic() - t0
    bound = (t.stats.bytes_in + t.stats.bytes_out - b0) * 10 / baud
    assert bound > 0.3
    # The line time is a floor the emulation must respect; the ceiling only catches a
    # grossly wrong pacing (the speed target itself is `esim-agent bench download`'s job).
    assert bound * 0.95 <= took <= bound * 2 + 0.5, (took, bound)


# --------------------------------------------------------------------------- with the real simulated eUICC

@pytest.mark.parametrize("tr", BOTH)
def test_real_sim_euicc_eid(sim_modem, connect, tr):
    server = sim_modem("urc", "echo", card="real")
    t = connect(server, tr)
    with Isdr(t, aids=[ISDR_AID]) as isdr:
        r = isdr.store_data(bytes.fromhex("BF3E035C015A"))
    assert r[:5] == bytes.fromhex("BF3E125A10") and r[5:].hex() == server.card.eid
    assert server.card._channels.keys() == {0}


def test_module_runner_subprocess(tmp_path):
    """`python -m agent.sim.modem` serves, answers AT, removes its link on SIGTERM."""
    link = tmp_path / "dev" / "modem.tty"
    link.parent.mkdir()                   # --link does not create missing directories (issue 9 item 7)
    state = tmp_path / "card.json"
    proc = subprocess.Popen([sys.executable, "-m", "agent.sim.modem", "--state", str(state), "--link", str(link),
                             "--fault", "echo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        path = proc.stdout.readline().decode().strip()
        assert path.startswith("/dev/pts/") and os.readlink(link) == path
        with AtPort(str(link), timeout=2.0, lock_dir=str(tmp_path)) as p:
            p.start()
            assert p.query("AT+CGMM", "+CGMM:") == "SIMMODEM-1"
        proc.terminate()
        assert proc.wait(5) == 0
        assert not os.path.lexists(link)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_module_runner_rejects_bad_fault(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agent.sim.modem", "--state", str(tmp_path / "c.json"),
                        "--fault", "explode"], capture_output=True, timeout=20)
    assert r.returncode == 2 and b"unknown modem fault 'explode'" in r.stderr


def test_stale_link_replaced(sim_modem, tmp_path):
    link = tmp_path / "stale.tty"
    os.symlink("/dev/pts/nonexistent", link)
    server = sim_modem(link=str(link))
    assert os.readlink(link) == server.path
    server.stop()


@pytest.mark.parametrize("tr", BOTH)
def test_interrupted_command_answer_is_not_taken_for_the_next(sim_modem, connect, tr):
    """Ctrl-C while waiting for an APDU's answer: the next command (e.g. the CancelSession
    the download flow sends at once) must get its own answer, not the late one."""
    server = sim_modem("delay=0.4@3")          # the 3rd APDU-carrying command answers late
    t = connect(server, tr, timeout=2.0)
    ch = t.open_channel(ISDR_AID)
    armed = {"on": False}

    def trace(direction, data):
        if armed["on"] and direction == "AT>" and ("CGLA=" in str(data) or "CSIM=" in str(data)):
            armed["on"] = False
            raise KeyboardInterrupt
    roundtrip(t, ch, b"\x01")
    if tr == "cgla":
        roundtrip(t, ch, b"\x02")
    t.trace = trace
    t.port.trace = trace
    armed["on"] = True
    with pytest.raises(KeyboardInterrupt):
        roundtrip(t, ch, b"\x03")                # interrupted while the modem holds the answer
    assert roundtrip(t, ch, b"\x04") is not None  # echoes \x04, not the late \x03


def test_auto_probe_session_is_reused_not_leaked(sim_modem, connect):
    """Without =? forms the auto probe opens a real AT+CCHO session on the ISD-R; the
    transport adopts it instead of opening a second one (a modem without AT+CCHC could
    never close the probe's)."""
    server = sim_modem("no-test-forms")
    t = connect(server, "auto", quirks={"no_cchc": True})
    assert t.name == "cgla"
    ch = t.open_channel(ISDR_AID)
    roundtrip(t, ch, b"\x01")
    assert len(server.card.channels) == 2          # the basic channel + the one session, no leak
    t.close()
    server2 = sim_modem("no-test-forms")
    t2 = connect(server2, "auto")                  # with CCHC: an unused probe session is closed
    t2.close()
    assert server2.card.channels == {0: None}
