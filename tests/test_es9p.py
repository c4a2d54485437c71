"""ES9+ client against a real local HTTPS server (loopback, certificates made here)."""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import es9p, tls
from agent.errors import InputError, ProtocolError, ServerError, TimeoutError_, TransportError, UsageError
from agent.es9p import Es9pClient, Es9pError
from agent.tlv import encode

NOW = dt.datetime.now(dt.timezone.utc)
DP_TLS = "2.23.146.1.2.1.3"
DS_TLS = "2.23.146.1.2.1.6"


# --- test PKI -------------------------------------------------------------------------------

def make_ci(name: str, not_before=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "esim-agent tests")])
    nb = not_before or NOW - dt.timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(subj).issuer_name(subj).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(nb)
            .not_valid_after(NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.CertificatePolicies([x509.PolicyInformation(
                x509.ObjectIdentifier("2.23.146.1.2.1.0"), None)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(ci, names=("localhost",), roles=(DP_TLS,), not_before=None, not_after=None):
    ci_cert, ci_key = ci
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
         .issuer_name(ci_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
         .not_valid_after(not_after or NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ci_key.public_key()), critical=False))
    if roles:
        b = b.add_extension(x509.CertificatePolicies(
            [x509.PolicyInformation(x509.ObjectIdentifier(r), None) for r in roles]), critical=False)
    return b.sign(ci_key, hashes.SHA256()), key


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def ski(cert) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ci = make_ci("Test CI A")
    other = make_ci("Test CI B")
    out = {"dir": d, "ci": ci, "other": other}
    leaves = {
        "good": make_leaf(ci),
        "untrusted": make_leaf(other),
        "wrongname": make_leaf(ci, names=("smdp.example.org",)),
        "expired": make_leaf(ci, not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1)),
        "dstls": make_leaf(ci, roles=(DS_TLS,)),
        "norole": make_leaf(ci, roles=()),
    }
    for name, (cert, key) in leaves.items():
        (d / f"{name}.pem").write_bytes(pem(cert))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (d / "ci.pem").write_bytes(pem(ci[0]))
    (d / "ci.der").write_bytes(ci[0].public_bytes(serialization.Encoding.DER))
    (d / "both.pem").write_bytes(pem(ci[0]) + pem(other[0]))
    out["leaves"] = leaves
    return out


# --- a tiny SM-DP+ ----------------------------------------------------------------------------

def ok(**fields):
    return {"header": {"functionExecutionStatus": {"status": "Executed-Success"}}, **fields}


def failed(subject, reason, message=None, status="Failed"):
    scd = {"subjectCode": subject, "reasonCode": reason}
    if message:
        scd["message"] = message
    return {"header": {"functionExecutionStatus": {"status": status, "statusCodeData": scd}}}


class Drip:
    """A response body sent a few bytes at a time (a server holding the device)."""

    def __init__(self, data: bytes, chunk: int = 4, pause: float = 0.05):
        self.data, self.chunk, self.pause = data, chunk, pause


class Smdp:
    """Records every request; ``routes[function](body) -> (status, body)`` where body is dict/bytes/None."""

    def __init__(self, leaf: str | None, pki=None, port: int = 0):
        self.routes = {}
        self.requests = []
        self.connections = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                outer.connections += 1
                super().setup()

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                fn = self.path.rsplit("/", 1)[-1]
                body = json.loads(raw) if raw else None
                outer.requests.append((self.path, dict(self.headers), body))
                route = outer.routes.get(fn)
                status, resp = route(body) if route else (404, b"no such function")
                if isinstance(resp, Drip):
                    try:
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(resp.data)))
                        self.end_headers()
                        for i in range(0, len(resp.data), resp.chunk):
                            self.wfile.write(resp.data[i:i + resp.chunk])
                            self.wfile.flush()
                            time.sleep(resp.pause)
                    except OSError:
                        pass
                    return
                if isinstance(resp, (dict, list)):
                    data, ctype = json.dumps(resp).encode(), "application/json;charset=UTF-8"
                else:
                    data, ctype = resp or b"", "text/html"
                try:
                    self.send_response(status)
                    if status != 204:
                        self.send_header("Content-Type", ctype)
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if status != 204:
                        self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout tests)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        if leaf:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(pki["dir"] / f"{leaf}.pem", pki["dir"] / f"{leaf}.key")
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.address = f"localhost:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(pki):
    servers = []

    def start(leaf="good", **kw):
        s = Smdp(leaf, pki, **kw)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


def client(srv, pki, ca="ci.pem", **kw):
    kw.setdefault("timeout", (2, 5))
    kw.setdefault("sleep", lambda s: None)
    return Es9pClient(srv.address, ca=pki["dir"] / ca if ca else None, **kw)


# --- ES9+ blobs (shape-correct TLVs) ---------------------------------------------------------

TXID = "A1B2C3D4E5F60718293A4B5C6D7E8F90"
CHALLENGE = bytes(range(16))


def info1(*skis):
    return encode(0xBF20, encode(0x82, b"\x02\x02\x00") + encode(0xA9, b"".join(encode(0x04, s) for s in skis))
                  + encode(0xAA, b"".join(encode(0x04, s) for s in skis)))


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


SERVER_SIGNED1 = encode(0x30, encode(0x80, bytes.fromhex(TXID)) + encode(0x81, CHALLENGE)
                        + encode(0x83, b"localhost") + encode(0x84, os.urandom(16)))
SIG = encode(0x5F37, os.urandom(64))
PROFILE_METADATA = encode(0xBF25, encode(0x5A, bytes.fromhex("98440000000000000021")) + encode(0x91, b"Op")
                          + encode(0x92, b"Test profile"))
SMDP_SIGNED2 = encode(0x30, encode(0x80, bytes.fromhex(TXID)) + encode(0x01, b"\x00"))
BPP = encode(0xBF36, encode(0xBF23, encode(0x82, b"\x01") + encode(0x80, bytes.fromhex(TXID)))
             + encode(0xA0, encode(0x87, os.urandom(200)))
             + encode(0xA3, b"".join(encode(0x86, os.urandom(1000)) for _ in range(120))))
AUTH_SERVER_RESP = encode(0xBF38, encode(0xA0, encode(0x30, encode(0x80, bytes.fromhex(TXID))) + SIG))
PREP_DL_RESP = encode(0xBF21, encode(0xA0, encode(0x30, encode(0x80, bytes.fromhex(TXID))) + SIG))
PIR = encode(0xBF37, encode(0xBF27, encode(0x80, bytes.fromhex(TXID))) + SIG)
CANCEL_RESP = encode(0xBF41, encode(0xA0, encode(0x30, encode(0x80, bytes.fromhex(TXID))) + SIG))


def install_happy_routes(srv, pki):
    cert_der = pki["leaves"]["good"][0].public_bytes(serialization.Encoding.DER)
    ci_ski = ski(pki["ci"][0])
    srv.routes.update({
        "initiateAuthentication": lambda b: (200, ok(
            transactionId=TXID, serverSigned1=b64(SERVER_SIGNED1), serverSignature1=b64(SIG),
            euiccCiPKIdToBeUsed=b64(encode(0x04, ci_ski)), serverCertificate=b64(cert_der))),
        "authenticateClient": lambda b: (200, ok(
            transactionId=b["transactionId"], profileMetadata=b64(PROFILE_METADATA), smdpSigned2=b64(SMDP_SIGNED2),
            smdpSignature2=b64(SIG), smdpCertificate=b64(cert_der))),
        "getBoundProfilePackage": lambda b: (200, ok(transactionId=b["transactionId"],
                                                     boundProfilePackage=b64(BPP))),
        "handleNotification": lambda b: (204, None),
        "cancelSession": lambda b: (200, ok()),
    })
    return cert_der


# --- success paths ---------------------------------------------------------------------------

def test_full_session_success_one_tls_connection(server, pki):
    srv = server()
    cert_der = install_happy_routes(srv, pki)
    with client(srv, pki) as c:
        ia = c.initiate_authentication(CHALLENGE, info1(ski(pki["ci"][0])), "localhost")
        assert ia.transaction_id == TXID
        assert ia.server_signed1 == SERVER_SIGNED1 and ia.server_signature1 == SIG
        assert ia.euicc_ci_pkid_to_be_used == encode(0x04, ski(pki["ci"][0]))
        assert ia.server_certificate == cert_der
        ac = c.authenticate_client(ia.transaction_id, AUTH_SERVER_RESP)
        assert (ac.profile_metadata, ac.smdp_signed2, ac.smdp_signature2, ac.smdp_certificate) == \
               (PROFILE_METADATA, SMDP_SIGNED2, SIG, cert_der)
        assert c.get_bound_profile_package(TXID, PREP_DL_RESP) == BPP
        c.handle_notification(PIR)
        c.cancel_session(TXID, CANCEL_RESP)
        assert c.all_warnings == []
    paths = [r[0] for r in srv.requests]
    assert paths == [f"/gsma/rsp2/es9plus/{f}" for f in ("initiateAuthentication", "authenticateClient",
                                                          "getBoundProfilePackage", "handleNotification",
                                                          "cancelSession")]
    assert srv.connections == 1  # keep-alive: one TLS handshake for the whole session
    _, headers, body = srv.requests[0]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Admin-Protocol"] == "gsma/rsp/v2.2.0"
    assert headers["User-Agent"].startswith("gsma-rsp-lpad esim-agent/")
    assert body == {"euiccChallenge": b64(CHALLENGE), "euiccInfo1": b64(info1(ski(pki["ci"][0]))),
                    "smdpAddress": "localhost"}
    assert srv.requests[1][2] == {"transactionId": TXID, "authenticateServerResponse": b64(AUTH_SERVER_RESP)}
    assert srv.requests[2][2] == {"transactionId": TXID, "prepareDownloadResponse": b64(PREP_DL_RESP)}
    assert srv.requests[3][2] == {"pendingNotification": b64(PIR)}
    assert srv.requests[4][2] == {"transactionId": TXID, "cancelSessionResponse": b64(CANCEL_RESP)}


def test_ca_as_der_file_and_address_forms(server, pki):
    srv = server()
    install_happy_routes(srv, pki)
    c = client(srv, pki, ca="ci.der")
    c.handle_notification(PIR)
    c2 = Es9pClient(f"https://{srv.address}/", ca=pki["dir"] / "ci.pem")
    c2.handle_notification(PIR)
    with pytest.raises(UsageError):
        Es9pClient(f"http://{srv.address}", ca=pki["dir"] / "ci.pem")
    with pytest.raises(UsageError):
        Es9pClient("smdp.example.com/path", ca=pki["dir"] / "ci.pem")


def test_handle_notification_200_and_other_notification_form(server, pki):
    srv = server()
    srv.routes["handleNotification"] = lambda b: (200, ok())
    c = client(srv, pki)
    c.handle_notification(encode(0x30, encode(0xBF2F, encode(0x80, b"\x05")) + SIG))
    srv.routes["handleNotification"] = lambda b: (200, b"")
    c.handle_notification(PIR)
    srv.routes["handleNotification"] = lambda b: (200, failed("8.10.1", "3.9"))
    with pytest.raises(Es9pError):
        c.handle_notification(PIR)


def test_executed_with_warning_is_success(server, pki):
    srv = server()
    install_happy_routes(srv, pki)
    srv.routes["cancelSession"] = lambda b: (200, {"header": {"functionExecutionStatus": {
        "status": "Executed-WithWarning", "statusCodeData": {"subjectCode": "8.1", "reasonCode": "1.1"}}}})
    c = client(srv, pki)
    c.cancel_session(TXID, CANCEL_RESP)
    assert any("warning subject 8.1" in w for w in c.all_warnings)


# --- status codes ----------------------------------------------------------------------------

@pytest.mark.parametrize("subject,reason,code", [
    ("8.1.1", "3.8", "eid_mismatch"),
    ("8.2.6", "3.8", "matching_id_refused"),
    ("8.2.7", "2.2", "confirmation_code_required"),
    ("8.2.7", "3.8", "confirmation_code_wrong"),
    ("8.2.7", "6.4", "confirmation_code_retries_exceeded"),
    ("8.8.5", "4.1", "order_expired"),
    ("8.8.5", "6.4", "download_retries_exceeded"),
    ("8.2.5", "4.3", "no_eligible_profile"),
    ("8.10.1", "3.9", "unknown_transaction"),
    ("8.8.1", "3.8", "invalid_smdp_address"),
    ("8.11.1", "3.9", "unknown_ci_public_key"),
    ("8.8.2", "3.1", "unsupported_ci_pkid"),
    ("8.8.3", "3.1", "svn_not_supported"),
    ("8.8.4", "3.7", "no_dpauth_certificate"),
    ("8.1", "6.1", "euicc_signature_invalid"),
    ("8.1.2", "6.1", "eum_certificate_invalid"),
    ("8.1.3", "6.3", "euicc_certificate_expired"),
    ("8.1", "4.8", "insufficient_memory"),
])
def test_failed_status_mapped(server, pki, subject, reason, code):
    srv = server()
    srv.routes["authenticateClient"] = lambda b: (200, failed(subject, reason, "server says no"))
    with pytest.raises(Es9pError) as ei:
        client(srv, pki).authenticate_client(TXID, AUTH_SERVER_RESP)
    e = ei.value
    # exit 1 (refused), except "confirmation code required": a usage error whatever says it
    assert e.code == code and e.exit_code == (2 if code == "confirmation_code_required" else 1)
    assert isinstance(e, ServerError)
    assert e.details["subject_code"] == subject and e.details["reason_code"] == reason
    assert e.details["server_message"] == "server says no" and e.details["function"] == "authenticateClient"
    assert f"subject {subject} reason {reason}" in e.message and "server says no" in e.message
    assert (e.subject_code, e.reason_code) == (subject, reason)


def test_eid_mismatch_message_is_actionable(server, pki):
    srv = server()
    srv.routes["authenticateClient"] = lambda b: (200, failed("8.1.1", "3.8"))
    with pytest.raises(Es9pError) as ei:
        client(srv, pki).authenticate_client(TXID, AUTH_SERVER_RESP)
    assert "reserved for another EID" in ei.value.message and "check the EID the backend has" in ei.value.message


def test_unknown_code_and_expired(server, pki):
    srv = server()
    srv.routes["getBoundProfilePackage"] = lambda b: (200, failed("9.9", "9.9", "odd"))
    with pytest.raises(Es9pError) as ei:
        client(srv, pki).get_bound_profile_package(TXID, PREP_DL_RESP)
    assert ei.value.code == "smdp_refused" and ei.value.details["subject_code"] == "9.9"
    srv.routes["getBoundProfilePackage"] = lambda b: (200, failed("8.8.5", "9.9", status="Expired"))
    with pytest.raises(Es9pError) as ei:
        client(srv, pki).get_bound_profile_package(TXID, PREP_DL_RESP)
    assert ei.value.code == "smdp_expired" and ei.value.details["status"] == "Expired"


# --- malformed answers ---------------------------------------------------------------------------

def _ia_with(**over):
    fields = dict(transactionId=TXID, serverSigned1=b64(SERVER_SIGNED1), serverSignature1=b64(SIG),
                  euiccCiPKIdToBeUsed=b64(encode(0x04, b"\x01" * 20)), serverCertificate=b64(encode(0x30, b"\x05\x00")))
    fields.update(over)
    return {k: v for k, v in fields.items() if v is not None}


@pytest.mark.parametrize("over,code,needle", [
    ({"serverSignature1": "not base64!!"}, "malformed_base64", "field serverSignature1"),
    ({"serverSignature1": b64(SIG)[:-1]}, "malformed_base64", "field serverSignature1"),
    ({"serverSigned1": b64(SERVER_SIGNED1[:-3])}, "malformed_der", "field serverSigned1"),
    ({"serverSignature1": b64(SIG)[:-4]}, "malformed_der", "only 63 present"),  # base64 fine, DER cut
    ({"serverSigned1": b64(SERVER_SIGNED1 + b"\x00")}, "malformed_der", "field serverSigned1"),
    ({"serverSigned1": b64(encode(0x30, encode(0x80, b"\x01\x02") + b"\xA1\x05\x80"))}, "malformed_der",
     "field serverSigned1"),  # outer fine, inner TLV truncated
    ({"serverSignature1": b64(encode(0x5F38, b"\x00" * 64))}, "unexpected_tag", "expected 5F37"),
    ({"serverCertificate": b64(encode(0x04, b"x"))}, "unexpected_tag", "field serverCertificate"),
    ({"serverCertificate": None}, "missing_field", "lacks field serverCertificate"),
    ({"transactionId": "XYZ"}, "bad_transaction_id", "transactionId"),
    ({"transactionId": "A1B2"}, "transaction_id_mismatch", "serverSigned1"),
])
def test_malformed_fields(server, pki, over, code, needle):
    srv = server()
    srv.routes["initiateAuthentication"] = lambda b: (200, ok(**_ia_with(**over)))
    with pytest.raises(ProtocolError) as ei:
        client(srv, pki).initiate_authentication(CHALLENGE, info1(ski(pki["ci"][0])), "localhost")
    assert ei.value.code == code, ei.value.message
    assert needle in ei.value.message
    if code.startswith("malformed_") and code != "missing_field":
        assert "SM-DP+ answer to initiateAuthentication: field" in ei.value.message


def test_base64_with_line_breaks_is_accepted(server, pki):
    srv = server()
    wrapped = "\n".join(b64(BPP)[i:i + 76] for i in range(0, len(b64(BPP)), 76))
    srv.routes["getBoundProfilePackage"] = lambda b: (200, ok(transactionId=TXID, boundProfilePackage=wrapped))
    assert client(srv, pki).get_bound_profile_package(TXID, PREP_DL_RESP) == BPP


def test_malformed_json_and_bad_envelope(server, pki):
    srv = server()
    c = client(srv, pki)
    srv.routes["authenticateClient"] = lambda b: (200, b"{not json")
    with pytest.raises(ProtocolError) as ei:
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    assert ei.value.code == "malformed_json" and "SM-DP+ sent malformed JSON" in ei.value.message
    assert ei.value.exit_code == 3
    srv.routes["authenticateClient"] = lambda b: (200, {"transactionId": TXID})
    with pytest.raises(ProtocolError) as ei:
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    assert "functionExecutionStatus" in ei.value.message
    srv.routes["authenticateClient"] = lambda b: (200, [1, 2])
    with pytest.raises(ProtocolError):
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    srv.routes["authenticateClient"] = lambda b: (200, {"header": "Executed-Success"})
    with pytest.raises(ProtocolError):
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    srv.routes["authenticateClient"] = lambda b: (200, ok(transactionId=TXID, profileMetadata=b64(PROFILE_METADATA)))
    with pytest.raises(ProtocolError) as ei:
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    assert ei.value.code == "missing_field" and "smdpSigned2" in ei.value.message
    srv.routes["authenticateClient"] = lambda b: (500, {"header": ["odd"]})
    with pytest.raises(ServerError) as ei:
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    assert ei.value.code == "http_status"


def test_transaction_id_echo_checked(server, pki):
    srv = server()
    install_happy_routes(srv, pki)
    srv.routes["getBoundProfilePackage"] = lambda b: (200, ok(transactionId="00112233",
                                                              boundProfilePackage=b64(BPP)))
    with pytest.raises(ProtocolError) as ei:
        client(srv, pki).get_bound_profile_package(TXID, PREP_DL_RESP)
    assert ei.value.code == "transaction_id_mismatch"
    # lower-case echo of the same id is the same transaction
    srv.routes["getBoundProfilePackage"] = lambda b: (200, ok(transactionId=TXID.lower(),
                                                              boundProfilePackage=b64(BPP)))
    assert client(srv, pki).get_bound_profile_package(TXID, PREP_DL_RESP) == BPP


def test_non_2xx(server, pki):
    srv = server()
    c = client(srv, pki)
    srv.routes["authenticateClient"] = lambda b: (502, b"<html><body>Bad Gateway from proxy</body></html>")
    with pytest.raises(ServerError) as ei:
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    assert ei.value.code == "http_status" and ei.value.details["http_status"] == 502
    assert "HTTP 502" in ei.value.message and "Bad Gateway from proxy" in ei.value.message
    with pytest.raises(ServerError) as ei:
        c.get_bound_profile_package(TXID, PREP_DL_RESP)  # no route -> 404
    assert ei.value.details["http_status"] == 404 and "address" in ei.value.message
    srv.routes["authenticateClient"] = lambda b: (400, failed("8.2.6", "3.8"))
    with pytest.raises(Es9pError) as ei:
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    assert ei.value.code == "matching_id_refused" and ei.value.details["http_status"] == 400
    assert len([r for r in srv.requests if r[0].endswith("authenticateClient")]) == 2  # never retried


def test_input_blobs_validated_before_sending(server, pki):
    srv = server()
    c = client(srv, pki)
    with pytest.raises(InputError):
        c.authenticate_client(TXID, PREP_DL_RESP)
    with pytest.raises(InputError):
        c.handle_notification(b"\xBF\x37\x05\x00")
    with pytest.raises(InputError):
        c.initiate_authentication(b"\x00" * 8, info1(), "localhost")
    with pytest.raises(ProtocolError):
        c.authenticate_client("not-hex", AUTH_SERVER_RESP)
    assert srv.requests == []


# --- TLS -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("leaf,code", [
    ("untrusted", "tls_untrusted"),
    ("wrongname", "tls_hostname_mismatch"),
    ("expired", "tls_expired"),
    ("dstls", "tls_wrong_role"),
])
def test_tls_refusals(server, pki, leaf, code):
    srv = server(leaf)
    install_happy_routes(srv, pki)
    with pytest.raises(tls.TlsError) as ei:
        client(srv, pki).handle_notification(PIR)
    assert ei.value.code == code, ei.value.message
    assert ei.value.exit_code == 3
    assert srv.requests == []  # nothing was sent to the untrusted peer
    if code == "tls_untrusted":
        assert "GSMA CI" in ei.value.message and "--ca" in ei.value.message


def test_tls_refusal_not_retried_even_for_idempotent(server, pki):
    srv = server("untrusted")
    sleeps = []
    with pytest.raises(tls.TlsError):
        client(srv, pki, sleep=sleeps.append).initiate_authentication(CHALLENGE, info1(), "localhost")
    assert sleeps == []


def test_caller_session_cannot_disable_verification(server, pki):
    srv = server("untrusted")
    s = requests.Session()
    s.verify = False
    with pytest.raises(tls.TlsError) as ei:
        client(srv, pki, session=s).handle_notification(PIR)
    assert ei.value.code == "tls_untrusted"


def test_missing_role_accepted_with_warning_or_refused_when_strict(server, pki):
    srv = server("norole")
    install_happy_routes(srv, pki)
    c = client(srv, pki)
    c.handle_notification(PIR)
    assert any("no GSMA RSP role" in w for w in c.all_warnings)
    strict = tls.load_trust(pki["dir"] / "ci.pem", strict_role=True)
    with pytest.raises(tls.TlsError) as ei:
        Es9pClient(srv.address, trust=strict).handle_notification(PIR)
    assert ei.value.code == "tls_wrong_role"


def test_no_ca_configured(monkeypatch, tmp_path):
    monkeypatch.setattr(tls, "DEFAULT_CA_PATHS", (str(tmp_path / "nope.pem"),))
    with pytest.raises(tls.TrustError) as ei:
        Es9pClient("localhost:1")
    e = ei.value
    assert e.code == "no_trusted_ci" and e.exit_code == 2
    assert "/etc/esim-agent/ci-bundle.pem" in e.message and "--ca" in e.message and "sim pki" in e.message


def test_default_ca_path_used(monkeypatch, server, pki):
    monkeypatch.setattr(tls, "DEFAULT_CA_PATHS", (str(pki["dir"] / "ci.pem"),))
    srv = server()
    install_happy_routes(srv, pki)
    Es9pClient(srv.address, sleep=lambda s: None).handle_notification(PIR)


def test_clock_unset_refused_before_connecting(server, pki):
    srv = server()
    install_happy_routes(srv, pki)
    c = client(srv, pki, clock=lambda: dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc))
    with pytest.raises(tls.TrustError) as ei:
        c.handle_notification(PIR)
    assert ei.value.code == "clock_unset" and "2000-01-01" in ei.value.message
    # plausible year, but before the CI existed
    c = client(srv, pki, clock=lambda: NOW - dt.timedelta(days=5))
    with pytest.raises(tls.TrustError) as ei:
        c.handle_notification(PIR)
    assert ei.value.code == "clock_unset"
    assert srv.connections == 0


def test_trust_narrowed_to_euicc_ci_list(server, pki):
    srv = server()  # leaf issued by CI A
    install_happy_routes(srv, pki)
    a, b = ski(pki["ci"][0]), ski(pki["other"][0])
    # eUICC trusts only B for verification -> A's server is not acceptable
    with pytest.raises(tls.TlsError) as ei:
        client(srv, pki, ca="both.pem").initiate_authentication(CHALLENGE, info1(b), "localhost")
    assert ei.value.code == "tls_untrusted"
    # eUICC lists A -> fine
    c = client(srv, pki, ca="both.pem")
    c.initiate_authentication(CHALLENGE, info1(a), "localhost")
    assert c.trust.skis() == [a] and c.all_warnings == []
    # eUICC lists a CI we do not have -> whole bundle, recorded
    c = client(srv, pki, ca="both.pem")
    c.initiate_authentication(CHALLENGE, info1(b"\x99" * 20), "localhost")
    assert any("whole bundle" in w for w in c.all_warnings)
    # narrowing can be switched off
    c = client(srv, pki, ca="both.pem", narrow_trust=False)
    c.initiate_authentication(CHALLENGE, info1(b), "localhost")


def test_https_client_against_plain_http_server(server, pki):
    srv = server(leaf=None)
    with pytest.raises(tls.TlsError) as ei:
        client(srv, pki).handle_notification(PIR)
    assert ei.value.code == "tls_handshake_failed" and "--insecure-http" in ei.value.message


def test_insecure_http(server, pki):
    srv = server(leaf=None)
    install_happy_routes(srv, pki)
    c = Es9pClient(srv.address, insecure_http=True)
    assert c.base_url.startswith("http://")
    ia = c.initiate_authentication(CHALLENGE, info1(), "localhost")
    assert ia.transaction_id == TXID
    c.handle_notification(PIR)
    assert any("plain HTTP" in w for w in c.all_warnings)


# --- retries and deadlines ----------------------------------------------------------------------------

def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_retry_after_connection_refused_then_success(server, pki):
    port = _free_port()
    started = []

    def sleep(delay):  # the server comes up during the first back-off
        if not started:
            srv = server(port=port)
            install_happy_routes(srv, pki)
            started.append((delay, srv))
    c = Es9pClient(f"localhost:{port}", ca=pki["dir"] / "ci.pem", sleep=sleep, backoff=0.25)
    # authenticateClient is not idempotent, but a refused connection never reached the server
    ac = c.authenticate_client(TXID, AUTH_SERVER_RESP)
    assert ac.profile_metadata == PROFILE_METADATA
    assert started[0][0] == 0.25
    assert len(started[0][1].requests) == 1


def test_connection_refused_gives_up(pki):
    port = _free_port()
    sleeps = []
    c = Es9pClient(f"localhost:{port}", ca=pki["dir"] / "ci.pem", sleep=sleeps.append, retries=3, backoff=0.1)
    with pytest.raises(TransportError) as ei:
        c.handle_notification(PIR)
    assert ei.value.code == "connection_refused" and ei.value.exit_code == 3
    assert sleeps == [0.1, 0.2, 0.4] and ei.value.details["attempts"] == 4


def test_dns_failure(pki):
    c = Es9pClient("no-such-host.invalid", ca=pki["dir"] / "ci.pem", sleep=lambda s: None, retries=0)
    with pytest.raises(TransportError) as ei:
        c.handle_notification(PIR)
    assert ei.value.code == "dns_failure"


def test_read_timeout_of_authenticate_client_not_retried(server, pki):
    srv = server()

    def slow(b):
        time.sleep(1.0)
        return 200, ok()
    srv.routes["authenticateClient"] = slow
    sleeps = []
    c = client(srv, pki, timeout=(2, 0.3), sleep=sleeps.append)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError_) as ei:
        c.authenticate_client(TXID, AUTH_SERVER_RESP)
    assert time.monotonic() - t0 < 1.0
    assert ei.value.code == "read_timeout" and "not resent" in ei.value.message
    assert sleeps == []
    time.sleep(0.8)
    assert len(srv.requests) == 1


def test_read_timeout_of_get_bpp_not_retried(server, pki):
    srv = server()

    def slow(b):
        time.sleep(0.8)
        return 200, ok()
    srv.routes["getBoundProfilePackage"] = slow
    with pytest.raises(TimeoutError_):
        client(srv, pki, timeout=(2, 0.3)).get_bound_profile_package(TXID, PREP_DL_RESP)
    time.sleep(0.6)
    assert len(srv.requests) == 1


def test_read_timeout_of_initiate_authentication_retried(server, pki):
    srv = server()
    install_happy_routes(srv, pki)
    fast = srv.routes["initiateAuthentication"]
    calls = []

    def first_slow(b):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.8)
        return fast(b)
    srv.routes["initiateAuthentication"] = first_slow
    sleeps = []
    c = client(srv, pki, timeout=(2, 0.3), sleep=sleeps.append)
    assert c.initiate_authentication(CHALLENGE, info1(), "localhost").transaction_id == TXID
    assert len(sleeps) == 1 and len(calls) == 2


def test_status_error_mapping_table_is_consistent():
    codes = [c for c, _ in es9p.STATUS_CODES.values()]
    assert len(codes) == len(set(codes))
    assert all(c.islower() and " " not in c for c in codes)


# --- against the test bed's own SM-DP+ (if present) -------------------------------------------------

def test_against_local_test_smdpp(tmp_path):
    smdpp = pytest.importorskip("agent.sim.smdpp")
    pki_mod = pytest.importorskip("agent.sim.pki")
    p = pki_mod.make_pki(tmp_path)
    ci_ski = ski(p.ci.cert)
    with smdpp.SmdpServer(tmp_path) as srv:
        if getattr(srv, "_thread", None) is None:
            srv.start()
        c = Es9pClient(srv.address, ca=tmp_path / "ci.pem", timeout=(2, 10))
        ia = c.initiate_authentication(os.urandom(16), info1(ci_ski), srv.address)
        assert ia.euicc_ci_pkid_to_be_used == encode(0x04, ci_ski)
        assert c.all_warnings == []  # CERT.DP.TLS carries the dp-tls role OID
        with pytest.raises(Es9pError) as ei:
            c.get_bound_profile_package("00112233", PREP_DL_RESP)
        assert ei.value.code == "unknown_transaction"


def test_total_deadline_against_a_dripping_server(server, pki):
    """Each read arrives within the read timeout, but the whole answer must not take
    longer than total_timeout (the device must never be held by a slow server)."""
    srv = server()
    srv.routes["getBoundProfilePackage"] = lambda b: (200, Drip(json.dumps(ok()).encode() * 20))
    c = client(srv, pki, timeout=(2, 1), total_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError_) as ei:
        c.get_bound_profile_package(TXID, PREP_DL_RESP)
    assert time.monotonic() - t0 < 2.0
    assert ei.value.code == "response_deadline" and "getBoundProfilePackage" in ei.value.message
    assert len(srv.requests) == 1                      # not retried: the server may have acted


def test_oversized_answer_refused(server, pki, monkeypatch):
    import agent.es9p as es9p
    monkeypatch.setattr(es9p, "MAX_BODY", 1000)
    srv = server()
    srv.routes["getBoundProfilePackage"] = lambda b: (200, b"x" * 5000)
    with pytest.raises(ProtocolError) as ei:
        client(srv, pki).get_bound_profile_package(TXID, PREP_DL_RESP)
    assert ei.value.code == "response_too_large"


def test_user_agent_version_is_the_installed_distributions():
    """Read from the dist-info directory's name (no importlib.metadata import on a download's
    path): the same version importlib.metadata reports."""
    from importlib import metadata
    try:
        expected = metadata.version("esim-agent")
    except metadata.PackageNotFoundError:
        pytest.skip("esim-agent is not installed")
    assert es9p._installed_version() == expected
    assert es9p._user_agent() == f"gsma-rsp-lpad esim-agent/{expected}"


@pytest.mark.parametrize("answer,code", [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "http_failed"),                          # not HTTP at all
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"header\"", "connection_lost"),  # cut short
    (b"", "connection_lost"),                                                   # closed, no answer
])
def test_an_answer_that_is_not_http_or_cut_short(answer, code):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]

    def serve():
        lsock.settimeout(10)
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(answer)
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    c = Es9pClient(f"127.0.0.1:{port}", insecure_http=True, sleep=lambda s: None, timeout=(2, 2))
    with pytest.raises(TransportError) as ei:
        c.authenticate_client(TXID, AUTH_SERVER_RESP)      # never resent: one connection
    assert ei.value.code == code, ei.value.to_json()
    assert ei.value.exit_code == 3
    th.join(5)
    lsock.close()


class ConnectProxy:
    """A CONNECT-only HTTP proxy on loopback that records what it was asked and relays bytes."""

    def __init__(self):
        self.asked: list[tuple[str, str | None]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c):
        with c:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = c.recv(4096)
                if not chunk:
                    return
                buf += chunk
            lines = buf.decode("latin-1").split("\r\n")
            auth = next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("proxy-authorization:")),
                        None)
            target = lines[0].split()[1]
            self.asked.append((target, auth))
            host, port = target.rsplit(":", 1)
            up = socket.create_connection((host, int(port)), 5)
            c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

            def pump(a, b):
                try:
                    while True:
                        d = a.recv(65536)
                        if not d:
                            break
                        b.sendall(d)
                except OSError:
                    pass
                finally:
                    try:
                        b.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            t = threading.Thread(target=pump, args=(up, c), daemon=True)
            t.start()
            pump(c, up)
            t.join(5)
            up.close()

    def close(self):
        self.sock.close()


def test_https_goes_through_the_environments_proxy(server, pki, monkeypatch):
    """As requests did for the agent: https_proxy (with user:password) carries a CONNECT tunnel,
    TLS stays end to end with the SM-DP+ (verified against our CIs), no_proxy is honoured."""
    srv = server()
    install_happy_routes(srv, pki)
    proxy = ConnectProxy()
    try:
        for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "HTTPS_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("https_proxy", f"http://user:s%40cret@127.0.0.1:{proxy.port}")
        with client(srv, pki) as c:
            c.handle_notification(PIR)
            c.cancel_session(TXID, CANCEL_RESP)
        assert proxy.asked == [(f"localhost:{srv.port}", "Basic " + base64.b64encode(b"user:s@cret").decode())]
        assert srv.connections == 1
        monkeypatch.setenv("no_proxy", "example.org, .localhost,localhost")
        client(srv, pki).handle_notification(PIR)
        assert len(proxy.asked) == 1                        # straight to the server
        monkeypatch.delenv("no_proxy")
        bad = server("untrusted")
        with pytest.raises(tls.TlsError) as ei:
            client(bad, pki).handle_notification(PIR)
        assert ei.value.code == "tls_untrusted"             # the tunnel changes nothing about trust
        assert proxy.asked[-1][0] == f"localhost:{bad.port}"
    finally:
        proxy.close()


def test_a_proxy_that_refuses_the_tunnel(server, pki, monkeypatch):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)

    def serve():
        lsock.settimeout(10)
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            with c:
                c.recv(4096)
                c.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
    threading.Thread(target=serve, daemon=True).start()
    for var in ("no_proxy", "NO_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{lsock.getsockname()[1]}")
    srv = server()
    with pytest.raises(TransportError) as ei:
        client(srv, pki, retries=0).authenticate_client(TXID, AUTH_SERVER_RESP)
    assert ei.value.code == "connection_failed" and "407" in ei.value.message
    assert srv.requests == []
    lsock.close()
