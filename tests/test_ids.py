"""Identifier codings (docs/protocol.md §8.2, SGP.22 §4.2)."""
import pytest

from agent.errors import InputError
from agent.ids import (eid_check_digits, eid_from_bytes, eid_to_bytes, eid_valid, iccid_from_bytes,
                       iccid_to_bytes, imei_to_bytes, luhn_check_digit, luhn_valid, make_eid, make_iccid,
                       tac_from_imei)


def test_iccid_swapped_bcd_both_lengths():
    assert iccid_to_bytes("8944123456789012345") == bytes.fromhex("98442143658709214 3F5".replace(" ", ""))
    assert iccid_to_bytes("89441234567890123456") == bytes.fromhex("98442143658709214365")
    for i in ("8944123456789012345", "89441234567890123456"):
        assert len(iccid_to_bytes(i)) == 10 and iccid_from_bytes(iccid_to_bytes(i)) == i


@pytest.mark.parametrize("bad", ["", "12345", "89441234567890123456789", "89ab123456789012345"])
def test_iccid_rejects(bad):
    with pytest.raises(InputError):
        iccid_to_bytes(bad)


def test_luhn_and_make_iccid():
    assert luhn_check_digit("7992739871") == "3" and luhn_valid("79927398713")
    i = make_iccid("8949", 17)
    assert len(i) == 19 and luhn_valid(i)


def test_eid_mod97():
    eid = make_eid("890490320012345123451234567890")
    assert eid_valid(eid) and int(eid) % 97 == 1 and eid[-2:] == eid_check_digits(eid[:30])
    assert not eid_valid(eid[:-1] + str((int(eid[-1]) + 1) % 10))
    assert eid_from_bytes(eid_to_bytes(eid)) == eid and eid_to_bytes(eid)[0] == 0x89   # packed BCD, no swap


def test_tac_is_tbcd():
    # SGP.22 §4.2: TAC = 4 octets of TBCD (3GPP TS 29.002): first digit in the low nibble
    assert tac_from_imei("356938035643809") == bytes.fromhex("53968330")


def test_imei_last_octet_check_digit_high_nibble():
    # SGP.22 v2.1+ §4.2: TBCD, except the last octet holds the check digit in the high nibble, F in the low
    assert imei_to_bytes("356938035643809") == bytes.fromhex("539683306534089F")
    # 14 digits: the Luhn check digit is computed; IMEISV (16): the IMEI is its first 14 + check digit
    assert imei_to_bytes("35693803564380") == imei_to_bytes("356938035643809")
    assert imei_to_bytes("3569380356438012") == imei_to_bytes("356938035643809")
    with pytest.raises(InputError):
        imei_to_bytes("1234")
