"""`esim-agent demo --iot`: the SGP.32 story on the embedded simulators.

A test PKI, the local SM-DP+, the local eIM (ESipa + its emnify-style operations API),
the simulated IoT eUICC on a pseudo-terminal and the daemon with an ``[eim]`` table.
The card is associated with the eIM (`ipa add-eim`), then the five emnify actions —
audit, download (enable, rollback), set fallback, enable (rollback), delete — are
scheduled through the REST API one after the other; after each, `ipa poll` (through
the daemon) makes the device fetch and execute it, and the operation's final status
and the eUICC record's profiles are printed.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

from .demo import DemoError, run_cli, workspace

ACTIONS = {1: "audit", 2: "download", 3: "enable", 4: "set fallback", 5: "delete"}
OPERATION_STATUS = {1: "Scheduled", 2: "Succeeded", 3: "Failed", 4: "Expired", 5: "Canceled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, what: str, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            err = log.read_text(errors="replace")[-400:] if log.exists() else ""
            raise DemoError(f"{what}: the process exited ({proc.returncode}) {err}")
        if time.monotonic() > deadline:
            raise DemoError(f"{what}: not ready within {timeout:.0f} s")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def run(args, out) -> int:
    import requests

    from .bench import agent_cmd, stop_procs
    from .sim.pki import make_pki
    from .sim.smdpp import SmdpServer

    t_start = time.monotonic()
    say = out.info if out.json else print
    root, tmp = workspace(args.keep, "esim-demo-iot-", dirs=("pki", "agent-state", "run", "logs"),
                          files=("card.json", "agent.toml"))
    pki_dir, state, link = root / "pki", root / "card.json", root / "modem.tty"
    state_dir, run_dir = root / "agent-state", root / "run"
    state_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    sock, cfg = run_dir / "agent.sock", root / "agent.toml"
    sid, auth_token, eim_token = "AC" + secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(16)
    procs: list[subprocess.Popen] = []
    server = None
    summary: dict = {}
    env = dict(os.environ, ESIM_AGENT_STATE_DIR=str(state_dir))
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
        # Logs go to files: a pipe nobody reads would stall a chatty daemon.
        with open(log, "wb") as f:
            p = subprocess.Popen(agent_cmd() + argv, env=env, stdout=subprocess.DEVNULL, stderr=f)
        procs.append(p)
        return p

    try:
        say("1. test PKI (CI, EUM, SM-DP+ and eIM certificates) ...")
        make_pki(pki_dir)
        ca = str(pki_dir / "ci.pem")
        server = SmdpServer(str(pki_dir), port=0, auth=(sid, auth_token), profile_size=12288)
        server.start()
        say(f"2. local SM-DP+ on https://127.0.0.1:{server.port}")
        eim_port = _free_port()
        eim = _spawn(["sim", "eim", "--pki", str(pki_dir), "--port", str(eim_port), "--token", eim_token],
                     logs / "eim.log")
        eim_config = pki_dir / "eim" / "eim-config.der"
        _wait(lambda: _listening(eim_port) and eim_config.is_file(), "local eIM", eim, logs / "eim.log")
        say(f"3. local eIM on https://127.0.0.1:{eim_port} (ESipa and the operations API)")
        modem = _spawn(["sim", "modem", "--iot", "--preload", "2", "--state", str(state), "--link", str(link),
                        "--pki", str(pki_dir)], logs / "modem.log")
        _wait(link.exists, "simulated modem", modem, logs / "modem.log")
        say(f"4. simulated modem + IoT eUICC (2 profiles) on {link}")
        cfg.write_text("\n".join([
            f'device = "{link}"', f'socket = "{sock}"', f'state_dir = "{state_dir}"', f'ca_bundle = "{ca}"',
            "[eim]", "poll_interval = 86400", f'ca = "{ca}"', ""]))
        daemon = _spawn(["daemon", "--config", str(cfg)], logs / "daemon.log")
        _wait(sock.exists, "daemon socket", daemon, logs / "daemon.log")
        say(f"5. daemon running, socket {sock}")

        def agent(*argv: str) -> dict:
            return run_cli(["--config", str(cfg)], argv, env)

        eim_api = requests.Session()
        eim_api.verify = ca
        eim_api.trust_env = False
        eim_api.headers["Authorization"] = "Bearer " + eim_token
        eim_base = f"https://127.0.0.1:{eim_port}/api/v1"

        def call(method: str, path: str, body=None):
            try:
                r = eim_api.request(method, eim_base + path, json=body, timeout=10)
            except requests.RequestException as e:
                raise DemoError(f"eIM operations API unreachable: {e}") from None
            if r.status_code >= 300:
                raise DemoError(f"eIM operations API: {method} {path} -> HTTP {r.status_code} {r.text[:200]}")
            return r.json()

        agent("ipa", "add-eim", str(eim_config))
        eid = agent("chip", "info")["eid"]
        say(f"6. eUICC {eid} associated with the eIM (AddInitialEim)")
        agent("ipa", "poll")
        found = call("GET", f"/euicc?q=eid:{eid}")
        if not found:
            raise DemoError(f"the eIM does not list EID {eid} after the first poll")
        euicc_id = found[0]["id"]
        say(f"7. first poll: the eIM learnt the eUICC (id {euicc_id})")

        def profiles() -> list[dict]:
            return call("GET", f"/euicc/{euicc_id}").get("profile") or []

        def show() -> None:
            for p in profiles():
                fb = " fallback" if p.get("fallback_attribute") else ""
                say(f"      {p['iccid_with_luhn']}  {p['status']['description']}{fb}")

        def operate(step: int, op: dict) -> dict:
            posted = call("POST", f"/euicc/{euicc_id}/operation", [op])
            op_id = posted[0]["id"]
            polled = agent("ipa", "poll")
            deadline = time.monotonic() + 30
            while True:
                doc = call("GET", f"/euicc/{euicc_id}/operation/{op_id}")
                if doc["status"]["id"] != 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            status = doc["status"]["id"]
            err = doc.get("error") or {}
            executed = len(polled.get("executed", [])) if isinstance(polled, dict) else 0
            say(f"{step}. {ACTIONS[op['action']['id']]}: {OPERATION_STATUS.get(status, status)}"
                + (f" ({err.get('message')})" if err else "") + f"; the device executed {executed} package(s)")
            if status != 2:
                raise DemoError(f"{ACTIONS[op['action']['id']]} ended {OPERATION_STATUS.get(status, status)}: "
                                f"{err.get('message') or doc}")
            show()
            return doc

        results = []
        results.append(operate(8, {"action": {"id": 1}, "validity_period": 600}))
        before = profiles()
        enabled = next(p["iccid_with_luhn"] for p in before if p["status"]["id"] == 8)
        other = next(p["iccid_with_luhn"] for p in before if p["status"]["id"] not in (8, 9))
        reservation = requests.post(f"https://127.0.0.1:{server.port}/v1/ESimProfiles",
                                    data={"GenerateMatchingId": "true"}, auth=(sid, auth_token), verify=ca,
                                    timeout=10).json()
        deadline = time.monotonic() + 10
        while not reservation.get("activation_code") and time.monotonic() < deadline:
            time.sleep(0.1)
            reservation = requests.get(f"https://127.0.0.1:{server.port}/v1/ESimProfiles/{reservation['sid']}",
                                       auth=(sid, auth_token), verify=ca, timeout=10).json()
        new = reservation["iccid"]
        results.append(operate(9, {"action": {"id": 2}, "activation_code": "LPA:" + reservation["activation_code"],
                                   "enable": True, "rollback": True}))
        results.append(operate(10, {"action": {"id": 4}, "iccid_with_luhn": enabled}))
        results.append(operate(11, {"action": {"id": 3}, "iccid_with_luhn": other, "rollback": True}))
        results.append(operate(12, {"action": {"id": 5}, "iccid_with_luhn": new}))
        elapsed = time.monotonic() - t_start
        summary = {"eid": eid, "euicc_id": euicc_id,
                   "operations": [{"id": r["id"], "action": r["action"], "status": r["status"]} for r in results],
                   "profiles": profiles(), "elapsed_s": round(elapsed, 2)}
        say(f"IoT demo complete: five operations succeeded in {elapsed:.1f} s")
    finally:
        stop_procs(procs)
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()
    if out.json:
        out.ok(summary)
    return 0
