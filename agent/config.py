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
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read config {p}: {e}", code="config_invalid") from e
    known = set(Config.__dataclass_fields__) - {"source"}
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"config {p}: unknown key(s) {', '.join(sorted(unknown))}", code="config_invalid")
    for k, v in data.items():
        setattr(cfg, k, v)
    cfg.source = str(p)
    return cfg


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
