"""Our HTTP/1.1 answer reader (agent/http1.py) and HttpSession over it (issue #8: no http.client).

* the reader against a fake socket: status lines, header fields and their limits, every body
  framing of RFC 9112 §6.3 (none, chunked with extensions and trailers, Content-Length, until
  close), interim 1xx answers, keep-alive, truncation, ``read1``'s one-recv promise;
* HttpSession against a loopback server: keep-alive reuse vs close, failures by stage, the
  ES9+ client's error codes, the daemon's report-back;
* a property (hypothesis): whatever bytes a server sends, in whatever pieces, end in an
  answer or in http1's own exceptions, within a time bound;
* a fresh interpreter importing the download path (and running one exchange) never loads
  http.client or the email package.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from agent import http1
from agent.http1 import MAX_HEADERS, MAX_LINE, AnswerError, IncompleteAnswer, MalformedAnswer, read_response
from agent.httpdeadline import ExchangeFailed, HttpSession
from fuzzkit import bounded, examples, mutated

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

class FakeSock:
    """recv() hands out ``data`` in pieces of ``sizes`` (then the rest), b"" at the end."""

    def __init__(self, data: bytes, sizes=()):
        self.data = bytes(data)
        self.pos = 0
        self.sizes = list(sizes)
        self.recvs = 0

    def recv(self, n: int) -> bytes:
        assert n > 0, "recv(0) would look like the end of the connection"
        self.recvs += 1
        k = min(n, self.sizes.pop(0) if self.sizes else len(self.data))
        out = self.data[self.pos:self.pos + k]
        self.pos += len(out)
        return out


def answer(raw: bytes, method: str = "GET", sizes=()) -> http1.Response:
    return read_response(FakeSock(raw, sizes), method)


def body(resp: http1.Response, n: int = 65536) -> bytes:
    out = bytearray()
    while True:
        b = resp.read1(n)
        assert len(b) <= n
        if not b:
            return bytes(out)
        out += b


def one(raw: bytes, method: str = "GET", sizes=()) -> tuple[http1.Response, bytes]:
    r = answer(raw, method, sizes)
    return r, body(r)


# --------------------------------------------------------------------------- status line and headers

def test_status_line_and_case_insensitive_headers():
    r, b = one(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-A: 1\r\nx-a:  2 \r\n"
               b"Content-Length: 2\r\n\r\n{}")
    assert (r.status, r.reason, r.version, b) == (201, "Created", 11, b"{}")
    assert r.getheader("content-type") == r.getheader("CONTENT-TYPE") == "application/json"
    assert r.getheader("X-a") == "1, 2" and r.getheader("missing", "d") == "d"
    assert r.headers[0] == ("Content-Type", "application/json")
    r, b = one(b"HTTP/1.0 404\r\n\r\nnot here")          # no reason phrase; bare LF line ends allowed below
    assert (r.status, r.reason, r.version, b) == (404, "", 10, b"not here")
    r, b = one(b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx")
    assert (r.status, b) == (200, b"x")
    r, b = one(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n")   # 3 digits: the caller judges it
    assert r.status == 999 and b == b""


@pytest.mark.parametrize("raw", [
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/0.9 200 OK\r\n\r\n",
    b"HTTP/1.2 200 OK\r\n\r\n",
    b"http/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 099 Low\r\n\r\n",
    b"HTTP/1.1  200 OK\r\n\r\n",
    b"HTTP/1.1\r\n\r\n",
    b"HTTP/1.1 200 O\rK\r\n\r\n",
    b"HTTP/1.1 200 O\x00K\r\n\r\n",
    b"\r\nHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    b"SSH-2",                                   # a partial line that cannot become HTTP
])
def test_malformed_status_lines(raw):
    with pytest.raises(MalformedAnswer):
        answer(raw)


@pytest.mark.parametrize("line", [
    b"NoColon",
    b" folded: value",                          # obs-fold (and a leading space)
    b"\tfolded",
    b"Name : value",                            # whitespace before the colon
    b": no name",
    b"Na(me): value",
    b"Name: va\x00lue",
    b"Name: va\rlue",
])
def test_malformed_header_lines(line):
    with pytest.raises(MalformedAnswer):
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + line + b"\r\n\r\n")


def test_header_limits():
    head = b"HTTP/1.1 200 OK\r\n"
    ok = head + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS - 1)) + b"Content-Length: 0\r\n\r\n"
    assert len(answer(ok).headers) == MAX_HEADERS
    with pytest.raises(MalformedAnswer, match="more than 100"):
        answer(head + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n")
    # a line of MAX_LINE bytes with its CRLF is the longest taken
    longest = b"X-Long: " + b"a" * (MAX_LINE - len(b"X-Long: ") - 2) + b"\r\n"
    assert len(longest) == MAX_LINE
    r = answer(head + longest + b"Content-Length: 0\r\n\r\n")
    assert len(r.getheader("x-long")) == MAX_LINE - 10
    with pytest.raises(MalformedAnswer, match="longer than"):
        answer(head + b"X-Long: a" + longest + b"\r\n")
    with pytest.raises(MalformedAnswer, match="longer than"):      # no line end at all
        answer(head + b"X-Long: " + b"a" * (2 * MAX_LINE))
    with pytest.raises(MalformedAnswer, match="longer than"):
        answer(b"HTTP/1.1 200 " + b"O" * MAX_LINE + b"\r\n\r\n")


def test_a_line_dripped_a_byte_at_a_time_is_read_in_linear_time():
    raw = b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 60000 + b"\r\nContent-Length: 0\r\n\r\n"
    sock = FakeSock(raw, [1] * len(raw))
    r = read_response(sock)
    assert len(r.getheader("x-long")) == 60000 and sock.recvs == len(raw)


@pytest.mark.parametrize("raw", [
    b"",
    b"HTTP/1.1 20",
    b"HTTP/1.",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"HTTP/1.1 100 Continue\r\n\r\n",
])
def test_connection_ending_before_the_head_is_complete(raw):
    with pytest.raises(IncompleteAnswer):
        answer(raw)


# --------------------------------------------------------------------------- body framing

def test_content_length_body():
    r, b = one(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", sizes=[20, 3, 2])
    assert b == b"hello world" and r.length == 11 and r.complete and r.reusable


def test_content_length_repeated_with_the_same_value_and_spaces():
    r, b = one(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length:  3 \r\n\r\nabc")
    assert b == b"abc" and r.reusable
    r, b = one(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc")
    assert b == b"abc"


@pytest.mark.parametrize("value", [b"5, 6", b"-1", b"+5", b"1e3", b"0x10", b"", b"5 5", b"9" * 30, b"\xb2",
                                   b"5,"])
def test_bad_content_length(value):
    with pytest.raises(MalformedAnswer, match="Content-Length"):
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n12345")


def test_conflicting_content_length_fields():
    with pytest.raises(MalformedAnswer, match="conflicting"):
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n123456")


def test_chunked_with_extensions_and_trailers():
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4;name=value\r\nWiki\r\n"
           b"5 ; quoted=\"a;b\" ; flag\r\npedia\r\n"
           b"00000000000000000000E\r\n in\r\n\r\nchunks.\r\n"
           b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")
    for sizes in ([], [1] * len(raw), [7, 13, 2, 40]):
        r, b = one(raw, sizes=sizes)
        assert b == b"Wikipedia in\r\n\r\nchunks." and r.chunked and r.complete and r.reusable, sizes
        assert r.read1(10) == b""
    r, b = one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n")
    assert b == b"0123456789"


def test_chunked_read1_limit_splits_chunks():
    r = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n")
    assert [r.read1(4), r.read1(4), r.read1(4)] == [b"abcd", b"ef", b""]


@pytest.mark.parametrize("size_line", [b"zz", b"-1", b"0x10", b"", b" 5", b"+5", b"1_0", b"1" * 17, b";ext"])
def test_bad_chunk_sizes(size_line):
    with pytest.raises(MalformedAnswer, match="chunk size"):
        one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\nabcde\r\n0\r\n\r\n")


def test_chunk_data_not_followed_by_crlf():
    with pytest.raises(MalformedAnswer, match="CRLF"):
        one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWikiXX\r\n0\r\n\r\n")


def test_chunk_size_line_and_trailer_limits():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(MalformedAnswer, match="longer than"):
        one(head + b"4;" + b"e" * MAX_LINE + b"\r\nWiki\r\n0\r\n\r\n")
    with pytest.raises(MalformedAnswer, match="more than 100 trailer"):
        one(head + b"0\r\n" + b"".join(b"T-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n")
    with pytest.raises(MalformedAnswer, match="trailer"):
        one(head + b"0\r\nnot a field\r\n\r\n")


def test_transfer_encoding_other_than_chunked_is_refused():
    for te in (b"gzip", b"gzip, chunked", b"chunked, chunked", b"chunked, gzip"):
        with pytest.raises(MalformedAnswer, match="Transfer-Encoding"):
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    r, b = one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok")
    assert b == b"ok" and r.reusable


def test_transfer_encoding_overrides_content_length_and_closes():
    r, b = one(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nok\r\n0\r\n\r\n")
    assert b == b"ok" and r.complete and not r.reusable
    r, b = one(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nok\r\n0\r\n\r\n")
    assert b == b"ok" and not r.reusable


def test_close_delimited_body():
    r, b = one(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it until the end", sizes=[30, 5, 1])
    assert b == b"all of it until the end" and r.complete and not r.reusable and r.length is None


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status):
    raw = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status
    sock = FakeSock(raw)
    r = read_response(sock)
    assert r.read1(100) == b"" and r.complete and r.reusable


def test_head_has_no_body():
    r = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", method="HEAD")
    assert r.read1(100) == b"" and r.reusable


def test_interim_answers_are_skipped():
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 102 Processing\r\n\r\n"
           b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    r, b = one(raw, sizes=[5] * 40)
    assert (r.status, b, r.getheader("link"), r.reusable) == (200, b"ok", None, True)


@pytest.mark.parametrize("head,reusable", [
    (b"HTTP/1.1 200 OK\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n", False),
    (b"HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\n", False),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n", True),
    (b"HTTP/1.0 200 OK\r\n", False),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n", True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\n", False),
])
def test_keep_alive(head, reusable):
    r = answer(head + b"Content-Length: 2\r\n\r\nok")
    assert not r.reusable                       # not before the body was read
    assert body(r) == b"ok" and r.reusable is reusable


def test_bytes_after_the_body_make_the_connection_unusable():
    r, b = one(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert b == b"ok" and r.complete
    r2, _ = one(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra")
    assert r2.complete and not r2.reusable
    r3, _ = one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nextra")
    assert r3.complete and not r3.reusable


def test_truncated_content_length_body():
    r = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"header\"")
    assert r.read1(65536) == b"{\"header\""
    with pytest.raises(IncompleteAnswer) as ei:
        r.read1(65536)
    assert (ei.value.received, ei.value.expected) == (9, 100)
    assert not r.reusable


@pytest.mark.parametrize("tail", [
    b"",                                # no chunk-size line at all
    b"A",                               # within the chunk-size line
    b"A\r\n01234",                      # within the chunk data
    b"A\r\n0123456789",                 # before the chunk's CRLF
    b"A\r\n0123456789\r",
    b"A\r\n0123456789\r\n",             # before the last chunk
])
def test_truncated_chunked_body(tail):
    r = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + tail)
    with pytest.raises(IncompleteAnswer):
        body(r)
    assert not r.reusable


def test_connection_ending_in_the_trailer_still_has_the_whole_body():
    r, b = one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n")
    assert b == b"ok" and r.complete and not r.reusable


def test_read1_waits_for_at_most_one_recv_of_body():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    sock = FakeSock(head + b"0123456789", sizes=[len(head), 3, 4, 3])
    r = read_response(sock)
    before = sock.recvs
    assert r.read1(65536) == b"012" and sock.recvs == before + 1
    assert r.read1(65536) == b"3456" and sock.recvs == before + 2
    assert r.read1(2) == b"78" and r.read1(65536) == b"9" and r.read1(65536) == b""
    # bytes already buffered with the headers are handed out without a recv
    sock = FakeSock(head + b"01234")
    r = read_response(sock)
    before = sock.recvs
    assert r.read1(65536) == b"01234" and sock.recvs == before
    assert r.read1(0) == b""


def test_socket_errors_pass_through():
    class Broken(FakeSock):
        def recv(self, n):
            if self.pos >= 40:
                raise socket.timeout("timed out")
            return super().recv(n)
    r = read_response(Broken(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", sizes=[40]))
    with pytest.raises(socket.timeout):
        r.read1(10)
    assert not r.reusable


# --------------------------------------------------------------------------- the property

FAST_EXAMPLES = 200

_SEEDS = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"a\": true}\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.0 500 Oops\r\nContent-Type: text/plain\r\n\r\nclose-delimited body",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\nffffffff\r\nabc\r\n",
]


@st.composite
def server_bytes(draw):
    """A valid answer with a few byte-level mutations, or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    return draw(mutated(_SEEDS, interesting=b"\r\n :;0fF9\x00\t,", least=0,
                        inserts=[b"\r\n", b"\r\n\r\n", b"0\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n",
                                 b"Connection: close\r\n"]))


def _read_all(raw: bytes, sizes: list[int], method: str, n: int) -> None:
    sock = FakeSock(raw, sizes)
    try:
        r = read_response(sock, method)
    except AnswerError:
        return
    assert 100 <= r.status <= 999 and r.status >= 200
    got = 0
    try:
        while True:
            b = r.read1(n)
            assert isinstance(b, bytes) and len(b) <= n
            if not b:
                break
            got += len(b)
            assert got <= len(raw)
    except AnswerError:
        assert not r.reusable
        return
    assert r.complete and r.read1(n) == b""
    # (bytes the server sent after the answer stay in the socket: HttpSession's idle check
    # sees them and does not reuse the connection)


@pytest.mark.fuzz
def test_property_any_server_bytes_end_in_an_answer_or_our_own_error(request):
    n_examples = examples(request.config, FAST_EXAMPLES)
    long_run = n_examples > FAST_EXAMPLES

    @given(server_bytes(), st.lists(st.integers(1, 50), max_size=20), st.sampled_from(["GET", "POST", "HEAD"]),
           st.sampled_from([1, 7, 65536]))
    @settings(max_examples=n_examples, deadline=None, derandomize=not long_run, database=None,
              print_blob=long_run, suppress_health_check=list(HealthCheck))
    def check(raw, sizes, method, n):
        bounded(_read_all, raw, sizes, method, n)

    if long_run and os.environ.get("ESIM_AGENT_FUZZ_SEED"):
        check = seed(int(os.environ["ESIM_AGENT_FUZZ_SEED"]))(check)
    check()


# --------------------------------------------------------------------------- HttpSession on loopback

class Server:
    """Loopback HTTP server answering each request with the next of ``answers`` (raw bytes);
    a connection stays open for the next request unless the answer is followed by None."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.connections = 0
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/path"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(10)
        while self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(10)
                buf = b""
                while self.answers:
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b"\r\n\r\n" not in buf:
                        break
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            length = int(v)
                    while len(buf) < length:
                        buf += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + buf[:length])
                    buf = buf[length:]
                    conn.sendall(self.answers.pop(0))
                    if self.answers and self.answers[0] is None:
                        self.answers.pop(0)
                        break

    def close(self):
        self.sock.close()
        self.thread.join(5)


def _exchange(session: HttpSession, url: str, headers=None) -> tuple[int, bytes]:
    resp = session.request("POST", url, b"{}", headers or {}, connect_timeout=5, read_timeout=5)
    try:
        out = bytearray()
        while True:
            b = session.read1(resp, 65536)
            if not b:
                return resp.status, bytes(out)
            out += b
    finally:
        session.release(resp)


def test_session_keeps_the_connection_alive_between_whole_answers():
    srv = Server([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\ntwo\r\n0\r\n\r\n",
                  b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"])
    with HttpSession() as s:
        assert _exchange(s, srv.url) == (200, b"ok")
        assert _exchange(s, srv.url) == (200, b"two")
        assert _exchange(s, srv.url) == (204, b"")
    srv.close()
    assert srv.connections == 1 and len(srv.requests) == 3
    assert srv.requests[0].startswith(b"POST /path HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % srv.port)


@pytest.mark.parametrize("first,ask_close", [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 200 OK\r\n\r\nok", False),                 # until close
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
])
def test_session_closes_when_either_side_says_so(first, ask_close):
    srv = Server([first, None, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew"])
    with HttpSession() as s:
        assert _exchange(s, srv.url, {"Connection": "close"} if ask_close else None) == (200, b"ok")
        assert s._sock is None                  # released: not kept
        assert _exchange(s, srv.url) == (200, b"new")
    srv.close()
    assert srv.connections == 2


def test_session_closes_after_an_answer_not_read_whole():
    srv = Server([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", None,
                  b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew"])
    with HttpSession() as s:
        resp = s.request("GET", srv.url, connect_timeout=5, read_timeout=5)
        assert s.read1(resp, 2) == b"he"
        s.release(resp)
        assert s._sock is None
        assert _exchange(s, srv.url) == (200, b"new")
    srv.close()
    assert srv.connections == 2


@pytest.mark.parametrize("raw,stage,cause", [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "answer", MalformedAnswer),
    (b"", "answer", IncompleteAnswer),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"header\"", "body", IncompleteAnswer),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "body", IncompleteAnswer),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\nab", "body", MalformedAnswer),
])
def test_session_failures_by_stage(raw, stage, cause):
    srv = Server([raw, None])
    with HttpSession() as s:
        with pytest.raises(ExchangeFailed) as ei:
            _exchange(s, srv.url)
        assert s._sock is None
    srv.close()
    assert ei.value.stage == stage and isinstance(ei.value.cause, cause), ei.value


@pytest.mark.parametrize("raw,code", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\nab", "http_failed"),      # bad chunk size
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n12345", "http_failed"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "http_failed"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nab", "connection_lost"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "connection_lost"),
])
def test_es9p_error_codes(raw, code):
    from agent.errors import TransportError
    from agent.es9p import Es9pClient
    srv = Server([raw, None])
    c = Es9pClient(f"127.0.0.1:{srv.port}", insecure_http=True, sleep=lambda s: None, timeout=(2, 2))
    with pytest.raises(TransportError) as ei:
        c.authenticate_client("0123456789ABCDEF0123456789ABCDEF", b"\xbf\x38\x00")
    srv.close()
    assert ei.value.code == code and ei.value.exit_code == 3, ei.value.to_json()


# --------------------------------------------------------------------------- the daemon's report-back

def _reporter(url: str):
    from agent.daemon.report import Reporter
    cfg = types.SimpleNamespace(report_url=url, report_token="tok", report_insecure_http=True, report_ca=None,
                                http_timeout=5)
    return Reporter(cfg, journal=None)


def test_report_post_statuses_and_headers():
    from agent.daemon.report import ReportError
    srv = Server([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", None,
                  b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", None,
                  b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\ncut", None])
    rep = _reporter(srv.url + "?x=1")
    rep.post("rid-1", {"a": 1})
    with pytest.raises(ReportError, match="answered HTTP 503"):
        rep.post("rid-2", {"a": 2})
    rep.post("rid-3", {"a": 3})                 # a 2xx whose body is cut short: delivered (as before)
    srv.close()
    head = srv.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /path?x=1 HTTP/1.1\r\n")
    for h in ("Authorization: Bearer tok", "Idempotency-Key: rid-1", "Content-Type: application/json",
              "Content-Length: 8"):
        assert h in head
    assert srv.requests[0].endswith(b'{"a": 1}')


def test_report_post_failures():
    from agent.daemon.report import ReportError
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ReportError, match="ConnectionRefusedError"):
        _reporter(f"http://127.0.0.1:{port}/r").post("rid", {})
    srv = Server([b"SSH-2.0-OpenSSH_9.6\r\n\r\n", None])
    with pytest.raises(ReportError, match="MalformedAnswer"):
        _reporter(srv.url).post("rid", {})
    srv.close()
    rep = _reporter("http://127.0.0.1:1/r")
    rep.insecure_http = False
    with pytest.raises(ReportError, match="not https://"):
        rep.post("rid", {})


# --------------------------------------------------------------------------- no http.client, no email

def _fresh(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


_HTTP_MODULES = "sorted(m for m in sys.modules if m == 'http.client' or m.split('.')[0] == 'email')"


def test_download_path_imports_no_http_client_nor_email():
    assert _fresh("import sys, agent.es9p, agent.httpdeadline, agent.tls\n"
                  f"print({_HTTP_MODULES})").strip() == "[]"
    # what `esim-agent profile download` / `notification process` import, preload lists included
    assert _fresh("import sys, agent.cli, agent.flows.download, agent.ops.download, agent.eim_client\n"
                  "from agent import ops, preload\n"
                  "for op in ('profile.download', 'sync', 'notification.process'):\n"
                  "    ops.registry()[op]\n"
                  "    p = preload.Steps(ops.preload_modules(op))\n"
                  "    p.run_all()\n"
                  "    assert not p.failed, p.failed\n"
                  f"print({_HTTP_MODULES})").strip().splitlines()[-1] == "[]"


def test_an_es9p_exchange_imports_no_http_client_nor_email():
    """Not just the imports: one whole ES9+ exchange (connect, send, read, error mapping)."""
    code = r"""
import socket, sys, threading
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
def serve():
    c, _ = ls.accept()
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += c.recv(65536)
    body = b'{"header":{"functionExecutionStatus":{"status":"Executed-Success"}}}'
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    c.close()
threading.Thread(target=serve, daemon=True).start()
from agent.es9p import Es9pClient
c = Es9pClient("127.0.0.1:%d" % ls.getsockname()[1], insecure_http=True, timeout=(2, 2))
status, content = c._post("handleNotification", {"pendingNotification": ""})
assert status == 200 and content.startswith(b'{"header"'), (status, content)
print(MODULES)
""".replace("MODULES", _HTTP_MODULES)
    assert _fresh(code).strip() == "[]"


def test_host_names_go_to_dns_and_tls_as_bytes():
    from agent.httpdeadline import wire_name
    assert wire_name("smdp.example.com") == b"smdp.example.com"
    assert wire_name("127.0.0.1") == b"127.0.0.1"
    assert wire_name("bücher.example") == b"xn--bcher-kva.example"


def test_an_exchange_by_name_does_not_load_the_idna_codec():
    """socket and ssl load the IDNA codec (and unicodedata) for a str host name; an ASCII name
    handed over as bytes needs neither (httpdeadline.wire_name)."""
    code = r"""
import socket, sys, threading
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
def serve():
    c, _ = ls.accept()
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += c.recv(65536)
    c.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    c.close()
threading.Thread(target=serve, daemon=True).start()
from agent.httpdeadline import HttpSession
s = HttpSession()
r = s.request("POST", "http://localhost:%d/x" % ls.getsockname()[1], b"{}", connect_timeout=5, read_timeout=5)
assert r.status == 204
s.release(r)
print(sorted(m for m in sys.modules if m in ("encodings.idna", "stringprep", "unicodedata")))
"""
    assert _fresh(code).strip() == "[]"


# --------------------------------------------------------------------------- the daemon's socket client

@pytest.mark.parametrize("answer, ok", [
    (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}', True),
    (b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"ok": true}', True),                 # read to close
    (b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"ok": true}', False),               # cut short
    (b"SSH-2.0-OpenSSH_9.6\r\n", False),                                                   # not HTTP
    (b"", False),                                                                          # closed at once
])
def test_daemon_client_reads_its_answer_with_http1(tmp_path, answer, ok):
    """agent/daemon/client.py reads the daemon's answers with http1.read_response: a whole answer
    gives its JSON; anything else is DaemonLost (exit 3), never another exception."""
    from agent.daemon.client import DaemonClient, DaemonLost
    path = str(tmp_path / "agent.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)

    def serve():
        c, _ = ls.accept()
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += c.recv(65536)
        c.sendall(answer)
        c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        if ok:
            assert DaemonClient(path, timeout=5).request("GET", "/status") == (200, {"ok": True})
        else:
            with pytest.raises(DaemonLost):
                DaemonClient(path, timeout=5).request("GET", "/status")
    finally:
        t.join(5)
        ls.close()
