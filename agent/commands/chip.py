"""`esim-agent chip`: the eUICC itself (info, default SM-DP+ address, memory reset)."""
from __future__ import annotations

from ..cli import Output, _Parser, execute, socket_command
from ..errors import UsageError


def add_parsers(sub) -> None:
    chip = sub.add_parser("chip", help="the eUICC itself").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    chip.required = True
    chip.add_parser("info", help="EID, EUICCInfo2, configured addresses").set_defaults(func=cmd_chip_info)
    c = chip.add_parser("set-default-dp", help="set the default SM-DP+ address ('' clears it)")
    c.add_argument("address")
    c.set_defaults(func=cmd_chip_set_default_dp)
    c = chip.add_parser("reset", help="eUICC memory reset (deletes profiles)")
    c.add_argument("--yes", action="store_true")
    c.set_defaults(func=cmd_chip_reset)


@socket_command
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


@socket_command
def cmd_chip_set_default_dp(args, out: Output) -> int:
    from ..ac import validate_address
    address = args.address.strip()              # '' clears the address
    if address:
        address = validate_address(address)     # bad input fails before the card or the daemon is asked
    data = execute(args, out, "chip.set_default_dp", {"address": address})
    out.ok(data, f"default SM-DP+ address set to {data['default_dp_address'] or '(none)'}")
    return 0


@socket_command
def cmd_chip_reset(args, out: Output) -> int:
    if not args.yes:
        raise UsageError("eUICC memory reset deletes all operational and test profiles; "
                         "repeat with --yes to confirm", code="confirmation_required")
    data = execute(args, out, "chip.reset", {"yes": True})
    out.ok(data, "eUICC memory reset done")
    return 0
