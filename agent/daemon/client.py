"""The CLI's side of the daemon's socket: when a daemon answers, commands become
jobs in its queue (it owns the modem), with the same output and exit codes."""
from __future__ import annotations

import json
import socket
import time

from ..errors import AgentError, TransportError
from ..http1 import AnswerError, read_response


#: Largest answer the CLI reads (a job's full result, with a profile list, is a few KB).
MAX_ANSWER = 16 * 1024 * 1024


class _BadAnswer(Exception):
    """The daemon's answer is larger than any it sends."""


def _exchange(path: str, method: str, url: str, data: bytes | None, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 request over the daemon's Unix socket, answer read to the end with the
    package's own answer reader (http1.py; not http.client, whose email import costs every CLI
    start ~10 ms): one request per connection, Connection: close."""
    head = f"{method} {url} HTTP/1.1\r\nHost: agent\r\nAccept-Encoding: identity\r\n"
    if data is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    head += "Connection: close\r\n\r\n"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(head.encode("latin-1") + (data or b""))
        resp = read_response(s, method)
        body = bytearray()
        while chunk := resp.read1(65536):
            body += chunk
            if len(body) > MAX_ANSWER:
                raise _BadAnswer(f"answer over {MAX_ANSWER} bytes")
    finally:
        s.close()
    return resp.status, bytes(body)


def socket_path(cfg) -> str:
    from ..quick import DEFAULT_SOCKET
    return getattr(cfg, "socket", None) or DEFAULT_SOCKET


def daemon_answers(cfg) -> bool:
    """A daemon listens on the configured socket (a file left by a killed one does not count)."""
    return socket_answers(socket_path(cfg))


def socket_answers(path: str) -> bool:
    import os
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class DaemonLost(TransportError):
    code = "daemon_lost"


class DaemonClient:
    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout

    @classmethod
    def for_config(cls, cfg) -> "DaemonClient":
        return cls(socket_path(cfg))

    def request(self, method: str, url: str, body: dict | None = None, *, timeout: float | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        try:
            status, raw = _exchange(self.path, method, url, data, timeout or self.timeout)
        except (OSError, AnswerError, _BadAnswer) as e:
            raise DaemonLost(f"the esim-agent daemon on {self.path} went away ({e}); check "
                             "`systemctl status esim-agent` (its jobs resume when it restarts)") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise DaemonLost(f"the daemon on {self.path} answered something that is not JSON") from None
        return status, doc

    def _data(self, status: int, doc: dict) -> dict:
        if doc.get("ok"):
            return doc.get("data") or {}
        err = doc.get("error") or {}
        raise AgentError(err.get("message", f"the daemon answered HTTP {status}"),
                         code=err.get("code", "daemon_error"), details=err.get("details"))

    def status(self) -> dict:
        return self._data(*self.request("GET", "/status"))

    def submit(self, op: str, params: dict, device: str | None = None) -> dict:
        return self._data(*self.request("POST", "/jobs", {"op": op, "params": params, "device": device}))

    def run(self, op: str, params: dict, *, cancel=None, device: str | None = None, info=None,
            direct_fallback=None) -> dict:
        """Submit ``op`` as a job and wait for its end; Ctrl-C/SIGTERM asks the daemon to
        cancel it and waits for that. Returns the job's data or raises its error."""
        try:
            job = self.submit(op, params, device)["job"]
        except AgentError as e:
            if e.code == "other_device" and direct_fallback is not None:
                return direct_fallback()
            raise
        jid = job["id"]
        asked_cancel = False
        while True:
            if cancel is not None and cancel.cancelled and not asked_cancel:
                asked_cancel = True
                try:
                    self.request("POST", f"/jobs/{jid}/cancel", {})
                except AgentError:
                    pass
            status, doc = self.request("GET", f"/jobs/{jid}?wait=1&full=1", timeout=10.0)
            job = self._data(status, doc)["job"]
            if job["state"] not in ("queued", "running"):
                break
            if cancel is None:
                time.sleep(0.05)
        result = job.get("result") or {}
        warnings = (result.pop("warnings", None) if isinstance(result, dict) else None) \
            or ((job.get("error") or {}).get("details") or {}).pop("warnings", None) or []
        for w in warnings:
            if info is not None:
                info(f"warning: {w}")
        if job["state"] == "done":
            return result
        if job["state"] == "cancelled" and asked_cancel:
            from ..cancel import Cancelled
            raise Cancelled(cancel.reason or "cancelled", f"job {jid} was stopped by the daemon")
        err = dict(job.get("error") or {"code": "job_failed", "message": f"job {jid} ended {job['state']}"})
        e = AgentError(err.get("message", ""), code=err.get("code", "job_failed"), details=err.get("details"))
        if "exit_code" in err:
            e.exit_code = err["exit_code"]
        raise e
