"""Notifications through the durable outbox (SGP.22 §3.5; store.py explains the
crash rules and the back-off): list, deliver, remove from the card without losing
them, retire (drop) what only the outbox still holds."""
from __future__ import annotations

import contextlib

from ..errors import AgentError, UsageError, exit_code_for
from .card import Card

#: The largest sequence number anything can hold (the outbox's SQLite INTEGER key).
MAX_SEQ_NUMBER = 2 ** 63 - 1


def check_seqs(seqs, what: str = "sequence number") -> list[int]:
    """Notification sequence numbers from a user or a request: whole numbers 0..2^63-1,
    checked before the card is touched (a usage error, exit 2)."""
    if seqs is None:
        return []
    if not isinstance(seqs, (list, tuple)):
        seqs = [seqs]
    out = []
    for s in seqs:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEQ_NUMBER:
            shown = f"a {s.bit_length()}-bit number" if isinstance(s, int) and s.bit_length() > 64 else repr(s)
            raise UsageError(f"{shown} is not a notification {what}: a whole number from 0 (see "
                             "`notification list`)", code="bad_seq_number")
        out.append(s)
    return out


def _outbox(ctx):
    from ..store import Outbox
    return Outbox(ctx.outbox_path())


def deliver(ctx, card: Card, seqs=None, *, force: bool = False, known: dict[int, bytes] | None = None,
            pool=None):
    """Deliver pending notifications (all, or ``seqs``); returns the Delivery list.
    ``force``: ignore the back-off of addresses that failed before. ``known``: notifications
    already read from the card in this run (flows.notifications.process). ``pool``: the
    operation's own ES9+ clients (kept open: a download's connection to its SM-DP+ carries the
    install result too, without a second TLS handshake), else a pool of our own."""
    from ..flows.notifications import process
    own = pool is None
    if own:
        pool = ctx.servers.pool()
    try:
        with _outbox(ctx) as outbox:
            return process(card.es10, outbox, pool, eid=card.eid, seqs=seqs, cancel=ctx.cancel, force=force,
                           known=known)
    finally:
        if own:
            pool.close()


_WHERE = {"euicc+outbox": "They stay on the eUICC and in the outbox",
          "outbox": "They are held only in the outbox (no longer on the eUICC)"}


def after_change(ctx, card: Card, data: dict, *, known: dict[int, bytes] | None = None, pool=None) -> None:
    """Send the notifications an operation caused. The operation itself has succeeded:
    delivery failures are reported in ``data`` and as warnings that say where each
    undelivered notification is, kept in the outbox and left on the card for later,
    never raised. ``known``, ``pool``: as for ``deliver``."""
    if not ctx.notifications:
        return
    try:
        data["notifications"] = [d.to_json() for d in deliver(ctx, card, known=known, pool=pool)]
    except AgentError as e:
        if getattr(e, "reason", None) in ("interrupted", "terminated"):
            raise
        data["notifications_error"] = e.to_json()
        ctx.warning(f"notifications not processed: {e.message}")
        return
    by_cause: dict[tuple, list[int]] = {}
    for d in data["notifications"]:
        if d["status"] == "failed":
            key = ("failed", d["error"]["message"], d.get("held_in", "euicc+outbox"), d.get("next_attempt_at"))
        elif d["status"] == "waiting":
            key = ("waiting", d["address"], d.get("held_in", "euicc+outbox"), d.get("next_attempt_at"),
                   d.get("last_error"))
        else:
            continue
        by_cause.setdefault(key, []).append(d["seq_number"])
    later = ("they are sent again by `esim-agent notification process` or by the daemon")
    for key, seqs in by_cause.items():
        nums = ", ".join(map(str, seqs))
        where = _WHERE.get(key[2], _WHERE["euicc+outbox"])
        if key[0] == "failed":
            when = f" (not before {key[3]}: the server backs off)" if key[3] else ""
            ctx.warning(f"notification(s) {nums} not sent: {key[1]}\n  {where}; {later}{when}.")
        else:
            ctx.warning(f"notification(s) {nums} not sent: their server {key[1]} failed before "
                        f"({key[4] or 'no details'}); no new attempt before {key[3]}.\n  {where}; {later}.")


def server_answered(ctx, address: str) -> None:
    """A server just answered us (a download went through): whatever back-off its address had
    from earlier failures is over, so the notifications for it (the install result) go now."""
    if not ctx.outbox_path().exists():
        return
    try:
        with _outbox(ctx) as ob:
            if ob.address_state(address) is not None:
                ob.address_ok(address)
    except AgentError:
        pass


def safe_deliver(ctx, card: Card) -> list:
    """After a failed operation: deliver what it left (e.g. a refused package's signed result)."""
    if not ctx.notifications:
        return []
    try:
        return deliver(ctx, card)
    except AgentError:
        return []


def _state(n) -> dict:
    """An outbox entry's delivery state, for `notification list`."""
    d = {"status": n.status, "attempts": n.attempts, "created_at": n.created_at}
    for k in ("last_error", "next_attempt_at", "sent_at", "removed_at", "dropped_at"):
        v = getattr(n, k)
        if v is not None:
            d[k] = v
    return d


def list_notifications(ctx, card: Card, history: bool = False) -> dict:
    """The card's notifications and the undelivered ones only the outbox still holds (with their
    state: attempts, last error, next attempt); ``history``: also what the outbox finished with
    (delivered, dropped)."""
    notes = card.es10.list_notifications()
    on_card = {n.seq_number for n in notes}
    kept, done, waits = [], [], {}
    if ctx.outbox_path().exists():
        # Undelivered results the card no longer holds (removed with `notification remove`
        # or by another tool) are still in the outbox and still get delivered.
        with _outbox(ctx) as ob:
            eid = card.eid
            kept = [n for n in ob.pending(eid) if n.seq_number not in on_card]
            if history:
                done = [n for n in ob.list(eid) if n.status != "pending"]
            # An address that backs off holds back all its notifications, tried or not.
            waits = {a: ob.waiting(a) for a in {n.address for n in kept}}
    data = {"notifications": [n.to_json() for n in notes],
            "outbox_only": [{"seq_number": n.seq_number, "operation": n.operation, "address": n.address,
                             "iccid": n.iccid, **_state(n),
                             **({"next_attempt_at": waits[n.address].next_attempt_at} if waits.get(n.address)
                                else {})} for n in kept]}
    if history:
        data["history"] = [{"seq_number": n.seq_number, "operation": n.operation, "address": n.address,
                            "iccid": n.iccid, **_state(n)} for n in done]
    return data


def remove(ctx, card: Card, seqs: list[int] | None = None, all: bool = False) -> dict:  # noqa: A002
    """Remove notifications from the eUICC (e.g. to free its list) without losing them:
    each one is recorded in the outbox first and is still delivered later. A sequence
    number only the outbox still holds (undelivered) is retired there instead: kept as
    history with status dropped, never sent (the user named it)."""
    from ..es10 import Es10Error
    seqs = check_seqs(seqs)
    if not all and not seqs:
        raise UsageError("give the sequence number(s) to remove, or --all")
    es10 = card.es10
    removed, missing, kept_back, dropped = [], [], [], []
    held = {p.seq_number: p for p in es10.retrieve_notifications()}
    wanted = sorted(held) if all else list(dict.fromkeys(seqs))
    outbox_only: list[int] = []
    need_outbox = any(s in held for s in wanted) or ctx.outbox_path().exists()
    eid = card.eid if need_outbox else None
    with contextlib.ExitStack() as stack:
        ob = stack.enter_context(_outbox(ctx)) if eid else None
        for seq in wanted:
            ctx.cancel.check()
            p = held.get(seq)
            if p is not None:
                old = ob.get(eid, seq)
                if old is not None and not old.delivered and old.der != p.der:
                    # The card reused this number while an older notification with it is
                    # still undelivered: recording this one would push that one aside.
                    kept_back.append(seq)
                    continue
                ob.record(eid, seq, p.operation, p.address, p.iccid, p.der)   # before it leaves the card
                (removed if es10.remove_notification(seq) else missing).append(seq)
                continue
            n = ob.get(eid, seq) if ob is not None else None
            if n is not None and n.status == "pending":
                ob.drop(eid, seq)            # only the outbox holds it: retired on request, kept as history
                dropped.append(seq)
            elif es10.remove_notification(seq):    # not listed, yet the card had it after all
                removed.append(seq)
            else:
                missing.append(seq)
        if ob is not None:
            ob.reconcile(eid, [s for s in held if s not in removed])
            outbox_only = [n.seq_number for n in ob.pending(eid) if n.seq_number not in held or n.seq_number
                           in removed]
    if kept_back:
        raise AgentError(f"notification(s) {', '.join(map(str, kept_back))} not removed: the outbox still holds "
                         "an undelivered notification with the same sequence number; run `notification process` "
                         "first", code="outbox_conflict",
                         details={"removed": removed, "not_found": missing, "not_removed": kept_back,
                                  "dropped": dropped})
    if missing and not removed and not dropped:
        raise Es10Error("RemoveNotificationFromList", "nothingToDelete", 1,
                        f"no notification with sequence number {', '.join(map(str, missing))} on the eUICC "
                        "or undelivered in the outbox")
    return {"removed": removed, "not_found": missing, "kept_in_outbox": removed, "dropped": dropped,
            "outbox_only": outbox_only}


def drop(ctx, card: Card, seqs: list[int] | None = None, all: bool = False) -> dict:  # noqa: A002
    """Retire undelivered notifications that only the outbox still holds (`notification remove`
    took them off the eUICC, or another tool did): they are never sent, and stay in the outbox
    as history with status dropped. One still on the eUICC is not dropped: `notification
    remove` it first (it stays deliverable until dropped)."""
    seqs = check_seqs(seqs)
    if not all and not seqs:
        raise UsageError("give the sequence number(s) to drop, or --all")
    on_card = {n.seq_number for n in card.es10.list_notifications()}
    dropped, missing, still_on_card = [], [], []
    if ctx.outbox_path().exists():
        with _outbox(ctx) as ob:
            eid = card.eid
            ob.reconcile(eid, on_card)
            pending = {n.seq_number: n for n in ob.pending(eid)}
            wanted = sorted(s for s in pending if s not in on_card) if all else list(dict.fromkeys(seqs))
            for seq in wanted:
                ctx.cancel.check()
                if seq in on_card:
                    still_on_card.append(seq)
                elif seq in pending:
                    ob.drop(eid, seq)
                    dropped.append(seq)
                else:
                    missing.append(seq)
    else:
        wanted = [] if all else list(dict.fromkeys(seqs))
        still_on_card = [s for s in wanted if s in on_card]
        missing = [s for s in wanted if s not in on_card]
    details = {"dropped": dropped, "not_found": missing, "on_euicc": still_on_card}
    if (still_on_card or missing) and not dropped:
        if still_on_card:
            raise UsageError(f"notification(s) {', '.join(map(str, still_on_card))} are still on the eUICC: "
                             "`notification remove` takes them off it (they stay deliverable), then "
                             "`notification drop` retires them", code="notification_on_euicc", details=details)
        raise AgentError(f"no undelivered notification with sequence number {', '.join(map(str, missing))} in "
                         "the outbox (see `notification list`)", code="notification_not_found", details=details)
    return details


def process_op(ctx, card: Card, seqs: list[int] | None = None, now: bool = False) -> dict:
    """Deliver pending notifications. What waits for its server's back-off is not a failure:
    ``data.waiting`` lists it. Failures: some → data (the caller's exit code comes from the
    first failure's code), all (none delivered) → an error with that code."""
    seqs = check_seqs(seqs)
    results = deliver(ctx, card, seqs or None, force=bool(now or seqs))
    data = {"notifications": [r.to_json() for r in results],
            "waiting": [{"seq_number": r.seq_number, "address": r.address, "next_attempt_at": r.next_attempt_at,
                         "attempts": r.attempts, "held_in": r.held_in} for r in results if r.status == "waiting"]}
    failed = [r for r in results if r.status == "failed"]
    if failed and all(r.status in ("failed", "waiting") for r in results):
        first = failed[0].error or {}
        raise AgentError(f"no notification delivered: {first.get('message', 'see details')}",
                         code=first.get("code", "notification_failed"), details=data)
    return data


def failure_exit_code(data: dict) -> int:
    """Exit code for a `notification process` result: 0 when nothing failed (what waits for its
    back-off is not a failure), else the exit code of the first failure's cause (errors.EXIT_CODES)."""
    for n in data.get("notifications", []):
        if n.get("status") == "failed":
            return exit_code_for((n.get("error") or {}).get("code", "")) or 1
    return 0
