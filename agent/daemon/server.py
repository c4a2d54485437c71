"""HTTP/JSON on the daemon's Unix socket (`curl --unix-socket SOCK http://agent/status`).

Endpoints (README "Local control" documents them for users):

* ``GET  /status``                 daemon, modem, eUICC, profiles, registration, jobs, outbox
* ``GET  /jobs``                   recent jobs; ``GET /jobs/ID[?wait=S]`` one job (waits up to S s
                                   while it is open; the CLI polls this way)
* ``POST /jobs``                   ``{"op": "profile.enable", "params": {...}}`` → 202 ``{"job": {...}}``
* ``GET  /view/OP``                ``chip.info`` or ``profile.list`` as the card worker last read it,
                                   ``{"op", "result", "age_s"}``, while that reading is fresh (main.py,
                                   view_answer); else 409 ``view_stale``: the CLI's quick path (quick.py)
* ``POST /jobs/ID/cancel``         ask a queued or running job to stop
* ``POST /downloads``              ``{"activation_code": "LPA:1$…", "confirmation_code"?: …}`` → 202
* ``POST /sync``                   ask the default SM-DP+ now → 202

Answers are ``{"ok": true, "data": …}`` or ``{"ok": false, "error": {"code", "message"}}``
with an HTTP status that fits (400 bad request, 404 unknown, 409 conflict).
"""
from __future__ import annotations

import json
import logging
import os
import socketserver
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("esim-agent.daemon")

MAX_BODY = 64 * 1024


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, app, *, mode: int = 0o660):
        self.app = app
        self.path = path
        super().__init__(path, Handler)
        os.chmod(path, mode)

    def server_close(self) -> None:
        super().server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error"}
MAX_HEADER_LINES = 100


class Handler(socketserver.StreamRequestHandler):
    """A deliberately small HTTP/1.1 server side: one request per connection, JSON in and out.

    Not http.server: it pulls in email, html, mimetypes and ssl, about 5 MB of resident
    memory the idle daemon does not need (bench daemon: idle RSS target 30 MB)."""

    timeout = 30

    def _send(self, status: int, doc: dict) -> None:
        body = (json.dumps(doc, default=str) + "\n").encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: esim-agent\r\n\r\n")
        try:
            self.wfile.write(head.encode("ascii") + body)
        except OSError:
            pass

    def _read_request(self) -> tuple[str, str, bytes]:
        line = self.rfile.readline(8192)
        if not line:
            raise ConnectionAbortedError
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise HttpError(400, "bad_request", "not an HTTP request line")
        method, target = parts[0].upper(), parts[1]
        length = 0
        for _ in range(MAX_HEADER_LINES):
            h = self.rfile.readline(8192)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise HttpError(400, "bad_request", "bad Content-Length") from None
        else:
            raise HttpError(431, "headers_too_large", f"more than {MAX_HEADER_LINES} header lines")
        if length < 0 or length > MAX_BODY:
            raise HttpError(413, "request_too_large", f"request body over {MAX_BODY} bytes")
        body = self.rfile.read(length) if length else b""
        return method, target, body

    def handle(self) -> None:
        try:
            method, target, raw = self._read_request()
        except ConnectionAbortedError:
            return
        except HttpError as e:
            self._send(e.status, {"ok": False, "error": {"code": e.code, "message": e.message}})
            return
        except OSError:
            return
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        try:
            if method not in ("GET", "POST"):
                raise HttpError(405, "method_not_allowed", f"{method} is not supported (GET, POST)")
            body = _json_body(raw) if method == "POST" else {}
            status, data = self.server.app.handle(method, parts, query, body)
            self._send(status, {"ok": True, "data": data})
        except HttpError as e:
            self._send(e.status, {"ok": False, "error": {"code": e.code, "message": e.message}})
        except Exception as e:  # a bug answers 500 with a message, the daemon lives on
            log.exception("socket request %s %s failed", method, target)
            self._send(500, {"ok": False, "error": {"code": "internal_error",
                                                    "message": f"internal error: {type(e).__name__}: {e}"}})


def _json_body(raw: bytes) -> dict:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:    # RecursionError: `[[[…` nested about 1000 deep
        raise HttpError(400, "bad_json", f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "bad_json", "the request body must be a JSON object")
    return body
