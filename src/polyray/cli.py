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
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from polyray.config import ConfigError, Settings, load_settings
from polyray.errors import ModelLoadError, PolyrayError

if TYPE_CHECKING:
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
    import os

    # Before torch loads OpenMP: idle OpenMP threads yield the core instead of spinning. In a
    # server the event loop and the model share the cores; measured on 2 cores, spinning threads
    # slowed the HTTP work that overlaps compute, and an idle server's spinning cut another
    # process's throughput by 2-3x. Set OMP_WAIT_POLICY yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from polyray.api.app import create_app
    from polyray.config import LOOPBACK_HOSTS
    from polyray.engine.build import build_engine
    from polyray.observability.metrics import Metrics
    from polyray.tenancy.service import Tenancy

    settings = _load(args.config)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    if settings.tenancy.auth == "none" and host not in LOOPBACK_HOSTS:
        raise ConfigError(f"[tenancy] auth = 'none' is allowed only on loopback, not --host {host}")
    metrics = Metrics()
    tenancy = Tenancy.open(settings.tenancy, on_record=metrics.on_usage)
    if tenancy.bootstrap_keys is not None:
        _print_bootstrap(tenancy.bootstrap_keys, host, port)
    engine = build_engine(settings, observer=metrics, accounts=tenancy.accounts)  # a broken model fails here
    metrics.watch_cache(engine.cache_report)
    metrics.watch_tenancy(tenancy.health_report)
    app = create_app(engine, settings, metrics, tenancy=tenancy)
    log.info("serving %s on http://%s:%d", ", ".join(str(m.ref) for m in engine.models()), host, port)
    # uvicorn drains on SIGTERM/SIGINT, restores the previous handlers and re-raises the signal;
    # with these no-op handlers in place that re-raise is harmless and a drained shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=30)
    return 0


def _print_bootstrap(keys: BootstrapKeys, host: str, port: int) -> None:
    """Shown once, on the first start with an empty database: the keys are stored only hashed."""
    print(
        f"""
polyray: empty client database; created client {keys.client!r} and an admin key.
Keep them now: they are stored hashed and never shown again (new ones: polyray clients rotate-key).

  client key ({keys.client}): {keys.client_key}
  admin key:                {keys.admin_key}

  curl -s http://{host}:{port}/v1/embeddings -H "Authorization: Bearer {keys.client_key}" \\
       -H "Content-Type: application/json" -d '{{"model": "minilm", "input": "hello"}}'
""",
        file=sys.stderr,
        flush=True,
    )


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
