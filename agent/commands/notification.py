"""`esim-agent notification`: pending notifications on the eUICC and in the outbox (list,
remove, drop, process)."""
from __future__ import annotations

from ..cli import Output, _Parser, _server_args, _server_params, execute, socket_command
from ..errors import UsageError
from ..render import table


def add_parsers(sub) -> None:
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


def _add_notification_process_parser(notif) -> None:
    c = notif.add_parser("process", help="send pending notifications, then remove them from the eUICC")
    c.add_argument("seq", nargs="*", type=int)
    c.add_argument("--all", action="store_true", help="all pending notifications (the default)")
    c.add_argument("--now", action="store_true",
                   help="also try servers that failed before and wait for their back-off")
    _server_args(c)
    c.set_defaults(func=cmd_notification_process)


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


@socket_command
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
    from ..ops.notifications import check_seqs
    return check_seqs(list(args.seq or []))


@socket_command
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


@socket_command
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


@socket_command
def cmd_notification_process(args, out: Output) -> int:
    from ..ops.notifications import failure_exit_code
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
