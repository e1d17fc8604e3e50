"""JetStream resources the agents share: the ``ZETA_AUDIT`` stream and the ``zeta_leases`` bucket.

Created if missing. If they exist with settings the agents cannot rely on, the
differences are returned (and the agent refuses destructive work, saying which
setting differs) rather than silently "fixed": another fleet may own them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError

AUDIT_STREAM = "ZETA_AUDIT"
AUDIT_SUBJECTS = ("zeta.repair.>", "zeta.control.>")
LEASES_BUCKET = "zeta_leases"
# Long enough that a message republished from a journal after a reconnect, or by a
# retrying publisher, is still recognised by its Nats-Msg-Id and stored once.
DUPLICATE_WINDOW = timedelta(minutes=10)


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


def bucket_config(settings: Settings) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=LEASES_BUCKET,
        description="Repair leases; the revision of a key is its fencing token",
        history=1,
        storage=StorageType.FILE,
        replicas=settings.replicas,
        # A lease nobody released disappears after this long even if no agent
        # sweeps it; the stale-lease policy normally releases it much sooner.
        ttl=settings.lease_ttl.total_seconds(),
        # Reads go to the stream leader, never a replica's own copy: the fencing check
        # must fail on a host cut off from the leader, not answer from a stale copy.
        direct=False,
    )


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-3


async def ensure(js: JetStreamContext, settings: Settings) -> list[str]:
    """Create the stream and bucket if missing; return the settings that differ, if any."""
    want = stream_config(settings)
    problems: list[str] = []
    try:
        have = (await js.stream_info(AUDIT_STREAM)).config
    except NotFoundError:
        await js.add_stream(want)
    else:
        if sorted(have.subjects or []) != sorted(AUDIT_SUBJECTS):
            problems.append(f"{AUDIT_STREAM} subjects are {have.subjects}, expected "
                            f"{list(AUDIT_SUBJECTS)}")
        if have.storage != StorageType.FILE:
            problems.append(f"{AUDIT_STREAM} storage is {have.storage}, expected file")
        if have.num_replicas != settings.replicas:
            problems.append(f"{AUDIT_STREAM} replicas is {have.num_replicas}, expected "
                            f"{settings.replicas}")
        if not _close(have.max_age, want.max_age):
            problems.append(f"{AUDIT_STREAM} max_age is {have.max_age}s, expected {want.max_age}s")
        if (have.duplicate_window or 0) < DUPLICATE_WINDOW.total_seconds() - 1e-3:
            problems.append(f"{AUDIT_STREAM} duplicate_window is {have.duplicate_window}s, "
                            f"expected at least {DUPLICATE_WINDOW.total_seconds():g}s")
    bucket = bucket_config(settings)
    try:
        status = await (await js.key_value(LEASES_BUCKET)).status()
    except BucketNotFoundError:
        await js.create_key_value(bucket)
    else:
        if status.history != 1:
            problems.append(f"{LEASES_BUCKET} history is {status.history}, expected 1")
        replicas = status.stream_info.config.num_replicas
        if replicas != settings.replicas:
            problems.append(f"{LEASES_BUCKET} replicas is {replicas}, expected {settings.replicas}")
        if status.stream_info.config.allow_direct:
            problems.append(f"{LEASES_BUCKET} allows direct gets: a replica cut off from the "
                            "leader could answer a fencing check from a stale copy")
    return problems
