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

import os
from dataclasses import dataclass, field, fields

from .errors import UsageError
from .quick import DEFAULT_CONFIG as DEFAULT_PATH, DEFAULT_SOCKET  # noqa: F401 - defined once, in the light module

LOG_LEVELS = ("info", "debug")
TRANSPORTS = ("auto", "csim", "cgla")
ESIPA_VERSIONS = ("1.2", "1.0")
BINDINGS = ("asn1", "json")
#: Config's fields that are not keys of the file: where the settings came from.
NOT_KEYS = ("source", "source_id")

TYPE_CHECKING = False   # annotations only: pathlib is imported where a Path is made
if TYPE_CHECKING:
    from pathlib import Path


@dataclass
class Config:
    """The settings: the file's keys (defaults here), then the command line's."""
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
    # -- where it came from (not keys): the file, and its identity when read (quick.identity)
    source: str | None = None
    source_id: list | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """The settings as a JSON-able dict for status output, with report_token masked."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source_id"}   # source: shown
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
    # A path as given (str or Path); no pathlib here: most commands run without a file, and
    # pathlib (with urllib.parse) costs ~7 ms of every start-up where nothing else loaded it.
    p = os.fspath(path or os.environ.get("ESIM_AGENT_CONFIG") or DEFAULT_PATH)
    cfg = Config()
    if not os.path.exists(p):
        if path:  # explicitly requested but missing
            raise UsageError(f"config file {p} does not exist", code="config_missing")
        return cfg
    import tomllib
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
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
    from urllib.parse import urlsplit
    from .config_check import KEYS, checked, checked_eim, show   # only when there is a file
    unknown = set(data) - set(KEYS)
    if unknown:
        raise UsageError(f"config {p}: unknown key(s) {', '.join(sorted(unknown))}", code="config_invalid")
    for k, v in data.items():
        setattr(cfg, k, checked(p, k, v))
    if "eim" in data:
        cfg.eim = checked_eim(p, cfg.eim)
    if cfg.report_url and urlsplit(cfg.report_url).scheme.lower() == "http" and not cfg.report_insecure_http:
        raise UsageError(f"config {p}: report_url must be an https:// URL (plain http:// only with "
                         f"report_insecure_http = true), not {show(cfg.report_url)}", code="config_invalid")
    cfg.source = str(p)
    from .quick import identity
    cfg.source_id = identity(st)        # of the bytes parsed: the quick path's cache key
    return cfg


def state_dir(cfg: Config | None = None) -> "Path":
    """Where the agent keeps its SQLite journal (notification outbox)."""
    from pathlib import Path
    return Path(state_dir_text(cfg))


def state_dir_text(cfg: Config | None = None) -> str:
    """state_dir() as a string, for a command's context (no pathlib at start-up): the
    environment's ESIM_AGENT_STATE_DIR, the configuration's state_dir, /var/lib/esim-agent when
    it is a writable directory, else $XDG_STATE_HOME/esim-agent (~/.local/state/esim-agent)."""
    env = os.environ.get("ESIM_AGENT_STATE_DIR")
    if env:
        return env
    if cfg and cfg.state_dir:
        return cfg.state_dir
    sys_dir = "/var/lib/esim-agent"
    if os.path.isdir(sys_dir) and os.access(sys_dir, os.W_OK):
        return sys_dir
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "esim-agent")
