"""The actuators the agent itself provides, and the one way an actuator is run.

The agent only ever reaches an actuator through ``Actuators.lookup`` after the intent
was authorized. The Kubernetes actuators live in ``runtime.kube.acting``, the host
ones (systemd) in ``runtime.host.acting``, the bus's in ``runtime.agent.coordinating``;
here are ``bus.escalate``, the dry-run stand-in and ``run_actuator``. An action without
an actuator on this host is refused, saying so, rather than reported as done.
"""

from __future__ import annotations

import structlog

from runtime.core.engine import Intent
from runtime.core.ports import Actuator, Fence, Outcome, unfenced
from runtime.model.catalog import EscalateParams


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
