"""``nats sub 'zeta.>'`` with the real NATS CLI shows every message kind as readable JSON.

The CLI is natscli v0.5.0 built from the Go module proxy (lab/tools.py) once per
machine, in a session fixture so the build stays out of any single test's time. Its
output format, checked by running it (stdout is not a terminal):

    [#1] Received on "zeta.agent.otto.heartbeat"
    {"at":"…","body":{…},…}

    [#2] Received on "zeta.repair.<id>.proposed" with reply "_INBOX.…"
    Nats-Msg-Id: <id>

    {"at":"…","body":{…},…}
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bus.connection import Connection
from bus.envelope import Accepted, Verifier
from bus.jetstream import AUDIT_STREAM
from bus.keys import Signer, generate_user_seed
from bus.messages import BODIES
from lab import tools
from lab.natsserver import NatsServer
from tests.prereq import missing

SIGNERS = {name: Signer(generate_user_seed()) for name in tools.EXAMPLE_SENDERS}
KEYS = {n: s.public_key for n, s in SIGNERS.items() if n != tools.EXAMPLE_OPERATOR}
OPERATORS = {tools.EXAMPLE_OPERATOR: SIGNERS[tools.EXAMPLE_OPERATOR].public_key}
AUDITED = ("zeta.repair.", "zeta.control.")
RECEIVED = re.compile(r'^\[#(\d+)\] Received on "([^"]+)"')
VIEWED = re.compile(r"^\[(\d+)\] Subject: (\S+) Received: ")


# ---------------------------------------------------------------- the CLI and its output


@pytest.fixture(scope="session")
def nats_cli(request: pytest.FixtureRequest) -> Path:
    """The pinned nats CLI; building it prints progress past pytest's capture."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(line, file=sys.stderr, flush=True)

    try:
        return tools.natscli(progress=progress)
    except tools.ToolUnavailableError as exc:
        missing(f"the nats CLI is not available: {exc}")


def _cli_env(home: Path) -> dict[str, str]:
    """Only PATH and a scratch home: no NATS_* variables or saved contexts leak in."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config")}


@dataclass(frozen=True)
class Shown:
    subject: str
    headers: dict[str, str]
    payload: str


@dataclass
class Parser:
    """Turns the CLI's lines into messages: a header line, ``Name: value`` lines, the JSON."""

    start: re.Pattern[str]
    subject: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def feed(self, line: str) -> Shown | None:
        line = line.rstrip("\r\n")
        if (m := self.start.match(line)) is not None:
            self.subject, self.headers = m[2], {}
        elif self.subject is not None and line.startswith("{"):
            shown = Shown(self.subject, self.headers, line)
            self.subject = None
            return shown
        elif self.subject is not None and ": " in line:
            name, value = line.strip().split(": ", 1)
            self.headers[name] = value
        return None


@contextlib.asynccontextmanager
async def subscribed(cli: Path, server: NatsServer, conn: Connection,
                     home: Path) -> AsyncIterator[asyncio.Queue[Shown]]:
    """Run ``nats sub 'zeta.>'``; yield once it provably receives, with what it shows."""
    proc = await asyncio.create_subprocess_exec(
        str(cli), "--server", server.url, "sub", "zeta.>", env=_cli_env(home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    shown: asyncio.Queue[Shown] = asyncio.Queue()

    async def read() -> None:
        assert proc.stdout is not None
        parser = Parser(RECEIVED)
        async for raw in proc.stdout:
            if (message := parser.feed(raw.decode())) is not None:
                await shown.put(message)

    reader = asyncio.create_task(read())
    try:
        # The CLI logs "Subscribing on" before its SUB reaches the server, so probe
        # until a message comes back instead of trusting the log line.
        async with asyncio.timeout(15):
            while True:
                await conn.nc.publish("zeta.probe", b'{"probe": true}')
                with contextlib.suppress(TimeoutError):
                    if (await asyncio.wait_for(shown.get(), 0.2)).subject == "zeta.probe":
                        break
        yield shown
    finally:
        proc.terminate()
        await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def next_message(shown: asyncio.Queue[Shown]) -> Shown:
    while (message := await asyncio.wait_for(shown.get(), 10)).subject == "zeta.probe":
        pass
    return message


def _verify(message: Shown) -> Accepted:
    checked = Verifier(keys=KEYS, operators=OPERATORS).check(
        message.subject, message.payload.encode(), live=False)
    assert isinstance(checked, Accepted), checked
    return checked


@pytest.mark.slow
async def test_nats_sub_shows_every_kind_as_the_signed_json(
        nats_cli: Path, nats_server: NatsServer, conn: Connection, tmp_path: Path) -> None:
    story = tools.story(SIGNERS, start=datetime.now(UTC))
    assert {envelope.kind for _, envelope in story} == set(BODIES)
    async with subscribed(nats_cli, nats_server, conn, tmp_path) as shown:
        for subject, envelope in story:
            await conn.publish(subject, envelope)
        seen = [await next_message(shown) for _ in story]
    for message, (subject, envelope) in zip(seen, story, strict=True):
        assert message.subject == subject
        # Byte for byte what was signed, so an operator can check it by hand.
        assert message.payload == envelope.to_bytes().decode()
        assert json.loads(message.payload) == envelope.model_dump(mode="json", by_alias=True)
        assert _verify(message).envelope == envelope
        if subject.startswith(AUDITED):
            assert message.headers == {"Nats-Msg-Id": envelope.id}
        else:
            assert message.headers == {}


def _run_in_terminal(args: list[str], env: dict[str, str], until: str,
                     timeout: float = 20) -> str:
    """Run a command that insists on a terminal; return what it printed up to ``until``."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    proc = subprocess.Popen(args, stdin=terminal, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while until.encode() not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    out += os.read(controller, 65536)
                except OSError:  # the command exited and closed the terminal
                    break
    finally:
        proc.kill()
        proc.wait()
        os.close(controller)
    return out.decode()


@pytest.mark.slow
async def test_nats_stream_shows_the_audited_messages(
        nats_cli: Path, nats_server: NatsServer, conn: Connection, tmp_path: Path) -> None:
    story = tools.story(SIGNERS, start=datetime.now(UTC))
    for subject, envelope in story:
        await conn.publish(subject, envelope)
    audited = [(s, e) for s, e in story if s.startswith(AUDITED)]
    base = [str(nats_cli), "--server", nats_server.url, "stream"]

    info = await asyncio.create_subprocess_exec(
        *base, "info", AUDIT_STREAM, "--json", env=_cli_env(tmp_path),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(info.communicate(), 20)
    assert info.returncode == 0
    state = json.loads(out)["state"]
    assert (state["messages"], state["first_seq"], state["last_seq"]) == (
        len(audited), 1, len(audited))

    # `nats stream view` pages, so it refuses to run without a terminal: give it one.
    text = await asyncio.to_thread(_run_in_terminal, [*base, "view", AUDIT_STREAM, "25"],
                                   _cli_env(tmp_path), "Reached apparent end of data")
    parser = Parser(VIEWED)
    viewed = [m for line in text.splitlines() if (m := parser.feed(line)) is not None]
    assert [(m.subject, m.headers, m.payload) for m in viewed] == [
        (s, {"Nats-Msg-Id": e.id}, e.to_bytes().decode()) for s, e in audited]


# ---------------------------------------------------------------- building the CLI


FAKE_GO = """#!/bin/sh
echo "go $* GOFLAGS=$GOFLAGS CGO_ENABLED=$CGO_ENABLED" >> "{log}"
{body}
"""


def _fake_go(bin_dir: Path, log: Path, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    go = bin_dir / "go"
    go.write_text(FAKE_GO.format(log=log, body=body))
    go.chmod(0o755)


@pytest.fixture
def lines() -> list[str]:
    return []


def test_a_build_installs_the_pinned_version_into_the_cache_once(
        tmp_path: Path, lines: list[str]) -> None:
    log = tmp_path / "go.log"
    _fake_go(tmp_path / "bin", log, 'echo "go: downloading x"\n'
                                    'printf "#!/bin/sh\\necho v0.5.0\\n" > "$GOBIN/nats"')
    environ = {"PATH": str(tmp_path / "bin"), "ZETA_CACHE_DIR": str(tmp_path / "cache")}
    path = tools.natscli(environ, progress=lines.append)
    assert path == tmp_path / "cache" / "natscli" / "v0.5.0" / "nats"
    assert path.read_text() == "#!/bin/sh\necho v0.5.0\n"
    assert log.read_text() == ("go install github.com/nats-io/natscli/nats@v0.5.0 "
                               "GOFLAGS=-mod=mod CGO_ENABLED=0\n")
    assert lines[0].startswith("building github.com/nats-io/natscli/nats@v0.5.0")
    assert "  go: downloading x" in lines
    assert lines[-1].startswith(f"built {path}")
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "nats"]

    assert tools.natscli({**environ, "PATH": ""}, progress=lines.append) == path
    assert log.read_text().count("go install") == 1, "a built CLI is reused, never rebuilt"


def test_the_cache_defaults_to_the_home_directory() -> None:
    assert tools.cache_dir({"HOME": "/home/op"}) == Path("/home/op/.cache/zeta-agent")
    assert tools.cache_dir({"HOME": "/home/op", "ZETA_CACHE_DIR": "/c"}) == Path("/c")


def test_without_go_the_error_says_what_is_missing(tmp_path: Path, lines: list[str]) -> None:
    with pytest.raises(tools.ToolUnavailableError, match="`go` is not on PATH"):
        tools.natscli({"PATH": str(tmp_path), "ZETA_CACHE_DIR": str(tmp_path / "c")},
                      progress=lines.append)
    assert lines == []


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, lines: list[str]) -> None:
    _fake_go(tmp_path / "bin", tmp_path / "go.log",
             'echo "dial tcp: lookup proxy.golang.org: no such host"\n'
             'echo half > "$GOBIN/nats"\nexit 1')
    cache = tmp_path / "cache"
    with pytest.raises(tools.ToolUnavailableError, match=r"exit 1.*no such host"):
        tools.natscli({"PATH": str(tmp_path / "bin"), "ZETA_CACHE_DIR": str(cache)},
                      progress=lines.append)
    assert [p.name for p in (cache / "natscli" / "v0.5.0").iterdir()] == [".lock"]


def test_a_second_caller_waits_for_the_first_build(tmp_path: Path) -> None:
    environ = {"PATH": "", "ZETA_CACHE_DIR": str(tmp_path / "cache")}
    target = tools.NATSCLI.path(tmp_path / "cache")
    target.parent.mkdir(parents=True)
    results: list[Path | Exception] = []
    said: list[str] = []

    def second() -> None:
        try:
            results.append(tools.natscli(environ, progress=said.append))
        except tools.ToolUnavailableError as exc:
            results.append(exc)

    with (target.parent / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a first builder, mid-build
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive(), "the second caller must wait, not build (there is no go)"
        target.write_text("built by the first")
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(5)
    assert results == [target]
    assert said == [f"waiting for another process building into {target.parent}"]


def test_a_missing_prerequisite_skips_locally_and_fails_in_ci() -> None:
    with pytest.raises(pytest.skip.Exception, match="no go"):
        missing("no go", environ={})
    with pytest.raises(pytest.skip.Exception):
        missing("no go", environ={"CI": "false"})
    with pytest.raises(pytest.fail.Exception, match="CI=true forbids skipping: no go"):
        missing("no go", environ={"CI": "true"})
