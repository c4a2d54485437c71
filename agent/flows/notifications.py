"""Notification delivery (SGP.22 §3.5, docs/protocol.md §6.3) through the durable outbox.

Order of operations, so a crash anywhere loses nothing (store.py explains the
recovery): reconcile the outbox with the card → record every notification's
exact DER (committed) → ES9+ handleNotification → mark sent → ES10b
RemoveNotificationFromList → mark removed. A notification is removed from the
eUICC only after its server accepted it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import AgentError
from ..es10 import Es10

log = logging.getLogger(__name__)


@dataclass
class Delivery:
    seq_number: int
    operation: str
    address: str
    iccid: str | None
    status: str             # delivered | failed | removed (already delivered earlier, now off the card)
    error: dict | None = None

    def to_json(self) -> dict:
        d = {"seq_number": self.seq_number, "operation": self.operation, "address": self.address,
             "iccid": self.iccid, "status": self.status}
        if self.error:
            d["error"] = self.error
        return d


def process(es10: Es10, outbox, client_for: Callable[[str], object], *, eid: str,
            seqs: Iterable[int] | None = None, cancel=None) -> list[Delivery]:
    """Deliver pending notifications (all, or those in ``seqs``) and remove them from the card.

    ``cancel`` (a CancelToken) is checked before each delivery: a stop between two
    notifications leaves the rest pending in the outbox, nothing half-done."""
    wanted = set(seqs) if seqs is not None else None
    on_card = es10.list_notifications()
    rec = outbox.reconcile(eid, [n.seq_number for n in on_card])
    results: list[Delivery] = []

    # Fetch the exact DER of what the card holds when we need it: to record new
    # entries, and to make sure a "delivered, still on the card" entry is really the
    # same notification (a reset card can reuse sequence numbers).
    card_der: dict[int, object] = {}
    if rec.unknown_on_card or rec.remove_from_card or rec.send:
        card_der = {p.seq_number: p for p in es10.retrieve_notifications()}

    todo_seqs = {n.seq_number for n in rec.send} | set(rec.unknown_on_card)
    # Delivered earlier but still on the card (crash between send and removal): remove only.
    for seq in rec.remove_from_card:
        if wanted is not None and seq not in wanted:
            continue
        p = card_der.get(seq)
        if p is not None and not outbox.matches(eid, seq, p.der):
            todo_seqs.add(seq)          # same number, different notification: a new one to deliver
            continue
        n = outbox.get(eid, seq)
        es10.remove_notification(seq)   # False = already gone: the outcome is the same
        outbox.mark_removed(eid, seq)
        results.append(Delivery(seq, n.operation, n.address, n.iccid, "removed"))

    # Record everything new on the card before sending anything.
    if wanted is not None:
        todo_seqs &= wanted
    for seq in sorted(todo_seqs):
        p = card_der.get(seq)
        if p is None or outbox.matches(eid, seq, p.der):
            continue
        old = outbox.get(eid, seq)
        if old is not None and not old.delivered:
            continue    # deliver the older undelivered one first; the card's turn comes next run
        outbox.record(eid, seq, p.operation, p.address, p.iccid, p.der)

    queue = [outbox.get(eid, s) for s in sorted(todo_seqs)]
    queue += [n for n in rec.deliver_only if wanted is None or n.seq_number in wanted]
    if wanted is not None:
        unknown = wanted - {n.seq_number for n in queue if n} - {r.seq_number for r in results}
        for s in sorted(unknown):
            results.append(Delivery(s, "", "", None, "failed",
                                    {"code": "notification_not_found",
                                     "message": f"no pending notification with sequence number {s}"}))

    for n in queue:
        if n is None:
            continue
        if cancel is not None:
            cancel.check()
        try:
            client_for(n.address).handle_notification(n.der)
        except AgentError as e:
            outbox.mark_failed(eid, n.seq_number, e.message)
            log.info("notification %d to %s not delivered: %s", n.seq_number, n.address, e.message)
            results.append(Delivery(n.seq_number, n.operation, n.address, n.iccid, "failed", e.to_json()))
            continue
        outbox.mark_sent(eid, n.seq_number)
        on_card = card_der.get(n.seq_number)
        # Remove only the very notification that was sent: a card can reuse a sequence
        # number (reset, replaced eUICC); a different one under it stays for the next run.
        if not n.removed_externally and (on_card is None or on_card.der == n.der):
            es10.remove_notification(n.seq_number)   # False = already gone: fine either way
            outbox.mark_removed(eid, n.seq_number)
        results.append(Delivery(n.seq_number, n.operation, n.address, n.iccid, "delivered"))
    return sorted(results, key=lambda d: d.seq_number)


class ClientPool:
    """One ES9+ client per notification address, sharing the trust settings."""

    def __init__(self, *, ca=None, config_ca=None, insecure_http: bool = False, ci_pkids=None):
        self.kw = {"ca": ca, "config_ca": config_ca, "insecure_http": insecure_http}
        self.ci_pkids = ci_pkids
        self.clients: dict[str, object] = {}

    def __call__(self, address: str):
        c = self.clients.get(address)
        if c is None:
            from ..es9p import Es9pClient
            c = Es9pClient(address, **self.kw)
            if self.ci_pkids:
                c.narrow_to(self.ci_pkids)
            self.clients[address] = c
        return c

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()
