"""`esim-agent ipa`: SGP.32 IoT, the eIM that manages this eUICC (IPAd)."""
from __future__ import annotations

from ..cli import Output, _eim_options, _Parser, _through_daemon, execute, socket_command
from ..errors import UsageError
from ..render import table


def add_parsers(sub) -> None:
    ipa = sub.add_parser("ipa", help="SGP.32 IoT: the eIM that manages this eUICC (IPAd)").add_subparsers(
        dest="sub", metavar="ACTION", parser_class=_Parser)
    ipa.required = True
    c = ipa.add_parser("add-eim", help="associate the eUICC with an eIM (AddInitialEim) from an "
                                       "EimConfigurationData file, DER or JSON")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(func=cmd_ipa_add_eim)
    for name, func, helptext in (
            ("list-eim", cmd_ipa_list_eim, "the eIMs the eUICC is associated with"),
            ("poll", cmd_ipa_poll, "ask the eIM for work now and run it; prints what was executed"),
            ("status", cmd_ipa_status, "the IPA's view: eIMs, fallback, last poll"),
            ("return-from-fallback", cmd_ipa_return_from_fallback,
             "leave the fallback profile: re-enable the profile enabled before the fallback")):
        c = ipa.add_parser(name, help=helptext)
        c.set_defaults(func=func)
    for c in dict.fromkeys(ipa.choices.values()):
        g = c.add_argument_group("eIM (direct runs; the daemon uses its config's [eim])")
        g.add_argument("--eim-url", metavar="URL", help="the eIM's https:// URL (default: [eim] url, else the "
                                                        "eUICC's eIM configuration)")
        g.add_argument("--esipa-version", choices=["1.2", "1.0"], help="the eIM's ESipa version (default 1.2)")
        g.add_argument("--binding", choices=["asn1", "json"], help="ESipa HTTP binding (default asn1)")


def _ipa_execute(args, out: Output, op: str, params: dict) -> dict:
    if _eim_options(args) and _through_daemon(args):
        raise UsageError("--eim-url, --esipa-version and --binding are for a direct run (--direct, with the "
                         "daemon stopped); the daemon polls with the [eim] settings of its config",
                         code="eim_options_direct")
    return execute(args, out, op, params)


@socket_command
def cmd_ipa_add_eim(args, out: Output) -> int:
    import os
    path = os.path.abspath(args.file)           # the daemon may run elsewhere: an absolute path
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise UsageError(f"{args.file}: no readable file (an EimConfigurationData, DER or JSON)", code="bad_file")
    data = _ipa_execute(args, out, "ipa.add_eim", {"file": path})

    def text() -> str:
        added = data.get("added") or []
        names = ", ".join(f"{e.get('eim_id')} ({e.get('fqdn') or 'no address'})"
                          + (f", association token {e['association_token']}" if e.get("association_token") is not None
                             else "") for e in added) or "the eIM"
        return f"eIM {names} added to the eUICC (AddInitialEim); `esim-agent ipa poll` asks it for work"
    out.ok(data, text)
    return 0


def _eim_rows(eims: list[dict]) -> str:
    if not eims:
        return "no eIM on the eUICC (`esim-agent ipa add-eim FILE` adds one)"
    return table([[e.get("eim_id"), e.get("fqdn") or "", e.get("id_type") or "", e.get("counter"),
                   "" if e.get("association_token") is None else e.get("association_token"),
                   ", ".join(e.get("supported_protocols") or [])] for e in eims],
                 ["EIM ID", "ADDRESS", "ID TYPE", "COUNTER", "TOKEN", "PROTOCOLS"])


@socket_command
def cmd_ipa_list_eim(args, out: Output) -> int:
    data = _ipa_execute(args, out, "ipa.list_eim", {})
    out.ok(data, lambda: _eim_rows(data.get("eims") or []))
    return 0


_PACKAGE_KINDS = {"euiccPackageRequest": "eUICC package", "ipaEuiccDataRequest": "eUICC data request",
                  "profileDownloadTriggerRequest": "profile download", "euiccPackageResult": "earlier result"}


def _describe_package(p: dict) -> str:
    """One line for one thing a poll executed (an entry of ops/ipa.py's ``executed``)."""
    kind = p.get("kind") or "?"
    parts = [_PACKAGE_KINDS.get(kind, kind)]
    if p.get("counter") is not None:
        parts[0] += f" #{p['counter']}"
    if kind == "euiccPackageRequest":
        ops = [f"{r.get('operation')}" + (f" {r['result']}" if isinstance(r.get("result"), (int, str)) else "")
               for r in p.get("results") or []]
        parts.append(", ".join(ops) if ops else ", ".join(p.get("operations") or []))
    elif kind == "ipaEuiccDataRequest" and p.get("tags"):
        parts.append("tags " + " ".join(p["tags"]))
    elif kind == "profileDownloadTriggerRequest" and p.get("smdp_address"):
        parts.append(f"from {p['smdp_address']}")
    elif kind == "euiccPackageResult" and p.get("seq_number") is not None:
        parts.append(f"seq {p['seq_number']}")
    outcome = p.get("outcome") or "?"
    if p.get("iccid"):
        outcome += f" {p['iccid']}"
    if p.get("rolled_back_to"):
        outcome += f" (back to {p['rolled_back_to']})"
    err = p.get("error")
    if isinstance(err, dict) and err:
        outcome += f" ({err.get('message') or err.get('code')})"
    return f"{': '.join(x for x in parts if x)} -> {outcome}"


@socket_command
def cmd_ipa_poll(args, out: Output) -> int:
    data = _ipa_execute(args, out, "ipa.poll", {})

    def text() -> str:
        done = data.get("executed") or []
        where = data.get("eim_id") or data.get("eim_url") or "the eIM"
        if data.get("eim_url") and data.get("eim_id"):
            where += f" ({data['eim_url']})"
        if not done:
            return f"polled eIM {where}: nothing to do"
        return "\n".join([f"polled eIM {where}: executed {len(done)}"]
                         + [f"  {_describe_package(p)}" for p in done])
    out.ok(data, text)
    return 0


@socket_command
def cmd_ipa_status(args, out: Output) -> int:
    data = _ipa_execute(args, out, "ipa.status", {})

    def text() -> str:
        iot = data.get("iot") or {}
        last = data.get("last_poll") or {}
        fb = data.get("fallback_profile")
        lines = [f"EID:              {data.get('eid')}",
                 f"IoT eUICC:        {'yes' if iot.get('is_iot') else 'no'}"
                 + (f" (IPA mode {iot['ipa_mode']})" if iot.get("ipa_mode") else ""),
                 f"Enabled profile:  {data.get('enabled_profile') or '(none)'}",
                 f"Fallback profile: {fb or '(none)'}" + (" (active)" if data.get("fallback_active") else ""),
                 f"Undelivered results: {data.get('undelivered_results', 0)}",
                 "Last poll:        " + (f"{last.get('at')} {last.get('outcome')} ({last.get('eim_url')})"
                                         + (f": {last['error'].get('message')}" if isinstance(last.get("error"), dict)
                                            else "") if last else "never"),
                 "", _eim_rows(data.get("eims") or [])]
        return "\n".join(lines)
    out.ok(data, text)
    return 0


@socket_command
def cmd_ipa_return_from_fallback(args, out: Output) -> int:
    data = _ipa_execute(args, out, "ipa.return_from_fallback", {})
    text = f"returned from the fallback profile: {data.get('enabled') or '(none)'} is enabled"
    if data.get("report_error"):
        text += f"\nthe eIM was not told yet: {data['report_error'].get('message')} (the next poll tells it)"
    out.ok(data, text)
    return 0
