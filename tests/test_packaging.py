"""pyproject.toml ships every package of the agent (a wheel built from a missing entry installs
a CLI that fails with ModuleNotFoundError on the commands it lacks)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_agent_package_is_in_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "agent").rglob("__init__.py")}
    assert on_disk - listed == set(), "packages missing from pyproject.toml"
    mapped = cfg.get("package-dir", {})
    assert "agent.asn1" in listed and mapped.get("agent.asn1") == "asn1"
    assert (ROOT / "asn1" / "rsp.asn").is_file()
