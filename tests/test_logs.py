"""agent/logs.py: loggers that import the stdlib logging only when a record can be emitted (issue #8).

pytest itself imports logging, so every behaviour that depends on logging *not* being imported
runs in a fresh interpreter (``_run``); what such a script finds is printed as JSON on stdout,
what logging writes goes to stderr.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from agent import logs

ROOT = Path(__file__).resolve().parent.parent

#: The modules on the command path that log through agent.logs.
LAZY_MODULES = [
    "agent.ops.switch", "agent.ops", "agent.ops.ipa", "agent.ops.card", "agent.ops.download",
    "agent.esipa_download", "agent.tls", "agent.flows.download", "agent.flows.notifications",
    "agent.sim.euicc", "agent.apdu", "agent.es9p", "agent.transport.open", "agent.transport.cgla",
    "agent.transport.csim", "agent.transport.direct", "agent.transport.at", "agent.ipa", "agent.store",
    "agent.network", "agent.eim_client",
]


def _run(code: str) -> tuple[dict, str]:
    """Run ``code`` in a fresh interpreter; (the JSON it printed last on stdout, its stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), r.stderr


def test_level_constants_are_loggings():
    assert (logs.DEBUG, logs.INFO, logs.WARNING, logs.ERROR, logs.CRITICAL) == (
        logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


def test_command_path_modules_and_quiet_records_leave_logging_unimported():
    out, err = _run(f"""
        import json, sys
        from agent import logs
        for m in {LAZY_MODULES!r}:
            __import__(m)
        from agent.ops.card import log as card_log
        from agent.transport.at import log as at_log
        from agent.flows.download import log as dl_log
        card_log.debug("a %s", 1)
        at_log.info("b %s", 2)
        dl_log.log(logs.DEBUG, "c %s", 3)
        enabled = [dl_log.isEnabledFor(lv) for lv in (logs.DEBUG, logs.INFO, logs.WARNING, logs.ERROR)]
        print(json.dumps({{"logging": "logging" in sys.modules, "enabled": enabled,
                          "effective": at_log.getEffectiveLevel()}}))
    """)
    assert out == {"logging": False, "enabled": [False, False, True, True], "effective": 30}
    assert err == ""


def test_a_warning_without_configuration_imports_logging_and_reaches_stderr():
    out, err = _run("""
        import json, sys
        from agent.logs import get_logger
        log = get_logger("agent.x")
        before = "logging" in sys.modules
        log.warning("careful: %s left", 7)
        print(json.dumps({"before": before, "after": "logging" in sys.modules}))
    """)
    assert out == {"before": False, "after": True}
    assert err == "careful: 7 left\n"           # logging's last resort handler: the bare message


def test_log_at_warning_through_log_is_forwarded():
    out, err = _run("""
        import json, sys
        from agent import logs
        log = logs.get_logger("agent.x")
        log.log(logs.WARNING, "as %s", "warning")
        print(json.dumps({"logging": "logging" in sys.modules}))
    """)
    assert out == {"logging": True}
    assert err == "as warning\n"


def test_configure_0_drops_debug_and_formats_warnings():
    out, err = _run("""
        import json, sys
        from agent import logs
        log = logs.get_logger("agent.x")
        logs.configure(0)
        pending = "logging" not in sys.modules
        log.debug("not shown %s", 1)
        log.info("not shown %s", 2)
        still = "logging" not in sys.modules
        log.warning("shown %s", 3)
        log.debug("not shown %s", 4)
        print(json.dumps({"pending": pending, "still": still}))
    """)
    assert out == {"pending": True, "still": True}
    assert err == "WARNING agent.x: shown 3\n"


def test_configure_1_shows_info_not_debug():
    out, err = _run("""
        import json, sys
        from agent import logs
        log = logs.get_logger("agent.x")
        logs.configure(1)
        now = "logging" in sys.modules
        log.info("step %s", 1)
        log.debug("detail %s", 2)
        print(json.dumps({"now": now}))
    """)
    assert out == {"now": True}
    assert err == "INFO agent.x: step 1\n"


def test_configure_2_shows_debug():
    out, err = _run("""
        from agent import logs
        log = logs.get_logger("agent.y")
        logs.configure(2)
        log.debug("detail %s", 2)
        log.log(logs.DEBUG, "via log %s", 3)
    """)
    assert err == "DEBUG agent.y: detail 2\nDEBUG agent.y: via log 3\n"


def test_configure_writes_to_the_stream_given():
    out, err = _run("""
        import io, json
        from agent import logs
        buf = io.StringIO()
        logs.configure(0, stream=buf)
        logs.get_logger("agent.z").error("bad %s", 1)
        print(json.dumps({"buf": buf.getvalue()}))
    """)
    assert out == {"buf": "ERROR agent.z: bad 1\n"}
    assert err == ""


def test_logging_imported_first_forwards_debug_to_a_handler_at_debug():
    out, err = _run("""
        import logging, json, sys
        records, lines = [], []
        class H(logging.Handler):
            def emit(self, record):
                records.append([record.levelname, record.name, record.getMessage(), record.funcName,
                                record.lineno, record.filename])
        root = logging.getLogger()
        root.addHandler(H(logging.DEBUG))
        root.setLevel(logging.DEBUG)
        from agent.logs import get_logger
        log = get_logger("agent.x")
        def caller():
            log.debug("d %s", 1); lines.append(sys._getframe().f_lineno)    # the line the record must name
            log.info("i %s", 2); lines.append(sys._getframe().f_lineno)
        caller()
        print(json.dumps([records, lines]))
    """)
    records, (l1, l2) = out
    assert records == [["DEBUG", "agent.x", "d 1", "caller", l1, "<string>"],
                       ["INFO", "agent.x", "i 2", "caller", l2, "<string>"]]
    assert err == ""


def test_an_explicit_stacklevel_still_counts_from_the_caller():
    out, _ = _run("""
        import logging, json, sys
        records, lines = [], []
        class H(logging.Handler):
            def emit(self, record):
                records.append([record.funcName, record.lineno])
        logging.getLogger().addHandler(H())
        from agent.logs import get_logger
        log = get_logger("agent.x")
        def helper():
            log.warning("w", stacklevel=2)
        def outer():
            lines.append(sys._getframe().f_lineno); helper()     # stacklevel=2 names this line
        outer()
        print(json.dumps([records, lines]))
    """)
    assert out[0] == [["outer", out[1][0]]]


def test_a_pending_configuration_is_applied_when_someone_else_imported_logging():
    out, err = _run("""
        import json, sys
        from agent import logs
        log = logs.get_logger("agent.x")
        logs.configure(0)
        import logging                      # a library imports it, after the configuration
        pending = not logging.getLogger().handlers
        log.debug("dropped %s", 1)          # forwarded now: the configuration goes in first
        configured = bool(logging.getLogger().handlers)
        log.warning("formatted %s", 2)
        print(json.dumps({"pending": pending, "configured": configured}))
    """)
    assert out == {"pending": True, "configured": True}
    assert err == "WARNING agent.x: formatted 2\n"


def test_configure_applies_at_once_when_logging_is_already_imported():
    out, err = _run("""
        import json, logging
        from agent import logs
        logs.configure(0)
        print(json.dumps({"handlers": len(logging.getLogger().handlers),
                          "level": logging.getLogger().level}))
    """)
    assert out == {"handlers": 1, "level": 30}


def test_the_first_configuration_wins_as_with_basic_config():
    _, err = _run("""
        from agent import logs
        logs.configure(0)                   # pending
        logs.configure(2)                   # applies the pending one; basicConfig then does nothing
        log = logs.get_logger("agent.x")
        log.debug("not shown")
        log.warning("shown")
    """)
    assert err == "WARNING agent.x: shown\n"


def test_exception_carries_the_traceback():
    _, err = _run("""
        from agent import logs
        logs.configure(0)
        log = logs.get_logger("agent.x")
        def divide():
            return 1 / 0
        try:
            divide()
        except ZeroDivisionError:
            log.exception("failed %s", "here")
    """)
    assert err.startswith("ERROR agent.x: failed here\nTraceback (most recent call last):\n")
    assert ", in divide\n" in err and err.endswith("ZeroDivisionError: division by zero\n")


def test_arguments_are_formatted_only_when_a_record_is_emitted():
    out, err = _run("""
        import json, sys
        from agent import logs
        calls = []
        class Counted:
            def __str__(self):
                calls.append(1)
                return "counted"
        class Boom:
            def __str__(self):
                raise AssertionError("formatted a dropped record")
        log = logs.get_logger("agent.x")
        log.debug("%s", Boom())             # no configuration
        log.info("%s", Boom())
        logs.configure(0)
        log.debug("%s", Boom())             # verbose 0
        log.log(logs.INFO, "%s", Boom())
        dropped = len(calls)
        log.warning("%s", Counted())        # emitted: formatted once
        log.debug("%s", Boom())             # logging imported now, the level still drops it
        print(json.dumps({"dropped": dropped, "emitted": len(calls)}))
    """)
    assert out == {"dropped": 0, "emitted": 1}
    assert err == "WARNING agent.x: counted\n"       # no "--- Logging error ---" from Boom


def test_proxy_records_reach_caplog(caplog):
    log = logs.get_logger("agent.test_logs")
    with caplog.at_level(logging.DEBUG, logger="agent.test_logs"):
        log.debug("d %s", 1)
        log.log(logs.DEBUG, "l %s", 2)
        assert log.isEnabledFor(logging.DEBUG)
    assert [(r.levelname, r.getMessage(), r.funcName) for r in caplog.records] == [
        ("DEBUG", "d 1", "test_proxy_records_reach_caplog"), ("DEBUG", "l 2", "test_proxy_records_reach_caplog")]


def test_get_logger_returns_one_proxy_per_name_and_forwards_other_attributes():
    a = logs.get_logger("agent.test_logs.same")
    assert a is logs.get_logger("agent.test_logs.same") and a.name == "agent.test_logs.same"
    assert a.handlers is logging.getLogger("agent.test_logs.same").handlers
