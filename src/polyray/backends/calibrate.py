"""Measurements a backend is put through at load: accuracy against the reference, and speed.

* ``probe_texts`` / ``calibration_texts``: fixed, generated inputs (no download). The probe set
  checks a build before it serves; the calibration set shapes the int8 build. They come from
  different seeds, and both differ from the benchmark corpus, so no accuracy figure is measured on
  the data that tuned it.
* ``compare_to_reference``: cosine of every probe input, computed both in mixed-length batches and
  alone, because dynamic int8 quantizes each call's activations with one range per call: a row's
  vector depends a little on its batch-mates.
* ``measure_budget_curve`` and ``measure_fixed_cost_s``: the backend's speed on the batches the
  planner would form, which ``engine.budget_fit.BudgetFitter`` turns into a batch budget (the
  engine holds the fitting, decision and drift; this module only runs the backend and times it).
* ``FitCache``: the measured curve kept on disk, so a restart on the same machine, weights and
  build decides from it instead of measuring again (the measurement is most of a start: about
  35 s for MiniLM on this project's 2-core CPU). The key is everything the measurement depends
  on: the machine (CPU model, the instruction-set flags kernels dispatch on, cores usable), the
  model's weight hash, backend, precision, execution path, threads and the library versions.
  Only the measured curve is cached; the decision is re-made from it with the current policy,
  and drift re-decides while serving exactly as after a fresh measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from polyray.backends.base import Backend
from polyray.backends.probe_corpus import make_corpus
from polyray.policies import BatchPolicy, CurvePoint, plan_groups

log = logging.getLogger(__name__)

PROBE_SEED = 17
CALIBRATION_SEED = 29
MEASURE_SEED = 41
DEFAULT_BUDGETS = (128, 256, 512, 1024, 2048, 4096, 8192)
# Inputs a generated corpus never has: one word or character (an int8 build's worst case: its
# vector is the mean of three tokens, two of them [CLS] and [SEP]), punctuation only, non-Latin
# scripts, digits, a URL, and a text far over any model's maximum (truncated).
EDGE_TEXTS = (
    "x",
    "ok",
    "no",
    "?",
    "?!",
    "Hello!",
    "Ünïcödé façade — naïve café, 東京, Привет мир.",
    "3.14159 2.71828 1.41421 42 1e-9 0xFF",
    "https://example.com/a/b?c=d&e=f#g",
    "word " * 400,
)


FIT_CACHE_FORMAT = 1
# Instruction-set flags that decide which kernels torch and ONNX Runtime run (a fit made with
# AVX-512 or VNNI kernels says nothing about a CPU without them).
_KERNEL_FLAGS = frozenset(
    {
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512vnni",
        "avx512_bf16",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "asimd",
        "asimddp",
        "sve",
    }
)
_LIBRARIES = ("torch", "onnxruntime", "transformers")


def probe_texts(num_texts: int = 96) -> list[str]:
    """The probe set: generated sentences of 1-100 words plus ``EDGE_TEXTS``."""
    return make_corpus(num_texts, seed=PROBE_SEED, min_words=1, max_words=100) + list(EDGE_TEXTS)


def calibration_texts(num_texts: int = 128) -> list[str]:
    """What the int8 build's activation ranges are measured on (1-120 words, so long inputs count)."""
    return make_corpus(num_texts, seed=CALIBRATION_SEED, min_words=1, max_words=120)


@dataclass(frozen=True)
class ProbeReport:
    min_cosine: float
    mean_cosine: float
    worst_index: int  # into the probe inputs
    num_inputs: int


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b``."""
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.asarray(num / np.maximum(den, 1e-12), dtype=np.float64)


def compare_to_reference(
    encode: Callable[[Sequence[Sequence[int]]], np.ndarray],
    reference: np.ndarray,
    probe_ids: Sequence[Sequence[int]],
    batch_size: int = 32,
) -> ProbeReport:
    """Cosine of ``encode``'s vectors to ``reference`` (one row per probe input), worst case of two ways.

    Batched in a shuffled order (mixed lengths, as cross-request batches are) and one input per
    call (a lone request); each input counts with the lower of its two cosines.
    """
    order = list(range(len(probe_ids)))
    random.Random(PROBE_SEED).shuffle(order)
    batched = np.empty_like(reference)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batched[rows] = encode([probe_ids[i] for i in rows])
    alone = np.concatenate([encode([ids]) for ids in probe_ids])
    cosines = np.minimum(row_cosines(batched, reference), row_cosines(alone, reference))
    worst = int(np.argmin(cosines))
    return ProbeReport(float(cosines[worst]), float(cosines.mean()), worst, len(probe_ids))


def measure_fixed_cost_s(backend: Backend, shortest: Sequence[int], num_calls: int = 30) -> float:
    """Median time of a minimal forward call (``shortest``: e.g. [CLS] [SEP]): the fixed cost per call."""
    backend.encode([shortest])
    times = []
    for _ in range(num_calls):
        started = time.perf_counter()
        backend.encode([shortest])
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


@dataclass
class _Tally:
    times: list[float]
    num_sequences: int = 0
    num_tokens: int = 0
    cost_tokens: int = 0


def measure_budget_curve(
    backend: Backend,
    corpus_ids: Sequence[Sequence[int]],
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    base_policy: BatchPolicy | None = None,
    time_per_budget_s: float = 0.4,
    num_rounds: int = 4,
    seed: int = MEASURE_SEED,
) -> list[CurvePoint]:
    """Time the backend on the batches the planner forms at each budget from a saturated queue.

    A step at one budget draws ``window`` random corpus inputs (a full queue window), cuts them
    into batches with the planner's own ``plan_groups`` (length-sorted, within the budget and the
    maximum batch size) and runs every batch. The budgets take turns for ``num_rounds`` rounds,
    so a slow minute on a shared host (speed drifts 20-30 % here) lands on all of them rather
    than on one; each budget gets about ``time_per_budget_s`` in all. Blocking: call it on the
    thread that owns the backend (the runner's worker).
    """
    policy = base_policy or BatchPolicy()
    if not corpus_ids:
        raise ValueError("measure_budget_curve needs a corpus")
    rng = random.Random(seed)
    backend.encode([corpus_ids[0]] * 2)  # first calls allocate; keep them out of the figures
    tallies = {budget: _Tally([]) for budget in budgets}
    per_round_s = time_per_budget_s / max(1, num_rounds)
    for _ in range(max(1, num_rounds)):
        for budget in budgets:
            at_budget = BatchPolicy(
                budget_tokens=budget,
                max_batch_size=policy.max_batch_size,
                window=policy.window,
                overhead_tokens=policy.overhead_tokens,
                padding_free=backend.padding_free,
            )
            tally = tallies[budget]
            spent_s = 0.0
            while spent_s < per_round_s:
                window = sorted((rng.choice(corpus_ids) for _ in range(policy.window)), key=len)
                for start, end in plan_groups([len(s) for s in window], at_budget):
                    batch = window[start:end]
                    started = time.perf_counter()
                    backend.encode(batch)
                    elapsed = time.perf_counter() - started
                    spent_s += elapsed
                    lengths = [len(s) for s in batch]
                    tally.times.append(elapsed)
                    tally.num_sequences += len(batch)
                    tally.num_tokens += sum(lengths)
                    tally.cost_tokens += sum(lengths) if backend.padding_free else max(lengths) * len(lengths)
    return [
        CurvePoint(
            budget, len(t.times), t.num_sequences, t.num_tokens, t.cost_tokens, sum(t.times), 1000.0 * _p90(t.times)
        )
        for budget, t in tallies.items()
    ]


def machine_fingerprint(cpuinfo: str | None = None) -> dict[str, Any]:
    """What a measured speed depends on in the machine: CPU model, kernel flags, cores usable.

    ``cpuinfo`` is a ``/proc/cpuinfo`` text (read when None; empty where there is none).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    model = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep:
            continue
        if name in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif name in ("flags", "features") and not flags:
            flags = set(value.split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return {
        "machine": platform.machine(),
        "cpu_model": model or platform.processor(),
        "kernel_flags": sorted(flags & _KERNEL_FLAGS),
        "num_cpus": os.cpu_count() or 1,
        "num_usable_cpus": usable,
    }


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


class FitCache:
    """Measured budget curves on disk, one JSON file per key (see the module docstring).

    ``identity`` names the build as configured (backend, precision, execution, threads);
    ``weights_digest`` is called on the worker thread at the first fit (hashing the weights takes
    a moment, so it is not done at construction). A file that cannot be read or whose recorded
    key differs is treated as absent: the worst a damaged cache can cost is one measurement.
    """

    def __init__(
        self, directory: Path, identity: Mapping[str, Any], weights_digest: Callable[[], str] | None = None
    ) -> None:
        self.directory = directory
        self.identity = dict(identity)
        self._weights_digest = weights_digest
        self._digest: str | None = None

    def key(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        if self._digest is None and self._weights_digest is not None:
            self._digest = self._weights_digest()
        return {
            "format": FIT_CACHE_FORMAT,
            "machine": machine_fingerprint(),
            "libraries": _library_versions(),
            "weights_sha256": self._digest,
            **self.identity,
            **extra,
        }

    def path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{digest[:32]}.json"

    def load(self, key: Mapping[str, Any]) -> tuple[list[CurvePoint], float, str] | None:
        """(curve, fixed cost s, when measured) for ``key``, or None."""
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("key") != json.loads(json.dumps(key)):
                return None
            points = [CurvePoint(**point) for point in data["curve"]]
            return points, float(data["fixed_cost_s"]), str(data.get("measured_at", "?"))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def store(self, key: Mapping[str, Any], points: Sequence[CurvePoint], fixed_cost_s: float) -> Path | None:
        """Write atomically (a crash leaves the old file or none); a failure only logs: serving goes on."""
        path = self.path(key)
        record = {
            "key": key,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "fixed_cost_s": fixed_cost_s,
            "curve": [asdict(point) for point in points],
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".tmp", delete=False) as fh:
                json.dump(record, fh, indent=1)
            os.replace(fh.name, path)
        except OSError as exc:
            log.warning("could not keep the batch budget fit in %s (%s); the next start measures again", path, exc)
            return None
        return path
