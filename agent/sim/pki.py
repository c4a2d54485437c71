"""Test PKI following the SGP.22 certificate profiles (NIST P-256).

    CI (self-signed, policy …1.0) ─┬─ EUM (CA, …1.2) ── eUICC (…1.1, subject serialNumber = EID)
                                   ├─ DPauth (…1.4, SAN registeredID = SM-DP+ OID)
                                   ├─ DPpb   (…1.5, SAN registeredID = SM-DP+ OID)
                                   └─ DP TLS (…1.3, serverAuth, SAN dNSName/iPAddress)

Every certificate carries SKI and (below the CI) AKI = issuer SKI; the CI's SKI
is the CI PKID used in euiccCiPKIdList… (docs/protocol.md §4.8).

Criticality: the GSMA SGP.26 test certificates mark certificatePolicies
critical on CI, DPauth and DPpb.  We do that for certificates that never
appear in a TLS chain (EUM, eUICC, DPauth, DPpb) and keep the policies
non-critical on the CI and the DP TLS certificate, so any TLS stack trusting
ci.pem accepts the chain without having to understand policy processing.

Files written by ``make_pki`` (PEM certificates, PKCS#8 PEM keys, mode 600):
ci.pem ci.key.pem eum.pem eum.key.pem dpauth.pem dpauth.key.pem dppb.pem
dppb.key.pem dptls.pem dptls.key.pem
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import crypto
from ..errors import InputError

DEFAULT_SMDP_OID = "2.999.10"
CI_OID = "2.999.1"
VALIDITY_YEARS = 10
# SGP.22 eUICC certificates never expire in practice (notAfter 9999-12-31 23:59:59Z).
EUICC_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)

FILES = {
    "ci": ("ci.pem", "ci.key.pem"),
    "eum": ("eum.pem", "eum.key.pem"),
    "dpauth": ("dpauth.pem", "dpauth.key.pem"),
    "dppb": ("dppb.pem", "dppb.key.pem"),
    "dptls": ("dptls.pem", "dptls.key.pem"),
}


@dataclass
class CertKey:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None = None

    @property
    def ski(self) -> bytes | None:
        return crypto.ski(self.cert)

    @property
    def der(self) -> bytes:
        return crypto.cert_der(self.cert)


@dataclass
class Pki:
    ci: CertKey
    eum: CertKey
    dpauth: CertKey
    dppb: CertKey
    dptls: CertKey
    smdp_oid: str
    directory: Path | None = None

    @property
    def ci_pkid(self) -> bytes:
        """The CI's SubjectKeyIdentifier (euiccCiPKIdList… entry)."""
        return crypto.ski(self.ci.cert)


def _name(*, cn: str, org: str = "esim-agent test", serial: str | None = None, country: str | None = None) -> x509.Name:
    attrs = []
    if country:
        attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _policies(role: str) -> x509.CertificatePolicies:
    # a role name from crypto.ROLE_OIDS, or a dotted policy OID (the test bed's eIM certificates)
    oid = crypto.ROLE_OIDS.get(role, role)
    return x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier(oid), None)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _build(*, subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: CertKey | None, role: str,
           ca: bool, path_len: int | None = None, not_after: dt.datetime | None = None,
           policies_critical: bool = True, san: list | None = None, server_auth: bool = False,
           name_constraints: x509.NameConstraints | None = None) -> x509.Certificate:
    now = _now()
    pub = key.public_key()
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(issuer.cert.subject if issuer else subject)
         .public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1))
         .not_valid_after(not_after or now + dt.timedelta(days=365 * VALIDITY_YEARS)))
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier(crypto.ski(issuer.cert), None, None), critical=False)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        b = b.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
    b = b.add_extension(_policies(role), critical=policies_critical)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if server_auth:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    if name_constraints is not None:
        b = b.add_extension(name_constraints, critical=True)
    signer = issuer.key if issuer else key
    if signer is None:
        raise InputError("the issuing certificate has no private key loaded", code="pki_no_key")
    return b.sign(signer, hashes.SHA256())


def new_ci(*, name: str = "esim-agent Test CI") -> CertKey:
    key = crypto.generate_key()
    cert = _build(subject=_name(cn=name), key=key, issuer=None, role="ci", ca=True,
                  policies_critical=False, san=[x509.RegisteredID(x509.ObjectIdentifier(CI_OID))])
    return CertKey(cert, key)


def new_eum(ci: CertKey, *, name: str = "esim-agent Test EUM", org: str = "esim-agent EUM",
            eid_prefix: str | None = None) -> CertKey:
    """EUM certificate (CA, pathLen 0).  ``eid_prefix`` adds nameConstraints limiting the
    EIDs it may certify (permitted directoryName with serialNumber = prefix)."""
    key = crypto.generate_key()
    nc = None
    if eid_prefix:
        nc = x509.NameConstraints(permitted_subtrees=[x509.DirectoryName(_name(cn=name, org=org, serial=eid_prefix))],
                                  excluded_subtrees=None)
    cert = _build(subject=_name(cn=name, org=org), key=key, issuer=ci, role="eum", ca=True, path_len=0,
                  name_constraints=nc)
    return CertKey(cert, key)


def new_ci_and_eum(*, ci_name: str = "esim-agent Test CI", eum_name: str = "esim-agent Test EUM",
                   eid_prefix: str | None = None) -> tuple[CertKey, CertKey]:
    """A fresh CI and EUM for a simulated card that has no PKI directory."""
    ci = new_ci(name=ci_name)
    return ci, new_eum(ci, name=eum_name, eid_prefix=eid_prefix)


new_identity = new_ci_and_eum


def issue_euicc(eum: CertKey, eid: str, *, ci_ski: bytes | None = None,
                key: ec.EllipticCurvePrivateKey | None = None) -> CertKey:
    """CERT.EUICC for ``eid`` (subject serialNumber), signed by the EUM.

    ``ci_ski``, when given, must be the EUM's AKI (the card's CI PKID)."""
    if not (isinstance(eid, str) and len(eid) == 32 and eid.isdigit()):
        raise InputError(f"EID {eid!r} must be 32 digits", code="bad_eid")
    if ci_ski is not None and crypto.aki(eum.cert) != ci_ski:
        raise InputError("the EUM certificate was not issued by the CI with the given PKID", code="pki_mismatch")
    key = key or crypto.generate_key()
    org_attrs = eum.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    org = str(org_attrs[0].value) if org_attrs else "esim-agent EUM"
    cert = _build(subject=_name(cn="esim-agent test eUICC", org=org, serial=eid), key=key, issuer=eum,
                  role="euicc", ca=False, not_after=EUICC_NOT_AFTER)
    return CertKey(cert, key)


def _dp_cert(ci: CertKey, role: str, cn: str, smdp_oid: str) -> CertKey:
    key = crypto.generate_key()
    san = [x509.RegisteredID(x509.ObjectIdentifier(smdp_oid))]
    cert = _build(subject=_name(cn=cn, org="esim-agent SM-DP+"), key=key, issuer=ci, role=role, ca=False, san=san)
    return CertKey(cert, key)


def _tls_cert(ci: CertKey, names, smdp_oid: str) -> CertKey:
    key = crypto.generate_key()
    san: list = []
    for n in names:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            san.append(x509.DNSName(n))
    if not any(isinstance(s, x509.IPAddress) and str(s.value) == "127.0.0.1" for s in san):
        san.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    san.append(x509.RegisteredID(x509.ObjectIdentifier(smdp_oid)))
    cn = next((n for n in names if not _is_ip(n)), "localhost")
    cert = _build(subject=_name(cn=cn, org="esim-agent SM-DP+"), key=key, issuer=ci, role="dp-tls", ca=False,
                  san=san, server_auth=True, policies_critical=False)
    return CertKey(cert, key)


def _is_ip(n: str) -> bool:
    try:
        ipaddress.ip_address(n)
        return True
    except ValueError:
        return False


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def save_certkey(ck: CertKey, cert_path, key_path=None) -> None:
    _write(Path(cert_path), crypto.cert_pem(ck.cert), 0o644)
    if key_path is not None and ck.key is not None:
        _write(Path(key_path), crypto.key_pem(ck.key), 0o600)


def make_pki(directory, *, tls_names=("localhost",), smdp_oid: str = DEFAULT_SMDP_OID,
             eid_prefix: str | None = None) -> Pki:
    """Create a CI, an EUM and the SM-DP+ certificates and write them to ``directory``."""
    d = Path(directory)
    _writable_dir(d)
    x509.ObjectIdentifier(smdp_oid)  # validates the dotted form early
    names = tuple(tls_names) or ("localhost",)
    ci, eum = new_ci_and_eum(eid_prefix=eid_prefix)
    pki = Pki(ci=ci, eum=eum,
              dpauth=_dp_cert(ci, "dp-auth", "esim-agent SM-DP+ auth", smdp_oid),
              dppb=_dp_cert(ci, "dp-pb", "esim-agent SM-DP+ pb", smdp_oid),
              dptls=_tls_cert(ci, names, smdp_oid),
              smdp_oid=smdp_oid, directory=d)
    for attr, (cf, kf) in FILES.items():
        try:
            save_certkey(getattr(pki, attr), d / cf, d / kf)
        except OSError as e:
            raise InputError(f"cannot write the test PKI to {d}: {e.strerror or e} ({e.filename or d})",
                             code="pki_unwritable") from None
    return pki


def _writable_dir(d: Path) -> None:
    """``d`` exists as a directory (created, with its parents, if missing), or a clear InputError."""
    if d.exists() and not d.is_dir():
        raise InputError(f"{d} exists and is not a directory; give `esim-agent sim pki` a directory to write the "
                         "PKI files into", code="pki_not_a_directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"cannot create the PKI directory {d}: a part of that path is a file, not a directory",
                         code="pki_not_a_directory") from None
    except OSError as e:
        raise InputError(f"cannot create the PKI directory {d}: {e.strerror or e}", code="pki_unwritable") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the test PKI to {d}: permission denied", code="pki_unwritable")


def load_pki(directory, *, require_keys: bool = True) -> Pki:
    """Load a directory written by ``make_pki``.  Keys are optional when
    ``require_keys`` is False (e.g. an agent that only needs ci.pem)."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"there is no test PKI at {d}: create one with `esim-agent sim pki {d}`",
                         code="pki_missing")
    missing = [f for cf, kf in FILES.values() for f in ((cf, kf) if require_keys else (cf,))
               if not (d / f).is_file()]
    if missing:
        raise InputError(f"PKI directory {d} lacks {', '.join(missing)}; create a test PKI there with "
                         f"`esim-agent sim pki {d}`", code="pki_missing")
    parts = {}
    for attr, (cf, kf) in FILES.items():
        cert = crypto.load_cert((d / cf).read_bytes())
        key = crypto.load_key((d / kf).read_bytes()) if (d / kf).is_file() else None
        if key is not None and crypto.public_point(key) != crypto.public_point(cert):
            raise InputError(f"{d / kf} does not match {d / cf}", code="pki_mismatch")
        parts[attr] = CertKey(cert, key)
    oid = crypto.smdp_oid(parts["dpauth"].cert) or DEFAULT_SMDP_OID
    return Pki(smdp_oid=oid, directory=d, **parts)


# --- the local eIM's certificates (SGP.32 test bed) -------------------------------------------------
#
# ``esim-agent sim eim --pki DIR`` keeps its own files under DIR/eim/, made on first use and
# remade when they no longer chain to DIR's CI (the PKI was rewritten):
#   eim.pem / eim.key.pem  the eIM's ESep signing certificate (P-256; its key signs eUICC packages)
#   tls.pem / tls.key.pem  its HTTPS server certificate (SAN 127.0.0.1 and localhost)
# SGP.32 gives the eIM no GSMA certificate policy, so both carry test-arc OIDs of ours.

EIM_DIR = "eim"
EIM_SIGN_OID = "2.999.20"
EIM_TLS_OID = "2.999.21"
EIM_FILES = {"sign": ("eim.pem", "eim.key.pem"), "tls": ("tls.pem", "tls.key.pem")}


@dataclass
class EimPki:
    ci: CertKey
    sign: CertKey        # eim.pem: the key that signs eUICC packages
    tls: CertKey         # tls.pem: the HTTPS server certificate
    directory: Path      # DIR/eim

    @property
    def ci_pkid(self) -> bytes:
        return crypto.ski(self.ci.cert)


def _eim_sign_cert(ci: CertKey) -> CertKey:
    key = crypto.generate_key()
    cert = _build(subject=_name(cn="esim-agent test eIM", org="esim-agent eIM"), key=key, issuer=ci,
                  role=EIM_SIGN_OID, ca=False, policies_critical=False)
    return CertKey(cert, key)


def _eim_tls_cert(ci: CertKey) -> CertKey:
    key = crypto.generate_key()
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = _build(subject=_name(cn="localhost", org="esim-agent eIM"), key=key, issuer=ci, role=EIM_TLS_OID,
                  ca=False, san=san, server_auth=True, policies_critical=False)
    return CertKey(cert, key)


def _load_eim_part(d: Path, cf: str, kf: str, ci: CertKey) -> CertKey | None:
    """The pair in ``d`` if both files are there, match, and the certificate was issued by ``ci``."""
    if not ((d / cf).is_file() and (d / kf).is_file()):
        return None
    try:
        cert = crypto.load_cert((d / cf).read_bytes())
        key = crypto.load_key((d / kf).read_bytes())
    except (OSError, ValueError, crypto.CryptoError):
        return None
    if crypto.public_point(key) != crypto.public_point(cert) or not crypto.verify_issued_by(cert, ci.cert):
        return None
    return CertKey(cert, key)


def ensure_eim_pki(directory) -> EimPki:
    """Load (making what is missing or stale) the local eIM's certificates under ``directory``/eim."""
    pki = load_pki(directory)
    d = Path(directory) / EIM_DIR
    _writable_dir(d)
    parts = {}
    for attr, (cf, kf) in EIM_FILES.items():
        ck = _load_eim_part(d, cf, kf, pki.ci)
        if ck is None:
            ck = _eim_sign_cert(pki.ci) if attr == "sign" else _eim_tls_cert(pki.ci)
            try:
                save_certkey(ck, d / cf, d / kf)
            except OSError as e:
                raise InputError(f"cannot write the eIM certificates to {d}: {e.strerror or e}",
                                 code="pki_unwritable") from None
        parts[attr] = ck
    return EimPki(ci=pki.ci, directory=d, **parts)
