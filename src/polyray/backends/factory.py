"""Build the backend a ``ModelConfig`` names; torch is imported only when asked for."""

from __future__ import annotations

from polyray.backends.base import Backend
from polyray.backends.dummy import DummyBackend
from polyray.config import ModelConfig, default_threads
from polyray.registry.model_dir import read_model_dir


def check_model(config: ModelConfig) -> None:
    """Fail fast (``ModelLoadError``) on a missing or broken model directory, before loading weights."""
    if config.backend == "torch":
        read_model_dir(config.path)


def build_backend(config: ModelConfig) -> Backend:
    if config.backend == "dummy":
        return DummyBackend(dim=config.dim, max_seq_tokens=config.max_seq_tokens or 256)
    from polyray.backends.torch import TorchBackend

    return TorchBackend(
        read_model_dir(config.path), config.threads or default_threads(), config.max_seq_tokens, config.execution
    )
