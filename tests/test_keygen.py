"""``zeta-agent keygen``: a new seed where the agents read it, its public key, and --write."""

from __future__ import annotations

import difflib
import stat
from pathlib import Path

import pytest

from bus.keys import Signer
from runtime.config.credentials import SEED_FILE, load_signer
from runtime.config.loading import config_paths, load
from runtime.ops.cli import main
from runtime.ops.controls import OperatingError, with_persona_key

NEW_KEY = "UDRCYTEQGYGIHJ5CBPEZQTTFNYPYJESIOFSKUGX4SQ2DIRHEI75NFVA2"


def keygen(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["keygen", *args])
    out, err = capsys.readouterr()
    return code, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_a_private_seed_and_prints_only_its_public_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    credentials = tmp_path / "credentials"
    code, out, err = keygen(capsys, "alice", "--credentials-dir", str(credentials),
                            "--config-dir", str(tmp_path / "nowhere"))
    assert code == 0
    seed_file = credentials / "alice" / SEED_FILE
    seed = seed_file.read_bytes()
    assert out == f"{Signer(seed).public_key}\n", "stdout is the key alone, for scripts"
    assert seed.strip().decode() not in out + err
    assert mode(seed_file) == 0o600
    assert mode(seed_file.parent) == 0o700
    assert f"wrote {seed_file}" in err


def test_keygen_never_replaces_a_seed_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("alice", "--credentials-dir", str(tmp_path))
    assert keygen(capsys, *args)[0] == 0
    seed_file = tmp_path / "alice" / SEED_FILE
    first = seed_file.read_bytes()
    code, out, err = keygen(capsys, *args)
    assert (code, out) == (2, "")
    assert "--force" in err
    assert seed_file.read_bytes() == first
    code, out, _ = keygen(capsys, *args, "--force")
    assert code == 0
    assert seed_file.read_bytes() != first
    assert out.strip() == Signer(seed_file.read_bytes()).public_key


def test_keygen_write_changes_only_the_key_and_the_agent_accepts_the_seed(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    credentials = config_copy / "credentials"
    (config_copy / "fleet.yaml").write_text(
        "apiVersion: zeta/v1\nkind: Fleet\nspec:\n"
        f"  credentialsDir: {credentials}  # the default for keygen, too\n")
    otto = config_copy / "personas" / "otto.yaml"
    before = otto.read_text()
    code, out, err = keygen(capsys, "otto", "--write", "--config-dir", str(config_copy))
    assert code == 0
    key = out.strip()
    after = otto.read_text()
    changed = [line for line in difflib.ndiff(before.splitlines(), after.splitlines())
               if line.startswith(("- ", "+ "))]
    assert changed == ["-     nkey: UAVU6MCTMJRPGFHMLWUVPDZUTOSFEKL2NRLLKZEVG574EVSST2TEX66Q",
                       f"+     nkey: {key}"]
    assert f"set spec.identity.nkey in {otto}" in err
    config = load(config_paths(config_copy))
    assert config.persona("otto").spec.identity.nkey == key
    # What the agent does at start: read the seed from the credentials dir, check the key.
    signer = load_signer(config.persona("otto"), config.fleet, environ={})
    assert signer.public_key == key


def test_keygen_write_needs_an_existing_persona_and_leaves_nothing_behind(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    credentials = config_copy / "credentials"
    code, out, err = keygen(capsys, "alice", "--write", "--config-dir", str(config_copy),
                            "--credentials-dir", str(credentials))
    assert (code, out) == (2, "")
    assert "personas/alice.yaml, which does not exist" in err
    assert not credentials.exists()


def test_keygen_refuses_a_persona_file_without_a_key_before_writing_a_seed(
        config_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    otto = config_copy / "personas" / "otto.yaml"
    otto.write_text(otto.read_text().replace(
        "    nkey: UAVU6MCTMJRPGFHMLWUVPDZUTOSFEKL2NRLLKZEVG574EVSST2TEX66Q\n", ""))
    credentials = config_copy / "credentials"
    code, _, err = keygen(capsys, "otto", "--write", "--config-dir", str(config_copy),
                          "--credentials-dir", str(credentials))
    assert code == 2
    assert "no spec.identity.nkey to replace" in err
    assert not credentials.exists()


@pytest.mark.parametrize("name", ["Otto", "9lives", "a" * 27, "../etc", ""])
def test_keygen_refuses_names_that_are_not_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, _, err = keygen(capsys, name, "--credentials-dir", str(tmp_path))
    assert code == 2
    assert "is not a valid name" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("line", "expected"), [
    ("    nkey: OLD  # comment kept\n", f"    nkey: {NEW_KEY}  # comment kept\n"),
    ('    nkey: "OLD"\n', f"    nkey: {NEW_KEY}\n"),
    ("    nkey: 'OLD'\n", f"    nkey: {NEW_KEY}\n"),
    ("    nkey:\n", f"    nkey: {NEW_KEY}\n"),
    ("    nkey:   # to come\n", f"    nkey:   {NEW_KEY} # to come\n"),
    ("    nkey : OLD\n", f"    nkey : {NEW_KEY}\n"),
])
def test_with_persona_key_replaces_just_the_value(
        tmp_path: Path, line: str, expected: str) -> None:
    head = "# a persona\napiVersion: zeta/v1\nkind: Persona\nspec:\n  identity:\n"
    tail = "    kubernetes: {user: zeta-x}   # spacing kept\n  tier: observe\n"
    path = tmp_path / "x.yaml"
    path.write_text(head + line + tail)
    assert with_persona_key(path, NEW_KEY) == head + expected + tail


def test_with_persona_key_in_a_flow_mapping(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("spec:\n  identity: {nkey: OLD, kubernetes: {user: zeta-x}}\n")
    assert with_persona_key(path, NEW_KEY) == (
        f"spec:\n  identity: {{nkey: {NEW_KEY}, kubernetes: {{user: zeta-x}}}}\n")


def test_with_persona_key_refuses_a_value_it_cannot_replace_in_place(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    text = "spec:\n  identity:\n    nkey: >-\n      UOLD\n"
    path.write_text(text)
    with pytest.raises(OperatingError, match=r"put \w+ there by hand"):
        with_persona_key(path, NEW_KEY)
    assert path.read_text() == text
