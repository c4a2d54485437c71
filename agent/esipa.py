"""ESipa messages (SGP.32 §6): the bodies between the IPA and the eIM, in both bindings.

I/O-free, shared by the IPA (agent side) and the local eIM (test bed):

* ASN.1 binding (§6.5): the body is the untagged CHOICE EsipaMessageFromIpaToEim /
  EsipaMessageFromEimToIpa, i.e. directly one BF39/BF3B/BF3A/BF41/BF3D/BF4E/BF4F/BF50
  TLV; ``POST /gsma/rsp2/asn1``, Content-Type ``application/x-gsma-rsp-asn1``.
* JSON binding (§6.4): ``POST /gsma/rsp2/esipa/<function>`` with a JSON object whose
  members are the ASN.1 components of the message; structures are standard base64 of
  their DER (as in ES9+, docs/protocol.md §3.2), transaction ids hex, the EID its 32
  digits, integers and strings as themselves, a NULL flag ``true``.

``version`` is "1.2" (default) or "1.0": v1.0 eIMs differ on the wire in GetEimPackage
(rPLMN tag, no stateChangeCause), ProvideEimPackageResult (a bare CHOICE without the
EID, BF2B notifications, an INTEGER error), its response, IpaEuiccData and
HandleNotification (docs/protocol.md §7).  The v1.0 wire forms are the ``…V10`` types
of asn1/sgp32v10.asn; a v1.0 body read as v1.2 would misdecode silently, so the
version is always chosen by configuration, never guessed.
"""
from __future__ import annotations

import base64
import binascii

from . import codec
from .errors import ProtocolError
from .ids import eid_from_bytes, eid_to_bytes

VERSIONS = ("1.2", "1.0")
BINDINGS = ("asn1", "json")
ASN1_PATH = "/gsma/rsp2/asn1"
ASN1_CONTENT_TYPE = "application/x-gsma-rsp-asn1"
JSON_PATH_PREFIX = "/gsma/rsp2/esipa/"

# EsipaMessageFromIpaToEim alternative -> JSON binding function name (§6.4)
FUNCTIONS = {
    "initiateAuthenticationRequestEsipa": "initiateAuthentication",
    "authenticateClientRequestEsipa": "authenticateClient",
    "getBoundProfilePackageRequestEsipa": "getBoundProfilePackage",
    "cancelSessionRequestEsipa": "cancelSession",
    "handleNotificationEsipa": "handleNotification",
    "transferEimPackageResponse": "transferEimPackage",
    "getEimPackageRequest": "getEimPackage",
    "provideEimPackageResult": "provideEimPackageResult",
}
REQUEST_FOR = {v: k for k, v in FUNCTIONS.items()}
# the eIM's answer to each request
RESPONSE_FOR = {
    "initiateAuthenticationRequestEsipa": "initiateAuthenticationResponseEsipa",
    "authenticateClientRequestEsipa": "authenticateClientResponseEsipa",
    "getBoundProfilePackageRequestEsipa": "getBoundProfilePackageResponseEsipa",
    "cancelSessionRequestEsipa": "cancelSessionResponseEsipa",
    "getEimPackageRequest": "getEimPackageResponse",
    "provideEimPackageResult": "provideEimPackageResultResponse",
}

# GetEimPackageResponse eimPackageError / ProvideEimPackageResultResponse error values
NO_EIM_PACKAGE_AVAILABLE = 1
EID_NOT_FOUND = 2
INVALID_EID = 3
MISSING_EID = 4
UNDEFINED_ERROR = 127


def _check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ProtocolError(f"ESipa version {version!r} is not one of {', '.join(VERSIONS)}",
                            code="esipa_version")
    return version


def _v10(version: str) -> bool:
    return _check_version(version) == "1.0"


def _bad(what: str, why: str) -> ProtocolError:
    return ProtocolError(f"ESipa {what}: {why}", code="bad_esipa_message")


# --- ASN.1 binding -----------------------------------------------------------------

def _msg_type(to_eim: bool, version: str) -> str:
    base = "EsipaMessageFromIpaToEim" if to_eim else "EsipaMessageFromEimToIpa"
    return base + ("V10" if _v10(version) else "")


def encode_request(name: str, value, *, version: str = "1.2") -> bytes:
    """IPA -> eIM message (an EsipaMessageFromIpaToEim alternative) as DER."""
    return codec.encode(_msg_type(True, version), (name, value))


def decode_request(data: bytes, *, version: str = "1.2") -> tuple[str, object]:
    return codec.decode(_msg_type(True, version), data)


def encode_response(name: str, value, *, version: str = "1.2") -> bytes:
    """eIM -> IPA message (an EsipaMessageFromEimToIpa alternative) as DER."""
    return codec.encode(_msg_type(False, version), (name, value))


def decode_response(data: bytes, *, version: str = "1.2") -> tuple[str, object]:
    return codec.decode(_msg_type(False, version), data)


# --- JSON binding ------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(what: str, s) -> bytes:
    if not isinstance(s, str):
        raise _bad(what, "expected a base64 string")
    try:
        return base64.b64decode(s.replace("\n", "").replace("\r", ""), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(what, "not valid base64") from None


def _unhex(what: str, s) -> bytes:
    if not isinstance(s, str):
        raise _bad(what, "expected a hex string")
    try:
        return bytes.fromhex(s)
    except ValueError:
        raise _bad(what, "not valid hex") from None


def _int(what: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _bad(what, "expected an integer")
    return v


def _eid(what: str, v) -> bytes:
    if not isinstance(v, str) or len(v) != 32 or not v.isdigit():
        raise _bad(what, "expected the EID's 32 digits")
    return eid_to_bytes(v)


def _strip_tag(der: bytes) -> bytes:
    """Content of a single TLV (for the v1.0 CHOICE bodies carried without their BF50)."""
    from . import tlv
    return tlv.parse_single(der).value


def _component_types(version: str) -> dict[str, str]:
    v10 = _v10(version)
    return {
        "euiccPackageRequest": "EuiccPackageRequest",
        "ipaEuiccDataRequest": "IpaEuiccDataRequestV10" if v10 else "IpaEuiccDataRequest",
        "profileDownloadTriggerRequest": "ProfileDownloadTriggerRequest",
    }


def request_to_json(name: str, value, *, version: str = "1.2") -> tuple[str, dict]:
    """(path, body) of an IPA -> eIM message in the JSON binding."""
    function = FUNCTIONS.get(name)
    if function is None:
        raise _bad("request", f"unknown message {name!r}")
    body: dict = {}
    if name == "getEimPackageRequest":
        body["eidValue"] = eid_from_bytes(value["eidValue"])
        if "notifyStateChange" in value:
            body["notifyStateChange"] = True
        if "stateChangeCause" in value and not _v10(version):
            body["stateChangeCause"] = value["stateChangeCause"]
        if "rPLMN" in value:
            body["rPLMN"] = value["rPLMN"].hex().upper()
    elif name == "provideEimPackageResult":
        der = encode_request(name, value, version=version)
        if _v10(version):
            body["eimPackageResult"] = _b64(_strip_tag(der))
        else:
            if "eidValue" in value:
                body["eidValue"] = eid_from_bytes(value["eidValue"])
            body["eimPackageResult"] = _b64(codec.encode("EimPackageResult", value["eimPackageResult"]))
    else:
        # the remaining functions carry one structure each: the whole message, base64
        body["message"] = _b64(encode_request(name, value, version=version))
    return JSON_PATH_PREFIX + function, body


def request_from_json(function: str, body, *, version: str = "1.2") -> tuple[str, object]:
    name = REQUEST_FOR.get(function)
    if name is None:
        raise _bad("request", f"unknown function {function!r}")
    if not isinstance(body, dict):
        raise _bad(function, "the body is not a JSON object")
    if name == "getEimPackageRequest":
        v: dict = {"eidValue": _eid("eidValue", body.get("eidValue"))}
        if body.get("notifyStateChange"):
            v["notifyStateChange"] = None
        if "stateChangeCause" in body and not _v10(version):
            v["stateChangeCause"] = _int("stateChangeCause", body["stateChangeCause"])
        if "rPLMN" in body:
            plmn = _unhex("rPLMN", body["rPLMN"])
            if len(plmn) != 3:
                raise _bad("rPLMN", "expected 3 bytes")
            v["rPLMN"] = plmn
        return name, v
    if name == "provideEimPackageResult":
        raw = _unb64("eimPackageResult", body.get("eimPackageResult"))
        if _v10(version):
            from . import tlv
            return decode_request(tlv.encode(0xBF50, raw), version=version)
        v = {"eimPackageResult": codec.decode("EimPackageResult", raw)}
        if "eidValue" in body:
            v["eidValue"] = _eid("eidValue", body["eidValue"])
        return name, v
    got, value = decode_request(_unb64("message", body.get("message")), version=version)
    if got != name:
        raise _bad(function, f"the message is a {got}, not a {name}")
    return got, value


def response_to_json(name: str, value, *, version: str = "1.2") -> dict:
    """Body of an eIM -> IPA message in the JSON binding."""
    if name == "getEimPackageResponse":
        alt, v = value
        if alt == "eimPackageError":
            return {"eimPackageError": v}
        return {alt: _b64(codec.encode(_component_types(version)[alt], v))}
    if name == "provideEimPackageResultResponse":
        if _v10(version):
            return {"eimAcknowledgements": list(value["eimAcknowledgements"])} if "eimAcknowledgements" in value else {}
        alt, v = value
        if alt == "eimAcknowledgements":
            return {"eimAcknowledgements": list(v)}
        if alt == "emptyResponse":
            return {}
        return {"provideEimPackageResultError": v}
    return {"message": _b64(encode_response(name, value, version=version))}


def response_from_json(request_name: str, body, *, version: str = "1.2") -> tuple[str, object]:
    """Parse the eIM's JSON answer to ``request_name``."""
    name = RESPONSE_FOR.get(request_name)
    if name is None:
        raise _bad("response", f"{request_name!r} has no response")
    if not isinstance(body, dict):
        raise _bad(name, "the body is not a JSON object")
    if name == "getEimPackageResponse":
        if "eimPackageError" in body:
            return name, ("eimPackageError", _int("eimPackageError", body["eimPackageError"]))
        for alt, type_name in _component_types(version).items():
            if alt in body:
                return name, (alt, codec.decode(type_name, _unb64(alt, body[alt])))
        raise _bad(name, "no package and no error in the answer")
    if name == "provideEimPackageResultResponse":
        acks = body.get("eimAcknowledgements")
        if acks is not None:
            if not isinstance(acks, list):
                raise _bad("eimAcknowledgements", "expected a list of sequence numbers")
            seqs = [_int("eimAcknowledgements", a) for a in acks]
            return name, ({"eimAcknowledgements": seqs} if _v10(version) else ("eimAcknowledgements", seqs))
        if "provideEimPackageResultError" in body and not _v10(version):
            return name, ("provideEimPackageResultError",
                          _int("provideEimPackageResultError", body["provideEimPackageResultError"]))
        return name, ({} if _v10(version) else ("emptyResponse", {}))
    got, value = decode_response(_unb64("message", body.get("message")), version=version)
    if got != name:
        raise _bad(name, f"the message is a {got}")
    return got, value
