"""agent/sim/pki.py: SGP.22-style test PKI, files on disk, and TLS trust through ci.pem."""
from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from agent import crypto
from agent.errors import InputError
from agent.sim import pki as simpki

EID = "89049032123451234512345678901235"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return d, simpki.make_pki(d)


def test_files_written_with_private_keys_protected(made):
    d, _ = made
    for cf, kf in simpki.FILES.values():
        assert (d / cf).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        key = (d / kf).read_bytes()
        assert key.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        assert stat.S_IMODE((d / kf).stat().st_mode) == 0o600
    assert not list(d.glob("*.tmp"))


def test_load_pki_round_trip(made):
    d, p = made
    q = simpki.load_pki(d)
    for attr in simpki.FILES:
        assert getattr(q, attr).cert == getattr(p, attr).cert
        assert crypto.public_point(getattr(q, attr).key) == crypto.public_point(getattr(p, attr).cert)
    assert q.smdp_oid == "2.999.10"
    assert q.ci_pkid == crypto.ski(p.ci.cert)


def test_load_pki_missing_files(tmp_path, made):
    with pytest.raises(InputError) as ei:
        simpki.load_pki(tmp_path)
    assert ei.value.code == "pki_missing" and "ci.pem" in ei.value.message
    d, _ = made
    partial = tmp_path / "certs-only"
    partial.mkdir()
    for cf, _kf in simpki.FILES.values():
        (partial / cf).write_bytes((d / cf).read_bytes())
    with pytest.raises(InputError, match="ci.key.pem"):
        simpki.load_pki(partial)
    q = simpki.load_pki(partial, require_keys=False)
    assert q.ci.key is None and q.dppb.cert == simpki.load_pki(d).dppb.cert


def test_mismatched_key_detected(tmp_path, made):
    d, _ = made
    for cf, kf in simpki.FILES.values():
        (tmp_path / cf).write_bytes((d / cf).read_bytes())
        (tmp_path / kf).write_bytes((d / kf).read_bytes())
    (tmp_path / "dppb.key.pem").write_bytes((d / "dpauth.key.pem").read_bytes())
    with pytest.raises(InputError) as ei:
        simpki.load_pki(tmp_path)
    assert ei.value.code == "pki_mismatch"


def _ext(cert, oid):
    return cert.extensions.get_extension_for_oid(oid)


def test_certificate_profiles(made):
    _, p = made
    ci, eum = p.ci.cert, p.eum.cert
    assert ci.issuer == ci.subject and crypto.verify_issued_by(ci, ci)
    assert _ext(ci, ExtensionOID.BASIC_CONSTRAINTS).value.ca
    assert _ext(eum, ExtensionOID.BASIC_CONSTRAINTS).value.ca
    assert _ext(eum, ExtensionOID.BASIC_CONSTRAINTS).value.path_length == 0
    assert _ext(ci, ExtensionOID.KEY_USAGE).value.key_cert_sign
    assert _ext(p.dpauth.cert, ExtensionOID.KEY_USAGE).value.digital_signature
    assert _ext(p.dpauth.cert, ExtensionOID.KEY_USAGE).critical
    expected = {"ci": "0", "eum": "2", "dptls": "3", "dpauth": "4", "dppb": "5"}
    for attr, last in expected.items():
        c = getattr(p, attr).cert
        assert crypto.role_oids(c) == ["2.23.146.1.2.1." + last]
        assert c.public_key().curve.name == "secp256r1"
        assert crypto.ski(c)
        if attr != "ci":
            assert crypto.aki(c) == crypto.ski(ci)
            assert crypto.verify_issued_by(c, ci)
    # policies are non-critical where a TLS stack sees them (CI, DP TLS)
    assert not _ext(ci, ExtensionOID.CERTIFICATE_POLICIES).critical
    assert not _ext(p.dptls.cert, ExtensionOID.CERTIFICATE_POLICIES).critical
    assert crypto.smdp_oid(p.dpauth.cert) == crypto.smdp_oid(p.dppb.cert) == "2.999.10"
    now = dt.datetime.now(dt.timezone.utc)
    for attr in simpki.FILES:
        c = getattr(p, attr).cert
        assert now - dt.timedelta(days=2) < c.not_valid_before_utc < now
        assert c.not_valid_after_utc > now + dt.timedelta(days=365 * 9)


def test_tls_certificate_names(made):
    _, p = made
    san = _ext(p.dptls.cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = _ext(p.dptls.cert, ExtensionOID.EXTENDED_KEY_USAGE).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_issue_euicc(made):
    _, p = made
    e = simpki.issue_euicc(p.eum, EID, ci_ski=p.ci_pkid)
    assert crypto.eid_of(e.cert) == EID
    assert crypto.role_oids(e.cert) == ["2.23.146.1.2.1.1"]
    assert crypto.aki(e.cert) == crypto.ski(p.eum.cert)
    assert e.cert.not_valid_after_utc.year == 9999
    assert crypto.verify_chain(e.cert, [p.eum.cert], [p.ci.cert], role="euicc")
    with pytest.raises(InputError):
        simpki.issue_euicc(p.eum, "1234")
    with pytest.raises(InputError):
        simpki.issue_euicc(p.eum, EID, ci_ski=b"\x00" * 20)


def test_new_identity_for_card_without_pki_dir():
    ci, eum = simpki.new_ci_and_eum()
    e = simpki.issue_euicc(eum, EID)
    assert crypto.verify_chain(e.cert, [eum.cert], [ci.cert], role="euicc")
    assert simpki.new_identity is simpki.new_ci_and_eum


def test_custom_names_and_oid(tmp_path):
    p = simpki.make_pki(tmp_path, tls_names=("smdp.test", "localhost", "::1"), smdp_oid="2.999.42")
    san = _ext(p.dptls.cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.DNSName) == ["smdp.test", "localhost"]
    assert sorted(str(a) for a in san.get_values_for_type(x509.IPAddress)) == ["127.0.0.1", "::1"]
    assert crypto.smdp_oid(p.dppb.cert) == "2.999.42"
    assert simpki.load_pki(tmp_path).smdp_oid == "2.999.42"


def _tls_handshake(d, server_hostname):
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(str(d / "dptls.pem"), str(d / "dptls.key.pem"))
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.settimeout(5)
    port = ls.getsockname()[1]
    errors = []

    def serve():
        try:
            conn, _ = ls.accept()
            conn.settimeout(5)
            with srv.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"ok")
        except Exception as e:  # the client may abort the handshake on purpose
            errors.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        cli = ssl.create_default_context(cafile=str(d / "ci.pem"))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            with cli.wrap_socket(s, server_hostname=server_hostname) as tls:
                return tls.recv(2)
    finally:
        t.join(5)
        ls.close()


def test_standard_tls_client_trusts_ci(made):
    d, _ = made
    assert _tls_handshake(d, "localhost") == b"ok"
    assert _tls_handshake(d, "127.0.0.1") == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(d, "example.com")


def test_tls_rejected_with_other_ci(made, tmp_path):
    d, _ = made
    other = simpki.make_pki(tmp_path / "other")
    # serve our DP TLS cert, trust the other CI
    (tmp_path / "mix").mkdir()
    for f in ("dptls.pem", "dptls.key.pem"):
        (tmp_path / "mix" / f).write_bytes((d / f).read_bytes())
    (tmp_path / "mix" / "ci.pem").write_bytes(crypto.cert_pem(other.ci.cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(tmp_path / "mix", "localhost")
