"""`esim-agent profile`: installed profiles (list, enable, disable, delete, nickname) and
``download`` with its consent prompt."""
from __future__ import annotations

import sys

from ..cli import (Output, _end_progress_line, _Parser, _server_args, _server_params, _through_daemon,
                   execute, socket_command)
from ..errors import AgentError, UsageError
from ..render import profile_rows


def add_parsers(sub) -> None:
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
    c = prof.add_parser("nickname", help="set a profile's nickname (up to 64 characters, one line)")
    c.add_argument("iccid")
    c.add_argument("name", nargs="?")
    c.add_argument("--clear", action="store_true", help="remove the nickname")
    c.set_defaults(func=cmd_profile_nickname)
    _add_download_parser(prof)


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


@socket_command
def cmd_profile_list(args, out: Output) -> int:
    data = execute(args, out, "profile.list", {})
    out.ok(data, lambda: profile_rows(data["profiles"]))
    return 0


@socket_command
def cmd_profile_enable(args, out: Output) -> int:
    from ..es10 import canonical_profile_id
    ident = canonical_profile_id(args.id)       # checked before the card; shown back as it was understood
    params = {"id": ident, "rollback": not args.no_rollback}
    if args.no_refresh:
        params["refresh"] = False
    data = execute(args, out, "profile.enable", {**params, **_server_params(args)})
    out.ok(data, f"profile {ident} enabled")
    return 0


@socket_command
def cmd_profile_disable(args, out: Output) -> int:
    from ..es10 import canonical_profile_id
    ident = canonical_profile_id(args.id)
    params = {"id": ident}
    if args.no_refresh:
        params["refresh"] = False
    data = execute(args, out, "profile.disable", {**params, **_server_params(args)})
    out.ok(data, f"profile {ident} disabled")
    return 0


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{prompt} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _read_answer(stdin, cancel=None) -> str | None:
    """One line from the terminal, or None at end of input. While waiting, a Ctrl-C/SIGTERM
    (which only sets ``cancel``) stops the wait, so a download at the prompt is cancelled
    (postponed) at once instead of after the next Enter."""
    if cancel is not None:
        import select
        try:
            fd = stdin.fileno()
        except (AttributeError, ValueError, OSError):
            fd = None
        while fd is not None:
            cancel.check()
            try:
                if select.select([fd], [], [], 0.2)[0]:
                    break
            except (OSError, ValueError):
                break
    line = stdin.readline()
    return line if line else None


_CONSENT_ANSWERS = {"y": True, "yes": True, "n": False, "no": False, "reject": False,
                    "": "later", "l": "later", "later": "later"}


def _ask_consent(meta, *, stdin=None, err=None, cancel=None, tries: int = 3):
    """The consent prompt of a download (SGP.22 §3.1.3, the end user confirms the profile):
    True install, False reject (final: the SM-DP+ is told endUserRejection and the operator's
    order fails), "later" (flows.download.POSTPONE: cancelled as postponed, the order stays
    usable). An empty answer, the end of input or answers we do not understand mean later:
    nobody rejects a profile by pressing Enter."""
    stdin = stdin or sys.stdin
    err = err or sys.stderr
    err.write(f"Profile: {meta.profile_name or '?'} from {meta.service_provider_name or '?'} "
              f"(ICCID {meta.iccid}, class {meta.profile_class})\n"
              "  y      download and install it\n"
              "  n      reject it; this is final: the SM-DP+ is told (endUserRejection) and the operator's order "
              "cannot be used again\n"
              "  later  not now (the default): nothing is installed and the order stays usable\n")
    for _ in range(tries):
        err.write("Install this profile? [y/n/L] ")
        err.flush()
        line = _read_answer(stdin, cancel)
        if line is None:
            err.write("\n")
            return "later"
        answer = line.strip().lower()
        if answer in _CONSENT_ANSWERS:
            return _CONSENT_ANSWERS[answer]
        err.write("please answer y (install), n (reject for good) or later\n")
    return "later"


def _ask_go_ahead(prompt: str, *, stdin=None, err=None, cancel=None) -> bool:
    """A yes/no question on the terminal (stderr), no by default."""
    stdin = stdin or sys.stdin
    err = err or sys.stderr
    err.write(f"{prompt} [y/N] ")
    err.flush()
    line = _read_answer(stdin, cancel)
    if line is None:
        err.write("\n")
    return (line or "").strip().lower() in ("y", "yes")


@socket_command
def cmd_profile_delete(args, out: Output) -> int:
    from ..es10 import canonical_profile_id
    ident = canonical_profile_id(args.id)  # validate before touching the card
    if not args.yes:
        if out.json or not _confirm(f"Delete profile {ident}? This cannot be undone."):
            raise UsageError(f"not deleting {ident}: confirm with --yes", code="confirmation_required")
    data = execute(args, out, "profile.delete", {"id": ident, "yes": True, **_server_params(args)})
    out.ok(data, f"profile {ident} deleted")
    return 0


@socket_command
def cmd_profile_nickname(args, out: Output) -> int:
    from ..es10 import nickname_value
    from ..ids import parse_iccid
    iccid = parse_iccid(args.iccid)
    if args.clear:
        if args.name is not None:
            raise UsageError("give either a nickname or --clear, not both")
        params = {"iccid": iccid, "name": "", "clear": True}
    elif args.name is None:
        raise UsageError("give the nickname (in quotes if it has spaces), or --clear to remove it")
    else:
        params = {"iccid": iccid, "name": nickname_value(args.name)}
    data = execute(args, out, "profile.nickname", params)
    out.ok(data, f"nickname of {iccid} cleared" if args.clear else f"nickname of {iccid} set to {data['nickname']!r}")
    return 0


@socket_command
def cmd_profile_download(args, out: Output) -> int:
    from ..ac import read_activation_code, validate_address
    ac = None
    if args.ac is not None or args.ac_file:
        if args.smdp:
            raise UsageError("give either an activation code or --smdp, not both")
        ac = read_activation_code(args.ac, args.ac_file, sys.stdin)
    if args.matching_id is not None and not args.smdp:
        raise UsageError("--matching-id goes with --smdp (an activation code already carries one)")
    if args.matching_id is not None:
        from ..ac import validate_matching_id
        validate_matching_id(args.matching_id)
    if args.smdp:
        args.smdp = validate_address(args.smdp)
    interactive = sys.stdin.isatty() and not out.json
    if not args.yes and not interactive:
        raise UsageError("downloading needs your consent to the profile: pass --yes (no terminal to ask on)",
                         code="consent_required")
    if args.imei is not None:
        from ..ids import normalise_imei
        args.imei = normalise_imei(args.imei)   # a bad --imei is a usage error before anything starts
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

        def consent(meta):
            _end_progress_line(ctx)
            return _ask_consent(meta, cancel=ctx.cancel)
        ctx.consent = consent

        def ask_cc() -> str | None:
            import getpass
            _end_progress_line(ctx)
            return getpass.getpass("Confirmation code: ").strip() or None
        ctx.ask_confirmation_code = ask_cc

    where = (f"from {ac.address}" if ac else f"from {args.smdp}" if args.smdp else "from the default SM-DP+")
    out.info(f"downloading {where}")
    if _through_daemon(args) and not args.yes:
        # The daemon cannot show the profile on this terminal before installing it: ask first.
        # Nothing has been asked of the SM-DP+ yet, so "no" (the default) leaves the order untouched.
        if not _ask_go_ahead(f"The service will download and install the profile {where} without showing it "
                             "to you first (no: nothing is asked of the SM-DP+, the order stays usable). "
                             "Go ahead?", cancel=args.cancel):
            raise AgentError("not downloading: nothing was asked of the SM-DP+ and the order stays usable; "
                             "answer y, or pass --yes", code="postponed")
        params["yes"] = True
    data = execute(args, out, "profile.download", params, prepare=prepare)
    sent = [n for n in data.get("notifications", []) if n["status"] == "delivered"]
    md = data.get("metadata") or {}
    out.ok(data, f"installed profile {data['profile'].get('iccid')} ({md.get('profile_name') or 'no name'}, "
                 f"{md.get('service_provider_name') or 'no provider'}); {len(sent)} notification(s) sent")
    return 0
