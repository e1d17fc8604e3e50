"""``zeta-agent freeze|thaw|breaker-reset``: signed by an operator, stored in ZETA_AUDIT.

Each test runs a real nats-server with the rendered authorization, so the operator's
bus permissions are exercised too: it creates the audit stream and publishes into it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from nats.js.errors import NotFoundError

from bus import subjects
from bus.connection import Connection
from bus.envelope import Accepted, Verifier
from bus.jetstream import AUDIT_STREAM
from bus.keys import generate_user_seed
from bus.messages import Control
from lab.natsserver import NatsServer
from runtime.config.credentials import SEED_FILE
from runtime.config.loading import config_paths, load
from runtime.ops.cli import main
from runtime.ops.common import connect_within
from runtime.ops.render.nats import render_nats

OPERATOR = "oncall"


@dataclass(frozen=True)
class Fleet:
    config_dir: Path
    credentials: Path
    key: str  # the operator's public key, as fleet.yaml lists it
    server: NatsServer

    def run(self, *args: str, bus: str | None = None) -> int:
        try:
            return main([*args, "--config-dir", str(self.config_dir),
                         "--bus", bus or self.server.url])
        finally:
            # The command set up logging for its own process (to this test's captured
            # stderr); the test process outlives it.
            structlog.reset_defaults()


def keygen(credentials: Path, name: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["keygen", name, "--credentials-dir", str(credentials)]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture
def fleet(config_copy: Path, tmp_path: Path,
          capsys: pytest.CaptureFixture[str]) -> Iterator[Fleet]:
    credentials = config_copy / "credentials"
    key = keygen(credentials, OPERATOR, capsys)
    (config_copy / "fleet.yaml").write_text(
        "apiVersion: zeta/v1\nkind: Fleet\nspec:\n"
        f"  credentialsDir: {credentials}\n"
        f"  operators:\n    - {{name: {OPERATOR}, nkey: {key}}}\n")
    conf = tmp_path / "nats.conf"
    conf.write_text(render_nats(load(config_paths(config_copy)), listen="127.0.0.1:4222",
                                store_dir=None))
    with NatsServer(tmp_path / "store", config=conf) as server:
        yield Fleet(config_copy, credentials, key, server)


@pytest.fixture
async def reader(fleet: Fleet) -> AsyncIterator[Connection]:
    """The operator's own connection, to read back what was stored."""
    seed = (fleet.credentials / OPERATOR / SEED_FILE).read_bytes()
    connection = Connection([fleet.server.url], name="reader", seed=seed)
    await connect_within(connection, 5, [fleet.server.url])
    yield connection
    await connection.close()


async def run(fleet: Fleet, *args: str) -> int:
    # The command runs its own event loop (asyncio.run), so it gets a thread of its own.
    return await asyncio.to_thread(fleet.run, *args)


async def stored(reader: Connection, verb: str) -> bytes:
    message = await reader.js.get_last_msg(AUDIT_STREAM, subjects.control(verb))
    assert message.data is not None
    return message.data


async def assert_nothing_stored(reader: Connection) -> None:
    with pytest.raises(NotFoundError):
        await reader.js.stream_info(AUDIT_STREAM)


async def test_freeze_is_signed_by_the_operator_and_stored_in_the_audit(
        fleet: Fleet, reader: Connection, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()  # the fixtures' own output
    code = await run(fleet, "freeze", "--operator", OPERATOR, "--reason", "etcd is unhappy")
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == (f"sent freeze as operator {OPERATOR} on zeta.control.freeze "
                      f"to {fleet.server.url}")
    data = await stored(reader, "freeze")
    assert out[1].encode() == data, "what was printed is what was stored"
    envelope = json.loads(data)
    assert (envelope["from"], envelope["key"], envelope["kind"]) == (
        OPERATOR, fleet.key, "control")
    accepted = Verifier(keys={}, operators={OPERATOR: fleet.key}).check(
        subjects.control("freeze"), data)
    assert isinstance(accepted, Accepted), accepted
    assert accepted.body == Control(verb="freeze", reason="etcd is unhappy")
    # An agent that does not list this operator drops it.
    assert not isinstance(Verifier(keys={}).check(subjects.control("freeze"), data), Accepted)


async def test_thaw_and_breaker_reset(fleet: Fleet, reader: Connection) -> None:
    assert await run(fleet, "thaw", "--operator", OPERATOR, "--reason", "etcd healthy") == 0
    assert await run(fleet, "breaker-reset", "--operator", OPERATOR, "--reason", "storm over",
                     "--policy", "node-not-ready") == 0
    verifier = Verifier(keys={}, operators={OPERATOR: fleet.key})
    thaw = verifier.check(subjects.control("thaw"), await stored(reader, "thaw"))
    reset = verifier.check(subjects.control("breaker-reset"),
                           await stored(reader, "breaker-reset"))
    assert isinstance(thaw, Accepted)
    assert isinstance(reset, Accepted)
    assert thaw.body == Control(verb="thaw", reason="etcd healthy")
    assert reset.body == Control(verb="breaker-reset", reason="storm over",
                                 policy="node-not-ready")


async def test_pause_and_resume_are_signed_controls_and_a_pause_lapses(
        fleet: Fleet, reader: Connection, capsys: pytest.CaptureFixture[str]) -> None:
    before = datetime.now(UTC)
    assert await run(fleet, "pause", "--operator", OPERATOR, "--reason", "etcd upgrade",
                     "--policy", "node-not-ready", "--for", "30m") == 0
    assert await run(fleet, "resume", "--operator", OPERATOR, "--reason", "done",
                     "--all") == 0
    verifier = Verifier(keys={}, operators={OPERATOR: fleet.key})
    pause = verifier.check(subjects.control("pause"), await stored(reader, "pause"))
    resume = verifier.check(subjects.control("resume"), await stored(reader, "resume"))
    assert isinstance(pause, Accepted)
    assert isinstance(resume, Accepted)
    assert isinstance(pause.body, Control)
    assert pause.body.policy == "node-not-ready"
    assert pause.body.until is not None
    assert before + timedelta(minutes=30) <= pause.body.until <= (
        datetime.now(UTC) + timedelta(minutes=30))
    assert resume.body == Control(verb="resume", reason="done")
    capsys.readouterr()
    for wrong in ("0s", "8d"):
        code = await run(fleet, "pause", "--operator", OPERATOR, "--reason", "x", "--all",
                         "--for", wrong)
        assert code == 2
        assert "--for must be more than 0s and at most 7d" in capsys.readouterr().err


async def test_a_seed_that_is_not_the_listed_key_is_refused(
        fleet: Fleet, reader: Connection, capsys: pytest.CaptureFixture[str]) -> None:
    keygen(fleet.credentials, "mallory", capsys)
    seed = fleet.credentials / "mallory" / SEED_FILE
    code = await run(fleet, "freeze", "--operator", OPERATOR, "--reason", "x",
                     "--seed", str(seed))
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert f"but fleet.yaml lists {fleet.key} for operator {OPERATOR!r}: refusing to sign" in (
        captured.err)
    await assert_nothing_stored(reader)


async def test_an_operator_not_in_the_fleet_is_refused(
        fleet: Fleet, reader: Connection, capsys: pytest.CaptureFixture[str]) -> None:
    keygen(fleet.credentials, "mallory", capsys)
    code = await run(fleet, "freeze", "--operator", "mallory", "--reason", "x")
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert f"'mallory' is not an operator in fleet.yaml (operators: {OPERATOR})" in captured.err
    await assert_nothing_stored(reader)


async def test_a_missing_seed_is_refused(
        fleet: Fleet, reader: Connection, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run(fleet, "thaw", "--operator", OPERATOR, "--reason", "x",
                     "--seed", str(fleet.credentials / "nope"))
    assert code == 2
    assert f"the seed {fleet.credentials / 'nope'}: cannot read: No such file" in (
        capsys.readouterr().err)
    await assert_nothing_stored(reader)


async def test_breaker_reset_needs_a_known_policy(
        fleet: Fleet, reader: Connection, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run(fleet, "breaker-reset", "--operator", OPERATOR, "--reason", "x",
                     "--policy", "no-such-policy")
    assert code == 2
    assert "no policy 'no-such-policy'" in capsys.readouterr().err
    await assert_nothing_stored(reader)


@pytest.mark.parametrize("args", [
    ["freeze", "--operator", OPERATOR],                                  # no reason
    ["freeze", "--operator", OPERATOR, "--reason", ""],                  # an empty reason
    ["breaker-reset", "--operator", OPERATOR, "--reason", "x"],          # no policy
    ["freeze", "--reason", "x"],                                         # no operator
])
def test_usage_mistakes_exit_2(fleet: Fleet, args: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = fleet.run(*args)
    except SystemExit as exit_:
        code = int(str(exit_.code))
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_unreachable_bus_fails_within_the_timeout(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.server.stop()
    started = time.monotonic()
    code = fleet.run("freeze", "--operator", OPERATOR, "--reason", "x", "--timeout", "1")
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, ""), "an unreachable bus is exit 2, as for every command"
    assert f"cannot reach the bus at {fleet.server.url} within 1s" in captured.err
    assert elapsed < 3


async def test_a_bus_that_does_not_know_the_operator_refuses_it(
        fleet: Fleet, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # fleet.yaml lists the operator, but the server runs a config rendered before that.
    bare = tmp_path / "bare.conf"
    config = load(config_paths(fleet.config_dir))
    config.fleet = config.fleet.model_copy(update={
        "spec": config.fleet.spec.model_copy(update={"operators": ()})})
    bare.write_text(render_nats(config, listen="127.0.0.1:4222", store_dir=None))
    with NatsServer(tmp_path / "bare-store", config=bare) as server:
        code = await asyncio.to_thread(fleet.run, "freeze", "--operator", OPERATOR,
                                       "--reason", "x", "--timeout", "1", bus=server.url)
    captured = capsys.readouterr()
    assert code == 2
    assert f"the bus at {server.url} refused the credentials" in captured.err
    assert "Authorization Violation" in captured.err
    assert "cannot reach the bus" not in captured.err, "a refused key is not a bus that is down"


def test_bus_init_is_the_operators_and_bus_check_tells_what_differs(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """Agents only check the resources: an operator makes them, with the operator's key
    on a bus enforcing the rendered permissions; a persona's key cannot."""
    bus = ["--bus", fleet.server.url, "--config-dir", str(fleet.config_dir), "--timeout", "3"]
    assert main(["bus", "check", "--operator", OPERATOR, *bus]) == 1
    assert "ZETA_AUDIT does not exist" in capsys.readouterr().out
    stranger = fleet.credentials / "stranger.seed"
    stranger.write_bytes(generate_user_seed())
    assert main(["bus", "init", "--seed", str(stranger), *bus]) == 2, "an unknown key: nowhere"
    assert main(["bus", "init", "--operator", OPERATOR, *bus]) == 0
    assert main(["bus", "check", "--operator", OPERATOR, *bus]) == 0
    assert "as fleet.yaml says" in capsys.readouterr().err
