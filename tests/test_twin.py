"""agent/sim/twin.py: the Super SIM-style reservation API, over the local SM-DP+'s HTTPS."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import requests

from agent.sim import pki as simpki
from agent.sim.smdpp import SmdpServer
from agent.sim.twin import ESIM_FIELDS, TwinStore

SID = "AC" + "ab" * 16
TOKEN = "secret-token"
EID = "89049032123451234512345678901235"
EID2 = "89049032123451234512345678909999"
ESIM_KEYS = set(ESIM_FIELDS) | {"url"}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    simpki.make_pki(d)
    return d


@pytest.fixture
def srv(pki_dir):
    s = SmdpServer(pki_dir, auth=(SID, TOKEN), reserve_delay=0.01)
    s.start()
    yield s
    s.stop()


def api(srv, method, path, *, auth=(SID, TOKEN), **kw) -> requests.Response:
    return requests.request(method, srv.url + path, auth=auth, verify=str(srv.pki_dir) + "/ci.pem",
                            timeout=10, **kw)


def create(srv, **form) -> dict:
    r = api(srv, "POST", "/v1/ESimProfiles", data=form)
    assert r.status_code == 201, r.text
    assert r.headers["Content-Type"] == "application/json"
    return r.json()


def wait(srv, sid, status, timeout=3.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = api(srv, "GET", f"/v1/ESimProfiles/{sid}")
        assert r.status_code == 200
        if r.json()["status"] == status:
            return r.json()
        time.sleep(0.02)
    raise AssertionError(f"{sid} stayed {r.json()['status']}, wanted {status}")


def test_create_by_eid_reaches_available(srv):
    p = create(srv, Eid=EID)
    assert set(p) == ESIM_KEYS
    assert re.fullmatch(r"HP[0-9a-f]{32}", p["sid"]) and p["account_sid"] == SID
    assert p["status"] == "new" and p["eid"] == EID
    assert p["iccid"] is p["sim_sid"] is p["smdp_plus_address"] is p["matching_id"] is p["activation_code"] is None
    assert ISO.match(p["date_created"]) and ISO.match(p["date_updated"])
    assert p["url"] == f"https://{srv.address}/v1/ESimProfiles/{p['sid']}"
    a = wait(srv, p["sid"], "available")
    assert re.fullmatch(r"HS[0-9a-f]{32}", a["sim_sid"])
    assert re.fullmatch(r"\d{19}", a["iccid"]) and a["smdp_plus_address"] == srv.address
    assert a["matching_id"] is None and a["activation_code"] is None and a["error_code"] is None
    sim = api(srv, "GET", f"/v1/Sims/{a['sim_sid']}").json()
    assert sim["iccid"] == a["iccid"] and sim["account_sid"] == SID and sim["status"] == "new"
    assert sim["links"]["billing_periods"].endswith(f"/v1/Sims/{a['sim_sid']}/BillingPeriods")


@pytest.mark.parametrize("value", ["true", "True", "TRUE"])
def test_create_with_matching_id(srv, value):
    p = create(srv, GenerateMatchingId=value)
    assert p["eid"] is None
    a = wait(srv, p["sid"], "available")
    assert a["matching_id"] and a["activation_code"] == f"1${srv.address}${a['matching_id']}"


def test_create_by_eid_with_matching_id(srv):
    a = wait(srv, create(srv, Eid=EID, GenerateMatchingId="true")["sid"], "available")
    assert a["eid"] == EID and a["matching_id"]


def test_orders_the_schema_allows_but_cannot_be_reserved_fail_visibly(srv):
    none = create(srv)                                   # neither Eid nor GenerateMatchingId
    f = wait(srv, none["sid"], "failed")
    assert f["error_code"] == "missing_eid_or_matching_id" and "Eid" in f["error_message"]
    bad = create(srv, Eid="89049032005008882600033489aaaaaa", GenerateMatchingId="false")
    f = wait(srv, bad["sid"], "failed")
    assert f["error_code"] == "invalid_eid" and f["iccid"] is None


@pytest.mark.parametrize("form", [{"GenerateMatchingId": "maybe"}, {"Eid": EID, "CallbackMethod": "PUT"},
                                  {"Eid": EID, "UsePpk": "1"}])
def test_create_bad_parameters_400(srv, form):
    r = api(srv, "POST", "/v1/ESimProfiles", data=form)
    assert r.status_code == 400
    e = r.json()
    assert e["status"] == 400 and isinstance(e["code"], int) and e["message"] and e["more_info"].startswith("https://")


def test_create_rejects_non_form_body(srv):
    r = api(srv, "POST", "/v1/ESimProfiles", data=json.dumps({"Eid": EID}),
            headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    r = api(srv, "POST", "/v1/ESimProfiles", data=b"Eid=\xff\xfe", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400


def test_auth_required_everywhere(srv):
    for method, path in (("GET", "/v1/ESimProfiles"), ("POST", "/v1/ESimProfiles"), ("GET", "/v1/ESimProfiles/HPx"),
                         ("GET", "/v1/Sims"), ("GET", "/v1/Nothing")):
        for auth in (None, (SID, "wrong"), ("AC" + "0" * 32, TOKEN)):
            r = api(srv, method, path, auth=auth)
            assert r.status_code == 401, (method, path, auth)
            assert r.json() == {"code": 20003, "message": "Authenticate",
                                "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}
            assert r.headers["WWW-Authenticate"].startswith("Basic")
    r = api(srv, "GET", "/v1/ESimProfiles", auth=None, headers={"Authorization": "Basic !!!notbase64"})
    assert r.status_code == 401


def test_not_found_and_method_not_allowed(srv):
    r = api(srv, "GET", "/v1/ESimProfiles/HP" + "0" * 32)
    assert r.status_code == 404 and r.json()["code"] == 20404 and r.json()["status"] == 404
    assert api(srv, "GET", "/v1/Sims/HS" + "0" * 32).status_code == 404
    assert api(srv, "GET", "/v1/Fleets").status_code == 404
    r = api(srv, "DELETE", "/v1/ESimProfiles")
    assert r.status_code == 405 and r.json()["status"] == 405 and "POST" in r.headers["Allow"]
    assert api(srv, "PATCH", "/v1/ESimProfiles/HPx").status_code == 405
    assert api(srv, "PUT", "/v1/Sims").status_code == 405


def test_list_filters(srv):
    a = wait(srv, create(srv, Eid=EID)["sid"], "available")
    b = wait(srv, create(srv, Eid=EID2)["sid"], "available")
    c = wait(srv, create(srv, GenerateMatchingId="true")["sid"], "available")
    srv.store.mark_downloaded(b["sid"], EID2)

    def sids(q):
        r = api(srv, "GET", "/v1/ESimProfiles", params=q)
        assert r.status_code == 200
        d = r.json()
        assert d["meta"]["key"] == "esim_profiles"
        for p in d["esim_profiles"]:
            assert set(p) == ESIM_KEYS
        return [p["sid"] for p in d["esim_profiles"]]

    assert sids({}) == [a["sid"], b["sid"], c["sid"]]
    assert sids({"Eid": EID}) == [a["sid"]]
    assert sids({"Status": "downloaded"}) == [b["sid"]]
    assert sids({"Status": "available", "Eid": EID2}) == []
    assert sids({"SimSid": c["sim_sid"]}) == [c["sid"]]
    assert sids({"SimSid": "HSnope"}) == []
    sims = api(srv, "GET", "/v1/Sims", params={"Iccid": a["iccid"]}).json()
    assert [s["sid"] for s in sims["sims"]] == [a["sim_sid"]] and sims["meta"]["key"] == "sims"


@pytest.mark.parametrize("q", [{"Status": "bogus"}, {"PageSize": "0"}, {"PageSize": "1001"}, {"PageSize": "ten"},
                               {"Page": "-1"}, {"Eid": EID, "Eid2": "x", "Page": "1.5"}])
def test_list_bad_parameters_400(srv, q):
    r = api(srv, "GET", "/v1/ESimProfiles", params=q)
    assert r.status_code == 400 and r.json()["status"] == 400
    assert api(srv, "GET", "/v1/ESimProfiles?Status=new&Status=failed").status_code == 400


def test_paging_meta_and_tokens(srv):
    made = [create(srv, Eid=EID)["sid"] for _ in range(5)]
    r = api(srv, "GET", "/v1/ESimProfiles", params={"Eid": EID, "PageSize": "2"}).json()
    m = r["meta"]
    base = f"https://{srv.address}/v1/ESimProfiles?Eid={EID}&PageSize=2&Page=0"
    assert m["first_page_url"] == base and m["url"] == base
    assert m["page"] == 0 and m["page_size"] == 2 and m["previous_page_url"] is None
    seen = [p["sid"] for p in r["esim_profiles"]]
    pages = 1
    while m["next_page_url"]:
        nxt = urllib.parse.urlsplit(m["next_page_url"])
        assert nxt.netloc == srv.address and "PageToken=PA" in nxt.query
        r = api(srv, "GET", f"{nxt.path}?{nxt.query}").json()
        m = r["meta"]
        pages += 1
        assert m["page"] == pages - 1 and m["previous_page_url"]
        seen += [p["sid"] for p in r["esim_profiles"]]
    assert seen == made and pages == 3
    prev = urllib.parse.urlsplit(m["previous_page_url"])
    back = api(srv, "GET", f"{prev.path}?{prev.query}").json()
    assert [p["sid"] for p in back["esim_profiles"]] == made[2:4]
    # Page without a token is an offset; a token we cannot resolve falls back to it
    r = api(srv, "GET", "/v1/ESimProfiles", params={"PageSize": "2", "Page": "2", "PageToken": "PAnothing"}).json()
    assert [p["sid"] for p in r["esim_profiles"]] == made[4:]
    r = api(srv, "GET", "/v1/ESimProfiles", params={"PageSize": "1000", "Page": "99"}).json()
    assert r["esim_profiles"] == [] and r["meta"]["next_page_url"] is None


class _Catcher(BaseHTTPRequestHandler):
    got: list = []

    def _take(self, form: str):
        self.got.append((self.command, dict(urllib.parse.parse_qsl(form, keep_blank_values=True))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802
        self._take(self.rfile.read(int(self.headers["Content-Length"])).decode())

    def do_GET(self):  # noqa: N802
        self._take(urllib.parse.urlsplit(self.path).query)

    def log_message(self, *a):
        pass


@pytest.fixture
def catcher():
    _Catcher.got = []
    httpd = HTTPServer(("127.0.0.1", 0), _Catcher)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield httpd, _Catcher.got
    httpd.shutdown()
    httpd.server_close()


def _wait_for(got, n, timeout=3.0):
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        time.sleep(0.02)
    return got


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_status_callbacks(srv, catcher, method):
    httpd, got = catcher
    url = f"http://127.0.0.1:{httpd.server_address[1]}/cb?x=1"
    p = create(srv, Eid=EID, CallbackUrl=url, CallbackMethod=method)
    a = wait(srv, p["sid"], "available")
    srv.store.mark_downloaded(p["sid"], EID)
    srv.store.finish(p["sid"], ok=True)
    _wait_for(got, 4)
    statuses = [f["ESimProfileStatus"] for _, f in got]
    assert statuses == ["reserving", "available", "downloaded", "installed"]   # delivered in order
    assert {m for m, _ in got} == {method}
    last = next(f for _, f in got if f["ESimProfileStatus"] == "installed")
    assert last["ESimProfileSid"] == p["sid"] and last["SimSid"] == a["sim_sid"] and last["SimIccid"] == a["iccid"]
    assert last["Eid"] == EID and last["SmdpPlusAddress"] == srv.address
    assert last["ErrorCode"] == "" and last["ErrorMessage"] == ""


def test_failed_callback_carries_error_and_dead_callback_is_harmless(srv, catcher):
    httpd, got = catcher
    p = create(srv, Eid="123", CallbackUrl=f"http://127.0.0.1:{httpd.server_address[1]}/")
    wait(srv, p["sid"], "failed")
    _wait_for(got, 2)
    f = next(f for _, f in got if f["ESimProfileStatus"] == "failed")
    assert f["ErrorCode"] == "invalid_eid" and f["ErrorMessage"]
    for url in ("http://127.0.0.1:9/", "not a url", "ftp://127.0.0.1/x"):
        q = create(srv, Eid=EID, CallbackUrl=url)
        wait(srv, q["sid"], "available")


def test_state_persists_and_reservation_resumes(tmp_path):
    path = tmp_path / "twin.json"
    s1 = TwinStore(account_sid=SID, smdp_address="localhost:1", state_path=path, reserve_delay=30)
    slow = s1.create(eid=EID)                           # still "new" when we stop
    s1.close()
    s2 = TwinStore(account_sid=SID, smdp_address="localhost:1", state_path=path, reserve_delay=0.01)
    assert s2.get(slow["sid"])["status"] == "new"
    s2.start()
    end = time.monotonic() + 3
    while s2.get(slow["sid"])["status"] != "available" and time.monotonic() < end:
        time.sleep(0.01)
    assert s2.get(slow["sid"])["status"] == "available"
    iccid = s2.get(slow["sid"])["iccid"]
    s2.close()
    s3 = TwinStore(account_sid=SID, smdp_address="localhost:1", state_path=path)
    assert s3.get(slow["sid"])["iccid"] == iccid and s3.list_sims(iccid=iccid)
    assert not list(tmp_path.glob("*.tmp*"))
    nxt = s3.inventory.allocate()
    assert nxt.iccid != iccid                           # the inventory counter persisted too


def test_broken_state_file_is_reported(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{nope")
    with pytest.raises(ValueError, match="delete"):
        TwinStore(account_sid=SID, state_path=p)
