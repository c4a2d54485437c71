"""esim-agent command line: the field technician's tool.

Output: readable tables, or with ``--json`` exactly one JSON document on
stdout: ``{"ok": true, "data": {...}}`` or ``{"ok": false, "error": {"code", "message"}}``.
Exit codes: 0 done, 1 the card or a server refused, 2 bad usage or input,
3 modem/transport failure or time-out.

Imports are lazy on purpose: ``chip info`` against ``--sim`` must start in
well under 0.3 s, so nothing heavy (serial, requests, cryptography) is
imported unless the command needs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from .errors import AgentError, UsageError

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting,
    so ``--json`` callers still get one JSON document."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# --------------------------------------------------------------------------- output

class Output:
    def __init__(self, as_json: bool):
        self.json = as_json

    def ok(self, data: dict, text: str | Callable[[], str] | None = None) -> None:
        if self.json:
            print(json.dumps({"ok": True, "data": data}, indent=None, default=_json_default))
        elif text is not None:
            print(text() if callable(text) else text)

    def error(self, err: AgentError) -> None:
        if self.json:
            print(json.dumps({"ok": False, "error": err.to_json()}, default=_json_default))
        else:
            print(f"error: {err.message}", file=sys.stderr)

    def info(self, msg: str) -> None:
        """Progress for people; never on stdout with --json."""
        if not self.json:
            print(msg, file=sys.stderr)


def _json_default(o: Any):
    if isinstance(o, bytes):
        return o.hex().upper()
    if hasattr(o, "to_json"):
        return o.to_json()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------- settings

def _pick(cli_value, cfg_value):
    return cli_value if cli_value is not None else cfg_value


def card_settings(args):
    """How to reach the card: command line over config file, validated once (bad values
    are usage errors, exit 2)."""
    from .ops.card import CardSettings
    cfg = args.config
    s = CardSettings(
        device=None if args.sim else (args.device or cfg.device), sim=args.sim,
        transport=args.transport or cfg.transport,
        timeout=_pick(args.timeout, cfg.timeout), long_timeout=_pick(args.long_timeout, cfg.long_timeout),
        segment_size=_pick(args.segment_size, cfg.segment_size), baud=_pick(args.baud, cfg.baud),
        aids=list(args.aid or cfg.aids or []), quirks=dict(cfg.quirks or {}),
        trace=_tracer() if args.trace else None)
    if args.sim and args.device:
        s.device = args.device      # validate() names the conflict
    return s.validate()


def context(args, out: "Output", token):
    """The operations' context for a direct (no daemon) run of this command."""
    from . import config
    from .ops import Context, ServerSettings
    cfg = args.config
    ca = getattr(args, "ca", None)
    servers = ServerSettings(ca=ca, config_ca=cfg.ca_bundle, insecure_http=getattr(args, "insecure_http", False))
    return Context(servers=servers, state_dir=config.state_dir(cfg),
                   notifications=cfg.process_notifications and not getattr(args, "no_notifications", False),
                   refresh=cfg.refresh, rollback_after=float(cfg.rollback_after), cancel=token,
                   default_smdp=cfg.default_smdp, auto_enable=bool(cfg.auto_enable),
                   warn=lambda m: out.info(f"warning: {m}"), progress=_progress_printer(out))


def _tracer():
    def trace(direction: str, data) -> None:
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).hex().upper()
        print(f"[trace] {direction} {data}", file=sys.stderr)
    return trace


# --------------------------------------------------------------------------- running an operation

#: Commands that never go through the daemon (they do not touch the modem, or are the daemon).
def _through_daemon(args) -> bool:
    if getattr(args, "direct", False) or args.sim:
        return False
    from .daemon.client import daemon_answers
    return daemon_answers(args.config)


def execute(args, out: "Output", op: str, params: dict, *, prepare=None) -> dict:
    """Run operation ``op`` with ``params``: through the daemon's socket when one answers
    (it owns the modem), else directly on the card. Same data either way."""
    token = args.cancel
    if _through_daemon(args):
        from .daemon.client import DaemonClient
        return DaemonClient.for_config(args.config).run(
            op, params, cancel=token, device=args.device, info=out.info,
            direct_fallback=lambda: _direct(args, out, op, params, prepare))
    return _direct(args, out, op, params, prepare)


def _direct(args, out, op, params, prepare) -> dict:
    from . import ops
    from .ops.card import Card
    ctx = context(args, out, args.cancel)
    if prepare is not None:
        prepare(ctx)
    settings = card_settings(args)
    with Card(settings, cancel=args.cancel) as card:
        return ops.run(op, ctx, card, params)


# --------------------------------------------------------------------------- commands: chip

def cmd_chip_info(args, out: Output) -> int:
    data = execute(args, out, "chip.info", {})

    def text() -> str:
        info2, addrs, modem = data["euicc_info2"], data["configured_addresses"], data.get("modem")
        rows = [["EID", data["eid"]],
                ["Default SM-DP+", addrs.get("default_dp_address") or "(none)"],
                ["Root SM-DS", addrs.get("root_ds_address") or "(none)"],
                ["SVN", info2.get("svn")], ["Profile version", info2.get("profile_version")],
                ["Firmware", info2.get("firmware_version")], ["Free NVM (bytes)", info2.get("free_nvm")],
                *([["Modem", f"{modem.get('manufacturer') or '?'} {modem.get('model') or ''}".strip()],
                   ["IMEI", modem.get("imei")], ["Active ICCID", modem.get("iccid")]] if modem else []),
                ["Category", info2.get("euicc_category")],
                ["CI keys (verify)", ", ".join(info2.get("ci_pkids_for_verification") or [])],
                ["CI keys (sign)", ", ".join(info2.get("ci_pkids_for_signing") or [])]]
        return "\n".join(f"{k + ':':<18} {'' if v is None else v}" for k, v in rows)
    out.ok(data, text)
    return 0


def cmd_chip_set_default_dp(args, out: Output) -> int:
    from .ac import validate_address
    if args.address:
        validate_address(args.address)          # bad input fails before the card or the daemon is asked
    data = execute(args, out, "chip.set_default_dp", {"address": args.address})
    out.ok(data, f"default SM-DP+ address set to {data['default_dp_address'] or '(none)'}")
    return 0


def cmd_chip_reset(args, out: Output) -> int:
    if not args.yes:
        raise UsageError("eUICC memory reset deletes all operational and test profiles; "
                         "repeat with --yes to confirm", code="confirmation_required")
    data = execute(args, out, "chip.reset", {"yes": True})
    out.ok(data, "eUICC memory reset done")
    return 0


# --------------------------------------------------------------------------- commands: profile

def _profile_rows(profiles: list[dict]) -> str:
    if not profiles:
        return "no profiles installed"
    return table([[p.get("iccid"), p.get("state"), p.get("nickname") or "", p.get("service_provider_name"),
                   p.get("profile_name"), p.get("profile_class"), p.get("isdp_aid")] for p in profiles],
                 ["ICCID", "STATE", "NICKNAME", "PROVIDER", "NAME", "CLASS", "ISD-P AID"])


def cmd_profile_list(args, out: Output) -> int:
    data = execute(args, out, "profile.list", {})
    out.ok(data, lambda: _profile_rows(data["profiles"]))
    return 0


def _server_params(args) -> dict:
    """Per-command server trust, passed to the daemon as plain values (absolute paths)."""
    import os
    p = {}
    if getattr(args, "ca", None):
        p["ca"] = os.path.abspath(args.ca)
    if getattr(args, "insecure_http", False):
        p["insecure_http"] = True
    if getattr(args, "no_notifications", False):
        p["no_notifications"] = True
    return p


def cmd_profile_enable(args, out: Output) -> int:
    from .es10 import profile_identifier
    profile_identifier(args.id)
    params = {"id": args.id, "rollback": not args.no_rollback}
    if args.no_refresh:
        params["refresh"] = False
    data = execute(args, out, "profile.enable", {**params, **_server_params(args)})
    out.ok(data, f"profile {args.id} enabled")
    return 0


def cmd_profile_disable(args, out: Output) -> int:
    from .es10 import profile_identifier
    profile_identifier(args.id)
    params = {"id": args.id}
    if args.no_refresh:
        params["refresh"] = False
    data = execute(args, out, "profile.disable", {**params, **_server_params(args)})
    out.ok(data, f"profile {args.id} disabled")
    return 0


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{prompt} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_profile_delete(args, out: Output) -> int:
    from .es10 import profile_identifier
    profile_identifier(args.id)  # validate before touching the card
    if not args.yes:
        if out.json or not _confirm(f"Delete profile {args.id}? This cannot be undone."):
            raise UsageError(f"not deleting {args.id}: confirm with --yes", code="confirmation_required")
    data = execute(args, out, "profile.delete", {"id": args.id, "yes": True, **_server_params(args)})
    out.ok(data, f"profile {args.id} deleted")
    return 0


def cmd_profile_nickname(args, out: Output) -> int:
    data = execute(args, out, "profile.nickname", {"iccid": args.iccid, "name": args.name})
    out.ok(data, f"nickname of {args.iccid} set to {args.name!r}")
    return 0


# --------------------------------------------------------------------------- commands: notification

def cmd_notification_list(args, out: Output) -> int:
    data = execute(args, out, "notification.list", {})
    rows = [[n["seq_number"], n["operation"], n["address"], n["iccid"], "eUICC"] for n in data["notifications"]]
    rows += [[n["seq_number"], n["operation"], n["address"], n["iccid"], "outbox"] for n in data["outbox_only"]]
    out.ok(data, lambda: table(rows, ["SEQ", "OPERATION", "ADDRESS", "ICCID", "HELD IN"]) if rows
           else "no pending notifications")
    return 0


def cmd_notification_remove(args, out: Output) -> int:
    """Remove notifications from the eUICC (e.g. to free its list) without losing them:
    each one is recorded in the outbox first and `notification process` still delivers it."""
    if not args.all and not args.seq:
        raise UsageError("give the sequence number(s) to remove, or --all")
    data = execute(args, out, "notification.remove", {"seqs": list(args.seq or []), "all": bool(args.all)})
    removed, missing = data["removed"], data["not_found"]
    out.ok(data, f"removed {len(removed)} notification(s) from the eUICC"
           + (f"; not found: {missing}" if missing else "")
           + ("; they stay in the outbox and `notification process` still delivers them" if removed else ""))
    return 0


def cmd_notification_process(args, out: Output) -> int:
    seqs = None if args.all or not args.seq else list(args.seq)
    data = execute(args, out, "notification.process", {"seqs": seqs, **_server_params(args)})
    results = data["notifications"]
    rows = [[r["seq_number"], r["operation"], r["address"], r["status"],
             (r.get("error") or {}).get("message", "")] for r in results]
    out.ok(data, lambda: table(rows, ["SEQ", "OPERATION", "ADDRESS", "STATUS", "ERROR"]) if rows
           else "no pending notifications")
    return 1 if any(r["status"] == "failed" for r in results) else 0


# --------------------------------------------------------------------------- commands: download

def _progress_printer(out: Output):
    if out.json or not sys.stderr.isatty():
        return None

    def show(step: str, done: int, total: int) -> None:
        extra = f" {done}/{total} bytes" if total else ""
        sys.stderr.write(f"\r\x1b[K{step}{extra}")
        if step == "installed":
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def cmd_profile_download(args, out: Output) -> int:
    from .ac import read_activation_code, validate_address
    ac = None
    if args.ac is not None or args.ac_file:
        if args.smdp:
            raise UsageError("give either an activation code or --smdp, not both")
        ac = read_activation_code(args.ac, args.ac_file, sys.stdin)
    if args.matching_id is not None and not args.smdp:
        raise UsageError("--matching-id goes with --smdp (an activation code already carries one)")
    if args.smdp:
        validate_address(args.smdp)
    interactive = sys.stdin.isatty() and not out.json
    if not args.yes and not interactive:
        raise UsageError("downloading needs your consent to the profile: pass --yes (no terminal to ask on)",
                         code="consent_required")
    if args.imei is not None:
        from .ids import imei_to_bytes
        imei_to_bytes(args.imei)   # a bad --imei is a usage error before anything starts
    if ac and ac.cc_required and not args.confirmation_code and not interactive:
        raise UsageError("this activation code says a confirmation code is required: pass --confirmation-code",
                         code="confirmation_code_required")
    params = {"activation_code": ac.raw if ac else None, "smdp": args.smdp, "matching_id": args.matching_id,
              "confirmation_code": args.confirmation_code, "imei": args.imei, "yes": bool(args.yes),
              **_server_params(args)}

    def prepare(ctx) -> None:
        """Direct mode: ask on the terminal, with the profile's metadata in front of the user."""
        if args.yes:
            return

        def consent(meta) -> bool:
            print(f"Profile: {meta.profile_name or '?'} from {meta.service_provider_name or '?'} "
                  f"(ICCID {meta.iccid}, class {meta.profile_class})", file=sys.stderr)
            return _confirm("Download and install it?")
        ctx.consent = consent

        def ask_cc() -> str | None:
            import getpass
            return getpass.getpass("Confirmation code: ").strip() or None
        ctx.ask_confirmation_code = ask_cc

    where = (f"from {ac.address}" if ac else f"from {args.smdp}" if args.smdp else "from the default SM-DP+")
    out.info(f"downloading {where}")
    if _through_daemon(args) and not args.yes:
        # The daemon cannot show the profile on this terminal before installing it: ask first.
        if not _confirm(f"The service will download and install the profile {where} without showing it "
                        "first. Go ahead?"):
            raise UsageError("not downloading: confirm, or pass --yes", code="consent_required")
        params["yes"] = True
    data = execute(args, out, "profile.download", params, prepare=prepare)
    sent = [n for n in data.get("notifications", []) if n["status"] == "delivered"]
    md = data.get("metadata") or {}
    out.ok(data, f"installed profile {data['profile'].get('iccid')} ({md.get('profile_name') or 'no name'}, "
                 f"{md.get('service_provider_name') or 'no provider'}); {len(sent)} notification(s) sent")
    return 0


# --------------------------------------------------------------------------- commands: service

def cmd_sync(args, out: Output) -> int:
    """Ask the default SM-DP+ whether a profile waits for this eUICC; install it if so."""
    data = execute(args, out, "sync", _server_params(args))
    outcome = data.get("outcome")
    text = {"nothing_waiting": f"nothing waiting at {data.get('smdp_address')}",
            "no_default_smdp": data.get("message", "no default SM-DP+")}.get(
        outcome, f"installed profile {data.get('profile', {}).get('iccid')}"
        + (" and enabled it" if outcome == "installed_and_enabled" else ""))
    out.ok(data, text)
    return 0


def cmd_status(args, out: Output) -> int:
    from .daemon.status import local_status, render
    if not getattr(args, "direct", False) and not args.sim:
        from .daemon.client import DaemonClient, daemon_answers
        if daemon_answers(args.config):
            data = DaemonClient.for_config(args.config).status()
            out.ok(data, lambda: render(data))
            return 0
    data = local_status(args, card_settings_fn=lambda: card_settings(args))
    out.ok(data, lambda: render(data))
    return 0


def cmd_daemon(args, out: Output) -> int:
    from .daemon.main import run_daemon
    return run_daemon(args.config, verbose=args.verbose)


# --------------------------------------------------------------------------- parser

def _add_global_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Options valid anywhere on the line (`esim-agent profile list --json` works too).

    On sub-commands they default to SUPPRESS so they only override the top level's."""
    kw = {"default": argparse.SUPPRESS} if suppress else {}
    own = p._option_string_actions

    def add(group, *flags, **k):
        if any(f in own for f in flags):   # the sub-command has its own meaning for it (e.g. bench --baud)
            return
        group.add_argument(*flags, **{**k, **kw})
    g = p.add_argument_group("card access")
    add(g, "--device", metavar="PATH", help="the modem's AT port, e.g. /dev/ttyUSB2")
    add(g, "--sim", metavar="STATEFILE", help="use a simulated eUICC in-process (no modem)")
    add(g, "--transport", choices=["auto", "csim", "cgla"], help="how APDUs travel over AT (default auto)")
    add(g, "--aid", action="append", metavar="HEX", help="ISD-R AID to try (repeatable, in order)")
    add(g, "--timeout", type=float, metavar="S", help="deadline per AT command / APDU (default 10)")
    add(g, "--long-timeout", type=float, metavar="S", help="deadline for profile loading, enable, delete (default 300)")
    add(g, "--baud", type=int, help="serial line speed for UART ports (default 115200)")
    add(g, "--segment-size", type=int, metavar="N", help="STORE DATA block size, 1..255 (default 120)")
    add(g, "--config", metavar="FILE", dest="config_path", help="TOML config (default /etc/esim-agent/agent.toml)")
    add(g, "--direct", action="store_true",
        help="open the modem directly even if the esim-agent daemon is running (it owns the port)")
    o = p.add_argument_group("output")
    add(o, "--json", action="store_true", help="one JSON document on stdout")
    add(o, "-v", "--verbose", action="count", **({} if suppress else {"default": 0}))
    add(o, "--trace", action="store_true", help="print every AT line and APDU to stderr")


def _leaves(p: argparse.ArgumentParser):
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield p
    for a in subs:
        for child in dict.fromkeys(a.choices.values()):
            yield from _leaves(child)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="esim-agent", description="Device-side eSIM agent: the SGP.22 LPA over a modem's AT port, with a simulated test bed.")
    _add_global_options(p)

    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    chip = sub.add_parser("chip", help="the eUICC itself").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    chip.required = True
    chip.add_parser("info", help="EID, EUICCInfo2, configured addresses").set_defaults(func=cmd_chip_info)
    c = chip.add_parser("set-default-dp", help="set the default SM-DP+ address ('' clears it)")
    c.add_argument("address")
    c.set_defaults(func=cmd_chip_set_default_dp)
    c = chip.add_parser("reset", help="eUICC memory reset (deletes profiles)")
    c.add_argument("--yes", action="store_true")
    c.set_defaults(func=cmd_chip_reset)

    prof = sub.add_parser("profile", help="installed profiles").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    prof.required = True
    prof.add_parser("list", help="list installed profiles").set_defaults(func=cmd_profile_list)
    for name, func, helptext in (("enable", cmd_profile_enable, "enable a profile (disables the current one)"),
                                 ("disable", cmd_profile_disable, "disable a profile")):
        c = prof.add_parser(name, help=helptext)
        c.add_argument("id", metavar="ICCID|AID")
        c.add_argument("--no-refresh", action="store_true", help="refreshFlag=0: the modem resets the SIM itself")
        c.add_argument("--no-notifications", action="store_true", help="leave the notifications pending")
        if name == "enable":
            c.add_argument("--no-rollback", action="store_true",
                           help="keep the new profile even if it does not register on a network")
        _server_args(c)
        c.set_defaults(func=func)
    c = prof.add_parser("delete", help="delete a disabled profile")
    c.add_argument("id", metavar="ICCID|AID")
    c.add_argument("--yes", action="store_true", help="do not ask")
    c.add_argument("--no-notifications", action="store_true", help="leave the notifications pending")
    _server_args(c)
    c.set_defaults(func=cmd_profile_delete)
    c = prof.add_parser("nickname", help="set a profile's nickname")
    c.add_argument("iccid")
    c.add_argument("name")
    c.set_defaults(func=cmd_profile_nickname)
    _add_download_parser(prof)

    notif = sub.add_parser("notification", help="pending notifications").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    notif.required = True
    notif.add_parser("list", help="list pending notifications").set_defaults(func=cmd_notification_list)
    c = notif.add_parser("remove", help="remove notifications from the eUICC without sending them")
    c.add_argument("seq", nargs="*", type=int)
    c.add_argument("--all", action="store_true")
    c.set_defaults(func=cmd_notification_remove)
    _add_notification_process_parser(notif)

    c = sub.add_parser("status", help="daemon, modem, eUICC, profiles, jobs and outbox at a glance")
    c.set_defaults(func=cmd_status)
    c = sub.add_parser("sync", help="ask the default SM-DP+ whether a profile waits for this eUICC; install it")
    _server_args(c)
    c.set_defaults(func=cmd_sync)
    c = sub.add_parser("daemon", help="run the gateway service in the foreground (systemd supervises it)")
    c.set_defaults(func=cmd_daemon)

    _add_sim_parsers(sub)
    _add_bench_parsers(sub)
    _add_demo_parser(sub)
    for leaf in _leaves(p):
        if leaf is not p:
            _add_global_options(leaf, suppress=True)
    return p


def _server_args(p) -> None:
    p.add_argument("--ca", metavar="FILE", help="trusted CI certificate(s) for the servers' TLS (PEM or DER)")
    p.add_argument("--insecure-http", action="store_true", help="plain HTTP, for test servers only")


def _add_download_parser(prof) -> None:
    c = prof.add_parser("download", help="download and install a profile (activation code or default SM-DP+)")
    c.add_argument("ac", nargs="?", metavar="AC", help="activation code LPA:1$ADDRESS$MATCHING_ID (quote it!)")
    c.add_argument("--ac-file", metavar="FILE", help="read the activation code from FILE ('-' = stdin)")
    c.add_argument("--smdp", metavar="ADDRESS", help="SM-DP+ address (instead of an activation code)")
    c.add_argument("--matching-id", metavar="ID", help="matching ID to use with --smdp")
    c.add_argument("--confirmation-code", metavar="CC", help="confirmation code, when the operator requires one")
    c.add_argument("--imei", help="IMEI to report (default: read from the modem with AT+CGSN)")
    c.add_argument("--yes", action="store_true", help="accept the profile without asking")
    c.add_argument("--no-notifications", action="store_true", help="leave the install notification pending")
    _server_args(c)
    c.set_defaults(func=cmd_profile_download)


def _add_notification_process_parser(notif) -> None:
    c = notif.add_parser("process", help="send pending notifications, then remove them from the eUICC")
    c.add_argument("seq", nargs="*", type=int)
    c.add_argument("--all", action="store_true", help="all pending notifications (the default)")
    _server_args(c)
    c.set_defaults(func=cmd_notification_process)


def _add_sim_parsers(sub) -> None:
    from .sim import cli as sim_cli
    sim_cli.add_parsers(sub)


def _add_bench_parsers(sub) -> None:
    from . import bench
    bench.add_parsers(sub)


def _add_demo_parser(sub) -> None:
    from . import demo
    demo.add_parser(sub)


def _install_signals(token) -> dict:
    """SIGINT/SIGTERM/SIGHUP only cancel the token: the operation stops at its next step
    or while waiting on the modem, closes the channel, cancels an RSP session with the
    right reason. A second Ctrl-C stops at once."""
    import signal
    reasons = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "terminated"}

    def handler(signum, frame):
        if signum == signal.SIGINT and token.cancelled:
            raise KeyboardInterrupt
        token.cancel(reasons[signum])
    previous = {}
    try:
        for sig in reasons:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:          # not the main thread (embedded use): leave signals alone
        for sig, h in previous.items():
            signal.signal(sig, h)
        previous = {}
    return previous


def _daemon_args(argv: list[str]):
    """`esim-agent daemon` parsed without building the whole CLI: the service's resident
    memory should not carry the parsers (and their imports) of every other command."""
    cmd, i = None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            i += 2
            continue
        if not a.startswith("-"):
            cmd = a
            break
        i += 1
    if cmd != "daemon":
        return None
    p = _Parser(prog="esim-agent daemon", description="run the gateway service in the foreground")
    p.add_argument("cmd", choices=["daemon"])
    p.add_argument("--config", metavar="FILE", dest="config_path")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.func = cmd_daemon
    return args


def main(argv: list[str] | None = None) -> int:
    import signal

    from .cancel import CancelToken
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    out = Output(as_json)
    token = CancelToken()
    previous = {}
    verbose = 0
    try:
        args = _daemon_args(argv) or build_parser().parse_args(argv)
        out = Output(args.json)
        verbose = args.verbose
        logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        from . import config
        args.config = config.load(args.config_path)
        args.cancel = token
        if args.func is not cmd_daemon:      # the daemon handles its own signals
            previous = _install_signals(token)
        rc = args.func(args, out)
        return rc or 0
    except AgentError as e:
        out.error(e)
        return e.exit_code
    except KeyboardInterrupt:
        out.error(AgentError("interrupted; the logical channel was closed", code="interrupted"))
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): stop writing, and keep Python quiet at exit.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: still one JSON document and a clear message
        if verbose:
            import traceback
            traceback.print_exc()
        out.error(AgentError(f"internal error: {type(e).__name__}: {e} (a bug in esim-agent; run with -v for "
                             "the traceback and report it)", code="internal_error"))
        return 1
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    sys.exit(main())
