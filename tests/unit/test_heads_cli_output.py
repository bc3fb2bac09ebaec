"""``polyray heads`` in process: option parsing, the progress bar, tables and one-line errors.

The client talks to an ``httpx.MockTransport`` (patched into ``polyray.client.Client``); the
CLI against a real server is ``tests/e2e/test_cli_heads.py``.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_client import error_body, head_view

import polyray.client
from polyray.cli.heads import ProgressBar, _option, register
from polyray.client import Head

Handler = Callable[[httpx.Request], httpx.Response]
REAL_CLIENT = polyray.client.Client


def run_cli(monkeypatch: pytest.MonkeyPatch, handler: Handler, *argv: str) -> tuple[int, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    def client(base_url: str, api_key: str | None = None, timeout_s: float = 60.0) -> polyray.client.Client:
        return REAL_CLIENT(base_url, api_key, timeout_s, transport=httpx.MockTransport(record))

    monkeypatch.setattr(polyray.client, "Client", client)
    parser = argparse.ArgumentParser(prog="polyray")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["heads", *argv])
    return int(args.func(args)), seen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed=7", ("seed", 7)),
        ("threshold=0.4", ("threshold", 0.4)),
        ("flag=true", ("flag", True)),
        ("name=plain text", ("name", "plain text")),  # not JSON: kept as text
        ("expr=a=b", ("expr", "a=b")),  # split at the first '='
    ],
)
def test_option_values_are_json_when_they_parse(text: str, expected: tuple[str, Any]) -> None:
    assert _option(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=3", " =3"])
def test_option_needs_a_key_and_a_value(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        _option(text)


def test_progress_bar_redraws_in_place_only_on_change() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, width_chars=10)
    for status, progress in [("pending", 0.0), ("training", 0.5), ("training", 0.501), ("ready", 0.97)]:
        bar(Head.from_json(head_view(status=status, progress=progress)))
    bar.finish()
    frames = stream.getvalue().split("\r")[1:]
    assert [f.rstrip() for f in frames] == [
        "alice/topics [..........]   0% pending",
        "alice/topics [#####.....]  50% training",  # 50.1 % is the same whole percent: not redrawn
        "alice/topics [##########] 100% ready",  # ready is drawn full whatever the last progress said
    ]
    assert frames[-1].endswith("\n") and len(frames[1].rstrip("\n")) >= len(frames[0])  # old text overwritten


def test_list_prints_a_table_and_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    listing = {"object": "list", "data": [head_view(), head_view(name="words", ref="alice/words", kind="regressor",
                                                                  metrics={"r2": 0.81234}, shared_with=[])]}  # fmt: skip
    code, seen = run_cli(monkeypatch, lambda _: httpx.Response(200, json=listing), "--url", "http://x", "list")
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and seen[0].url == "http://x/v1/heads"
    assert out[0].split()[:4] == ["head", "id", "kind", "model"]
    assert out[1].split()[0] == "alice/topics" and "accuracy 0.95" in out[1] and out[1].endswith("bob")
    assert out[2].split()[0] == "alice/words" and "r2 0.8123" in out[2]

    code, _ = run_cli(monkeypatch, lambda _: httpx.Response(200, json=listing), "list", "--json", "--model", "m@1")
    assert [h["ref"] for h in json.loads(capsys.readouterr().out)] == ["alice/topics", "alice/words"]


def test_api_errors_print_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = error_body("forbidden", "head 'bob/secret' is not shared with 'alice'", "not_shared")
    code, seen = run_cli(monkeypatch, lambda _: httpx.Response(403, json=body), "show", "bob/secret")
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err == "polyray: forbidden: head 'bob/secret' is not shared with 'alice'\n"
    assert seen[0].url.raw_path == b"/v1/heads/bob/secret"


def test_train_follows_progress_then_prints_metrics(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr("polyray.client.time.sleep", lambda _: None)
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(12)))
    views = [head_view(status="pending", progress=0.0, metrics={}), head_view(status="training", progress=0.4),
             head_view()]  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202 if request.method == "POST" else 200, json=views.pop(0))

    argv = ("train", "topics", "--kind", "classifier", "--data", str(data), "--option", "seed=2", "--key", "pk-c1")
    code, seen = run_cli(monkeypatch, handler, *argv)
    captured = capsys.readouterr()
    assert code == 0 and views == []
    sent = json.loads(seen[0].content)
    assert sent["options"] == {"seed": 2} and sent["examples_jsonl"] == data.read_text()
    assert seen[0].headers["Authorization"] == "Bearer pk-c1"
    assert captured.err.count("\r") == 3 and captured.err.rstrip(" \n").endswith("] 100% ready")
    assert "status       ready" in captured.out and "  accuracy" in captured.out and "0.95" in captured.out
