"""Observer cost: one KubernetesObserver against the real API server and many simulated nodes.

The parent process runs the control plane (etcd, kube-apiserver, kube-controller-manager)
and makes ``--nodes`` nodes and ``--pods-per-node`` pods per node exist, in one of two
ways (``--population``):

- ``live`` (the default): a NodeSimulator (10 s heartbeats) registers the nodes and
  runs them; the pods are Deployments of 100 replicas, which the ReplicaSet controller
  creates, the simulator schedules and starts; the node-monitor grace is 40 s. Every
  controller and kubelet loop runs, which two cores sustain for about 1,000 nodes and
  10,000 pods;
- ``static``: the objects exist without anything running them. Nodes are created
  Ready with a Lease and never heartbeat (the node-monitor grace is a day, so the
  node-lifecycle controller leaves them Ready); pods are created bound to their node
  (no scheduler, no Deployments) and reported Running and ready through the status
  subresource, ``WORKERS`` requests in flight. This is what makes 5,000 nodes and
  150,000 pods possible on a small machine.

The observer runs alone in a child process (``--child``), so its memory is not mixed
with the parent's. It measures:

- memory: VmRSS of the child before the observer is created and once its cache holds
  every node and pod;
- requests: list pages and watch requests per resource over a steady-state window
  (``--window`` seconds): watches are reconnected every 60 s, lists should be zero;
- NotReady latency: the parent makes one node NotReady (live: stops its heartbeats, and
  the node-lifecycle controller marks it Unknown after the grace; static: posts its
  ``Ready=False`` as a kubelet whose container runtime died would); the child reports
  when the observer's snapshot first shows its Ready condition not True, and how long
  after the condition's lastTransitionTime that was (the time the observer adds; the
  timestamp has one-second resolution, so this is an upper bound). In static mode the
  time from the status patch is exact.

It also reads the control plane's RSS from /proc. Prints a JSON summary (progress on
stderr). Usage:
  .venv/bin/python bench/observer.py [--nodes N] [--pods-per-node P] [--window S]
                                     [--population live|static]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog
from kubernetes.client.exceptions import ApiException

from lab.building import ensure_binaries
from lab.controlplane import ControlPlane
from lab.nodesim import (
    FIRST_NODE_IP,
    FIRST_POD_IP,
    JsonApi,
    NodeSimulator,
    node_labels,
    post_node_status,
    register_node,
    running_status,
)
from lab.tools import stderr_progress as progress
from runtime.kube.client import load_client
from runtime.kube.observing import KubernetesObserver, ListCall, endpoints

REPLICAS = 100  # per Deployment (live)
NAMESPACE = "bench"
CONTAINER = {"name": "app", "image": "registry.example/app:1"}
SYNC_TIMEOUT = 1800.0  # pods ready (live), and the observer's cache full
NOT_READY_TIMEOUT = 180.0
WORKERS = 32
"""Requests in flight while a static population is created."""
PROGRESS_EVERY = 10.0


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident set size now, in MiB (this process's by default)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def machine() -> str:
    """What the numbers were measured on."""
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next(int(line.split()[1]) for line in
                   Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
                   if line.startswith("MemTotal:"))
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem_kib / 2**20:.1f} GiB RAM, "
            f"Python {platform.python_version()}")


# ---------------------------------------------------------------- the child: the observer


def counted(calls: Mapping[str, ListCall], counts: Counter[str]) -> dict[str, ListCall]:
    """The same list calls, counting list pages and watch requests per resource."""
    def wrap(name: str, call: ListCall) -> ListCall:
        def request(*args: Any, **kwargs: Any) -> Any:
            counts[f"{name} {'watch' if kwargs.get('watch') else 'list page'}"] += 1
            return call(*args, **kwargs)
        return request
    return {name: wrap(name, call) for name, call in calls.items()}


def wait_full(observer: KubernetesObserver, nodes: int, pods: int, deadline: float) -> None:
    """Wait (until ``deadline``) for the cache to hold ``nodes`` nodes and ``pods`` pods."""
    while (len(observer.cache.nodes) < nodes or len(observer.cache.pods) < pods) and (
            time.monotonic() < deadline):
        time.sleep(0.5)


def emit(out: IO[str], record: Mapping[str, Any]) -> None:
    """One JSON line to the parent."""
    out.write(json.dumps(record) + "\n")
    out.flush()


async def child(kubeconfig: Path, nodes: int, pods: int, window: float) -> None:
    """Sync one observer, report memory, count requests over ``window``, then time a
    NotReady node named on stdin."""
    rss_before = rss_mib()
    counts: Counter[str] = Counter()
    api = load_client(kubeconfig)
    observer = KubernetesObserver(counted(endpoints(api), counts),
                                  url=api.configuration.host, stale_after=60.0,
                                  initial_wait=SYNC_TIMEOUT, close=api.close)
    started = time.monotonic()
    observed = await observer.observe(datetime.now(UTC))
    first_lists = time.monotonic() - started
    await asyncio.to_thread(wait_full, observer, nodes, pods, started + SYNC_TIMEOUT)
    synced = time.monotonic() - started
    observed = await observer.observe(datetime.now(UTC))
    emit(sys.stdout, {"event": "synced", "rss_before_mib": round(rss_before, 1),
                      "rss_synced_mib": round(rss_mib(), 1),
                      "first_lists_s": round(first_lists, 2), "synced_s": round(synced, 2),
                      "nodes": len(observer.cache.nodes), "pods": len(observer.cache.pods),
                      "status_ok": observed.status.ok, "requests_to_sync": dict(counts)})

    # Steady state: the counts from here on are the observer's ongoing cost.
    before, lists_before = Counter(counts), observer.lists()
    await asyncio.sleep(window)
    per_minute = {k: round((counts[k] - before[k]) * 60 / window, 2) for k in counts}
    emit(sys.stdout, {"event": "steady", "window_s": window, "requests_per_minute": per_minute,
                      "complete_lists_in_window": {
                          k: v - lists_before[k] for k, v in observer.lists().items()},
                      "rss_steady_mib": round(rss_mib(), 1)})

    node = sys.stdin.readline().strip()
    deadline = time.monotonic() + NOT_READY_TIMEOUT
    while time.monotonic() < deadline:
        observed = await observer.observe(datetime.now(UTC))
        obs = next((n for n in observed.data.get("nodes") or () if n.name == node), None)
        ready = obs.condition("Ready") if obs is not None else None
        if ready is not None and ready.status != "True":
            seen = datetime.now(UTC)
            emit(sys.stdout, {"event": "not_ready", "node": node, "seen_at": seen.timestamp(),
                              "status": ready.status,
                              "since": ready.since.timestamp() if ready.since else None,
                              "rss_end_mib": round(rss_mib(), 1)})
            break
        await asyncio.sleep(0.05)
    else:
        emit(sys.stdout, {"event": "timeout", "node": node})
    observer.stop()


# ---------------------------------------------------------------- the parent: the cluster


def create_namespace(api: JsonApi) -> None:
    """The pods' namespace, once usable: the ServiceAccount admission refuses pods in it
    until the controller manager has made its ``default`` ServiceAccount."""
    api.call("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": NAMESPACE}})
    deadline = time.monotonic() + 60
    while True:
        try:
            api.call("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default")
            return
        except ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def deployment(name: str, replicas: int) -> dict[str, Any]:
    """A Deployment of ``replicas`` small pods."""
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [CONTAINER]}}}}


def create_deployments(api: JsonApi, total: int) -> None:
    """Create ``total`` pods as Deployments of REPLICAS and wait until all are ready."""
    for index in range(math.ceil(total / REPLICAS)):
        api.call("POST", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
                 body=deployment(f"app-{index}", min(REPLICAS, total - index * REPLICAS)))
    started = time.monotonic()
    ready = 0
    while ready < total:
        if time.monotonic() - started > SYNC_TIMEOUT:
            raise TimeoutError(f"only {ready} of {total} pods ready after {SYNC_TIMEOUT:g}s")
        time.sleep(5)
        items = api.call("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments")["items"]
        ready = sum(int(d.get("status", {}).get("readyReplicas") or 0) for d in items)
        progress(f"{ready}/{total} pods ready after {time.monotonic() - started:.0f}s")


def start_pod(api: JsonApi, name: str, node: str, host_ip: str, pod_ip: str) -> None:
    """Create a pod already bound to ``node``, then report it running and ready as its
    kubelet would (a pod's status is not taken from its creation)."""
    path = f"/api/v1/namespaces/{NAMESPACE}/pods"
    api.call("POST", path, body={"apiVersion": "v1", "kind": "Pod",
                                 "metadata": {"name": name, "namespace": NAMESPACE},
                                 "spec": {"nodeName": node, "containers": [CONTAINER]}})
    api.call("PATCH", f"{path}/{name}/status", patch=True, body={"status": running_status(
        [(CONTAINER["name"], CONTAINER["image"])], host_ip=host_ip, pod_ip=pod_ip)})


def in_parallel(what: str, tasks: Iterable[Callable[[], object]], total: int) -> float:
    """Run ``tasks`` on WORKERS threads, printing progress; the seconds it took.

    The first failure stops the others and is raised: a half-made population would
    measure something else.
    """
    pending = iter(tasks)
    lock = threading.Lock()
    failed = threading.Event()
    done = 0

    def work() -> None:
        nonlocal done
        while not failed.is_set():
            with lock:
                task = next(pending, None)
            if task is None:
                return
            try:
                task()
            except BaseException:
                failed.set()
                raise
            with lock:
                done += 1

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="populate") as pool:
        workers = [pool.submit(work) for _ in range(WORKERS)]
        while True:
            finished, running = wait(workers, PROGRESS_EVERY, return_when=FIRST_EXCEPTION)
            for future in finished:
                future.result()
            elapsed = time.monotonic() - started
            progress(f"{what}: {done}/{total} after {elapsed:.0f}s ({done / elapsed:.0f}/s)")
            if not running:
                return round(elapsed, 1)


@dataclass(frozen=True)
class Cluster:
    """What a population made: its node names, and how to make one of them NotReady."""

    nodes: list[str]
    make_not_ready: Callable[[str], None]


@contextlib.contextmanager
def live(cp: ControlPlane, api: JsonApi, nodes: int, pods_per_node: int,
         summary: dict[str, Any]) -> Iterator[Cluster]:
    """Simulated kubelets and scheduler, real controllers: everything runs."""
    with NodeSimulator(cp.admin_kubeconfig, heartbeat=10, status_every=300, workers=16) as sim:
        started = time.monotonic()
        names = sim.add_nodes(nodes)
        summary["register_nodes_s"] = round(time.monotonic() - started, 1)
        progress(f"{nodes} nodes Ready after {summary['register_nodes_s']}s")
        started = time.monotonic()
        create_namespace(api)
        create_deployments(api, nodes * pods_per_node)
        summary["create_pods_s"] = round(time.monotonic() - started, 1)
        yield Cluster(names, sim.stop_heartbeats)


@contextlib.contextmanager
def static(cp: ControlPlane, api: JsonApi, nodes: int, pods_per_node: int,
           summary: dict[str, Any]) -> Iterator[Cluster]:
    """Objects that exist without anything running them (see the module docstring)."""
    names = [f"worker-{index}" for index in range(nodes)]
    ips = [str(FIRST_NODE_IP + index) for index in range(nodes)]
    summary["register_nodes_s"] = in_parallel("nodes", (
        functools.partial(register_node, api, name, node_labels(name), ip)
        for name, ip in zip(names, ips, strict=True)), nodes)
    create_namespace(api)
    summary["create_pods_s"] = in_parallel("pods", (
        functools.partial(start_pod, api, f"{name}-{slot}", name, ip,
                          str(FIRST_POD_IP + index * pods_per_node + slot))
        for index, (name, ip) in enumerate(zip(names, ips, strict=True))
        for slot in range(pods_per_node)), nodes * pods_per_node)
    yield Cluster(names, functools.partial(post_node_status, api, ready=False, transition=True))


@dataclass(frozen=True)
class Population:
    """One way of making the cluster's objects exist."""

    populate: Callable[[ControlPlane, JsonApi, int, int, dict[str, Any]],
                       contextlib.AbstractContextManager[Cluster]]
    grace: float
    """--node-monitor-grace-period: a node without heartbeats turns NotReady after this."""
    fault: str
    """How the victim node is made NotReady."""


POPULATIONS = {
    "live": Population(live, 40.0, "heartbeats stopped; the node-lifecycle controller "
                                   "sets Ready=Unknown after the grace"),
    # A day: the nodes never heartbeat, and must stay Ready for the whole run.
    "static": Population(static, 86400.0, "its kubelet posts Ready=False (node status patch)"),
}


def control_plane_rss(cp: ControlPlane) -> dict[str, float]:
    """The RSS of each control-plane process now, in MiB."""
    return {name: round(rss_mib(pid), 1) for name, pid in cp.pids.items()}


def read_event(stream: IO[str], event: str) -> dict[str, Any]:
    """The child's next JSON line, which must be ``event``."""
    line = stream.readline()
    if not line:
        raise RuntimeError(f"the observer process ended before {event!r}")
    record: dict[str, Any] = json.loads(line)
    if record.get("event") != event:
        raise RuntimeError(f"expected {event!r} from the observer process, got {record}")
    return record


def run(nodes: int, pods_per_node: int, window: float, population: str) -> dict[str, Any]:
    """Cluster, population, observer process: the measurements as one dict."""
    how = POPULATIONS[population]
    total = nodes * pods_per_node
    summary: dict[str, Any] = {"machine": machine(), "population": population, "nodes": nodes,
                               "pods_per_node": pods_per_node, "pods": total,
                               "node_monitor_grace_s": how.grace}
    with tempfile.TemporaryDirectory(prefix="zeta-bench-observer-") as work, \
            ControlPlane(Path(work), node_monitor_grace=how.grace,
                         binaries=ensure_binaries()) as cp, \
            JsonApi(cp.admin_kubeconfig, pool_size=WORKERS) as api, \
            how.populate(cp, api, nodes, pods_per_node, summary) as cluster:
        rss_populated = control_plane_rss(cp)
        progress(f"populated: {summary}; control plane RSS (MiB): {rss_populated}")
        with subprocess.Popen(
                [sys.executable, __file__, "--child", str(cp.admin_kubeconfig),
                 "--nodes", str(nodes), "--pods", str(total), "--window", str(window)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdin is not None
            assert proc.stdout is not None
            synced = read_event(proc.stdout, "synced")
            progress(f"observer synced: {synced}")
            steady = read_event(proc.stdout, "steady")
            progress(f"steady state: {steady}")
            victim = cluster.nodes[len(cluster.nodes) // 2]
            # The child watches for the victim first, so the fault is the only delay.
            proc.stdin.write(victim + "\n")
            proc.stdin.flush()
            faulted = time.time()
            cluster.make_not_ready(victim)
            seen = read_event(proc.stdout, "not_ready")
        summary["control_plane_rss_mib"] = {"populated": rss_populated,
                                            "end": control_plane_rss(cp)}
    since = seen["since"]
    summary["memory_mib"] = {
        "before_observer": synced["rss_before_mib"], "synced": synced["rss_synced_mib"],
        "growth": round(synced["rss_synced_mib"] - synced["rss_before_mib"], 1),
        "steady": steady["rss_steady_mib"], "end": seen["rss_end_mib"]}
    summary["sync"] = {k: synced[k] for k in ("first_lists_s", "synced_s", "nodes", "pods",
                                              "status_ok", "requests_to_sync")}
    summary["steady_state"] = {k: steady[k] for k in (
        "window_s", "requests_per_minute", "complete_lists_in_window")}
    summary["not_ready"] = {
        "node": victim, "fault": how.fault,
        "fault_to_observed_s": round(seen["seen_at"] - faulted, 3),
        "condition_changed_to_observed_s":
            None if since is None else round(seen["seen_at"] - since, 2),
    }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with --child, the observer process) and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods-per-node", type=int, default=30)
    parser.add_argument("--window", type=float, default=120.0,
                        help="seconds of steady state over which requests are counted")
    parser.add_argument("--population", choices=sorted(POPULATIONS), default="live",
                        help="live: simulated kubelets, scheduler and Deployments (small "
                             "runs); static: objects created ready, nothing running them")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pods", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # stdout is the JSON (the summary, or the child's lines to the parent): logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.child is not None:
        asyncio.run(child(args.child, args.nodes, args.pods, args.window))
        return 0
    summary = run(args.nodes, args.pods_per_node, args.window, args.population)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
