"""agent/preload.py: the imports a CLI command runs while it waits for the modem."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from agent import ops

@pytest.mark.parametrize("op", sorted(ops._OPS))
def test_every_preloaded_module_exists(op):
    for step in ops.preload_modules(op):
        module, _, func = step.partition(":")
        m = importlib.import_module(module)
        if func:
            assert callable(getattr(m, func))


def test_what_a_download_imports_while_the_package_loads_exists():
    from agent.ops import download
    for name in download.AFTER_INSTALL:
        importlib.import_module(name)


STEPS_SCRIPT = """
import sys
from agent.preload import Steps
w = Steps(["os", "agent.es10", "agent.no_such_module", "agent.asn1tables:warm", "agent.bpp"])
assert list(w.pending) == ["agent.es10", "agent.no_such_module", "agent.asn1tables:warm", "agent.bpp"], w.pending
assert w() is True and "agent.es10" in sys.modules and "agent.bpp" not in sys.modules
assert w() is True and [n for n, _ in w.failed] == ["agent.no_such_module"]
from agent import asn1tables
assert asn1tables._types is None
assert w() is True and asn1tables._types is not None, "the base tables were not loaded"
assert w() is False and "agent.bpp" in sys.modules
assert not Steps(["os", "agent.bpp"])
calls = []
w.add([lambda: calls.append(1), "agent.bpp", lambda: 1 / 0])   # agent.bpp: imported already, skipped
assert len(w.pending) == 2 and w() is True and calls == [1]
assert w() is False and len(w.failed) == 2 and "ZeroDivisionError" in w.failed[1][1]
print("ok")
"""


def test_steps_run_in_order_one_per_call_and_failures_are_kept():
    r = subprocess.run([sys.executable, "-c", STEPS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_tables_load_after_the_session_opens_for_operations_that_start_without_them():
    """chip info and a download send fixed requests first (es10.FIXED_REQUESTS): their ASN.1
    tables are not in the session-start steps; chip info has them loaded once the session is
    open, a download when the card starts AuthenticateServer (ops/download.py)."""
    for op in ("chip.info", "profile.download"):
        assert not set(ops.TABLES) & set(ops.preload_modules(op)), op
    assert set(ops.session_preload("chip.info")) == set(ops.TABLES[:4]) | {"agent.es10_types"}
    assert ops.session_preload("profile.download") == ()
    from agent.ops.download import AFTER_AUTHENTICATE
    assert set(ops.TABLES) <= set(AFTER_AUTHENTICATE)
    for op in ("profile.list", "notification.process"):
        assert set(ops.TABLES) <= set(ops.preload_modules(op)) and ops.session_preload(op) == ()


def test_a_preload_step_left_from_an_ended_download_makes_no_client():
    """ops/download.py queues the ES9+ client's set-up as a preload step; in the daemon's worker,
    whose card outlives the job, a step still pending when the job ends must not make a client
    of the job's closed pool (the step fails, quietly, as preload steps do)."""
    from functools import partial

    from agent.preload import Steps
    pool = ops.ServerSettings().pool()
    steps = Steps([partial(pool, "smdp.example.com")])
    pool.close()
    assert steps() is False and pool.clients == {}
    assert steps.failed and "closed" in steps.failed[0][1]
