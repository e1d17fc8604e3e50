"""The local journal: messages an agent could not publish while the bus was down.

Each line is one sealed envelope. When the bus returns they are published in order;
the audit stream stores each once however often it is replayed, because the
envelope id is the Nats-Msg-Id. The file is rewritten atomically, so a crash
mid-flush loses nothing (at worst a message is published twice and de-duplicated).
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from pydantic import ValidationError

from bus.connection import BusUnavailableError, Connection, subject_for
from bus.envelope import Envelope

log = structlog.get_logger("bus.journal")


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, envelope: Envelope) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            handle.write(envelope.to_bytes() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def pending(self) -> list[Envelope]:
        """The journaled envelopes; a damaged line is logged and skipped, never fatal."""
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(Envelope.model_validate_json(line))
            except ValidationError as exc:
                log.error("journal line dropped", file=str(self.path), line=number,
                          reason=str(exc.errors()[0]["msg"]))
        return out

    async def flush(self, connection: Connection) -> int:
        """Publish what is pending; keep what could not be sent. Returns how many were sent."""
        pending = self.pending()
        sent = 0
        for envelope in pending:
            try:
                await connection.publish(subject_for(envelope), envelope)
            except BusUnavailableError as exc:
                log.warning("journal flush interrupted", sent=sent, left=len(pending) - sent,
                            error=str(exc))
                break
            sent += 1
        self._rewrite(pending[sent:])
        if sent:
            log.info("journal published", sent=sent, left=len(pending) - sent)
        return sent

    def _rewrite(self, left: list[Envelope]) -> None:
        if not left:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(e.to_bytes() + b"\n" for e in left))
        os.replace(tmp, self.path)
