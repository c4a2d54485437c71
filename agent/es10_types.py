"""The eUICC's answers as dataclasses, beyond what a command's first ES10 calls return
(es10.py keeps EuiccInfo1 and ConfiguredAddresses): EUICCInfo2, profiles, notifications, the
RAT, and their readers from the codec's values. es10.py imports this module on first use, and
a command's preload steps while the card answers (agent/preload.py), so that reaching the card
compiles and builds none of it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import codec, tlv
from .errors import ProtocolError
from .es10 import PPR_NAMES, PROFILE_CLASSES, PROFILE_STATES, bits_set, pmo_name, seq_number, version_str
from .ids import iccid_from_bytes


@dataclass
class EuiccInfo2:
    """EUICCInfo2 (SGP.22 §5.7.8), for `chip info`."""
    profile_version: str | None
    svn: str | None
    firmware_version: str | None
    installed_applications: int | None
    free_nvm: int | None
    free_vm: int | None
    uicc_capability: list[int]
    ts102241_version: str | None
    gp_version: str | None
    rsp_capability: list[int]
    ci_pkids_for_verification: list[str]
    ci_pkids_for_signing: list[str]
    euicc_category: str | None
    forbidden_profile_policy_rules: list[str]
    pp_version: str | None
    sas_accreditation_number: str | None
    raw: bytes = field(repr=False, default=b"")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


@dataclass
class ProfileInfo:
    """One profile of ProfileInfoListResponse (SGP.22 §5.7.15)."""
    iccid: str | None
    isdp_aid: str | None
    state: str | None
    nickname: str | None
    service_provider_name: str | None
    profile_name: str | None
    profile_class: str | None
    icon_type: str | None = None
    policy_rules: list[str] = field(default_factory=list)
    owner: dict | None = None
    notification_configuration: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class NotificationInfo:
    """A pending notification's metadata (ListNotification, SGP.22 §5.7.9)."""
    seq_number: int
    operation: str
    address: str
    iccid: str | None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PendingNotification(NotificationInfo):
    """A notification as the eUICC signed it; ``der`` is forwarded byte-exact."""

    der: bytes = field(repr=False, default=b"")

    def to_json(self) -> dict:
        d = NotificationInfo.to_json(self)
        d.pop("der", None)
        return d


@dataclass
class RatRule:
    """One rule of the eUICC's Rules Authorisation Table (GetRAT, SGP.22 §5.7.5)."""
    ppr_ids: list[str]
    allowed_operators: list[dict]
    consent_required: bool

    def to_json(self) -> dict:
        return asdict(self)


def _opt_str(v) -> str | None:
    return v if v is not None else None


def notification_from_metadata(md: dict) -> NotificationInfo:
    return NotificationInfo(
        seq_number=seq_number(md["seqNumber"]),
        operation=pmo_name(md.get("profileManagementOperation")),
        address=md.get("notificationAddress", ""),
        iccid=iccid_from_bytes(md["iccid"]) if md.get("iccid") is not None else None,
    )


def pending_from_der(der: bytes) -> PendingNotification:
    """Parse one PendingNotification (BF37 PIR or 30 OtherSignedNotification)."""
    t = tlv.parse_single(der)
    if t.tag == 0xBF37:
        pir = codec.decode("ProfileInstallationResult", der)
        md = pir["profileInstallationResultData"]["notificationMetadata"]
    elif t.tag == 0x30:
        osn = codec.decode("OtherSignedNotification", der)
        md = osn["tbsOtherNotification"]
    else:
        raise ProtocolError(f"unexpected notification tag {t.tag:X} (want BF37 or 30)", code="malformed_asn1")
    n = notification_from_metadata(md)
    return PendingNotification(n.seq_number, n.operation, n.address, n.iccid, der=der)


def profile_from_asn1(p: dict) -> ProfileInfo:
    owner = p.get("profileOwner")
    return ProfileInfo(
        iccid=iccid_from_bytes(p["iccid"]) if p.get("iccid") is not None else None,
        isdp_aid=p["isdpAid"].hex().upper() if p.get("isdpAid") is not None else None,
        state=PROFILE_STATES.get(p["profileState"], str(p["profileState"])) if "profileState" in p else None,
        nickname=_opt_str(p.get("profileNickname")),
        service_provider_name=_opt_str(p.get("serviceProviderName")),
        profile_name=_opt_str(p.get("profileName")),
        profile_class=PROFILE_CLASSES.get(p["profileClass"], str(p["profileClass"])) if "profileClass" in p else None,
        icon_type={0: "jpg", 1: "png"}.get(p["iconType"]) if "iconType" in p else None,
        policy_rules=[PPR_NAMES.get(i, f"bit{i}") for i in bits_set(p.get("profilePolicyRules"))],
        owner={"mcc_mnc": owner["mccMnc"].hex().upper(),
               **({"gid1": owner["gid1"].hex().upper()} if owner.get("gid1") else {}),
               **({"gid2": owner["gid2"].hex().upper()} if owner.get("gid2") else {})} if owner else None,
        notification_configuration=[{"operation": pmo_name(e["profileManagementOperation"]),
                                     "address": e["notificationAddress"]}
                                    for e in p.get("notificationConfigurationInfo", [])],
    )


def euicc_info2_from_asn1(v: dict, raw: bytes) -> EuiccInfo2:
    ext = v.get("extCardResource") or b""
    res = {}
    try:
        for t in tlv.parse_all(ext):
            if len(t.value) <= 8:   # counts and byte sizes; a longer value is not one (and not printable)
                res[t.tag] = int.from_bytes(t.value, "big")
    except ProtocolError:
        pass
    cat = v.get("euiccCategory")
    return EuiccInfo2(
        profile_version=version_str(v.get("profileVersion")),
        svn=version_str(v.get("svn")),
        firmware_version=version_str(v.get("euiccFirmwareVer")),
        installed_applications=res.get(0x81),
        free_nvm=res.get(0x82),
        free_vm=res.get(0x83),
        uicc_capability=bits_set(v.get("uiccCapability")),
        ts102241_version=version_str(v.get("ts102241Version")),
        gp_version=version_str(v.get("globalplatformVersion")),
        rsp_capability=bits_set(v.get("rspCapability")),
        ci_pkids_for_verification=[k.hex().upper() for k in v.get("euiccCiPKIdListForVerification", [])],
        ci_pkids_for_signing=[k.hex().upper() for k in v.get("euiccCiPKIdListForSigning", [])],
        euicc_category={0: "other", 1: "basicEuicc", 2: "mediumEuicc", 3: "contactlessEuicc"}.get(cat, cat)
        if cat is not None else None,
        forbidden_profile_policy_rules=[PPR_NAMES.get(i, f"bit{i}") for i in bits_set(v.get("forbiddenProfilePolicyRules"))],
        pp_version=version_str(v.get("ppVersion")),
        sas_accreditation_number=v.get("sasAcreditationNumber"),
        raw=raw,
    )
