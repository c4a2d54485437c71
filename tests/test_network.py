"""agent/network.py without a pseudo-terminal: the registration parser (examples and
properties), choosing the best report, and the AtPort helpers against a scripted port."""
from __future__ import annotations

import pytest

from agent.errors import ProtocolError, TimeoutError_
from agent.network import (Registration, best_registration, cfun_cycle, parse_registration,
                           query_registration)
from agent.transport.at import ModemError, PortLostError, Reply, error_from_final

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:           # the property tests need hypothesis (pip install hypothesis)
    given = None

pytestmark = pytest.mark.usefixtures("hang_guard")


# --------------------------------------------------------------------------- examples

def test_solicited_forms():
    r = parse_registration("+CEREG: 0,1", solicited=True)
    assert r == Registration("CEREG", 1, n=0) and r.registered and not r.roaming
    r = parse_registration('+CEREG: 2,5,"1a2b","01C2D3E4",7', solicited=True)
    assert (r.n, r.stat, r.tac, r.ci, r.act) == (2, 5, "1A2B", "01C2D3E4", 7)
    assert r.registered and r.roaming
    r = parse_registration("+CREG: 2,1,1A2B,01C2D3E4,7", solicited=True)        # unquoted (some modems)
    assert (r.tech, r.tac, r.ci, r.act) == ("CREG", "1A2B", "01C2D3E4", 7)
    r = parse_registration('+C5GREG: 2,1,"001A2B","0001C2D3E4",11,1,"01"', solicited=True)
    assert r.tech == "C5GREG" and r.act == 11 and r.extra == ("1", "01")
    r = parse_registration("+CEREG:1,3,,,,0,15", solicited=True)               # n=3: reject cause
    assert r.stat == 3 and r.denied and (r.tac, r.ci, r.act) == (None, None, None) and r.extra == ("0", "15")
    r = parse_registration("  +cereg : 0 , 2  ", solicited=True)
    assert r.tech == "CEREG" and r.searching and not r.registered


def test_unsolicited_forms():
    r = parse_registration("+CEREG: 2", solicited=False)
    assert r == Registration("CEREG", 2) and r.n is None and r.searching
    r = parse_registration('+CEREG: 1,"1A2B","01C2D3E4",7', solicited=False)
    assert (r.stat, r.tac, r.ci, r.act) == (1, "1A2B", "01C2D3E4", 7)
    # the same text read the other way is a different report, or no report at all
    assert parse_registration("+CREG: 1,2", solicited=False).tac == "2"
    assert parse_registration("+CREG: 1,2", solicited=True).stat == 2
    with pytest.raises(ProtocolError):
        parse_registration('+CEREG: 1,"1A2B","01C2D3E4",7', solicited=True)   # stat would be "1A2B"


def test_registered_and_roaming_by_stat():
    reg = {s: parse_registration(f"+CEREG: 0,{s}", solicited=True) for s in range(12)}
    assert [s for s, r in reg.items() if r.registered] == [1, 5, 9, 10]
    assert [s for s, r in reg.items() if r.roaming] == [5, 7, 10]
    assert reg[3].stat_text == "registration denied"


def test_to_json():
    d = parse_registration('+CEREG: 2,1,"1A2B","01C2D3E4",7', solicited=True).to_json()
    assert d == {"tech": "CEREG", "stat": 1, "stat_text": "registered (home)", "registered": True,
                 "roaming": False, "n": 2, "tac": "1A2B", "ci": "01C2D3E4", "act": 7}
    assert parse_registration("+CEREG: 0,2", solicited=True).describe() == "searching (+CEREG stat 2)"
    d = parse_registration("+CREG: 0", solicited=False).to_json()
    assert d == {"tech": "CREG", "stat": 0, "stat_text": "not registered", "registered": False, "roaming": False}


@pytest.mark.parametrize("line,solicited", [
    ("", False), ("OK", True), ("+CGREG: 0,1", True), ("+CEREG:", False), ("+CEREG: ", True),
    ("+CEREG: 1", True), ("+CEREG: x,1", True), ("+CEREG: 0,12", True), ("+CEREG: 0,-1", True),
    ("+CEREG: 0,1,\"1A2B", True), ("+CEREG: 0,1,\"1A2B\"x", True), ("+CEREG: 0,1,1A\"2B", True),
    ("+CEREG: 0,1,\"ZZ\"", True), ("+CEREG: 0,1,\"1A2B\",\"01C2D3E4\",seven", True),
    ("+CEREG: 1,1,\"1A2B\",\"01C2D3E4\",7", False), ("+CEREG: 0,1" + ",0" * 40, True),
    ("+CEREG: 0,١", True), ("+CEREG: ²", False), ("+CEREG: 0," + "9" * 5000, True),
    ("+CEREG: 0,1" + " " * 5000, True),
])
def test_malformed_lines_name_the_line(line, solicited):
    with pytest.raises(ProtocolError) as ei:
        parse_registration(line, solicited=solicited)
    assert ei.value.code == "bad_registration"
    assert "registration line" in ei.value.message and repr(line[:20])[1:-1][:10] in ei.value.message


def test_not_text_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        parse_registration(b"+CEREG: 0,1", solicited=True)     # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties

if given is None:
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_parser_properties():
        pass
else:
    @settings(max_examples=400, deadline=None)
    @given(st.text(max_size=300), st.booleans())
    def test_any_text_gives_a_registration_or_protocol_error(text, solicited):
        try:
            r = parse_registration(text, solicited=solicited)
        except ProtocolError:
            return
        assert isinstance(r, Registration) and r.tech in ("CEREG", "CREG", "C5GREG") and 0 <= r.stat <= 11

    _PIECES = st.lists(st.sampled_from(["0", "1", "2", "5", "11", "12", "255", "999", ",", '"', " ", "1A2B", "x", "",
                                        "\t", "-", "٣", "\r", "\n"]), max_size=30).map("".join)

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(["+CEREG:", "+CREG: ", "+C5GREG:", "+cereg :", "+CGREG:", ""]), _PIECES, st.booleans())
    def test_near_miss_lines_give_a_registration_or_protocol_error(prefix, rest, solicited):
        try:
            r = parse_registration(prefix + rest, solicited=solicited)
        except ProtocolError as e:
            assert e.code == "bad_registration"
            return
        assert isinstance(r, Registration)

    _HEXS = st.text(alphabet="0123456789ABCDEF", min_size=1, max_size=10)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(["CEREG", "CREG", "C5GREG"]), st.integers(0, 2), st.integers(0, 11),
           st.one_of(st.none(), st.tuples(_HEXS, _HEXS, st.integers(0, 13))), st.booleans())
    def test_well_formed_lines_round_trip(tech, n, stat, loc, solicited):
        body = (f"{n}," if solicited else "") + str(stat)
        if loc:
            body += f',"{loc[0]}","{loc[1]}",{loc[2]}'
        r = parse_registration(f"+{tech}: {body}", solicited=solicited)
        assert (r.tech, r.stat, r.n) == (tech, stat, n if solicited else None)
        assert (r.tac, r.ci, r.act) == (loc if loc else (None, None, None))
        assert r.registered == (stat in (1, 5, 9, 10))


# --------------------------------------------------------------------------- choosing

def _r(tech, stat, **kw):
    return Registration(tech, stat, **kw)


def test_best_registration():
    assert best_registration([]) is None and best_registration([None, None]) is None
    # registered wins, whatever the order
    assert best_registration([_r("CEREG", 2), _r("C5GREG", 0), _r("CREG", 1)]).tech == "CREG"
    assert best_registration([_r("CEREG", 5), _r("CREG", 1)]).tech == "CREG"      # home before roaming
    assert best_registration([_r("CEREG", 1), _r("CREG", 1)]).tech == "CEREG"     # tie: the first
    # nothing registered: the most informative
    assert best_registration([_r("CEREG", 0), _r("C5GREG", 2), _r("CREG", 4)]).tech == "C5GREG"
    assert best_registration([_r("CEREG", 2), _r("CREG", 3)]).tech == "CREG"       # denied says why
    assert best_registration([_r("CEREG", 2), _r("CREG", 2, tac="1A2B")]).tech == "CREG"
    assert best_registration([_r("CEREG", 0), _r("CREG", 0)]).tech == "CEREG"


# --------------------------------------------------------------------------- helpers over a scripted port

class ScriptedPort:
    """Answers commands from a table: a list of lines (OK), "ERROR", or an exception."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.sent: list[str] = []

    def command(self, cmd, *, prefix=None, bare=None, timeout=None, resync=True):
        self.sent.append(cmd)
        a = self.answers.get(cmd, "ERROR")
        if isinstance(a, BaseException):
            raise a
        if a == "ERROR":
            raise error_from_final(cmd, "ERROR")
        lines = [x[len(prefix):].strip() for x in a if prefix and x.upper().startswith(prefix)]
        return Reply(cmd, lines, [], [x for x in a if not (prefix and x.upper().startswith(prefix))], "OK")

    def try_command(self, cmd, *, timeout=None, **kw):
        try:
            return self.command(cmd, timeout=timeout, **kw)
        except (ModemError, TimeoutError_):
            return None


def test_query_registration_picks_the_registered_one_and_skips_errors():
    port = ScriptedPort({"AT+CEREG?": ["+CEREG: 0,2"], "AT+CREG?": ["+CREG: 0,1"]})  # no 5G: ERROR
    r = query_registration(port)
    assert r.tech == "CREG" and r.registered
    assert port.sent == ["AT+CEREG?", "AT+C5GREG?", "AT+CREG?"]


def test_query_registration_ignores_a_urc_among_the_answer_lines():
    urcs = ["+CEREG: 2", '+CEREG: 1,"1A2B","01C2D3E4",7']
    port = ScriptedPort({"AT+CEREG?": urcs + ['+CEREG: 2,1,"1A2B","01C2D3E4",7']})
    r = query_registration(port)
    assert (r.tech, r.n, r.stat, r.tac) == ("CEREG", 2, 1, "1A2B")
    port = ScriptedPort({"AT+CEREG?": ["+CEREG: 0,2", "+CEREG: 1"]})                 # URC after the answer
    assert query_registration(port).stat == 2


def test_query_registration_none_when_nothing_answers():
    assert query_registration(ScriptedPort({})) is None
    assert query_registration(ScriptedPort({"AT+CEREG?": ["+CEREG: garbage"], "AT+CREG?": []})) is None
    assert query_registration(ScriptedPort({"AT+CEREG?": TimeoutError_("slow")})) is None


def test_query_registration_lets_a_lost_port_through():
    with pytest.raises(PortLostError):
        query_registration(ScriptedPort({"AT+CEREG?": PortLostError("gone")}))


def test_cfun_cycle():
    port = ScriptedPort({"AT+CFUN=0": [], "AT+CFUN=1": []})
    cfun_cycle(port, timeout=1)
    assert port.sent == ["AT+CFUN=0", "AT+CFUN=1"]
    # the port vanishes (the modem re-enumerates): the port-lost error reaches the caller
    port = ScriptedPort({"AT+CFUN=0": [], "AT+CFUN=1": PortLostError("gone")})
    with pytest.raises(PortLostError):
        cfun_cycle(port, timeout=1)
    # CFUN=0 refused: nothing changed, the refusal is raised, no CFUN=1 needed
    port = ScriptedPort({"AT+CFUN=1": []})
    with pytest.raises(ModemError):
        cfun_cycle(port, timeout=1)
    assert port.sent == ["AT+CFUN=0"]
    # CFUN=0 timed out: the radio is switched on again before the time-out is raised
    port = ScriptedPort({"AT+CFUN=0": TimeoutError_("slow"), "AT+CFUN=1": []})
    with pytest.raises(TimeoutError_):
        cfun_cycle(port, timeout=1)
    assert port.sent == ["AT+CFUN=0", "AT+CFUN=1"]
    port = ScriptedPort({"AT+CFUN=0": TimeoutError_("slow"), "AT+CFUN=1": PortLostError("gone")})
    with pytest.raises(PortLostError):
        cfun_cycle(port, timeout=1)
