"""`esim-agent demo` and `demo --iot`: the README's main command, run as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys


def _demo(*extra: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "agent", "--json", "demo", *extra], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    doc = json.loads(r.stdout)
    assert doc["ok"], doc
    return doc["data"]


def test_demo_installs_both_reservations():
    data = _demo()
    assert [r["status"] for r in data["reservations"]] == ["installed", "installed"]
    iccids = {p["iccid"] for p in data["profiles"]}
    assert {r["iccid"] for r in data["reservations"]} <= iccids


def test_demo_iot_runs_the_five_emnify_actions():
    data = _demo("--iot")
    ops = data["operations"]
    assert [o["action"]["id"] for o in ops] == [1, 2, 4, 3, 5]
    assert [o["status"]["id"] for o in ops] == [2] * 5          # Succeeded
    statuses = sorted(p["status"]["id"] for p in data["profiles"])
    assert statuses == [7, 8, 9]                                # Disabled, Enabled, Deleted
    fallback = [p for p in data["profiles"] if p.get("fallback_attribute")]
    assert len(fallback) == 1 and fallback[0]["status"]["id"] == 7
    assert data["elapsed_s"] < 30
