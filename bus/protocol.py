"""The quorum protocol on the wire: propose, vote, decide (docs/bus.md).

This module moves signed messages and counts votes; what a persona *thinks* of a
proposal is the runtime's business, handed in as an ``Assess`` callback that must
re-observe the target itself. The tally is the pure ``bus.quorum.tally``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from nats.aio.msg import Msg
from pydantic import BaseModel

from bus import ids, subjects
from bus.connection import BusUnavailableError, Connection, subject_for
from bus.envelope import Accepted, Dropped, Envelope, Verifier, seal
from bus.keys import Signer
from bus.messages import (
    TEXT_MAX,
    Control,
    Decision,
    EvidencePath,
    Kind,
    Proposal,
    Required,
    Verdict,
    Vote,
)
from bus.quorum import Ballot, Rule, Tally, tally

log = structlog.get_logger("bus.protocol")

ASSESS_IN_FLIGHT = 4
"""Assessments of one proposer's proposals running at once. An honest proposer has a
few repairs in flight; a stolen proposer key must not make every voter observe the
world a thousand times over."""
ASSESS_RATE = 30 / 60
ASSESS_BURST = 10
"""Per proposer, assessments per second in the long run, and how many may come at once."""


@dataclass(frozen=True)
class Judgement:
    """A voter's verdict on a proposal, with the evidence it observed itself."""

    verdict: Verdict
    reason: str
    evidence: dict[str, object] = field(default_factory=dict)
    rationale: str = ""
    required: Required | None = None  # what the voter's copy of the policy demands
    paths: tuple[EvidencePath, ...] = ()  # how an approval saw what it vouches for


Assess = Callable[[Envelope, Proposal], Awaitable[Judgement]]
OnControl = Callable[[Envelope, Control], Awaitable[None]]
OnProposal = Callable[[Envelope, Proposal], None]


@dataclass
class _Allowance:
    """A token bucket and an in-flight count: how much assessing one proposer may ask."""

    tokens: float = ASSESS_BURST
    at: float = 0.0
    running: int = 0

    def take(self, now: float) -> str | None:
        """Take one assessment, or say why not."""
        self.tokens = min(ASSESS_BURST, self.tokens + (now - self.at) * ASSESS_RATE)
        self.at = now
        if self.running >= ASSESS_IN_FLIGHT:
            return f"{self.running} of its proposals are being assessed already"
        if self.tokens < 1:
            return f"more than {ASSESS_RATE * 60:g} proposals a minute"
        self.tokens -= 1
        self.running += 1
        return None


@dataclass
class _Open:
    rule: Rule
    ballots: list[Ballot] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Protocol:
    """One persona's side of the protocol over one connection."""

    def __init__(self, connection: Connection, *, persona: str, host: str, signer: Signer,
                 verifier: Verifier, voters: frozenset[str], assess: Assess | None,
                 on_control: OnControl | None = None,
                 on_proposal: OnProposal | None = None) -> None:
        self._conn = connection
        self.persona = persona
        self._host = host
        self._signer = signer
        self.verifier = verifier
        self._voters = voters
        self._assess = assess
        self._on_control = on_control
        self._on_proposal_seen = on_proposal
        self._allowances: dict[str, _Allowance] = {}
        self._open: dict[str, _Open] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def subscribe(self) -> None:
        """(Re)subscribe; called on every (re)connect.

        Returns once the server holds the subscriptions: nats-py only queues them, and
        a proposal published meanwhile would never reach this voter.
        """
        if self._assess is not None or self._on_proposal_seen is not None:
            await self._conn.subscribe("zeta.repair.*.proposed", self._on_proposal)
        await self._conn.subscribe("zeta.repair.*.vote.*", self._on_vote)
        if self._on_control is not None:
            await self._conn.subscribe("zeta.control.*", self._on_control_msg)
        await self._conn.sync()

    def seal(self, kind: Kind, body: BaseModel, *, repair: str | None = None) -> Envelope:
        return seal(kind, sender=self.persona, host=self._host, body=body, signer=self._signer,
                    repair=repair)

    async def send(self, kind: Kind, body: BaseModel, *, repair: str | None = None) -> Envelope:
        envelope = self.seal(kind, body, repair=repair)
        await self._conn.publish(subject_for(envelope), envelope)
        return envelope

    def _accept(self, msg: Msg) -> Accepted | None:
        outcome = self.verifier.check(msg.subject, msg.data)
        if isinstance(outcome, Dropped):
            log.warning("message dropped", subject=msg.subject, reason=outcome.reason,
                        detail=outcome.detail)
            return None
        return outcome

    # ------------------------------------------------------------ proposer

    async def propose(self, body: Proposal) -> tuple[str, Tally]:
        """Publish a proposal, gather votes until it is decided, publish the decision."""
        repair = ids.new_id()
        rule = Rule.of(self.persona, body.quorum, body.paths)
        pending = self._open[repair] = _Open(rule)
        try:
            await self.send("proposal", body, repair=repair)
            log.info("proposed", repair=repair, action=body.action, target=body.target.key,
                     approvals=rule.approvals, veto=sorted(rule.veto))
            result = await self._await_decision(pending)
        finally:
            del self._open[repair]
        await self.send("decision", Decision(
            outcome=result.outcome,
            reason=result.reason, approvals=result.approvals, rejections=result.rejections,
            vetoes=result.vetoes, votes=result.counted), repair=repair)
        log.info("decided", repair=repair, outcome=result.outcome, reason=result.reason)
        return repair, result

    async def _await_decision(self, pending: _Open) -> Tally:
        while True:
            now = datetime.now(UTC)
            result = tally(pending.rule, pending.ballots, self._voters, now)
            if result.final:
                return result
            pending.changed.clear()
            remaining = (pending.rule.deadline - now).total_seconds()
            try:
                # Wake on every vote, and once just after the deadline to expire.
                await asyncio.wait_for(pending.changed.wait(), timeout=max(remaining, 0) + 0.01)
            except TimeoutError:
                continue

    async def _on_vote(self, msg: Msg) -> None:
        repair = msg.subject.split(".")[2]
        pending = self._open.get(repair)
        if pending is None:
            return  # someone else's proposal: its proposer counts it
        accepted = self._accept(msg)
        if accepted is None:
            return
        vote = accepted.body
        assert isinstance(vote, Vote)
        env = accepted.envelope
        pending.ballots.append(Ballot.of(env.id, env.sender, env.at, vote))
        log.info("vote counted", repair=repair, voter=env.sender, verdict=vote.verdict,
                 reason=vote.reason)
        pending.changed.set()

    # ------------------------------------------------------------ voter

    async def _on_proposal(self, msg: Msg) -> None:
        # Verified once, here, for everyone who needs it: a second check of the same
        # message would be refused as a replay.
        accepted = self._accept(msg)
        if accepted is None:
            return
        proposal = accepted.body
        assert isinstance(proposal, Proposal)
        if self._on_proposal_seen is not None:
            self._on_proposal_seen(accepted.envelope, proposal)
        sender = accepted.envelope.sender
        if self._assess is None or sender == self.persona:
            return
        allowance = self._allowances.setdefault(sender, _Allowance(at=time.monotonic()))
        if (refusal := allowance.take(time.monotonic())) is not None:
            self.verifier.dropped["rate-limited"] += 1
            log.warning("proposal not assessed", repair=accepted.envelope.repair,
                        proposer=sender, reason="rate-limited", detail=refusal)
            return
        task = asyncio.create_task(self._vote(accepted))
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            allowance.running -= 1

        task.add_done_callback(done)

    async def _vote(self, accepted: Accepted) -> None:
        assert self._assess is not None
        proposal = accepted.body
        assert isinstance(proposal, Proposal)
        repair = accepted.envelope.repair
        try:
            judgement = await self._assess(accepted.envelope, proposal)
        except Exception as exc:  # a voter that cannot judge must say no, not crash
            log.exception("assessment failed", repair=repair)
            judgement = Judgement("reject", f"could not assess: {type(exc).__name__}: {exc}")
        body = Vote(verdict=judgement.verdict, reason=judgement.reason[:TEXT_MAX],
                    evidence=dict(judgement.evidence), observed_at=datetime.now(UTC),
                    policy_digest=proposal.policy_digest, rationale=judgement.rationale,
                    required=judgement.required,
                    paths=judgement.paths if judgement.verdict == "approve" else ())
        try:
            await self.send("vote", body, repair=repair)
        except BusUnavailableError as exc:
            # Nobody awaits this task: say so here. Without the vote the proposal
            # expires or is decided by the others, which is the safe outcome.
            log.warning("vote not published", repair=repair, verdict=judgement.verdict,
                        error=str(exc))
            return
        log.info("voted", repair=repair, verdict=judgement.verdict, reason=judgement.reason,
                 paths=list(body.paths))

    # ------------------------------------------------------------ operator

    async def _on_control_msg(self, msg: Msg) -> None:
        accepted = self._accept(msg)
        if accepted is None or self._on_control is None:
            return
        body = accepted.body
        assert isinstance(body, Control)
        if msg.subject != subjects.control(body.verb):
            log.warning("message dropped", subject=msg.subject, reason="subject-mismatch",
                        detail=f"control verb {body.verb!r}")
            return
        await self._on_control(accepted.envelope, body)
