"""The bus on a real nats-server: JetStream resources, leases, the protocol with five voters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.js.api import RetentionPolicy, StorageType
from nats.js.errors import NotFoundError

from bus import leases
from bus.connection import Connection
from bus.envelope import Envelope, Verifier
from bus.ids import new_id
from bus.jetstream import (
    AUDIT_STREAM,
    LEASES_BUCKET,
    Settings,
    bucket_config,
    check,
    ensure,
    stream_config,
)
from bus.keys import Signer, generate_user_seed
from bus.messages import Proposal, QuorumRule, Target
from bus.protocol import Judgement, Protocol
from lab.natsserver import NatsServer

NAMES = ("otto", "alexa", "riven", "vera", "lior")
SIGNERS = {n: Signer(generate_user_seed()) for n in NAMES}
KEYS = {n: s.public_key for n, s in SIGNERS.items()}


@pytest.fixture
def server(bare_nats_server: NatsServer) -> NatsServer:
    return bare_nats_server


@pytest.fixture
async def conn(server: NatsServer) -> AsyncIterator[Connection]:
    c = Connection([server.url], name="test", seed=None)
    await c.connect()
    yield c
    await c.close()


async def test_check_reports_missing_resources_and_ensure_creates_them(conn: Connection) -> None:
    missing = await check(conn.js, Settings())
    assert missing == [f"{AUDIT_STREAM} does not exist: an operator creates it with "
                       "`zeta-agent bus init`",
                       f"KV_{LEASES_BUCKET} does not exist: an operator creates it with "
                       "`zeta-agent bus init`"]
    with pytest.raises(NotFoundError):
        await conn.js.stream_info(AUDIT_STREAM)  # check made nothing
    assert await ensure(conn.js, Settings()) == []
    info = await conn.js.stream_info(AUDIT_STREAM)
    assert info.config.subjects == ["zeta.repair.>", "zeta.control.>"]
    assert await ensure(conn.js, Settings()) == []
    assert await check(conn.js, Settings()) == []
    problems = await check(conn.js, Settings(max_age=timedelta(days=7)))
    assert problems == [f"{AUDIT_STREAM} max_age is 7776000.0, expected 604800.0s"]


WEAKENED = [
    # (stream, the change an attacker or a careless hand made, the setting named)
    (AUDIT_STREAM, {"deny_delete": False}, "deny_delete"),
    (AUDIT_STREAM, {"deny_purge": False}, "deny_purge"),
    (AUDIT_STREAM, {"retention": RetentionPolicy.INTEREST}, "retention"),
    (AUDIT_STREAM, {"max_age": 3600.0}, "max_age"),
    (AUDIT_STREAM, {"max_msgs": 10}, "max_msgs"),
    (AUDIT_STREAM, {"max_bytes": 1 << 20}, "max_bytes"),
    (AUDIT_STREAM, {"storage": StorageType.MEMORY}, "storage"),
    (AUDIT_STREAM, {"allow_rollup_hdrs": True, "deny_purge": False}, "allow_rollup_hdrs"),
    (AUDIT_STREAM, {"allow_msg_ttl": True}, "allow_msg_ttl"),
    (AUDIT_STREAM, {"duplicate_window": 5.0}, "duplicate_window"),
    (AUDIT_STREAM, {"subjects": ["zeta.repair.>"]}, "subjects"),
    (f"KV_{LEASES_BUCKET}", {"max_age": 2.0, "duplicate_window": 2.0}, "max_age"),
    (f"KV_{LEASES_BUCKET}", {"max_msgs_per_subject": 5}, "history"),
    (f"KV_{LEASES_BUCKET}", {"storage": StorageType.MEMORY}, "storage"),
    (f"KV_{LEASES_BUCKET}", {"allow_direct": True}, "allow_direct"),
    (f"KV_{LEASES_BUCKET}", {"allow_rollup_hdrs": True, "deny_purge": False},
     "allow_rollup_hdrs"),
    (f"KV_{LEASES_BUCKET}", {"allow_msg_ttl": True}, "allow_msg_ttl"),
    (f"KV_{LEASES_BUCKET}", {"deny_purge": False}, "deny_purge"),
]


@pytest.mark.parametrize(("stream", "change", "setting"), WEAKENED,
                         ids=[f"{s}-{n}" for s, _, n in WEAKENED])
async def test_a_weakened_resource_is_reported_by_name(conn: Connection, stream: str,
                                                       change: dict[str, Any],
                                                       setting: str) -> None:
    """Made weaker before the agents came (as `nats stream add` or `nats kv add` would):
    every weakened setting is a named difference, and nothing is changed by checking."""
    good = {c.name: c for c in (stream_config(Settings()), bucket_config(Settings()))}
    for name, config in good.items():
        await conn.js.add_stream(replace(config, **change) if name == stream else config)
    problems = await check(conn.js, Settings())
    assert len(problems) == len(set(change) - {"duplicate_window"}) or stream == AUDIT_STREAM, (
        problems)
    assert any(p.startswith(f"{stream} {setting}") for p in problems), problems
    assert await check(conn.js, Settings()) == problems, "checking changed nothing"


async def test_two_racing_proposers_get_exactly_one_lease(conn: Connection) -> None:
    await ensure(conn.js, Settings())
    kv = await conn.js.key_value(LEASES_BUCKET)

    async def take(who: str) -> leases.Lease | leases.LeaseHeldError:
        try:
            return await leases.acquire(kv, "node.worker-1", repair=new_id(), executor=who,
                                        ttl=timedelta(minutes=5))
        except leases.LeaseHeldError as exc:
            return exc

    results = await asyncio.gather(*(take(n) for n in NAMES))
    won = [r for r in results if isinstance(r, leases.Lease)]
    lost = [r for r in results if isinstance(r, leases.LeaseHeldError)]
    assert len(won) == 1
    assert len(lost) == 4
    assert all(e.holder is not None and e.holder.executor == won[0].executor for e in lost)
    assert await leases.still_held(kv, won[0])
    assert await leases.release(kv, won[0])
    assert not await leases.still_held(kv, won[0])
    again = await leases.acquire(kv, "node.worker-1", repair=new_id(), executor="vera",
                                 ttl=timedelta(minutes=5))
    assert again.token > won[0].token, "a re-taken lease must carry a newer fencing token"
    assert not await leases.release(kv, won[0]), "a stale holder must not release the new lease"


async def test_lease_keys_survive_unit_names() -> None:
    key = "unit.zeta-agent@otto.service"
    assert leases.target_key(leases.kv_key(key)) == key
    assert "@" not in leases.kv_key(key)


@pytest.fixture
async def connections() -> AsyncIterator[list[Connection]]:
    opened: list[Connection] = []
    yield opened
    for c in opened:
        await c.close()


async def _protocols(server: NatsServer, verdicts: dict[str, str],
                     opened: list[Connection]) -> list[Protocol]:
    out = []
    verifier_keys = dict(KEYS)
    for name in NAMES:
        c = Connection([server.url], name=name, seed=None)
        await c.connect()
        opened.append(c)
        await ensure(c.js, Settings())

        def assess_for(me: str):  # type: ignore[no-untyped-def]
            async def assess(env: Envelope, proposal: Proposal) -> Judgement:
                verdict = verdicts.get(me, "approve")
                return Judgement(verdict, f"{me} says {verdict}", {"seen": True})  # type: ignore[arg-type]
            return assess

        p = Protocol(c, persona=name, host="h", signer=SIGNERS[name],
                     verifier=Verifier(keys=verifier_keys), voters=frozenset(NAMES),
                     assess=assess_for(name))
        await p.subscribe()
        out.append(p)
    return out


def _proposal(approvals: int = 3, deadline_s: float = 3) -> Proposal:
    return Proposal(
        action="k8s.node.cordon", target=Target(kind="node", name="worker-1"), policy="p",
        policy_digest="d", step=1, destructive=True, summary="NotReady 3m",
        quorum=QuorumRule(approvals=approvals, veto=("riven",),
                          deadline=datetime.now(UTC) + timedelta(seconds=deadline_s)))


async def test_five_personas_approve_a_destructive_proposal(
        server: NatsServer, connections: list[Connection]) -> None:
    ps = await _protocols(server, {}, connections)
    _, result = await ps[0].propose(_proposal())
    assert result.outcome == "approved"
    assert "riven" in result.approvals
    assert len(set(result.approvals)) >= 3


async def test_riven_veto_rejects(server: NatsServer, connections: list[Connection]) -> None:
    ps = await _protocols(server, {"riven": "block"}, connections)
    _, result = await ps[0].propose(_proposal())
    assert result.outcome == "rejected"
    assert result.vetoes == ("riven",)


async def test_too_few_approvals_rejects(server: NatsServer,
                                         connections: list[Connection]) -> None:
    ps = await _protocols(server, {"alexa": "reject", "vera": "reject", "lior": "reject"},
                          connections)
    _, result = await ps[0].propose(_proposal(approvals=3))
    assert result.outcome == "rejected"


async def test_the_fence_compares_the_lease_not_only_its_revision(conn: Connection) -> None:
    """A bucket made again counts revisions from 1: another repair's lease then carries
    the same revision as ours, and the fencing check must still fail."""
    await ensure(conn.js, Settings())
    kv = await conn.js.key_value(LEASES_BUCKET)
    ours = await leases.acquire(kv, "node.worker-1", repair=new_id(), executor="otto",
                                ttl=timedelta(minutes=5))
    await conn.js.delete_stream(f"KV_{LEASES_BUCKET}")
    await ensure(conn.js, Settings())
    kv = await conn.js.key_value(LEASES_BUCKET)
    theirs = await leases.acquire(kv, "node.worker-1", repair=new_id(), executor="vera",
                                  ttl=timedelta(minutes=5))
    assert theirs.token == ours.token
    assert not await leases.still_held(kv, ours)
    assert await leases.still_held(kv, theirs)
    await kv.put("node.worker-2", b"not json")
    [_, junk] = sorted(await leases.all_leases(kv), key=lambda lease: lease.target)
    assert junk.problem
    assert junk.repair == leases.MALFORMED
