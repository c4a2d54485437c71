"""Profile switching, checked: enable → make the modem take the profile → check
the enabled ICCID → wait for network registration → roll back when it does not
attach (docs/modem.md §3; SGP.22 §3.2.1/§3.2.2 for Enable/Disable).

A switch that leaves a gateway without network strands it: nobody is there to
switch back. So after an enable the agent waits up to ``rollback_after``
seconds for +CEREG/+CREG/+C5GREG stat 1 (home) or 5 (roaming); if that does
not come it re-enables the previous profile, checks that one attaches, and
reports ``rolled_back``.

Every step is recorded (``ctx.steps``) before it runs, and each step first looks
at the card's real state, so a job resumed after a crash never repeats a step
that already took effect: an enable whose target is already enabled is not
sent again; a rollback already under way is finished, not restarted.
"""
from __future__ import annotations

import time

from ..errors import AgentError, TransportError
from .card import Card
from .notifications import after_change
from .profiles import enabled_profile, find_profile
from ..logs import get_logger

log = get_logger(__name__)


class RolledBack(AgentError):
    """The new profile did not attach; the previous one is enabled again."""

    code = "rolled_back"
    exit_code = 1


def _enabled_iccid(card: Card) -> str | None:
    p = enabled_profile(card)
    return p.iccid if p else None


def settle(ctx, card: Card, refresh: bool) -> None:
    """Make the modem take the profile change and get the ISD-R channel back.

    With refreshFlag the eUICC resets itself (REFRESH/UICC reset): the logical channel
    is gone and the modem answers "SIM busy" for a while. Modems without SIM-detect need
    an AT+CFUN cycle (quirk ``cfun_after_switch``), during which a USB modem may vanish
    and come back under the same /dev/serial/by-id name."""
    port = card.at_port
    quirks = getattr(card.transport, "quirks", None) or {}
    if port is not None and quirks.get("cfun_after_switch"):
        from ..network import cfun_cycle
        ctx.steps.step("cfun")
        card.isdr.close()
        try:
            cfun_cycle(port, timeout=card.settings.timeout)
        except TransportError as e:
            log.info("port went away during the CFUN cycle (%s); waiting for it", e.message)
        card.reconnect(within=120.0, cancel=ctx.cancel)
        return
    if not refresh:
        return
    try:
        card.isdr.reopen()
    except TransportError as e:
        log.info("channel not back after the refresh (%s); reconnecting to the modem", e.message)
        card.reconnect(within=120.0, cancel=ctx.cancel)


def wait_attached(ctx, card: Card, deadline_s: float):
    """Poll the registration state until registered or ``deadline_s`` passed.
    Returns (attached, Registration|None, checked)."""
    port = card.at_port
    if port is None:
        return True, None, False          # the in-process simulator has no network to attach to
    from ..network import query_registration
    end = time.monotonic() + deadline_s
    last = None
    while True:
        ctx.cancel.check()
        try:
            last = query_registration(card.at_port)
        except TransportError as e:
            if getattr(e, "code", "") in ("port_lost", "port_closed"):
                card.reconnect(within=max(5.0, end - time.monotonic()), cancel=ctx.cancel)
                continue
            raise
        if last is not None and last.registered:
            return True, last, True
        left = end - time.monotonic()
        if left <= 0:
            return False, last, True
        ctx.cancel.sleep(min(ctx.registration_poll, left))


def _reg_json(reg):
    return reg.to_json() if reg is not None else None


def enable(ctx, card: Card, id: str, refresh: bool | None = None, rollback: bool = True) -> dict:  # noqa: A002
    from ..es10 import canonical_profile_id
    id = canonical_profile_id(id)  # noqa: A001 - checked before the card; reported as understood
    refresh = ctx.refresh if refresh is None else refresh
    start = ctx.steps.seen("start")
    if start is None:
        target = find_profile(card, id)
        if target is None:
            # Let the card answer (iccidOrAidNotFound with its hint) rather than guess.
            card.es10.enable_profile(id, refresh=refresh)
            raise AgentError(f"profile {id} is not in the profile list but the eUICC enabled it", code="card_error")
        prev = enabled_profile(card)
        start = {"target": target.iccid, "previous": prev.iccid if prev else None}
        ctx.steps.step("start", **start)
    target, previous = start["target"], start["previous"]
    data: dict = {"enabled": id, "iccid": target, "previous": previous}

    if ctx.steps.seen("rollback") is None:
        # Resumed after a crash: an enable that already took effect is not sent again. A new
        # request always goes to the card (it answers profileNotInDisabledState itself).
        if ctx.steps.seen("enable") is None or _enabled_iccid(card) != target:
            ctx.steps.step("enable", iccid=target)
            card.es10.enable_profile(id, refresh=refresh)
            ctx.steps.step("enabled", iccid=target)
            settle(ctx, card, refresh)
        now = _enabled_iccid(card)
        if now != target:
            raise AgentError(f"after the switch the eUICC reports {now or 'no profile'} enabled, not {target}",
                             code="switch_not_effective", details=data)
        ctx.steps.step("attach_wait", iccid=target, seconds=ctx.rollback_after)
        attached, reg, checked = wait_attached(ctx, card, ctx.rollback_after)
        data["registration"] = _reg_json(reg)
        data["attach_checked"] = checked
        if attached or not rollback or not previous:
            if not attached:
                ctx.warning(f"profile {target} did not register on a network within {ctx.rollback_after:g} s"
                            + (" (no previous profile to roll back to)" if not previous else " (--no-rollback)"))
            data["attached"] = attached
            after_change(ctx, card, data)
            return data
        reason = (f"profile {target} did not register on a network within {ctx.rollback_after:g} s "
                  f"(last state: {reg.describe() if reg else 'no answer to AT+CEREG?/CREG?'})")
        ctx.steps.step("rollback", iccid=previous, reason=reason)
    reason = ctx.steps.seen("rollback")["reason"]
    ctx.warning(f"{reason}; switching back to {previous}")
    if _enabled_iccid(card) != previous:
        card.es10.enable_profile(previous, refresh=refresh)
        settle(ctx, card, refresh)
    attached, reg, checked = wait_attached(ctx, card, ctx.rollback_after)
    ctx.steps.step("rolled_back", iccid=previous, attached=attached)
    data.update({"rolled_back_to": previous, "previous_attached": attached, "registration": _reg_json(reg)})
    after_change(ctx, card, data)
    msg = f"rolled back to {previous}: {reason}"
    if not attached:
        msg += f"; the previous profile did not register either within {ctx.rollback_after:g} s"
    raise RolledBack(msg, details=data)


def disable(ctx, card: Card, id: str, refresh: bool | None = None) -> dict:  # noqa: A002
    from ..es10 import canonical_profile_id
    id = canonical_profile_id(id)  # noqa: A001
    refresh = ctx.refresh if refresh is None else refresh
    done = ctx.steps.seen("disabled") is not None
    if not done and ctx.steps.seen("disable") is not None:
        p = find_profile(card, id)
        done = p is not None and p.state != "enabled"
    if not done:
        ctx.steps.step("disable", id=id)
        card.es10.disable_profile(id, refresh=refresh)
        ctx.steps.step("disabled", id=id)
        settle(ctx, card, refresh)
    data = {"disabled": id}
    after_change(ctx, card, data)
    return data
