"""HTTP serving benchmark: polyray vs in-process sentence-transformers. Same as ``polyray bench``.

.venv/bin/python bench/serve.py --sentences 2000 --rounds 3 --json bench/results/serve.json
"""

from polyray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *__import__("sys").argv[1:]]))
