"""Build the backend a ``ModelConfig`` names; torch and ONNX Runtime are imported only when asked for."""

from __future__ import annotations

from polyray.backends.base import Backend
from polyray.backends.calibrate import FitCache
from polyray.backends.dummy import DummyBackend
from polyray.config import ModelConfig, default_threads
from polyray.registry.model_dir import read_model_dir


def check_model(config: ModelConfig) -> None:
    """Fail fast (``ModelLoadError``) on a missing or broken model directory, before loading weights."""
    if config.backend in ("torch", "onnx"):
        read_model_dir(config.path)


def build_backend(config: ModelConfig) -> Backend:
    if config.backend == "dummy":
        return DummyBackend(dim=config.dim, max_seq_tokens=config.max_seq_tokens or 256)
    threads = config.threads or default_threads()
    if config.backend == "onnx":
        from polyray.backends.onnx import OnnxBackend

        return OnnxBackend(
            read_model_dir(config.path),
            threads,
            precision=config.precision,
            max_seq_tokens=config.max_seq_tokens,
            cache_dir=config.cache_dir,
            min_cosine=config.min_cosine,
            int8_weight_bits=config.int8_weight_bits,
        )
    from polyray.backends.torch import TorchBackend

    return TorchBackend(read_model_dir(config.path), threads, config.max_seq_tokens, config.execution)


def fit_cache(config: ModelConfig) -> FitCache:
    """Where a model entry's measured budget curve is kept: ``<cache dir>/budget-fits`` (``calibrate.FitCache``)."""
    from polyray.backends.onnx_export import default_cache_root, weights_digest

    identity = {
        "backend": config.backend,
        "precision": config.precision,
        "execution": config.execution,
        "threads": config.threads or default_threads(),
        "max_seq_tokens": config.max_seq_tokens,
    }
    return FitCache(
        default_cache_root(config.cache_dir).parent / "budget-fits",
        identity,
        lambda: weights_digest(read_model_dir(config.path)),
    )
