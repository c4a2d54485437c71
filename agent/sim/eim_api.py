"""Operations REST API of the local eIM, shaped after emnify's eUICC API.

Paths, field names, types and the error shape ``{status_code, message}`` follow emnify's
published description of its eUICC and eUICC-operation endpoints (``/api/v1/euicc…``);
authentication is a static Bearer token (emnify issues JWTs; any fixed string here).

* ``GET /api/v1/euicc`` (``page``, ``per_page``, ``q`` = ``field:criteria,…`` over id,
  eid, supported_profile_type, status, eim; ``sort`` = ``[-]field,…``), ``GET
  /api/v1/euicc/{id}``, ``GET /api/v1/euicc/status``, ``GET /api/v1/euicc/profile/status``,
  ``POST /api/v1/euicc/unlinked_validation``;
* ``GET /api/v1/euicc/operation/action``, ``GET /api/v1/euicc/operation/status``,
  ``POST|GET /api/v1/euicc/{id}/operation`` (q over id, action, status, iccid_with_luhn),
  ``GET|DELETE /api/v1/euicc/{id}/operation/{uuid}``.

Scheduling (POST) checks the whole request before creating anything: action 1-5,
validity_period 1-86400 (default 86400), an activation code for a download, an ICCID on
the eUICC for enable / set fallback / delete; the enabled profile can neither be deleted
nor become the fallback (only a disabled one can), and enabling the enabled one is
refused. Contradicting operations — two enables, anything else on the same ICCID, two
fallbacks, the same activation code twice — apply only the first: a later one, in the
same request or against a still-scheduled one, is recorded Canceled with an error saying
which operation it contradicts. Lists are pages (``X-Total-Count``, ``X-Total-Pages``,
``X-Current-Page``, ``X-Count-Per-Page`` headers); 201 answers carry a ``Link`` header
with each created operation's URL (``rel="item"``).
"""
from __future__ import annotations

import hmac
import json
import math
import re
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..ac import parse_activation_code
from ..errors import AgentError
from . import eim as E

API = "/api/v1/euicc"
MAX_PER_PAGE = 1000
DEFAULT_PER_PAGE = 100
MAX_OPERATIONS = 100          # per request
MAX_VALIDITY = 86400
PROFILE_TYPE = {"id": 5, "description": "IoT eUICC Profile"}
EUICC_STATUS = {"id": 1, "description": "Active"}
ORG = {"id": 1, "name": "esim-agent test bed"}
EIM_REF = {"id": 1, "description": E.EIM_ID}

EUICC_FILTERS = ("id", "eid", "supported_profile_type", "status", "eim")
EUICC_SORTS = ("id", "eid", "modified", "supported_profile_type", "status", "eim")
OP_FILTERS = ("id", "action", "status", "iccid_with_luhn")
OP_SORTS = ("id", "action", "status", "iccid_with_luhn", "creation_date", "expiry_date", "finalization_date")


@dataclass
class ApiResponse:
    status: int
    body: object = None
    headers: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> ApiResponse:
        return ApiResponse(self.status, {"status_code": self.status, "message": self.message}, self.headers)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    d = datetime.fromtimestamp(ts, timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def _idd(table: dict, i: int) -> dict:
    return {"id": i, "description": table.get(i, "Unknown")}


def _int_param(name: str, value: str, lo: int, hi: int | None) -> int:
    if not re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", value):
        raise ApiError(400, f"{name} must be an integer, not {value[:40]!r}")
    n = int(value)
    if n < lo or (hi is not None and n > hi):
        raise ApiError(400, f"{name} must be between {lo} and {hi}" if hi else f"{name} must be at least {lo}")
    return n


def _query(raw: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, errors="strict", max_num_fields=100)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"malformed query string: {e}") from None
    return dict(pairs)


def _filters(q: str | None, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """``field:criteria,field:criteria`` -> [(field, criteria)]."""
    if q is None or not q.strip():
        return []
    out = []
    for part in q.split(","):
        name, sep, crit = part.partition(":")
        name, crit = name.strip(), crit.strip()
        if not sep or not crit:
            raise ApiError(400, f"q: {part.strip()[:40]!r} is not <field>:<criteria>")
        if name not in allowed:
            raise ApiError(400, f"q: cannot filter by {name[:40]!r} (allowed: {', '.join(allowed)})")
        out.append((name, crit))
    return out


def _sorts(s: str | None, allowed: tuple[str, ...]) -> list[tuple[str, bool]]:
    if s is None or not s.strip():
        return []
    out = []
    for part in s.split(","):
        name = part.strip()
        desc = name.startswith("-")
        name = name.lstrip("-+").strip()
        if name not in allowed:
            raise ApiError(400, f"sort: cannot sort by {name[:40]!r} (allowed: {', '.join(allowed)})")
        out.append((name, desc))
    return out


def _sorted(items: list, keys: list[tuple[str, bool]], key_of) -> list:
    # stable sorts from the last key to the first; missing values last in either direction
    for name, desc in reversed(keys):
        present = [i for i in items if key_of(i, name) is not None]
        missing = [i for i in items if key_of(i, name) is None]
        items = sorted(present, key=lambda i: key_of(i, name), reverse=desc) + missing
    return items


def _crit_int(name: str, crit: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", crit):
        raise ApiError(400, f"q: {name} criteria must be a number, not {crit[:40]!r}")
    return int(crit)


class EimApi:
    """HTTP handlers of the operations API, I/O free: ``handle(method, path, query, headers, body)``."""

    def __init__(self, eim: E.Eim, *, token: str | None):
        self.eim = eim
        self.token = token

    def handle(self, method: str, path: str, query: str, headers, body: bytes) -> ApiResponse:
        try:
            self._authenticate(headers)
            return self._route(method, path.rstrip("/") or "/", query, headers, body)
        except ApiError as e:
            return e.response()

    def _authenticate(self, headers) -> None:
        if self.token is None:
            return
        value = headers.get("Authorization") or ""
        scheme, _, cred = value.strip().partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode("utf-8", "replace"),
                                                                self.token.encode())
        if not ok:
            raise ApiError(401, "missing or invalid Bearer token" if value else "authentication required: "
                           "send Authorization: Bearer <token>", {"WWW-Authenticate": 'Bearer realm="eim"'})

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method not in allowed.split(", "):
            raise ApiError(405, f"method {method[:20]} is not allowed here (allowed: {allowed})",
                           {"Allow": allowed})

    def _route(self, method, path, query, headers, body) -> ApiResponse:
        if not (path == API or path.startswith(API + "/")):
            raise ApiError(404, f"no resource {path[:200]}")
        parts = path[len(API):].split("/")[1:]
        q = _query(query)
        with self.eim.store as data:
            self.eim.expire_due(data)
            if not parts:
                self._allow(method, "GET")
                return self._list_euiccs(data, q)
            if parts == ["status"]:
                self._allow(method, "GET")
                return ApiResponse(200, [EUICC_STATUS])
            if parts == ["profile", "status"]:
                self._allow(method, "GET")
                return ApiResponse(200, [_idd(E.PROFILE_STATUSES, i) for i in sorted(E.PROFILE_STATUSES)])
            if parts == ["operation", "action"]:
                self._allow(method, "GET")
                return ApiResponse(200, [_idd(E.ACTIONS, i) for i in sorted(E.ACTIONS)])
            if parts == ["operation", "status"]:
                self._allow(method, "GET")
                return ApiResponse(200, [_idd(E.OP_STATUSES, i) for i in sorted(E.OP_STATUSES)])
            if parts == ["unlinked_validation"]:
                self._allow(method, "POST")
                return self._unlinked(data, body)
            rec = self._euicc(data, parts[0])
            if len(parts) == 1:
                self._allow(method, "GET")
                return ApiResponse(200, self._euicc_view(rec))
            if parts[1] != "operation" or len(parts) > 3:
                raise ApiError(404, f"no resource {path[:200]}")
            if len(parts) == 2:
                self._allow(method, "GET, POST")
                if method == "POST":
                    return self._schedule(data, rec, headers, body)
                return self._list_ops(data, rec, q)
            self._allow(method, "GET, DELETE")
            op = self._op(data, rec, parts[2])
            if method == "DELETE":
                if not self.eim.cancel(data, op):
                    raise ApiError(400, f"operation {op['id']} is {E.OP_STATUSES[op['status']]}"
                                   + (" and already sent to the device" if op["sent"] else "")
                                   + ": it can no longer be canceled")
                return ApiResponse(204)
            return ApiResponse(200, self._op_view(data, op))

    # eUICCs ----------------------------------------------------------------------------------------

    def _euicc(self, data: dict, ident: str) -> dict:
        rec = None
        if re.fullmatch(r"[0-9]{1,18}", ident):
            rec = self.eim.euicc_by_id(data, int(ident))
        if rec is None:
            raise ApiError(404, f"no IoT eUICC with id {ident[:40]!r}")
        return rec

    def _euicc_view(self, rec: dict) -> dict:
        return {
            "id": rec["id"], "eid": rec["eid"], "created": iso(rec["created"]),
            "issuer_org": dict(ORG), "customer_org": dict(ORG),
            "supported_profile_type": dict(PROFILE_TYPE), "status": dict(EUICC_STATUS),
            "last_audited": iso(rec["last_audited"]), "last_polled": iso(rec["last_polled"]),
            "last_synced": iso(rec["last_synced"]), "eim": dict(EIM_REF),
            "profile": [self._profile_view(p) for p in rec["profiles"]],
        }

    @staticmethod
    def _profile_view(p: dict) -> dict:
        return {"iccid_with_luhn": p["iccid"], "status": _idd(E.PROFILE_STATUSES, p["status"]),
                "customer_org": dict(ORG), "name": p.get("name"), "operator": None,
                "preloaded": bool(p.get("preloaded")), "fallback_allowed": p.get("fallback_allowed"),
                "fallback_attribute": bool(p.get("fallback_attribute")), "profile_type": dict(PROFILE_TYPE),
                "endpoint": None}

    def _list_euiccs(self, data: dict, q: dict) -> ApiResponse:
        items = sorted(data["euiccs"].values(), key=lambda r: r["id"])
        for name, crit in _filters(q.get("q"), EUICC_FILTERS):
            if name == "eid":
                items = [r for r in items if crit.lower() in r["eid"].lower()]
            else:
                n = _crit_int(name, crit)
                fixed = {"supported_profile_type": PROFILE_TYPE["id"], "status": EUICC_STATUS["id"],
                         "eim": EIM_REF["id"]}
                items = [r for r in items if (r["id"] if name == "id" else fixed[name]) == n]

        def key(r, name):
            return {"id": r["id"], "eid": r["eid"], "modified": r.get("modified", r["created"]),
                    "supported_profile_type": PROFILE_TYPE["id"], "status": EUICC_STATUS["id"],
                    "eim": EIM_REF["id"]}[name]
        items = _sorted(items, _sorts(q.get("sort"), EUICC_SORTS), key)
        return self._page(items, q, self._euicc_view)

    def _page(self, items: list, q: dict, view) -> ApiResponse:
        page = _int_param("page", q["page"], 1, None) if "page" in q else 1
        per = _int_param("per_page", q["per_page"], 1, MAX_PER_PAGE) if "per_page" in q else DEFAULT_PER_PAGE
        total = len(items)
        chunk = items[(page - 1) * per: page * per] if (page - 1) * per < total else []
        headers = {"X-Total-Count": str(total), "X-Total-Pages": str(max(1, math.ceil(total / per))),
                   "X-Current-Page": str(page), "X-Count-Per-Page": str(per)}
        return ApiResponse(200, [view(i) for i in chunk], headers)

    def _unlinked(self, data: dict, body: bytes) -> ApiResponse:
        doc = _json_body(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("target"), list):
            raise ApiError(400, "expected {\"target\": [{\"eid\": …}, …]}")
        out = []
        for t in doc["target"][:MAX_PER_PAGE]:
            eid = t.get("eid") if isinstance(t, dict) else None
            if not isinstance(eid, str):
                raise ApiError(400, "every target needs an eid string")
            rec = data["euiccs"].get(eid)
            if rec and any(p["status"] != E.P_DELETED for p in rec["profiles"]):
                out.append({"eid": eid})
        return ApiResponse(200, out)

    # operations ------------------------------------------------------------------------------------

    def _op(self, data: dict, rec: dict, ident: str) -> dict:
        try:
            key = str(uuid.UUID(ident))
        except ValueError:
            raise ApiError(404, f"no operation {ident[:60]!r}: operation ids are UUIDs") from None
        op = data["operations"].get(key)
        if op is None or op["euicc"] != rec["eid"]:
            raise ApiError(404, f"eUICC {rec['id']} has no operation {key}")
        return op

    def _op_view(self, data: dict, op: dict) -> dict:
        out = {"id": op["id"], "action": _idd(E.ACTIONS, op["action"]), "status": _idd(E.OP_STATUSES, op["status"]),
               "creation_date": iso(op["created"]), "last_updated_at": iso(op["updated"]),
               "expiry_date": iso(op["expiry"]), "user": dict(op["user"])}
        if op["finalized"] is not None:
            out["finalization_date"] = iso(op["finalized"])
        if op["error"]:
            out["error"] = dict(op["error"])
        if op.get("iccid"):
            out["iccid_with_luhn"] = op["iccid"]
        return out

    def _list_ops(self, data: dict, rec: dict, q: dict) -> ApiResponse:
        items = sorted((o for o in data["operations"].values() if o["euicc"] == rec["eid"]),
                       key=lambda o: o["created"])
        for name, crit in _filters(q.get("q"), OP_FILTERS):
            if name == "id":
                items = [o for o in items if o["id"] == crit.lower()]
            elif name == "iccid_with_luhn":
                items = [o for o in items if crit in (o.get("iccid") or "")]
            else:
                n = _crit_int(name, crit)
                items = [o for o in items if o[name] == n]

        def key(o, name):
            return {"id": o["id"], "action": o["action"], "status": o["status"], "iccid_with_luhn": o.get("iccid"),
                    "creation_date": o["created"], "expiry_date": o["expiry"],
                    "finalization_date": o["finalized"]}[name]
        items = _sorted(items, _sorts(q.get("sort"), OP_SORTS), key)
        return self._page(items, q, lambda o: self._op_view(data, o))

    def _schedule(self, data: dict, rec: dict, headers, body: bytes) -> ApiResponse:
        ctype = (headers.get("Content-Type") or "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):
            raise ApiError(400, f"send the operations as application/json, not {ctype[:60]}")
        doc = _json_body(body)
        if not isinstance(doc, list):
            raise ApiError(400, "the body must be a JSON array of operations")
        if not doc:
            raise ApiError(400, "the array holds no operation")
        if len(doc) > MAX_OPERATIONS:
            raise ApiError(400, f"at most {MAX_OPERATIONS} operations per request")
        reqs = [self._check(rec, i, item) for i, item in enumerate(doc)]
        # contradicting operations: only the first applies (scheduled ones come first)
        claimed: dict[str, dict] = {}
        for op in self.eim.pending(data, rec):
            for k in _conflict_keys(op["action"], op.get("iccid"), op.get("activation_code"), op["enable"]):
                claimed.setdefault(k, op)
        created = []
        for r in reqs:
            op = self.eim.new_operation(data, rec, **r)
            keys = _conflict_keys(r["action"], r["iccid"], r["activation_code"], r["enable"])
            first = next((claimed[k] for k in keys if k in claimed), None)
            if first is not None:
                self.eim.finish(op, E.S_CANCELED, E.error(
                    E.UNDEFINED, "contradicting",
                    f"contradicts operation {first['id']} ({E.ACTIONS[first['action']]}) scheduled before it; "
                    "only the first of contradicting operations applies"))
            else:
                for k in keys:
                    claimed[k] = op
            created.append(op)
        base = f"{API}/{rec['id']}/operation/"
        link = ", ".join(f'<{base}{op["id"]}>; rel="item"' for op in created)
        return ApiResponse(201, [self._op_view(data, op) for op in created], {"Link": link})

    def _check(self, rec: dict, i: int, item) -> dict:
        where = f"operation {i + 1}"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} is not an object")
        action = item.get("action")
        aid = action.get("id") if isinstance(action, dict) else None
        if not isinstance(aid, int) or isinstance(aid, bool) or aid not in E.ACTIONS:
            raise ApiError(400, f"{where}: action.id must be one of "
                           + ", ".join(f"{k} ({v})" for k, v in E.ACTIONS.items()))
        validity = item.get("validity_period", MAX_VALIDITY)
        if not isinstance(validity, int) or isinstance(validity, bool) or not 1 <= validity <= MAX_VALIDITY:
            raise ApiError(400, f"{where}: validity_period must be 1 to {MAX_VALIDITY} seconds")
        for name in ("enable", "rollback"):
            if name in item and not isinstance(item[name], bool):
                raise ApiError(400, f"{where}: {name} must be true or false")
        for name in ("iccid_with_luhn", "activation_code"):
            if name in item and not isinstance(item[name], str):
                raise ApiError(400, f"{where}: {name} must be a string")
        out = {"action": aid, "validity": validity, "iccid": None, "activation_code": None,
               "enable": bool(item.get("enable", False)), "rollback": bool(item.get("rollback", False))}
        if aid == E.A_DOWNLOAD:
            ac = item.get("activation_code")
            if not ac:
                raise ApiError(400, f"{where}: a download needs an activation_code")
            try:
                parse_activation_code(ac)
            except AgentError as e:
                raise ApiError(400, f"{where}: {e.message}") from None
            out["activation_code"] = ac
        elif aid in (E.A_ENABLE, E.A_FALLBACK, E.A_DELETE):
            iccid = item.get("iccid_with_luhn")
            if not iccid:
                raise ApiError(400, f"{where}: {E.ACTIONS[aid].lower()} needs iccid_with_luhn")
            p = self.eim.profile(rec, iccid)
            if p is None or p["status"] == E.P_DELETED:
                raise ApiError(400, f"{where}: eUICC {rec['id']} has no profile {iccid[:40]}")
            enabled = p["status"] == E.P_ENABLED
            if aid == E.A_ENABLE and enabled:
                raise ApiError(400, f"{where}: profile {iccid} is already enabled")
            if aid == E.A_FALLBACK and enabled:
                raise ApiError(400, f"{where}: profile {iccid} is enabled; only a disabled profile can become "
                                    "the fallback profile")
            if aid == E.A_FALLBACK and p.get("fallback_allowed") is False:
                raise ApiError(400, f"{where}: profile {iccid} does not allow being the fallback profile")
            if aid == E.A_DELETE and enabled:
                raise ApiError(400, f"{where}: profile {iccid} is enabled and cannot be deleted; enable "
                                    "another profile first")
            out["iccid"] = iccid
        if aid not in (E.A_ENABLE, E.A_DOWNLOAD) or (aid == E.A_DOWNLOAD and not out["enable"]):
            out["rollback"] = False
        if aid != E.A_DOWNLOAD:
            out["enable"] = False
        return out


def _conflict_keys(action: int, iccid, ac, enable: bool) -> set[str]:
    """What an operation claims; two operations sharing a claim contradict each other."""
    if action == E.A_AUDIT:
        return set()
    if action == E.A_DOWNLOAD:
        return {f"ac:{ac}"} | ({"enabled-profile"} if enable else set())
    if action == E.A_ENABLE:
        return {"enabled-profile", f"iccid:{iccid}"}
    if action == E.A_FALLBACK:
        return {"fallback", f"iccid:{iccid}"}
    return {f"iccid:{iccid}"}


def _json_body(body: bytes):
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not JSON: {e!s:.200}") from None
