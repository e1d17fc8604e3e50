"""The vote as a pure function: every objection and its order, on values alone.

``runtime.core.vote`` reads no clock, bus or cluster, so each rule is stated here with
the inputs a voter would have gathered; the voter's gathering is tested in
test_quorum_attacks, test_targets and the fleet tests.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from bus.messages import EvidenceRule, Proposal, QuorumRule, Target
from runtime.core.detecting import Detection, Match
from runtime.core.engine import policy_digest
from runtime.core.review import Check
from runtime.core.vote import History, Holder, Vote, confirm, final, reviewed, screen
from runtime.model.formats import Persona, Quorum, RepairPolicy
from tests.builders import T0, at, persona, policy

DEFAULT = Quorum(approvals=2)
NODE = Target(kind="node", name="worker-1")


def cordon_policy(hold: str = "0s", **budget: Any) -> RepairPolicy:
    return policy("node-not-ready",
                  {"kind": "node-condition", "condition": "Ready", "status": ["False"],
                   "for": hold},
                  [{"action": "k8s.node.cordon",
                    "quorum": {"approvals": 3, "veto": ["riven"], "deadline": "30s"}}],
                  budget={"perHour": 3, **budget})


def proposal(rule: RepairPolicy, **changes: Any) -> Proposal:
    fields: dict[str, Any] = {
        "action": "k8s.node.cordon", "target": NODE, "policy": rule.name,
        "policy_digest": policy_digest(rule), "step": 0, "destructive": True,
        "quorum": QuorumRule(approvals=3, veto=("riven",), deadline=at(30)),
        "summary": "worker-1 NotReady"}
    return Proposal(**(fields | changes))


def proposer(scopes: tuple[str, ...] = ("k8s:nodes:cordon",)) -> Persona:
    return persona("otto", scopes=scopes)


def screened(rule: RepairPolicy | None, offer: Proposal, **changes: Any) -> Vote | None:
    inputs: dict[str, Any] = {
        "policy": rule, "proposer": proposer(), "proposer_name": "otto", "sent": T0,
        "default": DEFAULT, "frozen": None, "breaker": False, "approved_last_hour": 0}
    return screen(offer, **(inputs | changes))


def seen(*names: str, population: int | None = 10) -> Detection:
    return Detection(matches={f"node.{n}": Match(Target(kind="node", name=n), f"{n} NotReady",
                                                 {"node": n}) for n in names},
                     population=population)


def confirmed(rule: RepairPolicy, detection: Detection, holder: Holder | None = None, *,
              history: History | None = None) -> Vote:
    return confirm(proposal(rule), policy=rule, holder=holder, detection=detection,
                   host="cp-2", sources={"nodes": "watch"}, now=at(5),
                   history=lambda _key: history)


def test_a_sound_proposal_passes_the_screen() -> None:
    rule = cordon_policy()
    assert screened(rule, proposal(rule)) is None


@pytest.mark.parametrize(("changes", "offer_changes", "reason"), [
    ({"policy": None}, {}, "I have no policy 'node-not-ready'"),
    ({}, {"policy_digest": "sha256:other"}, "policy drift"),
    ({}, {"step": 4}, "node-not-ready has no step 4"),
    ({}, {"action": "k8s.node.drain"}, "step 0 of node-not-ready is k8s.node.cordon"),
    ({}, {"quorum": QuorumRule(approvals=1, veto=("riven",), deadline=at(30))},
     "asks 1 approvals, the policy 3"),
    ({}, {"quorum": QuorumRule(approvals=3, deadline=at(30))}, "drops the veto of riven"),
    ({}, {"destructive": False}, "marked non-destructive"),
    ({"proposer": None}, {}, "otto is not a persona I know"),
    ({"proposer": proposer(scopes=())}, {}, "otto lacks scope k8s:nodes:cordon"),
    ({"proposer": persona("otto", scopes=("k8s:nodes:cordon",), duties=("vote",))}, {},
     "does not have the propose and execute duties"),
    ({"frozen": "maintenance"}, {}, "fleet frozen: maintenance"),
    ({"breaker": True}, {}, "breaker tripped for node-not-ready"),
    ({"approved_last_hour": 3}, {}, "budget: 3/3 repairs of node-not-ready"),
])
def test_each_objection_on_its_face(changes: dict[str, Any], offer_changes: dict[str, Any],
                                    reason: str) -> None:
    rule = cordon_policy()
    vote = screened(rule, proposal(rule, **offer_changes), **changes)
    assert vote is not None
    assert vote.verdict == "reject"
    assert reason in vote.reason


def test_the_screen_names_the_first_objection_configuration_before_fleet_state() -> None:
    """A drifted policy is reported as drift even when the fleet is also frozen: the
    operator must fix the configuration first, and thawing would not make it pass."""
    rule = cordon_policy()
    vote = screened(rule, proposal(rule, policy_digest="sha256:other"), frozen="x",
                    breaker=True, approved_last_hour=99)
    assert vote is not None
    assert vote.reason.startswith("policy drift")


def test_a_deadline_beyond_the_policys_is_looser() -> None:
    rule = cordon_policy()
    late = QuorumRule(approvals=3, veto=("riven",), deadline=T0 + timedelta(minutes=10))
    vote = screened(rule, proposal(rule, quorum=late))
    assert vote is not None
    assert "the policy allows 30s" in vote.reason


def test_a_stolen_proposer_key_cannot_drop_the_policys_evidence_paths() -> None:
    base = cordon_policy()
    remedy = {"action": "k8s.node.cordon",
              "quorum": {"approvals": 3, "veto": ["riven"], "deadline": "30s",
                         "evidence": {"distinct": 2, "requires": ["host"]}}}
    rule = base.model_copy(update={"spec": base.spec.model_copy(update={
        "remedies": (type(base.spec.remedies[0]).model_validate(remedy),)})})
    vote = screened(rule, proposal(rule))  # the proposal asks no paths at all
    assert vote is not None
    assert vote.reason == (
        "quorum rule looser than step 0 of node-not-ready: asks 1 distinct evidence paths, "
        "the policy 2; drops the required evidence path host")
    honest = QuorumRule(approvals=3, veto=("riven",), deadline=at(30),
                        evidence=EvidenceRule(distinct=2, requires=("host",)))
    assert screened(rule, proposal(rule, quorum=honest)) is None


def test_a_stricter_rule_passes() -> None:
    rule = cordon_policy()
    strict = QuorumRule(approvals=5, veto=("riven", "vera"), deadline=at(10))
    assert screened(rule, proposal(rule, quorum=strict)) is None


def test_confirm_approves_what_the_voter_sees_with_its_evidence() -> None:
    rule = cordon_policy()
    vote = confirmed(rule, seen("worker-1"))
    assert vote.verdict == "approve"
    assert vote.reason == "confirmed from cp-2: worker-1 NotReady"
    assert vote.evidence == {"observed_at": at(5).isoformat(), "host": "cp-2",
                             "node": "worker-1"}


def test_a_leased_target_is_rejected_before_anything_else() -> None:
    rule = cordon_policy()
    vote = confirmed(rule, seen("worker-1"), Holder(repair="r-7", executor="alexa"))
    assert (vote.verdict, vote.reason) == (
        "reject", "node.worker-1 is leased by repair r-7 (alexa)")


def test_an_unobserved_domain_is_not_confirmation() -> None:
    rule = cordon_policy()
    vote = confirmed(rule, seen(population=None))
    assert vote.verdict == "reject"
    assert "cannot observe" in vote.reason
    assert vote.evidence == {"sources": {"nodes": "watch"}}


def test_a_target_the_voter_does_not_see_broken_is_rejected() -> None:
    rule = cordon_policy()
    vote = confirmed(rule, seen("worker-2"))
    assert vote.verdict == "reject"
    assert vote.reason == ("I do not see node-condition behind k8s.node.cordon on "
                           "node.worker-1 from cp-2")


def test_blast_radius_is_judged_on_the_voters_own_population() -> None:
    rule = cordon_policy(maxUnhealthyFraction=0.3)
    assert confirmed(rule, seen("worker-1", "worker-2", "worker-3")).verdict == "approve"
    vote = confirmed(rule, seen("worker-1", "worker-2", "worker-3", "worker-4"))
    assert (vote.verdict, vote.reason) == ("reject", "blast radius: 4/10 unhealthy > 30%")


def test_final_makes_a_veto_holders_objection_a_block_and_attaches_the_terms() -> None:
    rule = cordon_policy()
    offer = proposal(rule)
    objection = Vote("reject", "breaker tripped for node-not-ready")
    cast = final(objection, offer, policy=rule, veto=True, default=DEFAULT)
    assert (cast.verdict, cast.reason) == ("block", objection.reason)
    assert cast.required is not None
    assert (cast.required.approvals, cast.required.veto, cast.required.destructive) == (
        3, ("riven",), True)
    assert final(objection, offer, policy=rule, veto=False, default=DEFAULT).verdict == "reject"


def test_final_never_turns_an_approval_into_a_block() -> None:
    rule = cordon_policy()
    cast = final(Vote("approve", "seen"), proposal(rule), policy=rule, veto=True,
                 default=DEFAULT)
    assert cast.verdict == "approve"


def test_final_claims_no_terms_for_a_policy_it_does_not_hold_at_that_digest() -> None:
    rule = cordon_policy()
    drifted = proposal(rule, policy_digest="sha256:other")
    assert final(Vote("reject", "drift"), drifted, policy=rule, veto=False,
                 default=DEFAULT).required is None
    assert final(Vote("reject", "none"), proposal(rule), policy=None, veto=False,
                 default=DEFAULT).required is None


def test_a_failing_review_check_turns_an_approval_into_an_objection_naming_it() -> None:
    ok = Check("capacity", True, "fits", {"pods": 2})
    bad = Check("last-control-plane", False, "no Ready control-plane node left", {})
    approval = Vote("approve", "confirmed from cp-2: NotReady", {"node": "worker-1"})
    vote = reviewed(approval, (ok, bad))
    assert (vote.verdict, vote.reason) == (
        "reject", "review: last-control-plane: no Ready control-plane node left")
    assert vote.evidence["node"] == "worker-1"
    assert vote.evidence["checks"] == [
        {"check": "capacity", "result": "pass", "reason": "fits", "pods": 2},
        {"check": "last-control-plane", "result": "block",
         "reason": "no Ready control-plane node left"}]
    passed = reviewed(approval, (ok,))
    assert passed.verdict == "approve"
    assert passed.evidence["checks"] == [ok.evidence()]
    # An objection stays the objection it was, with the checks recorded beside it.
    objection = reviewed(Vote("reject", "blast radius"), (bad,))
    assert (objection.verdict, objection.reason) == ("reject", "blast radius")


def test_the_policys_for_is_held_against_the_voters_own_history() -> None:
    """A proposer that opens its finding early (or lies about since when) does not get
    an approval from a voter whose own snapshots have matched for less than ``for:``."""
    rule = cordon_policy("2m")
    tick = timedelta(seconds=15)
    long_enough = confirmed(rule, seen("worker-1"), history=History(at(5 - 120), tick))
    assert long_enough.verdict == "approve"
    assert long_enough.evidence["held_for_s"] == 120.0
    # One tick short still passes: two observers' starts differ by up to a tick.
    assert confirmed(rule, seen("worker-1"),
                     history=History(at(5 - 106), tick)).verdict == "approve"
    short = confirmed(rule, seen("worker-1"), history=History(at(5 - 30), tick))
    assert (short.verdict, short.reason) == (
        "reject", "I have seen node-condition on node.worker-1 for 30s, not the policy's "
                  "for: 2m")
    never = confirmed(rule, seen("worker-1"), history=History(None, tick))
    assert never.verdict == "reject"
    assert "for 0s" in never.reason


def test_a_voter_that_keeps_no_history_of_the_policy_says_so() -> None:
    vote = confirmed(cordon_policy("2m"), seen("worker-1"), history=None)
    assert vote.verdict == "approve"
    assert vote.evidence["held_for"] == "no history: I do not run this policy"
