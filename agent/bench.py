"""Benchmarks (`esim-agent bench ...`): commands that print figures.

They measure what a user gets: every figure comes from fresh processes of the
installed console script (interpreter start and imports included), with wall
time, host CPU and peak RSS from wait4, median and spread over the runs.
* startup: cold `chip info` against --sim, over the simulated modem's pty and
  through a running daemon, each as a multiple of `python -c "import serial"`;
* download: `profile download` (notifications included) through the simulated
  modem, held against the line bound from the modem's own counters
  (bytes × 10 / baud, plus the per-command latency when one is set);
* daemon (bench_daemon.py): the idle service.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TransportError

if TYPE_CHECKING:
    import subprocess


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks that print figures")
    bs = b.add_subparsers(dest="sub", metavar="WHAT", parser_class=type(b))
    bs.required = True
    s = bs.add_parser("startup", help="median wall time of `chip info` against --sim and the simulated modem")
    s.add_argument("--runs", type=int, default=7, help="fresh processes per case (at least 5)")
    s.set_defaults(func=cmd_bench_startup)
    d = bs.add_parser("download", help="one profile download through the simulated modem")
    d.add_argument("--baud", type=int, default=115200, help="emulated UART speed (default 115200)")
    d.add_argument("--transport", dest="bench_transport", choices=["csim", "cgla"], default="cgla")
    d.add_argument("--profile-size", type=int, default=12288, metavar="BYTES",
                   help="profile package size (default 12288, like a GSMA TS.48 test profile)")
    d.add_argument("--runs", type=int, default=5, help="downloads, each a fresh process (default 5)")
    d.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                   help="simulated modem answer delay per AT+CSIM/CGLA (real modems: 0.066-0.094)")
    d.set_defaults(func=cmd_bench_download)
    from . import bench_daemon
    bench_daemon.add_parser(bs)


def agent_cmd() -> list[str]:
    """How to start this agent in a child process (same interpreter, same code)."""
    return [sys.executable, "-m", "agent"]


def stop_procs(procs: list, timeout: float = 10.0) -> None:
    """Terminate the test-bed processes a benchmark started (last first), kill stragglers."""
    import subprocess
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def wait_for_path(path: Path, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise TransportError(f"simulated modem exited early: {err.strip()[-300:]}", code="sim_failed")
        if time.monotonic() > deadline:
            raise TransportError(f"simulated modem did not create {path} within {timeout} s", code="sim_failed")
        time.sleep(0.05)


def cmd_bench_startup(args, out) -> int:
    """Cold `chip info`, each run a fresh process of the installed console script: against
    --sim, through the simulated modem's pty, and through a running daemon's socket; the
    floor is `python -c "import serial"`. The four run in turn, round after round (floor, --sim,
    pty, daemon, floor, ...), so a drift of the machine's speed during the call moves them alike;
    each case's ratio is the median of its per-round ratios to that round's floor."""
    import statistics
    import subprocess
    import tempfile

    from .bench_process import console_script, run_wait4, summarise
    from .errors import UsageError
    from .sim.euicc import SimEuicc
    if args.runs < 5:
        raise UsageError("--runs must be at least 5 (median and spread)", code="bad_runs")
    cli = console_script()
    procs: list = []
    with tempfile.TemporaryDirectory(prefix="esim-bench-") as d:
        root = Path(d)
        SimEuicc.open(root / "card.json", preload=2)
        env = dict(os.environ, ESIM_AGENT_STATE_DIR=str(root / "state"), ESIM_AGENT_CONFIG=str(root / "none.toml"))
        try:
            # at 115200 baud, as a real modem's UART and the download benchmark (an unpaced pty
            # would hide the line time a user waits for); the daemon owns a modem of its own
            links = {}
            for tty, card in (("tty", "card2.json"), ("tty-daemon", "card3.json")):
                links[tty] = root / tty
                procs.append(subprocess.Popen(agent_cmd() + ["sim", "modem", "--state", str(root / card),
                                                             "--link", str(links[tty]), "--preload", "2",
                                                             "--baud", "115200"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                wait_for_path(links[tty], procs[-1])
            cfg = root / "agent.toml"
            cfg.write_text(f'device = "{links["tty-daemon"]}"\nsocket = "{root / "agent.sock"}"\n'
                           f'state_dir = "{root / "state"}"\n')
            procs.append(subprocess.Popen(agent_cmd() + ["daemon", "--config", str(cfg)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_socket(root / "agent.sock", procs[-1])
            cases = {"floor": [sys.executable, "-c", "import serial"],
                     "sim": cli + ["--sim", str(root / "card.json"), "--json", "chip", "info"],
                     "modem": cli + ["--device", str(links["tty"]), "--json", "chip", "info"],
                     "daemon": cli + ["--config", str(cfg), "--json", "chip", "info"]}
            for argv in cases.values():         # once each, not counted: the modems' and the daemon's
                run_wait4(argv, env=env)        # first answers, the card worker's start
            runs: dict[str, list] = {k: [] for k in cases}
            for _ in range(args.runs):
                for k, argv in cases.items():
                    runs[k].append(run_wait4(argv, env=env))
        finally:
            stop_procs(procs)
    m = {k: summarise(v) for k, v in runs.items()}
    ratio = {k: round(statistics.median(r.wall_s / f.wall_s for r, f in zip(runs[k], runs["floor"])), 2)
             for k in ("sim", "modem", "daemon")}
    data = {"runs": args.runs, "floor_import_serial": m["floor"], "chip_info_sim": m["sim"],
            "chip_info_modem": m["modem"], "chip_info_via_daemon": m["daemon"], "ratio_to_floor": ratio,
            "targets_ratio_to_floor": {"sim": 4, "modem": 6, "daemon": 2}, "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}

    def line(name, m, key):
        w, c, r = m["wall_s"], m["cpu_s"], m["max_rss_mb"]
        return (f"  {name:<34} wall {w['median']:.3f} s ({w['min']:.3f}-{w['max']:.3f}), CPU {c['median']:.3f} s, "
                f"peak RSS {r['median']:.1f} MB" + (f", {ratio[key]} x floor" if key else ""))
    out.ok(data, "\n".join([f"cold start, {args.runs} rounds of fresh processes, the cases in turn (median, spread "
                             f"in brackets; x floor: median of the rounds' ratios), load {data['loadavg'][0]} "
                             f"on {os.cpu_count()} CPUs:",
                             line('python -c "import serial" (floor)', m["floor"], None),
                             line("chip info --sim (target <= 4 x)", m["sim"], "sim"),
                             line("chip info over the pty (target <= 6 x)", m["modem"], "modem"),
                             line("chip info via the daemon (target <= 2 x)", m["daemon"], "daemon")]))
    return 0


def _wait_socket(path: Path, proc, timeout: float = 30.0) -> None:
    from .daemon.client import socket_answers
    end = time.monotonic() + timeout
    while not socket_answers(str(path)):
        if proc.poll() is not None or time.monotonic() > end:
            raise TransportError(f"the daemon did not answer on {path}", code="bench_failed")
        time.sleep(0.05)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr and proc.poll() is not None else ""
                raise TransportError(f"local SM-DP+ did not listen on {port}: {err[-300:]}", code="sim_failed")
            time.sleep(0.05)


def cmd_bench_download(args, out) -> int:
    """Profile downloads as a user runs them: each a fresh `esim-agent profile download`
    process through the simulated modem (notifications included), held against the line
    bound from the modem's own counters (``sim modem --stats``)."""
    import json
    import statistics
    import subprocess
    import tempfile

    import requests

    from .bench_process import console_script, run_wait4, summary
    from .errors import UsageError
    from .sim.pki import make_pki
    if args.runs < 1:
        raise UsageError("--runs must be at least 1", code="bad_runs")
    cli = console_script()
    procs: list[subprocess.Popen] = []
    runs = []
    with tempfile.TemporaryDirectory(prefix="esim-bench-") as d:
        root = Path(d)
        try:
            make_pki(root / "pki")
            ca = str(root / "pki" / "ci.pem")
            port = _free_port()
            auth = ("AC" + os.urandom(16).hex(), os.urandom(16).hex())
            procs.append(subprocess.Popen(agent_cmd() + ["sim", "smdpp", "--pki", str(root / "pki"), "--port",
                                                         str(port), "--auth", ":".join(auth),
                                                         "--profile-size", str(args.profile_size)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            link, stats = root / "tty", root / "modem-stats.json"
            procs.append(subprocess.Popen(agent_cmd() + ["sim", "modem", "--state", str(root / "card.json"),
                                                         "--link", str(link), "--pki", str(root / "pki"),
                                                         "--baud", str(args.baud), "--stats", str(stats),
                                                         "--latency", str(args.latency)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            _wait_port(port, procs[0])
            wait_for_path(link, procs[1])
            api = f"https://localhost:{port}/v1/ESimProfiles"
            env = dict(os.environ, ESIM_AGENT_STATE_DIR=str(root / "state"),
                       ESIM_AGENT_CONFIG=str(root / "none.toml"))
            for _ in range(args.runs):
                r = requests.post(api, data={"GenerateMatchingId": "true"}, auth=auth, verify=ca, timeout=10).json()
                deadline = time.monotonic() + 10
                while r.get("status") != "available" and time.monotonic() < deadline:
                    time.sleep(0.05)
                    r = requests.get(f"{api}/{r['sid']}", auth=auth, verify=ca, timeout=10).json()
                if r.get("status") != "available":
                    raise TransportError(f"reservation did not become available: {r}", code="bench_failed")
                before = json.loads(stats.read_text()) if stats.exists() else {}
                run = run_wait4(cli + ["--device", str(link), "--transport", args.bench_transport, "--baud",
                                       str(args.baud), "--json", "profile", "download",
                                       "LPA:" + r["activation_code"], "--ca", ca, "--yes"], env=env)
                after = json.loads(stats.read_text())
                delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int) and k != "baud"}
                doc = json.loads(run.out)
                sent = [n for n in doc["data"].get("notifications", []) if n["status"] == "delivered"]
                line = delta["bytes_host_to_modem"] + delta["bytes_modem_to_host"]
                bound = line * 10 / args.baud + args.latency * (delta["csim_commands"] + delta["cgla_commands"])
                runs.append({"wall_s": run.wall_s, "cpu_s": run.cpu_s, "max_rss_mb": run.max_rss_mb,
                             "line_bytes": line, "bound_s": bound, "ratio": run.wall_s / bound,
                             "apdus_to_card": delta["apdus_to_card"], "get_response": delta["get_response"],
                             "at_commands": delta["at_commands"], "notifications_delivered": len(sent)})
        finally:
            stop_procs(procs)
    med = lambda k: statistics.median(x[k] for x in runs)  # noqa: E731
    data = {"baud": args.baud, "transport": args.bench_transport, "latency_s": args.latency, "runs": len(runs),
            "profile_size": args.profile_size,
            "wall_s": summary([x["wall_s"] for x in runs]), "cpu_s": summary([x["cpu_s"] for x in runs]),
            "max_rss_mb": summary([x["max_rss_mb"] for x in runs], 1),
            "line_bytes": int(med("line_bytes")), "line_bound_s": round(med("bound_s"), 3),
            "ratio_wall_to_line_bound": round(med("ratio"), 3),
            "apdus_to_card": int(med("apdus_to_card")), "get_response": int(med("get_response")),
            "at_commands": int(med("at_commands")), "notifications_delivered": int(med("notifications_delivered")),
            "host_cpu_s": round(med("cpu_s"), 3),
            "targets": {"wall_to_bound_max": 1.10, "host_cpu_max_s": 0.25, "max_rss_mb": 30, "apdus_max": 95},
            "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    w = data["wall_s"]
    out.ok(data, f"profile download as a fresh process, {len(runs)} runs at {args.baud} baud ({args.bench_transport}"
                 f"{f', {args.latency:g} s latency' if args.latency else ''}), notifications included:\n"
                 f"  wall {w['median']:.2f} s ({w['min']:.2f}-{w['max']:.2f}); line bound {data['line_bound_s']:.2f} s "
                 f"({data['line_bytes']} bytes); ratio {data['ratio_wall_to_line_bound']} (target <= 1.10)\n"
                 f"  host CPU {data['host_cpu_s']:.3f} s (target <= 0.25), peak RSS {data['max_rss_mb']['median']} MB "
                 f"(target <= 30)\n"
                 f"  {data['apdus_to_card']} APDUs reached the card (target <= 95), {data['get_response']} GET RESPONSE, "
                 f"{data['at_commands']} AT commands")
    return 0
