"""Three hosts, a partition and its healing: the majority repairs, the cut-off host refuses.

The hosts are network namespaces on a private bridge (tests/netns.py). Each runs a
nats-server (from the wheel) clustered with the other two by routes, with JetStream:
the audit stream and the lease bucket have three replicas (fleet ``auditReplicas: 3``).
Each agent is ``python -m runtime run <persona>`` started inside its host and talks
only to its own host's server (``nats://127.0.0.1:4222`` there):

    h1: otto, alexa     h2: riven, vera     h3: otto, lior

Otto runs on two hosts, as it would on every host whose units it restarts, so both
sides of the cut have a proposer. The repair is the shipped apiserver-unreachable
policy: every agent probes an API server address where nothing listens, so every
one of them really sees it unreachable on two paths, and Otto proposes restarting
``k3s.service`` on his host: destructive, three approvals with Riven's veto. The veto
holder must speak before anything is approved, so every approval needs Riven's vote
from h2: a quorum always spans hosts. The policy is ``mode: dry-run`` (there is no
k3s here and no systemd to restart it with): everything runs for real, proposal,
votes, decision, lease, ``started``, result, except the actuator, which records that
it would have acted. Timings are test-sized (tick 1 s, ``for:`` 2 s, cooldown 5 s,
no verify step), so each Otto repairs again and again. The policies that could open
on their own here (units, peer silence) are held off with a ``for:`` of an hour.

Scenario: both Ottos complete a repair; h1 is cut off (its bridge port down). While
cut off, h1's agents keep observing and reporting (ticks, the open finding, heartbeats
on their own server, which alone has lost JetStream: no meta leader, no stream leader),
Otto there refuses (his proposal cannot even be stored) and nothing h1 sends is
committed, while h3's Otto goes on repairing with votes from h2 and h3. h1 is
reconnected; the cluster converges; both Ottos repair again (a refused repair is
offered again after the engine's one-minute retry delay, most of this test's run
time); the agents stop. Then: no repair id has two starts or two executions, every
server's replica of the audit stream is the same (each server's own jsz state, and
the whole stream read with each server in turn as the stream leader), and
``zeta-agent audit verify`` passes, run on h1.

Needs root (with CAP_SYS_ADMIN), ``ip`` (iproute2), ``unshare`` (util-linux) and
``hostname``; skipped without them locally, failed under CI=true. Every wait is
bounded; everything started is stopped and every namespace deleted however the test
ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import StreamInfo

from bus.connection import BusUnavailableError, Connection
from bus.jetstream import AUDIT_STREAM
from bus.reading import Stored
from lab.fleet import AgentProcess, prepare_config, stop_agents, wait_until
from lab.natsserver import NatsCluster, NatsServer, NatsServerError
from runtime.agent import logs
from runtime.ops import audit as auditing
from tests.conftest import REPO
from tests.netns import Host, NetnsError, Network, prerequisites
from tests.prereq import missing

pytestmark = pytest.mark.slow

HOSTS: dict[str, tuple[str, ...]] = {"h1": ("otto", "alexa"), "h2": ("riven", "vera"),
                                     "h3": ("otto", "lior")}
ISOLATED = "h1"
URL = "nats://127.0.0.1:4222"  # every host's own server, as seen from that host
TICK = timedelta(seconds=1)
QUORUM = {"approvals": 3, "veto": ["riven"], "deadline": "8s"}
HELD_OFF = "1h"
ACTION = "host.unit.restart"
POLICIES: dict[str, dict[str, Any]] = {
    "apiserver-unreachable": {
        "detect": {"kind": "apiserver-unreachable", "minPaths": 2, "for": "2s"},
        "remedies": [{"action": ACTION, "params": {"unit": "k3s.service"},
                      "quorum": QUORUM}],
        # Each Otto repairs the same target again and again on purpose: past the loop
        # guard's default of three attempts a day it would escalate and stop.
        "budget": {"maxInFlight": 1, "perHour": 1000, "maxAttempts": 100},
        "cooldown": "5s",
        "mode": "dry-run",
    },
    "kubelet-failed": {"detect": {"kind": "unit-failed", "units": ["kubelet.service"],
                                  "states": ["failed", "inactive"], "for": HELD_OFF}},
    "containerd-failed": {"detect": {"kind": "unit-failed", "units": ["containerd.service"],
                                     "states": ["failed", "inactive"], "for": HELD_OFF}},
    "peer-silent": {"detect": {"kind": "peer-silent", "silentAfter": "45s", "for": HELD_OFF}},
}


def say(text: str) -> None:
    print(f"[partition {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---------------------------------------------------------------- agents


def _host_of(agent: AgentProcess) -> str:
    return agent.name.partition("@")[2]


def _between(agent: AgentProcess, event: str, start: datetime,
             end: datetime) -> list[dict[str, Any]]:
    """The agent's log lines of ``event`` stamped between ``start`` and ``end``."""
    return [e for e in agent.events()
            if e.get("event") == event and start < _at(e["timestamp"]) < end]


def _start_agent(host: Host, persona: str, config_dir: Path, workdir: Path) -> AgentProcess:
    """``python -m runtime run <persona>`` in ``host``; named ``<persona>@<host>``."""
    name = f"{persona}@{host.name}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "ZETA_CONFIG_DIR",
                        "ZETA_NATS_URL", "CREDENTIALS_DIRECTORY", "SYSTEMD_EXEC_PID")}
    state = workdir / "state" / name
    state.mkdir(parents=True)
    env.update(STATE_DIRECTORY=str(state), PYTHONUNBUFFERED="1")
    log = workdir / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "runtime", "run", persona, "--config-dir", str(config_dir),
            "--log-format", "json"]
    with log.open("wb") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(host.command(argv), cwd=REPO, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return AgentProcess(name, process, log)


# ---------------------------------------------------------------- the bus, from each host


async def _connected(name: str) -> Connection:
    conn = Connection([URL], name=name, seed=None)
    async with asyncio.timeout(10):
        await conn.connect()
    return conn


def _read_audit(host: Host) -> list[dict[str, Any]]:
    """ZETA_AUDIT as read through ``host``'s server: envelopes with their seq and subject.

    Empty until an agent has created the stream.
    """

    async def read() -> list[Stored]:
        conn = await _connected("partition-audit")
        try:
            async with asyncio.timeout(30):
                return await auditing.read(conn.js)
        except auditing.StreamMissingError:
            return []
        finally:
            await conn.close()

    stored = host.call(lambda: asyncio.run(read()))
    return [{"seq": m.seq, "subject": m.subject, **json.loads(m.data)} for m in stored]


def _audit_so_far(host: Host) -> list[dict[str, Any]]:
    """``_read_audit`` for polling: empty while the server cannot answer (an election)."""
    try:
        return _read_audit(host)
    except (NatsError, TimeoutError, BusUnavailableError):
        return []


def _listen(host: Host, subject: str, seconds: float) -> list[dict[str, Any]]:
    """Every message on ``subject`` that ``host``'s server delivers for ``seconds``."""

    async def listen() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []

        async def on(msg: Msg) -> None:
            seen.append(json.loads(msg.data))

        conn = await _connected("partition-listener")
        try:
            await conn.subscribe(subject, on)
            await asyncio.sleep(seconds)
        finally:
            await conn.close()
        return seen

    return host.call(lambda: asyncio.run(listen()))


def _stream_as_leader(host: Host) -> tuple[int, str]:
    """Make ``host``'s replica the ZETA_AUDIT leader, then read the whole stream from it.

    Reads are answered by the stream leader from its own store, so this reads exactly
    ``host``'s replica. Returns (messages, sha256 of every seq, subject and payload).
    """

    async def read() -> tuple[int, str]:
        conn = await _connected("partition-replica-reader")
        try:
            async with asyncio.timeout(30):
                while _leader(await conn.js.stream_info(AUDIT_STREAM)) != host.name:
                    request = json.dumps({"placement": {"preferred": host.name}}).encode()
                    # An election may answer late; the loop looks again either way.
                    with contextlib.suppress(TimeoutError):
                        await conn.nc.request(
                            f"$JS.API.STREAM.LEADER.STEPDOWN.{AUDIT_STREAM}", request,
                            timeout=5)
                    await asyncio.sleep(0.5)
                stored = await auditing.read(conn.js)
        finally:
            await conn.close()
        digest = hashlib.sha256()
        for m in stored:
            digest.update(f"{m.seq}\0{m.subject}\0".encode() + m.data + b"\0")
        return len(stored), digest.hexdigest()

    return host.call(lambda: asyncio.run(read()))


def _leader(info: StreamInfo) -> str | None:
    return info.cluster.leader if info.cluster is not None else None


def _replica_state(server: NatsServer) -> dict[str, Any]:
    """What ``server`` itself holds of ZETA_AUDIT (its own replica, from its jsz)."""
    jsz = server.monitor("jsz?accounts=true&streams=true")
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            if stream["name"] == AUDIT_STREAM:
                state: dict[str, Any] = stream["state"]
                return {k: state.get(k) for k in ("messages", "bytes", "first_seq", "last_seq",
                                                   "last_ts")}
    return {}


def _converged(cluster: NatsCluster) -> bool:
    """Every server is routed to every other, healthy, and agrees on one meta leader."""
    leaders = set()
    for server in cluster.servers:
        try:
            if server.monitor("healthz").get("status") != "ok":
                return False
            routed = {r.get("remote_name") for r in server.monitor("routez").get("routes", [])}
            leaders.add(server.monitor("jsz").get("meta_cluster", {}).get("leader"))
        except NatsServerError:
            return False
        assert server.place is not None
        others = {s.place.name for s in cluster.servers if s.place is not None} - {
            server.place.name}
        if not others <= routed:
            return False
    return len(leaders) == 1 and None not in leaders and "" not in leaders


# ---------------------------------------------------------------- the audit, read back


@dataclass
class Repair:
    id: str
    messages: list[dict[str, Any]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["kind"] == kind]

    @property
    def proposal(self) -> dict[str, Any] | None:
        return next(iter(self.of("proposal")), None)

    @property
    def host(self) -> str | None:
        proposal = self.proposal
        return proposal["host"] if proposal else None

    def executions(self) -> list[dict[str, Any]]:
        """Results that report the action itself (not a later verification)."""
        return [r for r in self.of("result") if r["body"]["outcome"] in ("succeeded", "failed")]

    @property
    def executed(self) -> bool:
        return any(r["body"]["outcome"] == "succeeded" for r in self.executions())


def _repairs(audit: list[dict[str, Any]]) -> dict[str, Repair]:
    repairs: dict[str, Repair] = {}
    for message in audit:
        if message.get("repair"):
            repairs.setdefault(message["repair"], Repair(message["repair"])).messages.append(
                message)
    return repairs


def _executed_from(audit: list[dict[str, Any]], host: str,
                   after: datetime | None = None) -> list[Repair]:
    """Repairs proposed from ``host`` that started (after ``after``) and succeeded."""
    return [r for r in _repairs(audit).values()
            if r.host == host and r.of("started") and r.executed
            and (after is None or _at(r.of("started")[0]["at"]) > after)]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def network() -> Iterator[Network]:
    if lacking := prerequisites():
        missing("partition test needs " + ", ".join(lacking))
    try:
        net = Network(list(HOSTS)).__enter__()
    except NetnsError as exc:  # root, but no CAP_SYS_ADMIN (an unprivileged container)
        missing(f"cannot make network namespaces here: {exc}")
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def cluster(network: Network, tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats", len(HOSTS),
                     places=list(network.hosts.values())) as started:
        yield started


@pytest.fixture
async def agents(network: Network, cluster: NatsCluster,
                 tmp_path: Path) -> AsyncIterator[dict[str, AgentProcess]]:
    """Every persona of HOSTS started in its host; all stopped (and exit 0) after."""
    config_dir = tmp_path / "config"
    prepare_config(REPO, config_dir, tick=TICK, nats_url=URL, dry_run=False,
                   policy_spec=POLICIES,
                   fleet_spec={"apiservers": ["https://127.0.0.1:6443"],
                               "bus": {"urls": [URL], "auditReplicas": 3},
                               "quorum": QUORUM})
    # The operator makes the R3 audit stream and lease bucket once, from one host.
    first = next(iter(network.hosts.values()))
    await asyncio.to_thread(
        subprocess.run, first.command([sys.executable, "-m", "runtime", "bus", "init",
                                       "--config-dir", str(config_dir), "--timeout", "60"]),
        cwd=REPO, check=True, timeout=90, capture_output=True)
    started: dict[str, AgentProcess] = {}
    try:
        for name, personas in HOSTS.items():
            for persona in personas:
                agent = _start_agent(network.hosts[name], persona, config_dir, tmp_path)
                started[agent.name] = agent
        yield started
    finally:
        codes = await asyncio.to_thread(stop_agents, started)
        say(f"agents stopped: {codes}")
    assert set(codes.values()) == {0}, f"unclean exits: {codes}\n{_dump(started)}"


def _dump(agents: dict[str, AgentProcess]) -> str:
    """The tail of every agent's log, for a failure message."""
    return "\n".join(f"--- {n}\n" + "\n".join(
        a.log.read_text(errors="replace").splitlines()[-12:]) for n, a in agents.items())


# ---------------------------------------------------------------- the scenario


def _quorum_of(repair: Repair, votes: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    """(persona, host) of the proposer and of every vote its approval counted."""
    [decision] = repair.of("decision")
    assert decision["body"]["outcome"] == "approved", decision["body"]
    proposal = repair.proposal
    assert proposal is not None
    return {(proposal["from"], proposal["host"])} | {
        (votes[v]["from"], votes[v]["host"]) for v in decision["body"]["votes"]}


async def test_a_cut_off_host_refuses_while_the_majority_repairs_and_the_audit_converges(
        network: Network, cluster: NatsCluster, agents: dict[str, AgentProcess],
        tmp_path: Path) -> None:
    logs.configure(level="warning")  # this process's own bus clients: only trouble
    began = time.monotonic()
    hosts = network.hosts
    cut, peer = hosts[ISOLATED], hosts["h2"]
    server_of = {s.place.name: s for s in cluster.servers if s.place is not None}
    otto_cut = agents[f"otto@{ISOLATED}"]
    on_cut = [a for a in agents.values() if _host_of(a) == ISOLATED]
    say(f"network {network.tag}: " + ", ".join(
        f"{h.name}={h.address} ({'+'.join(HOSTS[h.name])})" for h in hosts.values()))

    # Before: both Ottos repair, each with Riven's vote from h2.
    await wait_until(lambda: all(_executed_from(_audit_so_far(peer), h) for h in ("h1", "h3")),
                90, f"a repair executed by Otto on h1 and on h3\n{_dump(agents)}")
    say(f"both Ottos have executed a repair ({time.monotonic() - began:.0f}s)")

    # Cut h1 off: the majority goes on, h1 observes, reports and refuses.
    network.partition(ISOLATED)
    cut_at = datetime.now(UTC)
    say(f"{ISOLATED} cut off")
    await wait_until(lambda: _executed_from(_audit_so_far(peer), "h3", after=cut_at), 100,
                f"the majority's Otto to execute a repair after the cut\n{_dump(agents)}")
    say(f"the majority (h2, h3) executed a repair after the cut "
        f"({time.monotonic() - began:.0f}s)")
    await wait_until(lambda: _between(otto_cut, "intent refused", cut_at, datetime.now(UTC)), 60,
                f"Otto on {ISOLATED} to refuse a repair\n{_dump(agents)}")
    heard_cut, heard_peer = await asyncio.gather(
        asyncio.to_thread(_listen, cut, "zeta.agent.*.heartbeat", 6.0),
        asyncio.to_thread(_listen, peer, "zeta.agent.*.heartbeat", 6.0))
    cut_health = await asyncio.to_thread(server_of[ISOLATED].monitor, "healthz")
    say(f"{ISOLATED}'s server while cut off: healthz {cut_health}")
    healed_at = datetime.now(UTC)
    network.heal(ISOLATED)
    say(f"{ISOLATED} reconnected after {(healed_at - cut_at).total_seconds():.0f}s")

    # While cut off, each side's bus carried its own side's reports only.
    assert {(m["from"], m["host"]) for m in heard_cut} == {("otto", "h1"), ("alexa", "h1")}
    assert {m["host"] for m in heard_peer} == {"h2", "h3"}
    for agent in on_cut:
        # Slowed, not stopped: the lease observer waits out its timeout for JetStream.
        ticks = _between(agent, "tick", cut_at, healed_at)
        say(f"{agent.name} ticked {len(ticks)} times while cut off, the longest tick "
            f"{max((t['duration_ms'] for t in ticks), default=0)} ms")
        assert len(ticks) >= 2, f"{agent.name} stopped observing while cut off"
    assert [e for e in _between(otto_cut, "tick", cut_at, healed_at)
            if e.get("findings_open", 0) >= 1], f"Otto on {ISOLATED} lost its finding"
    reasons = [e["reason"] for e in _between(otto_cut, "intent refused", cut_at, healed_at)]
    say(f"Otto on {ISOLATED} refused {len(reasons)} time(s) while cut off: {reasons}")
    assert reasons
    assert _between(otto_cut, "action finished", cut_at, healed_at) == []

    # Healed: the cluster converges and both Ottos repair again (a refused repair is
    # offered again a minute later: the engine's retry delay).
    await wait_until(lambda: _converged(cluster), 60, "the cluster to converge after healing")
    say(f"cluster converged: every server routed to every other, one meta leader "
        f"({time.monotonic() - began:.0f}s)")
    await wait_until(lambda: all(_executed_from(_audit_so_far(cut), h, after=healed_at)
                            for h in ("h1", "h3")),
                100, f"both Ottos to execute a repair after healing\n{_dump(agents)}")
    say(f"both Ottos executed a repair after healing ({time.monotonic() - began:.0f}s)")

    # ------------------------------------------------ every replica holds the same audit
    codes = await asyncio.to_thread(stop_agents, agents)
    assert set(codes.values()) == {0}, f"unclean exits: {codes}\n{_dump(agents)}"
    states = {name: await asyncio.to_thread(_replica_state, server)
              for name, server in server_of.items()}
    say(f"each server's own ZETA_AUDIT replica: {states}")
    assert len({json.dumps(s, sort_keys=True) for s in states.values()}) == 1, states
    replicas = {h.name: await asyncio.to_thread(_stream_as_leader, h) for h in hosts.values()}
    say(f"read with each host as stream leader (messages, sha256): {replicas}")
    assert len(set(replicas.values())) == 1, replicas

    # ------------------------------------------------ and the audit says
    audit = await asyncio.to_thread(_read_audit, cut)
    assert len(audit) == states[ISOLATED]["messages"]
    ids = Counter(m["id"] for m in audit)
    assert [i for i, n in ids.items() if n > 1] == [], "a message is stored twice"
    repairs = _repairs(audit)
    for repair in repairs.values():
        assert len(repair.of("started")) <= 1, f"repair {repair.id} started twice"
        assert len(repair.executions()) <= 1, f"repair {repair.id} executed twice"
        assert repair.of("started") or not repair.executions(), f"{repair.id}: no start"
    executed = [r for r in repairs.values() if r.of("started")]
    assert {r.of("proposal")[0]["body"]["action"] for r in executed} == {ACTION}
    # Nothing the cut-off side sent while cut off was committed.
    assert [m for m in audit if m["host"] == ISOLATED
            and cut_at < _at(m["at"]) < healed_at] == []
    votes = {m["id"]: m for m in audit if m["kind"] == "vote"}
    during = [r for r in _executed_from(audit, "h3", after=cut_at)
              if _at(r.of("started")[0]["at"]) < healed_at]
    assert during
    for repair in during:
        quorum = _quorum_of(repair, votes)
        assert ("riven", "h2") in quorum, quorum
        assert {h for _, h in quorum} == {"h2", "h3"}, quorum
    for repair in executed:  # every approval spans hosts
        assert len({h for _, h in _quorum_of(repair, votes)}) >= 2, repair.id
    say(f"audit: {len(audit)} messages, {len(repairs)} repairs, {len(executed)} executed "
        f"({len(during)} by the majority while {ISOLATED} was cut off), none twice")

    # The stream is sound as a whole, checked from the host that was cut off.
    verify = await asyncio.to_thread(
        subprocess.run, cut.command([sys.executable, "-m", "runtime", "audit", "verify",
                                     "--config-dir", str(tmp_path / "config")]),
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    say(f"zeta-agent audit verify on {ISOLATED}: exit {verify.returncode}: "
        f"{verify.stderr.strip()} {verify.stdout.strip()}")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"ok: {len(audit)} messages checked" in verify.stderr
    say(f"done in {time.monotonic() - began:.0f}s")
