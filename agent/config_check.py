"""Checking the configuration file's keys (agent/config.py reads the file): each key's rule,
applied when a file is there, so that a command run without one (a technician's) does not
compile them. Every problem is a UsageError (code ``config_invalid``) naming the file, the key
and what is wrong."""
from __future__ import annotations

import math
import os
from pathlib import Path
from urllib.parse import urlsplit

from .config import BINDINGS, ESIPA_VERSIONS, LOG_LEVELS, TRANSPORTS
from .errors import UsageError

class _Bad(Exception):
    """A value breaks its key's rule. ``rule`` completes "KEY must be ..."."""

    def __init__(self, rule: str, *, show: bool = True):
        super().__init__(rule)
        self.rule, self.show = rule, show


_HOUR = 3600.0
_YEAR = 366 * 86400.0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)   # TOML `true` is not a number


def _seconds(*, zero_ok: bool = False, at_most: float = _YEAR, zero_means: str = ""):
    def check(v):
        rule = f"seconds at or above 0 ({zero_means})" if zero_ok else "seconds above 0"
        # (isnan() only on floats: math.isnan(10**400) raises OverflowError)
        if not _is_number(v) or (isinstance(v, float) and math.isnan(v)) or v < 0 or (v == 0 and not zero_ok):
            raise _Bad(rule)
        if v > at_most:
            raise _Bad(f"{rule}, at most {at_most:g}")
        return float(v)
    return check


def _text(rule: str):
    def check(v):
        if not isinstance(v, str) or not v or "\0" in v:
            raise _Bad(rule)
        return v
    return check


#: Linux PATH_MAX (4096, with the terminating NUL) and NAME_MAX (255 bytes per name).
_PATH_MAX = 4095
_NAME_MAX = 255


def _path(rule: str):
    """A path the kernel can take: no NUL byte, at most _PATH_MAX bytes, each name at most
    _NAME_MAX bytes (else every later open() fails with "File name too long")."""
    text = _text(rule)

    def check(v):
        text(v)
        try:
            b = os.fsencode(v)
        except UnicodeError:
            raise _Bad(rule) from None
        if len(b) > _PATH_MAX:
            raise _Bad(f"{rule} of at most {_PATH_MAX} bytes, not {len(b)}", show=False)
        longest = max(len(part) for part in b.split(b"/"))
        if longest > _NAME_MAX:
            raise _Bad(f"{rule} whose names are at most {_NAME_MAX} bytes each (one has {longest})",
                       show=False)
        return v
    return check


def _one_of(choices: tuple[str, ...], *, fold: bool = False):
    rule = " or ".join(f'"{c}"' for c in choices) if len(choices) < 3 else \
        ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'

    def check(v):
        w = v.lower() if fold and isinstance(v, str) else v
        if not isinstance(v, str) or w not in choices:
            raise _Bad(rule)
        return w
    return check


def _bool(v):
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _table(v):
    if not isinstance(v, dict):
        raise _Bad("a table ([section] or {key = value})")
    return v


def _int_range(lo: int, hi: int | None, rule: str):
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            raise _Bad(rule)
        return v
    return check


def _quirks(v):
    _table(v)
    from .transport.quirks import normalise   # validates names and values (bad_quirk otherwise)
    try:
        normalise(v)
    except UsageError as e:
        raise _Bad(f"a table of known modem quirks: {e.message}", show=False) from None
    return v


def _aids(v):
    rule = "a list of AIDs (5 to 16 bytes of hex each)"
    if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
        raise _Bad(rule)
    for a in v:
        try:
            ok = 5 <= len(bytes.fromhex(a.replace(" ", ""))) <= 16
        except ValueError:
            ok = False
        if not ok:
            raise _Bad(rule)
    return v


def _socket(v):
    _text("an absolute path for the daemon's socket")(v)
    if not v.startswith("/"):
        raise _Bad("an absolute path for the daemon's socket (the daemon runs in /)")
    if len(os.fsencode(v)) > 107:          # sun_path is 108 bytes including the terminating NUL
        raise _Bad("a socket path of at most 107 bytes (the AF_UNIX limit)")
    return v


def _default_smdp(v):
    from .ac import validate_address
    if not isinstance(v, str):
        raise _Bad("an SM-DP+ address (a hostname such as smdp.example.com)")
    try:
        return validate_address(v)
    except UsageError as e:                # InputError: its message says what is wrong with it
        raise _Bad(f"a valid SM-DP+ address: {e.message}", show=False) from None


def _url(schemes: tuple[str, ...], rule: str, no_credentials: str):
    """A URL check: one of ``schemes``, a host, a valid port, no credentials, spaces or control characters."""
    def check(v):
        if not isinstance(v, str) or not v or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in v):
            raise _Bad(rule)
        try:
            u = urlsplit(v)
            u.port                             # raises ValueError on a bad port
        except ValueError:
            raise _Bad(rule) from None
        if u.scheme.lower() not in schemes or not u.hostname:
            raise _Bad(rule)
        if u.username is not None or u.password is not None:
            raise _Bad(no_credentials, show=False)
        return v
    return check


_report_url = _url(("https", "http"), "an https:// URL (e.g. https://fleet.example.com/esim/report)",
                   "a URL without a user or password in it (put the credential in report_token)")


def _report_token(v):
    # Sent in an HTTP header: no line breaks or other control characters. Never echoed back.
    if not isinstance(v, str) or not v or any(ord(c) < 32 or ord(c) == 127 for c in v) or v != v.strip():
        raise _Bad("a non-empty string without control characters or surrounding spaces (value not shown)",
                   show=False)
    return v


# key -> check(value) -> the value to keep, raising _Bad. Config fields and keys are one set.
KEYS = {
    "device": _path("a path (the modem's AT port)"),
    "transport": _one_of(TRANSPORTS),
    "timeout": _seconds(at_most=_HOUR),
    "long_timeout": _seconds(at_most=_HOUR),
    "aids": _aids,
    "segment_size": _int_range(1, 255, "a number of bytes from 1 to 255"),
    "baud": _int_range(1, None, "a positive number"),
    "refresh": _bool,
    "quirks": _quirks,
    "ca_bundle": _path("a path (a PEM file of CI certificates)"),
    "default_smdp": _default_smdp,
    "http_timeout": _seconds(at_most=_HOUR),
    "state_dir": _path("a path (a directory)"),
    "process_notifications": _bool,
    "socket": _socket,
    "discovery_interval": _seconds(zero_ok=True, zero_means="0 = only at start-up and on `esim-agent sync`"),
    "auto_enable": _bool,
    "rollback_after": _seconds(),
    "report_url": _report_url,
    "report_token": _report_token,
    "report_insecure_http": _bool,
    "report_ca": _path("a path (a PEM file of CA certificates for report_url)"),
    "log_level": _one_of(LOG_LEVELS, fold=True),
    "eim": _table,                          # its keys: EIM_KEYS, checked by _checked_eim
}


_https_url = _url(("https",), "an https:// URL (e.g. https://eim.example.com)",
                  "a URL without a user or password in it")


def _esipa_version(v):
    # `esipa_version = 1.2` (a TOML float, quotes forgotten) means the same as "1.2".
    if _is_number(v) and v in (1.2, 1.0):
        v = f"{v:.1f}"
    return _one_of(ESIPA_VERSIONS)(v)


def _existing_file(rule: str):
    path = _path(rule)

    def check(v):
        path(v)
        if not os.path.isfile(v):
            raise _Bad(f"{rule} that exists")
        return v
    return check


#: [eim] (SGP.32 IPAd; docs/protocol.md §7): key -> check. The defaults are ops.EimSettings'.
EIM_KEYS = {
    "url": _https_url,
    "poll_interval": _seconds(zero_ok=True, zero_means="0 = only at start-up and on `esim-agent ipa poll`"),
    "esipa_version": _esipa_version,
    "binding": _one_of(BINDINGS),
    "ca": _existing_file("a path to a PEM file of CA certificates for the eIM's TLS"),
    "fallback_after": _seconds(zero_ok=True, zero_means="0 = never fall back"),
}


def show(value) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def checked(p: Path, key: str, value):
    try:
        return KEYS[key](value)
    except _Bad as bad:
        tail = f", not {show(value)}" if bad.show else ""
        raise UsageError(f"config {p}: {key} must be {bad.rule}{tail}", code="config_invalid") from None


def checked_eim(p: Path, table: dict) -> dict:
    unknown = set(table) - set(EIM_KEYS)
    if unknown:
        raise UsageError(f"config {p}: unknown key(s) in [eim]: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(EIM_KEYS)})", code="config_invalid")
    checked = {}
    for k, v in table.items():
        try:
            checked[k] = EIM_KEYS[k](v)
        except _Bad as bad:
            tail = f", not {show(v)}" if bad.show else ""
            raise UsageError(f"config {p}: eim.{k} must be {bad.rule}{tail}", code="config_invalid") from None
    return checked


def check_eim_value(key: str, value, name: str):
    """One [eim] value given elsewhere (a command-line option ``name``), checked like the file's."""
    try:
        return EIM_KEYS[key](value)
    except _Bad as bad:
        tail = f", not {show(value)}" if bad.show else ""
        raise UsageError(f"{name} must be {bad.rule}{tail}", code="bad_input") from None
