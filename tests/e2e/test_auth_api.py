"""Keys, the admin API, quotas and usage over HTTP: the real app with tenancy on a SQLite file.

The app runs in process through ``httpx.ASGITransport``; its lifespan (engine, client directory
and usage ledger) is entered explicitly, since ASGITransport does not run it. One test drives a
real uvicorn server with the OpenAI SDK.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import serve_in_thread

from polyray.backends.dummy import DummyBackend
from polyray.config import ConfigError, ModelConfig, ServerConfig, Settings, TenancyConfig, parse_settings
from polyray.engine.engine import Engine
from polyray.server import Server, build_server
from polyray.tenancy.service import FIRST_CLIENT, BootstrapKeys, Tenancy
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")
ROUTE = "/v1/embeddings"
DIM = 16


@dataclass
class Served:
    http: httpx.AsyncClient
    engine: Engine
    tenancy: Tenancy
    client_key: str  # the bootstrap client "default"
    admin_key: str

    @property
    def backend(self) -> DummyBackend:
        backend = self.engine.runners[REF].backend
        assert isinstance(backend, DummyBackend)
        return backend

    def tokens(self, texts: list[str]) -> int:
        return sum(len(t.ids) for t in self.backend.tokenize(texts))

    async def embed(self, key: str | None, texts: list[str] | str = "hello world") -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return await self.http.post(ROUTE, json={"model": "minilm", "input": texts}, headers=headers)

    async def admin(self, method: str, path: str, body: Any = None, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return await self.http.request(method, f"/v1/admin{path}", json=body, headers=headers)

    async def create_client(self, name: str, **fields: Any) -> str:
        response = await self.admin("POST", "/clients", {"name": name, **fields})
        assert response.status_code == 201, response.text
        return str(response.json()["api_key"])


def tenancy_config(tmp_path: Path) -> TenancyConfig:
    return TenancyConfig(
        database_url=f"sqlite:///{tmp_path}/polyray.db",
        spool_path=str(tmp_path / "usage-spool.jsonl"),
        refresh_interval_s=60.0,  # the admin API refreshes at once; nothing else changes the database here
        flush_interval_s=0.05,
    )


def settings_for(config: TenancyConfig, server: ServerConfig | None = None) -> Settings:
    return Settings(
        server=server or ServerConfig(max_items=16),
        models=(ModelConfig(name="minilm", version="1", backend="dummy", dim=DIM),),
        tenancy=config,
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BootstrapKeys]:
    """A bootstrapped database made once; each test serves a copy (creating one costs a migration)."""
    where = tmp_path_factory.mktemp("template")
    tenancy = Tenancy.open(tenancy_config(where))
    keys = tenancy.bootstrap_keys
    assert keys is not None
    tenancy.db.dispose()
    return where / "polyray.db", keys


def open_copy(
    tmp_path: Path, template: tuple[Path, BootstrapKeys], server: ServerConfig | None = None
) -> tuple[Server, Tenancy]:
    """A server built as ``polyray serve`` builds it, over a copy of the bootstrapped database."""
    shutil.copyfile(template[0], tmp_path / "polyray.db")
    built = build_server(settings_for(tenancy_config(tmp_path), server), warmup=False)
    assert built.tenancy is not None
    assert built.tenancy.bootstrap_keys is None  # not empty: no new keys
    return built, built.tenancy


@asynccontextmanager
async def serving(
    tmp_path: Path, template: tuple[Path, BootstrapKeys], server: ServerConfig | None = None
) -> AsyncIterator[Served]:
    built, tenancy = open_copy(tmp_path, template, server)
    keys = template[1]
    app = built.app
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10.0) as http:
            yield Served(http, built.engine, tenancy, keys.client_key, keys.admin_key)


@pytest.fixture
async def api(tmp_path: Path, template: tuple[Path, BootstrapKeys]) -> AsyncIterator[Served]:
    async with serving(tmp_path, template) as served:
        yield served


def assert_error(response: httpx.Response, status: int, kind: str, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert error["type"] == kind, error
    if code is not None:
        assert error["code"] == code, error
    assert isinstance(error["message"], str) and len(error["message"]) >= 10
    return error


# -- authentication ----------------------------------------------------------------------------


async def test_client_key_works(api: Served) -> None:
    response = await api.embed(api.client_key, ["hello", "world"])
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2


async def test_no_key_is_401_with_www_authenticate(api: Served) -> None:
    response = await api.embed(None)
    assert_error(response, 401, "unauthenticated", "missing_api_key")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Bearer pk-c00000000_not-a-real-key", id="unknown-key"),
        pytest.param("Bearer ", id="empty-bearer"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic-scheme"),
    ],
)
async def test_wrong_key_is_401(api: Served, header: str) -> None:
    response = await api.http.post(ROUTE, json={"model": "minilm", "input": "x"}, headers={"Authorization": header})
    assert_error(response, 401, "unauthenticated")
    assert "WWW-Authenticate" in response.headers


@pytest.mark.parametrize("header", [None, "Bearer pk-c00000000_not-a-real-key"])
async def test_401_says_how_to_send_a_key(api: Served, header: str | None) -> None:
    """Every way to pass a key, by its one name: the header, the CLI/SDK option and the variable."""
    headers = {"Authorization": header} if header else {}
    for response in (
        await api.http.post(ROUTE, json={"model": "minilm", "input": "x"}, headers=headers),
        await api.http.get("/v1/admin/clients", headers=headers),
        await api.http.get("/v1/usage", headers=headers),
    ):
        message = assert_error(response, 401, "unauthenticated")["message"]
        for needed in ("Authorization: Bearer <key>", "--key", "POLYRAY_API_KEY"):
            assert needed in message, message


async def test_key_of_a_disabled_client_is_403_from_the_next_request(api: Served) -> None:
    key = await api.create_client("team")
    assert (await api.embed(key)).status_code == 200
    response = await api.admin("PATCH", "/clients/team", {"disabled": True})
    assert response.status_code == 200, response.text
    assert response.json()["disabled"] is True
    assert_error(await api.embed(key), 403, "forbidden", "client_disabled")
    assert (await api.embed(api.client_key)).status_code == 200  # others are unaffected
    assert (await api.admin("PATCH", "/clients/team", {"disabled": False})).status_code == 200
    assert (await api.embed(key)).status_code == 200


async def test_admin_key_cannot_spend_compute(api: Served) -> None:
    assert_error(await api.embed(api.admin_key), 403, "forbidden", "admin_key_not_allowed")


async def test_client_key_cannot_reach_admin_routes(api: Served) -> None:
    for method, path, body in (
        ("GET", "/clients", None),
        ("POST", "/clients", {"name": "sneaky"}),
        ("GET", f"/clients/{FIRST_CLIENT}", None),
        ("PATCH", f"/clients/{FIRST_CLIENT}", {"share": 100.0}),
        ("POST", f"/clients/{FIRST_CLIENT}/rotate-key", None),
        ("GET", "/usage", None),
        ("GET", "/models/minilm/batching", None),
        ("POST", "/models/minilm/fit", None),
    ):
        response = await api.admin(method, path, body, key=api.client_key)
        assert_error(response, 403, "forbidden", "admin_only")
    clients = (await api.admin("GET", "/clients")).json()["data"]
    assert [c["name"] for c in clients] == [FIRST_CLIENT]
    assert clients[0]["share"] == 1.0


async def test_admin_batching_routes(api: Served) -> None:
    report = (await api.admin("GET", "/models/minilm/batching")).json()
    assert report["model"] == "minilm@1" and report["fitted"] is False  # the dummy backend is not fitted
    assert report["budget_tokens"] == 4096 and report["decision"] is None
    assert_error(await api.admin("POST", "/models/minilm/fit"), 400, "invalid_request", "budget_fit_disabled")
    assert_error(await api.admin("GET", "/models/nomodel/batching"), 404, "not_found", "model_not_found")


async def test_admin_routes_without_a_key_are_401(api: Served) -> None:
    response = await api.http.get("/v1/admin/clients")
    assert_error(response, 401, "unauthenticated")


async def test_models_list_needs_a_key(api: Served) -> None:
    assert_error(await api.http.get("/v1/models"), 401, "unauthenticated")


async def test_health_needs_no_key(api: Served) -> None:
    assert (await api.http.get("/healthz")).status_code == 200
    assert (await api.http.get("/readyz")).status_code == 200


# -- usage -------------------------------------------------------------------------------------


async def test_a_client_reads_exactly_its_own_usage(api: Served) -> None:
    alice = await api.create_client("alice")
    sent = [["one text"], ["two texts", "here they are"], ["a third request with more words in it"]]
    for texts in sent:
        assert (await api.embed(alice, texts)).status_code == 200
    assert (await api.embed(api.client_key, ["someone else's request"])).status_code == 200

    response = await api.http.get("/v1/usage", headers={"Authorization": f"Bearer {alice}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "usage" and body["by"] == "client"
    (row,) = body["data"]
    assert row["client"] == "alice"
    assert row["num_requests"] == 3
    assert row["num_texts"] == 4
    assert row["num_tokens"] == api.tokens([t for texts in sent for t in texts])
    assert row["num_cached"] == 0
    assert row["compute_s"] > 0

    own = await api.http.get("/v1/usage?client=alice", headers={"Authorization": f"Bearer {alice}"})
    assert own.status_code == 200 and own.json()["data"] == body["data"]


async def test_a_client_cannot_read_another_clients_usage(api: Served) -> None:
    alice = await api.create_client("alice")
    assert (await api.embed(api.client_key)).status_code == 200
    response = await api.http.get(f"/v1/usage?client={FIRST_CLIENT}", headers={"Authorization": f"Bearer {alice}"})
    assert_error(response, 403, "forbidden", "not_your_usage")
    response = await api.http.get("/v1/usage?client=nobody", headers={"Authorization": f"Bearer {alice}"})
    assert_error(response, 403, "forbidden", "not_your_usage")
    assert_error(await api.http.get("/v1/usage"), 401, "unauthenticated")


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("since=-1000000d", id="before-year-1"),
        pytest.param("since=-99999999999d", id="huge"),
        pytest.param("since=-%C2%B2d", id="superscript-digit"),
        pytest.param("since=-" + "9" * 5000 + "d", id="5000-digits"),
        pytest.param("until=0001-01-01T00:00%2B01:00", id="offset-before-year-1"),
        pytest.param("until=%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%94-01-01", id="fullwidth-digits"),
    ],
)
async def test_out_of_range_or_odd_times_are_400_naming_the_param(api: Served, query: str) -> None:
    for key in (api.client_key, api.admin_key):
        response = await api.http.get(f"/v1/usage?{query}", headers={"Authorization": f"Bearer {key}"})
        error = assert_error(response, 400, "invalid_request")
        assert error["param"] == query.split("=")[0], error


async def test_admin_reads_all_usage(api: Served) -> None:
    alice = await api.create_client("alice")
    assert (await api.embed(alice, ["a", "b"])).status_code == 200
    assert (await api.embed(api.client_key, ["c"])).status_code == 200
    response = await api.admin("GET", "/usage")
    assert response.status_code == 200, response.text
    rows = {r["client"]: r for r in response.json()["data"]}
    assert set(rows) == {"alice", FIRST_CLIENT}
    assert (rows["alice"]["num_texts"], rows[FIRST_CLIENT]["num_texts"]) == (2, 1)
    by_model = (await api.admin("GET", "/usage?by=model")).json()["data"]
    assert [(r["model"], r["num_requests"]) for r in by_model] == [("minilm@1", 2)]
    one = (await api.admin("GET", "/usage?client=alice")).json()["data"]
    assert [r["client"] for r in one] == ["alice"]
    # An admin may also ask /v1/usage for anyone.
    anyone = await api.http.get("/v1/usage?client=alice", headers={"Authorization": f"Bearer {api.admin_key}"})
    assert anyone.status_code == 200 and anyone.json()["data"] == one
    assert_error(await api.admin("GET", "/usage?by=week"), 400, "invalid_request")
    assert_error(await api.admin("GET", "/usage?since=yesterday"), 400, "invalid_request")
    future = (await api.admin("GET", "/usage?since=2999-01-01")).json()["data"]
    assert future == []


# -- the admin API -----------------------------------------------------------------------------


async def test_admin_create_list_show_patch(api: Served) -> None:
    response = await api.admin(
        "POST",
        "/clients",
        {"name": "search", "share": 2.0, "requests_per_s": 5, "max_concurrent": 3},
    )
    assert response.status_code == 201, response.text
    made = response.json()
    key = made.pop("api_key")
    assert key.startswith("pk-c")
    assert made == {
        "name": "search",
        "priority": "batch",
        "share": 2.0,
        "weight": 2.0,
        "disabled": False,
        "quota": {"requests_per_s": 5.0, "tokens_per_s": None, "max_concurrent": 3, "daily_compute_s": None},
    }
    assert (await api.embed(key)).status_code == 200  # usable at once

    listed = (await api.admin("GET", "/clients")).json()
    assert listed["object"] == "list"
    assert [c["name"] for c in listed["data"]] == [FIRST_CLIENT, "search"]

    shown = await api.admin("GET", "/clients/search")
    assert shown.status_code == 200
    assert key not in shown.text and key.split("_", 1)[1] not in shown.text  # the key is never shown again
    (key_view,) = shown.json()["keys"]
    assert key.startswith(key_view["prefix"]) and key_view["revoked_at"] is None

    patched = await api.admin("PATCH", "/clients/search", {"tokens_per_s": 1000, "requests_per_s": None})
    assert patched.status_code == 200, patched.text
    assert patched.json()["quota"] == {
        "requests_per_s": None,  # sent as null: unlimited
        "tokens_per_s": 1000.0,
        "max_concurrent": 3,  # not sent: unchanged
        "daily_compute_s": None,
    }
    assert patched.json()["share"] == 2.0
    again = (await api.admin("GET", "/clients/search")).json()
    assert again["quota"] == patched.json()["quota"]
    halved = (await api.admin("PATCH", "/clients/search", {"share": 0.5})).json()
    assert (halved["share"], halved["weight"]) == (0.5, 0.5)

    assert_error(await api.admin("GET", "/clients/absent"), 404, "not_found", "client_not_found")
    assert_error(await api.admin("PATCH", "/clients/absent", {"share": 2.0}), 404, "not_found")


async def test_admin_sets_priority_on_create(api: Served) -> None:
    response = await api.admin("POST", "/clients", {"name": "ui", "priority": "interactive", "share": 2.0})
    assert response.status_code == 201, response.text
    assert (response.json()["priority"], response.json()["weight"]) == ("interactive", 8.0)


async def test_admin_changes_priority(api: Served) -> None:
    response = await api.admin("PATCH", f"/clients/{FIRST_CLIENT}", {"priority": "batch"})
    assert response.status_code == 200, response.text
    assert response.json()["priority"] == "batch"
    shown = (await api.admin("GET", f"/clients/{FIRST_CLIENT}")).json()
    assert shown["priority"] == "batch" and shown["weight"] == 1.0


async def test_rotate_key(api: Served) -> None:
    old = await api.create_client("team")
    response = await api.admin("POST", "/clients/team/rotate-key")
    assert response.status_code == 200, response.text
    new = response.json()["api_key"]
    assert new != old
    assert_error(await api.embed(old), 401, "unauthenticated", "invalid_api_key")
    assert (await api.embed(new)).status_code == 200
    keys = (await api.admin("GET", "/clients/team")).json()["keys"]
    assert [k["revoked_at"] is not None for k in keys] == [True, False]
    assert_error(await api.admin("POST", "/clients/absent/rotate-key"), 404, "not_found")


INVALID_CREATE = [
    pytest.param({"name": "x", "bogus": 1}, "bogus", id="unknown-field"),
    pytest.param({"name": "x", "requests_per_s": -1}, "requests_per_s", id="negative-requests"),
    pytest.param({"name": "x", "tokens_per_s": 0}, "tokens_per_s", id="zero-tokens"),
    pytest.param({"name": "x", "max_concurrent": 0}, "max_concurrent", id="zero-concurrent"),
    pytest.param({"name": "x", "max_concurrent": 1.5}, "max_concurrent", id="fractional-concurrent"),
    pytest.param({"name": "x", "daily_compute_s": -5.0}, "daily_compute_s", id="negative-budget"),
    pytest.param({"name": "x", "priority": "urgent"}, "priority", id="bad-priority"),
    pytest.param({"name": "x", "share": 0}, "share", id="zero-share"),
    pytest.param({"name": "x", "share": "2"}, "share", id="string-share"),
    pytest.param({"name": 5}, "name", id="name-int"),
    pytest.param({}, "name", id="no-name"),
    pytest.param({"name": "Has Spaces"}, "name", id="bad-name"),
    pytest.param({"name": "a" * 64}, "name", id="long-name"),
    pytest.param({"name": "alice\n"}, "name", id="trailing-newline"),
    pytest.param({"name": "x", "share": 1e308}, "share", id="share-overflows-the-weight"),
    pytest.param({"name": "x", "tokens_per_s": 1.7e308}, "tokens_per_s", id="rate-near-float-max"),
    pytest.param({"name": "alice\r\n"}, "name", id="trailing-crlf"),
    pytest.param([{"name": "x"}], None, id="array-body"),
]


@pytest.mark.parametrize(("body", "param"), INVALID_CREATE)
async def test_invalid_create_bodies_are_400(api: Served, body: Any, param: str | None) -> None:
    error = assert_error(await api.admin("POST", "/clients", body), 400, "invalid_request")
    if param is not None:
        assert error["param"] == param, error
    assert [c["name"] for c in (await api.admin("GET", "/clients")).json()["data"]] == [FIRST_CLIENT]


async def test_invalid_json_and_duplicates_are_400(api: Served) -> None:
    response = await api.http.post(
        "/v1/admin/clients",
        content=b'{"name": ',
        headers={"Authorization": f"Bearer {api.admin_key}", "Content-Type": "application/json"},
    )
    assert_error(response, 400, "invalid_request")
    assert_error(await api.admin("POST", "/clients", {"name": FIRST_CLIENT}), 400, "invalid_request", "client_exists")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"max_concurrent": 0}, id="zero-concurrent"),
        pytest.param({"share": -1}, id="negative-share"),
        pytest.param({"disabled": "yes"}, id="disabled-string"),
        pytest.param({"priority": "vip"}, id="bad-priority"),
        pytest.param({"name": "renamed"}, id="unknown-field"),
    ],
)
async def test_invalid_patch_bodies_are_400(api: Served, body: dict[str, Any]) -> None:
    assert_error(await api.admin("PATCH", f"/clients/{FIRST_CLIENT}", body), 400, "invalid_request")
    client = (await api.admin("GET", f"/clients/{FIRST_CLIENT}")).json()
    assert client["disabled"] is False and client["share"] == 1.0 and client["priority"] == "interactive"


# -- /metrics: per-client series are tenants' data ---------------------------------------------


def client_series(text: str) -> set[str]:
    """Names of the client-labelled samples in a Prometheus text page."""
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "client" in sample.labels or sample.name.startswith("polyray_client_")
    }


async def test_per_client_metrics_need_an_admin_key(api: Served) -> None:
    assert (await api.embed(api.client_key)).status_code == 200
    admin = await api.http.get("/metrics", headers={"Authorization": f"Bearer {api.admin_key}"})
    assert admin.status_code == 200
    assert {"polyray_client_requests_total", "polyray_client_compute_seconds_total"} <= client_series(admin.text)
    assert FIRST_CLIENT in admin.text
    for headers in ({}, {"Authorization": f"Bearer {api.client_key}"}):
        public = await api.http.get("/metrics", headers=headers)
        assert public.status_code == 200
        assert client_series(public.text) == set()
        assert "polyray_client_" not in public.text and FIRST_CLIENT not in public.text
        assert "polyray_requests_total" in public.text  # the aggregate series are all there
    assert_error(await api.http.get("/metrics", headers={"Authorization": "Bearer pk-nope"}), 401, "unauthenticated")


async def test_metrics_auth_none_shows_every_series_to_anyone(
    tmp_path: Path, template: tuple[Path, BootstrapKeys]
) -> None:
    async with serving(tmp_path, template, server=ServerConfig(max_items=16, metrics_auth="none")) as open_api:
        assert (await open_api.embed(open_api.client_key)).status_code == 200
        page = await open_api.http.get("/metrics")
        assert page.status_code == 200
        assert "polyray_client_requests_total" in client_series(page.text)


def test_metrics_auth_is_checked() -> None:
    with pytest.raises(ConfigError, match="metrics_auth"):
        parse_settings({"server": {"metrics_auth": "clients"}})


# -- quotas over HTTP --------------------------------------------------------------------------


async def test_requests_per_s_is_429_with_retry_after_naming_the_limit(api: Served) -> None:
    key = await api.create_client("limited", requests_per_s=0.001)
    first = await api.embed(key)
    assert first.status_code == 200, first.text
    limited = None
    for _ in range(2):
        response = await api.embed(key)
        if response.status_code == 429:
            limited = response
            break
        assert response.status_code == 200, response.text
    assert limited is not None, "the second or third request within a millisecond must be refused"
    error = assert_error(limited, 429, "rate_limited", "requests_per_s")
    assert "requests_per_s=0.001" in error["message"]
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await api.embed(api.client_key)).status_code == 200  # other clients are not limited

    # Lifting the limit takes effect at once.
    patched = await api.admin("PATCH", "/clients/limited", {"requests_per_s": None})
    assert patched.status_code == 200, patched.text
    for _ in range(3):
        assert (await api.embed(key)).status_code == 200


async def test_max_concurrent_is_429(api: Served) -> None:
    key = await api.create_client("one-at-a-time", max_concurrent=1)
    quotas = api.tenancy.accounts.quotas
    # Hold one request in flight by occupying the worker (a slow backend).
    api.backend.seconds_per_token = 0.05
    slow = asyncio.create_task(api.embed(key, ["a slow request of several words"]))
    deadline = time.monotonic() + 5
    while quotas.num_in_flight("one-at-a-time") == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    response = await api.embed(key)
    error = assert_error(response, 429, "rate_limited", "max_concurrent")
    assert "max_concurrent=1" in error["message"]
    assert "Retry-After" in response.headers
    api.backend.seconds_per_token = 0.0
    assert (await slow).status_code == 200
    assert (await api.embed(key)).status_code == 200


async def test_refused_requests_are_not_in_usage(api: Served) -> None:
    key = await api.create_client("limited", requests_per_s=0.001)
    statuses = [(await api.embed(key, ["counted"])).status_code for _ in range(4)]
    assert statuses.count(429) >= 2
    rows = (await api.admin("GET", "/usage?client=limited")).json()["data"]
    assert rows[0]["num_requests"] == statuses.count(200)


# -- the OpenAI SDK against a real server ------------------------------------------------------


@pytest.fixture
def real_server(tmp_path: Path, template: tuple[Path, BootstrapKeys]) -> Iterator[tuple[str, str]]:
    built, _ = open_copy(tmp_path, template)
    with serve_in_thread(built, start_timeout_s=30) as url:
        yield url, template[1].client_key


def test_openai_sdk_with_a_client_key(real_server: tuple[str, str]) -> None:
    base_url, key = real_server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    result = client.embeddings.create(model="minilm", input=["hello there", "second text"])
    assert [len(d.embedding) for d in result.data] == [DIM, DIM]
    assert result.model == "minilm@1"
    assert result.usage.prompt_tokens == 4 + 4
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="pk-c00000000_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model="minilm", input="hello")
