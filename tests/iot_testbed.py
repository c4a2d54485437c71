"""SGP.32 (IoT) test bed made of real processes, as an operator's check runs it.

Used by tests/test_iot_e2e.py and tests/test_ipa_cli.py (``tests/`` is on sys.path):

* :class:`LocalEim` — ``esim-agent sim eim`` in a subprocess; ``api()`` calls its REST API
  over HTTPS, verified against the PKI's ci.pem (the CA of the eIM's TLS certificate), with
  the Bearer token; ``stop()`` / ``start()`` restart it on the same port (its state lives
  in PKI/eim/state.json, so it survives);
* :class:`LocalSmdp` — ``esim-agent sim smdpp`` in a subprocess; ``reserve()`` orders a
  profile with a matching id through its Twilio-style ``/v1/ESimProfiles`` API;
* :func:`make_iot_bed` — ``sim pki``, the SM-DP+, the eIM, ``sim modem --iot --preload 2
  --pki DIR [--network ICCID:MODE]`` on a pty, the daemon (tests/test_daemon.World) with an
  ``[eim]`` table, ``ipa add-eim`` and a first ``ipa poll``: the eIM knows the eUICC.
"""
from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from test_daemon import REPO, World, _env

EIM_TOKEN = "eim-test-token"
SMDP_AUTH = ("AC" + "2e" * 16, "smdp-test-token")


def wait_for(pred, timeout: float, what: str, world=None):
    """``pred()``'s first truthy value, polled every 0.2 s; AssertionError("what within …") after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"{what} within {timeout} s\n{world.log_tail() if world else ''}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class HttpError(AssertionError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status, self.body = status, body


def _https(method: str, url: str, *, ca: Path, headers: dict, data: bytes | None = None):
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise HttpError(e.code, e.read().decode(errors="replace")) from None
    return json.loads(raw) if raw else None


class LocalEim:
    """`esim-agent sim eim --pki DIR --port P --token T` in a subprocess (``port=0``: any free
    port the first time; a restart takes the same one, which the eUICC's eimFqdn names)."""

    def __init__(self, pki: Path, log: Path, *, port: int = 0):
        self.pki, self.log, self.port = Path(pki), Path(log), port
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def state_path(self) -> Path:
        return self.pki / "eim" / "state.json"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the eIM is running"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "sim", "eim", "--pki", str(self.pki),
                                          "--port", str(self.port), "--token", EIM_TOKEN], cwd=REPO, env=_env(),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()
        assert "listening on https://127.0.0.1:" in line, \
            f"the local eIM did not start: {line!r} {self.log.read_text(errors='replace')[-2000:]}"
        port = int(line.split("https://127.0.0.1:")[1].split()[0].rstrip(";"))
        assert self.port in (0, port), (self.port, port)
        self.port = port

    def stop(self) -> None:
        _stop(self.proc)

    close = stop

    def api(self, method: str, path: str, body=None):
        """A REST call; the JSON answer (HttpError on a 4xx/5xx)."""
        return _https(method, f"https://127.0.0.1:{self.port}{path}", ca=self.pki / "ci.pem",
                      data=json.dumps(body).encode() if body is not None else None,
                      headers={"Authorization": f"Bearer {EIM_TOKEN}", "Content-Type": "application/json"})

    def euicc(self, eid: str) -> dict | None:
        found = self.api("GET", f"/api/v1/euicc?q=eid:{eid}")
        return self.api("GET", f"/api/v1/euicc/{found[0]['id']}") if found else None

    def state(self) -> dict:
        """The eIM's persistent state (read only; written atomically by the eIM)."""
        return json.loads(self.state_path.read_text())


class LocalSmdp:
    """`esim-agent sim smdpp --pki DIR --port 0 --auth SID:TOKEN` in a subprocess."""

    def __init__(self, pki: Path, log: Path):
        self.pki = Path(pki)
        with open(log, "a") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "sim", "smdpp", "--pki", str(pki),
                                          "--port", "0", "--auth", ":".join(SMDP_AUTH)], cwd=REPO, env=_env(),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=f, text=True)
        line = self.proc.stdout.readline()
        assert "listening on https://127.0.0.1:" in line, f"the local SM-DP+ did not start: {line!r}"
        self.port = int(line.split("https://127.0.0.1:")[1].split()[0])
        self.address = line.split("(address ")[1].split(")")[0]

    def _api(self, method: str, path: str, form: dict | None = None) -> dict:
        auth = base64.b64encode(":".join(SMDP_AUTH).encode()).decode()
        return _https(method, f"https://127.0.0.1:{self.port}{path}", ca=self.pki / "ci.pem",
                      data=urllib.parse.urlencode(form).encode() if form is not None else None,
                      headers={"Authorization": f"Basic {auth}"})

    def order(self, sid: str) -> dict:
        return self._api("GET", f"/v1/ESimProfiles/{sid}")

    def reserve(self) -> dict:
        """A profile reserved with a generated matching id, once it is ``available`` (it then
        carries its ``iccid`` and ``activation_code``)."""
        sid = self._api("POST", "/v1/ESimProfiles", {"GenerateMatchingId": "true"})["sid"]
        return wait_for(lambda: (o := self.order(sid))["status"] == "available" and o, 10,
                        f"order {sid} is not available")

    def close(self) -> None:
        _stop(self.proc)


@dataclass
class IotBed:
    world: World
    eim: LocalEim
    smdp: LocalSmdp
    pki: Path
    eid: str
    euicc_id: int
    iccids: list[str]          # the two preloaded profiles, the first one enabled

    def close(self) -> None:
        try:
            self.world.close()
        finally:
            self.eim.close()
            self.smdp.close()
            shutil.rmtree(self.world.dir, ignore_errors=True)


def make_iot_bed(name: str, *, never: tuple[int, ...] = (), config: dict | None = None,
                 eim_lines: tuple[str, ...] = ("poll_interval = 86400",)) -> IotBed:
    """A started bed. ``never``: indexes of preloaded profiles the modem's network never
    registers (``--network ICCID:never``); their ICCIDs depend on the card's random EID, so
    the modem runs once to make the card, the CLI lists its profiles, and the modem starts
    again with the ``--network`` options."""
    d = Path(tempfile.mkdtemp(prefix=f"eti{name}-", dir="/tmp"))   # short: AF_UNIX path limit
    w = eim = smdp = None
    try:
        pki = d / "pki"
        r = subprocess.run([sys.executable, "-m", "agent", "sim", "pki", str(pki)], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        smdp = LocalSmdp(pki, d / "smdpp.log")
        eim = LocalEim(pki, d / "eim.log")
        w = World(name, d / "card.json", modem_args=["--iot", "--preload", "2", "--pki", str(pki)], workdir=d,
                  config={"ca_bundle": str(pki / "ci.pem"), **(config or {})})
        w.cfg.write_text(w.cfg.read_text() + "[eim]\n" + "\n".join(eim_lines) + f'\nca = "{pki}/ci.pem"\n')
        w.start_modem()
        listed = w.cli("--json", "profile", "list")
        assert listed.rc == 0, listed
        iccids = [p["iccid"] for p in listed.doc["data"]["profiles"]]
        assert len(iccids) == 2 and listed.doc["data"]["profiles"][0]["state"] == "enabled", listed
        if never:
            _stop(w.modem)
            w.modem_args += [a for i in never for a in ("--network", f"{iccids[i]}:never")]
            w.start_modem()
        w.start_daemon()
        r = w.cli("--json", "ipa", "add-eim", pki / "eim" / "eim-config.der")
        assert r.rc == 0 and r.doc["data"]["added"][0]["eim_id"] == "esim-agent-eim", r
        eid = w.cli("--json", "chip", "info").doc["data"]["eid"]
        # the daemon polls by itself once the card has an eIM; then one `ipa poll` of ours
        wait_for(lambda: [j for j in w.jobs() if j["kind"] == "ipa.poll" and j["state"] in ("done", "failed")],
                 30, "no poll of the daemon's own after add-eim", w)
        r = w.cli("--json", "ipa", "poll")
        assert r.rc == 0 and r.doc["ok"], r
        rec = eim.euicc(eid)
        assert rec is not None, eim.api("GET", "/api/v1/euicc")
        return IotBed(w, eim, smdp, pki, eid, rec["id"], iccids)
    except BaseException:
        for x in (w, eim, smdp):
            if x is not None:
                x.close()
        shutil.rmtree(d, ignore_errors=True)
        raise
