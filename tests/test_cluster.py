"""A three-server NATS cluster (routes on loopback, JetStream R3) with one server killed mid-run.

Five personas, each with its own connection given all three URLs, keep deciding
after the server most of them use, which also leads the audit stream and the lease
bucket, is killed; a lease still has exactly one holder; once the server is back,
its copy of the audit stream catches up without duplicates.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bus import leases
from bus.connection import BusUnavailableError, Connection
from bus.envelope import Envelope, Verifier
from bus.jetstream import AUDIT_STREAM, LEASES_BUCKET, Settings, ensure
from bus.keys import Signer, generate_user_seed
from bus.messages import Proposal, QuorumRule, Target
from bus.protocol import Judgement, Protocol
from lab.natsserver import NatsCluster, NatsServer

pytestmark = pytest.mark.slow

NAMES = ("otto", "alexa", "riven", "vera", "lior")
SETTINGS = Settings(replicas=3)
LEASES_STREAM = f"KV_{LEASES_BUCKET}"
# Raft elects a new leader a few seconds after losing one; every wait is bounded well above.
RECOVERY = 30.0
T = TypeVar("T")
LeaseTry = leases.Lease | leases.LeaseHeldError


async def _approve(envelope: Envelope, proposal: Proposal) -> Judgement:
    return Judgement("approve", "target observed broken", {"node": proposal.target.name})


def _proposal(name: str, deadline: float) -> Proposal:
    return Proposal(
        action="k8s.node.cordon", target=Target(kind="node", name=name), policy="node-not-ready",
        policy_digest="sha256:test", step=0, destructive=True, summary="NotReady 3m",
        quorum=QuorumRule(approvals=3, veto=("riven",),
                          deadline=datetime.now(UTC) + timedelta(seconds=deadline)))


async def _eventually(attempt: Callable[[], Awaitable[T | None]], what: str,
                      within: float = RECOVERY) -> T:
    """Retry ``attempt`` until it returns something, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while (result := await attempt()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g}s: {what}")
        await asyncio.sleep(0.1)
    return result


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as running:
        yield running


@dataclass
class Fleet:
    protocols: list[Protocol]
    connections: list[Connection]


@pytest.fixture
async def fleet(cluster: NatsCluster) -> AsyncIterator[Fleet]:
    signers = {name: Signer(generate_user_seed()) for name in NAMES}
    keys = {name: signer.public_key for name, signer in signers.items()}
    made = Fleet([], [])
    try:
        for i, name in enumerate(NAMES):
            # Rotated so the first choice differs (nats-py also shuffles the list).
            urls = cluster.urls[i % 3:] + cluster.urls[:i % 3]
            connection = Connection(urls, name=name, seed=None)
            await connection.connect()
            made.connections.append(connection)
            protocol = Protocol(connection, persona=name, host=name, signer=signers[name],
                                verifier=Verifier(keys=keys), voters=frozenset(NAMES),
                                assess=_approve)
            await protocol.subscribe()
            made.protocols.append(protocol)
        assert await ensure(made.connections[0].js, SETTINGS) == []
        await _interest_everywhere(made.connections)
        yield made
    finally:
        for connection in made.connections:
            await connection.close()


def _responder(connection: Connection) -> Callable[[Msg], Awaitable[None]]:
    async def answer(msg: Msg) -> None:
        await connection.nc.publish(msg.reply, b"")
    return answer


async def _interest_everywhere(connections: list[Connection]) -> None:
    """Wait until every server knows every persona's subscriptions.

    ``subscribe()`` only waits for the persona's own server; the others learn of the
    subscription over the routes, a moment later. A probe subscribed after the
    protocol's travels the same route behind it, so once a request from each other
    persona's server reaches the probe, that server also knows the rest.
    """
    for i, connection in enumerate(connections):
        probe = f"test.probe.{i}"
        await connection.nc.subscribe(probe, cb=_responder(connection))
        await connection.sync()
        for other in connections:
            async def reached(other: Connection = other, probe: str = probe) -> bool | None:
                try:
                    await other.nc.request(probe, b"", timeout=1)
                except (NoRespondersError, NatsTimeoutError):
                    return None
                return True
            await _eventually(reached, f"{probe} reachable from every server", within=10)


def _server_of(connection: Connection, cluster: NatsCluster) -> NatsServer:
    url = connection.nc.connected_url
    assert url is not None
    return next(s for s in cluster.servers if s.port == url.port)


async def _lead(connection: Connection, stream: str, server: str) -> None:
    """Make ``server`` the leader of ``stream`` (a step-down with a preferred successor)."""
    async def leading() -> bool | None:
        request = json.dumps({"placement": {"preferred": server}}).encode()
        try:
            info = await connection.js.stream_info(stream)
            assert info.cluster is not None
            if info.cluster.leader == server:
                return True
            await connection.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request,
                                        timeout=5)
        except NatsError:
            pass  # no leader for a moment: the step-down is an election
        return None
    await _eventually(leading, f"{server} leads {stream}", within=15)


async def _decide(protocol: Protocol, number: int, outcomes: Counter[str]) -> bool:
    """One proposal; True if approved. It may fail while leaders are elected, never hang."""
    deadline = 2.0
    try:
        # Publishes time out after 2s: the proposal's, then the decision's after the deadline.
        _, result = await asyncio.wait_for(
            protocol.propose(_proposal(f"worker-{number}", deadline)), deadline + 8)
    except BusUnavailableError:
        outcomes["bus unavailable"] += 1
        return False
    except TimeoutError:
        pytest.fail(f"{protocol.persona}'s proposal hung instead of failing")
    outcomes[result.outcome] += 1
    return result.outcome == "approved"


async def _lease_race(connections: list[Connection], target: str) -> list[LeaseTry] | None:
    """Every persona tries to take ``target`` at once; None if the bus failed any of them."""
    async def take(connection: Connection, who: str) -> LeaseTry:
        kv = await connection.js.key_value(LEASES_BUCKET)
        try:
            return await leases.acquire(kv, target, repair=f"r-{who}", executor=who,
                                        ttl=timedelta(minutes=5))
        except leases.LeaseHeldError as exc:
            return exc
    results = await asyncio.gather(*(take(c, n) for c, n in zip(connections, NAMES, strict=True)),
                                   return_exceptions=True)
    winners = [r for r in results if isinstance(r, leases.Lease)]
    assert len(winners) <= 1, f"two holders of {target}: {winners}"
    tries: list[LeaseTry] = []
    for result in results:
        if isinstance(result, NatsError | BusUnavailableError):
            return None  # a leader election in progress; another target, another try
        if not isinstance(result, LeaseTry):
            raise result
        tries.append(result)
    return tries


def _audit_counts(cluster: NatsCluster) -> dict[str, int]:
    """Messages in each server's own replica of the audit stream (not the leader's view)."""
    counts = {}
    for server in cluster.servers:
        jsz = server.monitor("jsz?accounts=true&streams=true")
        streams = [s for account in jsz.get("account_details", [])
                   for s in account.get("stream_detail", []) if s["name"] == AUDIT_STREAM]
        counts[server.url] = streams[0]["state"]["messages"] if streams else -1
    return counts


async def test_cluster_keeps_deciding_when_a_server_dies(cluster: NatsCluster,
                                                        fleet: Fleet) -> None:
    connections = fleet.connections
    outcomes: Counter[str] = Counter()
    assert await _decide(fleet.protocols[0], 0, outcomes), outcomes

    for stream in (AUDIT_STREAM, LEASES_STREAM):
        assert (await connections[0].js.stream_info(stream)).config.num_replicas == 3

    # The worst single failure: the server most personas use, leading both streams.
    by_server = Counter(_server_of(c, cluster).url for c in connections)
    victim = next(s for s in cluster.servers if s.url == by_server.most_common(1)[0][0])
    victim_name = victim.monitor("varz")["server_name"]
    for stream in (AUDIT_STREAM, LEASES_STREAM):
        await _lead(connections[0], stream, victim_name)
    moved = [p.persona for p, c in zip(fleet.protocols, connections, strict=True)
             if _server_of(c, cluster) is victim]
    assert len(moved) >= 2

    victim.kill()
    started = time.monotonic()
    number = 0

    async def approved_for_everyone() -> bool | None:
        # Done once every persona in turn, the moved ones included, had its proposal approved.
        nonlocal number
        approved = 0
        for protocol in fleet.protocols:
            number += 1
            approved += await _decide(protocol, number, outcomes)
        return True if approved == len(fleet.protocols) else None

    await _eventually(approved_for_everyone, "every persona's proposal approved after the kill")
    recovery = time.monotonic() - started
    assert all(c.connected and _server_of(c, cluster) is not victim for c in connections)
    assert set(outcomes) <= {"approved", "expired", "rejected", "bus unavailable"}, outcomes
    # The first proposals went out with no audit stream leader: refused, not stuck.
    assert outcomes["bus unavailable"] >= 1, outcomes

    attempt = 0

    async def race() -> list[LeaseTry] | None:
        nonlocal attempt
        attempt += 1
        return await _lease_race(connections, f"node.lease-{attempt}")

    tries = await _eventually(race, "a lease race in which the bus answered everyone")
    assert sum(isinstance(t, leases.Lease) for t in tries) == 1
    assert sum(isinstance(t, leases.LeaseHeldError) for t in tries) == len(NAMES) - 1

    # Both block while they poll the servers: off the loop, so the clients keep going.
    await asyncio.to_thread(victim.start)
    await asyncio.to_thread(cluster.wait_healthy, RECOVERY)

    async def converged() -> dict[str, int] | None:
        info = await connections[0].js.stream_info(AUDIT_STREAM)
        counts = await asyncio.to_thread(_audit_counts, cluster)
        return counts if set(counts.values()) == {info.state.messages} else None

    counts = await _eventually(converged, "the audit stream the same on all three servers")
    info = await connections[0].js.stream_info(AUDIT_STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await connections[0].js.get_msg(AUDIT_STREAM, seq)
        assert msg.headers is not None
        assert msg.data is not None
        ids.append(msg.headers["Nats-Msg-Id"])
        assert ids[-1] == json.loads(msg.data)["id"]
    assert len(ids) == len(set(ids)) == next(iter(counts.values()))
    print(f"killed {victim_name} (personas {moved}); decisions resumed after {recovery:.1f}s; "
          f"outcomes {dict(outcomes)}; audit {len(ids)} messages on all servers")
