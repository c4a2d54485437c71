"""SGP.32 IPAd wiring: the [eim] config table, the `ipa` commands, the daemon's poll and
fallback schedule (agent/daemon/ipa_schedule.py, with a fake clock), and one run through
the daemon against the local eIM."""
from __future__ import annotations

import json

import pytest

from agent import config
from agent.cli import build_parser, main
from agent.daemon.ipa_schedule import CAUSE_FALLBACK, CAUSE_LOCAL, WATCH_MAX, IpaSchedule, watch_interval
from agent.errors import UsageError


def write(tmp_path, text: str) -> str:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return str(p)


# --------------------------------------------------------------------------- [eim]

def test_no_eim_table_means_none_and_defaults(tmp_path):
    cfg = config.load(write(tmp_path, 'device = "/dev/ttyUSB2"\n'))
    assert cfg.eim is None and cfg.to_json()["eim"] is None
    s = cfg.eim_settings()
    assert (s.url, s.poll_interval, s.esipa_version, s.binding, s.ca, s.fallback_after) == \
        (None, 86400.0, "1.2", "asn1", None, 900.0)


def test_empty_eim_table_is_configured_with_defaults(tmp_path):
    cfg = config.load(write(tmp_path, "[eim]\n"))
    assert cfg.eim == {}
    assert cfg.to_json()["eim"]["poll_interval"] == 86400.0


def test_every_eim_key(tmp_path):
    ca = tmp_path / "eim-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = config.load(write(tmp_path, f'''[eim]
url = "https://eim.example.com:8443/base"
poll_interval = 0
esipa_version = "1.0"
binding = "json"
ca = "{ca}"
fallback_after = 60.5
'''))
    assert cfg.eim == {"url": "https://eim.example.com:8443/base", "poll_interval": 0.0, "esipa_version": "1.0",
                       "binding": "json", "ca": str(ca), "fallback_after": 60.5}
    s = cfg.eim_settings()
    assert (s.url, s.poll_interval, s.esipa_version, s.binding, s.ca, s.fallback_after) == \
        ("https://eim.example.com:8443/base", 0.0, "1.0", "json", str(ca), 60.5)
    # command-line options win, None leaves the file's value
    assert cfg.eim_settings(url="https://other.example.com", binding=None).url == "https://other.example.com"
    assert cfg.eim_settings(binding=None).binding == "json"


def test_esipa_version_as_a_toml_number(tmp_path):
    assert config.load(write(tmp_path, "[eim]\nesipa_version = 1.2\n")).eim["esipa_version"] == "1.2"
    assert config.load(write(tmp_path, "[eim]\nesipa_version = 1.0\n")).eim["esipa_version"] == "1.0"


EIM_BAD = [  # (the [eim] line, the key, a fragment of the reason)
    ('url = "http://eim.example.com"', "url", "https:// URL"),
    ('url = "eim.example.com"', "url", "https:// URL"),
    ('url = "https://"', "url", "https:// URL"),
    ('url = "https://eim.example.com:99999"', "url", "https:// URL"),
    ('url = "https://eim example.com"', "url", "https:// URL"),
    ("url = 5", "url", "https:// URL"),
    ('url = ""', "url", "https:// URL"),
    ('url = "https://user:pw@eim.example.com"', "url", "without a user or password"),
    ("poll_interval = -1", "poll_interval", "at or above 0"),
    ('poll_interval = "24h"', "poll_interval", "seconds"),
    ("poll_interval = true", "poll_interval", "seconds"),
    ("poll_interval = nan", "poll_interval", "seconds"),
    ("poll_interval = inf", "poll_interval", "at most"),
    ('esipa_version = "2.0"', "esipa_version", '"1.2" or "1.0"'),
    ("esipa_version = 1.1", "esipa_version", '"1.2" or "1.0"'),
    ("esipa_version = 12", "esipa_version", '"1.2" or "1.0"'),
    ('binding = "coap"', "binding", '"asn1" or "json"'),
    ('binding = "ASN1"', "binding", '"asn1" or "json"'),
    ("binding = 1", "binding", '"asn1" or "json"'),
    ('ca = "/nonexistent/eim-ca.pem"', "ca", "that exists"),
    ('ca = ""', "ca", "a path"),
    ("ca = 3", "ca", "a path"),
    ("fallback_after = -5", "fallback_after", "at or above 0"),
    ("fallback_after = false", "fallback_after", "seconds"),
]


@pytest.mark.parametrize("line,key,reason", EIM_BAD, ids=[b[0][:40] for b in EIM_BAD])
def test_bad_eim_value_names_file_key_and_reason(tmp_path, line, key, reason):
    p = write(tmp_path, f"[eim]\n{line}\n")
    with pytest.raises(UsageError) as ei:
        config.load(p)
    e = ei.value
    assert e.code == "config_invalid" and e.exit_code == 2
    assert e.message.startswith(f"config {p}: eim.{key} must be "), e.message
    assert reason in e.message, e.message


def test_eim_ca_that_is_a_directory(tmp_path):
    p = write(tmp_path, f'[eim]\nca = "{tmp_path}"\n')
    with pytest.raises(UsageError, match="eim.ca must be .* that exists"):
        config.load(p)


def test_unknown_eim_key(tmp_path):
    p = write(tmp_path, '[eim]\nurl = "https://eim.example.com"\npoll_intervall = 60\n')
    with pytest.raises(UsageError) as ei:
        config.load(p)
    assert ei.value.code == "config_invalid"
    assert ei.value.message.startswith(f"config {p}: unknown key(s) in [eim]: poll_intervall (known: url, ")


def test_nested_eim_table_is_an_unknown_key(tmp_path):
    with pytest.raises(UsageError, match=r"unknown key\(s\) in \[eim\]: nested"):
        config.load(write(tmp_path, "[eim]\n[eim.nested]\nx = 1\n"))


def test_config_error_through_the_cli_is_one_json_document(tmp_path, capsys):
    p = write(tmp_path, '[eim]\nbinding = "xml"\n')
    assert main(["--config", p, "--json", "ipa", "list-eim"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["code"] == "config_invalid" and "eim.binding" in doc["error"]["message"]


# --------------------------------------------------------------------------- the `ipa` commands

@pytest.mark.parametrize("argv,func", [
    (["ipa", "add-eim", "x.der"], "cmd_ipa_add_eim"),
    (["ipa", "list-eim"], "cmd_ipa_list_eim"),
    (["ipa", "poll"], "cmd_ipa_poll"),
    (["ipa", "status"], "cmd_ipa_status"),
    (["ipa", "return-from-fallback"], "cmd_ipa_return_from_fallback"),
])
def test_ipa_commands_parse(argv, func):
    a = build_parser().parse_args(argv + ["--json", "--direct"])
    assert a.func.__name__ == func and a.json and a.direct


def test_ipa_eim_options_parse_and_are_checked(tmp_path, capsys):
    a = build_parser().parse_args(["ipa", "poll", "--eim-url", "https://eim.example.com", "--esipa-version", "1.0",
                                   "--binding", "json"])
    assert (a.eim_url, a.esipa_version, a.binding) == ("https://eim.example.com", "1.0", "json")
    with pytest.raises(UsageError):
        build_parser().parse_args(["ipa", "poll", "--binding", "xml"])
    with pytest.raises(UsageError):
        build_parser().parse_args(["ipa"])                      # an action is required
    cfg = write(tmp_path, "")
    assert main(["--config", cfg, "--json", "--sim", str(tmp_path / "c.json"), "ipa", "poll",
                 "--eim-url", "ftp://eim.example.com"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["code"] == "bad_input" and err["message"].startswith("--eim-url must be an https:// URL")


def test_add_eim_needs_a_readable_file(tmp_path, capsys):
    cfg = write(tmp_path, "")
    assert main(["--config", cfg, "--json", "--sim", str(tmp_path / "c.json"), "ipa", "add-eim",
                 str(tmp_path / "missing.der")]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["code"] == "bad_file" and "missing.der" in err["message"]


def test_direct_context_carries_the_eim_settings(tmp_path):
    from agent.cli import Output, context
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    args = build_parser().parse_args(["ipa", "poll", "--binding", "json"])
    args.config = config.load(write(tmp_path, f'[eim]\nurl = "https://eim.example.com"\nca = "{ca}"\n'
                                              "fallback_after = 0\n"))
    ctx = context(args, Output(True), None)
    assert (ctx.eim.url, ctx.eim.binding, ctx.eim.esipa_version, ctx.eim.ca, ctx.eim.fallback_after) == \
        ("https://eim.example.com", "json", "1.2", str(ca), 0.0)


def test_worker_context_carries_the_eim_settings(tmp_path, monkeypatch):
    from agent.daemon.worker import Worker
    from agent.journal import Journal
    monkeypatch.setenv("ESIM_AGENT_STATE_DIR", str(tmp_path / "state"))
    cfg = config.load(write(tmp_path, '[eim]\npoll_interval = 60\nbinding = "json"\n'))
    w = Worker(cfg)
    try:
        job = w.journal.create("ipa.poll", {}, source="eim")
        ctx = w.context(job, None, [])
        assert (ctx.eim.poll_interval, ctx.eim.binding, ctx.eim.url) == (60.0, "json", None)
    finally:
        w.journal.close()
    assert isinstance(w.journal, Journal)


def test_ipa_kinds_are_daemon_jobs():
    from agent.daemon.main import JOB_KINDS
    assert {"ipa.add_eim", "ipa.list_eim", "ipa.poll", "ipa.status", "ipa.return_from_fallback",
            "ipa.fallback"} <= JOB_KINDS


# --------------------------------------------------------------------------- the schedule (fake clock)

def sched(*, configured=True, url=False, poll_interval=86400, fallback_after=900, now=1000.0):
    return IpaSchedule(configured=configured, url=url, poll_interval=poll_interval, fallback_after=fallback_after,
                       now=now)


def kinds(jobs):
    return [(j.kind, j.params, j.why) for j in jobs]


def test_watch_interval():
    assert watch_interval(900) == 300 and watch_interval(60) == 20 and watch_interval(0) is None
    assert watch_interval(10 * 86400) == WATCH_MAX


def test_url_in_config_polls_at_start_up_then_every_interval():
    s = sched(url=True, poll_interval=3600, fallback_after=0)
    assert kinds(s.due(1000.0)) == [("ipa.poll", {}, "start-up")]
    assert s.due(1001.0) == [] and s.next_time() == 4600.0
    assert s.due(4599.0) == []
    assert kinds(s.due(4600.0)) == [("ipa.poll", {}, "timer")]
    assert s.next_time() == 8200.0


def test_poll_interval_zero_polls_at_start_up_only():
    s = sched(url=True, poll_interval=0, fallback_after=0)
    assert kinds(s.due(1000.0)) == [("ipa.poll", {}, "start-up")]
    assert s.next_time() is None and s.due(10 ** 9) == []


def test_no_eim_known_no_poll_until_the_card_has_one():
    s = sched(configured=True, url=False, fallback_after=0)
    assert s.due(1000.0) == [] and not s.active
    s.card_eim_count(None, 1001.0)                  # the card could not say (SGP.22 eUICC)
    assert s.due(1001.0) == []
    s.card_eim_count(0, 1002.0)
    assert s.due(1002.0) == []
    s.card_eim_count(1, 1500.0)                     # `ipa add-eim` happened
    assert kinds(s.due(1500.0)) == [("ipa.poll", {}, "eim_added")]
    s.card_eim_count(1, 1600.0)                     # still one: nothing new
    assert s.due(1600.0) == [] and s.next_time() == 1500.0 + 86400
    s.card_eim_count(0, 2000.0)                     # the eIM was removed: polling stops
    assert s.next_time() is None


def test_card_with_an_eim_polls_without_an_eim_table():
    s = sched(configured=False, url=False)
    assert s.next_time() is None                    # no [eim]: no watch either
    s.card_eim_count(1, 1010.0)
    assert kinds(s.due(1010.0)) == [("ipa.poll", {}, "eim_added")]
    # without [eim], fallback is never the daemon's business
    s.observe(registered=False, enabled_iccid="A", now=1020.0, fallback_iccid="B", fallback_known=True)
    assert s.observe(registered=False, enabled_iccid="A", now=10 ** 6) == []


def test_connectivity_returning_polls():
    s = sched(url=True, fallback_after=0)
    s.due(1000.0)
    assert s.observe(registered=True, enabled_iccid="A", now=1001.0) == []      # first reading: no "return"
    assert s.observe(registered=False, enabled_iccid="A", now=1100.0) == []
    assert s.observe(registered=None, enabled_iccid="A", now=1150.0) == []      # unknown: nothing
    assert kinds(s.observe(registered=True, enabled_iccid="A", now=1200.0)) == [("ipa.poll", {}, "connectivity")]
    assert s.next_time() == 1200.0 + 86400                                      # the timer restarts
    assert s.observe(registered=True, enabled_iccid="A", now=1300.0) == []


def test_connectivity_returning_without_an_eim_does_not_poll():
    s = sched(url=False)
    s.observe(registered=False, enabled_iccid="A", now=1001.0)
    assert s.observe(registered=True, enabled_iccid="A", now=1002.0) == []


def test_fallback_after_no_registration_with_a_fallback_profile():
    s = sched(url=True, fallback_after=900)
    s.due(1000.0)
    assert s.next_time() == 1300.0                                             # the watch, every 300 s
    assert kinds(s.due(1300.0)) == [("watch", {}, "timer")] and s.next_time() == 1600.0
    s.observe(registered=True, enabled_iccid="A", now=1300.0, fallback_iccid="B", fallback_known=True)
    assert s.observe(registered=False, enabled_iccid="A", now=1600.0) == []     # lost at 1600
    assert s.observe(registered=False, enabled_iccid="A", now=2499.0) == []     # 899 s
    assert kinds(s.observe(registered=False, enabled_iccid="A", now=2500.0)) == [("ipa.fallback", {}, "no_registration")]
    assert s.observe(registered=False, enabled_iccid="A", now=3000.0) == []     # asked once
    # the fallback job told the eIM itself: the fallback profile registering is a plain "connectivity" poll
    s.job_finished("ipa.fallback", "done", {}, {"enabled": "B", "report": {"executed": []}})
    assert kinds(s.observe(registered=True, enabled_iccid="B", now=3100.0)) == [("ipa.poll", {}, "connectivity")]


def test_a_fallback_the_eim_was_not_told_of_goes_with_the_next_poll():
    s = sched(url=True, fallback_after=100)
    s.observe(registered=False, enabled_iccid="A", now=0.0, fallback_iccid="B", fallback_known=True)
    assert len(s.observe(registered=False, enabled_iccid="A", now=100.0)) == 1
    s.job_finished("ipa.fallback", "done", {}, {"enabled": "B", "report_error": {"code": "connection_failed"}})
    assert kinds(s.observe(registered=True, enabled_iccid="B", now=200.0)) == \
        [("ipa.poll", {"state_change_cause": CAUSE_FALLBACK}, "connectivity")]
    s.job_finished("ipa.poll", "failed", {"state_change_cause": CAUSE_FALLBACK})
    assert s.pending_cause == CAUSE_FALLBACK                                     # not told yet
    assert kinds(s.due(200.0 + 86400)) == [("ipa.poll", {"state_change_cause": CAUSE_FALLBACK}, "timer"),
                                           ("watch", {}, "timer")]
    s.job_finished("ipa.poll", "done", {"state_change_cause": CAUSE_FALLBACK})
    assert s.pending_cause is None
    s.job_finished("ipa.return_from_fallback", "done", {}, {"report_error": {"code": "x"}})
    assert s.pending_cause == CAUSE_LOCAL


def test_no_fallback_without_a_fallback_profile_or_when_it_is_enabled():
    s = sched(url=True, fallback_after=60)
    s.observe(registered=False, enabled_iccid="A", now=1000.0, fallback_iccid=None, fallback_known=True)
    assert s.observe(registered=False, enabled_iccid="A", now=5000.0) == []
    s.observe(registered=False, enabled_iccid="B", now=5001.0, fallback_iccid="B", fallback_known=True)
    assert s.observe(registered=False, enabled_iccid="B", now=9000.0) == []      # the fallback itself is enabled


def test_fallback_after_zero_never_falls_back_nor_watches():
    s = sched(url=True, fallback_after=0)
    s.due(1000.0)
    assert s.next_time() == 1000.0 + 86400
    s.observe(registered=False, enabled_iccid="A", now=1000.0, fallback_iccid="B", fallback_known=True)
    assert s.observe(registered=False, enabled_iccid="A", now=10 ** 6) == []


def test_registration_or_another_profile_restarts_the_count():
    s = sched(url=True, fallback_after=900)
    s.observe(registered=False, enabled_iccid="A", now=1000.0, fallback_iccid="C", fallback_known=True)
    assert s.observe(registered=False, enabled_iccid="A", now=1800.0) == []
    s.observe(registered=True, enabled_iccid="A", now=1850.0)                   # back (and a poll)
    assert s.observe(registered=False, enabled_iccid="A", now=1900.0) == []     # lost again at 1900
    assert s.observe(registered=False, enabled_iccid="A", now=2700.0) == []
    assert s.observe(registered=False, enabled_iccid="B", now=2750.0) == []     # switched: B's own 900 s
    assert s.observe(registered=False, enabled_iccid="B", now=3600.0) == []
    assert kinds(s.observe(registered=False, enabled_iccid="B", now=3650.0)) == [("ipa.fallback", {}, "no_registration")]


def test_fallback_again_only_after_registration():
    s = sched(url=True, fallback_after=100)
    s.observe(registered=False, enabled_iccid="A", now=0.0, fallback_iccid="C", fallback_known=True)
    assert len(s.observe(registered=False, enabled_iccid="A", now=100.0)) == 1
    s.job_finished("ipa.fallback", "failed")                                      # e.g. catBusy
    assert s.observe(registered=False, enabled_iccid="A", now=500.0) == []
    s.observe(registered=True, enabled_iccid="A", now=600.0)
    s.observe(registered=False, enabled_iccid="A", now=700.0)
    assert len(s.observe(registered=False, enabled_iccid="A", now=800.0)) == 1


# --------------------------------------------------------------------------- status

def test_status_renders_the_eim_lines():
    from agent.daemon.status import render
    text = render({"daemon": None, "daemon_message": "x", "jobs": [],
                   "ipa": {"configured": True, "polling": True, "url": None, "esipa_version": "1.2",
                           "binding": "asn1", "poll_interval": 86400.0, "next_poll_in_s": 3600.0,
                           "last_poll": {"finished_at": "2025-01-01T00:00:00", "state": "done", "error": None,
                                         "executed": 2},
                           "fallback_after": 900.0, "fallback_iccid": "8901", "unregistered_for_s": 12.0}})
    assert "eIM:           the eUICC's eIM configuration (ESipa 1.2, asn1), poll every 86400 s, next in 3600 s" in text
    assert "last poll:   2025-01-01T00:00:00 done, executed 2" in text
    assert "fallback:    after 900 s without registration, to 8901; unregistered for 12 s" in text
    text = render({"daemon": None, "jobs": [], "ipa": {"polling": False, "card_eims": 0}})
    assert "not polling: no eIM on the eUICC (esim-agent ipa add-eim FILE)" in text


# --------------------------------------------------------------------------- through the daemon, end to end
#
# As an operator's check would run it: a test PKI, the local eIM (`sim eim`), an IoT eUICC
# behind the simulated modem (`sim modem --iot`), the daemon with an [eim] table, the CLI
# through its socket; the eIM's REST API is what tells whether the IPA did its work.

import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import time_limit  # noqa: E402
from iot_testbed import LocalEim  # noqa: E402
from iot_testbed import wait_for as _wait  # noqa: E402
from test_daemon import World  # noqa: E402


def _iot_world(name: str, *, eim_lines: list[str], network=(), config=None):
    """(world, eIM, PKI dir, the two preloaded ICCIDs): an IoT card with two profiles (the first enabled)."""
    from agent.sim.euicc import SimEuicc
    from agent.sim.pki import make_pki
    d = Path(tempfile.mkdtemp(prefix=f"etipa{name}-", dir="/tmp"))
    pki = d / "pki"
    make_pki(str(pki))
    eim = LocalEim(pki, d / "eim.log")
    card = d / "card.json"
    iccids = [p.iccid for p in SimEuicc.open(card, preload=2, pki_dir=str(pki), iot=True).state.profiles]
    modem_args = ["--iot"] + [a for n in network for a in ("--network", n.format(*iccids))]
    w = World(name, card, modem_args=modem_args, workdir=d,
              config={"ca_bundle": str(pki / "ci.pem"), "rollback_after": 15, **(config or {})})
    w.cfg.write_text(w.cfg.read_text() + "[eim]\n" + "\n".join(x.format(pki=pki) for x in eim_lines) + "\n")
    return w, eim, pki, iccids


def _teardown(w, eim):
    try:
        w.close()
    finally:
        eim.close()
        shutil.rmtree(w.dir, ignore_errors=True)


def test_add_eim_and_poll_through_the_daemon():
    # the [eim] table of the operator's check: poll_interval and the CA of the eIM's TLS
    w, eim, pki, iccids = _iot_world("a", eim_lines=["poll_interval = 86400", 'ca = "{pki}/ci.pem"'])
    try:
        with time_limit(150):
            w.start_modem()
            w.start_daemon()
            before = w.status()
            assert before["ipa"]["configured"] and not before["ipa"]["polling"]   # no eIM known yet: no poll

            r = w.cli("--json", "ipa", "add-eim", pki / "eim" / "eim-config.der")
            assert r.rc == 0 and r.doc["ok"], r
            assert r.doc["data"]["added"][0]["eim_id"] == "esim-agent-eim"
            eid = w.cli("--json", "chip", "info").doc["data"]["eid"]

            # the daemon saw the eIM appear and polled by itself (source eim); the eIM learnt the eUICC
            auto = _wait(lambda: [j for j in w.jobs() if j["kind"] == "ipa.poll" and j["source"] == "eim"
                                  and j["state"] in ("done", "failed")], 60, "no poll of the daemon's own", w)
            assert auto[0]["state"] == "done", auto
            r = w.cli("--json", "ipa", "poll")
            assert r.rc == 0 and r.doc["ok"] and r.doc["data"]["eim_id"] == "esim-agent-eim", r
            rec = eim.euicc(eid)
            assert rec is not None, eim.api("GET", "/api/v1/euicc")
            assert sorted(p["iccid_with_luhn"] for p in rec["profile"]) == sorted(iccids)

            # an audit scheduled through the REST API is run by the next `ipa poll`, which says so
            op = eim.api("POST", f"/api/v1/euicc/{rec['id']}/operation", [{"action": {"id": 1}}])[0]
            r = w.cli("ipa", "poll")
            assert r.rc == 0, r
            assert "executed 1" in r.stdout and "listProfileInfo" in r.stdout, r
            status = _wait(lambda: eim.api("GET", f"/api/v1/euicc/{rec['id']}/operation/{op['id']}")["status"]["id"]
                           != 1 or None, 20, "the audit stays scheduled", w)
            assert status == 2 or eim.api("GET", f"/api/v1/euicc/{rec['id']}/operation/{op['id']}")["status"]["id"] == 2

            r = w.cli("ipa", "list-eim")
            assert r.rc == 0 and "esim-agent-eim" in r.stdout and f"127.0.0.1:{eim.port}" in r.stdout, r
            st = w.status()["ipa"]
            assert st["polling"] and st["card_eims"] == 1 and st["next_poll_in_s"] > 86000
            assert st["last_poll"]["state"] == "done"
            r = w.cli("status")
            assert r.rc == 0 and "eIM:           the eUICC's eIM configuration (ESipa 1.2, asn1), poll every 86400 s" \
                in r.stdout, r
            # every job went through the journal
            kinds = {row["kind"] for row in w.db("SELECT kind FROM jobs")}
            assert {"ipa.add_eim", "ipa.poll", "ipa.list_eim"} <= kinds
            # the direct-run options are refused while the daemon owns the card
            r = w.cli("--json", "ipa", "poll", "--binding", "json")
            assert r.rc == 2 and r.code == "eim_options_direct", r
    finally:
        _teardown(w, eim)


def test_fallback_when_the_enabled_profile_never_registers():
    """The enabled profile never registers (the modem's --network ICCID:never); once the eIM
    marked the other one as the fallback profile, the daemon's watch runs ExecuteFallbackMechanism."""
    w, eim, pki, iccids = _iot_world("f", eim_lines=["poll_interval = 0", "fallback_after = 3"],
                                     network=["{0}:never"])
    p1, p2 = iccids
    try:
        with time_limit(170):
            w.start_modem()
            w.start_daemon()
            assert w.cli("--json", "ipa", "add-eim", pki / "eim" / "eim-config.der").rc == 0
            eid = w.cli("--json", "chip", "info").doc["data"]["eid"]
            assert w.cli("--json", "ipa", "poll").rc == 0
            rec = _wait(lambda: eim.euicc(eid), 20, "the eIM does not know the eUICC", w)
            assert not any(j["kind"] == "ipa.fallback" for j in w.jobs())        # no fallback profile yet
            eim.api("POST", f"/api/v1/euicc/{rec['id']}/operation", [{"action": {"id": 4}, "iccid_with_luhn": p2}])
            assert w.cli("--json", "ipa", "poll").rc == 0
            job = _wait(lambda: next((j for j in w.jobs() if j["kind"] == "ipa.fallback"
                                      and j["state"] in ("done", "failed")), None), 90, "no fallback", w)
            job = w.job(job["id"])
            assert job["source"] == "eim" and job["state"] == "done", job
            assert job["result"]["previous"] == p1 and job["result"]["enabled"] == p2, job
            assert w.enabled() == p2
            out, _ = w.daemon_logs()
            assert "why=no_registration" in out
            st = w.status()["ipa"]
            assert st["fallback_after"] == 3 and st["fallback_iccid"] == p2
    finally:
        _teardown(w, eim)
