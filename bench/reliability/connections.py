"""2,000 idle and slow connections: normal clients unaffected, the server's descriptors reclaimed.

    flock /tmp/polyray-cpu.lock .venv/bin/python bench/reliability/connections.py \\
        [--phase-s 15] [--idle 1000] [--slow 1000] [--max-connections N]

One ``polyray serve`` (packaged MiniLM, torch) with the default connection limits (or
``--max-connections``). A probe client sends one-sentence embedding requests one after another
on a keep-alive connection, and a second one polls ``/healthz``; both are measured in phases:

- *quiet* (before and after): nothing else runs;
- *attack*: a separate attacker process holds ``--idle`` connections that never send a byte and
  ``--slow`` connections that send a request head one byte a second and never finish it
  (slowloris), and reopens every connection the server closes, so about 2,000 are pending all
  the time.

Then the attacker stops reopening but keeps every socket it has: the server must close them on
its own (idle and head timeouts). The server's descriptors (``/proc/<pid>/fd``) are sampled
before, during (peak) and after.

Before the fix such connections were never closed, and 1,100 idle sockets exhausted a
1,024-descriptor limit. PASS when the probe's p50 and p99 during the attack are within 2x of
the quiet phases', every probe request and ``/healthz`` answered 200, the peak descriptor count
stayed within the connection limit (plus lingering slots, closes in passing and the server's
own), and within ``idle_timeout_s + head_timeout_s + 10 s`` after the attack the descriptors are
back to the quiet count (+10). Exit code 1 on FAIL.

With ``--max-connections`` below the attacker's count (say 1024), every new connection displaces
an idle one and the attacker reopens it at once: tens of thousands of accepts and closes per
phase, whose CPU (both processes' is printed) shares the cores with the model. Every request is
still answered; the latency ratio then depends on how much CPU is spare. Per-address connection
limits belong in front of the server (load balancer, firewall).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import Connections, Record, bodies, closed_loop, percentile, running_server, verdict

from polyray.config import ServerConfig
from polyray.server import connection_budget, lingering_slots
from polyray.tenancy.model import PriorityClass

TARGET_RATIO = 2.0
RECLAIM_SLACK_FDS = 10
# Displaced connections whose close is still pending when a sample is taken (a close completes on
# the event loop's next iteration, and one iteration may accept many connections).
CLOSING_SLACK_FDS = 32
RAMP_CONNECTS_PER_S = 1000  # the attacker opens its connections at this rate (no SYN-backlog overflow)


# -- the attacker (a separate process: its sockets and loop do not share the probe's) ------------


@dataclass
class AttackStats:
    opened: int = 0
    closed_by_server: int = 0
    failed_to_open: int = 0
    open_now: int = 0
    cpu_s: float = 0.0  # the attacker's own CPU: it shares the machine's cores with the server
    answers: dict[str, int] = field(default_factory=dict)


async def attack(port: int, num_idle: int, num_slow: int, attack_s: float, hold_s: float) -> AttackStats:
    stats = AttackStats()
    reopen_until = time.monotonic() + attack_s
    end_at = reopen_until + hold_s
    held: list[asyncio.StreamWriter] = []

    async def one(slow: bool, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while time.monotonic() < reopen_until:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats.failed_to_open += 1
                await asyncio.sleep(0.5)
                continue
            stats.opened += 1
            stats.open_now += 1
            held.append(writer)
            if slow:
                writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            closed = False
            while time.monotonic() < end_at:
                try:
                    got = await asyncio.wait_for(reader.read(65536), timeout=1.0)
                except TimeoutError:
                    if slow:
                        writer.write(b"a")  # one byte a second: the head never ends
                    continue
                except OSError:
                    got = b""
                if got:
                    key = got.split(b"\r\n", 1)[0].decode(errors="replace")
                    stats.answers[key] = stats.answers.get(key, 0) + 1
                    continue
                closed = True
                break
            stats.open_now -= 1
            if not closed:
                return  # the end: the socket stays open until the process exits
            stats.closed_by_server += 1
            writer.close()

    tasks = [asyncio.ensure_future(one(i >= num_idle, i / RAMP_CONNECTS_PER_S)) for i in range(num_idle + num_slow)]
    await asyncio.sleep(max(0.0, end_at - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for writer in held:
        writer.transport.abort()
    return stats


def attacker_main(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.idle + args.slow + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    stats = asyncio.run(attack(args.port, args.idle, args.slow, args.attack_s, args.hold_s))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.cpu_s = round(usage.ru_utime + usage.ru_stime, 1)
    print(json.dumps(stats.__dict__), flush=True)
    return 0


# -- the measurement -------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def num_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError("no descriptor limit in /proc")


async def health_loop(port: int, duration_s: float, out: Record) -> None:
    """GET /healthz every 100 ms on a keep-alive connection, as a probe from a load balancer would."""
    conns = Connections(port, None)
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        out.answers.append(await conns.request(b"", start, path="/healthz"))
        await asyncio.sleep(0.1)
    conns.close()


@dataclass
class Phase:
    probe: Record
    health: Record
    peak_fds: int
    server_cpu_s: float


async def measure(port: int, key: str, pid: int, phase_s: float, payloads: list[bytes]) -> Phase:
    """Probe and /healthz records for one phase, the peak descriptor count and the server's CPU meanwhile."""
    probe = Connections(port, key)
    probe_record, health_record = Record(), Record()
    peak = 0
    cpu_before = cpu_s(pid)

    async def sample() -> None:
        nonlocal peak
        start = time.perf_counter()
        while time.perf_counter() - start < phase_s:
            peak = max(peak, num_fds(pid))
            await asyncio.sleep(0.25)

    await asyncio.gather(
        closed_loop(probe, payloads, phase_s, probe_record),
        health_loop(port, phase_s, health_record),
        sample(),
    )
    probe.close()
    return Phase(probe_record, health_record, peak, cpu_s(pid) - cpu_before)


def summary(name: str, phase: Phase) -> str:
    probe, health = phase.probe, phase.health
    ok = probe.ok_ms()
    return (
        f"  {name:<8} probe n={len(probe.answers):5d} p50 {percentile(ok, 50):7.1f} ms  p99 {percentile(ok, 99):7.1f} ms"
        f"  server CPU {phase.server_cpu_s:5.1f} s  statuses {probe.statuses()}  /healthz {health.statuses()}"
    )


async def run(args: argparse.Namespace) -> int:
    configured = args.max_connections or ServerConfig().max_connections
    extra = f"[server]\nmax_connections = {configured}\n" if args.max_connections else ""
    payloads = bodies(4000, 1, seed=11)
    defaults = ServerConfig()
    reclaim_within_s = defaults.idle_timeout_s + defaults.head_timeout_s + 10
    ramp_s = (args.idle + args.slow) / RAMP_CONNECTS_PER_S + 2
    with running_server({"probe": PriorityClass.INTERACTIVE}, extra_config=extra) as server:
        pid, port, key = server.pid, server.port, server.keys["probe"]
        fd_limit = fd_soft_limit(pid)
        limit = connection_budget(configured, fd_limit)
        await measure(port, key, pid, 3.0, payloads)  # warm-up: first requests allocate
        quiet = await measure(port, key, pid, args.phase_s, payloads)
        fds_quiet = num_fds(pid)

        attacker_args = ["--port", str(port), "--idle", str(args.idle), "--slow", str(args.slow)]
        attacker_args += ["--attack-s", str(ramp_s + args.phase_s), "--hold-s", str(reclaim_within_s + 5)]
        attacker = subprocess.Popen(
            [sys.executable, __file__, "--attacker", *attacker_args],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            await asyncio.sleep(ramp_s)
            fds_ramped = num_fds(pid)
            attacked = await measure(port, key, pid, args.phase_s, payloads)
            # The attacker stops reopening now and keeps its sockets: the server must close them.
            began = time.monotonic()
            while num_fds(pid) > fds_quiet + RECLAIM_SLACK_FDS and time.monotonic() - began < reclaim_within_s:
                await asyncio.sleep(0.25)
            reclaim_s = time.monotonic() - began
            fds_after = num_fds(pid)
            out, _ = attacker.communicate(timeout=reclaim_within_s + 60)
            stats = json.loads(out.strip().splitlines()[-1])
        finally:
            if attacker.poll() is None:
                attacker.kill()
                attacker.wait()
        after = await measure(port, key, pid, args.phase_s, payloads)

    quiet_ok = quiet.probe.ok_ms() + after.probe.ok_ms()
    attack_ok = attacked.probe.ok_ms()
    fds_peak = attacked.peak_fds
    p50_ratio = percentile(attack_ok, 50) / percentile(quiet_ok, 50)
    p99_ratio = percentile(attack_ok, 99) / percentile(quiet_ok, 99)
    fd_bound = fds_quiet + limit + lingering_slots(limit) + CLOSING_SLACK_FDS
    all_probe = quiet.probe.answers + attacked.probe.answers + after.probe.answers
    all_health = quiet.health.answers + attacked.health.answers + after.health.answers
    checks = {
        f"attack p50 within {TARGET_RATIO}x quiet (ratio {p50_ratio:.2f})": p50_ratio <= TARGET_RATIO,
        f"attack p99 within {TARGET_RATIO}x quiet (ratio {p99_ratio:.2f})": p99_ratio <= TARGET_RATIO,
        "every probe request answered 200": all(a.status == 200 for a in all_probe),
        "every /healthz answered 200": all(a.status == 200 for a in all_health),
        f"peak descriptors {fds_peak} <= {fd_bound} (quiet {fds_quiet} + limit {limit} + lingering + {CLOSING_SLACK_FDS} closing)": fds_peak
        <= fd_bound,
        f"descriptors back to {fds_after} <= {fds_quiet} + {RECLAIM_SLACK_FDS} "
        f"within {reclaim_within_s:.0f} s (took {reclaim_s:.1f} s)": fds_after <= fds_quiet + RECLAIM_SLACK_FDS,
    }
    passed = all(checks.values())
    print(
        f"connections bench: {args.idle} idle + {args.slow} slow connections, phases of {args.phase_s:.0f} s;"
        f" server limit {limit} connections (configured {configured}, descriptor limit {fd_limit})"
    )
    print(summary("quiet", quiet))
    print(summary("attack", attacked))
    print(summary("after", after))
    print(f"  descriptors: quiet {fds_quiet}, ramped {fds_ramped}, peak {fds_peak}, after {fds_after}")
    print(
        f"  attacker: opened {stats['opened']}, closed by the server {stats['closed_by_server']}, "
        f"failed to open {stats['failed_to_open']}, its own CPU {stats['cpu_s']} s, answers {stats['answers']}"
    )
    for name, ok in checks.items():
        print(f"  [{verdict(ok)}] {name}")
    print(f"{verdict(passed)}")
    return 0 if passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=15.0)
    parser.add_argument("--idle", type=int, default=1000, help="connections that never send a byte")
    parser.add_argument("--slow", type=int, default=1000, help="connections that send a head one byte a second")
    parser.add_argument("--max-connections", type=int, help="the server's [server] max_connections (default: its own)")
    parser.add_argument("--attacker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--attack-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--hold-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        return attacker_main(args)
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
