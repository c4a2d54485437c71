"""Loggers that import the stdlib ``logging`` only when a record can be emitted.

Why (issue #8): a CLI command such as ``esim-agent --sim card.json chip info`` takes ~125 ms,
and importing ``logging`` (with traceback, textwrap, string, weakref...) costs ~8 ms of it
(``python -c "import re, json, argparse, dataclasses, threading, signal, logging"`` is 1.13 x
the same line without logging). Yet on a run without ``-v`` every record below WARNING is
dropped, and a run without ``-v`` that goes well emits no record at all. So the agent's modules
log through ``log = get_logger(__name__)``, a proxy that decides per call whether the stdlib
``logging`` has to be involved, and ``configure(verbose)`` replaces the ``logging.basicConfig``
the CLI used to make.

The rule, for a call at level L (``debug`` 10, ``info`` 20, ``warning`` 30, ``error`` and
``exception`` 40, ``critical`` 50, ``log(L, ...)``):

1. ``"logging"`` is in ``sys.modules`` (someone imported it: pytest, the daemon,
   requests/urllib3, ``concurrent.futures``, a program embedding the agent, or ``configure``
   with verbose >= 1): apply the pending configuration if there is one (once), then forward
   the call to ``logging.getLogger(name)`` with the same arguments. Whatever anyone configured
   (levels, handlers, filters, ``logging.disable``, pytest's ``caplog``) then decides, exactly
   as with a plain ``logging.Logger``.
2. Otherwise, L >= WARNING (or L is not an int): import ``logging``, apply the pending
   configuration if there is one (once), forward as in 1. Without configuration the record
   reaches ``logging.lastResort`` (bare message on stderr), as it would with a plain logger.
3. Otherwise (``logging`` not imported and L < WARNING): drop the record; nothing is imported,
   the message is never %-formatted, its arguments' ``__str__`` never called.

Why 3 is exact and not an approximation: as long as nobody has imported ``logging``, nobody can
have configured it, so its state is either the state of a fresh import (root logger at WARNING,
no handler, ``lastResort`` at WARNING, no logger with its own level, no ``disable``) or that
state plus our pending ``configure(0)``, a ``basicConfig`` at WARNING. In both, every logger's
effective level is WARNING, and ``Logger.debug``/``info`` would return at their first check,
before any formatting, filter or handler. ``configure(v)`` with v >= 1 (a level below WARNING)
imports ``logging`` and configures at once, so from then on rule 1 applies. Likewise
``isEnabledFor(L)`` answers ``L >= WARNING`` while ``logging`` is not imported, and forwards
otherwise.

``configure(verbose, stream=None)`` is ``logging.basicConfig(level=WARNING - 10 * min(verbose,
2), stream=stream or sys.stderr, format="%(levelname)s %(name)s: %(message)s")``: applied at
once when verbose >= 1 or ``logging`` is already imported (no reason to wait), else recorded as
pending and applied before the first record forwarded by any proxy (rules 1 and 2), whoever
imported ``logging`` meanwhile, so that record carries our format. As with two ``basicConfig``
calls, the first configuration wins (a pending one is not replaced; a later one applies onto a
root logger that already has its handler, which ``basicConfig`` leaves alone). The stream is
taken when ``configure`` is called, as the ``basicConfig`` call was.

Forwarded calls keep their arguments (``exc_info``, ``stack_info``, ``extra``, %-args); the
proxy adds 1 to ``stacklevel`` (default 1) so ``%(funcName)s``/``%(lineno)d`` name the caller,
not this module. Anything else asked of a proxy (``setLevel``, ``handlers``...) imports
``logging`` and is answered by the real logger.

Threads: the pending configuration is cleared only after ``basicConfig`` returned, so no thread
forwards a record before it is in place; two threads may both call ``basicConfig``, and the
second call does nothing (it runs under logging's lock and finds the root handler).

What the deferral does change: a record emitted *directly* through the stdlib (say urllib3's,
after requests imported ``logging``) while ``configure(0)`` is still pending goes to
``lastResort`` (bare message) instead of our format; and a program that imports and configures
``logging`` itself after ``configure(0)`` but before our first record keeps its configuration
(ours then finds the root handler and does nothing), where before ours came first.
"""
from __future__ import annotations

import sys

CRITICAL = 50
ERROR = 40
WARNING = 30
INFO = 20
DEBUG = 10
NOTSET = 0

FORMAT = "%(levelname)s %(name)s: %(message)s"

_pending: dict | None = None      # basicConfig's arguments, until applied
_loggers: dict[str, LazyLogger] = {}


def _logging():
    """The stdlib logging module (imported now if it is not yet), with the pending
    configuration applied."""
    global _pending
    import logging
    p = _pending
    if p is not None:
        logging.basicConfig(**p)
        if _pending is p:         # cleared only now: no other thread forwards before it is in place
            _pending = None
    return logging


def configure(verbose: int, stream=None) -> None:
    """Records on ``stream`` (default stderr) at WARNING, INFO with verbose 1, DEBUG with 2 or
    more, formatted ``LEVEL name: message``. Imports logging only if it must (see above)."""
    global _pending
    if _pending is None:
        _pending = {"level": WARNING - 10 * min(verbose, 2), "stream": sys.stderr if stream is None else stream,
                    "format": FORMAT}
    if verbose >= 1 or "logging" in sys.modules:
        _logging()


def get_logger(name: str) -> LazyLogger:
    """The proxy for ``logging.getLogger(name)`` (one per name)."""
    lg = _loggers.get(name)
    if lg is None:
        lg = _loggers.setdefault(name, LazyLogger(name))
    return lg


def _stacklevel(kw: dict) -> dict:
    kw["stacklevel"] = kw.get("stacklevel", 1) + 1      # + this module's frame
    return kw


class LazyLogger:
    """Has a ``logging.Logger``'s logging methods; see the module docstring for when it calls one."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, msg, *args, **kw) -> None:
        if "logging" in sys.modules:
            _logging().getLogger(self.name).debug(msg, *args, **_stacklevel(kw))

    def info(self, msg, *args, **kw) -> None:
        if "logging" in sys.modules:
            _logging().getLogger(self.name).info(msg, *args, **_stacklevel(kw))

    def warning(self, msg, *args, **kw) -> None:
        _logging().getLogger(self.name).warning(msg, *args, **_stacklevel(kw))

    def error(self, msg, *args, **kw) -> None:
        _logging().getLogger(self.name).error(msg, *args, **_stacklevel(kw))

    def exception(self, msg, *args, **kw) -> None:
        """ERROR with ``exc_info=True`` (the exception being handled)."""
        _logging().getLogger(self.name).exception(msg, *args, **_stacklevel(kw))

    def critical(self, msg, *args, **kw) -> None:
        _logging().getLogger(self.name).critical(msg, *args, **_stacklevel(kw))

    def log(self, level: int, msg, *args, **kw) -> None:
        if "logging" in sys.modules or not isinstance(level, int) or level >= WARNING:
            _logging().getLogger(self.name).log(level, msg, *args, **_stacklevel(kw))

    def isEnabledFor(self, level: int) -> bool:    # noqa: N802 (logging's name)
        if "logging" not in sys.modules:
            return level >= WARNING
        return _logging().getLogger(self.name).isEnabledFor(level)

    def getEffectiveLevel(self) -> int:             # noqa: N802 (logging's name)
        if "logging" not in sys.modules:
            return WARNING
        return _logging().getLogger(self.name).getEffectiveLevel()

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(_logging().getLogger(self.name), attr)

    def __repr__(self) -> str:
        return f"<LazyLogger {self.name}>"
