"""``polyray bench``: HTTP throughput and latency of a served model against sentence-transformers
in process. The measurement lives in ``polyray.benchmarks``; the CLI is the one production
module allowed to launch it, and imports it only when the command runs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polyray.cli.common import Subcommands


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


def register(sub: Subcommands) -> None:
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
