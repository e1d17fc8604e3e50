"""Reading a stream back without changing it: the audit, the freeze state.

A sequence of JetStream "get next message" requests from the first sequence on: it
creates no consumer (which a read-only watcher may not) and leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError


@dataclass(frozen=True)
class Stored:
    """One message as the stream keeps it."""

    seq: int
    subject: str
    data: bytes
    time: datetime | None = None  # when the server stored it: no publisher can set this


async def read_stream(js: JetStreamContext, stream: str, subject: str = ">") -> list[Stored]:
    """Every message of ``stream`` on ``subject`` (a filter), in stream order.

    Raises NotFoundError if the stream does not exist.
    """
    await js.stream_info(stream)
    out: list[Stored] = []
    seq = 1
    while True:
        try:
            raw = await js.get_msg(stream, seq, subject=subject, next=True)
        except NotFoundError:
            return out
        assert raw.seq is not None
        out.append(Stored(raw.seq, raw.subject or "", raw.data or b"", raw.time))
        seq = raw.seq + 1
