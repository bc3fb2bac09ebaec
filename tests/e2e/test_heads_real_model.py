"""A topic head trained through HTTP on the real model and the shipped data set, then used to infer.

A real uvicorn server (real MiniLM, tenancy on SQLite) and plain HTTP: upload the 360 labelled
sentences, watch the job's progress, check its held-out accuracy, then classify sentences the
head never saw, together with a projection head in the same request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_support import serve_in_thread

from polyray.config import ModelConfig, Settings, TenancyConfig
from polyray.heads.datasets import load_topics
from polyray.server import build_server

pytestmark = pytest.mark.model

UNSEEN = {
    "The goalkeeper saved a penalty in the last minute and the fans stormed the pitch.": "sports",
    "Simmer the onions slowly in butter until they turn golden and sweet.": "cooking",
    "The central bank raised interest rates again to cool down inflation.": "finance",
    "Regular exercise and enough sleep lower the risk of heart disease.": "health",
    "We caught an overnight train across the mountains and woke up by the sea.": "travel",
    "The new phone ships with a faster chip and a software update for the camera.": "technology",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    home = tmp_path_factory.mktemp("heads-real")
    config = TenancyConfig(database_url=f"sqlite:///{home}/polyray.db", spool_path=str(home / "spool.jsonl"))
    settings = Settings(models=(ModelConfig(name="minilm", version="1", threads=2),), tenancy=config)
    built = build_server(settings)
    assert built.tenancy is not None and built.tenancy.bootstrap_keys is not None
    keys = built.tenancy.bootstrap_keys
    with serve_in_thread(built) as url:
        yield url, keys.client_key


def wait_ready(http: httpx.Client, head_id: str, timeout_s: float = 120.0) -> tuple[dict[str, Any], list[float]]:
    """Poll the head until it is ready; returns it and the progress values seen on the way."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        head: dict[str, Any] = http.get(f"/v1/heads/{head_id}").json()
        seen.append(head["progress"])
        assert head["status"] != "failed", head
        if head["status"] == "ready":
            return head, seen
        time.sleep(0.1)
    raise AssertionError(f"head {head_id} not ready in {timeout_s} s")


def test_topic_head_learns_the_shipped_data_set_and_classifies_unseen_text(server: tuple[str, str]) -> None:
    url, key = server
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        examples = load_topics()
        accepted = http.post("/v1/heads", json={"name": "topics", "kind": "classifier", "examples": examples})
        assert accepted.status_code == 202, accepted.text
        head, progress = wait_ready(http, accepted.json()["id"])
        assert progress == sorted(progress) and progress[-1] == 1.0  # progress only moves forward
        metrics = head["metrics"]
        assert metrics["num_validation"] == 72 and metrics["num_train"] == 288
        assert metrics["accuracy"] >= 0.85 and metrics["baseline_accuracy"] <= 0.2, metrics
        accepted = http.post(
            "/v1/heads",
            json={
                "name": "compact",
                "kind": "projection",
                "examples": [{"text": e["text"]} for e in examples],
                "options": {"dimensions": 16},
            },
        )
        assert accepted.status_code == 202, accepted.text
        wait_ready(http, accepted.json()["id"])

        response = http.post(
            "/v1/infer", json={"model": "minilm", "input": list(UNSEEN), "heads": ["topics", "compact"]}
        )
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        predicted = [item["heads"]["topics"]["label"] for item in data]
        correct = sum(p == truth for p, truth in zip(predicted, UNSEEN.values(), strict=True))
        assert correct >= 5, list(zip(predicted, UNSEEN.values(), strict=True))
        assert all(len(item["heads"]["compact"]["embedding"]) == 16 for item in data)
        assert float(response.headers["X-Polyray-Heads-Ms"]) < float(response.headers["X-Polyray-Inference-Ms"])
