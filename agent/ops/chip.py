"""The eUICC itself: identity and configuration (SGP.22 §5.7.8-§5.7.10, §5.7.19-§5.7.20)."""
from __future__ import annotations

from ..errors import UsageError
from .card import Card


def info(ctx, card: Card) -> dict:
    es10 = card.es10
    eid = card.eid
    info2 = es10.get_euicc_info2()
    addrs = es10.get_configured_addresses()
    modem = card.modem_info()
    data = {
        "eid": eid,
        "euicc_info2": info2.to_json(),
        "configured_addresses": {"default_dp_address": addrs.default_dp_address,
                                 "root_ds_address": addrs.root_ds_address},
    }
    if modem is not None:
        data["modem"] = modem.to_json()
    return data


def set_default_dp(ctx, card: Card, address: str = "") -> dict:
    from ..ac import validate_address
    addr = validate_address(address) if address else ""
    card.es10.set_default_dp_address(addr)
    return {"default_dp_address": addr or None}


def reset(ctx, card: Card, yes: bool = False) -> dict:
    if not yes:
        raise UsageError("eUICC memory reset deletes all operational and test profiles; "
                         "repeat with --yes to confirm", code="confirmation_required")
    ctx.steps.step("reset")
    card.es10.memory_reset()
    return {"reset": True}
