"""The result cache end to end: ``polyray serve`` with the cache off vs on, same Zipf workload.

    .venv/bin/python bench/cache/serve.py [--requests 3000] [--distinct 1500] [--alpha 1.0]
        [--redis-url redis://127.0.0.1:6379/0] [--json bench/results/cache_serve.json]

See ``polyray.benchmarks.cache_bench`` for what is measured and how.
"""

from __future__ import annotations

import argparse

from polyray.benchmarks.cache_bench import CacheBenchOptions, run_cache_bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = CacheBenchOptions()
    parser.add_argument("--requests", type=int, default=defaults.num_requests)
    parser.add_argument("--distinct", type=int, default=defaults.num_distinct, help="corpus sentences drawn from")
    parser.add_argument("--alpha", type=float, default=defaults.zipf_alpha, help="Zipf exponent of the draw")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--redis-url", help="also run with this shared tier (cold, then a restarted server warm)")
    parser.add_argument("--memory-fraction", type=float, default=defaults.memory_fraction)
    parser.add_argument("--retune-interval-s", type=float, default=defaults.retune_interval_s)
    parser.add_argument("--trace-out", help="keep the live key trace (workload only) here")
    parser.add_argument("--json")
    args = parser.parse_args()
    report = run_cache_bench(
        CacheBenchOptions(
            num_requests=args.requests,
            num_distinct=args.distinct,
            zipf_alpha=args.alpha,
            concurrency=args.concurrency,
            threads=args.threads,
            redis_url=args.redis_url,
            memory_fraction=args.memory_fraction,
            retune_interval_s=args.retune_interval_s,
            trace_out=args.trace_out,
            json_out=args.json,
        )
    )
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
