"""Footprint of one agent: time to READY=1, and idle memory and CPU with the shipped 15 s tick.

One persona (``--persona``, default otto, which runs the most policies) as
``python -m runtime run <persona>``, started by ``lab.fleet.start_agent`` as
systemd would start it: its own state directory, JSON logs, and a ``NOTIFY_SOCKET``
that this bench reads all along, as systemd does. Its configuration is a copy of the
shipped one (``lab.fleet.prepare_config``): shipped policies and tick, a fresh
key, on a real nats-server, so the bus is connected. The other four personas run
too (and are ready before the first start), so the agent measured is one of a
healthy fleet: no silent peers, nothing to repair. Two cases:

- ``no kubeconfig``: nothing to observe in Kubernetes, only the host and the bus;
- ``small cluster``: a kubeconfig (the persona's token user, bound to the RBAC
  rendered from its scopes) for a real control plane with the node simulator's 9
  nodes heartbeating every 10 s as kubelets do, and one Deployment of 6 pods. The
  agent lists and watches nodes, leases, ReplicaSets, pods and Warning events, and
  probes the API server every tick.

For each case, ``--starts`` starts are timed from just before the process is spawned
to the READY=1 datagram (the agent says it once the configuration is loaded and the
first observation pass is done). The last start is left running: once it has ticked
twice, its VmRSS is sampled every second and its CPU time (its own, and its reaped
children's: the unit observer runs ``systemctl`` every tick) is read at both ends of
a ``--window`` of seconds.

Targets (issue 7): ≤ 80 MB RSS and ≤ 1% of a core idle; READY=1 within 2 s.
Usage: .venv/bin/python -m bench.footprint [--window S] [--starts N] [--persona NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from bench.common import REPO, Check, machine_lines, spread, work_directory
from lab.building import ensure_binaries
from lab.controlplane import ControlPlane
from lab.fleet import (
    AgentProcess,
    deployment,
    init_bus,
    install_kubernetes,
    persona_users,
    prepare_config,
    start_agent,
    stop_agents,
)
from lab.natsserver import NatsServer
from lab.nodesim import JsonApi, NodeSimulator
from lab.tools import stderr_progress as progress
from runtime.agent import logs
from runtime.config.loading import config_paths, load

RSS_TARGET = 80e6  # bytes
CPU_TARGET = 0.01  # of one core
READY_TARGET = 2.0  # seconds
TICK = timedelta(seconds=15)  # the shipped personas' tick
READY_LIMIT = 60.0
SETTLE_TICKS = 2
NODES = 9
PODS = 6
NAMESPACE = "footprint"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Notifications:
    """What an agent told its service manager (this bench) on its notify socket."""

    agent: AgentProcess
    ready_at: float | None = None  # time.monotonic() of READY=1
    status: str = ""

    def read(self, timeout: float = 0.0) -> None:
        """Take in every datagram waiting, after waiting up to ``timeout`` for one."""
        sock = self.agent.notify
        assert sock is not None
        ready, _, _ = select.select([sock], [], [], timeout)
        while ready:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            now = time.monotonic()
            for assignment in data.decode("utf-8", "replace").splitlines():
                key, _, value = assignment.partition("=")
                if key == "READY" and self.ready_at is None:
                    self.ready_at = now
                elif key == "STATUS":
                    self.status = value

    def wait(self, done: str, limit: float) -> None:
        """Read until ``done`` (``ready`` or ``tick N``) holds; raise if the agent exits."""
        deadline = time.monotonic() + limit
        while not self._holds(done):
            if self.agent.process.poll() is not None:
                raise RuntimeError(f"{self.agent.name} exited with code "
                                   f"{self.agent.process.returncode} waiting for {done}; its "
                                   f"log: {self.agent.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.agent.name}: no {done} after {limit:g}s")
            self.read(0.2)

    def _holds(self, done: str) -> bool:
        if done == "ready":
            return self.ready_at is not None
        ticks = self.status.split(":")[0].removeprefix("tick ")
        return ticks.isdigit() and int(ticks) >= int(done.removeprefix("tick "))


@dataclass
class Sample:
    """One look at the process in /proc."""

    rss: int  # bytes
    cpu: float  # seconds: user + system, its own
    children: float  # seconds: user + system of its reaped children
    threads: int
    fds: int


def sample(pid: int) -> Sample:
    """The process's resident set, CPU times, threads and open descriptors now."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines()
               if line.startswith("VmRSS:"))
    # Fields after the command (which may hold spaces) start at field 3, the state.
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return Sample(rss, (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK,
                  int(fields[17]), len(os.listdir(f"/proc/{pid}/fd")))


@dataclass
class Case:
    """One configuration measured: its start times and its idle samples."""

    name: str
    ready: list[float] = field(default_factory=list)  # seconds, spawn to READY=1
    samples: list[Sample] = field(default_factory=list)
    window: float = 0.0
    status: str = ""

    def cpu(self) -> float:
        """Fraction of one core over the window, its reaped children included."""
        first, last = self.samples[0], self.samples[-1]
        return (last.cpu + last.children - first.cpu - first.children) / self.window

    def lines(self) -> list[str]:
        first, last = self.samples[0], self.samples[-1]
        rss = [s.rss / 2**20 for s in self.samples]
        children = (last.children - first.children) / self.window
        return [
            f"{self.name}: last STATUS= {self.status!r}",
            f"  spawn → READY=1: {spread(self.ready)}",
            f"  RSS over {self.window:.0f} s idle: start {rss[0]:.1f} MiB, max {max(rss):.1f} "
            f"MiB, end {rss[-1]:.1f} MiB; {last.threads} threads, {last.fds} open descriptors",
            f"  CPU over {self.window:.0f} s idle: {self.cpu() * 100:.2f}% of a core "
            f"({children * 100:.2f}% of it in reaped children)",
        ]

    def checks(self) -> list[Check]:
        peak = max(s.rss for s in self.samples)
        slowest = max(self.ready)
        return [
            Check(f"{self.name}: idle RSS (max of the window)",
                  f"{peak / 2**20:.1f} MiB ({peak / 1e6:.1f} MB)", "≤ 80 MB",
                  peak <= RSS_TARGET),
            Check(f"{self.name}: idle CPU, tick {TICK.total_seconds():g} s",
                  f"{self.cpu() * 100:.2f}% of a core", "≤ 1%", self.cpu() <= CPU_TARGET),
            Check(f"{self.name}: spawn → READY=1", spread(self.ready), "≤ 2 s (max)",
                  slowest <= READY_TARGET),
        ]


def measure(case: Case, config_dir: Path, workdir: Path, persona: str, *, starts: int,
            window: float) -> None:
    """Time ``starts`` starts of ``persona``; keep the last one running for ``window``."""
    for number in range(starts):
        began = time.monotonic()
        agent = start_agent(config_dir, persona, workdir / f"{case.name}-{number}".replace(
            " ", "-"))
        try:
            notes = Notifications(agent)
            notes.wait("ready", READY_LIMIT)
            assert notes.ready_at is not None
            case.ready.append(notes.ready_at - began)
            progress(f"{case.name}: start {number + 1}/{starts} READY=1 after "
                     f"{case.ready[-1]:.2f}s")
            if number == starts - 1:
                idle(case, notes, window)
        finally:
            stop_agents({agent.name: agent})


def idle(case: Case, notes: Notifications, window: float) -> None:
    """Sample the agent every second over ``window`` seconds once it has settled."""
    notes.wait(f"tick {SETTLE_TICKS}", TICK.total_seconds() * (SETTLE_TICKS + 1))
    pid = notes.agent.process.pid
    started = time.monotonic()
    case.samples.append(sample(pid))
    while (left := started + window - time.monotonic()) > 0:
        notes.read(min(1.0, left))
        case.samples.append(sample(pid))
    case.window = time.monotonic() - started
    case.status = notes.status
    progress(f"{case.name}: {case.lines()[2].strip()}; {case.lines()[3].strip()}")


@contextlib.contextmanager
def peers(config_dir: Path, workdir: Path, names: Sequence[str]) -> Iterator[None]:
    """The other personas running, ready, and read by a service manager: a healthy fleet.

    Alone, an agent finds its peers silent (peer-silent) and keeps proposing repairs
    that nobody can approve; that is not idle.
    """
    agents = [start_agent(config_dir, name, workdir / "peers") for name in names]
    notes = [Notifications(agent) for agent in agents]
    stop = threading.Event()

    def service_manager() -> None:
        while not stop.wait(0.2):
            for note in notes:
                note.read()

    reader = threading.Thread(target=service_manager, name="peers-notify", daemon=True)
    try:
        for note in notes:
            note.wait("ready", READY_LIMIT)
        reader.start()
        yield
    finally:
        stop.set()
        if reader.is_alive():
            reader.join()
        stop_agents({agent.name: agent for agent in agents})


@contextlib.contextmanager
def small_cluster(workdir: Path) -> Iterator[ControlPlane]:
    """A control plane, NODES simulated nodes heartbeating as kubelets do, PODS pods."""
    # 10 s Lease renewals and a 40 s grace: a kubelet's and a controller manager's defaults.
    with ControlPlane(workdir, users=persona_users(REPO), node_monitor_grace=40,
                      binaries=ensure_binaries()) as plane, \
            NodeSimulator(plane.admin_kubeconfig, heartbeat=10, status_every=60) as sim, \
            JsonApi(plane.admin_kubeconfig) as api:
        sim.add_nodes(NODES)
        api.call("POST", "/api/v1/namespaces", body={"metadata": {"name": NAMESPACE}})
        deadline = time.monotonic() + 60
        while not api.call("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts")["items"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no default ServiceAccount in {NAMESPACE} after 60s")
            time.sleep(0.2)
        api.call("POST", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
                 body=deployment("web", PODS))
        yield plane


def run(workdir: Path, persona: str, starts: int, window: float) -> list[Case]:
    """Both cases, on one nats-server."""
    cases = [Case("no kubeconfig"), Case("small cluster")]
    with NatsServer(workdir / "nats") as server:
        bare = workdir / "bare"
        names = prepare_config(REPO, bare / "config", tick=TICK, nats_url=server.url)
        # As an operator does once (`zeta-agent bus init`): agents only check the bus's
        # resources, and without them run degraded ("resources incompatible").
        asyncio.run(init_bus(server.url, load(config_paths(bare / "config"))))
        others = [name for name in names if name != persona]
        with peers(bare / "config", bare, others):
            measure(cases[0], bare / "config", bare, persona, starts=starts, window=window)
        with small_cluster(workdir / "k8s") as plane:
            cluster = workdir / "cluster"
            prepare_config(REPO, cluster / "config", tick=TICK, nats_url=server.url,
                           fleet_spec={"apiservers": [plane.url]})
            install_kubernetes(cluster / "config", plane)
            with peers(cluster / "config", cluster, others):
                measure(cases[1], cluster / "config", cluster, persona, starts=starts,
                        window=window)
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the machine, the numbers and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--persona", default="otto", help="the persona to run (default otto)")
    parser.add_argument("--starts", type=int, default=5, metavar="N",
                        help="starts timed per case (default 5)")
    parser.add_argument("--window", type=float, default=180.0, metavar="S",
                        help="idle seconds sampled per case (default 180)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="keep everything (the agent's logs among it) in DIR, which "
                             "must not exist yet; default: a temporary directory")
    args = parser.parse_args(argv)
    if args.starts < 1 or args.window < 1:
        parser.error("--starts ≥ 1 and --window ≥ 1")
    logs.configure("console", level="warning", stream=sys.stderr)
    with ExitStack() as stack:
        work = work_directory(stack, args.workdir, "zeta-bench-footprint-")
        cases = run(work, args.persona, args.starts, args.window)
    lines = [*machine_lines(), f"footprint of {args.persona}, tick {TICK.total_seconds():g} s"]
    for case in cases:
        lines += case.lines()
    lines += [check.line() for case in cases for check in case.checks()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
