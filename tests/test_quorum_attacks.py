"""The quorum under attack, on a real nats-server with the shipped personas as agents.

Each test first does what an attacker did (holding one persona's key, or none), then
shows it no longer works: a proposer's loosened rule, a freeze lost to junk or to a
replayed thaw, a weakened lease bucket, malformed messages and lease values.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from bus import ids, leases, subjects
from bus.connection import Connection, subject_for
from bus.envelope import Accepted, Envelope, Verifier, canonical, seal
from bus.jetstream import LEASES_BUCKET, Settings, bucket_config, stream_config
from bus.keys import Signer, generate_user_seed
from bus.messages import (
    BODIES,
    Control,
    Decision,
    Heartbeat,
    Proposal,
    QuorumRule,
    Target,
    Vote,
)
from bus.protocol import ASSESS_BURST, ASSESS_IN_FLIGHT, ASSESS_RATE, _Allowance
from bus.quorum import Ballot, Rule, tally
from lab.fleet import AgentProcess, prepare_config, start_agent, stop_agents, wait_until
from lab.natsserver import NatsServer
from runtime.agent.link import FreezeState
from runtime.agent.loop import Agent
from runtime.agent.wiring import build
from runtime.config.credentials import SEED_FILE, write_seed
from runtime.config.loading import ConfigSet, config_paths, load
from runtime.core.engine import policy_digest
from runtime.ops.watch import describe
from tests.conftest import REPO
from tests.fleets import NAMES
from tests.test_fleet_quorum import _closed_port, _until

pytestmark = pytest.mark.slow
OPERATOR = "oncall"
VOTERS = tuple(n for n in NAMES if n != "otto")


def _config(tmp_path: Path, url: str, operator_key: str, *,
            tick: timedelta | None = None) -> ConfigSet:
    config_dir = tmp_path / "config"
    prepare_config(
        REPO, config_dir, tick=tick, nats_url=url, dry_run=True,
        policy_spec={"apiserver-unreachable": {"detect": {"kind": "apiserver-unreachable",
                                                          "minPaths": 2, "for": "0s"}}},
        fleet_spec={"apiservers": [f"https://127.0.0.1:{_closed_port()}"],
                    "quorum": {"approvals": 3, "veto": ["riven"], "deadline": "4s"},
                    "operators": [{"name": OPERATOR, "nkey": operator_key}]})
    return load(config_paths(config_dir))


def _agents(config: ConfigSet, tmp_path: Path, names: tuple[str, ...]) -> dict[str, Agent]:
    agents = {name: build(config, name, state_dir=tmp_path / "state" / name, environ={},
                          host=name) for name in names}
    for agent in agents.values():
        agent.timing = type(agent.timing)(tick=0.5)
    return agents


async def _run(agents: dict[str, Agent], until: Callable[[], bool], within: float = 20) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents.values()]
    try:
        async with asyncio.timeout(within):
            await _until(until)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def _seed(config: ConfigSet, name: str) -> bytes:
    return (Path(config.fleet.spec.credentialsDir) / name / SEED_FILE).read_bytes()


async def _client(url: str) -> Connection:
    conn = Connection([url], name="attacker", seed=None)
    await conn.connect()
    return conn


# ---------------------------------------------------------------- 1. a proposer's own rule


def _loose_proposal(config: ConfigSet, loosen: dict[str, Any]) -> Proposal:
    """The shipped apiserver-unreachable restart, its quorum rule loosened by ``loosen``."""
    policy = config.policies["apiserver-unreachable"].value
    remedy = policy.spec.remedies[0]
    now = datetime.now(UTC)
    rule: dict[str, Any] = {"approvals": 3, "veto": ("riven",),
                            "deadline": now + timedelta(seconds=30)}
    if "deadline_s" in loosen:
        rule["deadline"] = now + timedelta(seconds=loosen["deadline_s"])
    rule.update({k: v for k, v in loosen.items() if k in ("veto", "approvals")})
    return Proposal(
        action=remedy.action, target=Target(kind="unit", name="k3s.service", host="otto"),
        params=remedy.typed_params().model_dump(mode="json"), policy=policy.name,
        policy_digest=policy_digest(policy), step=0,
        destructive=loosen.get("destructive", True), quorum=QuorumRule.model_validate(rule),
        summary="apiserver unreachable")


LOOSENED: list[tuple[dict[str, Any], str]] = [
    ({"veto": ()}, "drops the veto of riven"),
    ({"approvals": 1}, "asks 1 approvals, the policy 3"),
    ({"deadline_s": 3600}, "the policy allows 30s"),
    ({"destructive": False}, "marked non-destructive"),
]


def _all_reject(votes: list[dict[str, Any]], named: str) -> None:
    for vote in votes:
        assert vote["body"]["verdict"] in ("reject", "block"), vote["body"]
        assert "quorum rule looser" in vote["body"]["reason"], vote["body"]["reason"]
        assert named in vote["body"]["reason"], vote["body"]["reason"]
        assert vote["body"]["required"] == {"approvals": 3, "veto": ["riven"],
                                            "deadline": 30.0, "destructive": True,
                                            "evidence": {"distinct": 1, "requires": []}}


@pytest.mark.parametrize(("loosen", "named"), LOOSENED)
async def test_a_stolen_proposer_key_cannot_loosen_the_quorum_rule(
        tmp_path: Path, nats_server: NatsServer, loosen: dict[str, Any], named: str) -> None:
    """Mallory holds Otto's key and proposes the shipped apiserver-unreachable restart
    with its rule loosened; every voter holds the rule against its own policy."""
    config = _config(tmp_path, nats_server.url, write_seed(tmp_path / "op", OPERATOR))
    agents = _agents(config, tmp_path, VOTERS)
    otto = Signer(_seed(config, "otto"))
    conn = await _client(nats_server.url)
    votes: list[dict[str, Any]] = []

    async def on_vote(msg: Msg) -> None:
        votes.append(json.loads(msg.data))

    await conn.subscribe("zeta.repair.*.vote.*", on_vote)
    repair = ids.new_id()
    proposal = _loose_proposal(config, loosen)
    published = False

    async def publish_once() -> None:
        nonlocal published
        if not published and all(a.execution.refusal() is None
                                 for a in agents.values()):
            published = True
            envelope = seal("proposal", sender="otto", host="evil", body=proposal,
                            signer=otto, repair=repair)
            await conn.publish(subject_for(envelope), envelope)

    def answered() -> bool:
        asyncio.ensure_future(publish_once())  # noqa: RUF006 (awaited through the poll)
        return len(votes) >= len(VOTERS)

    try:
        await _run(agents, answered)
    finally:
        await conn.close()
    assert {v["from"] for v in votes} == set(VOTERS)
    _all_reject(votes, named)


class Watched:
    """Agent processes on a real bus and everything they publish on ``zeta.>``."""

    def __init__(self, conn: Connection, processes: dict[str, AgentProcess]) -> None:
        self.conn, self.processes = conn, processes
        self.seen: list[dict[str, Any]] = []

    def of(self, kind: str, **fields: str) -> list[dict[str, Any]]:
        return [m for m in self.seen if m.get("kind") == kind
                and all(m.get(k) == v for k, v in fields.items())]

    def heartbeats(self, name: str) -> list[dict[str, Any]]:
        return [m["body"] for m in self.of("heartbeat") if m["from"] == name]

    async def heard_from_all(self) -> None:
        await wait_until(lambda: all(self.heartbeats(n) for n in self.processes), 60,
                         "a heartbeat from every agent")

    async def votes_on(self, repair: str, voters: tuple[str, ...]) -> list[dict[str, Any]]:
        def all_voted() -> list[dict[str, Any]] | None:
            got = self.of("vote", repair=repair)
            return got if len(got) == len(voters) else None
        return await wait_until(all_voted, 30, f"a vote on {repair} from each of {voters}")

    async def propose(self, config: ConfigSet, proposal: Proposal) -> str:
        repair = ids.new_id()
        envelope = seal("proposal", sender="otto", host="evil", body=proposal,
                        signer=Signer(_seed(config, "otto")), repair=repair)
        await self.conn.publish(subject_for(envelope), envelope)
        return repair


@asynccontextmanager
async def _processes(config: ConfigSet, tmp_path: Path, url: str,
                     names: tuple[str, ...]) -> AsyncIterator[Watched]:
    """Start ``names`` as ``python -m runtime run``; on leaving, each must exit 0."""
    config_dir = Path(config.fleet.spec.credentialsDir).parent
    conn = await _client(url)
    watched = Watched(conn, {n: start_agent(config_dir, n, tmp_path / "run") for n in names})

    async def on_message(msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            watched.seen.append({"subject": msg.subject, **json.loads(msg.data)})

    try:
        await conn.subscribe("zeta.>", on_message)
        await watched.heard_from_all()
        yield watched
    finally:
        await conn.close()
        codes = await asyncio.to_thread(stop_agents, watched.processes)
    assert set(codes.values()) == {0}, codes


async def test_agent_processes_reject_a_loosened_rule(tmp_path: Path,
                                                     nats_server: NatsServer) -> None:
    """The same attack on the shipped entry point: four voters as `python -m runtime run`."""
    config = _config(tmp_path, nats_server.url, write_seed(tmp_path / "op", OPERATOR))
    async with _processes(config, tmp_path, nats_server.url, VOTERS) as fleet:
        for loosen, named in LOOSENED:
            repair = await fleet.propose(config, _loose_proposal(config, loosen))
            _all_reject(await fleet.votes_on(repair, VOTERS), named)


# ---------------------------------------------------------------- 2. the freeze survives


async def _store(url: str, subject: str, data: bytes) -> None:
    conn = await _client(url)
    try:
        await conn.js.publish(subject, data)
    finally:
        await conn.close()


async def _frozen_then_spoiled(tmp_path: Path, url: str) -> tuple[ConfigSet, Envelope]:
    """A stored freeze followed, in stream order, by junk on the freeze subject and an
    hour-old genuine thaw: the config, and that old thaw for replaying again."""
    operator = write_seed(tmp_path / "op", OPERATOR)
    signer = Signer((tmp_path / "op" / OPERATOR / SEED_FILE).read_bytes())
    now = datetime.now(UTC)
    old_thaw = seal("control", sender=OPERATOR, host="h", signer=signer,
                    body=Control(verb="thaw", reason="done"), at=now - timedelta(hours=1))
    freeze = seal("control", sender=OPERATOR, host="h", signer=signer,
                  body=Control(verb="freeze", reason="change window"), at=now)
    for subject, data in [(subjects.control("thaw"), old_thaw.to_bytes()),
                          (subjects.control("freeze"), freeze.to_bytes()),
                          (subjects.control("freeze"), b"{not json"),
                          (subjects.control("thaw"), old_thaw.to_bytes())]:
        await _store(url, subject, data)
    return _config(tmp_path, url, operator), old_thaw


async def test_a_freeze_survives_junk_and_a_replayed_old_thaw_across_a_restart(
        tmp_path: Path, nats_server: NatsServer) -> None:
    config, _ = await _frozen_then_spoiled(tmp_path, nats_server.url)
    agents = _agents(config, tmp_path, ("riven",))
    assert agents["riven"].link is not None
    riven = agents["riven"].link.view
    await _run(agents, lambda: riven.listening_since is not None and riven.frozen is not None)
    assert riven.frozen is not None
    assert riven.frozen.reason == "change window"


async def test_a_freeze_by_an_operator_since_rotated_still_holds(
        tmp_path: Path, nats_server: NatsServer) -> None:
    write_seed(tmp_path / "old", OPERATOR)
    signer = Signer((tmp_path / "old" / OPERATOR / SEED_FILE).read_bytes())
    freeze = seal("control", sender=OPERATOR, host="h", signer=signer,
                  body=Control(verb="freeze", reason="disk replacement"))
    await _store(nats_server.url, subjects.control("freeze"), freeze.to_bytes())
    # The operator's key is rotated in fleet.yaml: the old freeze no longer verifies.
    config = _config(tmp_path, nats_server.url, write_seed(tmp_path / "new", OPERATOR))
    agents = _agents(config, tmp_path, ("vera",))
    assert agents["vera"].link is not None
    vera = agents["vera"].link.view
    await _run(agents, lambda: vera.frozen is not None)
    assert vera.frozen is not None
    assert "unverifiable freeze (wrong-key): disk replacement" in vera.frozen.reason


async def test_agent_processes_stay_frozen_through_junk_and_replayed_thaws(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """The stored history ends, in stream order, with junk and an old genuine thaw; more
    of both arrive while the voters run. They report frozen and reject a valid repair."""
    config, old_thaw = await _frozen_then_spoiled(tmp_path, nats_server.url)
    async with _processes(config, tmp_path, nats_server.url, VOTERS) as fleet:
        assert all(fleet.heartbeats(n)[-1]["frozen"] for n in VOTERS)
        await fleet.conn.js.publish(subjects.control("freeze"), b"junk")
        await fleet.conn.js.publish(subjects.control("thaw"), old_thaw.to_bytes())
        repair = await fleet.propose(config, _loose_proposal(config, {}))
        votes = await fleet.votes_on(repair, VOTERS)
        assert {v["body"]["reason"] for v in votes} == {"fleet frozen: change window"}
        assert all(fleet.heartbeats(n)[-1]["frozen"] for n in VOTERS)


def test_the_freeze_state_moves_only_to_a_newer_control() -> None:
    t0 = datetime(2026, 12, 2, tzinfo=UTC)
    frozen = FreezeState(Control(verb="freeze", reason="r"), t0, "b")
    older_thaw = FreezeState(None, t0 - timedelta(seconds=1), "z")
    same_time_lower_id = FreezeState(None, t0, "a")
    newer_thaw = FreezeState(None, t0 + timedelta(seconds=1), "a")
    assert frozen.after(older_thaw) is frozen
    assert frozen.after(same_time_lower_id) is frozen
    assert frozen.after(None) is frozen
    assert frozen.after(newer_thaw) is newer_thaw


# ---------------------------------------------------------------- 3. weakened resources


async def _refusal_of_otto(tmp_path: Path, url: str) -> str:
    """Why Otto refuses destructive work once it has checked the bus resources."""
    config = _config(tmp_path, url, write_seed(tmp_path / "op", OPERATOR))
    agents = _agents(config, tmp_path, ("otto",))
    assert agents["otto"].link is not None
    otto = agents["otto"].link.view
    refusals: list[str] = []

    def refused() -> bool:  # read while it runs: once stopped, the bus is "down"
        refusals.append(otto.refusal() or "")
        return bool(otto.problems)

    await _run(agents, refused)
    return refusals[-1]


async def test_a_lease_bucket_with_a_short_ttl_stops_destructive_work(
        tmp_path: Path, bare_nats_server: NatsServer) -> None:
    """With a 2 s bucket TTL a 30-minute lease vanished and a second executor took the
    target: the agents now refuse, naming the setting."""
    conn = await _client(bare_nats_server.url)
    try:
        await conn.js.add_stream(stream_config(Settings()))
        await conn.js.add_stream(replace(bucket_config(Settings()), max_age=2.0,
                                         duplicate_window=2.0))
    finally:
        await conn.close()
    refusal = await _refusal_of_otto(tmp_path, bare_nats_server.url)
    assert "KV_zeta_leases max_age is 2.0, expected 1800.0s" in refusal, refusal


WEAKENED: list[tuple[str, Callable[[Settings], Any], str]] = [
    ("lease", lambda s: replace(bucket_config(s), max_age=2.0, duplicate_window=2.0),
     "KV_zeta_leases max_age is 2.0, expected 1800.0s"),
    ("audit", lambda s: replace(stream_config(s), deny_purge=False, deny_delete=False),
     "ZETA_AUDIT deny_delete is False, expected true: no message may be deleted"),
]


@pytest.mark.parametrize(("resource", "weaken", "named"), WEAKENED,
                         ids=[w[0] for w in WEAKENED])
async def test_agent_processes_refuse_weakened_resources(
        tmp_path: Path, bare_nats_server: NatsServer, resource: str,
        weaken: Callable[[Settings], Any], named: str) -> None:
    """The whole fleet as processes on a bus whose lease bucket forgets, or whose audit
    history can be purged: Otto finds the API server unreachable and proposes nothing,
    naming the setting; every agent says so in its status."""
    conn = await _client(bare_nats_server.url)
    try:
        settings = Settings()
        kept = {"lease": stream_config(settings), "audit": bucket_config(settings)}[resource]
        await conn.js.add_stream(kept)
        await conn.js.add_stream(weaken(settings))
    finally:
        await conn.close()
    config = _config(tmp_path, bare_nats_server.url, write_seed(tmp_path / "op", OPERATOR))
    async with _processes(config, tmp_path, bare_nats_server.url, NAMES) as fleet:
        log = tmp_path / "run" / "logs" / "otto.log"
        await wait_until(lambda: named in log.read_text(), 30, f"otto naming {named!r}")
        await wait_until(lambda: all("resources incompatible" in fleet.heartbeats(n)[-1]["status"]
                                     for n in NAMES), 30, "every status naming the resources")
        assert not fleet.of("proposal")


async def test_agents_never_create_the_resources(tmp_path: Path,
                                                 bare_nats_server: NatsServer) -> None:
    refusal = await _refusal_of_otto(tmp_path, bare_nats_server.url)
    assert "ZETA_AUDIT does not exist: an operator creates it with `zeta-agent bus init`" in (
        refusal)
    conn = await _client(bare_nats_server.url)
    try:
        assert (await conn.js.account_info()).streams == 0
    finally:
        await conn.close()


# ---------------------------------------------------------------- 4. malformed input


def _signed(kind: str, sender: str, signer: Signer, body: object, *, at: str,
            repair: str | None = None) -> bytes:
    """An envelope around an arbitrary body, correctly signed: what a key holder can send."""
    obj: dict[str, Any] = {"v": 1, "kind": kind, "id": ids.new_id(), "from": sender,
                           "host": "h", "at": at, "repair": repair, "body": body,
                           "key": signer.public_key}
    obj["sig"] = base64.urlsafe_b64encode(signer.sign(canonical(obj))).rstrip(b"=").decode()
    return json.dumps(obj).encode()


async def test_naive_timestamps_and_malformed_leases_stop_no_tick(
        tmp_path: Path, nats_server: NatsServer) -> None:
    config = _config(tmp_path, nats_server.url, write_seed(tmp_path / "op", OPERATOR))
    agents = _agents(config, tmp_path, ("otto", "alexa"))
    alexa = Signer(_seed(config, "alexa"))
    naive = datetime.now(UTC).replace(tzinfo=None).isoformat()
    heartbeat = Heartbeat(pid=1, version="x", tick=1, status="ok", bus="connected",
                          kubernetes="observed", scopes_digest="s", policies_digest="p")
    conn = await _client(nats_server.url)
    kv = await conn.js.key_value(LEASES_BUCKET)
    await kv.put("node.worker-1", b'{"repair": 1, "executor": "x"}')
    data = _signed("heartbeat", "alexa", alexa, heartbeat.model_dump(mode="json"), at=naive)
    otto = agents["otto"].link
    assert otto is not None
    try:
        def after_some_ticks() -> bool:
            if otto.view.connected:
                asyncio.ensure_future(conn.nc.publish(subjects.heartbeat("alexa"), data))  # noqa: RUF006
            return all(a.ticks >= 6 for a in agents.values())

        await _run(agents, after_some_ticks, within=30)
        [lease] = await leases.all_leases(kv)  # what the lease observer reads
    finally:
        await conn.close()
    assert otto.verifier.dropped["malformed"] >= 1
    assert all(a.errors == 0 for a in agents.values()), "no tick may fail on a peer's input"
    assert (lease.target, lease.repair) == ("node.worker-1", "(malformed)")
    assert lease.problem.startswith("repair:"), lease.problem


async def test_agent_processes_work_on_through_naive_timestamps_and_bad_leases(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Mallory holds Alexa's key and a lease writer's access: a malformed lease value, a
    heartbeat and a vote on each live repair with naive timestamps. Otto still tallies
    and decides, and no tick of any agent fails."""
    config = _config(tmp_path, nats_server.url, write_seed(tmp_path / "op", OPERATOR),
                     tick=timedelta(seconds=2))
    alexa = Signer(_seed(config, "alexa"))
    naive = datetime.now(UTC).replace(tzinfo=None).isoformat()
    heartbeat = Heartbeat(pid=1, version="x", tick=1, status="ok", bus="connected",
                          kubernetes="observed", scopes_digest="s", policies_digest="p")
    kv_conn = await _client(nats_server.url)
    try:
        await (await kv_conn.js.key_value(LEASES_BUCKET)).put("node.worker-1", b"[1, 2]")
    finally:
        await kv_conn.close()
    running = tuple(n for n in NAMES if n != "alexa")
    async with _processes(config, tmp_path, nats_server.url, running) as fleet:
        answered: set[str] = set()

        async def spoil() -> None:
            await fleet.conn.nc.publish(subjects.heartbeat("alexa"), _signed(
                "heartbeat", "alexa", alexa, heartbeat.model_dump(mode="json"), at=naive))
            for proposal in fleet.of("proposal"):
                if proposal["repair"] not in answered:
                    answered.add(proposal["repair"])
                    vote = Vote(verdict="approve", reason="naive", policy_digest="d",
                                observed_at=datetime.now(UTC)).model_dump(mode="json")
                    await fleet.conn.nc.publish(
                        subjects.vote(proposal["repair"], "alexa"),
                        _signed("vote", "alexa", alexa, {**vote, "observed_at": naive},
                                at=naive, repair=proposal["repair"]))

        def decided() -> list[dict[str, Any]]:
            asyncio.ensure_future(spoil())  # noqa: RUF006 (awaited through the poll)
            return [d for d in fleet.of("decision") if d["repair"] in answered]

        await wait_until(decided, 60, "a decision on a repair that got a naive vote")
        ticks = {n: p.ticks() for n, p in fleet.processes.items()}
        await wait_until(lambda: all(p.ticks() > ticks[n] + 2
                                     for n, p in fleet.processes.items()),
                         30, "more ticks of every agent")
    for name, process in fleet.processes.items():
        failed = [e for e in process.events() if e.get("event") == "tick" and e["errors"]]
        assert not failed, (name, failed[:1])


def _containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20), _containers, max_leaves=12)
SIGNER = Signer(generate_user_seed())


def _body_for(kind: str) -> st.SearchStrategy[object]:
    """Hostile bodies: arbitrary JSON, and each field of the kind's model with
    arbitrary JSON in it (so a well-shaped body with one bad field is tried too)."""
    fields = BODIES[kind].model_fields
    return JSON | st.fixed_dictionaries({}, optional={name: JSON for name in fields}) | (
        st.fixed_dictionaries({name: JSON for name in fields}))


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(kind=st.sampled_from(sorted(BODIES)), data=st.data(),
       at=st.sampled_from(["2026-12-02T10:00:00", "2026-12-02T10:00:00Z", "x", "9999-1-1"]))
def test_a_well_signed_hostile_body_never_raises_in_any_handler(
        kind: str, data: st.DataObject, at: str) -> None:
    body = data.draw(_body_for(kind))
    sender = "oncall" if kind == "control" else "alexa"
    repair = ids.new_id()
    route = {"heartbeat": subjects.heartbeat(sender), "finding": subjects.finding(sender),
             "proposal": subjects.proposed(repair), "vote": subjects.vote(repair, sender),
             "decision": subjects.decided(repair), "started": subjects.started(repair),
             "result": subjects.result(repair), "control": subjects.control("freeze")}[kind]
    verifier = Verifier(keys={"alexa": SIGNER.public_key},
                        operators={"oncall": SIGNER.public_key}, freshness=timedelta(days=1e5))
    outcome = verifier.check(route, _signed(kind, sender, SIGNER, body, at=at,
                                            repair=None if kind in ("heartbeat", "finding",
                                                                    "control") else repair))
    if not isinstance(outcome, Accepted):
        return
    env, accepted = outcome.envelope, outcome.body
    describe(env, accepted)
    if isinstance(accepted, Vote):
        rule = Rule("otto", 2, frozenset({"riven"}), datetime.now(UTC))
        tally(rule, [Ballot(env.id, env.sender, accepted.verdict, env.at)], {"alexa"},
              datetime.now(UTC))
    if isinstance(accepted, Control):
        FreezeState().after(FreezeState(accepted, env.at, env.id))


# ---------------------------------------------------------------- 5. flooding a voter


def test_a_proposer_is_assessed_at_a_bounded_rate() -> None:
    at_once = _Allowance(at=0.0)
    assert [at_once.take(0.0) is None for _ in range(ASSESS_IN_FLIGHT + 1)] == [
        *([True] * ASSESS_IN_FLIGHT), False], "a bounded number at once"
    allowance = _Allowance(at=0.0)
    for _ in range(ASSESS_BURST):
        allowance.running = 0
        assert allowance.take(0.0) is None
    allowance.running = 0
    assert allowance.take(0.0) is not None, "the burst is spent"
    assert allowance.take(10.0) is None, "and refills with time"


async def test_budgets_count_only_decisions_signed_by_the_verified_proposer(
        tmp_path: Path) -> None:
    config = _config(tmp_path, "nats://127.0.0.1:1", write_seed(tmp_path / "op", OPERATOR))
    vera = build(config, "vera", state_dir=tmp_path / "state", environ={}, host="vera")
    link = vera.link
    assert link is not None
    approvals = link.view.approvals
    policy = config.policies["apiserver-unreachable"].value
    repair = ids.new_id()
    proposal = Proposal(
        action="host.unit.restart", target=Target(kind="unit", name="k3s.service", host="otto"),
        params={"unit": "k3s.service"}, policy=policy.name, policy_digest="d", step=0,
        destructive=True, summary="s",
        quorum=QuorumRule(approvals=3, veto=("riven",), deadline=datetime.now(UTC)))
    proposed = seal("proposal", sender="otto", host="h", body=proposal,
                    signer=Signer(_seed(config, "otto")), repair=repair)
    approvals.proposed(proposed, proposal)  # what the protocol does once verified
    approved = Decision(outcome="approved", reason="3/3")

    async def decided(by: str) -> None:
        envelope = seal("decision", sender=by, host="h", body=approved,
                        signer=Signer(_seed(config, by)), repair=repair)
        await link._on_decided(SimpleNamespace(  # type: ignore[arg-type]
            subject=subjects.decided(repair), data=envelope.to_bytes()))

    await decided("lior")  # a decision by someone who did not propose it
    assert approvals.last_hour(policy.name, datetime.now(UTC)) == 0
    await decided("otto")
    assert approvals.last_hour(policy.name, datetime.now(UTC)) == 1


async def test_an_agent_process_flooded_by_a_proposer_key_votes_a_bounded_number(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """500 valid proposals signed with Otto's key at a running Riven: she assesses no
    more than the burst and the refill allow, and her ticks go on."""
    config = _config(tmp_path, nats_server.url, write_seed(tmp_path / "op", OPERATOR),
                     tick=timedelta(seconds=2))
    async with _processes(config, tmp_path, nats_server.url, ("riven",)) as fleet:
        riven = fleet.processes["riven"]
        before = riven.ticks()
        started = asyncio.get_running_loop().time()
        repairs = [await fleet.propose(config, _loose_proposal(config, {}))
                   for _ in range(500)]
        await fleet.conn.nc.flush()
        await wait_until(lambda: riven.ticks() > before + 4, 30,
                         "riven ticking through the flood")
        elapsed = asyncio.get_running_loop().time() - started
        votes = [v for v in fleet.of("vote") if v["repair"] in set(repairs)]
    assert ASSESS_BURST <= len(votes) <= ASSESS_BURST + ASSESS_RATE * elapsed + 1, (
        len(votes), elapsed)
