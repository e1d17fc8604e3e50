"""Simulated kubelets and scheduler against a real API server, with failure injection.

A ``NodeSimulator`` registers Nodes (with their Leases in ``kube-node-lease``) and then
does, through the API only, what the kubelets and the scheduler of a cluster would:

- heartbeats: renews each live node's Lease every ``heartbeat`` seconds and posts its
  ``Ready`` condition (at registration, every ``status_every`` seconds, and at once
  if the API says it is not Ready while its kubelet is alive). The real
  node-lifecycle controller decides from these whether a node is healthy;
- scheduler: binds each pending, unbound pod (Binding API) to the next node, round
  robin, that is Ready, alive, not cordoned, matches its ``nodeSelector``, whose
  ``NoSchedule``/``NoExecute`` taints it tolerates, and for a DaemonSet pod, the node
  its ``matchFields`` names;
- kubelet: marks pods bound to a live node Running with every container ready, and
  finishes deletions (a pod with a ``deletionTimestamp``, evicted or deleted, is
  deleted with grace 0). A node whose heartbeats are stopped has a dead kubelet:
  its pods are not started, not deleted, and stay as they are until it resumes.

With ``kubelet_ports``, each node's InternalIP is 127.0.0.1 and its kubelet port
(``daemonEndpoints``) a real listening port there, open while its kubelet lives: the
agents' network evidence path probes it.

Failure injection: ``stop_heartbeats(node)`` / ``resume_heartbeats(node)`` and
``crashloop(namespace, pod)`` (restartCount rises every ``crash_every`` seconds, the
containers wait in ``CrashLoopBackOff`` and the pod is not ready).

It reads the cluster with one list+watch of pods and one of nodes, as raw JSON (no
model objects: a benchmark runs it with thousands of nodes and 30 pods each), and
writes from a small thread pool. Threads: the two watches, a ticker, the pool; all
are joined by ``stop()``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import structlog
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

log = structlog.get_logger(__name__)

Obj = dict[str, Any]
LEASE_NAMESPACE = "kube-node-lease"
KUBELET_VERSION = "v1.37.2"
SIMULATED_LABEL = "zeta.dev/simulated-node"
"""On every node the simulator registers, so a reader can tell them apart."""
RETRY_AFTER = 5.0
"""An action on a pod is repeated if the cluster does not show it done this much later."""
WATCH_TIMEOUT = 300
RECONNECT = 1.0
LIST_PAGE = 500
FIRST_NODE_IP = ipaddress.IPv4Address("172.16.0.1")
FIRST_POD_IP = ipaddress.IPv4Address("10.64.0.1")
_NOT_READY = "node.kubernetes.io/not-ready"
NODES_USABLE = 90.0  # an upper bound, not a delay: two busy cores can slow the controller a lot
NODES_USABLE_PER_SECOND = 20.0
"""add_nodes waits NODES_USABLE + count / NODES_USABLE_PER_SECOND seconds at most."""
_UNSCHEDULABLE_TAINT = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------- raw JSON transport


def api_client(kubeconfig: Path, *, pool_size: int | None = None) -> client.ApiClient:
    """A Kubernetes API client for ``kubeconfig`` (its current context); close it when done.

    ``pool_size``: connections kept per host, at least the number of threads using it.
    """
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), client_configuration=configuration)
    if pool_size is not None:
        configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


class JsonApi:
    """The API client's transport (auth, TLS, pooling) without its models: JSON in, dicts out.

    Cheaper than the typed client for thousands of objects, and manifests read as they
    would in YAML. Paths are API paths (``/api/v1/nodes``); ``patch=True`` sends a
    strategic merge patch.
    """

    def __init__(self, kubeconfig: Path, *, pool_size: int = 4) -> None:
        self._client = api_client(kubeconfig, pool_size=pool_size)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> JsonApi:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send(self, method: str, path: str, *, query: Mapping[str, str | int], body: Any,
              content_type: str, timeout: float | None) -> Any:
        _, url, headers, payload, _ = self._client.param_serialize(
            method, path, query_params=list(query.items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])
        return self._client.call_api(method, url, header_params=headers, body=payload,
                                     _request_timeout=timeout)

    def call(self, method: str, path: str, *, query: Mapping[str, str | int] | None = None,
             body: Any = None, patch: bool = False, timeout: float = 30.0) -> Obj:
        """One request; the decoded body. Raises ApiException for a non-2xx answer."""
        content_type = "application/strategic-merge-patch+json" if patch else "application/json"
        response = self._send(method, path, query=query or {}, body=body,
                              content_type=content_type, timeout=timeout)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        decoded: Obj = json.loads(response.data) if response.data else {}
        return decoded

    def stream(self, path: str, query: Mapping[str, str | int]) -> urllib3.BaseHTTPResponse:
        """A watch: the open response, one JSON event per line."""
        response = self._send("GET", path, query={**query, "watch": "true"}, body=None,
                              content_type="application/json", timeout=None)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        stream: urllib3.BaseHTTPResponse = response.response
        return stream


# ---------------------------------------------------------------- state


@dataclass
class _Node:
    name: str
    labels: dict[str, str]
    ip: str
    alive: bool = True  # the kubelet runs: heartbeats, starts and deletes pods
    port: int = 10250  # its kubelet's (listening only with kubelet_ports)
    ready: bool = False  # as the API says, through the watch (the controller may disagree)
    unschedulable: bool = False
    taints: list[Obj] = field(default_factory=list)


@dataclass
class _Pod:
    namespace: str
    name: str
    uid: str
    node: str | None
    running: bool
    ready: bool
    deleting: bool
    containers: list[tuple[str, str]]  # (name, image)
    pending: Obj | None = None  # the whole pod, kept only until it is bound (scheduling reads it)

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{quote(self.namespace)}/pods/{quote(self.name)}"


def _pod_state(pod: Obj) -> _Pod:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    node = spec.get("nodeName") or None
    return _Pod(
        namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], node=node,
        running=status.get("phase") == "Running",
        ready=any(c.get("type") == "Ready" and c.get("status") == "True"
                  for c in status.get("conditions") or ()),
        deleting=meta.get("deletionTimestamp") is not None,
        containers=[(c["name"], c.get("image", "")) for c in spec.get("containers", ())],
        pending=pod if node is None else None)


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Whether a pod with ``tolerations`` tolerates ``taint`` (the scheduler's rule)."""
    for toleration in tolerations:
        effect = toleration.get("effect")
        if effect and effect != taint.get("effect"):
            continue
        operator = toleration.get("operator", "Equal")
        key = toleration.get("key")
        if not key:
            if operator == "Exists":
                return True
            continue
        if key != taint.get("key"):
            continue
        if operator == "Exists" or toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def fits(pod: Obj, node: _Node) -> bool:
    """Whether the scheduler may bind ``pod`` to ``node`` (readiness aside)."""
    spec = pod.get("spec", {})
    tolerations = spec.get("tolerations") or []
    if node.unschedulable and not tolerates(tolerations, _UNSCHEDULABLE_TAINT):
        return False
    if any(t.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, t)
           for t in node.taints):
        return False
    selector = spec.get("nodeSelector") or {}
    if any(node.labels.get(k) != v for k, v in selector.items()):
        return False
    names = _required_node_names(spec)
    return names is None or node.name in names


def _required_node_names(spec: Obj) -> set[str] | None:
    """The node names a pod's required node affinity allows by ``metadata.name`` (DaemonSet
    pods carry exactly one); None if it does not restrict names."""
    terms = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
             .get("requiredDuringSchedulingIgnoredDuringExecution") or {}) \
        .get("nodeSelectorTerms") or []
    names: set[str] = set()
    restricted = False
    for term in terms:
        for match in term.get("matchFields") or ():
            if match.get("key") == "metadata.name" and match.get("operator") == "In":
                restricted = True
                names.update(match.get("values") or ())
    return names if restricted else None


# ---------------------------------------------------------------- what a kubelet writes
#
# Shared by the simulator and by callers that make a cluster's objects exist without
# simulating them (bench/observer.py --population static).


def node_labels(name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels a simulated node is registered with, plus ``extra``."""
    return {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            SIMULATED_LABEL: "true", **(extra or {})}


def register_node(api: JsonApi, name: str, labels: Mapping[str, str], ip: str, *,
                  taints: Sequence[Mapping[str, Any]] = (), kubelet_port: int = 10250) -> None:
    """Create a Node as its kubelet registers it (Ready, no pressure, room for 110 pods)
    and its Lease in ``kube-node-lease``, renewed now."""
    now = _now()
    body = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {"taints": [dict(t) for t in taints]} if taints else {},
        "status": {
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "31Gi", "pods": "110"},
            "conditions": _node_conditions(now, transition=now, ready=True),
            "addresses": [{"type": "InternalIP", "address": ip},
                          {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "simulated://1",
                         "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                         "osImage": "zeta node simulator", "kubeProxyVersion": ""},
        },
    }
    created = api.call("POST", "/api/v1/nodes", body=body)
    api.call("POST", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases", body={
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": name,
             "uid": created["metadata"]["uid"]}]},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                 "renewTime": _micro_now()}})


def post_node_status(api: JsonApi, name: str, *, ready: bool, transition: bool) -> None:
    """Patch the node's conditions as its kubelet posts them: ``Ready`` True or False
    (the kubelet runs but, say, its container runtime is down), no pressure.
    ``transition`` sets lastTransitionTime to now; otherwise it is kept."""
    now = _now()
    api.call("PATCH", f"/api/v1/nodes/{name}/status", patch=True, body={"status": {
        "conditions": _node_conditions(now, transition=now if transition else None,
                                       ready=ready)}})


def _node_conditions(now: str, *, transition: str | None, ready: bool) -> list[Obj]:
    """``transition`` None keeps the existing lastTransitionTime (a strategic merge by
    condition type)."""
    conditions = [("Ready", "True", "KubeletReady", "kubelet is posting ready status")
                  if ready else
                  ("Ready", "False", "KubeletNotReady", "container runtime is down"),
                  ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
                  ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
                  ("PIDPressure", "False", "KubeletHasSufficientPID", "")]
    out = []
    for kind, status, reason, message in conditions:
        condition = {"type": kind, "status": status, "reason": reason, "message": message,
                     "lastHeartbeatTime": now}
        if transition is not None:
            condition["lastTransitionTime"] = transition
        out.append(condition)
    return out


def running_status(containers: Iterable[tuple[str, str]], *, host_ip: str, pod_ip: str,
                   now: str | None = None) -> Obj:
    """A pod's status once its kubelet has started every container (``(name, image)``)
    and each is ready, at ``now`` (default: now): for a patch of the ``status``
    subresource."""
    now = now or _now()
    statuses = [{"name": name, "image": image, "imageID": "", "ready": True, "started": True,
                 "restartCount": 0, "containerID": f"simulated://{uuid.uuid4().hex}",
                 "state": {"running": {"startedAt": now}, "waiting": None, "terminated": None}}
                for name, image in containers]
    return {"phase": "Running", "startTime": now, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
            "conditions": _pod_conditions(now, ready=True), "containerStatuses": statuses}


# ---------------------------------------------------------------- the simulator


class KubeletPorts:
    """A listening port per simulated kubelet on 127.0.0.1, each connection accepted and
    closed at once: a probe of a node's kubelet port connects while it is open and is
    refused once it is closed. A node keeps its port number across a close and reopen
    (its Node object names it)."""

    HOST = "127.0.0.1"

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._open: dict[str, socket.socket] = {}
        self._numbers: dict[str, int] = {}
        self._stopping = threading.Event()

    def open(self, name: str) -> int:
        """Listen for ``name`` (on its earlier port, if it had one); the port."""
        with self._lock:
            if name in self._open:
                return self._numbers[name]
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.HOST, self._numbers.get(name, 0)))
            listener.listen(64)
            listener.setblocking(False)
            self._open[name] = listener
            self._numbers[name] = listener.getsockname()[1]
            self._selector.register(listener, selectors.EVENT_READ)
            return self._numbers[name]

    def close(self, name: str) -> None:
        with self._lock:
            listener = self._open.pop(name, None)
            if listener is not None:
                self._selector.unregister(listener)
                listener.close()

    def serve(self) -> None:
        """Accept and close, until ``stop``."""
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                with contextlib.suppress(OSError):  # closed meanwhile, or the client gave up
                    connection, _ = listener.accept()
                    connection.close()

    def stop(self) -> None:
        self._stopping.set()
        for name in list(self._open):
            self.close(name)


class NodeSimulator:
    """Kubelets and a scheduler for the nodes it registers (see the module docstring).

    ``kubeconfig`` needs admin rights (it writes nodes, leases, bindings, pod status).
    ``start()`` begins watching and heartbeating; ``add_nodes`` registers nodes (before or
    after start); ``stop()`` ends every thread, and with ``remove_nodes=True`` also deletes
    its nodes, their Leases and the pods bound to them (force, as a decommissioning would).
    """

    def __init__(self, kubeconfig: Path, *, heartbeat: float = 1.0, status_every: float = 30.0,
                 crash_every: float = 2.0, start_delay: float = 0.0, workers: int = 8,
                 kubelet_ports: bool = False) -> None:
        self.heartbeat = heartbeat
        # How long a kubelet takes to start a pod bound to it (image pulls, probes): a test
        # that needs replacements to be slow to turn Ready sets it.
        self.start_delay = start_delay
        self.status_every = status_every
        self.crash_every = crash_every
        self._api = JsonApi(kubeconfig, pool_size=workers + 4)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="nodesim")
        self._lock = threading.Lock()
        self._node_seen = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._streams: set[urllib3.BaseHTTPResponse] = set()
        self._nodes: dict[str, _Node] = {}
        self._pods: dict[str, _Pod] = {}  # by uid
        self._unbound: dict[str, _Pod] = {}  # by uid: what the scheduler has to place
        self._unsettled: set[str] = set()  # uids on our nodes not yet running, or deleting
        self._candidates: list[_Node] | None = None  # alive and Ready; None: to recompute
        self._cursor = 0  # round robin over the candidates
        self._by_key: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid
        self._crashing: dict[tuple[str, str], int] = {}  # (namespace, name) -> restarts
        self._issued: dict[tuple[str, str], float] = {}  # (uid, action) -> when asked
        self._status_posted: dict[str, float] = {}
        self._started: dict[str, tuple[str, str]] = {}  # uid -> (pod IP, start time)
        self._arrived: dict[str, float] = {}  # uid -> when its kubelet first saw it, unstarted
        self._node_ips = itertools.count(int(FIRST_NODE_IP))
        self._pod_ips = itertools.count(int(FIRST_POD_IP))
        self._node_counter = itertools.count()
        self._ports = KubeletPorts() if kubelet_ports else None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> NodeSimulator:
        """Begin watching pods and nodes and heartbeating; returns self."""
        self._spawn("nodesim-pods", lambda: self._watch(
            "/api/v1/pods", self._on_pod, self._relist_pods))
        self._spawn("nodesim-nodes", lambda: self._watch(
            "/api/v1/nodes", self._on_node, self._relist_nodes))
        self._spawn("nodesim-ticker", self._tick)
        if self._ports is not None:
            self._spawn("nodesim-kubelet-ports", self._ports.serve)
        return self

    def stop(self, *, remove_nodes: bool = False) -> None:
        """Stop every thread (watches are cut, not waited out); optionally remove the nodes."""
        self._stopping.set()
        if self._ports is not None:
            self._ports.stop()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.shutdown()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if remove_nodes:
            self._remove_nodes()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._api.close()

    def __enter__(self) -> NodeSimulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(remove_nodes=True)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # ------------------------------------------------------------ nodes

    @property
    def nodes(self) -> list[str]:
        """Names of the registered nodes."""
        with self._lock:
            return sorted(self._nodes)

    @property
    def schedulable(self) -> list[str]:
        """Nodes the scheduler would now bind an ordinary pod to, as far as it has seen:
        alive, Ready and not cordoned (taints and selectors aside)."""
        with self._lock:
            return sorted(n.name for n in self._nodes.values()
                          if n.alive and n.ready and not n.unschedulable)

    def add_nodes(self, count: int, labels: Mapping[str, str] | None = None, *,
                  prefix: str = "worker", taints: Sequence[Mapping[str, str]] = ()) -> list[str]:
        """Register ``count`` Ready nodes named ``<prefix>-<n>``, with their Leases; their
        names.

        If the simulator is running, returns once its scheduler has seen every new node
        Ready and without the ``not-ready`` taint that admission gives a new node (the
        node-lifecycle controller lifts it), so pods created next can go to any of them.
        Raises TimeoutError if that takes too long.
        """
        created = []
        for _ in range(count):
            name = f"{prefix}-{next(self._node_counter)}"
            node = _Node(name, node_labels(name, labels),
                         str(ipaddress.IPv4Address(next(self._node_ips))),
                         taints=[dict(t) for t in taints])
            if self._ports is not None:
                node.ip, node.port = KubeletPorts.HOST, self._ports.open(name)
            created.append(node)
        with self._lock:
            # Known before they exist: the watch is the only source of their API state.
            self._nodes.update((node.name, node) for node in created)
        try:
            list(self._pool.map(self._register, created))
        except BaseException:
            with self._lock:
                for node in created:
                    self._nodes.pop(node.name, None)
            raise
        if self._threads:
            self._await_usable([node.name for node in created],
                               NODES_USABLE + count / NODES_USABLE_PER_SECOND)
        return [node.name for node in created]

    def _await_usable(self, names: list[str], timeout: float) -> None:
        def usable(node: _Node) -> bool:
            return node.ready and not any(t.get("key") == _NOT_READY for t in node.taints)

        with self._node_seen:
            if not self._node_seen.wait_for(
                    lambda: all(usable(self._nodes[n]) for n in names), timeout):
                waiting = [n for n in names if not usable(self._nodes[n])]
                raise TimeoutError(f"{len(waiting)} new nodes not Ready and untainted after "
                                   f"{timeout:g}s: {', '.join(waiting[:5])}")

    def _register(self, node: _Node) -> None:
        register_node(self._api, node.name, node.labels, node.ip, taints=node.taints,
                      kubelet_port=node.port)
        self._status_posted[node.name] = time.monotonic()

    def stop_heartbeats(self, node: str, *, port_open: bool = False) -> None:
        """The node's kubelet dies: no Lease renewals, no status, no pod starts or
        deletions, and its port refuses. ``port_open``: it lives on but cannot reach the
        API server (a partition), so its port still answers."""
        with self._lock:
            self._nodes[node].alive = False
            self._candidates = None
        if self._ports is not None and not port_open:
            self._ports.close(node)

    def stop_heartbeats_together(self, nodes: Sequence[str]) -> None:
        """Several kubelets die at the same moment: each renews its Lease and posts its
        status once more, right now, then stops. Their leases then expire together, not
        up to a renewal interval apart, so the node controller sees them fail at once."""
        for node in nodes:
            self._renew_lease(node)
            self._post_status(node, False)
        for node in nodes:
            self.stop_heartbeats(node)

    def resume_heartbeats(self, node: str) -> None:
        """The kubelet is back: it posts Ready at once and catches up on its pods."""
        if self._ports is not None:
            self._ports.open(node)
        with self._lock:
            self._nodes[node].alive = True
            self._candidates = None
            pods = [self._pods[uid] for uid in self._unsettled if self._pods[uid].node == node]
        self._submit(self._renew_lease, node)
        self._submit(self._post_status, node, True)
        for pod in pods:
            self._kubelet(pod)

    def _renew_lease(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}"
        self._api.call("PATCH", path, patch=True,
                       body={"spec": {"renewTime": _micro_now(), "holderIdentity": name}})

    def _post_status(self, name: str, transition: bool) -> None:
        self._status_posted[name] = time.monotonic()
        post_node_status(self._api, name, ready=True, transition=transition)

    def _on_node(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        repost = False
        with self._lock:
            node = self._nodes.get(name)
            if node is None:
                return
            before = (node.ready, node.unschedulable, node.taints)
            spec = obj.get("spec", {})
            node.ready = kind != "DELETED" and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in obj.get("status", {}).get("conditions") or ())
            node.unschedulable = bool(spec.get("unschedulable"))
            node.taints = list(spec.get("taints") or [])
            changed = before != (node.ready, node.unschedulable, node.taints)
            if changed:
                self._candidates = None
                self._node_seen.notify_all()
            # A live kubelet reasserts Ready: the controller may have marked it Unknown
            # after a heartbeat came late (a loaded test machine).
            repost = node.alive and not node.ready and self._due(
                self._status_posted.get(name, 0.0), self.heartbeat)
            if repost:
                self._status_posted[name] = time.monotonic()
        if repost:
            self._submit(self._post_status, name, True)
        if changed:
            self._schedule_unbound()

    def _relist_nodes(self, items: list[Obj]) -> None:
        for item in items:
            self._on_node("MODIFIED", item)

    # ------------------------------------------------------------ pods

    def crashloop(self, namespace: str, pod: str) -> None:
        """Make the pod's containers crash-loop from now on (until the pod is gone)."""
        with self._lock:
            self._crashing.setdefault((namespace, pod), 0)

    def _on_pod(self, kind: str, obj: Obj) -> None:
        state = _pod_state(obj)
        key = (state.namespace, state.name)
        with self._lock:
            if kind == "DELETED":
                self._forget(state.uid)
                return
            self._pods[state.uid] = state
            self._by_key[key] = state.uid
            if state.node is None and not state.deleting:
                self._unbound[state.uid] = state
            else:
                self._unbound.pop(state.uid, None)
            if state.node in self._nodes and (state.deleting or not state.ready):
                self._unsettled.add(state.uid)
            else:
                self._unsettled.discard(state.uid)
        if state.node is None:
            self._schedule([state])
        else:
            self._kubelet(state)

    def _forget(self, uid: str) -> None:
        pod = self._pods.pop(uid, None)
        self._unbound.pop(uid, None)
        self._unsettled.discard(uid)
        self._started.pop(uid, None)
        self._arrived.pop(uid, None)
        if pod is not None:
            key = (pod.namespace, pod.name)
            if self._by_key.get(key) == uid:
                del self._by_key[key]
                self._crashing.pop(key, None)
        for action in ("bind", "start", "ready", "delete"):
            self._issued.pop((uid, action), None)

    def _relist_pods(self, items: list[Obj]) -> None:
        seen = {item["metadata"]["uid"] for item in items}
        with self._lock:
            for uid in set(self._pods) - seen:
                self._forget(uid)
        for item in items:
            self._on_pod("MODIFIED", item)

    def _kubelet(self, pod: _Pod) -> None:
        """What the kubelet of the pod's node does about it, if that kubelet is alive: finish
        its deletion, start it, or report it ready again."""
        with self._lock:
            node = self._nodes.get(pod.node or "")
            if node is None or not node.alive:
                return
            if pod.deleting:
                action = "delete"
            elif (pod.namespace, pod.name) in self._crashing:
                return  # the ticker reports each crash
            elif not pod.running:
                if not self._due(self._arrived.setdefault(pod.uid, time.monotonic()),
                                 self.start_delay):
                    return  # the resync starts it once the delay is over
                action = "start"
            elif not pod.ready:
                # The node-lifecycle controller marks the pods of a node it thinks dead
                # not ready; a kubelet that is alive sets its own view back.
                action = "ready"
            else:
                return
            if not self._claim(pod.uid, action):
                return
        if action == "delete":
            self._submit(self._delete_pod, pod)
        elif action == "start":
            self._submit(self._start_pod, pod, node)
        else:
            self._submit(self._patch_pod_status, pod, {
                "conditions": [c for c in _pod_conditions(_now(), ready=True)
                               if c["type"] == "Ready"]})

    def _claim(self, uid: str, action: str) -> bool:
        """Whether to issue ``action`` now: not asked recently (the caller holds the lock)."""
        if not self._due(self._issued.get((uid, action), 0.0), RETRY_AFTER):
            return False
        self._issued[(uid, action)] = time.monotonic()
        return True

    @staticmethod
    def _due(last: float, interval: float) -> bool:
        return time.monotonic() - last >= interval

    def _delete_pod(self, pod: _Pod) -> None:
        self._api.call("DELETE", pod.path, body={
            "gracePeriodSeconds": 0, "preconditions": {"uid": pod.uid}})

    def _start_pod(self, pod: _Pod, node: _Node) -> None:
        with self._lock:
            # A repeated start (the first one's result not yet seen) must say the same:
            # the API server merges pod IP lists and refuses two IPs of one family.
            ip, now = self._started.setdefault(
                pod.uid, (str(ipaddress.IPv4Address(next(self._pod_ips))), _now()))
        self._patch_pod_status(pod, running_status(pod.containers, host_ip=node.ip, pod_ip=ip,
                                                   now=now))

    def _crash(self, pod: _Pod, restarts: int) -> None:
        now = _now()
        statuses = [{"name": name, "image": image, "imageID": "", "ready": False,
                     "started": False, "restartCount": restarts,
                     "containerID": f"simulated://{uuid.uuid4().hex}",
                     "state": {"waiting": {"reason": "CrashLoopBackOff", "message": (
                         f"back-off restarting failed container {name} in pod "
                         f"{pod.name}_{pod.namespace}({pod.uid})")},
                         "running": None, "terminated": None},
                     "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                                  "startedAt": now, "finishedAt": now}}}
                    for name, image in pod.containers]
        self._patch_pod_status(pod, {"phase": "Running",
                                     "conditions": _pod_conditions(now, ready=False),
                                     "containerStatuses": statuses})

    def _patch_pod_status(self, pod: _Pod, status: Obj) -> None:
        self._api.call("PATCH", pod.path + "/status", patch=True,
                       body={"metadata": {"uid": pod.uid}, "status": status})

    # ------------------------------------------------------------ scheduler

    def _schedule_unbound(self) -> None:
        with self._lock:
            pods = list(self._unbound.values())
        self._schedule(pods)

    def _schedule(self, pods: Iterable[_Pod]) -> None:
        """Bind each of ``pods`` that is still unbound to the next node, round robin, that
        it fits (unless a binding was asked for recently)."""
        bindings = []
        with self._lock:
            if self._candidates is None:
                self._candidates = [n for n in self._nodes.values() if n.alive and n.ready]
            for pod in pods:
                if pod.pending is None or pod.deleting or not self._due(
                        self._issued.get((pod.uid, "bind"), 0.0), RETRY_AFTER):
                    continue
                node = self._pick(pod.pending, self._candidates)
                if node is not None:
                    self._issued[(pod.uid, "bind")] = time.monotonic()
                    bindings.append((pod, node))
        for pod, node in bindings:
            self._submit(self._bind, pod, node)

    def _pick(self, pod: Obj, candidates: list[_Node]) -> str | None:
        """The first node from the cursor on that the pod fits; the cursor moves past it.

        Usually the first one looked at: the cost is per pod, not per pod and node.
        """
        count = len(candidates)
        for step in range(count):
            node = candidates[(self._cursor + step) % count]
            if fits(pod, node):
                self._cursor = (self._cursor + step + 1) % count
                return node.name
        return None

    def _bind(self, pod: _Pod, node: str) -> None:
        self._api.call("POST", pod.path + "/binding", body={
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": pod.name, "uid": pod.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}})

    # ------------------------------------------------------------ the ticker

    def _tick(self) -> None:
        next_crash = time.monotonic() + self.crash_every
        while not self._stopping.wait(self.heartbeat):
            with self._lock:
                alive = [n.name for n in self._nodes.values() if n.alive]
                stale = [name for name in alive if self._due(
                    self._status_posted.get(name, 0.0), self.status_every)]
            list(self._pool.map(self._quietly(self._renew_lease), alive))
            for name in stale:
                self._submit(self._post_status, name, False)
            if time.monotonic() >= next_crash:
                next_crash = time.monotonic() + self.crash_every
                self._crash_tick()
            self._resync()

    def _crash_tick(self) -> None:
        crashes = []
        with self._lock:
            for key, restarts in self._crashing.items():
                pod = self._pods.get(self._by_key.get(key, ""))
                node = self._nodes.get(pod.node or "") if pod is not None else None
                if pod is None or pod.deleting or node is None or not node.alive:
                    continue
                self._crashing[key] = restarts + 1
                crashes.append((pod, restarts + 1))
        for pod, restarts in crashes:
            self._submit(self._crash, pod, restarts)

    def _resync(self) -> None:
        """Retry what a failed call (an API outage, a conflict) left undone."""
        with self._lock:
            unsettled = [self._pods[uid] for uid in self._unsettled]
        for pod in unsettled:
            self._kubelet(pod)
        self._schedule_unbound()

    # ------------------------------------------------------------ calls and watches

    def _submit(self, action: Callable[..., object], *args: Any) -> None:
        if self._stopping.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the pool shut down between check and submit
            self._pool.submit(self._quietly(action), *args)

    def _quietly(self, action: Callable[..., object]) -> Callable[..., None]:
        """``action``, with API errors logged instead of raised: the resync retries."""
        def run(*args: Any) -> None:
            try:
                action(*args)
            except ApiException as exc:
                # 404: gone meanwhile; 409: already bound or changed: the watch tells us.
                # 403 "being terminated": its namespace is going away, and the pod with it.
                if exc.status not in (404, 409) and "being terminated" not in str(exc.body):
                    log.warning("node simulator call failed", action=action.__name__,
                                status=exc.status, reason=exc.reason)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if not self._stopping.is_set():
                    log.debug("node simulator call failed", action=action.__name__,
                              error=str(exc))
        return run

    def _watch(self, path: str, handle: Callable[[str, Obj], None],
               relist: Callable[[list[Obj]], None]) -> None:
        """List, then watch from the list's resourceVersion until stopped; re-list on 410
        Gone; reconnect after an error (the API server may be down for a while)."""
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    items, version = self._list(path)
                    relist(items)
                version = self._follow(path, version, handle)
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stopping.is_set():
                    return
                if isinstance(exc, ApiException) and exc.status == 410:
                    version = None
                    continue
                log.debug("node simulator watch interrupted", path=path, error=str(exc))
                self._stopping.wait(RECONNECT)

    def _list(self, path: str) -> tuple[list[Obj], str]:
        items: list[Obj] = []
        token = ""
        while True:
            query: dict[str, str | int] = {"limit": LIST_PAGE}
            if token:
                query["continue"] = token
            page = self._api.call("GET", path, query=query)
            items += page.get("items") or []
            token = page["metadata"].get("continue") or ""
            if not token:
                return items, page["metadata"]["resourceVersion"]

    def _follow(self, path: str, version: str, handle: Callable[[str, Obj], None]) -> str | None:
        """Handle events until the stream ends; the version to resume from (None: re-list)."""
        stream = self._api.stream(path, {"resourceVersion": version,
                                         "allowWatchBookmarks": "true",
                                         "timeoutSeconds": WATCH_TIMEOUT})
        with self._lock:
            self._streams.add(stream)
        try:
            if self._stopping.is_set():
                return version
            for line in _lines(stream):
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = obj["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    handle(event["type"], obj)
            return version
        finally:
            with self._lock:
                self._streams.discard(stream)
            stream.release_conn()

    # ------------------------------------------------------------ teardown

    def _remove_nodes(self) -> None:
        """Force-delete the pods bound to our nodes, then the Leases and the Nodes."""
        with self._lock:
            names = set(self._nodes)
            self._nodes.clear()
            self._candidates = None
        if not names:
            return
        try:
            pods, _ = self._list("/api/v1/pods")
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("node simulator could not list pods to remove", error=str(exc))
            pods = []
        doomed = [_pod_state(p) for p in pods if p.get("spec", {}).get("nodeName") in names]
        list(self._pool.map(self._quietly(self._delete_pod), doomed))
        lease = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/"
        list(self._pool.map(self._quietly(lambda n: self._api.call("DELETE", lease + n)), names))
        list(self._pool.map(self._quietly(
            lambda n: self._api.call("DELETE", f"/api/v1/nodes/{n}")), names))


def _lines(stream: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    for line in stream:
        if line.strip():
            yield line


def _pod_conditions(now: str, *, ready: bool) -> list[Obj]:
    flag = "True" if ready else "False"
    reason = None if ready else "ContainersNotReady"
    return [{"type": kind, "status": status, "lastTransitionTime": now, "reason": why}
            for kind, status, why in (("PodReadyToStartContainers", "True", None),
                                      ("Initialized", "True", None),
                                      ("ContainersReady", flag, reason),
                                      ("Ready", flag, reason))]
