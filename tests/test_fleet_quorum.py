"""Five agents (the shipped personas, fresh keys) on a real nats-server decide a destructive repair.

The scenario needs neither Kubernetes nor systemd: the fleet's API server address is a
closed port on 127.0.0.1, so every agent's own probes really fail on two paths, the
apiserver-unreachable policy opens, and Otto proposes restarting k3s.service (a
destructive action: quorum of 3 with Riven's veto). The actuator is a recording
stand-in; what is under test is who may make it run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.msg import Msg

from bus import leases, subjects
from bus.connection import Connection
from bus.envelope import seal
from bus.jetstream import AUDIT_STREAM, LEASES_BUCKET, Settings, ensure
from bus.keys import Signer, generate_user_seed
from bus.messages import Vote
from lab.fleet import prepare_config
from lab.natsserver import NatsServer, free_ports
from runtime.agent.link import BusObserver
from runtime.agent.loop import Agent
from runtime.agent.wiring import build
from runtime.config.loading import config_paths, load
from runtime.core.detecting import detect
from runtime.core.ports import Domain, Observed, Outcome
from runtime.model.formats import PeerSilentDetect
from runtime.model.snapshot import ApiProbe, Snapshot, SourceStatus
from tests.builders import RecordingActuator
from tests.conftest import REPO
from tests.fleets import NAMES

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    return free_ports(1)[0]


class ReachableApi:
    """What a persona with a working path to the API server sees."""

    name = "apiserver"
    provides: frozenset[Domain] = frozenset({"apiserver"})

    async def observe(self, now: datetime) -> Observed:
        return Observed({"apiserver": (ApiProbe(path="tcp", ok=True),)},
                        SourceStatus(ok=True, detail="reachable"))


@dataclass
class Fleet:
    agents: dict[str, Agent]
    actuator: RecordingActuator
    server: NatsServer

    def sees_the_api(self, name: str) -> None:
        """Give one persona a working path to the API server, so it disagrees."""
        agent = self.agents[name]
        others = [o for o in agent.observing.observers if "apiserver" not in o.provides]
        # In place: the loop, the voter and the execution share this one Observing.
        agent.observing.observers = (*others, ReachableApi())


async def _until(predicate: Callable[[], bool]) -> None:
    # The conditions are state of other tasks (agents, subscriptions); polling them
    # keeps each test a plain assertion on what those tasks did.
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.05)


@pytest.fixture
async def fleet(tmp_path: Path, nats_server: NatsServer) -> Fleet:
    config_dir = tmp_path / "config"
    prepare_config(
        REPO, config_dir, tick=None, nats_url=nats_server.url, dry_run=False,
        policy_spec={"apiserver-unreachable": {"detect": {"kind": "apiserver-unreachable",
                                                          "minPaths": 2, "for": "0s"}}},
        fleet_spec={"apiservers": [f"https://127.0.0.1:{_closed_port()}"],
                    "quorum": {"approvals": 3, "veto": ["riven"], "deadline": "4s"}})
    config = load(config_paths(config_dir))
    actuator = RecordingActuator(Outcome(ok=True, detail="k3s.service restarted"))
    agents = {
        name: build(config, name, state_dir=tmp_path / "state" / name, environ={},
                    host=name, actuators={"host.unit.restart": actuator})
        for name in NAMES}
    for agent in agents.values():
        agent.timing = type(agent.timing)(tick=0.5)
    return Fleet(agents, actuator, nats_server)


async def _run(fleet: Fleet, until: Callable[[], bool]) -> None:
    """Run all five agents until ``until`` holds (at most 30 s)."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in fleet.agents.values()]
    try:
        async with asyncio.timeout(30):
            await _until(until)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def _audit(server: NatsServer) -> list[dict[str, Any]]:
    conn = Connection([server.url], name="audit-reader", seed=None)
    await conn.connect()
    try:
        info = await conn.js.stream_info(AUDIT_STREAM)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await conn.js.get_msg(AUDIT_STREAM, seq)
            assert raw.data is not None
            out.append({"subject": raw.subject, **json.loads(raw.data)})
        return out
    finally:
        await conn.close()


async def test_five_agents_approve_and_otto_executes_once_with_a_fencing_token(
        fleet: Fleet) -> None:
    await _run(fleet, lambda: bool(fleet.actuator.runs))
    await asyncio.sleep(0)
    assert len(fleet.actuator.runs) == 1
    [(intent_id, dry_run)] = fleet.actuator.runs
    assert intent_id.startswith("apiserver-unreachable:")
    assert dry_run is False
    assert fleet.actuator.fences == [True], "the executor must hold the lease while acting"
    audit = await _audit(fleet.server)
    kinds = [m["kind"] for m in audit]
    assert kinds[0] == "proposal"
    votes = [m for m in audit if m["kind"] == "vote"]
    voters = {m["from"] for m in votes}
    assert {"alexa", "riven"} <= voters, voters
    assert all(m["body"]["verdict"] == "approve" for m in votes)
    assert all("confirmed from" in m["body"]["reason"] for m in votes)
    [decision] = [m for m in audit if m["kind"] == "decision"]
    assert decision["body"]["outcome"] == "approved"
    assert "otto" in decision["body"]["approvals"]
    [started] = [m for m in audit if m["kind"] == "started"]
    assert started["from"] == "otto"
    assert started["body"]["fencing_token"] >= 1
    results = [m for m in audit if m["kind"] == "result"]
    assert results[0]["body"]["outcome"] == "succeeded"
    assert len({m["repair"] for m in audit}) == 1, "one repair, one id, everything audited"


@pytest.fixture
async def decisions(nats_server: NatsServer) -> AsyncIterator[list[dict[str, object]]]:
    """Every decision published on the bus, as JSON, in order."""
    seen: list[dict[str, object]] = []
    conn = Connection([nats_server.url], name="decision-watcher", seed=None)
    await conn.connect()

    async def on(msg: Msg) -> None:
        seen.append(json.loads(msg.data))

    await conn.subscribe("zeta.repair.*.decided", on)
    yield seen
    await conn.close()


async def test_riven_vetoes_and_nothing_runs(fleet: Fleet,
                                             decisions: list[dict[str, Any]]) -> None:
    fleet.sees_the_api("riven")
    await _run(fleet, lambda: bool(decisions))
    assert decisions[0]["body"]["outcome"] == "rejected"
    assert decisions[0]["body"]["vetoes"] == ["riven"]
    assert fleet.actuator.runs == []


async def test_too_few_approvals_and_nothing_runs(fleet: Fleet,
                                                  decisions: list[dict[str, Any]]) -> None:
    for name in ("alexa", "vera", "lior"):
        fleet.sees_the_api(name)
    await _run(fleet, lambda: bool(decisions))
    body = decisions[0]["body"]
    assert body["outcome"] == "rejected"
    assert set(body["rejections"]) >= {"alexa", "vera", "lior"}
    assert fleet.actuator.runs == []


async def test_forged_and_replayed_votes_do_not_count_and_nobody_crashes(
        fleet: Fleet, decisions: list[dict[str, Any]], nats_server: NatsServer) -> None:
    """Riven blocks; an attacker without her key tries to approve in her name, and replays."""
    fleet.sees_the_api("riven")
    attacker = Signer(generate_user_seed())
    conn = Connection([nats_server.url], name="attacker", seed=None)
    await conn.connect()
    injected: list[str] = []

    async def forge(msg: Msg) -> None:
        proposal = json.loads(msg.data)
        repair = proposal["repair"]
        approve = Vote(verdict="approve", reason="trust me", observed_at=datetime.now(UTC),
                       policy_digest=proposal["body"]["policy_digest"])
        forged = seal("vote", sender="riven", host="evil", body=approve, signer=attacker,
                      repair=repair)
        await conn.nc.publish(subjects.vote(repair, "riven"), forged.to_bytes())
        # Replay Otto's own proposal bytes as if they were a vote from alexa.
        await conn.nc.publish(subjects.vote(repair, "alexa"), msg.data)
        await conn.nc.publish(subjects.vote(repair, "alexa"), b"{not json")
        injected.append(repair)

    await conn.subscribe("zeta.repair.*.proposed", forge)
    try:
        await _run(fleet, lambda: bool(decisions))
    finally:
        await conn.close()
    assert injected
    body = decisions[0]["body"]
    assert body["outcome"] == "rejected"
    assert body["vetoes"] == ["riven"]
    assert fleet.actuator.runs == []
    otto = fleet.agents["otto"].link
    assert otto is not None
    dropped = otto.verifier.dropped
    assert dropped["wrong-key"] >= 1, dropped
    assert dropped["subject-mismatch"] >= 1, dropped
    assert dropped["not-json"] >= 1, dropped
    assert all(a.errors == 0 for a in fleet.agents.values()), "no tick may fail on garbage"


async def test_a_proposal_for_a_leased_target_is_rejected(
        fleet: Fleet, decisions: list[dict[str, Any]], nats_server: NatsServer) -> None:
    conn = Connection([nats_server.url], name="other-executor", seed=None)
    await conn.connect()
    await ensure(conn.js, Settings())
    kv = await conn.js.key_value(LEASES_BUCKET)
    held = await leases.acquire(kv, "unit.otto/k3s.service", repair="01jd0000000000000000000000",
                                executor="vera", ttl=timedelta(minutes=5))
    try:
        await _run(fleet, lambda: bool(decisions))
    finally:
        await conn.close()
    body = decisions[0]["body"]
    assert body["outcome"] == "rejected"
    assert fleet.actuator.runs == []
    audit = await _audit(nats_server)
    reasons = [m["body"]["reason"] for m in audit if m["kind"] == "vote"]
    assert any(f"leased by repair {held.repair}" in r for r in reasons), reasons


async def test_peers_not_heard_from_yet_are_not_silent_at_start_up() -> None:
    """Silence counts from when this agent began listening, not from the epoch.

    Otherwise every fleet start trips the peer-silent breaker (most peers unheard on
    the first tick), and mutual repair stays off until an operator resets it.
    """
    started = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
    view = SimpleNamespace(connected=True, peers={}, listening_since=started,
                           peer_names=tuple(n for n in NAMES if n != "otto"))
    observer = BusObserver("peers", view)  # type: ignore[arg-type]
    now = started + timedelta(seconds=10)
    seen = await observer.observe(now)
    peers = seen.data["peers"]
    assert {p.persona for p in peers} == set(NAMES) - {"otto"}
    assert all(p.last_heartbeat == started for p in peers)
    spec = PeerSilentDetect(kind="peer-silent", silentAfter=timedelta(seconds=45))
    assert detect(spec, Snapshot(at=now, peers=peers)).matches == {}
    later = Snapshot(at=started + timedelta(seconds=46), peers=peers)
    assert len(detect(spec, later).matches) == 4


def test_the_loop_and_the_bus_link_read_one_injected_clock(tmp_path: Path) -> None:
    """The wiring hands the same wall clock to the loop and the bus link, so the times they
    report to one engine (started, finished, refused) never come from two clocks."""
    config_dir = tmp_path / "config"
    prepare_config(REPO, config_dir, tick=None, nats_url="nats://127.0.0.1:1", dry_run=True)
    config = load(config_paths(config_dir))
    fixed = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

    def wall() -> datetime:
        return fixed

    otto = build(config, "otto", state_dir=tmp_path / "state", environ={}, host="cp-1",
                 wall=wall)
    assert otto.link is not None
    assert otto._wall is wall
    assert otto.link.view.wall is wall
    assert otto.execution.wall is wall
