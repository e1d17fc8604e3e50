"""``zeta-lab`` (``make lab``): five agents repair a real control plane, every step shown.

It starts, from ``lab.fleet`` (the harness ``tests/test_e2e_k8s.py`` runs on):
nats-server with JetStream; etcd, kube-apiserver and kube-controller-manager (built
into the cache the first time, ``lab.building``); the node simulator with
3 control-plane-labelled and 6 worker nodes and a few Deployments under
PodDisruptionBudgets; and the five personas as ``python -m runtime run <name>``
processes, each with a fresh key, its own kubeconfig bound to the RBAC rendered from
its scopes, and the harness's short timings. Then a scripted drill: a dead kubelet,
a crash loop, an API server outage, too many dead nodes at once (the breaker), and a
forged vote. The bus is read through ``runtime.ops.watch.View``, the verifying view of
``zeta-agent watch``, so every line shown is what the agents themselves accept (or
drop, with the reason). Each step ends with what the agents saw, who proposed, each
vote with its reason, the decision, the action and its verification; the drill ends
with a summary table and ``zeta-agent audit verify`` on the audit stream.

The exit code is 0 when every step passed, 1 when one failed, 2 when the lab could not
start, 130 when interrupted. Ctrl-C at any point stops everything it started (agents,
node simulator, control plane, nats-server) and removes its working directory;
``--keep`` leaves it all up after the drill, with the commands to explore it, until
Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console, Group
from rich.panel import Panel
from rich.rule import Rule
from rich.status import Status
from rich.table import Table
from rich.text import Text

from bus import ids
from bus.envelope import Accepted, Dropped, Envelope, seal
from bus.keys import Signer, generate_user_seed
from bus.messages import Decision, Finding, Heartbeat, Proposal, Result, Started, Vote
from bus.subjects import vote as vote_subject
from lab.building import binaries_in, k8s_cache
from lab.controlplane import ADMIN, ControlPlane
from lab.fleet import (
    AgentFleet,
    FleetError,
    Seen,
    deployment,
    kubeconfig_path,
    persona_users,
    prepare_fleet,
    start_fleet,
    wait_until,
)
from lab.natsserver import NatsServer
from lab.nodesim import JsonApi, NodeSimulator
from lab.tools import NATSCLI, cache_dir
from runtime.agent import logs
from runtime.ops.watch import describe

T = TypeVar("T")

NAMESPACE = "lab"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
WORKLOADS = (("web", 3, {"minAvailable": 2}), ("api", 2, {"maxUnavailable": 1}),
             ("flaky", 1, None))
"""(name, replicas, PodDisruptionBudget spec or None)."""
BREAKER_NODES = 4  # of 9: over node-not-ready's 0.3 with room to spare, the breaker trips
# (at 3/9 already if the controller marks the fourth a tick later) before any for: passes.
STEPS = ("kubelet", "crashloop", "apiserver", "breaker", "forged")
# How long each step may take before it counts as failed: generous for two busy cores,
# a bound rather than a delay (every wait returns as soon as its condition holds).
STEP_LIMIT = 150.0
QUIET_FOR = 8.0
"""How long an outage or a tripped breaker is watched for something that must not happen:
longer than ``for:`` (5 s) plus a tick, so a repair that would start has had its chance."""
INTERRUPTED = 130
_TICK = re.compile(r"^tick \d+: ")
AGENT_EVENTS = frozenset({"intent refused", "intent held", "breaker.tripped", "message dropped"})
"""Agents' log events shown in a step's story: why something was not done, or was dropped."""
KUBECTL_VERSION = "v1.37.2"


class Interrupted(Exception):  # noqa: N818 - it is the event, not an error
    """Ctrl-C (or SIGTERM) arrived: stop, clean up, exit 130."""


# ---------------------------------------------------------------- what a step shows


@dataclass
class StepResult:
    """One row of the summary table, and the story printed when the step ends."""

    number: int
    title: str
    expected: str
    observed: str = ""
    passed: bool = False
    seconds: float = 0.0
    story: list[tuple[str, str]] = field(default_factory=list)


METRICS_SHOWN = {
    "zeta_agent_ticks_total": "ticks",
    "zeta_agent_proposals_total": "proposals",
    "zeta_agent_votes_total": "votes",
    "zeta_agent_executions_total": "executions",
    "zeta_agent_messages_dropped_total": "dropped messages",
}
"""The counters the metrics step shows per agent, with their column titles."""

_STYLE = {"finding": "yellow", "proposal": "cyan", "vote": "blue", "decision": "magenta",
          "started": "bold", "result": "green", "heartbeat": "dim", "control": "red"}


def bus_text(seen: Seen) -> Text:
    """A bus line for the terminal: dropped messages in red, the rest by kind."""
    if isinstance(seen.outcome, Dropped):
        return Text(f"  bus {seen.line}", style="bold red")
    return Text(f"  bus {seen.line}", style=_STYLE.get(seen.outcome.envelope.kind, ""))


def story(accepted: Iterable[Accepted], dropped: Iterable[Seen] = ()) -> list[tuple[str, str]]:
    """What the bus carried, grouped as the lab explains a repair: saw, proposed, votes,
    decision, action, verification (``describe`` wording, as ``zeta-agent watch``)."""
    rows: list[tuple[str, str]] = []
    for message in accepted:
        env, body = message.envelope, message.body
        label = {Finding: "saw", Proposal: "proposed", Vote: "vote", Decision: "decision",
                 Started: "action"}.get(type(body))
        if isinstance(body, Result):
            label = "verification" if body.outcome in ("verified", "unverified") else "action"
        if label is not None:
            rows.append((label, describe(env, body)))
    rows += [("dropped", f"{s.subject}: {s.outcome.reason}: {s.outcome.detail}")
             for s in dropped if isinstance(s.outcome, Dropped)]
    return rows


def _bodies(accepted: Iterable[Accepted], kind: type[T]) -> list[tuple[Envelope, T]]:
    return [(a.envelope, a.body) for a in accepted if isinstance(a.body, kind)]


def _result(accepted: Iterable[Accepted], action: str, name: str,
            outcomes: Sequence[str]) -> Result | None:
    """The first result of ``action`` on a target named ``name`` with one of ``outcomes``."""
    return next((b for _, b in _bodies(accepted, Result) if b.action == action
                 and b.target.name == name and b.outcome in outcomes), None)


def _decisions(accepted: Iterable[Accepted], action: str) -> list[Decision]:
    """Decisions on repairs whose proposal is for ``action``."""
    accepted = list(accepted)
    repairs = {e.repair for e, p in _bodies(accepted, Proposal) if p.action == action}
    return [d for e, d in _bodies(accepted, Decision) if e.repair in repairs]


# ---------------------------------------------------------------- the lab


@dataclass
class LabOptions:
    """What ``zeta-lab`` was asked for."""

    config_dir: Path
    keep: bool = False
    steps: tuple[str, ...] = STEPS


class Lab:
    """One run: a working directory, the bus, the control plane, the nodes, the agents."""

    def __init__(self, options: LabOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.workdir = Path(tempfile.mkdtemp(prefix="zeta-lab-"))
        self.config_dir = self.workdir / "config"
        self.server: NatsServer | None = None
        self.plane: ControlPlane | None = None
        self.sim: NodeSimulator | None = None
        self.api: JsonApi | None = None
        self.fleet: AgentFleet | None = None
        self.builder: asyncio.subprocess.Process | None = None
        self.interrupted = asyncio.Event()
        # Blocking calls run in threads that cannot be cancelled: teardown waits for
        # them, so nothing they start can appear after it has stopped everything.
        self._threads: set[asyncio.Future[Any]] = set()
        self._started = time.monotonic()
        self.forged_ids: set[str] = set()  # the messages the drill forged
        self.code: int | None = None  # the drill's verdict, once it is known
        self._presence: dict[str, tuple[object, ...]] = {}  # per persona: its last shown state

    # ------------------------------------------------------------ output

    def say(self, text: str, style: str = "") -> None:
        self.console.print(Text(f"lab | {text}", style=style), soft_wrap=True)

    def on_line(self, seen: Seen) -> None:
        outcome = seen.outcome
        if isinstance(outcome, Accepted) and isinstance(outcome.body, Heartbeat):
            # Every heartbeat's status names its tick: shown only when something else in
            # it changes, or the view would be mostly heartbeats.
            body = outcome.body
            shown = (_TICK.sub("", body.status), body.bus, body.kubernetes, body.frozen)
            if self._presence.get(outcome.envelope.sender) == shown:
                return
            self._presence[outcome.envelope.sender] = shown
        self.console.print(bus_text(seen), soft_wrap=True)

    # ------------------------------------------------------------ running

    async def run(self) -> int:
        """Set up, drill, summarize (and with ``--keep`` wait); always tear down."""
        work = asyncio.ensure_future(self._work())
        loop = asyncio.get_running_loop()

        def interrupt() -> None:
            if not self.interrupted.is_set():
                self.interrupted.set()
                work.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, interrupt)
        try:
            code = await work
        except asyncio.CancelledError:
            self.say("interrupted; stopping everything", "bold yellow")
            # With --keep, Ctrl-C is how a finished drill ends: its verdict stands.
            code = INTERRUPTED if self.code is None else self.code
        except Exception as exc:  # steps catch their own: this is the set-up failing
            self.say(f"the lab could not start: {type(exc).__name__}: {exc}", "bold red")
            code = 2
        finally:
            await self._teardown()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        return code

    async def _work(self) -> int:
        self.say(f"working directory {self.workdir}")
        await self._setup()
        results = await self._drill()
        results.append(await self._metrics_step(len(results) + 1))
        results.append(await self._audit_step(len(results) + 1))
        self._summary(results)
        self.code = 0 if all(r.passed for r in results) else 1
        if self.options.keep:
            self._explore()
            await self.interrupted.wait()
        return self.code

    async def _blocking(self, fn: Callable[[], T]) -> T:
        future = asyncio.get_running_loop().run_in_executor(None, fn)
        self._threads.add(future)
        future.add_done_callback(self._threads.discard)
        return await asyncio.shield(future)

    @contextlib.asynccontextmanager
    async def _phase(self, what: str) -> AsyncIterator[list[str]]:
        """A spinner with the elapsed time while ``what`` runs, then one line saying so.

        Yields a one-item list: what is put there is shown after the time (the latest
        line of a long build)."""
        started = time.monotonic()
        detail = [""]
        with self.console.status(what) as status:
            ticker = asyncio.ensure_future(self._tick_status(status, what, started, detail))
            try:
                yield detail
            finally:
                ticker.cancel()
        # Not reached when the phase raised: only what finished is said to be done.
        self.say(f"{what}: done in {time.monotonic() - started:.1f}s", "green")

    @staticmethod
    async def _tick_status(status: Status, what: str, started: float,
                           detail: list[str]) -> None:
        while True:
            shown = f": {detail[0][:80]}" if detail[0] else ""
            status.update(f"{what} ({time.monotonic() - started:.0f}s){shown}")
            await asyncio.sleep(1)

    # ------------------------------------------------------------ setup

    async def _setup(self) -> None:
        await self._build()
        async with self._phase("starting nats-server with JetStream"):
            self.server = NatsServer(self.workdir / "nats")
            await self._blocking(self.server.start)
        self.say(f"nats-server ready at {self.server.url}")
        self.plane = ControlPlane(self.workdir / "k8s", users=persona_users(
            self.options.config_dir), binaries=binaries_in(k8s_cache()))
        self.say(f"control plane will listen at {self.plane.url}")
        async with self._phase("starting etcd, kube-apiserver and kube-controller-manager"):
            await self._blocking(self.plane.start)
        await self._populate(self.plane)
        prepare_fleet(self.workdir, self.server.url, self.plane.url,
                      source=self.options.config_dir)
        async with self._phase("starting the five personas as `python -m runtime run` "
                               "processes"):
            self.fleet = await start_fleet(self.config_dir, self.workdir, self.server.url,
                                           self.plane, on_line=self.on_line)
            await self.fleet.wait_ready()
        self.say(f"all {len(self.fleet.agents)} agents ready (READY=1): "
                 f"{', '.join(self.fleet.agents)}; each with a fresh nkey, its own kubeconfig "
                 "bound to the RBAC rendered from its scopes, tick 1s", "bold")

    async def _build(self) -> None:
        """The control-plane binaries, built into the cache if missing: in a child process
        of its own session, so Ctrl-C stops the Go toolchain too."""
        what = "control-plane binaries (built from the Go module proxy the first time, ~12 min)"
        async with self._phase(what) as detail:
            self.builder = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lab.building",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
            assert self.builder.stderr is not None
            async for raw in self.builder.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                self.say(f"build: {line}", "dim")
                detail[0] = line
            code = await self.builder.wait()
            self.builder = None
            if code != 0:
                raise FleetError(f"building the control plane failed (exit {code}); the "
                                 "build lines above say why")

    async def _populate(self, plane: ControlPlane) -> None:
        async with self._phase("registering 3 control-plane and 6 worker nodes, and the "
                               "workloads"):
            self.sim = NodeSimulator(plane.admin_kubeconfig, kubelet_ports=True)
            await self._blocking(self.sim.start)
            sim = self.sim
            await self._blocking(lambda: sim.add_nodes(
                3, {CONTROL_PLANE_LABEL: ""}, prefix="cp",
                taints=[{"key": CONTROL_PLANE_LABEL, "effect": "NoSchedule"}]))
            await self._blocking(lambda: sim.add_nodes(6, prefix="worker"))
            self.api = JsonApi(plane.admin_kubeconfig)
            api = self.api
            await self._blocking(lambda: api.call("POST", "/api/v1/namespaces", body={
                "metadata": {"name": NAMESPACE}}))
            await wait_until(lambda: self._get(
                f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"), 30,
                f"the default ServiceAccount of {NAMESPACE}")
            for name, replicas, budget in WORKLOADS:
                await self._blocking(lambda n=name, r=replicas: api.call(  # type: ignore[misc]
                    "POST", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
                    body=deployment(n, r)))
                if budget is not None:
                    await self._blocking(lambda n=name, b=budget: api.call(  # type: ignore[misc]
                        "POST", f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets",
                        body={"metadata": {"name": n},
                              "spec": {**b, "selector": {"matchLabels": {"app": n}}}}))
            for name, replicas, _ in WORKLOADS:
                await wait_until(lambda n=name, r=replicas: len(  # type: ignore[misc]
                    self._ready_pods(n)) == r, 60, f"{replicas} ready {name} pods")
        self.say(f"cluster: nodes {', '.join(sim.nodes)}; in namespace {NAMESPACE}: "
                 + ", ".join(f"{n} x{r}" + "".join(f" (PDB {k} {v})" for k, v in (b or {}).items())
                             for n, r, b in WORKLOADS))

    # ------------------------------------------------------------ cluster reads

    def _get(self, path: str) -> dict[str, Any] | None:
        """An object of the API (None if it does not exist or cannot be read now)."""
        assert self.api is not None
        try:
            return self.api.call("GET", path, timeout=5)
        except Exception:  # the caller polls: any failure means "not yet"
            return None

    def _ready_pods(self, app: str) -> dict[str, str]:
        """Ready pods of ``app`` → the node each runs on."""
        listed = self._get(f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=app%3D{app}")
        return {p["metadata"]["name"]: p["spec"].get("nodeName", "")
                for p in (listed or {}).get("items", [])
                if "deletionTimestamp" not in p["metadata"] and any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in p.get("status", {}).get("conditions", []))}

    def _node_ready(self, name: str) -> bool:
        node = self._get(f"/api/v1/nodes/{name}") or {}
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in node.get("status", {}).get("conditions", []))

    def _cordoned(self, name: str) -> bool:
        node = self._get(f"/api/v1/nodes/{name}") or {}
        return bool(node.get("spec", {}).get("unschedulable"))

    # ------------------------------------------------------------ the drill

    async def _drill(self) -> list[StepResult]:
        steps: dict[str, tuple[str, str, Callable[[StepResult], Awaitable[None]]]] = {
            "kubelet": ("a worker's kubelet stops",
                        "NotReady → proposal, 3+ approvals → cordon, drain under the PDB → "
                        "verified when it is back → Vera uncordons", self._kubelet),
            "crashloop": ("a pod crash-loops",
                          "proposal, 2+ approvals → rollout restart → verified",
                          self._crashloop),
            "apiserver": ("the API server is killed",
                          "unreachable, with evidence, on 2+ agents; nothing attempted; "
                          "all observe again once it is back", self._apiserver),
            "breaker": (f"{BREAKER_NODES} of 9 nodes fail at once",
                        "breaker trips (over 30% unhealthy); nothing cordoned or drained; "
                        "the bus says why", self._breaker),
            "forged": ("someone publishes forged votes",
                       "dropped with the reason (wrong key, bad signature); the tally "
                       "unaffected: approved, no veto", self._forged),
        }
        chosen = [s for s in STEPS if s in self.options.steps]
        results = []
        for number, name in enumerate(chosen, 1):
            title, expected, run = steps[name]
            results.append(await self._step(number, len(chosen) + 1, title, expected, run))
        return results

    async def _step(self, number: int, total: int, title: str, expected: str,
                    run: Callable[[StepResult], Awaitable[None]]) -> StepResult:
        assert self.fleet is not None
        result = StepResult(number, title, expected)
        self.console.print(Rule(f"step {number}/{total}: {title}"))
        self.say(f"expected: {expected}")
        mark = len(self.fleet.tap.seen)
        logged = {n: len(a.events()) for n, a in self.fleet.agents.items()}
        started = time.monotonic()
        try:
            async with asyncio.timeout(STEP_LIMIT):
                await run(result)
                # The next step's story must not begin with this one's clean-up.
                await wait_until(lambda: self._settled(mark), 30,
                                 "every finding of this step to clear")
        except Exception as exc:  # a failed step is reported; the drill goes on
            result.passed = False
            result.observed = f"{result.observed}; " if result.observed else ""
            result.observed += (f"timed out after {STEP_LIMIT:g}s" if isinstance(exc, TimeoutError)
                                and not str(exc) else f"{type(exc).__name__}: {exc}")
        result.seconds = time.monotonic() - started
        seen = self.fleet.tap.seen[mark:]
        said = sorted({(n, f"{e.get('event')}: {e.get('reason')}"
                         + (f": {e['detail']}" if e.get("detail") else ""))
                        for n, a in self.fleet.agents.items() for e in a.events()[logged[n]:]
                        if e.get("event") in AGENT_EVENTS})
        result.story = story((s.outcome for s in seen if isinstance(s.outcome, Accepted)),
                             seen) + [(f"{n}'s log", text) for n, text in said] + result.story
        self._show(result)
        return result

    def _settled(self, mark: int) -> bool:
        """Every finding opened since ``mark`` has been cleared by whoever opened it."""
        open_: set[tuple[str, str, str]] = set()
        for env, finding in _bodies(self._since(mark), Finding):
            key = (env.sender, finding.policy, finding.target.key)
            (open_.add if finding.state == "opened" else open_.discard)(key)
        return not open_

    def _show(self, result: StepResult) -> None:
        table = Table.grid(padding=(0, 1))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for label, text in result.story:
            table.add_row(label, Text(text))
        verdict = Text("PASS" if result.passed else "FAIL",
                       style="bold green" if result.passed else "bold red")
        body = Group(table, Text.assemble("observed: ", result.observed, "  ", verdict,
                                          f"  ({result.seconds:.1f}s)"))
        self.console.print(Panel(body, title=f"step {result.number}: {result.title}",
                                 title_align="left"))
        self.say(f"step {result.number} {'PASS' if result.passed else 'FAIL'} "
                 f"in {result.seconds:.1f}s: {result.observed}")

    def _since(self, mark: int) -> list[Accepted]:
        assert self.fleet is not None
        return self.fleet.tap.accepted(mark)

    async def _kubelet(self, result: StepResult) -> None:
        assert self.sim is not None
        assert self.fleet is not None
        mark = len(self.fleet.tap.seen)
        web = self._ready_pods("web")
        pod, victim = sorted(web.items())[0]
        self.sim.stop_heartbeats(victim)
        self.say(f"stopped the kubelet of {victim} (it runs {pod}): no more Lease renewals")
        try:
            started = time.monotonic()
            await wait_until(lambda: not self._node_ready(victim), 60, f"{victim} NotReady")
            self.say(f"{victim} is NotReady after {time.monotonic() - started:.1f}s "
                     "(node-lifecycle controller)")
            drained = await wait_until(lambda: _result(
                self._since(mark), "k8s.node.drain", victim, ("succeeded", "failed")), 120,
                f"the drain of {victim}")
        finally:
            self.sim.resume_heartbeats(victim)
        self.say(f"drain {drained.outcome}: {drained.detail}; the kubelet of {victim} is back")
        verified = await wait_until(lambda: _result(
            self._since(mark), "k8s.node.drain", victim, ("verified", "unverified")), 60,
            f"the drain's verification on {victim}")
        lifted = await wait_until(lambda: _result(
            self._since(mark), "k8s.node.uncordon", victim, ("succeeded", "failed")), 60,
            f"the uncordon of {victim}")
        await wait_until(lambda: not self._cordoned(victim), 15, f"{victim} schedulable")
        approvals = {action: [len(d.approvals) for d in _decisions(self._since(mark), action)
                              if d.outcome == "approved"]
                     for action in ("k8s.node.cordon", "k8s.node.drain")}
        evicted = re.search(r"evicted \d+ pods", drained.detail or "")
        result.passed = (drained.outcome == "succeeded" and verified.outcome == "verified"
                         and lifted.outcome == "succeeded"
                         and all(len(a) == 1 and a[0] >= 3 for a in approvals.values()))
        result.observed = (f"{victim} NotReady; cordon ({approvals['k8s.node.cordon']} "
                           f"approvals) and drain ({approvals['k8s.node.drain']} approvals, "
                           f"{drained.outcome}: {evicted[0] if evicted else drained.detail}), "
                           f"{verified.outcome} once back; uncordon by vera {lifted.outcome}")

    async def _crashloop(self, result: StepResult) -> None:
        await self._restart_after_crashloop("flaky", result)

    async def _restart_after_crashloop(self, app: str, result: StepResult,
                                       on_proposal: Callable[[Envelope], Awaitable[None]]
                                       | None = None) -> Decision:
        assert self.sim is not None
        assert self.fleet is not None
        mark = len(self.fleet.tap.seen)
        pod = await wait_until(lambda: next(iter(self._ready_pods(app)), None), 60,
                               f"a ready {app} pod")
        self.sim.crashloop(NAMESPACE, pod)
        self.say(f"{NAMESPACE}/{pod} crash-loops from now on (restartCount rises every "
                 f"{self.sim.crash_every:g}s)")
        if on_proposal is not None:
            proposal = await wait_until(lambda: next(
                (e for e, p in _bodies(self._since(mark), Proposal)
                 if p.action == "k8s.workload.restart" and p.target.name == app), None),
                90, f"a proposal to restart {app}")
            await on_proposal(proposal)
        done = await wait_until(lambda: _result(
            self._since(mark), "k8s.workload.restart", app, ("succeeded", "failed")), 90,
            f"the rollout restart of {app}")
        verified = await wait_until(lambda: _result(
            self._since(mark), "k8s.workload.restart", app, ("verified", "unverified")), 60,
            f"the restart's verification of {app}")
        [decision] = _decisions(self._since(mark), "k8s.workload.restart")[:1]
        result.passed = (decision.outcome == "approved" and len(decision.approvals) >= 2
                         and done.outcome == "succeeded" and verified.outcome == "verified")
        result.observed = (f"deployment {app} restarted after approvals by "
                           f"{', '.join(decision.approvals)}: {done.outcome}, "
                           f"{verified.outcome}")
        return decision

    async def _apiserver(self, result: StepResult) -> None:
        assert self.plane is not None
        assert self.fleet is not None
        plane, fleet = self.plane, self.fleet
        names = list(fleet.agents)
        await wait_until(lambda: all(h and h[-1].kubernetes == "observed"
                                     for h in map(fleet.tap.heartbeats, names)), 30,
                         "every agent to observe Kubernetes")
        mark = len(fleet.tap.seen)
        changes_before = len(fleet.kubernetes_changes())
        await self._blocking(lambda: plane.stop_apiserver(grace=1.0))
        self.say(f"killed kube-apiserver (etcd and the controller manager keep running); "
                 f"{plane.url} refuses connections")
        try:
            findings = await wait_until(lambda: {e.sender: f for e, f in _bodies(
                self._since(mark), Finding) if f.policy == "apiserver-unreachable"
                and f.state == "opened"} if len({e.sender for e, f in _bodies(
                    self._since(mark), Finding) if f.policy == "apiserver-unreachable"}) >= 2
                else None, 60, "apiserver-unreachable findings from two agents")
            await wait_until(lambda: all(h[-1].kubernetes != "observed"
                                         for h in map(fleet.tap.heartbeats, names)), 30,
                             "every heartbeat to say Kubernetes is not observed")
            self.say(f"watching {QUIET_FOR:g}s more: nothing may be attempted")
            await asyncio.sleep(QUIET_FOR)
        finally:
            await self._blocking(plane.start_apiserver)
        self.say("kube-apiserver is back")
        await wait_until(lambda: all(h[-1].kubernetes == "observed"
                                     for h in map(fleet.tap.heartbeats, names)), 60,
                         "every agent to observe Kubernetes again")
        during = self._since(mark)
        started = _bodies(during, Started)
        changes = fleet.kubernetes_changes()[changes_before:]
        reporters = sorted({e.sender for e, f in _bodies(during, Finding)
                            if f.policy == "apiserver-unreachable" and f.state == "opened"})
        evidence = next(iter(findings.values())).summary
        result.story.append(("evidence", evidence))
        result.passed = (len(reporters) >= 2 and not started and not changes
                         and "refused" in evidence.lower())
        result.observed = (f"unreachable, with evidence, reported by {', '.join(reporters)}; "
                           f"{len(started)} actions started, {len(changes)} Kubernetes changes; "
                           "all observe again once it is back")

    async def _breaker(self, result: StepResult) -> None:
        assert self.sim is not None
        assert self.fleet is not None
        sim, fleet = self.sim, self.fleet
        mark = len(fleet.tap.seen)
        victims = [n for n in sim.nodes if n.startswith("worker")][-BREAKER_NODES:]
        changes_before = len(fleet.kubernetes_changes())
        # At once: staggered lease expiries would let the first victim be NotReady
        # for the policy's `for:` while fewer than the breaker's 30% are down.
        await asyncio.to_thread(sim.stop_heartbeats_together, victims)
        self.say(f"stopped the kubelets of {', '.join(victims)}: {BREAKER_NODES}/9 nodes")
        try:
            status = await wait_until(lambda: next(
                (h.status for h in fleet.tap.heartbeats("otto")[-3:]
                 if "breaker tripped: node-not-ready" in h.status), None), 60,
                "Otto's heartbeat to say the breaker tripped")
            self.say(f"watching {QUIET_FOR:g}s more: nothing may be cordoned or drained")
            await asyncio.sleep(QUIET_FOR)
        finally:
            for name in victims:
                sim.resume_heartbeats(name)
        await wait_until(lambda: all(self._node_ready(n) for n in victims), 60,
                         "the nodes Ready again")
        result.story.append(("heartbeat", f"otto: {status}"))
        proposed = [p for _, p in _bodies(self._since(mark), Proposal)
                    if p.policy == "node-not-ready"]
        changes = fleet.kubernetes_changes()[changes_before:]
        cordoned = [n for n in victims if self._cordoned(n)]
        result.passed = not proposed and not changes and not cordoned
        # The engine's own words (how many of how many), as Otto logged them.
        reason = next((str(e["reason"]) for e in reversed(fleet.agents["otto"].events())
                       if e.get("event") == "breaker.tripped" and "reason" in e),
                      f"breaker tripped: {status.split('breaker tripped: ')[-1]}")
        result.observed = (f"{reason}; "
                           f"{len(proposed)} proposals, {len(changes)} Kubernetes changes, "
                           f"{len(cordoned)} cordoned")

    async def _forged(self, result: StepResult) -> None:
        assert self.fleet is not None
        fleet = self.fleet
        forged: dict[str, str] = {}  # message id → how it was forged

        async def inject(proposal: Envelope) -> None:
            repair = proposal.repair
            assert repair is not None
            mallory = Signer(generate_user_seed())
            veto = seal("vote", sender="riven", host="mallory", signer=mallory, repair=repair,
                        body=Vote(verdict="block", reason="forged: a veto in Riven's name",
                                  observed_at=datetime.now(UTC), policy_digest="forged"))
            await fleet.tap.connection.nc.publish(vote_subject(repair, "riven"), veto.to_bytes())
            forged[veto.id] = "a veto in Riven's name, signed with a key not in the roster"
            self.say(f"published a forged veto as riven, signed by {mallory.public_key[:8]}… "
                     "(not Riven's key)", "bold red")
            real = await wait_until(lambda: next(
                (s for s in fleet.tap.seen if isinstance(s.outcome, Accepted)
                 and s.outcome.envelope.kind == "vote" and s.outcome.envelope.repair == repair),
                None), 20, "a real vote to tamper with", every=0.05)
            tampered = json.loads(real.data)
            tampered["body"] = {**tampered["body"], "verdict": "block",
                                "reason": "tampered: approve turned into a block"}
            tampered["id"] = ids.new_id()
            await fleet.tap.connection.nc.publish(real.subject, json.dumps(tampered).encode())
            forged[tampered["id"]] = f"{tampered['from']}'s vote, approve turned into a block"
            self.say(f"published a tampered copy of {tampered['from']}'s vote (block instead "
                     "of approve, signature kept)", "bold red")

        mark = len(fleet.tap.seen)
        decision = await self._restart_after_crashloop("api", result, inject)
        dropped = {json.loads(s.data).get("id"): s.outcome.reason for s in fleet.tap.seen[mark:]
                   if isinstance(s.outcome, Dropped)}
        self.forged_ids = set(forged)
        restarted = result.passed
        result.passed = (restarted and set(forged) <= set(dropped) and not decision.vetoes
                         and all(i not in decision.votes for i in forged))
        result.observed = ("; ".join(f"{forged[i]}: dropped ({dropped.get(i, 'NOT dropped')})"
                                     for i in forged)
                           + f"; decision {decision.outcome}, vetoes: "
                             f"{', '.join(decision.vetoes) or 'none'}; {result.observed}")

    async def _metrics_step(self, number: int) -> StepResult:
        """Every agent's Prometheus endpoint, scraped as a monitoring system would."""
        assert self.fleet is not None
        agents = self.fleet.agents
        # Dropped messages are shown, not required: a forged vote counts where an agent
        # was still listening for votes on that proposal, which depends on timing.
        result = StepResult(number, "Prometheus metrics",
                            "every agent serves /metrics and has ticked")
        self.console.print(Rule(f"step {number}: Prometheus metrics"))
        started = time.monotonic()
        table = Table(title="scraped from each agent's /metrics (sums over labels)",
                      title_justify="left")
        for column in ("persona", *METRICS_SHOWN.values()):
            table.add_column(column, justify="left" if column == "persona" else "right")
        scraped: dict[str, dict[str, float]] = {}
        for name, agent in sorted(agents.items()):
            try:
                scraped[name] = await asyncio.to_thread(agent.scrape)
            except (OSError, ValueError, FleetError) as exc:
                result.story.append(("error", f"{name} ({agent.metrics}): {exc}"))
                continue
            table.add_row(name, *(f"{scraped[name].get(metric, 0):g}" for metric in METRICS_SHOWN))
            result.story.append(("scraped", f"{name}: http://{agent.metrics}/metrics"))
        self.console.print(table)
        result.seconds = time.monotonic() - started
        ticks = [totals.get("zeta_agent_ticks_total", 0.0) for totals in scraped.values()]
        dropped = sum(t.get("zeta_agent_messages_dropped_total", 0.0) for t in scraped.values())
        result.passed = len(scraped) == len(agents) and min(ticks, default=0.0) > 0
        result.observed = (f"{len(scraped)}/{len(agents)} agents scraped; ticks "
                           f"{min(ticks, default=0):g}-{max(ticks, default=0):g}; "
                           f"{dropped:g} messages dropped")
        self._show(result)
        return result

    async def _audit_step(self, number: int) -> StepResult:
        """``zeta-agent audit verify`` on ZETA_AUDIT: only the forged votes may be flagged."""
        expected = ("every repair that ran had a valid quorum; the only invalid messages "
                    "are the forged votes" if self.forged_ids else "no violation")
        result = StepResult(number, "zeta-agent audit verify", expected)
        self.console.print(Rule(f"step {number}/{number}: zeta-agent audit verify"))
        command = [sys.executable, "-m", "runtime", "audit", "verify", "--json",
                   "--config-dir", str(self.config_dir)]
        self.say(f"$ zeta-agent audit verify --json --config-dir {self.config_dir}")
        started = time.monotonic()
        done = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await done.communicate()
        result.seconds = time.monotonic() - started
        violations = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        flagged = {v["message"] for v in violations}
        for violation in violations:
            result.story.append(("violation", f"{violation['message']}: {violation['reason']}"))
        result.story.append(("verdict", err.decode().strip()))
        result.passed = flagged == self.forged_ids and (done.returncode == 0) == (not flagged)
        result.observed = (f"exit {done.returncode}, {err.decode().strip()}; flagged "
                           f"{len(flagged & self.forged_ids)} forged, "
                           f"{len(flagged - self.forged_ids)} other")
        self._show(result)
        return result

    def _summary(self, results: Sequence[StepResult]) -> None:
        table = Table(title="drill summary", title_justify="left")
        for column in ("step", "expected", "observed", "result", "time"):
            table.add_column(column, overflow="fold")
        for r in results:
            table.add_row(f"{r.number}. {r.title}", r.expected, r.observed,
                          Text("PASS" if r.passed else "FAIL",
                               style="bold green" if r.passed else "bold red"),
                          f"{r.seconds:.1f}s")
        self.console.print(table)
        passed = sum(r.passed for r in results)
        self.say(f"drill: {passed}/{len(results)} steps passed in "
                 f"{time.monotonic() - self._started:.0f}s since the lab started",
                 "bold green" if passed == len(results) else "bold red")

    # ------------------------------------------------------------ --keep

    def _explore(self) -> None:
        assert self.server is not None
        assert self.plane is not None
        # The pinned nats CLI the tests build (lab/tools.py), if it is in the cache.
        built = NATSCLI.path(cache_dir())
        natscli = str(built) if built.exists() else "nats"
        admin = self.plane.admin_kubeconfig
        otto = kubeconfig_path(self.config_dir, "otto")
        cfg = shlex.quote(str(self.config_dir))
        lines = [
            "everything is still running; explore it, then Ctrl-C stops it all:",
            f"  zeta-agent watch --config-dir {cfg}",
            f"  zeta-agent audit --config-dir {cfg}",
            f"  zeta-agent audit verify --config-dir {cfg}",
            f"  {natscli} sub 'zeta.>' --server {self.server.url}"
            "    # the lab's bus has no accounts: every message is signed, the server "
            "checks nobody (`zeta-agent render nats` is the production config)",
            f"  kubectl --kubeconfig {admin} get nodes,pods -A    # the admin",
            f"  kubectl --kubeconfig {otto} get nodes    # Otto's own user, bound to its RBAC",
            f"  curl --cacert {self.plane.ca_file} -H 'Authorization: Bearer "
            f"{self.plane.token(ADMIN)}' {self.plane.url}/api/v1/nodes    # without kubectl",
        ]
        assert self.fleet is not None
        lines += [f"  curl -s http://{agent.metrics}/metrics    # {name}'s Prometheus metrics"
                  for name, agent in sorted(self.fleet.agents.items()) if agent.metrics]
        lines.append(f"  tail -f {self.workdir}/logs/*.log    # each agent's JSON log")
        if shutil.which("kubectl") is None:
            lines.append(f"  (kubectl is not installed: curl -LO https://dl.k8s.io/release/"
                         f"{KUBECTL_VERSION}/bin/linux/amd64/kubectl && chmod +x kubectl, "
                         "or use the curl line)")
        if not built.exists():
            lines.append(f"  (the nats CLI: `{sys.executable} -c 'from lab.tools import "
                         "natscli; print(natscli())'` builds it into the cache, with Go)")
        for line in lines:
            self.say(line)

    # ------------------------------------------------------------ teardown

    async def _teardown(self) -> None:
        """Stop everything started, in reverse order, whatever state it is in."""
        if self.builder is not None and self.builder.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.builder.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(self.builder.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.builder.pid, signal.SIGKILL)
                await self.builder.wait()
        if self._threads:
            self.say("waiting for a start-up step to finish before stopping it")
            await asyncio.gather(*self._threads, return_exceptions=True)
        if self.fleet is not None:
            codes = await self.fleet.stop()
            self.say(f"agents stopped: {', '.join(f'{n} exit {c}' for n, c in codes.items())}")
        for stop in (self._stop_cluster, self._stop_bus):
            try:
                await asyncio.to_thread(stop)
            except Exception as exc:  # the next must still be stopped
                self.say(f"while stopping: {exc}", "red")
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.say("nats-server, control plane, node simulator and agents stopped; working "
                 "directory removed; nothing left running")

    def _stop_cluster(self) -> None:
        if self.api is not None:
            self.api.close()
        if self.sim is not None:
            self.sim.stop()
        if self.plane is not None:
            self.plane.stop()

    def _stop_bus(self) -> None:
        if self.server is not None:
            self.server.stop()


async def run_lab(options: LabOptions, console: Console | None = None) -> int:
    """Run the lab; the exit code (0 passed, 1 a step failed, 2 could not start, 130 Ctrl-C)."""
    # Interactive: the terminal's width; piped (make lab | tee, the tests): lines whole.
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    # The lab's own structured logs (bus reconnects, the control plane) would interleave
    # with the view; warnings and errors still reach stderr.
    logs.configure(level="warning", stream=sys.stderr)
    # The simulated kubelets keep calling a killed API server on purpose (step 3): their
    # HTTP client's retry warnings would bury the view.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    lab = Lab(options, console)
    return await lab.run()


def parse_steps(text: str) -> tuple[str, ...]:
    """``--steps``: ``all``, ``none`` or a comma-separated subset of STEPS."""
    if text == "all":
        return STEPS
    if text == "none":
        return ()
    chosen = tuple(s.strip() for s in text.split(","))
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown steps {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    return chosen
