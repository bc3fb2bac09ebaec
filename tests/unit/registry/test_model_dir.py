"""Reading model directories: sentence-transformers layouts, plain HF ones, and broken ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from polyray.config import PACKAGED_MODEL
from polyray.errors import ModelLoadError
from polyray.registry.model_dir import read_model_dir, resolve_model_path

HF_CONFIG = {"model_type": "bert", "hidden_size": 32, "max_position_embeddings": 512}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def hf_dir(
    root: Path, config: Any = None, weights: str | None = "model.safetensors", tokenizer: str | None = "vocab.txt"
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "config.json", HF_CONFIG if config is None else config)
    if weights:
        (root / weights).write_bytes(b"")
    if tokenizer:
        (root / tokenizer).write_text("[PAD]\n", encoding="utf-8")
    return root


def st_dir(root: Path, pooling: dict[str, Any], normalize: bool = True, max_seq_length: int = 128) -> Path:
    hf_dir(root)
    write_json(root / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": True})
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    write_json(root / "1_Pooling" / "config.json", {"word_embedding_dimension": 32, **pooling})
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (root / "2_Normalize").mkdir()
    write_json(root / "modules.json", modules)
    return root


# -- good directories ------------------------------------------------------------------------


def test_plain_hf_directory_means_mean_pooling_without_normalize(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    info = read_model_dir(str(root))
    assert info.root == root
    assert info.transformer_path == root
    assert info.pooling == "mean"
    assert info.normalize is False
    assert info.max_seq_tokens == 512
    assert info.do_lower_case is False
    assert info.dim == 32
    assert info.model_type == "bert"


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors.index.json"])
@pytest.mark.parametrize("tokenizer", ["tokenizer.json", "tokenizer_config.json"])
def test_other_weight_and_tokenizer_files(tmp_path: Path, weights: str, tokenizer: str) -> None:
    info = read_model_dir(str(hf_dir(tmp_path / "m", weights=weights, tokenizer=tokenizer)))
    assert info.dim == 32


def test_sentence_transformers_cls_pooling_and_normalize(tmp_path: Path) -> None:
    root = st_dir(tmp_path / "st", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    info = read_model_dir(str(root))
    assert info.pooling == "cls"
    assert info.normalize is True
    assert info.max_seq_tokens == 128
    assert info.do_lower_case is True
    assert info.transformer_path == root


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        ({"pooling_mode_mean_tokens": True}, "mean"),
        ({"pooling_mode_max_tokens": True}, "max"),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len"),
        ({"pooling_mode": "cls"}, "cls"),
    ],
)
def test_pooling_modes(tmp_path: Path, pooling: dict[str, Any], expected: str) -> None:
    info = read_model_dir(str(st_dir(tmp_path / "st", pooling, normalize=False)))
    assert info.pooling == expected
    assert info.normalize is False


def test_max_seq_length_capped_by_position_embeddings(tmp_path: Path) -> None:
    info = read_model_dir(str(st_dir(tmp_path / "st", {"pooling_mode_mean_tokens": True}, max_seq_length=4096)))
    assert info.max_seq_tokens == 512


def test_transformer_in_a_subdirectory(tmp_path: Path) -> None:
    root = tmp_path / "st"
    sub = hf_dir(root / "0_Transformer")
    write_json(sub / "sentence_bert_config.json", {"max_seq_length": 64})
    write_json(root / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
    write_json(
        root / "modules.json",
        [
            {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
            {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
    )
    info = read_model_dir(str(root))
    assert info.transformer_path == sub
    assert info.max_seq_tokens == 64


def test_packaged_model() -> None:
    info = read_model_dir(PACKAGED_MODEL)
    assert info.root == resolve_model_path(PACKAGED_MODEL)
    assert info.pooling == "mean"
    assert info.normalize is True
    assert info.max_seq_tokens == 256
    assert info.dim == 384
    assert info.do_lower_case is False
    assert info.model_type == "bert"


def test_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    hf_dir(tmp_path / "models" / "m")
    assert read_model_dir("~/models/m").root == tmp_path / "models" / "m"


# -- broken directories ----------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_model_dir(str(tmp_path / "absent"))


def test_path_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        read_model_dir(str(path))


def test_missing_package() -> None:
    with pytest.raises(ModelLoadError, match="not installed"):
        read_model_dir("package:polyray_no_such_model_package")


def test_no_config_json(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    (root / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        read_model_dir(str(root))


def test_no_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no weights"):
        read_model_dir(str(hf_dir(tmp_path / "m", weights=None)))


def test_no_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        read_model_dir(str(hf_dir(tmp_path / "m", tokenizer=None)))


def test_bad_json_config(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    (root / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not valid JSON") as info:
        read_model_dir(str(root))
    assert "config.json" in info.value.message


def test_bad_json_modules(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    (root / "modules.json").write_text("[", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"modules\.json"):
        read_model_dir(str(root))


def test_modules_not_a_list(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    write_json(root / "modules.json", {"type": "Transformer"})
    with pytest.raises(ModelLoadError, match="list of modules"):
        read_model_dir(str(root))


def test_no_hidden_size(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m", config={"model_type": "bert"})
    with pytest.raises(ModelLoadError, match="hidden_size"):
        read_model_dir(str(root))


def test_unsupported_module_type(tmp_path: Path) -> None:
    root = st_dir(tmp_path / "st", {"pooling_mode_mean_tokens": True})
    modules = json.loads((root / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    write_json(root / "modules.json", modules)
    with pytest.raises(ModelLoadError, match="Dense"):
        read_model_dir(str(root))


def test_unsupported_pooling(tmp_path: Path) -> None:
    root = st_dir(tmp_path / "st", {"pooling_mode_weightedmean_tokens": True, "pooling_mode_mean_tokens": False})
    with pytest.raises(ModelLoadError, match="unsupported pooling"):
        read_model_dir(str(root))


def test_missing_pooling_config(tmp_path: Path) -> None:
    root = st_dir(tmp_path / "st", {"pooling_mode_mean_tokens": True})
    (root / "1_Pooling" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_model_dir(str(root))


def test_non_object_module_entry(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m")
    write_json(root / "modules.json", ["sentence_transformers.models.Transformer"])
    with pytest.raises(ModelLoadError, match=r"modules\.json"):
        read_model_dir(str(root))


def test_config_json_not_an_object(tmp_path: Path) -> None:
    root = hf_dir(tmp_path / "m", config=[1, 2])
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        read_model_dir(str(root))
