"""Import what a command will need while the modem is busy answering (issue #8).

A CLI command spends its first ~0.1 s talking to the modem (the AT session start, the
transport probe, opening the ISD-R channel): round trips where the process mostly waits on
the serial line. Python spends about as long importing (without kept bytecode: compiling)
the code the operation runs next — the ES10 client and the ASN.1 tables, and for a download
the ES9+ client, TLS and the outbox. Done one after the other, the two add up; here the
imports run in a background thread that fills the line's waits, so they are over (or nearly)
when the operation reaches them.

Safe by construction:

* nothing here changes what runs, only when a module is first imported: the thread imports
  the very modules the operation imports itself, and an import that fails here is ignored
  (the operation's own import raises the same error where it belongs);
* Python's per-module import locks make the operation wait for a module the thread is still
  importing; our package has no module-level import cycle that could make the two threads
  deadlock (tests/test_preload.py checks the graph);
* while the thread runs, the interpreter switches threads every 0.5 ms instead of 5 ms, so the
  thread holding the GIL never delays the modem's answer being read by more than that; the
  interval is put back when the thread ends.
"""
from __future__ import annotations

import sys
import threading

#: How often the interpreter hands the GIL over while a preload runs (seconds).
SWITCH_INTERVAL = 0.0005


class Preload:
    """One background run over ``steps``, in order: a module name is imported, ``module:function``
    imported then called (e.g. loading the ASN.1 tables), a callable called. ``wait()`` joins it (tests; the real path never
    needs to)."""

    def __init__(self, steps):
        self.steps = tuple(steps)
        self.failed: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self._run, name="esim-agent-preload", daemon=True)

    def start(self) -> "Preload":
        self._before = sys.getswitchinterval()
        sys.setswitchinterval(min(self._before, SWITCH_INTERVAL))
        self._thread.start()
        return self

    def _run(self) -> None:
        import importlib
        try:
            for step in self.steps:
                try:
                    if callable(step):
                        step()
                    else:
                        module, _, func = step.partition(":")
                        m = importlib.import_module(module)
                        if func:
                            getattr(m, func)()
                except Exception as e:       # the operation's own import (or call) reports it
                    self.failed.append((getattr(step, "__qualname__", step), f"{type(e).__name__}: {e}"))
        finally:
            sys.setswitchinterval(self._before)

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def start(steps) -> Preload | None:
    """Run ``steps`` (module names, ``module:function``, callables) in the background, in order:
    what the operation needs first, first. Modules already imported are skipped; with nothing
    left (a long-running daemon has it all), no thread is started and None is returned."""
    left = [s for s in steps if callable(s) or ":" in s or s not in sys.modules]
    return Preload(left).start() if left else None
