"""The IPAd's operations (SGP.32; docs/protocol.md §7): associate an eIM, list the eIMs,
poll, status, fallback and the return from it.  The protocol work is in agent/ipa.py (the
poll round) and agent/eim_client.py (ESipa); settings come from ``ctx.eim``.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import os
from pathlib import Path

from .. import codec, tlv
from ..errors import AgentError, InputError, ProtocolError, UsageError
from .card import Card
from ..logs import get_logger

log = get_logger(__name__)

LAST_POLL_FILE = "ipa-last-poll.json"


# --- eIM configuration files ------------------------------------------------------------

def _cert_value(v, what: str):
    """A certificate or public key given in JSON: base64 DER or PEM text -> DER bytes."""
    if not isinstance(v, str):
        raise InputError(f"{what}: expected base64 DER or PEM text", code="bad_eim_config")
    if "-----BEGIN" in v:
        body = "".join(line for line in v.strip().splitlines() if not line.startswith("-----"))
    else:
        body = v
    try:
        return base64.b64decode(body.replace("\n", "").replace(" ", ""), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: not valid base64 / PEM", code="bad_eim_config") from None


_PROTOCOL_BITS = {"eimRetrieveHttps": 0, "eimRetrieveCoaps": 1, "eimInjectHttps": 2, "eimInjectCoaps": 3,
                  "eimProprietary": 4}
_ID_TYPES = {"oid": 1, "fqdn": 2, "proprietary": 3, "eimIdTypeOid": 1, "eimIdTypeFqdn": 2,
             "eimIdTypeProprietary": 3}


def eim_config_from_json(obj) -> bytes:
    """EimConfigurationData DER from its JSON form: an object with the ASN.1 component names
    (eimId, eimFqdn, eimIdType (number or oid/fqdn/proprietary), counterValue, associationToken,
    eimPublicKeyData {eimCertificate | eimPublicKey: base64 DER or PEM}, trustedPublicKeyDataTls
    {trustedCertificateTls | trustedEimPkTls}, eimSupportedProtocol (list of names), euiccCiPKId
    (hex), indirectProfileDownload (true))."""
    from ..es10 import make_bits
    if not isinstance(obj, dict):
        raise InputError("an EimConfigurationData in JSON is an object", code="bad_eim_config")
    known = {"eimId", "eimFqdn", "eimIdType", "counterValue", "associationToken", "eimPublicKeyData",
             "trustedPublicKeyDataTls", "eimSupportedProtocol", "euiccCiPKId", "indirectProfileDownload"}
    extra = sorted(set(obj) - known)
    if extra:
        raise InputError(f"unknown EimConfigurationData field(s): {', '.join(extra)}", code="bad_eim_config")
    if not isinstance(obj.get("eimId"), str) or not obj["eimId"]:
        raise InputError("eimId (a non-empty string) is required", code="bad_eim_config")
    v: dict = {"eimId": obj["eimId"]}
    if "eimFqdn" in obj:
        v["eimFqdn"] = str(obj["eimFqdn"])
    if "eimIdType" in obj:
        t = obj["eimIdType"]
        v["eimIdType"] = _ID_TYPES.get(t, t) if isinstance(t, str) else t
        if not isinstance(v["eimIdType"], int):
            raise InputError(f"eimIdType {t!r} is not oid, fqdn or proprietary", code="bad_eim_config")
    for k in ("counterValue", "associationToken"):
        if k in obj:
            if isinstance(obj[k], bool) or not isinstance(obj[k], int):
                raise InputError(f"{k} must be a whole number", code="bad_eim_config")
            v[k] = obj[k]
    for k, alts in (("eimPublicKeyData", ("eimPublicKey", "eimCertificate")),
                    ("trustedPublicKeyDataTls", ("trustedEimPkTls", "trustedCertificateTls"))):
        if k in obj:
            d = obj[k]
            if not isinstance(d, dict) or len(d) != 1 or next(iter(d)) not in alts:
                raise InputError(f"{k} must be an object with one of {', '.join(alts)}", code="bad_eim_config")
            alt, val = next(iter(d.items()))
            der = _cert_value(val, f"{k}.{alt}")
            type_name = "SubjectPublicKeyInfo" if alt in ("eimPublicKey", "trustedEimPkTls") else "Certificate"
            try:
                v[k] = (alt, codec.decode(type_name, der))
            except ProtocolError as e:
                raise InputError(f"{k}.{alt} is not a {type_name}: {e.message}", code="bad_eim_config") from None
    if "eimSupportedProtocol" in obj:
        names = obj["eimSupportedProtocol"]
        if not isinstance(names, list) or any(n not in _PROTOCOL_BITS for n in names):
            raise InputError(f"eimSupportedProtocol must list some of {', '.join(_PROTOCOL_BITS)}",
                             code="bad_eim_config")
        v["eimSupportedProtocol"] = make_bits([_PROTOCOL_BITS[n] for n in names])
    if "euiccCiPKId" in obj:
        try:
            v["euiccCiPKId"] = bytes.fromhex(str(obj["euiccCiPKId"]))
        except ValueError:
            raise InputError("euiccCiPKId must be hex", code="bad_eim_config") from None
    if obj.get("indirectProfileDownload"):
        v["indirectProfileDownload"] = None
    try:
        return codec.encode("EimConfigurationData", v)
    except ValueError as e:
        raise InputError(f"not a valid EimConfigurationData: {e}", code="bad_eim_config") from None


def read_eim_configs(file: str) -> list[bytes]:
    """EimConfigurationData entries from a file: DER (one or more 30 TLVs) or JSON (an object, a
    list of objects, or {"eimConfigurationDataList": [...]})."""
    from ..es10_iot import eim_config_from_der
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the eIM configuration file {file}: {e.strerror or e}",
                         code="eim_config_unreadable") from None
    if not data.strip():
        raise InputError(f"the eIM configuration file {file} is empty", code="bad_eim_config")
    if data[:1] == b"\x30":
        try:
            configs = [t.raw for t in tlv.parse_all(data)]
            for c in configs:
                eim_config_from_der(c)
        except ProtocolError as e:
            raise InputError(f"{file} is not DER EimConfigurationData: {e.message}", code="bad_eim_config") from None
        return configs
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{file} is neither DER (starting with 30) nor JSON EimConfigurationData",
                         code="bad_eim_config") from None
    if isinstance(obj, dict) and "eimConfigurationDataList" in obj:
        obj = obj["eimConfigurationDataList"]
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise InputError(f"{file} holds no EimConfigurationData", code="bad_eim_config")
    return [eim_config_from_json(o) for o in items]


# --- which eIM, which client ------------------------------------------------------------

def _host_port(url: str) -> str:
    u = url.strip()
    for p in ("https://", "http://"):
        if u.lower().startswith(p):
            u = u[len(p):]
    return u.split("/", 1)[0].lower()


def select_eim(ctx, card: Card):
    """(the eUICC's EimConfig of the eIM to poll or None, its URL). ``ctx.eim.url`` wins;
    else the first eIM on the card with an address (eimFqdn)."""
    configs = card.es10.get_eim_configuration_data()
    if ctx.eim.url:
        want = _host_port(ctx.eim.url)
        match = next((c for c in configs if c.fqdn and _host_port(c.fqdn) == want), None)
        return (match or (configs[0] if len(configs) == 1 else None)), ctx.eim.url
    for c in configs:
        if c.fqdn:
            return c, c.fqdn
    if configs:
        raise UsageError("the eUICC's eIM configuration has no address (eimFqdn): set [eim] url",
                         code="no_eim_configured")
    raise UsageError("no eIM is associated with this eUICC and none is configured: associate one with "
                     "`esim-agent ipa add-eim FILE` or set [eim] url", code="no_eim_configured")


def client_for(ctx, card: Card, eim, url: str):
    from ..eim_client import EimClient
    return EimClient(url, eid=card.eid, binding=ctx.eim.binding, version=ctx.eim.esipa_version, ca=ctx.eim.ca,
                     tls_trust=eim.tls_trust if eim is not None else None, deadline=ctx.servers.http_timeout)


def _state_file(ctx) -> Path:
    return ctx.outbox_path().parent / LAST_POLL_FILE


def _record_poll(ctx, record: dict) -> None:
    path = _state_file(ctx)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot record the last poll in %s: %s", path, e)


# --- operations ---------------------------------------------------------------------------

def add_eim(ctx, card: Card, file: str) -> dict:
    """ES10b AddInitialEim with the EimConfigurationData of ``file`` (DER or JSON)."""
    from ..es10_iot import eim_config_from_der
    configs = read_eim_configs(file)
    if ctx.steps.seen("added") is None:
        ctx.steps.step("add", eims=[eim_config_from_der(c).eim_id for c in configs])
        res = card.es10.add_initial_eim(configs)
        ctx.steps.step("added", association_tokens=res.association_tokens)
        tokens = res.association_tokens
    else:
        tokens = ctx.steps.seen("added")["association_tokens"]
    eims = [eim_config_from_der(c) for c in configs]
    return {"added": [{"eim_id": e.eim_id, "fqdn": e.fqdn, "association_token": t}
                      for e, t in zip(eims, tokens)]}


def list_eim(ctx, card: Card) -> dict:
    return {"eims": [c.to_json() for c in card.es10.get_eim_configuration_data()]}


def poll(ctx, card: Card, state_change_cause: int | None = None) -> dict:
    """One poll round with the eIM (agent/ipa.py); returns what was executed."""
    from ..ipa import Ipa
    if state_change_cause is not None and (isinstance(state_change_cause, bool)
                                           or not isinstance(state_change_cause, int)
                                           or not 0 <= state_change_cause <= 127):
        raise UsageError(f"state_change_cause must be a StateChangeCause number (0..127), not "
                         f"{state_change_cause!r}", code="bad_input")
    eim, url = select_eim(ctx, card)
    client = client_for(ctx, card, eim, url)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = {"at": started, "eim_url": url, "eim_id": eim.eim_id if eim else None,
              "esipa_version": client.version, "binding": client.binding}
    try:
        executed = Ipa(ctx, card, client, eim).poll(state_change_cause)
    except AgentError as e:
        _record_poll(ctx, {**record, "outcome": "failed", "error": e.to_json()})
        raise
    finally:
        client.close()
    _record_poll(ctx, {**record, "outcome": "ok", "executed": len(executed)})
    data = {"eid": card.eid, **{k: record[k] for k in ("eim_url", "eim_id", "esipa_version", "binding")},
            "executed": executed}
    if state_change_cause is not None:
        data["state_change_cause"] = state_change_cause
    return data


def status(ctx, card: Card) -> dict:
    es10 = card.es10
    profiles = es10.get_iot_profiles()
    enabled = next((p.iccid for p in profiles if p.state == "enabled"), None)
    fallback = next((p.iccid for p in profiles if p.fallback_attribute), None)
    last = None
    path = _state_file(ctx)
    if path.exists():
        try:
            last = json.loads(path.read_text())
        except (OSError, ValueError):
            last = None
    return {"eid": card.eid, "iot": es10.get_iot_info().to_json(),
            "eims": [c.to_json() for c in es10.get_eim_configuration_data()],
            "enabled_profile": enabled, "fallback_profile": fallback,
            "fallback_active": fallback is not None and fallback == enabled,
            "undelivered_results": len(es10.euicc_package_results()), "last_poll": last}


def _switch_done(ctx, card: Card, data: dict) -> None:
    from .switch import settle, wait_attached
    settle(ctx, card, ctx.refresh)
    attached, reg, checked = wait_attached(ctx, card, ctx.rollback_after)
    data.update(attached=attached, attach_checked=checked, registration=reg.to_json() if reg else None)


def _enabled(card: Card) -> str | None:
    return next((p.iccid for p in card.es10.get_profiles_info() if p.state == "enabled"), None)


def fallback(ctx, card: Card) -> dict:
    """ES10b ExecuteFallbackMechanism (SGP.32 §5.9.20), then tell the eIM with a poll carrying
    stateChangeCause fallback.  The switch stands even when the report fails (``report_error``:
    the next poll reports it)."""
    return _card_switch(ctx, card, card.es10.execute_fallback_mechanism, steps=("fallback", "fallback_done"),
                        cause=1)


def return_from_fallback(ctx, card: Card) -> dict:
    """ES10b ReturnFromFallback (SGP.32 §5.9.21), then a poll with stateChangeCause local."""
    return _card_switch(ctx, card, card.es10.return_from_fallback, steps=("return", "returned"), cause=3)


def _card_switch(ctx, card: Card, call, *, steps: tuple[str, str], cause: int) -> dict:
    """A profile switch the eUICC makes on its own (``call(refresh)``), journalled so a resumed
    job does not switch twice, then the wait for the network and the report to the eIM."""
    data: dict = {}
    start = ctx.steps.seen(steps[0])
    if start is None:
        start = {"previous": _enabled(card)}
        ctx.steps.step(steps[0], **start)
        call(ctx.refresh)
        ctx.steps.step(steps[1])
    data["previous"] = start["previous"]
    _switch_done(ctx, card, data)
    data["enabled"] = _enabled(card)
    return _report(ctx, card, data, cause=cause)


def _report(ctx, card: Card, data: dict, *, cause: int) -> dict:
    try:
        data["report"] = poll(ctx, card, state_change_cause=cause)
    except AgentError as e:
        if getattr(e, "reason", None) in ("interrupted", "terminated"):
            raise
        data["report_error"] = e.to_json()
        ctx.warning(f"the eIM was not told of the profile change: {e.message}")
    return data
