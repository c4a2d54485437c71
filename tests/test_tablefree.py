"""What a command does before the ASN.1 tables have loaded (issue #8): the fixed ES10 requests
(es10.FIXED_REQUESTS), the TLV reader of fixed layouts (codec.read_fields: GetEID, EUICCInfo1,
GetEUICCChallenge, serverSigned1) and the TLV-built ctxParams1 (flows/download.py) must be what
the codec encodes and accepts, byte for byte and error for error.

The hex literals marked "reference" are the independent encoders' vectors of
shared/ref/asn1-vectors/sgp22-v2.jsonl (facts copied, so the suite needs nothing outside the
repository)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import codec
from agent.errors import ProtocolError
from agent.es10 import FIXED_REQUESTS, Es10, _key_ids, version_str
from agent.flows.download import ctx_params1, device_info, encode_ctx_params1
from fuzzkit import bounded, examples, mutated

H = bytes.fromhex

#: reference: the independent encoders' DER of each fixed request
REFERENCE_REQUESTS = {
    "GetEuiccDataRequest": "BF3E035C015A",
    "GetEuiccInfo1Request": "BF2000",
    "GetEuiccInfo2Request": "BF2200",
    "GetEuiccChallengeRequest": "BF2E00",
    "EuiccConfiguredAddressesRequest": "BF3C00",
}
REQUEST_VALUES = {"GetEuiccDataRequest": {"tagList": b"\x5A"}}


@pytest.mark.parametrize("name", sorted(FIXED_REQUESTS))
def test_fixed_requests_are_the_codecs_and_the_reference_encoding(name):
    assert FIXED_REQUESTS[name] == codec.encode(name, REQUEST_VALUES.get(name, {}))
    assert FIXED_REQUESTS[name] == H(REFERENCE_REQUESTS[name])


# --------------------------------------------------------------------------- read_fields

#: type -> (outer tag, field tags, the codec's names of those fields), and valid encodings to mutate
LAYOUTS = {
    "GetEuiccDataResponse": (0xBF3E, (0x5A,), ("eidValue",)),
    "GetEuiccChallengeResponse": (0xBF2E, (0x80,), ("euiccChallenge",)),
    "EUICCInfo1": (0xBF20, (0x82, 0xA9, 0xAA), ("svn", "euiccCiPKIdListForVerification", "euiccCiPKIdListForSigning")),
    "ServerSigned1": (0x30, (0x80, 0x81, 0x83, 0x84), ("transactionId", "euiccChallenge", "serverAddress",
                                                       "serverChallenge")),
}
SEEDS = {   # reference vectors, plus one of ours with an unknown trailing component
    "GetEuiccDataResponse": [H("BF3E125A1089049032123451234512345678901235"),
                             H("BF3E155A108904903212345123451234567890123599017F")],
    "GetEuiccChallengeResponse": [H("BF2E128010000102030405060708090A0B0C0D0E0F")],
    "EUICCInfo1": [H("BF20358203020200A916041414D51372EDC22EE577946C6318922BD8C745943CAA16041414D51372EDC22EE5"
                     "77946C6318922BD8C745943C"), H("BF20098203020300A900AA00")],
    "ServerSigned1": [H("304880100123456789ABCDEF0123456789ABCDEF8110000102030405060708090A0B0C0D0E0F831073"
                        "6D64702E6578616D706C652E636F6D8410101112131415161718191A1B1C1D1E1F")],
}


def _as_codec_reads(name: str, values: list[bytes]):
    """read_fields' contents, read further as its callers do (es10's key lists, the download's
    UTF-8 address), in the codec's form."""
    if name == "EUICCInfo1":
        svn, ver, sig = values
        return [svn] + [[H(k) for k in _key_ids(x)] for x in (ver, sig)]
    if name == "ServerSigned1":
        txid, ch, addr, sch = values
        return [txid, ch, addr.decode("utf-8"), sch]
    return values


def _agree(name: str, data: bytes) -> None:
    """Both accept with the same values, or both refuse (with malformed_asn1)."""
    outer, tags, names = LAYOUTS[name]
    try:
        want = [codec.decode(name, data)[n] for n in names]
    except ProtocolError as e:
        assert e.code == "malformed_asn1"
        want = None
    try:
        got = _as_codec_reads(name, codec.read_fields(name, data, outer, tags))
    except ProtocolError as e:
        assert e.code == "malformed_asn1" and name in str(e), e
        got = None
    except UnicodeDecodeError:
        got = None
    assert got == want, (name, data.hex())


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_read_fields_reads_the_reference_vectors_as_the_codec_does(name):
    for seed in SEEDS[name]:
        _agree(name, seed)
        outer, tags, _ = LAYOUTS[name]
        assert len(codec.read_fields(name, seed, outer, tags)) == len(tags)


@pytest.mark.parametrize("bad, why", [
    (b"", "no data"), (H("BF3E"), "missing length"), (H("BF3E035A0101FF"), "trailing"),
    (H("BF2E128110000102030405060708090A0B0C0D0E0F"), "expected the fields 80"),
    (H("BF2F128010000102030405060708090A0B0C0D0E0F"), "tag BF2F, expected BF2E"),
    (H("BF2E00"), "found none"),
])
def test_read_fields_refuses_with_the_codecs_error(bad, why):
    with pytest.raises(ProtocolError) as e:
        codec.read_fields("GetEuiccChallengeResponse", bad, 0xBF2E, (0x80,))
    assert e.value.code == "malformed_asn1" and why in str(e.value)
    with pytest.raises(ProtocolError) as e:
        codec.decode("GetEuiccChallengeResponse", bad)
    assert e.value.code == "malformed_asn1"


def test_read_fields_agrees_with_the_codec_on_mutations(request):
    seeds = [(n, s) for n in SEEDS for s in SEEDS[n]]

    def check(pick, data):
        name = seeds[pick][0]
        bounded(_agree, name, data)

    inputs = st.integers(0, len(seeds) - 1).flatmap(
        lambda i: st.tuples(st.just(i), mutated([seeds[i][1]], most=4) | st.binary(max_size=80)))
    n = examples(request.config, 300)
    settings(max_examples=n, deadline=None, derandomize=n == 300, database=None,
             suppress_health_check=list(HealthCheck))(given(inputs)(lambda t: check(*t)))()


# --------------------------------------------------------------------------- the ES10 calls

class _Card:
    """Answers each request with a fixed response; records what it was sent."""

    def __init__(self, answers):
        self.answers, self.sent = answers, []

    def es10(self, payload, *, timeout=None, what=""):
        self.sent.append(payload)
        return self.answers[payload[:2]]


def test_first_calls_read_without_the_codec_what_the_codec_reads():
    eid, ch, info1 = SEEDS["GetEuiccDataResponse"][0], SEEDS["GetEuiccChallengeResponse"][0], SEEDS["EUICCInfo1"][0]
    card = _Card({H("BF3E"): eid, H("BF2E"): ch, H("BF20"): info1})
    es10 = Es10(card)
    assert es10.get_eid() == codec.decode("GetEuiccDataResponse", eid)["eidValue"].hex().upper()
    assert es10.get_euicc_challenge() == codec.decode("GetEuiccChallengeResponse", ch)["euiccChallenge"]
    got, v = es10.get_euicc_info1(), codec.decode("EUICCInfo1", info1)
    assert got.svn == version_str(v["svn"]) and got.raw == info1
    assert got.ci_pkids_for_verification == [k.hex().upper() for k in v["euiccCiPKIdListForVerification"]]
    assert got.ci_pkids_for_signing == [k.hex().upper() for k in v["euiccCiPKIdListForSigning"]]
    assert card.sent == [FIXED_REQUESTS["GetEuiccDataRequest"], FIXED_REQUESTS["GetEuiccChallengeRequest"],
                         FIXED_REQUESTS["GetEuiccInfo1Request"]]


@pytest.mark.parametrize("bad", [H("BF200B8203020300A9020500AA00"),          # a NULL among the key IDs
                                 H("BF200F8203020300A9069F8481828300AA00")])  # a 5-byte tag there
def test_euicc_info1_with_a_foreign_tag_in_a_key_list_is_malformed(bad):
    with pytest.raises(ProtocolError) as e:
        Es10(_Card({H("BF20"): bad})).get_euicc_info1()
    assert e.value.code == "malformed_asn1"
    with pytest.raises(ProtocolError):
        codec.decode("EUICCInfo1", bad)


@pytest.mark.parametrize("answer", [b"", H("9000")])
def test_an_empty_or_foreign_answer_is_refused(answer):
    with pytest.raises(ProtocolError) as e:
        Es10(_Card({H("BF3E"): answer})).get_eid()
    assert e.value.code in ("empty_response", "malformed_asn1")


# --------------------------------------------------------------------------- ctxParams1

def test_ctx_params1_is_the_reference_encoding():
    """reference: AuthenticateServerRequest's ctxParams1 (matchingId ABC-123, TAC 35290611, no
    capabilities) from the independent encoder."""
    info = {"tac": H("35290611"), "deviceCapabilities": {}}
    assert encode_ctx_params1("ABC-123", info) == H("A01380074142432D313233A108800435290611A100")


@given(st.one_of(st.none(), st.text(max_size=40)),
       st.one_of(st.none(), st.sampled_from(["358011516200883", "490154203237518", "356938035643809"])))
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
def test_ctx_params1_is_the_codecs_encoding(matching_id, imei):
    v: dict = {"deviceInfo": device_info(imei)}
    if matching_id is not None:
        v["matchingId"] = matching_id
    assert ctx_params1(matching_id, imei) == codec.encode("CtxParams1", ("ctxParamsForCommonAuthentication", v))
