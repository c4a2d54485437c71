"""Reading one HTTP/1.x answer off a connected socket (RFC 9112), for httpdeadline.HttpSession.

Not http.client on purpose (issue #8): importing it pulls in the whole ``email`` package
(parser, feedparser, message, header, charset, calendar, random, ...), about 1.6 MB of
RSS and 10 ms at every CLI start, only to split header lines. This module does only what
an ES9+ / ESipa / report client needs of an answer:

* the status line: ``HTTP/1.0`` or ``HTTP/1.1``, a three-digit status (100-999); anything
  else is not HTTP (``MalformedAnswer``). Interim 1xx answers (100 Continue, 102, 103) are
  read and skipped; an unasked-for 101 is refused;
* header fields: at most ``MAX_HEADERS`` of them, each line at most ``MAX_LINE`` bytes,
  names a token, no obs-fold, no NUL or bare CR; looked up case-insensitively;
* body framing as RFC 9112 §6.3 says: none for HEAD, 1xx, 204 and 304; ``Transfer-Encoding:
  chunked`` (extensions ignored, trailers read and dropped); ``Content-Length`` (one
  value, or repeats of the same value); otherwise until the server closes. A chunk size,
  a Content-Length or a transfer coding we cannot use is ``MalformedAnswer``; a connection
  that ends before the answer is complete is ``IncompleteAnswer``.

``Response.read1(n)`` gives what has arrived of the body (at most one ``recv`` for body
bytes), b"" at its end. ``Response.reusable`` says the connection may carry the next
request: the whole body was read, nothing more arrived, and neither HTTP/1.0 without
keep-alive nor ``Connection: close`` ended it. Socket errors (time-outs, resets, ssl)
pass through unchanged; the only other exceptions are this module's.
"""
from __future__ import annotations

MAX_LINE = 65536            # bytes in one status, header, chunk-size or trailer line (with its CRLF)
MAX_HEADERS = 100           # header fields in one answer (and trailer fields after a chunked body)
_RECV = 65536

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_NO_BODY = (204, 304)


class AnswerError(Exception):
    """The server's answer could not be read as an HTTP/1.x answer (not a socket error)."""


class MalformedAnswer(AnswerError):
    """What the server sent is not HTTP/1.x as RFC 9112 frames it: a bad status line, a bad
    or oversized header section, a bad chunk size, conflicting lengths."""


class IncompleteAnswer(AnswerError):
    """The connection ended before the answer was complete (``received`` of ``expected``
    body bytes when a Content-Length was given; ``expected`` None otherwise)."""

    def __init__(self, message: str, received: int = 0, expected: int | None = None):
        super().__init__(message)
        self.received = received
        self.expected = expected


class Response:
    """One answer: ``status``, ``reason``, ``version`` (10 or 11), ``headers`` (name, value)
    pairs as received; the body through ``read1``."""

    def __init__(self, sock, method: str = "GET"):
        self._sock = sock
        self._buf = bytearray()
        self._eof = False
        self.method = method.upper()
        self.status = 0
        self.reason = ""
        self.version = 11
        self.headers: list[tuple[str, str]] = []
        self.will_close = False
        self.chunked = False
        self.length: int | None = None      # Content-Length as given (None: chunked or until close)
        self._left: int | None = 0          # body bytes left (Content-Length, or the current chunk)
        self._crlf = False                  # a chunk's data was read, its CRLF not yet
        self._mode = "none"                 # "none", "length", "chunked", "close"
        self._received = 0
        self._done = False
        self._failed = False

    # ------------------------------------------------------------------ reading the socket
    def _fill(self, n: int = _RECV) -> bool:
        """One recv into the buffer; False at the end of the connection."""
        if self._eof:
            return False
        data = self._sock.recv(n)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _line(self, what: str) -> bytes | None:
        """The next line without its LF / CRLF; None when the connection ends first (what
        came of a partial line stays in the buffer)."""
        scanned = 0
        while True:
            i = self._buf.find(b"\n", scanned)
            if i >= 0:
                if i + 1 > MAX_LINE:
                    break
                line = bytes(self._buf[:i])
                del self._buf[:i + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if b"\r" in line:
                    raise MalformedAnswer(f"a bare CR in the {what}: {_show(line)}")
                return line
            if len(self._buf) >= MAX_LINE:
                break
            scanned = len(self._buf)
            if not self._fill():
                return None
        raise MalformedAnswer(f"a {what} longer than {MAX_LINE} bytes")

    # ------------------------------------------------------------------ the head
    def begin(self) -> "Response":
        """Read the status line and the header section (interim 1xx answers skipped) and
        decide how the body is framed."""
        while True:
            self._status_line()
            fields = self._fields("header line")
            if self.status >= 200:
                break
            if self.status == 101:
                raise MalformedAnswer("the server switched protocols (101) unasked")
            # 100 Continue, 102 Processing, 103 Early Hints: the final answer follows
        self.headers = fields
        self._framing()
        return self

    def _status_line(self) -> None:
        line = self._line("status line")
        if line is None:
            partial = bytes(self._buf)
            if not b"HTTP/1.".startswith(partial[:7]):
                raise MalformedAnswer(f"not an HTTP status line: {_show(partial)}")
            raise IncompleteAnswer("the connection closed before the answer's status line" if not partial else
                                   f"the connection closed within the status line {_show(partial)}")
        parts = line.split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise MalformedAnswer(f"not an HTTP/1.x status line: {_show(line)}")
        code = parts[1]
        if len(code) != 3 or not code.isdigit() or code[0:1] == b"0":
            raise MalformedAnswer(f"bad status code in {_show(line)}")
        self.version = 11 if parts[0] == b"HTTP/1.1" else 10
        self.status = int(code)
        self.reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        if "\x00" in self.reason:
            raise MalformedAnswer(f"NUL in the status line {_show(line)}")

    def _fields(self, what: str) -> list[tuple[str, str]]:
        """Field lines up to the empty line ending the section."""
        fields: list[tuple[str, str]] = []
        while True:
            line = self._line(what)
            if line is None:
                raise IncompleteAnswer(f"the connection closed within the answer's {what}s")
            if not line:
                return fields
            fields.append(_field(line, what))
            if len(fields) > MAX_HEADERS:
                raise MalformedAnswer(f"more than {MAX_HEADERS} fields in the answer")

    def getheader(self, name: str, default: str | None = None) -> str | None:
        """The field's value (repeated fields joined with ", "), or ``default``."""
        name = name.lower()
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else default

    def _tokens(self, name: str) -> list[str]:
        value = self.getheader(name)
        return [t.strip().lower() for t in value.split(",") if t.strip()] if value is not None else []

    def _framing(self) -> None:
        conn = self._tokens("connection")
        self.will_close = "close" in conn or (self.version == 10 and "keep-alive" not in conn)
        if self.method == "HEAD" or self.status in _NO_BODY:
            self._done = True
            return
        te = [t for t in self._tokens("transfer-encoding") if t != "identity"]
        if te:
            if te != ["chunked"]:
                raise MalformedAnswer(f"unsupported Transfer-Encoding {self.getheader('transfer-encoding')!r}")
            self.chunked, self._mode, self._left = True, "chunked", None
            if self.version == 10 or self.getheader("content-length") is not None:
                self.will_close = True          # RFC 9112 §6.1, §6.3: faulty framing, never reused
            return
        cl = self.getheader("content-length")
        if cl is not None:
            values = {v.strip() for v in cl.split(",")}
            if len(values) != 1:
                raise MalformedAnswer(f"conflicting Content-Length {cl!r}")
            value = values.pop()
            if not value.isascii() or not value.isdigit() or len(value) > 18:
                raise MalformedAnswer(f"bad Content-Length {cl!r}")
            self.length = self._left = int(value)
            self._mode = "length"
            self._done = self._left == 0
            return
        self._mode, self._left, self.will_close = "close", None, True

    # ------------------------------------------------------------------ the body
    @property
    def complete(self) -> bool:
        """The whole body was read."""
        return self._done

    @property
    def reusable(self) -> bool:
        """The connection may carry another request."""
        return self._done and not self._failed and not self.will_close and not self._buf and not self._eof

    def read1(self, n: int = _RECV) -> bytes:
        """What has arrived of the body, up to ``n`` bytes; b"" at its end."""
        if n == 0:
            return b""
        if n < 0:
            n = _RECV
        try:
            return self._read1(n)
        except BaseException:
            self._failed = True
            raise

    def _read1(self, n: int) -> bytes:
        while not self._done:
            if self._mode == "chunked" and not self._left:
                if self._crlf:
                    self._chunk_end()
                self._chunk_head()
                continue
            want = n if self._left is None else min(n, self._left)
            if self._buf:
                data = bytes(self._buf[:want])
                del self._buf[:want]
            elif self._eof:
                data = b""
            else:
                data = self._sock.recv(want)
                if not data:
                    self._eof = True
            if not data:
                if self._mode == "close":
                    self._done = True
                    return b""
                if self._mode == "length":
                    raise IncompleteAnswer(f"the connection closed after {self._received} of "
                                           f"{self.length} body bytes", self._received, self.length)
                raise IncompleteAnswer(f"the connection closed within a chunk after {self._received} body bytes",
                                       self._received)
            self._received += len(data)
            if self._left is not None:
                self._left -= len(data)
                if self._mode == "length" and not self._left:
                    self._done = True
                elif self._mode == "chunked" and not self._left:
                    self._crlf = True           # read with the next chunk-size line
            return data
        return b""

    def _chunk_head(self) -> None:
        """The next chunk-size line; the last chunk (0) also takes the trailer section."""
        line = self._line("chunk-size line")
        if line is None:
            raise IncompleteAnswer(f"the connection closed before the end of the chunked body "
                                   f"({self._received} bytes)", self._received)
        size = line.split(b";", 1)[0].rstrip(b" \t")
        if not size or len(size.lstrip(b"0")) > 16 or not _HEX.issuperset(size):
            raise MalformedAnswer(f"bad chunk size line {_show(line)}")
        self._left = int(size, 16)
        if self._left:
            return
        # last-chunk: trailer fields up to an empty line (a server that closes here sent the whole body)
        count = 0
        while True:
            line = self._line("trailer line")
            if line is None:
                self.will_close = True
                break
            if not line:
                break
            _field(line, "trailer line")
            count += 1
            if count > MAX_HEADERS:
                raise MalformedAnswer(f"more than {MAX_HEADERS} trailer fields in the answer")
        self._done = True

    def _chunk_end(self) -> None:
        """The CRLF after a chunk's data."""
        while len(self._buf) < 2 and not self._buf.startswith(b"\n"):
            if not self._fill():
                raise IncompleteAnswer(f"the connection closed within a chunk after {self._received} body bytes",
                                       self._received)
        self._crlf = False
        if self._buf.startswith(b"\r\n"):
            del self._buf[:2]
        elif self._buf.startswith(b"\n"):
            del self._buf[:1]
        else:
            raise MalformedAnswer(f"no CRLF after a chunk: {_show(bytes(self._buf[:20]))}")


def _field(line: bytes, what: str) -> tuple[str, str]:
    name, colon, value = line.partition(b":")
    if not colon or not name or not _TCHAR.issuperset(name):
        raise MalformedAnswer(f"bad {what} {_show(line)}")       # also obs-fold (leading SP/HTAB)
    if b"\x00" in value:
        raise MalformedAnswer(f"NUL in the {what} {_show(line)}")
    return name.decode("ascii"), value.strip(b" \t").decode("latin-1")


def _show(b: bytes) -> str:
    return repr(b[:80])[1:] + ("..." if len(b) > 80 else "")


def read_response(sock, method: str = "GET") -> Response:
    """The answer arriving on ``sock`` (status line and headers read; the body via read1)."""
    return Response(sock, method).begin()
