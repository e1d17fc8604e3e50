"""The fleet when things are half broken: the bus dies mid-vote, is down, or the fleet is frozen."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bus import leases, subjects
from bus.connection import Connection
from bus.envelope import seal
from bus.ids import new_id
from bus.jetstream import LEASES_BUCKET, Settings, ensure
from bus.keys import Signer
from bus.messages import Control, Result, Target
from lab.fleet import prepare_config
from lab.natsserver import NatsServer
from runtime.agent.loop import Agent
from runtime.agent.wiring import build
from runtime.config.credentials import CredentialError, load_signer, write_seed
from runtime.config.loading import config_paths, load
from runtime.core.ports import Domain, Observed, Observer, Outcome
from runtime.model.snapshot import ApiProbe, SourceStatus, UnitObs
from tests.builders import RecordingActuator
from tests.conftest import REPO
from tests.fleets import NAMES
from tests.test_fleet_quorum import Fleet, _audit, _closed_port, _until

pytestmark = pytest.mark.slow


class SlowUnreachableApi:
    """A voter whose probes take a while (and fail), so a vote is still open when we strike."""

    name = "apiserver"
    provides: frozenset[Domain] = frozenset({"apiserver"})

    async def observe(self, now: datetime) -> Observed:
        await asyncio.sleep(1.0)
        return Observed({"apiserver": (ApiProbe(path="tcp", ok=False, error="refused"),
                                       ApiProbe(path="readyz", ok=False, error="refused"))},
                        SourceStatus(ok=True, detail="unreachable"))


class FailedKubelet:
    name = "units"
    provides: frozenset[Domain] = frozenset({"units"})

    async def observe(self, now: datetime) -> Observed:
        return Observed({"units": (UnitObs(name="kubelet.service", active_state="failed"),)},
                        SourceStatus(ok=True))


def _replace(agent: Agent, observer: Observer) -> None:
    others = [o for o in agent.observing.observers if not o.provides & observer.provides]
    # In place: the loop, the voter and the execution share this one Observing.
    agent.observing.observers = (*others, observer)


def _fleet(tmp_path: Path, url: str, *, operators: list[dict[str, str]] | None = None,
           names: tuple[str, ...] = NAMES,
           actuators: dict[str, RecordingActuator] | None = None) -> dict[str, Agent]:
    config_dir = tmp_path / "config"
    prepare_config(
        REPO, config_dir, tick=None, nats_url=url, dry_run=False,
        policy_spec={
            "apiserver-unreachable": {"detect": {"kind": "apiserver-unreachable",
                                                 "minPaths": 2, "for": "0s"}},
            "kubelet-failed": {"detect": {"kind": "unit-failed", "units": ["kubelet.service"],
                                          "for": "0s"}}},
        fleet_spec={"apiservers": [f"https://127.0.0.1:{_closed_port()}"],
                    "quorum": {"approvals": 3, "veto": ["riven"], "deadline": "4s"},
                    "operators": operators or []})
    config = load(config_paths(config_dir))
    agents = {name: build(config, name, state_dir=tmp_path / "state" / name, environ={},
                          host=name, actuators=actuators)
              for name in names}
    for agent in agents.values():
        agent.timing = type(agent.timing)(tick=0.5)
    return agents


async def test_the_bus_dies_mid_vote_nothing_runs_and_the_audit_has_no_duplicates(
        tmp_path: Path, nats_server: NatsServer) -> None:
    actuator = RecordingActuator(Outcome(ok=True))
    agents = _fleet(tmp_path, nats_server.url, actuators={"host.unit.restart": actuator})
    for name in ("alexa", "riven", "vera", "lior"):
        _replace(agents[name], SlowUnreachableApi())
    fleet = Fleet(agents, actuator, nats_server)
    proposed: list[str] = []
    watcher = Connection([nats_server.url], name="w", seed=None)
    await watcher.connect()

    async def on_proposal(msg: Any) -> None:
        proposed.append(msg.subject)

    await watcher.subscribe("zeta.repair.*.proposed", on_proposal)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents.values()]
    try:
        async with asyncio.timeout(20):
            await _until(lambda: bool(proposed))
        nats_server.kill()  # the voters are still observing: no vote has been sent
        await asyncio.sleep(5)  # past the 4 s deadline, with the bus gone
        assert actuator.runs == [], "an action ran without a quorum"
        assert all(a.execution.refusal() for a in agents.values())
        nats_server.start()  # same port, same store: the agents find it again
        async with asyncio.timeout(20):
            await _until(lambda: all(a.execution.refusal() is None
                                     for a in agents.values()))
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await watcher.close()
    assert actuator.runs == []
    audit = await _audit(fleet.server)
    ids = Counter(m["id"] for m in audit)
    assert all(n == 1 for n in ids.values()), "the audit stream holds a message twice"
    assert not [m for m in audit if m["kind"] in ("started", "result")]


async def _operated_fleet(tmp_path: Path, nats_server: NatsServer,
                          actuator: RecordingActuator
                          ) -> tuple[dict[str, Agent], Connection,
                                     Callable[[Control], Awaitable[None]]]:
    """The fleet with operator alice listed, her connection, and a way to send her
    controls (signed with her seed) into the audit stream."""
    pub = write_seed(tmp_path / "operator-creds", "alice")
    alice = Signer((tmp_path / "operator-creds" / "alice" / "nkey.seed").read_bytes())
    assert alice.public_key == pub
    agents = _fleet(tmp_path, nats_server.url, operators=[{"name": "alice", "nkey": pub}],
                    actuators={"host.unit.restart": actuator})
    operator = Connection([nats_server.url], name="operator", seed=None)
    await operator.connect()
    await ensure(operator.js, Settings())

    async def control(body: Control) -> None:
        envelope = seal("control", sender="alice", host="laptop", body=body, signer=alice)
        await operator.publish(subjects.control(body.verb), envelope)

    return agents, operator, control


async def test_a_frozen_fleet_observes_but_does_nothing_destructive_until_thawed(
        tmp_path: Path, nats_server: NatsServer) -> None:
    actuator = RecordingActuator(Outcome(ok=True))
    agents, operator, control = await _operated_fleet(tmp_path, nats_server, actuator)

    # Before the agents start: they must read it from the audit.
    await control(Control(verb="freeze", reason="drill: freeze"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents.values()]
    otto = agents["otto"]
    try:
        async with asyncio.timeout(20):
            await _until(lambda: otto.link is not None
                         and otto.link.view.frozen is not None and otto.ticks >= 4)
        assert actuator.runs == []
        assert otto.engine.status().open_findings >= 1, "a frozen fleet still observes"
        await control(Control(verb="thaw", reason="drill: thaw"))
        async with asyncio.timeout(30):
            await _until(lambda: bool(actuator.runs))
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await operator.close()
    audit = await _audit(nats_server)
    kinds = [m["kind"] for m in audit]
    assert kinds.index("control") < kinds.index("proposal")
    assert [m["body"]["verb"] for m in audit if m["kind"] == "control"] == ["freeze", "thaw"]


async def test_a_pause_holds_repairs_then_lapses_by_itself(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """A pause read from the audit at start holds the repair; nobody resumes it, and
    the repair goes ahead once its `until` passes."""
    actuator = RecordingActuator(Outcome(ok=True))
    agents, operator, control = await _operated_fleet(tmp_path, nats_server, actuator)
    until = datetime.now(UTC) + timedelta(seconds=6)
    await control(Control(verb="pause", reason="drill: hands off for a moment", until=until))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents.values()]
    otto = agents["otto"]
    try:
        async with asyncio.timeout(20):
            await _until(lambda: otto.link is not None and otto.ticks >= 3
                         and bool(otto.link.view.pauses.active(datetime.now(UTC))))
        assert actuator.runs == [], "held while paused"
        assert otto.engine.status().open_findings >= 1, "a paused fleet still observes"
        async with asyncio.timeout(30):
            await _until(lambda: bool(actuator.runs))
        assert datetime.now(UTC) >= until, "not before the pause lapsed"
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await operator.close()
    assert [m["body"]["verb"] for m in await _audit(nats_server)
            if m["kind"] == "control"] == ["pause"], "it lapsed with no resume"


async def test_with_the_bus_down_destructive_work_is_refused_and_other_repairs_are_journaled(
        tmp_path: Path) -> None:
    port = _closed_port()
    start = RecordingActuator(Outcome(ok=True, detail="kubelet started"))
    restart = RecordingActuator(Outcome(ok=True))
    agents = _fleet(tmp_path, f"nats://127.0.0.1:{port}", names=("otto",),
                    actuators={"host.unit.start": start, "host.unit.restart": restart})
    otto = agents["otto"]
    _replace(otto, FailedKubelet())
    journal = tmp_path / "state" / "otto" / "journal.jsonl"
    stop = asyncio.Event()
    task = asyncio.create_task(otto.run(stop))
    server = NatsServer(tmp_path / "late-store", port=port)
    try:
        async with asyncio.timeout(20):
            await _until(lambda: bool(start.runs) and journal.exists())
        assert restart.runs == [], "a destructive action ran with the bus down"
        [entry] = [json.loads(line) for line in journal.read_text().splitlines()]
        assert entry["kind"] == "result"
        assert entry["body"]["action"] == "host.unit.start"
        assert entry["body"]["outcome"] == "succeeded"
        server.start()
        operator = Connection([server.url], name="operator", seed=None)
        await operator.connect()
        await ensure(operator.js, Settings())  # `zeta-agent bus init`, once the bus is up
        await operator.close()
        async with asyncio.timeout(30):
            await _until(lambda: not journal.exists())
        audit = await _audit(server)
        assert [m["id"] for m in audit if m["kind"] == "result"][:1] == [entry["id"]]
    finally:
        stop.set()
        await task
        server.stop()


def test_an_agent_refuses_a_seed_that_is_not_its_own(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    prepare_config(REPO, config_dir, tick=None, nats_url="nats://127.0.0.1:1")
    config = load(config_paths(config_dir))
    seeds = Path(config.fleet.spec.credentialsDir)
    (seeds / "otto" / "nkey.seed").write_bytes((seeds / "riven" / "nkey.seed").read_bytes())
    with pytest.raises(CredentialError, match="refusing to sign as someone else"):
        load_signer(config.persona("otto"), config.fleet, {})


async def test_incompatible_bus_resources_refuse_destructive_work_and_say_which_setting(
        tmp_path: Path, bare_nats_server: NatsServer) -> None:
    other = Connection([bare_nats_server.url], name="another-fleet", seed=None)
    await other.connect()
    await ensure(other.js, Settings(max_age=timedelta(days=1)))  # not our 90 days
    await other.close()
    actuator = RecordingActuator(Outcome(ok=True))
    agents = _fleet(tmp_path, bare_nats_server.url, actuators={"host.unit.restart": actuator})
    otto = agents["otto"]
    assert otto.link is not None
    refusals: list[str] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents.values()]
    try:
        async with asyncio.timeout(20):
            await _until(lambda: otto.link is not None and bool(otto.link.view.problems)
                         and otto.ticks >= 4)
        refusals.append(otto.execution.refusal() or "")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert "max_age" in refusals[0]
    assert actuator.runs == []


async def test_two_proposers_racing_for_one_target_execute_once(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Two Lior instances (two hosts) both see a stale lease and both propose releasing it."""
    config_dir = tmp_path / "config"
    prepare_config(REPO, config_dir, tick=None, nats_url=nats_server.url, dry_run=False,
                   policy_spec={"stale-lease": {"detect": {"kind": "stale-lease", "grace": "0s",
                                                           "for": "0s"}}})
    config = load(config_paths(config_dir))
    agents = [build(config, name, state_dir=tmp_path / "state" / host, environ={}, host=host)
              for name, host in (("lior", "host-a"), ("lior", "host-b"), ("alexa", "host-c"),
                                 ("riven", "host-d"), ("vera", "host-e"))]
    for agent in agents:
        agent.timing = type(agent.timing)(tick=0.5)
    conn = Connection([nats_server.url], name="crashed-executor", seed=None)
    await conn.connect()
    await ensure(conn.js, Settings())
    kv = await conn.js.key_value(LEASES_BUCKET)
    # An executor took this lease and died: it expired a minute ago.
    await leases.acquire(kv, "node.worker-1", repair="01jd0000000000000000000000",
                         executor="otto", ttl=timedelta(minutes=-1))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    try:
        async with asyncio.timeout(30):
            while await leases.holder(kv, "node.worker-1") is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # time for the other proposer to try as well
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await conn.close()
    audit = await _audit(nats_server)
    started = [m for m in audit if m["kind"] == "started"]
    assert len(started) == 1, "two executors acted on one target"
    results = [m for m in audit if m["kind"] == "result" and m["body"]["outcome"] == "succeeded"]
    assert [r["repair"] for r in results] == [started[0]["repair"]]


class SilentJetStream:
    """A lease bucket whose server is up but whose JetStream does not answer (no leader)."""

    async def keys(self) -> list[str]:
        raise TimeoutError


async def test_jetstream_not_answering_refuses_destructive_work_and_journal_drains_while_up(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """The minority side of a partition: the connection stays up, JetStream does not answer."""
    otto = _fleet(tmp_path, nats_server.url, names=("otto",))["otto"]
    link = otto.link
    assert link is not None
    view = link.view
    stop = asyncio.Event()
    task = asyncio.create_task(otto.run(stop))
    try:
        async with asyncio.timeout(20):
            await _until(lambda: view.kv is not None and view.refusal() is None)
        bucket = view.kv
        view.kv = SilentJetStream()  # type: ignore[assignment]
        async with asyncio.timeout(20):
            await _until(lambda: view.jetstream_error is not None)
        assert view.connected
        assert view.refusal() == ("bus connected but JetStream is not answering: "
                                         "TimeoutError")
        assert view.describe() == "bus: connected, JetStream not answering"
        # A result journaled meanwhile is published at the next heartbeat, not at the
        # next reconnect (which, with the connection up, may never come).
        envelope = link.protocol.seal("result", Result(
            outcome="succeeded", detail="kubelet started", action="host.unit.start",
            target=Target(kind="unit", name="kubelet.service", host="otto"),
            policy="kubelet-failed"), repair=new_id())
        link.journal.append(envelope)
        view.kv = bucket
        async with asyncio.timeout(20):
            await _until(lambda: view.refusal() is None
                         and not link.journal.path.exists())
    finally:
        stop.set()
        await task
    assert envelope.id in [m["id"] for m in await _audit(nats_server)]
