"""Detectors and verify expectations: pure functions over one snapshot; "unknown" kept apart."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from bus.messages import Target
from runtime.core.detecting import APISERVER, Detection, detect, expectation_met
from runtime.model.formats import Detect, Expectation
from runtime.model.snapshot import EventObs, NodeObs, PodObs, Snapshot, UnitObs
from tests.builders import (
    HOST,
    at,
    deployment,
    lease,
    node,
    peer,
    pod,
    probe,
    snapshot,
    unit,
)

DETECT: TypeAdapter[Detect] = TypeAdapter(Detect)


def spec(kind: str, **fields: Any) -> Detect:
    return DETECT.validate_python({"kind": kind, **fields})


def keys(detection: Detection) -> set[str]:
    return set(detection.matches)


# ---------------------------------------------------------------- unknown domains


@pytest.mark.parametrize(
    ("detector", "observed"),
    [
        (spec("node-condition"), {"pods": (), "units": ()}),
        (spec("pod-crashloop"), {"nodes": ()}),
        (spec("apiserver-unreachable"), {"nodes": (), "units": ()}),
        (spec("unit-failed", units=["kubelet.service"]), {"nodes": ()}),
        (spec("peer-silent"), {"leases": ()}),
        (spec("cordon-without-owner"), {"nodes": [node("a", repair="r1")]}),  # leases unseen
        (spec("cordon-without-owner"), {"leases": ()}),  # nodes unseen
        (spec("stale-lease"), {"peers": ()}),
    ],
    ids=lambda value: getattr(value, "kind", ""),
)
def test_a_domain_not_observed_is_unknown_not_healthy(detector: Detect,
                                                       observed: dict[str, Any]) -> None:
    detection = detect(detector, snapshot(0, **observed))
    assert detection.population is None
    assert not detection.known
    assert detection.matches == {}


def test_an_observed_empty_domain_is_known_and_healthy() -> None:
    detection = detect(spec("node-condition"), snapshot(0, nodes=[]))
    assert detection.known
    assert detection.population == 0
    assert detection.matches == {}


# ---------------------------------------------------------------- node-condition


def test_node_condition_matches_the_listed_statuses_only() -> None:
    nodes = [node("a", "True"), node("b", "False"), node("c", "Unknown")]
    detection = detect(spec("node-condition", status=["False"]), snapshot(0, nodes=nodes))
    assert keys(detection) == {"node.b"}
    assert detection.population == 3
    match = detection.matches["node.b"]
    assert match.target == Target(kind="node", name="b")
    assert "Ready=False" in match.summary
    assert match.evidence["status"] == "False"


def test_a_missing_condition_counts_as_unknown() -> None:
    nodes = [node("silent", ready=None), node("fine")]
    unknown = detect(spec("node-condition", status=["Unknown"]), snapshot(0, nodes=nodes))
    assert keys(unknown) == {"node.silent"}
    assert unknown.matches["node.silent"].evidence["status"] == "Unknown"
    only_false = detect(spec("node-condition", status=["False"]), snapshot(0, nodes=nodes))
    assert keys(only_false) == set()


def test_node_condition_selector_narrows_matches_and_population() -> None:
    nodes = [node("cp", "False", labels={"role": "control-plane"}),
             node("w1", "False", labels={"role": "worker"}), node("w2", labels={"role": "worker"})]
    detection = detect(spec("node-condition", selector={"role": "worker"}),
                       snapshot(0, nodes=nodes))
    assert keys(detection) == {"node.w1"}
    assert detection.population == 2


def test_node_condition_reads_other_conditions() -> None:
    pressured = NodeObs(name="a", conditions=(
        node("a").conditions[0],
        node("a", "True").conditions[0].model_copy(update={"type": "DiskPressure"}),
    ))
    detection = detect(spec("node-condition", condition="DiskPressure", status=["True"]),
                       snapshot(0, nodes=[pressured, node("b")]))
    assert keys(detection) == {"node.a"}


def warning(about: str, reason: str, second: float, *, namespace: str = "",
            message: str = "it broke") -> EventObs:
    return EventObs(namespace=namespace, object=about, reason=reason, message=message,
                    last_seen=at(second))


def test_a_finding_quotes_the_latest_warnings_about_its_node() -> None:
    events = [warning("Node/b", f"R{i}", second) for i, second in enumerate([5, 1, 9, 3])]
    events += [warning("Node/a", "Other", 10), warning("Pod/b", "NotTheNode", 10,
                                                        namespace="default")]
    detection = detect(spec("node-condition", status=["False"]),
                       snapshot(0, nodes=[node("a"), node("b", "False")], events=events))
    assert detection.matches["node.b"].evidence["events"] == [
        "R3: it broke", "R0: it broke", "R2: it broke"]  # the three latest, oldest first


def test_without_warnings_or_without_looking_the_evidence_has_no_events() -> None:
    for events in (None, [], [warning("Node/other", "R", 1)]):
        detection = detect(spec("node-condition", status=["False"]),
                           snapshot(0, nodes=[node("b", "False")], events=events))
        assert "events" not in detection.matches["node.b"].evidence


# ---------------------------------------------------------------- pod-crashloop


def test_crashlooping_pods_group_by_their_workload() -> None:
    web, api = deployment("web"), deployment("api")
    pods = [pod("web-1", owner=web, restarts=7, crashloop=True),
            pod("web-2", owner=web, restarts=9, crashloop=True),
            pod("web-3", owner=web),
            pod("api-1", owner=api),
            pod("lone", restarts=4, crashloop=True)]
    detection = detect(spec("pod-crashloop", minRestarts=3), snapshot(0, pods=pods))
    assert keys(detection) == {"deployment.default/web", "pod.default/lone"}
    assert detection.population == 3  # web, api, lone
    web_match = detection.matches["deployment.default/web"]
    assert web_match.target == web
    assert "2/3" in web_match.summary
    looping: Any = web_match.evidence["crashlooping"]
    assert looping == {"default/web-1": ["app"], "default/web-2": ["app"]}
    assert "events" not in web_match.evidence
    assert detection.matches["pod.default/lone"].target == Target(
        kind="pod", name="lone", namespace="default")


def test_a_crashloop_finding_quotes_the_warnings_about_the_workloads_pods() -> None:
    web = deployment("web")
    pods = [pod("web-1", owner=web, restarts=7, crashloop=True), pod("web-2", owner=web)]
    events = [warning("Pod/web-1", "BackOff", 2, namespace="default",
                      message="Back-off restarting failed container app"),
              warning("Pod/web-2", "Unhealthy", 1, namespace="default"),
              warning("Pod/web-1", "BackOff", 3, namespace="other")]
    detection = detect(spec("pod-crashloop", minRestarts=3), snapshot(0, pods=pods,
                                                                       events=events))
    assert detection.matches["deployment.default/web"].evidence["events"] == [
        "Unhealthy: it broke", "BackOff: Back-off restarting failed container app"]


def test_crashloop_needs_min_restarts_and_the_waiting_reason() -> None:
    pods = [pod("few", restarts=2, crashloop=True), pod("many-but-running", restarts=50)]
    detection = detect(spec("pod-crashloop", minRestarts=3), snapshot(0, pods=pods))
    assert keys(detection) == set()
    assert detection.population == 2


def test_crashloop_namespaces_filter_matches_and_population() -> None:
    pods = [pod("a", namespace="prod", restarts=5, crashloop=True),
            pod("b", namespace="dev", restarts=5, crashloop=True)]
    detection = detect(spec("pod-crashloop", namespaces=["prod"]), snapshot(0, pods=pods))
    assert keys(detection) == {"pod.prod/a"}
    assert detection.population == 1


# ---------------------------------------------------------------- apiserver-unreachable


def test_apiserver_unreachable_needs_min_paths_failing_and_none_ok() -> None:
    failing = [probe("tcp://10.0.0.1:6443", ok=False), probe("https://cp-1:6443/readyz", ok=False)]
    detection = detect(spec("apiserver-unreachable", minPaths=2), snapshot(0, apiserver=failing))
    assert keys(detection) == {APISERVER.key}
    assert detection.population == 1
    paths: Any = detection.matches[APISERVER.key].evidence["paths"]
    assert [p["path"] for p in paths] == ["tcp://10.0.0.1:6443", "https://cp-1:6443/readyz"]
    assert all(p["error"] == "connection refused" for p in paths)


def test_one_path_ok_means_reachable() -> None:
    probes = [probe("tcp", ok=False), probe("readyz", ok=False), probe("kubelet", ok=True)]
    detection = detect(spec("apiserver-unreachable", minPaths=2), snapshot(0, apiserver=probes))
    assert detection.known
    assert keys(detection) == set()


@pytest.mark.parametrize("probes", [[], [probe("tcp", ok=False)]])
def test_too_few_failing_paths_is_unknown(probes: list[Any]) -> None:
    detection = detect(spec("apiserver-unreachable", minPaths=2), snapshot(0, apiserver=probes))
    assert not detection.known


# ---------------------------------------------------------------- unit-failed


def test_unit_failed_matches_listed_units_in_listed_states_on_this_host() -> None:
    units = [unit("kubelet.service", "failed"), unit("containerd.service", "inactive"),
             unit("ssh.service", "failed"), unit("k3s.service", "failed", load_state="not-found")]
    detection = detect(
        spec("unit-failed", units=["kubelet.service", "containerd.service", "k3s.service"]),
        snapshot(0, units=units))
    assert keys(detection) == {"unit.cp-1/kubelet.service"}
    assert detection.matches["unit.cp-1/kubelet.service"].target == Target(
        kind="unit", name="kubelet.service", host=HOST)
    assert detection.population == 2  # k3s is not installed here, ssh is not listed
    with_inactive = detect(
        spec("unit-failed", units=["kubelet.service", "containerd.service"],
             states=["failed", "inactive"]),
        snapshot(0, units=units))
    assert keys(with_inactive) == {"unit.cp-1/kubelet.service", "unit.cp-1/containerd.service"}


# ---------------------------------------------------------------- peer-silent


def test_peer_silent_after_the_window_or_never_heard() -> None:
    peers = [peer("alexa", at(60)), peer("riven", at(29)), peer("vera", at(30)), peer("lior", None)]
    detection = detect(spec("peer-silent", silentAfter="30s"), snapshot(60, peers=peers))
    assert keys(detection) == {"persona.riven", "persona.lior"}
    assert detection.population == 4
    assert "never" in detection.matches["persona.lior"].summary
    assert detection.matches["persona.riven"].target == Target(kind="persona", name="riven")


# ---------------------------------------------------------------- cordon-without-owner


def test_cordon_without_owner_only_agent_cordons_ready_and_unleased() -> None:
    nodes = [
        node("orphan", repair="r-old"),                  # ours, Ready, no lease: match
        node("owned", repair="r-live"),                  # lease still held
        node("human", unschedulable=True),               # a person's cordon: never ours
        node("sick", "False", repair="r-gone"),          # not Ready yet: leave it cordoned
        node("schedulable"),
    ]
    leases = [lease("node.owned", "r-live", at(300))]
    detection = detect(spec("cordon-without-owner"), snapshot(0, nodes=nodes, leases=leases))
    assert keys(detection) == {"node.orphan"}
    assert detection.population == 5
    assert detection.matches["node.orphan"].evidence["repair"] == "r-old"


# ---------------------------------------------------------------- stale-lease


def test_stale_lease_after_expiry_plus_grace() -> None:
    leases = [lease("node.a", "r1", at(0)), lease("node.b", "r2", at(31)),  # b: exactly at grace
              lease("node.c", "r3", at(30)), lease("node.d", "r4", at(600))]
    detection = detect(spec("stale-lease", grace="30s"), snapshot(61, leases=leases))
    assert keys(detection) == {"lease.node.a", "lease.node.c"}
    assert detection.matches["lease.node.a"].target == Target(kind="lease", name="node.a")
    assert detection.population == 4


# ---------------------------------------------------------------- evidence is JSON


def test_all_evidence_round_trips_through_json() -> None:
    snap = snapshot(
        100,
        nodes=[node("a", "False"), node("b", ready=None), node("o", repair="r")],
        pods=[pod("p", owner=deployment("web"), restarts=9, crashloop=True)],
        apiserver=[probe("tcp", ok=False), probe("readyz", ok=False)],
        units=[unit("kubelet.service", "failed")],
        peers=[peer("alexa", None), peer("vera", at(0))],
        leases=[lease("node.x", "r9", at(0))],
    )
    specs = [spec("node-condition"), spec("pod-crashloop"), spec("apiserver-unreachable"),
             spec("unit-failed", units=["kubelet.service"]), spec("peer-silent"),
             spec("cordon-without-owner"), spec("stale-lease")]
    for detector in specs:
        detection = detect(detector, snap)
        assert detection.matches, detector.kind
        for match in detection.matches.values():
            assert json.loads(json.dumps(match.evidence)) == match.evidence


node_states = st.lists(st.sampled_from(["True", "False", "Unknown", None]), max_size=12)


@given(node_states)
def test_node_condition_population_and_matches_agree(states: list[str | None]) -> None:
    nodes = [node(f"n{i}", state) for i, state in enumerate(states)]
    detection = detect(spec("node-condition"), snapshot(0, nodes=nodes))
    assert detection.population == len(nodes)
    assert keys(detection) == {f"node.n{i}" for i, s in enumerate(states) if s != "True"}


# ---------------------------------------------------------------- expectations


def expect(expectation: Expectation, target: Target, snap: Snapshot, detector: Detect | None = None,
           acted_on: Target | None = None) -> bool | None:
    return expectation_met(expectation, target, detector or spec("node-condition"), snap,
                           acted_on=acted_on)


def test_finding_cleared_reruns_the_detector() -> None:
    a = Target(kind="node", name="a")
    assert expect("finding-cleared", a, snapshot(0, nodes=[node("a")])) is True
    assert expect("finding-cleared", a, snapshot(0, nodes=[node("a", "False")])) is False
    assert expect("finding-cleared", a, snapshot(0)) is None


def test_node_ready_for_a_node_or_the_host_of_a_unit() -> None:
    a = Target(kind="node", name="a")
    kubelet_on_a = Target(kind="unit", name="kubelet.service", host="a")
    ready, not_ready = snapshot(0, nodes=[node("a")]), snapshot(0, nodes=[node("a", "False")])
    assert expect("node-ready", a, ready) is True
    assert expect("node-ready", a, not_ready) is False
    assert expect("node-ready", kubelet_on_a, ready) is True
    assert expect("node-ready", APISERVER, ready, acted_on=kubelet_on_a) is True
    assert expect("node-ready", a, snapshot(0, nodes=[node("b")])) is False  # gone is not ready
    assert expect("node-ready", a, snapshot(0)) is None
    assert expect("node-ready", APISERVER, ready) is None


def test_unit_active_reads_the_unit_acted_on_on_this_host() -> None:
    kubelet = Target(kind="unit", name="kubelet.service", host=HOST)
    elsewhere = Target(kind="unit", name="kubelet.service", host="worker-9")
    a = Target(kind="node", name="a")
    active = snapshot(0, units=[unit("kubelet.service")])
    failed = snapshot(0, units=[unit("kubelet.service", "failed")])
    assert expect("unit-active", kubelet, active) is True
    assert expect("unit-active", kubelet, failed) is False
    assert expect("unit-active", a, active, acted_on=kubelet) is True
    assert expect("unit-active", a, failed, acted_on=kubelet) is False
    assert expect("unit-active", elsewhere, active) is None
    assert expect("unit-active", a, active) is None
    assert expect("unit-active", kubelet, snapshot(0)) is None
    assert expect("unit-active", kubelet, snapshot(0, units=[])) is False


def test_pod_ready_needs_every_pod_running_and_ready() -> None:
    web = deployment("web")
    lone = Target(kind="pod", name="lone", namespace="default")
    healthy = snapshot(0, pods=[pod("web-1", owner=web), pod("web-2", owner=web), pod("lone")])
    assert expect("pod-ready", web, healthy) is True
    assert expect("pod-ready", lone, healthy) is True
    one_unready = snapshot(0, pods=[pod("web-1", owner=web), pod("web-2", owner=web, ready=False)])
    assert expect("pod-ready", web, one_unready) is False
    pending = snapshot(0, pods=[pod("web-1", owner=web, phase="Pending")])
    assert expect("pod-ready", web, pending) is False
    assert expect("pod-ready", web, snapshot(0, pods=[])) is False
    assert expect("pod-ready", web, snapshot(0)) is None


def test_apiserver_reachable_needs_every_path() -> None:
    both = snapshot(0, apiserver=[probe("tcp", ok=True), probe("readyz", ok=True)])
    half = snapshot(0, apiserver=[probe("tcp", ok=True), probe("readyz", ok=False)])
    assert expect("apiserver-reachable", APISERVER, both) is True
    assert expect("apiserver-reachable", APISERVER, half) is False
    assert expect("apiserver-reachable", APISERVER, snapshot(0, apiserver=[])) is None
    assert expect("apiserver-reachable", APISERVER, snapshot(0)) is None


def test_peer_heartbeat_uses_the_policy_window_else_a_minute() -> None:
    vera = Target(kind="persona", name="vera")
    silent = spec("peer-silent", silentAfter="20s")
    beat_25s_ago = snapshot(100, peers=[peer("vera", at(75))])
    assert expect("peer-heartbeat", vera, beat_25s_ago, silent) is False
    assert expect("peer-heartbeat", vera, beat_25s_ago) is True  # 60s by default
    assert expect("peer-heartbeat", vera, snapshot(100, peers=[peer("vera", at(61))])) is True
    assert expect("peer-heartbeat", vera, snapshot(100, peers=[peer("vera", at(39))])) is False
    assert expect("peer-heartbeat", vera, snapshot(100, peers=[peer("vera", None)])) is False
    assert expect("peer-heartbeat", vera, snapshot(100, peers=[])) is False
    assert expect("peer-heartbeat", vera, snapshot(100)) is None


def test_snapshot_types_are_what_builders_make() -> None:
    # Guards the builders themselves: a builder that silently dropped a field
    # would make the tests above pass for the wrong reason.
    assert isinstance(pod("x", crashloop=True, restarts=3), PodObs)
    assert pod("x", crashloop=True, restarts=3).containers[0].waiting_reason == "CrashLoopBackOff"
    assert isinstance(unit("a.service"), UnitObs)
    assert node("n", repair="r").unschedulable
