"""Error types shared by every layer.

Each error carries a stable snake_case ``code`` (machine readable, shown in
``--json`` output), a message that says what happened and what to do, and the
process exit code the CLI uses:

* 1 — the card or a server refused the request,
* 2 — bad usage or bad input,
* 3 — modem / transport failure or time-out.
"""
from __future__ import annotations


class AgentError(Exception):
    """Base class. ``code`` is stable; ``message`` is for people."""

    code = "agent_error"
    exit_code = 1

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def to_json(self) -> dict:
        d = {"code": self.code, "message": self.message}
        if self.details:
            d["details"] = self.details
        return d


class UsageError(AgentError):
    """The command line or an input value is wrong (exit 2)."""

    code = "bad_usage"
    exit_code = 2


class InputError(UsageError):
    """Input data (activation code, file, number) is malformed (exit 2)."""

    code = "bad_input"


class CardError(AgentError):
    """The eUICC refused or answered with an error outcome (exit 1)."""

    code = "card_error"
    exit_code = 1


class StatusWordError(CardError):
    """An APDU ended with an ISO 7816-4 error status word."""

    code = "status_word"

    def __init__(self, sw: int, message: str, *, code: str | None = None):
        super().__init__(message, code=code, details={"sw": f"{sw:04X}"})
        self.sw = sw


class ServerError(AgentError):
    """A remote server (SM-DP+, eIM) refused the request (exit 1)."""

    code = "server_error"
    exit_code = 1


class TransportError(AgentError):
    """The modem / serial line / HTTP connection failed (exit 3)."""

    code = "transport_error"
    exit_code = 3


class TimeoutError_(TransportError):  # noqa: N801 - avoid shadowing the builtin
    code = "timeout"


class PortBusyError(TransportError):
    code = "port_busy"


class ProtocolError(TransportError):
    """The peer sent something that does not parse (garbage, bad TLV, bad length)."""

    code = "protocol_error"
