"""AT line protocol (agent/transport/at.py), CLA helpers, quirks, fault specs,
DirectTransport — everything that needs no pseudo-terminal."""
from __future__ import annotations

import pytest

from agent.apdu import cla_for
from agent.errors import ProtocolError, TransportError, UsageError
from agent.transport import quirks
from agent.transport.at import (Collector, LineSplitter, ModemCmeError, ModemCmsError, ModemError, Stats,
                                command_name, error_from_final, parse_len_hex)
from agent.transport.csim import channel_of, rechannel
from agent.transport.direct import DirectTransport
from agent.sim.modem import Faults, ModemLogic, imei_for, parse_faults
from agent.ids import luhn_valid

from conftest import ISDR_AID, FakeEuicc

pytestmark = pytest.mark.usefixtures("hang_guard")


def collect(cmd, data: bytes, prefix=None, bare=None):
    """Feed raw modem bytes through splitter + collector; return (reply, final_seen)."""
    sp = LineSplitter()
    c = Collector(cmd, prefix, bare)
    done = False
    for line in sp.feed(data):
        if done:
            c.reply.urcs.append(line)
            continue
        done = c.add(line)
    return c.reply, done


# --------------------------------------------------------------------------- splitter

def test_splitter_line_endings_and_split_reads():
    sp = LineSplitter()
    assert sp.feed(b"\r\n+CSIM: 6,\"01") == []
    assert sp.feed(b"9000\"\r") == ['+CSIM: 6,"019000"']
    assert sp.feed(b"\nOK\nRDY\rX") == ["OK", "RDY"]          # LF-only and CR-only endings
    assert sp.feed(b"Y\r\n") == ["XY"]


def test_splitter_drops_binary_garbage():
    sp = LineSplitter()
    lines = sp.feed(b"\x00\xff\xfe\r\n\xc3\x80\x00+CSIM: 4,\"9000\"\xff\r\n\x00\x00\r\nOK\r\n")
    assert lines == ['+CSIM: 4,"9000"', "OK"]


def test_splitter_bounds_line_length():
    sp = LineSplitter(max_line=64)
    assert sp.feed(b"A" * 100) == []           # partial line over the limit is dropped ...
    assert sp.feed(b"\r\nOK\r\n") == ["OK"]     # ... and parsing continues
    assert sp.dropped == 1
    assert sp.feed(b"B" * 65 + b"\r\nOK\r\n") == ["OK"]
    assert sp.dropped == 2


# --------------------------------------------------------------------------- collector

def test_echo_is_dropped_and_prefix_matched():
    cmd = 'AT+CSIM=10,"0070000001"'
    r, done = collect(cmd, f'{cmd}\r\r\n+CSIM: 6,"019000"\r\n\r\nOK\r\n'.encode(), "+CSIM:", "hex")
    assert done and r.ok
    assert r.lines == ['6,"019000"'] and r.urcs == [] and r.bare == []


def test_urcs_interleaved_are_set_aside():
    cmd = 'AT+CGLA=1,10,"01C0000015"'
    data = (b'\r\n+CEREG: 1,"1A2B","01C2D3E4",7\r\nRDY\r\n+CGLA: 4,"9000"\r\n'
            b'\r\n+QIND: "csq",20,99\r\n^SYSSTART\r\n+CPIN: READY\r\nOK\r\n')
    r, done = collect(cmd, data, "+CGLA:", "hex")
    assert done and r.lines == ['4,"9000"']
    assert r.urcs == ['+CEREG: 1,"1A2B","01C2D3E4",7', "RDY", '+QIND: "csq",20,99', "^SYSSTART",
                      "+CPIN: READY"]


def test_cme_numeric_text_and_cms():
    r, done = collect("AT+CSIM=4,\"0000\"", b"\r\n+CME ERROR: 3\r\n", "+CSIM:", "hex")
    assert done and not r.ok
    e = error_from_final(r.command, r.final)
    assert isinstance(e, ModemCmeError) and isinstance(e, TransportError)
    assert e.cme == 3 and e.code == "modem_cme_error" and e.exit_code == 3
    assert "+CME ERROR: 3" in e.message and "AT+CSIM" in e.message and "0000" not in e.message

    r, _ = collect("AT+CCHO=\"A0\"", b"\r\n+CME ERROR: SIM busy\r\n", "+CCHO:")
    e = error_from_final(r.command, r.final)
    assert isinstance(e, ModemCmeError) and e.cme == "SIM busy" and "SIM busy" in e.message

    r, _ = collect("AT+CMGS=1", b"\r\n+CMS ERROR: 304\r\n")
    e = error_from_final(r.command, r.final)
    assert isinstance(e, ModemCmsError) and e.cms == 304 and e.code == "modem_cms_error"

    r, _ = collect("AT+CGLA=1,4,\"0000\"", b"\r\nERROR\r\n", "+CGLA:")
    e = error_from_final(r.command, r.final)
    assert type(e) is ModemError and e.code == "modem_error" and "ERROR" in e.message


def test_bare_values_only_when_hex_or_digits():
    r, _ = collect('AT+CCHO="A000"', b"\r\n1\r\nOK\r\n", "+CCHO:", "hex")
    assert r.lines == [] and r.bare == ["1"]
    r, _ = collect('AT+CGLA=1,4,"0000"', b'\r\n4,"9000"\r\nOK\r\n', "+CGLA:", "hex")
    assert r.bare == ['4,"9000"']
    r, _ = collect('AT+CGLA=1,4,"0000"', b"\r\nhello world\r\nOK\r\n", "+CGLA:", "hex")
    assert r.bare == [] and r.urcs == ["hello world"]
    # without the bare mode even a hex line is not an answer
    r, _ = collect('AT+CCHO="A000"', b"\r\n1\r\nOK\r\n", "+CCHO:")
    assert r.bare == [] and r.urcs == ["1"]


def test_text_mode_ignores_urcs_for_identity_reads():
    r, _ = collect("AT+CGMI", b"\r\n+CREG: 1\r\nRDY\r\nQuectel\r\n^BOOT\r\nOK\r\n", "+CGMI:", "text")
    assert r.bare == ["Quectel"] and r.urcs == ["+CREG: 1", "RDY", "^BOOT"]


def test_parse_len_hex_forms():
    assert parse_len_hex('6,"019000"', "+CSIM") == bytes.fromhex("019000")
    assert parse_len_hex("6,019000", "+CSIM") == bytes.fromhex("019000")        # quotes optional
    assert parse_len_hex('6,"01a0b0"', "+CSIM") == bytes.fromhex("01A0B0")      # lower case in
    assert parse_len_hex("6e00", "+CGLA") == bytes.fromhex("6E00")              # bare hex
    with pytest.raises(ProtocolError) as ei:
        parse_len_hex('8,"019000"', "+CGLA")
    assert ei.value.code == "length_mismatch" and "8" in ei.value.message and "6" in ei.value.message
    assert "+CGLA" in ei.value.message
    with pytest.raises(ProtocolError):
        parse_len_hex('5,"01900"', "+CSIM")                                       # odd
    with pytest.raises(ProtocolError):
        parse_len_hex('6,"01X000"', "+CSIM")                                      # non-hex


def test_command_name_never_leaks_apdu():
    assert command_name('AT+CGLA=1,22,"81E2910006BF3E035C015A"') == "AT+CGLA"
    assert command_name("AT+CCHO=?") == "AT+CCHO=?"
    assert command_name("AT+CPIN?") == "AT+CPIN?"


# --------------------------------------------------------------------------- CLA helpers

@pytest.mark.parametrize("base", [0x00, 0x80])
def test_channel_encoding_round_trip(base):
    for ch in range(20):
        cla = cla_for(base, ch)
        assert channel_of(cla) == ch
        assert cla & 0x80 == base
        for other in (0, 1, 3, 4, 19):
            moved = rechannel(cla, other)
            assert channel_of(moved) == other and moved & 0x80 == base
    assert cla_for(0x80, 1) == 0x81 and cla_for(0x00, 4) == 0x40 and cla_for(0x80, 19) == 0xCF


# --------------------------------------------------------------------------- quirks

def test_quirks_table_and_user_override():
    q = quirks.effective("Fibocom", "FM350-GL")
    assert q["no_prefix"] is True and q["no_test_forms"] is True
    assert quirks.effective("Quectel", "EG25")["cgla_channel_in_cla"] is True
    assert quirks.effective("Quectel", "EC800G")["max_get_response"] == 8
    assert quirks.effective("unknown", "x") == quirks.DEFAULTS
    q = quirks.effective("Fibocom", "FM350-GL", {"no-prefix": "false", "max_apdu": "133"})
    assert q["no_prefix"] is False and q["max_apdu"] == 133
    assert quirks.normalise({"cgla_channel_in_cla": "auto"}) == {"cgla_channel_in_cla": None}
    with pytest.raises(UsageError):
        quirks.normalise({"no_such_quirk": True})
    with pytest.raises(UsageError):
        quirks.normalise({"max_apdu": "lots"})
    with pytest.raises(UsageError):
        quirks.normalise({"no_test_forms": 3})


# --------------------------------------------------------------------------- simulator pieces without a pty

def test_fault_specs():
    f = parse_faults(["echo", "URC", "lowercase", "no-prefix", "no-test-forms", "garbage", "error@2",
                      "cme=14@3", "cme=SIM busy@4", "silent@5", "delay=0.5", "delay=2@7", "max-apdu=100"])
    assert f.echo and f.urc and f.lowercase and f.no_prefix and f.no_test_forms and f.garbage
    assert f.errors == {2: "ERROR", 3: ("cme", 14), 4: ("cme", "SIM busy")}
    assert f.silent == {5} and f.delay == 0.5 and f.delay_at == {7: 2.0} and f.max_apdu == 100
    for bad in ("bogus", "error@", "error@x", "silent@0", "cme=14", "delay=soon", "max-apdu=-1"):
        with pytest.raises(UsageError) as ei:
            parse_faults([bad])
        assert ei.value.code == "bad_fault"
    assert "echo" in str(pytest.raises(UsageError, parse_faults, ["nope"]).value)


def test_imei_is_fixed_and_luhn_valid():
    a, b = imei_for("89049032123451234512345678901235"), imei_for("89049032123451234512345678901236")
    assert len(a) == 15 and a.isdigit() and luhn_valid(a) and luhn_valid(b) and a != b
    assert imei_for("89049032123451234512345678901235") == a


def test_modem_logic_counts_only_apdu_commands():
    card = FakeEuicc()
    m = ModemLogic(card, parse_faults(["error@2"]))
    assert m.handle("ATE0").final == "OK"
    assert m.handle("AT+CMEE=1").final == "OK"
    assert m.handle('AT+CCHO="' + ISDR_AID.hex() + '"').lines == ["+CCHO: 1"]
    assert m.handle("AT+CSIM=?").final == "OK"                          # test forms do not count
    assert m.handle('AT+CGLA=1,10,"80CA00000A"').lines == ['+CGLA: 6,"819000"']
    assert m.handle('AT+CSIM=10,"00CA00000A"').final == "ERROR"        # the 2nd APDU command
    assert m.handle('AT+CSIM=10,"00CA00000A"').final == "OK"
    assert m.handle('AT+CSIM=12,"00CA00000A"').final == "+CME ERROR: 3"  # length field wrong
    assert m.handle("AT+CCHC=1").final == "OK" and card.channels == {0: None}
    assert m.handle("hello") is None                                   # not a command: ignored
    assert m.handle("AT+NOPE").final == "ERROR"


def test_modem_logic_registration_follows_card():
    card = FakeEuicc()
    m = ModemLogic(card)
    assert m.handle("AT+CEREG?").lines == ["+CEREG: 0,1"]
    assert m.handle("AT+CCID").lines == ["+CCID: 8944476500001224158"]
    card.iccid = None
    assert m.handle("AT+CREG?").lines == ["+CREG: 0,0"]
    assert m.handle("AT+COPS?").lines == ["+COPS: 0"]
    assert m.handle("AT+CCID").final == "ERROR"                        # CMEE=0: plain ERROR
    m.handle("AT+CMEE=2")
    assert m.handle("AT+CCID").final == "+CME ERROR: SIM not inserted"
    card.iccid = "8944476500001224158"
    assert m.handle("AT+CFUN=0").final == "OK" and m.handle("AT+CPIN?").final.startswith("+CME ERROR")
    assert m.handle("AT+CFUN=1").final == "OK" and card.resets == 1
    assert m.handle("AT+CPIN?").lines == ["+CPIN: READY"]


def test_modem_logic_reboot_and_rendering():
    card = FakeEuicc()
    m = ModemLogic(card, Faults(urc=True, no_prefix=True, lowercase=True))
    m.handle('AT+CCHO="' + ISDR_AID.hex() + '"')
    a = m.handle("AT+CFUN=1,1")
    assert a.after == ["RDY", "+CPIN: READY"] and m.sessions == {} and card.resets == 1
    out = m.render(m.handle('AT+CSIM=12,"00CA000001AB"')).split(b"\r\n")
    lines = [x for x in out if x]
    assert lines[1] == b'8,"00ab9000"' and lines[-1] == b"OK"           # no prefix, lower case
    assert len(lines) == 4                                                 # URC before and inside
    assert m.handle("AT+CGSN=1").lines == [f'+CGSN: "{m.imei}"']
    assert m.handle("ATI").lines[0] == "esim-agent"


# --------------------------------------------------------------------------- DirectTransport

def test_direct_transport_shares_channel_code_and_counts():
    card = FakeEuicc()
    seen = []
    t = DirectTransport(card, trace=lambda d, x: seen.append((d, x)))
    ch = t.open_channel(ISDR_AID)
    assert ch == 1 and card.channels[1] == "isdr"
    r = t.transmit(bytes([cla_for(0x80, ch), 0xCA, 0, 0, 2, 0xAB, 0xCD]))
    assert r == bytes.fromhex("81ABCD9000")
    assert isinstance(t.stats, Stats) and t.stats.apdus == 3            # MANAGE CHANNEL, SELECT, the command
    assert t.stats.bytes_out == 5 + 22 + 7 and t.stats.bytes_in == 3 + 2 + 5
    assert ("APDU>", bytes.fromhex("0070000001")) in seen
    assert t.quirks == {}
    t.close()
    assert card.channels == {0: None}                                    # channel closed on close()
    with pytest.raises(TransportError):
        t.transmit(b"\x00\xca\x00\x00")


def test_direct_transport_select_failure_closes_channel():
    card = FakeEuicc(isdr=False)
    t = DirectTransport(card)
    from agent.errors import StatusWordError
    with pytest.raises(StatusWordError) as ei:
        t.open_channel(ISDR_AID)
    assert ei.value.sw == 0x6A88 and card.channels == {0: None}


def test_direct_transport_max_apdu_quirk():
    t = DirectTransport(FakeEuicc(), quirks={"max_apdu": 10})
    with pytest.raises(TransportError) as ei:
        t.transmit(bytes(11))
    assert ei.value.code == "apdu_too_long"


def test_port_lost_error_is_a_transport_error():
    from agent.transport.at import PortLostError, Reply
    e = PortLostError("gone")
    assert isinstance(e, TransportError) and e.code == "port_lost" and e.exit_code == 3
    assert Reply("AT", [], [], []).echoed is False                     # set by AtPort.command


# --------------------------------------------------------------------------- read_iccid's fallbacks

class _ScriptedPort:
    """A port whose commands answer from a script: final result code (or lines, then OK)."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.sent: list[str] = []

    def command(self, cmd, *, prefix=None, bare=None, timeout=None, resync=True):
        from agent.transport.at import Reply, error_from_final
        self.sent.append(cmd)
        a = self.answers.get(cmd, "ERROR")
        if isinstance(a, list):
            return Reply(command=cmd, lines=[x[len(prefix):].strip() for x in a if prefix and x.startswith(prefix)],
                         bare=[x for x in a if not (prefix and x.startswith(prefix))], urcs=[], final="OK")
        raise error_from_final(cmd, a)


@pytest.mark.parametrize("final", ["+CME ERROR: 10", "+CME ERROR: 11", "+CME ERROR: 12", "+CME ERROR: 13",
                                   "+CME ERROR: 14", "+CME ERROR: 15", "+CME ERROR: SIM not inserted",
                                   '+CME ERROR: "SIM PIN required"', "+CME ERROR: sim busy"])
def test_read_iccid_stops_at_a_sim_state_error(final):
    from agent.transport.at import read_iccid
    port = _ScriptedPort({"AT+CCID": final, "AT+QCCID": ["+QCCID: 8944476500001224158"]})
    assert read_iccid(port) is None
    assert port.sent == ["AT+CCID"]             # AT+QCCID / AT+ICCID would say the same: not sent


@pytest.mark.parametrize("final", ["ERROR", "+CME ERROR: 3", "+CME ERROR: 4", "+CME ERROR: 100",
                                   "+CME ERROR: operation not supported", "COMMAND NOT SUPPORT"])
def test_read_iccid_falls_back_when_the_command_is_unknown(final):
    from agent.transport.at import read_iccid
    port = _ScriptedPort({"AT+CCID": final, "AT+QCCID": ["+QCCID: 8944476500001224158F"]})
    assert read_iccid(port) == "8944476500001224158"
    assert port.sent == ["AT+CCID", "AT+QCCID"]
    port = _ScriptedPort({"AT+CCID": final, "AT+QCCID": final, "AT+ICCID": ["+ICCID: 89444765000012241580"]})
    assert read_iccid(port) == "89444765000012241580"
    assert port.sent == ["AT+CCID", "AT+QCCID", "AT+ICCID"]


def test_read_iccid_first_answer_wins_and_no_sim_everywhere_is_none():
    from agent.transport.at import read_iccid
    port = _ScriptedPort({"AT+CCID": ["+CCID: 8944476500001224158"]})
    assert read_iccid(port) == "8944476500001224158" and port.sent == ["AT+CCID"]
    port = _ScriptedPort({"AT+CCID": ["8944476500001224158"]})        # a bare line, no prefix
    assert read_iccid(port) == "8944476500001224158"
    port = _ScriptedPort({})                                           # ERROR to all three
    assert read_iccid(port) is None and port.sent == ["AT+CCID", "AT+QCCID", "AT+ICCID"]


def test_read_iccid_on_the_simulated_modem_without_a_sim_sends_one_command():
    """Through the simulated modem's own logic: no SIM, CMEE=1 (as start() leaves it) -> CME 10."""
    from agent.transport.at import Reply, error_from_final, read_iccid
    card = FakeEuicc()
    m = ModemLogic(card)
    m.handle("AT+CMEE=1")
    sent = []

    class Port:
        def command(self, cmd, *, prefix=None, bare=None, timeout=None, resync=True):
            sent.append(cmd)
            a = m.handle(cmd)
            if a.final != "OK":
                raise error_from_final(cmd, a.final)
            return Reply(command=cmd, lines=[x[len(prefix):].strip() for x in a.lines if x.startswith(prefix)],
                         bare=[x for x in a.lines if not x.startswith(prefix)], urcs=[], final="OK")
    assert read_iccid(Port()) == "8944476500001224158" and sent == ["AT+CCID"]
    card.iccid = None
    sent.clear()
    assert read_iccid(Port()) is None and sent == ["AT+CCID"]
