"""Import what a command will need while it waits for the modem (issue #8).

A CLI command spends its first ~0.1 s talking to the modem (the AT session start, the
transport probe, opening the ISD-R channel), and a download seconds more while its package
goes over the line: round trips where the process mostly waits on the serial port. Python
spends about as long importing (without kept bytecode: compiling) the code the operation runs
next — the ES10 client and the ASN.1 tables, for a download the ES9+ client and TLS, then the
outbox. Done one after the other, the two add up; here the AT port runs one pending import
each time it would otherwise block waiting for the modem (``AtPort.when_idle``), so they are
over, or nearly, when the operation reaches them.

In the waiting thread itself, not a second one: a thread's imports would hold the GIL through
each module's compile (up to ~10 ms), so the modem's answer waited just as long, and the
thread's own malloc arena added ~1 MB to the process for good.

Nothing here changes what runs, only when: a step imports a module the operation imports itself,
or does (idempotently, with no I/O but local files) set-up the operation does next; one that fails
is ignored (the operation's own import or call raises the same error where it belongs).
"""
from __future__ import annotations

import sys
from collections import deque


class Steps:
    """Pending steps, soonest needed first: a module name is imported, ``module:function``
    imported then called (e.g. loading the ASN.1 tables), a callable called (set-up the
    operation does next anyway, e.g. its ES9+ client's TLS context). ``__call__`` runs one and
    says whether any is left (the AT port's idle hook)."""

    def __init__(self, steps=()):
        self.pending: deque = deque()
        self.failed: list[tuple[str, str]] = []
        self.add(steps)

    def add(self, steps) -> None:
        """Queue more steps after those pending (a module already imported is skipped)."""
        self.pending.extend(s for s in steps if callable(s) or ":" in s or s not in sys.modules)

    def __bool__(self) -> bool:
        return bool(self.pending)

    def __call__(self) -> bool:
        if self.pending:
            step = self.pending.popleft()
            try:
                if callable(step):
                    step()
                else:
                    import importlib
                    module, _, func = step.partition(":")
                    m = importlib.import_module(module)
                    if func:
                        getattr(m, func)()
            except Exception as e:       # the operation's own import (or call) reports it
                self.failed.append((getattr(step, "__qualname__", step), f"{type(e).__name__}: {e}"))
        return bool(self.pending)

    def run_all(self) -> None:
        while self():
            pass
