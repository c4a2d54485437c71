"""TLS trust policy for ES9+ (and the other RSP HTTPS interfaces).

TLS is always verified (DESIGN "never trust by default"; docs/protocol.md §3.8;
an LPA that switches verification off is a standing complaint of its users).
What we trust:

* the CI certificates from ``--ca FILE`` or the configured ``ca_bundle``
  (PEM or DER, one or more certificates, or a directory of such files), else
  ``/etc/esim-agent/ci-bundle.pem`` if present.  Nothing configured is an
  error (``no_trusted_ci``), never a silent fallback to the system web PKI;
* narrowed, when the eUICC's ``euiccCiPKIdListForVerification`` is known, to
  the CIs whose SubjectKeyIdentifier the eUICC lists (the CI PKID is the SKI,
  docs/protocol.md §4.8).  If none of them is in the bundle we keep the
  whole bundle and record a warning rather than fail, so a card with an
  unusual CI list still works against a correctly configured bundle.

The server certificate (CERT.DP.TLS, docs/protocol.md §3.8) must chain to a
trusted CI, name the host, and be within validity; OpenSSL checks all three
through an SSLContext that holds only our CIs (never the system store) with
TLS >= 1.2 and SNI.  After the handshake, before any request byte is sent, we
look at the role policy OID: a certificate that carries a GSMA RSP role other
than the expected one (e.g. an SM-DS TLS or a DPauth certificate) is refused
(``tls_wrong_role``); one carrying no RSP role at all is accepted with a
warning, because operator/test CIs do not always stamp the policy while the
chain to a trusted CI is already the security anchor.  ``strict_role=True``
refuses that case too.

A clearly unset clock (year < 2024, or before every trusted CI's notBefore)
is refused up front (``clock_unset``): with such a clock every validity check
is meaningless and OpenSSL's errors would mislead.

The role check runs in httpdeadline.HttpSession right after each handshake (``check_peer``);
one session built by ``make_session`` keeps one TLS connection alive across the four ES9+
calls of a download. It is the standard library's ssl and our own HTTP/1.1 answer reader
(http1.py): requests and urllib3 cost a fresh CLI process ~0.1 s of CPU and several MB to
import, http.client ~10 ms and 1.6 MB (it imports the email package), for nothing we use.
"""
from __future__ import annotations

import datetime as _dt
import os
import ssl
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable

from . import cert as _cert
from .cert import Certificate
from .errors import TransportError
from .logs import get_logger

log = get_logger(__name__)

DP_TLS_ROLE_OID = _cert.ROLE_OIDS["dp-tls"]      # 2.23.146.1.2.1.3
DS_TLS_ROLE_OID = _cert.ROLE_OIDS["ds-tls"]      # 2.23.146.1.2.1.6
ROLE_OID_PREFIX = _cert.ROLE_OID_PREFIX

# Looked at, in order, when neither --ca nor the config names a bundle.
DEFAULT_CA_PATHS: tuple[str, ...] = ("/etc/esim-agent/ci-bundle.pem", "/etc/esim-agent/ci")
MIN_PLAUSIBLE_YEAR = 2024
_CERT_SUFFIXES = (".pem", ".crt", ".cer", ".der")

INSTALL_HINT = (
    "Install the GSMA CI root certificate(s) as PEM at /etc/esim-agent/ci-bundle.pem "
    "(or set ca_bundle in /etc/esim-agent/agent.toml), or pass --ca FILE (PEM or DER). "
    "For the local test SM-DP+ use the ci.pem written by `esim-agent sim pki DIR`.")


class TlsError(TransportError):
    """The TLS connection to a server could not be established safely (exit 3)."""

    code = "tls_error"


class TrustError(TlsError):
    """Local trust configuration is unusable (no CI, bad CA file, unset clock).

    Exit 2: retrying will not help, the configuration or clock must be fixed.
    """

    code = "no_trusted_ci"
    exit_code = 2


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _describe(cert: Certificate) -> str:
    return cert.subject or "(empty subject)"


# --- loading CA material -----------------------------------------------------
#
# Certificates are read with cert.py (read-only fields from DER), not the cryptography
# package: a CLI process saves ~0.1 s and ~8 MB, and OpenSSL does all verification anyway.

def _certs_from_bytes(data: bytes, origin: str) -> list[Certificate]:
    """PEM (any number of certificates) or DER (one or several concatenated)."""
    try:
        certs = _cert.load(data)
    except _cert.CertError as e:
        raise TrustError(f"cannot read CA certificates from {origin}: {e.message}. "
                         "Expected PEM or DER X.509 certificates.", code="bad_ca_file") from None
    return certs


def _as_cert(c) -> Certificate:
    """A cert.Certificate from itself, DER bytes, or a cryptography certificate (the simulator's
    and tests' objects; converted through DER, so cryptography is never imported here)."""
    if isinstance(c, Certificate):
        return c
    if isinstance(c, (bytes, bytearray)):
        return _cert.parse(c)
    from cryptography.hazmat.primitives.serialization import Encoding   # only if the caller has it loaded
    return _cert.parse(c.public_bytes(Encoding.DER))


def load_ca_certs(path: str | os.PathLike) -> list[Certificate]:
    """All certificates in a file (PEM/DER) or in the *.pem/*.crt/*.cer/*.der files of a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _CERT_SUFFIXES)
    else:
        files = [p]
    certs: list[Certificate] = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise TrustError(f"cannot read CA file {f}: {e.strerror or e}", code="bad_ca_file") from None
        certs.extend(_certs_from_bytes(data, str(f)))
    if not certs:
        raise TrustError(f"no certificates found in {p}. {INSTALL_HINT}", code="bad_ca_file")
    return certs


def filter_by_ski(certs: Iterable[Certificate], skis: Iterable[bytes]) -> list[Certificate]:
    """The certificates whose SubjectKeyIdentifier (= CI PKID) is in ``skis``, in bundle order."""
    wanted = {bytes(k) for k in skis}
    return [c for c in certs if c.ski in wanted]


# --- the trust object ----------------------------------------------------------

@dataclass(eq=False)
class Trust:
    """A verified-TLS policy: the trusted CI certificates plus role/clock rules.

    ``certs`` are cert.Certificate objects (DER bytes or cryptography certificates are
    converted)."""

    certs: tuple[Certificate, ...]
    source: str
    expected_roles: tuple[str, ...] = (DP_TLS_ROLE_OID,)
    strict_role: bool = False
    clock: Callable[[], _dt.datetime] = _utcnow
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        try:
            self.certs = tuple(_as_cert(c) for c in self.certs)
        except _cert.CertError as e:
            raise TrustError(f"cannot read the CI certificates of {self.source}: {e.message}",
                             code="bad_ca_file") from None
        if not self.certs:
            raise TrustError(f"no trusted CI certificates in {self.source}. {INSTALL_HINT}")
        self._lock = threading.Lock()
        self._bundle: str | None = None
        self._ctx: ssl.SSLContext | None = None
        self._peer_checked: dict[bytes, list[str]] = {}

    # -- identity --
    def skis(self) -> list[bytes]:
        return [c.ski for c in self.certs if c.ski]

    def pem(self) -> bytes:
        return b"".join(c.to_pem() for c in self.certs)

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
            log.warning("%s", msg)

    # -- eUICC preference --
    def for_euicc(self, ci_pkids: Iterable[bytes]) -> "Trust":
        """The CIs the eUICC lists in euiccCiPKIdListForVerification.

        Falls back to the whole bundle (recording a warning) if none matches.
        """
        wanted = {bytes(k) for k in ci_pkids}
        if not wanted:
            return self
        chosen = tuple(filter_by_ski(self.certs, wanted))
        if not chosen:
            self.warn("none of the eUICC's CI PKIDs (" + ", ".join(sorted(k.hex().upper() for k in wanted))
                      + f") matches a certificate in {self.source}; using the whole bundle")
            return self
        if len(chosen) == len(self.certs):
            return self
        return Trust(chosen, f"{self.source} (CIs listed by the eUICC)", self.expected_roles,
                     self.strict_role, self.clock, list(self.warnings))

    # -- clock --
    def check_clock(self, now: _dt.datetime | None = None) -> None:
        now = now or self.clock()
        if now.tzinfo is None:
            now = now.replace(tzinfo=_dt.timezone.utc)
        earliest = min(c.not_before for c in self.certs)
        if now.year < MIN_PLAUSIBLE_YEAR or now < earliest:
            why = (f"before {MIN_PLAUSIBLE_YEAR}" if now.year < MIN_PLAUSIBLE_YEAR
                   else f"before the trusted CI certificates became valid ({earliest:%Y-%m-%d})")
            raise TrustError(
                f"the system clock reads {now:%Y-%m-%d %H:%M} UTC, which is {why}; certificate validity "
                "cannot be checked. Set the clock (NTP, RTC or `date -s`) and retry.",
                code="clock_unset", details={"now": now.isoformat(), "earliest_ci": earliest.isoformat()})

    # -- OpenSSL material --
    def bundle_path(self) -> str:
        """A private PEM file holding exactly our CIs (for tools that take a CA file name)."""
        with self._lock:
            if self._bundle is None or not os.path.exists(self._bundle):
                import tempfile
                fd, path = tempfile.mkstemp(prefix="esim-agent-ci-", suffix=".pem")  # 0600
                with os.fdopen(fd, "wb") as f:
                    f.write(self.pem())
                self._bundle = path
                weakref.finalize(self, _unlink, path)
            return self._bundle

    def ssl_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ctx is None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify + hostname check on; no system CAs
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_verify_locations(cadata=self.pem().decode("ascii"))
                self._ctx = ctx
            return self._ctx

    # -- after the handshake --
    def check_peer(self, der: bytes | None, host: str) -> None:
        """Role-OID policy on the server certificate (chain/host/validity are OpenSSL's)."""
        if not der:
            raise TlsError(f"{host} presented no TLS certificate", code="tls_untrusted")
        key = bytes(der)                # the certificate itself: checked once per connection's peer
        if key in self._peer_checked:
            return
        try:
            oids = _cert.parse(der).policy_oids
        except _cert.CertError as e:
            raise TlsError(f"cannot parse the TLS certificate of {host}: {e}", code="tls_untrusted") from None
        rsp_roles = [o for o in oids if o.startswith(ROLE_OID_PREFIX)]
        if rsp_roles and not set(rsp_roles) & set(self.expected_roles):
            names = ", ".join(f"{o} ({_cert.ROLE_NAMES.get(o, '?')})" for o in rsp_roles)
            raise TlsError(
                f"the TLS certificate of {host} is issued for another GSMA RSP role ({names}), not "
                f"{', '.join(self.expected_roles)}; this server is not the kind of RSP server we asked for. "
                "Check the server address.",
                code="tls_wrong_role", details={"host": host, "roles": rsp_roles})
        if not rsp_roles:
            msg = (f"the TLS certificate of {host} carries no GSMA RSP role policy OID "
                   f"(expected {', '.join(self.expected_roles)})")
            if self.strict_role:
                raise TlsError(msg + "; refused (strict role checking).", code="tls_wrong_role",
                               details={"host": host})
            self.warn(msg + "; accepted because it chains to a trusted CI")
        self._peer_checked[key] = rsp_roles


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def load_trust(ca: str | os.PathLike | None = None, *, config_ca: str | os.PathLike | None = None,
               expected_roles: tuple[str, ...] = (DP_TLS_ROLE_OID,), strict_role: bool = False,
               clock: Callable[[], _dt.datetime] | None = None) -> Trust:
    """Build the trust policy from ``--ca``, else the config's ``ca_bundle``, else the default path."""
    for src in (ca, config_ca):
        if src:
            try:
                exists = Path(src).exists()
            except (OSError, ValueError) as e:   # name too long, NUL byte
                raise TrustError(f"cannot use the CA file name {str(src)[:80]!r}: {getattr(e, 'strerror', None) or e}",
                                 code="bad_ca_file") from None
            if not exists:
                raise TrustError(f"CA file {src} does not exist. {INSTALL_HINT}", code="bad_ca_file")
            return Trust(tuple(load_ca_certs(src)), str(src), expected_roles, strict_role, clock or _utcnow)
    for default in DEFAULT_CA_PATHS:
        if Path(default).exists():
            return Trust(tuple(load_ca_certs(default)), default, expected_roles, strict_role, clock or _utcnow)
    raise TrustError("no trusted CI certificates are configured, so the server's TLS certificate cannot be "
                     "verified (verification is never switched off). " + INSTALL_HINT, code="no_trusted_ci")


# --- the HTTP session -----------------------------------------------------------

def make_session(trust: Trust | None):
    """An httpdeadline.HttpSession verifying against ``trust``: our CIs only (never the system
    store, whatever the environment says), TLS >= 1.2, SNI, the role check after the handshake;
    one kept-alive connection. ``trust=None``: plain http:// only (insecure_http test use)."""
    from .httpdeadline import HttpSession
    if trust is None:
        return HttpSession()
    return HttpSession(trust.ssl_context(), trust.check_peer)


# --- error mapping -----------------------------------------------------------

def walk_exception(exc: BaseException):
    """Yield exc and everything it wraps (args, reason, __cause__, __context__)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (getattr(e, "cause", None), getattr(e, "reason", None), e.__cause__, e.__context__,
                    *getattr(e, "args", ())):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


# OpenSSL X509_V_ERR_* codes (x509_vfy.h).
_UNTRUSTED = {2, 18, 19, 20, 21, 27, 28}
_EXPIRED, _NOT_YET_VALID = 10, 9
_HOSTNAME, _IP, _EMAIL = 62, 64, 63


def map_ssl_error(exc: BaseException, host: str, ca_source: str = "the trusted CI bundle") -> TlsError:
    """Turn an ssl failure (or an httpdeadline.HttpFailure wrapping one) into a TlsError saying what to fix."""
    for e in walk_exception(exc):
        if isinstance(e, TlsError):
            return e
    verr = next((e for e in walk_exception(exc) if isinstance(e, ssl.SSLCertVerificationError)), None)
    details = {"host": host}
    if verr is not None:
        code_n = getattr(verr, "verify_code", None)
        text = getattr(verr, "verify_message", None) or str(verr)
        details.update(openssl_code=code_n, openssl_message=text)
        if code_n == _EXPIRED:
            return TlsError(f"the TLS certificate of {host} has expired ({text}). The server must renew it; "
                            "if the certificate looks current, check the system clock.",
                            code="tls_expired", details=details)
        if code_n == _NOT_YET_VALID:
            return TlsError(f"the TLS certificate of {host} is not yet valid ({text}). Check the system clock.",
                            code="tls_not_yet_valid", details=details)
        if code_n in (_HOSTNAME, _IP, _EMAIL) or "hostname" in text.lower() or "doesn't match" in text:
            return TlsError(f"the TLS certificate of {host} is not issued for that name ({text}). "
                            "Check the SM-DP+ address (it must be the name in the certificate).",
                            code="tls_hostname_mismatch", details=details)
        if code_n in _UNTRUSTED or code_n is None:
            return TlsError(f"the TLS certificate of {host} does not chain to a trusted CI in {ca_source} "
                            f"({text}). {INSTALL_HINT}", code="tls_untrusted", details=details)
        return TlsError(f"the TLS certificate of {host} was rejected ({text}). {INSTALL_HINT}",
                        code="tls_untrusted", details=details)
    ssl_err = next((e for e in walk_exception(exc) if isinstance(e, ssl.SSLError)), None)
    text = str(ssl_err or exc)
    details["openssl_message"] = text
    if "WRONG_VERSION_NUMBER" in text.upper() or "wrong version number" in text:
        return TlsError(f"{host} does not speak TLS on this port ({text}). Check the address/port; plain HTTP "
                        "is only for test servers (--insecure-http).", code="tls_handshake_failed",
                        details=details)
    return TlsError(f"TLS handshake with {host} failed ({text}). The server may not support TLS 1.2+ "
                    "with our settings, or the connection was interrupted.", code="tls_handshake_failed",
                    details=details)
