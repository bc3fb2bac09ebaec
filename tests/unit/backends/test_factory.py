"""Model entries for the ONNX backend: precision is part of the version, validated at config load."""

from __future__ import annotations

import pytest

from polyray.backends.factory import build_backend, check_model
from polyray.config import ConfigError, ModelConfig, parse_settings
from polyray.engine.budget_fit import build_budget_fitter


def test_int8_needs_its_own_version_naming_it() -> None:
    ok = ModelConfig(name="minilm", version="1-int8", backend="onnx", precision="int8")
    assert ok.precision == "int8"
    with pytest.raises(ConfigError, match=r'a int8 build needs a version that names it, e\.g\. version = "1-int8"'):
        ModelConfig(name="minilm", version="1", backend="onnx", precision="int8")
    with pytest.raises(ConfigError, match="names int8 but precision is fp32"):
        ModelConfig(name="minilm", version="1-int8", backend="onnx")
    with pytest.raises(ConfigError, match="needs backend = 'onnx'"):
        ModelConfig(version="1-int8", backend="torch", precision="int8")
    with pytest.raises(ConfigError, match="unknown precision 'bf16'"):
        ModelConfig(backend="onnx", precision="bf16")
    with pytest.raises(ConfigError, match="min_cosine"):
        ModelConfig(version="1-int8", backend="onnx", precision="int8", min_cosine=1.5)


def test_fp32_and_int8_of_one_model_are_two_entries() -> None:
    settings = parse_settings(
        {
            "models": [
                {"name": "minilm", "version": "1", "backend": "onnx"},
                {"name": "minilm", "version": "1-int8", "backend": "onnx", "precision": "int8", "min_cosine": 0.995},
            ]
        }
    )
    assert [(m.version, m.precision) for m in settings.models] == [("1", "fp32"), ("1-int8", "int8")]
    with pytest.raises(ConfigError, match="wrong type"):
        parse_settings({"models": [{"backend": "onnx", "cache_dir": 3}]})


def test_budget_fitter_follows_the_model_entry() -> None:
    assert build_budget_fitter(ModelConfig(fit_batch_budget=False)) is None
    fitter = build_budget_fitter(ModelConfig(name="m", version="2", batch_latency_target_ms=80.0))
    assert fitter is not None and fitter.policy.latency_target_ms == 80.0 and fitter.name == "m@2"
    with pytest.raises(ConfigError, match="batch_latency_target_ms"):
        ModelConfig(batch_latency_target_ms=0)


def test_dummy_backend_reports_no_reference() -> None:
    backend = build_backend(ModelConfig(backend="dummy"))
    check_model(ModelConfig(backend="dummy"))
    assert backend.precision == "fp32" and backend.cosine_to_reference is None
