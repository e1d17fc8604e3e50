"""``zeta-agent render nats``: the server itself refuses what a user may not publish.

The pure part (which subjects each persona, operator and watcher may publish) is
checked with a NATS wildcard matcher over generated names and repair ids; the rest
runs a real nats-server started with the rendered authorization, the shipped personas
carrying fresh keys, and checks both that every forbidden publish is refused (the
server logs a violation, no subscriber and no stream sees the message) and that every
thing an agent, an operator and a watcher really does still works.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError
from structlog.testing import capture_logs

from bus import ids, leases, subjects
from bus.connection import BusUnavailableError, Connection
from bus.envelope import Envelope, seal
from bus.jetstream import AUDIT_STREAM, LEASES_BUCKET, Settings, check, ensure, stream_config
from bus.keys import Signer, generate_user_seed
from bus.messages import Control, Heartbeat, Proposal, QuorumRule, Target, Vote
from lab.fleet import init_bus, prepare_config
from lab.natsserver import NatsServer, binary, free_ports
from runtime.agent.wiring import build
from runtime.config.credentials import SEED_FILE, write_seed
from runtime.config.loading import ConfigSet, config_paths, load
from runtime.core.ports import Outcome
from runtime.model.formats import BusUser
from runtime.ops import audit as auditing
from runtime.ops.common import connect_within
from runtime.ops.render.nats import (
    DuplicateKeyError,
    lease_kinds,
    lease_subjects,
    operator_publish_allow,
    publish_allow,
    render_nats,
    watcher_publish_allow,
)
from tests.builders import RecordingActuator, persona
from tests.conftest import REPO

OPERATOR, WATCHER = "oncall", "wanda"
PERSONAS = ("alexa", "lior", "otto", "riven", "vera")
HOST = "test-host"

# ---------------------------------------------------------------- what may be published


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or token not in ("*", have[index]):
            return False
    return len(want) == len(have)


def allowed(allow: list[str], subject: str) -> bool:
    return any(matches(pattern, subject) for pattern in allow)


def test_the_matcher_follows_nats_wildcards() -> None:
    assert matches("zeta.repair.*.vote.otto", "zeta.repair.r1.vote.otto")
    assert not matches("zeta.repair.*.vote.otto", "zeta.repair.r1.vote.otto.x")
    assert matches("zeta.agent.otto.>", "zeta.agent.otto.heartbeat")
    assert not matches("zeta.agent.otto.>", "zeta.agent.otto")
    assert not matches("zeta.agent.otto.>", "zeta.agent.ottoman.heartbeat")


NAMES = st.from_regex(subjects.PERSONA_NAME, fullmatch=True)
REPAIRS = st.builds(ids.new_id)
DESTROYERS = tuple(f"$JS.API.STREAM.{verb}.{stream}"
                   for verb in ("DELETE", "PURGE", "UPDATE", "MSG.DELETE")
                   for stream in (AUDIT_STREAM, f"KV_{LEASES_BUCKET}"))

ROLES = {  # tier, scopes, duties: what each shipped kind of persona looks like
    "voter": ("journal", ["bus:vote"], ["vote"]),
    "vetoer": ("observe", ["bus:vote", "bus:veto"], ["vote", "veto"]),
    "proposer": ("propose", [], ["propose", "vote"]),
    "executor": ("propose", [], ["propose", "vote", "execute"]),
    "releaser": ("journal", ["bus:propose", "bus:vote", "bus:leases:release"],
                 ["propose", "vote"]),
    "reporter": ("journal", [], ["execute"]),
}


@given(a=NAMES, b=NAMES, repair=REPAIRS, role=st.sampled_from(sorted(ROLES)))
def test_a_persona_may_publish_only_under_its_own_name_and_its_scopes(
        a: str, b: str, repair: str, role: str) -> None:
    tier, scopes, duties = ROLES[role]
    p = persona(a, tier=tier, scopes=scopes, duties=duties)
    allow = publish_allow(p)
    may = {"vote": "vote" in duties, "propose": "propose" in duties,
           "execute": "execute" in duties}
    assert allowed(allow, subjects.heartbeat(a))
    assert allowed(allow, subjects.finding(a))
    assert allowed(allow, subjects.vote(repair, a)) == may["vote"]
    assert allowed(allow, subjects.proposed(repair)) == may["propose"]
    assert allowed(allow, subjects.decided(repair)) == may["propose"]
    assert allowed(allow, subjects.started(repair)) == may["execute"]
    assert allowed(allow, subjects.result(repair)) == may["execute"]
    assert allowed(allow, f"$KV.{LEASES_BUCKET}.node.worker-1") == (
        role == "releaser" or "node" in lease_kinds(p))
    if not may["execute"] and role != "releaser":
        assert lease_subjects(p) == []
    for verb in ("freeze", "thaw", "breaker-reset"):
        assert not allowed(allow, subjects.control(verb))
    assert not any(allowed(allow, s) for s in DESTROYERS)
    if b != a:
        for subject in (subjects.heartbeat(b), subjects.finding(b), subjects.vote(repair, b)):
            assert not allowed(allow, subject), subject


@given(name=NAMES, repair=REPAIRS)
def test_operators_publish_controls_and_watchers_nothing_on_the_bus(
        name: str, repair: str) -> None:
    operator, watcher = operator_publish_allow(), watcher_publish_allow()
    for verb in ("freeze", "thaw", "breaker-reset"):
        assert allowed(operator, subjects.control(verb))
        assert not allowed(watcher, subjects.control(verb))
    for subject in (subjects.heartbeat(name), subjects.vote(repair, name),
                    subjects.proposed(repair), subjects.decided(repair),
                    subjects.started(repair), subjects.result(repair),
                    f"$KV.{LEASES_BUCKET}.node.{name}"):
        assert not allowed(operator, subject)
        assert not allowed(watcher, subject)
    assert not any(allowed(operator, s) or allowed(watcher, s) for s in DESTROYERS)
    assert not any(allowed(watcher, s) for s in (f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}",
                                                 f"$JS.API.STREAM.CREATE.KV_{LEASES_BUCKET}"))


def test_render_is_a_valid_server_config_with_every_identity(config_copy: Path) -> None:
    config = _with_operator_and_watcher(load(config_paths(config_copy)))
    text = render_nats(config, listen="0.0.0.0:4222", store_dir="/var/lib/zeta-bus",
                       source=str(config_copy))
    path = config_copy / "nats.conf"
    path.write_text(text)
    checked = subprocess.run([str(binary()), "-t", "-c", str(path)], capture_output=True,
                             text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert 'listen: "0.0.0.0:4222"' in text
    assert 'store_dir: "/var/lib/zeta-bus"' in text
    for name in PERSONAS:
        assert f'nkey: "{config.persona(name).spec.identity.nkey}"' in text
    for user in (*config.fleet.spec.operators, *config.fleet.spec.watchers):
        assert f'nkey: "{user.nkey}"' in text
    assert text.count("nkey:") == len(PERSONAS) + 2
    # Without a store directory, the command line gives it (nats-server -sd).
    bare = render_nats(config, listen="127.0.0.1:4222", store_dir=None)
    assert "store_dir" not in bare
    assert "jetstream: enabled" in bare


def test_render_refuses_two_identities_with_one_key(config_copy: Path) -> None:
    config = load(config_paths(config_copy))
    otto = config.persona("otto").spec.identity.nkey
    fleet = config.fleet.model_copy(update={"spec": config.fleet.spec.model_copy(update={
        "operators": (BusUser(name=OPERATOR, nkey=otto),)})})
    with pytest.raises(DuplicateKeyError, match="operator oncall has the same nkey as "
                                                "persona otto"):
        render_nats(replace(config, fleet=fleet), listen="127.0.0.1:4222", store_dir=None)


def _with_operator_and_watcher(config: ConfigSet) -> ConfigSet:
    spec = config.fleet.spec.model_copy(update={
        "operators": (BusUser(name=OPERATOR, nkey=Signer(generate_user_seed()).public_key),),
        "watchers": (BusUser(name=WATCHER, nkey=Signer(generate_user_seed()).public_key),)})
    return replace(config, fleet=config.fleet.model_copy(update={"spec": spec}))


# ---------------------------------------------------------------- a real server


@dataclass
class Bus:
    """A nats-server running the rendered authorization, and everyone's seeds."""

    server: NatsServer
    credentials: Path
    opened: list[Connection] = field(default_factory=list)

    def seed(self, name: str) -> bytes:
        return (self.credentials / name / SEED_FILE).read_bytes()

    def signer(self, name: str) -> Signer:
        return Signer(self.seed(name))

    async def connect(self, name: str) -> Connection:
        """Connect as ``name``: a persona with its own inbox, else an operator or watcher."""
        inbox = "_INBOX" if name in (OPERATOR, WATCHER) else subjects.inbox(name)
        connection = Connection([self.server.url], name=name, seed=self.seed(name),
                                inbox_prefix=inbox)
        self.opened.append(connection)
        await connect_within(connection, 5, [self.server.url])
        return connection

    def violations(self) -> list[str]:
        return [line for line in self.server.lines if "Violation" in line]

    async def init(self) -> None:
        """Make the audit stream and lease bucket, as the operator does once."""
        operator = await self.connect(OPERATOR)
        assert await ensure(operator.js, Settings()) == []

    async def refused(self, name: str, subject: str) -> None:
        """Wait until the server has logged refusing ``subject`` from ``name``'s key."""
        key = self.signer(name).public_key
        wanted = re.compile(
            rf'"\$G/nkey:{key}" - Publish Violation - Subject "{re.escape(subject)}"')
        async with asyncio.timeout(5):
            # The lines come from NatsServer's reader thread: there is nothing to await.
            while not any(wanted.search(line) for line in self.server.lines):  # noqa: ASYNC110
                await asyncio.sleep(0.02)


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    config_dir, credentials = tmp_path / "config", tmp_path / "config" / "credentials"
    operator = write_seed(credentials, OPERATOR)
    watcher = write_seed(credentials, WATCHER)
    prepare_config(REPO, config_dir, tick=None, nats_url="nats://127.0.0.1:4222", fleet_spec={
        "operators": [{"name": OPERATOR, "nkey": operator}],
        "watchers": [{"name": WATCHER, "nkey": watcher}]})
    conf = tmp_path / "nats.conf"
    # The store directory is left to NatsServer's -sd: the server refuses both at once.
    conf.write_text(render_nats(load(config_paths(config_dir)), listen="127.0.0.1:4222",
                                store_dir=None))
    with NatsServer(tmp_path / "store", config=conf) as server:
        b = Bus(server, credentials)
        yield b
        for connection in b.opened:
            await connection.close()


class Inbox:
    """Everything a connection receives on ``zeta.>``, in order."""

    def __init__(self) -> None:
        self.subjects: list[str] = []
        self._arrived = asyncio.Condition()

    async def receive(self, msg: Msg) -> None:
        async with self._arrived:
            self.subjects.append(msg.subject)
            self._arrived.notify_all()

    async def until(self, subject: str) -> list[str]:
        """Wait for ``subject``; return everything received up to and including it."""
        async with asyncio.timeout(5), self._arrived:
            await self._arrived.wait_for(lambda: subject in self.subjects)
        return self.subjects[:self.subjects.index(subject) + 1]


async def listen(connection: Connection) -> Inbox:
    inbox = Inbox()
    await connection.subscribe("zeta.>", inbox.receive)
    await connection.sync()  # one flush can return before the SUB reached the server
    return inbox


def heartbeat(sender: str, signer: Signer) -> Envelope:
    return seal("heartbeat", sender=sender, host=HOST, signer=signer, body=Heartbeat(
        pid=1, version="test", tick=1, status="ok", bus="connected", kubernetes="observed",
        scopes_digest="s", policies_digest="p"))


def vote(sender: str, signer: Signer, repair: str) -> Envelope:
    return seal("vote", sender=sender, host=HOST, signer=signer, repair=repair, body=Vote(
        verdict="approve", reason="seen NotReady", observed_at=datetime.now(UTC),
        policy_digest="p"))


def proposal(sender: str, signer: Signer, repair: str) -> Envelope:
    return seal("proposal", sender=sender, host=HOST, signer=signer, repair=repair,
                body=Proposal(
                    action="k8s.node.cordon", target=Target(kind="node", name="worker-1"),
                    policy="node-not-ready", policy_digest="p", step=0, destructive=True,
                    quorum=QuorumRule(approvals=3, deadline=datetime.now(UTC)),
                    summary="cordon worker-1"))


async def audit_count(connection: Connection) -> int:
    info = await connection.js.stream_info(AUDIT_STREAM)
    return int(info.state.messages)


async def test_only_the_operator_creates_the_resources_and_every_persona_checks_them(
        bus: Bus) -> None:
    for name in PERSONAS:
        connection = await bus.connect(name)
        with pytest.raises(NatsError):
            await connection.nc.request(f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}", b"{}",
                                        timeout=1)
        await bus.refused(name, f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}")
    operator = await bus.connect(OPERATOR)
    assert await ensure(operator.js, Settings()) == []
    for name in PERSONAS:
        connection = await bus.connect(name)
        assert await check(connection.js, Settings()) == [], name


async def test_a_persona_cannot_vote_as_another(bus: Bus) -> None:
    alexa, otto = await bus.connect("alexa"), await bus.connect("otto")
    await bus.init()
    inbox = await listen(otto)
    repair = ids.new_id()
    forged = subjects.vote(repair, "riven")
    with capture_logs() as logs, pytest.raises(BusUnavailableError):
        await alexa.publish(forged, vote("riven", bus.signer("alexa"), repair))
    await bus.refused("alexa", forged)
    assert any(e["event"] == "bus error" and "permissions violation" in e["error"]
               and forged in e["error"] for e in logs), "the client was told, too"
    own = subjects.vote(repair, "alexa")
    await alexa.publish(own, vote("alexa", bus.signer("alexa"), repair))
    # Messages of one connection arrive in order: had the forgery passed, it would be first.
    assert await inbox.until(own) == [own]
    assert await audit_count(otto) == 1


async def test_a_persona_publishes_its_own_vote_and_heartbeat(bus: Bus) -> None:
    alexa, watcher = await bus.connect("alexa"), await bus.connect(WATCHER)
    await bus.init()
    inbox = await listen(watcher)
    repair = ids.new_id()
    await alexa.publish(subjects.vote(repair, "alexa"), vote("alexa", bus.signer("alexa"), repair))
    await alexa.publish(subjects.heartbeat("alexa"), heartbeat("alexa", bus.signer("alexa")))
    assert await inbox.until(subjects.heartbeat("alexa")) == [
        subjects.vote(repair, "alexa"), subjects.heartbeat("alexa")]
    assert await audit_count(alexa) == 1
    assert bus.violations() == []


@pytest.mark.parametrize("name", ["alexa", "riven"])
async def test_a_persona_without_bus_propose_cannot_propose(bus: Bus, name: str) -> None:
    voter, otto = await bus.connect(name), await bus.connect("otto")
    await bus.init()
    inbox = await listen(otto)
    repair = ids.new_id()
    with pytest.raises(BusUnavailableError):
        await voter.publish(subjects.proposed(repair), proposal(name, bus.signer(name), repair))
    await bus.refused(name, subjects.proposed(repair))
    await otto.publish(subjects.proposed(repair), proposal("otto", bus.signer("otto"), repair))
    assert await inbox.until(subjects.proposed(repair)) == [subjects.proposed(repair)]
    assert await audit_count(otto) == 1


async def test_only_an_executor_writes_leases(bus: Bus) -> None:
    alexa, otto = await bus.connect("alexa"), await bus.connect("otto")
    await bus.init()
    # A short timeout: a refused write is never acknowledged, only timed out.
    kv_alexa = await alexa.nc.jetstream(timeout=1).key_value(LEASES_BUCKET)
    kv_otto = await otto.js.key_value(LEASES_BUCKET)
    ttl = timedelta(minutes=5)
    with pytest.raises(NatsError):
        await leases.acquire(kv_alexa, "node.worker-1", repair=ids.new_id(), executor="alexa",
                             ttl=ttl)
    await bus.refused("alexa", f"$KV.{LEASES_BUCKET}.node.worker-1")
    lease = await leases.acquire(kv_otto, "node.worker-1", repair=ids.new_id(),
                                 executor="otto", ttl=ttl)
    assert lease.token == 1, "the refused create stored nothing"
    # A voter reads leases (it checks them before approving), but cannot release one.
    assert await leases.holder(kv_alexa, "node.worker-1") == lease
    assert [held.target for held in await leases.all_leases(kv_alexa)] == ["node.worker-1"]
    with pytest.raises(NatsError):
        await leases.release(kv_alexa, lease)
    assert await leases.still_held(kv_otto, lease)
    assert await leases.release(kv_otto, lease)
    assert await leases.holder(kv_otto, "node.worker-1") is None


async def test_nobody_can_delete_purge_or_reconfigure_the_audit(bus: Bus) -> None:
    otto = await bus.connect("otto")
    await bus.init()
    repair = ids.new_id()
    await otto.publish(subjects.vote(repair, "otto"), vote("otto", bus.signer("otto"), repair))
    everyone = (*PERSONAS, OPERATOR, WATCHER)
    connections = [await bus.connect(name) for name in everyone]
    destroyers = [f"$JS.API.STREAM.{verb}.{AUDIT_STREAM}"
                  for verb in ("DELETE", "PURGE", "UPDATE", "MSG.DELETE")]

    async def attempts(connection: Connection) -> list[object]:
        # Raw requests: had any been allowed, even an empty one would delete or purge
        # (or get an answer), and the test would see it.
        return [*await asyncio.gather(*(connection.nc.request(subject, b"", timeout=1)
                                        for subject in destroyers), return_exceptions=True)]

    outcomes = await asyncio.gather(*(attempts(c) for c in connections))
    for name, results in zip(everyone, outcomes, strict=True):
        assert all(isinstance(r, NatsError) for r in results), (name, results)
        for subject in destroyers:
            await bus.refused(name, subject)
    # Creating it again with other settings is the server's refusal, not a way around;
    # and a persona may not even ask.
    changed = replace(stream_config(Settings()), max_age=timedelta(days=7).total_seconds())
    with pytest.raises(BadRequestError, match="different configuration"):
        await connections[everyone.index(OPERATOR)].js.add_stream(changed)
    with pytest.raises(NatsError):
        await otto.nc.request(f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}", b"{}", timeout=1)
    await bus.refused("otto", f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}")
    assert await audit_count(otto) == 1


async def test_a_watcher_reads_everything_and_publishes_nothing(bus: Bus) -> None:
    watcher, otto = await bus.connect(WATCHER), await bus.connect("otto")
    await bus.init()
    inbox = await listen(watcher)
    await watcher.publish(subjects.heartbeat("otto"), heartbeat("otto", bus.signer(WATCHER)))
    await bus.refused(WATCHER, subjects.heartbeat("otto"))
    thaw = seal("control", sender=WATCHER, host=HOST, signer=bus.signer(WATCHER),
                body=Control(verb="thaw", reason="let me"))
    with pytest.raises(BusUnavailableError):
        await watcher.publish(subjects.control("thaw"), thaw)
    await bus.refused(WATCHER, subjects.control("thaw"))
    marker = subjects.finding("otto")
    await otto.publish(marker, heartbeat("otto", bus.signer("otto")))
    assert await inbox.until(marker) == [marker], "refused before the marker was sent"
    repair = ids.new_id()
    await otto.publish(subjects.vote(repair, "otto"), vote("otto", bus.signer("otto"), repair))
    stored = await watcher.js.get_last_msg(AUDIT_STREAM, subjects.vote(repair, "otto"))
    assert stored.data is not None
    assert b'"from":"otto"' in stored.data
    history = await auditing.read(watcher.js)  # what `zeta-agent audit --seed` reads
    assert [m.subject for m in history] == [subjects.vote(repair, "otto")]
    reader = await watcher.js.pull_subscribe("zeta.repair.>", stream=AUDIT_STREAM)
    [message] = await reader.fetch(1, timeout=2)
    await message.ack()
    assert message.subject == subjects.vote(repair, "otto")
    assert [v for v in bus.violations() if "Subject \"$" in v] == [], "reading is allowed"


async def test_a_reader_answers_flow_control_past_the_first_window(bus: Bus) -> None:
    # A push consumer with flow control (nats-py's ordered consumers, so kv.keys and
    # kv.watch) stops delivering after ~2 MiB pending until the reader answers the
    # server's flow-control request on $JS.FC.…: that answer must be allowed.
    otto, alexa = await bus.connect("otto"), await bus.connect("alexa")
    await bus.init()
    repair, blob, count = ids.new_id(), "x" * 50_000, 60
    for _ in range(count):
        await otto.publish(subjects.vote(repair, "otto"), seal(
            "vote", sender="otto", host=HOST, signer=bus.signer("otto"), repair=repair,
            body=Vote(verdict="approve", reason="r", evidence={"blob": blob},
                      observed_at=datetime.now(UTC), policy_digest="p")))
    answered: list[str] = []
    delivered = asyncio.Queue[Msg]()

    async def on_message(msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status") == "100":
            if msg.reply:  # a flow-control request; idle heartbeats carry no reply
                answered.append(msg.reply)
                await alexa.nc.publish(msg.reply, b"")
            return
        await delivered.put(msg)

    inbox = alexa.nc.new_inbox()
    await alexa.nc.subscribe(inbox, cb=on_message)
    await alexa.js.add_consumer(AUDIT_STREAM, ConsumerConfig(
        deliver_subject=inbox, flow_control=True, idle_heartbeat=1.0,
        ack_policy=AckPolicy.NONE))
    async with asyncio.timeout(10):
        for _ in range(count):
            await delivered.get()
    assert answered
    assert all(r.startswith(f"$JS.FC.{AUDIT_STREAM}.") for r in answered)
    assert bus.violations() == []


async def test_an_unknown_key_cannot_connect(bus: Bus) -> None:
    async def quiet(_exc: Exception) -> None:
        pass

    for seed in (generate_user_seed().decode(), None):
        client = Client()
        with pytest.raises(NatsError, match="Authorization Violation"):
            await client.connect(bus.server.url, nkeys_seed_str=seed, allow_reconnect=False,
                                 connect_timeout=2, error_cb=quiet)
        await client.close()  # a refused client still holds its socket
    assert any("authentication error" in line for line in bus.server.lines)


def test_shipped_personas_get_the_subjects_their_duties_need() -> None:
    config = load(config_paths(REPO))
    bus_subjects = {name: [s for s in publish_allow(config.persona(name))
                           if s.startswith("zeta.")] for name in PERSONAS}
    assert bus_subjects == {
        "alexa": ["zeta.agent.alexa.>", "zeta.repair.*.vote.alexa"],
        "lior": ["zeta.agent.lior.>", "zeta.repair.*.vote.lior", "zeta.repair.*.proposed",
                 "zeta.repair.*.decided", "zeta.repair.*.started", "zeta.repair.*.result"],
        "otto": ["zeta.agent.otto.>", "zeta.repair.*.vote.otto", "zeta.repair.*.proposed",
                 "zeta.repair.*.decided", "zeta.repair.*.started", "zeta.repair.*.result"],
        "riven": ["zeta.agent.riven.>", "zeta.repair.*.vote.riven"],
        "vera": ["zeta.agent.vera.>", "zeta.repair.*.vote.vera", "zeta.repair.*.proposed",
                 "zeta.repair.*.decided", "zeta.repair.*.started", "zeta.repair.*.result"],
    }


def _closed_port() -> int:
    return free_ports(1)[0]


@pytest.mark.slow
async def test_the_five_agents_repair_on_a_bus_that_enforces_the_rendered_permissions(
        tmp_path: Path) -> None:
    # The shipped personas with fresh keys decide and run a destructive repair (the API
    # server is a closed port, so apiserver-unreachable opens and Otto proposes).
    port, config_dir = _closed_port(), tmp_path / "config"
    operator = write_seed(config_dir / "credentials", OPERATOR)
    prepare_config(
        REPO, config_dir, tick=None, nats_url=f"nats://127.0.0.1:{port}", dry_run=False,
        policy_spec={"apiserver-unreachable": {"detect": {"kind": "apiserver-unreachable",
                                                          "minPaths": 2, "for": "0s"}}},
        fleet_spec={"apiservers": [f"https://127.0.0.1:{_closed_port()}"],
                    "operators": [{"name": OPERATOR, "nkey": operator}]})
    config = load(config_paths(config_dir))
    conf = tmp_path / "nats.conf"
    conf.write_text(render_nats(config, listen="127.0.0.1:4222", store_dir=None))
    actuator = RecordingActuator(Outcome(ok=True, detail="k3s.service restarted"))
    with NatsServer(tmp_path / "store", config=conf, port=port) as server:
        # What the operator does once, with the operator's own key.
        await init_bus(server.url, config,
                       seed=(config_dir / "credentials" / OPERATOR / SEED_FILE).read_bytes())
        agents = [build(config, name, state_dir=tmp_path / "state" / name, environ={},
                        host=name, actuators={"host.unit.restart": actuator})
                  for name in PERSONAS]
        for agent in agents:
            agent.timing = replace(agent.timing, tick=0.5)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
        try:
            async with asyncio.timeout(30):
                while not actuator.runs:  # noqa: ASYNC110 (state of the agents' tasks)
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        violations = [line for line in server.lines if "Violation" in line]
    assert len(actuator.runs) == 1
    assert violations == []


def test_the_operations_doc_lists_exactly_the_jetstream_subjects_granted() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    lines = text.splitlines()
    start = lines.index("| subject | granted to | needed for |")
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in itertools.takewhile(lambda ln: ln.startswith("|"), lines[start + 2:])]
    config = load(config_paths(REPO))
    granted = {"voter": publish_allow(config.persona("alexa")),
               "executor": publish_allow(config.persona("otto")),
               "releaser": publish_allow(config.persona("lior")),
               "operator": operator_publish_allow(), "watcher": watcher_publish_allow()}
    who = {"everyone": set(granted), "operators": {"operator"},
           "watchers": {"watcher"},
           "personas with scope `bus:leases:release`": {"releaser"},
           "personas with duty `execute`, for each kind of target its scopes let it act on":
               {"executor"}}
    kinds = lease_kinds(config.persona("otto"))
    documented: set[str] = set()
    for subject, holders, _ in rows:
        assert holders in who, holders
        for stream, kind in itertools.product((AUDIT_STREAM, f"KV_{LEASES_BUCKET}"), kinds):
            expanded = subject.strip("`").replace("<stream>", stream).replace("<kind>", kind)
            documented.add(expanded)
            for role, allow in granted.items():
                assert (expanded in allow) == (role in who[holders]), (expanded, role)
    code = {s for allow in granted.values() for s in allow if s.startswith("$")}
    assert documented == code


async def test_a_persona_reads_only_its_own_replies(bus: Bus) -> None:
    """With the shared _INBOX any persona could read every JetStream answer on the bus."""
    alexa = await bus.connect("alexa")
    otto = await bus.connect("otto")
    await bus.init()
    snooped: list[str] = []

    async def snoop(msg: Msg) -> None:
        snooped.append(msg.subject)

    for pattern in ("_INBOX.>", f"{subjects.inbox('otto')}.>"):
        await alexa.nc.subscribe(pattern, cb=snoop)
    await alexa.sync()
    await otto.js.stream_info(AUDIT_STREAM)  # otto's request and the server's reply
    await alexa.sync()
    key = bus.signer("alexa").public_key
    async with asyncio.timeout(5):
        while sum(f'"$G/nkey:{key}" - Subscription Violation' in line  # noqa: ASYNC110
                  for line in bus.server.lines) < 2:
            await asyncio.sleep(0.02)
    assert snooped == []
