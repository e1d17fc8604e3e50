"""JetStream resources the agents share: the ``ZETA_AUDIT`` stream and the ``zeta_leases`` bucket.

Agents only *check* them (``check``), on every connect and every heartbeat, and refuse
destructive work while anything differs, naming the setting: a bus weakened behind
their backs (an audit stream that allows purge, a lease bucket whose TTL is shorter
than a lease) must stop them, not be used. Only an operator creates or alters them
(``zeta-agent bus init``, ``ensure`` here): agents are not granted the JetStream
requests that would, so a stolen persona key cannot make them again, weaker. Nobody
may *change* them over the bus (a shorter max age would erase history as surely as a
purge): a difference is fixed by the bus's administrator, out of band.

The bucket's backing stream is made here rather than by nats-py's ``create_key_value``,
which turns on rollup headers and per-message TTLs: a single ``Nats-Rollup: all``
publish on one lease key would wipe every lease, and a TTL header would let a lease
vanish early. The KV API the agents use (get, create, delete with a revision) needs
neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from bus.limits import DUPLICATE_WINDOW

AUDIT_STREAM = "ZETA_AUDIT"
AUDIT_SUBJECTS = ("zeta.repair.>", "zeta.control.>")
LEASES_BUCKET = "zeta_leases"
LEASES_STREAM = f"KV_{LEASES_BUCKET}"
"""The stream a KV bucket is stored in; its JetStream API requests name this."""
LEASES_SUBJECTS = (f"$KV.{LEASES_BUCKET}.>",)
INIT_COMMAND = "zeta-agent bus init"


@dataclass(frozen=True)
class Settings:
    replicas: int = 1
    max_age: timedelta = timedelta(days=90)
    lease_ttl: timedelta = timedelta(minutes=30)


def stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=AUDIT_STREAM,
        description="Every proposal, vote, decision, start and result of Zeta agents",
        subjects=list(AUDIT_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        max_age=settings.max_age.total_seconds(),
        duplicate_window=DUPLICATE_WINDOW.total_seconds(),
        deny_delete=True,
        deny_purge=True,
    )


def bucket_config(settings: Settings) -> StreamConfig:
    """The lease bucket's backing stream, as a KV bucket with history 1."""
    ttl = settings.lease_ttl.total_seconds()
    return StreamConfig(
        name=LEASES_STREAM,
        description="Repair leases; the revision of a key is its fencing token",
        subjects=list(LEASES_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        # History 1: the revision of a key is the one entry, the fencing token.
        max_msgs_per_subject=1,
        max_msgs=-1,
        max_bytes=-1,
        max_consumers=-1,
        discard=DiscardPolicy.NEW,
        # A lease nobody released disappears after this long even if no agent
        # sweeps it; the stale-lease policy normally releases it much sooner.
        max_age=ttl,
        duplicate_window=min(120.0, ttl),
        # Reads go to the stream leader, never a replica's own copy: the fencing check
        # must fail on a host cut off from the leader, not answer from a stale copy.
        allow_direct=False,
        deny_delete=True,
        deny_purge=True,
    )


def _unlimited(value: int | None) -> bool:
    return value is None or value <= 0


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-3


_Check = tuple[str, Callable[[StreamConfig], Any], Callable[[Any], bool], str]


def _checks(want: StreamConfig, *, at_least_duplicates: float) -> list[_Check]:
    """(setting, read it, is it acceptable, what is expected), in the nats CLI's words."""
    return [
        ("subjects", lambda c: sorted(c.subjects or []),
         lambda v: v == sorted(want.subjects or []), f"{want.subjects}"),
        ("retention", lambda c: c.retention, lambda v: v == RetentionPolicy.LIMITS, "limits"),
        ("storage", lambda c: c.storage, lambda v: v == StorageType.FILE, "file"),
        ("replicas", lambda c: c.num_replicas, lambda v: v == want.num_replicas,
         f"{want.num_replicas}"),
        ("max_age", lambda c: c.max_age, lambda v: _close(v, want.max_age), f"{want.max_age}s"),
        ("max_msgs", lambda c: c.max_msgs, _unlimited, "unlimited"),
        ("max_bytes", lambda c: c.max_bytes, _unlimited, "unlimited"),
        ("duplicate_window", lambda c: c.duplicate_window or 0,
         lambda v: v >= at_least_duplicates - 1e-3, f"at least {at_least_duplicates:g}s"),
        ("deny_delete", lambda c: bool(c.deny_delete), bool, "true: no message may be deleted"),
        ("deny_purge", lambda c: bool(c.deny_purge), bool, "true: the history may not be purged"),
        ("allow_rollup_hdrs", lambda c: bool(c.allow_rollup_hdrs), lambda v: not v,
         "false: a rollup header purges messages"),
        ("allow_msg_ttl", lambda c: bool(c.allow_msg_ttl), lambda v: not v,
         "false: a per-message TTL lets a publisher's message vanish early"),
        ("sealed", lambda c: bool(c.sealed), lambda v: not v, "false"),
        ("mirror", lambda c: c.mirror, lambda v: v is None, "none"),
    ]


def _differences(have: StreamConfig, want: StreamConfig) -> list[str]:
    name = want.name
    if name == AUDIT_STREAM:
        checks = _checks(want, at_least_duplicates=DUPLICATE_WINDOW.total_seconds())
        checks.append(("max_msgs_per_subject", lambda c: c.max_msgs_per_subject, _unlimited,
                       "unlimited"))
    else:
        checks = _checks(want, at_least_duplicates=0)
        checks += [
            ("history (max_msgs_per_subject)", lambda c: c.max_msgs_per_subject,
             lambda v: v == 1, "1: the revision is the fencing token"),
            ("allow_direct", lambda c: bool(c.allow_direct), lambda v: not v,
             "false: a replica cut off from the leader could answer a fencing check "
             "from a stale copy"),
        ]
    problems = []
    for setting, read, acceptable, expected in checks:
        value = read(have)
        if not acceptable(value):
            shown = value.value if hasattr(value, "value") else value
            problems.append(f"{name} {setting} is {shown}, expected {expected}")
    return problems


def _wanted(settings: Settings) -> list[StreamConfig]:
    return [stream_config(settings), bucket_config(settings)]


async def _info(js: JetStreamContext, name: str) -> StreamConfig | None:
    try:
        return (await js.stream_info(name)).config
    except NotFoundError:
        return None


async def check(js: JetStreamContext, settings: Settings) -> list[str]:
    """Every way the audit stream and lease bucket differ from ``settings``; [] if none.

    Reads only (two stream-info requests). A missing resource is a difference: agents
    never create one.
    """
    problems: list[str] = []
    for want in _wanted(settings):
        have = await _info(js, str(want.name))
        if have is None:
            problems.append(f"{want.name} does not exist: an operator creates it with "
                            f"`{INIT_COMMAND}`")
        else:
            problems += _differences(have, want)
    return problems


async def ensure(js: JetStreamContext, settings: Settings) -> list[str]:
    """Create what is missing (an operator's request); return what still differs."""
    for want in _wanted(settings):
        if await _info(js, str(want.name)) is None:
            await js.add_stream(want)
    return await check(js, settings)
