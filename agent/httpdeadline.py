"""One deadline for one HTTP exchange, whatever the server does (docs/protocol.md §3.6).

Socket time-outs bound each blocking call, not the exchange: a server that
drips a byte before every time-out (in the TLS handshake, the status line, the
headers or the body) would hold the device for ever.  A ``DeadlineWatch``
closes that gap: while it is active in a thread, every connection that thread
opens or reuses registers its socket with it, and when the deadline passes a
timer thread shuts those sockets down, so the blocked read returns at once and
the caller reports the deadline.

The watch shuts down a duplicate of each file descriptor (``shutdown`` acts on
the connection, whichever descriptor names it), never the SSLSocket object the
reading thread is using.

The HTTP/1.1 client (``HttpSession``) is ssl plus our own answer reader (http1.py; not
http.client, whose ``email`` import costs every CLI process ~1.6 MB and ~10 ms): one
kept-alive connection per session (the four ES9+ calls of a download share one TLS
handshake), TLS set up by the caller's context and checked by its ``check_peer`` before
any request byte leaves, DNS resolution bounded by the connect time-out, and failures
told apart by where they happened (``ConnectFailed``: nothing was sent; ``ExchangeFailed``:
the request may have reached the server). An https:// server is reached through the proxy
the environment names (``https_proxy`` / ``all_proxy``, ``no_proxy`` honoured, an http://
proxy with optional user:password) with a CONNECT tunnel, as requests did for the agent
before; TLS is still end to end with the server. No redirects (ES9+ answers never are).
"""
from __future__ import annotations

import socket
import threading
import time

from .http1 import AnswerError, Response

_local = threading.local()


class DeadlineWatch:
    """``with DeadlineWatch(seconds) as w:`` — the HTTP exchange inside ends by the deadline.

    ``fired`` tells afterwards that the deadline cut it; ``connected`` that a connection
    to the server was established (so a cut came while waiting for or reading the answer)."""

    def __init__(self, seconds: float):
        self.seconds = max(0.0, float(seconds))
        self.deadline = time.monotonic() + self.seconds
        self.fired = False
        self.tcp = False            # a TCP connection was made (a TLS handshake may still be pending)
        self.connected = False      # connected (and TLS set up): the request may have left
        self._dups: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._outer = None

    def __enter__(self) -> "DeadlineWatch":
        self._outer = getattr(_local, "watch", None)
        _local.watch = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _local.watch = self._outer
        with self._lock:
            dups, self._dups = self._dups, []
        for d in dups:
            try:
                d.close()
            except OSError:
                pass

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, sock) -> None:
        """Watch this socket (a plain or an SSL socket) until the exchange ends."""
        try:
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except (OSError, ValueError, AttributeError):
            return
        with self._lock:
            self._dups.append(dup)
            fired = self.fired
        if fired:
            _shut(dup)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            dups = list(self._dups)
        for d in dups:
            _shut(d)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def current() -> DeadlineWatch | None:
    return getattr(_local, "watch", None)


# --------------------------------------------------------------------------- the HTTP client

class HttpFailure(Exception):
    """One exchange failed; ``cause`` is the OSError / ssl / http1.AnswerError, ``stage`` where:
    "dns", "tcp", "tls" (ConnectFailed), "send", "answer" (status line and headers), "body"."""

    def __init__(self, stage: str, cause: BaseException, host: str = ""):
        super().__init__(f"{stage}: {cause}")
        self.stage = stage
        self.cause = cause
        self.host = host

    @property
    def timed_out(self) -> bool:
        return isinstance(self.cause, (TimeoutError, socket.timeout))


class ConnectFailed(HttpFailure):
    """Before the request could leave: resolving, connecting, the TLS handshake."""


class ExchangeFailed(HttpFailure):
    """On an established connection: the request may have reached the server."""


def wire_name(host: str) -> bytes:
    """A host name as DNS and TLS (SNI, the certificate's name) carry it: ASCII as is, an
    internationalised name in its IDNA form. Handing socket and ssl bytes rather than a str keeps
    them from loading the IDNA codec (and unicodedata) for every ASCII name: ~0.5 MB and ~2 ms
    of each CLI process that talks to a server."""
    return host.encode("ascii") if host.isascii() else host.encode("idna")


def _resolve(host: str, port: int, timeout: float | None) -> list:
    """getaddrinfo bounded by ``timeout`` (the C resolver has no time-out of its own: it runs in
    a helper thread, which is left to finish on its own when the time is up)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return socket.getaddrinfo(wire_name(host), port, 0, socket.SOCK_STREAM)   # an address: no lookup
    except OSError:
        pass
    box: list = []
    done = threading.Event()

    def lookup() -> None:
        try:
            box.append(socket.getaddrinfo(wire_name(host), port, 0, socket.SOCK_STREAM))
        except BaseException as e:      # handed to the caller
            box.append(e)
        done.set()
    threading.Thread(target=lookup, name="esim-agent-dns", daemon=True).start()
    if not done.wait(timeout):
        raise socket.timeout(f"resolving {host} took longer than {timeout:g} s")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _tcp(host: str, port: int, timeout: float | None) -> socket.socket:
    """socket.create_connection, with the lookup bounded and the socket watched from the start
    (so the deadline can cut a TLS handshake that never completes)."""
    try:
        infos = _resolve(host, port, timeout)
    except OSError as e:
        raise ConnectFailed("dns", e, host) from None
    first: OSError | None = None
    for af, kind, proto, _, sa in infos:
        s = socket.socket(af, kind, proto)
        try:
            s.settimeout(timeout)
            w = current()
            if w is not None:
                w.add(s)
            s.connect(sa)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if w is not None:
                w.tcp = True
            return s
        except OSError as e:
            s.close()
            first = first or e
    raise ConnectFailed("tcp", first or OSError(f"no address for {host}"), host)


def _env(name: str) -> str:
    import os
    return os.environ.get(name.lower()) or os.environ.get(name.upper()) or ""


def proxy_for(host: str, port: int) -> tuple[str, int, str | None] | None:
    """The environment's proxy for an https:// server: (host, port, Proxy-Authorization value)
    or None (none set, or ``no_proxy`` names the server)."""
    url = _env("https_proxy") or _env("all_proxy")
    if not url:
        return None
    for entry in (e.strip().lower() for e in _env("no_proxy").split(",")):
        if not entry:
            continue
        if entry == "*":
            return None
        name, _, eport = entry.partition(":") if entry.count(":") == 1 else (entry, "", "")
        if eport and eport != str(port):
            continue
        name = name.lstrip(".")
        h = host.lower()
        if h == name or h.endswith("." + name):
            return None
    from urllib.parse import unquote, urlsplit
    u = urlsplit(url if "://" in url else "http://" + url)
    if u.scheme.lower() != "http" or not u.hostname:
        raise ConnectFailed("tcp", OSError(f"unsupported proxy {u.scheme}://{u.hostname} (an http:// proxy only)"),
                            host)
    auth = None
    if u.username is not None:
        import base64
        cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
        auth = "Basic " + base64.b64encode(cred).decode("ascii")
    return u.hostname, u.port or 80, auth


def _tunnel(sock, host: str, port: int, auth: str | None) -> None:
    """CONNECT host:port through the proxy at the other end of ``sock``; raises OSError unless 200."""
    name = f"[{host}]" if ":" in host else host
    head = f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n"
    if auth:
        head += f"Proxy-Authorization: {auth}\r\n"
    sock.sendall((head + "\r\n").encode("latin-1"))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)       # nothing follows the proxy's answer until we speak TLS
        if not chunk:
            raise ConnectionResetError("the proxy closed the connection instead of answering CONNECT")
        buf += chunk
        if len(buf) > 65536:
            raise OSError("the proxy's answer to CONNECT is too long")
    line = buf.split(b"\r\n", 1)[0]
    status = line.split(None, 2)
    if len(status) < 2 or status[1] != b"200":
        raise OSError(f"the proxy refused CONNECT {name}:{port}: {line.decode('latin-1')[:100]}")


def _dropped(sock) -> bool:
    """A kept-alive connection the server closed (or wrote to unasked) while it was idle."""
    import select
    try:
        if getattr(sock, "pending", None) is not None and sock.pending():
            return True                 # TLS data already decrypted, waiting unasked
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class HttpSession:
    """Keep-alive HTTP/1.1 exchanges with one server at a time (http1.py's answer reader + ssl).

    ``context`` (an ssl.SSLContext) for https:// URLs, ``check_peer(der, host)`` called after
    each handshake before anything is sent (it raises to refuse the server). Use ``request``,
    read the answer (``read1``) to its end, then ``release`` it: the connection stays open
    for the next request when the whole answer was read, else it is closed. A request goes
    out in one write (headers and body together: one TLS record, no Nagle/delayed-ACK stall).
    ``use_proxy=False``: connect straight even when the environment names an https proxy."""

    def __init__(self, context=None, check_peer=None, *, use_proxy: bool = True):
        self.context = context
        self.check_peer = check_peer
        self.use_proxy = use_proxy      # False: connect straight, whatever https_proxy says
        self._sock = None
        self._key = None

    def close(self) -> None:
        sock, self._sock, self._key = self._sock, None, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "HttpSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self, scheme: str, host: str, port: int, timeout: float | None):
        proxy = proxy_for(host, port) if scheme == "https" and self.use_proxy else None
        if proxy is None:
            sock = _tcp(host, port, timeout)
        else:
            sock = _tcp(proxy[0], proxy[1], timeout)
            try:
                _tunnel(sock, host, port, proxy[2])
            except OSError as e:
                sock.close()
                raise ConnectFailed("tcp", e, host) from None
        if scheme == "https":
            if self.context is None:
                sock.close()
                raise ValueError("an https:// URL needs a TLS context")
            try:
                sock = self.context.wrap_socket(sock, server_hostname=wire_name(host))
            except OSError as e:            # ssl.SSLError, a time-out or a reset in the handshake
                sock.close()
                raise ConnectFailed("tls", e, host) from None
            if self.check_peer is not None:
                try:
                    self.check_peer(sock.getpeercert(binary_form=True), host)
                except BaseException:
                    sock.close()
                    raise
        return sock

    def request(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None, *,
                connect_timeout: float | None = None, read_timeout: float | None = None):
        """Send one request; returns the http1.Response (``status``, ``reason``, ``headers``,
        ``getheader``) once its status line and headers arrived (interim 1xx answers skipped).
        Raises ConnectFailed, ExchangeFailed, or check_peer's refusal."""
        from urllib.parse import urlsplit
        u = urlsplit(url)
        scheme, host = u.scheme.lower(), u.hostname or ""
        default = 443 if scheme == "https" else 80
        port = u.port or default
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        key = (scheme, host, port)
        w = current()
        sock = self._sock if self._key == key else None
        if sock is not None and _dropped(sock):
            sock = None
        if sock is None:
            self.close()
            sock = self._connect(scheme, host, port, connect_timeout)
            self._sock, self._key = sock, key
        elif w is not None:
            w.add(sock)                 # a kept-alive connection obeys this exchange's deadline too
        if w is not None:
            w.connected = True
        name = f"[{host}]" if ":" in host else host
        lines = [f"{method} {target} HTTP/1.1", f"Host: {name}" + (f":{port}" if port != default else ""),
                 "Accept-Encoding: identity"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body or b'')}")
        try:
            sock.settimeout(read_timeout)
            sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b""))
        except OSError as e:
            self.close()
            raise ExchangeFailed("send", e, host) from None
        resp = Response(sock, method)
        try:
            resp.begin()
        except (OSError, AnswerError) as e:
            self.close()
            raise ExchangeFailed("answer", e, host) from None
        if any(k.lower() == "connection" and "close" in (t.strip().lower() for t in str(v).split(","))
               for k, v in (headers or {}).items()):
            resp.will_close = True      # we asked for the connection to end with this answer
        return resp

    def release(self, resp) -> None:
        """Done with ``resp``: keep the connection when its answer was read whole (and neither
        side said ``Connection: close``), else close it."""
        if resp is None or not resp.reusable:
            self.close()

    def read1(self, resp, n: int = 65536) -> bytes:
        """What has arrived of the body, up to ``n`` bytes (b"" at its end). A connection that
        ends before the body does, or a malformed chunked body, raises ExchangeFailed("body")."""
        try:
            return resp.read1(n)
        except (OSError, AnswerError) as e:
            self.close()
            raise ExchangeFailed("body", e) from None
