"""Small builders for snapshots, policies and personas, so tests state only what matters.

Time is always explicit: ``at(90)`` is 90 seconds after ``T0``; nothing reads a clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bus.connection import Connection
from bus.journal import Journal
from bus.keys import Signer, generate_user_seed
from bus.messages import Target
from runtime.agent.deliberating import Deliberator
from runtime.agent.execution import Execution
from runtime.agent.link import BusLink, BusView
from runtime.agent.loop import Agent, Timing
from runtime.agent.metrics import Metrics
from runtime.agent.observing import Observing
from runtime.agent.voting import Voter
from runtime.config.loading import ConfigSet
from runtime.core.engine import Finding, Intent, PolicyEngine
from runtime.core.ports import Actuators, Fence, Outcome, Wall, utc_now
from runtime.host.notify import Notifier
from runtime.model.catalog import REPAIR_ANNOTATION, Params, lookup
from runtime.model.formats import Persona, Remedy, RepairPolicy
from runtime.model.snapshot import (
    ApiProbe,
    ContainerObs,
    EventObs,
    LeaseObs,
    NodeCondition,
    NodeObs,
    PeerObs,
    PodObs,
    Snapshot,
    UnitObs,
)

T0 = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
HOST = "cp-1"
# A real, checksummed user public key (otto's placeholder); personas here differ by name.
NKEY = "UAVU6MCTMJRPGFHMLWUVPDZUTOSFEKL2NRLLKZEVG574EVSST2TEX66Q"


def at(seconds: float) -> datetime:
    """``T0`` plus ``seconds``."""
    return T0 + timedelta(seconds=seconds)


def node(name: str, ready: str | None = "True", *, labels: Mapping[str, str] | None = None,
         unschedulable: bool = False, repair: str | None = None) -> NodeObs:
    """A node whose Ready condition is ``ready`` (None: not reported); ``repair`` cordons it."""
    conditions = () if ready is None else (
        NodeCondition(type="Ready", status=ready, reason="KubeletReady" if ready == "True"
                      else "NodeStatusUnknown", since=T0),)
    return NodeObs(name=name, labels=dict(labels or {}), conditions=conditions,
                   unschedulable=unschedulable or repair is not None,
                   annotations={REPAIR_ANNOTATION: repair} if repair else {})


def deployment(name: str, namespace: str = "default") -> Target:
    return Target(kind="deployment", name=name, namespace=namespace)


def pod(name: str, *, namespace: str = "default", owner: Target | None = None,
        restarts: int = 0, crashloop: bool = False, phase: str = "Running",
        ready: bool = True) -> PodObs:
    """A one-container pod; ``crashloop`` puts its container in CrashLoopBackOff."""
    container = ContainerObs(name="app", restarts=restarts, ready=ready and not crashloop,
                             waiting_reason="CrashLoopBackOff" if crashloop else "")
    return PodObs(namespace=namespace, name=name, node="worker-1", phase=phase, owner=owner,
                  containers=(container,))


def probe(path: str, ok: bool) -> ApiProbe:
    return ApiProbe(path=path, ok=ok, error="" if ok else "connection refused")


def unit(name: str, active_state: str = "active", *, load_state: str = "loaded") -> UnitObs:
    return UnitObs(name=name, active_state=active_state, load_state=load_state)


def peer(persona: str, last_heartbeat: datetime | None) -> PeerObs:
    return PeerObs(persona=persona, last_heartbeat=last_heartbeat, host="cp-2")


def lease(key: str, repair: str, expires: datetime, holder: str = "otto") -> LeaseObs:
    return LeaseObs(key=key, repair=repair, holder=holder, expires=expires)


def snapshot(t: float, *, host: str = HOST, nodes: Sequence[NodeObs] | None = None,
             pods: Sequence[PodObs] | None = None, apiserver: Sequence[ApiProbe] | None = None,
             units: Sequence[UnitObs] | None = None, peers: Sequence[PeerObs] | None = None,
             leases: Sequence[LeaseObs] | None = None,
             events: Sequence[EventObs] | None = None) -> Snapshot:
    """A snapshot ``t`` seconds after ``T0``; a domain left out was not observed."""

    def seen(items: Sequence[Any] | None) -> tuple[Any, ...] | None:
        return None if items is None else tuple(items)

    return Snapshot(at=at(t), host=host, nodes=seen(nodes), pods=seen(pods),
                    apiserver=seen(apiserver), units=seen(units), peers=seen(peers),
                    leases=seen(leases), events=seen(events))


def policy(name: str, detect: Mapping[str, Any], remedies: Sequence[Mapping[str, Any]], *,
           budget: Mapping[str, Any] | None = None, cooldown: str = "10m",
           mode: str = "enforce") -> RepairPolicy:
    """A RepairPolicy validated exactly as the loader would."""
    spec: dict[str, Any] = {"detect": dict(detect), "remedies": [dict(r) for r in remedies],
                            "cooldown": cooldown, "mode": mode}
    if budget is not None:
        spec["budget"] = dict(budget)
    return RepairPolicy.model_validate({
        "apiVersion": "zeta/v1", "kind": "RepairPolicy", "metadata": {"name": name},
        "spec": spec,
    })


def persona(name: str = "otto", *, tier: str = "propose", scopes: Sequence[str] = (),
            duties: Sequence[str] = ("propose", "vote", "execute")) -> Persona:
    return Persona.model_validate({
        "apiVersion": "zeta/v1", "kind": "Persona", "metadata": {"name": name},
        "spec": {"displayName": name.title(), "role": "test", "tier": tier,
                 "identity": {"nkey": NKEY, "kubernetes": {"user": f"zeta-{name}"}},
                 "scopes": list(scopes), "duties": list(duties)},
    })


class RecordingActuator:
    def __init__(self, outcome: Outcome | None = None) -> None:
        self.outcome = outcome
        self.runs: list[tuple[str, bool]] = []
        self.fences: list[bool] = []  # what the fence said when the action ran

    async def run(self, intent: Intent, *, repair: str, dry_run: bool, fence: Fence) -> Outcome:
        self.runs.append((intent.id, dry_run))
        self.fences.append(await fence())
        if self.outcome is None:
            raise RuntimeError("actuator exploded")
        return self.outcome


def intent(action: str, target: Target, params: Params | None = None, *, dry_run: bool = False,
           evidence: Mapping[str, Any] | None = None) -> Intent:
    """An authorized intent for ``action`` on ``target``, as the engine would offer it."""
    entry = lookup(action)
    finding = Finding(policy="p", target=target, since=T0, summary="test",
                      evidence=dict(evidence or {}))
    return Intent(id=f"p:{target.key}:0:1", policy="p", policy_digest="0" * 64, target=target,
                  step=0, remedy=Remedy(action=action), action=entry,
                  params=params or entry.params(), destructive=entry.destructive, quorum=None,
                  dry_run=dry_run, finding=finding, offered_at=T0)


async def stale() -> bool:
    """The fence of an executor whose lease has moved on."""
    return False


def local_agent(persona: Persona, *, engine: PolicyEngine, observing: Observing,
                actuators: Actuators, notifier: Notifier, timing: Timing,
                wall: Wall = utc_now, clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                deliberator: Deliberator | None = None) -> Agent:
    """An agent without a bus, built in the wiring's order: what needs a quorum is
    refused, everything else runs and is logged."""
    metrics = Metrics.of(persona)
    execution = Execution(persona, engine=engine, actuators=actuators, observing=observing,
                          link=None, metrics=metrics, wall=wall,
                          tick=timedelta(seconds=timing.tick))
    return Agent(persona, engine=engine, observing=observing, execution=execution,
                 notifier=notifier, timing=timing, metrics=metrics, clock=clock, sleep=sleep,
                 wall=wall, deliberator=deliberator)


def unconnected_bus(config: ConfigSet, name: str, *, observing: Observing | None = None,
                    journal: Path = Path("never-written.jsonl")) -> tuple[BusLink, Voter]:
    """The persona's bus link (never connected: its state is what the test sets) and
    its voter, built in the wiring's order."""
    persona = config.persona(name)
    metrics = Metrics.of(persona)
    engine = PolicyEngine(config.policies_of(persona))
    view = BusView(Connection(["nats://127.0.0.1:1"], name="t", seed=None), persona=name,
                   personas=config.personas, lease_ttl=timedelta(minutes=5))
    voter = Voter(persona, config=config, engine=engine,
                  observing=observing or Observing([], timeout=1, host="cp-1"), view=view,
                  metrics=metrics, wall=utc_now)
    link = BusLink(view, persona=persona, config=config, signer=Signer(generate_user_seed()),
                   host="cp-1", engine=engine, journal=Journal(journal), metrics=metrics,
                   assess=voter.assess)
    return link, voter
