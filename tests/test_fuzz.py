"""Malformed input never escapes as a bare exception or a hang (issue 9 item 8).

Two halves:

* regressions: the literal inputs an outside fuzzing campaign found (a DER decoder that
  loops for ever, numbers Python cannot print or SQLite cannot hold, JSON nested too deep,
  an ES9+ statusCodeData that is not an object, a certificate with a duplicated extension,
  config values that pass ``isdigit()`` or exceed PATH_MAX/NAME_MAX), each checked to end in
  the project's own error;
* properties (hypothesis) for every entry point that parses what a card, a modem, a server
  or a user hands us: activation codes, BER-TLV, the ASN.1 decode of every type we take
  from the card or the SM-DP+, every ES10 call given fuzzed card answers, the download and
  notification flows replaying a real session with one answer spoilt, the APDU layer, AT
  lines and a fake serial port, the ES9+ client given fuzzed HTTP bodies, BPP splitting,
  certificates and the config loader.  Each example must end in a value or an AgentError
  whose code is in errors.EXIT_CODES and whose JSON form can be printed, within
  EXAMPLE_SECONDS (SIGALRM) — a hang fails with the input instead of wedging the suite.
  (Modem registration lines have their own property tests in tests/test_network.py.)

Sizes: a normal run uses FAST_EXAMPLES per property, derandomized (same examples on every
run, a few seconds in all).  ``pytest -m fuzz tests/test_fuzz.py`` runs only the
properties with LONG_EXAMPLES each and fresh randomness; ESIM_AGENT_FUZZ_EXAMPLES=N sets
the count explicitly and ESIM_AGENT_FUZZ_SEED=N fixes the randomness of a long run.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from agent import ac, asn1tables, codec, config, config_check, crypto, errors, tlv
from agent.apdu import Isdr, close_channel_raw, open_channel_raw
from agent.errors import AgentError, ProtocolError
from agent.es10 import Es10, Es10Error
from agent.es8p import split_bpp
from agent.es9p import Es9pClient
from agent.transport import at as at_mod
from agent.transport import quirks as quirks_mod
from agent.transport.at import AtPort, Collector, LineSplitter, error_from_final, parse_len_hex
from agent.transport.csim import CsimTransport

from conftest import ISDR_AID
from fuzzkit import bounded, mutated
from fuzzkit import examples as fuzz_examples
from testbed import Bed, testbed_pki  # noqa: F401 (session fixture)

H = bytes.fromhex
FAST_EXAMPLES = 50
ICCID = "8944476500001224158"
ICCID2 = "89049032000001000000"
TXID = "0123456789ABCDEF0123456789ABCDEF"
#: a 1786-byte INTEGER: 4301 decimal digits, one more than int -> str allows
BIG = b"\x7f" + b"\xff" * 1785


# --------------------------------------------------------------------------- helpers

def enc(tag: bytes, value: bytes) -> bytes:
    return bytes(tag) + tlv.encode_length(len(value)) + value


def check_error(e: AgentError) -> AgentError:
    """The project's error contract: a code from the fixed table, a printable JSON form."""
    assert errors.exit_code_for(e.code) is not None, f"error code {e.code!r} is not in errors.EXIT_CODES"
    assert isinstance(e.message, str)
    json.dumps(e.to_json(), default=str)          # ints too large to print would raise here
    return e


def agent_error(fn, *args, **kw) -> AgentError:
    """Run ``fn`` expecting an AgentError; return it (checked)."""
    try:
        bounded(fn, *args, **kw)
    except AgentError as e:
        return check_error(e)
    raise AssertionError(f"{getattr(fn, '__name__', fn)} accepted the input")


def only_agent_errors(fn, *args, **kw):
    """The property: ``fn`` returns, or raises an AgentError (checked).  Anything else
    propagates and fails the example.  Returns the value, or None after an error."""
    try:
        return fn(*args, **kw)
    except AgentError as e:
        check_error(e)
        return None


def printable(value) -> None:
    """What a call returned must print as JSON (the CLI's --json, the daemon's socket)."""
    if hasattr(value, "to_json"):
        value = value.to_json()
    elif dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        for v in value:
            printable(v)
        return
    json.dumps(value, default=lambda o: o.hex() if isinstance(o, (bytes, bytearray)) else str(o))


@pytest.fixture
def fuzz(request):
    """``fuzz(check, *strategies, examples=FAST_EXAMPLES)``: run ``check`` on drawn examples,
    each under its own SIGALRM bound.  The settings are chosen when the test runs, so
    ``-m fuzz`` (or ESIM_AGENT_FUZZ_EXAMPLES) can make the run long."""
    def run(check, *strategies, examples: int = FAST_EXAMPLES):
        n = fuzz_examples(request.config, examples)
        long_run = n > examples

        def example(args):
            bounded(check, *args)

        test = given(st.tuples(*strategies))(example)
        test = settings(max_examples=n, deadline=None, derandomize=not long_run, database=None,
                        print_blob=long_run,
                        suppress_health_check=list(HealthCheck))(test)
        if long_run and os.environ.get("ESIM_AGENT_FUZZ_SEED"):
            test = seed(int(os.environ["ESIM_AGENT_FUZZ_SEED"]))(test)
        test()
    return run


# --------------------------------------------------------------------------- strategies

def _walk_types(t, seen, out):
    if id(t) in seen:
        return
    seen.add(id(t))
    tag = getattr(t, "tag", None)
    if tag:
        out.add(bytes(tag))
    for attr in ("inner", "root_members", "additions", "members", "element_type"):
        v = getattr(t, attr, None)
        if v is None:
            continue
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, list):
                for y in x:
                    _walk_types(y, seen, out)
            elif x is not None and not isinstance(x, (str, int)):
                _walk_types(x, seen, out)


def schema_tags(type_name: str) -> tuple[list[bytes], list[bytes]]:
    """(every tag in the type's tree, the tags it may start with)."""
    t = asn1tables.spec()[type_name]._type
    out: set[bytes] = set()
    _walk_types(t, set(), out)
    top = [bytes(t.tag)] if getattr(t, "tag", None) else sorted(out)
    return sorted(out), top


_CONTENT = st.one_of(st.binary(max_size=12),
                     st.sampled_from([b"", b"\x00", b"\x80", b"\xff", b"\x07\x80", b"\x01" + b"\x00" * 8,
                                      b"\x00" * 20, b"\x80\x00\x00\x00\x00\x00\x00\x00\x00", BIG[:70]]))


def tlv_trees(tags: list[bytes], top: list[bytes]):
    """Well-formed BER-TLV trees built from a type's own tags (plus a few universal ones),
    with random contents: they pass the TLV skeleton check and reach the decoder proper."""
    extra = [b"\x00", b"\x02", b"\x04", b"\x0c", b"\x30", b"\x31", b"\x80", b"\xa0"]
    every = sorted(set(tags) | set(extra))
    constructed = [t for t in every if t[0] & 0x20]
    leaf = st.builds(enc, st.sampled_from(every), _CONTENT)
    tree = st.recursive(leaf, lambda kids: st.builds(lambda t, ks: enc(t, b"".join(ks)),
                                                       st.sampled_from(constructed), st.lists(kids, max_size=4)),
                        max_leaves=16)
    return st.builds(lambda t, ks: enc(t, b"".join(ks)), st.sampled_from(top), st.lists(tree, max_size=5))


def der_inputs(type_name: str, seeds=()):
    tags, top = schema_tags(type_name)
    parts = [tlv_trees(tags, top), st.binary(max_size=40)]
    if seeds:
        parts.insert(0, mutated(list(seeds)))
    return st.one_of(*parts)


# --------------------------------------------------------------------------- seeds: a real session

class Recorder:
    """Es10Channel that records (request, answer) pairs on the way to a real card."""

    def __init__(self, inner):
        self.inner = inner
        self.log: list[tuple[bytes, bytes]] = []

    def es10(self, payload, *, timeout=None, what="ES10 command"):
        out = self.inner.es10(payload, timeout=timeout, what=what)
        self.log.append((bytes(payload), bytes(out)))
        return out


@dataclasses.dataclass
class Session:
    """What one real download (simulated eUICC + local SM-DP+ over loopback HTTPS) exchanged."""

    address: str
    matching_id: str
    download: list            # [(ES10 request, answer)] of the download, in order
    es9: list                 # [(function, http status, body)] of the download, in order
    answers: dict             # request tag -> [the card's real answers to it] (after the download)
    bpp: bytes
    certs: list               # DER certificates: CI, EUM, eUICC, DPauth, DPpb
    eid: str


@pytest.fixture(scope="module")
def session(testbed_pki, tmp_path_factory) -> Session:   # noqa: F811 (fixture)
    bed = Bed(testbed_pki, tmp_path_factory.mktemp("fuzz-bed"), preload=1).start()
    try:
        order = bed.reserve(matching_id=True)
        rec = Recorder(bed.es10.ch)
        es9 = bed.client()
        es9_log: list = []
        post = es9._post

        def recording_post(function, body):
            status, content = post(function, body)
            es9_log.append((function, status, content))
            return status, content

        es9._post = recording_post
        try:
            bed.download(matching_id=order["matching_id"], es9=es9, es10=Es10(rec))
        finally:
            es9.close()
        download = list(rec.log)
        es10 = Es10(rec)
        txid = next(json.loads(c)["transactionId"] for f, s, c in es9_log if f == "initiateAuthentication")
        first = es10.get_profiles_info()[0].iccid
        # one answer to every ES10 call (disable + enable first: their notifications are listed after)
        for call in (es10.get_eid, es10.get_euicc_info1, es10.get_euicc_info2, es10.get_configured_addresses,
                     es10.get_rat, es10.get_euicc_challenge, lambda: es10.set_default_dp_address("smdp.example.com"),
                     lambda: es10.set_nickname(first, "fuzz"), lambda: es10.cancel_session(bytes.fromhex(txid), 1),
                     lambda: es10.disable_profile(first, refresh=False),
                     lambda: es10.enable_profile(first, refresh=False), lambda: es10.delete_profile(ICCID2),
                     es10.get_profiles_info, es10.list_notifications, es10.retrieve_notifications,
                     lambda: es10.remove_notification(12345), es10.memory_reset):
            try:
                call()
            except AgentError:
                pass
        answers: dict[int, list[bytes]] = {}
        for req, ans in rec.log:
            if ans:
                answers.setdefault(tlv.read_tag(req)[0], []).append(ans)
        bpp = next(base64.b64decode(json.loads(c)["boundProfilePackage"])
                   for f, s, c in es9_log if f == "getBoundProfilePackage")
        pki = crypto.load_certs((Path(testbed_pki) / "ci.pem").read_bytes())
        certs = [crypto.cert_der(c) for c in pki]
        for name in ("dpauth.pem", "dppb.pem", "eum.pem"):
            p = Path(testbed_pki) / name
            if p.exists():
                certs.append(crypto.cert_der(crypto.load_cert(p.read_bytes())))
        asr = next(a for r, a in download if r[:2] == b"\xbf\x38")
        ok = codec.decode("AuthenticateServerResponse", asr)[1]
        for k in ("euiccCertificate", "eumCertificate"):
            certs.append(codec.encode("Certificate", ok[k]))
        return Session(bed.address, order["matching_id"], download, es9_log, answers, bpp, certs, bed.eid)
    finally:
        bed.close()


# =========================================================================== regressions


class FixedCard:
    """Es10Channel answering every command with the same bytes."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.sent: list[bytes] = []

    def es10(self, payload, *, timeout=None, what="ES10 command"):
        self.sent.append(bytes(payload))
        return self.answer


# --- the DER decoder looped for ever on a SEQUENCE OF element with the wrong tag

@pytest.mark.parametrize("call, answer", [
    ("get_profiles_info", "BF2D04A0020000"),
    ("list_notifications", "BF2804A0020000"),
    ("get_euicc_info1", "BF200982030202 02A9020000".replace(" ", "")),
], ids=["GetProfilesInfo", "ListNotification", "GetEUICCInfo1"])
def test_sequence_of_with_a_wrongly_tagged_element_is_malformed_not_a_hang(call, answer):
    e = agent_error(getattr(Es10(FixedCard(H(answer))), call), seconds=5)
    assert isinstance(e, ProtocolError) and e.code == "malformed_asn1"


def _list_nodes(der: bytes, off: int = 0, end: int | None = None, out=None) -> list[int]:
    """Offsets of the first child of every constructed TLV whose children share one tag
    (the shape of a SEQUENCE OF / SET OF) and whose tag is one byte."""
    out = [] if out is None else out
    end = len(der) if end is None else end
    while off < end:
        t, length, voff = tlv.read_header(der, off)
        if tlv.Tlv(t, voff - off, b"", b"").constructed:
            kids = []
            o = voff
            while o < voff + length:
                kt, kl, kv = tlv.read_header(der, o)
                kids.append((o, kt, kv - o))
                o = kv + kl
            if kids and len({k[1] for k in kids}) == 1 and kids[0][2] == 2:
                out.append(kids[0][0])
            _list_nodes(der, voff, voff + length, out)
        off = voff + length
    return out


@pytest.mark.parametrize("type_name, request_tag", [
    ("EUICCInfo2", 0xBF22), ("RetrieveNotificationsListResponse", 0xBF2B), ("GetRatResponse", 0xBF43),
    ("AuthenticateServerResponse", 0xBF38), ("ProfileInstallationResult", 0xBF36),
    ("ProfileInfoListResponse", 0xBF2D), ("EUICCInfo1", 0xBF20), ("ListNotificationResponse", 0xBF28),
], ids=lambda v: v if isinstance(v, str) else f"{v:X}")
def test_every_list_in_real_answers_with_a_wrongly_tagged_element(session, type_name, request_tag):
    """Each list-shaped TLV of a real card answer gets a first element whose tag is 00
    (lengths intact): the decode must end, in a value or malformed_asn1."""
    if request_tag == 0xBF36:
        seeds = [a for r, a in session.download if a[:2] == b"\xbf\x37"]
    elif request_tag == 0xBF38:
        seeds = [a for r, a in session.download if r[:2] == b"\xbf\x38"]
    else:
        seeds = session.answers.get(request_tag, [])
    assert seeds, f"no real answer recorded for {type_name}"
    tried = 0
    for der in seeds:
        for pos in _list_nodes(der):
            spoilt = der[:pos] + b"\x00" + der[pos + 1:]
            only_agent_errors(bounded, codec.decode, type_name, spoilt, seconds=5)
            tried += 1
    assert tried, f"no list found in the {type_name} answers"


def test_profile_metadata_with_a_wrongly_tagged_notification_configuration():
    raw = H("BF25 14 5A0A98000000000000000000 9100 9200 B6020000".replace(" ", ""))
    from agent.flows.download import parse_metadata
    assert agent_error(parse_metadata, raw, seconds=5).code == "malformed_asn1"


def test_rat_with_wrongly_tagged_rules_and_operators():
    for raw in ("BF4304A0020000", "BF430EA00C300A8000A10200008202 0700".replace(" ", "")):
        assert agent_error(Es10(FixedCard(H(raw))).get_rat, seconds=5).code == "malformed_asn1"


def test_correct_lists_still_decode():
    """The SEQUENCE OF fix keeps empty and ordinary lists as they were."""
    assert Es10(FixedCard(H("BF2D02A000"))).get_profiles_info() == []
    assert Es10(FixedCard(H("BF2802A000"))).list_notifications() == []
    info = Es10(FixedCard(H("BF200D8203020200A90404021122AA00"))).get_euicc_info1()
    assert info.svn == "2.2.0" and info.ci_pkids_for_verification == ["1122"] and info.ci_pkids_for_signing == []


# --- numbers Python cannot print (int -> str stops at 4300 digits) or SQLite cannot hold

@pytest.mark.parametrize("call, answer", [
    ("enable", enc(b"\xbf\x31", enc(b"\x80", BIG))),
    ("list_notifications", enc(b"\xbf\x28", enc(b"\x81", BIG))),
    ("get_profiles_info", enc(b"\xbf\x2d", enc(b"\xa0", enc(b"\xe3", enc(b"\x9f\x70", BIG))))),
    ("get_profiles_info", enc(b"\xbf\x2d", enc(b"\x81", BIG))),
    ("get_profiles_info", enc(b"\xbf\x2d", enc(b"\xa0", enc(b"\xe3", enc(b"\x95", BIG))))),
    ("cancel", enc(b"\xbf\x41", enc(b"\x81", BIG))),
    ("list_notifications", enc(b"\xbf\x28", enc(b"\xa0", enc(b"\xbf\x2f", enc(b"\x80", BIG) + H("81020780")
                                                                     + enc(b"\x0c", b"a.example"))))),
], ids=["enableResult", "listNotificationsResultError", "profileState", "profileInfoListError", "profileClass",
        "cancelSessionError", "seqNumber"])
def test_card_integer_of_1786_bytes(call, answer):
    es = Es10(FixedCard(answer))
    fn = {"enable": lambda: es.enable_profile(ICCID), "cancel": lambda: es.cancel_session(b"\x01" * 16, 1)}.get(
        call) or getattr(es, call)
    e = agent_error(fn)
    assert e.code == "malformed_asn1" and "1786 octets" in e.message


def test_unknown_card_result_has_a_fixed_code_and_the_number_in_details():
    n = 2 ** 71
    raw = enc(b"\xbf\x31", enc(b"\x80", n.to_bytes(10, "big")))
    e = agent_error(Es10(FixedCard(raw)).enable_profile, ICCID)
    assert isinstance(e, Es10Error) and e.code == "unknown_result"
    assert e.details["result"] == n and str(n) in e.message


@pytest.mark.parametrize("seq", [2 ** 63, 2 ** 64 + 5, -1])
def test_card_sequence_number_outside_sqlite_range(seq, tmp_path):
    md = enc(b"\xbf\x2f", enc(b"\x80", seq.to_bytes(10, "big", signed=True)) + H("81020780")
             + enc(b"\x0c", b"a.example"))
    e = agent_error(Es10(FixedCard(enc(b"\xbf\x28", enc(b"\xa0", md)))).list_notifications)
    assert e.code == "malformed_asn1" and "sequence number" in e.message
    # the whole notification flow: the card lists it, nothing reaches SQLite
    from agent.flows.notifications import process
    from agent.store import Outbox
    with Outbox(tmp_path) as ob:
        agent_error(process, Es10(FixedCard(enc(b"\xbf\x28", enc(b"\xa0", md)))), ob, lambda a: None,
                    eid="89049032123451234512345678901235")


def test_outbox_refuses_sequence_numbers_sqlite_cannot_hold(tmp_path):
    from agent.store import Outbox
    eid = "89049032123451234512345678901235"
    with Outbox(tmp_path) as ob:
        for seq in (2 ** 63, 2 ** 14288):
            assert agent_error(ob.record, eid, seq, "install", "a.example", None, b"\x30\x00").code \
                == "bad_store_input"
            assert ob.get(eid, seq) is None
            assert agent_error(ob.mark_sent, eid, seq).code == "unknown_notification"
            assert ob.mark_removed(eid, seq) is None
        assert ob.record(eid, 2 ** 63 - 1, "install", "a.example", None, b"\x30\x00").seq_number == 2 ** 63 - 1


def _replay(session: Session, *, answer_at=None, es9_at=None):
    """Downloader on a replay of the recorded session: the card's answers in order (one
    replaced: ``answer_at=(index, bytes)``), the SM-DP+'s bodies by function (one replaced:
    ``es9_at=(function, status, body)``)."""
    from agent.flows.download import DownloadOptions, Downloader
    answers = [a for r, a in session.download]
    if answer_at is not None:
        answers[answer_at[0]] = answer_at[1]
    cancel_answer = next((a for a in session.answers.get(0xBF41, [])), H("BF4103810105"))

    class Card:
        def __init__(self):
            self.i = 0

        def es10(self, payload, *, timeout=None, what="ES10 command"):
            if payload[:2] == b"\xbf\x41":
                return cancel_answer
            i, self.i = self.i, self.i + 1
            return answers[i] if i < len(answers) else b""

    bodies = {f: (s, c) for f, s, c in session.es9}
    if es9_at is not None:
        bodies[es9_at[0]] = es9_at[1:]
    client = Es9pClient(session.address, insecure_http=True, retries=0)
    client._post = lambda function, body: bodies.get(function, (204, b""))
    opts = DownloadOptions(address=session.address, matching_id=session.matching_id, consent=lambda m: True)
    return Downloader(Es10(Card()), client, opts).run()


def test_replayed_session_downloads(session):
    """The harness of the flow tests below: the unchanged replay completes."""
    res = _replay(session)
    assert res.iccid and res.notification_seq is not None


def test_real_session_has_seeds_for_every_decoded_type(session):
    """The property tests mutate real answers: each decoded type must have some."""
    missing = [n for n in list(CARD_TYPES) + list(SERVER_TYPES) if not _seeds_for(session, n)]
    assert not missing


@pytest.mark.parametrize("which, alt", [("AuthenticateServerResponse", b"\xbf\x38"),
                                        ("PrepareDownloadResponse", b"\xbf\x21")],
                         ids=["AuthenticateServer", "PrepareDownload"])
@pytest.mark.parametrize("number, code", [(BIG, "malformed_asn1"), ((2 ** 71).to_bytes(10, "big"), "unknown_result")],
                         ids=["1786-bytes", "2^71"])
def test_card_refusal_with_a_huge_error_code(session, which, alt, number, code):
    """AuthenticateServer / PrepareDownload answering its error alternative with a huge
    error code: a fixed error code, the number (when printable) in the details."""
    answer = enc(alt, enc(b"\xa1", enc(b"\x80", bytes.fromhex(TXID)) + enc(b"\x02", number)))
    i = next(i for i, (r, a) in enumerate(session.download) if r[:2] == alt)
    e = agent_error(_replay, session, answer_at=(i, answer))
    assert e.code == code, e.to_json()
    if code == "unknown_result":
        assert e.details["result"] == 2 ** 71 and str(2 ** 71) in e.message


@pytest.mark.parametrize("field", ["bppCommandId", "errorReason"])
def test_install_result_with_a_huge_error_field(session, field):
    i, pir = next((i, a) for i, (r, a) in enumerate(session.download) if a[:2] == b"\xbf\x37")
    v = codec.decode("ProfileInstallationResult", pir)
    v["profileInstallationResultData"]["finalResult"] = ("errorResult", {"bppCommandId": 5, "errorReason": 7,
                                                                          field: 2 ** 71})
    t = asn1tables.spec()["ProfileInstallationResult"]      # (asn1tools directly: codec.encode checks ranges)
    e = agent_error(_replay, session, answer_at=(i, bytes(t.encode(v))))
    assert e.code.startswith("install_") and errors.exit_code_for(e.code) == 1
    v["profileInstallationResultData"]["finalResult"][1][field] = int.from_bytes(BIG, "big")
    e = agent_error(_replay, session, answer_at=(i, bytes(t.encode(v))))
    assert e.code == "malformed_asn1" and "1786 octets" in e.message


def test_modem_error_numbers_with_4301_digits():
    digits = "9" * 4301
    for line, cls in ((f"+CME ERROR: {digits}", at_mod.ModemCmeError), (f"+CMS ERROR: {digits}", at_mod.ModemCmsError),
                      ("+CME ERROR: \u00b2", at_mod.ModemCmeError)):
        e = error_from_final("AT+CSIM=10,\"00A4040000\"", line)
        assert isinstance(e, cls) and len(e.message) < 200
        check_error(e)
    assert error_from_final("AT", "+CME ERROR: 10").cme == 10


def test_csim_length_field_with_4301_digits():
    e = agent_error(parse_len_hex, "9" * 4301 + ',"9000"', "+CSIM")
    assert e.code == "length_mismatch"
    assert parse_len_hex('4,"9000"', "+CSIM") == H("9000")


# --- a fake serial port in front of AtPort

class FakeSerial:
    """pyserial stand-in: ``respond(command bytes) -> bytes`` fills the input after each write."""

    def __init__(self, respond):
        self.respond = respond
        self.rx = bytearray()

    @property
    def in_waiting(self) -> int:
        return len(self.rx)

    def write(self, data: bytes) -> int:
        self.rx += self.respond(bytes(data))
        return len(data)

    def read(self, n: int = 1) -> bytes:
        out = bytes(self.rx[:n])
        del self.rx[:n]
        return out

    def reset_input_buffer(self) -> None:
        self.rx.clear()

    def close(self) -> None:
        pass


class FakePort(AtPort):
    def __init__(self, respond, device: str, timeout: float = 0.05):
        self._fake = FakeSerial(respond)
        super().__init__(device, timeout=timeout, lock=False)

    def _open_serial(self, real, baud):
        import serial
        self._serial = serial
        return self._fake


@pytest.fixture
def fast_at(monkeypatch, tmp_path):
    """Resynchronisation without its quiet periods, and a path that exists for the port."""
    monkeypatch.setattr(at_mod, "RESYNC_QUIET", 0.0)
    monkeypatch.setattr(at_mod, "QUIET", 0.0)
    dev = tmp_path / "ttyFAKE"
    dev.write_bytes(b"")
    return str(dev)


@pytest.mark.parametrize("answer, code", [
    ("+CME ERROR: " + "9" * 4301, "modem_cme_error"),
    ("+CMS ERROR: " + "9" * 4301, "modem_cms_error"),
    ("+CSIM: " + "9" * 4301 + ',"9000"\r\nOK', "length_mismatch"),
])
def test_modem_answers_with_4301_digits_through_the_port(fast_at, answer, code):
    port = FakePort(lambda cmd: b"\r\n" + answer.encode() + b"\r\n" if cmd != b"AT\r" else b"\r\nOK\r\n", fast_at)
    t = CsimTransport(port, quirks=quirks_mod.effective(), timeout=0.2)
    assert agent_error(t.transmit, H("80E2910003BF2E00")).code == code


# --- ES9+ bodies

def _client() -> Es9pClient:
    return Es9pClient("smdp.example.com", insecure_http=True, retries=0)


@pytest.mark.parametrize("depth", [994, 5000, 100000])
def test_es9p_json_nested_too_deep_is_malformed_json(depth):
    c = _client()
    for body in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth, b"[" * depth):
        c._post = lambda function, req, body=body: (200, body)
        e = agent_error(c.initiate_authentication, b"\x01" * 16, H("BF2000"), "smdp.example.com")
        assert e.code == "malformed_json"
        assert agent_error(c._parse, "authenticateClient", 500, body).code == "http_status"
        assert c.handle_notification(H("BF3700")) is None      # a 2xx: the server took it


@pytest.mark.parametrize("scd", [[], ["8.1", "3.8"], "8.1.1", True, False, 7, None, {"subjectCode": [[["x"]]]}],
                         ids=["empty-list", "list", "string", "true", "false", "number", "null", "nested"])
def test_es9p_status_code_data_that_is_not_an_object(scd):
    c = _client()
    warn = {"header": {"functionExecutionStatus": {"status": "Executed-WithWarning", "statusCodeData": scd}}}
    c._post = lambda function, req: (200, json.dumps(warn).encode())
    assert c.handle_notification(H("BF3700")) is None
    assert c.warnings and c.warnings[-1].startswith("handleNotification: SM-DP+ warning")
    failed = {"header": {"functionExecutionStatus": {"status": "Failed", "statusCodeData": scd}}}
    for status in (200, 400):
        c._post = lambda function, req, status=status: (status, json.dumps(failed).encode())
        assert agent_error(c.handle_notification, H("BF3700")).code == "smdp_refused"
        assert agent_error(c.cancel_session, TXID, H("BF4100")).code == "smdp_refused"


def test_es9p_deeply_nested_values_are_not_printed():
    deep = json.loads("[" * 500 + "]" * 500)
    c = _client()
    body = {"header": {"functionExecutionStatus": {"status": "Failed", "statusCodeData": {
        "subjectCode": deep, "reasonCode": deep, "message": deep, "subjectIdentifier": deep}}},
        "transactionId": deep}
    c._post = lambda function, req: (200, json.dumps(body).encode())
    assert agent_error(c.cancel_session, TXID, H("BF4100")).code == "smdp_refused"
    body["header"]["functionExecutionStatus"] = {"status": "Executed-Success"}
    c._post = lambda function, req: (200, json.dumps(body).encode())
    assert agent_error(c.get_bound_profile_package, TXID, H("BF2100")).code == "transaction_id_mismatch"
    assert agent_error(c.initiate_authentication, b"\x01" * 16, H("BF2000"), "smdp.example.com").code \
        == "bad_transaction_id"


def test_daemon_socket_request_nested_too_deep_is_bad_json():
    """The daemon's socket API parses what a local client sends: same rule."""
    from agent.daemon.server import HttpError, _json_body
    for body in (b"[" * 100000, b'{"a":' * 5000 + b"1" + b"}" * 5000):
        with pytest.raises(HttpError) as ei:
            bounded(_json_body, body)
        assert (ei.value.status, ei.value.code) == (400, "bad_json")


# --- certificates

def _cert_with_duplicate_extension() -> tuple[bytes, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dup")])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.RegisteredID(x509.ObjectIdentifier("2.999.10"))]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier(b"\x01" * 20), critical=False)
            .sign(key, hashes.SHA256()))
    v = codec.decode("Certificate", crypto.cert_der(cert))
    exts = v["tbsCertificate"]["extensions"]
    exts.append(exts[0])
    return codec.encode("Certificate", v), cert


def test_certificate_with_a_duplicated_extension_is_cert_malformed(tmp_path):
    der, good = _cert_with_duplicate_extension()
    assert agent_error(crypto.load_cert, der).code == "cert_malformed"
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    assert agent_error(crypto.load_certs, pem).code == "cert_malformed"
    raw = x509.load_der_x509_certificate(der)     # loaded elsewhere (TLS, a CA bundle): every helper maps it
    for fn in (crypto.smdp_oid, crypto.ski, crypto.aki, crypto.roles, crypto.is_ca):
        assert agent_error(fn, raw).code == "cert_malformed"
    # CERT.DPauth as the SM-DP+ sends it in initiateAuthentication
    from agent.flows.download import DownloadError, DownloadOptions, Downloader
    d = Downloader(None, None, DownloadOptions(address="smdp.example.com"))
    e = agent_error(d._check_smdp_oid, der, "2.999.10")
    assert isinstance(e, DownloadError) and e.code == "malformed_certificate"
    # a CA bundle holding it: loading and selecting by SKI end in our errors
    from agent import tls
    bundle = tmp_path / "ci.pem"
    bundle.write_bytes(pem)
    only_agent_errors(lambda: tls.filter_by_ski(tls.load_ca_certs(bundle), [b"\x01" * 20]))
    trust = tls.Trust((good,), "test", ("2.23.146.1.2.1.3",), False, lambda: _dt.datetime.now(_dt.timezone.utc))
    assert agent_error(trust.check_peer, der, "smdp.example.com").code == "tls_untrusted"


# --- config

def _load_config(tmp_path, text: str):
    p = tmp_path / "agent.toml"
    p.write_text(text, encoding="utf-8")
    return config.load(str(p))


@pytest.mark.parametrize("text, key", [
    ('[quirks]\nmax_apdu = "\u00b2"\n', "max_apdu"),
    ('[quirks]\nmax_apdu = "' + "9" * 4301 + '"\n', "max_apdu"),
    ('[quirks]\nmax_get_response = "' + "9" * 4301 + '"\n', "max_get_response"),
    ("[quirks]\nmax_apdu = " + "9" * 4301 + "\n", "not usable TOML"),
    ("[quirks]\nmax_apdu = 99999999999\n", "max_apdu"),
    ("timeout = " + "1" * 400 + "\n", "timeout"),
    ("rollback_after = " + "9" * 4000 + "\n", "rollback_after"),
    ('[quirks]\nno_such_quirk = true\n', "no_such_quirk"),
    ('state_dir = "/tmp/a\\u0000b"\n', "state_dir"),
    ('state_dir = "/' + "a/" * 2100 + '"\n', "state_dir"),
    ('state_dir = "/var/' + "a" * 256 + '"\n', "state_dir"),
    ('ca_bundle = "/' + "a/" * 2100 + 'ci.pem"\n', "ca_bundle"),
    ('ca_bundle = "/etc/' + "a" * 256 + '/ci.pem"\n', "ca_bundle"),
    ('device = "/dev/' + "a" * 256 + '"\n', "device"),
    ('report_ca = "/' + "b" * 4100 + '"\n', "report_ca"),
], ids=["superscript-two", "4301-digits", "4301-digits-gr", "4301-digit-toml-int", "too-large", "timeout-400-digits",
        "rollback-4000-digits", "unknown-quirk",
        "state_dir-nul", "state_dir-4200", "state_dir-256-name", "ca_bundle-4200", "ca_bundle-256-name",
        "device-256-name", "report_ca-4100"])
def test_config_values_that_cannot_be_used(tmp_path, text, key):
    e = agent_error(_load_config, tmp_path, text)
    assert e.code == "config_invalid" and key in e.message and len(e.message) < 400


def test_config_usable_paths_and_quirks_still_load(tmp_path):
    cfg = _load_config(tmp_path, 'state_dir = "/' + "a" * 255 + '"\nca_bundle = "/' + "b/" * 2000 + 'c"\n'
                                 '[quirks]\nmax_apdu = "261"\nno_prefix = "auto"\n')
    assert cfg.quirks == {"max_apdu": "261", "no_prefix": "auto"}
    assert quirks_mod.normalise(cfg.quirks) == {"max_apdu": 261, "no_prefix": None}


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "9" * 4301, 2 ** 14288, 70000],
                         ids=["superscript-two", "arabic-three", "4301-digits", "int-4302-digits", "70000"])
def test_quirk_numbers_from_the_command_line(value):
    e = agent_error(quirks_mod.normalise, {"max-apdu": value})
    assert e.code == "bad_quirk" and len(e.message) < 200


def test_state_and_ca_paths_from_elsewhere(tmp_path):
    """The same paths from the environment or --ca end in our errors too."""
    from agent import tls
    from agent.store import Outbox
    for bad in ("/" + "a/" * 2100, "/var/" + "a" * 256):
        assert agent_error(Outbox, bad).code == "store_unavailable"
        assert agent_error(tls.load_trust, bad).code == "bad_ca_file"
    assert agent_error(Outbox, str(tmp_path / "a\0b")).code == "store_unavailable"


def test_test_bed_fault_specs_with_odd_numbers():
    """`esim-agent sim modem --fault ...` is user input too."""
    from agent.sim.modem import parse_faults
    for spec in ("silent@\u00b2", "error@" + "9" * 4301, "cme=14@\u00b2", "delay=1@" + "9" * 4301):
        e = agent_error(parse_faults, [spec])
        assert e.code == "bad_fault" and len(e.message) < 200
    assert parse_faults(["cme=\u00b2@3"]).errors[3] == ("cme", "\u00b2")
    assert parse_faults(["cme=" + "9" * 4301 + "@3"]).errors[3] == ("cme", "9" * 4301)
    assert parse_faults(["cme=14@3"]).errors[3] == ("cme", 14)


# =========================================================================== properties

pytestmark_fuzz = pytest.mark.fuzz


@pytestmark_fuzz
def test_fuzz_activation_codes(fuzz):
    field = st.text(max_size=30) | st.sampled_from(["", "smdp.example.com", "1.2.3", "1", "0", "AB12", "a" * 64,
                                                      "x" * 300, "smdp.example.com:99999", "[::1]:443"])
    structured = st.builds(lambda pre, fs: pre + "$".join(fs), st.sampled_from(["LPA:", "lpa:", "", "LPA:1$"]),
                           st.lists(field, max_size=8))

    def check(text, wrapped):
        r = only_agent_errors(ac.parse_activation_code, text)
        if r is not None:
            assert r.address and r.raw == text
        only_agent_errors(ac.read_activation_code, text if wrapped else " " + text + "\n", None, None)
    fuzz(check, st.one_of(st.text(max_size=400), structured), st.booleans())


@pytestmark_fuzz
def test_fuzz_test_bed_fault_specs(fuzz):
    from agent.sim.modem import parse_faults
    words = st.sampled_from(["echo", "urc", "silent@", "error@", "cme=", "delay=", "max-apdu=", "reenumerate",
                             "reenumerate=", "@", "=", "\u00b2", "9" * 4301, "3", "-1", "0.5", "nan", "inf"])
    specs = st.lists(st.lists(words | st.text(max_size=6), max_size=4).map("".join), max_size=4)
    fuzz(lambda s: only_agent_errors(parse_faults, s), specs)


@pytestmark_fuzz
def test_fuzz_ber_tlv(fuzz):
    tags = [b"\x80", b"\xa0", b"\xbf\x2d", b"\x5a", b"\x9f\x70", b"\xdf\xff\xff\x7f", b"\x1f\x81\x80\x80\x00"]

    def check(data):
        ts = only_agent_errors(tlv.parse_all, data)
        if ts is not None:
            assert b"".join(t.raw for t in ts) == data
            for t in ts:
                if t.constructed:
                    only_agent_errors(tlv.children, t)
        only_agent_errors(tlv.parse_single, data)
        only_agent_errors(tlv.read_header, data, 0)
    fuzz(check, st.one_of(st.binary(max_size=60), tlv_trees(tags, tags), mutated([bytes(BIG[:10]), H("BF2D04A0020000"),
                                                                                  H("84FFFFFFFF")])))


#: Every type the agent decodes from what the card or the SM-DP+ sends.
CARD_TYPES = {
    "GetEuiccDataResponse": 0xBF3E, "EUICCInfo1": 0xBF20, "EUICCInfo2": 0xBF22,
    "EuiccConfiguredAddressesResponse": 0xBF3C, "SetDefaultDpAddressResponse": 0xBF3F,
    "ProfileInfoListResponse": 0xBF2D, "EnableProfileResponse": 0xBF31, "DisableProfileResponse": 0xBF32,
    "DeleteProfileResponse": 0xBF33, "SetNicknameResponse": 0xBF29, "ListNotificationResponse": 0xBF28,
    "RetrieveNotificationsListResponse": 0xBF2B, "NotificationSentResponse": 0xBF30,
    "EuiccMemoryResetResponse": 0xBF34, "GetRatResponse": 0xBF43, "GetEuiccChallengeResponse": 0xBF2E,
    "CancelSessionResponse": 0xBF41, "AuthenticateServerResponse": 0xBF38, "PrepareDownloadResponse": 0xBF21,
    "ProfileInstallationResult": 0xBF37, "OtherSignedNotification": None,
}
SERVER_TYPES = ("ServerSigned1", "SmdpSigned2", "StoreMetadataRequest", "Certificate")


def _seeds_for(session: Session, type_name: str) -> list[bytes]:
    tag = CARD_TYPES.get(type_name)
    out = []
    if tag in (0xBF38, 0xBF21):
        out = [a for r, a in session.download if r[:2] == tag.to_bytes(2, "big")]
    elif tag == 0xBF37:
        out = [a for r, a in session.download if a[:2] == b"\xbf\x37"]
    elif tag is not None:
        out = list(session.answers.get(tag, []))
    elif type_name == "OtherSignedNotification":
        lists = [tlv.children(tlv.parse_single(a))[0] for a in session.answers.get(0xBF2B, [])]
        out = [t.raw for lst in lists for t in tlv.children(lst) if t.tag == 0x30]
    elif type_name == "Certificate":
        out = list(session.certs)
    else:
        fields = {"ServerSigned1": "serverSigned1", "SmdpSigned2": "smdpSigned2",
                  "StoreMetadataRequest": "profileMetadata"}
        for f, s, c in session.es9:
            try:
                out.append(base64.b64decode(json.loads(c)[fields[type_name]]))
            except (KeyError, ValueError):
                pass
    return out


@pytestmark_fuzz
def test_fuzz_asn1_decode(fuzz, session):
    """codec.decode of every type the agent decodes from the card or the SM-DP+."""
    names = list(CARD_TYPES) + list(SERVER_TYPES)
    inputs = {n: der_inputs(n, _seeds_for(session, n)) for n in names}

    def check(case):
        type_name, data = case
        v = only_agent_errors(codec.decode, type_name, data)
        if v is not None:
            json.dumps(v, default=lambda o: o.hex() if isinstance(o, (bytes, bytearray)) else str(o))
    fuzz(check, _cases(names, inputs))


def _cases(names, inputs):
    """(name, input) pairs: a name, then an input drawn from that name's strategy."""
    return st.sampled_from(names).flatmap(lambda n: st.tuples(st.just(n), inputs[n]))


ES10_CALLS = {
    "get_eid": (0xBF3E, lambda es: es.get_eid()),
    "get_euicc_info1": (0xBF20, lambda es: es.get_euicc_info1()),
    "get_euicc_info2": (0xBF22, lambda es: es.get_euicc_info2()),
    "get_configured_addresses": (0xBF3C, lambda es: es.get_configured_addresses()),
    "set_default_dp_address": (0xBF3F, lambda es: es.set_default_dp_address("smdp.example.com")),
    "get_profiles_info": (0xBF2D, lambda es: es.get_profiles_info()),
    "enable_profile": (0xBF31, lambda es: es.enable_profile(ICCID)),
    "disable_profile": (0xBF32, lambda es: es.disable_profile(ICCID)),
    "delete_profile": (0xBF33, lambda es: es.delete_profile(ICCID2)),
    "set_nickname": (0xBF29, lambda es: es.set_nickname(ICCID, "fuzz")),
    "list_notifications": (0xBF28, lambda es: es.list_notifications()),
    "retrieve_notifications": (0xBF2B, lambda es: es.retrieve_notifications()),
    "remove_notification": (0xBF30, lambda es: es.remove_notification(1)),
    "memory_reset": (0xBF34, lambda es: es.memory_reset()),
    "get_rat": (0xBF43, lambda es: es.get_rat()),
    "get_euicc_challenge": (0xBF2E, lambda es: es.get_euicc_challenge()),
    "cancel_session": (0xBF41, lambda es: es.cancel_session(b"\x01" * 16, 1)),
}
_RESPONSE_TYPES = {tag: name for name, tag in CARD_TYPES.items() if tag}
_RESPONSE_TYPES[0xBF20], _RESPONSE_TYPES[0xBF22] = "EUICCInfo1", "EUICCInfo2"


@pytestmark_fuzz
def test_fuzz_es10_calls(fuzz, session):
    """Every ES10 call of agent/es10.py given a fuzzed card answer."""
    inputs = {call: der_inputs(_RESPONSE_TYPES[tag], session.answers.get(tag, [])) | st.just(b"")
              for call, (tag, fn) in ES10_CALLS.items()}

    def check(case):
        call, answer = case
        printable(only_agent_errors(ES10_CALLS[call][1], Es10(FixedCard(answer))))
    fuzz(check, _cases(list(ES10_CALLS), inputs))


@pytestmark_fuzz
def test_fuzz_download_flow(fuzz, session):
    """A recorded download replayed with one card answer or one SM-DP+ body spoilt."""
    n = len(session.download)
    card = st.integers(0, n - 1).flatmap(lambda i: st.tuples(st.just(i), mutated([session.download[i][1]])
                                                              | st.binary(max_size=20)))
    fields = {f: c for f, s, c in session.es9}

    @st.composite
    def server(draw):
        f = draw(st.sampled_from(sorted(fields)))
        obj = json.loads(fields[f])
        if draw(st.booleans()) and isinstance(obj, dict):
            k = draw(st.sampled_from(sorted(obj)))
            v = obj[k]
            if isinstance(v, str) and k != "transactionId":
                raw = base64.b64decode(v)
                obj[k] = base64.b64encode(draw(mutated([raw]))).decode()
            else:
                obj[k] = draw(_json_values)
            return f, draw(st.sampled_from([200, 200, 400, 500])), json.dumps(obj).encode()
        return f, draw(st.integers(100, 599)), draw(mutated([fields[f]]))

    def check(spoil):
        kind, what = spoil
        res = only_agent_errors(_replay, session, **{kind: what})
        if res is not None:
            printable(res.metadata)
    fuzz(check, st.one_of(st.tuples(st.just("answer_at"), card), st.tuples(st.just("es9_at"), server())))


@pytestmark_fuzz
def test_fuzz_notification_flow(fuzz, session, tmp_path_factory):
    from agent.flows.notifications import process
    from agent.store import Outbox
    state = tmp_path_factory.mktemp("fuzz-outbox")
    lists = session.answers.get(0xBF28, [])
    pending = session.answers.get(0xBF2B, [])

    def check(list_answer, retrieve_answer, status, body):
        class Card:
            def es10(self, payload, *, timeout=None, what=""):
                return {b"\xbf\x28": list_answer, b"\xbf\x2b": retrieve_answer}.get(payload[:2], H("BF3003800100"))

        def client_for(address):
            c = Es9pClient(address, insecure_http=True, retries=0)
            c._post = lambda function, req: (status, body)
            return c
        with Outbox(state) as ob:
            for d in only_agent_errors(process, Es10(Card()), ob, client_for, eid=session.eid) or []:
                printable(d)
    fuzz(check, der_inputs("ListNotificationResponse", lists), der_inputs("RetrieveNotificationsListResponse", pending),
         st.sampled_from([200, 204, 400, 500]), _bodies)


@pytestmark_fuzz
def test_fuzz_apdu_layer(fuzz):
    sws = st.sampled_from([0x9000, 0x9100, 0x6100, 0x6110, 0x61FF, 0x6C00, 0x6C10, 0x6A88, 0x6A82, 0x6985, 0x6700,
                           0x6F00, 0x0000]) | st.integers(0, 0xFFFF)
    rapdu = st.one_of(st.builds(lambda d, sw: d + sw.to_bytes(2, "big"), st.binary(max_size=8), sws),
                      st.binary(max_size=3))

    class Transport:
        quirks: dict = {}

        def __init__(self, answers):
            self.answers = list(answers)

        def transmit(self, apdu, *, timeout=None):
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

        def open_channel(self, aid):
            return 1

        def close_channel(self, ch):
            pass

    def check(answers, payload):
        t = Transport(answers)
        only_agent_errors(Isdr(t, segment_size=16).store_data, payload)
        only_agent_errors(open_channel_raw, Transport(answers).transmit, ISDR_AID)
        only_agent_errors(close_channel_raw, Transport(answers).transmit, 1)
    fuzz(check, st.lists(rapdu, min_size=1, max_size=80), st.sampled_from([H("BF2E00"), bytes(300)]))


_LINES = st.one_of(
    st.sampled_from(["OK", "ERROR", "+CME ERROR: 3", "+CME ERROR: SIM busy", "+CMS ERROR: 500", "RDY",
                     '+CSIM: 4,"9000"', '+CSIM: 6,"019000"', "+CSIM: 4,9000", "9000", '4,"9000"', "+CCHO: 1",
                     "+CME ERROR: " + "9" * 4301, '+CSIM: ' + "9" * 4301 + ',"9000"', "+CGLA: 4,\"6A88\"",
                     "AT+CSIM", "+CEREG: 1,5", "NO CARRIER", '+CSIM: 999,"90"', '+CSIM: 4,"90', "+CSIM:"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.builds(lambda p, d: p + d, st.sampled_from(["+CME ERROR: ", "+CMS ERROR: ", "+CSIM: ", "+CGLA: ", ""]),
              st.text(alphabet="0123456789,\"ABCDEF \u00b2\u0663", max_size=30)))
_ENDINGS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n"])


@st.composite
def _modem_output(draw):
    lines = draw(st.lists(_LINES, max_size=6))
    out = b"".join(draw(_ENDINGS) + line.encode("utf-8") for line in lines) + draw(_ENDINGS)
    if draw(st.booleans()):
        out = draw(mutated([out])) if out else out
    return out


@pytestmark_fuzz
def test_fuzz_at_lines(fuzz):
    def check(chunks, prefix, bare, final):
        sp = LineSplitter(max_line=8192)
        coll = Collector("AT+CSIM=10,\"00A4040000\"", prefix, bare)
        for ch in chunks:
            for line in sp.feed(ch):
                if coll.add(line):
                    if coll.reply.final != "OK":
                        check_error(error_from_final(coll.command, coll.reply.final))
                    break
        for v in coll.reply.lines + coll.reply.bare:
            only_agent_errors(parse_len_hex, v, "+CSIM")
        check_error(error_from_final("AT+CSIM", final))
        only_agent_errors(parse_len_hex, final, "+CSIM")
    fuzz(check, st.lists(_modem_output(), max_size=4), st.sampled_from([None, "+CSIM:", "+CGLA:"]),
         st.sampled_from([None, "hex", "text"]), _LINES)


@pytestmark_fuzz
def test_fuzz_fake_serial_port(fuzz, fast_at):
    """AtPort + CsimTransport in front of a modem that answers each command with fuzzed output
    (then, once that runs out, with OK so time-outs and resynchronisation stay short)."""
    def check(outputs, start):
        queue = list(outputs)

        def respond(cmd):
            if queue:
                return queue.pop(0)
            return b"\r\nOK\r\n" if cmd == b"AT\r" else b""
        port = FakePort(respond, fast_at, timeout=0.005)
        t = CsimTransport(port, quirks=quirks_mod.effective(), timeout=0.005)
        try:
            if start:
                only_agent_errors(port.start)
            only_agent_errors(t.transmit, H("80E2910003BF2E00"))
            only_agent_errors(t.open_channel, ISDR_AID)
            info = only_agent_errors(t.modem_info)
            if info is not None:
                printable(info)
        finally:
            t.close()
    fuzz(check, st.lists(_modem_output(), max_size=8), st.booleans(), examples=FAST_EXAMPLES // 4)


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                          st.text(max_size=12))
_json_values = st.recursive(_json_scalars, lambda kids: st.lists(kids, max_size=3)
                            | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)
_statuses = st.sampled_from(["Executed-Success", "Executed-WithWarning", "Failed", "Expired", ""]) | _json_values
_scd = st.one_of(_json_values, st.fixed_dictionaries({}, optional={
    "subjectCode": st.sampled_from(["8.1.1", "8.2.7", "8.10.1", "1.2.1"]) | _json_values,
    "reasonCode": st.sampled_from(["3.8", "2.2", "6.4", "3.9"]) | _json_values,
    "message": _json_values, "subjectIdentifier": _json_values}))
_header = st.fixed_dictionaries({"functionExecutionStatus": st.fixed_dictionaries(
    {"status": _statuses}, optional={"statusCodeData": _scd}) | _json_values})
_blobs = st.one_of(_json_values, st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()),
                   tlv_trees([b"\x30", b"\x80", b"\x04", b"\x5f\x37", b"\xbf\x25", b"\xbf\x36"],
                             [b"\x30", b"\x5f\x37", b"\x04", b"\xbf\x25", b"\xbf\x36"])
                   .map(lambda b: base64.b64encode(b).decode()),
                   st.sampled_from(["", "!!!", "AAAA\n", "MAA="]))
_objects = st.fixed_dictionaries({"header": _header | _json_values}, optional={
    "transactionId": st.sampled_from([TXID, TXID.lower(), "00", "", "X" * 33]) | _json_values,
    **{f: _blobs for f in ("serverSigned1", "serverSignature1", "euiccCiPKIdToBeUsed", "serverCertificate",
                           "profileMetadata", "smdpSigned2", "smdpSignature2", "smdpCertificate",
                           "boundProfilePackage")}})
_bodies = st.one_of(_objects.map(lambda o: json.dumps(o).encode()), st.binary(max_size=40),
                    _json_values.map(lambda o: json.dumps(o).encode()),
                    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                    st.integers(1, 3000).map(lambda n: b'{"header":' * n + b"0" + b"}" * n),
                    st.sampled_from([b"", b"\xff\xfe", b"1" * 5000, b'{"header": 1e999}']))


@pytestmark_fuzz
def test_fuzz_es9p_client(fuzz):
    calls = {
        "initiateAuthentication": lambda c: c.initiate_authentication(b"\x01" * 16, H("BF2003820102"),
                                                                      "smdp.example.com"),
        "authenticateClient": lambda c: c.authenticate_client(TXID, H("BF3800")),
        "getBoundProfilePackage": lambda c: c.get_bound_profile_package(TXID, H("BF2100")),
        "handleNotification": lambda c: c.handle_notification(H("BF3700")),
        "cancelSession": lambda c: c.cancel_session(TXID, H("BF4100")),
    }

    def check(function, status, body):
        c = _client()
        c._post = lambda f, req: (status, body)
        printable(only_agent_errors(calls[function], c))
        for w in c.warnings:
            assert isinstance(w, str)
    fuzz(check, st.sampled_from(sorted(calls)), st.sampled_from([200, 204, 400, 404, 500]) | st.integers(100, 599),
         _bodies)


@pytestmark_fuzz
def test_fuzz_daemon_request_bodies(fuzz):
    from agent.daemon.server import HttpError, _json_body

    def check(body):
        try:
            assert isinstance(_json_body(body), dict)
        except HttpError as e:
            assert e.status == 400 and errors.exit_code_for(e.code) is not None
    fuzz(check, _bodies)


@pytestmark_fuzz
def test_fuzz_bpp_split(fuzz, session):
    tags = [b"\xbf\x36", b"\xbf\x23", b"\xa0", b"\xa1", b"\xa2", b"\xa3", b"\x86", b"\x87", b"\x88", b"\x82"]

    def check(bpp):
        cmds = only_agent_errors(split_bpp, bpp)
        if cmds is not None:
            assert all(c and c in bpp for c in cmds)
    fuzz(check, st.one_of(mutated([session.bpp]), tlv_trees(tags, [b"\xbf\x36"]), st.binary(max_size=30)))


@pytestmark_fuzz
def test_fuzz_certificates(fuzz, session):
    from agent import tls
    now = _dt.datetime.now(_dt.timezone.utc)
    roots = [crypto.load_cert(session.certs[0])]

    def check(der):
        cert = only_agent_errors(crypto.load_cert, der)
        if cert is not None:
            for fn in (crypto.ski, crypto.aki, crypto.roles, crypto.smdp_oid, crypto.eid_of, crypto.is_ca):
                only_agent_errors(fn, cert)
            only_agent_errors(crypto.check_validity, cert, now)
            only_agent_errors(crypto.verify_chain, cert, [], roots, role=None, now=now)
        trust = tls.Trust(tuple(roots), "test", ("2.23.146.1.2.1.3",), False, lambda: now)
        only_agent_errors(trust.check_peer, der, "smdp.example.com")
    fuzz(check, st.one_of(mutated(session.certs), der_inputs("Certificate", session.certs[:1])))


_CONFIG_VALUES = st.one_of(
    _json_scalars.filter(lambda v: v is not None),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20),
    st.sampled_from(["\u00b2", "9" * 4301, "/" + "a/" * 2100, "/" + "a" * 256, "a\0b", "auto", "none", "0", "261",
                     10 ** 400, -10 ** 400, 2 ** 64, 1e308, -0.0]),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.sampled_from(["max_apdu", "max-apdu", "no_prefix", "max_get_response", "x"]),
                    st.one_of(st.booleans(), st.integers(), st.text(max_size=6),
                              st.sampled_from(["\u00b2", "9" * 4301, "auto"])), max_size=3))


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"


@pytestmark_fuzz
def test_fuzz_config_loader(fuzz, tmp_path):
    keys = st.sampled_from(sorted(config_check.KEYS) + ["unknown_key"])
    docs = st.lists(st.tuples(keys, _CONFIG_VALUES), max_size=5).map(
        lambda kv: "".join(f"{k} = {_toml(v)}\n" for k, v in dict(kv).items()))
    raw = st.one_of(st.text(max_size=200), st.sampled_from(["[quirks]\nmax_apdu = " + "9" * 4301 + "\n",
                                                             "timeout = 1e999\n", "[quirks\n", "a = \"\\uD800\"\n"]))

    def check(text):
        cfg = only_agent_errors(_load_config, tmp_path, text)
        if cfg is not None:
            printable(cfg)
            only_agent_errors(quirks_mod.normalise, cfg.quirks)
    fuzz(check, st.one_of(docs, raw))
