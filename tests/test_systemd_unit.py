"""systemd/esim-agent.service: the settings the daemon relies on, and (when systemd-analyze is
installed) `systemd-analyze verify` clean and exposure <= 2.0 in `security --offline=true`."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "esim-agent.service"
ANALYZE = shutil.which("systemd-analyze")


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> every value, in order (systemd keys may repeat; an empty
    assignment resets the list, as systemd does for list settings)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"no continuation lines please: {raw!r}"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None and "=" in line, raw
        key, _, value = line.partition("=")
        values = current.setdefault(key.strip(), [])
        if value.strip() == "":
            values.clear()
        values.append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit():
    return parse(UNIT.read_text())


@pytest.fixture(scope="module")
def service(unit):
    return {k: v[-1] for k, v in unit["Service"].items()}


def test_notify_service_with_watchdog_and_restart(unit, service):
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "/usr/local/bin/esim-agent daemon --config /etc/esim-agent/agent.toml"
    assert service["WatchdogSec"] == "120"
    assert service["Restart"] == "on-failure" and service["RestartSec"] == "5"
    assert "2" in service["RestartPreventExitStatus"].split()     # a bad config is not retried
    assert "network-online.target" in unit["Unit"]["After"][-1].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_static_user_socket_and_state_dirs(service):
    assert (service["User"], service["Group"]) == ("esim-agent", "esim-agent")
    assert service.get("DynamicUser", "no") == "no"          # the socket's group must be stable
    assert service["SupplementaryGroups"].split() == ["dialout"]
    assert (service["RuntimeDirectory"], service["RuntimeDirectoryMode"]) == ("esim-agent", "0750")
    assert (service["StateDirectory"], service["StateDirectoryMode"]) == ("esim-agent", "0700")
    assert service["UMask"] == "0077"


def test_sysusers_declares_the_user():
    lines = [ln.split() for ln in (SYSTEMD / "esim-agent.sysusers.conf").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines and lines[0][:3] == ["u", "esim-agent", "-"]


@pytest.mark.parametrize("key,value", [
    ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
    ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"), ("ProtectClock", "yes"), ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"), ("ProcSubset", "pid"), ("DevicePolicy", "closed"),
    ("CapabilityBoundingSet", ""), ("AmbientCapabilities", ""), ("SystemCallArchitectures", "native"),
    ("MemoryDenyWriteExecute", "yes"), ("LockPersonality", "yes"), ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"), ("RestrictNamespaces", "yes"), ("RemoveIPC", "yes"), ("KeyringMode", "private"),
])
def test_hardening(service, key, value):
    assert service.get(key) == value, key


def test_devices_network_and_syscalls(unit, service):
    assert sorted(unit["Service"]["DeviceAllow"]) == ["char-ttyACM rw", "char-ttyUSB rw"]
    assert service["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service"
    # These would cut the daemon off its modem or its SM-DP+ servers (see the comments in the unit).
    for key in ("PrivateDevices", "PrivateNetwork", "PrivateUsers", "IPAddressDeny", "DynamicUser"):
        assert service.get(key, "no") in ("no", "false", ""), key


def test_notification_timer_is_folded_into_the_daemon():
    assert not (SYSTEMD / "esim-agent-notifications.service").exists()
    assert not (SYSTEMD / "esim-agent-notifications.timer").exists()
    assert (SYSTEMD / "78-esim-agent-mm-ignore.rules").exists()


# --------------------------------------------------------------------------- systemd-analyze

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@pytest.fixture
def runnable_unit(tmp_path):
    """A copy whose ExecStart names an executable that exists here (verify checks it)."""
    exe = f"{shlex.quote(sys.executable)} -m agent daemon --config /etc/esim-agent/agent.toml"
    text = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={exe}", UNIT.read_text())
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


@needs_analyze
def test_systemd_analyze_verify(runnable_unit):
    r = subprocess.run([ANALYZE, "verify", str(runnable_unit)], capture_output=True, text=True, timeout=120)
    rest = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip() and "sysinit.target" not in ln]
    assert r.returncode == 0 and rest == [], r.stdout + r.stderr


@needs_analyze
def test_systemd_analyze_security_exposure(runnable_unit):
    r = subprocess.run([ANALYZE, "security", "--offline=true", str(runnable_unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for [^:]+: ([0-9.]+)", r.stdout)
    if m is None and "--offline" in r.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {r.stderr.strip()[:200]}")
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
