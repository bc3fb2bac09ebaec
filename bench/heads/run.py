"""Task heads: /v1/infer latency with 0, 1, 10 and 100 heads, and the marginal cost per head.

    .venv/bin/python bench/heads/run.py [--rounds 5] [--requests 60] [--texts 1] [--heads 100]
        [--json bench/results/heads.json]

See ``polyray.benchmarks.heads_bench`` for what is measured and how.
"""

from __future__ import annotations

from polyray.benchmarks.heads_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
