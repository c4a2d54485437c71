"""What the property tests share (tests/test_fuzz.py and the parsers' own test files): a
per-example time bound, the run's size (fast by default; `-m fuzz` or
ESIM_AGENT_FUZZ_EXAMPLES=N make it long), and byte-level mutations of valid inputs."""
from __future__ import annotations

import os
import signal
import threading

from hypothesis import strategies as st

LONG_EXAMPLES = 20000
EXAMPLE_SECONDS = 10.0
#: byte values a "set" mutation prefers: TLV tags and length forms, SWs, CR/LF and friends
INTERESTING = [0x00, 0x01, 0x02, 0x04, 0x06, 0x17, 0x18, 0x1F, 0x20, 0x30, 0x61, 0x6C, 0x7F, 0x80, 0x81,
               0x82, 0x84, 0x85, 0x88, 0x90, 0xA0, 0xA3, 0xBF, 0xFF]


class _Hang(BaseException):
    """Raised by SIGALRM: a BaseException, so no `except Exception` in the code under test
    swallows it."""


def _on_alarm(signum, frame):
    raise _Hang()


def bounded(fn, *args, seconds: float = EXAMPLE_SECONDS, **kw):
    """``fn(*args, **kw)``, failing (not hanging) when it runs longer than ``seconds``."""
    assert threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args, **kw)
    except _Hang:
        raise AssertionError(f"no result within {seconds:g} s: a hang") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def examples(config, default: int) -> int:
    """How many examples a property runs: ``default``, LONG_EXAMPLES under `-m fuzz`, or
    ESIM_AGENT_FUZZ_EXAMPLES."""
    env = os.environ.get("ESIM_AGENT_FUZZ_EXAMPLES")
    if env:
        return max(1, int(env))
    expr = config.getoption("markexpr", default="") or ""
    if "fuzz" in expr and "not fuzz" not in expr:
        return max(default, LONG_EXAMPLES)
    return default


@st.composite
def mutated(draw, seeds, interesting=INTERESTING, inserts=(b"\x00\x00", b"\x80", b"\x84\xff\xff\xff\xff"),
            most: int = 4, least: int = 1):
    """One of ``seeds`` with ``least``..``most`` byte-level mutations (flip, set, insert, delete,
    truncate, duplicate a slice), so most of the structure survives and the damage sits deep
    inside."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(least, most))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        if not data:
            op = "insert"
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from(list(interesting)) | st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(list(inserts)))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
        else:
            n = draw(st.integers(1, 16))
            data[pos:pos] = data[pos:pos + n]
    return bytes(data)
