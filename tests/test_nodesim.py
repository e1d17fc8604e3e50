"""The node simulator: the scheduler's and kubelets' rules, and its behaviour on a real API server.

The integration tests check what the cluster says (nodes, leases, pods, the
node-lifecycle controller's verdict), never the simulator's own bookkeeping.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.controlplane import ControlPlane
from lab.nodesim import (
    LEASE_NAMESPACE,
    JsonApi,
    KubeletPorts,
    NodeSimulator,
    _Node,
    fits,
    tolerates,
)
from tests.k8s import admin_json, deployment, wait_for

Obj = dict[str, Any]
CONTROL_PLANE_ROLE = "node-role.kubernetes.io/control-plane"
CONTROL_PLANE_TAINT = {"key": CONTROL_PLANE_ROLE, "effect": "NoSchedule"}

# ---------------------------------------------------------------- scheduling rules

keys = st.sampled_from(["a", "b", "node.kubernetes.io/unreachable"])
values = st.sampled_from(["", "x", "y"])
effects = st.sampled_from(["NoSchedule", "NoExecute", "PreferNoSchedule"])
taints = st.fixed_dictionaries({"key": keys, "value": values, "effect": effects})


@given(taints)
def test_an_empty_key_with_exists_tolerates_everything(taint: Obj) -> None:
    assert tolerates([{"operator": "Exists"}], taint)


@given(taints)
def test_a_toleration_equal_to_the_taint_tolerates_it(taint: Obj) -> None:
    assert tolerates([{**taint, "operator": "Equal"}], taint)
    assert tolerates([{"key": taint["key"], "operator": "Exists"}], taint)


@given(taints, taints)
def test_no_tolerations_tolerate_nothing_and_the_effect_must_match(taint: Obj,
                                                                   other: Obj) -> None:
    assert not tolerates([], taint)
    if other["effect"] != taint["effect"]:
        assert not tolerates([{"operator": "Exists", "effect": other["effect"]}], taint)


def _node(name: str = "n1", **kwargs: Any) -> _Node:
    return _Node(name, kwargs.pop("labels", {}), "172.16.0.1", **kwargs)


def _pod(**spec: Any) -> Obj:
    return {"metadata": {"name": "p"}, "spec": spec}


def _daemon_pod(node: str) -> Obj:
    return _pod(
        tolerations=[{"key": "node.kubernetes.io/unschedulable", "operator": "Exists",
                      "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [node]}]}]}}})


def test_a_cordoned_node_takes_only_pods_tolerating_unschedulable() -> None:
    cordoned = _node(unschedulable=True)
    assert not fits(_pod(), cordoned)
    assert fits(_daemon_pod("n1"), cordoned)


def test_a_daemonset_pod_fits_only_its_node() -> None:
    assert fits(_daemon_pod("n1"), _node("n1"))
    assert not fits(_daemon_pod("n1"), _node("n2"))


def test_taints_and_node_selectors() -> None:
    tainted = _node(taints=[CONTROL_PLANE_TAINT], labels={CONTROL_PLANE_ROLE: ""})
    assert not fits(_pod(), tainted)
    assert fits(_pod(tolerations=[{"key": CONTROL_PLANE_ROLE, "operator": "Exists"}]), tainted)
    assert fits(_pod(), _node(taints=[{"key": "k", "effect": "PreferNoSchedule"}]))
    assert fits(_pod(nodeSelector={"disk": "ssd"}), _node(labels={"disk": "ssd"}))
    assert not fits(_pod(nodeSelector={"disk": "ssd"}), _node(labels={"disk": "hdd"}))


# ---------------------------------------------------------------- on the real API server

def _pods(api: JsonApi, namespace: str) -> list[Obj]:
    items: list[Obj] = api.call("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    return items


def _ready(pod: Obj) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod["status"].get("conditions", ()))


def _all_running(api: JsonApi, namespace: str, count: int) -> list[Obj] | None:
    pods = [p for p in _pods(api, namespace) if "deletionTimestamp" not in p["metadata"]]
    if len(pods) == count and all(p["status"].get("phase") == "Running" and _ready(p)
                                  for p in pods):
        return pods
    return None


def _node_ready(api: JsonApi, name: str) -> Obj:
    node = api.call("GET", f"/api/v1/nodes/{name}")
    ready: Obj = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    return ready


@pytest.mark.slow
def test_nodes_are_registered_ready_with_renewed_leases(
        control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    workers = node_sim.add_nodes(2)
    masters = node_sim.add_nodes(1, {CONTROL_PLANE_ROLE: ""}, prefix="cp",
                                 taints=[CONTROL_PLANE_TAINT])
    with admin_json(control_plane) as api:
        for name in workers + masters:
            assert _node_ready(api, name)["status"] == "True"
        master = api.call("GET", f"/api/v1/nodes/{masters[0]}")
        assert CONTROL_PLANE_ROLE in master["metadata"]["labels"]
        assert CONTROL_PLANE_TAINT in master["spec"]["taints"]
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/"
        lease = api.call("GET", lease_path + workers[0])
        assert lease["spec"]["holderIdentity"] == workers[0]
        assert lease["metadata"]["ownerReferences"][0]["name"] == workers[0]
        first = lease["spec"]["renewTime"]
        wait_for(lambda: api.call("GET", lease_path + workers[0])["spec"]["renewTime"] != first,
                 5 * node_sim.heartbeat, "the lease to be renewed")


def _connects(port: int) -> bool:
    try:
        socket.create_connection((KubeletPorts.HOST, port), timeout=2).close()
    except OSError:
        return False
    return True


def test_kubelet_ports_answer_while_open_and_refuse_once_closed() -> None:
    ports = KubeletPorts()
    server = threading.Thread(target=ports.serve)
    server.start()
    try:
        port = ports.open("w1")
        assert ports.open("w1") == port  # already open: the same one
        for _ in range(200):  # more than its backlog: each connection is accepted and closed
            assert _connects(port)
        ports.close("w1")
        assert not _connects(port)
        assert ports.open("w1") == port  # the Node object names it: it comes back the same
        assert _connects(port)
    finally:
        ports.stop()
        server.join()
    assert not _connects(port)


@pytest.mark.slow
def test_a_node_reports_its_kubelet_port_which_dies_with_its_kubelet(
        control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    [dead, cut_off] = node_sim.add_nodes(2)
    with admin_json(control_plane) as api:
        ports = {}
        for name in (dead, cut_off):
            status = api.call("GET", f"/api/v1/nodes/{name}")["status"]
            assert {"type": "InternalIP", "address": KubeletPorts.HOST} in status["addresses"]
            ports[name] = status["daemonEndpoints"]["kubeletEndpoint"]["Port"]
            assert _connects(ports[name])
    node_sim.stop_heartbeats(dead)
    node_sim.stop_heartbeats(cut_off, port_open=True)  # alive, but cannot reach the API
    assert not _connects(ports[dead])
    assert _connects(ports[cut_off])
    node_sim.resume_heartbeats(dead)
    assert _connects(ports[dead])


@pytest.mark.slow
def test_pods_go_round_robin_to_ready_uncordoned_nodes_they_tolerate(
        control_plane: ControlPlane, k8s_namespace: str, node_sim: NodeSimulator) -> None:
    first, cordoned, last = node_sim.add_nodes(3)
    node_sim.add_nodes(1, {CONTROL_PLANE_ROLE: ""}, prefix="cp", taints=[CONTROL_PLANE_TAINT])
    with admin_json(control_plane) as api:
        api.call("PATCH", f"/api/v1/nodes/{cordoned}", patch=True,
                 body={"spec": {"unschedulable": True}})
        wait_for(lambda: cordoned not in node_sim.schedulable, 10, "the cordon to be seen")
        api.call("POST", f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments",
                 body=deployment("web", 4))
        pods = wait_for(lambda: _all_running(api, k8s_namespace, 4), 30, "4 running pods")
    assert Counter(p["spec"]["nodeName"] for p in pods) == {first: 2, last: 2}
    for pod in pods:
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"]
        assert status["started"]
        assert set(status["state"]) == {"running"}
        assert pod["status"]["podIP"]
        assert pod["status"]["hostIP"]


@pytest.mark.slow
def test_daemonset_pods_run_on_every_node_that_admits_them(
        control_plane: ControlPlane, k8s_namespace: str, node_sim: NodeSimulator) -> None:
    workers = node_sim.add_nodes(2)
    node_sim.add_nodes(1, {CONTROL_PLANE_ROLE: ""}, prefix="cp", taints=[CONTROL_PLANE_TAINT])
    with admin_json(control_plane) as api:
        api.call("PATCH", f"/api/v1/nodes/{workers[1]}", patch=True,
                 body={"spec": {"unschedulable": True}})
        manifest = deployment("agent", 0)
        manifest["kind"] = "DaemonSet"
        del manifest["spec"]["replicas"]
        api.call("POST", f"/apis/apps/v1/namespaces/{k8s_namespace}/daemonsets", body=manifest)
        pods = wait_for(lambda: _all_running(api, k8s_namespace, 2), 30, "2 daemon pods")
    assert {p["spec"]["nodeName"] for p in pods} == set(workers)


@pytest.mark.slow
def test_deleted_pods_are_finished_by_live_kubelets_only(
        control_plane: ControlPlane, k8s_namespace: str, node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(2)
    pods_path = f"/api/v1/namespaces/{k8s_namespace}/pods"
    with admin_json(control_plane) as api:
        api.call("POST", f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments",
                 body=deployment("web", 2))
        pods = wait_for(lambda: _all_running(api, k8s_namespace, 2), 30, "2 running pods")
        dead, alive = sorted(pods, key=lambda p: p["spec"]["nodeName"])
        assert dead["spec"]["nodeName"] != alive["spec"]["nodeName"]
        node_sim.stop_heartbeats(dead["spec"]["nodeName"])
        for pod in (dead, alive):  # graceful deletions (30 s), as kubectl delete does
            api.call("DELETE", f"{pods_path}/{pod['metadata']['name']}")

        def names() -> set[str]:
            return {p["metadata"]["name"] for p in _pods(api, k8s_namespace)}

        wait_for(lambda: alive["metadata"]["name"] not in names(), 10,
                 "the live kubelet to finish the deletion")
        assert dead["metadata"]["name"] in names(), "a dead kubelet finished a deletion"
        node_sim.resume_heartbeats(dead["spec"]["nodeName"])
        wait_for(lambda: dead["metadata"]["name"] not in names(), 10,
                 "the kubelet, back, to finish the deletion")


@pytest.mark.slow
def test_stopped_heartbeats_make_the_node_unknown_through_the_lifecycle_controller(
        control_plane: ControlPlane, k8s_namespace: str, node_sim: NodeSimulator) -> None:
    victim, _ = node_sim.add_nodes(2)
    grace = control_plane.node_monitor_grace
    with admin_json(control_plane) as api:
        api.call("POST", f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments",
                 body=deployment("web", 2))
        pods = wait_for(lambda: _all_running(api, k8s_namespace, 2), 30, "2 running pods")
        stopped = time.monotonic()
        node_sim.stop_heartbeats(victim)
        condition = wait_for(
            lambda: (c := _node_ready(api, victim))["status"] != "True" and c, grace + 10,
            "the node-lifecycle controller to mark the node")
        elapsed = time.monotonic() - stopped
        assert (condition["status"], condition["reason"]) == ("Unknown", "NodeStatusUnknown")
        # The last renewal was at most one heartbeat before the stop.
        assert elapsed >= grace - node_sim.heartbeat - 0.5, f"marked after only {elapsed:.1f}s"
        on_victim = next(p for p in pods if p["spec"]["nodeName"] == victim)["metadata"]["name"]
        wait_for(lambda: not _ready(api.call(
            "GET", f"/api/v1/namespaces/{k8s_namespace}/pods/{on_victim}")), 10,
            "the controller to mark the dead node's pod not ready")
        taints = api.call("GET", f"/api/v1/nodes/{victim}")["spec"].get("taints", [])
        assert {"node.kubernetes.io/unreachable"} <= {t["key"] for t in taints}

        node_sim.resume_heartbeats(victim)
        wait_for(lambda: _node_ready(api, victim)["status"] == "True", 10, "Ready again")
        wait_for(lambda: _ready(api.call(
            "GET", f"/api/v1/namespaces/{k8s_namespace}/pods/{on_victim}")), 10,
            "the kubelet, back, to report its pod ready again")


@pytest.mark.slow
def test_a_crashlooping_pod_restarts_again_and_again_and_is_not_ready(
        control_plane: ControlPlane, k8s_namespace: str, node_sim: NodeSimulator) -> None:
    node_sim.add_nodes(1)
    with admin_json(control_plane) as api:
        api.call("POST", f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments",
                 body=deployment("web", 1))
        (pod,) = wait_for(lambda: _all_running(api, k8s_namespace, 1), 30, "a running pod")
        name = pod["metadata"]["name"]
        node_sim.crashloop(k8s_namespace, name)
        path = f"/api/v1/namespaces/{k8s_namespace}/pods/{name}"

        def restarts(at_least: int) -> Obj | None:
            current = api.call("GET", path)
            (status,) = current["status"]["containerStatuses"]
            return current if status["restartCount"] >= at_least else None

        wait_for(lambda: restarts(1), 5 * node_sim.crash_every, "a first restart")
        crashing = wait_for(lambda: restarts(3), 10 * node_sim.crash_every, "more restarts")
    (status,) = crashing["status"]["containerStatuses"]
    assert status["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert set(status["state"]) == {"waiting"}
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert not status["ready"]
    assert not _ready(crashing)
    assert crashing["status"]["phase"] == "Running"


@pytest.mark.slow
def test_stop_joins_every_thread_and_can_remove_what_it_made(
        control_plane: ControlPlane, k8s_namespace: str) -> None:
    before = set(threading.enumerate())
    with admin_json(control_plane) as api:
        sim = NodeSimulator(control_plane.admin_kubeconfig).start()
        nodes = sim.add_nodes(2, prefix="doomed")
        api.call("POST", f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments",
                 body=deployment("web", 2))
        wait_for(lambda: _all_running(api, k8s_namespace, 2), 30, "2 running pods")
        sim.stop(remove_nodes=True)
        assert set(threading.enumerate()) <= before
        node_names = {n["metadata"]["name"] for n in api.call("GET", "/api/v1/nodes")["items"]}
        assert not node_names & set(nodes)
        leases = api.call("GET", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}"
                                 "/leases")["items"]
        assert not {lease["metadata"]["name"] for lease in leases} & set(nodes)
        assert not [p for p in _pods(api, k8s_namespace) if p["spec"].get("nodeName") in nodes]

