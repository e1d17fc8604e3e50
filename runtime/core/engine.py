"""The policy engine: detections over time become findings, findings become intents.

Pure and stateful: no I/O, and the only clock is ``snapshot.at`` and the ``at`` of
each report, so every behaviour below is tested with made-up times. The agent feeds
it one snapshot per tick (``evaluate``) and reports what became of each intent
(``started``, ``finished``, ``refused``). The semantics, per policy and per target:

**Findings and ``for:``.** A finding opens once the policy's detector has matched the
target in every snapshot for at least ``for`` (a run starts at the first matching
snapshot; ``Finding.since`` is that time). It clears at the first snapshot in which
the detector, having observed its domain, no longer matches the target. A detection
whose domain was not observed (``population is None``) changes nothing: it neither
breaks a run nor confirms one, opens nothing and clears nothing. Events:
``FindingOpened``, ``FindingCleared``.

**Escalation ladder.** For an open finding the engine offers an ``Intent`` for remedy
step 0, once: an offered intent is not offered again until the agent answers it.

- ``finished(ok=True)`` on a remedy with ``verify``: the expectation is checked on
  each later snapshot (taken after the finish). Met by ``finish + verify.within`` and
  then on every snapshot for ``verify.healthyFor`` (zero by default): ``RepairVerified``,
  the ladder ends and the target's cooldown starts. Not met by then, or unmet again at
  or past the deadline (or unknown there): ``StepFailed``, and the next step is offered
  in the same evaluation; a relapse before the deadline only restarts the count. The
  first snapshot at or past the deadline is still read first: the agent cannot look
  between ticks, so a tick longer than ``within`` does not fail a repair that worked.
- ``finished(ok=True)`` without ``verify``: verified at once.
- ``finished(ok=False)``: ``StepFailed``; the next step is offered at the next
  evaluation.
- past the last step: ``LadderExhausted``, and the cooldown starts.
- ``refused`` (scope denied, bus down, quorum rejected): the ladder stays on that step
  and offers it again no sooner than ``retry_after`` later.
- After the cooldown, a finding that is still open starts the ladder again at step 0.
  A cooldown outlives its finding, so a target that flaps is not repaired more often
  than once per cooldown.
- **Attempts.** Every repair action started on a target (escalations aside) counts
  against ``budget.maxAttempts`` over the trailing ``budget.attemptsWindow``, across
  ladders. A target that has used them up is not repaired again: the engine offers one
  ``bus.escalate`` (``Intent.guard`` says why), holds the target with that reason until
  the window has let old attempts go, and escalates again at most once per window. A
  repair that never heals thus runs exactly ``maxAttempts`` actions, then asks people.
- When a finding clears, its ladder is dropped, unless its intent is still out
  (offered, running or verifying): then the ladder is kept, and budgets keep counting
  it, until that intent is refused or fails (dropped, no cooldown: nothing changed
  on the target) or its repair is verified or its verify times out (both start the
  cooldown, with no next step). If the finding opens again meanwhile, the ladder
  carries on with it as usual.

Events produced by reports (``StepFailed``, ``RepairVerified``, ``LadderExhausted``,
``BreakerReset``) are delivered by the next ``evaluate``, so the agent publishes
events from one place.

**Targets.** A remedy acts on the finding's target when the action accepts that kind.
``host.unit.*`` actions act on ``Target(kind="unit", name=params.unit, host=...)``, the
host being the finding target's host, else the node's name for a node finding, else
the snapshot's host. ``host.node.reboot`` on a node finding acts on the node's host.
``bus.escalate`` goes with the finding's target. A step that cannot apply to the
target (``k8s.workload.restart`` on a pod with no workload) is skipped and reported as
a ``Hold`` naming why; the ladder moves to the next step.

**Compensations** (``k8s.node.uncordon``, ``bus.lease.release``: undoing what a repair
left behind) are never held by the breaker, ``maxInFlight`` or ``perHour``.

**Budgets**, per policy: ``maxInFlight`` bounds intents offered-but-unanswered,
running and verifying; ``perHour`` bounds starts in the trailing hour, counting
offered intents as about to start so a burst of offers cannot overshoot it. Over
budget, the engine returns a ``Hold`` with the reason instead of the intent, and offers
it at a later evaluation when the budget allows. Intents are offered oldest finding
first.

**Breaker**, per policy: when the detector matches more than ``maxUnhealthyFraction``
of its population (known and non-zero), the breaker trips (``BreakerTripped``, once)
and stays tripped until ``reset_breaker`` (an operator or a quorum): it does not close
when the fraction drops, because a falling fraction can also mean unhealthy targets
left the population; someone decides the storm is over. While tripped, the policy's
destructive intents are held; non-destructive ones (start a unit, escalate) go on.
The breaker is per policy because the fraction is measured over that policy's own
population: ten crash-looping pods say nothing about whether draining nodes is safe,
and one storm should not silence unrelated repairs. The fraction uses this snapshot's
raw matches, not open findings: a storm must stop repairs before ``for`` elapses.

**Holds** are returned at each evaluation while the reason lasts (budget, breaker,
refusal back-off, detector domain not observed: no repair is offered on evidence
this tick could not refresh); a skipped step is reported once. A cooldown is not a
hold: it follows from an event the agent already saw.

**Intent ids** (``policy:target-key:step:n``, ``n`` counting the engine's offers for
that policy and target) are engine-local handles. The repair id on the bus is a ULID
the agent assigns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import Enum
from typing import ClassVar

from bus.messages import Required, Target
from runtime.core.detecting import JSON, Detection, Match, detect, expectation_met
from runtime.core.targets import action_target, opt_out
from runtime.model.catalog import COMPENSATIONS, Action, Params, lookup
from runtime.model.durations import format_duration
from runtime.model.formats import DEFAULT_FLEET, Quorum, Remedy, RepairPolicy
from runtime.model.snapshot import Snapshot

RETRY_AFTER = timedelta(seconds=60)
BUDGET_WINDOW = timedelta(hours=1)


def policy_digest(policy: RepairPolicy) -> str:
    """sha256 (hex) of the policy's canonical JSON: keys sorted, compact, UTF-8.

    Voters compare it with their own copy, so two agents disagree on a digest
    exactly when they would disagree on what the policy says.
    """
    canonical = json.dumps(policy.model_dump(mode="json", by_alias=True), sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def required(policy: RepairPolicy, step: int, default: Quorum) -> Required | None:
    """The terms a proposal for ``step`` of ``policy`` must meet (None: no such step).

    A step that needs no quorum still gets terms when proposed (a proposer may ask
    more than it must): one approval, no veto, the default deadline.
    """
    remedies = policy.spec.remedies
    if not 0 <= step < len(remedies):
        return None
    remedy = remedies[step]
    quorum = remedy.quorum_under(default)
    if quorum is None:
        return Required(approvals=1, veto=(), deadline=default.deadline.total_seconds(),
                        destructive=False)
    return Required(approvals=quorum.approvals, veto=quorum.veto,
                    deadline=quorum.deadline.total_seconds(), destructive=remedy.is_destructive,
                    evidence=quorum.evidence)


def required_at(policy: RepairPolicy | None, digest: str, step: int,
                default: Quorum) -> Required | None:
    """The terms ``policy`` demands for ``step`` if it is the policy at ``digest``; None
    when it is unknown, at another digest, or has no such step."""
    if policy is None or policy_digest(policy) != digest:
        return None
    return required(policy, step, default)


# ---------------------------------------------------------------- what the engine says


@dataclass(frozen=True)
class Finding:
    """A condition that has held on one target for the policy's ``for``."""

    policy: str
    target: Target
    since: datetime
    summary: str
    evidence: Mapping[str, JSON]


@dataclass(frozen=True)
class Intent:
    """One remedy step the engine wants run on one target; the agent authorizes and acts."""

    id: str
    policy: str
    policy_digest: str
    target: Target
    step: int
    remedy: Remedy
    action: Action
    params: Params
    destructive: bool
    quorum: Quorum | None
    dry_run: bool
    finding: Finding
    offered_at: datetime
    # Why this step: empty from the rules brain (the policy is the reason), the
    # model's words when a brain picked it. Travels in the proposal.
    rationale: str = ""
    # Set on the escalation a loop guard offers instead of the ladder's step: why the
    # engine stopped repairing the target.
    guard: str = ""


@dataclass(frozen=True)
class Hold:
    """An intent the engine would offer but does not, and why."""

    policy: str
    target: Target
    reason: str
    step: int | None = None


@dataclass(frozen=True)
class FindingOpened:
    kind: ClassVar[str] = "finding.opened"
    finding: Finding
    at: datetime


@dataclass(frozen=True)
class FindingCleared:
    kind: ClassVar[str] = "finding.cleared"
    finding: Finding
    at: datetime


@dataclass(frozen=True)
class RepairVerified:
    kind: ClassVar[str] = "repair.verified"
    intent: Intent
    at: datetime


@dataclass(frozen=True)
class StepFailed:
    """The step's action failed or its verify was not met in time; the ladder moves on."""

    kind: ClassVar[str] = "repair.step-failed"
    intent: Intent
    reason: str
    at: datetime


@dataclass(frozen=True)
class LadderExhausted:
    kind: ClassVar[str] = "repair.exhausted"
    finding: Finding
    at: datetime
    cooldown_until: datetime


@dataclass(frozen=True)
class BreakerTripped:
    kind: ClassVar[str] = "breaker.tripped"
    policy: str
    at: datetime
    matches: int
    population: int
    fraction: float
    limit: float

    @property
    def reason(self) -> str:
        return (f"breaker tripped: {self.matches}/{self.population} unhealthy "
                f"({self.fraction:.0%} > {self.limit:.0%})")


@dataclass(frozen=True)
class BreakerReset:
    kind: ClassVar[str] = "breaker.reset"
    policy: str
    by: str
    at: datetime


Event = (FindingOpened | FindingCleared | RepairVerified | StepFailed | LadderExhausted
         | BreakerTripped | BreakerReset)


@dataclass(frozen=True)
class Evaluation:
    """The outcome of one ``evaluate``: what happened, what to do, what waits, what is open."""

    at: datetime
    events: tuple[Event, ...]
    intents: tuple[Intent, ...]
    holds: tuple[Hold, ...]
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class EngineStatus:
    """Counters for the agent's one-line systemd ``STATUS=``."""

    open_findings: int
    in_flight: int
    breakers: tuple[str, ...]

    def __str__(self) -> str:
        text = f"{self.open_findings} finding(s) open, {self.in_flight} repair(s) in flight"
        if self.breakers:
            text += f", breaker tripped: {','.join(self.breakers)}"
        return text


class IntentReportError(ValueError):
    """A report about an intent the engine did not offer, or in the wrong order."""


# ---------------------------------------------------------------- internal state


class _Phase(Enum):
    READY = "ready"          # the current step may be offered
    OFFERED = "offered"      # an intent is out, unanswered
    RUNNING = "running"      # the agent started it
    VERIFYING = "verifying"  # it finished; waiting for the expectation


_IN_FLIGHT = (_Phase.OFFERED, _Phase.RUNNING, _Phase.VERIFYING)


@dataclass
class _Ladder:
    finding: Finding
    step: int = 0
    phase: _Phase = _Phase.READY
    intent: Intent | None = None
    not_before: datetime | None = None  # after a refusal
    refusal: str = ""
    finished_at: datetime | None = None
    deadline: datetime | None = None
    healthy_since: datetime | None = None  # verify: met on every snapshot since
    orphaned: bool = False  # the finding cleared while the intent was out


@dataclass
class _Run:
    """A target's current unbroken run of matching snapshots."""

    since: datetime
    match: Match
    finding: Finding | None = None


@dataclass
class _PolicyState:
    policy: RepairPolicy
    digest: str
    runs: dict[str, _Run] = field(default_factory=dict)
    ladders: dict[str, _Ladder] = field(default_factory=dict)
    cooldown_until: dict[str, datetime] = field(default_factory=dict)
    starts: list[datetime] = field(default_factory=list)
    offers: dict[str, int] = field(default_factory=dict)
    breaker: BreakerTripped | None = None
    attempts: dict[str, list[datetime]] = field(default_factory=dict)  # by finding target
    gave_up: dict[str, datetime] = field(default_factory=dict)  # escalated by a loop guard

    def attempts_in_window(self, key: str, at: datetime) -> list[datetime]:
        window = self.policy.spec.budget.attemptsWindow
        kept = self.attempts[key] = [t for t in self.attempts.get(key, ()) if at - t < window]
        return kept

    @property
    def name(self) -> str:
        return self.policy.name

    def in_flight(self) -> int:
        return sum(1 for ladder in self.ladders.values() if ladder.phase in _IN_FLIGHT)


@dataclass
class _Offers:
    """What one evaluation offers and holds, gathered across policies."""

    intents: list[Intent] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)

    def hold(self, state: _PolicyState, ladder: _Ladder, reason: str) -> None:
        self.holds.append(Hold(state.name, ladder.finding.target, reason, ladder.step))


# ---------------------------------------------------------------- the engine


class PolicyEngine:
    """Turns snapshots into findings and intents under a set of repair policies."""

    def __init__(self, policies: Iterable[RepairPolicy], *,
                 default_quorum: Quorum = DEFAULT_FLEET.spec.quorum,
                 retry_after: timedelta = RETRY_AFTER) -> None:
        self._states: dict[str, _PolicyState] = {}
        for policy in policies:
            if policy.name in self._states:
                raise ValueError(f"policy {policy.name!r} is given twice")
            self._states[policy.name] = _PolicyState(policy, policy_digest(policy))
        self._default_quorum = default_quorum
        self._retry_after = retry_after
        self._outstanding: dict[str, tuple[_PolicyState, str]] = {}  # offered or running
        # Events wait here, whether from an evaluation or a report, until the next
        # evaluate returns them.
        self._pending: list[Event] = []

    def policy(self, name: str) -> RepairPolicy | None:
        """The policy of that name this engine runs, or None."""
        state = self._states.get(name)
        return state.policy if state is not None else None

    # ------------------------------------------------------------ evaluate

    def evaluate(self, snapshot: Snapshot) -> Evaluation:
        """Advance every policy by one snapshot."""
        offers = _Offers()
        for state in self._states.values():
            detection = detect(state.policy.spec.detect, snapshot)
            self._verify(state, snapshot)
            self._check_breaker(state, detection, snapshot.at)
            self._track(state, detection, snapshot.at)
            self._offer(state, snapshot, detection.known, offers)
        events, self._pending = tuple(self._pending), []
        return Evaluation(at=snapshot.at, events=events, intents=tuple(offers.intents),
                          holds=tuple(offers.holds), findings=self.open_findings())

    def open_findings(self) -> tuple[Finding, ...]:
        """Every open finding, by policy then target key."""
        return tuple(run.finding for state in self._states.values()
                     for _, run in sorted(state.runs.items()) if run.finding is not None)

    def status(self) -> EngineStatus:
        """Open findings, intents in flight and tripped breakers, for ``STATUS=``."""
        return EngineStatus(
            open_findings=len(self.open_findings()),
            in_flight=sum(state.in_flight() for state in self._states.values()),
            breakers=tuple(s.name for s in self._states.values() if s.breaker is not None),
        )

    def _verify(self, state: _PolicyState, snapshot: Snapshot) -> None:
        for key, ladder in list(state.ladders.items()):
            if ladder.phase is not _Phase.VERIFYING:
                continue
            assert ladder.intent is not None
            assert ladder.intent.remedy.verify is not None
            assert ladder.finished_at is not None
            assert ladder.deadline is not None
            if snapshot.at <= ladder.finished_at:
                continue  # it may have been taken before the action ran
            intent, verify = ladder.intent, ladder.intent.remedy.verify
            met = expectation_met(
                verify.expect, ladder.finding.target, state.policy.spec.detect, snapshot,
                acted_on=intent.target if intent.target != ladder.finding.target else None)
            if met:
                since = ladder.healthy_since = ladder.healthy_since or snapshot.at
                if snapshot.at - since >= verify.healthyFor:
                    self._pending.append(RepairVerified(intent, snapshot.at))
                    self._end(state, key, snapshot.at)
                continue
            relapsed = ladder.healthy_since is not None
            ladder.healthy_since = None
            if snapshot.at >= ladder.deadline:
                how = (f"held, then not for {format_duration(verify.healthyFor)}" if relapsed
                       else f"not met within {format_duration(verify.within)}")
                self._pending.append(StepFailed(intent, f"verify: {verify.expect} {how}",
                                                snapshot.at))
                if ladder.orphaned:
                    self._end(state, key, snapshot.at)  # no next step for a cleared finding
                else:
                    self._next_step(state, key, snapshot.at)

    def _check_breaker(self, state: _PolicyState, detection: Detection, at: datetime) -> None:
        limit = state.policy.spec.budget.maxUnhealthyFraction
        if limit is None or state.breaker is not None or not detection.population:
            return
        fraction = len(detection.matches) / detection.population
        if fraction > limit:
            state.breaker = BreakerTripped(state.name, at, len(detection.matches),
                                           detection.population, fraction, limit)
            self._pending.append(state.breaker)

    def _track(self, state: _PolicyState, detection: Detection, at: datetime) -> None:
        if not detection.known:
            return
        hold_for = state.policy.spec.detect.for_
        for key, match in detection.matches.items():
            run = state.runs.setdefault(key, _Run(since=at, match=match))
            run.match = match
            if run.finding is not None:
                run.finding = replace(run.finding, summary=match.summary,
                                      evidence=match.evidence)
            elif at - run.since >= hold_for:
                run.finding = Finding(state.name, match.target, run.since, match.summary,
                                      match.evidence)
                self._pending.append(FindingOpened(run.finding, at))
        for key in [k for k in state.runs if k not in detection.matches]:
            finding = state.runs.pop(key).finding
            if finding is None:
                continue
            self._pending.append(FindingCleared(finding, at))
            ladder = state.ladders.get(key)
            if ladder is not None and ladder.phase in _IN_FLIGHT:
                ladder.orphaned = True
            elif ladder is not None:
                del state.ladders[key]

    def _offer(self, state: _PolicyState, snapshot: Snapshot, observed: bool,
               offers: _Offers) -> None:
        at = snapshot.at
        runs = sorted((run for run in state.runs.values() if run.finding is not None),
                      key=lambda run: (run.since, run.match.target.key))
        for run in runs:
            assert run.finding is not None
            key = run.finding.target.key
            ladder = state.ladders.get(key)
            if ladder is None:
                if at < state.cooldown_until.get(key, at):
                    continue
                state.cooldown_until.pop(key, None)
                ladder = state.ladders[key] = _Ladder(run.finding)
            ladder.finding, ladder.orphaned = run.finding, False
            if ladder.phase is not _Phase.READY:
                continue
            if ladder.not_before is not None and at < ladder.not_before:
                offers.hold(state, ladder, f"{ladder.refusal}; offered again at "
                            f"{ladder.not_before.isoformat()}")
                continue
            if not observed:
                offers.hold(state, ladder, "not observed this tick: no repair on stale evidence")
                continue
            self._offer_step(state, ladder, snapshot, offers)

    def _offer_step(self, state: _PolicyState, ladder: _Ladder, snapshot: Snapshot,
                    offers: _Offers) -> None:
        if self._gave_up(state, ladder, snapshot.at, offers):
            return
        remedies = state.policy.spec.remedies
        while ladder.step < len(remedies):
            remedy = remedies[ladder.step]
            action, params = lookup(remedy.action), remedy.typed_params()
            target = action_target(action, params, ladder.finding.target, snapshot.host or None)
            if isinstance(target, str):
                offers.hold(state, ladder, f"step {ladder.step} skipped: {target}")
                ladder.step += 1
                continue
            reason = opt_out(target, snapshot) or self._blocked(state, remedy, snapshot.at)
            if reason is not None:
                offers.hold(state, ladder, reason)
                return
            offers.intents.append(self._make_intent(state, ladder, target, snapshot.at))
            return
        self._exhaust(state, ladder.finding.target.key, snapshot.at)

    def _gave_up(self, state: _PolicyState, ladder: _Ladder, at: datetime,
                 offers: _Offers) -> bool:
        """The loop guard: True when the target has used up ``maxAttempts``, after
        offering the one escalation of this window (or holding, once it was offered)."""
        budget, key = state.policy.spec.budget, ladder.finding.target.key
        spent = state.attempts_in_window(key, at)
        if len(spent) < budget.maxAttempts:
            return False
        reason = (f"{len(spent)} repair attempts on {key} within "
                  f"{format_duration(budget.attemptsWindow)} (maxAttempts {budget.maxAttempts}); "
                  f"repairs stop until a person looks")
        escalated = state.gave_up.get(key)
        if escalated is not None and at - escalated < budget.attemptsWindow:
            offers.hold(state, ladder, f"{reason}; escalated at {escalated.isoformat()}")
            return True
        escalation = Remedy(action="bus.escalate", params={"message": reason[:500]})
        # Telling people is held by the budgets like any step: they bound what an agent
        # starts, whatever it starts.
        if (blocked := self._blocked(state, escalation, at)) is not None:
            offers.hold(state, ladder, f"{reason}; escalation held: {blocked}")
            return True
        state.gave_up[key] = at
        offers.intents.append(self._make_intent(state, ladder, ladder.finding.target, at,
                                                remedy=escalation, guard=reason))
        return True

    def _blocked(self, state: _PolicyState, remedy: Remedy, at: datetime) -> str | None:
        if remedy.action in COMPENSATIONS:
            return None  # undoing a repair is never held (see Compensations)
        destructive = remedy.is_destructive
        if destructive and state.breaker is not None:
            return f"{state.breaker.reason}; destructive repairs wait for a reset"
        budget = state.policy.spec.budget
        in_flight = state.in_flight()
        if in_flight >= budget.maxInFlight:
            return f"budget: {in_flight}/{budget.maxInFlight} repairs in flight"
        state.starts = [t for t in state.starts if at - t < BUDGET_WINDOW]
        offered = sum(1 for ladder in state.ladders.values() if ladder.phase is _Phase.OFFERED)
        used = len(state.starts) + offered
        if used >= budget.perHour:
            return f"budget: {used}/{budget.perHour} repairs in the last hour"
        return None

    def _make_intent(self, state: _PolicyState, ladder: _Ladder, target: Target,
                     at: datetime, rationale: str = "", *, remedy: Remedy | None = None,
                     guard: str = "") -> Intent:
        key = ladder.finding.target.key
        remedy = remedy or state.policy.spec.remedies[ladder.step]
        count = state.offers[key] = state.offers.get(key, 0) + 1
        destructive = remedy.is_destructive
        intent = Intent(
            id=f"{state.name}:{key}:{ladder.step}:{count}",
            policy=state.name,
            policy_digest=state.digest,
            target=target,
            step=ladder.step,
            remedy=remedy,
            action=lookup(remedy.action),
            params=remedy.typed_params(),
            destructive=destructive,
            quorum=remedy.quorum_under(self._default_quorum),
            dry_run=state.policy.spec.mode == "dry-run",
            finding=ladder.finding,
            offered_at=at,
            rationale=rationale,
            guard=guard,
        )
        ladder.phase, ladder.intent, ladder.not_before = _Phase.OFFERED, intent, None
        self._outstanding[intent.id] = (state, key)
        return intent

    # ------------------------------------------------------------ ladder transitions

    def _end(self, state: _PolicyState, key: str, at: datetime) -> None:
        del state.ladders[key]
        state.cooldown_until[key] = at + state.policy.spec.cooldown

    def _exhaust(self, state: _PolicyState, key: str, at: datetime) -> None:
        finding = state.ladders[key].finding
        self._end(state, key, at)
        self._pending.append(LadderExhausted(finding, at, state.cooldown_until[key]))

    def _next_step(self, state: _PolicyState, key: str, at: datetime) -> None:
        ladder = state.ladders[key]
        ladder.step += 1
        ladder.phase, ladder.intent = _Phase.READY, None
        ladder.finished_at = ladder.deadline = ladder.healthy_since = None
        if ladder.step >= len(state.policy.spec.remedies):
            self._exhaust(state, key, at)

    # ------------------------------------------------------------ reports from the agent

    def _answer(self, intent_id: str, *phases: _Phase) -> tuple[_PolicyState, str, _Ladder]:
        try:
            state, key = self._outstanding[intent_id]
        except KeyError:
            raise IntentReportError(f"no intent {intent_id!r} is offered or running") from None
        ladder = state.ladders[key]
        if ladder.phase not in phases:
            raise IntentReportError(f"intent {intent_id!r} is {ladder.phase.value}")
        return state, key, ladder

    def started(self, intent_id: str, at: datetime) -> None:
        """The agent began carrying out the intent (it counts against ``perHour`` from now)."""
        state, _, ladder = self._answer(intent_id, _Phase.OFFERED)
        ladder.phase = _Phase.RUNNING
        state.starts.append(at)
        self._attempted(state, ladder, at)

    @staticmethod
    def _attempted(state: _PolicyState, ladder: _Ladder, at: datetime) -> None:
        assert ladder.intent is not None
        if ladder.intent.action.name != "bus.escalate":  # telling people is no attempt
            state.attempts.setdefault(ladder.finding.target.key, []).append(at)

    def finished(self, intent_id: str, at: datetime, *, ok: bool, detail: str = "") -> None:
        """The action ran to its end; ``ok`` is whether it did what it says."""
        state, key, ladder = self._answer(intent_id, _Phase.OFFERED, _Phase.RUNNING)
        if ladder.phase is _Phase.OFFERED:
            state.starts.append(at)  # a dry run may skip ``started``; it still spent budget
            self._attempted(state, ladder, at)
        del self._outstanding[intent_id]
        intent = ladder.intent
        assert intent is not None
        if not ok:
            self._pending.append(StepFailed(intent, f"action failed: {detail or 'no detail'}", at))
            if ladder.orphaned:
                del state.ladders[key]
            else:
                self._next_step(state, key, at)
        elif intent.remedy.verify is None:
            self._pending.append(RepairVerified(intent, at))
            self._end(state, key, at)
        else:
            ladder.phase, ladder.finished_at = _Phase.VERIFYING, at
            ladder.deadline = at + intent.remedy.verify.within

    def substitute(self, intent_id: str, *, step: int, target: Target, rationale: str,
                   at: datetime) -> Intent | str:
        """Replace an offered intent with another step of its ladder (a brain's pick).

        The offer's budget slot carries over (it was counted when offered); a step
        that is destructive where the offered one was not meets the breaker here.
        Returns the new intent, or why the step may not be offered (the old one
        then stays offered). Later steps of the ladder follow the chosen one.
        """
        state, _, ladder = self._answer(intent_id, _Phase.OFFERED)
        remedies = state.policy.spec.remedies
        if not 0 <= step < len(remedies):
            raise IntentReportError(f"{state.name} has no step {step}")
        if (remedies[step].is_destructive and state.breaker is not None
                and remedies[step].action not in COMPENSATIONS):
            return f"{state.breaker.reason}; destructive repairs wait for a reset"
        del self._outstanding[intent_id]
        ladder.step = step
        return self._make_intent(state, ladder, target, at, rationale)

    def refused(self, intent_id: str, at: datetime, reason: str, *,
                retry_after: timedelta | None = None) -> None:
        """The intent may not run (scope, bus down, quorum): offer it again after retry_after.

        A caller that knows the obstacle is transient (the bus is reconnecting) may ask
        for a shorter wait than the engine's default.
        """
        state, key, ladder = self._answer(intent_id, _Phase.OFFERED)
        del self._outstanding[intent_id]
        if ladder.orphaned:
            del state.ladders[key]
            return
        ladder.phase, ladder.intent = _Phase.READY, None
        ladder.not_before = at + (self._retry_after if retry_after is None else retry_after)
        ladder.refusal = f"refused: {reason}"

    def reset_breaker(self, policy: str, *, by: str, at: datetime) -> bool:
        """Close ``policy``'s breaker; False if it was not tripped.

        If the storm goes on, the next evaluation trips it again.
        """
        try:
            state = self._states[policy]
        except KeyError:
            raise ValueError(f"no policy {policy!r} in this engine") from None
        if state.breaker is None:
            return False
        state.breaker = None
        self._pending.append(BreakerReset(policy, by, at))
        return True

    def matching_since(self, policy: str, key: str) -> datetime | None:
        """Since when this engine's own snapshots have matched ``policy`` on the target
        ``key`` without a break (None: it does not run the policy, or no match now).

        A voter holds a proposal's ``for:`` against this, its own history, not only
        against the snapshot it takes to vote.
        """
        state = self._states.get(policy)
        run = state.runs.get(key) if state is not None else None
        return run.since if run is not None else None

    def breaker(self, policy: str) -> BreakerTripped | None:
        """The trip that holds ``policy``'s destructive repairs, if any.

        None too for a policy this engine does not run: voters ask about every policy
        they are asked to vote on, and only the ones they run can have tripped here.
        """
        state = self._states.get(policy)
        return state.breaker if state is not None else None
