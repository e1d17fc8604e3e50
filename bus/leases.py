"""Repair leases in the ``zeta_leases`` KV bucket: one executor per target, with a fencing token.

A lease is taken with KV ``create``, which fails if the key exists, so two
proposers racing for one target get exactly one lease. The revision ``create``
returns is the fencing token: before acting, the executor checks that the key
still has that revision; a lease that expired and was taken by someone else has a
newer revision, and the stale holder does not act.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from bus.subjects import PERSONA_NAME

_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes
_PLAIN = re.compile(r"[-_/a-zA-Z0-9.]")


def kv_key(target_key: str) -> str:
    """Encode a target key (``unit.zeta-agent@otto.service``) into the KV key alphabet."""
    return "".join(c if _PLAIN.match(c) else f"={ord(c):02X}" for c in target_key)


def target_key(kv_key_text: str) -> str:
    return re.sub(r"=([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), kv_key_text)


@dataclass(frozen=True)
class Lease:
    target: str
    repair: str
    executor: str
    token: int
    expires: datetime
    problem: str = ""  # why the stored value is not a lease we wrote ("" when it is)


class _Value(BaseModel):
    """A lease's value in the bucket: validated before anything reads it, since any
    client that may write the bucket can put anything there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repair: str = Field(pattern=r"^[0-7][0-9a-hjkmnp-tv-z]{25}$")
    executor: str = Field(pattern=PERSONA_NAME.pattern)
    expires: AwareDatetime


MALFORMED = "(malformed)"
_LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)


class LeaseHeldError(Exception):
    """The target is already leased; carries the holder so the refusal can name it."""

    def __init__(self, holder: Lease | None, target: str) -> None:
        self.holder = holder
        who = f"repair {holder.repair} by {holder.executor}" if holder else "another repair"
        super().__init__(f"{target} is leased by {who}")


def _decode(key: str, value: bytes, revision: int) -> Lease:
    """The lease in a bucket entry. A malformed value still holds its key (no one else
    can take the target), reads as long expired (the stale-lease sweep proposes its
    release) and says what is wrong with it; it never raises."""
    try:
        data = _Value.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "value"
        return Lease(target_key(key), MALFORMED, MALFORMED, revision, _LONG_AGO,
                     problem=f"{where}: {first['msg']}")
    return Lease(target_key(key), data.repair, data.executor, revision, data.expires)


async def acquire(kv: KeyValue, target: str, *, repair: str, executor: str, ttl: timedelta,
                  now: datetime | None = None) -> Lease:
    """Take the lease on ``target`` or raise LeaseHeldError."""
    expires = (now or datetime.now(UTC)) + ttl
    value = json.dumps({"repair": repair, "executor": executor,
                        "expires": expires.isoformat()}).encode()
    try:
        revision = await kv.create(kv_key(target), value)
    except KeyWrongLastSequenceError:
        raise LeaseHeldError(await holder(kv, target), target) from None
    return Lease(target, repair, executor, revision, expires)


async def holder(kv: KeyValue, target: str) -> Lease | None:
    """The current lease on ``target``, if any."""
    try:
        entry = await kv.get(kv_key(target))
    except (KeyNotFoundError, KeyDeletedError):
        return None
    if entry.value is None or entry.revision is None:
        return None
    return _decode(entry.key, entry.value, entry.revision)


async def still_held(kv: KeyValue, lease: Lease) -> bool:
    """The fencing check: the key still carries this lease, revision and value.

    The revision alone is not enough: a bucket deleted and made again counts its
    revisions from 1, and another repair's lease could carry ours.
    """
    current = await holder(kv, lease.target)
    return current is not None and not current.problem and (
        current.token, current.repair, current.executor) == (
        lease.token, lease.repair, lease.executor)


async def release(kv: KeyValue, lease: Lease) -> bool:
    """Delete the lease if it is still ours; False if it was already gone or re-taken."""
    try:
        await kv.delete(kv_key(lease.target), last=lease.token)
    except APIError as exc:
        # nats-py maps this code to KeyWrongLastSequenceError for put, not for delete.
        if exc.err_code in _WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


async def all_leases(kv: KeyValue) -> list[Lease]:
    """Every live lease (for the stale-lease detector and for voters)."""
    out = []
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    for key in keys:
        lease = await holder(kv, target_key(key))
        if lease is not None:
            out.append(lease)
    return out
