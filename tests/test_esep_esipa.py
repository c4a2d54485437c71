"""ESep signatures (agent/esep.py) and ESipa bodies (agent/esipa.py), both bindings and versions."""
from __future__ import annotations

import base64

import pytest

from agent import codec, crypto, esep, esipa, tlv
from agent.errors import AgentError, ProtocolError
from agent.ids import eid_to_bytes, iccid_to_bytes, make_eid

EID = make_eid("890490321234512345123456789012")
ICCID = "8900103254769810321"


@pytest.fixture(scope="module")
def keys():
    return crypto.generate_key(), crypto.generate_key()


def _enable(rollback=True):
    v = {"iccid": iccid_to_bytes(ICCID)}
    if rollback:
        v["rollbackFlag"] = None
    return ("enable", v)


def test_package_request_layout_matches_a_real_trace(keys):
    """docs/protocol.md §7 quotes a field trace: BF51 81 8A 30 45 80 0C <eimId> 5A 10 <EID> 81 01 05
    82 10 <txid> A0 0E A3 0C 5A 0A <iccid> 5F37 40 <sig> — same shape, byte for byte up to the values."""
    eim_key, _ = keys
    der = esep.build_package_request(eim_key, eim_id="eim.example", eid=EID, counter=5,
                                     operations=[_enable(rollback=False)], transaction_id=b"\x11" * 16)
    assert der[:3] == bytes.fromhex("BF5181")
    outer = tlv.parse_single(der)
    signed, sig = tlv.children(outer)
    assert signed.tag == 0x30 and sig.tag == 0x5F37 and len(sig.value) == 64
    fields = tlv.children(signed)
    assert [f.tag for f in fields] == [0x80, 0x5A, 0x81, 0x82, 0xA0]
    assert fields[0].value == b"eim.example" and fields[2].value == b"\x05"
    psmos = tlv.children(fields[4])
    assert psmos[0].raw[:4] == bytes.fromhex("A30C5A0A")


def test_package_signature_covers_the_association_token(keys):
    eim_key, _ = keys
    der = esep.build_package_request(eim_key, eim_id="e", eid=EID, counter=1, operations=[_enable()],
                                     association_token=7)
    req = esep.decode_package_request(der)
    assert req.verify(eim_key.public_key(), 7)
    assert not req.verify(eim_key.public_key(), None)
    assert not req.verify(eim_key.public_key(), 8)
    # the signature is over DER(euiccPackageSigned) || 84 01 07
    assert crypto.verify_raw(eim_key.public_key(), req.signed_der + bytes.fromhex("840107"), req.signature)
    assert req.eid == EID and req.counter == 1 and req.kind == "psmoList"


def test_package_verification_uses_the_received_bytes(keys):
    eim_key, _ = keys
    der = bytearray(esep.build_package_request(eim_key, eim_id="e", eid=EID, counter=1, operations=[_enable()]))
    good = esep.decode_package_request(bytes(der))
    assert good.verify(eim_key.public_key(), None)
    # flip the counter byte: still a valid package, no longer the signed one
    i = bytes(der).index(bytes.fromhex("810101"))
    der[i + 2] = 2
    bad = esep.decode_package_request(bytes(der))
    assert bad.counter == 2 and not bad.verify(eim_key.public_key(), None)


def test_result_signing_input_per_version(keys):
    _, euicc_key = keys
    eim_sig = b"\x01" * 64
    for version in esep.VERSIONS:
        der = esep.sign_result(euicc_key, eim_id="e", counter=3, seq_number=9, results=[("enableResult", 0)],
                               association_token=5, eim_signature=eim_sig, version=version)
        res = esep.decode_package_result(der)
        assert res.ok and res.seq_number == 9 and res.results == [("enableResult", 0)]
        assert res.verify(euicc_key.public_key(), association_token=5, eim_signature=eim_sig, version=version)
        other = "1.0" if version == "1.2" else "1.2"
        assert not res.verify(euicc_key.public_key(), association_token=5, eim_signature=eim_sig, version=other)
    v12 = esep.decode_package_result(esep.sign_result(euicc_key, eim_id="e", counter=3, seq_number=9,
                                                      results=[], association_token=5))
    assert crypto.verify_raw(euicc_key.public_key(), v12.signed_der + bytes.fromhex("840105"), v12.signature)


def test_error_results(keys):
    _, euicc_key = keys
    res = esep.decode_package_result(esep.sign_error(euicc_key, eim_id="e", counter=2, error=esep.REPLAY_ERROR))
    assert res.kind == "euiccPackageErrorSigned" and res.error == 4 and not res.ok
    assert res.verify(euicc_key.public_key(), association_token=None)
    un = esep.decode_package_result(esep.unsigned_error(eim_id="e", transaction_id=b"\x02" * 16, error=127))
    assert un.kind == "euiccPackageErrorUnsigned" and un.error == 127 and un.transaction_id == b"\x02" * 16
    assert not un.verify(euicc_key.public_key(), association_token=None)


@pytest.mark.parametrize("data", [b"", b"\xbf\x51\x00", b"\x30\x00", bytes.fromhex("BF5103800165")])
def test_garbage_packages_are_our_errors(data):
    with pytest.raises(AgentError):
        esep.decode_package_request(data)
    with pytest.raises(AgentError):
        esep.decode_package_result(data)


# --- ESipa ---------------------------------------------------------------------------

def _get_eim_package(version):
    v = {"eidValue": eid_to_bytes(EID), "notifyStateChange": None, "rPLMN": b"\x62\xf2\x10"}
    if version == "1.2":
        v["stateChangeCause"] = 1
    return v


def test_get_eim_package_wire_forms_differ_by_version():
    v12 = esipa.encode_request("getEimPackageRequest", _get_eim_package("1.2"))
    v10 = esipa.encode_request("getEimPackageRequest", _get_eim_package("1.0"), version="1.0")
    eid_tlv = "5A10" + EID
    assert v12.hex().upper() == "BF4F1C" + eid_tlv + "8000" + "810101" + "820362F210"
    assert v10.hex().upper() == "BF4F19" + eid_tlv + "8000" + "810362F210"
    assert esipa.decode_request(v10, version="1.0")[1]["rPLMN"] == b"\x62\xf2\x10"


def test_no_package_answer_is_the_asn1c_confirmed_bytes():
    """docs/protocol.md §7: BF4F 03 02 01 01 for noEimPackageAvailable."""
    for version in esipa.VERSIONS:
        der = esipa.encode_response("getEimPackageResponse", ("eimPackageError", 1), version=version)
        assert der == bytes.fromhex("BF4F03020101")


def _epr(keys):
    _, euicc_key = keys
    return codec.decode("EuiccPackageResult", esep.sign_result(
        euicc_key, eim_id="e", counter=1, seq_number=4, results=[("enableResult", 0)]))


def test_provide_result_v12_carries_the_eid_and_v10_does_not(keys):
    epr = _epr(keys)
    v12 = esipa.encode_request("provideEimPackageResult",
                               {"eidValue": eid_to_bytes(EID), "eimPackageResult": ("euiccPackageResult", epr)})
    v10 = esipa.encode_request("provideEimPackageResult", ("euiccPackageResult", epr), version="1.0")
    assert v12.startswith(bytes.fromhex("BF50")) and bytes.fromhex("5A10") + eid_to_bytes(EID) in v12
    assert v10.startswith(bytes.fromhex("BF50")) and eid_to_bytes(EID) not in v10
    # the EPR travels byte for byte: the same BF51 inside both
    raw = codec.encode("EuiccPackageResult", epr)
    assert raw in v12 and raw in v10


@pytest.mark.parametrize("version", esipa.VERSIONS)
def test_json_binding_round_trips(keys, version):
    eim_key, _ = keys
    req = _get_eim_package(version)
    path, body = esipa.request_to_json("getEimPackageRequest", req, version=version)
    assert path == "/gsma/rsp2/esipa/getEimPackage" and body["eidValue"] == EID
    assert esipa.request_from_json("getEimPackage", body, version=version) == ("getEimPackageRequest", req)

    pkg = codec.decode("EuiccPackageRequest", esep.build_package_request(
        eim_key, eim_id="e", eid=EID, counter=1, operations=[_enable()]))
    answer = ("euiccPackageRequest", pkg)
    j = esipa.response_to_json("getEimPackageResponse", answer, version=version)
    assert base64.b64decode(j["euiccPackageRequest"])[:2] == bytes.fromhex("BF51")
    assert esipa.response_from_json("getEimPackageRequest", j, version=version) == ("getEimPackageResponse", answer)
    none = esipa.response_to_json("getEimPackageResponse", ("eimPackageError", 1), version=version)
    assert none == {"eimPackageError": 1}

    epr = _epr(keys)
    value = ("euiccPackageResult", epr) if version == "1.0" else \
        {"eidValue": eid_to_bytes(EID), "eimPackageResult": ("euiccPackageResult", epr)}
    path, body = esipa.request_to_json("provideEimPackageResult", value, version=version)
    assert esipa.request_from_json("provideEimPackageResult", body, version=version) == \
        ("provideEimPackageResult", value)
    ack = {"eimAcknowledgements": [4]} if version == "1.0" else ("eimAcknowledgements", [4])
    j = esipa.response_to_json("provideEimPackageResultResponse", ack, version=version)
    assert j == {"eimAcknowledgements": [4]}
    assert esipa.response_from_json("provideEimPackageResult", j, version=version)[1] == ack


@pytest.mark.parametrize("function,body", [
    ("getEimPackage", {}),
    ("getEimPackage", {"eidValue": "123"}),
    ("getEimPackage", {"eidValue": EID, "stateChangeCause": "x"}),
    ("getEimPackage", {"eidValue": EID, "rPLMN": "zz"}),
    ("provideEimPackageResult", {"eimPackageResult": "!!"}),
    ("provideEimPackageResult", {"eimPackageResult": base64.b64encode(b"\x30\x00").decode()}),
    ("cancelSession", {"message": 5}),
    ("nope", {}),
    ("getEimPackage", []),
])
def test_json_garbage_is_our_error(function, body):
    with pytest.raises(AgentError):
        esipa.request_from_json(function, body)


def test_unknown_version_is_refused():
    with pytest.raises(ProtocolError) as e:
        esipa.encode_request("getEimPackageRequest", _get_eim_package("1.2"), version="2.0")
    assert e.value.code == "esipa_version"
