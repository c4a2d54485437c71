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
import sys

from .errors import AgentError, UsageError

TYPE_CHECKING = False       # typing itself is not imported at run time (a few ms at every start)
if TYPE_CHECKING:
    from typing import Any, Callable

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, with the terminal's width found without importing shutil
    (with bz2 and lzma, a few ms at every start; the width is the one shutil would give)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    import os
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting,
    so ``--json`` callers still get one JSON document."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _SubParsers)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


#: While build_parser(group, leaf) runs: (the group's prog, the one action to build under it).
_ONLY_LEAF: tuple[str, str] | None = None


class _SubParsers(argparse._SubParsersAction):
    """Sub-commands; under ``_ONLY_LEAF``'s group, only its action is built (the others get a
    stand-in that takes the same calls and builds nothing)."""

    def add_parser(self, name, **kwargs):
        if _ONLY_LEAF is not None and self._prog_prefix == _ONLY_LEAF[0] and name != _ONLY_LEAF[1]:
            return _NotBuilt()
        return super().add_parser(name, **kwargs)


class _NotBuilt:
    """A sub-command parser left out of this run's tree: every builder call is a no-op."""

    required = False

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __setattr__(self, name, value) -> None:
        pass


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


#: Widest a table column gets (the last one may take more: nothing follows it to misalign).
TABLE_COLUMN_MAX = 40
TABLE_LAST_COLUMN_MAX = 80


def table(rows: list[list[Any]], headers: list[str], *, max_width: int = TABLE_COLUMN_MAX,
          last_max_width: int = TABLE_LAST_COLUMN_MAX) -> str:
    """Rows under headers, columns two spaces apart: no trailing spaces, each column at most
    ``max_width`` characters on screen (longer values end with "…"), control characters in a
    value (a nickname set by another LPA) shown escaped so one value cannot break the table."""
    cells = [[_cell("" if c is None else str(c)) for c in r] for r in rows]
    limits = [last_max_width if i == len(headers) - 1 else max_width for i in range(len(headers))]
    cells = [[_clip(c, limits[i]) for i, c in enumerate(r)] for r in cells]
    widths = [max([_width(h)] + [_width(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values) -> str:
        return "  ".join(v + " " * (w - _width(v)) for v, w in zip(values, widths)).rstrip()
    lines = [line(headers), line(["-" * w for w in widths])]
    lines += [line(r) for r in cells]
    return "\n".join(lines)


def _cell(text: str) -> str:
    import unicodedata
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or unicodedata.category(ch) == "Mn" else repr(ch)[1:-1]
                   for ch in text)


def _width(text: str) -> int:
    """Columns on a terminal: wide (East Asian) characters take two, combining marks none."""
    import unicodedata
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _clip(text: str, limit: int) -> str:
    if _width(text) <= limit:
        return text
    out, w = [], 0
    for ch in text:
        cw = _width(ch)
        if w + cw > limit - 1:
            break
        out.append(ch)
        w += cw
    return "".join(out) + "…"


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
    servers = ServerSettings(ca=ca, config_ca=cfg.ca_bundle, insecure_http=getattr(args, "insecure_http", False),
                             http_timeout=http_timeout(args))
    progress = _progress_printer(out)
    return Context(servers=servers, state_dir=config.state_dir(cfg),
                   notifications=cfg.process_notifications and not getattr(args, "no_notifications", False),
                   refresh=cfg.refresh, rollback_after=float(cfg.rollback_after), cancel=token,
                   default_smdp=cfg.default_smdp, auto_enable=bool(cfg.auto_enable),
                   eim=cfg.eim_settings(**_eim_options(args)),
                   warn=_warner(out, progress), progress=progress)


def http_timeout(args) -> float:
    """One deadline per ES9+ function call: --http-timeout over the config's http_timeout."""
    from .ops import check_http_timeout
    v = getattr(args, "http_timeout", None)
    if v is not None:
        return check_http_timeout(v)
    return float(args.config.http_timeout)


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
    known = getattr(args, "_daemon_answers", None)
    if known is None:
        import os
        from .config import DEFAULT_SOCKET
        if not os.path.exists(getattr(args.config, "socket", None) or DEFAULT_SOCKET):
            known = False               # no socket file, no daemon (and no socket module to import)
        else:
            from .daemon.client import daemon_answers
            known = daemon_answers(args.config)
        args._daemon_answers = known
    return known


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


def _configure_logging(args) -> None:
    """Log records on stderr, at WARNING (-v INFO, -vv DEBUG). A command answered by the
    daemon's socket never needs it (and skips importing logging)."""
    import logging
    if getattr(args, "_logging_done", False):
        return
    args._logging_done = True
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _direct(args, out, op, params, prepare) -> dict:
    _configure_logging(args)
    from . import ops
    from .ops.card import Card
    ctx = context(args, out, args.cancel)
    if prepare is not None:
        prepare(ctx)
    settings = card_settings(args)
    try:
        with Card(settings, cancel=args.cancel, read_only=op in ops.READ_ONLY,
                  preload=ops.preload_modules(op)) as card:
            return ops.run(op, ctx, card, params)
    finally:
        _end_progress_line(ctx)     # an error message must not land on the progress line


def _end_progress_line(ctx) -> None:
    end = getattr(ctx.progress, "end_line", None)
    if end is not None:
        end()


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
    address = args.address.strip()              # '' clears the address
    if address:
        address = validate_address(address)     # bad input fails before the card or the daemon is asked
    data = execute(args, out, "chip.set_default_dp", {"address": address})
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
    if getattr(args, "http_timeout", None) is not None:
        from .ops import check_http_timeout
        p["http_timeout"] = check_http_timeout(args.http_timeout)
    if getattr(args, "no_notifications", False):
        p["no_notifications"] = True
    return p


def cmd_profile_enable(args, out: Output) -> int:
    from .es10 import canonical_profile_id
    ident = canonical_profile_id(args.id)       # checked before the card; shown back as it was understood
    params = {"id": ident, "rollback": not args.no_rollback}
    if args.no_refresh:
        params["refresh"] = False
    data = execute(args, out, "profile.enable", {**params, **_server_params(args)})
    out.ok(data, f"profile {ident} enabled")
    return 0


def cmd_profile_disable(args, out: Output) -> int:
    from .es10 import canonical_profile_id
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


def cmd_profile_delete(args, out: Output) -> int:
    from .es10 import canonical_profile_id
    ident = canonical_profile_id(args.id)  # validate before touching the card
    if not args.yes:
        if out.json or not _confirm(f"Delete profile {ident}? This cannot be undone."):
            raise UsageError(f"not deleting {ident}: confirm with --yes", code="confirmation_required")
    data = execute(args, out, "profile.delete", {"id": ident, "yes": True, **_server_params(args)})
    out.ok(data, f"profile {ident} deleted")
    return 0


def cmd_profile_nickname(args, out: Output) -> int:
    from .es10 import nickname_value
    from .ids import parse_iccid
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


# --------------------------------------------------------------------------- commands: notification

def _outbox_state(n: dict) -> str:
    """An outbox entry's state in a few words: pending (attempts, next try), delivered, dropped."""
    st = n.get("status", "pending")
    if st == "pending":
        tries = n.get("attempts") or 0
        extra = [f"{tries} attempt{'' if tries == 1 else 's'}"] if tries else []
        if n.get("next_attempt_at"):
            extra.append(f"next after {n['next_attempt_at']}")
        return "pending" + (f" ({', '.join(extra)})" if extra else "")
    if st in ("sent", "removed"):
        return f"delivered {n.get('sent_at') or ''}".rstrip()
    if st == "dropped":
        return f"dropped {n.get('dropped_at') or ''} (never sent)".replace("  ", " ")
    return st


def cmd_notification_list(args, out: Output) -> int:
    params = {"history": True} if getattr(args, "history", False) else {}
    data = execute(args, out, "notification.list", params)
    rows = [[n["seq_number"], n["operation"], n["address"], n["iccid"], "eUICC"] for n in data["notifications"]]
    rows += [[n["seq_number"], n["operation"], n["address"], n["iccid"], f"outbox: {_outbox_state(n)}"]
             for n in data["outbox_only"]]

    def text() -> str:
        parts = [table(rows, ["SEQ", "OPERATION", "ADDRESS", "ICCID", "HELD IN"]) if rows
                 else "no pending notifications"]
        if "history" in data:
            hist = [[n["seq_number"], n["operation"], n["address"], n["iccid"], _outbox_state(n)]
                    for n in data["history"]]
            parts.append("history (outbox):\n" + (table(hist, ["SEQ", "OPERATION", "ADDRESS", "ICCID", "STATE"])
                                                   if hist else "(none)"))
        return "\n\n".join(parts)
    out.ok(data, text)
    return 0


def _seq_args(args) -> list[int]:
    """Sequence numbers from the command line: a usage error (exit 2) before the card is touched."""
    from .ops.notifications import check_seqs
    return check_seqs(list(args.seq or []))


def cmd_notification_remove(args, out: Output) -> int:
    """Remove notifications from the eUICC (e.g. to free its list) without losing them:
    each one is recorded in the outbox first and `notification process` still delivers it."""
    seqs = _seq_args(args)
    if not args.all and not seqs:
        raise UsageError("give the sequence number(s) to remove, or --all")
    data = execute(args, out, "notification.remove", {"seqs": seqs, "all": bool(args.all)})
    removed, missing, dropped = data["removed"], data["not_found"], data.get("dropped", [])
    only = [s for s in data.get("outbox_only", []) if s not in dropped]
    text = f"removed {len(removed)} notification(s) from the eUICC"
    if removed:
        text += "; they stay in the outbox and `notification process` still delivers them"
    if dropped:
        text += (f"\ndropped notification(s) {', '.join(map(str, dropped))}, which only the outbox held "
                 "(undelivered): never to be sent; kept in the outbox's history")
    if missing:
        text += f"\nnot found: {', '.join(map(str, missing))}"
    if args.all and only:
        text += (f"\nundelivered notification(s) held only in the outbox: {', '.join(map(str, only))}; "
                 "`notification process` delivers them, `notification drop --all` retires them unsent")
    out.ok(data, text)
    return 0


def cmd_notification_drop(args, out: Output) -> int:
    """Retire undelivered notifications that only the outbox still holds: never sent, kept as history."""
    seqs = _seq_args(args)
    if not args.all and not seqs:
        raise UsageError("give the sequence number(s) to drop, or --all")
    data = execute(args, out, "notification.drop", {"seqs": seqs, "all": bool(args.all)})
    dropped = data["dropped"]
    text = (f"dropped notification(s) {', '.join(map(str, dropped))}: never to be sent; the outbox keeps "
            "them as history (`notification list --history`)" if dropped
            else "nothing to drop: no undelivered notification is held only in the outbox")
    if data.get("not_found"):
        text += f"\nnot found: {', '.join(map(str, data['not_found']))}"
    if data.get("on_euicc"):
        text += (f"\nstill on the eUICC, not dropped: {', '.join(map(str, data['on_euicc']))} "
                 "(`notification remove` them first)")
    out.ok(data, text)
    return 0


def cmd_notification_process(args, out: Output) -> int:
    from .ops.notifications import failure_exit_code
    seqs = _seq_args(args)
    seqs = None if args.all or not seqs else seqs
    params = {"seqs": seqs, **_server_params(args)}
    if getattr(args, "now", False):
        params["now"] = True
    data = execute(args, out, "notification.process", params)
    results = data["notifications"]
    rows = [[r["seq_number"], r["operation"], r["address"], r["status"],
             (r.get("error") or {}).get("message", "") if r["status"] != "waiting"
             else f"next attempt after {r.get('next_attempt_at')} (its server failed before)"] for r in results]
    waiting = data.get("waiting") or []

    def text() -> str:
        if not rows:
            return "no pending notifications"
        t = table(rows, ["SEQ", "OPERATION", "ADDRESS", "STATUS", "ERROR"])
        if waiting:
            first = min(w["next_attempt_at"] for w in waiting if w.get("next_attempt_at"))
            t += (f"\n{len(waiting)} notification(s) wait for their server's back-off (the first until {first}) "
                  "and are sent then; `notification process --now` tries at once")
        return t
    out.ok(data, text)
    return failure_exit_code(data)


# --------------------------------------------------------------------------- commands: download

class _Progress:
    """Download progress on stderr, as ``progress(step, done, total)``.

    On a terminal: one line rewritten in place, ended (``end_line``) before anything else is
    printed — the consent prompt, a warning. Elsewhere (systemd's journal, a pipe, a log file):
    a line per step, and while the profile loads one line every ``every`` seconds, so the
    journal shows a long download is alive."""

    def __init__(self, stream, *, tty: bool, every: float = 5.0, clock=None):
        import time
        self.stream, self.tty, self.every = stream, tty, every
        self.clock = clock or time.monotonic
        self.open = False                 # a terminal line waits for its end
        self.last_step: str | None = None
        self.last_at = 0.0

    def __call__(self, step: str, done: int, total: int) -> None:
        if self.tty:
            extra = f" {done}/{total} bytes" if total else ""
            self.stream.write(f"\r\x1b[K{step}{extra}")
            self.open = True
            if step == "installed":
                self.end_line()
            self.stream.flush()
            return
        now = self.clock()
        if step == self.last_step and (now - self.last_at < self.every or not total):
            return
        self.last_step, self.last_at = step, now
        extra = f": {done}/{total} bytes ({done * 100 // total} %)" if total and step != "installed" else ""
        self.stream.write(f"{step}{extra}\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def _progress_printer(out: Output, *, stream=None, clock=None, every: float = 5.0) -> _Progress | None:
    """Progress for people; None with --json (stdout is for the one JSON document, and a
    script reading it does not want stderr chatter either)."""
    if out.json:
        return None
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return _Progress(stream, tty=tty, every=every, clock=clock)


def _warner(out: Output, progress: _Progress | None):
    def warn(message: str) -> None:
        if progress is not None:
            progress.end_line()
        out.info(f"warning: {message}")
    return warn


def cmd_profile_download(args, out: Output) -> int:
    from .ac import read_activation_code, validate_address
    ac = None
    if args.ac is not None or args.ac_file:
        if args.smdp:
            raise UsageError("give either an activation code or --smdp, not both")
        ac = read_activation_code(args.ac, args.ac_file, sys.stdin)
    if args.matching_id is not None and not args.smdp:
        raise UsageError("--matching-id goes with --smdp (an activation code already carries one)")
    if args.matching_id is not None:
        from .ac import validate_matching_id
        validate_matching_id(args.matching_id)
    if args.smdp:
        args.smdp = validate_address(args.smdp)
    interactive = sys.stdin.isatty() and not out.json
    if not args.yes and not interactive:
        raise UsageError("downloading needs your consent to the profile: pass --yes (no terminal to ask on)",
                         code="consent_required")
    if args.imei is not None:
        from .ids import normalise_imei
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


# --------------------------------------------------------------------------- commands: ipa (SGP.32)

def _eim_options(args) -> dict:
    """--eim-url, --esipa-version, --binding: the [eim] settings of a direct run, checked like the
    config's keys (bad values are usage errors before the card is touched)."""
    from .config import check_eim_value
    given = {"url": getattr(args, "eim_url", None), "esipa_version": getattr(args, "esipa_version", None),
             "binding": getattr(args, "binding", None)}
    return {k: check_eim_value(k, v, f"--{k.replace('_', '-')}" if k != "url" else "--eim-url")
            for k, v in given.items() if v is not None}


def _ipa_execute(args, out: Output, op: str, params: dict) -> dict:
    if _eim_options(args) and _through_daemon(args):
        raise UsageError("--eim-url, --esipa-version and --binding are for a direct run (--direct, with the "
                         "daemon stopped); the daemon polls with the [eim] settings of its config",
                         code="eim_options_direct")
    return execute(args, out, op, params)


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


def cmd_ipa_return_from_fallback(args, out: Output) -> int:
    data = _ipa_execute(args, out, "ipa.return_from_fallback", {})
    text = f"returned from the fallback profile: {data.get('enabled') or '(none)'} is enabled"
    if data.get("report_error"):
        text += f"\nthe eIM was not told yet: {data['report_error'].get('message')} (the next poll tells it)"
    out.ok(data, text)
    return 0


def _add_ipa_parsers(sub) -> None:
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
    add(g, "--segment-size", type=int, metavar="N", help="STORE DATA block size, 1..255 (default 255)")
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


def build_parser(only: str | None = None, leaf: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser: the whole tree, or with ``only`` the top level with just
    that command group under it, and with ``leaf`` just that action of the group (what a run
    needs: building every group's parsers, and importing the modules that define them, costs
    more than some commands take to run)."""
    global _ONLY_LEAF
    p = _Parser(prog="esim-agent", description="Device-side eSIM agent: the SGP.22 LPA over a modem's AT port, with a simulated test bed.")
    _add_global_options(p)

    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _ONLY_LEAF = (f"{p.prog} {only}", leaf) if only is not None and leaf is not None else None
    try:
        for name, add in _GROUPS.items():
            if only is None or name == only:
                add(sub)
    finally:
        _ONLY_LEAF = None
    for leaf in _leaves(p):
        if leaf is not p:
            _add_global_options(leaf, suppress=True)
    return p


def _add_chip_parsers(sub) -> None:
    chip = sub.add_parser("chip", help="the eUICC itself").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    chip.required = True
    chip.add_parser("info", help="EID, EUICCInfo2, configured addresses").set_defaults(func=cmd_chip_info)
    c = chip.add_parser("set-default-dp", help="set the default SM-DP+ address ('' clears it)")
    c.add_argument("address")
    c.set_defaults(func=cmd_chip_set_default_dp)
    c = chip.add_parser("reset", help="eUICC memory reset (deletes profiles)")
    c.add_argument("--yes", action="store_true")
    c.set_defaults(func=cmd_chip_reset)


def _add_profile_parsers(sub) -> None:
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


def _add_notification_parsers(sub) -> None:
    notif = sub.add_parser("notification", help="pending notifications").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    notif.required = True
    c = notif.add_parser("list", help="list pending notifications (on the eUICC and in the outbox)")
    c.add_argument("--history", action="store_true", help="also what the outbox delivered or dropped")
    c.set_defaults(func=cmd_notification_list)
    c = notif.add_parser("remove", help="remove notifications from the eUICC without sending them (kept in the "
                                        "outbox; one only the outbox holds is dropped)")
    c.add_argument("seq", nargs="*", type=int)
    c.add_argument("--all", action="store_true")
    c.set_defaults(func=cmd_notification_remove)
    c = notif.add_parser("drop", help="retire undelivered notifications only the outbox holds (never sent, kept "
                                      "as history)")
    c.add_argument("seq", nargs="*", type=int)
    c.add_argument("--all", action="store_true", help="every undelivered notification held only in the outbox")
    c.set_defaults(func=cmd_notification_drop)
    _add_notification_process_parser(notif)


def _add_status_parser(sub) -> None:
    c = sub.add_parser("status", help="daemon, modem, eUICC, profiles, jobs and outbox at a glance")
    c.set_defaults(func=cmd_status)


def _add_sync_parser(sub) -> None:
    c = sub.add_parser("sync", help="ask the default SM-DP+ whether a profile waits for this eUICC; install it")
    _server_args(c)
    c.set_defaults(func=cmd_sync)


def _add_daemon_parser(sub) -> None:
    c = sub.add_parser("daemon", help="run the gateway service in the foreground (systemd supervises it)")
    c.set_defaults(func=cmd_daemon)


def _server_args(p) -> None:
    p.add_argument("--ca", metavar="FILE", help="trusted CI certificate(s) for the servers' TLS (PEM or DER)")
    p.add_argument("--insecure-http", action="store_true", help="plain HTTP, for test servers only")
    p.add_argument("--http-timeout", type=float, metavar="S",
                   help="deadline for each call to a server, retries included (default: config http_timeout, 30)")


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
    c.add_argument("--now", action="store_true",
                   help="also try servers that failed before and wait for their back-off")
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


#: Commands that run as a job of the daemon when one answers (execute()): the CLI then only
#: sends the request and prints the answer, without logging's set-up.
_SOCKET_COMMANDS = frozenset((
    cmd_chip_info, cmd_chip_set_default_dp, cmd_chip_reset, cmd_profile_list, cmd_profile_enable,
    cmd_profile_disable, cmd_profile_delete, cmd_profile_nickname, cmd_profile_download,
    cmd_notification_list, cmd_notification_remove, cmd_notification_drop, cmd_notification_process,
    cmd_ipa_add_eim, cmd_ipa_list_eim, cmd_ipa_poll, cmd_ipa_status, cmd_ipa_return_from_fallback))

#: The command groups, in the order --help lists them.
_GROUPS = {"chip": _add_chip_parsers, "profile": _add_profile_parsers, "notification": _add_notification_parsers,
           "status": _add_status_parser, "sync": _add_sync_parser, "daemon": _add_daemon_parser,
           "ipa": _add_ipa_parsers, "sim": _add_sim_parsers, "bench": _add_bench_parsers, "demo": _add_demo_parser}

#: Options of the top level that take a value (``--device PATH``); the others are flags.
_GLOBAL_VALUED = frozenset(("--device", "--sim", "--transport", "--aid", "--timeout", "--long-timeout", "--baud",
                            "--segment-size", "--config"))
_GLOBAL_FLAGS = frozenset(("--direct", "--json", "--verbose", "--trace"))


def _group_of(argv: list[str]) -> tuple[str, str | None] | None:
    """The command group a command line names, and its action, when that is certain: the first
    word after the top level's own options, and the word right after it (None when an option
    follows). None (build the whole tree) for help, abbreviated or unknown options, or
    anything else argparse might read differently."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help") or a == "--":
            return None
        if not a.startswith("-") or a == "-":
            if a not in _GROUPS or any(x in ("-h", "--help") for x in argv[i + 1:]):
                return None
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            return a, (nxt if nxt and not nxt.startswith("-") else None)
        flag, eq, _ = a.partition("=")
        if flag in _GLOBAL_VALUED:
            i += 1 if eq else 2
        elif flag in _GLOBAL_FLAGS and not eq:
            i += 1
        elif a.startswith("-v") and a[1:] == "v" * (len(a) - 1):
            i += 1
        else:
            return None
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argv parsed with only the named command group's parsers when that suffices; the whole
    tree otherwise, and for every error, so messages and usage lines are the whole tree's."""
    named = _group_of(argv)
    if named is not None:
        try:
            return build_parser(*named).parse_args(argv)
        except UsageError:
            pass
    return build_parser().parse_args(argv)


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
        args = _daemon_args(argv) or parse_args(argv)
        out = Output(args.json)
        verbose = args.verbose
        from . import config
        args.config = config.load(args.config_path)
        if not (args.func in _SOCKET_COMMANDS and _through_daemon(args)):
            _configure_logging(args)        # a job the daemon runs logs there, not here
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


def run() -> None:
    """The console script (and ``python -m agent``): ``main()``, then leave at once.

    A one-shot command has closed the card, the port (its settings put back) and the outbox
    before ``main`` returns, and flushed what it printed; what the interpreter's normal exit
    still does then — tearing down ~250 modules and collecting the ASN.1 tables' objects —
    cost 20–25 ms of every command (issue #8), longer than some commands' own work. So after
    the atexit handlers (logging, temporary files) and a flush, the process ends with
    ``os._exit``. Not while another non-daemon thread runs (a server's or the daemon's): then
    the normal exit waits for it as always."""
    code = main()
    import threading
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    import atexit
    import os
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:      # the reader went away (| head): nothing left to tell it
        pass
    except Exception:            # anything odd: let the normal exit deal with it
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    run()
