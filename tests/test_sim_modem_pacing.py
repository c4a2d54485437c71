"""The simulated modem's UART emulation (``--baud``): never faster than the line, and not
slower either (absolute schedules both ways, the card's work overlapping the command's
receive time), and a ``--stats`` file that is current when the reply arrives."""
from __future__ import annotations

import json
import os
import select
import threading
import time
import tty

import pytest

from agent.sim.modem import ModemLogic, ModemServer

pytestmark = pytest.mark.usefixtures("hang_guard")


class SizedCard:
    """Answers ``00 CA P1 P2 Lc data`` with P1·256+P2 bytes of data and 9000, after ``delay`` s."""

    eid = "89049032123451234512345678901235"

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[float] = []

    def enabled_iccid(self):
        return "8944476500001224158"

    def reset(self):
        pass

    def apdu(self, c: bytes) -> bytes:
        self.calls.append(time.monotonic())
        if self.delay:
            time.sleep(self.delay)
        return bytes((i * 7) & 0xFF for i in range(c[2] * 256 + c[3])) + b"\x90\x00"


@pytest.fixture
def modem(tmp_path):
    """modem(card, baud, stats=False) → (server, host fd on the pty, raw, echo off)."""
    started = []

    def start(card, baud, stats=False):
        stats_path = str(tmp_path / f"stats{len(started)}.json") if stats else None
        server = ModemServer(ModemLogic(card), baud=baud, stats_path=stats_path)
        th = threading.Thread(target=server.serve, daemon=True)
        th.start()
        fd = os.open(server.path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        started.append((server, th, fd))
        talk(fd, b"ATE0\r")
        return server, fd

    yield start
    for server, th, fd in started:
        os.close(fd)
        server.stop()
        th.join(5)


def talk(fd: int, *pieces: bytes, pause: float = 0.0, until: bytes = b"OK\r\n") -> tuple[bytes, float, float]:
    """Write the pieces (``pause`` s apart), read until ``until``: (reply, time from the first
    write, time from the last write)."""
    t0 = time.monotonic()
    for i, p in enumerate(pieces):
        if i:
            time.sleep(pause)
        t_last = time.monotonic()
        os.write(fd, p)
    got = b""
    while not got.endswith(until):
        r, _, _ = select.select([fd], [], [], 5)
        assert r, f"no reply to {pieces!r} (got {got!r})"
        got += os.read(fd, 65536)
    t1 = time.monotonic()
    return got, t1 - t0, t1 - t_last


def csim(data_len: int, answer_len: int) -> bytes:
    hx = (bytes([0x00, 0xCA, answer_len >> 8, answer_len & 0xFF, data_len]) + bytes(data_len)).hex().upper()
    return f'AT+CSIM={len(hx)},"{hx}"\r'.encode()


@pytest.mark.parametrize("data_len, answer_len", [(4, 0), (4, 1021), (250, 10)])
def test_replies_never_faster_than_the_line_nor_drifting_slower(modem, data_len, answer_len):
    baud = 115200
    _, fd = modem(SizedCard(), baud)
    cmd = csim(data_len, answer_len)
    excess = []
    for _ in range(8):
        got, took, _ = talk(fd, cmd)
        bound = (len(cmd) + len(got)) * 10 / baud
        assert took >= bound, (took, bound)          # the line is a floor, always
        excess.append(took - bound)
    # An absolute schedule: a 2 KB reply in ~45 paced writes costs no more than a short one
    # (sleeping per chunk would add ~0.1 ms a chunk). The best of 8 (load only adds time),
    # generous for a loaded test machine: ~0.2 ms when idle.
    assert min(excess) < 0.003, excess


def test_a_command_written_in_pieces_takes_its_line_time_after_the_pause(modem):
    """Bytes take their slots on the receive line from when they arrive: after a pause, the rest
    of a command still needs its own line time before the answer can start."""
    baud = 9600
    _, fd = modem(SizedCard(), baud)
    cmd = csim(40, 0)                                # ~110 bytes
    head, rest = cmd[:10], cmd[10:]
    got, _, since_last = talk(fd, head, rest, pause=0.15)
    assert since_last >= (len(rest) + len(got)) * 10 / baud


def test_card_work_overlaps_the_receive_time_with_echo_off(modem):
    """A slow card (0.1 s an APDU) at 2400 baud: the command is executed as soon as the pty
    holds all of it, while the line is still 'receiving' it (~0.17 s), and the answer leaves
    when the line has received the command, not 0.1 s later."""
    baud = 2400
    card = SizedCard(delay=0.1)
    _, fd = modem(card, baud)
    cmd = csim(4, 0)                                 # 32 bytes: 0.133 s on the line
    t0 = time.monotonic()
    got, took, _ = talk(fd, cmd)
    line = (len(cmd) + len(got)) * 10 / baud
    assert card.calls[-1] - t0 < len(cmd) * 10 / baud          # ran before the command was "in"
    assert line <= took < line + 0.06, (took, line)             # sequential would be line + 0.1


def test_stats_file_is_current_when_the_reply_arrives(modem):
    """With --baud the counters are written while the reply is on the line, before its last byte."""
    server, fd = modem(SizedCard(), 115200, stats=True)
    for n in range(1, 4):
        got, _, _ = talk(fd, csim(4, 200))
        doc = json.loads(open(server.stats_path).read())
        assert doc["csim_commands"] == n and doc["apdus_to_card"] == n
        assert doc["bytes_modem_to_host"] == server.logic.stats.bytes_modem_to_host
        assert doc["bytes_host_to_modem"] == server.logic.stats.bytes_host_to_modem
        assert doc["baud"] == 115200
