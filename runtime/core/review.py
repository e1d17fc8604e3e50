"""Review checks: what a persona with the ``veto`` duty looks at before a node goes down.

A quorum of voters who each see "node NotReady" says the node is NotReady; it does not
say that taking it out is safe. These checks ask the second question, each on the
reviewer's own observation, and each answers pass or block with the numbers behind
it. A block is a veto (the reviewer votes ``block``), and every result is recorded in
the vote, so the audit shows what was checked and why it held (docs/safety.md).

The checks are about node-level disruptions: a cordon, a drain, a reboot, a restart of
a unit the node runs on (kubelet, the container runtime, k3s). Other actions are not
reviewed here. Pure: the reviewer gathers the facts (``runtime.agent.voting``); nothing
here reads a clock, the bus or the cluster. Whatever a check needs and was not
observed blocks: "I could not look" is never "safe".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from bus.messages import Target
from runtime.core.detecting import JSON, is_ready
from runtime.model.catalog import REPAIR_ANNOTATION
from runtime.model.formats import Safety
from runtime.model.snapshot import (
    NO_RESOURCES,
    ApiProbe,
    BudgetObs,
    LeaseObs,
    NodeObs,
    PodObs,
    Resources,
)

CheckName = Literal["last-control-plane", "one-control-plane-at-a-time", "etcd-quorum",
                    "pdb", "last-replica", "capacity", "failure-domain", "disruption-budget",
                    "observer-outage"]

CONTROL_PLANE_LABELS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
ETCD_LABEL = "node-role.kubernetes.io/etcd"
"""k3s and RKE2 mark the servers that run an etcd member."""
ZONE_LABEL = "topology.kubernetes.io/zone"

NODE_UNITS = frozenset({
    "kubelet.service", "containerd.service", "crio.service", "docker.service",
    "k3s.service", "k3s-agent.service", "rke2-server.service", "rke2-agent.service",
    "kube-apiserver.service", "etcd.service"})
"""Units whose restart takes the node (or its share of the control plane) down a while."""
ETCD_UNITS = frozenset({"k3s.service", "rke2-server.service", "etcd.service"})
"""Units whose restart stops the node's etcd member (embedded in k3s and RKE2 servers)."""
APISERVER_UNITS = frozenset({"kube-apiserver.service", "k3s.service", "rke2-server.service"})
"""Units that serve the API server: restarting one is how an API server outage is repaired."""

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
LISTED = 10
"""Names listed in a check's numbers at most; the count is always complete."""


@dataclass(frozen=True)
class Disruption:
    """What a node-level action takes down."""

    node: str
    how: str
    evicts: bool  # the node's pods leave (a drain) or die (a reboot)
    stops_etcd: bool  # the node's etcd member stops, if it has one
    serves_apiserver: bool = False  # the restarted unit is (or runs) the API server


def disruption(action: str, target: Target, unit: str | None = None) -> Disruption | None:
    """The disruption ``action`` on ``target`` causes, or None if it is not node-level.

    ``unit`` is a unit action's unit. A host is a node of the same name, as everywhere
    in the catalog.
    """
    match action:
        case "k8s.node.cordon":
            return Disruption(target.name, "cordon", evicts=False, stops_etcd=False)
        case "k8s.node.drain":
            return Disruption(target.name, "drain", evicts=True, stops_etcd=False)
        case "host.node.reboot":
            return Disruption(target.name, "reboot", evicts=True, stops_etcd=True)
        case "host.unit.restart" if unit in NODE_UNITS and target.host:
            return Disruption(target.host, f"restart of {unit}", evicts=False,
                              stops_etcd=unit in ETCD_UNITS,
                              serves_apiserver=unit in APISERVER_UNITS)
    return None


def lease_node(key: str) -> str | None:
    """The node a repair lease on ``key`` (a ``Target.key``) disrupts, if any."""
    kind, _, rest = key.partition(".")
    if kind in ("node", "host"):
        return rest
    if kind == "unit":
        host, _, unit = rest.partition("/")
        return host if unit in NODE_UNITS else None
    return None


@dataclass(frozen=True)
class Outage:
    """The last time this reviewer saw the API server answer on no path."""

    began: datetime
    ended: datetime | None  # None: it is still not answering


def reachable(probes: Iterable[ApiProbe] | None) -> bool | None:
    """Whether the API server answered on any probed path (None: nothing was probed)."""
    results = [p.ok for p in probes or ()]
    return any(results) if results else None


def remember(last: Outage | None, at: datetime, reachable: bool | None) -> Outage | None:
    """The outage record after a probe at ``at`` (``reachable`` None: not probed).

    Snapshots run concurrently (the tick's and a vote's), so one may end after a later
    one: a probe older than what the record already holds changes nothing.
    """
    if reachable is None or (last is not None and at < (last.ended or last.began)):
        return last
    if not reachable:
        return last if last is not None and last.ended is None else Outage(at, None)
    if last is not None and last.ended is None:
        return Outage(last.began, at)
    return last


@dataclass(frozen=True)
class Facts:
    """What the reviewer gathered: its own snapshot's nodes, pods and leases, the
    fleet's limits, the API server outage it remembers, and the time."""

    disruption: Disruption
    nodes: tuple[NodeObs, ...] | None
    pods: tuple[PodObs, ...] | None
    leases: tuple[LeaseObs, ...] | None
    safety: Safety
    outage: Outage | None
    now: datetime
    apiserver_down: bool = False  # the reviewer's own probes all failed in this snapshot
    budgets: tuple[BudgetObs, ...] | None = ()  # PodDisruptionBudgets (None: not observed)
    # Nodes whose disruption this reviewer approved and whose repair holds no lease yet:
    # two proposals reviewed at once must not both pass as "the only one".
    vouched: frozenset[str] = frozenset()

    @property
    def moot(self) -> str | None:
        """Why the checks that need the API server's view cannot apply, if they cannot.

        Restarting the API server while it answers on no path is the repair of the very
        outage that hides the nodes: nothing it serves is up to be taken down, and
        blocking for want of the view it would restore would leave it down for good.
        """
        if self.apiserver_down and self.disruption.serves_apiserver:
            return (f"the API server answers on none of my paths: the {self.disruption.how} "
                    f"on {self.disruption.node} is its repair")
        return None


@dataclass(frozen=True)
class Check:
    """One check's answer, with the numbers behind it."""

    name: CheckName
    passed: bool
    reason: str
    numbers: Mapping[str, JSON]

    def evidence(self) -> dict[str, JSON]:
        return {"check": self.name, "result": "pass" if self.passed else "block",
                "reason": self.reason, **self.numbers}


def is_control_plane(node: NodeObs) -> bool:
    return any(label in node.labels for label in CONTROL_PLANE_LABELS)


def _running_ready(pod: PodObs) -> bool:
    """Ready as a PodDisruptionBudget counts it: Running, every container ready, and the
    pod's own Ready condition not False (the node controller's word on a dead node)."""
    return pod.phase == "Running" and bool(pod.containers) and all(
        c.ready for c in pod.containers) and pod.ready is not False


def _evicted(pod: PodObs, node: str) -> bool:
    """A pod the disruption of ``node`` moves away: not finished, not a DaemonSet's
    (drain leaves those; its controller would put it straight back)."""
    return (pod.node == node and pod.phase not in TERMINAL_PHASES
            and (pod.owner is None or pod.owner.kind != "daemonset"))


def _names(items: Iterable[str]) -> list[JSON]:
    return [*sorted(items)[:LISTED]]


def disrupted_by_us(nodes: Iterable[NodeObs], leases: Iterable[LeaseObs]) -> set[str]:
    """Nodes the agents are disrupting now: under a repair lease, or still cordoned by a
    repair (its annotation), across all policies."""
    held = {node for lease in leases if (node := lease_node(lease.key)) is not None}
    cordoned = {n.name for n in nodes if n.unschedulable and REPAIR_ANNOTATION in n.annotations}
    return held | cordoned


Rule = Callable[[Facts], Check]


def _others_disrupted(name: CheckName, facts: Facts) -> set[str] | Check:
    """The other nodes we disrupt now, or the block for not knowing them: what the
    one-at-a-time, zone and budget checks all count."""
    if facts.leases is None:
        return _unknown(name, "repair leases", facts, cluster=False)
    if facts.nodes is None:
        return _unknown(name, "nodes", facts)
    return (disrupted_by_us(facts.nodes, facts.leases) | facts.vouched) - {facts.disruption.node}


def _unknown(name: CheckName, what: str, facts: Facts, *, cluster: bool = True) -> Check:
    """A block for want of ``what``; moot (a pass) for a repair of the API server when
    ``what`` is part of the cluster view it would restore."""
    if cluster and (moot := facts.moot) is not None:
        return Check(name, True, moot, {"moot": True})
    return Check(name, False, f"{what} not observed: I cannot check {name}", {})


def last_control_plane(facts: Facts) -> Check:
    name: CheckName = "last-control-plane"
    if facts.nodes is None:
        return _unknown(name, "nodes", facts)
    node = facts.disruption.node
    target = next((n for n in facts.nodes if n.name == node), None)
    if target is None or not is_control_plane(target):
        return Check(name, True, f"{node} is not a control-plane node", {})
    others = [n for n in facts.nodes if is_control_plane(n) and n.name != node]
    ready = [n.name for n in others if is_ready(n)]
    numbers: dict[str, JSON] = {"control_plane_nodes": len(others) + 1,
                                "other_ready": len(ready)}
    if not ready:
        return Check(name, False, f"{facts.disruption.how} of {node} would leave no Ready "
                                  f"control-plane node: 0 of {len(others)} others Ready", numbers)
    return Check(name, True, f"{len(ready)} other control-plane node(s) Ready", numbers)


def one_control_plane_at_a_time(facts: Facts) -> Check:
    name: CheckName = "one-control-plane-at-a-time"
    others = _others_disrupted(name, facts)
    if isinstance(others, Check):
        return others
    assert facts.nodes is not None
    node = facts.disruption.node
    control = {n.name for n in facts.nodes if is_control_plane(n)}
    if node not in control:
        return Check(name, True, f"{node} is not a control-plane node", {})
    busy = others & control
    if busy:
        return Check(name, False, f"control-plane node(s) {', '.join(sorted(busy))} already "
                                  f"under repair", {"under_repair": _names(busy)})
    return Check(name, True, "no other control-plane node under repair", {"under_repair": []})


def _etcd_members(nodes: Iterable[NodeObs], pods: Iterable[PodObs]) -> dict[str, PodObs | None]:
    """Nodes running an etcd member, with its static pod where kubeadm runs one."""
    members: dict[str, PodObs | None] = {n.name: None for n in nodes if ETCD_LABEL in n.labels}
    for pod in pods:
        if pod.namespace == "kube-system" and pod.node and pod.name == f"etcd-{pod.node}":
            members[pod.node] = pod
    return members


def etcd_quorum(facts: Facts) -> Check:
    name: CheckName = "etcd-quorum"
    if not facts.disruption.stops_etcd:
        return Check(name, True, f"a {facts.disruption.how} does not stop etcd", {})
    if facts.nodes is None:
        return _unknown(name, "nodes", facts)
    if facts.pods is None:
        return _unknown(name, "pods (kubeadm's etcd members)", facts)
    members = _etcd_members(facts.nodes, facts.pods)
    node = facts.disruption.node
    if node not in members:
        return Check(name, True, f"{node} runs no etcd member I can see",
                     {"members": len(members)})
    by_name = {n.name: n for n in facts.nodes}

    def healthy(member: str) -> bool:
        seen, pod = by_name.get(member), members[member]
        return seen is not None and is_ready(seen) and (pod is None or _running_ready(pod))

    if not healthy(node):
        return Check(name, True, f"the etcd member on {node} is not healthy already: "
                                 f"stopping it takes nothing away", {"members": len(members)})
    others = [m for m in members if m != node and healthy(m)]
    need = len(members) // 2 + 1
    numbers: dict[str, JSON] = {"members": len(members), "healthy_without_target": len(others),
                                "quorum": need}
    if len(others) < need:
        return Check(name, False, f"stopping the etcd member on {node} leaves {len(others)} of "
                                  f"{len(members)} healthy; quorum needs {need}", numbers)
    return Check(name, True, f"{len(others)} of {len(members)} etcd members stay healthy "
                             f"(quorum {need})", numbers)


def _refusal(budget: BudgetObs, healthy: bool) -> str | None:
    """Why the Eviction API would refuse evicting a pod ``budget`` covers now, or None.

    A healthy pod needs a disruption allowed; an unhealthy one only a budget that is
    itself healthy (``IfHealthyBudget``, the default), unless the budget always allows
    unhealthy pods to go. A budget whose status lags its spec refuses everything.
    """
    if not budget.current:
        return "its status has not caught up with its spec"
    if healthy and budget.disruptions_allowed < 1:
        return (f"0 disruptions allowed ({budget.current_healthy} healthy, "
                f"{budget.desired_healthy} desired)")
    if not healthy and not budget.always_allow_unhealthy \
            and budget.current_healthy < budget.desired_healthy:
        return (f"the budget itself is short ({budget.current_healthy} healthy, "
                f"{budget.desired_healthy} desired), so even an unhealthy pod may not go")
    return None


def _moving(name: CheckName, facts: Facts) -> list[PodObs] | Check:
    """The pods the disruption moves away, or the check's answer without them: a pass
    when it moves none, a block when the pods were not observed."""
    if not facts.disruption.evicts:
        return Check(name, True, f"a {facts.disruption.how} moves no pods", {})
    if facts.pods is None:
        return _unknown(name, "pods", facts)
    return [p for p in facts.pods if _evicted(p, facts.disruption.node)]


def pdb(facts: Facts) -> Check:
    """Every pod the disruption moves must be one its PodDisruptionBudgets let go: a
    drain they refuse stalls with the node half drained (the executor also asks the
    API server, by a dry-run eviction of each pod, before it evicts the first)."""
    name: CheckName = "pdb"
    moving = _moving(name, facts)
    if isinstance(moving, Check):
        return moving
    if facts.budgets is None:
        return _unknown(name, "disruption budgets", facts)
    node = facts.disruption.node
    refused: dict[str, str] = {}
    covered = 0
    for pod in moving:
        budgets = [b for b in facts.budgets if b.namespace == pod.namespace
                   and b.selector is not None and b.selector.matches(pod.labels)]
        covered += bool(budgets)
        where = f"{pod.namespace}/{pod.name}"
        if len(budgets) > 1:
            refused[where] = (f"covered by {len(budgets)} PodDisruptionBudgets "
                              f"({', '.join(sorted(b.key for b in budgets))}), which the "
                              "Eviction API refuses")
        elif budgets and (why := _refusal(budgets[0], _running_ready(pod))) is not None:
            refused[where] = f"PodDisruptionBudget {budgets[0].key}: {why}"
    numbers: dict[str, JSON] = {"pods_moved": len(moving), "covered": covered,
                                "refused": _names(refused)}
    if refused:
        first = sorted(refused)[:LISTED]
        return Check(name, False, f"the disruption budgets refuse evicting {len(refused)} "
                                  f"pod(s) from {node}: " + "; ".join(
                                      f"{pod} ({refused[pod]})" for pod in first), numbers)
    return Check(name, True, f"the disruption budgets let all {len(moving)} pod(s) on "
                             f"{node} go", numbers)


def last_replica(facts: Facts) -> Check:
    name: CheckName = "last-replica"
    if not facts.disruption.evicts:
        return Check(name, True, f"a {facts.disruption.how} moves no pods", {})
    if facts.pods is None:
        return _unknown(name, "pods", facts)
    node = facts.disruption.node
    ready_elsewhere: dict[str, int] = {}
    here: set[str] = set()
    for pod in facts.pods:
        if pod.owner is None or pod.owner.kind == "daemonset" or not _running_ready(pod):
            continue
        if pod.node == node:
            here.add(pod.owner.key)
        else:
            ready_elsewhere[pod.owner.key] = ready_elsewhere.get(pod.owner.key, 0) + 1
    alone = {owner for owner in here if not ready_elsewhere.get(owner)}
    numbers: dict[str, JSON] = {"workloads_on_node": len(here), "last_replicas": _names(alone)}
    if alone:
        return Check(name, False, f"the only Ready replica of {len(alone)} workload(s) is on "
                                  f"{node}: {', '.join(sorted(alone)[:LISTED])}", numbers)
    return Check(name, True, f"every workload on {node} has a Ready replica elsewhere", numbers)


def _mib(value: int) -> JSON:
    return round(value / 2**20, 1)


def capacity(facts: Facts) -> Check:
    name: CheckName = "capacity"
    if facts.nodes is None and facts.disruption.evicts:
        return _unknown(name, "nodes", facts)
    moving = _moving(name, facts)
    if isinstance(moving, Check):
        return moving
    assert facts.nodes is not None  # both observed: checked above, for the type checker
    assert facts.pods is not None
    node = facts.disruption.node
    need = sum((p.requests for p in moving), NO_RESOURCES)
    used: dict[str, Resources] = {}
    for pod in facts.pods:
        if pod.node and pod.phase not in TERMINAL_PHASES:
            used[pod.node] = used.get(pod.node, NO_RESOURCES) + pod.requests
    rooms: list[Resources] = []
    for other in facts.nodes:
        if other.name == node or not is_ready(other) or other.unschedulable:
            continue
        if other.allocatable is None:
            continue  # a node that reports no allocatable offers no room we can count
        left = other.allocatable - used.get(other.name, NO_RESOURCES)
        rooms.append(Resources(cpu_millis=max(0, left.cpu_millis),
                               memory_bytes=max(0, left.memory_bytes)))
    room = sum(rooms, NO_RESOURCES)
    numbers: dict[str, JSON] = {
        "pods": len(moving), "need_cpu_millis": need.cpu_millis,
        "need_memory_mib": _mib(need.memory_bytes), "free_cpu_millis": room.cpu_millis,
        "free_memory_mib": _mib(room.memory_bytes), "nodes_with_room": len(rooms)}
    if need.cpu_millis > room.cpu_millis or need.memory_bytes > room.memory_bytes:
        return Check(name, False, f"the {len(moving)} pods on {node} request "
                                  f"{need.cpu_millis}m CPU and {_mib(need.memory_bytes)} MiB; "
                                  f"the Ready schedulable nodes left have {room.cpu_millis}m "
                                  f"and {_mib(room.memory_bytes)} MiB free", numbers)
    # The sum can fit while one large pod fits on no single node.
    for pod in moving:
        if not any(pod.requests.cpu_millis <= r.cpu_millis
                   and pod.requests.memory_bytes <= r.memory_bytes for r in rooms):
            return Check(name, False, f"pod {pod.namespace}/{pod.name} requests "
                                      f"{pod.requests.cpu_millis}m CPU and "
                                      f"{_mib(pod.requests.memory_bytes)} MiB: no node left "
                                      f"has that much free", numbers)
    return Check(name, True, f"the {len(moving)} pods fit in the room left", numbers)


def failure_domain(facts: Facts) -> Check:
    name: CheckName = "failure-domain"
    others = _others_disrupted(name, facts)
    if isinstance(others, Check):
        return others
    assert facts.nodes is not None
    node = facts.disruption.node
    zones = {n.name: n.labels.get(ZONE_LABEL) for n in facts.nodes}
    zone = zones.get(node)
    if not zone:
        return Check(name, True, f"{node} has no {ZONE_LABEL} label", {})
    busy = {n for n in others if zones.get(n) == zone}
    numbers: dict[str, JSON] = {"zone": zone, "under_repair_in_zone": _names(busy)}
    if busy:
        return Check(name, False, f"zone {zone} already has {', '.join(sorted(busy))} under "
                                  f"repair", numbers)
    return Check(name, True, f"nothing else under repair in zone {zone}", numbers)


def disruption_budget(facts: Facts) -> Check:
    name: CheckName = "disruption-budget"
    others = _others_disrupted(name, facts)
    if isinstance(others, Check):
        return others
    node, budget = facts.disruption.node, facts.safety.disruptionBudget
    numbers: dict[str, JSON] = {"disrupted": _names(others), "budget": budget}
    if len(others) + 1 > budget:
        also = f" (with {', '.join(sorted(others)[:LISTED])})" if others else ""
        return Check(name, False, f"{facts.disruption.how} of {node} would make "
                                  f"{len(others) + 1} node(s) disrupted by us{also}; the "
                                  f"fleet's budget is {budget}", numbers)
    return Check(name, True, f"{len(others) + 1} of {budget} node(s) disrupted by us", numbers)


def observer_outage(facts: Facts) -> Check:
    name: CheckName = "observer-outage"
    outage, limits = facts.outage, facts.safety.observerOutage
    if (moot := facts.moot) is not None:
        return Check(name, True, moot, {"moot": True})
    if outage is None:
        return Check(name, True, "I have not seen the API server unreachable", {})
    if outage.ended is None:
        return Check(name, False, f"the API server has not answered me since "
                                  f"{outage.began.isoformat()}", {})
    if facts.nodes is None:
        return _unknown(name, "nodes", facts)
    if facts.now - outage.ended > limits.window:
        return Check(name, True, "the last API server outage I saw ended "
                                 f"{(facts.now - outage.ended).total_seconds():.0f}s ago", {})
    since_outage = []
    for node in facts.nodes:
        ready = node.condition("Ready")
        if ready is None or ready.status == "True":
            continue
        # A node NotReady since before the outage began was broken on its own.
        if ready.since is None or ready.since >= outage.began - limits.window:
            since_outage.append(node.name)
    numbers: dict[str, JSON] = {"outage_began": outage.began.isoformat(),
                                "outage_ended": outage.ended.isoformat(),
                                "not_ready_since": len(since_outage),
                                "min_nodes": limits.minNodes}
    if len(since_outage) >= limits.minNodes and facts.disruption.node in since_outage:
        return Check(name, False, f"{len(since_outage)} nodes NotReady since the API server "
                                  f"outage that ended {outage.ended.isoformat()}: an outage of "
                                  f"the observer, not of the nodes; I wait "
                                  f"{limits.window.total_seconds():.0f}s for their kubelets",
                     numbers)
    return Check(name, True, f"{len(since_outage)} node(s) NotReady since the last outage",
                 numbers)


CHECKS: tuple[tuple[CheckName, Rule], ...] = (
    ("last-control-plane", last_control_plane),
    ("one-control-plane-at-a-time", one_control_plane_at_a_time),
    ("etcd-quorum", etcd_quorum),
    ("pdb", pdb),
    ("last-replica", last_replica),
    ("capacity", capacity),
    ("failure-domain", failure_domain),
    ("disruption-budget", disruption_budget),
    ("observer-outage", observer_outage),
)


def review(facts: Facts) -> tuple[Check, ...]:
    """Every check, in the order of ``CHECKS``."""
    return tuple(rule(facts) for _, rule in CHECKS)


def blocking(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if not c.passed]
