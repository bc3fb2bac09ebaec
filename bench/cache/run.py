"""Cache bench: hit ratio of the tuned cache vs plain LRU vs Belady's optimum, at equal memory.

    .venv/bin/python bench/cache/run.py                      # the synthetic traces
    .venv/bin/python bench/cache/run.py --trace keys.txt     # plus a recorded trace
    .venv/bin/python bench/cache/run.py --write-trace out.txt --which mixed   # export one

No model is needed: the traces are sequences of keys. Memory for every cache is the bytes of
``--memory-fraction`` (default 5 %) of the trace's distinct keys, an entry being a 16-byte key, a
384-d fp16 vector with its 1-byte header (769 bytes) and the local tier's per-entry overhead
estimate (160 bytes): LRU and Belady get that many entries; the tuned ``LocalCache`` gets those
bytes and pays its admission filters out of them. The tuned cache starts with the configured
admission (tinylfu) and is re-tuned 10 times over the trace from its own SHARDS sample, as in
production. "static top-C" caches, with hindsight, the C most referenced keys of the whole
trace: about the best a frequency-based online policy can hope for on a stationary trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from polyray.cache import sim
from polyray.cache.sim import VALUE_BYTES
from polyray.cache.tuner import policy_label

NUM_ITEMS = 100_000  # the Zipf catalogue


def synthetic(num_refs: int) -> dict[str, tuple[str, Callable[[], sim.Trace]]]:
    """name -> (description, generator). All at 500 requests/s (Poisson), seeded."""
    n, items = num_refs, NUM_ITEMS
    return {
        "zipf-0.9": (
            f"{n} refs, Zipf α=0.9 over {items} items, independent",
            lambda: sim.zipf_trace(n, items, 0.9, seed=1),
        ),
        "one-hit": (
            f"Zipf α=0.9 over {items} items, 30 % of refs to keys used once",
            lambda: sim.one_hit_trace(n, items, 0.9, 0.3, seed=2),
        ),
        "bursts": (
            f"Zipf α=0.9 over {items} items + 30 % of refs in bursts of new items "
            "(1+Poisson(5) refs each, gaps from 2 s growing 1.6x)",
            lambda: sim.burst_trace(n, items, 0.9, 0.3, seed=3),
        ),
        "mixed": (
            "Zipf α=0.9 + 25 % bursts + 25 % one-hit wonders",
            lambda: sim.burst_trace(n, items, 0.9, 0.25, one_hit_fraction=0.25, seed=4),
        ),
    }


def evaluate(name: str, description: str, trace: sim.Trace, memory_fraction: float) -> dict[str, object]:
    started = time.perf_counter()
    cmp = sim.compare_at_equal_memory(trace, memory_fraction, value_bytes=VALUE_BYTES)
    tuned = cmp.tuned
    last = tuned.decisions[-1] if tuned.decisions else None
    return {
        "trace": name,
        "description": description,
        "num_refs": cmp.num_refs,
        "num_distinct": cmp.num_distinct,
        "memory_entries": cmp.memory_entries,
        "memory_bytes": cmp.memory_bytes,
        "lru": cmp.lru,
        "tuned": tuned.hit_ratio,
        "belady": cmp.belady,
        "static_top_c": cmp.static_top_c,
        "tuned_over_belady": tuned.hit_ratio / cmp.belady if cmp.belady else 0.0,
        "tuned_over_lru": tuned.hit_ratio / cmp.lru if cmp.lru else 0.0,
        "filter_bytes": tuned.filter_bytes,
        "decisions": [policy_label((d.admission, d.window_fraction)) for d in tuned.decisions],
        "last_decision": None
        if last is None
        else {
            "capacity_bytes": last.capacity_bytes,
            "admission": last.admission,
            "window_fraction": last.window_fraction,
            "ttl_s": last.ttl_s,
            "expected_hit_ratio": round(last.expected_hit_ratio, 4),
            "expected_saving_per_s": last.expected_saving_per_s,
            "sample_rate": round(last.sample_rate, 4),
            "reason": last.reason,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def print_row(r: dict[str, object]) -> None:
    d = r["last_decision"]
    print(f"\n== {r['trace']}: {r['description']}")
    print(
        f"   refs {r['num_refs']}, distinct keys {r['num_distinct']}, memory {r['memory_entries']} entries "
        f"= {r['memory_bytes']} bytes ({r['filter_bytes']} of them the tuned cache's filters)"
    )
    print(
        f"   hit ratio  LRU {r['lru']:.4f}   tuned {r['tuned']:.4f}   Belady {r['belady']:.4f}   "
        f"(static top-C, hindsight {r['static_top_c']:.4f})"
    )
    print(f"   tuned/Belady {r['tuned_over_belady']:.3f}   tuned/LRU {r['tuned_over_lru']:.3f}   ({r['seconds']} s)")
    decisions = r["decisions"]
    assert isinstance(decisions, list)
    print(f"   admissions chosen over the run: {' '.join(str(a) for a in decisions)}")
    if isinstance(d, dict):
        print(
            f"   last decision: {policy_label((str(d['admission']), float(d['window_fraction'])))}, "
            f"{d['capacity_bytes']} bytes, ttl {d['ttl_s']}, "
            f"expected hit ratio {d['expected_hit_ratio']}, saving {d['expected_saving_per_s']:.3g}/s, "
            f"sample rate {d['sample_rate']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", action="append", default=[], help="recorded trace: 'key' or 't_s key' per line")
    parser.add_argument("--refs", type=int, default=200_000, help="references per synthetic trace")
    parser.add_argument("--memory-fraction", type=float, default=0.05, help="of the distinct keys")
    parser.add_argument("--only", action="append", default=[], help="run only these synthetic traces")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--write-trace", type=Path, help="write one synthetic trace (--which) as a trace file and exit")
    parser.add_argument("--which", default="mixed")
    args = parser.parse_args(argv)

    traces = synthetic(args.refs)
    if args.write_trace:
        sim.write_trace(args.write_trace, traces[args.which][1]())
        print(f"wrote {args.which} ({args.refs} refs) to {args.write_trace}")
        return 0
    results = []
    if not args.no_synthetic:
        for name, (description, make) in traces.items():
            if args.only and name not in args.only:
                continue
            results.append(evaluate(name, description, make(), args.memory_fraction))
            print_row(results[-1])
            sys.stdout.flush()
    for path in args.trace:
        results.append(evaluate(Path(path).name, f"recorded trace {path}", sim.read_trace(path), args.memory_fraction))
        print_row(results[-1])
    print("\n| trace | distinct | memory (entries) | LRU | tuned | Belady | tuned/Belady | tuned/LRU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['trace']} | {r['num_distinct']} | {r['memory_entries']} | {r['lru']:.3f} | {r['tuned']:.3f} | "
            f"{r['belady']:.3f} | {r['tuned_over_belady']:.3f} | {r['tuned_over_lru']:.3f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
