"""Detectors: pure functions from one ``Snapshot`` to what is wrong in it, right now.

A detector says which targets match its condition in this snapshot and out of how
many it looked at (the population, which the policy engine's breaker divides by).
It knows nothing about time spans (``for:`` is the engine's job) or about repairs.

"Unknown" is an answer of its own: when the domain a detector reads was not
observed (``None`` in the snapshot), the detection has ``population=None`` and no
matches, and the engine neither opens nor clears anything on it. "I could not look"
must never read as "nothing is wrong" (which would clear findings) nor as
"everything is wrong".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeAlias, assert_never

from bus.messages import Target
from runtime.model.catalog import REPAIR_ANNOTATION
from runtime.model.formats import (
    ApiserverUnreachableDetect,
    CordonWithoutOwnerDetect,
    Detect,
    Expectation,
    NodeConditionDetect,
    PeerSilentDetect,
    PodCrashloopDetect,
    StaleLeaseDetect,
    UnitFailedDetect,
    opted_out,
)
from runtime.model.snapshot import ApiProbe, EventObs, NodeObs, PodObs, Snapshot

JSON: TypeAlias = bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None
"""Evidence values: whatever survives ``json.dumps`` unchanged, so findings go on the bus as is."""

PEER_FRESH_DEFAULT = timedelta(seconds=60)
"""How recent a heartbeat must be for ``peer-heartbeat`` when the policy does not say."""


@dataclass(frozen=True)
class Match:
    """One target for which the detector's condition holds in this snapshot."""

    target: Target
    summary: str
    evidence: Mapping[str, JSON] = field(default_factory=dict)


@dataclass(frozen=True)
class Detection:
    """What one detector saw in one snapshot.

    ``matches`` is keyed by ``Target.key``. ``population`` is how many candidates
    the detector looked at; ``None`` means its domain was not observed (unknown).
    """

    matches: dict[str, Match]
    population: int | None

    @property
    def known(self) -> bool:
        return self.population is not None


UNKNOWN = Detection(matches={}, population=None)


def _found(matches: Iterable[Match], population: int) -> Detection:
    return Detection(matches={m.target.key: m for m in matches}, population=population)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


EVIDENCE_EVENTS = 3
"""Warning events quoted in a finding's evidence: the latest few say what is going on."""

_NEVER = datetime.min.replace(tzinfo=UTC)


def _events(snapshot: Snapshot, about: set[tuple[str, str]]) -> dict[str, JSON]:
    """``{"events": [...]}`` with the latest Warnings about ``(namespace, Kind/name)`` objects.

    Empty when there are none or events were not observed, so evidence only grows by
    what was seen.
    """
    found: list[EventObs] = [e for e in snapshot.events or () if (e.namespace, e.object) in about]
    found.sort(key=lambda e: e.last_seen or _NEVER)
    return {"events": [e.line() for e in found[-EVIDENCE_EVENTS:]]} if found else {}


# ---------------------------------------------------------------- detectors


def _node_condition(spec: NodeConditionDetect, snapshot: Snapshot) -> Detection:
    if snapshot.nodes is None:
        return UNKNOWN
    selected = [n for n in snapshot.nodes
                if spec.selector.matches(n.labels) and not opted_out(n.labels)]
    matches = []
    for node in selected:
        condition = node.condition(spec.condition)
        # A node that stopped reporting a condition is exactly as unknown as one
        # whose kubelet says Unknown; NotReady policies must see both.
        status = condition.status if condition is not None else "Unknown"
        if status not in spec.status:
            continue
        reason = condition.reason if condition is not None else "condition not reported"
        matches.append(Match(
            Target(kind="node", name=node.name),
            f"node {node.name}: {spec.condition}={status}" + (f" ({reason})" if reason else ""),
            {"condition": spec.condition, "status": status, "reason": reason,
             "since": _iso(condition.since) if condition is not None else None,
             **_events(snapshot, {("", f"Node/{node.name}")})},
        ))
    return _found(matches, len(selected))


def _crashlooping(pod: PodObs, min_restarts: int) -> list[str]:
    return [c.name for c in pod.containers
            if c.waiting_reason == "CrashLoopBackOff" and c.restarts >= min_restarts]


def _pod_target(pod: PodObs) -> Target:
    return Target(kind="pod", name=pod.name, namespace=pod.namespace)


def _pod_crashloop(spec: PodCrashloopDetect, snapshot: Snapshot) -> Detection:
    if snapshot.pods is None:
        return UNKNOWN
    groups: dict[str, tuple[Target, list[PodObs]]] = {}
    for pod in snapshot.pods:
        if spec.namespaces and pod.namespace not in spec.namespaces:
            continue
        if not spec.selector.matches(pod.labels) or opted_out(pod.labels):
            continue
        # Repairs act on the workload (a rolling restart), so three crashing
        # replicas are one finding, not three.
        target = pod.owner or _pod_target(pod)
        groups.setdefault(target.key, (target, []))[1].append(pod)
    matches = []
    for target, pods in groups.values():
        looping = {f"{p.namespace}/{p.name}": _crashlooping(p, spec.minRestarts) for p in pods}
        looping = {name: containers for name, containers in looping.items() if containers}
        if not looping:
            continue
        restarts: dict[str, JSON] = {
            f"{p.namespace}/{p.name}": {c.name: c.restarts for c in p.containers} for p in pods
        }
        matches.append(Match(
            target,
            f"{target.kind} {target.namespace}/{target.name}: {len(looping)}/{len(pods)} "
            f"pod(s) in CrashLoopBackOff",
            {"crashlooping": {k: list(v) for k, v in looping.items()}, "restarts": restarts,
             "minRestarts": spec.minRestarts,
             **_events(snapshot, {(p.namespace, f"Pod/{p.name}") for p in pods})},
        ))
    return _found(matches, len(groups))


APISERVER = Target(kind="apiserver", name="kube-apiserver")


def _probe_evidence(probes: Iterable[ApiProbe]) -> list[JSON]:
    return [{"path": p.path, "ok": p.ok, "error": p.error} for p in probes]


def _apiserver_unreachable(spec: ApiserverUnreachableDetect, snapshot: Snapshot) -> Detection:
    probes = snapshot.apiserver
    if probes is None:
        return UNKNOWN
    failed = [p for p in probes if not p.ok]
    if any(p.ok for p in probes):
        return _found((), 1)
    if len(failed) < spec.minPaths:
        # Fewer failing paths than the policy demands is not proof of an outage,
        # but with nothing succeeding it is no proof of health either.
        return UNKNOWN
    return _found([Match(
        APISERVER,
        f"API server unreachable along {len(failed)} path(s): "
        + "; ".join(f"{p.path}: {p.error or 'failed'}" for p in failed),
        {"paths": _probe_evidence(failed)},
    )], 1)


def _unit_failed(spec: UnitFailedDetect, snapshot: Snapshot) -> Detection:
    if snapshot.units is None:
        return UNKNOWN
    # A unit that is not installed here cannot have failed here (a worker has no k3s-server).
    present = [u for u in snapshot.units if u.name in spec.units and u.load_state != "not-found"]
    host = snapshot.host or None
    return _found([
        Match(Target(kind="unit", name=u.name, host=host),
              f"unit {u.name}{' on ' + host if host else ''}: {u.active_state}"
              + (f" ({u.sub_state})" if u.sub_state else ""),
              {"active_state": u.active_state, "sub_state": u.sub_state,
               "load_state": u.load_state, "n_restarts": u.n_restarts})
        for u in present if u.active_state in spec.states
    ], len(present))


def _peer_silent(spec: PeerSilentDetect, snapshot: Snapshot) -> Detection:
    if snapshot.peers is None:
        return UNKNOWN
    matches = []
    for peer in snapshot.peers:
        beat = peer.last_heartbeat
        if beat is not None and snapshot.at - beat <= spec.silentAfter:
            continue
        silence = (f"silent for {(snapshot.at - beat).total_seconds():.0f}s"
                   if beat is not None else "never heard from")
        matches.append(Match(
            Target(kind="persona", name=peer.persona),
            f"peer {peer.persona}: {silence}",
            {"last_heartbeat": _iso(beat), "host": peer.host,
             "silentAfter": spec.silentAfter.total_seconds()},
        ))
    return _found(matches, len(snapshot.peers))


def is_ready(node: NodeObs) -> bool:
    """Whether the node's Ready condition is True (a node not reporting it is not)."""
    condition = node.condition("Ready")
    return condition is not None and condition.status == "True"


def _cordon_without_owner(_spec: CordonWithoutOwnerDetect, snapshot: Snapshot) -> Detection:
    if snapshot.nodes is None or snapshot.leases is None:
        return UNKNOWN
    held = {lease.repair for lease in snapshot.leases}
    matches = []
    for node in snapshot.nodes:
        repair = node.annotations.get(REPAIR_ANNOTATION)
        # No annotation: a person cordoned the node, and only a person uncordons it.
        if (not node.unschedulable or repair is None or not is_ready(node) or repair in held
                or opted_out(node.labels)):
            continue
        matches.append(Match(
            Target(kind="node", name=node.name),
            f"node {node.name}: cordoned by repair {repair}, Ready, and no lease holds it",
            {"repair": repair, "annotations": dict(node.annotations)},
        ))
    return _found(matches, len(snapshot.nodes))


def _stale_lease(spec: StaleLeaseDetect, snapshot: Snapshot) -> Detection:
    if snapshot.leases is None:
        return UNKNOWN
    return _found([
        Match(Target(kind="lease", name=lease.key),
              f"lease {lease.key}: held by {lease.holder} for repair {lease.repair}, "
              f"expired {(snapshot.at - lease.expires).total_seconds():.0f}s ago",
              {"repair": lease.repair, "holder": lease.holder, "expires": _iso(lease.expires)})
        for lease in snapshot.leases if lease.expires + spec.grace < snapshot.at
    ], len(snapshot.leases))


def detect(spec: Detect, snapshot: Snapshot) -> Detection:
    """Run the detector ``spec.kind`` over ``snapshot``."""
    match spec:
        case NodeConditionDetect():
            return _node_condition(spec, snapshot)
        case PodCrashloopDetect():
            return _pod_crashloop(spec, snapshot)
        case ApiserverUnreachableDetect():
            return _apiserver_unreachable(spec, snapshot)
        case UnitFailedDetect():
            return _unit_failed(spec, snapshot)
        case PeerSilentDetect():
            return _peer_silent(spec, snapshot)
        case CordonWithoutOwnerDetect():
            return _cordon_without_owner(spec, snapshot)
        case StaleLeaseDetect():
            return _stale_lease(spec, snapshot)
    assert_never(spec)


# ---------------------------------------------------------------- verify expectations


def _node_name(target: Target) -> str | None:
    if target.kind in ("node", "host"):
        return target.name
    return target.host if target.kind == "unit" else None


def _node_ready(subject: Target, snapshot: Snapshot) -> bool | None:
    name = _node_name(subject)
    if name is None or snapshot.nodes is None:
        return None
    node = next((n for n in snapshot.nodes if n.name == name), None)
    # A node that left the cluster is not a node that recovered.
    return node is not None and is_ready(node)


def _unit_active(subject: Target, snapshot: Snapshot) -> bool | None:
    if subject.kind != "unit" or snapshot.units is None:
        return None
    if subject.host and snapshot.host and subject.host != snapshot.host:
        return None  # units are observed on this host only
    unit = next((u for u in snapshot.units if u.name == subject.name), None)
    return unit is not None and unit.active_state == "active"


def _pod_ready(subject: Target, snapshot: Snapshot) -> bool | None:
    if snapshot.pods is None:
        return None
    if subject.kind == "pod":
        pods = [p for p in snapshot.pods if _pod_target(p) == subject]
    else:
        pods = [p for p in snapshot.pods if p.owner == subject]
    # No pod at all is a workload that has not come back, not a healthy one.
    return bool(pods) and all(
        p.phase == "Running" and all(c.ready for c in p.containers) for p in pods
    )


def _apiserver_reachable(snapshot: Snapshot) -> bool | None:
    if not snapshot.apiserver:
        return None
    # Every path must agree: after a control-plane restart, an API server that
    # answers on one path and not on another is not repaired yet, and if it
    # stays half-reachable the ladder should move on to a human.
    return all(p.ok for p in snapshot.apiserver)


def _peer_heartbeat(subject: Target, spec: Detect, snapshot: Snapshot) -> bool | None:
    if subject.kind != "persona" or snapshot.peers is None:
        return None
    peer = next((p for p in snapshot.peers if p.persona == subject.name), None)
    if peer is None or peer.last_heartbeat is None:
        return False
    fresh = spec.silentAfter if isinstance(spec, PeerSilentDetect) else PEER_FRESH_DEFAULT
    return snapshot.at - peer.last_heartbeat <= fresh


def expectation_met(expect: Expectation, target: Target, spec: Detect, snapshot: Snapshot,
                    *, acted_on: Target | None = None) -> bool | None:
    """Whether a repair's ``verify.expect`` holds in ``snapshot``; None when it cannot tell.

    ``target`` is the finding's target and ``acted_on`` the target the remedy acted
    on, when it differs (a unit restarted for a node finding). ``unit-active`` reads
    the unit acted on; ``node-ready`` the node of the finding, or the host of the
    unit or host acted on. ``apiserver-reachable`` needs every probe path to succeed.
    """
    subjects = (target, acted_on) if acted_on is not None else (target,)
    match expect:
        case "finding-cleared":
            detection = detect(spec, snapshot)
            return None if not detection.known else target.key not in detection.matches
        case "node-ready":
            subject = next((s for s in subjects if _node_name(s) is not None), target)
            return _node_ready(subject, snapshot)
        case "unit-active":
            subject = next((s for s in reversed(subjects) if s.kind == "unit"), target)
            return _unit_active(subject, snapshot)
        case "pod-ready":
            return _pod_ready(target, snapshot)
        case "apiserver-reachable":
            return _apiserver_reachable(snapshot)
        case "peer-heartbeat":
            return _peer_heartbeat(target, spec, snapshot)
