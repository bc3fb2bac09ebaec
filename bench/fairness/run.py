"""Fairness benchmark: B's p99 latency alone vs while client A floods (see polyray.benchmarks.fairness_bench).

.venv/bin/python bench/fairness/run.py [--phase-s 40] [--json bench/results/fairness.json]
"""

from __future__ import annotations

import argparse

from polyray.benchmarks.fairness_bench import FairnessOptions, run_fairness_bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = FairnessOptions()
    parser.add_argument("--phase-s", type=float, default=defaults.phase_s)
    parser.add_argument("--b-texts", type=int, default=defaults.b_texts)
    parser.add_argument("--b-load", type=float, default=defaults.b_load_fraction, help="B's load / capacity")
    parser.add_argument("--flood-factor", type=float, default=defaults.flood_factor)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args()
    report = run_fairness_bench(
        FairnessOptions(
            b_texts=args.b_texts,
            b_load_fraction=args.b_load,
            phase_s=args.phase_s,
            flood_factor=args.flood_factor,
            threads=args.threads,
            json_out=args.json,
        )
    )
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
