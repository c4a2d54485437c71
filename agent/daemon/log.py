"""The daemon's log lines: one ``event=NAME key=value …`` line per event on stdout,
which journald keeps as the unit's log. Values with spaces or quotes are JSON-quoted
so a line stays machine-readable (shlex splits it). Never pass secrets here."""
from __future__ import annotations

import json
import logging

log = logging.getLogger("esim-agent.daemon")


def kv(event: str, **fields) -> str:
    """One structured log line: event=NAME key=value … (values with spaces quoted)."""
    parts = [f"event={event}"]
    for k, v in fields.items():
        if v is None:
            continue
        s = str(v)
        if not s or any(c in s for c in ' "=\n\t'):
            s = json.dumps(s)
        parts.append(f"{k}={s}")
    return " ".join(parts)


def emit(event: str, level: int = logging.INFO, **fields) -> None:
    log.log(level, "%s", kv(event, **fields))
