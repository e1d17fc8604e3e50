"""The voter: gathers what a vote needs and lets ``runtime.core.vote`` decide.

Everything a vote is judged on is this persona's own: its copy of the policies and
personas, the freeze and the approvals its bus link counted, its engine's breakers, the
lease on the target, and a fresh observation of its own. The judgement itself is pure
(``core.vote``); a model brain may then put the fixed verdict into the persona's words.
"""

from __future__ import annotations

import functools
import typing
from datetime import datetime

from bus import leases
from bus.envelope import Envelope
from bus.messages import Proposal
from bus.protocol import Judgement
from runtime.agent.link import BusView
from runtime.agent.metrics import Metrics
from runtime.agent.observing import Observing
from runtime.config.loading import ConfigSet
from runtime.core import review, vote
from runtime.core.detecting import detect
from runtime.core.engine import PolicyEngine
from runtime.core.ports import Wall
from runtime.model.formats import Persona, RepairPolicy
from runtime.model.snapshot import Snapshot


class Argue(typing.Protocol):
    """Puts a verdict into the persona's own words (``Thinker.argue``)."""

    async def __call__(self, proposal: Proposal, verdict: str, reason: str, *,
                       within: float) -> str: ...


class Voter:
    """One persona's vote on the proposals it hears."""

    def __init__(self, persona: Persona, *, config: ConfigSet, engine: PolicyEngine,
                 observing: Observing, view: BusView, metrics: Metrics, wall: Wall,
                 argue: Argue | None = None) -> None:
        self.persona = persona
        self.config = config
        self.engine = engine
        self.observing = observing
        self.view = view
        self.metrics = metrics
        self.wall = wall
        self.argue = argue

    async def assess(self, envelope: Envelope, proposal: Proposal) -> Judgement:
        """Judge a proposal on this persona's own configuration and its own fresh observation.

        A persona with the ``veto`` duty turns every objection into a block: a
        reviewer who sees a reason not to act stops the action, not just one vote.
        """
        located = self.config.policies.get(proposal.policy)
        policy = located.value if located else None
        default = self.config.fleet.spec.quorum
        cast = vote.final(await self._judge(envelope, proposal), proposal, policy=policy,
                          veto="veto" in self.persona.spec.duties, default=default)
        self.metrics.vote(cast.verdict)
        rationale = ""
        if self.argue is not None:
            # Words only, after the verdict is fixed; half the time left keeps the
            # vote itself inside the quorum deadline.
            left = (proposal.quorum.deadline - self.wall()).total_seconds() / 2
            if left > 0:
                rationale = await self.argue(proposal, cast.verdict, cast.reason, within=left)
        return Judgement(cast.verdict, cast.reason, dict(cast.evidence), rationale,
                         required=cast.required)

    async def _judge(self, envelope: Envelope, proposal: Proposal) -> vote.Vote:
        located = self.config.policies.get(proposal.policy)
        policy = located.value if located else None
        proposer = self.config.personas.get(envelope.sender)
        now = self.wall()
        objection = vote.screen(
            proposal, policy=policy, proposer=proposer.value if proposer else None,
            proposer_name=envelope.sender, sent=envelope.at, default=self.config.fleet.spec.quorum,
            frozen=self.view.frozen.reason if self.view.frozen is not None else None,
            breaker=policy is not None and self.engine.breaker(policy.name) is not None,
            approved_last_hour=self.view.approvals.last_hour(proposal.policy, now))
        if objection is not None:
            return objection
        assert policy is not None  # screen() objects to an unknown policy
        return await self._confirm(policy, proposal, now)

    async def _confirm(self, policy: RepairPolicy, proposal: Proposal, now: datetime) -> vote.Vote:
        """The second stage: the lease on the target and this voter's own observation."""
        holder = None
        if self.view.kv is not None:
            held = await leases.holder(self.view.kv, proposal.target.key)
            if held is not None:
                holder = vote.Holder(repair=held.repair, executor=held.executor)
        snapshot = await self.observing.snapshot(now)
        sources = {name: s.detail or ("ok" if s.ok else "failed")
                   for name, s in snapshot.sources.items()}
        confirmed = vote.confirm(proposal, policy=policy, holder=holder,
                                 detection=detect(policy.spec.detect, snapshot),
                                 host=snapshot.host, sources=sources, now=now,
                                 history=functools.partial(self._history, policy.name))
        if "veto" not in self.persona.spec.duties:
            return confirmed
        return self._review(confirmed, proposal, snapshot)

    def _history(self, policy: str, key: str) -> vote.History | None:
        """This voter's own memory of the condition on ``key`` (None: it does not run
        ``policy``, so it keeps none)."""
        if self.engine.policy(policy) is None:
            return None
        return vote.History(self.engine.matching_since(policy, key), self.persona.spec.tick)

    def _review(self, confirmed: vote.Vote, proposal: Proposal, snapshot: Snapshot) -> vote.Vote:
        """The veto holder's review of a node-level disruption, on the same snapshot its
        confirmation read; other actions are not node-level and pass unreviewed."""
        unit = proposal.params.get("unit")
        disruption = review.disruption(proposal.action, proposal.target,
                                       unit if isinstance(unit, str) else None)
        if disruption is None:
            return confirmed
        checks = review.review(review.Facts(
            disruption=disruption, nodes=snapshot.nodes, pods=snapshot.pods,
            leases=snapshot.leases, safety=self.config.fleet.spec.safety,
            outage=self.observing.outage, now=snapshot.at,
            apiserver_down=review.reachable(snapshot.apiserver) is False))
        for check in checks:
            self.metrics.review(check.name, passed=check.passed)
        return vote.reviewed(confirmed, checks)
