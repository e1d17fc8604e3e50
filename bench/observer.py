"""Observer cost: one KubernetesObserver against the real API server and many simulated nodes.

The parent process runs the control plane (etcd, kube-apiserver, kube-controller-manager
with a 40 s node-monitor grace) and a NodeSimulator (10 s heartbeats), registers
``--nodes`` nodes and ``--pods-per-node`` pods per node as Deployments of 100 replicas,
and waits until they are all ready. The observer runs alone in a child process
(``--child``), so its memory is not mixed with the simulator's. It measures:

- memory: VmRSS of the child before the observer is created and once its cache holds
  every node and pod;
- requests: list pages and watch requests per resource over a steady-state window
  (``--window`` seconds): watches are reconnected every 60 s, lists should be zero;
- NotReady latency: the parent stops one node's heartbeats; the child reports when the
  observer's snapshot first shows its Ready condition not True, and how long after the
  condition's lastTransitionTime that was (the time the observer adds; the timestamp
  has one-second resolution, so this is an upper bound).

Prints a JSON summary. Usage:
  .venv/bin/python bench/observer.py [--nodes N] [--pods-per-node P] [--window S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

from runtime.cluster.building import ensure_binaries
from runtime.cluster.controlplane import ControlPlane
from runtime.cluster.nodesim import JsonApi, NodeSimulator
from runtime.cluster.observing import (
    KubernetesObserver,
    ListCall,
    endpoints,
    load_client,
)

GRACE = 40.0  # --node-monitor-grace-period: a silent node turns NotReady after this
REPLICAS = 100  # per Deployment
NAMESPACE = "bench"
SYNC_TIMEOUT = 600.0
NOT_READY_TIMEOUT = 180.0


def rss_mib() -> float:
    """This process's resident set size now, in MiB."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


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


def deployment(name: str, replicas: int) -> dict[str, Any]:
    """A Deployment of ``replicas`` small pods."""
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "app", "image": "registry.example/app:1"}]}}}}


def create_pods(api: JsonApi, total: int) -> None:
    """Create ``total`` pods as Deployments of REPLICAS and wait until all are ready."""
    api.call("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": NAMESPACE}})
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


def progress(line: str) -> None:
    """A progress line on stderr (stdout is the JSON summary)."""
    print(line, file=sys.stderr, flush=True)


def read_event(stream: IO[str], event: str) -> dict[str, Any]:
    """The child's next JSON line, which must be ``event``."""
    line = stream.readline()
    if not line:
        raise RuntimeError(f"the observer process ended before {event!r}")
    record: dict[str, Any] = json.loads(line)
    if record.get("event") != event:
        raise RuntimeError(f"expected {event!r} from the observer process, got {record}")
    return record


def run(nodes: int, pods_per_node: int, window: float) -> dict[str, Any]:
    """Cluster, simulator, observer process: the measurements as one dict."""
    total = nodes * pods_per_node
    summary: dict[str, Any] = {"machine": machine(), "nodes": nodes,
                               "pods_per_node": pods_per_node, "pods": total,
                               "node_monitor_grace_s": GRACE}
    with tempfile.TemporaryDirectory(prefix="zeta-bench-observer-") as work, \
            ControlPlane(Path(work), node_monitor_grace=GRACE,
                         binaries=ensure_binaries()) as cp, \
            NodeSimulator(cp.admin_kubeconfig, heartbeat=10, status_every=300,
                          workers=16) as sim, JsonApi(cp.admin_kubeconfig) as api:
        started = time.monotonic()
        names = sim.add_nodes(nodes)
        summary["register_nodes_s"] = round(time.monotonic() - started, 1)
        progress(f"{nodes} nodes Ready after {summary['register_nodes_s']}s")
        started = time.monotonic()
        create_pods(api, total)
        summary["create_pods_s"] = round(time.monotonic() - started, 1)
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
            victim = names[len(names) // 2]
            stopped = time.time()
            sim.stop_heartbeats(victim)
            proc.stdin.write(victim + "\n")
            proc.stdin.flush()
            seen = read_event(proc.stdout, "not_ready")
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
            "node": victim,
            "heartbeats_stopped_to_observed_s": round(seen["seen_at"] - stopped, 2),
            "minus_grace_s": round(seen["seen_at"] - stopped - GRACE, 2),
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
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pods", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # stdout is the JSON (the summary, or the child's lines to the parent): logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.child is not None:
        asyncio.run(child(args.child, args.nodes, args.pods, args.window))
        return 0
    summary = run(args.nodes, args.pods_per_node, args.window)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
