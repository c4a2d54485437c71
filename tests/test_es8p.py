"""agent/es8p.py (+ agent/sim/upp.py): bind a BPP, cut it into ES10 commands, open it eUICC-side."""
from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent import crypto, es8p, tlv
from agent.errors import ProtocolError
from agent.ids import iccid_to_bytes
from agent.sim import upp as simupp

EID = bytes.fromhex("89049032123451234512345678901235")
TXID = bytes.fromhex("00112233445566778899aabbccddeeff")
HOST_ID = b"esim-agent-test"
ICCID = "8944123456789012345"
CONFIGURE_ISDP = bytes.fromhex("bf2400")
STORE_METADATA = tlv.encode(0xBF25, tlv.encode(0x5A, iccid_to_bytes(ICCID)) + tlv.encode(0x91, b"Test SPN")
                            + tlv.encode(0x92, b"Test profile"))

DPPB = crypto.generate_key()
OTHER = crypto.generate_key()


def _upp(**kw):
    return simupp.make_upp(iccid=ICCID, imsi="001010123456063", ki=bytes(range(16)), opc=bytes(16), **kw)


def _bind(*, ppk=None, upp=None, store_metadata=STORE_METADATA, segment_size=1020, txid=TXID):
    otsk = crypto.generate_key()
    bpp, otsk_dp = es8p.bind_bpp(transaction_id=txid, euicc_otpk=crypto.public_point(otsk), dppb_key=DPPB,
                                 eid=EID, host_id=HOST_ID, configure_isdp=CONFIGURE_ISDP,
                                 store_metadata=store_metadata, upp=upp if upp is not None else _upp(),
                                 ppk=ppk, segment_size=segment_size)
    return bpp, otsk, otsk_dp


def _receiver(otsk, *, dppb=DPPB, txid=TXID):
    return es8p.BppReceiver(euicc_otsk=otsk, dppb_public_key=dppb.public_key(), eid=EID,
                            expected_transaction_id=txid)


def _run(cmds, rx):
    events = []
    for c in cmds:
        events += rx.feed(c)
    return events


def _error(fn) -> tuple[int, int]:
    with pytest.raises(es8p.BppError) as ei:
        fn()
    return ei.value.bpp_command_id, ei.value.error_reason


# --- split_bpp ---------------------------------------------------------------------------

def test_split_bpp_command_sequence():
    bpp, _, _ = _bind(ppk=True, upp=_upp(pad_to=5000))
    cmds = es8p.split_bpp(bpp)
    assert b"".join(cmds) == bpp  # slices only, nothing re-encoded
    outer = tlv.parse_single(bpp)
    parts = tlv.children(outer)
    assert cmds[0] == bpp[:outer.header_len] + parts[0].raw and parts[0].tag == 0xBF23
    a0, a1, a2, a3 = parts[1:]
    assert cmds[1] == a0.raw  # header + its only 87
    assert cmds[2] == a1.raw[:a1.header_len]
    n88 = len(tlv.children(a1))
    assert cmds[3:3 + n88] == [t.raw for t in tlv.children(a1)]
    assert cmds[3 + n88] == a2.raw
    assert cmds[4 + n88] == a3.raw[:a3.header_len]
    rest = cmds[5 + n88:]
    assert rest == [t.raw for t in tlv.children(a3)] and len(rest) >= 5
    assert all(c[0] == 0x86 and len(c) <= 1020 for c in rest)


def test_split_bpp_without_a2():
    bpp, _, _ = _bind()
    kinds = [c[:1].hex() for c in es8p.split_bpp(bpp)]
    assert kinds[:4] == ["bf", "a0", "a1", "88"] and kinds[4] == "a3" and set(kinds[5:]) == {"86"}


def test_split_bpp_extra_87_goes_alone():
    bpp, _, _ = _bind()
    outer = tlv.parse_single(bpp)
    p = tlv.children(outer)
    extra = tlv.encode(0x87, b"\x00" * 24)
    a0 = tlv.encode(0xA0, p[1].value + extra)
    rebuilt = tlv.encode(0xBF36, p[0].raw + a0 + b"".join(x.raw for x in p[2:]))
    cmds = es8p.split_bpp(rebuilt)
    assert cmds[1] == a0[:2] + p[1].value and cmds[2] == extra


@pytest.mark.parametrize("mutate", [
    lambda b: b"\x30" + b[1:],                      # not BF36
    lambda b: b + b"\x00",                          # trailing byte
    lambda b: b[:-1],                               # truncated
    lambda b: b"",                                  # empty
])
def test_split_bpp_malformed(mutate):
    bpp, _, _ = _bind()
    with pytest.raises(ProtocolError) as ei:
        es8p.split_bpp(mutate(bpp))
    assert ei.value.code == "malformed_bpp"


def test_split_bpp_wrong_order_or_content():
    bpp, _, _ = _bind()
    p = tlv.children(tlv.parse_single(bpp))
    swapped = tlv.encode(0xBF36, p[0].raw + p[2].raw + p[1].raw + p[3].raw)
    with pytest.raises(ProtocolError, match="order"):
        es8p.split_bpp(swapped)
    bad_inner = tlv.encode(0xBF36, p[0].raw + tlv.encode(0xA0, tlv.encode(0x86, b"x" * 24)) + p[2].raw + p[3].raw)
    with pytest.raises(ProtocolError, match="87"):
        es8p.split_bpp(bad_inner)
    empty_a0 = tlv.encode(0xBF36, p[0].raw + tlv.encode(0xA0, b"") + p[2].raw + p[3].raw)
    with pytest.raises(ProtocolError):
        es8p.split_bpp(empty_a0)


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("ppk", [None, True, (os.urandom(16), os.urandom(16), os.urandom(16))])
def test_round_trip(ppk):
    upp = _upp(pad_to=12000)
    bpp, otsk, _ = _bind(ppk=ppk, upp=upp)
    rx = _receiver(otsk)
    events = _run(es8p.split_bpp(bpp), rx)
    assert rx.complete
    assert rx.configure_isdp_request == CONFIGURE_ISDP
    assert rx.store_metadata_request == STORE_METADATA
    assert bytes(rx.upp) == upp
    assert rx.ppk_used == (ppk is not None)
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["initialiseSecureChannel", "configureISDP", "storeMetadata"]
    assert ("replaceSessionKeys" in kinds) == (ppk is not None)
    assert b"".join(e.data for e in events if e.kind == "loadProfileElements") == upp
    assert rx.isc.transaction_id == TXID and rx.isc.host_id == HOST_ID
    assert simupp.upp_iccid(bytes(rx.upp)) == ICCID


def test_ppk_tuple_keys_really_protect_the_86():
    keys = (os.urandom(16), os.urandom(16), os.urandom(16))
    bpp, _, _ = _bind(ppk=keys)
    a3 = tlv.children(tlv.parse_single(bpp))[-1]
    from agent.bsp import BspSession
    s = BspSession(keys[0], keys[1], keys[2])
    assert b"".join(s.unwrap(t.raw) for t in tlv.children(a3)) == _upp()


def test_whole_bpp_in_one_feed_and_per_method_api():
    bpp, otsk, _ = _bind(ppk=True)
    rx = _receiver(otsk)
    rx.feed(bpp)
    assert rx.complete and bytes(rx.upp) == _upp()

    rx = _receiver(otsk)
    p = tlv.children(tlv.parse_single(bpp))
    assert rx.initialise(p[0].raw).otpk_dp
    assert rx.configure_isdp(tlv.children(p[1])[0].raw) == CONFIGURE_ISDP
    assert rx.store_metadata(tlv.children(p[2])[0].raw) == STORE_METADATA
    rx.replace_session_keys(tlv.children(p[3])[0].raw)
    out = b"".join(rx.profile_segment(t.raw) for t in tlv.children(p[4]))
    assert out == _upp()


def test_metadata_over_two_88_segments():
    md = tlv.encode(0xBF25, tlv.encode(0x5A, iccid_to_bytes(ICCID)) + tlv.encode(0x92, b"N" * 64)
                    + tlv.encode(0xB6, b"\x30\x00" * 120))
    bpp, otsk, _ = _bind(store_metadata=md, segment_size=200)
    a1 = tlv.children(tlv.parse_single(bpp))[2]
    assert len(tlv.children(a1)) >= 2
    rx = _receiver(otsk)
    events = _run(es8p.split_bpp(bpp), rx)
    assert [e.data for e in events if e.kind == "storeMetadata"] == [md]
    assert rx.complete and bytes(rx.upp) == _upp()


def test_independent_open_of_configure_isdp():
    """Re-derive the keys without es8p/bsp: ECDH, X9.63 via hashlib, AES-CBC by hand, and check smdpSign."""
    bpp, otsk, otsk_dp = _bind()
    p = tlv.children(tlv.parse_single(bpp))
    isc = {t.tag: t for t in tlv.children(p[0])}
    signed = isc[0x82].raw + isc[0x80].raw + isc[0xA6].raw + isc[0x5F49].raw
    signed += b"\x5f\x49\x41" + crypto.public_point(otsk)
    assert crypto.verify_raw(DPPB.public_key(), signed, isc[0x5F37].value)
    assert isc[0x82].value == b"\x01" and isc[0x80].value == TXID
    assert isc[0xA6].value == b"\x80\x01\x88\x81\x01\x10\x84" + bytes([len(HOST_ID)]) + HOST_ID
    assert isc[0x5F49].value == crypto.public_point(otsk_dp)
    shs = otsk.exchange(ec.ECDH(), otsk_dp.public_key())
    info = b"\x88\x10" + bytes([len(HOST_ID)]) + HOST_ID + b"\x10" + EID
    km = b"".join(hashlib.sha256(shs + i.to_bytes(4, "big") + info).digest() for i in (1, 2))
    s_enc = km[16:32]
    e = Cipher(algorithms.AES(s_enc), modes.ECB()).encryptor()
    icv = e.update((1).to_bytes(16, "big")) + e.finalize()
    seg87 = tlv.children(p[1])[0].value
    d = Cipher(algorithms.AES(s_enc), modes.CBC(icv)).decryptor()
    pt = d.update(seg87[:-8]) + d.finalize()
    assert pt == CONFIGURE_ISDP + b"\x80" + bytes(12)


# --- refusals -------------------------------------------------------------------------------

def _tamper(cmds, index, pos=-3):
    c = bytearray(cmds[index])
    c[pos] ^= 0x01
    return cmds[:index] + [bytes(c)] + cmds[index + 1:]


def test_tampered_segments_refused_with_right_command_id():
    bpp, otsk, _ = _bind(ppk=True)
    cmds = es8p.split_bpp(bpp)
    # command index -> expected bppCommandId: 1 A0/87, 3 first 88, 4 A2/87, 6 first 86, last 86
    for idx, cmd_id in [(1, 1), (3, 2), (4, 4), (6, 5), (len(cmds) - 1, 5)]:
        rx = _receiver(otsk)
        assert _error(lambda: _run(_tamper(cmds, idx), rx)) == (cmd_id, es8p.ERR_SCP03T_SECURITY)
        assert rx.state == "failed" and not rx.complete
        with pytest.raises(es8p.BppSequenceError):
            rx.feed(cmds[idx])  # nothing more after a failure


def test_every_byte_after_bf23_is_protected():
    bpp, otsk, _ = _bind(ppk=True, upp=_upp())
    cmds = es8p.split_bpp(bpp)
    start = len(cmds[0])
    for pos in range(start, len(bpp), 7):
        bad = bytearray(bpp)
        bad[pos] ^= 0x80
        rx = _receiver(otsk)
        try:
            _run(es8p.split_bpp(bytes(bad)), rx)
        except (es8p.BppError, ProtocolError):
            continue
        assert not rx.complete, f"flip at {pos} accepted"


def test_wrong_signature_key():
    bpp, otsk, _ = _bind()
    assert _error(lambda: _run(es8p.split_bpp(bpp), _receiver(otsk, dppb=OTHER))) == (0, es8p.ERR_INVALID_SIGNATURE)


def test_altered_signature_or_signed_field():
    bpp, otsk, _ = _bind()
    cmds = es8p.split_bpp(bpp)
    assert _error(lambda: _run(_tamper(cmds, 0, -1), _receiver(otsk))) == (0, es8p.ERR_INVALID_SIGNATURE)
    # flip a byte of otPK.DP inside BF23 (signed data)
    pos = cmds[0].index(b"\x5f\x49\x41") + 10
    assert _error(lambda: _run(_tamper(cmds, 0, pos), _receiver(otsk))) == (0, es8p.ERR_INVALID_SIGNATURE)


def test_wrong_euicc_key_fails_signature():
    # smdpSign covers otPK.EUICC: a different one-time key must not verify
    bpp, _, _ = _bind()
    assert _error(lambda: _run(es8p.split_bpp(bpp), _receiver(crypto.generate_key()))) == \
        (0, es8p.ERR_INVALID_SIGNATURE)


def test_wrong_transaction_id():
    bpp, otsk, _ = _bind()
    assert _error(lambda: _run(es8p.split_bpp(bpp), _receiver(otsk, txid=b"\x01" * 16))) == \
        (0, es8p.ERR_INVALID_TRANSACTION_ID)


def _signed_isc(otsk, *, remote_op=b"\x01", key_type=b"\x88", key_len=b"\x10"):
    otsk_dp = crypto.generate_key()
    fields = (tlv.encode(0x82, remote_op) + tlv.encode(0x80, TXID)
              + tlv.encode(0xA6, tlv.encode(0x80, key_type) + tlv.encode(0x81, key_len) + tlv.encode(0x84, HOST_ID))
              + tlv.encode(0x5F49, crypto.public_point(otsk_dp)))
    sig = crypto.sign_raw(DPPB, fields + tlv.encode(0x5F49, crypto.public_point(otsk)))
    return tlv.encode(0xBF23, fields + tlv.encode(0x5F37, sig))


def test_initialise_checks_crt_and_remote_op():
    otsk = crypto.generate_key()
    assert _receiver(otsk).initialise(_signed_isc(otsk)).host_id == HOST_ID
    assert _error(lambda: _receiver(otsk).initialise(_signed_isc(otsk, key_type=b"\x89"))) == \
        (0, es8p.ERR_UNSUPPORTED_CRT_VALUES)
    assert _error(lambda: _receiver(otsk).initialise(_signed_isc(otsk, key_len=b"\x20"))) == \
        (0, es8p.ERR_UNSUPPORTED_CRT_VALUES)
    assert _error(lambda: _receiver(otsk).initialise(_signed_isc(otsk, remote_op=b"\x02"))) == \
        (0, es8p.ERR_UNSUPPORTED_REMOTE_OPERATION_TYPE)
    assert _error(lambda: _receiver(otsk).initialise(b"\xbf\x23\x03\x82\x01\x01")) == \
        (0, es8p.ERR_INCORRECT_INPUT_VALUES)


def test_out_of_order_commands():
    bpp, otsk, _ = _bind()
    cmds = es8p.split_bpp(bpp)
    with pytest.raises(es8p.BppSequenceError):
        _receiver(otsk).feed(cmds[1])                  # A0 before BF36/BF23
    rx = _receiver(otsk)
    rx.feed(cmds[0])
    with pytest.raises(es8p.BppSequenceError):
        rx.feed(cmds[2])                               # A1 before A0
    rx = _receiver(otsk)
    with pytest.raises(es8p.BppSequenceError):
        rx.profile_segment(cmds[-1])                   # no session at all
    rx = _receiver(otsk)
    _run(cmds[:3], rx)
    with pytest.raises(es8p.BppError):
        rx.feed(cmds[-1])                              # 86 outside A3


def test_bppcommandid_and_reason_names():
    err = es8p.BppError(5, 8, "x")
    assert err.code == "bpp_scp03t_security_error"
    assert err.details == {"bppCommandId": 5, "errorReason": 8}
    assert es8p.BppError(0, 2, "x").code == "bpp_invalid_signature"


# --- UPP --------------------------------------------------------------------------------------

def test_make_upp_structure_and_parse():
    u = _upp()
    assert len(u) < 2048
    pes = tlv.parse_all(u)
    assert [p.tag for p in pes] == [0xA0, 0xB0, 0xA3, 0xA2, 0xB3, 0xA4, 0xAA]
    hdr = {t.tag: t.value for t in tlv.children(pes[0])}
    assert hdr[0x80] == b"\x02" and hdr[0x83] == bytes.fromhex("8944123456789012345f")
    info = simupp.parse_upp(u)
    assert (info.iccid, info.imsi, info.ki, info.opc, info.algorithm_id, info.ended) == \
        (ICCID, "001010123456063", bytes(range(16)), bytes(16), 1, True)
    # every PE after the header starts with PEHeader A0{80 00, 81 id}, ids 1, 2, 3, ...
    ids = [tlv.children(tlv.children(p)[0])[1].value[0] for p in pes[1:]]
    assert ids == list(range(1, len(pes)))
    # EF-ICCID in the MF PE is nibble-swapped
    ef_iccid = tlv.find(tlv.children(pes[1]), 0xA4)
    assert tlv.find(tlv.children(ef_iccid), 0x83).value == iccid_to_bytes(ICCID)


def test_imsi_encoding():
    assert simupp.encode_imsi("001010123456063").hex() == "080910101032540636"
    assert simupp.encode_imsi("00101012345606").hex() == "0801101010325406f6"
    assert simupp.encode_imsi("262011234567").hex() == "07212610214365f7ff"
    for imsi in ("001010123456063", "00101012345606", "262011234567"):
        assert simupp.decode_imsi(simupp.encode_imsi(imsi)) == imsi


@pytest.mark.parametrize("size", [3000, 12000, 12257])
def test_make_upp_pad_to(size):
    u = _upp(pad_to=size)
    assert len(u) == size
    assert simupp.parse_upp(u).ended and simupp.upp_iccid(u) == ICCID


def _filler(upp: bytes) -> tuple[int, int, bytes]:
    """(filler PE length, its PE id, the filler EF's content) of a padded UPP."""
    gfm = [p for p in tlv.parse_all(upp) if p.tag == 0xA1]
    assert len(gfm) == 1
    hdr, cmds = tlv.children(gfm[0])
    create = tlv.children(tlv.children(cmds)[0])
    return len(gfm[0].raw), tlv.children(hdr)[1].value[0], tlv.find(create, 0x81).value


@pytest.mark.parametrize("size", [427, 527, 537, 540, 558, 656, 690, 691, 700, 12288, 65937, 65949, 66000])
def test_make_upp_padding_is_the_largest_filler_that_fits(size):
    """pad_to: the filler EF gets the largest content whose PE fits (exactly pad_to bytes,
    or a few short where a longer length field makes an exact fit impossible); its content is
    the pattern byte i = 7·i + 3 (mod 256)."""
    u = _upp(pad_to=size)
    assert size - 3 <= len(u) <= size
    pe_len, ident, content = _filler(u)
    assert content == bytes((i * 7 + 3) & 0xFF for i in range(len(content)))
    budget = pe_len + size - len(u)       # the bytes the filler PE could have had
    assert len(simupp._filler_pe(ident, len(content) + 1)) > budget


def test_make_upp_padding_is_quick():
    """A 12 KB package is built in well under a millisecond or two (it was ~80 ms when the
    filler was regenerated byte by byte for every candidate size)."""
    import time
    t = time.perf_counter()
    for _ in range(20):
        _upp(pad_to=12288)
    assert (time.perf_counter() - t) / 20 < 0.02


def test_upp_iccid_errors():
    with pytest.raises(ProtocolError) as ei:
        simupp.upp_iccid(b"\xb0\x00")
    assert ei.value.code == "malformed_upp"
    with pytest.raises(ProtocolError):
        simupp.upp_iccid(b"\xa0\x03\x80\x01\x02")
    with pytest.raises(ProtocolError):
        simupp.parse_upp(b"\xa0\x05\x80")


def test_missing_configure_isdp_refused():
    bpp, otsk, _ = _bind()
    p = tlv.children(tlv.parse_single(bpp))
    no_87 = tlv.encode(0xBF36, p[0].raw + tlv.encode(0xA0, b"") + p[2].raw + p[3].raw)
    with pytest.raises(es8p.BppSequenceError) as ei:
        _receiver(otsk).feed(no_87)
    assert ei.value.bpp_command_id == es8p.CMD_CONFIGURE_ISDP
