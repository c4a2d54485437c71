"""What every transport shares without the AT port's code: the trace callback type and the
benchmark counters (an in-process transport such as ``--sim`` need not load at.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from collections.abc import Callable

#: trace(direction, data): direction "AT>"/"AT<"/">>"/"<<", data the line or APDU
Trace = Callable[[str, "bytes | str"], None]


@dataclass
class Stats:
    """Counters for benchmarks: bytes are what actually crossed the serial line."""

    apdus: int = 0
    at_commands: int = 0
    bytes_out: int = 0
    bytes_in: int = 0

    def to_json(self) -> dict:
        return asdict(self)
