"""agent/crypto.py: plain-format ECDSA, points, ECKA, X9.63 KDF, certificate checks."""
from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID

from agent import crypto
from agent.sim import pki as simpki

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _x963_reference(z: bytes, info: bytes, n: int) -> bytes:
    """ANSI X9.63 KDF written out with hashlib: SHA-256(Z || counter32 || SharedInfo), counter from 1."""
    out, counter = b"", 1
    while len(out) < n:
        out += hashlib.sha256(z + counter.to_bytes(4, "big") + info).digest()
        counter += 1
    return out[:n]


# --- ECDSA ------------------------------------------------------------------------

def test_sign_raw_is_64_bytes_and_verifies():
    key = crypto.generate_key()
    sig = crypto.sign_raw(key, b"hello")
    assert len(sig) == 64
    assert crypto.verify_raw(key.public_key(), b"hello", sig)
    # independent check: the plain form is r||s of a standard DER signature
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    key.public_key().verify(encode_dss_signature(r, s), b"hello", ec.ECDSA(hashes.SHA256()))


def test_verify_raw_rejects_wrong_data_key_and_malformed():
    key, other = crypto.generate_key(), crypto.generate_key()
    sig = crypto.sign_raw(key, b"data")
    assert not crypto.verify_raw(key, b"datA", sig)
    assert not crypto.verify_raw(other, b"data", sig)
    assert not crypto.verify_raw(key, b"data", sig[:-1])
    assert not crypto.verify_raw(key, b"data", sig + b"\x00")
    assert not crypto.verify_raw(key, b"data", bytes(64))
    assert not crypto.verify_raw(key, b"data", b"\xff" * 64)  # r, s >= n
    assert not crypto.verify_raw(key, b"data", "not bytes")
    flipped = bytearray(sig)
    flipped[10] ^= 1
    assert not crypto.verify_raw(key, b"data", bytes(flipped))


def test_verify_raw_accepts_certificate(tmp_path):
    p = simpki.make_pki(tmp_path)
    sig = crypto.sign_raw(p.dppb.key, b"x")
    assert crypto.verify_raw(p.dppb.cert, b"x", sig)
    assert not crypto.verify_raw(p.dpauth.cert, b"x", sig)


def test_raw_der_conversion_pads_small_integers():
    der = encode_dss_signature(1, 0x1234)
    raw = crypto.der_to_raw(der)
    assert raw == (1).to_bytes(32, "big") + (0x1234).to_bytes(32, "big")
    assert decode_dss_signature(crypto.raw_to_der(raw)) == (1, 0x1234)
    with pytest.raises(crypto.CryptoError):
        crypto.der_to_raw(b"\x30\x03\x02\x01")
    with pytest.raises(crypto.CryptoError):
        crypto.der_to_raw(encode_dss_signature(1 << 300, 1))
    with pytest.raises(crypto.CryptoError):
        crypto.raw_to_der(b"\x01" * 63)


# --- points and ECKA --------------------------------------------------------------------

def test_public_point_round_trip():
    key = crypto.generate_key()
    pt = crypto.public_point(key)
    assert len(pt) == 65 and pt[0] == 0x04
    assert crypto.public_point(crypto.point_to_public(pt)) == pt
    nums = key.public_key().public_numbers()
    assert pt[1:33] == nums.x.to_bytes(32, "big") and pt[33:] == nums.y.to_bytes(32, "big")


@pytest.mark.parametrize("bad", [
    b"",
    b"\x04" + bytes(64),                 # (0, 0) is not on the curve
    b"\x02" + bytes(32),                 # compressed form is not accepted here
    b"\x04" + bytes(63),                 # short
])
def test_point_to_public_rejects_invalid(bad):
    with pytest.raises(crypto.CryptoError) as ei:
        crypto.point_to_public(bad)
    assert ei.value.code == "bad_point"


def test_point_to_public_rejects_point_off_curve():
    pt = bytearray(crypto.public_point(crypto.generate_key()))
    pt[-1] ^= 1
    with pytest.raises(crypto.CryptoError, match="not a valid point"):
        crypto.point_to_public(bytes(pt))


def test_ecka_agrees_both_ways_and_matches_ecdh():
    a, b = crypto.generate_key(), crypto.generate_key()
    shs = crypto.ecka(a, crypto.public_point(b))
    assert len(shs) == 32
    assert shs == crypto.ecka(b, crypto.public_point(a))
    # ShS is the X coordinate of a·B: check with the group law done by cryptography
    assert shs == a.exchange(ec.ECDH(), b.public_key())


def test_brainpool_sign_and_ecka():
    try:
        a = crypto.generate_key(crypto.BRAINPOOLP256R1)
        b = crypto.generate_key(crypto.BRAINPOOLP256R1)
    except Exception:  # pragma: no cover - depends on the OpenSSL build
        pytest.skip("brainpoolP256r1 not available in this OpenSSL")
    sig = crypto.sign_raw(a, b"bp")
    assert len(sig) == 64 and crypto.verify_raw(a, b"bp", sig)
    assert crypto.ecka(a, crypto.public_point(b)) == crypto.ecka(b, crypto.public_point(a))
    with pytest.raises(crypto.CryptoError):
        crypto.point_to_public(crypto.public_point(b), crypto.SECP256R1)


# --- KDF ----------------------------------------------------------------------------

def test_x963_kdf_known_answer():
    z = bytes(range(32))
    info = b"\x88\x10\x03abc\x10" + bytes(16)
    for n in (16, 32, 48, 100):
        assert crypto.x963_kdf(z, info, n) == _x963_reference(z, info, n)


def test_derive_bsp_keys_shared_info_layout():
    shs = hashlib.sha256(b"shared secret").digest()
    host_id = b"mahlzeit"
    eid = bytes.fromhex("89049032123451234512345678901235")
    k = crypto.derive_bsp_keys(shs, host_id=host_id, eid=eid)
    info = bytes([0x88, 0x10, len(host_id)]) + host_id + bytes([0x10]) + eid
    ref = _x963_reference(shs, info, 48)
    assert (k.initial_mcv, k.s_enc, k.s_mac) == (ref[:16], ref[16:32], ref[32:])
    assert crypto.bsp_shared_info(host_id=host_id, eid=eid) == info
    with pytest.raises(crypto.CryptoError):
        crypto.derive_bsp_keys(shs, host_id=host_id, eid=eid[:8])


# --- certificates ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return simpki.make_pki(tmp_path_factory.mktemp("pki"), smdp_oid="2.999.77")


def test_cert_helpers(pki):
    der = crypto.cert_der(pki.dpauth.cert)
    assert crypto.load_cert(der) == pki.dpauth.cert
    assert crypto.load_cert(crypto.cert_pem(pki.dpauth.cert)) == pki.dpauth.cert
    assert crypto.load_cert(crypto.cert_pem(pki.dpauth.cert).decode()) == pki.dpauth.cert
    assert crypto.role_oids(pki.dpauth.cert) == ["2.23.146.1.2.1.4"]
    assert crypto.roles(pki.dppb.cert) == ["dp-pb"]
    assert crypto.smdp_oid(pki.dpauth.cert) == "2.999.77"
    assert crypto.smdp_oid(pki.ci.cert) == simpki.CI_OID
    assert crypto.aki(pki.dpauth.cert) == crypto.ski(pki.ci.cert)
    assert crypto.aki(pki.ci.cert) is None
    assert len(crypto.ski(pki.ci.cert)) == 20
    assert crypto.eid_of(pki.dpauth.cert) is None
    assert crypto.verify_issued_by(pki.dpauth.cert, pki.ci.cert)
    assert crypto.verify_issued_by(pki.ci.cert, pki.ci.cert)
    assert not crypto.verify_issued_by(pki.dpauth.cert, pki.eum.cert)
    assert not crypto.verify_issued_by(pki.ci.cert, pki.dpauth.cert)


def test_load_cert_and_key_errors(pki):
    with pytest.raises(crypto.CertError) as ei:
        crypto.load_cert(b"\x30\x03\x02\x01\x00")
    assert ei.value.reason == "malformed"
    with pytest.raises(crypto.CertError):
        crypto.load_cert(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(crypto.CryptoError):
        crypto.load_key(b"garbage")
    pem = crypto.key_pem(pki.ci.key)
    assert crypto.public_point(crypto.load_key(pem)) == crypto.public_point(pki.ci.key)


def test_verify_chain_ok(pki):
    e = simpki.issue_euicc(pki.eum, "89049032123451234512345678901235")
    path = crypto.verify_chain(e.cert, [pki.eum.cert], [pki.ci.cert], role="euicc")
    assert path == [e.cert, pki.eum.cert, pki.ci.cert]
    assert crypto.verify_chain(pki.dppb.cert, [], [pki.ci.cert], role="dp-pb") == [pki.dppb.cert, pki.ci.cert]
    assert crypto.verify_chain(pki.eum.cert, [], [pki.ci.cert], role="eum")
    assert crypto.verify_chain(pki.ci.cert, [], [pki.ci.cert], role="ci") == [pki.ci.cert]
    # role as a raw OID works too, and None skips the role check
    assert crypto.verify_chain(pki.dpauth.cert, [], [pki.ci.cert], role="2.23.146.1.2.1.4")
    assert crypto.verify_chain(pki.dpauth.cert, [], [pki.ci.cert], role=None)


def _reason(fn) -> str:
    with pytest.raises(crypto.CertError) as ei:
        fn()
    return ei.value.reason


def test_verify_chain_failures(pki):
    other_ci = simpki.new_ci(name="another CI")
    far_future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365 * 11)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    assert _reason(lambda: crypto.verify_chain(pki.dpauth.cert, [], [pki.ci.cert], role="dp-pb")) == "wrong_role"
    assert _reason(lambda: crypto.verify_chain(pki.dpauth.cert, [], [other_ci.cert], role="dp-auth")) \
        == "unknown_issuer"
    assert _reason(lambda: crypto.verify_chain(pki.dpauth.cert, [], [pki.ci.cert], role="dp-auth",
                                               now=far_future)) == "expired"
    assert _reason(lambda: crypto.verify_chain(pki.dpauth.cert, [], [pki.ci.cert], role="dp-auth",
                                               now=past)) == "not_yet_valid"
    e = simpki.issue_euicc(pki.eum, "89049032123451234512345678901235")
    # eUICC certificate never expires, but its EUM does
    assert _reason(lambda: crypto.verify_chain(e.cert, [pki.eum.cert], [pki.ci.cert], role="euicc",
                                               now=far_future)) == "expired"
    assert _reason(lambda: crypto.verify_chain(e.cert, [], [pki.ci.cert], role="euicc")) == "unknown_issuer"


def test_verify_chain_bad_signature(pki):
    # An impostor with the CI's name and SKI but another key.
    key = crypto.generate_key()
    now = dt.datetime.now(dt.timezone.utc)
    fake = (x509.CertificateBuilder().subject_name(pki.ci.cert.subject).issuer_name(pki.ci.cert.subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier(crypto.ski(pki.ci.cert)), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    assert _reason(lambda: crypto.verify_chain(pki.dppb.cert, [], [fake], role="dp-pb")) == "bad_signature"


def test_verify_chain_issuer_must_be_ca(pki):
    now = dt.datetime.now(dt.timezone.utc)
    key = crypto.generate_key()
    sub = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "under a leaf")]))
           .issuer_name(pki.dpauth.cert.subject).public_key(key.public_key()).serial_number(2)
           .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
           .add_extension(x509.AuthorityKeyIdentifier(crypto.ski(pki.dpauth.cert), None, None), critical=False)
           .sign(pki.dpauth.key, hashes.SHA256()))
    assert _reason(lambda: crypto.verify_chain(sub, [pki.dpauth.cert], [pki.ci.cert], role=None)) == "not_ca"


def test_check_validity_and_eid_permitted(tmp_path):
    p = simpki.make_pki(tmp_path, eid_prefix="8904903")
    crypto.check_validity(p.ci.cert)
    assert crypto.eid_permitted(p.eum.cert, "89049032123451234512345678901235") is True
    assert crypto.eid_permitted(p.eum.cert, "89001012012341234012345678901224") is False
    ci, eum = simpki.new_ci_and_eum()
    assert crypto.eid_permitted(eum.cert, "89049032123451234512345678901235") is None
