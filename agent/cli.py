"""esim-agent command line: the field technician's tool.

Output: readable tables, or with ``--json`` exactly one JSON document on
stdout: ``{"ok": true, "data": {...}}`` or ``{"ok": false, "error": {"code", "message"}}``.
Exit codes: 0 done, 1 the card or a server refused, 2 bad usage or input,
3 modem/transport failure or time-out.

Imports are lazy on purpose: ``chip info`` against ``--sim`` must start in
well under 0.3 s, so nothing heavy (serial, requests, cryptography) is
imported unless the command needs it.

This module is the core every command runs: output, settings, running an operation
(directly or through the daemon), the parser's frame and ``main``. Each command group's
parsers and handlers live in a module of their own (``agent/commands/``; ``sim``, ``bench``
and ``demo`` elsewhere), imported only when that group's parsers are built: the package
is installed editable and run without bytecode files, so every module a command imports is
compiled on every run (issue #8).
"""
from __future__ import annotations

import argparse
import sys

from .errors import AgentError, UsageError

TYPE_CHECKING = False       # typing itself is not imported at run time (a few ms at every start)
if TYPE_CHECKING:
    from typing import Any, Callable

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, with the terminal's width found without importing shutil
    (with bz2 and lzma, a few ms at every start; the width is the one shutil would give)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    import os
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting,
    so ``--json`` callers still get one JSON document."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _SubParsers)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


#: While build_parser(group, leaf) runs: (the group's prog, the one action to build under it).
_ONLY_LEAF: tuple[str, str] | None = None


class _SubParsers(argparse._SubParsersAction):
    """Sub-commands; under ``_ONLY_LEAF``'s group, only its action is built (the others get a
    stand-in that takes the same calls and builds nothing)."""

    def add_parser(self, name, **kwargs):
        if _ONLY_LEAF is not None and self._prog_prefix == _ONLY_LEAF[0] and name != _ONLY_LEAF[1]:
            return _NotBuilt()
        return super().add_parser(name, **kwargs)


class _NotBuilt:
    """A sub-command parser left out of this run's tree: every builder call is a no-op."""

    required = False

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __setattr__(self, name, value) -> None:
        pass


# --------------------------------------------------------------------------- output

class Output:
    def __init__(self, as_json: bool):
        self.json = as_json

    def ok(self, data: dict, text: str | Callable[[], str] | None = None) -> None:
        if self.json:
            import json     # at the end of a command (a preload step imports it while the modem answers)
            print(json.dumps({"ok": True, "data": data}, indent=None, default=_json_default))
        elif text is not None:
            print(text() if callable(text) else text)

    def error(self, err: AgentError) -> None:
        if self.json:
            import json
            print(json.dumps({"ok": False, "error": err.to_json()}, default=_json_default))
        else:
            print(f"error: {err.message}", file=sys.stderr)

    def info(self, msg: str) -> None:
        """Progress for people; never on stdout with --json."""
        if not self.json:
            print(msg, file=sys.stderr)


def _json_default(o: Any):
    if isinstance(o, bytes):
        return o.hex().upper()
    if hasattr(o, "to_json"):
        return o.to_json()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------- settings

def _pick(cli_value, cfg_value):
    return cli_value if cli_value is not None else cfg_value


def card_settings(args):
    """How to reach the card: command line over config file, validated once (bad values
    are usage errors, exit 2)."""
    from .ops.card import CardSettings
    cfg = args.config
    s = CardSettings(
        device=None if args.sim else (args.device or cfg.device), sim=args.sim,
        transport=args.transport or cfg.transport,
        timeout=_pick(args.timeout, cfg.timeout), long_timeout=_pick(args.long_timeout, cfg.long_timeout),
        segment_size=_pick(args.segment_size, cfg.segment_size), baud=_pick(args.baud, cfg.baud),
        aids=list(args.aid or cfg.aids or []), quirks=dict(cfg.quirks or {}),
        trace=_tracer() if args.trace else None)
    if args.sim and args.device:
        s.device = args.device      # validate() names the conflict
    return s.validate()


def context(args, out: "Output", token):
    """The operations' context for a direct (no daemon) run of this command."""
    from . import config
    from .ops import Context, ServerSettings
    cfg = args.config
    ca = getattr(args, "ca", None)
    servers = ServerSettings(ca=ca, config_ca=cfg.ca_bundle, insecure_http=getattr(args, "insecure_http", False),
                             http_timeout=http_timeout(args))
    progress = _progress_printer(out)
    return Context(servers=servers, state_dir=config.state_dir_text(cfg),
                   notifications=cfg.process_notifications and not getattr(args, "no_notifications", False),
                   refresh=cfg.refresh, rollback_after=float(cfg.rollback_after), cancel=token,
                   default_smdp=cfg.default_smdp, auto_enable=bool(cfg.auto_enable),
                   eim=cfg.eim_settings(**_eim_options(args)),
                   warn=_warner(out, progress), progress=progress)


def http_timeout(args) -> float:
    """One deadline per ES9+ function call: --http-timeout over the config's http_timeout."""
    from .ops import check_http_timeout
    v = getattr(args, "http_timeout", None)
    if v is not None:
        return check_http_timeout(v)
    return float(args.config.http_timeout)


def _tracer():
    def trace(direction: str, data) -> None:
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).hex().upper()
        print(f"[trace] {direction} {data}", file=sys.stderr)
    return trace


# --------------------------------------------------------------------------- running an operation

#: Commands that never go through the daemon (they do not touch the modem, or are the daemon).
def _through_daemon(args) -> bool:
    if getattr(args, "direct", False) or args.sim:
        return False
    known = getattr(args, "_daemon_answers", None)
    if known is None:
        import os
        from .config import DEFAULT_SOCKET
        if not os.path.exists(getattr(args.config, "socket", None) or DEFAULT_SOCKET):
            known = False               # no socket file, no daemon (and no socket module to import)
        else:
            from .daemon.client import daemon_answers
            known = daemon_answers(args.config)
            if known:
                from . import quick
                quick.remember(args.config)     # the next `chip info` may take the quick path
        args._daemon_answers = known
    return known


def execute(args, out: "Output", op: str, params: dict, *, prepare=None) -> dict:
    """Run operation ``op`` with ``params``: through the daemon's socket when one answers
    (it owns the modem), else directly on the card. Same data either way."""
    token = args.cancel
    if _through_daemon(args):
        from .daemon.client import DaemonClient
        return DaemonClient.for_config(args.config).run(
            op, params, cancel=token, device=args.device, info=out.info,
            direct_fallback=lambda: _direct(args, out, op, params, prepare))
    return _direct(args, out, op, params, prepare)


def _configure_logging(args) -> None:
    """Log records on stderr, at WARNING (-v INFO, -vv DEBUG). logging itself is imported only
    with -v or when a record at WARNING or above is emitted (agent/logs.py, issue #8); a command
    answered by the daemon's socket never configures it."""
    if getattr(args, "_logging_done", False):
        return
    args._logging_done = True
    from . import logs
    logs.configure(args.verbose)


def _direct(args, out, op, params, prepare) -> dict:
    _configure_logging(args)
    from . import ops
    from .ops.card import Card
    ctx = context(args, out, args.cancel)
    if prepare is not None:
        prepare(ctx)
    settings = card_settings(args)
    try:
        with Card(settings, cancel=args.cancel, read_only=op in ops.READ_ONLY,
                  preload=ops.preload_modules(op), session_preload=ops.session_preload(op)) as card:
            return ops.run(op, ctx, card, params)
    finally:
        _end_progress_line(ctx)     # an error message must not land on the progress line


def _end_progress_line(ctx) -> None:
    end = getattr(ctx.progress, "end_line", None)
    if end is not None:
        end()


def socket_command(func):
    """Marks a command that runs as a job of the daemon when one answers (execute()): the CLI
    then only sends the request and prints the answer, without logging's set-up. An attribute
    on the handler, so main() tells without importing every command group."""
    func.socket_command = True
    return func


def own_signals(func):
    """Marks a command that handles SIGINT/SIGTERM/SIGHUP itself (the daemon): main() leaves
    them alone."""
    func.own_signals = True
    return func


# --------------------------------------------------------------------------- shared by the command groups

def _server_params(args) -> dict:
    """Per-command server trust, passed to the daemon as plain values (absolute paths)."""
    import os
    p = {}
    if getattr(args, "ca", None):
        p["ca"] = os.path.abspath(args.ca)
    if getattr(args, "insecure_http", False):
        p["insecure_http"] = True
    if getattr(args, "http_timeout", None) is not None:
        from .ops import check_http_timeout
        p["http_timeout"] = check_http_timeout(args.http_timeout)
    if getattr(args, "no_notifications", False):
        p["no_notifications"] = True
    return p


def _server_args(p) -> None:
    p.add_argument("--ca", metavar="FILE", help="trusted CI certificate(s) for the servers' TLS (PEM or DER)")
    p.add_argument("--insecure-http", action="store_true", help="plain HTTP, for test servers only")
    p.add_argument("--http-timeout", type=float, metavar="S",
                   help="deadline for each call to a server, retries included (default: config http_timeout, 30)")


def _eim_options(args) -> dict:
    """--eim-url, --esipa-version, --binding: the [eim] settings of a direct run, checked like the
    config's keys (bad values are usage errors before the card is touched)."""
    given = {"url": getattr(args, "eim_url", None), "esipa_version": getattr(args, "esipa_version", None),
             "binding": getattr(args, "binding", None)}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:           # most commands have none of these options: no rules to import
        return {}
    from .config_check import check_eim_value
    return {k: check_eim_value(k, v, f"--{k.replace('_', '-')}" if k != "url" else "--eim-url")
            for k, v in given.items()}


# --------------------------------------------------------------------------- progress (a direct run's context)

class _Progress:
    """Download progress on stderr, as ``progress(step, done, total)``.

    On a terminal: one line rewritten in place, ended (``end_line``) before anything else is
    printed — the consent prompt, a warning. Elsewhere (systemd's journal, a pipe, a log file):
    a line per step, and while the profile loads one line every ``every`` seconds, so the
    journal shows a long download is alive."""

    def __init__(self, stream, *, tty: bool, every: float = 5.0, clock=None):
        import time
        self.stream, self.tty, self.every = stream, tty, every
        self.clock = clock or time.monotonic
        self.open = False                 # a terminal line waits for its end
        self.last_step: str | None = None
        self.last_at = 0.0

    def __call__(self, step: str, done: int, total: int) -> None:
        if self.tty:
            extra = f" {done}/{total} bytes" if total else ""
            self.stream.write(f"\r\x1b[K{step}{extra}")
            self.open = True
            if step == "installed":
                self.end_line()
            self.stream.flush()
            return
        now = self.clock()
        if step == self.last_step and (now - self.last_at < self.every or not total):
            return
        self.last_step, self.last_at = step, now
        extra = f": {done}/{total} bytes ({done * 100 // total} %)" if total and step != "installed" else ""
        self.stream.write(f"{step}{extra}\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def _progress_printer(out: Output, *, stream=None, clock=None, every: float = 5.0) -> _Progress | None:
    """Progress for people; None with --json (stdout is for the one JSON document, and a
    script reading it does not want stderr chatter either)."""
    if out.json:
        return None
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return _Progress(stream, tty=tty, every=every, clock=clock)


def _warner(out: Output, progress: _Progress | None):
    def warn(message: str) -> None:
        if progress is not None:
            progress.end_line()
        out.info(f"warning: {message}")
    return warn


# --------------------------------------------------------------------------- parser

def _add_global_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Options valid anywhere on the line (`esim-agent profile list --json` works too).

    On sub-commands they default to SUPPRESS so they only override the top level's."""
    kw = {"default": argparse.SUPPRESS} if suppress else {}
    own = p._option_string_actions

    def add(group, *flags, **k):
        if any(f in own for f in flags):   # the sub-command has its own meaning for it (e.g. bench --baud)
            return
        group.add_argument(*flags, **{**k, **kw})
    g = p.add_argument_group("card access")
    add(g, "--device", metavar="PATH", help="the modem's AT port, e.g. /dev/ttyUSB2")
    add(g, "--sim", metavar="STATEFILE", help="use a simulated eUICC in-process (no modem)")
    add(g, "--transport", choices=["auto", "csim", "cgla"], help="how APDUs travel over AT (default auto)")
    add(g, "--aid", action="append", metavar="HEX", help="ISD-R AID to try (repeatable, in order)")
    add(g, "--timeout", type=float, metavar="S", help="deadline per AT command / APDU (default 10)")
    add(g, "--long-timeout", type=float, metavar="S", help="deadline for profile loading, enable, delete (default 300)")
    add(g, "--baud", type=int, help="serial line speed for UART ports (default 115200)")
    add(g, "--segment-size", type=int, metavar="N", help="STORE DATA block size, 1..255 (default 255)")
    add(g, "--config", metavar="FILE", dest="config_path", help="TOML config (default /etc/esim-agent/agent.toml)")
    add(g, "--direct", action="store_true",
        help="open the modem directly even if the esim-agent daemon is running (it owns the port)")
    o = p.add_argument_group("output")
    add(o, "--json", action="store_true", help="one JSON document on stdout")
    add(o, "-v", "--verbose", action="count", **({} if suppress else {"default": 0}))
    add(o, "--trace", action="store_true", help="print every AT line and APDU to stderr")


def _leaves(p: argparse.ArgumentParser):
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield p
    for a in subs:
        for child in dict.fromkeys(a.choices.values()):
            yield from _leaves(child)


def build_parser(only: str | None = None, leaf: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser: the whole tree, or with ``only`` the top level with just
    that command group under it, and with ``leaf`` just that action of the group (what a run
    needs: building every group's parsers, and importing the modules that define them, costs
    more than some commands take to run)."""
    global _ONLY_LEAF
    p = _Parser(prog="esim-agent", description="Device-side eSIM agent: the SGP.22 LPA over a modem's AT port, with a simulated test bed.")
    _add_global_options(p)

    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _ONLY_LEAF = (f"{p.prog} {only}", leaf) if only is not None and leaf is not None else None
    try:
        for name, add in _GROUPS.items():
            if only is None or name == only:
                add(sub)
    finally:
        _ONLY_LEAF = None
    for leaf in _leaves(p):
        if leaf is not p:
            _add_global_options(leaf, suppress=True)
    return p


# --------------------------------------------------------------------------- the command groups
# Each group's parsers and handlers live in their own module (agent/commands/, and sim, bench,
# demo elsewhere), imported only when its parsers are built: a run of `chip info` compiles the
# core and agent/commands/chip.py, not every group's handlers (issue #8).

def _add_chip_parsers(sub) -> None:
    from .commands import chip
    chip.add_parsers(sub)


def _add_profile_parsers(sub) -> None:
    from .commands import profile
    profile.add_parsers(sub)


def _add_notification_parsers(sub) -> None:
    from .commands import notification
    notification.add_parsers(sub)


def _add_status_parser(sub) -> None:
    from .commands import service
    service.add_status_parser(sub)


def _add_sync_parser(sub) -> None:
    from .commands import service
    service.add_sync_parser(sub)


def _add_daemon_parser(sub) -> None:
    from .commands import service
    service.add_daemon_parser(sub)


def _add_ipa_parsers(sub) -> None:
    from .commands import ipa
    ipa.add_parsers(sub)


def _add_sim_parsers(sub) -> None:
    from .sim import cli as sim_cli
    sim_cli.add_parsers(sub)


def _add_bench_parsers(sub) -> None:
    from . import bench
    bench.add_parsers(sub)


def _add_demo_parser(sub) -> None:
    from . import demo
    demo.add_parser(sub)


#: The command groups, in the order --help lists them.
_GROUPS = {"chip": _add_chip_parsers, "profile": _add_profile_parsers, "notification": _add_notification_parsers,
           "status": _add_status_parser, "sync": _add_sync_parser, "daemon": _add_daemon_parser,
           "ipa": _add_ipa_parsers, "sim": _add_sim_parsers, "bench": _add_bench_parsers, "demo": _add_demo_parser}


#: Options of the top level that take a value (``--device PATH``); the others are flags.
_GLOBAL_VALUED = frozenset(("--device", "--sim", "--transport", "--aid", "--timeout", "--long-timeout", "--baud",
                            "--segment-size", "--config"))
_GLOBAL_FLAGS = frozenset(("--direct", "--json", "--verbose", "--trace"))


def _group_of(argv: list[str]) -> tuple[str, str | None] | None:
    """The command group a command line names, and its action, when that is certain: the first
    word after the top level's own options, and the word right after it (None when an option
    follows). None (build the whole tree) for help, abbreviated or unknown options, or
    anything else argparse might read differently."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help") or a == "--":
            return None
        if not a.startswith("-") or a == "-":
            if a not in _GROUPS or any(x in ("-h", "--help") for x in argv[i + 1:]):
                return None
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            return a, (nxt if nxt and not nxt.startswith("-") else None)
        flag, eq, _ = a.partition("=")
        if flag in _GLOBAL_VALUED:
            i += 1 if eq else 2
        elif flag in _GLOBAL_FLAGS and not eq:
            i += 1
        elif a.startswith("-v") and a[1:] == "v" * (len(a) - 1):
            i += 1
        else:
            return None
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argv parsed with only the named command group's parsers when that suffices; the whole
    tree otherwise, and for every error, so messages and usage lines are the whole tree's."""
    named = _group_of(argv)
    if named is not None:
        try:
            return build_parser(*named).parse_args(argv)
        except UsageError:
            pass
    return build_parser().parse_args(argv)


def _install_signals(token) -> dict:
    """SIGINT/SIGTERM/SIGHUP only cancel the token: the operation stops at its next step
    or while waiting on the modem, closes the channel, cancels an RSP session with the
    right reason. A second Ctrl-C stops at once."""
    import signal
    reasons = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "terminated"}

    def handler(signum, frame):
        if signum == signal.SIGINT and token.cancelled:
            raise KeyboardInterrupt
        token.cancel(reasons[signum])
    previous = {}
    try:
        for sig in reasons:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:          # not the main thread (embedded use): leave signals alone
        for sig, h in previous.items():
            signal.signal(sig, h)
        previous = {}
    return previous


def _daemon_args(argv: list[str]):
    """`esim-agent daemon` parsed without building the whole CLI: the service's resident
    memory should not carry the parsers (and their imports) of every other command."""
    cmd, i = None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            i += 2
            continue
        if not a.startswith("-"):
            cmd = a
            break
        i += 1
    if cmd != "daemon":
        return None
    p = _Parser(prog="esim-agent daemon", description="run the gateway service in the foreground")
    p.add_argument("cmd", choices=["daemon"])
    p.add_argument("--config", metavar="FILE", dest="config_path")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from .commands.service import cmd_daemon
    args.func = cmd_daemon
    return args


def main(argv: list[str] | None = None) -> int:
    import signal

    from .cancel import CancelToken
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    out = Output(as_json)
    token = CancelToken()
    previous = {}
    verbose = 0
    try:
        args = _daemon_args(argv) or parse_args(argv)
        out = Output(args.json)
        verbose = args.verbose
        from . import config
        args.config = config.load(args.config_path)
        if not (getattr(args.func, "socket_command", False) and _through_daemon(args)):
            _configure_logging(args)        # a job the daemon runs logs there, not here
        args.cancel = token
        if not getattr(args.func, "own_signals", False):     # the daemon handles its own signals
            previous = _install_signals(token)
        rc = args.func(args, out)
        return rc or 0
    except AgentError as e:
        out.error(e)
        return e.exit_code
    except KeyboardInterrupt:
        out.error(AgentError("interrupted; the logical channel was closed", code="interrupted"))
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): stop writing, and keep Python quiet at exit.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: still one JSON document and a clear message
        if verbose:
            import traceback
            traceback.print_exc()
        out.error(AgentError(f"internal error: {type(e).__name__}: {e} (a bug in esim-agent; run with -v for "
                             "the traceback and report it)", code="internal_error"))
        return 1
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    from .entry import run
    run()
