"""The ONNX Runtime backend on the real packaged MiniLM: export, reuse, accuracy floors, int8."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from polyray.backends.calibrate import row_cosines
from polyray.backends.onnx import OnnxBackend
from polyray.backends.onnx_export import GRAPH_FILE, META_FILE, build_name, exporter_id, weights_digest
from polyray.backends.torch import TorchBackend
from polyray.benchmarks.corpus import make_corpus
from polyray.errors import ModelLoadError
from polyray.registry.model_dir import ModelDir

pytestmark = pytest.mark.model

# Where the probe check is not what a test is about, a short probe keeps the load quick.
SHORT_PROBE = ["ok", "A sentence of moderate length about the weather.", "word " * 300]


@pytest.fixture(scope="module")
def torch_backend(model_dir: ModelDir) -> TorchBackend:
    return TorchBackend(model_dir, threads=2, execution="padded")


def _random_batch(rng: random.Random, size: int, max_len: int) -> list[tuple[int, ...]]:
    """Random token ids between [CLS] and [SEP]; lengths 2..max_len."""
    return [(101, *(rng.randrange(1000, 30000) for _ in range(rng.randint(0, max_len - 2))), 102) for _ in range(size)]


def test_exported_graph_equals_torch_on_random_inputs_of_many_lengths(
    fp32_backend: OnnxBackend, torch_backend: TorchBackend
) -> None:
    rng = random.Random(5)
    batches = [_random_batch(rng, size, max_len) for size, max_len in ((1, 2), (1, 256), (3, 9), (17, 130), (9, 256))]
    batches.append([(101, 102), (101, *range(2000, 2254), 102)])  # the shortest and the longest in one batch
    for batch in batches:
        expected = torch_backend.encode_padded(batch)
        for got in (fp32_backend.encode(batch), fp32_backend.encode_padded(batch)):
            assert got.shape == (len(batch), 384) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=2e-5)
            assert row_cosines(got, expected).min() >= 0.99999


def test_length_buckets_give_each_row_its_own_vector(fp32_backend: OnnxBackend) -> None:
    rng = random.Random(9)
    batch = _random_batch(rng, 21, 200)
    alone = np.concatenate([fp32_backend.encode([row]) for row in batch])
    np.testing.assert_allclose(fp32_backend.encode(batch), alone, atol=2e-5)


def test_fp32_backend_reports_precision_cosine_and_build(fp32_backend: OnnxBackend, model_dir: ModelDir) -> None:
    assert fp32_backend.precision == "fp32"
    assert fp32_backend.cosine_to_reference is not None and fp32_backend.cosine_to_reference >= 0.9999
    assert fp32_backend.padding_free and fp32_backend.dim == 384 and fp32_backend.max_seq_tokens == 256
    meta = json.loads((fp32_backend.build_dir / META_FILE).read_text())
    assert meta["weights_sha256"] == weights_digest(model_dir)
    assert meta["exporter"] == exporter_id() and meta["precision"] == "fp32"
    assert fp32_backend.build_dir.name == build_name(meta["weights_sha256"], "fp32")


def test_build_is_reused_across_restarts(fp32_backend: OnnxBackend, model_dir: ModelDir, onnx_cache_dir: Path) -> None:
    graph = fp32_backend.build_dir / GRAPH_FILE
    before = graph.stat().st_mtime_ns
    again = OnnxBackend(model_dir, threads=2, precision="fp32", cache_dir=str(onnx_cache_dir), probe=SHORT_PROBE)
    assert again.build.reused and again.build_dir == fp32_backend.build_dir
    assert graph.stat().st_mtime_ns == before
    assert not [p for p in (onnx_cache_dir / "onnx").iterdir() if p.name.startswith(".tmp-")]


def test_damaged_build_is_detected_and_rebuilt(fp32_backend: OnnxBackend, model_dir: ModelDir, tmp_path: Path) -> None:
    import shutil

    cache = tmp_path / "cache"
    copy = cache / "onnx" / fp32_backend.build_dir.name
    shutil.copytree(fp32_backend.build_dir, copy)
    with open(copy / GRAPH_FILE, "r+b") as fh:  # a half-written file, as after a full disk
        fh.truncate(1000)
    rebuilt = OnnxBackend(model_dir, threads=2, precision="fp32", cache_dir=str(cache), probe=SHORT_PROBE)
    assert not rebuilt.build.reused
    assert rebuilt.cosine_to_reference is not None and rebuilt.cosine_to_reference >= 0.9999
    assert (copy / GRAPH_FILE).stat().st_size == (fp32_backend.build_dir / GRAPH_FILE).stat().st_size


def test_int8_build_is_accurate_and_distinct(
    int8_backend: OnnxBackend, fp32_backend: OnnxBackend, torch_backend: TorchBackend
) -> None:
    assert int8_backend.precision == "int8"
    assert int8_backend.build_dir != fp32_backend.build_dir
    assert int8_backend.build.meta["num_per_token_matmuls"] == 6  # one FFN output per layer
    assert int8_backend.build.meta["num_per_tensor_matmuls"] == 30
    assert int8_backend.cosine_to_reference is not None and 0.99 <= int8_backend.cosine_to_reference < 0.9999
    texts = make_corpus(64, seed=123, min_words=1, max_words=80)
    ids = [t.ids for t in int8_backend.tokenize(texts)]
    cosines = row_cosines(int8_backend.encode(ids), torch_backend.encode_padded(ids))
    assert cosines.min() >= 0.99, cosines.min()
    assert cosines.mean() < 0.99999  # it is a different build, not the fp32 graph under another name


def test_int8_build_under_the_floor_is_refused(int8_backend: OnnxBackend, model_dir: ModelDir) -> None:
    cache_dir = str(int8_backend.build_dir.parent.parent)
    with pytest.raises(ModelLoadError, match=r"refusing the int8 ONNX build.*under the floor 0\.9999") as info:
        OnnxBackend(model_dir, threads=2, precision="int8", cache_dir=cache_dir, min_cosine=0.9999)
    assert "precision = 'fp32'" in str(info.value)
