"""TLS trust policy (agent/tls.py): CA loading, eUICC CI preference, clock, role OID, session factory."""
from __future__ import annotations

import datetime as dt
import gc
import os
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import cert, tls
from agent.tls import TlsError, Trust, TrustError

NOW = dt.datetime.now(dt.timezone.utc)


def _ci(name, not_before=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subj).issuer_name(subj).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ci, roles, name="localhost"):
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(ci[0].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=30))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if roles:
        b = b.add_extension(x509.CertificatePolicies(
            [x509.PolicyInformation(x509.ObjectIdentifier(r), None) for r in roles]), critical=False)
    return b.sign(ci[1], hashes.SHA256()), key


def _pem(c):
    return c.public_bytes(serialization.Encoding.PEM)


def _der(c):
    return c.public_bytes(serialization.Encoding.DER)


def _ski(c):
    return c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def _c(c):
    """The cert.Certificate tls.py holds for a cryptography certificate."""
    return cert.parse(_der(c))


@pytest.fixture(scope="module")
def cas():
    return _ci("CI A"), _ci("CI B"), _ci("CI C")


# --- loading --------------------------------------------------------------------------------

def test_load_pem_bundle_der_single_der_concat_and_directory(tmp_path, cas):
    a, b, c = (x[0] for x in cas)
    (tmp_path / "bundle.pem").write_bytes(b"# comment\n" + _pem(a) + _pem(b))
    (tmp_path / "one.der").write_bytes(_der(c))
    (tmp_path / "two.der").write_bytes(_der(a) + _der(b))
    loaded = tls.load_ca_certs(tmp_path / "bundle.pem")
    assert all(isinstance(x, cert.Certificate) for x in loaded)
    assert [x.subject for x in loaded] == [a.subject.rfc4514_string(), b.subject.rfc4514_string()]
    assert [x.der for x in loaded] == [_der(a), _der(b)]
    assert tls.load_ca_certs(tmp_path / "one.der") == [_c(c)]
    assert tls.load_ca_certs(tmp_path / "two.der") == [_c(a), _c(b)]
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.pem").write_bytes(_pem(a))
    (d / "c.der").write_bytes(_der(c))
    (d / "README").write_text("ignored")
    assert tls.load_ca_certs(d) == [_c(a), _c(c)]


@pytest.mark.parametrize("content", [b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                     b"\x30\x03\x02\x01\x01"])
def test_bad_ca_file(tmp_path, content):
    p = tmp_path / "x.pem"
    p.write_bytes(content)
    with pytest.raises(TrustError) as ei:
        tls.load_ca_certs(p)
    assert ei.value.code == "bad_ca_file" and str(p) in ei.value.message and ei.value.exit_code == 2


def test_empty_directory_and_missing_file(tmp_path):
    with pytest.raises(TrustError) as ei:
        tls.load_ca_certs(tmp_path)
    assert ei.value.code == "bad_ca_file"
    with pytest.raises(TrustError) as ei:
        tls.load_trust(tmp_path / "missing.pem")
    assert ei.value.code == "bad_ca_file" and "ci-bundle.pem" in ei.value.message


def test_load_trust_precedence(tmp_path, monkeypatch, cas):
    (tmp_path / "a.pem").write_bytes(_pem(cas[0][0]))
    (tmp_path / "b.pem").write_bytes(_pem(cas[1][0]))
    (tmp_path / "c.pem").write_bytes(_pem(cas[2][0]))
    monkeypatch.setattr(tls, "DEFAULT_CA_PATHS", (str(tmp_path / "c.pem"),))
    assert tls.load_trust(tmp_path / "a.pem", config_ca=tmp_path / "b.pem").certs == (_c(cas[0][0]),)
    assert tls.load_trust(None, config_ca=tmp_path / "b.pem").certs == (_c(cas[1][0]),)
    assert tls.load_trust().certs == (_c(cas[2][0]),)
    monkeypatch.setattr(tls, "DEFAULT_CA_PATHS", (str(tmp_path / "none.pem"),))
    with pytest.raises(TrustError) as ei:
        tls.load_trust()
    assert ei.value.code == "no_trusted_ci"


def test_trust_holds_cert_objects_whatever_it_was_given(cas):
    """Trust keeps cert.Certificate objects (agent/cert.py: no `cryptography` on the agent's
    path); DER bytes and the simulator's cryptography certificates are converted."""
    a, b = cas[0][0], cas[1][0]
    t = Trust((a, _der(b), _c(a)), "x")
    assert t.certs == (_c(a), _c(b), _c(a)) and all(isinstance(c, cert.Certificate) for c in t.certs)
    assert t.pem() == _pem(a) + _pem(b) + _pem(a)
    with pytest.raises(TrustError) as ei:
        Trust((b"\x30\x00",), "x")
    assert ei.value.code == "bad_ca_file" and "certificate" in ei.value.message
    with pytest.raises(TrustError) as ei:
        Trust((), "x")
    assert ei.value.code == "no_trusted_ci"


# --- eUICC CI preference -------------------------------------------------------------------------

def test_for_euicc_filters_by_ski(cas):
    a, b, c = (_c(x[0]) for x in cas)
    t = Trust((a, b, c), "bundle")
    assert a.ski == _ski(cas[0][0])
    n = t.for_euicc([b.ski, b"\x01" * 20])
    assert n.certs == (b,) and n is not t and n.warnings == []
    assert t.for_euicc([a.ski, b.ski, c.ski]) is t
    assert t.for_euicc([]) is t
    f = t.for_euicc([b"\x02" * 20])
    assert f is t and f.certs == (a, b, c)
    assert any("0202" in w and "whole bundle" in w for w in t.warnings)
    assert set(t.skis()) == {_ski(x[0]) for x in cas}
    assert tls.filter_by_ski([a, b, c], [c.ski, a.ski]) == [a, c]
    assert tls.filter_by_ski([a, b], [b"\x00"]) == []


# --- clock -------------------------------------------------------------------------------------------

def test_clock_checks(cas):
    a = cas[0][0]
    t = Trust((a,), "x")
    t.check_clock(NOW)
    t.check_clock(NOW.replace(tzinfo=None))  # naive = UTC
    with pytest.raises(TrustError) as ei:
        t.check_clock(dt.datetime(1970, 1, 1, 0, 5, tzinfo=dt.timezone.utc))
    assert ei.value.code == "clock_unset" and "1970-01-01" in ei.value.message and "NTP" in ei.value.message
    with pytest.raises(TrustError) as ei:
        t.check_clock(NOW - dt.timedelta(days=3))  # after 2024 but before the CI's notBefore
    assert ei.value.code == "clock_unset" and "became valid" in ei.value.message
    assert ei.value.details["earliest_ci"] == a.not_valid_before_utc.isoformat()
    # with the injected clock
    t2 = Trust((a,), "x", clock=lambda: dt.datetime(2023, 12, 31, tzinfo=dt.timezone.utc))
    with pytest.raises(TrustError):
        t2.check_clock()


# --- role OID ---------------------------------------------------------------------------------------

def test_check_peer_roles(cas):
    ci = cas[0]
    t = Trust((ci[0],), "x")
    t.check_peer(_der(_leaf(ci, [tls.DP_TLS_ROLE_OID])[0]), "h")
    assert t.warnings == []
    with pytest.raises(TlsError) as ei:
        t.check_peer(_der(_leaf(ci, [tls.DS_TLS_ROLE_OID])[0]), "h")
    assert ei.value.code == "tls_wrong_role" and "ds-tls" in ei.value.message
    with pytest.raises(TlsError) as ei:
        t.check_peer(_der(_leaf(ci, ["2.23.146.1.2.1.4"])[0]), "h")  # a DPauth certificate used for TLS
    assert ei.value.code == "tls_wrong_role"
    norole = _der(_leaf(ci, ["1.2.3.4"])[0])   # some non-RSP policy only
    t.check_peer(norole, "h")
    t.check_peer(norole, "h")
    assert len(t.warnings) == 1 and "no GSMA RSP role" in t.warnings[0]
    strict = Trust((ci[0],), "x", strict_role=True)
    with pytest.raises(TlsError):
        strict.check_peer(norole, "h")
    ds = Trust((ci[0],), "x", expected_roles=(tls.DS_TLS_ROLE_OID,))  # an SM-DS client would ask for ds-tls
    ds.check_peer(_der(_leaf(ci, [tls.DS_TLS_ROLE_OID])[0]), "h")
    with pytest.raises(TlsError):
        t.check_peer(None, "h")
    with pytest.raises(TlsError):
        t.check_peer(b"\x30\x00", "h")


# --- OpenSSL material ------------------------------------------------------------------------------

def test_bundle_file_and_context(cas):
    a, b = cas[0][0], cas[1][0]
    t = Trust((a, b), "x")
    path = t.bundle_path()
    assert path == t.bundle_path()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert x509.load_pem_x509_certificates(open(path, "rb").read()) == [a, b]
    ctx = t.ssl_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 2  # only our CIs, never the system store
    del t, ctx
    gc.collect()
    assert not os.path.exists(path)


def test_session_sends_sni_and_verifies_only_against_our_cis(tmp_path, cas, monkeypatch):
    ci = cas[0]
    cert, key = _leaf(ci, [tls.DP_TLS_ROLE_OID])
    (tmp_path / "l.pem").write_bytes(_pem(cert))
    (tmp_path / "l.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "l.pem", tmp_path / "l.key")
    seen = {}

    def sni(sock, name, ctx):
        seen["sni"] = name
        seen["version"] = sock.version()
    sctx.sni_callback = sni
    import socket
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    port = lsock.getsockname()[1]

    def serve():
        # Serve until one request was answered: a stray connection (another process probing
        # a port it believes closed) must not use up the listener.
        lsock.settimeout(10)
        for _ in range(5):
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            try:
                with sctx.wrap_socket(conn, server_side=True) as s:
                    s.settimeout(5)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    if b"\r\n\r\n" in data:
                        s.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                        return
            except OSError:
                continue
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    # the environment's system bundle must not widen (or replace) our trust
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent.pem")
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent.pem")
    s = tls.make_session(Trust((ci[0],), "x"))
    r = s.request("POST", f"https://localhost:{port}/x", b"{}", connect_timeout=10, read_timeout=10)
    assert r.status == 204
    s.release(r)
    s.close()
    assert seen["sni"] == "localhost"
    th.join(5)
    lsock.close()


def test_map_ssl_error_generic():
    e = tls.map_ssl_error(ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version"), "h")
    assert e.code == "tls_handshake_failed" and "TLS 1.2" in e.message
    v = ssl.SSLCertVerificationError(1, "certificate verify failed")
    v.verify_code, v.verify_message = 20, "unable to get local issuer certificate"
    assert tls.map_ssl_error(v, "h").code == "tls_untrusted"
    v.verify_code, v.verify_message = 9, "certificate is not yet valid"
    e = tls.map_ssl_error(v, "h")
    assert e.code == "tls_not_yet_valid" and "clock" in e.message
