"""docs/bus.md and docs/schemas/ are the bus contract; they cannot drift from the code."""

from __future__ import annotations

import json
import re
import shutil
import typing
from pathlib import Path

import pytest

from bus import subjects
from bus.envelope import Accepted, DropReason, Envelope, Verifier
from bus.messages import BODIES, Kind
from lab import tools
from tests.conftest import REPO

BUS_MD = (REPO / "docs" / "bus.md").read_text(encoding="utf-8")
PROSE, _, GENERATED = BUS_MD.partition("<!-- begin examples")
OPERATOR = tools.EXAMPLE_OPERATOR


def table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table under ``header``."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_committed_schemas_and_examples_are_what_the_code_generates() -> None:
    assert tools.stale_docs(REPO) == [], "run: .venv/bin/python -m lab.tools docs"
    assert tools.main(["docs", "--check"]) == 0
    names = sorted(p.stem for p in (REPO / "docs" / "schemas").glob("*.json"))
    assert names == sorted(["envelope", *BODIES])


def test_a_stale_generated_file_is_found_and_rewritten(tmp_path: Path) -> None:
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    schemas = tmp_path / "docs" / "schemas"
    (schemas / "vote.json").write_text("{}\n")
    (schemas / "gone.json").write_text("{}\n")
    bus_md = tmp_path / "docs" / "bus.md"
    bus_md.write_text(bus_md.read_text().replace('"tick": 12', '"tick": 13'))
    stale = [schemas / "vote.json", bus_md, schemas / "gone.json"]
    assert tools.stale_docs(tmp_path) == stale
    assert tools.write_docs(tmp_path) == stale
    assert tools.stale_docs(tmp_path) == []
    assert not (schemas / "gone.json").exists()
    assert bus_md.read_text() == BUS_MD


def test_the_examples_need_their_markers(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bus.md").write_text("# no examples here\n")
    with pytest.raises(ValueError, match="no examples section"):
        tools.generated(tmp_path)


def test_every_example_validates_against_its_models_and_schemas() -> None:
    schemas = tools.schemas()
    seen = set()
    for _, envelope in tools.examples():
        obj = json.loads(envelope.to_bytes())
        # No jsonschema in the venv: the models validate, and the schemas must admit
        # exactly the fields each example has (every schema forbids unknown ones).
        assert Envelope.model_validate(obj) == envelope
        body = BODIES[envelope.kind].model_validate(obj["body"])
        assert body.model_dump(mode="json") == obj["body"]
        for schema, value in ((schemas["envelope"], obj), (schemas[envelope.kind], obj["body"])):
            assert schema["additionalProperties"] is False
            assert set(schema["required"]) <= set(value) <= set(schema["properties"])
        seen.add(envelope.kind)
    assert seen == set(BODIES)


def test_the_documented_examples_are_genuinely_signed_messages_of_every_kind() -> None:
    blocks = re.findall(r"### (\w+)\n\n`([^`]+)`\n\n```json\n(.*?)\n```", GENERATED, re.DOTALL)
    assert [kind for kind, _, _ in blocks] == list(typing.get_args(Kind))
    signers = {n: tools.example_signer(n) for n in tools.EXAMPLE_SENDERS}
    verifier = Verifier(keys={n: s.public_key for n, s in signers.items() if n != OPERATOR},
                        operators={OPERATOR: signers[OPERATOR].public_key})
    for kind, subject, text in blocks:
        # Pretty-printed here for reading; the signature covers the canonical form.
        wire = json.dumps(json.loads(text), separators=(",", ":"), sort_keys=True)
        checked = verifier.check(subject, wire.encode(), live=False)
        assert isinstance(checked, Accepted), (kind, checked)
        assert checked.envelope.kind == kind


def test_every_kind_is_in_the_subjects_table_on_its_subject() -> None:
    rows = table(PROSE, "| subject | kind | sent by | what | in `ZETA_AUDIT` |")
    kinds = [row[1].strip("`") for row in rows]
    assert sorted(kinds) == sorted(typing.get_args(Kind))
    for row in rows:
        subject = (row[0].strip("`").replace("<p>", "vera").replace("<verb>", "freeze")
                   .replace("<id>", "01jd0000000000000000000000"))
        route = subjects.parse(subject)
        assert route is not None, subject
        assert route.kind == row[1].strip("`")
        assert (row[4] == "yes") == subject.startswith(("zeta.repair.", "zeta.control.")), row


def test_every_drop_reason_is_explained_in_the_order_they_are_checked() -> None:
    rows = table(PROSE, "| reason | the message |")
    assert [row[0].strip("`") for row in rows] == list(typing.get_args(DropReason))


def test_every_kind_links_its_schema() -> None:
    for name in ["envelope", *BODIES]:
        assert f"(schemas/{name}.json)" in PROSE, name
