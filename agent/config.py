"""Agent configuration: TOML file (default /etc/esim-agent/agent.toml, or
$ESIM_AGENT_CONFIG), overridden by command-line options.

Every key is checked when the file is read: a wrong type, a value out of range
or a TOML syntax error is a UsageError (code ``config_invalid``, exit 2) whose
message names the file, the key and what is wrong, e.g.::

    config /etc/esim-agent/agent.toml: rollback_after must be seconds above 0, not -3

so the daemon refuses to start on a bad file instead of running half-configured.
Unknown keys are refused too (a misspelt key would otherwise be ignored).
``systemd/agent.toml.example`` describes every key and its default.

Example::

    device = "/dev/serial/by-id/usb-Quectel_EG25-if02-port0"
    transport = "auto"          # auto | csim | cgla
    timeout = 10                # seconds per AT command / APDU
    long_timeout = 300          # seconds for profile package loading, enable, delete
    aids = ["A0000005591010FFFFFFFF8900000100"]
    segment_size = 255          # STORE DATA block size (1..255)
    ca_bundle = "/etc/esim-agent/ci-bundle.pem"
    state_dir = "/var/lib/esim-agent"

    # the daemon (`esim-agent daemon`)
    socket = "/run/esim-agent/agent.sock"
    discovery_interval = 21600  # seconds; 0 = only at start-up and on `esim-agent sync`
    rollback_after = 420        # seconds to wait for network attach after a switch
    report_url = "https://fleet.example.com/esim/report"

    [quirks]                    # forced modem quirks (see transport/quirks.py)
    no_prefix = true

    [eim]                       # SGP.32 IPAd: present = the daemon polls an eIM
    url = "https://eim.example.com"   # default: the eIM address in the eUICC's own eIM configuration
    poll_interval = 86400       # seconds; 0 = only at start-up and on `esim-agent ipa poll`
    esipa_version = "1.2"       # "1.2" | "1.0"
    binding = "asn1"            # "asn1" | "json"
    ca = "/etc/esim-agent/eim-ca.pem"
    fallback_after = 900        # seconds without registration before the fallback profile; 0 = never
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UsageError

DEFAULT_PATH = Path("/etc/esim-agent/agent.toml")
DEFAULT_SOCKET = "/run/esim-agent/agent.sock"
LOG_LEVELS = ("info", "debug")
TRANSPORTS = ("auto", "csim", "cgla")
ESIPA_VERSIONS = ("1.2", "1.0")
BINDINGS = ("asn1", "json")


@dataclass
class Config:
    # -- the modem and the eUICC (CLI and daemon)
    device: str | None = None
    transport: str = "auto"
    timeout: float = 10.0
    long_timeout: float = 300.0
    aids: list[str] = field(default_factory=list)
    segment_size: int = 255
    baud: int = 115200
    refresh: bool = True
    quirks: dict = field(default_factory=dict)
    # -- servers and trust
    ca_bundle: str | None = None
    default_smdp: str | None = None          # SM-DP+ address (bare hostname[:port]), lower case
    http_timeout: float = 30.0
    # -- durable state and notifications
    state_dir: str | None = None
    process_notifications: bool = True
    # -- the daemon
    socket: str = DEFAULT_SOCKET
    discovery_interval: float = 21600.0      # 0 = never on a timer (start-up and `esim-agent sync` only)
    auto_enable: bool = False
    rollback_after: float = 420.0
    report_url: str | None = None
    report_token: str | None = field(default=None, repr=False)   # a secret: never in repr or logs
    report_insecure_http: bool = False
    report_ca: str | None = None             # PEM CA bundle for report_url (default: the system's trust store)
    log_level: str = "info"
    # [eim] (SGP.32 IPAd): None = no table; else the checked keys (eim_settings() fills the defaults)
    eim: dict | None = None
    # -- where it came from (not a key)
    source: str | None = None

    def to_json(self) -> dict:
        """The settings as a JSON-able dict for status output, with report_token masked."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["report_token"] = "(set)" if self.report_token else None
        d["aids"], d["quirks"] = list(self.aids), dict(self.quirks)
        if self.eim is not None:
            from dataclasses import asdict
            d["eim"] = asdict(self.eim_settings())
        return d

    def eim_settings(self, **overrides):
        """The IPA's settings (ops.EimSettings) from [eim]: defaults for what the table (or
        the absent table) leaves out; ``overrides`` (command-line options) win when not None."""
        from .ops import EimSettings
        given = {**(self.eim or {}), **{k: v for k, v in overrides.items() if v is not None}}
        return EimSettings(**given)


def load(path: str | None = None) -> Config:
    p = Path(path or os.environ.get("ESIM_AGENT_CONFIG") or DEFAULT_PATH)
    cfg = Config()
    if not p.exists():
        if path:  # explicitly requested but missing
            raise UsageError(f"config file {p} does not exist", code="config_missing")
        return cfg
    import tomllib
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:           # the message carries "(at line N, column M)"
        raise UsageError(f"config {p}: not valid TOML: {e}", code="config_invalid") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"config {p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                         code="config_invalid") from e
    except ValueError as e:                        # tomllib: an integer of more than 4300 digits
        raise UsageError(f"config {p}: not usable TOML: {e}", code="config_invalid") from e
    except OSError as e:
        raise UsageError(f"config {p}: cannot be read: {e.strerror or e}", code="config_invalid") from e
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise UsageError(f"config {p}: unknown key(s) {', '.join(sorted(unknown))}", code="config_invalid")
    for k, v in data.items():
        setattr(cfg, k, _checked(p, k, v))
    if "eim" in data:
        cfg.eim = _checked_eim(p, cfg.eim)
    if cfg.report_url and urlsplit(cfg.report_url).scheme.lower() == "http" and not cfg.report_insecure_http:
        raise UsageError(f"config {p}: report_url must be an https:// URL (plain http:// only with "
                         f"report_insecure_http = true), not {_show(cfg.report_url)}", code="config_invalid")
    cfg.source = str(p)
    return cfg


# --------------------------------------------------------------------------- checks

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
_KEYS = {
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
    "eim": _table,                          # its keys: _EIM_KEYS, checked by _checked_eim
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
_EIM_KEYS = {
    "url": _https_url,
    "poll_interval": _seconds(zero_ok=True, zero_means="0 = only at start-up and on `esim-agent ipa poll`"),
    "esipa_version": _esipa_version,
    "binding": _one_of(BINDINGS),
    "ca": _existing_file("a path to a PEM file of CA certificates for the eIM's TLS"),
    "fallback_after": _seconds(zero_ok=True, zero_means="0 = never fall back"),
}


def _show(value) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def _checked(p: Path, key: str, value):
    try:
        return _KEYS[key](value)
    except _Bad as bad:
        tail = f", not {_show(value)}" if bad.show else ""
        raise UsageError(f"config {p}: {key} must be {bad.rule}{tail}", code="config_invalid") from None


def _checked_eim(p: Path, table: dict) -> dict:
    unknown = set(table) - set(_EIM_KEYS)
    if unknown:
        raise UsageError(f"config {p}: unknown key(s) in [eim]: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(_EIM_KEYS)})", code="config_invalid")
    checked = {}
    for k, v in table.items():
        try:
            checked[k] = _EIM_KEYS[k](v)
        except _Bad as bad:
            tail = f", not {_show(v)}" if bad.show else ""
            raise UsageError(f"config {p}: eim.{k} must be {bad.rule}{tail}", code="config_invalid") from None
    return checked


def check_eim_value(key: str, value, name: str):
    """One [eim] value given elsewhere (a command-line option ``name``), checked like the file's."""
    try:
        return _EIM_KEYS[key](value)
    except _Bad as bad:
        tail = f", not {_show(value)}" if bad.show else ""
        raise UsageError(f"{name} must be {bad.rule}{tail}", code="bad_input") from None


def state_dir(cfg: Config | None = None) -> Path:
    """Where the agent keeps its SQLite journal (notification outbox)."""
    env = os.environ.get("ESIM_AGENT_STATE_DIR")
    if env:
        return Path(env)
    if cfg and cfg.state_dir:
        return Path(cfg.state_dir)
    sys_dir = Path("/var/lib/esim-agent")
    if sys_dir.is_dir() and os.access(sys_dir, os.W_OK):
        return sys_dir
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "esim-agent"
