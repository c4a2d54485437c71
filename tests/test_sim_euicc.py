"""Simulated eUICC: ISO 7816-4 layer, ES10a/b/c functions, state rules, notifications,
persistence, and the eUICC side of a profile download (docs/protocol.md §1, §2, §4, §6, §8)."""
from __future__ import annotations

import hashlib
import os
import random

import pytest

from agent import apdu as A
from agent import codec, crypto, es8p, tlv
from agent.errors import AgentError
from agent.es10 import Es10, Es10Error
from agent.ids import eid_to_bytes, eid_valid, iccid_to_bytes, luhn_valid, make_iccid
from agent.sim import pki as pki_mod
from agent.sim import upp as upp_mod
from agent.sim.euicc import SimEuicc
from agent.sim.isdr import ISDR_AID
from agent.sim.state import StateError

ADDRESS = "smdp.example.com"


# --- fixtures and helpers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return pki_mod.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def card(tmp_path, pki):
    return SimEuicc.open(tmp_path / "card.json", preload=3, pki_dir=pki.directory)


class _Transport:
    """Minimal ApduTransport straight into the card (no modem)."""

    def __init__(self, card):
        self.card = card

    def transmit(self, apdu, timeout=None):
        return self.card.apdu(apdu)

    def open_channel(self, aid):
        return A.open_channel_raw(self.transmit, aid)

    def close_channel(self, ch):
        A.close_channel_raw(self.transmit, ch)

    def close(self):
        pass


@pytest.fixture
def es(card):
    isdr = A.Isdr(_Transport(card), segment_size=120)
    with isdr:
        yield Es10(isdr)


def tx(card, apdu) -> tuple[bytes, int]:
    if isinstance(apdu, str):
        apdu = bytes.fromhex(apdu.replace(" ", ""))
    r = card.apdu(apdu)
    assert len(r) >= 2
    return r[:-2], int.from_bytes(r[-2:], "big")


def open_isdr(card) -> int:
    data, sw = tx(card, "00 70 00 00 01")
    assert sw == 0x9000 and len(data) == 1
    ch = data[0]
    _, sw = tx(card, bytes([A.cla_for(0, ch), 0xA4, 0x04, 0x00, 16]) + ISDR_AID + b"\x00")
    assert sw == 0x9000
    return ch


def store_data(card, ch, payload, seg=255, le=None) -> tuple[bytes, int]:
    """STORE DATA blocks + GET RESPONSE loop, done by hand."""
    blocks = [payload[i:i + seg] for i in range(0, len(payload), seg)]
    for n, b in enumerate(blocks):
        last = n == len(blocks) - 1
        apdu = bytes([A.cla_for(0x80, ch), 0xE2, 0x91 if last else 0x11, n, len(b)]) + b
        if le is not None:
            apdu += bytes([le])
        data, sw = tx(card, apdu)
        if not last:
            assert (data, sw) == (b"", 0x9000)
    out = bytearray(data)
    while sw >> 8 == 0x61:
        data, sw = tx(card, bytes([A.cla_for(0, ch), 0xC0, 0, 0, sw & 0xFF]))
        out += data
    return bytes(out), sw


def euicc_pub(card):
    return crypto.load_cert(card.state.identity.euicc_cert_pem)


# --- ISO 7816-4 layer ---------------------------------------------------------------------

def test_manage_channel_and_select(card):
    ch = open_isdr(card)
    assert ch == 1
    # SELECT with Le: FCI 6F template with the ISD-R AID and 9000 directly
    data, sw = tx(card, bytes([0x01, 0xA4, 0x04, 0x00, 16]) + ISDR_AID + b"\x00")
    assert sw == 0x9000
    fci = tlv.parse_single(data)
    assert fci.tag == 0x6F and tlv.find(tlv.children(fci), 0x84).value == ISDR_AID
    # without Le (AT+CSIM style, T=0): 61xx then GET RESPONSE gives the same FCI
    d2, sw = tx(card, bytes([0x01, 0xA4, 0x04, 0x00, 16]) + ISDR_AID)
    assert d2 == b"" and sw == 0x6100 | len(data)
    d3, sw = tx(card, bytes([0x01, 0xC0, 0x00, 0x00, sw & 0xFF]))
    assert (d3, sw) == (data, 0x9000)
    # P2 = 0C: no response data
    assert tx(card, bytes([0x01, 0xA4, 0x04, 0x0C, 16]) + ISDR_AID) == (b"", 0x9000)
    # unknown AID
    assert tx(card, "01 A4 04 00 10 A0000005591010FFFFFFFF8900000200 00")[1] == 0x6A88
    # close, then the channel is gone
    assert tx(card, "00 70 80 01 00")[1] == 0x9000       # docs/protocol.md §1.2 form, Le 00
    assert tx(card, "81 E2 91 00 03 BF 2E 00")[1] == 0x6881
    assert tx(card, "00 70 80 01")[1] == 0x6881          # closing it twice
    assert tx(card, "00 70 80 00")[1] == 0x6A86          # the basic channel stays


def test_channels_4_to_19_use_further_interindustry_cla(card):
    chans = [tx(card, "00 70 00 00 01")[0][0] for _ in range(19)]
    assert chans == list(range(1, 20))
    assert tx(card, "00 70 00 00 01")[1] == 0x6A81        # none left
    for ch in (3, 4, 5, 19):
        cla = A.cla_for(0x00, ch)
        assert cla == (ch if ch < 4 else 0x40 | (ch - 4))
        _, sw = tx(card, bytes([cla, 0xA4, 0x04, 0x00, 16]) + ISDR_AID + b"\x00")
        assert sw == 0x9000
        data, sw = store_data(card, ch, bytes.fromhex("BF3E035C015A"))
        assert sw == 0x9000
        assert codec.decode("GetEuiccDataResponse", data)["eidValue"] == eid_to_bytes(card.eid)
    # STORE DATA on channel 5 is CLA C1 (proprietary bit kept)
    assert A.cla_for(0x80, 5) == 0xC1
    # a channel that was never opened, encoded the 4-19 way: close 7, then use it
    assert tx(card, "00 70 80 07")[1] == 0x9000
    assert tx(card, bytes([0xC3, 0xE2, 0x91, 0x00, 0x03]) + bytes.fromhex("BF2E00"))[1] == 0x6881
    # manage channel from a logical channel; open with a named channel number
    assert tx(card, "00 70 00 07 01") == (b"\x07", 0x9000)


def test_class_and_instruction_errors(card):
    open_isdr(card)
    assert tx(card, "A0 A4 00 00 02 3F 00")[1] == 0x6E00               # GSM class
    assert tx(card, "81 A4 04 00 10" + ISDR_AID.hex() + "00")[1] == 0x6E00  # SELECT with proprietary class
    assert tx(card, "01 E2 91 00 03 BF 2E 00")[1] == 0x6E00            # STORE DATA without it
    assert tx(card, "81 CA 00 5A 00")[1] == 0x6D00                     # unknown INS
    assert tx(card, "85 E2 91 00 03 BF 2E 00")[1] == 0x6882            # secure messaging bits
    assert tx(card, "91 E2 91 00 03 BF 2E 00")[1] == 0x6884            # command chaining bit
    assert tx(card, "FF E2 91 00 03 BF 2E 00")[1] == 0x6E00
    assert tx(card, "01 C0 00 00 10")[1] == 0x6985                     # nothing to get
    assert tx(card, "80 E2 91 00 03 BF 2E 00")[1] == 0x6985            # ch 0: ISD-R not selected
    assert tx(card, "81")[1] == 0x6700                                 # shorter than a header
    assert tx(card, "81 E2 91 00 05 BF 2E 00")[1] == 0x6700            # Lc says 5, 3 present
    assert tx(card, "81 E2 91 00 00 00 03 BF 2E 00")[1] == 0x6700      # extended length
    assert tx(card, "81 E2 91 00")[1] == 0x6700                        # no data
    assert tx(card, "81 E2 13 00 03 BF 2E 00")[1] == 0x6A86            # bad P1
    assert tx(card, "01 A4 00 04 02 7F 10")[1] == 0x6A82               # no such file
    assert tx(card, "01 A4 03 00 02 3F 00")[1] == 0x6A86               # select parent: not supported


def test_minimal_uicc_file_system(card):
    """SELECT MF / EF.ICCID by FID and path, READ BINARY of the enabled profile's ICCID (TS 102 221)."""
    fcp, sw = tx(card, "00 A4 00 04 02 3F 00 00")
    assert sw == 0x9000 and fcp[0] == 0x62 and bytes.fromhex("83023F00") in fcp
    fcp, sw = tx(card, "00 A4 00 04 02 2F E2 00")
    assert sw == 0x9000 and bytes.fromhex("83022FE2") in fcp and bytes.fromhex("8002000A") in fcp
    data, sw = tx(card, "00 B0 00 00 0A")
    assert sw == 0x9000 and data == iccid_to_bytes(card.enabled_iccid())
    assert tx(card, "00 B0 00 05 05")[0] == iccid_to_bytes(card.enabled_iccid())[5:]
    assert tx(card, "00 A4 08 04 04 3F 00 2F E2 00")[1] == 0x9000          # by path
    assert tx(card, "00 A4 00 04 02 3F 00 00")[1] == 0x9000
    assert tx(card, "00 B0 00 00 0A")[1] == 0x6985                         # the MF is not a transparent EF


def test_store_data_segmentation_and_block_numbers(card):
    ch = open_isdr(card)
    iccid = card.state.profiles[0].iccid
    req = codec.encode("SetNicknameRequest", {"iccid": iccid_to_bytes(iccid), "profileNickname": "x" * 60})
    # three-byte blocks: P2 00, 01, 02 …, answer only on the last
    data, sw = store_data(card, ch, req, seg=3)
    assert sw == 0x9000 and codec.decode("SetNicknameResponse", data) == {"setNicknameResult": 0}
    assert card.state.profiles[0].nickname == "x" * 60
    # a gap in the block numbers is refused and the command dropped
    assert tx(card, bytes([0x81, 0xE2, 0x11, 0x00, 3]) + req[:3])[1] == 0x9000
    assert tx(card, bytes([0x81, 0xE2, 0x11, 0x02, 3]) + req[3:6])[1] == 0x6A86
    assert tx(card, bytes([0x81, 0xE2, 0x91, 0x01, len(req) - 3]) + req[3:])[1] == 0x6A86
    # a first block that is not 00
    assert tx(card, bytes([0x81, 0xE2, 0x91, 0x05, 3]) + bytes.fromhex("BF2E00"))[1] == 0x6A86
    # block 00 always starts afresh: an abandoned command does not poison the next one
    assert tx(card, bytes([0x81, 0xE2, 0x11, 0x00, 2]) + b"\xBF\x29")[1] == 0x9000
    data, sw = store_data(card, ch, bytes.fromhex("BF2E00"))
    assert sw == 0x9000 and len(codec.decode("GetEuiccChallengeResponse", data)["euiccChallenge"]) == 16


def test_response_chaining(card, es):
    # RetrieveNotificationsList with certificates attached is well over 256 bytes
    es.enable_profile(card.state.profiles[1].iccid)
    es.enable_profile(card.state.profiles[2].iccid)
    ch = open_isdr(card)            # channel 2: the es fixture holds channel 1
    sd, gr = A.cla_for(0x80, ch), A.cla_for(0x00, ch)
    req = bytes.fromhex("BF2B00")
    # no Le: 61xx straight away, then GET RESPONSE in 256-byte (61 00) steps
    data, sw = tx(card, bytes([sd, 0xE2, 0x91, 0x00, 3]) + req)
    assert data == b"" and sw == 0x6100
    full = bytearray()
    steps = 0
    while sw >> 8 == 0x61:
        data, sw = tx(card, bytes([gr, 0xC0, 0, 0, sw & 0xFF]))
        full += data
        steps += 1
    assert sw == 0x9000 and steps >= 3
    v = codec.decode("RetrieveNotificationsListResponse", bytes(full))
    assert v[0] == "notificationList" and len(v[1]) == 4
    # Le = 00: the first 256 bytes come at once with 61xx for the rest
    data, sw = tx(card, bytes([sd, 0xE2, 0x91, 0x00, 3]) + req + b"\x00")
    assert len(data) == 256 and sw >> 8 == 0x61
    out = bytearray(data)
    while sw >> 8 == 0x61:
        d, sw = tx(card, bytes([gr, 0xC0, 0, 0, 0x40]))      # smaller Le than offered: fine
        out += d
    assert bytes(out) == bytes(full)
    # small responses with Le come back directly
    data, sw = tx(card, bytes([sd, 0xE2, 0x91, 0x00, 3]) + bytes.fromhex("BF2E00") + b"\x00")
    assert sw == 0x9000 and len(data) == 21
    # another command discards unread response data
    tx(card, bytes([sd, 0xE2, 0x91, 0x00, 3]) + req)
    tx(card, bytes([sd, 0xE2, 0x91, 0x00, 3]) + bytes.fromhex("BF2E00") + b"\x00")
    assert tx(card, bytes([gr, 0xC0, 0, 0, 0]))[1] == 0x6985


def test_malformed_es10_data(card):
    ch = open_isdr(card)
    cases = {
        "BF2E": 0x6A80,                   # truncated header
        "BF2E05 8010": 0x6A80,            # length beyond the data
        "BF2E00 00": 0x6A80,              # trailing byte
        "BF9901 00": 0x6A88,              # unknown function
        "BF3103 800101": 0x6A80,          # EnableProfile without profileIdentifier
        "BF3E035C01": 0x6A80,
        "BF3E03 5C019F": 0x6A88,          # GetEuiccData for something other than the EID
        "30 00": 0x6A88,
    }
    for hexreq, want in cases.items():
        _, sw = store_data(card, ch, bytes.fromhex(hexreq.replace(" ", "")))
        assert sw == want, hexreq
    # an ICCID of the wrong size in the search criteria: incorrectInputValues
    data, sw = store_data(card, ch, bytes.fromhex("BF2D04A0025A00"))
    assert sw == 0x9000 and codec.decode("ProfileInfoListResponse", data) == ("profileInfoListError", 1)
    # a fuzzed stream of APDUs never raises and always yields a status word
    rng = random.Random(1234)
    seeds = [bytes.fromhex(h) for h in ("81E29100", "01A40400", "0070000001", "01C00000", "81E21100")]
    for _ in range(600):
        base = rng.choice(seeds)
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        r = card.apdu(base + body)
        assert isinstance(r, bytes) and len(r) >= 2
        if rng.random() < 0.3:
            r = card.apdu(bytes([0x81, 0xE2, 0x91, 0x00, len(body) or 1]) + (body or b"\x00"))
            assert len(r) >= 2
    assert card.apdu(b"") == bytes.fromhex("6700")


def test_reset_closes_channels(card):
    ch = open_isdr(card)
    assert store_data(card, ch, bytes.fromhex("BF2E00"))[1] == 0x9000
    card.reset()
    assert tx(card, "81 E2 91 00 03 BF 2E 00")[1] == 0x6881
    assert open_isdr(card) == 1


# --- ES10 functions -----------------------------------------------------------------------------

def test_eid_info1_info2_addresses(card, es, pki):
    eid = es.get_eid()
    assert eid == card.eid and eid_valid(eid)
    assert crypto.eid_of(euicc_pub(card)) == eid
    i1 = es.get_euicc_info1()
    ci = pki.ci_pkid.hex().upper()
    assert i1.ci_pkids_for_verification == [ci] and i1.ci_pkids_for_signing == [ci]
    i2 = es.get_euicc_info2()
    assert i2.svn.startswith("2.") and i2.profile_version and i2.firmware_version
    assert i2.ci_pkids_for_verification == [ci]
    assert i2.free_nvm == card.state.free_nvm and i2.installed_applications == 3
    assert i2.euicc_category == "mediumEuicc" and i2.pp_version and i2.sas_accreditation_number
    assert 3 in i2.rsp_capability and 1 in i2.uicc_capability
    # exact DER for the start of BF22 (tags per docs/protocol.md §2.2)
    raw = i2.raw
    assert raw[:2] == b"\xBF\x22" and b"\x81\x03\x02\x03\x01\x82\x03\x02\x02\x02" in raw
    addrs = es.get_configured_addresses()
    assert addrs.default_dp_address is None and addrs.root_ds_address == "lpa.ds.gsma.com"
    es.set_default_dp_address("dp.example.org")
    assert es.get_configured_addresses().default_dp_address == "dp.example.org"
    es.set_default_dp_address("")
    assert es.get_configured_addresses().default_dp_address is None


def test_preload_profiles(card, es):
    ps = es.get_profiles_info()
    assert [p.state for p in ps] == ["enabled", "disabled", "disabled"]
    assert all(luhn_valid(p.iccid) and p.iccid.startswith("8949") for p in ps)
    assert len({p.iccid for p in ps}) == 3 and len({p.isdp_aid for p in ps}) == 3
    assert ps[0].profile_name == "Test Profile 1" and ps[0].service_provider_name
    assert ps[0].profile_class == "operational"
    assert ps[0].notification_configuration[0]["address"] == ADDRESS
    assert card.enabled_iccid() == ps[0].iccid


def test_get_profiles_info_search_and_tags(card, es):
    p1 = card.state.profiles[1]
    got = es.get_profiles_info(iccid=p1.iccid)
    assert [p.iccid for p in got] == [p1.iccid]
    got = es.get_profiles_info(isdp_aid=bytes.fromhex(p1.isdp_aid))
    assert [p.iccid for p in got] == [p1.iccid]
    assert len(es.get_profiles_info(profile_class=2)) == 3
    assert es.get_profiles_info(profile_class=0) == []
    assert es.get_profiles_info(iccid=make_iccid("894400000", 7, 19)) == []
    # tag list with a two-byte tag (9F70): only those fields come back
    raw = es.call_raw(codec.encode("ProfileInfoListRequest", {"tagList": bytes.fromhex("5A9F70")}), what="x")
    kind, infos = codec.decode("ProfileInfoListResponse", raw)
    assert kind == "profileInfoListOk"
    assert [set(i) - {"profileClass"} for i in infos] == [{"iccid", "profileState"}] * 3
    assert [i["profileState"] for i in infos] == [1, 0, 0]
    # exact bytes of the first E3 entry: 5A then 9F70
    first = tlv.children(tlv.parse_single(tlv.parse_single(raw).value))[0]
    assert first.raw == tlv.encode(0xE3, tlv.encode(0x5A, iccid_to_bytes(card.state.profiles[0].iccid))
                                   + bytes.fromhex("9F700101"))
    # a truncated multi-byte tag in the tag list: incorrectInputValues
    raw = es.call_raw(codec.encode("ProfileInfoListRequest", {"tagList": bytes.fromhex("5A9F")}), what="x")
    assert codec.decode("ProfileInfoListResponse", raw) == ("profileInfoListError", 1)


def test_enable_disable_delete_rules(card, es):
    a, b, c = (p.iccid for p in card.state.profiles)
    with pytest.raises(Es10Error) as e:
        es.enable_profile(a)
    assert e.value.outcome == "profileNotInDisabledState"
    with pytest.raises(Es10Error) as e:
        es.enable_profile(make_iccid("894400000", 9, 19))
    assert e.value.outcome == "iccidOrAidNotFound"
    # enabling B disables A: exactly one enabled
    es.enable_profile(b)
    states = {p.iccid: p.state for p in es.get_profiles_info()}
    assert states == {a: "disabled", b: "enabled", c: "disabled"}
    assert card.enabled_iccid() == b
    with pytest.raises(Es10Error) as e:
        es.disable_profile(a)
    assert e.value.outcome == "profileNotInEnabledState"
    with pytest.raises(Es10Error) as e:
        es.delete_profile(b)
    assert e.value.outcome == "profileNotInDisabledState"
    # by ISD-P AID
    es.disable_profile(card.state.find_iccid(b).isdp_aid)
    assert card.enabled_iccid() is None
    es.enable_profile(card.state.find_iccid(c).isdp_aid, refresh=False)
    assert card.isdr.last_refresh_flag is False and card.enabled_iccid() == c
    es.delete_profile(a)
    assert [p.iccid for p in es.get_profiles_info()] == [b, c]
    with pytest.raises(Es10Error) as e:
        es.delete_profile(a)
    assert e.value.outcome == "iccidOrAidNotFound"
    # catBusy
    card.isdr.cat_busy = True
    with pytest.raises(Es10Error) as e:
        es.enable_profile(b)
    assert e.value.outcome == "catBusy"
    card.isdr.cat_busy = False


def test_profile_policy_rules(card, es):
    a, b, c = card.state.profiles
    a.ppr = [1]          # PPR1: disabling not allowed
    b.ppr = [2]          # PPR2: deletion not allowed
    card.state.save()
    for op in (lambda: es.disable_profile(a.iccid), lambda: es.enable_profile(b.iccid)):
        with pytest.raises(Es10Error) as e:
            op()
        assert e.value.outcome == "disallowedByPolicy"
    assert card.enabled_iccid() == a.iccid
    with pytest.raises(Es10Error) as e:
        es.delete_profile(b.iccid)
    assert e.value.outcome == "disallowedByPolicy"
    es.delete_profile(c.iccid)
    got = {p.iccid: p.policy_rules for p in es.get_profiles_info()}
    assert got == {a.iccid: ["ppr1"], b.iccid: ["ppr2"]}


def test_set_nickname(card, es):
    es.set_nickname(card.state.profiles[2].iccid, "work")
    assert es.get_profiles_info(iccid=card.state.profiles[2].iccid)[0].nickname == "work"
    with pytest.raises(Es10Error) as e:
        es.set_nickname(make_iccid("894400000", 3, 19), "x")
    assert e.value.outcome == "iccidNotFound"


def _verify_other_notification(card, der: bytes) -> dict:
    t = tlv.parse_single(der)
    parts = tlv.children(t)
    assert [p.tag for p in parts] == [0xBF2F, 0x5F37, 0x30, 0x30]
    assert crypto.verify_raw(euicc_pub(card), parts[0].raw, parts[1].value)
    assert parts[2].raw == crypto.cert_der(euicc_pub(card))
    eum = crypto.load_cert(parts[3].raw)
    assert crypto.verify_issued_by(euicc_pub(card), eum)
    return codec.decode("OtherSignedNotification", der)["tbsOtherNotification"]


def test_notifications_signed_and_sequenced(card, es):
    a, b, c = (p.iccid for p in card.state.profiles)
    es.enable_profile(b)          # disable A (implicit) + enable B
    es.disable_profile(b)
    es.delete_profile(c)
    listed = es.list_notifications()
    assert [(n.operation, n.iccid) for n in listed] == [("disable", a), ("enable", b), ("disable", b), ("delete", c)]
    seqs = [n.seq_number for n in listed]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert all(n.address == ADDRESS for n in listed)
    pend = es.retrieve_notifications()
    for n in pend:
        md = _verify_other_notification(card, n.der)
        assert md["seqNumber"] == n.seq_number
    # exact encoding of an enable event: 81 02 06 40 (docs/protocol.md §6.2)
    assert b"\x81\x02\x06\x40" in pend[1].der
    # filters
    assert [n.operation for n in es.list_notifications("disable")] == ["disable", "disable"]
    assert [n.seq_number for n in es.retrieve_notifications(seq=seqs[2])] == [seqs[2]]
    assert [n.operation for n in es.retrieve_notifications(operation="delete")] == ["delete"]
    assert es.retrieve_notifications(seq=999) == []
    # removal
    assert es.remove_notification(seqs[0]) is True
    assert es.remove_notification(seqs[0]) is False           # nothingToDelete
    es.enable_profile(a)
    new = es.list_notifications()
    assert new[-1].seq_number > seqs[-1]                      # never reused
    # a profile without notification configuration produces none
    card.state.find_iccid(a).nci = []
    before = len(es.list_notifications())
    es.disable_profile(a)
    assert len(es.list_notifications()) == before


def test_memory_reset(card, es):
    es.set_default_dp_address("dp.example.org")
    card.state.profiles[2].profile_class = 0      # a test profile
    card.state.save()
    free0 = card.state.free_nvm
    es.memory_reset(operational=True, test=False, default_dp=False)
    ps = es.get_profiles_info()
    assert [p.profile_class for p in ps] == ["test"]
    assert card.enabled_iccid() is None and card.state.free_nvm > free0
    assert es.get_configured_addresses().default_dp_address == "dp.example.org"
    es.memory_reset(operational=False, test=True, default_dp=True)
    assert es.get_profiles_info() == [] and es.get_configured_addresses().default_dp_address is None
    with pytest.raises(Es10Error) as e:
        es.memory_reset()
    assert e.value.outcome == "nothingToDelete"


def test_rat_challenge_crl_cancel_without_session(card, es):
    rat = es.get_rat()
    assert rat and {"ppr1", "ppr2"} <= set(rat[0].ppr_ids)
    c1, c2 = es.get_euicc_challenge(), es.get_euicc_challenge()
    assert len(c1) == 16 and c1 != c2
    raw = es.call_raw(bytes.fromhex("BF35023000"), what="LoadCRL")
    assert codec.decode("LoadCRLResponse", raw)[0] == "loadCRLResponseError"
    with pytest.raises(Es10Error) as e:
        es.cancel_session(os.urandom(16), 0)
    assert e.value.outcome == "invalidTransactionId"


# --- state ------------------------------------------------------------------------------------

def test_persistence_across_reopen(tmp_path, pki):
    path = tmp_path / "c.json"
    c1 = SimEuicc.open(path, preload=2, pki_dir=pki.directory)
    with A.Isdr(_Transport(c1)) as isdr:
        es = Es10(isdr)
        es.enable_profile(c1.state.profiles[1].iccid)
        es.set_default_dp_address("dp.example.org")
        es.set_nickname(c1.state.profiles[0].iccid, "old")
    c2 = SimEuicc.open(path, preload=5)          # existing card: preload ignored
    assert c2.eid == c1.eid and c2.enabled_iccid() == c1.state.profiles[1].iccid
    assert [p.iccid for p in c2.state.profiles] == [p.iccid for p in c1.state.profiles]
    assert c2.state.default_dp_address == "dp.example.org" and c2.state.profiles[0].nickname == "old"
    assert [n.seq for n in c2.state.notifications] == [1, 2] and c2.state.next_seq == 3
    assert c2.state.identity.euicc_key_pem == c1.state.identity.euicc_key_pem
    assert [f for f in os.listdir(tmp_path) if f != "c.json"] == []       # no temporary files left


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"version": 1}', b"\xff\xfe",
                                     b'{"version": 99, "eid": "1"}'])
def test_corrupt_state_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(StateError) as e:
        SimEuicc.open(path)
    assert isinstance(e.value, AgentError) and e.value.code == "sim_state_corrupt"
    assert str(path) in e.value.message


def test_identity_from_files_and_generated(tmp_path, pki):
    eid = "89049032001002000000000000012345"
    eid = eid[:30] + f"{98 - int(eid[:30] + '00') % 97:02d}"
    issued = pki_mod.issue_euicc(pki.eum, eid)
    pki_mod.save_certkey(issued, tmp_path / "e.pem", tmp_path / "e.key")
    (tmp_path / "eum.der").write_bytes(crypto.cert_der(pki.eum.cert))
    card = SimEuicc.open(tmp_path / "f.json", euicc_cert=tmp_path / "e.pem", euicc_key=tmp_path / "e.key",
                         eum_certs=[tmp_path / "eum.der"], ci_certs=[pki.directory / "ci.pem"])
    assert card.eid == eid
    assert card.state.identity.ci_pkids_verification == [pki.ci_pkid.hex().upper()]
    with pytest.raises(AgentError):
        SimEuicc.open(tmp_path / "g.json", euicc_cert=tmp_path / "e.pem", euicc_key=tmp_path / "e.key")
    # generated: its own CI -> EUM -> eUICC chain
    gen = SimEuicc.open(tmp_path / "h.json")
    ident = gen.state.identity
    assert eid_valid(gen.eid) and crypto.eid_of(ident.euicc_cert) == gen.eid
    crypto.verify_chain(ident.euicc_cert, ident.eum_certs, ident.ci_certs, role="euicc")


# --- downloads (eUICC side of ES9+/ES8+) ----------------------------------------------------------

def _e(tag, value):
    return tlv.encode(tag, value)


CTX = _e(0xA0, _e(0x80, b"MATCH-1") + _e(0xA1, _e(0x80, bytes.fromhex("35290611")) + _e(0xA1, b"")))


class Dp:
    """Just enough SM-DP+ to drive the eUICC: signs with the test PKI's DPauth/DPpb keys."""

    def __init__(self, pki, card):
        self.pki, self.card = pki, card
        self.txid = os.urandom(16)
        self.server_challenge = os.urandom(16)

    def auth_request(self, challenge, *, ci_pkid=None, cert=None, key=None, txid=None, tamper=False):
        txid = txid or self.txid
        ss1 = _e(0x30, _e(0x80, txid) + _e(0x81, challenge) + _e(0x83, ADDRESS.encode())
                 + _e(0x84, self.server_challenge))
        sig = crypto.sign_raw(key or self.pki.dpauth.key, ss1)
        if tamper:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        return _e(0xBF38, ss1 + _e(0x5F37, sig) + _e(0x04, ci_pkid or self.pki.ci_pkid)
                  + crypto.cert_der(cert or self.pki.dpauth.cert) + CTX)

    def check_auth_response(self, resp) -> bytes:
        kind, v = codec.decode("AuthenticateServerResponse", resp)
        assert kind == "authenticateResponseOk", v
        ok = tlv.parse_single(tlv.parse_single(resp).value)
        parts = tlv.children(ok)
        signed1, sig1 = parts[0], parts[1]
        cert = crypto.load_cert(parts[2].raw)
        eum = crypto.load_cert(parts[3].raw)
        crypto.verify_chain(cert, [eum], [self.pki.ci.cert], role="euicc")
        assert crypto.verify_raw(cert, signed1.raw, sig1.value)
        fields = tlv.children(signed1)
        assert [f.tag for f in fields] == [0x80, 0x83, 0x84, 0xBF22, 0xA0]
        assert fields[0].value == self.txid and fields[2].value == self.server_challenge
        assert fields[4].raw == CTX                      # ctxParams1 verbatim
        self.sig1_tlv = sig1.raw
        self.euicc_cert = cert
        return sig1.raw

    def prepare_request(self, *, cc=None, otpk=None, cert=None, key=None, txid=None, tamper=False):
        txid = txid or self.txid
        sd2 = _e(0x30, _e(0x80, txid) + _e(0x01, b"\xff" if cc is not None else b"\x00")
                 + (_e(0x5F49, otpk) if otpk else b""))
        sig = crypto.sign_raw(key or self.pki.dppb.key, sd2 + self.sig1_tlv)
        if tamper:
            sig = sig[:-1] + bytes([sig[-1] ^ 1])
        hash_cc = _e(0x04, hashlib.sha256(hashlib.sha256(cc.encode()).digest() + txid).digest()) if cc else b""
        return _e(0xBF21, sd2 + _e(0x5F37, sig) + hash_cc + crypto.cert_der(cert or self.pki.dppb.cert))

    def check_prepare_response(self, resp, prepare_req) -> bytes:
        kind, v = codec.decode("PrepareDownloadResponse", resp)
        assert kind == "downloadResponseOk", v
        ok = tlv.parse_single(tlv.parse_single(resp).value)
        signed2, sig2 = tlv.children(ok)
        smdp_sig2_tlv = tlv.children(tlv.parse_single(prepare_req))[1].raw
        assert crypto.verify_raw(self.euicc_cert, signed2.raw + smdp_sig2_tlv, sig2.value)
        return v["euiccSigned2"]["euiccOtpk"]

    def bpp(self, otpk, iccid, *, upp_iccid=None, ppr=(), ppk=None, pad_to=None):
        md = {"iccid": iccid_to_bytes(iccid), "serviceProviderName": "Test DP", "profileName": "Downloaded",
              "notificationConfigurationInfo": [
                  {"profileManagementOperation": (b"\x70", 4), "notificationAddress": ADDRESS}],
              "profileOwner": {"mccMnc": bytes.fromhex("00F110")}}
        if ppr:
            md["profilePolicyRules"] = (bytes([sum(0x80 >> b for b in ppr)]), max(ppr) + 1)
        package = upp_mod.make_upp(iccid=upp_iccid or iccid, imsi="001010123456789", ki=os.urandom(16),
                                   opc=os.urandom(16), pad_to=pad_to)
        bpp, _ = es8p.bind_bpp(transaction_id=self.txid, euicc_otpk=otpk, dppb_key=self.pki.dppb.key,
                               eid=eid_to_bytes(self.card.eid), host_id=b"test-host",
                               configure_isdp=codec.encode("ConfigureISDPRequest", {}),
                               store_metadata=codec.encode("StoreMetadataRequest", md),
                               upp=package, ppk=ppk, segment_size=500)
        return bpp


def _auth_and_prepare(es, dp, **prep):
    challenge = es.get_euicc_challenge()
    dp.check_auth_response(es.call_raw(dp.auth_request(challenge), what="AuthenticateServer"))
    req = dp.prepare_request(**prep)
    return dp.check_prepare_response(es.call_raw(req, what="PrepareDownload"), req)


def _load(es, bpp) -> list[bytes]:
    """Send the ES10 commands of a BPP until the eUICC answers (like an LPA does)."""
    answers = []
    for cmd in es8p.split_bpp(bpp):
        answers.append(es.call_raw(cmd, what="LoadBPP"))
        if answers[-1]:
            break
    return answers


def _pir(card, raw) -> dict:
    t = tlv.parse_single(raw)
    assert t.tag == 0xBF37
    data, sig = tlv.children(t)
    assert data.tag == 0xBF27 and sig.tag == 0x5F37
    assert crypto.verify_raw(euicc_pub(card), data.raw, sig.value)
    return codec.decode("ProfileInstallationResult", raw)["profileInstallationResultData"]


NEW_ICCID = make_iccid("8944123", 42, 19)


def test_download_success(card, es, pki):
    dp = Dp(pki, card)
    free0 = es.get_euicc_info2().free_nvm
    otpk = _auth_and_prepare(es, dp)
    answers = _load(es, dp.bpp(otpk, NEW_ICCID, ppk=True))
    assert all(a == b"" for a in answers[:-1])
    pir = _pir(card, answers[-1])
    assert pir["transactionId"] == dp.txid and pir["smdpOid"] == pki.smdp_oid
    kind, res = pir["finalResult"]
    assert kind == "successResult" and res["simaResponse"] == bytes.fromhex("30 07 A0 05 30 03 80 01 00")
    md = pir["notificationMetadata"]
    assert md["notificationAddress"] == ADDRESS and md["profileManagementOperation"] == (b"\x80", 1)
    p = es.get_profiles_info(iccid=NEW_ICCID)[0]
    assert p.state == "disabled" and p.isdp_aid == res["aid"].hex().upper() and p.profile_name == "Downloaded"
    assert es.get_euicc_info2().free_nvm < free0
    # the PIR is the pending install notification, byte for byte
    pend = es.retrieve_notifications(operation="install")
    assert [n.der for n in pend] == [answers[-1]] and pend[0].seq_number == md["seqNumber"]
    assert es.list_notifications("install")[0].iccid == NEW_ICCID
    # the new profile follows the same state rules
    es.enable_profile(NEW_ICCID)
    assert card.enabled_iccid() == NEW_ICCID
    # a replay of the finished session is refused at card level
    with pytest.raises(AgentError) as e:
        es.call_raw(es8p.split_bpp(dp.bpp(otpk, make_iccid("8944123", 43, 19)))[0], what="LoadBPP")
    assert getattr(e.value, "sw", None) == 0x6985
    assert card.state.ot_key is None


def test_authenticate_server_errors(card, es, pki, tmp_path_factory):
    dp = Dp(pki, card)
    other = pki_mod.make_pki(tmp_path_factory.mktemp("other"))

    def auth(**kw):
        challenge = kw.pop("challenge", None) or es.get_euicc_challenge()
        raw = es.call_raw(dp.auth_request(challenge, **kw), what="AuthenticateServer")
        kind, v = codec.decode("AuthenticateServerResponse", raw)
        assert kind == "authenticateResponseError"
        assert v["transactionId"] == dp.txid
        return v["authenticateErrorCode"]

    assert auth(ci_pkid=other.ci_pkid) == 7                                     # ciPKUnknown
    assert auth(cert=other.dpauth.cert, key=other.dpauth.key) == 1              # wrong CI
    assert auth(cert=pki.dppb.cert, key=pki.dppb.key) == 1                      # wrong role
    assert auth(tamper=True) == 2                                               # invalidSignature
    assert auth(challenge=os.urandom(16)) == 6                                  # euiccChallengeMismatch
    # a challenge is good for one session only
    challenge = es.get_euicc_challenge()
    dp.check_auth_response(es.call_raw(dp.auth_request(challenge), what="AuthenticateServer"))
    assert auth(challenge=challenge) == 6


def test_prepare_download_errors_and_cc(card, es, pki):
    dp = Dp(pki, card)

    def prepare(req):
        raw = es.call_raw(req, what="PrepareDownload")
        kind, v = codec.decode("PrepareDownloadResponse", raw)
        return v["downloadErrorCode"] if kind == "downloadResponseError" else raw

    dp.sig1_tlv = _e(0x5F37, bytes(64))
    assert prepare(dp.prepare_request()) == 4                                   # noSessionContext
    challenge = es.get_euicc_challenge()
    dp.check_auth_response(es.call_raw(dp.auth_request(challenge), what="AuthenticateServer"))
    assert prepare(dp.prepare_request(tamper=True)) == 2
    assert prepare(dp.prepare_request(cert=pki.dpauth.cert, key=pki.dpauth.key)) == 1
    assert prepare(dp.prepare_request(txid=os.urandom(16))) == 5
    # ccRequiredFlag without hashCc
    sd2 = _e(0x30, _e(0x80, dp.txid) + _e(0x01, b"\xff"))
    req = _e(0xBF21, sd2 + _e(0x5F37, crypto.sign_raw(pki.dppb.key, sd2 + dp.sig1_tlv))
             + crypto.cert_der(pki.dppb.cert))
    assert prepare(req) == 127
    # with a confirmation code: hashCc is passed on inside euiccSigned2
    req = dp.prepare_request(cc="1234")
    raw = prepare(req)
    v = codec.decode("PrepareDownloadResponse", raw)[1]
    assert v["euiccSigned2"]["hashCc"] == tlv.children(tlv.parse_single(req))[2].value
    otpk = dp.check_prepare_response(raw, req)
    # rebind: the SM-DP+ names the stored otPK, the eUICC reuses that key pair
    req = dp.prepare_request(otpk=otpk)
    assert dp.check_prepare_response(prepare(req), req) == otpk
    req = dp.prepare_request(otpk=b"\x04" + bytes(64))
    assert dp.check_prepare_response(prepare(req), req) != otpk
    # CancelSession: signed by the eUICC, ends the session
    raw = es.cancel_session(dp.txid, 0)
    ok = tlv.parse_single(tlv.parse_single(raw).value)
    signed, sig = tlv.children(ok)
    assert crypto.verify_raw(euicc_pub(card), signed.raw, sig.value)
    assert codec.decode("EuiccCancelSessionSigned", signed.raw) == {
        "transactionId": dp.txid, "smdpOid": pki.smdp_oid, "reason": 0}
    assert prepare(dp.prepare_request()) == 4


def _error_pir(card, raw):
    pir = _pir(card, raw)
    kind, v = pir["finalResult"]
    assert kind == "errorResult"
    return v["bppCommandId"], v["errorReason"]


def test_download_tampered_segment(card, es, pki):
    dp = Dp(pki, card)
    otpk = _auth_and_prepare(es, dp)
    cmds = es8p.split_bpp(dp.bpp(otpk, NEW_ICCID))
    i = max(n for n, c in enumerate(cmds) if c[0] == 0x86)
    bad = bytearray(cmds[i])
    bad[10] ^= 0xFF
    answers = [es.call_raw(c, what="LoadBPP") for c in cmds[:i]]
    assert all(a == b"" for a in answers)
    assert _error_pir(card, es.call_raw(bytes(bad), what="LoadBPP")) == (5, 8)   # scp03tSecurityError
    # the session is gone: further segments are refused
    with pytest.raises(AgentError) as e:
        es.call_raw(cmds[i], what="LoadBPP")
    assert getattr(e.value, "sw", None) == 0x6985
    assert card.state.find_iccid(NEW_ICCID) is None
    assert [n.operation for n in es.list_notifications()] == ["install"]       # error PIR kept too


def test_download_iccid_exists_mismatch_memory(card, es, pki):
    existing = card.state.profiles[0].iccid
    dp = Dp(pki, card)
    otpk = _auth_and_prepare(es, dp)
    answers = _load(es, dp.bpp(otpk, existing))
    assert _error_pir(card, answers[-1]) == (2, 9)                # at StoreMetadata, early
    assert len(answers) < len(es8p.split_bpp(dp.bpp(otpk, existing)))
    dp = Dp(pki, card)
    answers = _load(es, dp.bpp(_auth_and_prepare(es, dp), NEW_ICCID, upp_iccid=make_iccid("8944123", 77, 19)))
    assert _error_pir(card, answers[-1]) == (5, 13)
    card.state.free_nvm = 4000
    dp = Dp(pki, card)
    answers = _load(es, dp.bpp(_auth_and_prepare(es, dp), NEW_ICCID, pad_to=9000))
    assert _error_pir(card, answers[-1]) == (5, 10)
    assert card.state.find_iccid(NEW_ICCID) is None


def test_download_session_lost_on_reset(card, es, pki):
    dp = Dp(pki, card)
    otpk = _auth_and_prepare(es, dp)
    cmds = es8p.split_bpp(dp.bpp(otpk, NEW_ICCID))
    card.reset()
    ch = open_isdr(card)
    assert store_data(card, ch, cmds[0])[1] == 0x6985


def test_download_policy_rules_and_whole_bpp(card, es, pki):
    # PPR3 is not granted by the RAT: pprNotAllowed at StoreMetadata
    dp = Dp(pki, card)
    answers = _load(es, dp.bpp(_auth_and_prepare(es, dp), NEW_ICCID, ppr=(3,)))
    assert _error_pir(card, answers[-1]) == (2, 15)
    # PPR1 is: the profile installs with it, and the card honours it once enabled.
    # This time the LPA hands the whole BF36 over as one ES10 command.
    dp = Dp(pki, card)
    raw = es.call_raw(dp.bpp(_auth_and_prepare(es, dp), NEW_ICCID, ppr=(1,)), what="LoadBPP")
    assert _pir(card, raw)["finalResult"][0] == "successResult"
    assert es.get_profiles_info(iccid=NEW_ICCID)[0].policy_rules == ["ppr1"]
    es.enable_profile(NEW_ICCID)
    with pytest.raises(Es10Error) as e:
        es.disable_profile(NEW_ICCID)
    assert e.value.outcome == "disallowedByPolicy"
    # install notification first, then the disable of the previously enabled profile and the enable
    ops = [n.operation for n in es.list_notifications()]
    assert ops == ["install", "install", "disable", "enable"]
