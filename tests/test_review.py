"""The review checks, each tried on values and as a property over generated clusters.

Every check in ``runtime.core.review`` is pure, so each is stated here as what it must
never allow (a property Hypothesis tries to break) and with the numbers it reports.
The veto holder's use of them on a real control plane is in test_review_fleet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from bus.messages import Proposal, QuorumRule, Target, TargetKind
from runtime.agent.observing import Observing
from runtime.agent.voting import Voter
from runtime.config.loading import ConfigSet, config_paths, load
from runtime.core import review, vote
from runtime.core.engine import policy_digest
from runtime.core.ports import Domain, Observed
from runtime.core.review import Disruption, Facts, Outage
from runtime.model.catalog import REPAIR_ANNOTATION
from runtime.model.formats import Safety, Selector
from runtime.model.snapshot import (
    BudgetObs,
    ContainerObs,
    LeaseObs,
    NodeCondition,
    NodeObs,
    PodObs,
    Resources,
    SourceStatus,
)
from tests.builders import T0, at, node, unconnected_bus
from tests.conftest import REPO

CP = {"node-role.kubernetes.io/control-plane": ""}
GI = 2**30
DRAIN = Disruption("n0", "drain", evicts=True, stops_etcd=False)
REBOOT = Disruption("n0", "reboot", evicts=True, stops_etcd=True)
CORDON = Disruption("n0", "cordon", evicts=False, stops_etcd=False)


def facts(disruption: Disruption = CORDON, *, nodes: Sequence[NodeObs] | None = (),
          pods: Sequence[PodObs] | None = (), leases: Sequence[LeaseObs] | None = (),
          budget: int = 1, outage: Outage | None = None, now: float = 0) -> Facts:
    return Facts(disruption=disruption, nodes=None if nodes is None else tuple(nodes),
                 pods=None if pods is None else tuple(pods),
                 leases=None if leases is None else tuple(leases),
                 safety=Safety(disruptionBudget=budget), outage=outage, now=at(now))


def sized(name: str, *, ready: bool = True, cpu: int = 4000, memory: int = 8 * GI,
          labels: dict[str, str] | None = None, cordoned: bool = False) -> NodeObs:
    base = node(name, "True" if ready else "False", labels=labels, unschedulable=cordoned)
    return base.model_copy(update={"allocatable": Resources(cpu_millis=cpu, memory_bytes=memory)})


def workload_pod(name: str, on: str, owner: str, *, cpu: int = 0, memory: int = 0,
                 ready: bool = True, kind: TargetKind = "deployment") -> PodObs:
    return PodObs(namespace="default", name=name, node=on, phase="Running",
                  owner=Target(kind=kind, namespace="default", name=owner),
                  containers=(ContainerObs(name="app", ready=ready),),
                  requests=Resources(cpu_millis=cpu, memory_bytes=memory))


def held(key: str) -> LeaseObs:
    return LeaseObs(key=key, repair="r-1", holder="otto", expires=at(600))


# ---------------------------------------------------------------- which actions are reviewed


def test_node_level_actions_and_what_they_take_down() -> None:
    node_target = Target(kind="node", name="w1")
    assert review.disruption("k8s.node.cordon", node_target) == Disruption(
        "w1", "cordon", evicts=False, stops_etcd=False)
    assert review.disruption("k8s.node.drain", node_target).evicts  # type: ignore[union-attr]
    reboot = review.disruption("host.node.reboot", Target(kind="host", name="w1"))
    assert reboot == Disruption("w1", "reboot", evicts=True, stops_etcd=True)
    unit = Target(kind="unit", name="k3s.service", host="cp-1")
    assert review.disruption("host.unit.restart", unit, "k3s.service") == Disruption(
        "cp-1", "restart of k3s.service", evicts=False, stops_etcd=True, serves_apiserver=True)
    # Not node-level: restarting a unit of no node component, a pod, an uncordon.
    assert review.disruption("host.unit.restart", unit, "nginx.service") is None
    assert review.disruption("k8s.pod.delete", Target(kind="pod", name="p")) is None
    assert review.disruption("k8s.node.uncordon", node_target) is None


def test_lease_keys_name_the_node_they_disrupt() -> None:
    assert review.lease_node("node.w1") == "w1"
    assert review.lease_node("host.w1") == "w1"
    assert review.lease_node("unit.w1/kubelet.service") == "w1"
    assert review.lease_node("unit.w1/nginx.service") is None
    assert review.lease_node("pod.default/web") is None


# ---------------------------------------------------------------- last-control-plane


def test_the_last_ready_control_plane_node_is_never_taken_down() -> None:
    nodes = [sized("n0", ready=False, labels=CP), sized("n1", ready=False, labels=CP),
             sized("w1")]
    check = review.last_control_plane(facts(nodes=nodes))
    assert not check.passed
    assert check.reason == ("cordon of n0 would leave no Ready control-plane node: "
                            "0 of 1 others Ready")
    assert check.numbers == {"control_plane_nodes": 2, "other_ready": 0}


def test_unobserved_nodes_block_every_check_that_needs_them() -> None:
    blind = facts(REBOOT, nodes=None, pods=None, leases=None)
    for _, rule in review.CHECKS:
        check = rule(blind)
        if check.name != "observer-outage":  # needs no nodes when it saw no outage
            assert not check.passed, check.name
            assert "not observed" in check.reason


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=8))
def test_last_control_plane_blocks_exactly_when_no_other_one_is_ready(
        shape: list[tuple[bool, bool]]) -> None:
    nodes = [sized(f"n{i}", ready=ready, labels=CP if control else None)
             for i, (control, ready) in enumerate(shape)]
    others_ready = any(c and r for c, r in shape[1:])
    check = review.last_control_plane(facts(nodes=nodes))
    assert check.passed == (not shape[0][0] or others_ready)


# ---------------------------------------------------------------- one at a time, zone, budget


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", ""]), st.booleans()),
                min_size=1, max_size=8),
       st.integers(min_value=0, max_value=4))
def test_the_disruption_checks_count_what_we_hold_across_policies(
        shape: list[tuple[bool, str, bool]], budget: int) -> None:
    """Every node is a control-plane node or not, in a zone (or none), and is ours
    (leased, or cordoned by a repair) or not; n0 is the target."""
    nodes, leases = [], []
    for i, (control, zone, ours) in enumerate(shape):
        labels = {**(CP if control else {}), **({review.ZONE_LABEL: zone} if zone else {})}
        item = sized(f"n{i}", labels=labels)
        if ours and i % 2:
            item = item.model_copy(update={"unschedulable": True,
                                           "annotations": {REPAIR_ANNOTATION: f"r-{i}"}})
        elif ours:
            leases.append(held(f"host.n{i}" if i % 4 else f"node.n{i}"))
        nodes.append(item)
    seen = facts(nodes=nodes, leases=leases, budget=budget)
    others = [(c, z) for c, z, ours in shape[1:] if ours]
    target_cp, target_zone = shape[0][0], shape[0][1]
    assert review.one_control_plane_at_a_time(seen).passed == (
        not target_cp or not any(c for c, _ in others))
    assert review.failure_domain(seen).passed == (
        not target_zone or not any(z == target_zone for _, z in others))
    assert review.disruption_budget(seen).passed == (len(others) + 1 <= budget)


def test_the_budget_is_fleet_wide_and_names_what_is_disrupted() -> None:
    nodes = [sized("n0"), sized("n1")]
    check = review.disruption_budget(facts(nodes=nodes, leases=[held("unit.n1/kubelet.service")]))
    assert not check.passed
    assert check.reason == ("cordon of n0 would make 2 node(s) disrupted by us (with n1); the "
                            "fleet's budget is 1")
    assert check.numbers == {"disrupted": ["n1"], "budget": 1}
    # A disruption the reviewer approved a moment ago, not yet under a lease, counts too.
    pending = replace(facts(nodes=nodes), vouched=frozenset({"n1"}))
    assert not review.disruption_budget(pending).passed
    assert review.disruption_budget(facts(nodes=nodes)).passed
    # A drain after our own cordon of the same node is the same disruption.
    ours = sized("n0", cordoned=True).model_copy(
        update={"annotations": {REPAIR_ANNOTATION: "r-0"}})
    assert review.disruption_budget(facts(DRAIN, nodes=[ours, sized("n1")])).passed


# ---------------------------------------------------------------- etcd-quorum


def etcd_pod(on: str, ready: bool = True) -> PodObs:
    return PodObs(namespace="kube-system", name=f"etcd-{on}", node=on, phase="Running",
                  containers=(ContainerObs(name="etcd", ready=ready),))


def test_etcd_quorum_counts_members_from_kubeadm_pods_and_k3s_labels() -> None:
    members = [sized("n0", labels=CP), sized("n1", labels=CP), sized("n2", labels=CP)]
    pods = [etcd_pod("n0"), etcd_pod("n1"), etcd_pod("n2", ready=False)]
    check = review.etcd_quorum(facts(REBOOT, nodes=members, pods=pods))
    assert not check.passed
    assert check.reason == "stopping the etcd member on n0 leaves 1 of 3 healthy; quorum needs 2"
    k3s = [sized(f"n{i}", labels={review.ETCD_LABEL: "true"}) for i in range(3)]
    assert review.etcd_quorum(facts(REBOOT, nodes=k3s, pods=[])).passed
    # A drain does not stop the static pod: nothing to check.
    assert review.etcd_quorum(facts(DRAIN, nodes=members, pods=pods)).passed


@given(st.lists(st.booleans(), min_size=1, max_size=7), st.booleans())
def test_etcd_quorum_never_passes_a_stop_that_loses_quorum(healthy: list[bool],
                                                           target_healthy: bool) -> None:
    members = [True, *healthy]  # n0 is the target
    nodes = [sized(f"n{i}", labels={review.ETCD_LABEL: ""},
                   ready=target_healthy if i == 0 else ok) for i, ok in enumerate(members)]
    check = review.etcd_quorum(facts(REBOOT, nodes=nodes, pods=[]))
    left = sum(healthy)
    if target_healthy:
        assert check.passed == (left >= len(members) // 2 + 1)
    else:
        assert check.passed  # a member already down loses nothing by its repair


# ---------------------------------------------------------------- pdb


def budget(name: str = "web", *, allowed: int = 1, healthy: int = 3, desired: int = 2,
           app: str | None = "web", always: bool = False, current: bool = True) -> BudgetObs:
    return BudgetObs(namespace="default", name=name, disruptions_allowed=allowed,
                     current_healthy=healthy, desired_healthy=desired,
                     selector=None if app is None else Selector(matchLabels={"app": app}),
                     always_allow_unhealthy=always, current=current)


def labelled(pod: PodObs, app: str) -> PodObs:
    return pod.model_copy(update={"labels": {"app": app}})


def test_a_budget_with_no_disruption_left_blocks_the_drain_of_a_healthy_pod() -> None:
    pods = [labelled(workload_pod("web-1", "n0", "web"), "web"),
            labelled(workload_pod("web-2", "n1", "web"), "web"),
            labelled(workload_pod("db-1", "n0", "db"), "db")]
    check = review.pdb(Facts(**{**vars(facts(DRAIN, pods=pods)),
                                "budgets": (budget(allowed=0, healthy=2),)}))
    assert not check.passed
    assert check.reason == (
        "the disruption budgets refuse evicting 1 pod(s) from n0: default/web-1 "
        "(PodDisruptionBudget default/web: 0 disruptions allowed (2 healthy, 2 desired))")
    assert check.numbers == {"pods_moved": 2, "covered": 1, "refused": ["default/web-1"]}
    allowed = Facts(**{**vars(facts(DRAIN, pods=pods)), "budgets": (budget(),)})
    assert review.pdb(allowed).passed
    assert review.pdb(Facts(**{**vars(facts(CORDON, pods=pods)),
                               "budgets": (budget(allowed=0),)})).passed  # moves no pods


def test_an_unhealthy_pod_goes_only_while_its_budget_is_healthy_unless_always_allowed() -> None:
    sick = [labelled(workload_pod("web-1", "n0", "web", ready=False), "web")]

    def judged(*budgets: BudgetObs) -> bool:
        return review.pdb(Facts(**{**vars(facts(DRAIN, pods=sick)), "budgets": budgets})).passed

    assert judged(budget(allowed=0, healthy=2, desired=2))  # budget healthy: it may go
    # On a node gone NotReady its containers' last word is "ready", the pod's is not.
    stale = [sick[0].model_copy(update={"containers": (ContainerObs(name="app", ready=True),),
                                        "ready": False})]
    assert review.pdb(Facts(**{**vars(facts(DRAIN, pods=stale)),
                               "budgets": (budget(allowed=0, healthy=2, desired=2),)})).passed
    assert not judged(budget(allowed=0, healthy=1, desired=2))
    assert judged(budget(allowed=0, healthy=1, desired=2, always=True))
    assert not judged(budget(current=False))  # its status lags: everything refused
    assert judged(budget(allowed=0, app=None))  # a null selector covers nothing
    two = review.pdb(Facts(**{**vars(facts(DRAIN, pods=sick)),
                              "budgets": (budget(), budget("web-too"))}))
    assert not two.passed
    assert "covered by 2 PodDisruptionBudgets (default/web, default/web-too)" in two.reason


def test_unobserved_budgets_block_a_drain() -> None:
    check = review.pdb(Facts(**{**vars(facts(DRAIN)), "budgets": None}))
    assert (check.passed, check.reason) == (
        False, "disruption budgets not observed: I cannot check pdb")


# ---------------------------------------------------------------- last-replica and capacity


def test_the_only_ready_replica_blocks_a_drain_not_a_cordon() -> None:
    pods = [workload_pod("web-1", "n0", "web"), workload_pod("web-2", "n1", "web", ready=False),
            workload_pod("api-1", "n0", "api"), workload_pod("api-2", "n1", "api"),
            workload_pod("agent-1", "n0", "agent", kind="daemonset")]
    check = review.last_replica(facts(DRAIN, pods=pods))
    assert not check.passed
    assert check.numbers == {"workloads_on_node": 2, "last_replicas": ["deployment.default/web"]}
    assert review.last_replica(facts(CORDON, pods=pods)).passed


@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["n0", "n1", "n2"]),
                          st.booleans()), max_size=12))
def test_last_replica_blocks_exactly_when_a_workload_would_have_none_ready(
        shape: list[tuple[int, str, bool]]) -> None:
    pods = [workload_pod(f"p{i}", on, f"w{owner}", ready=ready)
            for i, (owner, on, ready) in enumerate(shape)]
    here = {o for o, on, r in shape if on == "n0" and r}
    elsewhere = {o for o, on, r in shape if on != "n0" and r}
    assert review.last_replica(facts(DRAIN, pods=pods)).passed == (here <= elsewhere)


def test_capacity_reports_the_numbers_of_a_shortfall() -> None:
    nodes = [sized("n0"), sized("n1", cpu=2000, memory=4 * GI), sized("n2", cordoned=True),
             sized("n3", ready=False)]
    pods = [workload_pod("a", "n0", "a", cpu=1500, memory=GI),
            workload_pod("b", "n0", "b", cpu=1000, memory=GI),
            workload_pod("c", "n1", "c", cpu=500, memory=GI)]
    check = review.capacity(facts(DRAIN, nodes=nodes, pods=pods))
    assert not check.passed
    assert check.reason == ("the 2 pods on n0 request 2500m CPU and 2048.0 MiB; the Ready "
                            "schedulable nodes left have 1500m and 3072.0 MiB free")
    assert check.numbers["nodes_with_room"] == 1
    roomy = [*nodes, sized("n4")]
    assert review.capacity(facts(DRAIN, nodes=roomy, pods=pods)).passed


def test_capacity_blocks_a_pod_no_single_node_can_take() -> None:
    nodes = [sized("n0"), sized("n1", cpu=1000), sized("n2", cpu=1000)]
    pods = [workload_pod("big", "n0", "big", cpu=1500)]
    check = review.capacity(facts(DRAIN, nodes=nodes, pods=pods))
    assert not check.passed
    assert check.reason.startswith("pod default/big requests 1500m CPU")


@given(st.lists(st.integers(0, 4000), max_size=6), st.lists(st.integers(0, 4000), max_size=6))
def test_capacity_passes_exactly_what_fits_in_the_room_left(moving: list[int],
                                                            free: list[int]) -> None:
    """Passes iff the sum fits and each pod fits on some node (a pod asking nothing
    still needs a Ready schedulable node to go to)."""
    nodes = [sized("n0"), *(sized(f"n{i + 1}", cpu=cpu) for i, cpu in enumerate(free))]
    pods = [workload_pod(f"p{i}", "n0", f"w{i}", cpu=cpu) for i, cpu in enumerate(moving)]
    check = review.capacity(facts(DRAIN, nodes=nodes, pods=pods))
    assert check.passed == (sum(moving) <= sum(free)
                            and all(any(cpu <= f for f in free) for cpu in moving))


# ---------------------------------------------------------------- observer-outage


def not_ready_since(name: str, seconds: float) -> NodeObs:
    return NodeObs(name=name, conditions=(NodeCondition(type="Ready", status="Unknown",
                                                        since=at(seconds)),))


def test_nodes_not_ready_right_after_an_outage_are_the_observers_outage() -> None:
    outage = Outage(began=at(0), ended=at(120))
    storm = [not_ready_since("n0", 60), not_ready_since("n1", 61), sized("n2")]
    check = review.observer_outage(facts(nodes=storm, outage=outage, now=180))
    assert not check.passed
    assert check.numbers["not_ready_since"] == 2
    # Once the window has passed, kubelets had their time to report again.
    assert review.observer_outage(facts(nodes=storm, outage=outage, now=120 + 301)).passed
    # A node broken long before the outage is broken on its own.
    lone = [not_ready_since("n0", -3600), not_ready_since("n1", 61)]
    assert review.observer_outage(facts(nodes=lone, outage=outage, now=180)).passed
    still_down = review.observer_outage(facts(nodes=storm, outage=Outage(at(0), None), now=10))
    assert not still_down.passed


@given(st.lists(st.tuples(st.integers(0, 30), st.one_of(st.none(), st.booleans())),
                max_size=20))
def test_the_outage_record_follows_the_probes(probes: list[tuple[int, bool | None]]) -> None:
    record, t = None, 0
    last_known: bool | None = None
    for step, reachable in probes:
        t += step
        record = review.remember(record, T0 + timedelta(seconds=t), reachable)
        last_known = last_known if reachable is None else reachable
    if last_known is None:
        assert record is None
    elif last_known is False:
        assert record is not None
        assert record.ended is None
    elif record is not None:
        assert record.ended is not None
        assert record.began <= record.ended


def test_an_older_probe_does_not_rewrite_the_record() -> None:
    down = review.remember(None, at(10), reachable=False)
    assert review.remember(down, at(5), reachable=True) == down


def test_restarting_the_api_server_while_it_is_down_is_not_blocked_for_want_of_its_view() -> None:
    """The repair of an API server outage must not wait for the view it restores;
    every other node-level disruption without that view blocks."""
    restart = review.disruption("host.unit.restart",
                                Target(kind="unit", name="k3s.service", host="cp-1"),
                                "k3s.service")
    assert restart is not None
    blind = Facts(disruption=restart, nodes=None, pods=None, leases=(), safety=Safety(),
                  outage=Outage(at(0), None), now=at(60), apiserver_down=True)
    checks = review.review(blind)
    assert all(c.passed for c in checks), [c.reason for c in checks if not c.passed]
    assert checks[0].numbers == {"moot": True}
    # The same restart with the API server answering somewhere is reviewed as usual.
    assert not all(c.passed for c in review.review(replace(blind, apiserver_down=False)))
    # A kubelet restart does not repair the API server: without nodes it blocks.
    kubelet = replace(restart, how="restart of kubelet.service", stops_etcd=False,
                      serves_apiserver=False)
    assert not review.last_control_plane(replace(blind, disruption=kubelet)).passed
    # Nor is an unknown lease view ever moot: the budget is counted from the bus.
    assert not review.disruption_budget(replace(blind, leases=None)).passed


# ---------------------------------------------------------------- the veto holder's vote


class _Fixed:
    """The nodes and leases domains, fixed: what the reviewer's own observers would show."""

    name = "fixed"
    provides: frozenset[Domain] = frozenset({"nodes", "leases"})

    def __init__(self, nodes: Sequence[NodeObs], leases: Sequence[LeaseObs] = ()) -> None:
        self.nodes, self.leases = tuple(nodes), tuple(leases)

    async def observe(self, now: datetime) -> Observed:
        return Observed({"nodes": self.nodes, "leases": self.leases},
                        SourceStatus(ok=True, detail="fixed"))


def _cordon(node_name: str, config: ConfigSet) -> Proposal:
    located = config.policies["node-not-ready"]
    return Proposal(action="k8s.node.cordon", target=Target(kind="node", name=node_name),
                    policy="node-not-ready", policy_digest=policy_digest(located.value), step=0,
                    destructive=True, summary="NotReady",
                    quorum=QuorumRule(approvals=3, veto=("riven",),
                                      deadline=datetime.now(UTC) + timedelta(seconds=30)))


async def _remembering(voter: Voter) -> datetime:
    """Now, after the voter's engine has seen its observers' view for three minutes: a
    vote holds the policy's ``for:`` (2m) against that history."""
    now = datetime.now(UTC)
    voter.engine.evaluate(await voter.observing.snapshot(now - timedelta(minutes=3)))
    return now


async def test_riven_blocks_a_cordon_of_the_last_control_plane_node_and_says_why() -> None:
    config = load(config_paths(REPO))
    lone = [not_ready_since("cp-1", -600).model_copy(update={"labels": CP}),
            *(sized(f"worker-{i}") for i in range(4))]
    observing = Observing([_Fixed(lone)], timeout=1, host="cp-2")
    _, riven = unconnected_bus(config, "riven", observing=observing)
    policy = config.policies["node-not-ready"].value
    cast = await riven._confirm(policy, _cordon("cp-1", config), await _remembering(riven))
    assert cast.verdict == "reject"
    assert cast.reason.startswith("review: last-control-plane: cordon of cp-1 would leave no "
                                  "Ready control-plane node")
    recorded = cast.evidence["checks"]
    assert isinstance(recorded, list)
    checks = {c["check"]: c["result"] for c in recorded}
    assert checks == {name: "block" if name == "last-control-plane" else "pass"
                      for name, _ in review.CHECKS}
    final = vote.final(cast, _cordon("cp-1", config), policy=policy, veto=True,
                       default=config.fleet.spec.quorum)
    assert final.verdict == "block"
    scrape = generate_latest(riven.metrics.registry).decode()
    assert ('zeta_agent_review_checks_total{check="last-control-plane",persona="riven",'
            'result="block"} 1.0') in scrape


async def test_a_voter_without_the_veto_duty_runs_no_review() -> None:
    config = load(config_paths(REPO))
    lone = [not_ready_since("cp-1", -600).model_copy(update={"labels": CP}),
            *(sized(f"worker-{i}") for i in range(4))]
    _, alexa = unconnected_bus(config, "alexa", observing=Observing([_Fixed(lone)], timeout=1,
                                                                    host="cp-2"))
    cast = await alexa._confirm(config.policies["node-not-ready"].value,
                                _cordon("cp-1", config), await _remembering(alexa))
    assert cast.verdict == "approve"
    assert "checks" not in cast.evidence


async def test_two_disruptions_reviewed_at_once_do_not_both_pass_the_budget() -> None:
    config = load(config_paths(REPO))
    down = [not_ready_since("worker-1", -600), not_ready_since("worker-2", -600),
            *(sized(f"worker-{i}") for i in range(3, 10))]
    _, riven = unconnected_bus(config, "riven", observing=Observing([_Fixed(down)], timeout=1,
                                                                    host="cp-2"))
    policy = config.policies["node-not-ready"].value
    now = await _remembering(riven)
    first, second = await asyncio.gather(
        riven._confirm(policy, _cordon("worker-1", config), now),
        riven._confirm(policy, _cordon("worker-2", config), now))
    assert first.verdict == "approve", first.reason
    assert second.verdict == "reject"
    assert ("disruption-budget: cordon of worker-2 would make 2 node(s) disrupted by us "
            "(with worker-1)") in second.reason
    # The approval of worker-1 is its own: a drain of the same node still passes.
    again = await riven._confirm(policy, _cordon("worker-1", config), now)
    assert again.verdict == "approve", again.reason
