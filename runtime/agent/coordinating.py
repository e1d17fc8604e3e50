"""The runtime side of the bus: presence, findings, quorum repairs and operator controls.

``Coordinator`` connects one persona to the bus (forever, in the background: the
agent observes whether or not the bus is up) and is the only path from an
authorized destructive intent to its actuator:

    proposal → votes (each voter re-observes) → decision → lease (KV create,
    fencing token) → started → fencing check → actuator → result → verify →
    result (verified/unverified) → lease released

While the bus is unreachable, its JetStream resources have the wrong settings, or an
operator froze the fleet, ``refusal()`` names the reason and nothing destructive
starts. Non-destructive repairs carry on; their results are journaled locally and
published when the bus returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import typing
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from pydantic import ValidationError

from bus import leases, subjects
from bus.connection import BusUnavailableError, Connection
from bus.envelope import Accepted, Dropped, Envelope, Verifier, format_time
from bus.ids import new_id
from bus.jetstream import AUDIT_STREAM, LEASES_BUCKET, Settings, check
from bus.journal import Journal
from bus.keys import Signer
from bus.messages import (
    Control,
    Decision,
    Finding,
    Heartbeat,
    Proposal,
    QuorumRule,
    Result,
    Started,
)
from bus.natstypes import BucketNotFoundError, JetStreamError, KeyValue, Msg, NatsError
from bus.protocol import Judgement, Protocol
from bus.quorum import looser
from bus.reading import Stored, read_stream
from runtime import __version__
from runtime.agent.acting import run_actuator
from runtime.agent.metrics import Metrics
from runtime.agent.observing import Observing
from runtime.config.loading import ConfigSet
from runtime.core.detecting import detect
from runtime.core.engine import (
    Event,
    FindingCleared,
    FindingOpened,
    Intent,
    PolicyEngine,
    RepairVerified,
    StepFailed,
    policy_digest,
    required,
    required_at,
)
from runtime.core.ports import Actuator, Domain, Fence, Observed, Outcome, Wall, utc_now
from runtime.core.targets import finding_behind
from runtime.model import scopes
from runtime.model.catalog import lookup
from runtime.model.formats import Persona, RepairPolicy
from runtime.model.snapshot import LeaseObs, PeerObs, SourceStatus

log = structlog.get_logger("coordinator")

HEARTBEAT_EVERY = 5.0
MAX_REMEMBERED_PROPOSALS = 256
"""Undecided proposals remembered per proposer (decided ones are forgotten). Per
proposer, so that one key flooding proposals pushes out only its own."""


class Argue(typing.Protocol):
    async def __call__(self, proposal: Proposal, verdict: str, reason: str, *,
                       within: float) -> str: ...

_BUS_ERRORS = (BusUnavailableError, NatsError, JetStreamError, OSError, TimeoutError)
BUS_RETRY = timedelta(seconds=5)
"""When a refusal was the bus's doing, not the quorum's: ask again soon, so a repair goes
ahead shortly after a partition heals rather than a whole refusal back-off later."""


def _digest(items: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()


def jetstream_settings(config: ConfigSet) -> Settings:
    """What the fleet's bus settings say the audit stream and lease bucket must be."""
    bus = config.fleet.spec.bus
    return Settings(replicas=bus.auditReplicas, max_age=bus.auditMaxAge, lease_ttl=bus.leaseTtl)


def voters_of(config: ConfigSet) -> frozenset[str]:
    """Every persona that may vote: the eligible electorate of every quorum."""
    return frozenset(p.value.name for p in config.personas.values()
                     if "vote" in p.value.spec.duties)


@dataclass(frozen=True)
class FreezeState:
    """The freeze in force (None: thawed), and the signed time and id of the control
    that set it: a control moves the state only if it is newer by (time, id)."""

    control: Control | None = None
    at: datetime | None = None
    id: str = ""

    def after(self, other: FreezeState | None) -> FreezeState:
        """The state once ``other`` is taken into account: whichever is newer."""
        if other is None or other.at is None:
            return self
        if self.at is None or (other.at, other.id) > (self.at, self.id):
            return other
        return self


def peek_control(data: bytes) -> Control | None:
    """The control body of a message that did not verify, if it has one: to tell an
    unverifiable freeze from junk. Never trusted beyond that."""
    try:
        body = json.loads(data).get("body")
        return Control.model_validate(body)
    except (ValueError, AttributeError, ValidationError):
        return None


@dataclass(frozen=True)
class Roster:
    """Who is who on the bus, from configuration only: persona and operator keys, voters."""

    keys: Mapping[str, str]
    operators: Mapping[str, str]
    voters: frozenset[str]
    freshness: timedelta = timedelta(seconds=30)

    @classmethod
    def of(cls, config: ConfigSet) -> Roster:
        return cls(keys={name: p.value.spec.identity.nkey for name, p in config.personas.items()},
                   operators={o.name: o.nkey for o in config.fleet.spec.operators},
                   voters=voters_of(config), freshness=config.fleet.spec.bus.freshness)

    def verifier(self) -> Verifier:
        """A live verifier: freshness and replay apply, as in an agent."""
        return Verifier(keys=self.keys, operators=self.operators, freshness=self.freshness)


class Coordinator:
    def __init__(self, *, persona: Persona, config: ConfigSet, signer: Signer, host: str,
                 connection: Connection, engine: PolicyEngine, journal: Journal,
                 heartbeat_every: float = HEARTBEAT_EVERY, metrics: Metrics | None = None,
                 wall: Wall = utc_now) -> None:
        self.persona = persona
        self.wall = wall
        self.metrics = metrics or Metrics.of(persona)
        self.config = config
        self.engine = engine
        self.journal = journal
        self.connection = connection
        self._heartbeat_every = heartbeat_every
        self._host = host
        self._settings = jetstream_settings(config)
        roster = Roster.of(config)
        self.verifier = roster.verifier()
        self.metrics.watch_bus(lambda: self.connected, self.verifier.dropped)
        duties = persona.spec.duties
        self.protocol = Protocol(
            connection, persona=persona.name, host=host, signer=signer, verifier=self.verifier,
            voters=roster.voters, assess=self.assess if "vote" in duties else None,
            on_control=self._on_control, on_proposal=self._note_proposal)
        # Set by the agent once it has built its Observing (which includes this
        # coordinator's own peers and leases observers).
        self.observing: Observing | None = None
        # Set by the agent when the persona runs a model brain: puts a vote's verdict
        # into the persona's own words (Thinker.argue). The verdict stays deterministic.
        self.argue: Argue | None = None
        self.kv: KeyValue | None = None
        self.problems: list[str] = []
        self.jetstream_error: str | None = None  # set by the lease observer while JetStream fails
        self._freeze = FreezeState()
        self.peers: dict[str, PeerObs] = {}
        # When this agent began to hear heartbeats: a peer's silence is measured from
        # here, so peers not heard from *yet* at start-up are not counted as silent
        # (they would trip the peer-silent breaker on every fleet start).
        self.listening_since: datetime | None = None
        # Kept current by the agent after every tick, for the heartbeat.
        self.ticks = 0
        self.status_text = "starting"
        self.kubernetes = "not observed"
        self._subscribed = False
        self._repairs: dict[str, tuple[str, leases.Lease | None]] = {}  # intent id → repair, lease
        self._approved: dict[str, deque[datetime]] = {}  # policy → approvals seen, for perHour
        # proposer → repair id → policy, of verified proposals: to attribute decisions
        self._proposed: dict[str, dict[str, str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._scopes_digest = _digest(persona.spec.effective_scopes)
        self._policies_digest = _digest(policy_digest(p) for p in config.policies_of(persona))

    # ------------------------------------------------------------ state

    @property
    def frozen(self) -> Control | None:
        """The freeze in force, or None."""
        return self._freeze.control

    @property
    def connected(self) -> bool:
        return self.connection.connected

    def refusal(self) -> str | None:
        """Why destructive work must not start now, or None when it may."""
        if not self.connected:
            return "bus down"
        if self.problems:
            return "bus resources have incompatible settings: " + "; ".join(self.problems)
        if self.kv is None:
            return "bus connected but its JetStream resources are not ready yet"
        if self.jetstream_error is not None:
            # The local server answers but JetStream does not (on the minority side of a
            # partition it has no meta leader): no vote or lease could be stored.
            return f"bus connected but JetStream is not answering: {self.jetstream_error}"
        if self.frozen is not None:
            return f"fleet frozen by {self.frozen.reason!r}"
        return None

    def describe(self) -> str:
        """The bus part of the status line."""
        if not self.connected:
            return "bus: down"
        if self.frozen is not None:
            return "bus: connected, FROZEN"
        if self.problems:
            return "bus: connected, resources incompatible"
        return "bus: connected" + (", JetStream not answering" if self.jetstream_error else "")

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Root task: connect (retrying forever), then send heartbeats until cancelled."""
        self.connection.on_connected.append(self._on_connected)
        await self.connection.connect()
        while True:
            if self.connected:
                await self.check_resources()
            await self.heartbeat()
            await asyncio.sleep(self._heartbeat_every)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.connection.close()

    async def _on_connected(self) -> None:
        """On each (re)connect: check resources, subscribe, restore freeze, flush the journal."""
        await self.check_resources()
        if not self._subscribed:
            # nats-py restores subscriptions on reconnect by itself.
            await self.protocol.subscribe()
            await self.connection.subscribe("zeta.agent.*.heartbeat", self._on_heartbeat)
            await self.connection.subscribe("zeta.repair.*.decided", self._on_decided)
            self._subscribed = True
            self.listening_since = self.wall()
        await self._restore_freeze()
        await self.journal.flush(self.connection)

    async def check_resources(self) -> None:
        """Look at the audit stream and lease bucket; refuse destructive work while they
        differ from what the fleet settings say (on every connect and every heartbeat:
        a resource weakened while the agents run must stop them too)."""
        try:
            problems = await check(self.connection.js, self._settings)
            if self.kv is None:
                with contextlib.suppress(BucketNotFoundError):  # check() has said so
                    self.kv = await self.connection.js.key_value(LEASES_BUCKET)
        except _BUS_ERRORS as exc:
            problems = [f"cannot check JetStream resources: {exc or type(exc).__name__}"]
        if problems != self.problems:
            for problem in problems:
                log.error("bus resources incompatible: destructive work refused",
                          problem=problem)
            if self.problems and not problems:
                log.info("bus resources are as configured again")
        self.problems = problems

    async def _restore_freeze(self) -> None:
        """A restarted or reconnected agent must stay frozen.

        Every control in the audit stream is read, and the state is the latest verified
        freeze or thaw by its signed time (then id), never by stream order: a replayed
        old thaw sorts before the freeze it would undo, and junk is skipped. A freeze
        that no longer verifies because its sender's key is no longer configured (an
        operator removed or rotated since) still holds, ordered by when the server
        stored it, until a verified thaw newer than that. What this agent holds in
        memory is merged in: it is only ever cleared by a newer verified thaw.
        """
        try:
            stored = await read_stream(self.connection.js, AUDIT_STREAM, "zeta.control.*")
        except _BUS_ERRORS as exc:
            log.warning("cannot read the freeze state; keeping what this agent holds",
                        error=str(exc) or type(exc).__name__)
            return
        for message in stored:
            self._freeze = self._freeze.after(self._control_state(message))
        if self.frozen is not None and self._freeze.at is not None:
            log.warning("fleet is frozen: destructive work refused", reason=self.frozen.reason,
                        since=format_time(self._freeze.at))

    def _control_state(self, message: Stored) -> FreezeState | None:
        """What one stored control says about the freeze, or None if it says nothing."""
        checked = self.verifier.check(message.subject, message.data, live=False)
        if isinstance(checked, Accepted):
            body = checked.body
            if not isinstance(body, Control) or body.verb not in ("freeze", "thaw") or (
                    message.subject != subjects.control(body.verb)):
                return None
            return FreezeState(body if body.verb == "freeze" else None, checked.envelope.at,
                               checked.envelope.id)
        if checked.reason not in ("unknown-sender", "wrong-key") or message.time is None:
            return None  # junk or a forgery of a configured key: skipped
        claim = peek_control(message.data)
        if claim is None or claim.verb != "freeze" or (
                message.subject != subjects.control("freeze")):
            return None
        log.error("a freeze in the audit stream no longer verifies; it holds until a "
                  "verified thaw newer than it", reason=checked.reason, detail=checked.detail,
                  stored=format_time(message.time))
        return FreezeState(Control(verb="freeze", reason=f"unverifiable freeze "
                                                         f"({checked.reason}): {claim.reason}"),
                           message.time, f"seq-{message.seq:020d}")

    # ------------------------------------------------------------ presence and findings

    async def heartbeat(self) -> None:
        if not self.connected:
            return
        # Results journaled while JetStream was unreachable with the connection up (a
        # partition, not a disconnect) would otherwise wait for the next reconnect.
        await self.journal.flush(self.connection)
        body = Heartbeat(
            pid=os.getpid(), version=__version__, tick=self.ticks, status=self.status_text,
            bus="connected", kubernetes=self.kubernetes, frozen=self.frozen is not None,
            scopes_digest=self._scopes_digest, policies_digest=self._policies_digest)
        try:
            await self.protocol.send("heartbeat", body)
        except _BUS_ERRORS as exc:
            log.debug("heartbeat not sent", error=str(exc))

    async def _on_heartbeat(self, msg: Msg) -> None:
        checked = self.verifier.check(msg.subject, msg.data)
        if not isinstance(checked, Accepted):
            log.warning("message dropped", subject=msg.subject, reason=checked.reason,
                        detail=checked.detail)
            return
        env = checked.envelope
        if env.sender != self.persona.name:
            self.peers[env.sender] = PeerObs(persona=env.sender, last_heartbeat=env.at,
                                             host=env.host)

    async def on_events(self, events: Iterable[Event]) -> None:
        """Tell the bus what the engine concluded this tick."""
        for event in events:
            match event:
                case FindingOpened(finding=f) | FindingCleared(finding=f):
                    body = Finding(state="opened" if isinstance(event, FindingOpened)
                                   else "cleared", policy=f.policy, target=f.target,
                                   since=f.since, summary=f.summary, evidence=dict(f.evidence))
                    if self.connected:
                        try:
                            await self.protocol.send("finding", body)
                        except _BUS_ERRORS as exc:
                            log.debug("finding not sent", error=str(exc))
                case RepairVerified(intent=intent):
                    await self._conclude(intent, "verified", "verify expectation met")
                case StepFailed(intent=intent, reason=reason):
                    await self._conclude(intent, "unverified", reason)
                case _:
                    pass

    async def _conclude(self, intent: Intent, outcome: str | None = None,
                        detail: str = "") -> None:
        """End a repair: publish its verification ``outcome`` (if any), release its lease.

        A repair that failed, or was a dry run, is not verified: its one result is
        already on the bus, and a second would read like a second execution.
        """
        repair, lease = self._repairs.pop(intent.id, (None, None))
        if repair is None:
            return
        if outcome is not None:
            await self.record(intent, repair, outcome, detail)
        if lease is not None and self.kv is not None:
            try:
                await leases.release(self.kv, lease)
            except _BUS_ERRORS as exc:
                # The lease expires by itself (leaseTtl); the stale-lease policy sweeps it.
                log.warning("lease not released", repair=repair, error=str(exc))

    async def record(self, intent: Intent, repair: str, outcome: str, detail: str) -> None:
        """Publish a result; journal it when the bus is down so the audit gets it later."""
        body = Result(outcome=outcome, detail=detail, action=intent.action.name,
                      target=intent.target, policy=intent.policy, dry_run=intent.dry_run)
        envelope = self.protocol.seal("result", body, repair=repair)
        try:
            await self.connection.publish(subjects.result(repair), envelope)
        except BusUnavailableError as exc:
            self.journal.append(envelope)
            log.info("result journaled until the bus returns", repair=repair, error=str(exc))

    # ------------------------------------------------------------ acting

    async def act_alone(self, intent: Intent, actuator: Actuator) -> Outcome:
        """A repair that needs no quorum: run it and record the result (bus or journal)."""
        repair = new_id()
        outcome = await run_actuator(actuator, intent, repair)
        self._repairs[intent.id] = (repair, None)
        await self.record(intent, repair, "succeeded" if outcome.ok else "failed",
                          outcome.detail)
        if not outcome.ok:
            self._repairs.pop(intent.id, None)
        return outcome

    def launch(self, intent: Intent, actuator: Actuator) -> None:
        """Start the quorum flow for ``intent`` in the background (it outlives the tick)."""
        task = asyncio.create_task(self._with_quorum(intent, actuator),
                                   name=f"repair:{intent.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _with_quorum(self, intent: Intent, actuator: Actuator) -> None:
        bound = structlog.contextvars.bound_contextvars(intent=intent.id, target=intent.target.key)
        with bound:
            try:
                await self._quorum_flow(intent, actuator)
            except Exception as exc:
                log.exception("repair flow failed")
                self._answer_refused(intent, f"repair flow failed: {type(exc).__name__}: {exc}")

    def _answer_refused(self, intent: Intent, reason: str, *,
                        retry_after: timedelta | None = None) -> None:
        log.warning("intent refused", reason=reason)
        with contextlib.suppress(ValueError):  # already answered before the flow failed
            self.engine.refused(intent.id, self.wall(), reason, retry_after=retry_after)

    def _proposal(self, intent: Intent, now: datetime) -> Proposal:
        assert intent.quorum is not None
        return Proposal(
            action=intent.action.name, target=intent.target,
            params=intent.params.model_dump(mode="json"), policy=intent.policy,
            policy_digest=intent.policy_digest, step=intent.step,
            destructive=intent.destructive,
            quorum=QuorumRule(approvals=intent.quorum.approvals, veto=intent.quorum.veto,
                              deadline=now + intent.quorum.deadline),
            summary=intent.finding.summary, evidence=dict(intent.finding.evidence),
            rationale=intent.rationale)

    async def _quorum_flow(self, intent: Intent, actuator: Actuator) -> None:
        if (reason := self.refusal()) is not None:
            self._answer_refused(intent, reason, retry_after=BUS_RETRY)
            return
        try:
            repair, tally = await self.protocol.propose(self._proposal(intent, self.wall()))
        except _BUS_ERRORS as exc:
            self.metrics.proposal("failed")
            self._answer_refused(intent, f"bus failed during the vote, nothing was done: {exc}",
                                 retry_after=BUS_RETRY)
            return
        self.metrics.proposal(tally.outcome)
        if tally.outcome != "approved":
            self._answer_refused(intent, f"quorum {tally.outcome}: {tally.reason}")
            return
        # The world may have changed during the vote: check again before acting.
        if (reason := self.refusal()) is not None or self.kv is None:
            self._answer_refused(intent, reason or "no lease bucket")
            await self.record(intent, repair, "refused", reason or "no lease bucket")
            return
        try:
            lease = await leases.acquire(self.kv, intent.target.key, repair=repair,
                                         executor=self.persona.name,
                                         ttl=self._settings.lease_ttl)
        except (leases.LeaseHeldError, *_BUS_ERRORS) as exc:
            self._answer_refused(intent, f"no lease: {exc}")
            await self.record(intent, repair, "refused", f"no lease: {exc}")
            return
        if not await self._still_needed(intent):
            # Approved, but the world moved on while we voted (another executor fixed
            # it first, or it healed): acting now would be a second repair of nothing.
            reason = f"{intent.finding.summary!r} no longer holds; nothing to do"
            await leases.release(self.kv, lease)
            self._answer_refused(intent, reason)
            await self.record(intent, repair, "refused", reason)
            return
        self._repairs[intent.id] = (repair, lease)
        await self.protocol.send("started", Started(
            executor=self.persona.name, lease=leases.kv_key(lease.target),
            fencing_token=lease.token), repair=repair)
        self.engine.started(intent.id, self.wall())
        kv = self.kv

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
        await self.record(intent, repair, "succeeded" if outcome.ok else "failed",
                          outcome.detail)
        if not outcome.ok or intent.dry_run:
            await self._conclude(intent)

    async def _still_needed(self, intent: Intent) -> bool:
        """Look once more, under the lease, that the finding behind ``intent`` still holds."""
        located = self.config.policies.get(intent.policy)
        if self.observing is None or located is None:
            return True
        detection = detect(located.value.spec.detect,
                           await self.observing.snapshot(self.wall()))
        # What cannot be seen right now was confirmed by the quorum a moment ago.
        return not detection.known or intent.finding.target.key in detection.matches

    # ------------------------------------------------------------ voting

    def _note_proposal(self, envelope: Envelope, proposal: Proposal) -> None:
        """Remember who proposed what (verified proposals only), to attribute decisions."""
        if envelope.repair is None:
            return
        mine = self._proposed.setdefault(envelope.sender, {})
        if len(mine) >= MAX_REMEMBERED_PROPOSALS:
            del mine[next(iter(mine))]
        mine[envelope.repair] = proposal.policy

    async def _on_decided(self, msg: Msg) -> None:
        checked = self.verifier.check(msg.subject, msg.data)
        if not isinstance(checked, Accepted) or not isinstance(checked.body, Decision):
            if isinstance(checked, Dropped):
                log.warning("message dropped", subject=msg.subject, reason=checked.reason,
                            detail=checked.detail)
            return
        env = checked.envelope
        policy = self._proposed.get(env.sender, {}).pop(env.repair or "", None)
        if policy is None:
            # Only the proposer decides its proposal: a decision by anyone else, or on
            # a proposal never seen verified, counts toward no budget.
            log.warning("decision not counted", repair=env.repair, sender=env.sender,
                        reason="no verified proposal of the sender")
            return
        self.metrics.decision(checked.body.outcome)
        if checked.body.outcome == "approved":
            self._approved.setdefault(policy, deque(maxlen=1000)).append(env.at)

    def _approved_last_hour(self, policy: str, now: datetime) -> int:
        return sum(1 for at in self._approved.get(policy, ()) if now - at < timedelta(hours=1))

    async def assess(self, envelope: Envelope, proposal: Proposal) -> Judgement:
        """Judge a proposal on this persona's own configuration and its own fresh observation.

        A persona with the ``veto`` duty turns every objection into a block: a
        reviewer who sees a reason not to act stops the action, not just one vote.
        """
        verdict, reason, evidence = await self._judge(envelope, proposal)
        located = self.config.policies.get(proposal.policy)
        terms = required_at(located.value if located else None, proposal.policy_digest,
                            proposal.step, self.config.fleet.spec.quorum)
        if verdict == "reject" and "veto" in self.persona.spec.duties:
            verdict = "block"
        self.metrics.vote(verdict)
        rationale = ""
        if self.argue is not None:
            # Words only, after the verdict is fixed; half the time left keeps the
            # vote itself inside the quorum deadline.
            left = (proposal.quorum.deadline - self.wall()).total_seconds() / 2
            if left > 0:
                rationale = await self.argue(proposal, verdict, reason, within=left)
        return Judgement(verdict, reason, evidence, rationale,  # type: ignore[arg-type]
                         required=terms)

    async def _judge(self, envelope: Envelope,
                     proposal: Proposal) -> tuple[str, str, dict[str, object]]:
        located = self.config.policies.get(proposal.policy)
        if located is None:
            return "reject", f"I have no policy {proposal.policy!r}", {}
        policy = located.value
        mine = policy_digest(policy)
        if mine != proposal.policy_digest:
            return "reject", (f"policy drift: my {policy.name} digest is {mine[:12]}, "
                              f"the proposal's {proposal.policy_digest[:12]}"), {}
        if (problem := self._mismatch(policy, proposal, envelope.at)) is not None:
            return "reject", problem, {}
        if (problem := self._proposer_not_allowed(envelope.sender, proposal)) is not None:
            return "reject", problem, {}
        if self.frozen is not None:
            return "reject", f"fleet frozen: {self.frozen.reason}", {}
        if self.engine.breaker(policy.name) is not None:
            return "reject", f"breaker tripped for {policy.name}", {}
        now = self.wall()
        if (seen := self._approved_last_hour(policy.name, now)) >= policy.spec.budget.perHour:
            return "reject", (f"budget: {seen}/{policy.spec.budget.perHour} repairs of "
                              f"{policy.name} approved in the last hour"), {}
        if self.kv is not None:
            holder = await leases.holder(self.kv, proposal.target.key)
            if holder is not None:
                return "reject", (f"{proposal.target.key} is leased by repair {holder.repair} "
                                  f"({holder.executor})"), {}
        return await self._observe_myself(policy, proposal, now)

    def _mismatch(self, policy: RepairPolicy, proposal: Proposal,
                  sent: datetime) -> str | None:
        """What in the proposal is not the policy's step: action, params, or a quorum
        rule looser than the policy's (the proposer writes the rule it is judged by)."""
        terms = required(policy, proposal.step, self.config.fleet.spec.quorum)
        if terms is None:
            return f"{policy.name} has no step {proposal.step}"
        remedy = policy.spec.remedies[proposal.step]
        if remedy.action != proposal.action:
            return (f"step {proposal.step} of {policy.name} is {remedy.action}, "
                    f"not {proposal.action}")
        if remedy.typed_params().model_dump(mode="json") != proposal.params:
            return f"params differ from step {proposal.step} of {policy.name}"
        if problems := looser(proposal.quorum, proposal.destructive, sent, terms):
            return (f"quorum rule looser than step {proposal.step} of {policy.name}: "
                    + "; ".join(problems))
        return None

    def _proposer_not_allowed(self, proposer: str, proposal: Proposal) -> str | None:
        located = self.config.personas.get(proposer)
        if located is None:
            return f"{proposer} is not a persona I know"
        spec = located.value.spec
        if not {"propose", "execute"} <= set(spec.duties):
            return f"{proposer} does not have the propose and execute duties"
        action = lookup(proposal.action)
        needed = action.scope_for(proposal.target, action.params.model_validate(proposal.params))
        if not scopes.allows(spec.effective_scopes, needed):
            return f"{proposer} lacks scope {needed}"
        return None

    async def _observe_myself(self, policy: RepairPolicy, proposal: Proposal,
                              now: datetime) -> tuple[str, str, dict[str, object]]:
        if self.observing is None:
            return "reject", "I have no observers", {}
        snapshot = await self.observing.snapshot(now)
        detection = detect(policy.spec.detect, snapshot)
        sources = {name: s.detail or ("ok" if s.ok else "failed")
                   for name, s in snapshot.sources.items()}
        if not detection.known:
            return "reject", (f"I cannot observe what {policy.spec.detect.kind} needs from "
                              f"{snapshot.host}, so I cannot confirm it"), {"sources": sources}
        budget = policy.spec.budget.maxUnhealthyFraction
        if budget is not None and detection.population:
            fraction = len(detection.matches) / detection.population
            if fraction > budget:
                return "reject", (f"blast radius: {len(detection.matches)}/"
                                  f"{detection.population} unhealthy > {budget:.0%}"), {}
        action = lookup(proposal.action)
        finding = finding_behind(action, action.params.model_validate(proposal.params),
                                 proposal.target, (m.target for m in detection.matches.values()))
        if finding is None:
            return "reject", (f"I do not see {policy.spec.detect.kind} behind "
                              f"{proposal.action} on {proposal.target.key} from {snapshot.host}"
                              ), {"sources": sources}
        match = detection.matches[finding.key]
        return "approve", f"confirmed from {snapshot.host}: {match.summary}", {
            "observed_at": now.isoformat(), "host": snapshot.host, **match.evidence}

    # ------------------------------------------------------------ operator controls

    async def _on_control(self, envelope: Envelope, control: Control) -> None:
        log.warning("operator control", verb=control.verb, by=envelope.sender,
                    reason=control.reason, policy=control.policy)
        if control.verb in ("freeze", "thaw"):
            # Only a newer control moves the state: a thaw signed before the freeze it
            # meets (a delayed or replayed one) leaves the fleet frozen.
            newer = FreezeState(control if control.verb == "freeze" else None, envelope.at,
                                envelope.id)
            state = self._freeze.after(newer)
            if state is not newer:
                log.warning("operator control older than the freeze state: ignored",
                            verb=control.verb, at=format_time(envelope.at))
            self._freeze = state
        elif control.policy is not None:
            self.engine.reset_breaker(control.policy, by=envelope.sender, at=envelope.at)

    # ------------------------------------------------------------ observers fed by the bus

    def observers(self) -> list[BusObserver]:
        return [BusObserver("peers", self), BusObserver("leases", self)]


class BusObserver:
    """Peers (from heartbeats) or leases (from the KV bucket): None while the bus is down."""

    def __init__(self, domain: Domain, coordinator: Coordinator) -> None:
        self._domain = domain
        self._coordinator = coordinator

    @property
    def name(self) -> str:
        return f"bus-{self._domain}"

    @property
    def provides(self) -> frozenset[Domain]:
        return frozenset({self._domain})

    async def observe(self, now: datetime) -> Observed:
        c = self._coordinator
        if not c.connected:
            return Observed({}, SourceStatus(ok=False, detail="bus down"))
        if self._domain == "peers":
            peers = tuple(c.peers.get(name, PeerObs(persona=name,
                                                    last_heartbeat=c.listening_since))
                          for name in sorted(c.config.personas) if name != c.persona.name)
            return Observed({"peers": peers}, SourceStatus(ok=True, detail=f"{len(peers)} peers"))
        if c.kv is None:
            return Observed({}, SourceStatus(ok=False, detail="lease bucket not ready"))
        try:
            held = await leases.all_leases(c.kv)
        except _BUS_ERRORS as exc:
            c.jetstream_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return Observed({}, SourceStatus(ok=False, detail=f"leases not read: "
                                                              f"{c.jetstream_error}"))
        c.jetstream_error = None
        return Observed({"leases": tuple(LeaseObs(key=lease.target, repair=lease.repair,
                                                  holder=lease.executor, expires=lease.expires)
                                         for lease in held)},
                        SourceStatus(ok=True, detail=f"{len(held)} leases"))


class LeaseReleaser:
    """``bus.lease.release``: delete a repair lease whose holder let it expire.

    Re-reads the lease right before deleting, and deletes only that revision: a lease
    renewed or re-taken since the proposal is left alone.
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def run(self, intent: Intent, *, repair: str, dry_run: bool,
                  fence: Fence) -> Outcome:
        kv = self._coordinator.kv
        if kv is None or not self._coordinator.connected:
            return Outcome(False, "the lease bucket is not reachable")
        lease = await leases.holder(kv, intent.target.name)
        if lease is None:
            return Outcome(True, f"{intent.target.name}: no lease left to release")
        now = self._coordinator.wall()
        if lease.expires > now:
            return Outcome(False, f"the lease of repair {lease.repair} is valid until "
                                  f"{lease.expires.isoformat()}: not releasing it")
        what = f"lease on {intent.target.name} (repair {lease.repair} by {lease.executor})"
        if dry_run:
            return Outcome(True, f"dry-run: would release the {what}")
        if not await fence():
            return Outcome(False, "our own lease on this target moved on: not acting")
        if await leases.release(kv, lease):
            return Outcome(True, f"released the {what}")
        return Outcome(False, f"the {what} changed before it could be released")
