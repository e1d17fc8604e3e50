"""``zeta-agent audit``: read the ``ZETA_AUDIT`` stream back, and verify it offline.

``verify`` is the pure part (no I/O): given the stored messages and the keys from
configuration it re-checks every signature and sender key (not freshness or replay
in time: the stream is history, but an id stored twice is reported) and that every
repair that started had a valid approving quorum:

- the ``decided`` came from the proposer, approved, before the ``started``;
- each vote id it counted is in the stream as a valid vote on this repair, by a
  distinct eligible voter (a persona with the ``vote`` duty), stamped before the
  deadline, and together they meet the proposal's rule (``bus.quorum.tally``, the
  same function the proposer ran), with no veto left out;
- the ``started`` came from the proposer, who is the executor, for the lease of
  the proposal's target, with a fencing token;
- a destructive action reported as run has a ``started`` (no quorum, no lease:
  a violation);
- the proposal's rule and ``destructive`` flag are at least as strict as its policy
  step demands: the terms come from the policy in configuration when its digest is
  the proposal's, and from the terms each vote recorded (``Vote.required``, written
  by the voters' own copies of the policy), the strictest of all; a repair whose
  terms nobody can tell is flagged too, since the proposer alone wrote its rule;
- no ``started`` while a verified freeze was in force (the latest verified freeze
  or thaw by signed time and id, as the agents order them).

Reading the stream (``read``) is a sequence of JetStream "get next message" requests
from the first sequence to the last: it creates no consumer and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from bus import ids, subjects
from bus.connection import Connection
from bus.envelope import Accepted, Dropped, Envelope, Verifier, format_time
from bus.jetstream import AUDIT_STREAM
from bus.leases import kv_key
from bus.messages import Control, Decision, Proposal, Result, Started, Vote
from bus.natstypes import JetStreamContext, NotFoundError
from bus.quorum import Ballot, Rule, counted_ballots, looser, strictest, tally
from bus.reading import Stored, read_stream
from runtime.agent import logs
from runtime.agent.link import Roster
from runtime.core.engine import required_at
from runtime.model.catalog import UnknownActionError, lookup
from runtime.model.formats import (
    DEFAULT_FLEET,
    Quorum,
    RepairPolicy,
)
from runtime.ops import watch as watching
from runtime.ops.common import (
    UserError,
    bus_urls_of,
    config_dir,
    connect_within,
    load_config_dir,
    read_seed,
)
from runtime.ops.watch import describe

_RAN = ("succeeded", "failed", "verified", "unverified", "compensated")


@dataclass(frozen=True, order=True)
class Violation:
    seq: int
    repair: str
    message: str  # the message id, or "seq N" when the message has no readable id
    reason: str

    def __str__(self) -> str:
        return f"repair {self.repair} message {self.message} (seq {self.seq}): {self.reason}"


@dataclass(frozen=True)
class _Msg:
    stored: Stored
    envelope: Envelope
    body: BaseModel


@dataclass
class _Repair:
    proposals: list[_Msg] = field(default_factory=list)
    votes: list[_Msg] = field(default_factory=list)
    decisions: list[_Msg] = field(default_factory=list)
    starts: list[_Msg] = field(default_factory=list)
    results: list[_Msg] = field(default_factory=list)


def _label(stored: Stored) -> tuple[str, str]:
    """(repair, message id) of a message for reporting, read leniently: it may be garbage."""
    try:
        obj = json.loads(stored.data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        obj = None
    route = subjects.parse(stored.subject)
    repair = route.repair if route is not None and route.repair else "-"
    if not isinstance(obj, dict):
        return repair, f"seq {stored.seq}"
    message = obj.get("id")
    found = obj.get("repair")
    return (found if isinstance(found, str) else repair,
            message if isinstance(message, str) else f"seq {stored.seq}")


class _Audit:
    def __init__(self, keys: Mapping[str, str], operators: Mapping[str, str],
                 voters: Set[str], policies: Mapping[str, RepairPolicy],
                 default_quorum: Quorum) -> None:
        self.verifier = Verifier(keys=keys, operators=operators)
        self.voters = voters
        self.policies = policies
        self.default_quorum = default_quorum
        self.freezes: list[tuple[datetime, str, Control | None]] = []  # verified, any order
        self.violations: list[Violation] = []
        self.first: dict[str, int] = {}  # message id → seq where it was first stored
        self.invalid: dict[str, str] = {}  # message id → why it was not accepted
        self.repairs: dict[str, _Repair] = {}

    def flag(self, msg: _Msg | Stored, reason: str) -> None:
        stored = msg.stored if isinstance(msg, _Msg) else msg
        repair, message = _label(stored)
        self.violations.append(Violation(stored.seq, repair, message, reason))

    def read(self, stored: Stored) -> None:
        _, message = _label(stored)
        if message in self.first:
            self.flag(stored, f"duplicate id: first stored at seq {self.first[message]}")
            return
        if not message.startswith("seq "):
            self.first[message] = stored.seq
        outcome = self.verifier.check(stored.subject, stored.data, live=False)
        if isinstance(outcome, Dropped):
            self.invalid[message] = outcome.reason
            self.flag(stored, f"{outcome.reason}: {outcome.detail}")
            return
        msg = _Msg(stored, outcome.envelope, outcome.body)
        if isinstance(msg.body, Control):
            if stored.subject != subjects.control(msg.body.verb):
                self.flag(msg, f"subject-mismatch: control {msg.body.verb!r} on {stored.subject}")
            elif msg.body.verb in ("freeze", "thaw"):
                self.freezes.append((msg.envelope.at, msg.envelope.id,
                                     msg.body if msg.body.verb == "freeze" else None))
            return
        if msg.envelope.repair is None:
            return  # presence and findings: nothing to check beyond the signature
        repair = self.repairs.setdefault(msg.envelope.repair, _Repair())
        bucket = {"proposal": repair.proposals, "vote": repair.votes,
                  "decision": repair.decisions, "started": repair.starts,
                  "result": repair.results}[msg.envelope.kind]
        bucket.append(msg)

    def check_repair(self, repair: _Repair) -> None:
        for extra in repair.proposals[1:]:
            self.flag(extra, "a second proposal for this repair")
        proposal = repair.proposals[0] if repair.proposals else None
        for extra in repair.decisions[1:]:
            self.flag(extra, "a second decision for this repair")
        decision = repair.decisions[0] if repair.decisions else None
        sound = decision is not None and self.check_decision(decision, proposal, repair.votes)
        for extra in repair.starts[1:]:
            self.flag(extra, "a second start for this repair: one approval, one execution")
        executor = None
        if repair.starts:
            start = repair.starts[0]
            self.check_start(start, proposal, decision, sound)
            executor = start.envelope.sender
        for result in repair.results:
            self.check_result(result, executor)

    def check_decision(self, decision: _Msg, proposal: _Msg | None,
                       votes: Sequence[_Msg]) -> bool:
        """Flag what is wrong with a decision; True if it is a sound approval."""
        body = decision.body
        assert isinstance(body, Decision)
        if proposal is None:
            self.flag(decision, "a decision without a proposal")
            return False
        proposer = proposal.envelope.sender
        if decision.envelope.sender != proposer:
            self.flag(decision, f"decided by {decision.envelope.sender}, not by the proposer "
                                f"{proposer}")
            return False
        if body.outcome != "approved":
            return False
        terms = proposal.body
        assert isinstance(terms, Proposal)
        rule = Rule.of(proposer, terms.quorum, terms.paths)
        by_id = {v.envelope.id: v for v in votes}
        sound = self.check_rule(decision, proposal, [by_id[i] for i in body.votes if i in by_id])
        counted: list[Ballot] = []
        for vote_id in body.votes:
            vote = by_id.get(vote_id)
            if vote is None:
                why = (f"is invalid ({self.invalid[vote_id]})" if vote_id in self.invalid
                       else "is not a vote on this repair in the stream")
                self.flag(decision, f"counted vote {vote_id} {why}")
                sound = False
                continue
            assert isinstance(vote.body, Vote)
            counted.append(Ballot.of(vote_id, vote.envelope.sender, vote.envelope.at, vote.body))
        # Stream order, not the senders' clocks, says which votes the proposer had seen.
        seen = [Ballot.of(v.envelope.id, v.envelope.sender, v.envelope.at, v.body)
                for v in votes if isinstance(v.body, Vote) and v.stored.seq < decision.stored.seq
                and v.envelope.id not in body.votes]
        kept = {b.vote_id for b in counted_ballots(rule, [*counted, *seen], self.voters)}
        for ballot in counted:
            if ballot.vote_id not in kept:
                self.flag(decision, f"counted vote {ballot.vote_id} by {ballot.voter} must not "
                                    f"count: {self._why_not(rule, ballot)}")
                sound = False
        at = decision.envelope.at
        claimed = tally(rule, counted, self.voters, at)
        if claimed.outcome != "approved":
            self.flag(decision, f"approved, but its counted votes give {claimed.outcome}: "
                                f"{claimed.reason}")
            return False
        if set(body.approvals) != set(claimed.approvals):
            self.flag(decision, f"lists approvals {sorted(body.approvals)}, its votes show "
                                f"{sorted(claimed.approvals)}")
            sound = False
        whole = tally(rule, [*counted, *seen], self.voters, at)
        if whole.outcome != "approved":
            self.flag(decision, f"approved, but the votes in the stream give {whole.outcome}: "
                                f"{whole.reason}")
            sound = False
        return sound

    def check_rule(self, decision: _Msg, proposal: _Msg, counted: Sequence[_Msg]) -> bool:
        """Flag a proposal whose rule is looser than its policy step; True if it is not."""
        terms = proposal.body
        assert isinstance(terms, Proposal)
        known = [v.body.required for v in counted
                 if isinstance(v.body, Vote) and v.body.required is not None]
        mine = required_at(self.policies.get(terms.policy), terms.policy_digest, terms.step,
                           self.default_quorum)
        if mine is not None:
            known.append(mine)
        demanded = strictest(known)
        if demanded is None:
            self.flag(decision, f"the quorum rule cannot be checked: no policy {terms.policy} "
                                f"at digest {terms.policy_digest[:12]} here, and no counted "
                                "vote recorded the terms it demands")
            return False
        if problems := looser(terms.quorum, terms.destructive, proposal.envelope.at, demanded):
            self.flag(decision, "approved under a rule looser than the policy's: "
                                + "; ".join(problems))
            return False
        return True

    def frozen_at(self, at: datetime) -> Control | None:
        """The verified freeze in force at ``at``, if any."""
        before = [f for f in self.freezes if f[0] <= at]
        return max(before, key=lambda f: (f[0], f[1]))[2] if before else None

    def _why_not(self, rule: Rule, ballot: Ballot) -> str:
        """Why ``counted_ballots`` left a ballot out, in its own order of rules."""
        if ballot.voter == rule.proposer:
            return "the proposer's own vote (the proposal is its approval)"
        if ballot.voter not in self.voters:
            return f"{ballot.voter} is not an eligible voter (no vote duty)"
        if ballot.at > rule.deadline:
            return "cast after the deadline"
        return f"a second vote by {ballot.voter} (a persona's first vote is its vote)"

    def check_start(self, start: _Msg, proposal: _Msg | None, decision: _Msg | None,
                    sound: bool) -> None:
        body = start.body
        assert isinstance(body, Started)
        if (freeze := self.frozen_at(start.envelope.at)) is not None:
            self.flag(start, f"started while the fleet was frozen ({freeze.reason!r})")
        if proposal is None:
            self.flag(start, "started without a proposal: no quorum was asked")
            return
        proposer = proposal.envelope.sender
        if start.envelope.sender != proposer or body.executor != proposer:
            self.flag(start, f"started by {start.envelope.sender} naming executor "
                             f"{body.executor}; only the proposer {proposer} executes")
        terms = proposal.body
        assert isinstance(terms, Proposal)
        if body.lease != kv_key(terms.target.key):
            self.flag(start, f"lease {body.lease} is not the lease of the target "
                             f"{terms.target.key}")
        if decision is None:
            self.flag(start, "started without a decision")
        elif decision.stored.seq > start.stored.seq:
            self.flag(start, "started before the decision")
        else:
            outcome = decision.body
            assert isinstance(outcome, Decision)
            if outcome.outcome != "approved":
                self.flag(start, f"started although the decision was {outcome.outcome}")
            elif not sound:
                self.flag(start, "started on an approval that is not a valid quorum")

    def check_result(self, result: _Msg, executor: str | None) -> None:
        body = result.body
        assert isinstance(body, Result)
        sender = result.envelope.sender
        if executor is not None and sender != executor:
            self.flag(result, f"result from {sender}, but {executor} executed this repair")
        if executor is None and body.outcome in _RAN and not body.dry_run:
            try:
                destructive = lookup(body.action).destructive
            except UnknownActionError:
                destructive = True  # nobody can say it was harmless
            if destructive:
                self.flag(result, f"{body.action} reported {body.outcome} without a start: "
                                  "a destructive action ran without quorum and lease")


def verify(messages: Iterable[Stored], keys: Mapping[str, str], operators: Mapping[str, str],
           voters: Set[str], *, policies: Mapping[str, RepairPolicy] | None = None,
           default_quorum: Quorum = DEFAULT_FLEET.spec.quorum) -> list[Violation]:
    """Every violation in an audit history, in stream order (empty: the history is sound).

    ``keys`` and ``operators`` map names to the public keys from configuration;
    ``voters`` are the personas with the ``vote`` duty; ``policies`` (by name) and
    ``default_quorum`` (the fleet's) say what each proposal's rule had to be.
    """
    audit = _Audit(keys, operators, voters, policies or {}, default_quorum)
    for stored in sorted(messages, key=lambda m: m.seq):
        audit.read(stored)
    for repair in audit.repairs.values():
        audit.check_repair(repair)
    return sorted(audit.violations)


# ---------------------------------------------------------------- reading and summing up


class StreamMissingError(LookupError):
    """The bus has no ``ZETA_AUDIT`` stream (no agent ever started on it)."""


async def read(js: JetStreamContext, repair: str | None = None) -> list[Stored]:
    """Every message in ``ZETA_AUDIT`` (or of one repair), in stream order."""
    try:
        return await read_stream(js, AUDIT_STREAM, f"zeta.repair.{repair}.>" if repair else ">")
    except NotFoundError:
        raise StreamMissingError(AUDIT_STREAM) from None


def listing(messages: Iterable[Stored], verifier: Verifier, *, as_json: bool) -> list[str]:
    """One line per message: what it says if it verifies, else why not."""
    lines = []
    for stored in messages:
        outcome = verifier.check(stored.subject, stored.data, live=False)
        record: dict[str, Any] = {"seq": stored.seq, "subject": stored.subject,
                                  "stored": stored.time.isoformat() if stored.time else None}
        if isinstance(outcome, Dropped):
            record |= {"dropped": outcome.reason, "detail": outcome.detail}
            text = f"INVALID {stored.subject}: {outcome.reason}: {outcome.detail}"
        else:
            record["envelope"] = json.loads(stored.data)
            text = describe(outcome.envelope, outcome.body)
            text = f"{format_time(outcome.envelope.at)} {outcome.envelope.kind:<9} {text}"
        lines.append(json.dumps(record, ensure_ascii=False) if as_json
                     else f"{stored.seq:>6}  {text}")
    return lines


@dataclass
class Summary:
    """One repair at a glance, from whatever of it verified."""

    repair: str
    action: str = "-"
    target: str = "-"
    proposer: str = "-"
    decision: str = "-"
    executor: str = "-"
    result: str = "-"
    messages: int = 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(messages: Iterable[Stored], verifier: Verifier) -> tuple[list[Summary],
                                                                         list[Accepted]]:
    """Per-repair summaries in order of first appearance, and the verified controls."""
    repairs: dict[str, Summary] = {}
    controls: list[Accepted] = []
    for stored in messages:
        outcome = verifier.check(stored.subject, stored.data, live=False)
        if isinstance(outcome, Dropped):
            continue
        env, body = outcome.envelope, outcome.body
        if isinstance(body, Control):
            controls.append(outcome)
            continue
        if env.repair is None:
            continue
        summary = repairs.setdefault(env.repair, Summary(env.repair))
        summary.messages += 1
        match body:
            case Proposal():
                summary.action, summary.target = body.action, body.target.key
                summary.proposer = env.sender
            case Decision():
                summary.decision = body.outcome
            case Started():
                summary.executor = body.executor
            case Result():
                summary.result = body.outcome + (" (dry run)" if body.dry_run else "")
                if summary.action == "-":  # a repair that needed no quorum
                    summary.action, summary.target = body.action, body.target.key
                    summary.executor = env.sender
            case _:
                pass
    return list(repairs.values()), controls


def table(summaries: Sequence[Summary]) -> list[str]:
    """The summaries as aligned columns."""
    rows = [["REPAIR", "ACTION", "TARGET", "PROPOSER", "DECISION", "EXECUTOR", "RESULT"]]
    rows += [[s.repair, s.action, s.target, s.proposer, s.decision, s.executor, s.result]
             for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


# ---------------------------------------------------------------- the command


async def _read_audit(urls: Sequence[str], seed: bytes | None, repair: str | None,
                      within: float) -> list[Stored]:
    connection = Connection(urls, name="zeta-agent audit", seed=seed)
    await connect_within(connection, within, urls)
    try:
        return await read(connection.js, repair)
    except StreamMissingError:
        raise UserError(f"the bus at {', '.join(urls)} has no {AUDIT_STREAM} stream: "
                        "no agent has started there yet") from None
    finally:
        await connection.close()


def audit_command(args: argparse.Namespace) -> int:
    if args.repair is not None and not ids.is_id(args.repair):
        raise UserError(f"{args.repair!r} is not a repair id (26 characters, like "
                        f"{ids.new_id()})")
    config = load_config_dir(config_dir(args.config_dir))
    # A one-shot read: connection warnings (the disconnect at exit) would only be noise.
    logs.configure(level="error", stream=sys.stderr)
    urls = bus_urls_of(args, config)
    stored = asyncio.run(_read_audit(urls, read_seed(args.seed), args.repair, args.timeout))
    roster = Roster.of(config)
    if args.repair and not stored:
        raise UserError(f"no messages of repair {args.repair} in {AUDIT_STREAM}", code=1)
    if args.check == "verify":
        violations = verify(
            stored, roster.keys, roster.operators, roster.voters,
            policies={name: p.value for name, p in config.policies.items()},
            default_quorum=config.fleet.spec.quorum)
        for violation in violations:
            print(json.dumps(asdict(violation)) if args.json else violation)
        verdict = f"{len(violations)} violation(s)" if violations else "ok"
        print(f"{verdict}: {len(stored)} messages checked", file=sys.stderr)
        return 1 if violations else 0
    verifier = roster.verifier()
    if args.repair:
        for line in listing(stored, verifier, as_json=args.json):
            print(line)
        return 0
    summaries, controls = summarize(stored, verifier)
    if args.json:
        for summary in summaries:
            print(json.dumps(summary.as_json()))
        for control in controls:
            print(json.dumps({"control": control.envelope.model_dump(mode="json",
                                                                     by_alias=True)}))
        return 0
    for line in table(summaries):
        print(line)
    for control in controls:
        print(f"{format_time(control.envelope.at)} "
              f"{watching.describe(control.envelope, control.body)}")
    return 0
