"""Measurement tools: the simulated modem's line counters (``sim modem --stats``), its
per-command latency and full-duplex echo, and the whole-process measurement the
benchmarks use (bench_process). Correctness of the figures, not speed targets."""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import serial

from agent import bench_process
from agent.sim.modem import ModemLogic, ModemServer


def _serve(tmp_path, card, **kw):
    server = ModemServer(ModemLogic(card, latency=kw.pop("latency", 0.0)), link=str(tmp_path / "tty"), **kw)
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    return server, th


def _talk(path: str, line: bytes, until: bytes = b"OK\r\n", timeout: float = 5.0) -> tuple[bytes, float]:
    with serial.Serial(path, 115200, timeout=0.05) as s:
        t0 = time.monotonic()
        s.write(line)
        got = b""
        while until not in got and time.monotonic() - t0 < timeout:
            got += s.read(256)
        return got, time.monotonic() - t0


def test_stats_file_counts_bytes_echo_commands_and_apdus(tmp_path, fake_euicc):
    stats = tmp_path / "stats.json"
    server, th = _serve(tmp_path, fake_euicc, stats_path=str(stats))
    try:
        got, _ = _talk(server.path, b"AT\r")
        assert b"OK" in got
        got, _ = _talk(server.path, b'AT+CSIM=10,"0070000001"\r', until=b"OK\r\n")
        assert b"+CSIM:" in got
        doc = json.loads(stats.read_text())
        assert doc["at_commands"] == 2 and doc["csim_commands"] == 1 and doc["apdus_to_card"] == 1
        assert doc["bytes_host_to_modem"] == len(b"AT\r") + len(b'AT+CSIM=10,"0070000001"\r')
        # echo is on at power-up: both lines came back, and counted
        assert doc["echo_bytes"] == doc["bytes_host_to_modem"]
        assert doc["bytes_modem_to_host"] > doc["echo_bytes"]
    finally:
        server.stop()
        th.join(5)


def test_latency_delays_each_apdu_answer(tmp_path, fake_euicc):
    server, th = _serve(tmp_path, fake_euicc, latency=0.3)
    try:
        _, plain = _talk(server.path, b"AT\r")
        got, apdu = _talk(server.path, b'AT+CSIM=10,"0070000001"\r')
        assert b"+CSIM:" in got and apdu >= 0.3 and plain < 0.3
    finally:
        server.stop()
        th.join(5)


def test_echo_is_full_duplex(tmp_path, fake_euicc):
    """At 1200 baud a 40-byte command takes ~0.33 s to arrive; a UART echoes while it
    receives, so echo + OK take ~0.33 s + the answer's own time, not twice the command."""
    server, th = _serve(tmp_path, fake_euicc, baud=1200)
    cmd = b'AT+CSIM=26,"00A4040008A000000559101001"\r'    # 41 bytes, one command
    try:
        got, took = _talk(server.path, cmd, until=b"OK\r\n", timeout=10)
        assert got.startswith(cmd)
        answer = len(got) - len(cmd)
        half_duplex = (2 * len(cmd) + answer) * 10 / 1200
        full_duplex = (len(cmd) + answer) * 10 / 1200
        assert took < (half_duplex + full_duplex) / 2, (took, full_duplex, half_duplex)
    finally:
        server.stop()
        th.join(5)


def test_whole_process_measurement_sees_the_child_alone(tmp_path):
    """Peak RSS is the measured command's own, not the (larger) measuring process's."""
    ballast = bytearray(80 * 1024 * 1024)       # make this process big
    small = bench_process.run_wait4([sys.executable, "-c", "pass"])
    big = bench_process.run_wait4([sys.executable, "-c", "x = bytearray(60 * 1024 * 1024); import time; "
                                                       "time.sleep(0.05)"])
    assert small.rc == 0 and small.max_rss_mb < 40 and small.cpu_s < 5
    assert 60 <= big.max_rss_mb < 80 + 60
    assert len(ballast)
    failing = bench_process.run_wait4([sys.executable, "-c", "import sys; sys.exit(3)"], check=False)
    assert failing.rc == 3


def test_console_script_is_the_installed_one():
    argv = bench_process.console_script()
    assert os.path.basename(argv[0]) in ("esim-agent", os.path.basename(sys.executable))
