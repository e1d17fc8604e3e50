"""One persona's connection to the bus: nkey auth, reconnect forever, every transition logged.

nats-py reconnects by itself once connected, but gives up if the first connect
fails; an agent must start while the bus is down (it still observes), so the first
connect is retried here, forever, with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Sequence

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from bus import subjects
from bus.envelope import Envelope

log = structlog.get_logger("bus")

AUDITED_PREFIXES = ("zeta.repair.", "zeta.control.")
CLOSE_GRACE = 2.0  # seconds; systemd's stop timeout is for the whole agent, not the drain
SYNC_TIMEOUT = 5  # seconds for a round trip to the server before it counts as unavailable


# How nats-server words a refusal of the client's credentials.
_REFUSAL = re.compile(r"authorization violation|authentication", re.IGNORECASE)


class BusUnavailableError(ConnectionError):
    """The bus cannot be reached now; destructive work must be refused."""


class Connection:
    def __init__(self, urls: Sequence[str], *, name: str, seed: bytes | None,
                 inbox_prefix: str = "_INBOX", backoff_max: float = 30.0) -> None:
        self._urls = list(urls)
        self._inbox_prefix = inbox_prefix
        self._name = name
        self._seed = seed
        self._backoff_max = backoff_max
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._closing = False
        self.on_connected: list[Callable[[], Awaitable[None]]] = []
        # The server's last word refusing our credentials, so a command that gives up
        # can say "refused this key" rather than "cannot reach the bus".
        self.refused: str | None = None

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def js(self) -> JetStreamContext:
        if self._js is None or not self.connected:
            raise BusUnavailableError("not connected to the bus")
        return self._js

    @property
    def nc(self) -> Client:
        if self._nc is None or not self.connected:
            raise BusUnavailableError("not connected to the bus")
        return self._nc

    async def connect(self) -> None:
        """Connect, retrying forever with backoff; returns once connected."""
        attempt = 0
        while True:
            attempt += 1
            try:
                self._nc = await nats.connect(
                    self._urls, name=self._name,
                    nkeys_seed_str=self._seed.decode() if self._seed else None,
                    connect_timeout=2, reconnect_time_wait=1, max_reconnect_attempts=-1,
                    allow_reconnect=True, inbox_prefix=self._inbox_prefix,
                    error_cb=self._error, disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected, closed_cb=self._closed,
                )
            except (NatsError, OSError, TimeoutError) as exc:
                self._note_refusal(exc)
                delay = min(self._backoff_max, 0.5 * 2 ** min(attempt, 8))
                delay *= random.uniform(0.8, 1.2)  # noqa: S311 (jitter, not secrecy)
                log.warning("bus connect failed; will retry", attempt=attempt,
                            urls=self._urls, error=str(exc) or type(exc).__name__,
                            retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            self._js = self._nc.jetstream()
            log.info("bus connected", url=str(self._nc.connected_url.geturl()
                                              if self._nc.connected_url else self._urls),
                     attempt=attempt)
            await self._notify_connected()
            return

    async def _notify_connected(self) -> None:
        for callback in self.on_connected:
            try:
                await callback()
            except Exception:
                log.exception("bus on-connect step failed")

    def _note_refusal(self, exc: BaseException) -> None:
        if _REFUSAL.search(str(exc)):
            self.refused = str(exc)

    async def _error(self, exc: Exception) -> None:
        self._note_refusal(exc)
        log.warning("bus error", error=str(exc) or type(exc).__name__)

    async def _disconnected(self) -> None:
        if not self._closing:
            log.warning("bus disconnected; destructive actions are refused until it returns")

    async def _reconnected(self) -> None:
        log.info("bus reconnected")
        await self._notify_connected()

    async def _closed(self) -> None:
        log.info("bus connection closed")

    async def publish(self, subject: str, envelope: Envelope) -> None:
        """Publish; audited subjects go through JetStream with the envelope id as Nats-Msg-Id."""
        data = envelope.to_bytes()
        try:
            if subject.startswith(AUDITED_PREFIXES):
                await self.js.publish(subject, data, timeout=2,
                                      headers={"Nats-Msg-Id": envelope.id})
            else:
                await self.nc.publish(subject, data)
        except (NatsError, OSError, TimeoutError) as exc:
            raise BusUnavailableError(f"publish to {subject} failed: {exc}") from exc

    async def subscribe(self, subject: str,
                        handler: Callable[[Msg], Awaitable[None]]) -> Subscription:
        return await self.nc.subscribe(subject, cb=handler)

    async def sync(self) -> None:
        """Return once the server has processed everything sent so far on this connection.

        One ``flush()`` does not promise that: nats-py 2.16 writes its PING straight to
        the socket while earlier SUB and PUB commands wait for its flusher task, so the
        PONG can come back before a subscription exists. The first flush wakes the
        flusher, which writes them out before that PONG can be read; the second PING
        then travels behind them. (A message to ourselves would also prove it, but the
        rendered permissions rightly let a persona publish nowhere it could receive.)
        """
        try:
            for _ in range(2):
                await self.nc.flush(timeout=SYNC_TIMEOUT)
        except (NatsError, OSError, TimeoutError) as exc:
            raise BusUnavailableError(f"bus round trip failed: {exc}") from exc

    async def close(self) -> None:
        """Drain (deliver what is in flight), but never hold up a stopping agent for long."""
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            try:
                async with asyncio.timeout(CLOSE_GRACE):
                    await self._nc.drain()
            except (NatsError, OSError, TimeoutError):
                await self._nc.close()


def subject_for(envelope: Envelope) -> str:
    """The subject an envelope belongs on, from its kind, sender and repair."""
    kind, sender, repair = envelope.kind, envelope.sender, envelope.repair or ""
    routes: dict[str, Callable[[], str]] = {
        "heartbeat": lambda: subjects.heartbeat(sender),
        "finding": lambda: subjects.finding(sender),
        "proposal": lambda: subjects.proposed(repair),
        "vote": lambda: subjects.vote(repair, sender),
        "decision": lambda: subjects.decided(repair),
        "started": lambda: subjects.started(repair),
        "result": lambda: subjects.result(repair),
        "control": lambda: subjects.control(str(envelope.body.get("verb"))),
    }
    return routes[kind]()
