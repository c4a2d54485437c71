"""Notifications through the durable outbox (SGP.22 §3.5; store.py explains the
crash rules): list, deliver, remove from the card without losing them."""
from __future__ import annotations

import contextlib

from ..errors import AgentError
from .card import Card


def _outbox(ctx):
    from ..store import Outbox
    return Outbox(ctx.outbox_path())


def deliver(ctx, card: Card, seqs=None):
    """Deliver pending notifications (all, or ``seqs``); returns the Delivery list."""
    from ..flows.notifications import process
    pool = ctx.servers.pool()
    try:
        with _outbox(ctx) as outbox:
            return process(card.es10, outbox, pool, eid=card.eid, seqs=seqs, cancel=ctx.cancel)
    finally:
        pool.close()


def after_change(ctx, card: Card, data: dict) -> None:
    """Send the notifications an operation caused. The operation itself has succeeded:
    delivery failures are reported in ``data`` and as warnings, kept in the outbox and
    left on the card for later, never raised."""
    if not ctx.notifications:
        return
    try:
        data["notifications"] = [d.to_json() for d in deliver(ctx, card)]
    except AgentError as e:
        if getattr(e, "reason", None) in ("interrupted", "terminated"):
            raise
        data["notifications_error"] = e.to_json()
        ctx.warning(f"notifications not processed: {e.message}")
        return
    by_cause: dict[str, list[int]] = {}
    for d in data["notifications"]:
        if d["status"] == "failed":
            by_cause.setdefault(d["error"]["message"], []).append(d["seq_number"])
    for msg, seqs in by_cause.items():
        ctx.warning(f"notification(s) {', '.join(map(str, seqs))} not sent: {msg}\n"
                    "  They stay in the outbox (and on the eUICC until delivered); they are sent again by "
                    "`esim-agent notification process` or by the daemon.")


def safe_deliver(ctx, card: Card) -> list:
    """After a failed operation: deliver what it left (e.g. a refused package's signed result)."""
    if not ctx.notifications:
        return []
    try:
        return deliver(ctx, card)
    except AgentError:
        return []


def list_notifications(ctx, card: Card) -> dict:
    notes = card.es10.list_notifications()
    on_card = {n.seq_number for n in notes}
    kept = []
    if ctx.outbox_path().exists():
        # Undelivered results the card no longer holds (removed with `notification remove`
        # or by another tool) are still in the outbox and still get delivered.
        with _outbox(ctx) as ob:
            kept = [n for n in ob.pending(card.eid) if n.seq_number not in on_card]
    return {"notifications": [n.to_json() for n in notes],
            "outbox_only": [{"seq_number": n.seq_number, "operation": n.operation, "address": n.address,
                             "iccid": n.iccid} for n in kept]}


def remove(ctx, card: Card, seqs: list[int] | None = None, all: bool = False) -> dict:  # noqa: A002
    """Remove notifications from the eUICC (e.g. to free its list) without losing them:
    each one is recorded in the outbox first and is still delivered later."""
    from ..errors import UsageError
    from ..es10 import Es10Error
    if not all and not seqs:
        raise UsageError("give the sequence number(s) to remove, or --all")
    es10 = card.es10
    removed, missing, kept_back = [], [], []
    held = {p.seq_number: p for p in es10.retrieve_notifications()}
    wanted = sorted(held) if all else list(seqs)
    eid = card.eid if any(s in held for s in wanted) else None
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
        if ob is not None:
            ob.reconcile(eid, [s for s in held if s not in removed])
    if kept_back:
        raise AgentError(f"notification(s) {', '.join(map(str, kept_back))} not removed: the outbox still holds "
                         "an undelivered notification with the same sequence number; run `notification process` "
                         "first", code="outbox_conflict",
                         details={"removed": removed, "not_found": missing, "not_removed": kept_back})
    if missing and not removed:
        raise Es10Error("RemoveNotificationFromList", "nothingToDelete", 1,
                        f"no notification with sequence number {', '.join(map(str, missing))}")
    return {"removed": removed, "not_found": missing, "kept_in_outbox": removed}


def process_op(ctx, card: Card, seqs: list[int] | None = None) -> dict:
    """Deliver pending notifications; all failed → an error, some failed → data with failures."""
    results = deliver(ctx, card, seqs or None)
    failed = [r for r in results if r.status == "failed"]
    if failed and len(failed) == len(results):
        first = failed[0].error or {}
        raise AgentError(f"no notification delivered: {first.get('message', 'see details')}",
                         code=first.get("code", "notification_failed"),
                         details={"notifications": [r.to_json() for r in results]})
    return {"notifications": [r.to_json() for r in results]}
