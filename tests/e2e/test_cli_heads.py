"""``polyray heads ...`` as a user runs it: CLI subprocesses against a real ``polyray serve``.

One server for the module (a subprocess on the dummy backend, two versions ``minilm@1`` and
``minilm@2``, tenancy on SQLite in a temporary ``POLYRAY_HOME``); its bootstrap client key
(``default``) trains heads, a second client ``bob`` (made through the admin API) checks sharing.
Dummy vectors carry no meaning, so these tests check the CLI's mechanics: requests, progress,
tables, JSON, exit codes and one-line errors; ``test_heads_real_model.py`` checks learning.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from server_support import free_port
from test_cli_tenancy import ADMIN_KEY, CLIENT_KEY, COMMAND_TIMEOUT_S, call, env_for, polyray, stop_serve

from polyray.heads.datasets import load_topics

READY_TIMEOUT_S = 60
DIM = 32
TOPICS = sorted({row["label"] for row in load_topics()})


@dataclass(frozen=True)
class Server:
    url: str
    home: Path
    key: str  # the bootstrap client "default"
    bob_key: str
    data: Path  # example files


def _write_data(data: Path) -> None:
    topics = load_topics()
    data.mkdir()
    (data / "topics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in topics), encoding="utf-8")
    tags = [{"text": r["text"], "label": [r["label"], "long" if len(r["text"]) > 80 else "short"]} for r in topics]
    (data / "tags.json").write_text(json.dumps(tags), encoding="utf-8")  # a .json list, not JSON lines
    words = [{"text": r["text"], "label": len(r["text"].split())} for r in topics]
    (data / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in words), encoding="utf-8")
    (data / "texts.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in topics), encoding="utf-8")
    (data / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in topics[:3]), encoding="utf-8")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("cli-heads")
    models = "".join(
        f'[[models]]\nname = "minilm"\nversion = "{v}"\nbackend = "dummy"\ndim = {DIM}\n\n' for v in ("1", "2")
    )
    config = home / "polyray.toml"
    config.write_text(f"[tenancy]\nflush_interval_s = 0.1\n\n{models}", encoding="utf-8")
    log = home / "serve.log"
    port = free_port()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            polyray("serve", "--config", str(config), "--port", str(port)),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env_for(home),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}: {log.read_text()}")
            try:
                status, _ = call(url, "/readyz", None)
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"serve was not ready in time: {log.read_text()}"
            time.sleep(0.05)
        text = log.read_text()
        key, admin_key = CLIENT_KEY.findall(text)[0], ADMIN_KEY.findall(text)[0]
        status, made = call(url, "/v1/admin/clients", admin_key, {"name": "bob"})
        assert status == 201, made
        _write_data(home / "data")
        yield Server(url, home, key, str(made["api_key"]), home / "data")
    finally:
        stop_serve(proc)


def run_all(server: Server, *commands: Sequence[str], key: str | None = None) -> list[subprocess.CompletedProcess[str]]:
    """``polyray heads ...`` commands side by side; the server and key come from the environment
    (``POLYRAY_URL``, ``POLYRAY_API_KEY``) unless a command passes ``--url`` / ``--key``."""
    env = {**env_for(server.home), "POLYRAY_URL": server.url, "POLYRAY_API_KEY": server.key if key is None else key}
    procs = [
        subprocess.Popen(
            polyray("heads", *c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=server.data
        )
        for c in commands
    ]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        results.append(subprocess.CompletedProcess(["heads", *command], proc.returncode, out, err))
    return results


def run(server: Server, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_all(server, args, key=key)[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def fails(result: subprocess.CompletedProcess[str], error_type: str, *fragments: str) -> str:
    """Exit 1 with exactly one line on stderr: ``polyray: <type>: <message>``."""
    assert result.returncode == 1, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"polyray: {error_type}: "), result.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def rows_of(stdout: str, ref: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.split()[:1] == [ref]]


# -- the lifecycle of one head ------------------------------------------------------------------


def test_train_list_show_infer_retrain_delete(server: Server) -> None:
    trained = run(
        server, "train", "topics", "--kind", "classifier", "--data", "topics.jsonl", "--model", "minilm@1",
        "--option", "seed=3", "--option", "validation_fraction=0.25",
    )  # fmt: skip
    out = ok(trained)
    # Progress: a bar on stderr (redrawn with \r, which text mode reads as a line break), ending ready.
    bars = [line.rstrip() for line in trained.stderr.splitlines() if line.strip()]
    assert bars and all(line.startswith("default/topics [") for line in bars), trained.stderr
    assert bars[-1].endswith("] 100% ready"), trained.stderr
    assert "status       ready" in out and "model        minilm@1" in out and "accuracy" in out, out
    assert "labels       " + ", ".join(TOPICS) in out

    listed, listed_json, shown, inferred = run_all(
        server,
        ("list",),
        ("list", "--json"),
        ("show", "topics", "--json"),
        ("infer", "--head", "topics", "--model", "minilm@1", "a match", "a recipe"),
    )
    (row,) = rows_of(ok(listed), "default/topics")
    assert row[2:5] == ["classifier", "minilm@1", "ready"] and row[5] == "360" and row[6] == str(len(TOPICS))
    assert "default/topics" in [h["ref"] for h in ok_json(listed_json)]
    head = ok_json(shown)
    assert (head["status"], head["model"], head["kind"], head["num_examples"]) == (
        "ready",
        "minilm@1",
        "classifier",
        360,
    )
    assert head["options"]["seed"] == 3 and head["options"]["validation_fraction"] == 0.25
    assert head["labels"] == TOPICS and head["id"].startswith("head-")
    answer = ok_json(inferred)
    assert answer["model"] == "minilm@1" and [d["text"] for d in answer["data"]] == ["a match", "a recipe"]
    for item in answer["data"]:
        output = item["heads"]["topics"]
        assert output["label"] in TOPICS and sorted(output["scores"]) == TOPICS
        assert sum(output["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert answer["timing"]["compute_ms"] > 0 and answer["timing"]["heads_ms"] >= 0

    retrained = ok_json(run(server, "retrain", "topics", "--model", "minilm@2", "--json"))
    assert (retrained["status"], retrained["model"], retrained["name"]) == ("ready", "minilm@2", "topics")
    assert retrained["id"] != head["id"] and retrained["num_examples"] == 360

    both, only_v1, newest, older = run_all(
        server,
        ("list",),
        ("list", "--model", "minilm@1", "--json"),
        ("show", "topics", "--json"),
        ("show", "default/topics", "--model", "minilm@1", "--json"),
    )
    assert sorted(r[3] for r in rows_of(ok(both), "default/topics")) == ["minilm@1", "minilm@2"]
    assert [h["id"] for h in ok_json(only_v1) if h["name"] == "topics"] == [head["id"]]
    assert ok_json(newest)["id"] == retrained["id"]  # a name means its newest version
    assert ok_json(older)["id"] == head["id"]

    deleted = ok(run(server, "delete", "topics", "--model", "minilm@1"))
    assert head["id"] in deleted
    remaining = ok_json(run(server, "list", "--json"))
    assert [h["id"] for h in remaining if h["name"] == "topics"] == [retrained["id"]]
    fails(run(server, "show", head["id"]), "not_found")


# -- other kinds, --no-wait, options given before the action ----------------------------------


def test_other_kinds_and_no_wait(server: Server) -> None:
    tags, words, pca = run_all(
        server,
        ("train", "tags", "--kind", "multilabel", "--data", "tags.json", "--option", "threshold=0.4", "--no-wait", "--json"),
        ("--json", "train", "words", "--kind", "regressor", "--data", "words.jsonl", "--no-wait"),
        ("train", "pca", "--kind", "projection", "--data", "texts.jsonl", "--option", "dimensions=4", "--no-wait"),
    )  # fmt: skip
    accepted = [ok_json(tags), ok_json(words)]
    assert all(h["status"] in ("pending", "training", "ready") for h in accepted)
    assert accepted[0]["options"]["threshold"] == 0.4
    assert "follow it with: polyray heads show head-" in ok(pca) or "status       ready" in pca.stdout
    assert pca.stderr == ""  # --no-wait: no progress bar

    deadline = time.monotonic() + 60
    while True:
        views = ok_json(run(server, "list", "--json"))
        status = {h["name"]: h["status"] for h in views if h["name"] in ("tags", "words", "pca")}
        if set(status.values()) == {"ready"} and len(status) == 3:
            break
        assert "failed" not in status.values(), views
        assert time.monotonic() < deadline, status
        time.sleep(0.2)

    answer = ok_json(
        run(server, "infer", "--head", "tags", "--head", "words", "--head", "default/pca", "--embedding", "one text")
    )
    (item,) = answer["data"]
    assert set(item["heads"]) == {"tags", "words", "default/pca"}  # as named in the request
    assert set(item["heads"]["tags"]) == {"labels", "scores"}
    assert sorted(item["heads"]["tags"]["scores"]) == sorted([*TOPICS, "long", "short"])
    assert isinstance(item["heads"]["words"]["value"], float)
    assert len(item["heads"]["default/pca"]["embedding"]) == 4
    assert len(item["embedding"]) == DIM


# -- sharing ------------------------------------------------------------------------------------


def test_share_and_unshare(server: Server) -> None:
    ok(run(server, "train", "shared", "--kind", "classifier", "--data", "topics.jsonl"))
    bob_infer = ("infer", "--head", "default/shared", "hello")
    fails(run(server, *bob_infer, key=server.bob_key), "forbidden")

    shared = ok(run(server, "share", "shared", "bob"))
    assert "shared with  bob" in shared, shared
    bob_list, bob_answer = run_all(server, ("list",), bob_infer, key=server.bob_key)
    assert rows_of(ok(bob_list), "default/shared"), bob_list.stdout
    assert ok_json(bob_answer)["data"][0]["heads"]["default/shared"]["label"] in TOPICS
    # Only the owner manages a head.
    assert run(server, "share", "default/shared", "carol", key=server.bob_key).returncode == 1

    unshared = ok_json(run(server, "unshare", "shared", "bob", "--json"))
    assert unshared["shared_with"] == []
    fails(run(server, *bob_infer, key=server.bob_key), "forbidden")


# -- errors -------------------------------------------------------------------------------------


def test_errors_are_one_line_and_exit_1(server: Server) -> None:
    absent, few, no_file, no_key, unreachable, bad_kind_option = run_all(
        server,
        ("show", "absent"),
        ("train", "few", "--kind", "classifier", "--data", "few.jsonl"),
        ("train", "nofile", "--kind", "classifier", "--data", "missing.jsonl"),
        ("--key", "", "list"),
        ("list", "--url", f"http://127.0.0.1:{free_port()}"),
        ("train", "bad", "--kind", "regressor", "--data", "words.jsonl", "--option", "dimensions=3"),
    )
    fails(absent, "not_found", "absent")
    fails(few, "invalid_request", "at least 10")
    fails(no_file, "invalid_request", "missing.jsonl")
    fails(no_key, "unauthenticated")
    fails(unreachable, "connection_error", "cannot reach")
    fails(bad_kind_option, "invalid_request", "dimensions")
    usage = run(server, "train", "x", "--kind", "classifier", "--data", "topics.jsonl", "--option", "novalue")
    assert usage.returncode == 2 and "expected KEY=VALUE" in usage.stderr  # argparse: a usage error


def test_environment_is_the_default_and_flags_override_it(server: Server) -> None:
    env = {**env_for(server.home), "POLYRAY_URL": "http://127.0.0.1:9", "POLYRAY_API_KEY": "pk-cwrong"}
    result = subprocess.run(
        polyray("heads", "list", "--url", server.url, "--key", server.key),
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT_S,
    )
    ok(result)


def test_progress_is_not_broken_by_http_client_logs(server: Server) -> None:
    """At ``--log-level info`` the CLI logs its own lines, but not one ``httpx`` line per poll."""
    env = {**env_for(server.home), "POLYRAY_URL": server.url, "POLYRAY_API_KEY": server.key}
    result = subprocess.run(
        polyray("heads", "train", "logs", "--kind", "classifier", "--data", "topics.jsonl", log_level="info"),
        capture_output=True,
        text=True,
        env=env,
        cwd=server.data,
        timeout=COMMAND_TIMEOUT_S,
    )
    ok(result)
    assert "HTTP Request" not in result.stderr and "httpx" not in result.stderr, result.stderr
    assert "100% ready" in result.stderr  # the progress bar is there, on one line


def test_a_reader_that_leaves_early_ends_the_command_quietly(server: Server) -> None:
    """``polyray heads show topics | head -2``: stdout's reader is gone before the output is written."""
    env = {**env_for(server.home), "POLYRAY_URL": server.url, "POLYRAY_API_KEY": server.key}
    ok(run(server, "train", "piped", "--kind", "classifier", "--data", "topics.jsonl"))
    for args in (("show", "piped"), ("list",), ("show", "piped", "--json")):
        read_end, write_end = os.pipe()
        os.close(read_end)  # every write to stdout now fails with EPIPE, as after `head` exits
        try:
            result = subprocess.run(
                polyray("heads", *args),
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=COMMAND_TIMEOUT_S,
            )
        finally:
            os.close(write_end)
        assert result.returncode == 141, (args, result.stderr)  # 128 + SIGPIPE, as a shell reports `yes | head`
        assert result.stderr == "", (args, result.stderr)
    piped = subprocess.run(
        f"{' '.join(polyray('heads', 'show', 'piped'))} | head -2",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2 and piped.stderr == "", piped
