"""Profile management that is not a switch: list, delete, nickname (SGP.22 §5.7.15-§5.7.21)."""
from __future__ import annotations

from .card import Card
from .notifications import after_change


def list_profiles(ctx, card: Card) -> dict:
    return {"profiles": [p.to_json() for p in card.es10.get_profiles_info()]}


def find_profile(card: Card, ident: str):
    """The ProfileInfo for an ICCID or ISD-P AID argument, or None."""
    from ..es10 import profile_identifier
    kind, value = profile_identifier(ident)
    for p in card.es10.get_profiles_info():
        if kind == "iccid" and p.iccid and p.iccid.upper().rstrip("F") == _iccid_digits(ident):
            return p
        if kind == "isdpAid" and p.isdp_aid and p.isdp_aid.upper() == value.hex().upper():
            return p
    return None


def _iccid_digits(ident: str) -> str:
    s = ident.strip().replace(" ", "").upper()
    return s.rstrip("F")


def enabled_profile(card: Card):
    return next((p for p in card.es10.get_profiles_info() if p.state == "enabled"), None)


def delete(ctx, card: Card, id: str, yes: bool = False) -> dict:  # noqa: A002
    from ..errors import UsageError
    from ..es10 import profile_identifier
    profile_identifier(id)  # validate before touching the card
    if not yes:
        raise UsageError(f"not deleting {id}: confirm with --yes", code="confirmation_required")
    # After a restart in the middle: a delete that already took effect is not sent again.
    done = ctx.steps.seen("deleted") is not None or (
        ctx.steps.seen("delete") is not None and find_profile(card, id) is None)
    if not done:
        ctx.steps.step("delete", id=id)
        card.es10.delete_profile(id)
        ctx.steps.step("deleted", id=id)
    data = {"deleted": id}
    after_change(ctx, card, data)
    return data


def nickname(ctx, card: Card, iccid: str, name: str) -> dict:
    card.es10.set_nickname(iccid, name)
    return {"iccid": iccid, "nickname": name}
