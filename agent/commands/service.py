"""The commands about the service: `esim-agent status`, `sync` and `daemon` (each a group of
its own in --help)."""
from __future__ import annotations

from ..cli import Output, _server_args, _server_params, card_settings, execute, own_signals


def add_status_parser(sub) -> None:
    c = sub.add_parser("status", help="daemon, modem, eUICC, profiles, jobs and outbox at a glance")
    c.set_defaults(func=cmd_status)


def add_sync_parser(sub) -> None:
    c = sub.add_parser("sync", help="ask the default SM-DP+ whether a profile waits for this eUICC; install it")
    _server_args(c)
    c.set_defaults(func=cmd_sync)


def add_daemon_parser(sub) -> None:
    c = sub.add_parser("daemon", help="run the gateway service in the foreground (systemd supervises it)")
    c.set_defaults(func=cmd_daemon)


def cmd_sync(args, out: Output) -> int:
    """Ask the default SM-DP+ whether a profile waits for this eUICC; install it if so."""
    data = execute(args, out, "sync", _server_params(args))
    outcome = data.get("outcome")
    text = {"nothing_waiting": f"nothing waiting at {data.get('smdp_address')}",
            "no_default_smdp": data.get("message", "no default SM-DP+")}.get(
        outcome, f"installed profile {data.get('profile', {}).get('iccid')}"
        + (" and enabled it" if outcome == "installed_and_enabled" else ""))
    out.ok(data, text)
    return 0


def cmd_status(args, out: Output) -> int:
    from ..daemon.status import local_status, render
    if not getattr(args, "direct", False) and not args.sim:
        from ..daemon.client import DaemonClient, daemon_answers
        if daemon_answers(args.config):
            data = DaemonClient.for_config(args.config).status()
            out.ok(data, lambda: render(data))
            return 0
    data = local_status(args, card_settings_fn=lambda: card_settings(args))
    out.ok(data, lambda: render(data))
    return 0


@own_signals
def cmd_daemon(args, out: Output) -> int:
    from ..daemon.main import run_daemon
    return run_daemon(args.config, verbose=args.verbose)
