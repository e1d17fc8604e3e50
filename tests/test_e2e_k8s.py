"""End to end: the five shipped personas, as five processes, repair a real Kubernetes cluster.

The fleet is ``lab.fleet``'s, the one ``zeta-lab`` runs: each persona as
``python -m runtime run <name>`` with its own state directory, its own kubeconfig (a
token user of the session's control plane) bound to the ClusterRole rendered from its
scopes, on a real nats-server, with the lab's short timings (tick 1 s, ``for:`` 5 s,
quorum deadlines 10 s). The node simulator stands in for kubelets and the scheduler;
the real node-lifecycle controller turns stopped heartbeats into NotReady nodes.
Every wait is bounded and every process is stopped however a test ends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from bus import subjects
from bus.connection import Connection
from bus.envelope import seal
from bus.keys import Signer
from bus.messages import Control
from lab.controlplane import ControlPlane
from lab.fleet import AgentFleet
from lab.nodesim import JsonApi, NodeSimulator
from runtime.config.credentials import write_seed
from runtime.kube.acting import RESTARTED_AT
from runtime.model.catalog import PERSONA_ANNOTATION, REPAIR_ANNOTATION
from runtime.ops import audit as auditing
from tests.fleets import NAMES, FleetStarter, create_deployment, eventually, node_of, until
from tests.k8s import admin_api
from tests.test_k8s_acting import ReadyCounter, is_ready

pytestmark = pytest.mark.slow
T = TypeVar("T")

DESTRUCTIVE_CALLS = ("patch nodes", "create pods/eviction", "delete pods", "patch deployments")


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
    node = node_of(api, name)
    annotations = node["metadata"].get("annotations", {})
    return None if node["spec"].get("unschedulable") or REPAIR_ANNOTATION in annotations \
        else node


def _node_ready(api: JsonApi, name: str) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in node_of(api, name)["status"].get("conditions", []))


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
    create_deployment(api, k8s_namespace, "web", 3)
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
        cordoned = node_of(api, victim)
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
        assert proposal["body"]["paths"] == ["apiserver"]
        for voter in ("alexa", "riven"):
            assert by[voter]["verdict"] == "approve", (action, by[voter])
            # Their own watches saw it: the reason quotes what they observed themselves.
            assert by[voter]["reason"].startswith("confirmed from "), by[voter]
            assert f"node {victim}: Ready=Unknown" in by[voter]["reason"], by[voter]
            # And a second path: their own probe of its kubelet port, refused.
            assert by[voter]["paths"] == ["apiserver", "network"], by[voter]
            assert "Connection refused" in by[voter]["evidence"]["paths"]["network"]
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

    roster = fleet.roster()
    assert auditing.verify(await fleet.stored(), roster.keys, roster.operators,
                           roster.voters) == []


async def _cordon_decision(fleet: AgentFleet) -> dict[str, Any] | None:
    """The first decision on a cordon in the audit stream, once there is one."""
    decisions = _of(await fleet.audit(), "decision", "k8s.node.cordon")
    return decisions[0] if decisions else None


async def test_the_api_servers_word_alone_does_not_cordon_a_node_whose_kubelet_answers(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator) -> None:
    nodes = node_sim.add_nodes(4)
    victim = nodes[0]
    fleet = await start_fleet()
    # Its kubelet lives on but cannot reach the API server: NotReady there, and its port
    # answers a probe. Nobody on the node speaks for it: one path, two asked.
    node_sim.stop_heartbeats(victim, port_open=True)
    try:
        decision = await eventually(lambda: _cordon_decision(fleet), 90,
                                     f"a decision on cordoning {victim}\n{fleet.dump()}")
    finally:
        node_sim.resume_heartbeats(victim)
    audit = await fleet.audit()
    assert decision["body"]["outcome"] in ("rejected", "expired"), decision
    assert "1/2 distinct evidence paths (named: apiserver)" in decision["body"]["reason"]
    for vote in _of(audit, "vote", "k8s.node.cordon"):
        assert vote["body"]["evidence"]["unconfirmed"]["network"].endswith(
            "accepts connections"), vote
    assert not node_of(api, victim)["spec"].get("unschedulable")
    assert [e for e in fleet.kubernetes_changes() if e["call"] == "patch nodes"] == []


async def test_a_healthy_report_from_the_nodes_own_agent_stops_the_cordon(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator,
        healthz: str) -> None:
    nodes = node_sim.add_nodes(4)
    victim = nodes[0]
    # Lior runs on the victim's host, whose kubelet healthz answers ok (it cannot see
    # systemd here: it reports no units, only the healthz).
    fleet = await start_fleet(fleet={"safety": {"hostEvidence": {"kubeletHealthz": healthz}}},
                              env={"lior": {"ZETA_NODE_NAME": victim}})
    await until(lambda: any(h.node is not None and h.node.node == victim
                            for h in fleet.tap.heartbeats("lior")), 30,
                f"lior's heartbeat to report on {victim}")
    node_sim.stop_heartbeats(victim)  # the API server sees it NotReady, its port refuses
    try:
        decision = await eventually(lambda: _cordon_decision(fleet), 90,
                                     f"a decision on cordoning {victim}\n{fleet.dump()}")
    finally:
        node_sim.resume_heartbeats(victim)
    # Rejected as soon as the approvals are out of reach, maybe before Riven spoke:
    # every vote of that first repair, hers included once it is in, is the disagreement.
    assert decision["body"]["outcome"] == "rejected", decision
    assert set(decision["body"]["vetoes"]) <= {"riven"}, decision

    async def every_vote() -> dict[str, Any] | None:
        votes = {m["from"]: m["body"] for m in await fleet.audit()
                 if m["kind"] == "vote" and m["repair"] == decision["repair"]}
        return votes if "riven" in votes else None

    votes = await eventually(every_vote, 30, "Riven's vote on the first cordon")
    disagreement = (f"disagreement: the API server says {victim} is not Ready, but lior on "
                    f"{victim} reports its kubelet active and healthy (healthz ok, ")
    assert votes["riven"]["verdict"] == "block"
    for body in votes.values():
        assert body["reason"].startswith(disagreement), body
        assert body["paths"] == []
        assert "Connection refused" in body["evidence"]["paths"]["network"]
    assert fleet.agents["riven"].scrape()["zeta_agent_evidence_disagreements_total"] >= 1
    assert [e for e in fleet.kubernetes_changes() if e["call"] == "patch nodes"] == []
    assert fleet.events("evidence paths disagree")


async def test_a_crash_looping_deployment_is_restarted_after_a_quorum(
        start_fleet: FleetStarter, api: JsonApi, k8s_namespace: str,
        node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(3)
    create_deployment(api, k8s_namespace, "web", 3)  # healthy neighbours: small unhealthy fraction
    create_deployment(api, k8s_namespace, "flaky", 1)
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
    await until(lambda: any("breaker tripped: node-not-ready" in h.status
                            for h in fleet.tap.heartbeats("otto")),
                45, f"Otto's heartbeat to say the breaker tripped\n{fleet.dump()}")
    # Past the policy's for: with both nodes NotReady, and a quorum deadline more.
    await asyncio.sleep(8)
    [tripped] = [e for e in fleet.agents["otto"].events()
                 if e["event"] == "breaker.tripped" and e["policy"] == "node-not-ready"]
    assert tripped["policy"] == "node-not-ready"
    assert "2/5 unhealthy" in tripped["reason"], tripped
    assert not any(node_of(api, n)["spec"].get("unschedulable") for n in nodes)
    audit = await fleet.audit()
    assert _of(audit, "started") == [], "nothing destructive may start"
    assert fleet.kubernetes_changes() == []


async def test_an_unreachable_api_server_is_reported_and_nothing_is_attempted(
        start_fleet: FleetStarter, control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(2)
    fleet = await start_fleet()
    await until(lambda: all(h and h[-1].kubernetes == "observed"
                            for h in map(fleet.tap.heartbeats, NAMES)),
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
        await until(lambda: all(h[-1].kubernetes != "observed"
                                for h in map(fleet.tap.heartbeats, NAMES)),
                    15, "every heartbeat to say Kubernetes is not observed")
        down = [e for e in fleet.events("tick") if "kubernetes" in e.get("sources_down", [])]
        assert {e["persona"] for e in down} == set(NAMES), "every agent says the source is down"
        assert sorted(fleet.alive()) == sorted(NAMES)
        # They keep ticking through the outage (each tick waits out the unreachable
        # paths' timeouts, so on a loaded machine a tick can take a few seconds).
        await until(lambda: all(a.ticks() > stopped_at[n] + 3 for n, a in fleet.agents.items()),
                    30, f"ticks to go on during the outage, from {stopped_at}")
    finally:
        control_plane.start_apiserver()
    await until(lambda: all(h and h[-1].kubernetes == "observed"
                            for h in map(fleet.tap.heartbeats, NAMES)),
                60, f"every agent to observe Kubernetes again\n{fleet.dump()}")
    assert fleet.kubernetes_changes() == []
    assert _of(await fleet.audit(), "started") == []


async def test_a_frozen_fleet_cordons_nothing_but_still_lifts_a_cordon_left_behind(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator,
        tmp_path: Path) -> None:
    victim, leftover, *_ = node_sim.add_nodes(5)
    # A repair's cordon whose repair is long gone (no lease holds the node): Vera's
    # cordon-without-owner lifts it. Undoing a repair is never held by a freeze.
    api.call("PATCH", f"/api/v1/nodes/{leftover}", patch=True, body={
        "spec": {"unschedulable": True},
        "metadata": {"annotations": {REPAIR_ANNOTATION: "01JB0000000000000000000000",
                                     PERSONA_ANNOTATION: "otto"}}})
    public = write_seed(tmp_path / "operator-creds", "alice")
    alice = Signer((tmp_path / "operator-creds" / "alice" / "nkey.seed").read_bytes())
    fleet = await start_fleet(fleet={"operators": [{"name": "alice", "nkey": public}]})
    operator = Connection([fleet.bus_url], name="operator", seed=None)
    await operator.connect()
    try:
        await operator.publish(subjects.control("freeze"), seal(
            "control", sender="alice", host="laptop", signer=alice,
            body=Control(verb="freeze", reason="e2e: change freeze")))
    finally:
        await operator.close()
    await until(lambda: all(any(h.frozen for h in fleet.tap.heartbeats(n)) for n in NAMES), 30,
                "every agent to say it is frozen")
    node_sim.stop_heartbeats(victim)
    try:
        lifted = await until(lambda: _uncordoned(api, leftover), 60,
                             f"Vera to uncordon {leftover} through the freeze\n{fleet.dump()}")
        # Well past node-not-ready's for: and a quorum deadline, the dead node is untouched.
        await until(lambda: not _node_ready(api, victim), 60, f"{victim} NotReady")
        await asyncio.sleep(12)
    finally:
        node_sim.resume_heartbeats(victim)
    assert PERSONA_ANNOTATION not in lifted["metadata"].get("annotations", {})
    assert not node_of(api, victim)["spec"].get("unschedulable")
    changes = [(e["persona"], e["call"]) for e in fleet.kubernetes_changes()]
    assert changes == [("vera", f"patch nodes {leftover}")], changes
    audit = await fleet.audit()
    assert [m["body"]["action"] for m in _of(audit, "started")] in ([], ["k8s.node.uncordon"])
    assert not [m for m in _of(audit, "proposal") if m["body"]["target"]["name"] == victim]
