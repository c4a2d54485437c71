"""Profile download as an operation (the flow itself: flows/download.py, SGP.22 §3.1.3),
and `sync`: asking the default SM-DP+ whether a profile waits for this eUICC.

Where the address comes from (SGP.22 §3.1.2, §4.1): an activation code, an
explicit SM-DP+ address (+ matching ID), or the eUICC's default SM-DP+
address with an empty matching ID (the "reserve for this EID" flow of
operator back-ends such as Twilio Super SIM).
"""
from __future__ import annotations

from functools import partial

from ..errors import AgentError, UsageError
from . import DECODING, TABLES
from .card import Card
from ..logs import get_logger

log = get_logger(__name__)


#: What sending the install result needs (the outbox, then ES9+ handleNotification), imported
#: while the package loads.
AFTER_INSTALL = ("agent.ops.notifications", "agent.store", "agent.flows.notifications")
#: What a download needs once the card has AuthenticateServer and not before (the card's answer is
#: the first thing decoded with the ASN.1 tables), loaded while the card runs it: ~0.4 s of line
#: at 115200 baud, against ~25 ms of loading that would otherwise hold up the first ES9+ call.
AFTER_AUTHENTICATE = DECODING + ("agent.bpp",)


class NothingWaiting(AgentError):
    """The SM-DP+ has no profile for this eUICC (ES9+ 8.2.5 / 4.3): a normal answer."""

    code = "nothing_waiting"
    exit_code = 1


def resolve(card: Card, activation_code: str | None = None, smdp: str | None = None,
            matching_id: str | None = None, default_smdp: str | None = None):
    """(address, matching ID, SM-DP+ OID or None, ac) for a download."""
    from ..ac import parse_activation_code, validate_address, validate_matching_id
    if activation_code is not None:
        if smdp:
            raise UsageError("give either an activation code or --smdp, not both")
        ac = parse_activation_code(activation_code)
        return ac.address, ac.matching_id, ac.oid, ac
    if matching_id is not None and not smdp:
        raise UsageError("--matching-id goes with --smdp (an activation code already carries one)")
    if smdp:
        return validate_address(smdp), validate_matching_id(matching_id or ""), None, None
    if not default_smdp:
        card.while_waiting(TABLES)          # the addresses are decoded with them
    addr = default_smdp or card.es10.get_configured_addresses().default_dp_address
    if not addr:
        raise UsageError("no activation code given and the eUICC has no default SM-DP+ address; pass "
                         "an activation code, --smdp, or set one with `chip set-default-dp`",
                         code="no_default_smdp")
    # Default SM-DP+: empty matching ID (SGP.22 §3.1.2).
    return validate_address(addr), "", None, None


def download(ctx, card: Card, activation_code: str | None = None, smdp: str | None = None,
             matching_id: str | None = None, confirmation_code: str | None = None, imei: str | None = None,
             yes: bool = False, default_smdp: str | None = None) -> dict:
    from ..flows.download import DownloadError, DownloadOptions, Downloader
    address, mid, oid, ac = resolve(card, activation_code, smdp, matching_id, default_smdp)
    if imei is not None:
        from ..ids import normalise_imei
        imei = normalise_imei(imei)       # a bad IMEI is an input error before anything starts
    if ac is not None and ac.cc_required and not confirmation_code and ctx.ask_confirmation_code is None:
        raise UsageError("this activation code says a confirmation code is required: pass --confirmation-code",
                         code="confirmation_code_required")
    if not yes and ctx.consent is None:
        raise UsageError("downloading needs your consent to the profile: pass --yes (no terminal to ask on)",
                         code="consent_required")

    # A job resumed after a restart: the earlier attempt may have installed the profile already.
    earlier = ctx.steps.seen("metadata")
    if earlier is not None:
        from .profiles import find_profile
        p = find_profile(card, earlier["iccid"])
        if p is not None:
            data = {"profile": p.to_json(), "smdp_address": address, "transaction_id": earlier.get("transaction_id"),
                    "resumed": True}
            from .notifications import after_change
            after_change(ctx, card, data)
            return data

    imei = imei or card.imei()
    pool = ctx.servers.pool()           # makes no client yet
    make_client = partial(pool, address)
    # The ES9+ client's set-up (trust store, TLS context) while the card answers the first ES10
    # calls, after the TLS stack's imports (the preload steps); else when the first call is due.
    card.while_waiting((make_client,))
    eid = card.eid
    loading = []

    def progress(step: str, done: int, total: int) -> None:
        # The package takes seconds on the line, mostly spent waiting for the modem: import what
        # delivering its install result needs meanwhile (agent/preload.py), not before the first
        # ES9+ call, where it would hold up the download.
        if step == "AuthenticateServer":
            card.while_waiting(AFTER_AUTHENTICATE)
        elif step == "loading profile" and not loading:
            loading.append(True)
            card.while_waiting(AFTER_INSTALL)
        if ctx.progress is not None:
            ctx.progress(step, done, total)
    try:
        opts = DownloadOptions(address=address, matching_id=mid, confirmation_code=confirmation_code, imei=imei,
                               consent=(lambda meta: True) if yes else ctx.consent,
                               ask_confirmation_code=ctx.ask_confirmation_code, smdp_oid=oid,
                               progress=progress, long_timeout=card.settings.long_timeout,
                               cancel=ctx.cancel, record=ctx.steps.step)
        ctx.steps.step("start", address=address, matching_id=mid)
        try:
            # trust is narrowed to the eUICC's CIs in initiateAuthentication
            res = Downloader(card.es10, None, opts, make_es9=make_client).run()
        except DownloadError as e:
            # A refused package leaves a signed error result for the SM-DP+: send it too.
            if e.details.get("notification_seq") is not None and ctx.notifications:
                from .notifications import deliver, server_answered
                server_answered(ctx, address)
                try:
                    e.details["notifications"] = [d.to_json() for d in deliver(ctx, card)]
                except AgentError:
                    pass
            raise
        data = {"profile": (res.profile.to_json() if res.profile else {"iccid": res.iccid,
                                                                       "isdp_aid": res.isdp_aid}),
                "smdp_address": address, "transaction_id": res.transaction_id,
                "bytes_loaded": res.apdu_bytes_loaded,
                "metadata": res.metadata.to_json()}
        ctx.steps.step("installed", iccid=res.iccid, transaction_id=res.transaction_id)
        from .notifications import after_change, server_answered
        server_answered(ctx, address)
        # The install result the card just returned is its pending install notification: sent as is.
        after_change(ctx, card, data, known={res.notification_seq: res.result_der}
                     if res.notification_seq is not None and res.result_der else None, pool=pool)
        del eid
        return data
    finally:
        pool.close()


def is_nothing_waiting(e: AgentError) -> bool:
    """ES9+ authenticateClient with no order for this EID: subject 8.2.5 (profile), reason 4.3
    (no eligible profile) in the SGP.22 status-code table (§5.6.2, §6.5.2.6). Also 8.2.6/3.8
    from servers that answer the empty matching ID that way."""
    d = getattr(e, "details", {}) or {}
    subj, reason = d.get("subject_code"), d.get("reason_code")
    return (subj, reason) in (("8.2.5", "4.3"),)


def sync(ctx, card: Card) -> dict:
    """Ask the default SM-DP+ (config ``default_smdp``, else the eUICC's) whether a profile
    is waiting; download it if so. "Nothing waiting" is a normal, quiet outcome."""
    from ..flows.download import DownloadError
    try:
        address, _, _, _ = resolve(card, default_smdp=ctx.default_smdp)
    except UsageError as e:
        if e.code == "no_default_smdp":
            return {"outcome": "no_default_smdp", "message": "no default SM-DP+ configured: nothing to ask"}
        raise
    try:
        data = download(ctx, card, yes=True, default_smdp=address)
    except DownloadError as e:
        if is_nothing_waiting(e):
            log.info("sync: nothing waiting at %s", address)
            return {"outcome": "nothing_waiting", "smdp_address": address}
        raise
    data["outcome"] = "installed"
    if ctx.auto_enable:
        import dataclasses

        from .switch import enable
        iccid = data["profile"]["iccid"]
        data["enable"] = enable(dataclasses.replace(ctx, steps=ctx.steps.child("enable")), card, iccid)
        data["outcome"] = "installed_and_enabled"
    return data
