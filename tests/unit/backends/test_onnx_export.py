"""The build cache's protocol: keys, atomic publication under concurrency, recovery. No real export here."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from polyray.backends import onnx_export
from polyray.backends.onnx_export import GRAPH_FILE, default_cache_root, ensure_build, weights_digest
from polyray.registry.model_dir import ModelDir


def _model_dir(root: Path, weights: bytes = b"weights", pooling: str = "mean") -> ModelDir:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(weights)
    (root / "config.json").write_text('{"hidden_size": 8}')
    return ModelDir(root, root, pooling, True, 16, False, 8, "bert")


def test_digest_follows_weights_config_and_pooling(tmp_path: Path) -> None:
    base = weights_digest(_model_dir(tmp_path / "a"))
    assert weights_digest(_model_dir(tmp_path / "b")) == base  # same bytes elsewhere: same build
    assert weights_digest(_model_dir(tmp_path / "c", weights=b"weightz")) != base
    assert weights_digest(_model_dir(tmp_path / "d", pooling="cls")) != base
    changed = _model_dir(tmp_path / "e")
    (changed.root / "config.json").write_text('{"hidden_size": 16}')
    assert weights_digest(changed) != base


def test_cache_root_from_the_model_config_else_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # $POLYRAY_CACHE_DIR reaches the backend through the model's cache_dir (polyray.config), never here.
    monkeypatch.setenv("POLYRAY_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg" / "onnx"
    assert default_cache_root(None) == Path.home() / ".cache" / "polyray" / "onnx"


class FakeExport:
    """Stands in for the torch export (a file write); with ``barrier`` set, every export waits
    there until all the racing builds are inside ``_export`` at once, so the race is certain
    rather than hoped for by a sleep."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.barrier: threading.Barrier | None = None

    def __call__(
        self, model_dir: ModelDir, precision: str, out: Path, calibration_ids: Any, weight_bits: int
    ) -> dict[str, Any]:
        self.calls.append(precision)
        if self.barrier is not None:
            self.barrier.wait(timeout=30)  # generous: a broken race fails with BrokenBarrierError, never hangs
        out.write_bytes(b"graph-" + precision.encode() + model_dir.root.name.encode())
        return {"fake": True}


@pytest.fixture
def fake_export(monkeypatch: pytest.MonkeyPatch) -> FakeExport:
    fake = FakeExport()
    monkeypatch.setattr(onnx_export, "_export", fake)
    return fake


def test_concurrent_builds_publish_one_complete_directory(tmp_path: Path, fake_export: FakeExport) -> None:
    model_dir = _model_dir(tmp_path / "model")
    cache = tmp_path / "cache"
    fake_export.barrier = threading.Barrier(4)
    results: list[onnx_export.Build] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_build(model_dir, "fp32", cache))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    fake_export.barrier = None
    assert len(fake_export.calls) == 4 and len(results) == 4  # all raced, all finished
    assert len({r.directory for r in results}) == 1
    assert sum(not r.reused for r in results) == 1  # one won the rename; the others use its build
    assert [p.name for p in cache.iterdir()] == [results[0].directory.name]  # no temporary left behind
    assert (results[0].directory / GRAPH_FILE).read_bytes() == b"graph-fp32model"
    again = ensure_build(model_dir, "fp32", cache)
    assert again.reused and len(fake_export.calls) == 4


def test_precisions_and_weights_get_their_own_builds(tmp_path: Path, fake_export: FakeExport) -> None:
    cache = tmp_path / "cache"
    a = ensure_build(_model_dir(tmp_path / "a"), "fp32", cache)
    b = ensure_build(_model_dir(tmp_path / "a"), "int8", cache, calibration_ids=[(101, 102)], weight_bits=7)
    c = ensure_build(_model_dir(tmp_path / "c", weights=b"other"), "fp32", cache)
    assert len({a.directory, b.directory, c.directory}) == 3
    assert a.directory.name.endswith("-fp32") and b.directory.name.endswith("-int8w7")
    detected = ensure_build(_model_dir(tmp_path / "a"), "int8", cache, calibration_ids=[(101, 102)])
    assert detected.directory.name.endswith(f"-int8w{onnx_export.int8_weight_bits()}")  # None: from this CPU


def test_int8_builds_for_other_weight_bits_are_not_reused(tmp_path: Path, fake_export: FakeExport) -> None:
    cache = tmp_path / "cache"
    model_dir = _model_dir(tmp_path / "a")
    eight = ensure_build(model_dir, "int8", cache, calibration_ids=[(101, 102)], weight_bits=8)
    seven = ensure_build(model_dir, "int8", cache, calibration_ids=[(101, 102)], weight_bits=7)
    assert not seven.reused and seven.directory != eight.directory
    assert (eight.meta["weight_bits"], seven.meta["weight_bits"]) == (8, 7)
    # An 8-bit-named build whose metadata says 7 bits is not taken for an 8-bit one: it is rebuilt.
    meta_path = eight.directory / onnx_export.META_FILE
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "weight_bits": 7}))
    rebuilt = ensure_build(model_dir, "int8", cache, calibration_ids=[(101, 102)], weight_bits=8)
    assert not rebuilt.reused and rebuilt.meta["weight_bits"] == 8


def test_build_with_a_foreign_meta_is_replaced(tmp_path: Path, fake_export: FakeExport) -> None:
    model_dir = _model_dir(tmp_path / "model")
    cache = tmp_path / "cache"
    first = ensure_build(model_dir, "fp32", cache)
    meta = first.directory / onnx_export.META_FILE
    meta.write_text(meta.read_text().replace(first.meta["exporter"], "f0-old-exporter"))
    second = ensure_build(model_dir, "fp32", cache)
    assert not second.reused and second.meta["exporter"] == first.meta["exporter"]
    assert [p.name for p in cache.iterdir()] == [first.directory.name]
