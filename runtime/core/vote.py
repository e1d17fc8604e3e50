"""The vote: a pure judgement of one proposal from what a voter has gathered.

The voter (``runtime.agent.voting``) gathers the inputs (its own copy of the policy,
the proposer's persona, the freeze, the breaker, the approvals it counted from verified
decisions, the lease on the target, its own fresh detection) and these functions decide.
They run in two stages so that a proposal refused on its face costs the voter no
observation: ``screen`` judges the proposal against configuration and fleet state,
``confirm`` against what the voter saw itself. A persona with the ``veto`` duty then
runs the review checks (``runtime.core.review``) and ``reviewed`` attaches them;
``final`` turns its objection into a block.

Nothing here reads a clock, the bus or the cluster: every input is an argument, so
each rule is tested on values and re-run offline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from bus.messages import EvidencePath, Proposal, Required, Verdict
from bus.quorum import looser
from runtime.core.detecting import Detection
from runtime.core.engine import policy_digest, required, required_at
from runtime.core.evidence import Corroboration
from runtime.core.review import Check, blocking
from runtime.core.targets import finding_behind
from runtime.model import scopes
from runtime.model.catalog import COMPENSATIONS, lookup
from runtime.model.durations import format_duration
from runtime.model.formats import Persona, Quorum, RepairPolicy
from runtime.model.paths import PRIMARY


@dataclass(frozen=True)
class Vote:
    """A verdict, the reason in one line, the evidence behind it, and the terms the
    voter's own copy of the policy demands (None when it has no such policy or step)."""

    verdict: Verdict
    reason: str
    evidence: Mapping[str, object] = field(default_factory=dict)
    required: Required | None = None
    paths: tuple[EvidencePath, ...] = ()  # an approval's evidence paths


@dataclass(frozen=True)
class Holder:
    """Who holds the lease on the proposal's target."""

    repair: str
    executor: str


def _reject(reason: str, evidence: Mapping[str, object] | None = None) -> Vote:
    return Vote("reject", reason, evidence or {})


def screen(proposal: Proposal, *, policy: RepairPolicy | None, proposer: Persona | None,
           proposer_name: str, sent: datetime, default: Quorum,
           frozen: str | None, breaker: bool, approved_last_hour: int) -> Vote | None:
    """An objection to ``proposal`` on its face, or None when it deserves a look.

    ``frozen`` is the freeze's reason (None: thawed); ``approved_last_hour`` counts
    approvals of this policy decided by their own verified proposers.
    """
    if policy is None:
        return _reject(f"I have no policy {proposal.policy!r}")
    mine = policy_digest(policy)
    if mine != proposal.policy_digest:
        return _reject(f"policy drift: my {policy.name} digest is {mine[:12]}, "
                       f"the proposal's {proposal.policy_digest[:12]}")
    if (problem := _mismatch(policy, proposal, sent, default)) is not None:
        return _reject(problem)
    if (problem := _proposer_not_allowed(proposer_name, proposer, proposal)) is not None:
        return _reject(problem)
    if proposal.action in COMPENSATIONS:
        return None  # undoing a repair is never held by a freeze, a breaker or a budget
    if frozen is not None:
        return _reject(f"fleet frozen: {frozen}")
    if breaker:
        return _reject(f"breaker tripped for {policy.name}")
    if approved_last_hour >= policy.spec.budget.perHour:
        return _reject(f"budget: {approved_last_hour}/{policy.spec.budget.perHour} repairs of "
                       f"{policy.name} approved in the last hour")
    return None


@dataclass(frozen=True)
class History:
    """What the voter's own engine remembers of the condition: ``since`` is when its own
    snapshots started matching the target without a break (None: not matching), and
    ``slack`` one of its ticks, the most two observers' views of one start can differ."""

    since: datetime | None
    slack: timedelta


def confirm(proposal: Proposal, *, policy: RepairPolicy, holder: Holder | None,
            detection: Detection, host: str, sources: Mapping[str, str],
            now: datetime, history: Callable[[str], History | None]) -> Vote:
    """Approve only what the voter itself sees behind the proposal, for as long as the
    policy's ``for:`` asks.

    ``detection`` is the voter's own run of the policy's detector on its own fresh
    snapshot taken on ``host``; ``history(key)`` its engine's memory of the finding
    target ``key`` (None when it does not run the policy: then only the fresh snapshot
    speaks, and the vote says so).
    """
    if holder is not None:
        return _reject(f"{proposal.target.key} is leased by repair {holder.repair} "
                       f"({holder.executor})")
    kind = policy.spec.detect.kind
    if not detection.known:
        return _reject(f"I cannot observe what {kind} needs from {host}, so I cannot "
                       f"confirm it", {"sources": dict(sources)})
    budget = policy.spec.budget.maxUnhealthyFraction
    if budget is not None and detection.population:
        fraction = len(detection.matches) / detection.population
        if fraction > budget:
            return _reject(f"blast radius: {len(detection.matches)}/"
                           f"{detection.population} unhealthy > {budget:.0%}")
    action = lookup(proposal.action)
    finding = finding_behind(action, action.params.model_validate(proposal.params),
                             proposal.target, (m.target for m in detection.matches.values()))
    if finding is None:
        return _reject(f"I do not see {kind} behind {proposal.action} on "
                       f"{proposal.target.key} from {host}", {"sources": dict(sources)})
    match = detection.matches[finding.key]
    held: dict[str, object] = {}
    hold = policy.spec.detect.for_
    if hold > timedelta(0):
        seen = history(finding.key)
        if seen is None:
            held = {"held_for": "no history: I do not run this policy"}
        else:
            length = now - seen.since if seen.since is not None else timedelta(0)
            if length + seen.slack < hold:
                return _reject(f"I have seen {kind} on {finding.key} for "
                               f"{format_duration(length)}, not the policy's for: "
                               f"{format_duration(hold)}", {"host": host})
            held = {"held_for_s": round(length.total_seconds(), 1)}
    return Vote("approve", f"confirmed from {host}: {match.summary}",
                {"observed_at": now.isoformat(), "host": host, **held, **match.evidence},
                paths=(PRIMARY[kind],))


def corroborated(vote: Vote, node: str, corroboration: Corroboration) -> Vote:
    """``vote`` with the paths beyond its detector's that confirm ``node`` is not Ready;
    an approval becomes a reject when the node's own agent says its kubelet is healthy."""
    if vote.verdict != "approve":
        return vote
    evidence = {**vote.evidence, **corroboration.evidence()}
    if corroboration.disagreement is not None:
        return Vote("reject", f"disagreement: the API server says {node} is not Ready, but "
                              f"{corroboration.disagreement}", evidence)
    paths = tuple(dict.fromkeys([*vote.paths, *corroboration.paths]))
    return replace(vote, evidence=evidence, paths=paths)


def reviewed(vote: Vote, checks: Sequence[Check]) -> Vote:
    """``vote`` with the review checks' results in its evidence; an approval becomes a
    reject (a block, for the veto holder) naming every check that blocks."""
    evidence = {**vote.evidence, "checks": [c.evidence() for c in checks]}
    failed = blocking(checks)
    if vote.verdict != "approve" or not failed:
        return replace(vote, evidence=evidence)
    return Vote("reject", "review: " + "; ".join(f"{c.name}: {c.reason}" for c in failed),
                evidence)


def final(vote: Vote, proposal: Proposal, *, policy: RepairPolicy | None, veto: bool,
          default: Quorum) -> Vote:
    """The vote as cast: a veto holder's objection is a block, and the vote carries the
    terms this voter's copy of the policy demands."""
    verdict: Verdict = "block" if vote.verdict == "reject" and veto else vote.verdict
    terms = required_at(policy, proposal.policy_digest, proposal.step, default)
    return replace(vote, verdict=verdict, required=terms)


def _mismatch(policy: RepairPolicy, proposal: Proposal, sent: datetime,
              default: Quorum) -> str | None:
    """What in the proposal is not the policy's step: action, params, or a quorum rule
    looser than the policy's (the proposer writes the rule it is judged by)."""
    terms = required(policy, proposal.step, default)
    if terms is None:
        return f"{policy.name} has no step {proposal.step}"
    remedy = policy.spec.remedies[proposal.step]
    if remedy.action != proposal.action:
        return f"step {proposal.step} of {policy.name} is {remedy.action}, not {proposal.action}"
    if remedy.typed_params().model_dump(mode="json") != proposal.params:
        return f"params differ from step {proposal.step} of {policy.name}"
    if problems := looser(proposal.quorum, proposal.destructive, sent, terms):
        return (f"quorum rule looser than step {proposal.step} of {policy.name}: "
                + "; ".join(problems))
    return None


def _proposer_not_allowed(name: str, proposer: Persona | None,
                          proposal: Proposal) -> str | None:
    if proposer is None:
        return f"{name} is not a persona I know"
    spec = proposer.spec
    if not {"propose", "execute"} <= set(spec.duties):
        return f"{name} does not have the propose and execute duties"
    action = lookup(proposal.action)
    needed = action.scope_for(proposal.target, action.params.model_validate(proposal.params))
    if not scopes.allows(spec.effective_scopes, needed):
        return f"{name} lacks scope {needed}"
    return None
