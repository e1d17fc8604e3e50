"""The review checks where they matter: Riven's veto, on a real API server, five agent processes.

The same fleet as test_e2e_k8s (``lab.fleet``: each persona a process, its own
kubeconfig and RBAC, a real nats-server, the node simulator's kubelets with real
ports). In each scenario the API server and a second path (a refused kubelet port)
agree a node is down, so every voter confirms it: what stops the repair, or lets only
one through, is a review check, named in Riven's block.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from lab import fleet as harness
from lab.controlplane import ControlPlane
from lab.fleet import AgentFleet
from lab.nodesim import JsonApi, NodeSimulator
from runtime.core.review import CONTROL_PLANE_LABELS, ZONE_LABEL
from runtime.model.catalog import REPAIR_ANNOTATION
from tests.fleets import NAMES, FleetStarter, create_deployment, eventually, node_of, until

pytestmark = pytest.mark.slow

CP = {CONTROL_PLANE_LABELS[0]: ""}
CP_TAINT = {"key": CONTROL_PLANE_LABELS[0], "effect": "NoSchedule"}
CORDON = {"action": "k8s.node.cordon", "quorum": harness.NODE_QUORUM,
          "verify": {"within": "2s", "expect": "finding-cleared"}}
DRAIN = {"action": "k8s.node.drain", "params": {"timeout": "30s"}, "quorum": harness.NODE_QUORUM,
         "verify": {"within": "3s", "expect": "finding-cleared"}}


def ladder(*remedies: Mapping[str, Any]) -> dict[str, Any]:
    """node-not-ready with these remedies (short verify windows: one step after another)."""
    return {"node-not-ready": {**harness.NODE_NOT_READY, "remedies": list(remedies)}}


async def _decision_on(fleet: AgentFleet, action: str, node: str) -> dict[str, Any] | None:
    """The first decision on ``action`` for ``node``, with its votes, once there is one."""
    audit = await fleet.audit()
    repairs = [m["repair"] for m in audit if m["kind"] == "proposal"
               and m["body"]["action"] == action and m["body"]["target"]["name"] == node]
    for repair in repairs:
        decided = [m for m in audit if m["kind"] == "decision" and m["repair"] == repair]
        if decided:
            votes = {m["from"]: m["body"] for m in audit
                     if m["kind"] == "vote" and m["repair"] == repair}
            return {**decided[0]["body"], "votes": votes}
    return None


async def decided(fleet: AgentFleet, action: str, node: str) -> dict[str, Any]:
    return await eventually(lambda: _decision_on(fleet, action, node), 90,
                             f"a decision on {action} of {node}\n{fleet.dump()}")


def blocked_by(decision: dict[str, Any], check: str) -> str:
    """Riven's reason, after checking she vetoed it naming ``check``."""
    assert decision["outcome"] == "rejected", decision
    assert decision["vetoes"] == ["riven"], decision
    riven = decision["votes"]["riven"]
    assert riven["verdict"] == "block", riven
    assert riven["reason"].startswith("review: "), riven
    assert f"{check}: " in riven["reason"], riven
    results = {c["check"]: c["result"] for c in riven["evidence"]["checks"]}
    assert results[check] == "block", results
    # The others confirmed it by two paths: only the review stood in the way.
    for voter in ("alexa", "vera"):
        assert decision["votes"][voter]["paths"] == ["apiserver", "network"], decision
    reason: str = riven["reason"]
    return reason


async def _drain_of_dead(start_fleet: FleetStarter, node_sim: NodeSimulator,
                         victim: str) -> tuple[AgentFleet, dict[str, Any]]:
    """Start the fleet (cordon, then drain), kill ``victim``'s kubelet: the fleet and the
    first decision on draining it."""
    fleet = await start_fleet(ladder(CORDON, DRAIN))
    node_sim.stop_heartbeats(victim)
    try:
        return fleet, await decided(fleet, "k8s.node.drain", victim)
    finally:
        node_sim.resume_heartbeats(victim)


def cordoned(api: JsonApi, node: str) -> bool:
    got = node_of(api, node)
    return bool(got["spec"].get("unschedulable")) and \
        REPAIR_ANNOTATION in got["metadata"].get("annotations", {})


async def test_the_last_ready_control_plane_node_is_not_cordoned(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator) -> None:
    [cp] = node_sim.add_nodes(1, CP, prefix="cp", taints=[CP_TAINT])
    node_sim.add_nodes(3)
    fleet = await start_fleet(ladder(CORDON))
    node_sim.stop_heartbeats(cp)
    try:
        decision = await decided(fleet, "k8s.node.cordon", cp)
    finally:
        node_sim.resume_heartbeats(cp)
    reason = blocked_by(decision, "last-control-plane")
    assert (f"last-control-plane: cordon of {cp} would leave no Ready control-plane node: "
            "0 of 0 others Ready") in reason, reason
    assert not cordoned(api, cp)
    assert [e for e in fleet.kubernetes_changes() if e["call"] == "patch nodes"] == []


async def test_two_control_plane_nodes_down_are_repaired_one_at_a_time(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator) -> None:
    cps = node_sim.add_nodes(3, CP, prefix="cp", taints=[CP_TAINT])
    node_sim.add_nodes(4)  # two of seven down: under the 30% breaker
    fleet = await start_fleet(ladder(CORDON))
    node_sim.stop_heartbeats_together(cps[:2])
    try:
        first = await until(lambda: next((n for n in cps[:2] if cordoned(api, n)), None), 90,
                            f"one control-plane node cordoned\n{fleet.dump()}")
        [second] = [n for n in cps[:2] if n != first]
        decision = await decided(fleet, "k8s.node.cordon", second)
    finally:
        for node in cps[:2]:
            node_sim.resume_heartbeats(node)
    reason = blocked_by(decision, "one-control-plane-at-a-time")
    assert first in reason, reason
    assert "disruption-budget: " in reason, reason  # one node at a time, fleet-wide, too
    assert not cordoned(api, second)


async def test_a_second_node_down_in_the_same_zone_waits(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator) -> None:
    zone_a = node_sim.add_nodes(2, {ZONE_LABEL: "a"}, prefix="a")
    node_sim.add_nodes(5, {ZONE_LABEL: "b"}, prefix="b")
    # The fleet's budget would hold the second anyway; at 2 it is the zone that does.
    fleet = await start_fleet(ladder(CORDON), fleet={"safety": {"disruptionBudget": 2}})
    node_sim.stop_heartbeats_together(zone_a)
    try:
        first = await until(lambda: next((n for n in zone_a if cordoned(api, n)), None), 90,
                            f"one zone-a node cordoned\n{fleet.dump()}")
        [second] = [n for n in zone_a if n != first]
        decision = await decided(fleet, "k8s.node.cordon", second)
    finally:
        for node in zone_a:
            node_sim.resume_heartbeats(node)
    reason = blocked_by(decision, "failure-domain")
    assert "disruption-budget: " not in reason, reason
    assert first in reason, reason


async def test_a_drain_its_disruption_budget_would_refuse_is_vetoed_before_any_eviction(
        start_fleet: FleetStarter, api: JsonApi, k8s_namespace: str,
        node_sim: NodeSimulator) -> None:
    nodes = node_sim.add_nodes(4)
    create_deployment(api, k8s_namespace, "web", 2)
    api.call("POST", f"/apis/policy/v1/namespaces/{k8s_namespace}/poddisruptionbudgets",
             body={"metadata": {"name": "web"},
                   "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}})
    pods = await until(lambda: {p["spec"]["nodeName"] for p in api.call(
        "GET", f"/api/v1/namespaces/{k8s_namespace}/pods")["items"]
        if p["spec"].get("nodeName")} or None, 30, "web placed")
    [victim] = [n for n in nodes if n in pods][:1]
    fleet, decision = await _drain_of_dead(start_fleet, node_sim, victim)
    reason = blocked_by(decision, "pdb")
    assert f"PodDisruptionBudget {k8s_namespace}/web" in reason, reason
    assert [e for e in fleet.kubernetes_changes()
            if e["call"].startswith("create pods/eviction")] == []


async def test_a_drain_the_other_nodes_have_no_room_for_is_vetoed(
        start_fleet: FleetStarter, api: JsonApi, k8s_namespace: str,
        node_sim: NodeSimulator) -> None:
    nodes = node_sim.add_nodes(4)  # 8 CPUs each; one 5-CPU pod on each leaves 3 free
    create_deployment(api, k8s_namespace, "big", 4, pod_spec={"containers": [
        {"name": "app", "image": "registry.invalid/app:1",
         "resources": {"requests": {"cpu": "5"}}}]})
    await until(lambda: len({p["spec"].get("nodeName") for p in api.call(
        "GET", f"/api/v1/namespaces/{k8s_namespace}/pods")["items"]} - {None}) == 4 or None,
        30, "one big pod per node")
    fleet, decision = await _drain_of_dead(start_fleet, node_sim, nodes[0])
    reason = blocked_by(decision, "capacity")
    assert "requests 5000m CPU and 0.0 MiB: no node left has that much free" in reason, reason
    assert [e for e in fleet.kubernetes_changes()
            if e["call"].startswith("create pods/eviction")] == []


async def test_nodes_going_not_ready_right_after_an_api_server_outage_are_left_alone(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator,
        control_plane: ControlPlane) -> None:
    nodes = node_sim.add_nodes(7)  # two of seven: under the 30% breaker
    fleet = await start_fleet(ladder(CORDON))
    await until(lambda: all(h and h[-1].kubernetes == "observed"
                            for h in map(fleet.tap.heartbeats, NAMES)),
                30, "every agent to observe Kubernetes")
    # kubernetes #24200: the API server is down a while; two kubelets fall silent then
    # (in a real outage their leases run out unrenewed), and once it is back their
    # nodes go NotReady: that is the observer's outage, not theirs.
    control_plane.stop_apiserver(grace=1)
    try:
        await until(lambda: any("unreachable" in h[-1].kubernetes
                                for h in [fleet.tap.heartbeats("riven")] if h), 30,
                    "Riven to find the API server unreachable")
        for node in nodes[:2]:
            node_sim.stop_heartbeats(node)
    finally:
        control_plane.start_apiserver()
    try:
        decision = await decided(fleet, "k8s.node.cordon", nodes[0])
    finally:
        for node in nodes[:2]:
            node_sim.resume_heartbeats(node)
    reason = blocked_by(decision, "observer-outage")
    assert "2 nodes NotReady since the API server outage" in reason, reason
    assert not any(cordoned(api, n) for n in nodes[:2])


async def test_a_node_that_never_heals_gets_max_attempts_then_one_escalation(
        start_fleet: FleetStarter, node_sim: NodeSimulator) -> None:
    nodes = node_sim.add_nodes(4)
    victim = nodes[0]
    policies = ladder(CORDON, DRAIN)
    policies["node-not-ready"].update(cooldown="1s", budget={
        **harness.NODE_NOT_READY["budget"], "maxAttempts": 3, "attemptsWindow": "1h"})
    fleet = await start_fleet(policies)
    node_sim.stop_heartbeats(victim)
    try:
        async def escalated() -> list[dict[str, Any]] | None:
            audit = await fleet.audit()
            results = [m for m in audit if m["kind"] == "result"
                       and m["body"]["action"] == "bus.escalate"
                       and m["body"]["outcome"] == "succeeded"
                       and m["body"]["target"]["name"] == victim]
            return results or None

        [escalation] = await eventually(escalated, 120,
                                        f"the loop guard's escalation\n{fleet.dump()}")
        # It stays stopped: well past the cooldown, nothing more is started on it.
        await asyncio.sleep(8)
    finally:
        node_sim.resume_heartbeats(victim)
    audit = await fleet.audit()
    started = [m for m in audit if m["kind"] == "started"]
    actions = [m["body"]["action"] for m in audit if m["kind"] == "proposal"
               and m["repair"] in {s["repair"] for s in started}]
    assert len(started) == 3, actions
    assert actions[:2] == ["k8s.node.cordon", "k8s.node.drain"], actions
    assert ("3 repair attempts on node." + victim) in escalation["body"]["detail"], escalation
    assert "(maxAttempts 3); repairs stop until a person looks" in escalation["body"]["detail"]
    assert len([m for m in audit if m["kind"] == "result" and m["body"]["outcome"] == "succeeded"
                and m["body"]["action"] == "bus.escalate"]) == 1


async def test_the_fleet_wide_budget_holds_a_second_node_across_two_policies(
        start_fleet: FleetStarter, api: JsonApi, node_sim: NodeSimulator) -> None:
    [a] = node_sim.add_nodes(1, {ZONE_LABEL: "a"}, prefix="a")
    [b] = node_sim.add_nodes(1, {ZONE_LABEL: "b"}, prefix="b")
    node_sim.add_nodes(5, {ZONE_LABEL: "c"}, prefix="c")
    # node-not-ready looks at zone a only; a second policy, its copy, at zone b only.
    zone_a = {**ladder(CORDON)["node-not-ready"]}
    zone_a["detect"] = {**zone_a["detect"], "selector": {ZONE_LABEL: "a"}}
    # One node per policy: its breaker would read one down as all of them down.
    zone_a["budget"] = {**zone_a["budget"], "maxUnhealthyFraction": 1.0}
    zone_b = {**zone_a, "detect": {**zone_a["detect"], "selector": {ZONE_LABEL: "b"}}}
    fleet = await start_fleet({"node-not-ready": zone_a},
                              extra_policies={"node-not-ready-b": ("node-not-ready", zone_b)})
    node_sim.stop_heartbeats_together([a, b])
    try:
        first = await until(lambda: next((n for n in (a, b) if cordoned(api, n)), None), 90,
                            f"one of the two cordoned\n{fleet.dump()}")
        second = b if first == a else a
        decision = await decided(fleet, "k8s.node.cordon", second)
    finally:
        for node in (a, b):
            node_sim.resume_heartbeats(node)
    reason = blocked_by(decision, "disruption-budget")
    assert first in reason, reason
    assert "failure-domain: " not in reason, reason  # other zones: only the budget holds it
    policies = {m["body"]["policy"] for m in (await fleet.audit()) if m["kind"] == "proposal"}
    assert policies == {"node-not-ready", "node-not-ready-b"}, policies
