"""Whole-process measurements: what a technician or a unit file gets.

Each run starts the installed console script as a fresh process (interpreter
start, imports, opening the port, everything), waits for it with ``wait4`` and
keeps its wall time, host CPU (user + system of that process) and peak RSS.
Figures are the median and the spread (min, max) over the runs.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import TransportError


def console_script() -> list[str]:
    """The installed `esim-agent` next to this interpreter (as a normal install leaves it),
    else the one on PATH, else `python -m agent`."""
    beside = Path(sys.executable).parent / "esim-agent"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("esim-agent")
    return [found] if found else [sys.executable, "-m", "agent"]


@dataclass
class Run:
    """One timed run of a command: wall, CPU, peak RSS, exit code, output."""
    wall_s: float
    cpu_s: float
    max_rss_mb: float
    rc: int
    out: bytes
    err: bytes


def run_wait4(argv: list[str], *, env: dict | None = None, timeout: float = 300.0, check: bool = True) -> Run:
    """One run, measured with os.wait4 (the child's own CPU and peak RSS)."""
    import tempfile
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        # Peak RSS: VmHWM of the child's own address space, read while it runs. wait4's
        # ru_maxrss cannot be used: Linux folds the high-water mark of the address space a
        # process had before exec (a copy of this benchmark's, tens of MB) into it.
        exe = argv[0] if os.sep in argv[0] else (shutil.which(argv[0]) or argv[0])
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            pid = os.posix_spawn(exe, argv, dict(os.environ if env is None else env),
                                 file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                                               (os.POSIX_SPAWN_DUP2, fo.fileno(), 1),
                                               (os.POSIX_SPAWN_DUP2, fe.fileno(), 2)])
        finally:
            os.close(devnull)
        deadline = t0 + timeout
        peak_kb = 0
        while True:
            peak_kb = max(peak_kb, _hwm_kb(pid))
            got, status, ru = os.wait4(pid, os.WNOHANG)
            if got == pid:
                break
            if time.perf_counter() > deadline:
                os.kill(pid, 9)
                os.wait4(pid, 0)
                raise TransportError(f"`{' '.join(argv[-4:])}` did not finish within {timeout:g} s",
                                     code="bench_failed")
            time.sleep(0.004)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    r = Run(wall, ru.ru_utime + ru.ru_stime, peak_kb / 1024, rc, out, err)
    if check and r.rc != 0:
        raise TransportError(f"`{' '.join(argv[-4:])}` failed (exit {r.rc}): "
                             f"{out.decode(errors='replace')[-300:]}{err.decode(errors='replace')[-300:]}",
                             code="bench_failed")
    return r


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def summary(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def summarise(rs: list[Run]) -> dict:
    """Median and spread of wall time, CPU and peak RSS over runs."""
    return {"wall_s": summary([r.wall_s for r in rs]), "cpu_s": summary([r.cpu_s for r in rs]),
            "max_rss_mb": summary([r.max_rss_mb for r in rs], 1), "runs": len(rs)}
