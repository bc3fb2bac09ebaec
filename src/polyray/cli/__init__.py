"""``polyray serve | embed | bench | clients | usage | heads``: the command line.

One module per command group, each with a ``register`` that adds its sub-parser:

    serve.py    run the HTTP API (the composition itself is ``polyray.server``)
    embed.py    embed texts in process
    bench.py    launch the HTTP benchmark (``polyray.benchmarks``)
    clients.py  clients, quotas, keys     } on the database directly (``database.py``),
    usage.py    usage reports             } no server needed
    heads.py    task heads, over the HTTP API with ``polyray.Client``

This module owns what every command shares: time options that take values starting with ``-``
(``--since -7d``), quiet HTTP-client logs (``polyray heads`` polls the server twice a second), a
reader that stops early (``polyray heads show x | head -2``), which ends the command quietly as
it does for any Unix tool, and one exit code per kind of failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from polyray.cli import bench, clients, embed, heads, serve, usage
from polyray.config import ConfigError
from polyray.errors import ModelLoadError, PolyrayError

# Options whose values may start with "-": relative times such as -7d (``polyray.timewindow``).
# argparse reads "--since -7d" as two options, so ``join_dash_values`` rewrites it to "--since=-7d".
DASH_VALUE_OPTIONS = frozenset({"--since", "--until"})
# 128 + SIGPIPE: what a shell reports for a command whose reader went away (``yes | head -1``).
EXIT_BROKEN_PIPE = 141
# Loggers of the HTTP client under ``polyray heads``: one INFO line per request would break the
# progress bar onto new lines, so they log warnings and errors only.
_CHATTY_LOGGERS = ("httpx", "httpcore")
# In the order ``polyray --help`` lists them.
_COMMAND_GROUPS = (serve, embed, bench, clients, usage, heads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyray", description="Serve a universal embedding model to many clients.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in _COMMAND_GROUPS:
        group.register(sub)
    return parser


def join_dash_values(argv: Sequence[str], options: frozenset[str] = DASH_VALUE_OPTIONS) -> list[str]:
    """``[..., "--since", "-7d", ...]`` -> ``[..., "--since=-7d", ...]`` for the options in ``options``.

    Only a following token that starts with "-" and a digit is joined (a relative time, never an
    option name), so ``--since --by client`` still reports the missing value as argparse does.
    Tokens after ``--`` are positional and left alone.
    """
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            out.extend(argv[index:])
            break
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if token in options and len(following) > 1 and following[0] == "-" and following[1].isdigit():
            out.append(f"{token}={following}")
            index += 2
            continue
        out.append(token)
        index += 1
    return out


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away: point stdout at /dev/null so the exit flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done; 1 a request failed (``polyray: <kind>: <message>``); 2 a bad command
    line, config or model (argparse's own code for a bad command line); 141 the reader left."""
    args = build_parser().parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # inside the try: a reader that left early fails here, not at exit
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (ConfigError, ModelLoadError) as exc:
        print(f"polyray: {exc}", file=sys.stderr)
        return 2
    except PolyrayError as exc:
        print(f"polyray: {exc.kind.value}: {exc.message}", file=sys.stderr)
        return 1
