"""Kubernetes through watches: nodes (with their Lease heartbeats) and pods, for the tick.

One thread per resource (the kubernetes client is synchronous) lists, then watches
from the list's resourceVersion; a 410 Gone means the watch fell behind the server's
history, so it lists again. The threads keep an in-memory cache of converted fields
only, and the tick reads that cache: no API call per tick, no periodic full list.

An API server this client cannot reach is itself an observation: the source status
names the error and the request tried, an ``api-client`` ApiProbe joins the other
paths of the ``apiserver`` domain (through ``ApiserverObserver(clients=…)``), and
cached data is withheld (``None``, not observed) once its watch has been failing for
longer than ``stale_after``, rather than shown as current.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import heapq
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import structlog
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity
from pydantic import BaseModel, ValidationError

from bus.messages import Target, TargetKind
from runtime.core.ports import Contribution, Domain, Observed
from runtime.kube.client import KubeconfigError, load_client
from runtime.model.formats import Selector
from runtime.model.snapshot import (
    ApiProbe,
    BudgetObs,
    ContainerObs,
    EventObs,
    NodeCondition,
    NodeObs,
    PodObs,
    Resources,
    SourceStatus,
)

log = structlog.get_logger()

JSON = dict[str, Any]
Key = str | tuple[str, str]
ListCall = Callable[..., Any]
"""A kubernetes client ``list_*`` method (or a test's stand-in). Called with ``limit``,
``_continue`` and ``_preload_content=False`` to list a page, and by ``Watch.stream``
with ``watch=True`` to watch."""

NODE_LEASE_NAMESPACE = "kube-node-lease"


@dataclass(frozen=True)
class Resource:
    """One watched collection: its name in the cache and the status, and its API path."""

    name: str
    path: str


NODES = Resource("nodes", "/api/v1/nodes")
NODE_LEASES = Resource(
    "leases", f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases")
REPLICASETS = Resource("replicasets", "/apis/apps/v1/replicasets")
PODS = Resource("pods", "/api/v1/pods")
EVENTS = Resource("events", "/api/v1/events?fieldSelector=type%3DWarning")
BUDGETS = Resource("poddisruptionbudgets", "/apis/policy/v1/poddisruptionbudgets")
RESOURCES = (NODES, NODE_LEASES, REPLICASETS, PODS, EVENTS, BUDGETS)

DOMAIN_SOURCES: dict[Domain, tuple[str, ...]] = {
    # Heartbeats are part of what a node is shown with, and owners part of a pod: a
    # domain is shown only while every stream it is made from is fresh.
    "nodes": (NODES.name, NODE_LEASES.name),
    "pods": (PODS.name, REPLICASETS.name),
    "events": (EVENTS.name,),
    "budgets": (BUDGETS.name,),
}


def endpoints(api: client.ApiClient) -> dict[str, ListCall]:
    """The list calls behind each resource, for one API client."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    coordination, policy = client.CoordinationV1Api(api), client.PolicyV1Api(api)
    return {
        NODES.name: core.list_node,
        NODE_LEASES.name: functools.partial(coordination.list_namespaced_lease,
                                            NODE_LEASE_NAMESPACE),
        REPLICASETS.name: apps.list_replica_set_for_all_namespaces,
        PODS.name: core.list_pod_for_all_namespaces,
        # Normal events are the cluster's chatter (every pull, every start); the
        # Warnings are the evidence, and a small fraction of them.
        EVENTS.name: functools.partial(core.list_event_for_all_namespaces,
                                       field_selector="type=Warning"),
        BUDGETS.name: policy.list_pod_disruption_budget_for_all_namespaces,
    }


# ---------------------------------------------------------------- conversion
#
# At 5,000 nodes and 150,000 pods the cache must stay small, so it keeps only the
# fields detectors read, interns the strings that repeat (namespaces, node names,
# phases, reasons, label keys), shares identical container records and owners, and
# builds models with one shared fields-set: pydantic gives each validated instance
# its own (about 700 bytes for a pod, 100 MB at that scale). The converters produce
# exactly the declared field types, and every model is frozen, so sharing is safe.

M = TypeVar("M", bound=BaseModel)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
"""A copy of the whole object kubectl keeps on it: large, and never evidence."""


@functools.cache
def _field_names(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _build(model: type[M], **values: Any) -> M:
    return model.model_construct(_fields_set=_field_names(model), **values)


def _text(value: Any) -> str:
    return sys.intern(str(value)) if value else ""


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except (TypeError, ValueError):
        return None


def _strings(values: Any, *, skip: str = "") -> dict[str, str]:
    return {_text(k): _text(v) for k, v in (values or {}).items() if k != skip}


@functools.lru_cache(maxsize=4096)
def _resources(cpu_millis: int, memory_bytes: int) -> Resources:
    """One shared record per distinct amount: most pods of a workload ask the same."""
    return _build(Resources, cpu_millis=cpu_millis, memory_bytes=memory_bytes)


def _amounts(values: Any) -> tuple[int, int]:
    """CPU in millicores and memory in bytes of a ``requests`` or ``allocatable`` map;
    an amount the API server would not have accepted counts as nothing."""
    cpu = memory = 0
    for name, value in (values or {}).items():
        if name not in ("cpu", "memory"):
            continue
        try:
            amount = parse_quantity(value)  # type: ignore[no-untyped-call]
        except (ValueError, TypeError):
            continue
        if name == "cpu":
            cpu = int(amount * 1000)
        else:
            memory = int(amount)
    return cpu, memory


def _requests(spec: JSON) -> Resources:
    """What the scheduler reserves for a pod: its containers' requests summed, or its
    largest init container's if that is more (they run one at a time, before), plus
    the runtime class's overhead."""
    def requested(container: JSON) -> tuple[int, int]:
        return _amounts((container.get("resources") or {}).get("requests"))

    running = [requested(c) for c in spec.get("containers") or ()]
    init = [requested(c) for c in spec.get("initContainers") or ()]
    cpu = max(sum(c for c, _ in running), max((c for c, _ in init), default=0))
    memory = max(sum(m for _, m in running), max((m for _, m in init), default=0))
    extra_cpu, extra_memory = _amounts(spec.get("overhead"))
    return _resources(cpu + extra_cpu, memory + extra_memory)


def node_obs(obj: JSON, heartbeat: datetime | None = None) -> NodeObs:
    """A Node object as the detectors see it."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    return _build(
        NodeObs, name=_text(meta["name"]), labels=_strings(meta.get("labels")),
        annotations=_strings(meta.get("annotations"), skip=LAST_APPLIED),
        unschedulable=bool(spec.get("unschedulable")),
        conditions=tuple(
            _build(NodeCondition, type=_text(c.get("type")), status=_text(c.get("status")),
                   reason=_text(c.get("reason")), since=_time(c.get("lastTransitionTime")))
            for c in status.get("conditions") or ()),
        heartbeat=heartbeat,
        allocatable=_resources(*_amounts(status["allocatable"])) if status.get("allocatable")
        else None,
        address=next((_text(a.get("address")) for a in status.get("addresses") or ()
                      if isinstance(a, dict) and a.get("type") == "InternalIP"), ""),
        kubelet_port=_port(status.get("daemonEndpoints")))


def _port(endpoints: Any) -> int | None:
    """daemonEndpoints.kubeletEndpoint.Port, if it is a port number."""
    kubelet = endpoints.get("kubeletEndpoint") if isinstance(endpoints, dict) else None
    port = kubelet.get("Port") if isinstance(kubelet, dict) else None
    valid = isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
    return port if valid else None


@functools.lru_cache(maxsize=16384)
def _containers(states: tuple[tuple[str, int, bool, str], ...]) -> tuple[ContainerObs, ...]:
    return tuple(_build(ContainerObs, name=name, restarts=restarts, ready=ready,
                        waiting_reason=waiting) for name, restarts, ready, waiting in states)


WORKLOAD_KINDS: dict[str, TargetKind] = {"StatefulSet": "statefulset", "DaemonSet": "daemonset"}
"""Owner kinds that are themselves the top-level workload (a ReplicaSet is looked through)."""


@functools.lru_cache(maxsize=65536)
def workload(kind: TargetKind, namespace: str, name: str) -> Target:
    """The target of a top-level workload (shared: many pods have the same one)."""
    return Target(kind=kind, namespace=namespace, name=name)


@functools.lru_cache(maxsize=65536)
def _label_set(items: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in items}


def _pod_labels(values: Any) -> dict[str, str]:
    """A pod's labels, one shared mapping per distinct set: the pods of one ReplicaSet
    all carry the same (nothing mutates a frozen observation's mapping)."""
    return _label_set(tuple(sorted((values or {}).items()))) if values else {}


def pod_obs(obj: JSON, owner: Target | None) -> PodObs:
    """A Pod object as the detectors see it, with its already resolved top-level owner.

    Only regular containers count: a finished init container is never ready, and
    "all containers ready" is how a repair is verified.
    """
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    states = tuple(
        (_text(c.get("name")), int(c.get("restartCount") or 0), bool(c.get("ready")),
         _text(((c.get("state") or {}).get("waiting") or {}).get("reason")))
        for c in status.get("containerStatuses") or ())
    return _build(PodObs, namespace=_text(meta["namespace"]), name=str(meta["name"]),
                  node=_text(spec.get("nodeName")) or None, labels=_pod_labels(meta.get("labels")),
                  phase=_text(status.get("phase")) or "Pending", owner=owner,
                  containers=_containers(states), requests=_requests(spec),
                  ready=_condition(status, "Ready"))


def _condition(status: JSON, kind: str) -> bool | None:
    """Whether the object's condition ``kind`` is True (None: it reports none)."""
    for condition in status.get("conditions") or ():
        if isinstance(condition, dict) and condition.get("type") == kind:
            return condition.get("status") == "True"
    return None


EVENT_MESSAGE_LIMIT = 300
"""Characters kept of an event's message: enough to quote, not a channel for pages of text."""


def event_obs(obj: JSON) -> EventObs:
    """A core/v1 Warning Event as evidence."""
    meta, about = obj["metadata"], obj.get("involvedObject") or {}
    series = obj.get("series") or {}
    # Events written through events.k8s.io/v1 leave lastTimestamp empty and count
    # their repeats in a series.
    seen = (_time(obj.get("lastTimestamp")) or _time(series.get("lastObservedTime"))
            or _time(obj.get("eventTime")) or _time(meta.get("creationTimestamp")))
    message = str(obj.get("message") or "")
    if len(message) > EVENT_MESSAGE_LIMIT:
        message = message[:EVENT_MESSAGE_LIMIT - 1] + "…"
    # A Node's events live in a namespace ("default"), the Node itself in none.
    return _build(EventObs, namespace=_text(about.get("namespace")),
                  object=f"{_text(about.get('kind'))}/{about.get('name') or ''}",
                  reason=_text(obj.get("reason")), message=message,
                  count=int(obj.get("count") or series.get("count") or 1), last_seen=seen)


def budget_obs(obj: JSON) -> BudgetObs:
    """A PodDisruptionBudget as the review checks see it. A selector this agent cannot
    read is taken to select every pod of its namespace: a budget misread as covering
    too much blocks a drain, one misread as covering nothing would let it break."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    selector: Selector | None = None
    if spec.get("selector") is not None:
        try:
            selector = Selector.model_validate(spec["selector"])
        except ValidationError:
            selector = Selector()
    generation = meta.get("generation") or 0
    return BudgetObs(
        namespace=_text(meta.get("namespace")), name=_text(meta["name"]), selector=selector,
        disruptions_allowed=_count(status.get("disruptionsAllowed")),
        current_healthy=_count(status.get("currentHealthy")),
        desired_healthy=_count(status.get("desiredHealthy")),
        always_allow_unhealthy=spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow",
        current=_count(status.get("observedGeneration")) >= generation)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def controller(obj: JSON) -> tuple[str, str] | None:
    """The kind and name of the object's controlling owner, if it has one."""
    for ref in obj["metadata"].get("ownerReferences") or ():
        if ref.get("controller"):
            return str(ref.get("kind", "")), str(ref.get("name", ""))
    return None


def key(resource: str, obj: JSON) -> Key:
    """The cache key of an object: its name, or (namespace, name) for namespaced kinds."""
    meta = obj["metadata"]
    if resource in (PODS.name, REPLICASETS.name, EVENTS.name, BUDGETS.name):
        return _text(meta["namespace"]), str(meta["name"])
    return _text(meta["name"])


# ---------------------------------------------------------------- the cache


class Cache:
    """What the watches have seen, converted. Watch threads write it; the tick reads it."""

    MAX_EVENTS = 2000
    """Warning events kept, the most recently seen: an event storm must not grow an agent
    without bound (the API server keeps an hour of them, which can be a lot)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodes: dict[str, NodeObs] = {}
        self.pods: dict[tuple[str, str], PodObs] = {}
        self.events: dict[tuple[str, str], EventObs] = {}
        self.budgets: dict[tuple[str, str], BudgetObs] = {}
        self._heartbeats: dict[str, datetime] = {}
        self._deployments: dict[tuple[str, str], str | None] = {}
        # Pods whose ReplicaSet this cache has not seen yet (its watch is a separate
        # stream, so a new ReplicaSet's pods can arrive first): resolved when it does.
        self._unresolved: dict[tuple[str, str], set[tuple[str, str]]] = {}

    def update(self, resource: str, objects: Iterable[JSON]) -> set[Key]:
        """Store (or replace) objects of one resource; returns their keys."""
        keys: set[Key] = set()
        with self.lock:
            for obj in objects:
                keys.add(self._put(resource, obj))
            if len(self.events) > self.MAX_EVENTS:
                self._forget_oldest_events()
        return keys

    def _forget_oldest_events(self) -> None:
        # Usually one over (an event from the watch): no full sort for that.
        oldest = datetime.min.replace(tzinfo=UTC)
        for k in heapq.nsmallest(len(self.events) - self.MAX_EVENTS, self.events,
                                 key=lambda k: self.events[k].last_seen or oldest):
            del self.events[k]

    def remove(self, resource: str, keys: Iterable[Key]) -> None:
        """Forget objects that were deleted."""
        with self.lock:
            for k in keys:
                self._drop(resource, k)

    def retain(self, resource: str, keep: set[Key]) -> None:
        """Forget every object of the resource that a complete list did not return."""
        with self.lock:
            for k in self._keys(resource) - keep:
                self._drop(resource, k)

    def _keys(self, resource: str) -> set[Key]:
        stores: dict[str, Mapping[Any, object]] = {
            NODES.name: self.nodes, NODE_LEASES.name: self._heartbeats,
            PODS.name: self.pods, REPLICASETS.name: self._deployments,
            EVENTS.name: self.events, BUDGETS.name: self.budgets}
        return set(stores[resource])

    def _put(self, resource: str, obj: JSON) -> Key:
        k = key(resource, obj)
        if isinstance(k, str):
            if resource == NODES.name:
                self.nodes[k] = node_obs(obj, self._heartbeats.get(k))
            elif (renewed := _time((obj.get("spec") or {}).get("renewTime"))) is not None:
                self._heartbeats[k] = renewed
                self._set_heartbeat(k, renewed)
            else:
                self._drop(resource, k)
        elif resource == PODS.name:
            self.pods[k] = pod_obs(obj, self._owner(k, controller(obj)))
        elif resource == EVENTS.name:
            self.events[k] = event_obs(obj)
        elif resource == BUDGETS.name:
            self.budgets[k] = budget_obs(obj)
        else:
            self._put_replicaset(k, controller(obj))
        return k

    def _drop(self, resource: str, k: Key) -> None:
        if isinstance(k, str):
            if resource == NODES.name:
                self.nodes.pop(k, None)
            else:
                self._heartbeats.pop(k, None)
                self._set_heartbeat(k, None)
        elif resource == PODS.name:
            self.pods.pop(k, None)
        elif resource == EVENTS.name:
            self.events.pop(k, None)
        elif resource == BUDGETS.name:
            self.budgets.pop(k, None)
        else:
            self._deployments.pop(k, None)
            self._unresolved.pop(k, None)

    def _set_heartbeat(self, node: str, at: datetime | None) -> None:
        if (obs := self.nodes.get(node)) is not None and obs.heartbeat != at:
            self.nodes[node] = _build(NodeObs, **{**dict(obs), "heartbeat": at})

    def _put_replicaset(self, replicaset: tuple[str, str], ref: tuple[str, str] | None) -> None:
        deployment = ref[1] if ref is not None and ref[0] == "Deployment" else None
        self._deployments[replicaset] = deployment
        # Pods already resolved keep their owner: a ReplicaSet changes Deployment only
        # when orphaned and adopted again, and their next update resolves them anew.
        waiting = self._unresolved.pop(replicaset, ())
        if deployment is None:
            return
        target = workload("deployment", replicaset[0], deployment)
        for pod_key in waiting:
            if (pod := self.pods.get(pod_key)) is not None:
                self.pods[pod_key] = _build(PodObs, **{**dict(pod), "owner": target})

    def _owner(self, pod: tuple[str, str], ref: tuple[str, str] | None) -> Target | None:
        if ref is None:
            return None
        namespace, (kind, name) = pod[0], ref
        if kind == "ReplicaSet":
            replicaset = (namespace, name)
            if replicaset not in self._deployments:
                self._unresolved.setdefault(replicaset, set()).add(pod)
                return None
            deployment = self._deployments[replicaset]
            # A ReplicaSet without a Deployment has no restart of its own to offer.
            return workload("deployment", namespace, deployment) if deployment else None
        if kind in WORKLOAD_KINDS:
            return workload(WORKLOAD_KINDS[kind], namespace, name)
        return None  # Jobs, mirror pods (owned by their Node), custom controllers


# ---------------------------------------------------------------- one watch


@dataclass(frozen=True)
class WatchTiming:
    """How the watches pace themselves, in seconds."""

    backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    """The wait after the n-th failure in a row; the last one repeats."""
    watch_timeout: int = 60
    """The server ends each watch after this; the next resumes from where it stopped.

    It also bounds how long a hung server (connections accepted, nothing sent) goes
    unnoticed by an idle watch: this plus ``read_timeout``. One request a minute per
    resource is cheap; a list is what would not be.
    """
    connect_timeout: float = 3.0
    read_timeout: float = 15.0
    """For a list page; a watch may be silent for ``watch_timeout`` plus this."""
    page_size: int = 500


DEFAULT_TIMING = WatchTiming()


@dataclass(frozen=True)
class StreamState:
    """How one resource's list and watch are faring (replaced whole, so reads are consistent)."""

    resource: str
    synced: bool = False
    lists: int = 0
    failures: int = 0
    failing_since: datetime | None = None
    error: str = ""
    unreachable: bool = False

    def fresh(self, now: datetime, stale_after: float) -> bool:
        """Listed at least once, and not failing for longer than ``stale_after``."""
        return self.synced and (self.failing_since is None
                                or (now - self.failing_since).total_seconds() < stale_after)

    def problem(self, now: datetime) -> str | None:
        """What is wrong, in one phrase; None when nothing is."""
        if self.failing_since is not None:
            failing = (now - self.failing_since).total_seconds()
            return f"{self.error} (attempt #{self.failures}, failing for {failing:.0f}s)"
        return None if self.synced else f"{self.resource}: first list in progress"


def _errno(exc: BaseException) -> int | None:
    """The errno of the socket error behind a client error, if there is one."""
    seen: list[BaseException] = [exc]
    while seen:
        error = seen.pop()
        if isinstance(error, OSError) and error.errno:
            return error.errno
        # urllib3 wraps the socket error as a cause, a context, or an argument.
        seen += [e for e in (error.__cause__, error.__context__, *error.args)
                 if isinstance(e, BaseException)]
    return None


def describe(exc: BaseException) -> str:
    """A failed request in a few words: the HTTP status and message, or the socket error."""
    if isinstance(exc, ApiException):
        if not exc.status:  # the client reports TLS failures as status 0
            return str(exc.reason).replace("\n", ": ")
        message = ""
        with contextlib.suppress(ValueError, AttributeError):  # a body that is no Status
            message = str(json.loads(exc.body or "").get("message", ""))
        return f"HTTP {exc.status} {exc.reason}" + (f": {message}" if message else "")
    if (errno := _errno(exc)) is not None:
        return os.strerror(errno)
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        # ("Connection aborted.", RemoteDisconnected("Remote end closed connection …"))
        return ": ".join(str(arg).rstrip(".") for arg in exc.args)
    # Checked after the errno: urllib3's NewConnectionError ("connection refused") is
    # a subclass of ConnectTimeoutError.
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "connect timed out"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return "read timed out"
    return f"{type(exc).__name__}: {exc}"


def unreachable(exc: BaseException) -> bool:
    """Whether a failure says the API server could not be reached or could not answer.

    A 4xx is an answer (the server is up, this client may not read): the source is
    failing, but the ``api-client`` path to the server is not.
    """
    if isinstance(exc, ApiException):
        return not exc.status or exc.status >= HTTPStatus.INTERNAL_SERVER_ERROR
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError)


def _expected(exc: BaseException) -> bool:
    return isinstance(exc, ApiException | urllib3.exceptions.HTTPError | OSError)


class Watcher:
    """Lists then watches one resource into the cache, and says how that is going."""

    def __init__(self, resource: Resource, call: ListCall, cache: Cache, *, url: str,
                 timing: WatchTiming, stop: threading.Event,
                 wall: Callable[[], datetime]) -> None:
        self.resource = resource
        self.state = StreamState(resource.name)
        self.settled = threading.Event()
        """Set once the first list has succeeded or failed."""
        self._call = call
        self._cache = cache
        self._url = url
        self._timing = timing
        self._stop = stop
        self._wall = wall
        self._resource_version: str | None = None
        # "object" keeps events as dicts: deserializing every Pod into the client's
        # models costs far more than the few fields kept. (``deserialize=False`` would
        # too, but then Watch.stream fails on ERROR events: it reads a key only the
        # deserializing path sets.)
        self._watch = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]

    def run(self) -> None:
        """Step until stopped: the body of the resource's thread."""
        while not self._stop.is_set():
            if delay := self.step():
                self._stop.wait(delay)

    def interrupt(self) -> None:
        """Unblock a watch waiting for its next event (on the way out)."""
        self._watch.stop()  # type: ignore[no-untyped-call]

    def step(self) -> float:
        """One list if needed, then one watch until the server ends it.

        Returns the seconds to wait before the next step: 0 unless this one failed.
        """
        request = f"GET {self._url}{self.resource.path}"
        try:
            if self._resource_version is None:
                self._list()
            request += ("&" if "?" in request else "?") + "watch=1"
            if not self._stop.is_set():
                self._watch_once()
        except Exception as exc:
            if self._stop.is_set():
                return 0.0  # the stream was cut under the read on purpose
            if isinstance(exc, ApiException) and exc.status == HTTPStatus.GONE:
                # The server no longer has the history from our resourceVersion on
                # (compaction, or a watch cache that moved on): only a list catches up.
                self._resource_version = None
                log.info("resourceVersion expired; listing again",
                         resource=self.resource.name, detail=describe(exc))
                return 0.0
            return self._failed(request, exc)
        return 0.0

    def _list(self) -> None:
        keep: set[Key] = set()
        cont: str | None = None
        timeout = (self._timing.connect_timeout, self._timing.read_timeout)
        while True:
            response = self._call(limit=self._timing.page_size, _continue=cont,
                                  _preload_content=False, _request_timeout=timeout)
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
            keep |= self._cache.update(self.resource.name, body.get("items") or ())
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                break
        self._cache.retain(self.resource.name, keep)
        self._resource_version = str(meta["resourceVersion"])
        # Every failure makes the next step list, so a list is what ends one.
        state = self.state
        if state.failures:
            log.info("watch recovered", resource=self.resource.name,
                     after_attempts=state.failures)
        self.state = replace(state, synced=True, lists=state.lists + 1, failures=0,
                             failing_since=None, error="", unreachable=False)
        self.settled.set()

    def _watch_once(self) -> None:
        events = self._watch.stream(  # type: ignore[no-untyped-call]
            self._call, resource_version=self._resource_version, allow_watch_bookmarks=True,
            timeout_seconds=self._timing.watch_timeout,
            _request_timeout=(self._timing.connect_timeout,
                              self._timing.watch_timeout + self._timing.read_timeout))
        for event in events:
            kind, obj = event["type"], event["raw_object"]
            if kind == "DELETED":
                self._cache.remove(self.resource.name, [key(self.resource.name, obj)])
            elif kind in ("ADDED", "MODIFIED"):
                self._cache.update(self.resource.name, [obj])
        # The stream ended by the server's timeout: resume from the last event or bookmark.
        self._resource_version = self._watch.resource_version or self._resource_version

    def _failed(self, request: str, exc: Exception) -> float:
        state = self.state
        failures = state.failures + 1
        self.state = replace(
            state, failures=failures, failing_since=state.failing_since or self._wall(),
            error=f"{request}: {describe(exc)}", unreachable=unreachable(exc))
        # After an error the cache may have missed events (deletions above all): the
        # next attempt lists again rather than resuming the watch.
        self._resource_version = None
        self.settled.set()
        backoff = self._timing.backoff
        delay = backoff[min(failures, len(backoff)) - 1]
        trace = {} if _expected(exc) else {"exc_info": exc}
        log.warning(f"attempt #{failures} failed; will retry in {delay:g}s",
                    resource=self.resource.name, error=self.state.error, **trace)
        return delay


# ---------------------------------------------------------------- the observer


class KubernetesObserver:
    """Nodes and pods from list-and-watch threads, and the ``api-client`` path to the API server.

    The threads start with the first ``observe()`` or ``probes()`` (``autostart``), and
    both wait up to ``initial_wait`` seconds for the first lists, so the agent's first
    snapshot has the data and the probe. They are daemon threads: an agent process just
    exits; tests call ``stop()``.
    """

    name = "kubernetes"
    provides: frozenset[Domain] = frozenset(DOMAIN_SOURCES)

    def __init__(self, calls: Mapping[str, ListCall], *, url: str, stale_after: float,
                 timing: WatchTiming = DEFAULT_TIMING, initial_wait: float = 3.0,
                 autostart: bool = True,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC),
                 close: Callable[[], object] = lambda: None) -> None:
        self.url = url.rstrip("/")
        self.stale_after = stale_after
        self.initial_wait = initial_wait
        self.autostart = autostart
        self.cache = Cache()
        self._stop = threading.Event()
        self.watchers = {r.name: Watcher(r, calls[r.name], self.cache, url=self.url,
                                         timing=timing, stop=self._stop, wall=wall)
                         for r in RESOURCES}
        self.threads: dict[str, threading.Thread] = {}
        """The watch threads by resource, once started."""
        self._first_lists: asyncio.Future[None] | None = None
        self._close = close

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path, *, stale_after: float,
                        **options: Any) -> KubernetesObserver:
        """The observer of the cluster a kubeconfig points at (raises KubeconfigError)."""
        api = load_client(kubeconfig)
        return cls(endpoints(api), url=api.configuration.host, stale_after=stale_after,
                   close=api.close, **options)

    def lists(self) -> dict[str, int]:
        """How many complete lists each resource has needed so far (watches are not lists)."""
        return {name: w.state.lists for name, w in self.watchers.items()}

    def start(self) -> None:
        """Start one thread per resource (once)."""
        if self.threads:
            return
        for name, watcher in self.watchers.items():
            # The threads log with the agent's context (its persona), minus the tick
            # that happened to be running when they started.
            context = contextvars.copy_context()
            thread = threading.Thread(target=context.run, args=(self._run, watcher),
                                      name=f"k8s-watch-{name}", daemon=True)
            self.threads[name] = thread
            thread.start()

    @staticmethod
    def _run(watcher: Watcher) -> None:
        structlog.contextvars.unbind_contextvars("tick")
        watcher.run()

    def stop(self, timeout: float = 5.0) -> tuple[str, ...]:
        """Stop the threads (waiting up to ``timeout`` seconds in all) and close the client.

        Returns the names of threads still running then (daemons: they die with the process).
        """
        self._stop.set()
        deadline = time.monotonic() + timeout
        # Interrupt until they are gone: a watch whose request was still on its way
        # when first interrupted has no socket to cut yet, and would run to its timeout.
        while (alive := [t for t in self.threads.values() if t.is_alive()]) and (
                time.monotonic() < deadline):
            for watcher in self.watchers.values():
                watcher.interrupt()
            alive[0].join(0.05)
        stuck = tuple(t.name for t in alive)
        if stuck:
            log.warning("watch threads still running after stop", threads=stuck)
        self._close()
        return stuck

    def _wait_settled(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for watcher in self.watchers.values():
            watcher.settled.wait(max(0.0, deadline - time.monotonic()))

    async def _started(self) -> None:
        if not self.autostart:
            return
        if self._first_lists is None:
            self.start()
            self._first_lists = asyncio.ensure_future(
                asyncio.to_thread(self._wait_settled, self.initial_wait))
        # Shared by observe() and probes() in the same tick; a caller's timeout must
        # not cancel the other's wait.
        await asyncio.shield(self._first_lists)

    async def observe(self, now: datetime) -> Observed:
        """The cached nodes and pods that are fresh, and how each stream is doing."""
        await self._started()
        states = {name: w.state for name, w in self.watchers.items()}
        # A watch thread that died (it catches every Exception, so only something worse
        # gets there) would leave its last state looking healthy, and its data current.
        dead = [name for name, thread in self.threads.items() if not thread.is_alive()]
        fresh = {name for name, state in states.items()
                 if state.fresh(now, self.stale_after) and name not in dead}
        data: Contribution = {}
        shown = []
        with self.cache.lock:
            if fresh.issuperset(DOMAIN_SOURCES["nodes"]):
                data["nodes"] = tuple(self.cache.nodes.values())
                shown.append(f"{len(data['nodes'])} nodes")
            if fresh.issuperset(DOMAIN_SOURCES["pods"]):
                data["pods"] = tuple(self.cache.pods.values())
                shown.append(f"{len(data['pods'])} pods")
            if fresh.issuperset(DOMAIN_SOURCES["events"]):
                data["events"] = tuple(self.cache.events.values())
                shown.append(f"{len(data['events'])} warning events")
            if fresh.issuperset(DOMAIN_SOURCES["budgets"]):
                data["budgets"] = tuple(self.cache.budgets.values())
                shown.append(f"{len(data['budgets'])} disruption budgets")
        problems = [f"{name}: the watch thread has died" for name in dead]
        problems += [p for state in states.values() if (p := state.problem(now))]
        withheld = [d for d in DOMAIN_SOURCES if d not in data]
        if withheld:
            names = ", ".join(withheld[:-1]) + " and " if len(withheld) > 1 else ""
            problems.append(f"{names}{withheld[-1]} not observed: no fresh list and watch "
                            f"within {self.stale_after:g}s")
        lists = ", ".join(f"{name} {state.lists}" for name, state in states.items())
        detail = "; ".join([*problems, *shown, f"lists: {lists}"])
        return Observed(data, SourceStatus(ok=not problems, detail=detail))

    async def probes(self) -> tuple[ApiProbe, ...]:
        """The ``api-client`` path: failing while any request fails to reach the server.

        Nothing until some request has had an outcome: a path not yet tried is no evidence.
        """
        await self._started()
        states = [w.state for w in self.watchers.values()]
        if not any(s.synced or s.failures for s in states):
            return ()
        path = f"api-client {self.url}"
        down = next((s for s in states if s.unreachable), None)
        if down is not None:
            return (ApiProbe(path=path, ok=False, error=down.error),)
        return (ApiProbe(path=path, ok=True),)


def kubernetes_observer(kubeconfig: Path, *, stale_after: float) -> KubernetesObserver | None:
    """The observer for an agent's kubeconfig, or None without a usable one.

    A missing kubeconfig is a choice (a persona that observes through the host only);
    an unusable one is an error, and logged as one.
    """
    if not kubeconfig.exists():
        return None
    try:
        return KubernetesObserver.from_kubeconfig(kubeconfig, stale_after=stale_after)
    except KubeconfigError as exc:
        log.error("Kubernetes not observed: the kubeconfig is unusable", error=str(exc))
        return None
