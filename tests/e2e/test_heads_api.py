"""Task heads over HTTP on the dummy backend: training jobs, inference, ownership, versions, errors.

The app runs in process (``httpx.ASGITransport``) with tenancy on a SQLite file and two versions
of the dummy model, so version binding can be checked. Dummy vectors carry no meaning, so these
tests check mechanics and accounting; ``test_heads_real_model.py`` checks that a head learns.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_auth_api import assert_error, template, tenancy_config

from polyray.config import ModelConfig, ServerConfig, Settings
from polyray.engine.engine import Engine
from polyray.heads.kinds import HeadKind
from polyray.heads.service import HeadService
from polyray.heads.store import HeadStore
from polyray.server import build_server
from polyray.tenancy.service import BootstrapKeys, Tenancy
from polyray.types import ModelRef

__all__ = ["template"]  # the module-scoped bootstrapped database, shared with test_auth_api

DIM = 16
TOPICS = ("sports", "cooking", "finance")


def classifier_examples(num_per_label: int = 8) -> list[dict[str, Any]]:
    return [
        {"text": f"{topic} example number {i} with a few words", "label": topic}
        for topic in TOPICS
        for i in range(num_per_label)
    ]


@dataclass
class HeadsApi:
    http: httpx.AsyncClient
    engine: Engine
    tenancy: Tenancy
    heads: HeadService
    alice: str  # client keys
    bob: str
    admin_key: str

    async def call(self, method: str, path: str, key: str, body: Any = None) -> httpx.Response:
        return await self.http.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})

    async def train(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.call("POST", "/v1/heads", key, body)
        assert response.status_code == 202, response.text
        accepted: dict[str, Any] = response.json()
        assert accepted["status"] in ("pending", "training") and accepted["progress"] < 1
        await asyncio.wait_for(self.heads.wait_idle(), 30)
        shown = await self.call("GET", f"/v1/heads/{accepted['id']}", key)
        assert shown.status_code == 200, shown.text
        head: dict[str, Any] = shown.json()
        assert head["status"] == "ready", head
        return head

    async def infer(self, key: str, body: dict[str, Any]) -> httpx.Response:
        return await self.call("POST", "/v1/infer", key, body)


@asynccontextmanager
async def serving(tmp_path: Path, template: tuple[Path, BootstrapKeys]) -> AsyncIterator[HeadsApi]:
    shutil.copyfile(template[0], tmp_path / "polyray.db")
    config = tenancy_config(tmp_path)
    settings = Settings(
        server=ServerConfig(max_items=64),
        models=(
            ModelConfig(name="minilm", version="1", backend="dummy", dim=DIM),
            ModelConfig(name="minilm", version="2", backend="dummy", dim=DIM),
        ),
        tenancy=config,
    )
    built = build_server(settings, warmup=False)
    tenancy, engine, app = built.tenancy, built.engine, built.app
    assert tenancy is not None
    keys = template[1]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30.0) as http:
            admin = {"Authorization": f"Bearer {keys.admin_key}"}
            client_keys = []
            for name in ("alice", "bob"):
                made = await http.post("/v1/admin/clients", json={"name": name}, headers=admin)
                if made.status_code != 201:  # a restart on the same database: the client exists
                    made = await http.post(f"/v1/admin/clients/{name}/rotate-key", headers=admin)
                assert made.status_code in (200, 201), made.text
                client_keys.append(made.json()["api_key"])
            heads = built.heads
            assert heads is not None and app.state.polyray.heads is heads
            yield HeadsApi(http, engine, tenancy, heads, client_keys[0], client_keys[1], keys.admin_key)


@pytest.fixture
async def api(tmp_path: Path, template: tuple[Path, BootstrapKeys]) -> AsyncIterator[HeadsApi]:
    async with serving(tmp_path, template) as served:
        yield served


async def test_train_a_classifier_and_infer_with_it(api: HeadsApi) -> None:
    head = await api.train(api.alice, {"name": "topics", "kind": "classifier", "examples": classifier_examples()})
    assert (head["owner"], head["ref"], head["model"], head["kind"]) == (
        "alice",
        "alice/topics",
        "minilm@2",
        "classifier",
    )
    assert head["labels"] == sorted(TOPICS) and head["num_examples"] == 24 and head["dim_in"] == DIM
    assert {"accuracy", "macro_f1", "baseline_accuracy", "num_train", "num_validation"} <= set(head["metrics"])
    response = await api.infer(
        api.alice,
        {"model": "minilm", "input": ["first text", "second text"], "heads": ["topics"], "return_embedding": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "minilm@2" and len(body["data"]) == 2
    expected = api.engine.runners[ModelRef("minilm", "2")].backend.tokenize(["first text", "second text"])
    for item, tokens in zip(body["data"], expected, strict=True):
        output = item["heads"]["topics"]
        assert set(output["scores"]) == set(TOPICS) and output["label"] in TOPICS
        assert sum(output["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert output["label"] == max(output["scores"], key=output["scores"].get)
        vector = api.engine.runners[ModelRef("minilm", "2")].backend.vector(tokens.ids)  # type: ignore[attr-defined]
        np.testing.assert_allclose(item["embedding"], vector, rtol=1e-6)
    assert float(response.headers["X-Polyray-Heads-Ms"]) > 0
    assert float(response.headers["X-Polyray-Compute-Ms"]) >= float(response.headers["X-Polyray-Heads-Ms"])


async def test_every_kind_applied_together_and_every_nanosecond_charged(api: HeadsApi) -> None:
    texts = [f"sentence {i} about {topic}" for i in range(6) for topic in TOPICS]
    await api.train(api.alice, {"name": "topics", "kind": "classifier", "examples": classifier_examples()})
    await api.train(
        api.alice,
        {
            "name": "tags",
            "kind": "multilabel",
            "examples": [
                {"text": t, "label": [t.split()[-1]] + (["even"] if i % 2 else [])} for i, t in enumerate(texts)
            ],
            "options": {"threshold": 0.4},
        },
    )
    await api.train(
        api.alice, {"name": "length", "kind": "regressor", "examples": [{"text": t, "label": len(t)} for t in texts]}
    )
    projection = await api.train(
        api.alice,
        {"name": "small", "kind": "projection", "examples": [{"text": t} for t in texts], "options": {"dimensions": 3}},
    )
    assert projection["dim_out"] == 3 and "explained_variance" in projection["metrics"]
    names = ["topics", "tags", "length", "alice/small", "topics"]  # a repeat is answered once
    response = await api.infer(api.alice, {"model": "minilm@2", "input": "one more text", "heads": names})
    assert response.status_code == 200, response.text
    outputs = response.json()["data"][0]["heads"]
    assert list(outputs) == ["topics", "tags", "length", "alice/small"]
    assert outputs["topics"]["label"] in TOPICS
    assert set(outputs["tags"]["scores"]) == {*TOPICS, "even"}
    assert all(outputs["tags"]["scores"][label] >= 0.4 for label in outputs["tags"]["labels"])
    assert isinstance(outputs["length"]["value"], float)
    assert len(outputs["alice/small"]["embedding"]) == 3
    # Charged compute = measured compute: forward passes and tokenization (engine), fits and head
    # applications (heads), summed over every client.
    await asyncio.sleep(0)
    assert api.tenancy.accounts.charged_compute_ns == api.engine.measured_compute_ns + api.heads.measured_heads_ns


async def test_private_heads_sharing_and_ownership(api: HeadsApi) -> None:
    await api.train(api.alice, {"name": "topics", "kind": "classifier", "examples": classifier_examples()})
    request = {"model": "minilm", "input": "text", "heads": ["alice/topics"]}
    assert_error(await api.infer(api.bob, request), 403, "forbidden", "head_not_shared")
    assert_error(await api.call("GET", "/v1/heads/alice/topics", api.bob), 403, "forbidden", "head_not_shared")
    assert (await api.call("GET", "/v1/heads", api.bob)).json()["data"] == []
    assert_error(await api.infer(api.bob, {**request, "heads": ["topics"]}), 404, "not_found", "head_not_found")
    shared = await api.call("POST", "/v1/heads/topics/share", api.alice, {"clients": ["bob"]})
    assert shared.status_code == 200 and shared.json()["shared_with"] == ["bob"]
    assert (await api.infer(api.bob, request)).status_code == 200
    assert [h["ref"] for h in (await api.call("GET", "/v1/heads", api.bob)).json()["data"]] == ["alice/topics"]
    # Shared is read-only: bob can neither change nor delete it.
    assert_error(await api.call("DELETE", "/v1/heads/alice/topics", api.bob), 403, "forbidden", "not_head_owner")
    assert_error(
        await api.call("POST", "/v1/heads/alice/topics/share", api.bob, {"clients": ["eve"]}), 403, "forbidden"
    )
    assert (await api.call("POST", "/v1/heads/topics/unshare", api.alice, {"clients": ["bob"]})).status_code == 200
    assert_error(await api.infer(api.bob, request), 403, "forbidden", "head_not_shared")
    deleted = await api.call("DELETE", "/v1/heads/topics", api.alice)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert_error(await api.infer(api.alice, {**request, "heads": ["topics"]}), 404, "not_found", "head_not_found")
    assert_error(await api.call("GET", "/v1/heads", api.admin_key), 403, "forbidden", "admin_key_not_allowed")


async def test_heads_are_bound_to_one_version_and_retrain_for_another(api: HeadsApi) -> None:
    head = await api.train(
        api.alice, {"name": "topics", "kind": "classifier", "model": "minilm@1", "examples": classifier_examples()}
    )
    assert head["model"] == "minilm@1"
    asks_v2 = {"model": "minilm@2", "input": "text", "heads": ["topics"]}
    error = assert_error(await api.infer(api.alice, asks_v2), 400, "invalid_request", "head_version_mismatch")
    assert "minilm@1" in error["message"] and "minilm@2" in error["message"]
    assert (await api.infer(api.alice, {**asks_v2, "model": "minilm@1"})).status_code == 200
    response = await api.call("POST", "/v1/heads/topics/retrain", api.alice, {"model": "minilm@2"})
    assert response.status_code == 202, response.text
    retrained = response.json()
    assert retrained["model"] == "minilm@2" and retrained["id"] != head["id"] and retrained["num_examples"] == 24
    await asyncio.wait_for(api.heads.wait_idle(), 30)
    assert (await api.infer(api.alice, asks_v2)).status_code == 200
    versions = {h["model"]: h["status"] for h in (await api.call("GET", "/v1/heads", api.alice)).json()["data"]}
    assert versions == {"minilm@1": "ready", "minilm@2": "ready"}
    by_version = await api.call("GET", "/v1/heads/topics?model=minilm@1", api.alice)
    assert by_version.json()["id"] == head["id"]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (
            {"name": "h", "kind": "classifier", "examples": [{"text": f"t{i}", "label": "a"} for i in range(12)]},
            400,
            "too_few_labels",
            None,
        ),
        ({"name": "h", "kind": "classifier", "examples": classifier_examples(1)}, 400, "too_few_examples", None),
        (
            {"name": "h", "kind": "regressor", "examples": [{"text": f"t{i}", "label": "high"} for i in range(12)]},
            400,
            "invalid_label",
            "examples[0].label",
        ),
        (
            {"name": "h", "kind": "classifier", "examples": [{"text": f"t{i}", "label": [1]} for i in range(12)]},
            400,
            "invalid_label",
            "examples[0].label",
        ),
        ({"name": "h", "kind": "tree", "examples": classifier_examples()}, 400, "invalid_head_kind", "kind"),
        (
            {"name": "Bad Name", "kind": "classifier", "examples": classifier_examples()},
            400,
            "invalid_head_name",
            "name",
        ),
        (
            {"name": "topics\n", "kind": "classifier", "examples": classifier_examples()},
            400,
            "invalid_head_name",
            "name",
        ),
        (
            {"name": "h", "kind": "classifier", "model": "nomodel", "examples": classifier_examples()},
            404,
            "model_not_found",
            "model",
        ),
        ({"name": "h", "kind": "classifier"}, 400, None, "examples"),
        ({"name": "h", "kind": "classifier", "examples": classifier_examples(), "extra": 1}, 400, None, "extra"),
        (
            {
                "name": "h",
                "kind": "projection",
                "examples": [{"text": f"t{i}"} for i in range(30)],
                "options": {"dimensions": 99},
            },
            400,
            "invalid_option",
            "options.dimensions",
        ),
        (
            {"name": "h", "kind": "classifier", "examples_jsonl": '{"text": "a", "label": "x"}\nnot json'},
            400,
            "invalid_jsonl",
            None,
        ),
    ],
)
async def test_bad_training_requests_are_4xx(
    api: HeadsApi, body: dict[str, Any], status: int, code: str | None, param: str | None
) -> None:
    error = assert_error(
        await api.call("POST", "/v1/heads", api.alice, body),
        status,
        "invalid_request" if status == 400 else "not_found",
        code,
    )
    if param is not None:
        assert error["param"] == param
    assert (await api.call("GET", "/v1/heads", api.alice)).json()["data"] == []  # nothing was stored


async def test_duplicate_names_unknown_heads_and_bad_infer_bodies(api: HeadsApi) -> None:
    body = {"name": "topics", "kind": "classifier", "examples": classifier_examples()}
    await api.train(api.alice, body)
    assert_error(await api.call("POST", "/v1/heads", api.alice, body), 400, "invalid_request", "head_exists")
    ok = {"model": "minilm", "input": "text", "heads": ["topics"]}
    assert_error(await api.infer(api.alice, {**ok, "heads": ["nohead"]}), 404, "not_found", "head_not_found")
    assert_error(await api.infer(api.alice, {**ok, "heads": ["head-000000000000000000000000"]}), 404, "not_found")
    lookalike = {**body, "name": "head-1"}  # a name that looks like an id is still a name
    await api.train(api.alice, lookalike)
    assert (await api.infer(api.alice, {**ok, "heads": ["head-1", "alice/head-1"]})).status_code == 200
    assert_error(await api.infer(api.alice, {**ok, "input": []}), 400, "invalid_request")
    assert_error(await api.infer(api.alice, {**ok, "heads": "topics"}), 400, "invalid_request")
    assert_error(await api.infer(api.alice, {**ok, "model": "minilm@9"}), 404, "not_found", "model_not_found")
    assert_error(await api.infer(api.alice, {**ok, "verbose": True}), 400, "invalid_request")
    no_heads = await api.infer(api.alice, {**ok, "heads": [], "return_embedding": True})
    assert no_heads.status_code == 200 and len(no_heads.json()["data"][0]["embedding"]) == DIM


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"return_embedding": "yes"}, "return_embedding", id="bool-as-string"),
        pytest.param({"return_embedding": 1}, "return_embedding", id="bool-as-int"),
        pytest.param({"input": "\u200b\u200b"}, "input", id="zero-width-only"),
        pytest.param({"input": "\u0000"}, "input", id="nul-only"),
        pytest.param({"input": ["fine", "\ufeff \u2060"]}, "input[1]", id="invisible-item"),
    ],
)
async def test_infer_validates_as_strictly_as_embeddings(api: HeadsApi, fields: dict[str, Any], param: str) -> None:
    """The same body is refused by /v1/infer and /v1/embeddings, with the same param named."""
    infer = {"model": "minilm", "input": "text", "heads": [], **fields}
    assert assert_error(await api.infer(api.alice, infer), 400, "invalid_request")["param"] == param
    if "input" in fields:
        embeddings = {"model": "minilm", "input": fields["input"]}
        refused = await api.call("POST", "/v1/embeddings", api.alice, embeddings)
        assert assert_error(refused, 400, "invalid_request")["param"] == param


async def test_a_head_not_yet_trained_is_refused_and_a_restart_resumes_its_training(
    tmp_path: Path, template: tuple[Path, BootstrapKeys]
) -> None:
    async with serving(tmp_path, template) as api:
        store = HeadStore(api.tenancy.db)
        rows = [(e["text"], e["label"]) for e in classifier_examples()]
        # Stored pending behind the service's back, as a server stopped mid-job leaves it.
        spec = await asyncio.to_thread(
            store.create, "alice", "later", HeadKind.CLASSIFIER, ModelRef("minilm", "2"), {}, rows
        )
        # The index notices the store's change counter on its next refresh: poll (generous bound)
        # until the head is known rather than sleep past one refresh interval and hope.
        deadline = time.monotonic() + 10.0
        while (
            response := await api.infer(api.alice, {"model": "minilm", "input": "x", "heads": ["later"]})
        ).status_code == 404:
            assert time.monotonic() < deadline, "the head index never noticed the stored head"
            await asyncio.sleep(0.05)
        error = assert_error(response, 400, "invalid_request")
        assert error["code"] == "head_not_ready" and "pending" in error["message"]
    shutil.copyfile(tmp_path / "polyray.db", tmp_path / "kept.db")
    template_again = (tmp_path / "kept.db", template[1])
    restarted = tmp_path / "restart"
    restarted.mkdir()
    async with serving(restarted, template_again) as api:  # a new server on the same database
        await asyncio.wait_for(api.heads.wait_idle(), 30)
        head = (await api.call("GET", f"/v1/heads/{spec.head_id}", api.alice)).json()
        assert head["status"] == "ready"
