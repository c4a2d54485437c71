"""Read-only X.509 fields without `cryptography` (agent/cert.py), checked against `cryptography`.

`cryptography` is the independent oracle here: every field cert.py reads is compared with
cryptography's reading of the same certificate — the simulator's PKI (CI with SAN registeredID,
EUM with nameConstraints, eUICC with notAfter 9999 in GeneralizedTime, DPauth/DPpb/DP TLS with
role policies and registeredID), names that need RFC 4514 escaping, both time encodings at the
RFC 5280 §4.1.2.5 boundaries.  Then: the PEM/DER containers, each defect ending in CertError
with a message naming it, the OID decoder (X.690 §8.19), a hypothesis property (mutated,
truncated, random bytes give a certificate or a CertError, within a time bound; where both
cert.py and cryptography read a mutated certificate they agree), and the reason the module
exists: the download path of a fresh interpreter never imports `cryptography` (speed issue #8).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtensionOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import cert, crypto, errors, tlv
from agent.cert import CertError
from agent.sim import pki as simpki
from fuzzkit import bounded, examples, mutated

ROOT = Path(__file__).resolve().parent.parent
UTC = dt.timezone.utc
EID = "89049032123451234512345678901235"
#: cryptography has no short name for serialNumber (it prints 2.5.4.5); cert.py says serialNumber
NAME_OVERRIDES = {NameOID.SERIAL_NUMBER: "serialNumber"}


# --------------------------------------------------------------------------- the oracle

def _ext(c: x509.Certificate, oid):
    try:
        return c.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None


def oracle(c: x509.Certificate) -> dict:
    """The fields cert.py reads, as cryptography reads them."""
    ski = _ext(c, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    aki = _ext(c, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    pol = _ext(c, ExtensionOID.CERTIFICATE_POLICIES)
    san = _ext(c, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    return {
        "der": c.public_bytes(serialization.Encoding.DER),
        "serial": c.serial_number,
        "issuer": c.issuer.rfc4514_string(NAME_OVERRIDES),
        "subject": c.subject.rfc4514_string(NAME_OVERRIDES),
        "not_before": c.not_valid_before_utc,
        "not_after": c.not_valid_after_utc,
        "ski": ski.digest if ski is not None else None,
        "aki": aki.key_identifier if aki is not None else None,
        "policy_oids": tuple(p.policy_identifier.dotted_string for p in pol) if pol is not None else (),
        "registered_ids": tuple(r.dotted_string for r in san.get_values_for_type(x509.RegisteredID))
        if san is not None else (),
        "pem": c.public_bytes(serialization.Encoding.PEM),
    }


def fields(c: cert.Certificate) -> dict:
    return {"der": c.der, "serial": c.serial, "issuer": c.issuer, "subject": c.subject,
            "not_before": c.not_before, "not_after": c.not_after, "ski": c.ski, "aki": c.aki,
            "policy_oids": c.policy_oids, "registered_ids": c.registered_ids, "pem": c.to_pem()}


def assert_same(c: x509.Certificate) -> cert.Certificate:
    der = c.public_bytes(serialization.Encoding.DER)
    ours = cert.parse(der)
    assert fields(ours) == oracle(c)
    assert ours.not_before.tzinfo is not None and ours.not_before.utcoffset() == dt.timedelta(0)
    return ours


def _der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def _pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def build(*, subject: x509.Name | None = None, not_before=dt.datetime(2024, 1, 1, tzinfo=UTC),
          not_after=dt.datetime(2030, 1, 1, tzinfo=UTC), extensions=(), serial: int = 12345) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(serial).not_valid_before(not_before).not_valid_after(not_after))
    for e in extensions:
        b = b.add_extension(e, critical=False)
    return b.sign(key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    p = simpki.make_pki(d, tls_names=("localhost", "smdp.example.com", "10.0.0.1"), smdp_oid="2.999.77",
                        eid_prefix="89049032")
    euicc = simpki.issue_euicc(p.eum, EID, ci_ski=p.ci.ski)
    return p, euicc, d


# --------------------------------------------------------------------------- fields vs the oracle

def test_simulator_pki_fields_match_cryptography(pki):
    p, euicc, _ = pki
    got = {name: assert_same(getattr(p, name).cert) for name in ("ci", "eum", "dpauth", "dppb", "dptls")}
    got["euicc"] = assert_same(euicc.cert)
    # what the agent relies on, spelled out
    assert got["ci"].registered_ids == (simpki.CI_OID,) and got["ci"].policy_oids == (cert.ROLE_OIDS["ci"],)
    assert got["ci"].aki is None and got["ci"].ski == p.ci_pkid and len(got["ci"].ski) == 20
    assert got["dpauth"].registered_ids == ("2.999.77",) and got["dpauth"].policy_oids == (cert.ROLE_OIDS["dp-auth"],)
    assert got["dptls"].registered_ids == ("2.999.77",)      # after the DNS names and IP addresses of the SAN
    assert got["dptls"].policy_oids == (cert.ROLE_OIDS["dp-tls"],)
    assert got["dppb"].aki == got["ci"].ski
    assert got["euicc"].aki == got["eum"].ski and got["euicc"].policy_oids == (cert.ROLE_OIDS["euicc"],)
    assert f"serialNumber={EID}" in got["euicc"].subject
    assert got["euicc"].not_after == dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)    # GeneralizedTime
    assert b"\x18\x0f99991231235959Z" in got["euicc"].der
    assert b"\x17\x0d" in got["dpauth"].der                                                 # UTCTime


def test_crypto_helpers_agree_with_cert_py(pki):
    """crypto.py keeps reading these from cryptography objects for the simulator (no DER
    round trip per call); both readings must stay the same."""
    p, euicc, _ = pki
    for c in (p.ci.cert, p.eum.cert, p.dpauth.cert, p.dppb.cert, p.dptls.cert, euicc.cert):
        ours = cert.parse(_der(c))
        assert crypto.ski(c) == ours.ski and crypto.aki(c) == ours.aki
        assert crypto.role_oids(c) == list(ours.policy_oids)
        assert crypto.smdp_oid(c) == (ours.registered_ids[0] if ours.registered_ids else None)
    assert crypto.ROLE_OIDS is cert.ROLE_OIDS and crypto.ROLE_NAMES is cert.ROLE_NAMES
    assert crypto.CertError is cert.CertError and crypto.CryptoError is cert.CryptoError


@pytest.mark.parametrize("not_before, not_after", [
    (dt.datetime(1950, 1, 1, tzinfo=UTC), dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),   # UTCTime both ends
    (dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), dt.datetime(2050, 1, 1, tzinfo=UTC)),   # UTC / Generalized
    (dt.datetime(2050, 6, 1, tzinfo=UTC), dt.datetime(2100, 2, 28, 12, 0, 1, tzinfo=UTC)),   # Generalized both
    (dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), dt.datetime(2000, 1, 1, tzinfo=UTC)),
])
def test_both_time_encodings(not_before, not_after):
    c = build(not_before=not_before, not_after=not_after)
    ours = assert_same(c)
    assert (ours.not_before, ours.not_after) == (not_before, not_after)
    for t in (not_before, not_after):   # RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 1950
        wanted = (b"\x17\x0d" + t.strftime("%y%m%d%H%M%SZ").encode() if 1950 <= t.year < 2050
                  else b"\x18\x0f" + t.strftime("%Y%m%d%H%M%SZ").encode())
        assert wanted in ours.der


def test_names_rfc4514_like_cryptography():
    A = x509.NameAttribute
    name = x509.Name([
        x509.RelativeDistinguishedName([A(NameOID.COUNTRY_NAME, "DE")]),
        x509.RelativeDistinguishedName([A(NameOID.ORGANIZATION_NAME, 'a,b+c"d\\e<f>g;h'),
                                        A(NameOID.ORGANIZATIONAL_UNIT_NAME, "multi-valued")]),
        x509.RelativeDistinguishedName([A(NameOID.ORGANIZATIONAL_UNIT_NAME, "#lead")]),
        x509.RelativeDistinguishedName([A(NameOID.LOCALITY_NAME, " spaces ")]),
        x509.RelativeDistinguishedName([A(NameOID.STATE_OR_PROVINCE_NAME, "Ünïcödé €")]),
        x509.RelativeDistinguishedName([A(NameOID.DOMAIN_COMPONENT, "example")]),
        x509.RelativeDistinguishedName([A(NameOID.SERIAL_NUMBER, EID)]),
        x509.RelativeDistinguishedName([A(x509.ObjectIdentifier("1.2.3.4"), "other")]),
        x509.RelativeDistinguishedName([A(NameOID.COMMON_NAME, "bmp ü", _type=_ASN1Type.BMPString)]),
        x509.RelativeDistinguishedName([A(NameOID.COMMON_NAME, "univ ü", _type=_ASN1Type.UniversalString)]),
        x509.RelativeDistinguishedName([A(NameOID.COMMON_NAME, "ia5", _type=_ASN1Type.IA5String)]),
    ])
    ours = assert_same(build(subject=name))
    assert ours.subject.startswith("CN=ia5,CN=univ ü,CN=bmp ü,1.2.3.4=other,serialNumber=" + EID + ",DC=example,")
    assert "OU=\\#lead" in ours.subject and "L=\\ spaces\\ " in ours.subject and ours.subject.endswith(",C=DE")
    # an attribute value of a non-string type prints as "#" + its BER encoding (RFC 4514 §2.4)
    bits = x509.Name([A(NameOID.X500_UNIQUE_IDENTIFIER, b"\x01\x02", _type=_ASN1Type.BitString)])
    assert cert.parse(_der(build(subject=bits))).subject == "2.5.4.45=#03020102"


def test_empty_subject_and_negative_serial():
    key = ec.generate_private_key(ec.SECP256R1())
    c = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
         .public_key(key.public_key()).serial_number(1).not_valid_before(dt.datetime(2024, 1, 1))
         .not_valid_after(dt.datetime(2025, 1, 1)).sign(key, hashes.SHA256()))
    ours = assert_same(c)
    assert ours.subject == "" and ours.ski is None and ours.policy_oids == () and ours.registered_ids == ()
    neg = bytearray(_der(c))
    i = neg.index(b"\x02\x01\x01")        # the serial number INTEGER 1 -> -1
    neg[i + 2] = 0xFF
    assert cert.parse(bytes(neg)).serial == -1


def test_sgp26_style_policies_and_registered_ids():
    """Several policies with qualifiers, a SAN with every GeneralName kind before the registeredIDs,
    an AKI with issuer and serial besides the key identifier."""
    key = ec.generate_private_key(ec.SECP256R1())
    exts = [
        x509.CertificatePolicies([
            x509.PolicyInformation(x509.ObjectIdentifier("2.23.146.1.2.1.3"), ["https://example.com/cps"]),
            x509.PolicyInformation(x509.ObjectIdentifier("2.5.29.32.0"), None)]),
        x509.SubjectAlternativeName([
            x509.DNSName("a.example"), x509.RFC822Name("x@example.com"),
            x509.UniformResourceIdentifier("https://u.example"),
            x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")])),
            x509.RegisteredID(x509.ObjectIdentifier("2.999.10")),
            x509.OtherName(x509.ObjectIdentifier("1.2.3"), b"\x05\x00"),
            x509.RegisteredID(x509.ObjectIdentifier("1.3.6.1.4.1.31746.1.500.200.101")),
        ]),
        x509.AuthorityKeyIdentifier(b"\xaa" * 20, [x509.DNSName("i.example")], 77),
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
    ]
    ours = assert_same(build(extensions=exts))
    assert ours.policy_oids == ("2.23.146.1.2.1.3", "2.5.29.32.0")
    assert ours.registered_ids == ("2.999.10", "1.3.6.1.4.1.31746.1.500.200.101")
    assert ours.aki == b"\xaa" * 20
    no_key_id = assert_same(build(extensions=[x509.AuthorityKeyIdentifier(None, [x509.DNSName("i")], 1)]))
    assert no_key_id.aki is None


def test_equality_hash_and_frozen(pki):
    p, _, _ = pki
    a, b = cert.parse(p.ci.der), cert.parse(p.ci.der)
    assert a == b and hash(a) == hash(b) and len({a, b, cert.parse(p.eum.der)}) == 2
    with pytest.raises(Exception):
        a.ski = b"x"   # frozen


# --------------------------------------------------------------------------- containers

def test_pem_bundle_with_text_between_blocks_and_other_blocks(pki):
    p, euicc, _ = pki
    key_pem = crypto.key_pem(p.ci.key)
    text = (b"Bundle of test CIs\n# comment\n" + _pem(p.ci.cert) + b"\nsome text between\n" + key_pem
            + _pem(p.eum.cert).replace(b"\n", b"\r\n") + b"trailing words"
            + _pem(euicc.cert).replace(b"CERTIFICATE", b"X509 CERTIFICATE"))
    got = cert.load_pem(text)
    assert [c.der for c in got] == [p.ci.der, p.eum.der, euicc.der]
    assert cert.load(text) == got and cert.load(text.decode("latin-1")) == got     # bytes or text
    assert [x.der for x in cert.load(b"".join(c.to_pem() for c in got))] == [c.der for c in got]
    # what cryptography makes of the same bundle
    assert [_der(c) for c in x509.load_pem_x509_certificates(text)] == [c.der for c in got]
    assert got[0].to_pem() == _pem(p.ci.cert) == cert.to_pem(p.ci.der)


def test_der_single_and_concatenated(pki):
    p, _, _ = pki
    assert cert.load_der(p.ci.der) == [cert.parse(p.ci.der)]
    both = cert.load(p.ci.der + p.dptls.der + p.eum.der)
    assert [c.der for c in both] == [p.ci.der, p.dptls.der, p.eum.der]
    assert cert.load_der(b"") == []


def _replace_tbs(der: bytes, index: int, new: bytes) -> bytes:
    """``der`` with tbsCertificate element ``index`` replaced by the TLV ``new`` (lengths
    re-encoded, signature left as it was: cert.py does not verify)."""
    outer = tlv.parse_single(der)
    tbs, alg, sig = tlv.children(outer)
    items = [t.raw for t in tlv.children(tbs)]
    items[index] = new
    return tlv.encode(0x30, tlv.encode(0x30, b"".join(items)) + alg.raw + sig.raw)


def _ext_der(oid_content: bytes, value: bytes) -> bytes:
    return tlv.encode(0x30, tlv.encode(0x06, oid_content) + tlv.encode(0x04, value))


SKI_OID = bytes.fromhex("551d0e")        # 2.5.29.14
POL_OID = bytes.fromhex("551d20")        # 2.5.29.32
SAN_OID = bytes.fromhex("551d11")        # 2.5.29.17
VALIDITY, EXTENSIONS = 4, 7              # tbsCertificate element index (with the version)


def _with_extensions(der: bytes, *exts: bytes) -> bytes:
    return _replace_tbs(der, EXTENSIONS, tlv.encode(0xA3, tlv.encode(0x30, b"".join(exts))))


@pytest.fixture(scope="module")
def base_der():
    return _der(build(extensions=[x509.SubjectKeyIdentifier(b"\x01" * 20)]))


def _time_tlv(tag: int, text: str) -> bytes:
    return tlv.encode(tag, text.encode())


GOOD_AFTER = _time_tlv(0x17, "300101000000Z")


@pytest.mark.parametrize("validity, message", [
    (tlv.encode(0x04, b"240101000000Z") + GOOD_AFTER, "validity notBefore is not a UTCTime/GeneralizedTime"),
    (_time_tlv(0x17, "2401010000Z") + GOOD_AFTER, "validity notBefore is not a UTCTime/GeneralizedTime"),
    (_time_tlv(0x17, "240101000000+0100") + GOOD_AFTER, "notBefore is not a UTCTime/GeneralizedTime"),
    (_time_tlv(0x18, "20240101000000.5Z") + GOOD_AFTER, "notBefore is not a UTCTime/GeneralizedTime"),
    (_time_tlv(0x17, "24010100000 Z") + GOOD_AFTER, "notBefore is not a UTCTime/GeneralizedTime"),
    (_time_tlv(0x17, "240230000000Z") + GOOD_AFTER, "notBefore is not a valid date and time (240230000000Z)"),
    (_time_tlv(0x18, "00000101000000Z") + GOOD_AFTER, "not a valid date"),
    (_time_tlv(0x17, "240101000000Z") + _time_tlv(0x17, "240101246000Z"), "validity notAfter is not a valid"),
    (_time_tlv(0x17, "240101000000Z"), "validity is not (notBefore, notAfter)"),
])
def test_bad_validity(base_der, validity, message):
    bad = _replace_tbs(base_der, VALIDITY, tlv.encode(0x30, validity))
    with pytest.raises(CertError) as ei:
        cert.parse(bad)
    assert message in ei.value.message and ei.value.message.startswith("certificate: ")
    assert ei.value.code == "cert_malformed" and ei.value.reason == "malformed"


def test_validity_read_back_from_hand_made_times(base_der):
    bad = _replace_tbs(base_der, VALIDITY, tlv.encode(0x30, _time_tlv(0x17, "491231235959Z")
                                                      + _time_tlv(0x18, "99991231235959Z")))
    c = cert.parse(bad)
    assert c.not_before == dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert c.not_after == dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    c = cert.parse(_replace_tbs(base_der, VALIDITY, tlv.encode(0x30, _time_tlv(0x17, "500101000000Z") + GOOD_AFTER)))
    assert c.not_before.year == 1950


def _policies(*oid_tlvs: bytes) -> bytes:
    return _ext_der(POL_OID, tlv.encode(0x30, b"".join(tlv.encode(0x30, o) for o in oid_tlvs)))


@pytest.mark.parametrize("exts, message", [
    ([_ext_der(SKI_OID, tlv.encode(0x04, b"\x01")), _ext_der(SKI_OID, tlv.encode(0x04, b"\x02"))],
     "extension 2.5.29.14 appears twice (RFC 5280 §4.2)"),
    ([_policies(tlv.encode(0x06, b""))], "empty OBJECT IDENTIFIER"),
    ([_policies(tlv.encode(0x06, bytes.fromhex("2a8001")))],
     "OBJECT IDENTIFIER sub-identifier 2 is not minimally encoded"),
    ([_policies(tlv.encode(0x06, bytes.fromhex("2a86")))], "OBJECT IDENTIFIER ends inside a sub-identifier"),
    ([_policies(b"")], "PolicyInformation without a policyIdentifier"),
    ([_policies(tlv.encode(0x04, b"\x2a"))], "policyIdentifier: tag 04, expected 06"),
    ([_ext_der(SAN_OID, tlv.encode(0x30, tlv.encode(0x88, bytes.fromhex("8001"))))],
     "OBJECT IDENTIFIER sub-identifier 1 is not minimally encoded"),
    ([_ext_der(SKI_OID, tlv.encode(0x03, b"\x00\x01"))], "subjectKeyIdentifier: tag 03, expected 04"),
    ([_ext_der(SKI_OID, tlv.encode(0x04, b"\x01") + b"\x00")], "subjectKeyIdentifier: truncated TLV"),
    ([_ext_der(SKI_OID, tlv.encode(0x04, b"\x01") + b"\x04\x00")], "subjectKeyIdentifier: expected one element"),
    ([tlv.encode(0x30, tlv.encode(0x06, SKI_OID))], "extension is not (extnID, critical?, extnValue)"),
])
def test_bad_extensions(base_der, exts, message):
    with pytest.raises(CertError) as ei:
        cert.parse(_with_extensions(base_der, *exts))
    assert message in ei.value.message, ei.value.message


def test_critical_flag_and_unknown_extensions_are_read_past(base_der):
    crit = tlv.encode(0x30, tlv.encode(0x06, SKI_OID) + b"\x01\x01\xff" + tlv.encode(0x04, tlv.encode(0x04, b"\x07")))
    other = _ext_der(bytes.fromhex("2b0601040182371402"), b"\xde\xad")   # unparsed contents: not ours to check
    assert cert.parse(_with_extensions(base_der, other, crit)).ski == b"\x07"


@pytest.mark.parametrize("mangle, message", [
    (lambda d: d + b"\x00", "certificate: DER: truncated TLV: missing length"),
    (lambda d: d + b"\x05\x00", "certificate: DER: expected one element, found 2"),
    (lambda d: d[:-1], "truncated TLV"),
    (lambda d: b"\x30\x82\x00" + bytes([len(d) - 2]) + d[2:] if d[1] < 0x80 else b"\x30\x83\x00" + d[2:],
     "not in its shortest form (DER)"),
    (lambda d: b"\x31" + d[1:], "certificate: Certificate: tag 31, expected 30"),
    (lambda d: b"", "certificate: DER: expected one element, found 0"),
])
def test_bad_outer_structure(base_der, mangle, message):
    with pytest.raises(CertError) as ei:
        cert.parse(mangle(base_der))
    assert message in ei.value.message, ei.value.message


def test_tbs_structure_errors(base_der):
    tbs_items = tlv.children(tlv.children(tlv.parse_single(base_der))[0])
    cases = {
        0: (tlv.encode(0xA0, tlv.encode(0x02, b"\x05")), "version 05 is not v1, v2 or v3"),
        1: (tlv.encode(0x02, b""), "serialNumber of 0 octets"),
        3: (tlv.encode(0x31, b""), "issuer: tag 31, expected 30"),
        5: (tlv.encode(0x30, tlv.encode(0x31, b"")), "subject: empty relative distinguished name"),
    }
    for i, (new, message) in cases.items():
        with pytest.raises(CertError) as ei:
            cert.parse(_replace_tbs(base_der, i, new))
        assert message in ei.value.message, ei.value.message
    twice = tlv.encode(0x30, b"".join(t.raw for t in tbs_items) + tbs_items[-1].raw)
    outer = tlv.children(tlv.parse_single(base_der))
    with pytest.raises(CertError, match="unexpected or repeated tag A3"):
        cert.parse(tlv.encode(0x30, twice + outer[1].raw + outer[2].raw))
    bad_name = tlv.encode(0x30, tlv.encode(0x31, tlv.encode(0x30, tlv.encode(0x06, b"\x55\x04\x03")
                                                           + tlv.encode(0x0C, b"\xff"))))
    with pytest.raises(CertError, match="does not decode as utf-8"):
        cert.parse(_replace_tbs(base_der, 5, bad_name))


@pytest.mark.parametrize("text, message", [
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no -----BEGIN CERTIFICATE----- block"),
    (b"-----BEGIN CERTIFICATE-----\nA*AA\n-----END CERTIFICATE-----\n", "PEM block 1 is not base64"),
    (b"-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n", "PEM block 1 is not base64"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "certificate"),
    (b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END X509 CERTIFICATE-----\n", "no -----BEGIN CERTIFICATE----- block"),
])
def test_bad_pem(text, message):
    with pytest.raises(CertError) as ei:
        cert.load(text)
    assert message in ei.value.message, ei.value.message
    assert errors.exit_code_for(ei.value.code) == 1


# --------------------------------------------------------------------------- OIDs (X.690 §8.19)

def encode_oid(dotted: str) -> bytes:
    """Test-side X.690 §8.19 encoder."""
    arcs = [int(a) for a in dotted.split(".")]
    out = b""
    for v in [arcs[0] * 40 + arcs[1]] + arcs[2:]:
        chunk = [v & 0x7F]
        v >>= 7
        while v:
            chunk.append(0x80 | (v & 0x7F))
            v >>= 7
        out += bytes(reversed(chunk))
    return out


@pytest.mark.parametrize("hexed, dotted", [
    ("00", "0.0"), ("27", "0.39"), ("28", "1.0"), ("4f", "1.39"), ("50", "2.0"), ("8837", "2.999"),
    ("88370a", "2.999.10"), ("8100", "2.48"), ("2a8648ce3d040302", "1.2.840.10045.4.3.2"),
    ("0992268993f22c640119", "0.9.2342.19200300.100.1.25"), ("6781120102", "2.23.146.1.2"),
    ("69", "2.25"),
])
def test_decode_oid_vectors(hexed, dotted):
    assert cert.decode_oid(bytes.fromhex(hexed)) == dotted
    assert encode_oid(dotted) == bytes.fromhex(hexed)


def test_decode_oid_long_arcs():
    uuid = (1 << 128) - 1          # 2.25.<UUID> (X.667): 19 octets
    assert cert.decode_oid(encode_oid(f"2.25.{uuid}")) == f"2.25.{uuid}"
    assert cert.decode_oid(encode_oid(f"1.2.{(1 << 140) - 1}")) == f"1.2.{(1 << 140) - 1}"   # 20 octets
    with pytest.raises(CertError, match="longer than 20 octets"):
        cert.decode_oid(encode_oid(f"1.2.{1 << 140}"))                                       # 21
    with pytest.raises(CertError, match="longer than 20 octets"):
        cert.decode_oid(b"\x2a" + b"\xff" * 5000 + b"\x7f")   # would be a number too long to print


_ARCS = st.integers(0, 2).flatmap(lambda first: st.tuples(
    st.just(first), st.integers(0, 39 if first < 2 else 10 ** 6),
    st.lists(st.integers(0, 2 ** 64) | st.integers(0, 200), max_size=6)))


@given(_ARCS)
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_decode_oid_round_trip(arcs):
    dotted = ".".join(str(a) for a in (arcs[0], arcs[1], *arcs[2]))
    assert cert.decode_oid(encode_oid(dotted)) == dotted


@given(st.lists(_ARCS, min_size=1, max_size=3))
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
def test_policy_oids_like_cryptography(arcs_list):
    oids = [".".join(str(a) for a in (x[0], x[1], *x[2])) for x in arcs_list]
    if len(set(oids)) != len(oids):
        return
    c = build(extensions=[x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier(o), None)
                                                    for o in oids])])
    assert assert_same(c).policy_oids == tuple(oids)


# --------------------------------------------------------------------------- property: only CertError, bounded

FAST_EXAMPLES = 300


def _cryptography_reading(der: bytes):
    """cryptography's fields of ``der``, or None when it refuses any part we read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return oracle(x509.load_der_x509_certificate(der))
        except Exception:
            return None


@pytest.mark.fuzz
def test_fuzz_only_cert_errors(pki, request):
    p, euicc, _ = pki
    seeds = [p.ci.der, p.eum.der, p.dpauth.der, p.dptls.der, euicc.der]
    names = ("der", "serial", "not_before", "not_after", "ski", "aki", "policy_oids", "registered_ids")

    def check(data, as_pem):
        try:
            if as_pem:
                got = bounded(cert.load_pem, b"x\n" + cert.to_pem(data) + b"y\n")
            else:
                got = bounded(cert.load, data)
        except CertError as e:
            assert e.code == "cert_malformed" and isinstance(e.message, str) and e.message.startswith("certificate")
            json.dumps(e.to_json())
            return
        for c in got:
            assert isinstance(c, cert.Certificate)
            json.dumps({k: str(v) for k, v in fields(c).items()})      # printable
            theirs = _cryptography_reading(c.der)
            if theirs is not None:       # where both read it, they agree
                ours = fields(c)
                assert {k: ours[k] for k in names} == {k: theirs[k] for k in names}

    inputs = st.one_of(mutated(seeds, most=4), st.binary(max_size=300),
                       st.sampled_from(seeds).flatmap(lambda s: st.integers(0, len(s)).map(lambda n: s[:n])))
    test = given(inputs, st.booleans())(check)
    n = examples(request.config, FAST_EXAMPLES)
    settings(max_examples=n, deadline=None, derandomize=n == FAST_EXAMPLES, database=None,
             suppress_health_check=list(HealthCheck))(test)()


# --------------------------------------------------------------------------- the reason for cert.py

def test_download_path_never_imports_cryptography(pki):
    """A fresh interpreter importing what `esim-agent profile download` imports (the CLI, the
    operation from agent/ops' registry and its preload list) and running the certificate work
    of a download (CI bundle, TLS context, clock, eUICC CI narrowing, role check, SM-DP+ OID)
    has no `cryptography` in sys.modules (issue #8: ~0.1 s and ~8 MB per run)."""
    p, _, d = pki
    (d / "peer.der").write_bytes(p.dptls.der)
    (d / "dpauth.der").write_bytes(p.dpauth.der)
    code = textwrap.dedent(f"""
        import json, sys
        import agent.cli, agent.flows.download, agent.es9p, agent.tls, agent.bpp, agent.ops.download
        from agent import ops, preload
        ops.registry()["profile.download"]
        preload.Steps(ops.preload_modules("profile.download")).run_all()   # as the CLI does while the modem talks
        from agent import tls
        from agent.flows.download import Downloader, DownloadOptions
        d = {str(d)!r}
        t = tls.load_trust(d + "/ci.pem")
        t.ssl_context()
        t.check_clock()
        t = t.for_euicc(t.skis())
        t.check_peer(open(d + "/peer.der", "rb").read(), "localhost")
        Downloader(None, None, DownloadOptions(address="localhost"))._check_smdp_oid(
            open(d + "/dpauth.der", "rb").read(), "2.999.77")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
