"""The actuators the agent itself provides, and the one way an actuator is run.

The agent only ever reaches an actuator through ``Actuators.lookup`` after the intent
was authorized. The Kubernetes actuators live in ``runtime.kube.acting``, the host
ones (systemd) in ``runtime.host.acting``, the bus's in ``runtime.agent.link``;
here are the dry-run stand-in and ``run_actuator`` (``bus.escalate`` is
``runtime.agent.escalate``). An action without
an actuator on this host is refused, saying so, rather than reported as done.
"""

from __future__ import annotations

import structlog

from runtime.core.engine import Intent
from runtime.core.ports import Actuator, Fence, Outcome, unfenced


class DryRunOnly:
    """Stands in for a missing actuator on a dry-run intent; refuses to do anything real."""

    async def run(self, intent: Intent, *, repair: str, dry_run: bool, fence: Fence) -> Outcome:
        if not dry_run:
            return Outcome(ok=False, detail=f"no actuator for {intent.action.name}")
        return Outcome(ok=True, detail=f"dry-run: {intent.action.name} on {intent.target.key} "
                                       "would run now; nothing was called")


async def run_actuator(actuator: Actuator, intent: Intent, repair: str,
                       fence: Fence = unfenced) -> Outcome:
    """Run an authorized intent; an actuator that raises has failed, the agent carries on."""
    try:
        return await actuator.run(intent, repair=repair, dry_run=intent.dry_run, fence=fence)
    except Exception as exc:
        structlog.get_logger().exception("actuator raised", intent=intent.id)
        return Outcome(ok=False, detail=f"{type(exc).__name__}: {exc}")
