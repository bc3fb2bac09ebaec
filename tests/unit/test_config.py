"""Settings from TOML: defaults, overrides, bounds, the environment mapping, errors that name
what is wrong, and the documented defaults held to the code."""

from __future__ import annotations

import ast
import os
import re
import textwrap
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_type_hints

import pytest

import polyray
from polyray import config as config_module
from polyray.cache.config import CacheConfig
from polyray.config import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    LIMITS,
    PACKAGED_MODEL,
    ConfigError,
    Environment,
    ModelConfig,
    ServerConfig,
    Settings,
    TenancyConfig,
    data_dir,
    default_threads,
    load_settings,
    parse_settings,
    read_environment,
    settable_keys,
)
from polyray.policies import AdmissionPolicy, BatchPolicy, FairnessPolicy

ROOT = Path(__file__).resolve().parents[2]
SECTIONS: dict[str, Any] = {
    "server": ServerConfig,
    "batching": BatchPolicy,
    "models": ModelConfig,
    "tenancy": TenancyConfig,
    "fairness": FairnessPolicy,
    "cache": CacheConfig,
    "admission": AdmissionPolicy,
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "polyray.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_no_path_and_no_environment_give_the_built_in_defaults() -> None:
    settings = load_settings(environ={})
    assert settings.server.port == 8000 and settings.server.request_timeout_s == 60.0
    assert settings.batching.budget_tokens == 4096 and settings.tenancy.auth == "keys"
    assert len(settings.models) == 1
    model = settings.models[0]
    assert (model.cache_dir, model.int8_weight_bits, model.reuse_budget_fit) == (None, None, True)
    assert (model.name, model.version, model.path, model.backend) == (
        DEFAULT_MODEL_NAME,
        DEFAULT_MODEL_VERSION,
        PACKAGED_MODEL,
        "torch",
    )


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), environ={}) == Settings()


def test_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
port = 9000
max_items = 4
max_queue_items = 10
request_timeout_s = 1.5
truncate = false

[batching]
budget_tokens = 512
max_wait_ms = 0.5

[[models]]
name = "minilm"
version = "2"
backend = "dummy"
dim = 8

[[models]]
name = "other"
version = "1"
path = "/models/x"
threads = 3
""",
    )
    settings = load_settings(str(path))
    assert settings.server == ServerConfig(
        port=9000, max_items=4, max_queue_items=10, request_timeout_s=1.5, truncate=False
    )
    assert settings.batching == BatchPolicy(budget_tokens=512, max_wait_ms=0.5)
    assert settings.models == (
        ModelConfig(name="minilm", version="2", backend="dummy", dim=8),
        ModelConfig(name="other", version="1", path="/models/x", threads=3),
    )


def test_partial_section_keeps_other_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[batching]\nmax_batch_size = 8\n"))
    assert settings.batching == BatchPolicy(max_batch_size=8)
    assert settings.server == ServerConfig()
    assert settings.models == (ModelConfig(),)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[server]\nprot = 1\n", "prot"),
        ("[batching]\nbudget = 1\n", "budget"),
        ('[[models]]\nname = "a"\nweights = "x"\n', "weights"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(write(tmp_path, text))


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown sections: caching"):
        load_settings(write(tmp_path, "[caching]\nsize = 1\n"))


def test_section_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server"):
        load_settings(write(tmp_path, "server = 1\n"))


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")


def test_duplicate_name_and_version(tmp_path: Path) -> None:
    text = '[[models]]\nname = "m"\nversion = "1"\n\n[[models]]\nname = "m"\nversion = "1"\nbackend = "dummy"\n'
    with pytest.raises(ConfigError, match="twice"):
        load_settings(write(tmp_path, text))


def test_same_name_other_version_is_fine(tmp_path: Path) -> None:
    text = '[[models]]\nname = "m"\nversion = "1"\n\n[[models]]\nname = "m"\nversion = "2"\n'
    settings = load_settings(write(tmp_path, text))
    assert [(m.name, m.version) for m in settings.models] == [("m", "1"), ("m", "2")]


def test_unknown_backend(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown backend 'tensorrt' \(torch, onnx, dummy\)"):
        load_settings(write(tmp_path, '[[models]]\nname = "m"\nbackend = "tensorrt"\n'))


@pytest.mark.parametrize(("name", "version"), [("", "1"), ("m@x", "1"), ("m", ""), ("m", "1@2")])
def test_bad_model_name_or_version(tmp_path: Path, name: str, version: str) -> None:
    with pytest.raises(ConfigError, match="name and version"):
        load_settings(write(tmp_path, f'[[models]]\nname = "{name}"\nversion = "{version}"\n'))


def test_empty_models_list() -> None:
    with pytest.raises(ConfigError, match="at least one model"):
        parse_settings({"models": []})


@pytest.mark.parametrize("key", ["budget_tokens", "max_batch_size", "window"])
def test_invalid_batch_policy_value(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="batching"):
        load_settings(write(tmp_path, f"[batching]\n{key} = 0\n"))


def test_default_threads_are_the_cores_this_process_may_use() -> None:
    assert default_threads() == len(os.sched_getaffinity(0))


def test_wrong_typed_value_is_rejected(tmp_path: Path) -> None:
    # max_queue_items = "10" loads as the string "10"; EntryQueue.push then raises TypeError on the first request.
    with pytest.raises(ConfigError, match="max_queue_items"):
        load_settings(write(tmp_path, '[server]\nmax_queue_items = "10"\n'))


def test_request_larger_than_the_queue_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nmax_items = 100\nmax_queue_items = 10\n")
    with pytest.raises(ConfigError, match="max_items must not exceed max_queue_items"):
        load_settings(str(path))


# -- bounds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[server]\nport = -5\n", "[server] port"),
        ("[server]\nport = 65536\n", "[server] port"),
        ("[server]\nrequest_timeout_s = -1\n", "[server] request_timeout_s"),
        ("[server]\nrequest_timeout_s = 0\n", "[server] request_timeout_s"),
        ("[server]\nmax_body_bytes = 0\n", "[server] max_body_bytes"),
        ("[[models]]\nthreads = -3\n", "[models] threads"),
        ("[tenancy]\ndb_timeout_s = 0.1\n", "[tenancy] db_timeout_s"),
        ("[fairness]\nmax_client_queue_fraction = 0\n", "[fairness] max_client_queue_fraction"),
        ("[cache]\nredis_op_timeout_s = 0\n", "[cache] redis_op_timeout_s"),
    ],
)
def test_out_of_bounds_values_are_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    assert str(info.value).startswith(named), str(info.value)


def _entry_for(key: str) -> dict[str, Any]:
    """A [[models]] entry on which ``key`` is read (dim: dummy; int8 keys: an int8 onnx build)."""
    if key == "dim":
        return {"backend": "dummy"}
    if key in ("min_cosine", "int8_weight_bits"):
        return {"version": "1-int8", "backend": "onnx", "precision": "int8"}
    return {}


CASES = [(section, key, below) for section, keys in LIMITS.items() for key in keys for below in (True, False)]


@pytest.mark.parametrize(
    ("section", "key", "below"), CASES, ids=[f"{s}.{k}.{'low' if b else 'high'}" for s, k, b in CASES]
)
def test_every_limit_is_enforced_at_load_at_both_ends(section: str, key: str, below: bool) -> None:
    limit = LIMITS[section][key]
    hint = get_type_hints(SECTIONS[section])[key]
    integral = int in getattr(hint, "__args__", (hint,))
    step = 1 if integral else 1e-3

    def file_with(value: float) -> dict[str, Any]:
        value = int(value) if integral else value
        if section == "models":
            return {"models": [{**_entry_for(key), key: value}]}
        table: dict[str, Any] = {key: value}
        if section == "server" and key in ("max_items", "max_queue_items"):  # keep max_items <= max_queue_items
            table.setdefault("max_items", 1)
            table.setdefault("max_queue_items", 100_000_000)
        return {section: table}

    outside = (limit.low if limit.open_low else limit.low - step) if below else limit.high + step
    with pytest.raises(ConfigError, match=re.escape(f"[{section}] {key} must be")):
        parse_settings(file_with(outside))
    # The edge itself is allowed (an open low: a little above it).
    edge = (limit.low + step if limit.open_low else limit.low) if below else limit.high
    parse_settings(file_with(edge))


def test_every_numeric_key_of_every_section_is_bounded_and_every_default_is_within() -> None:
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        numeric = {
            name
            for name in settable_keys(cls, section)
            if {int, float} & set(getattr(hints[name], "__args__", (hints[name],))) and hints[name] is not bool
        }
        assert numeric == set(LIMITS.get(section, {})), section
        for f in fields(cls):
            if f.name in numeric and f.default is not MISSING and f.default is not None:
                assert LIMITS[section][f.name].admits(f.default), (section, f.name)
            if f.name in numeric:
                has_unit = re.search(r"(_s|_ms|_bytes|_tokens|_fraction|_per_s|_per_gib_hour)$", f.name)
                assert has_unit or LIMITS[section][f.name].unit, (section, f.name)


def test_the_sub_configs_defined_here_document_every_field() -> None:
    """ServerConfig, ModelConfig and TenancyConfig: a class docstring and one per field."""
    tree = ast.parse(Path(config_module.__file__).read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for name in ("ServerConfig", "ModelConfig", "TenancyConfig"):
        cls = classes[name]
        assert ast.get_docstring(cls), name
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                following = body[i + 1] if i + 1 < len(body) else None
                documented = (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                )
                assert documented, f"{name}.{node.target.id} has no docstring"


# -- keys that would be ignored, and error messages ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"batching": {"padding_free": True}}, "[batching] padding_free cannot be set"),
        ({"models": [{"dim": 8}]}, "dim is read only when backend is 'dummy'"),
        ({"models": [{"backend": "onnx", "execution": "packed"}]}, "execution is read only when backend is 'torch'"),
        ({"models": [{"backend": "onnx", "min_cosine": 0.9}]}, "min_cosine is read only when precision is 'int8'"),
        ({"models": [{"int8_weight_bits": 7}]}, "int8_weight_bits is read only when precision is 'int8'"),
    ],
)
def test_keys_that_would_be_ignored_are_errors(data: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_settings(data)


@pytest.mark.parametrize(
    "data",
    [
        {"server": {"metrics_auth": "everyone"}},
        {"server": {"port": 0}},
        {"tenancy": {"auth": "maybe"}},
        {"batching": {"budget_tokens": 0}},
        {"cache": {"admission": "lru"}},
    ],
)
def test_an_error_names_its_section_once(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    section = next(iter(data))
    message = str(info.value)
    assert message.count(f"[{section}]") == 1, message


# -- the environment mapping ------------------------------------------------------------------------


def test_the_environment_is_read_in_one_place() -> None:
    env = {
        "POLYRAY_HOME": "/data/p",
        "POLYRAY_CACHE_DIR": "/cache/p",
        "POLYRAY_INT8_WEIGHT_BITS": "7",
        "POLYRAY_REFIT": "1",
        "UNRELATED": "x",
    }
    assert read_environment(env) == Environment(home="/data/p", cache_dir="/cache/p", int8_weight_bits=7, refit=True)
    assert read_environment({}) == Environment()
    assert data_dir(read_environment(env)) == Path("/data/p")
    assert data_dir(Environment()) == Path.home() / ".local" / "share" / "polyray"


@pytest.mark.parametrize(("name", "value"), [("POLYRAY_INT8_WEIGHT_BITS", "9"), ("POLYRAY_REFIT", "maybe")])
def test_a_malformed_environment_value_is_an_error_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(environ={name: value})


def test_the_environment_fills_only_what_the_file_leaves_unset(tmp_path: Path) -> None:
    text = (
        '[[models]]\nname = "a"\ncache_dir = "/from/file"\n\n'
        '[[models]]\nname = "b"\n\n'
        '[[models]]\nname = "a"\nversion = "1-int8"\nbackend = "onnx"\nprecision = "int8"\n\n'
        '[[models]]\nname = "b"\nversion = "1-int8"\nbackend = "onnx"\nprecision = "int8"\nint8_weight_bits = 8\n'
    )
    env = {"POLYRAY_CACHE_DIR": "/from/env", "POLYRAY_INT8_WEIGHT_BITS": "7"}
    models = load_settings(write(tmp_path, text), environ=env).models
    assert [m.cache_dir for m in models] == ["/from/file", "/from/env", "/from/env", "/from/env"]
    assert [m.int8_weight_bits for m in models] == [None, None, 7, 8]  # fp32 builds have no weight bits
    assert all(m.reuse_budget_fit for m in models)
    refit = load_settings(write(tmp_path, text), environ={"POLYRAY_REFIT": "1"}).models
    assert not any(m.reuse_budget_fit for m in refit)


def test_no_module_reads_the_server_environment_or_sets_it_at_import() -> None:
    """Only config.py reads POLYRAY_* settings; no module changes os.environ when imported.
    (client.py and the CLI read the caller's own POLYRAY_API_KEY / POLYRAY_URL: client settings.)"""
    package = Path(polyray.__file__).parent
    server_variables = ("POLYRAY_HOME", "POLYRAY_CACHE_DIR", "POLYRAY_INT8_WEIGHT_BITS", "POLYRAY_REFIT")
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        relative = path.relative_to(package).as_posix()
        if relative != "config.py" and not relative.startswith("benchmarks/"):
            assert not any(v in text and "environ" in text for v in server_variables), relative
        for node in ast.parse(text).body:  # module level only: what runs at import
            for inner in ast.walk(node):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    break
                if isinstance(inner, ast.Attribute) and inner.attr == "environ":
                    pytest.fail(f"{relative}:{inner.lineno} touches os.environ at import")


# -- documentation held to the code -----------------------------------------------------------------


def _documented(block: str) -> list[tuple[str, int, str, Any, str]]:
    """(section, entry index, key, value, comment) of every ``key = value`` line of a TOML block.

    A comment-only line right below a key continues that key's comment.
    """
    values = tomllib.loads(block)
    rows: list[tuple[str, int, str, Any, str]] = []
    section, entry = "", 0
    counts: dict[str, int] = {}
    for line in block.splitlines():
        stripped = line.strip()
        header = re.match(r"^\[\[?(\w+)\]\]?", stripped)
        if header:
            section = header.group(1)
            counts[section] = counts.get(section, -1) + 1
            entry = counts[section]
            continue
        match = re.match(r"^(\w+)\s*=", stripped)
        if match:
            key = match.group(1)
            table = values[section][entry] if isinstance(values[section], list) else values[section]
            rows.append((section, entry, key, table[key], line[match.end() :]))
        elif stripped.startswith("#") and rows and line.startswith(" "):
            s, e, k, v, comment = rows[-1]
            rows[-1] = (s, e, k, v, comment + " " + stripped)
    return rows


def _default(section: str, key: str) -> Any:
    return next(f.default for f in fields(SECTIONS[section]) if f.name == key)


def _check_documented_defaults(rows: list[tuple[str, int, str, Any, str]], where: str) -> None:
    for section, _entry, key, value, comment in rows:
        if "default:" in comment:  # an example value; the comment names the default
            continue
        assert value == _default(section, key), f"{where}: [{section}] {key} = {value!r} is not the default"


def _docstring_example() -> str:
    doc = config_module.__doc__ or ""
    return textwrap.dedent(doc.split("::\n", 1)[1].split("\nEnvironment", 1)[0])


def test_the_config_docstring_lists_every_key_with_its_default() -> None:
    example = _docstring_example()
    rows = _documented(example)
    _check_documented_defaults(rows, "config.py docstring")
    for section, cls in SECTIONS.items():
        listed = {key for s, _, key, _, _ in rows if s == section}
        assert listed == set(settable_keys(cls, section)), section
    parse_settings(tomllib.loads(example))  # and it is a valid configuration


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_configuration_shows_the_defaults() -> None:
    section = _readme_section("Configuration")
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert blocks
    for block in blocks:
        _check_documented_defaults(_documented(block), "README Configuration")
        parse_settings(tomllib.loads(block))


def test_the_readme_connection_table_shows_the_defaults() -> None:
    rows = re.findall(r"^\| `(\w+)` \| ([\d,.]+)( s)? \|", _readme_section("Connections and stopping"), re.M)
    assert len(rows) == 8
    for key, number, _ in rows:
        assert float(number.replace(",", "")) == _default("server", key), key


def test_defaults_named_in_the_readme_prose_are_the_code_s() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    known = {key: section for section, cls in SECTIONS.items() for key in settable_keys(cls, section)}
    found = 0
    for match in re.finditer(r"`(?:\[\w+\]\s+)?(\w+)`\s*\((?:default\s*)?(\d[\d,]*(?:\.\d+)?)", text):
        key, number = match.group(1), float(match.group(2).replace(",", ""))
        if key in known:
            found += 1
            assert number == _default(known[key], key), match.group(0)
    assert found >= 6
