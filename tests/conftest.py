"""Shared test setup: never reach a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Never write the default SQLite ledger or usage spool to ~/.local/share/polyray: every test run
# (and every `polyray` subprocess, which inherits the environment) gets a private data directory.
# Tests that care about the database pass their own POLYRAY_HOME or --database-url.
import atexit
import shutil
import tempfile

if "POLYRAY_HOME" not in os.environ:
    _polyray_home = tempfile.mkdtemp(prefix="polyray-test-home-")
    os.environ["POLYRAY_HOME"] = _polyray_home
    atexit.register(shutil.rmtree, _polyray_home, ignore_errors=True)

# Property tests draw the same examples on every run (a seed derived from each test), so CI on a
# fresh clone runs exactly what passed here; HYPOTHESIS_PROFILE=explore draws new ones each run.
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
