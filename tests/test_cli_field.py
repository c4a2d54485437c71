"""Issue 9 items 4-6, from the user's side: the consent prompt (decline is final, "later"
postpones and is the default), input that is refused or normalised as the specifications
say, and messages (who holds a busy port, no cancel-session noise, progress output,
tables)."""
from __future__ import annotations

import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from agent import cli, render
from agent.cli import main
from agent.commands import profile as profile_cmds
from testbed import REPO, Spy, bed, make_bed, testbed_pki  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("hang_guard")


@pytest.fixture(autouse=True)
def agent_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ESIM_AGENT_STATE_DIR", str(tmp_path / "agent-state"))
    monkeypatch.setenv("ESIM_AGENT_CONFIG", str(tmp_path / "no-such-agent.toml"))


@pytest.fixture
def run(capsys):
    def run_(*argv):
        argv = [str(a) for a in argv]
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        doc = json.loads(out) if "--json" in argv else None
        return rc, out, err, doc
    return run_


@pytest.fixture(scope="module")
def sim_template(tmp_path_factory):
    from agent.sim.euicc import SimEuicc
    path = tmp_path_factory.mktemp("field-template") / "card.json"
    SimEuicc.open(path, preload=3)
    return path


@pytest.fixture
def simcard(sim_template, tmp_path):
    import shutil
    p = tmp_path / "card.json"
    shutil.copy(sim_template, p)
    return p


def load_card(path):
    from agent.sim.euicc import SimEuicc
    return SimEuicc.open(path)


# =========================================================================== item 4: consent

def _pty_download(bed, answer: str | None, *extra, timeout: float = 12.0):
    """``profile download`` with stdin and stderr on a pseudo-terminal (an operator at a
    terminal), answering the consent prompt with ``answer``. Returns (rc, stdout, terminal text)."""
    order = bed.reserve(matching_id=True)
    bed.release_card()
    master, slave = os.openpty()
    try:
        child = subprocess.Popen([sys.executable, "-m", "agent", "--sim", str(bed.card_path), "profile", "download",
                                  bed.ac(order), "--ca", bed.ca, "--no-notifications", *extra],
                                 stdin=slave, stderr=slave, stdout=subprocess.PIPE, cwd=REPO, env=bed.cli_env())
    finally:
        os.close(slave)
    seen = b""
    answered = answer is None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:          # EIO: the child closed the terminal
                    chunk = b""
                if not chunk and child.poll() is not None:
                    break
                seen += chunk
            elif child.poll() is not None:
                break
            if not answered and b"[y/n/L]" in seen:
                if answer == "^C":
                    child.send_signal(signal.SIGINT)       # Ctrl-C while the prompt waits
                else:
                    os.write(master, answer.encode() + b"\n")
                answered = True
        out = child.stdout.read().decode()
        child.wait(5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
        bed.reload_card()
    return order, child.returncode, out, seen.decode(errors="replace")


def test_consent_prompt_says_rejection_is_final_and_empty_answer_postpones(bed):
    order, rc, out, term = _pty_download(bed, "")
    assert "Profile:" in term and order["iccid"] in term
    assert "[y/n/L]" in term
    assert "later" in term and "final" in term and "endUserRejection" in term
    # Enter: postponed, the order stays usable, nothing installed.
    assert rc == 1, term
    assert "postponed" in term and "order stays usable" in term
    assert bed.iccids() == set()
    assert bed.order(order["sid"])["status"] == "available"
    assert len(bed.es9_calls("cancelSession")) == 1
    # ... and it can be downloaded afterwards.
    r = bed.cli("--json", "profile", "download", bed.ac(order), "--ca", bed.ca, "--yes", "--no-notifications")
    assert r.rc == 0, r.err
    assert bed.iccids() == {order["iccid"]}


def test_ctrl_c_at_the_consent_prompt_postpones_at_once(bed):
    t0 = time.monotonic()
    order, rc, out, term = _pty_download(bed, "^C")
    assert rc == 130, term
    assert time.monotonic() - t0 < 10
    assert bed.order(order["sid"])["status"] == "available"
    [c] = bed.es9_calls("cancelSession")
    assert bed.iccids() == set()


def test_consent_prompt_later(bed):
    order, rc, out, term = _pty_download(bed, "later")
    assert rc == 1 and bed.order(order["sid"])["status"] == "available"


def test_consent_prompt_no_is_final(bed):
    order, rc, out, term = _pty_download(bed, "n")
    assert rc == 1 and "rejected" in term
    o = bed.wait_order(order["sid"], "failed")
    assert "endUserRejection" in o["error_message"]


def test_consent_prompt_yes_installs(bed):
    order, rc, out, term = _pty_download(bed, "y")
    assert rc == 0, term
    assert f"installed profile {order['iccid']}" in out
    assert bed.iccids() == {order["iccid"]}


def test_progress_line_ends_before_the_consent_prompt(bed):
    _, rc, out, term = _pty_download(bed, "")
    before = term[:term.index("Profile:")]
    assert "\x1b[K" in before                       # the in-place progress line was shown ...
    assert before.endswith("\n"), repr(before[-80:])     # ... and ended before the prompt


def test_consent_function_answers():
    meta = type("M", (), {"profile_name": "P", "service_provider_name": "SP", "iccid": "8949000000000000019",
                          "profile_class": "operational"})()

    def ask(text):
        err = io.StringIO()
        return profile_cmds._ask_consent(meta, stdin=io.StringIO(text), err=err), err.getvalue()
    assert ask("\n")[0] == "later"
    assert ask("")[0] == "later"                    # end of input
    assert ask("later\n")[0] == "later" and ask("L\n")[0] == "later"
    assert ask("y\n")[0] is True and ask("YES\n")[0] is True
    assert ask("n\n")[0] is False and ask("no\n")[0] is False
    answer, text = ask("maybe\nn\n")                # asked again after an unknown answer
    assert answer is False and text.count("[y/n/L]") == 2
    answer, text = ask("x\nx\nx\n")                 # never a rejection by accident
    assert answer == "later"


def test_postponed_and_rejected_have_their_own_codes(bed):
    from agent.errors import EXIT_CODES
    from agent.flows.download import POSTPONE, DownloadError
    assert EXIT_CODES["postponed"] == 1 and EXIT_CODES["user_rejected"] == 1
    order = bed.reserve(matching_id=True)
    es10, es9 = Spy(bed.es10), Spy(bed.client())
    with pytest.raises(DownloadError) as ei:
        bed.download(matching_id=order["matching_id"], es10=es10, es9=es9, consent=lambda meta: POSTPONE)
    e = ei.value
    assert (e.step, e.code, e.exit_code) == ("consent", "postponed", 1)
    [c] = es10.called("cancel_session")
    assert c.args[1] == 1                           # CancelSessionReason postponed
    assert len(es9.called("cancel_session")) == 1
    assert bed.order(order["sid"])["status"] == "available"


def test_daemon_path_asks_first_and_defaults_to_not_now(monkeypatch, run, tmp_path):
    """Through the daemon the profile cannot be shown first: Enter means not now, nothing is sent."""
    class Tty(io.StringIO):
        def isatty(self):
            return True
    for where in (cli, profile_cmds):               # main() asks too (no logging set-up for a daemon job)
        monkeypatch.setattr(where, "_through_daemon", lambda args: True)
    monkeypatch.setattr(profile_cmds, "execute", lambda *a, **k: pytest.fail("nothing may be sent to the daemon"))
    monkeypatch.setattr(sys, "stdin", Tty("\n"))
    rc, out, err, _ = run("profile", "download", "LPA:1$smdp.example.com$ABC")
    assert rc == 1 and "[y/N]" in err and "order stays usable" in err
    assert "not downloading" in err


# =========================================================================== item 5: input

def _iccids(path):
    return [p.iccid for p in load_card(path).state.profiles]


def test_f_padded_iccid_accepted_by_enable_and_nickname(simcard, run):
    a, b, c = _iccids(simcard)
    padded = b + "F" * (20 - len(b))
    rc, out, err, doc = run("--sim", simcard, "--json", "profile", "nickname", padded, "spare")
    assert rc == 0, doc
    assert doc["data"]["iccid"] == b
    rc, out, err, doc = run("--sim", simcard, "--json", "profile", "enable", padded, "--no-notifications")
    assert rc == 0, doc
    assert {p.iccid: (p.state, p.nickname) for p in load_card(simcard).state.profiles}[b] == ("enabled", "spare")


def test_spaces_are_not_echoed_back(simcard, run):
    a, b, c = _iccids(simcard)
    rc, out, err, _ = run("--sim", simcard, "profile", "nickname", f"  {b} ", "  Work  ")
    assert rc == 0 and out.strip() == f"nickname of {b} set to 'Work'"
    assert load_card(simcard).state.find_iccid(b).nickname == "Work"
    rc, out, err, _ = run("--sim", simcard, "profile", "enable", f" {b}F ", "--no-notifications")
    assert rc == 0 and out.strip() == f"profile {b} enabled"


@pytest.mark.parametrize("name,words", [("", "--clear"), ("   ", "--clear"), ("work\x1b[2J", "U+001B"),
                                        ("a\nb", "U+000A"), ("n" * 65, "64 characters")])
def test_bad_nicknames_refused_before_the_card(simcard, run, name, words):
    a, b, c = _iccids(simcard)
    before = simcard.read_bytes()
    rc, out, err, doc = run("--sim", simcard, "--json", "profile", "nickname", b, name)
    assert rc == 2 and doc["error"]["code"] == "bad_nickname" and words in doc["error"]["message"]
    assert simcard.read_bytes() == before


def test_nickname_clear(simcard, run):
    a, b, c = _iccids(simcard)
    assert run("--sim", simcard, "profile", "nickname", b, "x")[0] == 0
    rc, out, err, _ = run("--sim", simcard, "profile", "nickname", b, "--clear")
    assert rc == 0 and "cleared" in out
    assert not load_card(simcard).state.find_iccid(b).nickname
    rc, out, err, doc = run("--sim", simcard, "--json", "profile", "nickname", b, "x", "--clear")
    assert rc == 2 and doc["error"]["code"] == "bad_usage"


def test_aid_not_16_bytes_never_reaches_the_card(simcard, run):
    before = simcard.read_bytes()
    for cmd in (["enable", "A0000005591010FFFFFFFF89000011"], ["disable", "A0000005591010"],
                ["delete", "A0000005591010FFFFFFFF89000011", "--yes"]):
        rc, out, err, doc = run("--sim", simcard, "--json", "--trace", "profile", *cmd)
        assert rc == 2 and doc["error"]["code"] == "bad_profile_id" and "16 bytes" in doc["error"]["message"]
        assert "APDU>" not in err
    assert simcard.read_bytes() == before


@pytest.mark.parametrize("imei", ["35693803564380A", "356938035643808", "\uff13" * 15, "35693803564380"])
def test_bad_imei_is_refused_before_anything(run, tmp_path, imei):
    card = tmp_path / "untouched.json"
    rc, out, err, doc = run("--sim", card, "--json", "profile", "download", "LPA:1$smdp.example.com$ABC",
                            "--yes", "--imei", imei)
    assert rc == 2 and doc["error"]["code"] == "bad_imei" and not card.exists()


@pytest.mark.parametrize("argv,code,words", [
    (["--smdp", "smdp.example.com", "--matching-id", "abc-1"], "ac_bad_matching_id", "0-9, A-Z and '-'"),
    (["LPA:1$smdp.example.com$abc"], "ac_bad_matching_id", "'a' at position 1"),
    (["LPA:1$" + "a" * 64 + ".example.com$ABC"], "ac_bad_address", "at most 63"),
    (["LPA:1$smdp.example.com$" + "A" * 300], "ac_too_long", "323 characters"),
    (["--smdp", "LPA:1$smdp.example.com$ABC"], "ac_bad_address", "activation code"),
])
def test_download_input_refused(run, tmp_path, argv, code, words):
    card = tmp_path / "untouched.json"
    rc, out, err, doc = run("--sim", card, "--json", "profile", "download", *argv, "--yes")
    assert rc == 2 and doc["error"]["code"] == code and words in doc["error"]["message"], doc
    assert not card.exists()


def test_set_default_dp_with_an_activation_code(simcard, run):
    rc, out, err, doc = run("--sim", simcard, "--json", "chip", "set-default-dp", "LPA:1$smdp.example.com$ABC")
    msg = doc["error"]["message"]
    assert rc == 2 and doc["error"]["code"] == "ac_bad_address"
    assert "activation code" in msg and "smdp.example.com" in msg and "port" not in msg
    rc, out, err, doc = run("--sim", simcard, "--json", "chip", "set-default-dp", " SMDP.example.com ")
    assert rc == 0 and doc["data"]["default_dp_address"] == "smdp.example.com"


# =========================================================================== item 6: messages

def _hold_port_in_child(tmp_path, link, argv_name: str, *args: str):
    """A child process holding the port's lock file, with a command line of our choosing."""
    script = tmp_path / argv_name
    script.write_text("import os, sys, time\n"
                      f"sys.path.insert(0, {REPO.as_posix()!r})\n"
                      "from agent.transport.at import PortLock\n"
                      f"lock = PortLock(os.path.realpath({str(link)!r}))\n"
                      "print('ready', flush=True)\n"
                      "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ))
    assert child.stdout.readline().strip() == "ready"
    return child


@pytest.mark.parametrize("name,args,words,mm", [
    ("esim-agent", ["daemon"], "the esim-agent daemon (PID {pid})", False),
    ("esim-agent", ["--device", "/dev/x", "profile", "download"], "another esim-agent (PID {pid}: esim-agent", False),
    ("holder.py", [], "PID {pid}", True),
])
def test_port_busy_names_the_holder(sim_modem, run, tmp_path, name, args, words, mm):
    server = sim_modem()
    child = _hold_port_in_child(tmp_path, server.link, name, *args)
    try:
        rc, out, err, doc = run("--device", server.link, "--transport", "csim", "--timeout", "2", "--json",
                                "chip", "info")
    finally:
        child.kill()
        child.wait()
    msg = doc["error"]["message"]
    assert rc == 3 and doc["error"]["code"] == "port_busy"
    assert words.format(pid=child.pid) in msg, msg
    assert doc["error"]["details"]["pid"] == child.pid
    assert ("ModemManager" in msg) is mm
    if name == "esim-agent" and args == ["daemon"]:
        assert "without --direct" in msg


class _StopAt:
    def __init__(self, step):
        self.step = step

    def __call__(self, step, done, total):
        if step == self.step:
            raise KeyboardInterrupt


def test_stop_before_the_card_has_a_session_sends_no_cancel_and_no_warning(bed, caplog):
    order = bed.reserve(matching_id=True)
    es10, es9 = Spy(bed.es10), Spy(bed.client())
    with caplog.at_level(logging.DEBUG, logger="agent"):
        with pytest.raises(KeyboardInterrupt):
            bed.download(matching_id=order["matching_id"], es10=es10, es9=es9, progress=_StopAt("AuthenticateServer"))
    assert es10.called("cancel_session") == []       # the card never opened a session for it
    assert es9.called("cancel_session") == []        # nothing signed to relay
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert bed.order(order["sid"])["status"] == "available"


def test_stop_before_authenticate_client_cancels_only_on_the_card(bed, caplog):
    order = bed.reserve(matching_id=True)
    es10, es9 = Spy(bed.es10), Spy(bed.client())
    with caplog.at_level(logging.DEBUG, logger="agent"):
        with pytest.raises(KeyboardInterrupt):
            bed.download(matching_id=order["matching_id"], es10=es10, es9=es9, progress=_StopAt("authenticateClient"))
    [c] = es10.called("cancel_session")
    assert c.error is None and c.args[1] == 1        # the card's session ended, postponed
    assert es9.called("cancel_session") == []        # the SM-DP+ has no order in this session yet
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert bed.order(order["sid"])["status"] == "available"
    assert not bed.card_has_session(es9.called("initiate_authentication")[0].result.transaction_id)


def test_progress_lines_when_stderr_is_not_a_terminal():
    out = cli.Output(False)
    stream = io.StringIO()
    now = [100.0]
    show = cli._progress_printer(out, stream=stream, clock=lambda: now[0], every=5.0)
    assert show is not None
    show("initiateAuthentication", 0, 0)
    show("loading profile", 0, 100000)
    for done in range(1000, 100001, 1000):          # 100 segments, 0.2 s apart: 20 s in all
        now[0] += 0.2
        show("loading profile", done, 100000)
    show("installed", 100000, 100000)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert lines[0] == "initiateAuthentication"
    loading = [line for line in lines if line.startswith("loading profile")]
    assert 4 <= len(loading) <= 7, lines             # the start, then about one every 5 s
    assert loading[0] == "loading profile: 0/100000 bytes (0 %)"
    assert lines[-1] == "installed"


def test_progress_on_a_terminal_ends_its_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = Tty()
    show = cli._progress_printer(cli.Output(False), stream=stream)
    show("AuthenticateServer", 0, 0)
    show.end_line()
    show.end_line()                                   # once only
    assert stream.getvalue() == "\r\x1b[KAuthenticateServer\n"
    assert cli._progress_printer(cli.Output(True), stream=stream) is None


def test_table_has_no_trailing_spaces_and_bounded_columns():
    rows = [["8949000000000000019", "enabled", "n" * 64, "P"], ["8949000000000000027", "disabled", "", ""],
            ["8949000000000000035", "disabled", "bad\x1b[31mname\n", "x"]]
    text = render.table(rows, ["ICCID", "STATE", "NICKNAME", "PROVIDER"])
    lines = text.splitlines()
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()]
    assert max(len(line) for line in lines) <= 20 + 2 + 8 + 2 + 40 + 2 + 8
    assert "…" in lines[2] and "n" * 64 not in text
    assert "\x1b" not in text and "\n" not in lines[4] and len(lines) == 5
    assert lines[4].split()[2].startswith("bad")
