"""Per-modem behaviour knobs ("quirks"), docs/modem.md §1.5 and §2.

Modems interpret TS 27.007 differently; rather than sprinkling model checks
through the AT code, every deviation is a named quirk. The effective quirks
come from three layers, later ones winning:

1. ``DEFAULTS`` (standard behaviour, with auto-detection where it is safe),
2. the table below, matched on the AT+CGMI / AT+CGMM answers,
3. what the user forces (``[quirks]`` in the config file, or the CLI).

The result is a plain dict, exposed as ``transport.quirks``; the APDU layer
reads ``max_apdu`` (size of STORE DATA blocks) and ``max_get_response``.
"""
from __future__ import annotations

import re

from ..errors import UsageError

#: Every known quirk, its default and what it means.
DEFAULTS: dict = {
    # CCHO/CGLA/CSIM answers arrive without their "+XXX: " prefix (Fibocom FM350,
    # lpac#179). None = auto: accept a strictly hex/digit bare line when no
    # prefixed line came, and remember that the modem does this.
    "no_prefix": None,
    # "=?" test commands answer ERROR or nothing although the real command works
    # (Fibocom FG132-GL, Quectel EM05-G; docs/modem.md §1.3): skip the probe, try the real command.
    "no_test_forms": False,
    # Qualcomm/Foxconn firmware rejects lower-case hex (lpac#428). We always send
    # upper case; kept so the table documents it.
    "uppercase_hex": True,
    # Put the AT+CCHO session id into the CLA channel bits when it is 1..19
    # (Quectel EG25 accepts/needs 81..; docs/modem.md §1.2).
    # None = auto (small integer ids go to CLA, opaque handles give channel 0),
    # True = always when it is 1..19, False = never (channel bits 0, the MT patches CLA).
    "cgla_channel_in_cla": None,
    # The modem has no AT+CCHC (Sierra EM9191, lpac#187): do not send it.
    "no_cchc": False,
    # Cap of the 61xx → GET RESPONSE loop (EC800G answers 6100 forever).
    "max_get_response": None,
    # Largest C-APDU (header + Lc + data + Le) the modem carries; longer → CME 3.
    # The APDU layer sizes STORE DATA blocks from it.
    "max_apdu": None,
    # Send TERMINAL CAPABILITY (eUICC: LPM + profile download, ETSI TS 102 221
    # §11.1.19.2.4) once after opening, for modems that do not (docs/modem.md §4).
    "terminal_capability": False,
    # After a profile switch the modem does not re-read the SIM by itself: cycle
    # AT+CFUN=0 / AT+CFUN=1 (Quectel EG916Q without a SIM-detect pin; docs/modem.md §3).
    # CFUN=0 can make a USB modem re-enumerate: the agent waits for the port to come back.
    "cfun_after_switch": False,
}

#: (manufacturer regex, model regex, quirks) — matched case-insensitively
#: against AT+CGMI / AT+CGMM. Sources: docs/modem.md §1.5.
TABLE: list[tuple[str, str, dict]] = [
    (r"fibocom", r"fm350", {"no_prefix": True, "no_test_forms": True}),
    (r"fibocom", r"fg132", {"no_test_forms": True}),
    (r"quectel", r"em05", {"no_test_forms": True}),
    (r"quectel", r"eg25|ec2[05]|eg9[15]|eg916", {"cgla_channel_in_cla": True}),
    (r"quectel", r"eg916", {"cfun_after_switch": True}),
    (r"quectel", r"ec800g", {"max_get_response": 8}),
    (r"foxconn|qualcomm|dell", r".*", {"uppercase_hex": True}),
    (r"sierra", r"mc7455", {"cgla_channel_in_cla": False}),
    (r"sierra", r"em919", {"no_cchc": True}),
    (r"wavecom|moxa", r".*", {"max_apdu": 261}),
]

TERMINAL_CAPABILITY_APDU = bytes.fromhex("80AA00000AA9088100820101830107")

_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off"}
_TRISTATE = {"no_prefix", "cgla_channel_in_cla"}
_INTS = {"max_get_response", "max_apdu"}
#: Upper bound of the number quirks (an extended-length APDU is at most 65 544 bytes).
_INT_MAX = 65535


def table_quirks(manufacturer: str | None, model: str | None) -> dict:
    """Quirks the table lists for this modem (empty dict when unknown)."""
    out: dict = {}
    man, mod = (manufacturer or "").lower(), (model or "").lower()
    for man_re, mod_re, q in TABLE:
        if re.search(man_re, man) and re.search(mod_re, mod):
            out.update(q)
    return out


def _coerce(key: str, value):
    """Config/CLI values arrive as bool/int or strings ("true", "255", "auto")."""
    if isinstance(value, str):
        v = value.strip().lower()
        if key in _TRISTATE and v in ("auto", "none", ""):
            return None
        if key in _INTS:
            if v in ("none", "", "0"):
                return None
            if v.isascii() and v.isdigit() and len(v) <= 9:   # "²".isdigit() is true, int() refuses it
                return _coerce(key, int(v))
        elif v in _BOOL_TRUE:
            return True
        elif v in _BOOL_FALSE:
            return False
        shown = repr(value) if len(value) <= 40 else repr(value[:40]) + f"… ({len(value)} characters)"
        raise UsageError(f"quirk {key}: cannot understand value {shown}", code="bad_quirk")
    if key in _INTS:
        if value is None or value is False:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT_MAX:
            shown = repr(value) if not isinstance(value, int) or value.bit_length() <= 64 else "a larger one"
            raise UsageError(f"quirk {key} wants a positive number up to {_INT_MAX}, not {shown}", code="bad_quirk")
        return value
    if value is None and key in _TRISTATE:
        return None
    if not isinstance(value, bool):
        raise UsageError(f"quirk {key} wants true or false, not {value!r}", code="bad_quirk")
    return value


def normalise(user: dict | None) -> dict:
    """Validate user-forced quirks (hyphens allowed: ``no-prefix``)."""
    out: dict = {}
    for k, v in (user or {}).items():
        key = str(k).strip().lower().replace("-", "_")
        if key not in DEFAULTS:
            raise UsageError(f"unknown modem quirk {k!r}; known: {', '.join(sorted(DEFAULTS))}",
                             code="bad_quirk")
        out[key] = _coerce(key, v)
    if out.get("max_apdu") is not None and out["max_apdu"] < 6:
        raise UsageError("quirk max_apdu must be at least 6 bytes", code="bad_quirk")
    return out


def effective(manufacturer: str | None = None, model: str | None = None, user: dict | None = None) -> dict:
    """DEFAULTS, then the table entry for this modem, then the user's forced values."""
    q = dict(DEFAULTS)
    q.update(table_quirks(manufacturer, model))
    q.update(normalise(user))
    return q
