"""agent/bsp.py: SCP03t-style protection of 86/87/88 (docs/protocol.md §4.6)."""
from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent import bsp, tlv

S_ENC = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
S_MAC = bytes.fromhex("f0e0d0c0b0a090807060504030201000")
MCV0 = bytes.fromhex("11" * 16)


def _aes_ecb(key, block):
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def _aes_cbc(key, iv, data):
    e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return e.update(data) + e.finalize()


def _cmac(key, data):
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def test_cmac_rfc4493_vectors():
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    assert bsp.cmac_aes(key, b"").hex() == "bb1d6929e95937287fa37d129b756746"
    assert bsp.cmac_aes(key, bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")).hex() == \
        "070a16b46b4d4144f79bdd9dd04a287c"


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32])
def test_padding_always_added(n):
    data = os.urandom(n)
    p = bsp.pad(data)
    assert len(p) % 16 == 0 and len(p) > n and p[n] == 0x80 and set(p[n + 1:]) <= {0}
    assert bsp.unpad(p) == data


@pytest.mark.parametrize("bad", [bytes(16), b"\x01" * 16, b"A" * 15 + b"\x01", b"\x80" + bytes(16)])
def test_unpad_rejects(bad):
    with pytest.raises(bsp.BspError) as ei:
        bsp.unpad(bad)
    assert ei.value.reason == "padding" and ei.value.error_reason == 7


def test_wrap_matches_independent_construction():
    """Known-answer style check: counter-derived ICV, CBC, MAC over MCV||tag||len||ct, MCV chaining,
    MAC-only 88 moving the counter on; all recomputed here with plain AES/CMAC calls."""
    s = bsp.BspSession(S_ENC, S_MAC, MCV0)
    p1, p2, p3 = b"\xbf\x24\x00", b"\xbf\x25\x03\x5a\x01\x00", os.urandom(40)
    out1 = s.wrap(0x87, p1)
    out2 = s.wrap(0x88, p2, encrypt=False)
    out3 = s.wrap(0x86, p3)

    icv1 = _aes_ecb(S_ENC, (1).to_bytes(16, "big"))
    ct1 = _aes_cbc(S_ENC, icv1, p1 + b"\x80" + bytes(12))
    hdr1 = bytes([0x87, len(ct1) + 8])
    mac1 = _cmac(S_MAC, MCV0 + hdr1 + ct1)
    assert out1 == hdr1 + ct1 + mac1[:8]

    hdr2 = bytes([0x88, len(p2) + 8])
    mac2 = _cmac(S_MAC, mac1 + hdr2 + p2)
    assert out2 == hdr2 + p2 + mac2[:8]

    icv3 = _aes_ecb(S_ENC, (3).to_bytes(16, "big"))   # the 88 used counter 2
    ct3 = _aes_cbc(S_ENC, icv3, p3 + b"\x80" + bytes(7))
    hdr3 = bytes([0x86, len(ct3) + 8])
    mac3 = _cmac(S_MAC, mac2 + hdr3 + ct3)
    assert out3 == hdr3 + ct3 + mac3[:8]
    assert s.counter == 4 and s.mcv == mac3


def test_round_trip_and_state_kept_in_step():
    tx = bsp.BspSession(S_ENC, S_MAC, MCV0)
    rx = bsp.BspSession(S_ENC, S_MAC, MCV0)
    msgs = [(0x87, os.urandom(3), True), (0x88, os.urandom(100), False), (0x86, os.urandom(1007), True),
            (0x86, b"", True), (0x86, os.urandom(300), True)]
    for tag, pt, enc in msgs:
        assert rx.unwrap(tx.wrap(tag, pt, encrypt=enc), encrypted=enc, expected_tag=tag) == pt
    assert rx.counter == tx.counter == 6 and rx.mcv == tx.mcv


def test_long_length_header_mac_uses_received_header():
    tx, rx = bsp.BspSession(S_ENC, S_MAC, MCV0), bsp.BspSession(S_ENC, S_MAC, MCV0)
    seg = tx.wrap(0x86, os.urandom(500))
    assert seg[:2] == b"\x86\x82"
    assert len(rx.unwrap(seg)) == 500


def test_tamper_is_security_error_and_state_not_advanced():
    tx = bsp.BspSession(S_ENC, S_MAC, MCV0)
    seg = tx.wrap(0x86, b"profile data")
    for pos in range(2, len(seg)):
        rx = bsp.BspSession(S_ENC, S_MAC, MCV0)
        bad = bytearray(seg)
        bad[pos] ^= 0x40
        with pytest.raises(bsp.BspError) as ei:
            rx.unwrap(bytes(bad))
        assert ei.value.reason == "mac" and ei.value.error_reason == 8
        assert rx.counter == 1 and rx.mcv == MCV0
        assert rx.unwrap(seg) == b"profile data"  # the untouched segment still opens


def test_wrong_keys_fail_mac():
    seg = bsp.BspSession(S_ENC, S_MAC, MCV0).wrap(0x87, b"x")
    with pytest.raises(bsp.BspError, match="MAC"):
        bsp.BspSession(S_ENC, S_ENC, MCV0).unwrap(seg)
    with pytest.raises(bsp.BspError):
        bsp.BspSession(S_ENC, S_MAC, bytes(16)).unwrap(seg)


def test_structure_errors():
    rx = bsp.BspSession(S_ENC, S_MAC, MCV0)
    seg = bsp.BspSession(S_ENC, S_MAC, MCV0).wrap(0x87, b"abc")
    for bad, label in [(seg[:-1], "truncated"), (seg + b"\x00", "trailing"), (b"\x87\x05abcde", "short"),
                       (b"", "empty")]:
        with pytest.raises(bsp.BspError) as ei:
            rx.unwrap(bad)
        assert ei.value.reason == "structure" and ei.value.error_reason == 7, label
    with pytest.raises(bsp.BspError) as ei:
        rx.unwrap(seg, expected_tag=0x86)
    assert ei.value.reason == "structure"


def test_bad_padding_under_valid_mac_is_structure_error():
    # Build a segment whose MAC is right but whose plaintext lacks the 80 00.. padding.
    icv = _aes_ecb(S_ENC, (1).to_bytes(16, "big"))
    ct = _aes_cbc(S_ENC, icv, b"A" * 16)
    hdr = bytes([0x86, len(ct) + 8])
    mac = _cmac(S_MAC, MCV0 + hdr + ct)
    with pytest.raises(bsp.BspError) as ei:
        bsp.BspSession(S_ENC, S_MAC, MCV0).unwrap(hdr + ct + mac[:8])
    assert ei.value.reason == "padding" and ei.value.error_reason == 7
    # ciphertext not a block multiple, MAC right
    body = b"B" * 20
    hdr = bytes([0x86, len(body) + 8])
    mac = _cmac(S_MAC, MCV0 + hdr + body)
    with pytest.raises(bsp.BspError) as ei:
        bsp.BspSession(S_ENC, S_MAC, MCV0).unwrap(hdr + body + mac[:8])
    assert ei.value.reason == "structure"


def test_replace_keys_restarts_counter_and_mcv():
    s = bsp.BspSession(S_ENC, S_MAC, MCV0)
    s.wrap(0x87, b"a")
    s.wrap(0x88, b"b", encrypt=False)
    ppk_enc, ppk_mac, mcv = os.urandom(16), os.urandom(16), os.urandom(16)
    s.replace_keys(ppk_enc, ppk_mac, mcv)
    assert s.counter == 1 and s.mcv == mcv
    seg = s.wrap(0x86, b"ppk data")
    assert bsp.BspSession(ppk_enc, ppk_mac, mcv).unwrap(seg) == b"ppk data"
    with pytest.raises(ValueError):
        s.replace_keys(b"short", ppk_mac, mcv)
    with pytest.raises(ValueError):
        s.replace_keys(ppk_enc, ppk_mac, b"\x00" * 8)


def test_segment_sizing():
    assert bsp.max_plaintext(0x86) == 1007
    assert bsp.max_plaintext(0x88, encrypt=False) == 1008
    data = os.urandom(5000)
    tx, rx = bsp.BspSession(S_ENC, S_MAC, MCV0), bsp.BspSession(S_ENC, S_MAC, MCV0)
    segs = tx.wrap_segments(0x86, data)
    assert all(len(x) <= 1020 for x in segs)
    assert all(len(x) == 1020 for x in segs[:-1])
    assert b"".join(rx.unwrap(x) for x in segs) == data
    md = os.urandom(2100)
    segs = tx.wrap_segments(0x88, md, encrypt=False)
    assert [len(x) for x in segs[:-1]] == [1020, 1020]
    assert b"".join(rx.unwrap(x, encrypted=False) for x in segs) == md
    for size in (64, 200, 300, 500):
        n = bsp.max_plaintext(0x86, segment_size=size)
        one = bsp.BspSession(S_ENC, S_MAC, MCV0).wrap(0x86, bytes(n))
        assert len(one) <= size
        two = bsp.BspSession(S_ENC, S_MAC, MCV0).wrap(0x86, bytes(n + 1))
        assert len(two) > size
    assert tlv.parse_single(segs[0]).tag == 0x88
