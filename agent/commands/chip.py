"""`esim-agent chip`: the eUICC itself (info, default SM-DP+ address, memory reset)."""
from __future__ import annotations

from ..cli import Output, _Parser, execute, socket_command
from ..errors import UsageError
from ..render import chip_info_text


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
    out.ok(data, lambda: chip_info_text(data))
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
