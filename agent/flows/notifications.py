"""Notification delivery (SGP.22 §3.5, docs/protocol.md §6.3) through the durable outbox.

Order of operations, so a crash anywhere loses nothing (store.py explains the
recovery): reconcile the outbox with the card → record every notification's
exact DER (committed) → ES9+ handleNotification → mark sent → ES10b
RemoveNotificationFromList → mark removed. A notification is removed from the
eUICC only after its server accepted it.

Back-off (store.py): a server address that failed is not tried again before its
``next_attempt_at``; its notifications are reported as ``waiting`` (not failed)
until then, and an address that fails during a run is not tried again in that
run.  ``force`` (explicit sequence numbers, `notification process --now`)
ignores earlier back-off.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from collections.abc import Callable, Iterable

from ..errors import AgentError
from ..es10 import Es10
from ..es10_types import pending_from_der
from ..logs import get_logger

log = get_logger(__name__)


#: outbox address prefix of a notification the eIM relays (agent/esipa_download.py)
VIA_EIM = "esipa:"


@dataclass
class Delivery:
    """One notification's outcome in a delivery run."""
    seq_number: int
    operation: str
    address: str
    iccid: str | None
    # delivered | failed | waiting (its address backs off; not tried this time) | removed (delivered
    # earlier, now off the card) | dropped (retired earlier without delivery, now off the card)
    status: str
    error: dict | None = None
    attempts: int | None = None          # failed / waiting: delivery attempts so far
    next_attempt_at: str | None = None   # failed / waiting: not tried again before (UTC, ISO 8601)
    last_error: str | None = None        # waiting: why its address backs off
    held_in: str | None = None           # failed / waiting: "euicc+outbox" or "outbox" (no longer on the card)

    def to_json(self) -> dict:
        d = {"seq_number": self.seq_number, "operation": self.operation, "address": self.address,
             "iccid": self.iccid, "status": self.status}
        if self.error:
            d["error"] = self.error
        for k in ("attempts", "next_attempt_at", "last_error", "held_in"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


def process(es10: Es10, outbox, client_for: Callable[[str], object], *, eid: str,
            seqs: Iterable[int] | None = None, cancel=None, force: bool = False,
            via_eim: bool = False, known: dict[int, bytes] | None = None) -> list[Delivery]:
    """Deliver pending notifications (all, or those in ``seqs``) and remove them from the card.

    ``cancel`` (a CancelToken) is checked before each delivery: a stop between two
    notifications leaves the rest pending in the outbox, nothing half-done. ``via_eim``: the
    caller's ``client_for`` relays ``esipa:`` addresses through the eIM (the IPA's poll round);
    without it those stay pending. ``known``: notifications this run already holds byte for byte
    from the card (a download's ProfileInstallationResult, which the eUICC keeps as its pending
    install notification, SGP.22 §3.1.3.4), by sequence number: when they are all that needs
    reading, RetrieveNotificationsList is not sent."""
    wanted = set(seqs) if seqs is not None else None
    on_card = es10.list_notifications()
    rec = outbox.reconcile(eid, [n.seq_number for n in on_card])
    results: list[Delivery] = []

    # Fetch the exact DER of what the card holds when we need it: to record new
    # entries, and to make sure a "delivered, still on the card" entry is really the
    # same notification (a reset card can reuse sequence numbers).
    card_der: dict[int, object] = {}
    needed = {n.seq_number for n in rec.send} | set(rec.unknown_on_card) | set(rec.remove_from_card)
    if needed and known and needed <= set(known) <= {n.seq_number for n in on_card}:
        card_der = {seq: pending_from_der(der) for seq, der in known.items()}
    elif needed:
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
        results.append(Delivery(seq, n.operation, n.address, n.iccid,
                                "dropped" if n.status == "dropped" else "removed"))

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

    failed_now: set[str] = set()         # addresses that failed in this run: not tried again in it
    for n in queue:
        if n is None:
            continue
        if cancel is not None:
            cancel.check()
        held = "outbox" if n.removed_externally else "euicc+outbox"
        if n.address.startswith(VIA_EIM) and not via_eim:
            # The result of an indirect download (SGP.32): the SM-DP+ hears of it through the eIM
            # (ESipa handleNotification), which only the IPA's poll round talks to.
            results.append(Delivery(n.seq_number, n.operation, n.address, n.iccid, "waiting",
                                    attempts=n.attempts, held_in=held,
                                    last_error="goes through the eIM: sent by the next `esim-agent ipa poll`"))
            continue
        w = outbox.waiting(n.address) if (not force or n.address in failed_now) else None
        if w is not None:
            results.append(Delivery(n.seq_number, n.operation, n.address, n.iccid, "waiting",
                                    attempts=n.attempts, next_attempt_at=w.next_attempt_at,
                                    last_error=w.last_error, held_in=held))
            continue
        try:
            client_for(n.address).handle_notification(n.der)
        except AgentError as e:
            # The server's fault (or the network's): its address backs off. A local configuration
            # problem (no CA, bad CA file, clock; exit 2) is not: it is tried again once fixed.
            st = outbox.address_failed(n.address, e.message) if e.exit_code != 2 else None
            failed_now.add(n.address)
            retry = _dt.datetime.fromisoformat(st.next_attempt_at) if st else None
            m = outbox.mark_failed(eid, n.seq_number, e.message, retry_at=retry)
            log.info("notification %d to %s not delivered: %s", n.seq_number, n.address, e.message)
            results.append(Delivery(n.seq_number, n.operation, n.address, n.iccid, "failed", e.to_json(),
                                    attempts=m.attempts, next_attempt_at=st.next_attempt_at if st else None,
                                    held_in=held))
            continue
        if outbox.address_state(n.address) is not None:
            outbox.address_ok(n.address)
        outbox.mark_sent(eid, n.seq_number)
        on_card = card_der.get(n.seq_number)
        # Remove only the very notification that was sent: a card can reuse a sequence
        # number (reset, replaced eUICC); a different one under it stays for the next run.
        if not n.removed_externally and (on_card is None or on_card.der == n.der):
            es10.remove_notification(n.seq_number)   # False = already gone: fine either way
            outbox.mark_removed(eid, n.seq_number)
        results.append(Delivery(n.seq_number, n.operation, n.address, n.iccid, "delivered"))
    return sorted(results, key=lambda d: d.seq_number)
