"""``polyray clients``, ``polyray usage report`` and the first ``polyray serve`` as a user runs them:
real subprocesses on a SQLite file in a temporary directory (``POLYRAY_HOME`` too)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from server_support import free_port

from polyray.db.connection import open_database
from polyray.errors import Forbidden, Unauthenticated
from polyray.tenancy.directory import ClientDirectory
from polyray.tenancy.ledger import UsageBatch, UsageRow, apply_batch
from polyray.tenancy.model import PriorityClass, Quota
from polyray.tenancy.store import ClientStore

COMMAND_TIMEOUT_S = 60
READY_TIMEOUT_S = 30
CLIENT_KEY = re.compile(r"pk-c[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
ADMIN_KEY = re.compile(r"pk-a[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "POLYRAY_HOME": str(home)}


def polyray(*args: str, log_level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "polyray.cli", "--log-level", log_level, *args]


def run_all(home: Path, *commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands side by side (each start costs about a second of imports)."""
    procs = [
        subprocess.Popen(polyray(*c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(home))
        for c in commands
    ]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        results.append(subprocess.CompletedProcess(list(command), proc.returncode, out, err))
    return results


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_all(home, args)[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def row_of(stdout: str, name: str) -> list[str]:
    """The table row of client ``name``, split on whitespace."""
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, stdout
    return rows[0]


def directory_of(url: str) -> ClientDirectory:
    db = open_database(url)
    directory = ClientDirectory(ClientStore(db))
    directory.load()
    db.dispose()
    return directory


# -- clients -----------------------------------------------------------------------------------


def test_clients_lifecycle(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/clients.db"
    db = ("--database-url", url)

    created = ok(
        run(
            tmp_path,
            "clients",
            "create",
            "search-api",
            *db,
            "--priority",
            "interactive",
            "--share",
            "2",
            "--requests-per-s",
            "5",
        )
    )
    keys = CLIENT_KEY.findall(created)
    assert len(keys) == 1, created  # shown once
    key = keys[0]
    assert "shown once" in created
    # name, priority, share, req/s, tok/s, conc, cpu-s/day, state
    assert row_of(created, "search-api") == ["search-api", "interactive", "2", "5", "-", "-", "-", "active"]

    listed, shown, admin, quota = run_all(
        tmp_path,
        ("clients", "list", *db),
        ("clients", "show", "search-api", *db),
        ("clients", "admin-key", *db),
        ("clients", "set-quota", "search-api", *db, "--requests-per-s", "none", "--max-concurrent", "3",
         "--daily-compute-s", "60"),
    )  # fmt: skip
    assert row_of(ok(listed), "search-api")[1] == "interactive"
    assert key not in listed.stdout
    shown_out = ok(shown)
    assert key not in shown_out and key.split("_", 1)[1] not in shown_out  # never shown again
    assert re.search(r"pk-c[0-9a-f]{8}\.\.\.\s+created .*\s+active", shown_out), shown_out
    admin_keys = ADMIN_KEY.findall(ok(admin))
    assert len(admin_keys) == 1
    assert row_of(ok(quota), "search-api") == ["search-api", "interactive", "2", "-", "-", "3", "60", "active"]

    directory = directory_of(url)
    who = directory.authenticate(key)
    assert who.client is not None
    assert who.client.quota == Quota(requests_per_s=None, max_concurrent=3, daily_compute_s=60.0)
    assert who.client.priority is PriorityClass.INTERACTIVE and who.client.share == 2.0
    assert directory.authenticate(admin_keys[0]).is_admin

    disabled, rotated = run_all(
        tmp_path, ("clients", "disable", "search-api", *db), ("clients", "rotate-key", "search-api", *db)
    )
    assert row_of(ok(disabled), "search-api")[-1] == "disabled"
    new_keys = CLIENT_KEY.findall(ok(rotated))
    assert len(new_keys) == 1 and new_keys[0] != key
    directory = directory_of(url)
    with pytest.raises(Forbidden):
        directory.authenticate(new_keys[0])
    with pytest.raises(Unauthenticated):
        directory.authenticate(key)

    enabled = ok(run(tmp_path, "clients", "enable", "search-api", *db))
    assert row_of(enabled, "search-api")[-1] == "active"
    directory = directory_of(url)
    assert directory.authenticate(new_keys[0]).client is not None
    with pytest.raises(Unauthenticated):
        directory.authenticate(key)


def test_clients_errors_exit_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/clients.db"
    db = ("--database-url", url)
    # Migrate first: processes racing to create the schema of a brand-new database is not what this tests.
    open_database(url).dispose()
    bad_name, absent, bad_value = run_all(
        tmp_path,
        ("clients", "create", "Bad Name", *db),
        ("clients", "show", "absent", *db),
        ("clients", "set-quota", "x", *db, "--requests-per-s", "fast"),
    )
    for result, fragments in (
        (bad_name, ("invalid_request", "'Bad Name'", "lower-case")),
        (absent, ("not_found", "'absent'")),
    ):
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("polyray: "), result.stderr
        assert all(f in lines[0] for f in fragments), lines[0]
        assert CLIENT_KEY.findall(result.stdout) == []
    assert bad_value.returncode == 2  # argparse: a usage error
    assert "expected a number or 'none'" in bad_value.stderr


# -- usage report ------------------------------------------------------------------------------


def test_usage_report(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/usage.db"
    db = open_database(url)
    minute = int(datetime(2026, 1, 5, 10, 30, tzinfo=UTC).timestamp())
    apply_batch(
        db,
        UsageBatch(
            "filled",
            (
                UsageRow("alpha", "minilm", "1", minute, 3, 5, 1, 120, 3_000_000_000),
                UsageRow("alpha", "minilm", "2", minute + 60, 1, 1, 0, 10, 1_000_000_000),
                UsageRow("beta", "minilm", "1", minute, 2, 2, 0, 40, 4_000_000_000),
                UsageRow("beta", "minilm", "1", minute - 7 * 86_400, 9, 9, 9, 99, 9_000_000_000),  # before --since
            ),
        ),
    )
    db.dispose()
    window = ("--database-url", url, "--since", "2026-01-05", "--until", "2026-01-06")
    by_client, by_model, only_beta = run_all(
        tmp_path,
        ("usage", "report", *window),
        ("usage", "report", *window, "--by", "model"),
        ("usage", "report", *window, "--client", "beta"),
    )
    out = ok(by_client)
    assert "usage since 2026-01-05 00:00Z until 2026-01-06 00:00Z, by client" in out
    assert re.search(r"client\s+requests\s+texts\s+cached\s+tokens\s+compute s\s+share", out), out
    # group, requests, texts, cached, tokens, compute s, share of compute
    assert row_of(out, "alpha") == ["alpha", "4", "6", "1", "130", "4.000", "50.0%"]
    assert row_of(out, "beta") == ["beta", "2", "2", "0", "40", "4.000", "50.0%"]

    model_out = ok(by_model)
    assert row_of(model_out, "minilm@1") == ["minilm@1", "5", "7", "1", "160", "7.000", "87.5%"]
    assert row_of(model_out, "minilm@2")[1:5] == ["1", "1", "0", "10"]

    beta_out = ok(only_beta)
    assert row_of(beta_out, "beta")[1] == "2"
    assert "alpha" not in beta_out


# -- serve: the first start bootstraps, the second does not ------------------------------------


def start_serve(tmp_path: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp_path / "polyray.toml"
    config.write_text(
        '[tenancy]\nflush_interval_s = 0.1\n\n[[models]]\nname = "minilm"\nversion = "1"\nbackend = "dummy"\n',
        encoding="utf-8",
    )
    port = free_port()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            polyray("serve", "--config", str(config), "--port", str(port)),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env_for(tmp_path),
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return proc, base_url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"serve was not ready in time: {log.read_text()}"
        time.sleep(0.05)


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=COMMAND_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()


def call(base_url: str, path: str, key: str | None, body: object = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{base_url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_bootstraps_keys_once_and_keeps_them(tmp_path: Path) -> None:
    first_log = tmp_path / "first.log"
    proc, base_url = start_serve(tmp_path, first_log)
    try:
        log = first_log.read_text()
        client_keys, admin_keys = CLIENT_KEY.findall(log), ADMIN_KEY.findall(log)
        # One client key (also in the example curl line) and one admin key, each on its own line, once.
        assert len(set(client_keys)) == 1 and len(admin_keys) == 1, log
        assert log.count("client key (default): ") == 1 and log.count("admin key: ") == 1, log
        assert "client 'default'" in log
        key = client_keys[0]
        status, payload = call(base_url, "/v1/embeddings", key, {"model": "minilm", "input": ["hello", "world"]})
        assert status == 200, payload
        status, payload = call(base_url, "/v1/embeddings", None, {"model": "minilm", "input": "no key"})
        assert status == 401, payload
        status, payload = call(base_url, "/v1/admin/clients", admin_keys[0])
        assert status == 200 and [c["name"] for c in payload["data"]] == ["default"], payload
    finally:
        stop_serve(proc)
    assert proc.returncode == 0, first_log.read_text()
    assert (tmp_path / "polyray.db").exists()  # in POLYRAY_HOME

    second_log = tmp_path / "second.log"
    proc, base_url = start_serve(tmp_path, second_log)
    try:
        log = second_log.read_text()
        assert CLIENT_KEY.findall(log) == [] and ADMIN_KEY.findall(log) == [], log  # no new keys
        status, payload = call(base_url, "/v1/usage", key)  # the old key still works
        assert status == 200, payload
        (row,) = payload["data"]
        # The first run's usage was flushed on SIGTERM and survived the restart.
        assert row["client"] == "default" and row["num_requests"] == 1 and row["num_texts"] == 2
    finally:
        stop_serve(proc)
    assert proc.returncode == 0, second_log.read_text()


def test_usage_report_takes_relative_times_as_the_readme_writes_them(tmp_path: Path) -> None:
    """``--since -7d`` (a value starting with "-", which argparse alone reads as an option)."""
    url = f"sqlite:///{tmp_path}/usage.db"
    db = open_database(url)
    now_minute = int(time.time()) // 60 * 60
    apply_batch(
        db,
        UsageBatch(
            "recent",
            (
                UsageRow("alpha", "minilm", "1", now_minute - 3 * 86_400, 2, 2, 0, 20, 1_000_000_000),
                UsageRow("beta", "minilm", "1", now_minute - 10 * 86_400, 1, 1, 0, 10, 1_000_000_000),
            ),
        ),
    )
    db.dispose()
    week, fortnight_until_week, help_text = run_all(
        tmp_path,
        ("usage", "report", "--database-url", url, "--since", "-7d", "--by", "client"),
        ("usage", "report", "--database-url", url, "--since", "-14d", "--until", "-7d"),
        ("usage", "report", "--help"),
    )
    out = ok(week)
    assert row_of(out, "alpha")[1] == "2" and "beta" not in out
    out = ok(fortnight_until_week)
    assert row_of(out, "beta")[1] == "1" and "alpha" not in out
    assert "--since -7d" in ok(help_text)
