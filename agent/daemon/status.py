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
    rp = d.get("reports")
    if rp and (rp.get("waiting") or rp.get("delivered")):
        lines.append(f"Reports:       {rp.get('waiting', 0)} waiting, {rp.get('delivered', 0)} delivered")
    return "\n".join(lines)
