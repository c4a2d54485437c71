"""esim-agent command line: the field technician's tool.

Output: readable tables, or with ``--json`` exactly one JSON document on
stdout: ``{"ok": true, "data": {...}}`` or ``{"ok": false, "error": {"code", "message"}}``.
Exit codes: 0 done, 1 the card or a server refused, 2 bad usage or input,
3 modem/transport failure or time-out.

Imports are lazy on purpose: ``chip info`` against ``--sim`` must start in
well under 0.3 s, so nothing heavy (serial, requests, cryptography) is
imported unless the command needs it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .errors import AgentError, UsageError

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting,
    so ``--json`` callers still get one JSON document."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# --------------------------------------------------------------------------- output

class Output:
    def __init__(self, as_json: bool):
        self.json = as_json

    def ok(self, data: dict, text: str | Callable[[], str] | None = None) -> None:
        if self.json:
            print(json.dumps({"ok": True, "data": data}, indent=None, default=_json_default))
        elif text is not None:
            print(text() if callable(text) else text)

    def error(self, err: AgentError) -> None:
        if self.json:
            print(json.dumps({"ok": False, "error": err.to_json()}, default=_json_default))
        else:
            print(f"error: {err.message}", file=sys.stderr)

    def info(self, msg: str) -> None:
        """Progress for people; never on stdout with --json."""
        if not self.json:
            print(msg, file=sys.stderr)


def _json_default(o: Any):
    if isinstance(o, bytes):
        return o.hex().upper()
    if hasattr(o, "to_json"):
        return o.to_json()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------- card access

@dataclass
class Settings:
    timeout: float
    long_timeout: float
    segment_size: int
    baud: int
    aids: list[bytes]


def _pick(cli_value, cfg_value):
    return cli_value if cli_value is not None else cfg_value


def settings(args) -> Settings:
    """Command line over config file, validated once (bad values are usage errors, exit 2)."""
    from .apdu import ISDR_AID, MAX_SEGMENT
    cfg = args.config
    timeout = _pick(args.timeout, cfg.timeout)
    long_timeout = _pick(args.long_timeout, cfg.long_timeout)
    for name, v in (("--timeout", timeout), ("--long-timeout", long_timeout)):
        if not isinstance(v, (int, float)) or not 0 < v <= 3600:
            raise UsageError(f"{name} must be a number of seconds above 0 (at most 3600), not {v!r}",
                             code="bad_timeout")
    seg = _pick(args.segment_size, cfg.segment_size)
    if not isinstance(seg, int) or not 1 <= seg <= MAX_SEGMENT:
        raise UsageError(f"--segment-size must be 1..{MAX_SEGMENT} bytes (STORE DATA Lc), not {seg!r}",
                         code="bad_segment_size")
    baud = _pick(args.baud, cfg.baud)
    if not isinstance(baud, int) or baud <= 0:
        raise UsageError(f"--baud must be a positive number, not {baud!r}", code="bad_baud")
    aids = []
    for a in (args.aid or cfg.aids or []):
        a = str(a).strip().replace(" ", "")
        try:
            b = bytes.fromhex(a)
        except ValueError:
            b = b""
        if not 5 <= len(b) <= 16:
            raise UsageError(f"--aid {a!r} is not an AID (5 to 16 bytes of hex, e.g. {ISDR_AID.hex().upper()})",
                             code="bad_aid")
        aids.append(b)
    return Settings(float(timeout), float(long_timeout), seg, baud, aids or [ISDR_AID])


@contextlib.contextmanager
def open_transport(args):
    """The APDU transport selected by --device / --sim."""
    if args.sim and args.device:
        raise UsageError("use either --device (a modem's AT port) or --sim (simulated eUICC), not both")
    trace = _tracer(args) if args.trace else None
    if args.sim:
        from .sim.euicc import SimEuicc
        from .transport.direct import DirectTransport
        card = SimEuicc.open(args.sim)
        t = DirectTransport(card, trace=trace)
    else:
        device = args.device or args.config.device
        if not device:
            raise UsageError("no modem given: pass --device /dev/ttyUSBx (the modem's AT port) "
                             "or --sim STATEFILE for the simulated eUICC", code="no_device")
        from .transport.open import open_transport as _open
        st = settings(args)
        t = _open(device, transport=args.transport or args.config.transport, timeout=st.timeout,
                  long_timeout=st.long_timeout, quirks=dict(args.config.quirks) or None, trace=trace, baud=st.baud)
    try:
        yield t
    finally:
        t.close()


@contextlib.contextmanager
def open_es10(args):
    """Transport → ISD-R session → ES10 client; the channel is always closed."""
    from .apdu import Isdr
    from .es10 import Es10
    st = settings(args)
    with open_transport(args) as t:
        isdr = Isdr(t, aids=st.aids, segment_size=st.segment_size, timeout=st.timeout)
        with isdr:
            es10 = Es10(isdr, long_timeout=st.long_timeout)
            es10.transport = t  # type: ignore[attr-defined] - the download flow reads the modem's IMEI
            yield es10


def _tracer(args):
    def trace(direction: str, data) -> None:
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).hex().upper()
        print(f"[trace] {direction} {data}", file=sys.stderr)
    return trace


# --------------------------------------------------------------------------- commands: chip

def cmd_chip_info(args, out: Output) -> int:
    with open_es10(args) as es10:
        eid = es10.get_eid()
        info2 = es10.get_euicc_info2()
        addrs = es10.get_configured_addresses()
        modem = _modem_info(es10)
    data = {
        "eid": eid,
        "euicc_info2": info2.to_json(),
        "configured_addresses": {"default_dp_address": addrs.default_dp_address,
                                 "root_ds_address": addrs.root_ds_address},
    }
    if modem is not None:
        data["modem"] = modem.to_json()

    def text() -> str:
        rows = [["EID", eid],
                ["Default SM-DP+", addrs.default_dp_address or "(none)"],
                ["Root SM-DS", addrs.root_ds_address or "(none)"],
                ["SVN", info2.svn], ["Profile version", info2.profile_version],
                ["Firmware", info2.firmware_version], ["Free NVM (bytes)", info2.free_nvm],
                *([["Modem", f"{modem.manufacturer or '?'} {modem.model or ''}".strip()],
                   ["IMEI", modem.imei], ["Active ICCID", modem.iccid]] if modem else []),
                ["Category", info2.euicc_category],
                ["CI keys (verify)", ", ".join(info2.ci_pkids_for_verification)],
                ["CI keys (sign)", ", ".join(info2.ci_pkids_for_signing)]]
        return "\n".join(f"{k + ':':<18} {'' if v is None else v}" for k, v in rows)
    out.ok(data, text)
    return 0


def cmd_chip_set_default_dp(args, out: Output) -> int:
    from .ac import validate_address
    addr = validate_address(args.address) if args.address else ""
    with open_es10(args) as es10:
        es10.set_default_dp_address(addr)
    out.ok({"default_dp_address": addr or None}, f"default SM-DP+ address set to {addr or '(none)'}")
    return 0


def cmd_chip_reset(args, out: Output) -> int:
    if not args.yes:
        raise UsageError("eUICC memory reset deletes all operational and test profiles; "
                         "repeat with --yes to confirm", code="confirmation_required")
    with open_es10(args) as es10:
        es10.memory_reset()
    out.ok({"reset": True}, "eUICC memory reset done")
    return 0


# --------------------------------------------------------------------------- commands: profile

def _profile_rows(profiles) -> str:
    if not profiles:
        return "no profiles installed"
    return table([[p.iccid, p.state, p.nickname or "", p.service_provider_name, p.profile_name, p.profile_class,
                   p.isdp_aid] for p in profiles],
                 ["ICCID", "STATE", "NICKNAME", "PROVIDER", "NAME", "CLASS", "ISD-P AID"])


def cmd_profile_list(args, out: Output) -> int:
    with open_es10(args) as es10:
        profiles = es10.get_profiles_info()
    out.ok({"profiles": [p.to_json() for p in profiles]}, lambda: _profile_rows(profiles))
    return 0


def _after_change(args, out: Output, es10, data: dict, eid: str | None = None) -> None:
    """Send the notifications an operation caused (issue #3 item 5). The operation
    itself has succeeded: delivery failures are reported, kept in the outbox and
    left on the card for `notification process`, never raised."""
    if getattr(args, "no_notifications", False) or not args.config.process_notifications:
        return
    try:
        data["notifications"] = [d.to_json() for d in _process_notifications(args, es10, None, eid=eid)]
    except AgentError as e:
        data["notifications_error"] = e.to_json()
        out.info(f"warning: notifications not processed: {e.message}")
        return
    failed = [d for d in data["notifications"] if d["status"] == "failed"]
    by_cause: dict[str, list[int]] = {}
    for d in failed:
        by_cause.setdefault(d["error"]["message"], []).append(d["seq_number"])
    for msg, seqs in by_cause.items():
        out.info(f"warning: notification(s) {', '.join(map(str, seqs))} not sent: {msg}\n"
                 "  They stay pending on the eUICC and in the outbox; send them later with "
                 "`esim-agent notification process`.")


def _process_notifications(args, es10, seqs, *, eid: str | None = None):
    from .flows.notifications import ClientPool, process
    eid = eid or es10.get_eid()
    pool = ClientPool(ca=getattr(args, "ca", None), config_ca=args.config.ca_bundle,
                      insecure_http=getattr(args, "insecure_http", False))
    try:
        with _outbox(args) as outbox:
            return process(es10, outbox, pool, eid=eid, seqs=seqs)
    finally:
        pool.close()


def cmd_profile_enable(args, out: Output) -> int:
    return _switch(args, out, "enable")


def cmd_profile_disable(args, out: Output) -> int:
    return _switch(args, out, "disable")


def _switch(args, out: Output, action: str) -> int:
    """EnableProfile / DisableProfile, then the notifications they caused."""
    refresh = not args.no_refresh and args.config.refresh
    with open_es10(args) as es10:
        call = es10.enable_profile if action == "enable" else es10.disable_profile
        call(args.id, refresh=refresh)
        data = {f"{action}d": args.id}
        if refresh and not (getattr(args, "no_notifications", False) or not args.config.process_notifications):
            # The card resets itself (REFRESH): talk to it on a fresh channel. The switch
            # itself has succeeded whatever happens here.
            try:
                es10.ch.reopen()
            except AgentError as e:
                data["notifications_error"] = e.to_json()
                out.info(f"warning: {e.message}; the notifications stay pending for `notification process`")
                out.ok(data, f"profile {args.id} {action}d")
                return 0
        _after_change(args, out, es10, data)
    out.ok(data, f"profile {args.id} {action}d")
    return 0


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{prompt} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_profile_delete(args, out: Output) -> int:
    from .es10 import profile_identifier
    profile_identifier(args.id)  # validate before touching the card
    if not args.yes:
        if out.json or not _confirm(f"Delete profile {args.id}? This cannot be undone."):
            raise UsageError(f"not deleting {args.id}: confirm with --yes", code="confirmation_required")
    with open_es10(args) as es10:
        es10.delete_profile(args.id)
        data = {"deleted": args.id}
        _after_change(args, out, es10, data)
    out.ok(data, f"profile {args.id} deleted")
    return 0


def cmd_profile_nickname(args, out: Output) -> int:
    with open_es10(args) as es10:
        es10.set_nickname(args.iccid, args.name)
    out.ok({"iccid": args.iccid, "nickname": args.name}, f"nickname of {args.iccid} set to {args.name!r}")
    return 0


# --------------------------------------------------------------------------- commands: notification

def cmd_notification_list(args, out: Output) -> int:
    with open_es10(args) as es10:
        notes = es10.list_notifications()
        on_card = {n.seq_number for n in notes}
        # Undelivered results the card no longer holds (removed with `notification remove`
        # or by another tool) are still in the outbox and still get delivered.
        kept = [n for n in _outbox_pending(args, es10) if n.seq_number not in on_card]
    rows = [[n.seq_number, n.operation, n.address, n.iccid, "eUICC"] for n in notes]
    rows += [[n.seq_number, n.operation, n.address, n.iccid, "outbox"] for n in kept]
    out.ok({"notifications": [n.to_json() for n in notes],
            "outbox_only": [{"seq_number": n.seq_number, "operation": n.operation, "address": n.address,
                             "iccid": n.iccid} for n in kept]},
           lambda: table(rows, ["SEQ", "OPERATION", "ADDRESS", "ICCID", "HELD IN"]) if rows
           else "no pending notifications")
    return 0


def _outbox_path(args):
    """The notification outbox: <state dir>/esim-agent.db, the state dir from
    $ESIM_AGENT_STATE_DIR, the config's state_dir, /var/lib/esim-agent or ~/.local/state."""
    from . import config
    from .store import DB_NAME
    return config.state_dir(args.config) / DB_NAME


def _outbox(args):
    from .store import Outbox
    return Outbox(_outbox_path(args))


def _outbox_pending(args, es10) -> list:
    """Pending outbox entries of this eUICC; nothing (and no file created) without an outbox."""
    if not _outbox_path(args).exists():
        return []
    with _outbox(args) as ob:
        return ob.pending(es10.get_eid())


def cmd_notification_remove(args, out: Output) -> int:
    """Remove notifications from the eUICC (e.g. to free its list) without losing them:
    each one is recorded in the outbox first and `notification process` still delivers it."""
    if not args.all and not args.seq:
        raise UsageError("give the sequence number(s) to remove, or --all")
    removed, missing, kept_back = [], [], []
    with open_es10(args) as es10:
        held = {p.seq_number: p for p in es10.retrieve_notifications()}
        seqs = sorted(held) if args.all else args.seq
        eid = es10.get_eid() if any(s in held for s in seqs) else None
        with contextlib.ExitStack() as stack:
            ob = stack.enter_context(_outbox(args)) if eid else None
            for seq in seqs:
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
        from .es10 import Es10Error
        raise Es10Error("RemoveNotificationFromList", "nothingToDelete", 1,
                        f"no notification with sequence number {', '.join(map(str, missing))}")
    out.ok({"removed": removed, "not_found": missing, "kept_in_outbox": removed},
           f"removed {len(removed)} notification(s) from the eUICC"
           + (f"; not found: {missing}" if missing else "")
           + ("; they stay in the outbox and `notification process` still delivers them" if removed else ""))
    return 0


def cmd_notification_process(args, out: Output) -> int:
    seqs = None if args.all or not args.seq else args.seq
    with open_es10(args) as es10:
        results = _process_notifications(args, es10, seqs)
    failed = [r for r in results if r.status == "failed"]
    rows = [[r.seq_number, r.operation, r.address, r.status,
             (r.error or {}).get("message", "")] for r in results]
    if failed and len(failed) == len(results):
        first = failed[0].error or {}
        raise AgentError(f"no notification delivered: {first.get('message', 'see details')}",
                         code=first.get("code", "notification_failed"),
                         details={"notifications": [r.to_json() for r in results]})
    out.ok({"notifications": [r.to_json() for r in results]},
           lambda: table(rows, ["SEQ", "OPERATION", "ADDRESS", "STATUS", "ERROR"]) if rows
           else "no pending notifications")
    return 1 if failed else 0


# --------------------------------------------------------------------------- commands: download

def _progress_printer(out: Output):
    if out.json or not sys.stderr.isatty():
        return None

    def show(step: str, done: int, total: int) -> None:
        extra = f" {done}/{total} bytes" if total else ""
        sys.stderr.write(f"\r\x1b[K{step}{extra}")
        if step == "installed":
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def cmd_profile_download(args, out: Output) -> int:
    from .ac import read_activation_code, validate_address
    from .flows.download import DownloadError, DownloadOptions, Downloader
    ac = None
    if args.ac is not None or args.ac_file:
        if args.smdp:
            raise UsageError("give either an activation code or --smdp, not both")
        ac = read_activation_code(args.ac, args.ac_file, sys.stdin)
    if args.matching_id is not None and not args.smdp:
        raise UsageError("--matching-id goes with --smdp (an activation code already carries one)")
    interactive = sys.stdin.isatty() and not out.json
    if not args.yes and not interactive:
        raise UsageError("downloading needs your consent to the profile: pass --yes (no terminal to ask on)",
                         code="consent_required")
    if args.imei is not None:
        from .ids import imei_to_bytes
        imei_to_bytes(args.imei)   # a bad --imei is a usage error before anything starts
    if ac and ac.cc_required and not args.confirmation_code and not interactive:
        raise UsageError("this activation code says a confirmation code is required: pass --confirmation-code",
                         code="confirmation_code_required")

    def consent(meta) -> bool:
        if args.yes:
            return True
        print(f"Profile: {meta.profile_name or '?'} from {meta.service_provider_name or '?'} "
              f"(ICCID {meta.iccid}, class {meta.profile_class})", file=sys.stderr)
        return _confirm("Download and install it?")

    def ask_cc() -> str | None:
        if not interactive:
            return None
        import getpass
        return getpass.getpass("Confirmation code: ").strip() or None

    from .flows.notifications import ClientPool
    with open_es10(args) as es10:
        if ac:
            address, mid = ac.address, ac.matching_id
        elif args.smdp:
            address, mid = validate_address(args.smdp), args.matching_id or ""
        else:
            addrs = es10.get_configured_addresses()
            if not addrs.default_dp_address:
                raise UsageError("no activation code given and the eUICC has no default SM-DP+ address; pass "
                                 "an activation code, --smdp, or set one with `chip set-default-dp`",
                                 code="no_default_smdp")
            address, mid = addrs.default_dp_address, ""   # default SM-DP+: empty matching ID (SGP.22 §3.1.2)
        imei = args.imei or _modem_imei(es10)
        eid = es10.get_eid()
        pool = ClientPool(ca=args.ca, config_ca=args.config.ca_bundle, insecure_http=args.insecure_http)
        try:
            es9 = pool(address)   # trust is narrowed to the eUICC's CIs in initiateAuthentication
            opts = DownloadOptions(address=address, matching_id=mid, confirmation_code=args.confirmation_code,
                                   imei=imei, consent=consent, ask_confirmation_code=ask_cc,
                                   smdp_oid=ac.oid if ac else None,
                                   progress=_progress_printer(out),
                                   long_timeout=settings(args).long_timeout)
            out.info(f"downloading from {address}" + (f" (matching ID {mid})" if mid else " (default SM-DP+)"))
            try:
                res = Downloader(es10, es9, opts).run()
            except DownloadError as e:
                # A refused package leaves a signed error result for the SM-DP+: send it too.
                if e.details.get("notification_seq") is not None:
                    e.details["notifications"] = [d.to_json() for d in _safe_process(args, es10, eid)]
                raise
            data = {"profile": (res.profile.to_json() if res.profile else {"iccid": res.iccid,
                                                                           "isdp_aid": res.isdp_aid}),
                    "smdp_address": address, "transaction_id": res.transaction_id,
                    "bytes_loaded": res.apdu_bytes_loaded}
            _after_change(args, out, es10, data, eid=eid)
        finally:
            pool.close()
    sent = [n for n in data.get("notifications", []) if n["status"] == "delivered"]
    out.ok(data, f"installed profile {res.iccid} ({res.metadata.profile_name or 'no name'}, "
                 f"{res.metadata.service_provider_name or 'no provider'}); "
                 f"{len(sent)} notification(s) sent")
    return 0


def _safe_process(args, es10, eid):
    if getattr(args, "no_notifications", False) or not args.config.process_notifications:
        return []
    try:
        return _process_notifications(args, es10, None, eid=eid)
    except AgentError:
        return []


def _modem_info(es10):
    """IMEI, active ICCID, make and model from the modem (None for the in-process simulator)."""
    info = getattr(getattr(es10, "transport", None), "modem_info", None)
    if info is None:
        return None
    try:
        return info()
    except AgentError:
        return None


def _modem_imei(es10) -> str | None:
    """The modem's IMEI for DeviceInfo, or None (with a warning) when it is not a usable IMEI."""
    from .ids import imei_to_bytes
    m = _modem_info(es10)
    if not m or not m.imei:
        return None
    try:
        imei_to_bytes(m.imei)
    except AgentError:
        logging.getLogger(__name__).warning("the modem's IMEI %r is not usable; DeviceInfo goes without it", m.imei)
        return None
    return m.imei


# --------------------------------------------------------------------------- parser

def _add_global_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Options valid anywhere on the line (`esim-agent profile list --json` works too).

    On sub-commands they default to SUPPRESS so they only override the top level's."""
    kw = {"default": argparse.SUPPRESS} if suppress else {}
    own = p._option_string_actions

    def add(group, *flags, **k):
        if any(f in own for f in flags):   # the sub-command has its own meaning for it (e.g. bench --baud)
            return
        group.add_argument(*flags, **{**k, **kw})
    g = p.add_argument_group("card access")
    add(g, "--device", metavar="PATH", help="the modem's AT port, e.g. /dev/ttyUSB2")
    add(g, "--sim", metavar="STATEFILE", help="use a simulated eUICC in-process (no modem)")
    add(g, "--transport", choices=["auto", "csim", "cgla"], help="how APDUs travel over AT (default auto)")
    add(g, "--aid", action="append", metavar="HEX", help="ISD-R AID to try (repeatable, in order)")
    add(g, "--timeout", type=float, metavar="S", help="deadline per AT command / APDU (default 10)")
    add(g, "--long-timeout", type=float, metavar="S", help="deadline for profile loading, enable, delete (default 300)")
    add(g, "--baud", type=int, help="serial line speed for UART ports (default 115200)")
    add(g, "--segment-size", type=int, metavar="N", help="STORE DATA block size, 1..255 (default 120)")
    add(g, "--config", metavar="FILE", dest="config_path", help="TOML config (default /etc/esim-agent/agent.toml)")
    o = p.add_argument_group("output")
    add(o, "--json", action="store_true", help="one JSON document on stdout")
    add(o, "-v", "--verbose", action="count", **({} if suppress else {"default": 0}))
    add(o, "--trace", action="store_true", help="print every AT line and APDU to stderr")


def _leaves(p: argparse.ArgumentParser):
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield p
    for a in subs:
        for child in dict.fromkeys(a.choices.values()):
            yield from _leaves(child)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="esim-agent", description="Device-side eSIM agent: the SGP.22 LPA over a modem's AT port, with a simulated test bed.")
    _add_global_options(p)

    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    chip = sub.add_parser("chip", help="the eUICC itself").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    chip.required = True
    chip.add_parser("info", help="EID, EUICCInfo2, configured addresses").set_defaults(func=cmd_chip_info)
    c = chip.add_parser("set-default-dp", help="set the default SM-DP+ address ('' clears it)")
    c.add_argument("address")
    c.set_defaults(func=cmd_chip_set_default_dp)
    c = chip.add_parser("reset", help="eUICC memory reset (deletes profiles)")
    c.add_argument("--yes", action="store_true")
    c.set_defaults(func=cmd_chip_reset)

    prof = sub.add_parser("profile", help="installed profiles").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    prof.required = True
    prof.add_parser("list", help="list installed profiles").set_defaults(func=cmd_profile_list)
    for name, func, helptext in (("enable", cmd_profile_enable, "enable a profile (disables the current one)"),
                                 ("disable", cmd_profile_disable, "disable a profile")):
        c = prof.add_parser(name, help=helptext)
        c.add_argument("id", metavar="ICCID|AID")
        c.add_argument("--no-refresh", action="store_true", help="refreshFlag=0: the modem resets the SIM itself")
        c.add_argument("--no-notifications", action="store_true", help="leave the notifications pending")
        _server_args(c)
        c.set_defaults(func=func)
    c = prof.add_parser("delete", help="delete a disabled profile")
    c.add_argument("id", metavar="ICCID|AID")
    c.add_argument("--yes", action="store_true", help="do not ask")
    c.add_argument("--no-notifications", action="store_true", help="leave the notifications pending")
    _server_args(c)
    c.set_defaults(func=cmd_profile_delete)
    c = prof.add_parser("nickname", help="set a profile's nickname")
    c.add_argument("iccid")
    c.add_argument("name")
    c.set_defaults(func=cmd_profile_nickname)
    _add_download_parser(prof)

    notif = sub.add_parser("notification", help="pending notifications").add_subparsers(dest="sub", metavar="ACTION", parser_class=_Parser)
    notif.required = True
    notif.add_parser("list", help="list pending notifications").set_defaults(func=cmd_notification_list)
    c = notif.add_parser("remove", help="remove notifications from the eUICC without sending them")
    c.add_argument("seq", nargs="*", type=int)
    c.add_argument("--all", action="store_true")
    c.set_defaults(func=cmd_notification_remove)
    _add_notification_process_parser(notif)

    _add_sim_parsers(sub)
    _add_bench_parsers(sub)
    _add_demo_parser(sub)
    for leaf in _leaves(p):
        if leaf is not p:
            _add_global_options(leaf, suppress=True)
    return p


def _server_args(p) -> None:
    p.add_argument("--ca", metavar="FILE", help="trusted CI certificate(s) for the servers' TLS (PEM or DER)")
    p.add_argument("--insecure-http", action="store_true", help="plain HTTP, for test servers only")


def _add_download_parser(prof) -> None:
    c = prof.add_parser("download", help="download and install a profile (activation code or default SM-DP+)")
    c.add_argument("ac", nargs="?", metavar="AC", help="activation code LPA:1$ADDRESS$MATCHING_ID (quote it!)")
    c.add_argument("--ac-file", metavar="FILE", help="read the activation code from FILE ('-' = stdin)")
    c.add_argument("--smdp", metavar="ADDRESS", help="SM-DP+ address (instead of an activation code)")
    c.add_argument("--matching-id", metavar="ID", help="matching ID to use with --smdp")
    c.add_argument("--confirmation-code", metavar="CC", help="confirmation code, when the operator requires one")
    c.add_argument("--imei", help="IMEI to report (default: read from the modem with AT+CGSN)")
    c.add_argument("--yes", action="store_true", help="accept the profile without asking")
    c.add_argument("--no-notifications", action="store_true", help="leave the install notification pending")
    _server_args(c)
    c.set_defaults(func=cmd_profile_download)


def _add_notification_process_parser(notif) -> None:
    c = notif.add_parser("process", help="send pending notifications, then remove them from the eUICC")
    c.add_argument("seq", nargs="*", type=int)
    c.add_argument("--all", action="store_true", help="all pending notifications (the default)")
    _server_args(c)
    c.set_defaults(func=cmd_notification_process)


def _add_sim_parsers(sub) -> None:
    from .sim import cli as sim_cli
    sim_cli.add_parsers(sub)


def _add_bench_parsers(sub) -> None:
    from . import bench
    bench.add_parsers(sub)


def _add_demo_parser(sub) -> None:
    from . import demo
    demo.add_parser(sub)


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP (systemctl stop, a service time-out): handled like Ctrl-C, so the
    logical channel is closed, the modem restored and a download session cancelled."""


def _on_terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    out = Output(as_json)
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _on_terminate)
    except ValueError:          # not the main thread (embedded use): leave signals alone
        previous = {}
    verbose = 0
    try:
        args = build_parser().parse_args(argv)
        out = Output(args.json)
        verbose = args.verbose
        logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        from . import config
        args.config = config.load(args.config_path)
        rc = args.func(args, out)
        return rc or 0
    except AgentError as e:
        out.error(e)
        return e.exit_code
    except Terminated:
        out.error(AgentError("terminated by a signal; the logical channel was closed", code="terminated"))
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        out.error(AgentError("interrupted; the logical channel was closed", code="interrupted"))
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): stop writing, and keep Python quiet at exit.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: still one JSON document and a clear message
        if verbose:
            import traceback
            traceback.print_exc()
        out.error(AgentError(f"internal error: {type(e).__name__}: {e} (a bug in esim-agent; run with -v for "
                             "the traceback and report it)", code="internal_error"))
        return 1
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    sys.exit(main())
