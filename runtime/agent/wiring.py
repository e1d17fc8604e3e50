"""The composition root: one persona's agent built from its configuration, and served.

The only module that knows the concrete observers and actuators (the Kubernetes,
systemd and bus ones, and ``bus.escalate``); the loop, the bus link and the engine see
them through ``runtime.core.ports`` (an import-linter contract).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import structlog

from bus import subjects
from bus.connection import Connection
from bus.journal import Journal
from runtime import __version__
from runtime.agent.alerting import agent_alerts
from runtime.agent.deliberating import Deliberator, thinker_for
from runtime.agent.escalate import Escalate
from runtime.agent.execution import Execution
from runtime.agent.link import BusLink, BusView, LeaseReleaser, bus_observers, jetstream_settings
from runtime.agent.loop import Agent, Timing
from runtime.agent.metrics import Metrics
from runtime.agent.metrics import start as start_metrics
from runtime.agent.observing import Observing
from runtime.agent.voting import Voter
from runtime.config.credentials import (
    KUBECONFIG_FILE,
    CredentialError,
    credential_path,
    load_signer,
)
from runtime.config.loading import ConfigSet, bus_urls
from runtime.core.engine import PolicyEngine
from runtime.core.ports import Actuator, Actuators, Wall, utc_now
from runtime.host.acting import host_actuators
from runtime.host.notify import Notifier, watchdog_interval
from runtime.host.observing import host_observers
from runtime.kube.acting import ClientApi, kubernetes_actuators
from runtime.kube.client import KubeconfigError
from runtime.kube.observing import kubernetes_observer

log = structlog.get_logger()

NODE_NAME_ENV = "ZETA_NODE_NAME"


def build(config: ConfigSet, persona_name: str, *, state_dir: Path,
          environ: Mapping[str, str] = os.environ,
          actuators: Mapping[str, Actuator] | None = None, host: str | None = None,
          wall: Wall = utc_now) -> Agent:
    """The agent for one persona of a loaded configuration, wired to this host and the bus.

    ``wall`` is the one wall clock the loop, the bus link and deliberation share."""
    persona = config.persona(persona_name)
    policies = config.policies_of(persona)
    interval = watchdog_interval(environ)
    timing = Timing(tick=persona.spec.tick.total_seconds(),
                    watchdog=interval.total_seconds() / 2 if interval else None)
    host = host or socket.gethostname()
    engine = PolicyEngine(policies, default_quorum=config.fleet.spec.quorum)
    metrics = Metrics.of(persona)
    notifier = Notifier.from_env(environ)
    structlog.contextvars.bind_contextvars(persona=persona.name)
    kubeconfig = credential_path(KUBECONFIG_FILE, persona.name, config.fleet, environ)
    kubernetes = kubernetes_observer(kubeconfig, stale_after=2 * timing.tick)
    clients = [kubernetes] if kubernetes is not None else []
    # The Node this host runs: the kubelet registers it under the host name unless told
    # otherwise (--hostname-override, a cloud provider's naming), and so may the operator.
    node = environ.get(NODE_NAME_ENV, "") or host
    observers = host_observers(policies, config.fleet, state_dir, node=node,
                               explicit_node=bool(environ.get(NODE_NAME_ENV)), clients=clients)
    observers += clients
    signer = None
    try:
        signer = load_signer(persona, config.fleet, environ)
    except CredentialError as exc:
        # Keep observing and repairing what needs no quorum: losing the identity
        # must not blind the agent, only take its vote and its destructive power.
        log.error("bus disabled: no identity to sign with", error=str(exc))
    # In dependency order: what the bus link will learn (the view) first, so the bus
    # observers, the voter and the execution can read it; then the link, which hands
    # proposals to the voter; then the execution, which asks through the link.
    view = None
    if signer is not None:
        view = BusView(
            Connection(bus_urls(config, environ), name=f"zeta-agent@{persona.name}",
                       seed=signer.seed, inbox_prefix=subjects.inbox(persona.name)),
            persona=persona.name, personas=config.personas,
            lease_ttl=jetstream_settings(config).lease_ttl, wall=wall)
        observers += bus_observers(view)
    observing = Observing(observers, timeout=timing.observe_timeout, host=host)
    # Host actuators only under systemd: see runtime.host.acting.
    available: dict[str, Actuator] = {"bus.escalate": Escalate(),
                                      **host_actuators(persona, environ, host=host)}
    if kubeconfig.exists():
        try:
            available.update(kubernetes_actuators(ClientApi.from_kubeconfig(kubeconfig), persona))
        except KubeconfigError as exc:
            log.error("Kubernetes actuators disabled", error=str(exc))
    if view is not None:
        available["bus.lease.release"] = LeaseReleaser(view)
    registry = Actuators({**available, **(actuators or {})})
    thinker = thinker_for(config, persona_name, environ, metrics=metrics)
    deliberator = Deliberator(thinker, engine, wall=wall) if thinker is not None else None
    link = None
    if signer is not None and view is not None:
        voter = None
        if "vote" in persona.spec.duties:
            voter = Voter(persona, config=config, engine=engine, observing=observing,
                          view=view, metrics=metrics, wall=wall,
                          argue=thinker.argue if thinker is not None else None)
        link = BusLink(view, persona=persona, config=config, signer=signer, host=host,
                       engine=engine, journal=Journal(state_dir / "journal.jsonl"),
                       metrics=metrics, assess=voter.assess if voter is not None else None)
    execution = Execution(persona, engine=engine, actuators=registry,
                          observing=observing, link=link, metrics=metrics, wall=wall,
                          tick=timedelta(seconds=timing.tick),
                          windows=config.fleet.spec.maintenanceWindows)
    log.info("starting", version=__version__, policies=list(persona.spec.policies),
             tick_s=timing.tick, state_dir=str(state_dir), watchdog_s=timing.watchdog,
             notify_socket=notifier.address,
             bus=list(bus_urls(config, environ)) if link else "disabled",
             observers=[o.name for o in observing.observers],
             not_observed=list(observing.unobserved),
             kubernetes=kubernetes.url if kubernetes is not None else
             f"not observed: no usable kubeconfig at {kubeconfig}",
             actuators=sorted(registry.names) or "none: every intent that would act is refused")
    alerts = agent_alerts(config, persona.name, state_dir=state_dir, metrics=metrics,
                          environ=environ, wall=wall)
    return Agent(persona, engine=engine, observing=observing, execution=execution,
                 notifier=notifier, timing=timing, link=link, deliberator=deliberator,
                 metrics=metrics, wall=wall, alerts=alerts)


def serve(config: ConfigSet, persona_name: str, *, state_dir: Path, once: bool = False,
          environ: Mapping[str, str] = os.environ) -> int:
    """Run the persona's agent until SIGTERM/SIGINT (or one tick with ``once``)."""
    agent = build(config, persona_name, state_dir=state_dir, environ=environ)
    if once:
        return asyncio.run(agent.run_once())
    # Started before the first tick, so a scrape sees the agent from its start on.
    endpoint = start_metrics(agent.metrics, agent.persona, environ)
    try:
        return asyncio.run(_serve(agent))
    finally:
        if endpoint is not None:
            endpoint.close()


async def _serve(agent: Agent) -> int:
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            return
        log.info("stopping", signal=signum.name)
        agent.notifier.stopping()
        agent.notifier.status(f"stopping on {signum.name}")
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    result = await agent.run(stop)
    log.info("stopped", exit_code=result.code, ticks=agent.ticks, tick_errors=agent.errors)
    if result.abandoned:
        # asyncio.run would wait forever for tasks that swallow cancellation; leave
        # now, as systemd would after TimeoutStopSec anyway.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(result.code or 1)
    return result.code
