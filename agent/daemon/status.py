"""`esim-agent status`: the daemon's view (through its socket), or what can be read
directly when no daemon answers."""
from __future__ import annotations

import logging

from ..errors import AgentError

log = logging.getLogger(__name__)


def local_status(args, *, card_settings_fn) -> dict:
    """No daemon: say so, and show what the card, the modem and the state dir tell."""
    from .. import config
    from .client import socket_path
    data: dict = {"daemon": None,
                  "daemon_message": f"no esim-agent daemon answers on {socket_path(args.config)}"}
    try:
        from ..ops.card import Card
        with Card(card_settings_fn(), cancel=args.cancel, read_only=True) as card:
            m = card.modem_info()
            data["modem"] = m.to_json() if m else None
            data["euicc"] = {"eid": card.eid, "free_nvm": card.es10.get_euicc_info2().free_nvm}
            profiles = [p.to_json() for p in card.es10.get_profiles_info()]
            data["profiles"] = profiles
            data["enabled_iccid"] = next((p["iccid"] for p in profiles if p["state"] == "enabled"), None)
            if card.at_port is not None:
                from ..network import query_registration
                reg = query_registration(card.at_port)
                data["registration"] = reg.to_json() if reg else None
            data["ipa"] = _local_ipa(args.config, card)
    except AgentError as e:
        data["card_error"] = e.to_json()
    sd = config.state_dir(args.config)
    from ..store import DB_NAME
    db = sd / DB_NAME
    if db.exists():
        try:
            from ..journal import Journal
            from ..store import Outbox
            with Journal(db) as j:
                data["jobs"] = [x.to_json() for x in j.jobs(limit=20)]
                data["job_counts"] = j.counts()
                data["reports"] = j.report_counts()
            with Outbox(db) as ob:
                data["outbox"] = {"pending": len(ob.pending()),
                                  "delivered": len(ob.list(status="removed")) + len(ob.list(status="sent"))}
        except AgentError as e:
            data["state_error"] = e.to_json()
    else:
        data["jobs"] = []
    return data


def _local_ipa(cfg, card) -> dict | None:
    """No daemon, so nobody polls: the [eim] settings and the eIMs the eUICC holds (SGP.32)."""
    try:
        eims = [e.eim_id for e in card.es10.get_eim_configuration_data()]
    except AgentError:          # an SGP.22 eUICC does not know the command
        eims = None
    if cfg.eim is None and not eims:
        return None
    eim = cfg.eim_settings()
    return {"configured": cfg.eim is not None, "polling": False, "url": eim.url, "esipa_version": eim.esipa_version,
            "binding": eim.binding, "card_eims": len(eims) if eims is not None else None, "eim_ids": eims,
            "poll_interval": eim.poll_interval, "fallback_after": (eim.fallback_after or None)
            if cfg.eim is not None else None}


def render(d: dict) -> str:
    lines = []
    dm = d.get("daemon")
    if dm:
        lines.append(f"Daemon:        pid {dm['pid']}, up {dm['uptime_s']:.0f} s, version {dm['version']}"
                     + (f", worker pid {dm['worker_pid']}" if dm.get("worker_pid") else ""))
    else:
        lines.append(f"Daemon:        not running ({d.get('daemon_message', '')})")
    m = d.get("modem") or {}
    if m:
        lines.append(f"Modem:         {m.get('manufacturer') or '?'} {m.get('model') or ''} IMEI {m.get('imei') or '?'}"
                     + (f" via {m['transport']}" if m.get("transport") else "")
                     + (f" on {m['device']}" if m.get("device") else ""))
    e = d.get("euicc") or {}
    if e:
        lines.append(f"eUICC:         EID {e.get('eid')}, free NVM {e.get('free_nvm')} bytes")
    if d.get("card_error"):
        lines.append(f"eUICC:         not readable: {d['card_error']['message']}")
    reg = d.get("registration")
    if reg:
        lines.append(f"Network:       {reg.get('stat_text') or reg.get('stat')} ({reg.get('tech')})")
    profiles = d.get("profiles")
    if profiles is not None:
        lines.append(f"Profiles:      {len(profiles)}"
                     + (f", enabled {d.get('enabled_iccid')}" if d.get("enabled_iccid") else ", none enabled"))
        for p in profiles:
            lines.append(f"  {p.get('iccid')}  {p.get('state'):<8}  {p.get('profile_name') or ''}")
    jobs = d.get("jobs") or []
    open_jobs = [j for j in jobs if j.get("state") in ("queued", "running")]
    lines.append(f"Jobs:          {len(open_jobs)} open" + (f", counts {d['job_counts']}" if d.get("job_counts") else ""))
    for j in jobs[:10]:
        err = (j.get("error") or {}).get("code")
        lines.append(f"  {j['id']}  {j['kind']:<20} {j['state']:<11} {j.get('finished_at') or j.get('created_at')}"
                     + (f"  {err}" if err else ""))
    ob = d.get("outbox")
    if ob:
        lines.append(f"Outbox:        {ob.get('pending', 0)} notification(s) waiting, {ob.get('delivered', 0)} delivered")
    ipa = d.get("ipa")
    if ipa:
        lines.append(_render_ipa(ipa))
    rp = d.get("reports")
    if rp and (rp.get("waiting") or rp.get("delivered")):
        lines.append(f"Reports:       {rp.get('waiting', 0)} waiting, {rp.get('delivered', 0)} delivered")
    return "\n".join(lines)


def _render_ipa(ipa: dict) -> str:
    """The eIM line(s) of `status` (SGP.32 IPAd; the daemon's ipa_schedule.py)."""
    where = ipa.get("url") or "the eUICC's eIM configuration"
    if ipa.get("eim_ids") is not None:          # no daemon: what the eUICC holds
        ids = ipa["eim_ids"]
        head = f"eIM:           {', '.join(ids) if ids else 'none on the eUICC (esim-agent ipa add-eim FILE)'}" + \
            ("; no daemon polls it" if ids else "")
    elif not ipa.get("polling"):
        head = "eIM:           not polling: " + ("no eIM on the eUICC (esim-agent ipa add-eim FILE)"
                                                 if ipa.get("card_eims") == 0 else "no eIM known yet")
    else:
        every = ipa.get("poll_interval") or 0
        nxt = ipa.get("next_poll_in_s")
        head = (f"eIM:           {where} (ESipa {ipa.get('esipa_version')}, {ipa.get('binding')}), "
                + (f"poll every {every:g} s" if every else "polls at start-up, on `ipa poll` and when the network returns")
                + (f", next in {nxt:.0f} s" if nxt is not None else ""))
    lines = [head]
    last = ipa.get("last_poll")
    if last:
        what = last.get("state") or "?"
        if last.get("executed") is not None:
            what += f", executed {last['executed']}"
        lines.append(f"  last poll:   {last.get('finished_at') or '?'} {what}"
                     + (f" ({last['error']})" if last.get("error") else ""))
    if ipa.get("fallback_after"):
        fb = ipa.get("fallback_iccid")
        lost = ipa.get("unregistered_for_s")
        lines.append(f"  fallback:    after {ipa['fallback_after']:g} s without registration, "
                     + (f"to {fb}" if fb else "when the eIM sets a fallback profile")
                     + (f"; unregistered for {lost:.0f} s" if lost is not None else ""))
    return "\n".join(lines)
