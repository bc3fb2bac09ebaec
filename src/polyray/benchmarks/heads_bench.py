"""``bench/heads``: what does each task head add to a ``/v1/infer`` request?

The promise of heads is that a client can apply many of them to the one shared embedding for
a few percent of the forward pass each. This bench measures it end to end, in one run, against
``polyray serve`` (the packaged MiniLM, real torch) as users run it:

1. **Train** ``num_heads`` heads (100 by default) through the HTTP API with ``polyray.Client``,
   from the shipped topics data set (``polyray.heads.datasets.load_topics``, 360 sentences, 6
   topics): the main 6-topic classifier ``topics``, classifiers with other seeds and
   regularization, one-vs-rest and topic-pair classifiers, multilabel heads (topic, length and
   topic group), regressors of numbers derived from the text (word count, length, long words,
   a topic flag) and PCA projections of 8-64 dimensions. The server runs with its result cache
   on, so the 360 sentences are embedded once and every later head trains from cached vectors.
   The families are interleaved, so the first 10 heads are a mix of kinds too.
2. **Measure**: the server is restarted on the same ``POLYRAY_HOME`` (heads persist in its
   database) with ``[cache] enabled = false``, so every request runs its forward pass. One
   sequential client (no batching across requests, no queueing) sends the same requests under
   each condition - 0, 1, 10 and ``num_heads`` heads - interleaved round by round (the order
   rotates every round) so drift in the machine's speed hits every condition alike. Each request
   is ``texts_per_request`` short corpus sentences (``polyray.benchmarks.corpus``), the same
   texts in every condition. Recorded per request: client latency (request out to the whole body
   in) and the server's ``X-Polyray-Inference-Ms`` (forward pass), ``X-Polyray-Heads-Ms``
   (applying the heads) and ``X-Polyray-Compute-Ms`` (what the caller was charged).

The figure of merit: **marginal cost per head** = (mean latency at ``num_heads`` - mean latency
at 0) / ``num_heads``, divided by the mean forward pass at 0 heads (inference ms), as a
percentage; the goal is at most 3 %. Client latency is used, not the server's heads time, because
it includes everything a head adds (name resolution, the stacked product, building and encoding
its JSON output, and sending it), which is what the caller waits for.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from polyray.benchmarks.corpus import make_corpus
from polyray.benchmarks.loadgen import percentile
from polyray.benchmarks.server import free_port, start_server, stop_server
from polyray.client import Client, Head, HeadTrainingFailed
from polyray.config import default_threads
from polyray.heads.datasets import load_topics

MODEL = "minilm@1"
MAIN_HEAD = "topics"
GOAL_FRACTION = 0.03  # marginal cost per head / forward pass
LONG_SENTENCE_WORDS = 16  # the multilabel "long" tag
LONG_WORD_CHARS = 7  # a regressor target: words of at least this many letters
TOPIC_GROUPS = {
    "sports": "leisure",
    "cooking": "leisure",
    "travel": "leisure",
    "technology": "work",
    "finance": "work",
    "health": "care",
}


@dataclass(frozen=True)
class HeadsBenchOptions:
    num_heads: int = 100
    rounds: int = 5
    requests_per_condition: int = 60  # per round
    texts_per_request: int = 1
    warmup_requests: int = 10  # per condition, before the first round, not recorded
    threads: int | None = None
    seed: int = 20261123
    keep_home: bool = False
    json_out: str | None = None

    @property
    def conditions(self) -> tuple[int, ...]:
        """Heads per request: 0, 1, 10 and all of them (deduplicated for a small ``num_heads``)."""
        return tuple(sorted({0, min(1, self.num_heads), min(10, self.num_heads), self.num_heads}))


@dataclass(frozen=True)
class HeadJob:
    """One head to train: what ``POST /v1/heads`` gets."""

    name: str
    kind: str
    examples: list[dict[str, Any]]
    options: dict[str, Any]


@dataclass
class ConditionResult:
    num_heads: int
    latency_ms: list[float] = field(default_factory=list)  # client: request out to whole body in
    inference_ms: list[float] = field(default_factory=list)  # server: the forward pass
    heads_ms: list[float] = field(default_factory=list)  # server: applying the heads
    compute_ms: list[float] = field(default_factory=list)  # server: charged to the caller
    round_mean_latency_ms: list[float] = field(default_factory=list)
    response_bytes: int = 0  # of one response
    num_failed: int = 0

    def p(self, q: float) -> float:
        return percentile(self.latency_ms, q)

    @property
    def mean_latency_ms(self) -> float:
        return statistics.fmean(self.latency_ms) if self.latency_ms else float("nan")

    @staticmethod
    def _mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else float("nan")

    @property
    def mean_inference_ms(self) -> float:
        return self._mean(self.inference_ms)

    @property
    def mean_heads_ms(self) -> float:
        return self._mean(self.heads_ms)

    @property
    def mean_compute_ms(self) -> float:
        return self._mean(self.compute_ms)


@dataclass
class TrainingResult:
    num_heads: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0  # first upload to the last head ready
    failed: list[str] = field(default_factory=list)
    main_metrics: dict[str, float] = field(default_factory=dict)
    main_num_examples: int = 0


@dataclass
class HeadsBenchReport:
    options: HeadsBenchOptions
    threads: int
    training: TrainingResult = field(default_factory=TrainingResult)
    conditions: list[ConditionResult] = field(default_factory=list)

    def condition(self, num_heads: int) -> ConditionResult:
        return next(c for c in self.conditions if c.num_heads == num_heads)

    @property
    def forward_ms(self) -> float:
        """The mean forward pass of a request at 0 heads (server's inference ms)."""
        return self.condition(0).mean_inference_ms

    @property
    def marginal_ms_per_head(self) -> float:
        """(mean latency with the most heads - mean latency with none) / that many heads."""
        most = max(self.options.conditions)
        if most == 0:
            return float("nan")
        return (self.condition(most).mean_latency_ms - self.condition(0).mean_latency_ms) / most

    @property
    def marginal_fraction(self) -> float:
        return self.marginal_ms_per_head / self.forward_ms

    @property
    def slope_ms_per_head(self) -> float:
        """Least-squares slope of mean latency over the conditions (uses all four, not two)."""
        xs = [float(c.num_heads) for c in self.conditions]
        ys = [c.mean_latency_ms for c in self.conditions]
        return float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 2 else float("nan")

    @property
    def server_heads_ms_per_head(self) -> float:
        most = max(self.options.conditions)
        return self.condition(most).mean_heads_ms / most if most else float("nan")

    @property
    def passed(self) -> bool:
        return self.marginal_fraction <= GOAL_FRACTION

    def __str__(self) -> str:
        o, t = self.options, self.training
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(t.kinds.items()))
        main = t.main_metrics
        lines = [
            f"heads bench: {t.num_heads} heads ({kinds}) trained through the API in {t.elapsed_s:.1f} s "
            f"(cache on)" + (f"; FAILED: {', '.join(t.failed)}" if t.failed else ""),
            f"main classifier {MAIN_HEAD!r} ({t.main_num_examples} sentences, 6 topics), validation: "
            f"accuracy {main.get('accuracy', float('nan')):.3f}, macro-F1 {main.get('macro_f1', float('nan')):.3f}, "
            f"majority baseline {main.get('baseline_accuracy', float('nan')):.3f}",
            f"inference: cache off, {o.rounds} rounds x {o.requests_per_condition} requests per condition, "
            f"{o.texts_per_request} sentence(s) per request, one sequential client, {self.threads} torch threads",
            f"{'heads':>5} {'requests':>8} {'p50 ms':>8} {'mean ms':>8} {'p99 ms':>8} {'infer ms':>9} "
            f"{'heads ms':>9} {'compute ms':>10} {'resp KB':>8} {'failed':>6}  round means ms",
        ]
        for c in self.conditions:
            rounds = " ".join(f"{m:.2f}" for m in c.round_mean_latency_ms)
            lines.append(
                f"{c.num_heads:>5} {len(c.latency_ms):>8} {c.p(50):>8.2f} {c.mean_latency_ms:>8.2f} {c.p(99):>8.2f} "
                f"{c.mean_inference_ms:>9.2f} {c.mean_heads_ms:>9.3f} {c.mean_compute_ms:>10.2f} "
                f"{c.response_bytes / 1024:>8.1f} {c.num_failed:>6}  {rounds}"
            )
        most = max(o.conditions)
        lines += [
            f"forward pass (inference ms at 0 heads, mean): {self.forward_ms:.2f} ms",
            f"marginal cost per head = (mean latency at {most} heads - at 0) / {most} = "
            f"{self.marginal_ms_per_head * 1000:.1f} µs = {self.marginal_fraction:.2%} of a forward pass: "
            f"{'PASS' if self.passed else 'FAIL'} (goal <= {GOAL_FRACTION:.0%})",
            f"cross-checks: least-squares slope over all conditions {self.slope_ms_per_head * 1000:.1f} µs/head "
            f"({self.slope_ms_per_head / self.forward_ms:.2%}); server-measured heads time at {most} heads "
            f"{self.server_heads_ms_per_head * 1000:.1f} µs/head ({self.server_heads_ms_per_head / self.forward_ms:.2%})",
        ]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        summary = {
            str(c.num_heads): {
                "p50_ms": c.p(50),
                "mean_ms": c.mean_latency_ms,
                "p99_ms": c.p(99),
                "inference_ms": c.mean_inference_ms,
                "heads_ms": c.mean_heads_ms,
                "compute_ms": c.mean_compute_ms,
            }
            for c in self.conditions
        }
        return {
            **asdict(self),
            "summary": summary,
            "forward_ms": self.forward_ms,
            "marginal_ms_per_head": self.marginal_ms_per_head,
            "marginal_fraction": self.marginal_fraction,
            "slope_ms_per_head": self.slope_ms_per_head,
            "server_heads_ms_per_head": self.server_heads_ms_per_head,
            "goal_fraction": GOAL_FRACTION,
            "passed": self.passed,
        }


# -- the heads -----------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


def _classifiers(topics: list[dict[str, Any]]) -> Iterator[HeadJob]:
    """Six-topic classifiers that differ in split seed and regularization."""
    regularizations = (0.1, 0.3, 1.0, 3.0, 10.0)
    for seed in range(1, 26):
        reg = regularizations[seed % len(regularizations)]
        yield HeadJob(f"topics-s{seed}-r{reg:g}", "classifier", topics, {"seed": seed, "regularization": reg})


def _one_vs_rest(topics: list[dict[str, Any]]) -> Iterator[HeadJob]:
    for seed in (0, 1):
        for topic in sorted(TOPIC_GROUPS):
            examples = [{"text": r["text"], "label": "yes" if r["label"] == topic else "no"} for r in topics]
            yield HeadJob(f"is-{topic}-s{seed}", "classifier", examples, {"seed": seed})


def _pairs(topics: list[dict[str, Any]]) -> Iterator[HeadJob]:
    for a, b in combinations(sorted(TOPIC_GROUPS), 2):
        examples = [r for r in topics if r["label"] in (a, b)]
        yield HeadJob(f"pair-{a}-{b}", "classifier", examples, {})


def _multilabel(topics: list[dict[str, Any]]) -> Iterator[HeadJob]:
    """Tags: the topic, its group, and ``long`` for sentences of ``LONG_SENTENCE_WORDS`` words or more."""
    examples = [
        {
            "text": r["text"],
            "label": [r["label"], TOPIC_GROUPS[r["label"]]]
            + (["long"] if len(_words(r["text"])) >= LONG_SENTENCE_WORDS else []),
        }
        for r in topics
    ]
    for threshold in (0.3, 0.5, 0.7):
        for seed in range(6):
            yield HeadJob(
                f"tags-t{threshold:g}-s{seed}", "multilabel", examples, {"threshold": threshold, "seed": seed}
            )


def _regressors(topics: list[dict[str, Any]]) -> Iterator[HeadJob]:
    """Numbers derived from each sentence, so no labels need inventing."""
    targets: dict[str, Callable[[str, str], float]] = {
        "words": lambda text, _: float(len(_words(text))),
        "chars": lambda text, _: len(text) / 10.0,
        "long-words": lambda text, _: float(sum(len(w.strip(".,;:!?'\"")) >= LONG_WORD_CHARS for w in _words(text))),
        "finance-flag": lambda _, label: 1.0 if label == "finance" else 0.0,
    }
    for reg in (0.1, 1.0, 10.0, 100.0):
        for name, target in targets.items():
            examples = [{"text": r["text"], "label": target(r["text"], r["label"])} for r in topics]
            yield HeadJob(f"{name}-r{reg:g}", "regressor", examples, {"regularization": reg})


def _projections(topics: list[dict[str, Any]]) -> Iterator[HeadJob]:
    texts = [{"text": r["text"]} for r in topics]
    for seed in range(4):
        for dims in (8, 16, 32, 64):
            yield HeadJob(f"pca{dims}-s{seed}", "projection", texts, {"dimensions": dims, "seed": seed})


def plan_heads(num_heads: int) -> list[HeadJob]:
    """``MAIN_HEAD`` first, then the families round-robin (so any prefix mixes the kinds)."""
    topics = load_topics()
    families = [iter(f(topics)) for f in (_classifiers, _multilabel, _regressors, _projections, _one_vs_rest, _pairs)]
    jobs = [HeadJob(MAIN_HEAD, "classifier", topics, {})]
    while len(jobs) < num_heads and families:
        for family in list(families):
            job = next(family, None)
            if job is None:
                families.remove(family)
            elif len(jobs) < num_heads:
                jobs.append(job)
    if len(jobs) < num_heads:
        raise ValueError(f"at most {len(jobs)} heads are planned, not {num_heads}")
    return jobs


def train_heads(port: int, jobs: Sequence[HeadJob], out: TrainingResult) -> list[Head]:
    """Upload every job (the server trains them one after another), then wait for each in turn."""
    started = time.perf_counter()
    with Client(f"http://127.0.0.1:{port}", api_key="", timeout_s=120.0) as client:
        accepted = [
            client.train_head(j.name, j.kind, j.examples, model=MODEL, options=j.options, wait=False) for j in jobs
        ]
        done: list[Head] = []
        for head in accepted:
            try:
                done.append(client.wait_for_head(head, poll_interval_s=0.2, timeout_s=1800.0))
            except HeadTrainingFailed as exc:  # reported with the others after the loop
                done.append(exc.head)
            if len(done) % 10 == 0 or len(done) == len(jobs):
                print(f"bench: {len(done)}/{len(jobs)} heads trained", file=sys.stderr, flush=True)
    out.elapsed_s = time.perf_counter() - started
    out.num_heads = len(done)
    out.kinds = dict(Counter(h.kind for h in done))
    main = done[0]
    out.main_metrics = dict(main.metrics)
    out.main_num_examples = main.num_examples
    return done


# -- measuring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    status: int
    latency_ms: float
    inference_ms: float
    heads_ms: float
    compute_ms: float
    body: bytes


def _header_ms(response: http.client.HTTPResponse, name: str) -> float:
    value = response.getheader(name)
    return float(value) if value is not None else float("nan")


class InferSender:
    """One keep-alive connection, sequential requests; the stdlib client costs little per request."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self, body: bytes) -> Sample:
        headers = {"Content-Type": "application/json"}
        started = time.perf_counter()
        self.conn.request("POST", "/v1/infer", body=body, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        latency_ms = (time.perf_counter() - started) * 1000
        return Sample(
            response.status,
            latency_ms,
            _header_ms(response, "X-Polyray-Inference-Ms"),
            _header_ms(response, "X-Polyray-Heads-Ms"),
            _header_ms(response, "X-Polyray-Compute-Ms"),
            payload,
        )

    def close(self) -> None:
        self.conn.close()


def _valid(sample: Sample, num_texts: int, num_heads: int) -> bool:
    """A 200 with one row per text, each carrying every head asked for."""
    if sample.status != 200:
        return False
    data = orjson.loads(sample.body)["data"]
    return len(data) == num_texts and all(len(row["heads"]) == num_heads for row in data)


def _bodies(opts: HeadsBenchOptions, head_names: Sequence[str]) -> dict[int, list[bytes]]:
    """Per condition, the same requests: ``requests_per_condition`` groups of corpus sentences."""
    sentences = make_corpus(
        opts.requests_per_condition * opts.texts_per_request, seed=opts.seed, min_words=6, max_words=14
    )
    groups = [
        sentences[i * opts.texts_per_request : (i + 1) * opts.texts_per_request]
        for i in range(opts.requests_per_condition)
    ]
    return {
        k: [orjson.dumps({"model": MODEL, "input": g, "heads": list(head_names[:k])}) for g in groups]
        for k in opts.conditions
    }


def measure(port: int, opts: HeadsBenchOptions, head_names: Sequence[str], report: HeadsBenchReport) -> None:
    bodies = _bodies(opts, head_names)
    results = {k: ConditionResult(k) for k in opts.conditions}
    report.conditions = list(results.values())
    sender = InferSender(port)
    try:
        for k in opts.conditions:  # warm-up: loads every head set's stacked parameters, warms the paths
            for body in bodies[k][: opts.warmup_requests]:
                sample = sender.send(body)
                if not _valid(sample, opts.texts_per_request, k):
                    raise SystemExit(
                        f"bench: warm-up request with {k} heads failed: {sample.status} {sample.body[:300]!r}"
                    )
                results[k].response_bytes = len(sample.body)
        order = list(opts.conditions)
        for round_index in range(opts.rounds):
            shift = round_index % len(order)
            for k in order[shift:] + order[:shift]:
                result = results[k]
                latencies: list[float] = []
                for body in bodies[k]:
                    sample = sender.send(body)
                    if not _valid(sample, opts.texts_per_request, k):
                        result.num_failed += 1
                        continue
                    latencies.append(sample.latency_ms)
                    result.inference_ms.append(sample.inference_ms)
                    result.heads_ms.append(sample.heads_ms)
                    result.compute_ms.append(sample.compute_ms)
                result.latency_ms += latencies
                result.round_mean_latency_ms.append(statistics.fmean(latencies) if latencies else float("nan"))
            print(f"bench: round {round_index + 1}/{opts.rounds} done", file=sys.stderr, flush=True)
    finally:
        sender.close()


# -- the run -------------------------------------------------------------------------------------


def _config(threads: int, cache_enabled: bool) -> str:
    # auth = "none" (loopback only): every caller is "anonymous", the heads' owner; no key needed.
    return (
        '[tenancy]\nauth = "none"\n\n'
        f'[[models]]\nname = "minilm"\nversion = "1"\nthreads = {threads}\n\n'
        f"[cache]\nenabled = {'true' if cache_enabled else 'false'}\n"
    )


def _start(home: Path, threads: int, cache_enabled: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    return start_server(home, _config(threads, cache_enabled), port), port


def run_heads_bench(opts: HeadsBenchOptions) -> HeadsBenchReport:
    threads = opts.threads or default_threads()
    report = HeadsBenchReport(opts, threads)
    jobs = plan_heads(opts.num_heads)
    home = Path(tempfile.mkdtemp(prefix="polyray-heads-bench-"))
    try:
        server, port = _start(home, threads, cache_enabled=True)
        try:
            heads = train_heads(port, jobs, report.training)
        finally:
            stop_server(server)
        report.training.failed = [h.name for h in heads if not h.ready]
        if report.training.failed:
            raise SystemExit(f"bench: heads failed to train: {report.training.failed}")
        server, port = _start(home, threads, cache_enabled=False)
        try:
            measure(port, opts, [h.name for h in heads], report)
        finally:
            stop_server(server)
    finally:
        if opts.keep_home:
            print(f"bench: server home kept at {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)
    if opts.json_out:
        Path(opts.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_out).write_text(json.dumps(report.as_json(), indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/heads/run.py",
        description="Latency of /v1/infer with 0, 1, 10 and N task heads; marginal cost per head vs a forward pass.",
    )
    defaults = HeadsBenchOptions()
    parser.add_argument("--heads", type=int, default=defaults.num_heads, help="heads to train (the largest condition)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="interleaved rounds of every condition")
    parser.add_argument(
        "--requests", type=int, default=defaults.requests_per_condition, help="requests per condition per round"
    )
    parser.add_argument(
        "--texts", type=int, default=defaults.texts_per_request, help="sentences per request (e.g. 1 or 4)"
    )
    parser.add_argument(
        "--warmup", type=int, default=defaults.warmup_requests, help="unrecorded requests per condition"
    )
    parser.add_argument("--threads", type=int, help="torch threads of the server (default: all cores)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--keep-home", action="store_true", help="keep the server's data directory")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.heads < 1 or args.rounds < 1 or args.requests < 1 or args.texts < 1:
        parser.error("--heads, --rounds, --requests and --texts must be at least 1")
    report = run_heads_bench(
        HeadsBenchOptions(
            num_heads=args.heads,
            rounds=args.rounds,
            requests_per_condition=args.requests,
            texts_per_request=args.texts,
            warmup_requests=args.warmup,
            threads=args.threads,
            seed=args.seed,
            keep_home=args.keep_home,
            json_out=args.json,
        )
    )
    print(report)
    return 0
