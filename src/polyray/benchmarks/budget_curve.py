"""Print the batch-budget curve and the fitted decision for the packaged model's builds.

What the runner's ``BudgetFitter`` measures at start, run by hand:

    .venv/bin/python -m polyray.benchmarks.budget_curve --backend onnx --precision int8 --target-ms 500
"""

from __future__ import annotations

import argparse
import json
import logging

from polyray.backends.calibrate import DEFAULT_BUDGETS
from polyray.backends.factory import build_backend
from polyray.config import ModelConfig, default_threads, model_with_environment
from polyray.engine.budget_fit import BudgetFitter
from polyray.policies import BatchPolicy, FitPolicy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="onnx", choices=["onnx", "torch"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--target-ms", type=float, default=500.0, help="latency target of the fit")
    parser.add_argument("--time-per-budget-s", type=float, default=0.4)
    parser.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS))
    parser.add_argument("--json", help="also write the decision and the curve to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    version = "1-int8" if args.precision == "int8" else "1"
    config = model_with_environment(  # $POLYRAY_CACHE_DIR and friends, as polyray serve reads them
        ModelConfig(
            version=version, backend=args.backend, precision=args.precision, threads=args.threads or default_threads()
        )
    )
    backend = build_backend(config)
    fitter = BudgetFitter(
        FitPolicy(latency_target_ms=args.target_ms),
        budgets=[int(b) for b in args.budgets.split(",")],
        time_per_budget_s=args.time_per_budget_s,
        name=f"{config.name}@{config.version}",
    )
    decision = fitter.fit(backend, BatchPolicy())
    print(f"{config.name}@{config.version}: {backend.description}")
    print(decision.table())
    print(
        f"fitted cost: {1000 * decision.cost.overhead_s:.3f} ms per call + "
        f"{1e6 * decision.cost.s_per_token:.1f} us per token"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(decision.as_dict(), fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
