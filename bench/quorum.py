"""Quorum round trip: five personas on one host, a real nats-server, real signatures.

Each persona has its own ``Connection`` and ``Protocol``, signs with its own nkey
seed and verifies everything it receives against all five public keys. Voters
approve at once (the benchmark measures the bus and the protocol, not observers).
Proposals carry the shipped destructive rule: 3 approvals, Riven holds a veto.

Two measurements (docs/benchmarks.md):
- latency: proposals one after another, ``propose()`` call to its return (the
  decision is published and stored in ZETA_AUDIT), rotating the proposer;
- throughput: ``--concurrency`` proposers at once, decisions per second.

Usage: .venv/bin/python bench/quorum.py [--proposals N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bus.connection import Connection
from bus.envelope import Envelope, Verifier
from bus.jetstream import Settings, ensure
from bus.keys import Signer, generate_user_seed
from bus.messages import Proposal, QuorumRule, Target
from bus.protocol import Judgement, Protocol
from lab.natsserver import NatsServer, binary
from runtime.agent import logs

PERSONAS = ("otto", "alexa", "riven", "vera", "lior")
WARMUP = 20
P99_TARGET = 0.050  # seconds, proposal to decision (issue 3)
RATE_TARGET = 200  # decisions per second
DEADLINE = timedelta(seconds=10)  # far beyond any round trip: an expiry here is a failure


async def approve(envelope: Envelope, proposal: Proposal) -> Judgement:
    """A voter that approves at once, so only the bus and the protocol are measured."""
    return Judgement("approve", "benchmark voter approves", {"node": proposal.target.name})


def proposal(number: int) -> Proposal:
    """A destructive proposal under the shipped rule (3 approvals, Riven's veto)."""
    return Proposal(
        action="k8s.node.cordon", target=Target(kind="node", name=f"worker-{number}"),
        policy="node-not-ready", policy_digest="sha256:bench", step=0, destructive=True,
        summary="benchmark", quorum=QuorumRule(
            approvals=3, veto=("riven",), deadline=datetime.now(UTC) + DEADLINE))


@dataclass
class Fleet:
    connections: list[Connection]
    protocols: list[Protocol]

    async def close(self) -> None:
        for connection in self.connections:
            await connection.close()


async def start_fleet(url: str) -> Fleet:
    """Five personas, each with its own connection, keys and verifier."""
    signers = {name: Signer(generate_user_seed()) for name in PERSONAS}
    keys = {name: signer.public_key for name, signer in signers.items()}
    fleet = Fleet([], [])
    for name in PERSONAS:
        connection = Connection([url], name=name, seed=None)
        await connection.connect()
        fleet.connections.append(connection)
        protocol = Protocol(connection, persona=name, host=platform.node(),
                            signer=signers[name], verifier=Verifier(keys=keys),
                            voters=frozenset(PERSONAS), assess=approve)
        await protocol.subscribe()
        fleet.protocols.append(protocol)
    problems = await ensure(fleet.connections[0].js, Settings())
    if problems:
        raise RuntimeError(f"JetStream resources unusable: {problems}")
    return fleet


@dataclass
class Run:
    latencies: list[float]  # seconds, one per proposal
    elapsed: float
    failures: list[str]


async def run(protocols: Sequence[Protocol], proposals: int, concurrency: int) -> Run:
    """``proposals`` proposals by ``concurrency`` proposers at once, rotating personas."""
    numbers = iter(range(proposals))  # shared: each proposer takes the next number
    latencies: list[float] = []
    failures: list[str] = []

    async def proposer() -> None:
        for number in numbers:
            protocol = protocols[number % len(protocols)]
            started = time.perf_counter()
            repair, result = await protocol.propose(proposal(number))
            latencies.append(time.perf_counter() - started)
            if result.outcome != "approved":
                failures.append(f"{repair}: {result.outcome} ({result.reason})")

    started = time.perf_counter()
    await asyncio.gather(*(proposer() for _ in range(concurrency)))
    return Run(latencies, time.perf_counter() - started, failures)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    rank = math.ceil(fraction * len(sorted_values) - 1e-9)  # 0.07 * 100 is 7.000000000000001
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def latency_line(values: Sequence[float]) -> str:
    ordered = sorted(values)
    parts = [f"{label} {percentile(ordered, q) * 1000:.1f} ms"
             for label, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))]
    return ", ".join([*parts, f"max {ordered[-1] * 1000:.1f} ms"])


def machine() -> list[str]:
    """What the numbers were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next(int(line.split()[1]) for line in
                   Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
                   if line.startswith("MemTotal:"))
    server = subprocess.run([str(binary()), "--version"], capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    return [f"CPU: {cpu}, {os.cpu_count()} CPUs", f"RAM: {mem_kib / 2**20:.1f} GiB",
            f"Python {platform.python_version()}, {server}"]


async def bench(proposals: int, concurrency: int) -> int:
    with tempfile.TemporaryDirectory(prefix="zeta-bench-") as tmp, \
            NatsServer(Path(tmp) / "store") as server:
        fleet = await start_fleet(server.url)
        try:
            await run(fleet.protocols, WARMUP, 1)
            sequential = await run(fleet.protocols, proposals, 1)
            parallel = await run(fleet.protocols, proposals, concurrency)
        finally:
            await fleet.close()
    for line in machine():
        print(line)
    p99 = percentile(sorted(sequential.latencies), 0.99)
    rate = proposals / parallel.elapsed
    print(f"sequential, {proposals} proposals: {latency_line(sequential.latencies)} "
          f"[p99 target {P99_TARGET * 1000:g} ms: {'met' if p99 <= P99_TARGET else 'MISSED'}]")
    print(f"concurrency {concurrency}, {proposals} proposals: {rate:.0f} decisions/s "
          f"[target {RATE_TARGET}/s: {'met' if rate >= RATE_TARGET else 'MISSED'}] "
          f"(latency {latency_line(parallel.latencies)})")
    failures = sequential.failures + parallel.failures
    for failure in failures[:10]:
        print(f"not approved: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--proposals", type=int, default=1000, metavar="N",
                        help="proposals per measurement (default 1000)")
    parser.add_argument("--concurrency", type=int, default=20, metavar="C",
                        help="concurrent proposers for the throughput run (default 20)")
    args = parser.parse_args(argv)
    if args.proposals < 1 or args.concurrency < 1:
        parser.error("--proposals and --concurrency must be at least 1")
    # As under systemd: JSON lines at info. Written to /dev/null, so that rendering
    # every line is counted but the terminal is not flooded.
    with open(os.devnull, "w", encoding="utf-8") as sink:
        logs.configure("json", level="info", stream=sink)
        return asyncio.run(bench(args.proposals, args.concurrency))


if __name__ == "__main__":
    sys.exit(main())
