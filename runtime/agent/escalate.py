"""``bus.escalate``: the actuator that hands a finding to people, on the record."""

from __future__ import annotations

import structlog

from runtime.core.engine import Intent
from runtime.core.ports import Fence, Outcome
from runtime.model.catalog import EscalateParams


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
