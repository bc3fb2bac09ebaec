"""HTTP serving benchmark: sentence-transformers in process vs polyray ONNX fp32 and int8 over HTTP.

Same as ``polyray bench``, plus the single-sentence latency options:

.venv/bin/python bench/serve.py --sentences 2000 --rounds 3 --json bench/results/serve.json
"""

from __future__ import annotations

import argparse
import logging

from polyray.benchmarks.serve_bench import SHORT_SENTENCE, BenchOptions, run_bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="threads for every side (default: all cores)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each side")
    parser.add_argument("--config", help="server config without [[models]] (the bench adds both builds)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--single-requests", type=int, default=200, help="one-sentence requests per side")
    parser.add_argument("--single-text", default=SHORT_SENTENCE)
    parser.add_argument("--with-torch", action="store_true", help="also serve and measure the packed torch backend")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = run_bench(
        BenchOptions(
            num_sentences=args.sentences,
            concurrency=args.concurrency,
            threads=args.threads,
            rounds=args.rounds,
            config=args.config,
            json_out=args.json,
            single_requests=args.single_requests,
            single_text=args.single_text,
            include_torch=args.with_torch,
        )
    )
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
