"""Local eIM for the test bed (SGP.32): ESipa server side, eUICC packages, operations.

One HTTPS server on loopback (TLS with DIR/eim/tls.pem, issued by the test PKI's CI) serves

* ESipa (SGP.32 §6) in both bindings: ``POST /gsma/rsp2/asn1`` (ASN.1) and
  ``POST /gsma/rsp2/esipa/<function>`` (JSON), in the wire forms of v1.2 or v1.0
  (``agent.esipa`` holds both; the version is configured, never guessed);
* the operations REST API shaped after emnify's eUICC API (``agent.sim.eim_api``).

:class:`Eim` is the eIM's logic, I/O free (ESipa body in, ESipa body out; REST calls go
through :class:`agent.sim.eim_api.EimApi`), kept in an :class:`~agent.sim.eim_store.EimStore`:

* **Learning an eUICC** (docs/protocol.md §7): the first getEimPackage of an unknown EID
  registers it and queues an IpaEuiccDataRequest (EUICCInfo2, EUM and eUICC
  certificates, default SM-DP+ address, association token) and then an audit
  (PSMO listProfileInfo). The eUICC certificate must chain to the PKI's CI through the
  EUM certificate and name the EID; its key then verifies every result (SGP.32 §2.11.2.1).
* **Packages**: one per getEimPackage. A PSMO package is signed with the eIM key
  (``agent.esep``, SGP.32 §2.11.1.1) under the eUICC's next counter value and always
  carries a fresh 16-byte eimTransactionId, by which its result is matched. Until its
  result arrives the package stays in flight and a repeated poll gets the same bytes
  again (never a second counter for the same operation). Operations whose validity
  elapsed before the device fetched them become Expired and are never sent.
* **Results** (provideEimPackageResult): an EPR is verified over the bytes as received
  with the eUICC's key (failure: the operation is Failed, nothing is acknowledged);
  each EuiccResultData becomes the operation's outcome and updates the profile records;
  the answer acknowledges the EPR's seqNumber and those of the notifications it carried
  (SGP.32 §6.3.2.7), which lets the IPA remove them from the eUICC.

Download (emnify action 2) is a ProfileDownloadTriggerRequest (the IPA downloads
directly from the SM-DP+); its result's ProfileInstallationResult names the new ICCID,
and with ``enable`` an enable PSMO follows in the same poll round.

Profile status ids, operation actions and statuses are emnify's lists (see eim_api).
An operation error is ``{reason: <the spec's integer code>, message: "<spec name>: …"}``:
emnify documents ``reason`` as an integer; eIM-side failures (signature, rollback, …)
use 127 (undefinedError) and name themselves in ``reason_name``.
"""
from __future__ import annotations

import base64
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from pathlib import Path

from .. import codec, crypto, esep, esipa, tlv
from ..errors import AgentError
from ..ids import eid_from_bytes, iccid_from_bytes, iccid_to_bytes
# the HTTPS scaffolding the local SM-DP+ uses (TLS per connection, body limits, any method)
from .smdpp import BPP_ERRORS, ListenError, _Handler, _Httpd, _HttpError

EIM_ID = "esim-agent-eim"
ESIPA_VERSIONS = esipa.VERSIONS
MAX_BODY = 1 << 20

# emnify eUICC profile status ids (the list GET /api/v1/euicc/profile/status serves)
P_AVAILABLE, P_RESERVED, P_DOWNLOADING, P_DOWNLOADED, P_INSTALLED = 1, 2, 3, 4, 5
P_DISABLING, P_DISABLED, P_ENABLED, P_DELETED, P_UNKNOWN = 6, 7, 8, 9, 10
PROFILE_STATUSES = {1: "Available", 2: "Reserved", 3: "Downloading", 4: "Downloaded", 5: "Installed",
                    6: "Disabling", 7: "Disabled", 8: "Enabled", 9: "Deleted", 10: "Unknown"}
# emnify operation actions and statuses
A_AUDIT, A_DOWNLOAD, A_ENABLE, A_FALLBACK, A_DELETE = 1, 2, 3, 4, 5
ACTIONS = {1: "Audit", 2: "Download", 3: "Enable", 4: "Set fallback", 5: "Delete"}
S_SCHEDULED, S_SUCCEEDED, S_FAILED, S_EXPIRED, S_CANCELED = 1, 2, 3, 4, 5
OP_STATUSES = {1: "Scheduled", 2: "Succeeded", 3: "Failed", 4: "Expired", 5: "Canceled"}

UNDEFINED = 127
# IpaEuiccData tags the eIM asks for when it learns an eUICC (SGP.32 §2.11.1.2): euiccInfo2,
# EUM and eUICC certificates, default SM-DP+ address (v1.2 81, v1.0 80), association token.
TAG_LIST = {"1.2": bytes.fromhex("BF22A5A68184"), "1.0": bytes.fromhex("BF22A5A68084")}

# result codes -> spec names (asn1/sgp32.asn), for error messages
_RESULT_NAMES = {
    "enableResult": {1: "iccidOrAidNotFound", 2: "profileNotInDisabledState", 3: "disallowedByPolicy",
                     5: "catBusy", 20: "rollbackNotAvailable", 127: "undefinedError"},
    "disableResult": {1: "iccidOrAidNotFound", 2: "profileNotInEnabledState", 3: "disallowedByPolicy",
                      5: "catBusy", 127: "undefinedError"},
    "deleteResult": {1: "iccidOrAidNotFound", 2: "profileNotInDisabledState", 3: "disallowedByPolicy",
                     20: "rollbackNotAvailable", 21: "returnFallbackProfile", 127: "undefinedError"},
    "setFallbackAttributeResult": {1: "iccidOrAidNotFound", 2: "fallbackNotAllowed", 3: "fallbackProfileEnabled",
                                   127: "undefinedError"},
    "processingTerminated": {1: "resultSizeOverflow", 2: "unknownOrDamagedCommand", 3: "interruption",
                             127: "undefinedError"},
    "profileInfoListError": {1: "incorrectInputValues", 11: "profileChangeOngoing", 127: "undefinedError"},
}
_MESSAGES = {
    "iccidOrAidNotFound": "the eUICC has no profile with this ICCID",
    "profileNotInDisabledState": "the profile is not disabled",
    "profileNotInEnabledState": "the profile is not enabled",
    "disallowedByPolicy": "the profile's policy rules forbid it",
    "catBusy": "the eUICC's toolkit was busy; try again",
    "rollbackNotAvailable": "no rollback is possible",
    "returnFallbackProfile": "the fallback profile is in use",
    "fallbackNotAllowed": "the profile does not allow being the fallback profile",
    "fallbackProfileEnabled": "the fallback profile is enabled",
    "resultSizeOverflow": "the result did not fit the eUICC's memory",
    "unknownOrDamagedCommand": "the eUICC did not understand the operation",
    "interruption": "the eUICC was interrupted",
    "incorrectInputValues": "the eUICC refused the request's values",
    "profileChangeOngoing": "a profile change was ongoing",
    "invalidEid": "the package named another EID",
    "replayError": "the package's counter was not above the last one the eUICC accepted (replay)",
    "counterValueOutOfRange": "the counter value is out of range",
    "sizeOverflow": "the package was too large for the eUICC",
    "ecallActive": "an eCall is active",
    "undefinedError": "the eUICC reported an undefined error",
    "invalidPackageFormat": "the IPA could not parse the package",
    "unknownPackage": "the IPA does not know this kind of package",
}
_EPR_ERRORS = {3: "invalidEid", 4: "replayError", 6: "counterValueOutOfRange", 15: "sizeOverflow",
               104: "ecallActive", 127: "undefinedError"}
_EPR_RESULT_ERRORS = {1: "invalidPackageFormat", 2: "unknownPackage", 127: "undefinedError"}

_log = logging.getLogger("agent.sim.eim")


def log(msg: str) -> None:
    _log.info("%s", msg)


def _log_to_stderr() -> None:
    if not _log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("eim: %(message)s"))
        _log.addHandler(h)
    _log.setLevel(logging.INFO)


def error(reason: int, name: str, message: str | None = None) -> dict:
    """An operation's ``error`` object (emnify ErrorResponse: integer reason, message)."""
    text = message or _MESSAGES.get(name, name)
    return {"reason": int(reason), "message": f"{name}: {text}", "reason_name": name}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


class EsipaReject(Exception):
    """An ESipa request we answer with an HTTP 4xx (not even an ESipa message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --- the eIM -----------------------------------------------------------------------------------


class Eim:
    """The eIM's state machine over an EimStore. Thread safe (every entry point holds the store)."""

    def __init__(self, store, *, sign_key, ci_cert, version: str = "1.2", eim_id: str = EIM_ID,
                 clock=time.time, indirect: bool = False, smdp_ca: str | None = None):
        if version not in ESIPA_VERSIONS:
            raise ValueError(f"ESipa version {version!r} is not one of {ESIPA_VERSIONS}")
        self.store = store
        self.key = sign_key
        self.ci_cert = ci_cert
        self.version = version
        self.eim_id = eim_id
        self.clock = clock
        # indirect profile download: the ES9+' relay (SGP.32 §3.2.3); smdp_ca verifies the SM-DP+'s TLS
        self.indirect = bool(indirect)
        self.relay = Es9Relay(self, smdp_ca) if indirect else None

    # --- records ------------------------------------------------------------------------------

    def _euicc(self, data: dict, eid: str) -> dict | None:
        return data["euiccs"].get(eid)

    def euicc_by_id(self, data: dict, euicc_id: int) -> dict | None:
        return next((e for e in data["euiccs"].values() if e["id"] == euicc_id), None)

    def _register(self, data: dict, eid: str) -> dict:
        now = self.clock()
        rec = {"id": data["next_euicc_id"], "eid": eid, "created": now, "modified": now,
               "last_polled": None, "last_audited": None, "last_synced": None,
               "euicc_cert": None, "eum_cert": None, "cert_ok": False, "association_token": None,
               "default_smdp": None, "counter": 0, "profiles": [], "queue": [], "inflight": None}
        data["next_euicc_id"] += 1
        data["euiccs"][eid] = rec
        rec["queue"] += [self._ipa_data_step(None), self._psmo_step(None, "listProfileInfo")]
        log(f"learnt eUICC {eid} (id {rec['id']}): asking for its data, then an audit")
        return rec

    @staticmethod
    def _ipa_data_step(op_id) -> dict:
        return {"kind": "ipa_data", "op": op_id}

    @staticmethod
    def _psmo_step(op_id, psmo: str, iccid: str | None = None, rollback: bool = False) -> dict:
        return {"kind": "psmo", "op": op_id, "psmo": psmo, "iccid": iccid, "rollback": rollback}

    @staticmethod
    def profile(rec: dict, iccid: str) -> dict | None:
        return next((p for p in rec["profiles"] if p["iccid"] == iccid), None)

    def _set_profile(self, rec: dict, iccid: str, **fields) -> dict:
        p = self.profile(rec, iccid)
        if p is None:
            p = {"iccid": iccid, "status": P_UNKNOWN, "fallback_attribute": False, "fallback_allowed": None,
                 "name": None, "preloaded": False}
            rec["profiles"].append(p)
        p.update(fields)
        rec["modified"] = self.clock()
        return p

    # --- operations (REST side) ------------------------------------------------------------------

    def new_operation(self, data: dict, rec: dict, *, action: int, validity: int, iccid=None,
                      activation_code=None, enable=False, rollback=False, user=None) -> dict:
        now = self.clock()
        op = {"id": str(uuid.uuid4()), "euicc": rec["eid"], "action": action, "status": S_SCHEDULED,
              "created": now, "updated": now, "expiry": now + validity, "finalized": None, "error": None,
              "iccid": iccid, "activation_code": activation_code, "enable": bool(enable),
              "rollback": bool(rollback), "sent": False, "user": user or {"id": 1, "name": "api"}}
        data["operations"][op["id"]] = op
        return op

    def finish(self, op: dict | None, status: int, err: dict | None = None) -> None:
        if op is None or op["status"] != S_SCHEDULED:
            return
        now = self.clock()
        op.update(status=status, updated=now, finalized=now, error=err)
        log(f"operation {op['id']} ({ACTIONS.get(op['action'])}) -> {OP_STATUSES[status]}"
            + (f": {err['message']}" if err else ""))

    def expire_due(self, data: dict) -> None:
        """Scheduled operations whose validity elapsed before the device fetched them: Expired."""
        now = self.clock()
        for op in data["operations"].values():
            if op["status"] == S_SCHEDULED and not op["sent"] and op["expiry"] <= now:
                self.finish(op, S_EXPIRED)

    def pending(self, data: dict, rec: dict) -> list[dict]:
        """Scheduled operations of ``rec`` in the order they apply."""
        ops = [o for o in data["operations"].values() if o["euicc"] == rec["eid"] and o["status"] == S_SCHEDULED]
        return sorted(ops, key=lambda o: o["created"])

    def cancel(self, data: dict, op: dict) -> bool:
        if op["status"] != S_SCHEDULED or op["sent"]:
            return False
        self.finish(op, S_CANCELED, error(UNDEFINED, "canceled", "the operation was canceled before it was sent"))
        return True

    # --- ESipa entry points ------------------------------------------------------------------------

    def handle_asn1(self, body: bytes) -> tuple[int, bytes | None]:
        """ASN.1 binding: request DER -> (HTTP status, response DER or None for 204)."""
        try:
            name, value = esipa.decode_request(body, version=self.version)
        except AgentError as e:
            raise EsipaReject(400, f"not an ESipa message: {e.message}") from None
        raw = self._raw_result_asn1(body) if name == "provideEimPackageResult" else body
        out = self._call(name, value, raw)
        if out is None:
            return 204, None
        if isinstance(out, bytes):       # a relayed answer, cut together as DER (esipa_download.py)
            return 200, out
        rname, rvalue = out
        return 200, esipa.encode_response(rname, rvalue, version=self.version)

    def handle_json(self, function: str, body) -> tuple[int, dict | None]:
        """JSON binding: function name and decoded JSON body -> (HTTP status, JSON body or None)."""
        if function not in esipa.REQUEST_FOR:
            raise EsipaReject(404, f"no ESipa function {function!r}")
        try:
            name, value = esipa.request_from_json(function, body, version=self.version)
        except AgentError as e:
            raise EsipaReject(400, e.message) from None
        raw = None
        if name == "provideEimPackageResult":
            raw = self._raw_result_json(body)
        elif isinstance(body.get("message"), str):
            raw = base64.b64decode(body["message"])      # the whole message's DER (esipa.py checked it)
        out = self._call(name, value, raw)
        if out is None:
            return 204, None
        if isinstance(out, bytes):
            return 200, {"message": _b64(out)}
        rname, rvalue = out
        return 200, esipa.response_to_json(rname, rvalue, version=self.version)

    def _raw_result_asn1(self, body: bytes) -> bytes | None:
        """The EimPackageResult alternative's TLV exactly as received (BF50 {5A?, <it>})."""
        try:
            kids = [k for k in tlv.children(tlv.parse_single(body)) if k.tag != 0x5A]
        except AgentError:
            return None
        return kids[0].raw if kids else None

    def _raw_result_json(self, body: dict) -> bytes | None:
        try:
            raw = base64.b64decode(body["eimPackageResult"], validate=True)
            return tlv.parse_single(raw).raw
        except (KeyError, TypeError, ValueError, AgentError):
            return None

    def _call(self, name: str, value, raw: bytes | None):
        if name == "getEimPackageRequest":
            return "getEimPackageResponse", self.get_package(eid_from_bytes(value["eidValue"]))
        if name == "provideEimPackageResult":
            return "provideEimPackageResultResponse", self.provide_result(value, raw)
        if name == "handleNotificationEsipa":
            if self.relay is not None:
                self.relay.notification(value, raw)      # to the SM-DP+ first: a failure is the IPA's to retry
            self.handle_notification(value)
            return None
        if name == "transferEimPackageResponse":
            return None      # we never push (eimInjectHttps is not offered in our configuration)
        if self.relay is not None and name in Es9Relay.FUNCTIONS:
            return self.relay.call(name, value, raw)
        # indirect profile download through the eIM is not offered (eimConfiguration has no
        # indirectProfileDownload): answer each function's own error
        refusals = {"initiateAuthenticationRequestEsipa": ("initiateAuthenticationResponseEsipa",
                                                           ("initiateAuthenticationErrorEsipa", UNDEFINED)),
                    "authenticateClientRequestEsipa": ("authenticateClientResponseEsipa",
                                                       ("authenticateClientErrorEsipa", UNDEFINED)),
                    "getBoundProfilePackageRequestEsipa": ("getBoundProfilePackageResponseEsipa",
                                                           ("getBoundProfilePackageErrorEsipa", UNDEFINED)),
                    "cancelSessionRequestEsipa": ("cancelSessionResponseEsipa", ("cancelSessionError", UNDEFINED))}
        if name in refusals:
            return refusals[name]
        raise EsipaReject(400, f"{name} is not served by this eIM")

    # --- getEimPackage ----------------------------------------------------------------------------

    def get_package(self, eid: str):
        """The GetEimPackageResponse CHOICE value for a poll of ``eid`` (SGP.32 §6.3.2.6)."""
        with self.store as data:
            rec = self._euicc(data, eid)
            if rec is None:
                rec = self._register(data, eid)
            rec["last_polled"] = self.clock()
            self.expire_due(data)
            step = rec["inflight"]
            if step is None:
                step = self._next_step(data, rec)
                if step is None:
                    return ("eimPackageError", esipa.NO_EIM_PACKAGE_AVAILABLE)
                self._build(rec, step)
                rec["inflight"] = step
                op = data["operations"].get(step["op"]) if step["op"] else None
                if op is not None:
                    op["sent"] = True
                    op["updated"] = self.clock()
                log(f"{eid}: sending {step['kind']}{' ' + step['psmo'] if step['kind'] == 'psmo' else ''}"
                    f" (transaction {step['txid']})")
            else:
                log(f"{eid}: polled again before the result: resending transaction {step['txid']}")
            return self._response_value(step)

    def _next_step(self, data: dict, rec: dict) -> dict | None:
        if rec["queue"]:
            return rec["queue"].pop(0)
        for op in self.pending(data, rec):
            if op["sent"]:
                continue     # its follow-up is queued (download then enable) or it awaits one
            return self._step_for(op)
        return None

    def _step_for(self, op: dict) -> dict:
        a = op["action"]
        if a == A_AUDIT:
            return self._psmo_step(op["id"], "listProfileInfo")
        if a == A_DOWNLOAD:
            return {"kind": "pdt", "op": op["id"], "ac": op["activation_code"]}
        if a == A_ENABLE:
            return self._psmo_step(op["id"], "enable", op["iccid"], op["rollback"])
        if a == A_FALLBACK:
            return self._psmo_step(op["id"], "setFallbackAttribute", op["iccid"])
        return self._psmo_step(op["id"], "delete", op["iccid"])

    def _build(self, rec: dict, step: dict) -> None:
        """Give ``step`` its transaction id (and, for a PSMO, counter and signed bytes)."""
        txid = secrets.token_bytes(16)
        step["txid"] = txid.hex().upper()
        if step["kind"] == "psmo":
            if step["psmo"] == "listProfileInfo":
                operation = ("listProfileInfo", {})
            else:
                v = {"iccid": iccid_to_bytes(step["iccid"])}
                if step["psmo"] == "enable" and step.get("rollback"):
                    v["rollbackFlag"] = None
                operation = (step["psmo"], v)
            rec["counter"] += 1
            step["counter"] = rec["counter"]
            der = esep.build_package_request(self.key, eim_id=self.eim_id, eid=rec["eid"], counter=rec["counter"],
                                             operations=[operation], transaction_id=txid,
                                             association_token=rec.get("association_token"))
            step["der"] = _b64(der)

    def _response_value(self, step: dict):
        txid = bytes.fromhex(step["txid"])
        if step["kind"] == "psmo":
            return ("euiccPackageRequest", codec.decode("EuiccPackageRequest", base64.b64decode(step["der"])))
        if step["kind"] == "ipa_data":
            v = {"tagList": TAG_LIST[self.version]}
            if self.version != "1.0":       # v1.0's IpaEuiccDataRequest has no transaction id
                v["eimTransactionId"] = txid
            return ("ipaEuiccDataRequest", v)
        ac = step["ac"]
        if ac[:4].upper() == "LPA:":
            ac = ac[4:]
        return ("profileDownloadTriggerRequest",
                {"profileDownloadData": ("activationCode", ac), "eimTransactionId": txid})

    # --- provideEimPackageResult ---------------------------------------------------------------------

    def provide_result(self, value, raw: bytes | None):
        """The ProvideEimPackageResultResponse value for a ProvideEimPackageResult (SGP.32 §6.3.2.7)."""
        if self.version == "1.0":
            eid, (alt, v) = None, value
        else:
            eid = eid_from_bytes(value["eidValue"]) if "eidValue" in value else None
            alt, v = value["eimPackageResult"]
        with self.store as data:
            if eid is not None and eid not in data["euiccs"]:
                return ("provideEimPackageResultError", esipa.EID_NOT_FOUND)
            acks = self._result(data, eid, alt, v, raw)
        if self.version == "1.0":
            return {"eimAcknowledgements": acks} if acks else {}
        return ("eimAcknowledgements", acks) if acks else ("emptyResponse", {})

    def _inflight_by_txid(self, data: dict, txid: bytes | None, eid: str | None):
        """(eUICC record, in-flight step) for a transaction id; falls back to the only candidate."""
        recs = [data["euiccs"][eid]] if eid else list(data["euiccs"].values())
        if txid is not None:
            want = txid.hex().upper()
            for rec in recs:
                st = rec["inflight"]
                if st is not None and st.get("txid") == want:
                    return rec, st
            return None, None
        return None, None

    def _only_inflight(self, data: dict, eid: str | None, kind: str):
        recs = [data["euiccs"][eid]] if eid else list(data["euiccs"].values())
        found = [(r, r["inflight"]) for r in recs if r["inflight"] is not None and r["inflight"]["kind"] == kind]
        return found[0] if len(found) == 1 else (None, None)

    def _done(self, rec: dict, step: dict) -> None:
        """The result of ``step`` arrived: nothing in flight; remember the transaction for
        late results (a rollback EPR, a result the IPA sends again)."""
        if rec["inflight"] is step:
            rec["inflight"] = None
        if step.get("txid"):
            past = rec.setdefault("past", [])
            past.append(step)
            del past[:-50]

    @staticmethod
    def _past(rec: dict | None, txid: bytes | None) -> dict | None:
        if rec is None or txid is None:
            return None
        want = txid.hex().upper()
        return next((s for s in reversed(rec.get("past", [])) if s.get("txid") == want), None)

    def _rec_by_past_txid(self, data: dict, txid: bytes | None) -> dict | None:
        return next((r for r in data["euiccs"].values() if self._past(r, txid) is not None), None)

    def _result(self, data: dict, eid: str | None, alt: str, v, raw: bytes | None) -> list[int]:
        if alt == "euiccPackageResult":
            return self._epr(data, eid, raw, notifications=[])
        if alt == "ePRAndNotifications":
            epr_raw = None
            if raw is not None:
                try:
                    kids = tlv.children(tlv.parse_single(raw))
                    epr_raw = kids[0].raw if kids and kids[0].tag == 0xBF51 else None
                except AgentError:
                    epr_raw = None
            notes = v.get("notificationList")
            if isinstance(notes, tuple):        # v1.0: a whole RetrieveNotificationsListResponse
                notes = notes[1] if notes[0] == "notificationList" else []
            acks = self._epr(data, eid, epr_raw, notifications=notes or [])
            return acks
        if alt == "ipaEuiccDataResponse":
            return self._ipa_data(data, eid, v, raw)
        if alt == "profileDownloadTriggerResult":
            return self._pdt_result(data, eid, v)
        if alt in ("eimPackageResultResponseError", "eimPackageError"):
            if isinstance(v, dict):
                code, txid = v.get("eimPackageResultErrorCode", UNDEFINED), v.get("eimTransactionId")
            else:
                code, txid = v, None
            rec, step = self._inflight_by_txid(data, txid, eid)
            if step is None and txid is None:
                found = [(r, r["inflight"]) for r in ([data["euiccs"][eid]] if eid else data["euiccs"].values())
                         if r["inflight"] is not None]
                rec, step = found[0] if len(found) == 1 else (None, None)
            if step is not None:
                name = _EPR_RESULT_ERRORS.get(code, "undefinedError")
                self.finish(data["operations"].get(step["op"]) if step["op"] else None, S_FAILED,
                            error(code, name, f"the IPA could not process the package ({name})"))
                self._done(rec, step)
            return []
        return []

    # EPR ------------------------------------------------------------------------------------------

    def _epr(self, data: dict, eid: str | None, raw: bytes | None, *, notifications: list) -> list[int]:
        acks = [s for s in (_notification_seq(n) for n in notifications) if s is not None]
        for n in notifications:
            self._record_notification(data, eid, n)
        if raw is None:
            return acks
        try:
            res = esep.decode_package_result(raw)
        except AgentError as e:
            log(f"unreadable eUICC package result: {e.message}")
            return acks
        if res.eim_id != self.eim_id:
            log(f"a package result for eIM {res.eim_id!r}, not us: ignored")
            return acks
        rec, step = self._inflight_by_txid(data, res.transaction_id, eid)
        if rec is None and eid is not None:
            rec = data["euiccs"][eid]
        if rec is None:
            rec = self._rec_by_past_txid(data, res.transaction_id)
        op = data["operations"].get(step["op"]) if step and step.get("op") else None
        if res.kind == "euiccPackageErrorUnsigned":
            if step is not None:
                code = res.error if res.error is not None else UNDEFINED
                self.finish(op, S_FAILED, error(code, "euiccPackageErrorUnsigned",
                                                "the eUICC did not accept the eIM's package (unknown eIM or "
                                                "eIM signature not verified)"))
                self._done(rec, step)
            return acks
        if not self._verify_epr(rec, step, res):
            log(f"package result for transaction {(res.transaction_id or b'').hex().upper()}: "
                "the eUICC signature does not verify; not acknowledged")
            if step is not None:
                self.finish(op, S_FAILED, error(UNDEFINED, "euiccSignatureInvalid",
                                                "the eUICC's signature on the result does not verify"))
                self._done(rec, step)
            return acks
        if res.seq_number is not None:
            acks.append(res.seq_number)
        if step is None:
            # a result we already have (or never asked for): acknowledged all the same; a
            # rollback of an enable we had counted as done still turns it into a failure
            past = self._past(rec, res.transaction_id)
            if past is not None and any(alt == "rollbackResult" and val == 0 for alt, val in res.results):
                op = data["operations"].get(past["op"]) if past.get("op") else None
                if op is not None and op["status"] == S_SUCCEEDED:
                    op["status"] = S_SCHEDULED          # reopened only to be failed below
                self._apply_results(data, rec, past, op, [r for r in res.results if r[0] == "rollbackResult"])
            return acks
        self._done(rec, step)
        if res.kind == "euiccPackageErrorSigned":
            name = _EPR_ERRORS.get(res.error, "undefinedError")
            self.finish(op, S_FAILED, error(res.error, name))
            return acks
        self._apply_results(data, rec, step, op, res.results)
        rec["last_synced"] = self.clock()
        return acks

    def _verify_epr(self, rec: dict | None, step: dict | None, res) -> bool:
        if rec is None or not rec.get("cert_ok") or not rec.get("euicc_cert"):
            return False
        try:
            pub = crypto.load_cert(base64.b64decode(rec["euicc_cert"])).public_key()
        except AgentError:
            return False
        eim_sig = None
        if step is not None and step.get("der"):
            try:
                eim_sig = esep.decode_package_request(base64.b64decode(step["der"])).signature
            except AgentError:
                eim_sig = None
        return res.verify(pub, association_token=rec.get("association_token"), eim_signature=eim_sig,
                          version=self.version)

    def _apply_results(self, data: dict, rec: dict, step: dict, op: dict | None, results: list) -> None:
        outcome: dict | None = None       # None = ok
        for alt, val in results:
            if alt == "rollbackResult":
                if val == 0:
                    prev = step.get("previous")
                    target = step.get("iccid")
                    if target and self.profile(rec, target):
                        self._set_profile(rec, target, status=P_DISABLED)
                    if prev:
                        self._set_profile(rec, prev, status=P_ENABLED)
                    outcome = error(UNDEFINED, "rollback", "the device could not connect with the new profile "
                                    "and rolled back to the previous one")
                continue
            if alt == "listProfileInfoResult":
                kind, lst = val
                if kind != "profileInfoListOk":
                    name = _RESULT_NAMES["profileInfoListError"].get(lst, "undefinedError")
                    outcome = outcome or error(lst, name)
                    continue
                self._refresh_profiles(rec, lst)
                continue
            if alt == "processingTerminated":
                name = _RESULT_NAMES["processingTerminated"].get(val, "undefinedError")
                outcome = outcome or error(val, name)
                continue
            if not isinstance(val, int):
                continue
            if val != 0:
                name = _RESULT_NAMES.get(alt, {}).get(val, "undefinedError")
                outcome = outcome or error(val, name)
                continue
            iccid = step.get("iccid")
            if alt == "enableResult" and iccid:
                for p in rec["profiles"]:
                    if p["status"] == P_ENABLED and p["iccid"] != iccid:
                        p["status"] = P_DISABLED
                        step["previous"] = p["iccid"]
                self._set_profile(rec, iccid, status=P_ENABLED)
            elif alt == "disableResult" and iccid:
                self._set_profile(rec, iccid, status=P_DISABLED)
            elif alt == "deleteResult" and iccid:
                self._set_profile(rec, iccid, status=P_DELETED, fallback_attribute=False)
            elif alt == "setFallbackAttributeResult" and iccid:
                for p in rec["profiles"]:
                    p["fallback_attribute"] = p["iccid"] == iccid
                rec["modified"] = self.clock()
            elif alt == "unsetFallbackAttributeResult":
                for p in rec["profiles"]:
                    p["fallback_attribute"] = False
        self.finish(op, S_FAILED if outcome else S_SUCCEEDED, outcome)

    def _refresh_profiles(self, rec: dict, infos: list) -> None:
        """An audit: the card's list replaces what we believed (profiles gone from it: Deleted)."""
        seen = set()
        for info in infos:
            if "iccid" not in info:
                continue
            iccid = iccid_from_bytes(info["iccid"])
            seen.add(iccid)
            old = self.profile(rec, iccid)
            if info.get("profileState") == 1:
                status = P_ENABLED
            elif old is not None and old["status"] == P_INSTALLED:
                status = P_INSTALLED         # installed, never enabled yet
            else:
                status = P_DISABLED
            fields = {"status": status, "fallback_attribute": bool(info.get("fallbackAttribute", False)),
                      "name": info.get("profileName") or info.get("profileNickname") or None}
            if "fallbackAllowed" in info:
                fields["fallback_allowed"] = bool(info["fallbackAllowed"])
            if old is None:
                fields["preloaded"] = rec["last_audited"] is None
            self._set_profile(rec, iccid, **fields)
        for p in rec["profiles"]:
            if p["iccid"] not in seen and p["status"] != P_DELETED:
                p["status"] = P_DELETED
                p["fallback_attribute"] = False
        rec["last_audited"] = self.clock()

    # IpaEuiccData -------------------------------------------------------------------------------------

    def _ipa_data(self, data: dict, eid: str | None, v, raw: bytes | None) -> list[int]:
        kind, body = v
        txid = body.get("eimTransactionId") if isinstance(body, dict) else None
        certs = _raw_certs(raw)
        if eid is None and certs.get(0xA6):
            try:
                eid = crypto.eid_of(crypto.load_cert(certs[0xA6]))
            except AgentError:
                eid = None
            if eid not in data["euiccs"]:
                eid = None
        rec, step = self._inflight_by_txid(data, txid, eid)
        if step is None:
            rec, step = self._only_inflight(data, eid, "ipa_data")
        if rec is None:
            log("IpaEuiccData for no request of ours: ignored")
            return []
        if step is not None:
            self._done(rec, step)
        op = data["operations"].get(step["op"]) if step and step.get("op") else None
        if kind != "ipaEuiccData":
            code = body.get("ipaEuiccDataErrorCode", UNDEFINED) if isinstance(body, dict) else body
            log(f"{rec['eid']}: the IPA could not give its eUICC data (error {code})")
            self.finish(op, S_FAILED, error(code, "ipaEuiccDataError", "the IPA could not read the eUICC's data"))
            return []
        if "associationToken" in body:
            rec["association_token"] = body["associationToken"]
        for key in ("defaultSmdpAddress",):
            if key in body:
                rec["default_smdp"] = body[key]
        if certs.get(0xA6):
            self._learn_certs(rec, certs[0xA6], certs.get(0xA5))
        rec["last_synced"] = self.clock()
        acks: list[int] = []
        notes = body.get("notificationsList")
        if isinstance(notes, tuple):
            notes = notes[1] if notes[0] == "notificationList" else []
        for n in notes or []:
            self._record_notification(data, rec["eid"], n)
            s = _notification_seq(n)
            if s is not None:
                acks.append(s)
        self.finish(op, S_SUCCEEDED)
        return acks

    def _learn_certs(self, rec: dict, euicc_der: bytes, eum_der: bytes | None) -> None:
        try:
            cert = crypto.load_cert(euicc_der)
            eum = [crypto.load_cert(eum_der)] if eum_der else []
            crypto.verify_chain(cert, eum, [self.ci_cert], role="euicc")
            if crypto.eid_of(cert) != rec["eid"]:
                raise crypto.CertError("malformed", f"the eUICC certificate names EID {crypto.eid_of(cert)}, "
                                                    f"not {rec['eid']}")
        except AgentError as e:
            log(f"{rec['eid']}: eUICC certificate refused ({e.message}); its results cannot be verified")
            rec["cert_ok"] = False
            return
        rec["euicc_cert"] = _b64(euicc_der)
        rec["eum_cert"] = _b64(eum_der) if eum_der else None
        rec["cert_ok"] = True
        log(f"{rec['eid']}: eUICC certificate verified against the CI")

    # ProfileDownloadTrigger ---------------------------------------------------------------------------

    def _pdt_result(self, data: dict, eid: str | None, v: dict) -> list[int]:
        rec, step = self._inflight_by_txid(data, v.get("eimTransactionId"), eid)
        if step is None:
            rec, step = self._only_inflight(data, eid, "pdt")
        if step is None:
            log("a profile download result for no trigger of ours: ignored")
            return []
        self._done(rec, step)
        op = data["operations"].get(step["op"]) if step.get("op") else None
        kind, r = v["profileDownloadTriggerResultData"]
        if kind != "profileInstallationResult":
            code = r.get("profileDownloadErrorReason", UNDEFINED) if isinstance(r, dict) else UNDEFINED
            detail = r.get("errorResponse") if isinstance(r, dict) else None
            text = "the device could not download the profile"
            if detail:
                text += ": " + detail[:300].decode("utf-8", "replace")
            self.finish(op, S_FAILED, error(code, "profileDownloadError", text))
            return []
        pir = r["profileInstallationResultData"]
        iccid_raw = pir.get("notificationMetadata", {}).get("iccid")
        iccid = iccid_from_bytes(iccid_raw) if iccid_raw else None
        fkind, fval = pir["finalResult"]
        if fkind != "successResult":
            code = fval.get("errorReason", UNDEFINED)
            name = BPP_ERRORS.get(code, "installFailedDueToUnknownError")
            self.finish(op, S_FAILED, error(code, name, "the eUICC did not install the profile"))
            return []
        if iccid:
            self._set_profile(rec, iccid, status=P_INSTALLED, preloaded=False)
        if op is not None:
            op["iccid"] = iccid
            op["updated"] = self.clock()
            if op["enable"] and iccid:
                # the enable PSMO of the same operation goes out next, in this poll round
                rec["queue"].insert(0, self._psmo_step(op["id"], "enable", iccid, op["rollback"]))
                return []
        self.finish(op, S_SUCCEEDED)
        return []

    # handleNotification --------------------------------------------------------------------------------

    def handle_notification(self, value) -> None:
        alt, v = value
        with self.store as data:
            if alt == "pendingNotification":
                self._record_notification(data, None, v)
            else:
                # an EPR sent as a notification (SGP.32 §6.3.2.4): a late result
                if self.version == "1.0":
                    inner = v
                else:
                    inner = v.get("eimPackageResult")
                if inner and inner[0] == "euiccPackageResult":
                    data["notifications"].append({"kind": "euiccPackageResult", "received": self.clock()})
            del data["notifications"][:-500]

    def _record_notification(self, data: dict, eid: str | None, n) -> None:
        kind = n[0] if isinstance(n, tuple) else "unknown"
        entry = {"kind": kind, "eid": eid, "seq": _notification_seq(n), "received": self.clock()}
        iccid = _notification_iccid(n)
        if iccid:
            entry["iccid"] = iccid
        data["notifications"].append(entry)
        del data["notifications"][:-500]
        # an install result for a profile we only knew as downloaded: it is installed now
        if kind in ("profileInstallationResult",) and iccid:
            for rec in data["euiccs"].values():
                p = self.profile(rec, iccid)
                if p is not None and p["status"] in (P_DOWNLOADING, P_DOWNLOADED):
                    p["status"] = P_INSTALLED


def _raw_certs(raw: bytes | None) -> dict[int, bytes]:
    """EUM (A5) and eUICC (A6) certificate DER out of a raw BF52 IpaEuiccDataResponse.

    IMPLICIT tags replace the certificates' own 30, so the DER is 30 + the same content."""
    out: dict[int, bytes] = {}
    if raw is None:
        return out
    try:
        top = tlv.parse_single(raw)
        kids = tlv.children(top)
        if not kids or kids[0].tag != 0xA0:
            return out
        for t in tlv.children(kids[0]):
            if t.tag in (0xA5, 0xA6):
                out[t.tag] = tlv.encode(0x30, t.value)
    except AgentError:
        return {}
    return out


def _notification_seq(n) -> int | None:
    """The sequence number of an SGP32-PendingNotification value."""
    try:
        kind, v = n
        if kind == "profileInstallationResult":
            return v["profileInstallationResultData"]["notificationMetadata"]["seqNumber"]
        if kind == "otherSignedNotification":
            return v["tbsOtherNotification"]["seqNumber"]
        if kind == "compactProfileInstallationResult":
            return v["compactProfileInstallationResultData"]["seqNumber"]
        if kind == "compactOtherSignedNotification":
            return v["tbsOtherNotification"]["seqNumber"]
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _notification_iccid(n) -> str | None:
    try:
        kind, v = n
        if kind == "profileInstallationResult":
            raw = v["profileInstallationResultData"]["notificationMetadata"].get("iccid")
        elif kind in ("otherSignedNotification", "compactOtherSignedNotification"):
            raw = v["tbsOtherNotification"].get("iccid")
        else:
            raw = None
        return iccid_from_bytes(raw) if raw else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


# --- indirect profile download: the ES9+' relay ------------------------------------------------------


class Es9Relay:
    """The eIM's half of an indirect profile download (SGP.32 §3.2.3, §6.3.2.1-5).

    Each ESipa download message from the IPA is relayed over ES9+' to the SM-DP+ with the
    agent's own ES9+ client (agent.es9p, TLS verified against the PKI's CI, which also issued
    the local SM-DP+'s TLS certificate), and the SM-DP+'s answer goes back in the ESipa response
    type (agent.esipa_download builds it, the SM-DP+'s signed parts byte for byte; the eUICC's
    signed parts go to the SM-DP+ as the IPA sent them).

    The SM-DP+ is the one of the activation code of the trigger named by eimTransactionId
    (v1.2), or the request's smdpAddress (v1.0 has no eimTransactionId); both given and
    different: smdpAddressMismatch.  One session per SM-DP+ transactionId (the IPA uses it in
    the next calls) keeps the address and the HTTPS client, until cancelSession, the PIR
    (handleNotification, relayed to the SM-DP+ before the eIM records it) or SESSION_TTL.  An
    ES9+ failure becomes the function's ESipa error number (esipa_download.error_number).
    While relaying, the eUICC's profile shows Downloading, then Downloaded once the package
    went out.
    """

    FUNCTIONS = {"initiateAuthenticationRequestEsipa": "initiateAuthentication",
                 "authenticateClientRequestEsipa": "authenticateClient",
                 "getBoundProfilePackageRequestEsipa": "getBoundProfilePackage",
                 "cancelSessionRequestEsipa": "cancelSession"}
    MAX_SESSIONS = 64
    SESSION_TTL = 600.0
    USER_AGENT = "esim-agent-eim/1 (ES9+')"

    def __init__(self, eim: "Eim", ca: str | None, *, deadline: float = 20.0):
        self.eim = eim
        self.ca = ca
        self.deadline = deadline
        self._lock = threading.Lock()
        self._sessions: dict[str, dict] = {}     # SM-DP+ transactionId (hex) -> session
        self.addresses: set[str] = set()         # SM-DP+s we relayed to (where their notifications go)

    def _client(self, address: str):
        from ..es9p import Es9pClient
        return Es9pClient(address, ca=self.ca, deadline=self.deadline, user_agent=self.USER_AGENT)

    def call(self, name: str, value, raw: bytes | None) -> bytes:
        """An ESipa download request -> the ESipa response message (DER)."""
        from ..esipa_download import error_answer
        function = self.FUNCTIONS[name]
        if raw is None:
            return error_answer(function, UNDEFINED)
        try:
            return getattr(self, "_" + function)(function, value, raw)
        except AgentError as e:        # a request we could not take apart
            log(f"relay {function}: {e.message}")
            return error_answer(function, UNDEFINED)

    def _failed(self, function: str, e: AgentError, address: str) -> bytes:
        from ..esipa_download import error_answer, error_number
        n = error_number(function, e.code)
        log(f"relay {function} to {address}: {e.message} -> ESipa error {n}")
        return error_answer(function, n)

    def _session(self, txid: str) -> dict | None:
        with self._lock:
            return self._sessions.get(txid)

    def _end(self, txid: str) -> None:
        with self._lock:
            sess = self._sessions.pop(txid, None)
        if sess is not None:
            sess["client"].close()

    def _keep(self, txid: str, sess: dict) -> None:
        now = time.monotonic()
        with self._lock:
            old = [k for k, v in self._sessions.items() if now - v["created"] > self.SESSION_TTL]
            while len(self._sessions) - len(old) >= self.MAX_SESSIONS:
                old.append(min((k for k in self._sessions if k not in old),
                               key=lambda k: self._sessions[k]["created"]))
            gone = [self._sessions.pop(k) for k in old]
            self._sessions[txid] = sess
        for g in gone:
            g["client"].close()

    def _mark(self, sess: dict, iccid: str | None, status: int) -> None:
        if not iccid or not sess.get("eid"):
            return
        with self.eim.store as data:
            rec = data["euiccs"].get(sess["eid"])
            if rec is not None:
                self.eim._set_profile(rec, iccid, status=status, preloaded=False)

    def _initiateAuthentication(self, f: str, value, raw: bytes) -> bytes:
        from ..ac import parse_activation_code
        from ..esipa_download import error_answer, initiate_authentication_ok, relayed_part
        eim_txid = value.get("eimTransactionId")
        ac_address = eid = None
        with self.eim.store as data:
            if eim_txid is not None:
                rec, step = self.eim._inflight_by_txid(data, eim_txid, None)
                if step is None or step.get("kind") != "pdt":
                    log(f"relay {f}: eimTransactionId {eim_txid.hex().upper()} names no download of ours")
                    return error_answer(f, 52)                      # invalidEimTransactionId
            else:
                found = [(r, r["inflight"]) for r in data["euiccs"].values()
                         if r["inflight"] is not None and r["inflight"]["kind"] == "pdt"]
                rec, step = found[0] if len(found) == 1 else (None, None)
            if step is not None:
                eid = rec["eid"]
                try:
                    ac_address = parse_activation_code(step["ac"]).address
                except AgentError:
                    ac_address = None
        address = value.get("smdpAddress") or ac_address
        if not address:
            return error_answer(f, 1)                                # invalidDpAddress
        if ac_address and address.lower() != ac_address.lower():
            log(f"relay {f}: the IPA names SM-DP+ {address}, the trigger {ac_address}")
            return error_answer(f, 50)                               # smdpAddressMismatch
        info1 = relayed_part(raw, 0xBF20)
        try:
            client = self._client(address)
        except AgentError as e:
            return self._failed(f, e, address)
        try:
            ia = client.initiate_authentication(value["euiccChallenge"], info1, address)
        except AgentError as e:
            client.close()
            return self._failed(f, e, address)
        self.addresses.add(address.lower())
        self._keep(ia.transaction_id.upper(), {"address": address, "client": client, "eid": eid,
                                               "eim_txid": eim_txid.hex().upper() if eim_txid else None,
                                               "created": time.monotonic(), "iccid": None})
        log(f"relay {f}: SM-DP+ {address} opened transaction {ia.transaction_id}")
        return initiate_authentication_ok(ia)

    def _authenticateClient(self, f: str, value, raw: bytes) -> bytes:
        from ..esipa_download import authenticate_client_ok, error_answer, relayed_part
        txid = value["transactionId"].hex().upper()
        sess = self._session(txid)
        if sess is None:
            return error_answer(f, 10)                               # invalidTransactionId
        try:
            ac = sess["client"].authenticate_client(txid, relayed_part(raw, 0xBF38))
        except AgentError as e:
            return self._failed(f, e, sess["address"])
        try:
            sess["iccid"] = iccid_from_bytes(codec.decode("StoreMetadataRequest", ac.profile_metadata)["iccid"])
        except (AgentError, KeyError):
            sess["iccid"] = None
        self._mark(sess, sess["iccid"], P_DOWNLOADING)
        return authenticate_client_ok(ac)

    def _getBoundProfilePackage(self, f: str, value, raw: bytes) -> bytes:
        from ..esipa_download import error_answer, get_bound_profile_package_ok, relayed_part
        txid = value["transactionId"].hex().upper()
        sess = self._session(txid)
        if sess is None:
            return error_answer(f, 95)                               # invalidTransactionId
        try:
            bpp = sess["client"].get_bound_profile_package(txid, relayed_part(raw, 0xBF21))
        except AgentError as e:
            return self._failed(f, e, sess["address"])
        self._mark(sess, sess["iccid"], P_DOWNLOADED)
        return get_bound_profile_package_ok(txid, bpp)

    def _cancelSession(self, f: str, value, raw: bytes) -> bytes:
        from ..esipa_download import CANCEL_SESSION_OK, card_cancel_response, error_answer
        txid = value["transactionId"].hex().upper()
        sess = self._session(txid)
        if sess is None:
            return error_answer(f, 1)                                # invalidTransactionId
        try:
            sess["client"].cancel_session(txid, card_cancel_response(raw))
        except AgentError as e:
            self._end(txid)         # the SM-DP+ ended it, or will let it expire
            return self._failed(f, e, sess["address"])
        self._end(txid)
        log(f"relay {f}: transaction {txid} cancelled at SM-DP+ {sess['address']}")
        return CANCEL_SESSION_OK

    def notification(self, value, raw: bytes | None) -> None:
        """handleNotification: a PendingNotification for an SM-DP+ we relayed to goes there
        (ES9+' handleNotification).  If it cannot be delivered the IPA is answered HTTP 502 and
        keeps it (it removes a notification from the eUICC only once we accepted it)."""
        from ..esipa_download import relayed_notification
        alt, v = value
        der = relayed_notification(raw) if alt == "pendingNotification" and raw is not None else None
        if der is None:
            return
        kind, n = v
        sess, txid = None, None
        try:
            if kind == "profileInstallationResult":
                data = n["profileInstallationResultData"]
                txid = data["transactionId"].hex().upper()
                sess = self._session(txid)
                address = data["notificationMetadata"].get("notificationAddress")
            elif kind == "otherSignedNotification":
                address = n["tbsOtherNotification"].get("notificationAddress")
            else:
                address = None
        except (KeyError, TypeError, AttributeError):
            address = None
        if sess is not None:
            address = sess["address"]
        elif not address or address.lower() not in self.addresses:
            return          # not for an SM-DP+ we relay to: recorded only
        client = sess["client"] if sess is not None else self._client(address)
        try:
            client.handle_notification(der)
        except AgentError as e:
            log(f"relay handleNotification to {address}: {e.message}")
            raise EsipaReject(502, f"the SM-DP+ {address} did not take the notification: {e.message}") from None
        finally:
            if sess is None:
                client.close()
        if txid is not None and sess is not None:
            self._end(txid)          # the PIR ends the session (docs/protocol.md §6.3)
        log(f"relay handleNotification: {kind} delivered to SM-DP+ {address}")

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for sess in sessions:
            sess["client"].close()


# --- EimConfigurationData --------------------------------------------------------------------------


def eim_configuration(eim_pki, *, port: int, eim_id: str = EIM_ID, indirect: bool = False) -> bytes:
    """DER EimConfigurationData of this eIM (SGP.32 §2.11.1.1.1) for ``ipa add-eim``.

    No associationToken: a card that assigns one reports it in IpaEuiccData.  ``indirect``:
    offer indirect profile download (indirectProfileDownload, 89, v1.2)."""
    cfg = {
        "eimId": eim_id,
        "eimFqdn": f"127.0.0.1:{port}",
        "eimIdType": 2,                                  # eimIdTypeFqdn
        "counterValue": 0,
        "eimPublicKeyData": ("eimCertificate", codec.decode("Certificate", eim_pki.sign.der)),
        "trustedPublicKeyDataTls": ("trustedCertificateTls", codec.decode("Certificate", eim_pki.ci.der)),
        "eimSupportedProtocol": (b"\x80", 1),           # eimRetrieveHttps
        "euiccCiPKId": eim_pki.ci_pkid,
    }
    if indirect:
        cfg["indirectProfileDownload"] = None
    return codec.encode("EimConfigurationData", cfg)


# --- HTTPS server ----------------------------------------------------------------------------------


class _EimHandler(_Handler):
    server_version = "esim-agent-eim/1"

    def log_request(self, code="-", size="-"):
        log(f"{self.command} {self.path[:120]} -> {code}")

    def _dispatch(self) -> None:
        import json
        app: EimServer = self.server.app
        try:
            path, query, body = self._request()
        except _HttpError as e:
            self.close_connection = True
            return self._send(e.status, json.dumps({"status_code": e.status, "message": e.message}).encode(),
                              "application/json")
        try:
            if path == esipa.ASN1_PATH or path.startswith(esipa.JSON_PATH_PREFIX):
                return self._esipa(app, path, body)
            r = app.api.handle(self.command, path, query, self.headers, body)
        except Exception as e:  # a bug: say so in the API's error shape, keep serving
            import traceback
            log(f"{self.command} {path[:80]}: internal error {e!r}")
            traceback.print_exc(file=sys.stderr)
            return self._send(500, json.dumps({"status_code": 500, "message": "internal error"}).encode(),
                              "application/json")
        return self._send(r.status, r.encode(), "application/json", r.headers)

    def _esipa(self, app: "EimServer", path: str, body: bytes) -> None:
        import json
        eim = app.eim
        if self.command != "POST":
            return self._send(405, b"ESipa functions are called with POST\n", "text/plain", {"Allow": "POST"})
        try:
            if path == esipa.ASN1_PATH:
                status, out = eim.handle_asn1(body)
                return self._send(status, out or b"", esipa.ASN1_CONTENT_TYPE if out else None)
            try:
                req = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise EsipaReject(400, f"the body is not JSON: {e!s:.200}") from None
            status, out = eim.handle_json(path[len(esipa.JSON_PATH_PREFIX):], req)
            if out is None:
                return self._send(status, b"", None)
            return self._send(status, json.dumps(out).encode(), "application/json")
        except EsipaReject as e:
            log(f"ESipa {path[-40:]}: {e.status} {e.message}")
            return self._send(e.status, json.dumps({"message": e.message}).encode(), "application/json")


class EimServer:
    """The local eIM (ESipa + operations API) on HTTPS; usable in-process.

    ``start()`` serves in a background thread; ``.port``, ``.url``, ``.eim``, ``.api``,
    ``.config_path`` (DIR/eim/eim-config.der), ``shutdown()``. Also a context manager.
    """

    def __init__(self, pki_dir, *, port: int = 0, host: str = "127.0.0.1", token: str | None = None,
                 version: str = "1.2", state_path=None, indirect: bool = False):
        import ssl
        from .eim_api import EimApi
        from .eim_store import EimStore
        from .pki import ensure_eim_pki
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port {port!r} is not a TCP port (0-65535)")
        if version not in ESIPA_VERSIONS:
            raise ValueError(f"ESipa version {version!r} is not one of {', '.join(ESIPA_VERSIONS)}")
        self.pki = ensure_eim_pki(pki_dir)
        d = self.pki.directory
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(os.fspath(d / "tls.pem"), os.fspath(d / "tls.key.pem"))
        self.store = EimStore(state_path if state_path is not None else d / "state.json")
        try:
            try:
                self.httpd = _Httpd((host, port), _EimHandler, ctx, self)
            except OSError as e:
                raise ListenError(host, port, e) from None
            self.host = host
            self.port = self.httpd.server_address[1]
            self.version = version
            # the SM-DP+'s TLS certificate chains to the same CI (DIR/ci.pem)
            self.indirect = bool(indirect)
            self.eim = Eim(self.store, sign_key=self.pki.sign.key, ci_cert=self.pki.ci.cert, version=version,
                           indirect=indirect, smdp_ca=os.fspath(Path(pki_dir) / "ci.pem"))
            self.api = EimApi(self.eim, token=token)
            self.config_path = Path(d) / "eim-config.der"
            from .pki import _write
            _write(self.config_path, eim_configuration(self.pki, port=self.port, indirect=indirect), 0o644)
        except BaseException:
            self.store.close()
            raise
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> "EimServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="eim", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()
        if self.eim.relay is not None:
            self.eim.relay.close()
        self.store.close()

    stop = shutdown

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


def serve_eim(pki_dir, port: int = 0, token: str | None = None, version: str = "1.2", *,
              host: str = "127.0.0.1", state_path=None, indirect: bool = False) -> EimServer:
    """Start the local eIM in a background thread and return it (``.port``, ``.shutdown()``).
    ``indirect``: offer and relay indirect profile downloads (Es9Relay)."""
    return EimServer(pki_dir, port=port, host=host, token=token, version=version, state_path=state_path,
                     indirect=indirect).start()


def run_eim(pki_dir, *, port: int = 0, token: str | None = None, version: str = "1.2", ready=None,
            indirect: bool = False) -> None:
    """`esim-agent sim eim`: serve in the foreground until SIGINT/SIGTERM."""
    import signal
    _log_to_stderr()
    server = EimServer(pki_dir, port=port, token=token, version=version, indirect=indirect)

    def _term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _term)
    except ValueError:
        pass
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        if server.eim.relay is not None:
            server.eim.relay.close()
        server.store.close()
