"""Identifier codings (docs/protocol.md §8.2, SGP.22 §4.2)."""
import pytest

from agent.errors import InputError
from agent.ids import (eid_check_digits, eid_from_bytes, eid_to_bytes, eid_valid, iccid_from_bytes,
                       iccid_to_bytes, imei_to_bytes, luhn_check_digit, luhn_valid, make_eid, make_iccid,
                       normalise_imei, parse_iccid, tac_from_imei)


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
    # IMEISV (16 digits, no check digit): the IMEI is its first 14 + the Luhn check digit
    assert imei_to_bytes("3569380356438012") == imei_to_bytes("356938035643809")
    with pytest.raises(InputError):
        imei_to_bytes("1234")


# --- issue 9 item 5: identifiers as the specifications define them ---------------------------------

@pytest.mark.parametrize("bad,words", [
    ("35693803564380A", "digits 0-9"),                   # a letter: refused, not dropped
    ("3569380356438O9", "digits 0-9"),                   # letter O for zero
    ("356938035643808", "check digit"),                  # wrong Luhn check digit
    ("\uff13\uff15\uff16\uff19\uff13\uff18\uff10\uff13\uff15\uff16\uff14\uff13\uff18\uff10\uff19", "digits 0-9"),
    ("\u0663\u0665\u0666\u0669\u0663\u0668\u0660\u0663\u0665\u0666\u0664\u0663\u0668\u0660\u0669", "digits 0-9"),
    ("35693803564380", "15 digits"),                     # 14 digits: the check digit is missing
    ("1234", "15 digits"),
    ("35693803564380912", "15 digits"),                  # 17 digits
    ("", "15 digits"),
])
def test_imei_refused_as_ts_23003_defines_it(bad, words):
    """TS 23.003 §6.2: an IMEI is 15 digits (TAC, SNR, Luhn check digit), an IMEISV 16 (TAC, SNR, SVN)."""
    for fn in (imei_to_bytes, tac_from_imei, normalise_imei):
        with pytest.raises(InputError) as ei:
            fn(bad)
        assert ei.value.code == "bad_imei" and ei.value.exit_code == 2
        assert words in ei.value.message, ei.value.message


def test_imei_forms_accepted_and_normalised():
    want = imei_to_bytes("356938035643809")
    assert normalise_imei(" 356938035643809\n") == "356938035643809"
    assert normalise_imei("35-693803-564380-9") == "356938035643809"      # grouped as printed on labels
    assert normalise_imei("3569380356438012") == "356938035643809"        # IMEISV: TAC+SNR, check digit added
    assert imei_to_bytes("35 693803 564380 9") == want
    assert imei_to_bytes("3569380356438012") == want


@pytest.mark.parametrize("text", ["8949000000000000019", " 8949000000000000019 ", "8949000000000000019F",
                                  "8949000000000000019f", "8949 0000 0000 0000 019"])
def test_one_iccid_parser(text):
    assert parse_iccid(text) == "8949000000000000019"
    assert iccid_to_bytes(text) == iccid_to_bytes("8949000000000000019")


@pytest.mark.parametrize("bad", ["8949000000000000019FF0", "F8949000000000000019", "8949-0000-0000-0000-019",
                                 "89490000000000000\uff119", "8949000000000000F19"])
def test_iccid_parser_refuses(bad):
    with pytest.raises(InputError) as ei:
        parse_iccid(bad)
    assert ei.value.code == "bad_iccid"
