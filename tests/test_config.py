"""Config file: types checked, unknown keys refused, state_dir honoured."""
import json

import pytest

from agent import config
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
