"""SGP.32 (IoT) additions to ES10b (SGP.32 §5.9; docs/protocol.md §7): the eIM
configuration, eUICC packages, rollback, fallback, immediate enable, GetCerts, the SGP.32
notification criteria and EUICCInfo2/ProfileInfo fields.

Apart from es10.py because an SGP.22 command never uses them: a CLI process that keeps no
bytecode compiles what it imports on every run (issue #8). ``Es10``'s methods of the same
names call these, importing this module on first use.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import codec, tlv
from .errors import ProtocolError
from .es10 import (ADD_INITIAL_EIM_ERRORS, CONFIGURE_IMMEDIATE_RESULTS, FALLBACK_RESULTS, GET_CERTS_ERRORS,
                   IMMEDIATE_ENABLE_RESULTS, PROFILE_INFO_ERRORS, RETURN_FROM_FALLBACK_RESULTS, Es10, Es10Error,
                   _check, bits_set, search_criteria, version_str)
from .es10_types import ProfileInfo, profile_from_asn1

EIM_ID_TYPES = {1: "oid", 2: "fqdn", 3: "proprietary"}
EIM_PROTOCOLS = {0: "eimRetrieveHttps", 1: "eimRetrieveCoaps", 2: "eimInjectHttps", 3: "eimInjectCoaps",
                 4: "eimProprietary"}
IPA_MODES = {0: "ipad", 1: "ipae"}


@dataclass
class EimConfig:
    """One EimConfigurationData entry (SGP.32 §2.11.1.1.1), as the eUICC holds it.

    ``public_key`` / ``tls_trust`` are (alternative, DER): ("eimCertificate", certificate DER) or
    ("eimPublicKey", SubjectPublicKeyInfo DER), resp. trustedCertificateTls / trustedEimPkTls."""
    eim_id: str
    fqdn: str | None = None
    id_type: str | None = None
    counter: int | None = None
    association_token: int | None = None
    public_key: tuple[str, bytes] | None = field(default=None, repr=False)
    tls_trust: tuple[str, bytes] | None = field(default=None, repr=False)
    supported_protocols: list[str] = field(default_factory=list)
    ci_pkid: str | None = None
    indirect_download: bool = False
    raw: bytes = field(repr=False, default=b"")

    def to_json(self) -> dict:
        return {"eim_id": self.eim_id, "fqdn": self.fqdn, "id_type": self.id_type, "counter": self.counter,
                "association_token": self.association_token,
                "public_key": self.public_key[0] if self.public_key else None,
                "tls_trust": self.tls_trust[0] if self.tls_trust else None,
                "supported_protocols": self.supported_protocols, "ci_pkid": self.ci_pkid,
                "indirect_download": self.indirect_download}


_PK_ALTS = {0xA0: "eimPublicKey", 0xA1: "eimCertificate"}
_TLS_ALTS = {0xA0: "trustedEimPkTls", 0xA1: "trustedCertificateTls"}


def eim_config_from_der(der: bytes) -> EimConfig:
    """Parse one EimConfigurationData (30 …); the key/certificate DER is cut out of the bytes
    as received (a certificate is never re-encoded)."""
    v = codec.decode("EimConfigurationData", der)
    kids = tlv.children(tlv.parse_single(der))

    def alt(tag: int, names: dict) -> tuple[str, bytes] | None:
        box = tlv.find(kids, tag)
        if box is None:
            return None
        inner = tlv.children(box)
        if len(inner) != 1 or inner[0].tag not in names:
            raise ProtocolError(f"EimConfigurationData: component {tag:X} is not one key or certificate",
                                code="malformed_asn1")
        # the [0]/[1] of the inner CHOICE is implicit: the SEQUENCE tag 30 comes back
        return names[inner[0].tag], tlv.encode(0x30, inner[0].value)

    return EimConfig(
        eim_id=v["eimId"], fqdn=v.get("eimFqdn"),
        id_type=EIM_ID_TYPES.get(v["eimIdType"], str(v["eimIdType"])) if "eimIdType" in v else None,
        counter=v.get("counterValue"), association_token=v.get("associationToken"),
        public_key=alt(0xA5, _PK_ALTS), tls_trust=alt(0xA6, _TLS_ALTS),
        supported_protocols=[EIM_PROTOCOLS.get(i, f"bit{i}") for i in bits_set(v.get("eimSupportedProtocol"))],
        ci_pkid=v["euiccCiPKId"].hex().upper() if v.get("euiccCiPKId") is not None else None,
        indirect_download="indirectProfileDownload" in v, raw=der)


@dataclass
class AddInitialEimResult:
    """AddInitialEim's answer, one entry per eIM: its associationToken, or None (addOk)."""
    association_tokens: list[int | None]

    def to_json(self) -> dict:
        return {"association_tokens": self.association_tokens}


@dataclass
class IotInfo:
    """The SGP.32 part of EUICCInfo2 (SGP.32 §5.9.2): what tells an IoT eUICC."""
    ipa_mode: str | None
    iot_versions: list[str]
    ecall_supported: bool
    fallback_supported: bool

    @property
    def is_iot(self) -> bool:
        return self.ipa_mode is not None or bool(self.iot_versions)

    def to_json(self) -> dict:
        return {**asdict(self), "is_iot": self.is_iot}


@dataclass
class IotProfileInfo(ProfileInfo):
    """ProfileInfo plus the SGP.32 fallback attributes (9F26, 9F67)."""
    fallback_attribute: bool = False
    fallback_allowed: bool | None = None


def _pkg_result_tlv(raw: bytes, what: str) -> bytes:
    """Check that ``raw`` is one BF51 EuiccPackageResult (validated by decoding) and return it."""
    if not raw:
        raise ProtocolError(f"{what}: the eUICC returned no data (expected an EuiccPackageResult)",
                            code="empty_response")
    try:
        codec.decode("EuiccPackageResult", raw)
    except ProtocolError as e:
        raise ProtocolError(f"{what}: the eUICC's answer is not an EuiccPackageResult: {e.message}",
                            code="bad_euicc_package_result") from None
    return raw


# --- the functions (Es10's methods of the same names call them) -------------------------

# §5.9.1 LoadEuiccPackage: the eIM's BF51 goes to the card unchanged; its BF51 result comes back
# byte for byte (it is signed by the eUICC and relayed to the eIM, docs/protocol.md §0.6).


def load_euicc_package(es10: Es10, package_der: bytes) -> bytes:
    raw = es10.call_raw(bytes(package_der), what="LoadEuiccPackage", timeout=es10.long_timeout)
    return _pkg_result_tlv(raw, "LoadEuiccPackage")


# §5.9.4 AddInitialEim (unsigned; only while no eIM is associated)


def add_initial_eim(es10: Es10, configs) -> AddInitialEimResult:
    if isinstance(configs, (bytes, bytearray)):
        configs = [bytes(configs)]
    for c in configs:
        eim_config_from_der(c)          # each must be one EimConfigurationData
    req = tlv.encode(0xBF57, tlv.encode(0xA0, b"".join(bytes(c) for c in configs)))
    resp = es10.answer(req, "AddInitialEim", "AddInitialEimResponse", timeout=es10.long_timeout)
    kind, v = codec.decode("AddInitialEimResponse", resp)
    if kind != "addInitialEimOk":
        _check("AddInitialEim", ADD_INITIAL_EIM_ERRORS, v)
        raise Es10Error("AddInitialEim", "undefinedError", v)
    return AddInitialEimResult([val if alt == "associationToken" else None for alt, val in v])


# §5.9.18 GetEimConfigurationData


def get_eim_configuration_data(es10: Es10, eim_id: str | None = None) -> list[EimConfig]:
    req = {"searchCriteria": ("eimId", eim_id)} if eim_id is not None else {}
    resp = es10.answer(codec.encode("GetEimConfigurationDataRequest", req), "GetEimConfigurationData",
                       "GetEimConfigurationDataResponse")
    codec.decode("GetEimConfigurationDataResponse", resp)      # validates the whole structure
    lst = tlv.find(tlv.children(tlv.parse_single(resp)), 0xA0)
    return [eim_config_from_der(t.raw) for t in tlv.children(lst)] if lst is not None else []


# §5.9.16 ProfileRollback -> (cmdResult, the rollback's EuiccPackageResult DER or None)


def profile_rollback(es10: Es10, refresh: bool = True) -> tuple[int, bytes | None]:
    resp = es10.answer(codec.encode("ProfileRollbackRequest", {"refreshFlag": refresh}), "ProfileRollback",
                       "ProfileRollbackResponse", timeout=es10.long_timeout)
    v = codec.decode("ProfileRollbackResponse", resp)
    epr = tlv.find(tlv.children(tlv.parse_single(resp)), 0xBF51)
    return v["cmdResult"], (epr.raw if epr is not None else None)


def _simple(es10: Es10, req_type, resp_type, field_name, function, table, refresh):
    v = es10._call(req_type, {"refreshFlag": refresh}, resp_type, timeout=es10.long_timeout)
    _check(function, table, v[field_name])


# §5.9.20 / §5.9.21 fallback


def execute_fallback_mechanism(es10: Es10, refresh: bool = True) -> None:
    _simple(es10, "ExecuteFallbackMechanismRequest", "ExecuteFallbackMechanismResponse",
            "executeFallbackMechanismResult", "ExecuteFallbackMechanism", FALLBACK_RESULTS, refresh)


def return_from_fallback(es10: Es10, refresh: bool = True) -> None:
    _simple(es10, "ReturnFromFallbackRequest", "ReturnFromFallbackResponse", "returnFromFallbackResult",
            "ReturnFromFallback", RETURN_FROM_FALLBACK_RESULTS, refresh)


# §5.9.15 ImmediateEnable


def immediate_enable(es10: Es10, refresh: bool = True) -> None:
    _simple(es10, "ImmediateEnableRequest", "ImmediateEnableResponse", "immediateEnableResult",
            "ImmediateEnable", IMMEDIATE_ENABLE_RESULTS, refresh)


# §5.9.17 ConfigureImmediateProfileEnabling


def configure_immediate_profile_enabling(es10: Es10, enable: bool, *, smdp_oid: str | None = None,
                                         smdp_address: str | None = None) -> None:
    req: dict = {}
    if enable:
        req["immediateEnableFlag"] = None
    if smdp_oid is not None:
        req["defaultSmdpOid"] = smdp_oid
    if smdp_address is not None:
        req["defaultSmdpAddress"] = smdp_address
    v = es10._call("ConfigureImmediateProfileEnablingRequest", req, "ConfigureImmediateProfileEnablingResponse")
    _check("ConfigureImmediateProfileEnabling", CONFIGURE_IMMEDIATE_RESULTS, v["configImmediateEnableResult"])


# §5.9.10 GetCerts -> (EUM certificate DER, eUICC certificate DER), each a 30 … as signed


def get_certs(es10: Es10, ci_pkid: bytes | None = None) -> tuple[bytes, bytes]:
    req = {"euiccCiPKId": ci_pkid} if ci_pkid is not None else {}
    resp = es10.answer(codec.encode("GetCertsRequest", req), "GetCerts", "GetCertsResponse")
    kind, v = codec.decode("GetCertsResponse", resp)
    if kind != "certs":
        _check("GetCerts", GET_CERTS_ERRORS, v)
        raise Es10Error("GetCerts", "undefinedError", v)
    box = tlv.children(tlv.parse_single(resp))[0]              # A0
    certs = {t.tag: tlv.encode(0x30, t.value) for t in tlv.children(box)}   # A5/A6 are implicit
    return certs[0xA5], certs[0xA6]


# §5.9.11 RetrieveNotificationsList with the SGP.32 criteria: the raw items, byte for byte


def retrieve_sgp32(es10: Es10, *, seq: int | None = None, euicc_package_results: bool = False,
                   operation: str | None = None) -> list[bytes]:
    criteria = ("euiccPackageResults", None) if euicc_package_results else search_criteria(seq, operation)
    return es10.retrieve_raw("SGP32-RetrieveNotificationsListRequest", "SGP32-RetrieveNotificationsListResponse",
                             criteria)


def euicc_package_results(es10: Es10) -> list[bytes]:
    """The EuiccPackageResults the eUICC still holds (BF51 each, as signed)."""
    return [r for r in retrieve_sgp32(es10, euicc_package_results=True)
            if tlv.parse_single(r).tag == 0xBF51]


# SGP.32 §5.9.2: EUICCInfo2 with the IoT fields; None-ish IotInfo for an SGP.22 card


def get_iot_info(es10: Es10) -> IotInfo:
    raw = es10.call_raw(codec.encode("GetEuiccInfo2Request", {}), what="GetEuiccInfo2Request")
    try:
        v = codec.decode("SGP32-EUICCInfo2", raw)
    except ProtocolError:
        return IotInfo(None, [], False, False)
    iot = v.get("iotSpecificInfo") or {}
    return IotInfo(IPA_MODES.get(v["ipaMode"], str(v["ipaMode"])) if "ipaMode" in v else None,
                   [version_str(x) for x in iot.get("iotVersion", [])],
                   "ecallSupported" in iot, "fallbackSupported" in iot)


# GetProfilesInfo decoded as SGP.32 ProfileInfo (fallback attributes)


def get_iot_profiles(es10: Es10) -> list[IotProfileInfo]:
    resp = es10.call_raw(codec.encode("ProfileInfoListRequest", {}), what="ProfileInfoListRequest")
    kind, v = codec.decode("SGP32-ProfileInfoListResponse", resp)
    if kind != "profileInfoListOk":
        raise Es10Error("GetProfilesInfo", PROFILE_INFO_ERRORS.get(v, f"unknownResult{v}"), v)
    out = []
    for p in v:
        base = profile_from_asn1(p)
        out.append(IotProfileInfo(**{k: getattr(base, k) for k in base.__dataclass_fields__},
                                  fallback_attribute=bool(p.get("fallbackAttribute", False)),
                                  fallback_allowed=p.get("fallbackAllowed")))
    return out
