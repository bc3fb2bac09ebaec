"""``polyray serve | embed | bench | clients | usage | heads``: the command line.

``main`` also owns what every command shares: time options that take values starting with ``-``
(``--since -7d``), quiet HTTP-client logs (``polyray heads`` polls the server twice a second), and
a reader that stops early (``polyray heads show x | head -2``), which ends the command quietly as
it does for any Unix tool.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from polyray.config import ConfigError, Settings, load_settings
from polyray.errors import ModelLoadError, PolyrayError

if TYPE_CHECKING:
    from polyray.server import Ready
    from polyray.tenancy.service import BootstrapKeys

log = logging.getLogger("polyray")

# Options whose values may start with "-": relative times such as -7d (``tenancy.timewindow``).
# argparse reads "--since -7d" as two options, so ``join_dash_values`` rewrites it to "--since=-7d".
DASH_VALUE_OPTIONS = frozenset({"--since", "--until"})
# 128 + SIGPIPE: what a shell reports for a command whose reader went away (``yes | head -1``).
EXIT_BROKEN_PIPE = 141
# Loggers of the HTTP client under ``polyray heads``: one INFO line per request would break the
# progress bar onto new lines, so they log warnings and errors only.
_CHATTY_LOGGERS = ("httpx", "httpcore")


def _load(config: str | None) -> Settings:
    settings = load_settings(config)
    from polyray.backends.factory import check_model

    for model in settings.models:
        check_model(model)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """The composition lives in ``polyray.server``; here: what the person at the terminal sees."""
    from polyray.server import serve

    settings = _load(args.config)
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
        on_ready=lambda ready: _print_bootstrap(ready.bootstrap_keys, ready),
        on_not_started=_print_bootstrap,
    )


def _print_bootstrap(keys: BootstrapKeys | None, ready: Ready | None = None) -> None:
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


def cmd_embed(args: argparse.Namespace) -> int:
    from polyray.engine.build import build_engine
    from polyray.types import EmbedRequest

    # A one-shot command: fitting a batch budget (seconds of measurement) cannot pay for a
    # handful of texts, so every model runs on its configured budget.
    settings = _load(args.config)
    settings = dataclasses.replace(
        settings, models=tuple(dataclasses.replace(m, fit_batch_budget=False) for m in settings.models)
    )
    engine = build_engine(settings)

    async def run() -> dict[str, object]:
        await engine.start(warmup=False)
        try:
            result = await engine.embed(EmbedRequest(args.model, tuple(args.texts)))
        finally:
            await engine.stop()
        return {
            "model": str(result.model),
            "embeddings": result.vectors.tolist(),
            "usage": {"prompt_tokens": result.usage.num_tokens, "inference_ms": round(result.usage.inference_ms, 3)},
            "truncated_inputs": list(result.truncated),
        }

    sys.stdout.buffer.write(orjson.dumps(asyncio.run(run())) + b"\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from polyray.benchmarks.serve_bench import SHORT_SENTENCE, BenchOptions, run_bench

    report = run_bench(
        BenchOptions(
            num_sentences=args.sentences,
            concurrency=args.concurrency,
            threads=args.threads,
            rounds=args.rounds,
            config=args.config,
            json_out=args.json,
            single_requests=args.single_requests,
            single_text=args.single_text or SHORT_SENTENCE,
            include_torch=args.with_torch,
        )
    )
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyray", description="Serve a universal embedding model to many clients.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (embedded defaults: the packaged MiniLM on 127.0.0.1:8000)")
    serve.add_argument("--config", help="TOML config file (see polyray.config)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.set_defaults(func=cmd_serve)

    embed = sub.add_parser("embed", help="embed texts in process and print JSON")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--model", default="minilm")
    embed.add_argument("--config")
    embed.set_defaults(func=cmd_embed)

    bench = sub.add_parser("bench", help="HTTP throughput and latency against in-process sentence-transformers")
    bench.add_argument("--sentences", type=int, default=2000)
    bench.add_argument("--concurrency", type=int, default=32)
    bench.add_argument("--threads", type=int, default=None, help="threads for every side (default: all cores)")
    bench.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each side")
    bench.add_argument("--config", help="server config without [[models]] (the bench adds both builds)")
    bench.add_argument("--json", help="also write the figures to this JSON file")
    bench.add_argument("--single-requests", type=int, default=200, help="one-sentence requests per side")
    bench.add_argument("--single-text", help="the one short sentence (default: a 9-token sentence)")
    bench.add_argument("--with-torch", action="store_true", help="also serve and measure the packed torch backend")
    bench.set_defaults(func=cmd_bench)

    from polyray.cli_heads import add_heads_commands
    from polyray.cli_tenancy import add_tenancy_commands

    add_tenancy_commands(sub)
    add_heads_commands(sub)
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


if __name__ == "__main__":
    raise SystemExit(main())
