"""``polyray serve``: run the HTTP API.

The composition lives in ``polyray.server`` (``build_server``); this module is what the person
at the terminal sees: a line while the models load, then the ready banner with the bootstrap
keys of a first start and a curl line that works when pasted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from polyray.cli.common import load_checked_settings

if TYPE_CHECKING:
    from polyray.cli.common import Subcommands
    from polyray.server import Ready
    from polyray.tenancy.service import BootstrapKeys


def cmd_serve(args: argparse.Namespace) -> int:
    from polyray.server import serve

    settings = load_checked_settings(args.config)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    models = ", ".join(f"{m.name}@{m.version}" for m in settings.models)
    fitting = any(m.fit_batch_budget and m.backend != "dummy" for m in settings.models)
    print(
        f"polyray: loading {models}"
        + (" and fitting its batch budget (first start ~30 s; later starts reuse the fit)" if fitting else "")
        + "... the server answers once 'polyray: ready' is printed.",
        file=sys.stderr,
        flush=True,
    )
    return serve(
        settings,
        host=host,
        port=port,
        log_level=args.log_level,
        on_ready=lambda ready: print_bootstrap(ready.bootstrap_keys, ready),
        on_not_started=print_bootstrap,
    )


def print_bootstrap(keys: BootstrapKeys | None, ready: Ready | None = None) -> None:
    """With ``ready``: printed once the port accepts connections and the models are loaded, so
    every line works when pasted. On the first start (an empty database) it shows the bootstrap
    keys, stored only hashed, and a curl line that reads the key from ``$POLYRAY_API_KEY`` (the
    variable the SDK and ``polyray heads`` read too). Without ``ready``: the server created keys
    but stopped before it was ready; they are shown anyway (the next start makes none).

    One unbuffered write: never interleaved with a log line, and safe in a signal handler.
    """
    import shutil
    from pathlib import Path

    # ``polyray`` when that is what PATH finds, else this executable's full path: after ``pip
    # install`` into a virtualenv that is not activated, ``polyray ...`` would fail when pasted.
    running = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    on_path = shutil.which("polyray")
    if on_path is not None and (running is None or Path(on_path).resolve() == running):
        command = "polyray"
    elif running is not None and running.suffix != ".py" and os.access(running, os.X_OK):
        command = str(running)
    else:
        command = f"{sys.executable} -m polyray.cli"  # run as ``python -m polyray.cli``
    lines = [f"polyray: ready on {ready.url}"] if ready is not None else ["", "polyray: the server did not start."]
    if keys is not None:
        lines += [
            "",
            f"polyray: empty client database; created client {keys.client!r} and an admin key.",
            "Keep them now: they are stored hashed and never shown again "
            f"(new ones: {command} clients rotate-key {keys.client}).",
            "",
            f"  client key ({keys.client}): {keys.client_key}",
            f"  admin key:                {keys.admin_key}   (for /v1/admin/*; it cannot embed)",
            "",
        ]
    if keys is not None and ready is not None:
        lines += [
            "Try it from another terminal (paste both lines):",
            "",
            f"  export POLYRAY_API_KEY={keys.client_key}",
            f'  curl -sS {ready.url}/v1/embeddings -H "Authorization: Bearer $POLYRAY_API_KEY" \\',
            f"""       -H "Content-Type: application/json" -d '{{"model": "{ready.model}", "input": "hello"}}'""",
            "",
        ]
    os.write(sys.stderr.fileno(), ("\n".join(lines) + "\n").encode())


def register(sub: Subcommands) -> None:
    serve = sub.add_parser("serve", help="run the HTTP API (embedded defaults: the packaged MiniLM on 127.0.0.1:8000)")
    serve.add_argument("--config", help="TOML config file (see polyray.config)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.set_defaults(func=cmd_serve)
