"""The systemd notify protocol (sd_notify(3)), without libsystemd.

A service with ``Type=notify`` tells systemd it is ready, what it is doing and
that it is still alive by sending datagrams of ``KEY=VALUE`` lines to the
AF_UNIX socket named in ``$NOTIFY_SOCKET``: a path, or an abstract socket when
the name starts with ``@``. Outside systemd (no ``$NOTIFY_SOCKET``) every call
is a silent no-op returning False, so the daemon calls these unconditionally.

Sending never raises: a lost notification is logged at debug level and reported
as False (systemd itself only notices through its time-outs).

    sdnotify.ready("listening on /run/esim-agent/agent.sock")
    interval = sdnotify.watchdog_interval()     # seconds between WATCHDOG=1, or None
    sdnotify.status("downloading 8944...")
    sdnotify.stopping()
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(name: str) -> str | None:
    if name.startswith("@"):
        return "\0" + name[1:]                  # Linux abstract namespace
    if name.startswith("/"):
        return name
    return None                                 # e.g. vsock:CID:PORT (VMs): not for a gateway agent


def notify(message: str) -> bool:
    """Send one notification (newline-separated ``KEY=VALUE`` lines). True if it was sent."""
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    address = _address(name)
    if address is None:
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r, %r not sent", name, message)
        return False
    try:
        data = message.encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(1.0)                   # systemd's socket never blocks for long; never hang here
            s.sendto(data, address)
    except (OSError, ValueError) as e:          # ValueError: unencodable text or a NUL in the address
        log.debug("sd_notify: %r not sent to %s: %s", message, name, e)
        return False
    return True


def _one_line(text: str) -> str:
    # A line break would start a new KEY=VALUE assignment in the datagram.
    return " ".join(str(text).splitlines())


def ready(status: str | None = None) -> bool:
    """Start-up is complete (Type=notify: systemd considers the unit started now)."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")


def status(text: str) -> bool:
    """A one-line description of what the service is doing (shown by `systemctl status`)."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    """The service is shutting down (sent before a clean stop)."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive for WatchdogSec=: send at least every watchdog_interval() seconds."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between keep-alives (half of $WATCHDOG_USEC), or None when no watchdog is set
    for this process ($WATCHDOG_USEC unset or invalid, or $WATCHDOG_PID names another process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000
