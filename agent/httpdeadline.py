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

Connections opt in through ``WatchedConnectionMixin`` (tls.py's HTTPS
connection class, ``WatchedHTTPConnection`` for plain HTTP test servers).
"""
from __future__ import annotations

import socket
import threading
import time

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

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


class WatchedConnectionMixin:
    """For urllib3 connection classes: register sockets with the thread's DeadlineWatch."""

    def _new_conn(self):
        sock = super()._new_conn()
        w = current()
        if w is not None:
            w.tcp = True
            w.add(sock)
        return sock

    def connect(self) -> None:
        super().connect()
        w = current()
        if w is not None:
            w.connected = True

    def request(self, *args, **kw):
        w = current()
        if w is not None and getattr(self, "sock", None) is not None:   # a kept-alive connection
            w.add(self.sock)
            w.connected = True
        return super().request(*args, **kw)


class WatchedHTTPConnection(WatchedConnectionMixin, HTTPConnection):
    pass


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedAdapter(HTTPAdapter):
    """requests adapter for plain http:// (test servers): its connections obey the watch."""

    def init_poolmanager(self, *args, **kw):
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme,
                                                   "http": WatchedHTTPConnectionPool}
