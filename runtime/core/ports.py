"""The ports of the decision core: what an observer and an actuator look like to it.

Pure: interfaces and plain data only. The concrete observers live in ``runtime.kube``
and ``runtime.host``, the concrete actuators there too (and the bus's and
``bus.escalate`` in ``runtime.agent``); only ``runtime.agent.wiring`` puts them together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol, TypedDict, get_args

from bus.messages import NodeReport
from runtime.core.engine import Intent
from runtime.model.catalog import lookup
from runtime.model.snapshot import (
    ApiProbe,
    BudgetObs,
    EventObs,
    HostHealth,
    LeaseObs,
    NodeObs,
    PeerObs,
    PodObs,
    SourceStatus,
    UnitObs,
)

# ---------------------------------------------------------------- the clock

Wall = Callable[[], datetime]
"""The one wall clock of an agent: everything that reports a time to the engine (the
loop, the bus link, deliberation) reads the same one, injected by the wiring."""


def utc_now() -> datetime:
    """The system's wall clock, aware, in UTC: the production ``Wall``."""
    return datetime.now(UTC)


# ---------------------------------------------------------------- observing

Domain = Literal["nodes", "pods", "apiserver", "units", "peers", "leases", "health",
                 "events", "budgets", "node_report"]
DOMAINS: tuple[Domain, ...] = get_args(Domain)


class Contribution(TypedDict, total=False):
    """The snapshot domains one observer filled in (a domain it left out stays None)."""

    nodes: tuple[NodeObs, ...]
    pods: tuple[PodObs, ...]
    apiserver: tuple[ApiProbe, ...]
    units: tuple[UnitObs, ...]
    peers: tuple[PeerObs, ...]
    leases: tuple[LeaseObs, ...]
    health: HostHealth
    events: tuple[EventObs, ...]
    budgets: tuple[BudgetObs, ...]
    node_report: NodeReport


@dataclass(frozen=True)
class Observed:
    """One observer's result for one tick."""

    data: Contribution
    status: SourceStatus


class Observer(Protocol):
    """Something that looks at one part of the world once per tick."""

    @property
    def name(self) -> str:
        """Its key in ``Snapshot.sources``."""
        ...

    @property
    def provides(self) -> frozenset[Domain]:
        """The snapshot domains it fills; disjoint from every other observer's."""
        ...

    async def observe(self, now: datetime) -> Observed:
        """Look once. Expected failures belong in ``Observed.status``, not in exceptions."""
        ...


class ProbeSource(Protocol):
    """A client that reaches the API server along a path of its own (the Kubernetes watches)."""

    async def probes(self) -> tuple[ApiProbe, ...]:
        """How its requests fare right now (the client reports as it goes)."""
        ...


# ---------------------------------------------------------------- acting


@dataclass(frozen=True)
class Outcome:
    """What running an action did: ``ok`` is whether it did what it says."""

    ok: bool
    detail: str = ""


Fence = Callable[[], Awaitable[bool]]
"""Answers, right before a mutating call, whether this executor still holds the target's
lease (its fencing token is still current). An actuator calls it before every change,
so a stale executor (its lease expired and was re-taken) stops instead of acting."""


async def unfenced() -> bool:
    """The fence of a repair that needed no lease (non-destructive, no quorum)."""
    return True


class Actuator(Protocol):
    """Carries out one kind of catalog action."""

    async def run(self, intent: Intent, *, repair: str, dry_run: bool, fence: Fence) -> Outcome:
        """Run ``intent`` as part of ``repair`` (its id on the bus and in the audit).

        With ``dry_run`` do everything but the change itself. Call ``fence()`` before
        each mutating call and stop, failing, if it says no.
        """
        ...


class NoActuatorError(LookupError):
    """The action is in the catalog but this runtime cannot carry it out yet."""

    def __init__(self, action: str) -> None:
        self.action = action
        super().__init__(f"no actuator for {action} yet")


class Actuators:
    """The registry from catalog action names to the actuators that carry them out."""

    def __init__(self, actuators: Mapping[str, Actuator] | None = None) -> None:
        actuators = dict(actuators or {})
        for name in actuators:
            lookup(name)  # an actuator for an action the catalog lacks is a wiring bug
        self._actuators = actuators

    @property
    def names(self) -> tuple[str, ...]:
        """The actions this runtime can carry out."""
        return tuple(self._actuators)

    def lookup(self, action: str) -> Actuator:
        """The actuator for ``action``; raises NoActuatorError if there is none."""
        try:
            return self._actuators[action]
        except KeyError:
            raise NoActuatorError(action) from None
