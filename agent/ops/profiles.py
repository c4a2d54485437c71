"""Profile management that is not a switch: list, delete, nickname (SGP.22 §5.7.15-§5.7.21)."""
from __future__ import annotations

from .card import Card
from .notifications import after_change


def list_profiles(ctx, card: Card) -> dict:
    return {"profiles": [p.to_json() for p in card.es10.get_profiles_info()]}


def find_profile(card: Card, ident: str):
    """The ProfileInfo for an ICCID or ISD-P AID argument, or None."""
    from ..es10 import canonical_profile_id, profile_identifier
    kind, _ = profile_identifier(ident)
    want = canonical_profile_id(ident)
    for p in card.es10.get_profiles_info():
        if kind == "iccid" and p.iccid and p.iccid.upper().rstrip("F") == want:
            return p
        if kind == "isdpAid" and p.isdp_aid and p.isdp_aid.upper() == want:
            return p
    return None


def enabled_profile(card: Card):
    return next((p for p in card.es10.get_profiles_info() if p.state == "enabled"), None)


def delete(ctx, card: Card, id: str, yes: bool = False) -> dict:  # noqa: A002
    from ..errors import UsageError
    from ..es10 import canonical_profile_id
    id = canonical_profile_id(id)  # noqa: A001 - validated before touching the card; shown back normalised
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


def nickname(ctx, card: Card, iccid: str, name: str | None = None, clear: bool = False) -> dict:
    """Set a profile's nickname; ``clear`` removes it (SetNickname with an empty name). The
    name is checked and normalised here (es10.nickname_value): one line of printable text, at
    most 64 characters, surrounding whitespace dropped; an empty name is refused unless ``clear``."""
    from ..errors import UsageError
    from ..es10 import nickname_value
    from ..ids import parse_iccid
    iccid = parse_iccid(iccid)
    if clear and name:
        raise UsageError("give either a nickname or clear, not both")
    name = "" if clear else nickname_value(name if name is not None else "")
    card.es10.set_nickname(iccid, name)
    return {"iccid": iccid, "nickname": name or None}
