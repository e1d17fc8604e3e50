"""Loop guards: a target that never heals, a repair that does not stay healthy, and the
undoing of repairs that no pause, breaker or budget may hold (docs/safety.md).

The engine with a fake clock, as in test_engine; the vote and the bus link's refusal
for compensations on values.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from bus.connection import Connection
from bus.messages import Control, Proposal, QuorumRule, Target
from bus.natstypes import KeyValue
from runtime.agent.link import BusView, FreezeState
from runtime.config.loading import config_paths, load
from runtime.core import vote
from runtime.core.engine import (
    Evaluation,
    Hold,
    Intent,
    PolicyEngine,
    RepairVerified,
    StepFailed,
    policy_digest,
)
from runtime.model.formats import Quorum, RepairPolicy
from tests.builders import T0, at, node, policy, snapshot
from tests.conftest import REPO

CORDON = {"action": "k8s.node.cordon"}
RESTART = {"action": "host.unit.restart", "params": {"unit": "kubelet.service"}}


def node_policy(remedies: list[dict[str, Any]], **budget: Any) -> RepairPolicy:
    return policy("node-not-ready", {"kind": "node-condition", "for": "0s"}, remedies,
                  budget={"maxInFlight": 5, "perHour": 100, **budget}, cooldown="0s")


def broken(t: float) -> Any:
    return snapshot(t, nodes=[node("n1", "False"), *(node(f"w{i}") for i in range(9))])


def healed(t: float) -> Any:
    return snapshot(t, nodes=[node("n1"), *(node(f"w{i}") for i in range(9))])


def holds(evaluation: Evaluation) -> list[Hold]:
    return list(evaluation.holds)


# ---------------------------------------------------------------- maxAttempts


@given(st.integers(min_value=1, max_value=6))
def test_a_target_that_never_heals_gets_exactly_max_attempts_then_one_escalation(
        limit: int) -> None:
    engine = PolicyEngine([node_policy([CORDON, RESTART], maxAttempts=limit,
                                       attemptsWindow="1h")])
    actions: list[Intent] = []
    escalations: list[Intent] = []
    for t in range(0, 40 * 60, 60):  # 40 minutes of ticks, a repair answered every tick
        for intent in engine.evaluate(broken(t)).intents:
            (escalations if intent.guard else actions).append(intent)
            engine.started(intent.id, at(t))
            engine.finished(intent.id, at(t), ok=intent.action.name == "bus.escalate")
    assert len(actions) == limit
    assert len(escalations) == 1
    [escalation] = escalations
    assert escalation.action.name == "bus.escalate"
    assert escalation.quorum is None
    assert f"{limit} repair attempts on node.n1 within 1h" in escalation.guard
    assert escalation.params.model_dump()["message"] == escalation.guard


def test_the_target_is_held_with_the_reason_then_repaired_again_once_the_window_passes() -> None:
    engine = PolicyEngine([node_policy([CORDON], maxAttempts=2, attemptsWindow="30m")])

    def answer(t: float) -> list[Intent]:
        evaluation = engine.evaluate(broken(t))
        for intent in evaluation.intents:
            engine.started(intent.id, at(t))
            engine.finished(intent.id, at(t), ok=False)
        return list(evaluation.intents)

    assert [i.guard for i in answer(0) + answer(60)] == ["", ""]
    [escalation] = answer(120)
    assert escalation.guard
    evaluation = engine.evaluate(broken(180))
    assert evaluation.intents == ()
    [held] = holds(evaluation)
    assert held.reason.startswith("2 repair attempts on node.n1 within 30m")
    assert "escalated at" in held.reason
    # 30 minutes after the first attempt it has left the window: one more try.
    [retry] = answer(30 * 60 + 1)
    assert retry.action.name == "k8s.node.cordon"
    assert not retry.guard


def test_attempts_count_across_ladders_and_escalations_are_not_attempts() -> None:
    engine = PolicyEngine([node_policy([CORDON, {"action": "bus.escalate"}], maxAttempts=2)])
    seen = []
    for t in range(0, 600, 60):
        for intent in engine.evaluate(broken(t)).intents:
            seen.append((intent.action.name, bool(intent.guard)))
            engine.started(intent.id, at(t))
            engine.finished(intent.id, at(t), ok=intent.action.name == "bus.escalate")
    assert seen == [("k8s.node.cordon", False), ("bus.escalate", False),
                    ("k8s.node.cordon", False), ("bus.escalate", True)]


# ---------------------------------------------------------------- verify healthyFor


def verifying(healthy_for: str) -> tuple[PolicyEngine, Intent]:
    engine = PolicyEngine([node_policy([{
        "action": "k8s.node.cordon",
        "verify": {"within": "2m", "expect": "node-ready", "healthyFor": healthy_for}},
        CORDON])])
    [intent] = engine.evaluate(broken(0)).intents
    engine.started(intent.id, at(0))
    engine.finished(intent.id, at(1), ok=True)
    return engine, intent


def test_a_repair_counts_only_once_it_stayed_healthy_for_healthy_for() -> None:
    engine, _ = verifying("3m")
    verified: list[RepairVerified] = []
    for t in range(60, 5 * 60, 60):
        evaluation = engine.evaluate(healed(t))
        verified += [e for e in evaluation.events if isinstance(e, RepairVerified)]
        assert evaluation.intents == ()
    assert [e.at for e in verified] == [at(240)]  # healthy from 60 s, for 3 minutes


def test_a_relapse_past_the_deadline_fails_the_step() -> None:
    engine, _ = verifying("3m")
    engine.evaluate(healed(60))
    engine.evaluate(healed(120))
    evaluation = engine.evaluate(broken(180))  # past within (2m), and not healthy for 3m
    [failed] = [e for e in evaluation.events if isinstance(e, StepFailed)]
    assert failed.reason == "verify: node-ready held, then not for 3m"
    # The finding had cleared while the step was verifying, so that ladder ends; the
    # relapse is a finding of its own, repaired from step 0 (and counted as an attempt).
    assert [i.step for i in evaluation.intents] == [0]


def test_a_relapse_before_the_deadline_restarts_the_count() -> None:
    engine, _ = verifying("2m")
    engine.evaluate(healed(30))
    assert not [e for e in engine.evaluate(broken(60)).events if isinstance(e, StepFailed)]
    events = [e for t in (90, 150, 210) for e in engine.evaluate(healed(t)).events]
    # Counted from 90 s, not 30 s: verified at 210 s, not at 150 s.
    assert [(type(e), e.at) for e in events if isinstance(e, RepairVerified | StepFailed)] == [
        (RepairVerified, at(210))]


def test_without_healthy_for_a_met_expectation_verifies_at_once() -> None:
    engine, _ = verifying("0s")
    assert RepairVerified in [type(e) for e in engine.evaluate(healed(30)).events]


# ---------------------------------------------------------------- compensations


def test_a_tripped_breaker_holds_the_cordon_but_not_the_uncordon() -> None:
    uncordon = {"action": "k8s.node.uncordon", "destructive": True}
    engine = PolicyEngine([
        node_policy([CORDON], maxUnhealthyFraction=0.3),
        policy("undo", {"kind": "node-condition", "for": "0s"}, [uncordon],
               budget={"maxUnhealthyFraction": 0.3}),
    ])
    storm = snapshot(0, nodes=[node(f"n{i}", "False") for i in range(5)])
    evaluation = engine.evaluate(storm)
    assert engine.breaker("node-not-ready") is not None
    assert engine.breaker("undo") is not None
    assert {i.action.name for i in evaluation.intents} == {"k8s.node.uncordon"}
    assert all("breaker tripped" in h.reason for h in evaluation.holds
               if h.policy == "node-not-ready")


def test_a_full_budget_does_not_hold_an_uncordon() -> None:
    engine = PolicyEngine([policy("undo", {"kind": "node-condition", "for": "0s"},
                                  [{"action": "k8s.node.uncordon"}],
                                  budget={"maxInFlight": 1, "perHour": 1})])
    world = snapshot(0, nodes=[node("n1", "False"), node("n2", "False")])
    assert len(engine.evaluate(world).intents) == 2


def release_proposal(config_digest: str) -> Proposal:
    return Proposal(action="bus.lease.release", target=Target(kind="lease", name="node.n1"),
                    policy="stale-lease", policy_digest=config_digest, step=0,
                    destructive=True, summary="expired",
                    quorum=QuorumRule(approvals=2, veto=("riven",), deadline=at(30)))


def test_voters_approve_a_lease_release_through_a_freeze_a_breaker_and_a_spent_budget() -> None:
    config = load(config_paths(REPO))
    stale = config.policies["stale-lease"].value
    lior = config.persona("lior")

    def screened(proposal: Proposal) -> vote.Vote | None:
        return vote.screen(proposal, policy=stale, proposer=lior, proposer_name="lior",
                           sent=T0, default=Quorum(approvals=2), frozen="maintenance",
                           breaker=True, approved_last_hour=99)

    assert screened(release_proposal(policy_digest(stale))) is None
    # The freeze still stops everything that is not a compensation.
    drifted = release_proposal(policy_digest(stale)).model_copy(
        update={"action": "bus.escalate"})
    objection = screened(drifted)
    assert objection is not None
    assert objection.verdict == "reject"


class _Up(Connection):
    """A connection that says it is up: the view's state is what the test sets."""

    @property
    def connected(self) -> bool:
        return True


def test_the_bus_link_refuses_repairs_but_not_compensations_while_frozen() -> None:
    view = BusView(_Up(["nats://127.0.0.1:1"], name="t", seed=None), persona="lior",
                   personas=load(config_paths(REPO)).personas, lease_ttl=timedelta(minutes=5))
    view.kv = cast(KeyValue, object())
    view.freeze = FreezeState(control=Control(verb="freeze", reason="maintenance"), at=T0)
    assert view.refusal() == "fleet frozen by 'maintenance'"
    assert view.refusal(compensation=True) is None
    view.jetstream_error = "no meta leader"
    # Without JetStream no vote or lease can be stored: a compensation waits too.
    assert view.refusal(compensation=True) == (
        "bus connected but JetStream is not answering: no meta leader")
