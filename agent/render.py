"""What commands print for people (the text beside ``--json``'s document): tables and the
readable forms of command results, shared by the command modules and the CLI's quick path
(quick.py), which prints a daemon's answer without importing the command modules.

Only the standard library at import (unicodedata when a value is not plain ASCII)."""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


#: Widest a table column gets (the last one may take more: nothing follows it to misalign).
TABLE_COLUMN_MAX = 40
TABLE_LAST_COLUMN_MAX = 80


def table(rows: list[list[Any]], headers: list[str], *, max_width: int = TABLE_COLUMN_MAX,
          last_max_width: int = TABLE_LAST_COLUMN_MAX) -> str:
    """Rows under headers, columns two spaces apart: no trailing spaces, each column at most
    ``max_width`` characters on screen (longer values end with "…"), control characters in a
    value (a nickname set by another LPA) shown escaped so one value cannot break the table."""
    cells = [[_cell("" if c is None else str(c)) for c in r] for r in rows]
    limits = [last_max_width if i == len(headers) - 1 else max_width for i in range(len(headers))]
    cells = [[_clip(c, limits[i]) for i, c in enumerate(r)] for r in cells]
    widths = [max([_width(h)] + [_width(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values) -> str:
        return "  ".join(v + " " * (w - _width(v)) for v, w in zip(values, widths)).rstrip()
    lines = [line(headers), line(["-" * w for w in widths])]
    lines += [line(r) for r in cells]
    return "\n".join(lines)


def _cell(text: str) -> str:
    import unicodedata
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or unicodedata.category(ch) == "Mn" else repr(ch)[1:-1]
                   for ch in text)


def _width(text: str) -> int:
    """Columns on a terminal: wide (East Asian) characters take two, combining marks none."""
    import unicodedata
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _clip(text: str, limit: int) -> str:
    if _width(text) <= limit:
        return text
    out, w = [], 0
    for ch in text:
        cw = _width(ch)
        if w + cw > limit - 1:
            break
        out.append(ch)
        w += cw
    return "".join(out) + "…"


def chip_info_text(data: dict) -> str:
    """`chip info` for people: one labelled line per fact."""
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


def profile_rows(profiles: list[dict]) -> str:
    """`profile list` for people: one row per profile."""
    if not profiles:
        return "no profiles installed"
    return table([[p.get("iccid"), p.get("state"), p.get("nickname") or "", p.get("service_provider_name"),
                   p.get("profile_name"), p.get("profile_class"), p.get("isdp_aid")] for p in profiles],
                 ["ICCID", "STATE", "NICKNAME", "PROVIDER", "NAME", "CLASS", "ISD-P AID"])
