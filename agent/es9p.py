"""ES9+ client (LPA <-> SM-DP+), HTTPS JSON binding (docs/protocol.md §3, SGP.22 §6.5/§6.6).

Every call is ``POST https://<address>/gsma/rsp2/es9plus/<function>`` with a
JSON body.  Binary fields are standard base64 of complete DER TLVs, forwarded
byte-exact: what the eUICC or the server signed is never decoded and
re-encoded (docs/protocol.md §0.6).  We only check that each returned blob is valid
base64 holding exactly one well-formed TLV with the expected leading tag, so a
broken server is reported as such instead of surfacing later as a puzzling
eUICC error.

Errors:

* ``Failed``/``Expired`` execution status -> :class:`Es9pError` (exit 1) with a
  stable code per subjectCode/reasonCode (table below, docs/protocol.md §3.5) and the
  raw codes and server message in ``details``;
* non-2xx HTTP -> ServerError ``http_status`` with a body excerpt;
* garbage (JSON, base64, DER, transaction id) -> ProtocolError (exit 3);
* network -> TransportError / TimeoutError_ (exit 3), TLS -> tls.TlsError.

Deadline: one per function call (``deadline``, the CLI's ``--http-timeout``, config
``http_timeout``, default 30 s) covers every attempt, the back-off between them, the
TCP connect, the TLS handshake and the whole answer; a server that never answers,
answers a byte at a time or never finishes the handshake is cut off there
(httpdeadline.py), and the error says which deadline ran out after how many attempts.

Retries: only where repeating cannot change server state twice.  A failure
*before* the request left us (DNS, refused, connect timeout) is retried for
every function.  initiateAuthentication (a fresh transaction each time) and
handleNotification (the server discards duplicates) are also retried after
failures that may have reached the server.  authenticateClient,
getBoundProfilePackage and cancelSession are never resent after the request
may have been delivered (e.g. a read timeout): the SM-DP+ counts download
attempts (8.8.5/6.4) and consumes confirmation-code tries (8.2.7/6.4).
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import re
import time
from dataclasses import dataclass
from collections.abc import Callable

from . import tlv
from .errors import AgentError, InputError, ProtocolError, ServerError, TimeoutError_, TransportError, UsageError
from .http1 import MalformedAnswer
from .httpdeadline import ConnectFailed, DeadlineWatch, HttpFailure
from .tls import TlsError, Trust, load_trust, make_session, map_ssl_error
from .logs import get_logger

log = get_logger(__name__)

ADMIN_PROTOCOL = "gsma/rsp/v2.2.0"
PATH_PREFIX = "/gsma/rsp2/es9plus/"
DEFAULT_TIMEOUT = (5.0, 30.0)
# The connect/read timeouts bound each socket operation; the deadline bounds the whole function
# call, retries included, so a server that drips bytes cannot hold the device (DESIGN.md
# "Never hang"). The CLI's --http-timeout / the config's http_timeout set it.
DEFAULT_DEADLINE = 30.0
DEFAULT_TOTAL_TIMEOUT = DEFAULT_DEADLINE      # the former name
# A Bound Profile Package is tens of KB; anything this large is not an ES9+ answer.
MAX_BODY = 4 * 1024 * 1024
OK_STATUSES = ("Executed-Success", "Executed-WithWarning")

# Functions that may safely be sent again after an ambiguous failure.
_IDEMPOTENT = {"initiateAuthentication", "handleNotification"}


_USER_AGENT: str | None = None


def _installed_version() -> str | None:
    """The installed distribution's version, from its ``esim_agent-VERSION.dist-info`` directory
    name (what importlib.metadata reads too, without its ~25 ms import on a download's path)."""
    import os
    import sys
    for d in sys.path:
        try:
            names = os.listdir(d or ".")
        except OSError:
            continue
        for n in names:
            if n.startswith("esim_agent-") and n.endswith(".dist-info"):
                return n[len("esim_agent-"):-len(".dist-info")]
    return None


def _user_agent() -> str:
    """Looked up once per process."""
    global _USER_AGENT
    if _USER_AGENT is None:
        ver = _installed_version()
        if ver is None:
            from importlib import metadata
            try:
                ver = metadata.version("esim-agent")
            except metadata.PackageNotFoundError:  # running from a source tree
                ver = "dev"
        # "gsma-rsp-lpad" first: it is what SM-DP+ deployments see from LPAs (docs/protocol.md §3.1).
        _USER_AGENT = f"gsma-rsp-lpad esim-agent/{ver}"
    return _USER_AGENT


# --- results ---------------------------------------------------------------------

@dataclass(frozen=True)
class InitiateAuthResult:
    """ES9+ initiateAuthentication's answer: the blobs AuthenticateServer forwards as they are."""
    transaction_id: str            # hex, exactly as the server sent it
    server_signed1: bytes          # 30…
    server_signature1: bytes       # 5F37…
    euicc_ci_pkid_to_be_used: bytes  # 04 14 <SKI>
    server_certificate: bytes      # 30… CERT.DPauth


@dataclass(frozen=True)
class AuthClientResult:
    """ES9+ authenticateClient's answer: the metadata and what PrepareDownload forwards."""
    transaction_id: str
    profile_metadata: bytes        # BF25…
    smdp_signed2: bytes            # 30…
    smdp_signature2: bytes         # 5F37…
    smdp_certificate: bytes        # 30… CERT.DPpb


# --- status codes ----------------------------------------------------------------

class Es9pError(ServerError):
    """The SM-DP+ answered Failed/Expired (exit 1).  ``details`` keep the raw codes."""

    code = "smdp_refused"

    @property
    def subject_code(self) -> str | None:
        return self.details.get("subject_code")

    @property
    def reason_code(self) -> str | None:
        return self.details.get("reason_code")


# (subjectCode, reasonCode) -> (stable code, what it means and what to do).  docs/protocol.md §3.5.
STATUS_CODES: dict[tuple[str, str], tuple[str, str]] = {
    ("8.1.1", "3.8"): ("eid_mismatch",
                       "the profile is reserved for another EID; check the EID the backend has for this order"),
    ("8.2.6", "3.8"): ("matching_id_refused",
                       "the SM-DP+ does not accept this matching ID (activation code token); check the "
                       "activation code or ask the operator to issue a new one"),
    ("8.2.7", "2.2"): ("confirmation_code_required",
                       "this profile needs a confirmation code; pass it (e.g. --confirmation-code)"),
    ("8.2.7", "3.8"): ("confirmation_code_wrong", "the confirmation code is wrong"),
    ("8.2.7", "6.4"): ("confirmation_code_retries_exceeded",
                       "too many wrong confirmation codes; the order is blocked, ask the operator to reissue it"),
    ("8.8.5", "4.1"): ("order_expired", "the download order has expired; ask the operator to issue a new one"),
    ("8.8.5", "6.4"): ("download_retries_exceeded",
                       "the maximum number of download attempts for this order was reached; ask the operator "
                       "to reset or reissue it"),
    ("8.2.5", "4.3"): ("no_eligible_profile",
                       "the SM-DP+ has no profile eligible for this eUICC/device (capabilities or order)"),
    ("8.10.1", "3.9"): ("unknown_transaction",
                        "the SM-DP+ does not know this transaction (expired or already finished); start again"),
    ("8.8.1", "3.8"): ("invalid_smdp_address",
                       "the SM-DP+ says the address used is not its own; check the SM-DP+ address"),
    ("8.11.1", "3.9"): ("unknown_ci_public_key",
                        "the SM-DP+ knows none of the eUICC's CI public keys (no common certificate issuer)"),
    ("8.8.2", "3.1"): ("unsupported_ci_pkid",
                       "the SM-DP+ supports none of the eUICC's CI key identifiers (no common certificate issuer)"),
    ("8.8.3", "3.1"): ("svn_not_supported", "the SM-DP+ does not support the eUICC's SGP.22 version"),
    ("8.8.4", "3.7"): ("no_dpauth_certificate",
                       "the SM-DP+ has no DPauth certificate chaining to a CI the eUICC trusts"),
    ("8.1", "6.1"): ("euicc_signature_invalid",
                     "the SM-DP+ rejected the eUICC's signature or server challenge"),
    ("8.1.2", "6.1"): ("eum_certificate_invalid", "the SM-DP+ rejected the EUM certificate"),
    ("8.1.2", "6.3"): ("eum_certificate_expired", "the SM-DP+ says the EUM certificate has expired"),
    ("8.1.3", "6.1"): ("euicc_certificate_invalid", "the SM-DP+ rejected the eUICC certificate"),
    ("8.1.3", "6.3"): ("euicc_certificate_expired", "the SM-DP+ says the eUICC certificate has expired"),
    ("8.1", "4.8"): ("insufficient_memory",
                     "the eUICC has not enough free memory for this profile; delete an unused profile"),
    ("1.2.1", "2.1"): ("bad_request_format", "the SM-DP+ rejected the request format (content type)"),
}


def _scalar(v, limit: int = 500) -> str | None:
    """A server-sent JSON value as text for a message: strings and numbers only, bounded.
    (A list or object, possibly nested hundreds deep, is not printed: repr() of it can
    exceed the recursion limit.)"""
    if isinstance(v, str):
        return v if len(v) <= limit else v[:limit] + "…"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def _shown(v) -> str:
    """repr() of a server-sent JSON value for a message, never of a deep structure."""
    text = _scalar(v, 60)
    if text is None:
        return f"(a JSON {type(v).__name__})" if v is not None else "None"
    return repr(text) if isinstance(v, str) else text


def _status_error(function: str, status: str, data: dict | None, *, http_status: int | None = None) -> Es9pError:
    data = data if isinstance(data, dict) else {}
    subject, reason = _scalar(data.get("subjectCode")) or "", _scalar(data.get("reasonCode")) or ""
    server_msg = _scalar(data.get("message"))
    code, meaning = STATUS_CODES.get((subject, reason), (None, None))
    if code is None:
        code = "smdp_expired" if status == "Expired" else "smdp_refused"
        meaning = ("the SM-DP+ reports the function execution expired" if status == "Expired"
                   else "the SM-DP+ refused the request")
    codes = f"subject {subject or '?'} reason {reason or '?'}"
    msg = f"{function}: {meaning} ({codes}"
    msg += f": {server_msg})" if server_msg else ")"
    details = {"function": function, "status": status, "subject_code": subject or None,
               "reason_code": reason or None, "subject_identifier": _scalar(data.get("subjectIdentifier")),
               "server_message": server_msg}
    if http_status is not None:
        details["http_status"] = http_status
    return Es9pError(msg, code=code, details={k: v for k, v in details.items() if v is not None})


# --- helpers -------------------------------------------------------------------------

_TXID_RE = re.compile(r"\A(?:[0-9A-Fa-f]{2}){1,16}\Z")  # 1..16 bytes (docs/protocol.md §3.2)
_ADDR_RE = re.compile(r"\A(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?\Z")


def _excerpt(data: bytes, n: int = 200) -> str:
    text = data[:n].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return text + ("…" if len(data) > n else "")


def _check_der(raw: bytes, depth: int = 0) -> None:
    """Every constructed TLV inside must parse too (catches truncation deep inside)."""
    if depth > 32:
        raise ProtocolError("TLV nesting deeper than 32", code="malformed_tlv")
    for t in tlv.parse_all(raw):
        if t.constructed:
            _check_der(t.value, depth + 1)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(s: str) -> bytes:
    # Tolerate line breaks some Java servers insert; otherwise strict standard base64.
    return base64.b64decode(re.sub(r"[\r\n\t ]", "", s), validate=True)


def ci_pkids_for_verification(euicc_info1: bytes) -> list[bytes]:
    """SKIs in euiccCiPKIdListForVerification (BF20 / A9 / 04…), docs/protocol.md §2.2."""
    top = tlv.parse_single(euicc_info1)
    lst = tlv.find(tlv.children(top), 0xA9)
    if lst is None:
        return []
    return [t.value for t in tlv.children(lst) if t.tag == 0x04]


def _fes(obj) -> dict | None:
    """header.functionExecutionStatus, or None if the answer has no such (well-typed) object."""
    header = obj.get("header") if isinstance(obj, dict) else None
    fes = header.get("functionExecutionStatus") if isinstance(header, dict) else None
    return fes if isinstance(fes, dict) else None


def _check_input(name: str, blob: bytes, tags: tuple[int, ...]) -> None:
    """What we send must itself be one TLV with the right tag (a bug upstream otherwise)."""
    try:
        t = tlv.parse_single(bytes(blob))
    except ProtocolError as e:
        raise InputError(f"{name} is not a single well-formed TLV: {e.message}", code="bad_es9p_input") from None
    if t.tag not in tags:
        raise InputError(f"{name} starts with tag {t.tag:X}, expected "
                         + " or ".join(f"{x:X}" for x in tags), code="bad_es9p_input")


def _check_txid(txid: str, where: str) -> str:
    if not isinstance(txid, str) or not _TXID_RE.match(txid):
        raise ProtocolError(f"{where}: transactionId {_shown(txid)} is not a 1-16 byte hex string",
                            code="bad_transaction_id")
    return txid


class _DeadlinePassed(Exception):
    """Internal: the function call's one deadline ran out (Es9pClient._post reports it)."""


def _attempts(n: int) -> str:
    return f"{n} attempt" + ("" if n == 1 else "s")


def _with_attempts(err: Exception, attempts: int, *, deadline: float | None = None) -> Exception:
    """Say in the message how many attempts were made (and that the deadline left no room for more)."""
    if isinstance(err, AgentError) and (attempts > 1 or deadline is not None):
        extra = _attempts(attempts) + (f"; no time left for another within the {deadline:g} s deadline"
                                       if deadline is not None else "")
        err.message = f"{err.message} ({extra})"
        err.args = (err.message,)
        err.details["attempts"] = attempts
        if deadline is not None:
            err.details["deadline_s"] = deadline
    return err


# --- the client ------------------------------------------------------------------------

class Es9pClient:
    """One SM-DP+ (one address).  Reuse the instance for a whole download: keep-alive
    keeps a single TLS connection across the four calls.

    ``session`` is accepted for callers of the former requests-based client and not used:
    the client always has its own connection (verified against ``trust`` only)."""

    #: What the messages call the server (eim_client.EimClient reuses the HTTP machinery).
    server_kind = "SM-DP+"

    def __init__(self, address: str, *, session=None, ca=None,
                 config_ca=None, insecure_http: bool = False, timeout=DEFAULT_TIMEOUT,
                 trust: Trust | None = None, retries: int = 2, backoff: float = 0.5,
                 narrow_trust: bool = True, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], _dt.datetime] | None = None, user_agent: str | None = None,
                 total_timeout: float | None = None, deadline: float | None = None):
        self.address = self._parse_address(address, insecure_http)
        self.host = self.address.rsplit(":", 1)[0] if self._has_port(self.address) else self.address
        self.host = self.host.strip("[]")
        self.insecure_http = insecure_http
        self.timeout = timeout if isinstance(timeout, tuple) else (float(timeout), float(timeout))
        # ``deadline``: seconds for one whole function call (``total_timeout`` is its former name).
        self.deadline = float(deadline if deadline is not None else
                              total_timeout if total_timeout is not None else DEFAULT_DEADLINE)
        if not self.deadline > 0:
            raise UsageError(f"the HTTP deadline must be a number of seconds above 0, not {self.deadline!r}",
                             code="bad_timeout")
        self.total_timeout = self.deadline
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.narrow_trust = narrow_trust
        self._sleep = sleep
        self.user_agent = user_agent or _user_agent()
        self.warnings: list[str] = []
        scheme = "http" if insecure_http else "https"
        self.base_url = f"{scheme}://{self.address}"
        if insecure_http:
            self.trust = None
            self.warnings.append(f"plain HTTP to {self.address}: no TLS (test servers only)")
        else:
            self.trust = trust or load_trust(ca, config_ca=config_ca, clock=clock)
            if clock is not None:
                self.trust.clock = clock
        self.session = make_session(self.trust)

    # -- setup --
    @staticmethod
    def _has_port(addr: str) -> bool:
        return bool(re.search(r":\d+\Z", addr)) and (not addr.startswith("[") or "]:" in addr)

    @staticmethod
    def _parse_address(address: str, insecure_http: bool) -> str:
        a = (address or "").strip()
        low = a.lower()
        if low.startswith("https://"):
            a = a[8:]
        elif low.startswith("http://"):
            if not insecure_http:
                raise UsageError(f"SM-DP+ address {address!r} uses plain http://; ES9+ requires TLS "
                                 "(plain HTTP only with --insecure-http, for test servers)", code="bad_address")
            a = a[7:]
        a = a.rstrip("/")
        if not a or not _ADDR_RE.match(a):
            raise UsageError(f"SM-DP+ address {address!r} is not a host name or host:port", code="bad_address")
        return a

    def narrow_to(self, ci_pkids) -> None:
        """Trust only the CIs the eUICC lists for verification (falls back with a warning)."""
        if self.trust is None:
            return
        narrowed = self.trust.for_euicc(ci_pkids)
        if narrowed is not self.trust:
            self.trust = narrowed
            self.session.close()     # a kept connection was verified against the previous CI set
            self.session = make_session(self.trust)

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def all_warnings(self) -> list[str]:
        return self.warnings + (list(self.trust.warnings) if self.trust else [])

    # -- transport --
    def _headers(self) -> dict:
        return {"Content-Type": "application/json", "Accept": "application/json",
                "X-Admin-Protocol": ADMIN_PROTOCOL, "User-Agent": self.user_agent}

    def _map_exception(self, exc: HttpFailure, function: str, *, connected: bool = True) -> Exception:
        """An HttpFailure (httpdeadline.py) as the error the caller reports; ``stage`` says
        where it happened: dns, tcp, tls (nothing sent), send, answer, body."""
        import ssl
        where = f"{self.server_kind} {self.address}"
        cause, stage = exc.cause, exc.stage
        details = {"function": function, "address": self.address, "error": str(cause)[:300]}
        if exc.timed_out and stage == "tls":
            # TCP is up but the server never completes the TLS handshake: nothing was sent.
            return TimeoutError_(f"the TLS handshake with {where} did not complete within {self.timeout[0]:g} s "
                                 f"({function}); check the address and port, and the network",
                                 code="connect_timeout", details=details)
        if isinstance(cause, ssl.SSLError) and stage != "body":
            return map_ssl_error(exc, self.host, self.trust.source if self.trust else "the CI bundle")
        if exc.timed_out and stage in ("dns", "tcp"):
            return TimeoutError_(f"could not connect to {where} within {self.timeout[0]:g} s ({function}); "
                                 "check the network connection", code="connect_timeout", details=details)
        if exc.timed_out:
            hint = ("" if function in _IDEMPOTENT else
                    "; it was not resent because the server may already have acted on it")
            return TimeoutError_(f"{where} did not answer {function} within {self.timeout[1]:g} s{hint}",
                                 code="read_timeout", details=details)
        if stage == "dns":
            return TransportError(f"cannot resolve {self.host} (DNS) for {function}; check the SM-DP+ address "
                                  "and the DNS configuration", code="dns_failure", details=details)
        if stage == "tcp" and isinstance(cause, ConnectionRefusedError):
            return TransportError(f"{where} refused the connection ({function}); check the address and port",
                                  code="connection_refused", details=details)
        if stage in ("tcp", "tls"):
            return TransportError(f"cannot connect to {where} ({function}): {cause}", code="connection_failed",
                                  details=details)
        if isinstance(cause, MalformedAnswer):
            # not HTTP at all (a bad status line, oversized or malformed headers, a bad chunk size)
            return TransportError(f"HTTP request {function} to {where} failed: {cause!r}", code="http_failed",
                                  details=details)
        return TransportError(f"the connection to {where} dropped during {function}", code="connection_lost",
                              details=details)

    def _post(self, function: str, body: dict) -> tuple[int, bytes]:
        """POST one ES9+ function: every attempt, the back-off between them, connect, TLS
        handshake and the whole answer within ``self.deadline`` seconds (one deadline)."""
        url = self.base_url + PATH_PREFIX + function
        data = json.dumps(body, separators=(",", ":")).encode()
        return self._send(function, url, data, self._headers())

    def _send(self, function: str, url: str, data: bytes, headers: dict) -> tuple[int, bytes]:
        """POST ``data`` to ``url`` under the one deadline of ``function`` (see ``_post``)."""
        if self.trust is not None:
            self.trust.check_clock()
        end = time.monotonic() + self.deadline
        attempt = 0
        err: Exception | None = None
        while True:
            t0 = time.monotonic()
            left = end - t0
            if err is not None and left <= 0.05:       # a back-off sleep overran the deadline
                raise _with_attempts(err, attempt, deadline=self.deadline)
            attempt += 1
            answered = False          # the status line and headers arrived
            with DeadlineWatch(left) as watch:
                resp = None
                try:
                    resp = self.session.request("POST", url, data, headers,
                                                connect_timeout=min(self.timeout[0], left),
                                                read_timeout=min(self.timeout[1], left))
                    answered = True
                    try:
                        content = self._read_body(resp, function, watch)
                    finally:
                        self.session.release(resp)
                    if watch.fired:   # a cut connection can look like the end of a body
                        raise _DeadlinePassed()
                    log.debug("%s -> HTTP %s, %d bytes, %.2f s", function, resp.status, len(content),
                              time.monotonic() - t0)
                    return resp.status, content
                except _DeadlinePassed:
                    self.session.close()
                    raise self._deadline_error(function, attempt, watch, answered) from None
                except TlsError:
                    if watch.fired:
                        raise self._deadline_error(function, attempt, watch, answered) from None
                    raise
                except HttpFailure as e:
                    if watch.fired or time.monotonic() >= end:
                        raise self._deadline_error(function, attempt, watch, answered) from None
                    # Not connected yet (DNS, refused, connect or TLS handshake time-out): the
                    # request never left, so any function may go again. A TLS refusal is final.
                    import ssl
                    sent_maybe = not isinstance(e, ConnectFailed)
                    retry_ok = not sent_maybe or (function in _IDEMPOTENT and not
                                                  isinstance(e.cause, ssl.SSLError))
                    err = self._map_exception(e, function, connected=watch.connected)
                    delay = self.backoff * (2 ** (attempt - 1))
                    if isinstance(err, (TlsError, UsageError)) or not retry_ok or attempt > self.retries:
                        raise _with_attempts(err, attempt) from None
                    if time.monotonic() + delay >= end:    # no time left for another attempt
                        raise _with_attempts(err, attempt, deadline=self.deadline) from None
            log.info("%s to %s failed (%s); retrying in %.1f s", function, self.address, err.code, delay)
            self._sleep(delay)

    def _deadline_error(self, function: str, attempts: int, watch: DeadlineWatch, answered: bool) -> TimeoutError_:
        """The one deadline of ``function`` ran out: say where it stood and after how many attempts."""
        where = f"{self.server_kind} {self.address}"
        tail = f"within the {self.deadline:g} s deadline ({_attempts(attempts)})"
        details = {"function": function, "address": self.address, "deadline_s": self.deadline,
                   "attempts": attempts}
        if answered:
            return TimeoutError_(f"{where} did not finish its answer to {function} {tail}",
                                 code="response_deadline", details=details)
        if watch.connected:
            hint = ("" if function in _IDEMPOTENT else
                    "; it was not resent because the server may already have acted on it")
            return TimeoutError_(f"no answer from {where} to {function} {tail}{hint}", code="read_timeout",
                                 details=details)
        what = "complete the TLS handshake with" if watch.tcp and self.trust is not None else "connect to"
        return TimeoutError_(f"could not {what} {where} ({function}) {tail}; check the network connection",
                             code="connect_timeout", details=details)

    def _read_body(self, resp, function: str, watch: DeadlineWatch) -> bytes:
        # read1() returns whatever has arrived, so the deadline is checked between small reads
        # instead of after a 64 KiB block that may never fill; the watch cuts a read that
        # waits past it.
        buf = bytearray()
        while True:
            chunk = self.session.read1(resp, 65536)
            if watch.fired or watch.left < 0:
                raise _DeadlinePassed()
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_BODY:
                raise ProtocolError(f"{self.server_kind} answer to {function} is larger than "
                                    f"{MAX_BODY // 1024} KiB; not a response of its interface", code="response_too_large",
                                    details={"function": function})
        return bytes(buf)

    def _parse(self, function: str, status: int, content: bytes, *, allow_empty: bool = False) -> dict:
        """Check HTTP status + functionExecutionStatus; return the JSON object ({} if empty and allowed)."""
        obj = None
        if content.strip():
            try:
                obj = json.loads(content.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):   # RecursionError: `[[[…` nested deep
                obj = None
                if 200 <= status < 300:
                    raise ProtocolError(f"SM-DP+ sent malformed JSON in its answer to {function}: "
                                        f"{_excerpt(content)!r}", code="malformed_json",
                                        details={"function": function, "http_status": status}) from None
        if not 200 <= status < 300:
            fes = _fes(obj)
            if fes is not None and fes.get("status") in ("Failed", "Expired"):
                raise _status_error(function, fes["status"], fes.get("statusCodeData"), http_status=status)
            hint = {404: " (wrong SM-DP+ address or path?)", 401: "", 403: ""}.get(
                status, " (server-side problem; try again later)" if status >= 500 else "")
            raise ServerError(f"SM-DP+ {self.address} answered HTTP {status} to {function}{hint}: "
                              f"{_excerpt(content) or '(empty body)'}", code="http_status",
                              details={"function": function, "http_status": status,
                                       "body_excerpt": _excerpt(content)})
        if obj is None:
            if allow_empty:
                return {}
            raise ProtocolError(f"SM-DP+ sent an empty answer to {function} (HTTP {status})",
                                code="malformed_json", details={"function": function, "http_status": status})
        if not isinstance(obj, dict):
            raise ProtocolError(f"SM-DP+ sent malformed JSON in its answer to {function}: not an object",
                                code="malformed_json", details={"function": function})
        fes = _fes(obj)
        if fes is None or not isinstance(fes.get("status"), str):
            if allow_empty:
                return obj
            raise ProtocolError(f"SM-DP+ answer to {function} lacks header.functionExecutionStatus",
                                code="malformed_json", details={"function": function})
        st = fes["status"]
        if st not in OK_STATUSES:
            if st in ("Failed", "Expired"):
                raise _status_error(function, st, fes.get("statusCodeData"))
            raise ProtocolError(f"SM-DP+ answer to {function} has unknown status {st!r}", code="malformed_json",
                                details={"function": function, "status": st})
        if st == "Executed-WithWarning":
            scd = fes.get("statusCodeData")
            scd = scd if isinstance(scd, dict) else {}   # a server may send a list, a string, true ...
            self.warnings.append(f"{function}: SM-DP+ warning subject {_scalar(scd.get('subjectCode'))} "
                                 f"reason {_scalar(scd.get('reasonCode'))} {_scalar(scd.get('message')) or ''}"
                                 .rstrip())
        return obj

    def _blob(self, function: str, obj: dict, field: str, tag: int) -> bytes:
        v = obj.get(field)
        d = {"function": function, "field": field}
        if not isinstance(v, str) or not v:
            raise ProtocolError(f"SM-DP+ answer to {function} lacks field {field}", code="missing_field", details=d)
        try:
            raw = _b64decode(v)
        except (binascii.Error, ValueError):
            raise ProtocolError(f"SM-DP+ answer to {function}: field {field} is not valid base64",
                                code="malformed_base64", details=d) from None
        try:
            t = tlv.parse_single(raw)
            _check_der(raw)
        except ProtocolError as e:
            raise ProtocolError(f"SM-DP+ answer to {function}: field {field} is malformed DER ({e.message})",
                                code="malformed_der", details=d) from None
        if t.tag != tag:
            raise ProtocolError(f"SM-DP+ answer to {function}: field {field} starts with tag "
                                f"{t.tag:X}, expected {tag:X}", code="unexpected_tag",
                                details={**d, "tag": f"{t.tag:X}"})
        return raw

    def _echo(self, function: str, obj: dict, txid: str) -> None:
        got = obj.get("transactionId")
        if got is None:  # tolerated: not every server echoes it (the eUICC binds the session anyway)
            return
        if not isinstance(got, str) or got.upper() != txid.upper():
            raise ProtocolError(f"SM-DP+ answered {function} for transaction {_shown(got)}, but we sent {txid!r}",
                                code="transaction_id_mismatch", details={"function": function})

    # -- ES9+ functions --
    def initiate_authentication(self, euicc_challenge: bytes, euicc_info1: bytes,
                                smdp_address: str) -> InitiateAuthResult:
        f = "initiateAuthentication"
        if len(euicc_challenge) != 16:
            raise InputError(f"euiccChallenge must be 16 bytes, got {len(euicc_challenge)}", code="bad_es9p_input")
        _check_input("euiccInfo1", euicc_info1, (0xBF20,))
        if self.narrow_trust and self.trust is not None:
            try:
                pkids = ci_pkids_for_verification(euicc_info1)
            except ProtocolError:
                pkids = []
            self.narrow_to(pkids)
        status, content = self._post(f, {"euiccChallenge": b64(euicc_challenge), "euiccInfo1": b64(euicc_info1),
                                         "smdpAddress": smdp_address})
        obj = self._parse(f, status, content)
        txid = _check_txid(obj.get("transactionId"), f"SM-DP+ answer to {f}")
        res = InitiateAuthResult(
            transaction_id=txid,
            server_signed1=self._blob(f, obj, "serverSigned1", 0x30),
            server_signature1=self._blob(f, obj, "serverSignature1", 0x5F37),
            euicc_ci_pkid_to_be_used=self._blob(f, obj, "euiccCiPKIdToBeUsed", 0x04),
            server_certificate=self._blob(f, obj, "serverCertificate", 0x30),
        )
        # serverSigned1 carries the same transactionId in [0]; a mismatch means the server is broken
        # and the eUICC's answer would be bound to a transaction the server does not expect.
        inner = tlv.find(tlv.children(tlv.parse_single(res.server_signed1)), 0x80)
        if inner is not None and inner.value != bytes.fromhex(txid):
            raise ProtocolError(f"SM-DP+ {f}: transactionId {txid} differs from the one in serverSigned1 "
                                f"({inner.value.hex().upper()})", code="transaction_id_mismatch",
                                details={"function": f})
        return res

    def authenticate_client(self, transaction_id: str, authenticate_server_response: bytes) -> AuthClientResult:
        f = "authenticateClient"
        _check_txid(transaction_id, f)
        _check_input("authenticateServerResponse", authenticate_server_response, (0xBF38,))
        status, content = self._post(f, {"transactionId": transaction_id,
                                         "authenticateServerResponse": b64(authenticate_server_response)})
        obj = self._parse(f, status, content)
        self._echo(f, obj, transaction_id)
        return AuthClientResult(
            transaction_id=transaction_id,
            profile_metadata=self._blob(f, obj, "profileMetadata", 0xBF25),
            smdp_signed2=self._blob(f, obj, "smdpSigned2", 0x30),
            smdp_signature2=self._blob(f, obj, "smdpSignature2", 0x5F37),
            smdp_certificate=self._blob(f, obj, "smdpCertificate", 0x30),
        )

    def get_bound_profile_package(self, transaction_id: str, prepare_download_response: bytes) -> bytes:
        f = "getBoundProfilePackage"
        _check_txid(transaction_id, f)
        _check_input("prepareDownloadResponse", prepare_download_response, (0xBF21,))
        status, content = self._post(f, {"transactionId": transaction_id,
                                         "prepareDownloadResponse": b64(prepare_download_response)})
        obj = self._parse(f, status, content)
        self._echo(f, obj, transaction_id)
        return self._blob(f, obj, "boundProfilePackage", 0xBF36)

    def handle_notification(self, pending_notification: bytes) -> None:
        """Deliver one PendingNotification (BF37 PIR or 30 OtherSignedNotification).

        Returns only when the server accepted it (HTTP 204, or 2xx without a Failed status):
        only then may the caller remove it from the eUICC (docs/protocol.md §6.3).
        """
        f = "handleNotification"
        _check_input("pendingNotification", pending_notification, (0xBF37, 0x30))
        status, content = self._post(f, {"pendingNotification": b64(pending_notification)})
        if status == 204:
            return
        try:
            self._parse(f, status, content, allow_empty=True)
        except ProtocolError:
            if 200 <= status < 300:  # a 2xx with an odd body is still an acceptance
                return
            raise

    def cancel_session(self, transaction_id: str, cancel_session_response: bytes) -> None:
        f = "cancelSession"
        _check_txid(transaction_id, f)
        _check_input("cancelSessionResponse", cancel_session_response, (0xBF41,))
        status, content = self._post(f, {"transactionId": transaction_id,
                                         "cancelSessionResponse": b64(cancel_session_response)})
        if status == 204:
            return
        self._parse(f, status, content)
