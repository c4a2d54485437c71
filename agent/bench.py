"""Benchmarks (`esim-agent bench ...`): commands that print figures.

Performance targets are checked here, not in timed unit tests:
* startup: median wall time of `chip info` (target < 0.3 s against --sim);
* download: one profile download through the simulated modem at a given
  baud rate: wall time, APDUs, bytes on the serial line, host CPU, and the
  ratio of wall time to the line's lower bound (bytes × 10 / baud).
  Targets: ratio ≤ 1.2 at 115200 baud; host CPU ≤ 0.5 s per download.
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
    s.add_argument("--runs", type=int, default=7)
    s.set_defaults(func=cmd_bench_startup)
    d = bs.add_parser("download", help="one profile download through the simulated modem")
    d.add_argument("--baud", type=int, default=115200, help="emulated UART speed (default 115200)")
    d.add_argument("--transport", dest="bench_transport", choices=["csim", "cgla"], default="cgla")
    d.add_argument("--profile-size", type=int, default=12288, metavar="BYTES",
                   help="profile package size (default 12288, like a GSMA TS.48 test profile)")
    d.set_defaults(func=cmd_bench_download)
    from . import bench_daemon
    bench_daemon.add_parser(bs)


def agent_cmd() -> list[str]:
    """How to start this agent in a child process (same interpreter, same code)."""
    return [sys.executable, "-m", "agent"]


def wait_for_path(path: Path, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise TransportError(f"simulated modem exited early: {err.strip()[-300:]}", code="sim_failed")
        if time.monotonic() > deadline:
            raise TransportError(f"simulated modem did not create {path} within {timeout} s", code="sim_failed")
        time.sleep(0.05)


def _median_run(argv: list[str], runs: int) -> float:
    import statistics
    import subprocess
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, timeout=60)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise TransportError(f"`{' '.join(argv[2:])}` failed (exit {r.returncode}): "
                                 f"{r.stdout.decode(errors='replace')[-300:]}{r.stderr.decode(errors='replace')[-300:]}",
                                 code="bench_failed")
    return statistics.median(times)


def cmd_bench_startup(args, out) -> int:
    import subprocess
    import tempfile
    from .errors import UsageError
    from .sim.euicc import SimEuicc
    if args.runs < 1:
        raise UsageError("--runs must be at least 1", code="bad_runs")
    with tempfile.TemporaryDirectory(prefix="esim-bench-") as d:
        state = Path(d) / "card.json"
        SimEuicc.open(state, preload=2)
        sim_med = _median_run(agent_cmd() + ["--sim", str(state), "--json", "chip", "info"], args.runs)
        link = Path(d) / "tty"
        proc = subprocess.Popen(agent_cmd() + ["sim", "modem", "--state", str(state), "--link", str(link)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_path(link, proc)
            modem_med = _median_run(agent_cmd() + ["--device", str(link), "--json", "chip", "info"], args.runs)
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    data = {"runs": args.runs, "chip_info_sim_median_s": round(sim_med, 4),
            "chip_info_modem_median_s": round(modem_med, 4), "target_sim_s": 0.3,
            "sim_within_target": sim_med < 0.3, "cpus": os.cpu_count()}
    out.ok(data, f"chip info, median of {args.runs} cold starts:\n"
                 f"  --sim (in-process simulated eUICC): {sim_med:.3f} s (target < 0.3 s)\n"
                 f"  --device (simulated modem on a pty): {modem_med:.3f} s")
    return 0


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
    """Servers run in child processes so the CPU figure is the agent's own."""
    import subprocess
    import tempfile
    import requests

    from . import ops
    from .ops import Context, ServerSettings
    from .ops.card import Card, CardSettings
    from .sim.pki import make_pki

    procs: list[subprocess.Popen] = []
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
            link = root / "tty"
            procs.append(subprocess.Popen(agent_cmd() + ["sim", "modem", "--state", str(root / "card.json"),
                                                         "--link", str(link), "--pki", str(root / "pki"),
                                                         "--baud", str(args.baud)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            _wait_port(port, procs[0])
            wait_for_path(link, procs[1])
            api = f"https://localhost:{port}/v1/ESimProfiles"
            card = Card(CardSettings(device=str(link), transport=args.bench_transport, baud=args.baud).validate())
            ctx = Context(servers=ServerSettings(ca=ca), state_dir=root / "state", notifications=False)
            with card:
                t = card.transport
                eid = card.eid
                r = requests.post(api, data={"Eid": eid}, auth=auth, verify=ca, timeout=10).json()
                deadline = time.monotonic() + 10
                while r["status"] != "available" and time.monotonic() < deadline:
                    time.sleep(0.05)
                    r = requests.get(f"{api}/{r['sid']}", auth=auth, verify=ca, timeout=10).json()
                if r["status"] != "available":
                    raise TransportError(f"reservation did not become available: {r}", code="bench_failed")
                address = r["smdp_plus_address"]
                before = dict(vars(t.stats)) if hasattr(t.stats, "__dict__") else dict(t.stats)
                c0, w0 = time.process_time(), time.perf_counter()
                res = ops.run("profile.download", ctx, card, {"smdp": address, "matching_id": "", "yes": True})
                wall = time.perf_counter() - w0
                cpu = time.process_time() - c0
                after = dict(vars(t.stats)) if hasattr(t.stats, "__dict__") else dict(t.stats)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    line_bytes = delta.get("bytes_out", 0) + delta.get("bytes_in", 0)
    bound = line_bytes * 10 / args.baud
    data = {"baud": args.baud, "transport": args.bench_transport, "iccid": res["profile"]["iccid"],
            "wall_s": round(wall, 3), "apdus": delta.get("apdus"), "at_commands": delta.get("at_commands"),
            "line_bytes": line_bytes, "line_bound_s": round(bound, 3),
            "ratio_wall_to_line_bound": round(wall / bound, 3) if bound else None,
            "host_cpu_s": round(cpu, 3), "bpp_bytes": res["bytes_loaded"],
            "targets": {"wall_to_bound_max": 1.2, "host_cpu_max_s": 0.5}}
    out.ok(data, f"download at {args.baud} baud ({args.bench_transport}): wall {wall:.2f} s, "
                 f"{delta.get('apdus')} APDUs, {line_bytes} bytes on the line (lower bound {bound:.2f} s), "
                 f"ratio {data['ratio_wall_to_line_bound']} (target <= 1.2), host CPU {cpu:.3f} s (target <= 0.5)")
    return 0
