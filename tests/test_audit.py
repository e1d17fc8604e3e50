"""``zeta-agent audit``: the audit history read back, and verified offline.

The unit tests write a genuine repair history (real signatures, the shapes the
agents publish), then break it in every way that matters and check each break is
reported against the right message. One test runs the command on a real server.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from bus import ids, subjects
from bus.connection import Connection, subject_for
from bus.envelope import Envelope, canonical, seal
from bus.jetstream import Settings, ensure
from bus.keys import Signer, generate_user_seed
from bus.leases import kv_key
from bus.messages import (
    Control,
    Decision,
    Kind,
    Proposal,
    QuorumRule,
    Required,
    Result,
    Started,
    Target,
    Verdict,
    Vote,
)
from bus.reading import Stored
from lab import tools
from lab.natsserver import NatsServer, free_ports
from runtime.ops.audit import Violation, verify
from runtime.ops.cli import main
from tests.builders import T0
from tests.keyed import keyed_config

VOTERS = frozenset({"otto", "alexa", "riven", "vera", "lior"})
SIGNERS = {n: Signer(generate_user_seed()) for n in (*VOTERS, "mallory", "oncall")}
# Mallory is a configured persona without the vote duty.
KEYS = {n: s.public_key for n, s in SIGNERS.items() if n != "oncall"}
OPERATORS = {"oncall": SIGNERS["oncall"].public_key}
TARGET = Target(kind="node", name="worker-1")
# What the voters' copy of the policy demands for the step proposed below.
REQUIRED = Required(approvals=3, veto=("riven",), deadline=30, destructive=True)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class History:
    """One repair's messages as the stream stores them, written with real signatures."""

    repair: str = field(default_factory=lambda: ids.new_id(int(T0.timestamp() * 1000)))
    signers: dict[str, Signer] = field(default_factory=lambda: SIGNERS)
    stored: list[Stored] = field(default_factory=list)
    sent: list[Envelope] = field(default_factory=list)

    def add(self, kind: Kind, sender: str, body: BaseModel, seconds: float, *,
            signer: str | None = None) -> Envelope:
        envelope = seal(kind, sender=sender, host="h", body=body,
                        signer=self.signers[signer or sender],
                        repair=None if kind == "control" else self.repair, at=at(seconds))
        self.raw(subject_for(envelope), envelope.to_bytes())
        self.sent.append(envelope)
        return envelope

    def raw(self, subject: str, data: bytes) -> None:
        self.stored.append(Stored(len(self.stored) + 1, subject, data))

    def propose(self, sender: str = "otto", seconds: float = 1) -> Envelope:
        return self.add("proposal", sender, Proposal(
            action="k8s.node.cordon", target=TARGET, policy="node-not-ready",
            policy_digest="d" * 64, step=1, destructive=True, summary="worker-1 NotReady",
            quorum=QuorumRule(approvals=3, veto=("riven",), deadline=at(31))), seconds)

    def vote(self, voter: str, verdict: Verdict = "approve", seconds: float = 2, *,
             signer: str | None = None) -> Envelope:
        return self.add("vote", voter, Vote(
            verdict=verdict, reason=f"{voter} says {verdict}", observed_at=at(seconds),
            policy_digest="d" * 64, required=REQUIRED), seconds, signer=signer)

    def decide(self, votes: Sequence[Envelope | str], outcome: str = "approved",
               sender: str = "otto", seconds: float = 3,
               approvals: Sequence[str] | None = None) -> Envelope:
        counted = [v if isinstance(v, str) else v.id for v in votes]
        approvers = approvals if approvals is not None else ["otto", *(
            v.sender for v in votes if isinstance(v, Envelope) and v.body["verdict"] == "approve")]
        return self.add("decision", sender, Decision.model_validate({
            "outcome": outcome, "reason": "tally", "approvals": approvers, "votes": counted}),
            seconds)

    def start(self, sender: str = "otto", seconds: float = 4, lease: str | None = None,
              executor: str | None = None) -> Envelope:
        return self.add("started", sender, Started(
            executor=executor or sender, lease=lease or kv_key(TARGET.key), fencing_token=7),
            seconds)

    def result(self, outcome: str = "succeeded", sender: str = "otto", seconds: float = 5,
               action: str = "k8s.node.cordon") -> Envelope:
        return self.add("result", sender, Result.model_validate({
            "outcome": outcome, "detail": "done", "action": action,
            "target": TARGET.model_dump(), "policy": "node-not-ready"}), seconds)

    def freeze(self, sender: str = "oncall") -> Envelope:
        return self.add("control", sender, Control(verb="freeze", reason="maintenance"), 6)


def sound() -> tuple[History, dict[str, Envelope]]:
    """A repair done by the book: proposed, approved by 3 with Riven's pass, executed, verified."""
    h = History()
    m = {"proposal": h.propose()}
    m["alexa"], m["riven"] = h.vote("alexa", seconds=2), h.vote("riven", seconds=2.5)
    m["decision"] = h.decide([m["alexa"], m["riven"]])
    m["late"] = h.vote("vera", "reject", seconds=3.5)  # after the decision: not counted
    m["started"] = h.start()
    m["result"] = h.result()
    m["verified"] = h.result("verified", seconds=9)
    m["freeze"] = h.freeze()
    return h, m


def check(history: History) -> list[Violation]:
    return verify(history.stored, KEYS, OPERATORS, VOTERS)


def test_a_repair_done_by_the_book_is_clean() -> None:
    history, _ = sound()
    assert check(history) == []


def test_the_documented_story_is_a_sound_history() -> None:
    signers = {n: tools.example_signer(n) for n in tools.EXAMPLE_SENDERS}
    stored = [Stored(n, s, e.to_bytes()) for n, (s, e) in enumerate(tools.examples(), 1)]
    operator = tools.EXAMPLE_OPERATOR
    assert verify(stored, {n: s.public_key for n, s in signers.items() if n != operator},
                  {operator: signers[operator].public_key}, tools.EXAMPLE_VOTERS) == []


def test_an_empty_history_is_clean() -> None:
    assert verify([], KEYS, OPERATORS, VOTERS) == []


def _signed(obj: dict[str, Any], signer: Signer) -> bytes:
    """A correctly signed envelope built by hand, for shapes ``seal`` refuses to build."""
    obj["sig"] = base64.urlsafe_b64encode(signer.sign(canonical(obj))).rstrip(b"=").decode()
    return json.dumps(obj).encode()


@dataclass(frozen=True)
class Break:
    build: Callable[[], tuple[History, dict[str, Envelope | str]]]
    expected: tuple[tuple[str, str], ...]  # (message name, reason fragment)


def _b(build: Callable[[History, dict[str, Envelope | str]], None],
       *expected: tuple[str, str]) -> Break:
    def history() -> tuple[History, dict[str, Envelope | str]]:
        h, named = History(), dict[str, Envelope | str]()
        build(h, named)
        return h, named
    return Break(history, expected)


def _forged(h: History, m: dict[str, Envelope | str]) -> None:
    m["proposal"] = h.propose()
    alexa = seal("vote", sender="alexa", host="h", body=Vote(
        verdict="reject", reason="no", observed_at=at(2), policy_digest="d" * 64),
        signer=SIGNERS["alexa"], repair=h.repair, at=at(2))
    obj = json.loads(alexa.to_bytes())
    obj["body"]["verdict"] = "approve"  # the proposer's wish, not Alexa's vote
    h.raw(subject_for(alexa), json.dumps(obj).encode())
    m["vote"] = alexa.id
    m["decision"] = h.decide([alexa.id, h.vote("riven")], approvals=["otto", "alexa", "riven"])
    m["started"] = h.start()


def _ineligible(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    m["decision"] = h.decide([h.vote("mallory"), h.vote("riven")])
    m["started"] = h.start()


def _short(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    m["decision"] = h.decide([h.vote("alexa", "reject"), h.vote("riven")])
    m["started"] = h.start()


def _veto_counted(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    votes = [h.vote("alexa"), h.vote("vera"), h.vote("riven", "block")]
    m["decision"] = h.decide(votes, approvals=["otto", "alexa", "vera"])
    m["started"] = h.start()


def _veto_left_out(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    alexa = h.vote("alexa")
    h.vote("riven", "block", seconds=2)
    # Riven's second vote is ignored by the rules (a persona's first vote is its vote);
    # counting it instead of her block hides the veto.
    m["decision"] = h.decide([alexa, h.vote("riven", seconds=2.6)])
    m["started"] = h.start()


def _no_decision(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    h.vote("alexa")
    h.vote("riven")
    m["started"] = h.start()


def _rejected(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    h.decide([h.vote("alexa", "reject"), h.vote("riven", "block")], outcome="rejected")
    m["started"] = h.start()


def _late(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    m["decision"] = h.decide([h.vote("alexa", seconds=40), h.vote("riven")], seconds=41)
    m["started"] = h.start(seconds=42)


def _duplicate(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    alexa = h.vote("alexa")
    h.raw(h.stored[-1].subject, h.stored[-1].data)  # stored again, beyond dedup
    m["alexa"] = alexa
    h.decide([alexa, h.vote("riven")])
    h.start()


def _wrong_key(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    m["vote"] = h.vote("riven", signer="mallory")
    m["decision"] = h.decide([h.vote("alexa"), m["vote"]])
    m["started"] = h.start()


def _foreign_executor(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    h.decide([h.vote("alexa"), h.vote("riven")])
    m["started"] = h.start(sender="vera")
    m["result"] = h.result(sender="lior")


def _foreign_decider(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    m["decision"] = h.decide([h.vote("alexa"), h.vote("riven")], sender="alexa")
    m["started"] = h.start()


def _other_lease(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    h.decide([h.vote("alexa"), h.vote("riven")])
    m["started"] = h.start(lease="node.worker-2")
    m["again"] = h.start(seconds=8)


def _no_token(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    h.decide([h.vote("alexa"), h.vote("riven")])
    started = seal("started", sender="otto", host="h", signer=SIGNERS["otto"], repair=h.repair,
                   body=Started(executor="otto", lease=kv_key(TARGET.key), fencing_token=7))
    obj = json.loads(started.to_bytes())
    del obj["body"]["fencing_token"]
    h.raw(subjects.started(h.repair), _signed(obj, SIGNERS["otto"]))
    m["started"] = started.id
    m["result"] = h.result()


def _unknown_vote(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    m["decision"] = h.decide([h.vote("alexa"), h.vote("riven"), ids.new_id()])
    m["started"] = h.start()


def _lying_decision(h: History, m: dict[str, Envelope | str]) -> None:
    h.propose()
    m["decision"] = h.decide([h.vote("alexa"), h.vote("riven"), h.vote("vera", "reject")],
                             approvals=["otto", "alexa", "riven", "vera"])


def _control_by_persona(h: History, m: dict[str, Envelope | str]) -> None:
    m["control"] = h.freeze(sender="otto")


def _ran_alone(h: History, m: dict[str, Envelope | str]) -> None:
    m["result"] = h.result()  # a cordon (destructive) with no proposal, vote or lease
    h.result(action="host.unit.start")  # non-destructive: needs no quorum
    m["drain"] = h.result(action="k8s.node.drain")
    h.result("refused")  # nothing ran


BREAKS: dict[str, Break] = {
    "forged vote signature": _b(
        _forged, ("vote", "bad-signature"), ("decision", "is invalid (bad-signature)"),
        ("started", "not a valid quorum")),
    "vote from an ineligible persona": _b(
        _ineligible, ("decision", "mallory is not an eligible voter"),
        ("decision", "counted votes give pending"), ("started", "not a valid quorum")),
    "approvals short": _b(
        _short, ("decision", "counted votes give pending: 2/3 approvals so far"),
        ("started", "not a valid quorum")),
    "veto counted": _b(
        _veto_counted, ("decision", "counted votes give rejected: vetoed by riven"),
        ("started", "not a valid quorum")),
    "veto left out": _b(
        _veto_left_out, ("decision", "must not count: a second vote by riven"),
        ("decision", "the votes in the stream give rejected: vetoed by riven"),
        ("started", "not a valid quorum")),
    "started without a decision": _b(_no_decision, ("started", "started without a decision")),
    "started after a rejection": _b(
        _rejected, ("started", "started although the decision was rejected")),
    "vote after the deadline": _b(
        _late, ("decision", "cast after the deadline"), ("started", "not a valid quorum")),
    "duplicate id": _b(_duplicate, ("alexa", "duplicate id: first stored at seq 2")),
    "wrong key": _b(
        _wrong_key, ("vote", "wrong-key"), ("decision", "is invalid (wrong-key)"),
        ("started", "not a valid quorum")),
    "started and reported by others": _b(
        _foreign_executor, ("started", "only the proposer otto executes"),
        ("result", "result from lior, but vera executed")),
    "decided by another persona": _b(
        _foreign_decider, ("decision", "decided by alexa, not by the proposer otto"),
        ("started", "not a valid quorum")),
    "lease of another target, started twice": _b(
        _other_lease, ("started", "lease node.worker-2 is not the lease of the target"),
        ("again", "a second start")),
    "started without a fencing token": _b(
        _no_token, ("started", "malformed: fencing_token"),
        ("result", "ran without quorum and lease")),
    "counted vote missing": _b(
        _unknown_vote, ("decision", "is not a vote on this repair in the stream"),
        ("started", "not a valid quorum")),
    "decision lists the wrong approvals": _b(
        _lying_decision, ("decision", "lists approvals ['alexa', 'otto', 'riven', 'vera']")),
    "control signed by a persona": _b(
        _control_by_persona, ("control", "unknown-sender: no key configured for 'otto'")),
    "destructive result without a start": _b(
        _ran_alone, ("result", "k8s.node.cordon reported succeeded without a start"),
        ("drain", "k8s.node.drain reported succeeded without a start")),
}


@pytest.mark.parametrize("name", BREAKS)
def test_every_break_is_reported_against_its_message(name: str) -> None:
    history, named = BREAKS[name].build()
    ids_of = {label: v if isinstance(v, str) else v.id for label, v in named.items()}
    violations = check(history)
    found = {(v.message, v.reason) for v in violations}
    for label, fragment in BREAKS[name].expected:
        assert any(m == ids_of[label] and fragment in r for m, r in found), (
            f"{label} {ids_of[label]}: no {fragment!r} in {violations}")
    assert {m for m, _ in found} == {ids_of[label] for label, _ in BREAKS[name].expected}, (
        "nothing sound may be reported")
    assert all(v.repair == history.repair for v in violations if v.repair != "-")


@given(st.data())
def test_any_changed_byte_of_a_sound_history_is_reported(data: st.DataObject) -> None:
    history, _ = sound()
    index = data.draw(st.integers(0, len(history.stored) - 1), label="message")
    original = history.stored[index]
    # Outside the signature itself: base64 leaves a few spare bits in its last
    # character, so some edits there decode to the very same (valid) signature.
    signed_part = original.data.index(b'"sig":')
    at = data.draw(st.integers(0, signed_part - 1), label="byte")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original.data[at]))
    changed = original.data[:at] + bytes([byte]) + original.data[at + 1:]
    history.stored[index] = Stored(original.seq, original.subject, changed)
    assert check(history) != []


def test_violations_come_in_stream_order_with_the_sequence() -> None:
    history, named = BREAKS["forged vote signature"].build()
    violations = check(history)
    assert [v.seq for v in violations] == sorted(v.seq for v in violations)
    first = violations[0]
    assert str(first) == (f"repair {history.repair} message {named['vote']} (seq 2): "
                          f"{first.reason}")


def test_a_message_with_no_readable_id_is_named_by_its_sequence() -> None:
    h = History()
    h.raw(f"zeta.repair.{h.repair}.proposed", b"{garbage")
    (violation,) = check(h)
    assert (violation.repair, violation.message) == (h.repair, "seq 1")
    assert violation.reason.startswith("not-json")


# ---------------------------------------------------------------- the command on a real bus


async def _publish(url: str, envelopes: Sequence[Envelope], *, create: bool = True) -> None:
    connection = Connection([url], name="test", seed=None)
    await connection.connect()
    try:
        if create:
            assert await ensure(connection.js, Settings()) == []
        for envelope in envelopes:
            await connection.publish(subject_for(envelope), envelope)
    finally:
        await connection.close()


def _closed_port() -> int:
    return free_ports(1)[0]


@pytest.mark.slow
def test_audit_lists_summarises_and_verifies_a_real_stream(
        bare_nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keyed = keyed_config(tmp_path / "config", bare_nats_server.url)
    config = ["--config-dir", str(keyed.config_dir)]
    assert main(["audit", *config]) == 2
    assert "has no ZETA_AUDIT stream" in capsys.readouterr().err

    story = tools.story(keyed.signers, start=datetime.now(UTC))
    good = next(e.repair for _, e in story if e.repair)
    broken = History(repair=ids.new_id(), signers=keyed.signers)
    broken.propose(seconds=10)
    broken.vote("alexa", seconds=11)
    started = broken.start(seconds=12)
    asyncio.run(_publish(bare_nats_server.url, [e for _, e in story] + broken.sent))

    assert main(["audit", *config]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["REPAIR", "ACTION", "TARGET", "PROPOSER", "DECISION", "EXECUTOR",
                              "RESULT"]
    assert out[1].split() == [good, "k8s.node.cordon", "node.worker-1", "otto", "approved",
                              "otto", "succeeded"]
    assert out[2].split() == [broken.repair, "k8s.node.cordon", "node.worker-1", "otto", "-",
                              "otto", "-"]
    assert out[3].endswith("oncall (operator) freeze: investigating worker-1 hardware; "
                           "no repairs until thawed")

    assert main(["audit", "--repair", good, "--json", *config]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    audited = [(s, e) for s, e in story if e.repair == good]
    assert [(r["seq"], r["subject"], r["envelope"]) for r in records] == [
        (n, s, json.loads(e.to_bytes())) for n, (s, e) in enumerate(audited, 1)]

    assert main(["audit", "--repair", good, *config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == [e.kind for _, e in audited]

    assert main(["audit", "verify", *config]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"repair {broken.repair} message {started.id} (seq 10): started without a decision"]
    assert captured.err == "1 violation(s): 10 messages checked\n"

    assert main(["audit", "verify", "--json", *config]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "seq": 10, "repair": broken.repair, "message": started.id,
        "reason": "started without a decision"}

    assert main(["audit", "verify", "--repair", good, *config]) == 0
    assert capsys.readouterr().err == "ok: 6 messages checked\n"

    assert main(["audit", "--repair", ids.new_id(), *config]) == 1
    assert "no messages of repair" in capsys.readouterr().err
    assert main(["audit", "--repair", "*", *config]) == 2
    assert "'*' is not a repair id" in capsys.readouterr().err


def test_audit_gives_up_on_an_unreachable_bus(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    assert main(["audit", "--config-dir", str(config_copy), "--bus", url,
                 "--timeout", "0.3"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"zeta-agent: cannot reach the bus at {url} within 0.3s (is it running, and is "
        "the address right?)")


# ---------------------------------------------------------------- a proposer's own rule


def _loose_history(quorum: QuorumRule, *, destructive: bool = True,
                   required: Required | None = REQUIRED) -> History:
    """A repair proposed under ``quorum`` by a proposer holding only its own key, approved
    by voters (as voters that did not hold the rule against the policy would), executed."""
    h = History()
    h.add("proposal", "otto", Proposal(
        action="k8s.node.cordon", target=TARGET, policy="node-not-ready",
        policy_digest="d" * 64, step=1, destructive=destructive, summary="worker-1 NotReady",
        quorum=quorum), 1)
    votes = [h.add("vote", v, Vote(verdict="approve", reason="ok", observed_at=at(2),
                                   policy_digest="d" * 64, required=required), 2)
             for v in ("alexa", "vera")]
    h.decide(votes)
    h.start()
    h.result()
    return h


@pytest.mark.parametrize(("quorum", "destructive", "flagged"), [
    (QuorumRule(approvals=3, veto=(), deadline=at(31)), True, "drops the veto of riven"),
    (QuorumRule(approvals=2, veto=("riven",), deadline=at(31)), True, "asks 2 approvals"),
    (QuorumRule(approvals=3, veto=("riven",), deadline=at(3600)), True, "deadline 3599s"),
    (QuorumRule(approvals=3, veto=("riven",), deadline=at(31)), False, "non-destructive"),
])
def test_an_execution_under_a_rule_looser_than_the_policy_is_flagged(
        quorum: QuorumRule, destructive: bool, flagged: str) -> None:
    violations = check(_loose_history(quorum, destructive=destructive))
    reasons = [v.reason for v in violations]
    assert any("looser than the policy's" in r and flagged in r for r in reasons), reasons
    assert any("not a valid quorum" in r for r in reasons), reasons


def test_a_rule_nobody_can_check_is_flagged() -> None:
    """No vote recorded the terms and the policy at that digest is unknown here: the
    proposer alone wrote the rule, which is no evidence at all."""
    history = _loose_history(QuorumRule(approvals=3, veto=("riven",), deadline=at(31)),
                             required=None)
    assert any("cannot be checked" in v.reason for v in check(history))


def test_the_policy_in_configuration_checks_the_rule_at_its_digest() -> None:
    from runtime.config.loading import config_paths, load
    from runtime.core.engine import policy_digest
    from runtime.model.formats import DEFAULT_FLEET
    from tests.conftest import REPO

    policy = load(config_paths(REPO)).policies["node-not-ready"].value
    h = History()
    h.add("proposal", "otto", Proposal(
        action="k8s.node.cordon", target=TARGET, policy="node-not-ready",
        policy_digest=policy_digest(policy), step=0, destructive=True, summary="NotReady",
        quorum=QuorumRule(approvals=3, veto=(), deadline=at(31))), 1)
    votes = [h.add("vote", v, Vote(verdict="approve", reason="ok", observed_at=at(2),
                                   policy_digest=policy_digest(policy)), 2)
             for v in ("alexa", "vera")]
    h.decide(votes)
    h.start()
    violations = verify(h.stored, KEYS, OPERATORS, VOTERS, policies={policy.name: policy},
                        default_quorum=DEFAULT_FLEET.spec.quorum)
    assert any("drops the veto of riven" in v.reason for v in violations), violations


def test_a_start_while_a_verified_freeze_was_in_force_is_flagged() -> None:
    h = History()
    h.add("control", "oncall", Control(verb="thaw", reason="old thaw"), 0.5)
    h.add("control", "oncall", Control(verb="freeze", reason="change window"), 0.8)
    votes = [h.vote("alexa"), h.vote("riven", seconds=2.5)]
    h.decide(votes)
    h.start()
    # A replay of the old thaw stored later changes nothing: order is by signed time.
    h.raw(subjects.control("thaw"), h.sent[0].to_bytes())
    reasons = [v.reason for v in check(h)]
    assert any("started while the fleet was frozen ('change window')" in r
               for r in reasons), reasons
