"""Unit tests for agent/apdu.py: the ISO 7816-4 layer under ES10 (docs/protocol.md §1).

Everything runs against scripted fakes: a raw ``transmit`` callable for the
channel helpers and an ``ApduTransport``-shaped class for ``Isdr``. Each fake
records the exact C-APDUs so the tests check bytes, not just outcomes.
"""
from __future__ import annotations

import types

import pytest

from agent import apdu
from agent.apdu import (ISDR_AID, Isdr, build, cla_for, close_channel_raw, is_success, open_channel_raw,
                        select_raw, split_rapdu, sw_error, with_le)
from agent.errors import UsageError, StatusWordError, TransportError

H = bytes.fromhex
AID2 = H("A0000005591010FFFFFFFF8900000200")   # an alternative AID to try after the standard one
OK = H("9000")


def sw(word: int, data: bytes = b"") -> bytes:
    return data + word.to_bytes(2, "big")


# --- fakes ----------------------------------------------------------------------

class ScriptedTransmit:
    """A raw transmit(apdu) -> rapdu callable answering from a script.

    Script entries are R-APDU bytes, an exception instance (raised), or a
    callable(apdu) -> bytes. Running past the end fails the test loudly."""

    def __init__(self, *script):
        self.script = list(script)
        self.sent: list[bytes] = []

    def __call__(self, capdu: bytes) -> bytes:
        self.sent.append(bytes(capdu))
        if not self.script:
            raise AssertionError(f"unexpected extra APDU {capdu.hex().upper()}")
        r = self.script.pop(0)
        if isinstance(r, BaseException):
            raise r
        if callable(r):
            return r(capdu)
        return r


class FakeTransport:
    """ApduTransport double: scripted transmit, scripted open_channel, recorded close."""

    name = "fake"

    def __init__(self, *script, open_results=(1,), quirks=None, close_raises: Exception | None = None):
        self.tx = ScriptedTransmit(*script)
        self.timeouts: list[float | None] = []
        self.open_results = list(open_results)
        self.opened: list[bytes] = []
        self.closed_channels: list[int] = []
        self.close_raises = close_raises
        self.closed = False
        if quirks is not None:
            self.quirks = quirks

    @property
    def sent(self) -> list[bytes]:
        return self.tx.sent

    def transmit(self, capdu: bytes, *, timeout: float | None = None) -> bytes:
        self.timeouts.append(timeout)
        return self.tx(capdu)

    def open_channel(self, aid: bytes) -> int:
        self.opened.append(aid)
        r = self.open_results.pop(0)
        if isinstance(r, BaseException):
            raise r
        return r

    def close_channel(self, channel: int) -> None:
        self.closed_channels.append(channel)
        if self.close_raises:
            raise self.close_raises

    def close(self) -> None:
        self.closed = True


def session(*script, channel: int = 1, **kw) -> tuple[Isdr, FakeTransport]:
    """An Isdr already opened on ``channel`` over a FakeTransport."""
    t = FakeTransport(*script, open_results=(channel,), quirks=kw.pop("quirks", None))
    s = Isdr(t, **kw).open()
    assert s.channel == channel
    return s, t


# --- cla_for -------------------------------------------------------------------------

@pytest.mark.parametrize("ch", range(0, 4))
def test_cla_first_interindustry_channels(ch):
    assert cla_for(0x00, ch) == ch
    assert cla_for(0x80, ch) == 0x80 | ch


@pytest.mark.parametrize("ch", range(4, 20))
def test_cla_further_interindustry_channels(ch):
    # ISO 7816-4 §5.4.1: 0x40 | (ch - 4); the proprietary class bit 0x80 is kept.
    assert cla_for(0x00, ch) == 0x40 + (ch - 4)
    assert cla_for(0x80, ch) == 0xC0 + (ch - 4)


def test_cla_spot_values():
    assert cla_for(0x80, 1) == 0x81
    assert cla_for(0x80, 4) == 0xC0
    assert cla_for(0x80, 5) == 0xC1
    assert cla_for(0x80, 19) == 0xCF
    assert cla_for(0x00, 19) == 0x4F


def test_cla_replaces_existing_channel_bits_and_keeps_chaining():
    assert cla_for(0x83, 1) == 0x81            # old channel bits dropped
    assert cla_for(0x03, 6) == 0x42
    assert cla_for(0x90, 2) == 0x92            # command chaining bit b5 kept
    assert cla_for(0x90, 5) == 0xD1
    assert cla_for(0x0C, 1) == 0x0D            # secure messaging bits kept for 0-3
    # a CLA that already carries a further-interindustry channel is re-channelled cleanly
    assert cla_for(0x41, 1) == 0x01
    assert cla_for(0xC1, 2) == 0x82
    assert cla_for(0xC1, 6) == 0xC2


@pytest.mark.parametrize("ch", [-1, 20, 21, 255])
def test_cla_out_of_range(ch):
    with pytest.raises(ValueError, match="out of range"):
        cla_for(0x80, ch)


# --- build / with_le -------------------------------------------------------------------

def test_build_case1():
    assert build(0x00, 0x70, 0x80, 0x01) == H("00708001")


def test_build_case2():
    assert build(0x00, 0x70, 0x00, 0x00, le=1) == H("0070000001")
    assert build(0x01, 0xC0, 0x00, 0x00, le=0x1A) == H("01C000001A")
    # Le 256 and 0 are both coded 00 in a short APDU
    assert build(0x00, 0xC0, 0, 0, le=256) == H("00C0000000")
    assert build(0x00, 0xC0, 0, 0, le=0) == H("00C0000000")
    assert build(0x00, 0xC0, 0, 0, le=0xFF) == H("00C00000FF")
    assert build(0x00, 0xC0, 0, 0, le=0x80) == H("00C0000080")


def test_build_case3():
    assert build(0x81, 0xE2, 0x91, 0x00, H("BF2E00")) == H("81E2910003BF2E00")


def test_build_case4():
    assert build(0x02, 0xA4, 0x04, 0x00, ISDR_AID, le=0) == H("02A4040010") + ISDR_AID + H("00")


def test_build_data_limit():
    assert len(build(0x80, 0xE2, 0x91, 0, bytes(255))) == 5 + 255
    assert build(0x80, 0xE2, 0x91, 0, bytes(255))[4] == 0xFF
    with pytest.raises(ValueError):
        build(0x80, 0xE2, 0x91, 0, bytes(256))


def test_with_le_all_cases():
    assert with_le(H("00708001"), 0x10) == H("0070800110")                       # case 1 -> 2
    assert with_le(H("00C0000000"), 0x1A) == H("00C000001A")                     # case 2: replaced
    assert with_le(H("81E2910003BF2E00"), 0x20) == H("81E2910003BF2E0020")       # case 3 -> 4
    assert with_le(H("81E2910003BF2E0000"), 0x20) == H("81E2910003BF2E0020")     # case 4: replaced
    assert with_le(H("81E2910003BF2E00"), 0) == H("81E2910003BF2E0000")          # 6C00 -> Le 256


# --- status words ---------------------------------------------------------------------

def test_is_success():
    assert is_success(0x9000)
    assert is_success(0x9100) and is_success(0x9110) and is_success(0x91FF)
    for w in (0x6100, 0x6A88, 0x6985, 0x6C10, 0x9200, 0x9001, 0x0000):
        assert not is_success(w), hex(w)


def test_split_rapdu():
    assert split_rapdu(H("0102039000")) == (H("010203"), 0x9000)
    assert split_rapdu(H("6A88")) == (b"", 0x6A88)


@pytest.mark.parametrize("raw", [b"", H("90")])
def test_split_rapdu_too_short(raw):
    with pytest.raises(TransportError) as ei:
        split_rapdu(raw)
    assert ei.value.code == "short_rapdu"
    assert ei.value.exit_code == 3


@pytest.mark.parametrize("word,code", [
    (0x6A88, "sw_referenced_data_not_found"), (0x6A82, "sw_file_not_found"), (0x6985, "sw_conditions_not_satisfied"),
    (0x6A80, "sw_incorrect_data"), (0x6700, "sw_wrong_length"), (0x6982, "sw_security_status_not_satisfied"),
    (0x6D00, "sw_ins_not_supported"), (0x6E00, "sw_cla_not_supported"), (0x6881, "sw_channel_not_supported"),
    (0x6A81, "sw_function_not_supported"), (0x6581, "sw_card_memory_error"), (0x6400, "sw_card_memory_error"),
    (0x6C10, "sw_wrong_le"), (0x6283, "sw_status_word"), (0x9F00, "sw_status_word"),
])
def test_sw_error_names(word, code):
    e = sw_error(word, "SELECT X")
    assert isinstance(e, StatusWordError)
    assert e.sw == word and e.code == code and e.exit_code == 1
    assert f"{word:04X}" in e.message and e.message.startswith("SELECT X")
    assert e.to_json()["details"] == {"sw": f"{word:04X}"}


# --- open / select / close over a raw transmit -------------------------------------------

SELECT_ISDR_CH2 = H("02A4040010") + ISDR_AID + H("00")
OPEN = H("0070000001")


def test_open_channel_raw_sequence():
    tx = ScriptedTransmit(sw(0x9000, H("02")), OK)
    assert open_channel_raw(tx, ISDR_AID) == 2
    assert tx.sent == [OPEN, SELECT_ISDR_CH2]


def test_open_channel_raw_fetches_fci_on_61xx():
    fci = H("6F1A840EA0000005591010FFFFFFFF8900000100A5048202020088") + bytes(4)
    tx = ScriptedTransmit(sw(0x9000, H("02")), sw(0x6100 | len(fci)), sw(0x9000, fci))
    assert open_channel_raw(tx, ISDR_AID) == 2
    assert tx.sent == [OPEN, SELECT_ISDR_CH2, bytes([0x02, 0xC0, 0, 0, len(fci)])]
    assert not tx.script


def test_select_raw_returns_fci_and_uses_channel_cla():
    fci = bytes(range(40))
    tx = ScriptedTransmit(sw(0x6120), sw(0x6108, fci[:32]), sw(0x9000, fci[32:]))
    assert select_raw(tx, 5, ISDR_AID) == fci
    assert tx.sent == [H("41A4040010") + ISDR_AID + H("00"), H("41C0000020"), H("41C0000008")]


def test_open_channel_raw_high_channel():
    tx = ScriptedTransmit(sw(0x9000, H("13")), OK)
    assert open_channel_raw(tx, ISDR_AID) == 19
    assert tx.sent[1][0] == 0x4F


def test_open_channel_raw_select_failure_closes_channel():
    tx = ScriptedTransmit(sw(0x9000, H("02")), sw(0x6A88), OK)
    with pytest.raises(StatusWordError) as ei:
        open_channel_raw(tx, ISDR_AID)
    e = ei.value
    assert e.sw == 0x6A88 and e.code == "sw_referenced_data_not_found" and e.exit_code == 1
    assert ISDR_AID.hex().upper() in e.message
    assert tx.sent == [OPEN, SELECT_ISDR_CH2, H("00708002")]


def test_open_channel_raw_transport_error_during_select_closes_and_propagates():
    boom = TransportError("link died", code="timeout")
    tx = ScriptedTransmit(sw(0x9000, H("03")), boom, OK)
    with pytest.raises(TransportError) as ei:
        open_channel_raw(tx, ISDR_AID)
    assert ei.value is boom
    assert tx.sent[-1] == H("00708003")


def test_open_channel_raw_close_failure_does_not_mask_select_error():
    tx = ScriptedTransmit(sw(0x9000, H("02")), sw(0x6A82), TransportError("dead", code="timeout"))
    with pytest.raises(StatusWordError) as ei:
        open_channel_raw(tx, ISDR_AID)
    assert ei.value.sw == 0x6A82
    assert len(tx.sent) == 3


def test_open_channel_raw_manage_channel_refused():
    tx = ScriptedTransmit(sw(0x6881))
    with pytest.raises(StatusWordError) as ei:
        open_channel_raw(tx, ISDR_AID)
    assert ei.value.code == "sw_channel_not_supported"
    assert tx.sent == [OPEN]          # no SELECT, nothing to close


@pytest.mark.parametrize("answer", [OK, sw(0x9000, H("00")), sw(0x9000, H("14")), sw(0x9000, H("0102"))])
def test_open_channel_raw_bad_channel_number(answer):
    tx = ScriptedTransmit(answer)
    with pytest.raises(TransportError) as ei:
        open_channel_raw(tx, ISDR_AID)
    assert ei.value.code == "protocol_error"
    assert tx.sent == [OPEN]


def test_open_channel_raw_select_61xx_loop_is_capped_and_channel_closed():
    closes = []

    def tx(capdu):
        if capdu[1] == 0x70 and capdu[2] == 0x80:
            closes.append(capdu)
            return OK
        if capdu[1] == 0x70:
            return sw(0x9000, H("01"))
        return sw(0x6100)                       # SELECT and every GET RESPONSE: "6100" forever
    with pytest.raises(TransportError) as ei:
        open_channel_raw(tx, ISDR_AID)
    assert ei.value.code == "get_response_loop"
    assert closes == [H("00708001")]


def test_close_channel_raw_bytes_and_best_effort():
    tx = ScriptedTransmit(OK)
    close_channel_raw(tx, 3)
    assert tx.sent == [H("00708003")]
    # a dead link or an error SW must not raise
    close_channel_raw(ScriptedTransmit(TransportError("gone")), 3)
    close_channel_raw(ScriptedTransmit(sw(0x6881)), 3)


# --- Isdr: channel management ---------------------------------------------------------

def test_isdr_open_first_aid():
    t = FakeTransport(open_results=(2,))
    s = Isdr(t).open()
    assert (s.channel, s.aid) == (2, ISDR_AID)
    assert t.opened == [ISDR_AID]


@pytest.mark.parametrize("first_sw", [0x6A82, 0x6A88])
def test_isdr_open_tries_aids_in_order(first_sw):
    t = FakeTransport(open_results=(sw_error(first_sw, "SELECT"), 3))
    s = Isdr(t, aids=[ISDR_AID, AID2]).open()
    assert t.opened == [ISDR_AID, AID2]
    assert (s.channel, s.aid) == (3, AID2)


def test_isdr_open_all_aids_fail():
    t = FakeTransport(open_results=(sw_error(0x6A88, "SELECT"), sw_error(0x6A82, "SELECT")))
    with pytest.raises(StatusWordError) as ei:
        Isdr(t, aids=[ISDR_AID, AID2]).open()
    e = ei.value
    assert e.code == "isdr_not_found" and e.exit_code == 1
    assert e.sw == 0x6A82                       # the last card answer
    assert ISDR_AID.hex().upper() in e.message and AID2.hex().upper() in e.message
    assert t.opened == [ISDR_AID, AID2]
    assert t.closed_channels == []


def test_isdr_open_no_aids_configured():
    with pytest.raises(StatusWordError) as ei:
        Isdr(FakeTransport(open_results=()), aids=[]).open()
    assert ei.value.code == "isdr_not_found"


@pytest.mark.parametrize("err", [sw_error(0x6985, "SELECT"), sw_error(0x6881, "MANAGE CHANNEL"),
                                 TransportError("modem gone", code="timeout")])
def test_isdr_open_other_errors_propagate_without_trying_next_aid(err):
    t = FakeTransport(open_results=(err, 3))
    with pytest.raises(type(err)) as ei:
        Isdr(t, aids=[ISDR_AID, AID2]).open()
    assert ei.value is err
    assert t.opened == [ISDR_AID]


def test_isdr_context_manager_closes():
    t = FakeTransport(open_results=(2,))
    with Isdr(t) as s:
        assert s.channel == 2
        assert t.closed_channels == []
    assert t.closed_channels == [2]
    assert s.channel is None
    s.close()                                   # idempotent
    assert t.closed_channels == [2]


def test_isdr_context_manager_closes_on_exception():
    t = FakeTransport(sw(0x6A80), open_results=(1,))
    with pytest.raises(StatusWordError):
        with Isdr(t) as s:
            s.store_data(H("BF2E00"))
    assert t.closed_channels == [1]


def test_isdr_close_on_keyboard_interrupt_and_close_error_does_not_mask():
    t = FakeTransport(open_results=(4,), close_raises=TransportError("dead"))
    with pytest.raises(KeyboardInterrupt):
        with Isdr(t):
            raise KeyboardInterrupt
    assert t.closed_channels == [4]


def test_isdr_channel_zero_is_still_closed():
    # AT+CGLA transports may hand back channel 0 (the modem patches CLA)
    t = FakeTransport(sw(0x9000, H("BF2E00")), open_results=(0,))
    with Isdr(t) as s:
        s.store_data(H("BF2E00"))
    assert t.sent[0][0] == 0x80
    assert t.closed_channels == [0]


def test_isdr_close_without_open_is_noop():
    t = FakeTransport()
    Isdr(t).close()
    assert t.closed_channels == []


# --- Isdr: segment size --------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, 256, 1000])
def test_segment_size_validated(bad):
    with pytest.raises(ValueError):
        Isdr(FakeTransport(), segment_size=bad)


@pytest.mark.parametrize("quirks,expect", [
    (None, 255), ({}, 255), ({"max_apdu": None}, 255), ({"max_apdu": 64}, 58), ({"max_apdu": 261}, 255),
    ({"max_apdu": 3}, 1), (types.SimpleNamespace(max_apdu=40), 34), (types.SimpleNamespace(), 255),
])
def test_segment_clamped_by_max_apdu_quirk(quirks, expect):
    assert Isdr(FakeTransport(quirks=quirks)).segment_size == expect


def test_segment_clamp_applies_to_explicit_size_too():
    assert Isdr(FakeTransport(quirks={"max_apdu": 64}), segment_size=200).segment_size == 58
    assert Isdr(FakeTransport(quirks={"max_apdu": 64}), segment_size=30).segment_size == 30


def test_store_data_respects_max_apdu():
    payload = bytes(range(256)) + bytes(44)        # 300 bytes
    script = [OK] * 5 + [sw(0x9000, H("BF2E00"))]
    s, t = session(*script, channel=1, quirks={"max_apdu": 64})
    assert s.store_data(payload) == H("BF2E00")
    assert len(t.sent) == 6                         # 5 x 58 + 10 (room for the Le byte)
    assert all(len(a) <= 64 for a in t.sent)
    assert [a[4] for a in t.sent] == [58] * 5 + [10]
    assert b"".join(a[5:5 + a[4]] for a in t.sent) == payload
    assert [a[3] for a in t.sent] == [0, 1, 2, 3, 4, 5]


# --- Isdr: STORE DATA framing ------------------------------------------------------

PAYLOAD300 = bytes((i * 7 + 3) & 0xFF for i in range(300))


@pytest.mark.parametrize("channel,cla", [(1, 0x81), (2, 0x82), (3, 0x83), (4, 0xC0), (5, 0xC1), (19, 0xCF)])
def test_store_data_segmentation_exact_bytes(channel, cla):
    resp = H("BF2D03A00100")
    s, t = session(OK, OK, sw(0x9000, resp), channel=channel, segment_size=120)
    assert s.store_data(PAYLOAD300) == resp
    c = bytes([cla])
    assert t.sent == [
        c + H("E2110078") + PAYLOAD300[:120],
        c + H("E2110178") + PAYLOAD300[120:240],
        c + H("E291023C") + PAYLOAD300[240:] + H("00"),   # Le=00: the response comes on the last block
    ]


@pytest.mark.parametrize("n,lcs", [(1, [1]), (120, [120]), (121, [120, 1]), (240, [120, 120]), (241, [120, 120, 1])])
def test_store_data_block_boundaries(n, lcs):
    payload = bytes([0xAB]) * n
    s, t = session(*([OK] * (len(lcs) - 1) + [OK]), channel=1, segment_size=120)
    assert s.store_data(payload) == b""
    assert [a[4] for a in t.sent] == lcs
    assert [a[2] for a in t.sent] == [0x11] * (len(lcs) - 1) + [0x91]
    assert [a[3] for a in t.sent] == list(range(len(lcs)))
    assert all(len(a) == 5 + a[4] for a in t.sent[:-1])   # intermediate blocks: case 3, no Le
    assert len(t.sent[-1]) == 5 + t.sent[-1][4] + 1 and t.sent[-1][-1] == 0   # last block: Le=00


def test_store_data_default_blocks_are_255_bytes():
    """Fewer, fuller blocks: 300 bytes go in two STORE DATA commands, not three."""
    resp = H("BF2D03A00100")
    s, t = session(OK, sw(0x9000, resp), channel=1)
    assert s.store_data(PAYLOAD300) == resp
    assert [a[4] for a in t.sent] == [255, 45] and t.sent[-1][-1] == 0


def test_store_data_block_number_restarts_per_command():
    s, t = session(OK, OK, OK, OK, channel=1, segment_size=2)
    s.store_data(H("BF2E00"))
    s.store_data(H("BF2000"))
    assert [(a[2], a[3]) for a in t.sent] == [(0x11, 0), (0x91, 1), (0x11, 0), (0x91, 1)]


def test_store_data_256_blocks_max():
    s, t = session(*([OK] * 256), channel=1, segment_size=1)
    s.store_data(bytes(256))
    assert len(t.sent) == 256
    assert t.sent[-1][2:4] == H("91FF")
    s2, t2 = session(channel=1, segment_size=1)
    with pytest.raises(UsageError, match="257") as ei:
        s2.store_data(bytes(257))
    assert ei.value.code == "segment_size_too_small" and ei.value.exit_code == 2
    assert t2.sent == []


def test_store_data_empty_payload():
    s, t = session(channel=1)
    with pytest.raises(ValueError):
        s.store_data(b"")
    assert t.sent == []


def test_store_data_intermediate_error_stops_with_block_numbers():
    s, t = session(OK, sw(0x6A80), channel=2, segment_size=120)
    with pytest.raises(StatusWordError) as ei:
        s.store_data(PAYLOAD300, what="AuthenticateServer")
    e = ei.value
    assert e.sw == 0x6A80 and e.code == "sw_incorrect_data"
    assert "AuthenticateServer" in e.message and "block 2/3" in e.message
    assert len(t.sent) == 2                          # the third block is never sent


def test_store_data_last_block_error():
    s, t = session(OK, OK, sw(0x6985), channel=1, segment_size=120)
    with pytest.raises(StatusWordError) as ei:
        s.store_data(PAYLOAD300)
    assert ei.value.code == "sw_conditions_not_satisfied"
    assert "block 3/3" in ei.value.message


def test_store_data_single_block_error_code():
    s, _ = session(sw(0x6A88), channel=1)
    with pytest.raises(StatusWordError) as ei:
        s.store_data(H("BF2E00"))
    assert ei.value.code == "sw_referenced_data_not_found" and "block 1/1" in ei.value.message


def test_store_data_91xx_is_success():
    s, t = session(sw(0x9110), sw(0x9120, H("BF2E0100")), channel=1, segment_size=2)
    assert s.store_data(H("BF2E00")) == H("BF2E0100")
    assert len(t.sent) == 2


def test_store_data_timeouts_passed_through():
    s, t = session(OK, OK, OK, channel=1, timeout=7.5, segment_size=2)
    s.store_data(H("BF2E00"))                        # session default
    s.store_data(b"\x01", timeout=300.0)             # per-call override (BPP load)
    assert t.timeouts == [7.5, 7.5, 300.0]


def test_es10_alias():
    assert Isdr.es10 is Isdr.store_data


# --- Isdr: response chaining -----------------------------------------------------

def test_61xx_chaining_concatenates():
    part1, part2 = bytes(range(256)), bytes(range(10))
    s, t = session(sw(0x6100), sw(0x610A, part1), sw(0x9000, part2), channel=1)
    assert s.store_data(H("BF2200")) == part1 + part2
    assert t.sent[1:] == [H("01C0000000"), H("01C000000A")]   # GET RESPONSE uses class 00|ch


def test_61xx_keeps_data_sent_before_61xx():
    s, t = session(sw(0x6103, H("AABB")), sw(0x9000, H("CCDDEE")), channel=2)
    assert s.store_data(H("BF2E00")) == H("AABBCCDDEE")
    assert t.sent[1] == H("02C0000003")


def test_61xx_on_high_channel_uses_further_interindustry_cla():
    s, t = session(sw(0x6102), sw(0x9000, H("0102")), channel=7)
    assert s.store_data(H("BF2E00")) == H("0102")
    assert t.sent[0][0] == 0xC3 and t.sent[1] == H("43C0000002")


def test_61xx_on_intermediate_block_is_drained():
    s, t = session(sw(0x6102), sw(0x9000, H("0000")), sw(0x9000, H("BF2E00")), channel=1, segment_size=2)
    assert s.store_data(H("BF2E00")) == H("BF2E00")
    assert [a[1] for a in t.sent] == [0xE2, 0xC0, 0xE2]


def test_get_response_error_sw_raises():
    s, _ = session(sw(0x6110), sw(0x6F00), channel=1)
    with pytest.raises(StatusWordError) as ei:
        s.store_data(H("BF2E00"))
    assert ei.value.code == "sw_card_error"


def test_get_response_loop_cap():
    s, t = session(*([sw(0x6100)] * 10), channel=1, get_response_cap=3)
    with pytest.raises(TransportError) as ei:
        s.store_data(H("BF2E00"))
    assert ei.value.code == "get_response_loop" and ei.value.exit_code == 3
    assert len(t.sent) == 1 + 3                     # the command + exactly `cap` GET RESPONSEs


def test_get_response_loop_default_cap():
    s, t = session(*([sw(0x6100)] * (apdu.GET_RESPONSE_CAP + 5)), channel=1)
    with pytest.raises(TransportError) as ei:
        s.store_data(H("BF2E00"))
    assert ei.value.code == "get_response_loop"
    assert len(t.sent) == 1 + apdu.GET_RESPONSE_CAP


def test_get_response_cap_from_max_get_response_quirk():
    s, t = session(*([sw(0x6100)] * 20), channel=1, quirks={"max_get_response": 8})
    with pytest.raises(TransportError) as ei:
        s.store_data(H("BF2E00"))
    assert ei.value.code == "get_response_loop"
    assert len(t.sent) == 1 + 8


def test_get_response_just_under_cap_succeeds():
    script = [sw(0x6101)] + [sw(0x6101, b"\x01")] * 2 + [sw(0x9000, b"\x02")]
    s, t = session(*script, channel=1, get_response_cap=3)
    assert s.store_data(H("BF2E00")) == H("010102")


def test_6cxx_reissues_with_le():
    cmd = H("81E2910003BF2E00")
    s, t = session(sw(0x6C12), sw(0x9000, bytes(18)), channel=1)
    assert s.store_data(H("BF2E00")) == bytes(18)
    assert t.sent == [cmd + H("00"), cmd + H("12")]


def test_6cxx_then_61xx():
    s, t = session(sw(0x6C05), sw(0x6103, H("0102030405")), sw(0x9000, H("060708")), channel=1)
    assert s.store_data(H("BF2E00")) == H("0102030405060708")
    assert t.sent[2] == H("01C0000003")


def test_exchange_returns_sw_without_raising():
    s, t = session(sw(0x6A82), channel=1)
    assert s.exchange(H("00A4040000")) == (b"", 0x6A82)


@pytest.mark.parametrize("raw", [H("90"), b""])
def test_short_rapdu_is_an_error(raw):
    s, _ = session(raw, channel=1)
    with pytest.raises(TransportError) as ei:
        s.store_data(H("BF2E00"))
    assert ei.value.code == "short_rapdu"


def test_short_rapdu_during_get_response():
    s, _ = session(sw(0x6105), H("61"), channel=1)
    with pytest.raises(TransportError) as ei:
        s.store_data(H("BF2E00"))
    assert ei.value.code == "short_rapdu"


def test_transport_is_not_closed_by_isdr():
    # the session owns the channel, not the port
    t = FakeTransport(open_results=(1,))
    with Isdr(t):
        pass
    assert t.closed is False


class _TooLong(TransportError):
    """What the AT transport raises for +CME ERROR: n."""

    def __init__(self, cme):
        super().__init__(f"+CME ERROR: {cme}", code="modem_cme_error")
        self.cme = cme


class LimitedTransport(FakeTransport):
    """A modem that refuses APDUs above ``limit`` bytes with CME 3 and answers 9000 otherwise."""

    def __init__(self, limit, cme=3):
        super().__init__(open_results=(1,))
        self.limit, self.cme, self.apdus = limit, cme, []

    def transmit(self, capdu, *, timeout=None):
        if len(capdu) > self.limit:
            raise _TooLong(self.cme)
        self.apdus.append(capdu)
        return H("9000")


@pytest.mark.parametrize("cme", [3, 4, "operation not allowed"])
def test_store_data_shrinks_blocks_when_the_modem_refuses_long_apdus(cme):
    t = LimitedTransport(40, cme)
    s = Isdr(t).open()
    payload = bytes(range(100))
    s.store_data(payload)
    # 255 → 127 → 63 → 31: the command was resent from block 00 with 31-byte blocks, which fit
    assert s.segment_size == 31
    assert [a[3] for a in t.apdus] == [0, 1, 2, 3]
    assert b"".join(a[5:5 + a[4]] for a in t.apdus) == payload
    s.store_data(payload)                      # the smaller size is kept for the session
    assert len(t.apdus) == 8


def test_store_data_other_modem_errors_are_not_retried():
    t = LimitedTransport(40, cme=13)           # SIM failure: not a size problem
    s = Isdr(t).open()
    with pytest.raises(TransportError):
        s.store_data(bytes(100))
    assert s.segment_size == 255 and t.apdus == []


def test_close_channel_falls_back_to_the_five_byte_form():
    """Modems that refuse AT+CSIM shorter than 5 bytes (CME 3) or cards answering 6700:
    the close is sent again as 00 70 80 ch 00."""
    sent = []

    def refuses_short(apdu):
        sent.append(apdu)
        if len(apdu) < 5:
            raise _TooLong(3)
        return H("9000")
    close_channel_raw(refuses_short, 2)
    assert sent == [H("00708002"), H("0070800200")]

    sent.clear()

    def wrong_length(apdu):
        sent.append(apdu)
        return H("6700") if len(apdu) < 5 else H("9000")
    close_channel_raw(wrong_length, 3)
    assert sent == [H("00708003"), H("0070800300")]

    sent.clear()

    def dead(apdu):
        sent.append(apdu)
        raise TransportError("port gone", code="port_lost")
    close_channel_raw(dead, 1)                     # never raises; no second try on a dead link
    assert sent == [H("00708001")]
