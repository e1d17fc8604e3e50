"""The signed JSON envelope every agent message travels in (docs/bus.md).

Signing covers the canonical JSON of the whole object except ``sig``: keys sorted,
no insignificant whitespace, UTF-8. A receiver verifies the bytes it received
(re-serialized from the parsed object, never from a model that may normalize
values), so what is checked is exactly what the sender signed.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_serializer

from bus import ids, subjects
from bus.keys import Signer, verify
from bus.messages import BODIES, Kind

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # a vote with evidence is a few KiB; anything larger is abuse


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    v: Literal[1]
    kind: Kind
    id: str = Field(pattern=r"^[0-7][0-9a-hjkmnp-tv-z]{25}$")
    sender: str = Field(alias="from", pattern=subjects.PERSONA_NAME.pattern)
    host: str = Field(max_length=253)
    at: AwareDatetime  # a naive time cannot be compared with a deadline: refused here
    repair: str | None = Field(default=None, pattern=r"^[0-7][0-9a-hjkmnp-tv-z]{25}$")
    body: dict[str, Any]
    key: str = Field(max_length=64)
    sig: str = Field(max_length=128)

    @field_serializer("at")
    def _at(self, value: datetime) -> str:
        return format_time(value)

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def format_time(value: datetime) -> str:
    """UTC with milliseconds and a Z, the one time format on the bus."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The signed bytes: canonical JSON of ``obj`` without its ``sig``."""
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal(kind: Kind, *, sender: str, host: str, body: BaseModel, signer: Signer,
         repair: str | None = None, at: datetime | None = None,
         message_id: str | None = None) -> Envelope:
    """Build and sign an envelope. ``body`` must be the model registered for ``kind``."""
    if not isinstance(body, BODIES[kind]):
        raise TypeError(f"a {kind} carries a {BODIES[kind].__name__}, not {type(body).__name__}")
    now = at or datetime.now(UTC)
    obj: dict[str, Any] = {
        "v": VERSION, "kind": kind, "id": message_id or ids.new_id(int(now.timestamp() * 1000)),
        "from": sender, "host": host, "at": format_time(now), "repair": repair,
        "body": body.model_dump(mode="json", by_alias=True), "key": signer.public_key,
    }
    obj["sig"] = _b64(signer.sign(canonical(obj)))
    return Envelope.model_validate(obj)


DropReason = Literal["oversized", "not-json", "malformed", "unknown-version", "subject-mismatch",
                     "unknown-sender", "wrong-key", "bad-signature", "stale", "replayed",
                     "rate-limited"]


@dataclass(frozen=True)
class Dropped:
    reason: DropReason
    detail: str


@dataclass(frozen=True)
class Accepted:
    envelope: Envelope
    body: BaseModel


@dataclass
class Verifier:
    """Checks every incoming message; counts what it drops, by reason.

    ``keys`` maps each sender (persona or operator name) to the one public key
    configured for it; the key inside a message is only compared, never trusted.
    The replay memory holds ids for twice the freshness window: an older id is
    refused as stale before replay is even considered, so memory stays bounded.
    """

    keys: Mapping[str, str]
    operators: Mapping[str, str] = field(default_factory=dict)
    freshness: timedelta = timedelta(seconds=30)
    dropped: Counter[str] = field(default_factory=Counter)
    _seen: set[str] = field(default_factory=set)
    _expiry: list[tuple[datetime, str]] = field(default_factory=list)  # a heap, oldest first

    def check(self, subject: str, data: bytes, now: datetime | None = None, *,
              live: bool = True) -> Accepted | Dropped:
        """Accept or drop one message.

        ``live=False`` checks a message read back from the audit stream: everything
        but freshness and replay, which are properties of delivery, not of history.
        """
        outcome = self._check(subject, data, now or datetime.now(UTC), live)
        if isinstance(outcome, Dropped):
            self.dropped[outcome.reason] += 1
        return outcome

    def _check(self, subject: str, data: bytes, now: datetime, live: bool) -> Accepted | Dropped:
        parsed = _parse(data)
        if isinstance(parsed, Dropped):
            return parsed
        signed, env, body = parsed
        expected = subjects.parse(subject)
        if expected is None or expected.kind != env.kind or (
                expected.sender is not None and expected.sender != env.sender) or (
                expected.repair is not None and expected.repair != env.repair):
            return Dropped("subject-mismatch",
                           f"{env.kind} from {env.sender!r} on subject {subject!r}")
        table = self.operators if env.kind == "control" else self.keys
        configured = table.get(env.sender)
        if configured is None:
            return Dropped("unknown-sender", f"no key configured for {env.sender!r}")
        if env.key != configured:
            return Dropped("wrong-key", f"key {env.key[:8]}… is not the one configured for "
                                        f"{env.sender!r}")
        try:
            signature = _unb64(env.sig)
        except (binascii.Error, ValueError):
            return Dropped("bad-signature", "signature is not base64url")
        if not verify(configured, signed, signature):
            return Dropped("bad-signature", f"signature does not verify for {env.sender!r}")
        if not live:
            return Accepted(env, body)
        # Freshness and replay come after the signature: only a correctly signed
        # message may occupy the replay memory, so forgeries cannot flood it.
        at = env.at
        if abs(now - at) > self.freshness:
            return Dropped("stale", f"sent {format_time(at)}, now {format_time(now)}, "
                                    f"window ±{self.freshness.total_seconds():g}s")
        self._forget(now)
        if env.id in self._seen:
            return Dropped("replayed", f"id {env.id} already seen")
        self._seen.add(env.id)
        heapq.heappush(self._expiry, (at, env.id))
        return Accepted(env, body)

    def _forget(self, now: datetime) -> None:
        horizon = now - 2 * self.freshness
        while self._expiry and self._expiry[0][0] < horizon:
            self._seen.discard(heapq.heappop(self._expiry)[1])


def _parse(data: bytes) -> tuple[bytes, Envelope, BaseModel] | Dropped:
    """Everything about a message that needs no key: size, JSON, version, shape, and
    the bytes its signature must cover."""
    if len(data) > MAX_MESSAGE_BYTES:
        return Dropped("oversized", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return Dropped("not-json", str(exc)[:200])
    except RecursionError:  # 64 KiB of `[` nest deeper than the parser's stack
        return Dropped("not-json", "nested too deeply")
    if not isinstance(obj, dict):
        return Dropped("malformed", "not a JSON object")
    if obj.get("v") != VERSION:
        return Dropped("unknown-version", f"v={obj.get('v')!r}, this agent speaks {VERSION}")
    try:
        env = Envelope.model_validate(obj)
        body = BODIES[env.kind].model_validate(env.body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        return Dropped("malformed", f"{where}: {first['msg']} ({exc.error_count()} errors)")
    try:
        signed = canonical(obj)
    except UnicodeEncodeError:  # JSON may escape a lone surrogate; UTF-8 cannot hold it
        return Dropped("malformed", "a string holds a lone surrogate, which is not text")
    return signed, env, body
