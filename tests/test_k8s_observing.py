"""The Kubernetes observer: list then watch into a cache the tick reads, and its failures.

Unit tests drive one watcher step at a time against hand-written stand-ins for the
client's list calls (the real ``kubernetes.watch.Watch`` parses their streams); the
tests marked slow run the threads against the real API server of ``tests/k8s.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException
from structlog.testing import capture_logs

from bus.messages import Target
from lab.controlplane import ControlPlane
from lab.nodesim import NodeSimulator
from runtime.agent.loop import Agent
from runtime.agent.wiring import build
from runtime.config.loading import load
from runtime.core.ports import Observed
from runtime.host.observing import ApiserverObserver, host_observers
from runtime.kube.client import load_client
from runtime.kube.observing import (
    RESOURCES,
    Cache,
    KubernetesObserver,
    WatchTiming,
    endpoints,
    event_obs,
    node_obs,
    pod_obs,
)
from runtime.model.snapshot import (
    ApiProbe,
    ContainerObs,
    EventObs,
    NodeCondition,
    NodeObs,
    PodObs,
    Resources,
    SourceStatus,
)
from tests.builders import T0, at
from tests.conftest import REPO
from tests.k8s import admin_json, deployment

URL = "https://api.test:6443"
TIMING = WatchTiming(backoff=(0.5, 1.0, 2.0), page_size=2)
STALE = 10.0

JSON = dict[str, Any]
T = TypeVar("T")


# ---------------------------------------------------------------- objects, as the API sends them


def node_json(name: str, ready: str = "True", *, rv: str = "1", **extra: Any) -> JSON:
    return {"metadata": {"name": name, "resourceVersion": rv, **extra},
            "spec": {}, "status": {"conditions": [
                {"type": "Ready", "status": ready, "reason": "KubeletReady",
                 "lastTransitionTime": "2026-11-27T06:00:00Z",
                 "lastHeartbeatTime": "2026-11-27T06:00:00Z"}]}}


def lease_json(node: str, renewed: str = "2026-11-27T06:00:05.250000Z") -> JSON:
    return {"metadata": {"name": node, "namespace": "kube-node-lease", "resourceVersion": "1"},
            "spec": {"holderIdentity": node, "renewTime": renewed}}


def owner(kind: str, name: str) -> JSON:
    return {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": True}


def pod_json(name: str, namespace: str = "web", *, owned_by: JSON | None = None,
             node: str | None = "worker-1", phase: str = "Running",
             containers: Sequence[JSON] = ()) -> JSON:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                         "ownerReferences": [owned_by] if owned_by else []},
            "spec": {"nodeName": node} if node else {},
            "status": {"phase": phase, "containerStatuses": list(containers)}}


def replicaset_json(name: str, deployment: str | None, namespace: str = "web") -> JSON:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                         "ownerReferences": [owner("Deployment", deployment)] if deployment
                         else []}}


def event(kind: str, obj: JSON) -> JSON:
    return {"type": kind, "object": obj}


def bookmark(rv: str) -> JSON:
    return {"type": "BOOKMARK", "object": {"kind": "Node", "metadata": {"resourceVersion": rv}}}


def gone(rv: str) -> JSON:
    return {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "code": 410, "reason": "Expired",
                                        "message": f"too old resource version: {rv} (90)"}}


# ---------------------------------------------------------------- the stand-in API


class Response:
    """What the client returns with ``_preload_content=False``: a body, or a line stream."""

    status = 200

    def __init__(self, body: bytes) -> None:
        self.data = body
        self.released = False

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        yield self.data

    def release_conn(self) -> None:
        self.released = True

    def close(self) -> None:
        self.released = True


class Collection:
    """A stand-in for one ``list_*`` method: paged lists of ``items``, scripted watches.

    Each watch call takes the next script: a list of events (the stream then ends, as
    at the server's timeout) or an exception to raise. ``fail`` makes every call raise.
    """

    def __init__(self, items: Sequence[JSON] = (), rv: str = "10") -> None:
        self.items = list(items)
        self.rv = rv
        self.watches: list[list[JSON] | BaseException] = []
        self.fail: Exception | None = None
        self.lists = 0
        self.watched_from: list[str] = []
        self.responses: list[Response] = []

    def __call__(self, **kwargs: Any) -> Response:
        if self.fail is not None:
            raise self.fail
        if kwargs.get("watch"):
            self.watched_from.append(kwargs["resource_version"])
            script = self.watches.pop(0) if self.watches else []
            if isinstance(script, BaseException):
                raise script
            body = b"".join(json.dumps(e).encode() + b"\n" for e in script)
        else:
            start = int(kwargs.get("_continue") or 0)
            if start == 0:
                self.lists += 1
            end = start + kwargs["limit"]
            more = end < len(self.items)
            body = json.dumps({"metadata": {"resourceVersion": self.rv,
                                            **({"continue": str(end)} if more else {})},
                               "items": self.items[start:end]}).encode()
        self.responses.append(Response(body))
        return self.responses[-1]


class Cluster:
    """One Collection per watched resource, and an observer wired to them."""

    def __init__(self, **items: Sequence[JSON]) -> None:
        self.collections = {r.name: Collection(items.get(r.name, ())) for r in RESOURCES}
        self.now = T0
        self.observer = KubernetesObserver(self.collections, url=URL, stale_after=STALE,
                                           timing=TIMING, autostart=False,
                                           wall=lambda: self.now)

    def __getitem__(self, resource: str) -> Collection:
        return self.collections[resource]

    def step(self, *resources: str) -> dict[str, float]:
        """One step of each named watcher (all by default); the delay each asked for."""
        names = resources or tuple(self.collections)
        return {name: self.observer.watchers[name].step() for name in names}

    def fail(self, error: Exception | None) -> None:
        for collection in self.collections.values():
            collection.fail = error


def refused() -> Exception:
    cause = ConnectionRefusedError(111, "Connection refused")
    error = urllib3.exceptions.NewConnectionError(
        urllib3.connection.HTTPSConnection("api.test", 6443),
        "Failed to establish a new connection: [Errno 111] Connection refused")
    error.__cause__ = cause
    return error


def http_error(status: int, reason: str, message: str) -> ApiException:
    error = ApiException(status=status, reason=reason)
    error.body = json.dumps({"kind": "Status", "code": status, "message": message})
    return error


async def observe(cluster: Cluster, now: datetime | None = None) -> tuple[JSON, SourceStatus]:
    observed = await cluster.observer.observe(now or cluster.now)
    return dict(observed.data), observed.status


# ---------------------------------------------------------------- conversion


def test_a_node_keeps_only_what_detectors_read() -> None:
    obj = node_json("worker-1", "False", labels={"pool": "a"}, annotations={
        "zeta-agent/repair": "r-1",
        "kubectl.kubernetes.io/last-applied-configuration": "{…the whole node…}"})
    obj["spec"]["unschedulable"] = True
    obs = node_obs(obj, heartbeat=at(5))
    assert obs == NodeObs(
        name="worker-1", labels={"pool": "a"}, annotations={"zeta-agent/repair": "r-1"},
        unschedulable=True, heartbeat=at(5),
        conditions=(NodeCondition(type="Ready", status="False", reason="KubeletReady",
                                  since=T0),))
    # Built without validation for memory's sake, so prove it is what validation builds.
    assert NodeObs.model_validate(obs.model_dump()) == obs


def test_a_pod_keeps_its_containers_and_only_regular_ones() -> None:
    obj = pod_json("web-1", containers=[
        {"name": "app", "restartCount": 7, "ready": False,
         "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
        {"name": "proxy", "restartCount": 0, "ready": True, "state": {"running": {}}}])
    obj["status"]["initContainerStatuses"] = [
        {"name": "init", "restartCount": 0, "ready": False, "state": {"terminated": {}}}]
    obs = pod_obs(obj, owner=None)
    assert obs == PodObs(namespace="web", name="web-1", node="worker-1", phase="Running",
                         containers=(ContainerObs(name="app", restarts=7, ready=False,
                                                  waiting_reason="CrashLoopBackOff"),
                                     ContainerObs(name="proxy", restarts=0, ready=True)))
    assert PodObs.model_validate(obs.model_dump()) == obs
    pending = pod_obs(pod_json("web-2", node=None, phase=""), owner=None)
    assert (pending.node, pending.phase, pending.containers) == (None, "Pending", ())
    # The node controller's word on a pod of a dead node: its Ready condition.
    obj["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"},
                                   {"type": "Ready", "status": "False"}]
    assert pod_obs(obj, owner=None).ready is False
    obj["status"]["conditions"][1]["status"] = "True"
    assert pod_obs(obj, owner=None).ready is True


def test_requests_allocatable_and_labels_are_read_as_the_scheduler_counts_them() -> None:
    """Requests are the containers' sum or the largest init container's, plus overhead;
    an amount the API server would have refused counts as nothing, never as a crash."""
    obj = pod_json("web-1")
    obj["metadata"]["labels"] = {"app": "web", "zeta-agent/opt-out": "true"}
    obj["spec"].update({
        "containers": [{"name": "app", "resources": {"requests": {"cpu": "250m",
                                                                  "memory": "128Mi"}}},
                       {"name": "proxy", "resources": {"requests": {"cpu": "0.5"}}},
                       {"name": "bare"}],
        "initContainers": [{"name": "init", "resources": {"requests": {"memory": "1Gi",
                                                                       "cpu": "bogus"}}}],
        "overhead": {"cpu": "10m"}})
    obs = pod_obs(obj, owner=None)
    assert obs.requests == Resources(cpu_millis=760, memory_bytes=2**30)
    assert obs.labels == {"app": "web", "zeta-agent/opt-out": "true"}
    assert PodObs.model_validate(obs.model_dump()) == obs
    twin = pod_obs({**obj, "metadata": {**obj["metadata"], "name": "web-2"}}, owner=None)
    assert twin.labels is obs.labels  # one mapping per distinct label set
    node = node_json("worker-1")
    node["status"]["allocatable"] = {"cpu": "7500m", "memory": "31Gi", "pods": "110"}
    assert node_obs(node).allocatable == Resources(cpu_millis=7500, memory_bytes=31 * 2**30)
    assert node_obs(node_json("worker-2")).allocatable is None


def test_pods_are_owned_by_their_top_level_workload() -> None:
    cluster = Cluster(
        replicasets=[replicaset_json("web-7d4b9", "web"), replicaset_json("bare", None)],
        pods=[pod_json("web-7d4b9-x", owned_by=owner("ReplicaSet", "web-7d4b9")),
              pod_json("db-0", owned_by=owner("StatefulSet", "db")),
              pod_json("agent-q", owned_by=owner("DaemonSet", "agent")),
              pod_json("migrate-z", owned_by=owner("Job", "migrate")),
              pod_json("bare-k", owned_by=owner("ReplicaSet", "bare")),
              pod_json("lonely")])
    cluster.step("replicasets", "pods")
    owners = {p.name: p.owner for p in cluster.observer.cache.pods.values()}
    assert owners == {
        "web-7d4b9-x": Target(kind="deployment", namespace="web", name="web"),
        "db-0": Target(kind="statefulset", namespace="web", name="db"),
        "agent-q": Target(kind="daemonset", namespace="web", name="agent"),
        "migrate-z": None, "bare-k": None, "lonely": None}


def test_a_pod_seen_before_its_replicaset_is_resolved_when_the_replicaset_arrives() -> None:
    cluster = Cluster(pods=[pod_json("api-5f-a", owned_by=owner("ReplicaSet", "api-5f")),
                            pod_json("api-5f-b", owned_by=owner("ReplicaSet", "api-5f"))])
    cluster.step("pods")  # the pod stream got there first
    assert {p.owner for p in cluster.observer.cache.pods.values()} == {None}
    cluster["replicasets"].watches = [[event("ADDED", replicaset_json("api-5f", "api"))]]
    cluster.step("replicasets")  # its list is empty; the ReplicaSet arrives by the watch
    assert {p.owner for p in cluster.observer.cache.pods.values()} == {
        Target(kind="deployment", namespace="web", name="api")}


def event_json(name: str, about: JSON, reason: str = "BackOff", message: str = "restarting",
               *, namespace: str = "web", seen: str = "2026-11-27T06:00:05Z",
               count: int | None = 4) -> JSON:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "7"},
            "involvedObject": about, "reason": reason, "message": message, "type": "Warning",
            "lastTimestamp": seen, **({"count": count} if count is not None else {})}


def test_an_event_keeps_what_it_is_about_and_a_bounded_message() -> None:
    obs = event_obs(event_json("web-1.17", {"kind": "Pod", "namespace": "web", "name": "web-1"},
                               message="Back-off restarting failed container app"))
    assert obs == EventObs(namespace="web", object="Pod/web-1", reason="BackOff",
                           message="Back-off restarting failed container app", count=4,
                           last_seen=at(5))
    assert obs.line() == "BackOff: Back-off restarting failed container app (x4)"
    assert EventObs.model_validate(obs.model_dump()) == obs
    # A Node's event is stored in "default", the Node in no namespace; an event written
    # through events.k8s.io has no lastTimestamp or count, only its series.
    node = event_json("w1.18", {"kind": "Node", "name": "w1"}, "NodeNotReady", "x" * 5000,
                      namespace="default", count=None)
    del node["lastTimestamp"]
    node["series"] = {"count": 9, "lastObservedTime": "2026-11-27T06:00:09.000000Z"}
    obs = event_obs(node)
    assert (obs.namespace, obs.object, obs.count, obs.last_seen) == ("", "Node/w1", 9, at(9))
    assert len(obs.message) == 300
    assert obs.message.endswith("…")


def test_an_event_storm_keeps_only_the_latest_events() -> None:
    cache = Cache()
    storm = [event_json(f"e{i}", {"kind": "Pod", "namespace": "web", "name": f"p{i}"},
                        seen=f"2026-11-27T{6 + i // 3600:02}:{i // 60 % 60:02}:{i % 60:02}Z")
             for i in range(Cache.MAX_EVENTS + 500)]
    cache.update("events", reversed(storm))  # oldest last: the order must not matter
    assert len(cache.events) == Cache.MAX_EVENTS
    kept = sorted(k[1] for k in cache.events)
    assert kept == sorted(f"e{i}" for i in range(500, Cache.MAX_EVENTS + 500))


def test_the_cache_stays_small_per_pod() -> None:
    # The benchmark's 150,000 pods must fit an agent in 300 MB with the rest of it.
    pods = [pod_json(f"app-{i // 30}-5f7c9-{i % 30:05d}", f"ns-{i // 3000}",
                     owned_by=owner("ReplicaSet", f"app-{i // 30}-5f7c9"), node=f"w-{i // 30}",
                     containers=[{"name": "app", "restartCount": 0, "ready": True,
                                  "state": {"running": {}}}])
            for i in range(6000)]
    replicasets = [replicaset_json(f"app-{i}-5f7c9", f"app-{i}", f"ns-{i // 100}")
                   for i in range(200)]
    cluster = Cluster()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cluster.observer.cache.update("replicasets", replicasets)
        cluster.observer.cache.update("pods", pods)
        per_pod = (tracemalloc.get_traced_memory()[0] - before) / len(pods)
    finally:
        tracemalloc.stop()
    assert len(cluster.observer.cache.pods) == 6000
    assert per_pod < 700, f"{per_pod:.0f} bytes per cached pod"


# ---------------------------------------------------------------- list, then watch


async def test_the_tick_sees_the_list_then_watch_events_without_listing_again() -> None:
    cluster = Cluster(nodes=[node_json("worker-1"), node_json("worker-2"), node_json("worker-3")],
                      leases=[lease_json("worker-1")])
    cluster["nodes"].watches = [
        [event("MODIFIED", node_json("worker-1", "Unknown", rv="11")),
         event("DELETED", node_json("worker-3", rv="12")),
         bookmark("15")],
        [event("ADDED", node_json("worker-4", rv="16"))]]
    cluster["leases"].watches = [[event("MODIFIED", lease_json("worker-2",
                                                               "2026-11-27T06:00:09Z"))]]
    cluster.step()
    cluster.step("nodes")
    data, status = await observe(cluster)
    nodes = {n.name: n for n in data["nodes"]}
    assert sorted(nodes) == ["worker-1", "worker-2", "worker-4"]
    assert nodes["worker-1"].condition("Ready") == NodeCondition(
        type="Ready", status="Unknown", reason="KubeletReady", since=T0)
    assert (nodes["worker-1"].heartbeat, nodes["worker-2"].heartbeat) == (at(5.25), at(9))
    assert data["pods"] == ()
    assert status == SourceStatus(ok=True, detail="3 nodes; 0 pods; 0 warning events; "
                                                  "0 disruption budgets; lists: nodes 1, "
                                                  "leases 1, replicasets 1, pods 1, events 1, "
                                                  "poddisruptionbudgets 1")
    # Each watch resumes where the last one ended: the list, then the bookmark.
    assert cluster["nodes"].watched_from == ["10", "15"]
    assert cluster["nodes"].lists == 1
    assert all(r.released for c in cluster.collections.values() for r in c.responses)


def test_lists_are_paged() -> None:
    cluster = Cluster(nodes=[node_json(f"worker-{i}") for i in range(5)])
    cluster.step("nodes")
    assert [json.loads(r.data)["metadata"].get("continue") for r in cluster["nodes"].responses
            if b"items" in r.data] == ["2", "4", None]
    assert len(cluster.observer.cache.nodes) == 5


async def test_an_expired_resource_version_lists_again_and_forgets_what_is_gone() -> None:
    cluster = Cluster(nodes=[node_json("worker-1"), node_json("worker-2")])
    cluster.step()
    cluster["nodes"].watches = [[gone("10")]]
    cluster["nodes"].items = [node_json("worker-2"), node_json("worker-5")]
    cluster["nodes"].rv = "90"
    with capture_logs() as logs:
        assert cluster.step("nodes") == {"nodes": 0.0}  # no backoff: listing is the cure
        cluster.step("nodes")
    assert [e["event"] for e in logs] == ["resourceVersion expired; listing again"]
    assert "too old resource version: 10" in logs[0]["detail"]
    assert cluster.observer.lists()["nodes"] == cluster["nodes"].lists == 2
    assert cluster["nodes"].watched_from == ["10", "10", "90"]
    data, status = await observe(cluster)
    assert sorted(n.name for n in data["nodes"]) == ["worker-2", "worker-5"]
    assert status.ok


# ---------------------------------------------------------------- failures


async def test_nothing_is_shown_before_the_first_list() -> None:
    cluster = Cluster()
    data, status = await observe(cluster)
    assert data == {}
    assert not status.ok
    assert status.detail.startswith("nodes: first list in progress; leases: first list")
    assert "nodes, pods, events and budgets not observed" in status.detail
    assert await cluster.observer.probes() == ()


async def test_an_unreachable_api_server_is_reported_with_the_request_tried() -> None:
    cluster = Cluster(nodes=[node_json("worker-1")])
    cluster.fail(refused())
    with capture_logs() as logs:
        delays = [cluster.step("nodes")["nodes"] for _ in range(4)]
    assert delays == [0.5, 1.0, 2.0, 2.0]
    assert [e["event"] for e in logs] == [
        "attempt #1 failed; will retry in 0.5s", "attempt #2 failed; will retry in 1s",
        "attempt #3 failed; will retry in 2s", "attempt #4 failed; will retry in 2s"]
    assert logs[0]["error"] == f"GET {URL}/api/v1/nodes: Connection refused"
    assert "exc_info" not in logs[0]  # an expected failure, not a bug: no traceback
    data, status = await observe(cluster, at(3))
    assert "nodes" not in data
    assert not status.ok
    assert f"GET {URL}/api/v1/nodes: Connection refused (attempt #4, failing for 3s)" \
        in status.detail
    assert await cluster.observer.probes() == (ApiProbe(
        path=f"api-client {URL}", ok=False, error=f"GET {URL}/api/v1/nodes: Connection refused"),)


async def test_cached_data_is_withheld_once_the_watch_has_failed_for_too_long() -> None:
    cluster = Cluster(nodes=[node_json("worker-1")], pods=[pod_json("web-1")])
    cluster.step()
    cluster.now = at(30)
    cluster["nodes"].watches = [refused()]
    cluster.step("nodes")  # the list is fine, then the watch fails
    data, status = await observe(cluster, at(30 + STALE - 1))
    assert [n.name for n in data["nodes"]] == ["worker-1"]  # recent enough to show
    assert not status.ok
    assert f"GET {URL}/api/v1/nodes?watch=1: Connection refused" in status.detail
    data, status = await observe(cluster, at(30 + STALE))
    assert "nodes" not in data
    assert [p.name for p in data["pods"]] == ["web-1"]  # its own streams are fine
    assert status.detail.endswith(
        f"nodes not observed: no fresh list and watch within {STALE:g}s; 1 pods; "
        "0 warning events; 0 disruption budgets; lists: nodes 1, leases 1, replicasets 1, "
        "pods 1, events 1, poddisruptionbudgets 1")
    with capture_logs() as logs:
        cluster.step("nodes")  # the server is back: a list, not a resumed watch
    assert [(e["event"], e["after_attempts"]) for e in logs] == [("watch recovered", 1)]
    data, status = await observe(cluster, at(60))
    assert [n.name for n in data["nodes"]] == ["worker-1"]
    assert status.ok
    assert cluster.observer.lists()["nodes"] == 2
    assert await cluster.observer.probes() == (ApiProbe(path=f"api-client {URL}", ok=True),)


async def test_a_refusal_is_a_failing_source_but_a_reachable_server() -> None:
    cluster = Cluster()
    cluster.fail(http_error(403, "Forbidden", 'nodes is forbidden: User "zeta-vera" cannot '
                                              'list resource "nodes"'))
    cluster.step()
    data, status = await observe(cluster)
    assert data == {}
    assert (f'GET {URL}/api/v1/nodes: HTTP 403 Forbidden: nodes is forbidden: User '
            f'"zeta-vera" cannot list resource "nodes"') in status.detail
    assert await cluster.observer.probes() == (ApiProbe(path=f"api-client {URL}", ok=True),)
    cluster.fail(http_error(503, "Service Unavailable", "etcd is unavailable"))
    cluster.step("pods")
    assert await cluster.observer.probes() == (ApiProbe(
        path=f"api-client {URL}", ok=False,
        error=f"GET {URL}/api/v1/pods: HTTP 503 Service Unavailable: etcd is unavailable"),)


@pytest.mark.parametrize(("error", "said", "down"), [
    (refused(), "Connection refused", True),
    (urllib3.exceptions.ConnectTimeoutError(
        urllib3.connection.HTTPSConnection("api.test", 6443), "timed out (connect timeout=3)"),
     "connect timed out", True),
    (urllib3.exceptions.ReadTimeoutError(None, "/api/v1/nodes", "Read timed out."),  # type: ignore[arg-type]
     "read timed out", True),
    (urllib3.exceptions.ProtocolError(
        "Connection aborted.", http.client.RemoteDisconnected("Remote end closed connection")),
     "Connection aborted: Remote end closed connection", True),
    (urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError(104, "Connection reset by peer")),
     "Connection reset by peer", True),
    (ApiException(status=0, reason="SSLError\n[SSL: CERTIFICATE_VERIFY_FAILED] verify failed"),
     "SSLError: [SSL: CERTIFICATE_VERIFY_FAILED] verify failed", True),
    (http_error(500, "Internal Server Error", "etcdserver: request timed out"),
     "HTTP 500 Internal Server Error: etcdserver: request timed out", True),
    (http_error(429, "Too Many Requests", "too many requests"),
     "HTTP 429 Too Many Requests: too many requests", False),
    (ApiException(status=401, reason="Unauthorized"), "HTTP 401 Unauthorized", False),
])
async def test_failures_are_described_and_told_apart(error: Exception, said: str,
                                                     down: bool) -> None:
    cluster = Cluster()
    cluster["pods"].fail = error
    cluster.step("pods")
    assert cluster.observer.watchers["pods"].state.error == f"GET {URL}/api/v1/pods: {said}"
    [probe] = await cluster.observer.probes()
    assert probe.ok is not down  # whether the server answered at all


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_watch_thread_that_died_is_not_taken_for_a_quiet_watch() -> None:
    cluster = Cluster(nodes=[node_json("worker-1")])
    cluster["nodes"].watches = [SystemExit()]  # past `except Exception`: ends the thread
    # Listed, then failing (and backing off) since just now: still fresh.
    cluster["leases"].watches = [refused() for _ in range(100)]
    cluster["replicasets"].fail = cluster["pods"].fail = refused()  # back off, not spin
    observer = cluster.observer
    observer.start()
    try:
        for watcher in observer.watchers.values():
            assert watcher.settled.wait(5)
        observer.threads["nodes"].join(5)
        data, status = await observe(cluster)
    finally:
        assert observer.stop() == ()
    assert observer.watchers["nodes"].state.synced  # its last word was "all fine"
    assert "nodes" not in data
    assert status.detail.startswith("nodes: the watch thread has died; ")


async def test_a_bug_while_converting_is_logged_with_its_traceback_and_retried() -> None:
    cluster = Cluster(nodes=[{"metadata": {}}])  # no name: the converter raises
    with capture_logs() as logs:
        assert cluster.step("nodes") == {"nodes": 0.5}
    assert logs[0]["error"] == f"GET {URL}/api/v1/nodes: KeyError: 'name'"
    assert isinstance(logs[0]["exc_info"], KeyError)


# ---------------------------------------------------------------- the apiserver domain


async def test_the_apiserver_observer_carries_the_client_path() -> None:
    cluster = Cluster()
    cluster.fail(refused())
    cluster.step("pods")
    apiserver = ApiserverObserver((), clients=[cluster.observer])
    observed = await apiserver.observe(T0)
    assert observed.data["apiserver"] == (ApiProbe(
        path=f"api-client {URL}", ok=False, error=f"GET {URL}/api/v1/pods: Connection refused"),)
    assert observed.status == SourceStatus(ok=True, detail="0 of 1 paths reachable")


def test_a_kubernetes_client_alone_brings_the_apiserver_observer(tmp_path: Path) -> None:
    config = load([REPO / "personas", REPO / "policies"])
    fleet = config.fleet.model_copy(update={
        "spec": config.fleet.spec.model_copy(update={"apiservers": ()})})
    assert [o.name for o in host_observers((), fleet, tmp_path, node="n",
                                           explicit_node=False)] == ["health", "kubelet"]
    observers = host_observers((), fleet, tmp_path, node="n", explicit_node=False,
                               clients=[Cluster().observer])
    assert [o.name for o in observers] == ["health", "kubelet", "apiserver"]


# ---------------------------------------------------------------- the agent's wiring

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: lab, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: otto, user: {token: not-a-secret}}]
contexts: [{name: lab, context: {cluster: lab, user: otto}}]
current-context: lab
"""


def _build(tmp_path: Path, kubeconfig: str | None
           ) -> tuple[Agent, list[MutableMapping[str, Any]]]:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    if kubeconfig is not None:
        (credentials / "kubeconfig").write_text(kubeconfig)
    config = load([REPO / "personas", REPO / "policies"])
    with capture_logs() as logs:
        agent = build(config, "otto", state_dir=tmp_path / "state",
                      environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    return agent, logs


def test_an_agent_with_a_kubeconfig_observes_kubernetes(tmp_path: Path) -> None:
    agent, logs = _build(tmp_path, KUBECONFIG)
    observers = {o.name: o for o in agent.observing.observers}
    kubernetes = observers["kubernetes"]
    assert isinstance(kubernetes, KubernetesObserver)
    assert kubernetes.url == "https://127.0.0.1:1"
    assert kubernetes.stale_after == 2 * agent.timing.tick
    apiserver = observers["apiserver"]
    assert isinstance(apiserver, ApiserverObserver)
    assert apiserver.clients == (kubernetes,)
    assert "nodes" not in agent.observing.unobserved
    [starting] = [e for e in logs if e["event"] == "starting"]
    assert starting["kubernetes"] == "https://127.0.0.1:1"
    assert kubernetes.stop() == ()  # never started: build() sends nothing


def test_an_agent_without_a_kubeconfig_says_so_once(tmp_path: Path) -> None:
    agent, logs = _build(tmp_path, None)
    assert "kubernetes" not in [o.name for o in agent.observing.observers]
    assert agent.observing.unobserved[:2] == ("nodes", "pods")
    said = [e["kubernetes"] for e in logs if "kubernetes" in e]
    assert said == [f"not observed: no usable kubeconfig at {tmp_path}/credentials/kubeconfig"]
    assert [e for e in logs if e["log_level"] == "error" and "kube" in e["event"].lower()] == []


def test_an_unusable_kubeconfig_is_an_error_not_a_crash(tmp_path: Path) -> None:
    agent, logs = _build(tmp_path, "apiVersion: v1\nkind: Config\ncurrent-context: gone\n")
    assert "kubernetes" not in [o.name for o in agent.observing.observers]
    said = [e for e in logs if e["event"] == "Kubernetes not observed: the kubeconfig is unusable"]
    assert len(said) == 1
    assert said[0]["log_level"] == "error"
    assert str(tmp_path / "credentials" / "kubeconfig") in said[0]["error"]
    [starting] = [e for e in logs if e["event"] == "starting"]
    assert starting["kubernetes"].startswith("not observed: no usable kubeconfig")


# ---------------------------------------------------------------- against a real API server

REAL_TIMING = WatchTiming(backoff=(0.2, 0.5, 1.0), watch_timeout=3)
"""Short watches, so a test sees the next one start within seconds."""
TICK = 1.0


class Counted:
    """A real list call that counts what it sends to the server: lists and watches.

    ``expire_next_watch(rv)`` starts the next watch from ``rv`` instead: a
    resourceVersion the server has forgotten, as after a restart or a compaction.
    """

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.lists = 0
        self.watches = 0
        self._expired: str | None = None

    def expire_next_watch(self, rv: str) -> None:
        self._expired = rv

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("watch"):
            self.watches += 1
            if self._expired is not None:
                kwargs["resource_version"], self._expired = self._expired, None
        elif not kwargs.get("_continue"):
            self.lists += 1
        return self.call(*args, **kwargs)


@contextlib.contextmanager
def watching(plane: ControlPlane, *, stale_after: float = 2 * TICK
             ) -> Iterator[tuple[KubernetesObserver, dict[str, Counted]]]:
    """An observer of the real cluster (as its admin) whose requests are counted."""
    api = load_client(plane.admin_kubeconfig)
    calls = {name: Counted(call) for name, call in endpoints(api).items()}
    observer = KubernetesObserver(calls, url=plane.url, stale_after=stale_after,
                                  timing=REAL_TIMING, close=api.close)
    try:
        yield observer, calls
    finally:
        stuck = observer.stop()
    assert stuck == (), "watch threads did not stop"


async def until(observer: KubernetesObserver, check: Callable[[Observed], T | None],
                within: float, what: str) -> T:
    """Observe every 0.1 s until ``check`` returns something; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        observed = await observer.observe(datetime.now(UTC))
        if (value := check(observed)) is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}; "
                        f"last status: {observed.status.detail}")
        await asyncio.sleep(0.1)


def nodes_named(observed: Observed, names: Sequence[str]) -> dict[str, NodeObs] | None:
    """The named nodes, if the snapshot has nodes and all of them."""
    nodes = {n.name: n for n in observed.data.get("nodes") or () if n.name in names}
    return nodes if len(nodes) == len(names) else None


def node_in(observed: Observed, name: str, ready_when: Callable[[str], bool]) -> NodeObs | None:
    """The named node, if the snapshot has it and its Ready status passes ``ready_when``."""
    node = next((n for n in observed.data.get("nodes") or () if n.name == name), None)
    return node if node is not None and ready_when(ready(node)) else None


def ready(node: NodeObs) -> str:
    condition = node.condition("Ready")
    return condition.status if condition is not None else "not reported"


def list_counts(calls: Mapping[str, Counted]) -> dict[str, int]:
    return {name: call.lists for name, call in calls.items()}


ONE_LIST_EACH = {"nodes": 1, "leases": 1, "replicasets": 1, "pods": 1, "events": 1,
                 "poddisruptionbudgets": 1}


@pytest.mark.slow
async def test_nodes_and_pods_appear_as_the_simulator_creates_them(
        control_plane: ControlPlane, node_sim: NodeSimulator, k8s_namespace: str) -> None:
    with watching(control_plane) as (observer, calls):
        first = await observer.observe(datetime.now(UTC))
        assert first.status.ok, first.status.detail  # the first lists were awaited
        names = node_sim.add_nodes(2, {"pool": "observed"})
        with admin_json(control_plane) as api:
            api.call("POST", f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments",
                     body=deployment("web", 3))
        web = Target(kind="deployment", namespace=k8s_namespace, name="web")

        def settled(observed: Observed) -> tuple[dict[str, NodeObs], list[PodObs]] | None:
            nodes = nodes_named(observed, names)
            pods = [p for p in observed.data.get("pods") or () if p.namespace == k8s_namespace]
            if nodes is None or any(ready(n) != "True" or n.heartbeat is None
                                    for n in nodes.values()):
                return None
            if len(pods) != 3 or any(p.phase != "Running" or not p.containers
                                     or not all(c.ready for c in p.containers) for p in pods):
                return None
            return nodes, pods

        nodes, pods = await until(observer, settled, 30, "2 Ready nodes and web's 3 pods running")
        assert all(n.labels["pool"] == "observed" for n in nodes.values())
        assert {p.owner for p in pods} == {web}
        assert {p.node for p in pods} <= set(names)
        assert list_counts(calls) == ONE_LIST_EACH


@pytest.mark.slow
async def test_warning_events_are_watched_and_normal_ones_never_fetched(
        control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    [name] = node_sim.add_nodes(1)

    def post(kind: str, reason: str, message: str) -> None:
        # Events about cluster-scoped objects must live in "default", as the kubelet's do.
        api.call("POST", "/api/v1/namespaces/default/events", body={
            "metadata": {"generateName": f"{name}."}, "type": kind, "reason": reason,
            "message": message, "involvedObject": {"kind": "Node", "name": name},
            "source": {"component": "kubelet"}, "count": 1,
            "lastTimestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")})

    with watching(control_plane) as (observer, calls), admin_json(control_plane) as api:
        post("Normal", "Starting", "Starting kubelet.")
        post("Warning", "ContainerGCFailed", "rpc error: connection refused")
        post("Normal", "NodeReady", "Node is ready")

        def mine(observed: Observed) -> list[EventObs] | None:
            events = [e for e in observed.data.get("events") or () if e.object == f"Node/{name}"]
            return events or None

        [warning] = await until(observer, mine, 20, "the Warning event")
        assert (warning.namespace, warning.reason) == ("", "ContainerGCFailed")
        post("Warning", "Rebooted", "Node rebooted")
        events = await until(observer, lambda o: (e if len(e := mine(o) or []) == 2 else None),
                             20, "the second Warning, by the watch")
        assert {e.reason for e in events} == {"ContainerGCFailed", "Rebooted"}
        assert list_counts(calls) == ONE_LIST_EACH


@pytest.mark.slow
async def test_a_silent_node_goes_not_ready_within_the_grace_period_without_a_list(
        control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    with watching(control_plane) as (observer, calls):
        [name] = node_sim.add_nodes(1)
        await until(observer, lambda o: node_in(o, name, lambda s: s == "True"), 20,
                    f"{name} Ready")
        node_sim.stop_heartbeats(name)
        silent = time.monotonic()
        # The node-lifecycle controller gives the kubelet its grace period, checking
        # every second; the observer must then show it by the next tick.
        allowed = control_plane.node_monitor_grace + 1.0 + TICK
        node = await until(observer, lambda o: node_in(o, name, lambda s: s != "True"),
                           allowed + 5, f"{name} NotReady")
        took = time.monotonic() - silent
        assert took <= allowed, f"NotReady after {took:.1f}s, allowed {allowed:.1f}s"
        condition = node.condition("Ready")
        assert condition is not None
        assert (condition.status, condition.reason) == ("Unknown", "NodeStatusUnknown")
        assert node.heartbeat is not None
        assert list_counts(calls) == ONE_LIST_EACH  # all of it came by the watches
        assert calls["nodes"].watches >= 1


@pytest.mark.slow
async def test_a_resource_version_the_server_forgot_makes_it_list_again(
        control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    with admin_json(control_plane) as api:
        forgotten = api.call("GET", "/api/v1/nodes", query={"limit": 1}
                             )["metadata"]["resourceVersion"]
    # A restarted API server rebuilds its watch cache from now on: older versions are gone.
    control_plane.stop_apiserver()
    control_plane.start_apiserver()
    with watching(control_plane) as (observer, calls):
        first = await observer.observe(datetime.now(UTC))
        assert first.status.ok, first.status.detail
        calls["nodes"].expire_next_watch(forgotten)
        with capture_logs() as logs:
            await until(observer, lambda o: calls["nodes"].lists == 2 or None,
                        REAL_TIMING.watch_timeout + 10, "a second list of nodes")
        expired = [e for e in logs if e["event"] == "resourceVersion expired; listing again"]
        assert [e["resource"] for e in expired] == ["nodes"]
        assert f"too old resource version: {forgotten}" in expired[0]["detail"]
        names = node_sim.add_nodes(1)
        await until(observer, lambda o: nodes_named(o, names), 20, "the node, after the re-list")
        assert list_counts(calls) == {**ONE_LIST_EACH, "nodes": 2}


@pytest.mark.slow
async def test_an_unreachable_api_server_is_an_observation_until_it_returns(
        control_plane: ControlPlane, node_sim: NodeSimulator) -> None:
    stale_after = 2 * TICK
    with watching(control_plane, stale_after=stale_after) as (observer, _):
        names = node_sim.add_nodes(1)
        await until(observer, lambda o: nodes_named(o, names), 20, "the node")
        control_plane.stop_apiserver()
        try:
            # (When exactly cached data turns stale is pinned down by the unit tests; a
            # stopping API server keeps its watches open for a while, refusing anything new.)
            # Open watches may first end with "Response ended prematurely"; which of
            # the four streams fails first is a race, so wait for the refused re-list.
            down = await until(observer, lambda o: o if not o.status.ok and "Connection refused"
                               in o.status.detail else None, 10, "the failure")
            assert f"GET {control_plane.url}/api" in down.status.detail
            [probe] = await observer.probes()
            assert probe.path == f"api-client {control_plane.url}"
            assert not probe.ok
            assert "Connection refused" in probe.error
            blind = await until(observer, lambda o: o if "nodes" not in o.data else None,
                                stale_after + 5, "stale nodes withheld")
            assert "pods" not in blind.data
            assert "nodes, pods, events and budgets not observed" in blind.status.detail
        finally:
            control_plane.start_apiserver()
        await until(observer, lambda o: o.status.ok and nodes_named(o, names), 30,
                    "recovery")
        assert await observer.probes() == (
            ApiProbe(path=f"api-client {control_plane.url}", ok=True),)
        # One complete list at the start, one after the outage (the attempts in between
        # failed): the watches did the rest.
        assert observer.lists() == {name: 2 for name in ONE_LIST_EACH}


@pytest.mark.slow
async def test_an_agent_built_with_a_kubeconfig_sees_the_cluster(
        control_plane: ControlPlane, node_sim: NodeSimulator, tmp_path: Path) -> None:
    names = node_sim.add_nodes(1)
    agent, _ = _build(tmp_path, control_plane.admin_kubeconfig.read_text())
    [kubernetes] = [o for o in agent.observing.observers if isinstance(o, KubernetesObserver)]
    try:
        snapshot = await agent.observing.snapshot(datetime.now(UTC))
        assert snapshot.sources["kubernetes"].ok, snapshot.sources["kubernetes"].detail
        assert snapshot.nodes is not None
        assert set(names) <= {n.name for n in snapshot.nodes}
        assert snapshot.apiserver is not None
        assert ApiProbe(path=f"api-client {control_plane.url}", ok=True) in snapshot.apiserver
    finally:
        stuck = kubernetes.stop()
    assert stuck == ()
