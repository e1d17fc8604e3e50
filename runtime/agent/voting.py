"""The voter: gathers what a vote needs and lets ``runtime.core.vote`` decide.

Everything a vote is judged on is this persona's own: its copy of the policies and
personas, the freeze and the approvals its bus link counted, its engine's breakers, the
lease on the target, and a fresh observation of its own. The judgement itself is pure
(``core.vote``); a model brain may then put the fixed verdict into the persona's words.
"""

from __future__ import annotations

import functools
import typing
from datetime import datetime, timedelta

import structlog

from bus import leases
from bus.envelope import Envelope
from bus.messages import Proposal
from bus.protocol import Judgement
from runtime.agent.link import HEARTBEAT_EVERY, BusView
from runtime.agent.metrics import Metrics
from runtime.agent.observing import Observing
from runtime.config.loading import ConfigSet
from runtime.core import evidence, review, vote
from runtime.core.detecting import detect
from runtime.core.engine import PolicyEngine
from runtime.core.ports import Wall
from runtime.host.observing import authority, tcp_connect
from runtime.model import paths
from runtime.model.formats import Persona, RepairPolicy
from runtime.model.snapshot import Snapshot

log = structlog.get_logger()

VOUCHED_GRACE = timedelta(seconds=30)
"""How long past its quorum deadline a reviewer's approval of a node disruption still
counts as one: the time for its decision and its executor's lease, which then counts."""
SILENT_AFTER = timedelta(seconds=6 * HEARTBEAT_EVERY)
"""Agents on a node unheard this long are silent: the ``peer`` path says it is down."""


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
        self._vouched: dict[str, datetime] = {}  # node -> until when its approval counts

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
                         required=cast.required, paths=cast.paths)

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
        if (confirmed.verdict == "approve" and proposal.target.kind == "node"
                and paths.corroborates_kubelet(policy.spec.detect)):
            confirmed = vote.corroborated(confirmed, proposal.target.name,
                                          await self._corroborate(proposal.target.name, snapshot))
        if "veto" not in self.persona.spec.duties:
            return confirmed
        return self._review(confirmed, proposal, snapshot)

    async def _corroborate(self, node: str, snapshot: Snapshot) -> evidence.Corroboration:
        """Ask the other paths whether ``node``'s kubelet is down: the reports of the
        agents on it (this one's own, if it runs there), and a probe of its kubelet port."""
        voices = [evidence.Voice(p.persona, p.last_heartbeat, p.node)
                  for p in self.view.peers.values()
                  if p.node is not None and p.node.node == node and p.last_heartbeat is not None]
        if snapshot.node_report is not None and snapshot.node_report.node == node:
            voices.append(evidence.Voice(self.persona.name, snapshot.at, snapshot.node_report))
        settings = self.config.fleet.spec.safety.hostEvidence
        seen = next((n for n in snapshot.nodes or () if n.name == node), None)
        probe = None
        if seen is not None and seen.address and seen.kubelet_port is not None:
            probe = evidence.Probe(
                authority(seen.address, seen.kubelet_port),
                await tcp_connect(seen.address, seen.kubelet_port,
                                  settings.probeTimeout.total_seconds()))
        found = evidence.corroborate(node, voices=voices, probe=probe, now=snapshot.at,
                                     fresh=self._report_fresh(), silent=SILENT_AFTER)
        if found.disagreement is not None:
            self.metrics.disagreement()
            log.warning("evidence paths disagree", node=node, disagreement=found.disagreement)
        return found

    def _report_fresh(self) -> timedelta:
        """How old a node's report may be and still count: an agent refreshes it every
        tick and sends it every heartbeat, so two of the slowest persona's ticks and two
        heartbeats (one lost on the way) cover it."""
        slowest = max((p.value.spec.tick for p in self.config.personas.values()),
                      default=timedelta(0))
        return 2 * slowest + 2 * timedelta(seconds=HEARTBEAT_EVERY)

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
        now = snapshot.at
        self._vouched = {n: until for n, until in self._vouched.items() if until > now}
        checks = review.review(review.Facts(
            disruption=disruption, nodes=snapshot.nodes, pods=snapshot.pods,
            leases=snapshot.leases, budgets=snapshot.budgets,
            safety=self.config.fleet.spec.safety,
            outage=self.observing.outage, now=now,
            apiserver_down=review.reachable(snapshot.apiserver) is False,
            vouched=frozenset(self._vouched)))
        for check in checks:
            self.metrics.review(check.name, passed=check.passed)
        reviewed = vote.reviewed(confirmed, checks)
        if reviewed.verdict == "approve":
            # Counted as disrupted from now (no await since the checks ran, so a review
            # of another proposal cannot slip in between) until its executor's lease
            # shows, or its quorum deadline and a lease's acquisition have passed.
            until = proposal.quorum.deadline + VOUCHED_GRACE
            self._vouched[disruption.node] = max(until, self._vouched.get(disruption.node, until))
        return reviewed
