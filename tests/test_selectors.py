"""Selectors with set-based operators, and the opt-out label every detector and actuator
honours (docs/policies.md#selectors).

Selector semantics as properties against Kubernetes' definitions; the detectors and the
engine on snapshots; the Kubernetes actuators on the in-memory API of test_k8s_acting
and on a real API server.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client

from bus.messages import Target
from lab.controlplane import ControlPlane
from lab.nodesim import NodeSimulator
from runtime.core.detecting import detect
from runtime.core.engine import PolicyEngine
from runtime.core.targets import opt_out
from runtime.kube.acting import (
    ClientApi,
    Cordon,
    Drain,
    KubernetesActuator,
    Uncordon,
    WorkloadRestart,
    WorkloadState,
)
from runtime.model.catalog import OPT_OUT_LABEL, REPAIR_ANNOTATION
from runtime.model.formats import NodeConditionDetect, PodCrashloopDetect, Requirement, Selector
from tests.builders import deployment, intent, node, pod, policy, snapshot, unit
from tests.k8s import admin_api
from tests.test_k8s_acting import FakeApi, read_node, run, world

OUT = {OPT_OUT_LABEL: "true"}
KEYS = st.sampled_from(["a", "b", "c"])
VALUES = st.sampled_from(["x", "y", "z"])
LABELS = st.dictionaries(KEYS, VALUES, max_size=3)


# ---------------------------------------------------------------- what a selector means


@given(KEYS, st.lists(VALUES, min_size=1, max_size=3), LABELS)
def test_in_and_not_in_are_each_others_negation(key: str, values: list[str],
                                                labels: dict[str, str]) -> None:
    inside = Requirement(key=key, operator="In", values=tuple(values))
    outside = Requirement(key=key, operator="NotIn", values=tuple(values))
    assert inside.matches(labels) != outside.matches(labels)
    assert inside.matches(labels) == (labels.get(key) in values)


@given(KEYS, LABELS)
def test_exists_and_does_not_exist_split_every_object(key: str, labels: dict[str, str]) -> None:
    assert Requirement(key=key, operator="Exists").matches(labels) == (key in labels)
    assert Requirement(key=key, operator="DoesNotExist").matches(labels) == (key not in labels)


@given(LABELS, LABELS)
def test_a_plain_mapping_is_match_labels_and_everything_must_hold(
        wanted: dict[str, str], labels: dict[str, str]) -> None:
    plain = Selector.model_validate(wanted)
    assert plain == Selector(matchLabels=wanted)
    assert plain.matches(labels) == all(labels.get(k) == v for k, v in wanted.items())
    both = Selector(matchLabels=wanted,
                    matchExpressions=(Requirement(key="a", operator="DoesNotExist"),))
    assert both.matches(labels) == (plain.matches(labels) and "a" not in labels)


def test_an_operator_needs_the_values_it_reads() -> None:
    with pytest.raises(ValueError, match="In needs at least one value"):
        Requirement(key="a", operator="In")
    with pytest.raises(ValueError, match="Exists takes no values"):
        Requirement(key="a", operator="Exists", values=("x",))


# ---------------------------------------------------------------- detectors


CONTROL_PLANE = {"node-role.kubernetes.io/control-plane": ""}


def every_node_but_the_control_plane() -> NodeConditionDetect:
    return NodeConditionDetect.model_validate({
        "kind": "node-condition",
        "selector": {"matchExpressions": [
            {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"}]}})


def test_every_node_but_the_control_plane() -> None:
    nodes = [node("cp-1", "False", labels=CONTROL_PLANE), node("w1", "False"), node("w2")]
    detection = detect(every_node_but_the_control_plane(), snapshot(0, nodes=nodes))
    assert set(detection.matches) == {"node.w1"}
    assert detection.population == 2  # the breaker measures over the selected nodes only


def test_an_opted_out_node_is_neither_matched_nor_counted() -> None:
    nodes = [node("w1", "False", labels=OUT), node("w2", "False"), node("w3")]
    detection = detect(NodeConditionDetect(kind="node-condition"), snapshot(0, nodes=nodes))
    assert set(detection.matches) == {"node.w2"}
    assert detection.population == 2
    cordoned = node("w1", labels=OUT, repair="R1")
    lifted = detect(policy("c", {"kind": "cordon-without-owner"}, [
        {"action": "k8s.node.uncordon"}]).spec.detect, snapshot(0, nodes=[cordoned], leases=[]))
    assert lifted.matches == {}


def test_pods_are_selected_by_label_and_opted_out_pods_are_skipped() -> None:
    web, api = deployment("web"), deployment("api")
    pods = [pod("web-1", owner=web, crashloop=True, restarts=9).model_copy(
                update={"labels": {"tier": "frontend"}}),
            pod("api-1", owner=api, crashloop=True, restarts=9).model_copy(
                update={"labels": {"tier": "backend"}}),
            pod("lone", crashloop=True, restarts=9).model_copy(update={"labels": OUT})]
    spec = PodCrashloopDetect.model_validate({"kind": "pod-crashloop", "selector": {
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["frontend"]}]}})
    assert set(detect(spec, snapshot(0, pods=pods)).matches) == {web.key}
    everything = detect(PodCrashloopDetect(kind="pod-crashloop"), snapshot(0, pods=pods))
    assert set(everything.matches) == {web.key, api.key}


# ---------------------------------------------------------------- nothing is offered


def test_nothing_is_offered_on_the_host_of_an_opted_out_node() -> None:
    kubelet = policy("kubelet-failed", {"kind": "unit-failed", "units": ["kubelet.service"]},
                     [{"action": "host.unit.restart", "params": {"unit": "kubelet.service"}}])
    engine = PolicyEngine([kubelet])
    seen = snapshot(0, host="w1", units=[unit("kubelet.service", "failed")],
                    nodes=[node("w1", labels=OUT)])
    evaluation = engine.evaluate(seen)
    assert evaluation.intents == ()
    [held] = evaluation.holds
    assert held.reason == ("node w1 is labelled zeta-agent/opt-out=true: no agent acts on it "
                           "or its host")
    # Without the label the same failure is repaired.
    engine = PolicyEngine([kubelet])
    assert len(engine.evaluate(seen.model_copy(update={"nodes": (node("w1"),)})).intents) == 1


@pytest.mark.parametrize(("target", "pods", "reason"), [
    (Target(kind="pod", name="p", namespace="default"),
     [pod("p").model_copy(update={"labels": OUT})], "pod default/p is labelled"),
    (deployment("web"), [pod("web-1", owner=deployment("web")).model_copy(
        update={"labels": OUT})], "deployment default/web has pods labelled"),
    (Target(kind="host", name="w1"), [], "node w1 is labelled"),
])
def test_opt_out_reaches_pods_workloads_and_hosts(target: Target, pods: list[Any],
                                                  reason: str) -> None:
    seen = snapshot(0, nodes=[node("w1", labels=OUT)], pods=pods)
    why = opt_out(target, seen)
    assert why is not None
    assert why.startswith(reason)
    assert opt_out(target, snapshot(0, nodes=[node("w1")], pods=[])) is None


# ---------------------------------------------------------------- the actuators look again


@pytest.mark.parametrize("kind", [Cordon, Uncordon, Drain])
async def test_a_node_labelled_since_the_proposal_is_not_touched(
        kind: type[KubernetesActuator]) -> None:
    api = world()
    api.add_node("w3", unschedulable=True, annotations={REPAIR_ANNOTATION: "R0"})
    for name in ("w1", "w3"):
        api.nodes[name] = replace(api.nodes[name], labels=dict(OUT))
    target = Target(kind="node", name="w3" if kind is Uncordon else "w1")
    action = {Cordon: "k8s.node.cordon", Uncordon: "k8s.node.uncordon",
              Drain: "k8s.node.drain"}[kind]
    outcome = await run(kind(api, persona="otto", user="zeta-otto"), intent(action, target))
    assert not outcome.ok
    assert f"is labelled {OPT_OUT_LABEL}=true" in outcome.detail
    assert api.patches == []
    assert not [s for s in api.sent if s.method in ("evict", "patch_node")]


async def test_a_workload_whose_pods_opted_out_is_not_restarted() -> None:
    api: FakeApi = world()
    api.workloads["deployment default/web"] = WorkloadState("deployment", "default", "web",
                                                            labels=dict(OUT))
    outcome = await run(WorkloadRestart(api, persona="otto", user="zeta-otto"),
                        intent("k8s.workload.restart", deployment("web")))
    assert not outcome.ok
    assert "labelled zeta-agent/opt-out=true" in outcome.detail
    assert api.patches == []


async def test_a_real_node_labelled_opt_out_is_not_cordoned(
        control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    [name] = node_sim.add_nodes(1)
    admin = ClientApi.from_kubeconfig(control_plane.admin_kubeconfig)
    with admin_api(control_plane) as api:
        core = client.CoreV1Api(api)
        core.patch_node(name, {"metadata": {"labels": OUT}})
        outcome = await run(Cordon(admin, persona="otto", user="zeta-admin"),
                            intent("k8s.node.cordon", Target(kind="node", name=name)))
        assert not outcome.ok
        assert outcome.detail == (f"node {name} is labelled {OPT_OUT_LABEL}=true: no agent "
                                  "acts on it")
        assert "unschedulable" not in read_node(core, name)["spec"]
