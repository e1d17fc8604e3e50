"""The quorum tally: pure functions deciding a proposal from the votes seen so far.

Rules (docs/bus.md):
- The proposer's proposal is its approval; it counts once, and a vote it casts on
  its own proposal is ignored.
- Only eligible voters count (personas with the ``vote`` duty, known from
  configuration); a persona's first vote is its vote, later ones are ignored, so
  nobody can flip or inflate the count.
- Votes stamped after the deadline do not count.
- A ``block`` from a persona in the rule's ``veto`` list rejects at once. A ``block``
  from anyone else counts as a rejection.
- Approval needs ``approvals`` distinct approvers AND a non-block vote from every
  eligible veto holder: an approval that arrived before the reviewer spoke would
  take her veto away. A silent veto holder therefore lets the proposal expire;
  safety favours the veto over liveness.
- Independent evidence: when the rule asks for it, the evidence paths the approvals
  name between them (the proposer's included) must be ``evidence.distinct`` many and
  include ``evidence.requires``. An approval that only repeats paths already named still
  counts as an approval, but adds no path.
- Rejected early once the approvals can no longer be reached by the voters left.

The rule itself is written by the proposer, so a voter (and ``audit verify``) first
holds it against the policy's own: ``looser`` names every way it falls short.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from bus.messages import (
    NO_EVIDENCE_RULE,
    EvidencePath,
    EvidenceRule,
    QuorumRule,
    Required,
    Verdict,
    Vote,
)

DEADLINE_SLACK = timedelta(seconds=1)
"""How far past ``sent + required deadline`` a proposal's deadline may be: the time a
proposer takes between computing it and stamping the envelope, and the millisecond
the bus format rounds away. A stretched deadline is minutes or hours."""

Outcome = Literal["pending", "approved", "rejected", "expired"]


@dataclass(frozen=True)
class Ballot:
    """One vote as the tally needs it (already signature-checked by the bus)."""

    vote_id: str
    voter: str
    verdict: Verdict
    at: datetime
    paths: frozenset[EvidencePath] = frozenset()

    @classmethod
    def of(cls, vote_id: str, voter: str, at: datetime, vote: Vote) -> Ballot:
        return cls(vote_id, voter, vote.verdict, at, frozenset(vote.paths))


@dataclass(frozen=True)
class Rule:
    proposer: str
    approvals: int
    veto: frozenset[str]
    deadline: datetime
    evidence: EvidenceRule = NO_EVIDENCE_RULE
    paths: frozenset[EvidencePath] = frozenset()  # the proposer's

    @classmethod
    def of(cls, proposer: str, quorum: QuorumRule,
           paths: Iterable[EvidencePath] = ()) -> Rule:
        return cls(proposer, quorum.approvals, frozenset(quorum.veto), quorum.deadline,
                   quorum.evidence, frozenset(paths))


@dataclass(frozen=True)
class Tally:
    outcome: Outcome
    reason: str
    approvals: tuple[str, ...]
    rejections: tuple[str, ...]
    vetoes: tuple[str, ...]
    counted: tuple[str, ...]  # vote ids that entered the tally, in counting order
    paths: tuple[EvidencePath, ...] = ()  # named between the approvals, sorted

    @property
    def final(self) -> bool:
        return self.outcome != "pending"


def looser(rule: QuorumRule, destructive: bool, sent: datetime,
           required: Required) -> list[str]:
    """Every way a proposal's quorum ``rule`` (and ``destructive`` flag) is looser than
    ``required``; empty when it is at least as strict.

    ``sent`` is the proposal's signed time: the deadline is allowed ``required.deadline``
    seconds from it. A stricter rule (more approvals, more veto holders, a shorter
    deadline) is fine: it can only make approval harder.
    """
    problems = []
    if required.destructive and not destructive:
        problems.append("marked non-destructive, but the policy's step is destructive")
    elif destructive and not required.destructive:
        problems.append("marked destructive, but the policy's step is not")
    if rule.approvals < required.approvals:
        problems.append(f"asks {rule.approvals} approvals, the policy {required.approvals}")
    if missing := sorted(set(required.veto) - set(rule.veto)):
        problems.append(f"drops the veto of {', '.join(missing)}")
    allowed = sent + timedelta(seconds=required.deadline) + DEADLINE_SLACK
    if rule.deadline > allowed:
        problems.append(f"deadline {(rule.deadline - sent).total_seconds():.0f}s after "
                        f"sending, the policy allows {required.deadline:g}s")
    if rule.evidence.distinct < required.evidence.distinct:
        problems.append(f"asks {rule.evidence.distinct} distinct evidence paths, the policy "
                        f"{required.evidence.distinct}")
    if missing := sorted(set(required.evidence.requires) - set(rule.evidence.requires)):
        problems.append(f"drops the required evidence path {', '.join(missing)}")
    return problems


def strictest(terms: Iterable[Required]) -> Required | None:
    """One set of terms at least as strict as each of ``terms`` (None for none)."""
    terms = list(terms)
    if not terms:
        return None
    requires = tuple(sorted({p for t in terms for p in t.evidence.requires}))
    return Required(approvals=max(t.approvals for t in terms),
                    veto=tuple(sorted({v for t in terms for v in t.veto})),
                    deadline=min(t.deadline for t in terms),
                    destructive=any(t.destructive for t in terms),
                    evidence=EvidenceRule(
                        distinct=max(len(requires), *(t.evidence.distinct for t in terms)),
                        requires=requires))


def counted_ballots(rule: Rule, ballots: Iterable[Ballot], eligible: Set[str]) -> list[Ballot]:
    """The ballots that count: eligible, not the proposer, before the deadline, first per voter.

    Ballots are put in a total order (time, id, …) so the result never depends on arrival order.
    """
    seen: set[str] = set()
    out = []
    for ballot in sorted(ballots, key=lambda b: (b.at, b.vote_id, b.voter, b.verdict)):
        if (ballot.voter in seen or ballot.voter == rule.proposer
                or ballot.voter not in eligible or ballot.at > rule.deadline):
            continue
        seen.add(ballot.voter)
        out.append(ballot)
    return out


def tally(rule: Rule, ballots: Iterable[Ballot], eligible: Set[str], now: datetime) -> Tally:
    """Decide, or say it is still pending, from the ballots received so far."""
    counted = counted_ballots(rule, ballots, eligible)
    approving = [b for b in counted if b.verdict == "approve"]
    approvers = (rule.proposer, *(b.voter for b in approving))
    vetoes = tuple(b.voter for b in counted if b.verdict == "block" and b.voter in rule.veto)
    rejections = tuple(b.voter for b in counted
                       if b.verdict != "approve" and b.voter not in vetoes)
    ids = tuple(b.vote_id for b in counted)
    paths = rule.paths.union(*(b.paths for b in approving))

    def result(outcome: Outcome, reason: str) -> Tally:
        return Tally(outcome, reason, approvers, rejections, vetoes, ids, tuple(sorted(paths)))

    if vetoes:
        return result("rejected", f"vetoed by {', '.join(vetoes)}")
    voted = {b.voter for b in counted}
    waiting_veto = sorted((rule.veto & eligible) - voted - {rule.proposer})
    short = _evidence_short(rule.evidence, paths)
    enough = len(approvers) >= rule.approvals
    if enough and not waiting_veto and short is None:
        return result("approved", f"{len(approvers)}/{rule.approvals} approvals, no veto"
                      + (f", evidence by {', '.join(sorted(paths))}"
                         if rule.evidence.needed else ""))
    still_to_vote = len(eligible - voted - {rule.proposer})
    if len(approvers) + still_to_vote < rule.approvals:
        return result("rejected", f"{len(approvers)} approvals and {still_to_vote} voters left; "
                                  f"{rule.approvals} needed")
    if short is not None and still_to_vote == 0:
        return result("rejected", f"{len(approvers)} approvals, but {short}")
    if now > rule.deadline:
        missing = (f"waiting for {', '.join(waiting_veto)} (veto)" if waiting_veto
                   else f"{len(approvers)}/{rule.approvals} approvals" if not enough
                   else short)
        return result("expired", f"deadline passed: {missing}")
    return result("pending", f"{len(approvers)}/{rule.approvals} approvals so far"
                  + (f"; {short}" if short is not None else ""))


def _evidence_short(rule: EvidenceRule, paths: Set[EvidencePath]) -> str | None:
    """How the approvals' paths fall short of ``rule``, or None when they meet it."""
    if not rule.needed:
        return None
    named = ", ".join(sorted(paths)) or "none"
    if missing := sorted(set(rule.requires) - paths):
        return f"no approval by the {', '.join(missing)} evidence path (named: {named})"
    if len(paths) < rule.distinct:
        return f"{len(paths)}/{rule.distinct} distinct evidence paths (named: {named})"
    return None
