"""ONNX Runtime CPU backend: the same model, exported once, with far less per-call overhead.

Measured on this project's CPU (../shared/notes/cpu-inference.md, bench/README.md): ONNX Runtime
runs MiniLM at about torch's throughput in fp32, but a short sentence costs a fraction of torch's
eager-framework overhead, and the int8 build (``quantize``) runs about twice as fast again.

Start-up: the graph is exported from the model directory's own weights on first use and kept on
disk (``onnx_export``); every load then checks the build against the torch backend (the
reference: padded Hugging Face forward pass) on the probe set and refuses to serve a build under
its floor: cosine 0.9999 for fp32 (an export bug, not rounding), ``min_cosine`` (0.99) for int8.

Padding: ORT computes every padded position, and a cross-request batch mixes lengths. ``encode``
therefore sorts the batch by length and cuts it into buckets with the planner's own
``plan_groups`` (one call per bucket, each padded only to its own longest), trading one call's
small fixed cost against padding. Compute then follows the real tokens closely, so the backend
reports ``padding_free`` and the engine batches across lengths freely.

Threads: ``intra_op_num_threads`` = the cores given (``default_threads``), one inter-op thread,
sequential execution. ORT releases the GIL during ``run``, so the event loop's HTTP work and the
tokenization of the next requests proceed while a batch computes. Pool threads spin between the
operators of a run (ORT's default): a run is ~100 operators, and waking a sleeping thread for
each cost more than the spinning takes from the event loop. Measured, spin on against off: one
9-token sentence in process 1.5 against 3.1 ms (int8), 3.6 against 4.6 ms (fp32); in two
``polyray bench`` runs minutes apart, served batches of ~31 sentences 103 against 134 ms (int8)
and 196 against 215 ms (fp32), HTTP throughput 1.81x against 1.58x sentence-transformers (int8).
(For torch, OpenMP's spinning did hurt: bench/README.md.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]

from polyray.backends.base import Tokenized, pad_batch
from polyray.backends.calibrate import ProbeReport, calibration_texts, compare_to_reference, probe_texts
from polyray.backends.onnx_export import Build, default_cache_root, ensure_build
from polyray.backends.tokenizer import TextTokenizer
from polyray.errors import ModelLoadError
from polyray.policies import BatchPolicy, plan_groups
from polyray.registry.model_dir import ModelDir

log = logging.getLogger(__name__)

FP32_MIN_COSINE = 0.9999
# The price of one more length bucket in ``encode``, in tokens of compute (one ORT call's fixed
# cost). Measured on random batches of 32 corpus sentences: buckets planned with 8 or 32 ran
# within noise of each other (fp32 ≈ 190, int8 ≈ 300 sentences/s), 96 slower, and one padded
# call instead of buckets at 0.62x (fp32) and 0.68x (int8).
BUCKET_OVERHEAD_TOKENS = 16

# Reference vectors of the probe set, per (weights digest, max_seq_tokens): an fp32 and an int8
# build loaded by one process (or one test session) run the torch reference once.
_reference_cache: dict[tuple[str, int, int], np.ndarray] = {}
_reference_lock = threading.Lock()


def session_options(threads: int, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings at load are about optional fusions
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxBackend:
    def __init__(
        self,
        model_dir: ModelDir,
        threads: int,
        precision: str = "fp32",
        max_seq_tokens: int | None = None,
        cache_dir: str | None = None,
        min_cosine: float = 0.99,
        probe: Sequence[str] | None = None,
        spin: bool = True,
        int8_weight_bits: int | None = None,
    ) -> None:
        if precision not in ("fp32", "int8"):
            raise ModelLoadError(f"the onnx backend has no precision {precision!r} (fp32, int8)")
        self.model_dir = model_dir
        self.threads = threads
        self.precision = precision
        self.text_tokenizer = TextTokenizer(model_dir, max_seq_tokens)
        self.max_seq_tokens = self.text_tokenizer.max_seq_tokens
        self.pad_id = self.text_tokenizer.pad_id
        self.dim = model_dir.dim
        self.padding_free = True  # length buckets: see the module docstring
        self._bucket_policy = BatchPolicy(
            budget_tokens=1 << 30, max_batch_size=1 << 30, window=1 << 30, overhead_tokens=BUCKET_OVERHEAD_TOKENS
        )
        calibration_ids = [t.ids for t in self.tokenize(calibration_texts())] if precision == "int8" else []
        self.build: Build = ensure_build(
            model_dir, precision, default_cache_root(cache_dir), calibration_ids, weight_bits=int8_weight_bits
        )
        try:
            self.session = ort.InferenceSession(
                str(self.build.graph_path), session_options(threads, spin), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # a graph ORT cannot load: say which file
            raise ModelLoadError(f"ONNX Runtime cannot load {self.build.graph_path}: {exc}") from exc
        self._input_names = {i.name for i in self.session.get_inputs()}
        floor = FP32_MIN_COSINE if precision == "fp32" else min_cosine
        texts = list(probe) if probe is not None else probe_texts()
        self.probe_report = self._check(texts, floor)
        self.cosine_to_reference: float | None = self.probe_report.min_cosine
        self.description = (
            f"onnxruntime {ort.__version__} cpu, {threads} threads, {precision}, "
            f"min cosine {self.probe_report.min_cosine:.4f} to torch fp32 over {self.probe_report.num_inputs} "
            f"probe inputs, {model_dir.pooling} pooling" + (", normalized" if model_dir.normalize else "")
        )

    @property
    def build_dir(self) -> Path:
        return self.build.directory

    def tokenize(self, texts: Sequence[str]) -> list[Tokenized]:
        return self.text_tokenizer.tokenize(texts)

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        if len(batch) == 1:
            return self._run(batch)
        lengths = [len(seq) for seq in batch]
        order = sorted(range(len(batch)), key=lengths.__getitem__)
        groups = plan_groups([lengths[i] for i in order], self._bucket_policy)
        if len(groups) == 1:
            return self._run(batch)
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        for start, end in groups:
            rows = order[start:end]
            out[rows] = self._run([batch[i] for i in rows])
        return out

    def encode_padded(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One ORT call over the whole right-padded batch (no length buckets)."""
        return self._run(batch)

    def _run(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask = pad_batch(batch, self.pad_id)
        feed = {"input_ids": ids, "attention_mask": mask}
        vectors = self.session.run(None, {k: v for k, v in feed.items() if k in self._input_names})[0]
        return np.asarray(vectors, dtype=np.float32)

    def _check(self, texts: Sequence[str], floor: float) -> ProbeReport:
        """Probe-set cosine to the torch reference; refuse the build (``ModelLoadError``) under ``floor``."""
        probe_ids = [t.ids for t in self.tokenize(texts)]
        digest = str(self.build.meta["weights_sha256"])
        reference = _reference_vectors(self.model_dir, digest, self.threads, self.max_seq_tokens, probe_ids)
        report = compare_to_reference(self.encode, reference, probe_ids)
        log.info(
            "%s ONNX build %s: cosine to torch fp32 min %.5f mean %.5f over %d probe inputs (floor %.4f)",
            self.precision,
            self.build.directory.name,
            report.min_cosine,
            report.mean_cosine,
            report.num_inputs,
            floor,
        )
        if report.min_cosine < floor:
            worst = texts[report.worst_index]
            shown = worst if len(worst) <= 60 else worst[:57] + "..."
            raise ModelLoadError(
                f"refusing the {self.precision} ONNX build of {self.model_dir.root} ({self.build.directory}): "
                f"its vectors reach cosine {report.min_cosine:.4f} to the fp32 torch model on probe input "
                f"{report.worst_index} ({shown!r}), under the floor {floor:.4f} "
                f"(mean {report.mean_cosine:.4f} over {report.num_inputs} inputs). "
                + (
                    "Serve precision = 'fp32', or lower min_cosine if this loss is acceptable."
                    if self.precision != "fp32"
                    else "The export does not reproduce the model: delete the build directory and report a bug."
                )
            )
        return report


def _reference_vectors(
    model_dir: ModelDir, digest: str, threads: int, max_seq_tokens: int, probe_ids: Sequence[Sequence[int]]
) -> np.ndarray:
    """The torch backend's padded forward pass over the probe inputs (cached per weights and probe)."""
    key = (digest, max_seq_tokens, hash(tuple(tuple(ids) for ids in probe_ids)))
    with _reference_lock:
        cached = _reference_cache.get(key)
        if cached is not None:
            return cached
        from polyray.backends.torch import TorchBackend

        torch_backend = TorchBackend(model_dir, threads, max_seq_tokens, execution="padded")
        order = sorted(range(len(probe_ids)), key=lambda i: len(probe_ids[i]))
        vectors = np.empty((len(probe_ids), model_dir.dim), dtype=np.float32)
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            vectors[rows] = torch_backend.encode_padded([probe_ids[i] for i in rows])
        _reference_cache[key] = vectors
        return vectors
