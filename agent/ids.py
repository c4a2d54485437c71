"""Identifiers: ICCID (swapped-nibble BCD, Luhn), EID (packed BCD, ISO 7064
mod 97-10), IMEI/TAC. docs/protocol.md §8.2."""
from __future__ import annotations

import re

from .errors import InputError

_DIGITS = r"^[0-9]+$"          # patterns compiled by re on first use (its cache), not at import


# --- ICCID -----------------------------------------------------------------

def luhn_check_digit(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(digits: str) -> bool:
    return len(digits) >= 2 and luhn_check_digit(digits[:-1]) == digits[-1]


_ICCID_TEXT = r"([0-9]{18,20})[Ff]*"


def parse_iccid(text: str) -> str:
    """The one ICCID parser (every command, the daemon's socket, the ES10 client): the ICCID's
    digits from what a person or a modem gives. Surrounding whitespace and spaces between
    digit groups are dropped; the F padding of the card's 20-nibble form (``8949…019F``, as
    modems print it) is accepted. 18 to 20 ASCII digits (ITU-T E.118)."""
    s = text.strip().replace(" ", "") if isinstance(text, str) else ""
    m = re.fullmatch(_ICCID_TEXT, s)
    if not m or len(s) > 20:
        raise InputError(f"ICCID {text!r} must be 18 to 20 digits 0-9 (an F-padded 20-character form such as "
                         "8949…019F is accepted too)", code="bad_iccid")
    return m.group(1)


def iccid_to_bytes(iccid: str) -> bytes:
    """ICCID digits -> 10 bytes, nibbles swapped per byte, padded with F.

    Odd and even digit counts both give 10 bytes (docs/protocol.md §8.2). Another
    LPA once encoded even-length ICCIDs one byte short, and cards answered such
    requests with iccidOrAidNotFound."""
    s = parse_iccid(iccid).ljust(20, "F")
    return bytes(int(s[i + 1] + s[i], 16) for i in range(0, 20, 2))


def iccid_from_bytes(b: bytes) -> str:
    out = []
    for byte in b:
        for nib in (byte & 0x0F, byte >> 4):
            if nib == 0xF:
                continue
            out.append("0123456789ABCDE"[nib])
    return "".join(out)


def make_iccid(prefix: str, serial: int, length: int = 19) -> str:
    """Build an ICCID: prefix + zero-padded serial + Luhn check digit."""
    body = prefix + str(serial).zfill(length - 1 - len(prefix))
    return body + luhn_check_digit(body)


# --- EID -------------------------------------------------------------------

def eid_check_digits(first30: str) -> str:
    """ISO 7064 mod 97-10 check digits for the first 30 digits of an EID."""
    return f"{98 - int(first30 + '00') % 97:02d}"


def eid_valid(eid: str) -> bool:
    return len(eid) == 32 and bool(re.match(_DIGITS, eid)) and int(eid) % 97 == 1


def make_eid(first30: str) -> str:
    if len(first30) != 30 or not re.match(_DIGITS, first30):
        raise ValueError("EID body must be 30 digits")
    return first30 + eid_check_digits(first30)


def eid_to_bytes(eid: str) -> bytes:
    if len(eid) != 32 or not re.match(_DIGITS, eid):
        raise InputError(f"EID {eid!r} must be 32 digits", code="bad_eid")
    return bytes.fromhex(eid)


def eid_from_bytes(b: bytes) -> str:
    return b.hex().upper()


# --- IMEI / TAC --------------------------------------------------------------

def _tbcd(digits: str) -> bytes:
    """3GPP TS 29.002 TBCD-STRING: two digits per octet, first digit in the low nibble."""
    s = digits if len(digits) % 2 == 0 else digits + "F"
    return bytes(int(s[i + 1] + s[i], 16) for i in range(0, len(s), 2))


_IMEI_TEXT = r"[0-9]+(?:[ -][0-9]+)*"


def normalise_imei(imei: str) -> str:
    """The 15-digit IMEI that DeviceInfo carries, from what a person or a modem gives.

    3GPP TS 23.003 §6.2: an IMEI is 15 digits, TAC (8) + SNR (6) + a Luhn check digit
    (Annex B); an IMEISV is 16 digits, TAC + SNR + SVN (2), without a check digit. Either
    is accepted (an IMEISV gives its IMEI: TAC + SNR + the computed check digit); a 15-digit
    IMEI must carry the right check digit. Only ASCII digits, optionally grouped by spaces or
    hyphens as printed on labels (35-693803-564380-9); a letter is an error, never dropped."""
    text = imei.strip() if isinstance(imei, str) else ""
    if text and not re.fullmatch(_IMEI_TEXT, text):
        raise InputError(f"IMEI {imei!r} may hold only the digits 0-9 (TS 23.003: 15 digits, or 16 for an "
                         "IMEISV)", code="bad_imei")
    digits = text.replace(" ", "").replace("-", "")
    if len(digits) == 15:
        if luhn_check_digit(digits[:14]) != digits[14]:
            raise InputError(f"IMEI {imei!r} has a wrong check digit: the last digit of an IMEI is the Luhn "
                             f"check digit of the first 14, here {luhn_check_digit(digits[:14])} "
                             "(TS 23.003 Annex B)", code="bad_imei")
        return digits
    if len(digits) == 16:            # IMEISV: TAC + SNR + SVN; its IMEI is TAC + SNR + check digit
        return digits[:14] + luhn_check_digit(digits[:14])
    hint = "; is the check digit missing?" if len(digits) == 14 else ""
    raise InputError(f"IMEI {imei!r} has {len(digits)} digits: an IMEI has 15 digits 0-9 (TAC, serial number, "
                     f"check digit), an IMEISV 16 (TS 23.003 §6.2){hint}", code="bad_imei")


def tac_from_imei(imei: str) -> bytes:
    """DeviceInfo.tac (SGP.22 §4.2): the first 8 IMEI digits as 4 octets of TBCD
    (3GPP TS 29.002), i.e. nibble-swapped: TAC 35693803 → 53 96 83 30."""
    return _tbcd(normalise_imei(imei)[:8])


def imei_to_bytes(imei: str) -> bytes:
    """DeviceInfo.imei (SGP.22 v2.1+ §4.2): 8 octets of TBCD, except that the last
    octet holds the check digit in the high nibble and an F filler in the low one."""
    d = normalise_imei(imei)
    return _tbcd(d[:14]) + bytes([(int(d[14]) << 4) | 0x0F])
