"""``zeta-agent watch``: what a person (or a script, with --json) sees of the bus."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bus import subjects
from bus.connection import Connection
from bus.envelope import Accepted, Dropped, Envelope, seal
from bus.keys import Signer, generate_user_seed
from bus.messages import BODIES, Heartbeat, Vote
from lab import tools
from lab.natsserver import NatsServer, free_ports
from runtime.agent.link import Roster
from runtime.ops.common import load_config_dir
from runtime.ops.watch import FORGET_AFTER, View, describe, json_line
from tests.conftest import REPO
from tests.keyed import OPERATOR, keyed_config

EXAMPLES = tools.examples()
KEYS = {n: tools.example_signer(n).public_key for n in tools.EXAMPLE_SENDERS if n != OPERATOR}
OPERATORS = {OPERATOR: tools.example_signer(OPERATOR).public_key}
ROSTER = Roster(KEYS, OPERATORS, tools.EXAMPLE_VOTERS)
REPAIR = next(e.repair for _, e in EXAMPLES if e.repair)


def _feed(view: View, subject: str, envelope: Envelope,
          now: datetime | None = None) -> tuple[Accepted | Dropped, str | None]:
    return view.feed(subject, envelope.to_bytes(), now or envelope.at)


def _tampered(envelope: Envelope) -> bytes:
    obj = json.loads(envelope.to_bytes())
    obj["body"]["reason"] = "drain every node"
    return json.dumps(obj).encode()


def test_every_message_gets_one_line_saying_what_it_says() -> None:
    view = View(ROSTER)
    lines = [_feed(view, s, e)[1] for s, e in EXAMPLES]
    assert lines == [
        "06:00:00 otto@cp-1 tick 12: ok: 1 finding open [bus connected, k8s observed; "
        "v0.1.0 pid 4242]",
        "06:00:00 otto finding opened: node-not-ready on node.worker-1: node worker-1 "
        "Ready=Unknown for 3m",
        f"06:00:01 {REPAIR} otto proposes k8s.node.cordon on node.worker-1 (node-not-ready "
        "step 0, destructive; 3 approvals, veto riven, 2 distinct paths by 06:00:31): node "
        "worker-1 Ready=Unknown for 3m [seen by apiserver]",
        f"06:00:01 {REPAIR} alexa votes approve: confirmed from cp-2: node worker-1 "
        "Ready=Unknown for 3m [seen by apiserver, network]  [pending: 2/3 approvals so far]",
        f"06:00:01 {REPAIR} riven votes approve: confirmed from cp-3: node worker-1 "
        "Ready=Unknown for 3m (9/9 review checks pass) [seen by apiserver, network]  "
        "[approved: 3/3 approvals, no veto, evidence by apiserver, network]",
        f"06:00:01 {REPAIR} otto decided APPROVED: 3/3 approvals, no veto, evidence by "
        "apiserver, network "
        "(approvals: otto, alexa, riven)",
        f"06:00:01 {REPAIR} otto started: lease node.worker-1, fencing token 7",
        f"06:00:02 {REPAIR} otto result succeeded: k8s.node.cordon on node.worker-1: "
        "worker-1 cordoned",
        "06:00:03 oncall (operator) freeze: investigating worker-1 hardware; no repairs "
        "until thawed",
    ]
    assert view.open == {}, "a decided proposal is no longer open"


def test_presence_shows_changes_only_and_the_table_shows_ages() -> None:
    view = View(ROSTER)
    otto = tools.example_signer("otto")
    start = tools.EXAMPLE_START

    def beat(seconds: float, status: str, frozen: bool = False) -> str | None:
        at = start + timedelta(seconds=seconds)
        body = Heartbeat(pid=1, version="0.1.0", tick=int(seconds), status=status,
                         bus="connected", kubernetes="observed", frozen=frozen,
                         scopes_digest="s", policies_digest="p")
        envelope = seal("heartbeat", sender="otto", host="cp-1", body=body, signer=otto, at=at)
        return _feed(view, subjects.heartbeat("otto"), envelope)[1]

    assert beat(0, "ok") is not None
    assert beat(5, "ok") is None, "a heartbeat that changes nothing is not a line"
    assert beat(10, "ok: 1 finding open") is not None
    assert beat(15, "ok: 1 finding open", frozen=True) is not None
    table = view.summary(start + timedelta(seconds=42))
    assert table[0].split() == ["PERSONA", "HOST", "LAST", "HEARTBEAT", "AGE", "BUS", "K8S",
                                "FROZEN", "STATUS"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["otto"] == ["otto", "cp-1", "06:00:15", "27s", "connected", "observed", "yes",
                            "ok:", "1", "finding", "open"]
    assert rows["alexa"][:3] == ["alexa", "-", "never"]
    assert set(rows) == {"otto", "alexa", "riven"}


def test_open_proposals_are_listed_with_their_votes_so_far() -> None:
    view = View(ROSTER)
    for subject, envelope in EXAMPLES[:4]:  # up to Alexa's vote
        _feed(view, subject, envelope)
    table = view.summary(tools.EXAMPLE_START + timedelta(seconds=2))
    assert table[-1] == (f"open {REPAIR}: k8s.node.cordon on node.worker-1 by otto: alexa "
                         "approve [pending: 2/3 approvals so far]")
    deadline = tools.EXAMPLE_START + timedelta(seconds=31)
    assert view.summary(deadline + timedelta(seconds=1))[-1].endswith(
        "[expired: deadline passed: waiting for riven (veto)]")
    subject, heartbeat = EXAMPLES[0]
    view.feed(subject, heartbeat.to_bytes(), deadline + FORGET_AFTER + timedelta(seconds=1))
    assert view.open == {}, "a proposal never decided is forgotten after its deadline"


def test_drops_are_shown_with_their_reason() -> None:
    view = View(ROSTER)
    subject, vote = next((s, e) for s, e in EXAMPLES if e.kind == "vote")
    now = vote.at
    outcome, line = view.feed(subject, _tampered(vote), now)
    assert isinstance(outcome, Dropped)
    assert line == (f"06:00:01 DROPPED {subject}: bad-signature: signature does not verify "
                    "for 'alexa'")
    stranger = seal("vote", sender="alexa", host="x", body=Vote.model_validate(vote.body),
                    signer=Signer(generate_user_seed()), repair=vote.repair, at=now)
    assert "wrong-key" in (view.feed(subject, stranger.to_bytes(), now)[1] or "")
    assert "stale" in (view.feed(subject, vote.to_bytes(), now + timedelta(minutes=5))[1] or "")
    assert "replayed" not in (_feed(view, subject, vote)[1] or "")
    assert "replayed" in (_feed(view, subject, vote)[1] or "")
    assert view.verifier.dropped == {"bad-signature": 1, "wrong-key": 1, "stale": 1,
                                     "replayed": 1}


def test_json_lines_carry_the_envelope_as_received_or_the_drop() -> None:
    view = View(ROSTER)
    subject, proposal = EXAMPLES[2]
    outcome, _ = _feed(view, subject, proposal)
    assert json.loads(json_line(subject, proposal.to_bytes(), outcome)) == {
        "subject": subject, "envelope": json.loads(proposal.to_bytes())}
    outcome, _ = view.feed(subject, b"{not json", proposal.at)
    record = json.loads(json_line(subject, b"{not json", outcome))
    assert (record["subject"], record["dropped"]) == (subject, "not-json")


def test_the_roster_comes_from_the_configuration(tmp_path: Path) -> None:
    keyed = keyed_config(tmp_path / "config", "nats://127.0.0.1:4222")
    roster = Roster.of(load_config_dir(keyed.config_dir))
    assert roster.keys == keyed.keys
    assert roster.operators == keyed.operators
    assert roster.voters == {"otto", "alexa", "riven", "vera", "lior"}
    assert roster.freshness == timedelta(seconds=30)


# ---------------------------------------------------------------- the command on a real bus


def _closed_port() -> int:
    return free_ports(1)[0]


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _ready(proc: asyncio.subprocess.Process) -> None:
    """Wait until the watch says it is subscribed: from then on it misses nothing."""
    assert proc.stderr is not None
    ready = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert ready.startswith(b"watching zeta.>: 5 personas, 1 operators known"), ready


async def _lines(proc: asyncio.subprocess.Process, count: int) -> list[str]:
    assert proc.stdout is not None
    return [(await asyncio.wait_for(proc.stdout.readline(), 10)).decode().rstrip("\n")
            for _ in range(count)]


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


@pytest.mark.slow
async def test_watch_prints_every_message_and_every_drop(
        nats_server: NatsServer, conn: Connection, tmp_path: Path) -> None:
    keyed = keyed_config(tmp_path / "config", nats_server.url)
    common = ("watch", "--config-dir", str(keyed.config_dir))
    as_json = await _spawn(*common, "--json")
    for_people = await _spawn(*common, "--summary-every", "0")
    try:
        await asyncio.gather(_ready(as_json), _ready(for_people))
        story = tools.story(keyed.signers, start=datetime.now(UTC))
        for subject, envelope in story:
            await conn.publish(subject, envelope)
        vote_subject, vote = next((s, e) for s, e in story if e.kind == "vote")
        await conn.nc.publish(vote_subject, _tampered(vote))
        await conn.nc.flush()

        records = [json.loads(line) for line in await _lines(as_json, len(story) + 1)]
        assert records[:-1] == [{"subject": s, "envelope": json.loads(e.to_bytes())}
                                for s, e in story]
        assert records[-1] == {"subject": vote_subject, "dropped": "bad-signature",
                               "detail": "signature does not verify for 'alexa'"}

        shown = await _lines(for_people, len(story) + 1)
        for line, (_, envelope) in zip(shown, story, strict=False):
            assert describe(envelope, BODIES[envelope.kind].model_validate(envelope.body)) in line
        assert f"DROPPED {vote_subject}: bad-signature" in shown[-1]
    finally:
        codes = [await _stop(as_json), await _stop(for_people)]
    assert codes == [0, 0], "SIGTERM ends the watch cleanly"


@pytest.mark.slow
async def test_watch_waits_for_the_bus_and_still_stops_on_sigterm(tmp_path: Path) -> None:
    keyed = keyed_config(tmp_path / "config", f"nats://127.0.0.1:{_closed_port()}")
    proc = await _spawn("watch", "--config-dir", str(keyed.config_dir))
    try:
        assert proc.stderr is not None
        trying = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"Connect call failed" in trying
    finally:
        code = await _stop(proc)
    assert code == 0
