"""The field technician's CLI (agent/cli.py, issue #2 items 8–9), end to end:
``agent.cli.main(argv)`` in-process (fast) and ``python -m agent`` in a
subprocess, against the simulated modem on a real pseudo-terminal (AT+CSIM and
AT+CGLA, every injected fault) and against ``--sim STATEFILE``.

Contract under test: with ``--json`` exactly one JSON document on stdout,
``{"ok": true, "data": ...}`` or ``{"ok": false, "error": {"code", "message"}}``;
exit 0 done, 1 the card refused, 2 bad usage/input, 3 modem/transport failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from agent.cli import main

pytestmark = pytest.mark.usefixtures("hang_guard")

BOTH = ["csim", "cgla"]
WRONG_AID = "A0000005591010FFFFFFFF8900000199"
ISDR_AID = "A0000005591010FFFFFFFF8900000100"
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
INFO2_KEYS = {"profile_version", "svn", "firmware_version", "free_nvm", "ci_pkids_for_verification",
              "ci_pkids_for_signing", "euicc_category", "rsp_capability", "gp_version", "pp_version"}
PROFILE_KEYS = {"iccid", "isdp_aid", "state", "nickname", "service_provider_name", "profile_name", "profile_class"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def agent_env(tmp_path, monkeypatch):
    """Keep the notification outbox and config out of the user's home and /etc."""
    state = tmp_path / "agent-state"
    monkeypatch.setenv("ESIM_AGENT_STATE_DIR", str(state))
    monkeypatch.setenv("ESIM_AGENT_CONFIG", str(tmp_path / "no-such-agent.toml"))
    return state


@dataclass
class Result:
    rc: int
    out: str
    err: str
    doc: dict | None
    secs: float

    @property
    def data(self) -> dict:
        assert self.doc is not None and self.doc["ok"] is True, (self.rc, self.out, self.err)
        return self.doc["data"]

    @property
    def error(self) -> dict:
        assert self.doc is not None and self.doc["ok"] is False, (self.rc, self.out, self.err)
        return self.doc["error"]


def check_json(rc: int, out: str) -> dict:
    """Exactly one JSON document on stdout, consistent with the exit code."""
    doc = json.loads(out)                      # the whole of stdout: a second document would not parse
    assert out.count("\n") == 1 and out.endswith("\n"), out
    assert isinstance(doc, dict) and doc["ok"] is (rc == 0), (rc, doc)
    if doc["ok"]:
        assert set(doc) == {"ok", "data"} and isinstance(doc["data"], dict)
    else:
        assert set(doc) == {"ok", "error"}
        assert SNAKE.fullmatch(doc["error"]["code"]), doc["error"]
        assert doc["error"]["message"].strip()
    return doc


@pytest.fixture
def run(capsys):
    """run(*argv) → Result: ``agent.cli.main`` in-process with stdout/stderr captured."""
    def run_(*argv) -> Result:
        argv = [str(a) for a in argv]
        capsys.readouterr()                     # drop what the modem thread printed (its pty path)
        t0 = time.monotonic()
        rc = main(argv)
        secs = time.monotonic() - t0
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        doc = check_json(rc, out) if "--json" in argv else None
        return Result(rc, out, err, doc, secs)
    return run_


def sub_env(tmp_path) -> dict:
    return dict(os.environ, ESIM_AGENT_STATE_DIR=str(tmp_path / "agent-state"),
                ESIM_AGENT_CONFIG=str(tmp_path / "no-such-agent.toml"), PYTHONPATH=REPO)


def run_sub(tmp_path, *argv, timeout=30, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """``python -m agent ARGV`` in a child process (never hangs the suite)."""
    return subprocess.run([sys.executable, "-m", "agent", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=sub_env(tmp_path), cwd=REPO, stdin=stdin)


def dev(server, transport: str, timeout: float = 3.0) -> list[str]:
    return ["--device", server.link, "--transport", transport, "--timeout", str(timeout)]


def card_states(server_or_card) -> dict[str, str]:
    card = getattr(server_or_card, "card", server_or_card)
    return {p.iccid: p.state for p in card.state.profiles}


def channels_closed(server) -> bool:
    return set(server.card._channels) == {0}


def iccids(server) -> tuple[str, str]:
    """(A, B): the preloaded enabled profile and the disabled one."""
    a, b = server.card.state.profiles[:2]
    assert a.state == "enabled" and b.state == "disabled"
    return a.iccid, b.iccid


@pytest.fixture
def modem(sim_modem):
    """A fresh simulated modem + real SimEuicc (2 preloaded profiles) per call: for tests that change the card."""
    return lambda *faults: sim_modem(*faults, card="real")


@pytest.fixture(scope="module")
def sim_template(tmp_path_factory):
    """One simulated eUICC state file (3 preloaded profiles) per module; tests copy it."""
    from agent.sim.euicc import SimEuicc
    path = tmp_path_factory.mktemp("sim-template") / "card.json"
    SimEuicc.open(path, preload=3)
    return path


@pytest.fixture
def simcard(sim_template, tmp_path):
    """A private copy of the template card for ``--sim``; returns its path."""
    p = tmp_path / "card.json"
    shutil.copy(sim_template, p)
    return p


def load_card(path):
    from agent.sim.euicc import SimEuicc
    return SimEuicc.open(path)


# --------------------------------------------------------------------------- read-only, both transports

def assert_chip_info(data: dict, card, *, default_dp=None) -> None:
    eid = data["eid"]
    assert re.fullmatch(r"\d{32}", eid) and int(eid) % 97 == 1
    assert eid == card.eid
    info2 = data["euicc_info2"]
    assert INFO2_KEYS <= set(info2)
    assert re.fullmatch(r"\d+\.\d+\.\d+", info2["svn"])
    assert info2["ci_pkids_for_verification"] and all(re.fullmatch(r"[0-9A-F]{40}", k)
                                                      for k in info2["ci_pkids_for_verification"])
    assert info2["ci_pkids_for_verification"] == card.state.identity.ci_pkids_verification
    assert info2["ci_pkids_for_signing"] == card.state.identity.ci_pkids_signing
    assert isinstance(info2["free_nvm"], int) and info2["free_nvm"] > 0
    addrs = data["configured_addresses"]
    assert set(addrs) == {"default_dp_address", "root_ds_address"}
    assert addrs["default_dp_address"] == default_dp == card.state.default_dp_address
    assert addrs["root_ds_address"] == card.state.root_ds_address and addrs["root_ds_address"]


def assert_profiles(data: dict, card) -> None:
    got = data["profiles"]
    assert [p["iccid"] for p in got] == [p.iccid for p in card.state.profiles]
    for p, want in zip(got, card.state.profiles):
        assert PROFILE_KEYS <= set(p)
        assert p["state"] == want.state and p["state"] in ("enabled", "disabled")
        assert p["isdp_aid"] == want.isdp_aid.upper() and len(p["isdp_aid"]) == 32
        assert p["nickname"] == want.nickname
        assert p["service_provider_name"] == want.service_provider_name
        assert p["profile_name"] == want.profile_name
        assert p["profile_class"] == {0: "test", 1: "provisioning", 2: "operational"}[want.profile_class]


@pytest.mark.parametrize("tr", BOTH)
def test_chip_info_json(shared_sim_modem, run, tr):
    server = shared_sim_modem()
    r = run(*dev(server, tr), "--json", "chip", "info")
    assert r.rc == 0
    assert_chip_info(r.data, server.card)
    assert channels_closed(server)


@pytest.mark.parametrize("tr", BOTH)
def test_profile_list_json(shared_sim_modem, run, tr):
    server = shared_sim_modem()
    r = run(*dev(server, tr), "--json", "profile", "list")
    assert r.rc == 0
    assert len(r.data["profiles"]) == 2
    assert [p["state"] for p in r.data["profiles"]] == ["enabled", "disabled"]
    assert_profiles(r.data, server.card)
    assert channels_closed(server)


@pytest.mark.parametrize("tr", BOTH)
def test_text_output_is_readable(shared_sim_modem, run, tr):
    server = shared_sim_modem()
    a, b = iccids(server)
    r = run(*dev(server, tr), "profile", "list")
    assert r.rc == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0].split() == ["ICCID", "STATE", "NICKNAME", "PROVIDER", "NAME", "CLASS", "ISD-P", "AID"]
    assert set(lines[1]) <= {"-", " "}
    row_a = next(line for line in lines if line.startswith(a))
    assert " enabled " in row_a and "Test Profile 1" in row_a and "operational" in row_a
    assert " disabled " in next(line for line in lines if line.startswith(b))
    r = run(*dev(server, tr), "chip", "info")
    assert r.rc == 0
    fields = dict(re.match(r"(.+?):\s+(.*)", line).groups() for line in r.out.splitlines())
    assert fields["EID"] == server.card.eid
    assert fields["Default SM-DP+"] == "(none)" and fields["Root SM-DS"] == server.card.state.root_ds_address
    r = run(*dev(server, tr), "notification", "list")
    assert r.rc == 0 and r.out.strip() == "no pending notifications"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.out)


# --------------------------------------------------------------------------- card refusals (exit 1)

@pytest.mark.parametrize("tr", BOTH)
def test_card_refusals_have_stable_codes(shared_sim_modem, run, tr):
    server = shared_sim_modem()
    a, b = iccids(server)
    before = card_states(server)
    d = [*dev(server, tr), "--json"]
    cases = [
        (["profile", "enable", "8949000000000000001", "--no-notifications"], "iccid_or_aid_not_found"),
        (["profile", "delete", a, "--yes", "--no-notifications"], "profile_not_in_disabled_state"),
        (["profile", "disable", b, "--no-notifications"], "profile_not_in_enabled_state"),
        (["notification", "remove", "999"], "nothing_to_delete"),
        (["profile", "nickname", "8949000000000000001", "x"], "iccid_not_found"),
        (["profile", "enable", a, "--no-notifications"], "profile_not_in_disabled_state"),
    ]
    for argv, code in cases:
        r = run(*d, *argv)
        assert (r.rc, r.error["code"]) == (1, code), argv
        assert len(r.error["message"]) > 20
        assert channels_closed(server)
    assert card_states(server) == before                    # nothing changed
    r = run(*dev(server, tr), "profile", "enable", "8949000000000000001")
    assert r.rc == 1 and r.out == "" and r.err.startswith("error: EnableProfile: the eUICC answered "
                                                           "iccidOrAidNotFound")


# --------------------------------------------------------------------------- changing the card, both transports

@pytest.mark.parametrize("tr", BOTH)
def test_enable_nickname_disable(modem, run, tr):
    server = modem()
    a, b = iccids(server)
    d = [*dev(server, tr), "--json"]
    r = run(*d, "profile", "enable", b, "--no-notifications")
    assert r.rc == 0 and r.data["enabled"] == b and r.data["attached"] is True and r.data["previous"] == a
    assert card_states(server) == {a: "disabled", b: "enabled"}
    assert server.card.isdr.last_refresh_flag is True
    states = {p["iccid"]: p["state"] for p in run(*d, "profile", "list").data["profiles"]}
    assert states == {a: "disabled", b: "enabled"}

    r = run(*d, "profile", "nickname", a, "Field unit 7 ✓")
    assert r.rc == 0 and r.data == {"iccid": a, "nickname": "Field unit 7 ✓"}
    listed = {p["iccid"]: p for p in run(*d, "profile", "list").data["profiles"]}
    assert listed[a]["nickname"] == "Field unit 7 ✓" and listed[b]["nickname"] is None

    r = run(*d, "profile", "disable", b, "--no-notifications", "--no-refresh")
    assert r.rc == 0 and r.data == {"disabled": b}
    assert card_states(server) == {a: "disabled", b: "disabled"}
    assert server.card.isdr.last_refresh_flag is False
    # by ISD-P AID this time
    aid_a = listed[a]["isdp_aid"]
    r = run(*d, "profile", "enable", aid_a, "--no-notifications")
    assert r.rc == 0 and card_states(server) == {a: "enabled", b: "disabled"}
    assert channels_closed(server)
    # nothing was delivered: no notification command ran
    assert len(server.card.state.notifications) == 4


@pytest.mark.parametrize("tr", BOTH)
def test_delete_needs_confirmation(modem, run, tr):
    server = modem()
    a, b = iccids(server)
    d = dev(server, tr)
    r = run(*d, "--json", "profile", "delete", b)
    assert r.rc == 2 and r.error["code"] == "confirmation_required" and "--yes" in r.error["message"]
    r = run(*d, "profile", "delete", b)                     # no --json, but stdin is no terminal
    assert r.rc == 2 and r.out == "" and "confirm with --yes" in r.err
    assert b in card_states(server)
    r = run(*d, "--json", "profile", "delete", b, "--yes", "--no-notifications")
    assert r.rc == 0 and r.data == {"deleted": b}
    assert card_states(server) == {a: "enabled"}
    assert [p["iccid"] for p in run(*d, "--json", "profile", "list").data["profiles"]] == [a]
    ops = [n.operation for n in server.card.state.notifications]
    assert ops == ["delete"]
    assert channels_closed(server)


@pytest.mark.parametrize("tr", BOTH)
def test_set_default_dp_then_chip_info(modem, run, tr):
    server = modem()
    d = [*dev(server, tr), "--json"]
    r = run(*d, "chip", "set-default-dp", "SMDP.Example.ORG:8443")
    assert r.rc == 0 and r.data == {"default_dp_address": "smdp.example.org:8443"}
    r = run(*d, "chip", "info")
    assert_chip_info(r.data, server.card, default_dp="smdp.example.org:8443")
    r = run(*dev(server, tr), "chip", "info")
    assert "Default SM-DP+:    smdp.example.org:8443" in r.out
    r = run(*d, "chip", "set-default-dp", "")              # '' clears it
    assert r.rc == 0 and r.data == {"default_dp_address": None}
    assert run(*d, "chip", "info").data["configured_addresses"]["default_dp_address"] is None


@pytest.mark.parametrize("tr", BOTH)
def test_notification_list_and_remove(modem, run, tr):
    """remove takes notifications off the eUICC but keeps them in the outbox (recorded first),
    so they are still listed (held in the outbox) and still delivered later."""
    server = modem()
    a, b = iccids(server)
    d = [*dev(server, tr), "--json"]
    assert run(*d, "notification", "list").data == {"notifications": [], "outbox_only": []}
    assert run(*d, "profile", "enable", b, "--no-notifications").rc == 0
    notes = run(*d, "notification", "list").data["notifications"]
    assert [(n["operation"], n["iccid"], n["address"]) for n in notes] == [
        ("disable", a, "smdp.example.com"), ("enable", b, "smdp.example.com")]
    assert all(set(n) == {"seq_number", "operation", "address", "iccid"} for n in notes)
    seqs = [n["seq_number"] for n in notes]
    assert seqs == [n.seq for n in server.card.state.notifications] and seqs[0] < seqs[1]
    text = run(*dev(server, tr), "notification", "list").out
    assert text.splitlines()[0].split() == ["SEQ", "OPERATION", "ADDRESS", "ICCID", "HELD", "IN"]
    assert f"{seqs[0]}    disable    smdp.example.com  {a}  eUICC" in text

    r = run(*d, "notification", "remove", seqs[0])
    assert r.rc == 0 and r.data == {"removed": [seqs[0]], "not_found": [], "kept_in_outbox": [seqs[0]],
                                    "dropped": [], "outbox_only": [seqs[0]]}
    listed = run(*d, "notification", "list").data
    assert [n["seq_number"] for n in listed["notifications"]] == [seqs[1]]
    assert [(n["seq_number"], n["operation"]) for n in listed["outbox_only"]] == [(seqs[0], "disable")]
    # one only in the outbox already: named again, it is retired there (dropped, kept as history)
    r = run(*d, "notification", "remove", seqs[0], seqs[1])
    assert r.rc == 0 and r.data["removed"] == [seqs[1]] and r.data["dropped"] == [seqs[0]]
    assert run(*d, "profile", "enable", a, "--no-notifications").rc == 0
    assert len(run(*d, "notification", "list").data["notifications"]) == 2
    r = run(*d, "notification", "remove", "--all")
    assert r.rc == 0 and len(r.data["removed"]) == 2 and r.data["not_found"] == []
    listed = run(*d, "notification", "list").data
    assert listed["notifications"] == [] and len(listed["outbox_only"]) == 3
    assert server.card.state.notifications == []
    r = run(*d, "notification", "remove", seqs[0])
    assert r.rc == 1 and r.error["code"] == "nothing_to_delete" and str(seqs[0]) in r.error["message"]
    assert channels_closed(server)


@pytest.mark.parametrize("tr", BOTH)
def test_chip_reset(modem, run, tr):
    server = modem()
    d = [*dev(server, tr), "--json"]
    assert run(*d, "chip", "set-default-dp", "smdp.example.org").rc == 0
    r = run(*d, "chip", "reset")
    assert r.rc == 2 and r.error["code"] == "confirmation_required"
    assert len(server.card.state.profiles) == 2
    r = run(*d, "chip", "reset", "--yes")
    assert r.rc == 0 and r.data == {"reset": True}
    assert run(*d, "profile", "list").data == {"profiles": []}
    assert server.card.state.profiles == []
    assert run(*d, "chip", "info").data["configured_addresses"]["default_dp_address"] is None
    assert run(*dev(server, tr), "profile", "list").out.strip() == "no profiles installed"


@pytest.mark.parametrize("tr", BOTH)
def test_notifications_fail_softly_without_ca(modem, run, agent_env, tr):
    """enable tries to deliver its notifications; with no CA configured delivery
    fails before any network I/O, the command still succeeds, and the notifications
    stay pending on the card (and in the outbox under ESIM_AGENT_STATE_DIR)."""
    server = modem()
    a, b = iccids(server)
    r = run(*dev(server, tr), "--json", "profile", "enable", b)
    assert r.rc == 0 and r.data["enabled"] == b
    assert card_states(server) == {a: "disabled", b: "enabled"}
    notes = r.data["notifications"]
    assert [(n["operation"], n["iccid"], n["status"]) for n in notes] == [("disable", a, "failed"),
                                                                           ("enable", b, "failed")]
    for n in notes:
        assert n["error"]["code"] == "no_trusted_ci"
        assert "CI" in n["error"]["message"] and "--ca" in n["error"]["message"]
    assert r.err == ""                                          # --json: no chatter on stderr either
    listed = run(*dev(server, tr), "--json", "notification", "list").data["notifications"]
    assert [n["seq_number"] for n in listed] == [n["seq_number"] for n in notes]
    assert (agent_env / "esim-agent.db").exists()
    # text mode: a warning on stderr that says what to do, stdout says it is done
    r = run(*dev(server, tr), "profile", "enable", a)
    assert r.rc == 0 and r.out.strip() == f"profile {a} enabled"
    assert "not sent" in r.err and "notification process" in r.err
    assert len(server.card.state.notifications) == 4
    assert channels_closed(server)


# --------------------------------------------------------------------------- modem faults through the CLI

TOLERATED = [("echo",), ("urc",), ("lowercase",), ("garbage",), ("no-prefix",), ("no-test-forms",),
             ("delay=0.2",), ("max-apdu=64",), ("echo", "urc", "lowercase", "garbage", "no-prefix")]


@pytest.mark.parametrize("tr", ["csim", "cgla", "auto"])
@pytest.mark.parametrize("faults", TOLERATED, ids="+".join)
def test_tolerated_fault(shared_sim_modem, run, tr, faults):
    server = shared_sim_modem(*faults)
    r = run(*dev(server, tr), "--json", "chip", "info")
    assert r.rc == 0, r.out
    assert_chip_info(r.data, server.card)
    assert r.secs < (3.0 if "delay=0.2" in faults else 1.5)
    if tr != "auto":                            # auto: the choice is what is new; the rest is csim/cgla
        r = run(*dev(server, tr), "--json", "profile", "list")
        assert r.rc == 0, r.out
        assert_profiles(r.data, server.card)
    assert channels_closed(server)


@pytest.mark.parametrize("tr", BOTH)
def test_changes_survive_a_noisy_modem(modem, run, tr):
    server = modem("echo", "urc", "lowercase", "garbage", "no-prefix", "no-test-forms")
    a, b = iccids(server)
    d = [*dev(server, tr), "--json"]
    assert run(*d, "profile", "enable", b, "--no-notifications").rc == 0
    assert run(*d, "profile", "nickname", b, "n" * 64).rc == 0       # an 84-byte STORE DATA
    pending = [n.seq for n in server.card.state.notifications]
    assert len(pending) == 2
    assert run(*d, "notification", "remove", "--all").data["removed"] == pending
    assert card_states(server) == {a: "disabled", b: "enabled"}
    assert server.card.state.find_iccid(b).nickname == "n" * 64
    assert channels_closed(server)


@pytest.mark.parametrize("tr", BOTH)
def test_error_at_n_fails_cleanly(modem, run, tr):
    server = modem("error@3")                   # csim: MANAGE CHANNEL, SELECT, GetEID; cgla: the 3rd ES10 call
    r = run(*dev(server, tr), "--json", "chip", "info")
    name = "AT+CSIM" if tr == "csim" else "AT+CGLA"
    assert r.rc == 3 and r.error["code"] == "modem_error"
    assert r.error["message"] == f"modem answered {name} with ERROR"
    assert r.error["details"] == {"command": name, "result": "ERROR"}
    assert r.secs < 2
    assert channels_closed(server)              # the channel is closed after the failure
    r = run(*dev(server, tr), "--json", "chip", "info")   # the modem is still usable
    assert r.rc == 0 and r.data["eid"] == server.card.eid


@pytest.mark.parametrize("tr", BOTH)
@pytest.mark.parametrize("code,shown", [("14", "+CME ERROR: 14 (SIM busy)"), ("SIM busy", "+CME ERROR: SIM busy")])
def test_cme_at_n_fails_cleanly(modem, run, tr, code, shown):
    # the EnableProfile STORE DATA: csim #3 (after MANAGE CHANNEL and SELECT), cgla #1 (AT+CCHO selects)
    server = modem(f"cme={code}@{3 if tr == 'csim' else 1}")
    a, b = iccids(server)
    r = run(*dev(server, tr), "--json", "profile", "enable", b, "--no-notifications")
    name = "AT+CSIM" if tr == "csim" else "AT+CGLA"
    assert r.rc == 3 and r.error["code"] == "modem_cme_error"
    assert r.error["message"] == f"modem answered {name} with {shown}"
    assert r.error["details"]["cme"] == (14 if code == "14" else "SIM busy")
    assert card_states(server) == {a: "enabled", b: "disabled"}   # the command never reached the card
    assert channels_closed(server)
    assert run(*dev(server, tr), "--json", "profile", "enable", b, "--no-notifications").rc == 0
    assert card_states(server) == {a: "disabled", b: "enabled"}


@pytest.mark.parametrize("tr", BOTH)
def test_silent_modem_times_out(modem, run, tr):
    server = modem(f"silent@{3 if tr == 'csim' else 1}")           # the GetProfilesInfo STORE DATA
    r = run(*dev(server, tr, timeout=2), "--json", "profile", "list")
    name = "AT+CSIM" if tr == "csim" else "AT+CGLA"
    assert r.rc == 3 and r.error["code"] == "timeout"
    assert r.error["message"].startswith(f"modem did not answer {name} within 2.0 s")
    assert 2.0 <= r.secs < 10
    assert channels_closed(server)
    r = run(*dev(server, tr, timeout=2), "--json", "profile", "list")
    assert r.rc == 0 and len(r.data["profiles"]) == 2


def test_delay_beyond_the_deadline_is_a_timeout(modem, run):
    server = modem("delay=1@2")
    r = run(*dev(server, "cgla", timeout=0.5), "--json", "chip", "info")
    assert r.rc == 3 and r.error["code"] == "timeout" and "within 0.5 s" in r.error["message"]
    assert r.secs < 5
    # the late answer arrives while the next agent opens the port: it must not be taken for another one
    r = run(*dev(server, "cgla"), "--json", "chip", "info")
    assert r.rc == 0 and r.data["eid"] == server.card.eid


@pytest.mark.parametrize("tr", BOTH)
def test_max_apdu_long_store_data(modem, run, tmp_path, tr):
    """max-apdu=64: short ES10 commands pass (test_tolerated_fault); one whose
    STORE DATA block is longer is refused by the modem with CME 3, and the APDU
    layer resends the command with smaller blocks (docs/protocol.md §1.3); it also works
    with a smaller --segment-size or with the max_apdu quirk in the config."""
    server = modem("max-apdu=64")
    a, b = iccids(server)
    nick = "N" * 64                                          # BF29 + ICCID + 64 bytes ≈ 84-byte APDU
    r = run(*dev(server, tr), "--json", "--trace", "profile", "nickname", a, nick)
    assert r.rc == 0 and server.card.state.find_iccid(a).nickname == nick
    assert "+CME ERROR: 3" in r.err                          # the refusal happened, then the fallback
    assert channels_closed(server)
    server.card.state.find_iccid(a).nickname = None

    r = run(*dev(server, tr), "--json", "--segment-size", "40", "--trace", "profile", "nickname", a, nick)
    assert r.rc == 0 and server.card.state.find_iccid(a).nickname == nick
    sent = [bytes.fromhex(m) for m in re.findall(r"APDU> ([0-9A-F]+)", r.err)]
    assert sent and max(map(len, sent)) <= 64

    cfg = tmp_path / "agent.toml"
    cfg.write_text("[quirks]\nmax_apdu = 64\n")
    r = run(*dev(server, tr), "--json", "--config", cfg, "--trace", "profile", "nickname", b, nick)
    assert r.rc == 0 and server.card.state.find_iccid(b).nickname == nick
    sent = [bytes.fromhex(m) for m in re.findall(r"APDU> ([0-9A-F]+)", r.err)]
    stores = [s for s in sent if s[1] == 0xE2]
    assert len(stores) >= 2 and max(map(len, sent)) <= 64      # the APDU layer shrank the blocks


# --------------------------------------------------------------------------- port problems (exit 3)

def test_missing_device(run, tmp_path):
    path = tmp_path / "ttyUSB9"
    r = run("--device", path, "--json", "chip", "info")
    assert r.rc == 3 and r.error["code"] == "device_not_found" and str(path) in r.error["message"]
    r = run("--device", path, "chip", "info")
    assert r.rc == 3 and r.out == "" and r.err.startswith(f"error: modem port {path} not found")


def test_busy_port(modem, run, tmp_path):
    from agent.transport.at import AtPort
    server = modem()
    with AtPort(server.link, timeout=1.0):           # another agent holds the port (same lock directory)
        r = run(*dev(server, "csim"), "--json", "chip", "info")
    assert r.rc == 3 and r.error["code"] == "port_busy"
    assert "ModemManager" in r.error["message"] and "locked by another process" in r.error["message"]
    other = tmp_path / "locks"
    other.mkdir()
    with AtPort(server.link, timeout=1.0, lock_dir=str(other)):   # only the exclusive open (TIOCEXCL/flock)
        r = run(*dev(server, "cgla"), "--json", "chip", "info")
    assert r.rc == 3 and r.error["code"] == "port_busy" and "ModemManager" in r.error["message"]
    r = run(*dev(server, "cgla"), "--json", "chip", "info")            # released: fine again
    assert r.rc == 0


def _start_agent(server, tmp_path, tr, n):
    """``python -m agent ... profile list`` in a child; returns once the modem is
    holding back the answer to the child's n-th APDU-carrying command."""
    child = subprocess.Popen([sys.executable, "-m", "agent", *dev(server, tr, timeout=5), "--json", "profile",
                              "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=sub_env(tmp_path), cwd=REPO)
    deadline = time.monotonic() + 10
    while server.logic.apdu_count < n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    return child


def test_two_agents_on_one_port(modem, tmp_path):
    """A second agent process is refused while the first holds the port."""
    server = modem("delay=3@2")                     # the first agent's SELECT takes 3 s
    first = _start_agent(server, tmp_path, "csim", 2)
    try:
        second = run_sub(tmp_path, *dev(server, "csim"), "--json", "profile", "list")
        out1, _ = first.communicate(timeout=20)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 3 and json.loads(second.stdout)["error"]["code"] == "port_busy"
    assert first.returncode == 0 and len(json.loads(out1)["data"]["profiles"]) == 2


def test_modem_unplugged_mid_command(modem, tmp_path):
    server = modem("delay=2@2")
    child = _start_agent(server, tmp_path, "csim", 2)
    try:
        t0 = time.monotonic()
        server.stop()                                   # the pty goes away under the agent
        out, err = child.communicate(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert time.monotonic() - t0 < 5
    doc = check_json(child.returncode, out)
    assert child.returncode == 3 and doc["error"]["code"] == "port_lost"
    assert "lost the modem port" in doc["error"]["message"] and "Traceback" not in err


def _signal_mid_command(server, tmp_path, tr, n, sig):
    """Start the agent, send ``sig`` while the modem holds the n-th answer; (rc, doc, stderr)."""
    child = _start_agent(server, tmp_path, tr, n)
    try:
        child.send_signal(sig)
        out, err = child.communicate(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, check_json(child.returncode, out), err


@pytest.mark.parametrize("tr", BOTH)
def test_ctrl_c_closes_the_channel(modem, tmp_path, tr):
    n = 2 if tr == "csim" else 1                        # csim: the SELECT; cgla: the GetProfilesInfo
    server = modem(f"delay=5@{n}")          # long enough for a loaded machine to send SIGINT in time
    rc, doc, err = _signal_mid_command(server, tmp_path, tr, n, signal.SIGINT)
    assert rc == 130 and doc["error"]["code"] == "interrupted"
    assert channels_closed(server) and "Traceback" not in err


def test_sigterm_closes_the_channel(modem, tmp_path):
    """systemctl stop sends SIGTERM: handled like Ctrl-C (channel closed, one JSON document, exit 143)."""
    server = modem("delay=5@1")
    rc, doc, err = _signal_mid_command(server, tmp_path, "cgla", 1, signal.SIGTERM)
    assert rc == 143 and doc["error"]["code"] == "terminated"
    assert channels_closed(server) and "Traceback" not in err


# --------------------------------------------------------------------------- trace, verbose, AIDs

@pytest.mark.parametrize("tr", ["csim", "cgla", "auto"])
def test_trace_on_stderr(shared_sim_modem, run, tr):
    server = shared_sim_modem()
    r = run(*dev(server, tr), "--json", "--trace", "chip", "info")
    assert r.rc == 0 and r.data["eid"] == server.card.eid          # stdout is still one document
    lines = r.err.splitlines()
    assert lines and all(line.startswith("[trace] ") for line in lines)
    apdus = [line.split(" ", 2)[2] for line in lines if line.startswith("[trace] APDU> ")]
    assert any("BF3E035C015A" in a for a in apdus)                 # GetEID in a STORE DATA
    assert any(line.startswith("[trace] APDU< ") and server.card.eid in line for line in lines)
    at = [line for line in lines if line.startswith("[trace] AT> ")]
    want = "AT+CSIM=" if tr == "csim" else "AT+CGLA="
    assert any(line.startswith(f"[trace] AT> {want}") for line in at)
    assert not any(line.startswith("[trace] AT> " + ("AT+CGLA=" if tr == "csim" else "AT+CSIM="))
                   for line in at)
    r = run(*dev(server, tr), "--json", "chip", "info")
    assert r.err == ""                                              # no trace without --trace


def test_verbose_logs_the_choice_of_transport(shared_sim_modem, tmp_path):
    server = shared_sim_modem("no-test-forms")
    p = run_sub(tmp_path, "-v", *dev(server, "auto"), "chip", "info")
    assert p.returncode == 0 and server.card.eid in p.stdout
    assert "using AT+CGLA" in p.stderr and "INFO" in p.stderr
    p = run_sub(tmp_path, *dev(server, "auto"), "chip", "info")
    assert p.returncode == 0 and "INFO" not in p.stderr


@pytest.mark.parametrize("tr", BOTH)
def test_aid_fallback(shared_sim_modem, run, tr):
    server = shared_sim_modem()
    r = run(*dev(server, tr), "--json", "--aid", WRONG_AID, "--aid", ISDR_AID.lower(), "--trace", "chip", "info")
    assert r.rc == 0 and r.data["eid"] == server.card.eid
    assert r.err.index(WRONG_AID) < r.err.index(ISDR_AID)          # tried in the order given
    assert channels_closed(server)
    r = run(*dev(server, tr), "--json", "--aid", WRONG_AID, "chip", "info")
    assert r.rc == 1 and r.error["code"] == "isdr_not_found"
    assert WRONG_AID in r.error["message"] and "--aid" in r.error["message"]
    assert channels_closed(server)


# --------------------------------------------------------------------------- bad usage / input (exit 2)

@pytest.mark.parametrize("argv,code", [
    (["profile", "enable", "12AB"], "bad_profile_id"),
    (["profile", "disable", "12AB"], "bad_profile_id"),
    (["profile", "delete", "12AB", "--yes"], "bad_profile_id"),
    (["profile", "nickname", "12AB", "x"], "bad_iccid"),
    (["profile", "enable", "A0000005591"], "bad_profile_id"),          # odd number of hex digits
    (["profile", "enable", "A0000005"], "bad_profile_id"),             # an AID has at least 5 bytes
    (["profile", "nickname", "8949000000000000001", "x" * 65], "bad_nickname"),
    (["chip", "set-default-dp", "https://smdp.example.com"], "ac_bad_address"),
    (["chip", "set-default-dp", "smdp..example.com"], "ac_bad_address"),
    (["notification", "remove"], "bad_usage"),
    (["notification", "remove", "abc"], "bad_usage"),
])
def test_malformed_input(simcard, run, argv, code):
    before = simcard.read_bytes()
    r = run("--sim", simcard, "--json", *argv)
    assert r.rc == 2 and r.error["code"] == code, r.out
    assert simcard.read_bytes() == before


def test_malformed_profile_id_through_the_modem(shared_sim_modem, run):
    server = shared_sim_modem()
    r = run(*dev(server, "cgla"), "--json", "profile", "enable", "12AB")
    assert r.rc == 2 and r.error["code"] == "bad_profile_id" and "'12AB'" in r.error["message"]
    assert channels_closed(server)


def test_delete_checks_the_id_before_opening_the_port(run, tmp_path):
    r = run("--device", tmp_path / "ttyUSB9", "--json", "profile", "delete", "12AB", "--yes")
    assert r.rc == 2 and r.error["code"] == "bad_profile_id"


@pytest.mark.parametrize("argv,code,words", [
    (["profile", "frobnicate"], "bad_usage", "invalid choice: 'frobnicate'"),
    (["bogus"], "bad_usage", "invalid choice: 'bogus'"),
    ([], "bad_usage", "required"),
    (["profile"], "bad_usage", "required"),
    (["--transport", "qmi", "chip", "info"], "bad_usage", "invalid choice: 'qmi'"),
    (["--timeout", "soon", "chip", "info"], "bad_usage", "invalid float value"),
    (["chip", "info", "extra"], "bad_usage", "unrecognized arguments: extra"),
    (["--device", "/dev/ttyUSB2", "--sim", "card.json", "chip", "info"], "bad_usage", "not both"),
    (["chip", "info"], "no_device", "--device"),
])
def test_bad_usage(run, argv, code, words):
    r = run("--json", *argv)
    assert r.rc == 2 and r.error["code"] == code and words in r.error["message"], r.out
    r = run(*argv)
    assert r.rc == 2 and r.out == "" and r.err.startswith("error: ")


def test_bad_timeout_for_a_device(shared_sim_modem, run):
    server = shared_sim_modem()
    r = run("--device", server.link, "--timeout", "-1", "--json", "chip", "info")
    assert r.rc == 2 and r.error["code"] == "bad_timeout"


@pytest.mark.parametrize("aid", ["ZZ", "A00000055", "not-hex"])
def test_bad_aid_is_bad_usage(simcard, run, aid):
    r = run("--sim", simcard, "--json", "--aid", aid, "chip", "info")
    assert r.rc == 2 and r.error["code"] == "bad_aid"


@pytest.mark.parametrize("size", ["256", "-1"])
def test_bad_segment_size_is_bad_usage(simcard, run, size):
    r = run("--sim", simcard, "--json", "--segment-size", size, "chip", "info")
    assert r.rc == 2 and r.error["code"] == "bad_segment_size"


def test_zero_timeout_is_refused(shared_sim_modem, run):
    server = shared_sim_modem()
    r = run("--device", server.link, "--timeout", "0", "--json", "chip", "info")
    assert r.rc == 2 and r.error["code"] == "bad_timeout"


@pytest.mark.parametrize("ac,code", [
    ("LPA:2$x$y", "ac_unsupported_format"),
    ("LPA:1$$tok", "ac_empty_address"),
    ("LPA:1$smdp.example.com", "ac_missing_fields"),
    ("hello", "ac_bad_format"),
    ("LPA:1$https://smdp.example.com$tok", "ac_bad_address"),
    ("LPA:1$smdp.example.com$tok$1.2.x", "ac_bad_oid"),
    ("LPA:1$smdp.example.com$tok$$2", "ac_bad_cc_flag"),
    ("LPA:1$a.b$t$$$ZZ", "ac_bad_ci_pkid"),
    ("LPA:1$a.b$t$1.2$1$AB$x", "ac_extra_fields"),
    ("LPA:1$smdp.example.com$to k", "ac_bad_characters"),
    ("", "ac_empty"),
])
def test_bad_activation_code(run, tmp_path, ac, code):
    card = tmp_path / "untouched.json"
    r = run("--sim", card, "--json", "profile", "download", ac, "--yes")
    assert r.rc == 2 and r.error["code"] == code, r.out
    assert not card.exists()                                       # refused before the card was opened


def test_bad_activation_code_text_mode_hint(run, tmp_path):
    r = run("--sim", tmp_path / "c.json", "profile", "download", "LPA:1$$tok", "--yes")
    assert r.rc == 2 and r.out == "" and "quote it with single quotes" in r.err


def test_download_needs_consent_without_a_terminal(run, tmp_path):
    card = tmp_path / "untouched.json"
    r = run("--sim", card, "--json", "profile", "download", "LPA:1$smdp.example.com$TOKEN")
    assert r.rc == 2 and r.error["code"] == "consent_required" and not card.exists()


# --------------------------------------------------------------------------- --sim STATEFILE in-process

def test_sim_state_file_commands(simcard, run):
    card = load_card(simcard)
    a, b, c = (p.iccid for p in card.state.profiles)
    s = ["--sim", simcard, "--json"]
    r = run(*s, "chip", "info")
    assert_chip_info(r.data, card)
    assert_profiles(run(*s, "profile", "list").data, card)
    assert run(*s, "profile", "enable", c, "--no-notifications").rc == 0
    assert run(*s, "profile", "nickname", b, "spare").rc == 0
    aid_b = card.state.profiles[1].isdp_aid
    r = run(*s, "profile", "delete", aid_b, "--yes", "--no-notifications")
    assert r.rc == 0 and r.data == {"deleted": aid_b}
    assert run(*s, "chip", "set-default-dp", "smdp.example.net").rc == 0
    card = load_card(simcard)                                        # it was all saved to the file
    assert card_states(card) == {a: "disabled", c: "enabled"}
    assert card.state.default_dp_address == "smdp.example.net"
    notes = run(*s, "notification", "list").data["notifications"]
    assert [(n["operation"], n["iccid"]) for n in notes] == [("disable", a), ("enable", c), ("delete", b)]
    assert run(*s, "notification", "remove", notes[0]["seq_number"]).data["removed"] == [notes[0]["seq_number"]]
    assert len(run(*s, "notification", "remove", "--all").data["removed"]) == 2
    r = run(*s, "profile", "delete", a)
    assert r.rc == 2 and r.error["code"] == "confirmation_required"
    r = run(*s, "profile", "disable", a, "--no-notifications")
    assert r.rc == 1 and r.error["code"] == "profile_not_in_enabled_state"
    assert run(*s, "chip", "reset", "--yes").rc == 0
    assert run(*s, "profile", "list").data == {"profiles": []}
    assert load_card(simcard).state.profiles == []


def test_sim_trace(simcard, run):
    r = run("--sim", simcard, "--json", "--trace", "profile", "list")
    assert r.rc == 0 and len(r.data["profiles"]) == 3
    assert "[trace] APDU> 0070000001" in r.err and "BF2D" in r.err


@pytest.mark.parametrize("content,code", [
    ('{"version": 1, garbage', "sim_state_corrupt"),
    ("[]", "sim_state_corrupt"),
    ('{"version": 999}', "sim_state_corrupt"),
    (b"\xff\xfe\x00binary", "sim_state_corrupt"),
])
def test_corrupt_sim_state(run, tmp_path, content, code):
    p = tmp_path / "card.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = run("--sim", p, "--json", "chip", "info")
    assert r.rc == 2 and r.error["code"] == code
    assert str(p) in r.error["message"] and "corrupt" in r.error["message"]
    r = run("--sim", p, "profile", "list")
    assert r.rc == 2 and r.out == "" and r.err.startswith(f"error: the simulated eUICC state {p} is corrupt")


def test_unreadable_sim_state(run, tmp_path):
    r = run("--sim", tmp_path, "--json", "chip", "info")                 # a directory
    assert r.rc == 2 and r.error["code"] == "sim_state_unreadable" and str(tmp_path) in r.error["message"]


# --------------------------------------------------------------------------- real processes

@pytest.mark.parametrize("tr", BOTH)
def test_subprocess_json_over_the_pty(shared_sim_modem, tmp_path, tr):
    server = shared_sim_modem()
    p = run_sub(tmp_path, *dev(server, tr), "--json", "chip", "info")
    doc = check_json(p.returncode, p.stdout)
    assert p.returncode == 0 and p.stderr == ""
    assert_chip_info(doc["data"], server.card)


def test_subprocess_errors_are_one_document(shared_sim_modem, tmp_path):
    p = run_sub(tmp_path, "--json", "profile", "list")
    assert p.returncode == 2 and check_json(2, p.stdout)["error"]["code"] == "no_device"
    p = run_sub(tmp_path, "--json", "profile", "nope")
    assert p.returncode == 2 and check_json(2, p.stdout)["error"]["code"] == "bad_usage"
    assert "usage:" not in p.stdout + p.stderr                        # argparse did not print and exit
    server = shared_sim_modem()
    p = run_sub(tmp_path, *dev(server, "cgla"), "--json", "profile", "enable", "8949000000000000001")
    assert p.returncode == 1 and check_json(1, p.stdout)["error"]["code"] == "iccid_or_aid_not_found"
    p = run_sub(tmp_path, *dev(server, "csim"), "--json", "profile", "list")
    assert p.returncode == 0
    assert_profiles(check_json(0, p.stdout)["data"], server.card)


def test_subprocess_silent_modem_exits_3(modem, tmp_path):
    server = modem("silent@2")
    t0 = time.monotonic()
    p = run_sub(tmp_path, *dev(server, "csim", timeout=1), "--json", "chip", "info", timeout=20)
    took = time.monotonic() - t0
    err = check_json(p.returncode, p.stdout)["error"]
    assert p.returncode == 3 and err["code"] == "timeout" and "within 1.0 s" in err["message"]
    assert took < 10
    assert "Traceback" not in p.stderr


def test_subprocess_corrupt_state_text_mode(tmp_path):
    bad = tmp_path / "card.json"
    bad.write_text("{not json")
    p = run_sub(tmp_path, "--sim", bad, "profile", "list")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: the simulated eUICC state") and "Traceback" not in p.stderr


def _delete_on_a_terminal(tmp_path, simcard, answer: str) -> subprocess.CompletedProcess:
    """`profile delete` with stdin on a real pty, answering the question with ``answer``."""
    master, slave = os.openpty()
    try:
        os.write(master, answer.encode() + b"\n")
        return run_sub(tmp_path, "--sim", simcard, "profile", "delete", _disabled(simcard), "--no-notifications",
                       stdin=slave)
    finally:
        os.close(master)
        os.close(slave)


def _disabled(simcard) -> str:
    return next(p.iccid for p in load_card(simcard).state.profiles if p.state == "disabled")


def test_delete_asks_on_a_terminal(tmp_path, simcard):
    victim = _disabled(simcard)
    p = _delete_on_a_terminal(tmp_path, simcard, "n")
    assert p.returncode == 2 and "Delete profile" in p.stdout and "confirm with --yes" in p.stderr
    assert victim in card_states(load_card(simcard))
    p = _delete_on_a_terminal(tmp_path, simcard, "y")
    assert p.returncode == 0 and "Delete profile" in p.stdout and f"profile {victim} deleted" in p.stdout
    assert victim not in card_states(load_card(simcard))


@pytest.mark.parametrize("tr", BOTH)
def test_enable_with_refresh_reopens_the_channel(modem, run, tr):
    """Fault "refresh": the modem resets the card after EnableProfile (REFRESH) and answers
    SIM busy for a moment. The CLI reopens the ISD-R channel, then lists and tries to send
    the enable/disable notifications (no CA here: they stay pending)."""
    server = modem("refresh")
    a, b = iccids(server)
    r = run(*dev(server, tr), "--json", "profile", "enable", b)
    assert r.rc == 0, r.out
    assert card_states(server)[b] == "enabled"
    notes = r.doc["data"]["notifications"]
    assert notes and all(n["status"] == "failed" and n["error"]["code"] == "no_trusted_ci" for n in notes)
    assert server.logic._busy_until > 0                      # the refresh really happened
    assert channels_closed(server)
    r = run(*dev(server, tr), "--json", "notification", "list")
    assert r.rc == 0 and len(r.doc["data"]["notifications"]) == len(notes)


# --------------------------------------------------------------------------- issue 9: sequence numbers are input

@pytest.mark.parametrize("argv", [
    ["notification", "remove", "--", "-1"],
    ["notification", "remove", "3", "--", "-7"],
    ["notification", "remove", str(2 ** 64)],
    ["notification", "drop", "--", "-1"],
    ["notification", "process", "--", "-1"],
    ["notification", "process", str(10 ** 30)],
])
def test_bad_sequence_numbers_are_usage_errors_before_the_card(run, tmp_path, argv):
    """`notification remove -- -1` went to the card as a RemoveNotificationFromList. A negative or
    absurd sequence number is a usage error (exit 2), found before any port or card is opened."""
    r = run("--device", tmp_path / "no-such-port", "--json", *argv)
    assert r.rc == 2 and r.error["code"] == "bad_seq_number", r.doc
    assert "sequence number" in r.error["message"]


@pytest.mark.parametrize("seqs", [[-1], [True], ["3"], [2 ** 63], [1, -2]])
def test_bad_sequence_numbers_are_refused_by_the_operations_too(seqs):
    """Through the daemon the CLI's checks are not in the way: the operations check too, before
    they touch the card (here there is none)."""
    from agent import ops
    from agent.errors import UsageError
    for op in ("notification.remove", "notification.drop", "notification.process"):
        with pytest.raises(UsageError) as ei:
            ops.run(op, ops.Context(), None, {"seqs": seqs})
        assert ei.value.code == "bad_seq_number" and ei.value.exit_code == 2
