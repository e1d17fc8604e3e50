"""The file formats as models: durations, remedies that only tighten, personas, the fleet."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from runtime.model.catalog import DESTRUCTIVE_MIN_APPROVALS, lookup
from runtime.model.durations import Duration, format_duration, parse_duration
from runtime.model.formats import DEFAULT_FLEET, Fleet, Persona, Remedy, RepairPolicy

EXPECTED_FORMAT = "expected a duration like 500ms, 15s, 2m, 1h30m or 1d"


class Timed(BaseModel):
    after: Duration


# ---------------------------------------------------------------- durations


@given(st.integers(min_value=0, max_value=400 * 86_400_000))
def test_format_then_parse_is_the_identity(millis: int) -> None:
    value = timedelta(milliseconds=millis)
    assert parse_duration(format_duration(value)) == value


@given(st.integers(min_value=0, max_value=400 * 86_400_000))
def test_formatted_durations_are_canonical(millis: int) -> None:
    text = format_duration(timedelta(milliseconds=millis))
    assert format_duration(parse_duration(text)) == text
    assert Timed.model_validate({"after": text}).model_dump(mode="json") == {"after": text}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500ms", timedelta(milliseconds=500)), ("15s", timedelta(seconds=15)),
        ("2m", timedelta(minutes=2)), ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d", timedelta(days=1)), ("1.5m", timedelta(seconds=90)), ("0s", timedelta(0)),
        (" 10m ", timedelta(minutes=10)),
    ],
)
def test_operators_write_durations_like_prometheus(text: str, value: timedelta) -> None:
    assert parse_duration(text) == value
    assert Timed.model_validate({"after": text}).after == value


@pytest.mark.parametrize("text", ["", "15", "garbage", "-5s", "5 s", "5S", "1h 30m", "2mins",
                                  "s", "15s!"])
def test_garbage_is_rejected_with_the_expected_format(text: str) -> None:
    with pytest.raises(ValueError, match=EXPECTED_FORMAT):
        parse_duration(text)
    with pytest.raises(ValidationError, match=EXPECTED_FORMAT):
        Timed.model_validate({"after": text})


@pytest.mark.parametrize(("number", "hint"), [(15, "15s"), (1.5, "1.5s"), (0, "0s")])
def test_bare_numbers_are_rejected(number: float, hint: str) -> None:
    with pytest.raises(ValidationError, match=f"with a unit like {hint}, got a bare number"):
        Timed.model_validate({"after": number})


@pytest.mark.parametrize("flag", [True, False])
def test_booleans_are_rejected(flag: bool) -> None:
    # YAML turns `for: yes` into True, which Python would happily treat as one second.
    with pytest.raises(ValidationError, match="got a boolean"):
        Timed.model_validate({"after": flag})


# ---------------------------------------------------------------- remedies (see test_catalog)


def test_marking_a_destructive_action_non_destructive_says_why() -> None:
    with pytest.raises(ValidationError, match=r"k8s\.node\.drain is destructive; a policy may not"):
        Remedy.model_validate({"action": "k8s.node.drain", "destructive": False})


def test_a_quorum_below_the_floor_names_the_floor() -> None:
    with pytest.raises(ValidationError,
                       match=r"approvals 1 is looser than the floor of k8s.node.cordon \(2\)"):
        Remedy.model_validate({"action": "k8s.node.cordon", "quorum": {"approvals": 1}})


def test_marking_an_action_destructive_raises_its_floor() -> None:
    with pytest.raises(ValidationError, match=r"floor of host.unit.start \(2\)"):
        Remedy.model_validate({"action": "host.unit.start", "destructive": True,
                               "params": {"unit": "kubelet.service"},
                               "quorum": {"approvals": 1}})


def test_remedy_params_are_typed_by_the_action() -> None:
    remedy = Remedy.model_validate({"action": "k8s.node.drain", "params": {"timeout": "90s"}})
    assert remedy.typed_params() == lookup("k8s.node.drain").params.model_validate(
        {"timeout": timedelta(seconds=90)})
    with pytest.raises(ValidationError, match=r"timeout: .*expected a duration"):
        Remedy.model_validate({"action": "k8s.node.drain", "params": {"timeout": "soon"}})
    with pytest.raises(ValidationError, match="force: Extra inputs are not permitted"):
        Remedy.model_validate({"action": "k8s.node.drain", "params": {"force": True}})


# ---------------------------------------------------------------- persona and fleet

NKEY = "UAVU6MCTMJRPGFHMLWUVPDZUTOSFEKL2NRLLKZEVG574EVSST2TEX66Q"


def persona_doc(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zeta/v1", "kind": "Persona", "metadata": {"name": "otto"},
        "spec": {"displayName": "Otto", "role": "coordinator",
                 "identity": {"nkey": NKEY, "kubernetes": {"user": "zeta-otto"}},
                 "tier": "propose", "duties": ["propose", "vote"], **spec},
    }


def test_a_minimal_persona_gets_its_tier_and_defaults() -> None:
    persona = Persona.model_validate(persona_doc())
    assert persona.name == "otto"
    assert persona.spec.tick == timedelta(seconds=15)
    assert persona.spec.brain.kind == "rules"
    assert "bus:propose" in persona.spec.effective_scopes


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"tier": "observe"}, "duty 'propose' needs scope 'bus:propose'"),
        ({"duties": ["vote", "vote"]}, "duties are listed more than once"),
        ({"tick": "500ms"}, "tick must be at least 1s"),
        ({"duties": []}, "at least 1 item"),
        ({"tier": "custody"}, "tier 'custody' is never granted to a daemon"),
        ({"tier": "human-gated"}, "tier 'human-gated' is never granted to a daemon"),
        ({"tier": "root"}, "Input should be 'observe', 'journal'"),
        ({"brain": {"kind": "oracle"}}, "does not match any of the expected tags"),
    ],
)
def test_inconsistent_personas_are_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Persona.model_validate(persona_doc(**spec))


@pytest.mark.parametrize("name", ["Otto", "otto_1", "1otto", "o" * 27, ""])
def test_persona_names_fit_subjects_units_and_users(name: str) -> None:
    doc = persona_doc()
    doc["metadata"]["name"] = name
    with pytest.raises(ValidationError, match=r"metadata\.name"):
        Persona.model_validate(doc)


def test_the_default_fleet_requires_a_real_quorum() -> None:
    assert DEFAULT_FLEET.spec.quorum.approvals >= DESTRUCTIVE_MIN_APPROVALS
    with pytest.raises(ValidationError, match=r"quorum\.approvals must be at least 2"):
        Fleet.model_validate({"apiVersion": "zeta/v1", "kind": "Fleet",
                              "spec": {"quorum": {"approvals": 1}}})


def test_fleet_operator_keys_are_checked() -> None:
    with pytest.raises(ValidationError, match="checksum"):
        Fleet.model_validate({"apiVersion": "zeta/v1", "kind": "Fleet",
                              "spec": {"operators": [{"name": "alice",
                                                      "nkey": NKEY[:-1] + "A"}]}})


def test_policy_for_is_written_for_but_read_as_for_() -> None:
    policy = RepairPolicy.model_validate({
        "apiVersion": "zeta/v1", "kind": "RepairPolicy", "metadata": {"name": "p"},
        "spec": {"detect": {"kind": "peer-silent", "for": "30s"},
                 "remedies": [{"action": "bus.escalate"}]},
    })
    assert policy.spec.detect.for_ == timedelta(seconds=30)
    assert policy.model_dump(mode="json", by_alias=True)["spec"]["detect"]["for"] == "30s"


@pytest.mark.parametrize("text", ["5s1h", "1m1m", "30s2m"])
def test_duration_units_go_from_large_to_small_once_each(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration like"):
        parse_duration(text)
