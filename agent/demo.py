"""`esim-agent demo`: the whole device-side flow on the embedded simulators.

Starts a test PKI, the local SM-DP+ (ES9+ over HTTPS on loopback, with the
Super SIM-style reservation API) and the simulated modem + eUICC on a
pseudo-terminal; reserves one profile by EID (default SM-DP+ path) and one
with a matching ID (activation-code path); downloads both through the pty
with the real CLI; enables one; processes the notifications; shows both
reservations reaching `installed`; cleans up.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import AgentError


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="run the whole download flow on the embedded simulators")
    d.add_argument("--keep", metavar="DIR", help="keep the test bed's files in DIR")
    d.add_argument("--baud", type=int, help="emulate a UART at this speed")
    d.add_argument("--iot", action="store_true",
                   help="the SGP.32 story instead: local eIM with an emnify-style operations API, IoT eUICC, "
                        "daemon; the five emnify actions scheduled and executed")
    d.set_defaults(func=cmd_demo)


class DemoError(AgentError):
    code = "demo_failed"


def workspace(keep: str | None, prefix: str, *, dirs: tuple[str, ...], files: tuple[str, ...]):
    """(root, TemporaryDirectory or None) for a demo's test bed: ``--keep DIR``, or a temporary
    directory removed at the end. In a kept one, a previous demo's test bed is replaced, not
    reused: its card and outbox point at that run's servers (other ports, another CI)."""
    import tempfile
    if not keep:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        return Path(tmp.name), tmp
    import shutil
    root = Path(keep)
    root.mkdir(parents=True, exist_ok=True)
    for old in dirs:
        shutil.rmtree(root / old, ignore_errors=True)
    for old in files:
        (root / old).unlink(missing_ok=True)
    return root, None


def run_cli(options: list[str], argv, env: dict, timeout: float = 120.0) -> dict:
    """Run `esim-agent OPTIONS --json ARGV` as a user would; its data, or DemoError naming the step."""
    import json
    import subprocess

    from .bench import agent_cmd
    full = agent_cmd() + list(options) + ["--json", *argv]
    try:
        r = subprocess.run(full, capture_output=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DemoError(f"`esim-agent {' '.join(argv)}` did not finish within {timeout:.0f} s") from None
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        raise DemoError(f"`esim-agent {' '.join(argv)}` printed no JSON (exit {r.returncode}): "
                        f"{r.stderr.decode(errors='replace')[-400:]}") from None
    if not doc.get("ok"):
        raise DemoError(f"`esim-agent {' '.join(argv)}` failed: {doc['error']['message']}")
    return doc["data"]


def cmd_demo(args, out) -> int:
    if getattr(args, "iot", False):
        from .demo_iot import run
        return run(args, out)
    import secrets
    import subprocess
    import requests

    from .bench import agent_cmd, wait_for_path
    from .sim.pki import make_pki
    from .sim.smdpp import SmdpServer

    t_start = time.monotonic()
    say = out.info if out.json else print
    root, tmp = workspace(args.keep, "esim-demo-", dirs=("pki", "agent-state"), files=("card.json", "ac.txt"))
    pki_dir, state, link = root / "pki", root / "card.json", root / "modem.tty"
    env_state = root / "agent-state"
    sid, token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
    modem = server = None
    summary: dict = {}
    try:
        say("1. test PKI (CI, EUM, SM-DP+ certificates) ...")
        make_pki(pki_dir)
        ca = str(pki_dir / "ci.pem")
        server = SmdpServer(str(pki_dir), port=0, auth=(sid, token), profile_size=12288)  # TS.48-sized
        server.start()
        say(f"2. local SM-DP+ on https://127.0.0.1:{server.port}, address {server.address}")
        cmd = agent_cmd() + ["sim", "modem", "--state", str(state), "--link", str(link), "--pki", str(pki_dir)]
        if args.baud:
            cmd += ["--baud", str(args.baud)]
        modem = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_path(link, modem)
        say(f"3. simulated modem + eUICC on {link}")

        env = dict(os.environ, ESIM_AGENT_STATE_DIR=str(env_state))

        def agent(*argv: str) -> dict:
            return run_cli(["--device", str(link)], argv, env)

        api = requests.Session()
        api.auth = (sid, token)
        api.verify = ca
        api.trust_env = False   # REQUESTS_CA_BUNDLE would override verify=ca
        base = f"https://localhost:{server.port}/v1/ESimProfiles"

        def reserve(**form) -> dict:
            try:
                r = api.post(base, data=form, timeout=10)
            except requests.RequestException as e:
                raise DemoError(f"reservation API unreachable: {e}") from None
            if r.status_code != 201:
                raise DemoError(f"reservation failed: HTTP {r.status_code} {r.text[:200]}")
            return r.json()

        def wait_status(sid_: str, want: str, timeout: float = 10.0) -> dict:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    doc = api.get(f"{base}/{sid_}", timeout=10).json()
                except (requests.RequestException, ValueError) as e:
                    raise DemoError(f"reservation API failed: {e}") from None
                if doc["status"] == want:
                    return doc
                if doc["status"] == "failed" or time.monotonic() > deadline:
                    raise DemoError(f"reservation {sid_} is {doc['status']} ({doc.get('error_message')}), "
                                    f"wanted {want}")
                time.sleep(0.1)

        eid = agent("chip", "info")["eid"]
        say(f"4. eUICC EID {eid}")

        by_eid = reserve(Eid=eid)
        by_eid = wait_status(by_eid["sid"], "available")
        say(f"5. reserved {by_eid['sid']} for this EID: ICCID {by_eid['iccid']}, "
            f"SM-DP+ {by_eid['smdp_plus_address']}")
        agent("chip", "set-default-dp", by_eid["smdp_plus_address"])
        by_mid = reserve(GenerateMatchingId="true")
        by_mid = wait_status(by_mid["sid"], "available")
        say(f"6. reserved {by_mid['sid']} with a matching ID: activation code LPA:{by_mid['activation_code']}")

        d1 = agent("profile", "download", "--ca", ca, "--yes")
        say(f"7. downloaded from the default SM-DP+: ICCID {d1['profile']['iccid']}, "
            f"{len(d1.get('notifications', []))} notification(s) sent")
        ac_file = root / "ac.txt"
        ac_file.write_text("LPA:" + by_mid["activation_code"] + "\n")
        d2 = agent("profile", "download", "--ac-file", str(ac_file), "--ca", ca, "--yes")
        say(f"8. downloaded by activation code: ICCID {d2['profile']['iccid']}")
        en = agent("profile", "enable", d2["profile"]["iccid"], "--ca", ca)
        say(f"9. enabled {d2['profile']['iccid']}; {len(en.get('notifications', []))} notification(s) sent")
        rest = agent("notification", "process", "--ca", ca)
        say(f"10. processed {len(rest['notifications'])} remaining notification(s)")

        r1 = wait_status(by_eid["sid"], "installed")
        r2 = wait_status(by_mid["sid"], "installed")
        profiles = agent("profile", "list")["profiles"]
        say("11. reservations: " + ", ".join(f"{r['sid']} {r['status']}" for r in (r1, r2)))
        for p in profiles:
            say(f"    {p['iccid']}  {p['state']:<8}  {p.get('profile_name') or ''}")
        elapsed = time.monotonic() - t_start
        summary = {"eid": eid, "smdp_address": server.address,
                   "reservations": [{"sid": r["sid"], "status": r["status"], "iccid": r["iccid"]} for r in (r1, r2)],
                   "profiles": profiles, "elapsed_s": round(elapsed, 2)}
        say(f"demo complete: both profiles installed in {elapsed:.1f} s")
    finally:
        if modem is not None:
            modem.terminate()
            try:
                modem.wait(5)
            except subprocess.TimeoutExpired:
                modem.kill()
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()
    if out.json:
        out.ok(summary)
    return 0

