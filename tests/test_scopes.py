"""Scope grammar and matching: ``*`` is one whole segment, default deny, tiers are presets."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from runtime.model.scopes import (
    DOMAINS,
    NEVER_GRANTED,
    TIER_SCOPES,
    VOCABULARY,
    ScopeError,
    Tier,
    allows,
    check_known,
    effective_scopes,
    parse,
)

segment = st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}", fullmatch=True)
selector = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9@._-]{0,12}", fullmatch=True)


@st.composite
def concrete_scopes(draw: st.DrawFn) -> str:
    """A grammatical scope with no wildcard: 2 to 4 segments."""
    domain = draw(st.sampled_from(DOMAINS))
    middle = draw(st.lists(segment, min_size=1, max_size=2))
    tail = draw(st.lists(selector, max_size=1)) if len(middle) == 2 else []
    return ":".join([domain, *middle, *tail])


@st.composite
def scope_and_cover(draw: st.DrawFn) -> tuple[str, str]:
    """A concrete scope and a grant that replaces some of its non-domain segments with ``*``."""
    scope = draw(concrete_scopes())
    parts = scope.split(":")
    mask = draw(st.lists(st.booleans(), min_size=len(parts) - 1, max_size=len(parts) - 1))
    cover = [parts[0], *("*" if wild else part for wild, part in zip(mask, parts[1:], strict=True))]
    return scope, ":".join(cover)


# ---------------------------------------------------------------- matching


@given(concrete_scopes())
def test_a_grant_matches_itself(scope: str) -> None:
    assert allows([scope], scope)


@given(concrete_scopes())
def test_default_deny_an_empty_grant_allows_nothing(scope: str) -> None:
    assert not allows([], scope)


@given(scope_and_cover())
def test_a_wildcard_grant_covers_every_concrete_scope_it_names(pair: tuple[str, str]) -> None:
    scope, cover = pair
    assert allows([cover], scope)


@given(scope_and_cover(), concrete_scopes())
def test_a_wildcard_grant_is_a_superset_of_the_concrete_grant(
    pair: tuple[str, str], required: str
) -> None:
    # Whatever the concrete grant allows, the wider grant allows too.
    concrete, cover = pair
    if allows([concrete], required):
        assert allows([cover], required)


@given(concrete_scopes(), segment)
def test_a_concrete_grant_allows_nothing_but_itself(scope: str, other: str) -> None:
    parts = scope.split(":")
    changed = ":".join([*parts[:-1], other])
    assert allows([scope], changed) == (changed == scope)


@given(concrete_scopes(), st.integers(min_value=2, max_value=3))
def test_segment_counts_must_be_equal(scope: str, keep: int) -> None:
    shorter = ":".join(scope.split(":")[:keep])
    assume(shorter != scope)
    assert not allows([shorter], scope)
    assert not allows([scope], shorter)


@pytest.mark.parametrize(
    ("granted", "required"),
    [
        # `*` is one whole segment, never several: no implied trailing segments.
        ("k8s:*", "k8s:nodes:read"),
        ("host:units:restart", "host:units:restart:k3s.service"),
        ("host:*:*", "host:units:restart:k3s.service"),
        ("agent:peers:restart:*", "agent:peers:restart"),
    ],
)
def test_a_star_never_spans_segments(granted: str, required: str) -> None:
    assert not allows([granted], required)


def test_a_star_matches_any_one_segment() -> None:
    assert allows(["k8s:*:read"], "k8s:nodes:read")
    assert allows(["host:units:restart:*"], "host:units:restart:zeta-agent@otto.service")
    assert not allows(["k8s:*:read"], "k8s:nodes:cordon")


def test_a_required_star_is_not_a_wildcard_for_the_grant() -> None:
    # Asking for `k8s:*:read` means "every resource": a grant of one resource is not that.
    assert not allows(["k8s:nodes:read"], "k8s:*:read")


# ---------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("scope", "reason"),
    [
        ("k8s", "2 to 4 segments"),
        ("k8s:nodes:restart:a:b", "2 to 4 segments"),
        ("cloud:vms:read", "unknown domain 'cloud'"),
        ("*:nodes:read", "unknown domain '*'"),
        ("k8s:Nodes:read", "segment 2 'Nodes'"),
        ("k8s:no*:read", "segment 2 'no*'"),
        ("k8s:nodes:", "segment 3 ''"),
        ("host:units:restart:k3s service", "segment 4 'k3s service'"),
        ("host:units:restart:*.service", "segment 4 '*.service'"),
    ],
)
def test_grammar_errors_say_what_is_wrong(scope: str, reason: str) -> None:
    with pytest.raises(ScopeError, match="^" + re.escape(repr(scope))) as info:
        parse(scope)
    assert reason in str(info.value)


def test_grammar_errors_are_value_errors() -> None:
    # Pydantic turns ValueError raised in a validator into a field error with the message.
    assert issubclass(ScopeError, ValueError)


@pytest.mark.parametrize(
    ("typo", "domain"),
    [
        ("k8s:nodes:cordn", "k8s"),
        ("k8s:node:cordon", "k8s"),
        ("host:unit:restart:k3s.service", "host"),
        ("host:units:stop:k3s.service", "host"),
        ("bus:vot", "bus"),
        ("agent:peer:restart:otto", "agent"),
    ],
)
def test_check_known_rejects_typos(typo: str, domain: str) -> None:
    with pytest.raises(ScopeError, match="grants nothing") as info:
        check_known(typo)
    # The error lists the real scopes of that domain, so the fix is one look away.
    listed = str(info.value).split(": ", 1)[1]
    assert all(s.startswith(f"{domain}:") for s in listed.split(", "))


@pytest.mark.parametrize("scope", [*VOCABULARY, "k8s:*:read", "host:units:restart:k3s.service",
                                   "agent:peers:restart:otto", "bus:*"])
def test_check_known_accepts_real_scopes(scope: str) -> None:
    assert check_known(scope) == scope


def test_the_vocabulary_is_grammatical() -> None:
    for scope in VOCABULARY:
        parse(scope)


# ---------------------------------------------------------------- tiers

LADDER = (Tier.OBSERVE, Tier.JOURNAL, Tier.PROPOSE, Tier.REPAIR_NODE, Tier.REPAIR_CLUSTER)
STEPS = tuple(itertools.pairwise(LADDER))


def test_every_grantable_tier_is_on_the_ladder() -> None:
    assert set(LADDER) == set(Tier) - NEVER_GRANTED
    assert set(TIER_SCOPES) == set(LADDER)


@pytest.mark.parametrize(("lower", "higher"), STEPS)
def test_tiers_are_monotonic(lower: Tier, higher: Tier) -> None:
    assert all(allows(TIER_SCOPES[higher], s) for s in TIER_SCOPES[lower])
    # Strictly: each step up grants something the one below does not.
    assert not all(allows(TIER_SCOPES[lower], s) for s in TIER_SCOPES[higher])


@given(st.sampled_from(VOCABULARY), selector, st.sampled_from(STEPS))
def test_a_higher_tier_allows_whatever_a_lower_one_does(
    known: str, name: str, pair: tuple[Tier, Tier]
) -> None:
    required = known.replace("*", name)
    lower, higher = pair
    if allows(TIER_SCOPES[lower], required):
        assert allows(TIER_SCOPES[higher], required)


@pytest.mark.parametrize("tier", LADDER)
def test_tier_presets_are_known_scopes(tier: Tier) -> None:
    for scope in TIER_SCOPES[tier]:
        check_known(scope)


def test_observe_reads_and_does_nothing_else() -> None:
    granted = TIER_SCOPES[Tier.OBSERVE]
    assert allows(granted, "k8s:nodes:read")
    assert allows(granted, "host:units:read")
    for scope in ("bus:report", "bus:vote", "k8s:nodes:cordon", "host:units:start:kubelet.service"):
        assert not allows(granted, scope)


@pytest.mark.parametrize("tier", sorted(NEVER_GRANTED))
def test_custody_and_human_gated_are_refused(tier: Tier) -> None:
    with pytest.raises(ScopeError, match=f"tier '{tier.value}' is never granted to a daemon"):
        effective_scopes(tier, ())


def test_effective_scopes_add_to_the_preset_in_order_without_duplicates() -> None:
    extra = ("bus:vote", "k8s:*:read", "bus:veto")
    scopes = effective_scopes(Tier.OBSERVE, extra)
    assert scopes == (*TIER_SCOPES[Tier.OBSERVE], "bus:vote", "bus:veto")
