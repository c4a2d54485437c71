"""The local SM-DP+'s start-up warm-up (``sim smdpp`` runs it in the background): it does the
first download's one-time work ahead and changes nothing the ES9+ or reservation sides see."""
from __future__ import annotations

from agent.sim import pki as simpki
from agent.sim.euicc import SimEuicc
from agent.sim.smdpp import SmdpServer


def test_smdpp_warm_up_touches_no_session_or_order(tmp_path):
    simpki.make_pki(tmp_path / "pki")
    srv = SmdpServer(tmp_path / "pki", reserve_delay=0.01)
    try:
        srv.es9.warm()
        srv.es9.warm()                                   # harmless twice
        assert srv.es9.sessions == {}
        assert srv.store.list() == []
        # the ConfigureISDP it prepared is the one every package carries
        assert srv.es9.configure_isdp() == srv.es9.configure_isdp()
        assert srv.es9.configure_isdp()[:2] == b"\xbf\x24"
    finally:
        srv.httpd.server_close()
        srv.store.close()


def test_card_warm_up_leaves_the_state_file_alone(tmp_path):
    simpki.make_pki(tmp_path / "pki")
    path = tmp_path / "card.json"
    SimEuicc.open(path, preload=1, pki_dir=tmp_path / "pki")
    before = path.read_bytes()
    card = SimEuicc.open(path)
    card.warm()
    assert path.read_bytes() == before
    assert card.apdu(bytes.fromhex("0070000001")) == bytes.fromhex("019000")
