"""``polyray embed``: embed a few texts in this process and print the result as JSON."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import TYPE_CHECKING

import orjson

from polyray.cli.common import load_checked_settings

if TYPE_CHECKING:
    from polyray.cli.common import Subcommands


def cmd_embed(args: argparse.Namespace) -> int:
    from polyray.server import build_server
    from polyray.types import EmbedRequest

    # A one-shot command: fitting a batch budget (seconds of measurement) cannot pay for a
    # handful of texts, so every model runs on its configured budget.
    settings = load_checked_settings(args.config)
    settings = dataclasses.replace(
        settings, models=tuple(dataclasses.replace(m, fit_batch_budget=False) for m in settings.models)
    )
    # The engine alone: no client database (nothing to authenticate or charge), no heads, no app.
    server = build_server(settings, tenancy=False, warmup=False)

    async def run() -> dict[str, object]:
        async with server.running():
            result = await server.engine.embed(EmbedRequest(args.model, tuple(args.texts)))
        return {
            "model": str(result.model),
            "embeddings": result.vectors.tolist(),
            "usage": {"prompt_tokens": result.usage.num_tokens, "inference_ms": round(result.usage.inference_ms, 3)},
            "truncated_inputs": list(result.truncated),
        }

    sys.stdout.buffer.write(orjson.dumps(asyncio.run(run())) + b"\n")
    return 0


def register(sub: Subcommands) -> None:
    embed = sub.add_parser("embed", help="embed texts in process and print JSON")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--model", default="minilm")
    embed.add_argument("--config")
    embed.set_defaults(func=cmd_embed)
