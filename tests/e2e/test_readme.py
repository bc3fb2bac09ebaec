"""The README runs as written: every command line and Python example in its code blocks.

A new user copies lines from README.md into a shell; when one of them fails, the README has
drifted from the code. This test reads README.md's fenced code blocks in order and runs them
the way a user would, against a real ``polyray serve`` subprocess (dummy backend, a temporary
``POLYRAY_HOME`` and cache directory, a free port):

* ``bash`` blocks: each command line (backslash continuations joined, comments dropped) runs in
  ``bash -o pipefail`` from the repository root. ``.venv/bin/`` becomes this interpreter's bin
  directory, ``http://127.0.0.1:8000`` the test server, ``pk-c...`` its client key; the
  environment carries ``POLYRAY_API_KEY`` and ``POLYRAY_URL`` as the README tells the user to.
  A line fails the test when it exits non-zero or prints a traceback.
* ``python`` blocks run as scripts with the same substitutions; ``toml`` blocks must load as a
  polyray config.
* ``.venv/bin/polyray serve --config polyray.toml`` restarts the test server with the ``toml``
  block above it (each model on the dummy backend), as the user restarts theirs;
  ``polyray embed`` gets a dummy-backend ``--config`` so it needs no weights.
* Lines that cannot run here are listed in ``SKIPPED`` with the reason. A line that installs,
  runs the tests or starts services and is *not* listed fails the test instead of running, and a
  listed line that is no longer in the README fails it too, so the list cannot go stale.

It also checks that the README's links point to files in this repository.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_support import free_port

from polyray.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT_S = 120
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
RUN_LANGUAGES = ("bash", "sh", "shell", "console")
KEY = re.compile(r"pk-c[0-9a-f]{8}_[A-Za-z0-9_-]{43}")

SERVICES = "the tests need Redis and PostgreSQL already running; this line starts them on a fresh machine"
SKIPPED: dict[str, str] = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e . && "
    ".venv/bin/polyray serve": "the install itself, then serve on port 8000 with the real model "
    "(the test serves the same code on a free port)",
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e '.[dev]' && "
    ".venv/bin/pytest": "installs and runs this test suite (.ci/run runs it)",
    ".venv/bin/pip install -q -e '.[openai]'": "an install; the tests run with the dev extras, which include openai",
    'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no': SERVICES,
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start": SERVICES,
    '.venv/bin/pytest -m "not integration and not model"': "runs this test suite",
    "HYPOTHESIS_PROFILE=explore .venv/bin/pytest tests/unit": "runs the unit tests",
    ".venv/bin/ruff check src tests && .venv/bin/ruff format --check src tests && .venv/bin/mypy": "the linters "
    "and the type checker: they check the code's form, not what the README promises",
}
# Never run one of these unless it is listed above: installs, test runs, services, a default serve.
MUST_BE_LISTED = re.compile(r"pip install|pytest|redis-server|pg_ctl|polyray serve\s*($|&|;)|^python3 -m venv")

SERVER_CONFIG = """
[tenancy]
flush_interval_s = 0.1
"""
DUMMY_MODEL = '[[models]]\nname = "minilm"\nversion = "1"\nbackend = "dummy"\n'


@dataclass(frozen=True)
class Block:
    language: str
    body: str
    line_no: int  # of the opening fence, 1-based


def code_blocks(text: str) -> list[Block]:
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if fence is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        blocks.append(Block(fence.group(1).lower(), "\n".join(lines[index + 1 : end]), index + 1))
        index = end + 1
    return blocks


def command_lines(body: str) -> list[str]:
    """Command lines of a shell block: continuations joined, blank and comment-only lines dropped."""
    commands: list[str] = []
    pending = ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line.strip()).strip() if pending else line.strip()
        pending = ""
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def without_comment(command: str) -> str:
    """The command with a trailing ``# ...`` comment removed (the README annotates lines)."""
    return re.sub(r"\s+#\s.*$", "", command)


# -- the test server -------------------------------------------------------------------------


class ReadmeServer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "serve.log"
        self.key = ""

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "POLYRAY_HOME": str(self.home / "data"),
            "POLYRAY_CACHE_DIR": str(self.home / "cache"),
            "POLYRAY_API_KEY": self.key,
            "POLYRAY_URL": self.url,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def create_default_client(self) -> None:
        """What the first start does on an empty database: client ``default``, ``interactive``."""
        made = subprocess.run(
            [
                str(BIN / "polyray"),
                "--log-level",
                "warning",
                "clients",
                "create",
                "default",
                "--priority",
                "interactive",
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert made.returncode == 0, made.stderr
        self.key = KEY.findall(made.stdout)[0]

    def start(self, models: str) -> None:
        config = self.home / "serve.toml"
        config.write_text(SERVER_CONFIG + "\n" + models, encoding="utf-8")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "polyray"), "serve", "--config", str(config), "--port", str(self.port)],
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=self.home,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"polyray serve exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            assert time.monotonic() < deadline, f"polyray serve was not ready in time: {self.log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ReadmeServer]:
    test_server = ReadmeServer(tmp_path)
    test_server.create_default_client()
    test_server.start(DUMMY_MODEL)
    try:
        yield test_server
    finally:
        test_server.stop()


def dummy_models(toml_text: str) -> str:
    """The ``[[models]]`` of a README config, each on the dummy backend (no weights needed)."""
    entries = tomllib.loads(toml_text).get("models", [])
    assert entries, "the config before `polyray serve --config` has no [[models]]"
    return "".join(
        f'[[models]]\nname = "{m["name"]}"\nversion = "{m["version"]}"\nbackend = "dummy"\n\n' for m in entries
    )


def substitute(text: str, server: ReadmeServer, dummy_config: Path) -> str:
    text = text.replace(".venv/bin/", f"{BIN}/")
    text = text.replace("http://127.0.0.1:8000", server.url)
    text = text.replace("pk-c...", server.key)
    if re.search(r"\bpolyray embed\b", text):
        text = without_comment(text) + f" --config {dummy_config}"
    return text


def run_shell(command: str, server: ReadmeServer) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        env=server.env,
        cwd=ROOT,
        timeout=COMMAND_TIMEOUT_S,
    )


def test_every_readme_example_runs(server: ReadmeServer, tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    dummy_config = tmp_path / "embed.toml"
    dummy_config.write_text(DUMMY_MODEL, encoding="utf-8")
    last_toml: str | None = None
    seen_skipped: set[str] = set()
    num_run = 0
    for block in code_blocks(text):
        where = f"README.md:{block.line_no} ({block.language} block)"
        if block.language == "toml":
            path = tmp_path / f"readme-{block.line_no}.toml"
            path.write_text(block.body, encoding="utf-8")
            load_settings(str(path))  # a ConfigError names the bad key
            last_toml = block.body
        elif block.language == "python":
            script = tmp_path / f"readme-{block.line_no}.py"
            script.write_text(substitute(block.body, server, dummy_config), encoding="utf-8")
            result = subprocess.run(
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                env=server.env,
                cwd=ROOT,
                timeout=COMMAND_TIMEOUT_S,
            )
            assert result.returncode == 0, f"{where} failed:\n{block.body}\n{result.stdout}\n{result.stderr}"
            num_run += 1
        elif block.language in RUN_LANGUAGES:
            for command in command_lines(block.body):
                if without_comment(command) in SKIPPED:
                    seen_skipped.add(without_comment(command))
                    continue
                assert not MUST_BE_LISTED.search(without_comment(command)) or "--config" in command, (
                    f"{where}: `{command}` installs, tests or serves: list it in SKIPPED with a reason"
                )
                assert not re.match(r"^(polyray|pip|python)\b", command), (
                    f"{where}: `{command}` needs an activated venv; write .venv/bin/{command.split()[0]}"
                )
                if re.search(r"\bpolyray serve --config\b", command):
                    assert last_toml is not None, f"{where}: `{command}` comes before any toml block"
                    server.stop()
                    server.start(dummy_models(last_toml))
                    num_run += 1
                    continue
                result = run_shell(substitute(command, server, dummy_config), server)
                assert result.returncode == 0 and "Traceback" not in result.stderr, (
                    f"{where}: `{command}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
                )
                num_run += 1
    stale = set(SKIPPED) - seen_skipped
    assert not stale, f"SKIPPED lists lines that are no longer in README.md: {sorted(stale)}"
    assert num_run >= 20, num_run  # the README's examples were found and run, not silently passed over


def test_readme_links_stay_in_the_repository() -> None:
    for document in (README, *sorted((ROOT / "docs").glob("*.md"))):
        text = document.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            resolved = (document.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{document.name} links outside the repository: {target}"
            assert resolved.exists(), f"{document.name} links to a missing file: {target}"
        assert "DESIGN.md" not in text and "DEVELOPERS.md" not in text, f"{document.name} names a file not in the repo"


def test_the_readme_starts_with_the_two_set_up_commands_and_ci_runs_the_second() -> None:
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    first, second = (command_lines(b.body) for b in blocks[:2])
    assert len(first) == 1 and first[0].endswith(".venv/bin/polyray serve")
    assert len(second) == 1 and second[0].endswith(".venv/bin/pytest")
    assert second[0] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("a \\\n   b\n# note\n\nc  # trailing\n", ["a b", "c  # trailing"]),
        ("curl x \\\n  -H y \\\n  -d z", ["curl x -H y -d z"]),
    ],
)
def test_command_lines_join_continuations(body: str, expected: list[str]) -> None:
    assert command_lines(body) == expected
