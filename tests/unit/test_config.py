"""Settings from TOML: defaults, overrides and errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyray.config import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    PACKAGED_MODEL,
    ConfigError,
    ModelConfig,
    ServerConfig,
    Settings,
    default_threads,
    load_settings,
    parse_settings,
)
from polyray.engine.batcher import BatchPolicy


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "polyray.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_no_path_gives_defaults() -> None:
    settings = load_settings()
    assert settings == Settings()
    assert settings.server == ServerConfig()
    assert settings.batching == BatchPolicy()
    assert settings.models == (ModelConfig(),)
    model = settings.models[0]
    assert (model.name, model.version, model.path, model.backend) == (
        DEFAULT_MODEL_NAME,
        DEFAULT_MODEL_VERSION,
        PACKAGED_MODEL,
        "torch",
    )


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == Settings()


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
    with pytest.raises(ConfigError, match="cache"):
        load_settings(write(tmp_path, "[cache]\nsize = 1\n"))


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


def test_default_threads_positive() -> None:
    assert default_threads() >= 1


def test_wrong_typed_value_is_rejected(tmp_path: Path) -> None:
    # max_queue_items = "10" loads as the string "10"; EntryQueue.push then raises TypeError on the first request.
    with pytest.raises(ConfigError, match="max_queue_items"):
        load_settings(write(tmp_path, '[server]\nmax_queue_items = "10"\n'))


def test_request_larger_than_the_queue_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nmax_items = 100\nmax_queue_items = 10\n")
    with pytest.raises(ConfigError, match="max_items must not exceed max_queue_items"):
        load_settings(str(path))
