"""`esim-agent bench daemon`: what the service costs a gateway while it waits.

Starts the simulated modem and a real `esim-agent daemon` (separate processes,
as systemd would run it), lets the start-up discovery finish and the card
worker go idle, then measures over ``--idle-seconds`` (default 60):

* ``idle_rss_mb``: resident memory of the whole service (daemon + any worker
  still alive), from /proc — target ≤ 30;
* ``idle_cpu_s_per_min``: user+system CPU of the service per minute idle,
  from /proc/PID/stat — target ≤ 0.05 (no busy polling);
* ``status_rtt_ms_median``: `GET /status` over the Unix socket, median of
  ``--requests`` fresh connections — target ≤ 20.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import TransportError

TARGETS = {"idle_rss_mb": 30.0, "idle_cpu_s_per_min": 0.05, "status_rtt_ms_median": 20.0}


def add_parser(bs) -> None:
    d = bs.add_parser("daemon", help="idle memory and CPU of the daemon, and its `status` round trip")
    d.add_argument("--idle-seconds", type=float, default=60.0, help="how long to measure idle (default 60)")
    d.add_argument("--requests", type=int, default=50, help="status requests to time (default 50)")
    d.set_defaults(func=cmd_bench_daemon)


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _cpu_s(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])      # utime, stime
    return total / tick


def _rss_mb(pids: list[int]) -> float:
    kb = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
        except OSError:
            continue
    return kb / 1024


def _get_status(sock: str) -> tuple[int, dict]:
    from .daemon.client import DaemonClient
    return DaemonClient(sock, timeout=5).request("GET", "/status")


def cmd_bench_daemon(args, out) -> int:
    from .bench import agent_cmd, stop_procs, wait_for_path
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="esim-bench-daemon-") as d:
        root = Path(d)
        (root / "run").mkdir()
        (root / "state").mkdir()
        link, sock = root / "tty", root / "run" / "agent.sock"
        try:
            procs.append(subprocess.Popen(agent_cmd() + ["sim", "modem", "--state", str(root / "card.json"),
                                                         "--link", str(link), "--preload", "2"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            wait_for_path(link, procs[0])
            cfg = root / "agent.toml"
            cfg.write_text(f'device = "{link}"\nsocket = "{sock}"\nstate_dir = "{root / "state"}"\n'
                           "discovery_interval = 21600\n")
            env = dict(os.environ, ESIM_AGENT_STATE_DIR=str(root / "state"))
            t_start = time.monotonic()
            daemon = subprocess.Popen(agent_cmd() + ["daemon", "--config", str(cfg)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(daemon)
            # Ready = the socket answers; settled = start-up discovery done and the worker gone.
            deadline = time.monotonic() + 120
            ready_s = None
            while True:
                if daemon.poll() is not None:
                    err = daemon.stderr.read().decode(errors="replace")
                    raise TransportError(f"the daemon exited ({daemon.returncode}): {err[-300:]}",
                                         code="bench_failed")
                try:
                    status, doc = _get_status(str(sock))
                except Exception:
                    status, doc = 0, {}
                if status == 200:
                    if ready_s is None:
                        ready_s = time.monotonic() - t_start
                    data = doc["data"]
                    busy = [j for j in data["jobs"] if j["state"] in ("queued", "running")]
                    if not busy and data["daemon"]["worker_pid"] is None and len(_tree(daemon.pid)) == 1:
                        break
                if time.monotonic() > deadline:
                    raise TransportError("the daemon did not settle within 120 s", code="bench_failed")
                time.sleep(0.5)
            pids = _tree(daemon.pid)
            c0, w0 = _cpu_s(pids), time.monotonic()
            rss = []
            end = w0 + args.idle_seconds
            while time.monotonic() < end:
                pids = _tree(daemon.pid)
                rss.append(_rss_mb(pids))
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            idle_s = time.monotonic() - w0
            cpu = _cpu_s(_tree(daemon.pid)) - c0
            rtts = []
            for _ in range(max(1, args.requests)):
                t0 = time.perf_counter()
                st, _doc = _get_status(str(sock))
                rtts.append((time.perf_counter() - t0) * 1000)
                if st != 200:
                    raise TransportError(f"GET /status answered {st}", code="bench_failed")
        finally:
            stop_procs(procs)
    data = {"idle_rss_mb": round(max(rss), 1), "idle_cpu_s_per_min": round(cpu * 60 / idle_s, 4),
            "status_rtt_ms_median": round(statistics.median(rtts), 2),
            "status_rtt_ms_max": round(max(rtts), 2), "idle_seconds": round(idle_s, 1),
            "ready_s": round(ready_s or 0, 2), "requests": len(rtts), "targets": TARGETS}
    out.ok(data, f"daemon idle: RSS {data['idle_rss_mb']} MB (target <= 30), CPU {data['idle_cpu_s_per_min']} s/min "
                 f"(target <= 0.05) over {data['idle_seconds']} s; status round trip median "
                 f"{data['status_rtt_ms_median']} ms (target <= 20); ready after {data['ready_s']} s")
    return 0
