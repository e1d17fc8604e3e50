"""Kubernetes actuators: cordon, uncordon, drain, pod delete, workload restart.

Two halves. First, against ``FakeApi`` (hand-written, in memory, raising the kubernetes
client's own ``ApiException``): the error paths (409, 403, 429, 500, unreachable), the
dry run before every change, the fence, and the drain's backoff on a fake clock, so
nothing sleeps. Second, against a real API server with simulated nodes (tests/k8s.py):
the same actuators on real objects, with a real PodDisruptionBudget and the real
disruption controller.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel
from structlog.testing import capture_logs

from bus.messages import Target
from lab.controlplane import ControlPlane
from lab.nodesim import NodeSimulator
from runtime.core.engine import Intent
from runtime.core.ports import Outcome, unfenced
from runtime.kube.acting import (
    CONFLICT_ATTEMPTS,
    RESTARTED_AT,
    ClientApi,
    Cordon,
    Drain,
    KubeApi,
    KubernetesActuator,
    NodeState,
    Patch,
    PodDelete,
    PodState,
    Uncordon,
    WorkloadKind,
    WorkloadRestart,
    WorkloadState,
    kubernetes_actuators,
    plan_drain,
)
from runtime.kube.client import KubeconfigError
from runtime.model.catalog import (
    CATALOG,
    PERSONA_ANNOTATION,
    REPAIR_ANNOTATION,
    DrainParams,
    PodDeleteParams,
)
from tests.builders import intent, persona, stale
from tests.k8s import NOBODY, admin_api

SERVER = "https://fake.invalid:6443"


def node(name: str) -> Target:
    return Target(kind="node", name=name)


def drain_params(seconds: float) -> DrainParams:
    return DrainParams(timeout=timedelta(seconds=seconds))


# ---------------------------------------------------------------- the fake API


def api_error(status: int, message: str) -> ApiException:
    """What the kubernetes client raises for a Status answer with ``status``."""
    reason = {403: "Forbidden", 404: "Not Found", 409: "Conflict", 429: "Too Many Requests",
              500: "Internal Server Error"}[status]
    return ApiException(status=status, reason=reason, body=json.dumps(
        {"kind": "Status", "status": "Failure", "message": message, "code": status}))


@dataclass(frozen=True)
class Sent:
    """One request the fake received; ``dry_run`` is None for reads."""

    method: str
    what: str
    dry_run: bool | None = None


@dataclass
class FakeApi:
    """An API server in memory: nodes, pods by node, workloads, and scripted failures.

    ``script[method]`` is consumed one entry per call of ``method`` (dry run or not):
    an exception is raised, None means answer normally. ``budget[pod]`` is how many
    evictions of that pod a PodDisruptionBudget refuses (429) before allowing one, once
    the first ``spared`` evictions asked (a drain's pre-flight dry runs) have gone by.
    ``heartbeats`` is how many of the next node reads are followed by a change of the
    node (a kubelet's status update), so a patch carrying the read's resourceVersion
    conflicts. Evicted pods terminate and are gone at the next listing.
    """

    nodes: dict[str, NodeState] = field(default_factory=dict)
    pods: dict[str, dict[str, PodState]] = field(default_factory=dict)  # node → key → pod
    workloads: dict[str, WorkloadState] = field(default_factory=dict)
    script: dict[str, list[Exception | None]] = field(default_factory=dict)
    budget: dict[str, int] = field(default_factory=dict)
    spared: int = 0
    heartbeats: int = 0
    sent: list[Sent] = field(default_factory=list)
    patches: list[Patch] = field(default_factory=list)
    server: str = SERVER

    def _serve(self, method: str, what: str, dry_run: bool | None = None) -> None:
        self.sent.append(Sent(method, what, dry_run))
        if (queued := self.script.get(method)) and (error := queued.pop(0)) is not None:
            raise error

    def add_node(self, name: str, *, unschedulable: bool = False,
                 annotations: Mapping[str, str] | None = None, ready: bool = True) -> None:
        self.nodes[name] = NodeState(name, unschedulable, dict(annotations or {}), "1", ready)
        self.pods.setdefault(name, {})

    def add_pod(self, on: str, name: str, **fields: Any) -> PodState:
        pod = PodState(namespace="default", name=name, uid=f"uid-{name}",
                       controller=fields.pop("controller", "ReplicaSet"), **fields)
        self.pods.setdefault(on, {})[pod.key] = pod
        return pod

    def read_node(self, name: str) -> NodeState:
        self._serve("read_node", name)
        state = self.nodes.get(name)
        if state is None:
            raise api_error(404, f'nodes "{name}" not found')
        if self.heartbeats > 0:
            self.heartbeats -= 1
            self.nodes[name] = replace(state, resource_version=str(int(state.resource_version) + 1))
        return state

    def patch_node(self, name: str, patch: Patch, *, dry_run: bool) -> None:
        self._serve("patch_node", name, dry_run)
        state = self.nodes[name]
        meta = patch.get("metadata", {})
        if meta.get("resourceVersion", state.resource_version) != state.resource_version:
            raise api_error(409, f'Operation cannot be fulfilled on nodes "{name}": the object '
                                 "has been modified; please apply your changes to the latest "
                                 "version and try again")
        if dry_run:
            return
        self.patches.append(patch)
        annotations = dict(state.annotations)
        for key, value in meta.get("annotations", {}).items():
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
        self.nodes[name] = replace(state, unschedulable=bool(patch["spec"]["unschedulable"]),
                                   annotations=annotations,
                                   resource_version=str(int(state.resource_version) + 1))

    def pods_on(self, node: str) -> list[PodState]:
        self._serve("pods_on", node)
        here = self.pods.get(node, {})
        if self.nodes[node].ready:  # only a live kubelet finishes a deletion
            for key in [key for key, pod in here.items() if pod.terminating]:
                del here[key]
        return list(here.values())

    def evict(self, pod: PodState, *, dry_run: bool) -> None:
        self._serve("evict", pod.key, dry_run)
        if self.spared > 0:
            self.spared -= 1
        elif self.budget.get(pod.key, 0) > 0:
            self.budget[pod.key] -= 1
            raise api_error(429, "Cannot evict pod as it would violate the pod's disruption "
                                 "budget.")
        if not dry_run:
            for here in self.pods.values():
                if pod.key in here:
                    here[pod.key] = replace(here[pod.key], terminating=True)

    def delete_pod(self, namespace: str, name: str, *, grace_seconds: int | None,
                   dry_run: bool) -> None:
        self._serve("delete_pod", f"{namespace}/{name} grace={grace_seconds}", dry_run)
        for here in self.pods.values():
            if f"{namespace}/{name}" in here:
                if not dry_run:
                    del here[f"{namespace}/{name}"]
                return
        raise api_error(404, f'pods "{name}" not found')

    def read_workload(self, kind: WorkloadKind, namespace: str, name: str) -> WorkloadState:
        self._serve("read_workload", f"{kind} {namespace}/{name}")
        try:
            return self.workloads[f"{kind} {namespace}/{name}"]
        except KeyError:
            raise api_error(404, f'{kind}s.apps "{name}" not found') from None

    def patch_workload(self, kind: WorkloadKind, namespace: str, name: str, patch: Patch, *,
                       dry_run: bool) -> None:
        self._serve("patch_workload", f"{kind} {namespace}/{name}", dry_run)
        if not dry_run:
            self.patches.append(patch)

    @property
    def changes(self) -> list[Sent]:
        """The real (not dry-run) changes, in order."""
        return [s for s in self.sent if s.dry_run is False]


class FakeTime:
    """A monotonic clock and ``sleep`` that move only when the drain sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


OTTO = persona("otto")


def actuator(kind: type[KubernetesActuator], api: KubeApi,
             clock: FakeTime | None = None) -> KubernetesActuator:
    if kind is Drain:
        clock = clock or FakeTime()
        return Drain(api, persona="otto", user="zeta-otto", clock=clock.clock, sleep=clock.sleep)
    if kind is WorkloadRestart:
        return WorkloadRestart(api, persona="otto", user="zeta-otto",
                               wall=lambda: datetime(2026, 11, 27, 8, 0, tzinfo=UTC))
    return kind(api, persona="otto", user="zeta-otto")


def world() -> FakeApi:
    """Nodes w1 (with a Deployment pod, a DaemonSet pod, a mirror pod) and w2; workloads."""
    api = FakeApi()
    api.add_node("w1")
    api.add_node("w2")
    api.add_pod("w1", "web-1")
    api.add_pod("w1", "agent-x", controller="DaemonSet")
    api.add_pod("w1", "etcd-w1", controller="Node", mirror=True)
    api.add_pod("w2", "web-2")
    api.workloads["deployment default/web"] = WorkloadState("deployment", "default", "web")
    return api


# Each actuator with an intent that makes it change something in world().
CASES: dict[str, tuple[type[KubernetesActuator], Callable[[bool], Intent]]] = {
    "cordon": (Cordon, lambda dry: intent("k8s.node.cordon", node("w1"), dry_run=dry)),
    "uncordon": (Uncordon, lambda dry: intent("k8s.node.uncordon", node("w3"), dry_run=dry)),
    "drain": (Drain, lambda dry: intent("k8s.node.drain", node("w1"), drain_params(60),
                                        dry_run=dry)),
    "pod-delete": (PodDelete, lambda dry: intent(
        "k8s.pod.delete", Target(kind="pod", name="web-2", namespace="default"),
        PodDeleteParams(gracePeriodSeconds=5), dry_run=dry)),
    "restart": (WorkloadRestart, lambda dry: intent(
        "k8s.workload.restart", Target(kind="deployment", name="web", namespace="default"),
        dry_run=dry)),
}


def world_for_every_case() -> FakeApi:
    api = world()
    api.add_node("w3", unschedulable=True,
                 annotations={REPAIR_ANNOTATION: "R0", PERSONA_ANNOTATION: "otto"})
    return api


async def run(act: KubernetesActuator, it: Intent, *, repair: str = "R1",
              fence: Callable[[], Any] = unfenced) -> Outcome:
    return await act.run(it, repair=repair, dry_run=it.dry_run, fence=fence)


# ---------------------------------------------------------------- every actuator


def test_every_kubernetes_action_has_an_actuator() -> None:
    wanted = {name for name in CATALOG if name.startswith("k8s.")}
    assert set(kubernetes_actuators(FakeApi(), OTTO)) == wanted
    assert {kind.action for kind, _ in CASES.values()} == wanted


@pytest.mark.parametrize("case", sorted(CASES))
async def test_every_change_is_dry_run_first_then_fenced(case: str) -> None:
    kind, make = CASES[case]
    api = world_for_every_case()
    fences: list[int] = []

    async def fence() -> bool:
        fences.append(len(api.sent))
        return True

    outcome = await run(actuator(kind, api), make(False), fence=fence)
    assert outcome.ok, outcome.detail
    assert api.changes, "the case must change something"
    for index, sent in enumerate(api.sent):
        if sent.dry_run is False:
            assert api.sent[index - 1] == replace(sent, dry_run=True), api.sent
            assert index in fences  # the fence was asked right before the real call
    assert len(fences) == len(api.changes)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_dry_run_stops_after_the_server_side_dry_run(case: str) -> None:
    kind, make = CASES[case]
    api = world_for_every_case()
    asked: list[bool] = []

    async def fence() -> bool:
        asked.append(True)
        return True

    outcome = await run(actuator(kind, api), make(True), fence=fence)
    assert outcome.ok, outcome.detail
    assert outcome.detail.startswith("dry-run (the API server accepted it): would ")
    assert any(s.dry_run for s in api.sent), "the API server was asked for a dry run"
    assert api.changes == []
    assert api.patches == []
    assert not asked


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_stale_fence_stops_before_the_change(case: str) -> None:
    kind, make = CASES[case]
    api = world_for_every_case()
    outcome = await run(actuator(kind, api), make(False), fence=stale)
    assert not outcome.ok
    assert outcome.detail.startswith("fencing token stale: stopped before ")
    assert api.changes == []


@pytest.mark.parametrize("case", sorted(CASES))
async def test_forbidden_is_a_scope_rbac_mismatch_and_not_retried(case: str) -> None:
    kind, make = CASES[case]
    api = world_for_every_case()
    method = {"cordon": "patch_node", "uncordon": "patch_node", "drain": "patch_node",
              "pod-delete": "delete_pod", "restart": "patch_workload"}[case]
    api.script[method] = [api_error(403, f"{method} is forbidden: User \"zeta-otto\" cannot")]
    outcome = await run(actuator(kind, api), make(False))
    assert not outcome.ok
    verb, resource = {"patch_node": ("patch", "nodes"), "delete_pod": ("delete", "pods"),
                      "patch_workload": ("patch", "deployments")}[method]
    assert outcome.detail.startswith(
        f"scope/RBAC mismatch: otto's scopes allow {make(False).action.name}, but RBAC does "
        f"not let zeta-otto {verb} {resource} (")
    assert "apply `zeta-agent render rbac otto`" in outcome.detail
    assert [s.method for s in api.sent].count(method) == 1
    assert api.changes == []


@pytest.mark.parametrize("case", sorted(CASES))
async def test_other_api_errors_become_outcomes(case: str) -> None:
    kind, make = CASES[case]
    api = world_for_every_case()
    # Whatever each actuator calls first fails.
    api.script = {m: [api_error(500, "etcdserver: request timed out")]
                  for m in ("read_node", "pods_on", "delete_pod", "read_workload")}
    outcome = await run(actuator(kind, api), make(False))
    assert not outcome.ok
    assert outcome.detail.endswith(": etcdserver: request timed out")
    assert len(api.sent) == 1


async def test_an_unreachable_api_server_is_reported_with_its_address() -> None:
    api = world()
    api.script["read_node"] = [urllib3.exceptions.MaxRetryError(
        urllib3.HTTPConnectionPool("fake.invalid"), "/api/v1/nodes/w1", reason=None)]
    outcome = await run(Cordon(api, persona="otto", user="zeta-otto"),
                        intent("k8s.node.cordon", node("w1")))
    assert not outcome.ok
    assert outcome.detail.startswith(f"get nodes w1: API server {SERVER} unreachable: ")


# ---------------------------------------------------------------- conflicts


async def test_a_conflict_rereads_and_retries() -> None:
    api = world()
    api.heartbeats = 2  # the node changes right after each of the first two reads
    with capture_logs() as logs:
        outcome = await run(Cordon(api, persona="otto", user="zeta-otto"),
                            intent("k8s.node.cordon", node("w1")))
    assert outcome.ok, outcome.detail
    assert [s.method for s in api.sent] == ["read_node", "patch_node"] * 3 + ["patch_node"]
    assert api.nodes["w1"].unschedulable
    retries = [e for e in logs if "will retry" in e["event"]]
    assert [e["event"] for e in retries] == ["attempt #1/3 failed; will retry",
                                             "attempt #2/3 failed; will retry"]
    assert all(e["what"] == "cordon w1" and "modified" in e["error"] for e in retries)


async def test_conflicts_are_retried_a_bounded_number_of_times() -> None:
    api = world_for_every_case()
    api.heartbeats = 100
    outcome = await run(Uncordon(api, persona="otto", user="zeta-otto"),
                        intent("k8s.node.uncordon", node("w3")))
    assert not outcome.ok
    assert outcome.detail.endswith(f"(still conflicting after {CONFLICT_ATTEMPTS} attempts)")
    assert outcome.detail.startswith("patch nodes w3: Operation cannot be fulfilled")
    assert [s.method for s in api.sent] == ["read_node", "patch_node"] * CONFLICT_ATTEMPTS
    assert api.changes == []


async def test_a_conflict_on_the_real_call_after_the_dry_run_is_retried_too() -> None:
    api = world()
    api.script["patch_node"] = [None, api_error(409, "the object has been modified")]
    outcome = await run(Cordon(api, persona="otto", user="zeta-otto"),
                        intent("k8s.node.cordon", node("w1")))
    assert outcome.ok, outcome.detail
    assert [(s.method, s.dry_run) for s in api.sent] == [
        ("read_node", None), ("patch_node", True), ("patch_node", False),
        ("read_node", None), ("patch_node", True), ("patch_node", False)]


@pytest.mark.parametrize(("case", "method"), [("pod-delete", "delete_pod"),
                                              ("restart", "patch_workload")])
async def test_every_actuator_retries_a_conflict(case: str, method: str) -> None:
    kind, make = CASES[case]
    api = world_for_every_case()
    api.script[method] = [api_error(409, "the object has been modified")]
    with capture_logs() as logs:
        outcome = await run(actuator(kind, api), make(False))
    assert outcome.ok, outcome.detail
    assert [(s.method, s.dry_run) for s in api.sent if s.method == method] == [
        (method, True), (method, True), (method, False)]
    assert [e["event"] for e in logs if "retry" in e["event"]] == [
        "attempt #1/3 failed; will retry"]


# ---------------------------------------------------------------- cordon and uncordon


async def test_cordon_annotates_the_node_with_the_repair_and_the_persona() -> None:
    api = world()
    outcome = await run(Cordon(api, persona="otto", user="zeta-otto"),
                        intent("k8s.node.cordon", node("w1")), repair="01JREPAIR")
    assert outcome == Outcome(True, "cordoned w1, annotated with repair 01JREPAIR and persona "
                                    "otto")
    state = api.nodes["w1"]
    assert state.unschedulable
    assert state.annotations == {REPAIR_ANNOTATION: "01JREPAIR", PERSONA_ANNOTATION: "otto"}
    assert api.patches[0]["metadata"]["resourceVersion"] == "1"  # a stale read conflicts


async def test_cordon_leaves_a_persons_cordon_alone_and_does_not_claim_it() -> None:
    api = world()
    api.add_node("w9", unschedulable=True)
    outcome = await run(Cordon(api, persona="otto", user="zeta-otto"),
                        intent("k8s.node.cordon", node("w9")))
    assert outcome.ok
    assert "by a person" in outcome.detail
    assert "not claimed" in outcome.detail
    assert api.nodes["w9"].annotations == {}
    assert api.changes == []


async def test_cordon_takes_over_the_cordon_of_an_earlier_repair() -> None:
    api = world()
    api.add_node("w9", unschedulable=True, annotations={REPAIR_ANNOTATION: "R0"})
    outcome = await run(Cordon(api, persona="otto", user="zeta-otto"),
                        intent("k8s.node.cordon", node("w9")), repair="R1")
    assert outcome.ok
    assert "taking it over from repair R0" in outcome.detail
    assert api.nodes["w9"].annotations[REPAIR_ANNOTATION] == "R1"


async def test_uncordon_lifts_an_agents_cordon_and_removes_the_annotations() -> None:
    api = world_for_every_case()
    outcome = await run(Uncordon(api, persona="vera", user="zeta-vera"),
                        intent("k8s.node.uncordon", node("w3"), evidence={"repair": "R0"}))
    assert outcome == Outcome(True, "uncordoned w3, removing the annotations of repair R0")
    assert api.nodes["w3"] == NodeState("w3", False, {}, "2")
    assert api.patches == [{"metadata": {"resourceVersion": "1", "annotations": {
        PERSONA_ANNOTATION: None, REPAIR_ANNOTATION: None}}, "spec": {"unschedulable": None}}]


async def test_uncordon_never_lifts_a_persons_cordon() -> None:
    api = world()
    api.add_node("w9", unschedulable=True)
    outcome = await run(Uncordon(api, persona="vera", user="zeta-vera"),
                        intent("k8s.node.uncordon", node("w9")))
    assert not outcome.ok
    assert "cordoned by a person" in outcome.detail
    assert api.nodes["w9"].unschedulable
    assert api.changes == []


async def test_uncordon_leaves_a_cordon_that_passed_to_another_repair() -> None:
    api = world_for_every_case()
    outcome = await run(Uncordon(api, persona="vera", user="zeta-vera"),
                        intent("k8s.node.uncordon", node("w3"), evidence={"repair": "R-old"}))
    assert outcome == Outcome(False, "the cordon of w3 now belongs to repair R0, not R-old: "
                                     "left in place")
    assert api.changes == []


async def test_uncordon_of_a_schedulable_node_changes_nothing() -> None:
    api = world()
    outcome = await run(Uncordon(api, persona="vera", user="zeta-vera"),
                        intent("k8s.node.uncordon", node("w1")))
    assert outcome == Outcome(True, "w1 is already schedulable")
    assert api.changes == []


# ---------------------------------------------------------------- drain


def test_the_drain_plan_sorts_pods_like_kubectl_drain() -> None:
    pods = [PodState("a", "web", "1", controller="ReplicaSet"),
            PodState("a", "ds", "2", controller="DaemonSet"),
            PodState("a", "static", "3", controller="Node", mirror=True),
            PodState("a", "bare", "4", controller=None),
            PodState("a", "done", "5", controller=None, phase="Succeeded"),
            PodState("a", "going", "6", terminating=True, controller="DaemonSet")]
    plan = plan_drain(pods)
    assert [p.name for p in plan.evict] == ["web", "done"]
    assert [p.name for p in plan.terminating] == ["going"]
    assert set(plan.skip) == {"a/ds", "a/static"}
    assert set(plan.refuse) == {"a/bare"}


async def test_drain_cordons_then_evicts_and_skips_daemonset_and_mirror_pods() -> None:
    api = world()
    outcome = await run(actuator(Drain, api), intent("k8s.node.drain", node("w1"),
                                                     drain_params(60)), repair="R7")
    assert outcome.ok, outcome.detail
    assert outcome.detail.startswith("drained w1 in 0s; cordoned w1, annotated with repair R7")
    assert "evicted 1 pods (default/web-1)" in outcome.detail
    assert "skipped: default/agent-x (DaemonSet pod" in outcome.detail
    assert "default/etcd-w1 (mirror pod" in outcome.detail
    assert [(s.method, s.what) for s in api.changes] == [("patch_node", "w1"),
                                                         ("evict", "default/web-1")]
    assert set(api.pods["w1"]) == {"default/agent-x", "default/etcd-w1"}


async def test_drain_retries_evictions_a_budget_refuses_with_backoff() -> None:
    api = world()
    api.add_pod("w1", "web-3")
    api.spared = 2  # the pre-flight finds the budget open, then the drain's own use it up
    api.budget["default/web-1"] = 7  # 429 on the next seven tries (dry runs included)
    clock = FakeTime()
    with capture_logs() as logs:
        outcome = await run(actuator(Drain, api, clock),
                            intent("k8s.node.drain", node("w1"), drain_params(60)))
    assert outcome.ok, outcome.detail
    assert "evicted 2 pods (default/web-1, default/web-3)" in outcome.detail
    # After progress the next look is soon; while refused, the wait doubles, up to 5s.
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 0.5]
    retried = [e["event"] for e in logs if e["event"].startswith("eviction of default/web-1")]
    assert retried == [f"eviction of default/web-1: attempt #{n} failed; will retry"
                       for n in range(1, 8)]
    assert not [s for s in api.sent if s.method == "delete_pod"]  # never delete instead


async def test_drain_gives_up_at_its_deadline_and_says_what_is_left() -> None:
    api = world()
    api.spared = 1
    api.budget["default/web-1"] = 1000
    clock = FakeTime()
    outcome = await run(actuator(Drain, api, clock),
                        intent("k8s.node.drain", node("w1"), drain_params(12)))
    assert not outcome.ok
    assert outcome.detail.startswith("w1 not drained within 12s; cordoned w1")
    assert ("still on the node: default/web-1 (Cannot evict pod as it would violate the "
            "pod's disruption budget.)") in outcome.detail
    assert clock.now == 12.0
    assert sum(clock.sleeps) == 12.0
    assert "web-1" in str(api.pods["w1"])


async def test_drain_of_a_dead_node_does_not_wait_for_pods_no_kubelet_will_finish() -> None:
    api = world()
    api.nodes["w1"] = replace(api.nodes["w1"], ready=False)
    api.add_pod("w1", "old", terminating=True)  # evicted before this drain began
    clock = FakeTime()
    outcome = await run(actuator(Drain, api, clock),
                        intent("k8s.node.drain", node("w1"), drain_params(60)))
    assert outcome.ok, outcome.detail
    assert outcome.detail.startswith("drained w1 in 0s; cordoned w1")
    assert "evicted 1 pods (default/web-1)" in outcome.detail
    assert ("left Terminating on the node, which is not Ready, for its kubelet or the pod "
            "garbage collector to finish (their controllers have replaced them): "
            "default/old, default/web-1") in outcome.detail
    assert clock.now == 0.5  # one look after the evictions, no waiting for the deadline
    assert {"default/old", "default/web-1"} <= set(api.pods["w1"])  # never deleted instead
    assert not [s for s in api.sent if s.method == "delete_pod"]


async def test_drain_of_a_dead_node_still_waits_for_a_statefulset_pod() -> None:
    api = world()
    api.nodes["w1"] = replace(api.nodes["w1"], ready=False)
    api.add_pod("w1", "db-0", controller="StatefulSet")
    clock = FakeTime()
    outcome = await run(actuator(Drain, api, clock),
                        intent("k8s.node.drain", node("w1"), drain_params(20)))
    # Its replacement starts only once it is really gone: the drain cannot call it done.
    assert not outcome.ok
    assert outcome.detail.startswith("w1 not drained within 20s")
    assert "still on the node: default/db-0 (evicted, still terminating)" in outcome.detail
    assert "default/web-1" in outcome.detail.split("left Terminating")[1]
    assert clock.now == 20.0


async def test_drain_of_a_node_that_comes_back_waits_for_its_kubelet_again() -> None:
    api = world()
    api.nodes["w1"] = replace(api.nodes["w1"], ready=False)
    api.add_pod("w1", "db-0", controller="StatefulSet")
    clock = FakeTime()

    async def kubelet_returns(seconds: float) -> None:
        await clock.sleep(seconds)
        api.nodes["w1"] = replace(api.nodes["w1"], ready=True)

    outcome = await run(Drain(api, persona="otto", user="zeta-otto", clock=clock.clock,
                              sleep=kubelet_returns),
                        intent("k8s.node.drain", node("w1"), drain_params(60)))
    assert outcome.ok, outcome.detail
    assert set(api.pods["w1"]) == {"default/agent-x", "default/etcd-w1"}


async def test_drain_does_not_evict_a_pod_without_a_controller() -> None:
    api = world()
    api.add_pod("w1", "bare", controller=None)
    outcome = await run(actuator(Drain, api), intent("k8s.node.drain", node("w1"),
                                                     drain_params(60)))
    assert not outcome.ok
    assert outcome.detail.startswith("w1 not drained: pods without a controller left on it")
    assert "not evicted: default/bare (no controller would re-create it" in outcome.detail
    assert "default/bare" in api.pods["w1"]
    assert ("evict", "default/web-1") in [(s.method, s.what) for s in api.changes]


async def test_drain_refuses_to_start_when_the_budget_refuses_an_eviction_now() -> None:
    api = world()
    api.add_pod("w1", "web-3")
    api.budget["default/web-3"] = 1
    outcome = await run(actuator(Drain, api), intent("k8s.node.drain", node("w1"),
                                                     drain_params(60)))
    assert not outcome.ok
    assert outcome.detail == (
        "w1 not drained: the API server would refuse evicting default/web-3 (Cannot evict pod "
        "as it would violate the pod's disruption budget.); nothing evicted")
    assert api.changes == []  # not even the cordon
    assert {(s.method, s.dry_run) for s in api.sent if s.method == "evict"} == {("evict", True)}


async def test_drain_dry_run_reports_what_it_would_evict_and_what_is_blocked() -> None:
    api = world()
    api.add_pod("w1", "web-3")
    api.budget["default/web-3"] = 1
    outcome = await run(actuator(Drain, api), intent("k8s.node.drain", node("w1"),
                                                     drain_params(60), dry_run=True))
    assert outcome.ok
    assert outcome.detail == (
        "dry-run (the API server accepted it): would cordon w1, annotated with repair R1 and "
        "persona otto; would evict 1 pods (default/web-1); would not start now, the API server "
        "refuses evicting default/web-3 (Cannot evict pod as it would violate the pod's "
        "disruption budget.); "
        "skipped: default/agent-x (DaemonSet pod (it would come straight back)), "
        "default/etcd-w1 (mirror pod (the kubelet runs it from a static manifest))")
    assert api.changes == []


async def test_a_stale_fence_mid_drain_stops_and_says_how_far_it_got() -> None:
    api = world()
    api.add_pod("w1", "web-3")
    answers = iter([True, True])

    async def fence() -> bool:
        return next(answers, False)

    outcome = await run(actuator(Drain, api), intent("k8s.node.drain", node("w1"),
                                                     drain_params(60)), fence=fence)
    assert not outcome.ok
    assert outcome.detail == (
        "fencing token stale: stopped before create pods/eviction default/web-3: the lease on "
        "node.w1 moved on; done before stopping: patch nodes w1, create pods/eviction "
        "default/web-1")


# ---------------------------------------------------------------- pod delete, restart


async def test_pod_delete_passes_the_grace_period_and_tolerates_a_gone_pod() -> None:
    api = world()
    target = Target(kind="pod", name="web-2", namespace="default")
    delete = PodDelete(api, persona="otto", user="zeta-otto")
    outcome = await run(delete, intent("k8s.pod.delete", target,
                                       PodDeleteParams(gracePeriodSeconds=0)))
    assert outcome == Outcome(True, "deleted pod default/web-2 with a grace period of 0s")
    assert api.changes == [Sent("delete_pod", "default/web-2 grace=0", False)]
    again = await run(delete, intent("k8s.pod.delete", target))
    assert again == Outcome(True, "pod default/web-2 is already gone")


async def test_restart_sets_the_restarted_at_annotation_of_the_pod_template() -> None:
    api = world()
    outcome = await run(actuator(WorkloadRestart, api), intent(
        "k8s.workload.restart", Target(kind="deployment", name="web", namespace="default")))
    assert outcome == Outcome(True, "restarted deployment default/web "
                                    f"({RESTARTED_AT}=2026-11-27T08:00:00+00:00)")
    assert api.patches == [{"spec": {"template": {"metadata": {"annotations": {
        RESTARTED_AT: "2026-11-27T08:00:00+00:00"}}}}}]


@pytest.mark.parametrize(("state", "reason"), [
    (WorkloadState("deployment", "default", "web", paused=True), "is paused"),
    (WorkloadState("statefulset", "default", "web", on_delete=True), "updates OnDelete"),
])
async def test_restart_refuses_what_would_replace_no_pod(state: WorkloadState,
                                                         reason: str) -> None:
    api = FakeApi(workloads={f"{state.kind} default/web": state})
    outcome = await run(actuator(WorkloadRestart, api), intent(
        "k8s.workload.restart", Target(kind=state.kind, name="web", namespace="default")))
    assert not outcome.ok
    assert reason in outcome.detail
    assert api.changes == []


async def test_restart_of_a_missing_workload_says_so() -> None:
    outcome = await run(actuator(WorkloadRestart, FakeApi()), intent(
        "k8s.workload.restart", Target(kind="daemonset", name="gone", namespace="kube-system")))
    assert outcome == Outcome(False, 'get daemonsets kube-system/gone: daemonsets.apps "gone" '
                                     "not found")


def test_an_unusable_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with pytest.raises(KubeconfigError, match=f"kubeconfig {path}: "):
        ClientApi.from_kubeconfig(path)


# ---------------------------------------------------------------- against a real API server

T = TypeVar("T")
SETTLE = 90.0
"""Seconds the real cluster gets to reach a state (pods running, a budget computed)."""


def wait_for(what: str, check: Callable[[], T | None], timeout: float = SETTLE) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
    return value


def as_json(model: BaseModel) -> dict[str, Any]:
    """A client model as the API's JSON (camelCase, no nulls): checks read like the docs."""
    return model.model_dump(by_alias=True, exclude_none=True)


@pytest.fixture
def core(control_plane: ControlPlane) -> Iterator[client.CoreV1Api]:
    """The admin's view of the cluster, to set up and to check."""
    with admin_api(control_plane) as api:
        yield client.CoreV1Api(api)


@pytest.fixture
def apps(control_plane: ControlPlane) -> Iterator[client.AppsV1Api]:
    with admin_api(control_plane) as api:
        yield client.AppsV1Api(api)


@pytest.fixture
def admin(control_plane: ControlPlane) -> ClientApi:
    """The actuators' adapter as the admin: what the actuators do, not what RBAC allows."""
    return ClientApi.from_kubeconfig(control_plane.admin_kubeconfig)


def read_node(core: client.CoreV1Api, name: str) -> dict[str, Any]:
    return as_json(core.read_node(name))


def labelled(app: str) -> dict[str, Any]:
    return {"selector": {"matchLabels": {"app": app}},
            "template": {"metadata": {"labels": {"app": app}},
                         "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}}


def running_on(core: client.CoreV1Api, namespace: str, app: str) -> dict[str, str]:
    """Ready, not terminating pods of ``app``: name → node."""
    pods = [as_json(p) for p in core.list_namespaced_pod(
        namespace, label_selector=f"app={app}").items]
    return {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods if is_ready(p)}


def create_deployment(apps: client.AppsV1Api, namespace: str, app: str, replicas: int) -> None:
    apps.create_namespaced_deployment(namespace, client.V1Deployment.model_validate(
        {"metadata": {"name": app}, "spec": {"replicas": replicas, **labelled(app)}}))


def ready_pods(core: client.CoreV1Api, namespace: str, app: str,
               count: int) -> dict[str, str]:
    """Wait until exactly ``count`` pods of ``app`` are ready; name → node."""
    return wait_for(f"{count} {app} pods ready", lambda: (
        pods if len(pods := running_on(core, namespace, app)) == count else None))


def is_ready_node(node: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in node.get("status", {}).get("conditions", []))


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return "deletionTimestamp" not in pod["metadata"] and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions)


class ReadyCounter:
    """Watches an app's pods in a thread: the fewest ready at any moment while it runs.

    A watch, not polling: every change is seen, so a dip that lasts a millisecond counts.
    """

    def __init__(self, core: client.CoreV1Api, namespace: str, app: str) -> None:
        self.fewest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(core, namespace, app))
        self._started = threading.Event()

    def _watch(self, core: client.CoreV1Api, namespace: str, app: str) -> None:
        listed = as_json(core.list_namespaced_pod(namespace, label_selector=f"app={app}"))
        ready = {p["metadata"]["name"]: is_ready(p) for p in listed.get("items", [])}
        version = listed["metadata"]["resourceVersion"]
        self.fewest = sum(ready.values())
        self._started.set()
        while not self._stop.is_set():
            for event in watch.Watch().stream(  # type: ignore[no-untyped-call]
                    core.list_namespaced_pod, namespace, label_selector=f"app={app}",
                    resource_version=version, timeout_seconds=1):
                pod = as_json(event["object"])
                version = pod["metadata"]["resourceVersion"]
                ready[pod["metadata"]["name"]] = event["type"] != "DELETED" and is_ready(pod)
                self.fewest = min(self.fewest, sum(ready.values()))

    def __enter__(self) -> ReadyCounter:
        self._thread.start()
        if not self._started.wait(SETTLE):
            pytest.fail("the pod watch never started")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_cordon_then_uncordon_a_real_node(core: client.CoreV1Api, admin: ClientApi,
                                                node_sim: NodeSimulator) -> None:
    [name] = node_sim.add_nodes(1)
    outcome = await run(Cordon(admin, persona="otto", user="zeta-admin"),
                        intent("k8s.node.cordon", node(name)), repair="01JCORDON")
    assert outcome.ok, outcome.detail
    cordoned = read_node(core, name)
    assert cordoned["spec"]["unschedulable"] is True
    assert cordoned["metadata"]["annotations"][REPAIR_ANNOTATION] == "01JCORDON"
    assert cordoned["metadata"]["annotations"][PERSONA_ANNOTATION] == "otto"

    outcome = await run(Uncordon(admin, persona="vera", user="zeta-admin"),
                        intent("k8s.node.uncordon", node(name), evidence={"repair": "01JCORDON"}))
    assert outcome == Outcome(True, f"uncordoned {name}, removing the annotations of repair "
                                    "01JCORDON")
    lifted = read_node(core, name)
    assert "unschedulable" not in lifted["spec"]
    assert not {REPAIR_ANNOTATION, PERSONA_ANNOTATION} & set(
        lifted["metadata"].get("annotations", {}))


def web_budget(api: client.ApiClient, namespace: str, *, min_available: int) -> client.PolicyV1Api:
    """A PodDisruptionBudget ``web`` over the pods labelled ``app: web``; the policy API."""
    policy = client.PolicyV1Api(api)
    policy.create_namespaced_pod_disruption_budget(
        namespace, client.V1PodDisruptionBudget.model_validate({
            "metadata": {"name": "web"},
            "spec": {"minAvailable": min_available,
                     "selector": {"matchLabels": {"app": "web"}}}}))
    return policy


async def test_drain_evicts_one_at_a_time_under_a_budget_and_skips_daemonset_pods(
        control_plane: ControlPlane, core: client.CoreV1Api, apps: client.AppsV1Api,
        k8s_namespace: str, node_sim: NodeSimulator) -> None:
    admin = ClientApi.from_kubeconfig(control_plane.admin_kubeconfig)
    [target] = node_sim.add_nodes(1)
    create_deployment(apps, k8s_namespace, "web", 3)
    apps.create_namespaced_daemon_set(k8s_namespace, client.V1DaemonSet.model_validate(
        {"metadata": {"name": "agent"}, "spec": labelled("agent")}))
    with admin_api(control_plane) as api:
        policy = web_budget(api, k8s_namespace, min_available=2)
        ready_pods(core, k8s_namespace, "web", 3)
        [daemon_pod] = ready_pods(core, k8s_namespace, "agent", 1)
        wait_for("the budget to allow one disruption", lambda: as_json(
            policy.read_namespaced_pod_disruption_budget("web", k8s_namespace),
        ).get("status", {}).get("disruptionsAllowed") == 1)
    node_sim.add_nodes(2)  # room for the replacements
    # Replacements slow to turn Ready: the budget then certainly refuses the next eviction
    # (a replacement Ready at once could let the drain through without one 429).
    node_sim.start_delay = 3.0
    drain = Drain(admin, persona="otto", user="zeta-admin")
    with capture_logs() as logs, ReadyCounter(core, k8s_namespace, "web") as counter:
        outcome = await run(drain, intent("k8s.node.drain", node(target), drain_params(120)),
                            repair="01JDRAIN")
    assert outcome.ok, outcome.detail
    assert outcome.detail.startswith(f"drained {target} in ")
    assert "evicted 3 pods" in outcome.detail
    assert f"skipped: {k8s_namespace}/{daemon_pod} (DaemonSet pod" in outcome.detail
    refused = [e for e in logs if e["event"].startswith("eviction of")]
    assert refused, "the budget should have refused some evictions (429)"
    assert all("disruption budget" in e["reason"] for e in refused)
    evictions = [e for e in logs if e["event"] == "kubernetes change made"
                 and e["call"].startswith("create pods/eviction")]
    assert len(evictions) == 3
    assert counter.fewest == 2  # one at a time: never below minAvailable
    placed = ready_pods(core, k8s_namespace, "web", 3)
    assert target not in placed.values()
    assert running_on(core, k8s_namespace, "agent")[daemon_pod] == target
    assert read_node(core, target)["metadata"]["annotations"][REPAIR_ANNOTATION] == "01JDRAIN"


async def test_a_drain_its_budget_refuses_changes_nothing_and_says_which_pod(
        control_plane: ControlPlane, core: client.CoreV1Api, apps: client.AppsV1Api,
        k8s_namespace: str, node_sim: NodeSimulator) -> None:
    admin = ClientApi.from_kubeconfig(control_plane.admin_kubeconfig)
    [target] = node_sim.add_nodes(1)
    create_deployment(apps, k8s_namespace, "web", 2)
    with admin_api(control_plane) as api:
        policy = web_budget(api, k8s_namespace, min_available=2)
        placed = ready_pods(core, k8s_namespace, "web", 2)
        wait_for("the budget to be computed", lambda: as_json(
            policy.read_namespaced_pod_disruption_budget("web", k8s_namespace),
        ).get("status", {}).get("currentHealthy") == 2)
    node_sim.add_nodes(1)  # room elsewhere: only the budget stands in the way
    with capture_logs() as logs:
        outcome = await run(Drain(admin, persona="otto", user="zeta-admin"),
                            intent("k8s.node.drain", node(target), drain_params(60)))
    assert not outcome.ok
    assert outcome.detail.startswith(f"{target} not drained: the API server would refuse "
                                     f"evicting {k8s_namespace}/")
    assert "disruption budget" in outcome.detail
    assert outcome.detail.endswith("; nothing evicted")
    assert [e for e in logs if e["event"] == "kubernetes change made"] == []
    assert not read_node(core, target)["spec"].get("unschedulable")
    assert ready_pods(core, k8s_namespace, "web", 2) == placed


async def test_drain_of_a_dead_node_returns_once_its_pods_are_replaced(
        core: client.CoreV1Api, apps: client.AppsV1Api, admin: ClientApi, k8s_namespace: str,
        node_sim: NodeSimulator) -> None:
    [target] = node_sim.add_nodes(1)
    create_deployment(apps, k8s_namespace, "web", 2)
    placed = ready_pods(core, k8s_namespace, "web", 2)
    assert set(placed.values()) == {target}
    first, second = sorted(placed)
    node_sim.add_nodes(1)  # room for the replacements
    node_sim.stop_heartbeats(target)
    wait_for(f"{target} to go NotReady", lambda: not is_ready_node(read_node(core, target)),
             timeout=60)
    outcome = await run(Drain(admin, persona="otto", user="zeta-admin"),
                        intent("k8s.node.drain", node(target), drain_params(60)))
    assert outcome.ok, outcome.detail
    assert (f"left Terminating on the node, which is not Ready, for its kubelet or the pod "
            f"garbage collector to finish (their controllers have replaced them): "
            f"{k8s_namespace}/{first}, {k8s_namespace}/{second}") in outcome.detail
    # Evicted, not deleted: the API server still has them, Terminating on the dead node.
    for name in (first, second):
        stuck = as_json(core.read_namespaced_pod(name, k8s_namespace))
        assert "deletionTimestamp" in stuck["metadata"], stuck["metadata"]
        assert stuck["spec"]["nodeName"] == target
    assert target not in ready_pods(core, k8s_namespace, "web", 2).values()


async def test_a_dry_run_changes_nothing_on_the_cluster(
        core: client.CoreV1Api, apps: client.AppsV1Api, admin: ClientApi, k8s_namespace: str,
        node_sim: NodeSimulator) -> None:
    [target] = node_sim.add_nodes(1)
    create_deployment(apps, k8s_namespace, "web", 2)
    before = ready_pods(core, k8s_namespace, "web", 2)
    cordon = await run(Cordon(admin, persona="otto", user="zeta-admin"),
                       intent("k8s.node.cordon", node(target), dry_run=True))
    drain = await run(Drain(admin, persona="otto", user="zeta-admin"),
                      intent("k8s.node.drain", node(target), drain_params(30), dry_run=True))
    for outcome in (cordon, drain):
        assert outcome.ok, outcome.detail
        assert outcome.detail.startswith("dry-run (the API server accepted it): would cordon")
    assert "would evict 2 pods" in drain.detail
    after = read_node(core, target)
    assert "unschedulable" not in after["spec"]
    assert REPAIR_ANNOTATION not in after["metadata"].get("annotations", {})
    assert running_on(core, k8s_namespace, "web") == before


async def test_a_stale_fence_stops_before_acting_on_the_cluster(
        core: client.CoreV1Api, admin: ClientApi, node_sim: NodeSimulator) -> None:
    [target] = node_sim.add_nodes(1)
    for act, it in [(Cordon(admin, persona="otto", user="zeta-admin"),
                     intent("k8s.node.cordon", node(target))),
                    (Drain(admin, persona="otto", user="zeta-admin"),
                     intent("k8s.node.drain", node(target), drain_params(30)))]:
        outcome = await run(act, it, fence=stale)
        assert outcome.detail == (f"fencing token stale: stopped before patch nodes {target}: "
                                  f"the lease on node.{target} moved on")
    assert "unschedulable" not in read_node(core, target)["spec"]


async def test_a_user_without_rights_gets_an_rbac_mismatch(
        control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    [target] = node_sim.add_nodes(1)
    nobody = ClientApi.from_kubeconfig(control_plane.kubeconfig_for(NOBODY))
    outcome = await run(Cordon(nobody, persona="otto", user=NOBODY),
                        intent("k8s.node.cordon", node(target)))
    assert not outcome.ok
    assert outcome.detail.startswith(
        f"scope/RBAC mismatch: otto's scopes allow k8s.node.cordon, but RBAC does not let "
        f'{NOBODY} get nodes (nodes "{target}" is forbidden: User "{NOBODY}" cannot get '
        'resource "nodes"')


async def test_restart_and_pod_delete_on_a_real_deployment(
        core: client.CoreV1Api, apps: client.AppsV1Api, admin: ClientApi, k8s_namespace: str,
        node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(2)
    create_deployment(apps, k8s_namespace, "web", 2)
    first = ready_pods(core, k8s_namespace, "web", 2)
    outcome = await run(actuator(WorkloadRestart, admin), intent(
        "k8s.workload.restart", Target(kind="deployment", name="web", namespace=k8s_namespace)))
    assert outcome.ok, outcome.detail
    template = as_json(apps.read_namespaced_deployment("web", k8s_namespace))["spec"]["template"]
    assert template["metadata"]["annotations"] == {RESTARTED_AT: "2026-11-27T08:00:00+00:00"}
    second = wait_for("the rollout to replace both pods", lambda: (
        pods if len(pods := running_on(core, k8s_namespace, "web")) == 2
        and not set(pods) & set(first) else None))

    victim = sorted(second)[0]
    outcome = await run(PodDelete(admin, persona="otto", user="zeta-admin"), intent(
        "k8s.pod.delete", Target(kind="pod", name=victim, namespace=k8s_namespace),
        PodDeleteParams(gracePeriodSeconds=0)))
    assert outcome == Outcome(True, f"deleted pod {k8s_namespace}/{victim} with a grace "
                                    "period of 0s")
    wait_for("a replacement for the deleted pod", lambda: (
        len(pods := running_on(core, k8s_namespace, "web")) == 2 and victim not in pods))


def test_a_malformed_kubeconfig_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("clusters: [unclosed\n")
    with pytest.raises(KubeconfigError, match=f"kubeconfig {path}: "):
        ClientApi.from_kubeconfig(path)
