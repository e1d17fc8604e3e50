"""The action catalog: every entry names a real scope, and destructive floors hold."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from bus.messages import Target, TargetKind
from runtime.model.catalog import (
    CATALOG,
    DESTRUCTIVE_MIN_APPROVALS,
    Action,
    Params,
    UnitParams,
    UnknownActionError,
    lookup,
)
from runtime.model.formats import Remedy
from runtime.model.scopes import allows, check_known

# Params a test needs to build each action; a params model with a new required
# field makes the tests below fail until it gets an example here.
EXAMPLE_PARAMS: dict[type[Params], dict[str, Any]] = {UnitParams: {"unit": "kubelet.service"}}

ACTIONS = sorted(CATALOG.values(), key=lambda a: a.name)
PAIRS = [(a, kind) for a in ACTIONS for kind in a.targets]


def example_params(action: Action) -> Params:
    return action.params.model_validate(EXAMPLE_PARAMS.get(action.params, {}))


def example_target(kind: TargetKind) -> Target:
    namespace = "default" if kind in ("pod", "deployment", "statefulset", "daemonset") else None
    return Target(kind=kind, name="worker-1", namespace=namespace, host="worker-1")


@pytest.mark.parametrize(("action", "kind"), PAIRS, ids=[f"{a.name}-{k}" for a, k in PAIRS])
def test_scope_for_every_accepted_target_is_a_known_scope(action: Action, kind: TargetKind) -> None:
    scope = action.scope_for(example_target(kind), example_params(action))
    assert check_known(scope) == scope
    # The scope is concrete: a grant must be asked for exactly, never for "anything".
    assert "*" not in scope


@pytest.mark.parametrize("action", ACTIONS, ids=lambda a: a.name)
def test_destructive_actions_need_a_quorum(action: Action) -> None:
    if action.destructive:
        assert action.min_approvals >= DESTRUCTIVE_MIN_APPROVALS
    else:
        assert action.min_approvals >= 1


def test_the_destructive_floor_is_a_real_quorum() -> None:
    # One approval is the proposer alone: no second pair of eyes.
    assert DESTRUCTIVE_MIN_APPROVALS >= 2


@pytest.mark.parametrize("action", [a for a in ACTIONS if a.undo], ids=lambda a: a.name)
def test_undo_names_an_action_in_the_catalog_for_the_same_target(action: Action) -> None:
    assert action.undo is not None
    undo = lookup(action.undo)
    assert set(action.targets) <= set(undo.targets)


def test_every_entry_is_filed_under_its_own_name() -> None:
    assert all(name == action.name for name, action in CATALOG.items())


def test_target_kinds_are_all_used() -> None:
    used = {kind for action in ACTIONS for kind in action.targets}
    assert used == set(typing.get_args(TargetKind))


@pytest.mark.parametrize(
    ("name", "floor"),
    [
        # The floors fixed by SCOPES.md.
        ("k8s.node.cordon", True), ("k8s.node.uncordon", False), ("k8s.node.drain", True),
        ("k8s.pod.delete", True), ("k8s.workload.restart", True), ("host.unit.start", False),
        ("host.unit.restart", True), ("host.node.reboot", True), ("agent.peer.restart", False),
        ("bus.escalate", False),
    ],
)
def test_destructive_floors_match_the_design(name: str, floor: bool) -> None:
    assert lookup(name).destructive is floor


@pytest.mark.parametrize(
    ("name", "target", "params", "scope"),
    [
        ("k8s.workload.restart", Target(kind="statefulset", name="db", namespace="data"), {},
         "k8s:statefulsets:restart"),
        ("host.unit.restart", Target(kind="unit", name="k3s.service", host="cp-1"),
         {"unit": "k3s.service"}, "host:units:restart:k3s.service"),
        ("host.unit.start", Target(kind="unit", name="kubelet.service", host="cp-1"),
         {"unit": "kubelet.service"}, "host:units:start:kubelet.service"),
        ("agent.peer.restart", Target(kind="persona", name="vera"), {},
         "agent:peers:restart:vera"),
    ],
)
def test_scopes_name_the_exact_target(name: str, target: Target, params: dict[str, Any],
                                      scope: str) -> None:
    action = lookup(name)
    assert action.scope_for(target, action.params.model_validate(params)) == scope


def test_a_unit_grant_does_not_reach_another_unit() -> None:
    action = lookup("host.unit.restart")
    scope = action.scope_for(Target(kind="unit", name="k3s.service"),
                             UnitParams(unit="k3s.service"))
    assert not allows(["host:units:restart:kubelet.service"], scope)
    assert allows(["host:units:restart:*"], scope)


def test_lookup_of_an_unknown_action_lists_the_catalog() -> None:
    with pytest.raises(UnknownActionError, match=r"unknown action 'k8s\.node\.reboot'") as info:
        lookup("k8s.node.reboot")
    assert all(name in str(info.value) for name in CATALOG)


@pytest.mark.parametrize(
    ("target", "key"),
    [
        (Target(kind="node", name="worker-1"), "node.worker-1"),
        (Target(kind="deployment", name="web", namespace="shop"), "deployment.shop/web"),
    ],
)
def test_target_key_is_the_lease_key(target: Target, key: str) -> None:
    assert target.key == key


@pytest.mark.parametrize(
    "params", [{"unit": "kubelet"}, {"unit": "../etc/passwd.service"}, {"unit": ""}, {}],
)
def test_unit_params_only_take_unit_names(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unit"):
        UnitParams.model_validate(params)


# ---------------------------------------------------------------- policies tighten, never loosen


@given(
    action=st.sampled_from(sorted(CATALOG)),
    destructive=st.sampled_from([None, True, False]),
    approvals=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
)
def test_a_policy_can_tighten_an_action_but_never_loosen_it(
    action: str, destructive: bool | None, approvals: int | None
) -> None:
    floor = lookup(action)
    doc: dict[str, Any] = {"action": action, "params": EXAMPLE_PARAMS.get(floor.params, {})}
    if destructive is not None:
        doc["destructive"] = destructive
    if approvals is not None:
        doc["quorum"] = {"approvals": approvals}
    needed = max(floor.min_approvals, DESTRUCTIVE_MIN_APPROVALS if destructive else 1)
    loosens = (floor.destructive and destructive is False) or (
        approvals is not None and approvals < needed)

    try:
        remedy = Remedy.model_validate(doc)
    except ValidationError:
        assert loosens, "a remedy that only tightens the floor was refused"
        return
    assert not loosens, "a remedy looser than the catalog floor was accepted"
    assert remedy.is_destructive >= floor.destructive
    assert remedy.is_destructive == (floor.destructive or bool(destructive))
    if remedy.quorum is not None:
        assert remedy.quorum.approvals >= floor.min_approvals
        if remedy.is_destructive:
            assert remedy.quorum.approvals >= DESTRUCTIVE_MIN_APPROVALS
