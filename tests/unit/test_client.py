"""``polyray.Client`` against ``httpx.MockTransport``: request shapes, answers, errors, waiting.

No server runs here: each test states what the server answers and checks what the client sent
and returned. ``tests/e2e/test_cli_heads.py`` runs the client (through the CLI) against a real one.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import polyray
from polyray.client import (
    Client,
    Head,
    HeadTrainingFailed,
    HeadWaitTimeout,
    PolyrayAPIError,
    PolyrayConnectionError,
)

Handler = Callable[[httpx.Request], httpx.Response]


def head_view(**fields: Any) -> dict[str, Any]:
    """A head view as the server sends it; ``fields`` override."""
    view: dict[str, Any] = {
        "object": "head",
        "id": "head-0123456789abcdef01234567",
        "name": "topics",
        "owner": "alice",
        "ref": "alice/topics",
        "kind": "classifier",
        "model": "minilm@1",
        "status": "ready",
        "progress": 1.0,
        "error": None,
        "labels": ["cooking", "sports"],
        "dim_in": 384,
        "dim_out": 2,
        "metrics": {"accuracy": 0.95, "macro_f1": 0.94, "baseline_accuracy": 0.5},
        "num_examples": 40,
        "options": {"seed": 0, "validation_fraction": 0.2},
        "shared_with": ["bob"],
        "created_at": "2026-11-23T10:00:00+00:00",
        "updated_at": "2026-11-23T10:00:05.250000+00:00",
    }
    view.update(fields)
    return view


class FakeServer:
    """Answers with ``handler`` and records every request (method, raw path, query, JSON body)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def client(self, **kwargs: Any) -> Client:
        return Client("http://polyray.test", transport=httpx.MockTransport(self), **kwargs)

    @property
    def paths(self) -> list[str]:
        """``METHOD raw-path?query`` of each request, as it went on the wire (quoting visible)."""
        return [f"{r.method} {r.url.raw_path.decode()}" for r in self.requests]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


def answer(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    return lambda _: httpx.Response(status, json=payload, headers=headers)


def error_body(type_: str, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def b64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYRAY_API_KEY", raising=False)


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Polling without waiting: ``time.sleep`` records its argument instead."""
    slept: list[float] = []
    monkeypatch.setattr("polyray.client.time.sleep", slept.append)
    yield slept


# -- construction and authentication ----------------------------------------------------------


def test_key_from_argument_then_environment_then_none(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(answer({"object": "list", "data": []}))
    with server.client(api_key="pk-c-explicit") as client:
        client.heads()
    monkeypatch.setenv("POLYRAY_API_KEY", "pk-c-from-env")
    with server.client() as client:
        client.heads()
    monkeypatch.delenv("POLYRAY_API_KEY")
    with server.client() as client:
        client.heads()
    auth = [r.headers.get("Authorization") for r in server.requests]
    assert auth == ["Bearer pk-c-explicit", "Bearer pk-c-from-env", None]  # no key: no header at all
    assert all(r.headers["User-Agent"].startswith("polyray-client/") for r in server.requests)


def test_import_polyray_stays_light_and_exports_the_client_lazily() -> None:
    code = (
        "import sys, polyray; light = 'httpx' not in sys.modules and 'polyray.client' not in sys.modules; "
        "c = polyray.Client; print(light, c.__module__, 'httpx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "polyray.client", "True"]
    assert polyray.Client is Client and "Client" in dir(polyray)
    with pytest.raises(AttributeError):
        _ = polyray.NoSuchThing


# -- embeddings and inference -----------------------------------------------------------------


def test_embed_sends_base64_and_returns_rows_in_input_order() -> None:
    data = [
        {"object": "embedding", "index": 1, "embedding": b64([0.0, 1.0, 2.0])},
        {"object": "embedding", "index": 0, "embedding": b64([0.5, -1.0, 3.25])},
    ]
    server = FakeServer(answer({"object": "list", "data": data, "model": "minilm@1"}))
    with server.client() as client:
        vectors = client.embed(["first", "second"], model="minilm@1")
        one = client.embed("lone text")
    assert server.paths == ["POST /v1/embeddings", "POST /v1/embeddings"]
    assert server.body(0) == {"model": "minilm@1", "input": ["first", "second"], "encoding_format": "base64"}
    assert server.body(1)["input"] == ["lone text"]  # a string is one text, not its characters
    assert vectors.dtype == np.float32 and vectors.shape == (2, 3)
    np.testing.assert_array_equal(vectors, [[0.5, -1.0, 3.25], [0.0, 1.0, 2.0]])
    assert one.shape == (2, 3)  # the fake answers the same; the shape follows the answer


def test_infer_request_and_result() -> None:
    outputs = [
        {"topics": {"label": "sports", "scores": {"sports": 0.9, "cooking": 0.1}}, "bob/len": {"value": 7.5}},
        {"topics": {"label": "cooking", "scores": {"sports": 0.2, "cooking": 0.8}}, "bob/len": {"value": 3.0}},
    ]
    payload = {
        "object": "list",
        "model": "minilm@1",
        "data": [
            {"index": 1, "heads": outputs[1], "embedding": [0.0, 1.0]},
            {"index": 0, "heads": outputs[0], "embedding": [1.0, 0.0]},
        ],
        "usage": {"prompt_tokens": 17, "total_tokens": 17},
    }
    headers = {"X-Polyray-Compute-Ms": "4.250", "X-Polyray-Heads-Ms": "0.125", "X-Polyray-Inference-Ms": "3.5"}
    server = FakeServer(answer(payload, headers=headers))
    with server.client() as client:
        result = client.infer(["a match", "a recipe"], ["topics", "bob/len"], return_embedding=True)
    assert server.paths == ["POST /v1/infer"]
    assert server.body() == {
        "model": "minilm",
        "input": ["a match", "a recipe"],
        "heads": ["topics", "bob/len"],
        "return_embedding": True,
    }
    assert result.model == "minilm@1"
    assert result.outputs == outputs  # by index, whatever the order of data
    assert result.embeddings is not None
    np.testing.assert_array_equal(result.embeddings, [[1.0, 0.0], [0.0, 1.0]])
    assert (result.compute_ms, result.heads_ms, result.inference_ms, result.prompt_tokens) == (4.25, 0.125, 3.5, 17)


def test_infer_without_embeddings_or_timing_headers() -> None:
    payload = {"object": "list", "model": "minilm@1", "data": [{"index": 0, "heads": {"h": {"value": 1.0}}}]}
    server = FakeServer(answer(payload))
    with server.client() as client:
        result = client.infer("one text", "h")
    assert server.body()["input"] == ["one text"] and server.body()["heads"] == ["h"]
    assert server.body()["return_embedding"] is False
    assert result.embeddings is None and result.compute_ms is None and result.heads_ms is None
    assert result.outputs == [{"h": {"value": 1.0}}]


# -- heads: requests and views ----------------------------------------------------------------


def test_head_view_parses_into_a_frozen_head() -> None:
    head = Head.from_json({**head_view(), "a_field_from_a_newer_server": 1})
    assert head.id == "head-0123456789abcdef01234567" and head.ref == "alice/topics"
    assert head.labels == ("cooking", "sports") and head.shared_with == ("bob",)
    assert head.created_at == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert head.updated_at == datetime(2026, 11, 23, 10, 0, 5, 250000, tzinfo=UTC)
    assert head.metrics["accuracy"] == 0.95 and head.ready and head.done
    with pytest.raises(AttributeError):
        head.status = "failed"  # type: ignore[misc]
    assert Head.from_json(head.as_dict() | {"object": "head"}) == head  # as_dict round-trips
    assert len({head, Head.from_json(head_view())}) == 1  # hashable: usable in sets and as keys
    pending = Head.from_json(head_view(status="pending", progress=0.0, metrics={}, created_at=None))
    assert not pending.done and pending.created_at is None and pending.metrics == {}


@pytest.mark.parametrize(
    ("ref", "wire"),
    [
        ("topics", "/v1/heads/topics"),
        ("alice/topics", "/v1/heads/alice/topics"),  # the owner's slash is kept
        ("head-0123", "/v1/heads/head-0123"),
        ("we ird?#name", "/v1/heads/we%20ird%3F%23name"),  # never a query or fragment by accident
    ],
)
def test_head_references_are_quoted_keeping_the_slash(ref: str, wire: str) -> None:
    server = FakeServer(answer(head_view()))
    with server.client() as client:
        client.head(ref)
        client.share_head(ref, ["bob"])
    assert server.paths == [f"GET {wire}", f"POST {wire}/share"]


def test_head_actions_send_the_documented_requests() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(200, json={"id": "head-x", "object": "head", "deleted": True})
        if request.url.path == "/v1/heads" and request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [head_view(), head_view(name="other")]})
        status = 202 if request.url.path.endswith("/retrain") else 200
        return httpx.Response(status, json=head_view())

    server = FakeServer(handler)
    with server.client() as client:
        listed = client.heads()
        client.heads(model="minilm@1")
        client.head("topics", model="minilm@2")
        shared = client.share_head("topics", "bob")
        client.unshare_head(Head.from_json(head_view()), ["bob", "carol"])
        retrained = client.retrain_head("alice/topics", "minilm@2", wait=False)
        client.retrain_head("topics", "minilm@3", wait=False, source_model="minilm@1")
        deleted = client.delete_head("topics", model="minilm@1")
    assert [h.name for h in listed] == ["topics", "other"]
    assert isinstance(shared, Head) and retrained.status == "ready" and deleted == "head-x"
    assert server.paths == [
        "GET /v1/heads",
        "GET /v1/heads?model=minilm%401",
        "GET /v1/heads/topics?model=minilm%402",
        "POST /v1/heads/topics/share",
        "POST /v1/heads/head-0123456789abcdef01234567/unshare",  # a Head is named by its id
        "POST /v1/heads/alice/topics/retrain",
        "POST /v1/heads/topics/retrain?model=minilm%401",
        "DELETE /v1/heads/topics?model=minilm%401",
    ]
    bodies = [json.loads(r.content) if r.content else None for r in server.requests]
    assert bodies[3] == {"clients": ["bob"]} and bodies[4] == {"clients": ["bob", "carol"]}
    assert bodies[5] == {"model": "minilm@2"} and bodies[6] == {"model": "minilm@3"}


def test_empty_head_reference_is_refused_locally() -> None:
    server = FakeServer(answer(head_view()))
    with server.client() as client, pytest.raises(ValueError, match="empty"):
        client.head("")
    assert server.requests == []


# -- training: examples and waiting -----------------------------------------------------------


EXAMPLES = [{"text": f"sentence {i}", "label": "a" if i % 2 else "b"} for i in range(12)]


def test_train_with_a_list_of_examples_and_options() -> None:
    server = FakeServer(answer(head_view(status="pending", progress=0.0), status=202))
    with server.client() as client:
        head = client.train_head("topics", "classifier", EXAMPLES, model="minilm@1", options={"seed": 3}, wait=False)
    assert server.paths == ["POST /v1/heads"]
    assert server.body() == {
        "name": "topics",
        "kind": "classifier",
        "model": "minilm@1",
        "examples": EXAMPLES,
        "options": {"seed": 3},
    }
    assert head.status == "pending"


def test_train_from_a_jsonl_file_sends_its_text(tmp_path: Path) -> None:
    text = "".join(json.dumps(e) + "\n" for e in EXAMPLES) + "\n"
    path = tmp_path / "examples.jsonl"
    path.write_text(text, encoding="utf-8")
    server = FakeServer(answer(head_view(status="pending"), status=202))
    with server.client() as client:
        client.train_head("topics", "classifier", path, wait=False)
        client.train_head("topics", "classifier", str(path), wait=False)
    for index in (0, 1):
        body = server.body(index)
        # As uploaded: the server's errors then name the file's own line numbers.
        assert body["examples_jsonl"] == text and "examples" not in body and "options" not in body


def test_train_from_a_json_file_sends_the_list(tmp_path: Path) -> None:
    path = tmp_path / "examples.JSON"
    path.write_text(json.dumps(EXAMPLES), encoding="utf-8")
    server = FakeServer(answer(head_view(status="pending"), status=202))
    with server.client() as client:
        client.train_head("topics", "classifier", path, wait=False)
    assert server.body()["examples"] == EXAMPLES


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("examples.json", '{"text": "x"}', "expected a JSON list"),
        ("examples.csv", "text,label", "must be a .json"),
        ("examples.json", "[{", "Expecting"),
    ],
)
def test_bad_example_files_fail_before_any_request(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    server = FakeServer(answer(head_view()))
    with server.client() as client, pytest.raises(ValueError, match=message):
        client.train_head("topics", "classifier", path)
    with server.client() as client, pytest.raises(FileNotFoundError):
        client.train_head("topics", "classifier", tmp_path / "absent.jsonl")
    assert server.requests == []


def progress_server(views: list[dict[str, Any]]) -> FakeServer:
    """Accepts a head (202, the first view), then answers each poll with the next view."""
    remaining = list(views)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202 if request.method == "POST" else 200, json=remaining.pop(0))

    return FakeServer(handler)


def test_train_waits_polling_by_id_and_reports_progress(no_sleep: list[float]) -> None:
    views = [
        head_view(status="pending", progress=0.0, metrics={}),
        head_view(status="training", progress=0.3, metrics={}),
        head_view(status="training", progress=0.8, metrics={}),
        head_view(status="ready", progress=1.0),
    ]
    server = progress_server(views)
    seen: list[tuple[str, float]] = []
    with server.client() as client:
        head = client.train_head(
            "topics", "classifier", EXAMPLES, on_progress=lambda h: seen.append((h.status, h.progress)),
            poll_interval_s=0.25,
        )  # fmt: skip
    assert head.ready and head.metrics["accuracy"] == 0.95
    assert seen == [("pending", 0.0), ("training", 0.3), ("training", 0.8), ("ready", 1.0)]
    # By id, never by name: a retrain makes a second head of the same name.
    assert server.paths == ["POST /v1/heads"] + ["GET /v1/heads/head-0123456789abcdef01234567"] * 3
    assert no_sleep == [0.25] * 3


def test_failed_training_raises_with_the_head(no_sleep: list[float]) -> None:
    views = [head_view(status="pending", progress=0.0), head_view(status="failed", error="embedding failed")]
    server = progress_server(views)
    with server.client() as client, pytest.raises(HeadTrainingFailed, match="embedding failed") as caught:
        client.train_head("topics", "classifier", EXAMPLES)
    assert caught.value.head.status == "failed" and caught.value.type == "training_failed"


def test_retrain_waits_too(no_sleep: list[float]) -> None:
    server = progress_server([head_view(status="pending", model="minilm@2"), head_view(model="minilm@2")])
    with server.client() as client:
        head = client.retrain_head("topics", "minilm@2")
    assert head.ready and head.model == "minilm@2"
    assert server.paths == ["POST /v1/heads/topics/retrain", "GET /v1/heads/head-0123456789abcdef01234567"]


def test_waiting_gives_up_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("polyray.client.time.monotonic", lambda: clock[0])

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr("polyray.client.time.sleep", sleep)
    server = FakeServer(answer(head_view(status="training", progress=0.5)))
    with server.client() as client, pytest.raises(HeadWaitTimeout, match="still training") as caught:
        client.wait_for_head("topics", poll_interval_s=1.0, timeout_s=3.5)
    assert isinstance(caught.value, TimeoutError)
    assert clock[0] == pytest.approx(103.5)  # the last pause is cut to the deadline
    assert len(server.requests) == 5  # the first fetch, then polls at 1, 2, 3 and 3.5 s


def test_waiting_rides_out_rate_limits(no_sleep: list[float]) -> None:
    replies = [
        httpx.Response(429, json=error_body("rate_limited", "over 2 requests/s", "requests_per_s"),
                       headers={"Retry-After": "3"}),
        httpx.Response(200, json=head_view(status="ready")),
    ]  # fmt: skip
    server = FakeServer(lambda _: replies.pop(0))
    with server.client() as client:
        head = client.wait_for_head(Head.from_json(head_view(status="training")), poll_interval_s=0.5)
    assert head.ready and no_sleep == [0.5, 3.0]


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "type_", "code", "param"),
    [
        (400, "invalid_request", "too_few_examples", "examples"),
        (401, "unauthenticated", None, None),
        (403, "forbidden", "not_owner", None),
        (404, "not_found", "head_not_found", None),
        (413, "too_large", None, None),
        (503, "overloaded", "overloaded", None),
    ],
)
def test_api_errors_carry_the_servers_fields(status: int, type_: str, code: str | None, param: str | None) -> None:
    headers = {"Retry-After": "2"} if status == 503 else None
    server = FakeServer(answer(error_body(type_, f"the {type_} message", code, param), status, headers))
    with server.client() as client, pytest.raises(PolyrayAPIError) as caught:
        client.head("topics")
    err = caught.value
    assert (err.status, err.type, err.code, err.param, err.message) == (
        status,
        type_,
        code,
        param,
        f"the {type_} message",
    )
    assert err.retry_after_s == (2.0 if status == 503 else None)
    assert f"HTTP {status} {type_}" in str(err)


def test_rate_limit_error_has_retry_after() -> None:
    body = error_body("rate_limited", "limit 5 requests/s", "requests_per_s")
    server = FakeServer(answer(body, 429, {"Retry-After": "1"}))
    with server.client() as client, pytest.raises(PolyrayAPIError) as caught:
        client.infer("x", ["h"])
    assert (caught.value.type, caught.value.code, caught.value.retry_after_s) == ("rate_limited", "requests_per_s", 1.0)


def test_errors_not_in_the_openai_shape_still_map_by_status() -> None:
    server = FakeServer(lambda _: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with server.client() as client, pytest.raises(PolyrayAPIError) as caught:
        client.heads()
    assert (caught.value.status, caught.value.type, caught.value.code) == (502, "backend_error", None)
    assert "Bad Gateway" in caught.value.message
    server = FakeServer(lambda _: httpx.Response(404, json={"detail": "Not Found"}))
    with server.client() as client, pytest.raises(PolyrayAPIError) as caught:
        client.heads()
    assert caught.value.type == "not_found"


def test_unreachable_server_is_a_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with FakeServer(refuse).client() as client, pytest.raises(PolyrayConnectionError, match="cannot reach") as caught:
        client.heads()
    assert caught.value.type == "connection_error"

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with FakeServer(slow).client() as client, pytest.raises(PolyrayConnectionError, match="no answer in time"):
        client.heads()
