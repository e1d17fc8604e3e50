"""The operator docs cannot rot: they are checked against the code they describe."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from bus.messages import Target
from runtime.config.loading import load
from runtime.model import formats as config
from runtime.model.catalog import CATALOG, Action, UnitParams
from runtime.model.scopes import NEVER_GRANTED, TIER_SCOPES, VOCABULARY, Tier

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SCOPES_MD = (REPO / "docs" / "scopes.md").read_text()
CONFIGURATION_MD = (REPO / "docs" / "configuration.md").read_text()

CATALOG_HEADER = ("| action | targets | params | scope | destructive floor | min approvals "
                  "| undo |")


def table(text: str, header: str) -> dict[str, list[str]]:
    """The rows of the markdown table under ``header``, keyed by their first cell."""
    lines = text.splitlines()
    start = lines.index(header)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# ---------------------------------------------------------------- docs/scopes.md


def test_every_tier_is_listed_with_its_exact_scopes() -> None:
    rows = table(SCOPES_MD, "| tier | scopes |")
    assert set(rows) == {t.value for t in Tier}
    for tier, scopes in TIER_SCOPES.items():
        assert ticked(rows[tier.value][0]) == list(scopes), tier
    for tier in NEVER_GRANTED:
        assert rows[tier.value][0].startswith("never granted"), tier


def test_the_vocabulary_is_listed() -> None:
    rows = table(SCOPES_MD, "| domain | scopes |")
    listed = [scope for cells in rows.values() for scope in ticked(cells[0])]
    assert sorted(listed) == sorted(VOCABULARY)


CATALOG_ROWS = table(SCOPES_MD, CATALOG_HEADER)


def test_every_catalog_action_is_listed() -> None:
    assert set(CATALOG_ROWS) == set(CATALOG)


@pytest.mark.parametrize("action", [CATALOG[name] for name in sorted(CATALOG)],
                         ids=sorted(CATALOG))
def test_each_action_row_matches_the_catalog(action: Action) -> None:
    targets, params, scope, destructive, approvals, undo = CATALOG_ROWS[action.name]
    assert targets.split(", ") == list(action.targets)
    assert ticked(params) == list(action.params.model_fields)
    assert destructive == ("yes" if action.destructive else "no")
    assert approvals == str(action.min_approvals)
    assert ticked(undo) == ([action.undo] if action.undo else [])
    [pattern] = ticked(scope)
    # `<unit>`, `<kind>`, `<persona>` stand for one segment (or part of one).
    expected = re.compile(re.sub(r"<[a-z]+>", "[a-z0-9.-]+", re.escape(pattern)))
    example = (UnitParams(unit="kubelet.service") if action.params is UnitParams
               else action.params())
    for kind in action.targets:
        actual = action.scope_for(Target(kind=kind, name="worker-1"), example)
        assert expected.fullmatch(actual), (pattern, actual)


# ---------------------------------------------------------------- docs/configuration.md


def documented_names() -> set[str]:
    """Every name written in backticks, and each part of every dotted path."""
    prose = re.sub(r"^```.*?^```$", "", CONFIGURATION_MD, flags=re.MULTILINE | re.DOTALL)
    names: set[str] = set()
    for token in ticked(prose):
        names.add(token)
        names.update(re.split(r"[.\[\]]+", token))
    return names


def fields(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


DOCUMENTED_MODELS = (
    config.PersonaSpec, config.Identity, config.KubernetesIdentity, config.PolicySpec,
    config.Remedy, config.Quorum, config.Verify, config.Budget, config.FleetSpec,
    config.BusSettings,
    *typing.get_args(typing.get_args(config.Detect)[0]),
)


@pytest.mark.parametrize("model", DOCUMENTED_MODELS, ids=lambda m: m.__name__)
def test_every_field_is_documented(model: type[BaseModel]) -> None:
    missing = set(fields(model)) - documented_names()
    assert not missing, f"docs/configuration.md does not mention {sorted(missing)}"


def test_every_detector_and_expectation_is_documented() -> None:
    names = documented_names()
    for detector in typing.get_args(typing.get_args(config.Detect)[0]):
        [kind] = typing.get_args(detector.model_fields["kind"].annotation)
        assert kind in names
    assert set(typing.get_args(config.Expectation)) <= names


@pytest.mark.parametrize("model", [config.PersonaMetadata, config.PolicyMetadata],
                         ids=["persona", "policy"])
def test_name_patterns_are_documented(model: type[BaseModel]) -> None:
    pattern = model.model_json_schema()["properties"]["name"]["pattern"]
    assert f"`{pattern}`" in CONFIGURATION_MD


def test_the_documented_validate_output_is_the_real_one() -> None:
    assert "ok: 5 personas, 8 policies, fleet: built-in defaults" in CONFIGURATION_MD
    assert len(list((REPO / "policies").glob("*.yaml"))) == 8


# ---------------------------------------------------------------- README.md


def test_the_quickstart_is_exactly_two_commands() -> None:
    quickstart = README.split("## Quickstart", 1)[1]
    block = re.search(r"```sh\n(.*?)```", quickstart, re.DOTALL)
    assert block is not None
    assert block[1].splitlines() == ["make lab", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    script = (REPO / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test"
    assert "export CI=true" in commands


def test_the_persona_table_matches_the_shipped_files() -> None:
    rows = table(README, "| persona | role | what it does | tier | adds |")
    personas = load([REPO / "personas", REPO / "policies"]).personas
    assert sorted(rows) == sorted(p.value.spec.displayName for p in personas.values())
    for located in personas.values():
        spec = located.value.spec
        role, description, tier, _ = rows[spec.displayName]
        assert (ticked(role), description, ticked(tier)) == (
            [spec.role], spec.description, [spec.tier.value])
