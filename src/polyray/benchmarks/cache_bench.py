"""``bench/cache/serve.py``: the result cache end to end, cache off vs on, in one run.

The same Zipf-repeated workload (``num_requests`` single-sentence requests drawn with Zipf α over
``num_distinct`` corpus sentences, popularity unrelated to corpus order) is sent by
``concurrency`` closed-loop clients to ``polyray serve`` (the packaged MiniLM, real torch)
started afresh for each configuration:

- ``off``: ``[cache] enabled = false``, run first and again last (the VM's speed drifts; the
  baseline is the mean of the two);
- ``local``: the cache with its defaults (local tier only), recording the live key trace;
- with ``redis_url``: ``redis-cold`` (local + an empty shared tier under a fresh key prefix) and
  ``redis-warm`` (a new server, i.e. a restarted replica, over the tier the previous run filled).

Per run it reads, from the server itself: hits by tier, misses and deduplicated texts
(``GET /v1/admin/cache``, open on loopback with ``auth = "none"``), texts computed (the
``polyray_batch_size`` histogram's sum on ``/metrics``), compute-seconds charged (``/v1/usage``).
All are differences over the workload (a warm-up with other sentences comes first). Every answer
is compared (cosine) with the cache-off answer for the same sentence.

The live trace (the ``local`` run's ``[cache] trace_path``, warm-up lines dropped) is then replayed
through ``polyray.cache.sim``: LRU vs the tuned cache vs Belady at ``memory_fraction`` of its
distinct keys, as ``bench/cache/run.py --trace`` does.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from polyray.benchmarks.corpus import make_corpus
from polyray.benchmarks.loadgen import LoadResult, percentile, run_load
from polyray.benchmarks.server import free_port, start_server, stop_server
from polyray.cache import sim
from polyray.cache.tuner import policy_label
from polyray.config import default_threads

MODEL = "minilm@1"
COUNTS = ("local_hits", "shared_hits", "misses", "deduplicated")  # differences over the workload
TOTALS = ("redis_errors", "redis_skipped", "redis_keys_written")  # since the server started
NUM_WARMUP = 64


@dataclass(frozen=True)
class CacheBenchOptions:
    num_requests: int = 3000
    num_distinct: int = 1500
    zipf_alpha: float = 1.0
    concurrency: int = 32
    threads: int | None = None
    redis_url: str | None = None
    memory_fraction: float = 0.05
    retune_interval_s: float = 10.0
    seed: int = 20261122
    trace_out: str | None = None  # keep the live trace here
    json_out: str | None = None


@dataclass
class RunResult:
    name: str
    elapsed_s: float = 0.0
    num_ok: int = 0
    num_failed: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    local_hits: int = 0
    shared_hits: int = 0
    misses: int = 0
    deduplicated: int = 0
    texts_computed: int = 0
    compute_s: float = 0.0  # charged over the workload (batches + tokenization)
    num_cached: int = 0  # texts answered from a cache, per the usage ledger
    min_cosine_vs_off: float = 1.0
    # The shared tier's counters since the server started (warm-up included): a failed call marks
    # the tier down for a backoff, during which calls are skipped (answered as misses).
    redis_errors: int = 0
    redis_skipped: int = 0
    redis_keys_written: int = 0
    cache_decision: str = ""

    @property
    def requests_per_s(self) -> float:
        return self.num_ok / self.elapsed_s if self.elapsed_s else 0.0


@dataclass
class LiveTraceResult:
    num_refs: int
    num_distinct: int
    memory_entries: int
    lru: float
    tuned: float
    belady: float
    static_top_c: float
    decisions: list[str]


@dataclass
class CacheBenchReport:
    options: CacheBenchOptions
    threads: int
    num_distinct_drawn: int = 0
    ideal_hit_ratio: float = 0.0  # 1 - distinct / requests: an unbounded cache
    runs: list[RunResult] = field(default_factory=list)
    live: LiveTraceResult | None = None

    def run(self, name: str) -> RunResult:
        return next(r for r in self.runs if r.name == name)

    @property
    def baseline_rps(self) -> float:
        offs = [r for r in self.runs if r.name.startswith("off")]
        # Throughput of the baselines together: requests over summed time.
        return sum(r.num_ok for r in offs) / sum(r.elapsed_s for r in offs)

    def __str__(self) -> str:
        o = self.options
        lines = [
            f"cache bench: {o.num_requests} single-sentence requests drawn with Zipf α={o.zipf_alpha:g} from "
            f"{o.num_distinct} corpus sentences ({self.num_distinct_drawn} distinct drawn; an unbounded cache "
            f"would hit {self.ideal_hit_ratio:.3f}), {o.concurrency} closed-loop clients, {self.threads} torch threads",
            f"{'run':<11} {'req/s':>7} {'gain':>6} {'p50 ms':>7} {'p99 ms':>7} {'local':>6} {'shared':>6} "
            f"{'miss':>5} {'dedup':>5} {'computed':>8} {'compute s':>9} {'failed':>6} {'min cos':>8}",
        ]
        base = self.baseline_rps
        for r in self.runs:
            cached = r.name.startswith("off")
            lines.append(
                f"{r.name:<11} {r.requests_per_s:>7.1f} {r.requests_per_s / base:>6.2f} {r.p50_ms:>7.1f} "
                f"{r.p99_ms:>7.1f} {'-' if cached else r.local_hits:>6} {'-' if cached else r.shared_hits:>6} "
                f"{'-' if cached else r.misses:>5} {'-' if cached else r.deduplicated:>5} {r.texts_computed:>8} "
                f"{r.compute_s:>9.2f} {r.num_failed:>6} {r.min_cosine_vs_off:>8.5f}"
            )
        offs = [r for r in self.runs if r.name.startswith("off")]
        off_compute = sum(r.compute_s for r in offs) / len(offs)
        lines.append(f"baseline (cache off, mean of {len(offs)} runs): {base:.1f} req/s, {off_compute:.2f} compute-s")
        for r in self.runs:
            if r.name.startswith("off"):
                continue
            saved = off_compute - r.compute_s
            lines.append(
                f"{r.name}: throughput gain {r.requests_per_s / base:.2f}x; hits {r.local_hits} local + "
                f"{r.shared_hits} shared + {r.deduplicated} deduplicated in flight of {o.num_requests}; "
                f"{r.texts_computed} texts computed; compute saved {saved:.2f} s of {off_compute:.2f} "
                f"({saved / off_compute:.0%}); tuner: {r.cache_decision or 'no retune yet'}"
                + (
                    f"; redis since start: {r.redis_keys_written} keys written, {r.redis_errors} errors, "
                    f"{r.redis_skipped} calls skipped while backed off"
                    if r.name.startswith("redis")
                    else ""
                )
            )
        if self.live is not None:
            lv = self.live
            lines.append(
                f"live trace ({lv.num_refs} refs, {lv.num_distinct} distinct keys) at {o.memory_fraction:.0%} of "
                f"the distinct keys = {lv.memory_entries} entries: LRU {lv.lru:.3f}, tuned {lv.tuned:.3f}, "
                f"Belady {lv.belady:.3f}, static top-C {lv.static_top_c:.3f}; tuned/Belady "
                f"{lv.tuned / lv.belady if lv.belady else 0:.3f}, tuned/LRU {lv.tuned / lv.lru if lv.lru else 0:.3f}; "
                f"policies chosen: {' '.join(lv.decisions)}"
            )
        return "\n".join(lines)


def workload(opts: CacheBenchOptions) -> tuple[list[str], list[str]]:
    """(the requests' sentences in order, warm-up sentences that the workload never uses)."""
    corpus = make_corpus(opts.num_distinct + NUM_WARMUP, seed=opts.seed)
    sentences, warmup = corpus[: opts.num_distinct], corpus[opts.num_distinct :]
    rng = np.random.default_rng(opts.seed)
    weights = 1.0 / np.arange(1, opts.num_distinct + 1, dtype=np.float64) ** opts.zipf_alpha
    ranks = rng.choice(opts.num_distinct, size=opts.num_requests, p=weights / weights.sum())
    popularity = rng.permutation(opts.num_distinct)  # rank -> sentence: popularity unrelated to order
    return [sentences[int(popularity[r])] for r in ranks], warmup


def _get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        return orjson.loads(resp.read())


def _metric_sum(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rpartition(" ")[2])
    return total


def _usage(port: int) -> tuple[float, int]:
    """(compute-seconds, texts answered from a cache) charged to every client so far."""
    data = _get_json(port, "/v1/usage?since=-1d")["data"]
    return sum(float(row["compute_s"]) for row in data), sum(int(row["num_cached"]) for row in data)


def _cache_counts(port: int) -> dict[str, Any]:
    report = _get_json(port, "/v1/admin/cache")
    if not report.get("enabled"):
        zero = dict.fromkeys((*COUNTS, *TOTALS), 0)
        return {**zero, "decision": ""}
    model = report["models"][MODEL]
    decision = model["decision"]
    shared = report["shared"] or {}
    return {
        "local_hits": model["local_hits"],
        "shared_hits": model["shared_hits"],
        "misses": model["misses"],
        "deduplicated": report["deduplicated_texts"],
        "redis_errors": shared.get("num_errors", 0),
        "redis_skipped": shared.get("num_skipped", 0),
        "redis_keys_written": shared.get("num_keys_written", 0),
        "decision": ""
        if decision is None
        else f"{policy_label((decision['admission'], decision['window_fraction']))}, "
        f"{decision['capacity_bytes'] / 1e6:.1f} MB after {report['retunes']} retunes",
    }


def _start_server(home: Path, threads: int, port: int, cache_toml: str) -> subprocess.Popen[bytes]:
    return start_server(
        home,
        '[server]\nmax_queue_items = 4096\n\n[tenancy]\nauth = "none"\n\n'
        f'[[models]]\nname = "minilm"\nversion = "1"\nthreads = {threads}\n\n[cache]\n{cache_toml}',
        port,
    )


def _load(port: int, bodies: list[bytes], concurrency: int) -> LoadResult:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(run_load("127.0.0.1", port, "/v1/embeddings", bodies, concurrency))
    return uvloop.run(run_load("127.0.0.1", port, "/v1/embeddings", bodies, concurrency))


def _vectors(result: LoadResult) -> list[np.ndarray | None]:
    return [
        np.asarray(orjson.loads(body)["data"][0]["embedding"], dtype=np.float32) if status == 200 else None
        for status, body in zip(result.statuses, result.bodies, strict=True)
    ]


def _min_cosine(a: list[np.ndarray | None], b: list[np.ndarray | None]) -> float:
    worst = 1.0
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None:
            worst = min(worst, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return worst


def _one_run(
    name: str, opts: CacheBenchOptions, threads: int, cache_toml: str, bodies: list[bytes], warmup: list[bytes]
) -> tuple[RunResult, list[np.ndarray | None], Path | None]:
    """One server from start to stop; its key trace (if it records one) is copied out first."""
    home = Path(tempfile.mkdtemp(prefix=f"polyray-cache-bench-{name}-"))
    port = free_port()
    server = _start_server(home, threads, port, cache_toml.replace("@HOME@", str(home)))
    out = RunResult(name)
    try:
        _load(port, warmup, min(opts.concurrency, len(warmup)))
        compute0, cached0 = _usage(port)
        counts0 = _cache_counts(port)
        computed0 = _metric_sum(port, "polyray_batch_size_sum")
        result = _load(port, bodies, opts.concurrency)
        compute1, cached1 = _usage(port)
        counts1 = _cache_counts(port)
        out.elapsed_s = result.elapsed_s
        out.num_ok = result.num_ok
        out.num_failed = len(bodies) - result.num_ok
        out.p50_ms = percentile(result.latencies_s, 50) * 1000
        out.p99_ms = percentile(result.latencies_s, 99) * 1000
        for key in COUNTS:
            setattr(out, key, counts1[key] - counts0[key])
        for key in TOTALS:
            setattr(out, key, counts1[key])
        out.cache_decision = counts1["decision"]
        out.texts_computed = round(_metric_sum(port, "polyray_batch_size_sum") - computed0)
        out.compute_s = compute1 - compute0
        out.num_cached = cached1 - cached0
        vectors = _vectors(result)
    finally:
        stop_server(server)
    trace = home / "keys.trace"
    kept: Path | None = None
    if trace.exists():
        kept = Path(tempfile.gettempdir()) / f"polyray-cache-bench-{name}-{uuid.uuid4().hex[:8]}.trace"
        shutil.copy(trace, kept)
    shutil.rmtree(home, ignore_errors=True)
    return out, vectors, kept


def _drop_warmup(src: Path, dst: Path, num_warmup: int) -> None:
    lines = src.read_text().splitlines(keepends=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(lines[num_warmup:]))


async def _delete_prefix(url: str, prefix: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        found = [k async for k in client.scan_iter(match=prefix.encode() + b"*", count=1000)]
        if found:
            await client.delete(*found)
        return len(found)
    finally:
        await client.aclose()


def run_cache_bench(opts: CacheBenchOptions) -> CacheBenchReport:
    threads = opts.threads or default_threads()
    texts, warmup_texts = workload(opts)
    bodies = [orjson.dumps({"model": "minilm", "input": t}) for t in texts]
    warmup = [orjson.dumps({"model": "minilm", "input": t}) for t in warmup_texts]
    report = CacheBenchReport(opts, threads)
    report.num_distinct_drawn = len(set(texts))
    report.ideal_hit_ratio = 1.0 - report.num_distinct_drawn / len(texts)
    retune = f"retune_interval_s = {opts.retune_interval_s}\n"
    configs: list[tuple[str, str]] = [
        ("off", "enabled = false\n"),
        ("local", retune + 'trace_path = "@HOME@/keys.trace"\n'),
    ]
    prefix = f"polyray:bench:{uuid.uuid4().hex[:12]}:"
    if opts.redis_url:
        shared = f'redis_url = "{opts.redis_url}"\nkey_prefix = "{prefix}"\n'
        configs += [("redis-cold", retune + shared), ("redis-warm", retune + shared)]
    configs.append(("off-again", "enabled = false\n"))
    baseline: list[np.ndarray | None] | None = None
    traces: dict[str, Path] = {}
    try:
        for name, cache_toml in configs:
            result, vectors, trace = _one_run(name, opts, threads, cache_toml, bodies, warmup)
            if trace is not None:
                traces[name] = trace
            if baseline is None:
                baseline = vectors
            result.min_cosine_vs_off = _min_cosine(vectors, baseline)
            report.runs.append(result)
            print(f"  {name}: {result.requests_per_s:.1f} req/s", file=sys.stderr, flush=True)
    finally:
        if opts.redis_url:
            asyncio.run(_delete_prefix(opts.redis_url, prefix))
    recorded = traces.get("local")
    if recorded is not None:
        live_path = Path(opts.trace_out) if opts.trace_out else recorded.with_suffix(".workload.trace")
        _drop_warmup(recorded, live_path, len(warmup))
        cmp = sim.compare_at_equal_memory(sim.read_trace(live_path), opts.memory_fraction)
        report.live = LiveTraceResult(
            num_refs=cmp.num_refs,
            num_distinct=cmp.num_distinct,
            memory_entries=cmp.memory_entries,
            lru=cmp.lru,
            tuned=cmp.tuned.hit_ratio,
            belady=cmp.belady,
            static_top_c=cmp.static_top_c,
            decisions=[policy_label((d.admission, d.window_fraction)) for d in cmp.tuned.decisions],
        )
        recorded.unlink(missing_ok=True)
    if opts.json_out:
        Path(opts.json_out).parent.mkdir(parents=True, exist_ok=True)
        body = {
            **asdict(report),
            "baseline_rps": report.baseline_rps,
            "gains": {r.name: r.requests_per_s / report.baseline_rps for r in report.runs},
        }
        Path(opts.json_out).write_text(json.dumps(body, indent=2))
    return report
