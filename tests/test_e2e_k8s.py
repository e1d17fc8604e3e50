"""End to end: the five shipped personas, as five processes, repair a real Kubernetes cluster.

Each persona runs as ``python -m runtime run <name>`` (what its systemd unit runs), with
its own state directory, its own kubeconfig (a token user of the session's control
plane) bound to the ClusterRole rendered from its scopes, on a real nats-server. The
node simulator stands in for kubelets and the scheduler; the real node-lifecycle
controller turns stopped heartbeats into NotReady nodes. Processes rather than
in-process agents: the point is the shipped entry point, credentials on disk and five
independent watch caches; every process logs JSON lines to a file the assertions read.

Timings are shortened (tick 1 s, ``for:`` 5 s, quorum deadlines 10 s); every wait is
bounded and every process is stopped (SIGTERM, then SIGKILL) however a test ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from nats.aio.msg import Msg

from bus.connection import Connection
from runtime import auditing
from runtime.catalog import PERSONA_ANNOTATION, REPAIR_ANNOTATION
from runtime.cluster.acting import RESTARTED_AT
from runtime.cluster.controlplane import ControlPlane
from runtime.cluster.nodesim import JsonApi, NodeSimulator
from runtime.cluster.rbac import render_all
from runtime.coordinating import Roster
from runtime.lab import prepare_config
from runtime.loading import config_paths, load
from runtime.natsserver import NatsServer
from tests.conftest import REPO
from tests.k8s import admin_api, admin_json, deployment
from tests.test_fleet_quorum import NAMES
from tests.test_k8s_acting import ReadyCounter, is_ready
from tests.test_rbac import apply

pytestmark = pytest.mark.slow
T = TypeVar("T")

TICK = timedelta(seconds=1)
STOP_GRACE = 10.0
QUORUM = {"approvals": 3, "veto": ["riven"], "deadline": "10s"}
NODE_NOT_READY = {
    "detect": {"kind": "node-condition", "condition": "Ready", "status": ["False", "Unknown"],
               "for": "5s"},
    # The shipped ladder with test-sized windows. A cordon alone cannot clear
    # NotReady: its short verify window moves on to the drain.
    "remedies": [
        {"action": "k8s.node.cordon", "quorum": QUORUM,
         "verify": {"within": "3s", "expect": "finding-cleared"}},
        {"action": "k8s.node.drain", "params": {"timeout": "90s"}, "quorum": QUORUM,
         "verify": {"within": "90s", "expect": "finding-cleared"}},
    ],
    "budget": {"maxInFlight": 1, "perHour": 10, "maxUnhealthyFraction": 0.3},
}
POLICIES: dict[str, dict[str, Any]] = {
    "node-not-ready": NODE_NOT_READY,
    "cordon-without-owner": {"detect": {"kind": "cordon-without-owner", "for": "5s"}},
    "pod-crashloop": {
        "detect": {"kind": "pod-crashloop", "minRestarts": 2, "for": "5s"},
        "remedies": [
            {"action": "k8s.workload.restart",
             "quorum": {"approvals": 2, "veto": ["riven"], "deadline": "10s"},
             "verify": {"within": "60s", "expect": "finding-cleared"}},
            {"action": "bus.escalate", "params": {"message": "still crash-looping"}}]},
    "apiserver-unreachable": {"detect": {"kind": "apiserver-unreachable", "minPaths": 2,
                                         "for": "3s"}},
}
DESTRUCTIVE_CALLS = ("patch nodes", "create pods/eviction", "delete pods", "patch deployments")


async def until(check: Callable[[], T | None], within: float, what: str) -> T:
    """Poll ``check`` (a quick, blocking look) until it returns a true value; that value."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.25)


# ---------------------------------------------------------------- the fleet of processes


@dataclass
class AgentProcess:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (anything else, e.g. a traceback, is kept as text)."""
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "(not json)", "text": line})
        return out

    def ticks(self) -> int:
        return max((e["tick"] for e in self.events() if e.get("event") == "tick"), default=0)


@dataclass
class Fleet:
    config_dir: Path
    agents: dict[str, AgentProcess]
    server: NatsServer
    heartbeats: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def events(self, event: str) -> list[dict[str, Any]]:
        """Every log line of every agent whose event is ``event``."""
        return [e for a in self.agents.values() for e in a.events() if e.get("event") == event]

    def alive(self) -> list[str]:
        return [n for n, a in self.agents.items() if a.process.poll() is None]

    def kubernetes_changes(self) -> list[dict[str, Any]]:
        return self.events("kubernetes change made")

    async def stored(self) -> list[auditing.Stored]:
        """Everything in ZETA_AUDIT so far, as stored."""
        conn = Connection([self.server.url], name="e2e-audit", seed=None)
        await conn.connect()
        try:
            return await auditing.read(conn.js)
        finally:
            await conn.close()

    async def audit(self) -> list[dict[str, Any]]:
        """ZETA_AUDIT as JSON envelopes, in stream order."""
        return [{"subject": m.subject, **json.loads(m.data)} for m in await self.stored()]

    def dump(self) -> str:
        """The tail of every agent's log, for a failure message."""
        return "\n".join(f"--- {n}\n" + "\n".join(
            a.log.read_text(errors="replace").splitlines()[-15:]) for n, a in self.agents.items())


def _install_kubernetes(config_dir: Path, plane: ControlPlane) -> None:
    """Each persona's kubeconfig where credential_path looks, and its rendered RBAC applied."""
    config = load(config_paths(config_dir))
    for name, persona in config.personas.items():
        user = persona.value.spec.identity.kubernetes.user
        target = config_dir / "credentials" / name / "kubeconfig"
        shutil.copyfile(plane.kubeconfig_for(user), target)
        target.chmod(0o600)
    with admin_api(plane) as api:
        apply(api, render_all(p.value for p in config.personas.values()))


def _start(config_dir: Path, name: str, workdir: Path) -> AgentProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "ZETA_CONFIG_DIR",
                        "ZETA_NATS_URL", "CREDENTIALS_DIRECTORY")}
    state = workdir / "state" / name
    state.mkdir(parents=True)
    env.update(STATE_DIRECTORY=str(state), PYTHONUNBUFFERED="1")
    log = workdir / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("wb") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime", "run", name, "--config-dir", str(config_dir)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    return AgentProcess(name, process, log)


def _stop(agents: Mapping[str, AgentProcess]) -> dict[str, int]:
    """SIGTERM every agent, SIGKILL (its whole session) what is left after the grace."""
    for agent in agents.values():
        if agent.process.poll() is None:
            agent.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    codes = {}
    for name, agent in agents.items():
        try:
            codes[name] = agent.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(agent.process.pid, signal.SIGKILL)
            codes[name] = agent.process.wait()
    return codes


FleetStarter = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def start_fleet(tmp_path: Path, nats_server: NatsServer,
                      control_plane: ControlPlane) -> AsyncIterator[FleetStarter]:
    """Start the five personas as processes (``policies`` override POLICIES); all stopped after."""
    started: list[Fleet] = []
    watchers: list[Connection] = []

    async def start(policies: Mapping[str, Mapping[str, Any]] | None = None) -> Fleet:
        config_dir = tmp_path / "config"
        prepare_config(REPO, config_dir, tick=TICK, nats_url=nats_server.url, dry_run=False,
                       policy_spec={**POLICIES, **(policies or {})},
                       fleet_spec={"apiservers": [control_plane.url], "quorum": QUORUM})
        _install_kubernetes(config_dir, control_plane)
        fleet = Fleet(config_dir, {}, nats_server)
        watcher = Connection([nats_server.url], name="e2e-heartbeats", seed=None)
        await watcher.connect()
        watchers.append(watcher)

        async def on_heartbeat(msg: Msg) -> None:
            envelope = json.loads(msg.data)
            fleet.heartbeats.setdefault(envelope["from"], []).append(envelope["body"])

        await watcher.subscribe("zeta.agent.*.heartbeat", on_heartbeat)
        started.append(fleet)
        for name in NAMES:
            fleet.agents[name] = _start(config_dir, name, tmp_path)
        await until(lambda: all(a.ticks() >= 1 for a in fleet.agents.values()), 60,
                    "every agent's first tick")
        return fleet

    yield start
    for fleet in started:
        codes = await asyncio.to_thread(_stop, fleet.agents)
        assert codes == dict.fromkeys(NAMES, 0), f"unclean exits {codes}\n{fleet.dump()}"
    for watcher in watchers:
        await watcher.close()


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[JsonApi]:
    with admin_json(control_plane) as json_api:
        yield json_api


# ---------------------------------------------------------------- cluster helpers


def _pods(api: JsonApi, namespace: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = api.call(
        "GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": f"app={app}"},
    )["items"]
    return items


def _ready_on(api: JsonApi, namespace: str, app: str) -> dict[str, str]:
    """Ready pods of ``app`` → the node each runs on."""
    return {p["metadata"]["name"]: p["spec"]["nodeName"] for p in _pods(api, namespace, app)
            if is_ready(p)}


def _all_ready(api: JsonApi, namespace: str, app: str, count: int, *,
               off: str | None = None) -> dict[str, str] | None:
    """``_ready_on`` once exactly ``count`` pods are ready (none of them on node ``off``)."""
    ready = _ready_on(api, namespace, app)
    return ready if len(ready) == count and off not in ready.values() else None


def _uncordoned(api: JsonApi, name: str) -> dict[str, Any] | None:
    """The node once it is schedulable and carries no repair annotation."""
    node = _node(api, name)
    annotations = node["metadata"].get("annotations", {})
    return None if node["spec"].get("unschedulable") or REPAIR_ANNOTATION in annotations \
        else node


def _node(api: JsonApi, name: str) -> dict[str, Any]:
    node: dict[str, Any] = api.call("GET", f"/api/v1/nodes/{name}")
    return node


def _node_ready(api: JsonApi, name: str) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in _node(api, name)["status"].get("conditions", []))


def _create(api: JsonApi, namespace: str, name: str, replicas: int) -> None:
    api.call("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments",
             body=deployment(name, replicas))


def _of(audit: list[dict[str, Any]], kind: str, action: str | None = None
        ) -> list[dict[str, Any]]:
    """Audit messages of ``kind`` (of repairs whose proposal or record names ``action``)."""
    if action is None:
        return [m for m in audit if m["kind"] == kind]
    repairs = {m["repair"] for m in audit if m["body"].get("action") == action}
    return [m for m in audit if m["kind"] == kind and m["repair"] in repairs]


# ---------------------------------------------------------------- the scenarios


async def test_a_dead_node_is_cordoned_drained_under_its_pdb_then_uncordoned_by_vera(
        start_fleet: FleetStarter, api: JsonApi, control_plane: ControlPlane,
        k8s_namespace: str, node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(5)  # one of five down is 20%: under the 30% breaker
    _create(api, k8s_namespace, "web", 3)
    api.call("POST", f"/apis/policy/v1/namespaces/{k8s_namespace}/poddisruptionbudgets",
             body={"metadata": {"name": "web"},
                   "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}})
    placed = await until(lambda: _all_ready(api, k8s_namespace, "web", 3), 30,
                         "3 ready web pods")
    await until(lambda: api.call(
        "GET", f"/apis/policy/v1/namespaces/{k8s_namespace}/poddisruptionbudgets/web",
    ).get("status", {}).get("disruptionsAllowed") == 1, 30, "the budget to allow 1 disruption")
    # Round robin over five nodes: three pods on three nodes, one on the victim.
    assert len(set(placed.values())) == 3, placed
    [(doomed, victim)] = list(placed.items())[:1]

    fleet = await start_fleet()
    with admin_api(control_plane) as raw, \
            ReadyCounter(client.CoreV1Api(raw), k8s_namespace, "web") as counter:
        node_sim.stop_heartbeats(victim)
        try:
            evicted = await until(
                lambda: next((p for p in _pods(api, k8s_namespace, "web")
                              if p["metadata"]["name"] == doomed
                              and "deletionTimestamp" in p["metadata"]), None),
                90, f"{doomed} on {victim} to be evicted\n{fleet.dump()}")
            await until(lambda: _all_ready(api, k8s_namespace, "web", 3, off=victim), 30,
                        "a replacement off the victim")
        finally:
            node_sim.resume_heartbeats(victim)
        cordoned = _node(api, victim)
        assert cordoned["spec"].get("unschedulable") is True
        assert cordoned["metadata"]["annotations"][PERSONA_ANNOTATION] == "otto"
        await until(lambda: _node_ready(api, victim), 30, f"{victim} Ready again")
        lifted = await until(lambda: _uncordoned(api, victim), 60,
                             f"Vera to uncordon {victim}\n{fleet.dump()}")
    assert PERSONA_ANNOTATION not in lifted["metadata"].get("annotations", {})
    assert counter.fewest >= 2, f"the drain broke the budget: {counter.fewest} ready"
    assert evicted["spec"]["nodeName"] == victim

    audit = await fleet.audit()
    for action in ("k8s.node.cordon", "k8s.node.drain"):
        [proposal] = _of(audit, "proposal", action)
        assert proposal["from"] == "otto"
        votes = _of(audit, "vote", action)
        by = {m["from"]: m["body"] for m in votes}
        assert {"alexa", "riven"} <= set(by), (action, by)
        for voter in ("alexa", "riven"):
            assert by[voter]["verdict"] == "approve", (action, by[voter])
            # Their own watches saw it: the reason quotes what they observed themselves.
            assert by[voter]["reason"].startswith("confirmed from "), by[voter]
            assert f"node {victim}: Ready=Unknown" in by[voter]["reason"], by[voter]
        [decision] = _of(audit, "decision", action)
        assert decision["body"]["outcome"] == "approved"
        [started] = _of(audit, "started", action)
        assert started["from"] == "otto"
        results = [(m["from"], m["body"]["outcome"], m["body"].get("detail"))
                   for m in _of(audit, "result", action)]
        assert results[0][:2] == ("otto", "succeeded"), results
        # A cordon cannot make a node Ready: its verify window runs out and the ladder
        # moves on; the drain is verified once the node is back.
        later = [outcome for _, outcome, _ in results[1:]]
        assert later == (["unverified"] if action == "k8s.node.cordon" else ["verified"]), \
            results
    drained, _ = _of(audit, "result", "k8s.node.drain")
    assert f"evicted 1 pods ({k8s_namespace}/{doomed})" in drained["body"]["detail"]
    uncordons = [(m["from"], m["body"]["outcome"])
                 for m in _of(audit, "result", "k8s.node.uncordon")]
    # Its verification may or may not be in the stream yet when the audit is read.
    assert uncordons in ([("vera", "succeeded")], [("vera", "succeeded"), ("vera", "verified")])
    evictions = [e for e in fleet.kubernetes_changes()
                 if e["call"].startswith("create pods/eviction")]
    assert [e["persona"] for e in evictions] == ["otto"], evictions

    roster = Roster.of(load(config_paths(fleet.config_dir)))
    assert auditing.verify(await fleet.stored(), roster.keys, roster.operators,
                           roster.voters) == []


async def test_a_crash_looping_deployment_is_restarted_after_a_quorum(
        start_fleet: FleetStarter, api: JsonApi, k8s_namespace: str,
        node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(3)
    _create(api, k8s_namespace, "web", 3)  # healthy neighbours: a small unhealthy fraction
    _create(api, k8s_namespace, "flaky", 1)
    await until(lambda: len(_ready_on(api, k8s_namespace, "web")) == 3, 30, "3 web pods")
    [pod] = await until(lambda: list(_ready_on(api, k8s_namespace, "flaky")), 30, "a flaky pod")
    fleet = await start_fleet()
    node_sim.crashloop(k8s_namespace, pod)
    path = f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments/flaky"
    restarted = await until(
        lambda: api.call("GET", path)["spec"]["template"]["metadata"].get(
            "annotations", {}).get(RESTARTED_AT), 60, f"the rollout restart\n{fleet.dump()}")
    assert restarted
    audit = await fleet.audit()
    [decision] = _of(audit, "decision", "k8s.workload.restart")
    assert decision["body"]["outcome"] == "approved"
    votes = {m["from"]: m["body"] for m in _of(audit, "vote", "k8s.workload.restart")}
    assert votes["riven"]["verdict"] == "approve", votes
    [result] = _of(audit, "result", "k8s.workload.restart")
    assert (result["from"], result["body"]["outcome"]) == ("otto", "succeeded")
    assert result["body"]["target"]["name"] == "flaky", result["body"]


async def test_forty_percent_of_nodes_down_trips_the_breaker_and_nothing_is_drained(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator) -> None:
    nodes = node_sim.add_nodes(5)
    fleet = await start_fleet()
    for name in nodes[:2]:
        node_sim.stop_heartbeats(name)
    await until(lambda: any("breaker tripped: node-not-ready" in h["status"]
                            for h in fleet.heartbeats.get("otto", [])),
                45, f"Otto's heartbeat to say the breaker tripped\n{fleet.dump()}")
    # Past the policy's for: with both nodes NotReady, and a quorum deadline more.
    await asyncio.sleep(8)
    [tripped] = [e for e in fleet.agents["otto"].events()
                 if e["event"] == "breaker.tripped" and e["policy"] == "node-not-ready"]
    assert tripped["policy"] == "node-not-ready"
    assert "2/5 unhealthy" in tripped["reason"], tripped
    assert not any(_node(api, n)["spec"].get("unschedulable") for n in nodes)
    audit = await fleet.audit()
    assert _of(audit, "started") == [], "nothing destructive may start"
    assert fleet.kubernetes_changes() == []


async def test_an_unreachable_api_server_is_reported_and_nothing_is_attempted(
        start_fleet: FleetStarter, control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(2)
    fleet = await start_fleet()
    await until(lambda: all(h and h[-1]["kubernetes"] == "observed"
                            for h in (fleet.heartbeats.get(n) for n in NAMES)),
                30, "every agent to observe Kubernetes")
    try:
        control_plane.stop_apiserver()
        stopped_at = {n: a.ticks() for n, a in fleet.agents.items()}
        await until(lambda: {e["persona"] for e in fleet.events("finding.opened")
                             if e["policy"] == "apiserver-unreachable"} >= {"otto", "alexa"},
                    40, f"the apiserver-unreachable finding\n{fleet.dump()}")
        [finding, *_] = [e for e in fleet.agents["otto"].events()
                         if e["event"] == "finding.opened"
                         and e["policy"] == "apiserver-unreachable"]
        host = control_plane.url.removeprefix("https://")
        # Evidence: every path tried, with the error; the watch client's own path is one.
        for path in (f"tcp {host}: Connection refused", f"readyz {control_plane.url}: Connection "
                     "refused", f"api-client {control_plane.url}: GET {control_plane.url}/api/v1/"):
            assert path in finding["summary"], finding["summary"]
        failed = [e for e in fleet.agents["alexa"].events() if "error" in e
                  and e.get("resource") == "nodes"]
        assert failed, "the node watch must say why it fails"
        assert "/api/v1/nodes: Connection refused" in failed[-1]["error"], failed
        await until(lambda: all(h[-1]["kubernetes"] != "observed"
                                for h in (fleet.heartbeats[n] for n in NAMES)),
                    15, "every heartbeat to say Kubernetes is not observed")
        down = [e for e in fleet.events("tick") if "kubernetes" in e.get("sources_down", [])]
        assert {e["persona"] for e in down} == set(NAMES), "every agent says the source is down"
        assert fleet.alive() == list(NAMES)
        assert all(a.ticks() > stopped_at[n] + 3 for n, a in fleet.agents.items()), (
            stopped_at, {n: a.ticks() for n, a in fleet.agents.items()})
    finally:
        control_plane.start_apiserver()
    await until(lambda: all(h and h[-1]["kubernetes"] == "observed"
                            for h in (fleet.heartbeats.get(n) for n in NAMES)),
                60, f"every agent to observe Kubernetes again\n{fleet.dump()}")
    assert fleet.kubernetes_changes() == []
    assert _of(await fleet.audit(), "started") == []
