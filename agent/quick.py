"""The CLI's quick path: `chip info` and `profile list` answered from a running daemon's view
of the card, before the command line's parser, the configuration's TOML or any command module
is imported.

Why: through the daemon's socket a command only sends a request and prints the answer, but
the full CLI first imports argparse, tomllib (the configuration), dataclasses and the command
modules: ~0.09 s of CPU on a 2-core gateway-class machine, three times the start of any
pyserial tool (issue #8: `chip info` through the daemon within 2 x `python -c "import
serial"`). This path imports json, the C socket module and the two small modules below.

It answers only when everything is certain, and otherwise returns None, leaving the command
to the full CLI exactly as if this path did not exist (nothing printed, nothing changed):
* the command line is one of ``VIEWS``' commands with no option but ``--json``, ``-v`` and
  ``--config`` (anything else — ``--device``, ``--direct``, ``--sim``, help, an abbreviation —
  goes to the full parser);
* the configuration file is the one the full CLI last validated: the socket its ``socket`` key
  names is remembered in the user's cache (``remember``, called when a full run found the
  daemon answering) with the file's identity (device, inode, size, mtime and ctime in ns), and
  used only while the file keeps that identity; with no configuration file, the default socket;
* the daemon answers ``GET /view/OP``, which it does only while the card has not been used
  since its card worker last read it and that read is recent (daemon/main.py, ``view_answer``).
The printed answer is the full CLI's, byte for byte: the same JSON document with ``--json``,
the same text from render.py otherwise.
"""
from __future__ import annotations

import os
import sys

#: Command words → the daemon's operation whose answer its view holds.
VIEWS = {("chip", "info"): "chip.info", ("profile", "list"): "profile.list"}

#: The defaults config.py and the daemon's client use too: here, in the module every command
#: imports first, so that reading them costs no dataclasses.
DEFAULT_CONFIG = "/etc/esim-agent/agent.toml"
DEFAULT_SOCKET = "/run/esim-agent/agent.sock"
SOCKET_TIMEOUT = 2.0
MAX_ANSWER = 1024 * 1024
_CACHE_FORMAT = 1


def main(argv: list[str]) -> int | None:
    """Print the daemon's answer and return 0, or return None (the full CLI runs the command)."""
    line = _command_line(argv)
    if line is None:
        return None
    op, config, as_json = line
    import json         # here, not at the top: every command passes through main()
    try:
        path = _socket_for(config)
        data = _view(path, op) if path is not None else None
        if data is None:
            return None
        if as_json:
            text = json.dumps({"ok": True, "data": data}, indent=None)
        else:
            from . import render
            text = render.chip_info_text(data) if op == "chip.info" else render.profile_rows(data["profiles"])
    except (OSError, ValueError, LookupError, TypeError, AttributeError, RecursionError):
        return None             # whatever went wrong (`[[[…` nested deep: RecursionError), the full CLI says it
    except KeyboardInterrupt:   # Ctrl-C before anything was printed: as the full CLI
        from .cli import EXIT_INTERRUPTED, Output
        from .errors import AgentError
        Output(as_json).error(AgentError("interrupted; the logical channel was closed", code="interrupted"))
        return EXIT_INTERRUPTED
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:     # the reader went away (| head): as the full CLI, exit 0 quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _command_line(argv: list[str]) -> tuple[str, str | None, bool] | None:
    """(operation, --config's value or None, --json) when ``argv`` is one of VIEWS' commands with
    only the options this path understands, before or after the command's two words (argparse
    refuses an option between them: `chip --json info` is a usage error); else None."""
    words: list[str] = []
    at: list[int] = []
    config, as_json, i = None, False, 0
    while i < len(argv):
        a = argv[i]
        if a == "--json":
            as_json = True
        elif a == "--verbose" or (len(a) > 1 and a[0] == "-" and a[1:] == "v" * (len(a) - 1)):
            pass                # a daemon's job logs in the daemon: -v changes nothing here
        elif a == "--config":
            if i + 1 >= len(argv) or not argv[i + 1]:
                return None
            config, i = argv[i + 1], i + 1
        elif a.startswith("--config="):
            config = a[len("--config="):]
            if not config:
                return None
        elif a.startswith("-"):
            return None
        else:
            words.append(a)
            at.append(i)
        i += 1
    op = VIEWS.get(tuple(words))
    return (op, config, as_json) if op and at[1] == at[0] + 1 else None


def _socket_for(config: str | None) -> str | None:
    """The daemon's socket as the full CLI would find it, or None when only the full CLI can
    tell (a file it has not validated in its present form, or a missing --config file)."""
    p = config or os.environ.get("ESIM_AGENT_CONFIG") or DEFAULT_CONFIG
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return None if config else DEFAULT_SOCKET       # config.load: a missing default is no file
    from . import usercache
    want = identity(st)
    name = _cache_name(p)
    for d in usercache.dirs():
        doc = _cached(os.path.join(d, name))
        if doc is None:
            continue
        if (isinstance(doc, dict) and doc.get("format") == _CACHE_FORMAT and doc.get("config") == os.path.abspath(p)
                and doc.get("id") == want and isinstance(doc.get("socket"), str) and doc["socket"]):
            return doc["socket"]
        return None
    return None


def _cached(f: str):
    """The JSON in cache file ``f``, or None when it is absent, not ours (usercache.trusted) or
    not JSON (cut short, damaged, nested too deep)."""
    import json
    from . import usercache
    if not usercache.trusted(f):
        return None
    try:
        with open(f, "rb") as fh:
            return json.loads(fh.read(65536))
    except (OSError, ValueError, RecursionError):
        return None



def remember(cfg) -> None:
    """Note the socket of the configuration file ``cfg`` was loaded from (config.load validated
    it; ``cfg.source_id`` is the identity of the bytes it parsed) for the quick path. Called
    when a full run found the daemon answering; a failure to write costs only speed."""
    if not getattr(cfg, "source", None) or not getattr(cfg, "source_id", None) or not cfg.socket:
        return
    import json
    from . import usercache
    doc = {"format": _CACHE_FORMAT, "config": os.path.abspath(cfg.source), "id": list(cfg.source_id),
           "socket": cfg.socket}
    name = _cache_name(cfg.source)
    for d in usercache.dirs():
        f = os.path.join(d, name)
        if _cached(f) == doc:
            return
        if usercache.store(f, json.dumps(doc).encode(), prefix=".config-"):     # absent, stale or damaged
            return


def identity(st) -> list[int]:
    """A file's identity from its stat: what changes when it is edited or replaced (and ctime
    cannot be set back by anyone)."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cache_name(config_path: str) -> str:
    from . import usercache
    h = usercache.sha256()
    h.update(os.path.abspath(config_path).encode("utf-8", "surrogateescape"))
    return f"config-socket-{h.hexdigest()[:32]}.json"


def _view(path: str, op: str) -> dict | None:
    """``GET /view/OP`` on the daemon's socket: the operation's answer, or None (no daemon, not
    in its view, or an answer that is not exactly what the daemon sends)."""
    import json
    import _socket          # the C module: socket.py's enums and selectors cost ~10 ms here
    if not os.path.exists(path):
        return None
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(SOCKET_TIMEOUT)
        s.connect(path)
        s.sendall(f"GET /view/{op} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode("ascii"))
        raw = bytearray()
        while chunk := s.recv(65536):
            raw += chunk
            if len(raw) > MAX_ANSWER:
                return None
    finally:
        s.close()
    head, sep, body = bytes(raw).partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 200 "):
        return None
    length = [v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
              if k.strip().lower() == b"content-length"]
    if len(length) != 1 or int(length[0]) != len(body):
        return None
    doc = json.loads(body)
    data = doc.get("data") if isinstance(doc, dict) and doc.get("ok") is True else None
    if not isinstance(data, dict) or data.get("op") != op or not isinstance(data.get("result"), dict):
        return None
    return data["result"]
