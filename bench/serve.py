"""HTTP serving benchmark: sentence-transformers in process vs polyray ONNX fp32 and int8 over HTTP.

The same as ``polyray bench`` (same flags), for running from a checkout:

.venv/bin/python bench/serve.py --sentences 2000 --rounds 3 --json bench/results/serve.json
"""

from __future__ import annotations

import sys

from polyray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["--log-level", "warning", "bench", *sys.argv[1:]]))
