"""Execution: the one owner of an intent, from ``authorize()`` to its result.

The loop hands every intent the engine (or the brain) offers to ``Execution.carry_out``,
which authorizes it with the bus link's real refusal, finds its actuator, and then
either runs it at once (no quorum needed; the result is recorded on the bus or in the
journal) or starts the quorum flow in the background:

    proposal → votes (each voter re-observes) → decision → lease (KV create,
    fencing token) → still needed? → started → fencing check → actuator → result →
    verify → result (verified/unverified) → lease released

Whatever happens, the engine hears exactly one answer per intent (started then
finished, or refused) and the repair's lease is released when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Literal

import structlog

from bus import leases
from bus.envelope import format_time
from bus.ids import new_id
from bus.messages import EvidencePath, Proposal, QuorumRule
from runtime.agent.acting import DryRunOnly, run_actuator
from runtime.agent.link import ALL_POLICIES, BUS_ERRORS, BusLink
from runtime.agent.metrics import Metrics
from runtime.agent.observing import Observing
from runtime.core.alerts import Paused
from runtime.core.authorizing import authorize
from runtime.core.detecting import detect
from runtime.core.engine import Event, Intent, PolicyEngine, RepairVerified, StepFailed
from runtime.core.ports import Actuator, Actuators, NoActuatorError, Outcome, Wall
from runtime.model.catalog import COMPENSATIONS
from runtime.model.formats import MaintenanceWindow, Persona, open_windows
from runtime.model.paths import PRIMARY

log = structlog.get_logger("execution")

BUS_RETRY = timedelta(seconds=5)
"""When a refusal was the bus's doing, not the quorum's: ask again soon, so a repair goes
ahead shortly after a partition heals rather than a whole refusal back-off later."""
NO_BUS = "bus down (no bus identity to sign with)"

Carried = Literal["left", "refused", "launched", "succeeded", "failed"]
"""What ``carry_out`` did: left to the executors (this persona does not execute),
refused, handed to the quorum flow, or run at once and succeeded or failed."""


def _compensation(intent: Intent | None) -> bool:
    return intent is not None and intent.action.name in COMPENSATIONS


class Execution:
    """Carries out one persona's intents; ``link`` is None when it has no bus identity."""

    def __init__(self, persona: Persona, *, engine: PolicyEngine,
                 actuators: Actuators, observing: Observing, link: BusLink | None,
                 metrics: Metrics, wall: Wall, tick: timedelta,
                 windows: Sequence[MaintenanceWindow] = ()) -> None:
        self.persona = persona
        self.windows = tuple(windows)
        self.engine = engine
        self.actuators = actuators
        self.observing = observing
        self.link = link
        self.metrics = metrics
        self.wall = wall
        self._tick = tick
        self._repairs: dict[str, tuple[str, leases.Lease | None]] = {}  # intent id → repair, lease
        self._tasks: set[asyncio.Task[None]] = set()

    def paused(self, intent: Intent) -> str | None:
        """Why an operator's pause holds ``intent`` now, or None. Compensations and
        escalations are never held: undoing a repair and telling people stay allowed."""
        if _compensation(intent) or intent.action.name == "bus.escalate":
            return None
        now = self.wall()
        for window, closes in open_windows(self.windows, now):
            if window.holds(intent.policy):
                return f"maintenance window {window.name} until {format_time(closes)}"
        pause = self.link.view.pauses.holding(intent.policy, now) if self.link else None
        if pause is None:
            return None
        scope = "every policy" if pause.scope == ALL_POLICIES else f"policy {pause.scope}"
        return (f"paused by {pause.by} until {format_time(pause.until)} ({scope}): "
                f"{pause.reason}")

    def holds(self) -> list[Paused]:
        """Every pause and open maintenance window now, for alerts and metrics."""
        now = self.wall()
        pauses = self.link.view.pauses.active(now) if self.link is not None else []
        return [*(Paused(p.scope, p.by, p.reason, format_time(p.until)) for p in pauses),
                *(Paused(",".join(w.policies) or ALL_POLICIES, f"maintenance window {w.name}",
                         f"schedule {w.schedule} ({w.timeZone})", format_time(closes))
                  for w, closes in open_windows(self.windows, now))]

    def repair_of(self, intent_id: str) -> str | None:
        """The bus repair id of an intent in flight (None: not one of ours, or none yet)."""
        entry = self._repairs.get(intent_id)
        return entry[0] if entry is not None else None

    def refusal(self, intent: Intent | None = None) -> str | None:
        """Why nothing needing a quorum may start now (None: it may); for ``intent``,
        why it may not (a compensation is not stopped by a freeze)."""
        if self.link is None:
            return NO_BUS
        return self.link.view.refusal(compensation=_compensation(intent))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------ from the loop

    async def carry_out(self, intent: Intent) -> Carried:
        """Authorize ``intent`` and act on it (or hand it to the quorum flow)."""
        context = {"intent": intent.id, "action": intent.action.name,
                   "target": intent.target.key, "destructive": intent.destructive}
        bus_refusal = self.refusal(intent)
        verdict = authorize(self.persona, intent, quorum_refusal=bus_refusal)
        if "execute" not in self.persona.spec.duties:
            # A voter runs the policies to know what executors will propose and to judge
            # it; carrying out the remedies is not its duty, so this is no refusal worth
            # a warning (or a count) every time the engine offers the step again.
            self.engine.refused(intent.id, self.wall(), verdict.reason)
            log.debug("intent left to the executors", **context)
            return "left"
        if (pause := self.paused(intent)) is not None:
            # Held, not refused: asked again every tick, so it goes as soon as the pause
            # lapses or is lifted.
            self.engine.refused(intent.id, self.wall(), pause, retry_after=self._tick)
            log.info("intent held", **context, reason=pause)
            return "left"
        found = self._actuator(intent) if verdict.allowed else verdict.reason
        if isinstance(found, str):
            # Waiting for the bus is transient: ask again next tick, not a minute later,
            # so a repair goes ahead as soon as the bus is back.
            waiting = verdict.needs_quorum and bus_refusal is not None
            self.engine.refused(intent.id, self.wall(), found,
                                retry_after=self._tick if waiting else None)
            (log.info if waiting else log.warning)("intent refused", **context, reason=found)
            return "refused"
        actuator = found
        if verdict.needs_quorum:
            log.info("proposing", **context, dry_run=intent.dry_run)
            self._launch(intent, actuator)
            return "launched"
        self.engine.started(intent.id, self.wall())
        log.info("action started", **context, dry_run=intent.dry_run)
        outcome = await self._act_alone(intent, actuator)
        self.engine.finished(intent.id, self.wall(), ok=outcome.ok, detail=outcome.detail)
        self.metrics.execution(intent.action.name, ok=outcome.ok)
        (log.info if outcome.ok else log.warning)(
            "action finished", **context, ok=outcome.ok, detail=outcome.detail)
        return "succeeded" if outcome.ok else "failed"

    def _actuator(self, intent: Intent) -> Actuator | str:
        """The actuator for ``intent``, or why there is none."""
        try:
            return self.actuators.lookup(intent.action.name)
        except NoActuatorError as exc:
            if intent.dry_run:
                # A dry run is everything but the actuator call, so it can go through
                # the whole quorum even where this host could not carry it out.
                return DryRunOnly()
            return str(exc)

    async def on_events(self, events: Iterable[Event]) -> None:
        """End the repairs the engine has verified, or given up verifying."""
        for event in events:
            match event:
                case RepairVerified(intent=intent):
                    await self._conclude(intent, "verified", "verify expectation met")
                case StepFailed(intent=intent, reason=reason):
                    await self._conclude(intent, "unverified", reason)
                case _:
                    pass

    # ------------------------------------------------------------ no quorum

    async def _act_alone(self, intent: Intent, actuator: Actuator) -> Outcome:
        """Run it and record the result (bus or journal; without a bus, only the log)."""
        repair = new_id()
        outcome = await run_actuator(actuator, intent, repair)
        if self.link is None:
            return outcome
        self._repairs[intent.id] = (repair, None)
        await self.link.record(intent, repair, "succeeded" if outcome.ok else "failed",
                               outcome.detail)
        if not outcome.ok:
            self._repairs.pop(intent.id, None)
        return outcome

    # ------------------------------------------------------------ with a quorum

    def _launch(self, intent: Intent, actuator: Actuator) -> None:
        """Start the quorum flow for ``intent`` in the background (it outlives the tick)."""
        task = asyncio.create_task(self._with_quorum(intent, actuator),
                                   name=f"repair:{intent.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _with_quorum(self, intent: Intent, actuator: Actuator) -> None:
        bound = structlog.contextvars.bound_contextvars(intent=intent.id, target=intent.target.key)
        with bound:
            try:
                assert self.link is not None  # authorize() refused a quorum without a bus
                await self._quorum_flow(self.link, intent, actuator)
            except Exception as exc:
                log.exception("repair flow failed")
                self._answer_refused(intent, f"repair flow failed: {type(exc).__name__}: {exc}")

    def _answer_refused(self, intent: Intent, reason: str, *,
                        retry_after: timedelta | None = None) -> None:
        log.warning("intent refused", reason=reason)
        with contextlib.suppress(ValueError):  # already answered before the flow failed
            self.engine.refused(intent.id, self.wall(), reason, retry_after=retry_after)

    def _proposal(self, intent: Intent) -> Proposal:
        assert intent.quorum is not None
        return Proposal(
            action=intent.action.name, target=intent.target,
            params=intent.params.model_dump(mode="json"), policy=intent.policy,
            policy_digest=intent.policy_digest, step=intent.step,
            destructive=intent.destructive,
            quorum=QuorumRule(approvals=intent.quorum.approvals, veto=intent.quorum.veto,
                              deadline=self.wall() + intent.quorum.deadline,
                              evidence=intent.quorum.evidence),
            summary=intent.finding.summary, evidence=dict(intent.finding.evidence),
            rationale=intent.rationale, paths=self._paths(intent))

    def _paths(self, intent: Intent) -> tuple[EvidencePath, ...]:
        """The proposer's evidence path: the one its detector saw the finding by."""
        policy = self.engine.policy(intent.policy)
        return (PRIMARY[policy.spec.detect.kind],) if policy is not None else ()

    async def _quorum_flow(self, link: BusLink, intent: Intent, actuator: Actuator) -> None:
        view = link.view
        if (reason := self.refusal(intent)) is not None:
            self._answer_refused(intent, reason, retry_after=BUS_RETRY)
            return
        try:
            repair, tally = await link.propose(self._proposal(intent))
        except BUS_ERRORS as exc:
            self.metrics.proposal("failed")
            self._answer_refused(intent, f"bus failed during the vote, nothing was done: {exc}",
                                 retry_after=BUS_RETRY)
            return
        self.metrics.proposal(tally.outcome)
        if tally.outcome != "approved":
            self._answer_refused(intent, f"quorum {tally.outcome}: {tally.reason}")
            return
        # The world may have changed during the vote: check again before acting.
        if (reason := self.refusal(intent)) is not None or view.kv is None:
            self._answer_refused(intent, reason or "no lease bucket")
            await link.record(intent, repair, "refused", reason or "no lease bucket")
            return
        kv = view.kv
        try:
            lease = await leases.acquire(kv, intent.target.key, repair=repair,
                                         executor=self.persona.name, ttl=view.lease_ttl)
        except (leases.LeaseHeldError, *BUS_ERRORS) as exc:
            self._answer_refused(intent, f"no lease: {exc}")
            await link.record(intent, repair, "refused", f"no lease: {exc}")
            return
        if not await self._still_needed(intent):
            # Approved, but the world moved on while we voted (another executor fixed
            # it first, or it healed): acting now would be a second repair of nothing.
            reason = f"{intent.finding.summary!r} no longer holds; nothing to do"
            await leases.release(kv, lease)
            self._answer_refused(intent, reason)
            await link.record(intent, repair, "refused", reason)
            return
        self._repairs[intent.id] = (repair, lease)
        await link.started(repair, lease)
        self.engine.started(intent.id, self.wall())

        async def fence() -> bool:
            held = await leases.still_held(kv, lease)
            if not held:
                log.error("fencing token is stale: not acting", fencing_token=lease.token)
            return held

        if await fence():
            outcome = await run_actuator(actuator, intent, repair, fence)
        else:
            outcome = Outcome(False, f"fencing token {lease.token} is stale: the lease moved on")
        self.engine.finished(intent.id, self.wall(), ok=outcome.ok, detail=outcome.detail)
        self.metrics.execution(intent.action.name, ok=outcome.ok)
        log.info("action finished", repair=repair, ok=outcome.ok, detail=outcome.detail,
                 fencing_token=lease.token)
        await link.record(intent, repair, "succeeded" if outcome.ok else "failed",
                          outcome.detail)
        if not outcome.ok or intent.dry_run:
            await self._conclude(intent)

    async def _still_needed(self, intent: Intent) -> bool:
        """Look once more, under the lease, that the finding behind ``intent`` still holds."""
        policy = self.engine.policy(intent.policy)
        if policy is None:
            return True
        detection = detect(policy.spec.detect, await self.observing.snapshot(self.wall()))
        # What cannot be seen right now was confirmed by the quorum a moment ago.
        return not detection.known or intent.finding.target.key in detection.matches

    async def _conclude(self, intent: Intent, outcome: str | None = None,
                        detail: str = "") -> None:
        """End a repair: publish its verification ``outcome`` (if any), release its lease.

        A repair that failed, or was a dry run, is not verified: its one result is
        already on the bus, and a second would read like a second execution.
        """
        repair, lease = self._repairs.pop(intent.id, (None, None))
        if repair is None or self.link is None:
            return
        if outcome is not None:
            await self.link.record(intent, repair, outcome, detail)
        kv = self.link.view.kv
        if lease is not None and kv is not None:
            try:
                await leases.release(kv, lease)
            except BUS_ERRORS as exc:
                # The lease expires by itself (leaseTtl); the stale-lease policy sweeps it.
                log.warning("lease not released", repair=repair, error=str(exc))
