"""Reservation API of the local SM-DP+: a twin of Twilio Super SIM's /v1/ESimProfiles and /v1/Sims.

Field names, types, enums and the pagination ``meta`` block follow Twilio's published
OpenAPI description of Super SIM (ESimProfiles and Sims resources). Two parts:

* :class:`TwinStore` — reservations, Sims, the profile inventory and what the SM-DP+
  learns while serving ES9+ (eUICC certificates per EID, notification events). Thread
  safe; persisted atomically as JSON when a state path is given.
* :class:`TwinApi` — the HTTP handlers, I/O free: ``handle(method, path, query,
  headers, body) -> TwinResponse``. The HTTPS server in ``agent.sim.smdpp`` calls it.

Order lifecycle (Twilio's eSIM Profile status values): ``new`` → ``reserving`` →
``available`` (reserved in a background thread after a short delay; ICCID, Sim and,
when asked, matching ID assigned) → ``downloaded`` (the BPP was fetched over ES9+) →
``installed`` (the eUICC's install notification reported success) or ``failed``.

Where the twin is stricter than the schema: a request that the OpenAPI description
calls valid (every body field is an optional plain string/boolean) is always
accepted with 201 — so an order without ``Eid`` and without ``GenerateMatchingId=true``,
or with an ``Eid`` that is not 32 digits, is created and then moves to ``failed`` with
``error_code``/``error_message`` explaining why, instead of being rejected. Values the
schema itself rules out (non-boolean ``GenerateMatchingId``, unknown ``CallbackMethod``
or ``Status``, ``PageSize`` outside 1..1000, negative ``Page``) get a Twilio-style 400.
Unknown resources are 404 (Twilio error 20404), although the API description lists
only 200 for the fetch operations.

Twin extensions (not in Twilio's API) on POST /v1/ESimProfiles: ``ConfirmationCode``
(the order then needs that CC, SGP.22 ccRequiredFlag) and ``UsePpk=true`` (the BPP
carries ReplaceSessionKeys, docs/protocol.md §4.7).
"""
from __future__ import annotations

import base64
import hmac
import json
import os
import queue
import re
import secrets
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .profiles import ProfileInventory

ESIM_STATUSES = ("new", "reserving", "available", "downloaded", "installed", "failed")
SIM_STATUSES = ("new", "ready", "active", "inactive", "scheduled")

# Public fields of the esim_profile resource, in Twilio's order (url is computed).
ESIM_FIELDS = ("sid", "account_sid", "iccid", "sim_sid", "status", "eid", "smdp_plus_address",
               "matching_id", "activation_code", "error_code", "error_message",
               "date_created", "date_updated")
SIM_FIELDS = ("sid", "unique_name", "account_sid", "iccid", "status", "fleet_sid",
              "date_created", "date_updated")

ESIM_QUERY = ("Eid", "SimSid", "Status", "PageSize", "Page", "PageToken")
SIM_QUERY = ("Status", "Fleet", "Iccid", "PageSize", "Page", "PageToken")
# Twilio's four, plus two twin extensions (ConfirmationCode, UsePpk; see TwinApi._create).
CREATE_FORM = ("Eid", "GenerateMatchingId", "CallbackUrl", "CallbackMethod", "ConfirmationCode", "UsePpk")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
CALLBACK_TIMEOUT = 3.0

_EID_RE = re.compile(r"^[0-9]{32}$")
_MID_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O/1/I: matching IDs get typed by people


class OrderRefused(Exception):
    """An ES9+ business error for a download order (SGP.22 subjectCode / reasonCode)."""

    def __init__(self, subject: str, reason: str, message: str):
        super().__init__(message)
        self.subject = subject
        self.reason = reason
        self.message = message


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def new_matching_id() -> str:
    return "-".join("".join(secrets.choice(_MID_ALPHABET) for _ in range(5)) for _ in range(5))


def _log(msg: str) -> None:
    from .smdpp import log
    log(msg)


class TwinStore:
    """Reservations, Sims and SM-DP+ memory; the single source of truth for orders.

    ``smdp_address`` may be assigned after construction (the server learns its port
    when it binds). ``reserve_delay`` is the time each of the two asynchronous steps
    (new → reserving → available) takes.
    """

    def __init__(self, *, account_sid: str, smdp_address: str = "", state_path=None,
                 reserve_delay: float = 0.1):
        self.account_sid = account_sid
        self.smdp_address = smdp_address
        self.state_path = os.fspath(state_path) if state_path else None
        self.reserve_delay = reserve_delay
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        self._callbacks: queue.Queue | None = None
        self._closed = False
        self.data = self._load()
        self.inventory = ProfileInventory(self.data.setdefault("inventory", {}))
        for key in ("esim_profiles", "sims", "euicc_certs"):
            self.data.setdefault(key, {})
        self.data.setdefault("events", [])

    # --- persistence -----------------------------------------------------------

    def _load(self) -> dict:
        if not self.state_path or not os.path.exists(self.state_path):
            return {"version": 1}
        try:
            with open(self.state_path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read SM-DP+ state {self.state_path}: {e}; "
                             "fix or delete the file") from e
        if not isinstance(data, dict):
            raise ValueError(f"SM-DP+ state {self.state_path} is not a JSON object; delete it")
        return data

    def save(self) -> None:
        if not self.state_path:
            return
        with self._lock:
            text = json.dumps(self.data, indent=1, sort_keys=False)
            tmp = f"{self.state_path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)

    def start(self) -> None:
        """Resume orders a previous run left half-reserved."""
        with self._lock:
            pending = [sid for sid, r in self.data["esim_profiles"].items()
                       if r["status"] in ("new", "reserving")]
        for sid in pending:
            self._schedule(sid)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, []
            if self._callbacks is not None:
                self._callbacks.put(None)   # the worker ends after what is already queued
                self._callbacks = None
        for t in timers:
            t.cancel()

    # --- reservations ----------------------------------------------------------

    def create(self, *, eid: str | None = None, generate_matching_id: bool = False,
               callback_url: str | None = None, callback_method: str = "POST",
               confirmation_code: str | None = None, use_ppk: bool = False) -> dict:
        ts = now_iso()
        rec = {
            "sid": new_sid("HP"), "account_sid": self.account_sid, "iccid": None, "sim_sid": None,
            "status": "new", "eid": eid, "smdp_plus_address": None, "matching_id": None,
            "activation_code": None, "error_code": None, "error_message": None,
            "date_created": ts, "date_updated": ts,
            # Internal (not part of the Twilio resource):
            "_generate_matching_id": bool(generate_matching_id),
            "_callback_url": callback_url or None, "_callback_method": callback_method,
            "_imsi": None, "_cc": confirmation_code or None, "_ppk": bool(use_ppk),
            "_cc_failures": 0,
        }
        with self._lock:
            self.data["esim_profiles"][rec["sid"]] = rec
            self.save()
            out = dict(rec)
        self._schedule(rec["sid"])
        return out

    def _schedule(self, sid: str) -> None:
        with self._lock:
            if self._closed:
                return
            t = threading.Timer(self.reserve_delay, self._advance, args=(sid,))
            t.daemon = True
            self._timers = [x for x in self._timers if x.is_alive()] + [t]
        t.start()

    def _advance(self, sid: str) -> None:
        """One asynchronous reservation step: new → reserving → available | failed."""
        with self._lock:
            if self._closed:
                return
            rec = self.data["esim_profiles"].get(sid)
            if rec is None:
                return
            if rec["status"] == "new":
                self._set(rec, status="reserving")
                again = True
            elif rec["status"] == "reserving":
                self._reserve(rec)
                again = False
            else:
                return
            self.save()
            snapshot = dict(rec)
        self._callback(snapshot)
        if again:
            self._schedule(sid)

    def _reserve(self, rec: dict) -> None:
        eid = rec["eid"]
        if eid is not None and not _EID_RE.match(eid):
            self._set(rec, status="failed", error_code="invalid_eid",
                      error_message=f"Eid {eid!r} is not an EID: it must be exactly 32 decimal digits")
            return
        if eid is None and not rec["_generate_matching_id"]:
            self._set(rec, status="failed", error_code="missing_eid_or_matching_id",
                      error_message="Nothing to reserve the profile for: give Eid, or "
                                    "GenerateMatchingId=true, or both")
            return
        spec = self.inventory.allocate()
        ts = now_iso()
        sim = {"sid": new_sid("HS"), "unique_name": None, "account_sid": self.account_sid,
               "iccid": spec.iccid, "status": "new", "fleet_sid": None,
               "date_created": ts, "date_updated": ts}
        self.data["sims"][sim["sid"]] = sim
        fields = {"status": "available", "iccid": spec.iccid, "sim_sid": sim["sid"],
                  "smdp_plus_address": self.smdp_address, "_imsi": spec.imsi}
        if rec["_generate_matching_id"]:
            mid = new_matching_id()
            fields.update(matching_id=mid, activation_code=f"1${self.smdp_address}${mid}")
        self._set(rec, **fields)

    def _set(self, rec: dict, **fields) -> None:
        rec.update(fields)
        rec["date_updated"] = now_iso()
        if "status" in fields:
            _log(f"order {rec['sid']} -> {rec['status']}"
                 + (f" ({rec['error_code']}: {rec['error_message']})" if rec["status"] == "failed" else ""))

    def get(self, sid: str) -> dict | None:
        with self._lock:
            rec = self.data["esim_profiles"].get(sid)
            return dict(rec) if rec else None

    def get_sim(self, sid: str) -> dict | None:
        with self._lock:
            rec = self.data["sims"].get(sid)
            return dict(rec) if rec else None

    def list(self, *, eid=None, sim_sid=None, status=None) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.data["esim_profiles"].values()
                    if (eid is None or r["eid"] == eid)
                    and (sim_sid is None or r["sim_sid"] == sim_sid)
                    and (status is None or r["status"] == status)]

    def list_sims(self, *, status=None, iccid=None, fleet=None) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.data["sims"].values()
                    if (status is None or r["status"] == status)
                    and (iccid is None or r["iccid"] == iccid)
                    and (fleet is None or r["fleet_sid"] == fleet)]

    # --- what ES9+ needs --------------------------------------------------------

    def claim(self, *, matching_id: str | None, eid: str) -> dict:
        """Resolve the order an authenticateClient is for (SGP.22 §3.1.3 / §5.6.2).

        With a matching ID: that order, if it is not bound to another EID. Without one
        (default SM-DP+ download): the oldest ``available`` order reserved for this EID.
        """
        with self._lock:
            orders = self.data["esim_profiles"].values()
            if matching_id:
                rec = next((r for r in orders if r["matching_id"] == matching_id), None)
                if rec is None:
                    raise OrderRefused("8.2.6", "3.8", f"matchingId {matching_id!r} is unknown")
                if rec["eid"] is not None and rec["eid"] != eid:
                    raise OrderRefused("8.1.1", "3.8",
                                       "this order is reserved for a different EID")
                self._check_usable(rec, "8.2.6", "3.8")
                return dict(rec)
            mine = [r for r in orders if r["eid"] == eid]
            ready = [r for r in mine if r["status"] == "available"]
            if not ready:
                states = sorted({r["status"] for r in mine})
                why = (f"orders for this EID are {', '.join(states)}" if states
                       else "no order is reserved for this EID")
                raise OrderRefused("8.2.5", "4.3", f"no eligible profile: {why}")
            return dict(ready[0])

    def _check_usable(self, rec: dict, subject: str, reason: str) -> None:
        if rec["status"] in ("downloaded", "installed"):
            raise OrderRefused(subject, reason, f"order {rec['sid']} was already downloaded; "
                                                "a profile can be downloaded only once")
        if rec["status"] != "available":
            raise OrderRefused(subject, reason, f"order {rec['sid']} is {rec['status']}, not available")

    def cc_failure(self, sid: str, limit: int) -> int:
        """Count a wrong Confirmation Code; fail the order at ``limit``. Returns the count."""
        snap = None
        with self._lock:
            rec = self.data["esim_profiles"][sid]
            rec["_cc_failures"] += 1
            n = rec["_cc_failures"]
            if n >= limit and rec["status"] == "available":
                self._set(rec, status="failed", error_code="8.2.7/6.4",
                          error_message=f"Confirmation Code refused {n} times")
                snap = dict(rec)
            self.save()
        if snap:
            self._callback(snap)
        return n

    def mark_downloaded(self, sid: str, eid: str) -> dict:
        """The BPP was handed out: the order is used up (single use), bound to ``eid``."""
        with self._lock:
            rec = self.data["esim_profiles"].get(sid)
            if rec is None:
                raise OrderRefused("8.2.6", "3.8", "order vanished")
            if rec["eid"] is not None and rec["eid"] != eid:
                raise OrderRefused("8.1.1", "3.8", "this order is reserved for a different EID")
            self._check_usable(rec, "8.8.5", "6.4")
            self._set(rec, status="downloaded", eid=eid)
            self.save()
            snap = dict(rec)
        self._callback(snap)
        return snap

    def find_by_iccid(self, iccid: str) -> dict | None:
        with self._lock:
            for r in reversed(list(self.data["esim_profiles"].values())):
                if r["iccid"] == iccid:
                    return dict(r)
        return None

    def finish(self, sid: str, *, ok: bool, error_code: str | None = None,
               error_message: str | None = None) -> dict | None:
        """Install outcome from the PIR: downloaded → installed | failed."""
        with self._lock:
            rec = self.data["esim_profiles"].get(sid)
            if rec is None or rec["status"] not in ("downloaded", "available"):
                return None
            if ok:
                self._set(rec, status="installed", error_code=None, error_message=None)
            else:
                self._set(rec, status="failed", error_code=error_code, error_message=error_message)
            self.save()
            snap = dict(rec)
        self._callback(snap)
        return snap

    def release(self, sid: str) -> dict | None:
        """The device cancelled a session that had fetched the BPP but installed nothing
        (a lost answer, Ctrl-C while loading): the order can be downloaded again by the
        same EID. Single use means one installed profile, not one HTTP response."""
        with self._lock:
            rec = self.data["esim_profiles"].get(sid)
            if rec is None or rec["status"] != "downloaded":
                return None
            self._set(rec, status="available")
            self.save()
            snap = dict(rec)
        self._callback(snap)
        return snap

    def fail(self, sid: str, error_code: str, error_message: str) -> dict | None:
        with self._lock:
            rec = self.data["esim_profiles"].get(sid)
            if rec is None or rec["status"] in ("installed", "failed"):
                return None
            self._set(rec, status="failed", error_code=error_code, error_message=error_message)
            self.save()
            snap = dict(rec)
        self._callback(snap)
        return snap

    def remember_cert(self, eid: str, cert_der: bytes) -> None:
        b64 = base64.b64encode(cert_der).decode()
        with self._lock:
            certs = self.data["euicc_certs"].setdefault(eid, [])
            if b64 not in certs:
                certs.append(b64)
                self.save()

    def certs_for(self, eid: str | None = None) -> list[bytes]:
        with self._lock:
            if eid is not None:
                lists = [self.data["euicc_certs"].get(eid, [])]
            else:
                lists = list(self.data["euicc_certs"].values())
            return [base64.b64decode(c) for lst in lists for c in lst]

    def record_event(self, **event) -> None:
        event.setdefault("date", now_iso())
        with self._lock:
            self.data["events"].append(event)
            del self.data["events"][:-1000]  # bounded: a test bed, not an archive
            self.save()

    def events(self) -> list[dict]:
        with self._lock:
            return [dict(e) for e in self.data["events"]]

    # --- status callbacks ---------------------------------------------------------

    def _callback(self, rec: dict) -> None:
        """POST/GET the status change to CallbackUrl, best effort, off the request path."""
        url = rec.get("_callback_url")
        if not url:
            return
        form = {"ESimProfileSid": rec["sid"], "SimSid": rec["sim_sid"] or "",
                "SimIccid": rec["iccid"] or "", "ESimProfileStatus": rec["status"],
                "Eid": rec["eid"] or "", "SmdpPlusAddress": rec["smdp_plus_address"] or "",
                "ErrorCode": rec["error_code"] or "", "ErrorMessage": rec["error_message"] or ""}
        method = rec.get("_callback_method") or "POST"
        # One worker delivers in order (reserving before available …), off the request path.
        with self._lock:
            if self._callbacks is None:
                self._callbacks = queue.Queue()
                threading.Thread(target=self._callback_worker, args=(self._callbacks,),
                                 name="twin-callbacks", daemon=True).start()
            self._callbacks.put((url, method, form))

    @staticmethod
    def _callback_worker(q: "queue.Queue") -> None:
        while True:
            item = q.get()
            if item is None:
                return
            _deliver(*item)


def _deliver(url: str, method: str, form: dict) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            _log(f"callback skipped: {url!r} is not an http(s) URL")
            return
        body = urllib.parse.urlencode(form)
        if method == "GET":
            sep = "&" if parts.query else "?"
            req = urllib.request.Request(url + sep + body, method="GET")
        else:
            req = urllib.request.Request(url, data=body.encode(), method="POST")
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        with urllib.request.urlopen(req, timeout=CALLBACK_TIMEOUT) as resp:
            resp.read(65536)
    except Exception as e:  # best effort by design: a dead callback must not hurt the order
        _log(f"callback to {url!r} failed: {e}")


# --- HTTP layer --------------------------------------------------------------------


@dataclass
class TwinResponse:
    status: int
    body: dict | None = None
    headers: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


class ApiError(Exception):
    """A Twilio-style REST error (JSON body with code, message, more_info, status)."""

    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> TwinResponse:
        return TwinResponse(self.status, {
            "code": self.code, "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}", "status": self.status})


def _bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v == "true":
        return True
    if v == "false":
        return False
    raise ApiError(400, 20001, f"Invalid parameter {name}: {value!r} is not a boolean (true or false)")


def _int(name: str, value: str, lo: int, hi: int | None) -> int:
    v = value.strip()
    try:
        if not re.fullmatch(r"[+-]?[0-9]+", v):
            raise ValueError
        n = int(v)  # any size: Page has no upper bound in the API description
    except ValueError:
        raise ApiError(400, 20001, f"Invalid parameter {name}: {value[:40]!r} is not an integer") from None
    if n < lo or (hi is not None and n > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ApiError(400, 20001, f"Invalid parameter {name}: {n} is out of range ({rng})")
    return n


def _params(raw: str, where: str, known: tuple[str, ...]) -> dict[str, str]:
    """Parse a query string or form body; unknown names are ignored (as Twilio does),
    a known one given twice is an error."""
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=False,
                                       errors="strict", max_num_fields=1000)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, 20001, f"Malformed {where}: {e}") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in known:
            continue
        if k in out:
            raise ApiError(400, 20001, f"Parameter {k} given more than once in the {where}")
        out[k] = v
    return out


class TwinApi:
    """HTTP handlers for /v1/ESimProfiles and /v1/Sims (Twilio Super SIM shapes)."""

    def __init__(self, store: TwinStore, *, auth: tuple[str, str] | None):
        self.store = store
        self.auth = auth

    def base_url(self) -> str:
        return f"https://{self.store.smdp_address}"

    # Entry point ------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, headers, body: bytes) -> TwinResponse:
        try:
            return self._route(method, path, query, headers, body)
        except ApiError as e:
            return e.response()

    def _route(self, method, path, query, headers, body) -> TwinResponse:
        self._authenticate(headers)
        parts = [p for p in path.split("/") if p]
        # parts[0] == "v1"
        if len(parts) == 2 and parts[1] == "ESimProfiles":
            if method == "POST":
                return self._create(headers, body)
            if method == "GET":
                return self._list_esim(_params(query, "query string", ESIM_QUERY))
            raise self._not_allowed(method, path, "GET, POST")
        if len(parts) == 3 and parts[1] == "ESimProfiles":
            if method == "GET":
                return self._fetch(self.store.get(parts[2]), path, self._esim_view)
            raise self._not_allowed(method, path, "GET")
        if len(parts) == 2 and parts[1] == "Sims":
            if method == "GET":
                return self._list_sims(_params(query, "query string", SIM_QUERY))
            raise self._not_allowed(method, path, "GET")
        if len(parts) == 3 and parts[1] == "Sims":
            if method == "GET":
                return self._fetch(self.store.get_sim(parts[2]), path, self._sim_view)
            raise self._not_allowed(method, path, "GET")
        raise ApiError(404, 20404, f"The requested resource {path} was not found")

    @staticmethod
    def _not_allowed(method, path, allow) -> ApiError:
        e = ApiError(405, 20004, f"Method {method} is not allowed on {path} (allowed: {allow})")
        return e

    def _authenticate(self, headers) -> None:
        if self.auth is None:
            return
        value = headers.get("Authorization") or ""
        ok = False
        if value[:6].lower() == "basic ":
            try:
                user, _, pw = base64.b64decode(value[6:].strip(), validate=True).decode().partition(":")
                ok = (hmac.compare_digest(user.encode(), self.auth[0].encode())
                      & hmac.compare_digest(pw.encode(), self.auth[1].encode()))
            except (ValueError, UnicodeDecodeError):
                ok = False
        if not ok:
            raise ApiError(401, 20003, "Authenticate")

    # ESimProfiles -----------------------------------------------------------------

    def _create(self, headers, body: bytes) -> TwinResponse:
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if body and ctype not in ("application/x-www-form-urlencoded", ""):
            raise ApiError(415, 20001, f"Unsupported Content-Type {ctype!r}: send "
                                       "application/x-www-form-urlencoded")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, 20001, "Request body is not UTF-8") from None
        form = _params(text, "form body", CREATE_FORM)
        gen = _bool("GenerateMatchingId", form["GenerateMatchingId"]) if "GenerateMatchingId" in form else False
        method = form.get("CallbackMethod", "POST")
        if method not in ("GET", "POST"):
            raise ApiError(400, 20001, f"Invalid parameter CallbackMethod: {method!r} (GET or POST)")
        eid = form.get("Eid")
        # Twin extensions (not in Twilio's API): a Confirmation Code and PPK binding per order.
        cc = form.get("ConfirmationCode") or None
        ppk = _bool("UsePpk", form["UsePpk"]) if "UsePpk" in form else False
        rec = self.store.create(eid=eid if eid != "" else None, generate_matching_id=gen,
                                callback_url=form.get("CallbackUrl") or None, callback_method=method,
                                confirmation_code=cc, use_ppk=ppk)
        return TwinResponse(201, self._esim_view(rec))

    def _esim_view(self, rec: dict) -> dict:
        out = {k: rec[k] for k in ESIM_FIELDS}
        out["url"] = f"{self.base_url()}/v1/ESimProfiles/{rec['sid']}"
        return out

    def _sim_view(self, rec: dict) -> dict:
        out = {k: rec[k] for k in SIM_FIELDS}
        url = f"{self.base_url()}/v1/Sims/{rec['sid']}"
        out["url"] = url
        out["links"] = {"billing_periods": f"{url}/BillingPeriods",
                        "sim_ip_addresses": f"{url}/IpAddresses"}
        return out

    def _fetch(self, rec, path, view) -> TwinResponse:
        if rec is None:
            raise ApiError(404, 20404, f"The requested resource {path} was not found")
        return TwinResponse(200, view(rec))

    def _list_esim(self, q: dict) -> TwinResponse:
        status = q.get("Status")
        if status is not None and status not in ESIM_STATUSES:
            raise ApiError(400, 20001, f"Invalid parameter Status: {status!r} "
                                       f"(one of {', '.join(ESIM_STATUSES)})")
        filters = [(k, q[k]) for k in ("Eid", "SimSid", "Status") if k in q]
        items = self.store.list(eid=q.get("Eid"), sim_sid=q.get("SimSid"), status=status)
        return self._page("/v1/ESimProfiles", "esim_profiles", items, filters, q, self._esim_view)

    def _list_sims(self, q: dict) -> TwinResponse:
        status = q.get("Status")
        if status is not None and status not in SIM_STATUSES:
            raise ApiError(400, 20001, f"Invalid parameter Status: {status!r} "
                                       f"(one of {', '.join(SIM_STATUSES)})")
        filters = [(k, q[k]) for k in ("Status", "Fleet", "Iccid") if k in q]
        items = self.store.list_sims(status=status, iccid=q.get("Iccid"), fleet=q.get("Fleet"))
        return self._page("/v1/Sims", "sims", items, filters, q, self._sim_view)

    def _page(self, path, key, items, filters, q, view) -> TwinResponse:
        """Twilio paging: PageSize (1..1000, default 50), Page (client state), PageToken.

        PageToken "PA<sid>" means "after that resource", "PB<sid>" "before it", as in
        Twilio's next/previous_page_url. A token we cannot resolve (say, its resource is
        gone) falls back to Page × PageSize rather than failing the listing.
        """
        size = _int("PageSize", q["PageSize"], 1, MAX_PAGE_SIZE) if "PageSize" in q else DEFAULT_PAGE_SIZE
        page = _int("Page", q["Page"], 0, None) if "Page" in q else 0
        sids = [r["sid"] for r in items]
        start = None
        token = q.get("PageToken")
        if token and len(token) > 2 and token[2:] in sids:
            i = sids.index(token[2:])
            if token.startswith("PA"):
                start = i + 1
            elif token.startswith("PB"):
                start = max(0, i - size)
        if start is None:
            start = min(page * size, len(items))
        chunk = items[start:start + size]

        def url(p: int, tok: str | None) -> str:
            qs = filters + [("PageSize", str(size)), ("Page", str(p))]
            if tok:
                qs.append(("PageToken", tok))
            return f"{self.base_url()}{path}?{urllib.parse.urlencode(qs)}"

        nxt = url(page + 1, "PA" + chunk[-1]["sid"]) if chunk and start + size < len(items) else None
        prev = url(page - 1, "PB" + chunk[0]["sid"]) if chunk and start > 0 and page > 0 else None
        meta = {"first_page_url": url(0, None), "key": key, "next_page_url": nxt, "page": page,
                "page_size": size, "previous_page_url": prev, "url": url(page, token)}
        return TwinResponse(200, {key: [view(r) for r in chunk], "meta": meta})
