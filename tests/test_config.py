"""Config file: types checked, unknown keys refused, state_dir honoured."""
import json

import pytest

from agent import config, config_check
from agent.cli import main
from agent.errors import UsageError


def write(tmp_path, text: str, raw: bytes | None = None):
    p = tmp_path / "agent.toml"
    p.write_bytes(raw if raw is not None else text.encode())
    return str(p)


def test_valid_config(tmp_path):
    cfg = config.load(write(tmp_path, 'device = "/dev/ttyUSB2"\ntransport = "cgla"\ntimeout = 5\n'
                                      'aids = ["A0000005591010FFFFFFFF8900000100"]\nrefresh = false\n'
                                      '[quirks]\nmax_apdu = 64\n'))
    assert (cfg.device, cfg.transport, cfg.timeout, cfg.refresh, cfg.quirks) == \
        ("/dev/ttyUSB2", "cgla", 5, False, {"max_apdu": 64})


@pytest.mark.parametrize("text", ['refresh = "no"', "baud = true", "timeout = true", 'aids = "A000"',
                                  "quirks = 5", "device = 5", 'transport = "qmi"', "segment_size = 1.5",
                                  "bogus = 1", "not toml ["])
def test_bad_config_is_a_usage_error(tmp_path, text):
    with pytest.raises(UsageError) as ei:
        config.load(write(tmp_path, text))
    assert ei.value.code == "config_invalid" and ei.value.exit_code == 2


def test_non_utf8_config(tmp_path):
    with pytest.raises(UsageError):
        config.load(write(tmp_path, "", raw=b"\xff\xfe = 1\n"))


def test_missing_explicit_config(tmp_path):
    with pytest.raises(UsageError) as ei:
        config.load(str(tmp_path / "nope.toml"))
    assert ei.value.code == "config_missing"


def test_state_dir_from_config_holds_the_outbox(tmp_path, monkeypatch, capsys):
    from agent.sim.euicc import SimEuicc
    monkeypatch.delenv("ESIM_AGENT_STATE_DIR", raising=False)
    state = tmp_path / "st"
    card = tmp_path / "card.json"
    SimEuicc.open(card, preload=2)
    cfg = write(tmp_path, f'state_dir = "{state}"\n')
    profiles = [p.iccid for p in SimEuicc.open(card).state.profiles]
    assert main(["--sim", str(card), "--config", cfg, "--json", "profile", "enable", profiles[1]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["data"]["notifications"]          # tried (no CA: they stay pending)
    assert (state / "esim-agent.db").exists()


# --------------------------------------------------------------------------- the daemon's keys

import dataclasses  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "agent.toml.example"


def test_defaults():
    cfg = config.Config()
    assert (cfg.socket, cfg.state_dir, cfg.discovery_interval, cfg.auto_enable, cfg.rollback_after) == \
        ("/run/esim-agent/agent.sock", None, 21600, False, 420)
    assert (cfg.report_url, cfg.report_token, cfg.report_insecure_http, cfg.default_smdp) == (None, None, False, None)
    assert (cfg.http_timeout, cfg.eim, cfg.log_level) == (30, None, "info")
    assert (cfg.device, cfg.transport, cfg.timeout, cfg.long_timeout, cfg.segment_size) == (None, "auto", 10, 300, 255)


def test_missing_default_file_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("ESIM_AGENT_CONFIG", str(tmp_path / "absent.toml"))
    assert config.load() == config.Config()


def test_daemon_keys(tmp_path):
    cfg = config.load(write(tmp_path, '''
socket = "/run/esim-agent/x.sock"
state_dir = "/var/lib/esim-agent"
discovery_interval = 0
auto_enable = true
rollback_after = 90.5
report_url = "https://fleet.example.com/esim/report?gw=1"
report_token = "tok-123"
default_smdp = "SMDP.Example.com:8443"
http_timeout = 12
log_level = "DEBUG"
[eim]
poll_interval = 0
'''))
    assert cfg.socket == "/run/esim-agent/x.sock" and cfg.discovery_interval == 0 and cfg.auto_enable is True
    assert cfg.rollback_after == 90.5 and cfg.http_timeout == 12 and cfg.log_level == "debug"
    assert cfg.report_url == "https://fleet.example.com/esim/report?gw=1" and cfg.report_token == "tok-123"
    assert cfg.default_smdp == "smdp.example.com:8443"                       # normalised like an AC address
    assert cfg.eim == {"poll_interval": 0}
    assert cfg.source.endswith("agent.toml")


def test_plain_http_report_url_only_with_the_flag(tmp_path):
    with pytest.raises(UsageError) as ei:
        config.load(write(tmp_path, 'report_url = "http://127.0.0.1:8080/r"\n'))
    assert "report_url must be an https:// URL" in ei.value.message and "report_insecure_http" in ei.value.message
    cfg = config.load(write(tmp_path, 'report_url = "http://127.0.0.1:8080/r"\nreport_insecure_http = true\n'))
    assert cfg.report_url == "http://127.0.0.1:8080/r" and cfg.report_insecure_http


def test_message_names_file_key_and_reason(tmp_path):
    p = write(tmp_path, "rollback_after = -3\n")
    with pytest.raises(UsageError) as ei:
        config.load(p)
    assert ei.value.message == f"config {p}: rollback_after must be seconds above 0, not -3"
    assert ei.value.code == "config_invalid" and ei.value.exit_code == 2


BAD = [  # (TOML, the key the message must name, a fragment of the reason)
    ("socket = 5", "socket", "absolute path"),
    ('socket = "agent.sock"', "socket", "absolute path"),
    ('socket = ""', "socket", "absolute path"),
    (f'socket = "/run/{"x" * 120}.sock"', "socket", "107 bytes"),
    ('state_dir = ""', "state_dir", "a path"),
    ('state_dir = 3', "state_dir", "a path"),
    ("discovery_interval = -1", "discovery_interval", "at or above 0"),
    ('discovery_interval = "6h"', "discovery_interval", "seconds"),
    ("discovery_interval = true", "discovery_interval", "seconds"),
    ("discovery_interval = nan", "discovery_interval", "seconds"),
    ("discovery_interval = inf", "discovery_interval", "at most"),
    ('auto_enable = "yes"', "auto_enable", "true or false"),
    ("auto_enable = 1", "auto_enable", "true or false"),
    ("rollback_after = 0", "rollback_after", "above 0"),
    ("rollback_after = false", "rollback_after", "above 0"),
    ("report_url = 5", "report_url", "https:// URL"),
    ('report_url = "fleet.example.com/r"', "report_url", "https:// URL"),
    ('report_url = "ftp://fleet.example.com/r"', "report_url", "https:// URL"),
    ('report_url = "https://"', "report_url", "https:// URL"),
    ('report_url = "https://fleet.example.com:99999/r"', "report_url", "https:// URL"),
    ('report_url = "https://fleet.example.com/a b"', "report_url", "https:// URL"),
    ('report_url = "http://fleet.example.com/r"', "report_url", "report_insecure_http = true"),
    ("report_token = 42", "report_token", "non-empty string"),
    ('report_token = ""', "report_token", "non-empty string"),
    ('report_insecure_http = "true"', "report_insecure_http", "true or false"),
    ("default_smdp = 1", "default_smdp", "SM-DP+ address"),
    ('default_smdp = "https://smdp.example.com"', "default_smdp", "bare hostname"),
    ('default_smdp = "smdp..example.com"', "default_smdp", "not a hostname"),
    ('default_smdp = "smdp.example.com:0"', "default_smdp", "bad port"),
    ('default_smdp = ""', "default_smdp", "empty"),
    ("http_timeout = 0", "http_timeout", "above 0"),
    ("http_timeout = -30", "http_timeout", "above 0"),
    ("http_timeout = 86400", "http_timeout", "at most 3600"),
    ("eim = 5", "eim", "a table"),
    ("eim = []", "eim", "a table"),
    ('eim = "https://eim.example.com"', "eim", "a table"),
    ('log_level = "warning"', "log_level", '"info" or "debug"'),
    ("log_level = 10", "log_level", '"info" or "debug"'),
    ("timeout = 0", "timeout", "above 0"),
    ("long_timeout = -1", "long_timeout", "above 0"),
    ("segment_size = 0", "segment_size", "1 to 255"),
    ("segment_size = 256", "segment_size", "1 to 255"),
    ("baud = 0", "baud", "positive"),
    ('aids = ["A0"]', "aids", "5 to 16 bytes"),
    ('aids = ["not hex at all"]', "aids", "5 to 16 bytes"),
    ('transport = "qmi"', "transport", '"auto", "csim" or "cgla"'),
    ('device = ""', "device", "a path"),
    ('ca_bundle = false', "ca_bundle", "a path"),
    ('refresh = "no"', "refresh", "true or false"),
    ('quirks = ["max_apdu"]', "quirks", "a table"),
]


@pytest.mark.parametrize("text,key,reason", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_value_message(tmp_path, text, key, reason):
    p = write(tmp_path, text + "\n")
    with pytest.raises(UsageError) as ei:
        config.load(p)
    e = ei.value
    assert e.code == "config_invalid" and e.exit_code == 2
    assert e.message.startswith(f"config {p}: {key} must be "), e.message
    assert reason in e.message, e.message


def test_toml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, 'device = "/dev/ttyUSB2"\n\nrollback_after = \n')
    with pytest.raises(UsageError) as ei:
        config.load(p)
    assert ei.value.code == "config_invalid" and ei.value.message.startswith(f"config {p}: not valid TOML")
    assert "line 3" in ei.value.message


def test_non_utf8_names_the_file(tmp_path):
    p = write(tmp_path, "", raw=b'device = "\xff"\n')
    with pytest.raises(UsageError) as ei:
        config.load(p)
    assert ei.value.code == "config_invalid" and p in ei.value.message and "UTF-8" in ei.value.message


def test_unreadable_file(tmp_path):
    with pytest.raises(UsageError) as ei:
        config.load(str(tmp_path))                     # a directory
    assert ei.value.code == "config_invalid" and str(tmp_path) in ei.value.message


def test_unknown_keys_name_file_and_keys(tmp_path):
    p = write(tmp_path, 'report_tokn = "x"\nsocket_path = "/run/a.sock"\n[eim]\nfree = 1\n')  # top level first
    with pytest.raises(UsageError) as ei:
        config.load(p)
    assert ei.value.message == f"config {p}: unknown key(s) report_tokn, socket_path"


SECRET = "s3cret-Token-value"


def test_report_token_never_shown(tmp_path):
    cfg = config.load(write(tmp_path, f'report_url = "https://fleet.example.com/r"\nreport_token = "{SECRET}"\n'))
    assert cfg.report_token == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert not next(f for f in dataclasses.fields(config.Config) if f.name == "report_token").repr
    assert cfg.to_json()["report_token"] == "(set)" and SECRET not in json.dumps(cfg.to_json())
    assert config.Config().to_json()["report_token"] is None
    # a bad token is refused without echoing it (it may be a real secret with a typo)
    for bad in (f'"{SECRET}\\n"', f'" {SECRET}"', f'"{SECRET}\\u0007"'):
        with pytest.raises(UsageError) as ei:
            config.load(write(tmp_path, f"report_token = {bad}\n"))
        assert "report_token" in ei.value.message and SECRET not in ei.value.message
    # credentials inside the URL are refused without echoing them
    with pytest.raises(UsageError) as ei:
        config.load(write(tmp_path, f'report_url = "https://gw:{SECRET}@fleet.example.com/r"\n'))
    assert "report_url" in ei.value.message and SECRET not in ei.value.message


def test_every_key_is_a_field():
    names = {f.name for f in dataclasses.fields(config.Config)} - set(config.NOT_KEYS)
    assert set(config_check.KEYS) == names


# --------------------------------------------------------------------------- systemd/agent.toml.example

def test_example_config_is_valid():
    cfg = config.load(str(EXAMPLE))
    assert cfg.source == str(EXAMPLE)
    assert cfg.device and cfg.socket == config.DEFAULT_SOCKET


def test_example_config_covers_every_key_with_valid_examples(tmp_path):
    """Every key is in the example (set, or commented out with an example value), and the
    commented-out examples are valid too."""
    text = EXAMPLE.read_text()
    uncommented = re.sub(r"(?m)^# ?([a-z_]+ = |\[[a-z_]+\]$)", r"\1", text)
    eim_ca = tmp_path / "eim-ca.pem"                   # eim.ca must name a file that exists
    eim_ca.write_text("")
    uncommented = uncommented.replace('"/etc/esim-agent/eim-ca.pem"', f'"{eim_ca}"')
    present = set(re.findall(r"(?m)^([a-z_]+) = ", uncommented)) | set(re.findall(r"(?m)^\[([a-z_]+)\]", uncommented))
    names = {f.name for f in dataclasses.fields(config.Config)} - set(config.NOT_KEYS)
    assert names <= present, f"missing from the example: {sorted(names - present)}"
    cfg = config.load(write(tmp_path, uncommented))
    assert cfg.aids and cfg.default_smdp and cfg.report_url.startswith("https://") and cfg.report_token
    assert cfg.quirks                                   # the commented quirks are examples too
    assert set(cfg.eim) == set(config_check.EIM_KEYS)        # and so are the [eim] keys
    defaults = config.Config()
    for f in dataclasses.fields(config.Config):         # each key's comment states its default
        if f.name in config.NOT_KEYS:
            continue
        block = re.search(rf"(?m)((?:^#[^\n]*\n)+)^(?:# ?)?(?:{f.name} = |\[{f.name}\])", text)
        assert block, f.name
        comment = " ".join(line.lstrip("# ") for line in block.group(1).splitlines())
        value = getattr(defaults, f.name)
        if value is None or isinstance(value, (list, dict)):
            assert re.search(r"(?i)\bdefault\b", comment), f.name
        else:
            shown = {True: "true", False: "false"}.get(value) if isinstance(value, bool) else \
                f'"{value}"' if isinstance(value, str) else f"{value:g}"
            assert f"Default {shown}" in comment, (f.name, shown, comment)
