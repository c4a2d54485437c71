"""The CLI builds only the parsers a command line needs (speed: a fresh process per command),
and reads every command line exactly as the whole tree does."""
from __future__ import annotations

import pytest

from agent import cli
from agent.errors import UsageError

SAME = [
    ["chip", "info"],
    ["--json", "chip", "info"],
    ["chip", "info", "--json", "--device", "/dev/ttyUSB2"],
    ["--device=/dev/ttyUSB2", "-vv", "chip", "set-default-dp", "smdp.example.com"],
    ["--config", "x.toml", "--direct", "chip", "reset", "--yes"],
    ["profile", "list"],
    ["profile", "enable", "8944476500001224158", "--no-refresh", "--http-timeout", "5"],
    ["profile", "download", "LPA:1$smdp.example.com$MID", "--yes", "--ca", "ci.pem", "--json"],
    ["profile", "nickname", "8944476500001224158", "--clear"],
    ["notification", "process", "3", "4", "--now"],
    ["notification", "remove", "--all"],
    ["status"],
    ["sync", "--insecure-http"],
    ["ipa", "poll", "--eim-url", "https://eim.example.com", "--binding", "json"],
    ["sim", "modem", "--state", "card.json", "--link", "tty"],
    ["bench", "download", "--baud", "9600", "--runs", "2"],
    ["bench", "startup"],
    ["demo"],
]


def _args(ns) -> dict:
    return {k: v for k, v in vars(ns).items()}


@pytest.mark.parametrize("argv", SAME, ids=lambda a: " ".join(a))
def test_partial_tree_reads_a_command_line_as_the_whole_tree(argv):
    assert cli._group_of(argv) is not None
    assert _args(cli.parse_args(argv)) == _args(cli.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", [
    ["chip", "nope"], ["chip"], ["nope"], [], ["profile", "enable"], ["chip", "info", "--bogus"],
    ["profile", "download", "--yes", "--ca"], ["--timeout", "x", "chip", "info"],
])
def test_errors_are_the_whole_trees(argv):
    with pytest.raises(UsageError) as whole:
        cli.build_parser().parse_args(argv)
    with pytest.raises(UsageError) as partial:
        cli.parse_args(argv)
    assert partial.value.message == whole.value.message


def test_help_and_unclear_lines_build_the_whole_tree():
    # an abbreviated option is argparse's to resolve (--dev is --device): the whole tree reads it
    assert _args(cli.parse_args(["--dev", "x", "chip", "info"])) == \
        _args(cli.build_parser().parse_args(["--device", "x", "chip", "info"]))
    for argv in (["--help"], ["chip", "--help"], ["chip", "info", "-h"], ["--dev", "x", "chip", "info"],
                 ["--", "chip"], ["unknown"]):
        assert cli._group_of(argv) is None
    assert cli._group_of(["profile", "--json", "list"]) == ("profile", None)
    assert cli._group_of(["-v", "--json", "chip", "info"]) == ("chip", "info")


def test_a_partial_tree_holds_only_the_named_action():
    p = cli.build_parser("chip", "info")
    top = next(a for a in p._actions if a.dest == "cmd")
    assert list(top.choices) == ["chip"]
    chip = next(a for a in top.choices["chip"]._actions if a.dest == "sub")
    assert list(chip.choices) == ["info"]
    whole = cli.build_parser()
    assert list(next(a for a in whole._actions if a.dest == "cmd").choices) == list(cli._GROUPS)
