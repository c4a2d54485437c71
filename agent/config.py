"""Agent configuration: TOML file (default /etc/esim-agent/agent.toml, or
$ESIM_AGENT_CONFIG), overridden by command-line options.

Example::

    device = "/dev/serial/by-id/usb-Quectel_EG25-if02-port0"
    transport = "auto"          # auto | csim | cgla
    timeout = 10                # seconds per AT command / APDU
    long_timeout = 300          # seconds for profile package loading, enable, delete
    aids = ["A0000005591010FFFFFFFF8900000100"]
    segment_size = 120          # STORE DATA block size (1..255)
    ca_bundle = "/etc/esim-agent/ci-bundle.pem"
    state_dir = "/var/lib/esim-agent"

    [quirks]                    # forced modem quirks (see transport/quirks.py)
    no_prefix = true
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

DEFAULT_PATH = Path("/etc/esim-agent/agent.toml")


@dataclass
class Config:
    device: str | None = None
    transport: str = "auto"
    timeout: float = 10.0
    long_timeout: float = 300.0
    aids: list[str] = field(default_factory=list)
    segment_size: int = 120
    baud: int = 115200
    ca_bundle: str | None = None
    state_dir: str | None = None
    refresh: bool = True
    process_notifications: bool = True
    quirks: dict = field(default_factory=dict)
    source: str | None = None


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
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read config {p}: {e}", code="config_invalid") from e
    known = set(_TYPES)
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"config {p}: unknown key(s) {', '.join(sorted(unknown))}", code="config_invalid")
    for k, v in data.items():
        setattr(cfg, k, _checked(p, k, v))
    cfg.source = str(p)
    return cfg


# key -> (accepted Python types, what to say). bool is not a number here (TOML `true`).
_TYPES = {
    "device": ((str,), "a path"), "transport": ((str,), '"auto", "csim" or "cgla"'),
    "timeout": ((int, float), "seconds"), "long_timeout": ((int, float), "seconds"),
    "aids": ((list,), "a list of hex strings"), "segment_size": ((int,), "a number of bytes"),
    "baud": ((int,), "a number"), "ca_bundle": ((str,), "a path"), "state_dir": ((str,), "a path"),
    "refresh": ((bool,), "true or false"), "process_notifications": ((bool,), "true or false"),
    "quirks": ((dict,), "a table"),
}


def _checked(p: Path, key: str, value):
    types, what = _TYPES[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and key == "aids":
        ok = all(isinstance(a, str) for a in value)
    if ok and key == "transport":
        ok = value in ("auto", "csim", "cgla")
    if not ok:
        raise UsageError(f"config {p}: {key} must be {what}, not {value!r}", code="config_invalid")
    return value


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
