"""The CLI's command groups, one module each: its parsers (``add_parsers(sub)``) and its
``cmd_*`` handlers. agent/cli.py imports a group's module only when that group's parsers are
built, so a command compiles the CLI core and its own group, not every handler."""
