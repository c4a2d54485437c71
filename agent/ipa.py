"""The IPAd: one poll round with an eIM (SGP.32 §3.1-§3.3, §6.3; docs/protocol.md §7).

getEimPackage → execute → provideEimPackageResult → remove what the eIM acknowledged →
again, until the eIM answers noEimPackageAvailable or ``ctx.eim.max_packages`` ran out.
Before new work, results the eUICC still holds from an earlier, interrupted round are
delivered first (SGP.32 §3.3: an EPR stays in the eUICC's list until the eIM acknowledged
it).  Every package is answered: a package that does not parse gets
invalidPackageFormat, an unusable trigger gets a profileDownloadError, a package the
eUICC refused gets its error result — never silence.

What the eUICC signs is relayed byte for byte (docs/protocol.md §0.6): the eIM's BF51
goes to LoadEuiccPackage as received, the eUICC's BF51 result, notifications, PIR and
certificates go to the eIM as the card sent them (eim_client checks the encoded body).

Crash safety (ctx.steps, the daemon's journal): before a package goes to the card the
step ``epkg.<eimId>.<counter>.load`` is recorded, and its result right after
(``….result``).  A resumed job delivers the recorded result instead of loading the
package again; a package loaded but without a recorded result is looked up in the
eUICC's result list first.  The eUICC's counter rejects a replay anyway, and a
replayError for a package whose result the card still holds delivers that stored
result, not the error.
"""
from __future__ import annotations

import dataclasses
import json

from . import codec, esep, esipa, tlv
from .errors import AgentError, ProtocolError, ServerError, TransportError, UsageError
from .es10 import ROLLBACK_RESULTS, Es10Error, make_bits
from .es10_iot import EimConfig
from .ids import eid_to_bytes, iccid_from_bytes
from .logs import get_logger

log = get_logger(__name__)

# EimPackageResultErrorCode / v1.0 eimPackageError (SGP.32 §6.3.2.7)
INVALID_PACKAGE_FORMAT = 1
UNKNOWN_PACKAGE = 2
UNDEFINED_ERROR = 127
# IpaEuiccDataErrorCode
INCORRECT_TAG_LIST = 1
EUICC_CI_PKID_NOT_FOUND = 5
# profileDownloadErrorReason
DOWNLOAD_UNDEFINED_ERROR = 127
# StateChangeCause (SGP.32 §6.3.2.6)
CAUSE_FALLBACK = 1
CAUSE_LOCAL = 3

# IpaEuciccData component for each tag the eIM may ask for (SGP.32 §2.11.1.2; v1.0 numbered some
# differently, sgp32v10.asn).
DATA_TAGS_V12 = {0xA0: "notificationsList", 0x81: "defaultSmdpAddress", 0xA2: "euiccPackageResultList",
                 0xBF20: "euiccInfo1", 0xBF22: "euiccInfo2", 0x83: "rootSmdsAddress", 0x84: "associationToken",
                 0xA5: "eumCertificate", 0xA6: "euiccCertificate", 0xA8: "ipaCapabilities", 0xA9: "deviceInfo"}
DATA_TAGS_V10 = {0x80: "defaultSmdpAddress", 0xBF20: "euiccInfo1", 0xBF22: "euiccInfo2", 0x83: "rootSmdsAddress",
                 0x84: "associationToken", 0xA5: "eumCertificate", 0xA6: "euiccCertificate",
                 0xA8: "ipaCapabilities", 0xA9: "deviceInfo", 0xBF2B: "notificationsList"}


def unknown_tags(tags: list[int], version: str) -> list[int]:
    known = DATA_TAGS_V10 if version == "1.0" else DATA_TAGS_V12
    return [t for t in tags if t not in known]


def ipa_capabilities(indirect: bool = False) -> dict:
    """IpaCapabilities (SGP.32 §4.1): direct downloads (ES9+), indirect ones relayed by the eIM
    (esipa_download.py, used when the eIM's configuration offers it); polling over HTTPS."""
    return {"ipaFeatures": make_bits([0, 1] if indirect else [0]), "ipaSupportedProtocols": make_bits([0])}


def _hex(b: bytes | None) -> str | None:
    return b.hex().upper() if b is not None else None


def result_summary(res: esep.PackageResult) -> list[dict]:
    """The EuiccResultData of a result, JSON-able (for the operation's answer, not for the eIM)."""
    out = []
    for name, v in res.results:
        if name == "listProfileInfoResult":
            kind, lst = v
            v = [iccid_from_bytes(p["iccid"]) for p in lst if p.get("iccid")] if kind == "profileInfoListOk" \
                else {"error": lst}
        elif name in ("getRATResult", "listEimResult", "addEimResult", "setDefaultDpAddressResult"):
            v = v if isinstance(v, (int, str)) else repr(v)[:200]
        out.append({"operation": name, "result": v})
    return out


class Ipa:
    """One IPA session: ``card`` (ops.card.Card), ``client`` (eim_client.EimClient) and the
    eUICC's configuration of that eIM (``eim``, for its id and association token)."""

    def __init__(self, ctx, card, client, eim: EimConfig | None = None):
        self.ctx = ctx
        self.card = card
        self.es10 = card.es10
        self.client = client
        self.version = client.version
        self.eim = eim
        self.eid = card.eid
        self._dl = 0
        self._current: tuple[str, int] | None = None

    # --- the round ------------------------------------------------------------------
    def poll(self, state_change_cause: int | None = None) -> list[dict]:
        relayed = self.deliver_via_eim()
        done = self.deliver_pending()
        if relayed:
            # install results of earlier indirect downloads (not a package; listed so a caller sees them)
            done.insert(0, {"kind": "relayedNotifications", "outcome": "redelivered", "notifications": relayed})
        first = True
        for _ in range(max(1, int(self.ctx.eim.max_packages))):
            self.ctx.cancel.check()
            cause = state_change_cause if first else None
            pkg = self.client.get_eim_package(notify_state_change=cause is not None, state_change_cause=cause)
            first = False
            if pkg.kind == "eimPackageError":
                if pkg.value == esipa.NO_EIM_PACKAGE_AVAILABLE:
                    return done
                from .eim_client import GET_PACKAGE_ERRORS
                name = GET_PACKAGE_ERRORS.get(pkg.value, f"error{pkg.value}")
                raise ServerError(f"eIM {self.client.address} answered getEimPackage with {name} ({pkg.value})"
                                  + (" — it does not know this eUICC's EID" if pkg.value == 2 else ""),
                                  code="eim_refused", details={"eim_package_error": pkg.value, "eid": self.eid})
            done.append(self.execute(pkg))
        self.ctx.warning(f"stopped after {self.ctx.eim.max_packages} packages in one poll (max_packages); the rest "
                         "waits for the next poll")
        return done

    def execute(self, pkg) -> dict:
        if pkg.kind == "undecodable":
            entry = {"kind": pkg.alternative, "outcome": "error",
                     "error": {"code": "bad_euicc_package" if pkg.alternative == "euiccPackageRequest"
                               else "bad_esipa_message", "message": pkg.error or "the package does not decode"}}
            self._answer_error(INVALID_PACKAGE_FORMAT, None, entry)
            return entry
        if pkg.kind == "euiccPackageRequest":
            return self.euicc_package(pkg.raw)
        if pkg.kind == "ipaEuiccDataRequest":
            return self.euicc_data(pkg.value)
        if pkg.kind == "profileDownloadTriggerRequest":
            return self.download_trigger(pkg.value)
        entry = {"kind": pkg.kind, "outcome": "error", "error": {"code": "bad_esipa_message",
                                                                 "message": "unknown package"}}
        self._answer_error(UNKNOWN_PACKAGE, None, entry)
        return entry

    # --- sending results --------------------------------------------------------------
    def _value(self, alt: str, v):
        if self.version == "1.0":
            return (alt, v)
        return {"eidValue": eid_to_bytes(self.eid), "eimPackageResult": (alt, v)}

    def _provide(self, alt: str, v, relayed: list[bytes], entry: dict, also_remove=()) -> None:
        """provideEimPackageResult, then remove from the eUICC what the eIM acknowledged."""
        answer = self.client.provide_eim_package_result(self._value(alt, v), relayed=relayed)
        entry["delivered"] = True
        if answer.error is not None:
            entry["eim_error"] = answer.error
            self.ctx.warning(f"the eIM answered provideEimPackageResult with error {answer.error}")
        entry["acknowledged"] = answer.acknowledgements
        self._remove(answer.acknowledgements, also_remove)

    def _remove(self, acked: list[int], also_remove=()) -> None:
        if not acked:
            return
        self.ctx.steps.step("ack", seqs=list(acked))
        for seq in list(acked) + [s for s in also_remove if acked]:
            try:
                self.es10.remove_notification(seq)    # nothingToDelete: gone already (a resumed job)
            except Es10Error as e:
                self.ctx.warning(f"acknowledged result {seq} not removed from the eUICC: {e.message}")

    def _answer_error(self, code: int, transaction_id: bytes | None, entry: dict) -> None:
        if self.version == "1.0":
            self._provide("eimPackageError", code, [], entry)
            return
        v: dict = {"eimPackageResultErrorCode": code}
        if transaction_id is not None:
            v["eimTransactionId"] = transaction_id
        self._provide("eimPackageResultResponseError", v, [], entry)

    # --- results left on the card -----------------------------------------------------------
    def _held_results(self) -> list[esep.PackageResult]:
        out = []
        for raw in self.es10.euicc_package_results():
            try:
                out.append(esep.decode_package_result(raw))
            except ProtocolError as e:
                self.ctx.warning(f"the eUICC holds an unreadable package result: {e.message}")
        return out

    def _stored_result(self, eim_id: str, counter: int) -> bytes | None:
        """The newest result the eUICC holds for package (eim_id, counter) (a rollback's result
        supersedes the enable's)."""
        mine = [r for r in self._held_results() if r.eim_id == eim_id and r.counter == counter
                and r.seq_number is not None]
        return max(mine, key=lambda r: r.seq_number).der if mine else None

    def deliver_pending(self) -> list[dict]:
        """Deliver the results still on the eUICC (an earlier round was cut off, or the eIM did not
        acknowledge): the newest per package; older ones go when it is acknowledged."""
        held = [r for r in self._held_results() if r.seq_number is not None
                and (self.eim is None or r.eim_id == self.eim.eim_id)]
        newest: dict[tuple, esep.PackageResult] = {}
        older: dict[tuple, list[int]] = {}
        for r in sorted(held, key=lambda r: r.seq_number):
            key = (r.eim_id, r.counter)
            if key in newest:
                older.setdefault(key, []).append(newest[key].seq_number)
            newest[key] = r
        out = []
        for key, r in sorted(newest.items(), key=lambda kv: kv[1].seq_number):
            self.ctx.cancel.check()
            entry = {"kind": "euiccPackageResult", "outcome": "redelivered", "seq_number": r.seq_number,
                     "counter": r.counter, "eim_transaction_id": _hex(r.transaction_id),
                     "results": result_summary(r) if r.ok else [], **({"error": r.error} if not r.ok else {})}
            self._provide("euiccPackageResult", codec.decode("EuiccPackageResult", r.der), [r.der], entry,
                          also_remove=older.get(key, ()))
            out.append(entry)
        return out

    # --- eUICC packages ------------------------------------------------------------------
    def _enabled_iccid(self) -> str | None:
        p = next((p for p in self.es10.get_profiles_info() if p.state == "enabled"), None)
        return p.iccid if p else None

    def euicc_package(self, raw: bytes) -> dict:
        steps = self.ctx.steps
        entry: dict = {"kind": "euiccPackageRequest"}
        try:
            req = esep.decode_package_request(raw)
        except ProtocolError as e:
            entry.update(outcome="error", error={"code": "bad_euicc_package", "message": e.message})
            self._answer_error(INVALID_PACKAGE_FORMAT, None, entry)
            return entry
        entry.update(eim_transaction_id=_hex(req.transaction_id), counter=req.counter,
                     operations=[name for name, _ in req.operations])
        enables = [v for name, v in req.operations if name == "enable"] if req.kind == "psmoList" else []
        rollback_flag = any("rollbackFlag" in v for v in enables)
        key = f"epkg.{req.eim_id}.{req.counter}."
        self._current = (req.eim_id, req.counter)
        loaded = steps.seen(key + "load")
        stored = steps.seen(key + "result")
        if stored is not None:                      # a resumed job: the card answered before the cut
            epr = bytes.fromhex(stored["epr"])
            entry["resumed"] = True
        else:
            epr = self._stored_result(req.eim_id, req.counter) if loaded is not None else None
            if epr is None:
                loaded = {"previous": self._enabled_iccid(),
                          "notifications": sorted(n.seq_number for n in self.es10.list_notifications())}
                steps.step(key + "load", eim_id=req.eim_id, counter=req.counter,
                           transaction_id=_hex(req.transaction_id), **loaded)
                epr = self.es10.load_euicc_package(raw)
                res = esep.decode_package_result(epr)
                if res.kind == "euiccPackageErrorSigned" and res.error == esep.REPLAY_ERROR:
                    # The eIM sent a package the card already ran (its result was lost on the way):
                    # the stored result is the answer, not this replay error.
                    old = self._stored_result(req.eim_id, req.counter)
                    if old is not None:
                        epr = old
                        entry["replayed"] = True
            steps.step(key + "result", epr=epr.hex())
        res = esep.decode_package_result(epr)
        previous = loaded.get("previous") if loaded else None
        entry.update(outcome="executed" if res.ok else "refused", seq_number=res.seq_number,
                     results=result_summary(res) if res.ok else [])
        if not res.ok:
            entry["error"] = {"kind": res.kind, "code": res.error}
        switched = False
        if res.ok and enables:
            now = self._enabled_iccid()
            if now != previous and now is not None:
                switched = True
                entry.update(iccid=now, previous=previous)
                epr = self._after_switch(key, entry, epr, now, previous, rollback_flag)
        notes = self._new_notifications(loaded)
        try:
            self._deliver_result(epr, notes, entry)
        except (TransportError, ServerError) as e:
            if not (switched and rollback_flag and "rolled_back_to" not in entry and "rollback_error" not in entry):
                raise
            # SGP.32 §3.2.1.1: the result cannot be delivered over the new profile: roll back, then report.
            self.ctx.warning(f"the result cannot be delivered after the switch ({e.message}); rolling back")
            entry["delivery_error"] = e.to_json()
            epr = self._rollback(key, entry, epr, previous)
            self._deliver_result(epr, self._new_notifications(loaded), entry)
        return entry

    def _deliver_result(self, epr: bytes, notes: list[bytes], entry: dict) -> None:
        eprv = codec.decode("EuiccPackageResult", epr)
        if not notes:
            self._provide("euiccPackageResult", eprv, [epr], entry)
            return
        pending = [codec.decode("SGP32-PendingNotification", n) for n in notes]
        lst = ("notificationList", pending) if self.version == "1.0" else pending
        entry["notifications"] = len(notes)
        self._provide("ePRAndNotifications", {"euiccPackageResult": eprv, "notificationList": lst},
                      [epr, *notes], entry)

    def _new_notifications(self, loaded: dict | None) -> list[bytes]:
        """The notifications the package caused: on the card now, not before it was loaded."""
        before = set((loaded or {}).get("notifications", []))
        return [p.der for p in self.es10.retrieve_notifications() if p.seq_number not in before]

    def _after_switch(self, key: str, entry: dict, epr: bytes, now: str, previous: str | None,
                      rollback_flag: bool) -> bytes:
        """The enabled profile changed: make the modem take it and wait for registration
        (ops/switch.py); roll back when it does not attach and the package allows one rollback."""
        from .ops.switch import settle, wait_attached
        steps = self.ctx.steps
        if steps.seen(key + "rollback") is not None:      # resumed in the middle of a rollback
            return self._rollback(key, entry, epr, previous)
        if steps.seen(key + "switch") is None:
            steps.step(key + "switch", iccid=now, previous=previous)
            settle(self.ctx, self.card, self.ctx.refresh)
            self.es10 = self.card.es10
        steps.step(key + "attach_wait", iccid=now, seconds=self.ctx.rollback_after)
        attached, reg, checked = wait_attached(self.ctx, self.card, self.ctx.rollback_after)
        self.es10 = self.card.es10
        entry.update(attached=attached, attach_checked=checked,
                     registration=reg.to_json() if reg is not None else None)
        if attached or not rollback_flag:
            if not attached:
                self.ctx.warning(f"profile {now} did not register within {self.ctx.rollback_after:g} s (the package "
                                 "allows no rollback)")
            return epr
        self.ctx.warning(f"profile {now} did not register within {self.ctx.rollback_after:g} s; rolling back")
        return self._rollback(key, entry, epr, previous)

    def _rollback(self, key: str, entry: dict, epr: bytes, previous: str | None) -> bytes:
        """ES10b ProfileRollback (SGP.32 §5.9.16): its result replaces the enable's."""
        from .ops.switch import settle, wait_attached
        steps = self.ctx.steps
        done = steps.seen(key + "rolled_back")
        if done is not None:
            entry.update(rolled_back_to=previous, outcome="rolled_back")
            return bytes.fromhex(done["epr"]) if done.get("epr") else epr
        if steps.seen(key + "rollback") is not None and self._enabled_iccid() == previous:
            # resumed after the card rolled back: its result is the newest for this package
            rb = self._stored_result(*self._current) if self._current else None
            cmd = 0
        else:
            steps.step(key + "rollback", previous=previous)
            cmd, rb = self.es10.profile_rollback(self.ctx.refresh)
        if cmd != 0:
            entry["rollback_error"] = ROLLBACK_RESULTS.get(cmd, f"result{cmd}")
            self.ctx.warning(f"ProfileRollback refused: {entry['rollback_error']}")
            return epr
        settle(self.ctx, self.card, self.ctx.refresh)
        self.es10 = self.card.es10
        attached, reg, _ = wait_attached(self.ctx, self.card, self.ctx.rollback_after)
        self.es10 = self.card.es10
        steps.step(key + "rolled_back", epr=rb.hex() if rb else None, attached=attached)
        entry.update(rolled_back_to=previous, previous_attached=attached, outcome="rolled_back")
        return rb or epr

    # --- IPA eUICC data ----------------------------------------------------------------------
    def euicc_data(self, req: dict) -> dict:
        tid = req.get("eimTransactionId")
        entry: dict = {"kind": "ipaEuiccDataRequest", "eim_transaction_id": _hex(tid)}
        tags = tlv.parse_tag_list(req["tagList"])
        entry["tags"] = [f"{t:X}" for t in tags]
        bad = unknown_tags(tags, self.version)
        code = None
        if bad:
            code = INCORRECT_TAG_LIST
            entry["error"] = {"code": "incorrect_tag_list", "tags": [f"{t:X}" for t in bad]}
        else:
            try:
                data, relayed = self._gather(tags, req)
            except Es10Error as e:
                code = EUICC_CI_PKID_NOT_FOUND if e.function == "GetCerts" and e.value == 1 else UNDEFINED_ERROR
                entry["error"] = e.to_json()
        if code is not None:
            entry["outcome"] = "error"
            if self.version == "1.0":
                resp = ("ipaEuiccDataError", code)
            else:
                err: dict = {"ipaEuiccDataErrorCode": code}
                if tid is not None:
                    err["eimTransactionId"] = tid
                resp = ("ipaEuiccDataResponseError", err)
            self._provide("ipaEuiccDataResponse", resp, [], entry)
            return entry
        if tid is not None and self.version != "1.0":
            data["eimTransactionId"] = tid
        entry["outcome"] = "answered"
        self._provide("ipaEuiccDataResponse", ("ipaEuiccData", data), relayed, entry)
        return entry

    def _gather(self, tags: list[int], req: dict) -> tuple[dict, list[bytes]]:
        """IpaEuiccData from ES10 calls, one component per requested tag (SGP.32 §2.11.2.2)."""
        names = DATA_TAGS_V10 if self.version == "1.0" else DATA_TAGS_V12
        wanted = {names[t] for t in tags}
        data: dict = {}
        relayed: list[bytes] = []
        if "euiccInfo1" in wanted:
            data["euiccInfo1"] = codec.decode("EUICCInfo1", self.es10.get_euicc_info1().raw)
        if "euiccInfo2" in wanted:
            data["euiccInfo2"] = codec.decode("SGP32-EUICCInfo2", self.es10.get_euicc_info2().raw)
        if wanted & {"eumCertificate", "euiccCertificate"}:
            ci = req.get("euiccCiPKIdentifierToBeUsed", req.get("euiccCiPKId"))
            eum, euicc = self.es10.get_certs(ci)
            if "eumCertificate" in wanted:
                data["eumCertificate"] = codec.decode("Certificate", eum)
                relayed.append(eum[_content_offset(eum):])
            if "euiccCertificate" in wanted:
                data["euiccCertificate"] = codec.decode("Certificate", euicc)
                relayed.append(euicc[_content_offset(euicc):])
        if wanted & {"defaultSmdpAddress", "rootSmdsAddress"}:
            addr = self.es10.get_configured_addresses()
            if "defaultSmdpAddress" in wanted and addr.default_dp_address:
                data["defaultSmdpAddress"] = addr.default_dp_address
            if "rootSmdsAddress" in wanted and addr.root_ds_address:
                data["rootSmdsAddress"] = addr.root_ds_address
        if "associationToken" in wanted and self.eim is not None and self.eim.association_token is not None:
            data["associationToken"] = self.eim.association_token
        if "ipaCapabilities" in wanted:
            data["ipaCapabilities"] = ipa_capabilities(indirect=True)
        if "deviceInfo" in wanted:
            from .flows.download import device_info
            data["deviceInfo"] = device_info(self.card.imei())
        if self.version == "1.0":
            if "notificationsList" in wanted:
                crit = req.get("searchCriteria")
                if crit is not None and crit[0] == "euiccPackageResults":
                    eprs = self.es10.euicc_package_results()
                    data["notificationsList"] = ("euiccPackageResultList",
                                                 [codec.decode("EuiccPackageResult", r) for r in eprs])
                    relayed += eprs
                else:
                    notes = self._notifications(crit)
                    data["notificationsList"] = ("notificationList",
                                                 [codec.decode("SGP32-PendingNotification", n) for n in notes])
                    relayed += notes
            return data, relayed
        if "notificationsList" in wanted:
            notes = self._notifications(req.get("searchCriteriaNotification"))
            data["notificationsList"] = [codec.decode("SGP32-PendingNotification", n) for n in notes]
            relayed += notes
        if "euiccPackageResultList" in wanted:
            crit = req.get("searchCriteriaEuiccPackageResult")
            eprs = self.es10.euicc_package_results()
            if crit is not None:
                eprs = [r for r in eprs if (esep.decode_package_result(r).seq_number or 0) >= crit[1]]
            data["euiccPackageResultList"] = [codec.decode("EuiccPackageResult", r) for r in eprs]
            relayed += eprs
        return data, relayed

    def _notifications(self, crit) -> list[bytes]:
        if crit is not None and crit[0] == "seqNumber":
            items = self.es10.retrieve_sgp32(seq=crit[1])
        elif crit is not None and crit[0] == "profileManagementOperation":
            from .es10 import pmo_name
            items = self.es10.retrieve_sgp32(operation=pmo_name(crit[1]))
        else:
            items = self.es10.retrieve_sgp32()
        return [i for i in items if tlv.parse_single(i).tag != 0xBF51]

    # --- Profile Download Trigger ----------------------------------------------------------
    @property
    def indirect(self) -> bool:
        """Downloads go through the eIM when its configuration on the eUICC offers it
        (EimConfigurationData indirectProfileDownload, SGP.32 §2.11.1.1.1 v1.2); else directly."""
        return self.eim is not None and self.eim.indirect_download

    def download_trigger(self, req: dict) -> dict:
        tid = req.get("eimTransactionId")
        entry: dict = {"kind": "profileDownloadTriggerRequest", "eim_transaction_id": _hex(tid)}
        self._dl += 1
        sub = dataclasses.replace(self.ctx, steps=self.ctx.steps.child(f"dl.{_hex(tid) or self._dl}"))
        # a resumed job keeps the kind it started with
        started = sub.steps.seen("start")
        indirect = started.get("mode") == "indirect" if started is not None else self.indirect
        entry["mode"] = "indirect" if indirect else "direct"
        pir: bytes | None = None
        error: AgentError | None = None
        try:
            pir = self._download(sub, req.get("profileDownloadData"), entry, indirect, tid)
        except AgentError as e:
            if getattr(e, "reason", None) in ("interrupted", "terminated"):
                raise
            error = e
            seq = e.details.get("notification_seq")
            if seq is not None:          # the eUICC refused the profile: its signed PIR is the answer
                found = [p.der for p in self.es10.retrieve_notifications(seq=seq)]
                pir = found[0] if found else None
        if pir is not None:
            entry["outcome"] = "installed" if error is None else "refused"
            if error is not None:
                entry["error"] = error.to_json()
            v: dict = {"profileDownloadTriggerResultData": ("profileInstallationResult",
                                                            codec.decode("ProfileInstallationResult", pir))}
            relayed = [pir]
        else:
            entry.update(outcome="error", error=error.to_json())
            detail = json.dumps(error.to_json(), separators=(",", ":"), default=str).encode()[:1024]
            err = {"errorResponse": detail} if self.version == "1.0" else \
                {"profileDownloadErrorReason": DOWNLOAD_UNDEFINED_ERROR, "errorResponse": detail}
            v = {"profileDownloadTriggerResultData": ("profileDownloadError", err)}
            relayed = []
        if tid is not None:
            v["eimTransactionId"] = tid
        self._provide("profileDownloadTriggerResult", v, relayed, entry)
        if pir is not None and error is not None:
            # the refused package's PIR also goes to the SM-DP+ (through the eIM when it was indirect)
            if indirect:
                self._via_eim(sub, tid, entry, seq=error.details.get("notification_seq"))
            else:
                from .ops.notifications import safe_deliver
                safe_deliver(self.ctx, self.card)
        return entry

    def _download(self, ctx, data, entry: dict, indirect: bool, tid: bytes | None) -> bytes:
        """Download the profile the trigger names with flows/download.py: directly over ES9+ from
        the SM-DP+ (SGP.22 flow), or indirectly, every ES9+ step relayed by the eIM over ESipa
        (SGP.32 §3.2.3, esipa_download.py); returns the PIR as the eUICC signed it.  The PIR is
        kept in the outbox for the SM-DP+ and sent to it: directly, or through the eIM's
        handleNotification."""
        from .flows.download import Downloader, DownloadOptions
        from .ops.download import resolve
        from .ops.notifications import after_change, server_answered
        if data is None:
            raise UsageError("the profile download trigger carries no profile download data", code="bad_input")
        alt, v = data
        if alt == "contactSmds":
            raise UsageError("the trigger asks for an SM-DS discovery, which this IPA does not do",
                             code="bad_input")
        ac = v if alt == "activationCode" else None
        stored = ctx.steps.seen("pir")
        if stored is not None:
            entry["iccid"] = stored.get("iccid")
            if indirect:        # cut off before the eIM took the install result: it goes now
                self._via_eim(ctx, tid, entry, seq=stored.get("seq"))
            return bytes.fromhex(stored["der"])
        address, mid, oid, acobj = resolve(self.card, activation_code=ac)
        entry["smdp_address"] = address
        if acobj is not None and acobj.cc_required:
            raise UsageError("the activation code requires a confirmation code, which an eIM trigger cannot carry",
                             code="confirmation_code_required")
        earlier = ctx.steps.seen("metadata")
        if earlier is not None:
            pir = self._find_pir(earlier["iccid"])
            if pir is not None:
                entry["iccid"] = earlier["iccid"]
                if indirect:
                    seq = next((p.seq_number for p in self.es10.retrieve_notifications(operation="install")
                                if p.der == pir), None)
                    self._via_eim(ctx, tid, entry, seq=seq)
                return pir
        opts = DownloadOptions(address=address, matching_id=mid, imei=self.card.imei(),
                               consent=lambda meta: True, smdp_oid=oid, progress=ctx.progress,
                               long_timeout=self.card.settings.long_timeout, cancel=ctx.cancel,
                               record=ctx.steps.step)
        ctx.steps.step("start", address=address, matching_id=mid, mode=entry["mode"])
        if indirect:
            from .esipa_download import EsipaDownloadClient
            res = Downloader(self.es10, EsipaDownloadClient(self.client, eim_transaction_id=tid), opts).run()
        else:
            pool = ctx.servers.pool()
            try:
                res = Downloader(self.es10, pool(address), opts).run()
            finally:
                pool.close()
        found = [p.der for p in self.es10.retrieve_notifications(seq=res.notification_seq)] \
            if res.notification_seq is not None else []
        pir = found[0] if found else self._find_pir(res.iccid)
        if pir is None:
            raise ProtocolError("the profile was installed but its ProfileInstallationResult is gone from the eUICC",
                                code="no_install_result")
        ctx.steps.step("pir", der=pir.hex(), iccid=res.iccid, seq=res.notification_seq)
        entry["iccid"] = res.iccid
        if indirect:
            self._via_eim(ctx, tid, entry, seq=res.notification_seq)
            return pir
        data_out: dict = {}
        server_answered(ctx, address)
        after_change(ctx, self.card, data_out)
        if "notifications" in data_out:
            entry["notifications"] = data_out["notifications"]
        return pir

    # --- notifications relayed by the eIM ---------------------------------------------------
    def _via_eim(self, ctx, tid: bytes | None, entry: dict, *, seq: int | None) -> None:
        """The install result of an indirect download goes to the SM-DP+ through the eIM
        (ESipa handleNotification, SGP.32 §6.3.2.4), never directly (the device may not reach
        the SM-DP+).  Kept durably as any notification (flows/notifications.py: recorded in
        the outbox first, removed from the eUICC only once the eIM accepted it), under the
        address ``esipa:<eIM>`` (esipa_download.VIA_EIM), which only the poll round delivers
        (:meth:`deliver_via_eim`).  A failure is reported, not raised: the trigger's result
        still goes to the eIM, and the next poll tries again."""
        if seq is None:
            return
        from .esipa_download import EsipaDownloadClient
        from .flows.notifications import process
        from .store import Outbox
        relay = EsipaDownloadClient(self.client, eim_transaction_id=tid)
        try:
            with Outbox(ctx.outbox_path()) as ob:
                # recorded even when notifications are not sent right away: it must go through the eIM
                on_card = self.es10.retrieve_notifications(seq=seq)
                for p in on_card:
                    ob.record(self.eid, p.seq_number, p.operation, relay.outbox_address, p.iccid, p.der)
                held = ob.get(self.eid, seq)
                if not ctx.notifications or (not on_card and (held is None or held.delivered)):
                    return          # not now, or delivered already (a resumed job)
                done = process(self.es10, ob, lambda address: relay, eid=self.eid, seqs=[seq], cancel=ctx.cancel,
                               force=True, via_eim=True)
        except AgentError as e:
            if getattr(e, "reason", None) in ("interrupted", "terminated"):
                raise
            entry["notifications_error"] = e.to_json()
            ctx.warning(f"the install result was not sent through the eIM: {e.message}; the next poll sends it")
            return
        entry["notifications"] = [d.to_json() for d in done]
        for d in done:
            if d.status not in ("delivered", "removed"):
                ctx.warning(f"notification {d.seq_number} was not sent through the eIM"
                            f"{': ' + d.error['message'] if d.error else ''}; it stays in the outbox and the "
                            "next poll sends it")

    def deliver_via_eim(self) -> list[dict]:
        """Install results of earlier indirect downloads that did not reach this eIM yet (outbox
        address ``esipa:<this eIM>``): delivered first in every poll round."""
        from .esipa_download import VIA_EIM, EsipaDownloadClient
        path = self.ctx.outbox_path()
        address = getattr(self.client, "address", None)
        if not self.ctx.notifications or address is None or not path.exists():
            return []
        from .flows.notifications import process
        from .store import Outbox
        try:
            with Outbox(path) as ob:
                seqs = [n.seq_number for n in ob.pending(self.eid) if n.address == VIA_EIM + address]
                if not seqs:
                    return []
                relay = EsipaDownloadClient(self.client)
                done = process(self.es10, ob, lambda a: relay, eid=self.eid, seqs=seqs, cancel=self.ctx.cancel,
                               force=True, via_eim=True)
        except AgentError as e:
            if getattr(e, "reason", None) in ("interrupted", "terminated"):
                raise
            self.ctx.warning(f"earlier install results were not sent through the eIM: {e.message}")
            return []
        out = [d.to_json() for d in done]
        for d in out:
            if d["status"] not in ("delivered", "removed"):
                self.ctx.warning(f"notification {d['seq_number']} still not sent through the eIM; it stays in the "
                                 "outbox")
        return out

    def _find_pir(self, iccid: str) -> bytes | None:
        """The PIR of ``iccid``: on the eUICC, else in the outbox (delivered to the SM-DP+ already)."""
        for p in self.es10.retrieve_notifications(operation="install"):
            if p.iccid == iccid and p.der[:2] == b"\xBF\x37":
                return p.der
        path = self.ctx.outbox_path()
        if path.exists():
            from .store import Outbox
            with Outbox(path) as ob:
                for n in ob.list(self.eid):
                    if n.iccid == iccid and n.operation == "install" and n.der:
                        return bytes(n.der)
        return None


def _content_offset(der: bytes) -> int:
    """Where the content of a TLV starts (a certificate is relayed under an implicit A5/A6 tag)."""
    _, _, off = tlv.read_header(der)
    return off
