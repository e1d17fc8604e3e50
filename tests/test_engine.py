"""The policy engine with a fake clock: ``for:``, ladders, verify, budgets, breakers, holds.

Every time is explicit (``snapshot(t)`` is ``t`` seconds after T0); nothing sleeps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.messages import Target
from runtime.config.loading import load
from runtime.core.authorizing import authorize
from runtime.core.engine import (
    BreakerReset,
    BreakerTripped,
    Evaluation,
    FindingCleared,
    FindingOpened,
    Intent,
    IntentReportError,
    LadderExhausted,
    PolicyEngine,
    RepairVerified,
    StepFailed,
    policy_digest,
)
from runtime.model.catalog import UnitParams, lookup
from runtime.model.formats import DEFAULT_FLEET, Quorum, RepairPolicy
from runtime.model.snapshot import NodeObs
from tests.builders import (
    HOST,
    at,
    deployment,
    lease,
    node,
    peer,
    pod,
    policy,
    probe,
    snapshot,
    unit,
)

REPO = Path(__file__).resolve().parents[1]
N1 = Target(kind="node", name="n1")
KUBELET_START = {"action": "host.unit.start", "params": {"unit": "kubelet.service"},
                 "verify": {"within": "60s", "expect": "node-ready"}}
CORDON = {"action": "k8s.node.cordon", "verify": {"within": "30s", "expect": "finding-cleared"}}
DRAIN = {"action": "k8s.node.drain"}
ESCALATE = {"action": "bus.escalate", "params": {"message": "help"}}


def node_policy(remedies: Sequence[dict[str, Any]] = (KUBELET_START, CORDON, DRAIN), *,
                for_: str = "2m", budget: dict[str, Any] | None = None, cooldown: str = "10m",
                mode: str = "enforce", name: str = "node-not-ready") -> RepairPolicy:
    # A roomy budget (attempts included): these tests are about one rule at a time.
    return policy(name, {"kind": "node-condition", "for": for_}, remedies,
                  budget=budget or {"maxInFlight": 5, "perHour": 50, "maxAttempts": 50},
                  cooldown=cooldown, mode=mode)


def world(t: float, *not_ready: str, ready: Sequence[str] = (), host: str = HOST,
          **domains: Any) -> Any:
    """A snapshot with nodes ``not_ready`` NotReady and ``ready`` Ready."""
    nodes = [node(n, "False") for n in not_ready] + [node(n) for n in ready]
    return snapshot(t, host=host, nodes=nodes, **domains)


def of_type(evaluation: Evaluation, kind: type[Any]) -> list[Any]:
    return [e for e in evaluation.events if isinstance(e, kind)]


def only_intent(evaluation: Evaluation) -> Intent:
    assert len(evaluation.intents) == 1, evaluation
    return evaluation.intents[0]


def open_ladder(engine: PolicyEngine, t: float = 120, *not_ready: str) -> Intent:
    """Evaluate until the finding on n1 (and ``not_ready``) opens; return step 0's intent."""
    engine.evaluate(world(0, "n1", *not_ready))
    return only_intent(engine.evaluate(world(t, "n1", *not_ready)))


# ---------------------------------------------------------------- for: and findings


def test_a_finding_opens_only_once_the_condition_held_for_its_duration() -> None:
    engine = PolicyEngine([node_policy()])
    for t in (0, 60, 119):
        evaluation = engine.evaluate(world(t, "n1"))
        assert evaluation.findings == ()
        assert evaluation.intents == ()
    evaluation = engine.evaluate(world(120, "n1"))
    [opened] = of_type(evaluation, FindingOpened)
    assert opened.at == at(120)
    assert opened.finding.since == at(0)
    assert opened.finding.target == N1
    assert opened.finding.policy == "node-not-ready"
    assert "Ready=False" in opened.finding.summary
    assert evaluation.findings == (opened.finding,)
    assert of_type(engine.evaluate(world(180, "n1")), FindingOpened) == []


def test_a_finding_clears_when_the_condition_stops() -> None:
    engine = PolicyEngine([node_policy(for_="0s")])
    engine.evaluate(world(0, "n1"))
    evaluation = engine.evaluate(world(10, ready=["n1"]))
    [cleared] = of_type(evaluation, FindingCleared)
    assert cleared.finding.target == N1
    assert cleared.at == at(10)
    assert evaluation.findings == ()


def test_a_break_in_the_condition_restarts_the_run() -> None:
    engine = PolicyEngine([node_policy()])
    engine.evaluate(world(0, "n1"))
    engine.evaluate(world(60, ready=["n1"]))
    engine.evaluate(world(90, "n1"))
    assert engine.evaluate(world(180, "n1")).findings == ()  # 90s into the new run
    [opened] = of_type(engine.evaluate(world(210, "n1")), FindingOpened)
    assert opened.finding.since == at(90)


def test_an_unknown_detection_neither_clears_nor_breaks_nor_opens() -> None:
    engine = PolicyEngine([node_policy()])
    engine.evaluate(world(0, "n1"))
    unseen = engine.evaluate(snapshot(130))  # nodes not observed, past `for`
    assert unseen.events == ()
    assert unseen.findings == ()
    opened = engine.evaluate(world(140, "n1"))
    assert [e.finding.since for e in of_type(opened, FindingOpened)] == [at(0)]
    still = engine.evaluate(snapshot(150))
    assert still.events == ()
    assert [f.target for f in still.findings] == [N1]


def test_for_zero_opens_on_the_first_matching_snapshot() -> None:
    engine = PolicyEngine([node_policy(for_="0s")])
    evaluation = engine.evaluate(world(0, "n1"))
    assert len(of_type(evaluation, FindingOpened)) == 1
    assert only_intent(evaluation).step == 0


def test_findings_follow_each_target_separately() -> None:
    engine = PolicyEngine([node_policy(for_="1m")])
    engine.evaluate(world(0, "n1", ready=["n2"]))
    engine.evaluate(world(30, "n1", "n2"))
    assert {f.target.name for f in engine.evaluate(world(60, "n1", "n2")).findings} == {"n1"}
    assert {f.target.name for f in engine.evaluate(world(90, "n1", "n2")).findings} == {"n1", "n2"}


# ---------------------------------------------------------------- the ladder


def test_step_zero_is_offered_once_until_answered() -> None:
    engine = PolicyEngine([node_policy()])
    intent = open_ladder(engine)
    assert intent.step == 0
    assert intent.action is lookup("host.unit.start")
    for t in (135, 150, 600):
        assert engine.evaluate(world(t, "n1")).intents == ()


def test_a_verified_repair_ends_the_ladder_and_starts_the_cooldown() -> None:
    engine = PolicyEngine([node_policy(cooldown="10m")])
    intent = open_ladder(engine)
    engine.started(intent.id, at(121))
    engine.finished(intent.id, at(130), ok=True)
    # A snapshot taken at the finish may predate the action: it verifies nothing,
    # though the finding clears on it and the repair stays in flight.
    early = engine.evaluate(world(130, ready=["n1"]))
    assert of_type(early, RepairVerified) == []
    assert len(of_type(early, FindingCleared)) == 1
    assert engine.status().in_flight == 1
    evaluation = engine.evaluate(world(150, ready=["n1"]))
    [verified] = of_type(evaluation, RepairVerified)
    assert verified.intent == intent
    assert verified.at == at(150)
    assert engine.status().in_flight == 0
    # It comes back at once, but the target is cooling down until 150 + 10m.
    engine.evaluate(world(160, "n1"))
    assert engine.evaluate(world(749, "n1")).intents == ()
    again = only_intent(engine.evaluate(world(750, "n1")))
    assert again.step == 0
    assert again.id != intent.id


def test_after_the_cooldown_a_still_open_finding_restarts_the_ladder() -> None:
    unit_start = {"action": "host.unit.start", "params": {"unit": "kubelet.service"},
                  "verify": {"within": "60s", "expect": "unit-active"}}
    engine = PolicyEngine([node_policy([unit_start, CORDON], for_="0s", cooldown="5m")])
    # Units are read on this host, so the agent runs on n1 itself.
    first = only_intent(engine.evaluate(world(0, "n1", host="n1", units=[unit("kubelet.service",
                                                                              "failed")])))
    assert first.target == Target(kind="unit", name="kubelet.service", host="n1")
    engine.finished(first.id, at(5), ok=True)
    verified = engine.evaluate(world(10, "n1", host="n1", units=[unit("kubelet.service")]))
    assert len(of_type(verified, RepairVerified)) == 1
    assert [f.target for f in verified.findings] == [N1]  # the node is still NotReady
    assert engine.evaluate(world(309, "n1", host="n1", units=[])).intents == ()
    restarted = only_intent(engine.evaluate(world(310, "n1", host="n1", units=[])))
    assert restarted.step == 0


def test_verify_not_met_in_time_offers_the_next_step_in_the_same_evaluation() -> None:
    engine = PolicyEngine([node_policy()])
    intent = open_ladder(engine)
    engine.started(intent.id, at(121))
    engine.finished(intent.id, at(130), ok=True)
    for t in (150, 189):
        evaluation = engine.evaluate(world(t, "n1"))
        assert evaluation.intents == ()
        assert evaluation.events == ()
    evaluation = engine.evaluate(world(190, "n1"))
    [failed] = of_type(evaluation, StepFailed)
    assert failed.intent == intent
    assert "node-ready not met within 1m" in failed.reason
    cordon = only_intent(evaluation)
    assert cordon.step == 1
    assert cordon.action is lookup("k8s.node.cordon")
    assert cordon.target == N1


def test_a_late_first_look_still_verifies_a_repair_that_worked() -> None:
    engine = PolicyEngine([node_policy()])
    intent = open_ladder(engine)
    engine.finished(intent.id, at(130), ok=True)
    evaluation = engine.evaluate(world(200, ready=["n1"]))  # deadline was 190
    assert len(of_type(evaluation, RepairVerified)) == 1
    assert of_type(evaluation, StepFailed) == []


def test_a_cleared_finding_whose_verify_times_out_gets_no_next_step() -> None:
    unit_active = {"action": "host.unit.start", "params": {"unit": "kubelet.service"},
                   "verify": {"within": "60s", "expect": "unit-active"}}
    engine = PolicyEngine([node_policy([unit_active, CORDON], for_="0s", cooldown="10m")])
    intent = only_intent(engine.evaluate(world(0, "n1")))
    engine.finished(intent.id, at(1), ok=True)
    engine.evaluate(world(2, ready=["n1"]))  # cleared while verifying
    # Units of n1 cannot be seen from this host: the verify cannot tell, and times out.
    timed_out = engine.evaluate(world(61, ready=["n1"], units=[]))
    assert [e.intent for e in of_type(timed_out, StepFailed)] == [intent]
    assert timed_out.intents == ()
    assert engine.status().in_flight == 0
    assert engine.evaluate(world(62, "n1")).intents == ()  # cooling down: the action ran
    assert only_intent(engine.evaluate(world(661, "n1"))).step == 0


def test_verify_that_cannot_tell_at_the_deadline_is_not_met() -> None:
    engine = PolicyEngine([node_policy()])
    intent = open_ladder(engine)
    engine.finished(intent.id, at(130), ok=True)
    evaluation = engine.evaluate(snapshot(190))  # nodes not observed
    assert len(of_type(evaluation, StepFailed)) == 1
    # The next step waits for fresh evidence rather than acting blind.
    assert evaluation.intents == ()
    assert [h.reason for h in evaluation.holds] == [
        "not observed this tick: no repair on stale evidence"]
    assert only_intent(engine.evaluate(world(200, "n1"))).step == 1


def test_a_failed_action_moves_to_the_next_step() -> None:
    engine = PolicyEngine([node_policy()])
    intent = open_ladder(engine)
    engine.started(intent.id, at(121))
    engine.finished(intent.id, at(125), ok=False, detail="polkit: not authorized")
    evaluation = engine.evaluate(world(135, "n1"))
    [failed] = of_type(evaluation, StepFailed)
    assert failed.reason == "action failed: polkit: not authorized"
    assert failed.at == at(125)
    assert only_intent(evaluation).step == 1


def test_an_exhausted_ladder_cools_down_then_restarts() -> None:
    engine = PolicyEngine([node_policy(cooldown="10m")])
    intent = open_ladder(engine)
    for step, t in enumerate((130, 140, 150)):
        assert intent.step == step
        engine.finished(intent.id, at(t), ok=False)
        evaluation = engine.evaluate(world(t + 1, "n1"))
        if step < 2:
            intent = only_intent(evaluation)
    [exhausted] = of_type(evaluation, LadderExhausted)
    assert exhausted.at == at(150)
    assert exhausted.cooldown_until == at(750)
    assert exhausted.finding.target == N1
    assert evaluation.intents == ()
    assert engine.evaluate(world(749, "n1")).intents == ()
    assert only_intent(engine.evaluate(world(750, "n1"))).step == 0


def test_a_remedy_without_verify_is_verified_when_its_action_succeeds() -> None:
    engine = PolicyEngine([node_policy([DRAIN, ESCALATE], for_="0s", cooldown="1m")])
    intent = only_intent(engine.evaluate(world(0, "n1")))
    engine.started(intent.id, at(1))
    engine.finished(intent.id, at(2), ok=True)
    evaluation = engine.evaluate(world(3, "n1"))
    [verified] = of_type(evaluation, RepairVerified)
    assert verified.at == at(2)
    assert evaluation.intents == ()  # cooling down, not escalating
    assert engine.status().in_flight == 0


def test_a_finding_that_clears_mid_repair_keeps_counting_until_answered() -> None:
    engine = PolicyEngine([node_policy(for_="0s", cooldown="10m",
                                       budget={"maxInFlight": 1, "perHour": 50})])
    intent = only_intent(engine.evaluate(world(0, "n1")))
    engine.started(intent.id, at(1))
    cleared = engine.evaluate(world(5, ready=["n1"]))
    assert len(of_type(cleared, FindingCleared)) == 1
    assert engine.status().in_flight == 1
    # n2 breaks meanwhile: the budget still sees n1's running repair.
    held = engine.evaluate(world(6, "n2", ready=["n1"]))
    assert held.intents == ()
    assert [h.reason for h in held.holds] == ["budget: 1/1 repairs in flight"]
    engine.finished(intent.id, at(7), ok=True)
    assert engine.status().in_flight == 1  # verifying
    freed = engine.evaluate(world(8, "n2", ready=["n1"]))
    assert [v.intent for v in of_type(freed, RepairVerified)] == [intent]
    assert only_intent(freed).finding.target.name == "n2"
    # n1's repair ran, so n1 is cooling down even though its finding had cleared.
    assert engine.evaluate(world(9, "n1", "n2")).intents == ()


def test_a_cleared_finding_gets_no_next_step() -> None:
    engine = PolicyEngine([node_policy(for_="0s", cooldown="10m")])
    failing, _ = engine.evaluate(world(0, "n1", "n2")).intents
    assert failing.finding.target == N1
    engine.evaluate(world(1, ready=["n1", "n2"]))
    engine.finished(failing.id, at(2), ok=False)
    [failed] = of_type(engine.evaluate(world(3, ready=["n1", "n2"])), StepFailed)
    assert failed.intent == failing
    assert engine.status().in_flight == 1  # n2's intent, still unanswered
    # n1's action failed: nothing changed there, so no cooldown either.
    assert [i.step for i in engine.evaluate(world(4, "n1", ready=["n2"])).intents] == [0]


def test_a_finding_that_reopens_mid_repair_carries_on_with_the_same_ladder() -> None:
    engine = PolicyEngine([node_policy(for_="0s")])
    intent = only_intent(engine.evaluate(world(0, "n1")))
    engine.started(intent.id, at(1))
    engine.evaluate(world(2, ready=["n1"]))
    reopened = engine.evaluate(world(3, "n1"))
    assert len(of_type(reopened, FindingOpened)) == 1
    assert reopened.intents == ()  # step 0 is still running
    engine.finished(intent.id, at(4), ok=False)
    assert only_intent(engine.evaluate(world(5, "n1"))).step == 1


def test_a_refused_intent_of_a_cleared_finding_is_dropped() -> None:
    engine = PolicyEngine([node_policy(for_="0s")])
    intent = only_intent(engine.evaluate(world(0, "n1")))
    engine.evaluate(world(2, ready=["n1"]))
    engine.refused(intent.id, at(3), "quorum rejected")
    assert engine.status().in_flight == 0
    # No cooldown: nothing ran.
    assert only_intent(engine.evaluate(world(4, "n1"))).step == 0


def test_reports_about_unknown_or_answered_intents_are_errors() -> None:
    engine = PolicyEngine([node_policy(for_="0s")])
    intent = only_intent(engine.evaluate(world(0, "n1")))
    with pytest.raises(IntentReportError, match="no intent"):
        engine.started("nope", at(1))
    engine.started(intent.id, at(1))
    with pytest.raises(IntentReportError, match="running"):
        engine.started(intent.id, at(2))
    with pytest.raises(IntentReportError, match="running"):
        engine.refused(intent.id, at(2), "too late")
    engine.finished(intent.id, at(3), ok=True)
    with pytest.raises(IntentReportError, match="no intent"):
        engine.finished(intent.id, at(4), ok=True)


# ---------------------------------------------------------------- refusals


def test_a_refused_intent_is_offered_again_no_sooner_than_retry_after() -> None:
    engine = PolicyEngine([node_policy()], retry_after=timedelta(seconds=90))
    intent = open_ladder(engine)
    engine.refused(intent.id, at(125), "bus down: destructive actions need a quorum")
    for t in (130, 214):
        evaluation = engine.evaluate(world(t, "n1"))
        assert evaluation.intents == ()
        [hold] = evaluation.holds
        assert hold.reason.startswith("refused: bus down: destructive actions need a quorum")
        assert hold.step == 0
        assert hold.target == N1
    again = only_intent(engine.evaluate(world(215, "n1")))
    assert again.step == 0  # the ladder stays on the refused step
    assert again.id != intent.id
    assert engine.status().in_flight == 1


def test_retry_after_defaults_to_a_minute() -> None:
    engine = PolicyEngine([node_policy()])
    intent = open_ladder(engine)
    engine.refused(intent.id, at(120), "scope denied")
    assert engine.evaluate(world(179, "n1")).intents == ()
    assert only_intent(engine.evaluate(world(180, "n1"))).step == 0


# ---------------------------------------------------------------- budgets


def test_max_in_flight_holds_the_rest() -> None:
    engine = PolicyEngine([node_policy(for_="0s", budget={"maxInFlight": 2, "perHour": 50})])
    first = engine.evaluate(world(0, "n3", "n2"))
    assert len(first.intents) == 2
    evaluation = engine.evaluate(world(10, "n3", "n1", "n2"))
    assert evaluation.intents == ()
    [hold] = evaluation.holds
    assert hold.target == N1
    assert hold.reason == "budget: 2/2 repairs in flight"
    engine.refused(first.intents[0].id, at(11), "quorum rejected")
    freed = engine.evaluate(world(12, "n3", "n1", "n2"))
    assert [i.finding.target for i in freed.intents] == [N1]


def test_budget_goes_to_the_oldest_findings_first() -> None:
    engine = PolicyEngine([node_policy(for_="30s", budget={"maxInFlight": 2, "perHour": 50})])
    engine.evaluate(world(0, "n3"))
    engine.evaluate(world(10, "n3", "n1"))
    engine.evaluate(world(20, "n3", "n1", "n2"))
    evaluation = engine.evaluate(world(60, "n1", "n2", "n3"))
    assert [i.finding.target.name for i in evaluation.intents] == ["n3", "n1"]
    assert [h.target.name for h in evaluation.holds] == ["n2"]


def test_verifying_repairs_count_as_in_flight() -> None:
    engine = PolicyEngine([node_policy(for_="0s", budget={"maxInFlight": 1, "perHour": 50})])
    intent = only_intent(engine.evaluate(world(0, "n1")))
    engine.finished(intent.id, at(1), ok=True)
    held = engine.evaluate(world(2, "n1", "n2"))
    assert held.intents == ()
    assert [h.reason for h in held.holds] == ["budget: 1/1 repairs in flight"]
    verified = engine.evaluate(world(3, "n2", ready=["n1"]))
    assert len(of_type(verified, RepairVerified)) == 1
    assert only_intent(verified).finding.target.name == "n2"


def test_per_hour_counts_starts_in_the_trailing_hour() -> None:
    engine = PolicyEngine([node_policy([DRAIN], for_="0s", cooldown="0s",
                                       budget={"maxInFlight": 5, "perHour": 2})])
    first = engine.evaluate(world(0, "n1", "n2", "n3"))
    assert len(first.intents) == 2
    [hold] = first.holds
    # Offered intents count: starting both would already spend the hour's budget.
    assert hold.reason == "budget: 2/2 repairs in the last hour"
    assert hold.target.name == "n3"
    for intent, t in zip(first.intents, (10, 20), strict=True):
        engine.started(intent.id, at(t))
        engine.finished(intent.id, at(t + 5), ok=True)
    for t in (30, 3609):
        evaluation = engine.evaluate(world(t, "n3", ready=["n1", "n2"]))
        assert evaluation.intents == ()
        assert [h.reason for h in evaluation.holds] == ["budget: 2/2 repairs in the last hour"]
    # The start at t=10 leaves the window at 3610; one start remains in it.
    freed = engine.evaluate(world(3610, "n3", ready=["n1", "n2"]))
    assert only_intent(freed).target.name == "n3"


# ---------------------------------------------------------------- breaker


def breaker_policy(remedies: Sequence[dict[str, Any]] = (CORDON, KUBELET_START)) -> RepairPolicy:
    return node_policy(remedies, for_="0s", budget={"maxInFlight": 10, "perHour": 100,
                                                    "maxUnhealthyFraction": 0.3})


def fleet(t: float, unhealthy: int, total: int = 10) -> Any:
    return world(t, *(f"n{i}" for i in range(unhealthy)),
                 ready=[f"n{i}" for i in range(unhealthy, total)])


def test_the_breaker_trips_once_and_holds_destructive_repairs() -> None:
    engine = PolicyEngine([breaker_policy()])
    evaluation = engine.evaluate(fleet(0, 4))
    [tripped] = of_type(evaluation, BreakerTripped)
    assert (tripped.matches, tripped.population) == (4, 10)
    assert tripped.fraction == pytest.approx(0.4)
    assert tripped.limit == 0.3
    assert tripped.policy == "node-not-ready"
    assert evaluation.intents == ()
    assert len(evaluation.holds) == 4
    assert all(h.reason.startswith("breaker tripped: 4/10 unhealthy (40% > 30%)")
               for h in evaluation.holds)
    later = engine.evaluate(fleet(10, 1))  # the storm passed, the breaker stays
    assert of_type(later, BreakerTripped) == []
    assert engine.breaker("node-not-ready") == tripped
    assert engine.status().breakers == ("node-not-ready",)
    assert later.intents == ()


def test_a_tripped_breaker_lets_non_destructive_repairs_through() -> None:
    engine = PolicyEngine([breaker_policy((KUBELET_START, CORDON))])
    evaluation = engine.evaluate(fleet(0, 5))
    assert len(of_type(evaluation, BreakerTripped)) == 1
    assert len(evaluation.intents) == 5
    assert not any(i.destructive for i in evaluation.intents)
    for intent in evaluation.intents:
        engine.finished(intent.id, at(1), ok=False)
    escalated = engine.evaluate(fleet(2, 5))
    assert escalated.intents == ()  # step 1 is a cordon: held
    assert {h.step for h in escalated.holds} == {1}


def test_the_breaker_stays_until_reset_and_trips_again_if_the_storm_goes_on() -> None:
    engine = PolicyEngine([breaker_policy()])
    engine.evaluate(fleet(0, 4))
    assert engine.reset_breaker("node-not-ready", by="operator:alice", at=at(5))
    assert not engine.reset_breaker("node-not-ready", by="operator:alice", at=at(6))
    evaluation = engine.evaluate(fleet(10, 4))
    [reset] = of_type(evaluation, BreakerReset)
    assert (reset.by, reset.at) == ("operator:alice", at(5))
    assert len(of_type(evaluation, BreakerTripped)) == 1
    assert evaluation.intents == ()
    engine.reset_breaker("node-not-ready", by="quorum", at=at(15))
    calm = engine.evaluate(fleet(20, 2))
    assert of_type(calm, BreakerTripped) == []
    assert len(calm.intents) == 2
    assert all(i.destructive for i in calm.intents)


def test_the_breaker_needs_a_known_non_zero_population() -> None:
    engine = PolicyEngine([breaker_policy()])
    assert of_type(engine.evaluate(snapshot(0)), BreakerTripped) == []
    assert of_type(engine.evaluate(snapshot(1, nodes=[])), BreakerTripped) == []
    assert of_type(engine.evaluate(fleet(2, 3)), BreakerTripped) == []  # 30% is not above 30%
    assert engine.breaker("node-not-ready") is None


def test_breakers_are_per_policy() -> None:
    crash = policy("pod-crashloop", {"kind": "pod-crashloop", "for": "0s", "minRestarts": 1},
                   [{"action": "k8s.workload.restart"}],
                   budget={"maxInFlight": 5, "maxUnhealthyFraction": 0.5})
    engine = PolicyEngine([breaker_policy(), crash])
    pods = [pod("web-1", owner=deployment("web"), restarts=3, crashloop=True)]
    evaluation = engine.evaluate(fleet(0, 1).model_copy(update={"pods": tuple(pods)}))
    assert [e.policy for e in of_type(evaluation, BreakerTripped)] == ["pod-crashloop"]
    assert [i.policy for i in evaluation.intents] == ["node-not-ready"]
    with pytest.raises(ValueError, match="no policy"):
        engine.reset_breaker("nope", by="x", at=at(1))


# ---------------------------------------------------------------- what an intent carries


def test_an_intent_carries_everything_the_agent_and_voters_need() -> None:
    node_not_ready = node_policy()
    engine = PolicyEngine([node_not_ready])
    intent = open_ladder(engine)
    assert intent.id == "node-not-ready:node.n1:0:1"
    assert intent.policy == "node-not-ready"
    assert intent.policy_digest == policy_digest(node_not_ready)
    assert intent.remedy == node_not_ready.spec.remedies[0]
    assert intent.params == UnitParams(unit="kubelet.service")
    assert intent.target == Target(kind="unit", name="kubelet.service", host="n1")
    assert intent.finding.target == N1
    assert intent.finding.since == at(0)
    assert intent.offered_at == at(120)
    assert not intent.destructive
    assert intent.quorum is None
    assert not intent.dry_run


def test_quorum_is_the_remedy_s_or_the_fleet_default_for_destructive_actions() -> None:
    strict = Quorum(approvals=4, veto=("riven",), deadline=timedelta(seconds=45))
    fleet_default = Quorum(approvals=3, deadline=timedelta(seconds=20))
    remedies: list[dict[str, Any]] = [
        {"action": "k8s.node.cordon", "quorum": {"approvals": 4, "veto": ["riven"],
                                                 "deadline": "45s"}},
        {"action": "k8s.node.drain"},
        {"action": "bus.escalate"},
        {"action": "k8s.node.uncordon", "destructive": True},
        {"action": "k8s.node.uncordon", "quorum": {"approvals": 2}},
    ]
    engine = PolicyEngine([node_policy(remedies, for_="0s")], default_quorum=fleet_default)
    seen: list[tuple[bool, Quorum | None]] = []
    evaluation = engine.evaluate(world(0, "n1"))
    for t in range(1, 6):
        intent = only_intent(evaluation)
        seen.append((intent.destructive, intent.quorum))
        engine.finished(intent.id, at(t), ok=False)
        evaluation = engine.evaluate(world(t, "n1"))
    assert seen == [
        (True, strict),
        (True, fleet_default),
        (False, None),
        (True, fleet_default),  # a policy may make an action destructive
        (False, Quorum(approvals=2)),
    ]


def test_the_default_quorum_is_the_default_fleet_s() -> None:
    engine = PolicyEngine([node_policy([DRAIN], for_="0s")])
    assert only_intent(engine.evaluate(world(0, "n1"))).quorum == DEFAULT_FLEET.spec.quorum


@pytest.mark.parametrize(("mode", "dry_run"), [("dry-run", True), ("enforce", False)])
def test_dry_run_policies_mark_their_intents(mode: str, dry_run: bool) -> None:
    engine = PolicyEngine([node_policy(for_="0s", mode=mode)])
    assert only_intent(engine.evaluate(world(0, "n1"))).dry_run is dry_run


def test_intent_ids_are_unique_and_deterministic() -> None:
    def ids() -> list[str]:
        engine = PolicyEngine([node_policy(for_="0s", cooldown="0s")])
        out = []
        for t in range(8):
            evaluation = engine.evaluate(world(t, "n1", "n2"))
            for intent in evaluation.intents:
                out.append(intent.id)
                engine.finished(intent.id, at(t), ok=False)
        return out

    first = ids()
    assert len(first) == len(set(first)) > 8
    assert ids() == first


def test_a_step_that_cannot_apply_is_skipped_with_a_hold() -> None:
    crash = policy("pod-crashloop", {"kind": "pod-crashloop", "for": "0s", "minRestarts": 1},
                   [{"action": "k8s.workload.restart"}, ESCALATE])
    engine = PolicyEngine([crash])
    lone = snapshot(0, pods=[pod("lone", restarts=4, crashloop=True)])
    evaluation = engine.evaluate(lone)
    [hold] = evaluation.holds
    assert hold.step == 0
    assert hold.reason == ("step 0 skipped: k8s.workload.restart acts on "
                           "deployment/statefulset/daemonset, not on pod default/lone")
    escalate = only_intent(evaluation)
    assert escalate.step == 1
    assert escalate.target == Target(kind="pod", name="lone", namespace="default")
    assert engine.evaluate(lone.model_copy(update={"at": at(1)})).holds == ()  # said once


def test_a_ladder_of_steps_that_all_cannot_apply_is_exhausted() -> None:
    crash = policy("pod-crashloop", {"kind": "pod-crashloop", "for": "0s", "minRestarts": 1},
                   [{"action": "k8s.workload.restart"}])
    engine = PolicyEngine([crash])
    evaluation = engine.evaluate(snapshot(0, pods=[pod("lone", restarts=4, crashloop=True)]))
    assert len(evaluation.holds) == 1
    assert len(of_type(evaluation, LadderExhausted)) == 1


# ---------------------------------------------------------------- digest


def test_the_policy_digest_is_the_sha256_of_its_canonical_json() -> None:
    node_not_ready = node_policy()
    canonical = json.dumps(node_not_ready.model_dump(mode="json", by_alias=True),
                           sort_keys=True, separators=(",", ":"))
    assert policy_digest(node_not_ready) == hashlib.sha256(canonical.encode()).hexdigest()
    assert '"for":"2m"' in canonical  # by alias, durations as operators write them


def test_the_digest_ignores_spelling_and_follows_meaning() -> None:
    base = node_policy()
    assert policy_digest(base) == policy_digest(node_policy())
    # 120s and 2m are the same policy; key order in the file is not meaning either.
    respelled = policy("node-not-ready", {"for": "120s", "kind": "node-condition"},
                       [{"params": {"unit": "kubelet.service"}, "action": "host.unit.start",
                         "verify": {"expect": "node-ready", "within": "1m"}}, CORDON, DRAIN],
                       budget={"maxAttempts": 50, "perHour": 50, "maxInFlight": 5})
    assert policy_digest(respelled) == policy_digest(base)
    assert policy_digest(node_policy(for_="3m")) != policy_digest(base)
    assert policy_digest(node_policy(mode="dry-run")) != policy_digest(base)
    assert len(policy_digest(base)) == 64


# ---------------------------------------------------------------- status


def test_status_counts_findings_repairs_and_breakers() -> None:
    engine = PolicyEngine([breaker_policy((KUBELET_START,)),
                           node_policy(name="other", for_="1h")])
    assert str(engine.status()) == "0 finding(s) open, 0 repair(s) in flight"
    engine.evaluate(fleet(0, 4))
    status = engine.status()
    assert (status.open_findings, status.in_flight, status.breakers) == (4, 4, ("node-not-ready",))
    assert str(status) == ("4 finding(s) open, 4 repair(s) in flight, "
                           "breaker tripped: node-not-ready")


def test_a_policy_given_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="given twice"):
        PolicyEngine([node_policy(), node_policy()])


# ---------------------------------------------------------------- the shipped policies


def test_the_engine_runs_over_the_shipped_policies() -> None:
    config = load([REPO / "personas", REPO / "policies"])
    policies = list(config.policies.values())
    engine = PolicyEngine([p.value for p in policies],
                          default_quorum=config.fleet.spec.quorum)
    broken_node = NodeObs(name="w1", conditions=node("w1", "False").conditions)
    web = deployment("web")

    def broken(t: float) -> Any:
        return snapshot(
            t, host="w1",
            nodes=[broken_node, node("cp-1"), node("w2"), node("w3"),
                   node("w4", repair="r-old")],
            pods=[pod("web-1", owner=web, restarts=9, crashloop=True), pod("api-1")],
            apiserver=[probe("tcp", ok=False), probe("readyz", ok=False)],
            units=[unit("kubelet.service", "failed"), unit("containerd.service", "inactive")],
            peers=[peer("vera", None), peer("alexa", at(t))],
            leases=[lease("node.w9", "r-crashed", at(0))],
        )

    opened: list[FindingOpened] = []
    intents: list[Intent] = []
    for t in range(0, 901, 15):
        evaluation = engine.evaluate(broken(t))
        opened += of_type(evaluation, FindingOpened)
        intents += evaluation.intents
    assert {e.finding.policy for e in opened} == {p.value.name for p in policies}
    by_policy = {i.policy: i for i in intents}
    assert set(by_policy) == {p.value.name for p in policies}
    assert by_policy["node-not-ready"].target == Target(kind="node", name="w1")
    assert by_policy["node-not-ready"].action.name == "k8s.node.cordon"
    assert by_policy["pod-crashloop"].target == web
    assert by_policy["pod-crashloop"].quorum == Quorum(approvals=2, veto=("riven",),
                                                       deadline=timedelta(seconds=30))
    assert by_policy["stale-lease"].target == Target(kind="lease", name="node.w9")

    # Each intent's executing persona (the one running its policy with `execute`) is
    # allowed it by its own scopes, with a quorum exactly when it is destructive.
    for intent in intents:
        executors = [p.value for p in config.personas.values()
                     if intent.policy in p.value.spec.policies
                     and "execute" in p.value.spec.duties]
        assert executors, intent.policy
        verdicts = [authorize(p, intent, quorum_refusal=None) for p in executors]
        assert any(v.allowed for v in verdicts), (intent.id, verdicts)
        assert all(v.needs_quorum == (intent.quorum is not None) for v in verdicts)


# ---------------------------------------------------------------- properties


samples = st.lists(
    st.tuples(st.integers(min_value=1, max_value=90), st.sampled_from([True, False, None])),
    min_size=1, max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(samples, st.sampled_from([0, 30, 120]))
def test_open_iff_the_condition_held_for_long_enough(steps: list[tuple[int, bool | None]],
                                                     hold_for: int) -> None:
    engine = PolicyEngine([node_policy(for_=f"{hold_for}s")])
    t, run_start, is_open = 0, None, False
    for gap, condition in steps:
        t += gap
        was_open = is_open
        if condition is None:  # unknown: nothing changes
            evaluation = engine.evaluate(snapshot(t))
        elif condition:
            run_start = t if run_start is None else run_start
            is_open = t - run_start >= hold_for
            evaluation = engine.evaluate(world(t, "n1"))
        else:
            run_start, is_open = None, False
            evaluation = engine.evaluate(world(t, ready=["n1"]))
        assert bool(evaluation.findings) == is_open, (t, run_start)
        if is_open:
            assert evaluation.findings[0].since == at(run_start or 0)
        assert len(of_type(evaluation, FindingOpened)) == int(is_open and not was_open)
        assert len(of_type(evaluation, FindingCleared)) == int(was_open and not is_open)


AGENT_MOVES = st.sampled_from(["wait", "start", "ok", "fail", "refuse"])


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_budgets_and_the_breaker_hold_whatever_the_agent_does(data: st.DataObject) -> None:
    max_in_flight = data.draw(st.integers(min_value=1, max_value=3), label="maxInFlight")
    per_hour = data.draw(st.integers(min_value=1, max_value=6), label="perHour")
    remedies: list[dict[str, Any]] = [KUBELET_START, {**CORDON, "verify": {"within": "2m"}},
                                      DRAIN, ESCALATE]
    engine = PolicyEngine([node_policy(
        remedies, for_="30s", cooldown="5m",
        budget={"maxInFlight": max_in_flight, "perHour": per_hour, "maxUnhealthyFraction": 0.5},
    )], retry_after=timedelta(seconds=data.draw(st.integers(0, 120), label="retry_after")))
    names = [f"n{i}" for i in range(5)]
    outstanding: dict[str, bool] = {}  # intent id -> started
    starts: list[int] = []
    t = 0
    for _ in range(data.draw(st.integers(min_value=1, max_value=25), label="ticks")):
        t += data.draw(st.integers(min_value=1, max_value=900), label="gap")
        unhealthy = data.draw(st.sets(st.sampled_from(names)), label="unhealthy")
        if data.draw(st.booleans(), label="reset"):
            engine.reset_breaker("node-not-ready", by="operator", at=at(t))
        evaluation = engine.evaluate(world(t, *sorted(unhealthy),
                                           ready=[n for n in names if n not in unhealthy]))
        tripped = engine.breaker("node-not-ready") is not None
        if len(unhealthy) / len(names) > 0.5:
            assert tripped
        if tripped:
            assert not any(i.destructive for i in evaluation.intents)
        assert not set(outstanding) & {i.id for i in evaluation.intents}  # never re-offered
        outstanding.update((i.id, False) for i in evaluation.intents)
        assert len(outstanding) <= max_in_flight
        assert engine.status().in_flight <= max_in_flight
        for intent_id, started in list(outstanding.items()):
            move = data.draw(AGENT_MOVES, label="move")
            if move == "start" and not started:
                engine.started(intent_id, at(t + 1))
                outstanding[intent_id] = True
                starts.append(t + 1)
            elif move in ("ok", "fail"):
                if not started:
                    starts.append(t + 2)
                engine.finished(intent_id, at(t + 2), ok=move == "ok")
                del outstanding[intent_id]
            elif move == "refuse" and not started:
                engine.refused(intent_id, at(t + 2), "quorum rejected")
                del outstanding[intent_id]
        assert all(sum(1 for s in starts if 0 <= end - s < 3600) <= per_hour for end in starts)
