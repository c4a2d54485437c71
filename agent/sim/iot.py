"""The simulated eUICC's SGP.32 (IoT) ES10b functions (SGP.32 v1.2 §5.9, docs/protocol.md §7).

``IotFunctions`` belongs to an ``isdr.Isdr`` whose card state says ``iot``; the Isdr
registers ``handlers()`` next to its SGP.22 ones and asks it for the IoT parts of
EUICCInfo2, the FCI, ProfileInfo, RetrieveNotificationsList and the delete rules.
Like the Isdr it is I/O-free apart from saving the state: bytes in, bytes out, card-level
refusals as ``SwError``, function-level errors as SGP.32 response values.

Functions (tags of SGP.32 §5.9 as transcribed in asn1/sgp32.asn):

* BF57 AddInitialEim, BF55 GetEimConfigurationData, BF56 GetCerts;
* BF51 LoadEuiccPackage: the eIM's signed package as the eIM sent it, checked and run in
  the order of SGP.32 §2.11 (docs/protocol.md §7 "Signatures and replay protection"):
  eIM unknown or signature wrong -> euiccPackageErrorUnsigned; EID not ours -> signed
  invalidEid; counter not above the last accepted -> replayError; above COUNTER_MAX ->
  counterValueOutOfRange; otherwise every PSMO/eCO in order, one EuiccResultData each,
  signed with SK.EUICC.SIG and kept in the notification list under a new seqNumber;
* BF58 ProfileRollback, BF59 ConfigureImmediateProfileEnabling, BF5A ImmediateEnable,
  BF5D ExecuteFallbackMechanism, BF5E ReturnFromFallback, BF65 SetDefaultDpAddress,
  BF64 eUICCMemoryReset (SGP.32 form), BF2B RetrieveNotificationsList with the SGP.32
  search criteria.

Choices where the specification text was not at hand (docs/protocol.md §7 lists the codes):

* Stop rule: after the first operation of a package that fails, the rest are not run;
  each gets processingTerminated interruption(3), so the result list stays one-to-one
  with the operations.  deleteEim's lastEimDeleted(2) counts as success (the eIM is gone).
* An enable with rollbackFlag while no profile is enabled answers rollbackNotAvailable(20)
  (there is nothing to roll back to).  The rollback stays possible until the enabled
  profile changes again or the enable's EPR is removed from the card (it reached the eIM,
  so the new profile works); ProfileRollback's EPR repeats the package's results with the
  enable's one replaced by rollbackResult, under a new seqNumber, and replaces the old EPR.
* Delete of the Fallback Profile -> returnFallbackProfile(21); delete of the profile a
  pending rollback would re-enable -> rollbackNotAvailable(20).
* setFallbackAttribute / unsetFallbackAttribute while the fallback mechanism is in force
  (after ExecuteFallbackMechanism, before ReturnFromFallback) -> fallbackProfileEnabled(3).
* Fallback, return and rollback switch profiles without the PPR1 check: they restore a
  state the card was in, and their result codes have no disallowedByPolicy.
"""
from __future__ import annotations

from .. import esep, tlv
from ..errors import AgentError
from ..es10 import bits_set, make_bits
from ..ids import iccid_from_bytes
from .isdr import SwError, _codec, _crypto
from .state import EPR_OPERATION, PROFILE_DISABLED, PROFILE_ENABLED, EimEntry, Notification, Profile

#: SGP.32 version this card implements (IoTSpecificInfo.iotVersion)
IOT_VERSION = bytes([1, 2, 0])
IPA_MODE_IPAD = 0
#: eIM associations the card has room for (beyond: insufficientMemory)
MAX_EIMS = 8

# EimConfigurationData component tags (asn1/sgp32.asn)
TAG_EIM_COUNTER = 0x83
TAG_EIM_TOKEN = 0x84
TAG_EIM_PUBLIC_KEY = 0xA5

# AddEimResult / AddInitialEim / UpdateEim codes
INSUFFICIENT_MEMORY = 1
EIM_ALREADY_EXISTS = 2
CI_PK_UNKNOWN = 3
COUNTER_OUT_OF_RANGE = 6
COMMAND_ERROR = 7
UNDEFINED_ERROR = 127

# processingTerminated (EuiccResultData)
TERMINATED_UNKNOWN_COMMAND = 2
TERMINATED_INTERRUPTION = 3

# result codes shared by several SGP.32 functions
CAT_BUSY = 5
FALLBACK_NOT_AVAILABLE = 6
ROLLBACK_NOT_AVAILABLE = 20
RETURN_FALLBACK_PROFILE = 21
FALLBACK_PROFILE_ENABLED = 3


class _ConfigError(Exception):
    def __init__(self, code: int, message: str = ""):
        super().__init__(message or str(code))
        self.code = code


class IotFunctions:
    """SGP.32 ES10b over the Isdr's ``CardState``."""

    def __init__(self, isdr):
        self.isdr = isdr

    @property
    def state(self):
        return self.isdr.state

    def handlers(self) -> dict:
        return {
            0xBF57: self.add_initial_eim,
            0xBF55: self.get_eim_configuration_data,
            0xBF56: self.get_certs,
            0xBF51: self.load_euicc_package,
            0xBF58: self.profile_rollback,
            0xBF59: self.configure_immediate_enable,
            0xBF5A: self.immediate_enable,
            0xBF5D: self.execute_fallback,
            0xBF5E: self.return_from_fallback,
            0xBF65: self.set_default_dp_address,
            0xBF64: self.memory_reset,
        }

    # --- what an IoT card reports ----------------------------------------------------
    @staticmethod
    def euicc_info2_extra() -> dict:
        """SGP32-EUICCInfo2 fields beyond SGP.22's (SGP.32 §5.9.2)."""
        return {"ipaMode": IPA_MODE_IPAD,
                "iotSpecificInfo": {"iotVersion": [IOT_VERSION], "fallbackSupported": None}}

    def fci_template(self) -> bytes:
        """E1 ISDRProprietaryApplicationTemplateIoT: no IPAe; enabledProfile(1) while one is."""
        bits = [1] if self.state.enabled_profile() is not None else []
        return _codec().encode("ISDRProprietaryApplicationTemplateIoT", {"euiccConfiguration": make_bits(bits)})

    def delete_refusal(self, p: Profile) -> int:
        """SGP.32 reasons a disabled profile must stay (0: none)."""
        if p.fallback:
            return RETURN_FALLBACK_PROFILE
        rb = self.state.rollback
        if rb is not None and rb.get("previous") == p.iccid:
            return ROLLBACK_NOT_AVAILABLE
        return 0

    # --- RetrieveNotificationsList (SGP.32 §5.9.11) ------------------------------------
    def retrieve_notifications_list(self, req: bytes) -> bytes:
        v = self.isdr._dec("SGP32-RetrieveNotificationsListRequest", req)
        everything = self.state.notifications
        eprs = [n for n in everything if n.operation == EPR_OPERATION]
        notes = [n for n in everything if n.operation != EPR_OPERATION]
        crit = v.get("searchCriteria")
        tag, items = 0xA0, notes                  # notificationList; EPRs go in euiccPackageResultList (A2)
        if crit is not None:
            kind, val = crit
            if kind == "seqNumber":
                hit = [n for n in eprs if n.seq == val]
                tag, items = (0xA2, hit) if hit else (0xA0, [n for n in notes if n.seq == val])
            elif kind == "profileManagementOperation":
                items = self.isdr._pmo_filter(notes, val)
            else:                                  # euiccPackageResults
                tag, items = 0xA2, eprs
        # the stored signed DER goes out byte for byte (docs/protocol.md §0.6)
        return tlv.encode(0xBF2B, tlv.encode(tag, b"".join(n.der_bytes for n in items)))

    # --- eIM configuration (SGP.32 §2.11.1.1.1, §5.9.4, §5.9.18) ------------------------
    def _config(self, raw: bytes, *, need_key: bool) -> tuple[dict, object]:
        """Decode and check one EimConfigurationData TLV (tag 30); returns (value, public key
        or None).  Raises _ConfigError with the AddEimResult code."""
        try:
            v = _codec().decode("EimConfigurationData", raw)
        except Exception as e:
            raise _ConfigError(COMMAND_ERROR, f"EimConfigurationData malformed: {e}") from None
        if not 1 <= len(v["eimId"]) <= 128:
            raise _ConfigError(COMMAND_ERROR, "eimId must be 1 to 128 characters")
        pkid = v.get("euiccCiPKId")
        if pkid is not None:
            ident = self.state.identity
            known = {k.upper() for k in ident.ci_pkids_verification + ident.ci_pkids_signing}
            if pkid.hex().upper() not in known:
                raise _ConfigError(CI_PK_UNKNOWN, f"euiccCiPKId {pkid.hex()} unknown")
        counter = v.get("counterValue")
        if counter is not None and not 0 <= counter <= esep.COUNTER_MAX:
            raise _ConfigError(COUNTER_OUT_OF_RANGE, f"counterValue {counter} out of range")
        key = self._public_key(raw)
        if key is None and need_key:
            raise _ConfigError(COMMAND_ERROR, "no eimPublicKeyData: packages could not be verified")
        return v, key

    @staticmethod
    def _public_key(raw: bytes):
        """The EC key of eimPublicKeyData (A5{A0 SPKI | A1 certificate}), or None if absent."""
        crypto = _crypto()
        field = tlv.find(tlv.children(tlv.parse_single(raw)), TAG_EIM_PUBLIC_KEY)
        if field is None:
            return None
        try:
            inner = tlv.children(field)[0]
            der = tlv.encode(0x30, inner.value)        # the implicit A0/A1 stands for the 30
            if inner.tag == 0xA1:
                return crypto.as_public_key(crypto.load_cert(der))
            from cryptography.hazmat.primitives.serialization import load_der_public_key
            return crypto.as_public_key(load_der_public_key(der))
        except (AgentError, ValueError, IndexError) as e:
            raise _ConfigError(COMMAND_ERROR, f"eimPublicKeyData unusable: {e}") from None

    @staticmethod
    def _key_pem(key) -> str:
        from cryptography.hazmat.primitives import serialization
        return key.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def _take_token(self) -> int:
        n = self.state.next_association_token
        self.state.next_association_token += 1
        return n

    def _new_entry(self, raw: bytes, v: dict, key) -> tuple[EimEntry, int | None]:
        """An EimEntry for a checked config; a config carrying associationToken gets a fresh one."""
        token = self._take_token() if v.get("associationToken") is not None else None
        stored = _set_field(raw, TAG_EIM_TOKEN, _int_content(token) if token is not None else None)
        return EimEntry(eim_id=v["eimId"], config=stored.hex().upper(), public_key=self._key_pem(key),
                        counter=v.get("counterValue") or 0, association_token=token), token

    def add_initial_eim(self, req: bytes) -> bytes:
        v = self.isdr._dec("AddInitialEimRequest", req)

        def error(code: int) -> bytes:
            return self.isdr._enc("AddInitialEimResponse", ("addInitialEimError", code))

        if self.state.eims:
            return error(EIM_ALREADY_EXISTS)             # the unsigned way in is for the first eIM only
        raws = [t.raw for t in tlv.children(tlv.children(tlv.parse_single(req))[0])]
        if not raws or len(raws) != len(v["eimConfigurationDataList"]):
            return error(COMMAND_ERROR)
        if len(raws) > MAX_EIMS:
            return error(INSUFFICIENT_MEMORY)
        checked = []
        try:
            for raw in raws:
                checked.append((raw, *self._config(raw, need_key=True)))
        except _ConfigError as e:
            return error(e.code)
        if len({c[1]["eimId"] for c in checked}) != len(checked):
            return error(COMMAND_ERROR)                # one eimId twice
        answers = []
        for raw, cv, key in checked:                   # all or nothing: checked first, then stored
            entry, token = self._new_entry(raw, cv, key)
            self.state.eims.append(entry)
            answers.append(("associationToken", token) if token is not None else ("addOk", None))
        self.isdr._save()
        return self.isdr._enc("AddInitialEimResponse", ("addInitialEimOk", answers))

    def get_eim_configuration_data(self, req: bytes) -> bytes:
        v = self.isdr._dec("GetEimConfigurationDataRequest", req)
        entries = self.state.eims
        crit = v.get("searchCriteria")
        if crit is not None:
            entries = [e for e in entries if e.eim_id == crit[1]]
        # stored bytes as they are (with the token this card assigned)
        return tlv.encode(0xBF55, tlv.encode(0xA0, b"".join(e.config_der for e in entries)))

    # --- GetCerts (SGP.32 §5.9.10) ---------------------------------------------------------
    def get_certs(self, req: bytes) -> bytes:
        v = self.isdr._dec("GetCertsRequest", req)
        ident = self.state.identity
        pkid = v.get("euiccCiPKId")
        if pkid is not None and pkid.hex().upper() not in {
                k.upper() for k in ident.ci_pkids_signing + ident.ci_pkids_verification}:
            return self.isdr._enc("GetCertsResponse", ("getCertsError", 1))     # invalidCiPKId
        # [5] / [6] implicit: the certificates' 30 becomes A5 / A6, the content stays as issued
        eum = tlv.parse_single(ident.eum_cert_der()).value
        euicc = tlv.parse_single(ident.euicc_cert_der).value
        return tlv.encode(0xBF56, tlv.encode(0xA0, tlv.encode(0xA5, eum) + tlv.encode(0xA6, euicc)))

    # --- LoadEuiccPackage (SGP.32 §2.11, §5.9.3) ---------------------------------------------
    def load_euicc_package(self, req: bytes) -> bytes:
        try:
            pkg = esep.decode_package_request(req)
            op_raws = tlv.children(tlv.children(tlv.children(tlv.parse_single(req))[0])[-1])
        except Exception as e:           # AgentError, and whatever the decoder trips over
            raise SwError(0x6A80, f"EuiccPackageRequest malformed: {e}") from None
        # the decoder does not check SIZE constraints; no answer could carry these values
        if not 1 <= len(pkg.eim_id) <= 128 or len(pkg.eid) != 32 or len(op_raws) != len(pkg.operations) \
                or (pkg.transaction_id is not None and not 1 <= len(pkg.transaction_id) <= 16):
            raise SwError(0x6A80, "EuiccPackageRequest: eimId, EID or eimTransactionId out of size")
        st = self.state
        entry = st.find_eim(pkg.eim_id)
        txid = pkg.transaction_id
        if entry is None or entry.public_key is None:
            return esep.unsigned_error(eim_id=pkg.eim_id, transaction_id=txid)
        key = _crypto().as_public_key(_load_public_pem(entry.public_key))
        if not pkg.verify(key, entry.association_token):
            return esep.unsigned_error(eim_id=pkg.eim_id, transaction_id=txid,
                                       association_token=entry.association_token)

        def signed_error(code: int) -> bytes:
            return esep.sign_error(st.identity.euicc_key, eim_id=pkg.eim_id, counter=pkg.counter, error=code,
                                   transaction_id=txid, association_token=entry.association_token,
                                   eim_signature=pkg.signature, version=st.esipa_version)

        if pkg.eid != st.eid:
            return signed_error(esep.INVALID_EID)
        if pkg.counter <= entry.counter:
            return signed_error(esep.REPLAY_ERROR)
        if pkg.counter > esep.COUNTER_MAX:
            return signed_error(esep.COUNTER_OUT_OF_RANGE)
        # accepted: the counter moves before the operations run (an updateEim in the package
        # may set it again)
        entry.counter = pkg.counter
        results: list = []
        rollback = None
        failed = False
        for index, ((name, value), raw) in enumerate(zip(pkg.operations, op_raws)):
            if failed:
                results.append(("processingTerminated", TERMINATED_INTERRUPTION))
                continue
            if pkg.kind == "psmoList":
                result, ok, previous = self._psmo(name, value)
                if name == "enable" and ok and value.get("rollbackFlag", False) is None:
                    rollback = {"index": index, "previous": previous,
                                "iccid": iccid_from_bytes(value["iccid"])}
            else:
                result, ok = self._eco(name, value, raw)
            results.append(result)
            failed = not ok
        seq = st.take_seq()
        epr = esep.sign_result(st.identity.euicc_key, eim_id=pkg.eim_id, counter=pkg.counter, seq_number=seq,
                               results=results, transaction_id=txid, association_token=entry.association_token,
                               eim_signature=pkg.signature, version=st.esipa_version)
        st.notifications.append(Notification(seq, EPR_OPERATION, pkg.eim_id, None, epr.hex().upper()))
        if rollback is not None and st.enabled_profile() is not None \
                and st.enabled_profile().iccid == rollback["iccid"]:
            rollback.update(seq=seq, eim_signature=pkg.signature.hex().upper())
            st.rollback = rollback
        self.isdr._save()
        return epr

    # PSMOs (SGP.32 §2.11.1.1.3): (EuiccResultData, succeeded, previously enabled ICCID)
    def _psmo(self, name: str, v) -> tuple[tuple, bool, str | None]:
        st, isdr = self.state, self.isdr
        before = st.enabled_profile()
        previous = before.iccid if before is not None else None
        if name in ("enable", "disable", "delete", "setFallbackAttribute"):
            p = st.find_iccid(iccid_from_bytes(v["iccid"]))
        if name == "enable":
            if v.get("rollbackFlag", False) is None and before is None and p is not None and not p.enabled:
                code = ROLLBACK_NOT_AVAILABLE
            else:
                # a PSMO carries no refreshFlag: the eUICC refreshes (SGP.32 §2.11.1.1.3)
                code = isdr._enable(p, True)
            return ("enableResult", code), code == 0, previous
        if name == "disable":
            code = isdr._disable(p, True)
            return ("disableResult", code), code == 0, previous
        if name == "delete":
            code = isdr._delete(p)
            return ("deleteResult", code), code == 0, previous
        if name == "listProfileInfo":
            res = isdr.profiles_info(v)
            return ("listProfileInfoResult", res), res[0] == "profileInfoListOk", previous
        if name == "getRAT":
            return ("getRATResult", isdr.rat()), True, previous
        if name == "configureImmediateEnable":
            self._store_immediate_enable(v)
            return ("configureImmediateEnableResult", 0), True, previous
        if name == "setFallbackAttribute":
            code = self._set_fallback(p)
            return ("setFallbackAttributeResult", code), code == 0, previous
        if name == "unsetFallbackAttribute":
            code = self._unset_fallback()
            return ("unsetFallbackAttributeResult", code), code == 0, previous
        if name == "setDefaultDpAddress":
            st.default_dp_address = v["defaultDpAddress"] or None
            return ("setDefaultDpAddressResult", {"setDefaultDpAddressResult": 0}), True, previous
        return ("processingTerminated", TERMINATED_UNKNOWN_COMMAND), False, previous

    def _set_fallback(self, p: Profile | None) -> int:
        if p is None:
            return 1                                   # iccidOrAidNotFound
        if p.fallback_allowed is False:
            return 2                                   # fallbackNotAllowed (the Profile Owner said so)
        if self.state.fallback_return is not None:
            return FALLBACK_PROFILE_ENABLED
        for other in self.state.profiles:              # one Fallback Profile at a time: the mark moves
            other.fallback = False
        p.fallback = True
        return 0

    def _unset_fallback(self) -> int:
        fb = self.state.fallback_profile()
        if fb is None:
            return 2                                   # noFallbackAttribute
        if self.state.fallback_return is not None:
            return FALLBACK_PROFILE_ENABLED
        fb.fallback = False
        return 0

    def _store_immediate_enable(self, v: dict) -> None:
        self.state.immediate_enable = {"flag": v.get("immediateEnableFlag", False) is None,
                                       "smdp_oid": v.get("defaultSmdpOid"),
                                       "smdp_address": v.get("defaultSmdpAddress")}

    # eCOs (SGP.32 §2.11.1.1.2): (EuiccResultData, succeeded)
    def _eco(self, name: str, v, raw) -> tuple[tuple, bool]:
        st = self.state
        if name == "addEim":
            try:
                cv, key = self._config(tlv.encode(0x30, raw.value), need_key=True)
            except _ConfigError as e:
                return ("addEimResult", ("addEimResultCode", e.code)), False
            if st.find_eim(cv["eimId"]) is not None:
                return ("addEimResult", ("addEimResultCode", EIM_ALREADY_EXISTS)), False
            if len(st.eims) >= MAX_EIMS:
                return ("addEimResult", ("addEimResultCode", INSUFFICIENT_MEMORY)), False
            entry, token = self._new_entry(tlv.encode(0x30, raw.value), cv, key)
            st.eims.append(entry)
            return ("addEimResult", ("associationToken", token) if token is not None
                    else ("addEimResultCode", 0)), True
        if name == "deleteEim":
            entry = st.find_eim(v["eimId"])
            if entry is None:
                return ("deleteEimResult", 1), False   # eimNotFound
            st.eims.remove(entry)
            return ("deleteEimResult", 0 if st.eims else 2), True      # 2: lastEimDeleted
        if name == "updateEim":
            return self._update_eim(tlv.encode(0x30, raw.value))
        if name == "listEim":
            infos = []
            for e in st.eims:
                info = {"eimId": e.eim_id}
                t = _codec().decode("EimConfigurationData", e.config_der).get("eimIdType")
                if t is not None:
                    info["eimIdType"] = t
                infos.append(info)
            return ("listEimResult", ("eimIdList", infos)), True
        return ("processingTerminated", TERMINATED_UNKNOWN_COMMAND), False

    def _update_eim(self, raw: bytes) -> tuple[tuple, bool]:
        try:
            cv, key = self._config(raw, need_key=False)
        except _ConfigError as e:
            code = e.code if e.code in (CI_PK_UNKNOWN, COUNTER_OUT_OF_RANGE) else COMMAND_ERROR
            return ("updateEimResult", code), False
        entry = self.state.find_eim(cv["eimId"])
        if entry is None:
            return ("updateEimResult", 1), False       # eimNotFound
        if key is not None:
            entry.public_key = self._key_pem(key)
        if cv.get("counterValue") is not None:
            entry.counter = cv["counterValue"]
        # the association token is the card's to give: the stored config keeps the assigned one
        token = entry.association_token
        new = _set_field(raw, TAG_EIM_TOKEN, _int_content(token) if token is not None else None)
        if key is None:
            # no new key in the update: the stored config keeps the old eimPublicKeyData
            old = tlv.find(tlv.children(tlv.parse_single(entry.config_der)), TAG_EIM_PUBLIC_KEY)
            if old is not None:
                new = _set_field(new, TAG_EIM_PUBLIC_KEY, old.value)
        entry.config = new.hex().upper()
        return ("updateEimResult", 0), True

    # --- ProfileRollback (SGP.32 §5.9.16) ----------------------------------------------------
    def profile_rollback(self, req: bytes) -> bytes:
        v = self.isdr._dec("ProfileRollbackRequest", req)
        st = self.state
        rb = st.rollback

        def answer(code: int, epr: bytes = b"") -> bytes:
            return tlv.encode(0xBF58, tlv.encode(0x02, bytes([code])) + epr)

        if rb is None:
            return answer(1)                            # rollbackNotAllowed
        current = st.find_iccid(rb["iccid"])
        previous = st.find_iccid(rb["previous"]) if rb.get("previous") else None
        old = next((n for n in st.notifications if n.seq == rb.get("seq") and n.operation == EPR_OPERATION), None)
        if current is None or not current.enabled or old is None or (rb.get("previous") and previous is None):
            st.rollback = None
            self.isdr._save()
            return answer(1)
        if self.isdr.cat_busy:
            return answer(CAT_BUSY)
        try:
            result = esep.decode_package_result(old.der_bytes)
            results = list(result.results)
            results[rb["index"]] = ("rollbackResult", 0)
        except (AgentError, IndexError, KeyError):
            return answer(COMMAND_ERROR)
        self._switch(previous, bool(v["refreshFlag"]))   # clears st.rollback: one attempt only
        entry = st.find_eim(result.eim_id)
        seq = st.take_seq()
        eim_sig = rb.get("eim_signature")
        epr = esep.sign_result(st.identity.euicc_key, eim_id=result.eim_id, counter=result.counter,
                               seq_number=seq, results=results, transaction_id=result.transaction_id,
                               association_token=entry.association_token if entry is not None else None,
                               eim_signature=bytes.fromhex(eim_sig) if eim_sig else None,
                               version=st.esipa_version)
        # the enable's result never left the card; the rollback's replaces it
        st.notifications.remove(old)
        st.notifications.append(Notification(seq, EPR_OPERATION, result.eim_id, None, epr.hex().upper()))
        self.isdr._save()
        return answer(0, epr)

    def _switch(self, target: Profile | None, refresh: bool) -> None:
        """Make ``target`` the enabled profile (None: none), with the SGP.22 notifications and the
        modem's reaction, as an enable does, but without policy checks (see the module notes)."""
        current = self.state.enabled_profile()
        if current is target:
            return
        self.isdr.last_refresh_flag = refresh
        if current is not None:
            current.state = PROFILE_DISABLED
            self.isdr._notify(current, "disable")
        if target is not None:
            target.state = PROFILE_ENABLED
            self.isdr._notify(target, "enable")
        self.isdr._save()
        self.isdr._changed()

    # --- Immediate enable (SGP.32 §5.9.15, §5.9.17) -------------------------------------------
    def configure_immediate_enable(self, req: bytes) -> bytes:
        v = self.isdr._dec("ConfigureImmediateProfileEnablingRequest", req)
        if self.state.eims:
            code = EIM_ALREADY_EXISTS                    # with an eIM, only its PSMO may configure this
        else:
            self._store_immediate_enable(v)
            self.isdr._save()
            code = 0
        return self.isdr._enc("ConfigureImmediateProfileEnablingResponse", {"configImmediateEnableResult": code})

    def immediate_enable(self, req: bytes) -> bytes:
        v = self.isdr._dec("ImmediateEnableRequest", req)
        st = self.state
        cfg = st.immediate_enable or {}
        p = st.find_iccid(st.immediate_candidate) if st.immediate_candidate else None
        if not cfg.get("flag"):
            code = 1                                    # immediateEnableNotAvailable
        elif p is None or p.enabled or not _from_configured_smdp(p, cfg):
            code = 4                                    # noSessionContext: no profile just downloaded from it
        elif self.isdr.cat_busy:
            code = CAT_BUSY
        else:
            code = 0 if self.isdr._enable(p, bool(v["refreshFlag"])) == 0 else UNDEFINED_ERROR
        return self.isdr._enc("ImmediateEnableResponse", {"immediateEnableResult": code})

    # --- Fallback (SGP.32 §5.9.20, §5.9.21) --------------------------------------------------
    def execute_fallback(self, req: bytes) -> bytes:
        v = self.isdr._dec("ExecuteFallbackMechanismRequest", req)
        st = self.state
        fb = st.fallback_profile()
        if fb is None:
            code = FALLBACK_NOT_AVAILABLE
        elif fb.enabled:
            code = 2                                    # profileNotInDisabledState: already on it
        elif self.isdr.cat_busy:
            code = CAT_BUSY
        else:
            before = st.enabled_profile()
            self._switch(fb, bool(v["refreshFlag"]))
            st.fallback_return = {"fallback": fb.iccid, "previous": before.iccid if before is not None else None}
            self.isdr._save()
            code = 0
        return self.isdr._enc("ExecuteFallbackMechanismResponse", {"executeFallbackMechanismResult": code})

    def return_from_fallback(self, req: bytes) -> bytes:
        v = self.isdr._dec("ReturnFromFallbackRequest", req)
        st = self.state
        fr = st.fallback_return
        if fr is None:
            code = FALLBACK_NOT_AVAILABLE               # the fallback mechanism is not in force
        else:
            fb = st.find_iccid(fr["fallback"])
            previous = st.find_iccid(fr["previous"]) if fr.get("previous") else None
            if fb is None or not fb.enabled or (fr.get("previous") and previous is None):
                code = COMMAND_ERROR                    # the profile to return to is gone
            elif self.isdr.cat_busy:
                code = CAT_BUSY
            else:
                self._switch(previous, bool(v["refreshFlag"]))     # clears fallback_return
                code = 0
        return self.isdr._enc("ReturnFromFallbackResponse", {"returnFromFallbackResult": code})

    # --- SetDefaultDpAddress, eUICCMemoryReset as SGP.32 tags them ------------------------------
    def set_default_dp_address(self, req: bytes) -> bytes:
        v = self.isdr._dec("SGP32-SetDefaultDpAddressRequest", req)
        self.state.default_dp_address = v["defaultDpAddress"] or None
        self.isdr._save()
        return self.isdr._enc("SGP32-SetDefaultDpAddressResponse", {"setDefaultDpAddressResult": 0})

    def memory_reset(self, req: bytes) -> bytes:
        v = self.isdr._dec("SGP32-EuiccMemoryResetRequest", req)
        bits = set(bits_set(v["resetOptions"]))
        # profile classes: 0 test (field-loaded and pre-loaded alike here), 1 provisioning, 2 operational
        classes = {c for bit, c in ((0, 2), (1, 0), (3, 0), (4, 1)) if bit in bits}
        st = self.state
        answer = {"resetResult": 0 if self.isdr.reset_memory(classes, reset_address=2 in bits) else 1}
        if 5 in bits:
            answer["resetEimResult"] = 0 if st.eims else 1
            st.eims = []
        if 6 in bits:
            answer["resetImmediateEnableConfigResult"] = 0
            st.immediate_enable = None
        if answer.get("resetEimResult") == 0 or 6 in bits:
            answer["resetResult"] = 0
        self.isdr._save()
        return self.isdr._enc("SGP32-EuiccMemoryResetResponse", answer)


# --- helpers --------------------------------------------------------------------------------

def _int_content(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True)


def _set_field(raw: bytes, tag: int, content: bytes | None) -> bytes:
    """``raw`` (a 30 SEQUENCE of context-tagged components) with component ``tag`` set to
    ``content`` (None: removed), kept in tag-number order as DER wants."""
    outer = tlv.parse_single(raw)
    kids = [k.raw for k in tlv.children(outer) if k.tag != tag]
    if content is not None:
        new = tlv.encode(tag, content)
        order = [tlv.parse_single(k).tag & 0x1F for k in kids]
        pos = next((i for i, t in enumerate(order) if t > (tag & 0x1F)), len(kids))
        kids.insert(pos, new)
    return tlv.encode(outer.tag, b"".join(kids))


def _load_public_pem(pem: str):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    return load_pem_public_key(pem.encode())


def _from_configured_smdp(p: Profile, cfg: dict) -> bool:
    """Was ``p`` downloaded from the SM-DP+ ConfigureImmediateProfileEnabling named?"""
    if cfg.get("smdp_oid") and p.smdp_oid != cfg["smdp_oid"]:
        return False
    if cfg.get("smdp_address") and (p.smdp_address or "").lower() != cfg["smdp_address"].lower():
        return False
    return p.smdp_oid is not None or p.smdp_address is not None
