"""The loader: shipped configuration is valid, and every error names file, line and field."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.config.loading import ConfigError, ConfigInvalidError, ConfigSet, load
from runtime.model.formats import (
    ApiserverUnreachableDetect,
    CordonWithoutOwnerDetect,
    NodeConditionDetect,
    PeerSilentDetect,
    PodCrashloopDetect,
    StaleLeaseDetect,
    UnitFailedDetect,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = (REPO / "personas", REPO / "policies")

OTTO_NKEY = "UAVU6MCTMJRPGFHMLWUVPDZUTOSFEKL2NRLLKZEVG574EVSST2TEX66Q"
VERA_NKEY = "UA2H7B4VOCFLX5CJOB7JCIY4NDJ3UGZPFVKWAZVY2AHSUHS5XC6EJPKV"
CORDON_QUORUM = "quorum: {approvals: 3, veto: [riven], deadline: 30s, evidence: {distinct: 2}}"


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A writable copy of the shipped personas and policies."""
    for source in SHIPPED:
        shutil.copytree(source, tmp_path / source.name)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {path.name} exactly once"
    path.write_text(text.replace(old, new))


def line_of(path: Path, start: str) -> int:
    """The 1-based number of the one line of ``path`` that starts with ``start`` once indented."""
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1)
             if line.lstrip().startswith(start)]
    assert len(lines) == 1, f"{start!r} starts {len(lines)} lines of {path.name}"
    return lines[0]


def errors_in(directory: Path) -> list[ConfigError]:
    return sorted(load([directory], strict=False).errors)


# ---------------------------------------------------------------- shipped configuration


@pytest.fixture(scope="module")
def shipped() -> ConfigSet:
    return load(SHIPPED)


def test_shipped_configuration_has_no_errors() -> None:
    assert load(SHIPPED, strict=False).errors == []


def test_five_distinct_personas_ship(shipped: ConfigSet) -> None:
    assert sorted(shipped.personas) == ["alexa", "lior", "otto", "riven", "vera"]
    # Roles, not copies: no two personas share a role, an identity or a set of scopes.
    specs = [p.value.spec for p in shipped.personas.values()]
    assert len({s.role for s in specs}) == 5
    assert len({s.identity.nkey for s in specs}) == 5
    assert len({frozenset(s.effective_scopes) for s in specs}) == 5
    assert all(shipped.policies_of(p.value) for p in shipped.personas.values()
               if "propose" in p.value.spec.duties)


def test_only_riven_vetoes(shipped: ConfigSet) -> None:
    vetoers = [p for p, loc in shipped.personas.items() if "veto" in loc.value.spec.duties]
    assert vetoers == ["riven"]


def test_shipped_policies_cover_the_seven_situations(shipped: ConfigSet) -> None:
    detects = [p.value.spec.detect for p in shipped.policies.values()]
    assert len(shipped.policies) >= 7
    units = {u for d in detects if isinstance(d, UnitFailedDetect) for u in d.units}
    assert {"kubelet.service", "containerd.service"} <= units
    assert any(isinstance(d, NodeConditionDetect) and d.condition == "Ready" for d in detects)
    for kind in (ApiserverUnreachableDetect, PodCrashloopDetect, PeerSilentDetect,
                 CordonWithoutOwnerDetect, StaleLeaseDetect):
        assert any(isinstance(d, kind) for d in detects), kind.__name__


def test_every_shipped_policy_is_run_by_some_persona(shipped: ConfigSet) -> None:
    used = {name for p in shipped.personas.values() for name in p.value.spec.policies}
    assert used == set(shipped.policies)


def test_hidden_files_below_the_directory_are_skipped(tmp_path: Path) -> None:
    # The directory itself may live under a hidden one (~/.config/zeta).
    root = tmp_path / ".config" / "zeta"
    for source in SHIPPED:
        shutil.copytree(source, root / source.name)
    (root / "personas" / ".old").mkdir()
    (root / "personas" / ".old" / "otto.yaml").write_text("not: [valid")
    assert sorted(load([root]).personas) == ["alexa", "lior", "otto", "riven", "vera"]


def test_files_are_taken_as_given(tmp_path: Path) -> None:
    config = load([REPO / "policies" / "peer-silent.yaml"])
    assert list(config.policies) == ["peer-silent"]
    assert load([tmp_path]).personas == {}


# ---------------------------------------------------------------- one error each


@dataclass(frozen=True)
class Expect:
    line_start: str  # the expected line is the one that starts with this
    field: str
    message: str  # a fragment of the message


@dataclass(frozen=True)
class Breakage:
    file: str
    old: str
    new: str
    expected: tuple[Expect, ...]


BREAKAGES = {
    "misspelled field": Breakage(
        "personas/otto.yaml", "  displayName:", "  displayNme:",
        (Expect("spec:", "spec.displayName", "required field is missing"),
         Expect("displayNme:", "spec.displayNme",
                "unknown field (did you mean 'displayName'?); expected one of: displayName, "))),
    "bad scope": Breakage(
        "personas/otto.yaml", "- k8s:nodes:cordon\n", "- k8s:nodes:cordn\n",
        (Expect("- k8s:nodes:cordn", "spec.scopes[0]",
                "'k8s:nodes:cordn' grants nothing; scopes in 'k8s': "),)),
    "bad duration": Breakage(
        "personas/otto.yaml", "tick: 15s", "tick: 15",
        (Expect("tick:", "spec.tick", "expected a duration with a unit like 15s"),)),
    "duration with words": Breakage(
        "policies/node-not-ready.yaml", "for: 2m", "for: 2 minutes",
        (Expect("for:", "spec.detect.for",
                "expected a duration like 500ms, 15s, 2m, 1h30m or 1d, got '2 minutes'"),)),
    "quorum looser than floor": Breakage(
        "policies/node-not-ready.yaml", CORDON_QUORUM,
        "quorum: {approvals: 1, veto: [riven], deadline: 30s}",
        (Expect("quorum: {approvals: 1", "spec.remedies[0].quorum",
                "approvals 1 is looser than the floor of k8s.node.cordon (2)"),)),
    "evidence paths fewer than required": Breakage(
        "policies/node-not-ready.yaml", "deadline: 30s, evidence: {distinct: 2}}",
        "deadline: 30s, evidence: {distinct: 1, requires: [host, network]}}",
        (Expect(CORDON_QUORUM[:52], "spec.remedies[0].quorum.evidence",
                "distinct 1 is fewer than the 2 paths it requires"),)),
    "unknown evidence path": Breakage(
        "policies/node-not-ready.yaml", "deadline: 30s, evidence: {distinct: 2}}",
        "deadline: 30s, evidence: {distinct: 2, requires: [kubelet]}}",
        (Expect(CORDON_QUORUM[:52], "spec.remedies[0].quorum.evidence.requires[0]",
                "Input should be 'apiserver', 'host', 'network' or 'peer'"),)),
    "destructive marked non-destructive": Breakage(
        "policies/node-not-ready.yaml", "- action: k8s.node.cordon\n",
        "- action: k8s.node.cordon\n      destructive: false\n",
        (Expect("destructive: false", "spec.remedies[0].destructive",
                "k8s.node.cordon is destructive; a policy may not mark it non-destructive"),)),
    "unknown action": Breakage(
        "policies/node-not-ready.yaml", "action: k8s.node.cordon", "action: k8s.node.cordn",
        (Expect("- action: k8s.node.cordn", "spec.remedies[0].action",
                "unknown action 'k8s.node.cordn'; the catalog has: agent.peer.restart, "),)),
    "bad params": Breakage(
        "policies/kubelet-failed.yaml",
        "params: {unit: kubelet.service}\n      verify: {within: 60s",
        "params: {unit: kubelet}\n      verify: {within: 60s",
        (Expect("params: {unit: kubelet}", "spec.remedies[0].params",
                "unit: String should match pattern"),)),
    "unknown params": Breakage(
        "policies/node-not-ready.yaml", "params: {timeout: 5m}", "params: {timeout: 5m, force: 1}",
        (Expect("params: {timeout: 5m, force: 1}", "spec.remedies[1].params",
                "force: Extra inputs are not permitted"),)),
    "unknown detector kind": Breakage(
        "policies/node-not-ready.yaml", "kind: node-condition", "kind: node-conditon",
        (Expect("kind: node-conditon", "spec.detect.kind",
                "'node-conditon' found using 'kind' does not match any of the expected tags: "
                "'node-condition', 'pod-crashloop'"),)),
    "misspelled detector field": Breakage(
        "policies/pod-crashloop.yaml", "minRestarts: 5", "minRestart: 5",
        (Expect("minRestart:", "spec.detect.minRestart",
                "unknown field (did you mean 'minRestarts'?)"),)),
    # The parser notices the unclosed `[` where the next key starts.
    "YAML syntax error": Breakage(
        "policies/peer-silent.yaml", "silentAfter: 45s", "silentAfter: [45s",
        (Expect("for: 30s", "", "not valid YAML: expected ',' or ']', but got ':'"),)),
    "duplicate YAML key": Breakage(
        "personas/otto.yaml", "  tick: 15s\n", "  tick: 15s\n  tick: 10s\n",
        (Expect("tick: 10s", "", 'not valid YAML: found duplicate key "tick"'),)),
    "persona names a missing policy": Breakage(
        "personas/lior.yaml", "    - stale-lease\n", "    - stale-lease\n    - stale-leases\n",
        (Expect("- stale-leases", "spec.policies[1]",
                "no RepairPolicy named 'stale-leases'; known: apiserver-unreachable, "),)),
    "two personas with one nkey": Breakage(
        "personas/vera.yaml", VERA_NKEY, OTTO_NKEY,
        (Expect("nkey:", "spec.identity.nkey", "the same nkey as persona 'otto' ("),)),
    "nkey checksum": Breakage(
        "personas/otto.yaml", OTTO_NKEY, OTTO_NKEY[:-1] + "A",
        (Expect("nkey:", "spec.identity.nkey", "nkey checksum does not match"),)),
    "seed instead of public key": Breakage(
        "personas/otto.yaml", OTTO_NKEY, "S" + OTTO_NKEY[1:],
        (Expect("nkey:", "spec.identity.nkey", "expected a public nkey starting with 'U'"),)),
    "veto names an unknown persona": Breakage(
        "policies/stale-lease.yaml", "veto: [riven]", "veto: [rivne]",
        (Expect("quorum: {approvals: 2, veto: [rivne]", "spec.remedies[0].quorum.veto[0]",
                "veto names persona 'rivne', which is not defined"),)),
    "tier custody": Breakage(
        "personas/lior.yaml", "tier: propose", "tier: custody",
        (Expect("tier: custody", "spec.tier", "tier 'custody' is never granted to a daemon"),)),
    "unknown selector operator": Breakage(
        "policies/node-not-ready.yaml", "    for: 2m\n",
        "    selector:\n      matchExpressions: [{key: role, operator: Maybe}]\n    for: 2m\n",
        (Expect("matchExpressions: [{key: role",
                "spec.detect.selector.matchExpressions[0].operator",
                "Input should be 'In', 'NotIn', 'Exists' or 'DoesNotExist'"),)),
    "selector In without values": Breakage(
        "policies/node-not-ready.yaml", "    for: 2m\n",
        "    selector:\n      matchExpressions: [{key: role, operator: In}]\n    for: 2m\n",
        (Expect("matchExpressions: [{key: role", "spec.detect.selector.matchExpressions[0]",
                "In needs at least one value"),)),
    "unknown kind": Breakage(
        "policies/stale-lease.yaml", "kind: RepairPolicy", "kind: RepairPolcy",
        (Expect("kind: RepairPolcy", "kind",
                "expected one of Persona, RepairPolicy, Fleet, got 'RepairPolcy'"),)),
}


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_each_error_names_file_line_and_field(config_dir: Path, breakage: Breakage) -> None:
    path = config_dir / breakage.file
    edit(path, breakage.old, breakage.new)
    errors = errors_in(config_dir)
    assert [(e.file, e.line, e.field) for e in errors] == sorted(
        (str(path), line_of(path, x.line_start), x.field) for x in breakage.expected)
    by_place = {(e.line, e.field): e.message for e in errors}
    for x in breakage.expected:
        assert x.message in by_place[line_of(path, x.line_start), x.field]


def test_a_duplicate_persona_name_points_at_the_first(config_dir: Path) -> None:
    (config_dir / "more").mkdir()
    copy = config_dir / "more" / "otto.yaml"
    shutil.copy(config_dir / "personas" / "otto.yaml", copy)
    # Files load in path order: more/ before personas/, so personas/otto.yaml is the second.
    original = config_dir / "personas" / "otto.yaml"
    line = line_of(original, "name: otto")
    assert errors_in(config_dir) == [ConfigError(
        str(original), line, "metadata.name",
        f"Persona 'otto' is already defined in {copy}:{line}")]


def test_a_persona_file_is_named_after_the_persona(config_dir: Path) -> None:
    renamed = config_dir / "personas" / "otto-1.yaml"
    (config_dir / "personas" / "otto.yaml").rename(renamed)
    assert errors_in(config_dir) == [ConfigError(
        str(renamed), line_of(renamed, "name: otto"), "metadata.name",
        "persona 'otto' must live in otto.yaml: the file name is the systemd instance name")]


def test_a_broken_file_is_not_reported_again_as_a_missing_reference(config_dir: Path) -> None:
    path = config_dir / "policies" / "peer-silent.yaml"
    edit(path, "silentAfter: 45s", "silentAfter: [45s")
    # otto.yaml names peer-silent: the YAML error is the one thing to fix.
    assert [e.file for e in errors_in(config_dir)] == [str(path)]


def test_an_invalid_policy_is_not_reported_again_as_missing(config_dir: Path) -> None:
    path = config_dir / "policies" / "peer-silent.yaml"
    edit(path, "silentAfter: 45s", "silentAfter: 45")
    assert [(e.file, e.field) for e in errors_in(config_dir)] == [(str(path),
                                                                   "spec.detect.silentAfter")]


def test_a_fleet_veto_naming_an_unknown_persona_points_at_it(config_dir: Path) -> None:
    fleet = config_dir / "fleet.yaml"
    fleet.write_text("apiVersion: zeta/v1\nkind: Fleet\nspec:\n  quorum:\n    approvals: 3\n"
                     "    veto:\n      - riven\n      - rivne\n")
    assert errors_in(config_dir) == [ConfigError(
        str(fleet), 8, "spec.quorum.veto[1]", "veto names persona 'rivne', which is not defined")]


def test_a_second_fleet_is_an_error(config_dir: Path) -> None:
    body = "apiVersion: zeta/v1\nkind: Fleet\n"
    (config_dir / "fleet.yaml").write_text(body)
    second = config_dir / "policies" / "fleet.yaml"
    second.write_text(f"# another one\n{body}")
    assert errors_in(config_dir) == [ConfigError(
        str(second), 2, "kind", f"a second Fleet; the first is in {config_dir / 'fleet.yaml'}")]


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert errors_in(missing) == [ConfigError(str(missing), 0, "", "no such file or directory")]


def test_a_document_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("# a comment\n- apiVersion: zeta/v1\n")
    [error] = errors_in(tmp_path)
    assert (error.file, error.line) == (str(path), 2)
    assert "expected a mapping with apiVersion, kind, metadata, spec" in error.message


def test_error_text_is_file_line_field_message() -> None:
    assert str(ConfigError("p/o.yaml", 8, "spec.tick", "bad")) == "p/o.yaml:8: spec.tick: bad"
    assert str(ConfigError("p/o.yaml", 3, "", "not valid YAML")) == "p/o.yaml:3: not valid YAML"
    assert str(ConfigError("p", 0, "", "no such file")) == "p: no such file"


# ---------------------------------------------------------------- all errors at once


def break_three_files(config_dir: Path) -> list[tuple[str, int, str]]:
    """Break three files in different ways; return where each error must be reported."""
    otto = config_dir / "personas" / "otto.yaml"
    edit(otto, "- k8s:nodes:cordon\n", "- k8s:nodes:cordn\n")
    edit(otto, "tick: 15s", "tick: 15")
    policy = config_dir / "policies" / "node-not-ready.yaml"
    edit(policy, "kind: node-condition", "kind: node-conditon")
    edit(policy, CORDON_QUORUM, "quorum: {approvals: 1, veto: [riven], deadline: 30s}")
    syntax = config_dir / "policies" / "stale-lease.yaml"
    edit(syntax, "grace: 30s", "grace: {30s")
    return sorted([
        (str(otto), line_of(otto, "- k8s:nodes:cordn"), "spec.scopes[0]"),
        (str(otto), line_of(otto, "tick:"), "spec.tick"),
        (str(policy), line_of(policy, "kind: node-conditon"), "spec.detect.kind"),
        (str(policy), line_of(policy, "quorum: {approvals: 1"), "spec.remedies[0].quorum"),
        (str(syntax), line_of(syntax, "for: 30s"), ""),
    ])


def test_all_errors_are_reported_at_once(config_dir: Path) -> None:
    expected = break_three_files(config_dir)
    assert [(e.file, e.line, e.field) for e in errors_in(config_dir)] == expected


def test_strict_load_raises_with_every_error(config_dir: Path) -> None:
    expected = break_three_files(config_dir)
    with pytest.raises(ConfigInvalidError) as info:
        load([config_dir])
    assert [(e.file, e.line, e.field) for e in info.value.errors] == expected
    assert str(info.value).splitlines() == [str(e) for e in info.value.errors]
