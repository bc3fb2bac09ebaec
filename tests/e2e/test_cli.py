"""The ``polyray`` command line as a user runs it: real subprocesses, the dummy backend, loopback only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import free_port

DIM = 384
COMMAND_TIMEOUT_S = 60
READY_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 30
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

DUMMY_MODEL = """
[[models]]
name = "minilm"
version = "1"
backend = "dummy"
"""


def polyray(*args: str, log_level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "polyray.cli", "--log-level", log_level, *args]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(polyray(*args), capture_output=True, text=True, env=ENV, timeout=COMMAND_TIMEOUT_S)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "polyray.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("polyray: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- embed -----------------------------------------------------------------------------------


def test_embed_prints_one_vector_per_text(tmp_path: Path) -> None:
    config = write_config(tmp_path, DUMMY_MODEL)
    texts = ["hello world", "a second text", "third"]
    result = run_cli("embed", *texts, "--config", config)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["model"] == "minilm@1"
    assert len(payload["embeddings"]) == len(texts)
    assert all(len(vector) == DIM for vector in payload["embeddings"])
    assert payload["embeddings"][0] != payload["embeddings"][1]
    assert payload["truncated_inputs"] == []
    assert payload["usage"]["prompt_tokens"] == 2 + 2 + 3 + 2 + 1 + 2  # words plus [CLS] and [SEP] each

    # The output is a pure function of the input: the same texts give the same vectors.
    again = run_cli("embed", *texts, "--config", config, "--model", "minilm@1")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["embeddings"] == payload["embeddings"]


def test_embed_unknown_model_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path, DUMMY_MODEL)
    result = run_cli("embed", "hello", "--config", config, "--model", "minilm@9")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "not_found" in result.stderr and "minilm@9" in result.stderr


# -- configuration errors exit 2 with one line -----------------------------------------------


def test_serve_with_missing_model_path_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    config = write_config(tmp_path, f'[[models]]\nname = "minilm"\nversion = "1"\npath = "{missing}"\n')
    result = run_cli("serve", "--config", config, "--port", "1")
    assert_one_line_error(result, str(missing))


def test_serve_with_unknown_config_key_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[server]\nmax_itemz = 5\n" + DUMMY_MODEL)
    result = run_cli("serve", "--config", config, "--port", "1")
    assert_one_line_error(result, "max_itemz")


def test_serve_with_missing_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = run_cli("serve", "--config", str(missing), "--port", "1")
    assert_one_line_error(result, str(missing))


# -- serve -----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    # Keys are off for these tests (allowed on loopback only); tests/e2e/test_cli_tenancy.py covers them.
    tenancy = (
        f'[tenancy]\nauth = "none"\ndatabase_url = "sqlite:///{tmp_path}/polyray.db"\n'
        f'spool_path = "{tmp_path}/usage-spool.jsonl"\n'
    )
    config = write_config(tmp_path, tenancy + DUMMY_MODEL)
    port = free_port()
    proc = subprocess.Popen(
        # info: uvicorn then logs its lifespan steps, which show the shutdown was graceful.
        polyray("serve", "--config", config, "--host", "127.0.0.1", "--port", str(port), log_level="info"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=EXIT_TIMEOUT_S)


def wait_ready(proc: subprocess.Popen[str], base_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"serve exited with {proc.returncode} before it was ready: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    pytest.fail(f"serve was not ready within {READY_TIMEOUT_S} s")


def test_serve_answers_embeddings_and_counts_them(server: tuple[subprocess.Popen[str], str]) -> None:
    proc, base_url = server
    wait_ready(proc, base_url)

    request = urllib.request.Request(
        f"{base_url}/v1/embeddings",
        data=json.dumps({"input": ["hello", "world"], "model": "minilm"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["X-Polyray-Inference-Ms"] is not None
        payload = json.loads(response.read())
    assert payload["model"] == "minilm@1"
    assert [len(row["embedding"]) for row in payload["data"]] == [DIM, DIM]

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:
        assert 'polyray_requests_total{outcome="ok",route="/v1/embeddings"} 1.0' in response.read().decode()


def test_serve_exits_0_on_sigterm(server: tuple[subprocess.Popen[str], str]) -> None:
    """An idle server stops cleanly. Draining with a request in flight: tests/e2e/test_drain.py."""
    proc, base_url = server
    wait_ready(proc, base_url)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=EXIT_TIMEOUT_S)
    # Graceful: the lifespan ran to its end (the engine stopped) and nothing raised.
    assert proc.returncode == 0, stderr
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr, stderr
