"""Arbitrary input never crashes the agent or a command: it gets a named error (issue 14).

Hypothesis feeds arbitrary bytes and arbitrary YAML trees to the loader, and arbitrary
bytes (and envelopes with a configured sender's name and key around arbitrary JSON)
to every handler of bus messages: the verifier, the protocol's proposal, vote and
control handlers, `watch` and `audit`. Each input must end in a drop with a reason
from the documented list, or configuration errors naming the file, and nothing may
raise. Found this way: 64 KiB of ``[`` overflowed the JSON parser's stack
(RecursionError), and a string with a lone surrogate broke the signature's canonical
bytes (UnicodeEncodeError) for anyone who knew a persona's public key.
"""

from __future__ import annotations

import asyncio
import io
import json
import typing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from bus import subjects
from bus.connection import Connection
from bus.envelope import VERSION, Dropped, DropReason
from bus.keys import Signer, generate_user_seed
from bus.messages import BODIES, QuorumRule
from bus.protocol import Protocol, _Open
from bus.quorum import Rule
from bus.reading import Stored
from runtime.agent.link import Roster, peek_control
from runtime.config.loading import config_paths, load
from runtime.ops import audit
from runtime.ops.watch import View

REPO = Path(__file__).resolve().parent.parent
CONFIG = load(config_paths(REPO))
ROSTER = Roster.of(CONFIG)
REASONS = set(typing.get_args(DropReason))
REPAIR = "01JD0000000000000000000000"
SUBJECTS = [subjects.proposed(REPAIR), subjects.vote(REPAIR, "riven"), subjects.decided(REPAIR),
            subjects.heartbeat("otto"), subjects.control("freeze"), "zeta.nonsense",
            subjects.result(REPAIR)]

EXAMPLES = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])

json_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)

# Text a JSON encoder may emit but UTF-8 cannot hold: lone surrogates.
surrogates = st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                     min_size=1, max_size=3)


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    """An envelope with a configured sender and its real key around arbitrary parts:
    it passes the cheap checks and reaches the body's validation and the signature."""
    kind = draw(st.sampled_from(sorted(BODIES)))
    sender = draw(st.sampled_from(sorted(ROSTER.keys)))
    obj: dict[str, Any] = {
        "v": VERSION, "kind": kind, "id": draw(st.text(max_size=30)), "from": sender,
        "host": draw(st.text(max_size=10) | surrogates),
        "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "repair": draw(st.none() | st.just(REPAIR)),
        "body": draw(json_trees | st.dictionaries(st.sampled_from(
            ["verdict", "reason", "verb", "action", "target", "outcome", "paths"]),
            json_trees | surrogates, max_size=4)),
        "key": ROSTER.keys[sender], "sig": draw(st.text(max_size=90)),
    }
    return json.dumps(obj).encode("utf-8")  # ensure_ascii: surrogates travel as \ud800


messages = st.binary(max_size=2048) | envelopes() | st.sampled_from([
    b"[" * 65_000, b'{"v":1,"body":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    b'"\\ud800"', b"\xff\xfe", b"", b"null", b"{}"])


@given(subject=st.sampled_from(SUBJECTS) | st.text(max_size=40), data=messages)
@EXAMPLES
def test_the_verifier_drops_anything_unsigned_with_a_named_reason(
        subject: str, data: bytes) -> None:
    verifier = ROSTER.verifier()
    outcome = verifier.check(subject, data)
    assert isinstance(outcome, Dropped)
    assert outcome.reason in REASONS
    assert outcome.detail
    assert sum(verifier.dropped.values()) == 1
    peek_control(data)  # what the agent reads of an unverified control; it must not raise


@dataclass
class _Msg:
    subject: str
    data: bytes


def _protocol() -> Protocol:
    async def assess(*_: object) -> typing.NoReturn:
        raise AssertionError("nothing unverified is ever assessed")

    async def on_control(*_: object) -> None:
        raise AssertionError("nothing unverified is ever obeyed")

    connection = Connection(["nats://127.0.0.1:1"], name="fuzz", seed=None)
    protocol = Protocol(connection, persona="riven", host="h", signer=Signer(generate_user_seed()),
                        verifier=ROSTER.verifier(), voters=frozenset(ROSTER.keys),
                        assess=assess, on_control=on_control)
    # An open proposal of its own, so votes on it reach the verifier.
    protocol._open[REPAIR] = _Open(Rule.of("riven", QuorumRule(
        approvals=3, deadline=datetime.now(UTC) + timedelta(minutes=1))))
    return protocol


@given(data=messages)
@EXAMPLES
def test_every_protocol_handler_drops_garbage_and_carries_on(data: bytes) -> None:
    protocol = _protocol()
    handlers = [(protocol._on_proposal, subjects.proposed(REPAIR)),
                (protocol._on_vote, subjects.vote(REPAIR, "otto")),
                (protocol._on_control_msg, subjects.control("freeze"))]

    async def feed() -> None:
        for handler, subject in handlers:
            await handler(_Msg(subject, data))  # type: ignore[arg-type]

    asyncio.run(feed())
    assert sum(protocol.verifier.dropped.values()) == len(handlers)
    assert set(protocol.verifier.dropped) <= REASONS
    assert protocol._open[REPAIR].ballots == []


@given(subject=st.sampled_from(SUBJECTS), data=messages)
@EXAMPLES
def test_watch_and_audit_show_garbage_as_dropped(subject: str, data: bytes) -> None:
    _, line = View(ROSTER).feed(subject, data, datetime.now(UTC))
    assert line is not None
    assert " DROPPED " in line
    stored = [Stored(seq=1, subject=subject, data=data)]
    violations = audit.verify(stored, ROSTER.keys, ROSTER.operators, ROSTER.voters,
                              policies={n: p.value for n, p in CONFIG.policies.items()},
                              default_quorum=CONFIG.fleet.spec.quorum)
    assert len(violations) == 1
    assert audit.listing(stored, ROSTER.verifier(), as_json=True)
    audit.summarize(stored, ROSTER.verifier())


# ---------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _load_one(directory: Path, name: str, content: bytes) -> None:
    for part in ("personas", "policies"):
        (directory / part).mkdir(parents=True, exist_ok=True)
        for old in (directory / part).iterdir():
            old.unlink()
    path = directory / name
    path.write_bytes(content)
    config = load(config_paths(directory), strict=False)
    for error in config.errors:
        assert error.file.startswith(str(directory)) or error.file.startswith("(built-in")
        assert error.message
    if name == "fleet.yaml":
        path.unlink()


files = st.sampled_from(["personas/x.yaml", "policies/x.yaml", "fleet.yaml"])


@given(name=files, content=st.binary(max_size=4096))
@example(name="policies/x.yaml", content=b"[" * 2_000)  # deeper than the parser's stack
@example(name="personas/x.yaml", content=b"a: &a [*a]\n")  # an alias to itself
@example(name="fleet.yaml", content=b"!!python/object:os.system {}\n")
@example(name="personas/x.yaml", content=b"=")  # YAML's value tag: a node with no line
@example(name="policies/x.yaml", content=b"\t- x\x00")
@EXAMPLES
def test_the_loader_names_the_file_of_any_bytes(scratch: Path, name: str,
                                                content: bytes) -> None:
    _load_one(scratch, name, content)


yaml_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["1h", "99999999999999d", "-5s", "zeta/v1"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "name", "spec",
                                       "identity", "nkey", "detect", "remedies", "quorum",
                                       "bus", "urls", "x"]) | st.text(max_size=8),
                      children, max_size=5),
    max_leaves=40)


@given(name=files, kind=st.sampled_from(["Persona", "RepairPolicy", "Fleet", "Other"]),
       tree=yaml_trees)
@EXAMPLES
def test_the_loader_names_the_field_of_any_yaml_tree(scratch: Path, name: str, kind: str,
                                                     tree: object) -> None:
    document: object = ({"apiVersion": "zeta/v1", "kind": kind, **tree}
                        if isinstance(tree, dict) else tree)
    yaml = YAML(typ="safe")
    text = io.StringIO()
    yaml.dump(document, text)
    _load_one(scratch, name, text.getvalue().encode("utf-8"))
