"""The `esim-agent` console script and ``python -m agent``.

Not in cli.py: that module subclasses argparse's classes, so importing it imports argparse,
and a command the quick path answers (quick.py) must not pay for the full CLI (issue #8).
"""
from __future__ import annotations

import sys

from . import quick


def run() -> None:
    """The console script (and ``python -m agent``): the quick path (quick.py) when it can
    answer, else the full CLI's ``main()``; then leave at once.

    A one-shot command has closed the card, the port (its settings put back) and the outbox
    before ``main`` returns, and flushed what it printed; what the interpreter's normal exit
    still does then — tearing down ~250 modules and collecting the ASN.1 tables' objects —
    cost 20–25 ms of every command (issue #8), longer than some commands' own work. So after
    the atexit handlers (logging, temporary files) and a flush, the process ends with
    ``os._exit``. Not while another non-daemon thread runs (a server's or the daemon's): then
    the normal exit waits for it as always."""
    code = quick.main(sys.argv[1:])
    if code is None:
        from .cli import main
        code = main()
    threading = sys.modules.get("threading")     # not imported: no thread the exit would wait for
    if threading is not None and any(t is not threading.main_thread() and t.is_alive() and not t.daemon
                                     for t in threading.enumerate()):
        sys.exit(code)
    import atexit
    import os
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:      # the reader went away (| head): nothing left to tell it
        pass
    except Exception:            # anything odd: let the normal exit deal with it
        sys.exit(code)
    os._exit(code)
