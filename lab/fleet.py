"""The five personas as processes around a real bus and control plane: the lab's and the e2e tests'.

One harness, so that what ``zeta-lab`` shows is exactly what
``tests/test_e2e_k8s.py`` asserts. It copies a configuration with fresh keys and short
timings (``prepare_config``, ``POLICIES``), gives every persona a kubeconfig of its own
bound to the ClusterRole rendered from its scopes (``install_kubernetes``), starts each
persona as ``python -m runtime run <name>`` (what its systemd unit runs) with its own
state directory, log file and notify socket, and reads the bus through the same
verifying view as ``zeta-agent watch`` (``BusTap``). Processes rather than in-process
agents: the point is the shipped entry point, credentials on disk and five independent
watch caches.

Every wait is bounded and every process is stopped (SIGTERM, then SIGKILL of its
session) however a run ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog
from kubernetes import client
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from bus.connection import Connection
from bus.envelope import Accepted, Dropped
from bus.messages import Heartbeat
from bus.reading import Stored
from lab.controlplane import ControlPlane
from lab.natsserver import free_ports
from lab.nodesim import api_client
from runtime.agent.link import Roster, jetstream_settings
from runtime.config.credentials import write_seed
from runtime.config.loading import ConfigSet, config_paths, load, yaml_files
from runtime.model.durations import format_duration
from runtime.ops import audit as auditing
from runtime.ops import controls as operating
from runtime.ops.render.rbac import render_all
from runtime.ops.watch import SUBJECT, View

log = structlog.get_logger(__name__)
T = TypeVar("T")

TICK = timedelta(seconds=1)
STOP_GRACE = 10.0
READY_WITHIN = 60.0  # five interpreters importing at once on two busy cores
# The shipped policies wait minutes before acting, as they should on a real cluster;
# a lab or a test cannot. Same ladders and quorum rules, seconds instead of minutes.
QUORUM = {"approvals": 3, "veto": ["riven"], "deadline": "10s"}
NODE_QUORUM = {**QUORUM, "evidence": {"distinct": 2}}  # as node-not-ready.yaml asks
NODE_NOT_READY: dict[str, Any] = {
    "detect": {"kind": "node-condition", "condition": "Ready", "status": ["False", "Unknown"],
               "for": "5s"},
    # A cordon alone cannot clear NotReady: its short verify window moves on to the drain.
    "remedies": [
        {"action": "k8s.node.cordon", "quorum": NODE_QUORUM,
         "verify": {"within": "3s", "expect": "finding-cleared"}},
        {"action": "k8s.node.drain", "params": {"timeout": "90s"}, "quorum": NODE_QUORUM,
         "verify": {"within": "90s", "expect": "finding-cleared"}},
    ],
    "budget": {"maxInFlight": 1, "perHour": 10, "maxUnhealthyFraction": 0.3},
}
POLICIES: dict[str, dict[str, Any]] = {
    "node-not-ready": NODE_NOT_READY,
    "cordon-without-owner": {"detect": {"kind": "cordon-without-owner", "for": "5s"}},
    "pod-crashloop": {
        "detect": {"kind": "pod-crashloop", "minRestarts": 2, "for": "5s"},
        "remedies": [
            {"action": "k8s.workload.restart",
             "quorum": {"approvals": 2, "veto": ["riven"], "deadline": "10s"},
             "verify": {"within": "60s", "expect": "finding-cleared"}},
            {"action": "bus.escalate", "params": {"message": "still crash-looping"}}]},
    "apiserver-unreachable": {"detect": {"kind": "apiserver-unreachable", "minPaths": 2,
                                         "for": "3s"}},
}
"""Per-policy spec overrides of the shipped policies for the lab and the e2e tests."""
# Inherited variables that would point an agent at another bus, config or service manager.
_FOREIGN_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "ZETA_CONFIG_DIR",
                "ZETA_NATS_URL", "CREDENTIALS_DIRECTORY", "ZETA_NODE_NAME")


class FleetError(RuntimeError):
    """The fleet could not be started, or did not do what was awaited in time."""


# ---------------------------------------------------------------- configuration


def prepare_config(source: Path, target: Path, *, tick: timedelta | None, nats_url: str,
                   dry_run: bool = True,
                   policy_spec: Mapping[str, Mapping[str, Any]] | None = None,
                   fleet_spec: Mapping[str, Any] | None = None) -> list[str]:
    """Copy ``source``'s configuration into ``target`` for a lab or a test; return the personas.

    Every persona gets a fresh nkey (seed under ``target/credentials/<persona>/``, its
    public key written into the persona file) so the copy can use the bus; the
    shipped files carry placeholder keys whose seeds exist nowhere. Every persona
    ticks every ``tick`` (if given), every policy is dry-run (if ``dry_run``), and
    ``policy_spec``/``fleet_spec`` override top-level spec fields by policy name and for
    the fleet. The fleet's bus is ``nats_url``. The copy is validated like any
    configuration directory.
    """
    yaml = YAML(typ="rt")
    credentials = target / "credentials"
    for path in yaml_files([source / "personas", source / "policies"], ConfigSet()):
        docs = [d for d in yaml.load_all(path.read_text(encoding="utf-8")) if d is not None]
        for doc in docs:
            spec = doc["spec"]
            if doc["kind"] == "Persona":
                spec["identity"]["nkey"] = write_seed(credentials, doc["metadata"]["name"],
                                                      force=True)
                if tick is not None:
                    spec["tick"] = format_duration(tick)
            elif doc["kind"] == "RepairPolicy":
                if dry_run:
                    spec["mode"] = "dry-run"
                spec.update((policy_spec or {}).get(doc["metadata"]["name"], {}))
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as stream:
            yaml.dump_all(docs, stream)
    fleet_file = source / "fleet.yaml"
    fleet: dict[str, Any] = {"apiVersion": "zeta/v1", "kind": "Fleet"}
    if fleet_file.exists():
        fleet = yaml.load(fleet_file.read_text(encoding="utf-8")) or fleet
    spec = fleet.setdefault("spec", {})
    spec.setdefault("bus", {})["urls"] = [nats_url]
    spec["credentialsDir"] = str(credentials)
    spec.update(fleet_spec or {})
    with (target / "fleet.yaml").open("w", encoding="utf-8") as stream:
        yaml.dump(fleet, stream)
    return sorted(load(config_paths(target)).personas)


def kubeconfig_path(config_dir: Path, persona: str) -> Path:
    """Where a persona's agent finds its kubeconfig (``credential_path`` of a prepared copy)."""
    return config_dir / "credentials" / persona / "kubeconfig"


def apply_rbac(api: client.ApiClient, text: str) -> None:
    """Create or replace each ClusterRole and ClusterRoleBinding in ``text``."""
    rbac = client.RbacAuthorizationV1Api(api)
    for document in YAML(typ="safe").load_all(text):
        name = document["metadata"]["name"]
        if document["kind"] == "ClusterRole":
            role = client.V1ClusterRole.model_validate(document)
            if rbac.list_cluster_role(field_selector=f"metadata.name={name}").items:
                rbac.replace_cluster_role(name, role)
            else:
                rbac.create_cluster_role(role)
        else:
            binding = client.V1ClusterRoleBinding.model_validate(document)
            if rbac.list_cluster_role_binding(field_selector=f"metadata.name={name}").items:
                rbac.replace_cluster_role_binding(name, binding)
            else:
                rbac.create_cluster_role_binding(binding)


def install_kubernetes(config_dir: Path, plane: ControlPlane) -> None:
    """Each persona's kubeconfig where its agent looks, and its rendered RBAC applied.

    The personas' users must be token users of ``plane`` (``persona_users``)."""
    config = load(config_paths(config_dir))
    for name, persona in config.personas.items():
        target = kubeconfig_path(config_dir, name)
        shutil.copyfile(plane.kubeconfig_for(persona.value.spec.identity.kubernetes.user), target)
        target.chmod(0o600)
    with api_client(plane.admin_kubeconfig) as api:
        apply_rbac(api, render_all(p.value for p in config.personas.values()))


def persona_users(config_dir: Path) -> list[str]:
    """The Kubernetes users of the personas in ``config_dir`` (a control plane's token users)."""
    config = load(config_paths(config_dir))
    return sorted(p.value.spec.identity.kubernetes.user for p in config.personas.values())


def deployment(name: str, replicas: int, *, labels: dict[str, str] | None = None,
               pod_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Deployment manifest whose pods carry ``app: <name>`` (plus ``labels``)."""
    match = {"app": name}
    spec = pod_spec or {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": match},
                     "template": {"metadata": {"labels": {**match, **(labels or {})}},
                                  "spec": spec}}}


# ---------------------------------------------------------------- one agent process


@dataclass
class AgentProcess:
    """One persona's process, its JSON log file and, as its service manager, its notify socket."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    notify: socket.socket | None = None
    metrics: str | None = None  # host:port of its Prometheus endpoint, when it serves one
    ready: bool = False  # said READY=1
    watchdogs: int = 0  # WATCHDOG=1 pings
    stopping: bool = False  # said STOPPING=1
    _reading: asyncio.AbstractEventLoop | None = None  # the loop draining the notify socket

    def listen(self) -> None:
        """Read notifications as they arrive, as systemd does: an undrained socket fills
        up after a few datagrams and the agent's watchdog pings would be lost."""
        if self.notify is not None and self._reading is None:
            self._reading = asyncio.get_running_loop()
            self._reading.add_reader(self.notify.fileno(), self.read_notifications)

    def stop_listening(self) -> None:
        """Stop reading as notifications arrive (on the loop that ``listen`` used)."""
        if self._reading is not None and self.notify is not None:
            self._reading.remove_reader(self.notify.fileno())
        self._reading = None

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (anything else, e.g. a traceback, is kept as text)."""
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            out.append(record if isinstance(record, dict)
                       else {"event": "(not json)", "text": line})
        return out

    def ticks(self) -> int:
        return max((e["tick"] for e in self.events() if e.get("event") == "tick"), default=0)

    def read_notifications(self) -> None:
        """Take in what the agent told its service manager since the last call."""
        while self.notify is not None:
            try:
                data = self.notify.recv(4096)
            except BlockingIOError:
                return
            for assignment in data.decode("utf-8", "replace").splitlines():
                key = assignment.partition("=")[0]
                self.ready |= key == "READY"
                self.stopping |= key == "STOPPING"
                self.watchdogs += key == "WATCHDOG"

    def scrape(self, timeout: float = 5.0) -> dict[str, float]:
        """Its Prometheus metrics now, summed over labels: ``{sample name: value}``."""
        if self.metrics is None:
            raise FleetError(f"{self.name} serves no metrics")
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=timeout) as reply:
            text = reply.read().decode()
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def close(self) -> None:
        """Release the notify socket (after the last ``read_notifications``)."""
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def start_agent(config_dir: Path, name: str, workdir: Path, *,
                watchdog: timedelta | None = None, metrics: str | None = None,
                extra_env: Mapping[str, str] | None = None) -> AgentProcess:
    """Start ``python -m runtime run <name>`` in a session of its own, as systemd would.

    Its state directory, log and notify socket live under ``workdir``; ``watchdog``
    sets ``WATCHDOG_USEC`` as ``WatchdogSec=`` would; ``metrics`` (host:port) is where it
    serves Prometheus metrics (``ZETA_METRICS_LISTEN``); ``extra_env`` is what a unit's
    ``Environment=`` would add (``ZETA_NODE_NAME``, say). A session of its own: a Ctrl-C
    in the terminal reaches whoever started it, which stops the agents in order.
    """
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    state = workdir / "state" / name
    state.mkdir(parents=True)
    address = workdir / "notify" / f"{name}.sock"
    address.parent.mkdir(exist_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(address))
    notify.setblocking(False)
    env.update(STATE_DIRECTORY=str(state), PYTHONUNBUFFERED="1", NOTIFY_SOCKET=str(address))
    if watchdog is not None:
        env["WATCHDOG_USEC"] = str(watchdog // timedelta(microseconds=1))
    if metrics is not None:
        env["ZETA_METRICS_LISTEN"] = metrics
    env.update(extra_env or {})
    log_file = workdir / "logs" / f"{name}.log"
    log_file.parent.mkdir(exist_ok=True)
    with log_file.open("wb") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime", "run", name, "--config-dir", str(config_dir),
             "--log-format", "json"],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    return AgentProcess(name, process, log_file, notify, metrics)


def stop_agents(agents: Mapping[str, AgentProcess],
                grace: float = STOP_GRACE) -> dict[str, int]:
    """SIGTERM every agent, SIGKILL (its whole session) what is left after ``grace``;
    the exit codes by name."""
    for agent in agents.values():
        if agent.process.poll() is None:
            agent.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    codes = {}
    for name, agent in agents.items():
        try:
            codes[name] = agent.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(agent.process.pid, signal.SIGKILL)
            codes[name] = agent.process.wait()
        agent.read_notifications()
        agent.close()
    return codes


async def wait_until(check: Callable[[], T | None], within: float, what: str, *,
                     every: float = 0.25) -> T:
    """Poll ``check`` (a quick, blocking look) until it returns a true value; that value.

    Raises TimeoutError naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(every)


# ---------------------------------------------------------------- the bus, as a watcher sees it


@dataclass(frozen=True)
class Seen:
    """One message on ``zeta.>``: when it arrived, whether it verified, and its line."""

    at: datetime
    subject: str
    data: bytes
    outcome: Accepted | Dropped
    line: str | None  # None: a heartbeat that changed nothing shown


class BusTap:
    """Reads ``zeta.>`` through ``runtime.ops.watch.View``: verified as the agents verify,
    every message kept, each shown line passed to ``on_line``."""

    def __init__(self, url: str, roster: Roster,
                 on_line: Callable[[Seen], None] | None = None) -> None:
        self.view = View(roster)
        self.seen: list[Seen] = []
        self.on_line = on_line
        self.connection = Connection([url], name="zeta-fleet-tap", seed=None)

    async def start(self) -> None:
        await self.connection.connect()
        await self.connection.subscribe(SUBJECT, self._on_message)
        await self.connection.sync()

    async def _on_message(self, msg: Msg) -> None:
        now = datetime.now(UTC)
        outcome, line = self.view.feed(msg.subject, msg.data, now)
        seen = Seen(now, msg.subject, msg.data, outcome, line)
        self.seen.append(seen)
        if line is not None and self.on_line is not None:
            self.on_line(seen)

    def accepted(self, since: int = 0) -> list[Accepted]:
        """Verified messages, from index ``since`` of ``seen`` on."""
        return [s.outcome for s in self.seen[since:] if isinstance(s.outcome, Accepted)]

    def heartbeats(self, persona: str) -> list[Heartbeat]:
        """Every verified heartbeat of ``persona``, oldest first."""
        return [a.body for a in self.accepted()
                if isinstance(a.body, Heartbeat) and a.envelope.sender == persona]

    async def close(self) -> None:
        await self.connection.close()


# ---------------------------------------------------------------- the fleet


@dataclass
class AgentFleet:
    """The running personas, their configuration and what the bus carried."""

    config_dir: Path
    bus_url: str
    tap: BusTap
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def events(self, event: str) -> list[dict[str, Any]]:
        """Every log line of every agent whose event is ``event``."""
        return [e for a in self.agents.values() for e in a.events() if e.get("event") == event]

    def alive(self) -> list[str]:
        return [n for n, a in self.agents.items() if a.process.poll() is None]

    def kubernetes_changes(self) -> list[dict[str, Any]]:
        return self.events("kubernetes change made")

    def roster(self) -> Roster:
        return Roster.of(load(config_paths(self.config_dir)))

    async def stored(self) -> list[Stored]:
        """Everything in ZETA_AUDIT so far, as stored."""
        conn = Connection([self.bus_url], name="zeta-fleet-audit", seed=None)
        await conn.connect()
        try:
            return await auditing.read(conn.js)
        finally:
            await conn.close()

    async def audit(self) -> list[dict[str, Any]]:
        """ZETA_AUDIT as JSON envelopes, in stream order."""
        return [{"subject": m.subject, **json.loads(m.data)} for m in await self.stored()]

    def dump(self) -> str:
        """The tail of every agent's log, for a failure message."""
        return "\n".join(f"--- {n}\n" + "\n".join(
            a.log.read_text(errors="replace").splitlines()[-15:]) for n, a in self.agents.items())

    def all_ready(self) -> bool:
        """Every agent said READY=1; raises FleetError if one died first."""
        for agent in self.agents.values():
            agent.read_notifications()
            if agent.process.poll() is not None:
                raise FleetError(f"{agent.name} exited with code {agent.process.returncode} "
                                 f"before it was ready:\n{self.dump()}")
        return all(a.ready for a in self.agents.values())

    async def wait_ready(self, within: float = READY_WITHIN) -> None:
        """Return once every agent said READY=1 (FleetError if one dies first)."""
        await wait_until(self.all_ready, within, "every agent's READY=1")
        log.info("fleet ready", agents=sorted(self.agents), config_dir=str(self.config_dir))

    async def stop(self) -> dict[str, int]:
        """Stop every agent (SIGTERM, then SIGKILL) and the tap; the exit codes by name."""
        for agent in self.agents.values():
            agent.stop_listening()  # here, on the loop: stop_agents runs in a thread
        try:
            return await asyncio.to_thread(stop_agents, self.agents)
        finally:
            await self.tap.close()


async def init_bus(url: str, config: ConfigSet, *, seed: bytes | None = None) -> None:
    """Make the audit stream and lease bucket as an operator does once
    (``zeta-agent bus init``): agents only check them."""
    problems = await operating.bus_resources("init", urls=[url], seed=seed,
                                             settings=jetstream_settings(config), within=15)
    if problems:
        raise FleetError("the bus resources are not as configured: " + "; ".join(problems))


def prepare_fleet(workdir: Path, bus_url: str, apiserver: str, *, source: Path,
                  policies: Mapping[str, Mapping[str, Any]] | None = None,
                  tick: timedelta = TICK, fleet: Mapping[str, Any] | None = None,
                  extra_policies: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
                  ) -> Path:
    """The configuration copy every fleet runs from (``workdir/config``), enforcing
    ``POLICIES`` (updated by ``policies``), with fresh keys, on ``bus_url`` and ``apiserver``
    (and ``fleet``'s spec fields). ``source`` is the checkout (or any directory of
    personas and policies) to copy. ``extra_policies`` adds policies: ``name`` →
    (the policy it copies, its spec fields), run by every persona that runs the original."""
    config_dir = workdir / "config"
    prepare_config(source, config_dir, tick=tick, nats_url=bus_url, dry_run=False,
                   policy_spec={**POLICIES, **(policies or {})},
                   fleet_spec={"apiservers": [apiserver], "quorum": QUORUM, **(fleet or {})})
    for name, (like, spec) in (extra_policies or {}).items():
        add_policy(config_dir, name, like, spec)
    return config_dir


def add_policy(config_dir: Path, name: str, like: str, spec: Mapping[str, Any]) -> None:
    """Copy policy ``like`` of ``config_dir`` as ``name`` with ``spec``'s fields, and add it
    to every persona that runs ``like``."""
    yaml = YAML(typ="rt")
    policies = config_dir / "policies"
    original = yaml.load((policies / f"{like}.yaml").read_text(encoding="utf-8"))
    original["metadata"]["name"] = name
    original["spec"].update(spec)
    with (policies / f"{name}.yaml").open("w", encoding="utf-8") as stream:
        yaml.dump(original, stream)
    for path in yaml_files([config_dir / "personas"], ConfigSet()):
        persona = yaml.load(path.read_text(encoding="utf-8"))
        runs = persona["spec"].get("policies", [])
        if like in runs:
            runs.append(name)
            with path.open("w", encoding="utf-8") as stream:
                yaml.dump(persona, stream)


async def start_fleet(config_dir: Path, workdir: Path, bus_url: str, plane: ControlPlane, *,
                      on_line: Callable[[Seen], None] | None = None,
                      env: Mapping[str, Mapping[str, str]] | None = None) -> AgentFleet:
    """Install the personas' Kubernetes identities, start the tap, then one process per
    persona (with ``env``'s additions by persona); returns at once
    (``AgentFleet.wait_ready``), so that a caller interrupted while they start up still
    holds the processes to stop."""
    config = load(config_paths(config_dir))
    await init_bus(bus_url, config)
    await asyncio.to_thread(install_kubernetes, config_dir, plane)
    fleet = AgentFleet(config_dir, bus_url, BusTap(bus_url, Roster.of(config), on_line))
    await fleet.tap.start()
    names = sorted(config.personas)
    for name, port in zip(names, free_ports(len(names)), strict=True):
        fleet.agents[name] = start_agent(config_dir, name, workdir,
                                         watchdog=max(TICK * 3, timedelta(seconds=3)),
                                         metrics=f"127.0.0.1:{port}",
                                         extra_env=(env or {}).get(name))
        fleet.agents[name].listen()
    return fleet
