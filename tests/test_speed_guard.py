"""Regression guard for speed as users get it (the issue "Speed as users run it", item 6).

Runs the project's own whole-process benchmarks (fresh CLI processes of the installed console
script) and fails on a gross regression only:

* a profile download through the simulated modem at 115200 baud (12 KB package, notifications
  included) taking more than 1.25 x the line bound the modem counts itself (bytes x 10 / baud);
* cold `chip info` (--sim, and over the pty at 115200 baud) taking more than 10 x the start of
  `python -c "import serial"` measured in the same run.

The limits are looser than the targets the benchmarks print (1.10 and 4 x / 6 x), and the
figures are the best runs (noise on a shared CI machine only ever adds time), so only a real
regression trips them: a fixed sleep on the happy path, a per-APDU cost, a heavy import at
start-up. Takes ~15 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MAX_DOWNLOAD_RATIO = 1.25
MAX_STARTUP_RATIO = 10.0


def _bench(*args: str, timeout: float) -> dict:
    exe = Path(sys.executable).parent / "esim-agent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent"]
    r = subprocess.run(cmd + ["--json", "bench", *args], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ))
    assert r.returncode == 0, f"bench {' '.join(args)} failed: {r.stdout[-500:]} {r.stderr[-500:]}"
    doc = json.loads(r.stdout)
    assert doc["ok"], doc
    return doc["data"]


def test_whole_process_download_stays_near_the_line_bound():
    d = _bench("download", "--baud", "115200", "--runs", "3", timeout=150)
    assert d["notifications_delivered"] >= 1 and d["line_bound_s"] > 0
    best = d["wall_s"]["min"] / d["line_bound_s"]
    assert best <= MAX_DOWNLOAD_RATIO, (
        f"a whole-process download took {d['wall_s']['min']:.2f} s, {best:.2f} x the line bound "
        f"{d['line_bound_s']:.2f} s (limit {MAX_DOWNLOAD_RATIO}); CPU {d['cpu_s']['median']:.2f} s")


def test_cold_chip_info_stays_within_ten_times_the_import_serial_floor():
    d = _bench("startup", "--runs", "5", timeout=110)
    floor = d["floor_import_serial"]["wall_s"]["median"]
    for case in ("chip_info_sim", "chip_info_modem"):
        best = d[case]["wall_s"]["min"]
        assert best <= MAX_STARTUP_RATIO * floor, (
            f"{case}: {best:.3f} s, {best / floor:.1f} x the import-serial floor {floor:.3f} s "
            f"(limit {MAX_STARTUP_RATIO} x)")
