"""The simulated eUICC's ISD-R: ES10a/b/c functions (SGP.22 §5.7, docs/protocol.md §2, §4, §6, §8).

``Isdr.handle(request) -> response`` takes one reassembled ES10 command (a DER
TLV, or one LoadBoundProfilePackage segment) and returns the response data.
Card-level refusals (malformed TLV, unknown function, out-of-sequence BPP
segment) raise ``SwError`` carrying the ISO status word; function-level errors
are SGP.22 response values with ``90 00`` (docs/protocol.md §1.3, §2.3).

Requests are decoded and plain responses encoded with ``agent.codec``.  Signed
structures are assembled from raw TLVs because the signature covers exact
bytes and some parts must be copied verbatim (docs/protocol.md §0.6, §4.3): euiccSigned1
carries ctxParams1 exactly as received, euiccSignature2 covers the received
smdpSignature2 TLV, and every 5F37 is the plain r||s form.

State rules (docs/protocol.md §8.1): at most one enabled profile; enabling B disables
A; only a disabled profile can be deleted; PPR1 forbids disabling and PPR2
deleting (disallowedByPolicy).  Enable, disable and delete produce signed
notifications to each address the profile's notificationConfigurationInfo
lists for that event; every LoadBoundProfilePackage ends in a signed
ProfileInstallationResult that is also kept as the install notification
(docs/protocol.md §6.1).

An IoT card (``state.iot``, SGP.32 v1.2) adds the ES10b functions of ``iot.IotFunctions``
and reports itself the SGP.32 way (SGP32-EUICCInfo2 with ipaMode ipad, ProfileInfo with
the fallback attribute, FCI template E1); everything an SGP.22 LPA uses keeps working.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .. import tlv
from ..errors import AgentError
from ..es10 import bits_set, make_bits
from ..ids import eid_to_bytes, iccid_from_bytes, iccid_to_bytes
from .state import EPR_OPERATION, PROFILE_DISABLED, PROFILE_ENABLED, CardState, Notification, Profile

ISDR_AID = bytes.fromhex("A0000005591010FFFFFFFF8900000100")

# --- what this card reports (EUICCInfo1/2, FCI) ---------------------------------
SVN = bytes([2, 2, 2])                 # SGP.22 v2.2.2
PROFILE_VERSION = bytes([2, 3, 1])     # SIMalliance/TCA eUICC Profile Package v2.3.1
FIRMWARE_VERSION = bytes([1, 4, 0])
TS102241_VERSION = bytes([9, 2, 0])
GP_VERSION = bytes([2, 3, 0])
PP_VERSION = bytes([1, 0, 0])          # protection profile (SGP.25) version
SAS_ACCREDITATION = "ESIM-AGENT-SIM-SAS-01"
EUICC_CATEGORY_MEDIUM = 2
FREE_VM = 32 * 1024
# uiccCapability: usimSupport(1), isimSupport(2), akaMilenage(4), akaTuak128(6),
# gbaAuthenUsim(10), javacard(14), multipleUsimSupport(16)
UICC_CAPABILITY_BITS = (1, 2, 4, 6, 10, 14, 16)
# rspCapability: additionalProfile(0), testProfileSupport(3); no CRL support (LoadCRL refuses)
RSP_CAPABILITY_BITS = (0, 3)
#: bytes of NVM an ISD-P costs beyond its profile package
PROFILE_OVERHEAD = 2048
#: One EUICCResponse saying "ok", as quoted with SGP.32's compact PIR (docs/protocol.md §1.7)
SIMA_RESPONSE_OK = bytes.fromhex("30 07 A0 05 30 03 80 01 00")

# NotificationEvent / PMO bits (docs/protocol.md §6.2)
PMO_BITS = {"install": 0, "enable": 1, "disable": 2, "delete": 3}
PMO_NAMES = {v: k for k, v in PMO_BITS.items()}
PPR1, PPR2 = 1, 2

# BPP segment leading tags handled by the LoadBoundProfilePackage state machine (docs/protocol.md §1.6)
BPP_TAGS = (0xBF36, 0xA0, 0xA1, 0xA2, 0xA3, 0x86, 0x87, 0x88)

# ProfileInfo tags -> ASN.1 field names (docs/protocol.md §8.1)
PROFILE_INFO_TAGS = {
    0x5A: "iccid", 0x4F: "isdpAid", 0x9F70: "profileState", 0x90: "profileNickname",
    0x91: "serviceProviderName", 0x92: "profileName", 0x93: "iconType", 0x94: "icon",
    0x95: "profileClass", 0xB6: "notificationConfigurationInfo", 0xB7: "profileOwner",
    0xB8: "dpProprietaryData", 0x99: "profilePolicyRules",
    0x9F26: "fallbackAttribute", 0x9F67: "fallbackAllowed",     # SGP32-ProfileInfo (IoT cards only)
}

# AuthenticateServer / PrepareDownload error codes (docs/protocol.md §4.3)
AUTH_INVALID_CERTIFICATE = 1
AUTH_INVALID_SIGNATURE = 2
AUTH_UNSUPPORTED_CURVE = 3
AUTH_NO_SESSION_CONTEXT = 4
AUTH_INVALID_OID = 5
AUTH_CHALLENGE_MISMATCH = 6
AUTH_CI_PK_UNKNOWN = 7
DL_INVALID_TRANSACTION_ID = 5
UNDEFINED_ERROR = 127


class SwError(Exception):
    """A card-level refusal: the APDU ends with this status word and no data."""

    def __init__(self, sw: int, message: str = ""):
        super().__init__(message or f"SW {sw:04X}")
        self.sw = sw


# --- small helpers ------------------------------------------------------------------

def _lenient_refresh_flag(req: bytes) -> bytes:
    """Accept refreshFlag as a universal BOOLEAN (tag 01) as well as [1] (tag 81).

    openpilot's LPA sends BF31{A0{5A ..} 01 01 xx} and real eUICCs accept it
    (openpilot PR#37779: 15/15 switches on two modems); be as tolerant."""
    try:
        outer = tlv.parse_single(req)
        kids = tlv.children(outer)
    except Exception:
        return req                 # let the strict decoder name the problem
    if not any(k.tag == 0x01 for k in kids):
        return req
    body = b"".join(tlv.encode(0x81, k.value) if k.tag == 0x01 else k.raw for k in kids)
    return tlv.encode(outer.tag, body)


def _uint_bytes(n: int) -> bytes:
    """Content octets of a non-negative DER INTEGER (extCardResource values)."""
    return n.to_bytes(n.bit_length() // 8 + 1, "big")


def _codec():
    # imported on first use: the codec compiles the ASN.1 modules
    from .. import codec
    return codec


def _crypto():
    from .. import crypto
    return crypto


@dataclass
class DownloadSession:
    """RSP session state between AuthenticateServer and the end of LoadBoundProfilePackage
    (docs/protocol.md §4.3).  Lives in RAM only: a card reset drops it."""

    transaction_id: bytes
    server_address: str
    server_challenge: bytes
    ci_pkid: bytes
    ci_cert: object
    smdp_oid: str
    euicc_signature1_tlv: bytes        # 5F37 40 …, appended to smdpSigned2 for smdpSignature2
    stage: str = "authenticated"       # authenticated → prepared → loading
    dppb_cert: object = None
    otsk: object = None
    receiver: object = None
    dp_oid: str | None = None
    metadata: dict | None = None
    metadata_iccid: str | None = None


class _InstallError(Exception):
    def __init__(self, bpp_command_id: int, error_reason: int, message: str):
        super().__init__(message)
        self.bpp_command_id = bpp_command_id
        self.error_reason = error_reason


class Isdr:
    """ES10a/b/c over a ``CardState``.  ``handle`` is I/O free apart from saving the state."""

    def __init__(self, state: CardState):
        self.state = state
        self.challenge: bytes | None = None
        self.session: DownloadSession | None = None
        #: set to simulate a busy card toolkit: Enable/Disable answer catBusy(5)
        self.cat_busy = False
        #: the refreshFlag of the last Enable/Disable (True: eUICC REFRESH, False: device resets)
        self.last_refresh_flag: bool | None = None
        #: callable() run after the enabled profile changed
        self.on_profile_change = None
        self.handlers = {
            0xBF3E: self.get_eid,
            0xBF20: self.get_euicc_info1,
            0xBF22: self.get_euicc_info2,
            0xBF3C: self.get_configured_addresses,
            0xBF3F: self.set_default_dp_address,
            0xBF2D: self.get_profiles_info,
            0xBF31: self.enable_profile,
            0xBF32: self.disable_profile,
            0xBF33: self.delete_profile,
            0xBF29: self.set_nickname,
            0xBF28: self.list_notification,
            0xBF2B: self.retrieve_notifications_list,
            0xBF30: self.remove_notification,
            0xBF34: self.memory_reset,
            0xBF43: self.get_rat,
            0xBF2E: self.get_euicc_challenge,
            0xBF41: self.cancel_session,
            0xBF38: self.authenticate_server,
            0xBF21: self.prepare_download,
            0xBF35: self.load_crl,
            0xBF42: self.lpae_activation,
        }
        #: the SGP.32 functions of an IoT card (None on an SGP.22 card)
        self.iot = None
        if state.iot:
            from .iot import IotFunctions
            self.iot = IotFunctions(self)
            self.handlers.update(self.iot.handlers())

    # --- entry points ---------------------------------------------------------------
    def reset(self) -> None:
        """Card reset: the challenge and any download session are volatile."""
        self.challenge = None
        self.session = None

    def fci(self) -> bytes:
        """ISD-R FCI: 6F{84 AID, A5{9F65 max command data}, E0{82 svn}} (docs/protocol.md §1.1)."""
        prop = tlv.encode(0xA5, tlv.encode(0x9F65, b"\xff"))
        isdr_template = tlv.encode(0xE0, tlv.encode(0x82, SVN))
        if self.iot is not None:
            isdr_template += self.iot.fci_template()
        return tlv.encode(0x6F, tlv.encode(0x84, ISDR_AID) + prop + isdr_template)

    def handle(self, request: bytes) -> bytes:
        try:
            tag, _length, _voff = tlv.read_header(request)
        except AgentError as e:
            raise SwError(0x6A80, f"ES10 command is not a TLV: {e}") from None
        if tag in BPP_TAGS:
            return self.load_bpp_segment(tag, request)
        try:
            tlv.parse_single(request)
        except AgentError as e:
            raise SwError(0x6A80, f"ES10 command {tag:X} malformed: {e}") from None
        handler = self.handlers.get(tag)
        if handler is None:
            raise SwError(0x6A88, f"no ES10 function with tag {tag:X}")
        return handler(request)

    # --- codec helpers --------------------------------------------------------------
    def _dec(self, type_name: str, data: bytes):
        """Decode a request; anything that does not parse is the terminal's fault (6A80)."""
        try:
            return _codec().decode(type_name, data)
        except Exception as e:  # ProtocolError(malformed_asn1) and whatever asn1tools raises
            raise SwError(0x6A80, f"{type_name} malformed: {e}") from None

    @staticmethod
    def _enc(type_name: str, value) -> bytes:
        return _codec().encode(type_name, value)

    def _save(self) -> None:
        self.state.save()

    def _sign(self, data: bytes) -> bytes:
        return _crypto().sign_raw(self.state.identity.euicc_key, data)

    # --- ES10c GetEID -------------------------------------------------------------------
    def get_eid(self, req: bytes) -> bytes:
        v = self._dec("GetEuiccDataRequest", req)
        if v["tagList"] != b"\x5a":
            raise SwError(0x6A88, f"GetEuiccData tag list {v['tagList'].hex()} not supported (only 5A)")
        return self._enc("GetEuiccDataResponse", {"eidValue": eid_to_bytes(self.state.eid)})

    # --- ES10b GetEUICCInfo1 / 2 ------------------------------------------------------
    def _ci_lists(self) -> tuple[list[bytes], list[bytes]]:
        ident = self.state.identity
        return ([bytes.fromhex(k) for k in ident.ci_pkids_verification],
                [bytes.fromhex(k) for k in ident.ci_pkids_signing])

    def get_euicc_info1(self, req: bytes) -> bytes:
        self._dec("GetEuiccInfo1Request", req)
        verify, sign = self._ci_lists()
        return self._enc("EUICCInfo1", {"svn": SVN, "euiccCiPKIdListForVerification": verify,
                                        "euiccCiPKIdListForSigning": sign})

    def euicc_info2(self) -> bytes:
        """BF22 as reported by GetEUICCInfo2 and embedded in euiccSigned1."""
        verify, sign = self._ci_lists()
        ext = (tlv.encode(0x81, _uint_bytes(len(self.state.profiles)))
               + tlv.encode(0x82, _uint_bytes(max(0, self.state.free_nvm)))
               + tlv.encode(0x83, _uint_bytes(FREE_VM)))
        value = {
            "profileVersion": PROFILE_VERSION,
            "svn": SVN,
            "euiccFirmwareVer": FIRMWARE_VERSION,
            "extCardResource": ext,
            "uiccCapability": make_bits(UICC_CAPABILITY_BITS),
            "ts102241Version": TS102241_VERSION,
            "globalplatformVersion": GP_VERSION,
            "rspCapability": make_bits(RSP_CAPABILITY_BITS),
            "euiccCiPKIdListForVerification": verify,
            "euiccCiPKIdListForSigning": sign,
            "euiccCategory": EUICC_CATEGORY_MEDIUM,
            "ppVersion": PP_VERSION,
            "sasAcreditationNumber": SAS_ACCREDITATION,
        }
        if self.iot is not None:
            # SGP.32 §5.9.2: the SGP.22 fields plus ipaMode and iotSpecificInfo, appended
            # after them, so an SGP.22 decoder (extensible EUICCInfo2) still reads it
            value.update(self.iot.euicc_info2_extra())
            return self._enc("SGP32-EUICCInfo2", value)
        return self._enc("EUICCInfo2", value)

    def get_euicc_info2(self, req: bytes) -> bytes:
        self._dec("GetEuiccInfo2Request", req)
        return self.euicc_info2()

    # --- ES10a addresses ----------------------------------------------------------------
    def get_configured_addresses(self, req: bytes) -> bytes:
        self._dec("EuiccConfiguredAddressesRequest", req)
        v = {"rootDsAddress": self.state.root_ds_address}
        if self.state.default_dp_address:
            v["defaultDpAddress"] = self.state.default_dp_address
        return self._enc("EuiccConfiguredAddressesResponse", v)

    def set_default_dp_address(self, req: bytes) -> bytes:
        v = self._dec("SetDefaultDpAddressRequest", req)
        # an empty address removes the default SM-DP+ (SGP.22 §5.7.4)
        self.state.default_dp_address = v["defaultDpAddress"] or None
        self._save()
        return self._enc("SetDefaultDpAddressResponse", {"setDefaultDpAddressResult": 0})

    # --- ES10c GetProfilesInfo --------------------------------------------------------
    def profile_info(self, p: Profile, tags: list[int] | None) -> dict:
        full = {
            "iccid": iccid_to_bytes(p.iccid),
            "isdpAid": bytes.fromhex(p.isdp_aid),
            "profileState": 1 if p.enabled else 0,
            "serviceProviderName": p.service_provider_name,
            "profileName": p.profile_name,
            "profileClass": p.profile_class,
        }
        if p.nickname is not None:
            full["profileNickname"] = p.nickname
        if p.icon_type is not None:
            full["iconType"] = p.icon_type
        if p.icon is not None:
            full["icon"] = bytes.fromhex(p.icon)
        if p.nci:
            full["notificationConfigurationInfo"] = [
                {"profileManagementOperation": make_bits(e["ops"]), "notificationAddress": e["address"]}
                for e in p.nci]
        if p.owner:
            owner = {"mccMnc": bytes.fromhex(p.owner["mcc_mnc"])}
            for k in ("gid1", "gid2"):
                if p.owner.get(k) is not None:
                    owner[k] = bytes.fromhex(p.owner[k])
            full["profileOwner"] = owner
        if p.dp_oid:
            full["dpProprietaryData"] = {"dpOid": p.dp_oid}
        if p.ppr or (tags is not None and 0x99 in tags):
            full["profilePolicyRules"] = make_bits(p.ppr)
        if self.iot is not None:
            # SGP32-ProfileInfo: 9F26 TRUE marks the Fallback Profile (FALSE is the DER default)
            full["fallbackAttribute"] = p.fallback
            if p.fallback_allowed is not None:
                full["fallbackAllowed"] = p.fallback_allowed
        if tags is None:
            return full
        wanted = {PROFILE_INFO_TAGS[t] for t in tags if t in PROFILE_INFO_TAGS}
        return {k: v for k, v in full.items() if k in wanted}

    def get_profiles_info(self, req: bytes) -> bytes:
        v = self._dec("ProfileInfoListRequest", req)
        # an IoT card answers with SGP32-ProfileInfo (extra fields an SGP.22 decoder skips)
        return self._enc("SGP32-ProfileInfoListResponse" if self.iot is not None else "ProfileInfoListResponse",
                         self.profiles_info(v))

    def profiles_info(self, v: dict) -> tuple:
        """The ProfileInfoListResponse CHOICE value for a decoded ProfileInfoListRequest
        (also the result of the SGP.32 listProfileInfo PSMO)."""
        tags = None
        if v.get("tagList") is not None:
            try:
                tags = tlv.parse_tag_list(v["tagList"])
            except AgentError:
                return ("profileInfoListError", 1)
        profiles = list(self.state.profiles)
        crit = v.get("searchCriteria")
        if crit is not None:
            kind, val = crit
            # asn1tools does not check SIZE constraints on decode: do it here
            if (kind == "iccid" and len(val) != 10) or (kind == "isdpAid" and not 5 <= len(val) <= 16):
                return ("profileInfoListError", 1)
            if kind == "iccid":
                profiles = [p for p in profiles if p.iccid == iccid_from_bytes(val)]
            elif kind == "isdpAid":
                profiles = [p for p in profiles if bytes.fromhex(p.isdp_aid) == val]
            elif kind == "profileClass":
                profiles = [p for p in profiles if p.profile_class == val]
            else:
                return ("profileInfoListError", 1)
        return ("profileInfoListOk", [self.profile_info(p, tags) for p in profiles])

    # --- ES10c Enable / Disable / Delete ------------------------------------------------
    def _find(self, ident) -> Profile | None:
        kind, val = ident
        if kind == "iccid":
            return self.state.find_iccid(iccid_from_bytes(val))
        return self.state.find_aid(val.hex())

    def _changed(self) -> None:
        # Any change of the enabled profile ends a pending rollback, a fallback to return from
        # and the immediate-enable chance (SGP.32 §5.9.15/16/21: each is good for the state it
        # was made in only); the SGP.32 function that made the change sets its own afterwards.
        st = self.state
        if st.rollback is not None or st.fallback_return is not None or st.immediate_candidate is not None:
            st.rollback = st.fallback_return = st.immediate_candidate = None
            self._save()
        cb = self.on_profile_change
        if cb is not None:
            cb()

    def enable_profile(self, req: bytes) -> bytes:
        v = self._dec("EnableProfileRequest", _lenient_refresh_flag(req))
        result = self._enable(self._find(v["profileIdentifier"]), bool(v["refreshFlag"]))
        return self._enc("EnableProfileResponse", {"enableResult": result})

    def _enable(self, p: Profile | None, refresh: bool) -> int:
        if p is None:
            return 1                                  # iccidOrAidNotFound
        if p.enabled:
            return 2                                  # profileNotInDisabledState
        current = self.state.enabled_profile()
        if current is not None and PPR1 in current.ppr:
            return 3                                  # the implicit disable of A is forbidden
        if self.cat_busy:
            return 5
        self.last_refresh_flag = refresh
        if current is not None:
            current.state = PROFILE_DISABLED
            self._notify(current, "disable")
        p.state = PROFILE_ENABLED
        self._notify(p, "enable")
        self._save()
        self._changed()
        return 0

    def disable_profile(self, req: bytes) -> bytes:
        v = self._dec("DisableProfileRequest", _lenient_refresh_flag(req))
        result = self._disable(self._find(v["profileIdentifier"]), bool(v["refreshFlag"]))
        return self._enc("DisableProfileResponse", {"disableResult": result})

    def _disable(self, p: Profile | None, refresh: bool) -> int:
        if p is None:
            return 1
        if not p.enabled:
            return 2                                  # profileNotInEnabledState
        if PPR1 in p.ppr:
            return 3
        if self.cat_busy:
            return 5
        self.last_refresh_flag = refresh
        p.state = PROFILE_DISABLED
        self._notify(p, "disable")
        self._save()
        self._changed()
        return 0

    def delete_profile(self, req: bytes) -> bytes:
        v = self._dec("DeleteProfileRequest", req)
        return self._enc("DeleteProfileResponse", {"deleteResult": self._delete(self._find(v))})

    def _delete(self, p: Profile | None) -> int:
        if p is None:
            return 1
        if p.enabled:
            return 2                                  # must be disabled first
        if self.iot is not None and (refused := self.iot.delete_refusal(p)):
            return refused
        if PPR2 in p.ppr:
            return 3
        self._remove(p)
        self._notify(p, "delete")
        self._save()
        return 0

    def _remove(self, p: Profile) -> None:
        self.state.profiles.remove(p)
        self.state.free_nvm += p.size

    # --- ES10c SetNickname --------------------------------------------------------------
    def set_nickname(self, req: bytes) -> bytes:
        v = self._dec("SetNicknameRequest", req)
        p = self.state.find_iccid(iccid_from_bytes(v["iccid"]))
        if p is None:
            result = 1
        else:
            p.nickname = v["profileNickname"]
            self._save()
            result = 0
        return self._enc("SetNicknameResponse", {"setNicknameResult": result})

    # --- ES10c eUICCMemoryReset ----------------------------------------------------------
    def memory_reset(self, req: bytes) -> bytes:
        v = self._dec("EuiccMemoryResetRequest", req)
        bits = set(bits_set(v["resetOptions"]))
        classes = set()
        if 0 in bits:
            classes.add(2)          # deleteOperationalProfiles
        if 1 in bits:
            classes.add(0)          # deleteFieldLoadedTestProfiles
        result = 0 if self.reset_memory(classes, reset_address=2 in bits) else 1    # 1: nothingToDelete
        return self._enc("EuiccMemoryResetResponse", {"resetResult": result})

    def reset_memory(self, classes: set[int], *, reset_address: bool) -> bool:
        """Delete the profiles of ``classes`` (and the default SM-DP+ address); True if anything went."""
        doomed = [p for p in self.state.profiles if p.profile_class in classes]
        had_enabled = any(p.enabled for p in doomed)
        # A memory reset ignores PPRs and sends no delete notifications (unverified:
        # SGP.22 §5.7.19 as we read it).
        for p in doomed:
            self._remove(p)
        address_reset = reset_address and self.state.default_dp_address is not None
        if address_reset:
            self.state.default_dp_address = None
        if doomed or address_reset:
            if self.session is not None:
                self.session = None
            self._save()
            if had_enabled:
                self._changed()
            return True
        return False

    # --- notifications (docs/protocol.md §6) ---------------------------------------------
    def _metadata(self, n: Notification) -> dict:
        md = {"seqNumber": n.seq, "profileManagementOperation": make_bits([PMO_BITS[n.operation]]),
              "notificationAddress": n.address}
        if n.iccid:
            md["iccid"] = iccid_to_bytes(n.iccid)
        return md

    def _notify(self, p: Profile, operation: str) -> None:
        """OtherSignedNotification {BF2F tbs, 5F37 sig over DER(BF2F), euiccCert, eumCert}
        for every NCI address that lists the operation."""
        for address in p.notify_addresses(PMO_BITS[operation]):
            n = Notification(self.state.take_seq(), operation, address, p.iccid, "")
            tbs = self._enc("NotificationMetadata", self._metadata(n))
            ident = self.state.identity
            der = tlv.encode(0x30, tbs + tlv.encode(0x5F37, self._sign(tbs))
                             + ident.euicc_cert_der + ident.eum_cert_der())
            n.der = der.hex()
            self.state.notifications.append(n)

    @staticmethod
    def _pmo_filter(notifications, pmo) -> list[Notification]:
        # kept eUICC Package Results (IoT) are no SGP.22 notifications: never listed here
        notifications = [n for n in notifications if n.operation != EPR_OPERATION]
        if pmo is None:
            return notifications
        wanted = set(bits_set(pmo))
        return [n for n in notifications if PMO_BITS[n.operation] in wanted]

    def list_notification(self, req: bytes) -> bytes:
        v = self._dec("ListNotificationRequest", req)
        ns = self._pmo_filter(self.state.notifications, v.get("profileManagementOperation"))
        return self._enc("ListNotificationResponse",
                         ("notificationMetadataList", [self._metadata(n) for n in ns]))

    def retrieve_notifications_list(self, req: bytes) -> bytes:
        if self.iot is not None:
            return self.iot.retrieve_notifications_list(req)
        v = self._dec("RetrieveNotificationsListRequest", req)
        ns = self._pmo_filter(self.state.notifications, None)
        crit = v.get("searchCriteria")
        if crit is not None:
            kind, val = crit
            if kind == "seqNumber":
                ns = [n for n in ns if n.seq == val]
            else:
                ns = self._pmo_filter(ns, val)
        # the stored signed DER goes out byte for byte (docs/protocol.md §0.6)
        return tlv.encode(0xBF2B, tlv.encode(0xA0, b"".join(n.der_bytes for n in ns)))

    def remove_notification(self, req: bytes) -> bytes:
        v = self._dec("NotificationSentRequest", req)
        keep = [n for n in self.state.notifications if n.seq != v["seqNumber"]]
        if len(keep) == len(self.state.notifications):
            status = 1                                 # nothingToDelete
        else:
            self.state.notifications = keep
            rb = self.state.rollback
            if rb is not None and rb.get("seq") == v["seqNumber"]:
                # the enable's result reached the eIM over the new profile: no rollback any more
                self.state.rollback = None
            self._save()
            status = 0
        return self._enc("NotificationSentResponse", {"deleteNotificationStatus": status})

    # --- ES10b GetRAT, challenge, CRL, LPAe ----------------------------------------------
    def get_rat(self, req: bytes) -> bytes:
        self._dec("GetRatRequest", req)
        return self._enc("GetRatResponse", {"rat": self.rat()})

    @staticmethod
    def rat() -> list[dict]:
        """Default RAT: any operator may set PPR1 and PPR2, with end-user consent.
        mccMnc EEEEEE is the wildcard (SGP.22 §2.9.2.2 as we read it)."""
        return [{"pprIds": make_bits([PPR1, PPR2]), "allowedOperators": [{"mccMnc": b"\xee\xee\xee"}],
                 "pprFlags": make_bits([0])}]

    def get_euicc_challenge(self, req: bytes) -> bytes:
        self._dec("GetEuiccChallengeRequest", req)
        self.challenge = os.urandom(16)
        return self._enc("GetEuiccChallengeResponse", {"euiccChallenge": self.challenge})

    def load_crl(self, req: bytes) -> bytes:
        # rspCapability does not announce crlSupport: refuse every CRL
        return tlv.encode(0xBF35, tlv.encode(0x81, bytes([UNDEFINED_ERROR])))

    def lpae_activation(self, req: bytes) -> bytes:
        return tlv.encode(0xBF42, tlv.encode(0x80, b"\x01"))   # notSupported

    # --- ES10b CancelSession --------------------------------------------------------------
    def cancel_session(self, req: bytes) -> bytes:
        v = self._dec("CancelSessionRequest", req)
        s = self.session
        if s is None or v["transactionId"] != s.transaction_id:
            return self._enc("CancelSessionResponse", ("cancelSessionResponseError", DL_INVALID_TRANSACTION_ID))
        signed = self._enc("EuiccCancelSessionSigned", {"transactionId": s.transaction_id,
                                                        "smdpOid": s.smdp_oid, "reason": v["reason"]})
        self.session = None
        body = signed + tlv.encode(0x5F37, self._sign(signed))
        return tlv.encode(0xBF41, tlv.encode(0xA0, body))

    # --- certificate checks shared by AuthenticateServer and PrepareDownload -----------
    @staticmethod
    def _check_server_cert(cert_der: bytes, ci_cert, role: str) -> tuple[object | None, int]:
        """Return (certificate, 0) or (None, error code)."""
        crypto = _crypto()
        from cryptography.hazmat.primitives.asymmetric import ec
        try:
            cert = crypto.load_cert(cert_der)
        except AgentError:
            return None, AUTH_INVALID_CERTIFICATE
        try:
            pub = cert.public_key()
        except Exception:
            return None, AUTH_INVALID_CERTIFICATE
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            return None, AUTH_UNSUPPORTED_CURVE
        if not isinstance(pub.curve, (ec.SECP256R1, ec.BrainpoolP256R1)):
            return None, AUTH_UNSUPPORTED_CURVE
        try:
            crypto.verify_chain(cert, [], [ci_cert], role=role)
        except AgentError:
            return None, AUTH_INVALID_CERTIFICATE
        return cert, 0

    # --- ES10b AuthenticateServer (docs/protocol.md §4.3) --------------------------------
    def authenticate_server(self, req: bytes) -> bytes:
        v = self._dec("AuthenticateServerRequest", req)
        parts = tlv.children(tlv.parse_single(req))
        signed1_raw = parts[0].raw                    # serverSigned1 exactly as received
        cert_raw = parts[3].raw
        ctx_raw = parts[4].raw                        # ctxParams1, copied verbatim
        ss1 = v["serverSigned1"]
        txid = ss1["transactionId"]

        def error(code: int) -> bytes:
            return self._enc("AuthenticateServerResponse", ("authenticateResponseError",
                                                            {"transactionId": txid, "authenticateErrorCode": code}))

        crypto = _crypto()
        ci_pkid = v["euiccCiPKIdToBeUsed"]
        ident = self.state.identity
        ci = ident.ci_cert(ci_pkid) if ci_pkid.hex().upper() in (
            k.upper() for k in ident.ci_pkids_verification) else None
        if ci is None:
            return error(AUTH_CI_PK_UNKNOWN)
        cert, code = self._check_server_cert(cert_raw, ci, "dp-auth")
        if cert is None:
            return error(code)
        smdp_oid = crypto.smdp_oid(cert)
        if not smdp_oid:
            return error(AUTH_INVALID_OID)
        if not crypto.verify_raw(cert, signed1_raw, v["serverSignature1"]):
            return error(AUTH_INVALID_SIGNATURE)
        if self.challenge is None or ss1["euiccChallenge"] != self.challenge:
            return error(AUTH_CHALLENGE_MISMATCH)
        self.challenge = None                          # one challenge, one session

        euicc_signed1 = tlv.encode(0x30, tlv.encode(0x80, txid)
                                   + tlv.encode(0x83, ss1["serverAddress"].encode("utf-8"))
                                   + tlv.encode(0x84, ss1["serverChallenge"])
                                   + self.euicc_info2()
                                   + ctx_raw)
        sig1_tlv = tlv.encode(0x5F37, self._sign(euicc_signed1))
        self.session = DownloadSession(
            transaction_id=txid, server_address=ss1["serverAddress"], server_challenge=ss1["serverChallenge"],
            ci_pkid=ci_pkid, ci_cert=ci, smdp_oid=smdp_oid, euicc_signature1_tlv=sig1_tlv)
        ok = euicc_signed1 + sig1_tlv + ident.euicc_cert_der + ident.eum_cert_der()
        return tlv.encode(0xBF38, tlv.encode(0xA0, ok))

    # --- ES10b PrepareDownload (docs/protocol.md §4.3) --------------------------------------
    def prepare_download(self, req: bytes) -> bytes:
        v = self._dec("PrepareDownloadRequest", req)
        parts = tlv.children(tlv.parse_single(req))
        signed2_raw = parts[0].raw
        sig2_tlv = parts[1].raw                       # smdpSignature2 TLV, appended below
        cert_raw = parts[-1].raw
        sd2 = v["smdpSigned2"]
        txid = sd2["transactionId"]

        def error(code: int) -> bytes:
            return self._enc("PrepareDownloadResponse", ("downloadResponseError",
                                                         {"transactionId": txid, "downloadErrorCode": code}))

        s = self.session
        if s is None or s.stage not in ("authenticated", "prepared"):
            return error(AUTH_NO_SESSION_CONTEXT)
        crypto = _crypto()
        cert, code = self._check_server_cert(cert_raw, s.ci_cert, "dp-pb")
        if cert is None:
            return error(code)
        if crypto.smdp_oid(cert) != s.smdp_oid:
            # CERT.DPpb must belong to the SM-DP+ that authenticated (same SAN registeredID)
            return error(AUTH_INVALID_CERTIFICATE)
        if not crypto.verify_raw(cert, signed2_raw + s.euicc_signature1_tlv, v["smdpSignature2"]):
            return error(AUTH_INVALID_SIGNATURE)
        if txid != s.transaction_id:
            return error(DL_INVALID_TRANSACTION_ID)
        hash_cc = v.get("hashCc")
        if sd2["ccRequiredFlag"] and hash_cc is None:
            # the eUICC cannot check the code itself: it only forwards hashCc to the SM-DP+
            return error(UNDEFINED_ERROR)

        otsk = self._one_time_key(sd2.get("bppEuiccOtpk"))
        otpk = crypto.public_point(otsk)
        euicc_signed2 = tlv.encode(0x30, tlv.encode(0x80, txid) + tlv.encode(0x5F49, otpk)
                                   + (tlv.encode(0x04, hash_cc) if hash_cc is not None else b""))
        sig = self._sign(euicc_signed2 + sig2_tlv)
        s.stage = "prepared"
        s.dppb_cert = cert
        s.otsk = otsk
        s.receiver = None
        return tlv.encode(0xBF21, tlv.encode(0xA0, euicc_signed2 + tlv.encode(0x5F37, sig)))

    def _one_time_key(self, requested_otpk: bytes | None):
        """otSK.EUICC.ECKA: the stored pair when the SM-DP+ asks to rebind to it, else a new one."""
        crypto = _crypto()
        stored = self.state.ot_key
        if requested_otpk is not None and stored and stored.get("otpk", "").upper() == requested_otpk.hex().upper():
            return crypto.load_key(stored["otsk"])
        key = crypto.generate_key(self.state.identity.euicc_key.curve)
        self.state.ot_key = {"otsk": crypto.key_pem(key).decode(), "otpk": crypto.public_point(key).hex().upper()}
        self._save()
        return key

    # --- ES10b LoadBoundProfilePackage (docs/protocol.md §1.6, §4.6) --------------------------
    def load_bpp_segment(self, tag: int, request: bytes) -> bytes:
        from .. import es8p
        s = self.session
        if tag == 0xBF36:
            if s is None or s.stage not in ("prepared", "loading"):
                # no PrepareDownload in this session, or a replay of a finished one
                raise SwError(0x6985, "LoadBoundProfilePackage without a prepared download session")
            s.receiver = es8p.BppReceiver(euicc_otsk=s.otsk, dppb_public_key=s.dppb_cert,
                                          eid=eid_to_bytes(self.state.eid),
                                          expected_transaction_id=s.transaction_id)
            s.stage = "loading"
            s.metadata = s.metadata_iccid = s.dp_oid = None
        elif s is None or s.stage != "loading":
            raise SwError(0x6985, f"BPP segment {tag:X} outside a LoadBoundProfilePackage sequence")
        try:
            for ev in s.receiver.feed(request):
                self._bpp_event(s, ev)
            if not s.receiver.complete:
                return b""
            return self._install(s)
        except es8p.BppError as e:
            return self._finish(s, ("errorResult", {"bppCommandId": e.bpp_command_id,
                                                    "errorReason": e.error_reason}))
        except _InstallError as e:
            return self._finish(s, ("errorResult", {"bppCommandId": e.bpp_command_id,
                                                    "errorReason": e.error_reason}))

    def _bpp_event(self, s: DownloadSession, ev) -> None:
        if ev.kind == "configureISDP":
            try:
                v = _codec().decode("ConfigureISDPRequest", ev.data)
            except Exception as e:
                raise _InstallError(1, 1, f"ConfigureISDP malformed: {e}") from None
            dp = v.get("dpProprietaryData")
            s.dp_oid = dp.get("dpOid") if dp else None
        elif ev.kind == "storeMetadata":
            self._store_metadata(s, ev.data)
        elif ev.kind == "loadProfileElements":
            if len(s.receiver.upp) + PROFILE_OVERHEAD > self.state.free_nvm:
                raise _InstallError(5, 10, f"profile needs more than the {self.state.free_nvm} bytes of free NVM")

    def _store_metadata(self, s: DownloadSession, data: bytes) -> None:
        try:
            md = _codec().decode("StoreMetadataRequest", data)
        except Exception as e:
            raise _InstallError(2, 1, f"StoreMetadata malformed: {e}") from None
        iccid = iccid_from_bytes(md["iccid"])
        s.metadata_iccid = iccid
        if self.state.find_iccid(iccid) is not None:
            raise _InstallError(2, 9, f"ICCID {iccid} already installed")
        if md.get("profileClass", 2) not in (0, 1, 2):
            raise _InstallError(2, 6, "unsupported profile class")
        pprs = set(bits_set(md.get("profilePolicyRules")))
        allowed = set()
        for rule in self.rat():
            allowed |= set(bits_set(rule["pprIds"]))
        if pprs - {0} - allowed:
            raise _InstallError(2, 15, f"PPRs {sorted(pprs)} not allowed by the RAT")
        s.metadata = md

    def _install(self, s: DownloadSession) -> bytes:
        from . import upp as upp_mod
        md = s.metadata
        if md is None:
            raise _InstallError(2, 1, "no StoreMetadata received")
        package = bytes(s.receiver.upp)
        try:
            info = upp_mod.parse_upp(package)
        except AgentError as e:
            raise _InstallError(5, 12, f"profile package unreadable: {e}") from None
        if not info.ended:
            raise _InstallError(5, 12, "profile package has no PE-End")
        if info.iccid != s.metadata_iccid:
            raise _InstallError(5, 13, f"UPP ICCID {info.iccid} differs from metadata ICCID {s.metadata_iccid}")
        size = len(package) + PROFILE_OVERHEAD
        if size > self.state.free_nvm:
            raise _InstallError(5, 10, "insufficient memory")
        owner = md.get("profileOwner")
        p = Profile(
            iccid=s.metadata_iccid,
            isdp_aid=self.state.take_isdp_aid(),
            state=PROFILE_DISABLED,
            profile_class=md.get("profileClass", 2),
            service_provider_name=md.get("serviceProviderName", ""),
            profile_name=md.get("profileName", ""),
            icon_type=md.get("iconType"),
            icon=md["icon"].hex().upper() if md.get("icon") is not None else None,
            ppr=bits_set(md.get("profilePolicyRules")),
            nci=[{"ops": bits_set(e["profileManagementOperation"]), "address": e["notificationAddress"]}
                 for e in md.get("notificationConfigurationInfo", [])],
            owner={"mcc_mnc": owner["mccMnc"].hex().upper(),
                   **{k: owner[k].hex().upper() for k in ("gid1", "gid2") if owner.get(k) is not None}}
            if owner else None,
            dp_oid=s.dp_oid,
            smdp_oid=s.smdp_oid,
            smdp_address=s.server_address,
            imsi=info.imsi,
            size=size,
        )
        self.state.profiles.append(p)
        self.state.free_nvm -= size
        if self.state.iot:
            self.state.immediate_candidate = p.iccid      # SGP.32 §5.9.15 ImmediateEnable
        self.state.ot_key = None          # the one-time key is spent once a profile is installed
        return self._finish(s, ("successResult", {"aid": bytes.fromhex(p.isdp_aid),
                                                  "simaResponse": SIMA_RESPONSE_OK}))

    def _finish(self, s: DownloadSession, final) -> bytes:
        """Sign the ProfileInstallationResult, keep it as the install notification, end the session."""
        n = Notification(self.state.take_seq(), "install", s.server_address, s.metadata_iccid, "")
        data = self._enc("ProfileInstallationResultData", {
            "transactionId": s.transaction_id,
            "notificationMetadata": self._metadata(n),
            "smdpOid": s.smdp_oid,
            "finalResult": final,
        })
        pir = tlv.encode(0xBF37, data + tlv.encode(0x5F37, self._sign(data)))
        n.der = pir.hex()
        self.state.notifications.append(n)
        self.session = None
        self._save()
        return pir
