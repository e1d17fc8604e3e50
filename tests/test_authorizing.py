"""Authorization tries to be broken: missing scopes, near-miss wildcards, bus down, frozen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.messages import Target
from runtime.core.authorizing import Verdict, authorize
from runtime.core.engine import Intent, PolicyEngine
from runtime.model.formats import Persona
from runtime.model.scopes import allows
from tests.builders import deployment, node, peer, persona, pod, policy, snapshot

EXECUTOR_DUTIES = ("propose", "vote", "execute")


def intent_for(remedy: dict[str, Any], *, detect: dict[str, Any] | None = None,
               **domains: Any) -> Intent:
    """The step-0 intent of a one-remedy policy over a world where its finding is open."""
    detect = detect or {"kind": "node-condition", "for": "0s"}
    engine = PolicyEngine([policy("p", detect, [remedy])])
    world = domains or {"nodes": [node("w1", "False")]}
    [intent] = engine.evaluate(snapshot(0, host="w1", **world)).intents
    return intent


START_KUBELET = intent_for({"action": "host.unit.start", "params": {"unit": "kubelet.service"}})
RESTART_KUBELET = intent_for({"action": "host.unit.restart",
                              "params": {"unit": "kubelet.service"}})
CORDON = intent_for({"action": "k8s.node.cordon"})
UNCORDON = intent_for({"action": "k8s.node.uncordon"})
UNCORDON_WITH_QUORUM = intent_for({"action": "k8s.node.uncordon", "quorum": {"approvals": 2}})
ESCALATE = intent_for({"action": "bus.escalate"})
RESTART_WEB = intent_for(
    {"action": "k8s.workload.restart"},
    detect={"kind": "pod-crashloop", "for": "0s", "minRestarts": 1},
    pods=[pod("web-1", owner=deployment("web"), restarts=2, crashloop=True)])


def executor(*scopes: str, tier: str = "propose",
             duties: Sequence[str] = EXECUTOR_DUTIES) -> Persona:
    return persona("otto", tier=tier, scopes=scopes, duties=duties)


def check(who: Persona, intent: Intent, *, bus: bool = True, frozen: bool = False) -> Verdict:
    """``authorize`` with the refusal the bus link gives in that state (BusView.refusal)."""
    refusal = ("bus down" if not bus else
               "fleet frozen by 'change window'" if frozen else None)
    return authorize(who, intent, quorum_refusal=refusal)


def test_the_intents_under_test_are_what_they_claim() -> None:
    assert START_KUBELET.target == Target(kind="unit", name="kubelet.service", host="w1")
    assert not START_KUBELET.destructive
    assert RESTART_KUBELET.destructive
    assert CORDON.destructive
    assert RESTART_WEB.target == deployment("web")
    assert UNCORDON_WITH_QUORUM.quorum is not None
    assert not UNCORDON_WITH_QUORUM.destructive


def test_a_granted_non_destructive_action_is_allowed_without_quorum() -> None:
    verdict = check(executor("host:units:start:kubelet.service"), START_KUBELET)
    assert verdict == Verdict(True, False, "host:units:start:kubelet.service granted")


def test_a_granted_destructive_action_is_allowed_after_a_quorum() -> None:
    verdict = check(executor("k8s:nodes:cordon"), CORDON)
    assert verdict.allowed
    assert verdict.needs_quorum
    assert "quorum" in verdict.reason


def test_the_tier_preset_counts_as_granted() -> None:
    # propose grants bus:escalate; repair-node grants every unit start.
    assert check(executor(), ESCALATE).allowed
    assert check(executor(tier="repair-node"), START_KUBELET).allowed


def test_no_execute_duty_no_action_even_with_the_scope() -> None:
    voter = executor("host:units:start:kubelet.service", duties=("vote",))
    verdict = check(voter, START_KUBELET)
    assert not verdict.allowed
    assert "does not execute" in verdict.reason


@pytest.mark.parametrize(
    ("scopes", "intent", "missing"),
    [
        ((), START_KUBELET, "host:units:start:kubelet.service"),
        # a grant on another unit, or another verb on the same unit, is no grant
        (("host:units:start:containerd.service",), START_KUBELET,
         "host:units:start:kubelet.service"),
        (("host:units:start:kubelet.service",), RESTART_KUBELET,
         "host:units:restart:kubelet.service"),
        (("k8s:nodes:uncordon",), CORDON, "k8s:nodes:cordon"),
        (("k8s:statefulsets:restart",), RESTART_WEB, "k8s:deployments:restart"),
    ],
)
def test_a_missing_scope_is_refused_and_named(scopes: tuple[str, ...], intent: Intent,
                                              missing: str) -> None:
    verdict = check(executor(*scopes), intent)
    assert not verdict.allowed
    assert f"scope {missing} is not granted to otto" in verdict.reason


def test_the_wildcard_matches_one_whole_segment_only() -> None:
    # `host:*:read` (in every tier) must not be read as "anything on host".
    assert not check(executor(), START_KUBELET).allowed
    assert check(executor("host:units:start:*"), START_KUBELET).allowed
    assert not check(executor("host:units:start:*"), RESTART_KUBELET).allowed
    # a tier preset's `host:units:restart:*` grants restarts, still not cordons
    repair_node = executor(tier="repair-node")
    assert check(repair_node, RESTART_KUBELET).allowed
    assert not check(repair_node, CORDON).allowed


@pytest.mark.parametrize("intent", [RESTART_KUBELET, CORDON, RESTART_WEB])
def test_bus_down_refuses_destructive_actions(intent: Intent) -> None:
    who = executor(tier="repair-cluster")
    assert check(who, intent).allowed
    verdict = check(who, intent, bus=False)
    assert verdict == Verdict(False, True, "bus down: destructive actions need a quorum")


def test_bus_down_refuses_a_non_destructive_action_given_a_quorum() -> None:
    who = executor("k8s:nodes:uncordon")
    verdict = check(who, UNCORDON_WITH_QUORUM, bus=False)
    assert not verdict.allowed
    assert verdict.reason == "bus down: k8s.node.uncordon needs a quorum"
    assert check(who, UNCORDON_WITH_QUORUM).needs_quorum


def test_bus_down_still_allows_in_scope_non_destructive_repairs() -> None:
    verdict = check(executor("k8s:nodes:uncordon"), UNCORDON, bus=False)
    assert verdict.allowed
    assert not verdict.needs_quorum


def test_a_frozen_fleet_refuses_anything_needing_a_quorum() -> None:
    who = executor(tier="repair-cluster")
    verdict = check(who, CORDON, frozen=True)
    assert not verdict.allowed
    assert verdict.reason.startswith("fleet frozen")
    assert check(who, UNCORDON, frozen=True).allowed


def test_scope_is_checked_before_bus_state() -> None:
    # A persona that may not act at all hears that, not "bus down".
    verdict = check(executor(), CORDON, bus=False, frozen=True)
    assert "not granted" in verdict.reason


def test_a_target_no_scope_can_name_is_refused() -> None:
    # Peer names come off the bus; one that cannot be written as a scope selector
    # must not slip through a `*` grant.
    odd = intent_for({"action": "agent.peer.restart"},
                     detect={"kind": "peer-silent", "for": "0s"},
                     peers=[peer("vera; rm -rf", None)])
    verdict = check(executor("agent:peers:restart:*"), odd)
    assert not verdict.allowed
    assert verdict.reason.startswith("no scope can grant this target")
    fine = intent_for({"action": "agent.peer.restart"},
                      detect={"kind": "peer-silent", "for": "0s"}, peers=[peer("vera", None)])
    assert check(executor("agent:peers:restart:*"), fine).allowed
    assert not check(executor("agent:peers:restart:lior"), fine).allowed


INTENTS = [START_KUBELET, RESTART_KUBELET, CORDON, UNCORDON, UNCORDON_WITH_QUORUM, ESCALATE,
           RESTART_WEB]
GRANTABLE = ["host:units:start:kubelet.service", "host:units:start:*",
             "host:units:restart:kubelet.service", "host:units:restart:*", "k8s:nodes:cordon",
             "k8s:nodes:uncordon", "k8s:deployments:restart", "k8s:statefulsets:restart",
             "k8s:nodes:drain", "bus:leases:release"]


@given(st.sampled_from(INTENTS), st.sets(st.sampled_from(GRANTABLE)),
       st.sampled_from(["observe", "journal", "propose", "repair-node", "repair-cluster"]),
       st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_allowed_only_with_the_scope_and_never_a_quorum_action_without_a_bus(
        intent: Intent, scopes: set[str], tier: str, flags: tuple[bool, bool, bool]) -> None:
    executes, bus, frozen = flags
    duties = ("vote", "execute") if executes else ("vote",)
    who = persona("otto", tier=tier, scopes=sorted({*scopes, "bus:vote"}), duties=duties)
    verdict = check(who, intent, bus=bus, frozen=frozen)
    scope = intent.action.scope_for(intent.target, intent.params)
    needs_quorum = intent.destructive or intent.quorum is not None
    assert verdict.needs_quorum == needs_quorum
    assert verdict.allowed == (executes and allows(who.spec.effective_scopes, scope)
                               and (not needs_quorum or (bus and not frozen)))
