"""Actuators: the code that changes the world, one per catalog action, behind one interface.

The agent only ever reaches an actuator through ``Actuators.lookup`` after the intent
was authorized. The Kubernetes actuators live in ``runtime.cluster.acting``, the host
ones (systemd) in ``runtime.hosting``, the bus's in ``runtime.coordinating``; here are
the interface, the registry and ``bus.escalate``. An action without an actuator on
this host is refused, saying so, rather than reported as done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from runtime.catalog import EscalateParams, lookup
from runtime.engine import Intent


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


class DryRunOnly:
    """Stands in for a missing actuator on a dry-run intent; refuses to do anything real."""

    async def run(self, intent: Intent, *, repair: str, dry_run: bool, fence: Fence) -> Outcome:
        if not dry_run:
            return Outcome(ok=False, detail=f"no actuator for {intent.action.name}")
        return Outcome(ok=True, detail=f"dry-run: {intent.action.name} on {intent.target.key} "
                                       "would run now; nothing was called")


class Escalate:
    """``bus.escalate``: hand the finding to people, on the record.

    The escalation is the repair's signed result on the bus (audited like every
    result, shown by ``zeta-agent watch`` and ``nats sub 'zeta.>'``, counted in
    ``zeta_agent_executions_total{action="bus.escalate"}``): that is what the humans
    watch and alert on. It changes nothing else, so it never fails.
    """

    async def run(self, intent: Intent, *, repair: str, dry_run: bool, fence: Fence) -> Outcome:
        assert isinstance(intent.params, EscalateParams)
        message = intent.params.message or "the policy's steps are exhausted"
        said = (f"{message} (finding: {intent.finding.summary}; policy {intent.policy}, "
                f"step {intent.step})")
        if dry_run:
            return Outcome(ok=True, detail=f"dry-run: would escalate to people: {said}")
        structlog.get_logger().warning("escalated to people", message=message,
                                       target=intent.target.key, policy=intent.policy)
        return Outcome(ok=True, detail=f"escalated to people: {said}")


async def run_actuator(actuator: Actuator, intent: Intent, repair: str,
                       fence: Fence = unfenced) -> Outcome:
    """Run an authorized intent; an actuator that raises has failed, the agent carries on."""
    try:
        return await actuator.run(intent, repair=repair, dry_run=intent.dry_run, fence=fence)
    except Exception as exc:
        structlog.get_logger().exception("actuator raised", intent=intent.id)
        return Outcome(ok=False, detail=f"{type(exc).__name__}: {exc}")
